/* Matmul on quantized weights for serving (kernels/quant.h, quant_matmul):
 * y (B, out) = x (B, in) @ W^T + bias with W read block by block from its
 * quantized form, never dequantized to memory.
 * Not here: encoding, decoding and the exact scalar reference (quant.c).
 *
 * Decode (B = 1..32) is bound by streaming W, so the point is to read fewer
 * bytes per weight and spend very few instructions on each. As llama.cpp
 * does, each row of x is first quantized per block of 32 to int8 (scale
 * dx = absmax/127, round to nearest), then every weight block is a pure
 * integer dot product of its codes with the int8 block of x, scaled once:
 *   q8   d*dx*sum(c*xq)                 c = int8 code
 *   q4   d*dx*sum(n*xq) - 8*d*(dx*sum(xq))   n = nibble 0..15
 *   q4a  d*dx*sum(n*xq) + m*(dx*sum(xq))
 *   nf4  d*dx*sum(k*xq)/127             k = round(127*cb[code]) (int8 table)
 * Two instruction sets, chosen at run time (quant_isa_best):
 *   avx512vnni  512-bit vpdpbusd (unsigned x signed bytes -> int32, no
 *               saturation); signed codes (q8, nf4 table) are made unsigned
 *               by +128 and 128*sum(xq) is subtracted per block.
 *   avx2        vpmaddubsw + vpmaddwd; signed codes use the sign trick
 *               (|c| times xq with c's sign) so the int16 pairs cannot
 *               saturate (2*127*127 < 32767).
 * The integer sums are exact; the results differ from the float product on
 * the dequantized weights only by the int8 rounding of x (at most dx/2 per
 * element) and, for nf4, the int8 rounding of the codebook (at most
 * 0.5/127 of d per weight): see quant.h for the bound the tests check.
 * Every output row is computed by a fixed instruction sequence that depends
 * only on B-independent quantities (the format, `in`, the ISA), so results
 * do not change with the thread count or with the other rows of x.
 */
#include "kernels/quant.h"

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

#define ALWAYS_INLINE inline __attribute__((always_inline))
#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
/* rows of x per pass over a weight row (8 for VNNI measured no faster) */
#define NB_TILE 4
/* weight rows per tile in the VNNI path (32 zmm registers) */
#define NR_TILE 4

/* nf4 codebook as int8: round(127 * cb[k]) */
static void nf4_table(int8_t t[16]) {
    for (int k = 0; k < 16; k++)
        t[k] = (int8_t)lrintf(127.0f * quant_nf4_codebook[k]);
}

/* ------------------------------------------------------------ packed x */

/* x quantized for the kernels. Blocks are padded to a multiple of 8 per row
 * (zeros: they add nothing, and kernels may read them). Per row b:
 *   q   int8 [nbp * 32]: 4-bit formats in groups of 4 blocks (128 bytes:
 *       the first 16 values of blocks 0..3, then the last 16 of each), so
 *       the low / high nibbles of 4 consecutive 16-byte code blocks meet
 *       their x in one 64-byte load; q8 in natural order (32 per block).
 *   dx  float [nbp * lpb]: scale of each block (x ~ dx * q), repeated for
 *       the lpb int32 lanes its dot product occupies in the kernels (8 for
 *       q8, 4 for the 4-bit formats), so a step scales its lanes with one
 *       load instead of a shuffle per row of x
 *   sx  float [nbp]: dx * sum(q) of each block (offset terms) */
typedef struct {
    int8_t *q;
    float *dx, *sx;
    size_t nbp, lpb;
} xpack;

