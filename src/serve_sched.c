/* serve_sched: rank 0's scheduler and the workers' continuous-batching loop
 * (see serve_sched.h).
 *
 * Messages: two duplicates of the communicator, `down` (scheduler ->
 * workers: a job, a reload order, stop) and `up` (workers -> scheduler: a
 * result, a reload report), so that rank 0, which is also the worker when
 * alone, never takes its own orders for results. Messages between two ranks
 * on one communicator arrive in order, so a worker sees the jobs sent before
 * a reload order before the order itself.
 */
#include "src/serve_sched.h"

#include "comm/allreduce.h"
#include "io/ckpt.h"
#include "io/qckpt.h"
#include "src/gptio.h"
#include "src/spmd.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { TAG_JOB = 1, TAG_RELOAD, TAG_STOP, TAG_RESULT, TAG_RELOADED };

typedef struct {
    long long id;
    uint64_t seed;
    float temperature, top_p;
    int top_k, n_prompt, max_new, stop_len;
} job_msg; /* then n_prompt ints, stop_len bytes */

typedef struct {
    long long id, step, steps, rows;
    double prompt_ms, decode_ms, ttft_ms, latency_ms; /* ttft, latency: from receipt */
    int failed, n_tokens, generated, finish;
    char err[200];
} res_msg; /* then n_tokens ints */

typedef struct {
    int ok;
    long long step;
    double seconds;
    char file[1024], err[512];
} reload_msg;

/* a model replica with its engine and batch */
typedef struct {
    gpt *g;
    infer_engine *e;
    infer_batcher *b;
    long long step;
    int nquant;
} replica;

/* a job on a worker */
typedef struct {
    long long id;
    infer_request q;
    infer_result r;
    int *prompt;
    char *stop;
    double t_recv;
} wjob;

/* rank 0's view of one worker */
typedef struct {
    int running;
    size_t kv;
    int reloading;    /* reload order sent, report not back yet */
    char tried[1024]; /* last checkpoint file it was told to load */
    long long step, steps, rows;
} wview;

typedef struct {
    MPI_Request rq;
    void *buf;
} psend;

struct serve_sched {
    MPI_Comm down, up;
    int rank, P, w0; /* workers: ranks w0..P-1 */
    serve_sched_opts o;
    const serve_sched_hooks *h;
    gpt_config cfg;
    /* rank 0 */
    serve_job *qhead, *qtail, *inflight;
    long long nqueued, next_id, reloads_ok, reloads_failed, model_step;
    wview *w;
    char target[1024], model[1024];
    double next_watch;
    /* worker */
    replica rep;
    char reload_file[1024];
    int reload_pending, stop;
    /* both */
    psend *ps;
    int nps, cps;
};

/* The loop cannot tell the other ranks about a local failure (no
 * collectives in it), so it stops the job. */
static void fatal(serve_sched *s, const char *what) {
    fprintf(stderr, "mpilm serve: rank %d: %s; aborting\n", s->rank, what);
    fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 1);
}

void serve_job_clear(serve_job *j) {
    if (!j) return;
    free(j->tokens);
    j->tokens = NULL;
}

/* ---------------- messages ---------------- */

static int send_buf(serve_sched *s, MPI_Comm c, int dest, int tag, void *buf, size_t n) {
    int err = 0;
    if (n > (size_t)INT32_MAX) {
        free(buf);
        return -1;
    }
    if (s->nps == s->cps) {
        int cap = s->cps ? 2 * s->cps : 16;
        psend *p = realloc(s->ps, (size_t)cap * sizeof *p);
        if (!p) {
            free(buf);
            return -1;
        }
        s->ps = p, s->cps = cap;
    }
    psend *p = &s->ps[s->nps];
    p->buf = buf;
    MPI_CHECK(MPI_Isend(buf, (int)n, MPI_BYTE, dest, tag, c, &p->rq));
    s->nps++;
done:
    if (err) free(buf);
    return err ? -1 : 0;
}

/* Frees the buffers of finished sends (wait: all of them). */
static int sends_progress(serve_sched *s, int wait) {
    int err = 0, k = 0;
    for (int i = 0; i < s->nps; i++) {
        int flag = 0;
        if (wait) {
            MPI_CHECK(MPI_Wait(&s->ps[i].rq, MPI_STATUS_IGNORE));
            flag = 1;
        } else
            MPI_CHECK(MPI_Test(&s->ps[i].rq, &flag, MPI_STATUS_IGNORE));
        if (flag)
            free(s->ps[i].buf);
        else
            s->ps[k++] = s->ps[i];
    }
    s->nps = k;
done:
    return err ? -1 : 0;
}

