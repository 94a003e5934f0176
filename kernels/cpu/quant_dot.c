/* Matmul on quantized weights for serving (kernels/quant.h, quant_matmul):
 * y (B, out) = x (B, in) @ W^T + bias with W read block by block from its
 * quantized form; each block's codes are expanded to 32 fp32 values in
 * registers and multiplied with up to 4 rows of x at once (fp32 FMA).
 * Not here: encoding, decoding and the scalar reference (quant.c).
 *
 * Decode (B = 1..4) is bound by streaming W, so the point is to read fewer
 * bytes per weight and spend few instructions on each; x (B*in floats)
 * stays in cache. Per block the dot product with the unscaled code values
 * is formed first and scaled once: d * sum(v x), plus o * sum(x) with
 * o = -8d (q4) or m (q4a) and sum(x) precomputed per block of x. That is
 * the sum over dequantized weights up to fp32 rounding (~1e-7 of sum|w x|).
 * Each output row is computed by a fixed instruction sequence that depends
 * only on B and the format, so results are the same for any OpenMP thread
 * count. Measured (4096x4096, B=1, one core, weights from DRAM): q8 2.8x,
 * q4 3.5x, q4a 3x, nf4 2.5x faster than OpenBLAS fp32 sgemv; nf4 pays for
 * its table lookups (two vpermps and a blend per 8 weights).
 */
#include "kernels/quant.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

#define ALWAYS_INLINE inline __attribute__((always_inline))

/* Code values of one block, unscaled, as 4 x 8 floats v[0..3] (weights
 * 0-7, 8-15, 16-23, 24-31): q8 the int8 code, q4 and q4a the nibble 0..15
 * (q4's -8 is applied per row through the block sums of x), nf4 cb[code].
 * F is a compile-time constant after inlining. */
static ALWAYS_INLINE void code_values(quant_fmt F, const uint8_t *q, __m256 tlo, __m256 thi,
                                      __m256 v[4]) {
    if (F == QUANT_Q8) {
        for (int k = 0; k < 4; k++) {
            __m128i b = _mm_loadl_epi64((const __m128i *)(const void *)(q + 8 * k));
            v[k] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
        }
        return;
    }
    /* bytes 0-7 and 8-15 as 32-bit lanes; low nibbles are weights 0-15,
     * high nibbles weights 16-31 */
    __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(const void *)q));
    __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(const void *)(q + 8)));
    if (F == QUANT_NF4) {
        /* 16-entry codebook in two registers: vpermps uses the low 3 bits
         * of the index, bit 3 of the nibble (moved to the sign bit) picks
         * the register */
        __m256i h0 = _mm256_srli_epi32(b0, 4), h1 = _mm256_srli_epi32(b1, 4);
        v[0] =
            _mm256_blendv_ps(_mm256_permutevar8x32_ps(tlo, b0), _mm256_permutevar8x32_ps(thi, b0),
                             _mm256_castsi256_ps(_mm256_slli_epi32(b0, 28)));
        v[1] =
            _mm256_blendv_ps(_mm256_permutevar8x32_ps(tlo, b1), _mm256_permutevar8x32_ps(thi, b1),
                             _mm256_castsi256_ps(_mm256_slli_epi32(b1, 28)));
        v[2] =
            _mm256_blendv_ps(_mm256_permutevar8x32_ps(tlo, h0), _mm256_permutevar8x32_ps(thi, h0),
                             _mm256_castsi256_ps(_mm256_slli_epi32(b0, 24)));
        v[3] =
            _mm256_blendv_ps(_mm256_permutevar8x32_ps(tlo, h1), _mm256_permutevar8x32_ps(thi, h1),
                             _mm256_castsi256_ps(_mm256_slli_epi32(b1, 24)));
        return;
    }
    const __m256i m4 = _mm256_set1_epi32(0x0f);
    v[0] = _mm256_cvtepi32_ps(_mm256_and_si256(b0, m4));
    v[1] = _mm256_cvtepi32_ps(_mm256_and_si256(b1, m4));
    v[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4));
    v[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4));
}

