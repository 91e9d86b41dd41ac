"""The cached image-side cross-attention keys/values (Blip.image_cross_kv + itm_cached /
multimodal_cached) give the same results as the uncached multimodal forward."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contextblip_jax.models.blip import Blip
from contextblip_jax.models.variants import get_variant


@pytest.fixture(scope="module")
def model_and_params():
  config = get_variant("tiny")
  model = Blip(config)
  s = config.vision.image_size
  # random parameters of the right shapes without compiling `init` (N(0, 0.1) everywhere)
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(
      jax.random.key(0), jnp.zeros((1, s, s, 3)), jnp.ones((1, 5), jnp.int32),
      jnp.ones((1, 5), jnp.int32))))
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype), shapes)
  return model, params, config



def _texts(rows, length=9, seed=1):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1000, 30000, (rows, length)).astype(np.int32)
  ids[:, 0] = 101
  mask = np.ones((rows, length), np.int32)
  for r in range(rows):
    mask[r, length - (r % 4):] = 0          # varied padding
  return jnp.asarray(ids), jnp.asarray(mask)


@pytest.mark.parametrize("per_image,with_image_mask", [(1, False), (3, True)])
def test_cached_itm_equals_uncached(model_and_params, per_image, with_image_mask):
  model, params, config = model_and_params
  s, n_images = config.vision.image_size, 4
  pixels = jax.random.normal(jax.random.key(2), (n_images, s, s, 3))
  ids, mask = _texts(n_images * per_image)
  image_mask = None
  if with_image_mask:
    n = config.vision.num_patches + 1
    image_mask = jnp.ones((n_images, n), jnp.int32).at[1, -3:].set(0).at[3, 5:9].set(0)

  @jax.jit
  def both(params, pixels, ids, mask, image_mask):
    apply = lambda *a, **kw: model.apply(params, *a, **kw)
    embeds = apply(pixels, method=Blip.encode_image).last_hidden_state
    # uncached: every text row gets its own copy of its image's tokens (image-major rows)
    rep = lambda x: None if x is None else jnp.repeat(x, per_image, axis=0)
    ref = apply(ids, mask, rep(embeds), rep(image_mask), return_cross_attentions=True,
                method=Blip.multimodal)
    ref_logits = apply(ids, mask, rep(embeds), rep(image_mask), method=Blip.itm)
    kv = apply(embeds, method=Blip.image_cross_kv)
    out = apply(ids, mask, kv, image_mask, return_cross_attentions=True,
                method=Blip.multimodal_cached)
    logits = apply(ids, mask, kv, image_mask, method=Blip.itm_cached)
    return ref, ref_logits, kv, out, logits

  ref, ref_logits, kv, out, logits = both(params, pixels, ids, mask, image_mask)
  assert len(kv) == config.text.num_layers
  assert kv[0][0].shape == (n_images, config.vision.num_patches + 1, config.text.num_heads,
                            config.text.hidden_size // config.text.num_heads)
  np.testing.assert_allclose(out.last_hidden_state, ref.last_hidden_state, atol=1e-6, rtol=0)
  for a, b in zip(out.cross_attentions, ref.cross_attentions, strict=True):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-6, rtol=0)
  assert float(jnp.max(jnp.abs(ref_logits))) > 1e-3      # not a trivially zero comparison


def test_cached_rows_must_group_over_images(model_and_params):
  model, params, config = model_and_params
  n, w = config.vision.num_patches + 1, config.vision.width
  kv = jax.eval_shape(lambda p, e: model.apply(p, e, method=Blip.image_cross_kv),
                      params, jax.ShapeDtypeStruct((2, n, w), jnp.float32))
  ids, mask = _texts(3)
  with pytest.raises(ValueError, match="do not group"):
    jax.eval_shape(lambda p, kv: model.apply(p, ids, mask, kv, method=Blip.itm_cached),
                   params, kv)


# ------------------------------------------------------------------ ContextBlip: the product path

@pytest.mark.parametrize("head", ["zero_shot", "stage1", "stage2"])
def test_cached_candidate_scores_equal_per_description_scores(head):
  """`candidate_cross_kv` + `cached_candidate_scores` (the evaluation loop's and the scoring
  command's path: vision and image-side keys/values once per set, D descriptions sharing
  them) give each description the scores of `candidate_scores` (its own uncached pass)."""
  from contextblip_jax.models.contextblip import ContextBlip
  from tests.helpers.loops import random_params, tiny_model_config
  config = tiny_model_config()
  model = ContextBlip(config)
  params = {"params": random_params(config, "finetune", seed=3)}
  g, d, k, s = 2, 3, config.num_candidates, config.blip.vision.image_size
  images = jax.random.normal(jax.random.key(4), (g, k, s, s, 3))
  ids, mask = _texts(g * d, length=11, seed=5)
  ids, mask = ids.reshape(g, d, -1), mask.reshape(g, d, -1)
  is_video = jnp.array([True, False])

  @jax.jit
  def both(params, images, ids, mask, is_video):
    apply = lambda *a, **kw: model.apply(params, *a, **kw)
    embeds = apply(images, method=ContextBlip.encode_candidates)
    kv = apply(embeds, method=ContextBlip.candidate_cross_kv)
    cached = apply(kv, ids, mask, head, is_video, method=ContextBlip.cached_candidate_scores)
    ref = jnp.stack([apply(embeds, ids[:, j], mask[:, j], head, is_video,
                           method=ContextBlip.candidate_scores) for j in range(d)], axis=1)
    return cached, ref, kv

  cached, ref, kv = both(params, images, ids, mask, is_video)
  assert cached.shape == ref.shape == (g, d, k)
  assert kv[0][0].shape[0] == g * k                 # one K/V row per image, not per description
  # float32 (highest matmul precision): the cached path folds a candidate's D descriptions
  # into one query block, so XLA sums the same products in a different blocking; 1e-5 bounds
  # that rounding on probabilities / logits of order 1.
  np.testing.assert_allclose(cached, ref, atol=1e-5, rtol=0)
  assert float(jnp.std(ref)) > 1e-4                 # scores differ between candidates
