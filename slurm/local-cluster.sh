#!/usr/bin/env bash
# slurm/local-cluster.sh — a one-node Slurm cluster on this machine, for the
# end-to-end tests and for trying the sbatch scripts in slurm/ without a real
# cluster. It is not a production Slurm set-up: no accounting database, no
# cgroups, everything runs as root, and jobs may oversubscribe the cores.
#
# Usage:
#   slurm/local-cluster.sh up      start munged (unless one already answers),
#                                  slurmctld and slurmd; wait until the node is
#                                  idle; print how to use it. Idempotent: when
#                                  the cluster is already up it says so, exit 0.
#   slurm/local-cluster.sh down    cancel all jobs, stop slurmd, slurmctld and
#                                  munged — only the ones this script started
#                                  (pid files in the state dir) — and check that
#                                  nothing of ours is left running. Idempotent.
#   slurm/local-cluster.sh status  say whether it is up (exit 0 up, 3 not up)
#   slurm/local-cluster.sh env     print shell lines that point clients at the
#                                  cluster:  eval "$(slurm/local-cluster.sh env)"
#                                  (or: source <(slurm/local-cluster.sh env))
#   slurm/local-cluster.sh conf    print the slurm.conf that `up` would write
#
# Where the configuration lives: `up` writes $MPILM_SLURM_DIR/slurm.conf and
# starts the daemons with `-f` on it. Clients find it through the SLURM_CONF
# environment variable (what `env` prints; sbatch exports it into jobs, so srun
# inside a job finds it too). For convenience, when /etc/slurm/slurm.conf does
# not exist, `up` also makes it a symlink to the generated file so that a plain
# `sinfo` works without SLURM_CONF; `down` removes that symlink again (only if
# it is still ours). Set MPILM_SLURM_LINK_ETC=0 to leave /etc/slurm alone.
#
# State dir layout ($MPILM_SLURM_DIR): slurm.conf, state/ (StateSaveLocation),
# spool/ (SlurmdSpoolDir), log/{slurmctld,slurmd}.log, log/jobcomp.log (one
# line per finished job: JobId, JobState, ExitCode — there is no sacct here),
# run/*.pid (daemons this script started; munged.pid only when it started
# munged), .lock (serialises concurrent up/down).
#
# Environment:
#   MPILM_SLURM_DIR            state dir (default /tmp/mpilm-slurm); keep it
#                              short: slurmstepd puts unix sockets in spool/
#   MPILM_SLURM_TIMEOUT        seconds to wait for a daemon or for the node to
#                              become idle (default 60)
#   MPILM_SLURM_PARTITION      name of the default partition (default debug)
#   MPILM_SLURM_OVERSUBSCRIBE  partition OverSubscribe= value (default YES:
#                              jobs may share cores when they ask --oversubscribe)
#   MPILM_SLURM_CTLD_PORT      SlurmctldPort (default 6817)
#   MPILM_SLURM_SLURMD_PORT    SlurmdPort (default 6818)
#   MPILM_SLURM_MEM_MARGIN_MB  MB of RAM left out of RealMemory (default 5% of
#                              MemTotal, at least 256)
#   MPILM_SLURM_DEBUG          SlurmctldDebug/SlurmdDebug level (default info)
#   MPILM_SLURM_CRED_EXPIRE    AuthInfo=cred_expire seconds (default 10); a
#                              requeued job becomes eligible again after this
#                              + 1 s (Slurm's default, 120 s, is slow for tests)
#   MPILM_SLURM_LINK_ETC       1 (default) or 0, see above
#
# Jobs with more tasks than cores:  sbatch -N 1 -n 4 --overcommit ...
# MPI:  srun --mpi=pmix ./prog   (MpiDefault=pmix, so plain srun works too).
# Needs root (SlurmUser=root; munged is started as user munge) and Debian's
# slurm-wlm, munge and libpmix packages (`make deps`).
set -euo pipefail

