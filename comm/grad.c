/* comm_grad: fusion buckets over the dp communicator, each reduced by a fixed
 * algorithm, the adaptive selector's pick, or a compressor. See grad.h. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* open_memstream */
#endif
#include "comm/grad.h"

#include "comm/compress.h"
#include "comm/select.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    size_t off, n;    /* floats, into the buffer */
    int t0, t1;       /* tensors [t0, t1) */
    comm_cx *cx;      /* compression context, or NULL */
    const char *last; /* algorithm name of the last call (static or in name) */
    char name[48];    /* adaptive: choice name of the last call */
    int pending;      /* tensors not yet final in this step */
} bucket;

struct comm_grad {
    MPI_Comm comm;
    int size, rank;
    comm_grad_opts o;
    char strategy[32], cx_name[16], fallback[32];
    comm_cx_type cxt;
    comm_grad_tensor *t;
    int nt;
    bucket *b;
    int nb;
    size_t n;                 /* buffer length */
    comm_ar *ar;              /* NULL when size == 1 */
    const comm_ar_algo *algo; /* fixed strategy; NULL for adaptive */
    comm_sel *sel;            /* adaptive */
    double stream[3];         /* fixed strategy across nodes: stream check, s */
    float *stage;             /* powersgd staging, max bucket length */
    uint64_t total;
    /* the step in flight (comm_grad_begin .. comm_grad_finish) */
    float *grads;
    int step, next; /* next bucket to reduce (they go last to first); -1: none */
    int err;
    uint64_t sent;
    double t_begin, busy;
    int *bucket_of; /* tensor -> bucket */
    char *final;    /* tensor -> gradient final this step */
    /* overlap: a thread reduces each bucket once all its tensors are final */
    int threaded, quit;
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv;
};

static double now(void) {
    return MPI_Wtime();
}
static void *comm_thread(void *arg);

static int arg_error(const char *msg, const char *what) {
    int r = -1;
    int init = 0;
    MPI_Initialized(&init);
    if (init) MPI_Comm_rank(MPI_COMM_WORLD, &r);
    /* option errors are the same on every rank: said once, by world rank 0 */
    if (r <= 0)
        fprintf(stderr, "%s:%d: rank %d: %s%s\n", __FILE__, __LINE__, r, msg, what ? what : "");
    return COMM_ERR_ARG;
}

static void on_event(void *ud, const char *msg) {
    comm_grad *g = ud;
    if (g->o.log) {
        if (!strncmp(msg, "comm: ", 6)) msg += 6;
        if (!strncmp(msg, "tuned ", 6))
            fprintf(g->o.log, "comm: %s\n", msg);
        else
            fprintf(g->o.log, "comm: re-selection: %s\n", msg);
        fflush(g->o.log);
    }
}

/* Dense algorithm for a bucket of `bytes` (adaptive: the current pick, which
 * also sets hierarchical's inter-node algorithm). */
static const comm_ar_algo *bucket_algo(comm_grad *g, bucket *b) {
    if (!g->sel) {
        b->last = g->algo->name;
        return g->algo;
    }
    size_t bytes = b->n * sizeof(float);
    const comm_ar_algo *a = comm_sel_pick(g->sel, bytes);
    comm_sel_choice(g->sel, bytes, b->name, sizeof b->name, NULL);
    b->last = b->name;
    return a;
}

static void make_buckets(comm_grad *g) {
    double lim = g->o.bucket_mb > 0 ? g->o.bucket_mb * 1048576.0 : 0;
    size_t off = 0;
    for (int i = 0; i < g->nt; i++) {
        size_t bytes = g->t[i].numel * sizeof(float);
        bucket *cur = g->nb ? &g->b[g->nb - 1] : NULL;
        if (!cur || (lim > 0 && cur->n > 0 && (double)(cur->n * sizeof(float) + bytes) > lim)) {
            cur = &g->b[g->nb++];
            memset(cur, 0, sizeof *cur);
            cur->off = off;
            cur->t0 = i;
        }
        cur->n += g->t[i].numel;
        cur->t1 = i + 1;
        off += g->t[i].numel;
    }
}

