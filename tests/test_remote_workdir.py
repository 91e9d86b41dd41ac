"""A gs:// workdir end to end against a local GCS emulator (issue 11, item 5): a tiny training
run into gs://bkt/run, stopped by SIGTERM after its first checkpoint and resumed from the
bucket, then an evaluation reading a fine-tuned export and the IMAGECODE data from the bucket and
writing its outputs there.
Every object is listed through the emulator's JSON API, and no local folder named `gs:` may appear.

The emulator (`gcp-storage-emulator`, requirements-dev.txt) runs on 127.0.0.1 in a subprocess
started by tests/helpers/gcs_emulator.py, which says how each client finds it and what it adds
to the emulator (the generation header and precondition tensorstore and the LOCK rely on).
"""

import os
import signal
import subprocess
import sys
import time

from tests.helpers.gcs_emulator import gcs_emulator
from tests.helpers.loops import make_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PROBE = r'''
import json, os, socket
from contextblip_jax.storage import lock, paths
d = "gs://bkt/probe"
with paths.atomic_write(paths.join(d, "a.json")) as f:
  f.write("{}")
assert paths.isdir(d) and paths.listdir(d) == ["a.json"] and paths.getsize(d + "/a.json") == 2
with paths.open(paths.join(d, "m.jsonl"), "a") as f:
  f.write("1\n")
with paths.open(paths.join(d, "m.jsonl"), "a") as f:
  f.write("2\n")
assert paths.open(paths.join(d, "m.jsonl")).read() == "1\n2\n"
with lock.WorkdirLock(d) as held:
  assert paths.isfile(held.path) and held.path == "gs://bkt/probe/LOCK"
  assert not paths.create_exclusive(held.path, b"{}")      # a second run cannot take it
assert not paths.exists(paths.join(d, "LOCK"))
other = {"pid": os.getppid(), "host": socket.gethostname(), "start": 0}   # a live run's lock
assert paths.create_exclusive(paths.join(d, "LOCK"), json.dumps(other).encode())
try:
  lock.WorkdirLock(d).acquire()
  raise SystemExit("a second lock was granted")
except lock.WorkdirBusyError as e:
  assert "in use by process" in str(e), e
paths.remove(paths.join(d, "LOCK"))
paths.rmtree(d)
assert not paths.exists(d)
print("probe ok")
'''


def _no_gs_folder(tmp_path):
  """No `gs:` folder under the test's directory (the runs' cwd) nor in the repository root."""
  assert not os.path.exists(os.path.join(REPO, "gs:"))
  for d, dirs, _ in os.walk(tmp_path):
    assert "gs:" not in dirs, f"a local folder {os.path.join(d, 'gs:')} was created"


def test_gs_workdir_trains_resumes_and_evaluates_in_the_bucket(tmp_path):
  data = make_data(tmp_path)
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  with gcs_emulator() as em:
    _train_resume_evaluate(tmp_path, data, cwd, em)
  _no_gs_folder(tmp_path)


def _train_resume_evaluate(tmp_path, data, cwd, em):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=REPO, **em.env)
  train = [sys.executable, "-m", "contextblip_jax.main", "--config",
           os.path.join(REPO, "configs/backbone.py:tiny,steps=12"), "--workdir", "gs://bkt/run",
           f"--config.data.pairs_json={os.path.join(data, 'pairs.json')}",
           "--config.train.log_every=1", "--config.train.save_every=3",
           "--config.num_devices=1", f"--config.compilation_cache={tmp_path / 'xla'}"]
  # 0. The path functions and the workdir LOCK on the bucket (create-if-absent object).
  probe = subprocess.run([sys.executable, "-c", _PROBE], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=120)
  assert probe.returncode == 0 and "probe ok" in probe.stdout, probe.stderr[-3000:]

  # 1. Train until the first checkpoint is in the bucket, then SIGTERM (saves, exits 75).
  proc = subprocess.Popen(train, cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    if any(o.startswith("run/ckpt/3/") for o in em.objects()):
      proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.5)
  out1 = proc.communicate(timeout=120)[0]
  assert proc.returncode == 75, out1[-3000:]
  first = em.objects()
  assert "run/config.json" in first and "LOCK" not in {o.split("/")[-1] for o in first}
  assert "run/DONE.json" not in first and any(o.startswith("run/ckpt/") for o in first)

  # 2. The same command resumes from the bucket's checkpoint and finishes the stage.
  second = subprocess.run(train, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
  out2 = second.stdout + second.stderr
  assert second.returncode == 0, out2[-3000:]
  assert "resumed backbone from step" in out2, out2[-3000:]
  stored = em.objects()
  for name in ("run/DONE.json", "run/metrics.jsonl", "run/export/provenance.json",
               "run/export/model.json", "run/export/vocab.txt"):
    assert name in stored, (name, stored)
  assert any(o.startswith("run/tb/events.out.tfevents") for o in stored), stored
  assert any(o.startswith("run/export/params/") for o in stored), stored
  assert not any(".tmp" in o for o in stored), stored

  # 3. A fine-tuned export written into the bucket (the product's writer) and the IMAGECODE
  # data copied there; the evaluation reads both from the bucket and writes its outputs there.
  code = ("from tests.helpers.loops import make_export; make_export('gs://bkt/ft2'); "
          f"from contextblip_jax.storage import paths; paths.upload({data!r}, 'gs://bkt/data')")
  made = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=120)
  assert made.returncode == 0, made.stderr[-3000:]
  ev = subprocess.run(
      [sys.executable, "-m", "contextblip_jax.main", "--config",
       os.path.join(REPO, "configs/evaluate.py:tiny,predict,head=stage2"), "--workdir",
       "gs://bkt/eval", "--config.data.imagecode_dir=gs://bkt/data",
       "--config.eval.checkpoint=gs://bkt/ft2",
       "--config.eval.visualize=0", "--config.num_devices=1",
       f"--config.compilation_cache={tmp_path / 'xla'}"],
      cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
  assert ev.returncode == 0, (ev.stdout + ev.stderr)[-3000:]
  stored = em.objects()
  assert "ft2/export/provenance.json" in stored, stored
  evaluated = [o for o in stored if o.startswith("eval/")]
  for suffix in ("test.predictions.jsonl", "test.report.json", "test.leaderboard.json"):
    assert any(o.endswith(suffix) for o in evaluated), (suffix, evaluated)
