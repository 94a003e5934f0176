#!/usr/bin/env bash
# The gradient compressors' state (error-feedback residuals, PowerSGD's warm
# start Q) is saved in checkpoints (/comm/compressor_state, one row per
# rank), with payload update also each rank's AdamW moments
# (/comm/local_adam; /optim then holds their mean over the ranks), and
# restored on resume: 20 steps straight equal a new process resuming from
# the straight run's step-10 checkpoint, bit for bit, at dp=2 with int4
# (payload gradient, resumed with overlap and async save), powersgd and topk
# (payload update). Resuming on another layout starts error feedback from
# zero and says so.
source tests/e2e/lib.sh
DATA=$(test_data)

job() { # FILE LOGDIR CKPTDIR COMPRESSION PAYLOAD
    write_job "$1" "$DATA" "$2" "comm: {strategy: ring, bucket_mb: 0.01, compression: {type: $4, payload: $5, warmup_steps: 2}}" \
        "checkpoint: {dir: $3, every: 10, resume: auto, keep_last: 0}"
}
train() { # NP FILE OUT [args]
    local np=$1 f=$2 out=$3; shift 3
    timeout 120 $MPIRUN -n "$np" "$MPILM" train "$f" "$@" >"$out" 2>&1 || { tail -30 "$out"; die "training $f failed"; }
}

for v in int4:gradient powersgd:update topk:update; do
    cx=${v%:*} pl=${v#*:}
    job "$TMP/s-$cx.yaml" "$TMP/ls-$cx" "$TMP/cs-$cx" $cx $pl
    train 2 "$TMP/s-$cx.yaml" "$TMP/out-s-$cx"
    job "$TMP/r-$cx.yaml" "$TMP/lr-$cx" "$TMP/cr-$cx" $cx $pl
    mkdir -p "$TMP/cr-$cx" && cp -r "$TMP/cs-$cx/step-00000010" "$TMP/cr-$cx/" && echo step-00000010 >"$TMP/cr-$cx/latest"
    train 2 "$TMP/r-$cx.yaml" "$TMP/out-r2-$cx" --set comm.overlap=true --set checkpoint.async=true
    grep -q "resumed the gradient compressors' error feedback" "$TMP/out-r2-$cx" || { cat "$TMP/out-r2-$cx"; die "$cx: state not restored"; }
    [[ $pl == gradient ]] || grep -q "error feedback .* and each rank's AdamW moments" "$TMP/out-r2-$cx" ||
        die "$cx: moments not restored"
    losses "$TMP/ls-$cx/metrics.jsonl" | tail -10 >"$TMP/a"
    losses "$TMP/lr-$cx/metrics.jsonl" | tail -10 >"$TMP/b"
    [[ $(wc -l <"$TMP/b") -eq 10 ]] || die "$cx: expected 10 resumed losses"
    cmp -s "$TMP/a" "$TMP/b" || { paste "$TMP/a" "$TMP/b"; die "$cx: resumed losses differ from the straight run"; }
    echo "$cx (payload $pl): steps 11-20 after resume bit-identical to the straight run"
done

# the state is in the file, one row per rank, non-zero; with payload update
# the ranks' moments differ and /optim holds their mean
$PY - "$TMP/cs-int4/latest" "$TMP/cs-topk/latest" <<'PY'
import sys, os, h5py, numpy as np
def open_latest(p):
    return h5py.File(os.path.join(os.path.dirname(p), open(p).read().strip(), "checkpoint.h5"), "r")
f = open_latest(sys.argv[1])
s = f["comm/compressor_state"]
assert s.dtype == np.float32 and s.shape[0] == 2 and s.shape[1] > 0, s
assert all(np.abs(s[r]).max() > 0 for r in range(2)), "a rank's residual is all zero"
assert "checksum" in s.attrs
assert "comm/local_adam" not in f, "payload gradient wrote per-rank moments"
print("int4: comm/compressor_state:", s.shape)
f = open_latest(sys.argv[2])
a = f["comm/local_adam"][:]
n = a.shape[1] // 2
assert a.shape == (2, 2 * n) and "checksum" in f["comm/local_adam"].attrs, a.shape
assert not np.array_equal(a[0], a[1]), "the ranks' moments are equal"
m = np.concatenate([f["optim/adam_m"][k][:].ravel() for k in ["wte", "wpe"]])
assert np.allclose(m, ((a[0, :m.size] + a[1, :m.size]) / 2), rtol=1e-6, atol=1e-12), "/optim is not the mean"
print("topk: comm/local_adam:", a.shape, "rows differ; /optim/adam_m = their mean (wte, wpe)")
PY

# another layout: trains on, error feedback from zero (and with payload
# update the moments from their mean), said once
train 3 "$TMP/r-int4.yaml" "$TMP/out-r3" --set train.steps=25
grep -q "gradient compressor state not restored (the parallel layout differs" "$TMP/out-r3" || { cat "$TMP/out-r3"; die "no note on the dropped state"; }
train 3 "$TMP/r-topk.yaml" "$TMP/out-r3t" --set train.steps=25
grep -q "not restored (the parallel layout differs.*every rank from the checkpoint's AdamW moments" "$TMP/out-r3t" ||
    { cat "$TMP/out-r3t"; die "no note on the moments"; }
echo "PASS"
