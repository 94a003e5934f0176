/* comm_cx: gradient compressors with error feedback and their exchange over
 * MPI (see comm/compress.h for the formats, guarantees and costs).
 * Not here: bucketing, config parsing, the trainer's metrics.
 */
#include "comm/compress.h"

#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "comm/topo.h"
#include "kernels/quant.h"

#ifdef __F16C__
#include <immintrin.h>
#endif

/* ---- errors ----------------------------------------------------------- */

__attribute__((format(printf, 4, 5))) static int cx_fail(int code, const char *file, int line,
                                                         const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "%s:%d: rank %d: comm_cx: %s\n", file, line, comm_world_rank(), msg);
    return code;
}
#define FAIL(code, ...) cx_fail(code, __FILE__, __LINE__, __VA_ARGS__)

/* ---- names ------------------------------------------------------------ */

static const char *const type_names[COMM_CX_NTYPES] = {"none", "fp16", "bf16", "int8",
                                                       "int4", "int2", "topk", "powersgd"};

const char *comm_cx_type_name(comm_cx_type t) {
    return (unsigned)t < COMM_CX_NTYPES ? type_names[t] : NULL;
}

int comm_cx_type_from_name(const char *name, comm_cx_type *out) {
    for (int t = 0; name && t < COMM_CX_NTYPES; t++)
        if (!strcmp(name, type_names[t])) {
            *out = (comm_cx_type)t;
            return 0;
        }
    return COMM_ERR_ARG;
}

comm_cx_type comm_cx_int_type(int bits) {
    return bits == 8   ? COMM_CX_INT8
           : bits == 4 ? COMM_CX_INT4
           : bits == 2 ? COMM_CX_INT2
                       : COMM_CX_NTYPES;
}

void comm_cx_opts_default(comm_cx_opts *o) {
    memset(o, 0, sizeof *o);
    o->type = COMM_CX_NONE;
    o->ratio = 0.01;
    o->rank = 4;
    o->error_feedback = 1;
    o->warmup_steps = 0;
    o->min_ratio = 1.5;
    o->seed = 1;
    o->block = 256;
    o->stochastic = 1;
    o->node_aware = 1;
}

/* ---- random stream (splitmix64 finalizer, as src/rng.c; counter based) -- */

static uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

uint64_t comm_cx_stream_key(uint64_t seed, int step, int rank, int stage) {
    uint64_t k = mix64(seed + 0x9e3779b97f4a7c15ULL);
    k = mix64(k ^ ((uint64_t)(uint32_t)step * 0xd1b54a32d192ed03ULL));
    k = mix64(k ^ ((uint64_t)(uint32_t)rank << 32 | (uint32_t)stage));
    return k;
}

/* uniform in (0, 1): (j + 0.5) / 2^24, j 24 random bits; mean exactly 1/2.
 * Scalar, for PowerSGD's random matrices. */
static inline double unif(uint64_t key, size_t i) {
    uint64_t z = mix64(key + (uint64_t)i * 0x9e3779b97f4a7c15ULL);
    return ((double)(z >> 40) + 0.5) * (1.0 / 16777216.0);
}

/* Stochastic rounding's uniforms: a counter-based 32-bit hash (the
 * "lowbias32" finalizer, a bijection) of the element index times the golden
 * ratio xor the stream key; 32-bit lanes, so the loop that uses it
 * vectorizes (8 per AVX2 instruction) where the 64-bit splitmix did not. */
static inline uint32_t h32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

/* ---- casts ------------------------------------------------------------ */

uint16_t comm_cx_fp32_to_bf16(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((b >> 16) | 0x40); /* quiet NaN */
    if ((b & 0x7fffffffu) == 0x7f800000u) return (uint16_t)(b >> 16);         /* inf */
    uint32_t r = b + 0x7fffu + ((b >> 16) & 1u);
    if ((r & 0x7f800000u) == 0x7f800000u) /* rounded up to inf: saturate */
        return (uint16_t)((b >> 16 & 0x8000u) | 0x7f7fu);
    return (uint16_t)(r >> 16);
}

float comm_cx_bf16_to_fp32(uint16_t h) {
    uint32_t b = (uint32_t)h << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

/* comm_cx_fp32_to_bf16 without branches, so the loops vectorize */
static inline uint32_t bf16_bits(uint32_t b) {
    uint32_t a = b & 0x7fffffffu;
    uint32_t r = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
    uint32_t sat = (b >> 16 & 0x8000u) | 0x7f7fu;
    r = (r & 0x7f80u) == 0x7f80u ? sat : r;
    r = a == 0x7f800000u ? b >> 16 : r;
    return a > 0x7f800000u ? (b >> 16) | 0x40u : r;
}

static void bf16_encode(const float *x, size_t n, uint16_t *o, float *dec, float *res) {
    const uint32_t *xb = (const uint32_t *)(const void *)x;
    for (size_t i = 0; i < n; i++)
        o[i] = (uint16_t)bf16_bits(xb[i]);
    if (dec || res)
        for (size_t i = 0; i < n; i++) {
            uint32_t b = (uint32_t)o[i] << 16;
            float d;
            memcpy(&d, &b, 4);
            if (dec) dec[i] = d;
            if (res) res[i] = x[i] - d;
        }
}

static void bf16_decode(const uint16_t *in, size_t n, float *out, int add) {
    for (size_t i = 0; i < n; i++) {
        uint32_t b = (uint32_t)in[i] << 16;
        float d;
        memcpy(&d, &b, 4);
        out[i] = add ? out[i] + d : d;
    }
}

/* fp16 with F16C (x86-64-v3) where available: vcvtps2ph rounds to nearest
 * even like quant_fp32_to_fp16; values are clamped first (saturation) */
static void fp16_encode(const float *x, size_t n, uint16_t *o, float *dec, float *res) {
    size_t i = 0;
#ifdef __F16C__
    const __m256 hi = _mm256_set1_ps(65504.f), lo = _mm256_set1_ps(-65504.f);
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        /* max/min return the second operand for NaN: keep NaN as NaN */
        __m256 c = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
        c = _mm256_blendv_ps(c, v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        __m128i h = _mm256_cvtps_ph(c, _MM_FROUND_TO_NEAREST_INT);
        _mm_storeu_si128((__m128i *)(void *)(o + i), h);
        if (dec || res) {
            __m256 d = _mm256_cvtph_ps(h);
            if (dec) _mm256_storeu_ps(dec + i, d);
            if (res) _mm256_storeu_ps(res + i, _mm256_sub_ps(v, d));
        }
    }
#endif
    for (; i < n; i++) {
        float v = x[i] > 65504.f ? 65504.f : x[i] < -65504.f ? -65504.f : x[i];
        o[i] = quant_fp32_to_fp16(v);
        float d = quant_fp16_to_fp32(o[i]);
        if (dec) dec[i] = d;
        if (res) res[i] = x[i] - d;
    }
}

static void fp16_decode(const uint16_t *in, size_t n, float *out, int add) {
    size_t i = 0;
#ifdef __F16C__
    for (; i + 8 <= n; i += 8) {
        __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(in + i)));
        if (add) d = _mm256_add_ps(_mm256_loadu_ps(out + i), d);
        _mm256_storeu_ps(out + i, d);
    }
#endif
    for (; i < n; i++)
        out[i] = add ? out[i] + quant_fp16_to_fp32(in[i]) : quant_fp16_to_fp32(in[i]);
}

/* ---- quantizers ------------------------------------------------------- */

static int qbits(comm_cx_type t) {
    return t == COMM_CX_INT8 ? 8 : t == COMM_CX_INT4 ? 4 : t == COMM_CX_INT2 ? 2 : 0;
}

static int is_coded(comm_cx_type t) {
    return t >= COMM_CX_FP16 && t <= COMM_CX_INT2;
}

size_t comm_cx_encoded_bytes(comm_cx_type t, size_t n, size_t block) {
    if (t == COMM_CX_FP16 || t == COMM_CX_BF16) return 2 * n;
    int b = qbits(t);
    if (!b || !block) return 0;
    size_t nb = (n + block - 1) / block;
    return nb * sizeof(float) + (n * (size_t)b + 7) / 8;
}

