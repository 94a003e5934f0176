/* Unit tests of comm/compress.h without MPI (local contexts, comm ==
 * MPI_COMM_NULL): cast and quantizer round-trip error bounds, unbiased
 * stochastic rounding, exact top-k selection, error feedback (accumulated
 * transmitted updates track the dense sum; the residual stays bounded),
 * PowerSGD exactness on low-rank matrices, warm-up, min_ratio and option
 * errors. Not here: the exchange across ranks (tests/mpi/test_compress.c).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm/compress.h"

/* ---- helpers ------------------------------------------------------------ */

static uint64_t sm_state;
static uint64_t next_u64(void) {
    uint64_t z = (sm_state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}
static double uni(void) {
    return (double)(next_u64() >> 11) / 9007199254740992.0;
}
static float gauss(void) {
    double u1 = uni() + 1e-300, u2 = uni();
    return (float)(sqrt(-2 * log(u1)) * cos(6.283185307179586 * u2));
}

/* random values with magnitudes spread over 2^lo..2^hi */
static void fill_spread(float *x, size_t n, int lo, int hi) {
    for (size_t i = 0; i < n; i++)
        x[i] = (float)ldexp(uni() * 2 - 1, lo + (int)(next_u64() % (uint64_t)(hi - lo + 1)));
}

static comm_cx *local_cx(comm_cx_type t, size_t n, int ef, void (*tweak)(comm_cx_opts *)) {
    comm_cx_opts o;
    comm_cx_opts_default(&o);
    o.type = t;
    o.error_feedback = ef;
    if (tweak) tweak(&o);
    comm_cx *cx = NULL;
    assert_int_equal(comm_cx_create(MPI_COMM_NULL, &o, n, &cx), 0);
    assert_non_null(cx);
    return cx;
}

static const comm_cx_type QTYPES[] = {COMM_CX_INT8, COMM_CX_INT4, COMM_CX_INT2};
static const int QL[] = {127, 7, 1};

/* ---- names and options ---------------------------------------------------- */

static void test_names(void **st) {
    (void)st;
    for (int t = 0; t < COMM_CX_NTYPES; t++) {
        comm_cx_type back;
        assert_int_equal(comm_cx_type_from_name(comm_cx_type_name((comm_cx_type)t), &back), 0);
        assert_int_equal(back, t);
    }
    comm_cx_type x;
    assert_int_equal(comm_cx_type_from_name("int3", &x), COMM_ERR_ARG);
    assert_null(comm_cx_type_name(COMM_CX_NTYPES));
    assert_int_equal(comm_cx_int_type(4), COMM_CX_INT4);
    assert_int_equal(comm_cx_int_type(3), COMM_CX_NTYPES);
    /* encoded sizes: 2 bytes per value for casts; bits + one fp32 per block */
    assert_int_equal(comm_cx_encoded_bytes(COMM_CX_FP16, 1000, 256), 2000);
    assert_int_equal(comm_cx_encoded_bytes(COMM_CX_INT8, 1000, 256), 4 * 4 + 1000);
    assert_int_equal(comm_cx_encoded_bytes(COMM_CX_INT4, 1000, 256), 4 * 4 + 500);
    assert_int_equal(comm_cx_encoded_bytes(COMM_CX_INT2, 1001, 256), 4 * 4 + 251);
}

static void test_option_errors(void **st) {
    (void)st;
    comm_cx_opts o;
    comm_cx *cx = (comm_cx *)1;
    comm_cx_opts_default(&o);
    o.type = COMM_CX_TOPK, o.ratio = 0;
    assert_int_equal(comm_cx_create(MPI_COMM_NULL, &o, 10, &cx), COMM_ERR_ARG);
    assert_null(cx);
    comm_cx_opts_default(&o);
    o.min_ratio = 0.5;
    assert_int_equal(comm_cx_create(MPI_COMM_NULL, &o, 10, &cx), COMM_ERR_ARG);
    comm_cx_opts_default(&o);
    o.type = COMM_CX_POWERSGD, o.rank = 0;
    assert_int_equal(comm_cx_create(MPI_COMM_NULL, &o, 10, &cx), COMM_ERR_ARG);
    size_t r = 4, c = 4;
    comm_cx_opts_default(&o);
    o.type = COMM_CX_POWERSGD, o.n_mats = 1, o.mat_rows = &r, o.mat_cols = &c;
    assert_int_equal(comm_cx_create(MPI_COMM_NULL, &o, 10, &cx), COMM_ERR_ARG); /* 16 > 10 */
    o.type = (comm_cx_type)99;
    assert_int_equal(comm_cx_create(MPI_COMM_NULL, &o, 10, &cx), COMM_ERR_ARG);
    comm_cx_opts_default(&o);
    o.type = COMM_CX_INT4, o.node_aware = 2;
    assert_int_equal(comm_cx_create(MPI_COMM_NULL, &o, 10, &cx), COMM_ERR_ARG);
    /* node-aware is on by default but needs several nodes: a local context is flat */
    comm_cx_opts_default(&o);
    assert_int_equal(o.node_aware, 1);
    /* wrong count at call time */
    cx = local_cx(COMM_CX_INT8, 10, 1, NULL);
    assert_int_equal(comm_cx_node_aware(cx), 0);
    float g[11] = {0};
    assert_int_equal(comm_cx_allreduce(cx, g, 11, 0, COMM_AVG, NULL), COMM_ERR_ARG);
    assert_int_equal(comm_cx_allreduce(cx, g, 10, 0, (comm_op)7, NULL), COMM_ERR_ARG);
    assert_int_equal(comm_cx_node_bytes(cx), 0);
    comm_cx_destroy(cx);
    comm_cx_destroy(NULL);
}

/* ---- casts ------------------------------------------------------------------ */

/* fp16 (11-bit significand): round to nearest gives |x - y| <= 2^-11 |x|
 * for normal results (|x| >= 2^-14) and <= half the subnormal spacing
 * 2^-24 / 2 = 2^-25 below. bf16 (8-bit significand): <= 2^-8 |x|. */
static void test_cast_bounds(void **st) {
    (void)st;
    size_t n = 200000;
    float *x = malloc(n * sizeof *x), *y = malloc(n * sizeof *y);
    void *enc = malloc(2 * n);
    sm_state = 11;
    fill_spread(x, n, -30, 15);
    double worst16 = 0, worst_bf = 0;
    assert_int_equal(comm_cx_encode(COMM_CX_FP16, x, n, 256, 0, 0, enc, y), 0);
    for (size_t i = 0; i < n; i++) {
        double a = fabs((double)x[i]), e = fabs((double)x[i] - y[i]);
        double bound = a >= ldexp(1, -14) ? ldexp(a, -11) : ldexp(1, -25);
        if (e > bound) fail_msg("fp16: x=%.9g y=%.9g", x[i], y[i]);
        if (a >= ldexp(1, -14) && e / a > worst16) worst16 = e / a;
    }
    float *z = malloc(n * sizeof *z);
    assert_int_equal(comm_cx_decode(COMM_CX_FP16, enc, n, 256, z), 0);
    assert_memory_equal(y, z, n * sizeof *y);
    assert_int_equal(comm_cx_encode(COMM_CX_BF16, x, n, 256, 0, 0, enc, y), 0);
    assert_int_equal(comm_cx_decode(COMM_CX_BF16, enc, n, 256, z), 0);
    assert_memory_equal(y, z, n * sizeof *y);
    for (size_t i = 0; i < n; i++) {
        double a = fabs((double)x[i]), e = fabs((double)x[i] - y[i]);
        if (e > ldexp(a, -8)) fail_msg("bf16: x=%.9g y=%.9g", x[i], y[i]);
        if (a > 0 && e / a > worst_bf) worst_bf = e / a;
    }
    printf("# worst relative error: fp16 %.3g (bound %.3g), bf16 %.3g (bound %.3g)\n", worst16,
           ldexp(1, -11), worst_bf, ldexp(1, -8));
    /* ties to even */
    assert_int_equal(comm_cx_fp32_to_bf16(comm_cx_bf16_to_fp32(0x3f80) + 0x1p-8f), 0x3f80);
    assert_int_equal(comm_cx_fp32_to_bf16(1.0f + 3 * 0x1p-8f), 0x3f82);
    assert_int_equal(comm_cx_fp32_to_bf16(1.0f + 0x1p-8f + 0x1p-20f), 0x3f81);
    /* saturation, NaN */
    assert_int_equal(comm_cx_fp32_to_bf16(FLT_MAX), 0x7f7f);
    assert_int_equal(comm_cx_fp32_to_bf16(-FLT_MAX), 0xff7f);
    assert_true(isnan(comm_cx_bf16_to_fp32(comm_cx_fp32_to_bf16(NAN))));
    float big[2] = {1e6f, -70000.f}, bo[2];
    comm_cx_encode(COMM_CX_FP16, big, 2, 256, 0, 0, enc, bo);
    assert_true(bo[0] == 65504.f && bo[1] == -65504.f);
    free(x), free(y), free(z), free(enc);
}

/* ---- quantizers --------------------------------------------------------------- */

/* Stochastic rounding q = floor(x/s + u), u in (0,1), s = absmax(block)/L:
 * q s lies on one of the two grid points around x, so |x - q s| < s, plus
 * the fp32 rounding of q*s (<= 2^-24 |q s| <= 2^-24 L s); codes stay in
 * [-L, L] because |x/s| <= L. */
static void test_quant_bounds(void **st) {
    (void)st;
    size_t n = 100003; /* not a multiple of the block */
    float *x = malloc(n * sizeof *x), *y = malloc(n * sizeof *y), *z = malloc(n * sizeof *z);
    sm_state = 12;
    fill_spread(x, n, -12, 6);
    for (size_t i = 5000; i < 5300; i++)
        x[i] = 0; /* an all-zero block */
    for (size_t i = 7000; i < 7300; i++)
        x[i] = gauss() * 1e-33f; /* scales whose inverse overflows float */
    for (int qi = 0; qi < 3; qi++) {
        for (size_t B = 1; B <= 256; B *= 16) { /* 1, 16, 256 */
            comm_cx_type t = QTYPES[qi];
            size_t nbytes = comm_cx_encoded_bytes(t, n, B);
            void *enc = malloc(nbytes);
            uint64_t key = comm_cx_stream_key(5, 3, 1, 1);
            assert_int_equal(comm_cx_encode(t, x, n, B, key, 0, enc, y), 0);
            assert_int_equal(comm_cx_decode(t, enc, n, B, z), 0);
            assert_memory_equal(y, z, n * sizeof *y);
            double worst = 0;
            for (size_t b0 = 0; b0 < n; b0 += B) {
                size_t b1 = b0 + B < n ? b0 + B : n;
                float amax = 0;
                for (size_t i = b0; i < b1; i++)
                    amax = fmaxf(amax, fabsf(x[i]));
                double s = amax / (float)QL[qi];
                for (size_t i = b0; i < b1; i++) {
                    double e = fabs((double)x[i] - y[i]);
                    if (e > s * (1 + QL[qi] * 0x1p-23))
                        fail_msg("%s: error %g > s %g", comm_cx_type_name(t), e, s);
                    if (amax == 0 && y[i] != 0) fail_msg("zero block decoded nonzero");
                    if (s > 0 && e / s > worst) worst = e / s;
                }
            }
            if (B == 256)
                printf("# %s: worst |x-y| / scale = %.4f (bound 1), %.3f bits/value\n",
                       comm_cx_type_name(t), worst, 8.0 * nbytes / n);
            free(enc);
        }
    }
    free(x), free(y), free(z);
}

/* Unbiased: E[q s] = x. The mean over N independent streams has standard
 * deviation <= s / (2 sqrt N) (Bernoulli variance <= s^2/4), so every
 * element's mean must lie within 5 of those of x (the chance that one of
 * 3 x 256 elements fails is ~ 4e-4). Also: the 24-bit uniforms have mean
 * exactly 1/2, so no systematic drift. */
static void test_unbiased(void **st) {
    (void)st;
    const size_t n = 256, N = 4000;
    float x[256], y[256];
    double mean[256];
    unsigned char enc[512];
    sm_state = 13;
    fill_spread(x, n, -3, 0);
    x[7] = 1.0f; /* the absmax: exactly representable */
    for (int qi = 0; qi < 3; qi++) {
        comm_cx_type t = QTYPES[qi];
        float amax = 0;
        for (size_t i = 0; i < n; i++)
            amax = fmaxf(amax, fabsf(x[i]));
        double s = amax / (float)QL[qi], tol = 5 * s / (2 * sqrt((double)N)), worst = 0;
        memset(mean, 0, sizeof mean);
        for (size_t k = 0; k < N; k++) {
            comm_cx_encode(t, x, n, 256, comm_cx_stream_key(99, (int)k, 0, 1), 0, enc, y);
            for (size_t i = 0; i < n; i++)
                mean[i] += y[i];
        }
        for (size_t i = 0; i < n; i++) {
            double d = fabs(mean[i] / N - x[i]);
            if (d > tol)
                fail_msg("%s: element %zu biased: mean %g vs %g", comm_cx_type_name(t), i,
                         mean[i] / N, x[i]);
            if (d / tol > worst) worst = d / tol;
        }
        printf("# %s: worst |mean - x| = %.2f of the 5-sigma tolerance\n", comm_cx_type_name(t),
               worst);
    }
}

/* Round to nearest: |x - q s| <= s/2 (+ fp32 rounding of q s). With error
 * feedback the residual obeys |r| <= (G + |r|max)/(2L), so it stays within
 * G/(2L-1), G = max|g| (here int2: G). */
static void test_nearest(void **st) {
    (void)st;
    size_t n = 4096;
    float *x = malloc(n * 4), *y = malloc(n * 4);
    unsigned char *enc = malloc(comm_cx_encoded_bytes(COMM_CX_INT8, n, 256));
    sm_state = 20;
    fill_spread(x, n, -6, 0);
    for (int qi = 0; qi < 3; qi++) {
        comm_cx_encode_round(QTYPES[qi], x, n, 256, 0, 0, 0, enc, y);
        for (size_t b0 = 0; b0 < n; b0 += 256) {
            float amax = 0;
            for (size_t i = b0; i < b0 + 256; i++)
                amax = fmaxf(amax, fabsf(x[i]));
            double s = amax / (float)QL[qi];
            for (size_t i = b0; i < b0 + 256; i++)
                if (fabs((double)x[i] - y[i]) > s / 2 * (1 + 1e-6))
                    fail_msg("nearest: error > s/2");
        }
    }
    comm_cx_opts o;
    comm_cx_opts_default(&o);
    o.type = COMM_CX_INT2, o.stochastic = 0;
    comm_cx *cx = NULL;
    assert_int_equal(comm_cx_create(MPI_COMM_NULL, &o, n, &cx), 0);
    double worst = 0;
    for (int s = 0; s < 300; s++) {
        fill_spread(x, n, -6, 0); /* |g| < 1 */
        assert_int_equal(comm_cx_allreduce(cx, x, n, s, COMM_AVG, NULL), 0);
        size_t rl;
        float *r = comm_cx_residual(cx, &rl);
        for (size_t i = 0; i < rl; i++)
            worst = fmax(worst, fabs(r[i]));
    }
    printf("# int2 nearest + EF: max |residual| over 300 steps %.3f (bound max|g| = 1)\n", worst);
    assert_true(worst <= 1.0);
    comm_cx_destroy(cx);
    free(x), free(y), free(enc);
}

/* Same key: same bytes; another step or rank: different rounding. */
static void test_deterministic(void **st) {
    (void)st;
    float x[1000], y1[1000], y2[1000];
    unsigned char e1[1100], e2[1100];
    sm_state = 14;
    fill_spread(x, 1000, -4, 0);
    comm_cx_encode(COMM_CX_INT4, x, 1000, 256, comm_cx_stream_key(1, 5, 2, 1), 0, e1, y1);
    comm_cx_encode(COMM_CX_INT4, x, 1000, 256, comm_cx_stream_key(1, 5, 2, 1), 0, e2, y2);
    size_t nb = comm_cx_encoded_bytes(COMM_CX_INT4, 1000, 256);
    assert_memory_equal(e1, e2, nb);
    comm_cx_encode(COMM_CX_INT4, x, 1000, 256, comm_cx_stream_key(1, 6, 2, 1), 0, e2, y2);
    assert_memory_not_equal(e1, e2, nb);
    comm_cx_encode(COMM_CX_INT4, x, 1000, 256, comm_cx_stream_key(1, 5, 3, 1), 0, e2, y2);
    assert_memory_not_equal(e1, e2, nb);
}

/* ---- top-k ---------------------------------------------------------------------- */

static const float *sort_base;
static int by_mag(const void *a, const void *b) {
    uint32_t i = *(const uint32_t *)a, j = *(const uint32_t *)b;
    float x = fabsf(sort_base[i]), y = fabsf(sort_base[j]);
    if (x != y) return x > y ? -1 : 1;
    return i < j ? -1 : 1;
}
static int by_idx(const void *a, const void *b) {
    uint32_t i = *(const uint32_t *)a, j = *(const uint32_t *)b;
    return i < j ? -1 : i > j;
}

/* Both paths of the selection: candidates of the threshold bucket gathered
 * (spread magnitudes) and passes over the whole buffer (many equal or
 * close magnitudes: more candidates than the 4 k + 4096 gathered). */
static void test_topk_exact(void **st) {
    (void)st;
    const size_t nmax = 70001;
    float *x = malloc(nmax * sizeof *x);
    uint32_t *got = malloc(nmax * 4), *ref = malloc(nmax * 4);
    sm_state = 15;
    for (int trial = 0; trial < 8; trial++) {
        size_t n = trial < 4 ? 5000 : nmax;
        for (size_t i = 0; i < n; i++) {
            if (trial == 0)
                x[i] = gauss();
            else if (trial % 4 == 1)
                x[i] = (float)((int)(next_u64() % 9) - 4); /* many ties */
            else if (trial % 4 == 2)
                x[i] = (float)ldexp(gauss(), (int)(next_u64() % 60) - 40);
            else if (trial == 3)
                x[i] = (i % 3) ? 0.f : -0.f; /* all equal magnitude */
            else if (trial == 4)
                x[i] = gauss();
            else /* one binade, 11 leading key bits shared by ~1/8 of them */
                x[i] = 1.0f + (float)(next_u64() % 1024) / 1024.0f;
        }
        size_t ks[] = {0, 1, 7, 50, 1234, n - 1, n};
        for (size_t kk = 0; kk < sizeof ks / sizeof *ks; kk++) {
            size_t k = ks[kk];
            assert_int_equal(comm_cx_topk_select(x, n, k, got), 0);
            for (uint32_t i = 0; i < n; i++)
                ref[i] = i;
            sort_base = x;
            qsort(ref, n, 4, by_mag);
            qsort(ref, k, 4, by_idx);
            if (k && memcmp(got, ref, k * 4))
                fail_msg("top-k trial %d k=%zu differs from the sorted reference", trial, k);
        }
    }
    assert_int_equal(comm_cx_topk_select(x, 10, 11, got), COMM_ERR_ARG);
    free(x), free(got), free(ref);
}

/* ---- error feedback ------------------------------------------------------------ */

static size_t ps_rows[2] = {48, 32}, ps_cols[2] = {64, 40};
static void tw_ps(comm_cx_opts *o) {
    o->rank = 2, o->n_mats = 2, o->mat_rows = ps_rows, o->mat_cols = ps_cols;
}
static void tw_topk(comm_cx_opts *o) {
    o->ratio = 0.01;
}

static double norm2(const double *v, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++)
        s += v[i] * v[i];
    return sqrt(s);
}

