"""bfloat16 against float32 compute at B/16-224: ITM match probabilities of one real IMAGECODE
description against a ten-candidate group.

  .venv/bin/python bench/bench_precision.py --valid_json DIR/valid_data.json [--set NAME]

Builds (or reuses, in --workdir, shared with bench_zero_shot.py) the benchmarks' random-weight
BLIP-base (bench/common.py: transformers `BlipForImageTextRetrieval`, weights N(0, 0.02)),
converts it with the project's converter, and scores the description (the first one of the
set; `pre_caption_imagecode`, T = 30) against ten generated images (N(0, 1) normalised pixels)
through the product path: `make_model(config, compute_dtype)`, `encode_candidates` +
`candidate_scores(head='zero_shot')`, once in float32 and once in bfloat16. Prints the largest
|p_bf16 - p_f32| over the ten ITM match probabilities, the largest ITM-logit difference,
whether the two pick the same image, and the machine line (lscpu model, cores, jnp.dot
GFLOP/s in float32 and bfloat16 measured in the same run, load average). A script, not a
test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from contextblip_jax.data.tokenizer import (VOCAB_PATH, BlipTokenizer,  # noqa: E402
                                             pre_caption_imagecode)
from contextblip_jax.models.contextblip import ContextBlipConfig, make_model  # noqa: E402

def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--valid_json", required=True, help="IMAGECODE valid_data.json")
  p.add_argument("--set", default="", help="image set whose first description is scored "
                                           "(default: the file's first set)")
  p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "bench_blip_base"),
                 help="where the reference HF directory is cached")
  p.add_argument("--seed", type=int, default=0, help="seed of the generated images")
  p.add_argument("--attention_impl", default="explicit", help="model.attention_impl, both runs")
  return p.parse_args(argv)


def machine_line() -> str:
  return (f"machine: {common.cpu_model()}, {common.cpu_cores()} cores; jnp.dot 2048^3 "
          f"float32 {common.jax_matmul_gflops(2048):.0f} GFLOP/s, bfloat16 "
          f"{common.jax_matmul_gflops(2048, dtype='bfloat16'):.0f} GFLOP/s; jax {jax.__version__}, "
          f"backend {jax.default_backend()}; load average {common.load_average()}")


def main(argv=None):
  args = parse_args(argv)
  with open(args.valid_json) as f:
    data = json.load(f)
  name = args.set or next(iter(data))
  idx, text = next(iter(data[name].items()))
  caption = pre_caption_imagecode(text)
  enc = BlipTokenizer(VOCAB_PATH)([caption], max_length=common.TEXT_LENGTH)
  hf_dir = os.path.join(args.workdir, "hf_blip_base_224")
  os.makedirs(args.workdir, exist_ok=True)
  common.build_reference_dir(hf_dir)
  blip, blip_params = common.convert_reference(hf_dir)
  config = ContextBlipConfig(blip=blip, use_adapter=False, use_tmim=False)
  params = {"pretrained_blip": jax.device_put(blip_params)}
  pixels = common.make_sets([1], seed=args.seed)[0].pixels[None]        # [1, 10, S, S, 3]
  ids, mask = jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"])
  out = {}
  for dtype in ("float32", "bfloat16"):
    model = make_model(config, dtype, args.attention_impl)

    def run(mod):
      embeds = mod.encode_candidates(pixels)
      states = mod.candidate_states(embeds, ids, mask)                     # [1, 10, D]
      probs = mod.candidate_scores(embeds, ids, mask, "zero_shot")         # [1, 10]
      return mod.itm_logits(states[0][:, None]), probs
    t0 = time.perf_counter()
    logits, probs = jax.jit(lambda p: model.apply({"params": p}, method=run))(params)
    out[dtype] = (np.asarray(logits), np.asarray(probs[0]), time.perf_counter() - t0)
  (l32, p32, t32), (l16, p16, t16) = out["float32"], out["bfloat16"]
  print(machine_line())
  print(f"set {name}, description {idx}: {caption!r} ({int(mask.sum())} tokens); "
        f"attention_impl {args.attention_impl}")
  print(f"ITM match probability float32:  {np.array2string(p32, precision=5)}")
  print(f"ITM match probability bfloat16: {np.array2string(p16, precision=5)}")
  print(f"largest |p_bf16 - p_f32| over the group: {np.abs(p16 - p32).max():.2e} "
        f"(probabilities {p32.min():.4f}..{p32.max():.4f}); largest ITM-logit difference "
        f"{np.abs(l16 - l32).max():.2e}; same best image: {int(p16.argmax()) == int(p32.argmax())}"
        f" (float32 {int(p32.argmax())}, bfloat16 {int(p16.argmax())})")
  print(f"first call incl. compile: float32 {t32:.1f} s, bfloat16 {t16:.1f} s")


if __name__ == "__main__":
  main()
