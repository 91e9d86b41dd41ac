"""IMAGECODE reader: real annotation files (JSON only) and a generated stand-in image tree."""

import json
import os

import numpy as np
import pytest
import yaml
from PIL import Image

from contextblip_jax.data import preprocess
from contextblip_jax.data import imagecode as ic

VIDEO = "MSR-VTT-videoTrainValVideo_video1-shot1_0"
STATIC = "open-images-1_abc"
VIDEO_FRAMES = [0, 2, 4, 6, 8, 10, 12, 14, 16, 18]   # string order would put img10 first


# --------------------------------------------------------------------------- real files

def test_real_annotation_counts(imagecode_dir):
  train = ic.read_imagecode_dir(imagecode_dir, "train", check_images=False)
  valid = ic.read_imagecode_dir(imagecode_dir, "valid", check_images=False)
  test = ic.read_imagecode_dir(imagecode_dir, "test", check_images=False)
  assert (len(train.sets), len(train.examples)) == (7317, 16594)
  assert (len(valid.sets), len(valid.examples)) == (1039, 2302)
  assert (len(test.sets), len(test.examples)) == (1046, 2306)
  assert sum(e.is_video for e in valid.examples) == 1872
  assert sum(not e.is_video for e in valid.examples) == 430
  assert sum(e.is_video for e in train.examples) == 13093
  assert train.labelled and valid.labelled and not test.labelled
  assert {e.label for e in test.examples} == {-1}
  assert {e.label for e in train.examples} == set(range(10))
  # phenomenon tags: 2,275 yaml entries, 2 name golds absent from valid_data.json
  assert valid.summary()["tagged"] == 782
  assert [u.entry for u in valid.unmatched_annotations] == [
      "MSR-VTT-videoTestVideo_video9053-shot1_8/3", "MSR-VTT-videoTestVideo_video9053-shot1_8/4"]
  assert not valid.skipped and not train.skipped
  tags = {t for e in valid.examples for t in e.tags}
  assert tags == set(ic.PHENOMENON_TAGS)
  # per-set grouping and file order of descriptions
  with open(os.path.join(imagecode_dir, "test_data_unlabeled.json")) as f:
    raw = json.load(f)
  first = test.sets[0]
  assert [test.examples[i].description for i in first.example_indices] == raw[first.set_name]
  assert all(test.examples[i].set_index == 0 for i in first.example_indices)
  assert test.examples[first.example_indices[-1]].example_id == (
      f"{first.set_name}#{len(first.example_indices) - 1}")


# --------------------------------------------------------------------------- stand-in tree

