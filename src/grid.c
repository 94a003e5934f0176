/* grid: process grid communicators and the rank map. */
#include "src/grid.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int grid_create(MPI_Comm comm, int tp, int pp, grid *g) {
    memset(g, 0, sizeof *g);
    MPI_Comm_size(comm, &g->world);
    MPI_Comm_rank(comm, &g->rank);
    g->tp = tp;
    g->pp = pp;
    g->dp = g->world / (tp * pp);
    g->tp_rank = g->rank % tp;
    g->dp_rank = (g->rank / tp) % g->dp;
    g->pp_rank = g->rank / (tp * g->dp);
    int rc = MPI_Comm_split(comm, g->rank / tp, g->tp_rank, &g->tp_comm);
    rc |= MPI_Comm_split(comm, g->tp_rank + tp * g->pp_rank, g->dp_rank, &g->dp_comm);
    rc |= MPI_Comm_split(comm, g->tp_rank + tp * g->dp_rank, g->pp_rank, &g->pp_comm);
    rc |= MPI_Comm_split(comm, g->dp_rank, g->tp_rank + tp * g->pp_rank, &g->mp_comm);
    int ends = pp > 1 && (g->pp_rank == 0 || g->pp_rank == pp - 1);
    rc |= MPI_Comm_split(comm, ends ? g->tp_rank + tp * g->dp_rank : MPI_UNDEFINED, g->pp_rank,
                         &g->emb_comm);
    return rc == MPI_SUCCESS ? 0 : -1;
}

void grid_destroy(grid *g) {
    MPI_Comm *c[] = {&g->tp_comm, &g->dp_comm, &g->pp_comm, &g->mp_comm, &g->emb_comm};
    for (size_t i = 0; i < sizeof c / sizeof c[0]; i++)
        if (*c[i] != MPI_COMM_NULL && *c[i] != 0) MPI_Comm_free(c[i]);
}

void grid_print_map(const grid *g, MPI_Comm comm, FILE *f) {
    char host[64] = "";
    gethostname(host, sizeof host - 1);
    char *all = g->rank == 0 ? malloc((size_t)g->world * sizeof host) : NULL;
    MPI_Gather(host, sizeof host, MPI_CHAR, all, sizeof host, MPI_CHAR, 0, comm);
    if (g->rank == 0 && all) {
        fprintf(f, "rank map (world %d = dp %d x pp %d x tp %d):", g->world, g->dp, g->pp, g->tp);
        for (int r = 0; r < g->world; r++) {
            int t = r % g->tp, d = (r / g->tp) % g->dp, p = r / (g->tp * g->dp);
            fprintf(f, "%s rank %d -> dp %d, pp %d, tp %d, %s", r % 4 ? "" : "\n ", r, d, p, t,
                    all + (size_t)r * sizeof host);
            if (r % 4 != 3 && r != g->world - 1) fputc(';', f);
        }
        fputc('\n', f);
    }
    free(all);
}

void grid_stage_layers(int n_layer, int pp, int s, int *l0, int *l1) {
    *l0 = n_layer / pp * s;
    *l1 = *l0 + n_layer / pp;
}
