"""The main job on the embedded default (configs/demo.py): data -> backbone -> pretrain
(zero-shot) -> finetune1 -> finetune2 -> test predictions -> report.

Layout of the workdir:
  data/                    the generated synthetic dataset (IMAGECODE layout + pairs)
  backbone/ pretrain/ finetune1/ finetune2/   one stage workdir each (see storage/workdir.py)
  predict/eval/            stage-2 predictions + leaderboard JSON for the unlabelled test file
  error_analysis/          index.html: the error-analysis page of the stage-2 valid predictions
                           (`evaluation/error_page.py`), with its thumbnails
  report.md, report.json   the table of accuracies against chance, timings, figures

A rerun reuses the data and every finished stage (DONE.json) and resumes an interrupted one,
but only what was built from the same inputs: each stage records in <stage>/built_from.json a
fingerprint of the data (sha256 of the generated annotation files, pair list and metadata,
with the sizes and seed), its own config (paths left out) and the previous stage's
fingerprint; a stage (or predict/) whose record differs is built again, with a message. The
workdir is locked for the run (storage/lock.py) and refused when it is not a demo workdir.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import jax
import ml_collections

from contextblip_jax.data import propositions as props_lib
from contextblip_jax.data import synthetic
from contextblip_jax.evaluation import accuracy, error_page, paper_table
from contextblip_jax.run import evaluate, train
from contextblip_jax.storage import lock, paths
from contextblip_jax.storage import workdir as wd
from contextblip_jax.storage.atomic import atomic_file

STAGES = ("backbone", "pretrain", "finetune1", "finetune2")
# What the demo's workdir holds besides a workdir's own entries (storage/workdir.py).
ERROR_PAGE_DIR = "error_analysis"
ENTRIES = ("data", *STAGES, "predict", ERROR_PAGE_DIR, "report.md", "report.json")
# Stage config fields that say where a stage runs, finds things or logs (W&B), not what it
# computes: left out of the fingerprints.
_PATH_FIELDS = (("data", "imagecode_dir"), ("data", "pairs_json"), ("init_workdir",),
                ("compilation_cache",), ("train", "restart"), ("platform",), ("wandb",))
ROWS = (("pretrain", "zero-shot (ITM, after ContextBLIP pre-training)"),
        ("finetune1", "fine-tuned, stage 1 (per-candidate head)"),
        ("finetune2", "fine-tuned, stage 2 (inter-context encoder)"))


def _stage_config(cfg, name: str, data_dir: str, workdir: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(cfg.stages[name].to_dict())
  c.seed = cfg.seed
  c.data.imagecode_dir = data_dir
  c.data.pairs_json = os.path.join(data_dir, "pairs.json")
  i = STAGES.index(name)
  c.init_workdir = os.path.join(workdir, STAGES[i - 1]) if i else ""
  c.compilation_cache = cfg.get("compilation_cache", "")
  if cfg.get("num_devices"):
    c.num_devices = cfg.num_devices
  return c


def _say(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def _sha(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def data_fingerprint(data_dir: str, seed: int, sizes: dict[str, Any]) -> str:
  """sha256 of the generated data: its annotation files, pair list and metadata (every .json /
  .yaml at the top of `data_dir`), with the sizes and the seed."""
  h = hashlib.sha256(json.dumps({"seed": seed, "sizes": sizes}, sort_keys=True).encode())
  for name in sorted(os.listdir(data_dir)):
    if name.endswith((".json", ".yaml")):
      h.update(name.encode())
      with open(os.path.join(data_dir, name), "rb") as f:
        h.update(hashlib.file_digest(f, "sha256").digest())
  return h.hexdigest()


def stage_fingerprint(c: ml_collections.ConfigDict, data_fp: str, previous: str) -> dict:
  """The built_from.json record of a stage: {stage, fingerprint, data, previous, config}."""
  conf = c.to_dict()
  for path in _PATH_FIELDS:
    node = conf
    for k in path[:-1]:
      node = node.get(k, {})
    node.pop(path[-1], None)
  config_fp = _sha(conf)
  return {"stage": c.mode, "data": data_fp, "previous": previous, "config": config_fp,
          "fingerprint": _sha([data_fp, previous, config_fp])}


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes / reuses) every stage; writes report.md; returns the summary."""
  if paths.is_remote(workdir):       # its generated dataset and report are local-file code
    raise wd.WorkdirError(f"--workdir {workdir}: the demo needs a local workdir; the training "
                          f"and evaluation configs accept gs:// workdirs")
  workdir = os.path.abspath(workdir)
  wd.check_workdir(workdir, "demo", ENTRIES)
  with lock.hold_workdir(workdir):
    wd.write_config(workdir, cfg)
    return _run(cfg, workdir)


