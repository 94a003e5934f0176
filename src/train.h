/* train: `mpilm train JOB.yaml [--set key=value ...]`, the data-parallel
 * training loop: batches, gradient accumulation, gradient all-reduce through
 * comm/, clipping, AdamW, eval, checkpoints, metrics and progress lines.
 * Not here: the model (gpt), the collectives (comm), file formats (io).
 */
#ifndef MPILM_TRAIN_H
#define MPILM_TRAIN_H

#include "src/config.h"

#include <mpi.h>
#include <signal.h>

/* Exit status of a run stopped by SIGUSR1/SIGTERM after saving a checkpoint. */
#define TRAIN_EXIT_PREEMPTED 75

typedef struct {
    int steps_done;
    double final_loss, final_val_loss; /* val_loss < 0 when not evaluated */
    double tokens_per_s, mfu, step_ms; /* averages over steps after the first */
    double peak_gflops;                /* measured sgemm peak, all ranks */
    double bubble; /* idle share of the pipelined part of a step, mean over ranks */
    double comm_ms;    /* rank 0's mean data-parallel all-reduce time per step (timed steps) */
    double bytes_sent; /* rank 0's mean bytes sent by the gradient reducer per step */
    int preempted;
} train_result;

/* Collective over comm: the whole run described by cfg. quiet: no progress
 * lines. stop_flag (may be NULL) is set by a signal handler: the run then
 * finishes the step, saves a checkpoint and returns with res->preempted.
 * Returns 0, or -1 after one rank printed the reason. */
int train_run(MPI_Comm comm, const job_config *cfg, int quiet, volatile sig_atomic_t *stop_flag,
              train_result *res);

int train_main(int argc, char **argv, MPI_Comm comm, volatile sig_atomic_t *stop_flag);

#endif
