"""The launchers' dry-run mode prints the exact commands they run, for a given TPU slice or
SLURM size, without gcloud, srun or an accelerator; and a real (non-dry) run executes those
same commands (checked with stand-in gcloud / srun programs that record their arguments)."""

import os
import shlex
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(REPO, "launch", "tpu_pod.sh")
SLURM = os.path.join(REPO, "launch", "slurm_gpu.sbatch")
TRAIN = ["python", "-m", "contextblip_jax.main", "--config", "configs/pretrain.py",
         "--workdir", "gs://bucket/runs/p1", "--config.platform=tpu",
         "--config.data.pairs_json=coco.json,vg's.json"]

# A stand-in for a missing program: appends its name and arguments (one per line) to $RECORD.
RECORDER = """#!/usr/bin/env bash
{ echo "== $(basename "$0")"; for a in "$@"; do printf '%s\\n' "$a"; done; } >> "$RECORD"
"""


@pytest.fixture()
def sandbox(tmp_path):
  """(env, record file): PATH = stand-ins for gcloud, srun, uv, curl first, then the system's
  bash; HOME in tmp_path (no uv there)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name in ("gcloud", "srun", "curl"):
    (bin_dir / name).write_text(RECORDER)
    (bin_dir / name).chmod(0o755)
  record = tmp_path / "record.txt"
  env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path / "home"),
         "RECORD": str(record), "LANG": "C.UTF-8"}
  return env, record


def _run(script, args, env, cwd=REPO):
  proc = subprocess.run(["bash", script, *args], env=env, cwd=cwd, capture_output=True,
                        text=True, timeout=60)
  return proc


def _commands(stdout):
  """The '+ ...' lines of a dry run, each split as the shell would."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _recorded(record):
  out = []
  for line in record.read_text().splitlines():
    if line.startswith("== "):
      out.append([line[3:]])
    else:
      out[-1].append(line)
  return out


def test_tpu_pod_dry_run_prints_sync_setup_and_run_for_the_slice(sandbox):
  env, record = sandbox
  env.update(TPU_NAME="my-v5e-16", ZONE="us-west4-a", PROJECT="proj")
  proc = _run(TPU, ["--sync", "--setup", "--dry-run", "--", *TRAIN], env)
  assert proc.returncode == 0, proc.stderr
  assert not record.exists()                       # nothing ran: gcloud was never called
  lines = proc.stdout.splitlines()
  assert lines[0] == ("# dry run: TPU my-v5e-16 in us-west4-a (project proj), all workers, "
                      "REPO_DIR=~/contextblip_jax")
  ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v5e-16", "--zone=us-west4-a",
         "--project=proj", "--worker=all"]
  archive = "/tmp/contextblip_src.XXXXXX.tar.gz"
  # The training command reaches the workers' shell as the same words (quoted by bash).
  remote = _commands(proc.stdout)[-1][-1].split(" && ", 2)[2]
  assert shlex.split(remote) == TRAIN
  assert _commands(proc.stdout) == [
      ["git", "-C", REPO, "archive", "--format=tar.gz", "-o", archive, "HEAD"],
      ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive,
       "my-v5e-16:/tmp/contextblip_src.tar.gz", "--zone=us-west4-a", "--project=proj",
       "--worker=all"],
      ssh + ["--command=mkdir -p ~/contextblip_jax && tar -xzf /tmp/contextblip_src.tar.gz "
             "-C ~/contextblip_jax"],
      ["rm", "-f", archive],
      ssh + ["--command=set -e; cd ~/contextblip_jax; export PATH=$HOME/.local/bin:$PATH; "
             "command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | "
             "env UV_NO_MODIFY_PATH=1 sh; UV_VENV_CLEAR=1 uv venv --python 3.11 .venv; "
             'uv pip install --python .venv/bin/python -e ".[tpu]"; .venv/bin/python -c '
             '"import jax; jax.distributed.initialize(); print(dict(process=jax.process_index(), '
             'backend=jax.default_backend(), local_devices=jax.local_device_count(), '
             'devices=jax.device_count()))"'],
      ssh + ["--command=cd ~/contextblip_jax && export PATH=$PWD/.venv/bin:$PATH && "
             + remote],
  ]


