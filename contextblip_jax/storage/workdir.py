"""What a stage's workdir holds, and how the next stage reads it.

  <workdir>/config.json     the run's config (rewritten on every run; earlier ones kept as
                            config.<time>.json when they differ)
  <workdir>/ckpt/<step>/    Orbax checkpoints of the train state + Grain iterator (resume)
  <workdir>/export/         the stage's result: its parameters (best valid epoch when
                            train.select_best) + meta {stage, model (ContextBlipConfig dict), step}
  <workdir>/DONE.json       written last: the stage finished; a rerun reuses it
  <workdir>/metrics.jsonl, tb/   metrics (process 0)
  <workdir>/eval/           predictions JSONL, reports, leaderboard, PNGs

A converted BLIP checkpoint (weight_convert, `pretrained.py` format) is read the same way as a
previous stage's workdir by `load_init`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from contextblip_jax.storage import checkpoints
from contextblip_jax.storage.atomic import atomic_file
from contextblip_jax.models.contextblip import ContextBlipConfig
from contextblip_jax.models.variants import BlipConfig

EXPORT, CKPT, DONE, EVAL = "export", "ckpt", "DONE.json", "eval"

# Parameter groups a training stage takes from the stage before it (the rest start fresh).
TAKE_FROM_PREVIOUS = {
    "backbone": (),
    "pretrain": ("pretrained_blip", "vision_adapter"),
    "finetune1": ("pretrained_blip", "vision_adapter"),
    "finetune2": ("pretrained_blip", "vision_adapter", "prediction_layer"),
}
# Architecture fields of ContextBlipConfig that parameters fix (taken from the source).
ARCH_FIELDS = ("blip", "use_adapter", "adapter_taps", "adapter_reduction")


@dataclasses.dataclass
class InitSource:
  """Parameters to start from: (host) params tree and the model config they belong to."""
  path: str
  params: dict[str, Any]
  model: ContextBlipConfig | None        # None for a converted BLIP dir (see blip/adapter)
  blip: BlipConfig
  adapter: dict[str, Any] | None         # {"taps", "reduction"} or None
  meta: dict[str, Any]


def is_converted_dir(path: str) -> bool:
  cfg = os.path.join(path, "config.json")
  if not os.path.isfile(cfg):
    return False
  with open(cfg, encoding="utf-8") as f:
    try:
      return str(json.load(f).get("format", "")).startswith("contextblip_jax.storage.param_dir")
    except json.JSONDecodeError:
      return False


def load_init(path: str) -> InitSource:
  """Reads a converted BLIP directory or a stage workdir (its export/)."""
  path = os.path.abspath(path)
  if is_converted_dir(path):
    from contextblip_jax.storage.param_dir import load_pretrained  # pylint: disable=g-import-not-at-top
    p = load_pretrained(path)
    return InitSource(path, dict(p.params), None, p.config, p.adapter,
                      {"stage": "converted", "source": p.source})
  export = os.path.join(path, EXPORT) if os.path.isdir(os.path.join(path, EXPORT)) else path
  if not os.path.isdir(export):
    raise FileNotFoundError(f"{path}: neither a converted checkpoint (config.json) nor a stage "
                            f"workdir (export/)")
  params, meta = checkpoints.load_params(export)
  if "model" not in meta:
    raise ValueError(f"{export}: exported parameters carry no model config")
  model = ContextBlipConfig.from_dict(meta["model"])
  params = jax.tree.map(np.asarray, params)
  return InitSource(path, params, model, model.blip,
                    {"taps": list(model.adapter_taps), "reduction": model.adapter_reduction}
                    if model.use_adapter else None, meta)


def model_config(cfg: ml_collections.ConfigDict, source: InitSource | None = None
                 ) -> ContextBlipConfig:
  """ContextBlipConfig from `config.model`; the architecture comes from `source` when given."""
  m = cfg.model
  kw: dict[str, Any] = dict(
      use_adapter=m.use_adapter, adapter_reduction=m.adapter_reduction,
      mask_ratio=m.mask_ratio, mask_token_choice=m.mask_token_choice,
      random_mask=m.random_mask, reference_patch_layout=m.reference_patch_layout,
      context_layers=m.context_layers)
  if m.adapter_taps:
    kw["adapter_taps"] = tuple(m.adapter_taps)
  out = ContextBlipConfig.for_variant(m.variant, m.image_size, **kw)
  out = _resize(out, m)
  if m.dropout >= 0:
    text = dataclasses.replace(out.blip.text, hidden_dropout=m.dropout,
                               attention_dropout=m.dropout)
    out = out.replace(blip=out.blip.replace(text=text))
  if source is not None:
    if source.model is not None:
      arch = {f: getattr(source.model, f) for f in ARCH_FIELDS}
    else:
      arch = {"blip": source.blip}
      if source.adapter:
        arch.update(use_adapter=True, adapter_taps=tuple(source.adapter["taps"]),
                    adapter_reduction=int(source.adapter["reduction"]))
    if m.dropout >= 0:
      arch["blip"] = arch["blip"].replace(text=dataclasses.replace(
          arch["blip"].text, hidden_dropout=m.dropout, attention_dropout=m.dropout))
    if arch["blip"].vision.image_size != m.image_size:
      logging.warning("model.image_size %d differs from the source's %d; using the source's",
                      m.image_size, arch["blip"].vision.image_size)
    out = out.replace(**arch)
  return out


def _resize(c: ContextBlipConfig, m: ml_collections.ConfigDict) -> ContextBlipConfig:
  """Applies the size overrides of config.model (width, depth, ...; 0 = keep)."""
  v, t = c.blip.vision, c.blip.text
  width, heads = m.get("width", 0) or v.width, m.get("heads", 0)
  mlp = m.get("mlp_dim", 0) or (v.mlp_dim if width == v.width else 2 * width)
  v = dataclasses.replace(v, width=width, depth=m.get("depth", 0) or v.depth,
                          num_heads=heads or v.num_heads, mlp_dim=mlp,
                          patch_size=m.get("patch_size", 0) or v.patch_size)
  t = dataclasses.replace(t, hidden_size=width, encoder_width=width,
                          num_layers=m.get("text_layers", 0) or t.num_layers,
                          num_heads=heads or t.num_heads, intermediate_size=mlp)
  if (v, t) == (c.blip.vision, c.blip.text):
    return c
  kw: dict[str, Any] = {"blip": c.blip.replace(vision=v, text=t)}
  if heads:
    kw.update(decoder_heads=heads, context_heads=heads)
  if not m.adapter_taps and max(c.adapter_taps) > v.depth:
    kw["adapter_taps"] = tuple(range(1, v.depth + 1))
  return c.replace(**kw)


def params_to_take(stage: str, source: InitSource) -> dict[str, Any]:
  """The groups of `source` that `stage` starts from (missing required groups raise)."""
  want = TAKE_FROM_PREVIOUS[stage]
  have = {k: v for k, v in source.params.items() if k in want}
  if "pretrained_blip" in want and "pretrained_blip" not in have:
    raise ValueError(f"{source.path}: no 'pretrained_blip' parameters to start {stage} from")
  if stage == "finetune2" and "prediction_layer" not in have:
    raise ValueError(f"{source.path}: stage 2 starts from a stage-1 workdir; no "
                     "'prediction_layer' found")
  return have


def make_mesh(cfg: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """The run's mesh from config.mesh over all devices, or the first config.num_devices
  (single-process runs only; e.g. tests on the 8 forced CPU devices that want one)."""
  from contextblip_jax import sharding  # pylint: disable=g-import-not-at-top
  n = int(cfg.get("num_devices", 0) or 0)
  devices = None
  if n:
    if jax.process_count() > 1:
      raise ValueError("config.num_devices applies to single-process runs only")
    devices = jax.devices()[:n]
  return sharding.make_mesh(dict(cfg.mesh), devices)


# ------------------------------------------------------------------ export / done markers

def export_params(workdir: str, params: Any, stage: str, model: ContextBlipConfig,
                  **meta: Any) -> str:
  """Writes <workdir>/export (parameters + meta) synchronously; returns its path."""
  path = os.path.join(workdir, EXPORT)
  checkpoints.save_params(path, params, meta={"stage": stage, "model": model.to_dict(),
                                                "time": time.time(), **meta})
  return path


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
