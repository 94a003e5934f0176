#!/usr/bin/env bash
# `make bench`: benchmark sweeps of this build; CSV in bench/out/, PNG plots
# via gnuplot. Figures and the commands behind them go to bench/RESULTS.md
# (by hand, after looking at them). Run from the repo root.
set -euo pipefail
MPILM=${MPILM:-build/mpilm}
MPIRUN=${MPIRUN:-mpirun --oversubscribe --allow-run-as-root --bind-to none}
OUT=bench/out
mkdir -p "$OUT"
[[ -s data/demo/train.tok ]] || $MPILM data prepare --input /usr/share/games/fortunes --out data/demo

echo "== gemm: model shapes vs the best square sgemm (threads = cores)"
rm -f "$OUT/gemm.csv"
$MPILM bench gemm --csv "$OUT/gemm.csv"
echo
echo "== gemm with the misdetected kernel OpenBLAS 0.3.21 picks on some Xeons (Prescott), fix disabled"
OPENBLAS_CORETYPE=Prescott MPILM_BLAS_FIX=off $MPILM bench gemm --csv "$OUT/gemm.csv"
echo
echo "== the same Prescott setting with mpilm's fix forced"
OPENBLAS_CORETYPE=Prescott MPILM_BLAS_FIX=force $MPILM bench gemm --csv "$OUT/gemm.csv"

echo
echo "== train: jobs/small.yaml at 1 and 2 ranks"
rm -f "$OUT/train.csv"
$MPILM bench train --steps ${STEPS:-8} --csv "$OUT/train.csv"
OMP_NUM_THREADS=1 $MPIRUN -n 2 $MPILM bench train --steps ${STEPS:-8} --csv "$OUT/train.csv"

if command -v gnuplot >/dev/null; then
    grep -v '^kernel' "$OUT/gemm.csv" | awk -F, '$3!="square"{print $1","$3","$7}' >"$OUT/gemm.dat"
    gnuplot <<GP
set terminal pngcairo size 1100,500
set output "$OUT/gemm.png"
set datafile separator ","
set title "sgemm GFLOP/s per model product (jobs/small.yaml), by OpenBLAS kernel"
set style data histograms
set style histogram clustered
set style fill solid 0.8
set xtics rotate by -40
set ylabel "GFLOP/s"
set key top right
plot "< grep -v Prescott $OUT/gemm.dat | awk -F, '!seen[\$2]++'" using 3:xtic(2) title "selected kernel", \
     "< grep Prescott $OUT/gemm.dat" using 3 title "Prescott (misdetected)"
GP
    echo "plot: $OUT/gemm.png"
fi
