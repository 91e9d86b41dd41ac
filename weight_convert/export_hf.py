"""Export our Flax BLIP parameters to a Hugging Face `BlipForImageTextRetrieval` directory.

The state dict is produced by walking mapping.RULES in reverse (`Hook.inverse`: kernels
transposed back, HWIO -> OIHW), so import and export share one table. The directory holds
`config.json` (infer_config.hf_config_dict; vision eps and dropout are ours, i.e. BLIP's) and
`model.safetensors`; it is written to a temporary sibling and renamed into place. HF has no
place for the ContextBLIP adapter: a `vision_adapter` subtree is left out and reported.

  export_hf(params, config, "hf_out")          # params: {"pretrained_blip": ...} or Blip params
  export_checkpoint("ckpt/blip_base", "hf_out")  # from a converted directory
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import numpy as np
from flax import traverse_util

from contextblip_jax.storage.atomic import atomic_directory
from contextblip_jax.models.variants import BlipConfig
from contextblip_jax.storage.param_dir import load_pretrained
from weight_convert import mapping
from weight_convert.converter import abstract_params
from weight_convert.infer_config import hf_config_dict
from weight_convert.loaders import ConversionError

Log = Callable[[str], None]


def to_state_dict(params: dict[str, Any], config: BlipConfig, fmt: str = "hf"
                  ) -> dict[str, np.ndarray]:
  """Blip params (or {"pretrained_blip": ...}) -> PyTorch-layout state dict in format `fmt`.

  The tree must match `abstract_params(config)` exactly (paths and shapes), else
  ConversionError names the differences.
  """
  blip = params["pretrained_blip"] if "pretrained_blip" in params else params
  flat = traverse_util.flatten_dict({"pretrained_blip": blip}, sep="/")
  want = traverse_util.flatten_dict(abstract_params(config), sep="/")
  problems = [f"missing {p}" for p in sorted(set(want) - set(flat))]
  problems += [f"unexpected {p}" for p in sorted(set(flat) - set(want))]
  problems += [f"{p} has shape {list(np.shape(flat[p]))}, config needs {list(want[p].shape)}"
               for p in sorted(set(flat) & set(want)) if np.shape(flat[p]) != want[p].shape]
  if problems:
    raise ConversionError("parameters do not match the config: " + "; ".join(problems))
  state = {}
  for path, value in flat.items():
    key, rule = mapping.source_key(path, fmt)
    state[key] = np.ascontiguousarray(rule.hook.inverse(np.asarray(value, np.float32)))
  return state


def export_hf(params: dict[str, Any], config: BlipConfig, out: str, overwrite: bool = False,
              log: Log | None = None) -> str:
  """Writes `out` (config.json + model.safetensors) atomically; returns its absolute path."""
  from safetensors.numpy import save_file
  log = log or (lambda s: None)
  out = os.path.abspath(out)
  if os.path.exists(out) and not overwrite:
    raise FileExistsError(f"output directory already exists: {out} (pass --overwrite)")
  if "vision_adapter" in params:
    log("      note: the vision_adapter subtree has no Hugging Face counterpart; not exported")
  state = to_state_dict(params, config, "hf")
  log(f"[2/4] map: {len(state)} tensors in HF BlipForImageTextRetrieval layout")
  log(f"[3/4] check: ok: every parameter mapped ({sum(v.size for v in state.values()):,} values)")
  with atomic_directory(out) as tmp:
    save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_config_dict(config), f, indent=2, sort_keys=True)
  log(f"[4/4] write: {out}")
  return out


def export_checkpoint(ckpt_dir: str, out: str, overwrite: bool = False,
                      log: Log | None = None) -> str:
  """A converted directory (contextblip_jax.storage.param_dir) -> HF directory `out`."""
  log = log or (lambda s: None)
  pre = load_pretrained(ckpt_dir)
  log(f"[1/4] load: converted checkpoint {ckpt_dir}")
  return export_hf(pre.params, pre.config, out, overwrite=overwrite, log=log)
