"""Ahead-of-time plan of a run on a device topology, without the hardware:

  python -m contextblip_jax.aot --config configs/pretrain.py --topology v5e:4x4 \
      [--num_slices 2] [--json plan.json] [--config.model.compute_dtype=bfloat16 ...]

compiles the config's real step (the training step of its stage, `run/train.py:
build_train_step`, or for configs/evaluate.py the evaluation's scoring step) for the topology's
devices (TPU topologies through libtpu; 'cpu:N' on N forced host devices, so it runs anywhere)
and prints per chip: argument / output / temporary memory against the chip's HBM, FLOPs per
step, the collectives of the compiled program, the compile time, a roofline estimate of the
step time and of the paper's schedule, and the images per second each host must feed.
launch/README.md ("Planning for a TPU slice") has the table made with it.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import jax
import ml_collections

from contextblip_jax.data import pipeline
from contextblip_jax.evaluation import loop, scoring
from contextblip_jax.models.contextblip import init_params
from contextblip_jax.parallel import compilation, planning
from contextblip_jax.parallel import sharding as shd
from contextblip_jax.run.model_config import build_model

# Examples in one epoch of each stage's data (the paper's datasets), for the schedule estimate.
EPOCH_EXAMPLES = {
    "backbone": 1_336_000,     # BLIP's COCO + VG captions (~567K + ~769K), as pretrain
    "pretrain": 1_336_000,     # COCO (~567K captions) + Visual Genome (~769K captions)
    "finetune1": 16_594,       # IMAGECODE train descriptions
    "finetune2": 16_594,
    "evaluate": 1_039,         # IMAGECODE valid sets (one pass)
    "predict": 1_046,          # IMAGECODE test sets
}
# Host input-pipeline throughput per vCPU (bench/README.md, "bench_input.py": JPEG decode and
# the paper's augmentations, measured on a 2-core Xeon): images / s / vCPU at 224 and 384 px.
IMAGES_PER_VCPU_S = {224: 200.0, 384: 100.0}


def _sds(shapes: dict[str, tuple[tuple[int, ...], Any]], keys=None) -> dict[str, Any]:
  return {k: jax.ShapeDtypeStruct(s, dt) for k, (s, dt) in shapes.items()
          if keys is None or k in keys}


def _abstract_eval(cfg, model, mesh):
  """(jitted scoring step, its abstract args, sets per step) of the config's head."""
  rules = cfg.sharding_rules
  head = cfg.eval.head
  boxed = jax.eval_shape(lambda r: init_params(model, r, "all"), jax.random.PRNGKey(0))
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  params = scoring.head_params(nn.unbox(boxed), model, head)
  p_sh = scoring.param_shardings_for(model, params, mesh, rules)
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        params, p_sh)
  sets = loop.sets_per_batch(cfg, mesh)
  batch = _sds(pipeline.batch_shapes("eval", sets, image_size=model.config.blip.vision.image_size,
                                     max_length=cfg.data.max_length), loop.STEP_KEYS)
  batch_sh = shd.batch_shardings(batch, mesh, rules)
  step = scoring.make_score_step(model, head, p_sh, batch_sh, mesh, rules,
                                 compilation.compiler_options(cfg))
  return step, (params, batch), sets


def _abstract_train(cfg, model, mesh):
  """(jitted train step, its abstract args, examples per step) of the config's stage."""
  from contextblip_jax.run import train  # pylint: disable=g-import-not-at-top
  stage = cfg.mode
  kind = "pretrain" if stage in ("backbone", "pretrain") else "finetune"
  b = int(cfg.train.batch_size)
  batch = _sds(pipeline.batch_shapes(kind, b, image_size=model.config.blip.vision.image_size,
                                     max_length=cfg.data.max_length))
  spe = math.ceil(EPOCH_EXAMPLES[stage] / b)
  parts = train.build_train_step(cfg, stage, model, mesh, batch, spe)
  return parts.step_fn, (parts.abstract, batch), b


def default_step(cfg) -> str:
  """'eval' for evaluate / predict configs, else 'train'."""
  return "eval" if cfg.mode in ("evaluate", "predict") else "train"


