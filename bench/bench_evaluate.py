"""The evaluation command end to end against a plain PyTorch loop, same run, same scores.

  .venv/bin/python bench/bench_evaluate.py                      # first 30 valid sets (~6 min on 2 cores)
  .venv/bin/python bench/bench_evaluate.py --sets 0             # the whole valid split (1039 sets)
  .venv/bin/python bench/bench_evaluate.py --platform gpu --dtype bfloat16   # CUDA machine

Ours: `python -m contextblip_jax.main --config configs/evaluate.py:head=zero_shot` in a fresh
process, timed from start to exit (start-up, parameter loading, compile, image decoding, the
report files), twice: with an empty persistent compilation cache (a user's first evaluation)
and again with the cache it filled (a second evaluation: nothing compiles).
The reference: a fresh process that loads transformers `BlipForImageTextRetrieval` and, as the
authors' code does, scores one description at a time against its ten images (everything
recomputed per description), timed the same way.

Inputs: the first --sets IMAGECODE valid sets (the real descriptions of
$IMAGECODE_VALID, default data/imagecode/valid_data.json in the checkout) in a temporary IMAGECODE layout
with generated 224-px JPEG images, and a random-weight BLIP-base (the zero-shot benchmark's)
converted by `python -m weight_convert` into a parameter directory. Both sides read the same
image files through the project's loader and the same token ids, so the scores must agree:
the max |d score| over all descriptions is printed. Peak RSS is each process's own (wait4).
The first and last lines are the machine line (CPU model, cores, both frameworks' float32
matmul GFLOP/s measured in this run, load).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from bench import common  # noqa: E402
from bench.zero_shot_variants import IMAGECODE_VALID  # noqa: E402  (imports no jax)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--sets", type=int, default=30, help="first N valid sets (0 = all)")
  p.add_argument("--sets_per_batch", type=int, default=0,
                 help="config.eval.sets_per_batch (0: the product's default, one set per device)")
  common.add_compute_args(p)
  p.add_argument("--matmul_size", type=int, default=4096,
                 help="n of the n^3 float32 matmul of the machine line")
  p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "bench_blip_base"),
                 help="cache of the reference HF directory and its parameter directory")
  p.add_argument("--skip_warm", action="store_true", help="only the cold-cache JAX run")
  p.add_argument("--json", default="", help="write the results here")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)   # internal: 'torch'
  p.add_argument("--data", default="", help=argparse.SUPPRESS)
  p.add_argument("--out", default="", help=argparse.SUPPRESS)
  return p.parse_args(argv)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

def make_data(out: str, n_sets: int, image_size: int = 224, seed: int = 0) -> int:
  """IMAGECODE layout under `out`: valid_data.json (the first n_sets real valid sets) and
  image-sets/<set>/img0..9.jpg (smooth random images, 224 px). Returns the descriptions."""
  import numpy as np
  from PIL import Image
  if not os.path.isfile(IMAGECODE_VALID):
    raise SystemExit(f"IMAGECODE valid annotations not found at {IMAGECODE_VALID}: put "
                     "valid_data.json there or set $IMAGECODE_VALID to it")
  with open(IMAGECODE_VALID) as f:
    data = json.load(f)
  names = list(data)[:n_sets] if n_sets else list(data)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "valid_data.json"), "w") as f:
    json.dump({k: data[k] for k in names}, f)
  rng = np.random.default_rng(seed)
  for name in names:
    d = os.path.join(out, "image-sets", name)
    if os.path.isdir(d) and len(os.listdir(d)) == 10:
      continue
    os.makedirs(d, exist_ok=True)
    for k in range(10):
      small = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)      # blocky, JPEG-friendly
      img = Image.fromarray(small).resize((image_size, image_size), Image.BILINEAR)
      img.save(os.path.join(d, f"img{k}.jpg"), quality=90)
  return sum(len(data[k]) for k in names)


def make_param_dir(workdir: str) -> tuple[str, str]:
  """(HF reference directory, its parameter directory from `python -m weight_convert`)."""
  hf_dir = os.path.join(workdir, "hf_blip_base_224")
  if not os.path.isfile(os.path.join(hf_dir, "config.json")):
    common.build_reference_dir(hf_dir)
  params = os.path.join(workdir, "params_blip_base_224")
  if not os.path.isfile(os.path.join(params, "model.json")):
    subprocess.run([sys.executable, "-m", "weight_convert", "convert", "--src", hf_dir,
                    "--out", params, "--format", "hf", "--hf-config", "blip", "--overwrite"],
                   cwd=REPO, check=True, capture_output=True)
  return hf_dir, params


# --------------------------------------------------------------------------------------------
# Timed processes
# --------------------------------------------------------------------------------------------

def timed(cmd: list[str], env: dict, log_path: str) -> dict:
  """Runs `cmd` to the end; wall seconds and the process's own peak RSS (wait4)."""
  t0 = time.perf_counter()
  with open(log_path, "w") as log:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
  wall = time.perf_counter() - t0
  if os.waitstatus_to_exitcode(status) != 0:
    with open(log_path) as f:
      tail = f.read()[-3000:]
    raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({status}):\n{tail}")
  return dict(wall_s=wall, peak_rss_mib=usage.ru_maxrss / 1024.0, log=log_path)


