"""Training-step cost at the B/16-224 configuration on this machine's CPU.

  .venv/bin/python bench/bench_steps.py                       # all three steps (~7 min, 2 cores)
  .venv/bin/python bench/bench_steps.py --steps pretrain --batch 8 --runs 3
  .venv/bin/python bench/bench_steps.py --steps pretrain,evaluate --scan --runs 0   # compile only
  .venv/bin/python bench/bench_steps.py --steps pretrain,finetune1 --remat full --batch 2 --runs 0

For each step (pretraining B pairs; fine-tuning stages 1 and 2 on G groups of 10 images), in a
fresh process of its own (so that its peak RSS is its own): random-init parameters built
shape-first by `steps.init_train_state`, the jitted step compiled ahead of time by
`compilation.compile_step`, one warm-up step, then the median of `--runs` timed steps. Printed:
compile time, step time, XLA's FLOPs per step (cost_analysis of the compiled program), achieved FLOP/s
and its fraction of this machine's float32 matmul peak (a large jnp.dot measured in the same
run), XLA's memory_analysis (arguments / outputs / temporaries) and the process's peak RSS.
`--scan` builds the model with scanned layers and `--remat POLICY` with per-block remat
(models/layout.py); `--runs 0` only compiles (no parameters are allocated: compile time, FLOPs
and memory_analysis). Step `evaluate` compiles the evaluation's scoring step
(`evaluation/scoring.py`, zero-shot head) for `--groups` sets of 10 images and 2 descriptions.
With scanned layers XLA's cost analysis may count a scanned block body once (FLOPs per step
then undercount); compare FLOPs between unscanned runs.

Where the backward pass runs (lowered programs' FLOPs, no compile):
  pretrain  step vs forward-only loss vs the two frozen-ViT forwards (full image and visible
            patches): the backward pass costs less than the ViT forwards alone, so no backward
            runs through the frozen ViT;
  stage 1   the step with the ViT training (as the reference) vs the same step with the ViT
            frozen by a freeze rule: the difference is the ViT's backward.
A script, not a test: it asserts nothing. Figures drift ~10% between runs on a shared machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))   # run as a script from anywhere in the checkout

from bench import common  # noqa: E402  (imports no jax)

PRETRAIN_RULES = [("pretrained_blip/.*", "freeze"), (".*", "train")]      # docs/method.md#freezing
STAGE1_RULES = [("context_encoder/.*", "freeze"), (".*", "train")]
STAGE2_RULES = [("context_encoder/.*", "train"), (".*", "freeze")]
STEPS = {   # name -> (objective, parameter stage, freeze rules, optimizer kind, loss reduction)
    "pretrain": ("pretrain", "pretrain", PRETRAIN_RULES, "pretrain", "mean"),
    "finetune1": ("finetune_stage1", "finetune", STAGE1_RULES, "finetune_stage1", "sum"),
    "finetune2": ("finetune_stage2", "finetune", STAGE2_RULES, "finetune_stage2", "sum"),
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", default="pretrain,finetune1,finetune2", help="comma list of steps")
  p.add_argument("--variant", default="B/16", help="model variant (models/variants.py)")
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--batch", type=int, default=8, help="pretraining pairs per step")
  p.add_argument("--groups", type=int, default=1, help="fine-tuning groups (of 10) per step")
  p.add_argument("--text_length", type=int, default=30)
  p.add_argument("--runs", type=int, default=3,
                 help="timed steps (median) after one warm-up; 0 = compile only")
  p.add_argument("--scan", action="store_true", help="scanned layers (model.scan_layers)")
  common.add_compute_args(p, platform=False)   # JAX's default backend runs the step
  p.add_argument("--remat", default="none", help="per-block remat policy (model.remat)")
  p.add_argument("--devices", type=int, default=1,
                 help="forced host devices; the batch is sharded over all of them (data axis)")
  p.add_argument("--no_flops_variants", action="store_true",
                 help="skip the lowered-FLOPs comparisons (backward through the ViT or not)")
  p.add_argument("--json", default="", help="write the rows here")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)   # internal: one step
  return p.parse_args(argv)


def matmul_peak(n: int = 4096, reps: int = 5, dtype: str = "float32") -> float:
  """Best FLOP/s of an n x n x n jnp.dot in `dtype` (2 n^3 FLOPs) over `reps` runs."""
  return common.jax_matmul_gflops(n, reps, dtype) * 1e9


# --------------------------------------------------------------------------------------------
# Worker: one step kind in this process
# --------------------------------------------------------------------------------------------

def _batches(name, args, cfg):
  import jax
  import jax.numpy as jnp
  s, t = cfg.blip.vision.image_size, args.text_length
  k1, k2 = jax.random.split(jax.random.PRNGKey(1))
  if name == "pretrain":
    b = args.batch
    ids = jax.random.randint(k2, (b, t), 1000, 30000).at[:, 0].set(101)
    return {"image": jax.random.normal(k1, (b, s, s, 3)), "input_ids": ids,
            "attention_mask": jnp.ones((b, t), jnp.int32)}
  g, k = args.groups, cfg.num_candidates
  return {"images": jax.random.normal(k1, (g, k, s, s, 3)),
          "input_ids": jax.random.randint(k2, (g, t), 1000, 30000).at[:, 0].set(101),
          "attention_mask": jnp.ones((g, t), jnp.int32),
          "label": jnp.zeros((g,), jnp.int32), "is_video": jnp.ones((g,), bool)}


def _lowered_flops(fn, *args) -> float:
  return float(fn.lower(*args).cost_analysis()["flops"])


def _flops_variants(name, args, model, opt, mesh, batch, abstract) -> dict:
  """Lowered FLOPs that show where the backward pass runs (see the module doc)."""
  import jax
  import jax.numpy as jnp
  from contextblip_jax.training import objectives
  from contextblip_jax.training import masking, steps
  from contextblip_jax.parallel import sharding as shd
  from contextblip_jax.models.contextblip import ContextBlip, init_params
  objective, stage, rules, _, reduction = STEPS[name]
  loss_fn = functools.partial(objectives.LOSSES[objective], model=model, cfg=None, train=True)
  params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), abstract.params)
  bsh = shd.batch_shardings(batch, mesh)
  out = {"lowered_step": _lowered_flops(
      steps.make_train_step(loss_fn, opt, _shardings(abstract), bsh, mesh=mesh,
                            reduction=reduction), abstract, batch)}
  if name == "pretrain":
    c = model.config
    out["lowered_forward"] = _lowered_flops(jax.jit(lambda p, b, r: loss_fn(p, b, r)[0]),
                                            params, batch, jax.random.PRNGKey(0))
    m = masking.num_masked(masking.DEFAULT_MASK_RATIO, c.num_patches)
    visible = jnp.broadcast_to(jnp.arange(m, c.num_patches), (args.batch, c.num_patches - m))
    out["lowered_vit_forwards"] = (
        _lowered_flops(jax.jit(functools.partial(model.apply, method=ContextBlip.encode_image)),
                       {"params": params}, batch["image"]) +
        _lowered_flops(jax.jit(functools.partial(model.apply,
                                                 method=ContextBlip.encode_visible)),
                       {"params": params}, batch["image"], visible))
  if name == "finetune1":
    frozen_vit = [("pretrained_blip/visual_encoder/.*", "freeze")] + rules
    abs2, sh2, _ = steps.abstract_train_state(lambda r: init_params(model, r, stage), tx=opt.tx,
                                              freeze_rules=frozen_vit, mesh=mesh)
    out["lowered_step_vit_frozen"] = _lowered_flops(
        steps.make_train_step(loss_fn, opt, sh2, bsh, mesh=mesh, reduction=reduction),
        abs2, batch)
  return out


def _shardings(abstract):
  import jax
  return jax.tree.map(lambda s: s.sharding, abstract)


def _model_config(args):
  from contextblip_jax.models.contextblip import ContextBlipConfig
  return ContextBlipConfig.for_variant(args.variant, args.image_size).with_layers(
      args.scan, args.remat)


def run_eval_worker(args) -> dict:
  """Compiles the evaluation's scoring step (zero-shot head) from abstract inputs."""
  import jax
  import jax.numpy as jnp
  import flax.linen as nn
  from contextblip_jax.evaluation import scoring
  from contextblip_jax.models.contextblip import init_params, make_model
  from contextblip_jax.parallel import compilation
  from contextblip_jax.parallel import sharding as shd
  cfg = _model_config(args)
  model = make_model(cfg, args.dtype)
  mesh = shd.make_mesh({"data": -1})
  head = "zero_shot"
  boxed = jax.eval_shape(lambda r: init_params(model, r, "zero_shot"), jax.random.PRNGKey(0))
  params = scoring.head_params(nn.unbox(boxed), model, head)
  p_sh = scoring.param_shardings_for(model, params, mesh)
  g, d, t, s = args.groups, 2, args.text_length, cfg.blip.vision.image_size
  sds = jax.ShapeDtypeStruct
  batch = {"images": sds((g, cfg.num_candidates, s, s, 3), jnp.float32),
           "input_ids": sds((g, d, t), jnp.int32), "attention_mask": sds((g, d, t), jnp.int32),
           "is_video": sds((g,), jnp.bool_), "desc_mask": sds((g, d), jnp.bool_),
           "example_index": sds((g, d), jnp.int32), "set_mask": sds((g,), jnp.bool_)}
  b_sh = shd.batch_shardings(batch, mesh)
  step = scoring.make_score_step(model, head, p_sh, b_sh, mesh)
  params = jax.tree.map(lambda x, sh: sds(x.shape, x.dtype, sharding=sh), params, p_sh)
  _, report = compilation.compile_step(step, params, batch, mesh=mesh, name="evaluate")
  return {"step": "evaluate", "variant": args.variant, "image_size": args.image_size,
          "devices": jax.device_count(), "examples": f"{g}x{cfg.num_candidates}, 2 desc",
          "params_trainable": 0, "params_frozen": sum(x.size for x in jax.tree.leaves(params)),
          "scan": args.scan, "remat": args.remat, **report}


