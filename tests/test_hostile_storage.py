"""Hostile cases for what a run keeps on disk (issue 12, items 1-4 and 6): the workdir lock,
workdirs that must be refused, the restart rule, overwrite protection and corrupt checkpoints.
No training here (tests/test_hostile_train.py runs the loop)."""

import glob
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contextblip_jax.storage import atomic, checkpoints, lock
from contextblip_jax.storage import workdir as wd
from tests.helpers.checkpoints import make_tiny_checkpoint


# ------------------------------------------------------------------ lock (item 4)

def _write_lock(d, **fields):
  os.makedirs(d, exist_ok=True)
  rec = {"pid": os.getpid(), "host": socket.gethostname(), "start": 0.0, **fields}
  with open(os.path.join(d, lock.LOCK), "w") as f:
    json.dump(rec, f)


def test_lock_is_exclusive_and_released_on_exception(tmp_path):
  d = str(tmp_path / "w")
  with pytest.raises(RuntimeError, match="boom"):
    with lock.WorkdirLock(d):
      assert os.path.isfile(os.path.join(d, lock.LOCK))
      with open(os.path.join(d, lock.LOCK)) as f:
        rec = json.load(f)
      assert rec["pid"] == os.getpid() and rec["host"] == socket.gethostname()
      raise RuntimeError("boom")
  assert not os.path.exists(os.path.join(d, lock.LOCK))


def test_lock_of_a_live_process_refuses_at_once(tmp_path):
  d = str(tmp_path / "w")
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    _write_lock(d, pid=sleeper.pid)
    with pytest.raises(lock.WorkdirBusyError, match=f"in use by process {sleeper.pid}"):
      lock.WorkdirLock(d).acquire()
    assert os.path.isfile(os.path.join(d, lock.LOCK))        # not removed
  finally:
    sleeper.kill()
    sleeper.wait()


def test_stale_lock_of_a_dead_process_is_replaced(tmp_path, caplog):
  d = str(tmp_path / "w")
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  _write_lock(d, pid=dead.pid)
  with lock.WorkdirLock(d):
    with open(os.path.join(d, lock.LOCK)) as f:
      assert json.load(f)["pid"] == os.getpid()
  assert "stale lock" in caplog.text and str(dead.pid) in caplog.text


def test_lock_from_another_host_names_the_host_and_the_file(tmp_path):
  d = str(tmp_path / "w")
  _write_lock(d, host="other-node-7", pid=1)
  with pytest.raises(lock.WorkdirBusyError, match="other-node-7") as e:
    lock.WorkdirLock(d).acquire()
  assert os.path.join(d, lock.LOCK) in str(e.value) and "remove" in str(e.value)
  with open(os.path.join(d, lock.LOCK), "w") as f:
    f.write("")                                            # a crash between create and write
  with pytest.raises(lock.WorkdirBusyError, match="unreadable lock"):
    lock.WorkdirLock(d).acquire()


# ------------------------------------------------------------------ workdir refusal (item 2)

def test_parameter_dirs_exports_and_foreign_dirs_are_refused_as_workdirs(tmp_path):
  ckpt = make_tiny_checkpoint(tmp_path)
  with pytest.raises(wd.WorkdirError, match="is a parameter directory"):
    wd.check_workdir(ckpt, "finetune1")
  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "config.json").write_text("{}")
  (hf / "model.safetensors").write_text("")
  with pytest.raises(wd.WorkdirError, match="Hugging Face"):
    wd.check_workdir(str(hf), "pretrain")
  home = tmp_path / "home"
  home.mkdir()
  (home / "thesis.tex").write_text("years of work")
  with pytest.raises(wd.WorkdirError, match=r"not empty and not a workdir \(it holds thesis\.tex"):
    wd.check_workdir(str(home), "pretrain")
  run = tmp_path / "run"
  run.mkdir()
  (run / "config.json").write_text(json.dumps({"mode": "pretrain"}))
  (run / "metrics.jsonl").write_text("")
  (run / "restarted.20250101-000000").mkdir()
  wd.check_workdir(str(run), "pretrain")                     # a workdir: accepted
  with pytest.raises(wd.WorkdirError, match="'pretrain' run, not 'finetune1'"):
    wd.check_workdir(str(run), "finetune1")
  wd.check_workdir(str(tmp_path / "new"), "pretrain")        # missing: fine
  assert os.listdir(ckpt) and os.path.isfile(os.path.join(ckpt, "provenance.json"))


# ------------------------------------------------------------------ restart rule (item 3)

