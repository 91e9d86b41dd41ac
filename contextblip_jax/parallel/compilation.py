"""XLA compile options and ahead-of-time compilation with a cost report.

  FAST_COMPILE                 options for programs that run once (initialisation)
  compiler_options(cfg)        options of a run's train / eval / scoring steps
                               (`config.compile_fast`: ~2x faster compiles, ~2x slower steps)
  compile_step(jitted, *args)  `.lower(*args).compile()` (args may be ShapeDtypeStructs), with
                               the time, FLOPs and memory logged once
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax

FAST_COMPILE = {"xla_backend_optimization_level": 0}

_log = logging.getLogger(__name__)


def compiler_options(cfg: Any) -> dict | None:
  """XLA options of a run's steps: FAST_COMPILE when `config.compile_fast`, else defaults."""
  return dict(FAST_COMPILE) if cfg.get("compile_fast", False) else None


def compile_report(compiled: Any) -> dict[str, float]:
  """FLOPs (cost_analysis; per device for a partitioned program) and memory_analysis bytes."""
  report: dict[str, float] = {}
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  if cost:
    report["flops"] = float(cost.get("flops", float("nan")))
    report["bytes_accessed"] = float(cost.get("bytes accessed", float("nan")))
  mem = compiled.memory_analysis()
  if mem is not None:
    for field in ("argument", "output", "temp", "alias", "generated_code"):
      report[f"{field}_bytes"] = float(getattr(mem, f"{field}_size_in_bytes", float("nan")))
  return report


def compile_step(jitted: Any, *args: Any, mesh: jax.sharding.Mesh | None = None,
                 name: str = "step") -> tuple[Any, dict[str, float]]:
  """Ahead-of-time `.lower(*args).compile()` (args may be ShapeDtypeStructs); logs and
  returns the report (compile_s, flops, argument/output/temp/alias bytes)."""
  t0 = time.perf_counter()
  if mesh is not None:
    with jax.set_mesh(mesh):
      compiled = jitted.lower(*args).compile()
  else:
    compiled = jitted.lower(*args).compile()
  report = {"compile_s": time.perf_counter() - t0, **compile_report(compiled)}
  _log.info("%s compiled in %.1f s: %.3g FLOPs/step, argument %.1f MiB, output %.1f MiB, "
            "temp %.1f MiB", name, report["compile_s"], report.get("flops", float("nan")),
            report.get("argument_bytes", 0) / 2**20, report.get("output_bytes", 0) / 2**20,
            report.get("temp_bytes", 0) / 2**20)
  return compiled, report
