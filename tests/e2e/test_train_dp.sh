#!/usr/bin/env bash
# Data parallelism: 1, 2, 3 and 4 ranks with the same global batch give the
# same losses within 1e-5 relative over 20 steps, and two identical runs give
# bit-identical losses.
source tests/e2e/lib.sh
DATA=$(test_data)
for n in 1 2 3 4; do
    write_job "$TMP/j$n.yaml" "$DATA" "$TMP/log$n"
    timeout 300 $MPIRUN -n $n "$MPILM" train "$TMP/j$n.yaml" >"$TMP/out$n" 2>&1 || { cat "$TMP/out$n"; die "$n ranks failed"; }
    losses "$TMP/log$n/metrics.jsonl" >"$TMP/loss$n"
    [[ $(wc -l <"$TMP/loss$n") -eq 20 ]] || die "$n ranks: expected 20 losses"
done
for n in 2 3 4; do
    d=$(max_rel_diff "$TMP/loss$n" "$TMP/loss1")
    echo "dp=$n vs dp=1: max relative loss difference $d"
    $PY -c "import sys; sys.exit(0 if $d < 1e-5 else 1)" || die "dp=$n differs from dp=1 by $d"
done
# the losses must also change over the run (a frozen model would pass the above)
$PY -c "
l=[float(x) for x in open('$TMP/loss1')]; import sys
print('loss step 1 -> 20: %.4f -> %.4f' % (l[0], l[-1])); sys.exit(0 if l[-1] < l[0] - 0.5 else 1)" || die "loss did not fall"

# determinism: rerun the 2-rank job, losses must be bit-identical
write_job "$TMP/j2b.yaml" "$DATA" "$TMP/log2b"
timeout 300 $MPIRUN -n 2 "$MPILM" train "$TMP/j2b.yaml" >/dev/null 2>&1 || die "rerun failed"
losses "$TMP/log2b/metrics.jsonl" >"$TMP/loss2b"
cmp -s "$TMP/loss2" "$TMP/loss2b" || { paste "$TMP/loss2" "$TMP/loss2b"; die "two identical runs differ"; }
echo "two identical 2-rank runs: bit-identical losses"

# every all-reduce algorithm of comm/ gives the same training (3 ranks: not a power of two)
for s in mpi ring recursive_doubling rabenseifner tree parameter_server hierarchical; do
    write_job "$TMP/s.yaml" "$DATA" "$TMP/log-$s" "comm: {strategy: $s}"
    timeout 300 $MPIRUN -n 3 "$MPILM" train "$TMP/s.yaml" --set train.steps=8 >"$TMP/out-$s" 2>&1 || { cat "$TMP/out-$s"; die "strategy $s failed"; }
    losses "$TMP/log-$s/metrics.jsonl" >"$TMP/loss-$s"
    d=$(max_rel_diff "$TMP/loss-$s" "$TMP/loss-mpi")
    echo "comm.strategy=$s at 3 ranks vs mpi: max relative loss difference $d"
    $PY -c "import sys; sys.exit(0 if $d < 1e-5 else 1)" || die "strategy $s differs by $d"
    grep -q "\"algorithm\": \"$s\"" "$TMP/log-$s/metrics.jsonl" || die "metrics do not name algorithm $s"
done

# the shipped job files start at 1, 2 and 4 ranks as they are
for j in jobs/tiny.yaml jobs/small.yaml; do
    for n in 1 2 4; do
        timeout 300 $MPIRUN -n $n "$MPILM" train "$j" --set data.dir="$DATA" --set train.steps=1 \
            --set train.eval_every=0 --set checkpoint.dir= --set log.dir="$TMP/jobs" >"$TMP/jobs.out" 2>&1 \
            || { cat "$TMP/jobs.out"; die "$j does not run at $n ranks"; }
    done
    echo "$j runs at 1, 2 and 4 ranks"
done
