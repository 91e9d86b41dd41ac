"""Sharded training steps on 8 forced CPU devices (tests/conftest.py).

Proofs: a (data=4, fsdp=2) step equals the one-device step; frozen parameters are bit-identical
after steps and carry no optimizer state; no backward pass through a frozen ViT (FLOPs);
gradient accumulation equals the un-accumulated step; every loss (backbone in bf16 compute,
pretrain ITM and TMIM, fine-tuning stages 1 and 2) goes down over a few hundred tiny steps.

Every program here is compiled with XLA's backend optimisation level 0: identical numerics,
several times faster compiles (the steps are milliseconds either way).
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from contextblip_jax.training import objectives
from contextblip_jax.training import optim
from contextblip_jax.training import masking, steps
from contextblip_jax.parallel import compilation
from contextblip_jax.parallel import sharding as shd
from contextblip_jax.models import layers
from contextblip_jax.models.contextblip import (ContextBlip, ContextBlipConfig, init_params,
                                                stage_param_names)
from contextblip_jax.models.variants import get_variant
from contextblip_jax.training.train_state import (merge_params, partition_params,
                                                  trainable_paths)

FAST = compilation.FAST_COMPILE
# The freeze rules of the stage configs (configs/*.py, docs/method.md#freezing), over each stage's tree.
PRETRAIN_RULES = [("pretrained_blip/.*", "freeze"), (".*", "train")]
BACKBONE_RULES = [(".*", "train")]
STAGE1_RULES = [("context_encoder/.*", "freeze"), (".*", "train")]
STAGE2_RULES = [("context_encoder/.*", "train"), (".*", "freeze")]
VIT_FROZEN_STAGE1_RULES = [("pretrained_blip/visual_encoder/.*", "freeze")] + STAGE1_RULES


# ----------------------------------------------------------------------------- fixtures

def micro_config(dropout: float = 0.1) -> ContextBlipConfig:
  """The tiny variant cut to 2 ViT blocks / 1 text, decoder and context layer (fast compile)."""
  base = get_variant("tiny")
  text = dataclasses.replace(base.text, num_layers=1, hidden_dropout=dropout,
                             attention_dropout=dropout)
  blip = base.replace(vision=dataclasses.replace(base.vision, depth=2), text=text)
  return ContextBlipConfig(blip=blip, adapter_taps=(1, 2), decoder_heads=4, context_heads=4,
                           decoder_layers=1, context_layers=1)


def smooth_images(key, n: int, size: int = 32) -> jax.Array:
  """Per-image random colour gradients (predictable masked patches for TMIM)."""
  a = jax.random.normal(key, (n, 1, 1, 3, 3))
  y, x = jnp.meshgrid(jnp.linspace(-1, 1, size), jnp.linspace(-1, 1, size), indexing="ij")
  basis = jnp.stack([x, y, jnp.ones_like(x)], -1)[None, :, :, None, :]   # [1, S, S, 1, 3]
  return jnp.sum(a * basis, -1)                                            # [n, S, S, 3]


def pretrain_batch(b: int = 8, t: int = 8) -> dict:
  k1, k2 = jax.random.split(jax.random.PRNGKey(1))
  ids = jax.random.randint(k2, (b, t), 1000, 2000).at[:, 0].set(101).at[:, -1].set(102)
  mask = jnp.ones((b, t), jnp.int32).at[1::2, -2:].set(0)
  return {"image": smooth_images(k1, b), "input_ids": ids * mask, "attention_mask": mask}


def finetune_batch(g: int = 4, k: int = 10, t: int = 8) -> dict:
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(2), 3)
  return {"images": smooth_images(k1, g * k).reshape(g, k, 32, 32, 3),
          "input_ids": jax.random.randint(k2, (g, t), 1000, 2000).at[:, 0].set(101),
          "attention_mask": jnp.ones((g, t), jnp.int32),
          "label": jax.random.randint(k3, (g,), 0, k),
          "is_video": jnp.arange(g) % 2 == 0}


def _host(tree):
  return jax.tree.map(np.asarray, tree)


@pytest.fixture(scope="module")
def all_params():
  """Every parameter of the micro model, drawn with NumPy from the abstract tree (no init
  program to compile): Dense kernels N(0, 1/fan_in), LayerNorm scale 1, biases 0, other
  tables N(0, 0.02^2). Unit-scale kernels matter: a random BLIP at BERT's 0.02 init is almost
  blind to its image input (cross-attention adds ~1e-3 of the residual), so a *frozen* random
  BLIP would leave the adapter (pretraining) and the context encoder (stage 2) nothing to learn.
  """
  model = ContextBlip(micro_config())
  abstract = jax.eval_shape(lambda r: nn.unbox(init_params(model, r, "all")),
                            jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = path[-1].key
    if name == "scale":
      return np.ones(leaf.shape, np.float32)
    if name == "bias":
      return np.zeros(leaf.shape, np.float32)
    std = leaf.shape[0] ** -0.5 if name == "kernel" and len(leaf.shape) == 2 else 0.02
    return (rng.standard_normal(leaf.shape) * std).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, abstract)


def _stage_params(params, model, stage):
  return {k: params[k] for k in stage_param_names(model.config, stage)}


def _loss(name, model, train=True):
  return functools.partial(objectives.LOSSES[name], model=model, cfg=None, train=train)


def _setup(model, stage, params, rules, opt, mesh, loss_fn, batch, **kw):
  state, sh = steps.init_train_state(lambda r: init_params(model, r, stage),
                                     jax.random.PRNGKey(3), tx=opt.tx, freeze_rules=rules,
                                     mesh=mesh, params=_stage_params(params, model, stage),
                                     compiler_options=FAST)
  bsh = shd.batch_shardings(batch, mesh)
  step = steps.make_train_step(loss_fn, opt, sh, bsh, mesh=mesh, compiler_options=FAST, **kw)
  compiled, report = compilation.compile_step(step, state, batch, mesh=mesh)
  return state, compiled, report, jax.device_put(batch, bsh), step


def _pretrain_opt():
  cfg = optim.default_config("pretrain")
  cfg.lr, cfg.warmup_steps = 1e-2, 5
  return optim.make_optimizer(cfg, steps_per_epoch=10_000)


@pytest.fixture(scope="module")
def pretrain_runs(all_params):
  """Two pretraining steps on one device and on a (data=4, fsdp=2) mesh."""
  model, batch, opt = ContextBlip(micro_config()), pretrain_batch(), _pretrain_opt()
  out = {}
  for name, mesh in (("single", shd.make_mesh({"data": 1}, jax.devices()[:1])),
                     ("sharded", shd.make_mesh({"data": 4, "fsdp": 2}))):
    state, compiled, report, b, jitted = _setup(model, "pretrain", all_params,
                                                PRETRAIN_RULES, opt, mesh,
                                                _loss("pretrain", model), batch)
    frozen0 = _host(state.frozen)
    metrics = []
    for _ in range(2):
      state, m = compiled(state, b)
      metrics.append(_host(m))
    out[name] = dict(state=state, compiled=compiled, report=report, batch=b, metrics=metrics,
                     frozen0=frozen0, jitted=jitted, mesh=mesh)
  out["params"] = all_params
  return out


# ----------------------------------------------------------------------------- train_state

def test_partition_merge_first_match_wins():
  p = {"pretrained_blip": {"vit": {"w": 1}, "head": {"w": 2}}, "adapter": {"w": 3}}
  rules = [("pretrained_blip/head/.*", "train"), ("pretrained_blip/.*", "freeze"), (".*", "train")]
  tr, fr = partition_params(p, rules)
  assert tr == {"pretrained_blip": {"head": {"w": 2}}, "adapter": {"w": 3}}
  assert fr == {"pretrained_blip": {"vit": {"w": 1}}}
  assert merge_params(tr, fr) == p
  with pytest.raises(ValueError, match="matches no freeze rule"):
    trainable_paths(p, [("adapter/.*", "train")])
  with pytest.raises(ValueError, match="kind must be"):
    trainable_paths(p, [(".*", "trainable")])
  with pytest.raises(ValueError, match="both trainable and frozen"):
    merge_params(tr, tr)


def test_pretrain_freeze_rules_train_exactly_the_spec_groups(all_params):
  model = ContextBlip(micro_config())
  tr, fr = partition_params(_stage_params(all_params, model, "pretrain"), PRETRAIN_RULES)
  assert set(tr) == {"vision_adapter", "text_adapter", "visual_decoder", "decoder_pos_embed",
                     "recon_head", "mask_embed"}
  tr2, fr2 = partition_params(_stage_params(all_params, model, "finetune"), STAGE2_RULES)
  assert set(tr2) == {"context_encoder"} and "prediction_layer" in fr2


# ----------------------------------------------------------------------------- sharding proof

def test_sharded_step_equals_single_device_step(pretrain_runs):
  """Same losses, metrics and updated parameters on (data=4, fsdp=2) as on one device.

  float32, rtol 1e-5 on the losses and metrics, rtol 1e-5 + atol 1e-7 on the parameters after
  two AdamW steps (updates are ~lr = 2e-3). Excluded: attention *key biases*, whose gradient is
  exactly zero in exact arithmetic (softmax over keys ignores the constant q.b_k); what comes
  out is ~1e-12 of reduction-order noise that Adam (eps 1e-8) turns into updates of arbitrary
  sign up to ~lr * g / eps. For those only |update| <= lr is checked.
  """
  s, m = pretrain_runs["single"], pretrain_runs["sharded"]
  for a, b in zip(s["metrics"], m["metrics"]):
    for k in ("loss", "itm_loss", "tmim_loss", "itm_accuracy", "grad_norm"):
      np.testing.assert_allclose(b[k], a[k], rtol=1e-5, err_msg=k)
  assert s["metrics"][0]["loss"] != s["metrics"][1]["loss"]
  np.testing.assert_allclose(s["metrics"][1]["lr"], 1e-6 + (1e-2 - 1e-6) / 5, rtol=1e-6)
  before = traverse_util.flatten_dict(pretrain_runs["params"])
  single = traverse_util.flatten_dict(_host(s["state"].trainable))
  sharded = traverse_util.flatten_dict(_host(m["state"].trainable))
  assert single.keys() == sharded.keys()
  for path, a in single.items():
    if path[-2:] == ("key", "bias"):
      for p in (a, sharded[path]):
        assert np.max(np.abs(p - before[path])) <= 2 * 2e-3 * (1 + 1e-4)
      continue
    np.testing.assert_allclose(sharded[path], a, rtol=1e-5, atol=1e-7, err_msg="/".join(path))
  # The sharded state really is sharded as the rules say.
  kernel = m["state"].trainable["visual_decoder"]["encoder"]["layer_0"]["intermediate"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert len(kernel.addressable_shards) == 8
  assert kernel.addressable_shards[0].data.shape == (kernel.shape[0] // 2, kernel.shape[1])
  assert int(m["state"].step) == 2


def test_frozen_params_bit_identical_and_without_optimizer_state(pretrain_runs):
  for run in (pretrain_runs["single"], pretrain_runs["sharded"]):
    after = traverse_util.flatten_dict(_host(run["state"].frozen))
    before = traverse_util.flatten_dict(run["frozen0"])
    assert after.keys() == before.keys() and len(after) > 50
    for k in before:
      assert np.array_equal(after[k], before[k]), k
    opt_paths = ["/".join(str(getattr(p, "key", p)) for p in path)
                 for path, _ in jax.tree_util.tree_flatten_with_path(run["state"].opt_state)[0]]
    assert not [p for p in opt_paths if "pretrained_blip" in p]
    n_trainable = len(jax.tree.leaves(run["state"].trainable))
    assert sum("mu" in p for p in opt_paths) == n_trainable   # one Adam moment per leaf


def test_compile_report_has_flops_and_memory(pretrain_runs):
  rep = pretrain_runs["single"]["report"]
  assert rep["flops"] > 1e6 and rep["argument_bytes"] > 1e5 and rep["temp_bytes"] > 0
  assert rep["compile_s"] > 0
  # The sharded program's FLOPs are per device: well below the one-device program's.
  assert pretrain_runs["sharded"]["report"]["flops"] < 0.5 * rep["flops"]


# ----------------------------------------------------------------------------- no ViT backward

def _lowered_flops(fn, *args) -> float:
  return float(fn.lower(*args).cost_analysis()["flops"])


def test_frozen_vit_gets_no_backward_pass(all_params):
  """Gradients only w.r.t. trainable leaves: a frozen ViT gets no backward pass.

  Fine-tuning stage 1 (the loss has no stop_gradient): freezing the ViT removes r ViT forwards
  of FLOPs from the step (its backward: dX and dW), r > 1.3 (~2 in theory, less for the
  patch embedding, whose input needs no gradient).
  Pretraining (ViT frozen): the whole backward pass (step - forward-only loss) costs less than
  r times the two ViT forwards (full image and visible patches) would alone.
  FLOPs from XLA's cost analysis of the lowered programs (no compile needed).
  """
  model = ContextBlip(micro_config(dropout=0.0))
  mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
  opt = optim.make_optimizer(optim.default_config("finetune_stage1"), 100)
  batch = finetune_batch(g=2)
  flops = {}
  for label, rules in (("vit_trains", STAGE1_RULES), ("vit_frozen", VIT_FROZEN_STAGE1_RULES)):
    abstract, sh, _ = steps.abstract_train_state(
        lambda r: init_params(model, r, "finetune"), tx=opt.tx, freeze_rules=rules, mesh=mesh)
    fn = steps.make_train_step(_loss("finetune_stage1", model), opt, sh,
                               shd.batch_shardings(batch, mesh), mesh=mesh)
    flops[label] = _lowered_flops(fn, abstract, batch)
  images = batch["images"].reshape((-1,) + batch["images"].shape[2:])
  vit = _lowered_flops(jax.jit(functools.partial(model.apply, method=ContextBlip.encode_image)),
                       {"params": all_params}, images)
  r = (flops["vit_trains"] - flops["vit_frozen"]) / vit
  print(f"\nstage-1 step FLOPs: ViT trains {flops['vit_trains']:.4g}, ViT frozen "
        f"{flops['vit_frozen']:.4g}, ViT forward {vit:.4g}: ViT backward = {r:.2f} forwards")
  assert r > 1.3

  pm, pb, popt = ContextBlip(micro_config()), pretrain_batch(), _pretrain_opt()
  lf = _loss("pretrain", pm)
  fwd = _lowered_flops(jax.jit(lambda p, b, k: lf(p, b, k)[0]),
                       _stage_params(all_params, pm, "pretrain"), pb,
                       jax.random.PRNGKey(0))
  abstract, sh, _ = steps.abstract_train_state(lambda r: init_params(pm, r, "pretrain"), tx=popt.tx,
                                               freeze_rules=PRETRAIN_RULES, mesh=mesh)
  step = _lowered_flops(steps.make_train_step(lf, popt, sh, shd.batch_shardings(pb, mesh),
                                              mesh=mesh), abstract, pb)
  c = pm.config
  m = masking.num_masked(masking.DEFAULT_MASK_RATIO, c.num_patches)
  visible = jnp.broadcast_to(jnp.arange(m, c.num_patches),
                             (pb["image"].shape[0], c.num_patches - m))
  vit_full = _lowered_flops(jax.jit(functools.partial(pm.apply, method=ContextBlip.encode_image)),
                            {"params": all_params}, pb["image"])
  vit_vis = _lowered_flops(jax.jit(functools.partial(pm.apply,
                                                     method=ContextBlip.encode_visible)),
                           {"params": all_params}, pb["image"], visible)
  print(f"pretrain: step {step:.4g}, forward {fwd:.4g} (backward {step - fwd:.4g}); ViT "
        f"forwards {vit_full + vit_vis:.4g} (a ViT backward would add {r * (vit_full + vit_vis):.4g})")
  assert step - fwd < r * (vit_full + vit_vis)


# ----------------------------------------------------------------------------- accumulation

class _Toy(nn.Module):
  @nn.compact
  def __call__(self, x):
    return layers.Dense(4, axes=("embed", "mlp"))(x)


def _toy_loss(params, batch, rng, *, reduction):
  pred = _Toy().apply({"params": params}, batch["x"])
  per = jnp.sum((pred - batch["y"]) ** 2, -1)                          # [B]
  loss = jnp.sum(per) if reduction == "sum" else jnp.mean(per)
  return loss, {"mean_err": jnp.mean(per), "correct": jnp.sum(per < 1.0)}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_accumulation_equals_full_batch_step(reduction):
  mesh = shd.make_mesh({"data": 4, "fsdp": 2})
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  batch = {"x": jax.random.normal(k1, (16, 8)), "y": jax.random.normal(k2, (16, 4))}
  init_fn = lambda r: _Toy().init(r, jnp.zeros((1, 8)))["params"]
  tx = optax.adam(0.1)
  loss_fn = functools.partial(_toy_loss, reduction=reduction)
  results = []
  for accum in (1, 4):
    state, sh = steps.init_train_state(init_fn, jax.random.PRNGKey(1), tx=tx,
                                       freeze_rules=[(".*", "train")], mesh=mesh)
    assert state.trainable["Dense_0"]["kernel"].sharding.spec == \
        jax.sharding.PartitionSpec("fsdp", "tensor")
    step = steps.make_train_step(loss_fn, tx, sh, shd.batch_shardings(batch, mesh), mesh=mesh,
                                 accum_steps=accum, reduction=reduction)
    state, m = step(state, batch)
    results.append((_host(state.trainable), _host(m)))
  (p1, m1), (p4, m4) = results
  for k in ("loss", "mean_err", "correct", "grad_norm"):
    np.testing.assert_allclose(m4[k], m1[k], rtol=1e-6, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7), p1, p4)
  with pytest.raises(ValueError, match="not divisible by accum_steps"):
    steps.make_train_step(loss_fn, tx, sh, shd.batch_shardings(batch, mesh), mesh=mesh,
                          accum_steps=3, reduction=reduction)(state, batch)


def test_init_with_given_params_and_eval_step():
  mesh = shd.make_mesh({"data": 4, "fsdp": 2})
  init_fn = lambda r: _Toy().init(r, jnp.zeros((1, 8)))["params"]
  given = {"Dense_0": {"kernel": np.arange(32, dtype=np.float32).reshape(8, 4)}}
  state, sh = steps.init_train_state(init_fn, jax.random.PRNGKey(1), tx=optax.sgd(0.1),
                                     freeze_rules=[(".*/bias", "freeze"), (".*", "train")],
                                     mesh=mesh, params=given)
  k = state.trainable["Dense_0"]["kernel"]
  np.testing.assert_array_equal(np.asarray(k), given["Dense_0"]["kernel"])
  assert k.sharding == sh.trainable["Dense_0"]["kernel"]
  np.testing.assert_array_equal(np.asarray(state.frozen["Dense_0"]["bias"]), 0.0)
  with pytest.raises(ValueError, match="not in the model"):
    steps.init_train_state(init_fn, jax.random.PRNGKey(1), tx=optax.sgd(0.1),
                           freeze_rules=[(".*", "train")], mesh=mesh, params={"x": 1.0})
  with pytest.raises(ValueError, match="has shape"):
    steps.init_train_state(init_fn, jax.random.PRNGKey(1), tx=optax.sgd(0.1),
                           freeze_rules=[(".*", "train")], mesh=mesh,
                           params={"Dense_0": {"bias": np.zeros(3)}})
  batch = {"x": jnp.ones((8, 8)), "y": jnp.zeros((8, 4))}
  ev = steps.make_eval_step(functools.partial(_toy_loss, reduction="mean"), sh,
                            shd.batch_shardings(batch, mesh), mesh=mesh)
  m = ev(state, batch)
  want = np.mean(np.sum((np.ones((8, 8)) @ given["Dense_0"]["kernel"]) ** 2, -1))
  np.testing.assert_allclose(m["loss"], want, rtol=1e-6)
  assert int(state.step) == 0   # eval does not update (nor donate) the state


# ----------------------------------------------------------------------------- losses go down

def _train(compiled, state, batch, n):
  hist = []
  for _ in range(n):
    state, m = compiled(state, batch)
    hist.append(m)
  return state, [_host(m) for m in hist]


def _drop(hist, key, window=10):
  first = float(np.mean([m[key] for m in hist[:window]]))
  last = float(np.mean([m[key] for m in hist[-window:]]))
  print(f"{key}: first {window} steps {first:.4f} -> last {window} steps {last:.4f}")
  return first, last


def test_pretrain_itm_and_tmim_losses_decrease(pretrain_runs):
  run = pretrain_runs["single"]
  _, hist = _train(run["compiled"], run["state"], run["batch"], 250)
  hist = run["metrics"] + hist
  i0, i1 = _drop(hist, "itm_loss", window=30)
  t0, t1 = _drop(hist, "tmim_loss")
  assert i1 < i0 - 0.04
  assert t1 < 0.3 * t0


def test_backbone_loss_decreases_in_bf16_compute(all_params):
  """BLIP from scratch (ITC + ITM), bfloat16 compute: float32 parameters, float32 loss."""
  model = ContextBlip(micro_config(), dtype=jnp.bfloat16)
  cfg = optim.default_config("adamw_cosine")
  cfg.lr, cfg.warmup_steps, cfg.total_steps = 3e-3, 5, 1000
  opt = optim.make_optimizer(cfg, steps_per_epoch=100)
  mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
  state, compiled, _, b, _ = _setup(model, "backbone", all_params, BACKBONE_RULES,
                                    opt, mesh, _loss("backbone", model), pretrain_batch())
  state, hist = _train(compiled, state, b, 80)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.trainable))
  assert hist[0]["loss"].dtype == np.float32
  c0, c1 = _drop(hist, "itc_loss")
  m0, m1 = _drop(hist, "itm_loss")
  assert c1 < 0.3 * c0 and m1 < 0.7 * m0


def test_finetune_stage1_loss_decreases_with_accumulation(all_params):
  """Stage 1, gradients summed over 2 micro-batches of 1 example (as the reference's 36)."""
  model = ContextBlip(micro_config(dropout=0.0))
  cfg = optim.default_config("finetune_stage1")
  cfg.lrs = {"head": 1e-2, "blip": 1e-3}
  opt = optim.make_optimizer(cfg, steps_per_epoch=1000)
  mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
  state, compiled, _, b, _ = _setup(model, "finetune", all_params, STAGE1_RULES, opt, mesh,
                                    _loss("finetune_stage1", model), finetune_batch(g=2),
                                    accum_steps=2, reduction="sum")
  _, hist = _train(compiled, state, b, 60)
  assert hist[0]["num_examples"] == 2 and set(hist[0]) >= {"lr_head", "lr_blip", "correct"}
  l0, l1 = _drop(hist, "loss")
  assert l1 < 0.5 * l0


def test_finetune_stage2_loss_decreases(all_params):
  model = ContextBlip(micro_config(dropout=0.0))
  cfg = optim.default_config("finetune_stage2")
  cfg.lrs = {"context": 1e-2}
  opt = optim.make_optimizer(cfg, steps_per_epoch=1000)
  mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
  state, compiled, _, b, _ = _setup(model, "finetune", all_params, STAGE2_RULES, opt, mesh,
                                    _loss("finetune_stage2", model), finetune_batch(g=2),
                                    reduction="sum")
  frozen0 = _host(state.frozen)
  state, hist = _train(compiled, state, b, 100)
  l0, l1 = _drop(hist, "loss")
  assert l1 < 0.5 * l0
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), frozen0, _host(state.frozen))
