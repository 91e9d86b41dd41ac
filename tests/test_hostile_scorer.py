"""Hostile scoring input (issue 12, item 11): an edited model.json is checked against the
parameter shapes, an invalid one names the file, 16-bit and float images are scaled (or
refused when out of range) instead of turning white or black, and a description with no word
is refused (not scored)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from contextblip_jax.data import preprocess
from contextblip_jax.evaluation.scorer import Scorer, main
from contextblip_jax.storage.param_dir import load_param_dir
from tests.helpers.checkpoints import make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return make_tiny_checkpoint(tmp_path_factory.mktemp("score"))


def _edit_model_json(ckpt, tmp_path, edit):
  import shutil
  d = str(tmp_path / "edited")
  shutil.copytree(ckpt, d)
  path = os.path.join(d, "model.json")
  with open(path) as f:
    model = json.load(f)
  text = edit(model)
  with open(path, "w") as f:
    f.write(text if isinstance(text, str) else json.dumps(model))
  return d


def test_model_json_not_matching_the_parameters_is_refused(ckpt, tmp_path, capsys):
  def wider_mlp(m):
    m["blip"]["vision"]["mlp_dim"] *= 2
  d = _edit_model_json(ckpt, tmp_path / "a", wider_mlp)
  with pytest.raises(ValueError, match=r"model\.json does not describe the parameters.*shape"):
    Scorer.from_dir(d)
  img = tmp_path / "x.png"
  Image.new("RGB", (32, 32), (10, 20, 30)).save(img)
  assert main(["--checkpoint", d, "--text", "a dog", str(img)]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "model.json" in err and "Traceback" not in err


def test_invalid_model_json_names_the_file(ckpt, tmp_path):
  d = _edit_model_json(ckpt, tmp_path / "b", lambda m: "{not json")
  with pytest.raises(ValueError, match=r"edited/model\.json: not valid JSON"):
    load_param_dir(d)

  def unknown(m):
    m["surprise"] = 1
  d = _edit_model_json(ckpt, tmp_path / "c", unknown)
  with pytest.raises(ValueError, match=r"model\.json: not a valid model description.*surprise"):
    load_param_dir(d)


def test_punctuation_only_and_empty_descriptions_are_refused(ckpt):
  scorer = Scorer.from_dir(ckpt)
  for text in ("", "   ", "?!...", "--"):
    with pytest.raises(ValueError, match="no word to score"):
      scorer.encode_text(text)
  assert scorer.encode_text("a dog!")[0] == "a dog"


def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path):
  ramp = np.linspace(0, 1, 64 * 64).reshape(64, 64)
  eight = np.round(ramp * 255).astype(np.uint8)
  p16 = str(tmp_path / "g16.png")
  Image.fromarray(np.round(ramp * 65535).astype(np.uint16)).save(p16)
  assert Image.open(p16).mode.startswith("I")
  got = np.asarray(preprocess.open_rgb(p16))
  assert got.shape == (64, 64, 3) and np.abs(got[..., 0].astype(int) - eight).max() <= 1
  assert got.min() == 0 and got.max() == 255                    # not all white
  pf = str(tmp_path / "f.tiff")
  Image.fromarray(ramp.astype(np.float32), "F").save(pf)
  got = np.asarray(preprocess.open_rgb(pf))
  assert np.abs(got[..., 1].astype(int) - eight).max() <= 1     # not black / white
  bad = str(tmp_path / "hdr.tiff")
  Image.fromarray((ramp * 40).astype(np.float32), "F").save(bad)
  with pytest.raises(preprocess.ImageLoadError, match=r"hdr\.tiff.*outside \[0, 1\]"):
    preprocess.open_rgb(bad)
