#!/usr/bin/env bash
# mpilm quantize (issue 7) on a tiny trained model: the quantized tensors are
# byte-identical at 1-4 ranks, the file reads back in h5py with the layout of
# io/qckpt.h and dequantizes (in numpy, independently of the C code) within
# the bounds of kernels/quant.h's tests, `mpilm eval` accepts a q8 checkpoint
# within 0.5% of fp32, and bad input is refused with clear messages.
source tests/e2e/lib.sh
DATA=$(test_data)
CK=$TMP/ckpt
write_job "$TMP/job.yaml" "$DATA" "$TMP/log" "checkpoint: {dir: $CK, every: 60, keep_last: 1}"
timeout 300 $MPIRUN -n 2 "$MPILM" train "$TMP/job.yaml" --set train.steps=60 >"$TMP/train.out" 2>&1 ||
    { cat "$TMP/train.out"; die "training failed"; }
[[ $(cat "$CK/latest") == step-00000060 ]] || die "no checkpoint at step 60"
SRC=$CK/step-00000060/checkpoint.h5

quant() { # N FORMAT OUT [extra...]
    local n=$1 f=$2 o=$3; shift 3
    timeout 120 $MPIRUN -n "$n" "$MPILM" quantize --ckpt "$CK" --out "$o" --format "$f" --json "$@"
}

# 1. every format at 1 rank; q4a and auto also at 2, 3, 4 ranks, q8 at 3
for f in q8 q4 q4a nf4 auto; do
    quant 1 $f "$TMP/$f-1" >"$TMP/$f-1.json" 2>"$TMP/err" || { cat "$TMP/err"; die "quantize $f failed"; }
done
for n in 2 3 4; do
    for f in q4a auto; do
        quant $n $f "$TMP/$f-$n" >"$TMP/$f-$n.json" 2>"$TMP/err" || { cat "$TMP/err"; die "quantize $f at $n ranks failed"; }
    done
done
quant 3 q8 "$TMP/q8-3" >"$TMP/q8-3.json" || die "quantize q8 at 3 ranks failed"
$PY - "$TMP" <<'PY' || die "quantized tensors differ between rank counts"
import h5py, numpy as np, sys
t = sys.argv[1]
def items(path):
    out = {}
    with h5py.File(path + "/step-00000060/checkpoint.h5", "r") as f:
        f.visititems(lambda n, o: out.__setitem__(n, (o.dtype.str, o[()].tobytes())) if isinstance(o, h5py.Dataset) else None)
        out["@quant"] = f.attrs["quant"]
    return out
for fmt, ns in (("q4a", (2, 3, 4)), ("auto", (2, 3, 4)), ("q8", (3,))):
    ref = items(f"{t}/{fmt}-1")
    for n in ns:
        assert items(f"{t}/{fmt}-{n}") == ref, f"{fmt}: {n} ranks differ from 1 rank"
print("byte-identical at 1-4 ranks")
PY

