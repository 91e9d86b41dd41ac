#!/usr/bin/env bash
# Runs one command as N cooperating JAX processes on this machine (CPU), for testing multi-host
# code paths without a cluster.
#
#   launch/local_multiprocess.sh [-n PROCS] [-d DEVICES_PER_PROC] [-t TIMEOUT_S] [-l LOGDIR] \
#       -- .venv/bin/python -m contextblip_jax.main --config configs/X.py:tiny --workdir runs/mp
#
# Every process gets the same command line; the coordinates come from the environment, which
# contextblip_jax.parallel.distributed.initialize_distributed reads:
#   JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>  JAX_NUM_PROCESSES=N  JAX_PROCESS_ID=i
#   XLA_FLAGS=--xla_force_host_platform_device_count=D  JAX_PLATFORMS=cpu
# Each process runs under `timeout` (a process whose peer died would otherwise wait, then abort),
# its output goes to LOGDIR/proc_<i>.log (process 0 is also echoed), and the script exits with
# the first non-zero status. If one process fails, the others are stopped.
set -euo pipefail

procs=2
devices=2
limit=600
logdir=""
usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
while getopts "n:d:t:l:h" opt; do
  case "$opt" in
    n) procs="$OPTARG" ;;
    d) devices="$OPTARG" ;;
    t) limit="$OPTARG" ;;
    l) logdir="$OPTARG" ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
[[ "${1:-}" == "--" ]] && shift
[[ $# -gt 0 ]] || usage

python_bin="${PYTHON:-python3}"
command -v "$python_bin" >/dev/null 2>&1 || python_bin=python
port="$("$python_bin" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
logdir="${logdir:-$(mktemp -d -t local_mp.XXXXXX)}"
mkdir -p "$logdir"
echo "local_multiprocess: $procs processes x $devices CPU devices, coordinator 127.0.0.1:$port, logs in $logdir" >&2

pids=()
for ((i = 0; i < procs; i++)); do
  (
    export JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$procs" JAX_PROCESS_ID="$i"
    export JAX_PLATFORMS=cpu
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices"
    exec timeout --signal=TERM --kill-after=10 "$limit" "$@"
  ) >"$logdir/proc_$i.log" 2>&1 &
  pids+=("$!")
done

tail -n +1 -f "$logdir/proc_0.log" --pid="${pids[0]}" >&2 &
tailer=$!

# jax's preemption notifier catches SIGTERM, so a stopped peer gets TERM, then KILL after 10 s.
status=0
stop_at=0
remaining=("${pids[@]}")
while ((${#remaining[@]})); do
  next=()
  for pid in "${remaining[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      next+=("$pid")
    else
      rc=0
      wait "$pid" || rc=$?
      if ((rc != 0 && status == 0)); then
        status=$rc
        echo "local_multiprocess: process pid $pid exited with $rc; stopping the others" >&2
        for other in "${pids[@]}"; do kill -TERM "$other" 2>/dev/null || true; done
        stop_at=$((SECONDS + 10))
      fi
    fi
  done
  remaining=("${next[@]+"${next[@]}"}")
  if ((stop_at && SECONDS >= stop_at)); then
    for pid in "${remaining[@]+"${remaining[@]}"}"; do
      pkill -KILL -P "$pid" 2>/dev/null || true
      kill -KILL "$pid" 2>/dev/null || true
    done
  fi
  ((${#remaining[@]})) && sleep 0.5
done
wait "$tailer" 2>/dev/null || true
for ((i = 1; i < procs; i++)); do
  if ((status != 0)); then
    echo "----- process $i (last lines) -----" >&2
    tail -n 20 "$logdir/proc_$i.log" >&2
  fi
done
exit "$status"