int comm_cx_encode(comm_cx_type t, const float *x, size_t n, size_t block, uint64_t key,
                   size_t gidx0, void *out, float *dec) {
    return comm_cx_encode_round(t, x, n, block, key, gidx0, 1, out, dec);
}

/* Elements per pass of the block quantizer (its scratch lives on the stack) */
#define QCHUNK 256

/* One run x[0..m), m <= QCHUNK, of a block with scale s (finite, > 0):
 * codes q (clamped to [-L, L]), decoded values into dec and/or the
 * residual x - dec into res. q = floor(x (1/s) + u) in float (u = 1/2:
 * nearest), then corrected with the exact remainder x - q s (one fma):
 * q moves by one where float rounding put it off the bound (|x - q s| <= s
 * stochastic, <= s/2 nearest), which happens with probability ~2^-23 and
 * keeps the rounding unbiased. 8 lanes per AVX2 instruction. Stochastic u
 * from h32 of the element index gidx: (j + 1/2) 2^-23, j 23 random bits,
 * exact in float, mean exactly 1/2. */
static void quant_run(const float *x, size_t len, float s, int L, int stochastic, uint32_t k0,
                      size_t gidx, int8_t *q, float *dec, float *res) {
    size_t m = len;
    float inv = 1.0f / s, fl = (float)L, lim = stochastic ? s : 0.5f * s;
    float u[QCHUNK];
    if (stochastic) {
        uint32_t g0 = (uint32_t)gidx;
        for (size_t i = 0; i < m; i++)
            u[i] = ((float)(h32((g0 + (uint32_t)i) * 0x9e3779b9u ^ k0) >> 9) + 0.5f) *
                   (1.0f / 8388608.0f);
    } else {
        for (size_t i = 0; i < m; i++)
            u[i] = 0.5f;
    }
    int32_t qi[QCHUNK];
    if (!(s >= 0x1p-100f)) { /* 1/s would overflow float: scalar double */
        for (size_t i = 0; i < m; i++) {
            double v = floor((double)x[i] / (double)s + (double)u[i]);
            qi[i] = (int32_t)(v > L ? L : v < -L ? -L : v);
        }
        m = 0; /* skips the float loop */
    }
    for (size_t i = 0; i < m; i++) {
        float v = floorf(x[i] * inv + u[i]);
        float r = fmaf(-v, s, x[i]);
        v = r > lim ? v + 1.0f : v;
        v = r < -lim ? v - 1.0f : v;
        v = v > fl ? fl : v < -fl ? -fl : v;
        qi[i] = (int32_t)v;
    }
    for (size_t i = 0; i < len; i++) {
        float d = (float)qi[i] * s;
        q[i] = (int8_t)qi[i];
        if (dec) dec[i] = d;
        if (res) res[i] = x[i] - d;
    }
}

/* max |x| as bits (NaN above inf): an integer max, which vectorizes */
static uint32_t absmax_bits(const float *x, size_t n) {
    const uint32_t *b = (const uint32_t *)(const void *)x;
    uint32_t m = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t a = b[i] & 0x7fffffffu;
        m = a > m ? a : m;
    }
    return m;
}

/* packs codes q + L of elements [i0, i0 + len) into the code bytes */
static void pack_codes(unsigned char *codes, const int8_t *q, size_t i0, size_t len, int bits,
                       int L) {
    if (bits == 8) {
        memcpy(codes + i0, q, len);
        return;
    }
    const size_t per = (size_t)(8 / bits);
    size_t i = 0;
    /* unaligned head / tail element by element (codes were zeroed) */
    for (; i < len && (i0 + i) % per; i++)
        codes[(i0 + i) / per] |= (unsigned char)(((unsigned)(q[i] + L) & ((1u << bits) - 1u))
                                                 << (((i0 + i) % per) * (size_t)bits));
    unsigned char *o = codes + (i0 + i) / per;
    size_t nb = (len - i) / per;
    const int8_t *qq = q + i;
    if (bits == 4)
        for (size_t j = 0; j < nb; j++)
            o[j] = (unsigned char)((unsigned)(qq[2 * j] + L) | (unsigned)(qq[2 * j + 1] + L) << 4);
    else
        for (size_t j = 0; j < nb; j++)
            o[j] = (unsigned char)((unsigned)(qq[4 * j] + L) | (unsigned)(qq[4 * j + 1] + L) << 2 |
                                   (unsigned)(qq[4 * j + 2] + L) << 4 |
                                   (unsigned)(qq[4 * j + 3] + L) << 6);
    for (i += nb * per; i < len; i++)
        codes[(i0 + i) / per] |= (unsigned char)(((unsigned)(q[i] + L) & ((1u << bits) - 1u))
                                                 << (((i0 + i) % per) * (size_t)bits));
}

/* Encoder behind comm_cx_encode_round, with the residual x - dec (res, may
 * be NULL) as an extra output so error feedback needs no extra pass. */
static int encode_res(comm_cx_type t, const float *x, size_t n, size_t block, uint64_t key,
                      size_t gidx0, int stochastic, void *out, float *dec, float *res) {
    unsigned char *o = out;
    if (t == COMM_CX_FP16) {
        fp16_encode(x, n, out, dec, res);
        return 0;
    }
    if (t == COMM_CX_BF16) {
        bf16_encode(x, n, out, dec, res);
        return 0;
    }
    int bits = qbits(t);
    if (!bits || !block) return COMM_ERR_ARG;
    const int L = (1 << (bits - 1)) - 1; /* 127, 7, 1 */
    size_t nb = (n + block - 1) / block;
    unsigned char *codes = o + nb * sizeof(float);
    if (bits < 8) memset(codes, 0, (n * (size_t)bits + 7) / 8);
    uint32_t k0 = (uint32_t)key ^ (uint32_t)(key >> 32);
    int8_t q[QCHUNK];
    for (size_t b = 0; b < nb; b++) {
        size_t lo = b * block, hi = lo + block < n ? lo + block : n;
        uint32_t mb = absmax_bits(x + lo, hi - lo);
        float amax;
        memcpy(&amax, &mb, 4);
        int finite = mb < 0x7f800000u;
        float s = finite ? amax / (float)L : NAN;
        memcpy(o + b * sizeof(float), &s, sizeof s);
        for (size_t c = lo; c < hi; c += QCHUNK) {
            size_t m = hi - c < QCHUNK ? hi - c : QCHUNK;
            if (finite && s > 0) {
                quant_run(x + c, m, s, L, stochastic, k0 ^ h32((uint32_t)((gidx0 + c) >> 32)),
                          gidx0 + c, q, dec ? dec + c : NULL, res ? res + c : NULL);
            } else {
                memset(q, 0, m);
                for (size_t i = c; i < c + m; i++) {
                    float d = finite ? 0.0f : NAN;
                    if (dec) dec[i] = d;
                    if (res) res[i] = x[i] - d;
                }
            }
            pack_codes(codes, q, c, m, bits, L);
        }
    }
    return 0;
}

int comm_cx_encode_round(comm_cx_type t, const float *x, size_t n, size_t block, uint64_t key,
                         size_t gidx0, int stochastic, void *out, float *dec) {
    return encode_res(t, x, n, block, key, gidx0, stochastic, out, dec, NULL);
}

/* Decoder: out = decoded (add 0) or out += decoded (add 1). A block whose
 * scale is NaN decodes to NaN (q * NaN). */
