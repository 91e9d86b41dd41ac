"""The ContextBlip module: parameter tree and counts (docs/method.md#parameter-counts), visible-only ViT
pass and the reference patch layout, decoder input assembly, context encoder."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contextblip_jax.models.contextblip import (PARAM_GROUPS, ContextBlip, ContextBlipConfig,
                                                init_params, scramble_like_reference,
                                                stage_param_names)
from contextblip_jax.models.mask_decoder import assemble_decoder_input


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


pytestmark = pytest.mark.usefixtures("xla_optimisations_off")


@pytest.fixture(scope="module")
def b16_abstract():
  c = ContextBlipConfig.for_variant("B/16")
  return c, jax.eval_shape(lambda: init_params(ContextBlip(c), jax.random.key(0), "all"))


@pytest.fixture(scope="module")
def tiny():
  c = ContextBlipConfig.for_variant("tiny")
  m = ContextBlip(c)
  boxed = jax.jit(lambda k: init_params(m, k, "all"))(jax.random.key(0))
  return c, m, boxed, nn.unbox(boxed)


def test_b16_parameter_counts(b16_abstract):
  c, boxed = b16_abstract
  p = nn.unbox(boxed)
  counts = {k: _count(v) for k, v in p.items()}
  assert counts["pretrained_blip"] == 223_452_418
  assert counts["vision_adapter"] == 2_359_296                   # delta = 2
  assert counts["text_adapter"] == 589_824
  assert counts["visual_decoder"] == 37_807_104
  assert counts["decoder_pos_embed"] == 151_296
  assert counts["recon_head"] == 590_592
  assert counts["mask_embed"] == 768
  assert counts["context_encoder"] == 14_183_424                 # stage-2 trainable
  assert counts["prediction_layer"] == 769
  pretrain_trainable = [k for k in stage_param_names(c, "pretrain") if k != "pretrained_blip"]
  assert sum(counts[k] for k in pretrain_trainable) == 41_498_880
  assert sum(counts[k] for k in stage_param_names(c, "finetune")) == 239_995_907
  assert p["recon_head"]["kernel"].shape == (768, 16 * 16 * 3)
  assert p["decoder_pos_embed"]["embedding"].shape == (197, 768)


@pytest.mark.slow
def test_b16_objectives_trace(b16_abstract):
  from contextblip_jax.training import objectives
  c, boxed = b16_abstract
  m, p = ContextBlip(c), nn.unbox(boxed)
  sds = jax.ShapeDtypeStruct
  pre = {"image": sds((2, 224, 224, 3), jnp.float32), "input_ids": sds((2, 30), jnp.int32),
         "attention_mask": sds((2, 30), jnp.int32)}
  loss, metrics = jax.eval_shape(lambda p, b: objectives.pretrain_loss(
      p, b, jax.random.key(0), model=m, train=True), p, pre)
  assert loss.shape == () and set(metrics) >= {"itm_loss", "tmim_loss"}


def test_every_parameter_has_logical_axes(b16_abstract):
  _, boxed = b16_abstract
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  spec = nn.get_partition_spec(boxed)
  assert tuple(spec["mask_embed"]) == ("embed",)
  assert tuple(spec["visual_decoder"]["encoder"]["layer_0"]["crossattention"]["key"]
               ["kernel"]) == ("embed", "heads")


def test_stage_trees():
  c = ContextBlipConfig.for_variant("tiny")
  assert set(stage_param_names(c, "pretrain")) == {"pretrained_blip", "vision_adapter",
                                                   *PARAM_GROUPS["tmim"]}
  assert stage_param_names(c.replace(use_tmim=False), "pretrain") == ("pretrained_blip",
                                                                      "vision_adapter")
  assert stage_param_names(c.replace(use_adapter=False), "zero_shot") == ("pretrained_blip",)
  assert set(stage_param_names(c, "finetune")) == {"pretrained_blip", "vision_adapter",
                                                   "prediction_layer", "context_encoder"}
  with pytest.raises(ValueError, match="stage"):
    stage_param_names(c, "stage3")


def test_config_validation_and_roundtrip():
  c = ContextBlipConfig.for_variant("tiny")
  assert c.adapter_taps == (1, 2, 3, 4) and c.decoder_heads == 4 and c.use_tmim
  assert ContextBlipConfig.from_dict(c.to_dict()) == c
  with pytest.raises(ValueError, match="adapter_taps"):
    ContextBlipConfig.for_variant("tiny", adapter_taps=(3, 6, 9, 12))
  with pytest.raises(TypeError, match="mask_token_choice"):   # an objective option now
    ContextBlipConfig.for_variant("tiny", mask_token_choice="all")
  with pytest.raises(ValueError, match="heads"):
    ContextBlipConfig.for_variant("tiny", decoder_heads=5)
  with pytest.raises(ValueError, match="Unknown"):
    ContextBlipConfig.from_dict({"mask_rate": 0.5})


def test_tiny_init_distributions(tiny):
  c, _, _, p = tiny
  d = c.blip.vision.width
  for leaf in (p["mask_embed"], p["decoder_pos_embed"]["embedding"],
               p["context_encoder"]["positional_emb"]["embedding"]):
    assert 0.8 < float(jnp.std(leaf)) < 1.2                      # N(0, 1)
  dec = p["visual_decoder"]["encoder"]["layer_0"]["intermediate"]
  assert 0.015 < float(jnp.std(dec["kernel"])) < 0.025 and not jnp.any(dec["bias"])  # BERT init
  ctx = p["context_encoder"]["transformer_0"]["intermediate"]
  bound = 1 / np.sqrt(d)
  for leaf in (ctx["kernel"], ctx["bias"], p["recon_head"]["kernel"],
               p["text_adapter"]["fc_0"]["kernel"]):           # torch default: U(+-1/sqrt(in))
    assert float(jnp.max(jnp.abs(leaf))) <= bound and float(jnp.std(leaf)) > 0.3 * bound
  assert 0 < float(jnp.abs(p["prediction_layer"]["bias"][0])) <= bound
  assert p["text_adapter"]["fc_0"]["kernel"].shape == (d, d // 2)
  assert set(p["text_adapter"]["fc_0"]) == {"kernel"}            # bias-free


def _pixels(c, b=2, seed=0):
  s = c.blip.vision.image_size
  return jax.random.normal(jax.random.key(seed), (b, s, s, 3))


def _run(model, params, fn, *args):
  """One jitted `model.apply(..., method=fn)` (fn(module, *args) may return any pytree)."""
  return jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=fn))(params, *args)


def test_visible_pass_with_all_patches_equals_the_full_vit(tiny):
  c, m, _, p = tiny
  n = c.num_patches
  ident = jnp.broadcast_to(jnp.arange(n), (2, n))
  perm = jnp.stack([jax.random.permutation(jax.random.key(i), n) for i in range(2)])

  def fn(mod, x, ident, perm):
    return dict(full=mod.encode_image(x).last_hidden_state,
                tokens=mod.pretrained_blip.visual_encoder.embed(x),
                ident_tokens=mod.embed_visible(x, ident),
                ident_states=mod.encode_visible(x, ident).last_hidden_state,
                perm_tokens=mod.embed_visible(x, perm))

  o = _run(m, p, fn, _pixels(c), ident, perm)
  np.testing.assert_allclose(o["ident_tokens"], o["tokens"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(o["ident_states"], o["full"], rtol=1e-5, atol=1e-5)
  # Any order of the visible patches embeds each patch exactly as the full ViT does.
  np.testing.assert_allclose(o["perm_tokens"][:, 1:], jnp.take_along_axis(
      o["tokens"][:, 1:], perm[..., None], 1), atol=1e-6)
  np.testing.assert_allclose(o["perm_tokens"][:, 0], o["tokens"][:, 0], atol=1e-6)


def test_reference_patch_layout_is_the_closed_form_and_the_torch_conv(tiny):
  import torch
  c, _, _, p = tiny
  ps, d = c.blip.vision.patch_size, c.blip.vision.width
  vis_idx = jnp.array([[5, 0, 9], [15, 3, 7]])
  px = _pixels(c, seed=1)
  fn = lambda mod, x, i: (mod.embed_visible(x, i), mod.patchify(x))
  tok, patches = _run(ContextBlip(c.replace(reference_patch_layout=True)), p, fn, px, vis_idx)
  default, _ = _run(ContextBlip(c), p, fn, px, vis_idx)
  vit = p["pretrained_blip"]["visual_encoder"]
  vis = np.take_along_axis(np.asarray(patches), np.asarray(vis_idx)[..., None], 1)
  kernel = np.asarray(vit["patch_embed_kernel"])                 # HWIO [p, p, 3, D]
  w_conv = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))   # torch OIHW [D, 3, p, p]
  closed = vis @ w_conv.reshape(d, -1).T + np.asarray(vit["patch_embed_bias"])
  pos = np.asarray(vit["pos_embed"])[0]
  np.testing.assert_allclose(tok[:, 1:], closed + pos[1 + np.asarray(vis_idx)], atol=1e-5)
  # The released code: patch_embed(unmasked_patches.view(-1, 3, 16, 16)).
  conv = torch.nn.functional.conv2d(torch.tensor(vis.reshape(-1, 3, ps, ps)),
                                    torch.tensor(w_conv),
                                    torch.tensor(np.asarray(vit["patch_embed_bias"])),
                                    stride=ps)
  np.testing.assert_allclose(closed.reshape(-1, d), conv.reshape(-1, d).numpy(), atol=1e-5)
  # The scramble is a fixed permutation of each patch vector (not the identity).
  x = np.arange(3 * ps * ps, dtype=np.float32)
  y = np.asarray(scramble_like_reference(jnp.asarray(x), ps))
  assert not np.array_equal(x, y) and np.array_equal(np.sort(y), x)
  assert not np.allclose(default, tok, atol=1e-3)


def test_decoder_input_is_raster_order_like_the_reference_argsort():
  rng = np.random.default_rng(0)
  b, n, m, d = 2, 8, 3, 4
  perm = np.stack([rng.permutation(n) for _ in range(b)])
  masked_idx, visible_idx = perm[:, :m], perm[:, m:]
  cls, vis, msk = rng.normal(size=(b, d)), rng.normal(size=(b, n - m, d)), rng.normal(
      size=(b, m, d))
  out = assemble_decoder_input(*map(jnp.asarray, (cls, vis, msk, visible_idx, masked_idx)))
  # Reference: argsort([masked_idx ; -1 ; unmasked_idx]) applied to [masked ; CLS ; visible].
  concat = np.concatenate([msk, cls[:, None], vis], 1)
  ids = np.concatenate([masked_idx, -np.ones((b, 1)), visible_idx], 1)
  ref = np.stack([concat[i, np.argsort(ids[i])] for i in range(b)])
  np.testing.assert_allclose(out, ref, rtol=1e-6)


def test_reconstruct_wiring(tiny):
  c, m, _, p = tiny
  rng = np.random.default_rng(1)
  b, n = 2, c.num_patches
  perm = np.stack([rng.permutation(n) for _ in range(b)])
  masked_idx, visible_idx = jnp.asarray(perm[:, :4]), jnp.asarray(perm[:, 4:])
  enc = jnp.asarray(rng.normal(size=(b, 1 + n - 4, c.blip.vision.width)), jnp.float32)
  h = jnp.asarray(rng.normal(size=(b, 5, c.blip.text.hidden_size)), jnp.float32)
  tmask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  # The decoder input built by hand in NumPy, raster order.
  tokens = np.zeros((b, 1 + n, c.blip.vision.width), np.float32)
  tokens[:, 0] = enc[:, 0]
  for i in range(b):
    tokens[i, 1 + perm[i, 4:]] = enc[i, 1:]
    tokens[i, 1 + perm[i, :4]] = (p["mask_embed"] +
                                  p["decoder_pos_embed"]["embedding"][perm[i, :4]])

  def fn(mod, enc, h, tokens):
    pred = mod.reconstruct(enc, h, tmask, visible_idx, masked_idx)
    out = mod.visual_decoder(tokens, h + mod.text_adapter(h), tmask).last_hidden_state
    ref = mod.recon_head(jnp.take_along_axis(out, 1 + masked_idx[..., None], 1))
    padded = mod.reconstruct(enc, h.at[0, 3:].set(100.0), tmask, visible_idx, masked_idx)
    return pred, ref, padded

  pred, ref, padded = _run(m, p, fn, enc, h, jnp.asarray(tokens))
  assert pred.shape == (b, 4, c.blip.vision.patch_size ** 2 * 3)
  np.testing.assert_allclose(pred, ref, rtol=1e-5, atol=1e-5)
  # Padded text positions are ignored by the decoder's cross-attention.
  np.testing.assert_allclose(padded, pred, rtol=1e-5, atol=1e-5)


def test_context_encoder_positions_only_for_video(tiny):
  c, m, _, p = tiny
  k, d = c.num_candidates, c.blip.text.hidden_size
  feat = jax.random.normal(jax.random.key(3), (2, k, d))
  video = jnp.array([1.0, 0.0])

  def fn(mod, feat):
    x = feat[1:]
    for layer in mod.context_encoder.transformer:
      x, _ = layer(x)
    return mod.context_encoder(feat, video), x, mod.stage2_logits(feat, video > 0)

  out, tf_static, logits = _run(m, p, fn, feat)
  # Static set: the positional table has no effect; video set: it does.
  p2 = dict(p, context_encoder=dict(p["context_encoder"], positional_emb={
      "embedding": jnp.zeros((k, d))}))
  out2, _, _ = _run(m, p2, fn, feat)
  np.testing.assert_allclose(out[1], out2[1], rtol=1e-6)
  assert not np.allclose(out[0], out2[0], atol=1e-3)
  # Residual to the un-positioned features: out - feat is the transformer output of x0.
  np.testing.assert_allclose(out[1:] - feat[1:], tf_static, rtol=1e-5, atol=1e-5)
  assert logits.shape == (2, k) and logits.dtype == jnp.float32


def test_model_configs_saved_with_masking_options_still_load():
  """Model configs saved before the masking options moved to the objective carry mask_ratio,
  mask_token_choice, random_mask and mask_noise: they load, and a saved pi of 0 (ITM-only
  pre-training, no TMIM parameters) means no TMIM modules."""
  c = ContextBlipConfig.for_variant("tiny")
  old = {**c.to_dict(), "mask_ratio": 0.25, "mask_token_choice": "reference",
         "random_mask": False, "mask_noise": 0.02}
  del old["use_tmim"]
  assert ContextBlipConfig.from_dict(old) == c
  assert ContextBlipConfig.from_dict({**old, "mask_ratio": 0.0}) == c.replace(use_tmim=False)
