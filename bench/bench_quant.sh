#!/usr/bin/env bash
# Quantization benchmark (issue 7): on a checkpoint of jobs/small.yaml,
# perplexity increase, KL divergence and top-1 agreement per format (and
# `auto` at several --max-rel-error), bits per weight, and quantization time
# at 1, 2, 4 ranks. Writes bench/results/quant.csv and quant.md.
#
#   bench/bench_quant.sh [CKPT]    default runs/small/ckpt; when missing it is
#                                  trained first: STEPS (default 300) at 2 ranks
# Environment: DATA (default data/demo), BATCHES (eval batches, 0 = all of
# val, default 32), RANKS ("1 2 4"), AUTO_E ("0.065 0.07 0.075"), EVAL_RANKS (2).
set -euo pipefail
cd "$(dirname "$0")/.."
MPILM=${MPILM:-$PWD/build/mpilm}
MPIRUN=${MPIRUN:-mpirun --oversubscribe --allow-run-as-root --bind-to none}
CKPT=${1:-runs/small/ckpt}
DATA=${DATA:-data/demo}
BATCHES=${BATCHES:-32}
RANKS=${RANKS:-1 2 4}
AUTO_E=${AUTO_E:-0.065 0.07 0.075}
EVAL_RANKS=${EVAL_RANKS:-2}
OUT=${OUT_DIR:-bench/results}
TMP=$(mktemp -d /tmp/mpilm-bq.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$OUT"

if [[ ! -e $CKPT ]]; then
    echo "training jobs/small.yaml for ${STEPS:-300} steps at 2 ranks -> $CKPT"
    $MPIRUN -n 2 "$MPILM" train jobs/small.yaml --set data.dir="$DATA" \
        --set train.steps="${STEPS:-300}" --set checkpoint.dir="$CKPT" \
        --set checkpoint.every="${STEPS:-300}"
fi

# quality: one run per format at EVAL_RANKS ranks, with --eval
runs=("q8 0" "q4 0" "q4a 0" "nf4 0")
for e in $AUTO_E; do runs+=("auto $e"); done
echo "format,max_rel_error,bits_per_weight_quantized,bits_per_weight_model,size_mib,fp32_ppl,quant_ppl,ppl_increase_pct,kl,top1" >"$OUT/quant.csv"
for r in "${runs[@]}"; do
    set -- $r
    f=$1 e=$2
    extra=()
    [[ $f == auto ]] && extra=(--max-rel-error "$e")
    $MPIRUN -n "$EVAL_RANKS" "$MPILM" quantize --ckpt "$CKPT" --out "$TMP/$f-$e" --format "$f" \
        "${extra[@]}" --eval "$DATA" --batches "$BATCHES" --json >"$TMP/$f-$e.json"
    /usr/bin/python3 - "$TMP/$f-$e.json" "$f" "$e" >>"$OUT/quant.csv" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); v = r["eval"]
print(",".join(str(x) for x in (sys.argv[2], sys.argv[3] if sys.argv[2] == "auto" else "",
      round(r["quantized_bits_per_weight"], 3), round(r["bits_per_weight"], 3),
      round(r["size_after"] / 2**20, 3), round(v["fp32"]["perplexity"], 4),
      round(v["quant"]["perplexity"], 4), round(v["ppl_increase_pct"], 4),
      "%.3g" % v["kl"], round(v["top1_agreement"], 5))))
PY
    echo "$(tail -1 "$OUT/quant.csv")"
done

# speed: time of read + quantize + write at 1, 2, 4 ranks (best of 2)
echo "format,ranks,read_s,quantize_s,write_s,total_s" >"$OUT/quant_time.csv"
for f in q8 q4 q4a nf4 auto; do
    for n in $RANKS; do
        best=""
        for rep in 1 2; do
            rm -rf "$TMP/t"
            $MPIRUN -n "$n" "$MPILM" quantize --ckpt "$CKPT" --out "$TMP/t" --format "$f" --json >"$TMP/t.json"
            line=$(/usr/bin/python3 -c "import json,sys; t=json.load(open(sys.argv[1]))['time_s']; print(f\"{t['read']:.3f},{t['quantize']:.3f},{t['write']:.3f},{t['total']:.3f}\")" "$TMP/t.json")
            if [[ -z $best || ${line##*,} < ${best##*,} ]]; then best=$line; fi
        done
        echo "$f,$n,$best" | tee -a "$OUT/quant_time.csv"
    done
done

/usr/bin/python3 - "$OUT" <<'PY'
import csv, sys
o = sys.argv[1]
q = list(csv.DictReader(open(f"{o}/quant.csv"))); t = list(csv.DictReader(open(f"{o}/quant_time.csv")))
L = ["| format | bits/weight (quantized tensors) | bits/weight (whole model) | size MiB | ppl fp32 | ppl quant | ppl increase | KL | top-1 agreement |",
     "|---|---|---|---|---|---|---|---|---|"]
for r in q:
    name = r["format"] + (f" (E={r['max_rel_error']})" if r["format"] == "auto" else "")
    L.append(f"| {name} | {r['bits_per_weight_quantized']} | {r['bits_per_weight_model']} | {r['size_mib']} | {r['fp32_ppl']} | {r['quant_ppl']} | {float(r['ppl_increase_pct']):+.3f}% | {r['kl']} | {r['top1']} |")
L += ["", "| format | ranks | read s | quantize s | write s | total s |", "|---|---|---|---|---|---|"]
L += [f"| {r['format']} | {r['ranks']} | {r['read_s']} | {r['quantize_s']} | {r['write_s']} | {r['total_s']} |" for r in t]
open(f"{o}/quant.md", "w").write("\n".join(L) + "\n")
print("\n".join(L))
PY
