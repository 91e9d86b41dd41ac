"""Which accelerator a run uses, and a clear stop when it asked for one JAX did not find.

`config.platform` (configs/common.py) says what the run needs:

  "auto"  whatever JAX finds (TPU, then GPU, then CPU); one info line names it
  "cpu"   the CPU, even on a machine with an accelerator (JAX is told before it starts)
  "gpu"   an NVIDIA (or ROCm) GPU: stop when JAX runs on anything else
  "tpu"   a Cloud TPU: stop when JAX runs on anything else

JAX falls back to the CPU without an error when its GPU or TPU build is missing (a plain
`pip install -e .` gives the CPU build) or cannot reach the device (no driver, a TPU held by
another process). A run that asked for "gpu" or "tpu" then stops with `AcceleratorError` (a
user error: exit status 2) naming what was asked, what JAX found, and the command that
installs the accelerator build (pyproject.toml extras; README "Install on GPU / TPU").

The CLI calls `select_platform` before the distributed start-up (so "cpu" can still narrow
JAX's backends) and `require_platform` after the config is checked.
"""

from __future__ import annotations

import importlib.metadata
from typing import Sequence

import jax
from absl import logging

PLATFORMS = ("auto", "cpu", "gpu", "tpu")

# What `pip install` fixes a missing accelerator build (pyproject.toml extras).
INSTALL = {
    "gpu": '`pip install -e ".[cuda12]"` (CUDA 12 wheels; ".[cuda13]" for CUDA 13, '
           '".[cuda12-local]" with the machine\'s own CUDA, e.g. cluster modules)',
    "tpu": '`pip install -e ".[tpu]"`',
}
# Distributions that bring JAX's accelerator backends (pip names).
PLUGINS = {"gpu": ("jax-cuda12-plugin", "jax-cuda13-plugin", "jax-rocm-plugin"),
           "tpu": ("libtpu",)}
CHECK = '`python -c "import jax; print(jax.devices())"`'


class AcceleratorError(ValueError):
  """The run asked for an accelerator that JAX did not find (exit status 2)."""


def installed_plugins(kind: str) -> list[str]:
  """'name version' of the installed distributions that give JAX the `kind` backend."""
  out = []
  for name in PLUGINS.get(kind, ()):
    try:
      out.append(f"{name} {importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def describe_backend(backend: str, devices: Sequence) -> str:
  """'gpu, 8 devices (NVIDIA H100 80GB HBM3), 1 process; jax 0.10.2' (from the global
  device list)."""
  kinds = sorted({str(getattr(d, "device_kind", "?")) for d in devices})
  processes = len({getattr(d, "process_index", 0) for d in devices}) or 1
  return (f"{backend}, {len(devices)} device{'s' * (len(devices) != 1)} ({', '.join(kinds)}), "
          f"{processes} process{'es' * (processes != 1)}; jax {jax.__version__}")


def check_platform(asked: str, backend: str, devices: Sequence,
                   plugins: Sequence[str] = ()) -> str:
  """The start-up line for a run that asked for `asked` (one of PLATFORMS) and got
  `backend` (`jax.default_backend()`) with `devices`; raises AcceleratorError when an
  accelerator was asked for and JAX runs elsewhere. `plugins`: the installed accelerator
  distributions for `asked` (installed_plugins), which decide the advice."""
  found = describe_backend(backend, devices)
  if asked not in PLATFORMS:
    raise AcceleratorError(f"platform={asked!r}: must be one of {', '.join(PLATFORMS)}")
  if asked in ("auto", backend):
    return f"JAX backend: {found} (platform={asked})"
  name = {"gpu": "a GPU", "tpu": "a TPU", "cpu": "the CPU"}[asked]
  if asked == "cpu":
    advice = "set JAX_PLATFORMS=cpu before the run starts"
  elif plugins:
    advice = (f"{', '.join(plugins)} is installed but found no device: check that this "
              f"machine has one and that no other process holds it ("
              + ("`nvidia-smi`, CUDA_VISIBLE_DEVICES" if asked == "gpu" else
                 "`sudo lsof -w /dev/accel0`") + f"), then {CHECK}")
  else:
    advice = f"install JAX's {asked.upper()} build with {INSTALL[asked]}, then check with {CHECK}"
  raise AcceleratorError(
      f"config.platform={asked!r} asks for {name}, but JAX runs on {found}: {advice} "
      f"(or run with --config.platform=auto to use what JAX finds)")


def select_platform(asked: str) -> None:
  """Before JAX starts: platform 'cpu' restricts JAX to its CPU backend (an accelerator
  present is left alone); other values change nothing."""
  if asked == "cpu":
    jax.config.update("jax_platforms", "cpu")


def require_platform(asked: str) -> str:
  """Checks the running backend against `asked` (check_platform) and logs the start-up line
  on process 0; returns it. Raises AcceleratorError."""
  backend = jax.default_backend()
  line = check_platform(asked, backend, jax.devices(), installed_plugins(asked))
  if jax.process_index() == 0:
    logging.info("%s", line)
    chosen = str(jax.config.jax_platforms or "")     # JAX_PLATFORMS=cpu: the CPU was asked for
    if asked == "auto" and backend == "cpu" and chosen != "cpu":
      for kind in ("gpu", "tpu"):
        for plugin in installed_plugins(kind):
          logging.warning("%s is installed but JAX runs on the CPU (no %s found)", plugin,
                          kind.upper())
  return line
