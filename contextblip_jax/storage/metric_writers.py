"""Logging of scalars and progress: TensorBoard event files, `metrics.jsonl`, progress lines,
and a Weights & Biases run when `config.wandb.enabled` (storage/wandb_writer.py).

`MetricWriter` writes on process 0 only (other processes get a writer that does nothing), so
the loops call it unconditionally. Every record in `metrics.jsonl` is one JSON object per line:
`{"step": int, "stage": str, "time": float, <name>: value, ...}`.

`Progress` prints a plain progress line to stderr every `every` updates (and at the end):
`[stage] step 120/400 (30%)  3.10 it/s  ETA 1m30s  loss=1.234`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any, Mapping, TextIO

import jax
import numpy as np

from contextblip_jax.storage import paths, wandb_writer


def _to_float(v: Any) -> float | None:
  try:
    f = float(np.asarray(v))
  except (TypeError, ValueError):
    return None
  return f


class MetricWriter:
  """Scalars to TensorBoard (tensorboardX), `<logdir>/metrics.jsonl` and, with
  `config.wandb.enabled`, a W&B run; process 0 only. Close it (or use it as a context manager:
  an exception ends the W&B run as failed).

  Args:
    logdir: directory of the event files and metrics.jsonl (created).
    stage: a label stored in every JSONL record and used as the TensorBoard prefix.
    enabled: default `jax.process_index() == 0`.
    config: the run's config; its `wandb` block (configs/common.py) turns W&B on, and the W&B
      run records the whole config. None: no W&B.
    resume: the W&B run continues the one whose id `<logdir>/wandb/run_id` keeps, and a new
      run's id is kept there (a training stage, resumed after a crash); False: a new W&B run
      each time (evaluation). See storage/wandb_writer.py.
  """

  def __init__(self, logdir: str, stage: str = "", enabled: bool | None = None,
               config: Any = None, resume: bool = False):
    self.logdir = logdir
    self.stage = stage
    self.enabled = (jax.process_index() == 0) if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    self._wandb = None
    if self.enabled:
      paths.makedirs(logdir, exist_ok=True)
      self._wandb = wandb_writer.open_run(logdir, stage, config, resume)  # first: fails early
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(logdir=paths.join(logdir, "tb"))
        self._jsonl = paths.open(paths.join(logdir, "metrics.jsonl"), "a", encoding="utf-8")
      except BaseException:
        self.close(failed=True)
        raise

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """One JSONL record, and one TensorBoard (and W&B) scalar per finite numeric entry (text and
    non-finite values: JSONL only)."""
    if not self.enabled:
      return
    record: dict[str, Any] = {"step": int(step), "stage": self.stage, "time": time.time()}
    tagged: dict[str, float] = {}                       # TensorBoard's (and W&B's) scalars
    for name, value in scalars.items():
      f = _to_float(value)
      if f is None:
        record[name] = value
        continue
      record[name] = f if math.isfinite(f) else str(f)   # 'nan' / 'inf': strict JSON
      if math.isfinite(f):
        tagged[f"{self.stage}/{name}" if self.stage else name] = f
    for tag, f in tagged.items():
      if self._tb is not None:
        self._tb.add_scalar(tag, f, int(step))
    if self._wandb is not None:
      self._wandb.log(step, tagged)
    self._jsonl.write(json.dumps(record, sort_keys=True) + "\n")
    self._jsonl.flush()

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self, failed: bool = False) -> None:
    """Closes the files and finishes the W&B run (`failed`: exit code 1, shown as failed)."""
    wandb_run, self._wandb = self._wandb, None
    try:
      if self._tb is not None:
        self._tb.close()
        self._tb = None
      if self._jsonl is not None:
        self._jsonl.close()
        self._jsonl = None
    finally:
      if wandb_run is not None:
        wandb_run.finish(exit_code=1 if failed else 0)

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, exc_type, *exc) -> None:
    self.close(failed=exc_type is not None)


def read_metrics(path: str) -> list[dict[str, Any]]:
  """All records of a metrics.jsonl file (a directory holding one is accepted)."""
  if paths.isdir(path):
    path = paths.join(path, "metrics.jsonl")
  with paths.open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def format_duration(seconds: float) -> str:
  """12 -> '12s', 95 -> '1m35s', 3725 -> '1h02m'."""
  if not math.isfinite(seconds):
    return "?"
  s = int(round(seconds))
  if s < 60:
    return f"{s}s"
  if s < 3600:
    return f"{s // 60}m{s % 60:02d}s"
  return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class Progress:
  """Progress lines with rate and ETA (process 0 only).

  Args:
    total: number of updates expected (steps or batches).
    desc: label shown in brackets.
    initial: the count already done (a resumed run starts there; the rate counts only new).
    every: print every this many updates (and on the last one).
    unit: 'it' for steps, or e.g. 'desc' for evaluation.
  """

  def __init__(self, total: int, desc: str = "", initial: int = 0, every: int = 10,
               unit: str = "it", stream: TextIO | None = None, enabled: bool | None = None):
    self.total = int(total)
    self.desc = desc
    self.count = int(initial)
    self._start_count = int(initial)
    self.every = max(1, int(every))
    self.unit = unit
    self.stream = stream or sys.stderr
    self.enabled = (jax.process_index() == 0) if enabled is None else enabled
    self._t0 = time.perf_counter()
    self._first: tuple[float, int] | None = None   # (time, count) at the first update
    self.last_line = ""

  @property
  def rate(self) -> float:
    """Updates per second since the first update (which includes compilation), or overall
    before the second one."""
    now = time.perf_counter()
    if self._first is not None and self.count > self._first[1]:
      t, c = self._first
      return (self.count - c) / (now - t) if now > t else 0.0
    done = self.count - self._start_count
    dt = now - self._t0
    return done / dt if dt > 0 and done > 0 else 0.0

  def eta(self) -> float:
    r = self.rate
    return (self.total - self.count) / r if r > 0 else float("inf")

  def line(self, **postfix: Any) -> str:
    pct = 100.0 * self.count / self.total if self.total else 100.0
    parts = [f"[{self.desc}] {self.count}/{self.total} ({pct:.0f}%)",
             f"{self.rate:.2f} {self.unit}/s",
             f"ETA {format_duration(self.eta())}",
             f"elapsed {format_duration(time.perf_counter() - self._t0)}"]
    for k, v in postfix.items():
      f = _to_float(v)
      parts.append(f"{k}={f:.4g}" if f is not None else f"{k}={v}")
    return "  ".join(parts)

  def update(self, n: int = 1, **postfix: Any) -> None:
    """Advances by `n`; prints a line on every `every`-th update and at the end."""
    before = self.count
    self.count += n
    if self._first is None:
      self._first = (time.perf_counter(), self.count)
    crossed = self.count // self.every != before // self.every
    if self.enabled and (crossed or self.count >= self.total):
      self.last_line = self.line(**postfix)
      print(self.last_line, file=self.stream, flush=True)
