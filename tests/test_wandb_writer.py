"""Weights & Biases logging (config.wandb, storage/wandb_writer.py), offline only: no network,
no API key. What a run logged is read back from the transaction log wandb writes offline
(`<logdir>/wandb/offline-run-*/run-*.wandb`, a LevelDB-style log of protobuf `Record`s; wandb
0.31 has no Python reader of its own, so `read_offline_run` decodes it with wandb's protobuf
classes and checks every block's CRC)."""

import glob
import json
import os
import struct
import subprocess
import sys
import time
import zlib

import ml_collections
import pytest

from configs import demo, finetune_stage1
from contextblip_jax.run import train
from contextblip_jax.run.validate_config import ConfigError, validate
from contextblip_jax.storage import wandb_writer
from contextblip_jax.storage.metric_writers import MetricWriter, read_metrics
from contextblip_jax.storage import workdir as wd
from tests.helpers.checkpoints import make_tiny_checkpoint
from tests.helpers.loops import compilation_cache, make_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_offline_run(logdir, timeout: float = 20.0) -> dict:
  """The one offline run under `logdir` (read_offline_runs)."""
  runs = read_offline_runs(logdir, timeout)
  assert len(runs) == 1, [r["folder"] for r in runs]
  return runs[0]


def read_offline_runs(logdir, timeout: float = 20.0) -> list[dict]:
  """Every offline run folder under `logdir`, oldest first: {folder, run_id, resume, resumed,
  name, project, tags, job_type, config: {key: value}, history: {step: {key: value}},
  exit_code}. wandb's service writes the log after `finish()` returns: read until each exit
  record is there (at most `timeout` seconds)."""
  files = glob.glob(os.path.join(str(logdir), "wandb", "offline-run-*", "run-*.wandb"))
  deadline = time.monotonic() + timeout
  runs = []
  for path in files:
    while True:
      run = _read_log(path)
      if run["exit_code"] is not None or time.monotonic() > deadline:
        break
      time.sleep(0.05)
    runs.append(run)
  return sorted(runs, key=lambda r: r["start"])


def _read_log(path) -> dict:
  from wandb.proto import wandb_internal_pb2 as pb  # pylint: disable=g-import-not-at-top
  data = open(path, "rb").read()
  assert data[:4] == b":W&B", data[:7]
  block, pos, pending, records = 32768, 7, b"", []
  while pos + 7 <= len(data):
    if block - pos % block < 7:                      # a block's tail too short for a header
      pos += block - pos % block
      continue
    crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    body = data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind == 0:                                    # zero padding at a block's end
      continue
    assert crc == zlib.crc32(bytes([kind]) + body), f"bad checksum at byte {pos}"
    pending += body
    if kind in (1, 4):                               # FULL, or LAST of FIRST/MIDDLE/LAST
      records.append(pb.Record.FromString(pending))
      pending = b""
  out = {"folder": os.path.basename(os.path.dirname(path)), "start": 0, "history": {},
         "exit_code": None}
  for r in records:
    kind = r.WhichOneof("record_type")
    if kind == "run":
      out.update(run_id=r.run.run_id, resume=r.run.resume, resumed=r.run.resumed,
                 start=r.run.start_time.ToNanoseconds(), name=r.run.display_name, project=r.run.project, tags=list(r.run.tags),
                 job_type=r.run.job_type,
                 config={i.key: json.loads(i.value_json) for i in r.run.config.update})
    elif kind == "history":
      row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
      out["history"].setdefault(row["_step"], {}).update(row)
    elif kind == "exit":
      out["exit_code"] = r.exit.exit_code
  return out


@pytest.fixture
def offline(monkeypatch, tmp_path):
  """W&B offline and silent, its settings and caches in tmp_path, no key."""
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
    monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
  monkeypatch.delenv("WANDB_API_KEY", raising=False)
  return tmp_path


def _wandb_config(**wandb):
  c = finetune_stage1.get_config("tiny")
  c.wandb.enabled = True
  c.wandb.update(wandb)
  return c


def test_default_config_never_imports_wandb(tmp_path):
  """Importing the package and running the writers the loops use with the default config
  (validation included) leaves wandb unimported, installed or not."""
  code = f"""
import sys
from configs import demo, finetune_stage1
from contextblip_jax.run import cli, evaluate, train, validate_config
from contextblip_jax.storage.metric_writers import MetricWriter
cfg = finetune_stage1.get_config("tiny")
validate_config.validate(cfg, num_devices=1)
validate_config.validate(demo.get_config("tiny"), num_devices=1)
with MetricWriter({str(tmp_path / 'w')!r}, stage="finetune1", config=cfg) as w:
  w.write_scalars(1, {{"loss": 0.5}})
assert "wandb" not in sys.modules, sorted(m for m in sys.modules if "wandb" in m)
print("ok")
"""
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
  assert read_metrics(str(tmp_path / "w"))[0]["loss"] == 0.5


