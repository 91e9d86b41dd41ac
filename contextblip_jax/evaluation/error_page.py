"""An error-analysis page for one IMAGECODE evaluation: one static HTML file + thumbnails.

  python -m contextblip_jax.error_page --predictions runs/ft2/eval/stage2_valid.predictions.jsonl \
      --data_dir data/imagecode --out runs/ft2/error_analysis

Inputs: a `<name>.predictions.jsonl` (`evaluation/outputs.py`), the IMAGECODE directory it
was computed on (images `<image_root>/<set>/img<k>.*`, the candidates in numeric order of k as
the reader orders them), optionally the phenomenon tags (`--annotations`, default 'auto':
<data_dir>/manual_annotation_valid.yaml when it exists; '' = none), the proposition counts
(`--propositions`, as the results command: 'auto' = <data_dir>/valid_split.json or the
repository's data/imagecode/valid_split.json; '' = none) and the per-description overlays a
run saved (`--overlays`: the `<...>_attention_overlays/` directory, `evaluation/visualize.py`).

Output under `--out`:
  index.html        self-contained (inline CSS and JS, no network): the accuracies all / video
                    / static and per tag with Wilson 95% intervals (`accuracy.accuracy_report`,
                    the same numbers as the run's report), the accuracy by number of
                    propositions, counts, the source files; one row per scored description
                    (text, the ten thumbnails with gold and prediction marked, the ten scores
                    as bars, correct / wrong, video / static, tags, propositions, overlay);
                    filters (outcome, kind, tag, text) with an "N of M descriptions shown"
                    counter, also read from the URL hash (`#wrong`, `#filter=wrong&kind=video
                    &tag=neg&q=red`); the skipped descriptions with their reasons
  thumbs/           one JPEG per candidate image (`evaluation/thumbnails.py`; reused by a rerun)
  overlays/         copies of the overlays the page shows

Missing images are an error, not a placeholder: a scored description's set must have its ten
images, else `ErrorPageError` names the directory or file (a page with gaps would hide
exactly what it is for). Skipped descriptions need no images. The page is written last and
atomically, so an interrupted run leaves the previous page (or none).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from typing import Any, Callable, Sequence

from contextblip_jax.data import imagecode, preprocess
from contextblip_jax.data import propositions as props_lib
from contextblip_jax.evaluation import accuracy, error_page_html
from contextblip_jax.evaluation.thumbnails import DEFAULT_SIZE, Thumbnails
from contextblip_jax.storage import cli_errors, paths
from contextblip_jax.storage.atomic import atomic_file

PAGE_FILE = "index.html"
OVERLAY_DIR = "overlays"
OVERLAY_INDEX = "index.json"


class ErrorPageError(ValueError):
  """Unusable input to the page; the message names the file (and line or entry)."""


@dataclasses.dataclass
class PageInputs:
  """What one page is built from (see the module docstring for the defaults)."""
  predictions: str
  data_dir: str
  out_dir: str
  image_root: str = ""
  annotations: str = "auto"
  propositions: str = "auto"
  overlays: str = ""
  thumb_size: int = DEFAULT_SIZE


# ------------------------------------------------------------------------------ inputs

def _check_line(path: str, n: int, r: Any) -> None:
  """Raises ErrorPageError unless `r` is a predictions line (scored or skipped)."""
  where = f"{path}: line {n}"
  if not isinstance(r, dict):
    raise ErrorPageError(f"{where}: expected a JSON object, got {type(r).__name__}")
  for key in ("set", "index", "description"):
    if key not in r:
      raise ErrorPageError(f"{where}: no {key!r} (not a predictions file?)")
  s = r["set"]
  if not isinstance(s, str) or not s.strip() or "/" in s or "\\" in s or s in (".", ".."):
    raise ErrorPageError(f"{where}: 'set' must be an image-set directory name, got {s!r}")
  if r.get("pred") is None:
    return
  scores = r.get("scores")
  if not (isinstance(scores, list) and len(scores) == imagecode.NUM_CANDIDATES
          and all(isinstance(x, (int, float)) for x in scores)):
    raise ErrorPageError(f"{where}: 'scores' must be {imagecode.NUM_CANDIDATES} numbers")
  for key in ("pred", "gold"):
    v = r.get(key)
    if v is not None and (not isinstance(v, int) or not 0 <= v < imagecode.NUM_CANDIDATES):
      raise ErrorPageError(f"{where}: {key!r} must be an image index 0-9, got {v!r}")


def read_records(path: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """(scored, skipped) records of a predictions file, in file order; raises ErrorPageError
  naming the file and line for anything that is not a predictions line."""
  if not paths.isfile(path):
    raise ErrorPageError(f"{path}: predictions file not found")
  scored, skipped = [], []
  with paths.open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        r = json.loads(line)
      except json.JSONDecodeError as e:
        raise ErrorPageError(f"{path}: line {n}: not JSON ({e.msg})") from None
      _check_line(path, n, r)
      (skipped if r.get("pred") is None else scored).append(r)
  if not scored and not skipped:
    raise ErrorPageError(f"{path}: no predictions in the file")
  return scored, skipped


def candidate_images(image_root: str, set_name: str) -> list[str]:
  """The ten candidate files of a set in the reader's order; raises ErrorPageError."""
  set_dir = paths.join(image_root, set_name)
  if not paths.isdir(set_dir):
    raise ErrorPageError(f"{set_dir}: image-set directory not found (set {set_name!r}; "
                         "--image_root / --data_dir must be the evaluated data)")
  try:
    found = imagecode.list_candidates(set_dir)
  except imagecode.ImagecodeDataError as e:
    raise ErrorPageError(str(e)) from None
  if len(found) != imagecode.NUM_CANDIDATES:
    raise ErrorPageError(f"{set_dir}: expected {imagecode.NUM_CANDIDATES} img<k> images, "
                         f"found {len(found)}")
  return found


