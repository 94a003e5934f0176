/* gptio: tensor lists between gpt/optim and io/ckpt. */
#include "src/gptio.h"

#include "src/config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NGROUPS 3
static const char *const groups[NGROUPS] = {"model", "optim/adam_m", "optim/adam_v"};

static void free_list(ckpt_tensor *t, int nt);

/* Fills t[] for ngroups buffers; each rank holds everything and takes rows
 * [R*r/p, R*(r+1)/p) when `shard`, all rows otherwise. Names are malloc'ed. */
static ckpt_tensor *tensor_list(gpt *g, float *const *bufs, int ngroups, int rank, int p,
                                int shard, int *nt) {
    int n = gpt_ntensors(g);
    ckpt_tensor *t = calloc((size_t)n * ngroups, sizeof *t);
    if (!t) return NULL;
    for (int k = 0; k < ngroups; k++)
        for (int i = 0; i < n; i++) {
            const gpt_tensor *gt = gpt_tensor_at(g, i);
            ckpt_tensor *c = &t[k * n + i];
            char name[128];
            snprintf(name, sizeof name, "%s/%s", groups[k], gt->name);
            c->name = strdup(name);
            c->ndim = gt->ndim;
            c->rows = (uint64_t)gt->shape[0];
            c->cols = gt->ndim == 2 ? (uint64_t)gt->shape[1] : 1;
            c->row0 = shard ? c->rows * (uint64_t)rank / (uint64_t)p : 0;
            c->nrows = shard ? c->rows * (uint64_t)(rank + 1) / (uint64_t)p - c->row0 : c->rows;
            c->data = bufs[k] + gt->offset + c->row0 * c->cols;
        }
    *nt = n * ngroups;
    return t;
}

ckpt_tensor *gptio_tensor_list(gpt *g, int with_optim, int *nt) {
    float *bufs[NGROUPS] = {gpt_params(g), gpt_params(g), gpt_params(g)};
    return tensor_list(g, bufs, with_optim ? NGROUPS : 1, 0, 1, 0, nt);
}

void gptio_free_list(ckpt_tensor *t, int nt) { free_list(t, nt); }

static void free_list(ckpt_tensor *t, int nt) {
    for (int i = 0; t && i < nt; i++) free((char *)t[i].name);
    free(t);
}

int gptio_save(MPI_Comm comm, const char *dir, gpt *g, const optim *o, const ckpt_meta *meta,
               const ckpt_save_opts *opts, char *err, size_t errlen) {
    int rank, p, nt = 0;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &p);
    float *bufs[NGROUPS] = {gpt_params(g), o ? o->m : NULL, o ? o->v : NULL};
    ckpt_tensor *t = tensor_list(g, bufs, o ? NGROUPS : 1, rank, p, 1, &nt);
    int rc = t ? ckpt_save(comm, dir, t, nt, meta, opts, err, errlen) : -1;
    free_list(t, nt);
    return rc;
}

int gptio_save_async(MPI_Comm comm, ckpt_async *a, const char *dir, gpt *g, const optim *o,
                     const ckpt_meta *meta, const ckpt_save_opts *opts) {
    int rank, p, nt = 0;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &p);
    float *bufs[NGROUPS] = {gpt_params(g), o ? o->m : NULL, o ? o->v : NULL};
    ckpt_tensor *t = tensor_list(g, bufs, o ? NGROUPS : 1, rank, p, 1, &nt);
    int rc = ckpt_async_start(a, dir, t, t ? nt : 0, meta, opts);
    free_list(t, nt);
    return rc;
}

int gptio_load(MPI_Comm comm, const char *file, gpt *g, optim *o, ckpt_meta *meta, char *err,
               size_t errlen) {
    int rank, p, nt = 0;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &p);
    float *bufs[NGROUPS] = {gpt_params(g), o ? o->m : NULL, o ? o->v : NULL};
    ckpt_tensor *t = tensor_list(g, bufs, o ? NGROUPS : 1, rank, p, 0, &nt);
    int rc = t ? ckpt_load(comm, file, t, nt, meta, err, errlen) : -1;
    free_list(t, nt);
    if (rc == 0 && o) o->t = (int)meta->optim_t;
    return rc;
}

int gptio_open(MPI_Comm comm, const char *path, gpt **out, ckpt_meta *meta, char *err,
               size_t errlen) {
    char file[4200];
    job_config cfg;
    *out = NULL;
    int rc = ckpt_resolve(path, file, sizeof file, err, errlen);
    ckpt_meta m0 = {0};
    if (rc == 0) rc = ckpt_read_meta(file, &m0, err, errlen);
    if (rc == 0) {
        char e2[512];
        rc = config_load_text(&cfg, file, m0.config, e2, sizeof e2);
        if (rc) snprintf(err, errlen, "%s: stored config does not parse: %s", file, e2);
    }
    free(m0.config);
    if (rc == 0 && gpt_create(&cfg.model, out) != 0) {
        snprintf(err, errlen, "%s: cannot allocate the model", file);
        rc = -1;
    }
    int all = 0;
    MPI_Allreduce(&rc, &all, 1, MPI_INT, MPI_MIN, comm);
    if (all == 0) all = gptio_load(comm, file, *out, NULL, meta, err, errlen);
    if (all) {
        gpt_destroy(*out);
        *out = NULL;
    }
    return all ? -1 : 0;
}
