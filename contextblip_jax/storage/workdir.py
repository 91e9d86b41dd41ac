"""What a stage's workdir holds, and how the next stage reads it.

  <workdir>/config.json     the run's config (rewritten on every run; earlier ones kept as
                            config.<time>.json when they differ)
  <workdir>/ckpt/<step>/    Orbax checkpoints of the train state + Grain iterator (resume)
  <workdir>/export/         the stage's result (best valid epoch when train.select_best): a
                            parameter directory (storage/param_dir.py: params/, model.json,
                            vocab.txt, provenance.json {stage, step, valid_acc, init, time})
  <workdir>/DONE.json       written last: the stage finished; a rerun reuses it
  <workdir>/metrics.jsonl, tb/   metrics (process 0)
  <workdir>/eval/           predictions JSONL, reports, leaderboard, PNGs

A converted BLIP checkpoint (weight_convert) is the same format as export/, and
`load_param_dir` reads either, or a stage workdir (its export/).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from contextblip_jax.storage import param_dir
from contextblip_jax.storage.atomic import atomic_file
from contextblip_jax.models.contextblip import ContextBlipConfig

CKPT, DONE, EVAL = "ckpt", "DONE.json", "eval"
EXPORT = param_dir.EXPORT

# ------------------------------------------------------------------ export / done markers

def export_params(workdir: str, params: Any, stage: str, model: ContextBlipConfig, *,
                  vocab_path: str, init: str = "", **meta: Any) -> str:
  """Writes <workdir>/export (storage/param_dir.py format) with the stage's provenance
  {writer "train", stage, init (the path the stage started from, its provenance), **meta
  (step, valid_acc)} and the vocabulary at `vocab_path`; replaces an earlier export; returns
  its path."""
  if model.use_adapter and param_dir.ADAPTER not in params:
    model = model.replace(use_adapter=False)   # model.json describes the tree (backbone stage)
  init_record = None
  if init:
    init_record = {"path": os.path.abspath(init), "provenance": param_dir.read_provenance(init)}
  provenance = {"writer": "train", "stage": stage, "init": init_record, **meta}
  return param_dir.write_param_dir(os.path.join(workdir, EXPORT), params, model, provenance,
                                   vocab_path=vocab_path, overwrite=True)


def read_done(workdir: str) -> dict[str, Any] | None:
  path = os.path.join(workdir, DONE)
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def write_done(workdir: str, summary: dict[str, Any]) -> None:
  if jax.process_index() != 0:
    return
  with atomic_file(os.path.join(workdir, DONE)) as f:
    json.dump(summary, f, indent=1, sort_keys=True, default=_json_default)


def _json_default(x):
  if isinstance(x, (np.generic, np.ndarray)):
    return x.tolist()
  return str(x)


def write_config(workdir: str, cfg: ml_collections.ConfigDict) -> None:
  """<workdir>/config.json; a different earlier config is kept as config.<time>.json."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  text = cfg.to_json_best_effort(indent=1, sort_keys=True)
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      old = f.read()
    if old != text:
      logging.warning("%s: the config differs from the previous run's (kept as "
                      "config.<time>.json)", workdir)
      os.replace(path, os.path.join(workdir, f"config.{int(time.time())}.json"))
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