/* powersgd: 2-D tensors of the bucket first, then the rest. dir 1: buffer ->
 * stage, 0: stage -> buffer. */
static void stage_copy(comm_grad *g, const bucket *b, float *buf, int dir) {
    size_t so = 0;
    for (int pass = 0; pass < 2; pass++) {
        size_t bo = b->off;
        for (int i = b->t0; i < b->t1; i++) {
            const comm_grad_tensor *t = &g->t[i];
            int mat = t->ndim == 2;
            if (mat == (pass == 0)) {
                if (dir)
                    memcpy(g->stage + so, buf + bo, t->numel * sizeof(float));
                else
                    memcpy(buf + bo, g->stage + so, t->numel * sizeof(float));
                so += t->numel;
            }
            bo += t->numel;
        }
    }
}

static int setup_cx(comm_grad *g, bucket *b) {
    comm_cx_opts co;
    comm_cx_opts_default(&co);
    co.type = g->cxt;
    co.ratio = g->o.ratio > 0 ? g->o.ratio : co.ratio;
    co.rank = g->o.rank > 0 ? g->o.rank : co.rank;
    co.error_feedback = g->o.error_feedback != 0;
    co.warmup_steps = g->o.warmup_steps;
    co.min_ratio = g->o.min_ratio >= 1 ? g->o.min_ratio : co.min_ratio;
    co.seed = g->o.seed ? g->o.seed : 1;
    /* with error feedback the residual carries the rounding error: round to
     * nearest (bounded residual); without it stay unbiased (stochastic) */
    co.stochastic = !co.error_feedback;
    size_t nm = 0, *rows = NULL, *cols = NULL;
    if (g->cxt == COMM_CX_POWERSGD) {
        for (int i = b->t0; i < b->t1; i++)
            nm += g->t[i].ndim == 2;
        rows = calloc(nm + 1, sizeof *rows);
        cols = calloc(nm + 1, sizeof *cols);
        if (!rows || !cols) {
            free(rows);
            free(cols);
            return COMM_ERR_NOMEM;
        }
        nm = 0;
        for (int i = b->t0; i < b->t1; i++)
            if (g->t[i].ndim == 2) {
                rows[nm] = (size_t)g->t[i].shape[0];
                cols[nm] = (size_t)g->t[i].shape[1];
                nm++;
            }
        co.n_mats = nm;
        co.mat_rows = rows;
        co.mat_cols = cols;
    }
    int err = comm_cx_create(g->comm, &co, b->n, &b->cx);
    free(rows);
    free(cols);
    return err;
}

