#!/usr/bin/env bash
# Runs the whole test suite: CMocka unit tests, MPI tests at the rank counts
# each file declares ("// mpi-ranks: 1 2 3" line), then end-to-end scripts.
# Every test runs under a timeout so a deadlock fails instead of hanging.
# Usage: tests/run.sh [FILTER]   (FILTER: substring of test names to run)
set -u
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
FILTER=${1:-}
MPIRUN=${MPIRUN:-mpirun --oversubscribe --allow-run-as-root --bind-to none}
export OMPI_MCA_rmaps_base_oversubscribe=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export MPILM=$PWD/$BUILD/mpilm
pass=0; fail=0; skip=0; failed=()
mkdir -p "$BUILD/test-logs"

run() { # name timeout cmd...
    local name=$1 to=$2; shift 2
    [[ -n "$FILTER" && "$name" != *"$FILTER"* ]] && return
    local log="$BUILD/test-logs/${name//[\/ ]/_}.log" t0=$SECONDS rc
    timeout -k 5 "$to" "$@" >"$log" 2>&1; rc=$?
    if [[ $rc -eq 0 ]]; then pass=$((pass+1)); echo "PASS  $name ($((SECONDS-t0))s)"
    elif [[ $rc -eq 77 ]]; then skip=$((skip+1)); echo "SKIP  $name: $(tail -1 "$log")"
    else
        fail=$((fail+1)); failed+=("$name")
        [[ $rc -eq 124 || $rc -eq 137 ]] && echo "FAIL  $name: TIMEOUT after ${to}s" || echo "FAIL  $name (exit $rc)"
        # the reason first (CI shows only part of a long output), then the tail
        grep -m 3 '^FAIL' "$log" | sed 's/^/      ! /'
        tail -25 "$log" | sed 's/^/      | /'
    fi
}

for t in "$BUILD"/tests/unit/test_*; do
    [[ -x "$t" ]] && run "unit/$(basename "$t")" 300 "$t"
done
for src in tests/mpi/test_*.c; do
    [[ -e "$src" ]] || continue
    bin="$BUILD/tests/mpi/$(basename "$src" .c)"
    ranks=$(sed -n 's|^// mpi-ranks:||p' "$src"); ranks=${ranks:-1 2}
    for n in $ranks; do run "mpi/$(basename "$bin")@$n" 300 $MPIRUN -n "$n" "$bin"; done
done
for t in tests/e2e/test_*.sh; do
    [[ -e "$t" ]] && run "e2e/$(basename "$t" .sh)" 900 bash "$t"
done

echo
if [[ $fail -gt 0 ]]; then echo "failed: ${failed[*]}"; fi
echo "$pass passed, $fail failed, $skip skipped"
[[ $fail -eq 0 ]]
