#!/usr/bin/env bash
# Checkpoints under failure: SIGUSR1/SIGTERM preemption (exit 75, resume
# bit-exact), kill -9 of a rank in the middle of a save (previous checkpoint
# still loads), async save (same bytes as a synchronous one), and bad
# checkpoints (flipped bytes, truncation, missing dataset, other model shape,
# unknown version, dangling latest, full disk): each a clear error naming the
# file and dataset, non-zero exit, the good checkpoint left in place.
source tests/e2e/lib.sh
[[ -n ${KEEP_TMP:-} ]] && trap - EXIT
DATA=$(test_data)
ck() { echo "checkpoint: {dir: $1, every: ${2:-5}, keep_last: 5}"; }
train() { # NAME RANKS JOB [args...]: runs, output in $TMP/NAME.out, returns the exit status
    local name=$1 n=$2; shift 2
    local rc=0
    timeout 120 $MPIRUN -n "$n" "$MPILM" train "$@" >"$TMP/$name.out" 2>&1 || rc=$?
    [[ $rc -ne 124 ]] || { cat "$TMP/$name.out"; die "$name: hung"; }
    return $rc
}

# reference: 20 steps straight at 2 ranks
write_job "$TMP/ref.yaml" "$DATA" "$TMP/ref" "$(ck "$TMP/ref/ckpt")"
train ref 2 "$TMP/ref.yaml" || { cat "$TMP/ref.out"; die "reference run failed"; }
losses "$TMP/ref/metrics.jsonl" >"$TMP/ref.loss"

# --- preemption by SIGUSR1 through mpirun, then resume -------------------------
# (a constant schedule: the resumed and the reference runs can stop 10 steps
# after the signal instead of running all 3000 steps)
write_job "$TMP/p.yaml" "$DATA" "$TMP/p" "$(ck "$TMP/p/ckpt" 1000)"
sed -i 's/steps: 20/steps: 3000, schedule: constant/' "$TMP/p.yaml"
timeout 300 $MPIRUN -n 2 "$MPILM" train "$TMP/p.yaml" >"$TMP/p.out" 2>&1 &
pid=$!
for _ in $(seq 100); do grep -q "^step " "$TMP/p.out" 2>/dev/null && break; sleep 0.1; done
pkill -USR1 -P $pid mpirun   # mpirun (child of timeout) forwards SIGUSR1 to the ranks
rc=0; wait $pid || rc=$?
cat "$TMP/p.out" | grep -E "stopped by signal|checkpoint:" || true
[[ $rc -eq 75 ]] || { cat "$TMP/p.out"; die "preempted run exited $rc, expected 75"; }
stopped=$(sed -n 's/.*stopped by signal after step \([0-9]*\).*/\1/p' "$TMP/p.out")
[[ -n $stopped && $(cat "$TMP/p/ckpt/latest") == $(printf 'step-%08d' "$stopped") ]] || die "no checkpoint at the stop step"
echo "SIGUSR1: stopped after step $stopped with exit 75 and a checkpoint"
train p2 2 "$TMP/p.yaml" --set train.steps=$((stopped + 10)) && true
grep -q "resumed from .*$(printf 'step-%08d' "$stopped")" "$TMP/p2.out" || { head "$TMP/p2.out"; die "no resume after preemption"; }
# bit-exact: the same run uninterrupted, compared step by step
train p3 2 "$TMP/p.yaml" --set checkpoint.dir= --set log.dir="$TMP/p3" --set train.steps=$((stopped + 10)) || die "uninterrupted run failed"
cmp -s <(losses "$TMP/p/metrics.jsonl") <(losses "$TMP/p3/metrics.jsonl" | tail -n +$((stopped + 1))) \
    || die "resumed losses differ from the uninterrupted run"
echo "resume after preemption: bit-identical to the uninterrupted run"

