"""Mixed precision (`model.compute_dtype`) and the two attention paths (`model.attention_impl`).

Proofs on the tiny model: bfloat16 compute gives finite float32 scores close to float32 compute
(every head); the logits, softmax outputs, cross-attention probabilities, LayerNorm statistics
and losses are float32 whatever the compute dtype; after a bfloat16 train step the parameters
and optimizer moments are still float32; the scoring command runs with --dtype bfloat16; the
fused path (`jax.nn.dot_product_attention`, attention_impl 'xla') and the explicit float32
softmax (the default 'explicit') give the same outputs on CPU (ViT, BERT self- and
cross-attention, cached keys/values, the whole model's scores); the run config reaches the model (`run/model_config.build_model`, one demo flag for every stage), and cuDNN
off a GPU or in float32 is a clean error.
"""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import demo as demo_config
from configs import evaluate as evaluate_config
from contextblip_jax.evaluation import scorer
from contextblip_jax.models import layers
from contextblip_jax.models.bert import SELF_MASK_VALUE, BertAttention
from contextblip_jax.models.blip import Blip
from contextblip_jax.models.contextblip import (ContextBlip, ContextBlipConfig, init_params,
                                                make_model)
from contextblip_jax.models.variants import get_variant
from contextblip_jax.models.vit import Attention
from contextblip_jax.parallel import compilation
from contextblip_jax.parallel import sharding as shd
from contextblip_jax.run.model_config import build_model
from contextblip_jax.training import losses, objectives, optim, steps
from tests.helpers.checkpoints import make_tiny_checkpoint, random_like

# Small graphs dominated by compile time: XLA optimisations off (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("xla_optimisations_off")

# float32 fused vs explicit attention: the same ops (scores with float32 accumulation, scale,
# bias, float32 softmax, probabilities @ values); one attention measured bit-identical here,
# 1e-6 leaves room for XLA fusing the two programs differently.
PATH_TOL = 1e-6
# Whole model, 'xla' vs 'explicit': XLA fuses the two programs differently (dot_product_attention
# adds a size-1 head-group axis), so float32 rounding differs in the last bits of every block
# (a demo-size loss differs in its 7th digit); 1e-5 is the transformers parity tolerance.
MODEL_PATH_TOL = 1e-5
# bfloat16 vs float32 scores: bfloat16 keeps 8 mantissa bits (2^-8 relative); through the tiny
# model's 4 ViT blocks, adapter and 2 text layers the scores move by ~0.2-0.9% of their scale
# (measured); 2% of the largest |score| is ~5 bfloat16 ulps of the scale.
BF16_REL_TOL = 2e-2


def _micro_config() -> ContextBlipConfig:
  """The tiny variant cut to 2 ViT blocks and 1 text / decoder / context layer."""
  base = get_variant("tiny")
  blip = base.replace(vision=dataclasses.replace(base.vision, depth=2),
                      text=dataclasses.replace(base.text, num_layers=1))
  return ContextBlipConfig(blip=blip, adapter_taps=(1, 2), decoder_heads=4, context_heads=4,
                           decoder_layers=1, context_layers=1)


@pytest.fixture(scope="module")
def tiny():
  """Tiny ContextBLIP config, random float32 parameters of every group, and a batch of sets."""
  config = ContextBlipConfig.for_variant("tiny")
  abstract = jax.eval_shape(lambda r: nn.unbox(init_params(ContextBlip(config), r, "all")),
                            jax.random.key(0))
  params = random_like(abstract, np.random.default_rng(0))
  rng = np.random.default_rng(1)
  g, k, t = 3, 10, 12
  batch = dict(images=jnp.asarray(rng.standard_normal((g, k, 32, 32, 3)), jnp.float32),
               ids=jnp.asarray(rng.integers(1000, 30000, (g, t)), jnp.int32).at[:, 0].set(101),
               mask=jnp.ones((g, t), jnp.int32).at[1, -4:].set(0),
               is_video=jnp.array([True, False, True]))
  return config, params, batch


def _scores(model, params, b, head):
  def f(mod):
    embeds = mod.encode_candidates(b["images"])
    return mod.candidate_scores(embeds, b["ids"], b["mask"], head, b["is_video"])
  return jax.jit(lambda p: model.apply({"params": p}, method=f))(params)


# ----------------------------------------------------------------------------- bf16 vs f32

