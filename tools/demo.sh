#!/usr/bin/env bash
# `make demo`: prepares the fortunes corpus, trains jobs/tiny.yaml on 2 ranks
# with checkpoints, evaluates the final checkpoint, quantizes it, serves a few
# prompts, and runs the same training through Slurm when a local cluster can
# start. Run from the repo root.
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


step "5. quantize the final checkpoint to 8 bits (2 ranks) and compare with fp32"
rm -rf runs/tiny-q8
$MPIRUN -n "$RANKS" $MPILM quantize --ckpt runs/tiny/ckpt --out runs/tiny-q8 --format q8 \
    --eval data/demo | tail -4

step "6. serve a few prompts from the quantized checkpoint (tools/demo-prompts.jsonl)"
$MPIRUN -n "$RANKS" $MPILM serve --ckpt runs/tiny-q8 --prompts tools/demo-prompts.jsonl \
    --out runs/tiny-answers.jsonl
cat runs/tiny-answers.jsonl

step "7. the Slurm path: slurm/train.sbatch on a one-node local Slurm cluster (4 ranks, 50 steps)"
# Falls back to mpirun when the local cluster cannot start here (no root,
# no slurm-wlm/munge). A cluster that was already up is used and left up.
SLURM_ARGS=(jobs/tiny.yaml --set train.steps=50 --set train.micro_batch=4
    --set log.dir=runs/tiny-slurm --set checkpoint.dir=runs/tiny-slurm/ckpt)
rm -rf runs/tiny-slurm runs/tiny-slurm.out
slurm_started=0
if slurm/local-cluster.sh status >/dev/null 2>&1; then
    slurm_up=1
elif [[ $EUID -eq 0 ]] && command -v slurmctld >/dev/null && slurm/local-cluster.sh up >runs/local-cluster-up.log 2>&1; then
    slurm_up=1 slurm_started=1
else
    slurm_up=0
fi
if [[ $slurm_up -eq 1 ]]; then
    eval "$(slurm/local-cluster.sh env)"
    echo "local Slurm cluster is up: sbatch -N 1 -n 4 --overcommit slurm/train.sbatch ${SLURM_ARGS[*]}"
    rc=0
    sbatch --wait -N 1 -n 4 --overcommit -o runs/tiny-slurm.out slurm/train.sbatch "${SLURM_ARGS[@]}" || rc=$?
    grep -E '^(train.sbatch|step +50|done|checkpoint)' runs/tiny-slurm.out || true
    [[ $slurm_started -eq 0 ]] || slurm/local-cluster.sh down >/dev/null 2>&1 || true
    [[ $rc -eq 0 ]] || { echo "the Slurm job failed (exit $rc): see runs/tiny-slurm.out"; exit 1; }
    echo "job output: runs/tiny-slurm.out; metrics: runs/tiny-slurm/metrics.jsonl"
else
    echo "the local Slurm cluster cannot start here (it needs root, slurm-wlm and munge;"
    echo "runs/local-cluster-up.log has its output if it tried); running the same job with mpirun"
    $MPIRUN -n 4 $MPILM train "${SLURM_ARGS[@]}"
fi

printf '\nDemo done. Metrics: runs/tiny/metrics.jsonl, runs/tiny/metrics.prom\n'
