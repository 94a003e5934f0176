# Shared harness of the end-to-end tests against the local Slurm cluster
# (slurm/local-cluster.sh), sourced after tests/e2e/lib.sh from the repo root.
# Gives step/skip/fail, slurm_start (preflight, cluster up unless it already
# is, and a cleanup on exit that cancels $MYJOBS and takes down a cluster it
# started) and field. Not here: what each test submits and checks.
CLUSTER=$ROOT/slurm/local-cluster.sh
T0=$SECONDS
MYJOBS=""
STARTED=0
step() { echo "[$((SECONDS - T0))s] $*"; }
skip() { echo "SKIP: $*"; exit 77; }
fail() {
    echo "FAIL: $*" >&2
    local f
    for f in slurmctld.log slurmd.log; do
        [[ -n ${MPILM_SLURM_DIR:-} && -s $MPILM_SLURM_DIR/log/$f ]] &&
            { echo "--- tail $f" >&2; tail -n 12 "$MPILM_SLURM_DIR/log/$f" >&2; }
    done
    echo "--- ls $TMP: $(ls "$TMP" 2>&1 | tr '\n' ' ')" >&2
    exit 1
}

# shellcheck disable=SC2317
slurm_cleanup() {
    local rc=$?
    # shellcheck disable=SC2086
    [[ -n ${MYJOBS// /} ]] && scancel $MYJOBS 2>/dev/null
    if [[ $STARTED -eq 1 ]]; then
        step "taking the cluster down"
        "$CLUSTER" down >/dev/null || { echo "FAIL: cluster down failed" >&2; rc=1; }
    fi
    [[ -n ${KEEP_TMP:-} ]] || rm -rf "$TMP"
    exit "$rc"
}

# slurm_start [EXTRA_BINARY...]: skip (77) where Slurm cannot run here, fail
# without a build, then bring the cluster up unless it is up.
slurm_start() {
    local b
    for b in slurmctld slurmd munged sbatch srun squeue scontrol scancel "$@"; do
        command -v "$b" >/dev/null 2>&1 || skip "$b not installed (Debian: slurm-wlm, munge; make deps)"
    done
    [[ $EUID -eq 0 ]] || skip "needs root to start munged/slurmctld/slurmd (SlurmUser=root)"
    [[ -x $MPILM ]] || fail "$MPILM not built (make)"
    eval "$("$CLUSTER" env)"
    trap slurm_cleanup EXIT
    trap 'exit 143' TERM INT
    if "$CLUSTER" status >/dev/null 2>&1; then
        step "local cluster already up; using it"
    else
        step "bringing the local cluster up"
        STARTED=1
        "$CLUSTER" up >"$TMP/up.log" 2>&1 || { cat "$TMP/up.log"; skip "slurm/local-cluster.sh up failed: $(tail -1 "$TMP/up.log")"; }
    fi
}

field() { # JOBID FIELD: from scontrol, else the job's last line in jobcomp.log
    local v
    v=$(scontrol -o show job "$1" 2>/dev/null | grep -o " $2=[^ ]*" | head -1)
    [[ -z $v ]] && v=$(grep "^JobId=$1 " "$MPILM_SLURM_DIR/log/jobcomp.log" 2>/dev/null | tail -1 | grep -o " $2=[^ ]*" | head -1)
    echo "${v#* "$2"=}"
}