/* Weights of one block exactly as dequant_tensor gives them, for the
 * padded last block of a row. */
static ALWAYS_INLINE void block_weights(quant_fmt F, const uint8_t *q, float d, float m, float *w) {
    __m256 v[4];
    code_values(F, q, _mm256_loadu_ps(quant_nf4_codebook), _mm256_loadu_ps(quant_nf4_codebook + 8),
                v);
    const __m256 vd = _mm256_set1_ps(d);
    const __m256 vm = _mm256_set1_ps(F == QUANT_Q4 ? -8.0f * d : m);
    for (int k = 0; k < 4; k++) {
        __m256 wk = _mm256_mul_ps(vd, v[k]); /* exact for the integer formats */
        if (F == QUANT_Q4 || F == QUANT_Q4A)
            wk = _mm256_add_ps(wk, vm); /* q4: d*k - 8d = d*(k-8) exactly */
        _mm256_storeu_ps(w + 8 * k, wk);
    }
}

static ALWAYS_INLINE uint16_t ld16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

static ALWAYS_INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static ALWAYS_INLINE __m256 load_fp16x8(const uint8_t *p, size_t cnt) {
    if (cnt == 8) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)p));
    uint16_t t[8] = {0};
    memcpy(t, p, 2 * cnt);
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)t));
}

/* Does the format need the block sums of x (offset term per block)? */
#define HAS_OFFSET(F) ((F) == QUANT_Q4 || (F) == QUANT_Q4A)

/* Block j against NB rows of x: acc[b] += d * sum(v * x). */
static ALWAYS_INLINE void block_dot(quant_fmt F, int NB, const uint8_t *q, __m256 vd, __m256 tlo,
                                    __m256 thi, const float *x, size_t ldx, __m256 *acc) {
    __m256 v[4];
    code_values(F, q, tlo, thi, v);
    for (int b = 0; b < NB; b++) {
        const float *xb = x + (size_t)b * ldx;
        __m256 t = _mm256_mul_ps(v[0], _mm256_loadu_ps(xb));
        __m256 u = _mm256_mul_ps(v[2], _mm256_loadu_ps(xb + 16));
        t = _mm256_fmadd_ps(v[1], _mm256_loadu_ps(xb + 8), t);
        u = _mm256_fmadd_ps(v[3], _mm256_loadu_ps(xb + 24), u);
        acc[b] = _mm256_fmadd_ps(vd, _mm256_add_ps(t, u), acc[b]);
    }
}

/* One output row against NB (1..4) rows of x: res[b] = W[r,:] . x[b,:].
 * Blocks go in groups of 8 (their 8 fp16 scales converted at once); two
 * accumulators per row of x (even and odd blocks) hide the FMA latency.
 * q4/q4a: res += sum_j o_j * S[b][j] with o_j = -8 d_j (q4) or m_j (q4a)
 * and S the block sums of x. */
