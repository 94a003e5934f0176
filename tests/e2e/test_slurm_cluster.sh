#!/usr/bin/env bash
# End-to-end test of the local one-node Slurm cluster (slurm/local-cluster.sh):
# real sbatch jobs, an MPI job launched with `srun --mpi=pmix`, a failing job.
# Not a test of mpilm itself: it proves the harness that the other Slurm tests
# rely on. Run from the repo root: bash tests/e2e/test_slurm_cluster.sh
#
# - brings the cluster up unless it already is (and then takes it down again
#   at the end, whatever happens; a cluster that was already up is left up);
# - compiles tests/e2e/mpi_hello.c with mpicc into a temporary dir;
# - sbatch --wait -N 1 -n 4 --overcommit running `srun --mpi=pmix ./hello`:
#   exit 0, all 4 ranks reported, allreduce checked, job COMPLETED;
# - sbatch --wait of a job that exits 3: sbatch exits non-zero, job FAILED
#   with ExitCode 3, not left in the queue;
# - squeue is empty at the end.
# Exit: 0 pass, 77 skip (reason on the last line), anything else fail.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
ROOT=$PWD
CLUSTER=$ROOT/slurm/local-cluster.sh
T0=$SECONDS

skip() { echo "SKIP: $*"; exit 77; }
fail() {
    echo "FAIL: $*" >&2
    if [[ -n ${MPILM_SLURM_DIR:-} ]]; then
        for f in "$MPILM_SLURM_DIR"/log/slurmctld.log "$MPILM_SLURM_DIR"/log/slurmd.log; do
            [[ -s $f ]] && { echo "--- tail $f" >&2; tail -n 15 "$f" >&2; }
        done
    fi
    exit 1
}
step() { echo "[$((SECONDS - T0))s] $*"; }

# --- can this machine run it at all? ---------------------------------------
for b in slurmctld slurmd munged sbatch srun squeue scontrol sinfo; do
    command -v "$b" >/dev/null 2>&1 || skip "$b not installed (Debian: slurm-wlm, munge; make deps)"
done
command -v mpicc >/dev/null 2>&1 || skip "mpicc not installed (Debian: libopenmpi-dev; make deps)"
[[ -e /usr/lib/x86_64-linux-gnu/slurm-wlm/mpi_pmix.so || -n $(find /usr/lib -name 'mpi_pmix*.so' -path '*slurm*' 2>/dev/null | head -1) ]] ||
    skip "Slurm's PMIx plugin (mpi_pmix.so) is missing"
[[ $EUID -eq 0 ]] || skip "needs root to start munged/slurmctld/slurmd (SlurmUser=root)"

eval "$("$CLUSTER" env)" || fail "$CLUSTER env failed"
# Live (non-zombie) processes named like the daemons. The sandbox's init may
# take a while to reap exited daemons, so plain pgrep can list zombies.
live() { ps -C "$1" -o pid=,stat= 2>/dev/null | awk '$2 !~ /^Z/ {print $1}'; }

