"""TMIM pieces (docs/method.md#tmim): text adapter, the 4-layer BERT mask decoder, input assembly.

  text_embeds = H + TextAdapter(H)                 # H: positive ITM states [B, T, Dt]
  tokens      = [CLS_enc ; patches 0..P-1]         # [B, 1 + P, D], raster order, where patch i is
                enc_visible (adapter output)  if i is visible
                mask_embed + decoder_pos_embed[i]  if i is masked
  out         = MaskDecoder(tokens, text_embeds, text_mask)   # bidirectional self-attention,
                                                              # cross-attention to the text

Names mirror the reference checkpoint: `text_adapter.fc.{0,2}` -> `text_adapter/fc_{0,2}` and
`visual_decoder.encoder.layer.{i}` -> `visual_decoder/encoder/layer_{i}` (the decoder's
embeddings are deleted in the reference, so there are none here); in the scanned layout
(`TextConfig.scan_layers`, models/layout.py) one `visual_decoder/encoder/layer` with [L, ...].
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from contextblip_jax.models import layers
from contextblip_jax.models.bert import BertEncoder, TextOutput
from contextblip_jax.models.variants import TextConfig


class TextAdapter(nn.Module):
  """`ReLU(Linear(D/r -> D)(ReLU(Linear(D -> D/r)(x))))`, bias-free, PyTorch default init.

  Returns only the adapter branch; the caller adds the residual (`H + TextAdapter(H)`).
  """
  width: int
  reduction: int = 2
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    kw = dict(use_bias=False, kernel_init=layers.torch_linear_init(), dtype=self.dtype,
              param_dtype=self.param_dtype)
    self.fc_0 = layers.Dense(self.width // self.reduction, axes=("embed", "mlp"), **kw)
    self.fc_2 = layers.Dense(self.width, axes=("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.relu(self.fc_2(nn.relu(self.fc_0(x))))


class MaskDecoder(nn.Module):
  """The visual decoder: `med.BertModel` called with `encoder_embeds` (no embeddings, no input
  LayerNorm), all-ones self-attention mask, cross-attention to the adapted text."""
  config: TextConfig          # hidden = vision width, encoder_width = text width
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.encoder = BertEncoder(self.config, self.dtype, self.param_dtype)

  def __call__(self, tokens, text_states, text_mask, deterministic: bool = True) -> TextOutput:
    """tokens [B, 1 + P, D]; text_states [B, T, Dt]; text_mask [B, T] -> states [B, 1 + P, D]."""
    return self.encoder(tokens, attention_mask=None, encoder_states=text_states,
                        encoder_mask=text_mask, deterministic=deterministic)


def gather_tokens(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x [B, N, ...], idx [B, M] int -> x[b, idx[b]] of shape [B, M, ...]."""
  idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


def assemble_decoder_input(cls_token: jax.Array, visible: jax.Array, masked: jax.Array,
                           visible_idx: jax.Array, masked_idx: jax.Array) -> jax.Array:
  """Scatters tokens back into raster order: CLS at 0, patch i at 1 + i.

  Equal to the reference's `argsort([masked_idx ; -1 ; unmasked_idx])` re-ordering of
  `[masked ; CLS ; visible]`, written as a scatter.

  Args:
    cls_token: [B, D]; visible: [B, V, D]; masked: [B, M, D];
    visible_idx: [B, V], masked_idx: [B, M] 0-based patch indices, together a permutation of
      0..P-1 per row (P = V + M).
  Returns:
    [B, 1 + P, D].
  """
  b, v, d = visible.shape
  m = masked.shape[1]
  out = jnp.zeros((b, 1 + v + m, d), visible.dtype)
  rows = jnp.arange(b)[:, None]
  out = out.at[:, 0].set(cls_token.astype(visible.dtype))
  out = out.at[rows, 1 + visible_idx].set(visible)
  out = out.at[rows, 1 + masked_idx].set(masked.astype(visible.dtype))
  return out
