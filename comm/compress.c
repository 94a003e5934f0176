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

#include "kernels/quant.h"

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

/* uniform in (0, 1): (j + 0.5) / 2^24, j 24 random bits; mean exactly 1/2 */
static inline double unif(uint64_t key, size_t i) {
    uint64_t z = mix64(key + (uint64_t)i * 0x9e3779b97f4a7c15ULL);
    return ((double)(z >> 40) + 0.5) * (1.0 / 16777216.0);
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

static inline uint16_t to_fp16_sat(float x) {
    if (x > 65504.f) x = 65504.f;
    if (x < -65504.f) x = -65504.f;
    return quant_fp32_to_fp16(x);
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

int comm_cx_encode_round(comm_cx_type t, const float *x, size_t n, size_t block, uint64_t key,
                         size_t gidx0, int stochastic, void *out, float *dec) {
    unsigned char *o = out;
    if (t == COMM_CX_FP16 || t == COMM_CX_BF16) {
        for (size_t i = 0; i < n; i++) {
            uint16_t h = t == COMM_CX_FP16 ? to_fp16_sat(x[i]) : comm_cx_fp32_to_bf16(x[i]);
            memcpy(o + 2 * i, &h, 2);
            if (dec) dec[i] = t == COMM_CX_FP16 ? quant_fp16_to_fp32(h) : comm_cx_bf16_to_fp32(h);
        }
        return 0;
    }
    int bits = qbits(t);
    if (!bits || !block) return COMM_ERR_ARG;
    const int L = (1 << (bits - 1)) - 1; /* 127, 7, 1 */
    const int per = 8 / bits;            /* codes per byte */
    size_t nb = (n + block - 1) / block;
    unsigned char *codes = o + nb * sizeof(float);
    memset(codes, 0, (n * (size_t)bits + 7) / 8);
    for (size_t b = 0; b < nb; b++) {
        size_t lo = b * block, hi = lo + block < n ? lo + block : n;
        float amax = 0;
        int finite = 1;
        for (size_t i = lo; i < hi; i++) {
            float a = fabsf(x[i]);
            if (!isfinite(a)) finite = 0;
            if (a > amax) amax = a;
        }
        float s = finite ? amax / (float)L : NAN;
        memcpy(o + b * sizeof(float), &s, sizeof s);
        for (size_t i = lo; i < hi; i++) {
            int q = 0;
            if (finite && s > 0) {
                double u = stochastic ? unif(key, gidx0 + i) : 0.5;
                double v = floor((double)x[i] / (double)s + u);
                q = v > L ? L : v < -L ? -L : (int)v;
            }
            unsigned c = (unsigned)(q + L) & ((1u << bits) - 1u);
            if (bits == 8) c = (unsigned)(uint8_t)(int8_t)q;
            codes[i / per] |= (unsigned char)(c << ((i % per) * bits));
            if (dec) dec[i] = finite ? (float)q * s : NAN;
        }
    }
    return 0;
}

int comm_cx_decode(comm_cx_type t, const void *in, size_t n, size_t block, float *out) {
    const unsigned char *p = in;
    if (t == COMM_CX_FP16 || t == COMM_CX_BF16) {
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, p + 2 * i, 2);
            out[i] = t == COMM_CX_FP16 ? quant_fp16_to_fp32(h) : comm_cx_bf16_to_fp32(h);
        }
        return 0;
    }
    int bits = qbits(t);
    if (!bits || !block) return COMM_ERR_ARG;
    const int L = (1 << (bits - 1)) - 1;
    const int per = 8 / bits;
    size_t nb = (n + block - 1) / block;
    const unsigned char *codes = p + nb * sizeof(float);
    for (size_t b = 0; b < nb; b++) {
        float s;
        memcpy(&s, p + b * sizeof(float), sizeof s);
        size_t lo = b * block, hi = lo + block < n ? lo + block : n;
        for (size_t i = lo; i < hi; i++) {
            unsigned c = (codes[i / per] >> ((i % per) * bits)) & ((1u << bits) - 1u);
            int q = bits == 8 ? (int)(int8_t)(uint8_t)c : (int)c - L;
            out[i] = isfinite(s) ? (float)q * s : NAN;
        }
    }
    return 0;
}

/* ---- top-k ------------------------------------------------------------ */

static inline uint32_t absbits(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    return b & 0x7fffffffu; /* monotone in |f| for non-negative floats; NaN above inf */
}

/* Radix select on the 31-bit magnitude keys (4 passes of 8 bits), then one
 * scan in index order: O(n), deterministic, ties to the lower index. */
