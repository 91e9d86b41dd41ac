"""Pure loss functions (docs/method.md): ITM with hard negatives, TMIM MSE, ITC, candidate
cross-entropy and accuracy. Everything is computed in float32.

Hard-negative sampling (docs/method.md#hard-negatives;
docs/decisions.md item 10):
  w = softmax(sim / temperature, axis=1) + 1e-4, diagonal set to 0      # per row
  neg[b] ~ Categorical(w[b])                                            # jax.random.categorical
ContextBLIP uses raw cosine similarities (temperature None) of the frozen ITC features; BLIP
pre-training divides by its ITC temperature. `group_size` chooses the pool a row draws from:
  None   the whole (global) batch, i.e. what one process sees when the step is jitted over
         the global batch (BLIP retrieval-style all-gathered negatives);
  G      contiguous groups of G rows sample only inside their own group (rows and columns
         [g*G, (g+1)*G)), i.e. the reference's per-GPU local batch: pass the per-device batch
         under data-parallel sharding to reproduce it (local B = 256 in the paper).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def hard_negative_weights(sim: jax.Array, temperature: float | None = None) -> jax.Array:
  """sim [B, B] (row b = query b) -> sampling weights [B, B], diagonal 0 (unnormalised)."""
  s = jax.lax.stop_gradient(sim.astype(jnp.float32))
  if temperature is not None:
    s = s / temperature
  w = jax.nn.softmax(s, axis=1) + 1e-4
  return jnp.where(jnp.eye(s.shape[0], dtype=bool), 0.0, w)


def _diagonal_blocks(sim: jax.Array, group_size: int) -> jax.Array:
  """[B, B] -> [B // G, G, G] blocks sim[gG:(g+1)G, gG:(g+1)G]."""
  b = sim.shape[0]
  if b % group_size:
    raise ValueError(f"batch {b} is not a multiple of the negative-sampling group {group_size}")
  n = b // group_size
  blocks = sim.reshape(n, group_size, n, group_size)
  return blocks[jnp.arange(n), :, jnp.arange(n), :]


def sample_hard_negatives(key: jax.Array, sim: jax.Array, group_size: int | None = None,
                          temperature: float | None = None) -> jax.Array:
  """One negative column index per row of sim [B, B] (never the row itself) -> [B] int32.

  Indices are global (0..B-1) whatever `group_size` is; see the module doc for the groups.
  """
  if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
    raise ValueError(f"sim must be square [B, B], got {sim.shape}")
  b = sim.shape[0]
  if group_size is None or group_size >= b:
    w = hard_negative_weights(sim, temperature)
    return jax.random.categorical(key, jnp.log(w), axis=-1).astype(jnp.int32)
  blocks = _diagonal_blocks(sim, group_size)                       # [n, G, G]
  w = jax.vmap(lambda s: hard_negative_weights(s, temperature))(blocks)
  local = jax.random.categorical(key, jnp.log(w), axis=-1)         # [n, G]
  offset = (jnp.arange(blocks.shape[0]) * group_size)[:, None]
  return (local + offset).reshape(b).astype(jnp.int32)


def itm_labels(batch_size: int) -> jax.Array:
  """[3B] labels for the (positive, negative-image, negative-text) row order: 1, 0, 0."""
  return jnp.concatenate([jnp.ones((batch_size,), jnp.int32),
                          jnp.zeros((2 * batch_size,), jnp.int32)])


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-row softmax cross-entropy: logits [..., C], integer labels [...] -> [...] float32."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


def itm_loss(logits: jax.Array) -> jax.Array:
  """L_itm: mean CE over the 3B rows [pos (B) ; neg image (B) ; neg text (B)] of logits [3B, 2]."""
  if logits.shape[0] % 3:
    raise ValueError(f"ITM logits need 3B rows, got {logits.shape}")
  return jnp.mean(cross_entropy(logits, itm_labels(logits.shape[0] // 3)))


def mse_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
  """`nn.MSELoss()`: mean over all elements, float32."""
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)))


def itc_loss(image_feat: jax.Array, text_feat: jax.Array, temperature: float = 0.07):
  """Symmetric InfoNCE (BLIP ITC without momentum distillation).

  image_feat, text_feat [B, E] L2-normalised; pair b is the positive of row/column b.
  Returns (loss, sim_i2t [B, B] already divided by the temperature).
  """
  sim = image_feat.astype(jnp.float32) @ text_feat.astype(jnp.float32).T / temperature
  labels = jnp.arange(sim.shape[0])
  loss = 0.5 * (jnp.mean(cross_entropy(sim, labels)) + jnp.mean(cross_entropy(sim.T, labels)))
  return loss, sim


def candidate_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example CE over the K candidates: logits [G, K], labels [G] -> [G] (caller SUMs)."""
  return cross_entropy(logits, labels)


def correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """[..., C] logits, [...] labels -> [...] float32 1/0 (argmax == label)."""
  return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean of `correct`."""
  return jnp.mean(correct(logits, labels))