def _run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  t0 = time.time()
  data_dir = os.path.join(workdir, "data")
  sizes = dict(cfg.synthetic)
  summary: dict[str, Any] = {"data": synthetic.ensure(data_dir, cfg.data_seed, **sizes)}
  data_fp = data_fingerprint(data_dir, cfg.data_seed, sizes)
  splits = summary["data"]["splits"]
  _say(f"[demo] data: {splits['train']['descriptions']} train / "
       f"{splits['valid']['descriptions']} valid / {splits['test']['descriptions']} test "
       f"descriptions, {summary['data']['pairs']} pre-training pairs in {data_dir}")
  times = {"data": time.time() - t0}
  summary["reused"] = []
  previous = ""
  for name in STAGES:
    t = time.time()
    stage_dir = os.path.join(workdir, name)
    c = _stage_config(cfg, name, data_dir, workdir)
    record = stage_fingerprint(c, data_fp, previous)
    previous = record["fingerprint"]
    same = wd.read_built_from(stage_dir) == record
    was_done = same and wd.read_done(stage_dir) is not None
    stale = not same and os.path.isdir(stage_dir) and bool(os.listdir(stage_dir))
    _say(f"[demo] stage {name} ..." + (" (finished earlier: reused)" if was_done else "")
         + (" (built earlier from other data or another config: built again)" if stale
            else ""))
    out = train.train_and_evaluate(c, stage_dir, built_from=record)
    if out.get("preempted"):
      _say(f"[demo] stopped during {name} (SIGTERM); rerun the same command to resume")
      return {**summary, "preempted": name}
    summary[name] = out
    if was_done:
      summary["reused"].append(name)                 # finished in an earlier run
    times[name] = out.get("seconds", time.time() - t)
    if "valid" in out:
      _say(_one_line(name, out["valid"]))
  if cfg.predict_test:
    t = time.time()
    summary["predict"] = _predict(cfg, data_dir, workdir, previous)
    times["predict"] = time.time() - t
  t = time.time()
  page = error_analysis_page(workdir, data_dir, summary)
  if page:
    summary["error_page"] = page
    times["error_page"] = time.time() - t
  times["total"] = sum(times.values())
  summary["seconds"] = {k: round(v, 1) for k, v in times.items()}
  _write_report(workdir, summary)
  return summary


def _one_line(name: str, report: dict[str, Any]) -> str:
  e = report["all"]
  con = report.get("tags", {}).get("con")
  extra = f", context (con) {100 * con['acc']:.1f}%" if con else ""
  return (f"[demo] {name}: valid accuracy {100 * e['acc']:.1f}% "
          f"[{100 * e['ci95'][0]:.1f}, {100 * e['ci95'][1]:.1f}] vs chance "
          f"{100 * accuracy.CHANCE:.0f}%{extra}")


def _predict(cfg, data_dir: str, workdir: str, finetune2_fp: str) -> dict[str, Any]:
  """Stage-2 predictions on the test file; the leaderboard is reused only when built from the
  same finetune2 stage (predict/built_from.json)."""
  c = _stage_config(cfg, "finetune2", data_dir, workdir)
  c.mode, c.eval.split, c.eval.head = "predict", "test", "stage2"
  c.eval.checkpoint = os.path.join(workdir, "finetune2")
  c.eval.visualize = 0
  out_dir = os.path.join(workdir, "predict")
  record = {"stage": "predict", "previous": finetune2_fp, "fingerprint": _sha(finetune2_fp)}
  board = os.path.join(out_dir, "eval", "stage2_test.leaderboard.json")
  if os.path.isfile(board) and wd.read_built_from(out_dir) == record:
    return {"files": {"leaderboard": board}, "reused": True}
  if os.path.isfile(board):
    _say("[demo] predict: the leaderboard was built from another finetune2 stage: built again")
  report = evaluate.run(c, out_dir)
  wd.write_built_from(out_dir, record)
  return {"files": report["files"], "unlabelled": report.get("unlabelled")}


