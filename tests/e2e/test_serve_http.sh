#!/usr/bin/env bash
# mpilm serve --http (issue 8) at 1 and 3 ranks on a tiny trained model:
# 20 concurrent curl requests (mixed lengths and sampling) all get 200 and
# the same texts as batch mode for the same request and seed; malformed JSON
# gets 400 with the reason, an oversize body 413, an unknown path 404, a
# wrong method 405; /health is JSON with the rank count; /metrics follows
# the Prometheus text format (every sample `name{labels} value`, histogram
# buckets non-decreasing and ending at _count) and its counters equal the
# requests sent; SIGTERM to rank 0 ends every rank with status 0.
source tests/e2e/lib.sh
command -v curl >/dev/null || { echo "curl is not installed (make deps)"; exit 77; }
DATA=$(test_data)
CK=$TMP/ckpt
write_job "$TMP/job.yaml" "$DATA" "$TMP/log" "checkpoint: {dir: $CK, every: 150, keep_last: 1}"
timeout 120 $MPIRUN -n 2 "$MPILM" train "$TMP/job.yaml" --set train.steps=150 --set train.lr=3e-3 >"$TMP/train.out" 2>&1 ||
    { cat "$TMP/train.out"; die "training failed"; }

IN=$TMP/in.jsonl
for i in $(seq 1 20); do
    echo "{\"id\": \"r$i\", \"prompt\": \"Request $i: \", \"max_new_tokens\": $((2 + i % 7 * 3)), \"temperature\": 0.$((i % 9 + 1)), \"top_k\": $((i % 3 * 10)), \"seed\": $((50 + i))}"
done >"$IN"
timeout 60 $MPIRUN -n 1 "$MPILM" serve --ckpt "$CK" --prompts "$IN" --out "$TMP/ref.jsonl" >"$TMP/ref.log" 2>&1 ||
    { cat "$TMP/ref.log"; die "batch mode failed"; }

# start_server RANKS LOG: sets URL and PID0 (rank 0's pid) and MPID
start_server() {
    local n=$1 log=$2
    $MPIRUN -n "$n" "$MPILM" serve --ckpt "$CK" --http 127.0.0.1:0 --max-batch 4 \
        --max-request-bytes 4096 >"$log" 2>&1 &
    MPID=$!
    for _ in $(seq 1 150); do
        URL=$(sed -n 's/^serve: listening on //p' "$log")
        PID0=$(sed -n 's/^serve: rank 0 is pid \([0-9]*\).*/\1/p' "$log")
        [[ -n $URL && -n $PID0 ]] && return 0
        kill -0 $MPID 2>/dev/null || { cat "$log"; die "server at $n ranks exited"; }
        sleep 0.2
    done
    cat "$log"
    kill $MPID
    die "server at $n ranks did not start"
}

