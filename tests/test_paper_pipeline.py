"""Every step of the README's paper-reproduction sequence, on generated stand-ins:

  1. python -m weight_convert --src model_base.pth --out blip_base      (a random tiny BLIP
     saved in the original Salesforce key layout)
  2. main --config configs/pretrain.py   --config.init_checkpoint=blip_base  (pairs.json in the
     BLIP {image, caption} format)
  3. main --config configs/zeroshot.py   --config.eval.checkpoint=<pretrain workdir>  (valid)
  4. main --config configs/finetune_stage1.py --config.init_workdir=<pretrain workdir>
  5. main --config configs/finetune_stage2.py --config.init_workdir=<stage-1 workdir>
  6. main --config configs/evaluate.py:predict,head=stage2 -> leaderboard JSON for the
     unlabelled test file
  7. python -m contextblip_jax.score and python -m weight_convert export on the stage-2 workdir
with the tiny configs (':tiny') and a few generated images in the IMAGECODE layout.
"""

import json
import os

import numpy as np

from tests.helpers import torch_reference as tr
from configs import evaluate as evaluate_config
from configs import finetune_stage1, finetune_stage2, pretrain, zeroshot
from contextblip_jax.evaluation import accuracy
from contextblip_jax.evaluation import scorer
from contextblip_jax.run import cli as main
from contextblip_jax.storage import param_dir
from tests.helpers.loops import compilation_cache, make_data
from weight_convert.__main__ import main as convert_main


def _data(cfg, data):
  cfg.data.imagecode_dir = data
  cfg.data.pairs_json = os.path.join(data, "pairs.json")
  cfg.eval.max_sets = 3
  cfg.eval.visualize = 0
  cfg.train.num_steps = 2
  cfg.num_devices = 1            # one device: half the compile time (sharding: other tests)
  return cfg


def test_paper_sequence_on_generated_stand_ins(tmp_path):
  data = make_data(tmp_path, n_train_sets=6, n_valid_sets=3, n_test_sets=2, n_pairs=24)
  # 1. conversion of an original-format checkpoint (random tiny weights, real key names)
  model = tr.build_hf_model(tr.hf_config(), seed=0)
  pth = tr.save_original(tr.original_state_dict(model), str(tmp_path / "model_base.pth"))
  blip = str(tmp_path / "blip_base")
  assert convert_main(["--src", pth, "--out", blip, "--vision-heads", "4",
                       "--text-heads", "4"]) == 0
  assert param_dir.load_param_dir(blip).provenance["writer"] == "weight_convert"
  runs = tmp_path / "runs"
  with compilation_cache(tmp_path / "xla_cache"):
    # 2. ContextBLIP pre-training from the converted BLIP (frozen), adapter + TMIM train
    c = _data(pretrain.get_config("tiny"), data)
    c.init_checkpoint = blip
    pre = main.run(c, str(runs / "pretrain"))
    assert pre["final_step"] == 2 and pre["valid"]["head"] == "zero_shot"
    exported = param_dir.load_param_dir(str(runs / "pretrain"))
    assert {"pretrained_blip", "vision_adapter", "visual_decoder"} <= set(exported.params)
    # 3. zero-shot evaluation of the pre-trained model on valid
    c = zeroshot.get_config("tiny")
    c.data.imagecode_dir, c.eval.checkpoint, c.eval.visualize = data, str(runs / "pretrain"), 0
    c.num_devices = 1
    zs = main.run(c, str(runs / "zeroshot"))
    assert zs["all"]["n"] > 0 and zs["head"] == "zero_shot"
    # 4-5. fine-tuning stages 1 and 2, each from the previous workdir
    c = _data(finetune_stage1.get_config("tiny"), data)
    c.init_workdir = str(runs / "pretrain")
    s1 = main.run(c, str(runs / "finetune1"))
    c = _data(finetune_stage2.get_config("tiny"), data)
    c.init_workdir = str(runs / "finetune1")
    s2 = main.run(c, str(runs / "finetune2"))
    assert s1["valid"]["head"] == "stage1" and s2["valid"]["head"] == "stage2"
    ft1 = param_dir.load_param_dir(str(runs / "finetune1"))
    ft2 = param_dir.load_param_dir(str(runs / "finetune2"))
    assert ft2.provenance["init"]["provenance"]["stage"] == "finetune1"
    # stage 2 trains only the context encoder: everything else equals stage 1's export
    for group in ("pretrained_blip", "prediction_layer"):
      flat1 = json.dumps(_digest(ft1.params[group]))
      assert flat1 == json.dumps(_digest(ft2.params[group])), group
    # 6. test-set predictions -> the leaderboard JSON in the test file's order
    c = evaluate_config.get_config("tiny,predict,head=stage2")
    c.data.imagecode_dir, c.eval.checkpoint = data, str(runs / "finetune2")
    c.num_devices = 1
    pred = main.run(c, str(runs / "predict"))
  with open(os.path.join(data, "test_data_unlabeled.json")) as f:
    test = json.load(f)
  with open(pred["files"]["leaderboard"]) as f:
    board = json.load(f)
  assert board == accuracy.leaderboard(
      accuracy.read_predictions(pred["files"]["predictions"]), test)
  assert [len(v) for v in board.values()] == [len(v) for v in test.values()]
  # 7. the scoring command and the HF export read the stage-2 workdir like any parameter dir
  image_dir = os.path.join(data, "image-sets", next(iter(test)))
  images = sorted(os.path.join(image_dir, f) for f in os.listdir(image_dir))[:3]
  assert scorer.main(["--checkpoint", str(runs / "finetune2"), "--text", "a dog", *images]) == 0
  hf_out = str(tmp_path / "hf_finetune2")
  assert convert_main(["export", "--checkpoint", str(runs / "finetune2"), "--out", hf_out]) == 0
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  hf = load_file(os.path.join(hf_out, "model.safetensors"))
  np.testing.assert_array_equal(
      hf["itm_head.weight"], np.asarray(ft2.params["pretrained_blip"]["itm_head"]["kernel"]).T)


def _digest(tree):
  import numpy as np
  import jax
  return [float(np.asarray(x, np.float64).sum()) for x in jax.tree.leaves(tree)]
