#!/usr/bin/env bash
# comm.overlap on and off, the same training otherwise: jobs/small.yaml at
# dp=2 on an emulated 2-node cluster (1 rank per node, 1 Gbit/s link, ring
# all-reduce in 2 MiB buckets), alternating runs so both see the same
# machine load. Prints ms/step and the all-reduce time left exposed (what
# the step waited for in comm_grad_finish); CSV in bench/out/overlap.csv.
# Needs root (network namespaces). Usage: bench/overlap.sh [PAIRS] [RATE]
set -euo pipefail
cd "$(dirname "$0")/.."
MPILM=${MPILM:-$PWD/build/mpilm}
PAIRS=${1:-3} RATE=${2:-1gbit}
export EMU_DIR=${EMU_DIR:-/tmp/mpilm-emu-overlap} EMU_PREFIX=${EMU_PREFIX:-mpovl} EMU_NET=${EMU_NET:-10.213.14}
OUT=bench/out; mkdir -p "$OUT"
[[ -s data/demo/train.tok ]] || $MPILM data prepare --input /usr/share/games/fortunes --out data/demo >/dev/null
tools/emu-cluster.sh up 2 "$RATE" >/dev/null
trap 'tools/emu-cluster.sh down >/dev/null 2>&1 || true' EXIT
echo "overlap,pair,step_ms,exposed_comm_ms" >"$OUT/overlap.csv"
for p in $(seq "$PAIRS"); do
    for ov in false true; do
        # the comm thread shares the cores with compute here: let MPI yield while it waits
        line=$(tools/emu-cluster.sh run -np 2 --per-node 1 -x OMP_NUM_THREADS=1 -x OMPI_MCA_mpi_yield_when_idle=1 -- \
            "$MPILM" bench train --job jobs/small.yaml --steps 6 --set data.dir="$PWD/data/demo" \
            --set comm.strategy=ring --set comm.bucket_mb=2 --set comm.overlap=$ov | grep ' dp=2 ')
        ms=$(sed -n 's/^ *dp=.* m=[0-9]* *\([0-9.]*\) ms\/step .*/\1/p' <<<"$line")
        wait=$(sed -n 's/.*all-reduce wait \([0-9.]*\) ms.*/\1/p' <<<"$line")
        echo "overlap=$ov pair $p: $ms ms/step, all-reduce exposed $wait ms/step"
        echo "$ov,$p,$ms,$wait" >>"$OUT/overlap.csv"
    done
done
/usr/bin/python3 - "$OUT/overlap.csv" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
med = lambda ov, k: statistics.median(float(r[k]) for r in rows if r["overlap"] == ov)
off, on = med("false", "step_ms"), med("true", "step_ms")
print(f"median ms/step: overlap off {off:.1f}, on {on:.1f} -> {off/on:.2f}x; exposed all-reduce "
      f"{med('false','exposed_comm_ms'):.1f} -> {med('true','exposed_comm_ms'):.1f} ms/step")
PY
