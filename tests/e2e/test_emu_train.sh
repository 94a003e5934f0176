#!/usr/bin/env bash
# `mpilm train` across the emulated cluster (tools/emu-cluster.sh): 2
# network-namespace nodes x 2 ranks joined by 1 Gbit/s links, jobs/tiny.yaml
# for a few steps with comm.strategy hierarchical and adaptive. Both runs must
# complete, their per-step losses must equal those of the same job on 4 ranks
# of one node (comm.strategy mpi) within 1e-4 relative (only the summation
# order of the gradients differs), the rank map must put 2 ranks on each of 2
# nodes, and the log and metrics.jsonl must name the algorithm used.
# Everything is torn down on exit. Exit 0 pass, 77 skip (no network
# namespaces here), else fail. Not a benchmark: nothing is timed.
source tests/e2e/lib.sh
emu_instance mpilmtr 10.213.81
[[ -x $MPILM ]] || die "$MPILM not built (make)"
DATA=$(test_data)
STEPS=20
# same job everywhere: jobs/tiny.yaml, metrics every step, no checkpoints
args=(train "$PWD/jobs/tiny.yaml" --set data.dir="$DATA" --set checkpoint.dir=
      --set train.steps=$STEPS --set train.eval_every=0 --set log.every=1)

# reference: the same 4 ranks on this node
timeout 120 $MPIRUN -n 4 "$MPILM" "${args[@]}" --set log.dir="$TMP/log-local" \
    --set comm.strategy=mpi >"$TMP/out-local" 2>&1 || { cat "$TMP/out-local"; die "local run failed"; }
losses "$TMP/log-local/metrics.jsonl" >"$TMP/loss-local"
[[ $(wc -l <"$TMP/loss-local") -eq $STEPS ]] || die "local run logged $(wc -l <"$TMP/loss-local") steps, not $STEPS"

bash "$EMU" up 2 1gbit || die "emu-cluster up failed"
for s in hierarchical adaptive; do
    out=$TMP/out-$s
    timeout -k 5 120 bash "$EMU" run -np 4 --per-node 2 -- "$MPILM" "${args[@]}" \
        --set log.dir="$TMP/log-$s" --set comm.strategy=$s >"$out" 2>&1 ||
        { cat "$out"; die "$s: train across the emulated nodes failed"; }
    grep -E '^(rank map|  rank 0 ->|all-reduce:|comm: |done:)' "$out"
    # node grouping: ranks 0, 1 on node0 and 2, 3 on node1
    grep -q '^rank map (world 4 = dp 4 ' "$out" || die "$s: no rank map for dp 4"
    for r in 0 1 2 3; do
        grep -q "rank $r -> dp $r, pp 0, tp 0, node$((r / 2))\b" "$out" ||
            die "$s: rank $r is not on node$((r / 2))"
    done
    grep -q "^all-reduce: $s " "$out" || die "$s: start-up line does not name $s"
    grep -q '^done: '"$STEPS"' steps' "$out" || die "$s: did not finish $STEPS steps"
    losses "$TMP/log-$s/metrics.jsonl" >"$TMP/loss-$s"
    d=$(max_rel_diff "$TMP/loss-$s" "$TMP/loss-local")
    echo "$s on 2 nodes x 2 vs 4 ranks on one node: max relative loss difference $d"
    $PY -c "import sys; sys.exit(0 if $d < 1e-4 else 1)" || die "$s: losses differ by $d"
    algs=$(grep -o '"algorithm": "[^"]*"' "$TMP/log-$s/metrics.jsonl" | sort | uniq -c)
    echo "$algs"
    bytes=$(grep -o '"bytes_sent": [0-9]*' "$TMP/log-$s/metrics.jsonl" | tail -1 | cut -d' ' -f2)
    [[ ${bytes:-0} -gt 0 ]] || die "$s: metrics show no bytes sent"
done
grep -q '"algorithm": "hierarchical' "$TMP/log-hierarchical/metrics.jsonl" ||
    die "hierarchical: metrics.jsonl does not name it"
# both measured whole messages against pieces between nodes at start-up
for s in hierarchical adaptive; do
    grep -Eq '^comm: (probe: )?stream check: .* -> (pieces|whole messages)(, sliced)?$' "$TMP/out-$s" ||
        die "$s: no stream check line at start-up"
done
# adaptive: the selector saw the two nodes and named its pick in the log and metrics
grep -q '^comm: layout: 4 ranks on 2 nodes, at most 2 per node' "$TMP/out-adaptive" ||
    die "adaptive: the selector did not see 2 nodes x 2 ranks"
grep -q '^comm: adaptive choice for .*(gradient bucket): [a-z_()]' "$TMP/out-adaptive" ||
    die "adaptive: no choice for the gradient bucket in the log"
grep -q '"algorithm": "adaptive:[a-z_()]*"' "$TMP/log-adaptive/metrics.jsonl" ||
    die "adaptive: metrics.jsonl does not name the chosen algorithm"

bash "$EMU" down || die "emu-cluster down failed"
left=$( (ip netns list; ip -o link show) | grep -c 'mpilmtr-' || true)
[[ $left -eq 0 ]] || die "down left $left namespaces/links behind"
echo "PASS: jobs/tiny.yaml, $STEPS steps on the emulated 2 x 2 cluster at 1 Gbit/s with hierarchical and adaptive"
