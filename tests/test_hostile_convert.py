"""Hostile conversions (issue 12, items 1, 10, 12): `--overwrite` never destroys the source
or a directory this project did not write; NaN / Inf / integer tensors and shard indexes that
point outside the model directory (or are not an object) are refused naming the key or file;
bad input exits with status 2."""

import json
import os
import shutil

import numpy as np
import pytest

from tests.helpers import torch_reference as tr
from contextblip_jax.storage.param_dir import load_param_dir
from weight_convert.__main__ import main
from weight_convert.loaders import ConversionError, load_source


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("src")
  return tr.save_hf_dir(tr.build_hf_model(tr.hf_config(), seed=0), str(d / "hf"))


def _tree(path):
  return sorted(os.path.relpath(os.path.join(r, f), path)
                for r, _, fs in os.walk(path) for f in fs)


def test_convert_overwrite_never_deletes_the_source_or_its_siblings(hf_dir, tmp_path, capsys):
  parent = tmp_path / "P"
  shutil.copytree(hf_dir, parent / "model")
  (parent / "sibling.txt").write_text("keep me")
  before = _tree(str(parent))
  for out in (parent, parent / "model"):
    assert main(["--src", str(parent / "model"), "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "refusing to replace" in err and str(out) in err
  assert _tree(str(parent)) == before
  arbitrary = tmp_path / "photos"
  arbitrary.mkdir()
  (arbitrary / "cat.jpg").write_text("x")
  assert main(["--src", hf_dir, "--out", str(arbitrary), "--overwrite"]) == 2
  assert "no marker" in capsys.readouterr().err and (arbitrary / "cat.jpg").exists()
  out = tmp_path / "ckpt"
  assert main(["--src", hf_dir, "--out", str(out)]) == 0
  assert main(["--src", hf_dir, "--out", str(out), "--overwrite"]) == 0   # ours: replaced
  assert load_param_dir(str(out)).model.blip.vision.width == 32


def test_export_overwrite_never_replaces_the_checkpoint_it_reads(hf_dir, tmp_path, capsys):
  ckpt = tmp_path / "ckpt"
  assert main(["--src", hf_dir, "--out", str(ckpt)]) == 0
  before = _tree(str(ckpt))
  assert main(["export", "--checkpoint", str(ckpt), "--out", str(ckpt), "--overwrite"]) == 2
  assert "is the source" in capsys.readouterr().err and _tree(str(ckpt)) == before
  hf_out = tmp_path / "hf_out"
  assert main(["export", "--checkpoint", str(ckpt), "--out", str(hf_out)]) == 0
  assert main(["export", "--checkpoint", str(ckpt), "--out", str(hf_out), "--overwrite"]) == 0
  assert main(["export", "--checkpoint", str(ckpt), "--out", hf_dir, "--overwrite"]) == 2
  assert "no marker" in capsys.readouterr().err                 # someone else's HF dir


def _edited_copy(hf_dir, tmp_path, edit):
  from safetensors.numpy import load_file, save_file
  d = tmp_path / "edited"
  shutil.copytree(hf_dir, d)
  sd = load_file(str(d / "model.safetensors"))
  edit(sd)
  save_file(sd, str(d / "model.safetensors"))
  return str(d)


def test_nan_inf_and_integer_tensors_are_refused_naming_the_key(hf_dir, tmp_path):
  key = "vision_model.post_layernorm.weight"

  def nan(sd):
    sd[key] = sd[key].copy()
    sd[key][0] = np.nan
  with pytest.raises(ConversionError, match=rf"'{key}' holds 1 NaN or infinite"):
    from weight_convert.converter import to_flax
    to_flax(load_source(_edited_copy(hf_dir, tmp_path / "a", nan)))

  def integer(sd):
    sd[key] = np.ones(sd[key].shape, np.int64)
  with pytest.raises(ConversionError, match=rf"'{key}' has dtype int64"):
    to_flax(load_source(_edited_copy(hf_dir, tmp_path / "b", integer)))

  def inf(sd):
    k = "text_encoder.embeddings.word_embeddings.weight"
    sd[k] = sd[k].copy()
    sd[k][3, 1] = -np.inf
  with pytest.raises(ConversionError, match="word_embeddings.weight' holds 1 NaN or infinite"):
    to_flax(load_source(_edited_copy(hf_dir, tmp_path / "c", inf)))


def _sharded(hf_dir, tmp_path, index):
  d = tmp_path / "sharded"
  d.mkdir(parents=True)
  shutil.copy(os.path.join(hf_dir, "config.json"), d / "config.json")
  shutil.copy(os.path.join(hf_dir, "model.safetensors"), d / "part.safetensors")
  with open(d / "model.safetensors.index.json", "w") as f:
    json.dump(index, f)
  return str(d)


def test_shard_index_outside_the_directory_or_a_list_is_refused(hf_dir, tmp_path):
  outside = os.path.join(hf_dir, "model.safetensors")   # a real file, but not in the dir
  for i, target in enumerate((outside, "../hf/model.safetensors")):
    d = _sharded(hf_dir, tmp_path / str(i), {"weight_map": {"a": "part.safetensors",
                                                            "b": target}})
    with pytest.raises(ConversionError, match=r"index\.json: shard .* is not a file of the "
                                              r"model directory"):
      load_source(d)
  d = _sharded(hf_dir, tmp_path / "list", ["part.safetensors"])
  with pytest.raises(ConversionError, match=r"index\.json: expected .*weight_map.*got list"):
    load_source(d)
  ok = _sharded(hf_dir, tmp_path / "ok", {"weight_map": {"a": "part.safetensors"}})
  assert load_source(ok).arrays                                   # a proper index still loads
