/* train: the SPMD training loop over the dp x pp x tp grid. */
#include "src/train.h"

#include "comm/allreduce.h"
#include "comm/grad.h"
#include "io/metrics.h"
#include "io/tokfile.h"
#include "kernels/kern.h"
#include "src/data.h"
#include "src/gpt.h"
#include "src/gptio.h"
#include "src/grid.h"
#include "src/optim.h"
#include "src/pipe.h"
#include "src/spmd.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define PROG "mpilm train"

typedef struct {
    MPI_Comm comm;
    int rank, world, dp, m; /* m: micro-batches per step per pipeline */
    grid grid;
    pipe_ctx *pipe;
    const job_config *cfg;
    gpt *g;
    optim opt;
    comm_grad *red; /* data-parallel gradient reducer (comm/grad.h) */
    /* comm.compression.payload update and the reducer compresses: from the
     * first compressed step on, each rank steps AdamW on its own gradient
     * (its own moments) and the ranks sum their parameter changes */
    int local_opt;
    tokfile train, val;
    metrics met;
    int have_met;
    ckpt_async *async; /* background checkpoint writer (checkpoint.async) */
    /* dedicated parameter servers (comm.ps_ranks): the gradients are summed
     * over red_comm (workers, then the servers), which follow the codes sent on
     * ctl (see serve_gradients) */
    int servers, preempted;
    MPI_Comm red_comm, ctl;
} trainer;

/* Codes the workers broadcast to the servers: a step number (>= 0: reduce
 * that step's gradients), or one of these. */
enum { CTL_CREATE = -1, CTL_STOP = -2, CTL_STOP_PREEMPTED = -3 };

/* comm.compression.payload: auto is the gradient for powersgd (its low-rank
 * structure is what PowerSGD keeps; AdamW's per-coordinate scaling of the
 * change removes it) and the update otherwise (AdamW on summed sparse or
 * coarsely quantized gradients overshoots; see README). */
static int payload_update(const job_config *c) {
    const char *t = c->comm.compression.type, *p = c->comm.compression.payload;
    return strcmp(t, "none") &&
           (!strcmp(p, "update") || (!strcmp(p, "auto") && strcmp(t, "powersgd")));
}

static void ctl_send(trainer *t, int code) {
    if (t->servers) MPI_Bcast(&code, 1, MPI_INT, 0, t->ctl);
}

static void fmt_eta(char *b, size_t n, double s) {
    if (!(s >= 0) || s > 1e7) s = 0;
    long t = (long)(s + 0.5);
    snprintf(b, n, "%ld:%02ld:%02ld", t / 3600, t / 60 % 60, t % 60);
}

