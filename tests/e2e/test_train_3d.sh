#!/usr/bin/env bash
# 3-D parallelism: for every layout dp, tp, pp in {1, 2} and tp = 4, pp = 4 at
# 4 ranks, the 10 losses match the single-rank run within 1e-5 relative and
# the final parameters (read from the checkpoints, which hold full global
# tensors whatever the layout) match within 1e-5. Also: pipelines with
# micro-batches = 1, = pp and > pp; recompute on/off bit-identical; resume
# of a 3-D checkpoint at other layouts; clear errors for impossible splits.
source tests/e2e/lib.sh
[[ -n ${KEEP_TMP:-} ]] && trap - EXIT
DATA=$(test_data)
job() { # FILE LOGDIR [extra lines]
    local f=$1 log=$2; shift 2
    {
        echo "model: {n_layer: 4, n_head: 4, n_embd: 32, block_size: 32, vocab_size: 256}"
        echo "data: {dir: $DATA}"
        echo "train: {steps: 10, micro_batch: 1, global_batch: 8, lr: 2.0e-3, warmup: 2, seed: 7}"
        echo "log: {dir: $log, every: 5}"
        for l in "$@"; do echo "$l"; done
    } >"$f"
}
run() { # NAME DP TP PP [--set ...]: trains with a final checkpoint in $TMP/NAME/ckpt
    local name=$1 dp=$2 tp=$3 pp=$4; shift 4
    job "$TMP/$name.yaml" "$TMP/$name" "checkpoint: {dir: $TMP/$name/ckpt, every: 10}" \
        "parallel: {tp: $tp, pp: $pp}"
    timeout 300 $MPIRUN -n $((dp * tp * pp)) "$MPILM" train "$TMP/$name.yaml" "$@" >"$TMP/$name.out" 2>&1 \
        || { cat "$TMP/$name.out"; die "$name failed"; }
    losses "$TMP/$name/metrics.jsonl" >"$TMP/$name.loss"
}
# A B TOL: the model's parameters within TOL, normwise relative over the whole
# model. (Per tensor, the attention key bias is not comparable: its true
# gradient is exactly zero, softmax ignores it, so Adam turns rounding noise
# of 1e-10 into updates of order lr that differ between summation orders.)
same_params() {
    $PY - "$TMP/$1/ckpt/step-00000010/checkpoint.h5" "$TMP/$2/ckpt/step-00000010/checkpoint.h5" "$3" <<'PY'
import sys, h5py, numpy as np
a, b, tol = h5py.File(sys.argv[1]), h5py.File(sys.argv[2]), float(sys.argv[3])
d2 = n2 = 0.0
for n in a["model"]:
    x, y = a["model"][n][...].astype(np.float64), b["model"][n][...].astype(np.float64)
    assert x.shape == y.shape, n
    d2 += float(np.sum((x - y) ** 2)); n2 += float(np.sum(y ** 2))
rel = (d2 / n2) ** 0.5
print("parameter difference %.2e" % rel)
sys.exit(0 if rel < tol else 1)
PY
}

run ref 1 1 1
for lay in "2 1 1" "1 2 1" "1 1 2" "2 2 1" "2 1 2" "1 2 2" "2 2 2" "1 4 1" "1 1 4"; do
    set -- $lay
    name=l$1$2$3
    run "$name" "$@"
    d=$(max_rel_diff "$TMP/$name.loss" "$TMP/ref.loss")
    p=$(same_params "$name" ref 1e-5) || die "dp=$1 tp=$2 pp=$3: final parameters differ ($p)"
    echo "dp=$1 tp=$2 pp=$3: max relative loss difference $d, $p"
    $PY -c "import sys; sys.exit(0 if $d < 1e-5 else 1)" || die "dp=$1 tp=$2 pp=$3: losses differ by $d"
done
grep -q '"bubble_ms"' "$TMP/l112/metrics.jsonl" || die "no pipeline time accounting in metrics"

# micro-batches per pipeline: 1 (< pp), 2 (= pp), 4 (> pp), each against 1 rank
for gb in 1 2 4; do
    run "m1-$gb" 1 1 1 --set train.global_batch=$gb
    run "m2-$gb" 1 1 2 --set train.global_batch=$gb
    d=$(max_rel_diff "$TMP/m2-$gb.loss" "$TMP/m1-$gb.loss")
    echo "pp=2 with $gb micro-batches: max relative loss difference $d"
    $PY -c "import sys; sys.exit(0 if $d < 1e-5 else 1)" || die "pp=2, $gb micro-batches: differs by $d"
done

# recompute: identical losses, less activation memory
run rc 1 2 2 --set train.recompute=true
cmp -s "$TMP/rc.loss" "$TMP/l122.loss" || die "recompute changed the losses"
grep -q "saves [0-9]*%" "$TMP/rc.out" || die "recompute does not report the memory saved"
echo "recompute: identical losses; $(grep -m1 -o 'saves [0-9]*%' "$TMP/rc.out") of activation memory"

# reshard: the (2,2,2) step-5 checkpoint resumed at 1 rank, at dp=4, and at tp=4
for lay in "1 1 1" "4 1 1" "1 4 1"; do
    set -- $lay
    name=re$1$2$3
    mkdir -p "$TMP/$name/ckpt"
    job "$TMP/full.yaml" "$TMP/full" "checkpoint: {dir: $TMP/full/ckpt, every: 5}" "parallel: {tp: 2, pp: 2}"
    [[ -d $TMP/full/ckpt/step-00000005 ]] || timeout 300 $MPIRUN -n 8 "$MPILM" train "$TMP/full.yaml" >/dev/null 2>&1 || die "3-D run with checkpoints failed"
    cp -r "$TMP/full/ckpt/step-00000005" "$TMP/$name/ckpt/"; echo step-00000005 >"$TMP/$name/ckpt/latest"
    job "$TMP/$name.yaml" "$TMP/$name" "checkpoint: {dir: $TMP/$name/ckpt, every: 10}" "parallel: {tp: $2, pp: $3}"
    timeout 300 $MPIRUN -n $(($1 * $2 * $3)) "$MPILM" train "$TMP/$name.yaml" >"$TMP/$name.out" 2>&1 || { cat "$TMP/$name.out"; die "resume at $lay failed"; }
    grep -q "layout dp=2 tp=2 pp=2" "$TMP/$name.out" || die "did not resume the 3-D checkpoint"
    d=$(max_rel_diff <(losses "$TMP/$name/metrics.jsonl") <(tail -5 "$TMP/ref.loss"))
    echo "resume of dp=2 tp=2 pp=2 at dp=$1 tp=$2 pp=$3: max relative loss difference $d"
    $PY -c "import sys; sys.exit(0 if $d < 1e-5 else 1)" || die "reshard to $lay differs by $d"
done

# impossible splits: clear errors
job "$TMP/bad.yaml" "$TMP/bad"
out=$(timeout 60 $MPIRUN -n 3 "$MPILM" train "$TMP/bad.yaml" --set parallel.pp=3 2>&1) && die "pp=3 accepted"
grep -q "parallel.pp: model.n_layer (4) cannot be split into 3 equal stages" <<<"$out" || { echo "$out"; die "pp error unclear"; }
out=$(timeout 60 $MPIRUN -n 3 "$MPILM" train "$TMP/bad.yaml" --set parallel.tp=3 2>&1) && die "tp=3 accepted"
grep -q "parallel.tp: 3 does not divide model.n_head (4)" <<<"$out" || { echo "$out"; die "tp error unclear"; }
echo "3-D parallel training ok"