static int decode_add(comm_cx_type t, const void *in, size_t n, size_t block, float *out, int add) {
    const unsigned char *p = in;
    if (t == COMM_CX_FP16 || t == COMM_CX_BF16) {
        if (t == COMM_CX_FP16)
            fp16_decode(in, n, out, add);
        else
            bf16_decode(in, n, out, add);
        return 0;
    }
    int bits = qbits(t);
    if (!bits || !block) return COMM_ERR_ARG;
    const int L = (1 << (bits - 1)) - 1;
    const size_t per = (size_t)(8 / bits);
    size_t nb = (n + block - 1) / block;
    const unsigned char *codes = p + nb * sizeof(float);
    float qv[QCHUNK];
    /* int2: the 4 code values of every byte value, copied per byte */
    float lut[256 * 4];
    if (bits == 2)
        for (unsigned b = 0; b < 256; b++)
            for (size_t e = 0; e < per; e++)
                lut[b * per + e] =
                    (float)((int)((b >> (e * (size_t)bits)) & ((1u << bits) - 1u)) - L);
    for (size_t b = 0; b < nb; b++) {
        float s;
        memcpy(&s, p + b * sizeof(float), sizeof s);
        size_t lo = b * block, hi = lo + block < n ? lo + block : n;
        for (size_t c = lo; c < hi; c += QCHUNK) {
            size_t m = hi - c < QCHUNK ? hi - c : QCHUNK;
            /* codes -> q values (floats), then one vectorizable multiply */
            size_t i = 0;
            if (bits == 8) {
                const int8_t *cc = (const int8_t *)(const void *)(codes + c);
                for (; i < m; i++)
                    qv[i] = (float)cc[i];
            } else {
                for (; i < m && (c + i) % per; i++)
                    qv[i] =
                        (float)((int)((codes[(c + i) / per] >> (((c + i) % per) * (size_t)bits)) &
                                      ((1u << bits) - 1u)) -
                                L);
                const unsigned char *cb = codes + (c + i) / per;
                size_t nby = (m - i) / per;
                float *qq = qv + i;
                if (bits == 4) /* arithmetic: faster than the table here */
                    for (size_t j = 0; j < nby; j++) {
                        qq[2 * j] = (float)((int)(cb[j] & 15u) - L);
                        qq[2 * j + 1] = (float)((int)(cb[j] >> 4) - L);
                    }
                else
                    for (size_t j = 0; j < nby; j++)
                        memcpy(qq + 4 * j, lut + 4 * cb[j], 4 * sizeof(float));
                for (i += nby * per; i < m; i++)
                    qv[i] =
                        (float)((int)((codes[(c + i) / per] >> (((c + i) % per) * (size_t)bits)) &
                                      ((1u << bits) - 1u)) -
                                L);
            }
            float *oc = out + c;
            if (add)
                for (i = 0; i < m; i++)
                    oc[i] += qv[i] * s;
            else
                for (i = 0; i < m; i++)
                    oc[i] = qv[i] * s;
        }
    }
    return 0;
}

int comm_cx_decode(comm_cx_type t, const void *in, size_t n, size_t block, float *out) {
    return decode_add(t, in, n, block, out, 0);
}

/* ---- top-k ------------------------------------------------------------ */

static inline uint32_t absbits(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    return b & 0x7fffffffu; /* monotone in |f| for non-negative floats; NaN above inf */
}

#define TK_HBITS 11 /* first histogram: the top 11 of the 31 key bits */
#define TK_HSHIFT (31 - TK_HBITS)

/* Histogram of the top key bits. Neighbouring gradients often share a bin:
 * four interleaved sub-histograms (h: 4 << TK_HBITS entries, summed into
 * the first) break the store-to-load chain of repeated increments. When acc
 * is given (error feedback), acc[i] += x[i] first and the sum is counted. */
static void tk_hist(const float *restrict x, float *restrict acc, size_t n, uint32_t *restrict h) {
    const size_t H = (size_t)1 << TK_HBITS;
    memset(h, 0, 4 * H * sizeof *h);
    size_t i = 0;
    if (acc) {
        for (; i + 4 <= n; i += 4)
            for (size_t l = 0; l < 4; l++) {
                float v = acc[i + l] + x[i + l];
                acc[i + l] = v;
                h[l * H + (absbits(v) >> TK_HSHIFT)]++;
            }
        for (; i < n; i++) {
            float v = acc[i] + x[i];
            acc[i] = v;
            h[absbits(v) >> TK_HSHIFT]++;
        }
    } else {
        for (; i + 4 <= n; i += 4)
            for (size_t l = 0; l < 4; l++)
                h[l * H + (absbits(x[i + l]) >> TK_HSHIFT)]++;
        for (; i < n; i++)
            h[absbits(x[i]) >> TK_HSHIFT]++;
    }
    for (size_t b = 0; b < H; b++)
        h[b] += h[H + b] + h[2 * H + b] + h[3 * H + b];
}

/* Elements with key >= lowb, in index order: indices into ci, keys into ck,
 * which must hold their number + 16 entries (branch-free appends write one
 * past the last); returns the number. Blocks of 16 without one are skipped
 * after a vectorized test, so a sparse selection costs about one streaming
 * read. */
static size_t scan_ge(const float *x, size_t n, uint32_t lowb, uint32_t *ci, uint32_t *ck) {
    const uint32_t *b = (const uint32_t *)(const void *)x;
    size_t j = 0, i = 0;
    for (; i < n; i += 16) {
        size_t m = n - i < 16 ? n - i : 16;
        int any = 0;
        if (m == 16)
            for (size_t l = 0; l < 16; l++)
                any |= (b[i + l] & 0x7fffffffu) >= lowb;
        else
            any = 1;
        if (!any) continue;
        for (size_t l = 0; l < m; l++) {
            uint32_t v = b[i + l] & 0x7fffffffu;
            ci[j] = (uint32_t)(i + l), ck[j] = v;
            j += v >= lowb;
        }
    }
    return j;
}

/* Selection given the histogram of the top key bits: the bucket `top`
 * holding the k-th largest key; the elements of that bucket and above
 * (gathered with their indices in one scan) give the threshold key T by a
 * radix select over the bucket's remaining 20 bits, and the result in index
 * order. *cand: 2 *cap entries (malloc'ed or NULL), grown up to n/4 when
 * the candidates do not fit (many magnitudes sharing 11 leading bits, as in
 * AdamW's changes, where a third of the calls needed more than 4k); beyond
 * that (or without memory), radix passes over x instead. O(n),
 * deterministic, ties to the lower index. */
static int tk_select(const float *x, size_t n, size_t k, const uint32_t *h, uint32_t *idx,
                     uint32_t **candp, size_t *capp) {
    if (k > n || n > UINT32_MAX) return COMM_ERR_ARG;
    if (k == 0) return 0;
    size_t rem = k;
    uint32_t top = 0;
    for (int b = (1 << TK_HBITS) - 1; b >= 0; b--) {
        if (h[b] >= rem) {
            top = (uint32_t)b;
            break;
        }
        rem -= h[b];
    }
    /* rem: how many keys of bucket top to take */
    uint32_t prefix = top << TK_HSHIFT;
    size_t nc = k - rem + h[top];
    if (nc + 16 > *capp && nc <= n / 4) { /* beyond n/4, passes over x cost no more */
        size_t want = nc + nc / 4 + 16;
        uint32_t *g = realloc(*candp, 2 * want * sizeof *g);
        if (g) *candp = g, *capp = want;
    }
    size_t cap = *capp;
    uint32_t *cand = *candp, *ci = cand, *ck = cand ? cand + cap : NULL;
    int gathered = cand && nc + 16 <= cap;
    if (gathered && scan_ge(x, n, prefix, ci, ck) != nc) return COMM_ERR_ARG;
    /* T: prefix, then the remaining bits in two 10-bit radix passes */
    for (int shift = TK_HSHIFT - 10; shift >= 0; shift -= 10) {
        uint32_t hh[1024] = {0};
        uint32_t mask = ~0u << (shift + 10);
        if (gathered) {
            for (size_t i = 0; i < nc; i++)
                if ((ck[i] & mask) == prefix) hh[(ck[i] >> shift) & 1023u]++;
        } else {
            for (size_t i = 0; i < n; i++) {
                uint32_t v = absbits(x[i]);
                if ((v & mask) == prefix) hh[(v >> shift) & 1023u]++;
            }
        }
        for (int b = 1023; b >= 0; b--) {
            if (hh[b] >= rem) {
                prefix |= (uint32_t)b << shift;
                break;
            }
            rem -= hh[b];
        }
    }
    size_t j = 0;
    if (gathered) {
        for (size_t i = 0; i < nc && j < k; i++) {
            uint32_t v = ck[i];
            if (v > prefix || (v == prefix && rem > 0)) {
                if (v == prefix) rem--;
                idx[j++] = ci[i];
            }
        }
    } else {
        for (size_t i = 0; i < n && j < k; i++) {
            uint32_t v = absbits(x[i]);
            if (v > prefix || (v == prefix && rem > 0)) {
                if (v == prefix) rem--;
                idx[j++] = (uint32_t)i;
            }
        }
    }
    return j == k ? 0 : COMM_ERR_ARG;
}

