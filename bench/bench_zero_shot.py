"""Zero-shot IMAGECODE scoring speed: our JAX BLIP against the PyTorch reference, same run.

  .venv/bin/python bench/bench_zero_shot.py                 # both benchmarks (~15 min on 2 cores, ~20 with --memory)
  .venv/bin/python bench/bench_zero_shot.py --bench 1 --rounds 5 --variants torch_eager,jax_best

Benchmark 1 - ten-candidate groups, one description per set (SPEC §7.2): each group is the 10
candidate images and one [ENC]-first description (T = 30) scored by softmax(ITM)[:, 1].
Figure: groups/second, and the ratio to transformers `BlipForImageTextRetrieval` (CPU, float32,
eval, inference_mode) eager and under `torch.compile`, with the same weights (a random-weight
BLIP-base at 224 px, converted by `weight_convert`).

Benchmark 2 - several descriptions per set: 5 IMAGECODE valid sets with 1, 2, 2, 3, 3
descriptions (mean 2.2, the valid split's 2.22). The PyTorch reference recomputes everything per
description, as the authors' code does; ours encodes each set's 10 images once and also computes
the image-side cross-attention keys/values once (`Blip.image_cross_kv` + `Blip.itm_cached`).
Figure: descriptions/second and the same ratios.

Descriptions are real IMAGECODE valid descriptions (pre_caption + our tokenizer); images are
random pixels (speed does not depend on content). Variants run in interleaved rounds and the
table reports medians; `--memory` re-runs each variant alone in a fresh process for its peak
RSS. Every JAX variant's scores are compared with PyTorch eager's (max |d score|).
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


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--bench", default="1,2", help="which benchmarks: '1', '2' or '1,2'")
  p.add_argument("--rounds", type=int, default=5, help="timed rounds per variant")
  p.add_argument("--groups", type=int, default=1, help="benchmark 1: groups per timed run")
  p.add_argument("--devices", type=int, default=10,
                 help="forced host devices (XLA_FLAGS); each JAX variant uses its first 1-10")
  p.add_argument("--variants", default="",
                 help="comma list to run, or 'all' (default: the main variants); see --list")
  p.add_argument("--list", action="store_true", help="list the variants and exit")
  p.add_argument("--xla_flags", default="", help="extra XLA_FLAGS for this run")
  p.add_argument("--memory", action="store_true",
                 help="also measure each variant's peak RSS alone in a fresh process")
  p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "bench_blip_base"),
                 help="where the reference HF directory and converted weights are cached")
  p.add_argument("--json", default="", help="write the result rows here")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)   # internal: one variant
  return p.parse_args(argv)


def setup_env(args):
  """XLA_FLAGS must be set before jax is imported."""
  flags = os.environ.get("XLA_FLAGS", "")
  flags += f" --xla_force_host_platform_device_count={args.devices} {args.xla_flags}"
  os.environ["XLA_FLAGS"] = flags.strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.dirname(HERE))   # run as a script from anywhere in the checkout


def main(argv=None):
  args = parse_args(argv)
  setup_env(args)
  from bench import common, zero_shot_variants as zv
  benches = [int(b) for b in args.bench.split(",") if b.strip()]
  if args.list:
    for b in benches:
      print(f"benchmark {b}: " + ", ".join(zv.variant_names(b))
            + f"   (default: {', '.join(zv.DEFAULTS[b])})")
    return 0
  if args.worker:
    return worker(args, benches[0])
  os.makedirs(args.workdir, exist_ok=True)
  print(f"# bench_zero_shot  load {common.load_average()}  XLA_FLAGS={os.environ['XLA_FLAGS']!r}")
  ctx = zv.Context.create(args.workdir, args.devices, log=print)
  rows = []
  for b in benches:
    names = zv.select(b, args.variants)
    print(f"\n## benchmark {b}: {zv.TITLES[b]}")
    variants = [zv.make_variant(ctx, b, n, groups=args.groups) for n in names]
    common.measure(variants, args.rounds)
    memory = {}
    if args.memory:
      for n in names:
        memory[n] = common.run_isolated(
            __file__, ["--worker", n, "--bench", str(b), "--devices", str(args.devices),
                       "--groups", str(args.groups), "--workdir", args.workdir,
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
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1, default=float)
  return 0


def worker(args, bench):
  """Prepares and runs one variant once in this fresh process; prints JSON with its memory."""
  from bench import common, zero_shot_variants as zv
  ctx = zv.Context.create(args.workdir, args.devices, log=lambda *_: None,
                          need=zv.needs(args.worker))
  kind, opts = zv.VARIANTS[bench][args.worker]
  if kind == "torch":      # touch every weight page (transformers maps the file lazily)
    sum(float(p.sum()) for p in ctx.torch_model().parameters())
  else:
    ctx.device_params(opts.get("dev", 1))
    ctx.params = None                 # the host copy is no longer needed
    gc.collect()
  loaded = common.rss_mb()
  v = zv.make_variant(ctx, bench, args.worker, groups=args.groups)
  run, _ = v.prepare()
  t0 = time.perf_counter()
  run()
  print(json.dumps(dict(variant=args.worker, peak_rss_mib=common.peak_rss_mb(),
                        rss_loaded_mib=loaded, run_s=time.perf_counter() - t0)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
