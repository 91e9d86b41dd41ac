"""Scanned layers and remat (models/layout.py): the scanned parameter tree is the unscanned one
stacked, both layouts compute the same outputs, remat changes no gradient, configs saved without
these fields still read, and a run converts parameters of the other layout on load."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contextblip_jax.models import layout
from contextblip_jax.models.blip import Blip
from contextblip_jax.models.contextblip import ContextBlip, ContextBlipConfig, init_params
from contextblip_jax.models.variants import TextConfig, VisionConfig

pytestmark = pytest.mark.usefixtures("xla_optimisations_off")

# Scanned vs unscanned forward of the tiny model: the same float32 math, but XLA may fuse and
# order the per-block reductions differently inside a scan body, so equality is up to float32
# rounding of values of magnitude ~1-10 (measured max 4.8e-7).
FORWARD_ATOL = 2e-6


def _box_names(tree):
  return jax.tree.map(lambda b: (tuple(b.names), tuple(b.value.shape)), tree,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


@pytest.fixture(scope="module")
def tiny_pair():
  """(unscanned config, scanned config, unscanned params, scanned params) of tiny ContextBLIP."""
  c = ContextBlipConfig.for_variant("tiny")
  cs = c.with_layers(scan_layers=True)
  boxed = jax.jit(lambda k: init_params(ContextBlip(c), k, "all"))(jax.random.key(0))
  p = nn.unbox(boxed)
  # random non-trivial values everywhere (LayerNorm scales, biases, embeddings)
  rng = np.random.default_rng(0)
  p = jax.tree.map(lambda x: jnp.asarray(x + 0.05 * rng.standard_normal(x.shape), x.dtype), p)
  return c, cs, p, layout.to_layout(p, True)


def test_scanned_tree_is_the_stacked_unscanned_tree(tiny_pair):
  c, cs, p, ps = tiny_pair
  assert layout.is_scanned(ps) and not layout.is_scanned(p)
  blip = ps["pretrained_blip"]
  assert blip["visual_encoder"]["blocks"]["attn"]["qkv"]["kernel"].shape == (4, 32, 96)
  assert "blocks_0" not in blip["visual_encoder"]
  assert blip["text_encoder"]["encoder"]["layer"]["output"]["kernel"].shape == (2, 64, 32)
  assert ps["visual_decoder"]["encoder"]["layer"]["intermediate"]["kernel"].shape[0] == 2
  assert ps["context_encoder"]["transformer"]["intermediate"]["kernel"].shape[0] == 2
  np.testing.assert_array_equal(blip["visual_encoder"]["blocks"]["mlp"]["fc1"]["kernel"][2],
                                p["pretrained_blip"]["visual_encoder"]["blocks_2"]["mlp"]["fc1"]
                                ["kernel"])
  back = layout.to_layout(ps, False)
  assert jax.tree.structure(back) == jax.tree.structure(p)
  jax.tree.map(np.testing.assert_array_equal, back, p)
  # the scanned model's own init has exactly this tree, with the layer axis named
  direct = jax.eval_shape(lambda k: ContextBlip(cs).init(
      k, jnp.zeros((1, 32, 32, 3)), jnp.ones((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32)),
      jax.random.key(0))["params"]
  stacked = jax.eval_shape(lambda k: init_params(ContextBlip(cs), k, "all"), jax.random.key(0))
  assert _box_names(stacked) == _box_names({k: direct[k] for k in stacked})
  assert _box_names(stacked)["pretrained_blip"]["visual_encoder"]["blocks"]["mlp"]["fc1"][
      "kernel"] == (("layers", "embed", "mlp"), (4, 32, 64))


def test_init_gives_the_same_values_in_both_layouts(tiny_pair):
  c, cs, _, _ = tiny_pair
  a = nn.unbox(jax.jit(lambda k: init_params(ContextBlip(c), k, "pretrain"))(jax.random.key(3)))
  b = nn.unbox(jax.jit(lambda k: init_params(ContextBlip(cs), k, "pretrain"))(jax.random.key(3)))
  jax.tree.map(np.testing.assert_array_equal, layout.to_layout(a, True), b)


def test_to_layout_rejects_gaps_and_keeps_other_trees():
  with pytest.raises(ValueError, match="not 0..L-1"):
    layout.to_layout({"blocks_0": {"w": np.zeros(2)}, "blocks_2": {"w": np.zeros(2)}}, True)
  tree = {"down_0": {"kernel": np.ones((2, 3))}, "fc_2": {"kernel": np.ones(3)}}
  assert layout.to_layout(tree, True).keys() == tree.keys()
  sds = layout.to_layout({"layer_0": {"w": jax.ShapeDtypeStruct((5,), jnp.float32)},
                          "layer_1": {"w": jax.ShapeDtypeStruct((5,), jnp.float32)}}, True)
  assert sds["layer"]["w"].shape == (2, 5)


def _forward(model, params, pixels, ids, mask):
  """Every output the method reads, through the model's own entry points."""
  def run(mod):
    vision = mod.encode_image(pixels)
    embeds = mod.adapt(vision)
    text = mod.multimodal(ids, mask, embeds, return_cross_attentions=True)
    b, p = pixels.shape[0], mod.config.num_patches
    order = jnp.broadcast_to(jnp.arange(p), (b, p))
    recon = mod.reconstruct(embeds[:, :1 + p - 4], text.last_hidden_state, mask, order[:, 4:],
                            order[:, :4])
    states = text.last_hidden_state
    feat = jnp.broadcast_to(states[:, :1], (b, 10, states.shape[-1]))
    kv = mod.pretrained_blip.image_cross_kv(embeds)
    cached = mod.pretrained_blip.multimodal_cached(ids, mask, kv, return_cross_attentions=True)
    return dict(taps=vision.taps, last=vision.last_hidden_state, embeds=embeds,
                states=text.last_hidden_state, cross=text.cross_attentions,
                itc=mod.itc_text_features(ids, mask), recon=recon,
                stage2=mod.stage2_logits(feat, jnp.ones((b,))), kv=kv,
                cached=cached.last_hidden_state, cached_cross=cached.cross_attentions)
  return jax.jit(lambda p: model.apply({"params": p}, method=run))(params)