int comm_grad_create(MPI_Comm comm, const comm_grad_opts *o, const comm_grad_tensor *t, int nt,
                     comm_grad **out) {
    *out = NULL;
    if (!o || !o->strategy || nt < 0 || (nt > 0 && !t)) return arg_error("invalid arguments", NULL);
    comm_grad *g = calloc(1, sizeof *g);
    if (!g) return COMM_ERR_NOMEM;
    int err = 0;
    g->comm = comm;
    g->o = *o;
    MPI_CHECK(MPI_Comm_size(comm, &g->size));
    MPI_CHECK(MPI_Comm_rank(comm, &g->rank));
    snprintf(g->strategy, sizeof g->strategy, "%s", o->strategy);
    snprintf(g->fallback, sizeof g->fallback, "%s", o->fallback ? o->fallback : "parameter_server");
    g->o.strategy = g->strategy;
    g->o.fallback = g->fallback;

    /* options (local checks, the same on every rank) */
    int adaptive = !strcmp(o->strategy, "adaptive");
    if (!adaptive) {
        g->algo = comm_ar_find(o->strategy);
        if (!g->algo) {
            err = arg_error("unknown all-reduce strategy ", o->strategy);
            goto done;
        }
    } else if (strcmp(g->fallback, "none") && !comm_ar_find(g->fallback)) {
        err = arg_error("unknown fallback algorithm ", g->fallback);
        goto done;
    }
    const char *cx = o->cx_type && o->cx_type[0] ? o->cx_type : "none";
    if (!strcmp(cx, "int")) {
        g->cxt = comm_cx_int_type(o->bits);
        if (g->cxt == COMM_CX_NTYPES) {
            err = arg_error("comm.compression.type int needs bits 8, 4 or 2", NULL);
            goto done;
        }
    } else if (comm_cx_type_from_name(cx, &g->cxt)) {
        err = arg_error("unknown compression type ", cx);
        goto done;
    }
    snprintf(g->cx_name, sizeof g->cx_name, "%s", comm_cx_type_name(g->cxt));

    g->nt = nt;
    g->t = calloc((size_t)nt + 1, sizeof *g->t);
    g->b = calloc((size_t)nt + 1, sizeof *g->b);
    if (!g->t || !g->b) {
        err = COMM_ERR_NOMEM;
        goto done;
    }
    for (int i = 0; i < nt; i++) {
        g->t[i] = t[i];
        if (g->t[i].ndim != 2 || (size_t)g->t[i].shape[0] * (size_t)g->t[i].shape[1] != t[i].numel)
            g->t[i].ndim = 1; /* anything not a plain matrix is a vector here */
        g->n += t[i].numel;
    }
    make_buckets(g);
    g->next = -1;
    g->bucket_of = calloc((size_t)nt + 1, sizeof *g->bucket_of);
    g->final = calloc((size_t)nt + 1, 1);
    if (!g->bucket_of || !g->final) {
        err = COMM_ERR_NOMEM;
        goto done;
    }
    for (int i = 0; i < g->nb; i++) {
        g->b[i].last = adaptive ? "adaptive" : g->algo->name;
        for (int k = g->b[i].t0; k < g->b[i].t1; k++)
            g->bucket_of[k] = i;
    }
    if (g->size == 1) goto done; /* no-op reducer */

    comm_ar_opts ao = {.ps_ranks = o->ps_ranks};
    MPI_CHECK(MPI_Barrier(comm));
    if ((err = comm_ar_create(comm, &ao, &g->ar))) goto done;
    /* adaptive: the selector's probe runs the stream check; mpi sends
     * through MPI_Allreduce alone */
    if (!adaptive && strcmp(g->algo->name, "mpi") && (err = comm_ar_stream_check(g->ar, g->stream)))
        goto done;
    if (adaptive) {
        comm_sel_opts so = {.bw_threshold = o->bw_threshold,
                            .lat_threshold = o->lat_threshold,
                            .fallback = g->fallback,
                            .tune = COMM_SEL_TUNE_DEFAULT,
                            .on_event = on_event,
                            .ud = g};
        if ((err = comm_sel_create(comm, g->ar, &so, &g->sel))) goto done;
    }
    if (g->cxt != COMM_CX_NONE) {
        size_t mx = 0;
        for (int i = 0; i < g->nb; i++) {
            if ((err = setup_cx(g, &g->b[i]))) goto done;
            if (g->b[i].n > mx) mx = g->b[i].n;
            /* the dense path of the compressor uses this bucket's algorithm */
            comm_cx_set_dense(g->b[i].cx, g->ar, bucket_algo(g, &g->b[i])->fn);
        }
        if (g->cxt == COMM_CX_POWERSGD && !(g->stage = malloc((mx + 1) * sizeof(float)))) {
            err = COMM_ERR_NOMEM;
            goto done;
        }
    }
    if (o->overlap) {
        int level = 0;
        MPI_CHECK(MPI_Query_thread(&level));
        if (level < MPI_THREAD_MULTIPLE) {
            err = arg_error("comm.overlap needs MPI_THREAD_MULTIPLE, which this MPI library "
                            "did not provide",
                            NULL);
            goto done;
        }
        if (pthread_mutex_init(&g->mu, NULL) || pthread_cond_init(&g->cv, NULL)) {
            err = COMM_ERR_NOMEM;
            goto done;
        }
        g->threaded = pthread_create(&g->th, NULL, comm_thread, g) == 0;
        if (!g->threaded) err = COMM_ERR_NOMEM;
    }
done:;
    /* allocation errors are local: agree so that every rank fails together */
    int any = err, all = 0;
    if (g->size > 1 && MPI_Allreduce(&any, &all, 1, MPI_INT, MPI_MIN, comm) == MPI_SUCCESS)
        err = all;
    if (err) {
        comm_grad_destroy(g);
        return err;
    }
    *out = g;
    return 0;
}