int comm_cx_topk_select(const float *x, size_t n, size_t k, uint32_t *idx) {
    if (k > n || n > UINT32_MAX) return COMM_ERR_ARG;
    if (k == 0) return 0;
    uint32_t *h = malloc(4 * sizeof(uint32_t) << TK_HBITS);
    if (!h) return COMM_ERR_NOMEM;
    tk_hist(x, NULL, n, h);
    size_t cap = 4 * k + 4096;
    uint32_t *cand = malloc(2 * cap * sizeof *cand);
    if (!cand) cap = 0;
    int err = tk_select(x, n, k, h, idx, &cand, &cap);
    free(cand);
    free(h);
    return err;
}

/* ---- context ---------------------------------------------------------- */

struct comm_cx {
    comm_cx_opts o;
    size_t *mrows, *mcols; /* copies of the matrix shapes */
    size_t n;
    MPI_Comm comm; /* MPI_COMM_NULL: local */
    int rank, size;
    int compress; /* decided at create */
    size_t k;     /* topk */
    /* quantizer chunks: chunk j = [clo[j], clo[j+1]) */
    size_t *clo;
    float *res; /* n (+ own chunk) */
    size_t res_len;
    float *work; /* n */
    unsigned char *sbuf, *rbuf;
    size_t sbuf_len, rbuf_len;
    /* powersgd */
    float *q;       /* warm-start Q, per matrix cols x r */
    size_t q_len;   /* total */
    float *pq;      /* all-reduce buffer: P's (+ dense tail) / Q's */
    float *qloc;    /* local Q's */
    size_t pq_len;  /* max over the two calls */
    size_t mat_end; /* elements covered by the matrices */
    int *mat_on;    /* matrix compressed? */
    comm_ar *ar;
    comm_ar_fn fn;
    uint64_t total;
    const char *last_mode;
    double ph[COMM_CX_NPHASES]; /* profile, seconds */
    int *cnt;                   /* quantizers: 4 p counts/displacements */
    uint32_t *hist, *cand;      /* topk: histogram, candidate keys */
    size_t cand_cap;
    float *qt;  /* powersgd: one Q transposed, r x max cols */
    double *qd; /* powersgd: Q accumulators, r x max cols */
    /* node-aware quantizer exchange (hier): node = this node's ranks,
     * inter = the ranks of the same local rank on every node; this rank
     * reduces segment nl (local rank); clo holds every segment's N + 1
     * chunk bounds */
    int hier, nq, nl, nn, ni;
    MPI_Comm node, inter;
    size_t cbase; /* clo index of the own segment's chunks */
    int *seg;     /* q float counts, q displacements, the same in encoded bytes */
    uint64_t node_total;
};

static double tnow(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* adds the time since *t to phase ph and restarts *t */
static void lap(comm_cx *cx, comm_cx_phase ph, double *t) {
    double n = tnow();
    cx->ph[ph] += n - *t;
    *t = n;
}

static const char *const phase_names[COMM_CX_NPHASES] = {
    "encode",         "alltoallv",   "decode_sum",  "reencode",    "allgatherv",
    "decode",         "select",      "allgather",   "scatter_add", "matmul",
    "orthonormalize", "allreduce_p", "allreduce_q", "dense"};

const char *comm_cx_phase_name(comm_cx_phase ph) {
    return (unsigned)ph < COMM_CX_NPHASES ? phase_names[ph] : NULL;
}

void comm_cx_phase_times(const comm_cx *cx, double *secs) {
    memcpy(secs, cx->ph, sizeof cx->ph);
}

void comm_cx_phase_reset(comm_cx *cx) {
    memset(cx->ph, 0, sizeof cx->ph);
}

static size_t chunk_lo(const comm_cx *cx, int j) {
    return cx->clo[cx->cbase + (size_t)j];
}

static int ps_ok(const comm_cx_opts *o, size_t r, size_t c) {
    return (double)r * (double)c >= o->min_ratio * (double)o->rank * (double)(r + c);
}

double comm_cx_model_bytes(const comm_cx *cx, int compressed) {
    double p = cx->size, n = (double)cx->n;
    double dense = 2.0 * (p - 1) / p * 4.0 * n;
    if (!compressed || !cx->compress) return dense;
    switch (cx->o.type) {
    case COMM_CX_TOPK:
        return (p - 1) * 8.0 * (double)cx->k;
    case COMM_CX_POWERSGD: {
        double el = (double)(cx->n - cx->mat_end);
        for (size_t m = 0; m < cx->o.n_mats; m++)
            el += cx->mat_on[m] ? (double)cx->o.rank * (double)(cx->mrows[m] + cx->mcols[m])
                                : (double)cx->mrows[m] * (double)cx->mcols[m];
        return 2.0 * (p - 1) / p * 4.0 * el;
    }
    default:
        if (cx->hier) { /* compressed between nodes on 1/q; inside the node
                         * dense reduce-scatter, compressed all-gather */
            double N = cx->nn, q = cx->nq;
            double e = (double)comm_cx_encoded_bytes(cx->o.type, cx->n, cx->o.block);
            return 2.0 * (N - 1) / N * e / q + (q - 1) / q * (4.0 * n + e);
        }
        return 2.0 * (p - 1) / p * (double)comm_cx_encoded_bytes(cx->o.type, cx->n, cx->o.block);
    }
}

static int fits_int(size_t v) {
    return v <= (size_t)INT_MAX;
}

/* Node layout for the node-aware exchange (collective over cx->comm):
 * sets cx->hier when there are N > 1 nodes of equal size q > 1. */
static int hier_setup(comm_cx *cx, const int *node_of_rank) {
    int err = 0, p = cx->size, nn = 0;
    int *nodes = malloc((size_t)p * sizeof *nodes), *cnt = calloc((size_t)p, sizeof *cnt);
    if (!nodes || !cnt) {
        free(nodes), free(cnt); /* same size everywhere: every rank fails */
        return FAIL(COMM_ERR_NOMEM, "out of memory");
    }
    if (node_of_rank) {
        /* must be identical on all ranks: compare a hash (min == max) */
        unsigned long h[2] = {0, 0};
        for (int i = 0; i < p; i++)
            h[0] = h[0] * 1000003UL + (unsigned long)(unsigned)node_of_rank[i];
        h[1] = ~h[0];
        MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, h, 2, MPI_UNSIGNED_LONG, MPI_MIN, cx->comm));
        if (h[0] != ~h[1]) {
            err = FAIL(COMM_ERR_ARG, "node_of_rank differs between ranks");
            goto done;
        }
        memcpy(nodes, node_of_rank, (size_t)p * sizeof *nodes);
        nn = comm_topo_canonical(nodes, p);
    } else if ((err = comm_topo_groups(cx->comm, COMM_TOPO_SHARED, nodes, &nn))) {
        goto done;
    }
    for (int i = 0; i < p; i++)
        cnt[nodes[i]]++;
    int q = cnt[0], equal = 1;
    for (int k = 1; k < nn; k++)
        equal &= cnt[k] == q;
    if (nn < 2 || q < 2 || !equal) goto done; /* flat */
    MPI_CHECK(MPI_Comm_split(cx->comm, nodes[cx->rank], cx->rank, &cx->node));
    MPI_CHECK(MPI_Comm_set_errhandler(cx->node, MPI_ERRORS_RETURN));
    MPI_CHECK(MPI_Comm_rank(cx->node, &cx->nl));
    MPI_CHECK(MPI_Comm_split(cx->comm, cx->nl, cx->rank, &cx->inter));
    MPI_CHECK(MPI_Comm_set_errhandler(cx->inter, MPI_ERRORS_RETURN));
    MPI_CHECK(MPI_Comm_rank(cx->inter, &cx->ni));
    cx->hier = 1, cx->nq = q, cx->nn = nn;
done:
    free(nodes), free(cnt);
    return err;
}