/* Receives a message of any tag waiting on c from src; *buf NULL: none. */
static int recv_any(MPI_Comm c, int src, void **buf, int *len, int *tag, int *from) {
    int err = 0, flag = 0;
    MPI_Status st;
    *buf = NULL;
    MPI_CHECK(MPI_Iprobe(src, MPI_ANY_TAG, c, &flag, &st));
    if (!flag) return 0;
    MPI_CHECK(MPI_Get_count(&st, MPI_BYTE, len));
    if (!(*buf = malloc((size_t)*len + 1))) return -1;
    *tag = st.MPI_TAG;
    *from = st.MPI_SOURCE;
    MPI_CHECK(MPI_Recv(*buf, *len, MPI_BYTE, st.MPI_SOURCE, st.MPI_TAG, c, MPI_STATUS_IGNORE));
done:
    if (err) {
        free(*buf);
        *buf = NULL;
    }
    return err ? -1 : 0;
}

/* ---------------- replica (workers; rank 0 when alone) ---------------- */

static void replica_free(replica *r) {
    infer_batcher_destroy(r->b);
    infer_destroy(r->e);
    gpt_destroy(r->g);
    memset(r, 0, sizeof *r);
}

/* Builds the engine of g (taken over) for FILE; 0 or -1 with msg. */
static int replica_make(replica *r, gpt *g, const char *file, long long step, int max_batch,
                        size_t kv_budget, char *msg, size_t msglen) {
    replica n = {g, NULL, NULL, step, 0};
    int rc = infer_create_kv(g, max_batch, kv_budget, &n.e, msg, msglen);
    if (!rc && qckpt_is_quantized(file) > 0)
        rc = infer_load_quant(n.e, file, &n.nquant, msg, msglen);
    if (!rc && infer_batcher_create(n.e, max_batch, &n.b)) {
        snprintf(msg, msglen, "out of memory for the batch");
        rc = -1;
    }
    if (rc) {
        replica_free(&n);
        return -1;
    }
    *r = n;
    return 0;
}

/* Loads FILE on this rank alone into a new replica and swaps it in; the old
 * one stays on failure. */
static void replica_reload(serve_sched *s, const char *file, reload_msg *m) {
    double t0 = spmd_now();
    gpt *g = NULL;
    ckpt_meta meta = {0};
    replica n = {0};
    memset(m, 0, sizeof *m);
    snprintf(m->file, sizeof m->file, "%s", file);
    int rc = gptio_open(MPI_COMM_SELF, file, &g, &meta, m->err, sizeof m->err);
    if (!rc) {
        const gpt_config *c = gpt_cfg(g);
        if (memcmp(c, &s->cfg, sizeof *c)) {
            snprintf(m->err, sizeof m->err,
                     "the model shape changed (%d layers, %d embd, context %d); a reload keeps "
                     "the shape",
                     c->n_layer, c->n_embd, c->block_size);
            rc = -1;
        }
    }
    if (!rc) {
        rc = replica_make(&n, g, file, meta.step, s->o.max_batch, s->o.kv_budget, m->err,
                          sizeof m->err);
        g = NULL; /* taken over, freed on failure */
    }
    gpt_destroy(g);
    free(meta.config);
    m->seconds = spmd_now() - t0;
    if (rc) {
        if (!s->o.quiet)
            fprintf(stderr, "serve: reload of %s failed on rank %d: %s; keeping step %lld\n", file,
                    s->rank, m->err, s->rep.step);
        m->step = s->rep.step;
        return;
    }
    replica_free(&s->rep);
    s->rep = n;
    m->ok = 1;
    m->step = n.step;
    if (!s->o.quiet)
        fprintf(stderr, "serve: reloaded %s (step %lld) on rank %d in %.3f s%s\n", file, n.step,
                s->rank, m->seconds, n.nquant ? " (quantized)" : "");
}

