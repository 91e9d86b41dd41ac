"""BLIP text encoder (med.py `BertModel`, docs/method.md#text-encoder) and the reusable post-LN BERT layer.

Post-LN layers: self-attention, an optional cross-attention sublayer (to image tokens, or to text
for the TMIM decoder), FFN. No token-type embeddings. Names mirror the checkpoint:
`embeddings/{word_embeddings,position_embeddings,LayerNorm}`,
`encoder/layer_{i}/{attention,crossattention}/{query,key,value,dense,LayerNorm}`,
`encoder/layer_{i}/{intermediate,output,output_LayerNorm}`.

`BertEncoder` is also the TMIM decoder (4 layers, 8 heads) and `BertLayer` the inter-context
encoder layer, configured through `TextConfig`. Every stack of layers is built by `bert_layers`
and run by `run_layers`: with `TextConfig.scan_layers` one `nn.scan` over the layers, whose
parameters form one subtree (`layer`, leaves [L, ...]; models/layout.py), else `layer_{i}`;
`TextConfig.remat` rematerialises each layer. Cross-attention probabilities and the cached
cross-attention keys/values come back per layer in both layouts.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from contextblip_jax.models import layers, layout
from contextblip_jax.models.variants import TextConfig

SELF_MASK_VALUE = -10000.0                       # med.py get_extended_attention_mask
CROSS_MASK_VALUE = float(jnp.finfo(jnp.float32).min)  # HF invert_attention_mask


def _dense_init(init: str, fan_in: int) -> dict:
  """Initialisers of a Dense: 'bert' = HF `_init_weights` (N(0, 0.02), zero bias); 'torch' =
  PyTorch's default `nn.Linear` (U(+-1/sqrt(fan_in)) for kernel and bias)."""
  if init == "bert":
    return {}
  if init == "torch":
    return dict(kernel_init=layers.torch_linear_init(),
                bias_init=layers.torch_bias_init(fan_in))
  raise ValueError(f"unknown Dense init {init!r}; expected 'bert' or 'torch'")


@dataclasses.dataclass
class TextOutput:
  """`last_hidden_state` [B, T, D]; `cross_attentions` one [B, H, T, N] float32 per layer
  (pre-dropout probabilities; empty unless requested)."""
  last_hidden_state: jax.Array
  cross_attentions: tuple[jax.Array, ...] = ()


jax.tree_util.register_dataclass(
    TextOutput, data_fields=["last_hidden_state", "cross_attentions"], meta_fields=[])


