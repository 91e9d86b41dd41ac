"""IMAGECODE accuracy (docs/method.md#zero-shot): accuracy with Wilson 95% intervals, per-tag accuracy,
accuracy by number of propositions (paper Table 10), the text report, the phenomenon tags, and
the leaderboard mapping {set: [pred, ...]}.
(The files of an evaluation are written by `evaluation/outputs.py`.)

A prediction record is one description:
  {"set": str, "index": int (position among the set's descriptions), "description": str,
   "static": bool, "gold": int | None, "pred": int, "scores": [10 floats]}
`index` is the position in the annotation file's order, so the leaderboard keeps that order.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping, Sequence

from contextblip_jax.storage import paths

CHANCE = 0.1   # 1 of 10 candidates
TAG_NAMES = {  # IMAGECODE phenomenon tags (manual_annotation_valid.yaml)
    "con": "context", "t": "temporal", "q": "quantities", "s": "spatial", "neg": "negation",
    "v": "visibility/occlusion", "n": "nuances", "cor": "co-reference", "img": "meta",
    "col": "colour",
}


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
  """95% Wilson score interval of a proportion k/n; (0, 1) for n = 0."""
  if n <= 0:
    return 0.0, 1.0
  p = k / n
  denom = 1.0 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_entry(correct: Sequence[bool]) -> dict[str, Any]:
  """{'n', 'correct', 'acc', 'ci95': [lo, hi]} of a list of booleans (acc NaN when empty)."""
  n, k = len(correct), int(sum(bool(c) for c in correct))
  lo, hi = wilson_interval(k, n)
  return {"n": n, "correct": k, "acc": (k / n) if n else float("nan"), "ci95": [lo, hi]}


def accuracy_report(records: Sequence[Mapping[str, Any]],
                    tags: Mapping[tuple[str, int], Sequence[str]] | None = None
                    ) -> dict[str, Any]:
  """Accuracy for all / video / static descriptions (and per tag when `tags` is given).

  `tags` maps (set name, gold index) to the description's phenomenon tags. Records without a
  gold label are not scored (they belong in the leaderboard file only).
  """
  labelled = [r for r in records if r.get("gold") is not None]
  ok = [int(r["pred"]) == int(r["gold"]) for r in labelled]
  static = [bool(r["static"]) for r in labelled]
  report: dict[str, Any] = {
      "all": accuracy_entry(ok),
      "video": accuracy_entry([c for c, s in zip(ok, static) if not s]),
      "static": accuracy_entry([c for c, s in zip(ok, static) if s]),
      "unlabelled": len(records) - len(labelled),
  }
  if tags is not None:
    per_tag: dict[str, list[bool]] = {}
    tagged = 0
    for r, c in zip(labelled, ok):
      t = tags.get((r["set"], int(r["gold"])))
      if not t:
        continue
      tagged += 1
      for tag in t:
        per_tag.setdefault(tag, []).append(c)
    report["tags"] = {tag: accuracy_entry(v) for tag, v in sorted(per_tag.items())}
    report["tagged"] = tagged
  return report


def format_report(report: Mapping[str, Any], name: str = "") -> str:
  """Human-readable lines: 'all 31.06% [29.2, 33.0] (715/2302)  vs chance 10%'."""
  lines = []
  for key in ("all", "video", "static"):
    e = report[key]
    if e["n"] == 0:
      lines.append(f"{name} {key:6s}  n=0")
      continue
    lo, hi = e["ci95"]
    lines.append(f"{name} {key:6s} {100 * e['acc']:6.2f}% [{100 * lo:.1f}, {100 * hi:.1f}] "
                 f"({e['correct']}/{e['n']})  chance {100 * CHANCE:.0f}%")
  for tag, e in report.get("tags", {}).items():
    lines.append(f"{name} tag {tag:4s} {100 * e['acc']:6.2f}% ({e['correct']}/{e['n']})")
  props = report.get("propositions")
  if props:
    for k, e in props["by_count"].items():
      lo, hi = e["ci95"]
      lines.append(f"{name} propositions {k} {100 * e['acc']:6.2f}% [{100 * lo:.1f}, "
                   f"{100 * hi:.1f}] ({e['correct']}/{e['n']})")
    if props["missing"]:
      total = props["matched"] + props["missing"]
      lines.append(f"{name} propositions: {props['missing']} of {total} descriptions are not "
                   f"in {props['file']}")
  return "\n".join(line.strip() for line in lines)


def proposition_report(records: Sequence[Mapping[str, Any]], counts: Mapping[str, int],
                       source: str = "") -> dict[str, Any]:
  """Accuracy by number of propositions (paper Table 10) of the labelled, scored records.

  `counts` maps a description (exactly as in the annotation file) to its number of
  propositions (`data/propositions.py`). Returns {"file", "by_count": {"1": entry, ...}
  (sorted by the number), "matched", "missing" (descriptions not in `counts`, counted, never
  dropped silently)}.
  """
  per: dict[int, list[bool]] = {}
  missing = 0
  for r in records:
    if r.get("gold") is None or r.get("pred") is None:
      continue
    k = counts.get(r["description"])
    if k is None:
      missing += 1
      continue
    per.setdefault(int(k), []).append(int(r["pred"]) == int(r["gold"]))
  return {"file": source, "by_count": {str(k): accuracy_entry(v) for k, v in sorted(per.items())},
          "matched": sum(len(v) for v in per.values()), "missing": missing}


def load_tags(yaml_path: str) -> dict[tuple[str, int], list[str]]:
  """(set name, gold index) -> tags from IMAGECODE's manual_annotation_valid.yaml.

  Raises ValueError naming the file and entry on a malformed entry.
  """
  import yaml  # pylint: disable=g-import-not-at-top
  with paths.open(yaml_path, encoding="utf-8") as f:
    data = yaml.safe_load(f)
  if not isinstance(data, dict):
    raise ValueError(f"{yaml_path}: expected a mapping of set names at the top level")
  out: dict[tuple[str, int], list[str]] = {}
  for set_name, entries in data.items():
    if not isinstance(entries, dict):
      raise ValueError(f"{yaml_path}: set {set_name!r}: expected a mapping of gold indices")
    for idx, entry in entries.items():
      try:
        gold = int(idx)
      except (TypeError, ValueError):
        raise ValueError(f"{yaml_path}: set {set_name!r}: key {idx!r} is not an image index"
                         ) from None
      if not isinstance(entry, dict) or not isinstance(entry.get("annotation", ""), str):
        raise ValueError(f"{yaml_path}: set {set_name!r} index {idx}: expected a mapping "
                         "with a string 'annotation'")
      tags = [t.strip() for t in (entry.get("annotation") or "").split(",") if t.strip()]
      out[(str(set_name), gold)] = tags
  return out


def read_predictions(path: str) -> list[dict[str, Any]]:
  """The records of a `<name>.predictions.jsonl` file (outputs.write_predictions)."""
  with paths.open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def leaderboard(records: Sequence[Mapping[str, Any]],
                expected: Mapping[str, Sequence[Any]]) -> dict[str, list[int]]:
  """`{set: [pred, ...]}` in the order of `expected` (the test file's {set: [desc, ...]}).

  Every description of `expected` must have exactly one record: a missing or extra prediction
  raises ValueError naming the set and position, so a description is never silently dropped.
  """
  by_key: dict[tuple[str, int], int] = {}
  for r in records:
    key = (r["set"], int(r["index"]))
    if key in by_key:
      raise ValueError(f"duplicate prediction for set {key[0]!r} description {key[1]}")
    by_key[key] = int(r["pred"])
  out: dict[str, list[int]] = {}
  for set_name, descs in expected.items():
    preds = []
    for i in range(len(descs)):
      if (set_name, i) not in by_key:
        raise ValueError(f"no prediction for set {set_name!r} description {i}")
      p = by_key.pop((set_name, i))
      if not 0 <= p <= 9:
        raise ValueError(f"prediction {p} for set {set_name!r} description {i} not in 0-9")
      preds.append(p)
    out[set_name] = preds
  if by_key:
    extra = sorted(by_key)[:3]
    raise ValueError(f"{len(by_key)} predictions for descriptions not in the test file, "
                     f"e.g. {extra}")
  return out
