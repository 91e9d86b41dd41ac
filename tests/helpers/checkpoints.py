"""Reusable test helpers: parameter directories holding a random tiny BLIP, and the legacy
layouts that older versions wrote.

  from tests.helpers.checkpoints import make_tiny_checkpoint
  ckpt_dir = make_tiny_checkpoint(tmp_path, with_adapter=True)

The directory is written with the product's writer, `contextblip_jax.storage.param_dir.
write_param_dir` (params/, model.json, vocab.txt = the packaged bert-base-uncased vocabulary,
provenance.json), so every command that reads parameters can be exercised without real weights.
`write_legacy_converted` / `write_legacy_export` write, by hand, the two layouts of the versions
before `contextblip_jax.params/2`, to test that they are still read.
"""

from __future__ import annotations

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from contextblip_jax.data.tokenizer import VOCAB_PATH
from contextblip_jax.models.adapter import MultiScaleAdapter
from contextblip_jax.models.blip import Blip
from contextblip_jax.models.contextblip import ContextBlipConfig
from contextblip_jax.models.variants import get_variant
from contextblip_jax.storage.param_dir import blip_model_config, write_param_dir

TINY_ADAPTER_TAPS = (2, 4)   # the tiny ViT has 4 blocks


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


def tiny_params(model: ContextBlipConfig, seed: int = 0):
  """Random plain NumPy params {"pretrained_blip": ..., ["vision_adapter": ...]} of `model`.

  The BLIP part depends only on (model.blip, seed), so checkpoints with and without an adapter
  made with one seed share their BLIP weights.
  """
  config = model.blip
  s = config.vision.image_size
  px = jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32)
  ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  abstract = jax.eval_shape(
      lambda k, p, i: nn.unbox(Blip(config).init(k, p, i, i))["params"],
      jax.random.key(0), px, ids)
  params = {"pretrained_blip": random_like(abstract, np.random.default_rng(seed))}
  if model.use_adapter:
    m = MultiScaleAdapter(width=config.vision.width, taps=model.adapter_taps,
                          reduction=model.adapter_reduction)
    x = jax.ShapeDtypeStruct((1, config.vision.num_patches + 1, config.vision.width),
                             jnp.float32)
    abstract = jax.eval_shape(
        lambda k, x: nn.unbox(m.init(k, x, [x] * config.vision.depth))["params"],
        jax.random.key(0), x)
    params["vision_adapter"] = random_like(abstract, np.random.default_rng(seed + 1000))
  return params


def tiny_model(with_adapter: bool = False, image_size: int = 32,
               adapter_taps: tuple[int, ...] = TINY_ADAPTER_TAPS) -> ContextBlipConfig:
  """The ContextBlipConfig of a tiny BLIP (+ adapter), as the converter would describe it."""
  return blip_model_config(get_variant("tiny", image_size),
                           adapter_taps if with_adapter else None, 2)


def make_tiny_checkpoint(tmp_path, with_adapter: bool = False, seed: int = 0,
                         image_size: int = 32, name: str | None = None,
                         adapter_taps: tuple[int, ...] = TINY_ADAPTER_TAPS) -> str:
  """Writes DIR under tmp_path with a random tiny BLIP (+ adapter); returns its path."""
  model = tiny_model(with_adapter, image_size, adapter_taps)
  name = name or f"tiny{'_adapter' if with_adapter else ''}_s{seed}"
  return write_param_dir(os.path.join(str(tmp_path), name), tiny_params(model, seed), model,
                         {"writer": "tests.helpers.checkpoints",
                          "source": f"random tiny BLIP (seed {seed})"}, vocab_path=VOCAB_PATH)


# ------------------------------------------------------------------ legacy layouts

def write_legacy_converted(out_dir: str, model: ContextBlipConfig, params,
                           source: str = "original:/old/model_base.pth",
                           fmt: str = "contextblip_jax.pretrained/1") -> str:
  """The converter's directory before format 2: config.json {format, model (BlipConfig dict),
  adapter {taps, reduction} or null, source}, params/ (StandardCheckpointer), vocab.txt."""
  os.makedirs(out_dir)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(out_dir, "params"), jax.tree.map(np.asarray, params))
  shutil.copyfile(VOCAB_PATH, os.path.join(out_dir, "vocab.txt"))
  adapter = ({"taps": list(model.adapter_taps), "reduction": model.adapter_reduction}
             if model.use_adapter else None)
  meta = {"format": fmt, "model": model.blip.to_dict(), "adapter": adapter, "source": source}
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(meta, f, indent=2, sort_keys=True)
  return out_dir


def write_legacy_export(workdir: str, params, stage: str, model_dict: dict, **meta) -> str:
  """A stage's export/ before format 2: an Orbax CheckpointManager directory whose step 0
  holds the items `state` (the parameter tree) and `meta` {stage, model, time, **meta}."""
  export = os.path.join(str(workdir), "export")
  options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                         enable_async_checkpointing=False)
  handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
  with ocp.CheckpointManager(export, options=options, item_handlers=handlers) as mngr:
    mngr.save(0, args=ocp.args.Composite(
        state=ocp.args.StandardSave(params),
        meta=ocp.args.JsonSave({"stage": stage, "model": model_dict, "time": 0.0, **meta})),
        force=True)
  return str(workdir)