def test_offline_run_gets_config_stage_and_every_scalar(offline):
  logdir = offline / "run"
  c = _wandb_config(tags=("t1", "t2"))              # mode '' : WANDB_MODE=offline decides
  with MetricWriter(str(logdir), stage="finetune1", config=c) as w:
    w.write_scalars(1, {"loss": 2.5, "grad_norm": 0.25, "note": "text"})
    w.write_scalars(2, {"loss": 1.5, "lr": 1e-3})
    w.write_scalars(4, {"loss": float("nan"), "acc": 0.75})
  run = read_offline_run(logdir)
  assert run["exit_code"] == 0                      # finished by close()
  assert (run["project"], run["name"], run["tags"]) == ("contextblip_jax", "finetune1-run",
                                                        ["t1", "t2"])
  assert run["job_type"] == "finetune1"
  cfg = run["config"]
  assert cfg["stage"] == "finetune1" and cfg["workdir"] == str(logdir)
  assert cfg["train.num_steps"] == c.train.num_steps and cfg["model.variant"] == "tiny"
  assert cfg["wandb.enabled"] is True and cfg["optim.lrs.head"] == c.optim.lrs.head
  h = run["history"]
  assert sorted(h) == [1, 2, 4]
  assert h[1]["finetune1/loss"] == 2.5 and h[1]["finetune1/grad_norm"] == 0.25
  assert h[2]["finetune1/loss"] == 1.5 and h[2]["finetune1/lr"] == 1e-3
  assert h[4]["finetune1/acc"] == 0.75
  # the same scalars as TensorBoard: no text, no non-finite values
  assert "finetune1/note" not in h[1] and "finetune1/loss" not in h[4]
  assert [r["loss"] for r in read_metrics(str(logdir))] == [2.5, 1.5, "nan"]
  with MetricWriter(str(offline / "p1"), stage="finetune1", config=c, enabled=False) as w:
    w.write_scalars(1, {"loss": 2.5})               # another process than 0: nothing at all
  assert not os.path.exists(offline / "p1")


def test_an_exception_finishes_the_run_as_failed(offline):
  logdir = offline / "crash"
  with pytest.raises(RuntimeError, match="boom"):
    with MetricWriter(str(logdir), stage="pretrain",
                      config=_wandb_config(mode="offline", name="mine")) as w:
      w.write_scalars(3, {"loss": 0.125})
      raise RuntimeError("boom")
  run = read_offline_run(logdir)
  assert run["exit_code"] == 1 and run["name"] == "mine"
  assert run["history"][3]["pretrain/loss"] == 0.125


def test_a_resumed_stage_continues_its_run_and_a_restart_starts_a_new_one(offline):
  """A training stage's writer (resume=True) keeps its run id in <logdir>/wandb/run_id; the
  next writer there (the stage resumed after a crash) continues that run in a new offline
  folder with the same id, marked resume; train.restart's move gives a new id; evaluation
  writers (resume=False) keep no id."""
  logdir = offline / "stage"
  c = _wandb_config(mode="offline")
  with pytest.raises(RuntimeError, match="preempted"):
    with MetricWriter(str(logdir), stage="finetune1", config=c, resume=True) as w:
      w.write_scalars(1, {"loss": 3.0})
      w.write_scalars(2, {"loss": 2.0})
      raise RuntimeError("preempted")
  id_file = logdir / "wandb" / "run_id"
  run_id = id_file.read_text().strip()
  c.wandb.name = "renamed"                          # another name: still the same run
  with MetricWriter(str(logdir), stage="finetune1", config=c, resume=True) as w:
    w.write_scalars(3, {"loss": 1.0})
  first, second = read_offline_runs(logdir)
  assert first["run_id"] == second["run_id"] == run_id
  assert first["folder"].endswith(run_id) and second["folder"] != first["folder"]
  assert (first["resume"], second["resume"]) == (False, True)
  assert not second["resumed"]                      # offline: not checked with the server
  assert (first["exit_code"], second["exit_code"]) == (1, 0)
  assert {s: h["finetune1/loss"] for s, h in first["history"].items()} == {1: 3.0, 2: 2.0}
  assert {s: h["finetune1/loss"] for s, h in second["history"].items()} == {3: 1.0}
  assert second["name"] == "renamed" and id_file.read_text().strip() == run_id

  wd.move_previous_run(str(logdir))                 # what train.restart=True does
  with MetricWriter(str(logdir), stage="finetune1", config=c, resume=True) as w:
    w.write_scalars(1, {"loss": 5.0})
  (third,) = read_offline_runs(logdir)
  assert third["run_id"] != run_id and not third["resume"]
  assert id_file.read_text().strip() == third["run_id"]

  for _ in range(2):                                # evaluation: a new run each time
    with MetricWriter(str(offline / "ev"), stage="evaluate", config=c) as w:
      w.write_scalars(0, {"acc": 0.5})
  ev1, ev2 = read_offline_runs(offline / "ev")
  assert ev1["run_id"] != ev2["run_id"] and not (ev1["resume"] or ev2["resume"])
  assert not os.path.exists(offline / "ev" / "wandb" / "run_id")

  id_file.write_text("not an id\n")
  with pytest.raises(wandb_writer.WandbError, match=r"wandb/run_id: expected one W&B run id"):
    MetricWriter(str(logdir), stage="finetune1", config=c, resume=True)