static int send_result(serve_sched *s, wjob *j, int failed, const char *why) {
    int nt = failed ? 0 : j->r.n_tokens;
    size_t n = sizeof(res_msg) + (size_t)nt * sizeof(int);
    char *buf = calloc(1, n);
    if (!buf) return -1;
    res_msg *m = (res_msg *)buf;
    long long steps = 0, rows = 0;
    if (s->rep.e) infer_batch_stats(s->rep.e, &steps, &rows);
    *m = (res_msg){.id = j->id,
                   .step = s->rep.step,
                   .steps = steps,
                   .rows = rows,
                   .prompt_ms = j->r.prompt_ms,
                   .decode_ms = j->r.decode_ms,
                   .ttft_ms = j->r.ttft_ms,
                   .latency_ms = j->r.latency_ms,
                   .failed = failed,
                   .n_tokens = nt,
                   .generated = failed ? 0 : j->r.generated,
                   .finish = j->r.finish};
    if (why) snprintf(m->err, sizeof m->err, "%s", why);
    if (nt) memcpy(buf + sizeof(res_msg), j->r.tokens, (size_t)nt * sizeof(int));
    return send_buf(s, s->up, 0, TAG_RESULT, buf, n);
}

static void wjob_free(wjob *j) {
    if (!j) return;
    infer_result_free(&j->r);
    free(j->prompt), free(j->stop);
    free(j);
}

/* A job message arrives: it joins the batch at once (prefill). */
static int worker_take_job(serve_sched *s, const char *buf, int len) {
    const job_msg *m = (const job_msg *)buf;
    if ((size_t)len < sizeof *m ||
        (size_t)len != sizeof *m + (size_t)m->n_prompt * sizeof(int) + (size_t)m->stop_len)
        return -1;
    wjob *j = calloc(1, sizeof *j);
    if (!j) return -1;
    j->id = m->id;
    j->t_recv = spmd_now();
    j->prompt = malloc((size_t)m->n_prompt * sizeof(int) + 1);
    if (m->stop_len) j->stop = malloc((size_t)m->stop_len + 1);
    if (!j->prompt || (m->stop_len && !j->stop)) {
        wjob_free(j);
        return -1;
    }
    memcpy(j->prompt, buf + sizeof *m, (size_t)m->n_prompt * sizeof(int));
    if (m->stop_len) {
        memcpy(j->stop, buf + sizeof *m + (size_t)m->n_prompt * sizeof(int), (size_t)m->stop_len);
        j->stop[m->stop_len] = 0;
    }
    j->q = (infer_request){.prompt = j->prompt,
                           .n_prompt = m->n_prompt,
                           .max_new_tokens = m->max_new,
                           .sampling = {m->temperature, m->top_k, m->top_p, m->seed},
                           .stop = j->stop};
    int rc = infer_batcher_add(s->rep.b, &j->q, &j->r, j->t_recv, j);
    if (rc < 0) { /* the scheduler checked room and prompt: should not happen */
        int r2 = send_result(s, j, 1, "the replica could not start the request");
        wjob_free(j);
        return r2;
    }
    return 0; /* finished at once (rc 1): popped with the others */
}

static int worker_send_finished(serve_sched *s) {
    void *tag;
    while (infer_batcher_pop(s->rep.b, &tag)) {
        wjob *j = tag;
        int rc = send_result(s, j, 0, NULL);
        wjob_free(j);
        if (rc) return -1;
    }
    return 0;
}

/* One turn of a worker: orders in, reload when drained, one decode step. */
static void worker_turn(serve_sched *s, int *progress, int *finished) {
    void *buf;
    int len, tag, from;
    while (1) {
        if (recv_any(s->down, 0, &buf, &len, &tag, &from)) fatal(s, "receiving an order failed");
        if (!buf) break;
        *progress = 1;
        if (tag == TAG_JOB) {
            if (worker_take_job(s, buf, len) || worker_send_finished(s))
                fatal(s, "out of memory taking a request");
        } else if (tag == TAG_RELOAD) {
            snprintf(s->reload_file, sizeof s->reload_file, "%.*s", len, (char *)buf);
            s->reload_pending = 1;
        } else if (tag == TAG_STOP)
            s->stop = 1;
        free(buf);
    }
    if (s->reload_pending && infer_batcher_running(s->rep.b) == 0) {
        reload_msg *m = malloc(sizeof *m);
        if (!m) fatal(s, "out of memory");
        replica_reload(s, s->reload_file, m);
        s->reload_pending = 0;
        if (send_buf(s, s->up, 0, TAG_RELOADED, m, sizeof *m)) fatal(s, "sending failed");
        *progress = 1;
    }
    if (infer_batcher_running(s->rep.b) > 0) {
        if (infer_batcher_step(s->rep.b)) fatal(s, "a decode step failed (out of memory?)");
        if (worker_send_finished(s)) fatal(s, "sending a result failed");
        *progress = 1;
    }
    if (s->stop && infer_batcher_running(s->rep.b) == 0 && !s->reload_pending) *finished = 1;
}

