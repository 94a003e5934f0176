/* comm_cx: gradient compression with error feedback around a data-parallel
 * all-reduce. One context per gradient buffer (bucket) of a fixed length;
 * comm_cx_allreduce() is a drop-in for a dense all-reduce of that buffer.
 *
 * Compressors (comm_cx_type, names for config: "none", "fp16", "bf16",
 * "int8", "int4", "int2", "topk", "powersgd"):
 *   fp16, bf16   casts, round to nearest even; finite values beyond the
 *                format's range saturate to its largest finite value (the
 *                excess goes into the residual) instead of becoming inf.
 *                Error: |x - y| <= 2^-11 |x| (fp16, |x| in [2^-14, 65504]),
 *                <= 2^-25 (fp16 subnormal range), <= 2^-8 |x| (bf16 normal).
 *   int8/4/2     blocks of `block` (default 256) elements, one fp32 scale
 *                s = absmax / L per block, L = 127, 7, 1 (codes -L..L;
 *                int2 is ternary, QSGD s=1 style); stochastic rounding
 *                q = floor(x/s + u), u uniform: E[q s] = x (unbiased) and
 *                |x - q s| <= s (up to one fp32 rounding of q*s). The
 *                uniforms are a 32-bit counter hash of (seed, step, rank,
 *                stage, element), so a run is reproducible; computed in
 *                float, 8 lanes at a time, with an exact fma remainder
 *                that keeps the bounds. 8.125 / 4.125 / 2.125 bits/value.
 *   topk         the k = ceil(ratio n) largest |values| (ties: lower index
 *                first), sent as (uint32 index, fp32 value) pairs with one
 *                MPI_Allgather and summed into a dense buffer. Needs
 *                n < 2^32. Selection in O(n) without sorting: a histogram
 *                of the 11 leading magnitude bits (in the pass that adds
 *                the residual), one scan gathering the threshold bucket
 *                and above, a radix select on those candidates.
 *   powersgd     rank-r PowerSGD (Vogels et al. 2019) with warm start: for
 *                each matrix M (rows x cols, given by the caller as
 *                consecutive segments of the buffer) P = M Q, all-reduce P,
 *                orthonormalize (Gram-Schmidt), Q = M^T P, all-reduce Q,
 *                result P Q^T; Q is kept for the next step. Segments that
 *                are not matrices (the rest of the buffer) or would not
 *                compress by min_ratio are all-reduced dense in the same
 *                calls.
 *
 * Exchange of the quantizers (fp16..int2): compressed reduce-scatter then
 * compressed all-gather. The buffer is cut into p chunks (whole blocks);
 * every rank encodes each chunk and sends it to the chunk's owner
 * (MPI_Alltoallv); the owner decodes the p messages in rank order, sums
 * (and averages), encodes the result again (stage 2, with its own residual:
 * "server-side" error feedback, rounding to nearest when error feedback is
 * on, stochastic when off) and all ranks MPI_Allgatherv the encoded
 * chunks and decode them. Bytes sent: 2 (p-1)/p x compressed size, i.e. the
 * dense ring all-reduce divided by the compression ratio.
 *
 * Node-aware exchange of the quantizers (node_aware, default on; used when
 * the communicator spans N > 1 nodes of q > 1 ranks each, equal sizes):
 * a dense MPI_Reduce_scatter inside the node leaves local rank l with the
 * node's sum of segment l (1/q of the buffer, whole blocks); the ranks with
 * local rank l on all nodes run the compressed reduce-scatter + all-gather
 * above on that segment (error feedback on the node sum: this rank's
 * residual lives in its segment); an MPI_Allgatherv inside the node
 * spreads the encoded segments and every rank decodes the whole buffer
 * from the same bytes. Bytes on the inter-node links: q times fewer per
 * node than the flat exchange; bytes sent per rank add the intra-node
 * (q-1)/q (4n + compressed size) (comm_cx_node_bytes). Nodes: opts.node_of_rank,
 * or MPI_Comm_split_type(MPI_COMM_TYPE_SHARED) (comm/topo.h; on the
 * emulated cluster each network namespace is its own host).
 *
 * Result: the SUM or AVG (comm_op) of all ranks' compressed gradients,
 * bitwise identical on every rank (each value is decoded from the same
 * messages in the same order everywhere, or computed by one rank and sent).
 *
 * Cost: every stage is one vectorized pass over the buffer (error-feedback
 * sum, encode and new residual fused; decode and sum fused) with buffers
 * allocated at create; `mpilm bench compress --micro` times each phase
 * (comm_cx_phase_times).
 *
 * Error feedback (default on): the residual (input + old residual - what
 * this rank transmitted) is kept per element and added to the next step's
 * gradient. comm_cx_residual() exposes it for checkpoints; PowerSGD's Q
 * (comm_cx_state) is needed too for bitwise exact resume.
 *
 * Dense steps: while step < warmup_steps, for type "none", and when the
 * compressor would not cut this rank's bytes by at least min_ratio (model
 * below, decided once per context; topk then is dense at high density), the
 * buffer goes through the dense all-reduce (comm_cx_set_dense, default an
 * MPI_Reduce + MPI_Bcast) with the pending residual flushed into it.
 * Compression ratio model (dense ring all-reduce = 2 (p-1)/p 4n bytes):
 * quantizers 4n / encoded bytes; topk n / (p k); powersgd per matrix
 * rows cols / (r (rows + cols)).
 *
 * With one rank (or comm == MPI_COMM_NULL, a purely local context that
 * needs no MPI_Init) the same compression is applied and nothing is sent,
 * so single-process tests and runs see the compressed numerics.
 *
 * Not here: choosing buckets, the trainer's config keys, GPU buffers.
 * Errors: 0 or a negative COMM_ERR_* (comm/allreduce.h), one line printed.
 */
