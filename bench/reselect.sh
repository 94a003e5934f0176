#!/usr/bin/env bash
# bench/reselect.sh: the adaptive all-reduce's online re-selection, shown.
# `mpilm train` with comm.strategy adaptive runs on the emulated 2-node x 2
# cluster (tools/emu-cluster.sh) with fast links (RATE0, default 10gbit);
# after STEP1 steps the inter-node rate drops to RATE1 (default 100mbit) with
# `emu-cluster.sh rate` while training goes on. The selector (comm/select.h)
# compares each bucket's measured time with its prediction, re-probes after a
# few calls off by its factor and logs "comm: re-selection: ..."; the
# algorithm of every step is in metrics.jsonl. This script prints the
# "comm:" lines with the step they came after, the algorithm changes in
# metrics.jsonl and the mean dp all-reduce time before and after the change.
# Log and metrics: $OUT/reselect.log, $OUT/reselect-metrics.jsonl.
# Needs root and network namespaces (exit 77 otherwise). Run from the repo
# root; called from bench/run.sh. Not a test: nothing is asserted.
set -euo pipefail
MPILM=${MPILM:-build/mpilm}
OUT=${OUT:-bench/out}
RATE0=${RATE0:-10gbit} RATE1=${RATE1:-100mbit}
STEPS=${RS_STEPS:-200} STEP1=${RS_STEP1:-80}
EMU=$PWD/tools/emu-cluster.sh
export EMU_DIR=/tmp/mpilm-bench-emu-rs EMU_PREFIX=mpilmr EMU_NET=10.213.83 EMU_SLOTS=2
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
if ! ip netns add mpilmr-probe$$ >/dev/null 2>&1; then
    echo "reselect: SKIP: cannot create network namespaces here (need root)"
    exit 77
fi
ip netns del mpilmr-probe$$
[[ -s data/demo/train.tok ]] || $MPILM data prepare --input /usr/share/games/fortunes --out data/demo
LOG=$(mktemp -d /tmp/mpilm-reselect.XXXXXX)
trap 'bash "$EMU" down >/dev/null 2>&1 || true; rm -rf "$LOG"' EXIT
bash "$EMU" up 2 "$RATE0"

# jobs/tiny.yaml: a 471 KiB gradient bucket, fast enough for hundreds of steps
bash "$EMU" run -np 4 --per-node 2 -- "$PWD/$MPILM" train "$PWD/jobs/tiny.yaml" \
    --set data.dir="$PWD/data/demo" --set comm.strategy=adaptive --set train.steps="$STEPS" \
    --set train.eval_every=0 --set checkpoint.dir= --set log.dir="$LOG" --set log.every=1 \
    >"$OUT/reselect.log" 2>&1 &
pid=$!
# wait for STEP1 steps, then slow the links down while training runs on
while kill -0 $pid 2>/dev/null; do
    n=$(wc -l 2>/dev/null <"$LOG/metrics.jsonl" || echo 0)
    [[ $n -ge $STEP1 ]] && break
    sleep 0.2
done
at=$(wc -l 2>/dev/null <"$LOG/metrics.jsonl" || echo 0)
bash "$EMU" rate "$RATE1"
echo "reselect: inter-node rate $RATE0 -> $RATE1 after step $at" | tee -a "$OUT/reselect.log"
wait $pid
cp "$LOG/metrics.jsonl" "$OUT/reselect-metrics.jsonl"

echo "== comm: lines of the run (after which step), rate change after step $at"
awk '/^step / { split($2, s, "/"); last = s[1] } /^comm: / { print "  [after step " (last ? last : 0) "] " $0 }' \
    "$OUT/reselect.log"
/usr/bin/python3 - "$OUT/reselect-metrics.jsonl" "$at" "$RATE0" "$RATE1" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
at, r0, r1 = int(sys.argv[2]), sys.argv[3], sys.argv[4]
print("== algorithm changes in metrics.jsonl")
prev = None
for r in rows:
    if r["algorithm"] != prev:
        print(f"  step {r['step']:4d}: {r['algorithm']}  (dp all-reduce {r['dp_allreduce_ms']:.1f} ms)")
        prev = r["algorithm"]
def mean(xs): return sum(xs) / len(xs) if xs else float("nan")
before = [r["dp_allreduce_ms"] for r in rows if 2 <= r["step"] <= at]
after = [r["dp_allreduce_ms"] for r in rows if r["step"] > at + 20]
print(f"== dp all-reduce mean: {mean(before):.2f} ms at {r0} (steps 2..{at}), "
      f"{mean(after):.2f} ms at {r1} (steps {at + 21}..{rows[-1]['step']})")
PY
