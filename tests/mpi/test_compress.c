// mpi-ranks: 1 2 3 4 6
/* test_compress: comm_cx_allreduce (comm/compress.h) across ranks for every
 * compressor: bitwise identical results on all ranks, error against the
 * dense average within the stated bound (exact for top-k against a
 * reference built from every rank's data, exact for PowerSGD on data whose
 * average has rank <= r), bytes sent per rank against the dense ring
 * all-reduce, warm-up, min_ratio, the top-k dense switch, dense all-reduces
 * through a comm_ar, and error feedback across ranks. Every check is agreed
 * over all ranks before asserting, so none is left waiting in a collective.
 * Rank 0 prints the measured figures ("# ..."). Not here: speed (bench/).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm/allreduce.h"
#include "comm/compress.h"

#define N 20011 /* not a multiple of the block or the rank count */

static int rank, size;

/* ---- data ------------------------------------------------------------------ */

static uint64_t mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}
/* rank r's gradient element i at step s: uniform in [-1, 1) times a
 * magnitude that varies by block (2^-8 .. 2^0) */
static float val(int r, size_t i, int s) {
    uint64_t z = mix(((uint64_t)r << 48) ^ ((uint64_t)s << 32) ^ i ^ 0x1234567ULL);
    double u = (double)(z >> 11) / 9007199254740992.0 * 2 - 1;
    return (float)ldexp(u, -(int)(mix(i / 256 + 77) % 9));
}

