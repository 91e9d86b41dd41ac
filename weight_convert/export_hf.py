"""Export our Flax BLIP parameters to a Hugging Face `BlipForImageTextRetrieval` directory.

The state dict is produced by walking mapping.RULES in reverse (`Hook.inverse`: kernels
transposed back, HWIO -> OIHW), so import and export share one table. The directory holds
`config.json` (infer_config.hf_config_dict; vision eps and dropout are ours, i.e. BLIP's) and
`model.safetensors`; it is written to a temporary sibling and renamed into place. Either
export may be written to a gs:// URL (written locally, uploaded, then moved into place;
storage/paths.py says what is atomic there).

Parameters in the scanned layout (`scan_layers`, stacked blocks) are unstacked first by
`models/layout.py: to_layout`. Only the BLIP part (`pretrained_blip`) has a Hugging Face
counterpart. Every other group is
left out and each is named in the log: the ContextBLIP vision adapter (BlipForImageTextRetrieval
has no place for it, so the exported model's ITM runs on the plain BLIP image tokens and differs
from `contextblip_jax.score` on an adapter checkpoint), and a stage's TMIM, `prediction_layer`
and `context_encoder` groups.

  export_hf(params, config, "hf_out")          # params: {"pretrained_blip": ...} or Blip params
  export_checkpoint("ckpt/blip_base", "hf_out")  # any parameter directory or stage workdir

The authors' layout (`export_authors`, `to_authors_state_dict`) is the other way back, for the
groups HF cannot hold: every group (BLIP, adapter, TMIM, prediction layer, context encoder)
walks mapping.RULES + STAGE_RULES in reverse and is written under the key prefixes and wrapper
of one of the authors' checkpoints (loaders.STAGE_LAYOUTS): 'stage2' when the parameters hold
a context encoder ({"model_state_dict": ...}, as finetune_context.py saves), 'stage1' with a
prediction layer only (finetune_notf.py), else 'pretrain' ({"model": ...}, main.py); plain
Salesforce keys for BLIP without an adapter. The `position_ids` buffers the authors' modules
register are written too, so the file loads into their model with strict=True; `convert`
reads it back to the same parameters.

  export_authors("runs/finetune2", "ft2.pth")    # torch.save; "x.safetensors": flat, no wrapper
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import numpy as np
from flax import traverse_util

from contextblip_jax.storage import paths
from contextblip_jax.storage.atomic import atomic_directory, atomic_file, check_replaceable
from contextblip_jax.storage.workdir import HF_EXPORT_MARKER
from contextblip_jax.models import layout
from contextblip_jax.models import layout as layout_mod
from contextblip_jax.models.contextblip import PARAM_GROUPS, ContextBlipConfig
from contextblip_jax.models.variants import BlipConfig
from contextblip_jax.storage.param_dir import describe, load_param_dir
from weight_convert import mapping
from weight_convert.converter import abstract_params
from weight_convert.infer_config import hf_config_dict
from weight_convert.loaders import STAGE_LAYOUTS, ConversionError, file_key

Log = Callable[[str], None]



def _check_tree(flat: dict, want: dict) -> None:
  """Raises ConversionError naming every missing, unexpected or mis-shaped parameter of the
  flat tree `flat` against the abstract flat tree `want`."""
  problems = [f"missing {p}" for p in sorted(set(want) - set(flat))]
  problems += [f"unexpected {p}" for p in sorted(set(flat) - set(want))]
  problems += [f"{p} has shape {list(np.shape(flat[p]))}, config needs {list(want[p].shape)}"
               for p in sorted(set(flat) & set(want)) if np.shape(flat[p]) != want[p].shape]
  if problems:
    raise ConversionError("parameters do not match the config: " + "; ".join(problems))


def to_state_dict(params: dict[str, Any], config: BlipConfig, fmt: str = "hf"
                  ) -> dict[str, np.ndarray]:
  """Blip params (or {"pretrained_blip": ...}) -> PyTorch-layout state dict in format `fmt`.

  The tree must match `abstract_params(config)` exactly (paths and shapes), else
  ConversionError names the differences. Scanned layers (stacked blocks) are unstacked first
  (models/layout.py), so both layouts export to the same state dict.
  """
  blip = params["pretrained_blip"] if "pretrained_blip" in params else params
  blip = layout.to_layout(blip, False)
  config = config.with_layers(scan_layers=False)
  flat = traverse_util.flatten_dict({"pretrained_blip": blip}, sep="/")
  want = traverse_util.flatten_dict(abstract_params(config), sep="/")
  _check_tree(flat, want)
  state = {}
  for path, value in flat.items():
    key, rule = mapping.source_key(path, fmt)
    state[key] = np.ascontiguousarray(rule.hook.inverse(np.asarray(value, np.float32)))
  return state


def export_hf(params: dict[str, Any], config: BlipConfig, out: str, overwrite: bool = False,
              log: Log | None = None, sources: tuple[str, ...] = ()) -> str:
  """Writes `out` (config.json + model.safetensors + the marker HF_EXPORT_MARKER)
  atomically; returns its absolute path. `overwrite` replaces only an earlier export (with
  the marker) that neither is nor holds one of `sources`."""
  from safetensors.numpy import save_file
  log = log or (lambda s: None)
  out = paths.abspath(out)                  # a local directory or a gs:// URL
  if paths.exists(out) and not overwrite:
    raise FileExistsError(f"output directory already exists: {out} (pass --overwrite)")
  check_replaceable(out, sources, lambda d: paths.isfile(paths.join(d, HF_EXPORT_MARKER)),
                    "a Hugging Face export written by weight_convert")
  if "pretrained_blip" in params:
    for note in left_out_notes(params):
      log(f"      note: {note}")
  state = to_state_dict(params, config, "hf")
  log(f"[2/4] map: {len(state)} tensors in HF BlipForImageTextRetrieval layout")
  log(f"[3/4] check: ok: every parameter mapped ({sum(v.size for v in state.values()):,} values)")
  # The files are written locally (safetensors writes local files only) and, for a gs:// out,
  # uploaded under the temporary prefix that atomic_directory then moves into place.
  with atomic_directory(out) as tmp, paths.local_staging(tmp) as local:
    save_file(state, os.path.join(local, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(local, "config.json"), "w") as f:
      json.dump(hf_config_dict(config), f, indent=2, sort_keys=True)
    with open(os.path.join(local, HF_EXPORT_MARKER), "w") as f:
      json.dump({"writer": "weight_convert export", "time": time.time()}, f)
  log(f"[4/4] write: {out}")
  return out


def left_out_notes(params: dict[str, Any]) -> list[str]:
  """One line per top-level group of `params` other than pretrained_blip (not exported)."""
  notes = []
  if "vision_adapter" in params:
    notes.append("the vision_adapter (ContextBLIP multi-scale adapter) is not representable in "
                 "BlipForImageTextRetrieval and is left out: the exported model's ITM uses the "
                 "plain BLIP image tokens")
  others = sorted(k for k in params if k not in ("pretrained_blip", "vision_adapter"))
  if others:
    notes.append(f"groups without a Hugging Face counterpart, left out: {', '.join(others)}")
  return notes


def export_checkpoint(ckpt_dir: str, out: str, overwrite: bool = False,
                      log: Log | None = None) -> str:
  """A parameter directory (contextblip_jax.storage.param_dir: converted, or any stage's
  export/) or a stage workdir -> HF directory `out`; its BLIP part (see the module doc)."""
  log = log or (lambda s: None)
  pd = load_param_dir(ckpt_dir)
  log(f"[1/4] load: {pd.path} ({describe(pd.provenance)}; groups {', '.join(sorted(pd.params))})")
  return export_hf(pd.params, pd.model.blip, out, overwrite=overwrite, log=log,
                   sources=(ckpt_dir, pd.path))


# ------------------------------------------------------------------ the authors' layout

def authors_layout(params: dict[str, Any]) -> str:
  """The STAGE_LAYOUTS name whose checkpoint holds `params`' groups ('' = plain BLIP keys)."""
  if "context_encoder" in params:
    return "stage2"
  if "prediction_layer" in params:
    return "stage1"
  return "pretrain" if len(params) > 1 else ""


