"""The command line: every config file parses (with ':tiny'), flag overrides are checked, the
CLI runs a mode end to end in a subprocess, and the demo job runs (tiny) and reuses its stages."""

import importlib
import json
import os
import subprocess
import sys

import pytest

from configs import common
from contextblip_jax.run import demo
from contextblip_jax.run import cli as main
from tests.helpers.loops import compilation_cache, make_data, make_export

CONFIGS = ("backbone", "pretrain", "finetune_stage1", "finetune_stage2", "evaluate",
           "zeroshot", "demo")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_parses_plain_and_tiny(name):
  mod = importlib.import_module(f"configs.{name}")
  full, tiny = mod.get_config(), mod.get_config("tiny")
  assert full.mode in common.MODES and tiny.mode == full.mode
  if name != "demo":
    assert tiny.model.variant == "tiny" and full.model.variant == "B/16"
    assert tiny.train.num_steps > 0


def test_paper_settings_in_configs():
  from configs import finetune_stage1, finetune_stage2, pretrain
  p = pretrain.get_config()
  assert (p.optim.lr, p.optim.weight_decay, p.train.batch_size) == (3e-4, 0.05, 1024)
  assert p.objective.mask_ratio == 0.25 and p.model.adapter_reduction == 2 and p.model.use_tmim
  nomim = pretrain.get_config("nomim")
  assert nomim.objective.mask_ratio == 0.0 and not nomim.model.use_tmim
  f1, f2 = finetune_stage1.get_config(), finetune_stage2.get_config()
  assert dict(f1.optim.lrs) == {"head": 1e-4, "blip": 2e-6} and f1.train.num_epochs == 40
  assert f1.optim.weight_decay == 0.2 and f1.train.batch_size == 36
  assert f2.optim.lrs.context == 2e-6 and f2.train.num_epochs == 20
  assert finetune_stage2.get_config("lr=1e-4").optim.lrs.context == 1e-4
  assert f2.freeze[0] == ("context_encoder/.*", "train")


def test_parse_arg_rejects_unknown_and_types_values():
  a = common.parse_arg("tiny,steps=7", tiny=False, steps=0, lr=1e-3)
  assert a.tiny is True and a.steps == 7 and a.lr == 1e-3
  with pytest.raises(ValueError, match="unknown config argument 'bogus'"):
    common.parse_arg("bogus", tiny=False)
  with pytest.raises(ValueError, match="needs a value"):
    common.parse_arg("steps", steps=0)


def _cli(args, **kw):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return subprocess.run([sys.executable, "-m", "contextblip_jax.main", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=600, **kw)


def test_cli_predict_writes_leaderboard_and_rejects_unknown_override(tmp_path):
  data = make_data(tmp_path)
  export = make_export(tmp_path / "ft2")
  out = tmp_path / "run"
  proc = _cli(["--config", "configs/evaluate.py:tiny,predict,head=stage2", "--workdir",
               str(out), f"--config.data.imagecode_dir={data}",
               f"--config.eval.checkpoint={export}", "--config.eval.visualize=0"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / "eval" / "stage2_test.leaderboard.json") as f:
    board = json.load(f)
  with open(os.path.join(data, "test_data_unlabeled.json")) as f:
    assert list(board) == list(json.load(f))
  bad = _cli(["--config", "configs/evaluate.py:tiny", "--workdir", str(out),
              "--config.train.no_such_field=1"])
  assert bad.returncode != 0 and "no_such_field" in bad.stderr


def test_demo_tiny_runs_every_stage_and_reuses_them(tmp_path, capsys):
  from configs import demo as demo_config
  cfg = demo_config.get_config("tiny")
  cfg.num_devices = 1
  with compilation_cache(tmp_path / "xla_cache"):
    summary = main.run(cfg, str(tmp_path / "demo"))
  out = capsys.readouterr().out
  for stage in demo.STAGES:
    assert os.path.isfile(tmp_path / "demo" / stage / "DONE.json")
  for name in ("pretrain", "finetune1", "finetune2"):
    assert 0.0 <= summary[name]["valid"]["all"]["acc"] <= 1.0
    assert "vs chance 10%" in out
  report = (tmp_path / "demo" / "report.md").read_text()
  assert "| chance | 10.0 |" in report and "stage 2" in report
  assert os.path.isfile(summary["predict"]["files"]["leaderboard"])
  assert any(f.endswith(".png") for f in os.listdir(tmp_path / "demo" / "finetune2" / "eval"))
  again = main.run(cfg, str(tmp_path / "demo"))       # every stage reused, nothing retrained
  assert again["reused"] == list(demo.STAGES) and not summary["reused"]
  assert again["finetune2"]["valid"] == summary["finetune2"]["valid"]
