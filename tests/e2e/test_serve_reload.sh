#!/usr/bin/env bash
# mpilm serve --watch (issue 8): hot reload under load at 3 ranks (two
# worker replicas, reloaded one at a time). Clients keep sending requests
# while a training job resumes from the served checkpoint root and commits
# step 200; every request succeeds, each answer carries the step of the
# weights that made it, answers of one step agree with each other, the
# answers change with the new weights, both replicas log the reload. Then a
# broken checkpoint becomes `latest`: its load fails and is logged, the old
# weights keep serving.
source tests/e2e/lib.sh
command -v curl >/dev/null || { echo "curl is not installed (make deps)"; exit 77; }
DATA=$(test_data)
CK=$TMP/ckpt
write_job "$TMP/job.yaml" "$DATA" "$TMP/log" "checkpoint: {dir: $CK, every: 50, keep_last: 0}"
train() { # steps
    timeout 120 $MPIRUN -n 2 "$MPILM" train "$TMP/job.yaml" --set train.steps=$1 --set train.lr=3e-3 \
        >"$TMP/train$1.out" 2>&1 || { cat "$TMP/train$1.out"; die "training to step $1 failed"; }
}
train 150

LOG=$TMP/server.log
$MPIRUN -n 3 "$MPILM" serve --ckpt "$CK" --http 127.0.0.1:0 --max-batch 4 --watch \
    --watch-interval 0.2 >"$LOG" 2>&1 &
MPID=$!
stop_server() { kill -TERM "$PID0" 2>/dev/null; timeout 30 tail --pid=$MPID -f /dev/null; }
for _ in $(seq 1 150); do
    URL=$(sed -n 's/^serve: listening on //p' "$LOG")
    PID0=$(sed -n 's/^serve: rank 0 is pid \([0-9]*\).*/\1/p' "$LOG")
    [[ -n $URL && -n $PID0 ]] && break
    kill -0 $MPID 2>/dev/null || { cat "$LOG"; die "server exited"; }
    sleep 0.2
done
[[ -n $URL ]] || { cat "$LOG"; kill $MPID; die "server did not start"; }

# clients: 4 threads, each cycling over 4 fixed requests, until $TMP/stop exists
$PY - "$URL" "$TMP/stop" "$TMP/answers.jsonl" <<'PY' &
import json, sys, threading, urllib.request, urllib.error, os, time
url, stopf, out = sys.argv[1], sys.argv[2], sys.argv[3]
reqs = [{"id": f"q{k}", "prompt": p, "max_new_tokens": 12, "temperature": 0.9, "seed": 7 + k}
        for k, p in enumerate(["The ", "Love is ", "A fool ", "Q: why "])]
lock, rows = threading.Lock(), []
def client(t):
    i = t
    while not os.path.exists(stopf):
        q = reqs[i % len(reqs)]; i += 1
        try:
            r = urllib.request.urlopen(urllib.request.Request(url + "/completion",
                data=json.dumps(q).encode(), headers={"Content-Type": "application/json"}), timeout=60)
            row = {"code": r.status, **json.loads(r.read())}
        except urllib.error.HTTPError as e:
            row = {"code": e.code, "id": q["id"], "error": e.read().decode()}
        except Exception as e:
            row = {"code": 0, "id": q["id"], "error": repr(e)}
        with lock: rows.append(row)
        time.sleep(0.01)
ts = [threading.Thread(target=client, args=(t,)) for t in range(4)]
[t.start() for t in ts]; [t.join() for t in ts]
with open(out, "w") as f:
    for r in rows: f.write(json.dumps(r) + "\n")
PY
CPID=$!
health_step() { curl -s -m 5 "$URL/health" | $PY -c 'import json,sys; print(json.load(sys.stdin)["step"])'; }
sleep 1
train 200 # resumes from step 150, commits step-00000200 and `latest`
for _ in $(seq 1 100); do
    [[ $(grep -c "reloaded .*step-00000200.* (step 200) on rank" "$LOG") -eq 2 ]] && break
    sleep 0.2
done
sleep 1 # some answers from the new weights on both replicas
# a broken checkpoint becomes latest: the load fails, the old weights stay
mkdir -p "$CK/step-00000300"
echo "not HDF5" >"$CK/step-00000300/checkpoint.h5"
echo "step-00000300" >"$CK/latest.tmp" && mv "$CK/latest.tmp" "$CK/latest"
for _ in $(seq 1 100); do
    [[ $(grep -c "reload of .*step-00000300.* failed on rank" "$LOG") -eq 2 ]] && break
    sleep 0.2
done
sleep 0.5
touch "$TMP/stop"
wait $CPID || die "client failed"
curl -s -m 5 "$URL/metrics" >"$TMP/metrics"
step=$(health_step)
stop_server
rc=0
wait $MPID || rc=$?
cat "$LOG"
[[ $rc -eq 0 ]] || die "server exited with $rc"
[[ $step == 200 ]] || die "/health step is $step after the reloads, expected 200"
[[ $(grep -c "serve: reloaded .*step-00000200/checkpoint.h5 (step 200) on rank [12] in" "$LOG") -eq 2 ]] ||
    die "the reload to step 200 is not logged by both replicas"
[[ $(grep -c "serve: reload of .*step-00000300/checkpoint.h5 failed on rank [12]: .*keeping step 200" "$LOG") -eq 2 ]] ||
    die "the failed reload is not logged by both replicas"
grep -q 'mpilm_serve_reloads_total{result="ok"} 2' "$TMP/metrics" || die "reload counter: $(grep reloads "$TMP/metrics")"
grep -q 'mpilm_serve_reloads_total{result="failed"} 2' "$TMP/metrics" || die "failed reload counter"

$PY - "$TMP/answers.jsonl" <<'PY' || die "answers wrong"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
bad = [r for r in rows if r["code"] != 200]
assert not bad, f"{len(bad)} of {len(rows)} requests failed: {bad[:3]}"
by = {}
for r in rows:
    by.setdefault((r["id"], r["model_step"]), set()).add(r["text"])
steps = sorted({r["model_step"] for r in rows})
assert steps == [150, 200], f"steps seen: {steps}"
for k, v in by.items():
    assert len(v) == 1, f"{k}: different texts from the same weights: {v}"
ids = sorted({r["id"] for r in rows})
changed = [i for i in ids if (i, 150) in by and (i, 200) in by and by[(i, 150)] != by[(i, 200)]]
assert changed, f"no answer changed with the new weights: {by}"
n = {s: sum(r["model_step"] == s for r in rows) for s in steps}
print(f"{len(rows)} requests, all 200: {n[150]} from step 150, {n[200]} from step 200; "
      f"{len(changed)} of {len(ids)} requests answer differently after the reload")
PY
echo "serve --watch: weights swapped under load, no request failed, failed load kept the old weights"