def error_analysis_page(workdir: str, data_dir: str, summary: dict[str, Any]) -> str | None:
  """<workdir>/error_analysis/index.html for the last stage's valid predictions (with the
  overlays its evaluation saved); returns its path (None without valid predictions)."""
  files = (summary.get(STAGES[-1], {}).get("valid") or {}).get("files") or {}
  pred = files.get("predictions")
  if jax.process_index() != 0 or not pred or not os.path.isfile(pred):
    return None
  head = os.path.basename(pred).split("_valid.")[0]
  overlays = os.path.join(os.path.dirname(pred), f"{head}_attention_overlays")
  inp = error_page.PageInputs(
      pred, data_dir, os.path.join(workdir, ERROR_PAGE_DIR), propositions="",
      overlays=overlays if os.path.isfile(os.path.join(overlays, "index.json")) else "")
  page = error_page.build_page(inp, log=lambda _: None)
  _say(f"[demo] error-analysis page: {page}")
  return page


# ------------------------------------------------------------------ report

def _cell(e: dict[str, Any] | None) -> str:
  if not e or not e["n"]:
    return "–"
  return f"{100 * e['acc']:.1f} [{100 * e['ci95'][0]:.0f}–{100 * e['ci95'][1]:.0f}]"


def table(summary: dict[str, Any]) -> str:
  """Markdown table: valid accuracy (%) with 95% Wilson CIs per stage, chance 10%."""
  head = ("| model (valid split) | all | video | static | context (con) | temporal (t) |\n"
          "|---|---|---|---|---|---|\n")
  rows = [f"| chance | {100 * accuracy.CHANCE:.1f} | {100 * accuracy.CHANCE:.1f} | "
          f"{100 * accuracy.CHANCE:.1f} | {100 * accuracy.CHANCE:.1f} | "
          f"{100 * accuracy.CHANCE:.1f} |"]
  for name, label in ROWS:
    r = summary.get(name, {}).get("valid")
    if not r:
      continue
    tags = r.get("tags", {})
    rows.append(f"| {label} | {_cell(r['all'])} | {_cell(r['video'])} | "
                f"{_cell(r['static'])} | {_cell(tags.get('con'))} | {_cell(tags.get('t'))} |")
  return head + "\n".join(rows) + "\n"


def paper_tables(workdir: str) -> str:
  """The stages' valid evaluations in the paper's layout (`evaluation/paper_table.py`: Tables
  1, 2 and 10; the synthetic descriptions are not in valid_split.json, so Table 10 only counts
  them)."""
  try:
    rows = paper_table.find_reports([workdir])
  except FileNotFoundError:
    return ""
  return ("## In the paper's layout\n\n(`python -m contextblip_jax.results " + workdir
          + "` prints these tables.)\n\n" + paper_table.render(rows, props_lib.load("auto")))


def _write_report(workdir: str, summary: dict[str, Any]) -> None:
  if jax.process_index() != 0:
    return
  n = summary["data"]["splits"]["valid"]
  secs = summary["seconds"]
  reused = summary.get("reused") or []
  note = f" (stages reused from an earlier run: {', '.join(reused)})" if reused else ""
  lines = ["# ContextBLIP demo on the synthetic default", "",
           f"Valid split: {n['descriptions']} descriptions ({n['video_descriptions']} video, "
           f"{n['static_descriptions']} static, {n['context_descriptions']} tagged 'con'). "
           "Accuracy in % with 95% Wilson intervals; chance is 1 in 10.", "",
           table(summary),
           "Wall time (s): " + ", ".join(f"{k} {v}" for k, v in secs.items()) + note, ""]
  for name in STAGES:
    for fig in summary.get(name, {}).get("figures", []) or []:
      lines.append(f"![{name}]({os.path.relpath(fig, workdir)})")
  if summary.get("error_page"):
    rel = os.path.relpath(summary["error_page"], workdir)
    lines += ["", "Error-analysis page of the stage-2 valid predictions (open it in a browser; "
              f"filters for wrong / correct, video / static, tags): [`{rel}`]({rel})"]
  board = summary.get("predict", {}).get("files", {}).get("leaderboard")
  if board:
    lines += ["", f"Test-set leaderboard JSON: `{os.path.relpath(board, workdir)}`"]
  lines += ["", paper_tables(workdir)]
  with atomic_file(os.path.join(workdir, "report.md")) as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(workdir, "report.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1, sort_keys=True, default=str)
  print(table(summary), flush=True)
  print(f"[demo] report: {os.path.join(workdir, 'report.md')} ({secs['total']:.0f} s)",
        flush=True)