def test_scanned_forward_equals_unscanned(tiny_pair):
  c, cs, p, ps = tiny_pair
  pixels = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  ids = jnp.array([[101, 2000, 2001, 2002, 102, 0], [101, 3000, 3001, 102, 0, 0]])
  mask = (ids > 0).astype(jnp.int32)
  a = _forward(ContextBlip(c), p, pixels, ids, mask)
  b = _forward(ContextBlip(cs), ps, pixels, ids, mask)
  assert len(b["taps"]) == 4 and len(b["cross"]) == 2 and len(b["kv"]) == 2
  assert len(b["cached_cross"]) == 2 and b["kv"][0][0].shape == (2, 17, 4, 8)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  worst = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a),
                                                             jax.tree.leaves(b)))
  print(f"\nscanned vs unscanned tiny forward: max abs diff {worst:.2e}")
  assert worst <= FORWARD_ATOL
  assert float(jnp.max(jnp.abs(a["recon"]))) > 1e-2      # not a trivially zero comparison


def _loss_and_grads(cfg, params, pixels, ids, mask):
  model = ContextBlip(cfg)

  def loss(p):
    def run(mod):
      embeds = mod.image_embeds(pixels)
      out = mod.multimodal(ids, mask, embeds, deterministic=False, return_cross_attentions=True)
      return jnp.sum(mod.itm_logits(out.last_hidden_state) ** 2) + jnp.sum(out.cross_attentions[0])
    return model.apply({"params": p}, method=run, rngs={"dropout": jax.random.key(5)})
  return jax.jit(jax.value_and_grad(loss)), model


def _has_remat(jaxpr) -> bool:
  """Whether a jaxpr holds a jax.checkpoint (printed `remat2[` or `checkpoint[`)."""
  text = str(jaxpr)
  return "remat2[" in text or "checkpoint[" in text


@pytest.mark.parametrize("scan", [False, True])
def test_remat_changes_no_gradient_and_is_in_the_program(tiny_pair, scan):
  c, cs, p, ps = tiny_pair
  base, params = (cs, ps) if scan else (c, p)
  pixels = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  ids = jnp.array([[101, 2000, 2001, 102]] * 2)
  mask = jnp.ones_like(ids)
  ref_fn, _ = _loss_and_grads(base, params, pixels, ids, mask)
  ref_loss, ref_grads = ref_fn(params)
  for policy in ("full", "dots_saveable"):
    fn, _ = _loss_and_grads(base.with_layers(remat=policy), params, pixels, ids, mask)
    assert _has_remat(jax.make_jaxpr(fn)(params))
    loss, grads = fn(params)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-5),
                 grads, ref_grads)
  assert not _has_remat(jax.make_jaxpr(ref_fn)(params))


