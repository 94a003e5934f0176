/* gptio: tensor lists between gpt/optim and io/ckpt. */
#include "src/gptio.h"

#include "io/qckpt.h"
#include "src/config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NGROUPS 3
static const char *const groups[NGROUPS] = {"model", "optim/adam_m", "optim/adam_v"};

static void free_list(ckpt_tensor *t, int nt);

/* This rank's shard of a tensor as a selection in global coordinates. */
static void shard_sel(const gpt *g, const gpt_tensor *gt, ckpt_tensor *c) {
    const gpt_part *pt = gpt_get_part(g);
    int tp = pt->tp, r = pt->tp_rank;
    uint64_t R = (uint64_t)gt->gshape[0], Cc = c->cols;
    c->nseg = 1;
    c->seg_row0[0] = 0;
    c->seg_nrows[0] = R;
    c->col0 = 0;
    c->ncols = Cc;
    if (gt->shard == GPT_SPLIT_ROWS) {
        c->seg_row0[0] = R / tp * r;
        c->seg_nrows[0] = R / tp;
    } else if (gt->shard == GPT_SPLIT_QKV) {
        c->nseg = 3;
        for (int k = 0; k < 3; k++) {
            c->seg_row0[k] = R / 3 * k + R / 3 / tp * r;
            c->seg_nrows[k] = R / 3 / tp;
        }
    } else if (gt->shard == GPT_SPLIT_COLS) {
        c->col0 = Cc / tp * r;
        c->ncols = Cc / tp;
    }
}

/* Keeps local rows [a, b) of the selection (rows counted over the segments
 * in order), for splitting a shard among the data-parallel replicas. */
static void sel_rows(ckpt_tensor *c, uint64_t a, uint64_t b) {
    int n = 0;
    uint64_t base = 0;
    uint64_t r0[CKPT_MAX_SEG], nr[CKPT_MAX_SEG];
    for (int k = 0; k < c->nseg; k++) {
        uint64_t lo = a > base ? a : base,
                 hi = b < base + c->seg_nrows[k] ? b : base + c->seg_nrows[k];
        if (hi > lo) {
            r0[n] = c->seg_row0[k] + (lo - base);
            nr[n++] = hi - lo;
        }
        base += c->seg_nrows[k];
    }
    for (int k = 0; k < n; k++) {
        c->seg_row0[k] = r0[k];
        c->seg_nrows[k] = nr[k];
    }
    c->nseg = n;
}

/* The global tensor list (every rank, same order: collective dataset
 * creation needs it) with this rank's selections. save: a disjoint cover,
 * each piece written once (replicated tensors by TP rank 0, the tied head by
 * the first stage, shards split among the dp replicas); load: this rank's
 * whole shard. Names are malloc'ed. */
static ckpt_tensor *tensor_list(gpt *g, float *const *bufs, int ngroups, int dp_rank, int dp,
                                int save, int *nt) {
    const gpt_config *cfg = gpt_cfg(g);
    const gpt_part *pt = gpt_get_part(g);
    int n = gpt_global_ntensors(cfg);
    int *local = malloc((size_t)n * sizeof(int));
    ckpt_tensor *t = calloc((size_t)n * ngroups, sizeof *t);
    if (!t || !local) {
        free(local);
        free(t);
        return NULL;
    }
    for (int i = 0; i < n; i++)
        local[i] = -1;
    for (int i = gpt_ntensors(g) - 1; i >= 0;
         i--) /* backwards: wte itself wins over the head copy */
        local[gpt_tensor_at(g, i)->gindex] = i;
    for (int k = 0; k < ngroups; k++)
        for (int i = 0; i < n; i++) {
            ckpt_tensor *c = &t[k * n + i];
            char name[128], gname[64];
            int shape[2], nd;
            gpt_global_name(cfg, i, gname, sizeof gname, shape, &nd);
            snprintf(name, sizeof name, "%s/%s", groups[k], gname);
            c->name = strdup(name);
            c->ndim = nd;
            c->rows = (uint64_t)shape[0];
            c->cols = nd == 2 ? (uint64_t)shape[1] : 1;
            c->nseg = 0; /* nothing, unless this rank holds it */
            c->data = bufs[k];
            if (local[i] < 0) continue;
            const gpt_tensor *gt = gpt_tensor_at(g, local[i]);
            shard_sel(g, gt, c);
            c->data = bufs[k] + gt->offset;
            if (!save) continue;
            int writes = (gt->shard != GPT_REPL || pt->tp_rank == 0) && !(i == 0 && !pt->first);
            uint64_t R = 0;
            for (int s = 0; s < c->nseg; s++)
                R += c->seg_nrows[s];
            uint64_t a = writes ? R * (uint64_t)dp_rank / (uint64_t)dp : 0;
            uint64_t b = writes ? R * (uint64_t)(dp_rank + 1) / (uint64_t)dp : 0;
            sel_rows(c, a, b);
            c->data += a * c->ncols;
        }
    free(local);
    *nt = n * ngroups;
    return t;
}

