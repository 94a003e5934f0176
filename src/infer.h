/* infer: the inference engine of `mpilm serve` (issue 8) on one rank: a
 * whole-model replica (gpt, tp = pp = 1) with a paged KV cache shared by its
 * sequence slots, batched prefill of one prompt, decode steps batched across
 * the active slots, sampling (greedy, temperature, top-k, top-p) with a
 * random stream that depends only on (seed, position), and continuous
 * batching (infer_batcher, step by step; infer_run over a list).
 *
 * Linear layers run on fp32 weights through kern_matmul_fwd (decode: an
 * exact, batch-invariant AVX2 dot-product kernel), or, after
 * infer_load_quant (the blocks of a quantized checkpoint, /qmodel/<name>)
 * or infer_quantize (blocks made in memory), directly on quantized blocks
 * through quant_matmul (int8 activations: within the format's error of the
 * dequantized product, see kernels/quant.h).
 *
 * Determinism: a request's tokens depend only on the request (prompt, seed,
 * sampling parameters) and the weights, not on which other requests share
 * its decode batch (each row of a batched product is computed by the same
 * instruction sequence whatever the batch; attention and sampling are per
 * sequence). The thread count may change the rounding of the BLAS calls.
 *
 * Not here: JSON, output (src/serve.c), scheduling across ranks and the KV
 * budget per replica (src/serve_sched.c).
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

/* The KV cache is paged: a pool of pages of INFER_KV_PAGE positions (K and
 * V of every layer), a slot takes pages as its sequence grows and gives
 * them back when it ends (infer_release), so the cache memory is the budget
 * and not max_batch full contexts. */
#define INFER_KV_PAGE 16

/* Creates an engine on g (borrowed: must outlive the engine; the whole model,
 * tp = 1) with max_batch sequence slots and a KV-cache pool of kv_bytes
 * (rounded down to pages; 0: enough for every slot's full context).
 * infer_create: kv_bytes 0. 0, or -1 (bad arguments, a budget under one
 * page, out of memory) with a message in err. */
int infer_create(gpt *g, int max_batch, infer_engine **out, char *err, size_t errlen);
int infer_create_kv(gpt *g, int max_batch, size_t kv_bytes, infer_engine **out, char *err,
                    size_t errlen);
void infer_destroy(infer_engine *e);
/* Bytes of KV cache held (the page pool). */
size_t infer_kv_bytes(const infer_engine *e);

/* Serial. Reads the quantized blocks of every linear weight (attn.qkv,
 * attn.proj, mlp.fc, mlp.proj, and wte for the LM head) that FILE (a
 * checkpoint.h5) stores under /qmodel, checking shape and checksums, and
 * uses them with quant_matmul from now on; weights stored as fp32 stay on
 * kern_matmul_fwd. Sets *nquant to the number of quantized linear weights.
 * 0 or -1 with a message. */
int infer_load_quant(infer_engine *e, const char *file, int *nquant, char *err, size_t errlen);
/* Serial (OpenMP inside). Quantizes the fp32 linear weights held by the
 * engine's model (the same set infer_load_quant reads: every layer's qkv,
 * proj, fc, mlp.proj and the wte LM head) in memory to format fmt (a
 * quant_fmt) and uses them with quant_matmul from now on, without a file;
 * fmt < 0 goes back to the fp32 weights. 0 or -1 with a message. */
int infer_quantize(infer_engine *e, int fmt, char *err, size_t errlen);
/* Bytes of linear-layer weights one decode step reads (fp32 or quantized
 * blocks, biases excluded): what bounds decode by memory bandwidth. */
size_t infer_weight_bytes(const infer_engine *e);

/* Low-level steps (also used by the tests). A slot holds one sequence;
 * prefill starts it, decode appends one token to each given slot. */
/* Runs prompt[0..n) (1 <= n <= block_size) through the model into slot's
 * cache in one batched pass (the slot's previous sequence is released);
 * afterwards infer_logits(e, slot) holds the next-token logits (V). 0, or
 * -1 (bad arguments, no free KV page). */
int infer_prefill(infer_engine *e, int slot, const int *prompt, int n);
/* One decode step for nb slots: feeds tok[i] to slot slots[i] at its next
 * position (must be < block_size) and leaves its next-token logits. -1 also
 * when a slot needs a new KV page and the pool is empty. */
int infer_decode(infer_engine *e, int nb, const int *slots, const int *tok);
/* Ends slot's sequence: its KV pages go back to the pool. */
void infer_release(infer_engine *e, int slot);
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

/* Decode steps and rows run by the last infer_run (for batch statistics);
 * with an infer_batcher: since the engine was created. */
void infer_batch_stats(const infer_engine *e, long long *steps, long long *rows);

/* Bytes of KV cache that a request of n_prompt tokens generating up to
 * max_new_tokens occupies at most (positions n_prompt + max_new_tokens - 1,
 * capped at the context, in whole pages): what a scheduler reserves on
 * admission. Requests whose reservations add up to at most an engine's
 * infer_kv_bytes never run out of pages. */
size_t infer_kv_need(const gpt_config *c, int n_prompt, int max_new_tokens);

/* Step-wise continuous batching, for a serving loop that receives requests
 * while it decodes (infer_run is the same loop over a fixed list): up to
 * max_batch (<= the engine's slots) sequences run; add starts one between
 * decode steps, step advances all running ones by one token, pop hands back
 * the tags of finished ones in the order they finished. Serial. */
typedef struct infer_batcher infer_batcher;
int infer_batcher_create(infer_engine *e, int max_batch, infer_batcher **out); /* 0 or -1 */
void infer_batcher_destroy(infer_batcher *b);
int infer_batcher_free_slots(const infer_batcher *b);
int infer_batcher_running(const infer_batcher *b);
/* Prefills q in a free slot and samples its first token. q (with its prompt
 * and stop string) and r must stay valid until tag is popped; r is filled
 * (r->tokens malloc'ed: infer_result_free). t0: arrival time (spmd_now).
 * 0: running, 1: already finished (tag queued for pop), -1: no free slot,
 * a bad prompt or out of memory. */
int infer_batcher_add(infer_batcher *b, const infer_request *q, infer_result *r, double t0,
                      void *tag);
int infer_batcher_step(infer_batcher *b);            /* 0 or -1; no-op when nothing runs */
int infer_batcher_pop(infer_batcher *b, void **tag); /* 1: *tag set, 0: none finished */

#endif
