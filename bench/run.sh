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
set terminal pngcairo size 1100,520 noenhanced
set output "$OUT/gemm.png"
set yrange [0:*]
set bmargin 9
set rmargin 8
set key outside top center horizontal
set datafile separator ","
set title "sgemm GFLOP/s per model product (jobs/small.yaml), by OpenBLAS kernel"
set style data histograms
set style histogram clustered
set style fill solid 0.8
set xtics rotate by -40
set ylabel "GFLOP/s"
plot "< grep -v Prescott $OUT/gemm.dat | awk -F, '!seen[\$2]++'" using 3:xtic(2) title "selected kernel", \
     "< grep Prescott $OUT/gemm.dat" using 3 title "Prescott (misdetected)"
GP
    echo "plot: $OUT/gemm.png"
fi

echo
echo "== ckpt: checkpoint save/load GB/s (io/ckpt) vs raw disk bandwidth of the same directory, 1, 2, 4 ranks"
rm -f "$OUT/ckpt.csv"
for n in 1 2 4; do
    OMP_NUM_THREADS=1 OMPI_MCA_mpi_yield_when_idle=1 $MPIRUN -n $n $MPILM bench ckpt --reps ${CKPT_REPS:-3} \
        --size-mb ${CKPT_MB:-1024} ${CKPT_DIR:+--dir "$CKPT_DIR"} --csv "$OUT/ckpt.csv"
done
if command -v gnuplot >/dev/null; then
    # one row per disk-bound method (checksum and warm-cache rows: see the table), one
    # column of GB/s per rank count ("-" where not measured)
    for set in small synth; do
        awk -F, -v set="$set" 'NR > 1 { g[$1 "," $2] = $5 }
            END { n = split("raw_write raw_write_n mpiio_write ckpt_save fpr_vds_save raw_read " \
                            "raw_read_n mpiio_read ckpt_load ckpt_load_repl fpr_vds_load", m, " ")
                  for (i = 1; i <= n; i++) {
                      line = m[i]; any = 0
                      for (r = 1; r <= 4; r *= 2) {
                          k = set "." m[i] "," r; any += (k in g); line = line " " ((k in g) ? g[k] : "-") }
                      if (any) print line } }' "$OUT/ckpt.csv" >"$OUT/ckpt-$set.dat"
    done
    gnuplot <<GP
set terminal pngcairo size 1200,900
set output "$OUT/ckpt.png"
set datafile missing "-"
set style data histograms
set style histogram clustered
set style fill solid 0.8
set xtics rotate by -30 noenhanced
set ylabel "GB/s (1e9 B/s), median"
set grid ytics
set yrange [0:*]
set multiplot layout 2,1
set title "checkpoint of jobs/small.yaml model + AdamW m, v: save/load vs raw disk, by ranks"
plot for [c=2:4] "$OUT/ckpt-small.dat" using c:xtic(1) title sprintf("%d rank%s", 2**(c-2), c>2?"s":"")
set title "synthetic ${CKPT_MB:-1024} MB checkpoint (2..100 MB tensors): save/load vs raw disk, by ranks"
plot for [c=2:4] "$OUT/ckpt-synth.dat" using c:xtic(1) title sprintf("%d rank%s", 2**(c-2), c>2?"s":"")
unset multiplot
GP
    echo "plot: $OUT/ckpt.png"
fi

echo
echo "== allreduce: every algorithm, adaptive and MPI_Allreduce, 4 B .. 256 MiB at 2, 4, 8 ranks"
rm -f "$OUT/allreduce.csv"
# ranks share 2 cores here: without yielding, a rank spinning in MPI holds the
# core its peer needs and small-message times become scheduler time slices
export OMPI_MCA_mpi_yield_when_idle=1
for n in 2 4 8; do
    OMP_NUM_THREADS=1 $MPIRUN -n $n $MPILM bench allreduce --label local-$n \
        ${AR_ITERS:+--iters $AR_ITERS} --csv "$OUT/allreduce.csv"
