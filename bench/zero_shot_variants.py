"""The variants `bench_zero_shot.py` times: the PyTorch reference (eager, torch.compile) and our
JAX scorers with each optimisation switchable, so the table shows what each one buys.

Imported only after bench_zero_shot.py has set XLA_FLAGS (jax is imported here).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from typing import Any, Callable

import numpy as np

from bench import common

IMAGECODE_VALID = os.environ.get("IMAGECODE_VALID", os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "shared", "imagecode", "valid_data.json"))
BENCH2_PATTERN = (1, 2, 2, 3, 3)    # descriptions per set: mean 2.2 (valid: 2.22)
BUCKETS = (8, 16, 24, 30)           # compiled text lengths when bucketing (30 = ContextBLIP's T)
TITLES = {1: "ten-candidate groups, one description per set",
          2: "several descriptions per set (1,2,2,3,3), reuse of image work"}

# name -> (kind, options). Options: dev = forced host devices the batch is sharded over (the
# 10 images, and the text rows image-major), bucket = text length buckets, dpa =
# jax.nn.dot_product_attention, heads = heads-major ViT attention, reuse = none | vision | kv.
VARIANTS = {
    1: {
        "torch_eager": ("torch", {}),
        "torch_compile": ("torch", {"compile": True}),
        "jax_1dev": ("jax", dict(dev=1)),
        "jax_2dev": ("jax", dict(dev=2)),
        "jax_2dev_len": ("jax", dict(dev=2, bucket=True)),
        "jax_5dev_len": ("jax", dict(dev=5, bucket=True)),
        "jax_10dev_len": ("jax", dict(dev=10, bucket=True)),
        "jax_5dev_len_dpa": ("jax", dict(dev=5, bucket=True, dpa=True)),
        "jax_5dev_len_heads": ("jax", dict(dev=5, bucket=True, heads=True)),
    },
    2: {
        "torch_eager": ("torch", {}),
        "torch_compile": ("torch", {"compile": True}),
        "jax_per_desc": ("jax", dict(dev=5, bucket=True, reuse="none")),
        "jax_reuse_vision": ("jax", dict(dev=5, bucket=True, reuse="vision")),
        "jax_reuse_vision_kv": ("jax", dict(dev=5, bucket=True, reuse="kv")),
        "jax_reuse_kv_2dev": ("jax", dict(dev=2, bucket=True, reuse="kv")),
        "jax_reuse_kv_1dev": ("jax", dict(dev=1, bucket=True, reuse="kv")),
    },
}

# What a plain run times (the ablations are available through --variants).
DEFAULTS = {
    1: ("torch_eager", "torch_compile", "jax_1dev", "jax_2dev", "jax_2dev_len", "jax_5dev_len"),
    2: ("torch_eager", "torch_compile", "jax_per_desc", "jax_reuse_vision",
        "jax_reuse_vision_kv"),
}


def variant_names(bench: int) -> list[str]:
  return list(VARIANTS[bench])


def select(bench: int, wanted: str) -> list[str]:
  if wanted == "all":
    return variant_names(bench)
  names = [n.strip() for n in wanted.split(",") if n.strip()] or list(DEFAULTS[bench])
  unknown = [n for n in names if n not in VARIANTS[bench]]
  if unknown:
    raise SystemExit(f"unknown variants for benchmark {bench}: {unknown}; "
                     f"known: {variant_names(bench)}")
  return names


def needs(name: str) -> set[str]:
  return {"torch"} if name.startswith("torch") else {"jax"}


UNITS = {1: "groups", 2: "descs"}


# --------------------------------------------------------------------------------------------
# Shared state: weights, inputs
# --------------------------------------------------------------------------------------------

def _valid_descriptions() -> list[list[str]]:
  """Descriptions of each IMAGECODE valid set (file order), or [] when the file is absent."""
  if not os.path.isfile(IMAGECODE_VALID):
    return []
  with open(IMAGECODE_VALID) as f:
    data = json.load(f)
  return [list(v.values()) for v in data.values()]


def _tokenize(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
  from contextblip_jax.data.tokenizer import BlipTokenizer, pre_caption_imagecode
  tok = BlipTokenizer()
  enc = tok([pre_caption_imagecode(t) for t in texts], max_length=common.TEXT_LENGTH)
  ids = enc["input_ids"].copy()
  ids[:, 0] = common.ENC_TOKEN_ID
  return ids, enc["attention_mask"]


def make_workload(pattern, seed: int) -> list[common.ZeroShotSet]:
  """Sets with len(pattern[i]) descriptions; the first valid sets with that many descriptions
  (real text), random pixels; synthetic text when the IMAGECODE file is missing."""
  sets = common.make_sets(pattern, seed=seed)
  pool = _valid_descriptions()
  used = set()
  for s, d in zip(sets, pattern):
    k = next((i for i, descs in enumerate(pool) if len(descs) == d and i not in used), None)
    if k is None:
      continue
    used.add(k)
    s.ids, s.mask = _tokenize(pool[k])
  return sets


@dataclasses.dataclass
class Context:
  hf_dir: str
  params: dict | None                 # converted Blip params (NumPy)
  config: Any
  devices: int
  bench1: list[common.ZeroShotSet]
  bench2: list[common.ZeroShotSet]
  _device_params: dict = dataclasses.field(default_factory=dict)
  _torch: Any = None

  @classmethod
  def create(cls, workdir: str, devices: int, log=print, need=frozenset({"torch", "jax"})):
    hf_dir = os.path.join(workdir, "hf_blip_base_224")
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
      log(f"  building the random-weight reference in {hf_dir}")
      common.build_reference_dir(hf_dir)
    params = config = None
    if "jax" in need:
      params, config = _converted(workdir, hf_dir, log)
    return cls(hf_dir, params, config, devices, make_workload((1,) * 4, seed=1),
               make_workload(BENCH2_PATTERN, seed=2))

  def torch_model(self):
    if self._torch is None:
      self._torch = common.load_reference(self.hf_dir)
    return self._torch

  def device_params(self, n_dev: int):
    """The parameters replicated over the first n_dev devices (cached)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    if n_dev not in self._device_params:
      rep = NamedSharding(mesh_of(n_dev), P())
      self._device_params[n_dev] = jax.device_put(self.params, rep)
    return self._device_params[n_dev]


