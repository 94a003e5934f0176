#!/usr/bin/env bash
# The UCX path of Open MPI (the transport of RDMA clusters), here over shared
# memory and TCP: OMPI_MCA_pml=ucx with pml_ucx_tls=any, pml_ucx_devices=any
# (DESIGN.md section 8). Representative MPI work under that PML:
#  - build/tests/mpi/test_allreduce at 4 ranks (every all-reduce algorithm);
#  - a 2-rank training run whose losses match a 1-rank run within 1e-5;
#  - a checkpoint written under UCX and resumed under UCX: the resumed
#    steps are bit-identical to the uninterrupted run.
# Each launch runs with pml_base_verbose and must show "component ucx
# selected" on every rank, so a silent fallback to ob1 fails the test.
# Exit 0 pass, 77 skip (no UCX PML in this Open MPI), else fail.
source tests/e2e/lib.sh
ompi_info 2>/dev/null | grep -q 'MCA pml: ucx' || { echo "SKIP: this Open MPI has no UCX PML (Debian: libucx0 + openmpi with --with-ucx)"; exit 77; }
export OMPI_MCA_pml=ucx OMPI_MCA_pml_ucx_tls=any OMPI_MCA_pml_ucx_devices=any
UCXRUN="$MPIRUN --mca pml_base_verbose 10"
# ran_on_ucx LOG N: every one of N ranks selected the UCX PML
ran_on_ucx() {
    local n
    n=$(grep -c 'select: component ucx selected' "$1")
    [[ $n -eq $2 ]] || { grep -E 'select|pml' "$1" | head -20; die "$1: UCX selected on $n of $2 ranks"; }
    ! grep -q 'select: component ob1 selected' "$1" || die "$1: ob1 selected"
}
BIN=${BUILD_DIR:-build}/tests/mpi/test_allreduce
[[ -x $BIN ]] || die "$BIN not built (make)"

timeout 300 $UCXRUN -n 4 "$BIN" >"$TMP/allreduce.out" 2>&1 || { tail -30 "$TMP/allreduce.out"; die "test_allreduce at 4 ranks failed under UCX"; }
ran_on_ucx "$TMP/allreduce.out" 4
echo "test_allreduce: 4 ranks pass on pml ucx"

DATA=$(test_data)
for n in 1 2; do
    write_job "$TMP/j$n.yaml" "$DATA" "$TMP/log$n"
    timeout 300 $UCXRUN -n $n "$MPILM" train "$TMP/j$n.yaml" >"$TMP/train$n.out" 2>&1 || { tail -30 "$TMP/train$n.out"; die "training on $n ranks failed under UCX"; }
    ran_on_ucx "$TMP/train$n.out" $n
    losses "$TMP/log$n/metrics.jsonl" >"$TMP/loss$n"
    [[ $(wc -l <"$TMP/loss$n") -eq 20 ]] || die "$n ranks: expected 20 losses"
done
d=$(max_rel_diff "$TMP/loss2" "$TMP/loss1")
$PY -c "import sys; sys.exit(0 if $d < 1e-5 else 1)" || die "2 ranks differ from 1 rank by $d under UCX"
echo "training: 2 ranks vs 1 rank on pml ucx, max relative loss difference $d"

# checkpoint save + resume, both under UCX
write_job "$TMP/c.yaml" "$DATA" "$TMP/c" "checkpoint: {dir: $TMP/c/ckpt, every: 5, keep_last: 5}"
timeout 300 $UCXRUN -n 2 "$MPILM" train "$TMP/c.yaml" >"$TMP/c.out" 2>&1 || { tail -30 "$TMP/c.out"; die "checkpointed run failed under UCX"; }
ran_on_ucx "$TMP/c.out" 2
cmp -s <(losses "$TMP/c/metrics.jsonl") "$TMP/loss2" || die "checkpoints changed the losses"
"$MPILM" ckpt verify "$TMP/c/ckpt" >/dev/null || die "checkpoint written under UCX does not verify"
mkdir -p "$TMP/r/ckpt"
cp -r "$TMP/c/ckpt/step-00000010" "$TMP/r/ckpt/" && echo step-00000010 >"$TMP/r/ckpt/latest"
write_job "$TMP/r.yaml" "$DATA" "$TMP/r" "checkpoint: {dir: $TMP/r/ckpt, every: 5, keep_last: 5}"
timeout 300 $UCXRUN -n 2 "$MPILM" train "$TMP/r.yaml" >"$TMP/r.out" 2>&1 || { tail -30 "$TMP/r.out"; die "resume failed under UCX"; }
ran_on_ucx "$TMP/r.out" 2
grep -q "resumed from .*step-00000010" "$TMP/r.out" || { head "$TMP/r.out"; die "did not resume from step 10"; }
cmp -s <(losses "$TMP/r/metrics.jsonl") <(tail -10 "$TMP/loss2") || die "resumed losses differ from the uninterrupted run"
echo "checkpoint: saved and resumed on pml ucx at 2 ranks, steps 11-20 bit-identical"
echo "UCX path ok"
