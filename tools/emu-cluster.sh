#!/usr/bin/env bash
# emu-cluster.sh: an emulated multi-node cluster on one machine, for tests and
# benchmarks (DESIGN.md section 8). Each "node" is a network namespace with
# its own UTS host name, joined by a veth pair to a bridge in the root
# namespace; every link is shaped with `tc tbf` in both directions. Open MPI
# is launched across the nodes with an rsh agent that enters the namespace.
# It is not a container runtime: nodes share the file system, /dev/shm, the
# cores and the memory of the host; only the network and host name differ.
#
# Usage (as root; state lives in ${EMU_DIR:-/tmp/mpilm-emu}):
#   tools/emu-cluster.sh up NODES [RATE]   create nodes node0..node{NODES-1},
#                                          links shaped at RATE (tc units:
#                                          1gbit, 100mbit, 500kbit...; "none"
#                                          = unshaped; default 1gbit)
#   tools/emu-cluster.sh run [-np N] [--per-node M] [-x VAR]... [MPIRUN ARGS] -- CMD [ARGS]
#                                          mpirun across the nodes, M ranks per
#                                          node (default ceil(N/NODES); N
#                                          defaults to M*NODES, M to 1)
#   tools/emu-cluster.sh rate RATE [NODE]  change the rate of all links or of
#                                          one (NODE: 3 or node3) while running
#   tools/emu-cluster.sh status            nodes, addresses, qdiscs + counters
#   tools/emu-cluster.sh down              remove everything; safe when not up
#   tools/emu-cluster.sh hostfile|agent    print the path of the file
#
# Environment (read by `up`, remembered in the state dir for later commands):
#   EMU_DIR     state dir (hostfile, rsh agent, settings)   /tmp/mpilm-emu
#   EMU_PREFIX  name prefix of namespaces/links (<=8 chars) mpilm
#   EMU_NET     first three octets of the private /24       10.213.0
#               node i is $EMU_NET.(i+1), the bridge $EMU_NET.254
#   EMU_SLOTS   slots per node written in the hostfile      $(nproc)
#   EMU_EXPORT  extra variable names `run` passes with -x   (empty)
#   EMU_LATENCY tbf queue length expressed as time          20ms
# Run-time defaults that the caller can override through the environment
# (command-line --mca wins over these): OMPI_MCA_pml=ob1,
# OMPI_MCA_btl=self,vader,tcp (shared memory inside a node, TCP between).
#
# Shaping (`tc qdisc replace dev LINK root tbf rate R burst B latency L`) is
# put on the egress of both ends of each node's veth pair: the namespace end
# shapes what the node sends, the bridge end what it receives, so traffic
# between two nodes crosses two R-limited queues and gets R end to end.
#   burst  B = max(64 KiB, R x 1 ms): the bucket must hold the largest packet
#          the veth hands over (GSO super-packets up to 64 KiB; smaller
#          buckets make tbf split them in software) and at least one timer
#          tick of traffic (HZ=250 -> 4 ms granularity, but hrtimers make 1 ms
#          enough), otherwise the rate is undershot; larger bursts let short
#          messages pass at memory speed, which hides latency effects.
#   latency L = $EMU_LATENCY (20 ms): the longest a packet may wait in the
#          queue; tbf turns it into a byte limit (R x L + B). Shorter queues
#          drop packets and TCP never reaches R; much longer ones add
#          bufferbloat delay to every small message behind a large one.
set -Eeuo pipefail

EMU_DIR=${EMU_DIR:-/tmp/mpilm-emu}
STATE=$EMU_DIR/state
HOSTFILE=$EMU_DIR/hostfile
AGENT=$EMU_DIR/rsh-agent

die() { echo "emu-cluster: $*" >&2; exit 1; }
log() { echo "emu-cluster: $*" >&2; }

# Load settings of a running cluster (or defaults for a new one).
load_state() {
    PREFIX=${EMU_PREFIX:-mpilm}; NET=${EMU_NET:-10.213.0}; NODES=0; RATE=none
    LATENCY=${EMU_LATENCY:-20ms}
    if [[ -f $STATE ]]; then
        # shellcheck disable=SC1090
        source "$STATE"
    fi
    BR=${PREFIX}-br
    SUBNET=$NET.0/24
}

ns_name()   { echo "${PREFIX}-n$1"; }
veth_host() { echo "${PREFIX}-v$1"; }   # bridge end, root namespace
# the namespace end is renamed to eth0 inside the namespace

