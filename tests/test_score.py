"""`python -m contextblip_jax.score` on random tiny parameter directories: converted-style (with
and without the adapter), a fine-tuning stage-2 workdir and its export/, legacy layouts."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tests.helpers.checkpoints import make_tiny_checkpoint, write_legacy_converted
from tests.helpers.loops import make_export
from contextblip_jax.data import preprocess
from contextblip_jax.evaluation import scorer as score
from contextblip_jax.models.adapter import MultiScaleAdapter
from contextblip_jax.models.blip import Blip, ENC_TOKEN_ID
from contextblip_jax.storage.param_dir import load_param_dir
from contextblip_jax.data.tokenizer import BlipTokenizer

TEXT = "The dog, on the LEFT-hand side; is jumping!"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  root = tmp_path_factory.mktemp("ckpts")
  # Same seed: identical BLIP weights, the second one adds a vision adapter.
  return {"plain": make_tiny_checkpoint(root, with_adapter=False, seed=0),
          "adapter": make_tiny_checkpoint(root, with_adapter=True, seed=0),
          # a fine-tuning stage-2 workdir: adapter, TMIM, prediction layer, context encoder
          "stage2": make_export(root / "finetune2", "finetune2", seed=3, tree="all", step=7)}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  paths = []
  for i, (ext, mode) in enumerate([("png", "RGB"), ("jpg", "RGB"), ("png", "L"), ("png", "RGBA")]):
    arr = rng.integers(0, 256, (24 + 8 * i, 40, 4), dtype=np.uint8)
    img = Image.fromarray(arr, "RGBA").convert(mode)
    path = str(root / f"img{i}.{ext}")
    img.save(path)
    paths.append(path)
  return paths


def _run(capsys, argv):
  rc = score.main(argv)
  out = capsys.readouterr()
  return rc, out.out, out.err


def _direct(ckpt_dir, paths, caption, max_length=30):
  """The scores computed step by step with Blip.apply (no batching, text repeated per image)."""
  pre = load_param_dir(ckpt_dir)
  cfg = pre.model.blip
  model = Blip(cfg)
  adapter = None
  if pre.model.use_adapter:
    adapter = MultiScaleAdapter(cfg.vision.width, pre.model.adapter_taps,
                                pre.model.adapter_reduction)
  pixels = preprocess.load_images(paths, cfg.vision.image_size)
  enc = BlipTokenizer(pre.vocab_path)([caption] * len(paths), max_length=max_length)

  @jax.jit
  def compute(params, pixels, ids, mask):
    blip = {"params": params["pretrained_blip"]}
    vis = model.apply(blip, pixels, True, method=Blip.encode_image)
    embeds = vis.last_hidden_state
    itm_embeds = embeds
    if adapter is not None:
      itm_embeds = adapter.apply({"params": params["vision_adapter"]}, embeds, vis.taps)
    enc_ids = ids.at[:, 0].set(ENC_TOKEN_ID)
    h = model.apply(blip, enc_ids, mask, itm_embeds, method=Blip.multimodal,
                    replace_with_enc=False).last_hidden_state
    logits = model.apply(blip, h, method=Blip.itm_from_states)
    itc = jnp.sum(model.apply(blip, embeds, method=Blip.image_features)
                  * model.apply(blip, ids, mask, method=Blip.text_features), -1)
    return jax.nn.softmax(logits, -1)[:, 1], itc, logits

  return [np.asarray(x) for x in compute(pre.params, pixels, enc["input_ids"],
                                         enc["attention_mask"])]


@pytest.mark.parametrize("kind", ["plain", "adapter"])
def test_scores_match_direct_computation(capsys, ckpts, images, kind):
  rc, out, err = _run(capsys, ["--checkpoint", ckpts[kind], "--text", TEXT, *images])
  assert rc == 0, err
  report = json.loads(out)
  assert report["checkpoint"] == os.path.abspath(ckpts[kind])
  assert report["image_size"] == 32 and report["source"].startswith("random tiny BLIP")
  assert report["model"]["vision_depth"] == 4 and report["model"]["text_width"] == 32
  assert (report["vision_adapter"] is not None) == (kind == "adapter")
  assert report["caption"] == "the dog on the left hand side is jumping"
  assert report["input_ids"][0] == 101 and report["input_ids"][-1] == 102
  assert [r["path"] for r in report["images"]] == images
  prob = np.array([r["itm_prob"] for r in report["images"]])
  itc = np.array([r["itc_sim"] for r in report["images"]])
  logits = np.array([r["itm_logits"] for r in report["images"]])
  assert ((prob >= 0) & (prob <= 1)).all() and ((itc >= -1) & (itc <= 1)).all()
  want_prob, want_itc, want_logits = _direct(ckpts[kind], images, report["caption"])
  np.testing.assert_allclose(prob, want_prob, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(itc, want_itc, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
  assert report["best_index"] == int(np.argmax(prob))
  assert report["best_image"] == images[report["best_index"]]
  assert len(set(np.round(prob, 7))) > 1     # different images get different scores


def test_adapter_changes_itm_not_itc(capsys, ckpts, images):
  reports = {}
  for kind, path in ckpts.items():
    rc, out, err = _run(capsys, ["--checkpoint", path, "--text", TEXT, *images])
    assert rc == 0, err
    reports[kind] = json.loads(out)["images"]
  itc = {k: np.array([r["itc_sim"] for r in v]) for k, v in reports.items()}
  itm = {k: np.array([r["itm_logits"] for r in v]) for k, v in reports.items()}
  np.testing.assert_allclose(itc["plain"], itc["adapter"], rtol=1e-6, atol=1e-7)
  assert np.abs(itm["plain"] - itm["adapter"]).max() > 1e-4


def test_batching_pads_without_changing_scores(ckpts, images):
  pixels = preprocess.load_images(images, 32)
  pre = load_param_dir(ckpts["plain"])
  whole = score.Scorer(pre, batch_size=10).score_pixels(pixels, TEXT)
  pieces = score.Scorer(pre, batch_size=3).score_pixels(pixels, TEXT)   # 3 + (1 padded to 3)
  assert whole["itm_prob"].shape == pieces["itm_prob"].shape == (4,)
  for k in whole:
    np.testing.assert_allclose(whole[k], pieces[k], rtol=1e-5, atol=1e-6)


def test_text_flags(capsys, ckpts, images):
  # Three images, so the compiled shapes are shared with the batching test.
  # (a repeated --text adds a description: see test_several_descriptions_...)
  base = ["--checkpoint", ckpts["plain"], "--text", "Dog!", *images[:3]]
  ids = lambda argv: json.loads(_run(capsys, argv)[1])["input_ids"]
  assert ids(base) == [101, 3899, 102]
  assert ids(base + ["--no-pre-caption"]) == [101, 3899, 999, 102]
  long_text = ["--checkpoint", ckpts["plain"], "--text", " ".join(["dog"] * 50), *images[:3]]
  assert len(ids(long_text)) == 30               # pre_caption keeps 30 words, T = 30
  assert ids(long_text + ["--max-length", "5"]) == [101] + [3899] * 3 + [102]
  rc, _, err = _run(capsys, base + ["--max-length", "2"])
  assert rc == 2 and "--max-length" in err


@pytest.mark.parametrize("problem", ["corrupt", "missing", "truncated"])
def test_bad_image_is_a_clean_error_naming_the_file(capsys, tmp_path, ckpts, images, problem):
  bad = tmp_path / f"broken_{problem}.jpg"
  if problem == "corrupt":
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
  elif problem == "truncated":
    with open(images[1], "rb") as f:
      bad.write_bytes(f.read()[:400])
  rc, out, err = _run(capsys, ["--checkpoint", ckpts["plain"], "--text", TEXT,
                               images[0], str(bad)])
  assert rc == 2 and out == ""
  assert str(bad) in err and err.startswith("error: cannot load image")


def test_missing_checkpoint_is_a_clean_error(capsys, tmp_path, images):
  rc, out, err = _run(capsys, ["--checkpoint", str(tmp_path / "nope"), "--text", "a", images[0]])
  assert rc == 2 and out == "" and "nope" in err and "no such parameter directory" in err
  (tmp_path / "not_params").mkdir()
  (tmp_path / "not_params" / "config.json").write_text("{}")   # e.g. a workdir without export/
  rc, out, err = _run(capsys, ["--checkpoint", str(tmp_path / "not_params"), "--text", "a",
                               images[0]])
  assert rc == 2 and out == ""
  assert f"{tmp_path / 'not_params'} is not a parameter directory" in err


def test_stage2_workdir_and_its_export_score_like_the_direct_computation(capsys, ckpts,
                                                                        images):
  """Any stage's export is scored through ContextBlip (the groups beyond BLIP + adapter unused),
  whether --checkpoint names the workdir or its export/."""
  reports = []
  for path in (ckpts["stage2"], os.path.join(ckpts["stage2"], "export")):
    rc, out, err = _run(capsys, ["--checkpoint", path, "--text", TEXT, *images])
    assert rc == 0, err
    reports.append(json.loads(out))
  a, b = reports
  assert a["checkpoint"] == os.path.abspath(ckpts["stage2"])
  assert a["parameters"] == b["parameters"] == os.path.join(ckpts["stage2"], "export")
  assert a["source"] == "stage finetune2 step 7" and a["provenance"]["writer"] == "train"
  assert a["vision_adapter"] == {"taps": [1, 2, 3, 4], "reduction": 2}
  assert a["images"] == b["images"]
  prob = np.array([r["itm_prob"] for r in a["images"]])
  want_prob, want_itc, want_logits = _direct(ckpts["stage2"], images, a["caption"])
  np.testing.assert_allclose(prob, want_prob, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose([r["itc_sim"] for r in a["images"]], want_itc, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose([r["itm_logits"] for r in a["images"]], want_logits, rtol=1e-5,
                             atol=1e-5)


def test_legacy_converted_dir_scores_the_same(capsys, ckpts, images, tmp_path, caplog):
  new = load_param_dir(ckpts["adapter"])
  old = write_legacy_converted(str(tmp_path / "old"), new.model, new.params,
                               source="random tiny BLIP (legacy)")
  want = json.loads(_run(capsys, ["--checkpoint", ckpts["adapter"], "--text", TEXT,
                                  *images])[1])
  rc, out, err = _run(capsys, ["--checkpoint", old, "--text", TEXT, *images])
  assert rc == 0, err
  got = json.loads(out)
  assert got["images"] == want["images"] and got["vision_adapter"] == want["vision_adapter"]
  assert "legacy" in caplog.text and "re-convert" in caplog.text


def test_module_entry_point_exit_status(tmp_path, ckpts, images):
  bad = tmp_path / "not_an_image.png"
  bad.write_text("hello")
  proc = subprocess.run([sys.executable, "-m", "contextblip_jax.score", "--checkpoint",
                         ckpts["plain"], "--text", TEXT, images[0], str(bad)],
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2
  assert str(bad) in proc.stderr and "Traceback" not in proc.stderr
  assert proc.stdout == ""


def test_several_descriptions_score_like_one_at_a_time(capsys, ckpts, images):
  """Repeated --text: the images' vision and cross-attention keys/values are computed once
  for all descriptions (cached path); each description's results equal a run with it alone."""
  texts = [TEXT, "two cats asleep on a red sofa", "Dog!"]
  rc, out, err = _run(capsys, ["--checkpoint", ckpts["adapter"],
                               *[a for t in texts for a in ("--text", t)], *images])
  assert rc == 0, err
  report = json.loads(out)
  assert "images" not in report and [d["text"] for d in report["descriptions"]] == texts
  for d, t in zip(report["descriptions"], texts):
    rc, out, err = _run(capsys, ["--checkpoint", ckpts["adapter"], "--text", t, *images])
    alone = json.loads(out)
    assert rc == 0 and d["caption"] == alone["caption"] and d["input_ids"] == alone["input_ids"]
    for k in ("itm_prob", "itc_sim", "itm_logits"):
      # float32: the several-description pass computes the same products in other matmul
      # shapes (the descriptions folded into one query block), so rounding differs slightly
      np.testing.assert_allclose([r[k] for r in d["images"]], [r[k] for r in alone["images"]],
                                 rtol=1e-5, atol=1e-6)
    assert d["best_index"] == alone["best_index"]
  probs = np.array([[r["itm_prob"] for r in d["images"]] for d in report["descriptions"]])
  assert np.abs(probs[0] - probs[1]).max() > 1e-6       # the descriptions are scored apart
