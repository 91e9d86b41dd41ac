"""Reusable test helper: a converted-checkpoint directory holding a random tiny BLIP.

  from tests.helpers.checkpoints import make_tiny_checkpoint
  ckpt_dir = make_tiny_checkpoint(tmp_path, with_adapter=True)

The directory is written with `contextblip_jax.storage.param_dir.save_pretrained` (config.json, params/,
vocab.txt = the packaged bert-base-uncased vocabulary), so every command that reads a converted
checkpoint can be exercised without real weights.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from contextblip_jax.models.adapter import MultiScaleAdapter
from contextblip_jax.models.blip import Blip
from contextblip_jax.models.variants import get_variant
from contextblip_jax.storage.param_dir import save_pretrained
from contextblip_jax.data.tokenizer import VOCAB_PATH

TINY_ADAPTER = {"taps": [2, 4], "reduction": 2}   # the tiny ViT has 4 blocks


def random_like(abstract, rng: np.random.Generator):
  """NumPy random values for an abstract parameter tree (no XLA compilation of `init`).

  LayerNorm scales ~ 1 + N(0, 0.1), biases ~ N(0, 0.02), everything else ~ N(0, 0.05).
  """
  def fill(path, leaf):
    name = path[-1].key
    if name == "scale":
      x = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
    elif name.endswith("bias"):
      x = 0.02 * rng.standard_normal(leaf.shape)
    else:
      x = 0.05 * rng.standard_normal(leaf.shape)
    return x.astype(leaf.dtype)
  return jax.tree_util.tree_map_with_path(fill, abstract)


def tiny_params(config, with_adapter: bool = False, seed: int = 0, adapter=None):
  """Random plain NumPy params {"pretrained_blip": ..., ["vision_adapter": ...]}.

  The BLIP part depends only on (config, seed), so checkpoints with and without an adapter
  made with one seed share their BLIP weights.
  """
  s = config.vision.image_size
  px = jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32)
  ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  abstract = jax.eval_shape(
      lambda k, p, i: nn.unbox(Blip(config).init(k, p, i, i))["params"],
      jax.random.key(0), px, ids)
  params = {"pretrained_blip": random_like(abstract, np.random.default_rng(seed))}
  if with_adapter:
    adapter = adapter or TINY_ADAPTER
    m = MultiScaleAdapter(width=config.vision.width, taps=tuple(adapter["taps"]),
                          reduction=adapter["reduction"])
    x = jax.ShapeDtypeStruct((1, config.vision.num_patches + 1, config.vision.width),
                             jnp.float32)
    abstract = jax.eval_shape(
        lambda k, x: nn.unbox(m.init(k, x, [x] * config.vision.depth))["params"],
        jax.random.key(0), x)
    params["vision_adapter"] = random_like(abstract, np.random.default_rng(seed + 1000))
  return params


def make_tiny_checkpoint(tmp_path, with_adapter: bool = False, seed: int = 0,
                         image_size: int = 32, name: str | None = None,
                         adapter: dict | None = None) -> str:
  """Writes DIR under tmp_path with a random tiny BLIP (+ adapter); returns its path."""
  config = get_variant("tiny", image_size)
  params = tiny_params(config, with_adapter, seed, adapter)
  name = name or f"tiny{'_adapter' if with_adapter else ''}_s{seed}"
  return save_pretrained(os.path.join(str(tmp_path), name), config, params, VOCAB_PATH,
                         adapter=(adapter or TINY_ADAPTER) if with_adapter else None,
                         source=f"random tiny BLIP (seed {seed})")