static void fmt_bytes(char *b, size_t n, double v) {
    const char *u[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int i = 0;
    while (v >= 1024 && i < 4)
        v /= 1024, i++;
    snprintf(b, n, "%.1f %s", v, u[i]);
}

/* Mean validation loss over eval_batches micro-batches, spread over the
 * data-parallel ranks, each through its pipeline. */
static double evaluate(trainer *t) {
    const job_config *c = t->cfg;
    int B = c->train.micro_batch, T = c->model.block_size;
    double sum = pipe_eval(t->pipe, &t->val, c->train.eval_batches), all = 0;
    MPI_Allreduce(&sum, &all, 1, MPI_DOUBLE, MPI_SUM, t->comm);
    return all / ((double)c->train.eval_batches * B * T);
}

/* Waits for a background save; reports it. Collective. */
static int save_wait(trainer *t) {
    char err[1024] = "";
    double secs = 0;
    int rc = ckpt_async_wait(t->async, &secs, err, sizeof err);
    if (spmd_agree(t->comm, rc, PROG, err)) {
        if (rc == CKPT_ERR_FATAL) MPI_Abort(t->comm, 1); /* see io/ckpt.h */
        return -1;
    }
    if (t->rank == 0 && secs > 0) printf("checkpoint: background save finished (%.2f s)\n", secs);
    return 0;
}

/* What each rank keeps for exact resume, one row per world rank:
 * COMM_STATE the gradient compressors' state (comm_grad_state) and, with
 * payload update, LOCAL_ADAM this rank's AdamW moments (m, then v), which
 * differ between the dp ranks once compression started. */
#define COMM_STATE "comm/compressor_state"
#define LOCAL_ADAM "comm/local_adam"
enum { ST_COMM, ST_ADAM, NSTATES };

/* rs[ST_*] := this rank's rows (data malloc'ed; maxlen 0 when no rank has
 * that state). Collective. */
static int rank_states(trainer *t, gptio_rank_state *rs) {
    uint64_t len[NSTATES] = {comm_grad_state(t->red, NULL), t->local_opt ? 2 * t->opt.n : 0};
    uint64_t mx[NSTATES];
    const char *names[NSTATES] = {COMM_STATE, LOCAL_ADAM};
    MPI_Allreduce(len, mx, NSTATES, MPI_UINT64_T, MPI_MAX, t->comm);
    int bad = 0;
    for (int k = 0; k < NSTATES; k++) {
        rs[k] = (gptio_rank_state){
            .name = names[k], .len = len[k], .maxlen = mx[k], .row = t->rank, .rows = t->world};
        if (mx[k]) bad |= !(rs[k].data = malloc((len[k] + 1) * sizeof(float)));
    }
    if (!bad && rs[ST_COMM].data) comm_grad_state(t->red, rs[ST_COMM].data);
    if (!bad && len[ST_ADAM]) {
        memcpy(rs[ST_ADAM].data, t->opt.m, t->opt.n * sizeof(float));
        memcpy(rs[ST_ADAM].data + t->opt.n, t->opt.v, t->opt.n * sizeof(float));
    }
    return bad ? -1 : 0;
}

/* out := the states present (maxlen > 0); returns their count. */
static int present_states(const gptio_rank_state *rs, gptio_rank_state *out) {
    int n = 0;
    for (int k = 0; k < NSTATES; k++)
        if (rs[k].maxlen) out[n++] = rs[k];
    return n;
}

static void free_states(gptio_rank_state *rs) {
    for (int k = 0; k < NSTATES; k++)
        free(rs[k].data);
}

/* Restores the per-rank states from FILE when it was written by the same
 * layout with the same compression and buckets (saved is its config);
 * otherwise error feedback starts from zero and every rank starts from the
 * checkpoint's AdamW moments (their dp mean), which is said. Collective. */
static int resume_rank_states(trainer *t, const char *file, const ckpt_meta *m,
                              const job_config *saved) {
    const job_config *c = t->cfg;
    gptio_rank_state rs[NSTATES];
    if (rank_states(t, rs)) {
        free_states(rs);
        return spmd_agree(t->comm, -1, PROG, "out of memory");
    }
    if (!rs[ST_COMM].maxlen && !rs[ST_ADAM].maxlen) return 0; /* nothing to restore */
    char why[1024] = "";
    const char *diff = NULL;
    if (m->layout[0] != t->dp || m->layout[1] != t->grid.tp || m->layout[2] != t->grid.pp)
        diff = "the parallel layout";
    else if (!saved)
        diff = "the stored config";
    else if (strcmp(saved->comm.compression.type, c->comm.compression.type) ||
             payload_update(saved) != payload_update(c) ||
             saved->comm.compression.bits != c->comm.compression.bits ||
             saved->comm.compression.rank != c->comm.compression.rank ||
             saved->comm.compression.ratio != c->comm.compression.ratio ||
             saved->comm.compression.min_ratio != c->comm.compression.min_ratio ||
             saved->comm.compression.error_feedback != c->comm.compression.error_feedback)
        diff = "comm.compression";
    else if (saved->comm.bucket_mb != c->comm.bucket_mb)
        diff = "comm.bucket_mb";
    int got = 1;
    for (int k = 0; k < NSTATES && !diff && got == 1; k++) {
        if (!rs[k].maxlen) continue;
        got = gptio_load_rank_state(t->comm, file, &rs[k], why, sizeof why);
        if (got == 1 && k == ST_COMM)
            got = comm_grad_set_state(t->red, rs[k].data, rs[k].len) ? -1 : 1;
        if (got == 1 && k == ST_ADAM) {
            memcpy(t->opt.m, rs[k].data, t->opt.n * sizeof(float));
            memcpy(t->opt.v, rs[k].data + t->opt.n, t->opt.n * sizeof(float));
        }
    }
    uint64_t n = rs[ST_COMM].maxlen;
    free_states(rs);
    if (got < 0)
        return spmd_agree(t->comm, -1, PROG, why[0] ? why : "cannot restore the compressor state");
    if (t->rank == 0) {
        if (!diff && got == 1)
            printf("resumed the gradient compressors' error feedback (%llu values per rank)%s\n",
                   (unsigned long long)n, t->local_opt ? " and each rank's AdamW moments" : "");
        else
            printf("note: gradient compressor state not restored (%s%s): error feedback starts "
                   "from zero%s\n",
                   diff ? diff : why, diff ? " differs from the checkpoint's" : "",
                   t->local_opt ? ", every rank from the checkpoint's AdamW moments" : "");
    }
    return 0;
}

/* With payload update the moments differ between the dp ranks once a
 * compressed step was done: the checkpoint's /optim then holds their mean
 * (what another layout resumes from), in *avg (malloc'ed; NULL when the
 * moments are still the same everywhere). Collective. */
static int mean_moments(trainer *t, int step, optim *avg) {
    *avg = t->opt;
    avg->m = avg->v = NULL;
    if (!t->local_opt || !comm_grad_compresses(t->red, step - 1)) return 0;
    size_t n = t->opt.n;
    float *mv = malloc(2 * n * sizeof(float) + 1);
    int bad = !mv || 2 * n > INT_MAX;
    MPI_Allreduce(MPI_IN_PLACE, &bad, 1, MPI_INT, MPI_MAX, t->grid.dp_comm);
    if (bad) {
        free(mv);
        return -1;
    }
    memcpy(mv, t->opt.m, n * sizeof(float));
    memcpy(mv + n, t->opt.v, n * sizeof(float));
    MPI_Allreduce(MPI_IN_PLACE, mv, (int)(2 * n), MPI_FLOAT, MPI_SUM, t->grid.dp_comm);
    for (size_t i = 0; i < 2 * n; i++)
        mv[i] /= (float)t->dp;
    avg->m = mv;
    avg->v = mv + n;
    return 0;
}

static int save(trainer *t, int step, long long tokens) {
    const job_config *c = t->cfg;
    char err[1024] = "";
    char *yaml = config_to_yaml(c);
    ckpt_meta m = {.step = step,
                   .tokens_seen = tokens,
                   .layout = {t->dp, t->grid.tp, t->grid.pp},
                   .optim_t = t->opt.t,
                   .seed = c->train.seed,
                   .config = yaml};
    ckpt_save_opts so = {c->checkpoint.keep_last, c->checkpoint.keep_every, -1, -1};
    /* MPILM_FAULT=ckpt_kill:RANK:N kills RANK after N datasets of a save
     * (fault-injection tests of the atomic commit) */
    const char *fault = getenv("MPILM_FAULT");
    if (fault && sscanf(fault, "ckpt_kill:%d:%d", &so.fault_rank, &so.fault_after) != 2)
        so.fault_rank = so.fault_after = -1;
    double t0 = spmd_now();
    gptio_rank_state rs[NSTATES];
    optim avg;
    int rc = rank_states(t, rs);
    rc |= mean_moments(t, step, &avg); /* collective: called whatever rc is */
    if (spmd_agree(t->comm, rc, PROG, "out of memory for the per-rank state")) {
        free(yaml);
        free_states(rs);
        return -1;
    }
    const optim *o = avg.m ? &avg : &t->opt;
    gptio_rank_state put[NSTATES];
    int nrs = present_states(rs, put);
    if (t->async) {
        if (save_wait(t)) {
            free(yaml);
            free_states(rs);
            free(avg.m);
            return -1;
        }
        rc = gptio_save_async(t->async, t->grid.dp_rank, t->dp, c->checkpoint.dir, t->g, o, put,
                              nrs, &m, &so);
        snprintf(err, sizeof err, "cannot start the background checkpoint writer");
    } else
        rc = gptio_save(t->comm, t->grid.dp_rank, t->dp, c->checkpoint.dir, t->g, o, put, nrs, &m,
                        &so, err, sizeof err);
    free(yaml);
    free_states(rs);
    free(avg.m);
    if (spmd_agree(t->comm, rc ? -1 : 0, PROG, err)) {
        if (rc == CKPT_ERR_FATAL) MPI_Abort(t->comm, 1); /* see io/ckpt.h */
        return -1;
    }
    if (t->rank == 0)
        printf("checkpoint: %s/step-%08d (%s%.3f s)\n", c->checkpoint.dir, step,
               t->async ? "snapshot; writing in the background; training blocked " : "",
               spmd_now() - t0);
    return 0;
}

/* Resumes from checkpoint.dir/latest when asked and present: returns the
 * step to start from (0 for a fresh run) or -1 on error. */
static int maybe_resume(trainer *t) {
    const job_config *c = t->cfg;
    if (!c->checkpoint.dir[0] || strcmp(c->checkpoint.resume, "auto") != 0) return 0;
    if (t->rank == 0) ckpt_clean_tmp(c->checkpoint.dir);
    char latest[CFG_STR + 16], file[4200], err[1024] = "";
    snprintf(latest, sizeof latest, "%s/latest", c->checkpoint.dir);
    struct stat st;
    int have = stat(latest, &st) == 0, any = 0;
    MPI_Allreduce(&have, &any, 1, MPI_INT, MPI_MAX, t->comm);
    if (!any) return 0;
    ckpt_meta m = {0};
    int rc = ckpt_resolve(c->checkpoint.dir, file, sizeof file, err, sizeof err);
    if (spmd_agree(t->comm, rc, PROG, err)) return -1;
    rc = gptio_load(t->comm, file, t->g, &t->opt, &m, err, sizeof err);
    if (spmd_agree(t->comm, rc, PROG, err)) {
        free(m.config);
        return -1;
    }
    if (t->rank == 0)
        printf("resumed from %s at step %lld (written with layout dp=%d tp=%d pp=%d)\n", file,
               m.step, m.layout[0], m.layout[1], m.layout[2]);
    job_config saved;
    int have_cfg = m.config && config_load_text(&saved, file, m.config, err, sizeof err) == 0;
    free(m.config);
    if (resume_rank_states(t, file, &m, have_cfg ? &saved : NULL)) return -1;
    return (int)m.step;
}

/* gpt's gradient-ready hook: hands finished tensors to the reducer, whose
 * thread all-reduces a bucket while backward goes on (comm.overlap). */
static void grads_final(void *red, int t0, int t1) {
    comm_grad_ready(red, t0, t1);
}

/* This part's tensors for the gradient reducer (calloc'ed; NULL: no memory). */
static comm_grad_tensor *grad_tensors(gpt *g, int *nt) {
    *nt = gpt_ntensors(g);
    comm_grad_tensor *gt = calloc((size_t)*nt + 1, sizeof *gt);
    for (int i = 0; gt && i < *nt; i++) {
        const gpt_tensor *e = gpt_tensor_at(g, i);
        gt[i] = (comm_grad_tensor){
            .numel = e->numel, .ndim = e->ndim, .shape = {e->shape[0], e->shape[1]}};
    }
    return gt;
}

static comm_grad_opts grad_opts(const job_config *c, FILE *log) {
    return (comm_grad_opts){.strategy = c->comm.strategy,
                            .bw_threshold = c->comm.bw_threshold,
                            .lat_threshold = c->comm.lat_threshold,
                            .fallback = c->comm.fallback,
                            .bucket_mb = c->comm.bucket_mb,
                            /* a change needs the whole gradient first */
                            .overlap = c->comm.overlap && !payload_update(c),
                            .ps_ranks = c->comm.ps_ranks,
                            .cx_type = c->comm.compression.type,
                            .ratio = c->comm.compression.ratio,
                            .min_ratio = c->comm.compression.min_ratio,
                            .bits = c->comm.compression.bits,
                            .rank = c->comm.compression.rank,
                            .error_feedback = c->comm.compression.error_feedback,
                            .warmup_steps = c->comm.compression.warmup_steps,
                            .seed = (uint64_t)c->train.seed,
                            .log = log};
}

/* comm: the training ranks; red/ctl: see trainer (MPI_COMM_NULL: no
 * dedicated servers). */
static int setup(trainer *t, MPI_Comm comm, MPI_Comm red, MPI_Comm ctl, const job_config *c,
                 int quiet) {
    char err[1024] = "", path[CFG_STR + 16];
    memset(t, 0, sizeof *t);
    t->comm = comm;
    t->cfg = c;
    t->red_comm = red;
    t->ctl = ctl;
    t->servers = red != MPI_COMM_NULL ? c->comm.ps_ranks : 0;
    MPI_Comm_rank(comm, &t->rank);
    MPI_Comm_size(comm, &t->world);
    int rc = config_check_layout(c, t->world + t->servers, err, sizeof err);
    if (spmd_agree(comm, rc, PROG, err)) return -1;
    int tp = c->parallel.tp, pp = c->parallel.pp;
    rc = grid_create(comm, tp, pp, &t->grid);
    if (spmd_agree(comm, rc, PROG, "cannot create the process grid communicators")) return -1;
    t->dp = t->grid.dp;
    kern_set_threads(spmd_threads_per_rank(comm));
    if (!quiet) grid_print_map(&t->grid, comm, stdout);

    int B = c->train.micro_batch, T = c->model.block_size;
    t->m = c->train.global_batch / (B * t->dp);
    snprintf(path, sizeof path, "%s/train.tok", c->data.dir);
    rc = tokfile_open(path, &t->train, err, sizeof err);
    if (!rc) {
        snprintf(path, sizeof path, "%s/val.tok", c->data.dir);
        rc = tokfile_open(path, &t->val, err, sizeof err);
    }
    if (!rc && t->train.vocab_size > (uint32_t)c->model.vocab_size) {
        snprintf(err, sizeof err, "%s: token vocabulary %u is larger than model.vocab_size %d",
                 path, t->train.vocab_size, c->model.vocab_size);
        rc = -1;
    }
    if (!rc && data_num_batches(&t->train, c->train.global_batch, T) == 0) {
        snprintf(err, sizeof err,
                 "%s/train.tok: %llu tokens, fewer than one global batch (%d rows x %d + 1)",
                 c->data.dir, (unsigned long long)t->train.n_tokens, c->train.global_batch, T);
        rc = -1;
    }
    if (!rc && data_num_batches(&t->val, B, T) == 0) {
        snprintf(err, sizeof err,
                 "%s/val.tok: %llu tokens, fewer than one micro-batch (%d rows x %d + 1)",
                 c->data.dir, (unsigned long long)t->val.n_tokens, B, T);
        rc = -1;
    }
    if (spmd_agree(comm, rc, PROG, err)) return -1;

    gpt_part part = {.tp = tp,
                     .tp_rank = t->grid.tp_rank,
                     .tp_comm = tp > 1 ? t->grid.tp_comm : MPI_COMM_NULL,
                     .first = t->grid.pp_rank == 0,
                     .last = t->grid.pp_rank == pp - 1,
                     .nslots = pipe_slots(&t->grid, t->m),
                     .recompute = c->train.recompute};
    grid_stage_layers(c->model.n_layer, pp, t->grid.pp_rank, &part.layer0, &part.layer1);
    rc = gpt_create_part(&c->model, &part, &t->g) ||
         optim_init(&t->opt, gpt_nparams(t->g), c->train.beta1, c->train.beta2, c->train.eps,
                    c->train.weight_decay) ||
         gpt_reserve(t->g, B, T) || pipe_create(t->g, &t->grid, t->m, B, T, &t->pipe);
    if (spmd_agree(comm, rc, PROG, "out of memory for the model")) return -1;
    gpt_init_weights(t->g, (uint64_t)c->train.seed);

    /* gradient reducer: buckets follow the tensors of this rank's part */
    int nt = 0;
    comm_grad_tensor *gt = grad_tensors(t->g, &nt);
    comm_grad_opts go = grad_opts(c, t->rank == 0 ? stdout : NULL);
    rc = !gt;
    ctl_send(t, CTL_CREATE);
    if (!rc)
        rc = comm_grad_create(t->servers ? t->red_comm : t->grid.dp_comm, &go, gt, nt, &t->red);
    free(gt);
    snprintf(err, sizeof err,
             "comm.strategy %s, comm.compression.type %s: cannot set up the "
             "gradient all-reduce",
             c->comm.strategy, c->comm.compression.type);
    if (spmd_agree(comm, rc, PROG, err)) return -1;
    if (comm_grad_overlaps(t->red)) gpt_set_grad_hook(t->g, grads_final, t->red);
    t->local_opt = payload_update(c) && comm_grad_compresses(t->red, INT_MAX);
    if (c->checkpoint.async && c->checkpoint.dir[0]) {
        int level;
        MPI_Query_thread(&level);
        rc = level < MPI_THREAD_MULTIPLE || ckpt_async_create(comm, &t->async);
        snprintf(err, sizeof err,
                 "checkpoint.async needs MPI_THREAD_MULTIPLE, which this MPI "
                 "library did not provide");
        if (spmd_agree(comm, rc, PROG, err)) return -1;
    }
    if (t->rank == 0) {
        rc = metrics_open(&t->met, c->log.dir, 1, err, sizeof err);
        t->have_met = rc == 0;
    }
    return spmd_agree(comm, rc, PROG, err);
}

/* Rank 0 prints every rank's memory: parameters, gradients, optimizer
 * state, activations (and what recomputation saves). Collective. */
static void print_memory(trainer *t) {
    const job_config *c = t->cfg;
    int B = c->train.micro_batch, T = c->model.block_size;
    double mine[5] = {(double)gpt_nparams(t->g) * 4, (double)gpt_nparams(t->g) * 4,
                      (double)gpt_nparams(t->g) * 8,
                      (double)gpt_part_activation_bytes(t->g, B, T, c->train.recompute),
                      (double)gpt_part_activation_bytes(t->g, B, T, 0)};
    double *all = t->rank == 0 ? malloc(sizeof mine * (size_t)t->world) : NULL;
    MPI_Gather(mine, 5, MPI_DOUBLE, all, 5, MPI_DOUBLE, 0, t->comm);
    if (!all) return;
    printf("memory per rank:  params      grads  optimizer  activations%s\n",
           c->train.recompute ? " (recompute on; without it)" : "");
    for (int r = 0; r < t->world; r++) {
        char b[5][32];
        for (int k = 0; k < 5; k++)
            fmt_bytes(b[k], sizeof b[k], all[5 * r + k]);
        printf("  rank %-3d %10s %10s %10s %12s", r, b[0], b[1], b[2], b[3]);
        if (c->train.recompute)
            printf(" (%s; saves %.0f%%)", b[4], 100.0 * (1 - all[5 * r + 3] / all[5 * r + 4]));
        printf("\n");
    }
    free(all);
}

/* Gradient of the tied embedding: summed between first and last stage. */
static void sum_tied_embedding(trainer *t) {
    if (t->grid.emb_comm == MPI_COMM_NULL) return; /* pp = 1, or a middle stage */
    int i = t->grid.pp_rank == 0 ? 0 : gpt_head_tensor(t->g);
    const gpt_tensor *e = gpt_tensor_at(t->g, i);
    MPI_Allreduce(MPI_IN_PLACE, gpt_grads(t->g) + e->offset, (int)e->numel, MPI_FLOAT, MPI_SUM,
                  t->grid.emb_comm);
}

/* Global gradient norm: every parameter counted exactly once over tp and pp
 * (gradients are equal over dp after the all-reduce). */
static double grad_norm(trainer *t) {
    double s = 0, all = 0;
    const float *gr = gpt_grads(t->g);
    for (int i = 0; i < gpt_ntensors(t->g); i++) {
        const gpt_tensor *e = gpt_tensor_at(t->g, i);
        if (e->in_norm) s += kern_sumsq(gr + e->offset, e->numel);
    }
    MPI_Allreduce(&s, &all, 1, MPI_DOUBLE, MPI_SUM, t->grid.mp_comm);
    return sqrt(all);
}

static void teardown(trainer *t) {
    ctl_send(t, t->preempted ? CTL_STOP_PREEMPTED : CTL_STOP);
    ckpt_async_destroy(t->async);
    pipe_destroy(t->pipe);
    if (t->have_met) metrics_close(&t->met);
    comm_grad_destroy(t->red);
    optim_free(&t->opt);
    gpt_destroy(t->g);
    tokfile_close(&t->train);
    tokfile_close(&t->val);
    grid_destroy(&t->grid);
}

/* A dedicated parameter server: builds the reducer the workers build and
 * takes part in every step's gradient sum until told to stop. */
static int serve_gradients(MPI_Comm red, MPI_Comm ctl, const job_config *c, train_result *res) {
    gpt *g = NULL;
    comm_grad *cg = NULL;
    int rc = 0, nt = 0;
    for (;;) {
        int code;
        MPI_Bcast(&code, 1, MPI_INT, 0, ctl);
        if (code == CTL_STOP || code == CTL_STOP_PREEMPTED) {
            res->preempted = code == CTL_STOP_PREEMPTED;
            break;
        }
        if (code == CTL_CREATE) {
            comm_grad_tensor *gt = NULL;
            if (gpt_create(&c->model, &g) || !(gt = grad_tensors(g, &nt))) {
                fprintf(stderr, PROG ": parameter server: out of memory\n");
                MPI_Abort(red, 1); /* the workers wait in the reducer's creation */
            }
            comm_grad_opts go = grad_opts(c, NULL);
            rc = comm_grad_create(red, &go, gt, nt, &cg);
            free(gt);
        } else if (cg && comm_grad_reduce(cg, gpt_grads(g), code, NULL)) /* the workers fail too */
            rc = -1;
    }
    comm_grad_destroy(cg);
    gpt_destroy(g);
    return rc ? -1 : 0;
}

static int run(MPI_Comm comm, MPI_Comm red, MPI_Comm ctl, const job_config *c, int quiet,
               volatile sig_atomic_t *stop_flag, train_result *res);

int train_run(MPI_Comm comm, const job_config *c, int quiet, volatile sig_atomic_t *stop_flag,
              train_result *res) {
    memset(res, 0, sizeof *res);
    res->final_val_loss = -1;
    int k = c->comm.ps_ranks, rank, world;
    if (k <= 0) return run(comm, MPI_COMM_NULL, MPI_COMM_NULL, c, quiet, stop_flag, res);
    /* the last k ranks are servers: they train nothing */
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &world);
    char err[1024] = "";
    if (spmd_agree(comm, config_check_layout(c, world, err, sizeof err), PROG, err)) return -1;
    int server = rank >= world - k, rc;
    MPI_Comm part, ctl;
    MPI_Comm_split(comm, server, rank, &part);
    MPI_Comm_dup(comm, &ctl);
    if (server)
        rc = serve_gradients(comm, ctl, c, res);
    else
        rc = run(part, comm, ctl, c, quiet, stop_flag, res);
    MPI_Comm_free(&ctl);
    MPI_Comm_free(&part);
    return rc;
}

