"""Zero-shot IMAGECODE scoring speed: the product's scoring step against the PyTorch reference.

  .venv/bin/python bench/bench_zero_shot.py --memory              # both benchmarks (~10 min on 2 cores)
  .venv/bin/python bench/bench_zero_shot.py --bench 1 --rounds 5 --variants torch_eager,jax_1dev
  .venv/bin/python bench/bench_zero_shot.py --platform gpu --dtype bfloat16   # CUDA machine

Ours is what `python -m contextblip_jax.main --config configs/evaluate.py:head=zero_shot` runs:
the evaluation loop's jitted step `evaluation/scoring.py: make_score_step(score_batch)` (vision
once per set, the image-side cross-attention keys/values once per set, each description's text
pass against them), on batches in the evaluation pipeline's layout. `jax_1dev` is the product on
one device (a plain CPU run); `jax_2dev` shards the sets of a batch over 2 forced host devices
(one weight copy each). The reference is transformers `BlipForImageTextRetrieval` (eval,
inference_mode) eager and under `torch.compile`, with the same weights (a random-weight
BLIP-base at 224 px, converted by `weight_convert`), scoring one description at a time against
its 10 images, as the authors' code does.

Benchmark 1 - ten-candidate groups, one description per set (docs/method.md#zero-shot): --groups sets (one
description each) per timed run, softmax(ITM)[:, 1] of the 10 images. Figure: groups/second.
Benchmark 2 - several descriptions per set: 5 IMAGECODE valid sets with 1, 2, 2, 3, 3
descriptions (mean 2.2, the valid split's 2.22), one evaluation batch (descriptions padded to 3,
as the pipeline pads them). Figure: descriptions/second.

Descriptions are real IMAGECODE valid descriptions (pre_caption + our tokenizer); images are
random pixels (speed does not depend on content). Variants run in interleaved rounds and the
table reports medians; `--memory` re-runs each variant alone in a fresh process for its peak
RSS; `--profile` times the product step's stages on one group (vision, image K/V, text) with
XLA's FLOP count of each, against the matmul rate of the machine line. Every JAX variant's scores are compared with PyTorch eager's (max |d score|). The first
and last lines are the machine line: CPU model, cores, both frameworks' float32 matmul
GFLOP/s measured in this run, load and peak RSS.

GPU: `--platform gpu` (the default when nvidia-smi sees a GPU) runs JAX on CUDA (jax[cuda])
and the reference on torch CUDA; `--dtype bfloat16` computes in bfloat16 in both (JAX
`compute_dtype`, torch autocast; weights float32).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))   # run as a script from anywhere in the checkout

from bench import common  # noqa: E402  (imports no jax)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--bench", default="1,2", help="which benchmarks: '1', '2' or '1,2'")
  p.add_argument("--rounds", type=int, default=5, help="timed rounds per variant")
  p.add_argument("--groups", type=int, default=2, help="benchmark 1: groups per timed run")
  p.add_argument("--devices", type=int, default=2,
                 help="CPU: forced host devices (XLA_FLAGS) for the jax_2dev variant")
  common.add_compute_args(p)
  p.add_argument("--attention_impl", default="explicit", choices=("explicit", "xla", "cudnn"),
                 help="model.attention_impl of the JAX variants ('cudnn': GPU, bfloat16)")
  p.add_argument("--variants", default="",
                 help="comma list to run, or 'all' (default: all four); see --list")
  p.add_argument("--list", action="store_true", help="list the variants and exit")
  p.add_argument("--matmul_size", type=int, default=4096,
                 help="n of the n^3 float32 matmul of the machine line (smaller if slow)")
  p.add_argument("--xla_flags", default="", help="extra XLA_FLAGS for this run")
  p.add_argument("--profile", action="store_true",
                 help="also time the product step's stages (vision, image K/V, text) on one "
                      "group, with XLA's FLOPs and the share of the measured matmul rate")
  p.add_argument("--memory", action="store_true",
                 help="also measure each variant's peak RSS alone in a fresh process")
  p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "bench_blip_base"),
                 help="where the reference HF directory and converted weights are cached")
  p.add_argument("--json", default="", help="write the result rows here")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)   # internal: one variant
  return p.parse_args(argv)


def setup_env(args):
  """Platform and XLA_FLAGS must be set before jax is imported."""
  args.platform = args.platform or common.default_platform()
  flags = os.environ.get("XLA_FLAGS", "")
  if args.platform == "cpu":
    flags += f" --xla_force_host_platform_device_count={args.devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
  else:
    os.environ["JAX_PLATFORMS"] = "cuda"
  os.environ["XLA_FLAGS"] = f"{flags} {args.xla_flags}".strip()
  common.set_precision(args.precision, args.dtype)


def main(argv=None):
  args = parse_args(argv)
  setup_env(args)
  from bench import zero_shot_variants as zv
  benches = [int(b) for b in args.bench.split(",") if b.strip()]
  if args.list:
    for b in benches:
      print(f"benchmark {b}: " + ", ".join(zv.variant_names(b))
            + f"   (default: {', '.join(zv.DEFAULTS[b])})")
    return 0
  if args.worker:
    return worker(args, benches[0])
  os.makedirs(args.workdir, exist_ok=True)
  print(f"# bench_zero_shot  platform {args.platform}  dtype {args.dtype}  precision "
        f"{args.precision}  attention {args.attention_impl}  XLA_FLAGS={os.environ['XLA_FLAGS']!r}")
  machine = common.measure_machine(args.platform, args.matmul_size)
  ctx = zv.Context.create(args.workdir, args.platform, args.dtype, log=print, groups=args.groups,
                          attention_impl=args.attention_impl)
  rows = []
  for b in benches:
    names = zv.select(b, args.variants)
    print(f"\n## benchmark {b}: {zv.TITLES[b]}")
    variants = [zv.make_variant(ctx, b, n) for n in names]
    common.measure(variants, args.rounds)
    memory = {}
    if args.memory:
      for n in names:
        memory[n] = common.run_isolated(
            __file__, ["--worker", n, "--bench", str(b), "--devices", str(args.devices),
                       "--groups", str(args.groups), "--workdir", args.workdir,
                       "--platform", args.platform, "--dtype", args.dtype,
                       "--precision", args.precision, "--attention_impl", args.attention_impl,
                       "--xla_flags", args.xla_flags])
        print(f"  memory {n:<34s} peak {memory[n]['peak_rss_mib']:7.0f} MiB "
              f"(after weights {memory[n]['rss_loaded_mib']:7.0f} MiB)")
    ref = next((v.scores for v in variants if v.name == "torch_eager"), None)
    print(f"\nbenchmark {b} (median of {args.rounds} rounds; load {common.load_average()})")
    table = common.print_table(variants, zv.UNITS[b],
                               {"eager": "torch_eager", "compile": "torch_compile"},
                               reference_scores=ref, memory=memory)
    for r in table:
      r["bench"] = b
      if r["variant"] in memory:
        r.update({k: memory[r["variant"]][k] for k in ("peak_rss_mib", "rss_loaded_mib")})
    rows += table
  if args.profile:
    print(f"\n## where the time goes: one group (10 images, 1 description), 1 device, "
          f"best of {args.rounds}")
    print(f"{'stage':<32s} {'s':>7s} {'GFLOP':>8s} {'GFLOP/s':>8s} {'of jnp.dot rate':>16s}")
    for r in zv.profile_group(ctx, args.rounds):
      r["of_matmul_rate"] = r["gflops"] / machine.jax_gflops
      print(f"{r['stage']:<32s} {r['s']:>7.2f} {r['gflop']:>8.1f} {r['gflops']:>8.1f} "
            f"{r['of_matmul_rate']:>15.0%}")
      rows.append(dict(bench="profile", **r))
  print("\n" + machine.line())
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"machine": machine.__dict__, "machine_line": machine.line(), "rows": rows},
                f, indent=1, default=float)
  return 0


def worker(args, bench):
  """Prepares and runs one variant once in this fresh process; prints JSON with its memory."""
  from bench import zero_shot_variants as zv
  ctx = zv.Context.create(args.workdir, args.platform, args.dtype, log=lambda *_: None,
                          need=zv.needs(args.worker), groups=args.groups,
                          attention_impl=args.attention_impl)
  kind, opts = zv.VARIANTS[bench][args.worker]
  if kind == "torch":      # touch every weight page (transformers maps the file lazily)
    sum(float(p.sum()) for p in ctx.torch_model().parameters())
  else:
    ctx.device_params(opts.get("dev", 1))
    ctx.params = None                 # the host copy is no longer needed
    gc.collect()
  loaded = common.rss_mb()
  v = zv.make_variant(ctx, bench, args.worker)
  run, _ = v.prepare()
  t0 = time.perf_counter()
  run()
  print(json.dumps(dict(variant=args.worker, peak_rss_mib=common.peak_rss_mb(),
                        rss_loaded_mib=loaded, run_s=time.perf_counter() - t0)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
