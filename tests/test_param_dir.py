"""The one parameter format: the converter's output and a stage's export are the same layout,
read by `load_param_dir`; legacy layouts are still read (with a warning); clear errors."""

import hashlib
import json
import logging
import os

import flax
import numpy as np
import pytest

from tests.helpers import torch_reference as tr
from tests.helpers.checkpoints import write_legacy_converted, write_legacy_export
from tests.helpers.loops import make_export, random_params, tiny_model_config
from contextblip_jax.data.tokenizer import VOCAB_PATH
from contextblip_jax.storage import param_dir as pdir
from contextblip_jax.storage import workdir as wd
from weight_convert import convert

LAYOUT = ["model.json", "params", "provenance.json", "vocab.txt"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """A ContextBLIP .pth converted by weight_convert, and a pretrain stage's workdir that
  started from it (its export/ written by workdir.export_params)."""
  root = tmp_path_factory.mktemp("param_dirs")
  src = tr.save_original(tr.contextblip_state_dict(tr.build_hf_model(tr.hf_config(), seed=0)),
                         str(root / "cb.pth"))
  converted = convert(src, str(root / "converted"), vision_heads=4, text_heads=4)
  stage = make_export(root / "pretrain", "pretrain", tree="pretrain", step=5, valid_acc=0.25,
                      init=converted)
  return dict(src=src, converted=converted, stage=stage, root=root)


def _flat(tree):
  return flax.traverse_util.flatten_dict(tree, sep="/")


def _assert_same_params(a, b):
  fa, fb = _flat(a), _flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_converter_and_stage_export_write_one_layout_read_by_one_function(dirs):
  export = os.path.join(dirs["stage"], wd.EXPORT)
  assert sorted(os.listdir(dirs["converted"])) == sorted(os.listdir(export)) == LAYOUT
  conv, stage = pdir.load_param_dir(dirs["converted"]), pdir.load_param_dir(dirs["stage"])
  assert conv.path == dirs["converted"] and stage.path == export
  assert conv.provenance["format"] == stage.provenance["format"] == pdir.FORMAT
  # the converter: the source file, its kind and sha256, the mapping summary
  with open(dirs["src"], "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  assert conv.provenance["writer"] == "weight_convert"
  assert conv.provenance["source"] == {"path": dirs["src"], "format": "contextblip",
                                       "sha256": {"cb.pth": digest}}
  assert conv.provenance["summary"]["ignored_groups"] == {"position_ids": 1}
  assert conv.model.use_adapter and conv.model.adapter_taps == (1, 2, 3, 4)
  assert conv.model.adapter_reduction == 2 and conv.model.blip.vision.width == 32
  assert set(conv.params) == {"pretrained_blip", "vision_adapter"}
  # the stage: name, step, accuracy, time, and where it started from (with its provenance)
  p = stage.provenance
  assert (p["writer"], p["stage"], p["step"], p["valid_acc"]) == ("train", "pretrain", 5, 0.25)
  assert p["time"] > 0 and p["init"]["path"] == dirs["converted"]
  assert p["init"]["provenance"]["source"]["sha256"] == {"cb.pth": digest}
  assert stage.model == tiny_model_config()
  assert {"pretrained_blip", "vision_adapter", "visual_decoder"} <= set(stage.params)
  with open(os.path.join(export, "model.json")) as f:
    assert json.load(f) == tiny_model_config().to_dict()
  for d in (conv, stage):
    with open(d.vocab_path) as f:
      assert f.readline().strip() == "[PAD]"


def test_export_without_adapter_says_so_in_model_json(tmp_path):
  mc = tiny_model_config()
  params = random_params(mc, "backbone")                  # a backbone stage: BLIP only
  wd.export_params(str(tmp_path), params, "backbone", mc, vocab_path=VOCAB_PATH, step=1)
  got = pdir.load_param_dir(str(tmp_path))
  assert not got.model.use_adapter and set(got.params) == {"pretrained_blip"}
  assert got.model.blip == mc.blip
  with pytest.raises(ValueError, match="use_adapter"):
    pdir.write_param_dir(str(tmp_path / "x"), params, mc, {"writer": "test"},
                         vocab_path=VOCAB_PATH)
  assert not (tmp_path / "x").exists()


def test_rewriting_an_export_replaces_it_whole(tmp_path):
  mc = tiny_model_config()
  for seed in (0, 1):
    wd.export_params(str(tmp_path), random_params(mc, "zero_shot", seed), "pretrain", mc,
                     vocab_path=VOCAB_PATH, step=seed)
  got = pdir.load_param_dir(str(tmp_path))
  assert got.provenance["step"] == 1
  _assert_same_params(got.params, random_params(mc, "zero_shot", 1))
  assert sorted(os.listdir(tmp_path)) == [wd.EXPORT]      # no temporary siblings left


def test_legacy_converter_dir_is_read_with_a_warning(dirs, tmp_path, caplog):
  new = pdir.load_param_dir(dirs["converted"])
  fmt = "contextblip_jax.pretrained/1"
  old = write_legacy_converted(str(tmp_path / fmt.split(".")[1].replace("/", "_")),
                               new.model, new.params, source=f"original:{dirs['src']}",
                               fmt=fmt)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    got = pdir.load_param_dir(old)
  assert "legacy converter layout" in caplog.text
  assert f"python -m weight_convert --src {dirs['src']} --out" in caplog.text
  assert got.model == new.model and got.path == old
  _assert_same_params(got.params, new.params)
  assert got.provenance["legacy"] and got.provenance["format"] == fmt
  assert pdir.describe(got.provenance) == f"legacy:original:{dirs['src']}"
  assert got.vocab_path == os.path.join(old, "vocab.txt")


def test_legacy_stage_export_is_read_with_a_warning(dirs, tmp_path, caplog):
  new = pdir.load_param_dir(dirs["stage"])
  legacy_model = new.model.to_dict()              # as older versions saved it
  legacy_model.pop("use_tmim", None)
  legacy_model.update(mask_ratio=0.25, mask_token_choice="reference", random_mask=False,
                      mask_noise=0.02)
  old = write_legacy_export(tmp_path / "pretrain_old", new.params, "pretrain", legacy_model,
                            step=5)
  with caplog.at_level(logging.WARNING):
    got = pdir.load_param_dir(old)
  assert "legacy stage-export layout" in caplog.text and "re-export" in caplog.text
  assert got.path == os.path.join(old, wd.EXPORT) and got.model == new.model
  _assert_same_params(got.params, new.params)
  assert got.provenance["stage"] == "pretrain" and got.provenance["step"] == 5
  assert got.vocab_path is None              # the package's vocabulary
  # a legacy backbone export said use_adapter=True without adapter parameters
  mc = tiny_model_config()
  old = write_legacy_export(tmp_path / "backbone_old", random_params(mc, "backbone"),
                            "backbone", mc.to_dict())
  got = pdir.load_param_dir(os.path.join(old, wd.EXPORT))
  assert not got.model.use_adapter and got.model.blip == mc.blip


def test_errors_name_the_directory(dirs, tmp_path):
  with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'}: no such parameter dir"):
    pdir.load_param_dir(str(tmp_path / "nope"))
  run = tmp_path / "run"                       # a workdir that has not exported yet
  (run / "ckpt").mkdir(parents=True)
  (run / "config.json").write_text(json.dumps({"mode": "finetune1"}))
  with pytest.raises(ValueError, match=f"{run} is not a parameter directory"):
    pdir.load_param_dir(str(run))
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "provenance.json").write_text(json.dumps({"format": pdir.FORMAT}))
  with pytest.raises(FileNotFoundError, match=f"{broken}: parameter directory without params"):
    pdir.load_param_dir(str(broken))
  (broken / "provenance.json").write_text(json.dumps({"format": "contextblip_jax.params/9"}))
  with pytest.raises(ValueError, match="unknown format 'contextblip_jax.params/9'"):
    pdir.load_param_dir(str(broken))