/* T steps of g_t = m + noise_t through a local (1-rank) context. With error
 * feedback, sum(g) - sum(sent) == residual_T exactly up to fp32 rounding of
 * the bookkeeping (residual_t = residual_{t-1} + g_t - sent_t), so the
 * relative error of the accumulated update is |res_T| / |sum g| -> 0 as T
 * grows while the residual stays bounded (checked: |res_T| does not grow
 * between T/2 and T). Without error feedback top-k, PowerSGD and the casts
 * lose a fixed part of m every step and the relative error stays large. */
static void ef_case(comm_cx_type t, void (*tweak)(comm_cx_opts *), double want_rel) {
    const size_t n = 48 * 64 + 32 * 40 + 100; /* two matrices + a dense tail */
    const int T = 400;
    double rel[2], resn[2] = {0, 0}, res_half = 0;
    float *m = malloc(n * sizeof *m), *g = malloc(n * sizeof *g);
    double *sg = calloc(n, sizeof *sg), *ss = calloc(n, sizeof *ss), *d = calloc(n, sizeof *d);
    for (int ef = 1; ef >= 0; ef--) {
        sm_state = 16;
        for (size_t i = 0; i < n; i++)
            m[i] = (float)ldexp(gauss(), -(int)(i % 5)) * 1e-2f;
        comm_cx *cx = local_cx(t, n, ef, tweak);
        memset(sg, 0, n * sizeof *sg), memset(ss, 0, n * sizeof *ss);
        for (int s = 0; s < T; s++) {
            for (size_t i = 0; i < n; i++)
                g[i] = m[i] + 0.5f * m[i] * gauss();
            for (size_t i = 0; i < n; i++)
                sg[i] += g[i];
            assert_int_equal(comm_cx_allreduce(cx, g, n, s, COMM_AVG, NULL), 0);
            for (size_t i = 0; i < n; i++)
                ss[i] += g[i];
            if (ef && s == T / 2 - 1) {
                size_t rl;
                float *r = comm_cx_residual(cx, &rl);
                for (size_t i = 0; i < n; i++)
                    d[i] = r[i];
                res_half = norm2(d, n);
            }
        }
        for (size_t i = 0; i < n; i++)
            d[i] = sg[i] - ss[i];
        rel[ef] = norm2(d, n) / norm2(sg, n);
        if (ef) {
            size_t rl;
            float *r = comm_cx_residual(cx, &rl);
            assert_int_equal(rl, n);
            double worst = 0, mag = 0;
            for (size_t i = 0; i < n; i++) {
                worst = fmax(worst, fabs(d[i] - r[i]));
                mag = fmax(mag, fabs(sg[i]));
            }
            /* identity: sum(g) - sum(sent) = residual (fp32 bookkeeping) */
            if (worst > 1e-5 * mag)
                fail_msg("%s: sum(g)-sum(sent) differs from residual by %g", comm_cx_type_name(t),
                         worst);
            for (size_t i = 0; i < n; i++)
                d[i] = r[i];
            resn[1] = norm2(d, n);
        }
        comm_cx_destroy(cx);
    }
    printf("# %-8s relative error of the accumulated update after %d steps: with EF %.2e, "
           "without %.2e; |residual| at T/2 %.3g, at T %.3g\n",
           comm_cx_type_name(t), T, rel[1], rel[0], res_half, resn[1]);
    if (!(rel[1] <= want_rel))
        fail_msg("%s: EF relative error %g > %g", comm_cx_type_name(t), rel[1], want_rel);
    if (!(resn[1] <= 2 * res_half + 1e-6)) fail_msg("%s: residual grows", comm_cx_type_name(t));
    free(m), free(g), free(sg), free(ss), free(d);
}

