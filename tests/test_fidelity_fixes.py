"""Three behaviours of the reference's training stages (issue 13, items 5-7).

1. Parameters no loss reaches stay bit-identical (torch leaves their gradient None and Adam
   skips them): found from the loss (`train_state.unreached_paths`) and frozen
   (`steps.stage_freeze_rules`; stage 1: itm_head, vision_proj, text_proj).
2. An epoch's last partial fine-tuning batch is kept (ceil(N / B) steps), padded and masked:
   the padded batch's loss, gradients and counts equal those of its real rows alone;
   `drop_remainder=True` gives floor(N / B) steps.
3. Model selection timing (`train.validate_last_epoch`): see
   tests/test_train_loop.py::test_validation_timing (it shares that module's compiled runs).

Micro model of tests/test_steps.py, one CPU device, XLA optimisation level 0.
"""

import functools

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from configs import finetune_stage1, pretrain
from contextblip_jax.data import imagecode as ic
from contextblip_jax.data import pipeline as P
from contextblip_jax.data import synthetic
from contextblip_jax.data.tokenizer import BlipTokenizer
from contextblip_jax.models.contextblip import PARAM_GROUPS, ContextBlip, init_params
from contextblip_jax.parallel import compilation
from contextblip_jax.parallel import sharding as shd
from contextblip_jax.run import validate_config
from contextblip_jax.training import objectives, optim, steps
from contextblip_jax.training.train_state import partition_params, unreached_paths
from tests.test_steps import (PRETRAIN_RULES, STAGE1_RULES, STAGE2_RULES, BACKBONE_RULES,
                              _setup, _stage_params, all_params, finetune_batch, micro_config,
                              pretrain_batch)

assert all_params   # the module-scoped fixture of tests/test_steps.py, used here
FAST = compilation.FAST_COMPILE
STAGE1_UNREACHED = [f"pretrained_blip/{m}/{p}" for m in ("itm_head", "text_proj", "vision_proj")
                    for p in ("bias", "kernel")]


def _loss(name, model, **cfg):
  return functools.partial(objectives.LOSSES[name], model=model,
                           cfg=objectives.ObjectiveConfig(**cfg), train=True)


def _flat(tree):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


# ----------------------------------------------------------------- 1. unreached parameters

def test_unreached_paths_follows_differentiable_paths_only():
  def loss(p, x, rng):
    del rng
    a = jax.lax.stop_gradient(p["a"]) * x                      # cut: no gradient
    pick = jnp.argmax(p["b"]).astype(jnp.float32)              # integer path: no gradient
    zero = 0.0 * p["c"]                                        # a path (gradient 0): reached
    nested = jax.jit(lambda q, y: jnp.sin(q) * y)(p["d"], x)   # through a nested program
    return jnp.sum(a) + pick + jnp.sum(zero) + jnp.sum(nested), {}
  params = {k: jnp.ones(3) for k in "abcde"}                   # e: never used
  got = unreached_paths(loss, params, {}, jnp.ones(3), jax.random.PRNGKey(0))
  assert got == ["a", "b", "e"]


def test_each_stage_finds_what_its_loss_does_not_reach():
  model = ContextBlip(micro_config())
  mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
  cases = [("finetune_stage1", "finetune", STAGE1_RULES, finetune_batch(g=2), {}),
           ("finetune_stage2", "finetune", STAGE2_RULES, finetune_batch(g=2), {}),
           ("pretrain", "pretrain", PRETRAIN_RULES, pretrain_batch(), {}),
           ("backbone", "backbone", BACKBONE_RULES, pretrain_batch(), {}),
           ("pretrain", "pretrain", PRETRAIN_RULES, pretrain_batch(), {"mask_ratio": 0.0})]
  found = []
  for name, tree, rules, batch, cfg in cases:
    init_fn = lambda r, tree=tree: init_params(model, r, tree)
    new_rules, paths = steps.stage_freeze_rules(_loss(name, model, **cfg), init_fn, rules,
                                                batch, mesh=mesh)
    assert new_rules[len(paths):] == rules and all(a == "freeze" for _, a in new_rules[
        :len(paths)])
    found.append(paths)
  assert found[0] == STAGE1_UNREACHED                 # the three heads stage 1 never calls
  assert found[1] == found[2] == found[3] == []       # stage 2, pre-training, backbone
  # ITM-only pre-training of a model that has the TMIM modules: none of them is reached
  tmim = sorted({p.split("/")[0] for p in found[4]})
  assert found[4] and tmim == sorted(PARAM_GROUPS["tmim"])


