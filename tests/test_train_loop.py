"""Training loop: a resumed run reproduces the uninterrupted losses exactly (after a crash and
after SIGTERM), finished stages are reused, skipped training items are counted."""

import json
import os
import shutil
import signal

import pytest

from tests.helpers.checkpoints import make_tiny_checkpoint
from configs import finetune_stage1
from contextblip_jax.data import imagecode
from contextblip_jax.run import train
from contextblip_jax.storage import param_dir
from contextblip_jax.storage import workdir as wd
from tests.helpers.loops import compilation_cache, make_data

N = 4   # steps; checkpoints every N/2


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp("train")
  data = make_data(root)
  with open(os.path.join(data, "train_data.json")) as f:
    first = next(iter(json.load(f)))
  shutil.rmtree(os.path.join(data, "image-sets", first))   # one bad set, skipped
  ckpt = make_tiny_checkpoint(root, with_adapter=True)
  with compilation_cache(root / "xla_cache"):
    yield dict(root=root, data=data, ckpt=ckpt, skipped_set=first)


def _config(env):
  c = finetune_stage1.get_config("tiny")
  c.init_checkpoint = str(env["ckpt"])
  c.data.imagecode_dir = env["data"]
  c.data.on_error = "skip"
  c.train.num_steps = N
  c.train.save_every = N // 2
  c.train.log_every = 1
  c.eval.max_sets = 2
  c.eval.visualize = 0
  c.num_devices = 2                       # sharded (data-parallel) state, cheaper compile than 8
  return c


class Recorder:
  """Hook recording each step's loss; can crash or send SIGTERM at a given step."""

  def __init__(self, crash_at=None, sigterm_at=None):
    self.losses, self.crash_at, self.sigterm_at = {}, crash_at, sigterm_at

  def __call__(self, step, metrics):
    self.losses[step] = metrics["loss"]
    if step == self.crash_at:
      raise RuntimeError("simulated crash")
    if step == self.sigterm_at:
      os.kill(os.getpid(), signal.SIGTERM)


