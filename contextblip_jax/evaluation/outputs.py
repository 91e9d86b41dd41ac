"""The files of one evaluation, each written atomically (temp file + os.replace, via
`storage.atomic.atomic_file`): a failure while writing leaves the previous file (or none).

Under the directory given (process 0 writes):
  <name>.predictions.jsonl   one line per description, sorted by (set, index): scored ones
                             {set, index, description, static, gold, pred, scores: [10]}, then
                             the skipped ones {..., pred: null, scores: null, skipped: reason}
  <name>.report.json         the accuracy report (all / video / static with Wilson 95% CIs, per
                             tag, skipped counts; `accuracy.accuracy_report`)
  <name>.leaderboard.json    unlabelled (test) split only: {set: [pred, ...]} in the test
                             file's order (`accuracy.leaderboard`)
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np

from contextblip_jax.data import imagecode
from contextblip_jax.evaluation import accuracy
from contextblip_jax.storage.atomic import atomic_file


def prediction_line(r: Mapping[str, Any]) -> dict[str, Any]:
  """The JSONL form of a record: scored (ten float scores) or skipped (kept as given)."""
  if r.get("pred") is None:
    return dict(r)
  scores = [float(s) for s in np.asarray(r["scores"], np.float64).reshape(-1)]
  return {"set": r["set"], "index": int(r["index"]), "description": r["description"],
          "static": bool(r["static"]),
          "gold": None if r.get("gold") is None else int(r["gold"]),
          "pred": int(r["pred"]), "scores": scores}


def write_predictions(path: str, records: Iterable[Mapping[str, Any]]) -> int:
  """Scored records, then skipped ones (pred None), one JSON line each, in one atomic write;
  returns the number of lines."""
  records = list(records)
  ordered = ([r for r in records if r.get("pred") is not None]
             + [r for r in records if r.get("pred") is None])
  with atomic_file(path) as f:
    for r in ordered:
      f.write(json.dumps(prediction_line(r)) + "\n")
  return len(ordered)


def write_json(path: str, obj: Any, **kw) -> None:
  """`obj` as JSON at `path`, atomically."""
  with atomic_file(path) as f:
    json.dump(obj, f, **kw)


def write_leaderboard(path: str, records: Sequence[Mapping[str, Any]],
                      expected: Mapping[str, Sequence[Any]]) -> dict[str, list[int]]:
  """Writes the leaderboard JSON (`accuracy.leaderboard`: raises, writing nothing, when a
  description has no prediction) and returns it."""
  board = accuracy.leaderboard(records, expected)
  write_json(path, board, indent=1)
  return board


def write_outputs(out_dir: str, name: str, records: list[dict[str, Any]],
                  split: imagecode.ImagecodeSplit, report: dict[str, Any]) -> dict[str, str]:
  """Predictions JSONL + report JSON (+ leaderboard JSON for an unlabelled split) under
  `out_dir`; returns {kind: path} ({} on processes other than 0)."""
  if jax.process_index() != 0:
    return {}
  files = {"predictions": os.path.join(out_dir, f"{name}.predictions.jsonl"),
           "report": os.path.join(out_dir, f"{name}.report.json")}
  records = sorted(records, key=lambda r: (r["set"], r["index"]))
  write_predictions(files["predictions"], records)
  write_json(files["report"], report, indent=1, sort_keys=True)
  if not split.labelled:
    with open(split.source, encoding="utf-8") as f:
      expected = json.load(f)
    files["leaderboard"] = os.path.join(out_dir, f"{name}.leaderboard.json")
    write_leaderboard(files["leaderboard"], [r for r in records if r.get("pred") is not None],
                      expected)
  return files
