"""Data and weights in a bucket (gs://) against a local GCS emulator (tests/helpers/gcs_emulator.py):
pre-training pairs read and decoded by the input pipeline, the TFDS array_record datasets built
into and read from the bucket (and the clear errors where they cannot be read), and weight
conversion from gs:// to gs:// read back from the bucket. One emulator for the module; the
calls run in this process with the emulator's variables set.
"""

import hashlib
import json
import os

import flax
import numpy as np
import pytest
import torch
from PIL import Image

from contextblip_jax.data import (imagecode, pairs, pipeline, prepare, preprocess, tfds_imagecode,
                                  tfds_pairs, tfds_storage)
from contextblip_jax.storage import paths
from contextblip_jax.storage.param_dir import load_param_dir
from tests.helpers import torch_reference as tr
from tests.helpers.gcs_emulator import gcs_emulator, use_in_process
from tests.helpers.loops import make_data
from weight_convert import load_source, to_flax
from weight_convert.__main__ import main as convert_main

HEADS = dict(vision_heads=4, text_heads=4)      # of tr.hf_config(), for original-format files
CAPTIONS = ["A red square!", "two blue  circles", "a green line", "the yellow sun"]


@pytest.fixture(scope="module")
def bucket():
  with gcs_emulator() as em, use_in_process(em):
    yield em


@pytest.fixture(autouse=True)
def _in_tmp_cwd(tmp_path, monkeypatch):
  """Runs each test in its temporary directory, then checks no local `gs:` folder appeared."""
  monkeypatch.chdir(tmp_path)
  yield
  for d, dirs, _ in os.walk(tmp_path):
    assert "gs:" not in dirs, f"a local folder {os.path.join(d, 'gs:')} was created"


def _pairs_dir(root) -> str:
  """pairs.json (relative image paths) + 4 PNG images under `root`."""
  rng = np.random.default_rng(0)
  os.makedirs(os.path.join(root, "img"))
  for i in range(4):
    Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(
        os.path.join(root, "img", f"{i}.png"))
  with open(os.path.join(root, "pairs.json"), "w") as f:
    json.dump([{"image": f"img/{i}.png", "caption": c} for i, c in enumerate(CAPTIONS)], f)
  return str(root)


def _batch(data):
  pipe = pipeline.pretrain_pipeline(data, image_size=16, global_batch_size=4, seed=0,
                                    augmentation="none", num_epochs=1, num_threads=1)
  return next(iter(pipe))


# ------------------------------------------------------------------ pairs

def test_pairs_json_and_images_in_the_bucket_feed_the_pipeline(bucket, tmp_path):
  local = _pairs_dir(tmp_path / "pairs")
  paths.upload(local, "gs://bkt/pairs")
  data = pairs.read_pairs("gs://bkt/pairs/pairs.json")
  assert [e.image_path for e in data.examples] == [f"gs://bkt/pairs/img/{i}.png"
                                                   for i in range(4)]
  assert data.examples[1].caption == "two blue circles"
  remote, plain = _batch(data), _batch(pairs.read_pairs(os.path.join(local, "pairs.json")))
  assert remote["image"].shape == (4, 16, 16, 3)
  for key in ("image", "input_ids", "attention_mask"):
    np.testing.assert_array_equal(remote[key], plain[key])
  # A root in the bucket for a local JSON; decoded up front (cache_images) as well.
  cached = pairs.read_pairs(os.path.join(local, "pairs.json"), "gs://bkt/pairs")
  assert cached.examples[0].image_path == "gs://bkt/pairs/img/0.png"
  np.testing.assert_array_equal(_batch(pipeline.PairSource(cached, cache_images=True))["image"],
                                plain["image"])


def test_pairs_errors_name_the_remote_file(bucket, tmp_path):
  with pytest.raises(pairs.PairsDataError, match=r"gs://bkt/nowhere/p\.json: pair file not found"):
    pairs.read_pairs("gs://bkt/nowhere/p.json")
  entries = [{"image": "img/0.png", "caption": "x"}, {"image": "img/zz.png", "caption": "y"},
             {"image": "bad.png", "caption": "z"}]
  paths.atomic_write_bytes("gs://bkt/errs/p.json", json.dumps(entries).encode())
  paths.upload(_pairs_dir(tmp_path / "p") + "/img/0.png", "gs://bkt/errs/img/0.png")
  paths.atomic_write_bytes("gs://bkt/errs/bad.png", b"not an image")
  with pytest.raises(pairs.PairsDataError, match=r"gs://bkt/errs/p\.json: entry 1: image file "
                                                 r"not found: gs://bkt/errs/img/zz\.png"):
    pairs.read_pairs("gs://bkt/errs/p.json")
  skipped = pairs.read_pairs("gs://bkt/errs/p.json", check_images="decode",
                             on_error="skip").skipped
  assert [(s.file, s.index) for s in skipped] == [("gs://bkt/errs/p.json", 1),
                                                  ("gs://bkt/errs/p.json", 2)]
  assert "cannot load image gs://bkt/errs/img/zz.png: no such file" in skipped[0].reason
  assert "cannot load image gs://bkt/errs/bad.png: not a recognised" in skipped[1].reason
  # The image reader opens first (one request); what was missing is told apart afterwards.
  with pytest.raises(preprocess.ImageLoadError, match=r"gs://bkt/errs/img: is a directory"):
    preprocess.open_rgb("gs://bkt/errs/img")
  assert preprocess.open_rgb("gs://bkt/errs/img/0.png").size == (12, 12)


