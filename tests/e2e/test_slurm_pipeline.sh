#!/usr/bin/env bash
# slurm/pipeline.sbatch against the real local Slurm (slurm/local-cluster.sh):
#  1. a tiny model (write_job, 30 steps, a checkpoint dir) through training on
#     4 ranks, quantization (q8) on 2 and serve on 2 — three job steps of one
#     `-N 1 -n 4 --overcommit` allocation, submitted with `sbatch --wait`:
#     COMPLETED 0:0; the training checkpoint step-00000030 exists; the
#     quantized checkpoint passes `mpilm ckpt verify` and holds /qmodel; the
#     serve output has one line per prompt in order, none with "error"; the
#     job output shows the three steps with their rank counts;
#  2. the same with MPILM_QUANT_FORMAT=q3 (a bad format): FAILED, mpilm's
#     message and "FAILED in step quantize" in the output, serve not run.
# Brings the cluster up if it is not up (and down at the end); leaves a
# cluster that was already up running. Exit 0 pass, 77 skip, else fail.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
ROOT=$PWD
source tests/e2e/lib.sh
set +e
source tests/e2e/slurm_lib.sh
SB=$ROOT/slurm/pipeline.sbatch
slurm_start

# pipe NAME [VAR=VALUE...]: submit the pipeline in the background with
# sbatch --wait (working dir $TMP/NAME, output $TMP/NAME.out); sets J_NAME
pipe() {
    local name=$1; shift
    mkdir -p "$TMP/$name"
    write_job "$TMP/$name/job.yaml" "$DATA" "$TMP/$name/log" "checkpoint: {dir: $TMP/$name/ckpt, every: 1000}"
    (cd "$TMP/$name" && env MPILM_TRAIN_RANKS=4 MPILM_QUANT_RANKS=2 MPILM_SERVE_RANKS=2 \
        MPILM_PROMPTS="$TMP/prompts.jsonl" MPILM_SERVE_ARGS="--max-new-tokens 12" "$@" \
        timeout 100 sbatch --wait --parsable -N 1 -n 4 --overcommit -o "$TMP/$name.out" \
        "$SB" job.yaml --set train.steps=30 >"$TMP/$name.id" 2>"$TMP/$name.err")
}

DATA=$(test_data)
cat >"$TMP/prompts.jsonl" <<'EOF2'
{"id": "a", "prompt": "The cat"}
{"id": "b", "prompt": "Hello, world"}
{"id": "c", "prompt": "Q: Why?\nA:", "max_new_tokens": 5}
EOF2

step "1. good pipeline (train 4 / quantize q8 2 / serve 2) and 2. bad format q3, both with sbatch --wait"
pipe good & pg=$!
pipe bad MPILM_QUANT_FORMAT=q3 & pb=$!
wait $pg; rg=$?
wait $pb; rb=$?
J1=$(head -1 "$TMP/good.id"); J1=${J1%%;*}; J2=$(head -1 "$TMP/bad.id"); J2=${J2%%;*}
MYJOBS="$J1 $J2"
step "jobs $J1 (good, sbatch exit $rg) and $J2 (bad, sbatch exit $rb) ended"
O=$TMP/good.out G=$TMP/good
[[ -n $J1 ]] || fail "good pipeline not submitted: $(cat "$TMP/good.err")"
st=$(field "$J1" JobState)
[[ $rg -eq 0 && $st == COMPLETED && $(field "$J1" ExitCode) == 0:0 ]] ||
    { cat "$O"; fail "job $J1 ended $st $(field "$J1" ExitCode) (sbatch --wait exit $rg)"; }
grep -q "pipeline.sbatch: .* ranks train 4, quantize 2, serve 2" "$O" || fail "no rank line in $O"
grep -q "step train: srun -n 4 $ROOT/build/mpilm train job.yaml" "$O" || fail "train step not on 4 ranks with $ROOT/build/mpilm"
grep -q "layout dp=4" "$O" || fail "training not on 4 data-parallel ranks"
grep -q "^done: 30 steps" "$O" || fail "no 'done: 30 steps' line"
grep -q "step quantize: srun -n 2 .* quantize --ckpt $G/ckpt/step-00000030 .*--format q8" "$O" ||
    { cat "$O"; fail "quantize step did not run on 2 ranks on the training checkpoint"; }
grep -q "format q8, 2 rank(s)" "$O" || fail "quantize did not report 2 ranks"
grep -q "step serve: srun -n 2 .* serve --ckpt mpilm-pipeline-$J1/quant " "$O" || fail "serve step not on 2 ranks on the quantized ckpt"
grep -q "quantized linear layers; 2 rank(s)" "$O" || fail "serve did not run the quantized model on 2 ranks"
grep -q "pipeline.sbatch: .* done: " "$O" || fail "no done line"
[[ $(cat "$G/ckpt/latest") == step-00000030 && -s $G/ckpt/step-00000030/checkpoint.h5 ]] ||
    fail "no training checkpoint step-00000030 in $G/ckpt"
Q=$G/mpilm-pipeline-$J1/quant
"$MPILM" ckpt verify "$Q" >"$TMP/verify.out" 2>&1 || { cat "$TMP/verify.out"; fail "mpilm ckpt verify $Q failed"; }
"$MPILM" ckpt inspect "$Q" 2>&1 | grep -q qmodel || fail "$Q holds no /qmodel tensors"
S=$G/mpilm-pipeline-$J1/serve.jsonl
$PY - "$S" <<'EOF2' || { cat "$S"; fail "serve output $S wrong"; }
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
assert [r["id"] for r in rows] == ["a", "b", "c"], [r.get("id") for r in rows]
for r in rows:
    assert "error" not in r, r
    assert isinstance(r["text"], str) and r["tokens"] >= 1 and r["finish_reason"] in ("length", "stop"), r
assert rows[0]["tokens"] == 12 and rows[2]["tokens"] <= 5, rows
print("serve output: %d lines, tokens %s" % (len(rows), [r["tokens"] for r in rows]))
EOF2
step "1. job $J1 COMPLETED 0:0: ckpt $G/ckpt/step-00000030, $Q passes mpilm ckpt verify, 3 responses"

B=$TMP/bad.out
[[ -n $J2 ]] || fail "bad pipeline not submitted: $(cat "$TMP/bad.err")"
st=$(field "$J2" JobState)
[[ $st == FAILED && $rb -ne 0 ]] || { cat "$B"; fail "bad-format job $J2 ended $st (sbatch --wait exit $rb), want FAILED"; }
grep -q "^mpilm quantize: .*format 'q3'" "$B" || { cat "$B"; fail "mpilm's message about format q3 not in $B"; }
grep -q "pipeline.sbatch: .* FAILED in step quantize (exit [1-9]" "$B" || { cat "$B"; fail "no 'FAILED in step quantize' line"; }
grep -q "step serve:" "$B" && fail "serve ran after the failed quantize"
[[ -z $(squeue -h -j "$J2" 2>/dev/null) ]] || fail "bad job $J2 still in the queue"
step "2. bad job $J2 FAILED ($(field "$J2" ExitCode)): $(grep -m1 "^mpilm quantize: " "$B")"
step "PASS"
exit 0
