#!/usr/bin/env bash
# The OpenBLAS kernel fix-up: with the kernel OpenBLAS 0.3.21 falls back to on
# CPUs it does not know (Prescott, simulated with OPENBLAS_CORETYPE), mpilm
# re-executes itself with a kernel for the CPU's vector width, also under
# mpirun; MPILM_BLAS_FIX=off leaves it alone. Speed is in `mpilm bench gemm`.
source tests/e2e/lib.sh
grep -qw avx2 /proc/cpuinfo || { echo "SKIP: CPU without AVX2, nothing to fix"; exit 77; }
out=$(OPENBLAS_CORETYPE=Prescott MPILM_BLAS_FIX=force "$MPILM" bench gemm --seconds 0.02 | head -1)
echo "$out"
[[ $out =~ OpenBLAS\ kernel:\ (SkylakeX|Haswell)\ \(mpilm\ replaced\ the\ misdetected\ \'Prescott\'\) ]] || die "kernel not replaced"
out=$(OPENBLAS_CORETYPE=Prescott MPILM_BLAS_FIX=off "$MPILM" bench gemm --seconds 0.02 | head -1)
echo "$out"
[[ $out == "OpenBLAS kernel: Prescott |"* ]] || die "MPILM_BLAS_FIX=off did not keep the kernel"
DATA=$(test_data)
write_job "$TMP/j.yaml" "$DATA" "$TMP/log"
OPENBLAS_CORETYPE=Prescott MPILM_BLAS_FIX=force timeout 120 $MPIRUN -n 2 -x OPENBLAS_CORETYPE -x MPILM_BLAS_FIX \
    "$MPILM" train "$TMP/j.yaml" --set train.steps=2 >"$TMP/out" 2>&1 || { cat "$TMP/out"; die "train failed"; }
grep -E "BLAS: OpenBLAS (SkylakeX|Haswell) kernel" "$TMP/out" || die "train under mpirun kept the slow kernel"
