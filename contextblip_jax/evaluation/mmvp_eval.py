"""MMVP-VLM evaluation (paper Table 3; the reader is `data/mmvp.py`).

Each pair is scored as one candidate set of K = 2 images with its two statements as the set's
D = 2 descriptions, through the IMAGECODE scoring step (`evaluation/scoring.py: score_batch`:
vision and the image-side cross-attention keys/values once per pair, one text pass per
statement), with every head: 'zero_shot' (ITM match probability over the 2 images), 'stage1'
(per-candidate head) and 'stage2' (the inter-context encoder over the 2 candidates with the
position embedding off: every pair goes in as a static set, `is_video` False, which is the
zero position mask the reference passes). Texts are `"a photo of " + statement`, cleaned
and tokenised by `pipeline.TextEncoder` with `pre_caption_imagecode`, as IMAGECODE's.

A statement picks the first image only when its score is strictly higher (the reference's
`img1 if score[0] > score[1] else img2`); a pair counts as correct only if both statements
pick their own image. Outputs under the directory given (process 0, each atomically):
  <name>.predictions.jsonl  one line per pair: {pair, category, question_ids, statements,
                            images, gold: [g1, g2], pred: [p1, p2], scores: [[s11, s12],
                            [s21, s22]], correct}; 0 = the pair's first image
  <name>.report.json        {benchmark: 'mmvp', head, source, pairs, categories: [{category,
                            n, correct, acc, ci95}, ...] (file order), average (the mean of
                            the category accuracies, the paper's number; its ci95 is the
                            pooled Wilson interval when every category has the same number
                            of pairs, else null), all (pairs pooled), statements (statements
                            picking their own image)}
  <name>.leaderboard.json   {"<qid1>_<qid2>": [choice 1, choice 2]} in file order (0 = the
                            image of qid1, 1 = that of qid2)
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator, Sequence

import jax
import ml_collections
import numpy as np

from contextblip_jax.data import mmvp, pipeline, preprocess
from contextblip_jax.data.tokenizer import pre_caption_imagecode
from contextblip_jax.evaluation import accuracy, loop, outputs
from contextblip_jax.evaluation.scoring import make_score_step
from contextblip_jax.models.contextblip import ContextBlip
from contextblip_jax.parallel import compilation, distributed
from contextblip_jax.parallel import sharding as shd
from contextblip_jax.storage.atomic import atomic_file
from contextblip_jax.storage.metric_writers import Progress

NUM_IMAGES = 2      # candidates per pair
CHANCE = 0.25       # a pair right by chance: 1/2 x 1/2


def pair_batch(bench: mmvp.MmvpBenchmark, indices: Sequence[int], *, image_size: int,
               encoder: pipeline.TextEncoder) -> dict[str, np.ndarray]:
  """The scoring step's batch of the pairs `indices` (-1 = a padded row).

  Returns images f32 [L, 2, S, S, 3], input_ids / attention_mask i32 [L, 2, T], is_video
  bool [L] (False: no position embedding), desc_mask bool [L, 2], example_index i32 [L, 2]
  (2 * pair + statement, -1 when padded), set_mask bool [L].
  """
  n = len(indices)
  texts = [t for i in indices for t in (bench.pairs[i].texts if i >= 0 else ("", ""))]
  ids, mask = encoder(texts)
  images = np.zeros((n, NUM_IMAGES, image_size, image_size, 3), np.float32)
  for row, i in enumerate(indices):
    if i >= 0:
      images[row] = preprocess.load_images(list(bench.pairs[i].image_paths), image_size)
  valid = np.array([i >= 0 for i in indices])
  example = np.array([[2 * i, 2 * i + 1] if i >= 0 else [-1, -1] for i in indices], np.int32)
  return {"images": images, "input_ids": ids.reshape(n, 2, -1),
          "attention_mask": mask.reshape(n, 2, -1), "is_video": np.zeros((n,), bool),
          "desc_mask": np.repeat(valid[:, None], 2, axis=1), "example_index": example,
          "set_mask": valid}


class MmvpEvaluator:
  """Compiles the scoring step once for pair batches and scores a benchmark with it."""

  def __init__(self, model: ContextBlip, head: str, cfg: ml_collections.ConfigDict,
               mesh: jax.sharding.Mesh, param_shardings: Any):
    self.model, self.head, self.cfg, self.mesh = model, head, cfg, mesh
    self.param_shardings = param_shardings
    self.pairs_per_batch = loop.sets_per_batch(cfg, mesh)
    self.encoder = pipeline.TextEncoder(None, cfg.data.max_length, pre_caption_imagecode)
    self._step = None
    self._shardings = None

  def _local_batches(self, bench: mmvp.MmvpBenchmark) -> Iterator[dict[str, np.ndarray]]:
    g = self.pairs_per_batch
    rows = distributed.mesh_batch_rows(self.mesh, g, self.cfg.sharding_rules)
    size = self.model.config.blip.vision.image_size
    for start in range(0, len(bench.pairs), g):
      idx = [start + int(r) if start + int(r) < len(bench.pairs) else -1 for r in rows]
      yield pair_batch(bench, idx, image_size=size, encoder=self.encoder)

  def scores(self, params: Any, bench: mmvp.MmvpBenchmark, desc: str = "mmvp") -> np.ndarray:
    """Scores [pairs, 2 statements, 2 images] (higher = better)."""
    g = self.pairs_per_batch
    steps = -(-len(bench.pairs) // g)
    progress = Progress(steps, desc, every=max(1, steps // 5), unit="batch")
    out = np.zeros((len(bench.pairs), 2, NUM_IMAGES), np.float32)
    for b, local in enumerate(self._local_batches(bench)):
      if self._step is None:
        self._shardings = shd.batch_shardings(distributed.global_shapes(local, g), self.mesh,
                                              self.cfg.sharding_rules)
        self._step = make_score_step(self.model, self.head, self.param_shardings,
                                     self._shardings, self.mesh, self.cfg.sharding_rules,
                                     compilation.compiler_options(self.cfg))
      scores, _ = self._step(params, distributed.global_batch(local, self._shardings))
      scores = np.asarray(scores)                                    # [G, 2, 2]
      n = min(g, len(bench.pairs) - b * g)
      out[b * g:b * g + n] = scores[:n]
      progress.update(1)
    return out


def choose(scores: np.ndarray) -> np.ndarray:
  """[..., 2] scores -> the chosen image: 0 only when the first is strictly higher."""
  scores = np.asarray(scores)
  return np.where(scores[..., 0] > scores[..., 1], 0, 1)


def pair_records(bench: mmvp.MmvpBenchmark, scores: np.ndarray) -> list[dict[str, Any]]:
  """One record per pair (the predictions file's lines)."""
  preds = choose(scores)
  out = []
  for p, s, pred in zip(bench.pairs, scores, preds):
    gold = list(p.gold)
    out.append({"pair": p.index, "category": p.category, "question_ids": list(p.question_ids),
                "statements": list(p.statements), "images": list(p.image_paths),
                "gold": gold, "pred": [int(x) for x in pred],
                "scores": [[float(v) for v in row] for row in s],
                "correct": bool(all(int(a) == b for a, b in zip(pred, gold)))})
  return out


def mmvp_report(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Pair accuracy per category (file order), their average, pooled pairs and statements."""
  by_cat: dict[str, list[bool]] = {}
  for r in records:
    by_cat.setdefault(r["category"], []).append(r["correct"])
  cats = [{"category": c, **accuracy.accuracy_entry(v)} for c, v in by_cat.items()]
  pooled = accuracy.accuracy_entry([r["correct"] for r in records])
  equal = len({c["n"] for c in cats}) == 1
  average = {"acc": float(np.mean([c["acc"] for c in cats])) if cats else float("nan"),
             "ci95": pooled["ci95"] if equal else None, "n": pooled["n"],
             "correct": pooled["correct"]}
  statements = accuracy.accuracy_entry(
      [int(p) == g for r in records for p, g in zip(r["pred"], r["gold"])])
  return {"benchmark": "mmvp", "pairs": len(records), "categories": cats, "average": average,
          "all": pooled, "statements": statements, "chance": CHANCE}


def format_mmvp(report: dict[str, Any], name: str = "mmvp") -> str:
  """Lines 'mmvp <category> 40.00% [19.8, 64.3] (6/15)', then the average."""
  def line(label, e):
    ci = e.get("ci95")
    ci = f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else ""
    return f"{name} {label} {100 * e['acc']:.2f}%{ci} ({e['correct']}/{e['n']})"
  lines = [line(c["category"], c) for c in report["categories"]]
  lines.append(line("average", report["average"]) + f"  chance {100 * CHANCE:.0f}%")
  lines.append(line("statements", report["statements"]) + "  chance 50%")
  return "\n".join(lines)


def write_mmvp_outputs(out_dir: str, name: str, records: Sequence[dict[str, Any]],
                       report: dict[str, Any]) -> dict[str, str]:
  """Predictions JSONL, report JSON, leaderboard JSON under `out_dir` (process 0)."""
  if jax.process_index() != 0:
    return {}
  files = {k: os.path.join(out_dir, f"{name}.{k}.{ext}") for k, ext in
           (("predictions", "jsonl"), ("report", "json"), ("leaderboard", "json"))}
  with atomic_file(files["predictions"]) as f:
    for r in records:
      f.write(json.dumps(outputs.strict_json(r)) + "\n")
  board = {f"{r['question_ids'][0]}_{r['question_ids'][1]}": r["pred"] for r in records}
  outputs.write_json(files["leaderboard"], board, indent=1)
  outputs.write_json(files["report"], {**report, "files": files}, indent=1)
  return files


def evaluate_mmvp(evaluator: MmvpEvaluator, params: Any, bench: mmvp.MmvpBenchmark,
                  out_dir: str, name: str) -> dict[str, Any]:
  """Scores `bench`, writes the three files, logs the table; returns the report."""
  records = pair_records(bench, evaluator.scores(params, bench, desc=name))
  report = {**mmvp_report(records), "head": evaluator.head, "source": bench.source}
  report["files"] = write_mmvp_outputs(out_dir, name, records, report)
  distributed.log_main("%s", format_mmvp(report, name))
  return report
