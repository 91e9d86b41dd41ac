"""Hostile training runs (issue 12, items 2, 3, 4, 5, 7, 8): a diverged run stops naming the
step and keeps the last good checkpoint; foreign workdirs, busy workdirs, bad configs and a
previous run without a checkpoint are refused before any training; restart and a changed
`built_from` start over with the old files moved aside, never deleted."""

import json
import os

import jax.numpy as jnp
import pytest

from configs import finetune_stage1
from contextblip_jax.run import demo, train
from contextblip_jax.run.validate_config import ConfigError
from contextblip_jax.storage import lock
from contextblip_jax.storage import workdir as wd
from contextblip_jax.training import objectives
from tests.helpers.checkpoints import make_tiny_checkpoint
from tests.helpers.loops import compilation_cache, make_data

N = 4


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp("hostile_train")
  data = make_data(root)
  ckpt = make_tiny_checkpoint(root, with_adapter=True)
  with compilation_cache(root / "xla_cache"):
    yield dict(root=root, data=data, ckpt=ckpt)


def _config(env, **train):
  c = finetune_stage1.get_config("tiny")
  c.init_checkpoint = str(env["ckpt"])
  c.data.imagecode_dir = env["data"]
  c.train.num_steps = N
  c.train.save_every = 2
  c.train.log_every = 1
  c.eval.max_sets = 2
  c.eval.visualize = 0
  c.num_devices = 1
  for k, v in train.items():
    c.train[k] = v
  return c


class Steps:
  def __init__(self, crash_at=None):
    self.seen, self.crash_at = [], crash_at

  def __call__(self, step, metrics):
    self.seen.append(step)
    if step == self.crash_at:
      raise RuntimeError("simulated crash")


def test_non_finite_loss_stops_at_that_step_and_keeps_the_last_good_checkpoint(env,
                                                                                monkeypatch):
  run = env["root"] / "diverged"
  with pytest.raises(RuntimeError, match="simulated crash"):
    train.train_and_evaluate(_config(env), str(run), hooks=[Steps(crash_at=3)])
  assert wd.previous_run(str(run)) and os.path.isdir(run / "ckpt" / "2")
  original = objectives.LOSSES["finetune_stage1"]

  def nan_loss(*args, **kwargs):
    loss, metrics = original(*args, **kwargs)
    return loss * jnp.nan, metrics
  monkeypatch.setitem(objectives.LOSSES, "finetune_stage1", nan_loss)
  with pytest.raises(train.TrainingDivergedError) as e:
    train.train_and_evaluate(_config(env), str(run))
  msg = str(e.value)
  assert "non-finite loss at step 3" in msg and os.path.join(str(run), "ckpt", "2") in msg
  assert not os.path.exists(run / wd.EXPORT) and not os.path.exists(run / wd.DONE)
  assert sorted(int(n) for n in os.listdir(run / "ckpt") if n.isdigit()) == [2]
  assert not os.path.exists(run / lock.LOCK)                       # released on the error
  records = [json.loads(x) for x in open(run / "metrics.jsonl")]
  assert all(isinstance(r.get("loss", 0.0), (float, str)) for r in records)   # strict JSON


def test_bad_workdirs_configs_and_lost_checkpoints_are_refused_before_training(env, tmp_path):
  calls = Steps()
  with pytest.raises(wd.WorkdirError, match="is a parameter directory"):
    train.train_and_evaluate(_config(env), env["ckpt"], hooks=[calls])
  assert json.load(open(os.path.join(env["ckpt"], "provenance.json")))["format"]
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("mine")
  with pytest.raises(wd.WorkdirError, match="not a workdir"):
    train.train_and_evaluate(_config(env), str(foreign), hooks=[calls])
  with pytest.raises(ConfigError, match="train.keep_checkpoints=0"):
    train.train_and_evaluate(_config(env, keep_checkpoints=0), str(tmp_path / "k"))
  busy = tmp_path / "busy"
  busy.mkdir()
  (busy / lock.LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere", "start": 0}))
  with pytest.raises(lock.WorkdirBusyError, match="host elsewhere"):
    train.train_and_evaluate(_config(env), str(busy), hooks=[calls])
  lost = tmp_path / "lost"             # keep_checkpoints=0 used to leave this after a kill
  (lost / "ckpt" / "2.orbax-checkpoint-tmp-99").mkdir(parents=True)
  (lost / "metrics.jsonl").write_text('{"step": 1, "loss": 2.3, "stage": "finetune1"}\n')
  with pytest.raises(wd.WorkdirError, match=r"previous run left metrics\.jsonl.*restart=True"):
    train.train_and_evaluate(_config(env), str(lost), hooks=[calls])
  assert not calls.seen and (lost / "metrics.jsonl").read_text()
  assert not os.path.exists(lost / lock.LOCK)


def test_changed_inputs_rebuild_the_stage_and_restart_moves_files_aside(env):
  run = env["root"] / "fingerprinted"
  a = {"stage": "finetune1", "fingerprint": "a"}
  first = Steps()
  train.train_and_evaluate(_config(env), str(run), hooks=[first], built_from=a)
  assert first.seen == list(range(1, N + 1)) and wd.read_built_from(str(run)) == a
  again = Steps()
  out = train.train_and_evaluate(_config(env), str(run), hooks=[again], built_from=a)
  assert out == wd.read_done(str(run)) and not again.seen          # same inputs: reused
  rebuilt = Steps()
  b = {"stage": "finetune1", "fingerprint": "b"}
  train.train_and_evaluate(_config(env), str(run), hooks=[rebuilt], built_from=b)
  assert rebuilt.seen == list(range(1, N + 1)) and wd.read_built_from(str(run)) == b
  moved = [n for n in os.listdir(run) if n.startswith("restarted.")]
  assert len(moved) == 1 and wd.DONE in os.listdir(run / moved[0])
  restart = _config(env, restart=True)
  again = Steps()
  train.train_and_evaluate(restart, str(run), hooks=[again])        # starts over
  assert again.seen == list(range(1, N + 1))
  requeued = Steps()
  train.train_and_evaluate(restart, str(run), hooks=[requeued])     # same command again:
  assert not requeued.seen                                          # finished, not restarted
  assert len([n for n in os.listdir(run) if n.startswith("restarted.")]) == 2


def test_demo_fingerprints_change_with_data_config_and_previous_stage_not_paths():
  from configs import demo as demo_config
  cfg = demo_config.get_config("tiny")
  c = demo._stage_config(cfg, "pretrain", "/data/a", "/work/a")
  base = demo.stage_fingerprint(c, "data1", "prev1")
  moved = demo.stage_fingerprint(demo._stage_config(cfg, "pretrain", "/data/b", "/work/b"),
                                 "data1", "prev1")
  assert moved == base                                             # locations are not inputs
  assert demo.stage_fingerprint(c, "data2", "prev1")["fingerprint"] != base["fingerprint"]
  assert demo.stage_fingerprint(c, "data1", "prev2")["fingerprint"] != base["fingerprint"]
  c.optim.lr = 5e-4
  assert demo.stage_fingerprint(c, "data1", "prev1")["fingerprint"] != base["fingerprint"]
