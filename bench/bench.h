/* bench: `mpilm bench KIND`: benchmark drivers that report ratios against a
 * baseline measured in the same run and append CSV rows (--csv FILE).
 */
#ifndef MPILM_BENCH_H
#define MPILM_BENCH_H

#include <mpi.h>
#include <stdio.h>

int bench_main(int argc, char **argv, MPI_Comm comm);
int bench_gemm(int argc, char **argv, MPI_Comm comm);
int bench_train(int argc, char **argv, MPI_Comm comm);
int bench_ckpt(int argc, char **argv, MPI_Comm comm);
int bench_allreduce(int argc, char **argv, MPI_Comm comm);
int bench_compress(int argc, char **argv, MPI_Comm comm);
int bench_serve(int argc, char **argv, MPI_Comm comm);

/* Opens FILE for appending and writes `header` first if the file is new. */
FILE *bench_csv_open(const char *file, const char *header);

#endif
