"""Accuracy by number of propositions (paper Table 10): the shipped valid_split.json, the
report entry, which file an evaluation uses, and the evaluate mode's report."""

import json
import os

import pytest

from contextblip_jax.data import propositions
from contextblip_jax.evaluation import accuracy
from contextblip_jax.run import evaluate
from tests.helpers.loops import make_data, make_export, tiny_eval_config

pytestmark = pytest.mark.usefixtures("xla_optimisations_off")
TABLE10_ALL = {1: 72, 2: 899, 3: 1215, 4: 99, 5: 14, 6: 3}


def test_shipped_file_is_table10_all_row_keyed_by_valid_descriptions(imagecode_dir):
  path = os.path.join(imagecode_dir, propositions.FILE_NAME)
  assert os.path.samefile(path, propositions.SHIPPED_FILE)
  counts = propositions.load_propositions(path)
  assert propositions.histogram(counts) == TABLE10_ALL
  with open(os.path.join(imagecode_dir, "valid_data.json"), encoding="utf-8") as f:
    valid = json.load(f)
  descs = [d for s in valid.values() for d in s.values()]
  assert len(descs) == 2302 and set(descs) == set(counts)


def test_report_counts_correct_and_missing_descriptions():
  counts = {"a": 1, "b": 2, "c": 2}
  recs = [dict(description=d, gold=g, pred=p, static=False) for d, g, p in (
      ("a", 1, 1), ("b", 0, 3), ("c", 2, 2), ("new", 4, 4),
      ("c", None, 5),                                          # unlabelled: not scored
      ("a", 1, None))]                                         # skipped: not scored
  rep = accuracy.proposition_report(recs, counts, "f.json")
  assert rep["matched"] == 3 and rep["missing"] == 1 and rep["file"] == "f.json"
  assert {k: (e["correct"], e["n"]) for k, e in rep["by_count"].items()} == {
      "1": (1, 1), "2": (1, 2)}
  text = accuracy.format_report({**accuracy.accuracy_report(recs[:4]), "propositions": rep})
  assert "propositions 2  50.00%" in text and "1 of 4 descriptions are not in f.json" in text


def test_which_file_and_bad_files(tmp_path):
  assert propositions.resolve_file("") == (None, False)
  assert propositions.resolve_file("auto", str(tmp_path)) == (propositions.SHIPPED_FILE, False)
  own = tmp_path / propositions.FILE_NAME
  own.write_text(json.dumps({"x": ["x"]}))
  assert propositions.resolve_file("auto", str(tmp_path)) == (str(own), False)
  assert propositions.resolve_file(str(own)) == (str(own), True)
  with pytest.raises(propositions.PropositionsError, match="nope.json not found"):
    propositions.resolve_file(str(tmp_path / "nope.json"))
  bad = tmp_path / "bad.json"
  bad.write_text('{"x": ["p"], "y": []}')
  with pytest.raises(propositions.PropositionsError, match=r"bad.json: description 'y'"):
    propositions.load_propositions(str(bad))
  bad.write_text('{"x": ["p"], "x": ["q"]}')
  with pytest.raises(propositions.PropositionsError, match="duplicate description 'x'"):
    propositions.load_propositions(str(bad))


def test_evaluate_reports_by_proposition_count(tmp_path):
  data = make_data(tmp_path)
  export = make_export(tmp_path / "ft")
  cfg = tiny_eval_config(data, export)
  with open(os.path.join(data, "valid_data.json")) as f:
    descs = [d for s in json.load(f).values() for d in s.values()]
  # 'auto' on the synthetic data: the shipped file matches nothing, no error, all counted.
  auto = propositions.for_split(cfg, "valid", descs)
  assert auto.source == propositions.SHIPPED_FILE and not auto.explicit
  assert propositions.for_split(cfg, "test", descs) is None
  # An explicit file matching none is an error before any scoring.
  none = tmp_path / "none.json"
  none.write_text(json.dumps({"not a description": ["p"]}))
  cfg.data.propositions_file = str(none)
  with pytest.raises(propositions.PropositionsError, match="none of the split's descriptions"):
    evaluate.run(cfg, str(tmp_path / "ev0"))
  # An explicit file for half of them: a table for those, the rest counted as missing.
  half = {d: ["p"] * (1 + i % 3) for i, d in enumerate(descs[::2])}
  path = tmp_path / "props.json"
  path.write_text(json.dumps(half))
  cfg.data.propositions_file = str(path)
  rep = evaluate.run(cfg, str(tmp_path / "ev"))
  p = rep["propositions"]
  assert p["matched"] == len(half) and p["missing"] == len(descs) - len(half)
  preds = accuracy.read_predictions(rep["files"]["predictions"])
  for k, e in p["by_count"].items():
    mine = [r for r in preds if len(half.get(r["description"], ())) == int(k)]
    assert e["n"] == len(mine) and e["correct"] == sum(r["pred"] == r["gold"] for r in mine)
  with open(rep["files"]["report"]) as f:
    assert json.load(f)["propositions"]["matched"] == len(half)