for n in 1 3; do
    D=$TMP/r$n
    mkdir -p "$D"
    start_server $n "$D/server.log"
    [[ $URL == http://127.0.0.1:* ]] || die "not bound to loopback: $URL"
    # all requests at once
    i=0
    while IFS= read -r line; do
        i=$((i + 1))
        printf '%s' "$line" >"$D/req$i"
        curl -s -m 60 -o "$D/resp$i" -w '%{http_code}' -H 'Content-Type: application/json' \
            --data-binary @"$D/req$i" "$URL/completion" >"$D/code$i" &
    done <"$IN"
    wait $(jobs -p | grep -v "^$MPID$") 2>/dev/null || true
    for j in $(seq 1 $i); do while [[ ! -s $D/code$j ]]; do sleep 0.1; done; done
    # errors
    curl -s -o "$D/bad" -w '%{http_code}' --data-binary '{"id": "x", "prompt": "unterminated' "$URL/completion" >"$D/bad.code"
    head -c 10000 /dev/zero | tr '\0' 'a' >"$D/big"
    curl -s -o "$D/big.resp" -w '%{http_code}' --data-binary @"$D/big" "$URL/completion" >"$D/big.code"
    curl -s -o /dev/null -w '%{http_code}' "$URL/nowhere" >"$D/404.code"
    curl -s -o /dev/null -w '%{http_code}' "$URL/completion" >"$D/405.code"
    curl -s -m 10 "$URL/health" >"$D/health"
    curl -s -m 10 "$URL/metrics" >"$D/metrics"
    kill -TERM "$PID0"
    rc=0
    timeout 60 tail --pid=$MPID -f /dev/null || die "server at $n ranks did not stop after SIGTERM"
    wait $MPID || rc=$?
    [[ $rc -eq 0 ]] || { cat "$D/server.log"; die "server at $n ranks exited with $rc after SIGTERM"; }
    grep -q "signal 15" "$D/server.log" || die "no shutdown message"

    $PY - "$D" "$n" "$TMP/ref.jsonl" <<'PY' || { cat "$D/server.log"; die "HTTP checks at $n ranks failed"; }
import json, re, sys, os
d, n, ref = sys.argv[1], int(sys.argv[2]), sys.argv[3]
refs = {r["id"]: r for r in map(json.loads, open(ref))}
N = len(refs)
for i in range(1, N + 1):
    code = open(f"{d}/code{i}").read()
    assert code == "200", f"request {i}: HTTP {code}: {open(f'{d}/resp{i}').read()}"
    r = json.loads(open(f"{d}/resp{i}").read())
    want = refs[r["id"]]
    assert r["text"] == want["text"] and r["tokens"] == want["tokens"], (r, want)
    assert r["model_step"] == 150, r
assert open(f"{d}/bad.code").read() == "400"
bad = json.loads(open(f"{d}/bad").read())
assert "malformed JSON" in bad["error"] and bad["id"] == "x", bad
assert open(f"{d}/big.code").read() == "413", open(f"{d}/big.code").read()
assert "error" in json.loads(open(f"{d}/big.resp").read())
assert open(f"{d}/404.code").read() == "404"
assert open(f"{d}/405.code").read() == "405"
h = json.loads(open(f"{d}/health").read())
assert h["status"] == "ok" and h["ranks"] == n and h["step"] == 150, h
assert h["replicas"] == (n - 1 if n > 1 else 1), h
# Prometheus text exposition format
samples, types = {}, {}
line_re = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="[^"]*"(,[a-zA-Z_][a-zA-Z0-9_]*="[^"]*")*)?\})? (\S+)$')
for line in open(f"{d}/metrics").read().splitlines():
    if line.startswith("# TYPE "):
        _, _, name, t = line.split(" ", 3)
        types[name] = t
        continue
    if line.startswith("# HELP ") or not line:
        continue
    m = line_re.match(line)
    assert m, f"not a sample line: {line!r}"
    float(m.group(5))
    samples[m.group(1) + (m.group(2) or "")] = float(m.group(5))
for name, t in types.items():
    assert t in ("counter", "gauge", "histogram"), (name, t)
    assert any(k.startswith(name) for k in samples), f"no samples for {name}"
req = lambda s: samples[f'mpilm_serve_requests_total{{status="{s}"}}']
assert req("ok") == N and req("bad_request") == 1 and req("too_large") == 1 and req("error") == 0, samples
assert samples["mpilm_serve_tokens_generated_total"] == sum(r["tokens"] for r in refs.values())
h = "mpilm_serve_request_latency_seconds"
assert types[h] == "histogram"
buckets = [(k, v) for k, v in samples.items() if k.startswith(h + "_bucket")]
vals = [v for _, v in buckets]
assert vals == sorted(vals) and buckets[-1][0].endswith('le="+Inf"}'), buckets
assert vals[-1] == samples[h + "_count"] == N and samples[h + "_sum"] > 0
assert samples["mpilm_serve_kv_cache_budget_bytes"] > 0 and samples["mpilm_serve_running_sequences"] == 0
assert samples["mpilm_serve_decode_rows_total"] >= samples["mpilm_serve_decode_steps_total"] > 0
print(f"{n} rank(s): {N} concurrent requests answered like batch mode; errors 400/413/404/405; "
      f"health and metrics parse; mean decode batch "
      f"{samples['mpilm_serve_decode_rows_total'] / samples['mpilm_serve_decode_steps_total']:.2f}")
PY
done
echo "serve --http: concurrent requests, errors, health, metrics, SIGTERM at 1 and 3 ranks"