TMP=$(mktemp -d /tmp/mpilm-slurm-test.XXXXXX)
STARTED=0
MUNGED_BEFORE=$(live munged)
# shellcheck disable=SC2317  # invoked through the EXIT trap
cleanup() {
    local rc=$?
    if [[ $STARTED -eq 1 ]]; then
        step "taking the cluster down"
        if ! "$CLUSTER" down; then
            echo "FAIL: $CLUSTER down failed" >&2
            rc=1
        fi
        local d left=""
        for d in slurmctld slurmd slurmstepd; do left+=$(live "$d"); done
        [[ -z $MUNGED_BEFORE ]] && left+=$(live munged)
        if [[ -n $left ]]; then
            echo "FAIL: still running after down: $(ps -o pid=,stat=,args= -p "${left//$'\n'/,}")" >&2
            rc=1
        else
            echo "nothing left running (no live slurmctld, slurmd, slurmstepd$([[ -n $MUNGED_BEFORE ]] || echo ", munged"))"
        fi
    fi
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 143' TERM INT

# --- cluster ----------------------------------------------------------------
if "$CLUSTER" status >/dev/null 2>&1; then
    step "cluster already up; using it and leaving it up"
else
    step "bringing the cluster up"
    STARTED=1
    "$CLUSTER" up || fail "slurm/local-cluster.sh up failed"
fi
"$CLUSTER" up >/dev/null || fail "a second 'up' on a running cluster failed"
sinfo
[[ $(sinfo -h -o %T | head -1) == idle* ]] || fail "node is not idle: $(sinfo -h -o '%T %E')"

# job_field JOBID FIELD: a field of `scontrol show job`, or of the job's line
# in the jobcomp log if slurmctld has already purged the job (MinJobAge).
job_field() {
    local v
    v=$(scontrol -o show job "$1" 2>/dev/null | grep -o " $2=[^ ]*" | head -1)
    [[ -z $v ]] && v=$(grep "^JobId=$1 " "$MPILM_SLURM_DIR/log/jobcomp.log" 2>/dev/null | tail -1 | grep -o " $2=[^ ]*" | head -1)
    echo "${v#* "$2"=}"
}

gone_from_queue() { # JOBID: wait up to 30 s until squeue no longer lists it
    local i
    for ((i = 0; i < 150; i++)); do
        [[ -z $(squeue -h -j "$1" -t PD,R,CG,S,CF,RQ,RS,SI,SO,ST 2>/dev/null) ]] && return 0
        sleep 0.2
    done
    return 1
}

# --- MPI job: 4 ranks on a 2-core node --------------------------------------
step "compiling tests/e2e/mpi_hello.c"
mpicc -O1 -Wall -Wextra -o "$TMP/hello" tests/e2e/mpi_hello.c || fail "mpicc failed"

step "sbatch --wait -N 1 -n 4 --overcommit: srun --mpi=pmix ./hello"
cat >"$TMP/hello.sbatch" <<'EOF'
#!/bin/bash
#SBATCH -J mpilm-hello
#SBATCH -N 1
#SBATCH -n 4
#SBATCH --overcommit
#SBATCH -t 5
srun --mpi=pmix ./hello
EOF
t=$SECONDS
out=$(timeout 180 sbatch --parsable --wait -D "$TMP" -o "$TMP/hello-%j.out" "$TMP/hello.sbatch")
rc=$?
jid=${out%%;*}
echo "job $jid: sbatch --wait exit $rc after $((SECONDS - t))s"
echo "--- output"
cat "$TMP/hello-$jid.out" 2>/dev/null
echo "---"
[[ $rc -ne 124 ]] || fail "MPI job did not finish within 180 s (squeue: $(squeue -h))"
[[ $jid =~ ^[0-9]+$ ]] || fail "no job id from sbatch: '$out'"
[[ $rc -eq 0 ]] || fail "MPI job $jid: sbatch --wait exited $rc"
[[ -s $TMP/hello-$jid.out ]] || fail "MPI job $jid wrote no output file"
for r in 0 1 2 3; do
    n=$(grep -c "^hello rank $r of 4 on " "$TMP/hello-$jid.out")
    [[ $n -eq 1 ]] || fail "rank $r of 4 reported $n times (want 1)"
done
grep -q '^allreduce ok: sum 10 expected 10 (size 4)' "$TMP/hello-$jid.out" || fail "allreduce check missing or wrong"
gone_from_queue "$jid" || fail "job $jid still in the queue: $(squeue -h -j "$jid")"
st=$(job_field "$jid" JobState)
[[ $st == COMPLETED ]] || fail "MPI job $jid ended in state '$st' (want COMPLETED)"
ec=$(job_field "$jid" ExitCode)
[[ $ec == 0:0 ]] || fail "MPI job $jid ExitCode '$ec' (want 0:0)"
step "MPI job $jid COMPLETED, 4 ranks, allreduce ok"

# --- a failing job ----------------------------------------------------------
step "sbatch --wait of a job that exits 3"
t=$SECONDS
out=$(timeout 120 sbatch --parsable --wait -J mpilm-fail -D "$TMP" -o "$TMP/fail-%j.out" \
    --wrap 'echo failing on purpose; exit 3')
rc=$?
jid=${out%%;*}
echo "job $jid: sbatch --wait exit $rc after $((SECONDS - t))s"
[[ $rc -ne 124 ]] || fail "failing job did not finish within 120 s (squeue: $(squeue -h))"
[[ $jid =~ ^[0-9]+$ ]] || fail "no job id from sbatch: '$out'"
[[ $rc -ne 0 ]] || fail "sbatch --wait exited 0 for a job that exits 3"
grep -q 'failing on purpose' "$TMP/fail-$jid.out" 2>/dev/null || fail "failing job $jid did not run (no output)"
gone_from_queue "$jid" || fail "failed job $jid left in the queue: $(squeue -h -j "$jid")"
st=$(job_field "$jid" JobState)
[[ $st == FAILED ]] || fail "failing job $jid ended in state '$st' (want FAILED)"
ec=$(job_field "$jid" ExitCode)
[[ $ec == 3:0 ]] || fail "failing job $jid ExitCode '$ec' (want 3:0)"
step "failing job $jid FAILED with ExitCode 3:0 (sbatch exit $rc), not in the queue"

# --- nothing left behind ----------------------------------------------------
left=""
for ((i = 0; i < 50; i++)); do
    left=$(squeue -h)
    [[ -z $left ]] && break
    sleep 0.2
done
[[ -z $left ]] || fail "squeue not empty at the end: $left"
step "squeue empty; PASS"
exit 0
