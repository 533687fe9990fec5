#!/usr/bin/env bash
# The Bayes-factor paper's Table 1 runs of one model on one GPU, every run in its own process
# (the networks are small, so one run leaves the GPU mostly idle), as run on the lent H100
# (docs/RESULTS.md).  Each process is one (data set, mode, r, gate) of `bayesprune bf-run` with
# one CPU thread; interrupted runs resume from their checkpoint.pt when started again.
#   usage: scripts/gpu_bf_table1.sh MODEL DATA_DIR OUT_DIR GATES DATASET...
#   e.g.   scripts/gpu_bf_table1.sh cnn data runs/paper "plain bayes" mnist fashion-mnist
set -u
MODEL=${1:?model}; DATA=${2:?data dir}; OUT=${3:?out dir}; GATES=${4:?"plain and/or bayes"}; shift 4
EPOCHS=${EPOCHS:-25}; SEEDS=${SEEDS:-0}
mkdir -p "$OUT/logs"
bf() { OMP_NUM_THREADS=1 python3 -m bayesprune bf-run --model "$MODEL" --epochs "$EPOCHS" --seeds $SEEDS \
         --data-dir "$DATA" --out-dir "$OUT/bf-table1" --device cuda --quiet "$@"; }
for ds in "$@"; do
  for gate in $GATES; do
    flag=--no-gated; [ "$gate" = bayes ] && flag=--gated
    [ "$gate" = plain ] && bf --dataset "$ds" --mode none $flag >"$OUT/logs/$ds-none.log" 2>&1 &
    for mode in random magnitude; do
      for r in 0.25 0.5 0.75 0.9 0.99; do
        bf --dataset "$ds" --mode $mode --sparsity $r $flag >"$OUT/logs/$ds-$mode-$gate-$r.log" 2>&1 &
      done
    done
  done
done
wait