static void pack_x(int split, const float *x, size_t B, size_t in, xpack *p) {
    size_t nblk = (in + QUANT_BLOCK - 1) / QUANT_BLOCK, nbp = p->nbp;
    for (size_t b = 0; b < B; b++) {
        int8_t *qb = p->q + b * nbp * QUANT_BLOCK;
        memset(qb, 0, nbp * QUANT_BLOCK);
        for (size_t j = 0; j < nbp; j++) {
            float d = 0.0f, s = 0.0f;
            if (j < nblk) {
                const float *xj = x + b * in + j * QUANT_BLOCK;
                size_t n = in - j * QUANT_BLOCK < QUANT_BLOCK ? in - j * QUANT_BLOCK : QUANT_BLOCK;
                float amax = 0.0f;
                for (size_t i = 0; i < n; i++)
                    amax = fabsf(xj[i]) > amax ? fabsf(xj[i]) : amax;
                int sum = 0;
                if (amax > 0.0f) {
                    d = amax / 127.0f;
                    float inv = 127.0f / amax;
                    int8_t *lo = split ? qb + (j / 4) * 128 + (j % 4) * 16 : qb + j * 32;
                    int8_t *hi = split ? lo + 64 : lo + 16;
                    for (size_t i = 0; i < n; i++) {
                        long v = lrintf(xj[i] * inv);
                        v = v > 127 ? 127 : v < -127 ? -127 : v;
                        sum += (int)v;
                        if (i < 16)
                            lo[i] = (int8_t)v;
                        else
                            hi[i - 16] = (int8_t)v;
                    }
                }
                s = d * (float)sum;
            }
            for (size_t t = 0; t < p->lpb; t++)
                p->dx[(b * nbp + j) * p->lpb + t] = d;
            p->sx[b * nbp + j] = s;
        }
    }
}

/* ---------------------------------------------------------- helpers */

static ALWAYS_INLINE uint16_t ld16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

static ALWAYS_INLINE float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* sum_j o_j * sx[j] over the blocks of a row, o_j the fp16 values at
 * `half` (scales, or q4a minimums); 8 blocks at a time, fixed order. */
static ALWAYS_INLINE float offset_sum(const uint8_t *half, size_t nblk, const float *sx) {
    __m256 acc = _mm256_setzero_ps();
    size_t j = 0;
    for (; j + 8 <= nblk; j += 8)
        acc = _mm256_fmadd_ps(
            _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(half + 2 * j))),
            _mm256_loadu_ps(sx + j), acc);
    if (j < nblk) {
        uint16_t t[8] = {0};
        memcpy(t, half + 2 * j, 2 * (nblk - j));
        acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)t)),
                              _mm256_loadu_ps(sx + j), acc);
    }
    return hsum8(acc);
}

/* The offset term of a row for each of NB rows of x: res[b] += off * sum. */
static ALWAYS_INLINE void add_offsets(quant_fmt F, int vnni, int NB, const uint8_t *srow,
                                      const uint8_t *mrow, size_t nblk, const xpack *xp, size_t b0,
                                      float *res) {
    /* nf4: the table holds 127*cb, so its scale is d/127 */
    float k = F == QUANT_Q4    ? -8.0f
              : F == QUANT_Q4A ? 1.0f
              : !vnni          ? 0.0f
              : F == QUANT_NF4 ? -128.0f / 127.0f
                               : -128.0f;
    if (k == 0.0f) return;
    const uint8_t *half = F == QUANT_Q4A ? mrow : srow;
    for (int b = 0; b < NB; b++)
        res[b] += k * offset_sum(half, nblk, xp->sx + (b0 + b) * xp->nbp);
}

/* ------------------------------------------------------------ AVX2 */

/* One weight row against NB rows of x (b0..b0+NB-1): res[b] = W[r,:] . x[b,:]
 * without the offset term. Steps of 2 blocks (4-bit: 32 code bytes) or 1
 * block (q8); the int32 lanes of a step (4 per 4-bit block, 8 per q8 block)
 * are scaled by d*dx of their block and accumulated in fp32. */
