"""A run's evaluation outputs as the paper's tables (markdown, accuracy in % with 95% Wilson
intervals): Table 1 (all / video / static), Table 2 (phenomena), Table 10 (number of
propositions) and Table 3 (MMVP-VLM pair accuracy per category).

  python -m contextblip_jax.results runs/demo                     # the demo's stages
  python -m contextblip_jax.results runs/zeroshot runs/finetune2 runs/mmvp --out table.md

Each PATH is a report file (`<head>_<split>.report.json`, `mmvp_<head>.report.json`), an
evaluation directory holding them, a workdir (its eval/), or a directory of workdirs (the
demo's: each subdirectory's eval/). The per-epoch reports of a training stage are left out.
Table 10 uses a report's own "propositions" entry (mode 'evaluate' on the valid split) or, for
reports without one (the valid evaluations inside training), the predictions file beside the
report and `--propositions` (default 'auto': the repository's data/imagecode/valid_split.json,
`data/propositions.py`); descriptions not in the file are counted under the table, and a
report none of whose descriptions is in it gets no row. `render` is also what the demo writes
into its report.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from typing import Any, Sequence

from contextblip_jax.data import propositions as props_lib
from contextblip_jax.evaluation import accuracy
from contextblip_jax.storage import cli_errors
from contextblip_jax.storage.atomic import atomic_file

HEADS = ("zero_shot", "stage1", "stage2")
HEAD_LABELS = {"zero_shot": "zero-shot", "stage1": "fine-tuned, stage 1",
               "stage2": "fine-tuned, stage 2"}
_IMAGECODE = re.compile(r"^(zero_shot|stage1|stage2)_(train|valid|test)\.report\.json$")
_MMVP = re.compile(r"^mmvp_(zero_shot|stage1|stage2)\.report\.json$")
# Paper Table 2's columns in its order, then the two tags it does not report.
PHENOMENA = (("con", "Context"), ("q", "Quantities"), ("s", "Spatial"), ("neg", "Negation"),
             ("v", "Occlusion"), ("n", "Nuances"), ("cor", "Co-reference"), ("img", "Meta"),
             ("t", "Temporal*"), ("col", "Colour*"))
MAX_PROPOSITIONS = 6


@dataclasses.dataclass
class Row:
  """One evaluation: its label, report dict and the report file ('' when given in memory)."""
  label: str
  report: dict[str, Any]
  path: str = ""
  head: str = ""
  split: str = ""            # 'train' | 'valid' | 'test' | 'mmvp'


def _eval_dirs(path: str) -> list[str]:
  """The directories of `path` that may hold reports: itself, its eval/, its children's eval/."""
  out = [path, os.path.join(path, "eval")]
  for name in sorted(os.listdir(path)):
    out.append(os.path.join(path, name, "eval"))
  return [d for d in out if os.path.isdir(d)]


def _row(file: str) -> Row | None:
  name = os.path.basename(file)
  m, mm = _IMAGECODE.match(name), _MMVP.match(name)
  if not (m or mm):
    return None
  with open(file, encoding="utf-8") as f:
    report = json.load(f)
  owner = os.path.dirname(os.path.dirname(os.path.abspath(file)))
  if os.path.basename(os.path.dirname(os.path.abspath(file))) != "eval":
    owner = os.path.dirname(os.path.abspath(file))
  head = (m or mm).group(1)
  split = m.group(2) if m else "mmvp"
  return Row(f"{HEAD_LABELS[head]} ({os.path.basename(owner)})", report, file, head, split)


def find_reports(paths: Sequence[str]) -> list[Row]:
  """Every final report under `paths` (see the module docstring), zero-shot before stage 1
  before stage 2; raises FileNotFoundError for a path that does not exist or holds none."""
  rows: list[Row] = []
  for path in paths:
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: not found")
    files = ([path] if os.path.isfile(path) else
             [os.path.join(d, n) for d in _eval_dirs(path) for n in sorted(os.listdir(d))])
    found = [r for r in (_row(f) for f in files) if r is not None]
    if not found:
      raise FileNotFoundError(f"{path}: no evaluation report (<head>_<split>.report.json or "
                              "mmvp_<head>.report.json) in it, its eval/ or its "
                              "subdirectories' eval/")
    rows.extend(found)
  return sorted(rows, key=lambda r: (HEADS.index(r.head), r.label))


def _cell(e: dict[str, Any] | None) -> str:
  if not e or not e.get("n") or e.get("acc") is None:
    return "–"
  ci = e.get("ci95")
  ci = f" [{100 * ci[0]:.1f}–{100 * ci[1]:.1f}]" if ci else ""
  return f"{100 * e['acc']:.1f}{ci}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def table1(rows: Sequence[Row]) -> str:
  """Table 1 layout: accuracy all / video / static per labelled IMAGECODE evaluation."""
  body = [["chance", "", "10.0", "10.0", "10.0"]]
  for r in rows:
    if r.split in ("mmvp",) or not r.report.get("all", {}).get("n"):
      continue
    rep = r.report
    body.append([r.label, f"{r.split} ({rep['all']['n']})", _cell(rep["all"]),
                 _cell(rep.get("video")), _cell(rep.get("static"))])
  if len(body) == 1:
    return ""
  return ("**Table 1 layout** (IMAGECODE; accuracy %, 95% CI):\n\n"
          + _table(["model", "split (descriptions)", "all", "video", "static"], body))


