/* mpi_hello.c — smallest useful MPI smoke test for the Slurm end-to-end test
 * (tests/e2e/test_slurm_cluster.sh). Each rank prints one line with its rank,
 * the world size and its host; then an MPI_Allreduce of (rank+1) is checked
 * against n(n+1)/2 on every rank. Not part of mpilm itself; built with plain
 * mpicc into a temporary directory by the test.
 * Exit status: 0 when the sum is right on every rank, 1 otherwise. */
#include <mpi.h>
#include <stdio.h>

int main(int argc, char **argv) {
    int rank = -1, size = 0, len = 0, ok = 0, all_ok = 0;
    long mine, sum = 0, want;
    char host[MPI_MAX_PROCESSOR_NAME] = "?";

    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Get_processor_name(host, &len);
    printf("hello rank %d of %d on %s\n", rank, size, host);
    fflush(stdout);

    mine = rank + 1;
    want = (long)size * (size + 1) / 2;
    MPI_Allreduce(&mine, &sum, 1, MPI_LONG, MPI_SUM, MPI_COMM_WORLD);
    ok = (sum == want);
    if (!ok)
        fprintf(stderr, "rank %d: allreduce sum %ld, expected %ld\n", rank, sum, want);
    /* Agree on the verdict so that every rank exits with the same status. */
    MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_LAND, MPI_COMM_WORLD);
    if (rank == 0)
        printf("allreduce %s: sum %ld expected %ld (size %d)\n", all_ok ? "ok" : "FAILED", sum,
               want, size);
    MPI_Finalize();
    return all_ok ? 0 : 1;
}