static ALWAYS_INLINE void row_avx2(quant_fmt F, int NB, const uint8_t *qrow, const uint8_t *srow,
                                   size_t nblk, const xpack *xp, size_t b0, __m256i tab,
                                   float *res) {
    __m256 acc[NB_TILE];
    for (int b = 0; b < NB; b++)
        acc[b] = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1), m4 = _mm256_set1_epi8(0x0f);
    const size_t stride = xp->nbp * QUANT_BLOCK;
    if (F == QUANT_Q8) {
        for (size_t j = 0; j < nblk; j++) {
            __m256i w = _mm256_loadu_si256((const __m256i *)(const void *)(qrow + 32 * j));
            __m256i aw = _mm256_abs_epi8(w);
            __m256 dw = _mm256_set1_ps(_cvtsh_ss(ld16(srow + 2 * j)));
            for (int b = 0; b < NB; b++) {
                const int8_t *xq = xp->q + (b0 + b) * stride + 32 * j;
                __m256i xv = _mm256_loadu_si256((const __m256i *)(const void *)xq);
                __m256i s =
                    _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, w)), ones);
                __m256 sc =
                    _mm256_mul_ps(dw, _mm256_loadu_ps(xp->dx + ((b0 + b) * xp->nbp + j) * 8));
                acc[b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), sc, acc[b]);
            }
        }
    } else {
        const __m256i idx = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
        for (size_t j = 0; j < nblk; j += 2) {
            __m256i w;
            __m128 dw;
            if (j + 2 <= nblk) {
                w = _mm256_loadu_si256((const __m256i *)(const void *)(qrow + 16 * j));
                uint32_t h2;
                memcpy(&h2, srow + 2 * j, 4);
                dw = _mm_cvtph_ps(_mm_cvtsi32_si128((int)h2));
            } else { /* last odd block: its x partner is zero padding */
                w = _mm256_inserti128_si256(
                    _mm256_setzero_si256(),
                    _mm_loadu_si128((const __m128i *)(const void *)(qrow + 16 * j)), 0);
                dw = _mm_cvtph_ps(_mm_cvtsi32_si128((int)ld16(srow + 2 * j)));
            }
            if (F == QUANT_NF4) dw = _mm_mul_ps(dw, _mm_set1_ps(1.0f / 127.0f));
            __m256 dw8 = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(dw), idx);
            __m256i lo = _mm256_and_si256(w, m4);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), m4);
            __m256i alo = lo, ahi = hi;
            if (F == QUANT_NF4) {
                lo = _mm256_shuffle_epi8(tab, lo);
                hi = _mm256_shuffle_epi8(tab, hi);
                alo = _mm256_abs_epi8(lo);
                ahi = _mm256_abs_epi8(hi);
            }
            const int8_t *xg = xp->q + (j / 4) * 128 + (j % 4) * 16;
            for (int b = 0; b < NB; b++) {
                const int8_t *xq = xg + (b0 + b) * stride;
                __m256i xl = _mm256_loadu_si256((const __m256i *)(const void *)xq);
                __m256i xh = _mm256_loadu_si256((const __m256i *)(const void *)(xq + 64));
                __m256i s;
                if (F == QUANT_NF4)
                    s = _mm256_add_epi32(
                        _mm256_madd_epi16(_mm256_maddubs_epi16(alo, _mm256_sign_epi8(xl, lo)),
                                          ones),
                        _mm256_madd_epi16(_mm256_maddubs_epi16(ahi, _mm256_sign_epi8(xh, hi)),
                                          ones));
                else /* nibbles are unsigned: 4*15*127 fits int16 */
                    s = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, xl),
                                                           _mm256_maddubs_epi16(hi, xh)),
                                          ones);
                __m256 sc =
                    _mm256_mul_ps(dw8, _mm256_loadu_ps(xp->dx + ((b0 + b) * xp->nbp + j) * 4));
                acc[b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), sc, acc[b]);
            }
        }
    }
    for (int b = 0; b < NB; b++)
        res[b] = hsum8(acc[b]);
}

