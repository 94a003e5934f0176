#!/usr/bin/env bash
# Dedicated parameter servers (comm.ps_ranks = k): the last k ranks of the
# launch only sum gradients (comm/allreduce.h parameter_server with k
# servers); the others train with dp = ranks - k. Training at 2 workers + 1
# and + 2 servers gives the losses of 2 ranks with co-located servers;
# layouts the servers cannot serve are refused with the key named.
source tests/e2e/lib.sh
DATA=$(test_data)

run() { # NAME NP [--set ...]
    local n=$1 np=$2; shift 2
    write_job "$TMP/$n.yaml" "$DATA" "$TMP/log-$n" "comm: {strategy: parameter_server}"
    timeout 120 $MPIRUN -n "$np" "$MPILM" train "$TMP/$n.yaml" "$@" >"$TMP/out-$n" 2>&1 || { tail -30 "$TMP/out-$n"; die "$n failed"; }
    losses "$TMP/log-$n/metrics.jsonl" >"$TMP/loss-$n"
}
run colocated 2
for k in 1 2; do
    run ps$k $((2 + k)) --set comm.ps_ranks=$k
    grep -q "layout dp=2 tp=1 pp=1 + $k dedicated parameter-server rank" "$TMP/out-ps$k" || { head "$TMP/out-ps$k"; die "start-up line does not show the servers"; }
    d=$(max_rel_diff "$TMP/loss-ps$k" "$TMP/loss-colocated")
    echo "2 workers + $k server(s) vs 2 ranks with co-located servers: max relative loss difference $d"
    $PY -c "import sys; sys.exit(0 if $d < 1e-6 else 1)" || die "dedicated servers change the training by $d"
done
bytes=$(grep -o '"bytes_sent": [0-9]*' "$TMP/log-ps1/metrics.jsonl" | tail -1 | cut -d' ' -f2)
[[ $bytes -gt 0 ]] || die "no bytes sent by the worker"

bad() { # EXPECTED NP [--set ...]
    local want=$1 np=$2; shift 2
    if timeout 60 $MPIRUN -n "$np" "$MPILM" train "$TMP/ps1.yaml" "$@" >"$TMP/bad" 2>&1; then die "accepted: $*"; fi
    grep -q "$want" "$TMP/bad" || { cat "$TMP/bad"; die "no '$want' in the error"; }
    echo "refused ($*): $(grep -m1 'comm.ps_ranks' "$TMP/bad")"
}
bad "needs parallel.tp = parallel.pp = 1" 3 --set comm.ps_ranks=1 --set parallel.tp=2
bad "needs comm.strategy parameter_server" 3 --set comm.ps_ranks=1 --set comm.strategy=ring
bad "leaves no training rank" 2 --set comm.ps_ranks=2
echo PASS