class BertAttention(nn.Module):
  """Attention sublayer: `LN(h + Dropout(dense(MHA(q=h, kv=context))))`.

  MHA has two paths with the same math (`_attend`): `jax.nn.dot_product_attention`
  (`layers.fused_attention`) when `config.attention_impl` is 'xla' or 'cudnn', the caller does
  not ask for the probabilities (`return_probs=False`) and no attention dropout applies
  (deterministic, or attention_dropout 0); otherwise (and always with 'explicit') the explicit
  float32 softmax of `layers.attention`, which returns the probabilities (TMIM masking,
  figures) and applies dropout to them as BERT does. Masks are additive biases either way (SELF_MASK_VALUE,
  CROSS_MASK_VALUE)."""
  config: TextConfig
  kv_width: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  init: str = "bert"    # 'bert' (N(0, 0.02)) or 'torch' (default nn.Linear) Dense init

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h, kv = _dense_init(self.init, c.hidden_size), _dense_init(self.init, self.kv_width)
    self.query = layers.Dense(c.hidden_size, axes=("embed", "heads"), **kw, **h)
    self.key = layers.Dense(c.hidden_size, axes=("embed", "heads"), **kw, **kv)
    self.value = layers.Dense(c.hidden_size, axes=("embed", "heads"), **kw, **kv)
    self.dense = layers.Dense(c.hidden_size, axes=("heads", "embed"), **kw, **h)
    self.LayerNorm = layers.LayerNorm(c.layer_norm_eps, **kw)
    self.attn_dropout = nn.Dropout(c.attention_dropout)
    self.out_dropout = nn.Dropout(c.hidden_dropout)

  def _attend(self, q, k, v, bias, deterministic: bool, return_probs: bool):
    """q [B, Lq, H, Dh]; k, v [B, Lk, H, Dh] -> (context [B, Lq, H, Dh], probs [B, H, Lq, Lk]
    float32, or None from the fused path; see the class doc for which path runs)."""
    dropout_active = not deterministic and self.config.attention_dropout > 0
    if self.config.attention_impl != "explicit" and not return_probs and not dropout_active:
      return layers.fused_attention(q, k, v, bias, implementation=self.config.attention_impl,
                                    dtype=self.dtype), None
    return layers.attention(
        q, k, v, bias, dtype=self.dtype,
        dropout=lambda p: self.attn_dropout(p, deterministic=deterministic))

  def __call__(self, h, context, bias, deterministic: bool, return_probs: bool = True):
    """h [B, T, D]; context [B, N, kv_width]; bias [B, 1, 1, N] -> (h [B, T, D], probs
    [B, H, T, N] float32; None when not `return_probs` and the fused path ran)."""
    b, t, _ = h.shape
    heads = self.config.num_heads
    q = self.query(h).reshape(b, t, heads, -1)
    k = self.key(context).reshape(b, context.shape[1], heads, -1)
    v = self.value(context).reshape(b, context.shape[1], heads, -1)
    ctx, probs = self._attend(q, k, v, bias, deterministic, return_probs)
    out = self.out_dropout(self.dense(ctx.reshape(b, t, -1)), deterministic=deterministic)
    return self.LayerNorm(h + out), probs

  def project_kv(self, context):
    """context [Bk, N, kv_width] -> this sublayer's (keys, values), each [Bk, N, H, Dh]."""
    bk, n, _ = context.shape
    heads = self.config.num_heads
    return (self.key(context).reshape(bk, n, heads, -1),
            self.value(context).reshape(bk, n, heads, -1))

  def attend_cached(self, h, kv, bias, deterministic: bool, return_probs: bool = True):
    """`__call__` with precomputed `project_kv` output, shared by consecutive rows.

    h [B, T, D] with B = Bk * r: rows i*r .. i*r + r - 1 attend to kv[i] ([Bk, N, H, Dh]);
    bias [Bk, 1, 1, N] or None. The r rows of one context are folded into the query length,
    so each context's keys/values are used once, never copied.
    Returns (h [B, T, D], probs [B, H, T, N] or None as in `__call__`).
    """
    b, t, _ = h.shape
    k, v = kv
    bk, n, heads = k.shape[0], k.shape[1], self.config.num_heads
    if b % bk:
      raise ValueError(f"attend_cached: {b} query rows do not group over {bk} cached contexts")
    r = b // bk
    q = self.query(h).reshape(bk, r * t, heads, -1)               # [Bk, r*T, H, Dh]
    ctx, probs = self._attend(q, k, v, bias, deterministic, return_probs)
    if probs is not None:
      probs = probs.reshape(bk, heads, r, t, n).transpose(0, 2, 1, 3, 4).reshape(b, heads, t, n)
    out = self.out_dropout(self.dense(ctx.reshape(b, t, -1)), deterministic=deterministic)
    return self.LayerNorm(h + out), probs


class BertLayer(nn.Module):
  config: TextConfig
  has_cross_attention: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  init: str = "bert"    # 'bert' (N(0, 0.02)) or 'torch' (default nn.Linear) Dense init

  def setup(self):
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.attention = BertAttention(c, c.hidden_size, init=self.init, **kw)
    if self.has_cross_attention:
      self.crossattention = BertAttention(c, c.encoder_width, init=self.init, **kw)
    self.intermediate = layers.Dense(c.intermediate_size, axes=("embed", "mlp"), **kw,
                                     **_dense_init(self.init, c.hidden_size))
    self.output = layers.Dense(c.hidden_size, axes=("mlp", "embed"), **kw,
                               **_dense_init(self.init, c.intermediate_size))
    self.output_LayerNorm = layers.LayerNorm(c.layer_norm_eps, **kw)
    self.output_dropout = nn.Dropout(c.hidden_dropout)

  def __call__(self, h, self_bias=None, encoder_states=None, cross_bias=None,
               deterministic: bool = True, cross_kv=None, return_cross: bool = True):
    """h [B, T, D] -> (h [B, T, D], cross-attention probs [B, H, T, N] or None).

    `cross_kv`: this layer's precomputed cross-attention (keys, values) from
    `crossattention.project_kv`, used instead of `encoder_states` (see `attend_cached`).
    `return_cross=False`: the probabilities are not needed, so the cross-attention may take
    the fused path (BertAttention); the self-attention never returns them.
    """
    h, _ = self.attention(h, h, self_bias, deterministic, return_probs=False)
    cross = None
    if cross_kv is not None:
      if not self.has_cross_attention:
        raise ValueError("cross_kv given to a BertLayer built without cross-attention")
      h, cross = self.crossattention.attend_cached(h, cross_kv, cross_bias, deterministic,
                                                   return_cross)
    elif encoder_states is not None:
      if not self.has_cross_attention:
        raise ValueError("encoder_states given to a BertLayer built without cross-attention")
      h, cross = self.crossattention(h, encoder_states, cross_bias, deterministic,
                                     return_cross)
    ffn = self.output(nn.gelu(self.intermediate(h), approximate=False))
    h = self.output_LayerNorm(h + self.output_dropout(ffn, deterministic=deterministic))
    return layers.constrain(h, ("batch", "length", "embed")), cross

  def project_cross_kv(self, encoder_states):
    """This layer's cross-attention (keys, values), each [Bk, N, H, Dh] (`cross_kv`)."""
    return self.crossattention.project_kv(encoder_states)