int comm_cx_create(MPI_Comm comm, const comm_cx_opts *opts, size_t count, comm_cx **out) {
    int err = 0;
    comm_cx *cx = NULL;
    comm_cx_opts d;
    if (!out) return FAIL(COMM_ERR_ARG, "out is NULL");
    *out = NULL;
    if (!opts) comm_cx_opts_default(&d), opts = &d;
    const comm_cx_opts *o = opts;
    if ((unsigned)o->type >= COMM_CX_NTYPES) return FAIL(COMM_ERR_ARG, "unknown type %d", o->type);
    if (o->type == COMM_CX_TOPK && !(o->ratio > 0 && o->ratio <= 1))
        return FAIL(COMM_ERR_ARG, "topk ratio %g not in (0, 1]", o->ratio);
    if (o->type == COMM_CX_TOPK && count > UINT32_MAX)
        return FAIL(COMM_ERR_ARG, "topk needs count < 2^32, got %zu", count);
    if (o->type == COMM_CX_POWERSGD && o->rank < 1)
        return FAIL(COMM_ERR_ARG, "powersgd rank %d < 1", o->rank);
    if (!(o->min_ratio >= 1) || o->block < 1 || o->warmup_steps < 0 ||
        (o->error_feedback != 0 && o->error_feedback != 1) ||
        (o->stochastic != 0 && o->stochastic != 1) || (o->node_aware != 0 && o->node_aware != 1))
        return FAIL(COMM_ERR_ARG,
                    "bad min_ratio %g / block %zu / warmup %d / error_feedback %d / stochastic %d "
                    "/ node_aware %d",
                    o->min_ratio, o->block, o->warmup_steps, o->error_feedback, o->stochastic,
                    o->node_aware);
    size_t mat_end = 0;
    if (o->type == COMM_CX_POWERSGD) {
        if (o->n_mats && (!o->mat_rows || !o->mat_cols))
            return FAIL(COMM_ERR_ARG, "n_mats %zu without shapes", o->n_mats);
        for (size_t m = 0; m < o->n_mats; m++)
            mat_end += o->mat_rows[m] * o->mat_cols[m];
        if (mat_end > count)
            return FAIL(COMM_ERR_ARG, "matrices hold %zu elements, buffer %zu", mat_end, count);
    }

    cx = calloc(1, sizeof *cx);
    if (!cx) return FAIL(COMM_ERR_NOMEM, "out of memory");
    cx->o = *o;
    cx->o.mat_rows = cx->o.mat_cols = NULL;
    cx->n = count;
    cx->comm = cx->node = cx->inter = MPI_COMM_NULL;
    cx->o.node_of_rank = NULL;
    cx->rank = 0, cx->size = 1;
    cx->last_mode = "none";
    if (comm != MPI_COMM_NULL) {
        MPI_CHECK(MPI_Comm_dup(comm, &cx->comm));
        MPI_CHECK(MPI_Comm_set_errhandler(cx->comm, MPI_ERRORS_RETURN));
        MPI_CHECK(MPI_Comm_rank(cx->comm, &cx->rank));
        MPI_CHECK(MPI_Comm_size(cx->comm, &cx->size));
    }
    int p = cx->size;
    size_t n = count;
    cx->res_len = n;
    comm_cx_type t = o->type;

    if (is_coded(t)) {
        cx->compress =
            4.0 * (double)n >= o->min_ratio * (double)comm_cx_encoded_bytes(t, n, o->block) &&
            n > 0;
        size_t B = o->block, nb = (n + B - 1) / B;
        if (p > 1 && o->node_aware && (err = hier_setup(cx, o->node_of_rank))) goto done;
        int pc = cx->hier ? cx->nn : p, mc = cx->hier ? cx->ni : cx->rank;
        int q = cx->hier ? cx->nq : 1;
        size_t ps = (nb + (size_t)q - 1) / (size_t)q, maxc = 0, allb = 0;
        /* flat: one segment, the whole buffer, in p chunks of whole blocks;
         * node-aware: q segments of whole blocks (one per local rank), each
         * in N chunks of whole blocks (one per node); clo holds them all */
        cx->clo = malloc((size_t)q * ((size_t)pc + 1) * sizeof *cx->clo);
        if (!cx->clo || (cx->hier && !(cx->seg = malloc(4 * (size_t)q * sizeof(int))))) goto nomem;
        for (int l = 0; l < q; l++) {
            size_t a = (size_t)l * ps * B, b = a + ps * B;
            a = a < n ? a : n, b = b < n ? b : n;
            size_t sb = (b - a + B - 1) / B, per = (sb + (size_t)pc - 1) / (size_t)pc, eb = 0;
            size_t *c = cx->clo + (size_t)l * ((size_t)pc + 1);
            for (int j = 0; j <= pc; j++) {
                size_t lo = a + (size_t)j * per * B;
                c[j] = lo < b ? lo : b;
                if (j) eb += comm_cx_encoded_bytes(t, c[j] - c[j - 1], B);
            }
            if (per * B > maxc) maxc = per * B;
            if (cx->hier) {
                if (!fits_int(b) || !fits_int(allb + eb)) {
                    err = FAIL(COMM_ERR_ARG, "bucket too large for one message (%zu)", n);
                    goto done;
                }
                /* floats: counts, displacements; encoded bytes: the same */
                cx->seg[l] = (int)(b - a), cx->seg[q + l] = (int)a;
                cx->seg[2 * q + l] = (int)eb, cx->seg[3 * q + l] = (int)allb;
            }
            allb += eb;
        }
        cx->cbase = cx->hier ? (size_t)cx->nl * ((size_t)pc + 1) : 0;
        size_t own = chunk_lo(cx, mc + 1) - chunk_lo(cx, mc);
        if (p > 1) cx->res_len = n + own;
        cx->sbuf_len = comm_cx_encoded_bytes(t, n, B) + (size_t)p * sizeof(float);
        size_t rb1 = (size_t)pc * comm_cx_encoded_bytes(t, maxc, B);
        cx->rbuf_len = rb1 > cx->sbuf_len ? rb1 : cx->sbuf_len;
        if (allb > cx->rbuf_len) cx->rbuf_len = allb;
        if (!(cx->cnt = malloc(4 * (size_t)p * sizeof(int)))) goto nomem;
    } else if (t == COMM_CX_TOPK) {
        cx->k = (size_t)ceil(o->ratio * (double)n);
        if (cx->k > n) cx->k = n;
        cx->compress = n > 0 && (double)n >= o->min_ratio * (double)p * (double)cx->k;
        cx->sbuf_len = cx->k * 8;
        cx->rbuf_len = (size_t)p * cx->k * 8;
        /* candidates of the selection's threshold bucket: more only when many
         * magnitudes share 11 leading bits (then passes over the buffer) */
        cx->cand_cap = 4 * cx->k + 4096;
        cx->hist = malloc(4 * sizeof(uint32_t) << TK_HBITS);
        cx->cand = malloc(2 * cx->cand_cap * sizeof(uint32_t));
        if (!cx->hist || !cx->cand) goto nomem;
    } else if (t == COMM_CX_POWERSGD) {
        size_t r = (size_t)o->rank, nm = o->n_mats;
        cx->mrows = malloc((nm + 1) * sizeof(size_t));
        cx->mcols = malloc((nm + 1) * sizeof(size_t));
        cx->mat_on = calloc(nm + 1, sizeof(int));
        if (!cx->mrows || !cx->mcols || !cx->mat_on) goto nomem;
        size_t plen = 0, qlen = 0, maxc = 1;
        for (size_t m = 0; m < nm; m++) {
            if (o->mat_cols[m] > maxc) maxc = o->mat_cols[m];
            cx->mrows[m] = o->mat_rows[m], cx->mcols[m] = o->mat_cols[m];
            cx->mat_on[m] = ps_ok(o, cx->mrows[m], cx->mcols[m]);
            if (cx->mat_on[m]) {
                cx->compress = 1;
                plen += cx->mrows[m] * r, qlen += cx->mcols[m] * r;
            }
        }
        cx->o.mat_rows = cx->mrows, cx->o.mat_cols = cx->mcols;
        cx->mat_end = mat_end;
        /* P call carries P's + every dense element (unused matrices, tail) */
        size_t dense_el = n - mat_end;
        for (size_t m = 0; m < nm; m++)
            if (!cx->mat_on[m]) dense_el += cx->mrows[m] * cx->mcols[m];
        cx->pq_len = plen + dense_el > qlen ? plen + dense_el : qlen;
        cx->q_len = qlen;
        cx->q = malloc((qlen ? qlen : 1) * sizeof(float));
        cx->qloc = malloc((qlen ? qlen : 1) * sizeof(float));
        cx->pq = malloc((cx->pq_len ? cx->pq_len : 1) * sizeof(float));
        cx->qt = malloc(maxc * r * sizeof(float));
        cx->qd = malloc(maxc * r * sizeof(double));
        if (!cx->q || !cx->qloc || !cx->pq || !cx->qt || !cx->qd) goto nomem;
        /* initial Q: the same normal(0,1) numbers on every rank */
        uint64_t key = comm_cx_stream_key(o->seed, -1, 0, 7);
        for (size_t i = 0; i < qlen; i++) {
            double u1 = unif(key, 2 * i), u2 = unif(key, 2 * i + 1);
            cx->q[i] = (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
        }
    }
    cx->res = calloc(cx->res_len ? cx->res_len : 1, sizeof(float));
    cx->work = malloc((n ? n : 1) * sizeof(float));
    cx->sbuf = malloc(cx->sbuf_len ? cx->sbuf_len : 1);
    cx->rbuf = malloc(cx->rbuf_len ? cx->rbuf_len : 1);
    if (!cx->res || !cx->work || !cx->sbuf || !cx->rbuf) goto nomem;
    *out = cx;
    return 0;
nomem:
    err = FAIL(COMM_ERR_NOMEM, "out of memory (count %zu)", count);
done:
    comm_cx_destroy(cx);
    return err;
}

void comm_cx_destroy(comm_cx *cx) {
    if (!cx) return;
    if (cx->comm != MPI_COMM_NULL) MPI_Comm_free(&cx->comm);
    if (cx->node != MPI_COMM_NULL) MPI_Comm_free(&cx->node);
    if (cx->inter != MPI_COMM_NULL) MPI_Comm_free(&cx->inter);
    free(cx->seg);
    free(cx->mrows), free(cx->mcols), free(cx->mat_on), free(cx->clo);
    free(cx->res), free(cx->work), free(cx->sbuf), free(cx->rbuf);
    free(cx->q), free(cx->qloc), free(cx->pq);
    free(cx->cnt), free(cx->hist), free(cx->cand), free(cx->qt), free(cx->qd);
    free(cx);
}

void comm_cx_set_dense(comm_cx *cx, comm_ar *ar, comm_ar_fn fn) {
    cx->ar = fn ? ar : NULL;
    cx->fn = ar ? fn : NULL;
}

int comm_cx_compresses(const comm_cx *cx) {
    return cx->compress;
}
const char *comm_cx_last_mode(const comm_cx *cx) {
    return cx->last_mode;
}
uint64_t comm_cx_total_bytes(const comm_cx *cx) {
    return cx->total;
}
uint64_t comm_cx_node_bytes(const comm_cx *cx) {
    return cx->node_total;
}
int comm_cx_node_aware(const comm_cx *cx) {
    return cx->hier;
}

float *comm_cx_residual(comm_cx *cx, size_t *len) {
    *len = cx->res_len;
    return cx->res;
}

float *comm_cx_state(comm_cx *cx, size_t *len) {
    *len = cx->q_len;
    return cx->q_len ? cx->q : NULL;
}

/* ---- exchange helpers --------------------------------------------------- */

/* Dense all-reduce of buf (n floats): the user's comm_ar, or MPI_Reduce to
 * rank 0 + MPI_Bcast (one rank computes every value: bitwise identical). */
static int dense_ar(comm_cx *cx, float *buf, size_t n, comm_op op, uint64_t *bytes) {
    int err = 0, p = cx->size;
    if (p == 1 || n == 0) return 0;
    if (cx->ar) {
        uint64_t b0 = comm_ar_bytes_sent(cx->ar);
        err = cx->fn(cx->ar, buf, n, op);
        *bytes += comm_ar_bytes_sent(cx->ar) - b0;
        return err;
    }
    for (size_t off = 0; off < n; off += (size_t)INT_MAX) {
        int c = (int)(n - off < (size_t)INT_MAX ? n - off : (size_t)INT_MAX);
        if (cx->rank == 0)
            MPI_CHECK(MPI_Reduce(MPI_IN_PLACE, buf + off, c, MPI_FLOAT, MPI_SUM, 0, cx->comm));
        else
            MPI_CHECK(MPI_Reduce(buf + off, NULL, c, MPI_FLOAT, MPI_SUM, 0, cx->comm));
        if (cx->rank == 0 && op == COMM_AVG)
            for (int i = 0; i < c; i++)
                buf[off + (size_t)i] /= (float)p;
        MPI_CHECK(MPI_Bcast(buf + off, c, MPI_FLOAT, 0, cx->comm));
    }
    *bytes += (uint64_t)(2.0 * (p - 1) / p * (double)n * sizeof(float));
done:
    return err;
}

/* Quantizer / cast exchange: compressed reduce-scatter + all-gather. One
 * pass per stage over the buffer: the error-feedback sum, the encoding and
 * the new residual are fused, and so are decoding and summing. Node-aware
 * (cx->hier): the node's dense sum of the own segment first (into work),
 * the compressed exchange of that segment among the ranks of the same local
 * rank (chunks clo[] inside the segment), the encoded segments all-gathered
 * inside the node and decoded last. */
static int coded_ar(comm_cx *cx, float *g, int step, comm_op op, uint64_t *bytes) {
    int err = 0, hier = cx->hier;
    int p = hier ? cx->nn : cx->size, me = hier ? cx->ni : cx->rank;
    MPI_Comm comm = hier ? cx->inter : cx->comm;
    comm_cx_type t = cx->o.type;
    size_t B = cx->o.block, n = cx->n;
    size_t lo0 = chunk_lo(cx, 0), hi0 = chunk_lo(cx, p);
    int ef = cx->o.error_feedback, sr = cx->o.stochastic;
    int *sc = cx->cnt, *sd = sc + p, *rc = sd + p, *rd = rc + p;
    float *acc = cx->work;
    double tl = tnow();
    const float *src = g;
    if (hier) {
        /* node sum of every segment, segment nl into work[seg] */
        MPI_CHECK(MPI_Reduce_scatter(g, acc + lo0, cx->seg, MPI_FLOAT, MPI_SUM, cx->node));
        /* ring-equivalent: every segment but the own one leaves this rank */
        uint64_t nb = (uint64_t)(n - (hi0 - lo0)) * sizeof(float);
        *bytes += nb, cx->node_total += nb;
        src = acc;
        lap(cx, COMM_CX_PH_DENSE, &tl);
    }
    /* x = g + residual; the residual becomes x - decoded(x) in the encoder */
    const float *x = src;
    if (ef) {
        for (size_t i = lo0; i < hi0; i++)
            acc[i] = src[i] + cx->res[i];
        x = acc;
    }

    /* stage 1: encode every chunk (random streams keyed by the global rank) */
    uint64_t key1 = comm_cx_stream_key(cx->o.seed, step, cx->rank, 1);
    if (p == 1) {
        encode_res(t, x, n, B, key1, 0, sr, cx->sbuf, g, ef ? cx->res : NULL);
        lap(cx, COMM_CX_PH_ENCODE, &tl);
        return 0;
    }
    size_t off = 0;
    size_t own_lo = chunk_lo(cx, me), own = chunk_lo(cx, me + 1) - own_lo;
    size_t own_b = comm_cx_encoded_bytes(t, own, B);
    for (int j = 0; j < p; j++) {
        size_t lo = chunk_lo(cx, j), len = chunk_lo(cx, j + 1) - lo;
        size_t nbytes = comm_cx_encoded_bytes(t, len, B);
        if (!fits_int(off) || !fits_int(nbytes) || !fits_int((size_t)p * own_b)) {
            err = FAIL(COMM_ERR_ARG, "compressed bucket too large for one message (%zu B)", off);
            goto done;
        }
        encode_res(t, x + lo, len, B, key1, lo, sr, cx->sbuf + off, NULL, ef ? cx->res + lo : NULL);
        sc[j] = (int)nbytes, sd[j] = (int)off;
        rc[j] = (int)own_b, rd[j] = (int)((size_t)j * own_b);
        if (j != me) *bytes += nbytes;
        off += nbytes;
    }
    lap(cx, COMM_CX_PH_ENCODE, &tl);
    MPI_CHECK(MPI_Alltoallv(cx->sbuf, sc, sd, MPI_BYTE, cx->rbuf, rc, rd, MPI_BYTE, comm));
    lap(cx, COMM_CX_PH_ALLTOALLV, &tl);

    /* owner: decode the p messages in rank order, summing as it goes */
    float *sum = acc + own_lo; /* x is no longer needed */
    for (int r = 0; r < p; r++)
        decode_add(t, cx->rbuf + (size_t)r * own_b, own, B, sum, r > 0);
    float *sres = cx->res + n;
    if (op == COMM_AVG)
        for (size_t i = 0; i < own; i++)
            sum[i] /= (float)cx->size;
    if (ef)
        for (size_t i = 0; i < own; i++)
            sum[i] += sres[i];
    lap(cx, COMM_CX_PH_DECODE_SUM, &tl);
    /* stage 2: encode the reduced chunk, gather all chunks. With error
     * feedback it rounds to nearest: its residual then stays within
     * absmax/(2L-1) (stochastic rounding of one broadcast message gains
     * nothing from averaging, and its residual wandered ~10x larger for
     * int2); without error feedback it stays unbiased */
    uint64_t key2 = comm_cx_stream_key(cx->o.seed, step, cx->rank, 2);
    encode_res(t, sum, own, B, key2, own_lo, ef ? 0 : sr, cx->sbuf, NULL, ef ? sres : NULL);
    off = 0;
    for (int j = 0; j < p; j++) {
        size_t len = chunk_lo(cx, j + 1) - chunk_lo(cx, j);
        rc[j] = (int)comm_cx_encoded_bytes(t, len, B), rd[j] = (int)off;
        off += (size_t)rc[j];
    }
    /* ring-equivalent: a ring all-gather sends every block but the next rank's */
    *bytes += off - (size_t)rc[(me + 1) % p];
    lap(cx, COMM_CX_PH_REENCODE, &tl);
    MPI_CHECK(MPI_Allgatherv(cx->sbuf, (int)own_b, MPI_BYTE, cx->rbuf, rc, rd, MPI_BYTE, comm));
    lap(cx, COMM_CX_PH_ALLGATHERV, &tl);
    if (!hier) {
        for (int j = 0; j < p; j++) {
            size_t lo = chunk_lo(cx, j), len = chunk_lo(cx, j + 1) - lo;
            decode_add(t, cx->rbuf + rd[j], len, B, g + lo, 0);
        }
        lap(cx, COMM_CX_PH_DECODE, &tl);
        return 0;
    }
    /* node-aware: the encoded segments (the same bytes on every node) to all
     * local ranks, which all decode the whole buffer from them */
    int q = cx->nq, *sbc = cx->seg + 2 * q, *sbd = sbc + q;
    memmove(cx->rbuf + sbd[cx->nl], cx->rbuf, (size_t)sbc[cx->nl]);
    MPI_CHECK(MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_BYTE, cx->rbuf, sbc, sbd, MPI_BYTE, cx->node));
    /* ring-equivalent, as above */
    uint64_t nb = (uint64_t)(sbd[q - 1] + sbc[q - 1] - sbc[(cx->nl + 1) % q]);
    *bytes += nb, cx->node_total += nb;
    lap(cx, COMM_CX_PH_DENSE, &tl);
    for (int l = 0; l < q; l++) {
        const size_t *c = cx->clo + (size_t)l * ((size_t)p + 1);
        size_t boff = (size_t)sbd[l];
        for (int j = 0; j < p; j++) {
            size_t len = c[j + 1] - c[j];
            decode_add(t, cx->rbuf + boff, len, B, g + c[j], 0);
            boff += comm_cx_encoded_bytes(t, len, B);
        }
    }
    lap(cx, COMM_CX_PH_DECODE, &tl);
done:
    return err;
}