#ifndef MPILM_COMM_COMPRESS_H
#define MPILM_COMM_COMPRESS_H

#include <mpi.h>
#include <stddef.h>
#include <stdint.h>

#include "comm/allreduce.h"

typedef enum {
    COMM_CX_NONE = 0,
    COMM_CX_FP16,
    COMM_CX_BF16,
    COMM_CX_INT8,
    COMM_CX_INT4,
    COMM_CX_INT2,
    COMM_CX_TOPK,
    COMM_CX_POWERSGD,
    COMM_CX_NTYPES
} comm_cx_type;

/* "none", "fp16", ...; NULL for an invalid type. */
const char *comm_cx_type_name(comm_cx_type t);
/* Name -> type; also "int" with bits via comm_cx_int_type. 0 or COMM_ERR_ARG. */
int comm_cx_type_from_name(const char *name, comm_cx_type *out);
/* bits 8, 4, 2 -> COMM_CX_INT8/4/2; COMM_CX_NTYPES for other bits. */
comm_cx_type comm_cx_int_type(int bits);

typedef struct {
    comm_cx_type type;
    double ratio;       /* topk: fraction kept, (0, 1]. Default 0.01 */
    int rank;           /* powersgd rank r >= 1. Default 4 */
    int error_feedback; /* 1 (default) or 0 */
    int warmup_steps;   /* dense while step < warmup_steps. Default 0 */
    double min_ratio;   /* >= 1; compress only if bytes shrink this much. 1.5 */
    uint64_t seed;      /* stochastic rounding, PowerSGD's initial Q. 1 */
    size_t block;       /* int8/4/2 elements per scale, >= 1. Default 256 */
    /* int8/4/2: 1 (default) stochastic rounding (unbiased); 0 round to
     * nearest (biased, error <= s/2). With error feedback, nearest keeps the
     * residual within absmax(g)/(2L-1) for any L; stochastic only bounds it
     * by the block scale of g + residual, which for int2 (L = 1) lets the
     * residual settle at several times |g| (measured: ~3x rms) */
    int stochastic;
    /* powersgd: the buffer starts with n_mats row-major matrices, matrix m
     * of mat_rows[m] x mat_cols[m] elements, one after the other; the rest
     * of the buffer is dense. n_mats == 0: everything is dense. The arrays
     * are copied at create. */
    size_t n_mats;
    const size_t *mat_rows, *mat_cols;
    /* quantizers: 1 (default) node-aware exchange where the layout allows
     * (see above), 0 flat over all ranks */
    int node_aware;
    /* node id of every rank of the communicator (any labels, the same on
     * all ranks; copied at create), e.g. to test the node-aware path on one
     * host; NULL: MPI's shared-memory split */
    const int *node_of_rank;
} comm_cx_opts;

/* Fills the defaults above (type none). */
void comm_cx_opts_default(comm_cx_opts *o);

typedef struct comm_cx comm_cx;

/* Collective over comm (MPI_Comm_dup), or local when comm == MPI_COMM_NULL.
 * count: the buffer length every comm_cx_allreduce call will use. Options
 * must be the same on all ranks; invalid ones give COMM_ERR_ARG on every
 * rank. *out is NULL on error. */
int comm_cx_create(MPI_Comm comm, const comm_cx_opts *opts, size_t count, comm_cx **out);
/* Collective (frees the communicator). NULL-safe. */
void comm_cx_destroy(comm_cx *cx);

/* Local. Dense all-reduces (warm-up, fallback, PowerSGD's P and Q) go
 * through fn on ar, whose communicator must hold the same ranks in the same
 * order as the context's; its bytes are counted from comm_ar_bytes_sent().
 * ar == NULL restores the default (MPI_Reduce to rank 0 + MPI_Bcast,
 * counted as a ring all-reduce: 2 (p-1)/p 4n bytes). */
void comm_cx_set_dense(comm_cx *cx, comm_ar *ar, comm_ar_fn fn);

/* Collective. grad (n == count floats) is replaced by the SUM or AVG over
 * ranks of the compressed (error-fed) gradients, bitwise identical on all
 * ranks. step: the training step (warm-up, random streams). *bytes_sent
 * (may be NULL) gets the bytes this rank sent in this call. */
