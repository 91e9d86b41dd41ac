"""The Python API (`contextblip_jax.load`, evaluation/api.py): its docstring examples and the
README's "Python API" example run as written, in a directory holding the files they name
(random tiny parameter directories and images); its scores equal the scoring command's and
the evaluation step's; bad input names the argument."""

import doctest
import functools
import os
import re
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import contextblip_jax
from contextblip_jax.data import preprocess
from contextblip_jax.evaluation import api, scoring
from contextblip_jax.models.contextblip import ContextBlip
from contextblip_jax.storage.param_dir import load_param_dir
from tests.conftest import REPO_ROOT
from tests.helpers.checkpoints import make_tiny_checkpoint
from tests.helpers.loops import make_export

pytestmark = pytest.mark.usefixtures("xla_optimisations_off")


@pytest.fixture(scope="module")
def example_dir(tmp_path_factory):
  """The files the examples name: ckpt/blip_tiny and ckpt/blip_base (the same random tiny
  BLIP, as a converted directory: one compilation serves both), runs/finetune2 (a random tiny stage-2
  workdir), img0.png ... img5.png and img0.jpg ... img2.jpg (random RGB, various sizes)."""
  root = tmp_path_factory.mktemp("api")
  os.makedirs(root / "ckpt")
  make_tiny_checkpoint(root / "ckpt", with_adapter=False, seed=0, name="blip_tiny")
  make_tiny_checkpoint(root / "ckpt", with_adapter=False, seed=0, name="blip_base")
  make_export(root / "runs" / "finetune2", "finetune2", seed=3, step=7)
  rng = np.random.default_rng(0)
  for i in range(6):
    Image.fromarray(rng.integers(0, 256, (24 + 4 * i, 40, 3), dtype=np.uint8)).save(
        root / f"img{i}.png")
  for i in range(3):
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        root / f"img{i}.jpg")
  return root


@pytest.fixture
def in_example_dir(example_dir, monkeypatch):
  monkeypatch.chdir(example_dir)
  return example_dir


def _run_doctests(obj, name):
  out = []
  runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
  tests = doctest.DocTestFinder().find(obj, name, globs={"np": np, **vars(api)})
  for t in tests:
    runner.run(t, out=out.append)
  return runner.summarize(verbose=False), "".join(out)


def test_docstring_examples_run(in_example_dir):
  (failed, attempted), report = _run_doctests(api, "contextblip_jax.evaluation.api")
  assert attempted >= 20, attempted
  assert failed == 0, report



def _readme_example() -> str:
  with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as f:
    text = f.read()
  section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs(in_example_dir, capsys):
  code = _readme_example()
  assert "contextblip_jax.load(" in code and ".rank(" in code
  scope = {}
  exec(compile(code, "README.md (Python API)", "exec"), scope)  # pylint: disable=exec-used
  printed = capsys.readouterr().out
  assert "best image" in printed
  s = scope["s"]
  assert ((s.itm_prob > 0) & (s.itm_prob < 1)).all() and (np.abs(s.itc_sim) <= 1 + 1e-5).all()
  assert all(r.scores.shape[1] == 10 for r in scope["ranked"])


@pytest.fixture(scope="module")
def finetune2(example_dir):
  """The stage-2 workdir, loaded once for the tests below."""
  return contextblip_jax.load(str(example_dir / "runs" / "finetune2"))


def test_score_equals_scoring_command_and_rank_equals_evaluation_step(in_example_dir,
                                                                      finetune2):
  """score() is the Scorer's output; rank() is score_batch's on the same batch."""
  model = finetune2
  assert model.heads == ("zero_shot", "stage1", "stage2") and model.default_head == "stage2"
  paths = [f"img{i}.png" for i in range(4)]
  s = model.score("the red circle", paths, head="stage1")
  ref = model.scorer.score_files(paths, "the red circle")
  np.testing.assert_allclose(s.itm_prob, [im["itm_prob"] for im in ref["images"]], atol=1e-6)
  np.testing.assert_allclose(s.itc_sim, [im["itc_sim"] for im in ref["images"]], atol=1e-6)
  assert s.caption == ref["caption"] and s.head == "stage1" and s.scores.shape == (4,)

  # the same set as a zero-shot ranking: ITM probabilities equal score()'s
  r = model.rank(["the red circle"], [paths], head="zero_shot")[0]
  np.testing.assert_allclose(r.scores[0], s.itm_prob, atol=1e-5)

  # stage 2 through rank() equals score_batch on the set; uint8 arrays give what files give
  texts = ["the red circle", "a blue square"]
  arrays = [np.asarray(Image.open(p)) for p in paths]
  r2 = model.rank([texts], [arrays], head="stage2", is_video=True)[0]
  loaded = load_param_dir("runs/finetune2")
  m = ContextBlip(loaded.model)
  ids, mask = model.scorer.encode_texts(texts)[1:]
  pixels = preprocess.load_images(paths, model.image_size)
  batch = {"images": pixels[None], "input_ids": ids[None], "attention_mask": mask[None],
           "is_video": np.array([True]), "desc_mask": np.ones((1, 2), bool),
           "example_index": np.arange(2)[None], "set_mask": np.array([True])}
  step = jax.jit(functools.partial(scoring.score_batch, model=m, head="stage2"))
  want, _ = step(scoring.head_params(loaded.params, m, "stage2"), batch)
  np.testing.assert_allclose(r2.scores, np.asarray(want)[0], atol=1e-5)
  assert r2.scores.shape == (2, 4) and r2.best.shape == (2,) and r2.texts == tuple(texts)

  # several sets of different sizes in one call: each set's scores as when scored alone,
  # the video flag per set reaching the context encoder
  three = model.score("a red square", paths[:3], is_video=False)
  ranked = model.rank([texts, "a red square", texts], [paths, paths[:3], arrays],
                      is_video=[True, False, False])
  np.testing.assert_allclose(ranked[0].scores, r2.scores, atol=1e-5)
  np.testing.assert_allclose(ranked[1].scores[0], three.scores, atol=1e-5)
  assert three.head == "stage2" and ranked[1].texts == ("a red square",)
  assert np.abs(ranked[2].scores - r2.scores).max() > 1e-6      # not a video set


