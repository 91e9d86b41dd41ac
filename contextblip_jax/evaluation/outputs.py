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

Every file is strict JSON: a NaN or infinite number (e.g. the accuracy of an empty subset) is
written as null. For an unlabelled split the leaderboard is built first: when a description
has no prediction (skipped by the reader) nothing is written and the error names it.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np

from contextblip_jax.data import imagecode
from contextblip_jax.evaluation import accuracy
from contextblip_jax.storage import paths
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


def strict_json(obj: Any) -> Any:
  """`obj` with every non-finite float replaced by None (JSON has no NaN / Infinity)."""
  if isinstance(obj, float):
    return obj if np.isfinite(obj) else None
  if isinstance(obj, dict):
    return {k: strict_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [strict_json(v) for v in obj]
  return obj


def write_json(path: str, obj: Any, **kw) -> None:
  """`obj` as strict JSON at `path` (NaN / Inf -> null), atomically."""
  with atomic_file(path) as f:
    json.dump(strict_json(obj), f, allow_nan=False, **kw)


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
  files = {"predictions": paths.join(out_dir, f"{name}.predictions.jsonl"),
           "report": paths.join(out_dir, f"{name}.report.json")}
  records = sorted(records, key=lambda r: (r["set"], r["index"]))
  board = None
  if not split.labelled:
    with paths.open(split.source, encoding="utf-8") as f:
      expected = json.load(f)
    try:                                    # raises before anything is written
      board = accuracy.leaderboard([r for r in records if r.get("pred") is not None], expected)
    except ValueError as e:
      skipped = [r for r in records if r.get("pred") is None]
      if not skipped:
        raise
      r = skipped[0]
      raise ValueError(
          f"{split.source}: {len(skipped)} test descriptions were skipped (first: set "
          f"{r['set']!r} description {r['index']}: {r.get('skipped')}); a leaderboard needs a "
          f"prediction for every description, so no file of {name!r} was written: fix the "
          f"data (or run with data.on_error=raise to see each problem)") from e
  write_predictions(files["predictions"], records)
  write_json(files["report"], report, indent=1, sort_keys=True)
  if board is not None:
    files["leaderboard"] = paths.join(out_dir, f"{name}.leaderboard.json")
    write_json(files["leaderboard"], board, indent=1)
  return files
