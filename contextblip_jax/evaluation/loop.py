"""IMAGECODE evaluation loop, separate from training (SPEC §7.2, §8.5).

Batches hold whole image sets (`data/pipeline.imagecode_eval_pipeline`): each set's 10
candidates are encoded once by the vision tower and reused for all its descriptions
(`objectives.encode_candidates` -> `score_with_embeds`), in one jitted, sharded step per batch.
Heads: 'zero_shot' (ITM match probability), 'stage1', 'stage2' (fine-tuned logits).

Outputs (under the directory given, process 0 writes):
  <name>.predictions.jsonl   one line per description: set, index, description, static, gold,
                             pred, all ten scores (skipped descriptions: pred null + reason)
  <name>.report.json         accuracy all / video / static with Wilson 95% CIs, per tag
  <name>.leaderboard.json    for the unlabelled test file: {set: [pred, ...]} in file order
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from contextblip_jax.parallel import distributed
from contextblip_jax.evaluation import accuracy
from contextblip_jax.training import objectives
from contextblip_jax.parallel import sharding as shd
from contextblip_jax.storage import workdir as wd
from contextblip_jax.data import imagecode, pipeline
from contextblip_jax.storage.metric_writers import MetricWriter, Progress
from contextblip_jax.models.contextblip import ContextBlip, init_params

HEADS = ("zero_shot", "stage1", "stage2")
_JIT_KEYS = ("images", "input_ids", "attention_mask", "is_video", "desc_mask", "example_index",
             "set_mask")


# ------------------------------------------------------------------ data

def split_paths(cfg: ml_collections.ConfigDict, split: str) -> tuple[str, str, str | None]:
  """(annotation JSON, image root, tags YAML or None) of `split` from config.data."""
  d = cfg.data
  if not d.imagecode_dir:
    raise ValueError("config.data.imagecode_dir is required (directory with the IMAGECODE "
                     "JSON files)")
  if split not in imagecode.SPLIT_FILES:
    raise ValueError(f"unknown split {split!r}; known: {sorted(imagecode.SPLIT_FILES)}")
  json_path = os.path.join(d.imagecode_dir, imagecode.SPLIT_FILES[split])
  image_root = d.image_root or os.path.join(d.imagecode_dir, imagecode.IMAGE_DIR)
  tags = None
  if split == "valid":
    tags = d.annotation_yaml or os.path.join(d.imagecode_dir, imagecode.ANNOTATION_FILE)
    if not os.path.isfile(tags):
      if d.annotation_yaml:
        raise FileNotFoundError(f"config.data.annotation_yaml: {tags} not found")
      tags = None
  return json_path, image_root, tags


def load_split(cfg: ml_collections.ConfigDict, split: str) -> imagecode.ImagecodeSplit:
  """Reads one IMAGECODE split with the configured bad-input policy.

  With on_error='skip' every image is decoded up front so a corrupt one skips its set (and is
  counted) instead of failing mid-run; with 'raise' a corrupt image raises at load time,
  naming the file.
  """
  json_path, image_root, tags = split_paths(cfg, split)
  skip = cfg.data.on_error == "skip"
  return imagecode.read_imagecode(json_path, image_root, annotation_path=tags,
                                  check_images="decode" if skip else True,
                                  on_error=cfg.data.on_error)


def skipped_records(split: imagecode.ImagecodeSplit) -> list[dict[str, Any]]:
  """One record (pred None, scores None, `skipped` reason) per description the reader left
  out, so the predictions file accounts for every description of the annotation file."""
  if not split.skipped:
    return []
  with open(split.source, encoding="utf-8") as f:
    data = json.load(f)
  out, seen = [], set()
  for s in split.skipped:
    if s.file.endswith((".yaml", ".yml")):
      continue                                   # tag problems drop no description
    set_name, _, key = s.entry.partition("/")
    entry = data.get(set_name)
    if isinstance(entry, dict):
      items = [(i, k, v) for i, (k, v) in enumerate(entry.items())]
    elif isinstance(entry, list):
      items = [(i, str(i), v) for i, v in enumerate(entry)]
    else:
      items = []
    for i, k, text in items:
      if key and k != key:
        continue
      if (set_name, i) in seen:
        continue
      seen.add((set_name, i))
      gold = int(k) if split.labelled and str(k).isdigit() else None
      out.append({"set": set_name, "index": i, "description": text if isinstance(text, str)
                  else repr(text), "static": not imagecode.is_video_set(set_name),
                  "gold": gold, "pred": None, "scores": None, "skipped": s.reason})
  return out


# ------------------------------------------------------------------ the jitted step

def score_batch(params, batch, *, model: ContextBlip, head: str):
  """Scores [L, D, 10] of a set batch; each set's vision features computed once."""
  images = batch["images"]                                          # [L, 10, S, S, 3]
  l, d, t = batch["input_ids"].shape
  embeds = objectives.encode_candidates(params, images, model=model)   # [L, 10, N, Dv]
  embeds = jnp.repeat(embeds, d, axis=0)                           # [L*D, 10, N, Dv]
  is_video = jnp.repeat(batch["is_video"], d, axis=0)
  scores = objectives.score_with_embeds(
      params, embeds, batch["input_ids"].reshape(l * d, t),
      batch["attention_mask"].reshape(l * d, t), model=model, head=head,
      is_video=is_video if head == "stage2" else None)
  meta = {k: batch[k] for k in ("desc_mask", "example_index", "set_mask")}
  return scores.reshape(l, d, -1).astype(jnp.float32), meta