static void test_ef_int8(void **st) {
    (void)st, ef_case(COMM_CX_INT8, NULL, 1e-3);
}
static void test_ef_int4(void **st) {
    (void)st, ef_case(COMM_CX_INT4, NULL, 5e-3);
}
static void test_ef_int2(void **st) {
    (void)st, ef_case(COMM_CX_INT2, NULL, 2e-2);
}
static void test_ef_fp16(void **st) {
    (void)st, ef_case(COMM_CX_FP16, NULL, 1e-4);
}
static void test_ef_bf16(void **st) {
    (void)st, ef_case(COMM_CX_BF16, NULL, 1e-3);
}
static void test_ef_topk(void **st) {
    (void)st, ef_case(COMM_CX_TOPK, tw_topk, 0.3);
}
static void test_ef_powersgd(void **st) {
    (void)st, ef_case(COMM_CX_POWERSGD, tw_ps, 0.3);
}

/* ---- PowerSGD ------------------------------------------------------------------ */

/* A rank-r matrix M = A B^T is reproduced exactly (to fp32 rounding): P =
 * M Q spans M's column space for a generic Q, so P P^T M = M; the residual
 * is ~0. Also: a tensor too small for min_ratio and the tail go dense
 * (bitwise unchanged with one rank). */
static void test_powersgd_exact(void **st) {
    (void)st;
    size_t R = 60, C = 50, r = 3, tail = 17;
    size_t rows[2] = {60, 3}, cols[2] = {50, 3};
    size_t n = R * C + 9 + tail;
    comm_cx_opts o;
    comm_cx_opts_default(&o);
    o.type = COMM_CX_POWERSGD, o.rank = (int)r, o.n_mats = 2, o.mat_rows = rows, o.mat_cols = cols;
    comm_cx *cx = NULL;
    assert_int_equal(comm_cx_create(MPI_COMM_NULL, &o, n, &cx), 0);
    float *A = malloc(R * r * 4), *B = malloc(C * r * 4), *M = malloc(n * 4), *g = malloc(n * 4);
    sm_state = 17;
    for (int step = 0; step < 6; step++) {
        if (step < 2) { /* a new matrix at steps 0 and 1, then the same */
            for (size_t i = 0; i < R * r; i++)
                A[i] = gauss();
            for (size_t i = 0; i < C * r; i++)
                B[i] = gauss();
        }
        for (size_t i = 0; i < R; i++)
            for (size_t j = 0; j < C; j++) {
                double s = 0;
                for (size_t c = 0; c < r; c++)
                    s += (double)A[i * r + c] * B[j * r + c];
                M[i * C + j] = (float)s;
            }
        for (size_t i = R * C; i < n; i++)
            M[i] = gauss();
        memcpy(g, M, n * 4);
        assert_int_equal(comm_cx_allreduce(cx, g, n, step, COMM_AVG, NULL), 0);
        assert_string_equal(comm_cx_last_mode(cx), "powersgd");
        double e = 0, a = 0;
        for (size_t i = 0; i < R * C; i++)
            e += (g[i] - M[i]) * (g[i] - M[i]), a += M[i] * M[i];
        printf("# powersgd rank %zu on a rank-%zu %zux%zu matrix, step %d: rel error %.2e\n", r, r,
               R, C, step, sqrt(e / a));
        /* a new matrix with Q warm-started from another one loses a few
         * digits to conditioning; the same matrix again is exact to ~1e-7 */
        double tol = step >= 3 ? 1e-6 : 1e-4;
        if (!(sqrt(e / a) < tol)) fail_msg("step %d: relative error %g", step, sqrt(e / a));
        assert_memory_equal(g + R * C, M + R * C, (n - R * C) * 4); /* dense parts */
        size_t rl;
        float *res = comm_cx_residual(cx, &rl);
        double rn = 0;
        for (size_t i = 0; i < n; i++)
            rn += res[i] * res[i];
        if (!(sqrt(rn / a) < 1e-4)) fail_msg("step %d: residual %g", step, sqrt(rn / a));
    }
    size_t ql;
    assert_non_null(comm_cx_state(cx, &ql));
    assert_int_equal(ql, C * r); /* only the big matrix is compressed */
    comm_cx_destroy(cx);
    free(A), free(B), free(M), free(g);
}

