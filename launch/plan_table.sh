#!/usr/bin/env bash
# Regenerates the table of launch/README.md ("Planning for a TPU slice"): every paper
# configuration compiled ahead of time for v5e-16, v5p-8 and v6e-8 in bfloat16 and float32
# (python -m contextblip_jax.aot; needs libtpu, no TPU), one JSON per run in OUT, then the
# Markdown table on stdout. A run that does not fit HBM is planned again with remat=full.
#
#   launch/plan_table.sh [OUT_DIR]     (default /tmp/contextblip_plan; runs already in OUT_DIR
#                                       are kept, so an interrupted table resumes)
set -u
OUT=${1:-/tmp/contextblip_plan}
PY=${PYTHON:-python}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."

# topology | mesh for pre-training / evaluation (batch over data) | mesh for fine-tuning
# (36 examples per update: data=4 divides it, fsdp shards the parameters over the rest)
TOPOS="v5e:4x4 v5p:2x2x1 v6e:2x4"
ft_mesh() { case $1 in v5e:4x4) echo "--config.mesh.data=4 --config.mesh.fsdp=4";;
                       v6e:2x4) echo "--config.mesh.data=4 --config.mesh.fsdp=2";;
                       *) echo "--config.mesh.data=4";; esac; }

run() {  # name config topology extra-flags...
  local name=$1 cfg=$2 topo=$3; shift 3
  local json="$OUT/$name.json"
  [ -s "$json" ] && return 0
  echo "== $name: $cfg on $topo $*" >&2
  $PY -m contextblip_jax.aot --config "$cfg" --topology "$topo" --json "$json" "$@" \
    > "$OUT/$name.log" 2>&1 || { echo "   failed: see $OUT/$name.log" >&2; return 1; }
  tail -n +2 "$OUT/$name.log" | grep -v "^planning" >&2
  if grep -q '"fits": false' "$json"; then
    run "$name-remat" "$cfg" "$topo" "$@" --config.model.remat=full
  fi
}

for dtype in bfloat16 float32; do
  for topo in $TOPOS; do
    t=${topo%%:*}
    run "pretrain-$t-$dtype" configs/pretrain.py "$topo" --config.model.compute_dtype=$dtype
    run "stage1-$t-$dtype" configs/finetune_stage1.py "$topo" $(ft_mesh "$topo") \
      --config.model.compute_dtype=$dtype
    run "stage2-$t-$dtype" configs/finetune_stage2.py "$topo" $(ft_mesh "$topo") \
      --config.model.compute_dtype=$dtype
    run "zeroshot-$t-$dtype" configs/evaluate.py "$topo" --config.model.scan_layers=True \
      --config.model.compute_dtype=$dtype
  done
done
$PY -c "import sys; from contextblip_jax.run import plan; print(plan.markdown_table(sys.argv[1]))" "$OUT"
