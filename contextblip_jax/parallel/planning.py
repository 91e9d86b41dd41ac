"""Planning a run for a device topology ahead of time: chip specifications, abstract devices
of a TPU topology (without a TPU), the collectives of a compiled program and a roofline
estimate of its step time.

The command that uses this is `python -m contextblip_jax.aot` (run/plan.py); launch/README.md
("Planning for a TPU slice") explains the numbers.

Chip figures are the vendors' published per-chip numbers (dense bfloat16 peak, HBM size and
bandwidth) and the host machine types of each TPU generation; the `source` of each entry is
the page they come from. A roofline estimate is max(FLOPs / peak, bytes / bandwidth) per chip:
a lower bound on the step time that ignores collectives, launch overheads and the input
pipeline, so read it as "at best".
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import jax
import numpy as np

GIB = 2.0**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip and the host machine that carries it."""
  name: str
  bf16_tflops: float          # dense bfloat16 peak per chip
  hbm_gib: float              # memory per chip
  hbm_gbps: float             # memory bandwidth per chip, GB/s
  chips_per_host: int         # chips per host VM in multi-host slices
  host_vcpus: int             # vCPUs of that host VM
  source: str


CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 275, 32, 1200, 4, 240, "https://cloud.google.com/tpu/docs/v4"),
    # v5e: 8 chips per host VM (ct5lp-hightpu-8t, 224 vCPUs); a 4x4 slice is 2 hosts.
    "v5e": Chip("TPU v5e", 197, 16, 819, 8, 224,
                "https://cloud.google.com/tpu/docs/v5e (chip table, slice shapes, VM types)"),
    "v5p": Chip("TPU v5p", 459, 95, 2765, 4, 208, "https://cloud.google.com/tpu/docs/v5p"),
    # v6e: 8 chips per host (the page's chip table). The vCPUs of the 8-chip VM
    # (ct6e-standard-8t, 180) are not in that table: check them with
    # `gcloud compute machine-types describe ct6e-standard-8t --zone ZONE`.
    "v6e": Chip("TPU v6e (Trillium)", 918, 32, 1640, 8, 180,
                "https://cloud.google.com/tpu/docs/v6e (chip table)"),
    "h100": Chip("NVIDIA H100 SXM", 989, 80, 3350, 8, 208,
                 "https://www.nvidia.com/en-us/data-center/h100/ (a3-highgpu-8g host)"),
    "h200": Chip("NVIDIA H200 SXM", 989, 141, 4800, 8, 224,
                 "https://www.nvidia.com/en-us/data-center/h200/ (a3-ultragpu-8g host)"),
}

# Collective ops of compiled (post-optimisation) HLO text.
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8}
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|c64)\[([\d,]*)\]")


class PlanError(ValueError):
  """A topology or plan the planner cannot make (unknown chip, libtpu missing, ...)."""


def chip_of_topology(topology: str) -> Chip | None:
  """'v5e:4x4' -> CHIPS['v5e']; None for 'cpu:N'."""
  kind = topology.split(":", 1)[0].lower()
  if kind == "cpu":
    return None
  if kind not in CHIPS:
    raise PlanError(f"unknown chip {kind!r} in topology {topology!r}; known: "
                    f"{', '.join(sorted(CHIPS))} or cpu:N")
  return CHIPS[kind]


def topology_chips(topology: str) -> int:
  """Chips in one slice of `topology`: 'v5e:4x4' -> 16, 'v5p:2x2x1' -> 4, 'cpu:8' -> 8."""
  _, _, shape = topology.partition(":")
  try:
    return int(np.prod([int(x) for x in shape.split("x")])) if shape else 1
  except ValueError as e:
    raise PlanError(f"bad topology {topology!r}: expected a chip and a shape such as v5e:4x4, "
                    f"v5p:2x2x1, v6e:2x4 or cpu:8") from e