def _step(cfg, model, mesh, step=None):
  if (step or default_step(cfg)) == "eval":
    return _abstract_eval(cfg, model, mesh)
  if cfg.mode not in EPOCH_EXAMPLES:
    raise planning.PlanError(f"config.mode {cfg.mode!r} has no step to plan (training stages, "
                             f"evaluate, predict)")
  return _abstract_train(cfg, model, mesh)


def _lowered_cost(cfg, per_step: int, step: str) -> dict[str, float]:
  """Global FLOPs / bytes of the step from XLA's cost analysis of its unscanned lowering on one
  host CPU device: a scanned program's own figures count a scanned block body once (an
  undercount), and TPU lowerings have no cost analysis before compiling."""
  plain = ml_collections.ConfigDict(cfg.to_dict())
  plain.model.scan_layers = False
  plain.eval.sets_per_batch = per_step
  model = build_model(plain)
  mesh = shd.make_mesh({"data": 1}, jax.devices("cpu")[:1])
  fn, args, _ = _step(plain, model, mesh, step)
  args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
  with jax.set_mesh(mesh):
    cost = fn.lower(*args).cost_analysis() or {}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return {"flops": float(cost.get("flops", float("nan"))),
          "bytes_accessed": float(cost.get("bytes accessed", float("nan")))}


def _with_slices(cfg: ml_collections.ConfigDict, num_slices: int) -> ml_collections.ConfigDict:
  """Several slices and `config.mesh_dcn` left at all ones: data parallel across slices
  (mesh_dcn.data = num_slices)."""
  if num_slices == 1 or any(int(v) != 1 for v in dict(cfg.mesh_dcn).values()):
    return cfg
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.mesh_dcn.data = num_slices
  return cfg


def plan(cfg: ml_collections.ConfigDict, topology: str, num_slices: int = 1, *,
         platform: str = "tpu", step: str | None = None, log=print) -> dict[str, Any]:
  """Compiles the config's step ('train' | 'eval'; default `default_step`) for `topology` x
  `num_slices` on `platform` ('tpu': libtpu's abstract devices; 'cpu': forced host devices)
  and returns the plan (see the module docstring); prints progress lines through `log`."""
  step = step or default_step(cfg)
  chip = planning.chip_of_topology(topology)
  devices = planning.topology_devices(topology, num_slices, platform)
  n = len(devices)
  cfg = _with_slices(cfg, num_slices)
  try:
    mesh = shd.mesh_from_config(cfg, devices)
  except ValueError as e:
    raise planning.PlanError(f"config.mesh {dict(cfg.mesh)} x config.mesh_dcn "
                             f"{dict(cfg.mesh_dcn)} does not fit {topology} x {num_slices} "
                             f"slice(s) ({n} chips): {e}") from e
  model = build_model(cfg)
  log(f"planning the {step} step of {cfg.mode} on {topology} x {num_slices} slice(s) = {n} "
      f"chips ({platform}), mesh {dict(mesh.shape)}, compute {cfg.model.compute_dtype}, "
      f"scan_layers {cfg.model.scan_layers}, remat {cfg.model.remat}")
  fn, args, per_step = _step(cfg, model, mesh, step)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  report = compilation.compile_report(compiled)
  if cfg.model.scan_layers or chip is not None:
    cost = _lowered_cost(cfg, per_step, step)
    flops = cost["flops"] / n
    flops_from = "unscanned program's cost analysis / chips"
    # HBM traffic: the compiled (fused) program's bytes, scaled like its FLOPs for the block
    # bodies a scanned program counts once; the unfused lowering's bytes overcount many times.
    c_flops, c_bytes = report.get("flops", 0.0), report.get("bytes_accessed", 0.0)
    nbytes = (c_bytes * max(1.0, flops / c_flops) if c_flops and c_flops == c_flops
              and c_bytes == c_bytes else float("nan"))
  else:
    flops, nbytes, flops_from = report.get("flops", float("nan")), report.get(
        "bytes_accessed", float("nan")), "compiled program (per chip)"
  step_s = planning.roofline_s(flops, nbytes, chip)
  size = model.config.blip.vision.image_size
  images = per_step * (1 if step == "train" and cfg.mode in ("backbone", "pretrain") else 10)
  hosts, host_vcpus = planning.host_vms(chip, n, num_slices)
  out: dict[str, Any] = {
      "mode": cfg.mode, "step": step, "topology": topology, "num_slices": num_slices,
      "platform": platform, "chips": n,
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "compute_dtype": cfg.model.compute_dtype, "scan_layers": bool(cfg.model.scan_layers),
      "remat": cfg.model.remat, "examples_per_step": per_step, "images_per_step": images,
      "compile_s": compile_s, "hbm_gib": chip.hbm_gib if chip else None,
      "per_chip_gib": {k: report.get(f"{k}_bytes", 0.0) / planning.GIB
                       for k in ("argument", "output", "temp", "alias")},
      "total_gib": planning.per_chip_bytes(report) / planning.GIB,
      "fits": planning.fits(report, chip), "flops_per_chip": flops,
      "bytes_per_chip": nbytes, "flops_from": flops_from, "bytes_from": "compiled",
      "collectives": planning.collectives(compiled.as_text()),
      "step_s_roofline": step_s, "chip": chip.name if chip else "cpu",
      "chip_source": chip.source if chip else None}
  if step_s:
    epochs = 1 if step == "eval" else int(cfg.train.num_epochs)
    examples = EPOCH_EXAMPLES["evaluate" if step == "eval" else cfg.mode]
    steps = math.ceil(examples / per_step) * epochs
    per_host = images / step_s / hosts
    rate = IMAGES_PER_VCPU_S[224 if size <= 224 else 384]
    out.update({
        "schedule_steps": steps, "schedule_hours": steps * step_s / 3600,
        "chip_hours": steps * step_s / 3600 * n, "hosts": hosts,
        "host_images_per_s": per_host, "host_vcpus_needed": per_host / rate,
        "host_vcpus": host_vcpus})
  return out