# 2. layout in h5py, independent dequantization, error bounds
$PY - "$TMP" "$SRC" <<'PY' || die "layout or error bounds"
import h5py, json, numpy as np, sys
t, src = sys.argv[1], sys.argv[2]
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)
BOUND = {"q8": 0.011, "q4": 0.145, "q4a": 0.105, "nf4": 0.117}  # tests/unit/test_quant.c maxima
fp = h5py.File(src, "r")
def deq(g, rows, cols):
    fmt = g.attrs["format"].decode()
    q, s = g["q"][()], g["scale"][()]
    assert s.dtype == np.float16 and s.shape == (rows, (cols + 31) // 32), (s.dtype, s.shape)
    nblk = s.shape[1]
    s = s.astype(np.float32)[:, :, None]
    if fmt == "q8":
        assert q.dtype == np.int8 and q.shape == (rows, nblk * 32)
        w = q.reshape(rows, nblk, 32).astype(np.float32) * s
    else:
        assert q.dtype == np.uint8 and q.shape == (rows, nblk * 16)
        b = q.reshape(rows, nblk, 16)
        nib = np.concatenate([b & 15, b >> 4], axis=2).astype(np.int32)
        if fmt == "q4": w = (nib - 8).astype(np.float32) * s
        elif fmt == "nf4": w = NF4[nib] * s
        else:
            m = g["min"][()]
            assert m.dtype == np.float16 and m.shape == (rows, nblk)
            w = nib.astype(np.float32) * s + m.astype(np.float32)[:, :, None]
    assert ("min" in g) == (fmt == "q4a")
    return fmt, w.reshape(rows, nblk * 32)[:, :cols]
for fmt in ("q8", "q4", "q4a", "nf4", "auto"):
    rep = json.load(open(f"{t}/{fmt}-1.json"))
    with h5py.File(f"{t}/{fmt}-1/step-00000060/checkpoint.h5", "r") as f:
        for k in ("format", "format_version", "step", "tokens_seen", "config", "layout", "seed"):
            assert k in f.attrs, k
        assert f.attrs["step"] == 60 and f.attrs["config"] == fp.attrs["config"]
        qa = json.loads(f.attrs["quant"])
        assert qa["block"] == 32 and qa["scale_type"] == "float16"
        for r in rep["tensors"]:
            name, (rows, cols) = r["name"], r["shape"]
            ref = fp["model/" + name][()].reshape(rows, cols)
            assert qa["formats"][name] == r["format"]
            if fmt != "auto":  # linear weights quantized; embeddings, LayerNorms, biases not
                assert (r["format"] == "fp32") == (cols == 1 or name in ("wte", "wpe")), name
            if r["format"] == "fp32":
                assert name not in f.get("qmodel", {})
                assert np.array_equal(f["model/" + name][()], fp["model/" + name][()]), name
                continue
            assert "model/" + name not in f
            g = f["qmodel/" + name]
            assert list(g.attrs["shape"]) == [rows, cols]
            kind, w = deq(g, rows, cols)
            assert kind == r["format"]
            e = np.linalg.norm((w - ref).astype(np.float64)) / np.linalg.norm(ref.astype(np.float64))
            assert abs(e - r["rel_rmse"]) <= 1e-4 * e + 1e-9, (name, e, r["rel_rmse"])
            assert e < BOUND[kind], (fmt, name, kind, e)
            if kind == "q8":  # half a step of absmax/127 in every block with absmax >= 2e-3
                pad = (-cols) % 32
                a = np.pad(ref, ((0, 0), (0, pad))).reshape(rows, -1, 32)
                d = np.pad(w - ref, ((0, 0), (0, pad))).reshape(rows, -1, 32)
                amax = np.abs(a).max(axis=2, keepdims=True)
                ok = (np.abs(d) <= amax / 254) | (amax < 2e-3)
                assert ok.all(), name
    n4 = sum(1 for r in rep["tensors"] if r["format"] != "fp32")
    print(f"{fmt}: {n4} tensors quantized, {rep['bits_per_weight']:.2f} bits/weight overall, "
          f"max rel RMSE {max(r['rel_rmse'] for r in rep['tensors']):.4f}")
assert {r["format"] for r in json.load(open(f"{t}/auto-1.json"))["tensors"]} - {"fp32"}, "auto kept everything fp32"
PY

# 3. mpilm eval on the q8 checkpoint: val_loss within 0.5% of fp32
e32=$(timeout 120 $MPIRUN -n 2 "$MPILM" eval --ckpt "$CK" --data "$DATA" --batches 16 --json) || die "eval fp32"
eq8=$(timeout 120 $MPIRUN -n 2 "$MPILM" eval --ckpt "$TMP/q8-1" --data "$DATA" --batches 16 --json) || die "eval q8"
echo "$e32"; echo "$eq8"
$PY - "$e32" "$eq8" <<'PY' || die "q8 val_loss not within 0.5% of fp32"
import json, sys
a, b = (json.loads(x)["val_loss"] for x in sys.argv[1:])
print(f"fp32 {a:.5f} q8 {b:.5f} rel {abs(b - a) / a:.2e}")
assert abs(b - a) <= 0.005 * a
PY
# the report's --eval agrees with mpilm eval
quant 2 q8 "$TMP/q8-eval" --eval "$DATA" --batches 16 >"$TMP/q8-eval.json" || die "quantize --eval"
$PY - "$TMP/q8-eval.json" "$e32" "$eq8" <<'PY' || die "quantize --eval report"
import json, sys
r = json.load(open(sys.argv[1]))["eval"]; a, b = (json.loads(x)["val_loss"] for x in sys.argv[2:])
assert abs(r["fp32"]["val_loss"] - a) < 1e-5 and abs(r["quant"]["val_loss"] - b) < 1e-5, r
assert 0 <= r["kl"] < 1e-3 and r["top1_agreement"] > 0.99, r
print("report:", r)
PY

# 4. bad input
expect_fail() { # PATTERN cmd...: fails with PATTERN in stderr
    local pat=$1; shift
    if "$@" >"$TMP/out" 2>"$TMP/err"; then die "succeeded: $*"; fi
    grep -q -- "$pat" "$TMP/err" || { cat "$TMP/err"; die "no '$pat' in the error of: $*"; }
}
expect_fail "unknown format 'q3'" "$MPILM" quantize --ckpt "$CK" --out "$TMP/x" --format q3
expect_fail "already holds a checkpoint" quant 2 q8 "$TMP/q8-1"
quant 2 q4 "$TMP/q8-1" --force >/dev/null || die "--force did not replace"
$PY -c "import h5py,json,sys; q=json.loads(h5py.File(sys.argv[1],'r').attrs['quant']); assert q['formats']['h.0.attn.qkv.weight']=='q4'" \
    "$TMP/q8-1/step-00000060/checkpoint.h5" || die "--force output is not q4"
cp -r "$CK/step-00000060" "$CK/step-00000070.tmp"
expect_fail "incomplete checkpoint" quant 2 q8 "$TMP/y" --ckpt "$CK/step-00000070.tmp"
# a corrupt input tensor (one float changed, checksum kept) is refused
mkdir -p "$TMP/bad" && cp -r "$CK/step-00000060" "$TMP/bad/"
$PY -c "import h5py,sys; f=h5py.File(sys.argv[1],'r+'); d=f['model/h.1.mlp.fc.weight']; d[3,5]=d[3,5]+1" \
    "$TMP/bad/step-00000060/checkpoint.h5"
expect_fail "is corrupt" quant 3 q8 "$TMP/y" --ckpt "$TMP/bad/step-00000060"
# a corrupt quantized tensor is refused by the loader
cp -r "$TMP/q4a-1" "$TMP/q4a-bad"
$PY -c "import h5py,sys; f=h5py.File(sys.argv[1],'r+'); d=f['qmodel/h.0.mlp.fc.weight/q']; d[0,0]^=1" \
    "$TMP/q4a-bad/step-00000060/checkpoint.h5"
expect_fail "qmodel/h.0.mlp.fc.weight/q is corrupt" "$MPILM" eval --ckpt "$TMP/q4a-bad" --data "$DATA" --batches 1
expect_fail "already a quantized checkpoint" quant 1 q8 "$TMP/z" --ckpt "$TMP/q4a-1"
expect_fail "output is the input" quant 1 q8 "$CK"
# interrupted: rank 1 killed after 5 tensors -> nothing visible in OUT; a rerun works
if quant 2 nf4 "$TMP/cut" --fault-rank 1 --fault-after 5 >/dev/null 2>&1; then die "faulted run succeeded"; fi
[[ ! -e $TMP/cut/latest && ! -e $TMP/cut/step-00000060 ]] || die "half-written output visible: $(ls "$TMP/cut")"
quant 2 nf4 "$TMP/cut" >/dev/null || die "rerun after an interrupted run failed"
[[ $(cat "$TMP/cut/latest") == step-00000060 && ! -e $TMP/cut/step-00000060.tmp ]] || die "rerun left $(ls "$TMP/cut")"
echo "bad input refused; interrupted runs leave no visible output"

# `mpilm ckpt verify` understands quantized checkpoints and finds a flipped code byte
"$MPILM" ckpt verify "$TMP/cut" >"$TMP/v.out" || { cat "$TMP/v.out"; die "verify rejects a good quantized checkpoint"; }
$PY -c "
import h5py, sys
f = h5py.File(sys.argv[1], 'r+'); d = f['qmodel/h.0.mlp.fc.weight/q']; a = d[...]; a.flat[0] ^= 0x11; d[...] = a
" "$TMP/cut/step-00000060/checkpoint.h5"
if "$MPILM" ckpt verify "$TMP/cut" >"$TMP/v.out"; then die "verify accepted a corrupt quantized block"; fi
grep -q "qmodel/h.0.mlp.fc.weight/q is corrupt" "$TMP/v.out" || { cat "$TMP/v.out"; die "verify does not name the block"; }
echo "ckpt verify: quantized checkpoints verified, a corrupt block named"