/* ---------------- scheduler (rank 0) ---------------- */

int serve_sched_submit(serve_sched *s, serve_job *j) {
    j->kv = infer_kv_need(&s->cfg, j->n_prompt, j->max_new_tokens);
    if (j->kv > s->o.kv_budget) {
        snprintf(j->err, sizeof j->err,
                 "needs %.2f MiB of KV cache (prompt %d + max_new_tokens %d), more than the "
                 "budget of %.2f MiB per replica (--kv-budget-mb)",
                 j->kv / 1048576.0, j->n_prompt, j->max_new_tokens, s->o.kv_budget / 1048576.0);
        return -1;
    }
    j->id = s->next_id++;
    j->next = NULL;
    j->failed = 0;
    j->tokens = NULL;
    if (s->qtail)
        s->qtail->next = j;
    else
        s->qhead = j;
    s->qtail = j;
    s->nqueued++;
    return 0;
}

int serve_sched_cancel_queued(serve_sched *s, const char *why) {
    int n = 0;
    double now = spmd_now();
    while (s->qhead) {
        serve_job *j = s->qhead;
        s->qhead = j->next;
        s->nqueued--;
        j->next = NULL;
        j->failed = 1;
        snprintf(j->err, sizeof j->err, "%s", why);
        j->latency_ms = (now - j->t_arrival) * 1e3;
        n++;
        s->h->done(s->h->ctx, s, j);
    }
    s->qtail = NULL;
    return n;
}

void serve_sched_stats(const serve_sched *s, serve_stats *st) {
    memset(st, 0, sizeof *st);
    st->queued = s->nqueued;
    st->replicas = s->P - s->w0;
    st->kv_budget = (long long)(s->o.kv_budget * (size_t)st->replicas);
    for (int r = s->w0; r < s->P; r++) {
        st->running += s->w[r].running;
        st->kv_reserved += (long long)s->w[r].kv;
        st->decode_steps += s->w[r].steps;
        st->decode_rows += s->w[r].rows;
    }
    st->reloads_ok = s->reloads_ok;
    st->reloads_failed = s->reloads_failed;
    st->model_step = s->model_step;
    snprintf(st->model, sizeof st->model, "%s", s->model);
}

static int dispatch(serve_sched *s, serve_job *j, int r) {
    size_t n =
        sizeof(job_msg) + (size_t)j->n_prompt * sizeof(int) + (j->stop ? strlen(j->stop) : 0);
    char *buf = malloc(n);
    if (!buf) return -1;
    job_msg *m = (job_msg *)buf;
    *m = (job_msg){.id = j->id,
                   .seed = j->sampling.seed,
                   .temperature = j->sampling.temperature,
                   .top_p = j->sampling.top_p,
                   .top_k = j->sampling.top_k,
                   .n_prompt = j->n_prompt,
                   .max_new = j->max_new_tokens,
                   .stop_len = j->stop ? (int)strlen(j->stop) : 0};
    memcpy(buf + sizeof *m, j->prompt, (size_t)j->n_prompt * sizeof(int));
    if (m->stop_len)
        memcpy(buf + sizeof *m + (size_t)j->n_prompt * sizeof(int), j->stop, (size_t)m->stop_len);
    j->worker = r;
    j->t_dispatch = spmd_now();
    s->w[r].running++;
    s->w[r].kv += j->kv;
    j->next = s->inflight;
    s->inflight = j;
    return send_buf(s, s->down, r, TAG_JOB, buf, n);
}

/* Least-loaded replica with a free slot and room in its KV budget for j;
 * -1: none (j waits). */
static int pick(const serve_sched *s, const serve_job *j) {
    int best = -1;
    for (int r = s->w0; r < s->P; r++) {
        const wview *w = &s->w[r];
        if (w->reloading || w->running >= s->o.max_batch || w->kv + j->kv > s->o.kv_budget)
            continue;
        if (best < 0 || w->running < s->w[best].running ||
            (w->running == s->w[best].running && w->kv < s->w[best].kv))
            best = r;
    }
    return best;
}

