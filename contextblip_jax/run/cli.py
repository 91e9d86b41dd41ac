"""Command line of every stage:

  python -m contextblip_jax.main --config configs/<file>.py[:args] --workdir DIR [--config.x=v]

`config.mode` selects what runs: backbone | pretrain | finetune1 | finetune2 (one training
stage, run/train.py), evaluate | predict (run/evaluate.py), demo (the whole method on the
embedded synthetic default, run/demo.py). A rerun in the same workdir resumes from the latest checkpoint, or reuses a
finished stage.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from contextblip_jax.parallel import distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:args]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, outputs.")
distributed.define_flags()
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries:
  """Logging filter: drops INFO records of Orbax / Grain / the backend probe (warnings and
  errors pass), so the log shows the run's own progress."""
  NOISY = ("/orbax/", "/grain/", "xla_bridge.py")

  def filter(self, record) -> bool:
    return record.levelno >= 30 or not any(n in record.pathname for n in self.NOISY)


def run(config, workdir: str) -> dict:
  """Dispatches on config.mode; returns the mode's summary dict."""
  import jax  # pylint: disable=g-import-not-at-top
  if config.get("compilation_cache"):
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(config.compilation_cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  os.makedirs(workdir, exist_ok=True)
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
  distributed.initialize_distributed(distributed.settings_from_flags())
  distributed.quiet_non_main_processes()
  handler = logging.get_absl_handler()
  handler.python_handler.stream = sys.stderr
  handler.addFilter(_QuietLibraries())
  summary = run(_CONFIG.value, _WORKDIR.value)
  if distributed.is_main_process():
    logging.info("summary: %s", json.dumps(summary, default=str)[:2000])


if __name__ == "__main__":
  app.run(main)
