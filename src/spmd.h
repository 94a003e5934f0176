/* spmd: what every MPI program of mpilm shares: the MPI check macro, agreeing
 * on an error across ranks (so one failing rank never leaves the others
 * blocked in a collective), timers, and the per-rank thread count.
 */
#ifndef MPILM_SPMD_H
#define MPILM_SPMD_H

#include <mpi.h>
#include <stdio.h>

/* Collective: returns 0 when rc == 0 on every rank of comm, else -1. The
 * lowest failing rank prints "PROG: MSG" to stderr, so the user sees one
 * message, from rank 0 when every rank failed the same way. */
int spmd_agree(MPI_Comm comm, int rc, const char *prog, const char *msg);

double spmd_now(void); /* seconds, monotonic */

/* Threads per rank: OMP_NUM_THREADS if set, else the cores this process may
 * use divided by the ranks on its node. Collective over comm. */
int spmd_threads_per_rank(MPI_Comm comm);

#endif