static int run(MPI_Comm comm, MPI_Comm red, MPI_Comm ctl, const job_config *c, int quiet,
               volatile sig_atomic_t *stop_flag, train_result *res) {
    trainer t;
    int rc = setup(&t, comm, red, ctl, c, quiet);
    if (rc) goto done;
    int start = maybe_resume(&t);
    if (start < 0) {
        rc = -1;
        goto done;
    }
    int B = c->train.micro_batch, T = c->model.block_size, G = c->train.global_batch;
    int steps = c->train.steps;
    uint64_t nb = data_num_batches(&t.train, G, T);
    double tokens_per_step = (double)G * T, fpt = gpt_flops_per_token(&c->model, T);
    double peak_local = kern_sgemm_gflops(512, 0.3), peak = 0;
    MPI_Allreduce(&peak_local, &peak, 1, MPI_DOUBLE, MPI_SUM, comm);
    res->peak_gflops = peak;
    size_t np_all = 0;
    for (int i = 0; i < gpt_ntensors(t.g); i++) /* each parameter once over the model group */
        if (gpt_tensor_at(t.g, i)->in_norm) np_all += gpt_tensor_at(t.g, i)->numel;
    MPI_Allreduce(MPI_IN_PLACE, &np_all, 1, MPI_UINT64_T, MPI_SUM, t.grid.mp_comm);
    if (!quiet) print_memory(&t);
    if (t.rank == 0 && !quiet) {
        printf("mpilm train: %s | %zu parameters | layout dp=%d tp=%d pp=%d", c->file, np_all, t.dp,
               t.grid.tp, t.grid.pp);
        if (t.servers) printf(" + %d dedicated parameter-server rank(s)", t.servers);
        printf(" | %d threads/rank\n", kern_threads());
        printf("batch: global %d x %d tokens = %d micro-batches of %d per pipeline x %d "
               "data-parallel ranks%s\n",
               G, T, t.m, B, t.dp, c->train.recompute ? " | recompute" : "");
        char desc[512];
        printf("all-reduce: %s", comm_grad_describe(t.red, desc, sizeof desc));
        if (t.local_opt)
            printf(" | payload: each rank's AdamW update%s",
                   c->comm.overlap ? " (comm.overlap off: the update needs the whole gradient)"
                                   : "");
        printf("\n");
        comm_grad_explain(t.red, stdout);
        printf("BLAS: OpenBLAS %s kernel | measured sgemm peak %.1f GFLOP/s (all ranks)\n",
               kern_blas_corename(), peak);
        fflush(stdout);
    }
    /* bubble: idle time of a stage during the pipelined part of a step, i.e.
     * the slowest stage's pipeline time minus this stage's compute */
    double t_run = spmd_now(), sum_ms = 0, sum_tps = 0, sum_idle = 0, sum_phase = 0, sum_dp = 0,
           sum_bytes = 0;
    int timed = 0;
    float dscale = (float)(1.0 / tokens_per_step);
    for (int s = start; s < steps; s++) {
        double t0 = spmd_now();
        double lr =
            optim_lr(c->train.schedule, c->train.lr, c->train.min_lr, c->train.warmup, steps, s);
        gpt_zero_grad(t.g);
        /* global rows of step s: [s*G, (s+1)*G) in batch order; data-parallel
         * rank r takes micro-batches a*dp + r (see pipe.h) */
        uint64_t base = (uint64_t)(s % nb) * G * T;
        pipe_times tm = {0};
        double tp0 = gpt_tp_comm_seconds(t.g);
        ctl_send(&t, s);
        rc = comm_grad_begin(t.red, gpt_grads(t.g), s);
        if (spmd_agree(comm, rc, PROG, "gradient all-reduce failed")) goto done;
        double loss_sum = pipe_train_step(t.pipe, &t.train, base, dscale, &tm);
        double t1 = spmd_now(), phase = t1 - t0;
        if (t.grid.pp > 1)
            MPI_Allreduce(MPI_IN_PLACE, &phase, 1, MPI_DOUBLE, MPI_MAX, t.grid.pp_comm);
        double idle = t.grid.pp > 1 ? phase - tm.fwd_s - tm.bwd_s : 0;
        comm_grad_stats cst;
        sum_tied_embedding(&t);
        /* payload update: the buffer holds this rank's share of the mean
         * gradient (hence x dp); its AdamW change / dp is what is summed */
        int local = t.local_opt && comm_grad_compresses(t.red, s);
        double gnorm = 0;
        if (local) {
            gnorm = grad_norm(&t) * t.dp;
            float clip = optim_clip_scale(gnorm, c->train.grad_clip);
            optim_delta(&t.opt, t.g, (float)lr, (float)t.dp * clip, 1.0f / (float)t.dp);
            gnorm = gnorm * gnorm / t.dp; /* reported: rms over the dp ranks */
            MPI_Allreduce(MPI_IN_PLACE, &gnorm, 1, MPI_DOUBLE, MPI_SUM, t.grid.dp_comm);
            gnorm = sqrt(gnorm);
        }
        rc = comm_grad_finish(t.red, &cst);
        double loss_all = 0;
        MPI_Allreduce(&loss_sum, &loss_all, 1, MPI_DOUBLE, MPI_SUM, comm);
        double comm_s = spmd_now() - t1 + gpt_tp_comm_seconds(t.g) - tp0;
        if (spmd_agree(comm, rc, PROG, "gradient all-reduce failed")) goto done;
        double loss = loss_all / tokens_per_step;
        if (!local) gnorm = grad_norm(&t);
        if (!isfinite(loss) || !isfinite(gnorm)) {
            char m[128];
            snprintf(m, sizeof m, "step %d: loss %g, gradient norm %g: training diverged", s + 1,
                     loss, gnorm);
            rc = spmd_agree(comm, -1, PROG, m);
            goto done;
        }
        if (local)
            optim_apply(&t.opt, t.g, (float)lr);
        else
            optim_step(&t.opt, t.g, (float)lr, optim_clip_scale(gnorm, c->train.grad_clip));
        double dt = spmd_now() - t0, tps = tokens_per_step / dt;
        double mfu = peak > 0 ? tps * fpt / (peak * 1e9) : 0;
        if (s > start) { /* the first step pays for allocation and warm-up */
            sum_idle += idle;
            sum_phase += phase;
            sum_ms += dt * 1e3;
            sum_tps += tps;
            sum_dp += cst.seconds * 1e3;
            sum_bytes += (double)cst.bytes_sent;
            timed++;
        }
        res->final_loss = loss;
        res->steps_done = s + 1;
        int last = s + 1 == steps,
            val_due = c->train.eval_every > 0 && ((s + 1) % c->train.eval_every == 0 || last);
        double val = val_due ? evaluate(&t) : -1;
        if (val_due) res->final_val_loss = val;
        if (t.rank == 0) {
            metrics *m = &t.met;
            metrics_int(m, "step", s + 1);
            metrics_num(m, "loss", loss);
            metrics_num(m, "lr", lr);
            metrics_num(m, "grad_norm", gnorm);
            metrics_num(m, "step_ms", dt * 1e3);
            metrics_num(m, "tokens_per_s", tps);
            metrics_num(m, "mfu", mfu);
            if (val_due) metrics_num(m, "val_loss", val);
            metrics_num(m, "fwd_ms", tm.fwd_s * 1e3);
            metrics_num(m, "bwd_ms", tm.bwd_s * 1e3);
            metrics_num(m, "bubble_ms", idle * 1e3);
            metrics_num(m, "recv_wait_ms", tm.wait_s * 1e3);
            metrics_num(m, "comm_ms", comm_s * 1e3);
            metrics_int(m, "bytes_sent", (long long)cst.bytes_sent);
            metrics_num(m, "dp_allreduce_ms", cst.seconds * 1e3);
            metrics_num(m, "dp_allreduce_busy_ms", cst.busy_seconds * 1e3);
            metrics_str(m, "algorithm", cst.algorithm);
            metrics_str(m, "compression", cst.compression);
            metrics_emit(m, 1);
            if (!quiet && ((s + 1) % c->log.every == 0 || last || val_due)) {
                char eta[32];
                double per = (spmd_now() - t_run) / (s + 1 - start);
                fmt_eta(eta, sizeof eta, per * (steps - s - 1));
                printf("step %*d/%d | loss %.4f | lr %.2e | gnorm %.3f | %.1f ms | %.0f tok/s | "
                       "MFU %.1f%% | ETA %s",
                       (int)(log10(steps) + 1), s + 1, steps, loss, lr, gnorm, dt * 1e3, tps,
                       mfu * 100, eta);
                if (val_due) printf(" | val %.4f", val);
                printf("\n");
                fflush(stdout);
            }
        }
        int every = c->checkpoint.every, stop = stop_flag ? *stop_flag : 0, any_stop = 0;
        MPI_Allreduce(&stop, &any_stop, 1, MPI_INT, MPI_MAX, comm);
        int save_now =
            c->checkpoint.dir[0] && (any_stop || last || (every > 0 && (s + 1) % every == 0));
        if (save_now && (rc = save(&t, s + 1, (long long)(s + 1) * (long long)tokens_per_step)))
            goto done;
        if (any_stop && !last) {
            if (t.rank == 0)
                printf("stopped by signal after step %d%s; exit status %d\n", s + 1,
                       c->checkpoint.dir[0] ? " (checkpoint saved)" : "", TRAIN_EXIT_PREEMPTED);
            res->preempted = t.preempted = 1;
            break;
        }
    }
    if (rc == 0 && t.async) rc = save_wait(&t); /* the last save must be complete */
    double frac = sum_phase > 0 ? sum_idle / sum_phase : 0;
    MPI_Allreduce(&frac, &res->bubble, 1, MPI_DOUBLE, MPI_SUM, comm);
    res->bubble /= t.world;
    if (timed) {
        res->step_ms = sum_ms / timed;
        res->tokens_per_s = sum_tps / timed;
        res->comm_ms = sum_dp / timed;
        res->bytes_sent = sum_bytes / timed;
        res->mfu = peak > 0 ? res->tokens_per_s * fpt / (peak * 1e9) : 0;
    }
    if (t.rank == 0 && !quiet && !res->preempted)
        printf("done: %d steps, final loss %.4f%s, %.0f tok/s, MFU %.1f%% (of measured sgemm "
               "peak)\n",
               res->steps_done, res->final_loss, "", res->tokens_per_s, res->mfu * 100);
done:
    teardown(&t);
    return rc ? -1 : 0;
}