def run_jax(data: str, params: str, out: str, cache: str, args, env: dict) -> dict:
  """The evaluation command; returns timing + its scores {(set, index): [10]}."""
  workdir = os.path.join(out, f"eval_{len(os.listdir(out))}")
  cmd = [sys.executable, "-m", "contextblip_jax.main",
         "--config", "configs/evaluate.py:head=zero_shot", "--workdir", workdir,
         f"--config.data.imagecode_dir={data}", f"--config.eval.checkpoint={params}",
         f"--config.eval.sets_per_batch={args.sets_per_batch}", "--config.eval.visualize=0",
         "--config.model.use_adapter=False",             # plain BLIP, as the reference
         f"--config.compilation_cache={cache}", f"--config.model.compute_dtype={args.dtype}"]
  res = timed(cmd, env, workdir + ".log")
  pred = os.path.join(workdir, "eval", "zero_shot_valid.predictions.jsonl")
  with open(pred) as f:
    recs = [json.loads(line) for line in f]
  res["scores"] = {(r["set"], r["index"]): r["scores"] for r in recs if r.get("scores")}
  res["cache_entries"] = len(os.listdir(cache)) if os.path.isdir(cache) else 0
  return res


def torch_worker(args) -> int:
  """The authors' way: for each description, its 10 images and the text through the whole
  model (nothing reused); writes {set: {index: scores}} to --out."""
  import numpy as np
  import torch
  from transformers import BlipForImageTextRetrieval
  from contextblip_jax.data import imagecode
  from contextblip_jax.data.tokenizer import BlipTokenizer, pre_caption_imagecode
  device = common.torch_device(args.platform)
  common.apply_torch_precision()
  model = BlipForImageTextRetrieval.from_pretrained(args.workdir).eval().to(device)
  split = imagecode.read_imagecode_dir(args.data, "valid")
  tok = BlipTokenizer()
  out: dict = {}
  with torch.inference_mode(), common.torch_autocast(args.platform, args.dtype):
    for e in split.examples:
      px = imagecode.load_candidates(e.image_paths, 224)                 # [10, S, S, 3]
      enc = tok([pre_caption_imagecode(e.description)], max_length=common.TEXT_LENGTH)
      ids = np.repeat(enc["input_ids"], 10, 0).astype(np.int64)
      ids[:, 0] = common.ENC_TOKEN_ID
      mask = np.repeat(enc["attention_mask"], 10, 0).astype(np.int64)
      logits = model(input_ids=torch.from_numpy(ids).to(device),
                     pixel_values=torch.from_numpy(px.transpose(0, 3, 1, 2).copy()).to(device),
                     attention_mask=torch.from_numpy(mask).to(device), use_itm_head=True).itm_score
      out.setdefault(e.set_name, {})[e.position] = (
          torch.softmax(logits.float(), -1)[:, 1].cpu().numpy().tolist())
  with open(args.out, "w") as f:
    json.dump(out, f)
  return 0


