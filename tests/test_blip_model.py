"""Shapes and parameter counts of the Flax BLIP backbone."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from contextblip_jax.models.adapter import MultiScaleAdapter
from contextblip_jax.models.blip import Blip
from contextblip_jax.models.variants import get_variant


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract_params(config):
  return jax.eval_shape(lambda: nn.unbox(Blip(config).init(
      jax.random.key(0), jnp.zeros((1, config.vision.image_size, config.vision.image_size, 3)),
      jnp.ones((1, 30), jnp.int32), jnp.ones((1, 30), jnp.int32)))["params"])


def test_blip_base_parameter_count_matches_spec():
  p = _abstract_params(get_variant("B/16"))
  assert _count(p["visual_encoder"]) == 85_798_656
  assert _count(p["text_encoder"]) == 137_258_496
  assert _count(p) == 223_452_418


def test_adapter_parameter_count_delta_2():
  a = MultiScaleAdapter(width=768, reduction=2)
  x = jnp.zeros((1, 197, 768))
  p = jax.eval_shape(lambda: a.init(jax.random.key(0), x, [x] * 12))
  assert _count(p) == 2_359_296


def test_tiny_forward_shapes_and_taps():
  c = get_variant("tiny")
  m = Blip(c)
  px = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  ids = jnp.array([[101, 2000, 2001, 102, 0, 0]] * 2)
  mask = (ids > 0).astype(jnp.int32)
  params = nn.unbox(m.init(jax.random.key(0), px, ids, mask))["params"]
  out = m.apply({"params": params}, px, True, method=Blip.encode_image)
  assert out.last_hidden_state.shape == (2, 17, 32)
  assert len(out.taps) == c.vision.depth
  np.testing.assert_array_equal(out.taps[-1], out.last_hidden_state)
  logits = m.apply({"params": params}, ids, mask, out.last_hidden_state, method=Blip.itm)
  assert logits.shape == (2, 2) and logits.dtype == jnp.float32
  feats = m.apply({"params": params}, ids, mask, method=Blip.text_features)
  np.testing.assert_allclose(np.linalg.norm(feats, axis=-1), 1.0, rtol=1e-5)