done
# on the emulated 2-node cluster (root + network namespaces), 2 x 2 ranks at
# 1 Gbit/s and 10 Gbit/s
if [[ ${AR_EMU:-1} != 0 ]] && ip netns add mpilm-bench-probe$$ >/dev/null 2>&1; then
    ip netns del mpilm-bench-probe$$
    export EMU_DIR=${EMU_DIR:-/tmp/mpilm-bench-emu} EMU_PREFIX=${EMU_PREFIX:-mpilmb}
    export EMU_NET=${EMU_NET:-10.213.80} EMU_SLOTS=2
    trap 'bash tools/emu-cluster.sh down >/dev/null 2>&1 || true' EXIT
    for rate in 1gbit 10gbit; do
        bash tools/emu-cluster.sh up 2 $rate
        OMP_NUM_THREADS=1 bash tools/emu-cluster.sh run -np 4 --per-node 2 -- $PWD/$MPILM bench \
            allreduce --explain --label emu-$rate ${AR_ITERS:+--iters $AR_ITERS} \
            --csv "$PWD/$OUT/allreduce.csv"
    done
    bash tools/emu-cluster.sh down
    trap - EXIT
fi
if command -v gnuplot >/dev/null; then
    # busbw (GB/s) per size, one line per algorithm, one panel per run label
    labels=$(awk -F, 'NR > 1 && !seen[$1]++ { print $1 }' "$OUT/allreduce.csv")
    nl=$(echo "$labels" | wc -w)
    for l in $labels; do
        for a in $(awk -F, -v l="$l" 'NR > 1 && $1 == l && !s[$6]++ { print $6 }' "$OUT/allreduce.csv"); do
            awk -F, -v l="$l" -v a="$a" 'NR > 1 && $1 == l && $6 == a { print $5, $14 }' \
                "$OUT/allreduce.csv" >"$OUT/allreduce-$l-$a.dat"
        done
    done
    {
        echo "set terminal pngcairo size 1200,$((380 * ((nl + 1) / 2)))"
        echo "set output '$OUT/allreduce.png'"
        echo "set logscale x 2; set format x '%.0s%cB'; set grid; set key top left font ',8'"
        echo "set xlabel 'message size'; set ylabel 'busbw GB/s (median)'"
        echo "set multiplot layout $(((nl + 1) / 2)),2"
        for l in $labels; do
            echo "set title '$l: busbw by algorithm (adaptive = selector pick)' noenhanced"
            plot="plot"
            for f in "$OUT"/allreduce-"$l"-*.dat; do
                a=${f#"$OUT/allreduce-$l-"}; a=${a%.dat}
                w="lines"; [[ $a == adaptive ]] && w="linespoints lw 3"
                plot+=" '$f' using 1:2 with $w title '$a' noenhanced,"
            done
            echo "${plot%,}"
        done
        echo "unset multiplot"
    } | gnuplot
    rm -f "$OUT"/allreduce-*.dat
    echo "plot: $OUT/allreduce.png"
fi

echo
echo "== serve: decode tokens/s and per-step latency by weight format and batch (fp32, q8, q4, nf4;"
echo "   batch 1, 8, 32), small and large (150M, weights from DRAM) model, 1 rank x 2 threads and"
echo "   2 ranks x 1 thread (replicas, aggregate tokens/s)"
rm -f "$OUT/serve.csv"
$MPILM bench serve --tokens ${SERVE_TOKENS:-24} --csv "$OUT/serve.csv"
OMP_NUM_THREADS=1 $MPIRUN -n 2 $MPILM bench serve --tokens ${SERVE_TOKENS:-24} --csv "$OUT/serve.csv"
if command -v gnuplot >/dev/null; then
    # per model: one row per (ranks, batch), one column of tokens/s per format
    for m in small large; do
        awk -F, -v m="$m" 'NR > 1 && $1 == m {
                k = $3 "r B" $6; if (!(k in seen)) { seen[k] = 1; keys[++n] = k }
                v[k "," $5] = $8 }
            END { for (i = 1; i <= n; i++) {
                      line = "\"" keys[i] "\""
                      split("fp32 q8 q4 nf4", f, " ")
                      for (j = 1; j <= 4; j++) line = line " " ((keys[i] "," f[j]) in v ? v[keys[i] "," f[j]] : "-")
                      print line } }' "$OUT/serve.csv" >"$OUT/serve-$m.dat"
    done
    gnuplot <<GP
set terminal pngcairo size 1200,900
set output "$OUT/serve.png"
set datafile missing "-"
set style data histograms
set style histogram clustered
set style fill solid 0.8
set logscale y
set grid ytics
set ylabel "decode tokens/s (all ranks)"
set key top left
set multiplot layout 2,1
set title "small model (jobs/small.yaml shape, 4.9M parameters): decode tokens/s by ranks, batch and format"
plot for [c=2:5] "$OUT/serve-small.dat" using c:xtic(1) title word("fp32 q8 q4 nf4", c-1)
set title "large model (12 x 1024, 152M parameters, 600 MB fp32): decode tokens/s by ranks, batch and format"
plot for [c=2:5] "$OUT/serve-large.dat" using c:xtic(1) title word("fp32 q8 q4 nf4", c-1)
unset multiplot
GP
    echo "plot: $OUT/serve.png"
