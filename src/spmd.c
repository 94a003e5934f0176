/* spmd: error agreement, timers, thread placement. */
#include "src/spmd.h"

#include <limits.h>
#include <sched.h>
#include <stdlib.h>
#include <time.h>

int spmd_agree(MPI_Comm comm, int rc, const char *prog, const char *msg) {
    int rank, first, me;
    MPI_Comm_rank(comm, &rank);
    me = rc ? rank : INT_MAX;
    if (MPI_Allreduce(&me, &first, 1, MPI_INT, MPI_MIN, comm) != MPI_SUCCESS) return -1;
    if (first == INT_MAX) return 0;
    if (rank == first) {
        fprintf(stderr, "%s: %s\n", prog, msg && *msg ? msg : "failed");
        fflush(stderr);
    }
    return -1;
}

double spmd_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

int spmd_threads_per_rank(MPI_Comm comm) {
    MPI_Comm node;
    int local = 1;
    if (MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node) == MPI_SUCCESS) {
        MPI_Comm_size(node, &local);
        MPI_Comm_free(&node);
    }
    const char *env = getenv("OMP_NUM_THREADS");
    if (env && atoi(env) > 0) return atoi(env);
    cpu_set_t set;
    int cores = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : 1;
    int t = cores / local;
    return t > 0 ? t : 1;
}