def _converted(workdir: str, hf_dir: str, log):
  """Converted params, cached as a flat .npz next to the HF directory."""
  from flax import traverse_util
  from contextblip_jax.models.variants import BlipConfig
  cache, cfg_path = os.path.join(workdir, "converted.npz"), os.path.join(workdir, "config.json")
  if os.path.isfile(cache) and os.path.isfile(cfg_path):
    with np.load(cache) as z:
      flat = {k: z[k] for k in z.files}
    with open(cfg_path) as f:
      config = BlipConfig.from_dict(json.load(f))
    return traverse_util.unflatten_dict(flat, sep="/"), config
  log("  converting the reference with weight_convert")
  config, params = common.convert_reference(hf_dir)
  flat = traverse_util.flatten_dict(params, sep="/")
  np.savez(cache, **{k: np.asarray(v) for k, v in flat.items()})
  with open(cfg_path, "w") as f:
    json.dump(config.to_dict(), f)
  return params, config


@functools.lru_cache(maxsize=None)
def mesh_of(n_dev: int):
  import jax
  n_dev = min(n_dev, jax.device_count())
  return jax.make_mesh((n_dev,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:n_dev])


# --------------------------------------------------------------------------------------------
# PyTorch reference
# --------------------------------------------------------------------------------------------