@pytest.mark.parametrize("head", ["zero_shot", "stage1", "stage2"])
def test_bf16_scores_finite_float32_and_close_to_f32(tiny, head):
  config, params, b = tiny
  ref = _scores(make_model(config, "float32"), params, b, head)
  low = _scores(make_model(config, "bfloat16"), params, b, head)
  assert ref.dtype == low.dtype == jnp.float32 and low.shape == (3, 10)
  assert np.isfinite(np.asarray(low)).all()
  diff = float(jnp.abs(ref - low).max())
  assert 0 < diff <= BF16_REL_TOL * float(jnp.abs(ref).max()), (head, diff)


def test_float32_logits_softmax_and_probabilities_in_bf16_compute(tiny):
  config, params, b = tiny
  model = make_model(config, "bfloat16")
  px = b["images"][0, :2]
  ids, mask = b["ids"][:2], b["mask"][:2]

  def run(mod):
    vision = mod.encode_image(px)
    embeds = mod.adapt(vision)
    mm = mod.multimodal(ids, mask, embeds, return_cross_attentions=True)
    return dict(outs=mod(px, ids, mask), vision=vision.last_hidden_state, embeds=embeds,
                states=mm.last_hidden_state, cross=mm.cross_attentions,
                prob=mod.match_probability(mm.last_hidden_state[:, 0]),
                itc_text=mod.itc_text_features(ids, mask))
  out = jax.jit(lambda p: model.apply({"params": p}, method=run))(params)
  # the compute really is bfloat16 ...
  for name in ("vision", "embeds", "states"):
    assert out[name].dtype == jnp.bfloat16, name
  # ... while logits, softmaxes, probabilities and features are float32
  for name, x in out["outs"].items():
    if name != "recon":        # recon_head: predicted pixels, cast to float32 by mse_loss
      assert x.dtype == jnp.float32, name
  assert out["prob"].dtype == out["itc_text"].dtype == jnp.float32
  assert out["cross"] and all(c.dtype == jnp.float32 for c in out["cross"])
  np.testing.assert_allclose(np.asarray(out["cross"][0]).sum(-1), 1.0, atol=1e-6)


def test_layernorm_statistics_are_float32_in_bf16():
  """A mean of 256 with unit spread: bfloat16 statistics would lose the spread entirely
  (ulp 2 at 256); float32 statistics keep the normalised values to bfloat16 output rounding."""
  x = 256.0 + jax.random.normal(jax.random.key(0), (4, 64))
  ln = layers.LayerNorm(1e-6, dtype=jnp.bfloat16)
  p = ln.init(jax.random.key(1), x)
  y = ln.apply(p, x.astype(jnp.float32))
  want = (x - x.mean(-1, keepdims=True)) / x.std(-1, keepdims=True)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want), atol=3e-2)


def test_losses_are_float32_for_bf16_inputs():
  k = jax.random.split(jax.random.key(0), 3)
  logits = jax.random.normal(k[0], (6, 2)).astype(jnp.bfloat16)
  feat = jax.random.normal(k[1], (4, 8)).astype(jnp.bfloat16)
  pred = jax.random.normal(k[2], (2, 3, 5)).astype(jnp.bfloat16)
  assert losses.itm_loss(logits).dtype == jnp.float32
  assert losses.cross_entropy(logits, jnp.zeros(6, jnp.int32)).dtype == jnp.float32
  assert losses.mse_loss(pred, jnp.zeros(pred.shape, jnp.float32)).dtype == jnp.float32
  loss, sim = losses.itc_loss(feat, feat)
  assert loss.dtype == sim.dtype == jnp.float32
  assert losses.hard_negative_weights(feat @ feat.T).dtype == jnp.float32