def test_previous_run_is_found_and_restart_moves_it_aside(tmp_path):
  d = tmp_path / "run"
  (d / "ckpt" / "4.orbax-checkpoint-tmp-123").mkdir(parents=True)
  (d / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
  (d / "config.json").write_text(json.dumps({"mode": "pretrain"}))
  found = wd.previous_run(str(d))
  assert "metrics.jsonl" in found and any("orbax-checkpoint-tmp" in f for f in found)
  dest = wd.move_previous_run(str(d))
  assert os.path.basename(dest).startswith("restarted.")
  assert sorted(os.listdir(dest)) == ["ckpt", "metrics.jsonl"]
  assert wd.previous_run(str(d)) == [] and os.path.isfile(d / "config.json")


def test_keep_checkpoints_zero_is_refused_by_the_checkpointer(tmp_path):
  with pytest.raises(ValueError, match="max_to_keep must be >= 1"):
    checkpoints.Checkpointer(str(tmp_path / "c"), max_to_keep=0)


# ------------------------------------------------------------------ overwrite (item 1)

def test_overwrite_replaces_only_marked_directories_never_the_source(tmp_path):
  ours = lambda d: os.path.isfile(os.path.join(d, "MARK"))   # noqa: E731
  parent = tmp_path / "P"
  (parent / "model").mkdir(parents=True)
  src = parent / "model" / "w.pth"
  src.write_text("weights")
  (parent / "sibling").mkdir()
  for out in (parent, parent / "model"):
    with pytest.raises(FileExistsError, match="holds the source"):
      atomic.check_replaceable(str(out), [str(src)], ours, "x")
  with pytest.raises(FileExistsError, match="is the source"):
    atomic.check_replaceable(str(parent / "model"), [str(parent / "model")], ours, "x")
  with pytest.raises(FileExistsError, match="no marker"):     # an arbitrary directory
    atomic.check_replaceable(str(parent), [], ours, "x")
  link = tmp_path / "link"
  link.symlink_to(parent / "model")
  with pytest.raises(FileExistsError, match="is the source"):
    atomic.check_replaceable(str(link), [str(parent / "model")], ours, "x")
  (parent / "sibling" / "MARK").write_text("")
  atomic.check_replaceable(str(parent / "sibling"), [str(src)], ours, "x")   # ours: allowed
  atomic.check_replaceable(str(tmp_path / "empty_or_missing"), [str(src)], ours, "x")
  assert src.read_text() == "weights"


def test_atomic_directory_puts_the_old_directory_back_when_the_rename_fails(tmp_path,
                                                                           monkeypatch):
  out = tmp_path / "out"
  out.mkdir()
  (out / "old.txt").write_text("old")
  real = os.rename

  def flaky(a, b):
    if str(b) == str(out) and ".out.tmp-" in str(a):
      raise OSError("simulated rename failure")
    return real(a, b)
  monkeypatch.setattr(atomic.os, "rename", flaky)
  with pytest.raises(OSError, match="simulated"):
    with atomic.atomic_directory(str(out)) as tmp:
      open(os.path.join(tmp, "new.txt"), "w").close()
  assert (out / "old.txt").read_text() == "old"
  assert sorted(os.listdir(tmp_path)) == ["out"]


# ------------------------------------------------------------------ corrupt checkpoints (item 6)

def _truncate(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**"), recursive=True)
           if os.path.isfile(f) and "/d/" in f]
  big = max(files, key=os.path.getsize)
  with open(big, "r+b") as f:
    f.truncate(os.path.getsize(big) // 2)


def _missing_item(step_dir):
  shutil.rmtree(os.path.join(step_dir, "state"))


def _garbage_metadata(step_dir):
  for name in (os.path.join("state", "_METADATA"), os.path.join("meta", "metadata")):
    with open(os.path.join(step_dir, name), "w") as f:
      f.write("{garbage")


def _empty_step(step_dir):
  shutil.rmtree(step_dir)
  os.makedirs(step_dir)


_ABSTRACT = {"w": jax.ShapeDtypeStruct((1000,), jnp.float32)}


@pytest.mark.parametrize("corrupt", [_truncate, _missing_item, _garbage_metadata, _empty_step],
                         ids=["truncated_array", "missing_item", "garbage_metadata", "empty_step"])
def test_corrupt_latest_step_falls_back_naming_it(tmp_path, caplog, corrupt):
  d = str(tmp_path / "ckpt")
  with checkpoints.Checkpointer(d, max_to_keep=3, async_save=False) as c:
    for s in (1, 2):
      c.save(s, {"w": jnp.arange(1000.0) + s}, meta={"s": s}, force=True)
  corrupt(os.path.join(d, "2"))
  with checkpoints.Checkpointer(d, corrupt_dir=str(tmp_path / "bad")) as c:
    state, meta, step = c.restore_intact(_ABSTRACT)
    assert step == 1 and meta == {"s": 1} and c.all_steps() == [1]
    np.testing.assert_array_equal(state["w"], np.arange(1000.0) + 1)
  assert os.path.join(d, "2") in caplog.text                  # the bad one, by path
  assert [n.split(".")[0] for n in os.listdir(tmp_path / "bad")] == ["2"]   # kept aside
  with checkpoints.Checkpointer(d) as c:
    assert c.latest_step() == 1


def test_no_intact_step_fails_naming_the_path_and_moves_nothing(tmp_path):
  d = str(tmp_path / "ckpt")
  with checkpoints.Checkpointer(d, max_to_keep=1, async_save=False) as c:
    c.save(3, {"w": jnp.arange(1000.0)}, force=True)
  _truncate(os.path.join(d, "3"))
  with checkpoints.Checkpointer(d) as c:
    with pytest.raises(checkpoints.CheckpointRestoreError, match=os.path.join(d, "3")):
      c.restore_intact(_ABSTRACT)
  assert os.path.isdir(os.path.join(d, "3"))
