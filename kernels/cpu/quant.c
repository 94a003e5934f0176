/* Block quantization (kernels/quant.h): fp16 conversion, the per-block
 * encoders with their scale search, decoding, the error helper and the
 * portable scalar reference matmul.
 * Not here: the AVX2 matmul on quantized blocks (kernels/cpu/quant_dot.c).
 *
 * Determinism: this file is compiled without FMA contraction (pragma below)
 * and every sum has a fixed order, so a block's bytes are a function of its
 * 32 input floats only (rows are independent, threads only split rows).
 * Dequantized values are exact products: an fp16 scale has 11 significant
 * bits and a code at most 8, so d*q needs no rounding; for q4a d*q + m is one
 * rounding whether fused or not. Only nf4's d*cb[k] rounds (same everywhere).
 */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "kernels/quant.h"

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* NF4 (Dettmers et al., QLoRA 2023; bitsandbytes create_normal_map with
 * offset 0.9677083): with Phi^-1 the standard normal quantile function,
 *   positive values  Phi^-1(p_i), p_i = offset - i*(offset-0.5)/8, i = 0..7
 *   negative values -Phi^-1(p_j), p_j = offset - j*(offset-0.5)/7, j = 0..6
 * plus an exact 0, all divided by Phi^-1(offset) so that the ends are +-1.
 * 8 positive and 7 negative levels: the codebook is asymmetric.
 * tests/unit/test_quant.c re-derives these numbers from erfc(). */
const float quant_nf4_codebook[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

/* ---------------------------------------------------------------- fp16 */

static inline uint16_t f2h(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) /* NaN: quiet it, keep the top payload bits */
        return (uint16_t)(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
    if (ax >= 0x47800000u) /* >= 65536 or inf (65520..65536 rounds below) */
        return (uint16_t)(sign | 0x7c00u);
    if (ax < 0x38800000u) {   /* below 2^-14: fp16 subnormal or zero */
        if (ax < 0x33000000u) /* below 2^-25 (2^-25 itself ties to 0) */
            return (uint16_t)sign;
        uint32_t e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u;
        uint32_t sh = 126u - e; /* 14..24: value = m * 2^(e-150) = k * 2^-24 */
        uint32_t k = m >> sh, rem = m & ((1u << sh) - 1u), half = 1u << (sh - 1u);
        if (rem > half || (rem == half && (k & 1u)))
            k++; /* may carry into the smallest normal, which is correct */
        return (uint16_t)(sign | k);
    }
    uint32_t h = (ax - 0x38000000u) >> 13, rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u)))
        h++; /* carries into the exponent, and up to inf at 65520 */
    return (uint16_t)(sign | h);
}

static inline float h2f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu, x;
    if (e == 0) {
        float v = (float)m * 0x1p-24f; /* exact */
        memcpy(&x, &v, sizeof x);
        x |= sign;
    } else if (e == 31) {
        x = sign | 0x7f800000u | (m << 13);
    } else {
        x = sign | ((e + 112u) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &x, sizeof f);
    return f;
}

uint16_t quant_fp32_to_fp16(float f) {
    return f2h(f);
}
float quant_fp16_to_fp32(uint16_t h) {
    return h2f(h);
}

static int h_finite(uint16_t h) {
    return (h & 0x7c00u) != 0x7c00u;
}

/* ------------------------------------------------------------- formats */

static const struct {
    const char *name;
    size_t code_bytes;
    int has_min;
} fmt_info[QUANT_NFMT] = {
    [QUANT_Q8] = {"q8", 32, 0},
    [QUANT_Q4] = {"q4", 16, 0},
    [QUANT_Q4A] = {"q4a", 16, 1},
    [QUANT_NF4] = {"nf4", 16, 0},
};

static int fmt_ok(quant_fmt f) {
    return (unsigned)f < (unsigned)QUANT_NFMT;
}

const char *quant_fmt_name(quant_fmt f) {
    return fmt_ok(f) ? fmt_info[f].name : NULL;
}

