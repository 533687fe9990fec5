#!/usr/bin/env bash
# The BMRS Table 1 at the paper's budget (50 + 10 epochs, seeds 0 1 2) on one GPU, as run on the
# lent H100 (docs/RESULTS.md).  Two chains of `bayesprune reproduce`, each with JOBS runs at once
# on the same GPU; the first chain starts with the headline LeNet5/MNIST.
#   usage: scripts/gpu_reproduce.sh DATA_DIR OUT_DIR
set -u
DATA=${1:?data dir}; OUT=${2:?out dir}; JOBS=${JOBS:-7}
common=(--seeds 0 1 2 --threshold reference --jobs "$JOBS" --data-dir "$DATA" --out-dir "$OUT" --device cuda)
bp() { python3 -m bayesprune reproduce bmrs-table1 "${common[@]}" "$@"; }
mkdir -p "$OUT"
( bp --models lenet5 --datasets mnist; bp --models mlp --datasets fashion-mnist ) >"$OUT/chain1.log" 2>&1 &
( bp --models mlp --datasets mnist; bp --models lenet5 --datasets fashion-mnist ) >"$OUT/chain2.log" 2>&1 &
wait