def run_worker(name: str, args) -> dict:
  import jax
  from contextblip_jax.training import objectives
  from contextblip_jax.training import optim
  from contextblip_jax.training import steps
  from contextblip_jax.parallel import compilation
  from contextblip_jax.parallel import sharding as shd
  from contextblip_jax.models.contextblip import init_params, make_model
  if name == "evaluate":
    return run_eval_worker(args)
  objective, stage, rules, opt_kind, reduction = STEPS[name]
  cfg = _model_config(args)
  model = make_model(cfg, args.dtype)
  mesh = shd.make_mesh({"data": -1})
  opt = optim.make_optimizer(optim.default_config(opt_kind), steps_per_epoch=1000)
  batch = _batches(name, args, cfg)
  init_fn = lambda r: init_params(model, r, stage)
  row = {"step": name, "variant": args.variant, "image_size": args.image_size,
         "devices": jax.device_count(), "scan": args.scan, "remat": args.remat,
         "examples": args.batch if name == "pretrain" else f"{args.groups}x{cfg.num_candidates}"}
  abstract, _, _ = steps.abstract_train_state(init_fn, tx=opt.tx, freeze_rules=rules, mesh=mesh)
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  row["params_trainable"], row["params_frozen"] = count(abstract.trainable), count(abstract.frozen)
  if not args.no_flops_variants:
    row.update(_flops_variants(name, args, model, opt, mesh, batch, abstract))
  loss_fn = functools.partial(objectives.LOSSES[objective], model=model, cfg=None, train=True)
  bsh = shd.batch_shardings(batch, mesh)
  if args.runs == 0:        # compile only, from the abstract state
    jitted = steps.make_train_step(loss_fn, opt, _shardings(abstract), bsh, mesh=mesh,
                                   reduction=reduction)
    row.update(compilation.compile_step(jitted, abstract, batch, mesh=mesh, name=name)[1])
    row["peak_rss_mb"] = common.peak_rss_mb()
    return row

  t = time.perf_counter()
  state, sh = steps.init_train_state(init_fn, jax.random.PRNGKey(0), tx=opt.tx,
                                     freeze_rules=rules, mesh=mesh)
  jax.block_until_ready(state)
  row["init_s"] = time.perf_counter() - t
  jitted = steps.make_train_step(loss_fn, opt, sh, bsh, mesh=mesh, reduction=reduction)
  compiled, report = compilation.compile_step(jitted, abstract, batch, mesh=mesh, name=name)
  row.update(report)
  batch = jax.device_put(batch, bsh)
  times = []
  for i in range(args.runs + 1):
    t = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    if i:                      # the first step is the warm-up
      times.append(time.perf_counter() - t)
  row["step_s"] = statistics.median(times)
  row["step_s_all"] = times
  row["loss"] = float(metrics["loss"])
  row["peak_rss_mb"] = common.peak_rss_mb()
  return row


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

