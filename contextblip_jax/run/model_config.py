"""The model configuration of a run: `ContextBlipConfig` from `config.model`, with what the
parameters a run starts from fix (BLIP sizes, the vision adapter) taken from their directory.

The layer layout and remat (`config.model.scan_layers`, `config.model.remat`) are the run's
own: a source whose parameters are in the other layout is converted on load (in place, by
`models/layout.py: to_layout`).

`build_model(cfg, source)` is how every mode builds the model it runs (training stages and
their valid evaluations, evaluate / predict): the config above, plus the run's compute
precision and attention kernel (`config.model.compute_dtype`, `config.model.attention_impl`),
which are no part of the parameters and never come from a source (`models/contextblip.py:
make_model`, which the scoring command calls too)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import ml_collections

from contextblip_jax.models import layout
from contextblip_jax.models.contextblip import ContextBlip, ContextBlipConfig, make_model
from contextblip_jax.storage.param_dir import ParamDir

# Fields of ContextBlipConfig that a source's vision adapter fixes (taken from the source).
ADAPTER_FIELDS = ("use_adapter", "adapter_taps", "adapter_reduction")
# Fields that a source's TMIM decoder / context encoder fix (heads and depth; a converted
# checkpoint of the authors has the reference's 8 heads at every size), taken from the source
# when it holds that group.
STAGE_FIELDS = {"visual_decoder": ("decoder_layers", "decoder_heads", "text_adapter_reduction"),
                "context_encoder": ("context_layers", "context_heads", "num_candidates")}


def build_model(cfg: ml_collections.ConfigDict, source: ParamDir | None = None
                ) -> ContextBlip:
  """The run's model: `model_config(cfg, source)` in `config.model.compute_dtype`
  ('float32' | 'bfloat16') with attention `config.model.attention_impl` ('explicit' | 'xla' |
  'cudnn')."""
  m = cfg.model
  return make_model(model_config(cfg, source), str(m.get("compute_dtype", "float32")),
                    str(m.get("attention_impl", "explicit")))


def model_config(cfg: ml_collections.ConfigDict, source: ParamDir | None = None
                 ) -> ContextBlipConfig:
  """ContextBlipConfig from `config.model`; what the parameters of `source` fix comes from
  `source.model`: the BLIP sizes, and the vision adapter when the source holds one (without
  one, config.model says whether the stage adds a fresh adapter)."""
  m = cfg.model
  kw: dict[str, Any] = dict(
      use_adapter=m.use_adapter, adapter_reduction=m.adapter_reduction,
      use_tmim=m.use_tmim, reference_patch_layout=m.reference_patch_layout,
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
    arch: dict[str, Any] = {"blip": source.model.blip}
    if source.model.use_adapter:
      arch.update({f: getattr(source.model, f) for f in ADAPTER_FIELDS})
    for group, fields in STAGE_FIELDS.items():
      if source.params is not None and group in source.params:
        arch.update({f: getattr(source.model, f) for f in fields})
    if m.dropout >= 0:
      arch["blip"] = arch["blip"].replace(text=dataclasses.replace(
          arch["blip"].text, hidden_dropout=m.dropout, attention_dropout=m.dropout))
    if arch["blip"].vision.image_size != m.image_size:
      logging.warning("model.image_size %d differs from the source's %d; using the source's",
                      m.image_size, arch["blip"].vision.image_size)
    out = out.replace(**arch)
  out = out.with_layers(bool(m.get("scan_layers", False)), str(m.get("remat", "none")))
  if source is not None:
    to_run_layout(source, out.scan_layers)
  return out


def to_run_layout(source: ParamDir, scan_layers: bool) -> None:
  """Brings `source.params` (and `source.model`) into the layout `scan_layers`, in place."""
  if source.model.scan_layers == scan_layers and layout.is_scanned(source.params) == scan_layers:
    return
  logging.info("%s: converting the parameters to the %s layout", source.path,
               "scanned" if scan_layers else "unscanned")
  source.params = layout.to_layout(source.params, scan_layers)
  source.model = source.model.with_layers(scan_layers=scan_layers)


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