/* Top-k: the error-feedback sum is accumulated in the residual buffer itself
 * (which keeps everything not sent) in the same pass as the histogram of the
 * selection. */
static int topk_ar(comm_cx *cx, float *g, comm_op op, uint64_t *bytes) {
    int err = 0, p = cx->size;
    size_t n = cx->n, k = cx->k;
    int ef = cx->o.error_feedback;
    double tl = tnow();
    float *acc = ef ? cx->res : g;
    tk_hist(g, ef ? acc : NULL, n, cx->hist);
    const uint32_t *h = cx->hist;
    uint32_t *idx = (uint32_t *)(void *)cx->sbuf;
    float *val = (float *)(void *)(cx->sbuf + 4 * k);
    if ((err = tk_select(acc, n, k, h, idx, &cx->cand, &cx->cand_cap)))
        return FAIL(err, "top-k selection failed");
    for (size_t j = 0; j < k; j++)
        val[j] = acc[idx[j]];
    if (ef)
        for (size_t j = 0; j < k; j++)
            acc[idx[j]] = 0;
    lap(cx, COMM_CX_PH_SELECT, &tl);
    if (p > 1) {
        if (!fits_int(8 * k) || !fits_int(8 * k * (size_t)p)) {
            return FAIL(COMM_ERR_ARG, "top-k message too large (k = %zu)", k);
        }
        MPI_CHECK(MPI_Allgather(cx->sbuf, (int)(8 * k), MPI_BYTE, cx->rbuf, (int)(8 * k), MPI_BYTE,
                                cx->comm));
        *bytes += (uint64_t)(p - 1) * 8 * k;
    } else {
        memcpy(cx->rbuf, cx->sbuf, 8 * k);
    }
    lap(cx, COMM_CX_PH_ALLGATHER, &tl);
    memset(g, 0, n * sizeof *g);
    for (int r = 0; r < p; r++) {
        const unsigned char *m = cx->rbuf + (size_t)r * 8 * k;
        for (size_t j = 0; j < k; j++) {
            uint32_t i;
            float v;
            memcpy(&i, m + 4 * j, 4);
            memcpy(&v, m + 4 * k + 4 * j, 4);
            g[i] += v;
        }
    }
    if (op == COMM_AVG && p > 1)
        for (size_t i = 0; i < n; i++)
            g[i] /= (float)p;
    lap(cx, COMM_CX_PH_SCATTER_ADD, &tl);
done:
    return err;
}

