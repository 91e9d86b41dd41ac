"""Shared building blocks: partitioned Dense/LayerNorm, attention, initialisers.

Every parameter carries logical axis names (see `contextblip_jax/parallel/sharding.py` for the rules that
map them to mesh axes). LayerNorm statistics and softmax run in float32 whatever `dtype` is.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]

# BERT / HF `_init_weights`: normal(0.02), zero bias, LayerNorm 1/0.
bert_init = nn.initializers.normal(stddev=0.02)
# timm ViT: truncated normal(0.02) for Linear weights.
vit_init = nn.initializers.truncated_normal(stddev=0.02)


def torch_linear_init() -> Initializer:
  """PyTorch's default `nn.Linear` weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

  (kaiming_uniform with a=sqrt(5) reduces to this bound.) For a Flax kernel [in, out].
  """
  def init(key, shape, dtype=jnp.float32):
    fan_in = shape[0]
    bound = 1.0 / jnp.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def torch_bias_init(fan_in: int) -> Initializer:
  """PyTorch's default `nn.Linear` bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  def init(key, shape, dtype=jnp.float32):
    bound = 1.0 / jnp.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Logical sharding constraint on an activation (a no-op outside a mesh with rules)."""
  return nn.with_logical_constraint(x, tuple(names))


class Dense(nn.Module):
  """`nn.Dense` with logical axis names on kernel `[in, out]` and bias `[out]`."""
  features: int
  axes: tuple[str | None, str | None] = ("embed", "mlp")
  use_bias: bool = True
  kernel_init: Initializer = bert_init
  bias_init: Initializer = nn.initializers.zeros
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                        (x.shape[-1], self.features), self.param_dtype)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(self.bias_init, (self.axes[1],)),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class LayerNorm(nn.Module):
  """LayerNorm with float32 statistics; parameters `scale`/`bias` with logical axis `norm`."""
  eps: float
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (d,), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                      (d,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None = None,
              *, dropout: Callable[[jax.Array], jax.Array] | None = None,
              dtype: jnp.dtype = jnp.float32) -> tuple[jax.Array, jax.Array]:
  """Scaled dot-product attention with float32 softmax.

  Args:
    q: [B, Lq, H, Dh]; k, v: [B, Lk, H, Dh].
    bias: additive mask broadcastable to [B, H, Lq, Lk] (0 keeps, large negative drops).
    dropout: applied to the probabilities (after they are returned), as BERT does.
  Returns:
    (context [B, Lq, H, Dh], probabilities [B, H, Lq, Lk] float32, before dropout).
  """
  scale = q.shape[-1] ** -0.5
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    scores = scores + bias.astype(jnp.float32)
  probs = jax.nn.softmax(scores, axis=-1)
  used = dropout(probs) if dropout is not None else probs
  ctx = jnp.einsum("bhqk,bkhd->bqhd", used.astype(dtype), v.astype(dtype))
  return ctx, probs


def padding_bias(mask: jax.Array, value: float) -> jax.Array:
  """[B, Lk] 1/0 mask -> additive bias [B, 1, 1, Lk] with `value` on the 0 entries."""
  return ((1.0 - mask.astype(jnp.float32)) * value)[:, None, None, :]