def format_plan(p: dict[str, Any]) -> str:
  g = p["per_chip_gib"]
  fit = {True: "fits", False: "DOES NOT FIT", None: "(no HBM figure for cpu)"}[p["fits"]]
  hbm = f" of {p['hbm_gib']:.0f} GiB HBM" if p["hbm_gib"] else ""
  lines = [
      f"{p['mode']} on {p['topology']} x {p['num_slices']} slice(s) ({p['chips']} chips, "
      f"{p['chip']}; {p['step']} step compiled for {p['platform']}), mesh {p['mesh']}, "
      f"{p['examples_per_step']} examples per step, "
      f"{p['compute_dtype']}, scan_layers={p['scan_layers']}, remat={p['remat']}",
      f"  compile: {p['compile_s']:.1f} s",
      f"  memory per chip: arguments {g['argument']:.2f} GiB, outputs {g['output']:.2f}, "
      f"temporaries {g['temp']:.2f}, aliased {g['alias']:.2f} -> {p['total_gib']:.2f} GiB"
      f"{hbm}: {fit}",
      f"  FLOPs per chip per step: {p['flops_per_chip'] / 1e12:.2f} T "
      f"(bytes accessed {p['bytes_per_chip'] / 1e9:.1f} GB; from the {p['flops_from']})"]
  coll = p["collectives"]
  lines.append("  collectives: " + (", ".join(
      f"{k} x{int(v['count'])} ({v['bytes'] / 2**20:.1f} MiB)" for k, v in sorted(coll.items()))
      or "none"))
  if p.get("step_s_roofline"):
    lines += [
        f"  roofline step time (at best): {p['step_s_roofline'] * 1e3:.1f} ms; the paper's "
        f"schedule ({p['schedule_steps']} steps): {p['schedule_hours']:.2f} h, "
        f"{p['chip_hours']:.1f} chip-hours",
        f"  input: {p['host_images_per_s']:.0f} images/s per host ({p['hosts']} host(s)) -> "
        f"~{p['host_vcpus_needed']:.0f} vCPUs of JPEG decode + augmentation per host, of "
        f"{p['host_vcpus']:.0f}",
        f"  chip figures: {p['chip_source']}"]
  return "\n".join(lines)


