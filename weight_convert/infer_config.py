"""The model configuration of a source checkpoint, and the HF config.json written on export.

* HF directory: from `config.json`; keys a (hub) config omits take the transformers defaults
  (`HF_VISION_DEFAULTS`, `HF_TEXT_DEFAULTS`), as `BlipConfig.from_pretrained` would.
  Policy `hf_config='blip'` (default) keeps the *architecture* from config.json (sizes, heads,
  text eps) but uses BLIP's values for what HF configs get wrong (docs/decisions.md items 16, 20):
  vision LayerNorm eps 1e-6 (hub configs leave the HF default 1e-5; every BLIP checkpoint was
  trained with 1e-6) and text dropout 0.1 (HF defaults to 0.0; BLIP trains with 0.1). Each such
  override is reported. Policy 'config' takes config.json literally (e.g. to reproduce a HF
  model that really runs with eps 1e-5).
* Original checkpoint: sizes are read from tensor shapes (B/16 defaults for everything else:
  eps, dropout); `vocab_size` from `word_embeddings`; the image size from `pos_embed`. Head
  counts cannot be read from shapes: they default to width // 64 (B/16, L/16) unless given.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from contextblip_jax.models.variants import BlipConfig, TextConfig, VisionConfig, get_variant
from weight_convert.loaders import ConversionError, SourceState

# transformers 5.x BlipVisionConfig / BlipTextConfig defaults (configuration_blip.py).
HF_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, image_size=384, patch_size=16,
                          hidden_act="gelu", layer_norm_eps=1e-5, attention_dropout=0.0)
HF_TEXT_DEFAULTS = dict(vocab_size=30524, hidden_size=768, encoder_hidden_size=768,
                        intermediate_size=3072, num_hidden_layers=12, num_attention_heads=8,
                        max_position_embeddings=512, hidden_act="gelu", layer_norm_eps=1e-12,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        is_decoder=True)
BLIP_VISION_EPS = 1e-6
HEAD_DIM = 64   # BLIP ViT-B/16 and BERT-base


def _square(value: Any, what: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ConversionError(f"config.json {what} must be square, got {value}")
    value = value[0]
  return int(value)


def config_from_hf(hf: dict[str, Any], policy: str = "blip") -> tuple[BlipConfig, list[str]]:
  """HF BlipConfig dict (config.json) -> (our BlipConfig, notes). See the module docstring."""
  if policy not in ("blip", "config"):
    raise ValueError(f"hf_config policy must be 'blip' or 'config', got {policy!r}")
  arch = hf.get("architectures") or []
  if hf.get("model_type") not in (None, "blip") or (
      arch and "BlipForImageTextRetrieval" not in arch):
    raise ConversionError(f"config.json describes {hf.get('model_type')!r} {arch}, not a "
                          f"BlipForImageTextRetrieval")
  v = {**HF_VISION_DEFAULTS, **(hf.get("vision_config") or {})}
  t = {**HF_TEXT_DEFAULTS, **(hf.get("text_config") or {})}
  for name, cfg in (("vision_config", v), ("text_config", t)):
    if cfg["hidden_act"] != "gelu":
      raise ConversionError(f"config.json {name}.hidden_act is {cfg['hidden_act']!r}; "
                            f"BLIP uses exact 'gelu'")
  if not t["is_decoder"]:
    raise ConversionError("config.json text_config.is_decoder is false: the text encoder would "
                          "have no cross-attention, which BLIP ITM needs")
  notes = []
  base = TextConfig()
  eps = v["layer_norm_eps"]
  hdrop, adrop = t["hidden_dropout_prob"], t["attention_probs_dropout_prob"]
  if policy == "blip":
    if eps != BLIP_VISION_EPS:
      notes.append(f"vision layer_norm_eps: config.json has {eps:g} (HF default); using "
                   f"{BLIP_VISION_EPS:g} as BLIP was trained (docs/decisions.md item 20; --hf-config config "
                   f"keeps {eps:g})")
    if (hdrop, adrop) != (base.hidden_dropout, base.attention_dropout):
      notes.append(f"text dropout: config.json has hidden {hdrop:g} / attention {adrop:g}; using "
                   f"BLIP's {base.hidden_dropout:g} / {base.attention_dropout:g} (docs/decisions.md item 16)")
    eps, hdrop, adrop = BLIP_VISION_EPS, base.hidden_dropout, base.attention_dropout
  if "num_attention_heads" not in (hf.get("text_config") or {}):
    notes.append("text num_attention_heads absent from config.json: HF default 8 used "
                 "(BLIP-base uses 12)")
  vision = VisionConfig(
      image_size=_square(v["image_size"], "vision_config.image_size"),
      patch_size=_square(v["patch_size"], "vision_config.patch_size"),
      width=int(v["hidden_size"]), depth=int(v["num_hidden_layers"]),
      num_heads=int(v["num_attention_heads"]), mlp_dim=int(v["intermediate_size"]),
      layer_norm_eps=float(eps))
  text = TextConfig(
      vocab_size=int(t["vocab_size"]), hidden_size=int(t["hidden_size"]),
      num_layers=int(t["num_hidden_layers"]), num_heads=int(t["num_attention_heads"]),
      intermediate_size=int(t["intermediate_size"]),
      max_position_embeddings=int(t["max_position_embeddings"]),
      layer_norm_eps=float(t["layer_norm_eps"]), hidden_dropout=float(hdrop),
      attention_dropout=float(adrop),
      encoder_width=int(v["hidden_size"]))   # HF BlipConfig.__post_init__ forces this too
  return BlipConfig(vision=vision, text=text,
                    embed_dim=int(hf.get("image_text_hidden_size", 256))), notes


def hf_config_dict(config: BlipConfig) -> dict[str, Any]:
  """Our BlipConfig -> a HF `BlipForImageTextRetrieval` config.json dict (export)."""
  v, t = config.vision, config.text
  return {
      "architectures": ["BlipForImageTextRetrieval"],
      "model_type": "blip",
      "dtype": "float32",
      "image_text_hidden_size": config.embed_dim,
      "vision_config": {
          "model_type": "blip_vision_model", "hidden_size": v.width,
          "intermediate_size": v.mlp_dim, "num_hidden_layers": v.depth,
          "num_attention_heads": v.num_heads, "image_size": v.image_size,
          "patch_size": v.patch_size, "hidden_act": "gelu", "layer_norm_eps": v.layer_norm_eps,
          "attention_dropout": 0.0},
      "text_config": {
          "model_type": "blip_text_model", "vocab_size": t.vocab_size,
          "hidden_size": t.hidden_size, "encoder_hidden_size": t.encoder_width,
          "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
          "num_attention_heads": t.num_heads,
          "max_position_embeddings": t.max_position_embeddings, "hidden_act": "gelu",
          "layer_norm_eps": t.layer_norm_eps, "hidden_dropout_prob": t.hidden_dropout,
          "attention_probs_dropout_prob": t.attention_dropout, "is_decoder": True},
  }


def _need(source: SourceState, key: str, ndim: int) -> tuple[int, ...]:
  if key not in source.arrays:
    raise ConversionError(f"{source.path}: cannot infer the model size: missing key "
                          f"{source.name(key)!r}")
  shape = source.shape(key)
  if len(shape) != ndim:
    raise ConversionError(f"{source.path}: key {source.name(key)!r} has shape {list(shape)}, "
                          f"expected {ndim} dimensions")
  return shape


def _count(source: SourceState, pattern: str) -> int:
  rx = re.compile(pattern)
  idx = {int(m.group(1)) for k in source.arrays if (m := rx.match(k))}
  if idx != set(range(len(idx))):
    raise ConversionError(f"{source.path}: layer indices {sorted(idx)} are not 0..n-1 "
                          f"({pattern})")
  return len(idx)


def _heads(width: int, given: int | None, what: str) -> int:
  if given is not None:
    return int(given)
  if width % HEAD_DIM:
    raise ConversionError(f"cannot infer {what} heads for width {width} (not a multiple of "
                          f"{HEAD_DIM}); pass them explicitly")
  return width // HEAD_DIM


def config_from_original(source: SourceState, vision_heads: int | None = None,
                         text_heads: int | None = None) -> tuple[BlipConfig, list[str]]:
  """Sizes from an original checkpoint's shapes (B/16 defaults elsewhere) -> (config, notes)."""
  width = _need(source, "visual_encoder.cls_token", 3)[2]
  patch = _need(source, "visual_encoder.patch_embed.proj.weight", 4)[3]
  n_pos = _need(source, "visual_encoder.pos_embed", 3)[1]
  grid = int(round((n_pos - 1) ** 0.5))
  if grid * grid + 1 != n_pos:
    raise ConversionError(f"{source.path}: pos_embed has {n_pos} rows, not 1 + a square grid")
  vocab, hidden = _need(source, "text_encoder.embeddings.word_embeddings.weight", 2)
  base = get_variant("B/16", grid * patch)
  vision = dataclasses.replace(
      base.vision, patch_size=patch, width=width,
      depth=_count(source, r"^visual_encoder\.blocks\.(\d+)\.norm1\.weight$"),
      num_heads=_heads(width, vision_heads, "vision"),
      mlp_dim=_need(source, "visual_encoder.blocks.0.mlp.fc1.weight", 2)[0])
  text = dataclasses.replace(
      base.text, vocab_size=vocab, hidden_size=hidden,
      num_layers=_count(
          source, r"^text_encoder\.encoder\.layer\.(\d+)\.attention\.self\.query\.weight$"),
      num_heads=_heads(hidden, text_heads, "text"),
      intermediate_size=_need(
          source, "text_encoder.encoder.layer.0.intermediate.dense.weight", 2)[0],
      max_position_embeddings=_need(
          source, "text_encoder.embeddings.position_embeddings.weight", 2)[0],
      encoder_width=_need(
          source, "text_encoder.encoder.layer.0.crossattention.self.key.weight", 2)[1])
  embed_dim = _need(source, "vision_proj.weight", 2)[0]
  notes = [f"config from shapes: ViT width {width}, depth {vision.depth}, patch {patch}, "
           f"{grid}x{grid} grid ({grid * patch} px); text width {hidden}, "
           f"{text.num_layers} layers, vocab {vocab}; heads {vision.num_heads}/{text.num_heads}"
           f"{'' if vision_heads or text_heads else ' (width // 64)'}"]
  return BlipConfig(vision=vision, text=text, embed_dim=embed_dim), notes