/* ---- warm-up and min_ratio ------------------------------------------------------ */

static void tw_warm(comm_cx_opts *o) {
    o->warmup_steps = 3;
}
static void tw_min25(comm_cx_opts *o) {
    o->min_ratio = 2.5;
}
static void tw_dense_topk(comm_cx_opts *o) {
    o->ratio = 0.8;
}

static void test_warmup_min_ratio(void **st) {
    (void)st;
    size_t n = 1000;
    float x[1000], g[1000];
    sm_state = 18;
    fill_spread(x, n, -6, 0);
    comm_cx *cx = local_cx(COMM_CX_INT2, n, 1, tw_warm);
    assert_true(comm_cx_compresses(cx));
    for (int s = 0; s < 5; s++) {
        memcpy(g, x, sizeof g);
        assert_int_equal(comm_cx_allreduce(cx, g, n, s, COMM_AVG, NULL), 0);
        if (s < 3) {
            assert_string_equal(comm_cx_last_mode(cx), "dense");
            assert_memory_equal(g, x, sizeof g);
        } else {
            assert_string_equal(comm_cx_last_mode(cx), "int2");
            assert_memory_not_equal(g, x, sizeof g);
        }
    }
    comm_cx_destroy(cx);
    /* fp16 halves the bytes: below min_ratio 2.5 it stays dense */
    cx = local_cx(COMM_CX_FP16, n, 1, tw_min25);
    assert_false(comm_cx_compresses(cx));
    memcpy(g, x, sizeof g);
    assert_int_equal(comm_cx_allreduce(cx, g, n, 10, COMM_AVG, NULL), 0);
    assert_string_equal(comm_cx_last_mode(cx), "dense");
    assert_memory_equal(g, x, sizeof g);
    comm_cx_destroy(cx);
    /* int8 (3.9x) passes min_ratio 2.5 */
    cx = local_cx(COMM_CX_INT8, n, 1, tw_min25);
    assert_true(comm_cx_compresses(cx));
    comm_cx_destroy(cx);
    /* top-k at 80% density: index/value pairs cost more than dense */
    cx = local_cx(COMM_CX_TOPK, n, 1, tw_dense_topk);
    assert_false(comm_cx_compresses(cx));
    comm_cx_destroy(cx);
    cx = local_cx(COMM_CX_NONE, n, 1, NULL);
    assert_false(comm_cx_compresses(cx));
    comm_cx_destroy(cx);
}

