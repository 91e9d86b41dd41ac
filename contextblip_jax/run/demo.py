"""The main job on the embedded default (configs/demo.py): data -> backbone -> pretrain
(zero-shot) -> finetune1 -> finetune2 -> test predictions -> report.

Layout of the workdir:
  data/                    the generated synthetic dataset (IMAGECODE layout + pairs)
  backbone/ pretrain/ finetune1/ finetune2/   one stage workdir each (see storage/workdir.py)
  predict/eval/            stage-2 predictions + leaderboard JSON for the unlabelled test file
  report.md, report.json   the table of accuracies against chance, timings, figures

A rerun reuses the data and every finished stage (DONE.json) and resumes an interrupted one.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections

from contextblip_jax.data import synthetic
from contextblip_jax.evaluation import accuracy
from contextblip_jax.run import evaluate, train
from contextblip_jax.storage import workdir as wd

STAGES = ("backbone", "pretrain", "finetune1", "finetune2")
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


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes / reuses) every stage; writes report.md; returns the summary."""
  t0 = time.time()
  workdir = os.path.abspath(workdir)
  data_dir = os.path.join(workdir, "data")
  sizes = dict(cfg.synthetic)
  summary: dict[str, Any] = {"data": synthetic.ensure(data_dir, cfg.data_seed, **sizes)}
  splits = summary["data"]["splits"]
  _say(f"[demo] data: {splits['train']['descriptions']} train / "
       f"{splits['valid']['descriptions']} valid / {splits['test']['descriptions']} test "
       f"descriptions, {summary['data']['pairs']} pre-training pairs in {data_dir}")
  times = {"data": time.time() - t0}
  summary["reused"] = []
  for name in STAGES:
    t = time.time()
    stage_dir = os.path.join(workdir, name)
    was_done = wd.read_done(stage_dir) is not None
    _say(f"[demo] stage {name} ..." + (" (finished earlier: reused)" if was_done else ""))
    out = train.train_and_evaluate(_stage_config(cfg, name, data_dir, workdir), stage_dir)
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
    summary["predict"] = _predict(cfg, data_dir, workdir)
    times["predict"] = time.time() - t
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


def _predict(cfg, data_dir: str, workdir: str) -> dict[str, Any]:
  c = _stage_config(cfg, "finetune2", data_dir, workdir)
  c.mode, c.eval.split, c.eval.head = "predict", "test", "stage2"
  c.eval.checkpoint = os.path.join(workdir, "finetune2")
  c.eval.visualize = 0
  out_dir = os.path.join(workdir, "predict")
  board = os.path.join(out_dir, "eval", "stage2_test.leaderboard.json")
  if os.path.isfile(board):
    return {"files": {"leaderboard": board}, "reused": True}
  report = evaluate.run(c, out_dir)
  return {"files": report["files"], "unlabelled": report.get("unlabelled")}


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
  board = summary.get("predict", {}).get("files", {}).get("leaderboard")
  if board:
    lines += ["", f"Test-set leaderboard JSON: `{os.path.relpath(board, workdir)}`"]
  with open(os.path.join(workdir, "report.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(workdir, "report.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1, sort_keys=True, default=str)
  print(table(summary), flush=True)
  print(f"[demo] report: {os.path.join(workdir, 'report.md')} ({secs['total']:.0f} s)",
        flush=True)
