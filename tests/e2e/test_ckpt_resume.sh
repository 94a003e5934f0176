#!/usr/bin/env bash
# Resume: a run restarted from its step-10 checkpoint continues with losses
# bit-identical to the uninterrupted run (same layout), and within 1e-5 on
# another rank count. An independent reader (h5py) finds every tensor with
# its global shape and the values of the model. A byte flipped where a
# tensor- or pipeline-parallel rank must read data it does not keep (only to
# verify its share of the checksum) is still caught on load.
source tests/e2e/lib.sh
DATA=$(test_data)
ck() { echo "checkpoint: {dir: $1, every: 10, keep_last: 5}"; }
write_job "$TMP/a.yaml" "$DATA" "$TMP/a" "$(ck "$TMP/a/ckpt")"
timeout 300 $MPIRUN -n 2 "$MPILM" train "$TMP/a.yaml" >"$TMP/a.out" 2>&1 || { cat "$TMP/a.out"; die "straight run failed"; }
losses "$TMP/a/metrics.jsonl" | tail -10 >"$TMP/a.loss"

for n in 2 1 4; do
    mkdir -p "$TMP/b$n/ckpt"
    cp -r "$TMP/a/ckpt/step-00000010" "$TMP/b$n/ckpt/"
    echo step-00000010 >"$TMP/b$n/ckpt/latest"
    mkdir "$TMP/b$n/ckpt/step-00000020.tmp"   # debris of a crashed save: cleaned at start
    write_job "$TMP/b$n.yaml" "$DATA" "$TMP/b$n" "$(ck "$TMP/b$n/ckpt")"
    timeout 300 $MPIRUN -n $n "$MPILM" train "$TMP/b$n.yaml" >"$TMP/b$n.out" 2>&1 || { cat "$TMP/b$n.out"; die "resume at $n ranks failed"; }
    grep -q "resumed from .*step-00000010" "$TMP/b$n.out" || die "did not resume"
    [[ ! -e $TMP/b$n/ckpt/step-00000020.tmp ]] || die "leftover .tmp not cleaned"
    losses "$TMP/b$n/metrics.jsonl" >"$TMP/b$n.loss"
    if [[ $n -eq 2 ]]; then
        cmp -s "$TMP/a.loss" "$TMP/b2.loss" || { paste "$TMP/a.loss" "$TMP/b2.loss"; die "resume is not bit-exact"; }
        echo "resume at 2 ranks: bit-identical to the uninterrupted run"
    else
        d=$(max_rel_diff "$TMP/b$n.loss" "$TMP/a.loss")
        echo "resume at $n ranks (written at 2): max relative loss difference $d"
        $PY -c "import sys; sys.exit(0 if $d < 1e-5 else 1)" || die "reshard to $n ranks differs by $d"
    fi
done

# independent reader
$PY - "$TMP/a/ckpt/step-00000020/checkpoint.h5" <<'PY'
import sys, h5py, numpy as np
f = h5py.File(sys.argv[1], "r")
assert f.attrs["format"] in (b"mpilm-checkpoint", "mpilm-checkpoint"), f.attrs["format"]
assert int(f.attrs["step"]) == 20 and list(f.attrs["layout"]) == [2, 1, 1]
C, V, T, L = 32, 256, 32, 2
shapes = {"wte": (V, C), "wpe": (T, C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
for l in range(L):
    shapes.update({f"h.{l}.ln_1.weight": (C,), f"h.{l}.attn.qkv.weight": (3*C, C),
                   f"h.{l}.attn.qkv.bias": (3*C,), f"h.{l}.attn.proj.weight": (C, C),
                   f"h.{l}.mlp.fc.weight": (4*C, C), f"h.{l}.mlp.proj.weight": (C, 4*C)})
for name, shp in shapes.items():
    for g in ("model", "optim/adam_m", "optim/adam_v"):
        d = f[f"{g}/{name}"]
        assert d.shape == shp and d.dtype == np.float32, (g, name, d.shape, d.dtype)
n = sum(1 for _ in f["model"])
assert n == 4 + 12 * L, n
ln = f["model/h.0.ln_1.weight"][...]
assert np.all(np.isfinite(ln)) and not np.allclose(ln, 1.0), "LayerNorm weight never trained?"
print("h5py: %d model tensors with global shapes, step %d, layout %s" % (n, f.attrs["step"], list(f.attrs["layout"])))
PY

# Load verifies whole tensors whatever each rank keeps: with tp=2 rank 0 keeps
# columns [0, 2C) of mlp.proj.weight [C, 4C] but hashes all columns of the
# first rows; with pp=2 stage 0 keeps layer 0 but hashes half the rows of
# layer 1. Flip a byte in exactly such a place: the resume must fail.
for case in "tp h.0.mlp.proj.weight 100" "pp h.1.attn.proj.weight 1"; do
    set -- $case
    for corrupt in 0 1; do
        d=$TMP/c$1$corrupt; mkdir -p "$d/ckpt"
        cp -r "$TMP/a/ckpt/step-00000010" "$d/ckpt/"; echo step-00000010 >"$d/ckpt/latest"
        [[ $corrupt -eq 1 ]] && $PY - "$d/ckpt/step-00000010/checkpoint.h5" "model/$2" "$3" <<'PY'
import sys, h5py
f = h5py.File(sys.argv[1], "r"); off = f[sys.argv[2]].id.get_offset(); f.close()
with open(sys.argv[1], "r+b") as g:   # element (row 0, col $3) of the float32 tensor
    g.seek(off + 4 * int(sys.argv[3])); b = g.read(1); g.seek(off + 4 * int(sys.argv[3])); g.write(bytes([b[0] ^ 0x10]))
PY
        write_job "$d.yaml" "$DATA" "$d" "$(ck "$d/ckpt")"
        rc=0; timeout 120 $MPIRUN -n 2 "$MPILM" train "$d.yaml" --set parallel.$1=2 --set train.steps=12 >"$d.out" 2>&1 || rc=$?
        if [[ $corrupt -eq 0 ]]; then
            [[ $rc -eq 0 ]] && grep -q "resumed from" "$d.out" || { cat "$d.out"; die "$1=2: clean resume failed"; }
        else
            [[ $rc -ne 0 && $rc -ne 124 ]] || { cat "$d.out"; die "$1=2: corrupt checkpoint loaded (exit $rc)"; }
            grep -q "dataset /model/$2 is corrupt" "$d.out" || { cat "$d.out"; die "$1=2: corruption not named"; }
        fi
    done
    echo "$1=2: a flipped byte in /model/$2 outside rank 0's shard is caught on load"
done
echo "resume and reshard ok"
