"""Text-guided patch masking for TMIM (docs/method.md#masking;
docs/decisions.md items 5-6).

`select_masked_patches` is the one entry point: cross-attention probabilities of the positive
ITM forward -> (masked_idx [B, M], visible_idx [B, P - M]), M = int(ratio * P).

Reference behaviour (`token_choice='reference'`, the default):
  avg = mean_heads(mean_layers(attn))           # [B, T, 1 + P]
  avg = avg[..., 1:]                            # drop the CLS key
  t   ~ U{0, ..., T-1}, one per batch           # any position, [ENC]/[SEP]/[PAD] included
                                                # (or one per group of rows: `group_size`)
  m   = avg[:, t] / ||avg[:, t]||_2 + U(0, noise)
  idx = argsort(m, descending)                  # the highest-attention patches are masked
Options: 'valid_mean' averages the rows of the valid non-special tokens; 'per_example' draws
one valid non-special position per example; `random_mask` ignores attention (uniform random
permutation). "Valid non-special" = attention_mask 1, not position 0 ([ENC]/[CLS]) and not the
last valid position ([SEP]); a text with no such token falls back to all its valid positions.
(This assumes the `[CLS] w1..wk [SEP] [PAD]...` right-padded layout of the tokenizer.)
Nothing is learnable and no gradient reaches the mask (stop_gradient + integer indices).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

TOKEN_CHOICES = ("reference", "valid_mean", "per_example")
DEFAULT_MASK_RATIO = 0.25   # pi of the paper (docs/decisions.md item 13); the one default in the code


def num_masked(mask_ratio: float, num_patches: int) -> int:
  """M = int(ratio * P), as the reference (`int(mask_rate * num_patches)`)."""
  return int(mask_ratio * num_patches)


def content_token_mask(attention_mask: jax.Array) -> jax.Array:
  """[B, T] 1/0 -> [B, T] bool: valid tokens except position 0 and the last valid ([SEP]).

  Rows without such a token fall back to all valid tokens (and an all-padding row to all).
  """
  valid = attention_mask.astype(bool)
  t = valid.shape[1]
  last = jnp.sum(valid, axis=1, keepdims=True) - 1                     # [B, 1]
  pos = jnp.arange(t)[None]
  content = valid & (pos > 0) & (pos != last)
  content = jnp.where(jnp.any(content, axis=1, keepdims=True), content, valid)
  return jnp.where(jnp.any(content, axis=1, keepdims=True), content, True)


def _shared_position(key: jax.Array, b: int, t: int, group_size: int | None) -> jax.Array:
  """One t ~ U{0..T-1} per contiguous group of rows (the whole batch when None) -> [B]."""
  if group_size is None or group_size >= b:
    return jnp.full((b,), jax.random.randint(key, (), 0, t))
  if b % group_size:
    raise ValueError(f"batch {b} is not a multiple of the mask group size {group_size}")
  return jnp.repeat(jax.random.randint(key, (b // group_size,), 0, t), group_size)


def patch_scores(cross_attentions: Sequence[jax.Array], attention_mask: jax.Array,
                 key: jax.Array, *, token_choice: str = "reference", noise: float = 0.02,
                 group_size: int | None = None) -> jax.Array:
  """Per-patch masking scores [B, P] float32 (higher = masked first), gradient-free."""
  if token_choice not in TOKEN_CHOICES:
    raise ValueError(f"token_choice {token_choice!r} not in {TOKEN_CHOICES}")
  attn = jnp.stack([jnp.asarray(a, jnp.float32) for a in cross_attentions], axis=1)
  attn = jax.lax.stop_gradient(attn)                                 # [B, L, H, T, 1 + P]
  avg = jnp.mean(jnp.mean(attn, axis=1), axis=1)[..., 1:]            # [B, T, P]
  b, t, p = avg.shape
  k_tok, k_noise = jax.random.split(key)
  if token_choice == "reference":
    tok = _shared_position(k_tok, b, t, group_size)                  # [B]
    m = jnp.take_along_axis(avg, tok[:, None, None], axis=1)[:, 0]  # [B, P]
  elif token_choice == "valid_mean":
    w = content_token_mask(attention_mask).astype(jnp.float32)       # [B, T]
    m = jnp.einsum("bt,btp->bp", w, avg) / jnp.sum(w, axis=1, keepdims=True)
  else:  # per_example
    logits = jnp.where(content_token_mask(attention_mask), 0.0, -jnp.inf)
    tok = jax.random.categorical(k_tok, logits, axis=-1)              # [B]
    m = jnp.take_along_axis(avg, tok[:, None, None], axis=1)[:, 0]
  m = m / jnp.maximum(jnp.linalg.norm(m, axis=-1, keepdims=True), 1e-12)
  return m + jax.random.uniform(k_noise, (b, p), jnp.float32) * noise


@functools.partial(jax.jit, static_argnames=("mask_ratio", "token_choice", "random_mask",
                                             "noise", "group_size"))
def select_masked_patches(cross_attentions: Sequence[jax.Array], attention_mask: jax.Array,
                          key: jax.Array, *, mask_ratio: float = DEFAULT_MASK_RATIO,
                          token_choice: str = "reference", random_mask: bool = False,
                          noise: float = 0.02, group_size: int | None = None
                          ) -> tuple[jax.Array, jax.Array]:
  """Chooses the TMIM mask from the positive ITM cross-attention.

  Args:
    cross_attentions: L arrays [B, H, T, 1 + P] (softmax over the CLS + P image keys).
    attention_mask: [B, T] text mask (used by 'valid_mean' and 'per_example').
    key: PRNG key (text position, noise, random mask).
    mask_ratio: pi; M = int(pi * P) patches are masked.
    token_choice: 'reference' | 'valid_mean' | 'per_example' (see module doc).
    random_mask: uniform random permutation instead of the attention ranking.
    noise: scale of the U(0, noise) tie-breaking noise (0.02 in the reference).
    group_size: 'reference' only: contiguous groups of this many rows share one text
      position (the reference draws one per GPU, i.e. per local batch); None = the batch.
  Returns:
    (masked_idx [B, M] int32, visible_idx [B, P - M] int32): 0-based patch indices, both in
    descending-score order (the visible order is irrelevant downstream).
  """
  b, _, _, n = cross_attentions[0].shape
  p = n - 1
  m = num_masked(mask_ratio, p)
  if random_mask:
    scores = jax.random.uniform(key, (b, p), jnp.float32)
  else:
    scores = patch_scores(cross_attentions, attention_mask, key, token_choice=token_choice,
                          noise=noise, group_size=group_size)
  idx = jnp.argsort(jax.lax.stop_gradient(scores), axis=-1, descending=True).astype(jnp.int32)
  return idx[:, :m], idx[:, m:]
