"""Evaluation: scoring math, the loop on generated sets (vision once per set), output files,
and bad input at the loop level (clear errors naming file and entry, or counted skips)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from contextblip_jax.evaluation import accuracy
from contextblip_jax.evaluation import loop as evaluate
from contextblip_jax.training import objectives
from contextblip_jax.storage import workdir as wd
from contextblip_jax.data import imagecode
from contextblip_jax.models.contextblip import ContextBlip
from tests.helpers.loops import compilation_cache, make_data, make_export, tiny_eval_config


# ------------------------------------------------------------------ scoring math

def test_wilson_interval_known_values():
  lo, hi = accuracy.wilson_interval(5, 10)
  assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
  lo, hi = accuracy.wilson_interval(0, 20)
  assert lo == 0.0 and 0.16 < hi < 0.17
  assert accuracy.wilson_interval(0, 0) == (0.0, 1.0)


def test_accuracy_report_splits_and_tags():
  recs = [dict(set="a-video", index=0, static=False, gold=1, pred=1),
          dict(set="a-video", index=1, static=False, gold=2, pred=0),
          dict(set="open-images-x", index=0, static=True, gold=3, pred=3),
          dict(set="t", index=0, static=True, gold=None, pred=4)]
  tags = {("a-video", 2): ["con", "t"], ("open-images-x", 3): ["con"]}
  rep = accuracy.accuracy_report(recs, tags)
  assert rep["all"]["n"] == 3 and rep["all"]["correct"] == 2
  assert rep["video"]["acc"] == 0.5 and rep["static"]["acc"] == 1.0
  assert rep["tags"]["con"]["n"] == 2 and rep["tags"]["con"]["correct"] == 1
  assert rep["tags"]["t"]["correct"] == 0 and rep["unlabelled"] == 1
  assert "chance 10%" in accuracy.format_report(rep, "x")


def test_leaderboard_keeps_file_order_and_never_drops_a_description():
  expected = {"s2": ["x", "y"], "s1": ["z"]}
  recs = [dict(set="s1", index=0, pred=7), dict(set="s2", index=1, pred=3),
          dict(set="s2", index=0, pred=5)]
  board = accuracy.leaderboard(recs, expected)
  assert list(board) == ["s2", "s1"] and board == {"s2": [5, 3], "s1": [7]}
  with pytest.raises(ValueError, match="no prediction for set 's2' description 1"):
    accuracy.leaderboard(recs[:1] + recs[2:], expected)
  with pytest.raises(ValueError, match="not in the test file"):
    accuracy.leaderboard(recs + [dict(set="s3", index=0, pred=1)], expected)
  with pytest.raises(ValueError, match="duplicate"):
    accuracy.leaderboard(recs + recs[:1], expected)


# ------------------------------------------------------------------ the loop

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval")
  data = make_data(root)
  export = make_export(root / "ft2")
  with compilation_cache(root / "xla_cache"):
    yield dict(root=root, data=data, export=export)


def _run(cfg, workdir):
  return evaluate.run(cfg, str(workdir))


def test_scores_reuse_vision_and_match_per_description_scoring(setup):
  """The batched loop (vision once per set, reused for each description) gives the same
  scores as scoring each description with its own pass over the 10 images."""
  cfg = tiny_eval_config(setup["data"], setup["export"], head="stage2")
  model, params, mesh, sh = evaluate.load_eval_params(cfg, str(setup["root"]))
  split = evaluate.load_split(cfg, "valid")
  recs = evaluate.Evaluator(model, "stage2", cfg, mesh, sh).records(params, split)
  assert len(recs) == len(split.examples)
  by_key = {(r["set"], r["index"]): r for r in recs}
  s = next(s for s in split.sets if len(s.example_indices) >= 2)
  images = imagecode.load_candidates(s.image_paths, 32)[None]
  from contextblip_jax.data.tokenizer import BlipTokenizer, pre_caption_imagecode
  tok = BlipTokenizer()
  for i in s.example_indices:
    e = split.examples[i]
    enc = tok([pre_caption_imagecode(e.description)], max_length=30)
    ref = objectives.finetune_scores(jax.device_get(params), images, enc["input_ids"],
                                     enc["attention_mask"], np.array([e.is_video]),
                                     model=model, stage=2)
    np.testing.assert_allclose(by_key[(e.set_name, e.position)]["scores"], ref[0],
                               rtol=2e-4, atol=2e-5)


def test_evaluate_and_predict_write_every_description(setup):
  root, data = setup["root"], setup["data"]
  rep = _run(tiny_eval_config(data, setup["export"], num_devices=0), root / "ev")   # 8 devices
  with open(os.path.join(data, "valid_data.json")) as f:
    n_valid = sum(len(v) for v in json.load(f).values())
  lines = accuracy.read_predictions(rep["files"]["predictions"])
  assert len(lines) == n_valid == rep["all"]["n"]
  assert all(len(r["scores"]) == 10 and r["pred"] == int(np.argmax(r["scores"]))
             for r in lines)
  assert 0 <= rep["all"]["acc"] <= 1 and rep["all"]["ci95"][0] <= rep["all"]["acc"]
  assert rep["tags"] and rep["skipped_descriptions"] == 0
  assert os.path.isfile(rep["files"]["report"])
  metrics = [json.loads(x) for x in open(root / "ev" / "metrics.jsonl")]
  assert "zero_shot_valid/acc_all" in metrics[-1]

  rep = _run(tiny_eval_config(data, setup["export"], head="stage1", predict=True),
             root / "pred")
  with open(os.path.join(data, "test_data_unlabeled.json")) as f:
    test = json.load(f)
  with open(rep["files"]["leaderboard"]) as f:
    board = json.load(f)
  assert list(board) == list(test)
  assert all(len(board[k]) == len(v) and all(0 <= p <= 9 for p in board[k])
             for k, v in test.items())
  assert rep["unlabelled"] == sum(len(v) for v in test.values())


# ------------------------------------------------------------------ bad input

def _copy(setup, name):
  dst = os.path.join(str(setup["root"]), name)
  shutil.copytree(setup["data"], dst)
  return dst


def _valid(data):
  with open(os.path.join(data, "valid_data.json")) as f:
    return json.load(f)


def _write_valid(data, obj):
  with open(os.path.join(data, "valid_data.json"), "w") as f:
    json.dump(obj, f)


def _break_set(data, kind):
  """Applies one defect to the first valid set; returns (set name, text expected in error)."""
  valid = _valid(data)
  name = next(iter(valid))
  set_dir = os.path.join(data, "image-sets", name)
  first = sorted(os.listdir(set_dir))[0]
  if kind == "missing_dir":
    shutil.rmtree(set_dir)
    return name, "image-set directory not found"
  if kind == "nine_images":
    os.remove(os.path.join(set_dir, first))
    return name, "expected 10"
  if kind == "corrupt_image":
    with open(os.path.join(set_dir, first), "wb") as f:
      f.write(b"not a jpeg at all")
    return name, first
  if kind == "empty_description":
    gold = next(iter(valid[name]))
    valid[name][gold] = "   "
    _write_valid(data, valid)
    return name, "non-empty string"
  if kind == "non_string_description":
    gold = next(iter(valid[name]))
    valid[name][gold] = 42
    _write_valid(data, valid)
    return name, "non-empty string"
  raise ValueError(kind)


@pytest.mark.parametrize("kind", ["missing_dir", "nine_images", "corrupt_image",
                                  "empty_description", "non_string_description"])
def test_bad_input_raises_naming_file_and_entry(setup, kind):
  data = _copy(setup, f"bad_{kind}")
  name, reason = _break_set(data, kind)
  cfg = tiny_eval_config(data, setup["export"])
  with pytest.raises(Exception) as info:
    _run(cfg, os.path.join(data, "out"))
  msg = str(info.value)
  assert name in msg and reason in msg


def test_schema_and_unknown_set_errors(setup):
  data = _copy(setup, "bad_schema")
  _write_valid(data, [{"not": "a mapping"}])
  with pytest.raises(imagecode.ImagecodeDataError, match="valid_data.json"):
    _run(tiny_eval_config(data, setup["export"]), os.path.join(data, "out"))
  data = _copy(setup, "bad_unknown_set")
  with open(os.path.join(data, "test_data_unlabeled.json")) as f:
    test = json.load(f)
  test["open-images-no_such_set"] = ["a red circle"]
  with open(os.path.join(data, "test_data_unlabeled.json"), "w") as f:
    json.dump(test, f)
  with pytest.raises(imagecode.ImagecodeDataError, match="open-images-no_such_set"):
    _run(tiny_eval_config(data, setup["export"], predict=True), os.path.join(data, "out"))
  data = _copy(setup, "bad_tags")
  with open(os.path.join(data, "manual_annotation_valid.yaml"), "a") as f:
    f.write('"synthvideo-unknown":\n  "3":\n    "description": "x"\n    "annotation": "con"\n')
  with pytest.raises(imagecode.ImagecodeDataError,
                     match="manual_annotation_valid.yaml.*synthvideo-unknown"):
    _run(tiny_eval_config(data, setup["export"]), os.path.join(data, "out"))


def test_non_rgb_image_is_converted_not_rejected(setup):
  data = _copy(setup, "grey")
  name = next(iter(_valid(data)))
  set_dir = os.path.join(data, "image-sets", name)
  for f in os.listdir(set_dir):
    p = os.path.join(set_dir, f)
    Image.open(p).convert("L").save(p, format="JPEG")
  rep = _run(tiny_eval_config(data, setup["export"]), os.path.join(data, "out"))
  assert rep["skipped_descriptions"] == 0 and rep["all"]["n"] == sum(
      len(v) for v in _valid(data).values())


def test_skip_mode_counts_and_keeps_every_description_in_predictions(setup):
  data = _copy(setup, "skip")
  valid = _valid(data)
  names = list(valid)
  shutil.rmtree(os.path.join(data, "image-sets", names[0]))            # whole set
  bad = os.path.join(data, "image-sets", names[1])
  with open(os.path.join(bad, sorted(os.listdir(bad))[0]), "wb") as f:
    f.write(b"\x00garbage")                                           # corrupt image
  gold = next(iter(valid[names[2]]))
  valid[names[2]][gold] = ""                                          # one description
  _write_valid(data, valid)
  cfg = tiny_eval_config(data, setup["export"])
  cfg.data.on_error = "skip"
  rep = _run(cfg, os.path.join(data, "out"))
  expected_skipped = len(valid[names[0]]) + len(valid[names[1]]) + 1
  total = sum(len(v) for v in valid.values())
  assert rep["skipped_descriptions"] == expected_skipped
  assert rep["all"]["n"] == total - expected_skipped
  lines = accuracy.read_predictions(rep["files"]["predictions"])
  assert len(lines) == total
  skipped = [r for r in lines if r["pred"] is None]
  assert len(skipped) == expected_skipped and all(r["skipped"] for r in skipped)
  metrics = [json.loads(x) for x in open(os.path.join(data, "out", "metrics.jsonl"))]
  assert metrics[-1]["zero_shot_valid/skipped_descriptions"] == expected_skipped


def test_missing_head_parameters_are_named(setup, tmp_path):
  from tests.helpers.loops import random_params, tiny_model_config
  mc = tiny_model_config()
  params = random_params(mc, "zero_shot")
  wd.export_params(str(tmp_path / "pt"), params, "pretrain", mc)
  cfg = tiny_eval_config(setup["data"], str(tmp_path / "pt"), head="stage2")
  with pytest.raises(ValueError, match="prediction_layer"):
    evaluate.load_eval_params(cfg, str(tmp_path))
  assert ContextBlip(mc).config.num_candidates == 10
