/* infer: the inference engine of `mpilm serve` (issue 8) on one rank: a
 * whole-model replica (gpt, tp = pp = 1) with a KV cache per sequence slot,
 * batched prefill of one prompt, decode steps batched across the active
 * slots, sampling (greedy, temperature, top-k, top-p) with a random stream
 * that depends only on (seed, position), and a continuous-batching loop over
 * a list of requests.
 *
 * Linear layers run on fp32 weights through kern_matmul_fwd, or, after
 * infer_load_quant, directly on the quantized blocks of a quantized
 * checkpoint (/qmodel/<name>) through quant_matmul.
 *
 * Determinism: a request's tokens depend only on the request (prompt, seed,
 * sampling parameters) and the weights, not on which other requests share
 * its decode batch (each row of a batched product is computed by the same
 * instruction sequence whatever the batch; attention and sampling are per
 * sequence). The thread count may change the rounding of the BLAS calls.
 *
 * Not here: JSON, scheduling across ranks, output (src/serve.c).
 */
#ifndef MPILM_INFER_H
#define MPILM_INFER_H

#include "src/gpt.h"

#include <stddef.h>
#include <stdint.h>

typedef struct infer_engine infer_engine;

/* Why a sequence stopped. */
enum { INFER_RUNNING = 0, INFER_LENGTH, INFER_STOP, INFER_CONTEXT };
const char *infer_finish_name(int f); /* "length", "stop"; INFER_CONTEXT is "length" too */

/* Creates an engine on g (borrowed: must outlive the engine; the whole model,
 * tp = 1) with max_batch KV-cache slots of block_size positions each.
 * 0, or -1 (bad arguments, out of memory) with a message in err. */
int infer_create(gpt *g, int max_batch, infer_engine **out, char *err, size_t errlen);
void infer_destroy(infer_engine *e);
/* Bytes of KV cache held (all slots). */
size_t infer_kv_bytes(const infer_engine *e);

/* Serial. Reads the quantized blocks of every linear weight (attn.qkv,
 * attn.proj, mlp.fc, mlp.proj, and wte for the LM head) that FILE (a
 * checkpoint.h5) stores under /qmodel, checking shape and checksums, and
 * uses them with quant_matmul from now on; weights stored as fp32 stay on
 * kern_matmul_fwd. Sets *nquant to the number of quantized linear weights.
 * 0 or -1 with a message. */
int infer_load_quant(infer_engine *e, const char *file, int *nquant, char *err, size_t errlen);

/* Low-level steps (also used by the tests). A slot holds one sequence;
 * prefill starts it, decode appends one token to each given slot. */
/* Runs prompt[0..n) (1 <= n <= block_size) through the model into slot's
 * cache in one batched pass; afterwards infer_logits(e, slot) holds the
 * next-token logits (V). 0 or -1. */
int infer_prefill(infer_engine *e, int slot, const int *prompt, int n);
/* One decode step for nb slots: feeds tok[i] to slot slots[i] at its next
 * position (must be < block_size) and leaves its next-token logits. */
int infer_decode(infer_engine *e, int nb, const int *slots, const int *tok);
const float *infer_logits(const infer_engine *e, int slot);
int infer_pos(const infer_engine *e, int slot); /* tokens in slot's cache */

/* Sampling parameters of one request. temperature 0: greedy (argmax, lowest
 * index on ties). top_k 0: off. top_p 1: off. */
typedef struct {
    float temperature;
    int top_k;
    float top_p;
    uint64_t seed;
} infer_sampling;

/* Samples a token from logits (V) for the token at sequence position pos,
 * with the uniform number u(seed, pos) (see infer_uniform). */
int infer_sample(const float *logits, int V, const infer_sampling *s, int pos);
/* The uniform number in [0, 1) used at (seed, pos). */
double infer_uniform(uint64_t seed, int pos);

typedef struct {
    const int *prompt;
    int n_prompt; /* 1..block_size */
    int max_new_tokens;
    infer_sampling sampling;
    const char *stop; /* stop string (bytes) or NULL */
} infer_request;

typedef struct {
    int *tokens;   /* generated tokens (malloc'ed; the stop string removed) */
    int n_tokens;  /* tokens kept in `tokens` */
    int generated; /* tokens generated, including a stop string */
    int finish;    /* INFER_LENGTH, INFER_STOP, INFER_CONTEXT */
    double prompt_ms, decode_ms, ttft_ms, latency_ms; /* ttft and latency from t0 */
} infer_result;

/* Continuous batching over req[0..n): up to max_batch (<= the engine's slots)
 * sequences active, each waiting request joins (prefill) between decode
 * steps as soon as a slot is free, a finished one leaves at once. Requests
 * are taken in order. t0 (spmd_now seconds): when the requests arrived.
 * Fills res[0..n) (free with infer_result_free). 0 or -1 (out of memory). */
int infer_run(infer_engine *e, const infer_request *req, int n, infer_result *res, int max_batch,
              double t0);
void infer_result_free(infer_result *r);

/* Decode steps and rows run by the last infer_run (for batch statistics). */
void infer_batch_stats(const infer_engine *e, long long *steps, long long *rows);

#endif
