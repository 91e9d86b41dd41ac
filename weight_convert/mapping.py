"""The one mapping table between our Flax parameter tree and the PyTorch BLIP state dicts.

Each `Rule` names one Flax leaf (a '/'-separated path pattern of the converted tree
`{"pretrained_blip": Blip params, "vision_adapter": MultiScaleAdapter params}`), the key it
comes from in the original Salesforce / ContextBLIP checkpoint (`original`), the key in a
Hugging Face `BlipForImageTextRetrieval` state dict (`hf`; None where HF has no counterpart),
and a `Hook` that turns the PyTorch tensor into the Flax array (and back, for export):

  Linear weight [out, in]     -> Dense kernel [in, out]             (TRANSPOSE)
  fused qkv weight [3D, D]    -> one Dense(3D) kernel [D, 3D]        (TRANSPOSE; stays fused)
  Conv2d weight OIHW          -> HWIO kernel [p, p, 3, D]            (CONV)
  pos_embed [1, 1+g0^2, D]    -> [1, 1+g^2, D], bicubic if g != g0   (POS_EMBED)
  LayerNorm weight / bias     -> scale / bias                        (names only)
  Embedding weight            -> embedding                           (names only)

`{i}` in a pattern stands for a layer index; it is captured from the Flax path and substituted
into the source template. Keys are *canonical*: for a ContextBLIP checkpoint the `pretrained_blip.`
prefix of the BLIP keys is removed before lookup (see `loaders.SourceState`).

The table names the unscanned layout (`blocks_{i}`, `layer_{i}`). A tree in the scanned layout
(stacks with a leading layer axis, `scan_layers`) maps through its unscanned twin: the
converter and the export convert with the one helper `contextblip_jax.models.layout.to_layout`,
so a stacked leaf [L, ...] is filled from (or exported to) the L per-layer keys.

`STAGE_RULES` extends the table to the other modules of the authors' checkpoints (original keys
only): the pre-training TMIM modules ('tmim'), the stage-1 `prediction_layer` ('head') and the
stage-2 context transformer with its position table ('context'); `stage_groups_of` says which
of them a source holds. Export to the authors' layout (`export_hf.to_authors_state_dict`) walks
them back too.

Source keys that the target does not use must belong to one of the named `IGNORED_GROUPS`;
anything else is an error (see `converter.map_source`). Export to HF (`export_hf.py`) walks this
same table in reverse with `Hook.inverse`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np

from weight_convert.resample import resample_pos_embed


@dataclasses.dataclass(frozen=True)
class Hook:
  """`forward(source_array, target_shape) -> target_array`; `inverse(target_array) -> source`."""
  name: str
  forward: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]
  inverse: Callable[[np.ndarray], np.ndarray]


def _transpose2d(x: np.ndarray, shape=None) -> np.ndarray:
  return x.T if x.ndim == 2 else x          # a non-2D source fails the shape check instead


def _oihw_to_hwio(x: np.ndarray, shape=None) -> np.ndarray:
  return x.transpose(2, 3, 1, 0) if x.ndim == 4 else x     # [O, I, H, W] -> [H, W, I, O]


def _hwio_to_oihw(x: np.ndarray) -> np.ndarray:
  return x.transpose(3, 2, 0, 1)                            # [H, W, I, O] -> [O, I, H, W]


def _pos_embed(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """Resamples the patch grid (bicubic, CLS kept) when the target grid differs."""
  if x.shape == tuple(shape) or x.ndim != 3 or len(shape) != 3:
    return x
  grid = int(round((shape[1] - 1) ** 0.5))
  if grid * grid + 1 != shape[1]:
    return x
  return resample_pos_embed(x, grid)


IDENTITY = Hook("identity", lambda x, shape=None: x, lambda x: x)
TRANSPOSE = Hook("transpose", _transpose2d, _transpose2d)
CONV = Hook("conv_oihw_to_hwio", _oihw_to_hwio, _hwio_to_oihw)
POS_EMBED = Hook("pos_embed", _pos_embed, lambda x: x)


@dataclasses.dataclass(frozen=True)
class Rule:
  target: str            # Flax path pattern, e.g. "pretrained_blip/visual_encoder/blocks_{i}/..."
  original: str          # Salesforce key template (canonical, no `pretrained_blip.` prefix)
  hf: str | None         # HF BlipForImageTextRetrieval key template; None: not in HF models
  hook: Hook = IDENTITY

  def source(self, fmt: str) -> str | None:
    """The source key template for `fmt` ('original' or 'hf')."""
    if fmt == "original":
      return self.original
    if fmt == "hf":
      return self.hf
    raise ValueError(f"unknown source format {fmt!r}")


_SAME = object()   # HF key = original key (text encoder and heads, docs/method.md#conversion)


def _dense(target: str, original: str, hf=_SAME) -> list[Rule]:
  hf = original if hf is _SAME else hf
  return [Rule(f"{target}/kernel", f"{original}.weight", hf and f"{hf}.weight", TRANSPOSE),
          Rule(f"{target}/bias", f"{original}.bias", hf and f"{hf}.bias")]


def _norm(target: str, original: str, hf=_SAME) -> list[Rule]:
  hf = original if hf is _SAME else hf
  return [Rule(f"{target}/scale", f"{original}.weight", hf and f"{hf}.weight"),
          Rule(f"{target}/bias", f"{original}.bias", hf and f"{hf}.bias")]


def _embed(target: str, original: str) -> list[Rule]:
  return [Rule(f"{target}/embedding", f"{original}.weight", f"{original}.weight")]


def _attention(target: str, original: str) -> list[Rule]:
  """med.py BertAttention: self.{query,key,value}, output.{dense,LayerNorm}."""
  return (_dense(f"{target}/query", f"{original}.self.query")
          + _dense(f"{target}/key", f"{original}.self.key")
          + _dense(f"{target}/value", f"{original}.self.value")
          + _dense(f"{target}/dense", f"{original}.output.dense")
          + _norm(f"{target}/LayerNorm", f"{original}.output.LayerNorm"))


_V = "pretrained_blip/visual_encoder"
_VB = f"{_V}/blocks_{{i}}"
_OB = "visual_encoder.blocks.{i}"
_HB = "vision_model.encoder.layers.{i}"
_T = "pretrained_blip/text_encoder"
_TL = f"{_T}/encoder/layer_{{i}}"
_OL = "text_encoder.encoder.layer.{i}"

RULES: tuple[Rule, ...] = tuple(
    # --- ViT (docs/method.md#conversion) ---
    [Rule(f"{_V}/patch_embed_kernel", "visual_encoder.patch_embed.proj.weight",
          "vision_model.embeddings.patch_embedding.weight", CONV),
     Rule(f"{_V}/patch_embed_bias", "visual_encoder.patch_embed.proj.bias",
          "vision_model.embeddings.patch_embedding.bias"),
     Rule(f"{_V}/cls_token", "visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
     Rule(f"{_V}/pos_embed", "visual_encoder.pos_embed",
          "vision_model.embeddings.position_embedding", POS_EMBED)]
    + _norm(f"{_VB}/norm1", f"{_OB}.norm1", f"{_HB}.layer_norm1")
    + _dense(f"{_VB}/attn/qkv", f"{_OB}.attn.qkv", f"{_HB}.self_attn.qkv")
    + _dense(f"{_VB}/attn/proj", f"{_OB}.attn.proj", f"{_HB}.self_attn.projection")
    + _norm(f"{_VB}/norm2", f"{_OB}.norm2", f"{_HB}.layer_norm2")
    + _dense(f"{_VB}/mlp/fc1", f"{_OB}.mlp.fc1", f"{_HB}.mlp.fc1")
    + _dense(f"{_VB}/mlp/fc2", f"{_OB}.mlp.fc2", f"{_HB}.mlp.fc2")
    + _norm(f"{_V}/norm", "visual_encoder.norm", "vision_model.post_layernorm")
    # --- text encoder (HF keys are the original ones) ---
    + _embed(f"{_T}/embeddings/word_embeddings", "text_encoder.embeddings.word_embeddings")
    + _embed(f"{_T}/embeddings/position_embeddings",
             "text_encoder.embeddings.position_embeddings")
    + _norm(f"{_T}/embeddings/LayerNorm", "text_encoder.embeddings.LayerNorm")
    + _attention(f"{_TL}/attention", f"{_OL}.attention")
    + _attention(f"{_TL}/crossattention", f"{_OL}.crossattention")
    + _dense(f"{_TL}/intermediate", f"{_OL}.intermediate.dense")
    + _dense(f"{_TL}/output", f"{_OL}.output.dense")
    + _norm(f"{_TL}/output_LayerNorm", f"{_OL}.output.LayerNorm")
    # --- heads ---
    + _dense("pretrained_blip/itm_head", "itm_head")
    + _dense("pretrained_blip/vision_proj", "vision_proj")
    + _dense("pretrained_blip/text_proj", "text_proj")
    # --- ContextBLIP multi-scale adapter: bias-free Linear -> Dense kernel ---
    + [Rule("vision_adapter/down_{i}/kernel", "vision_adapter.down.{i}.fc.0.weight", None,
            TRANSPOSE),
       Rule("vision_adapter/up/kernel", "vision_adapter.up.fc.0.weight", None, TRANSPOSE)]
)


# --- the authors' ContextBLIP stage modules: original (authors') keys only, no HF counterpart.
# Canonical keys as `loaders.STAGE_LAYOUTS` leave them (stage wrappers `blip.` / `blip.blip.`
# and `pretrained_blip.` removed). Group names are models/contextblip.py PARAM_GROUPS.
_DL = "visual_decoder/encoder/layer_{i}"      # TMIM decoder: med.BertModel, no embeddings
_ODL = "visual_decoder.encoder.layer.{i}"
_CT = "context_encoder/transformer_{i}"       # stage 2: extras_.BertLayer x 2
_OCT = "transformer.{i}"


def _no_hf(rules: list[Rule]) -> list[Rule]:
  return [dataclasses.replace(r, hf=None) for r in rules]


def _bert_layer(target: str, original: str, cross: bool) -> list[Rule]:
  """A med.py / extras_.py BertLayer: attention, [crossattention], intermediate, output."""
  return (_attention(f"{target}/attention", f"{original}.attention")
          + (_attention(f"{target}/crossattention", f"{original}.crossattention")
             if cross else [])
          + _dense(f"{target}/intermediate", f"{original}.intermediate.dense")
          + _dense(f"{target}/output", f"{original}.output.dense")
          + _norm(f"{target}/output_LayerNorm", f"{original}.output.LayerNorm"))


STAGE_RULES: dict[str, tuple[Rule, ...]] = {
    # pre-training (models/multiscale_adapter.py Adapter_BLIP with mask_rate > 0)
    "tmim": tuple(_no_hf(
        [Rule("text_adapter/fc_0/kernel", "text_adapter.fc.0.weight", None, TRANSPOSE),
         Rule("text_adapter/fc_2/kernel", "text_adapter.fc.2.weight", None, TRANSPOSE)]
        + _bert_layer(_DL, _ODL, cross=True)
        + _embed("decoder_pos_embed", "decoder_pos_embed")
        + _dense("recon_head", "recon_head")
        + [Rule("mask_embed", "mask_embed", None)])),
    # stage 1 (finetune_notf.py ContextualBLIP.prediction_layer = Linear(768, 1))
    "head": tuple(_no_hf(_dense("prediction_layer", "prediction_layer"))),
    # stage 2 (finetune_context.py: transformer = 2 x BertLayer, positional_emb)
    "context": tuple(_no_hf(
        _bert_layer(_CT, _OCT, cross=False)
        + _embed("context_encoder/positional_emb", "positional_emb"))),
}

# Canonical source keys of each stage group: a source holding any of them gets the whole group
# in its target tree (and every key of the group is then required).
STAGE_SOURCE_KEYS: dict[str, str] = {
    "tmim": r"^(text_adapter|visual_decoder|decoder_pos_embed|recon_head|mask_embed)(\.|$)",
    "head": r"^prediction_layer\.",
    "context": r"^(transformer|positional_emb)\.",
}
_STAGE_SOURCE_RE = {g: re.compile(rx) for g, rx in STAGE_SOURCE_KEYS.items()}


def stage_groups_of(keys) -> tuple[str, ...]:
  """The stage groups ('tmim', 'head', 'context') that canonical source `keys` hold a
  parameter of (position-id buffers do not count), in table order."""
  keys = [k for k in keys if not k.endswith("position_ids")]
  return tuple(g for g, rx in _STAGE_SOURCE_RE.items() if any(rx.search(k) for k in keys))


ALL_RULES: tuple[Rule, ...] = RULES + tuple(r for rules in STAGE_RULES.values() for r in rules)


# Known source keys that the converted tree does not use: (group name, regex on the canonical
# key, why). Every unused source key must match one of these, or conversion fails.
IGNORED_GROUPS: tuple[tuple[str, str, str], ...] = (
    ("text_decoder", r"^text_decoder\.", "BLIP captioning decoder (not part of BLIP_Base)"),
    ("momentum_encoders", r"^(visual_encoder_m|text_encoder_m|vision_proj_m|text_proj_m)\.",
     "BLIP pre-training momentum (EMA) copies"),
    ("queues", r"^(image_queue|text_queue|idx_queue|ptr_queue|queue_ptr)$",
     "BLIP ITC feature queues"),
    ("temp", r"^temp$", "BLIP ITC temperature (ContextBLIP uses none)"),
    ("position_ids", r"(^|\.)position_ids$", "position-id buffers (arange)"),
    ("text_pooler", r"^text_encoder\.pooler\.", "BERT pooler (unused by BLIP retrieval)"),
    ("contextblip_tmim", r"^(text_adapter|visual_decoder|decoder_pos_embed|recon_head|mask_embed)"
     r"(\.|$)", "ContextBLIP TMIM pre-training modules, when left out on request (tmim=False, "
     "--no-tmim); converted by default"),
    ("contextblip_mlm", r"^(prompt$|pred_head\.)", "ContextBLIP's MLM prompt branch "
     "(prompt_length > 0; off in the paper)"),
)
_IGNORED_RE = tuple((name, re.compile(rx)) for name, rx, _ in IGNORED_GROUPS)


def ignored_group(key: str) -> str | None:
  """The IGNORED_GROUPS name a canonical source key belongs to, or None."""
  for name, rx in _IGNORED_RE:
    if rx.search(key):
      return name
  return None


def _compile(pattern: str) -> re.Pattern:
  return re.compile("^" + re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


_TARGET_RE = tuple((_compile(r.target), r) for r in ALL_RULES)


def rule_for(path: str) -> tuple[Rule, dict[str, str]]:
  """The unique rule whose target pattern matches Flax `path`, and its captured indices."""
  hits = [(r, m.groupdict()) for rx, r in _TARGET_RE if (m := rx.match(path))]
  if len(hits) != 1:
    raise KeyError(f"{len(hits)} mapping rules match target parameter {path!r} "
                   f"(expected exactly one)")
  return hits[0]


def source_key(path: str, fmt: str) -> tuple[str | None, Rule]:
  """(source key in format `fmt` for Flax `path`, its rule); key None if `fmt` lacks it."""
  rule, groups = rule_for(path)
  template = rule.source(fmt)
  return (template.format(**groups) if template is not None else None), rule