/* A result from worker `from` arrives: hand the job back to the caller. */
static int sched_take_result(serve_sched *s, const serve_sched_hooks *h, const char *buf, int len,
                             int from) {
    const res_msg *m = (const res_msg *)buf;
    if ((size_t)len < sizeof *m || (size_t)len != sizeof *m + (size_t)m->n_tokens * sizeof(int))
        return -1;
    serve_job **pp = &s->inflight;
    while (*pp && (*pp)->id != m->id)
        pp = &(*pp)->next;
    serve_job *j = *pp;
    if (!j) return -1;
    *pp = j->next;
    j->next = NULL;
    wview *w = &s->w[from];
    w->running--;
    w->kv -= j->kv;
    w->steps = m->steps, w->rows = m->rows;
    double now = spmd_now(), queue_ms = (j->t_dispatch - j->t_arrival) * 1e3;
    j->failed = m->failed;
    snprintf(j->err, sizeof j->err, "%s", m->err);
    j->n_tokens = m->n_tokens;
    j->generated = m->generated;
    j->finish = m->finish;
    j->model_step = m->step;
    j->prompt_ms = m->prompt_ms;
    j->decode_ms = m->decode_ms;
    j->ttft_ms = queue_ms + m->ttft_ms;
    j->latency_ms = (now - j->t_arrival) * 1e3;
    j->tokens = malloc((size_t)m->n_tokens * sizeof(int) + 1);
    if (!j->tokens) return -1;
    memcpy(j->tokens, buf + sizeof *m, (size_t)m->n_tokens * sizeof(int));
    h->done(h->ctx, s, j);
    return 0;
}

static void sched_take_reloaded(serve_sched *s, const reload_msg *m, int from) {
    wview *w = &s->w[from];
    w->reloading = 0;
    if (m->ok) {
        s->reloads_ok++;
        w->step = m->step;
        if (m->step >= s->model_step) {
            s->model_step = m->step;
            snprintf(s->model, sizeof s->model, "%s", m->file);
        }
    } else
        s->reloads_failed++;
}

/* --watch: a new `latest` becomes the target; replicas reload one at a
 * time, so the others keep serving. */
static void sched_watch(serve_sched *s, int draining) {
    if (!s->o.watch || draining) return; /* no new reload while shutting down */
    double now = spmd_now();
    if (now >= s->next_watch) {
        s->next_watch = now + s->o.watch_interval;
        char file[1024], msg[512];
        /* a root whose `latest` is being replaced, or points to a step being
         * removed, is looked at again next time */
        if (ckpt_resolve(s->o.watch, file, sizeof file, msg, sizeof msg) == 0 &&
            strcmp(file, s->target)) {
            snprintf(s->target, sizeof s->target, "%s", file);
            if (!s->o.quiet)
                fprintf(stderr, "serve: new checkpoint %s; reloading %d replica(s)\n", file,
                        s->P - s->w0);
        }
    }
    for (int r = s->w0; r < s->P; r++)
        if (s->w[r].reloading) return;
    for (int r = s->w0; r < s->P; r++)
        if (strcmp(s->w[r].tried, s->target)) {
            wview *w = &s->w[r];
            char *buf = strdup(s->target);
            snprintf(w->tried, sizeof w->tried, "%s", s->target);
            w->reloading = 1;
            if (!buf || send_buf(s, s->down, r, TAG_RELOAD, buf, strlen(s->target)))
                fatal(s, "sending a reload order failed");
            return;
        }
}