/* Modified Gram-Schmidt on the r columns of P (rows x r, row-major).
 * Columns that vanish (norm <= 1e-30 or <= 1e-6 of their norm before
 * projection) become zero. Same code and inputs on every rank. */
static void orthonormalize(float *P, size_t rows, size_t r) {
    for (size_t c = 0; c < r; c++) {
        double n0 = 0;
        for (size_t i = 0; i < rows; i++)
            n0 += (double)P[i * r + c] * P[i * r + c];
        for (size_t d = 0; d < c; d++) {
            double dot = 0;
            for (size_t i = 0; i < rows; i++)
                dot += (double)P[i * r + c] * P[i * r + d];
            for (size_t i = 0; i < rows; i++)
                P[i * r + c] -= (float)(dot * P[i * r + d]);
        }
        double nn = 0;
        for (size_t i = 0; i < rows; i++)
            nn += (double)P[i * r + c] * P[i * r + c];
        double inv = (nn > 1e-60 && nn > 1e-12 * n0) ? 1.0 / sqrt(nn) : 0.0;
        for (size_t i = 0; i < rows; i++)
            P[i * r + c] = (float)(P[i * r + c] * inv);
    }
}

/* sum a[j] b[j] in double, 8 independent lanes (vectorizes without
 * reassociation), lanes summed in a fixed order: the same on every rank */
