"""`python -m contextblip_jax.data.prepare`: raw downloads (image-sets.zip, BLIP/ALBEF pair JSONs
with the authors' path prefixes) -> the layout the configs read, and the TFDS datasets."""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np
from PIL import Image

from contextblip_jax.data import imagecode, pairs
from contextblip_jax.data.prepare import main

SETS = {"MSR-VTT-videoTrainValVideo_video1-shot1_0": {"3": "a man raises his hand"},
        "open-images-1_aa": {"7": "a red car, no people", "0": "a blue sky"}}
PREFIX = "/export/share/datasets/vision/coco/images/"


def _raw_downloads(tmp_path):
  """A two-set image-sets.zip (entries under image-sets/), its annotations, a pair JSON."""
  ann = tmp_path / "ann"
  ann.mkdir()
  (ann / "valid_data.json").write_text(json.dumps(SETS))
  (ann / "train_data.json").write_text(json.dumps({"open-images-1_aa": {"1": "grass"}}))
  zpath = tmp_path / "image-sets.zip"
  rng = np.random.default_rng(0)
  with zipfile.ZipFile(zpath, "w") as z:
    for s in SETS:
      for k in (0, 2, 5, 7, 9, 10, 12, 20, 31, 40):       # video frame numbers: numeric order
        img = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
        path = tmp_path / "tmp.jpg"
        img.save(path)
        z.write(path, f"image-sets/{s}/img{k}.jpg")
  coco = tmp_path / "coco_images" / "val2014"
  coco.mkdir(parents=True)
  coco2 = tmp_path / "coco_images2" / "val2014"        # one prefix, two folders (like VG's)
  coco2.mkdir(parents=True)
  for i in range(3):
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
        (coco2 if i == 2 else coco) / f"{i}.jpg")
  pj = tmp_path / "coco.json"
  pj.write_text(json.dumps([{"image": f"{PREFIX}val2014/{i}.jpg", "caption": f"A cat {i}!"}
                            for i in range(3)]))
  return ann, zpath, pj


def test_prepare_turns_raw_downloads_into_what_the_configs_read(tmp_path, capsys):
  ann, zpath, pj = _raw_downloads(tmp_path)
  out = tmp_path / "ready"
  argv = ["--out", str(out), "--imagecode_images", str(zpath), "--imagecode_annotations",
          str(ann), "--pairs", str(pj), "--pairs_remap",
          f"{PREFIX}={tmp_path / 'coco_images'}/", "--pairs_remap",
          f"{PREFIX}={tmp_path / 'coco_images2'}/", "--tfds"]
  assert main(argv) == 0
  log = capsys.readouterr().out
  assert "extract image-sets: 20/20 (100%)" in log and "check valid sets: 2/2 (100%)" in log
  assert f"--config.data.imagecode_dir={out / 'imagecode'}" in log
  # The plain readers the configs use accept the result.
  valid = imagecode.read_imagecode_dir(str(out / "imagecode"), "valid")
  assert len(valid.examples) == 3
  assert [os.path.basename(p) for p in valid.examples[0].image_paths][:3] == [
      "img0.jpg", "img2.jpg", "img5.jpg"]
  read = pairs.read_pairs([str(out / "pairs" / "coco.json")])
  assert [e.caption for e in read.examples] == ["a cat 0", "a cat 1", "a cat 2"]
  assert "coco_images2" in read.examples[2].image_path
  summary = json.loads((out / "prepared.json").read_text())
  assert summary["imagecode"]["valid"] == {"sets": 2, "complete": 2}
  assert summary["pairs"]["coco.json"] == {"pairs": 3, "kept": 3, "missing_images": 0}
  # array_record datasets, one record per description / pair.
  for name, n in (("imagecode", {"train": 1, "valid": 3}), ("pairs", {"train": 3})):
    files = os.listdir(summary["tfds"][name])
    for split, count in n.items():
      assert any(f.endswith(f"-{split}.array_record-00000-of-00001") for f in files), files
    info = json.loads(open(os.path.join(summary["tfds"][name], "dataset_info.json")).read())
    got = {s["name"]: int(s["shardLengths"][0]) for s in info["splits"]}
    assert got == n
  # A rerun reuses the extracted images.
  assert main(argv[:4] + ["--imagecode_annotations", str(ann)]) == 0
  assert "image-sets: reusing" in capsys.readouterr().out


def test_missing_images_and_bad_zip_are_user_errors(tmp_path, capsys):
  ann, zpath, pj = _raw_downloads(tmp_path)
  assert main(["--out", str(tmp_path / "a"), "--pairs", str(pj)]) == 2
  err = capsys.readouterr().err
  assert "coco.json: 3 of 3 images not found" in err and "--pairs_remap" in err
  assert main(["--out", str(tmp_path / "b"), "--pairs", str(pj), "--skip_missing_images"]) == 0
  assert json.loads((tmp_path / "b" / "pairs" / "coco.json").read_text()) == []
  bad = tmp_path / "bad.zip"
  bad.write_bytes(b"not a zip")
  assert main(["--out", str(tmp_path / "c"), "--imagecode_images", str(bad),
               "--imagecode_annotations", str(ann)]) == 2
  assert "bad.zip: not a zip file" in capsys.readouterr().err
  with zipfile.ZipFile(zpath, "a") as z:                # a set with 9 images
    z.writestr("image-sets/open-images-2_bb/img0.jpg", b"x")
  (ann / "valid_data.json").write_text(json.dumps({**SETS, "open-images-2_bb": {"0": "x"}}))
  assert main(["--out", str(tmp_path / "d"), "--imagecode_images", str(zpath),
               "--imagecode_annotations", str(ann)]) == 2
  assert "valid/open-images-2_bb (1 images)" in capsys.readouterr().err