def test_bf16_train_step_keeps_float32_params_and_optimizer_moments():
  """One pretraining step (ITM with hard negatives, TMIM; dropout on) in bfloat16 compute with
  every group trainable: parameters and AdamW moments stay float32, the loss is float32."""
  model = make_model(_micro_config(), "bfloat16")
  ocfg = optim.default_config("pretrain")
  ocfg.lr, ocfg.warmup_steps = 1e-2, 1
  opt = optim.make_optimizer(ocfg, steps_per_epoch=100)
  mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
  fast = compilation.FAST_COMPILE
  state, sh = steps.init_train_state(lambda r: init_params(model, r, "pretrain"),
                                     jax.random.PRNGKey(3), tx=opt.tx,
                                     freeze_rules=[(".*", "train")], mesh=mesh,
                                     compiler_options=fast)
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(1000, 2000, (4, 8)), jnp.int32).at[:, 0].set(101)
  batch = {"image": jnp.asarray(rng.standard_normal((4, 32, 32, 3)), jnp.float32),
           "input_ids": ids, "attention_mask": jnp.ones((4, 8), jnp.int32)}
  bsh = shd.batch_shardings(batch, mesh)
  loss_fn = lambda p, bt, r: objectives.pretrain_loss(p, bt, r, model=model, train=True)
  step = steps.make_train_step(loss_fn, opt, sh, bsh, mesh=mesh, donate=False,
                               compiler_options=fast)
  before = jax.tree.map(np.asarray, state.trainable)
  new, metrics = step(state, jax.device_put(batch, bsh))
  assert metrics["loss"].dtype == jnp.float32 and np.isfinite(float(metrics["loss"]))
  floats = [x for x in jax.tree.leaves((new.trainable, new.frozen, new.opt_state))
            if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and all(x.dtype == jnp.float32 for x in floats)
  moments = [x for x in jax.tree.leaves(new.opt_state) if x.ndim >= 2]
  assert len(moments) >= 2 * len([x for x in jax.tree.leaves(new.trainable) if x.ndim >= 2])
  assert any(float(jnp.abs(m).max()) > 0 for m in moments)
  changed = jax.tree.map(lambda a, c: bool(np.any(a != np.asarray(c))), before, new.trainable)
  assert any(jax.tree.leaves(changed))


# ----------------------------------------------------------------------------- scorer

def test_scorer_dtype_bfloat16_runs_and_stays_close(tmp_path, capsys):
  ckpt = make_tiny_checkpoint(tmp_path, with_adapter=True)
  rng = np.random.default_rng(0)
  images = []
  for i in range(3):
    path = str(tmp_path / f"img{i}.png")
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
    images.append(path)
  reports = {}
  for dtype in ("float32", "bfloat16"):
    rc = scorer.main(["--checkpoint", ckpt, "--text", "a dog on the left", "--dtype", dtype,
                      *images])
    out, err = capsys.readouterr()
    assert rc == 0, err
    reports[dtype] = json.loads(out)
  p32 = np.array([r["itm_prob"] for r in reports["float32"]["images"]])
  p16 = np.array([r["itm_prob"] for r in reports["bfloat16"]["images"]])
  assert np.isfinite(p16).all()
  np.testing.assert_allclose(p16, p32, atol=BF16_REL_TOL * np.abs(p32).max())
  with pytest.raises(SystemExit):
    scorer.main(["--checkpoint", ckpt, "--text", "x", "--dtype", "float16", *images])


# ----------------------------------------------------------------------------- attention paths

def _qkv(seed, b=2, lq=7, lk=9, h=4, d=8):
  k = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(k[0], (b, lq, h, d)), jax.random.normal(k[1], (b, lk, h, d)),
          jax.random.normal(k[2], (b, lk, h, d)))


@pytest.mark.parametrize("value", [SELF_MASK_VALUE, float(jnp.finfo(jnp.float32).min)])
def test_fused_attention_equals_explicit_softmax(value):
  q, k, v = _qkv(0)
  bias = layers.padding_bias(jnp.ones((2, 9)).at[1, -3:].set(0), value)
  for b in (None, bias):
    ctx, _ = jax.jit(layers.attention)(q, k, v, b)
    fused = jax.jit(layers.fused_attention)(q, k, v, b)
    assert fused.dtype == jnp.float32
    assert float(jnp.abs(fused - ctx).max()) <= PATH_TOL
  low = layers.fused_attention(q, k, v, bias, dtype=jnp.bfloat16)
  assert low.dtype == jnp.bfloat16 and np.isfinite(np.asarray(low, np.float32)).all()


def test_vit_attention_fused_equals_explicit():
  x = jax.random.normal(jax.random.key(0), (2, 17, 32))
  attn = Attention(32, 4, impl="xla")
  p = attn.init(jax.random.key(1), x)

  def explicit(mod, x):
    qkv = mod.qkv(x).reshape(2, 17, 3, 4, -1)
    ctx, _ = layers.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    return mod.proj(ctx.reshape(2, 17, 32))
  fused = jax.jit(lambda p, x: attn.apply(p, x))(p, x)
  ref = jax.jit(lambda p, x: attn.apply(p, x, method=explicit))(p, x)
  assert float(jnp.abs(fused - ref).max()) <= PATH_TOL


