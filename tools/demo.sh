#!/usr/bin/env bash
# `make demo`: prepares the fortunes corpus, trains jobs/tiny.yaml on 2 ranks
# with checkpoints, and evaluates the final checkpoint. Run from the repo root.
set -euo pipefail
MPILM=${MPILM:-build/mpilm}
MPIRUN=${MPIRUN:-mpirun --oversubscribe --allow-run-as-root --bind-to none}
RANKS=${RANKS:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
step() { printf '\n=== %s\n' "$*"; }

step "1. corpus: the text of Debian's fortunes package -> data/demo"
if [[ -s data/demo/train.tok ]]; then echo "data/demo already prepared"
else $MPILM data prepare --input /usr/share/games/fortunes --out data/demo; fi

step "2. train jobs/tiny.yaml on $RANKS ranks (checkpoints in runs/tiny/ckpt)"
rm -rf runs/tiny
$MPIRUN -n "$RANKS" $MPILM train jobs/tiny.yaml

step "3. checkpoints"
ls runs/tiny/ckpt; echo "latest -> $(cat runs/tiny/ckpt/latest)"

step "4. evaluate the final checkpoint on the validation split"
$MPIRUN -n "$RANKS" $MPILM eval --ckpt runs/tiny/ckpt --data data/demo --batches 16

printf '\nDemo done. Metrics: runs/tiny/metrics.jsonl, runs/tiny/metrics.prom\n'