fi

echo
echo "== compress: gradient compressors (mpilm bench compress): one bucket (--micro) and training steps"
# timed runs hold the machine's bench lock (not again when the caller holds it)
cx_lock() { if [[ -n ${MPILM_BENCH_LOCKED:-} ]]; then "$@"; else MPILM_BENCH_LOCKED=1 flock /tmp/mpilm-bench.lock "$@"; fi; }
rm -f "$OUT/compress.csv" "$OUT/compress-micro.csv"
cx_lock env OMP_NUM_THREADS=1 $MPIRUN -n 2 $MPILM bench compress --micro --label local-2 \
    --csv "$OUT/compress-micro.csv"
# a shape where communication matters on 1 Gbit/s: jobs/small.yaml's 4.8M-parameter model
# (19 MB of gradients) with 64 tokens per rank and step
CX_ARGS=(--job "$PWD/jobs/small.yaml" --steps "${CX_STEPS:-40}" --warmup 5 --set data.dir="$PWD/data/demo"
         --set train.micro_batch=1 --set train.global_batch=4 --set model.block_size=64
         --set train.warmup=5)
cx_lock env OMP_NUM_THREADS=1 $MPIRUN -n 2 $MPILM bench compress "${CX_ARGS[@]}" --label local-2 \
    --csv "$OUT/compress.csv"
if [[ ${CX_EMU:-1} != 0 ]] && ip netns add mpilm-cx-probe$$ >/dev/null 2>&1; then
    ip netns del mpilm-cx-probe$$
    (
        export EMU_DIR=/tmp/mpilm-bench-emu-cx EMU_PREFIX=mpilmc EMU_NET=10.213.82 EMU_SLOTS=2
        trap 'bash tools/emu-cluster.sh down >/dev/null 2>&1 || true' EXIT
        bash tools/emu-cluster.sh up 2 1gbit
        cx_lock env OMP_NUM_THREADS=1 bash tools/emu-cluster.sh run -np 4 --per-node 2 -- \
            "$PWD/$MPILM" bench compress "${CX_ARGS[@]}" --label emu-1gbit --csv "$PWD/$OUT/compress.csv"
    )
    echo
    echo "== reselect: adaptive all-reduce, inter-node rate 10gbit -> 100mbit during training"
    cx_lock env MPILM="$MPILM" OUT="$OUT" bash bench/reselect.sh || true
fi
if command -v gnuplot >/dev/null && [[ -s $OUT/compress.csv ]]; then
    # speed-up of the step vs dense and loss difference, per compressor, one panel per run label
    labels=$(awk -F, 'NR > 1 && !seen[$1]++ { print $1 }' "$OUT/compress.csv")
    nl=$(echo "$labels" | wc -w)
    {
        echo "set terminal pngcairo size 1100,$((360 * nl)) noenhanced"
        echo "set output '$OUT/compress.png'"
        echo "set datafile separator ','; set style data histograms; set style fill solid 0.8"
        echo "set grid ytics; set key top left; set y2tics; set ytics nomirror; set yrange [0:*]"
        echo "set ylabel 'step speed-up vs dense (x)'; set y2label 'loss vs dense (%)'"
        echo "set multiplot layout $nl,1"
        for l in $labels; do
            echo "set title '$l: mpilm bench compress (jobs/small.yaml model, 64 tokens/rank/step)'"
            echo "plot '< grep ^$l, $OUT/compress.csv' using 11:xtic(4) title 'speed-up' axes x1y1, \
                  '' using 13 title 'loss vs dense %' axes x1y2"
        done
        echo "unset multiplot"
    } | gnuplot
    echo "plot: $OUT/compress.png"
fi

if [[ ${CX_EMU:-1} != 0 ]] && ip netns add mpilm-ovl-probe$$ >/dev/null 2>&1; then
    ip netns del mpilm-ovl-probe$$
    echo
    echo "== overlap: comm.overlap off/on, jobs/small.yaml at dp=2 over an emulated 1 Gbit/s link"
    cx_lock env MPILM="$PWD/$MPILM" bash bench/overlap.sh 3
fi