def test_tpu_pod_real_run_calls_gcloud_with_the_dry_run_commands(sandbox):
  env, record = sandbox
  env.update(TPU_NAME="v6e-8-a", ZONE="us-east5-b", PYTHON_VERSION="3.12",
             REPO_DIR="/srv/cb")
  dry = _run(TPU, ["--setup", "--", *TRAIN], dict(env, DRY_RUN="1"))
  assert dry.returncode == 0 and not record.exists(), dry.stderr
  assert "uv venv --python 3.12 .venv" in dry.stdout and "cd /srv/cb;" in dry.stdout
  real = _run(TPU, ["--setup", "--", *TRAIN], env)
  assert real.returncode == 0, real.stderr
  assert _recorded(record) == _commands(dry.stdout)


def test_tpu_pod_needs_a_tpu_name(sandbox):
  env, _ = sandbox
  proc = _run(TPU, ["--dry-run", "--setup"], dict(env, ZONE="z"))
  assert proc.returncode != 0 and "set TPU_NAME" in proc.stderr


def test_slurm_dry_run_setup_and_srun_for_a_node_count(sandbox, tmp_path):
  env, record = sandbox
  env.update(DRY_RUN="1", NODES="4", GPU_EXTRA="cuda12-local", MODULES="cuda/12.8 cudnn/9.8")
  cmd = ["python", "-m", "contextblip_jax.main", "--config", "configs/pretrain.py",
         "--workdir", "/shared/runs/pretrain 1", "--config.platform=gpu"]
  proc = _run(SLURM, ["--setup", "--", *cmd], env, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  assert not record.exists()
  assert proc.stdout.splitlines()[0] == (
      f"# dry run in {tmp_path}: 4 nodes x 8 tasks per node = 32 JAX processes (one per GPU), "
      "GPU extra cuda12-local")
  uv = os.path.join(env["HOME"], ".local", "bin", "uv")
  assert _commands(proc.stdout) == [
      ["module", "load", "cuda/12.8", "cudnn/9.8"],
      ["sh", "-c", "curl -LsSf https://astral.sh/uv/install.sh | env UV_NO_MODIFY_PATH=1 sh"],
      ["env", "UV_VENV_CLEAR=1", uv, "venv", "--python", "3.11", ".venv"],
      [uv, "pip", "install", "--python", ".venv/bin/python", "-e", ".[cuda12-local]"],
      [".venv/bin/python", "-c", "import jax; print(jax.default_backend(), jax.devices())"],
      ["export", f"PATH={tmp_path}/.venv/bin:$PATH"],
      ["export", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9"],
      ["export", "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true"],
      ["export", "NCCL_DEBUG=WARN"],
      ["srun", "--kill-on-bad-exit=1", "--cpu-bind=cores", *cmd],
  ]


def test_slurm_inside_a_job_sizes_from_slurm_and_runs_srun(sandbox, tmp_path):
  env, record = sandbox
  env.update(SLURM_JOB_NUM_NODES="3", SLURM_NTASKS_PER_NODE="8(x3)", SLURM_NTASKS="24",
             SLURM_JOB_ID="77", SLURM_SUBMIT_DIR=str(tmp_path))
  dry = _run(SLURM, ["--dry-run", "--", "python", "-m", "x"], env)
  assert dry.returncode == 0 and "3 nodes x 8 tasks per node = 24 JAX processes" in dry.stdout
  assert "export PATH" not in dry.stdout                  # no .venv, no --setup
  real = _run(SLURM, ["--", "python", "-m", "x"], env)
  assert real.returncode == 0, real.stderr
  assert _recorded(record) == [c for c in _commands(dry.stdout) if c[0] == "srun"]
  assert "job 77: 3 nodes" in real.stdout
  bad = _run(SLURM, ["--dry-run", "--", "x"], dict(env, GPU_EXTRA="cuda11"))
  assert bad.returncode == 2 and "GPU_EXTRA=cuda11" in bad.stderr
