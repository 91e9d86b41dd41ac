#!/usr/bin/env bash
# Runs one command on every worker of a Cloud TPU VM slice (v5e-16, v5p-8, v6e-8, v4-32, ...),
# the same command everywhere: each worker is one JAX process, and `initialize_distributed`
# (cluster "auto") calls `jax.distributed.initialize()` with no arguments, which reads the
# worker list from the TPU metadata server.
#
#   TPU_NAME=my-v5e-16 ZONE=us-west4-a [PROJECT=my-proj] [REPO_DIR='~/contextblip_jax'] \
#     launch/tpu_pod.sh [--sync] [--setup] [--dry-run] -- \
#     python -m contextblip_jax.main --config configs/pretrain.py --workdir gs://bucket/run1 \
#       --config.platform=tpu
#
#   --sync     copy this checkout (tracked files, via `git archive`) to REPO_DIR on every worker
#   --setup    on every worker: install uv (https://docs.astral.sh/uv/) into ~/.local/bin if it
#              is not there, make REPO_DIR/.venv with Python $PYTHON_VERSION (default 3.11; uv
#              uses the worker's own python3.11 when it has one and downloads a standalone
#              build otherwise, no root needed: a stock TPU VM image may ship an older
#              Python), install the package with the TPU extra (`-e ".[tpu]"`: jax[tpu]
#              0.10.2, libtpu 0.0.42.1), then start JAX on every worker together and print
#              each worker's process index, backend and device counts
#   --dry-run  print the commands (gcloud, git) instead of running them; also DRY_RUN=1.
#              Needs neither gcloud nor a TPU.
#
# The workdir must be visible to every worker (a gs:// bucket or a shared filesystem): Orbax
# writes checkpoints collectively from all processes. Only process 0 writes logs and metrics.
# The command runs inside REPO_DIR with REPO_DIR/.venv/bin first on PATH; `--config.platform=tpu`
# makes a worker whose JAX fell back to the CPU stop at once with status 2 instead of training
# there. Output of all workers streams back prefixed by gcloud; stop a run with Ctrl-C, then
# make sure no worker still holds the TPU
# (`launch/tpu_pod.sh -- 'sudo lsof -w /dev/accel0 || true'`).
set -euo pipefail

usage() { sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

sync=0
setup=0
dry_run=0
[[ "${DRY_RUN:-0}" != "0" && -n "${DRY_RUN:-}" ]] && dry_run=1
while [[ $# -gt 0 && "$1" != "--" ]]; do
  case "$1" in
    --sync) sync=1 ;;
    --setup) setup=1 ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
[[ "${1:-}" == "--" ]] && shift
if ((!sync && !setup && $# == 0)); then
  usage
fi

: "${TPU_NAME:?set TPU_NAME (the TPU VM slice, e.g. my-v5e-16)}"
: "${ZONE:?set ZONE (the zone of the TPU, e.g. us-west4-a)}"
REPO_DIR="${REPO_DIR:-~/contextblip_jax}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
project_args=()
[[ -n "${PROJECT:-}" ]] && project_args=(--project="$PROJECT")

# One argument as the shell reads it back: bare when safe, else in single quotes.
safe='^[-A-Za-z0-9_./:=,@%+~]+$'
quote() {
  if [[ "$1" =~ $safe ]]; then
    printf '%s' "$1"
  else
    local sq="'" esc="'\\''"
    printf "'%s'" "${1//$sq/$esc}"
  fi
}

# Runs a command, or under --dry-run prints it (one line, copy-pasteable).
run() {
  if ((dry_run)); then
    local out="+" a
    for a in "$@"; do out+=" $(quote "$a")"; done
    printf '%s\n' "$out"
  else
    "$@"
  fi
}

ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${project_args[@]}" \
    --worker=all --command="$1"
}

if ((dry_run)); then
  echo "# dry run: TPU $TPU_NAME in $ZONE${PROJECT:+ (project $PROJECT)}, all workers, REPO_DIR=$REPO_DIR"
fi

if ((sync)); then
  if ((dry_run)); then
    archive="/tmp/contextblip_src.XXXXXX.tar.gz"     # mktemp's name, not created
  else
    archive="$(mktemp -t contextblip_src.XXXXXX.tar.gz)"
  fi
  run git -C "$(cd "$(dirname "$0")/.." && pwd)" archive --format=tar.gz -o "$archive" HEAD
  run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME":/tmp/contextblip_src.tar.gz \
    --zone="$ZONE" "${project_args[@]}" --worker=all
  ssh_all "mkdir -p $REPO_DIR && tar -xzf /tmp/contextblip_src.tar.gz -C $REPO_DIR"
  run rm -f "$archive"
fi

if ((setup)); then
  # uv gives every worker the same Python whatever its image ships; the TPU extra pins
  # jax[tpu] to the project's jax (pyproject.toml).
  ssh_all "set -e; cd $REPO_DIR; export PATH=\$HOME/.local/bin:\$PATH; \
command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | env UV_NO_MODIFY_PATH=1 sh; \
UV_VENV_CLEAR=1 uv venv --python $PYTHON_VERSION .venv; \
uv pip install --python .venv/bin/python -e \".[tpu]\"; \
.venv/bin/python -c \"import jax; jax.distributed.initialize(); print(dict(\
process=jax.process_index(), backend=jax.default_backend(), \
local_devices=jax.local_device_count(), devices=jax.device_count()))\""
fi

if [[ $# -gt 0 ]]; then
  # Quote the command once so that it reaches every worker's shell unchanged.
  cmd="$(printf '%q ' "$@")"
  ssh_all "cd $REPO_DIR && export PATH=\$PWD/.venv/bin:\$PATH && ${cmd% }"
fi