static void agree(int local_fail, const char *what) {
    int any = 0;
    MPI_Allreduce(&local_fail, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    if (any) fail_msg("%s failed on some rank (see stderr)", what);
}

/* rank 0's buffer compared bitwise on every rank */
static int identical(const float *buf, size_t n, const char *what) {
    float *ref = malloc(n * sizeof *ref);
    if (rank == 0) memcpy(ref, buf, n * sizeof *ref);
    MPI_Bcast(ref, (int)n, MPI_FLOAT, 0, MPI_COMM_WORLD);
    int bad = memcmp(ref, buf, n * sizeof *ref) != 0;
    if (bad) fprintf(stderr, "rank %d: %s: result differs from rank 0's\n", rank, what);
    free(ref);
    return bad;
}

static double dense_bytes(size_t n) {
    return size > 1 ? 2.0 * (size - 1) / size * 4.0 * (double)n : 0;
}

static comm_cx *make(comm_cx_type t, size_t n, void (*tweak)(comm_cx_opts *)) {
    comm_cx_opts o;
    comm_cx_opts_default(&o);
    o.type = t;
    o.node_aware = 0; /* flat unless asked: the expected bytes assume it */
    if (tweak) tweak(&o);
    comm_cx *cx = NULL;
    int rc = comm_cx_create(MPI_COMM_WORLD, &o, n, &cx);
    agree(rc != 0, "comm_cx_create");
    return cx;
}

/* ---- quantizers and casts -------------------------------------------------------- */

/* Checks |g - avg| against the bound of coded_case per element (blocks of
 * B, L levels or a cast for L = 0), plus `sum_ulps` x the mean |addend|;
 * reports the first excess on stderr; the largest error/bound into *worst.
 * Returns 1 on an excess. */
static int check_bound(const float *g, const double *avg, const double *ms, const double *mabs,
                       size_t n, size_t B, comm_cx_type t, int L, double sum_ulps, const char *what,
                       double *worst) {
    for (size_t b0 = 0; b0 < n; b0 += B) {
        size_t b1 = b0 + B < n ? b0 + B : n;
        double amax = 0;
        for (size_t i = b0; i < b1; i++)
            amax = fmax(amax, fabs(avg[i]));
        for (size_t i = b0; i < b1; i++) {
            double e = fabs(g[i] - avg[i]), bound;
            if (L)
                bound = ms[i] + (size > 1 ? (amax + ms[i]) / L : 0);
            else {
                double u = t == COMM_CX_FP16 ? 0x1p-11 : 0x1p-8;
                bound = u * mabs[i] + (size > 1 ? u * (fabs(avg[i]) + u * mabs[i]) : 0) + 0x1p-24;
            }
            bound = bound * (1 + 1e-5) + sum_ulps * mabs[i] + 1e-12;
            if (e > bound) {
                fprintf(stderr, "rank %d: %s %s [%zu] = %g, avg %g, error %g > bound %g\n", rank,
                        comm_cx_type_name(t), what, i, g[i], avg[i], e, bound);
                return 1;
            }
            if (e / bound > *worst) *worst = e / bound;
        }
    }
    return 0;
}

/* Bound at step 0 (no residual yet), element i of block b, average over p:
 * stage 1 adds < s_r = absmax_b(g_r)/L per rank, i.e. < mean_r s_r to the
 * average; stage 2 re-encodes the average y (|y| <= absmax_b(avg) +
 * mean_r s_r) and adds < its scale (that over L). With one rank there is no
 * stage 2. Casts: 2^-11 (fp16) or 2^-8 (bf16) relative per stage. */
static void coded_case(comm_cx_type t, int L, double payload_ratio) {
    const char *name = comm_cx_type_name(t);
    size_t n = N, B = 256;
    comm_cx *cx = make(t, n, NULL);
    float *g = malloc(n * sizeof *g);
    double *avg = calloc(n, sizeof *avg), *mabs = calloc(n, sizeof *mabs);
    double *ms = calloc(n, sizeof *ms); /* mean_r s_r per element */
    for (int r = 0; r < size; r++)
        for (size_t b0 = 0; b0 < n; b0 += B) {
            size_t b1 = b0 + B < n ? b0 + B : n;
            float amax = 0;
            for (size_t i = b0; i < b1; i++)
                amax = fmaxf(amax, fabsf(val(r, i, 0)));
            for (size_t i = b0; i < b1; i++) {
                avg[i] += val(r, i, 0) / (double)size;
                mabs[i] += fabs(val(r, i, 0)) / size;
                ms[i] += (double)(amax / (float)L) / size;
            }
        }
    for (size_t i = 0; i < n; i++)
        g[i] = val(rank, i, 0);
    uint64_t bytes = 0;
    int rc = comm_cx_allreduce(cx, g, n, 0, COMM_AVG, &bytes);
    agree(rc != 0, name);
    agree(identical(g, n, name), name);
    double worst = 0;
    int bad = check_bound(g, avg, ms, mabs, n, B, t, L, 0, "flat", &worst);
    agree(bad, name);
    /* bytes: the dense ring all-reduce divided by the payload ratio (up to
     * the per-chunk rounding of the encoded sizes), nothing with one rank */
    double want = dense_bytes(n) / payload_ratio;
    uint64_t tot = 0;
    MPI_Allreduce(&bytes, &tot, 1, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD);
    /* chunks are whole blocks, so ranks differ a little (p = 3: 27/27/25
     * blocks); the mean over ranks matches the model */
    double mean = (double)tot / size;
    bad = size == 1
              ? bytes != 0
              : fabs(mean - want) > 0.01 * want + 64 || fabs((double)bytes - want) > 0.2 * want;
    if (bad)
        fprintf(stderr, "rank %d: %s sent %lu B (mean %.0f), expected ~%.0f\n", rank, name,
                (unsigned long)bytes, mean, want);
    agree(bad, name);
    if (rank == 0)
        printf(
            "# p=%d %-5s n=%d: max error / bound %.3f, bytes/rank %lu (dense %.0f, %.2fx less)\n",
            size, name, N, worst, (unsigned long)(tot / (uint64_t)size), dense_bytes(n),
            tot ? dense_bytes(n) * size / (double)tot : 0.0);
    comm_cx_destroy(cx);
    free(g), free(avg), free(mabs), free(ms);
}

static void test_fp16(void **st) {
    (void)st, coded_case(COMM_CX_FP16, 0, 2.0);
}
static void test_bf16(void **st) {
    (void)st, coded_case(COMM_CX_BF16, 0, 2.0);
}
static void test_int8(void **st) {
    (void)st, coded_case(COMM_CX_INT8, 127, 32.0 / 8.125);
}
static void test_int4(void **st) {
    (void)st, coded_case(COMM_CX_INT4, 7, 32.0 / 4.125);
}
static void test_int2(void **st) {
    (void)st, coded_case(COMM_CX_INT2, 1, 32.0 / 2.125);
}

/* ---- top-k -------------------------------------------------------------------------- */

static double topk_ratio;
static void tw_topk(comm_cx_opts *o) {
    o->ratio = topk_ratio;
}

/* The result equals, bitwise, the average of every rank's top-k entries
 * summed in rank order (recomputed here from all ranks' data). */
static void test_topk(void **st) {
    (void)st;
    size_t n = N;
    topk_ratio = 0.01;
    comm_cx *cx = make(COMM_CX_TOPK, n, tw_topk);
    size_t k = (size_t)ceil(0.01 * n);
    float *g = malloc(n * 4), *x = malloc(n * 4), *ref = calloc(n, 4);
    uint32_t *idx = malloc(k * 4);
    for (int r = 0; r < size; r++) {
        for (size_t i = 0; i < n; i++)
            x[i] = val(r, i, 0);
        comm_cx_topk_select(x, n, k, idx);
        for (size_t j = 0; j < k; j++)
            ref[idx[j]] += x[idx[j]];
    }
    if (size > 1)
        for (size_t i = 0; i < n; i++)
            ref[i] /= (float)size;
    for (size_t i = 0; i < n; i++)
        g[i] = val(rank, i, 0);
    uint64_t bytes = 0;
    agree(comm_cx_allreduce(cx, g, n, 0, COMM_AVG, &bytes) != 0, "topk");
    agree(identical(g, n, "topk"), "topk identical");
    agree(memcmp(g, ref, n * 4) != 0, "topk equals the reference");
    agree(bytes != (uint64_t)(size - 1) * 8 * k, "topk bytes");
    if (rank == 0)
        printf("# p=%d topk 1%% (k=%zu): bytes/rank %lu (dense %.0f, %.1fx less)\n", size, k,
               (unsigned long)bytes, dense_bytes(n), bytes ? dense_bytes(n) / bytes : 0.0);
    comm_cx_destroy(cx);
    /* 30%: pairs cost n/(p k) = 3.3/p of dense: compressed at p = 1, 2
     * (ratio >= 1.5), dense from p = 3 */
    topk_ratio = 0.3;
    cx = make(COMM_CX_TOPK, n, tw_topk);
    int want = size <= 2;
    agree(comm_cx_compresses(cx) != want, "topk density switch");
    for (size_t i = 0; i < n; i++)
        g[i] = val(rank, i, 0);
    agree(comm_cx_allreduce(cx, g, n, 0, COMM_AVG, &bytes) != 0, "topk 30%");
    agree(strcmp(comm_cx_last_mode(cx), want ? "topk" : "dense") != 0, "topk 30% mode");
    agree(identical(g, n, "topk 30%"), "topk 30% identical");
    comm_cx_destroy(cx);
    free(g), free(x), free(ref), free(idx);
}

/* ---- PowerSGD --------------------------------------------------------------------------- */

static size_t mrows[3] = {64, 40, 4}, mcols[3] = {96, 80, 4}; /* the 4x4 stays dense */
static comm_ar *g_ar;
static void tw_ps(comm_cx_opts *o) {
    o->rank = 4, o->n_mats = 3, o->mat_rows = mrows, o->mat_cols = mcols;
}

/* Rank r's matrix is A_r B^T with B shared (rank 2), so the average has rank
 * 2 <= 4 and PowerSGD returns it to fp32 accuracy; the 4x4 matrix and the
 * tail are all-reduced dense. Run with the default dense path and through a
 * comm_ar ring. */
static void ps_case(int use_ar) {
    size_t n = 64 * 96 + 40 * 80 + 16 + 33;
    comm_cx *cx = make(COMM_CX_POWERSGD, n, tw_ps);
    if (use_ar) comm_cx_set_dense(cx, g_ar, comm_ar_ring);
    float *g = malloc(n * 4);
    double *avg = calloc(n, sizeof *avg);
    for (int step = 0; step < 3; step++) {
        memset(avg, 0, n * sizeof *avg);
        for (int r = 0; r < size; r++) {
            size_t off = 0;
            for (int m = 0; m < 3; m++) {
                for (size_t i = 0; i < mrows[m]; i++)
                    for (size_t j = 0; j < mcols[m]; j++) {
                        float v = m == 2 ? val(r, off + i * 4 + j, step)
                                         : val(r, i, 10 + m) * val(99, j, 20 + m) +
                                               val(r, i, 30 + m) * val(99, j, 40 + m);
                        if (r == rank) g[off + i * mcols[m] + j] = v;
                        avg[off + i * mcols[m] + j] += (double)v / size;
                    }
                off += mrows[m] * mcols[m];
            }
            for (size_t i = off; i < n; i++) {
                float v = val(r, i, step);
                if (r == rank) g[i] = v;
                avg[i] += (double)v / size;
            }
        }
        uint64_t bytes = 0;
        agree(comm_cx_allreduce(cx, g, n, step, COMM_AVG, &bytes) != 0, "powersgd");
        agree(identical(g, n, "powersgd"), "powersgd identical");
        double e = 0, a = 0;
        for (size_t i = 0; i < n; i++)
            e += (g[i] - avg[i]) * (g[i] - avg[i]), a += avg[i] * avg[i];
        agree(!(sqrt(e / a) < 1e-5), "powersgd exact on rank-2 data");
        double dense_el = 16 + 33, comp_el = 4.0 * (64 + 96 + 40 + 80);
        double want = dense_bytes((size_t)(dense_el + comp_el));
        if (use_ar) /* comm_ar's ring counts its own messages; same order */
            agree(size > 1 && (bytes < 0.9 * want || bytes > 1.1 * want + 64), "powersgd ar bytes");
        else
            agree(fabs((double)bytes - want) > 8, "powersgd bytes");
        if (rank == 0 && step == 2)
            printf("# p=%d powersgd r=4 (%s): rel error %.2e, bytes/rank %lu (dense %.0f, %.1fx "
                   "less)\n",
                   size, use_ar ? "ring" : "reduce+bcast", sqrt(e / a), (unsigned long)bytes,
                   dense_bytes(n), bytes ? dense_bytes(n) / bytes : 0.0);
    }
    comm_cx_destroy(cx);
    free(g), free(avg);
}

static void test_powersgd(void **st) {
    (void)st, ps_case(0);
}
static void test_powersgd_ar(void **st) {
    (void)st, ps_case(1);
}

/* ---- warm-up, min_ratio ------------------------------------------------------------------ */

static void tw_warm(comm_cx_opts *o) {
    o->warmup_steps = 2;
}
static void tw_min(comm_cx_opts *o) {
    o->min_ratio = 2.5;
}

static void test_warmup_min_ratio(void **st) {
    (void)st;
    size_t n = N;
    float *g = malloc(n * 4), *d = malloc(n * 4);
    comm_cx *cx = make(COMM_CX_INT4, n, tw_warm);
    for (int step = 0; step < 3; step++) {
        for (size_t i = 0; i < n; i++)
            g[i] = d[i] = val(rank, i, step);
        /* dense reference: MPI_Allreduce may round differently, so compare
         * with a tolerance; identity across ranks is checked bitwise */
        MPI_Allreduce(MPI_IN_PLACE, d, (int)n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
        uint64_t bytes = 0;
        agree(comm_cx_allreduce(cx, g, n, step, COMM_SUM, &bytes) != 0, "warmup");
        agree(identical(g, n, "warmup"), "warmup identical");
        int dense = step < 2, bad = strcmp(comm_cx_last_mode(cx), dense ? "dense" : "int4") != 0;
        if (dense) {
            bad |= bytes != (uint64_t)dense_bytes(n);
            for (size_t i = 0; i < n; i++)
                bad |= fabsf(g[i] - d[i]) > 1e-6f * size;
        } else {
            bad |= size > 1 && !(bytes < dense_bytes(n) / 7);
        }
        agree(bad, "warmup dense then compressed");
    }
    comm_cx_destroy(cx);
    cx = make(COMM_CX_FP16, n, tw_min);
    for (size_t i = 0; i < n; i++)
        g[i] = val(rank, i, 0);
    uint64_t bytes = 0;
    agree(comm_cx_allreduce(cx, g, n, 5, COMM_AVG, &bytes) != 0, "min_ratio");
    agree(comm_cx_compresses(cx) || strcmp(comm_cx_last_mode(cx), "dense") ||
              bytes != (uint64_t)dense_bytes(n),
          "fp16 below min_ratio 2.5 goes dense");
    comm_cx_destroy(cx);
    free(g), free(d);
}

/* ---- error feedback across ranks ------------------------------------------------------------ */

/* 100 steps of a fixed per-rank gradient: the accumulated compressed
 * averages approach the accumulated dense average (relative error falls
 * like 1/T; the worker and server residuals stay bounded). */
static void tw_nearest(comm_cx_opts *o) {
    o->stochastic = 0;
}

static void test_error_feedback(void **st) {
    (void)st;
    size_t n = 4099;
    const int T = 100;
    comm_cx_type types[] = {COMM_CX_INT4, COMM_CX_INT2, COMM_CX_INT2, COMM_CX_TOPK};
    const double tol[] = {0.01, 0.05, 0.2, 0.2};
    for (int ti = 0; ti < 4; ti++) {
        topk_ratio = 0.05;
        comm_cx *cx = make(types[ti], n, ti == 1 ? tw_nearest : tw_topk);
        float *g = malloc(n * 4);
        double *acc = calloc(n, 8), *avg = calloc(n, 8);
        for (int r = 0; r < size; r++)
            for (size_t i = 0; i < n; i++)
                avg[i] += (double)val(r, i, 0) / size;
        double rel = 0;
        for (int s = 0; s < T; s++) {
            for (size_t i = 0; i < n; i++)
                g[i] = val(rank, i, 0);
            agree(comm_cx_allreduce(cx, g, n, s, COMM_AVG, NULL) != 0, "ef");
            for (size_t i = 0; i < n; i++)
                acc[i] += g[i];
        }
        agree(identical(g, n, "ef"), "ef identical");
        double e = 0, a = 0;
        for (size_t i = 0; i < n; i++)
            e += (acc[i] - T * avg[i]) * (acc[i] - T * avg[i]), a += T * avg[i] * T * avg[i];
        rel = sqrt(e / a);
        if (rank == 0)
            printf("# p=%d %s%s error feedback: relative error of the sum of %d averages %.2e\n",
                   size, comm_cx_type_name(types[ti]), ti == 1 ? " (nearest)" : "", T, rel);
        if (!(rel < tol[ti]))
            fprintf(stderr, "rank %d: %s: %g >= %g\n", rank, comm_cx_type_name(types[ti]), rel,
                    tol[ti]);
        agree(!(rel < tol[ti]), "error feedback converges");
        comm_cx_destroy(cx);
        free(g), free(acc), free(avg);
    }
}

/* ---- node-aware exchange (fake node split) ---------------------------------------- */

/* Node layouts given through opts.node_of_rank, so the node-aware path runs
 * on one host: at p = 4 two nodes of two ranks, blocked {0,0,1,1} and
 * interleaved {0,1,0,1}; at p = 6 two nodes of three {0,0,0,1,1,1} and
 * three of two {0,1,2,0,1,2}; other rank counts have no equal nodes of > 1 rank and must
 * stay flat. Bound at step 0: stage 1 quantizes each node's dense
 * sum (adds < absmax_b(node sum)/L per node to the sum), stage 2 as flat. */
static int g_nodes[8];
static void tw_nodes(comm_cx_opts *o) {
    o->node_of_rank = g_nodes, o->node_aware = 1;
}
static void tw_nodes_nearest(comm_cx_opts *o) {
    o->node_of_rank = g_nodes, o->node_aware = 1, o->stochastic = 0;
}

static void node_case(comm_cx_type t, int L, int want_hier, size_t n) {
    const char *name = comm_cx_type_name(t);
    size_t B = 256;
    int nn = 0;
    for (int r = 0; r < size; r++)
        nn = g_nodes[r] + 1 > nn ? g_nodes[r] + 1 : nn;
    comm_cx *cx = make(t, n, tw_nodes);
    agree(comm_cx_node_aware(cx) != want_hier, "node-aware mode chosen");
    float *g = malloc(n * sizeof *g);
    double *avg = calloc(n, sizeof *avg), *ns = calloc(n * (size_t)nn, sizeof *ns);
    double *ms = calloc(n, sizeof *ms), *mabs = calloc(n, sizeof *mabs);
    for (int r = 0; r < size; r++)
        for (size_t i = 0; i < n; i++) {
            avg[i] += val(r, i, 0) / (double)size;
            ns[(size_t)g_nodes[r] * n + i] += val(r, i, 0);
        }
    /* per node: stage-1 scale of the node sum; flat: per rank as coded_case */
    int src = want_hier ? nn : size;
    for (int k = 0; k < src; k++)
        for (size_t b0 = 0; b0 < n; b0 += B) {
            size_t b1 = b0 + B < n ? b0 + B : n;
            double amax = 0;
            for (size_t i = b0; i < b1; i++) {
                double v = want_hier ? ns[(size_t)k * n + i] : val(k, i, 0);
                amax = fmax(amax, fabs(v));
            }
            for (size_t i = b0; i < b1; i++) {
                double v = want_hier ? ns[(size_t)k * n + i] : val(k, i, 0);
                ms[i] += (L ? amax / L : 0) / size;
                mabs[i] += fabs(v) / size;
            }
        }
    for (size_t i = 0; i < n; i++)
        g[i] = val(rank, i, 0);
    uint64_t bytes = 0;
    agree(comm_cx_allreduce(cx, g, n, 0, COMM_AVG, &bytes) != 0, name);
    agree(identical(g, n, name), "node-aware identical on all ranks");
    /* the node sums are fp32 sums: a few ulps of the addends on top */
    double worst = 0;
    int bad = check_bound(g, avg, ms, mabs, n, B, t, L, 1e-6, "node-aware", &worst);
    agree(bad, "node-aware error bound");
    /* bytes: compressed 1/q of the buffer between nodes, dense inside */
    uint64_t tot = 0, nb = comm_cx_node_bytes(cx), ntot = 0;
    MPI_Allreduce(&bytes, &tot, 1, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD);
    MPI_Allreduce(&nb, &ntot, 1, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD);
    double mean = (double)tot / size, nmean = (double)ntot / size;
    double want = comm_cx_model_bytes(cx, 1);
    if (want_hier) {
        int q = size / nn;
        /* dense reduce-scatter, all-gather of the encoded segments */
        double wn = (q - 1.0) / q * (4.0 * (double)n + (double)comm_cx_encoded_bytes(t, n, B));
        double inter = 2.0 * (nn - 1) / nn * comm_cx_encoded_bytes(t, n / (size_t)q, B);
        bad = fabs(nmean - wn) > 0.01 * wn + 64 || fabs(mean - (wn + inter)) > 0.01 * want + 64 ||
              fabs(mean - want) > 0.01 * want + 64;
    } else {
        bad = nb != 0 || fabs(mean - want) > 0.01 * want + 64;
    }
    if (bad)
        fprintf(stderr, "rank %d: %s node-aware bytes %lu (mean %.0f, node %.0f), model %.0f\n",
                rank, name, (unsigned long)bytes, mean, nmean, want);
    agree(bad, "node-aware bytes");
    if (rank == 0)
        printf("# p=%d nodes=%d %-5s node-aware %d: max error / bound %.3f, bytes/rank %.0f "
               "(intra-node %.0f)\n",
               size, nn, name, want_hier, worst, mean, nmean);
    comm_cx_destroy(cx);
    free(g), free(avg), free(ns), free(ms), free(mabs);
}

/* error feedback through the node-aware path: the sum of 100 averages of a
 * fixed gradient approaches 100 x the dense average */
static void node_ef_case(comm_cx_type t, int nearest, double tol) {
    size_t n = 4099;
    const int T = 100;
    comm_cx *cx = make(t, n, nearest ? tw_nodes_nearest : tw_nodes);
    float *g = malloc(n * 4);
    double *acc = calloc(n, 8), *avg = calloc(n, 8);
    for (int r = 0; r < size; r++)
        for (size_t i = 0; i < n; i++)
            avg[i] += (double)val(r, i, 0) / size;
    for (int s = 0; s < T; s++) {
        for (size_t i = 0; i < n; i++)
            g[i] = val(rank, i, 0);
        agree(comm_cx_allreduce(cx, g, n, s, COMM_AVG, NULL) != 0, "node ef");
        for (size_t i = 0; i < n; i++)
            acc[i] += g[i];
    }
    agree(identical(g, n, "node ef"), "node ef identical");
    double e = 0, a = 0;
    for (size_t i = 0; i < n; i++)
        e += (acc[i] - T * avg[i]) * (acc[i] - T * avg[i]), a += T * avg[i] * T * avg[i];
    double rel = sqrt(e / a);
    if (rank == 0)
        printf("# p=%d %s%s node-aware %d error feedback: relative error of the sum of %d "
               "averages %.2e\n",
               size, comm_cx_type_name(t), nearest ? " (nearest)" : "", comm_cx_node_aware(cx), T,
               rel);
    agree(!(rel < tol), "node-aware error feedback converges");
    /* the residual covers the whole state: its length as documented */
    size_t len = 0;
    comm_cx_residual(cx, &len);
    agree(len < n, "residual length");
    comm_cx_destroy(cx);
    free(g), free(acc), free(avg);
}

static void test_node_aware(void **st) {
    (void)st;
    static const int l4[2][4] = {{0, 0, 1, 1}, {0, 1, 0, 1}};
    static const int l6[2][6] = {{0, 0, 0, 1, 1, 1}, {0, 1, 2, 0, 1, 2}};
    for (int l = 0; l < 2; l++) {
        if (size == 6)
            memcpy(g_nodes, l6[l], sizeof l6[l]);
        else
            memcpy(g_nodes, l4[l], sizeof l4[l]);
        int hier = size == 4 || size == 6; /* p = 2: one node; p = 3: unequal */
        comm_cx_type types[] = {COMM_CX_FP16, COMM_CX_BF16, COMM_CX_INT8, COMM_CX_INT4,
                                COMM_CX_INT2};
        const int Ls[] = {0, 0, 127, 7, 1};
        for (int k = 0; k < 5; k++)
            node_case(types[k], Ls[k], hier, N);
        /* a large buffer: MPI's rendezvous path for the node segments */
        if (hier) node_case(COMM_CX_INT8, 127, 1, 3 * 65536 * 3 + 7);
        node_ef_case(COMM_CX_INT4, 0, 0.01);
        node_ef_case(COMM_CX_INT2, 1, 0.05);
    }
}

static int setup(void **state) {
    (void)state;
    return comm_ar_create(MPI_COMM_WORLD, NULL, &g_ar);
}
static int teardown(void **state) {
    (void)state;
    comm_ar_destroy(g_ar);
    return 0;
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fp16),
        cmocka_unit_test(test_bf16),
        cmocka_unit_test(test_int8),
        cmocka_unit_test(test_int4),
        cmocka_unit_test(test_int2),
        cmocka_unit_test(test_topk),
        cmocka_unit_test(test_powersgd),
        cmocka_unit_test(test_powersgd_ar),
        cmocka_unit_test(test_warmup_min_ratio),
        cmocka_unit_test(test_error_feedback),
        cmocka_unit_test(test_node_aware),
    };
    int failed = cmocka_run_group_tests(tests, setup, teardown);
    MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    MPI_Finalize();
    return failed ? 1 : 0;
}