def main(cfg: ml_collections.ConfigDict, topology: str, num_slices: int, json_path: str, *,
         platform: str = "tpu", step: str | None = None) -> int:
  p = plan(cfg, topology, num_slices, platform=platform, step=step)
  print(format_plan(p), flush=True)
  if json_path:
    from contextblip_jax.storage.atomic import atomic_file  # pylint: disable=g-import-not-at-top
    with atomic_file(json_path, "w") as f:
      json.dump(p, f, indent=1, default=float)
  return 0


_TABLE_HEAD = ("| step | slice | mesh | compute | remat | GiB per chip (of HBM) | fits | "
               "step time, compute roofline | paper's schedule | chip-hours | input per host VM |\n"
               "|---|---|---|---|---|---|---|---|---|---|---|")


def _host_cores(p: dict[str, Any], step_s: float | None) -> str:
  """'8504 images/s, 42 of 224 vCPUs' per host VM at the compute roofline `step_s`, from the
  plan's images per step and the current chip table (hosts, vCPUs)."""
  chip = planning.chip_of_topology(p["topology"])
  if not step_s or chip is None or not p.get("host_vcpus_needed"):
    return ""
  per_vcpu = p["host_images_per_s"] / p["host_vcpus_needed"]    # the input benchmark's rate
  hosts, vcpus = planning.host_vms(chip, p["chips"], p.get("num_slices", 1))   # chips: in all
  per_host = p["images_per_step"] / step_s / hosts
  return f"{per_host:.0f} images/s, {per_host / per_vcpu:.0f} of {vcpus:.0f} vCPUs"


def markdown_table(json_dir: str) -> str:
  """The Markdown table of launch/README.md from the plans (`--json`) in `json_dir`."""
  import glob  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  rows = []
  for path in sorted(glob.glob(os.path.join(json_dir, "*.json"))):
    with open(path) as f:
      p = json.load(f)
    mesh = " ".join(f"{k}={v}" for k, v in p["mesh"].items() if v != 1) or "1 chip"
    what = {"pretrain": "pre-training", "finetune1": "stage 1", "finetune2": "stage 2",
            "evaluate": "zero-shot eval", "backbone": "backbone"}.get(p["mode"], p["mode"])
    # One rule for every row: the compute bound (FLOPs / bf16 peak); the HBM-traffic bound
    # (compiled bytes / bandwidth, recorded by newer plans) beside it.
    step, both = p.get("step_s_roofline"), p.get("step_s_roofline")
    if step:
      step = planning.roofline_s(p["flops_per_chip"], 0.0,
                                 planning.chip_of_topology(p["topology"]))
      for k in ("schedule_hours", "chip_hours"):
        p[k] *= step / both
    hbm = f" ({both * 1e3:.0f} ms with HBM traffic)" if p.get("bytes_from") == "compiled" else ""
    cores = _host_cores(p, step)
    sched = (f"{p['schedule_steps']} steps, {p['schedule_hours']:.2f} h" if step else "")
    rows.append((p["mode"], p["topology"], p["compute_dtype"], p["remat"], (
        f"| {what}, batch {p['examples_per_step']} | {p['topology']} ({p['chips']} chips) | "
        f"{mesh} | {p['compute_dtype']} | {p['remat']} | {p['total_gib']:.1f} "
        f"({p['hbm_gib']:.0f}) | {'yes' if p['fits'] else 'NO'} | "
        f"{step * 1e3:.0f} ms{hbm} | {sched} | {p.get('chip_hours', 0):.1f} | "
        f"{cores} |")))
  order = {"pretrain": 0, "finetune1": 1, "finetune2": 2, "evaluate": 3}
  rows.sort(key=lambda r: (order.get(r[0], 9), r[1], r[2], r[3]))
  return "\n".join([_TABLE_HEAD] + [r[-1] for r in rows])