def test_configs_without_layer_fields_read_as_unscanned():
  c = ContextBlipConfig.for_variant("tiny").with_layers(scan_layers=True, remat="full")
  d = c.to_dict()
  assert d["blip"]["vision"]["scan_layers"] and d["blip"]["text"]["remat"] == "full"
  assert ContextBlipConfig.from_dict(d) == c
  assert c.decoder_config.scan_layers and c.context_config.remat == "full"
  for part in ("vision", "text"):
    del d["blip"][part]["scan_layers"], d["blip"][part]["remat"]
  old = ContextBlipConfig.from_dict(d)
  assert not old.scan_layers and old.blip.vision.remat == "none"
  with pytest.raises(ValueError, match="unknown remat policy"):
    VisionConfig(remat="some")
  with pytest.raises(ValueError, match="same layout"):
    c.blip.replace(text=dataclasses.replace(c.blip.text, scan_layers=False))
  assert TextConfig().scan_layers is False


def test_run_config_converts_a_source_of_the_other_layout(tiny_pair):
  from configs import evaluate as evaluate_config
  from contextblip_jax.run.model_config import model_config
  from contextblip_jax.storage.param_dir import ParamDir
  c, cs, p, ps = tiny_pair
  cfg = evaluate_config.get_config("tiny")
  for scan, given, saved in ((True, p, c), (False, ps, cs)):
    cfg.model.scan_layers = scan
    cfg.model.remat = "dots_saveable"
    source = ParamDir("src", dict(given), saved, None, {})
    out = model_config(cfg, source)
    assert out.scan_layers == scan and out.blip.text.remat == "dots_saveable"
    assert source.model.scan_layers == scan and layout.is_scanned(source.params) == scan
    jax.tree.map(np.testing.assert_array_equal, source.params, ps if scan else p)


def test_kernel_scale_of_a_fresh_init_is_the_same_in_both_layouts(tiny_pair):
  """run/train.py scales the 2-D ViT / text kernels of a from-scratch init (the demo's
  backbone); the stacked [L, in, out] kernels of the scanned layout get the same factor."""
  from contextblip_jax.run import train
  c, cs, _, _ = tiny_pair
  key = jax.random.key(1)
  plain = nn.unbox(train._init_tree(key, model=ContextBlip(c), tree="backbone",  # pylint: disable=protected-access
                                    kernel_scale=2.0))
  scanned = nn.unbox(train._init_tree(key, model=ContextBlip(cs), tree="backbone",  # pylint: disable=protected-access
                                      kernel_scale=2.0))
  unscaled = nn.unbox(init_params(ContextBlip(c), key, "backbone"))
  qkv = plain["pretrained_blip"]["visual_encoder"]["blocks_0"]["attn"]["qkv"]["kernel"]
  np.testing.assert_array_equal(
      qkv, 2.0 * unscaled["pretrained_blip"]["visual_encoder"]["blocks_0"]["attn"]["qkv"]["kernel"])
  jax.tree.map(np.testing.assert_array_equal, scanned, layout.to_layout(plain, True))


def test_blip_scanned_cross_kv_cache_and_taps():
  """The Blip-level cached path (image_cross_kv / itm_cached) in the scanned layout."""
  c = ContextBlipConfig.for_variant("tiny").blip
  cs = c.with_layers(scan_layers=True)
  px = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
  ids = jnp.array([[101, 2000, 2001, 102, 0]] * 6)
  mask = (ids > 0).astype(jnp.int32)
  p = nn.unbox(Blip(c).init(jax.random.key(0), px[:1], ids[:1], mask[:1]))["params"]
  ps = layout.to_layout(p, True)

  def run(config, params):
    def f(mod):
      e = mod.encode_image(px).last_hidden_state
      kv = mod.image_cross_kv(e)
      return (mod.itm_cached(ids, mask, kv),
              mod.itm(ids, mask, jnp.repeat(e, 2, axis=0)))
    return jax.jit(lambda q: Blip(config).apply({"params": q}, method=f))(params)
  cached_s, full_s = run(cs, ps)
  cached_u, _ = run(c, p)
  np.testing.assert_allclose(cached_s, full_s, atol=1e-6)
  np.testing.assert_allclose(cached_s, cached_u, atol=FORWARD_ATOL)