void comm_grad_destroy(comm_grad *g) {
    if (!g) return;
    if (g->threaded) {
        pthread_mutex_lock(&g->mu);
        g->quit = 1;
        pthread_cond_broadcast(&g->cv);
        pthread_mutex_unlock(&g->mu);
        pthread_join(g->th, NULL);
        pthread_cond_destroy(&g->cv);
        pthread_mutex_destroy(&g->mu);
    }
    free(g->bucket_of);
    free(g->final);
    for (int i = 0; i < g->nb; i++)
        comm_cx_destroy(g->b[i].cx);
    comm_sel_destroy(g->sel);
    comm_ar_destroy(g->ar);
    free(g->stage);
    free(g->b);
    free(g->t);
    free(g);
}

static void fill_names(const comm_grad *g, comm_grad_stats *st) {
    int big = 0, same = 1;
    for (int i = 1; i < g->nb; i++)
        if (g->b[i].n > g->b[big].n) big = i;
    for (int i = 0; i < g->nb; i++)
        if (strcmp(g->b[i].last, g->b[0].last)) same = 0;
    const char *name = g->nb ? g->b[big].last : (g->sel || !g->algo ? "adaptive" : g->algo->name);
    if (g->algo)
        snprintf(st->algorithm, sizeof st->algorithm, "%s", same ? name : "mixed");
    else if (g->size == 1)
        snprintf(st->algorithm, sizeof st->algorithm, "adaptive:local");
    else
        snprintf(st->algorithm, sizeof st->algorithm, "adaptive:%s", same ? name : "mixed");
    const char *mode = "none";
    if (g->size > 1 && g->cxt != COMM_CX_NONE) {
        mode = "dense";
        for (int i = 0; i < g->nb; i++)
            if (strcmp(comm_cx_last_mode(g->b[i].cx), "dense")) mode = g->cx_name;
    }
    snprintf(st->compression, sizeof st->compression, "%s", mode);
}

/* Reduces one bucket of the step in flight; bytes sent go to *sent. */
static int reduce_bucket(comm_grad *g, bucket *b, uint64_t *sent) {
    float *p = g->grads + b->off;
    const comm_ar_algo *a = bucket_algo(g, b);
    int err;
    double tb;
    if (b->cx) {
        comm_cx_set_dense(b->cx, g->ar, a->fn);
        if (g->stage) stage_copy(g, b, g->grads, 1);
        tb = now();
        err = comm_cx_allreduce(b->cx, g->stage ? g->stage : p, b->n, g->step, COMM_SUM, sent);
        if (g->stage) stage_copy(g, b, g->grads, 0);
        /* only dense calls (warm-up) are comparable with the model; the mode
         * is the same on every rank */
        if (err || !g->sel || strcmp(comm_cx_last_mode(b->cx), "dense")) return err;
    } else {
        uint64_t s0 = comm_ar_bytes_sent(g->ar);
        tb = now();
        err = a->fn(g->ar, p, b->n, COMM_SUM);
        *sent = comm_ar_bytes_sent(g->ar) - s0;
        if (err || !g->sel) return err;
    }
    int r = comm_sel_record(g->sel, b->n * sizeof(float), now() - tb);
    return r < 0 ? r : 0;
}

/* Reduces the next bucket when it is ready; called with g->mu held when
 * threaded (released around the communication). 1 if one was reduced. */
