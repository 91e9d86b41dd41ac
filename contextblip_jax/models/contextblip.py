"""ContextBLIP (docs/method.md): BLIP + multi-scale adapter, TMIM decoder, fine-tuning heads.

Parameters (top level, named as in the reference checkpoint):
  pretrained_blip     Blip (ViT, text encoder, itm_head, vision_proj, text_proj)
  vision_adapter      MultiScaleAdapter                  (only when `use_adapter`)
  text_adapter        TextAdapter (TMIM)
  visual_decoder      MaskDecoder, 4-layer BERT (TMIM)
  decoder_pos_embed   Embed(P + 1, D), N(0, 1) (TMIM)
  recon_head          Dense D -> p*p*3 (TMIM)
  mask_embed          [D], N(0, 1) (TMIM)
  prediction_layer    Dense D -> 1 (fine-tuning, stages 1 and 2)
  context_encoder     ContextEncoder (fine-tuning stage 2)

`init_params(model, rng, stage)` builds the tree of one stage (`PARAM_GROUPS`/`STAGE_GROUPS`).
Entry points for `model.apply(..., method=ContextBlip.X)`:
  encode_image / adapt / image_embeds      ViT with taps -> adapter -> [B, N, D]
  patchify / embed_visible / encode_visible  TMIM target and the visible-only ViT pass
  multimodal / itm_logits                  [ENC] text encoder (states, cross-attentions), ITM
  itc_image_features / itc_text_features   frozen ITC features (hard-negative sampling)
  reconstruct                              TMIM decoder prediction of the masked patches
  encode_candidates / candidate_states     IMAGECODE: vision once per set, text tiled K times
  candidate_scores                         evaluation scores [G, K] of a head (SCORE_HEADS)
  candidate_cross_kv / cached_candidate_scores  the same scores [G, D, K] for D descriptions
                                           per set, the image-side cross-attention keys/values
                                           computed once per set (evaluation, scoring command)
  head_scores                              [ENC] states [G, K, Dt] -> scores of a head
  match_probability                        ITM softmax[:, 1] of [ENC] states (zero-shot)
  stage1_logits / stage2_logits            fine-tuning heads [G, K]
Methods take `deterministic` explicitly and return their intermediates (ViT taps,
cross-attention probabilities) in the return value; the losses live in `objectives.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from contextblip_jax.models import layers, layout
from contextblip_jax.models.adapter import MultiScaleAdapter
from contextblip_jax.models.bert import TextOutput
from contextblip_jax.models.blip import Blip, l2_normalize
from contextblip_jax.models.context_encoder import ContextEncoder
from contextblip_jax.models.mask_decoder import (MaskDecoder, TextAdapter,
                                                 assemble_decoder_input, gather_tokens)
from contextblip_jax.models.variants import BlipConfig, TextConfig, get_variant
from contextblip_jax.models.vit import VisionOutput

# Masking options that model configs saved before version 0.2 carried; they belong to the
# objective now (ObjectiveConfig) and are dropped when such a config is read.
LEGACY_MASK_FIELDS = ("mask_ratio", "mask_token_choice", "random_mask", "mask_noise")


@dataclasses.dataclass(frozen=True)
class ContextBlipConfig:
  """Hashable configuration of the whole method (static under `jax.jit`)."""
  blip: BlipConfig = BlipConfig()      # backbone sizes (models/variants.py)
  use_adapter: bool = True             # False = plain BLIP embeddings (zero-shot BLIP)
  adapter_taps: tuple[int, ...] = (3, 6, 9, 12)  # 1-based ViT blocks fed to the adapter
  adapter_reduction: int = 2           # delta of the vision adapter (docs/decisions.md item 1)
  text_adapter_reduction: int = 2      # reduction of the TMIM text adapter
  decoder_layers: int = 4              # TMIM decoder depth
  decoder_heads: int = 8               # TMIM decoder heads (must divide the vision width)
  use_tmim: bool = True                # the TMIM modules exist (decoder, mask token, ...);
                                       # how patches are masked is the objective's business
                                       # (training/objectives.py ObjectiveConfig)
  reference_patch_layout: bool = False  # True: the released code's (c,ph,pw) patch scramble
  context_layers: int = 2              # inter-context encoder depth
  context_heads: int = 8               # inter-context encoder heads
  num_candidates: int = 10             # K images per IMAGECODE set

  def __post_init__(self):
    v, t = self.blip.vision, self.blip.text
    if self.use_adapter and (not self.adapter_taps or max(self.adapter_taps) > v.depth
                             or min(self.adapter_taps) < 1):
      raise ValueError(f"adapter_taps {self.adapter_taps} must lie in 1..{v.depth} (ViT depth)")
    if v.width % self.decoder_heads or t.hidden_size % self.context_heads:
      raise ValueError(f"decoder_heads {self.decoder_heads} must divide {v.width} and "
                       f"context_heads {self.context_heads} must divide {t.hidden_size}")
    if v.width != t.encoder_width:
      raise ValueError("the text encoder's encoder_width must equal the ViT width")
    object.__setattr__(self, "adapter_taps", tuple(self.adapter_taps))

  @property
  def num_patches(self) -> int:
    return self.blip.vision.num_patches

  @property
  def decoder_config(self) -> TextConfig:
    t, v = self.blip.text, self.blip.vision
    return dataclasses.replace(t, hidden_size=v.width, num_layers=self.decoder_layers,
                               num_heads=self.decoder_heads, encoder_width=t.hidden_size,
                               add_cross_attention=True)

  @property
  def context_config(self) -> TextConfig:
    return dataclasses.replace(self.blip.text, num_layers=self.context_layers,
                               num_heads=self.context_heads, add_cross_attention=False)

  def replace(self, **kw) -> "ContextBlipConfig":
    return dataclasses.replace(self, **kw)

  @property
  def scan_layers(self) -> bool:
    """The parameter layout of every block stack (ViT, text, decoder, context encoder): the
    `scan_layers` of `blip` (models/layout.py); the TMIM decoder and context encoder follow
    the text encoder's `scan_layers` and `remat`."""
    return self.blip.scan_layers

  def with_layers(self, scan_layers: bool | None = None, remat: str | None = None
                  ) -> "ContextBlipConfig":
    """This config with every stack's `scan_layers` / `remat` set (None keeps)."""
    return self.replace(blip=self.blip.with_layers(scan_layers, remat))

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["adapter_taps"] = list(self.adapter_taps)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ContextBlipConfig":
    """Inverse of `to_dict`; also reads dicts saved by older versions (masking options
    dropped, a saved mask_ratio of 0 meaning no TMIM modules)."""
    d = dict(d)
    legacy = {k: d.pop(k) for k in LEGACY_MASK_FIELDS if k in d}
    if "use_tmim" not in d and legacy.get("mask_ratio", 1) == 0:
      d["use_tmim"] = False
    known = {f.name for f in dataclasses.fields(cls)}
    if set(d) - known:
      raise ValueError(f"Unknown ContextBlipConfig keys: {sorted(set(d) - known)}")
    if "blip" in d:
      d["blip"] = BlipConfig.from_dict(d["blip"])
    if "adapter_taps" in d:
      d["adapter_taps"] = tuple(d["adapter_taps"])
    return cls(**d)

  @classmethod
  def for_variant(cls, name: str, image_size: int | None = None, **overrides):
    """`B/16` = the paper's sizes; `tiny` taps every block and uses 4 decoder/context heads."""
    blip = get_variant(name, image_size)
    kw: dict[str, Any] = {}
    if name == "tiny":
      kw = dict(adapter_taps=tuple(range(1, blip.vision.depth + 1)), decoder_heads=4,
                context_heads=4, decoder_layers=2)
    kw.update(overrides)
    return cls(blip=blip, **kw)