int quant_fmt_from_name(const char *name, quant_fmt *out) {
    if (!name || !out) return -EINVAL;
    for (int f = 0; f < QUANT_NFMT; f++)
        if (strcmp(name, fmt_info[f].name) == 0) {
            *out = (quant_fmt)f;
            return 0;
        }
    return -EINVAL;
}

size_t quant_block_bytes(quant_fmt f) {
    if (!fmt_ok(f)) return 0;
    return fmt_info[f].code_bytes + 2 + (fmt_info[f].has_min ? 2 : 0);
}

double quant_bits_per_weight(quant_fmt f) {
    return fmt_ok(f) ? 8.0 * (double)quant_block_bytes(f) / QUANT_BLOCK : 0.0;
}

int quant_layout_of(quant_fmt f, size_t rows, size_t cols, quant_layout *l) {
    if (!fmt_ok(f) || !l) return -EINVAL;
    size_t nblk = cols / QUANT_BLOCK + (cols % QUANT_BLOCK != 0);
    if (rows != 0 && nblk > SIZE_MAX / 64 / rows) /* 36 bytes/block at most */
        return -EINVAL;
    size_t nb = rows * nblk;
    memset(l, 0, sizeof *l);
    l->nblk = nblk;
    l->code_bytes = fmt_info[f].code_bytes;
    l->q_off = 0;
    l->q_bytes = nb * l->code_bytes;
    l->scale_off = l->q_bytes;
    l->scale_bytes = nb * 2;
    l->min_off = l->scale_off + l->scale_bytes;
    l->min_bytes = fmt_info[f].has_min ? nb * 2 : 0;
    l->total = l->min_off + l->min_bytes;
    return 0;
}

size_t quant_tensor_bytes(quant_fmt f, size_t rows, size_t cols) {
    quant_layout l;
    return quant_layout_of(f, rows, cols, &l) == 0 ? l.total : 0;
}

/* --------------------------------------------------- encoder: evaluation */

/* Search grid: factors g on the plain absmax scale (g < 1 clips the largest
 * weights), each candidate followed by least-squares refits. Chosen on
 * Gaussian, outlier and Student-t(3) blocks (rel. RMSE vs encode speed):
 * for q4/nf4 a finer grid or more refits gains < 0.3%; for q4a the refits
 * matter more (codes move both ends) and two anchors, the grid clipping the
 * top (m = min) or the bottom (m = max - range*g), beat one anchor. */
#define SYM_GRID_N 8 /* q4, nf4: per orientation/sign */
#define SYM_GRID_LO 0.62f
#define SYM_GRID_STEP 0.06f
#define SYM_LS 1
#define ASYM_GRID_N 8 /* q4a: per anchor */
#define ASYM_GRID_LO 0.62f
#define ASYM_GRID_STEP 0.06f
#define ASYM_LS 2

/* One evaluated parameter choice for a block. */
typedef struct {
    uint16_t dh, mh; /* fp16 scale, fp16 min (q4a) */
    int feasible;    /* q8: meets the absmax/254 bound; else always 1 */
    double sse;      /* squared error over the valid weights */
    /* per position: the integer code (q8 -127..127, q4 -8..7, q4a 0..15),
     * or for nf4 the codebook index 0..15 */
    float q[QUANT_BLOCK];
} cand_t;

typedef struct {
    quant_fmt f;
    const float *x;             /* 32 values, zero padded */
    int n;                      /* valid ones */
    int32_t valid[QUANT_BLOCK]; /* -1 for i < n, else 0 */
    float mid[16];              /* nf4: midpoints between codebook values */
    double bound;               /* q8: absmax/254 */
    int have;
    int best, cur; /* indices into c[]: best so far, last evaluated */
    cand_t c[2];
} search_t;

/* The kernels below exist as AVX2 intrinsics and as portable scalar C with
 * the same operations in the same order (IEEE: identical results): double
 * sums run in 8 lanes, element i going to lane i%8, lanes added pairwise
 * ((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7)); clamps are written as maxps/minps
 * define them; codes use x*(1/d) rather than x/d in both. */