def resolve_annotations(setting: str, data_dir: str) -> str | None:
  """The tags YAML of `--annotations` ('auto': the data directory's, when it exists)."""
  setting = (setting or "").strip()
  if setting == "auto":
    candidate = paths.join(data_dir, imagecode.ANNOTATION_FILE)
    return candidate if paths.isfile(candidate) else None
  if setting and not paths.isfile(setting):
    raise ErrorPageError(f"{setting}: annotation file not found")
  return setting or None


def load_overlays(overlay_dir: str) -> dict[tuple[str, int], dict[str, Any]]:
  """{(set, index): entry with 'path'} from a run's overlay directory (its index.json)."""
  index_path = paths.join(overlay_dir, OVERLAY_INDEX)
  if not paths.isfile(index_path):
    raise ErrorPageError(f"{index_path}: overlay index not found (--overlays must be a "
                         "directory written by the evaluation's visualisation)")
  with paths.open(index_path, encoding="utf-8") as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ErrorPageError(f"{index_path}: not JSON ({e.msg})") from None
  entries = data.get("overlays") if isinstance(data, dict) else None
  if not isinstance(entries, list):
    raise ErrorPageError(f"{index_path}: expected {{\"overlays\": [...]}}")
  out = {}
  for i, e in enumerate(entries):
    if not (isinstance(e, dict) and isinstance(e.get("set"), str)
            and isinstance(e.get("index"), int) and isinstance(e.get("file"), str)
            and "/" not in e["file"]):
      raise ErrorPageError(f"{index_path}: overlays[{i}]: expected {{set, index, file, ...}}")
    out[(e["set"], e["index"])] = dict(e, path=paths.join(overlay_dir, e["file"]))
  return out


# ------------------------------------------------------------------------------ rows

def score_widths(scores: Sequence[float]) -> list[float]:
  """Bar widths in % (6-100): each score between the set's lowest and highest."""
  lo, hi = min(scores), max(scores)
  if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
    return [100.0] * len(scores)
  return [round(6.0 + 94.0 * (s - lo) / (hi - lo), 1) for s in scores]


def make_rows(scored, image_root, thumbs: Thumbnails, tags, counts, overlays):
  """One dict per scored description, what `error_page_html.row` draws."""
  rows, images = [], {}
  for n, r in enumerate(scored):
    s, gold, pred = r["set"], r.get("gold"), int(r["pred"])
    if s not in images:
      images[s] = [thumbs.add(p, s) for p in candidate_images(image_root, s)]
    outcome = "unlabelled" if gold is None else ("correct" if pred == gold else "wrong")
    ov = overlays.get((s, int(r["index"])))
    rows.append({
        "n": n, "set": s, "index": int(r["index"]), "description": r["description"],
        "gold": gold, "pred": pred, "outcome": outcome,
        "kind": "static" if r.get("static") else "video",
        "scores": [float(x) for x in r["scores"]], "widths": score_widths(r["scores"]),
        "thumbs": images[s],
        "tags": list(tags.get((s, gold), ())) if tags is not None and gold is not None else [],
        "propositions": None if counts is None else counts.get(r["description"]),
        "overlay": ov and f"{OVERLAY_DIR}/{ov['file']}"})
  return rows