def make_score_step(model: ContextBlip, head: str, param_shardings: Any, batch_shardings: Any,
                    mesh: jax.sharding.Mesh, rules=None, compiler_options=None):
  """jit(score_batch) with explicit shardings; outputs replicated (small)."""
  if head not in HEADS:
    raise ValueError(f"unknown head {head!r}; known: {HEADS}")
  rules = shd.get_rules(rules)
  fn = functools.partial(score_batch, model=model, head=head)

  def wrapped(params, batch):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      return fn(params, batch)
  return jax.jit(wrapped, in_shardings=(param_shardings, batch_shardings),
                 out_shardings=shd.replicated(mesh), compiler_options=compiler_options)


def head_params(params: dict[str, Any], model: ContextBlip, head: str) -> dict[str, Any]:
  """The parameter groups a head reads (others are not passed to the step)."""
  names = ["pretrained_blip"]
  if model.config.use_adapter:
    names.append("vision_adapter")
  if head in ("stage1", "stage2"):
    names.append("prediction_layer")
  if head == "stage2":
    names.append("context_encoder")
  missing = [n for n in names if n not in params]
  if missing:
    raise ValueError(f"head {head!r} needs parameter groups {missing}, which the checkpoint "
                     f"does not hold (it has {sorted(params)})")
  return {n: params[n] for n in names}


def param_shardings_for(model: ContextBlip, params: dict[str, Any], mesh, rules=None):
  """Shardings of `params` (a subset of the model's groups) from the logical axis names."""
  boxed = jax.eval_shape(lambda r: init_params(model, r, "all"), jax.random.PRNGKey(0))
  all_sh = shd.param_shardings(boxed, mesh, rules)
  return {k: all_sh[k] for k in params}


