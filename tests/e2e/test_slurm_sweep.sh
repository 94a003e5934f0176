#!/usr/bin/env bash
# slurm/sweep.sbatch + slurm/sweep-merge.sh against the real local Slurm:
#  - `bash slurm/sweep.sbatch OUTDIR` submits a 4-task job array
#    (comm.strategy mpi, ring x 2, 4 ranks; `mpilm bench train` of
#    jobs/tiny.yaml) and a merge job with --dependency=afterok:<array>;
#  - all 4 array tasks end COMPLETED, each wrote its own row file; the merge
#    job ran after them, COMPLETED, and wrote OUTDIR/sweep.csv (header + one
#    row per task, every strategy x ranks pair exactly once, numbers > 0) and
#    a PNG (checked by its signature and size);
#  - a grid with a failing point (unknown strategy): the task FAILS and the
#    merge job is cancelled by Slurm (afterok never satisfied), not left
#    pending in the queue.
# Brings the cluster up if needed (and down at the end if it did).
# Exit 0 pass, 77 skip, else fail.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
ROOT=$PWD
source tests/e2e/lib.sh
set +e
source tests/e2e/slurm_lib.sh
slurm_start
command -v gnuplot >/dev/null || fail "gnuplot missing (make deps)"

wait_gone() { # SECONDS JOBID...: until none of them is in the queue
    local i
    for ((i = 0; i < $1 * 4; i++)); do
        [[ -z $(squeue -h -j "$(tr ' ' , <<<"${*:2}")" -t PD,R,CG,S,CF,RQ,RS,SI,SO,ST 2>/dev/null) ]] && return 0
        sleep 0.25
    done
    return 1
}
# submit GRID_STRATEGIES OUTDIR: runs the driver, sets A (array) and M (merge)
submit() {
    local out
    out=$(SWEEP_STRATEGIES=$1 SWEEP_RANKS="2 4" SWEEP_JOB=jobs/tiny.yaml SWEEP_STEPS=10 \
        SWEEP_SETS="data.dir=$DATA" bash slurm/sweep.sbatch "$2" -N 1 --overcommit --oversubscribe) ||
        fail "driver failed: $out"
    echo "$out"
    A=$(sed -n 's/.*SWEEP_ARRAY_JOB=\([0-9]*\).*/\1/p' <<<"$out")
    M=$(sed -n 's/.*SWEEP_MERGE_JOB=\([0-9]*\).*/\1/p' <<<"$out")
    [[ -n $A && -n $M ]] || fail "no job ids from the driver"
    MYJOBS+=" $A $M"
}

DATA=$(test_data)
O=$TMP/sweep
step "bash slurm/sweep.sbatch $O (mpi ring x ranks 2 4)"
submit "mpi ring" "$O"
[[ $(field "$M" Dependency) == afterok:${A}_* ]] || fail "merge job $M dependency '$(field "$M" Dependency)', want afterok:${A}_*"
wait_gone 120 "$A" "$M" || fail "sweep not done after 120 s: $(squeue -h)"
# every array task, while slurmctld still has them (MinJobAge 30 s)
tasks=$(scontrol -o show job "$A" 2>/dev/null | grep -o 'ArrayTaskId=[0-9]* .*JobState=[A-Z_]*' | sed 's/ .*JobState=/ /' | sort)
echo "$tasks" | sed 's/^/  /'
[[ $(grep -c . <<<"$tasks") -eq 4 ]] || fail "array $A has $(grep -c . <<<"$tasks") tasks, want 4"
[[ $(grep -c ' COMPLETED$' <<<"$tasks") -eq 4 ]] || { cat "$O"/logs/*; fail "not all array tasks COMPLETED"; }
st=$(field "$M" JobState)
[[ $st == COMPLETED ]] || { cat "$O"/logs/merge-*; fail "merge job $M ended $st"; }
[[ $(ls "$O"/rows/task-*.csv | wc -l) -eq 4 ]] || fail "want 4 row files: $(ls "$O/rows")"
cat "$O/sweep.csv"
[[ $(head -1 "$O/sweep.csv") == strategy,job,ranks,*,tokens_per_s,* ]] || fail "sweep.csv header"
[[ $(tail -n +2 "$O/sweep.csv" | wc -l) -eq 4 ]] || fail "sweep.csv: not 4 rows"
[[ $(tail -n +2 "$O/sweep.csv" | cut -d, -f1,3 | sort | tr '\n' ' ') == "mpi,2 mpi,4 ring,2 ring,4 " ]] ||
    fail "sweep.csv does not hold each strategy x ranks pair once"
awk -F, 'NR > 1 && !($8 > 0 && $9 > 0) { bad = 1 } END { exit bad }' "$O/sweep.csv" || fail "sweep.csv has non-positive numbers"
[[ $(head -c 8 "$O/sweep.png" | od -An -tx1 | tr -d ' \n') == 89504e470d0a1a0a ]] || fail "sweep.png is not a PNG"
[[ $(stat -c %s "$O/sweep.png") -gt 5000 ]] || fail "sweep.png is suspiciously small"
# the merge ran after the last task
mstart=$(field "$M" StartTime)
lastend=$(scontrol -o show job "$A" | grep -o 'EndTime=[^ ]*' | cut -d= -f2 | sort | tail -1)
[[ ! $mstart < $lastend ]] || fail "merge started $mstart before the last task ended $lastend"
step "array $A: 4 tasks COMPLETED; merge $M COMPLETED at $mstart: $O/sweep.csv (4 rows), $O/sweep.png ($(stat -c %s "$O/sweep.png") bytes)"

# --- a failing point: the merge never runs -----------------------------------
step "a grid with an unknown strategy"
submit "bogus" "$TMP/bad"
wait_gone 60 "$A" "$M" || fail "failed sweep still queued after 60 s: $(squeue -h)"
st=$(field "$A" JobState)
[[ $st == FAILED ]] || fail "array task with a bad strategy ended $st"
grep -q "comm.strategy" "$TMP"/bad/logs/sweep-*.out || { cat "$TMP"/bad/logs/*; fail "no mpilm message in the task output"; }
st=$(field "$M" JobState)
[[ $st == CANCELLED ]] || fail "merge job after a failed array ended '$st', want CANCELLED"
[[ ! -e $TMP/bad/sweep.csv ]] || fail "merge ran after a failed task"
step "failed task: $(grep -h -m1 comm.strategy "$TMP"/bad/logs/sweep-*.out | head -1); merge $M CANCELLED"
step "PASS"
exit 0
