"""Command line of every stage:

  python -m contextblip_jax.main --config configs/<file>.py[:args] --workdir DIR [--config.x=v]

`config.mode` selects what runs: backbone | pretrain | finetune1 | finetune2 (one training
stage, run/train.py), evaluate | predict (run/evaluate.py), demo (the whole method on the
embedded synthetic default, run/demo.py). A rerun in the same workdir resumes from the latest checkpoint, or reuses a
finished stage.

Exit statuses (README, "Safety and errors"):
  0   finished (or a finished stage reused)
  1   an error: a diverged run (non-finite loss), checkpoints that cannot be restored, or an
      unexpected failure (with its traceback)
  2   a user error: a bad config (every bad key named), bad data, a bad path, a workdir
      refused or in use; one line `error: ...`, the traceback only with --verbose or
      CONTEXTBLIP_VERBOSE=1
  75  preempted (SIGTERM): the current step was saved; rerun the same command to resume
      (EX_TEMPFAIL: schedulers may requeue)
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from contextblip_jax.parallel import accelerator, distributed
from contextblip_jax.storage import checkpoints, cli_errors, paths

EXIT_ERROR, EXIT_USAGE, EXIT_PREEMPTED = 1, cli_errors.EXIT_USAGE, 75

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:args]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, outputs.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "On an error print the full traceback (also "
                             "CONTEXTBLIP_VERBOSE=1).")
distributed.define_flags()
flags.mark_flags_as_required(["config", "workdir"])


def verbose() -> bool:
  """--verbose or CONTEXTBLIP_VERBOSE=1 (a non-empty value other than 0)."""
  return cli_errors.verbose_requested(_VERBOSE.value if flags.FLAGS.is_parsed() else False)


def _errors():
  """(user errors -> status 2, known run errors -> status 1 without a traceback)."""
  from contextblip_jax.data.preprocess import ImageLoadError  # pylint: disable=g-import-not-at-top
  from contextblip_jax.run.train import TrainingDivergedError  # pylint: disable=g-import-not-at-top
  from contextblip_jax.storage.lock import WorkdirBusyError  # pylint: disable=g-import-not-at-top
  user = (ValueError, OSError, ImageLoadError, WorkdirBusyError)
  return user, (TrainingDivergedError, checkpoints.CheckpointRestoreError)


class _QuietLibraries:
  """Logging filter: drops INFO records of Orbax / Grain / the backend probe (warnings and
  errors pass), so the log shows the run's own progress."""
  NOISY = ("/orbax/", "/grain/", "xla_bridge.py")

  def filter(self, record) -> bool:
    return record.levelno >= 30 or not any(n in record.pathname for n in self.NOISY)


def use_compilation_cache(path: str) -> None:
  """Persistent XLA compilation cache in `path` ('' = leave it off): every program the run
  compiles is written there, and a later run of the same programs (same JAX version, devices,
  shapes and options) loads them instead of compiling. On by default: `config.compilation_cache`
  defaults to a per-user directory (configs/common.py `default_compilation_cache`)."""
  if not path:
    return
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental.compilation_cache import compilation_cache as cc  # pylint: disable=g-import-not-at-top
  path = paths.abspath(path)      # local: expanduser + abspath; gs:// URLs unchanged
  previous = jax.config.jax_compilation_cache_dir
  if previous != path:
    cc.set_cache_dir(path)
    if previous:               # a cache opened earlier in this process reads the new directory
      cc.reset_cache()
  # Every executable, however quick to compile: a second evaluation then compiles nothing.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def run(config, workdir: str) -> dict:
  """Dispatches on config.mode; returns the mode's summary dict."""
  use_compilation_cache(config.get("compilation_cache", ""))
  paths.makedirs(workdir, exist_ok=True)    # a gs:// workdir: nothing to create
  mode = config.mode
  if mode == "demo":
    from contextblip_jax.run import demo  # pylint: disable=g-import-not-at-top
    return demo.run(config, workdir)
  if mode in ("evaluate", "predict"):
    from contextblip_jax.run import evaluate  # pylint: disable=g-import-not-at-top
    return evaluate.run(config, workdir)
  from contextblip_jax.run import train  # pylint: disable=g-import-not-at-top
  return train.train_and_evaluate(config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  accelerator.select_platform(_CONFIG.value.get("platform", "auto"))
  distributed.initialize_distributed(distributed.settings_from_flags())
  distributed.quiet_non_main_processes()
  handler = logging.get_absl_handler()
  handler.python_handler.stream = sys.stderr
  handler.addFilter(_QuietLibraries())
  checkpoints.silence_shutdown_noise()
  user, known = _errors()
  try:
    from contextblip_jax.run import validate_config  # pylint: disable=g-import-not-at-top
    validate_config.validate(_CONFIG.value)
    accelerator.require_platform(_CONFIG.value.get("platform", "auto"))
    summary = run(_CONFIG.value, _WORKDIR.value)
  except user + known as e:
    sys.exit(cli_errors.report(
        e, verbose(), hint="\n(the traceback: rerun with --verbose or CONTEXTBLIP_VERBOSE=1)",
        status=EXIT_ERROR if isinstance(e, known) else EXIT_USAGE))
  if distributed.is_main_process():
    logging.info("summary: %s", json.dumps(summary, default=str)[:2000])
  if summary.get("preempted"):
    sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
  app.run(main)