#if defined(__AVX2__)
#define QUANT_SIMD 1
#include <immintrin.h>

/* 8-lane double accumulator: lo holds lanes 0-3, hi lanes 4-7. */
typedef struct {
    __m256d lo, hi;
} acc8_t;

static double acc8_sum(acc8_t a) {
    double l[8];
    _mm256_storeu_pd(l, a.lo);
    _mm256_storeu_pd(l + 4, a.hi);
    return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}
static inline acc8_t acc8_zero(void) {
    acc8_t a = {_mm256_setzero_pd(), _mm256_setzero_pd()};
    return a;
}
/* acc += a*b, 8 floats, in double (products of two floats are exact) */
static inline acc8_t acc8_mul(acc8_t acc, __m256 a, __m256 b) {
    __m256d alo = _mm256_cvtps_pd(_mm256_castps256_ps128(a));
    __m256d ahi = _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1));
    __m256d blo = _mm256_cvtps_pd(_mm256_castps256_ps128(b));
    __m256d bhi = _mm256_cvtps_pd(_mm256_extractf128_ps(b, 1));
    acc.lo = _mm256_add_pd(acc.lo, _mm256_mul_pd(alo, blo));
    acc.hi = _mm256_add_pd(acc.hi, _mm256_mul_pd(ahi, bhi));
    return acc;
}
static inline acc8_t acc8_add(acc8_t acc, __m256 a) {
    acc.lo = _mm256_add_pd(acc.lo, _mm256_cvtps_pd(_mm256_castps256_ps128(a)));
    acc.hi = _mm256_add_pd(acc.hi, _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1)));
    return acc;
}
#endif

/* Nearest codes on the uniform grid lo..hi for scale d != 0, min m
 * ((x - m) * (1/d), rounded to nearest even, clamped). */
static void uniform_codes(const float *x, float d, float m, float lo, float hi, float *q,
                          float *w) {
    const float inv = 1.0f / d;
#ifdef QUANT_SIMD
    const __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(m), vinv = _mm256_set1_ps(inv);
    const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
    for (int k = 0; k < QUANT_BLOCK; k += 8) {
        __m256 v = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + k), vm), vinv);
        v = _mm256_min_ps(_mm256_max_ps(v, vlo), vhi);
        v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm256_storeu_ps(q + k, v);
        _mm256_storeu_ps(w + k, _mm256_add_ps(_mm256_mul_ps(vd, v), vm));
    }
#else
    for (int i = 0; i < QUANT_BLOCK; i++) {
        float v = (x[i] - m) * inv;
        v = v > lo ? v : lo; /* maxps(v, lo) */
        v = v < hi ? v : hi; /* minps(v, hi) */
        v = nearbyintf(v);
        q[i] = v;
        w[i] = d * v + m; /* exact product, one rounding */
    }
#endif
}

/* Nearest nf4 codes for scale d != 0: index = number of midpoints below
 * x*(1/d) (a value on a midpoint takes the lower code). */
static void nf4_codes(const float *x, float d, const float *mid, float *q, float *w) {
    const float *cb = quant_nf4_codebook;
    const float inv = 1.0f / d;
#ifdef QUANT_SIMD
    const __m256 vd = _mm256_set1_ps(d), vinv = _mm256_set1_ps(inv);
    const __m256 tlo = _mm256_mul_ps(vd, _mm256_loadu_ps(cb));
    const __m256 thi = _mm256_mul_ps(vd, _mm256_loadu_ps(cb + 8));
    for (int k = 0; k < QUANT_BLOCK; k += 8) {
        __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + k), vinv);
        __m256i idx = _mm256_setzero_si256();
        for (int j = 0; j < 15; j++)
            idx = _mm256_sub_epi32(
                idx, _mm256_castps_si256(_mm256_cmp_ps(v, _mm256_set1_ps(mid[j]), _CMP_GT_OQ)));
        _mm256_storeu_ps(q + k, _mm256_cvtepi32_ps(idx));
        __m256 a = _mm256_permutevar8x32_ps(tlo, idx), b = _mm256_permutevar8x32_ps(thi, idx);
        _mm256_storeu_ps(w + k,
                         _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28))));
    }