def adapter_from_source(source: SourceState, config: BlipConfig,
                        taps: tuple[int, ...] | None = None) -> dict[str, Any] | None:
  """ContextBLIP adapter {taps, reduction} from `vision_adapter.*` shapes; None if absent.

  The number of taps is the number of `down.{i}` layers; delta = D / rows of down.0. Tapped
  blocks (1-based) default to evenly spaced `depth * (i + 1) // n`, i.e. (3, 6, 9, 12) for
  4 taps of a 12-block ViT as in ContextBLIP.
  """
  if not any(k.startswith("vision_adapter.") for k in source.arrays):
    return None
  n = _count(source, r"^vision_adapter\.down\.(\d+)\.fc\.0\.weight$")
  if n == 0:
    raise ConversionError(f"{source.path}: vision_adapter.* keys without "
                          f"vision_adapter.down.0.fc.0.weight")
  width = config.vision.width
  rows = _need(source, "vision_adapter.down.0.fc.0.weight", 2)[0]
  if rows == 0 or width % rows:
    raise ConversionError(f"{source.path}: vision_adapter.down.0.fc.0.weight has {rows} rows; "
                          f"the ViT width {width} is not a multiple")
  depth = config.vision.depth
  taps = tuple(taps) if taps else tuple(depth * (i + 1) // n for i in range(n))
  if len(taps) != n or not all(1 <= t <= depth for t in taps):
    raise ConversionError(f"adapter taps {taps} do not fit {n} DPAL layers and {depth} blocks")
  return {"taps": list(taps), "reduction": width // rows}


def stage_fields(source: SourceState, config: BlipConfig, groups: tuple[str, ...],
                 decoder_heads: int | None = None, context_heads: int | None = None
                 ) -> dict[str, Any]:
  """ContextBlipConfig fields of the stage modules in `groups` (mapping.STAGE_RULES names).

  'tmim': decoder depth = number of `visual_decoder.encoder.layer.{i}`; the text adapter's
  reduction = text width / rows of `text_adapter.fc.0.weight`; decoder heads cannot be read
  from shapes: `decoder_heads`, default 8 as the reference (the ViT's heads when 8 does not
  divide the width). 'context': depth = number of `transformer.{i}`; candidates = rows of
  `positional_emb.weight`; heads `context_heads`, default 8 as the reference (the text heads
  when 8 does not divide the width). `use_tmim` keeps its default (the run's config decides).
  """
  out: dict[str, Any] = {}
  v, t = config.vision, config.text
  if "tmim" in groups:
    rows = _need(source, "text_adapter.fc.0.weight", 2)[0]
    if rows == 0 or t.hidden_size % rows:
      raise ConversionError(f"{source.path}: {source.name('text_adapter.fc.0.weight')} has "
                            f"{rows} rows; the text width {t.hidden_size} is not a multiple")
    heads = decoder_heads or (8 if v.width % 8 == 0 else v.num_heads)
    out.update(decoder_layers=_count(
        source, r"^visual_decoder\.encoder\.layer\.(\d+)\.attention\.self\.query\.weight$"),
        decoder_heads=heads, text_adapter_reduction=t.hidden_size // rows)
  if "context" in groups:
    heads = context_heads or (8 if t.hidden_size % 8 == 0 else t.num_heads)
    out.update(context_layers=_count(
        source, r"^transformer\.(\d+)\.attention\.self\.query\.weight$"),
        context_heads=heads,
        num_candidates=_need(source, "positional_emb.weight", 2)[0])
  for name in ("decoder_layers", "context_layers"):
    if out.get(name) == 0:
      raise ConversionError(f"{source.path}: the checkpoint holds "
                            f"{'TMIM' if name[0] == 'd' else 'context-encoder'} keys but no "
                            f"complete layer 0 ({name} would be 0)")
  return out