def test_resumed_runs_reproduce_uninterrupted_losses(env):
  root = env["root"]
  full = Recorder()
  summary = train.train_and_evaluate(_config(env), str(root / "full"), hooks=[full])
  assert sorted(full.losses) == list(range(1, N + 1))
  assert summary["final_step"] == N and os.path.isfile(root / "full" / wd.DONE)
  assert summary["skipped_descriptions"] > 0

  # SIGTERM at step 1: that step is saved and the run returns cleanly.
  run = root / "interrupted"
  term = Recorder(sigterm_at=1)
  out = train.train_and_evaluate(_config(env), str(run), hooks=[term])
  assert out["preempted"] and out["step"] == 1
  assert not os.path.exists(run / wd.DONE)
  # Resumed at step 1, then a crash after the periodic checkpoint at N/2 ...
  crashed = Recorder(crash_at=N // 2 + 1)
  with pytest.raises(RuntimeError, match="simulated crash"):
    train.train_and_evaluate(_config(env), str(run), hooks=[crashed])
  assert sorted(crashed.losses) == list(range(2, N // 2 + 2))
  # ... and resumed again at N/2: every step's loss equals the uninterrupted run's, bit-exact.
  last = Recorder()
  train.train_and_evaluate(_config(env), str(run), hooks=[last])
  assert sorted(last.losses) == list(range(N // 2 + 1, N + 1))
  resumed = {1: term.losses[1], **{s: crashed.losses[s] for s in range(2, N // 2 + 1)},
             **last.losses}
  assert resumed == full.losses


def test_finished_stage_is_reused_and_skips_are_logged(env):
  root = env["root"]
  workdir = root / "full"
  if not os.path.isfile(workdir / wd.DONE):
    train.train_and_evaluate(_config(env), str(workdir))
  calls = Recorder()
  again = train.train_and_evaluate(_config(env), str(workdir), hooks=[calls])
  assert not calls.losses and again["final_step"] == N
  records = [json.loads(x) for x in open(workdir / "metrics.jsonl")]
  assert records[0]["skipped_descriptions"] == again["skipped_descriptions"] > 0
  losses = [r for r in records if "loss" in r and r["stage"] == "finetune1"]
  assert [r["step"] for r in losses][:N] == list(range(1, N + 1))
  export = param_dir.load_param_dir(str(workdir))
  assert export.provenance["stage"] == "finetune1" and "prediction_layer" in export.params
  assert export.provenance["init"]["path"] == env["ckpt"]
  assert export.provenance["init"]["provenance"]["source"].startswith("random tiny BLIP")


def test_missing_init_and_bad_mode_are_clear_errors(env, tmp_path):
  c = _config(env)
  c.init_checkpoint = ""
  with pytest.raises(ValueError, match="init_workdir"):
    train.train_and_evaluate(c, str(tmp_path / "x"))
  c = _config(env)
  with c.unlocked():
    c.mode = "evaluate"
  with pytest.raises(ValueError, match="not a training stage"):
    train.train_and_evaluate(c, str(tmp_path / "y"))


def test_epoch_evaluations_export_the_best_epoch(env):
  c = _config(env)
  c.train.num_steps = 12
  c.train.eval_every_epochs = 1
  c.train.select_best = True
  c.train.validate_last_epoch = True      # the last parameters compete too
  c.train.log_every = 4
  c.train.save_every = 100
  out = train.train_and_evaluate(c, str(env["root"] / "best"))
  spe = out["steps_per_epoch"]
  evals = list(range(spe, 12, spe))
  assert evals and out["best_step"] in evals + [12]
  accs = {12: out["valid"]["all"]["acc"]}
  for e, step in enumerate(evals, start=1):
    path = env["root"] / "best" / wd.EVAL / f"stage1_valid_epoch{e}.report.json"
    accs[step] = json.loads(path.read_text())["all"]["acc"]
  assert out["best_valid_acc"] == max(accs.values())
  assert accs[out["best_step"]] == max(accs.values())
  export = param_dir.load_param_dir(str(env["root"] / "best"))
  assert export.provenance["step"] == out["best_step"]
  assert export.provenance["valid_acc"] == out["best_valid_acc"]


@pytest.mark.parametrize("last", [False, True])
def test_validation_timing(env, monkeypatch, last):
  """train.validate_last_epoch=False (the reference): the validations after epochs 0..E-2
  are the selection candidates, the last parameters are evaluated but never exported as the
  best; True: they compete. Valid accuracy rises with the step here (a stand-in evaluator),
  so the two choices export different steps. An epoch keeps its partial last batch."""
  calls = []

  def evaluate(self, state, name, writer, step):
    calls.append((name, step))
    return {"all": {"acc": step / 1000.0}}
  monkeypatch.setattr(train._Eval, "__call__", evaluate)
  c = _config(env)
  c.train.num_steps, c.train.num_epochs, c.train.batch_size = 0, 3, 6
  c.train.eval_every_epochs, c.train.select_best = 1, True
  c.train.validate_last_epoch = last
  c.train.save_every = 100
  out = train.train_and_evaluate(c, str(env["root"] / f"timing_{last}"))
  n = len(imagecode.load_split(c, "train").examples)
  spe = out["steps_per_epoch"]
  assert n % 6 and spe == -(-n // 6) and out["final_step"] == 3 * spe   # ceil(N / B)
  assert calls == [("stage1_valid_epoch1", spe), ("stage1_valid_epoch2", 2 * spe),
                   ("stage1_valid", 3 * spe)]
  best = 3 * spe if last else 2 * spe
  assert out["best_step"] == best and out["valid"]["all"]["acc"] == 3 * spe / 1000.0
  export = param_dir.load_param_dir(str(env["root"] / f"timing_{last}"))
  assert export.provenance["step"] == best and export.provenance["valid_acc"] == best / 1000.0
