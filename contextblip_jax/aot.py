"""`python -m contextblip_jax.aot`: compile a config's step ahead of time for a device
topology and print its plan (memory per chip, FLOPs, collectives, roofline step time); see
`run/plan.py`.

  python -m contextblip_jax.aot --config configs/pretrain.py --topology v5e:4x4 \\
      [--num_slices 2] [--platform tpu|cpu] [--step train|eval] [--json plan.json] \\
      [--config.model.compute_dtype=bfloat16 ...]
  python -m contextblip_jax.aot --config configs/backbone.py:tiny --topology v5e:2x2 \\
      --platform cpu     # anywhere: 4 forced host devices, v5e figures for the estimates

Exit status 2 with one line `error: ...` for a bad config, topology or missing libtpu.
"""

import math
import os
import sys


def _flag(argv, name: str, default: str = "") -> str:
  for i, a in enumerate(argv):
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
    if a == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return default


def _before_jax(argv) -> None:
  """Backends are chosen when JAX starts: abstract TPU devices need no TPU backend (the host
  CPU one is enough; no TPU probing), and `--platform cpu` (or topology 'cpu:N') needs as many
  forced host devices as the topology has chips."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")          # no TPU VM metadata server
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other JAX processes may hold libtpu
  topo = _flag(argv, "topology")
  if _flag(argv, "platform", "tpu") == "cpu" or topo.lower().startswith("cpu"):
    try:
      n = math.prod(int(x) for x in topo.split(":", 1)[1].split("x")) if ":" in topo else 1
      n *= int(_flag(argv, "num_slices", "1"))
    except ValueError:
      return  # the planner reports the bad topology
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                               f"device_count={n}").strip()


_before_jax(sys.argv)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:args]).",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "v5e:4x4, v5p:2x2x1, v6e:2x4, ... or cpu:N")
_PLATFORM = flags.DEFINE_enum("platform", "tpu", ["tpu", "cpu"],
                              "tpu: abstract TPU devices (needs libtpu); cpu: as many forced "
                              "host devices as the topology has chips (runs anywhere)")
_STEP = flags.DEFINE_enum("step", None, ["train", "eval"],
                          "the step to compile (default: eval for evaluate/predict configs, "
                          "else the stage's train step)")
_SLICES = flags.DEFINE_integer("num_slices", 1, "TPU slices (the mesh across them: "
                               "config.mesh_dcn)")
_JSON = flags.DEFINE_string("json", "", "also write the plan here (JSON)")
flags.mark_flags_as_required(["config", "topology"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from contextblip_jax.parallel.planning import PlanError  # pylint: disable=g-import-not-at-top
  from contextblip_jax.run import plan, validate_config  # pylint: disable=g-import-not-at-top
  from contextblip_jax.storage import cli_errors  # pylint: disable=g-import-not-at-top
  try:
    validate_config.validate(_CONFIG.value)
    return plan.main(_CONFIG.value, _TOPOLOGY.value, _SLICES.value, _JSON.value,
                     platform=_PLATFORM.value, step=_STEP.value)
  except (PlanError, ValueError, OSError) as e:
    sys.exit(cli_errors.report(e))


if __name__ == "__main__":
  app.run(main)