def topology_devices(topology: str, num_slices: int = 1, platform: str = "tpu") -> list[Any]:
  """The devices of `topology` ('v5e:4x4', 'v5p:2x2x1', 'v6e:2x4', ... or 'cpu:N').

  TPU topologies come from libtpu without a TPU (abstract devices: programs compile for them
  but cannot run); 'cpu:N', or any topology with platform 'cpu', takes as many devices of the
  CPU backend as the topology has chips (start the process with
  XLA_FLAGS=--xla_force_host_platform_device_count=N, as `python -m contextblip_jax.aot` does).
  """
  chip_of_topology(topology)
  if platform == "cpu" or topology.lower().startswith("cpu"):
    if num_slices != 1:
      raise PlanError(f"--num_slices {num_slices} needs --platform tpu (host CPU devices carry "
                      f"no slice index for the ICI x DCN mesh)")
    n = topology_chips(topology)
    devs = jax.devices("cpu")
    if len(devs) < n:
      raise PlanError(f"topology {topology!r} needs {n} CPU devices, this process has "
                      f"{len(devs)} (set XLA_FLAGS=--xla_force_host_platform_device_count={n} "
                      f"before JAX starts; `python -m contextblip_jax.aot` does)")
    return list(devs[:n])
  topology_chips(topology)
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")         # no TPU VM metadata server here
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no TPU to guard: skip the lockfile
  try:
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    desc = topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                        num_slices=num_slices)
  except Exception as e:  # libtpu missing or an unknown shape: one clear message
    raise PlanError(
        f"cannot describe TPU topology {topology!r} ({num_slices} slice(s)): "
        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}. Compiling for a TPU "
        f"without one needs libtpu: `pip install 'libtpu==0.0.42.*'` (the version "
        f"jax[tpu]==0.10.2 pins; it is in requirements-dev.txt); topology names look like v5e:4x4, "
        f"v5p:2x2x1, v6e:2x4; or plan on host CPU devices with --platform cpu") from e
  return list(desc.devices)


def collectives(hlo_text: str) -> dict[str, dict[str, float]]:
  """{kind: {"count", "bytes"}} of the collective ops in compiled HLO text; bytes are the
  sizes of each op's result (per device), summed."""
  out: dict[str, dict[str, float]] = {}
  for line in hlo_text.splitlines():
    line = line.strip()
    if "=" not in line:
      continue
    lhs, rhs = line.split("=", 1)
    rhs = rhs.strip()
    # `shape op(operands)`; a shape may be a tuple whose TPU layouts hold parentheses
    # (`{1,0:T(8,128)}`), so the op is the first lower-case word after a space that opens one.
    m = re.search(r"\s([a-z][a-z\-]*?)(-start)?\(", " " + rhs)
    if not m:
      continue
    op = m.group(1)
    if op not in _COLLECTIVES:
      continue
    nbytes = 0
    for dt, dims in _SHAPE.findall(rhs[:m.start()]):
      n = int(np.prod([int(x) for x in dims.split(",") if x])) if dims else 1
      nbytes += n * _DTYPE_BYTES.get(dt, 4)
    e = out.setdefault(op, {"count": 0, "bytes": 0.0})
    e["count"] += 1
    e["bytes"] += nbytes
  return out


def hosts(chip: Chip | None, chips: int) -> int:
  """Host VMs of a slice: `chips_per_host` chips each, one for a smaller slice (v5e:4x4 -> 2,
  v5p:2x2x2 -> 2, v6e:2x2 -> 1)."""
  if chip is None:
    return 1
  return max(1, -(-chips // chip.chips_per_host))


def host_vms(chip: Chip | None, chips: int, num_slices: int = 1) -> tuple[int, float]:
  """(host VMs of `num_slices` slices of `chips` chips in all, vCPUs of each): a slice smaller
  than one host VM gets that share of its vCPUs (v5e:2x2 -> 112 of a 224-vCPU host)."""
  per_slice = chips // num_slices
  if chip is None:
    return num_slices, float("nan")
  return (hosts(chip, per_slice) * num_slices,
          chip.host_vcpus * min(1.0, per_slice / chip.chips_per_host))


def roofline_s(flops: float, bytes_accessed: float, chip: Chip | None) -> float | None:
  """max(FLOPs / peak, bytes / bandwidth) per chip in seconds (None without a chip)."""
  if chip is None or not flops or flops != flops:
    return None
  compute = flops / (chip.bf16_tflops * 1e12)
  if not bytes_accessed or bytes_accessed != bytes_accessed:
    return compute
  return max(compute, bytes_accessed / (chip.hbm_gbps * 1e9))


def fits(report: dict[str, float], chip: Chip | None) -> bool | None:
  """Whether arguments + outputs + temporaries (less donated aliases) fit the chip's HBM."""
  if chip is None:
    return None
  return per_chip_bytes(report) <= chip.hbm_gib * GIB


def per_chip_bytes(report: dict[str, float]) -> float:
  return (report.get("argument_bytes", 0.0) + report.get("output_bytes", 0.0)
          + report.get("temp_bytes", 0.0) - report.get("alias_bytes", 0.0))