#else
    float tab[16];
    for (int k = 0; k < 16; k++)
        tab[k] = d * cb[k];
    for (int i = 0; i < QUANT_BLOCK; i++) {
        float v = x[i] * inv;
        int k = 0;
        for (int j = 0; j < 15; j++)
            k += v > mid[j];
        q[i] = (float)k;
        w[i] = tab[k];
    }
#endif
}

#ifndef QUANT_SIMD
/* Sum of 8 lanes of a scalar accumulator, in the order acc8_sum uses. */
static inline double lanes8(const double *l) {
    return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}
#endif

/* Squared error over the valid positions, and for q8 the bound check. */
static void block_error(const search_t *s, const float *w, cand_t *c) {
    const float *x = s->x;
    double emax = 0;
#ifdef QUANT_SIMD
    acc8_t acc = acc8_zero();
    __m256d vmax = _mm256_setzero_pd();
    const __m256d absmask = _mm256_castsi256_pd(_mm256_set1_epi64x(0x7fffffffffffffffll));
    for (int k = 0; k < QUANT_BLOCK; k += 8) {
        __m256 valid = _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i *)(s->valid + k)));
        __m256 xv = _mm256_loadu_ps(x + k), wv = _mm256_loadu_ps(w + k);
        __m256 e = _mm256_and_ps(_mm256_sub_ps(xv, wv), valid);
        acc = acc8_mul(acc, e, e);
        if (s->f == QUANT_Q8) {
            __m256 xm = _mm256_and_ps(xv, valid), wm = _mm256_and_ps(wv, valid);
            for (int h = 0; h < 2; h++) {
                __m128 xh = h ? _mm256_extractf128_ps(xm, 1) : _mm256_castps256_ps128(xm);
                __m128 wh = h ? _mm256_extractf128_ps(wm, 1) : _mm256_castps256_ps128(wm);
                __m256d d = _mm256_sub_pd(_mm256_cvtps_pd(xh), _mm256_cvtps_pd(wh));
                vmax = _mm256_max_pd(vmax, _mm256_and_pd(d, absmask));
            }
        }
    }
    c->sse = acc8_sum(acc);
    if (s->f == QUANT_Q8) {
        double l[4];
        _mm256_storeu_pd(l, vmax);
        for (int i = 0; i < 4; i++)
            emax = l[i] > emax ? l[i] : emax;
    }
#else
    double acc[8] = {0};
    for (int i = 0; i < QUANT_BLOCK; i++) {
        float e = s->valid[i] ? x[i] - w[i] : 0.0f;
        acc[i & 7] += (double)e * (double)e; /* exact product */
        if (s->f == QUANT_Q8 && s->valid[i]) {
            double ae = fabs((double)x[i] - (double)w[i]);
            emax = ae > emax ? ae : emax;
        }
    }
    c->sse = lanes8(acc);
#endif
    c->feasible = s->f == QUANT_Q8 ? emax <= s->bound : 1;
}

/* Fill c[cur] for the stored parameters (dh, mh): nearest codes for all 32
 * positions (the zero padding gets the code nearest 0), error over n. */
static void evaluate(search_t *s, uint16_t dh, uint16_t mh) {
    s->cur = s->have ? 1 - s->best : 0; /* never overwrite the best */
    cand_t *c = &s->c[s->cur];
    float w[QUANT_BLOCK];
    float d = h2f(dh), m = s->f == QUANT_Q4A ? h2f(mh) : 0.0f;
    c->dh = dh;
    c->mh = mh;
    if (d == 0.0f) {
        for (int i = 0; i < QUANT_BLOCK; i++) {
            c->q[i] = s->f == QUANT_NF4 ? 7.0f : 0.0f;
            w[i] = m;
        }
    } else if (s->f == QUANT_NF4) {
        nf4_codes(s->x, d, s->mid, c->q, w);
    } else if (s->f == QUANT_Q8) {
        uniform_codes(s->x, d, m, -127.0f, 127.0f, c->q, w);
    } else if (s->f == QUANT_Q4) {
        uniform_codes(s->x, d, m, -8.0f, 7.0f, c->q, w);
    } else {
        uniform_codes(s->x, d, m, 0.0f, 15.0f, c->q, w);
    }
    block_error(s, w, c);
}