static ALWAYS_INLINE void row_tile(quant_fmt F, int NB, const uint8_t *qrow, const uint8_t *srow,
                                   const uint8_t *mrow, size_t code_bytes, size_t in,
                                   const float *x, size_t ldx, const float *S, size_t lds,
                                   float *res) {
    __m256 acc0[4], acc1[4], acco[4];
    for (int b = 0; b < NB; b++)
        acc0[b] = acc1[b] = acco[b] = _mm256_setzero_ps();
    const __m256 tlo = _mm256_loadu_ps(quant_nf4_codebook);
    const __m256 thi = _mm256_loadu_ps(quant_nf4_codebook + 8);
    size_t nfull = in / QUANT_BLOCK;
    for (size_t j0 = 0; j0 < nfull; j0 += 8) {
        size_t cnt = nfull - j0 < 8 ? nfull - j0 : 8;
        float ds[8];
        __m256 d8 = load_fp16x8(srow + 2 * j0, cnt);
        _mm256_storeu_ps(ds, d8);
        /* make the compiler read ds[k] back with vbroadcastss from memory
         * (a load) instead of two shuffles per block */
        __asm__ volatile("" ::: "memory");
        if (HAS_OFFSET(F)) {
            __m256 o8 = F == QUANT_Q4A ? load_fp16x8(mrow + 2 * j0, cnt) : d8;
            __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)cnt),
                                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
            for (int b = 0; b < NB; b++)
                acco[b] = _mm256_fmadd_ps(o8, _mm256_maskload_ps(S + b * lds + j0, mask), acco[b]);
        }
        const uint8_t *q = qrow + j0 * code_bytes;
        const float *xj = x + j0 * QUANT_BLOCK;
        size_t k = 0;
        for (; k + 2 <= cnt; k += 2) {
            block_dot(F, NB, q + k * code_bytes, _mm256_broadcast_ss(ds + k), tlo, thi,
                      xj + k * QUANT_BLOCK, ldx, acc0);
            block_dot(F, NB, q + (k + 1) * code_bytes, _mm256_broadcast_ss(ds + k + 1), tlo, thi,
                      xj + (k + 1) * QUANT_BLOCK, ldx, acc1);
        }
        if (k < cnt)
            block_dot(F, NB, q + k * code_bytes, _mm256_broadcast_ss(ds + k), tlo, thi,
                      xj + k * QUANT_BLOCK, ldx, acc0);
    }
    for (int b = 0; b < NB; b++) {
        res[b] = hsum(_mm256_add_ps(acc0[b], acc1[b]));
        if (F == QUANT_Q4)
            res[b] += -8.0f * hsum(acco[b]);
        else if (F == QUANT_Q4A)
            res[b] += hsum(acco[b]);
    }
    size_t rem = in - nfull * QUANT_BLOCK, j = nfull;
    if (rem) { /* padded last block: only the valid weights */
        float wf[QUANT_BLOCK];
        float m = F == QUANT_Q4A ? _cvtsh_ss(ld16(mrow + 2 * j)) : 0.0f;
        block_weights(F, qrow + j * code_bytes, _cvtsh_ss(ld16(srow + 2 * j)), m, wf);
        for (int b = 0; b < NB; b++) {
            const float *xb = x + (size_t)b * ldx + j * QUANT_BLOCK;
            float t = 0.0f;
            for (size_t i = 0; i < rem; i++)
                t += wf[i] * xb[i];
            res[b] += t;
        }
    }
}

/* Output row r for all B rows of x, in tiles of 4 rows of x. */
static ALWAYS_INLINE void matmul_row(quant_fmt F, const quant_layout *l, const uint8_t *base,
                                     size_t r, size_t out, size_t in, const float *x, size_t B,
                                     const float *S, const float *bias, float *y) {
    size_t cb = l->code_bytes, nblk = l->nblk, nfull = in / QUANT_BLOCK;
    const uint8_t *qrow = base + l->q_off + r * nblk * cb;
    const uint8_t *srow = base + l->scale_off + r * nblk * 2;
    const uint8_t *mrow = l->min_bytes ? base + l->min_off + r * nblk * 2 : NULL;
    float br = bias ? bias[r] : 0.0f;
    for (size_t b0 = 0; b0 < B; b0 += 4) {
        float res[4];
        const float *xb = x + b0 * in;
        const float *Sb = S ? S + b0 * nfull : NULL;
        switch (B - b0 >= 4 ? 4 : B - b0) {
        case 4:
            row_tile(F, 4, qrow, srow, mrow, cb, in, xb, in, Sb, nfull, res);
            break;
        case 3:
            row_tile(F, 3, qrow, srow, mrow, cb, in, xb, in, Sb, nfull, res);
            break;
        case 2:
            row_tile(F, 2, qrow, srow, mrow, cb, in, xb, in, Sb, nfull, res);
            break;
        default:
            row_tile(F, 1, qrow, srow, mrow, cb, in, xb, in, Sb, nfull, res);
            break;
        }
        for (size_t b = b0; b < B && b < b0 + 4; b++)
            y[b * out + r] = res[b - b0] + br;
    }
}