def to_authors_state_dict(params: dict[str, Any], model: ContextBlipConfig,
                          layout: str | None = None) -> tuple[dict[str, np.ndarray], list[str]]:
  """Our parameter tree -> (state dict under the authors' keys of `layout` (default
  `authors_layout(params)`), notes on groups that layout has no place for).

  Every group the layout holds must match `abstract_params` of `model` exactly (paths and
  shapes), else ConversionError names the differences. The stage modules of the authors'
  fine-tuning checkpoints hold no TMIM group: it is left out of 'stage1' / 'stage2' with a note.
  """
  layout = authors_layout(params) if layout is None else layout
  if layout not in ("", *STAGE_LAYOUTS):
    raise ValueError(f"unknown layout {layout!r}; known: {', '.join(STAGE_LAYOUTS)} or ''")
  params = layout_mod.to_layout(dict(params), False)
  tmim = PARAM_GROUPS["tmim"]
  allowed = {"": ("pretrained_blip",), "pretrain": ("pretrained_blip", "vision_adapter") + tmim,
             "stage1": ("pretrained_blip", "vision_adapter", "prediction_layer"),
             "stage2": ("pretrained_blip", "vision_adapter", "prediction_layer",
                        "context_encoder")}[layout]
  notes = []
  left = sorted(k for k in params if k not in allowed)
  if left:
    notes.append(f"groups the authors' {layout or 'BLIP'} checkpoint has no place for, left "
                 f"out: {', '.join(left)}")
  params = {k: v for k, v in params.items() if k in allowed}
  groups = tuple(g for g in ("tmim", "head", "context")
                 if all(n in params for n in PARAM_GROUPS[g]))
  model = model.with_layers(scan_layers=False)
  if "vision_adapter" in params and not model.use_adapter:
    raise ConversionError("the parameters hold a vision_adapter but the model config has "
                          "use_adapter=False")
  want = traverse_util.flatten_dict(abstract_params(
      model if "vision_adapter" in params else model.replace(use_adapter=False), groups), sep="/")
  flat = traverse_util.flatten_dict(params, sep="/")
  _check_tree(flat, want)
  state = {}
  for path, value in flat.items():
    key, rule = mapping.source_key(path, "original")
    state[file_key(key, layout)] = np.ascontiguousarray(
        rule.hook.inverse(np.asarray(value, np.float32)))
  text = model.blip.text
  state[file_key("text_encoder.embeddings.position_ids", layout)] = np.arange(
      text.max_position_embeddings, dtype=np.int64)[None]
  if "tmim" in groups:
    state[file_key("visual_decoder.embeddings.position_ids", layout)] = np.arange(
        model.decoder_config.max_position_embeddings, dtype=np.int64)[None]
  return state, notes


