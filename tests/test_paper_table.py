"""The paper's tables from a run's evaluation outputs: which reports are found (epoch reports
and test-only reports left out), the markdown of Tables 1, 2, 10 and 3 with intervals, the
command, and the demo's report section."""

import json
import os

import pytest

from contextblip_jax.data import propositions
from contextblip_jax.evaluation import accuracy, mmvp_eval, paper_table
from contextblip_jax.run import demo


def _recs(n_right, n, prefix):
  return [dict(set=f"{prefix}{i}", index=0, description=f"{prefix} d{i}", static=i % 2 == 0,
               gold=1, pred=1 if i < n_right else 2, scores=[0.0] * 10) for i in range(n)]


def _write_eval(workdir, name, records, tags=None):
  os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
  pred = os.path.join(workdir, "eval", f"{name}.predictions.jsonl")
  with open(pred, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  rep = accuracy.accuracy_report(records, tags)
  rep["files"] = {"predictions": pred}
  with open(os.path.join(workdir, "eval", f"{name}.report.json"), "w") as f:
    json.dump(rep, f)


@pytest.fixture
def run_tree(tmp_path):
  """A demo-like workdir: pretrain (zero-shot, plus an epoch report), finetune2 (stage 2, tags),
  predict (test: unlabelled), and an MMVP evaluation beside it."""
  root = tmp_path / "demo"
  tags = {(f"f{i}", 1): (["con", "q"] if i < 6 else ["t"]) for i in range(10)}
  _write_eval(str(root / "pretrain"), "zero_shot_valid", _recs(3, 10, "z"))
  _write_eval(str(root / "pretrain"), "zero_shot_valid_epoch0", _recs(9, 10, "z"))
  _write_eval(str(root / "finetune2"), "stage2_valid", _recs(5, 10, "f"), tags)
  test = [dict(r, gold=None) for r in _recs(0, 4, "t")]
  _write_eval(str(root / "predict"), "stage2_test", test)
  recs = [dict(category=c, correct=ok, pred=[0, 1], gold=[0, 1] if ok else [1, 1])
          for c, ok in (("Texts", True), ("Texts", False), ("Color and Appearance", True),
                        ("Color and Appearance", True))]
  mm = os.path.join(str(tmp_path), "mmvp", "eval")
  os.makedirs(mm)
  with open(os.path.join(mm, "mmvp_stage2.report.json"), "w") as f:
    json.dump(mmvp_eval.mmvp_report(recs), f)
  counts = {f"f d{i}": 1 + i % 2 for i in range(8)}            # f d8, f d9 not in the file
  props = tmp_path / "props.json"
  props.write_text(json.dumps({d: ["p"] * k for d, k in counts.items()}))
  return str(root), str(tmp_path / "mmvp"), str(props)


def test_find_reports_orders_rows_and_leaves_out_epochs(run_tree):
  root, mm, _ = run_tree
  rows = paper_table.find_reports([root, mm])
  assert [(r.label, r.split) for r in rows] == [
      ("zero-shot (pretrain)", "valid"), ("fine-tuned, stage 2 (finetune2)", "valid"),
      ("fine-tuned, stage 2 (mmvp)", "mmvp"), ("fine-tuned, stage 2 (predict)", "test")]
  empty = os.path.join(os.path.dirname(root), "empty")
  os.makedirs(empty)
  with pytest.raises(FileNotFoundError, match="empty: no evaluation report"):
    paper_table.find_reports([empty])


def test_tables_in_the_paper_layout(run_tree):
  root, mm, props = run_tree
  counts = propositions.Propositions(props, propositions.load_propositions(props), True)
  text = paper_table.render(paper_table.find_reports([root, mm]), counts)
  lines = text.splitlines()
  t1 = [ln for ln in lines if ln.startswith("| zero-shot (pretrain) | valid")]
  assert t1 == ["| zero-shot (pretrain) | valid (10) | 30.0 [10.8–60.3] | 20.0 [3.6–62.4] | "
                "40.0 [11.8–76.9] |"]
  assert not any("(predict)" in ln for ln in lines)            # the test split has no labels
  header2 = next(ln for ln in lines if ln.startswith("| model | Context"))
  assert header2 == "| model | Context (6) | Quantities (6) | Temporal* (4) |"
  assert "| fine-tuned, stage 2 (finetune2) | 83.3 [43.6–97.0] | 83.3 [43.6–97.0] | 0.0 " \
         "[0.0–49.0] |" in lines
  # Table 10: descriptions f d0..f d7 have 1 or 2 propositions; f d0..f d4 are right.
  assert "| All (descriptions) | 4 | 4 | 0 | 0 | 0 | 0 |" in lines
  row10 = next(ln for ln in lines if ln.startswith("| fine-tuned, stage 2 (finetune2) | 3 ("))
  assert row10.startswith("| fine-tuned, stage 2 (finetune2) | 3 (75.0 [30.1–95.4]) | "
                          "2 (50.0 [15.0–85.0]) | – |")
  assert "- fine-tuned, stage 2 (finetune2): 2 of 10 descriptions are not in props.json" in lines
  assert "- zero-shot (pretrain): 10 of 10 descriptions are not in props.json" in lines
  # Table 3: categories in file order, the average with its pooled interval.
  assert "| Texts | 50.0 [9.5–90.5] (1/2) |" in lines
  assert "| **Average** | 75.0 [30.1–95.4] (3/4) |" in lines


def test_command_and_demo_section(run_tree, tmp_path, capsys):
  root, mm, props = run_tree
  out = tmp_path / "t" / "table.md"
  assert paper_table.main([root, mm, "--propositions", props, "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  assert printed == out.read_text() and "**Table 3 layout**" in printed
  assert paper_table.main([str(tmp_path / "missing")]) == 2
  assert "missing: not found" in capsys.readouterr().err
  section = demo.paper_tables(root)
  assert section.startswith("## In the paper's layout") and "**Table 2 layout**" in section
  # The repository's file covers none of these descriptions: counted, no Table 10 rows.
  assert "no evaluated description is in the propositions file" in section