/* S (B, in/32): sums of the full blocks of each row of x. */
static void block_sums(const float *x, size_t B, size_t in, float *S) {
    size_t nfull = in / QUANT_BLOCK;
    for (size_t b = 0; b < B; b++)
        for (size_t j = 0; j < nfull; j++) {
            const float *p = x + b * in + j * QUANT_BLOCK;
            __m256 s =
                _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)),
                              _mm256_add_ps(_mm256_loadu_ps(p + 16), _mm256_loadu_ps(p + 24)));
            S[b * nfull + j] = hsum(s);
        }
}

/* One function per format so that F is a constant inside the OpenMP body.
 * Static schedule over rows; the if() only avoids waking threads for tiny
 * products and does not change any result. */
static void mm_q8(const quant_layout *l, const uint8_t *base, size_t out, size_t in, const float *x,
                  size_t B, const float *S, const float *bias, float *y) {
#pragma omp parallel for schedule(static) if (out * in * B >= (1u << 16))
    for (size_t r = 0; r < out; r++)
        matmul_row(QUANT_Q8, l, base, r, out, in, x, B, S, bias, y);
}
static void mm_q4(const quant_layout *l, const uint8_t *base, size_t out, size_t in, const float *x,
                  size_t B, const float *S, const float *bias, float *y) {
#pragma omp parallel for schedule(static) if (out * in * B >= (1u << 16))
    for (size_t r = 0; r < out; r++)
        matmul_row(QUANT_Q4, l, base, r, out, in, x, B, S, bias, y);
}
static void mm_q4a(const quant_layout *l, const uint8_t *base, size_t out, size_t in,
                   const float *x, size_t B, const float *S, const float *bias, float *y) {
#pragma omp parallel for schedule(static) if (out * in * B >= (1u << 16))
    for (size_t r = 0; r < out; r++)
        matmul_row(QUANT_Q4A, l, base, r, out, in, x, B, S, bias, y);
}
static void mm_nf4(const quant_layout *l, const uint8_t *base, size_t out, size_t in,
                   const float *x, size_t B, const float *S, const float *bias, float *y) {
#pragma omp parallel for schedule(static) if (out * in * B >= (1u << 16))
    for (size_t r = 0; r < out; r++)
        matmul_row(QUANT_NF4, l, base, r, out, in, x, B, S, bias, y);
}

int quant_matmul(quant_fmt f, const void *wq, size_t out, size_t in, const float *x, size_t B,
                 const float *bias, float *y) {
    quant_layout l;
    int err = quant_layout_of(f, out, in, &l);
    if (err) return err;
    if (out == 0 || B == 0) return 0;
    if (!wq || !y || (in && !x)) return -EINVAL;
    const uint8_t *q = wq;
    float *S = NULL; /* q4/q4a: block sums of x, (B, in/32) */
    size_t nfull = in / QUANT_BLOCK;
    if ((f == QUANT_Q4 || f == QUANT_Q4A) && nfull) {
        if (B > SIZE_MAX / sizeof(float) / nfull) return -EINVAL;
        S = malloc(B * nfull * sizeof(float));
        if (!S) return -ENOMEM;
        block_sums(x, B, in, S);
    }
    switch (f) {
    case QUANT_Q8:
        mm_q8(&l, q, out, in, x, B, S, bias, y);
        break;
    case QUANT_Q4:
        mm_q4(&l, q, out, in, x, B, S, bias, y);
        break;
    case QUANT_Q4A:
        mm_q4a(&l, q, out, in, x, B, S, bias, y);
        break;
    case QUANT_NF4:
        mm_nf4(&l, q, out, in, x, B, S, bias, y);
        break;
    default:
        err = -EINVAL;
        break;
    }
    free(S);
    return err;
}

#else /* no AVX2/FMA/F16C: the scalar reference, one thread */

int quant_matmul(quant_fmt f, const void *wq, size_t out, size_t in, const float *x, size_t B,
                 const float *bias, float *y) {
    return quant_matmul_ref(f, wq, out, in, x, B, bias, y);
}

#endif
