"""Per-stage objectives (contextblip_jax/training/objectives.py) on a small config: finite losses, the
gradient reaches what trains and not what the reference runs under no_grad, eval scores."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contextblip_jax.training import objectives as O
from contextblip_jax.models.blip import Blip
from contextblip_jax.models.contextblip import ContextBlip, ContextBlipConfig, init_params
from contextblip_jax.models.variants import get_variant

B, T, G, K = 4, 8, 2, 10


pytestmark = pytest.mark.usefixtures("xla_optimisations_off")


def _config(**kw):
  b = get_variant("tiny", 24)                                   # 3 x 3 patches of 8 px
  b = b.replace(vision=dataclasses.replace(b.vision, depth=2),
                text=dataclasses.replace(b.text, num_layers=1))
  return ContextBlipConfig(blip=b, adapter_taps=(1, 2), decoder_layers=1, decoder_heads=4,
                           context_layers=1, context_heads=4, **kw)


@pytest.fixture(scope="module")
def setup():
  c = _config()
  m = ContextBlip(c)
  # Random values of the right shapes (the real initialisers are tested in
  # test_contextblip_model.py); skipping the init compile keeps this module fast.
  shapes = jax.eval_shape(lambda: nn.unbox(init_params(m, jax.random.key(0), "all")))
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.asarray((1.0 if path[-1].key == "scale" else 0.0) +
                                  rng.normal(0, 0.05, x.shape), x.dtype), shapes)
  s = c.blip.vision.image_size
  ids = np.zeros((B, T), np.int32)
  for i, n in enumerate([3, 4, 5, 6]):
    ids[i, :n + 2] = [101] + list(range(2000 + i, 2000 + i + n)) + [102]
  ids = jnp.asarray(ids)
  mask = (ids > 0).astype(jnp.int32)
  pre = {"image": jax.random.normal(jax.random.key(1), (B, s, s, 3)), "input_ids": ids,
         "attention_mask": mask}
  fine = {"images": jax.random.normal(jax.random.key(2), (G, K, s, s, 3)),
          "input_ids": ids[:G], "attention_mask": mask[:G], "label": jnp.array([3, 7]),
          "is_video": jnp.array([True, False])}
  return m, params, pre, fine


def _value_and_grad(loss_fn, model, params, batch, wrt, cfg=None, train=True):
  """jit(value_and_grad) w.r.t. the top-level groups `wrt`, the rest closed over."""
  rest = {k: v for k, v in params.items() if k not in wrt}

  def f(trainable, rng):
    return loss_fn({**rest, **trainable}, batch, rng, model=model, cfg=cfg, train=train)

  return jax.jit(jax.value_and_grad(f, has_aux=True)), {k: params[k] for k in wrt}


def _norm(tree):
  return float(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_backbone_loss(setup):
  m, params, pre, _ = setup
  f, tr = _value_and_grad(O.backbone_loss, m, params, pre, ["pretrained_blip"],
                          cfg={"negatives_group_size": 2})
  (loss, metrics), g = f(tr, jax.random.key(3, impl="rbg"))
  assert np.isfinite(loss) and set(metrics) == {"loss", "itc_loss", "itm_loss", "itm_accuracy"}
  np.testing.assert_allclose(loss, metrics["itc_loss"] + metrics["itm_loss"], rtol=1e-6)
  blip = g["pretrained_blip"]
  for name in ("visual_encoder", "text_encoder", "itm_head", "vision_proj", "text_proj"):
    assert _norm(blip[name]) > 0, name                           # the whole backbone trains


def test_pretrain_loss(setup):
  m, params, pre, _ = setup
  wrt = ["pretrained_blip", "vision_adapter", "text_adapter", "visual_decoder",
         "decoder_pos_embed", "recon_head", "mask_embed"]
  f, tr = _value_and_grad(O.pretrain_loss, m, params, pre, wrt,
                          cfg=O.ObjectiveConfig(mask_group_size=2))
  rng = jax.random.key(4, impl="rbg")
  (loss, metrics), g = f(tr, rng)
  assert np.isfinite(loss) and set(metrics) == {"loss", "itm_loss", "tmim_loss",
                                                "itm_accuracy"}
  np.testing.assert_allclose(loss, metrics["itm_loss"] + metrics["tmim_loss"], rtol=1e-6)
  for name in wrt[1:]:
    assert _norm(g[name]) > 0, name                              # every trainable group learns
  blip = g["pretrained_blip"]
  # The frozen ViT and the ITC sampling features run under stop_gradient (reference no_grad);
  # the gradient reaches the adapter *through* the frozen text encoder.
  for name in ("visual_encoder", "vision_proj", "text_proj"):
    assert _norm(blip[name]) == 0.0, name
  assert _norm(blip["text_encoder"]) > 0 and _norm(blip["itm_head"]) > 0
  # Same key, same loss; another key changes negatives, mask and dropout.
  assert float(f(tr, rng)[0][0]) == float(loss)
  assert float(f(tr, jax.random.key(5, impl="rbg"))[0][0]) != float(loss)


def test_itm_rows_are_positive_negative_image_negative_text(setup):
  m, params, pre, _ = setup
  ids, mask = pre["input_ids"][:2], pre["attention_mask"][:2]
  embeds = jax.random.normal(jax.random.key(8), (2, m.config.num_patches + 1,
                                                 m.config.blip.vision.width))
  # With B = 2 the only negative of each row is the other row.
  logits, _ = jax.jit(lambda p: O.itm_with_hard_negatives(
      p, m, ids, mask, embeds, jnp.eye(2), jax.random.key(0)))(params)
  blip = Blip(m.config.blip)
  itm = jax.jit(lambda p, i, a, e: blip.apply({"params": p}, i, a, e, method=Blip.itm))
  bp = params["pretrained_blip"]
  ref = jnp.concatenate([itm(bp, ids, mask, embeds), itm(bp, ids, mask, embeds[::-1]),
                         itm(bp, ids[::-1], mask[::-1], embeds)])
  np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)


def test_pretrain_without_tmim_is_itm_only(setup):
  _, params, pre, _ = setup
  m0 = ContextBlip(_config(use_tmim=False))
  itm_only = O.ObjectiveConfig(mask_ratio=0.0)
  _, metrics = jax.eval_shape(lambda p: O.pretrain_loss(p, pre, jax.random.key(0), model=m0,
                                                        cfg=itm_only, train=True), params)
  assert set(metrics) == {"loss", "itm_loss", "itm_accuracy"}
  with pytest.raises(ValueError, match="use_tmim"):     # masking asked of a model without TMIM
    jax.eval_shape(lambda p: O.pretrain_loss(p, pre, jax.random.key(0), model=m0, cfg=None,
                                             train=True), params)


def test_masking_options_are_objective_options():
  assert O.ObjectiveConfig().mask_ratio == O.masking.DEFAULT_MASK_RATIO == 0.25
  cfg = O.as_objective_config({"mask_ratio": 0.5, "mask_token_choice": "valid_mean"})
  assert (cfg.mask_ratio, cfg.mask_token_choice) == (0.5, "valid_mean")
  with pytest.raises(ValueError, match="mask_token_choice"):
    O.ObjectiveConfig(mask_token_choice="all")
  with pytest.raises(ValueError, match="mask_ratio"):
    O.ObjectiveConfig(mask_ratio=1.0)


def test_finetune_stage1_loss(setup):
  m, params, _, fine = setup
  wrt = ["pretrained_blip", "vision_adapter", "prediction_layer"]
  f, tr = _value_and_grad(O.finetune_stage1_loss, m, params, fine, wrt)
  (loss, metrics), g = f(tr, jax.random.key(6))
  assert np.isfinite(loss)
  np.testing.assert_allclose(loss, metrics["loss_mean"] * G, rtol=1e-6)    # SUM over examples
  assert float(metrics["num_examples"]) == G
  np.testing.assert_allclose(metrics["accuracy"], metrics["correct"] / G)
  # Everything trains in stage 1, the ViT included (no stop_gradient).
  assert _norm(g["pretrained_blip"]["visual_encoder"]) > 0
  assert _norm(g["pretrained_blip"]["text_encoder"]) > 0
  assert _norm(g["vision_adapter"]) > 0 and _norm(g["prediction_layer"]) > 0
  # Evaluation mode: the loss is the summed CE of the stage-1 scores.
  ev, _ = jax.jit(lambda p: O.finetune_stage1_loss(p, fine, jax.random.key(0), model=m,
                                                   train=False))(params)
  logits = np.asarray(jax.jit(lambda p: _scores(
      m, p, fine["images"], fine["input_ids"], fine["attention_mask"], "stage1"))(params))
  logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  np.testing.assert_allclose(ev, -logp[np.arange(G), np.asarray(fine["label"])].sum(),
                             rtol=1e-5)


def test_finetune_stage2_loss_trains_only_the_context_encoder(setup):
  m, params, _, fine = setup
  wrt = ["pretrained_blip", "vision_adapter", "prediction_layer", "context_encoder"]
  f, tr = _value_and_grad(O.finetune_stage2_loss, m, params, fine, wrt)
  (loss, metrics), g = f(tr, jax.random.key(7))
  assert np.isfinite(loss) and set(metrics) >= {"loss", "loss_mean", "accuracy"}
  assert _norm(g["pretrained_blip"]) == 0.0 and _norm(g["vision_adapter"]) == 0.0
  assert _norm(g["context_encoder"]["transformer_0"]) > 0
  assert _norm(g["context_encoder"]["positional_emb"]) > 0      # example 0 is a video set
  assert _norm(g["prediction_layer"]) > 0                       # frozen by the optimizer only


def _scores(model, params, images, input_ids, attention_mask, head, is_video=None):
  """The evaluation path: ContextBlip.encode_candidates -> ContextBlip.candidate_scores."""
  v = {"params": params}
  embeds = model.apply(v, images, method=ContextBlip.encode_candidates)
  return model.apply(v, embeds, input_ids, attention_mask, head, is_video,
                     method=ContextBlip.candidate_scores)


def test_zero_shot_scores_and_reusable_vision(setup):
  m, params, _, fine = setup
  enc = jax.jit(lambda p, x: m.apply({"params": p}, x, method=ContextBlip.encode_candidates))
  score = jax.jit(lambda p, e, i, a: m.apply({"params": p}, e, i, a, "zero_shot",
                                             method=ContextBlip.candidate_scores))
  embeds = enc(params, fine["images"][:1])                      # one image set, vision once
  ids, mask = fine["input_ids"], fine["attention_mask"]
  two = score(params, jnp.concatenate([embeds, embeds]), ids, mask)   # two descriptions
  assert two.shape == (2, K) and bool(jnp.all((two > 0) & (two < 1)))
  assert not np.allclose(two[0], two[1])
  # Equal to ITM softmax[:, 1] of BLIP on the adapted embeddings, pair by pair.
  blip = Blip(m.config.blip)
  itm = jax.jit(lambda p, i, a, e: blip.apply({"params": p}, jnp.repeat(i, K, 0),
                                              jnp.repeat(a, K, 0), e, method=Blip.itm))
  logits = itm(params["pretrained_blip"], ids[1:], mask[1:], embeds[0])
  np.testing.assert_allclose(two[1], jax.nn.softmax(logits)[:, 1], rtol=1e-5, atol=1e-6)
  # Without the adapter the scores are plain BLIP's.
  plain = ContextBlip(_config(use_adapter=False))
  zs = jax.jit(lambda p: _scores(plain, p, fine["images"][:1], ids[:1], mask[:1],
                                 "zero_shot"))(params)
  vit = jax.jit(lambda p, x: blip.apply({"params": p}, x, method=Blip.encode_image))(
      params["pretrained_blip"], fine["images"][0]).last_hidden_state
  ref = itm(params["pretrained_blip"], ids[:1], mask[:1], vit)
  np.testing.assert_allclose(zs[0], jax.nn.softmax(ref)[:, 1], rtol=1e-5, atol=1e-6)


def test_stage2_scores_are_the_evaluation_loss_logits_and_heads_are_checked(setup):
  m, params, _, fine = setup
  ev, _ = jax.jit(lambda p: O.finetune_stage2_loss(p, fine, jax.random.key(0), model=m,
                                                   train=False))(params)
  logits = np.asarray(jax.jit(lambda p: _scores(
      m, p, fine["images"], fine["input_ids"], fine["attention_mask"], "stage2",
      fine["is_video"]))(params))
  logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  np.testing.assert_allclose(ev, -logp[np.arange(G), np.asarray(fine["label"])].sum(),
                             rtol=1e-5)
  embeds = jax.ShapeDtypeStruct((G, K, m.config.num_patches + 1, m.config.blip.vision.width),
                                jnp.float32)
  for head, is_video, match in (("stage3", None, "unknown head"),
                                ("stage2", None, "needs is_video")):
    with pytest.raises(ValueError, match=match):
      jax.eval_shape(lambda p, e: m.apply({"params": p}, e, fine["input_ids"],
                                          fine["attention_mask"], head, is_video,
                                          method=ContextBlip.candidate_scores), params, embeds)


def test_bfloat16_compute_keeps_float32_losses(setup):
  _, params, pre, fine = setup
  m16 = ContextBlip(_config(), dtype=jnp.bfloat16)
  for fn, batch in ((O.pretrain_loss, pre), (O.finetune_stage2_loss, fine)):
    loss, metrics = jax.eval_shape(lambda p: fn(p, batch, jax.random.key(0), model=m16,
                                                train=True), params)
    assert loss.dtype == jnp.float32 and loss.shape == ()
    assert all(v.dtype == jnp.float32 for v in metrics.values())


def test_bad_batch_and_cfg_raise(setup):
  m, params, pre, _ = setup
  with pytest.raises(KeyError, match="images"):
    O.finetune_stage1_loss(params, pre, jax.random.key(0), model=m, train=False)
  with pytest.raises(ValueError, match="unknown objective options"):
    O.pretrain_loss(params, pre, jax.random.key(0), model=m, cfg={"temp": 0.1})