int comm_cx_allreduce(comm_cx *cx, float *grad, size_t n, int step, comm_op op,
                      uint64_t *bytes_sent);

/* Local queries. Whether the context compresses at all after warm-up (0:
 * min_ratio or the type made it dense); the mode of the last call ("dense"
 * or the type name); bytes sent by this rank over all calls; this rank's
 * bytes for one compressed (or dense, compressed = 0) call in the model. */
int comm_cx_compresses(const comm_cx *cx);
const char *comm_cx_last_mode(const comm_cx *cx);
uint64_t comm_cx_total_bytes(const comm_cx *cx);
double comm_cx_model_bytes(const comm_cx *cx, int compressed);
/* Local: of comm_cx_total_bytes, those sent inside the node (node-aware
 * exchange's dense reduce-scatter / all-gather); whether the node-aware
 * exchange is in use (0 flat). */
uint64_t comm_cx_node_bytes(const comm_cx *cx);
int comm_cx_node_aware(const comm_cx *cx);

/* Error-feedback residual for checkpoints: *len floats, writable (restore by
 * copying into it). Layout: count elements of this rank's residual, then
 * (quantizers, p > 1) the residual of the chunk this rank reduces, which
 * depends on the rank count (node-aware: the first count elements are zero
 * outside this rank's segment, the chunk is of the segment): when resuming with another layout,
 * restore only the first count elements and zero the rest. */
float *comm_cx_residual(comm_cx *cx, size_t *len);
/* PowerSGD's warm-start Q matrices (cols x r each, concatenated), the same
 * on all ranks; *len == 0 and NULL for other types. Writable. */
float *comm_cx_state(comm_cx *cx, size_t *len);

/* Profile: wall time this rank spent in each phase of its calls since
 * create (or the last reset), for `mpilm bench compress --micro`. Quantizers:
 * encode (error feedback + stage-1 encode), alltoallv, decode_sum (decode
 * the p messages of the own chunk and sum), reencode (stage 2), allgatherv,
 * decode; topk: select (error feedback + selection), allgather,
 * scatter_add; powersgd: matmul (P = M Q, Q = M^T P, P Q^T, residual),
 * orthonormalize, allreduce_p, allreduce_q; dense: warm-up / fallback
 * all-reduce and the node-aware intra-node reduce-scatter / all-gather.
 * Collective phases include the wait for slower ranks. */
typedef enum {
    COMM_CX_PH_ENCODE,
    COMM_CX_PH_ALLTOALLV,
    COMM_CX_PH_DECODE_SUM,
    COMM_CX_PH_REENCODE,
    COMM_CX_PH_ALLGATHERV,
    COMM_CX_PH_DECODE,
    COMM_CX_PH_SELECT,
    COMM_CX_PH_ALLGATHER,
    COMM_CX_PH_SCATTER_ADD,
    COMM_CX_PH_MATMUL,
    COMM_CX_PH_ORTHO,
    COMM_CX_PH_ALLREDUCE_P,
    COMM_CX_PH_ALLREDUCE_Q,
    COMM_CX_PH_DENSE,
    COMM_CX_NPHASES
} comm_cx_phase;
const char *comm_cx_phase_name(comm_cx_phase ph);
/* Local: secs[COMM_CX_NPHASES] := seconds per phase; reset zeroes them. */
void comm_cx_phase_times(const comm_cx *cx, double *secs);
void comm_cx_phase_reset(comm_cx *cx);

/* ---- building blocks (local, pure; used by the exchange and tests) ---- */

/* Bytes of n values encoded with a cast or quantizer type (fp16..int2). */
size_t comm_cx_encoded_bytes(comm_cx_type t, size_t n, size_t block);
/* Encodes x[0..n) (global element index of x[0]: gidx0, for the random
 * stream `key`) into out; dec (may be NULL, may alias x) receives the
 * decoded values. Returns 0 or COMM_ERR_ARG. */
int comm_cx_encode(comm_cx_type t, const float *x, size_t n, size_t block, uint64_t key,
                   size_t gidx0, void *out, float *dec);
/* The same with the rounding chosen: stochastic 1 as above, 0 nearest. */
int comm_cx_encode_round(comm_cx_type t, const float *x, size_t n, size_t block, uint64_t key,
                         size_t gidx0, int stochastic, void *out, float *dec);
int comm_cx_decode(comm_cx_type t, const void *in, size_t n, size_t block, float *out);
/* Random stream key of (seed, step, rank, stage). */
uint64_t comm_cx_stream_key(uint64_t seed, int step, int rank, int stage);
/* Indices (ascending) of the k largest |x[i]|, ties to the lower index,
 * NaN counted as largest. n < 2^32, k <= n. */
int comm_cx_topk_select(const float *x, size_t n, size_t k, uint32_t *idx);
/* bf16 round to nearest even (saturating), and back. */
uint16_t comm_cx_fp32_to_bf16(float f);
float comm_cx_bf16_to_fp32(uint16_t h);

#endif
