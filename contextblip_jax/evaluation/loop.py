"""IMAGECODE evaluation loop, separate from training (docs/method.md#zero-shot).

`Evaluator` runs a split through `data/pipeline.imagecode_eval_pipeline` (batches of whole
image sets, this process's rows of each global batch) and the jitted step of
`evaluation/scoring.py` (vision once per set, reused for each of its descriptions), compiled
once per (head, batch shape), and returns one prediction record per description.
`evaluate_split` adds the records of the descriptions the reader skipped
(`imagecode.skipped_records`), computes the report (`accuracy.accuracy_report` + skipped
counts), writes the files (`evaluation/outputs.py`, process 0, each atomically) and logs it:
  <name>.predictions.jsonl   one line per description (skipped ones: pred null + reason)
  <name>.report.json         accuracy all / video / static with Wilson 95% CIs, per tag
  <name>.leaderboard.json    for the unlabelled test file: {set: [pred, ...]} in file order
Heads: 'zero_shot' (ITM match probability), 'stage1', 'stage2' (fine-tuned logits).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from contextblip_jax.data import imagecode, pipeline
from contextblip_jax.evaluation import accuracy, outputs
from contextblip_jax.evaluation.scoring import make_score_step
from contextblip_jax.models.contextblip import ContextBlip
from contextblip_jax.parallel import compilation
from contextblip_jax.parallel import distributed
from contextblip_jax.parallel import sharding as shd
from contextblip_jax.storage.metric_writers import MetricWriter, Progress

STEP_KEYS = ("images", "input_ids", "attention_mask", "is_video", "desc_mask", "example_index",
             "set_mask")


def sets_per_batch(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> int:
  """config.eval.sets_per_batch, where 0 means one set per batch shard (per device of the
  batch's mesh axes): the least memory at full use of the devices (10 images per device)."""
  return int(cfg.eval.sets_per_batch) or shd.batch_shards(mesh, cfg.sharding_rules)


class Evaluator:
  """Compiles the score step once per (head, batch shape) and evaluates splits with it."""

  def __init__(self, model: ContextBlip, head: str, cfg: ml_collections.ConfigDict,
               mesh: jax.sharding.Mesh, param_shardings: Any):
    self.model, self.head, self.cfg, self.mesh = model, head, cfg, mesh
    self.param_shardings = param_shardings
    self.sets_per_batch = sets_per_batch(cfg, mesh)
    self._step = None
    self._batch_shardings = None

  def pipeline(self, split: imagecode.ImagecodeSplit) -> pipeline.Pipeline:
    c = self.cfg
    return pipeline.imagecode_eval_pipeline(
        split, image_size=self.model.config.blip.vision.image_size,
        sets_per_batch=self.sets_per_batch, max_length=c.data.max_length,
        max_descriptions=3 if max((len(s.example_indices) for s in split.sets), default=1) <= 3
        else None, cache_images=c.data.cache_images, num_threads=c.data.num_threads,
        shard=distributed.mesh_batch_rows(self.mesh, self.sets_per_batch, c.sharding_rules))

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
      local = {k: local[k] for k in STEP_KEYS}
      if self._step is None:
        self._batch_shardings = shd.batch_shardings(
            distributed.global_shapes(local, pipe.global_batch_size), self.mesh,
            self.cfg.sharding_rules)
        self._step = make_score_step(
            self.model, self.head, self.param_shardings, self._batch_shardings, self.mesh,
            self.cfg.sharding_rules,
            compilation.compiler_options(self.cfg))
      batch = distributed.global_batch(local, self._batch_shardings)
      scores, meta = self._step(params, batch)                      # [L, D, 10]
      out.extend(pipeline.eval_records(split, jax.tree.map(np.asarray, meta),
                                       np.asarray(scores)))
      progress.update(1)
    return out


# ------------------------------------------------------------------ reports

def summarize(records: Sequence[dict[str, Any]], split: imagecode.ImagecodeSplit,
              propositions: Any = None) -> dict[str, Any]:
  """eval_metrics report over the scored records + skipped counts (+ accuracy by number of
  propositions with a `data/propositions.Propositions`)."""
  scored = [r for r in records if r.get("pred") is not None]
  tags = split.tags_by_gold() if any(e.tags for e in split.examples) else None
  report = accuracy.accuracy_report(scored, tags)
  if propositions is not None:
    report["propositions"] = accuracy.proposition_report(records, propositions.counts,
                                                         propositions.source)
  report["skipped_descriptions"] = len(records) - len(scored)
  report["skipped_entries"] = len(split.skipped)
  return report


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
                   step: int = 0, propositions: Any = None) -> dict[str, Any]:
  """Scores `split`, writes predictions / report (/ leaderboard), logs; returns the report."""
  records = evaluator.records(params, split, desc=name) + imagecode.skipped_records(split)
  report = summarize(records, split, propositions)
  report["files"] = outputs.write_outputs(out_dir, name, records, split, report)
  report["head"] = evaluator.head
  log_report(report, name, writer, step)
  return report