static double dot_d(const float *a, const float *b, size_t n) {
    double acc[8] = {0};
    size_t j = 0;
    for (; j + 8 <= n; j += 8)
        for (int l = 0; l < 8; l++)
            acc[l] += (double)a[j + l] * (double)b[j + l];
    for (int l = 0; j < n; j++, l++)
        acc[l] += (double)a[j] * (double)b[j];
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

/* out = g + res (res NULL: a copy of g) */
static void ef_sum(const float *g, const float *res, float *out, size_t n) {
    if (!res) {
        memcpy(out, g, n * sizeof *out);
        return;
    }
    for (size_t i = 0; i < n; i++)
        out[i] = g[i] + res[i];
}

/* (C x r) <-> (r x C) */
static void transpose(const float *in, size_t rows, size_t cols, float *out) {
    for (size_t i = 0; i < rows; i++)
        for (size_t j = 0; j < cols; j++)
            out[j * rows + i] = in[i * cols + j];
}

/* out (R x C) = P (R x r) Qt (r x C), each element summed over c in order;
 * with res: res = M - out instead (out not written) */
static void ps_outer(const float *P, const float *Qt, size_t R, size_t C, size_t r, const float *M,
                     float *out, float *res) {
    for (size_t i = 0; i < R; i++) {
        float *o = res ? res + i * C : out + i * C;
        const float *pi = P + i * r;
        for (size_t j = 0; j < C; j++)
            o[j] = pi[0] * Qt[j];
        for (size_t c = 1; c < r; c++) {
            const float *q = Qt + c * C;
            for (size_t j = 0; j < C; j++)
                o[j] += pi[c] * q[j];
        }
        if (res) {
            const float *m = M + i * C;
            for (size_t j = 0; j < C; j++)
                o[j] = m[j] - o[j];
        }
    }
}

/* PowerSGD: P = M Q, all-reduce [P's, dense elements], orthonormalize,
 * Q = M^T P, all-reduce Q's, result P Q^T; residual M - P P^T M. Products
 * accumulate in double in vectorizable loops (Q transposed to r x C). */
static int powersgd_ar(comm_cx *cx, float *g, int step, comm_op op, uint64_t *bytes) {
    int err = 0;
    size_t n = cx->n, r = (size_t)cx->o.rank, nm = cx->o.n_mats;
    int ef = cx->o.error_feedback;
    float *acc = cx->work, *qt = cx->qt;
    double *qd = cx->qd;
    double tl = tnow();
    /* P's, then dense elements; M = g + residual is formed row by row in
     * the same pass (a separate pass over the bucket cost as much as the
     * product) */
    size_t po = 0, mo = 0, qo = 0;
    for (size_t m = 0; m < nm; m++) {
        size_t R = cx->mrows[m], C = cx->mcols[m];
        if (cx->mat_on[m]) {
            float *P = cx->pq + po;
            transpose(cx->q + qo, C, r, qt);
            for (size_t i = 0; i < R; i++) {
                size_t o = mo + i * C;
                ef_sum(g + o, ef ? cx->res + o : NULL, acc + o, C);
                for (size_t c = 0; c < r; c++)
                    P[i * r + c] = (float)dot_d(acc + o, qt + c * C, C);
            }
            po += R * r, qo += C * r;
        } else {
            ef_sum(g + mo, ef ? cx->res + mo : NULL, acc + mo, R * C);
        }
        mo += R * C;
    }
    ef_sum(g + cx->mat_end, ef ? cx->res + cx->mat_end : NULL, acc + cx->mat_end, n - cx->mat_end);
    size_t pend = po;
    mo = 0;
    for (size_t m = 0; m < nm; m++) {
        size_t RC = cx->mrows[m] * cx->mcols[m];
        if (!cx->mat_on[m]) memcpy(cx->pq + po, acc + mo, RC * sizeof(float)), po += RC;
        mo += RC;
    }
    memcpy(cx->pq + po, acc + cx->mat_end, (n - cx->mat_end) * sizeof(float));
    po += n - cx->mat_end;
    lap(cx, COMM_CX_PH_MATMUL, &tl);
    if ((err = dense_ar(cx, cx->pq, po, op, bytes))) return err;
    lap(cx, COMM_CX_PH_ALLREDUCE_P, &tl);
    /* dense parts are final: copy out, their residual is flushed */
    po = pend, mo = 0;
    for (size_t m = 0; m < nm; m++) {
        size_t RC = cx->mrows[m] * cx->mcols[m];
        if (!cx->mat_on[m]) {
            memcpy(g + mo, cx->pq + po, RC * sizeof(float)), po += RC;
            if (ef) memset(cx->res + mo, 0, RC * sizeof(float));
        }
        mo += RC;
    }
    memcpy(g + cx->mat_end, cx->pq + po, (n - cx->mat_end) * sizeof(float));
    if (ef) memset(cx->res + cx->mat_end, 0, (n - cx->mat_end) * sizeof(float));
    /* orthonormalize P's; Q_local = M^T P (row by row: axpy into r x C
     * double accumulators) */
    po = mo = qo = 0;
    for (size_t m = 0; m < nm; m++) {
        size_t R = cx->mrows[m], C = cx->mcols[m];
        if (cx->mat_on[m]) {
            float *P = cx->pq + po, *Ql = cx->qloc + qo;
            const float *M = acc + mo;
            lap(cx, COMM_CX_PH_MATMUL, &tl);
            orthonormalize(P, R, r);
            lap(cx, COMM_CX_PH_ORTHO, &tl);
            memset(qd, 0, r * C * sizeof *qd);
            for (size_t i = 0; i < R; i++)
                for (size_t c = 0; c < r; c++) {
                    double pc = P[i * r + c];
                    double *qc = qd + c * C;
                    const float *mi = M + i * C;
                    for (size_t j = 0; j < C; j++)
                        qc[j] += pc * (double)mi[j];
                }
            for (size_t c = 0; c < r; c++)
                for (size_t j = 0; j < C; j++) {
                    qt[c * C + j] = (float)qd[c * C + j];
                    Ql[j * r + c] = qt[c * C + j];
                }
            /* residual M - P Ql^T (local projection) */
            if (ef) ps_outer(P, qt, R, C, r, M, NULL, cx->res + mo);
            po += R * r, qo += C * r;
        }
        mo += R * C;
    }
    /* P's must survive the Q all-reduce: move them into acc (free now) */
    memcpy(acc, cx->pq, pend * sizeof(float));
    memcpy(cx->q, cx->qloc, qo * sizeof(float));
    lap(cx, COMM_CX_PH_MATMUL, &tl);
    if ((err = dense_ar(cx, cx->q, qo, op, bytes))) return err;
    lap(cx, COMM_CX_PH_ALLREDUCE_Q, &tl);
    po = mo = qo = 0;
    for (size_t m = 0; m < nm; m++) {
        size_t R = cx->mrows[m], C = cx->mcols[m];
        if (cx->mat_on[m]) {
            const float *P = acc + po;
            float *Q = cx->q + qo;
            transpose(Q, C, r, qt);
            ps_outer(P, qt, R, C, r, NULL, g + mo, NULL);
            /* a vanished column of Q (identical on all ranks) restarts random */
            for (size_t c = 0; c < r; c++) {
                int zero = 1;
                for (size_t j = 0; j < C && zero; j++)
                    zero = Q[j * r + c] == 0;
                if (!zero) continue;
                uint64_t key = comm_cx_stream_key(cx->o.seed, step, (int)m, 8 + (int)c);
                for (size_t j = 0; j < C; j++)
                    Q[j * r + c] = (float)(unif(key, j) - 0.5);
            }
            po += R * r, qo += C * r;
        }
        mo += R * C;
    }
    lap(cx, COMM_CX_PH_MATMUL, &tl);
    return 0;
}

int comm_cx_allreduce(comm_cx *cx, float *grad, size_t n, int step, comm_op op,
                      uint64_t *bytes_sent) {
    uint64_t bytes = 0;
    int err = 0;
    if (!cx) return FAIL(COMM_ERR_ARG, "cx is NULL");
    if (n != cx->n) return FAIL(COMM_ERR_ARG, "count %zu, context made for %zu", n, cx->n);
    if (n && !grad) return FAIL(COMM_ERR_ARG, "grad is NULL");
    if (op != COMM_SUM && op != COMM_AVG) return FAIL(COMM_ERR_ARG, "bad op %d", (int)op);
    if (!cx->compress || step < cx->o.warmup_steps) {
        double tl = tnow();
        if (cx->o.error_feedback)
            for (size_t i = 0; i < n; i++)
                grad[i] += cx->res[i], cx->res[i] = 0;
        err = dense_ar(cx, grad, n, op, &bytes);
        lap(cx, COMM_CX_PH_DENSE, &tl);
        cx->last_mode = "dense";
    } else {
        switch (cx->o.type) {
        case COMM_CX_TOPK:
            err = topk_ar(cx, grad, op, &bytes);
            break;
        case COMM_CX_POWERSGD:
            err = powersgd_ar(cx, grad, step, op, &bytes);
            break;
        default:
            err = coded_ar(cx, grad, step, op, &bytes);
            break;
        }
        cx->last_mode = type_names[cx->o.type];
    }
    cx->total += bytes;
    if (bytes_sent) *bytes_sent = bytes;
    return err;
}