/* --------------------------------------------------- AVX-512 VNNI */

T512 static ALWAYS_INLINE float hsum16(__m512 v) {
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* As row_avx2 with 64-byte steps: 4 blocks (4-bit, 4 lanes each) or 2
 * blocks (q8, 8 lanes each). Signed codes are biased to unsigned by +128
 * (the -128*sum(xq) comes from add_offsets). Register blocked: NR weight
 * rows (qrow + r*qs, srow + r*ss) x NB rows of x per step, so a decoded
 * weight step serves NB rows of x and a loaded x step NR weight rows; each
 * (r, b) pair keeps its own accumulator and instruction sequence, so its
 * result is the same whatever NR and NB are. */
T512 static ALWAYS_INLINE void row_vnni(quant_fmt F, int NR, int NB, const uint8_t *qrow,
                                        const uint8_t *srow, size_t qs, size_t ss, size_t nblk,
                                        const xpack *xp, size_t b0, __m512i tab,
                                        float res[][NB_TILE]) {
    __m512 acc[NR_TILE][NB_TILE];
    for (int r = 0; r < NR; r++)
        for (int b = 0; b < NB; b++)
            acc[r][b] = _mm512_setzero_ps();
    const size_t stride = xp->nbp * QUANT_BLOCK;
    const size_t bps = F == QUANT_Q8 ? 2 : 4, cb = F == QUANT_Q8 ? 32 : 16;
    const __m512i idx = F == QUANT_Q8
                            ? _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1)
                            : _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    const __m512i m4 = _mm512_set1_epi8(0x0f), bias = _mm512_set1_epi8((char)0x80);
    for (size_t j = 0; j < nblk; j += bps) {
        __m512i u0[NR_TILE], u1[NR_TILE];
        __m512 dw16[NR_TILE];
        for (int r = 0; r < NR; r++) {
            const uint8_t *qr = qrow + r * qs, *sr = srow + r * ss;
            __m512i w;
            __m128 dw;
            if (j + bps <= nblk) {
                w = _mm512_loadu_si512((const void *)(qr + cb * j));
                dw = _mm_cvtph_ps(_mm_maskz_loadu_epi16((__mmask8)((1u << bps) - 1), sr + 2 * j));
            } else { /* tail: masked loads, the missing blocks' x are zero */
                size_t cnt = nblk - j;
                w = _mm512_maskz_loadu_epi8((__mmask64)((1ull << (cnt * cb)) - 1), qr + cb * j);
                dw = _mm_cvtph_ps(_mm_maskz_loadu_epi16((__mmask8)((1u << cnt) - 1), sr + 2 * j));
            }
            u1[r] = _mm512_setzero_si512();
            if (F == QUANT_Q8) {
                u0[r] = _mm512_xor_si512(w, bias);
            } else {
                u0[r] = _mm512_and_si512(w, m4);
                u1[r] = _mm512_and_si512(_mm512_srli_epi16(w, 4), m4);
                if (F == QUANT_NF4) {
                    dw = _mm_mul_ps(dw, _mm_set1_ps(1.0f / 127.0f));
                    u0[r] = _mm512_shuffle_epi8(tab, u0[r]);
                    u1[r] = _mm512_shuffle_epi8(tab, u1[r]);
                }
            }
            dw16[r] = _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(dw));
        }
        for (int b = 0; b < NB; b++) {
            const int8_t *xq = xp->q + (b0 + b) * stride + 32 * j;
            const __m512i x0 = _mm512_loadu_si512(xq);
            const __m512i x1 = F != QUANT_Q8 ? _mm512_loadu_si512(xq + 64) : _mm512_setzero_si512();
            const __m512 dxb = _mm512_loadu_ps(xp->dx + ((b0 + b) * xp->nbp + j) * cb / 4);
            for (int r = 0; r < NR; r++) {
                __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u0[r], x0);
                if (F != QUANT_Q8) s = _mm512_dpbusd_epi32(s, u1[r], x1);
                __m512 sc = _mm512_mul_ps(dw16[r], dxb);
                acc[r][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sc, acc[r][b]);
            }
        }
    }
    for (int r = 0; r < NR; r++)
        for (int b = 0; b < NB; b++)
            res[r][b] = hsum16(acc[r][b]);
}

