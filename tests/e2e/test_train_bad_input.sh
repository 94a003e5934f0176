#!/usr/bin/env bash
# Bad job files and data: one clear message (file, line, key) printed once,
# non-zero exit of every rank, no hang (each run under a timeout).
source tests/e2e/lib.sh
DATA=$(test_data)

# expect_fail NAME RANKS PATTERN JOB [ARGS...]
expect_fail() {
    local name=$1 n=$2 pat=$3; shift 3
    local out=$TMP/$name.out rc=0
    timeout 60 $MPIRUN -n "$n" "$MPILM" train "$@" >"$out" 2>&1 || rc=$?
    [[ $rc -ne 124 && $rc -ne 137 ]] || die "$name: hung (timeout)"
    [[ $rc -ne 0 ]] || die "$name: exit status 0"
    grep -q -- "$pat" "$out" || { cat "$out"; die "$name: message does not match '$pat'"; }
    local count; count=$(grep -c -- "$pat" "$out")
    [[ $count -eq 1 ]] || { cat "$out"; die "$name: message printed $count times"; }
    grep -q "Segmentation\|signal 11\|core dumped" "$out" && die "$name: crashed"
    echo "ok  $name: $(grep -- "$pat" "$out")"
}

J=$TMP/job.yaml
write_job "$J" "$DATA" "$TMP/log"

sed 's/steps: 20, //' "$J" >"$TMP/missing.yaml"
expect_fail missing-key 2 "missing.yaml: missing required key train.steps" "$TMP/missing.yaml"

sed 's/steps: 20/stepz: 20/' "$J" >"$TMP/unknown.yaml"
expect_fail unknown-key 2 "unknown.yaml:3: train.stepz: unknown key" "$TMP/unknown.yaml"

sed 's/lr: 1.0e-3/lr: fast/' "$J" >"$TMP/typo.yaml"
expect_fail mistyped 2 "typo.yaml:3: train.lr: expected a number, got 'fast'" "$TMP/typo.yaml"

sed 's/n_embd: 32/n_embd: 33/' "$J" >"$TMP/shape.yaml"
expect_fail impossible-size 2 "model.n_embd (33) must be divisible by model.n_head (2)" "$TMP/shape.yaml"

printf 'model: {n_layer: 2\ntrain: [\n' >"$TMP/syntax.yaml"
expect_fail yaml-syntax 2 "syntax.yaml:.*YAML syntax error" "$TMP/syntax.yaml"

expect_fail bad-set 2 "\-\-set train.nope: unknown key" "$J" --set train.nope=3
expect_fail bad-set-value 2 "\-\-set train.steps: expected an integer" "$J" --set train.steps=ten

# 24 rows are not a multiple of micro_batch 2 x dp 5
expect_fail batch-vs-world 5 "train.global_batch: 24 is not a multiple of micro_batch \* dp = 2 \* 5" "$J"

sed "s|dir: $DATA|dir: $TMP/nodata|" "$J" >"$TMP/nodata.yaml"
expect_fail missing-data 2 "nodata/train.tok: cannot open token file" "$TMP/nodata.yaml"

mkdir -p "$TMP/trunc"
cp "$DATA/val.tok" "$TMP/trunc/val.tok"
head -c 100000 "$DATA/train.tok" >"$TMP/trunc/train.tok"
sed "s|dir: $DATA|dir: $TMP/trunc|" "$J" >"$TMP/trunc.yaml"
expect_fail truncated-data 2 "train.tok: header says .* tokens .* (truncated or corrupt)" "$TMP/trunc.yaml"

printf 'not a token file at all, just some text padding out the header' >"$TMP/trunc/train.tok"
expect_fail not-token-file 2 "train.tok: not a token file (bad magic)" "$TMP/trunc.yaml"

expect_fail missing-job 2 "nosuch.yaml: cannot open job file" "$TMP/nosuch.yaml"
echo "all bad-input cases rejected cleanly"
