"""Weights & Biases logging beside TensorBoard: one W&B run per `MetricWriter` (process 0) when
`config.wandb.enabled` (configs/common.py `wandb_config`; README "Weights & Biases").

Optional: wandb is an extra (`pip install -e '.[wandb]'`). Nothing imports it unless a run is
opened with `enabled=True`; `missing()` says whether it is installed without importing it
(run/validate_config.py asks before any work). The run gets the whole config as a flat dict
(`{"train.batch_size": 256, ...}`) plus `stage` and `workdir`, each scalar at its step under
the TensorBoard tag (`<stage>/<name>`), and ends with `finish(exit_code)`: 0 when the writer
closes normally, 1 when it closes on an exception (the run shows as failed).

Offline runs (`mode='offline'` or WANDB_MODE=offline) are written under `<logdir>/wandb/` and
uploaded later with `wandb sync <logdir>/wandb/offline-run-*`.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Mapping

from contextblip_jax.storage import paths

INSTALL = "pip install -e '.[wandb]'"
# config.wandb.mode: '' = what wandb itself picks ($WANDB_MODE, else 'online').
MODES = ("", "online", "offline")


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
  """

  def __init__(self, logdir: str, stage: str, config: Any):
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
    try:
      self.run = wandb.init(**kwargs)
    except Exception as e:  # pylint: disable=broad-except
      raise WandbError(
          f"config.wandb: the W&B run could not start ({type(e).__name__}: {e}). Log in "
          f"(`wandb login` or WANDB_API_KEY), or log offline with --config.wandb.mode=offline "
          f"(WANDB_MODE=offline) and upload later with `wandb sync`, or turn it off with "
          f"--config.wandb.enabled=False") from e

  def log(self, step: int, scalars: Mapping[str, float]) -> None:
    """The scalars at `step` (wandb keeps a step's values together; steps must not go back)."""
    if scalars:
      self.run.log(dict(scalars), step=int(step))

  def finish(self, exit_code: int = 0) -> None:
    """Ends the run (0: finished, otherwise failed)."""
    run, self.run = self.run, None
    if run is not None:
      run.finish(exit_code=exit_code)


def open_run(logdir: str, stage: str, config: Any) -> WandbRun | None:
  """A WandbRun when `config.wandb.enabled`, else None (wandb is not imported)."""
  w = config.get("wandb") if config is not None and hasattr(config, "get") else None
  if not w or not w.get("enabled"):
    return None
  return WandbRun(logdir, stage, config)
