"""Inter-context encoder of fine-tuning stage 2 (docs/method.md#stage-2).

  x0   = feat + positional_emb(arange(K)) * pos_mask     # pos_mask 1 = video set, 0 = static
  out  = transformer_1(transformer_0(x0)) + feat          # residual to the un-positioned feat

`feat` [G, K, D] are the L2-normalised stage-1 [ENC] features of the K = 10 candidates. Two
post-LN BERT layers without cross-attention (8 heads, GELU, dropout 0.1, LayerNorm eps 1e-12),
PyTorch default `nn.Linear` init; the positional table is `nn.Embedding(K, D)`, N(0, 1).
The reference passes an additive attention "mask" of ones (a constant +1 on every score, which
softmax ignores), so no mask is applied here.

Names mirror the reference checkpoint: `transformer.{i}` -> `transformer_{i}`,
`positional_emb.weight` -> `positional_emb/embedding` (scanned layout, `TextConfig.scan_layers`:
one `transformer` subtree with leaves [L, ...], models/layout.py).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from contextblip_jax.models.bert import bert_layers, run_layers
from contextblip_jax.models.variants import TextConfig


class ContextEncoder(nn.Module):
  config: TextConfig           # hidden = text width, num_layers/num_heads of the encoder
  num_positions: int = 10      # K candidates per set
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    c = self.config
    self.transformer = bert_layers(c, c.num_layers, False, "torch", self.dtype,
                                   self.param_dtype)
    self.positional_emb = nn.Embed(
        self.num_positions, c.hidden_size,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                    (None, "embed")),
        dtype=self.dtype, param_dtype=self.param_dtype)

  def __call__(self, feat: jax.Array, pos_mask: jax.Array, deterministic: bool = True):
    """feat [G, K, D]; pos_mask [G] or [G, K] (1 = add positions) -> [G, K, D] float32."""
    g, k, _ = feat.shape
    if k > self.num_positions:
      raise ValueError(f"{k} candidates exceed the {self.num_positions} context positions")
    pos_mask = jnp.asarray(pos_mask, self.dtype)
    if pos_mask.ndim == 1:
      pos_mask = jnp.broadcast_to(pos_mask[:, None], (g, k))
    x = feat.astype(self.dtype) + self.positional_emb(jnp.arange(k))[None] * pos_mask[..., None]
    x, _ = run_layers(self.transformer, x, deterministic=deterministic)
    return x.astype(jnp.float32) + feat.astype(jnp.float32)   # residual in float32