def torch_variant(ctx: Context, bench: int, name: str, opts: dict) -> common.Variant:
  sets = ctx.bench1 if bench == 1 else ctx.bench2

  # The reference recomputes everything per description, so its cost is the same for every
  # description (10 images, T = 30): benchmark 2 times one description per run.
  if bench == 2:
    sets = [dataclasses.replace(sets[0], ids=sets[0].ids[:1], mask=sets[0].mask[:1])]
  units = sum(s.ids.shape[0] for s in sets)

  def prepare():
    import torch
    model = ctx.torch_model()
    fwd = torch.compile(model) if opts.get("compile") else model
    inputs = []     # one (pixels, ids, mask) per description: everything recomputed per text
    for s in sets:
      px = torch.from_numpy(np.ascontiguousarray(s.pixels.transpose(0, 3, 1, 2)))
      for j in range(s.ids.shape[0]):
        ids = torch.from_numpy(np.repeat(s.ids[j:j + 1], common.GROUP, 0).astype(np.int64))
        mask = torch.from_numpy(np.repeat(s.mask[j:j + 1], common.GROUP, 0).astype(np.int64))
        inputs.append((px, ids, mask))

    def run():
      out = []
      with torch.inference_mode():
        for px, ids, mask in inputs:
          logits = fwd(input_ids=ids, pixel_values=px, attention_mask=mask,
                       use_itm_head=True).itm_score
          out.append(torch.softmax(logits.float(), dim=-1)[:, 1].numpy())
      return np.concatenate(out)
    return run, run()
  return common.Variant(name, prepare, kind="torch", units=units)


# --------------------------------------------------------------------------------------------
# JAX
# --------------------------------------------------------------------------------------------

def _dpa_attention(q, k, v, bias=None, *, dropout=None, dtype=None):
  """layers.attention with the context from jax.nn.dot_product_attention (probabilities still
  returned for API compatibility; XLA drops them when unused)."""
  import jax
  import jax.numpy as jnp
  ctx = jax.nn.dot_product_attention(q, k, v, bias=None if bias is None else bias.astype(q.dtype))
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
  probs = jax.nn.softmax(scores if bias is None else scores + bias, axis=-1)
  return ctx, probs


def _vit_attention_heads_major(self, x):
  """vit.Attention.__call__ computing q/k/v straight into [3, B, H, N, Dh] (one einsum with the
  fused kernel viewed as [D, 3, H, Dh]) and the output projection from [B, H, N, Dh]: no
  strided q/k/v slices and no transposes around the attention matmuls."""
  import jax
  import jax.numpy as jnp
  b, n, d = x.shape
  heads = self.num_heads
  kernel = self.qkv.variables["params"]["kernel"].reshape(d, 3, heads, -1)
  bias = self.qkv.variables["params"]["bias"].reshape(3, 1, heads, 1, -1)
  qkv = jnp.einsum("bnd,dthe->tbhne", x, kernel) + bias          # [3, B, H, N, Dh]
  q, k, v = qkv[0], qkv[1], qkv[2]
  scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(scores * q.shape[-1] ** -0.5, axis=-1)
  ctx = jnp.einsum("bhqk,bhkd->bhqd", probs, v)                  # [B, H, N, Dh]
  wo = self.proj.variables["params"]["kernel"].reshape(heads, -1, d)
  return jnp.einsum("bhqd,hde->bqe", ctx, wo) + self.proj.variables["params"]["bias"]


@contextlib.contextmanager
def attention_impl(dpa: bool = False, heads_major: bool = False):
  """Swaps the model's attention code while a variant is traced (benchmark ablations)."""
  from contextblip_jax.models import layers, vit
  original, original_vit = layers.attention, vit.Attention.__call__
  if dpa:
    layers.attention = _dpa_attention
  if heads_major:
    vit.Attention.__call__ = _vit_attention_heads_major
  try:
    yield
  finally:
    layers.attention, vit.Attention.__call__ = original, original_vit


def bucket_length(mask: np.ndarray, bucket: bool) -> int:
  """Text length to run: the smallest bucket holding every real token (padding at the end of
  a row never influences the [ENC] output: masked keys get exactly zero weight)."""
  if not bucket:
    return mask.shape[1]
  need = int(mask.sum(1).max())
  return next(b for b in BUCKETS if b >= need)