/* Evaluate (dh, mh) and keep it if better: feasible beats infeasible, then
 * the smaller error; ties keep the earlier candidate. Returns 0 if
 * evaluated (c[cur] valid), -1 if the parameters are not finite. */
static int try_params(search_t *s, uint16_t dh, uint16_t mh) {
    if (!h_finite(dh) || !h_finite(mh)) return -1;
    if ((dh & 0x7fffu) == 0) dh = 0; /* store +0, not -0 */
    evaluate(s, dh, mh);
    const cand_t *c = &s->c[s->cur], *b = &s->c[s->best];
    if (!s->have || c->feasible > b->feasible || (c->feasible == b->feasible && c->sse < b->sse)) {
        s->best = s->cur;
        s->have = 1;
    }
    return 0;
}

/* Least-squares parameters for the codes of c[cur] (over the valid n):
 * symmetric formats d = sum(x v)/sum(v v) with v the code's value; q4a
 * solves for d and m jointly. Sums in double (exact products), 8 lanes.
 * -1 when degenerate. */
static int ls_fit(const search_t *s, uint16_t *dh, uint16_t *mh) {
    const float *x = s->x, *q = s->c[s->cur].q;
    const float *cb = quant_nf4_codebook;
    double sxv, svv, sx, sv;
#ifdef QUANT_SIMD
    acc8_t axv = acc8_zero(), avv = axv, ax = axv, av = axv;
    const __m256 clo = _mm256_loadu_ps(cb), chi = _mm256_loadu_ps(cb + 8);
    for (int k = 0; k < QUANT_BLOCK; k += 8) {
        __m256 valid = _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i *)(s->valid + k)));
        __m256 v = _mm256_loadu_ps(q + k);
        if (s->f == QUANT_NF4) {
            __m256i idx = _mm256_cvtps_epi32(v);
            v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(clo, idx),
                                 _mm256_permutevar8x32_ps(chi, idx),
                                 _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
        }
        v = _mm256_and_ps(v, valid);
        __m256 xv = _mm256_loadu_ps(x + k); /* zero past n */
        axv = acc8_mul(axv, xv, v);
        avv = acc8_mul(avv, v, v);
        ax = acc8_add(ax, xv);
        av = acc8_add(av, v);
    }
    sxv = acc8_sum(axv);
    svv = acc8_sum(avv);
    sx = acc8_sum(ax);
    sv = acc8_sum(av);
#else
    double a[4][8] = {{0}};
    for (int i = 0; i < QUANT_BLOCK; i++) {
        float v = s->f == QUANT_NF4 ? cb[(int)q[i]] : q[i];
        v = s->valid[i] ? v : 0.0f;
        a[0][i & 7] += (double)x[i] * (double)v;
        a[1][i & 7] += (double)v * (double)v;
        a[2][i & 7] += (double)x[i];
        a[3][i & 7] += (double)v;
    }
    sxv = lanes8(a[0]);
    svv = lanes8(a[1]);
    sx = lanes8(a[2]);
    sv = lanes8(a[3]);
#endif
    if (s->f != QUANT_Q4A) {
        if (svv == 0) return -1;
        *dh = f2h((float)(sxv / svv));
        *mh = 0;
        return 0;
    }
    double n = (double)s->n, det = n * svv - sv * sv;
    if (!(det > 0)) return -1; /* all codes equal */
    double d = (n * sxv - sv * sx) / det;
    double m = (sx - d * sv) / n;
    *dh = f2h((float)d);
    *mh = f2h((float)m);
    return 0;
}