def copy_overlays(out_dir: str, overlays, rows) -> int:
  """Copies the overlays the rows show into <out_dir>/overlays/; returns how many."""
  used = {(r["set"], r["index"]) for r in rows if r["overlay"]}
  for key in sorted(used):
    src = overlays[key]["path"]
    if not paths.isfile(src):
      raise ErrorPageError(f"{src}: overlay image not found (listed in its index.json)")
    with paths.open(src, "rb") as f:
      paths.atomic_write_bytes(paths.join(out_dir, OVERLAY_DIR, overlays[key]["file"]),
                               f.read())
  return len(used)


# ------------------------------------------------------------------------------ the page

def _summary(inp: PageInputs, scored, skipped, tags, props, sources) -> dict[str, Any]:
  """What the page's top shows: the accuracy report (+ propositions), counts, sources."""
  report = accuracy.accuracy_report(scored, tags)
  if props is not None:
    report["propositions"] = accuracy.proposition_report(scored, props.counts, props.source)
  return {"report": report, "sources": sources, "scored": len(scored),
          "skipped": len(skipped), "predictions": inp.predictions}


def build_page(inp: PageInputs, log: Callable[[str], None] = print) -> str:
  """Builds the page (module docstring); returns the path of index.html."""
  if not paths.isdir(inp.data_dir):
    raise ErrorPageError(f"{inp.data_dir}: data directory not found")
  scored, skipped = read_records(inp.predictions)
  image_root = inp.image_root or paths.join(inp.data_dir, imagecode.IMAGE_DIR)
  sources = {"predictions": inp.predictions, "images": image_root}
  report_file = inp.predictions[:-len(".predictions.jsonl")] + ".report.json"
  if inp.predictions.endswith(".predictions.jsonl") and paths.isfile(report_file):
    sources["run's report"] = report_file
  tags = None
  ann = resolve_annotations(inp.annotations, inp.data_dir)
  if ann:
    tags, _ = imagecode.load_phenomenon_tags(ann)
    sources["phenomenon tags"] = ann
  props = props_lib.load(inp.propositions, inp.data_dir)
  if props is not None:
    sources["propositions"] = props.source
  overlays = load_overlays(inp.overlays) if inp.overlays else {}
  if inp.overlays:
    sources["overlays"] = inp.overlays
  thumbs = Thumbnails(inp.out_dir, inp.thumb_size)
  rows = make_rows(scored, image_root, thumbs, tags, props and props.counts, overlays)
  total = thumbs.pending
  log(f"thumbnails: {thumbs.reused} reused, {total} to make")
  step = max(1, total // 10)
  made, _ = thumbs.flush(lambda d, t: log(f"thumbnails {d}/{t}") if d % step == 0 or d == t
                         else None)
  shown = copy_overlays(inp.out_dir, overlays, rows)
  summary = _summary(inp, scored, skipped, tags, props, sources)
  summary.update(overlays=shown, thumbnails=made + thumbs.reused)
  page = paths.join(inp.out_dir, PAGE_FILE)
  with atomic_file(page) as f:
    f.write(error_page_html.page(summary, rows, skipped))
  return page


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m contextblip_jax.error_page",
                              description="An error-analysis HTML page for one evaluation's "
                              "predictions.")
  p.add_argument("--predictions", required=True, help="<name>.predictions.jsonl")
  p.add_argument("--data_dir", required=True, help="the IMAGECODE directory evaluated")
  p.add_argument("--image_root", default="", help="image sets (default <data_dir>/image-sets)")
  p.add_argument("--annotations", default="auto",
                 help="manual_annotation_valid.yaml ('auto' = the data_dir's, '' = none)")
  p.add_argument("--propositions", default="auto",
                 help="valid_split.json ('auto' = data_dir's or the repository's, '' = none)")
  p.add_argument("--overlays", default="", help="a run's <...>_attention_overlays/ directory")
  p.add_argument("--thumb_size", type=int, default=DEFAULT_SIZE, help="thumbnail side (px)")
  p.add_argument("--out", required=True, help="output directory (index.html, thumbs/)")
  a = p.parse_args(argv)
  inp = PageInputs(a.predictions, a.data_dir, a.out, a.image_root, a.annotations,
                   a.propositions, a.overlays, a.thumb_size)
  try:
    page = build_page(inp, log=lambda m: print(m, flush=True))
  except (OSError, ValueError, preprocess.ImageLoadError) as e:
    return cli_errors.report(e)
  print(f"page: {page}")
  return 0