DIR=${MPILM_SLURM_DIR:-/tmp/mpilm-slurm}
CONF=$DIR/slurm.conf
TIMEOUT=${MPILM_SLURM_TIMEOUT:-60}
PARTITION=${MPILM_SLURM_PARTITION:-debug}
OVERSUB=${MPILM_SLURM_OVERSUBSCRIBE:-YES}
CTLD_PORT=${MPILM_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${MPILM_SLURM_SLURMD_PORT:-6818}
DEBUG=${MPILM_SLURM_DEBUG:-info}
LINK_ETC=${MPILM_SLURM_LINK_ETC:-1}
CRED_EXPIRE=${MPILM_SLURM_CRED_EXPIRE:-10}
ETC_CONF=/etc/slurm/slurm.conf
MUNGE_KEY=/etc/munge/munge.key
MUNGE_RUN=/run/munge
MUNGE_LOG=/var/log/munge/munged.log
# Marker put into the environment of every daemon we start; slurmstepd
# inherits it from slurmd, which lets `down` find leftovers that are ours.
MARK=MPILM_LOCAL_CLUSTER_OWNER
# slurmd names its node after the short host name (up to the first dot).
HOST=$(hostname -s)
PROG=${0##*/}

export SLURM_CONF=$CONF

say() { echo "$PROG: $*"; }
die() { echo "$PROG: error: $*" >&2; exit 1; }

# --- small helpers ----------------------------------------------------------

# alive PID: the process exists and is not a zombie (daemons that exit are
# reparented to init, which may take its time to reap them).
alive() {
    local st
    st=$(awk '/^State:/ {print $2}' "/proc/$1/status" 2>/dev/null || true)
    [[ -n $st && $st != Z && $st != X ]]
}

# live_pids NAME: live (non-zombie) processes with that command name.
live_pids() { ps -C "$1" -o pid=,stat= 2>/dev/null | awk '$2 !~ /^Z/ {print $1}' || true; }

# pid_of NAME -> pid from $DIR/run/NAME.pid when that process is alive and is
# really NAME (guards against pid reuse); empty otherwise.
pid_of() {
    local f=$DIR/run/$1.pid pid comm
    [[ -r $f ]] || return 0
    pid=$(tr -dc '0-9' <"$f")
    [[ -n $pid ]] || return 0
    alive "$pid" || return 0
    comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
    [[ $comm == "$1"* ]] && echo "$pid"
    return 0
}

ctld_answers() { [[ $(timeout 10 scontrol ping 2>/dev/null) == *"is UP"* ]]; }

node_state() { timeout 10 sinfo -h -n "$HOST" -o %T 2>/dev/null | head -1 || true; }

is_up() {
    [[ -n $(pid_of slurmctld) && -n $(pid_of slurmd) ]] && ctld_answers &&
        [[ $(node_state) =~ ^(idle|mixed|allocated|completing) ]]
}

show_log() { # FILE [LINES]
    local f=$1 n=${2:-30}
    if [[ -s $f ]]; then
        echo "----- last $n lines of $f -----" >&2
        tail -n "$n" "$f" >&2
        echo "-----" >&2
    else
        echo "($f is empty or missing)" >&2
    fi
}

# stop_pid NAME PID: SIGTERM, wait up to 10 s, then SIGKILL.
stop_pid() {
    local name=$1 pid=$2 i how=stopped
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 100; i++)); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        kill -KILL "$pid" 2>/dev/null || true
        how="killed (SIGKILL after 10 s)"
    fi
    say "$how $name (pid $pid)"
    STOPPED+=("$pid")
}

# Give init up to 5 s to reap what we stopped (it can be slow to do so), so
# that `pgrep slurmctld` right after `down` is empty.
wait_reaped() {
    local i pid left
    for ((i = 0; i < 50; i++)); do
        left=0
        for pid in "${STOPPED[@]}"; do
            [[ -e /proc/$pid ]] && left=1
        done
        [[ $left -eq 0 ]] && break
        sleep 0.1
    done
    return 0
}
STOPPED=()

