"""Synthetic IMAGECODE-layout generator: layout, schema, determinism, description truth."""

import hashlib
import json
import os

import numpy as np
import pytest
import yaml

from contextblip_jax.data import imagecode as ic
from contextblip_jax.data import pairs as pairs_lib
from contextblip_jax.data import synthetic
from contextblip_jax.data import synthetic_scenes as sc

SIZES = dict(n_train_sets=24, n_valid_sets=16, n_test_sets=6, n_pairs=200)


def _digest(root):
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      p = os.path.join(d, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
  base = tmp_path_factory.mktemp("synthetic")
  summary = synthetic.generate(str(base / "a"), seed=3, **SIZES)
  return str(base / "a"), summary


def test_deterministic_and_atomic(generated, tmp_path):
  root, summary = generated
  again = synthetic.main(["--out", str(tmp_path / "b"), "--seed", "3"] +
                         [f"--{k}={v}" for k, v in SIZES.items()])
  assert _digest(root) == _digest(str(tmp_path / "b"))
  assert again["splits"] == summary["splits"]
  with pytest.raises(FileExistsError):
    synthetic.generate(str(tmp_path / "b"), seed=3, **SIZES)
  synthetic.generate(str(tmp_path / "b"), seed=4, overwrite=True, **SIZES)
  assert _digest(str(tmp_path / "b"))["valid_data.json"] != _digest(root)["valid_data.json"]
  assert sorted(os.listdir(tmp_path)) == ["b"]                  # no temporary leftovers
  with pytest.raises(TypeError, match="unknown generator parameters"):
    synthetic.generate(str(tmp_path / "c"), n_sets=3)


def test_imagecode_layout_and_schema(generated):
  root, summary = generated
  for split in ("train", "valid", "test"):
    data = ic.read_imagecode_dir(root, split, check_images="decode")
    s = summary["splits"][split]
    assert (len(data.sets), len(data.examples)) == (s["sets"], s["descriptions"])
    assert not data.skipped and not data.unmatched_annotations
    assert sum(e.is_video for e in data.examples) == s["video_descriptions"]
    assert data.labelled == (split != "test")
  valid = ic.read_imagecode_dir(root, "valid")
  assert all(e.tags and set(e.tags) <= set(ic.PHENOMENON_TAGS) for e in valid.examples)
  assert sum("con" in e.tags for e in valid.examples) == summary["splits"]["valid"][
      "context_descriptions"] > 0
  with open(os.path.join(root, "manual_annotation_valid.yaml")) as f:
    ann = yaml.safe_load(f)
  one = next(iter(ann.values()))
  assert set(next(iter(one.values()))) == {"description", "annotation", "visualization_id"}
  kinds = {"static": 0, "video": 0, "reordered": 0}
  for s in valid.sets:
    names = [os.path.basename(p) for p in s.image_paths]
    frames = [int(n[3:-4]) for n in names]
    assert frames == sorted(frames) and len(set(frames)) == 10
    if s.is_video:
      assert s.set_name.startswith("synthvideo-") and np.all(np.diff(frames) == 3)
      kinds["video"] += 1
      kinds["reordered"] += sorted(names) != names        # img2 < img11 numerically only
    else:
      assert "open-images" in s.set_name and frames == list(range(10))
      kinds["static"] += 1
    golds = [valid.examples[i].label for i in s.example_indices]
    assert len(set(golds)) == len(golds) and 1 <= len(golds) <= 3
  assert kinds["static"] > 0 and kinds["video"] > 0 and kinds["reordered"] == kinds["video"]
  with open(os.path.join(root, "test_data_unlabeled.json")) as f:
    assert all(isinstance(v, list) for v in json.load(f).values())


def test_pairs_teach_the_description_vocabulary(generated):
  root, _ = generated
  data = pairs_lib.read_pairs(os.path.join(root, "pairs.json"), check_images="decode")
  assert len(data.examples) == SIZES["n_pairs"] and not data.skipped
  words = {w for e in data.examples for w in e.caption.split()}
  vocab = set(sc.COLOUR_NAMES) | set(sc.SHAPES) | {"two", "three", "top", "bottom", "left",
                                                  "right", "middle", "large", "small", "no"}
  assert vocab <= words


def test_every_description_is_true_in_exactly_its_gold():
  for i in range(40):
    rng = np.random.default_rng([7, i])
    video = i % 2 == 0
    kind, cands, descs = synthetic.make_set(rng, video, context_fraction=0.5)
    assert len(cands) == 10 and descs
    assert len({d.gold for d in descs}) == len(descs)
    for d in descs:
      assert sum(d.truth) == 1 and d.truth[d.gold]
      assert set(d.tags) <= set(ic.PHENOMENON_TAGS)
      assert ("con" in d.tags) == (d.kind in {"extreme_position", "extreme_size", "most_count",
                                              "odd_colour", "closest", "temporal_visibility",
                                              "temporal_colour", "temporal_count"})


def test_scene_facts_and_rendering():
  red = sc.Obj(0, "circle", "red", 1 / 6, 1 / 2, 0.15)
  img = np.asarray(sc.render([red], 48)).astype(int)
  reddish = (img[..., 0] > 150) & (img[..., 1] < 90)
  ys, xs = np.nonzero(reddish)
  assert xs.max() < 16 and 16 <= ys.mean() < 32                  # left column, middle row
  assert sc.cell_of(red) == (0, 1) and sc.cell_of(red.with_(x=0.34)) is None
  # a video where a triangle is visible in frames 3..6 and a square never moves
  square = sc.Obj(1, "square", "blue", 0.5, 0.5, 0.11)
  tri = sc.Obj(2, "triangle", "yellow", 0.8, 0.2, 0.11)
  frames = [(square, tri.with_(visible=3 <= j <= 6)) for j in range(10)]
  descs = {d.text: d.gold for d in sc.context_descriptions(
      frames, synthetic.referents(frames), True, np.random.default_rng(0))}
  assert descs["the first frame where the yellow triangle is visible"] == 3
  assert descs["the last frame where the yellow triangle can be seen"] == 6
  assert descs["the frame just before the triangle appears"] == 2
  assert descs["the frame right after the yellow triangle disappears"] == 7
  # absolute cues are ambiguous here: "there is a yellow triangle" holds in 4 frames
  absolute = sc.absolute_descriptions(frames, synthetic.referents(frames),
                                      np.random.default_rng(0))
  exists = [d for d in absolute if d.kind == "exists" and "yellow triangle" in d.text]
  assert exists and sum(exists[0].truth) == 4 and exists[0].gold is None


def test_ensure_reuses_or_regenerates(generated, tmp_path):
  root, summary = generated
  before = _digest(root)
  again = synthetic.ensure(root, seed=3, **SIZES)             # same parameters: reused
  assert again["splits"] == summary["splits"] and again["seconds"] == 0.0
  assert _digest(root) == before
  other = tmp_path / "x"
  synthetic.ensure(str(other), seed=3, **SIZES)
  assert _digest(str(other)) == before
  synthetic.ensure(str(other), seed=5, **SIZES)               # other seed: regenerated
  assert _digest(str(other))["train_data.json"] != before["train_data.json"]
  (tmp_path / "plain").mkdir()
  with pytest.raises(FileExistsError, match="not a synthetic dataset"):
    synthetic.ensure(str(tmp_path / "plain"), seed=3, **SIZES)