# SIGTERM to a single process (what a Slurm time limit sends)
write_job "$TMP/t.yaml" "$DATA" "$TMP/t" "$(ck "$TMP/t/ckpt" 1000)"
sed -i 's/steps: 20/steps: 3000/' "$TMP/t.yaml"
"$MPILM" train "$TMP/t.yaml" >"$TMP/t.out" 2>&1 &
pid=$!
for _ in $(seq 100); do grep -q "^step " "$TMP/t.out" 2>/dev/null && break; sleep 0.1; done
kill -TERM $pid
rc=0; wait $pid || rc=$?
[[ $rc -eq 75 && -s $TMP/t/ckpt/latest ]] || { cat "$TMP/t.out"; die "SIGTERM: exit $rc"; }
echo "SIGTERM: exit 75 with checkpoint $(cat "$TMP/t/ckpt/latest")"

# --- kill -9 of rank 1 in the middle of the step-15 save ---------------------
mkdir -p "$TMP/k/ckpt"; cp -r "$TMP/ref/ckpt/step-00000010" "$TMP/k/ckpt/"; echo step-00000010 >"$TMP/k/ckpt/latest"
write_job "$TMP/k.yaml" "$DATA" "$TMP/k" "$(ck "$TMP/k/ckpt")"
MPILM_FAULT=ckpt_kill:1:7 train kill 2 "$TMP/k.yaml" && die "the killed run succeeded"
[[ -d $TMP/k/ckpt/step-00000015.tmp && ! -e $TMP/k/ckpt/step-00000015 ]] || die "kill during save: unexpected state: $(ls "$TMP/k/ckpt")"
[[ $(cat "$TMP/k/ckpt/latest") == step-00000010 ]] || die "latest moved"
"$MPILM" ckpt verify "$TMP/k/ckpt" >/dev/null || die "previous checkpoint does not verify after the crash"
"$MPILM" ckpt ls "$TMP/k/ckpt" | grep -q "step-00000015.tmp.*incomplete" || die "ckpt ls does not show the incomplete save"
train kill2 2 "$TMP/k.yaml" || { cat "$TMP/kill2.out"; die "restart after the crash failed"; }
cmp -s <(losses "$TMP/k/metrics.jsonl") <(tail -10 "$TMP/ref.loss") || die "restart after the crash is not bit-exact"
echo "kill -9 during a save: previous checkpoint intact, restart bit-exact"

# --- async save writes the same tensors --------------------------------------
write_job "$TMP/a.yaml" "$DATA" "$TMP/a" "checkpoint: {dir: $TMP/a/ckpt, every: 5, keep_last: 5, async: true}"
train async 2 "$TMP/a.yaml" || { cat "$TMP/async.out"; die "async run failed"; }
grep -q "writing in the background" "$TMP/async.out" || die "async save not used"
cmp -s <(losses "$TMP/a/metrics.jsonl") "$TMP/ref.loss" || die "async run changed the losses"
$PY - "$TMP/a/ckpt/step-00000015/checkpoint.h5" "$TMP/ref/ckpt/step-00000015/checkpoint.h5" <<'PY'
import sys, h5py, numpy as np
a, b = h5py.File(sys.argv[1], "r"), h5py.File(sys.argv[2], "r")
names = []
a.visit(lambda n: names.append(n) if isinstance(a[n], h5py.Dataset) else None)
for n in names:
    assert np.array_equal(a[n][...], b[n][...]), n
print("async checkpoint: %d datasets identical to the synchronous one" % len(names))
PY

