"""The main command as 2 cooperating processes (CPU, 127.0.0.1, 2 forced devices each) trains
the tiny configuration to the same losses as one process, and resumes collectively from a
checkpoint to the same losses again.

Every run goes through launch/local_multiprocess.sh (free port, `timeout`), exactly as a user
would start it; the reference (1 process, 1 device) runs alongside the 2-process run.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from contextblip_jax.data import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO, "launch", "local_multiprocess.sh")
STEPS = 4          # must match ARGS
ARGS = ["--config=configs/backbone.py:tiny", f"--config.train.num_steps={STEPS}",
        "--config.train.log_every=1", "--config.train.save_every=2"]


def _losses(workdir):
  """{step: loss} from metrics.jsonl (later lines win: a resumed run appends)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      if "loss" in rec:
        out[int(rec["step"])] = rec["loss"]
  return out


class _Launch:
  """`launch/local_multiprocess.sh -n procs -d devices -- python -m contextblip_jax.main ...`
  started in the background; `wait()` checks the exit status and returns each process's log."""

  def __init__(self, workdir, data_dir, logdir, cache, procs=2, devices=2):
    cmd = ["bash", LAUNCHER, "-n", str(procs), "-d", str(devices), "-t", "240", "-l",
           str(logdir), "--", sys.executable, "-m", "contextblip_jax.main", *ARGS,
           f"--workdir={workdir}", f"--config.data.pairs_json={data_dir}/pairs.json",
           f"--config.compilation_cache={cache}"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHON"] = sys.executable
    self.logdir, self.procs = str(logdir), procs
    self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)

  def wait(self) -> list[str]:
    _, err = self.proc.communicate(timeout=300)
    logs = []
    for i in range(self.procs):
      path = os.path.join(self.logdir, f"proc_{i}.log")
      logs.append(open(path).read() if os.path.isfile(path) else "")
    assert self.proc.returncode == 0, (
        f"launcher failed ({self.proc.returncode}):\n{err[-2000:]}\n"
        + "\n".join(f"--- proc {i}\n{t[-3000:]}" for i, t in enumerate(logs)))
    return logs


PROBE = """
import json, sys
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from contextblip_jax.parallel import distributed as dist
from contextblip_jax.parallel import sharding as shd
plan = dist.initialize_distributed()
mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
sh = NamedSharding(mesh, P("data"))
rows = dist.mesh_batch_rows(shd.make_mesh({"data": -1}), 8)
x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
g = dist.global_batch(x[rows], sh)
total = jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, P()))(g)
hybrid = shd.make_mesh({"data": -1}, dcn={"data": 2})
print("RESULT " + json.dumps(dict(
    kind=plan.kind, pid=jax.process_index(), rows=rows.tolist(), shape=list(g.shape), total=float(total),
    stop=dist.any_process(jax.process_index() == 1), hybrid=list(hybrid.devices.shape),
    hybrid_procs=[d.process_index for d in hybrid.devices.reshape(-1)])), flush=True)
"""


def test_distributed_helpers_in_two_processes(tmp_path):
  script = tmp_path / "probe.py"
  script.write_text(PROBE)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHON"] = sys.executable
  proc = subprocess.run(["bash", LAUNCHER, "-n", "2", "-d", "2", "-t", "120", "-l",
                         str(tmp_path / "logs"), "--", sys.executable, str(script)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
  logs = [open(tmp_path / "logs" / f"proc_{i}.log").read() for i in range(2)]
  assert proc.returncode == 0, proc.stderr[-2000:] + "\n".join(logs)
  res = [json.loads(next(l for l in t.splitlines() if l.startswith("RESULT "))[7:])
         for t in logs]
  for i, r in enumerate(res):
    assert (r["kind"], r["pid"]) == ("explicit", i)
    assert r["rows"] == list(range(4 * i, 4 * i + 4))    # contiguous half of the global batch
    assert r["shape"] == [8, 3] and r["total"] == float(sum(range(24)))
    assert r["stop"] is True                             # process 1's flag reaches process 0
    assert r["hybrid"] == [4, 1, 1] and r["hybrid_procs"] == [0, 0, 1, 1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("mp") / "data")
  synthetic.generate(out, seed=0, n_train_sets=4, n_valid_sets=2, n_test_sets=1, n_pairs=48,
                     image_size=32)
  return out


def test_two_processes_match_one_and_resume(tmp_path, data_dir):
  mp_dir = tmp_path / "mp"
  # The one-process, one-device reference runs alongside the 2 x 2-device run.
  ref_run = _Launch(tmp_path / "ref", data_dir, tmp_path / "logs_ref", tmp_path / "cache_ref",
                    procs=1, devices=1)
  logs = _Launch(mp_dir, data_dir, tmp_path / "logs", tmp_path / "cache").wait()
  ref_run.wait()
  got, ref = _losses(mp_dir), _losses(tmp_path / "ref")
  assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1)), logs[0][-3000:]
  np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)],
                             rtol=2e-5, atol=2e-6)
  # process 0 alone logs info and writes metrics; the checkpoints were written collectively
  assert "backbone: initialised" in logs[0] and "backbone: initialised" not in logs[1]
  assert sorted(int(s) for s in os.listdir(mp_dir / "ckpt") if s.isdigit()) == [2, 4]
  iter_files = sorted(os.listdir(mp_dir / "ckpt" / "2" / "data_iter"))
  assert [f for f in iter_files if f.startswith("process_")] == [
      "process_0-of-2.json", "process_1-of-2.json"], iter_files

  # Resume: forget step 4 and the finished marker; both processes restore step 2 (state and
  # each process's data iterator) and must train steps 3-4 to the same losses.
  shutil.rmtree(mp_dir / "ckpt" / "4")
  os.remove(mp_dir / "DONE.json")
  logs = _Launch(mp_dir, data_dir, tmp_path / "logs2", tmp_path / "cache").wait()
  assert "resumed backbone from step 2" in logs[0], logs[0][-3000:]
  resumed = _losses(mp_dir)
  np.testing.assert_allclose([resumed[3], resumed[4]], [ref[3], ref[4]], rtol=2e-5, atol=2e-6)
