"""Prints data-path timings: synthetic generation and pipeline throughput (not a test).

  python -m contextblip_jax.data.benchmark [--out DIR] [--image_size 32] [--batches 10]

Generates the default synthetic dataset into --out (a temporary directory by default), then
iterates each pipeline for --batches batches (after one warm-up batch) with and without the
BLIP augmentation and the in-memory image cache, and prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from contextblip_jax.data import imagecode, pairs, pipeline, synthetic
from contextblip_jax.data.tokenizer import BlipTokenizer


def _rate(pipe, batches: int, per_batch: int) -> float:
  it = iter(pipe)
  next(it)                                     # warm-up (thread start, first reads)
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  return round(batches * per_batch / (time.perf_counter() - t0), 1)


def run(out: str, image_size: int, batches: int) -> dict:
  t0 = time.perf_counter()
  summary = synthetic.generate(out, seed=0, overwrite=True, image_size=image_size)
  report = {"generate_seconds": round(time.perf_counter() - t0, 2),
            "files": sum(len(f) for _, _, f in os.walk(out)),
            "train_descriptions": summary["splits"]["train"]["descriptions"]}
  tok = BlipTokenizer()
  pr = pairs.read_pairs(os.path.join(out, "pairs.json"))
  train = imagecode.read_imagecode_dir(out, "train")
  valid = imagecode.read_imagecode_dir(out, "valid")
  for aug in (0, "none"):
    for cache in (False, True):
      tag = f"aug={aug},cache={cache}"
      p = pipeline.pretrain_pipeline(pr, image_size=image_size, global_batch_size=64, seed=0,
                                     tokenizer=tok, augmentation=aug, cache_images=cache)
      report[f"pretrain_pairs_per_s[{tag}]"] = _rate(p, batches, 64)
      p = pipeline.imagecode_train_pipeline(train, image_size=image_size, global_batch_size=36,
                                            seed=0, tokenizer=tok, augmentation=aug,
                                            cache_images=cache)
      report[f"imagecode_train_examples_per_s[{tag}]"] = _rate(p, batches, 36)
  p = pipeline.imagecode_eval_pipeline(valid, image_size=image_size, sets_per_batch=16,
                                       tokenizer=tok)
  report["imagecode_eval_sets_per_s"] = _rate(p, min(batches, p.steps_per_epoch - 1), 16)
  return report


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m contextblip_jax.data.benchmark")
  parser.add_argument("--out", default=None, help="dataset directory (default: a temp dir)")
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--batches", type=int, default=10)
  args = parser.parse_args(argv)
  if args.out:
    report = run(args.out, args.image_size, args.batches)
  else:
    with tempfile.TemporaryDirectory() as tmp:
      report = run(os.path.join(tmp, "synthetic"), args.image_size, args.batches)
  print(json.dumps(report, indent=1))
  return report


if __name__ == "__main__":
  main()