/* -------------------------------------------------------- drivers */

typedef struct {
    const quant_layout *l;
    const uint8_t *base;
    size_t out, in, B;
    const xpack *xp;
    const float *bias;
    float *y;
    int8_t nf4[16];
} mm_args;

/* Output row r for all B rows of x, in tiles of TILE (<= NB_TILE) rows.
 * ISA: 0 avx2, 1 vnni (a compile-time constant after inlining). */
#define ROW_CASE(ROWFN, VNNI, N)                                                                   \
    case N:                                                                                        \
        ROWFN(F, N, qrow, srow, nblk, a->xp, b0, tab, res);                                        \
        add_offsets(F, VNNI, N, srow, mrow, nblk, a->xp, b0, res);                                 \
        break;
#define DEFINE_ROW(NAME, ATTR, VNNI, TILE, ROWFN, TABT, TABINIT)                                   \
    ATTR static ALWAYS_INLINE void NAME(quant_fmt F, const mm_args *a, size_t r) {                 \
        const quant_layout *l = a->l;                                                              \
        size_t nblk = l->nblk;                                                                     \
        const uint8_t *qrow = a->base + l->q_off + r * nblk * l->code_bytes;                       \
        const uint8_t *srow = a->base + l->scale_off + r * nblk * 2;                               \
        const uint8_t *mrow = l->min_bytes ? a->base + l->min_off + r * nblk * 2 : NULL;           \
        TABT tab = TABINIT;                                                                        \
        float br = a->bias ? a->bias[r] : 0.0f;                                                    \
        for (size_t b0 = 0; b0 < a->B; b0 += TILE) {                                               \
            float res[NB_TILE] = {0};                                                              \
            int nb = a->B - b0 >= TILE ? TILE : (int)(a->B - b0);                                  \
            switch (nb) {                                                                          \
                ROW_CASE(ROWFN, VNNI, 4)                                                           \
                ROW_CASE(ROWFN, VNNI, 3)                                                           \
                ROW_CASE(ROWFN, VNNI, 2)                                                           \
            default:                                                                               \
                ROWFN(F, 1, qrow, srow, nblk, a->xp, b0, tab, res);                                \
                add_offsets(F, VNNI, 1, srow, mrow, nblk, a->xp, b0, res);                         \
                break;                                                                             \
            }                                                                                      \
            for (int b = 0; b < nb; b++)                                                           \
                a->y[(b0 + b) * a->out + r] = res[b] + br;                                         \
        }                                                                                          \
    }

/* table: AVX2 signed int8 codebook */
DEFINE_ROW(mmrow_avx2, , 0, NB_TILE, row_avx2, __m256i,
           _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(const void *)a->nf4)))

/* AVX2 has 16 vector registers: one weight row at a time */
static ALWAYS_INLINE void mmrows_avx2(quant_fmt F, const mm_args *a, size_t r0, size_t nr) {
    for (size_t i = 0; i < nr; i++)
        mmrow_avx2(F, a, r0 + i);
}