def test_steps_below_a_resumed_runs_starting_step_are_left_out():
  """Online, a resumed run starts after its last step; the steps a resumed stage logs again
  are not sent (wandb would drop each with a warning)."""
  sent = []

  class FakeRun:
    id, starting_step = "abc", 5

    def log(self, values, step):
      sent.append((step, values))

  run = object.__new__(wandb_writer.WandbRun)
  run.run, run.skipped = FakeRun(), 0
  for step in (3, 4, 5, 6):
    run.log(step, {"loss": float(step)})
  assert sent == [(5, {"loss": 5.0}), (6, {"loss": 6.0})] and run.skipped == 2


def test_bad_keys_and_a_missing_wandb_are_named_before_any_work(monkeypatch, tmp_path):
  c = _wandb_config(mode="cloud", tags=("ok", ""))
  c = ml_collections.ConfigDict(c.to_dict(), type_safe=False)   # as a hand-built config may be
  c.wandb.project = 3
  with pytest.raises(ConfigError) as e:
    validate(c, num_devices=1)
  msg = str(e.value)
  assert "wandb.mode='cloud': must be one of 'online', 'offline'" in msg
  assert "wandb.tags=('ok', '')" in msg and "wandb.project=3: must be a string" in msg
  d = demo.get_config("tiny")
  d.wandb.mode = "cloud"                            # the demo's one flag reaches every stage
  with pytest.raises(ConfigError, match=r"stages\.finetune2\.wandb\.mode='cloud'"):
    validate(d, num_devices=1)

  monkeypatch.setitem(sys.modules, "wandb", None)   # as if not installed
  with pytest.raises(ConfigError) as e:
    validate(_wandb_config(mode="offline"), num_devices=1)
  assert "wandb.enabled=True: the wandb package is not installed: pip install -e '.[wandb]'" \
      in str(e.value)
  validate(finetune_stage1.get_config("tiny"), num_devices=1)     # off: nothing needed
  with pytest.raises(wandb_writer.WandbError, match=r"pip install -e '\.\[wandb\]'"):
    MetricWriter(str(tmp_path / "w"), stage="finetune1", config=_wandb_config())
  assert not os.path.exists(tmp_path / "w" / "metrics.jsonl")


def test_default_name_uses_the_workdir_or_its_parent():
  assert wandb_writer.default_name("/runs/ft1_lr3", "finetune1") == "finetune1-ft1_lr3"
  assert wandb_writer.default_name("/runs/demo/pretrain/", "pretrain") == "pretrain-demo"
  assert wandb_writer.default_name("gs://bkt/exp", "evaluate") == "evaluate-exp"


def test_tiny_training_logs_its_loss_and_a_crash_fails_the_run(offline):
  """End to end: a tiny stage-1 run with wandb.enabled (offline) logs its loss at every step
  and finishes its W&B run; a rerun that crashes ends its run as failed and keeps the loss it
  logged, and resumed from its checkpoint it continues that W&B run; the workdir with its
  wandb/ is still a workdir."""
  root = offline
  data = make_data(root)
  c = _wandb_config()
  c.init_checkpoint = make_tiny_checkpoint(root, with_adapter=True)
  c.data.imagecode_dir = data
  c.train.num_steps, c.train.log_every, c.train.save_every = 2, 1, 100
  c.eval.max_sets, c.eval.visualize = 1, 0
  c.num_devices = 1
  with compilation_cache():
    summary = train.train_and_evaluate(c, str(root / "ok"))
    assert summary["final_step"] == 2
    run = read_offline_run(root / "ok")
    assert run["exit_code"] == 0 and run["name"] == "finetune1-ok"
    losses = [r["loss"] for r in read_metrics(str(root / "ok")) if "loss" in r]
    assert [run["history"][s]["finetune1/loss"] for s in (1, 2)] == pytest.approx(losses)
    assert run["history"][2]["finetune1/stage1_valid/acc_all"] == summary["valid"]["all"]["acc"]
    assert run["config"]["wandb.enabled"] is True and run["config"]["mode"] == "finetune1"
    wd.check_workdir(str(root / "ok"), "finetune1")         # wandb/ belongs to a workdir

    def crash(step, metrics):
      if step == 2:
        raise RuntimeError("simulated crash")
    c.train.save_every = 1
    with pytest.raises(RuntimeError, match="simulated crash"):
      train.train_and_evaluate(c, str(root / "crash"), hooks=[crash])
    run = read_offline_run(root / "crash")
    assert run["exit_code"] == 1 and max(run["history"]) == 1      # step 2 crashed
    assert run["history"][1]["finetune1/loss"] == pytest.approx(losses[0])
    assert train.train_and_evaluate(c, str(root / "crash"))["final_step"] == 2   # resumed
  crashed, resumed = read_offline_runs(root / "crash")
  assert resumed["run_id"] == crashed["run_id"] and resumed["resume"]
  assert resumed["exit_code"] == 0 and sorted(resumed["history"]) == [2]
  assert resumed["history"][2]["finetune1/loss"] == pytest.approx(losses[1])