static int step_once(comm_grad *g) {
    if (g->next < 0 || g->b[g->next].pending > 0) return 0;
    bucket *b = &g->b[g->next];
    uint64_t sent = 0;
    if (g->threaded) pthread_mutex_unlock(&g->mu);
    double t0 = now();
    /* after an error every rank stops at the same bucket: errors of the
     * algorithms are argument errors, identical everywhere */
    int err = g->err ? 0 : reduce_bucket(g, b, &sent);
    double dt = now() - t0;
    if (g->threaded) pthread_mutex_lock(&g->mu);
    if (err && !g->err) g->err = err;
    g->sent += sent;
    g->busy += dt;
    g->next--;
    if (g->threaded && g->next < 0) pthread_cond_broadcast(&g->cv);
    return 1;
}

static void *comm_thread(void *arg) {
    comm_grad *g = arg;
    pthread_mutex_lock(&g->mu);
    while (!g->quit) {
        if (!step_once(g)) pthread_cond_wait(&g->cv, &g->mu);
    }
    pthread_mutex_unlock(&g->mu);
    return NULL;
}

int comm_grad_begin(comm_grad *g, float *grads, int step) {
    if (g->threaded) pthread_mutex_lock(&g->mu);
    int busy = g->next >= 0;
    if (!busy) {
        g->grads = grads;
        g->step = step;
        g->err = 0;
        g->sent = 0;
        g->busy = 0;
        g->t_begin = now();
        memset(g->final, 0, (size_t)g->nt + 1);
        for (int i = 0; i < g->nb; i++)
            g->b[i].pending = g->b[i].t1 - g->b[i].t0;
        g->next = g->size > 1 ? g->nb - 1 : -1;
    }
    if (g->threaded) pthread_mutex_unlock(&g->mu);
    return busy ? arg_error("comm_grad_begin: the previous step is not finished", NULL) : 0;
}

void comm_grad_ready(comm_grad *g, int t0, int t1) {
    if (g->threaded) pthread_mutex_lock(&g->mu);
    for (int i = t0 < 0 ? 0 : t0; i < t1 && i < g->nt; i++)
        if (!g->final[i]) {
            g->final[i] = 1;
            g->b[g->bucket_of[i]].pending--;
        }
    if (g->threaded) {
        pthread_cond_broadcast(&g->cv);
        pthread_mutex_unlock(&g->mu);
    }
}

int comm_grad_finish(comm_grad *g, comm_grad_stats *st) {
    double tw = now();
    comm_grad_ready(g, 0, g->nt);
    if (g->threaded) {
        pthread_mutex_lock(&g->mu);
        while (g->next >= 0)
            pthread_cond_wait(&g->cv, &g->mu);
        pthread_mutex_unlock(&g->mu);
    } else
        while (step_once(g)) {
        }
    g->total += g->sent;
    if (st) {
        memset(st, 0, sizeof *st);
        st->bytes_sent = g->sent;
        st->seconds = now() - tw;
        st->busy_seconds = g->busy;
        st->n_buckets = g->nb;
        fill_names(g, st);
    }
    return g->err;
}

int comm_grad_reduce(comm_grad *g, float *grads, int step, comm_grad_stats *st) {
    int err = comm_grad_begin(g, grads, step);
    return err ? err : comm_grad_finish(g, st);
}

int comm_grad_overlaps(const comm_grad *g) {
    return g->threaded;
}

int comm_grad_compresses(const comm_grad *g, int step) {
    if (step < g->o.warmup_steps) return 0;
    for (int i = 0; i < g->nb; i++)
        if (g->b[i].cx && comm_cx_compresses(g->b[i].cx)) return 1;
    return 0;
}

/* Visits every state array of the buckets in order (residual, then Q):
 * copies them to out and/or from in; returns the total length. */
static size_t state_walk(comm_grad *g, float *out, const float *in) {
    size_t off = 0;
    for (int i = 0; i < g->nb; i++) {
        if (!g->b[i].cx) continue;
        for (int k = 0; k < 2; k++) {
            size_t len = 0;
            float *p =
                k == 0 ? comm_cx_residual(g->b[i].cx, &len) : comm_cx_state(g->b[i].cx, &len);
            if (!p) continue;
            if (out) memcpy(out + off, p, len * sizeof(float));
            if (in) memcpy(p, in + off, len * sizeof(float));
            off += len;
        }
    }
    return off;
}

