"""BLIP_Base (docs/method.md#itm-and-itc): ViT, text encoder, ITM head and ITC projections.

Parameters: `visual_encoder`, `text_encoder`, `itm_head`, `vision_proj`, `text_proj`, named as
in the original Salesforce checkpoint. Call the entry points with `method=`:

  out = model.apply({"params": p}, pixels, method=Blip.encode_image)       # VisionOutput
  feats = model.apply({"params": p}, ids, mask, method=Blip.text_features) # [B, E]
  logits = model.apply({"params": p}, ids, mask, image_embeds, method=Blip.itm)
  kv = model.apply({"params": p}, image_embeds, method=Blip.image_cross_kv)  # reuse per image
  logits = model.apply({"params": p}, ids, mask, kv, method=Blip.itm_cached)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from contextblip_jax.models import layers
from contextblip_jax.models.bert import BertModel, TextOutput
from contextblip_jax.models.variants import BlipConfig
from contextblip_jax.models.vit import VisionOutput, VisionTransformer

ENC_TOKEN_ID = 30523   # [ENC], replaces [CLS] at position 0 for ITM
DEC_TOKEN_ID = 30522   # [DEC]


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """torch.nn.functional.normalize(x, dim=-1) in float32."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def with_enc_token(input_ids: jax.Array) -> jax.Array:
  """[B, T] ids with column 0 set to [ENC] (docs/method.md#itm-and-itc)."""
  return input_ids.at[:, 0].set(ENC_TOKEN_ID)


class Blip(nn.Module):
  config: BlipConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.visual_encoder = VisionTransformer(c.vision, **kw)
    self.text_encoder = BertModel(c.text, **kw)
    # The heads compute in float32 whatever `dtype` is: ITM logits and ITC features are
    # logits (a tiny share of the FLOPs).
    head = dict(dtype=jnp.float32, param_dtype=self.param_dtype)
    self.itm_head = layers.Dense(2, axes=("embed", None), **head)
    self.vision_proj = layers.Dense(c.embed_dim, axes=("embed", None), **head)
    self.text_proj = layers.Dense(c.embed_dim, axes=("embed", None), **head)

  def __call__(self, pixels, input_ids, attention_mask, deterministic: bool = True):
    """Touches every parameter (for `init`); returns (itm logits [B, 2], itc sim [B, B])."""
    image_embeds = self.encode_image(pixels).last_hidden_state
    logits = self.itm(input_ids, attention_mask, image_embeds, deterministic=deterministic)
    sim = self.image_features(image_embeds) @ self.text_features(
        input_ids, attention_mask, deterministic).T
    return logits, sim

  def encode_image(self, pixels, return_taps: bool = False) -> VisionOutput:
    """[B, S, S, 3] normalised pixels -> VisionOutput (last_hidden_state [B, N, D])."""
    return self.visual_encoder(pixels, return_taps=return_taps)

  def image_features(self, image_embeds) -> jax.Array:
    """ITC image feature: normalize(vision_proj(image_embeds[:, 0])) -> [B, E] float32."""
    return l2_normalize(self.vision_proj(image_embeds[:, 0]))

  def text_features(self, input_ids, attention_mask, deterministic: bool = True) -> jax.Array:
    """ITC text feature from [CLS]-first ids, unimodal mode -> [B, E] float32."""
    h = self.text_encoder(input_ids, attention_mask, mode="text",
                          deterministic=deterministic).last_hidden_state
    return l2_normalize(self.text_proj(h[:, 0]))

  def multimodal(self, input_ids, attention_mask, image_embeds, image_mask=None,
                 deterministic: bool = True, return_cross_attentions: bool = False,
                 replace_with_enc: bool = True) -> TextOutput:
    """Multimodal text encoder; column 0 becomes [ENC] unless `replace_with_enc=False`."""
    ids = with_enc_token(input_ids) if replace_with_enc else input_ids
    return self.text_encoder(ids, attention_mask, image_embeds, image_mask, mode="multimodal",
                             deterministic=deterministic,
                             return_cross_attentions=return_cross_attentions)

  def itm_from_states(self, last_hidden_state) -> jax.Array:
    """ITM logits [B, 2] (float32; index 1 = match) from the multimodal states [B, T, D]."""
    return self.itm_head(last_hidden_state[:, 0])

  def itm(self, input_ids, attention_mask, image_embeds, image_mask=None,
          deterministic: bool = True, replace_with_enc: bool = True) -> jax.Array:
    """ITM logits [B, 2] for (text, image) pairs."""
    out = self.multimodal(input_ids, attention_mask, image_embeds, image_mask, deterministic,
                          replace_with_enc=replace_with_enc)
    return self.itm_from_states(out.last_hidden_state)

  def image_cross_kv(self, image_embeds):
    """Per-layer cross-attention (keys, values) [Bi, N, H, Dh] of image_embeds [Bi, N, D].

    They depend on the image only: compute them once per image and score any number of
    descriptions with `multimodal_cached` / `itm_cached`."""
    return self.text_encoder.cross_kv(image_embeds)

  def multimodal_cached(self, input_ids, attention_mask, cross_kv, image_mask=None,
                        deterministic: bool = True, return_cross_attentions: bool = False,
                        replace_with_enc: bool = True) -> TextOutput:
    """`multimodal` from `image_cross_kv` of Bi images; input_ids [Bi * r, T] image-major
    (rows i*r .. i*r + r - 1 pair with image i); image_mask [Bi, N] or None."""
    ids = with_enc_token(input_ids) if replace_with_enc else input_ids
    return self.text_encoder(ids, attention_mask, None, image_mask, mode="multimodal",
                             deterministic=deterministic,
                             return_cross_attentions=return_cross_attentions, cross_kv=cross_kv)

  def itm_cached(self, input_ids, attention_mask, cross_kv, image_mask=None,
                 deterministic: bool = True, replace_with_enc: bool = True) -> jax.Array:
    """ITM logits [Bi * r, 2] from cached image keys/values (see `multimodal_cached`)."""
    out = self.multimodal_cached(input_ids, attention_mask, cross_kv, image_mask, deterministic,
                                 replace_with_enc=replace_with_enc)
    return self.itm_from_states(out.last_hidden_state)
