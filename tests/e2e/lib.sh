# Shared helpers for the end-to-end tests (sourced). Run from the repo root.
set -euo pipefail
MPILM=${MPILM:-$PWD/build/mpilm}
MPIRUN=${MPIRUN:-mpirun --oversubscribe --allow-run-as-root --bind-to none}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=/usr/bin/python3
TMP=$(mktemp -d /tmp/mpilm-e2e.XXXXXX)
trap 'rm -rf "$TMP"' EXIT

die() { echo "FAIL: $*" >&2; exit 1; }

# emu_instance PREFIX NET: an emulated cluster of this test's own
# (tools/emu-cluster.sh as $EMU, namespaces PREFIX-*, subnet NET.0/24, state
# in $TMP), torn down with $TMP on exit; exits 77 (skip) where network
# namespaces cannot be created.
emu_instance() {
    EMU=$PWD/tools/emu-cluster.sh
    export EMU_DIR=$TMP/emu EMU_PREFIX=$1 EMU_NET=$2 EMU_SLOTS=2
    trap emu_cleanup EXIT
    trap 'exit 143' TERM INT
    local probe=$1-probe$$
    if ! ip netns add "$probe" >/dev/null 2>&1; then
        echo "SKIP: cannot create network namespaces here (need root and CONFIG_NET_NS)"
        exit 77
    fi
    ip netns del "$probe"
}
emu_cleanup() {
    local rc=$?
    bash "$EMU" down >/dev/null 2>&1 || true
    rm -rf "$TMP"
    exit $rc
}

# A byte-level corpus prepared once per build tree and shared by the tests.
test_data() {
    local d=${BUILD_DIR:-build}/test-data/fortunes
    if [[ ! -s $d/train.tok ]]; then
        "$MPILM" data prepare --input /usr/share/games/fortunes --out "$d" >/dev/null
    fi
    echo "$PWD/$d"
}

# write_job FILE DATA_DIR LOGDIR [extra yaml lines...]: a small model for tests
write_job() {
    local f=$1 data=$2 log=$3; shift 3
    {
        echo "model: {n_layer: 2, n_head: 2, n_embd: 32, block_size: 32, vocab_size: 256}"
        echo "data: {dir: $data}"
        echo "train: {steps: 20, micro_batch: 2, global_batch: 24, lr: 1.0e-3, warmup: 5,"
        echo "        eval_every: 0, seed: 42}"
        echo "log: {dir: $log, every: 5}"
        for l in "$@"; do echo "$l"; done
    } >"$f"
}

# losses METRICS.jsonl: the per-step training losses, one per line
losses() { grep -o '"loss": [^,}]*' "$1" | cut -d' ' -f2; }

# max relative difference between two columns of numbers
max_rel_diff() {
    $PY - "$1" "$2" <<'PY'
import sys
a=[float(x) for x in open(sys.argv[1])]; b=[float(x) for x in open(sys.argv[2])]
assert len(a)==len(b) and a, f"length {len(a)} vs {len(b)}"
print(max(abs(x-y)/max(abs(y),1e-30) for x,y in zip(a,b)))
PY
}
