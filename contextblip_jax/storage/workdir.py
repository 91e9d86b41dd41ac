"""What a stage's workdir holds, and how the next stage reads it.

  <workdir>/config.json     the run's config (rewritten on every run; earlier ones kept as
                            config.<time>.json when they differ)
  <workdir>/ckpt/<step>/    Orbax checkpoints of the train state + Grain iterator (resume)
  <workdir>/export/         the stage's result (best valid epoch when train.select_best): a
                            parameter directory (storage/param_dir.py: params/, model.json,
                            vocab.txt, provenance.json {stage, step, valid_acc, init, time})
  <workdir>/DONE.json       written last: the stage finished; a rerun reuses it
  <workdir>/metrics.jsonl, tb/   metrics (process 0)
  <workdir>/wandb/          the W&B run's local files (config.wandb.enabled; process 0)
  <workdir>/eval/           predictions JSONL, reports, leaderboard, PNGs
  <workdir>/LOCK            held while a run uses the workdir (storage/lock.py)
  <workdir>/built_from.json what the stage was built from (the demo's fingerprints)
  <workdir>/ckpt_corrupt/   checkpoint steps that could not be restored, moved aside
  <workdir>/restarted.<time>/   a previous run's files, moved by `train.restart=True`

A converted BLIP checkpoint (weight_convert) is the same format as export/, and
`load_param_dir` reads either, or a stage workdir (its export/).

Safety (`check_workdir`, `previous_run`, `move_previous_run`): a run refuses a directory that
is a parameter directory, a Hugging Face export, a workdir of another mode, or any non-empty
directory holding other entries than the ones above (what marks a workdir is its config.json,
written by `write_config` with a `mode`); and it never starts from scratch silently where a
previous run left metrics, checkpoints (temporary ones included) or an export: it resumes, or
stops saying what it found, unless `train.restart=True` moves those files aside.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import jax
import ml_collections

from contextblip_jax.storage import param_dir, paths
from contextblip_jax.storage.atomic import atomic_file, json_default
from contextblip_jax.models.contextblip import ContextBlipConfig

CKPT, DONE, EVAL = "ckpt", "DONE.json", "eval"
EXPORT = param_dir.EXPORT
CONFIG, BUILT_FROM, CKPT_CORRUPT = "config.json", "built_from.json", "ckpt_corrupt"
HF_EXPORT_MARKER = "contextblip_jax_export.json"   # written by `weight_convert export`
# Entries a stage workdir may hold (plus config.<time>.json, restarted.<time>/ and the
# temporary siblings of export/ and DONE.json).
STAGE_ENTRIES = (CONFIG, CKPT, CKPT_CORRUPT, EXPORT, DONE, EVAL, "metrics.jsonl", "tb", "LOCK",
                 BUILT_FROM, DONE + ".tmp", "wandb")
# What a previous run leaves (train.restart=True moves these aside).
RUN_ENTRIES = (CKPT, CKPT_CORRUPT, EXPORT, DONE, EVAL, "metrics.jsonl", "tb", BUILT_FROM,
               "wandb")


class WorkdirError(ValueError):
  """A workdir that a run must not write into, or a previous run it must not overwrite."""


# ------------------------------------------------------------------ what a directory is

def _is_known_entry(name: str, extra: tuple[str, ...]) -> bool:
  temporaries = tuple(f".{e}.{kind}-" for e in (EXPORT,) + extra for kind in ("tmp", "old"))
  return (name in STAGE_ENTRIES or name in extra
          or (name.startswith("config.") and name.endswith(".json"))
          or name.startswith(("restarted.",) + temporaries))


def check_workdir(workdir: str, mode: str, extra_entries: tuple[str, ...] = ()) -> None:
  """Raises WorkdirError when `workdir` must not be used as the workdir of a `mode` run.

  Refused: a parameter directory (provenance.json, params/ + model.json, a legacy converter
  directory), a Hugging Face export (its marker, or config.json + weights), a workdir whose
  config.json names another mode, and any non-empty directory holding other entries than a
  workdir's (STAGE_ENTRIES + `extra_entries`). A missing or empty directory is fine, and so
  is one holding only a workdir's entries (e.g. a run killed before it wrote config.json).
  """
  workdir = paths.abspath(workdir)
  if not paths.exists(workdir):
    return
  if not paths.isdir(workdir):
    raise WorkdirError(f"--workdir {workdir} is a file, not a directory")
  names = set(paths.listdir(workdir))
  if not names:
    return
  how = "choose a new (or empty) --workdir"
  if param_dir.is_parameter_directory(workdir):
    raise WorkdirError(f"--workdir {workdir} is a parameter directory (converted weights or a "
                       f"stage export); a run would overwrite it: {how} and pass this one as "
                       f"config.init_checkpoint / config.eval.checkpoint")
  if HF_EXPORT_MARKER in names or (CONFIG in names and names & {
      "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"}):
    raise WorkdirError(f"--workdir {workdir} is a Hugging Face model directory; {how}")
  if CONFIG in names:
    old_mode = _config_mode(paths.join(workdir, CONFIG))
    if old_mode is None:
      raise WorkdirError(f"--workdir {workdir} holds a config.json that is not a run "
                         f"config (no 'mode'); it is not a workdir: {how}")
    if old_mode != mode:
      raise WorkdirError(f"--workdir {workdir} is the workdir of a {old_mode!r} run, not "
                         f"{mode!r}; {how}")
  unknown = sorted(n for n in names if not _is_known_entry(n, extra_entries))
  if unknown:
    shown = ", ".join(unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
    raise WorkdirError(f"--workdir {workdir} is not empty and not a workdir (it holds "
                       f"{shown}): {how}")


def _config_mode(path: str) -> str | None:
  try:
    with paths.open(path, encoding="utf-8") as f:
      mode = json.load(f).get("mode")
  except (OSError, ValueError, AttributeError):
    return None
  return mode if isinstance(mode, str) else None


def previous_run(workdir: str) -> list[str]:
  """What a previous run left in `workdir` (besides config.json): metrics, TensorBoard files,
  checkpoint steps (temporary ones included), an export; [] when none."""
  found = []
  metrics = paths.join(workdir, "metrics.jsonl")
  if paths.isfile(metrics) and paths.getsize(metrics) > 0:
    found.append("metrics.jsonl")
  for name in ("tb", CKPT, CKPT_CORRUPT):
    d = paths.join(workdir, name)
    if paths.isdir(d) and paths.listdir(d):
      found.append(f"{name}/ ({', '.join(sorted(paths.listdir(d))[:4])})")
  if paths.isdir(paths.join(workdir, EXPORT)):
    found.append(f"{EXPORT}/")
  return found


def move_previous_run(workdir: str) -> str | None:
  """Moves a previous run's files (RUN_ENTRIES) into <workdir>/restarted.<time>/ (nothing is
  deleted); returns that directory, or None when there was nothing to move."""
  present = [n for n in RUN_ENTRIES if paths.exists(paths.join(workdir, n))]
  if not present or jax.process_index() != 0:
    return None
  dest = paths.join(workdir, f"restarted.{time.strftime('%Y%m%d-%H%M%S')}")
  n = 0
  while paths.exists(dest + (f".{n}" if n else "")):
    n += 1
  dest += f".{n}" if n else ""
  paths.makedirs(dest)
  for name in present:
    paths.rename(paths.join(workdir, name), paths.join(dest, name))
  logging.warning("%s: train.restart=True: moved the previous run's %s to %s", workdir,
                  ", ".join(present), dest)
  return dest


def read_built_from(workdir: str) -> dict[str, Any] | None:
  """<workdir>/built_from.json (what the stage was built from), or None."""
  path = paths.join(workdir, BUILT_FROM)
  if not paths.isfile(path):
    return None
  try:
    with paths.open(path, encoding="utf-8") as f:
      return json.load(f)
  except ValueError:
    return None


def write_built_from(workdir: str, record: dict[str, Any]) -> None:
  if jax.process_index() != 0:
    return
  paths.makedirs(workdir, exist_ok=True)
  with atomic_file(paths.join(workdir, BUILT_FROM)) as f:
    json.dump(record, f, indent=1, sort_keys=True, default=json_default)

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
    init_record = {"path": paths.abspath(init), "provenance": param_dir.read_provenance(init)}
  provenance = {"writer": "train", "stage": stage, "init": init_record, **meta}
  return param_dir.write_param_dir(paths.join(workdir, EXPORT), params, model, provenance,
                                   vocab_path=vocab_path, overwrite=True)


def read_done(workdir: str) -> dict[str, Any] | None:
  path = paths.join(workdir, DONE)
  if not paths.isfile(path):
    return None
  with paths.open(path, encoding="utf-8") as f:
    return json.load(f)


def write_done(workdir: str, summary: dict[str, Any]) -> None:
  if jax.process_index() != 0:
    return
  with atomic_file(paths.join(workdir, DONE)) as f:
    json.dump(summary, f, indent=1, sort_keys=True, default=json_default)


def write_config(workdir: str, cfg: ml_collections.ConfigDict) -> None:
  """<workdir>/config.json; a different earlier config is kept as config.<time>.json."""
  if jax.process_index() != 0:
    return
  paths.makedirs(workdir, exist_ok=True)
  path = paths.join(workdir, CONFIG)
  text = cfg.to_json_best_effort(indent=1, sort_keys=True)
  if paths.isfile(path):
    with paths.open(path, encoding="utf-8") as f:
      old = f.read()
    if old != text:
      logging.warning("%s: the config differs from the previous run's (kept as "
                      "config.<time>.json)", workdir)
      paths.rename(path, paths.join(workdir, f"config.{int(time.time())}.json"))
  with atomic_file(path) as f:                  # a crash leaves the old file or none
    f.write(text)