def _child(name: str, args) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", name]
  for key in ("variant", "image_size", "batch", "groups", "text_length", "runs", "devices",
              "remat", "dtype", "precision"):
    cmd += [f"--{key}", str(getattr(args, key))]
  if args.no_flops_variants:
    cmd.append("--no_flops_variants")
  if args.scan:
    cmd.append("--scan")
  out = subprocess.run(cmd, capture_output=True, text=True)
  for line in out.stdout.splitlines():
    if line.startswith("ROW "):
      return json.loads(line[4:])
  raise RuntimeError(f"worker {name} failed (rc {out.returncode}):\n{out.stderr[-4000:]}")


def _print(rows, peak, load_before, load_after, dtype="float32"):
  gib = 2.0**30
  gpu = common.gpu_name()
  print(f"machine: {common.cpu_model()}, {common.cpu_cores()} cores" + (f", GPU {gpu}" if gpu else ""))
  prec = os.environ.get("JAX_DEFAULT_MATMUL_PRECISION", "default")
  print(f"\n{dtype} ({prec}) matmul peak (4096^3 jnp.dot, best of 5): {peak / 1e9:.0f} GFLOP/s; "
        f"load average before {load_before}, after {load_after}")
  head = ("step", "scan", "remat", "examples", "trainable", "compile s", "step s",
          "GFLOP/step", "GFLOP/s", "of peak", "arg GiB", "out GiB", "temp GiB", "peak RSS GiB")
  print("| " + " | ".join(head) + " |")
  print("|" + "---|" * len(head))
  for r in rows:
    timed = "step_s" in r
    rate = r["flops"] / r["step_s"] if timed else float("nan")
    rss = f"{r['peak_rss_mb'] / 1024:.2f}" if "peak_rss_mb" in r else "-"
    print(f"| {r['step']} | {r.get('scan', False)} | {r.get('remat', 'none')} | "
          f"{r['examples']} | {r['params_trainable'] / 1e6:.1f}M | "
          f"{r['compile_s']:.0f} | {r['step_s'] if timed else float('nan'):.2f} | "
          f"{r['flops'] / 1e9:.0f} | {rate / 1e9:.0f} | {rate / peak:.0%} | "
          f"{r['argument_bytes'] / gib:.2f} | {r['output_bytes'] / gib:.2f} | "
          f"{r['temp_bytes'] / gib:.2f} | {rss} |")
  for r in rows:
    if "lowered_forward" in r:
      fwd, step, vit = r["lowered_forward"], r["lowered_step"], r["lowered_vit_forwards"]
      print(f"{r['step']}: lowered FLOPs step {step / 1e9:.0f} G = forward {fwd / 1e9:.0f} G + "
            f"backward/update {(step - fwd) / 1e9:.0f} G; the frozen ViT's two forwards alone "
            f"are {vit / 1e9:.0f} G (a ViT backward would cost ~1.6x that again): no backward "
            "through the frozen ViT")
    if "lowered_step_vit_frozen" in r:
      a, b = r["lowered_step"], r["lowered_step_vit_frozen"]
      print(f"{r['step']}: lowered FLOPs step with the ViT training {a / 1e9:.0f} G, with the ViT "
            f"frozen by a rule {b / 1e9:.0f} G: freezing removes {(a - b) / 1e9:.0f} G "
            f"({1 - b / a:.0%}), the ViT's backward")


def main(argv=None):
  args = parse_args(argv)
  flags = os.environ.get("XLA_FLAGS", "")
  if args.devices > 1:
    flags += f" --xla_force_host_platform_device_count={args.devices}"
  os.environ["XLA_FLAGS"] = flags.strip()
  common.set_precision(args.precision, args.dtype)
  if args.worker:
    row = run_worker(args.worker, args)
    print("ROW " + json.dumps(row), flush=True)
    return
  load_before = common.load_average()
  peak = matmul_peak(dtype=args.dtype)
  rows = []
  for name in args.steps.split(","):
    if name not in STEPS and name != "evaluate":
      raise SystemExit(f"unknown step {name!r}; known: {sorted(STEPS) + ['evaluate']}")
    print(f"running {name} ...", flush=True)
    rows.append(_child(name, args))
  peak = max(peak, matmul_peak(dtype=args.dtype))          # measured again after the steps: keep the best
  _print(rows, peak, load_before, common.load_average(), args.dtype)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"matmul_peak_flops": peak, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