def _jpeg(path, value, mode="RGB"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new(mode, (12, 10), value if mode != "RGB" else (value, 255 - value, 7)).save(path)


def _tree(root, sets):
  """sets: {name: frame numbers}; pixel red = 20 * position in numeric order."""
  for name, frames in sets.items():
    for pos, k in enumerate(sorted(frames)):
      _jpeg(os.path.join(root, "image-sets", name, f"img{k}.jpg"), 20 * pos)


def _write(root, name, obj):
  path = os.path.join(root, name)
  with open(path, "w") as f:
    (yaml.safe_dump if name.endswith(".yaml") else json.dump)(obj, f)
  return path


@pytest.fixture()
def tree(tmp_path):
  root = str(tmp_path)
  _tree(root, {VIDEO: VIDEO_FRAMES, STATIC: range(10)})
  _write(root, "train_data.json", {VIDEO: {"5": "the man waves", "9": "last one"},
                                   STATIC: {"0": "A red car."}})
  _write(root, "test_data_unlabeled.json", {VIDEO: ["first", "second"]})
  return root


def test_standin_order_labels_and_grouping(tree):
  split = ic.read_imagecode_dir(tree, "train")
  assert [e.example_id for e in split.examples] == [f"{VIDEO}#0", f"{VIDEO}#1", f"{STATIC}#0"]
  video = split.examples[0]
  assert video.is_video and not split.examples[2].is_video
  assert [os.path.basename(p) for p in video.image_paths] == [f"img{k}.jpg" for k in VIDEO_FRAMES]
  assert video.label == 5 and video.description == "the man waves"
  # the gold's pixels are those written at numeric position 5 (img10.jpg)
  gold = preprocess.open_rgb(video.image_paths[video.label])
  assert abs(int(np.asarray(gold)[0, 0, 0]) - 100) <= 3
  assert [s.set_name for s in split.sets] == [VIDEO, STATIC]
  assert split.sets[0].example_indices == (0, 1) and split.sets[1].example_indices == (2,)
  pixels = ic.load_candidates(split.sets[0].image_paths, 16)
  assert pixels.shape == (10, 16, 16, 3) and pixels.dtype == np.float32
  test = ic.read_imagecode_dir(tree, "test")
  assert [e.label for e in test.examples] == [-1, -1] and not test.labelled


def _bad(root, fname, obj, match, skipped_desc, **kw):
  path = _write(root, fname, obj)
  with pytest.raises(ic.ImagecodeDataError, match=match) as err:
    ic.read_imagecode(path, os.path.join(root, "image-sets"), **kw)
  assert path in str(err.value) or "image-sets" in str(err.value)
  split = ic.read_imagecode(path, os.path.join(root, "image-sets"), on_error="skip", **kw)
  assert split.num_skipped_descriptions == skipped_desc and len(split.skipped) >= 1
  return split


def test_bad_descriptions_and_labels(tree):
  split = _bad(tree, "a.json", {VIDEO: {"3": "", "4": "fine"}}, r"a\.json.*3.*non-empty", 1)
  assert [e.description for e in split.examples] == ["fine"]
  _bad(tree, "b.json", {VIDEO: {"10": "x", "2": "ok"}}, r"0-9, got '10'", 1)
  _bad(tree, "c.json", {VIDEO: {"x": "x"}}, r"label must be", 1)
  _bad(tree, "d.json", {VIDEO: {"1": 7}}, r"non-empty string", 1)
  _bad(tree, "e.json", {VIDEO: ["a", None]}, r"e\.json.*/1", 1)
  _bad(tree, "f.json", {VIDEO: {}, STATIC: {"1": "ok"}}, r"no descriptions", 0)


def test_bad_schema_raises_always(tree):
  for name, obj, match in [("g.json", [1, 2], "top level"),
                           ("h.json", {VIDEO: {"1": "a"}, STATIC: ["b"]}, "must all be objects")]:
    path = _write(tree, name, obj)
    for policy in ("raise", "skip"):
      with pytest.raises(ic.ImagecodeDataError, match=match):
        ic.read_imagecode(path, check_images=False, on_error=policy)
  with open(os.path.join(tree, "i.json"), "w") as f:
    f.write("{not json")
  with pytest.raises(ic.ImagecodeDataError, match=r"i\.json: not valid JSON"):
    ic.read_imagecode(os.path.join(tree, "i.json"), check_images=False)


def test_bad_image_sets(tree):
  _bad(tree, "j.json", {"video-storytelling-missing": {"1": "x"}, VIDEO: {"1": "y"}},
       r"video-storytelling-missing.*not found", 1)
  os.remove(os.path.join(tree, "image-sets", STATIC, "img3.jpg"))
  split = _bad(tree, "k.json", {STATIC: {"1": "x", "2": "y"}, VIDEO: {"0": "z"}},
               r"expected 10 img<k> images, found 9", 2)
  assert [e.set_name for e in split.examples] == [VIDEO]
  _jpeg(os.path.join(tree, "image-sets", STATIC, "img3.jpg"), 0)
  with open(os.path.join(tree, "image-sets", STATIC, "img4.jpg"), "wb") as f:
    f.write(b"\xff\xd8\xff\xe0 truncated")            # corrupt JPEG
  split = ic.read_imagecode(_write(tree, "l.json", {STATIC: {"1": "x"}}),
                            os.path.join(tree, "image-sets"))        # layout check passes
  with pytest.raises(preprocess.ImageLoadError, match="img4.jpg"):      # found at load time
    ic.load_candidates(split.sets[0].image_paths, 8)
  _bad(tree, "l.json", {STATIC: {"1": "x"}}, r"img4\.jpg", 1, check_images="decode")


def test_non_rgb_images_load_as_rgb(tree):
  _jpeg(os.path.join(tree, "image-sets", STATIC, "img0.jpg"), 90, mode="L")
  Image.new("CMYK", (12, 10), (0, 50, 100, 0)).save(
      os.path.join(tree, "image-sets", STATIC, "img1.jpg"))
  split = ic.read_imagecode(_write(tree, "m.json", {STATIC: {"1": "x"}}),
                            os.path.join(tree, "image-sets"), check_images="decode")
  assert ic.load_candidates(split.sets[0].image_paths, 8).shape == (10, 8, 8, 3)


def test_annotations(tree):
  ann = {VIDEO: {"5": {"description": "the man waves", "annotation": ",neg, t",
                       "visualization_id": "0"},
                 "7": {"description": "gone", "annotation": "con", "visualization_id": "1"}}}
  split = ic.read_imagecode_dir(tree, "train", annotation_path=_write(tree, "a.yaml", ann))
  assert split.examples[0].tags == ("neg", "t") and split.examples[1].tags == ()
  assert [u.entry for u in split.unmatched_annotations] == [f"{VIDEO}/7"]
  assert split.tags_by_gold() == {(VIDEO, 5): ("neg", "t")}
  unknown_set = dict(ann, **{"open-images-9_zzz": {"1": {"annotation": "q"}}})
  path = _write(tree, "b.yaml", unknown_set)
  with pytest.raises(ic.ImagecodeDataError, match=r"b\.yaml.*open-images-9_zzz.*not in"):
    ic.read_imagecode_dir(tree, "train", annotation_path=path)
  split = ic.read_imagecode_dir(tree, "train", annotation_path=path, on_error="skip")
  assert [s.entry for s in split.skipped] == ["open-images-9_zzz"]
  assert split.examples[0].tags == ("neg", "t")
  path = _write(tree, "c.yaml", {VIDEO: {"5": {"annotation": "con,colour"}}})
  with pytest.raises(ic.ImagecodeDataError, match=r"unknown tags \['colour'\]"):
    ic.read_imagecode_dir(tree, "train", annotation_path=path)
  with pytest.raises(ic.ImagecodeDataError, match="unlabelled"):
    ic.read_imagecode_dir(tree, "test", annotation_path=_write(tree, "a.yaml", ann))


# --------------------------------------------------------------------------- splits from config

def _data_cfg(root, **kw):
  import ml_collections
  d = dict(imagecode_dir=root, image_root="", annotation_yaml="", on_error="raise")
  d.update(kw)
  return ml_collections.ConfigDict({"data": d})


def test_split_paths_defaults_and_errors(tree):
  json_path, image_root, tags = ic.split_paths(_data_cfg(tree), "train")
  assert json_path == os.path.join(tree, "train_data.json")
  assert image_root == os.path.join(tree, "image-sets") and tags is None
  assert ic.split_paths(_data_cfg(tree), "valid")[2] is None          # no default yaml: none
  _write(tree, ic.ANNOTATION_FILE, {})
  assert ic.split_paths(_data_cfg(tree), "valid")[2] == os.path.join(tree, ic.ANNOTATION_FILE)
  assert ic.split_paths(_data_cfg(tree), "test")[2] is None            # tags: valid only
  with pytest.raises(ValueError, match="imagecode_dir is required"):
    ic.split_paths(_data_cfg(""), "train")
  with pytest.raises(ValueError, match="unknown split 'dev'"):
    ic.split_paths(_data_cfg(tree), "dev")
  with pytest.raises(FileNotFoundError, match="annotation_yaml.*nope.yaml"):
    ic.split_paths(_data_cfg(tree, annotation_yaml=os.path.join(tree, "nope.yaml")), "valid")
  split = ic.load_split(_data_cfg(tree), "train")
  assert len(split.examples) == 3 and split.examples[0].image_paths


def test_first_sets_renumbers_examples_and_sets(tree):
  _write(tree, "train_data.json", {STATIC: {"0": "a"}, VIDEO: {"5": "b", "9": "c"}})
  split = ic.load_split(_data_cfg(tree), "train")
  assert [s.set_name for s in split.sets] == [STATIC, VIDEO]
  one = ic.first_sets(split, 1)
  assert [e.description for e in one.examples] == ["a"]
  assert [s.example_indices for s in one.sets] == [(0,)]
  # renumbering: a split whose kept sets' examples are not a prefix of the original list
  reordered = ic.ImagecodeSplit(split.source, True, split.examples,
                                [split.sets[1], split.sets[0]], [], [])
  two = ic.first_sets(reordered, 5)
  assert [e.description for e in two.examples] == ["b", "c", "a"]
  assert [e.set_index for e in two.examples] == [0, 0, 1]
  assert [s.example_indices for s in two.sets] == [(0, 1), (2,)]
  assert all(two.examples[i].set_name == s.set_name for s in two.sets for i in s.example_indices)
  assert len(split.examples) == 3 and split.examples[0].set_index == 0     # input untouched


def test_skipped_records_account_for_every_left_out_description(tree):
  _write(tree, "train_data.json", {VIDEO: {"5": "ok", "7": ""}, "open-images-gone": {"1": "x",
                                                                                   "2": "y"}})
  split = ic.load_split(_data_cfg(tree, on_error="skip"), "train")
  assert [e.description for e in split.examples] == ["ok"]
  recs = ic.skipped_records(split)
  assert [(r["set"], r["index"], r["gold"], r["description"]) for r in recs] == [
      (VIDEO, 1, 7, ""), ("open-images-gone", 0, 1, "x"), ("open-images-gone", 1, 2, "y")]
  assert all(r["pred"] is None and r["scores"] is None and r["skipped"] for r in recs)
  assert [r["static"] for r in recs] == [False, True, True]
  assert ic.skipped_records(ic.load_split(_data_cfg(tree, on_error="skip"), "test")) == []
