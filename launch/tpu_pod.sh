#!/usr/bin/env bash
# Runs one command on every worker of a Cloud TPU VM pod slice (v4-32, v5e-256, ...), the same
# command everywhere: each worker is one JAX process, and `initialize_distributed` (cluster
# "auto") calls `jax.distributed.initialize()` with no arguments, which reads the worker list
# from the TPU metadata server.
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b [PROJECT=my-proj] [REPO_DIR='~/contextblip_jax'] \
#     launch/tpu_pod.sh [--sync] [--setup] -- \
#     python -m contextblip_jax.main --config configs/pretrain.py --workdir gs://bucket/run1
#
#   --sync   copy this checkout (tracked files, via `git archive`) to REPO_DIR on every worker
#   --setup  create REPO_DIR/.venv on every worker and install the package with jax[tpu]
#
# The workdir must be visible to every worker (a gs:// bucket or a shared filesystem): Orbax
# writes checkpoints collectively from all processes. Only process 0 writes logs and metrics.
# The command runs inside REPO_DIR with REPO_DIR/.venv/bin first on PATH. Output of all workers
# streams back prefixed by gcloud; stop a run with Ctrl-C, then make sure no worker still holds
# the TPU (`launch/tpu_pod.sh -- 'sudo lsof -w /dev/accel0 || true'`).
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
REPO_DIR="${REPO_DIR:-~/contextblip_jax}"
project_args=()
[[ -n "${PROJECT:-}" ]] && project_args=(--project="$PROJECT")

sync=0
setup=0
while [[ $# -gt 0 && "$1" != "--" ]]; do
  case "$1" in
    --sync) sync=1 ;;
    --setup) setup=1 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
[[ "${1:-}" == "--" ]] && shift

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${project_args[@]}" \
    --worker=all --command="$1"
}

if ((sync)); then
  archive="$(mktemp -t contextblip_src.XXXXXX.tar.gz)"
  git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$archive" HEAD
  gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME":/tmp/contextblip_src.tar.gz \
    --zone="$ZONE" "${project_args[@]}" --worker=all
  ssh_all "mkdir -p $REPO_DIR && tar -xzf /tmp/contextblip_src.tar.gz -C $REPO_DIR"
  rm -f "$archive"
fi

if ((setup)); then
  ssh_all "cd $REPO_DIR && python3.11 -m venv .venv && .venv/bin/pip install -q -U pip && \
    .venv/bin/pip install -q -e . 'jax[tpu]>=0.10.2,<0.11'"
fi

if [[ $# -gt 0 ]]; then
  # Quote the command once so that it reaches every worker's shell unchanged.
  cmd="$(printf '%q ' "$@")"
  ssh_all "cd $REPO_DIR && export PATH=\$PWD/.venv/bin:\$PATH && $cmd"
fi
