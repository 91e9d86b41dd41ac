"""Multi-scale adapter (docs/method.md#adapter): DPAL per ViT tap, concatenation, one shared UPAL.

  taps = [LN_f(x_l) for l in taps_1based]                     # each [B, N, D]
  z    = concat([relu(t @ Wd_l) for t, Wd_l in ...], -1)       # [B, N, len(taps) * D / delta]
  out  = LN_f(x_depth) + relu(z @ Wu)                           # [B, N, D]

Bias-free, trailing ReLU on the up-projection, no zero-init (PyTorch default uniform init), no
dropout. Names mirror the checkpoint: `down_{i}` (`vision_adapter.down.{i}.fc.0`) and `up`
(`vision_adapter.up.fc.0`).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from contextblip_jax.models import layers


class MultiScaleAdapter(nn.Module):
  width: int = 768                        # ViT width D
  taps: Sequence[int] = (3, 6, 9, 12)     # 1-based ViT blocks tapped (after the final LN)
  reduction: int = 2                      # delta: each DPAL maps D -> D // delta
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    kw = dict(use_bias=False, kernel_init=layers.torch_linear_init(), dtype=self.dtype,
              param_dtype=self.param_dtype)
    self.down = [layers.Dense(self.width // self.reduction, axes=("embed", "mlp"), **kw)
                 for _ in self.taps]
    self.up = layers.Dense(self.width, axes=("mlp", "embed"), **kw)

  def __call__(self, final: jax.Array, taps: Sequence[jax.Array]) -> jax.Array:
    """final [B, N, D] = LN_f(x_depth); taps: all per-block LN_f outputs -> [B, N, D]."""
    if len(taps) < max(self.taps):
      raise ValueError(f"adapter taps {tuple(self.taps)} need {max(self.taps)} ViT blocks, "
                       f"got {len(taps)}")
    z = jnp.concatenate([nn.relu(d(taps[l - 1])) for d, l in zip(self.down, self.taps)], -1)
    return final + nn.relu(self.up(z))