/* Output rows r0..r0+NR-1 for x rows b0..b0+NB-1 (VNNI). */
T512 static ALWAYS_INLINE void tile_vnni(quant_fmt F, int NR, int NB, const mm_args *a, size_t r0,
                                         size_t b0, __m512i tab) {
    const quant_layout *l = a->l;
    size_t nblk = l->nblk, qs = nblk * l->code_bytes, ss = nblk * 2;
    const uint8_t *qrow = a->base + l->q_off + r0 * qs;
    const uint8_t *srow = a->base + l->scale_off + r0 * ss;
    float res[NR_TILE][NB_TILE];
    row_vnni(F, NR, NB, qrow, srow, qs, ss, nblk, a->xp, b0, tab, res);
    for (int r = 0; r < NR; r++) {
        const uint8_t *mrow = l->min_bytes ? a->base + l->min_off + (r0 + r) * ss : NULL;
        add_offsets(F, 1, NB, srow + r * ss, mrow, nblk, a->xp, b0, res[r]);
        float br = a->bias ? a->bias[r0 + r] : 0.0f;
        for (int b = 0; b < NB; b++)
            a->y[(b0 + b) * a->out + r0 + r] = res[r][b] + br;
    }
}

#define TILE_CASES(NR)                                                                             \
    switch (nb) {                                                                                  \
    case 4:                                                                                        \
        tile_vnni(F, NR, 4, a, r, b0, tab);                                                        \
        break;                                                                                     \
    case 3:                                                                                        \
        tile_vnni(F, NR, 3, a, r, b0, tab);                                                        \
        break;                                                                                     \
    case 2:                                                                                        \
        tile_vnni(F, NR, 2, a, r, b0, tab);                                                        \
        break;                                                                                     \
    default:                                                                                       \
        tile_vnni(F, NR, 1, a, r, b0, tab);                                                        \
        break;                                                                                     \
    }

/* Rows r0..r0+nr-1 (nr <= NR_TILE): full groups of NR_TILE rows blocked,
 * the remainder (last rows of the matrix) one at a time. */
T512 static ALWAYS_INLINE void mmrows_vnni(quant_fmt F, const mm_args *a, size_t r0, size_t nr) {
    /* codebook + 128 as unsigned */
    const __m512i tab = _mm512_xor_si512(
        _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(const void *)a->nf4)),
        _mm512_set1_epi8((char)0x80));
    for (size_t b0 = 0; b0 < a->B; b0 += NB_TILE) {
        int nb = a->B - b0 >= NB_TILE ? NB_TILE : (int)(a->B - b0);
        /* blocking pays only when several x rows share each weight load;
         * for one to three rows (decode at small batch) it measured slower */
        if (nr == NR_TILE && nb == NB_TILE) {
            size_t r = r0;
            TILE_CASES(NR_TILE)
        } else {
            for (size_t r = r0; r < r0 + nr; r++) {
                TILE_CASES(1)
            }
        }
    }
}

/* One function per (ISA, format) so that F is a constant inside the OpenMP
 * body. Rows in chunks of 16 handed out dynamically: on a shared node a
 * thread that loses its core holds back one chunk, not half the product.
 * Neither the schedule nor the if() (no threads for tiny products) changes
 * any result: a row is computed the same way by any thread. */
// clang-format off
#define DEFINE_MM(NAME, ATTR, ROWS, F)                                                             \
    ATTR static void NAME(const mm_args *a) {                                                      \
        int par = a->out * a->in * a->B >= (1u << 16);                                             \
        size_t ng = (a->out + NR_TILE - 1) / NR_TILE;                                              \
        _Pragma("omp parallel for schedule(dynamic, 16 / NR_TILE) if (par)")                       \
        for (size_t g = 0; g < ng; g++) {                                                          \
            size_t r0 = g * NR_TILE;                                                               \
            ROWS(F, a, r0, a->out - r0 < NR_TILE ? a->out - r0 : NR_TILE);                         \
        }                                                                                          \
    }
// clang-format on
DEFINE_MM(mm_avx2_q8, , mmrows_avx2, QUANT_Q8)
DEFINE_MM(mm_avx2_q4, , mmrows_avx2, QUANT_Q4)
DEFINE_MM(mm_avx2_q4a, , mmrows_avx2, QUANT_Q4A)
DEFINE_MM(mm_avx2_nf4, , mmrows_avx2, QUANT_NF4)
DEFINE_MM(mm_vnni_q8, T512, mmrows_vnni, QUANT_Q8)
DEFINE_MM(mm_vnni_q4, T512, mmrows_vnni, QUANT_Q4)
DEFINE_MM(mm_vnni_q4a, T512, mmrows_vnni, QUANT_Q4A)
DEFINE_MM(mm_vnni_nf4, T512, mmrows_vnni, QUANT_NF4)

