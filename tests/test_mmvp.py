"""MMVP-VLM: the reader's pairing and gold rules on stand-ins in the exact layout (folder and
category names with spaces), its errors, the "both statements right" rule, and the evaluation
mode end to end with a tiny model (files, report, stage 2 without position embedding)."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from configs import mmvp as mmvp_config
from contextblip_jax.data import mmvp
from contextblip_jax.evaluation import mmvp_eval
from contextblip_jax.run import evaluate
from tests.helpers.loops import make_export

pytestmark = pytest.mark.usefixtures("xla_optimisations_off")
CATS = mmvp.CATEGORIES[:2]          # "Orientation and Direction", "Presence of Specific Features"


def _write(root, rows, images=True):
  """Questions.csv with `rows` (qid, category, statement) and a 16-px JPEG per question id."""
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, mmvp.QUESTIONS_FILE), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(("Question ID", "Type", "Statement"))
    w.writerows(rows)
  for q, cat, _ in rows if images else ():
    if not str(q).isdigit():
      continue
    path = mmvp.image_path(str(root), cat, int(q))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (16, 16), (int(q) * 20 % 255, 9, 9)).save(path)
  return str(root)


def test_standin_layout_and_pairing_rules(tmp_path):
  root = str(tmp_path / "MMVP VLM")
  mmvp.write_standin(root, pairs_per_category=2, categories=CATS, image_size=16)
  assert os.path.isfile(os.path.join(root, "MLLM_VLM Images", CATS[0], "1.jpg"))
  bench = mmvp.read_mmvp(root, pairs_per_category=2)
  assert bench.categories == CATS and len(bench.pairs) == 4
  p = bench.pairs[1]
  assert p.question_ids == (3, 4) and p.gold == (0, 1) and p.category == CATS[0]
  assert p.image_paths == (os.path.join(root, "MLLM_VLM Images", CATS[0], "3.jpg"),
                           os.path.join(root, "MLLM_VLM Images", CATS[0], "4.jpg"))
  assert p.texts[0] == "a photo of " + p.statements[0]
  # Row order decides the images, the id's parity decides the gold: (6, 5) -> gold (1, 0).
  rows = [(6, CATS[0], "a, quoted statement"), (5, CATS[0], "b"), (8, CATS[1], "c"),
          (7, CATS[1], "d")]
  bench = mmvp.read_mmvp(_write(tmp_path / "x", rows), pairs_per_category=0)
  assert bench.pairs[0].question_ids == (6, 5) and bench.pairs[0].gold == (1, 0)
  assert bench.pairs[0].image_paths[0].endswith(os.path.join(CATS[0], "6.jpg"))
  assert bench.pairs[0].statements[0] == "a, quoted statement"


@pytest.mark.parametrize("rows,kw,match", [
    ([(1, "A", "x"), (2, "A", "y"), (3, "A", "z")], {}, r"row 4: 3 statements, an odd number"),
    ([(1, "A", "x"), ("two", "A", "y")], {}, r"row 3: question id 'two' is not an integer"),
    ([(1, "A", "x"), (1, "A", "y")], {}, r"row 3: question id 1 repeats row 2"),
    ([(1, "A", "x"), (2, "B", "y")], {}, r"rows 2 and 3 form a pair but name different"),
    ([(1, "A", "x"), (3, "A", "y")], {}, r"both point at the first image"),
    ([(1, "A", "x"), (2, "A", " ")], {}, r"row 3: empty statement"),
    ([(1, "A", "x"), (2, "A", "y"), (3, "B", "x"), (4, "B", "y"), (5, "A", "x"),
      (6, "A", "y")], {}, r"row 6: category 'A' reappears"),
    ([(1, "A", "x"), (2, "A", "y")], {"pairs_per_category": 15},
     r"category 'A' has 1 pairs, expected 15"),
])
def test_malformed_csv_names_file_and_row(tmp_path, rows, kw, match):
  root = _write(tmp_path, rows)
  with pytest.raises(mmvp.MmvpDataError, match=match) as e:
    mmvp.read_mmvp(root, **{"pairs_per_category": 0, **kw})
  assert mmvp.QUESTIONS_FILE in str(e.value)


def test_missing_file_bad_row_and_missing_image(tmp_path):
  with pytest.raises(mmvp.MmvpDataError, match="Questions.csv: not found"):
    mmvp.read_mmvp(str(tmp_path / "nowhere"))
  root = _write(tmp_path / "r", [(1, CATS[0], "x"), (2, CATS[0], "y")])
  with open(os.path.join(root, mmvp.QUESTIONS_FILE), "a") as f:
    f.write("3,only two fields\n")
  with pytest.raises(mmvp.MmvpDataError, match=r"row 4: expected 3 fields"):
    mmvp.read_mmvp(root, pairs_per_category=0)
  root = _write(tmp_path / "m", [(1, CATS[0], "x"), (2, CATS[0], "y")])
  os.remove(mmvp.image_path(root, CATS[0], 2))
  with pytest.raises(mmvp.MmvpDataError,
                     match=r"MLLM_VLM Images/Orientation and Direction/2\.jpg: image not found "
                           r"\(row 3 of .*Questions\.csv\)"):
    mmvp.read_mmvp(root, pairs_per_category=0)


def test_a_pair_counts_only_when_both_statements_pick_their_image(tmp_path):
  rows = [(1, "A", "a"), (2, "A", "b"), (3, "A", "c"), (4, "A", "d"), (6, "B", "e"),
          (5, "B", "f")]
  bench = mmvp.read_mmvp(_write(tmp_path, rows), pairs_per_category=0)
  scores = np.array([[[.9, .1], [.2, .8]],      # both right -> correct
                     [[.9, .1], [.7, .3]],      # second statement wrong -> pair wrong
                     [[.5, .5], [.6, .4]]])     # tie -> second image (the reference's rule)
  recs = mmvp_eval.pair_records(bench, scores)
  assert [r["pred"] for r in recs] == [[0, 1], [0, 0], [1, 0]]
  assert [r["gold"] for r in recs] == [[0, 1], [0, 1], [1, 0]]
  assert [r["correct"] for r in recs] == [True, False, True]
  rep = mmvp_eval.mmvp_report(recs)
  assert [(c["category"], c["correct"], c["n"]) for c in rep["categories"]] == [
      ("A", 1, 2), ("B", 1, 1)]
  assert rep["average"]["acc"] == pytest.approx(0.75)      # mean of 50% and 100%
  assert rep["average"]["ci95"] is None                    # categories of unequal size
  assert rep["all"]["correct"] == 2 and rep["statements"]["correct"] == 5


def test_evaluate_mode_writes_files_and_stage2_ignores_positions(tmp_path):
  root = str(tmp_path / "MMVP VLM")
  mmvp.write_standin(root, pairs_per_category=3, categories=CATS, image_size=32)
  export = make_export(tmp_path / "ft2")
  cfg = mmvp_config.get_config("tiny,head=stage2")
  cfg.num_devices, cfg.eval.checkpoint, cfg.data.mmvp_dir = 1, export, root
  cfg.eval.mmvp_pairs_per_category = 3
  cfg.eval.sets_per_batch = 4                   # 6 pairs: a full and a padded batch
  out = str(tmp_path / "run")
  rep = evaluate.run(cfg, out)
  files = rep["files"]
  assert sorted(files) == ["leaderboard", "predictions", "report"]
  lines = [json.loads(x) for x in open(files["predictions"])]
  assert [x["question_ids"] for x in lines] == [[2 * i + 1, 2 * i + 2] for i in range(6)]
  board = json.load(open(files["leaderboard"]))
  assert list(board) == [f"{2 * i + 1}_{2 * i + 2}" for i in range(6)]
  assert [board[k] for k in board] == [x["pred"] for x in lines]
  on_disk = json.load(open(files["report"]))
  assert on_disk["head"] == "stage2" and on_disk["pairs"] == 6
  assert [c["category"] for c in on_disk["categories"]] == list(CATS)
  assert on_disk["all"]["correct"] == sum(x["correct"] for x in lines)
  for x in lines:
    s = np.array(x["scores"])
    assert x["pred"] == [0 if a > b else 1 for a, b in s]
  # The position embedding is off: changing it changes no score.
  model, params, mesh, shardings = evaluate.load_eval_params(cfg, out)
  ev = mmvp_eval.MmvpEvaluator(model, "stage2", cfg, mesh, shardings)
  bench = mmvp.read_mmvp(root, pairs_per_category=3)
  base = ev.scores(params, bench)
  np.testing.assert_allclose(base, np.array([x["scores"] for x in lines]), atol=1e-6)
  pos = params["context_encoder"]["positional_emb"]["embedding"]
  moved = {**params, "context_encoder": {**params["context_encoder"],
                                         "positional_emb": {"embedding": pos + 5.0}}}
  np.testing.assert_array_equal(ev.scores(moved, bench), base)
  # The same scores as the model's own candidate scoring of each statement with is_video 0.
  from contextblip_jax.models.contextblip import ContextBlip
  p = bench.pairs[0]
  batch = mmvp_eval.pair_batch(bench, [0], image_size=32, encoder=ev.encoder)
  v = {"params": params}
  embeds = model.apply(v, batch["images"], method=ContextBlip.encode_candidates)
  for j in range(2):
    direct = model.apply(v, embeds, batch["input_ids"][:, j], batch["attention_mask"][:, j],
                         "stage2", np.zeros((1,)), method=ContextBlip.candidate_scores)
    np.testing.assert_allclose(np.asarray(direct)[0], base[p.index, j], atol=1e-5)


def test_config_requires_the_data_path(tmp_path):
  cfg = mmvp_config.get_config("tiny")
  with pytest.raises(ValueError, match="config.data.mmvp_dir is required"):
    evaluate.run(cfg, str(tmp_path))
