"""Reusable test helper: a converted-checkpoint directory holding a random tiny BLIP.

  from checkpoint_fixtures import make_tiny_checkpoint
  ckpt_dir = make_tiny_checkpoint(tmp_path, with_adapter=True)

The directory is written with `contextblip_jax.pretrained.save_pretrained` (config.json, params/,
vocab.txt = the packaged bert-base-uncased vocabulary), so every command that reads a converted
checkpoint can be exercised without real weights.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp

from contextblip_jax.models.adapter import MultiScaleAdapter
from contextblip_jax.models.blip import Blip
from contextblip_jax.models.variants import get_variant
from contextblip_jax.pretrained import save_pretrained
from contextblip_jax.tokenizer import VOCAB_PATH

TINY_ADAPTER = {"taps": [2, 4], "reduction": 2}   # the tiny ViT has 4 blocks


def tiny_params(config, with_adapter: bool = False, seed: int = 0, adapter=None):
  """Random plain (unboxed) params {"pretrained_blip": ..., ["vision_adapter": ...]}."""
  k_blip, k_adapter = jax.random.split(jax.random.key(seed))
  s = config.vision.image_size
  px = jnp.zeros((1, s, s, 3), jnp.float32)
  ids = jnp.ones((1, 8), jnp.int32)
  params = {"pretrained_blip": nn.unbox(Blip(config).init(k_blip, px, ids, ids))["params"]}
  if with_adapter:
    adapter = adapter or TINY_ADAPTER
    m = MultiScaleAdapter(width=config.vision.width, taps=tuple(adapter["taps"]),
                          reduction=adapter["reduction"])
    n = config.vision.num_patches + 1
    x = jnp.zeros((1, n, config.vision.width), jnp.float32)
    params["vision_adapter"] = nn.unbox(
        m.init(k_adapter, x, [x] * config.vision.depth))["params"]
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
