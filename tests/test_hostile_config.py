"""Hostile configs and the command line's errors (issue 12, items 7 and 12): every bad key is
named in one message before any work, user errors exit with status 2 and one line (the
traceback only with --verbose / CONTEXTBLIP_VERBOSE=1)."""

import os
import subprocess
import sys

import pytest

from configs import demo, finetune_stage1, pretrain
from contextblip_jax.run.validate_config import ConfigError, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_bad_key_is_named_in_one_message():
  c = finetune_stage1.get_config("tiny")
  c.train.num_steps = -5
  c.train.batch_size = 0
  c.train.keep_checkpoints = 0
  c.optim.lrs.head = float("nan")
  c.optim.lrs.blip = -1.0
  c.data.on_error = "ignore"
  c.eval.head = "stage3"
  c.objective.mask_ratio = 1.5
  with pytest.raises(ConfigError) as e:
    validate(c, num_devices=1)
  msg = str(e.value)
  for key in ("train.num_steps=-5", "train.batch_size=0", "train.keep_checkpoints=0",
              "optim.lrs.head=nan", "optim.lrs.blip=-1.0", "data.on_error='ignore'",
              "eval.head='stage3'", "objective.mask_ratio=1.5"):
    assert key in msg, key
  assert "8 problems" in msg


def test_learning_rate_inf_and_batch_not_divisible_by_data_parallel_size():
  c = pretrain.get_config("tiny")
  c.optim.lr = float("inf")
  c.train.batch_size = 6
  c.train.accum_steps = 4
  with pytest.raises(ConfigError) as e:
    validate(c, num_devices=4)
  msg = str(e.value)
  assert "optim.lr=inf" in msg and "divisible by train.accum_steps=4" in msg
  assert "data-parallel size of the mesh (4 devices)" in msg
  validate(pretrain.get_config("tiny"), num_devices=8)           # the shipped config is fine


def test_demo_stages_are_checked_by_name():
  c = demo.get_config("tiny")
  c.stages.finetune2.train.save_every = 0
  with pytest.raises(ConfigError, match=r"stages\.finetune2\.train\.save_every=0"):
    validate(c, num_devices=1)


def _cli(args, **env):
  return subprocess.run([sys.executable, "-m", "contextblip_jax.main", *args], cwd=REPO,
                        env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", **env),
                        capture_output=True, text=True, timeout=300)


def test_cli_bad_config_exits_2_with_one_message_and_no_work(tmp_path):
  work = tmp_path / "w"
  args = ["--config", "configs/pretrain.py:tiny", "--workdir", str(work),
          "--config.train.num_steps=-5", "--config.optim.lr=nan", "--config.train.batch_size=0"]
  proc = _cli(args)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "train.num_steps=-5" in proc.stderr and "optim.lr=nan" in proc.stderr
  assert "train.batch_size=0" in proc.stderr and "Traceback" not in proc.stderr
  assert not work.exists()                                      # nothing was started
  verbose = _cli(args, CONTEXTBLIP_VERBOSE="1")
  assert verbose.returncode != 0 and "Traceback" in verbose.stderr


def test_cli_workdir_that_is_a_parameter_directory_exits_2_untouched(tmp_path):
  from tests.helpers.checkpoints import make_tiny_checkpoint
  ckpt = make_tiny_checkpoint(tmp_path)
  before = sorted(os.listdir(ckpt))
  proc = _cli(["--config", "configs/finetune_stage1.py:tiny", "--workdir", ckpt,
               f"--config.init_checkpoint={ckpt}", "--config.data.imagecode_dir=/nonexistent"])
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "is a parameter directory" in proc.stderr and "Traceback" not in proc.stderr
  assert sorted(os.listdir(ckpt)) == before