class BertLayerStep(BertLayer):
  """`BertLayer` as the body of `nn.scan`: carry h; `cross_kv` holds this layer's slice."""

  def __call__(self, h, self_bias, encoder_states, cross_bias, deterministic: bool,
               return_cross: bool, cross_kv):
    h, cross = super().__call__(h, self_bias, encoder_states, cross_bias, deterministic,
                                cross_kv, return_cross)
    return h, (cross if return_cross else None)

  def scan_cross_kv(self, carry, encoder_states):
    return carry, self.project_cross_kv(encoder_states)


def bert_layers(config: TextConfig, count: int, has_cross_attention: bool, init: str,
                dtype, param_dtype):
  """The `count` layers of a stack: one scanned module (params [count, ...]) when
  `config.scan_layers`, else a list of BertLayers; `config.remat` rematerialises each."""
  kw = dict(has_cross_attention=has_cross_attention, dtype=dtype, param_dtype=param_dtype,
            init=init)
  if config.scan_layers:
    return layout.scanned(BertLayerStep, count, policy=config.remat, static_argnums=(5, 6),
                          in_axes=(nn.broadcast,) * 5 + (0,),
                          methods={"scan_cross_kv": (nn.broadcast,)})(config, **kw)
  cls = layout.remat(BertLayer, config.remat, static_argnums=(5, 7))
  return [cls(config, **kw) for _ in range(count)]


