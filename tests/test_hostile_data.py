"""Hostile annotation files and evaluation outputs (issue 12, item 9): duplicate keys, a gold
key like "³", an empty split, bad set names (a counted skip and a prediction line each),
NaN in reports, an unlabelled split with skipped descriptions."""

import json
import math
import os

import pytest

from contextblip_jax.data import imagecode as ic
from contextblip_jax.evaluation import outputs

VIDEO = "MSR-VTT-videoTrainValVideo_video1-shot1_0"
OTHER = "MSR-VTT-videoTrainValVideo_video2-shot1_0"


def _raw(tmp_path, name, text):
  path = os.path.join(str(tmp_path), name)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  return path


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_duplicate_json_keys_are_an_error_naming_file_and_key(tmp_path, policy):
  path = _raw(tmp_path, "dup.json", '{"%s": {"3": "a dog", "3": "a cat"}}' % VIDEO)
  with pytest.raises(ic.ImagecodeDataError, match=rf"dup\.json: duplicate key '{VIDEO}/3'"):
    ic.read_imagecode(path, check_images=False, on_error=policy)
  path = _raw(tmp_path, "dupset.json", '{"%s": {"1": "a"}, "%s": {"2": "b"}}' % (VIDEO, VIDEO))
  with pytest.raises(ic.ImagecodeDataError, match=f"duplicate key '{VIDEO}'"):
    ic.read_imagecode(path, check_images=False, on_error=policy)


def test_duplicate_yaml_keys_are_an_error_naming_the_file(tmp_path):
  path = _raw(tmp_path, "tags.yaml",
              f"{VIDEO}:\n  3: {{annotation: con}}\n  3: {{annotation: t}}\n")
  with pytest.raises(ic.ImagecodeDataError, match=r"tags\.yaml: not valid YAML.*duplicate key"):
    ic.load_phenomenon_tags(path)


def test_unicode_digit_gold_key_is_named_or_counted(tmp_path):
  path = _raw(tmp_path, "sup.json", json.dumps({VIDEO: {"³": "a dog", "4": "ok"}}))
  with pytest.raises(ic.ImagecodeDataError, match=rf"sup\.json: entry '{VIDEO}/³'.*'³'"):
    ic.read_imagecode(path, check_images=False)
  split = ic.read_imagecode(path, check_images=False, on_error="skip")
  assert [e.label for e in split.examples] == [4] and split.num_skipped_descriptions == 1
  records = ic.skipped_records(split)
  assert [(r["set"], r["index"], r["gold"], r["description"]) for r in records] == [
      (VIDEO, 0, None, "a dog")]
  tags = _raw(tmp_path, "t.yaml", f"{VIDEO}:\n  '³': {{annotation: con}}\n")
  with pytest.raises(ic.ImagecodeDataError, match="gold index must be 0-9, got '³'"):
    ic.load_phenomenon_tags(tags)
  assert ic.load_phenomenon_tags(tags, on_error="skip")[1][0].entry == f"{VIDEO}/³"


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_empty_split_is_an_error(tmp_path, policy):
  path = _raw(tmp_path, "empty.json", "{}")
  with pytest.raises(ic.ImagecodeDataError, match=r"empty\.json: no image sets"):
    ic.read_imagecode(path, check_images=False, on_error=policy)


def test_bad_set_names_get_prediction_lines_and_are_counted(tmp_path):
  data = {"../evil": {"1": "up one", "2": "again"}, "a/b": {"3": "slash"}, "": {"4": "blank"},
          VIDEO: {"5": "fine"}}
  path = _raw(tmp_path, "names.json", json.dumps(data))
  with pytest.raises(ic.ImagecodeDataError, match="set name must be a non-empty directory name"):
    ic.read_imagecode(path, check_images=False)
  split = ic.read_imagecode(path, check_images=False, on_error="skip")
  assert split.num_skipped_descriptions == 4 and len(split.examples) == 1
  records = ic.skipped_records(split)
  assert sorted((r["set"], r["index"]) for r in records) == [
      ("", 0), ("../evil", 0), ("../evil", 1), ("a/b", 0)]
  assert all(r["pred"] is None and "set name" in r["skipped"] for r in records)
  scored = [{"set": VIDEO, "index": 0, "description": "fine", "static": False, "gold": 5,
             "pred": 5, "scores": [0.0] * 10}]
  report = {"all": {"acc": 1.0}, "skipped_descriptions": len(records)}
  files = outputs.write_outputs(str(tmp_path / "out"), "valid", scored + records, split, report)
  lines = [json.loads(x) for x in open(files["predictions"])]
  assert len(lines) == 5 and sum(x["pred"] is None for x in lines) == 4


def test_reports_are_strict_json_without_nan(tmp_path):
  report = {"all": {"n": 0, "acc": float("nan"), "ci95": [0.0, 1.0]},
            "static": {"acc": float("inf")}}
  path = str(tmp_path / "r.json")
  outputs.write_json(path, report, indent=1)
  text = open(path).read()
  assert "NaN" not in text and "Infinity" not in text
  got = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
  assert got["all"]["acc"] is None and got["static"]["acc"] is None
  assert not math.isnan(got["all"]["ci95"][1])


def test_unlabelled_split_with_a_skipped_description_writes_nothing(tmp_path):
  path = _raw(tmp_path, "test.json", json.dumps({VIDEO: ["one", ""], OTHER: ["two"]}))
  split = ic.read_imagecode(path, check_images=False, on_error="skip")
  assert not split.labelled and split.num_skipped_descriptions == 1
  scored = [{"set": s, "index": 0, "description": d, "static": False, "gold": None, "pred": 1,
             "scores": [0.0] * 10} for s, d in ((VIDEO, "one"), (OTHER, "two"))]
  out = tmp_path / "out"
  with pytest.raises(ValueError, match=rf"1 test descriptions were skipped.*{VIDEO}.*1"):
    outputs.write_outputs(str(out), "stage2_test", scored + ic.skipped_records(split), split,
                          {"all": {}})
  assert not out.exists() or not os.listdir(out)