# rate_bps RATE -> bits per second (tc units: bit kbit mbit gbit tbit, bps
# kbps mbps gbps = bytes, kibit mibit gibit kibps mibps gibps binary).
rate_bps() {
    local r=${1,,} num unit
    [[ $r =~ ^([0-9]+(\.[0-9]+)?)([a-z]*)$ ]] || return 1
    num=${BASH_REMATCH[1]}; unit=${BASH_REMATCH[3]}
    local mul
    case $unit in
        ""|bit) mul=1 ;; kbit) mul=1e3 ;; mbit) mul=1e6 ;; gbit) mul=1e9 ;; tbit) mul=1e12 ;;
        kibit) mul=1024 ;; mibit) mul=1048576 ;; gibit) mul=1073741824 ;;
        bps) mul=8 ;; kbps) mul=8e3 ;; mbps) mul=8e6 ;; gbps) mul=8e9 ;;
        kibps) mul=8192 ;; mibps) mul=8388608 ;; gibps) mul=8589934592 ;;
        *) return 1 ;;
    esac
    awk -v n="$num" -v m="$mul" 'BEGIN { printf "%.0f\n", n * m }'
}

# tbf parameters for RATE (see the header for the reasoning)
tbf_args() {
    local bps burst
    bps=$(rate_bps "$1") || die "bad rate '$1' (use tc units: 1gbit, 100mbit, 500kbit...)"
    [[ $bps -gt 0 ]] || die "rate must be positive: $1"
    burst=$((bps / 8 / 1000))
    [[ $burst -lt 65536 ]] && burst=65536
    echo "rate $1 burst $burst latency $LATENCY"
}

# shape_node I RATE: (re)apply shaping on both ends of node I's link
shape_node() {
    local i=$1 rate=$2 ns args
    ns=$(ns_name "$i")
    if [[ $rate == none ]]; then
        tc qdisc del dev "$(veth_host "$i")" root 2>/dev/null || true
        tc -n "$ns" qdisc del dev eth0 root 2>/dev/null || true
        return
    fi
    args=$(tbf_args "$rate")
    # shellcheck disable=SC2086
    tc qdisc replace dev "$(veth_host "$i")" root tbf $args
    # shellcheck disable=SC2086
    tc -n "$ns" qdisc replace dev eth0 root tbf $args
}

write_state() {
    mkdir -p "$EMU_DIR"
    cat >"$STATE.tmp" <<EOF
PREFIX=$PREFIX
NET=$NET
NODES=$NODES
RATE=$RATE
LATENCY=$LATENCY
EOF
    mv "$STATE.tmp" "$STATE"
}