/* Candidate plus up to `iters` least-squares refits of its codes. */
static void try_refit(search_t *s, uint16_t dh, uint16_t mh, int iters) {
    if (try_params(s, dh, mh) != 0) return;
    for (int it = 0; it < iters; it++) {
        uint16_t ndh, nmh;
        if (ls_fit(s, &ndh, &nmh) != 0 || (ndh == dh && nmh == mh)) return;
        dh = ndh;
        mh = nmh;
        if (try_params(s, dh, mh) != 0) return;
    }
}

/* Encode one block: x has 32 values (zero padded past n). Writes the codes
 * (packed), the scale and for q4a the minimum. */
static int encode_block(quant_fmt f, const float *x, int n, uint8_t *q, uint16_t *scale,
                        uint16_t *minv) {
    float amax = 0.0f, vmax = 0.0f, xmin = x[0], xmax = x[0];
    for (int i = 0; i < n; i++) {
        if (!isfinite(x[i])) return -EINVAL;
        float a = fabsf(x[i]);
        if (a > amax) {
            amax = a;
            vmax = x[i]; /* signed value of largest magnitude (first one) */
        }
        xmin = x[i] < xmin ? x[i] : xmin;
        xmax = x[i] > xmax ? x[i] : xmax;
    }
    search_t s;
    s.f = f;
    s.x = x;
    s.n = n;
    s.have = 0;
    s.best = s.cur = 0;
    s.bound = (double)amax / 254.0;
    for (int i = 0; i < QUANT_BLOCK; i++)
        s.valid[i] = i < n ? -1 : 0;
    for (int k = 0; k < 15; k++)
        s.mid[k] = 0.5f * (quant_nf4_codebook[k] + quant_nf4_codebook[k + 1]);
    s.mid[15] = 0.0f;

    /* The block must fit without clipping at the plain absmax parameters
     * (the smallest ones for q4); else the format cannot hold it. */
    float r = xmax - xmin;
    float need = f == QUANT_Q8    ? amax / 127.0f
                 : f == QUANT_Q4  ? amax / 8.0f
                 : f == QUANT_NF4 ? amax
                                  : r / 15.0f;
    if (!h_finite(f2h(need)) || !h_finite(f2h(xmin))) return -ERANGE;

    switch (f) {
    case QUANT_Q8: {
        /* Feasible scales lie in about [amax/127.5, amax/127]: try every
         * fp16 value there (a handful), the plain absmax one and up to 3
         * steps below it first (test_quant's reference), then a refit. */
        uint16_t ref = f2h(amax / 127.0f);
        for (int k = 0; k <= 3 && k <= (int)ref; k++)
            try_params(&s, (uint16_t)(ref - k), 0);
        uint16_t lo = f2h(amax / 127.5f);
        lo = lo > 2 ? (uint16_t)(lo - 2) : 0;
        for (uint32_t h = lo; h <= (uint32_t)ref + 2u && h < 0x7c00u; h++)
            try_params(&s, (uint16_t)h, 0);
        s.cur = s.best; /* refit the best */
        uint16_t dh, mh;
        if (ls_fit(&s, &dh, &mh) == 0) try_params(&s, dh, 0);
        break;
    }
    case QUANT_Q4: {
        /* Plain absmax roundings first: largest |x| onto -8 (as llama.cpp
         * q4_0) and onto +7 (absmax/7). Then both orientations on a grid. */
        try_params(&s, f2h(vmax / -8.0f), 0);
        try_params(&s, f2h(vmax / 7.0f), 0);
        for (int o = 0; o < 2; o++) {
            float base = o == 0 ? vmax / -8.0f : vmax / 7.0f;
            for (int k = 0; k < SYM_GRID_N; k++)
                try_refit(&s, f2h(base * (SYM_GRID_LO + SYM_GRID_STEP * (float)k)), 0, SYM_LS);
        }
        break;
    }
    case QUANT_NF4: {
        /* Plain absmax (QLoRA) first, then both signs on a grid (a negative
         * scale mirrors the asymmetric codebook). */
        try_params(&s, f2h(amax), 0);
        for (int o = 0; o < 2; o++) {
            float base = o == 0 ? vmax : -vmax;
            for (int k = 0; k < SYM_GRID_N; k++)
                try_refit(&s, f2h(base * (SYM_GRID_LO + SYM_GRID_STEP * (float)k)), 0, SYM_LS);
        }
        break;
    }
    case QUANT_Q4A: {
        try_params(&s, f2h(r / 15.0f), f2h(xmin));
        if (r > 0.0f) {
            for (int k = 0; k < ASYM_GRID_N; k++) {
                float g = ASYM_GRID_LO + ASYM_GRID_STEP * (float)k;
                try_refit(&s, f2h(r / 15.0f * g), f2h(xmin), ASYM_LS);         /* clip top */
                try_refit(&s, f2h(r / 15.0f * g), f2h(xmax - r * g), ASYM_LS); /* clip bottom */
            }
        }
        break;
    }
    default:
        return -EINVAL;
    }
    if (!s.have) return -ERANGE; /* no finite fp16 scale/min for this block */

    const cand_t *best = &s.c[s.best];
    const float *c = best->q;
    if (f == QUANT_Q8) {
        for (int i = 0; i < QUANT_BLOCK; i++)
            q[i] = (uint8_t)(int8_t)c[i];
    } else {
        int off = f == QUANT_Q4 ? 8 : 0;
        for (int j = 0; j < QUANT_BLOCK / 2; j++)
            q[j] = (uint8_t)((((int)c[j] + off) & 0xf) | ((((int)c[j + 16] + off) & 0xf) << 4));
    }
    *scale = best->dh;
    if (minv) *minv = best->mh;
    return 0;
}