# ------------------------------------------------------------------ TFDS / array_record

def test_tfds_pairs_built_into_and_read_from_the_bucket(bucket, tmp_path):
  local = _pairs_dir(tmp_path / "manual")
  paths.upload(local, "gs://bkt/manual")
  log = []
  builder = tfds_storage.build(tfds_pairs.PairsBuilder, "gs://bkt/manual", "gs://bkt/tfds",
                               "default", log.append)
  version = "gs://bkt/tfds/contextblip_pairs/default/1.0.0"
  assert os.fspath(builder.data_dir) == version
  stored = bucket.objects("tfds/")
  assert "tfds/contextblip_pairs/default/1.0.0/dataset_info.json" in stored, stored
  assert any(o.endswith("-train.array_record-00000-of-00001") for o in stored), stored
  # array_record's reader opens the gs:// record file itself.
  source = tfds_pairs.TfdsPairSource(tfds_storage.data_sources(version)["train"])
  records = {source[i]["id"]: source[i] for i in range(len(source))}
  assert sorted(records) == [f"pairs.json:{i}" for i in range(4)]
  with open(os.path.join(local, "img", "2.png"), "rb") as f:
    assert records["pairs.json:2"]["image"] == f.read()
  assert records["pairs.json:2"]["caption"] == "a green line"
  assert _batch(source)["image"].shape == (4, 16, 16, 3)
  # Built once; an interrupted upload (no dataset_info.json) is built again.
  tfds_pairs.build("gs://bkt/manual", "gs://bkt/tfds")
  paths.remove(version + "/dataset_info.json")
  tfds_storage.build(tfds_pairs.PairsBuilder, "gs://bkt/manual", "gs://bkt/tfds", "default",
                     log.append)
  assert any("partial upload" in line for line in log), log
  assert paths.isfile(version + "/dataset_info.json")


def test_tfds_imagecode_built_from_and_into_the_bucket(bucket, tmp_path):
  data = make_data(tmp_path, n_train_sets=2, n_valid_sets=1, n_test_sets=1, n_pairs=4)
  paths.upload(data, "gs://bkt/imagecode")
  builder = tfds_imagecode.build("gs://bkt/imagecode", "gs://bkt/tfds")
  sources = tfds_storage.data_sources(builder.data_dir)
  for split in ("train", "valid"):
    want = imagecode.read_imagecode_dir("gs://bkt/imagecode", split)
    got = tfds_imagecode.TfdsImagecodeSource(sources[split])
    assert sorted(got[i]["id"] for i in range(len(got))) == sorted(
        e.example_id for e in want.examples)
  first = tfds_imagecode.decode_record(sources["train"][0])
  example = next(e for e in imagecode.read_imagecode_dir(data, "train").examples
                 if e.example_id == first["example_id"])
  with open(example.image_paths[3], "rb") as f:
    assert first["image_bytes"][3] == f.read()


def test_reading_remote_records_without_credentials_is_a_clear_error(bucket, monkeypatch):
  version = "gs://bkt/tfds/contextblip_pairs/default/1.0.0"
  monkeypatch.delenv("CLOUD_STORAGE_EMULATOR_ENDPOINT")
  with pytest.raises(tfds_storage.RemoteDataError,
                     match=rf"{version}: STORAGE_EMULATOR_HOST is set .* "
                           "CLOUD_STORAGE_EMULATOR_ENDPOINT.*gcloud storage cp -r"):
    tfds_storage.data_sources(version)
  monkeypatch.delenv("STORAGE_EMULATOR_HOST")
  monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/credentials.json")
  with pytest.raises(tfds_storage.RemoteDataError,
                     match=rf"{version}: reading array_record files from gs:// needs Google "
                           "credentials.*application-default login"):
    tfds_storage.data_sources(version)
  with pytest.raises(tfds_storage.RemoteDataError, match="s3://b/x: array_record reads"):
    tfds_storage.check_readable("s3://b/x")
  tfds_storage.check_readable("/local/dir")            # local paths need nothing


