#!/usr/bin/env bash
# End-to-end test of the emulated cluster (tools/emu-cluster.sh, DESIGN.md
# section 8): brings up 2 network-namespace nodes with 1 Gbit/s links, runs
# tests/e2e/mpi_pingpong.c as 2 nodes x 2 ranks, checks that the ranks see 2
# distinct host names and that the inter-node bandwidth follows the shaped
# rate (1 Gbit/s, then 100 Mbit/s set while the cluster is up), and that
# `down` leaves nothing behind. Not a benchmark: the bounds are loose.
# Exit 0 pass, 77 skip (network namespaces cannot be created here), else fail.
source tests/e2e/lib.sh
emu_instance mpilmt 10.213.77

command -v mpicc >/dev/null || die "mpicc not found (make deps)"
mpicc -O2 -Wall -Wextra -o "$TMP/pingpong" tests/e2e/mpi_pingpong.c \
    || die "cannot compile mpi_pingpong.c"

bash "$EMU" up 2 1gbit || die "emu-cluster up failed"
bash "$EMU" status

# run_pp OUTFILE ARGS...: 2 nodes x 2 ranks
run_pp() {
    local out=$1; shift
    timeout -k 5 120 bash "$EMU" run -np 4 --per-node 2 -- "$TMP/pingpong" "$@" \
        >"$out" 2>&1 || { cat "$out"; die "mpirun across the emulated nodes failed"; }
    cat "$out"
}
# bw OUTFILE BYTES -> MB/s of the ping-pong line for that size
bw() { sed -n "s/^pingpong bytes=$2 .*bw_MBps=\([0-9.]*\).*/\1/p" "$1" | tail -1; }
# check LO <= X <= HI (floating point)
between() { awk -v x="$1" -v lo="$2" -v hi="$3" 'BEGIN { exit !(x >= lo && x <= hi) }'; }

run_pp "$TMP/fast.out" -t 0.5 1 65536 1048576 4194304

# placement: 4 ranks, ranks 0-1 on node0, 2-3 on node1
n=$(grep -c '^host rank=' "$TMP/fast.out" || true)
[[ $n -eq 4 ]] || die "expected 4 ranks, got $n"
hosts=$(sed -n 's/^host rank=\([0-9]*\) size=4 name=\(.*\)/\1:\2/p' "$TMP/fast.out" | tr '\n' ' ')
[[ $hosts == "0:node0 1:node0 2:node1 3:node1 " ]] || die "unexpected placement: $hosts"
distinct=$(sed -n 's/^host .*name=//p' "$TMP/fast.out" | sort -u | wc -l)
[[ $distinct -eq 2 ]] || die "expected 2 distinct host names, got $distinct"

# 1 Gbit/s = 125 MB/s: allow a loaded 2-core machine to fall well short, but
# never much above the shaped rate (that would mean shaping is not applied)
fast=$(bw "$TMP/fast.out" 4194304)
[[ -n $fast ]] || die "no 4 MiB ping-pong result"
echo "4 MiB inter-node bandwidth at 1gbit: $fast MB/s (shaped: 125 MB/s)"
between "$fast" 30 187.5 || die "bandwidth $fast MB/s at 1gbit is not within 30..187.5 MB/s"

# change the rate while the cluster is up (as an online re-selection demo would)
bash "$EMU" rate 100mbit || die "emu-cluster rate failed"
tc -n mpilmt-n0 qdisc show dev eth0 | grep -q 'rate 100Mbit' || die "rate change not applied"
run_pp "$TMP/slow.out" -t 1 1 4194304
slow=$(bw "$TMP/slow.out" 4194304)
[[ -n $slow ]] || die "no 4 MiB ping-pong result at 100mbit"
echo "4 MiB inter-node bandwidth at 100mbit: $slow MB/s (shaped: 12.5 MB/s)"
between "$slow" 3 18.75 || die "bandwidth $slow MB/s at 100mbit is not within 3..18.75 MB/s"
awk -v f="$fast" -v s="$slow" 'BEGIN { exit !(s * 3 < f) }' \
    || die "bandwidth did not drop with the rate: $fast -> $slow MB/s"

# down leaves nothing behind, and is safe to repeat
bash "$EMU" down || die "emu-cluster down failed"
left=$( (ip netns list; ip -o link show) | grep -c 'mpilmt-' || true)
[[ $left -eq 0 ]] || die "down left $left namespaces/links behind"
[[ ! -e $EMU_DIR ]] || die "down left the state dir $EMU_DIR"
bash "$EMU" down || die "second down failed"
[[ $(bash "$EMU" status) == *down* ]] || die "status after down"
echo "PASS: emulated cluster: 2 nodes x 2 ranks, $fast MB/s at 1gbit, $slow MB/s at 100mbit"
