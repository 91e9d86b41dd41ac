"""The converted-checkpoint directory that every command after conversion reads.

Layout of DIR:
  config.json   {"model": BlipConfig dict, "adapter": {taps, reduction} or null,
                 "source": str, "format": "contextblip_jax.storage.param_dir/1"}
  params/       Orbax checkpoint of the parameter tree
                {"pretrained_blip": Blip params, ["vision_adapter": adapter params]}
  vocab.txt     the WordPiece vocabulary the ids were made with

Writing goes to a temporary sibling directory that is renamed into place only when complete,
so a failed or interrupted write leaves no partial DIR behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from contextblip_jax.storage.atomic import atomic_directory
from contextblip_jax.models.variants import BlipConfig

FORMAT = "contextblip_jax.storage.param_dir/1"


@dataclasses.dataclass
class Pretrained:
  config: BlipConfig
  params: dict[str, Any]            # {"pretrained_blip": ..., optional "vision_adapter": ...}
  adapter: dict[str, Any] | None    # {"taps": [...], "reduction": int} when an adapter is held
  vocab_path: str
  source: str = ""


def save_pretrained(out_dir: str, config: BlipConfig, params: dict[str, Any],
                    vocab_path: str, adapter: dict[str, Any] | None = None,
                    source: str = "", overwrite: bool = False) -> str:
  """Writes DIR atomically (temp dir + rename). Returns the absolute path of DIR."""
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and not overwrite:
    raise FileExistsError(f"output directory already exists: {out_dir} (pass overwrite)")
  if "pretrained_blip" not in params:
    raise ValueError("params must hold a 'pretrained_blip' subtree")
  with atomic_directory(out_dir) as tmp:
    host = jax.tree.map(np.asarray, params)
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, "params"), host)
    shutil.copyfile(vocab_path, os.path.join(tmp, "vocab.txt"))
    meta = {"format": FORMAT, "model": config.to_dict(), "adapter": adapter, "source": source}
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(meta, f, indent=2, sort_keys=True)
  return out_dir


def load_pretrained(ckpt_dir: str) -> Pretrained:
  """Reads DIR written by `save_pretrained`; parameters come back as host NumPy arrays."""
  cfg_path = os.path.join(ckpt_dir, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"not a converted checkpoint directory (no config.json): {ckpt_dir}")
  with open(cfg_path) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT:
    raise ValueError(f"{cfg_path}: unknown format {meta.get('format')!r}, expected {FORMAT!r}")
  config = BlipConfig.from_dict(meta["model"])
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.abspath(os.path.join(ckpt_dir, "params")))
  params = jax.tree.map(np.asarray, params)
  return Pretrained(config=config, params=params, adapter=meta.get("adapter"),
                    vocab_path=os.path.join(ckpt_dir, "vocab.txt"), source=meta.get("source", ""))
