"""Shared helpers of the loop-level tests (evaluate / train / main / paper pipeline).

  data_dir = make_data(tmp_path)                 # generated IMAGECODE layout + pairs
  export = make_export(tmp_path / "ft", "finetune2")   # random tiny ContextBLIP parameters
  cfg = tiny_eval_config(data_dir, checkpoint)

Parameters are random NumPy values for the abstract tree (no XLA compile of `init`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import jax
import numpy as np

from configs import evaluate as evaluate_config
from contextblip_jax.data import synthetic
from contextblip_jax.data.tokenizer import VOCAB_PATH
from contextblip_jax.models.contextblip import ContextBlip, init_params
from contextblip_jax.run.model_config import model_config
from contextblip_jax.storage import workdir as wd
from tests.helpers.checkpoints import random_like

SIZES = dict(n_train_sets=10, n_valid_sets=6, n_test_sets=4, n_pairs=48, image_size=32)


def make_data(path, **sizes) -> str:
  """Generated synthetic dataset (small) under `path`; returns the directory."""
  out = os.path.join(str(path), "data")
  synthetic.generate(out, seed=0, **{**SIZES, **sizes})
  return out


def tiny_model_config(cfg=None):
  cfg = cfg or evaluate_config.get_config("tiny")
  return model_config(cfg)


def random_params(model_cfg, stage: str = "finetune", seed: int = 0):
  model = ContextBlip(model_cfg)
  abstract = jax.eval_shape(lambda r: init_params(model, r, stage), jax.random.PRNGKey(0))
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  return random_like(nn.unbox(abstract), np.random.default_rng(seed))


def make_export(workdir, stage: str = "finetune2", seed: int = 0, tree: str = "finetune",
                **meta) -> str:
  """A stage workdir whose export/ (the product's writer) holds random tiny parameters of the
  param tree `tree` ("finetune": BLIP, adapter, prediction layer, context encoder; "all" adds
  the TMIM groups); `meta` goes to the provenance (e.g. step, valid_acc)."""
  model_cfg = tiny_model_config()
  params = random_params(model_cfg, tree, seed)
  wd.export_params(str(workdir), params, stage, model_cfg, vocab_path=VOCAB_PATH, **meta)
  return str(workdir)


def tiny_eval_config(data_dir: str, checkpoint: str, head: str = "zero_shot",
                     predict: bool = False, num_devices: int = 1):
  """Tiny evaluate/predict config; one device unless `num_devices` (0 = all 8)."""
  args = ["tiny", f"head={head}"] + (["predict"] if predict else [])
  cfg = evaluate_config.get_config(",".join(args))
  cfg.num_devices = num_devices
  cfg.data.imagecode_dir = data_dir
  cfg.eval.checkpoint = checkpoint
  cfg.eval.visualize = 0
  return cfg


_SESSION_CACHE: list[str] = []


@contextlib.contextmanager
def compilation_cache(path=None):
  """Persistent XLA compilation cache for the block, in one directory per test session
  (`path` is ignored): identical programs compiled by several of these tests cost one
  compile. The cache is switched off again afterwards, so other tests are unaffected."""
  from jax.experimental.compilation_cache import compilation_cache as cc  # pylint: disable=g-import-not-at-top
  del path
  if not _SESSION_CACHE:
    _SESSION_CACHE.append(tempfile.mkdtemp(prefix="contextblip_jax_xla_cache_"))
  old_dir = jax.config.jax_compilation_cache_dir
  old_min = jax.config.jax_persistent_cache_min_compile_time_secs
  cc.reset_cache()
  jax.config.update("jax_compilation_cache_dir", _SESSION_CACHE[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  try:
    yield
  finally:
    jax.config.update("jax_compilation_cache_dir", old_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old_min)
    cc.reset_cache()