class Evaluator:
  """Compiles the score step once per (head, batch shape) and evaluates splits with it."""

  def __init__(self, model: ContextBlip, head: str, cfg: ml_collections.ConfigDict,
               mesh: jax.sharding.Mesh, param_shardings: Any):
    self.model, self.head, self.cfg, self.mesh = model, head, cfg, mesh
    self.param_shardings = param_shardings
    self._step = None
    self._batch_shardings = None

  def pipeline(self, split: imagecode.ImagecodeSplit) -> pipeline.Pipeline:
    c = self.cfg
    return pipeline.imagecode_eval_pipeline(
        split, image_size=self.model.config.blip.vision.image_size,
        sets_per_batch=c.eval.sets_per_batch, max_length=c.data.max_length,
        max_descriptions=3 if max((len(s.example_indices) for s in split.sets), default=1) <= 3
        else None, cache_images=c.data.cache_images, num_threads=c.data.num_threads)

  def records(self, params: Any, split: imagecode.ImagecodeSplit, desc: str = "eval"
              ) -> list[dict[str, Any]]:
    """Prediction records of every description of `split` (in set order)."""
    if not split.sets:
      return []
    pipe = self.pipeline(split)
    progress = Progress(pipe.steps_per_epoch, desc, every=max(1, pipe.steps_per_epoch // 5),
                        unit="batch")
    out: list[dict[str, Any]] = []
    for local in pipe:
      local = {k: local[k] for k in _JIT_KEYS}
      if self._step is None:
        self._batch_shardings = shd.batch_shardings(
            jax.tree.map(lambda x: jax.ShapeDtypeStruct(
                (x.shape[0] * jax.process_count(),) + x.shape[1:], x.dtype), local), self.mesh)
        self._step = make_score_step(
            self.model, self.head, self.param_shardings, self._batch_shardings, self.mesh,
            self.cfg.sharding_rules,
            {"xla_backend_optimization_level": 0} if self.cfg.get("compile_fast") else None)
      batch = distributed.global_batch(local, self._batch_shardings)
      scores, meta = self._step(params, batch)
      out.extend(pipeline.eval_records(split, jax.tree.map(np.asarray, meta),
                                       np.asarray(scores)))
      progress.update(1)
    return out


# ------------------------------------------------------------------ reports

def summarize(records: Sequence[dict[str, Any]], split: imagecode.ImagecodeSplit
              ) -> dict[str, Any]:
  """eval_metrics report over the scored records + skipped counts."""
  scored = [r for r in records if r.get("pred") is not None]
  tags = split.tags_by_gold() if any(e.tags for e in split.examples) else None
  report = accuracy.accuracy_report(scored, tags)
  report["skipped_descriptions"] = len(records) - len(scored)
  report["skipped_entries"] = len(split.skipped)
  return report


def write_outputs(out_dir: str, name: str, records: list[dict[str, Any]],
                  split: imagecode.ImagecodeSplit, report: dict[str, Any]) -> dict[str, str]:
  """Predictions JSONL + report JSON (+ leaderboard JSON for an unlabelled split)."""
  if jax.process_index() != 0:
    return {}
  os.makedirs(out_dir, exist_ok=True)
  files = {"predictions": os.path.join(out_dir, f"{name}.predictions.jsonl"),
           "report": os.path.join(out_dir, f"{name}.report.json")}
  records = sorted(records, key=lambda r: (r["set"], r["index"]))
  _write_predictions(files["predictions"], records)
  with open(files["report"], "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1, sort_keys=True)
  if not split.labelled:
    with open(split.source, encoding="utf-8") as f:
      expected = json.load(f)
    files["leaderboard"] = os.path.join(out_dir, f"{name}.leaderboard.json")
    accuracy.write_leaderboard(files["leaderboard"],
                                   [r for r in records if r.get("pred") is not None], expected)
  return files


def _write_predictions(path: str, records: list[dict[str, Any]]) -> None:
  scored = [r for r in records if r.get("pred") is not None]
  accuracy.write_predictions(path, scored)
  skipped = [r for r in records if r.get("pred") is None]
  if skipped:
    with open(path, "a", encoding="utf-8") as f:
      for r in skipped:
        f.write(json.dumps(r) + "\n")


def log_report(report: dict[str, Any], name: str, writer: MetricWriter | None = None,
               step: int = 0) -> None:
  text = accuracy.format_report(report, name)
  distributed.log_main("%s", text)
  if writer is not None:
    scalars = {f"{name}/acc_{k}": report[k]["acc"] for k in ("all", "video", "static")
               if report[k]["n"]}
    for tag, e in report.get("tags", {}).items():
      scalars[f"{name}/acc_tag_{tag}"] = e["acc"]
    scalars[f"{name}/skipped_descriptions"] = report["skipped_descriptions"]
    writer.write_scalars(step, scalars)


def evaluate_split(evaluator: Evaluator, params: Any, split: imagecode.ImagecodeSplit,
                   out_dir: str, name: str, writer: MetricWriter | None = None,
                   step: int = 0) -> dict[str, Any]:
  """Scores `split`, writes predictions / report (/ leaderboard), logs; returns the report."""
  records = evaluator.records(params, split, desc=name) + skipped_records(split)
  report = summarize(records, split)
  report["files"] = write_outputs(out_dir, name, records, split, report)
  report["head"] = evaluator.head
  log_report(report, name, writer, step)
  return report


# ------------------------------------------------------------------ modes evaluate / predict

def load_eval_params(cfg: ml_collections.ConfigDict, workdir: str):
  """(model, params on the mesh, mesh, shardings) from config.eval.checkpoint or workdir."""
  path = cfg.eval.checkpoint or workdir
  source = wd.load_init(path)
  model = ContextBlip(wd.model_config(cfg, source))
  mesh = wd.make_mesh(cfg)
  params = head_params(source.params, model, cfg.eval.head)
  shardings = param_shardings_for(model, params, mesh, cfg.sharding_rules)
  params = jax.tree.map(lambda x, s: jax.device_put(jnp.asarray(x), s), params, shardings)
  return model, params, mesh, shardings


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Mode 'evaluate' (labelled split: accuracy) or 'predict' (test: leaderboard JSON)."""
  split_name = "test" if cfg.mode == "predict" else cfg.eval.split
  name = f"{cfg.eval.head}_{split_name}"
  model, params, mesh, shardings = load_eval_params(cfg, workdir)
  split = load_split(cfg, split_name)
  if cfg.eval.max_sets:
    if not split.labelled:
      raise ValueError("config.eval.max_sets would leave descriptions out of the leaderboard "
                       "file; use it with a labelled split only")
    split = _first_sets(split, cfg.eval.max_sets)
  evaluator = Evaluator(model, cfg.eval.head, cfg, mesh, shardings)
  out_dir = os.path.join(workdir, wd.EVAL)
  with MetricWriter(workdir, stage=cfg.mode) as writer:
    report = evaluate_split(evaluator, params, split, out_dir, name, writer)
  if cfg.eval.visualize and split.labelled:
    from contextblip_jax.evaluation import visualize  # pylint: disable=g-import-not-at-top
    report["figures"] = visualize.attention_figures(
        model, params, split, os.path.join(out_dir, f"{name}_attention"),
        num_sets=cfg.eval.visualize, max_length=cfg.data.max_length)
  return report


def _first_sets(split: imagecode.ImagecodeSplit, n: int) -> imagecode.ImagecodeSplit:
  """The split restricted to its first `n` sets (example indices renumbered)."""
  sets, examples = [], []
  for s in split.sets[:n]:
    first = len(examples)
    for i in s.example_indices:
      examples.append(dataclasses.replace(split.examples[i], set_index=len(sets)))
    sets.append(type(s)(s.set_name, s.is_video, s.image_paths,
                        tuple(range(first, len(examples)))))
  logging.info("evaluating the first %d of %d sets", len(sets), len(split.sets))
  return imagecode.ImagecodeSplit(split.source, split.labelled, examples, sets,
                                  list(split.skipped), list(split.unmatched_annotations))
