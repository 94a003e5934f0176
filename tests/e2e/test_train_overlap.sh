#!/usr/bin/env bash
# comm.overlap: the data-parallel all-reduce of a bucket runs on the
# reducer's thread as soon as backward has produced all its gradients. The
# result must be the same bit for bit as without overlap (same buckets, same
# algorithm, same order), for plain data parallelism with many buckets, with
# pipeline stages (the tied embedding is summed between stages before its
# bucket goes), with a compressor (error feedback state carried across
# steps) and with gradient accumulation; metrics show the hidden time.
source tests/e2e/lib.sh
DATA=$(test_data)

run() { # NAME RANKS OVERLAP [yaml lines...]
    local n=$1 np=$2 ov=$3; shift 3
    write_job "$TMP/$n-$ov.yaml" "$DATA" "$TMP/log-$n-$ov" "$@"
    timeout 120 $MPIRUN -n "$np" "$MPILM" train "$TMP/$n-$ov.yaml" --set comm.overlap=$ov \
        >"$TMP/out-$n-$ov" 2>&1 || { tail -30 "$TMP/out-$n-$ov"; die "$n overlap=$ov failed"; }
    losses "$TMP/log-$n-$ov/metrics.jsonl" >"$TMP/loss-$n-$ov"
}

check() { # NAME RANKS [yaml lines...]
    local n=$1 np=$2; shift 2
    run "$n" "$np" false "$@"
    run "$n" "$np" true "$@"
    [[ $(wc -l <"$TMP/loss-$n-true") -eq 20 ]] || die "$n: expected 20 losses"
    cmp -s "$TMP/loss-$n-false" "$TMP/loss-$n-true" || {
        paste "$TMP/loss-$n-false" "$TMP/loss-$n-true" | head; die "$n: overlap changes the losses"; }
    local busy wait
    busy=$(grep -o '"dp_allreduce_busy_ms": [0-9.e+-]*' "$TMP/log-$n-true/metrics.jsonl" | tail -1 | cut -d' ' -f2)
    wait=$(grep -o '"dp_allreduce_ms": [0-9.e+-]*' "$TMP/log-$n-true/metrics.jsonl" | tail -1 | cut -d' ' -f2)
    [[ -n $busy && -n $wait ]] || die "$n: metrics lack dp_allreduce_ms / dp_allreduce_busy_ms"
    echo "$n: losses identical with and without overlap; last step: all-reduce busy $busy ms, waited $wait ms"
}

check dp2-buckets 2 "comm: {strategy: ring, bucket_mb: 0.01}"
check dp3-accum 3 "comm: {strategy: rabenseifner, bucket_mb: 0.02}"
check dp2-pp2 4 "parallel: {pp: 2}" "comm: {strategy: recursive_doubling, bucket_mb: 0.01}"
check dp2-int4 2 "comm: {strategy: ring, bucket_mb: 0.01, compression: {type: int4}}"
grep -q '^all-reduce: ring ([1-9][0-9]* buckets' "$TMP/out-dp2-buckets-true" || die "expected several buckets"

# overlap with one data-parallel rank is a no-op, not an error
run dp1 1 true "comm: {strategy: ring}"
echo "PASS"