static void usage(FILE *f) {
    fprintf(f,
            "usage: mpilm train JOB.yaml [--set key.sub=value ...]\n\n"
            "Trains the GPT model described by JOB.yaml on all ranks of the launch\n"
            "(mpirun -n N / srun), data-parallel over the ranks. Keys: see README.md\n"
            "and jobs/*.yaml. --set overrides any key, e.g. --set train.steps=10.\n"
            "Rank 0 prints one progress line per log.every steps and writes\n"
            "LOGDIR/metrics.jsonl and LOGDIR/metrics.prom. SIGUSR1 or SIGTERM: finish\n"
            "the step, save a checkpoint (when checkpoint.dir is set), exit %d.\n",
            TRAIN_EXIT_PREEMPTED);
}

int train_main(int argc, char **argv, MPI_Comm comm, volatile sig_atomic_t *stop_flag) {
    int rank;
    MPI_Comm_rank(comm, &rank);
    const char *job = NULL;
    const char **sets = calloc((size_t)argc + 1, sizeof *sets);
    int nsets = 0, bad = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            if (rank == 0) usage(stdout);
            free(sets);
            return 0;
        } else if (!strcmp(argv[i], "--set") && i + 1 < argc)
            sets[nsets++] = argv[++i];
        else if (!strncmp(argv[i], "--set=", 6))
            sets[nsets++] = argv[i] + 6;
        else if (argv[i][0] != '-' && !job)
            job = argv[i];
        else
            bad = 1;
    }
    if (bad || !job) {
        if (rank == 0) usage(stderr);
        free(sets);
        return 2;
    }
    job_config cfg;
    char err[1024];
    int rc = config_load(&cfg, job, sets, nsets, err, sizeof err);
    free(sets);
    if (spmd_agree(comm, rc, PROG, err)) return 1;
    train_result res;
    if (train_run(comm, &cfg, 0, stop_flag, &res)) return 1;
    return res.preempted ? TRAIN_EXIT_PREEMPTED : 0;
}
