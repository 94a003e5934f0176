/* kern: the backend-neutral compute kernels of the GPT model.
 *
 * Every kernel works on plain row-major fp32 arrays. Shapes are given in the
 * comments: N = B*T rows, C channels, OC output channels, NH heads, V vocab.
 * Conventions shared by all backward kernels:
 *   - parameter gradients (dw, db) are ACCUMULATED (+=), so gradient
 *     accumulation over micro-batches needs no extra buffer;
 *   - input gradients of matmul/attention/gelu are OVERWRITTEN (=);
 *   - layernorm_bwd ACCUMULATES into dinp, because its input is the residual
 *     stream whose gradient already holds the skip-connection part.
 * The CPU backend (kernels/cpu) uses CBLAS for matrix products and fused,
 * OpenMP-threaded loops for the rest; results do not depend on timing, only
 * on the thread count. Not here: parallelism across ranks (src/, comm/).
 */
#ifndef MPILM_KERN_H
#define MPILM_KERN_H

#include <stddef.h>

/* out (N,C) = wte[tok] + wpe[t]  for N = B*T tokens */
void kern_encoder_fwd(float *out, const int *tok, const float *wte, const float *wpe, int B, int T,
                      int C);
/* dwte, dwpe += scatter of dout (N,C) */
void kern_encoder_bwd(float *dwte, float *dwpe, const float *dout, const int *tok, int B, int T,
                      int C);

/* out (N,C) = LN(inp) * w + b; saves mean, rstd (N) for the backward pass */
void kern_layernorm_fwd(float *out, float *mean, float *rstd, const float *inp, const float *w,
                        const float *b, size_t N, int C);
/* dinp (N,C) +=, dw (C) +=, db (C) += */
void kern_layernorm_bwd(float *dinp, float *dw, float *db, const float *dout, const float *inp,
                        const float *w, const float *mean, const float *rstd, size_t N, int C);

/* out (N,OC) = inp (N,C) @ w^T (w is (OC,C)) + bias (OC, may be NULL) */
void kern_matmul_fwd(float *out, const float *inp, const float *w, const float *bias, size_t N,
                     int C, int OC);
/* dinp (N,C) = dout @ w (skipped if dinp NULL); dw (OC,C) += dout^T @ inp;
 * dbias (OC) += column sums of dout (skipped if NULL) */
void kern_matmul_bwd(float *dinp, float *dw, float *dbias, const float *dout, const float *inp,
                     const float *w, size_t N, int C, int OC);

/* Causal self-attention. qkv (B,T,3C): q|k|v, heads contiguous in each.
 * out (B,T,C); att (B,NH,T,T) keeps the softmax probabilities. */
void kern_attention_fwd(float *out, float *att, const float *qkv, int B, int T, int C, int NH);
/* dqkv (B,T,3C) = ; scratch: B*NH*T*T floats */
void kern_attention_bwd(float *dqkv, float *scratch, const float *dout, const float *qkv,
                        const float *att, int B, int T, int C, int NH);

/* GELU, tanh approximation. out may alias inp in fwd; dinp may alias dout. */
void kern_gelu_fwd(float *out, const float *inp, size_t n);
void kern_gelu_bwd(float *dinp, const float *inp, const float *dout, size_t n);

/* out = a + b (n) */
void kern_residual_fwd(float *out, const float *a, const float *b, size_t n);

/* Fused softmax + cross-entropy over logits (N,V), in place: logits become
 * d(loss)/d(logits) * dscale where loss_i = -log softmax(logits_i)[tgt_i].
 * Returns the SUM of the N losses (double). With dscale = 0 only the loss
 * is computed and logits are left as probabilities. */
double kern_xent_fwd_bwd(float *logits, const int *tgt, size_t N, int V, float dscale);

/* Sum of squares (double accumulation, deterministic for a thread count). */
double kern_sumsq(const float *x, size_t n);

/* AdamW update of n parameters. wd applies to this tensor (0 for biases,
 * LayerNorm weights and other 1-D tensors). t = step number from 1. */
void kern_adamw(float *p, const float *g, float *m, float *v, size_t n, float lr, float beta1,
                float beta2, float eps, float wd, float gscale, int t);

/* The same step in two halves, for compressed data parallelism where each
 * rank steps on its own gradient and the ranks exchange parameter changes:
 * kern_adam_delta updates m and v from g * gscale and overwrites g with the
 * change -lr * mhat / (sqrt(vhat) + eps), times out_scale (no decay);
 * kern_apply_delta does p += d - lr * wd * p. */
void kern_adam_delta(float *g, float *m, float *v, size_t n, float lr, float beta1, float beta2,
                     float eps, float gscale, float out_scale, int t);
void kern_apply_delta(float *p, const float *d, size_t n, float lr, float wd);

/* BLAS set-up and identification. */
const char *kern_blas_corename(void);
/* The OPENBLAS_CORETYPE that should be forced on this CPU, or NULL when the
 * library's own choice is fine (it is a generic/old kernel on a CPU that has
 * AVX2 or AVX-512 only when the library misdetected the CPU). */
const char *kern_blas_better_coretype(void);
void kern_set_threads(int n);
int kern_threads(void);
/* Measured sgemm rate (GFLOP/s) on an n x n x n product with the current
 * thread count; takes about `seconds`. */
double kern_sgemm_gflops(int n, double seconds);

#endif