def run_torch(data: str, hf_dir: str, out: str, args, env: dict) -> dict:
  scores_path = os.path.join(out, "torch_scores.json")
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", "torch", "--data", data,
         "--workdir", hf_dir, "--out", scores_path, "--platform", args.platform,
         "--dtype", args.dtype]
  res = timed(cmd, env, os.path.join(out, "torch.log"))
  with open(scores_path) as f:
    raw = json.load(f)
  res["scores"] = {(s, int(i)): v for s, d in raw.items() for i, v in d.items()}
  return res


def max_diff(a: dict, b: dict) -> float:
  import numpy as np
  if set(a) != set(b):
    raise RuntimeError(f"scored descriptions differ: {len(a)} vs {len(b)}")
  return max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in a)


def main(argv=None) -> int:
  args = parse_args(argv)
  args.platform = args.platform or common.default_platform()
  common.set_precision(args.precision, args.dtype)    # inherited by both timed processes
  env = {**os.environ, "JAX_PLATFORMS": "cpu" if args.platform == "cpu" else "cuda",
         "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  env.pop("XLA_FLAGS", None)          # the product as a user runs it: its own devices
  if args.worker:
    return torch_worker(args)
  os.environ["JAX_PLATFORMS"] = env["JAX_PLATFORMS"]
  print(f"# bench_evaluate  platform {args.platform}  dtype {args.dtype}  precision "
        f"{args.precision}  sets {args.sets or 'all'}")
  machine = common.measure_machine(args.platform, args.matmul_size)
  os.makedirs(args.workdir, exist_ok=True)
  hf_dir, params = make_param_dir(args.workdir)
  out = tempfile.mkdtemp(prefix="bench_evaluate_")
  data = os.path.join(out, "imagecode")
  n_desc = make_data(data, args.sets)
  cache = os.path.join(out, "xla_cache")       # empty: the first evaluation compiles
  print(f"  {args.sets or 'all'} sets, {n_desc} descriptions; data, runs and logs in {out}")
  rows = {}
  rows["jax_cold_cache"] = run_jax(data, params, out, cache, args, env)
  print(f"  jax (empty compilation cache)  {rows['jax_cold_cache']['wall_s']:7.1f} s   "
        f"load {common.load_average()}")
  rows["torch_loop"] = run_torch(data, hf_dir, out, args, env)
  print(f"  torch loop                     {rows['torch_loop']['wall_s']:7.1f} s   "
        f"load {common.load_average()}")
  if not args.skip_warm:
    before = rows["jax_cold_cache"]["cache_entries"]
    rows["jax_warm_cache"] = run_jax(data, params, out, cache, args, env)
    rows["jax_warm_cache"]["new_cache_entries"] = rows["jax_warm_cache"]["cache_entries"] - before
    print(f"  jax (filled compilation cache) {rows['jax_warm_cache']['wall_s']:7.1f} s   "
          f"load {common.load_average()}")
  ref = rows["torch_loop"]
  print(f"\nevaluation, {args.sets or 'all'} valid sets, {n_desc} descriptions")
  print(f"{'run':<22s} {'wall s':>8s} {'descs/s':>8s} {'x torch loop':>13s} {'peak MiB':>9s} "
        f"{'max|dscore|':>11s}")
  for name, r in rows.items():
    r["descs_per_s"] = n_desc / r["wall_s"]
    r["x_torch_loop"] = ref["wall_s"] / r["wall_s"]
    r["max_abs_score_diff"] = max_diff(r["scores"], ref["scores"])
    print(f"{name:<22s} {r['wall_s']:>8.1f} {r['descs_per_s']:>8.3f} {r['x_torch_loop']:>13.2f} "
          f"{r['peak_rss_mib']:>9.0f} {r['max_abs_score_diff']:>11.2e}")
  if "jax_warm_cache" in rows:
    print(f"  second evaluation: {rows['jax_warm_cache']['new_cache_entries']} new compilation "
          f"cache entries (0 = nothing compiled)")
  print("\n" + machine.line())
  if args.json:
    for r in rows.values():
      r.pop("scores")
    with open(args.json, "w") as f:
      json.dump({"machine": machine.__dict__, "machine_line": machine.line(), "sets": args.sets,
                 "descriptions": n_desc, "rows": rows}, f, indent=1, default=float)
  return 0


if __name__ == "__main__":
  sys.exit(main())