def test_stage1_step_leaves_unreached_parameters_bit_identical(all_params):
  model = ContextBlip(micro_config(dropout=0.0))
  cfg = optim.default_config("finetune_stage1")      # coupled L2, weight_decay 0.2
  cfg.lrs = {"head": 1e-2, "blip": 1e-3}
  opt = optim.make_optimizer(cfg, steps_per_epoch=1000)
  # the problem: a zero gradient with coupled decay moves a weight
  w = {"w": jnp.full((3,), 0.05)}
  tx = optim.coupled_adam(lambda _: 2e-6, 0.2)
  upd, _ = tx.update({"w": jnp.zeros(3)}, tx.init(w), w)
  assert float(optax.apply_updates(w, upd)["w"][0]) < 0.05
  # the fix, in a real stage-1 step
  mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
  batch, loss_fn = finetune_batch(g=2), _loss("finetune_stage1", model)
  rules, paths = steps.stage_freeze_rules(loss_fn, lambda r: init_params(model, r, "finetune"),
                                          STAGE1_RULES, batch, mesh=mesh)
  assert paths == STAGE1_UNREACHED
  state, compiled, _, b, _ = _setup(model, "finetune", all_params, rules, opt, mesh, loss_fn,
                                    batch, reduction="sum")
  assert not set(_flat(state.trainable)) & set(paths)     # frozen: no optimizer state
  for _ in range(2):
    state, _ = compiled(state, b)
  before = _flat(_stage_params(all_params, model, "finetune"))
  after = {**_flat(state.trainable), **_flat(state.frozen)}
  for p in paths:
    assert after[p].tobytes() == before[p].tobytes(), p
  trained = [p for p, t in partition_flags(before, STAGE1_RULES) if t]
  moved = [p for p in trained if p not in paths and not np.array_equal(after[p], before[p])]
  assert sorted(moved) == sorted(set(trained) - set(paths))


def partition_flags(flat, rules):
  """[(path, trains under `rules`)] for a flat parameter dict."""
  tr, _ = partition_params(traverse_util.unflatten_dict(flat, sep="/"), rules)
  trains = set(traverse_util.flatten_dict(tr, sep="/"))
  return [(p, p in trains) for p in flat]


# ----------------------------------------------------------------- 2. the partial last batch

def _rows(batch, idx):
  return {k: v[np.asarray(idx)] for k, v in batch.items()}


@pytest.mark.parametrize("name,rules", [("finetune_stage1", STAGE1_RULES),
                                        ("finetune_stage2", STAGE2_RULES)])
def test_padded_batch_equals_its_real_rows(all_params, name, rules):
  """3 real rows + 1 padding row (a copy of row 0, example_mask False) against the 3 rows
  alone: same summed loss, gradients and counts; with 2 micro-batches too."""
  model = ContextBlip(micro_config(dropout=0.0))
  tr, fr = partition_params(_stage_params(all_params, model, "finetune"), rules)
  full = finetune_batch(g=4)
  real = _rows(full, [0, 1, 2])
  padded = {**_rows(full, [0, 1, 2, 0]),
            objectives.EXAMPLE_MASK: jnp.array([True, True, True, False])}
  rng = jax.random.PRNGKey(5)

  @functools.partial(jax.jit, static_argnums=1, compiler_options=FAST)
  def run(batch, accum):
    return steps.loss_and_grads(tr, fr, batch, rng, loss_fn=_loss(name, model),
                                accum_steps=accum, reduction="sum")
  (l0, m0), g0 = run(real, 1)
  for accum in ((1, 2) if name == "finetune_stage1" else (1,)):
    (l1, m1), g1 = run(padded, accum)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    assert float(m1["num_examples"]) == 3.0 and float(m1["correct"]) == float(m0["correct"])
    np.testing.assert_allclose(m1["accuracy"], m0["accuracy"], rtol=1e-6)
    np.testing.assert_allclose(m1["loss_mean"], l0 / 3, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), g1, g0)
  # the padding row does count when unmasked (the test can fail)
  (l2, _), _ = run({**padded, objectives.EXAMPLE_MASK: jnp.ones(4, bool)}, 1)
  assert float(l2) > float(l0) * 1.01