write_agent() {
    # Open MPI calls: AGENT HOST ORTED-COMMAND... (like ssh: the command words
    # are joined and run by a shell). Host nodeK -> namespace PREFIX-nK, in a
    # fresh UTS namespace named nodeK so that Open MPI sees distinct nodes.
    cat >"$AGENT" <<EOF
#!/bin/sh
# rsh agent of the emulated cluster (written by tools/emu-cluster.sh up)
host=\$1; shift
case \$host in
    node[0-9]*) i=\${host#node} ;;
    $NET.*) i=\$((\${host##*.} - 1)); host=node\$i ;;
    *) echo "emu-cluster agent: unknown host \$host" >&2; exit 255 ;;
esac
[ -e /run/netns/${PREFIX}-n\$i ] || { echo "emu-cluster agent: no namespace for \$host" >&2; exit 255; }
exec ip netns exec ${PREFIX}-n\$i unshare --uts sh -c "hostname \$host && \$*"
EOF
    chmod 755 "$AGENT"
}

write_hostfile() {
    local slots=${EMU_SLOTS:-$(nproc)} i
    : >"$HOSTFILE.tmp"
    for ((i = 0; i < NODES; i++)); do echo "node$i slots=$slots" >>"$HOSTFILE.tmp"; done
    mv "$HOSTFILE.tmp" "$HOSTFILE"
}

# Remove whatever of ours exists (namespaces, links, bridge), state or not.
teardown() {
    local ns pids i
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${PREFIX}-n[0-9]+$" || true); do
        # processes still inside (orted, ranks of a killed run) keep the
        # namespace and its veth alive after `ip netns del`: end them first
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        if [[ -n $pids ]]; then
            log "killing leftover processes in $ns: ${pids//$'\n'/ }"
            # shellcheck disable=SC2086
            kill -TERM $pids 2>/dev/null || true
            for ((i = 0; i < 20; i++)); do
                pids=$(ip netns pids "$ns" 2>/dev/null || true)
                [[ -z $pids ]] && break
                sleep 0.1
            done
            if [[ -n $pids ]]; then
                # shellcheck disable=SC2086
                kill -KILL $pids 2>/dev/null || true
            fi
        fi
        ip netns del "$ns" 2>/dev/null || true
    done
    for i in $(ip -o link show 2>/dev/null | sed -n "s/^[0-9]*: \(${PREFIX}-v[0-9]*\)[@:].*/\1/p"); do
        ip link del "$i" 2>/dev/null || true
    done
    ip link del "$BR" 2>/dev/null || true
}

cmd_up() {
    [[ $# -ge 1 && $# -le 2 ]] || die "usage: up NODES [RATE]"
    local want=$1 rate=${2:-1gbit} i ns vh
    [[ $want =~ ^[0-9]+$ && $want -ge 1 && $want -le 200 ]] || die "NODES must be 1..200"
    [[ $(id -u) -eq 0 ]] || die "must run as root (network namespaces)"
    load_state
    [[ $rate == none ]] || tbf_args "$rate" >/dev/null
    [[ ${#PREFIX} -le 8 ]] || die "EMU_PREFIX too long (max 8 chars: link names are limited to 15)"
    [[ $NET =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "EMU_NET must be three octets, e.g. 10.213.0"
    if [[ -f $STATE ]]; then
        if [[ $NODES -eq $want ]] && ip link show "$BR" >/dev/null 2>&1; then
            log "already up with $NODES nodes; setting rate $rate"
            for ((i = 0; i < NODES; i++)); do shape_node "$i" "$rate"; done
            RATE=$rate; write_state
            return 0
        fi
        die "already up with $NODES nodes (state in $EMU_DIR); run 'down' first"
    fi
    if ip -o addr show 2>/dev/null | grep -v " ${PREFIX}-" | grep -q " inet $NET\."; then
        die "subnet $SUBNET is already used on this host; choose another EMU_NET"
    fi
    command -v mpirun >/dev/null || log "warning: mpirun not found (run will fail)"
    teardown # leftovers of a crashed earlier run
    NODES=$want; RATE=$rate
    mkdir -p "$EMU_DIR"
    trap 'log "up failed; cleaning up"; teardown; rm -rf "$EMU_DIR"' ERR
    ip link add "$BR" type bridge
    ip addr add "$NET.254/24" dev "$BR"
    ip link set "$BR" up
    for ((i = 0; i < NODES; i++)); do
        ns=$(ns_name "$i"); vh=$(veth_host "$i")
        ip netns add "$ns"
        ip link add "$vh" type veth peer name "${PREFIX}-p$i"
        ip link set "${PREFIX}-p$i" netns "$ns"
        ip -n "$ns" link set "${PREFIX}-p$i" name eth0
        ip -n "$ns" addr add "$NET.$((i + 1))/24" dev eth0
        ip -n "$ns" link set lo up
        ip -n "$ns" link set eth0 up
        ip link set "$vh" master "$BR"
        ip link set "$vh" up
        shape_node "$i" "$rate"
    done
    write_agent
    write_hostfile
    write_state
    trap - ERR
    # wait until the bridge forwards on every port (immediate without STP)
    for ((i = 0; i < 50; i++)); do
        bridge link show 2>/dev/null | grep " ${PREFIX}-v" | grep -vq "state forwarding" || break
        sleep 0.1
    done
    log "up: $NODES nodes on $SUBNET (bridge $BR $NET.254), rate $rate, state in $EMU_DIR"
}

cmd_down() {
    load_state
    teardown
    rm -rf "$EMU_DIR"
    log "down"
}

need_up() {
    load_state
    [[ -f $STATE && $NODES -ge 1 ]] || die "not up (no state in $EMU_DIR); run 'up NODES [RATE]' first"
}

cmd_rate() {
    [[ $# -ge 1 && $# -le 2 ]] || die "usage: rate RATE [NODE]"
    need_up
    local rate=$1 i
    [[ $rate == none ]] || tbf_args "$rate" >/dev/null
    if [[ $# -eq 2 ]]; then
        i=${2#node}
        [[ $i =~ ^[0-9]+$ && $i -lt $NODES ]] || die "no node $2 (0..$((NODES - 1)))"
        shape_node "$i" "$rate"
        log "node$i: rate $rate"
    else
        for ((i = 0; i < NODES; i++)); do shape_node "$i" "$rate"; done
        RATE=$rate; write_state
        log "all links: rate $rate"
    fi
}

cmd_status() {
    if [[ ! -f $STATE ]]; then echo "emu-cluster: down (no state in $EMU_DIR)"; return 0; fi
    load_state
    echo "emu-cluster: $NODES nodes, subnet $SUBNET, bridge $BR ($NET.254), rate $RATE"
    echo "  state dir: $EMU_DIR  hostfile: $HOSTFILE  agent: $AGENT"
    local i ns
    for ((i = 0; i < NODES; i++)); do
        ns=$(ns_name "$i")
        if ! ip netns list | grep -qw "$ns"; then echo "  node$i: MISSING namespace $ns"; continue; fi
        echo "  node$i: ns $ns  $NET.$((i + 1))  link $(veth_host "$i")"
        echo "    out: $(tc -n "$ns" qdisc show dev eth0 | head -1)"
        echo "    in:  $(tc qdisc show dev "$(veth_host "$i")" | head -1)"
        tc -s -n "$ns" qdisc show dev eth0 | sed -n 's/^ *Sent/    out sent/p'
        tc -s qdisc show dev "$(veth_host "$i")" | sed -n 's/^ *Sent/    in  sent/p'
    done
}

cmd_run() {
    need_up
    local np="" per="" a
    local -a margs=() cmd=()
    while [[ $# -gt 0 ]]; do
        case $1 in
            --) shift; cmd=("$@"); break ;;
            -np|-n|--np|-c) np=$2; shift 2 ;;
            --per-node|-N|--npernode) per=$2; shift 2 ;;
            *) margs+=("$1"); shift ;;
        esac
    done
    [[ ${#cmd[@]} -gt 0 ]] || die "usage: run [-np N] [--per-node M] [MPIRUN ARGS] -- CMD [ARGS]"
    if [[ -z $per ]]; then
        if [[ -n $np ]]; then per=$(((np + NODES - 1) / NODES)); else per=1; fi
    fi
    [[ -n $np ]] || np=$((per * NODES))
    [[ $np =~ ^[0-9]+$ && $per =~ ^[0-9]+$ && $np -ge 1 && $per -ge 1 ]] || die "bad -np/--per-node"
    # environment the programs need; -x of an unset variable is skipped
    local -a xs=()
    for a in PATH LD_LIBRARY_PATH OMP_NUM_THREADS OPENBLAS_CORETYPE OPENBLAS_NUM_THREADS ${EMU_EXPORT:-}; do
        [[ -n ${!a+x} ]] && xs+=(-x "$a")
    done
    export OMPI_MCA_pml=${OMPI_MCA_pml:-ob1}
    export OMPI_MCA_btl=${OMPI_MCA_btl:-self,vader,tcp}
    local -a mpirun=(mpirun --allow-run-as-root --oversubscribe --bind-to none
        --hostfile "$HOSTFILE"
        --mca plm_rsh_agent "$AGENT"
        --mca plm_rsh_no_tree_spawn 1
        --mca oob_tcp_if_include "$SUBNET"
        --mca btl_tcp_if_include "$SUBNET"
        -np "$np" --map-by "ppr:$per:node"
        "${xs[@]}" "${margs[@]}" "${cmd[@]}")
    [[ -n ${EMU_VERBOSE:-} ]] && log "${mpirun[*]}"
    exec "${mpirun[@]}"
}

main() {
    [[ $# -ge 1 ]] || { sed -n "2,/^set -Eeuo/p" "$0" | sed '$d; s/^# \{0,1\}//'; exit 2; }
    local c=$1; shift
    case $c in
        up) cmd_up "$@" ;;
        down) cmd_down ;;
        rate) cmd_rate "$@" ;;
        status) cmd_status ;;
        run) cmd_run "$@" ;;
        hostfile) need_up; echo "$HOSTFILE" ;;
        agent) need_up; echo "$AGENT" ;;
        -h|--help|help) sed -n "2,/^set -Eeuo/p" "$0" | sed '$d; s/^# \{0,1\}//' ;;
        *) die "unknown command '$c' (up, run, rate, status, down)" ;;
    esac
}
main "$@"