ckpt_tensor *gptio_tensor_list(gpt *g, int with_optim, int *nt) {
    float *bufs[NGROUPS] = {gpt_params(g), gpt_params(g), gpt_params(g)};
    return tensor_list(g, bufs, with_optim ? NGROUPS : 1, 0, 1, 0, nt);
}

void gptio_free_list(ckpt_tensor *t, int nt) {
    free_list(t, nt);
}

static void free_list(ckpt_tensor *t, int nt) {
    for (int i = 0; t && i < nt; i++)
        free((char *)t[i].name);
    free(t);
}

/* The model's list plus one row of each of the nrs rank states: pads[k]
 * gets the zero-padded copy of row k, freed by the caller after the save. */
static ckpt_tensor *save_list(gpt *g, const optim *o, const gptio_rank_state *rs, int nrs,
                              int dp_rank, int dp, float **pads, int *nt) {
    float *bufs[NGROUPS] = {gpt_params(g), o ? o->m : NULL, o ? o->v : NULL};
    ckpt_tensor *t = tensor_list(g, bufs, o ? NGROUPS : 1, dp_rank, dp, 1, nt);
    for (int k = 0; k < nrs; k++)
        pads[k] = NULL;
    if (!t || nrs == 0) return t;
    ckpt_tensor *t2 = realloc(t, (size_t)(*nt + nrs) * sizeof *t);
    if (!t2) {
        free_list(t, *nt);
        return NULL;
    }
    for (int k = 0; k < nrs; k++) {
        const gptio_rank_state *r = &rs[k];
        pads[k] = r->len <= r->maxlen ? calloc(r->maxlen + 1, sizeof(float)) : NULL;
        char *name = strdup(r->name);
        if (!pads[k] || !name) {
            free(name);
            free_list(t2, *nt);
            for (int j = 0; j <= k; j++)
                free(pads[j]), pads[j] = NULL;
            return NULL;
        }
        memcpy(pads[k], r->data, r->len * sizeof(float));
        t2[(*nt)++] = (ckpt_tensor){.name = name,
                                    .ndim = 2,
                                    .rows = (uint64_t)r->rows,
                                    .cols = r->maxlen,
                                    .row0 = (uint64_t)r->row,
                                    .nrows = 1,
                                    .data = pads[k]};
    }
    return t2;
}

static void free_pads(float **pads, int nrs) {
    for (int k = 0; k < nrs; k++)
        free(pads[k]);
}

int gptio_save(MPI_Comm comm, int dp_rank, int dp, const char *dir, gpt *g, const optim *o,
               const gptio_rank_state *rs, int nrs, const ckpt_meta *meta,
               const ckpt_save_opts *opts, char *err, size_t errlen) {
    int nt = 0;
    float *pads[GPTIO_MAX_RANK_STATES];
    if (nrs > GPTIO_MAX_RANK_STATES) return -1;
    ckpt_tensor *t = save_list(g, o, rs, nrs, dp_rank, dp, pads, &nt);
    int rc = t ? ckpt_save(comm, dir, t, nt, meta, opts, err, errlen) : -1;
    if (!t) snprintf(err, errlen, "out of memory for the checkpoint's tensor list");
    free_list(t, nt);
    free_pads(pads, nrs);
    return rc;
}