def test_batch_rows_keep_or_drop_the_remainder():
  n, g = 23, 6
  base = grain.MapDataset.range(n).shuffle(seed=3).map(lambda i: {"i": i})
  for keep, batches in ((True, 4), (False, 3)):
    shards = [P.BatchRows(base, g, rows, keep_remainder=keep, mask_key="m")
              for rows in ([0, 1, 2], [3, 4, 5])]
    assert all(len(s) == batches * 3 for s in shards)
    for epoch in range(2):
      els = [s[epoch * len(s) + j] for s in shards for j in range(len(s))]
      real = [e["i"] for e in els if e["m"]]
      assert len(real) == len(set(real)) == (n if keep else batches * g)
      pad = [e["i"] for e in els if not e["m"]]
      assert len(pad) == (batches * g - n if keep else 0)
      first = [base[epoch * n + i]["i"] for i in range(batches * g - n)] if keep else []
      assert pad == first                     # padding repeats the epoch's first records
  assert objectives.EXAMPLE_MASK == P.EXAMPLE_MASK


def test_imagecode_epoch_has_ceil_steps_and_each_example_once(tmp_path):
  root = str(tmp_path / "synth")
  synthetic.generate(root, seed=2, n_train_sets=4, n_valid_sets=1, n_test_sets=1, n_pairs=4,
                     image_size=16)
  split = ic.read_imagecode_dir(root, "train")
  n, b = len(split.examples), 4
  assert n % b, "the test needs a partial last batch"
  tok = BlipTokenizer()
  make = lambda drop: P.imagecode_train_pipeline(
      split, image_size=16, global_batch_size=b, seed=0, tokenizer=tok, num_epochs=1,
      augmentation="none", cache_images=True, drop_remainder=drop)
  kept, dropped = make(False), make(True)
  assert kept.steps_per_epoch == -(-n // b) and dropped.steps_per_epoch == n // b
  batches = list(kept)
  assert len(batches) == -(-n // b)
  masks = np.concatenate([x[P.EXAMPLE_MASK] for x in batches])
  assert masks.sum() == n and not masks[n:].any()
  ids = np.concatenate([x["input_ids"] for x in batches])[masks]
  enc = P.TextEncoder(tok, 30, P.pre_caption_imagecode)
  want, _ = enc([e.description for e in split.examples])
  assert sorted(map(tuple, ids.tolist())) == sorted(map(tuple, want.tolist()))
  assert all(x[P.EXAMPLE_MASK].all() for x in dropped)


def test_config_defaults_and_checks():
  f1, pt = finetune_stage1.get_config(), pretrain.get_config()
  assert (f1.data.drop_remainder, pt.data.drop_remainder) == (False, True)
  assert f1.freeze_unreached and pt.freeze_unreached and not f1.train.validate_last_epoch
  validate_config.validate(f1, num_devices=1)
  pt.data.drop_remainder = False
  del f1.train["validate_last_epoch"]          # (the ConfigDict itself refuses a non-bool)
  f1.train.validate_last_epoch = "yes"
  for c, key in ((pt, "data.drop_remainder"), (f1, "train.validate_last_epoch")):
    with pytest.raises(validate_config.ConfigError, match=key):
      validate_config.validate(c, num_devices=1)