def test_image_inputs_are_equivalent(in_example_dir):
  model = contextblip_jax.load("ckpt/blip_tiny")
  a = np.asarray(Image.open("img0.jpg"))
  by_path = model.load_images(["img0.jpg"])
  np.testing.assert_array_equal(model.load_images(a), by_path)
  np.testing.assert_array_equal(model.load_images([Image.open("img0.jpg")]), by_path)
  np.testing.assert_array_equal(model.load_images(a[None] / 255.0), by_path)
  feats = model.encode_images(["img0.jpg"] * 13)            # two batches of 10
  assert feats.embeds.shape == (13, 17, 32) and feats.itc.shape == (13, 16)
  np.testing.assert_allclose(feats.itc, feats.itc[:1].repeat(13, 0), atol=1e-6)


@pytest.mark.parametrize("call, match", [
    (lambda m: m.score("", ["img0.png"]), r"^text: the description '' has no word"),
    (lambda m: m.score("...", ["img0.png"]), r"^text: .*no word"),
    (lambda m: m.score(["a", "b"], ["img0.png"]), r"^text: a description must be a str"),
    (lambda m: m.score("a dog", []), r"^images: no images"),
    (lambda m: m.score("a dog", ["img0.png", "nope.png"]), r"nope\.png: images\[1\]: no such"),
    (lambda m: m.score("a dog", np.zeros((2, 8, 8))), r"^images\[0\]: .*\[H, W, 3\]"),
    (lambda m: m.score("a dog", np.zeros((8, 8, 3)) - 2), r"^images\[0\]: float images .*\[0, 1\]"),
    (lambda m: m.score("a dog", np.zeros((1, 2, 8, 8, 3))), r"^images: .*got shape"),
    (lambda m: m.rank(["a", "b"], [["img0.png"]]), r"texts has 2 entries but image_sets has 1"),
    (lambda m: m.rank("a dog", [["img0.png"]]), r"^texts: expected a list"),
    (lambda m: m.rank([["a", " "]], [["img0.png"]]), r"^texts\[0\]\[1\]: "),
    (lambda m: m.rank(["a"], [["img0.png"] * 11], head="stage2"), r"^image_sets\[0\]: 11 images"),
    (lambda m: m.rank(["a"], [[]]), r"^image_sets\[0\]: no images"),
    (lambda m: m.rank(["a"], [["img0.png"]], is_video=[True, False]), r"is_video has 2"),
    (lambda m: m.score("a", ["img0.png"], head="stage3"), r"head 'stage3' is not one of"),
])
def test_errors_name_the_argument(in_example_dir, finetune2, call, match):
  with pytest.raises((ValueError, TypeError, preprocess.ImageLoadError), match=match):
    call(finetune2)


def test_load_errors_and_heads(in_example_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="no_such_dir: no such parameter directory"):
    contextblip_jax.load("no_such_dir")
  with pytest.raises(ValueError, match="is not a parameter directory"):
    contextblip_jax.load(str(tmp_path))
  plain = contextblip_jax.load("ckpt/blip_base")
  assert plain.heads == ("zero_shot",) and plain.default_head == "zero_shot"
  with pytest.raises(ValueError, match=r"head 'stage1': .*blip_base does not hold"):
    plain.rank(["a"], [["img0.png"]], head="stage1")
  # a stage-1 export holds an untrained context encoder: no stage-2 head
  assert api.available_heads({"prediction_layer": 0, "context_encoder": 0},
                             {"writer": "train", "stage": "finetune1"}) == ("zero_shot", "stage1")


def test_import_stays_light():
  code = ("import sys, contextblip_jax; assert callable(contextblip_jax.load); "
          "print(sorted(m for m in ('jax', 'flax', 'orbax') if m in sys.modules))")
  import subprocess  # pylint: disable=g-import-not-at-top
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=REPO_ROOT).stdout
  assert out.strip() == "[]", out
