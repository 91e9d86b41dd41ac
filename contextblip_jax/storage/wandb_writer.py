"""Weights & Biases logging beside TensorBoard, from a `MetricWriter` (process 0) when
`config.wandb.enabled` (configs/common.py `wandb_config`; README "Weights & Biases"): one W&B
run per training stage, continued when the stage resumes, and one per evaluation.

Optional: wandb is an extra (`pip install -e '.[wandb]'`). Nothing imports it unless a run is
opened with `enabled=True`; `missing()` says whether it is installed without importing it
(run/validate_config.py asks before any work). The run gets the whole config as a flat dict
(`{"train.batch_size": 256, ...}`) plus `stage` and `workdir`, each scalar at its step under
the TensorBoard tag (`<stage>/<name>`), and ends with `finish(exit_code)`: 0 when the writer
closes normally, 1 when it closes on an exception (the run shows as failed).

One run per training stage: a stage's writer (`resume=True`, run/train.py) keeps its run id in
`<logdir>/wandb/run_id` (written atomically when the run starts; a gs:// logdir keeps it in the
bucket), and a later writer on the same logdir (the stage resumed after a preemption or crash)
continues that run: `wandb.init(id=<id>, resume="allow")`. `train.restart=True` moves `wandb/`
aside with the previous run's files (storage/workdir.py), so the next start gets a new id.
Evaluation writers (`resume=False`) start a new run each time and keep no id.

Steps never go back in a W&B run. Online, a resumed run starts after the run's last step
(`run.starting_step`, set by wandb from the server); the steps between the checkpoint and the crash that the resumed stage
logs again are left out here (wandb would drop each with a warning), so the run keeps the values
the first attempt logged. Offline (`mode='offline'` or WANDB_MODE=offline), wandb 0.31 cannot
ask the server: each attempt writes its own folder `<logdir>/wandb/offline-run-<time>-<id>/`
with the same id (a `-1` suffix when the time is the same), records `resume` in its run record
(`resumed` stays false, `starting_step` 0) and holds every step it logged, repeated steps
included. `wandb sync <logdir>/wandb/offline-run-*` uploads them all to the one run id (a step
in two folders is uploaded twice; what the server keeps for it is not checked offline).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from typing import Any, Mapping

from contextblip_jax.storage import atomic, paths

INSTALL = "pip install -e '.[wandb]'"
# config.wandb.mode: '' = what wandb itself picks ($WANDB_MODE, else 'online').
MODES = ("", "online", "offline")
# <logdir>/wandb/run_id: the id of the logdir's (training stage's) W&B run, one line.
RUN_ID = "run_id"
_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


class WandbError(ValueError):
  """config.wandb.enabled=True, but a W&B run cannot be opened (wandb not installed, not
  logged in, ...); the message says what to do."""


def missing() -> str | None:
  """None when wandb is installed (found without importing it), else the error message."""
  if importlib.util.find_spec("wandb") is not None:
    return None
  return (f"config.wandb.enabled=True but the wandb package is not installed: {INSTALL} "
          f"(or rerun with --config.wandb.enabled=False)")


def flat_config(config: Any, prefix: str = "") -> dict[str, Any]:
  """A (nested) config or mapping -> {"a.b.c": leaf}; ConfigDicts are read through to_dict()."""
  tree = config.to_dict() if hasattr(config, "to_dict") else config
  out: dict[str, Any] = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flat_config(value, name + "."))
    else:
      out[name] = list(value) if isinstance(value, tuple) else value
  return out


def run_id_path(logdir: str) -> str:
  """<logdir>/wandb/run_id."""
  return paths.join(logdir, "wandb", RUN_ID)


def read_run_id(logdir: str) -> str | None:
  """The W&B run id kept in `logdir` (None when there is none); a file that does not hold one id
  raises WandbError naming it."""
  path = run_id_path(logdir)
  if not paths.isfile(path):
    return None
  with paths.open(path, encoding="utf-8") as f:
    run_id = f.read().strip()
  if not _ID.fullmatch(run_id):
    raise WandbError(f"{path}: expected one W&B run id (letters, digits, '_', '-'), found "
                     f"{run_id[:60]!r}; remove the file to start a new W&B run")
  return run_id


def write_run_id(logdir: str, run_id: str) -> None:
  """Keeps `run_id` in <logdir>/wandb/run_id (atomic; local or gs://)."""
  with atomic.atomic_file(run_id_path(logdir)) as f:
    f.write(run_id + "\n")


def default_name(logdir: str, stage: str) -> str:
  """'<stage>-<workdir name>'; a workdir named after its stage (the demo's <demo>/pretrain)
  takes its parent's name: 'pretrain-demo'."""
  path = logdir.rstrip("/")
  label = os.path.basename(path)
  if label == stage:
    label = os.path.basename(os.path.dirname(path)) or label
  return f"{stage}-{label}" if stage else label


class WandbRun:
  """An open W&B run (process 0 only; `MetricWriter` makes one when config.wandb.enabled).

  Args:
    logdir: the writer's directory; a local one holds the run's files (`<logdir>/wandb/`),
      a gs:// one leaves them where wandb puts them by default ($WANDB_DIR, else ./wandb).
    stage: the run's stage (config value `stage`, job type, default name).
    config: the whole run config (logged flat); its `wandb` block configures the run.
    resume: continue the run whose id <logdir>/wandb/run_id holds, and keep the id of a new
      run there (a training stage); False: a new run, no id kept (an evaluation).
  """

  def __init__(self, logdir: str, stage: str, config: Any, resume: bool = False):
    w = config.wandb
    try:
      import wandb  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise WandbError(missing() or f"config.wandb.enabled=True: importing wandb failed: {e}"
                       ) from e
    kwargs: dict[str, Any] = dict(
        project=w.project or None, entity=w.entity or None,
        name=w.name or default_name(logdir, stage), tags=list(w.tags) or None,
        job_type=stage or None,
        dir=None if paths.is_remote(logdir) else paths.abspath(logdir),
        config={**flat_config(config), "stage": stage, "workdir": logdir})
    if w.mode:
      kwargs["mode"] = w.mode
    run_id = read_run_id(logdir) if resume else None
    if run_id:
      kwargs.update(id=run_id, resume="allow")
    try:
      self.run = wandb.init(**kwargs)
    except Exception as e:  # pylint: disable=broad-except
      raise WandbError(
          f"config.wandb: the W&B run could not start ({type(e).__name__}: {e}). Log in "
          f"(`wandb login` or WANDB_API_KEY), or log offline with --config.wandb.mode=offline "
          f"(WANDB_MODE=offline) and upload later with `wandb sync`, or turn it off with "
          f"--config.wandb.enabled=False") from e
    self.skipped = 0              # steps below a resumed run's starting step, left out
    if run_id:
      logging.info("W&B run %s resumed (its id is kept in %s)", run_id, run_id_path(logdir))
    elif resume:
      try:
        write_run_id(logdir, self.run.id)
      except BaseException:
        self.finish(exit_code=1)
        raise

  def log(self, step: int, scalars: Mapping[str, float]) -> None:
    """The scalars at `step` (wandb keeps a step's values together; steps must not go back:
    a step below the run's starting step, one a resumed stage logs again, is left out)."""
    if not scalars:
      return
    if step < self.run.starting_step:
      if not self.skipped:
        logging.info("W&B run %s continues at step %d: steps below it, logged before the "
                     "resume, are not sent again", self.run.id, self.run.starting_step)
      self.skipped += 1
      return
    self.run.log(dict(scalars), step=int(step))

  def finish(self, exit_code: int = 0) -> None:
    """Ends the run (0: finished, otherwise failed)."""
    run, self.run = self.run, None
    if run is not None:
      run.finish(exit_code=exit_code)


def open_run(logdir: str, stage: str, config: Any, resume: bool = False) -> WandbRun | None:
  """A WandbRun when `config.wandb.enabled`, else None (wandb is not imported)."""
  w = config.get("wandb") if config is not None and hasattr(config, "get") else None
  if not w or not w.get("enabled"):
    return None
  return WandbRun(logdir, stage, config, resume=resume)
