#!/usr/bin/env bash
# jobs/tiny.yaml on 2 ranks: the loss falls well below ln(256) = 5.545, the
# run leaves metrics and checkpoints where the README says, and `mpilm eval`
# on the final checkpoint reproduces the trainer's last validation loss.
source tests/e2e/lib.sh
DATA=$(test_data)
RUN=$TMP/run
timeout 600 $MPIRUN -n 2 "$MPILM" train jobs/tiny.yaml --set data.dir="$DATA" \
    --set log.dir="$RUN" --set checkpoint.dir="$RUN/ckpt" >"$TMP/out" 2>&1 || { cat "$TMP/out"; die "training failed"; }
tail -3 "$TMP/out"
[[ -s $RUN/metrics.jsonl && -s $RUN/metrics.prom ]] || die "metrics files missing"
grep -q '^mpilm_loss ' "$RUN/metrics.prom" || die "metrics.prom has no mpilm_loss gauge"
[[ $(cat "$RUN/ckpt/latest") == step-00000400 ]] || die "latest is $(cat "$RUN/ckpt/latest")"
val=$(grep -o '"val_loss": [^,}]*' "$RUN/metrics.jsonl" | tail -1 | cut -d' ' -f2)
echo "final val_loss $val (ln 256 = 5.545)"
$PY -c "import sys; sys.exit(0 if $val < 3.2 else 1)" || die "val_loss $val is not well below ln(256)"

json=$(timeout 120 $MPIRUN -n 2 "$MPILM" eval --ckpt "$RUN/ckpt" --data "$DATA" --batches 8 --batch-size 4 --json)
echo "$json"
ev=$($PY -c "import json,sys; print(json.loads(sys.argv[1])['val_loss'])" "$json")
$PY -c "import sys; sys.exit(0 if abs($ev - $val) <= 1e-5 * $val else 1)" || die "eval $ev != trainer $val"
# one rank gives the same answer as two
json1=$(timeout 120 "$MPILM" eval --ckpt "$RUN/ckpt/step-00000400" --data "$DATA" --batches 8 --batch-size 4 --json)
ev1=$($PY -c "import json,sys; print(json.loads(sys.argv[1])['val_loss'])" "$json1")
$PY -c "import sys; sys.exit(0 if abs($ev1 - $ev) <= 1e-6 * $ev else 1)" || die "eval on 1 rank $ev1 != 2 ranks $ev"
# bad checkpoint path: clear error, non-zero exit
if timeout 60 "$MPILM" eval --ckpt "$TMP/none" --data "$DATA" 2>"$TMP/err"; then die "eval of a missing checkpoint succeeded"; fi
grep -q "no such checkpoint" "$TMP/err" || { cat "$TMP/err"; die "unclear error"; }
echo "eval matches training; errors are clear"