# This shell and its ancestors, as " pid pid ... ": never signalled by `down`
# (which may run inside a job of this very cluster).
self_and_parents() {
    local a=$$ out=" $$ "
    while [[ $a -gt 1 ]]; do
        a=$(awk '/^PPid:/ {print $2}' "/proc/$a/status" 2>/dev/null || echo 1)
        out+="$a "
    done
    echo "$out"
}

# Pids of live processes whose environment carries our marker (daemons we
# started and the slurmstepds they forked), minus this shell and its parents.
marked_pids() {
    local p self
    self=$(self_and_parents)
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        [[ $self == *" $p "* ]] && continue
        if grep -qxzF "$MARK=$DIR" "/proc/$p/environ" 2>/dev/null && alive "$p"; then echo "$p"; fi
    done
    return 0
}

# descendants PID...: live descendants of the given processes (job scripts,
# sruns and tasks under a slurmstepd), minus this shell and its parents.
descendants() {
    local self p
    self=$(self_and_parents)
    for p in $(ps -eo pid=,ppid= | awk -v roots=" $* " '
        { parent[$1] = $2 }
        END {
            n = split(roots, r, " "); for (i = 1; i <= n; i++) mark[r[i]] = 1
            do { grew = 0
                 for (c in parent) if (!(c in mark) && (parent[c] in mark)) { mark[c] = 2; grew = 1 }
            } while (grew)
            for (c in mark) if (mark[c] == 2) print c
        }'); do
        [[ $self == *" $p "* ]] || ! alive "$p" || echo "$p"
    done
    return 0
}

# Stop leftovers of a cluster whose slurmd died or was killed with jobs still
# running: slurmstepds (they ignore SIGTERM) and everything they started.
stop_leftovers() { # PIDS of leftover marked processes
    local kids pid i
    kids=$(descendants "$@")
    say "stopping leftovers:$(ps -o pid=,comm= -p "$(tr -s ' \n' ',' <<<"$* $kids" | sed 's/^,//; s/,$//')" | tr -s ' \n' ' ')"
    # shellcheck disable=SC2086
    [[ -z $kids ]] || kill -TERM $kids 2>/dev/null || true
    for ((i = 0; i < 30; i++)); do
        local any=0
        for pid in $kids; do alive "$pid" && any=1; done
        [[ $any -eq 0 ]] && break
        sleep 0.1
    done
    # shellcheck disable=SC2086
    kill -KILL "$@" $kids 2>/dev/null || true
    STOPPED+=("$@")
}

# --- configuration ----------------------------------------------------------

node_addr() {
    local a
    a=$(getent ahostsv4 "$HOST" 2>/dev/null | awk 'NR==1 {print $1}' || true)
    echo "${a:-127.0.0.1}"
}

real_memory_mb() {
    local total margin
    total=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    margin=${MPILM_SLURM_MEM_MARGIN_MB:-$((total * 5 / 100))}
    [[ -n ${MPILM_SLURM_MEM_MARGIN_MB:-} || $margin -ge 256 ]] || margin=256
    echo $((total > margin ? total - margin : total))
}

# Socket/core layout as slurmd sees it, when it agrees with nproc (otherwise
# Slurm guesses one core per socket and logs a "reconfigured" warning).
node_topology() {
    local c
    c=$(slurmd -C 2>/dev/null | head -1 || true)
    [[ $c =~ CPUs=([0-9]+) && ${BASH_REMATCH[1]} == "$1" ]] || return 0
    [[ $c =~ (Boards=[0-9]+\ SocketsPerBoard=[0-9]+\ CoresPerSocket=[0-9]+\ ThreadsPerCore=[0-9]+) ]] &&
        echo " ${BASH_REMATCH[1]}"
    return 0
}

write_conf() {
    local addr cpus mem topo
    addr=$(node_addr)
    cpus=$(nproc)
    mem=$(real_memory_mb)
    topo=$(node_topology "$cpus")
    cat <<EOF
# Generated by slurm/local-cluster.sh on $(date -Is) — do not edit; edit the
# script instead. One-node test cluster on $HOST, state under $DIR.
ClusterName=mpilm
SlurmctldHost=$HOST($addr)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again
# (default 120 s; Slurm refuses less than 5).
AuthInfo=cred_expire=$CRED_EXPIRE

StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=$DEBUG
SlurmdDebug=$DEBUG

# No cgroups here: track processes through /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=pmix
SelectType=select/cons_tres
SelectTypeParameters=CR_Core

# A node that (re)registers with a valid configuration becomes usable again.
ReturnToService=2
# Batch jobs may be requeued (scontrol requeue, node failure) by default; see
# also AuthInfo=cred_expire above.
JobRequeue=1

# Fast turnaround on a test cluster: schedule on every event without delay,
# retry pending jobs every 2 s (main loop) and 1 s (backfill), purge finished
# jobs after 30 s, give a cancelled job 5 s between SIGTERM and SIGKILL.
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,sched_min_interval=0,bf_interval=1
MinJobAge=30
KillWait=5
CompleteWait=0
InactiveLimit=0
WaitTime=0
MessageTimeout=10
SlurmctldTimeout=30
SlurmdTimeout=30

# No accounting database; a text record of every finished job instead.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.log
MailProg=/bin/true

NodeName=$HOST NodeAddr=$addr CPUs=$cpus$topo RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=$OVERSUB
EOF
}

# --- munge ------------------------------------------------------------------

munge_answers() { timeout 10 munge -n </dev/null 2>/dev/null | timeout 10 unmunge >/dev/null 2>&1; }

start_munge() {
    id munge >/dev/null 2>&1 || die "user 'munge' does not exist (install the munge package: make deps)"
    install -d -o munge -g munge -m 700 /etc/munge
    if [[ ! -s $MUNGE_KEY ]]; then
        say "creating munge key $MUNGE_KEY"
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE_KEY" --force
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
        fi
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 400 "$MUNGE_KEY"
    install -d -o munge -g munge -m 755 "$MUNGE_RUN"
    install -d -o munge -g munge -m 700 /var/log/munge /var/lib/munge

    if munge_answers; then
        if [[ -n $(pid_of munged) ]]; then
            say "munged already running (started by this script, pid $(pid_of munged))"
        else
            say "munged already running (not started by this script; will be left alone)"
        fi
        return 0
    fi
    rm -f "$DIR/run/munged.pid"
    say "starting munged as user munge"
    if ! runuser -u munge -- env "$MARK=$DIR" munged --force \
        </dev/null >"$DIR/log/munged.stderr" 2>&1 9>&-; then
        cat "$DIR/log/munged.stderr" >&2
        show_log "$MUNGE_LOG"
        die "munged failed to start"
    fi
    local i
    for ((i = 0; i < TIMEOUT * 10; i++)); do
        munge_answers && break
        sleep 0.1
    done
    munge_answers || { show_log "$MUNGE_LOG"; die "munged started but does not answer on $MUNGE_RUN/munge.socket.2"; }
    cp "$MUNGE_RUN/munged.pid" "$DIR/run/munged.pid"
    say "munged up (pid $(cat "$DIR/run/munged.pid"))"
}

# --- up / down / status -----------------------------------------------------

need_root() {
    [[ $EUID -eq 0 ]] || die "must run as root (SlurmUser=root, munged runs as user munge)"
}

need_binaries() {
    local b missing=()
    for b in slurmctld slurmd munged munge unmunge sinfo scontrol squeue scancel runuser; do
        command -v "$b" >/dev/null 2>&1 || missing+=("$b")
    done
    [[ ${#missing[@]} -eq 0 ]] || die "missing programs: ${missing[*]} (install slurm-wlm and munge: make deps)"
}

lock() {
    mkdir -p "$DIR"
    exec 9>"$DIR/.lock"
    flock -w 120 9 || die "another $PROG has held $DIR/.lock for 2 minutes: $(fuser "$DIR/.lock" 2>&1 | tr -s ' ')"
}

# start_daemon NAME ARGS...: start a Slurm daemon (it forks into the
# background and writes its own pid file), then check that it stayed alive.
start_daemon() {
    local name=$1 pid i
    shift
    rm -f "$DIR/run/$name.pid"
    say "starting $name"
    if ! env "$MARK=$DIR" "$name" -f "$CONF" "$@" </dev/null >"$DIR/log/$name.stderr" 2>&1 9>&-; then
        cat "$DIR/log/$name.stderr" >&2
        show_log "$DIR/log/$name.log"
        return 1
    fi
    for ((i = 0; i < TIMEOUT * 10; i++)); do
        pid=$(pid_of "$name")
        [[ -n $pid ]] && break
        sleep 0.1
    done
    if [[ -z $pid ]]; then
        echo "$name did not stay up" >&2
        cat "$DIR/log/$name.stderr" >&2
        show_log "$DIR/log/$name.log"
        return 1
    fi
}

up_failed() {
    echo "$PROG: error: $1; stopping what was started" >&2
    do_down >/dev/null 2>&1 || true
    exit 1
}

do_up() {
    need_root
    need_binaries
    lock
    if is_up; then
        say "already up (slurmctld pid $(pid_of slurmctld), slurmd pid $(pid_of slurmd)); nothing to do"
        usage_hint
        return 0
    fi
    if [[ -n $(pid_of slurmctld)$(pid_of slurmd) ]]; then
        say "cluster is half up; restarting it"
        do_down
    fi
    local p
    for p in slurmctld slurmd; do
        if [[ -n $(live_pids "$p") ]]; then
            die "a $p not started by this script is running (pid $(live_pids "$p" | tr '\n' ' '))," \
                "perhaps with another MPILM_SLURM_DIR; stop it first"
        fi
    done

    mkdir -p "$DIR"/{state,spool,log,run}
    chmod 755 "$DIR"
    # Daemons are started with fd 9 (the lock) closed, or they would hold it.
    # Fresh logs for this run (the previous ones are kept as *.1).
    for p in slurmctld.log slurmd.log; do
        if [[ -e $DIR/log/$p ]]; then mv -f "$DIR/log/$p" "$DIR/log/$p.1"; fi
    done
    write_conf >"$CONF.tmp"
    mv -f "$CONF.tmp" "$CONF"
    say "wrote $CONF"
    if [[ $LINK_ETC == 1 && ! -e $ETC_CONF && ! -L $ETC_CONF ]]; then
        mkdir -p /etc/slurm
        ln -s "$CONF" "$ETC_CONF"
        touch "$DIR/run/etc-link"
        say "linked $ETC_CONF -> $CONF"
    fi

    start_munge

    # -c: cold start, forget jobs of a previous incarnation of this cluster.
    start_daemon slurmctld -c || up_failed "slurmctld failed to start"
    local i ok=0
    for ((i = 0; i < TIMEOUT * 5; i++)); do
        [[ -n $(pid_of slurmctld) ]] || break
        if ctld_answers; then ok=1; break; fi
        sleep 0.2
    done
    if [[ $ok -eq 0 ]]; then
        show_log "$DIR/log/slurmctld.log"
        if [[ -z $(pid_of slurmctld) ]]; then up_failed "slurmctld exited during start-up"; fi
        up_failed "slurmctld does not answer 'scontrol ping' after ${TIMEOUT}s"
    fi
    start_daemon slurmd -c || up_failed "slurmd failed to start"

    # Wait for the node to register and become idle.
    local st resumed=0
    for ((i = 0; i < TIMEOUT * 5; i++)); do
        st=$(node_state)
        [[ $st == idle ]] && break
        [[ -n $(pid_of slurmd) ]] || break
        if [[ $st =~ ^(down|drain|drained|fail) && $resumed -eq 0 && $i -gt 10 ]]; then
            scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
            resumed=1
        fi
        sleep 0.2
    done
    if [[ $st != idle ]]; then
        timeout 10 sinfo -N -l >&2 || true
        timeout 10 sinfo -R >&2 || true
        show_log "$DIR/log/slurmd.log"
        show_log "$DIR/log/slurmctld.log" 15
        up_failed "node $HOST did not become idle within ${TIMEOUT}s (state: ${st:-unknown})"
    fi
    say "up: node $HOST idle ($(nproc) CPUs, partition $PARTITION)"
    usage_hint
}

usage_hint() {
    cat <<EOF
Use it:
  eval "\$($0 env)"        # sets SLURM_CONF=$CONF
  sinfo; sbatch -N 1 -n 4 --overcommit --wrap 'srun --mpi=pmix ./prog'
  $0 down                 # stop everything
Logs: $DIR/log/  (jobcomp.log: one line per finished job)
EOF
}

do_down() {
    need_root
    lock
    local pid stopped=0 i ids
    if [[ -n $(pid_of slurmctld) ]] && ctld_answers; then
        ids=$(timeout 10 squeue -h -o %i 2>/dev/null | tr '\n' ' ' || true)
        if [[ -n ${ids// /} ]]; then
            say "cancelling jobs: $ids"
            # shellcheck disable=SC2086
            timeout 10 scancel $ids 2>/dev/null || true
            for ((i = 0; i < 100; i++)); do
                [[ -z $(timeout 10 squeue -h -o %i 2>/dev/null) ]] && break
                sleep 0.2
            done
        fi
    fi
    for p in slurmd slurmctld; do
        pid=$(pid_of "$p")
        if [[ -n $pid ]]; then
            stop_pid "$p" "$pid"
            stopped=1
        fi
        rm -f "$DIR/run/$p.pid"
    done
    # Leftover slurmstepds (and anything else carrying our marker) except munged.
    local mpid
    mpid=$(pid_of munged)
    local leftovers=()
    for pid in $(marked_pids); do
        [[ $pid == "$mpid" ]] || leftovers+=("$pid")
    done
    [[ ${#leftovers[@]} -eq 0 ]] || stop_leftovers "${leftovers[@]}"
    if [[ -n $mpid ]]; then
        stop_pid munged "$mpid"
        stopped=1
    fi
    rm -f "$DIR/run/munged.pid"
    if [[ -e $DIR/run/etc-link ]]; then
        if [[ -L $ETC_CONF && $(readlink "$ETC_CONF") == "$CONF" ]]; then
            rm -f "$ETC_CONF"
            say "removed link $ETC_CONF"
        fi
        rm -f "$DIR/run/etc-link"
    fi
    [[ $stopped -eq 1 ]] || say "not running (nothing of ours to stop)"
    wait_reaped
    local left
    left=$(marked_pids | tr '\n' ' ')
    [[ -z ${left// /} ]] || die "processes still running after down: $left"
    say "down"
}

do_status() {
    local c d
    c=$(pid_of slurmctld)
    d=$(pid_of slurmd)
    if is_up; then
        say "up: slurmctld pid $c, slurmd pid $d, node $HOST $(node_state), SLURM_CONF=$CONF"
        timeout 10 squeue -h -o '%i %T %j' 2>/dev/null | sed 's/^/  job /' || true
        return 0
    fi
    if [[ -n $c$d ]]; then
        say "not up: slurmctld ${c:+pid }${c:-not running}, slurmd ${d:+pid }${d:-not running}, node state '$(node_state)'"
    else
        say "down"
    fi
    return 3
}

case ${1:-} in
up) do_up ;;
down) do_down ;;
status) do_status ;;
env)
    echo "export SLURM_CONF=$CONF"
    echo "export MPILM_SLURM_DIR=$DIR"
    ;;
conf) write_conf ;;
-h | --help | help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
*)
    echo "usage: $PROG up|down|status|env|conf   (--help for details)" >&2
    exit 2
    ;;
esac