def export_authors(ckpt_dir: str, out: str, layout: str | None = None, overwrite: bool = False,
                   log: Log | None = None) -> str:
  """A parameter directory or stage workdir -> one checkpoint file `out` in the authors'
  layout (see the module doc): `.safetensors` -> the flat state dict; any other name ->
  `torch.save({wrapper: state dict})` (needs torch). Written atomically; returns its path."""
  log = log or (lambda s: None)
  out = paths.abspath(out)                  # a local file or a gs:// URL
  if paths.isdir(out):
    raise FileExistsError(f"{out} is a directory; the authors' format is one file "
                          f"(e.g. {paths.join(out, 'checkpoint.pth')})")
  if paths.exists(out) and not overwrite:
    raise FileExistsError(f"output file already exists: {out} (pass --overwrite)")
  src = paths.realpath(ckpt_dir).rstrip("/" + os.sep) + (
      "/" if paths.is_remote(ckpt_dir) else os.sep)
  if paths.realpath(out).startswith(src):
    raise FileExistsError(f"refusing to write {out} inside the checkpoint directory {ckpt_dir}")
  pd = load_param_dir(ckpt_dir)
  log(f"[1/4] load: {pd.path} ({describe(pd.provenance)}; groups {', '.join(sorted(pd.params))})")
  layout = authors_layout(pd.params) if layout is None else layout
  state, notes = to_authors_state_dict(pd.params, pd.model, layout)
  log(f"[2/4] map: {len(state)} tensors in the authors' {layout or 'BLIP'} layout")
  for note in notes:
    log(f"      note: {note}")
  log(f"[3/4] check: ok: every parameter mapped "
      f"({sum(v.size for k, v in state.items() if v.dtype != np.int64):,} values)")
  if out.endswith(".safetensors"):
    from safetensors.numpy import save
    data = save(state, metadata={"format": "pt", "layout": layout or "blip"})
    with atomic_file(out, "wb") as f:
      f.write(data)
  else:
    try:
      import torch  # lazy: only this writer needs torch
    except ImportError as e:
      raise ConversionError(f"writing {out} with torch.save needs torch; name the output "
                            f"*.safetensors to write without it") from e
    wrapper = STAGE_LAYOUTS[layout]["wrapper"] if layout else "model"
    obj = {wrapper: {k: torch.from_numpy(v) for k, v in state.items()}}
    with atomic_file(out, "wb") as f:
      torch.save(obj, f)
  log(f"[4/4] write: {out}")
  return out