def test_bert_attention_paths_equal_and_dropout_keeps_the_explicit_path():
  config = dataclasses.replace(get_variant("tiny").text, attention_dropout=0.1,
                               attention_impl="xla")
  mod = BertAttention(config, 32)
  h = jax.random.normal(jax.random.key(0), (4, 6, 32))
  ctx = jax.random.normal(jax.random.key(1), (2, 11, 32))
  bias = layers.padding_bias(jnp.ones((2, 11)).at[1, -4:].set(0), SELF_MASK_VALUE)
  p = nn.Module.init(mod, jax.random.key(2), h[:2], ctx, bias, True)   # `init` is a field
  rep = lambda x: jnp.repeat(x, 2, axis=0)

  @jax.jit
  def run(p):
    full = {r: mod.apply(p, h, rep(ctx), rep(bias), True, return_probs=r) for r in (True, False)}
    kv = mod.apply(p, ctx, method=BertAttention.project_kv)
    cached = {r: mod.apply(p, h, kv, bias, True, r, method=BertAttention.attend_cached)
              for r in (True, False)}
    return full, cached
  full, cached = run(p)
  assert full[False][1] is None and cached[False][1] is None       # fused: no probabilities
  assert full[True][1].dtype == jnp.float32
  for out in (full[False][0], cached[True][0], cached[False][0]):
    assert float(jnp.abs(out - full[True][0]).max()) <= PATH_TOL
  np.testing.assert_allclose(cached[True][1], full[True][1], atol=PATH_TOL)
  # training with attention dropout: the explicit path (dropout acts on the probabilities)
  _, probs = mod.apply(p, h[:2], ctx, bias, False, return_probs=False,
                       rngs={"dropout": jax.random.key(3)})
  assert probs is not None
  # attention_impl 'explicit' (the default): never the fused path
  plain = BertAttention(dataclasses.replace(config, attention_impl="explicit"), 32)
  out, probs = plain.apply(p, h, rep(ctx), rep(bias), True, return_probs=False)
  assert probs is not None
  assert float(jnp.abs(out - full[True][0]).max()) <= PATH_TOL


def test_blip_cross_attention_paths_equal(tiny):
  """Multimodal with the cross-attention probabilities (explicit) and without (fused)."""
  config, params, b = tiny
  blip, p = Blip(config.blip.with_attention("xla")), {"params": params["pretrained_blip"]}
  px, ids, mask = b["images"][0, :2], b["ids"][1:3], b["mask"][1:3]

  @jax.jit
  def run(p):
    embeds = blip.apply(p, px, method=Blip.encode_image).last_hidden_state
    a = blip.apply(p, ids, mask, embeds, return_cross_attentions=True, method=Blip.multimodal)
    f = blip.apply(p, ids, mask, embeds, method=Blip.multimodal)
    return a, f
  a, f = run(p)
  assert len(a.cross_attentions) == config.blip.text.num_layers and not f.cross_attentions
  assert float(jnp.abs(a.last_hidden_state - f.last_hidden_state).max()) <= PATH_TOL


@pytest.mark.parametrize("head", ["zero_shot", "stage2"])
def test_xla_attention_scores_match_explicit(tiny, head):
  config, params, b = tiny
  ref = _scores(make_model(config, "float32", "explicit"), params, b, head)
  fused = _scores(make_model(config, "float32", "xla"), params, b, head)
  assert float(jnp.abs(ref - fused).max()) <= MODEL_PATH_TOL


# ----------------------------------------------------------------------------- configuration

def test_build_model_takes_dtype_and_attention_from_the_run_config():
  cfg = evaluate_config.get_config("tiny")
  assert cfg.model.compute_dtype == "float32" and cfg.model.attention_impl == "explicit"
  model = build_model(cfg)
  assert model.dtype == jnp.float32 and model.param_dtype == jnp.float32
  cfg.model.compute_dtype = "bfloat16"
  model = build_model(cfg)
  assert model.dtype == jnp.bfloat16 and model.param_dtype == jnp.float32
  c = model.config
  assert {c.blip.vision.attention_impl, c.blip.text.attention_impl,
          c.decoder_config.attention_impl, c.context_config.attention_impl} == {"explicit"}
  cfg.model.attention_impl = "xla"
  c = build_model(cfg).config
  assert {c.blip.vision.attention_impl, c.blip.text.attention_impl,
          c.decoder_config.attention_impl, c.context_config.attention_impl} == {"xla"}
  cfg.model.compute_dtype = "float16"
  with pytest.raises(ValueError, match="compute dtype"):
    build_model(cfg)
  config = ContextBlipConfig.for_variant("tiny")
  with pytest.raises(ValueError, match="bfloat16"):
    make_model(config, "float32", "cudnn")
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="GPU"):
      make_model(config, "bfloat16", "cudnn")
  with pytest.raises(ValueError, match="attention implementation"):
    make_model(config, "float32", "flash")


def test_demo_one_flag_switches_every_stage():
  c = demo_config.get_config("tiny")
  c.lock()
  assert {s.model.compute_dtype for s in c.stages.values()} == {"float32"}
  c.model.compute_dtype = "bfloat16"          # what --config.model.compute_dtype=bfloat16 does
  assert {s.model.compute_dtype for s in c.stages.values()} == {"bfloat16"}