/* Pointers to block j of row r inside a tensor buffer. */
static uint8_t *blk_q(const quant_layout *l, uint8_t *base, size_t r, size_t j) {
    return base + l->q_off + (r * l->nblk + j) * l->code_bytes;
}
static uint16_t *blk_s(const quant_layout *l, uint8_t *base, size_t r, size_t j) {
    return (uint16_t *)(void *)(base + l->scale_off + (r * l->nblk + j) * 2);
}
static uint16_t *blk_m(const quant_layout *l, uint8_t *base, size_t r, size_t j) {
    return l->min_bytes ? (uint16_t *)(void *)(base + l->min_off + (r * l->nblk + j) * 2) : NULL;
}

/* The buffer needs no alignment: scales are read and written via memcpy. */
static uint16_t ld16(const uint16_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}
static void st16(uint16_t *p, uint16_t v) {
    memcpy(p, &v, 2);
}

int quant_tensor(quant_fmt f, const float *w, size_t rows, size_t cols, void *out) {
    quant_layout l;
    int err = quant_layout_of(f, rows, cols, &l);
    if (err) return err;
    if (rows == 0 || cols == 0) return 0;
    if (!w || !out) return -EINVAL;
    uint8_t *base = out;
    err = 0;
#pragma omp parallel for schedule(static) reduction(min : err) if (rows * cols >= 8192)
    for (size_t r = 0; r < rows; r++) {
        for (size_t j = 0; j < l.nblk; j++) {
            float x[QUANT_BLOCK] = {0};
            size_t c0 = j * QUANT_BLOCK;
            int n = (int)(cols - c0 < QUANT_BLOCK ? cols - c0 : QUANT_BLOCK);
            memcpy(x, w + r * cols + c0, (size_t)n * sizeof(float));
            uint16_t sc = 0, mn = 0;
            int e = encode_block(f, x, n, blk_q(&l, base, r, j), &sc, &mn);
            st16(blk_s(&l, base, r, j), sc);
            if (l.min_bytes) st16(blk_m(&l, base, r, j), mn);
            if (e < err) err = e;
        }
    }
    return err;
}