size_t comm_grad_state(comm_grad *g, float *buf) {
    return state_walk(g, buf, NULL);
}

int comm_grad_set_state(comm_grad *g, const float *buf, size_t n) {
    if (n != state_walk(g, NULL, NULL)) return COMM_ERR_ARG;
    state_walk(g, NULL, buf);
    return 0;
}

const char *comm_grad_describe(const comm_grad *g, char *buf, size_t len) {
    char mb[32];
    size_t big = 0;
    for (int i = 0; i < g->nb; i++)
        if (g->b[i].n > big) big = g->b[i].n;
    comm_sel_fmt_bytes(big * sizeof(float), mb, sizeof mb);
    int k = snprintf(buf, len, "%s (%d bucket%s of at most %.3g MiB, largest %s)", g->strategy,
                     g->nb, g->nb == 1 ? "" : "s", g->o.bucket_mb, mb);
    if (k < 0 || (size_t)k >= len) return buf;
    char extra[64] = "";
    if (g->cxt == COMM_CX_TOPK) snprintf(extra, sizeof extra, ", ratio %.3g", g->o.ratio);
    if (g->cxt == COMM_CX_POWERSGD) snprintf(extra, sizeof extra, ", rank %d", g->o.rank);
    if (g->cxt == COMM_CX_NONE)
        snprintf(buf + k, len - (size_t)k, " | compression none");
    else
        snprintf(buf + k, len - (size_t)k,
                 " | compression %s%s (error feedback %s, warm-up %d steps, min ratio %.3g)%s",
                 g->cx_name, extra, g->o.error_feedback ? "on" : "off", g->o.warmup_steps,
                 g->o.min_ratio, g->size == 1 ? " [off: one data-parallel rank]" : "");
    return buf;
}

void comm_grad_explain(const comm_grad *g, FILE *f) {
    if (!g->sel) {
        if (!strcmp(g->strategy, "adaptive"))
            fprintf(f, "comm: adaptive: one data-parallel rank, nothing to select\n");
        char sc[200];
        if (g->stream[0] > 0)
            fprintf(f, "comm: %s\n", comm_ar_stream_str(g->ar, g->stream, sc, sizeof sc));
        return;
    }
    /* the key lines of comm_sel_explain: layout, probe, thresholds */
    char *txt = NULL;
    size_t tl = 0;
    FILE *m = open_memstream(&txt, &tl);
    if (m) {
        comm_sel_explain(g->sel, m);
        fclose(m);
        for (char *line = txt, *nl; line && *line; line = nl ? nl + 1 : NULL) {
            nl = strchr(line, '\n');
            size_t ll = nl ? (size_t)(nl - line) : strlen(line);
            if (!strncmp(line, "comm: layout", 12) || !strncmp(line, "comm: probe", 11) ||
                !strncmp(line, "comm: thresholds", 16))
                fprintf(f, "%.*s\n", (int)ll, line);
        }
        free(txt);
    }
    size_t sizes[2] = {8, (size_t)64 << 20};
    for (int i = 0; i < 2 + g->nb; i++) {
        size_t bytes = i < 2 ? sizes[i] : g->b[i - 2].n * sizeof(float);
        char nm[48], sz[32];
        double t = 0;
        comm_sel_choice(g->sel, bytes, nm, sizeof nm, &t);
        fprintf(f, "comm: adaptive choice for %s%s: %s (predicted %.1f us)\n",
                comm_sel_fmt_bytes(bytes, sz, sizeof sz), i < 2 ? "" : " (gradient bucket)", nm,
                t * 1e6);
    }
}

int comm_grad_n_buckets(const comm_grad *g) {
    return g->nb;
}
uint64_t comm_grad_total_bytes(const comm_grad *g) {
    return g->total;
}