int comm_cx_topk_select(const float *x, size_t n, size_t k, uint32_t *idx) {
    if (k > n || n > UINT32_MAX) return COMM_ERR_ARG;
    if (k == 0) return 0;
    uint32_t prefix = 0;
    size_t rem = k;
    for (int shift = 24; shift >= 0; shift -= 8) {
        size_t h[256] = {0};
        uint32_t mask = shift == 24 ? 0 : ~0u << (shift + 8);
        for (size_t i = 0; i < n; i++) {
            uint32_t v = absbits(x[i]);
            if ((v & mask) == prefix) h[(v >> shift) & 255u]++;
        }
        for (int b = 255; b >= 0; b--) {
            if (h[b] >= rem) {
                prefix |= (uint32_t)b << shift;
                break;
            }
            rem -= h[b];
        }
    }
    size_t j = 0;
    for (size_t i = 0; i < n && j < k; i++) {
        uint32_t v = absbits(x[i]);
        if (v > prefix || (v == prefix && rem > 0)) {
            if (v == prefix) rem--;
            idx[j++] = (uint32_t)i;
        }
    }
    return j == k ? 0 : COMM_ERR_ARG;
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
};

static size_t chunk_lo(const comm_cx *cx, int j) {
    return cx->clo[j];
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
        return 2.0 * (p - 1) / p * (double)comm_cx_encoded_bytes(cx->o.type, cx->n, cx->o.block);
    }
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
        (o->stochastic != 0 && o->stochastic != 1))
        return FAIL(COMM_ERR_ARG, "bad min_ratio %g / block %zu / warmup %d / error_feedback %d",
                    o->min_ratio, o->block, o->warmup_steps, o->error_feedback);
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
    cx->comm = MPI_COMM_NULL;
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
        size_t B = o->block, nb = (n + B - 1) / B, per = (nb + (size_t)p - 1) / (size_t)p;
        cx->clo = malloc(((size_t)p + 1) * sizeof *cx->clo);
        if (!cx->clo) goto nomem;
        for (int j = 0; j <= p; j++) {
            size_t lo = (size_t)j * per * B;
            cx->clo[j] = lo < n ? lo : n;
        }
        size_t own = cx->clo[cx->rank + 1] - cx->clo[cx->rank];
        if (p > 1) cx->res_len = n + own;
        cx->sbuf_len = comm_cx_encoded_bytes(t, n, B) + (size_t)p * sizeof(float);
        size_t maxc = per * B;
        size_t rb1 = (size_t)p * comm_cx_encoded_bytes(t, maxc, B);
        cx->rbuf_len = rb1 > cx->sbuf_len ? rb1 : cx->sbuf_len;
    } else if (t == COMM_CX_TOPK) {
        cx->k = (size_t)ceil(o->ratio * (double)n);
        if (cx->k > n) cx->k = n;
        cx->compress = n > 0 && (double)n >= o->min_ratio * (double)p * (double)cx->k;
        cx->sbuf_len = cx->k * 8;
        cx->rbuf_len = (size_t)p * cx->k * 8;
    } else if (t == COMM_CX_POWERSGD) {
        size_t r = (size_t)o->rank, nm = o->n_mats;
        cx->mrows = malloc((nm + 1) * sizeof(size_t));
        cx->mcols = malloc((nm + 1) * sizeof(size_t));
        cx->mat_on = calloc(nm + 1, sizeof(int));
        if (!cx->mrows || !cx->mcols || !cx->mat_on) goto nomem;
        size_t plen = 0, qlen = 0;
        for (size_t m = 0; m < nm; m++) {
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
        if (!cx->q || !cx->qloc || !cx->pq) goto nomem;
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
    free(cx->mrows), free(cx->mcols), free(cx->mat_on), free(cx->clo);
    free(cx->res), free(cx->work), free(cx->sbuf), free(cx->rbuf);
    free(cx->q), free(cx->qloc), free(cx->pq);
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

static int fits_int(size_t v) {
    return v <= (size_t)INT_MAX;
}

/* Quantizer / cast exchange: compressed reduce-scatter + all-gather. */
static int coded_ar(comm_cx *cx, float *g, int step, comm_op op, uint64_t *bytes) {
    int err = 0, p = cx->size, me = cx->rank;
    comm_cx_type t = cx->o.type;
    size_t B = cx->o.block, n = cx->n;
    int ef = cx->o.error_feedback;
    int *sc = NULL, *sd = NULL, *rc = NULL, *rd = NULL;
    float *acc = cx->work;
    for (size_t i = 0; i < n; i++)
        acc[i] = ef ? g[i] + cx->res[i] : g[i];

    /* stage 1: encode every chunk (acc -> decoded into acc) */
    uint64_t key1 = comm_cx_stream_key(cx->o.seed, step, me, 1);
    if (p == 1) {
        comm_cx_encode_round(t, acc, n, B, key1, 0, cx->o.stochastic, cx->sbuf, acc);
        if (ef)
            for (size_t i = 0; i < n; i++)
                cx->res[i] = (g[i] + cx->res[i]) - acc[i];
        memcpy(g, acc, n * sizeof *g);
        return 0;
    }
    sc = malloc(4 * (size_t)p * sizeof(int));
    if (!sc) return FAIL(COMM_ERR_NOMEM, "out of memory");
    sd = sc + p, rc = sd + p, rd = rc + p;
    size_t off = 0;
    size_t own_lo = chunk_lo(cx, me), own = chunk_lo(cx, me + 1) - own_lo;
    size_t own_b = comm_cx_encoded_bytes(t, own, B);
    for (int j = 0; j < p; j++) {
        size_t lo = chunk_lo(cx, j), len = chunk_lo(cx, j + 1) - lo;
        size_t nbytes = comm_cx_encoded_bytes(t, len, B);
        comm_cx_encode_round(t, acc + lo, len, B, key1, lo, cx->o.stochastic, cx->sbuf + off,
                             acc + lo);
        if (!fits_int(off) || !fits_int(nbytes) || !fits_int((size_t)p * own_b)) {
            err = FAIL(COMM_ERR_ARG, "compressed bucket too large for one message (%zu B)", off);
            goto done;
        }
        sc[j] = (int)nbytes, sd[j] = (int)off;
        rc[j] = (int)own_b, rd[j] = (int)((size_t)j * own_b);
        if (j != me) *bytes += nbytes;
        off += nbytes;
    }
    if (ef)
        for (size_t i = 0; i < n; i++)
            cx->res[i] = (g[i] + cx->res[i]) - acc[i];
    MPI_CHECK(MPI_Alltoallv(cx->sbuf, sc, sd, MPI_BYTE, cx->rbuf, rc, rd, MPI_BYTE, cx->comm));

    /* owner: decode the p messages in rank order and sum into acc's chunk */
    float *sum = acc + own_lo;
    float *tmp = g + own_lo; /* g's own chunk is free now: overwritten below */
    for (int r = 0; r < p; r++) {
        comm_cx_decode(t, cx->rbuf + (size_t)r * own_b, own, B, r == 0 ? sum : tmp);
        if (r)
            for (size_t i = 0; i < own; i++)
                sum[i] += tmp[i];
    }
    float *sres = cx->res + n;
    for (size_t i = 0; i < own; i++) {
        if (op == COMM_AVG) sum[i] /= (float)p;
        if (ef) sum[i] += sres[i];
    }
    /* stage 2: encode the reduced chunk, gather all chunks */
    uint64_t key2 = comm_cx_stream_key(cx->o.seed, step, me, 2);
    /* with error feedback stage 2 rounds to nearest: its residual then stays
     * within absmax/(2L-1) (stochastic rounding of one broadcast message
     * gains nothing from averaging, and its residual wandered ~10x larger
     * for int2); without error feedback it stays unbiased */
    comm_cx_encode_round(t, sum, own, B, key2, own_lo, ef ? 0 : cx->o.stochastic, cx->sbuf,
                         ef ? tmp : NULL);
    if (ef)
        for (size_t i = 0; i < own; i++)
            sres[i] = sum[i] - tmp[i];
    off = 0;
    for (int j = 0; j < p; j++) {
        size_t len = chunk_lo(cx, j + 1) - chunk_lo(cx, j);
        rc[j] = (int)comm_cx_encoded_bytes(t, len, B), rd[j] = (int)off;
        off += (size_t)rc[j];
    }
    /* ring-equivalent: a ring all-gather sends every block but the next rank's */
    *bytes += off - (size_t)rc[(me + 1) % p];
    MPI_CHECK(MPI_Allgatherv(cx->sbuf, (int)own_b, MPI_BYTE, cx->rbuf, rc, rd, MPI_BYTE, cx->comm));
    for (int j = 0; j < p; j++) {
        size_t lo = chunk_lo(cx, j), len = chunk_lo(cx, j + 1) - lo;
        comm_cx_decode(t, cx->rbuf + rd[j], len, B, g + lo);
    }
done:
    free(sc);
    return err;
}

static int topk_ar(comm_cx *cx, float *g, comm_op op, uint64_t *bytes) {
    int err = 0, p = cx->size;
    size_t n = cx->n, k = cx->k;
    float *acc = cx->work;
    int ef = cx->o.error_feedback;
    for (size_t i = 0; i < n; i++)
        acc[i] = ef ? g[i] + cx->res[i] : g[i];
    uint32_t *idx = (uint32_t *)(void *)cx->sbuf;
    float *val = (float *)(void *)(cx->sbuf + 4 * k);
    if ((err = comm_cx_topk_select(acc, n, k, idx))) return FAIL(err, "top-k selection failed");
    for (size_t j = 0; j < k; j++)
        val[j] = acc[idx[j]];
    if (ef) {
        memcpy(cx->res, acc, n * sizeof *acc);
        for (size_t j = 0; j < k; j++)
            cx->res[idx[j]] = 0;
    }
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

/* PowerSGD: P = M Q, all-reduce [P's, dense elements], orthonormalize,
 * Q = M^T P, all-reduce Q's, result P Q^T; residual M - P P^T M. */
static int powersgd_ar(comm_cx *cx, float *g, int step, comm_op op, uint64_t *bytes) {
    int err = 0;
    size_t n = cx->n, r = (size_t)cx->o.rank, nm = cx->o.n_mats;
    int ef = cx->o.error_feedback;
    float *acc = cx->work;
    for (size_t i = 0; i < n; i++)
        acc[i] = ef ? g[i] + cx->res[i] : g[i];
    /* P's, then dense elements */
    size_t po = 0, mo = 0, qo = 0;
    for (size_t m = 0; m < nm; m++) {
        size_t R = cx->mrows[m], C = cx->mcols[m];
        if (cx->mat_on[m]) {
            const float *M = acc + mo, *Q = cx->q + qo;
            float *P = cx->pq + po;
            for (size_t i = 0; i < R; i++)
                for (size_t c = 0; c < r; c++) {
                    double s = 0;
                    for (size_t j = 0; j < C; j++)
                        s += (double)M[i * C + j] * Q[j * r + c];
                    P[i * r + c] = (float)s;
                }
            po += R * r, qo += C * r;
        }
        mo += R * C;
    }
    size_t pend = po;
    mo = 0;
    for (size_t m = 0; m < nm; m++) {
        size_t RC = cx->mrows[m] * cx->mcols[m];
        if (!cx->mat_on[m]) memcpy(cx->pq + po, acc + mo, RC * sizeof(float)), po += RC;
        mo += RC;
    }
    memcpy(cx->pq + po, acc + cx->mat_end, (n - cx->mat_end) * sizeof(float));
    po += n - cx->mat_end;
    if ((err = dense_ar(cx, cx->pq, po, op, bytes))) return err;
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
    /* orthonormalize P's; Q_local = M^T P */
    po = mo = qo = 0;
    for (size_t m = 0; m < nm; m++) {
        size_t R = cx->mrows[m], C = cx->mcols[m];
        if (cx->mat_on[m]) {
            float *P = cx->pq + po, *Ql = cx->qloc + qo;
            const float *M = acc + mo;
            orthonormalize(P, R, r);
            for (size_t j = 0; j < C; j++)
                for (size_t c = 0; c < r; c++) {
                    double s = 0;
                    for (size_t i = 0; i < R; i++)
                        s += (double)M[i * C + j] * P[i * r + c];
                    Ql[j * r + c] = (float)s;
                }
            /* residual M - P Ql^T (local projection) */
            if (ef)
                for (size_t i = 0; i < R; i++)
                    for (size_t j = 0; j < C; j++) {
                        float s = 0;
                        for (size_t c = 0; c < r; c++)
                            s += P[i * r + c] * Ql[j * r + c];
                        cx->res[mo + i * C + j] = M[i * C + j] - s;
                    }
            po += R * r, qo += C * r;
        }
        mo += R * C;
    }
    /* P's must survive the Q all-reduce: move them into acc (free now) */
    memcpy(acc, cx->pq, pend * sizeof(float));
    memcpy(cx->q, cx->qloc, qo * sizeof(float));
    if ((err = dense_ar(cx, cx->q, qo, op, bytes))) return err;
    po = mo = qo = 0;
    for (size_t m = 0; m < nm; m++) {
        size_t R = cx->mrows[m], C = cx->mcols[m];
        if (cx->mat_on[m]) {
            const float *P = acc + po;
            float *Q = cx->q + qo;
            for (size_t i = 0; i < R; i++)
                for (size_t j = 0; j < C; j++) {
                    float s = 0;
                    for (size_t c = 0; c < r; c++)
                        s += P[i * r + c] * Q[j * r + c];
                    g[mo + i * C + j] = s;
                }
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
        if (cx->o.error_feedback)
            for (size_t i = 0; i < n; i++)
                grad[i] += cx->res[i], cx->res[i] = 0;
        err = dense_ar(cx, grad, n, op, &bytes);
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
