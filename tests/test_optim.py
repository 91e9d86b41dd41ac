"""Optimizers and schedules (docs/method.md#optimizers) against hand computations."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from contextblip_jax.training import optim


def test_pretrain_schedule_warmup_truncated_at_epoch_boundary():
  spe = 1300
  s = optim.pretrain_schedule(spe)
  # Epoch 0, per iteration: min(3e-4, 1e-6 + (3e-4 - 1e-6) * i / 3000).
  for i in (0, 1, 10, 1000, 1299):
    want = min(3e-4, 1e-6 + (3e-4 - 1e-6) * i / 3000)
    np.testing.assert_allclose(float(s(i)), want, rtol=1e-6)
  # The warm-up is cut at ~1.3e-4; epoch 1 jumps to 3e-4 * 0.9 = 2.7e-4.
  assert float(s(spe - 1)) < 1.31e-4
  np.testing.assert_allclose(float(s(spe)), 2.7e-4, rtol=1e-6)
  np.testing.assert_allclose(float(s(spe + 999)), 2.7e-4, rtol=1e-6)
  np.testing.assert_allclose(float(s(5 * spe + 7)), 3e-4 * 0.9**5, rtol=1e-6)
  # Floor at 1e-6: 3e-4 * 0.9**60 ~ 5.5e-7.
  np.testing.assert_allclose(float(s(60 * spe)), 1e-6, rtol=1e-6)


def test_pretrain_schedule_short_warmup_reaches_peak_in_epoch_0():
  s = optim.pretrain_schedule(100, warmup_steps=10)
  np.testing.assert_allclose(float(s(20)), 3e-4, rtol=1e-6)
  np.testing.assert_allclose(float(s(5)), 1e-6 + (3e-4 - 1e-6) * 0.5, rtol=1e-6)


def test_epoch_decay_schedule_steps_per_epoch():
  s = optim.epoch_decay_schedule(2e-6, steps_per_epoch=461, decay=0.95)
  np.testing.assert_allclose(float(s(0)), 2e-6, rtol=1e-6)
  np.testing.assert_allclose(float(s(460)), 2e-6, rtol=1e-6)
  np.testing.assert_allclose(float(s(461)), 2e-6 * 0.95, rtol=1e-6)
  np.testing.assert_allclose(float(s(461 * 17 + 3)), 2e-6 * 0.95**17, rtol=1e-5)


def test_warmup_cosine_schedule():
  s = optim.warmup_cosine_schedule(1e-3, total_steps=110, warmup_steps=10)
  np.testing.assert_allclose(float(s(5)), 5e-4, rtol=1e-6)
  np.testing.assert_allclose(float(s(10)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(s(60)), 5e-4, rtol=1e-5)   # half-way down the cosine
  np.testing.assert_allclose(float(s(110)), 0.0, atol=1e-12)


def _run(tx, p, grads):
  state = tx.init(p)
  for g in grads:
    u, state = tx.update(g, state, p)
    p = optax.apply_updates(p, u)
  return p


def _adam_moments(gs, b1, b2):
  m = v = 0.0
  for t, g in enumerate(gs, 1):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    yield m / (1 - b1**t), v / (1 - b2**t)


def test_pretrain_adamw_is_decoupled_weight_decay():
  """torch AdamW: p <- p - lr * (mhat / (sqrt(vhat) + eps) + wd * p), grads untouched by wd."""
  lr, wd = 1e-2, 0.05
  tx = optim.make_optimizer({**optim.default_config("pretrain"), "warmup_steps": 0, "lr": lr},
                            steps_per_epoch=1000).tx
  p0 = np.array([1.0, -2.0, 0.5], np.float64)
  gs = [np.array([0.1, 0.2, -0.3]), np.array([-0.05, 0.4, 0.1]), np.array([0.3, -0.1, 0.2])]
  p = p0.copy()
  hist = []
  for t, g in enumerate(gs, 1):
    hist.append(g)
    mhat, vhat = list(_adam_moments(hist, 0.9, 0.999))[-1]
    p = p - lr * (mhat / (np.sqrt(vhat) + 1e-8) + wd * p)
  got = _run(tx, jnp.asarray(p0, jnp.float32), [jnp.asarray(g, jnp.float32) for g in gs])
  np.testing.assert_allclose(np.asarray(got), p, rtol=1e-5)


def test_finetune_adam_is_coupled_l2_with_group_lrs():
  """torch Adam(weight_decay=0.2): g <- g + wd * p before the moments; per-group lrs."""
  wd, lrs = 0.2, {"head": 1e-1, "blip": 1e-3}
  cfg = optim.default_config("finetune_stage1")
  cfg.lrs = lrs
  opt = optim.make_optimizer(cfg, steps_per_epoch=2)
  params = {"prediction_layer": {"kernel": jnp.array([0.5, -1.5])},
            "pretrained_blip": {"w": jnp.array([2.0, 0.3])}}
  gs = [{"prediction_layer": {"kernel": jnp.array([0.1, 0.2])},
         "pretrained_blip": {"w": jnp.array([-0.2, 0.05])}}] * 3
  got = _run(opt.tx, params, gs)
  for group, key, name in (("head", "kernel", "prediction_layer"),
                           ("blip", "w", "pretrained_blip")):
    p = np.asarray(params[name][key], np.float64)
    hist = []
    for t, g in enumerate(gs):
      hist.append(np.asarray(g[name][key]) + wd * p)         # coupled: decay enters the moments
      mhat, vhat = list(_adam_moments(hist, 0.9, 0.98))[-1]
      lr = lrs[group] * 0.95 ** (t // 2)                       # 0.95**epoch, 2 steps per epoch
      p = p - lr * mhat / (np.sqrt(vhat) + 1e-6)
    np.testing.assert_allclose(np.asarray(got[name][key]), p, rtol=1e-5, err_msg=group)
  assert set(opt.schedules) == {"lr_head", "lr_blip"}
  np.testing.assert_allclose(float(opt.schedules["lr_head"](2)), 1e-1 * 0.95, rtol=1e-6)


def test_coupled_and_decoupled_decay_differ():
  """Sanity: with the same lr and wd the two decays give different updates (not a no-op)."""
  p, g = jnp.array([1.0]), jnp.array([0.0])
  coupled = _run(optim.coupled_adam(lambda _: 0.1, weight_decay=0.2), p, [g])
  decoupled = _run(optim.adamw(lambda _: 0.1, weight_decay=0.2), p, [g])
  # coupled: g' = 0.2 -> Adam step ~ -lr * sign = -0.1; decoupled: -lr * wd * p = -0.02.
  np.testing.assert_allclose(float(coupled[0]), 0.9, rtol=1e-4)
  np.testing.assert_allclose(float(decoupled[0]), 0.98, rtol=1e-6)


def test_group_labels_first_match_and_missing_group():
  params = {"prediction_layer": {"bias": 0.0}, "a": {"b": 0.0}}
  labels = optim.group_labels(params, [("prediction_layer/.*", "head"), (".*", "blip")])
  assert labels == {"prediction_layer": {"bias": "head"}, "a": {"b": "blip"}}
  with pytest.raises(ValueError, match="matches no optimizer group"):
    optim.group_labels(params, [("prediction_layer/.*", "head")])
  with pytest.raises(ValueError, match="no learning rate"):
    optim.grouped({"head": optax.sgd(1.0)}, [(".*", "blip")])


def test_stage2_default_single_group():
  opt = optim.make_optimizer(optim.default_config("finetune_stage2"), steps_per_epoch=10)
  p = {"context_encoder": {"w": jnp.ones(3)}}
  state = opt.tx.init(p)
  u, _ = opt.tx.update({"context_encoder": {"w": jnp.ones(3)}}, state, p)
  # First Adam step: mhat/sqrt(vhat) = 1 -> update = -lr (the g + wd*p term is positive).
  np.testing.assert_allclose(np.asarray(u["context_encoder"]["w"]), -2e-6, rtol=1e-4)


def test_unknown_kind_raises():
  with pytest.raises(ValueError, match="unknown optimizer kind"):
    optim.default_config("sgd")
  with pytest.raises(ValueError, match="unknown optimizer kind"):
    optim.make_optimizer({"kind": "sgd"}, 10)
