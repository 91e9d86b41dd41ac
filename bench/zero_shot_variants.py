"""The variants `bench_zero_shot.py` times: the PyTorch reference (eager, torch.compile) and the
product's own scoring step, `evaluation/scoring.py: make_score_step(score_batch)` (the function
the evaluation loop jits: `ContextBlip.encode_candidates` -> `candidate_cross_kv` ->
`cached_candidate_scores`), fed batches in the evaluation pipeline's layout.

Imported only after bench_zero_shot.py has set XLA_FLAGS / JAX_PLATFORMS (jax is imported here).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import numpy as np

from bench import common

# The IMAGECODE valid annotations, where README "Reproducing the paper on real data" puts them
# (data/imagecode/ in the checkout); $IMAGECODE_VALID names another file.
IMAGECODE_VALID = os.environ.get("IMAGECODE_VALID", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "data", "imagecode", "valid_data.json"))
BENCH2_PATTERN = (1, 2, 2, 3, 3)    # descriptions per set: mean 2.2 (valid: 2.22)
TITLES = {1: "ten-candidate groups, one description per set",
          2: "several descriptions per set (1,2,2,3,3), reuse of image work"}
UNITS = {1: "groups", 2: "descs"}

# name -> (kind, options). torch: compile = torch.compile. jax: dev = devices the sets of a
# batch are sharded over (the product's mesh: one device on a plain CPU; forced host devices
# each hold a copy of the weights).
VARIANTS = {
    b: {"torch_eager": ("torch", {}),
        "torch_compile": ("torch", {"compile": True}),
        "jax_1dev": ("jax", dict(dev=1)),
        "jax_2dev": ("jax", dict(dev=2))}
    for b in (1, 2)
}
DEFAULTS = {b: ("torch_eager", "torch_compile", "jax_1dev", "jax_2dev") for b in (1, 2)}


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
  enc = BlipTokenizer()([pre_caption_imagecode(t) for t in texts], max_length=common.TEXT_LENGTH)
  return enc["input_ids"].copy(), enc["attention_mask"]


def make_workload(pattern, seed: int) -> list[common.ZeroShotSet]:
  """Sets with pattern[i] descriptions; the first valid sets with that many descriptions
  (real text, [CLS] first as the pipeline tokenises it: the model puts [ENC] at position 0),
  random pixels; synthetic text when the IMAGECODE file is missing."""
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
  config: Any                         # BlipConfig
  platform: str                       # 'cpu' | 'gpu'
  dtype: str                          # 'float32' | 'bfloat16' (JAX compute dtype, torch autocast)
  bench1: list[common.ZeroShotSet]
  bench2: list[common.ZeroShotSet]
  attention_impl: str = "explicit"    # model.attention_impl of the JAX variants
  _device_params: dict = dataclasses.field(default_factory=dict)
  _torch: Any = None

  @classmethod
  def create(cls, workdir: str, platform: str = "cpu", dtype: str = "float32", log=print,
             need=frozenset({"torch", "jax"}), groups: int = 2,
             attention_impl: str = "explicit"):
    hf_dir = os.path.join(workdir, "hf_blip_base_224")
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
      log(f"  building the random-weight reference in {hf_dir}")
      common.build_reference_dir(hf_dir)
    params = config = None
    if "jax" in need:
      params, config = _converted(workdir, hf_dir, log)
    return cls(hf_dir, params, config, platform, dtype, make_workload((1,) * groups, seed=1),
               make_workload(BENCH2_PATTERN, seed=2), attention_impl)

  def torch_model(self):
    if self._torch is None:
      self._torch = common.load_reference(self.hf_dir).to(common.torch_device(self.platform))
    return self._torch

  def model(self):
    """The product's model for zero-shot BLIP (no adapter), as `make_model` builds it."""
    from contextblip_jax.models.contextblip import ContextBlipConfig, make_model
    return make_model(ContextBlipConfig(blip=self.config, use_adapter=False, use_tmim=False),
                      self.dtype, self.attention_impl)

  def device_params(self, n_dev: int):
    """({"pretrained_blip": params} on the mesh of the first n_dev devices, shardings)."""
    import jax
    from contextblip_jax.evaluation import scoring
    if n_dev not in self._device_params:
      params = {"pretrained_blip": self.params}
      sh = scoring.param_shardings_for(self.model(), params, mesh_of(n_dev))
      self._device_params[n_dev] = (jax.device_put(params, sh), sh)
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
  """The product's (data, fsdp, tensor) mesh over the first n_dev devices (data-parallel)."""
  import jax
  from contextblip_jax.parallel import sharding as shd
  return shd.make_mesh({"data": -1, "fsdp": 1, "tensor": 1},
                       jax.devices()[:min(n_dev, jax.device_count())])


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
    device = common.torch_device(ctx.platform)
    fwd = torch.compile(model) if opts.get("compile") else model
    inputs = []     # one (pixels, ids, mask) per description: everything recomputed per text
    for s in sets:
      px = torch.from_numpy(np.ascontiguousarray(s.pixels.transpose(0, 3, 1, 2))).to(device)
      for j in range(s.ids.shape[0]):
        ids = np.repeat(s.ids[j:j + 1], common.GROUP, 0).astype(np.int64)
        ids[:, 0] = common.ENC_TOKEN_ID          # transformers takes the ids as given
        mask = np.repeat(s.mask[j:j + 1], common.GROUP, 0).astype(np.int64)
        inputs.append((px, torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)))

    def run():
      out = []
      with torch.inference_mode(), common.torch_autocast(ctx.platform, ctx.dtype):
        for px, ids, mask in inputs:
          logits = fwd(input_ids=ids, pixel_values=px, attention_mask=mask,
                       use_itm_head=True).itm_score
          out.append(torch.softmax(logits.float(), dim=-1)[:, 1].cpu().numpy())
      return np.concatenate(out)
    return run, run()
  return common.Variant(name, prepare, kind="torch", units=units)