int gptio_save_async(ckpt_async *a, int dp_rank, int dp, const char *dir, gpt *g, const optim *o,
                     const gptio_rank_state *rs, int nrs, const ckpt_meta *meta,
                     const ckpt_save_opts *opts) {
    int nt = 0;
    float *pads[GPTIO_MAX_RANK_STATES];
    if (nrs > GPTIO_MAX_RANK_STATES) return -1;
    ckpt_tensor *t = save_list(g, o, rs, nrs, dp_rank, dp, pads, &nt);
    int rc = ckpt_async_start(a, dir, t, t ? nt : 0, meta, opts); /* copies the data */
    free_list(t, nt);
    free_pads(pads, nrs);
    return rc;
}

int gptio_load_rank_state(MPI_Comm comm, const char *file, gptio_rank_state *rs, char *err,
                          size_t errlen) {
    int rank, ok = 0;
    MPI_Comm_rank(comm, &rank);
    ckpt_tensor t = {.name = rs->name,
                     .ndim = 2,
                     .rows = (uint64_t)rs->rows,
                     .cols = rs->maxlen,
                     .row0 = (uint64_t)rs->row,
                     .nrows = 1};
    if (rank == 0) { /* present with this shape? (the reason goes to err) */
        char *msg = NULL;
        size_t ml = 0;
        FILE *m = open_memstream(&msg, &ml);
        ok = m && ckpt_check_shapes(file, &t, 1, m) == 0;
        if (m) fclose(m);
        if (!ok) snprintf(err, errlen, "%s", msg && *msg ? msg : "cannot check the file");
        size_t n = strlen(err);
        if (n && err[n - 1] == '\n') err[n - 1] = 0;
        free(msg);
    }
    MPI_Bcast(&ok, 1, MPI_INT, 0, comm);
    if (!ok) return 0;
    float *row = calloc(rs->maxlen + 1, sizeof(float));
    int bad = !row, all = 0;
    MPI_Allreduce(&bad, &all, 1, MPI_INT, MPI_MAX, comm);
    if (all) {
        free(row);
        snprintf(err, errlen, "out of memory for %s", rs->name);
        return -1;
    }
    t.data = row;
    ckpt_meta m = {0};
    int rc = ckpt_load(comm, file, &t, 1, &m, err, errlen);
    free(m.config);
    if (rc == 0) memcpy(rs->data, row, rs->len * sizeof(float));
    free(row);
    return rc ? -1 : 1;
}

int gptio_load(MPI_Comm comm, const char *file, gpt *g, optim *o, ckpt_meta *meta, char *err,
               size_t errlen) {
    int nt = 0;
    float *bufs[NGROUPS] = {gpt_params(g), o ? o->m : NULL, o ? o->v : NULL};
    ckpt_tensor *t = tensor_list(g, bufs, o ? NGROUPS : 1, 0, 1, 0, &nt);
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
    /* a quantized checkpoint (root `quant` attribute) fills the float model by
     * dequantizing its /qmodel tensors (io/qckpt.h) */
    int quant = all == 0 ? qckpt_is_quantized(file) : 0, qall = 0;
    MPI_Allreduce(&quant, &qall, 1, MPI_INT, MPI_MAX, comm);
    if (all == 0 && qall > 0) {
        int nt = 0;
        ckpt_tensor *t = gptio_tensor_list(*out, 0, &nt);
        all = t ? qckpt_load_model(comm, file, t, nt, meta, err, errlen) : -1;
        gptio_free_list(t, nt);
    } else if (all == 0)
        all = gptio_load(comm, file, *out, NULL, meta, err, errlen);
    if (all) {
        gpt_destroy(*out);
        *out = NULL;
    }
    return all ? -1 : 0;
}
