/* serve_sched: the serving loop of `mpilm serve` over the ranks of a
 * communicator (issue 8).
 *
 * Rank 0 is the scheduler: it keeps a FIFO queue of requests and hands the
 * head of the queue to the least-loaded replica that has a free batch slot
 * and enough free KV-cache budget for the request's prompt + max_new_tokens
 * (reserved on admission, so a running sequence is never evicted); when no
 * replica has room the request waits, it is never dropped. Ranks 1..P-1 are
 * workers, each with a whole-model replica running a continuous-batching
 * loop (src/infer.h: new requests join between decode steps, finished ones
 * leave and are sent back at once). Alone, rank 0 runs the replica itself in
 * the same loop. Inside the loop only non-blocking point-to-point messages
 * (Isend/Iprobe), no collectives, and MPI only from the calling thread.
 *
 * Hot reload (opts.watch): rank 0 looks at the root's `latest` every
 * watch_interval seconds; on a new step the replicas, one at a time, stop
 * admitting, finish their running sequences, load the new weights (fp32 or
 * quantized) and resume, while rank 0 keeps queueing. A failed load keeps
 * the old weights. Every result carries the step of the weights that made it.
 *
 * Not here: JSON, files, HTTP (src/serve.c, src/serve_http.c), the engine.
 */
#ifndef MPILM_SERVE_SCHED_H
#define MPILM_SERVE_SCHED_H

#include "src/gpt.h"
#include "src/infer.h"

#include <mpi.h>
#include <stddef.h>

typedef struct {
    int max_batch;         /* sequences running at once per replica */
    size_t kv_budget;      /* KV-cache bytes per replica */
    const char *watch;     /* checkpoint root whose `latest` is followed, or NULL */
    double watch_interval; /* seconds between two looks at `latest` */
    int quiet;             /* no reload log lines */
} serve_sched_opts;

/* One request. The caller fills the request part and keeps the job (and
 * prompt, stop) alive until the done hook has seen it. */
typedef struct serve_job {
    const int *prompt;
    int n_prompt, max_new_tokens;
    infer_sampling sampling;
    const char *stop; /* bytes, or NULL */
    double t_arrival; /* spmd_now() on rank 0 */
    void *user;
    /* result, filled before the done hook */
    int failed; /* 1: err says why, no tokens */
    char err[256];
    int *tokens; /* malloc'ed; free with serve_job_clear */
    int n_tokens, generated, finish;
    long long model_step;
    double prompt_ms, decode_ms, ttft_ms, latency_ms; /* ttft, latency: from t_arrival */
    /* the scheduler's */
    long long id;
    size_t kv;
    int worker;
    double t_dispatch;
    struct serve_job *next;
} serve_job;

void serve_job_clear(serve_job *j); /* frees the tokens */

/* A snapshot of rank 0's view (for /metrics, /health, the summary). */
typedef struct {
    long long queued, running, replicas;
    long long kv_reserved, kv_budget; /* bytes, all replicas together */
    long long reloads_ok, reloads_failed, model_step;
    long long decode_steps, decode_rows; /* summed over replicas */
    char model[1024];                    /* checkpoint file served (newest) */
} serve_stats;

typedef struct serve_sched serve_sched;

typedef struct {
    /* Rank 0, once per loop turn: may call serve_sched_submit. Returns 1
     * once no more requests will come: the loop then ends when the queue
     * and the replicas are empty (poll is still called every turn). */
    int (*poll)(void *ctx, serve_sched *s);
    /* Rank 0: job j finished (result or failure). */
    void (*done)(void *ctx, serve_sched *s, serve_job *j);
    void *ctx;
} serve_sched_hooks;

/* Collective over comm. g: the model of checkpoint FILE (step `step`),
 * loaded on every rank; serve_sched_run takes it over (rank 0 frees it at
 * once when it has no replica; reloads replace it). Runs until poll says
 * the end and everything is answered. 0, or -1 with a message when a
 * replica could not be set up (agreed by all ranks). An MPI failure or
 * running out of memory inside the loop aborts the job (MPI_Abort): the
 * other ranks could not be told otherwise. */
int serve_sched_run(MPI_Comm comm, gpt *g, const char *file, long long step,
                    const serve_sched_opts *o, const serve_sched_hooks *h, char *err,
                    size_t errlen);

/* Rank 0, from the poll hook: queues j (FIFO). -1 with j->err set when it
 * can never fit the KV-cache budget of a replica (the job is not queued). */
int serve_sched_submit(serve_sched *s, serve_job *j);
void serve_sched_stats(const serve_sched *s, serve_stats *st);
/* Rank 0, from the poll hook: every queued (not yet running) job fails with
 * `why` and goes to the done hook; returns how many. */
int serve_sched_cancel_queued(serve_sched *s, const char *why);

#endif