static int have_vnni(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

quant_isa quant_isa_best(void) {
    return have_vnni() ? QUANT_ISA_AVX512VNNI : QUANT_ISA_AVX2;
}

int quant_matmul_isa(quant_fmt f, quant_isa isa, const void *wq, size_t out, size_t in,
                     const float *x, size_t B, const float *bias, float *y) {
    quant_layout l;
    int err = quant_layout_of(f, out, in, &l);
    if (err) return err;
    if (isa == QUANT_ISA_AUTO) isa = quant_isa_best();
    if (isa == QUANT_ISA_SCALAR) return quant_matmul_ref(f, wq, out, in, x, B, bias, y);
    if (isa != QUANT_ISA_AVX2 && isa != QUANT_ISA_AVX512VNNI) return -EINVAL;
    if (isa == QUANT_ISA_AVX512VNNI && !have_vnni()) return -ENOTSUP;
    if (out == 0 || B == 0) return 0;
    if (!wq || !y || (in && !x)) return -EINVAL;
    size_t nbp = (l.nblk + 7) / 8 * 8;
    if (nbp && B > SIZE_MAX / (nbp * (QUANT_BLOCK + 9 * sizeof(float)))) return -EINVAL;
    xpack xp = {NULL, NULL, NULL, nbp, f == QUANT_Q8 ? 8 : 4};
    xp.q = malloc(B * nbp * QUANT_BLOCK + 1);
    xp.dx = malloc(B * nbp * xp.lpb * sizeof(float) + 1);
    xp.sx = malloc(B * nbp * sizeof(float) + 1);
    if (!xp.q || !xp.dx || !xp.sx) {
        err = -ENOMEM;
        goto done;
    }
    pack_x(f != QUANT_Q8, x, B, in, &xp);
    mm_args a = {&l, wq, out, in, B, &xp, bias, y, {0}};
    nf4_table(a.nf4);
    static void (*const fn[2][QUANT_NFMT])(const mm_args *) = {
        {mm_avx2_q8, mm_avx2_q4, mm_avx2_q4a, mm_avx2_nf4},
        {mm_vnni_q8, mm_vnni_q4, mm_vnni_q4a, mm_vnni_nf4},
    };
    fn[isa == QUANT_ISA_AVX512VNNI][f](&a);
done:
    free(xp.q);
    free(xp.dx);
    free(xp.sx);
    return err;
}

#else /* no AVX2/FMA/F16C: the exact scalar reference, one thread */

quant_isa quant_isa_best(void) {
    return QUANT_ISA_SCALAR;
}

int quant_matmul_isa(quant_fmt f, quant_isa isa, const void *wq, size_t out, size_t in,
                     const float *x, size_t B, const float *bias, float *y) {
    if (isa != QUANT_ISA_AUTO && isa != QUANT_ISA_SCALAR) return -ENOTSUP;
    return quant_matmul_ref(f, wq, out, in, x, B, bias, y);
}

#endif

const char *quant_isa_name(quant_isa isa) {
    switch (isa) {
    case QUANT_ISA_SCALAR:
        return "scalar";
    case QUANT_ISA_AVX2:
        return "avx2";
    case QUANT_ISA_AVX512VNNI:
        return "avx512vnni";
    default:
        return "auto";
    }
}

int quant_matmul(quant_fmt f, const void *wq, size_t out, size_t in, const float *x, size_t B,
                 const float *bias, float *y) {
    return quant_matmul_isa(f, QUANT_ISA_AUTO, wq, out, in, x, B, bias, y);
}
