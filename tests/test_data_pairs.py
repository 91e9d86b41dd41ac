"""Pre-training pairs reader: path joining, caption cleaning, bad-input policy."""

import json
import os

import pytest
from PIL import Image

from contextblip_jax.data import pairs


def _setup(tmp_path, entries):
  root = tmp_path / "imgs"
  (root / "coco").mkdir(parents=True, exist_ok=True)
  for name in ("coco/a.jpg", "coco/b.jpg"):
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / name)
  path = tmp_path / "coco.json"
  path.write_text(json.dumps(entries))
  return str(path), str(root)


def test_paths_and_captions(tmp_path):
  absolute = str(tmp_path / "imgs" / "coco" / "b.jpg")
  long_caption = " ".join(f"w{i}" for i in range(40))
  path, root = _setup(tmp_path, [
      {"image": "coco/a.jpg", "caption": "A Dog (running)!  on grass."},
      {"image": absolute, "caption": long_caption}])
  data = pairs.read_pairs(path, root)
  assert [e.image_path for e in data.examples] == [os.path.join(root, "coco/a.jpg"), absolute]
  assert data.examples[0].caption == "a dog running on grass"
  assert data.examples[0].raw_caption == "A Dog (running)!  on grass."
  assert data.examples[1].caption.split(" ") == [f"w{i}" for i in range(30)]
  assert [e.pair_id for e in data.examples] == ["coco.json:0", "coco.json:1"]
  # two files, default image root = each JSON's directory
  other = tmp_path / "imgs" / "vg.json"
  other.write_text(json.dumps([{"image": "coco/b.jpg", "caption": "x"}]))
  both = pairs.read_pairs([path, str(other)], [root, None])
  assert both.examples[-1].image_path == os.path.join(root, "coco/b.jpg")


@pytest.mark.parametrize("entry, reason", [
    ({"image": "coco/a.jpg"}, "'caption' must be a string"),
    ({"image": "coco/a.jpg", "caption": 3}, "'caption' must be a string"),
    ({"image": "coco/a.jpg", "caption": " .!; "}, "empty after cleaning"),
    ({"image": "", "caption": "x"}, "'image' must be"),
    ({"image": "coco/zz.jpg", "caption": "x"}, "not found"),
    ("just a string", "expected an object"),
])
def test_bad_entries(tmp_path, entry, reason):
  path, root = _setup(tmp_path, [{"image": "coco/a.jpg", "caption": "ok"}, entry])
  with pytest.raises(pairs.PairsDataError, match=rf"coco\.json: entry 1: .*{reason}"):
    pairs.read_pairs(path, root)
  data = pairs.read_pairs(path, root, on_error="skip")
  assert len(data.examples) == 1 and data.num_skipped == 1
  assert data.skipped[0].index == 1 and reason.strip("'") in data.skipped[0].reason


def test_bad_files_and_decode_check(tmp_path):
  path, root = _setup(tmp_path, {"image": "coco/a.jpg"})
  with pytest.raises(pairs.PairsDataError, match="expected a list"):
    pairs.read_pairs(path, root, on_error="skip")
  path, root = _setup(tmp_path, [{"image": "coco/a.jpg", "caption": "x"}])
  with open(os.path.join(root, "coco/a.jpg"), "wb") as f:
    f.write(b"not an image")
  assert len(pairs.read_pairs(path, root).examples) == 1          # existence only
  with pytest.raises(pairs.PairsDataError, match="a.jpg"):
    pairs.read_pairs(path, root, check_images="decode")
