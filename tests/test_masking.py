"""TMIM mask selection (contextblip_jax/training/masking.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contextblip_jax.training.masking import (content_token_mask, num_masked, patch_scores,
                                     select_masked_patches)

B, L, H, T, P = 3, 2, 2, 6, 16
# [CLS] w w [SEP] pad pad / [CLS] w w w [SEP] pad / [CLS] w [SEP] pad pad pad
TEXT_MASK = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]], jnp.int32)
CONTENT = np.array([[0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0]], bool)


pytestmark = pytest.mark.usefixtures("xla_optimisations_off")


def _attention(row_scores):
  """row_scores [B, T, P] -> L tensors [B, H, T, 1 + P] (CLS key column huge, must be dropped)."""
  cls = np.full(row_scores.shape[:2] + (1,), 1e3)
  a = np.concatenate([cls, row_scores], -1)[:, None]
  return tuple(jnp.asarray(np.repeat(a, H, axis=1), jnp.float32) for _ in range(L))


def _top_sets(rng, m):
  """Per (b, t) a random set of m 'hot' patches with large gaps to the rest."""
  hot = np.zeros((B, T, P), bool)
  for b in range(B):
    for t in range(T):
      hot[b, t, rng.choice(P, m, replace=False)] = True
  scores = np.where(hot, 10.0 + rng.random((B, T, P)), 0.01 * rng.random((B, T, P)))
  return hot, scores


def _masked_sets(idx):
  return [set(np.asarray(r).tolist()) for r in idx]


@pytest.mark.parametrize("ratio,expected", [(0.25, 4), (0.3, 4), (0.5, 8), (0.75, 12)])
def test_exact_count_and_partition(ratio, expected):
  assert num_masked(ratio, P) == expected
  assert num_masked(0.25, 196) == 49 and num_masked(0.75, 196) == 147
  rng = np.random.default_rng(0)
  attn = _attention(rng.random((B, T, P)))
  masked, visible = select_masked_patches(attn, TEXT_MASK, jax.random.key(0), mask_ratio=ratio)
  assert masked.shape == (B, expected) and visible.shape == (B, P - expected)
  assert masked.dtype == jnp.int32
  both = np.sort(np.concatenate([masked, visible], 1), 1)
  np.testing.assert_array_equal(both, np.tile(np.arange(P), (B, 1)))


def test_masks_the_top_scoring_patches_of_one_shared_position():
  rng = np.random.default_rng(1)
  hot, scores = _top_sets(rng, 4)
  chosen = set()
  for seed in range(12):
    masked, _ = select_masked_patches(_attention(scores), TEXT_MASK, jax.random.key(seed))
    sets = _masked_sets(masked)
    # One text position t serves the whole batch: the masked sets are its hot sets.
    ts = [t for t in range(T) if all(sets[b] == set(np.flatnonzero(hot[b, t]))
                                     for b in range(B))]
    assert len(ts) == 1
    chosen.add(ts[0])
  assert len(chosen) >= 3   # t is drawn at random over all T positions


def test_group_size_gives_one_position_per_group():
  rng = np.random.default_rng(7)
  b = 4
  hot = np.zeros((b, T, P), bool)
  for i in range(b):
    for t in range(T):
      hot[i, t, rng.choice(P, 4, replace=False)] = True
  scores = np.where(hot, 10.0, 0.01)
  mask = jnp.concatenate([TEXT_MASK, TEXT_MASK[:1]])
  pairs = set()
  for seed in range(8):
    masked, _ = select_masked_patches(_attention(scores), mask, jax.random.key(seed),
                                      group_size=2)
    sets = _masked_sets(masked)
    t_of = [[t for t in range(T) if sets[i] == set(np.flatnonzero(hot[i, t]))] for i in
            range(b)]
    assert all(len(x) == 1 for x in t_of)
    assert t_of[0] == t_of[1] and t_of[2] == t_of[3]          # shared within a group
    pairs.add((t_of[0][0], t_of[2][0]))
  assert any(t0 != t2 for t0, t2 in pairs)                    # drawn per group
  with pytest.raises(ValueError, match="multiple"):
    select_masked_patches(_attention(scores), mask, jax.random.key(0), group_size=3)


def test_zero_noise_gives_the_exact_descending_order():
  rng = np.random.default_rng(2)
  row = rng.permutation(P).astype(np.float32) + 1.0
  scores = np.broadcast_to(row, (B, T, P)).copy()
  masked, visible = select_masked_patches(_attention(scores), TEXT_MASK, jax.random.key(0),
                                          mask_ratio=0.25, noise=0.0)
  order = np.argsort(-row)
  np.testing.assert_array_equal(masked, np.tile(order[:4], (B, 1)))
  np.testing.assert_array_equal(visible, np.tile(order[4:], (B, 1)))


def test_deterministic_for_a_key_and_no_gradient():
  rng = np.random.default_rng(3)
  attn = _attention(rng.random((B, T, P)))
  a1 = select_masked_patches(attn, TEXT_MASK, jax.random.key(5))
  a2 = select_masked_patches(attn, TEXT_MASK, jax.random.key(5))
  np.testing.assert_array_equal(a1[0], a2[0])
  np.testing.assert_array_equal(a1[1], a2[1])
  # The scores the ranking uses are stop-gradient'ed: d(sum scores)/d(attention) == 0.
  g = jax.grad(lambda a: jnp.sum(patch_scores(a, TEXT_MASK, jax.random.key(5))))(attn)
  assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in g)
  # And through the indices, e.g. gathering values at the masked positions: zero w.r.t. attn.
  vals = jnp.arange(P, dtype=jnp.float32)
  g2 = jax.grad(lambda a: jnp.sum(vals[select_masked_patches(a, TEXT_MASK,
                                                             jax.random.key(5))[0]]))(attn)
  assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in g2)


def test_random_mask_ignores_attention():
  rng = np.random.default_rng(4)
  hot, scores = _top_sets(rng, 4)
  hot[:] = hot[:, :1]                          # every position agrees on the hot set
  scores = np.where(hot, 10.0, 0.01)
  top, _ = select_masked_patches(_attention(scores), TEXT_MASK, jax.random.key(0))
  assert _masked_sets(top) == [set(np.flatnonzero(hot[b, 0])) for b in range(B)]
  rand, vis = select_masked_patches(_attention(scores), TEXT_MASK, jax.random.key(0),
                                    random_mask=True)
  assert rand.shape == (B, 4)
  assert _masked_sets(rand) != _masked_sets(top)
  np.testing.assert_array_equal(np.sort(np.concatenate([rand, vis], 1), 1),
                                np.tile(np.arange(P), (B, 1)))
  rand2, _ = select_masked_patches(_attention(scores), TEXT_MASK, jax.random.key(1),
                                   random_mask=True)
  assert _masked_sets(rand2) != _masked_sets(rand)


def test_content_token_mask():
  np.testing.assert_array_equal(content_token_mask(TEXT_MASK), CONTENT)
  edge = jnp.array([[1, 1, 0, 0], [0, 0, 0, 0]])   # [CLS][SEP] only; all padding
  np.testing.assert_array_equal(content_token_mask(edge), [[1, 1, 0, 0], [1, 1, 1, 1]])


def test_valid_mean_uses_only_valid_content_tokens():
  rng = np.random.default_rng(5)
  good = np.zeros((B, P), bool)
  for b in range(B):
    good[b, rng.choice(P, 4, replace=False)] = True
  # Content tokens weakly favour the good set; special and padding rows strongly favour others.
  scores = np.where(good[:, None], 1.0, 0.2) * np.ones((B, T, P))
  scores = np.where(CONTENT[..., None], scores, np.where(good[:, None], 0.0, 50.0))
  masked, _ = select_masked_patches(_attention(scores), TEXT_MASK, jax.random.key(0),
                                    token_choice="valid_mean")
  assert _masked_sets(masked) == [set(np.flatnonzero(good[b])) for b in range(B)]
  # The reference choice (one random position, special and padding rows included) differs.
  refs = [_masked_sets(select_masked_patches(_attention(scores), TEXT_MASK,
                                             jax.random.key(s))[0]) for s in range(6)]
  assert any(r != _masked_sets(masked) for r in refs)


def test_per_example_position_is_a_content_token_of_that_example():
  rng = np.random.default_rng(6)
  hot, scores = _top_sets(rng, 4)
  picked = [set() for _ in range(B)]
  for seed in range(10):
    masked, _ = select_masked_patches(_attention(scores), TEXT_MASK, jax.random.key(seed),
                                      token_choice="per_example")
    for b, s in enumerate(_masked_sets(masked)):
      ts = [t for t in range(T) if s == set(np.flatnonzero(hot[b, t]))]
      assert len(ts) == 1 and CONTENT[b, ts[0]]
      picked[b].add(ts[0])
  assert len(picked[1]) >= 2                   # example 1 has three content tokens


def test_bad_option_raises():
  attn = _attention(np.ones((B, T, P)))
  with pytest.raises(ValueError, match="token_choice"):
    select_masked_patches(attn, TEXT_MASK, jax.random.key(0), token_choice="mean")