/* The residual can be saved and restored: two contexts, one restored from
 * the other's residual mid-run, produce the same bytes afterwards. */
static void test_residual_restore(void **st) {
    (void)st;
    size_t n = 3000;
    float *g1 = malloc(n * 4), *g2 = malloc(n * 4);
    comm_cx *a = local_cx(COMM_CX_INT4, n, 1, NULL), *b = local_cx(COMM_CX_INT4, n, 1, NULL);
    sm_state = 19;
    for (int s = 0; s < 6; s++) {
        fill_spread(g1, n, -5, 0);
        memcpy(g2, g1, n * 4);
        assert_int_equal(comm_cx_allreduce(a, g1, n, s, COMM_AVG, NULL), 0);
        if (s >= 3) {
            assert_int_equal(comm_cx_allreduce(b, g2, n, s, COMM_AVG, NULL), 0);
            assert_memory_equal(g1, g2, n * 4);
        }
        if (s == 2) { /* "checkpoint" of a, "resume" into b */
            size_t la, lb;
            float *ra = comm_cx_residual(a, &la), *rb = comm_cx_residual(b, &lb);
            assert_int_equal(la, lb);
            memcpy(rb, ra, la * 4);
        }
    }
    comm_cx_destroy(a), comm_cx_destroy(b);
    free(g1), free(g2);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_names),
        cmocka_unit_test(test_option_errors),
        cmocka_unit_test(test_cast_bounds),
        cmocka_unit_test(test_quant_bounds),
        cmocka_unit_test(test_unbiased),
        cmocka_unit_test(test_nearest),
        cmocka_unit_test(test_deterministic),
        cmocka_unit_test(test_topk_exact),
        cmocka_unit_test(test_ef_int8),
        cmocka_unit_test(test_ef_int4),
        cmocka_unit_test(test_ef_int2),
        cmocka_unit_test(test_ef_fp16),
        cmocka_unit_test(test_ef_bf16),
        cmocka_unit_test(test_ef_topk),
        cmocka_unit_test(test_ef_powersgd),
        cmocka_unit_test(test_powersgd_exact),
        cmocka_unit_test(test_warmup_min_ratio),
        cmocka_unit_test(test_residual_restore),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
