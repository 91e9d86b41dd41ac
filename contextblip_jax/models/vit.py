"""BLIP ViT-B/16 vision encoder (docs/method.md#vision-encoder).

Pre-norm blocks `x + Attn(LN1(x))`, `x + MLP(LN2(x))`, fused qkv, exact GELU, LayerNorm eps
1e-6, CLS-inclusive learned position embedding, final LayerNorm over all tokens. Submodule names
mirror the original checkpoint (`patch_embed`, `cls_token`, `pos_embed`, `blocks_{i}`, `norm`).
With `VisionConfig.scan_layers` the blocks run under one `nn.scan` and their parameters form
one subtree `blocks` with leaves [depth, ...] (models/layout.py); `remat` rematerialises each
block. The taps are the same in both layouts.

The encoder is split into `embed` (pixels -> tokens), `embed_patches` (flattened patch vectors
at chosen grid positions -> tokens, for the MAE-style visible-only pass of TMIM) and `encode`
(tokens -> final states and the adapter taps), so the method code reuses each piece.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from contextblip_jax.models import layers, layout
from contextblip_jax.models.variants import VisionConfig


@dataclasses.dataclass
class VisionOutput:
  """`last_hidden_state` [B, N, D] = LN_final(x_depth); `taps` one [B, N, D] per block,
  each LN_final(block output) (empty unless requested)."""
  last_hidden_state: jax.Array
  taps: tuple[jax.Array, ...] = ()


jax.tree_util.register_dataclass(
    VisionOutput, data_fields=["last_hidden_state", "taps"], meta_fields=[])


class Attention(nn.Module):
  """Multi-head self-attention with one fused `qkv` Dense (rows q | k | v, head-major). `impl`
  (layers.ATTENTION_IMPLS): 'explicit' float32 softmax (`layers.attention`), or
  `jax.nn.dot_product_attention` with implementation 'xla' | 'cudnn' (`layers.fused_attention`:
  no mask, no dropout, float32 softmax inside)."""
  width: int
  num_heads: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  impl: str = "explicit"

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=layers.vit_init)
    self.qkv = layers.Dense(3 * self.width, axes=("embed", "heads"), **kw)
    self.proj = layers.Dense(self.width, axes=("heads", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, _ = x.shape                                        # [B, N, D]
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1)   # [B, N, 3, H, Dh]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.impl == "explicit":
      ctx, _ = layers.attention(q, k, v, dtype=self.dtype)
    else:
      ctx = layers.fused_attention(q, k, v, implementation=self.impl, dtype=self.dtype)
    return self.proj(ctx.reshape(b, n, self.width))          # [B, N, D]


class Mlp(nn.Module):
  width: int
  mlp_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=layers.vit_init)
    self.fc1 = layers.Dense(self.mlp_dim, axes=("embed", "mlp"), **kw)
    self.fc2 = layers.Dense(self.width, axes=("mlp", "embed"), **kw)

  def __call__(self, x):
    return self.fc2(nn.gelu(self.fc1(x), approximate=False))


class Block(nn.Module):
  config: VisionConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.norm1 = layers.LayerNorm(c.layer_norm_eps, **kw)
    self.attn = Attention(c.width, c.num_heads, impl=c.attention_impl, **kw)
    self.norm2 = layers.LayerNorm(c.layer_norm_eps, **kw)
    self.mlp = Mlp(c.width, c.mlp_dim, **kw)

  def __call__(self, x):
    x = x + self.attn(self.norm1(x))
    x = x + self.mlp(self.norm2(x))
    return layers.constrain(x, ("batch", "length", "embed"))


class BlockStep(Block):
  """`Block` as the body of `nn.scan`: (x, return_taps) -> (block(x), block(x) or None)."""

  def __call__(self, x, return_taps: bool):
    x = super().__call__(x)
    return x, (x if return_taps else None)


class VisionTransformer(nn.Module):
  config: VisionConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    p = c.patch_size
    # Conv(3 -> D, kernel p, stride p) as a Dense on (ph, pw, c)-flattened patches: the kernel is
    # stored HWIO [p, p, 3, D] exactly as `nn.Conv` would hold it.
    self.patch_embed_kernel = self.param(
        "patch_embed_kernel",
        nn.with_logical_partitioning(
            lambda k, s, d: layers.vit_init(k, (p * p * 3, c.width), d).reshape(s),
            (None, None, None, "embed")),
        (p, p, 3, c.width), self.param_dtype)
    self.patch_embed_bias = self.param(
        "patch_embed_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        (c.width,), self.param_dtype)
    self.cls_token = self.param(
        "cls_token", nn.with_logical_partitioning(layers.vit_init, (None, None, "embed")),
        (1, 1, c.width), self.param_dtype)
    self.pos_embed = self.param(
        "pos_embed", nn.with_logical_partitioning(layers.vit_init, (None, None, "embed")),
        (1, c.num_patches + 1, c.width), self.param_dtype)
    if c.scan_layers:     # one `blocks` subtree, leaves [depth, ...] (models/layout.py)
      self.blocks = layout.scanned(BlockStep, c.depth, policy=c.remat, static_argnums=(2,),
                                   in_axes=(nn.broadcast,))(c, **kw)
    else:                 # `blocks_0` .. `blocks_{depth-1}`
      self.blocks = [layout.remat(Block, c.remat)(c, **kw) for _ in range(c.depth)]
    self.norm = layers.LayerNorm(c.layer_norm_eps, **kw)

  def patchify(self, pixels: jax.Array) -> jax.Array:
    """[B, S, S, 3] -> [B, P, p*p*3], row-major grid, each patch flattened (ph, pw, c)."""
    b, s, _, ch = pixels.shape
    p, g = self.config.patch_size, s // self.config.patch_size
    x = pixels.reshape(b, g, p, g, p, ch).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, g * g, p * p * ch)

  def embed_patches(self, patches: jax.Array, positions: jax.Array | None = None) -> jax.Array:
    """Patch vectors -> tokens with CLS prepended and position embeddings added.

    Args:
      patches: [B, M, p*p*3] flattened (ph, pw, c) (the layout `patchify` gives).
      positions: [B, M] 0-based grid indices of the patches; all P in order when None.
    Returns:
      [B, 1 + M, D].
    """
    b, m, _ = patches.shape
    kernel = self.patch_embed_kernel.reshape(-1, self.config.width).astype(self.dtype)
    tok = jnp.dot(patches.astype(self.dtype), kernel) + self.patch_embed_bias.astype(self.dtype)
    pos = self.pos_embed[0].astype(self.dtype)                # [1 + P, D]
    if positions is None:
      tok = tok + pos[1:][None]
    else:
      tok = tok + jnp.take(pos, positions + 1, axis=0)        # [B, M, D]
    cls = jnp.broadcast_to(self.cls_token.astype(self.dtype) + pos[0], (b, 1, tok.shape[-1]))
    return jnp.concatenate([cls, tok], axis=1)

  def embed(self, pixels: jax.Array) -> jax.Array:
    """[B, S, S, 3] normalised pixels -> [B, 1 + P, D] tokens."""
    return self.embed_patches(self.patchify(pixels))

  def encode(self, x: jax.Array, return_taps: bool = False) -> VisionOutput:
    """Runs the blocks on tokens [B, N, D]; taps are LN_final of every block output."""
    if self.config.scan_layers:
      x, outs = self.blocks(x, return_taps)                   # outs [depth, B, N, D] or None
      taps = layout.unstack_outputs(None if outs is None else self.norm(outs))
    else:
      taps = []
      for block in self.blocks:
        x = block(x)
        if return_taps:
          taps.append(self.norm(x))
    out = taps[-1] if return_taps else self.norm(x)
    return VisionOutput(last_hidden_state=out, taps=tuple(taps))

  def __call__(self, pixels: jax.Array, return_taps: bool = False) -> VisionOutput:
    """[B, S, S, 3] -> VisionOutput with last_hidden_state [B, 1 + P, D]."""
    return self.encode(self.embed(pixels), return_taps)