def jax_functions(ctx: Context, n_dev: int):
  """(vision, vision_kv, text_tiled, text_cached) jitted over the first n_dev devices."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from contextblip_jax.models.blip import Blip
  model = Blip(ctx.config)
  mesh = mesh_of(n_dev)
  data, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  g = common.GROUP

  def vision(params, pixels):                       # [10, S, S, 3] -> [10, N, D]
    return model.apply({"params": params}, pixels, method=Blip.encode_image).last_hidden_state

  def vision_kv(params, pixels):                    # -> per-layer (k, v) [10, N, H, Dh]
    return model.apply({"params": params}, vision(params, pixels), method=Blip.image_cross_kv)

  def rows(ids, mask):                              # [d, T] -> image-major [10 d, T]
    ids, mask = jnp.tile(ids, (g, 1)), jnp.tile(mask, (g, 1))
    return (jax.lax.with_sharding_constraint(ids, data),
            jax.lax.with_sharding_constraint(mask, data))

  def scores(logits, d):                            # [10 d, 2] -> [d, 10]
    return jax.nn.softmax(logits, axis=-1)[:, 1].reshape(g, d).T

  def text_tiled(params, embeds, ids, mask):       # embeds repeated per description
    d = ids.shape[0]
    emb = jax.lax.with_sharding_constraint(jnp.repeat(embeds, d, axis=0), data)
    logits = model.apply({"params": params}, *rows(ids, mask), emb, method=Blip.itm)
    return scores(logits, d)

  def text_cached(params, kv, ids, mask):          # image keys/values shared by descriptions
    d = ids.shape[0]
    logits = model.apply({"params": params}, *rows(ids, mask), kv, method=Blip.itm_cached)
    return scores(logits, d)

  jit = functools.partial(jax.jit, out_shardings=None)
  return (jit(vision, in_shardings=(rep, data)), jit(vision_kv, in_shardings=(rep, data)),
          jit(text_tiled), jit(text_cached), data, rep)


def jax_variant(ctx: Context, bench: int, name: str, opts: dict) -> common.Variant:
  sets = ctx.bench1 if bench == 1 else ctx.bench2
  n_dev, reuse = opts.get("dev", 1), opts.get("reuse", "none")
  if bench == 2 and reuse == "none":    # no reuse: a cost per description, like the reference
    sets = [dataclasses.replace(sets[0], ids=sets[0].ids[:1], mask=sets[0].mask[:1])]
  extra = {}

  def prepare():
    import jax
    params = ctx.device_params(n_dev)
    vision, vision_kv, text_tiled, text_cached, data, rep = jax_functions(ctx, n_dev)
    inputs = []
    for s in sets:
      px = jax.device_put(s.pixels, data)
      length = bucket_length(s.mask, opts.get("bucket", False))
      ids = jax.device_put(s.ids[:, :length], rep)
      mask = jax.device_put(s.mask[:, :length], rep)
      inputs.append((px, ids, mask))

    def run():
      out = []
      for px, ids, mask in inputs:
        if reuse == "kv":
          out.append(text_cached(params, vision_kv(params, px), ids, mask))
        elif reuse == "vision":
          out.append(text_tiled(params, vision(params, px), ids, mask))
        else:                                       # everything per description
          for j in range(ids.shape[0]):
            out.append(text_tiled(params, vision(params, px), ids[j:j + 1], mask[j:j + 1]))
      return np.concatenate([np.asarray(o).reshape(-1) for o in out])

    with attention_impl(opts.get("dpa", False), opts.get("heads", False)):
      first = run()
    px, ids, mask = inputs[0]
    fn, arg = (vision_kv, px) if reuse == "kv" else (vision, px)
    extra["xla_bytes"] = common.jax_memory_bytes(fn.lower(params, arg).compile())
    return run, first
  return common.Variant(name, prepare, kind="jax", extra=extra,
                        units=sum(s.ids.shape[0] for s in sets))


def make_variant(ctx: Context, bench: int, name: str, groups: int = 2) -> common.Variant:
  kind, opts = VARIANTS[bench][name]
  if bench == 1:
    ctx.bench1 = ctx.bench1[:groups] if len(ctx.bench1) >= groups else make_workload(
        (1,) * groups, seed=1)
  return (torch_variant if kind == "torch" else jax_variant)(ctx, bench, name, opts)