def run_layers(stack, h, self_bias=None, encoder_states=None, cross_bias=None,
               deterministic: bool = True, return_cross: bool = False, cross_kv=None
               ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
  """Runs a `bert_layers` stack -> (h [B, T, D], per-layer cross probs if `return_cross`).

  `cross_kv`: one (keys, values) per layer (see `BertLayer.project_cross_kv`) or None."""
  if isinstance(stack, (list, tuple)):
    crosses = []
    for i, lyr in enumerate(stack):
      h, cross = lyr(h, self_bias, encoder_states, cross_bias, deterministic,
                     None if cross_kv is None else cross_kv[i], return_cross)
      if return_cross and cross is not None:
        crosses.append(cross)
    return h, tuple(crosses)
  kv = None
  if cross_kv is not None:     # per-layer tuples -> ([L, Bk, N, H, Dh], [L, Bk, N, H, Dh])
    kv = (jnp.stack([k for k, _ in cross_kv]), jnp.stack([v for _, v in cross_kv]))
  h, crosses = stack(h, self_bias, encoder_states, cross_bias, deterministic, return_cross, kv)
  return h, layout.unstack_outputs(crosses)


def stack_cross_kv(stack, encoder_states) -> tuple[tuple[jax.Array, jax.Array], ...]:
  """Per-layer (keys, values) of a `bert_layers` stack with cross-attention."""
  if isinstance(stack, (list, tuple)):
    return tuple(lyr.project_cross_kv(encoder_states) for lyr in stack)
  _, (k, v) = stack.scan_cross_kv(jnp.zeros((), encoder_states.dtype), encoder_states)
  return tuple(zip(layout.unstack_outputs(k), layout.unstack_outputs(v)))


class BertEncoder(nn.Module):
  """A stack of `num_layers` BertLayers (`layer_{i}`, or one scanned `layer`)."""
  config: TextConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    c = self.config
    self.layer = bert_layers(c, c.num_layers, c.add_cross_attention, "bert", self.dtype,
                             self.param_dtype)

  def __call__(self, h, attention_mask=None, encoder_states=None, encoder_mask=None,
               deterministic: bool = True, return_cross_attentions: bool = False,
               cross_kv=None) -> TextOutput:
    """h [B, T, D]; attention_mask [B, T]; encoder_states [B, N, W]; encoder_mask [B, N].

    `cross_kv`: one precomputed (keys, values) per layer (`cross_kv` of `BertModel`) for Bk
    contexts, replacing `encoder_states`; then encoder_mask is [Bk, N] and B = Bk * r.
    """
    self_bias = None if attention_mask is None else layers.padding_bias(
        attention_mask, SELF_MASK_VALUE)
    cross_bias = None
    if (encoder_states is not None or cross_kv is not None) and encoder_mask is not None:
      cross_bias = layers.padding_bias(encoder_mask, CROSS_MASK_VALUE)
    n = self.config.num_layers
    if cross_kv is not None and len(cross_kv) != n:
      raise ValueError(f"cross_kv has {len(cross_kv)} entries for {n} layers")
    h, crosses = run_layers(self.layer, h, self_bias, encoder_states, cross_bias, deterministic,
                            return_cross_attentions, cross_kv)
    return TextOutput(last_hidden_state=h, cross_attentions=crosses)

  def cross_kv(self, encoder_states) -> tuple[tuple[jax.Array, jax.Array], ...]:
    """Per-layer cross-attention (keys, values) of encoder_states (see `BertModel.cross_kv`)."""
    return stack_cross_kv(self.layer, encoder_states)


class BertEmbeddings(nn.Module):
  config: TextConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    c = self.config
    emb = lambda n: nn.with_logical_partitioning(layers.bert_init, (n, "embed"))
    self.word_embeddings = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=emb("vocab"),
                                    dtype=self.dtype, param_dtype=self.param_dtype)
    self.position_embeddings = nn.Embed(
        c.max_position_embeddings, c.hidden_size, embedding_init=emb(None),
        dtype=self.dtype, param_dtype=self.param_dtype)
    self.LayerNorm = layers.LayerNorm(c.layer_norm_eps, self.dtype, self.param_dtype)
    self.dropout = nn.Dropout(c.hidden_dropout)

  def __call__(self, input_ids, deterministic: bool = True):
    """input_ids [B, T] -> [B, T, D]."""
    t = input_ids.shape[1]
    if t > self.config.max_position_embeddings:
      raise ValueError(f"text length {t} exceeds max_position_embeddings "
                       f"{self.config.max_position_embeddings}")
    x = self.word_embeddings(input_ids) + self.position_embeddings(jnp.arange(t))[None]
    return self.dropout(self.LayerNorm(x), deterministic=deterministic)


class BertModel(nn.Module):
  """BLIP text encoder. `mode='text'` skips cross-attention (ITC); `'multimodal'` uses it."""
  config: TextConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.embeddings = BertEmbeddings(self.config, self.dtype, self.param_dtype)
    self.encoder = BertEncoder(self.config, self.dtype, self.param_dtype)

  def __call__(self, input_ids, attention_mask, encoder_states=None, encoder_mask=None,
               mode: str = "multimodal", deterministic: bool = True,
               return_cross_attentions: bool = False, cross_kv=None) -> TextOutput:
    """input_ids, attention_mask [B, T]; encoder_states [B, N, W] (multimodal only).

    `cross_kv` (multimodal): the output of `cross_kv(states)` for Bk contexts, used instead of
    `encoder_states`; rows i*r .. i*r + r - 1 of the B = Bk * r texts pair with context i.
    """
    if mode not in ("text", "multimodal"):
      raise ValueError(f"mode must be 'text' or 'multimodal', got {mode!r}")
    if mode == "multimodal" and encoder_states is None and cross_kv is None:
      raise ValueError("mode='multimodal' needs encoder_states (the image tokens)")
    if mode == "text":
      encoder_states = encoder_mask = cross_kv = None
    # encoder_mask None = all image tokens visible (no bias is built at all).
    h = self.embeddings(input_ids, deterministic)
    return self.encoder(h, attention_mask, encoder_states, encoder_mask, deterministic,
                        return_cross_attentions, cross_kv=cross_kv)

  def cross_kv(self, encoder_states) -> tuple[tuple[jax.Array, jax.Array], ...]:
    """Per-layer cross-attention (keys, values), each [Bk, N, H, Dh], of encoder_states
    [Bk, N, W]: they depend on the image only, so one image serves any number of texts."""
    return self.encoder.cross_kv(encoder_states)
