"""Evaluation: scoring math, the loop on generated sets (vision once per set), output files
(atomic: never half-written), and bad input at the loop level (clear errors naming file and
entry, or counted skips)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from contextblip_jax.evaluation import accuracy
from contextblip_jax.evaluation import loop
from contextblip_jax.run import evaluate
from contextblip_jax.evaluation import outputs
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


# ------------------------------------------------------------------ output files

def _records():
  scored = [dict(set="s1", index=i, description=f"d{i}", static=True, gold=None, pred=i,
                 scores=np.eye(10)[i].astype(np.float32)) for i in range(3)]
  skipped = [dict(set="s2", index=0, description="gone", static=False, gold=None, pred=None,
                  scores=None, skipped="image-set directory not found")]
  return scored, skipped


def _unlabelled_split(tmp_path):
  source = tmp_path / "test_data_unlabeled.json"
  source.write_text(json.dumps({"s1": ["d0", "d1", "d2"]}))
  return imagecode.ImagecodeSplit(str(source), False, [], [])


def _leftovers(out):
  return sorted(f for f in os.listdir(out) if ".tmp" in f)


def test_outputs_hold_every_record_and_skipped_ones_before_the_rename(tmp_path, monkeypatch):
  scored, skipped = _records()
  split, out = _unlabelled_split(tmp_path), tmp_path / "out"
  seen = {}
  real_replace = os.replace

  def replace(src, dst):            # what the file holds at the moment it appears
    with open(src) as f:
      seen[os.path.basename(dst)] = f.read()
    real_replace(src, dst)
  monkeypatch.setattr(os, "replace", replace)
  files = outputs.write_outputs(str(out), "h_test", skipped + scored[::-1], split, {"all": 1})
  assert set(files) == {"predictions", "report", "leaderboard"}
  lines = [json.loads(x) for x in seen["h_test.predictions.jsonl"].splitlines()]
  assert [(r["set"], r["index"]) for r in lines] == [("s1", 0), ("s1", 1), ("s1", 2),
                                                     ("s2", 0)]
  assert lines[-1]["pred"] is None and lines[-1]["skipped"] == "image-set directory not found"
  assert lines[1]["scores"] == list(np.eye(10)[1]) and lines[1]["pred"] == 1
  assert accuracy.read_predictions(files["predictions"]) == lines
  assert json.loads(seen["h_test.report.json"]) == {"all": 1}
  assert json.loads(seen["h_test.leaderboard.json"]) == {"s1": [0, 1, 2]}
  assert _leftovers(out) == []


def test_failed_writes_leave_the_previous_file_or_none(tmp_path, monkeypatch):
  scored, skipped = _records()
  out = tmp_path / "out"
  pred = out / "p.predictions.jsonl"
  # predictions: the 3rd record cannot be serialised, after two lines went to the temp file
  bad = scored[:2] + [dict(scored[2], scores=["x"] * 10)] + skipped
  with pytest.raises(ValueError):
    outputs.write_predictions(str(pred), bad)
  assert not os.path.exists(out) or os.listdir(out) == []                # no file, no temp
  assert outputs.write_predictions(str(pred), scored + skipped) == 4
  before = pred.read_text()
  with pytest.raises(ValueError):
    outputs.write_predictions(str(pred), bad)
  assert pred.read_text() == before and _leftovers(out) == []

  # report / leaderboard JSON: json.dump fails after writing part of the document
  def partial_dump(obj, f, **kw):
    f.write('{"all": ')
    raise OSError("disk full")
  report = out / "p.report.json"
  outputs.write_json(str(report), {"all": {"acc": 0.5}})
  monkeypatch.setattr(json, "dump", partial_dump)
  with pytest.raises(OSError, match="disk full"):
    outputs.write_json(str(report), {"all": {"acc": 0.9}})
  assert json.loads(report.read_text()) == {"all": {"acc": 0.5}}
  board = out / "p.leaderboard.json"
  with pytest.raises(OSError, match="disk full"):
    outputs.write_leaderboard(str(board), scored, {"s1": ["a", "b", "c"]})
  assert not board.exists() and _leftovers(out) == []
  monkeypatch.undo()
  # a leaderboard missing a description is refused before anything is written
  with pytest.raises(ValueError, match="no prediction for set 's1' description 3"):
    outputs.write_leaderboard(str(board), scored, {"s1": ["a", "b", "c", "d"]})
  assert not board.exists() and _leftovers(out) == []
  assert outputs.write_leaderboard(str(board), scored, {"s1": ["a", "b", "c"]}) == {
      "s1": [0, 1, 2]}
  assert json.loads(board.read_text()) == {"s1": [0, 1, 2]}


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
  split = imagecode.load_split(cfg, "valid")
  recs = loop.Evaluator(model, "stage2", cfg, mesh, sh).records(params, split)
  assert len(recs) == len(split.examples)
  by_key = {(r["set"], r["index"]): r for r in recs}
  s = next(s for s in split.sets if len(s.example_indices) >= 2)
  images = imagecode.load_candidates(s.image_paths, 32)[None]
  from contextblip_jax.data.tokenizer import BlipTokenizer, pre_caption_imagecode
  tok = BlipTokenizer()
  for i in s.example_indices:
    e = split.examples[i]
    enc = tok([pre_caption_imagecode(e.description)], max_length=30)
    host = {"params": jax.device_get(params)}
    embeds = model.apply(host, images, method=ContextBlip.encode_candidates)
    ref = model.apply(host, embeds, enc["input_ids"], enc["attention_mask"], "stage2",
                      np.array([e.is_video]), method=ContextBlip.candidate_scores)
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
  from contextblip_jax.data.tokenizer import VOCAB_PATH
  mc = tiny_model_config()
  params = random_params(mc, "zero_shot")
  wd.export_params(str(tmp_path / "pt"), params, "pretrain", mc, vocab_path=VOCAB_PATH)
  cfg = tiny_eval_config(setup["data"], str(tmp_path / "pt"), head="stage2")
  with pytest.raises(ValueError, match="prediction_layer"):
    evaluate.load_eval_params(cfg, str(tmp_path))
  assert ContextBlip(mc).config.num_candidates == 10


def test_attention_figure_uses_the_masking_patch_score(setup, tmp_path):
  """The heat map is masking.patch_scores('valid_mean', no noise) (the mean cross-attention
  over layers, heads and content tokens, L2-normalised) and the mask is its top pi*P."""
  from contextblip_jax.evaluation import visualize
  from contextblip_jax.training import masking
  cfg = tiny_eval_config(setup["data"], setup["export"])
  model, params, _, _ = evaluate.load_eval_params(cfg, str(setup["root"]))
  split = imagecode.load_split(cfg, "valid")
  host = jax.device_get(params)
  s = model.config.blip.vision.image_size
  pixels = jax.random.normal(jax.random.key(0), (2, s, s, 3))
  ids = jnp.array([[101, 2000, 2001, 2002, 102, 0], [101, 3000, 102, 0, 0, 0]], jnp.int32)
  mask = (ids > 0).astype(jnp.int32)
  heat, chosen = visualize._attention_and_mask(host, pixels, ids, mask, model=model,
                                               mask_ratio=0.25)
  embeds = model.apply({"params": host}, pixels, method=ContextBlip.image_embeds)
  attn = model.apply({"params": host}, ids, mask, embeds, True, True,
                     method=ContextBlip.multimodal).cross_attentions
  mean = np.stack(attn, 1).mean(axis=(1, 2))[..., 1:]                 # [B, T, P]
  w = np.asarray(masking.content_token_mask(mask), np.float32)
  ref = np.einsum("bt,btp->bp", w, mean) / w.sum(1, keepdims=True)
  ref /= np.linalg.norm(ref, axis=1, keepdims=True)
  np.testing.assert_allclose(heat, ref, rtol=1e-5, atol=1e-6)
  m = masking.num_masked(0.25, heat.shape[1])
  top = np.argsort(-np.asarray(heat), axis=1)[:, :m]
  assert np.asarray(chosen).sum(1).tolist() == [m, m]
  assert all(set(top[i]) == set(np.flatnonzero(chosen[i])) for i in range(2))
  paths = visualize.attention_figures(model, params, split, str(tmp_path / "fig"), num_sets=2)
  assert paths == [str(tmp_path / "fig.png")] and os.path.getsize(paths[0]) > 1000