# --- bad checkpoints ----------------------------------------------------------
bad() { # NAME PATTERN: resume from $TMP/bad/ckpt must fail with PATTERN, keep the files
    local name=$1 pat=$2
    write_job "$TMP/bad.yaml" "$DATA" "$TMP/badlog" "$(ck "$TMP/bad/ckpt")"
    train "bad-$name" 2 "$TMP/bad.yaml" "${@:3}" && die "$name: resumed from a bad checkpoint"
    grep -q -- "$pat" "$TMP/bad-$name.out" || { cat "$TMP/bad-$name.out"; die "$name: message does not match $pat"; }
    [[ $(grep -c -- "$pat" "$TMP/bad-$name.out") -eq 1 ]] || die "$name: message not printed once"
    [[ -e $TMP/bad/ckpt/step-00000020/checkpoint.h5 ]] || die "$name: the checkpoint was removed"
    echo "ok  $name: $(grep -- "$pat" "$TMP/bad-$name.out" | head -1)"
}
fresh() { rm -rf "$TMP/bad"; mkdir -p "$TMP/bad/ckpt"; cp -r "$TMP/ref/ckpt/step-00000020" "$TMP/bad/ckpt/"; echo step-00000020 >"$TMP/bad/ckpt/latest"; }
F=$TMP/bad/ckpt/step-00000020/checkpoint.h5

fresh; $PY - "$F" <<'PY'
import sys, h5py
f = h5py.File(sys.argv[1], "r"); off = f["model/h.1.mlp.fc.weight"].id.get_offset(); f.close()
with open(sys.argv[1], "r+b") as g:
    g.seek(off + 100); b = g.read(1); g.seek(off + 100); g.write(bytes([b[0] ^ 0x10]))
PY
bad flipped-bytes "checkpoint.h5: dataset /model/h.1.mlp.fc.weight is corrupt (checksum"
"$MPILM" ckpt verify "$TMP/bad/ckpt" >"$TMP/v.out" && die "verify accepted flipped bytes"
grep -q "model/h.1.mlp.fc.weight: checksum mismatch" "$TMP/v.out" || die "verify does not name the dataset"

fresh; truncate -s 20000 "$F"
bad truncated "checkpoint.h5: cannot open as HDF5 (truncated or not a checkpoint?)"

fresh; $PY -c "import h5py,sys; f=h5py.File(sys.argv[1],'r+'); del f['optim/adam_v/wpe']" "$F"
bad missing-dataset "checkpoint.h5: dataset /optim/adam_v/wpe is missing"
"$MPILM" ckpt verify "$TMP/bad/ckpt" >"$TMP/v.out" && die "verify accepted a missing dataset"
grep -q "optim/adam_v/wpe is missing" "$TMP/v.out" || die "verify misses a missing dataset"

fresh
bad other-shape "dataset /model/wte has shape \[256, 32\], the model expects \[256, 48\]" --set model.n_embd=48

fresh; $PY -c "import h5py,sys; f=h5py.File(sys.argv[1],'r+'); f.attrs['format_version']=99" "$F"
bad version "unsupported checkpoint format_version 99"

fresh; echo step-00000999 >"$TMP/bad/ckpt/latest"
bad dangling-latest "latest points to step-00000999, which does not exist"

# full disk: an 800 KiB file system holds one checkpoint of this model, not two
mnt=$TMP/full; mkdir -p "$mnt"
if mount -t tmpfs -o size=800k tmpfs "$mnt" 2>/dev/null; then
    trap 'umount "$mnt" 2>/dev/null || true; rm -rf "$TMP"' EXIT
    write_job "$TMP/f.yaml" "$DATA" "$TMP/f" "$(ck "$mnt/ckpt")"
    train full 2 "$TMP/f.yaml" && die "a save on a full disk succeeded"
    grep -q "step-00000010.tmp: not enough free space" "$TMP/full.out" || { cat "$TMP/full.out"; die "full disk: message does not name the file"; }
    [[ $(cat "$mnt/ckpt/latest") == step-00000005 && ! -e $mnt/ckpt/step-00000010.tmp ]] || die "full disk: bad state $(ls "$mnt/ckpt")"
    "$MPILM" ckpt verify "$mnt/ckpt" >/dev/null || die "full disk: previous checkpoint damaged"
    echo "ok  full-disk: $(grep -m1 "step-00000010.tmp" "$TMP/full.out")"
    umount "$mnt"
    trap 'rm -rf "$TMP"' EXIT
else
    echo "note: cannot mount a tmpfs here; full-disk case not run"
fi
echo "checkpoint fault handling ok"
