#!/bin/bash
# slurm/sweep-merge.sh — the follow-up job of slurm/sweep.sbatch: merges the
# per-task CSV rows OUTDIR/rows/task-*.csv into OUTDIR/sweep.csv (header once,
# rows sorted by strategy then ranks) and draws OUTDIR/sweep.png with gnuplot
# (training tokens/s against rank count, one line per comm.strategy).
# Submitted by `bash slurm/sweep.sbatch` with --dependency=afterok:<array>, so
# it runs only when every array task succeeded; also runs by hand:
#   bash slurm/sweep-merge.sh OUTDIR
# Fails (exit 1) when the number of rows differs from SWEEP_NPOINTS (set by
# the driver) or no row is there, or gnuplot fails. Not a benchmark itself.
#
#SBATCH --job-name=mpilm-sweep-merge
#SBATCH --ntasks=1
#SBATCH --time=5

set -uo pipefail
PROG=sweep-merge.sh
OUT=${1:?usage: slurm/sweep-merge.sh OUTDIR}
die() { echo "$PROG: error: $*" >&2; exit 1; }

shopt -s nullglob
rows=("$OUT"/rows/task-*.csv)
[[ ${#rows[@]} -gt 0 ]] || die "no rows in $OUT/rows/"
if [[ -n ${SWEEP_NPOINTS:-} && ${#rows[@]} -ne $SWEEP_NPOINTS ]]; then
    die "$OUT/rows/ holds ${#rows[@]} rows, the grid has $SWEEP_NPOINTS points"
fi
header=$(head -1 "${rows[0]}")
for f in "${rows[@]}"; do
    [[ $(head -1 "$f") == "$header" ]] || die "$f: header differs from ${rows[0]}"
    [[ $(wc -l <"$f") -eq 2 ]] || die "$f: not exactly one row"
done
{
    echo "$header"
    for f in "${rows[@]}"; do tail -n +2 "$f"; done | sort -t, -k1,1 -k3,3n
} >"$OUT/sweep.csv.tmp" && mv -f "$OUT/sweep.csv.tmp" "$OUT/sweep.csv"
echo "$PROG: $OUT/sweep.csv ($((${#rows[@]})) rows)"
column -s, -t "$OUT/sweep.csv" 2>/dev/null || cat "$OUT/sweep.csv"

command -v gnuplot >/dev/null || die "gnuplot not installed (Debian: gnuplot-nox)"
col() { tr ',' '\n' <<<"$header" | grep -nx "$1" | cut -d: -f1; }
cs=$(col strategy) cr=$(col ranks) ct=$(col tokens_per_s)
[[ -n $cs && -n $cr && -n $ct ]] || die "sweep.csv lacks strategy/ranks/tokens_per_s columns: $header"
strategies=$(tail -n +2 "$OUT/sweep.csv" | cut -d, -f"$cs" | sort -u | tr '\n' ' ')
job=$(tail -n +2 "$OUT/sweep.csv" | head -1 | cut -d, -f"$(col job)")
plots=""
for s in $strategies; do
    plots+="${plots:+, }'$OUT/sweep.csv' skip 1 using $cr:(strcol($cs) eq '$s' ? \$$ct : NaN) with linespoints title '$s'"
done
gnuplot <<EOF || die "gnuplot failed"
set terminal pngcairo size 800,500 noenhanced
set output '$OUT/sweep.png.tmp'
set datafile separator ','
set key left top
set title 'mpilm bench train: $job, tokens/s by comm.strategy and rank count'
set xlabel 'ranks'
set logscale x 2
set xtics 2
set offsets graph 0.05, graph 0.05, graph 0.05, graph 0.05
set ylabel 'tokens/s'
set grid
plot $plots
EOF
mv -f "$OUT/sweep.png.tmp" "$OUT/sweep.png"
echo "$PROG: $OUT/sweep.png"
