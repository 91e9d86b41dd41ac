"""Shared building blocks: partitioned Dense/LayerNorm, attention, initialisers.

Every parameter carries logical axis names (see `contextblip_jax/parallel/sharding.py` for the rules that
map them to mesh axes). LayerNorm statistics and softmax run in float32 whatever `dtype` is.

Precision: every module has `dtype` (compute: activations and matmul inputs, the names of
COMPUTE_DTYPES) and `param_dtype` (storage, float32). Matmuls take their inputs in `dtype`;
LayerNorm statistics, attention scores and softmax, the model's logits and every loss are
float32 whatever `dtype` is.

Attention has two paths with the same math: `attention` (explicit float32 softmax; returns the
probabilities, applies dropout to them) and `fused_attention` (`jax.nn.dot_product_attention`,
context only, no dropout). ATTENTION_IMPLS names the choice of the attention that needs no
probabilities: 'explicit' (`attention`, the default: the numerics every figure of the project
was measured with), 'xla' (`fused_attention` through XLA, any backend) or 'cudnn' (cuDNN flash
attention; NVIDIA GPUs with bfloat16 compute). On CPU in float32 'xla' matches 'explicit' to
rounding (the last bits of a loss differ), not bit for bit.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]

# config name -> compute dtype (`model.compute_dtype`); parameters are always float32.
COMPUTE_DTYPES: dict[str, jnp.dtype] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# `model.attention_impl`: 'explicit' (float32 softmax written out) or a
# `jax.nn.dot_product_attention(implementation=...)` value.
ATTENTION_IMPLS = ("explicit", "xla", "cudnn")
FUSED_IMPLS = ("xla", "cudnn")


def compute_dtype(name: str) -> jnp.dtype:
  """'float32' | 'bfloat16' -> the jnp dtype (ValueError naming the choices otherwise)."""
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"unknown compute dtype {name!r}; known: {sorted(COMPUTE_DTYPES)}")
  return COMPUTE_DTYPES[name]


def check_attention_impl(name: str) -> str:
  if name not in ATTENTION_IMPLS:
    raise ValueError(f"unknown attention implementation {name!r}; known: {ATTENTION_IMPLS}")
  return name


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


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None = None,
                    *, implementation: str = "xla", dtype: jnp.dtype = jnp.float32
                    ) -> jax.Array:
  """`attention` through `jax.nn.dot_product_attention`: the context only (no probabilities,
  no dropout). Scores and softmax are float32 inside it for every implementation.

  Args:
    q: [B, Lq, H, Dh]; k, v: [B, Lk, H, Dh] (cast to `dtype`).
    bias: additive mask broadcastable to [B, H, Lq, Lk], as for `attention`.
    implementation: 'xla' or 'cudnn' (FUSED_IMPLS). cuDNN wants the bias in the compute
      dtype with its full [.., Lq, Lk] extent; it is broadcast and clipped to the dtype's
      finite range there (-inf would turn a fully masked row into NaN).
  Returns:
    context [B, Lq, H, Dh] in `dtype`.
  """
  if implementation not in FUSED_IMPLS:
    raise ValueError(f"fused_attention implementation must be one of {FUSED_IMPLS}, got "
                     f"{implementation!r}")
  q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
  if bias is not None:
    bias = bias.astype(jnp.float32)
    if implementation == "cudnn":
      bias = jnp.broadcast_to(bias, bias.shape[:2] + (q.shape[1], k.shape[1]))
      bias = jnp.maximum(bias, float(jnp.finfo(dtype).min)).astype(dtype)
  return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=implementation)


def padding_bias(mask: jax.Array, value: float) -> jax.Array:
  """[B, Lk] 1/0 mask -> additive bias [B, 1, 1, Lk] with `value` on the 0 entries."""
  return ((1.0 - mask.astype(jnp.float32)) * value)[:, None, None, :]
