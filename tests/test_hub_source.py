"""`python -m weight_convert --src Salesforce/blip-itm-base-coco`: hub ids resolve through
huggingface_hub's own cache layout (weight_convert/hub.py), never the network."""

from __future__ import annotations

import hashlib
import os

import flax
import numpy as np
import pytest

from contextblip_jax.storage.param_dir import load_param_dir
from tests.helpers import torch_reference as tr
from weight_convert import hub
from weight_convert.__main__ import main

REPO_ID = "Salesforce/blip-itm-base-coco"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _lay_out_hub_cache(hf_dir: str, cache: str, repo_id: str, commit: str) -> str:
  """huggingface_hub's cache format: models--owner--name/{blobs/<sha256>, refs/main,
  snapshots/<commit>/<file> -> ../../blobs/<sha256>}."""
  repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
  snap = os.path.join(repo, "snapshots", commit)
  os.makedirs(os.path.join(repo, "blobs"))
  os.makedirs(os.path.join(repo, "refs"))
  os.makedirs(snap)
  with open(os.path.join(repo, "refs", "main"), "w") as f:
    f.write(commit)
  for name in os.listdir(hf_dir):
    data = open(os.path.join(hf_dir, name), "rb").read()
    blob = hashlib.sha256(data).hexdigest()
    with open(os.path.join(repo, "blobs", blob), "wb") as f:
      f.write(data)
    os.symlink(os.path.join("..", "..", "blobs", blob), os.path.join(snap, name))
  return snap


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  model = tr.build_hf_model(tr.hf_config(), seed=3)
  return tr.save_hf_dir(model, str(tmp_path_factory.mktemp("hf") / "blip"))


@pytest.fixture
def offline_home(tmp_path, monkeypatch):
  """HF_HOME in a temporary directory, HF_HUB_OFFLINE=1, and a snapshot_download that fails
  the test if it is ever asked to go to the network."""
  import huggingface_hub
  home = tmp_path / "hf_home"
  monkeypatch.setenv("HF_HOME", str(home))
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  real = huggingface_hub.snapshot_download

  def local_only(*args, **kwargs):
    assert kwargs.get("local_files_only"), "weight_convert tried the network"
    return real(*args, **kwargs)
  monkeypatch.setattr(huggingface_hub, "snapshot_download", local_only)
  return str(home / "hub")


def _params(path):
  return flax.traverse_util.flatten_dict(load_param_dir(path).params, sep="/")


def test_hub_id_converts_from_the_cache_like_the_directory(hf_dir, offline_home, tmp_path,
                                                           capsys):
  snap = _lay_out_hub_cache(hf_dir, offline_home, REPO_ID, COMMIT)
  assert hub.resolve_source(REPO_ID) == snap
  assert hub.resolve_source(f"{REPO_ID}@{COMMIT}") == snap
  out = str(tmp_path / "from_hub")
  assert main(["--src", REPO_ID, "--out", out]) == 0
  assert f"hub: {REPO_ID} -> {snap}" in capsys.readouterr().out
  direct = str(tmp_path / "from_dir")
  assert main(["--src", hf_dir, "--out", direct]) == 0
  a, b = _params(out), _params(direct)
  assert sorted(a) == sorted(b) and len(a) > 20
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_uncached_id_offline_says_what_to_download_and_where(offline_home, tmp_path, capsys):
  out = tmp_path / "out"
  assert main(["--src", "Salesforce/blip-itm-large-coco", "--out", str(out)]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: --src Salesforce/blip-itm-large-coco: not a local path")
  assert "HF_HUB_OFFLINE" in err
  assert "hf download Salesforce/blip-itm-large-coco config.json model.safetensors" in err
  assert offline_home in err and "models--Salesforce--blip-itm-large-coco" in err
  assert "https://huggingface.co/Salesforce/blip-itm-large-coco" in err
  assert not out.exists()


def test_a_cached_snapshot_without_weights_is_not_taken(hf_dir, offline_home, tmp_path,
                                                        capsys):
  readme_only = tmp_path / "readme_only"
  readme_only.mkdir()
  (readme_only / "README.md").write_text("model card\n")
  _lay_out_hub_cache(str(readme_only), offline_home, REPO_ID, COMMIT)
  assert main(["--src", REPO_ID, "--out", str(tmp_path / "out")]) == 2
  assert "hf download Salesforce/blip-itm-base-coco" in capsys.readouterr().err


def test_what_counts_as_a_hub_id(hf_dir, tmp_path):
  assert hub.looks_like_hub_id("Salesforce/blip-itm-base-coco")
  assert hub.looks_like_hub_id("Salesforce/blip-itm-base-coco@main")
  for local in (hf_dir, "model_base.pth", "ckpt/model_base.pth", "gs://bucket/model_base.pth",
                "./Salesforce/blip", "/abs/blip", "model_base", "a/b/c"):
    assert not hub.looks_like_hub_id(local), local
  assert hub.resolve_source(hf_dir) == hf_dir          # a local path passes through untouched


def test_hf_hub_cache_overrides_hf_home(hf_dir, offline_home, tmp_path, monkeypatch):
  cache = str(tmp_path / "explicit_cache")
  monkeypatch.setenv("HF_HUB_CACHE", cache)
  assert hub.hub_cache_dir() == cache
  snap = _lay_out_hub_cache(hf_dir, cache, "Salesforce/blip-itm-base-flickr", COMMIT)
  assert hub.resolve_source("Salesforce/blip-itm-base-flickr") == snap