/* One turn of the scheduler. */
static void sched_turn(serve_sched *s, const serve_sched_hooks *h, int *draining, int *progress,
                       int *finished) {
    void *buf;
    int len, tag, from;
    while (1) {
        if (recv_any(s->up, MPI_ANY_SOURCE, &buf, &len, &tag, &from))
            fatal(s, "receiving a result failed");
        if (!buf) break;
        *progress = 1;
        if (tag == TAG_RESULT) {
            if (sched_take_result(s, h, buf, len, from)) fatal(s, "bad result message");
        } else if (tag == TAG_RELOADED && (size_t)len == sizeof(reload_msg))
            sched_take_reloaded(s, buf, from);
        free(buf);
    }
    long long before = s->next_id;
    if (h->poll(h->ctx, s)) *draining = 1; /* called every turn: it may also cancel */
    if (s->next_id != before) *progress = 1;
    sched_watch(s, *draining);
    while (s->qhead) {
        int r = pick(s, s->qhead);
        if (r < 0) break;
        serve_job *j = s->qhead;
        s->qhead = j->next;
        if (!s->qhead) s->qtail = NULL;
        s->nqueued--;
        if (dispatch(s, j, r)) fatal(s, "sending a request failed");
        *progress = 1;
    }
    int busy = s->qhead || s->inflight;
    for (int r = s->w0; r < s->P; r++)
        busy |= s->w[r].reloading;
    if (*draining && !busy) {
        for (int r = s->w0; r < s->P; r++) {
            char *b = malloc(1);
            if (!b || send_buf(s, s->down, r, TAG_STOP, b, 0)) fatal(s, "sending stop failed");
        }
        *finished = 1;
    }
}

/* ---------------- the loop ---------------- */

int serve_sched_run(MPI_Comm comm, gpt *g, const char *file, long long step,
                    const serve_sched_opts *o, const serve_sched_hooks *h, char *msg,
                    size_t msglen) {
    serve_sched s = {.down = MPI_COMM_NULL, .up = MPI_COMM_NULL, .o = *o, .h = h};
    int err = 0, rc = 0;
    MPI_Comm_rank(comm, &s.rank);
    MPI_Comm_size(comm, &s.P);
    s.w0 = s.P > 1 ? 1 : 0;
    s.cfg = *gpt_cfg(g);
    s.model_step = step;
    snprintf(s.model, sizeof s.model, "%s", file);
    msg[0] = 0;
    MPI_CHECK(MPI_Comm_dup(comm, &s.down));
    MPI_CHECK(MPI_Comm_dup(comm, &s.up));
    MPI_Comm_set_errhandler(s.down, MPI_ERRORS_RETURN);
    MPI_Comm_set_errhandler(s.up, MPI_ERRORS_RETURN);
    int worker = s.rank >= s.w0;
    if (worker)
        rc = replica_make(&s.rep, g, file, step, o->max_batch, o->kv_budget, msg, msglen);
    else
        gpt_destroy(g);
    g = NULL;
    if (s.rank == 0) {
        s.w = calloc((size_t)s.P, sizeof *s.w);
        if (!s.w) {
            snprintf(msg, msglen, "out of memory");
            rc = -1;
        } else
            for (int r = 0; r < s.P; r++) {
                snprintf(s.w[r].tried, sizeof s.w[r].tried, "%s", file);
                s.w[r].step = step;
            }
        snprintf(s.target, sizeof s.target, "%s", file);
    }
    if (spmd_agree(comm, rc, "mpilm serve", msg)) {
        rc = -1;
        goto done;
    }
    if (s.rank == 0 && !o->quiet && s.P > 1)
        fprintf(stderr,
                "serve: rank 0 schedules, %d worker replica(s) x %d slots, KV budget %.2f MiB "
                "each\n",
                s.P - 1, o->max_batch, o->kv_budget / 1048576.0);
    int sched_done = s.rank != 0, worker_done = !worker, draining = 0, idle = 0;
    while (!sched_done || !worker_done) {
        int progress = 0;
        if (!sched_done) sched_turn(&s, h, &draining, &progress, &sched_done);
        if (!worker_done) worker_turn(&s, &progress, &worker_done);
        if (sends_progress(&s, 0)) fatal(&s, "a send failed");
        idle = progress ? 0 : idle + 1;
        if (idle) {
            /* idle ranks leave the cores: 0.1 ms naps, 1 ms after ~10 ms of
             * nothing (what a request arriving at an idle server waits) */
            struct timespec ts = {0, idle < 100 ? 100000 : 1000000};
            nanosleep(&ts, NULL);
        }
    }
    if (sends_progress(&s, 1)) fatal(&s, "a send failed");
done:
    if (err) rc = -1;
    replica_free(&s.rep);
    gpt_destroy(g);
    free(s.w);
    free(s.ps);
    if (s.down != MPI_COMM_NULL) MPI_Comm_free(&s.down);
    if (s.up != MPI_COMM_NULL) MPI_Comm_free(&s.up);
    return rc;
}
