"""The one on-disk parameter format: what the converter writes, what a training stage exports,
and what every command that starts from parameters reads (`load_param_dir`).

Layout of a parameter directory DIR:
  params/           Orbax (StandardCheckpointer) parameter tree, top-level groups as in
                    `models/contextblip.py`: pretrained_blip, [vision_adapter], [TMIM groups],
                    [prediction_layer], [context_encoder]
  model.json        ContextBlipConfig.to_dict(): the architecture (BLIP sizes; the vision
                    adapter is `use_adapter`, `adapter_taps`, `adapter_reduction`, and
                    `use_adapter` is true exactly when params/ holds `vision_adapter`)
  vocab.txt         the WordPiece vocabulary the token ids were made with (the writer's caller
                    passes it: the package's is `contextblip_jax.data.tokenizer.VOCAB_PATH`)
  provenance.json   {"format": FORMAT, "time": seconds, "writer": ..., ...} -- what wrote DIR:
                      writer "weight_convert": "source" {path, format original|contextblip|hf,
                        sha256 {file name: hex}}, "summary" (the mapping report)
                      writer "train": "stage", "step", ["valid_acc"], "init" {path,
                        provenance of that directory} or null
A stage's `<workdir>/export/` is such a directory; `load_param_dir` also takes the workdir.

DIR is written to a temporary sibling and renamed into place when complete (`atomic_directory`),
so a crash leaves the previous DIR or none. With several processes, all of them write their
shards of params/ through Orbax into the one temporary directory that process 0 created.

Directories written before this format are still read, with a warning saying how to rewrite
them: a converter directory (`config.json` {"format": "contextblip_jax.pretrained/1",
"model": BlipConfig dict, "adapter": {taps, reduction} or null, "source"}) and a stage export (an Orbax CheckpointManager directory whose step 0/
holds the items `state` and `meta` {"stage", "model": ContextBlipConfig dict, ...}).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

from contextblip_jax.models.contextblip import ContextBlipConfig
from contextblip_jax.models.variants import BlipConfig
from contextblip_jax.storage import paths
from contextblip_jax.storage.atomic import atomic_directory, json_default

FORMAT = "contextblip_jax.params/2"
PARAMS, MODEL, VOCAB, PROVENANCE = "params", "model.json", "vocab.txt", "provenance.json"
EXPORT = "export"   # a stage workdir's parameter directory
ADAPTER = "vision_adapter"
LEGACY_CONVERTED = ("contextblip_jax.pretrained/",)
_REWRITE_HINT = {
    "converted": "re-convert it: python -m weight_convert --src <its source> --out <new dir>",
    "export": "re-export it in the current format: p = load_param_dir(DIR); "
              "write_param_dir(DIR, p.params, p.model, p.provenance, overwrite=True, "
              "vocab_path=contextblip_jax.data.tokenizer.VOCAB_PATH)",
}


@dataclasses.dataclass
class ParamDir:
  """What `load_param_dir` read."""
  path: str                      # the parameter directory (a workdir's export/ for a workdir)
  params: dict[str, Any]         # host NumPy tree {"pretrained_blip": ..., ...}
  model: ContextBlipConfig       # the architecture the parameters belong to
  vocab_path: str | None         # its vocab.txt; None (legacy exports): the package's own
  provenance: dict[str, Any]     # provenance.json (legacy: reconstructed, "legacy": true)


def blip_model_config(blip: BlipConfig, adapter_taps: tuple[int, ...] | None = None,
                      adapter_reduction: int = 2) -> ContextBlipConfig:
  """The ContextBlipConfig of BLIP weights (+ a vision adapter when `adapter_taps` is given).

  Fields no parameter fixes keep ContextBlipConfig's defaults; the TMIM decoder and context
  heads drop to the ViT / text heads when 8 does not divide the width (tiny models).
  """
  v, t = blip.vision, blip.text
  kw: dict[str, Any] = dict(
      blip=blip, use_adapter=adapter_taps is not None,
      decoder_heads=8 if v.width % 8 == 0 else v.num_heads,
      context_heads=8 if t.hidden_size % 8 == 0 else t.num_heads)
  if adapter_taps is not None:
    kw.update(adapter_taps=tuple(int(i) for i in adapter_taps),
              adapter_reduction=int(adapter_reduction))
  return ContextBlipConfig(**kw)


# ------------------------------------------------------------------ write

def write_param_dir(out_dir: str, params: Any, model: ContextBlipConfig,
                    provenance: dict[str, Any], *, vocab_path: str,
                    overwrite: bool = False) -> str:
  """Writes DIR atomically; returns its absolute path.

  Args:
    out_dir: the directory to create (or replace, with `overwrite`).
    params: parameter tree (NumPy or jax arrays, sharded ones included) holding
      'pretrained_blip', and 'vision_adapter' exactly when `model.use_adapter`.
    model: the architecture (model.json).
    provenance: what wrote DIR ('writer' and its fields); FORMAT and the time are added.
    vocab_path: the vocabulary copied to vocab.txt.
  """
  out_dir = paths.abspath(out_dir)
  if paths.exists(out_dir) and not overwrite:
    raise FileExistsError(f"output directory already exists: {out_dir} (pass overwrite)")
  if "pretrained_blip" not in params:
    raise ValueError(f"{out_dir}: params must hold a 'pretrained_blip' group")
  if model.use_adapter != (ADAPTER in params):
    raise ValueError(f"{out_dir}: model.use_adapter is {model.use_adapter} but the params "
                     f"{'hold' if ADAPTER in params else 'lack'} a '{ADAPTER}' group")
  provenance = {"time": time.time(), **provenance, "format": FORMAT}
  with _staging_directory(out_dir) as tmp:
    with ocp.StandardCheckpointer() as ckptr:     # collective when there are several processes
      ckptr.save(paths.join(tmp, PARAMS), params)
    if jax.process_index() == 0:
      paths.copyfile(vocab_path, paths.join(tmp, VOCAB))
      _write_json(paths.join(tmp, MODEL), model.to_dict())
      _write_json(paths.join(tmp, PROVENANCE), provenance)
  return out_dir


@contextlib.contextmanager
def _staging_directory(out_dir: str) -> Iterator[str]:
  """`atomic_directory(out_dir)` on process 0; every process gets the same temporary path
  (Orbax writes each process's shards into it) and returns after the rename."""
  if jax.process_count() == 1:
    with atomic_directory(out_dir) as tmp:
      yield tmp
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    with atomic_directory(out_dir) as tmp:
      _broadcast_path(tmp)
      yield tmp
  else:
    yield _broadcast_path("")
  multihost_utils.sync_global_devices(f"param_dir:{out_dir}")


def _broadcast_path(path: str) -> str:
  """Process 0's `path` on every process."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  buf = np.zeros(4096, np.uint8)
  raw = path.encode()
  buf[:len(raw)] = np.frombuffer(raw, np.uint8)
  return bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf))).rstrip(b"\0").decode()


def _write_json(path: str, obj: Any) -> None:
  with paths.open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=json_default)


# ------------------------------------------------------------------ read

def load_param_dir(path: str) -> ParamDir:
  """Reads a parameter directory, or the export/ of a stage workdir; params on the host.

  Raises FileNotFoundError (no such path, a missing file) or ValueError (not a parameter
  directory, an unknown format), naming the path.
  """
  d, kind = _locate(path)
  if kind == "legacy_converted":
    return _load_legacy_converted(d)
  if kind == "legacy_export":
    return _load_legacy_export(d)
  provenance = _read_json(paths.join(d, PROVENANCE))
  if provenance.get("format") != FORMAT:
    raise ValueError(f"{paths.join(d, PROVENANCE)}: unknown format "
                     f"{provenance.get('format')!r}, expected {FORMAT!r} (written by a newer "
                     f"contextblip_jax?)")
  for name in (PARAMS, MODEL, VOCAB):
    if not paths.exists(paths.join(d, name)):
      raise FileNotFoundError(f"{d}: parameter directory without {name}")
  model = _model_from(paths.join(d, MODEL))
  params = _restore(paths.join(d, PARAMS))
  if model.use_adapter != (ADAPTER in params):
    raise ValueError(f"{d}: {MODEL} says use_adapter={model.use_adapter} but params/ "
                     f"{'holds' if ADAPTER in params else 'lacks'} '{ADAPTER}'")
  return ParamDir(d, params, model, paths.join(d, VOCAB), provenance)


def read_provenance(path: str) -> dict[str, Any] | None:
  """provenance.json of the parameter directory at `path` (or its workdir's export/);
  None for a directory in a legacy layout."""
  d, kind = _locate(path)
  return _read_json(paths.join(d, PROVENANCE)) if kind == "params" else None


def is_parameter_directory(path: str) -> bool:
  """True when `path` itself is a parameter directory (this format or a legacy converter
  directory): provenance.json, params/ + model.json, or a legacy config.json."""
  if not paths.isdir(path):
    return False
  names = set(paths.listdir(path))
  return (PROVENANCE in names or {PARAMS, MODEL} <= names
          or _legacy_converted_format(path) is not None)


def describe(provenance: dict[str, Any]) -> str:
  """One line saying what wrote a parameter directory."""
  if provenance.get("writer") == "weight_convert":
    src = provenance.get("source") or {}
    return f"{src.get('format')}:{src.get('path')}"
  if provenance.get("writer") == "train":
    return f"stage {provenance.get('stage')} step {provenance.get('step')}"
  return str(provenance.get("source", provenance.get("writer", "")))


def _locate(path: str) -> tuple[str, str]:
  """(the parameter directory, its kind) for a parameter directory or a stage workdir."""
  path = paths.abspath(path)
  if not paths.isdir(path):
    raise FileNotFoundError(f"{path}: no such parameter directory"
                            + ("" if not paths.exists(path) else " (a file)"))
  for d in (path, paths.join(path, EXPORT)):
    if not paths.isdir(d):
      continue
    if paths.isfile(paths.join(d, PROVENANCE)):
      return d, "params"
    if _legacy_converted_format(d):
      return d, "legacy_converted"
    if _legacy_export_step(d) is not None:
      return d, "legacy_export"
  raise ValueError(f"{path} is not a parameter directory (no {PROVENANCE}) nor a stage "
                   f"workdir with one in {EXPORT}/")


def _read_json(path: str) -> dict[str, Any]:
  try:
    with paths.open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e


def _model_from(path: str) -> ContextBlipConfig:
  """ContextBlipConfig of a model.json; a file that is not one raises ValueError naming it."""
  try:
    return ContextBlipConfig.from_dict(_read_json(path))
  except (TypeError, KeyError, AttributeError, ValueError) as e:
    raise ValueError(f"{path}: not a valid model description ({type(e).__name__}: {e})"
                     ) from e


def _restore(params_dir: str) -> dict[str, Any]:
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(params_dir)
  return jax.tree.map(np.asarray, params)


# ------------------------------------------------------------------ legacy layouts

def _legacy_converted_format(d: str) -> str | None:
  """The format of a legacy converter directory's config.json (None if it is not one; a
  stage workdir's config.json, the run config, has no 'format')."""
  cfg = paths.join(d, "config.json")
  if not paths.isfile(cfg):
    return None
  try:
    with paths.open(cfg, encoding="utf-8") as f:
      fmt = str(json.load(f).get("format", ""))
  except (json.JSONDecodeError, AttributeError):
    return None
  return fmt if fmt.startswith(LEGACY_CONVERTED) else None


def _legacy_export_step(d: str) -> int | None:
  """The newest step of a legacy export (CheckpointManager steps holding 'state')."""
  steps = [int(n) for n in paths.listdir(d)
           if n.isdigit() and paths.isdir(paths.join(d, n, "state"))]
  return max(steps) if steps else None


def _warn_legacy(d: str, kind: str, source: str = "") -> None:
  hint = _REWRITE_HINT[kind].replace("<its source>", source or "<its source>")
  logging.warning("%s: parameters in the legacy %s layout (read for compatibility); %s",
                  d, "converter" if kind == "converted" else "stage-export", hint)


def _load_legacy_converted(d: str) -> ParamDir:
  meta = _read_json(paths.join(d, "config.json"))
  source = str(meta.get("source", ""))
  _warn_legacy(d, "converted", source.split(":", 1)[-1] if ":" in source else "")
  adapter = meta.get("adapter")
  model = blip_model_config(BlipConfig.from_dict(meta["model"]),
                            adapter["taps"] if adapter else None,
                            adapter["reduction"] if adapter else 2)
  params = _restore(paths.join(d, PARAMS))
  provenance = {"format": meta["format"], "legacy": True, "writer": "weight_convert",
                "source": {"path": source, "format": "legacy"}}
  return ParamDir(d, params, model, paths.join(d, VOCAB), provenance)


def _load_legacy_export(d: str) -> ParamDir:
  _warn_legacy(d, "export")
  step = _legacy_export_step(d)
  options = ocp.CheckpointManagerOptions(read_only=True)
  handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
  with ocp.CheckpointManager(d, options=options, item_handlers=handlers) as mngr:
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                     meta=ocp.args.JsonRestore()))
  meta = dict(out["meta"] or {})
  if "model" not in meta:
    raise ValueError(f"{d}: legacy export whose meta carries no model config")
  params = jax.tree.map(np.asarray, out["state"])
  model = ContextBlipConfig.from_dict(meta.pop("model"))
  if model.use_adapter and ADAPTER not in params:   # e.g. a backbone stage: no adapter yet
    model = model.replace(use_adapter=False)
  provenance = {"format": "legacy stage export", "legacy": True, "writer": "train", **meta}
  return ParamDir(d, params, model, None, provenance)