def test_prepare_writes_tfds_to_the_bucket_and_refuses_a_remote_out(bucket, tmp_path, capsys):
  local = _pairs_dir(tmp_path / "raw")
  out = tmp_path / "ready"
  assert prepare.main(["--out", "gs://bkt/ready", "--pairs", local + "/pairs.json"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: --out gs://bkt/ready: must be a local folder"), err
  paths.upload(local, "gs://bkt/raw")
  assert prepare.main(["--out", str(out), "--pairs", "gs://bkt/raw/pairs.json", "--tfds",
                       "--tfds_dir", "gs://bkt/prepared"]) == 0
  summary = json.loads((out / "prepared.json").read_text())
  assert summary["tfds"]["pairs"] == "gs://bkt/prepared/contextblip_pairs/prepared/1.0.0"
  assert not (out / "tfds").exists()
  with open(out / "pairs" / "pairs.json") as f:    # the images stay in the bucket
    assert json.load(f)[0]["image"] == "gs://bkt/raw/img/0.png"
  assert len(tfds_storage.data_sources(summary["tfds"]["pairs"])["train"]) == 4


# ------------------------------------------------------------------ weight conversion

def _flat(tree):
  return flax.traverse_util.flatten_dict(tree, sep="/")


def test_weights_convert_from_and_to_the_bucket(bucket, tmp_path, capsys):
  model = tr.build_hf_model(tr.hf_config(), seed=0)
  orig = tr.save_original(tr.original_state_dict(model), str(tmp_path / "orig.pth"), epoch=3)
  hf_dir = tr.save_hf_dir(model, str(tmp_path / "hf"))
  paths.upload(orig, "gs://bkt/src/orig.pth")
  paths.upload(hf_dir, "gs://bkt/src/hf")
  want = _flat(to_flax(load_source(orig), **HEADS).params)

  argv = ["--src", "gs://bkt/src/orig.pth", "--out", "gs://bkt/conv", "--vision-heads", "4",
          "--text-heads", "4"]
  assert convert_main(argv) == 0, capsys.readouterr().err
  out = capsys.readouterr().out
  assert "fetch: gs://bkt/src/orig.pth" in out and "[4/4] write: gs://bkt/conv" in out, out
  pd = load_param_dir("gs://bkt/conv")
  got = _flat(pd.params)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k]), want[k], err_msg=k)
  assert pd.provenance["source"]["path"] == "gs://bkt/src/orig.pth"
  with open(orig, "rb") as f:
    assert pd.provenance["source"]["sha256"] == {"orig.pth": hashlib.sha256(f.read()).hexdigest()}

  # An HF directory in the bucket, and the exports back into the bucket.
  assert convert_main(["--src", "gs://bkt/src/hf", "--out", "gs://bkt/conv_hf"]) == 0
  assert convert_main(["export", "--checkpoint", "gs://bkt/conv", "--out", "gs://bkt/hf_out"]) == 0
  assert convert_main(["export", "--checkpoint", "gs://bkt/conv", "--out", "gs://bkt/a.pth",
                       "--format", "authors"]) == 0
  stored = bucket.objects()
  for name in ("hf_out/config.json", "hf_out/model.safetensors", "a.pth",
               "conv_hf/provenance.json"):
    assert name in stored, (name, stored)
  assert not any(".tmp" in o for o in stored), stored
  for back, heads in (("gs://bkt/hf_out", {}), ("gs://bkt/a.pth", HEADS)):
    again = _flat(to_flax(load_source(back), **heads).params)
    for k in want:
      np.testing.assert_allclose(again[k], want[k], rtol=0, atol=0, err_msg=(back, k))


def test_remote_conversion_errors_name_the_gs_path(bucket, tmp_path, capsys):
  assert convert_main(["--src", "gs://bkt/src/none.pth", "--out", "gs://bkt/c1"]) == 2
  assert "error: source not found: gs://bkt/src/none.pth" in capsys.readouterr().err
  torch.save({"model": {"w": torch.zeros(2)}, "x": _Evil()}, tmp_path / "evil.pth")
  paths.upload(str(tmp_path / "evil.pth"), "gs://bkt/src/evil.pth")
  assert convert_main(["--src", "gs://bkt/src/evil.pth", "--out", "gs://bkt/c2"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: refused to load gs://bkt/src/evil.pth"), err
  assert not any(o.startswith(("c1", "c2", ".c1", ".c2")) for o in bucket.objects())


class _Evil:
  def __reduce__(self):
    return (os.system, ("echo pwned",))
