"""kill -9 / SIGTERM points on a tiny training run, then a rerun: does it resume where the last
completed checkpoint left it, and reproduce the uninterrupted losses exactly?

  .venv/bin/python -m tests.helpers.kill_resume --points 12 --root /tmp/kill_resume

(the full count; `tests/test_hostile_kill.py` runs two points in CI). The run is
`python -m contextblip_jax.main --config configs/backbone.py:tiny,steps=S` (the tiny BLIP from
scratch on generated pairs, a checkpoint every 3 steps, a metrics record every step). For each
point a fresh workdir is started and stopped at a moment of one of these kinds, cycled:
  save     kill -9 while a checkpoint after the first is being written (a temporary step
           directory exists)
  step     kill -9 right after the k-th metrics record (k varied)
  early    kill -9 a varied time after start (often before the first step or save)
  sigterm  SIGTERM after the k-th record: the run must save, exit with status 75
Then the same command runs again to the end. Measured per point: the newest completed step on
disk at the kill, the step the rerun resumed from, steps lost beyond the last completed save
(resumed-from < newest completed step; goal 0), a silent restart (the rerun started from step
0 over a previous run's files with exit status 0; goal 0), a refusal (the rerun stopped saying
what it found: counted, then rerun with train.restart=True), and whether every step's loss
equals the uninterrupted run's bit for bit. Prints one line per point and a summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KINDS = ("save", "step", "early", "sigterm")
SAVE_EVERY = 3


def _env() -> dict[str, str]:
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=REPO)


def command(workdir: str, pairs: str, steps: int, cache: str, *extra: str) -> list[str]:
  return [sys.executable, "-m", "contextblip_jax.main", "--config",
          f"configs/backbone.py:tiny,steps={steps}", "--workdir", workdir,
          f"--config.data.pairs_json={pairs}", "--config.train.log_every=1",
          f"--config.train.save_every={SAVE_EVERY}", "--config.num_devices=1",
          f"--config.compilation_cache={cache}", *extra]


def losses(workdir: str) -> list[tuple[int, float]]:
  """(step, loss) of every metrics record, in file order (a resumed run repeats steps)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    return []
  out = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      r = json.loads(line)
      if "loss" in r:
        out.append((int(r["step"]), r["loss"]))
  return out


def completed_steps(workdir: str) -> list[int]:
  d = os.path.join(workdir, "ckpt")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _saving(workdir: str) -> bool:
  d = os.path.join(workdir, "ckpt")
  return os.path.isdir(d) and any("tmp" in n for n in os.listdir(d))


def stop_at(cmd: list[str], workdir: str, kind: str, k: int, delay: float,
            timeout: float = 600) -> dict[str, Any]:
  """Starts `cmd`, stops it at the moment `kind` describes; returns what was seen."""
  proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  t0, during_save = time.time(), False
  try:
    while proc.poll() is None and time.time() - t0 < timeout:
      n = len(losses(workdir))
      if kind == "save" and completed_steps(workdir) and _saving(workdir):
        during_save = True
        break
      if kind in ("step", "sigterm") and n >= k:
        break
      if kind == "early" and time.time() - t0 >= delay:
        break
      time.sleep(0.005)
    if proc.poll() is not None:
      err = proc.stderr.read()
      return {"finished_before_stop": True, "rc": proc.returncode, "stderr": err[-2000:]}
    during_save = during_save or _saving(workdir)
    proc.send_signal(signal.SIGTERM if kind == "sigterm" else signal.SIGKILL)
    rc = proc.wait(120)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  err = proc.stderr.read()
  return {"rc": rc, "during_save": during_save, "records_at_stop": len(losses(workdir)),
          "completed": completed_steps(workdir), "stderr": err[-2000:]}


def run_point(i: int, kind: str, root: str, pairs: str, steps: int, cache: str,
              reference: dict[int, float], rng: random.Random) -> dict[str, Any]:
  workdir = os.path.join(root, f"point{i:02d}_{kind}")
  cmd = command(workdir, pairs, steps, cache)
  k = rng.randint(1, steps - 1)
  stop = stop_at(cmd, workdir, kind, k, delay=rng.uniform(2.0, 25.0))
  before = losses(workdir)
  newest = max(stop.get("completed") or [0])
  again = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
  refused = again.returncode == 2 and "no checkpoint to resume" in again.stderr
  if refused:
    again = subprocess.run(cmd + ["--config.train.restart=True"], cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=900)
  after = losses(workdir)          # after a restart: the new run's records only
  new = after if refused else after[len(before):]
  resumed_from = (min(s for s, _ in new) - 1) if new else None
  final = dict(after)               # the last record of each step
  seen_before = {} if refused else dict(before)
  out = {
      "point": i, "kind": kind, "k": k, "stop_rc": stop.get("rc"),
      "during_save": stop.get("during_save", False), "newest_completed": newest,
      "resumed_from": resumed_from, "rerun_rc": again.returncode, "refused": refused,
      "lost_beyond_save": (max(0, newest - resumed_from) if resumed_from is not None else None),
      "silent_restart": bool(not refused and before and resumed_from == 0
                             and again.returncode == 0),
      "losses_equal": final == reference and all(reference[s] == v
                                                 for s, v in seen_before.items()),
      "finished_before_stop": stop.get("finished_before_stop", False),
  }
  if kind == "sigterm":
    out["sigterm_rc_ok"] = stop.get("rc") == 75
  if again.returncode != 0:
    out["rerun_stderr"] = again.stderr[-1500:]
  return out


def main(argv=None) -> dict[str, Any]:
  p = argparse.ArgumentParser(prog="python -m tests.helpers.kill_resume")
  p.add_argument("--root", required=True)
  p.add_argument("--points", type=int, default=12)
  p.add_argument("--steps", type=int, default=12)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--kinds", default=",".join(KINDS))
  a = p.parse_args(argv)
  sys.path.insert(0, REPO)
  from tests.helpers.loops import make_data  # pylint: disable=g-import-not-at-top
  os.makedirs(a.root, exist_ok=True)
  data = os.path.join(a.root, "data")
  if not os.path.isdir(data):
    make_data(a.root)
  pairs, cache = os.path.join(data, "pairs.json"), os.path.join(a.root, "xla_cache")
  ref_dir = os.path.join(a.root, "reference")
  if not os.path.isfile(os.path.join(ref_dir, "DONE.json")):
    ref = subprocess.run(command(ref_dir, pairs, a.steps, cache), cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=900)
    if ref.returncode != 0:
      raise SystemExit(f"reference run failed ({ref.returncode}):\n{ref.stderr[-3000:]}")
  reference = dict(losses(ref_dir))
  rng = random.Random(a.seed)
  kinds = a.kinds.split(",")
  results = []
  for i in range(a.points):
    r = run_point(i, kinds[i % len(kinds)], a.root, pairs, a.steps, cache, reference, rng)
    results.append(r)
    print(json.dumps({k: v for k, v in r.items() if not k.endswith("stderr")}), flush=True)
  summary = {
      "points": len(results),
      "during_save": sum(r["during_save"] for r in results),
      "lost_beyond_save": sum(r["lost_beyond_save"] or 0 for r in results),
      "silent_restarts": sum(r["silent_restart"] for r in results),
      "refused_needing_restart": sum(r["refused"] for r in results),
      "losses_equal": sum(r["losses_equal"] for r in results),
      "rerun_failed": sum(r["rerun_rc"] != 0 for r in results),
  }
  print("summary " + json.dumps(summary), flush=True)
  return {"summary": summary, "results": results}


if __name__ == "__main__":
  main()