/* Decode one block into w[32] (all 32 positions, padding included). */
static void decode_block(quant_fmt f, const uint8_t *q, uint16_t sh, uint16_t mh, float *w) {
    float d = h2f(sh);
    switch (f) {
    case QUANT_Q8:
        for (int i = 0; i < QUANT_BLOCK; i++)
            w[i] = d * (float)(int8_t)q[i];
        break;
    case QUANT_Q4:
        for (int i = 0; i < QUANT_BLOCK / 2; i++) {
            w[i] = d * (float)((q[i] & 0xf) - 8);
            w[i + 16] = d * (float)((q[i] >> 4) - 8);
        }
        break;
    case QUANT_Q4A: {
        float m = h2f(mh);
        for (int i = 0; i < QUANT_BLOCK / 2; i++) {
            w[i] = d * (float)(q[i] & 0xf) + m;
            w[i + 16] = d * (float)(q[i] >> 4) + m;
        }
        break;
    }
    case QUANT_NF4:
        for (int i = 0; i < QUANT_BLOCK / 2; i++) {
            w[i] = d * quant_nf4_codebook[q[i] & 0xf];
            w[i + 16] = d * quant_nf4_codebook[q[i] >> 4];
        }
        break;
    default:
        break;
    }
}

int dequant_tensor(quant_fmt f, const void *qv, size_t rows, size_t cols, float *w) {
    quant_layout l;
    int err = quant_layout_of(f, rows, cols, &l);
    if (err) return err;
    if (rows == 0 || cols == 0) return 0;
    if (!w || !qv) return -EINVAL;
    uint8_t *base = (uint8_t *)(uintptr_t)qv; /* only read */
#pragma omp parallel for schedule(static) if (rows * cols >= 65536)
    for (size_t r = 0; r < rows; r++) {
        for (size_t j = 0; j < l.nblk; j++) {
            float blk[QUANT_BLOCK];
            uint16_t *mp = blk_m(&l, base, r, j);
            decode_block(f, blk_q(&l, base, r, j), ld16(blk_s(&l, base, r, j)), mp ? ld16(mp) : 0,
                         blk);
            size_t c0 = j * QUANT_BLOCK;
            size_t n = cols - c0 < QUANT_BLOCK ? cols - c0 : QUANT_BLOCK;
            memcpy(w + r * cols + c0, blk, n * sizeof(float));
        }
    }
    return 0;
}

double quant_rel_rmse(const float *ref, const float *approx, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double e = (double)ref[i] - (double)approx[i];
        num += e * e;
        den += (double)ref[i] * (double)ref[i];
    }
    if (den == 0) return num == 0 ? 0.0 : INFINITY;
    return sqrt(num / den);
}

int quant_matmul_ref(quant_fmt f, const void *wq, size_t out, size_t in, const float *x, size_t B,
                     const float *bias, float *y) {
    quant_layout l;
    int err = quant_layout_of(f, out, in, &l);
    if (err) return err;
    if (out == 0 || B == 0) return 0;
    if (!wq || !y || (in && !x)) return -EINVAL;
    uint8_t *base = (uint8_t *)(uintptr_t)wq; /* only read */
    for (size_t r = 0; r < out; r++) {
        for (size_t b = 0; b < B; b++) {
            float sum = 0.0f;
            for (size_t j = 0; j < l.nblk; j++) {
                float blk[QUANT_BLOCK];
                uint16_t *mp = blk_m(&l, base, r, j);
                decode_block(f, blk_q(&l, base, r, j), ld16(blk_s(&l, base, r, j)),
                             mp ? ld16(mp) : 0, blk);
                size_t c0 = j * QUANT_BLOCK;
                size_t n = in - c0 < QUANT_BLOCK ? in - c0 : QUANT_BLOCK;
                for (size_t i = 0; i < n; i++)
                    sum += blk[i] * x[b * in + c0 + i];
            }
            y[b * out + r] = sum + (bias ? bias[r] : 0.0f);
        }
    }
    return 0;
}
