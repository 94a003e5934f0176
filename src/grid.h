/* grid: the 3-D process grid world = dp x pp x tp, tensor-parallel ranks
 * adjacent (so a TP group stays inside a node), then data, then pipeline:
 *   rank = tp_rank + tp * (dp_rank + dp * pp_rank)
 * and one communicator per group (MPI_Comm_split).
 */
#ifndef MPILM_GRID_H
#define MPILM_GRID_H

#include <mpi.h>
#include <stdio.h>

typedef struct {
    int world, rank, dp, tp, pp, dp_rank, tp_rank, pp_rank;
    MPI_Comm tp_comm;  /* same dp, pp: the Megatron all-reduces */
    MPI_Comm dp_comm;  /* same tp, pp: gradient all-reduce */
    MPI_Comm pp_comm;  /* same dp, tp: activations between stages (rank = stage) */
    MPI_Comm mp_comm;  /* same dp: one whole model (gradient norm, loss) */
    MPI_Comm emb_comm; /* first and last stage of a pipeline (tied embedding); NULL if pp = 1 */
} grid;

/* Collective. world must be divisible by tp * pp (checked by the config). */
int grid_create(MPI_Comm comm, int tp, int pp, grid *g);
void grid_destroy(grid *g);
/* Collective: rank 0 prints "rank -> dp, pp, tp, host" for every rank. */
void grid_print_map(const grid *g, MPI_Comm comm, FILE *f);
/* Layers [l0, l1) of pipeline stage s: contiguous, equal counts. */
void grid_stage_layers(int n_layer, int pp, int s, int *l0, int *l1);

#endif