# --------------------------------------------------------------------------------------------
# JAX: the product's scoring step
# --------------------------------------------------------------------------------------------

def eval_batch(sets: list[common.ZeroShotSet], sets_per_batch: int, d: int) -> dict:
  """Sets in the evaluation pipeline's batch layout (`pipeline.imagecode_eval_pipeline`):
  images [L, 10, S, S, 3], input_ids / attention_mask [L, D, T] with descriptions padded to D
  (desc_mask 0) and sets padded to L (set_mask 0), is_video, example_index."""
  l, (k, s) = sets_per_batch, sets[0].pixels.shape[:2]
  t = common.TEXT_LENGTH
  b = dict(images=np.zeros((l, k, s, s, 3), np.float32), input_ids=np.zeros((l, d, t), np.int32),
           attention_mask=np.zeros((l, d, t), np.int32), is_video=np.ones((l,), bool),
           desc_mask=np.zeros((l, d), bool), example_index=np.full((l, d), -1, np.int32),
           set_mask=np.zeros((l,), bool))
  b["input_ids"][:, :, 0], b["attention_mask"][:, :, 0] = 101, 1    # padding rows: [CLS] only
  for i, st in enumerate(sets):
    n = st.ids.shape[0]
    b["images"][i], b["set_mask"][i] = st.pixels, True
    b["input_ids"][i, :n], b["attention_mask"][i, :n] = st.ids, st.mask
    b["desc_mask"][i, :n], b["example_index"][i, :n] = True, np.arange(n)
  return b


def real_scores(scores: np.ndarray, batch: dict) -> np.ndarray:
  """Scores [L, D, 10] -> the real descriptions' rows, in set order, flattened."""
  return np.asarray(scores)[np.asarray(batch["desc_mask"])].reshape(-1)


def jax_variant(ctx: Context, bench: int, name: str, opts: dict) -> common.Variant:
  sets = ctx.bench1 if bench == 1 else ctx.bench2
  n_dev = opts.get("dev", 1)
  # One batch per run, as the evaluation loop builds it: benchmark 1 one description per set;
  # benchmark 2 descriptions padded to the most of any set (3), sets padded to a multiple of
  # the devices.
  d = max(s.ids.shape[0] for s in sets)
  per_batch = -(-len(sets) // n_dev) * n_dev
  extra = {}

  def prepare():
    import jax
    from contextblip_jax.evaluation import scoring
    from contextblip_jax.parallel import sharding as shd
    params, p_sh = ctx.device_params(n_dev)
    mesh = mesh_of(n_dev)
    host = eval_batch(sets, per_batch, d)
    b_sh = shd.batch_shardings(host, mesh)
    step = scoring.make_score_step(ctx.model(), "zero_shot", p_sh, b_sh, mesh)
    batch = jax.device_put(host, b_sh)
    compiled = step.lower(params, batch).compile()
    extra["xla_bytes"] = common.jax_memory_bytes(compiled)

    def run():
      scores, _ = compiled(params, batch)
      return real_scores(jax.device_get(scores), host)
    return run, run()
  return common.Variant(name, prepare, kind="jax", extra=extra,
                        units=sum(s.ids.shape[0] for s in sets),
                        notes=f"{per_batch} sets x {d} descriptions per batch, {n_dev} device(s)")


def make_variant(ctx: Context, bench: int, name: str) -> common.Variant:
  kind, opts = VARIANTS[bench][name]
  return (torch_variant if kind == "torch" else jax_variant)(ctx, bench, name, opts)


# --------------------------------------------------------------------------------------------
# Where the time goes: the product step's three stages on one group
# --------------------------------------------------------------------------------------------

def profile_group(ctx: Context, rounds: int = 3, n_dev: int = 1) -> list[dict]:
  """Times each stage of `scoring.score_batch` on one group (10 images, 1 description), each
  jitted alone through the same model methods, with XLA's FLOP count of each: encode_candidates
  (ViT), candidate_cross_kv (12 layers' image keys/values), cached_candidate_scores (the text
  pass). Returns rows {stage, s (best of rounds), gflop, gflops}."""
  import time
  import jax
  from contextblip_jax.models.contextblip import ContextBlip
  model = ctx.model()
  params, _ = ctx.device_params(n_dev)
  b = {k: jax.device_put(v) for k, v in eval_batch(ctx.bench1[:1], 1, 1).items()}
  v = lambda p: {"params": p}
  stages = [
      ("vision: encode_candidates", lambda p, x: model.apply(
          v(p), x, method=ContextBlip.encode_candidates)),
      ("image K/V: candidate_cross_kv", lambda p, e: model.apply(
          v(p), e, method=ContextBlip.candidate_cross_kv)),
      ("text: cached_candidate_scores", lambda p, kv, i, m: model.apply(
          v(p), kv, i, m, method=ContextBlip.cached_candidate_scores))]
  rows, prev = [], None
  for name, fn in stages:
    if prev is None:
      args = (b["images"],)
    elif name.startswith("image"):
      args = (prev,)
    else:
      args = (prev, b["input_ids"], b["attention_mask"])
    compiled = jax.jit(fn).lower(params, *args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out = jax.block_until_ready(compiled(params, *args))
    best = float("inf")
    for _ in range(rounds):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(params, *args))
      best = min(best, time.perf_counter() - t0)
    gflop = float(cost.get("flops", float("nan"))) / 1e9
    rows.append(dict(stage=name, s=best, gflop=gflop, gflops=gflop / best))
    prev = out
  return rows