def _check_head(head: str, is_video) -> None:
  """Raises ValueError for an unknown score head or 'stage2' without is_video."""
  if head not in ContextBlip.SCORE_HEADS:
    raise ValueError(f"unknown head {head!r}; known: {ContextBlip.SCORE_HEADS}")
  if head == "stage2" and is_video is None:
    raise ValueError("head='stage2' needs is_video [G]")


def scramble_like_reference(patches: jax.Array, patch_size: int) -> jax.Array:
  """The released code's layout bug (docs/decisions.md item 7), as a permutation of the inputs.

  The reference views each (ph, pw, c)-flattened patch as (c, ph, pw) before the conv, so the
  conv sees `v.reshape(3, p, p)`. Returned in the (ph, pw, c) order the ViT's kernel expects:
  `embed(scramble(v)) == v @ W_conv.reshape(D, 3*p*p).T + b` (W_conv flattened (c, kh, kw)).
  """
  lead = patches.shape[:-1]
  x = patches.reshape(lead + (3, patch_size, patch_size))
  return jnp.moveaxis(x, -3, -1).reshape(lead + (3 * patch_size * patch_size,))


class ContextBlip(nn.Module):
  config: ContextBlipConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    v, t = c.blip.vision, c.blip.text
    self.pretrained_blip = Blip(c.blip, **kw)
    if c.use_adapter:
      self.vision_adapter = MultiScaleAdapter(v.width, c.adapter_taps, c.adapter_reduction, **kw)
    # --- TMIM (pre-training) ---
    self.text_adapter = TextAdapter(t.hidden_size, c.text_adapter_reduction, **kw)
    self.visual_decoder = MaskDecoder(c.decoder_config, **kw)
    self.decoder_pos_embed = nn.Embed(
        v.num_patches + 1, v.width,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                    (None, "embed")), **kw)
    self.recon_head = layers.Dense(
        v.patch_size * v.patch_size * 3, axes=("embed", None),
        kernel_init=layers.torch_linear_init(), bias_init=layers.torch_bias_init(v.width), **kw)
    # A setup() param is created eagerly: only when initialising or present (stage trees
    # without the TMIM group apply without it).
    if self.is_initializing() or self.has_variable("params", "mask_embed"):
      self.mask_embed = self.param(
          "mask_embed", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("embed",)),
          (v.width,), self.param_dtype)
    # --- fine-tuning ---
    self.prediction_layer = layers.Dense(     # logits: float32 whatever `dtype` is
        1, axes=("embed", None), kernel_init=layers.torch_linear_init(),
        bias_init=layers.torch_bias_init(t.hidden_size), dtype=jnp.float32,
        param_dtype=self.param_dtype)
    self.context_encoder = ContextEncoder(c.context_config, c.num_candidates, **kw)

  # ------------------------------------------------------------------ vision
  def encode_image(self, pixels: jax.Array) -> VisionOutput:
    """[B, S, S, 3] -> ViT VisionOutput (last_hidden_state [B, N, D] and all block taps)."""
    return self.pretrained_blip.encode_image(pixels, return_taps=True)

  def adapt(self, vision: VisionOutput) -> jax.Array:
    """Adapter on a VisionOutput: LN_f(x_L) + Y -> [B, N, D] (identity without adapter)."""
    if not self.config.use_adapter:
      return vision.last_hidden_state
    return self.vision_adapter(vision.last_hidden_state, vision.taps)

  def image_embeds(self, pixels: jax.Array) -> jax.Array:
    """Adapted image embeddings [B, N, D] (ViT with taps -> adapter)."""
    return self.adapt(self.encode_image(pixels))

  def patchify(self, pixels: jax.Array) -> jax.Array:
    """[B, S, S, 3] -> [B, P, p*p*3] normalised pixels, (ph, pw, c) order (the TMIM target)."""
    return self.pretrained_blip.visual_encoder.patchify(pixels)

  def embed_visible(self, pixels: jax.Array, visible_idx: jax.Array) -> jax.Array:
    """Tokens of the visible patches only: [CLS ; patches at visible_idx] -> [B, 1 + V, D].

    Correct layout by default (each patch embedded exactly as the full ViT embeds it); with
    `reference_patch_layout` the released code's pixel scramble (docs/decisions.md item 7).
    """
    vit = self.pretrained_blip.visual_encoder
    vis = gather_tokens(vit.patchify(pixels), visible_idx)            # [B, V, p*p*3]
    if self.config.reference_patch_layout:
      vis = scramble_like_reference(vis, self.config.blip.vision.patch_size)
    return vit.embed_patches(vis, visible_idx)

  def encode_visible(self, pixels: jax.Array, visible_idx: jax.Array) -> VisionOutput:
    """MAE-style visible-only ViT pass with taps -> VisionOutput over [B, 1 + V, D]."""
    tokens = self.embed_visible(pixels, visible_idx)
    return self.pretrained_blip.visual_encoder.encode(tokens, return_taps=True)

  # ------------------------------------------------------------------ text / ITM / ITC
  def multimodal(self, input_ids, attention_mask, image_embeds, deterministic: bool = True,
                 return_cross_attentions: bool = False) -> TextOutput:
    """[ENC]-first multimodal text encoder -> TextOutput (states [B, T, Dt], cross-attn)."""
    return self.pretrained_blip.multimodal(input_ids, attention_mask, image_embeds,
                                           deterministic=deterministic,
                                           return_cross_attentions=return_cross_attentions)

  def itm_logits(self, states: jax.Array) -> jax.Array:
    """ITM logits [B, 2] (index 1 = match) from multimodal states [B, T, Dt]."""
    return self.pretrained_blip.itm_from_states(states)

  def itc_image_features(self, image_embeds: jax.Array) -> jax.Array:
    """normalize(vision_proj(image_embeds[:, 0])) -> [B, E] float32."""
    return self.pretrained_blip.image_features(image_embeds)

  def itc_text_features(self, input_ids, attention_mask, deterministic: bool = True):
    """normalize(text_proj(text encoder, mode='text', [CLS] ids)[:, 0]) -> [B, E] float32."""
    return self.pretrained_blip.text_features(input_ids, attention_mask, deterministic)

  # ------------------------------------------------------------------ TMIM
  def reconstruct(self, visible_embeds, text_states, text_mask, visible_idx, masked_idx,
                  deterministic: bool = True) -> jax.Array:
    """Decoder prediction of the masked patches.

    Args:
      visible_embeds: [B, 1 + V, D] adapter output of the visible-only pass (CLS first).
      text_states: [B, T, Dt] positive ITM states H (the decoder reads H + TextAdapter(H)).
      text_mask: [B, T]; visible_idx [B, V], masked_idx [B, M] 0-based patch indices.
    Returns:
      [B, M, p*p*3] predicted normalised pixels, (ph, pw, c) order.
    """
    text = text_states + self.text_adapter(text_states)
    masked = self.mask_embed.astype(self.dtype) + self.decoder_pos_embed(masked_idx)
    tokens = assemble_decoder_input(visible_embeds[:, 0], visible_embeds[:, 1:], masked,
                                    visible_idx, masked_idx)            # [B, 1 + P, D]
    out = self.visual_decoder(tokens, text, text_mask, deterministic).last_hidden_state
    return self.recon_head(gather_tokens(out, 1 + masked_idx))

  # ------------------------------------------------------------------ candidates (IMAGECODE)
  SCORE_HEADS = ("zero_shot", "stage1", "stage2")   # `candidate_scores` heads (not a field)

  def encode_candidates(self, images: jax.Array) -> jax.Array:
    """images [G, K, S, S, 3] -> adapted image embeddings [G, K, N, D]."""
    g, k = images.shape[:2]
    embeds = self.image_embeds(images.reshape((g * k,) + images.shape[2:]))
    return embeds.reshape((g, k) + embeds.shape[1:])

  def candidate_states(self, embeds, input_ids, attention_mask,
                       deterministic: bool = True) -> jax.Array:
    """embeds [G, K, N, D]; one text per set [G, T], tiled K times -> [ENC] states [G, K, Dt]."""
    g, k = embeds.shape[:2]
    out = self.multimodal(jnp.repeat(input_ids, k, axis=0),
                          jnp.repeat(attention_mask, k, axis=0),
                          embeds.reshape((g * k,) + embeds.shape[2:]), deterministic)
    return out.last_hidden_state[:, 0].reshape(g, k, -1)

  def match_probability(self, states: jax.Array) -> jax.Array:
    """Zero-shot score: ITM softmax[..., 1] of unnormalised [ENC] states [..., Dt] -> [...]."""
    logits = self.itm_logits(states.reshape((-1, 1, states.shape[-1])))
    return jax.nn.softmax(logits, axis=-1)[:, 1].reshape(states.shape[:-1])

  def candidate_scores(self, embeds, input_ids, attention_mask, head: str = "zero_shot",
                       is_video: jax.Array | None = None) -> jax.Array:
    """Evaluation scores [G, K] of each set's K candidates (argmax over K = the prediction).

    Args:
      embeds: [G, K, N, D] `encode_candidates` output (vision once per set, reusable).
      input_ids, attention_mask: [G, T], one text per row, tiled over its K candidates.
      head: static, one of SCORE_HEADS: 'zero_shot' ITM softmax[..., 1] of the unnormalised
        [ENC] states; 'stage1' / 'stage2' the fine-tuned logits of the L2-normalised states.
      is_video: [G] bool, 'stage2' only (the context encoder's positions).
    """
    _check_head(head, is_video)
    states = self.candidate_states(embeds, input_ids, attention_mask)   # [G, K, Dt]
    return self.head_scores(states, head, is_video)

  def head_scores(self, states: jax.Array, head: str = "zero_shot",
                  is_video: jax.Array | None = None) -> jax.Array:
    """[ENC] states [G, K, Dt] of G description rows -> scores [G, K] of `head` (see
    `candidate_scores`; is_video [G] for 'stage2')."""
    _check_head(head, is_video)
    if head == "zero_shot":
      return self.match_probability(states)
    feat = l2_normalize(states)
    if head == "stage1":
      return self.stage1_logits(feat)
    return self.stage2_logits(feat, is_video)

  def candidate_cross_kv(self, embeds: jax.Array) -> tuple[tuple[jax.Array, jax.Array], ...]:
    """embeds [G, K, N, D] -> the image-side cross-attention (keys, values) of every text
    layer, each [G * K, N, H, Dh] (row g * K + k = candidate k of set g).

    They depend on the image only: computed once per set, they serve all its descriptions
    (`cached_candidate_scores`); per description only the text pass remains."""
    g, k = embeds.shape[:2]
    return self.pretrained_blip.image_cross_kv(embeds.reshape((g * k,) + embeds.shape[2:]))

  def cached_candidate_states(self, cross_kv, input_ids, attention_mask) -> jax.Array:
    """`candidate_cross_kv` of G sets; input_ids / attention_mask [G, D, T] (D descriptions
    per set) -> [ENC] states [G, D, K, Dt], equal to `candidate_states` of each description.

    The text rows are laid out image-major (set g, candidate k, description d), so each
    candidate's keys/values are read once for its D descriptions (`Blip.multimodal_cached`
    folds the D rows into the query length), never copied per description."""
    g, d, t = input_ids.shape
    k = cross_kv[0][0].shape[0] // g
    rows = lambda x: jnp.broadcast_to(x[:, None], (g, k, d, t)).reshape(g * k * d, t)
    out = self.pretrained_blip.multimodal_cached(rows(input_ids), rows(attention_mask),
                                                 cross_kv)
    states = out.last_hidden_state[:, 0].reshape(g, k, d, -1)
    return states.transpose(0, 2, 1, 3)

  def cached_candidate_scores(self, cross_kv, input_ids, attention_mask,
                              head: str = "zero_shot", is_video: jax.Array | None = None
                              ) -> jax.Array:
    """Scores [G, D, K] of D descriptions per set from the sets' `candidate_cross_kv`:
    `candidate_scores` of every (set, description) pair, with the vision features and the
    image-side keys/values computed once per set (the evaluation loop's and the scoring
    command's path).

    Args:
      cross_kv: `candidate_cross_kv(embeds [G, K, N, D])`.
      input_ids, attention_mask: [G, D, T].
      head: static, one of SCORE_HEADS; is_video [G] ('stage2' only, one value per set).
    """
    _check_head(head, is_video)
    g, d = input_ids.shape[:2]
    states = self.cached_candidate_states(cross_kv, input_ids, attention_mask)  # [G,D,K,Dt]
    flat_video = None if is_video is None else jnp.repeat(is_video, d, axis=0)
    scores = self.head_scores(states.reshape((g * d,) + states.shape[2:]), head, flat_video)
    return scores.reshape(g, d, -1)

  # ------------------------------------------------------------------ fine-tuning heads
  def stage1_logits(self, feat: jax.Array) -> jax.Array:
    """feat [G, K, Dt] (L2-normalised [ENC] states) -> logits [G, K] float32."""
    return self.prediction_layer(feat)[..., 0].astype(jnp.float32)

  def stage2_logits(self, feat: jax.Array, is_video: jax.Array,
                    deterministic: bool = True) -> jax.Array:
    """feat [G, K, Dt]; is_video [G] -> context encoder -> + feat -> head -> [G, K] float32."""
    x = self.context_encoder(feat, is_video, deterministic)
    return self.prediction_layer(x)[..., 0].astype(jnp.float32)

  # ------------------------------------------------------------------ init
  def __call__(self, pixels, input_ids, attention_mask, deterministic: bool = True):
    """Touches every parameter once (used by `init_params`); returns a dict of outputs.

    The cheapest graph that reaches every parameter: one ViT pass, one unimodal and one
    multimodal text pass, the decoder on (a prefix of) the adapted tokens, both heads.
    """
    c = self.config
    vision = self.encode_image(pixels)
    embeds = self.adapt(vision)
    sim = self.itc_image_features(vision.last_hidden_state) @ self.itc_text_features(
        input_ids, attention_mask, deterministic).T
    states = self.multimodal(input_ids, attention_mask, embeds, deterministic).last_hidden_state
    b, p = pixels.shape[0], c.num_patches
    order = jnp.broadcast_to(jnp.arange(p), (b, p))
    m = max(1, p // 4)
    recon = self.reconstruct(embeds[:, :1 + p - m], states, attention_mask, order[:, m:],
                             order[:, :m], deterministic)
    feat = jnp.broadcast_to(l2_normalize(states[:, 0])[:, None],
                            (b, c.num_candidates, states.shape[-1]))
    return dict(itc_sim=sim, itm=self.itm_logits(states), recon=recon,
                stage1=self.stage1_logits(feat),
                stage2=self.stage2_logits(feat, jnp.ones((b,)), deterministic))


# Top-level parameter groups, and which groups each stage's tree holds.
PARAM_GROUPS: dict[str, tuple[str, ...]] = {
    "blip": ("pretrained_blip",),
    "adapter": ("vision_adapter",),
    "tmim": ("text_adapter", "visual_decoder", "decoder_pos_embed", "recon_head", "mask_embed"),
    "head": ("prediction_layer",),
    "context": ("context_encoder",),
}
STAGE_GROUPS: dict[str, tuple[str, ...]] = {
    "backbone": ("blip",),                       # BLIP from scratch (objectives.backbone_loss)
    "pretrain": ("blip", "adapter", "tmim"),     # tmim left out without use_tmim
    "zero_shot": ("blip", "adapter"),
    "finetune": ("blip", "adapter", "head", "context"),   # stages 1 and 2
    "all": tuple(PARAM_GROUPS),
}


def stage_param_names(config: ContextBlipConfig, stage: str) -> tuple[str, ...]:
  """Top-level parameter names of a stage's tree."""
  if stage not in STAGE_GROUPS:
    raise ValueError(f"unknown stage {stage!r}; known: {sorted(STAGE_GROUPS)}")
  groups = [g for g in STAGE_GROUPS[stage]
            if not (g == "tmim" and not config.use_tmim)
            and not (g == "adapter" and not config.use_adapter)]
  return tuple(n for g in groups for n in PARAM_GROUPS[g])


def init_params(model: ContextBlip, rng: jax.Array, stage: str = "all",
                batch_size: int = 1, text_length: int = 8) -> dict[str, Any]:
  """Boxed (nn.Partitioned) parameter tree of one stage, e.g. under `jax.eval_shape`.

  Unused groups are dropped from the full init; under `jit` XLA never computes them.
  A scanned model gets the unscanned model's initial values, stacked (`layout.to_layout`):
  the same parameters in both layouts for the same `rng`.
  """
  if model.config.scan_layers:
    unscanned = model.clone(config=model.config.with_layers(scan_layers=False))
    return layout.to_layout(init_params(unscanned, rng, stage, batch_size, text_length), True)
  names = stage_param_names(model.config, stage)
  s = model.config.blip.vision.image_size
  pixels = jnp.zeros((batch_size, s, s, 3), jnp.float32)
  ids = jnp.ones((batch_size, text_length), jnp.int32)
  params = model.init(rng, pixels, ids, ids)["params"]
  return {k: params[k] for k in names if k in params}


def make_model(config: ContextBlipConfig, compute_dtype: str = "float32",
               attention_impl: str = "explicit") -> ContextBlip:
  """The model a caller runs: `ContextBlip(config, dtype=...)` with the attention kernel set.

  The training stages and the evaluation modes get here through `run/model_config.py:
  build_model` (config.model.compute_dtype / attention_impl), the scoring command through its
  --dtype / --attention-impl flags. Neither option is part of the parameters: parameters and
  optimizer state stay float32 (`param_dtype`), and with 'bfloat16' activations and matmul
  inputs are bfloat16 while LayerNorm statistics, softmaxes, logits and losses stay float32.

  Args:
    compute_dtype: 'float32' | 'bfloat16' (models/layers.py COMPUTE_DTYPES).
    attention_impl: the attention that needs no probabilities (models/layers.py):
      'explicit' (float32 softmax written out; the project's reference numerics), or
      `jax.nn.dot_product_attention` with 'xla' (any backend) | 'cudnn' (NVIDIA GPU and
      bfloat16 only).
  """
  dtype = layers.compute_dtype(compute_dtype)
  layers.check_attention_impl(attention_impl)
  if attention_impl == "cudnn":
    if dtype != jnp.bfloat16:
      raise ValueError("attention_impl 'cudnn' needs compute_dtype 'bfloat16' (cuDNN flash "
                       "attention has no float32 kernel)")
    if jax.default_backend() != "gpu":
      raise ValueError(f"attention_impl 'cudnn' needs an NVIDIA GPU; the backend is "
                       f"{jax.default_backend()!r} (use 'xla')")
  config = config.replace(blip=config.blip.with_attention(attention_impl))
  return ContextBlip(config, dtype=dtype)
