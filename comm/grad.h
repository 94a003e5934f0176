/* comm_grad: the data-parallel gradient reducer of `mpilm train`.
 *
 * One flat float buffer made of tensors (given in buffer order with their
 * sizes and shapes) is summed (COMM_SUM) over the data-parallel communicator
 * once per step. The buffer is cut into fusion buckets of at most
 * `bucket_mb` MiB that follow tensor boundaries (a tensor larger than the
 * limit is a bucket of its own; bucket_mb <= 0: one bucket for everything),
 * each bucket a contiguous range of the buffer, reduced in buffer order.
 *
 * Per bucket, one of:
 *   - the fixed algorithm named by `strategy` (comm_ar table name);
 *   - `strategy = "adaptive"`: the selector's (comm/select.h) pick for the
 *     bucket's byte size; the selector is created once (thresholds and
 *     fallback from the job), each bucket's measured time is recorded
 *     (comm_sel_record: one extra MPI_Allreduce of a double per bucket), and
 *     a re-selection event is printed as one "comm: ..." line to `log`;
 *   - compression (`cx_type` not "none"): comm_cx_allreduce with one comm_cx
 *     context per bucket (error feedback, warm-up and min_ratio as in
 *     comm/compress.h). The dense all-reduces of the compressor (warm-up,
 *     fallback, PowerSGD's P and Q) go through the bucket's algorithm above
 *     (fixed, or the selector's current pick). For powersgd the bucket is
 *     staged into a scratch buffer with its 2-D tensors first (as the
 *     compressor's matrices, rows x cols of the tensor's shape) and its 1-D
 *     tensors after (all-reduced dense in the same calls), and copied back.
 *
 * Compression type names: "none", "fp16", "bf16", "int8", "int4", "int2",
 * "topk", "powersgd", and "int" which takes the width from `bits` (8, 4 or
 * 2, else COMM_ERR_ARG). Quantizers round to nearest when error feedback is
 * on (the residual carries the rounding error, and for int2 nearest keeps it
 * within absmax/(2L-1), see comm_cx_opts.stochastic) and stochastically
 * (unbiased) when it is off.
 *
 * With one rank in the communicator (dp == 1) nothing is created beyond the
 * bucket table and comm_grad_reduce is a no-op that still fills the stats
 * (0 bytes, compression "none").
 *
 * Everything collective is identical on all ranks of the communicator as
 * long as they pass the same tensors and options (true for the dp ranks of
 * one (tp, pp) coordinate). Not here: where the gradients come from. Errors: 0 or a negative
 * COMM_ERR_* (comm/allreduce.h), one line printed.
 */
#ifndef MPILM_COMM_GRAD_H
#define MPILM_COMM_GRAD_H

#include "comm/allreduce.h"

#include <mpi.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/* One tensor of the buffer, in buffer order (tensors tile the buffer). */
typedef struct {
    size_t numel;
    int ndim;     /* 1 or 2 */
    int shape[2]; /* rows, cols for ndim == 2 (rows * cols == numel) */
} comm_grad_tensor;

typedef struct {
    const char *strategy;               /* comm_ar table name or "adaptive" */
    double bw_threshold, lat_threshold; /* bytes/s, s; 0: none (adaptive) */
    const char *fallback;               /* adaptive's fallback; NULL: parameter_server */
    double bucket_mb;                   /* MiB per bucket; <= 0: one bucket */
    int overlap;  /* reduce buckets on a background thread (needs MPI_THREAD_MULTIPLE) */
    int ps_ranks; /* comm_ar_opts.ps_ranks */
    /* compression */
    const char *cx_type; /* NULL or "none": dense */
    double ratio, min_ratio;
    int bits, rank, error_feedback, warmup_steps;
    uint64_t seed;
    FILE *log; /* where events go ("comm: ..." lines); NULL: nowhere */
} comm_grad_opts;

typedef struct {
    uint64_t bytes_sent; /* by this rank in this call */
    double seconds;      /* wall time of the call (comm_grad_finish: the wait) on this rank */
    double busy_seconds; /* time spent reducing buckets (hidden or not) */
    int n_buckets;
    char algorithm[64];   /* "ring", "adaptive:ring", "adaptive:mixed", ... */
    char compression[32]; /* "none", "dense" (warm-up / not worth it), or the type */
} comm_grad_stats;

typedef struct comm_grad comm_grad;

/* Collective over comm. Tensors tile the buffer of sum(numel) floats. On
 * error *out is NULL and (for errors in the options) every rank returns the
 * same code. */
int comm_grad_create(MPI_Comm comm, const comm_grad_opts *o, const comm_grad_tensor *t, int nt,
                     comm_grad **out);
/* Collective. NULL-safe. */
void comm_grad_destroy(comm_grad *g);

/* Collective: grads (the whole buffer) := its SUM over the ranks. step: the
 * training step (compression warm-up, random streams). st may be NULL. */
int comm_grad_reduce(comm_grad *g, float *grads, int step, comm_grad_stats *st);

/* The same in three parts, for overlap with backward: begin (local) starts
 * the step; ready (local) declares tensors [t0, t1) final — with `overlap`
 * the background thread reduces a bucket as soon as all its tensors are,
 * while the caller goes on computing (it must not touch those tensors until
 * finish); finish (collective) declares the rest final, waits, and gives
 * the stats (seconds: the time finish waited, i.e. the communication not
 * hidden). Buckets are reduced last to first on every rank, the order in
 * which backward produces them; results equal comm_grad_reduce's bit for
 * bit. Without `overlap`, all the work happens in finish. */
int comm_grad_begin(comm_grad *g, float *grads, int step);
void comm_grad_ready(comm_grad *g, int t0, int t1);
int comm_grad_finish(comm_grad *g, comm_grad_stats *st);
int comm_grad_overlaps(const comm_grad *g);
/* Local, the same on all ranks: whether the call of `step` compresses at
 * least one bucket (0 during warm-up, for type none, one rank, or when
 * min_ratio made every bucket dense). */
int comm_grad_compresses(const comm_grad *g, int step);

/* Local: the compressors' state that exact resume needs (error-feedback
 * residuals, PowerSGD's Q), all buckets concatenated; it depends on the
 * rank count and the buckets, so restore it only into a reducer made with
 * the same options on the same layout. comm_grad_state returns its length
 * and copies it to buf unless buf is NULL (0: no state, e.g. dense or one
 * rank); comm_grad_set_state restores it (COMM_ERR_ARG if n differs). Not
 * during a step. */
size_t comm_grad_state(comm_grad *g, float *buf);
int comm_grad_set_state(comm_grad *g, const float *buf, size_t n);

/* Local: one line (no newline) describing the set-up, e.g.
 * "adaptive (3 buckets, 25 MiB) | compression int4 (error feedback, warm-up 50)". */
const char *comm_grad_describe(const comm_grad *g, char *buf, size_t len);
/* Local (call on one rank): for adaptive, the probe summary of the selector
 * and its choice for the sizes of the buckets and for 8 B and 64 MiB; for a
 * fixed strategy nothing. */
void comm_grad_explain(const comm_grad *g, FILE *f);

int comm_grad_n_buckets(const comm_grad *g);
/* Total bytes this rank sent through the reducer so far. */
uint64_t comm_grad_total_bytes(const comm_grad *g);

#endif