def table2(rows: Sequence[Row]) -> str:
  """Table 2 layout: accuracy per phenomenon tag (the annotated valid descriptions)."""
  tagged = [r for r in rows if r.report.get("tags")]
  if not tagged:
    return ""
  cols = [(t, name) for t, name in PHENOMENA if any(t in r.report["tags"] for r in tagged)]
  first = tagged[0].report["tags"]
  header = ["model"] + [f"{name} ({first.get(t, {}).get('n', 0)})" for t, name in cols]
  body = [[r.label] + [_cell(r.report["tags"].get(t)) for t, _ in cols] for r in tagged]
  return ("**Table 2 layout** (phenomena of the tagged valid descriptions; accuracy %, 95% CI; "
          "(n) = descriptions with the tag; * not in the paper's table):\n\n"
          + _table(header, body))


def _propositions_of(r: Row, counts: props_lib.Propositions | None) -> dict[str, Any] | None:
  """The report's own entry, else computed from the predictions file beside the report."""
  if r.report.get("propositions"):
    return r.report["propositions"]
  if counts is None or r.split != "valid":
    return None
  candidates = ([r.path[:-len(".report.json")] + ".predictions.jsonl"] if r.path else []) + [
      (r.report.get("files") or {}).get("predictions") or ""]
  pred = next((c for c in candidates if c and os.path.isfile(c)), None)
  if pred is None:
    return None
  return accuracy.proposition_report(accuracy.read_predictions(pred), counts.counts,
                                     counts.source)


def table10(rows: Sequence[Row], counts: props_lib.Propositions | None = None) -> str:
  """Table 10 layout: descriptions and correct ones by number of propositions."""
  entries = [(r, _propositions_of(r, counts)) for r in rows if r.split == "valid"]
  entries = [(r, p) for r, p in entries if p is not None]
  if not entries:
    return ""
  notes = [f"{r.label}: {p['missing']} of {p['matched'] + p['missing']} descriptions are not in "
           f"{os.path.basename(p['file'] or 'the propositions file')}"
           for r, p in entries if p["missing"]]
  shown = [(r, p) for r, p in entries if p["matched"]]
  if not shown:
    return ("**Table 10 layout**: no evaluated description is in the propositions file (the "
            "file covers the real IMAGECODE valid descriptions).\n\n"
            + "".join(f"- {n}\n" for n in notes))
  ks = sorted({int(k) for _, p in shown for k in p["by_count"]} | set(
      range(1, MAX_PROPOSITIONS + 1)))
  first = shown[0][1]["by_count"]
  body = [["All (descriptions)"] + [str(first.get(str(k), {}).get("n", 0)) for k in ks]]
  for r, p in shown:
    cells = []
    for k in ks:
      e = p["by_count"].get(str(k))
      cells.append(f"{e['correct']} ({_cell(e)})" if e and e["n"] else "–")
    body.append([r.label] + cells)
  return ("**Table 10 layout** (valid descriptions by number of propositions: correct "
          "(accuracy %, 95% CI)):\n\n" + _table(["model"] + [str(k) for k in ks], body)
          + "".join(f"- {n}\n" for n in notes))


def table3(rows: Sequence[Row]) -> str:
  """Table 3 layout: MMVP-VLM pair accuracy per category (rows) for each model (columns)."""
  mm = [r for r in rows if r.split == "mmvp"]
  if not mm:
    return ""
  cats = list(dict.fromkeys(c["category"] for r in mm for c in r.report["categories"]))
  body = []
  for c in cats:
    cells = []
    for r in mm:
      e = next((x for x in r.report["categories"] if x["category"] == c), None)
      cells.append(f"{_cell(e)} ({e['correct']}/{e['n']})" if e else "–")
    body.append([c] + cells)
  body.append(["**Average**"] + [f"{_cell(r.report['average'])} ({r.report['average']['correct']}"
                                 f"/{r.report['average']['n']})" for r in mm])
  body.append(["statements (each alone; chance 50)"] + [_cell(r.report["statements"])
                                                        for r in mm])
  return ("**Table 3 layout** (MMVP-VLM: pairs with both statements right, %, 95% CI; chance "
          "25):\n\n" + _table(["category"] + [r.label for r in mm], body))


def render(rows: Sequence[Row], counts: props_lib.Propositions | None = None) -> str:
  """The tables that `rows` have data for, as markdown."""
  parts = [t for t in (table1(rows), table2(rows), table10(rows, counts), table3(rows)) if t]
  return "\n".join(parts) if parts else "(no labelled evaluation to tabulate)\n"


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m contextblip_jax.results",
                              description="A run's evaluation outputs as the paper's tables.")
  p.add_argument("paths", nargs="+", help="report files, eval dirs, workdirs or a demo workdir")
  p.add_argument("--propositions", default="auto",
                 help="valid_split.json for Table 10 ('auto' = the repository's, '' = off)")
  p.add_argument("--out", default="", help="also write the markdown to this file")
  a = p.parse_args(argv)
  try:
    text = render(find_reports(a.paths), props_lib.load(a.propositions))
  except (OSError, ValueError) as e:
    return cli_errors.report(e)
  print(text, end="")
  if a.out:
    with atomic_file(a.out) as f:
      f.write(text)
  return 0
