"""Loss functions (contextblip_jax/training/losses.py) against direct NumPy computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contextblip_jax.training import losses


pytestmark = pytest.mark.usefixtures("xla_optimisations_off")


def _np_softmax(x, axis=-1):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def _np_ce(logits, labels):
  return -np.log(_np_softmax(logits))[np.arange(len(labels)), labels]


def _sim(b, seed=0):
  f = np.random.default_rng(seed).normal(size=(b, 5))
  f /= np.linalg.norm(f, axis=1, keepdims=True)
  return (f @ f.T * 0.7 + 0.3 * np.random.default_rng(seed + 1).normal(
      size=(b, b))).astype(np.float32)


@pytest.mark.parametrize("temperature", [None, 0.1])
def test_hard_negative_weights(temperature):
  sim = _sim(5)
  w = np.asarray(losses.hard_negative_weights(jnp.asarray(sim), temperature))
  s = sim / (temperature or 1.0)
  ref = _np_softmax(s, 1) + 1e-4
  np.fill_diagonal(ref, 0.0)
  np.testing.assert_allclose(w, ref, rtol=1e-5, atol=1e-7)


def _draws(sim, n, group_size=None, temperature=None):
  keys = jax.random.split(jax.random.key(0), n)
  f = jax.jit(jax.vmap(lambda k: losses.sample_hard_negatives(k, sim, group_size, temperature)))
  return np.asarray(f(keys))                                          # [n, B]


def _chi2(counts, probs):
  expected = probs * counts.sum()
  keep = expected > 0
  return float(np.sum((counts[keep] - expected[keep]) ** 2 / expected[keep]))


def test_sampling_never_picks_the_positive_and_follows_the_weights():
  b, n = 4, 20000
  sim = jnp.asarray(_sim(b, 3))
  draws = _draws(sim, n, temperature=0.2)
  assert draws.dtype == np.int32
  assert not np.any(draws == np.arange(b)[None])
  w = np.asarray(losses.hard_negative_weights(sim, 0.2))
  chi2 = sum(_chi2(np.bincount(draws[:, r], minlength=b), w[r] / w[r].sum()) for r in range(b))
  # 4 rows x 2 degrees of freedom; P(chi2_8 > 30) ~ 2e-4.
  assert chi2 < 30.0, chi2
  # A wrong distribution (uniform over the negatives) is rejected by the same statistic.
  uniform = sum(_chi2(np.bincount(draws[:, r], minlength=b),
                      (np.arange(b) != r) / (b - 1.0)) for r in range(b))
  assert uniform > 100.0


def test_group_size_restricts_negatives_to_the_group():
  b, g, n = 8, 4, 4000
  sim = jnp.asarray(_sim(b, 5))
  draws = _draws(sim, n, group_size=g, temperature=0.2)
  rows = np.arange(b)[None]
  assert not np.any(draws == rows)
  np.testing.assert_array_equal(draws // g, np.broadcast_to(rows // g, draws.shape))
  # Within a group the weights are the softmax over that group's columns only.
  block = np.asarray(sim)[4:8, 4:8]
  w = np.asarray(losses.hard_negative_weights(jnp.asarray(block), 0.2))
  chi2 = sum(_chi2(np.bincount(draws[:, 4 + r] - 4, minlength=g), w[r] / w[r].sum())
             for r in range(g))
  assert chi2 < 30.0, chi2
  # Without groups, negatives cross the group boundary.
  free = _draws(sim, 200)
  assert np.any(free // g != rows // g)
  with pytest.raises(ValueError, match="multiple"):
    losses.sample_hard_negatives(jax.random.key(0), jnp.zeros((6, 6)), group_size=4)


def test_itm_loss_and_labels():
  logits = np.random.default_rng(0).normal(size=(6, 2)).astype(np.float32)
  np.testing.assert_array_equal(losses.itm_labels(2), [1, 1, 0, 0, 0, 0])
  ref = _np_ce(logits, np.array([1, 1, 0, 0, 0, 0])).mean()
  np.testing.assert_allclose(losses.itm_loss(jnp.asarray(logits)), ref, rtol=1e-6)
  with pytest.raises(ValueError, match="3B"):
    losses.itm_loss(jnp.zeros((4, 2)))


def test_mse_is_the_element_mean():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(2, 3, 12)), rng.normal(size=(2, 3, 12))
  np.testing.assert_allclose(losses.mse_loss(jnp.asarray(a), jnp.asarray(b)),
                             np.mean((a - b) ** 2), rtol=1e-6)


def test_itc_loss_is_symmetric_infonce():
  rng = np.random.default_rng(2)
  i, t = rng.normal(size=(4, 8)), rng.normal(size=(4, 8))
  i /= np.linalg.norm(i, axis=1, keepdims=True)
  t /= np.linalg.norm(t, axis=1, keepdims=True)
  loss, sim = losses.itc_loss(jnp.asarray(i, jnp.float32), jnp.asarray(t, jnp.float32), 0.07)
  s = i @ t.T / 0.07
  ref = 0.5 * (_np_ce(s, np.arange(4)).mean() + _np_ce(s.T, np.arange(4)).mean())
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  np.testing.assert_allclose(sim, s, rtol=1e-5)


def test_candidate_cross_entropy_and_accuracy():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(3, 10)).astype(np.float32)
  labels = np.array([2, int(np.argmax(logits[1])), 9])
  per = losses.candidate_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
  assert per.shape == (3,)
  np.testing.assert_allclose(per, _np_ce(logits, labels), rtol=1e-5)
  hits = (np.argmax(logits, 1) == labels).astype(np.float32)
  np.testing.assert_array_equal(losses.correct(jnp.asarray(logits), jnp.asarray(labels)), hits)
  np.testing.assert_allclose(losses.accuracy(jnp.asarray(logits), jnp.asarray(labels)),
                             hits.mean())
