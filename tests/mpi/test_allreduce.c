// mpi-ranks: 1 2 3 4 5 6 7 8
/* test_allreduce: every all-reduce algorithm of comm/allreduce.h under
 * mpirun at 1..8 ranks. Checks exact sums of integer-valued data, fp32
 * tolerance against a double reference on random data, AVG, bitwise equal
 * results on all ranks, hierarchical with forced and detected node groups
 * (also every inter-node algorithm), parameter server co-located and with
 * dedicated servers, messages split at a small max_msg, argument errors and
 * the cost model. Every check is agreed over all ranks (MPI_Allreduce of the
 * failure count) before asserting, so a failure on any rank fails every rank
 * and none is left waiting in a collective. Not here: speed (bench/).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <float.h>
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm/allreduce.h"
#include "comm/topo.h"

#define BIG (((size_t)1 << 20) + 3)

typedef struct {
    int rank, size;
    comm_ar *flat;  /* defaults, detected nodes */
    comm_ar *pairs; /* node = rank / 2 */
    comm_ar *slice; /* node = rank / 2, sliced hierarchical */
    comm_ar *mod3;  /* node = rank % 3: non-contiguous nodes; inter_msg = 700 */
    comm_ar *ps1;   /* last rank a dedicated server (size > 1) */
    comm_ar *ps2;   /* last two ranks dedicated servers (size > 2) */
    comm_ar *small; /* max_msg = 1000, node = rank / 3 */
    float *buf, *ref0;
    /* reference per data kind: sum and sum of |x| over ranks < ref_nw of
     * element i (independent of the count), valid for i < ref_len */
    double *ref_s[2], *ref_a[2];
    int ref_nw[2];
    size_t ref_len[2];
} fixture;

enum { INTS, RANDS };

/* ---- data ---------------------------------------------------------------- */

static float ival(int r, size_t i) {
    return (float)((int)((r * 7 + i * 13) % 17) - 8);
}

static float rval(int r, size_t i) {
    uint64_t z = ((uint64_t)r << 40) ^ (uint64_t)i ^ 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z ^= z >> 31;
    /* full 24-bit mantissas at magnitudes 2^-3..2^4, so sums must round */
    double u = (double)(z >> 11) / (double)(1ULL << 53) * 2.0 - 1.0;
    return (float)ldexp(u, (int)(z & 7) - 3);
}

static float val(int kind, int r, size_t i) {
    return kind == INTS ? ival(r, i) : rval(r, i);
}

/* ---- agreement ------------------------------------------------------------ */

/* Every rank learns whether any rank failed, then all assert together. */
static void agree(int local_fail, const char *what) {
    int any = 0;
    MPI_Allreduce(&local_fail, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    if (any) fail_msg("%s failed on some rank (see stderr)", what);
}

/* Rank 0's buffer broadcast and compared bitwise on ranks < nw. */
static int check_identical(fixture *fx, const float *buf, size_t n, int nw, const char *what) {
    if (n == 0) return 0;
    if (fx->rank == 0) memcpy(fx->ref0, buf, n * sizeof *buf);
    MPI_Bcast(fx->ref0, (int)n, MPI_FLOAT, 0, MPI_COMM_WORLD);
    if (fx->rank >= nw || !memcmp(fx->ref0, buf, n * sizeof *buf)) return 0;
    for (size_t i = 0; i < n; i++)
        if (memcmp(&fx->ref0[i], &buf[i], sizeof *buf)) {
            fprintf(stderr, "rank %d: %s: [%zu] = %.9g differs from rank 0's %.9g\n", fx->rank,
                    what, i, buf[i], fx->ref0[i]);
            break;
        }
    return 1;
}

/* Reference sums of ranks < nw for elements < n, cached across calls. */
static void reference(fixture *fx, int kind, int nw, size_t n, const double **sum,
                      const double **abs_sum) {
    if (fx->ref_nw[kind] != nw) fx->ref_nw[kind] = nw, fx->ref_len[kind] = 0;
    for (size_t i = fx->ref_len[kind]; i < n; i++) {
        double s = 0, a = 0;
        for (int r = 0; r < nw; r++) {
            double v = val(kind, r, i);
            s += v;
            a += fabs(v);
        }
        fx->ref_s[kind][i] = s, fx->ref_a[kind][i] = a;
    }
    if (n > fx->ref_len[kind]) fx->ref_len[kind] = n;
    *sum = fx->ref_s[kind], *abs_sum = fx->ref_a[kind];
}

/* Compares buf with the sum (or average) over ranks < nw of val(kind, ...):
 * exact for INTS, within fp32 summation error for RANDS. */
static int check_values(fixture *fx, const float *buf, size_t n, int nw, int kind, comm_op op,
                        const char *what) {
    const double *rs, *ra;
    if (fx->rank >= nw) return 0;
    reference(fx, kind, nw, n, &rs, &ra);
    for (size_t i = 0; i < n; i++) {
        double s = rs[i], a = ra[i];
        int bad;
        double want = op == COMM_AVG ? s / nw : s;
        if (kind == INTS) {
            float w = op == COMM_AVG ? (float)s / (float)nw : (float)s;
            bad = memcmp(&w, &buf[i], sizeof w) != 0;
        } else {
            double tol = nw * FLT_EPSILON * a + 1e-30;
            if (op == COMM_AVG) tol = (tol + FLT_EPSILON * fabs(s)) / nw;
            bad = !(fabs(buf[i] - want) <= tol);
        }
        if (bad) {
            fprintf(stderr, "rank %d: %s: [%zu] = %.9g, want %.9g\n", fx->rank, what, i, buf[i],
                    want);
            return 1;
        }
    }
    return 0;
}

/* One call of `algo` on ctx: data of `kind` (ranks >= nw get garbage, which
 * must be ignored), then values and identity checked. Returns failures. */
static int run_case(fixture *fx, comm_ar *ctx, const comm_ar_algo *algo, size_t n, int nw, int kind,
                    comm_op op, const char *label) {
    char what[160];
    snprintf(what, sizeof what, "%s %s n=%zu %s %s", label, algo->name, n,
             kind == INTS ? "ints" : "random", op == COMM_AVG ? "avg" : "sum");
    for (size_t i = 0; i < n; i++)
        fx->buf[i] = fx->rank < nw ? val(kind, fx->rank, i) : 12345.f;
    int rc = algo->fn(ctx, n ? fx->buf : NULL, n, op);
    int bad = rc != 0;
    if (bad) fprintf(stderr, "rank %d: %s returned %d\n", fx->rank, what, rc);
    /* collective: always run the identity check so no rank skips a Bcast */
    bad |= check_identical(fx, fx->buf, n, nw, what);
    if (!bad) bad |= check_values(fx, fx->buf, n, nw, kind, op, what);
    return bad;
}

static size_t counts(const fixture *fx, size_t out[5]) {
    out[0] = 0, out[1] = 1, out[2] = (size_t)fx->size - 1, out[3] = 1000, out[4] = BIG;
    return 5;
}

/* ---- tests ------------------------------------------------------------------- */

static void test_table(void **state) {
    (void)state;
    const char *names[] = {"ring", "recursive_doubling", "rabenseifner",
                           "tree", "parameter_server",   "hierarchical",
                           "mpi"};
    size_t k = 0;
    for (const comm_ar_algo *a = comm_ar_algos; a->name; a++, k++) {
        assert_non_null(a->fn);
        assert_non_null(a->cost);
        assert_ptr_equal(comm_ar_find(a->name), a);
    }
    assert_int_equal(k, sizeof names / sizeof names[0]);
    for (size_t i = 0; i < k; i++)
        assert_non_null(comm_ar_find(names[i]));
    assert_null(comm_ar_find("nope"));
    assert_null(comm_ar_find(NULL));
}

/* integer data, SUM: exact, every algorithm, every count */
static void test_sum_exact(void **state) {
    fixture *fx = *state;
    size_t c[5];
    int bad = 0;
    for (const comm_ar_algo *a = comm_ar_algos; a->name; a++)
        for (size_t k = 0, m = counts(fx, c); k < m; k++)
            bad += run_case(fx, fx->flat, a, c[k], fx->size, INTS, COMM_SUM, "flat");
    agree(bad, "exact sums");
}

/* integer data, AVG: exactly sum / p */
static void test_avg_exact(void **state) {
    fixture *fx = *state;
    size_t c[5];
    int bad = 0;
    for (const comm_ar_algo *a = comm_ar_algos; a->name; a++)
        for (size_t k = 0, m = counts(fx, c); k < m; k++)
            bad += run_case(fx, fx->flat, a, c[k], fx->size, INTS, COMM_AVG, "flat");
    agree(bad, "exact averages");
}

/* random data: SUM and AVG within fp32 error of a double reference */
static void test_random(void **state) {
    fixture *fx = *state;
    size_t c[5];
    int bad = 0;
    for (const comm_ar_algo *a = comm_ar_algos; a->name; a++)
        for (size_t k = 0, m = counts(fx, c); k < m; k++) {
            bad += run_case(fx, fx->flat, a, c[k], fx->size, RANDS, COMM_SUM, "flat");
            bad += run_case(fx, fx->flat, a, c[k], fx->size, RANDS, COMM_AVG, "flat");
        }
    agree(bad, "random sums/averages");
}

/* hierarchical under forced groupings (rank/2, rank%3) and the detected one,
 * with every inter-node algorithm */
static void test_hierarchical(void **state) {
    fixture *fx = *state;
    const comm_ar_algo *h = comm_ar_find("hierarchical");
    const char *inter[] = {"ring", "recursive_doubling", "rabenseifner",
                           "tree", "parameter_server",   "mpi"};
    struct {
        comm_ar *ctx;
        const char *label;
    } g[] = {{fx->pairs, "rank/2"},
             {fx->slice, "rank/2 sliced"},
             {fx->mod3, "rank%3"},
             {fx->flat, "detected"}};
    size_t c[5];
    int bad = 0, nodes[8], n_host = 0;
    assert_non_null(h);
    /* node counts */
    bad |= comm_ar_n_nodes(fx->pairs) != (fx->size + 1) / 2;
    bad |= comm_ar_n_nodes(fx->mod3) != (fx->size < 3 ? fx->size : 3);
    bad |= comm_topo_groups(MPI_COMM_WORLD, COMM_TOPO_HOSTNAME, nodes, &n_host) != 0;
    bad |= comm_ar_n_nodes(fx->flat) != n_host;
    if (bad) fprintf(stderr, "rank %d: wrong node counts\n", fx->rank);
    for (size_t gi = 0; gi < sizeof g / sizeof g[0]; gi++) {
        for (size_t ii = 0; ii < sizeof inter / sizeof inter[0]; ii++) {
            char label[96];
            snprintf(label, sizeof label, "hier[%s, inter %s]", g[gi].label, inter[ii]);
            bad |= comm_ar_set_inter(g[gi].ctx, inter[ii]) != 0;
            for (size_t k = 0, m = counts(fx, c); k < m; k++) {
                bad += run_case(fx, g[gi].ctx, h, c[k], fx->size, INTS, COMM_SUM, label);
                if (c[k] == 1000)
                    bad += run_case(fx, g[gi].ctx, h, c[k], fx->size, RANDS, COMM_AVG, label);
            }
        }
        bad |= comm_ar_set_inter(g[gi].ctx, "rabenseifner") != 0;
    }
    agree(bad, "hierarchical");
}

/* dedicated servers: one (p > 1) and two (p > 2); every algorithm on that
 * context treats the servers as contributing nothing */
static void test_dedicated_servers(void **state) {
    fixture *fx = *state;
    comm_ar *ctx[2] = {fx->ps1, fx->ps2};
    size_t c[5];
    int bad = 0;
    for (int s = 0; s < 2; s++) {
        if (!ctx[s]) continue;
        int nw = fx->size - 1 - s;
        char label[32];
        snprintf(label, sizeof label, "ps_ranks=%d", s + 1);
        for (const comm_ar_algo *a = comm_ar_algos; a->name; a++)
            for (size_t k = 0, m = counts(fx, c); k < m; k++) {
                /* the big count only for parameter_server itself (time) */
                if (c[k] == BIG && strcmp(a->name, "parameter_server")) continue;
                bad += run_case(fx, ctx[s], a, c[k], nw, INTS, COMM_SUM, label);
                bad += run_case(fx, ctx[s], a, c[k], nw, RANDS, COMM_AVG, label);
            }
    }
    agree(bad, "dedicated parameter servers");
}

/* max_msg = 1000 elements: every transfer is split into many messages;
 * inter_msg = 700 (node = rank % 3): transfers between nodes only, more
 * pieces than the window of 64 at the largest count */
static void test_split_messages(void **state) {
    fixture *fx = *state;
    size_t c[] = {999, 1001, (size_t)1000 * fx->size + 1, 100003};
    int bad = 0;
    bad |= comm_ar_inter_msg(fx->mod3) != 700 || comm_ar_inter_msg(fx->small) != 1000;
    for (const comm_ar_algo *a = comm_ar_algos; a->name; a++)
        for (size_t k = 0; k < sizeof c / sizeof c[0]; k++) {
            bad += run_case(fx, fx->small, a, c[k], fx->size, INTS, COMM_SUM, "max_msg=1000");
            bad += run_case(fx, fx->mod3, a, c[k], fx->size, INTS, COMM_SUM, "inter_msg=700");
        }
    agree(bad, "split messages");
}

static void test_errors(void **state) {
    fixture *fx = *state;
    comm_ar *ar = NULL;
    comm_ar_opts o = {0};
    int bad = 0, rc;
    float x = 1;
    fprintf(stderr, "rank %d: (errors expected below)\n", fx->rank);
    o.ps_ranks = fx->size;
    bad |= comm_ar_create(MPI_COMM_WORLD, &o, &ar) != COMM_ERR_ARG || ar != NULL;
    o.ps_ranks = -1;
    bad |= comm_ar_create(MPI_COMM_WORLD, &o, &ar) != COMM_ERR_ARG || ar != NULL;
    o.ps_ranks = 0;
    o.inter = "hierarchical";
    bad |= comm_ar_create(MPI_COMM_WORLD, &o, &ar) != COMM_ERR_ARG || ar != NULL;
    o.inter = NULL;
    int nodes[8];
    for (int i = 0; i < fx->size; i++)
        nodes[i] = (fx->rank == 0 && i == 0) ? 5 : 0;
    o.node_of_rank = nodes; /* rank 0 disagrees (when p > 1) */
    rc = comm_ar_create(MPI_COMM_WORLD, &o, &ar);
    if (fx->size > 1) {
        bad |= rc != COMM_ERR_ARG || ar != NULL;
    } else {
        bad |= rc != 0;
        comm_ar_destroy(ar);
        ar = NULL;
    }
    nodes[0] = -1;
    for (int i = 1; i < fx->size; i++)
        nodes[i] = 0;
    bad |= comm_ar_create(MPI_COMM_WORLD, &o, &ar) != COMM_ERR_ARG || ar != NULL;
    bad |= comm_ar_create(MPI_COMM_WORLD, NULL, NULL) != COMM_ERR_ARG;
    bad |= comm_ar_ring(fx->flat, NULL, 3, COMM_SUM) != COMM_ERR_ARG;
    bad |= comm_ar_ring(fx->flat, &x, 1, (comm_op)7) != COMM_ERR_ARG;
    bad |= comm_ar_ring(NULL, &x, 1, COMM_SUM) != COMM_ERR_ARG;
    bad |= comm_ar_set_inter(fx->flat, "hierarchical") != COMM_ERR_ARG;
    bad |= comm_ar_set_inter(fx->flat, "nope") != COMM_ERR_ARG;
    comm_ar_destroy(NULL);
    /* the MPI error path: a message and COMM_ERR_MPI */
    bad |= comm_mpi_error(MPI_ERR_COUNT, __FILE__, __LINE__, "(test) MPI_Send") != COMM_ERR_MPI;
    fprintf(stderr, "rank %d: (end of expected errors)\n", fx->rank);
    if (bad) fprintf(stderr, "rank %d: an argument error was not reported\n", fx->rank);
    agree(bad, "argument errors");
}

static void test_bytes_sent(void **state) {
    fixture *fx = *state;
    uint64_t b0 = comm_ar_bytes_sent(fx->flat);
    size_t n = 1000;
    for (size_t i = 0; i < n; i++)
        fx->buf[i] = 1;
    int bad = comm_ar_ring(fx->flat, fx->buf, n, COMM_SUM) != 0;
    uint64_t sent = comm_ar_bytes_sent(fx->flat) - b0;
    /* ring: 2 (p-1) chunks of n/p (+1) elements */
    uint64_t lo = 2 * (uint64_t)(fx->size - 1) * (n / fx->size) * 4;
    uint64_t hi = 2 * (uint64_t)(fx->size - 1) * (n / fx->size + 1) * 4;
    bad |= sent < lo || sent > hi;
    /* sliced hierarchical at 4 ranks on 2 nodes of 2 (inter rabenseifner on
     * the n/2 slice): every rank sends n/2 (ring reduce-scatter) + n/4 + n/4
     * (inter) + n/2 (ring all-gather) = 1.5 n floats; the leader scheme
     * sends n from the non-leaders and 2n from the leaders */
    if (fx->size == 4) {
        size_t m = 4096;
        for (size_t i = 0; i < m; i++)
            fx->buf[i] = 1;
        bad |= comm_ar_set_inter(fx->slice, "rabenseifner") != 0;
        b0 = comm_ar_bytes_sent(fx->slice);
        bad |= comm_ar_hierarchical(fx->slice, fx->buf, m, COMM_SUM) != 0 || fx->buf[m - 1] != 4;
        sent = comm_ar_bytes_sent(fx->slice) - b0;
        if (sent != 3 * m / 2 * 4)
            bad = 1,
            fprintf(stderr, "rank %d: sliced sent %llu B\n", fx->rank, (unsigned long long)sent);
    }
    agree(bad, "bytes_sent");
}

static void test_model(void **state) {
    (void)state;
    double a = 2e-6, b = 1e-10, g = 5e-11;
    for (const comm_ar_algo *x = comm_ar_algos; x->name; x++) {
        if (!strcmp(x->name, "hierarchical")) {
            assert_true(comm_ar_model_time(x->name, 8, 1000, a, b, g) < 0);
            continue;
        }
        assert_true(comm_ar_model_time(x->name, 1, 1 << 20, a, b, g) == 0);
        assert_true(comm_ar_model_time(x->name, 8, 1 << 20, a, b, g) > 0);
    }
    assert_true(comm_ar_model_time("nope", 8, 1000, a, b, g) < 0);
    /* small messages: latency-bound, recursive doubling beats ring */
    assert_true(comm_ar_model_time("recursive_doubling", 64, 8, a, b, g) <
                comm_ar_model_time("ring", 64, 8, a, b, g));
    /* large messages: bandwidth-bound, Rabenseifner and ring beat doubling */
    assert_true(comm_ar_model_time("rabenseifner", 64, 1 << 26, a, b, g) <
                comm_ar_model_time("recursive_doubling", 64, 1 << 26, a, b, g));
    assert_true(comm_ar_model_time("ring", 64, 1 << 26, a, b, g) <
                comm_ar_model_time("tree", 64, 1 << 26, a, b, g));
    /* ring at p = 4, n = 1 MB by hand: 6a + 1.5 n b + 0.75 n g */
    double n = 1 << 20;
    assert_true(fabs(comm_ar_model_time("ring", 4, 1 << 20, a, b, g) -
                     (6 * a + 1.5 * n * b + 0.75 * n * g)) < 1e-15);
    /* non-power of two pays the fold */
    assert_true(comm_ar_model_time("rabenseifner", 5, 1 << 20, a, b, g) >
                comm_ar_model_time("rabenseifner", 4, 1 << 20, a, b, g));
    double mpi = comm_ar_model_time("mpi", 16, 1 << 20, a, b, g);
    assert_true(mpi <= comm_ar_model_time("ring", 16, 1 << 20, a, b, g));
    assert_true(mpi <= comm_ar_model_time("rabenseifner", 16, 1 << 20, a, b, g));
    /* hierarchical: slow inter-node links make it cheaper than flat ring */
    double hier = comm_ar_model_time_hier(4, 8, 1 << 20, 1e-6, 1e-11, "ring", 5e-5, 1e-9, g);
    assert_true(hier > 0);
    assert_true(hier < comm_ar_model_time("ring", 32, 1 << 20, 5e-5, 1e-9, g));
    assert_true(comm_ar_model_time_hier(4, 8, 1000, 1e-6, 1e-11, "hierarchical", a, b, g) < 0);
}

/* the checkers themselves must be able to fail */
static void test_checkers_fail(void **state) {
    fixture *fx = *state;
    size_t n = 100;
    int bad_id, bad_val;
    fprintf(stderr, "rank %d: (mismatch reports expected below)\n", fx->rank);
    for (size_t i = 0; i < n; i++)
        fx->buf[i] = ival(0, i) * fx->size;
    fx->buf[7] += (float)fx->rank; /* differs across ranks when p > 1 */
    bad_id = check_identical(fx, fx->buf, n, fx->size, "checker self-test");
    MPI_Allreduce(MPI_IN_PLACE, &bad_id, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    assert_int_equal(bad_id, fx->size > 1);
    for (size_t i = 0; i < n; i++)
        fx->buf[i] = 0;
    for (int r = 0; r < fx->size; r++)
        for (size_t i = 0; i < n; i++)
            fx->buf[i] += ival(r, i);
    assert_int_equal(check_values(fx, fx->buf, n, fx->size, INTS, COMM_SUM, "self"), 0);
    fx->buf[n - 1] += 1;
    bad_val = check_values(fx, fx->buf, n, fx->size, INTS, COMM_SUM, "checker self-test");
    assert_int_equal(bad_val, 1);
    for (size_t i = 0; i < n; i++)
        fx->buf[i] = 0;
    for (int r = 0; r < fx->size; r++)
        for (size_t i = 0; i < n; i++)
            fx->buf[i] += rval(r, i);
    assert_int_equal(check_values(fx, fx->buf, n, fx->size, RANDS, COMM_SUM, "self"), 0);
    fx->buf[3] += 1e-3f; /* the random-data tolerance is far tighter than this */
    assert_int_equal(check_values(fx, fx->buf, n, fx->size, RANDS, COMM_SUM, "checker self-test"),
                     1);
    fprintf(stderr, "rank %d: (end of expected mismatch reports)\n", fx->rank);
}

/* ---- fixture ------------------------------------------------------------------- */

static int setup(void **state) {
    fixture *fx = calloc(1, sizeof *fx);
    int rc = 0, nodes[8];
    if (!fx) return -1;
    MPI_Comm_rank(MPI_COMM_WORLD, &fx->rank);
    MPI_Comm_size(MPI_COMM_WORLD, &fx->size);
    if (fx->size > 8) {
        fprintf(stderr, "test_allreduce supports at most 8 ranks\n");
        free(fx);
        return -1;
    }
    comm_ar_opts o = {0};
    rc |= comm_ar_create(MPI_COMM_WORLD, NULL, &fx->flat);
    for (int i = 0; i < fx->size; i++)
        nodes[i] = i / 2;
    o.node_of_rank = nodes;
    rc |= comm_ar_create(MPI_COMM_WORLD, &o, &fx->pairs);
    o.hier_sliced = 1;
    rc |= comm_ar_create(MPI_COMM_WORLD, &o, &fx->slice);
    o.hier_sliced = 0;
    for (int i = 0; i < fx->size; i++)
        nodes[i] = i % 3;
    o.inter_msg = 700;
    rc |= comm_ar_create(MPI_COMM_WORLD, &o, &fx->mod3);
    o.inter_msg = 0;
    for (int i = 0; i < fx->size; i++)
        nodes[i] = i / 3;
    o.max_msg = 1000;
    o.inter = "ring";
    o.hier_sliced = 1; /* nodes of 3: sliced at 3 and 6 ranks */
    rc |= comm_ar_create(MPI_COMM_WORLD, &o, &fx->small);
    o = (comm_ar_opts){0};
    if (fx->size > 1) {
        o.ps_ranks = 1;
        rc |= comm_ar_create(MPI_COMM_WORLD, &o, &fx->ps1);
    }
    if (fx->size > 2) {
        o.ps_ranks = 2;
        rc |= comm_ar_create(MPI_COMM_WORLD, &o, &fx->ps2);
    }
    fx->buf = malloc(BIG * sizeof *fx->buf);
    fx->ref0 = malloc(BIG * sizeof *fx->ref0);
    if (!fx->buf || !fx->ref0) rc = -1;
    for (int k = 0; k < 2; k++) {
        fx->ref_s[k] = malloc(BIG * sizeof(double));
        fx->ref_a[k] = malloc(BIG * sizeof(double));
        if (!fx->ref_s[k] || !fx->ref_a[k]) rc = -1;
    }
    *state = fx;
    /* all ranks run the tests or none does */
    MPI_Allreduce(MPI_IN_PLACE, &rc, 1, MPI_INT, MPI_BOR, MPI_COMM_WORLD);
    return rc;
}

static int teardown(void **state) {
    fixture *fx = *state;
    if (!fx) return 0;
    comm_ar_destroy(fx->ps2);
    comm_ar_destroy(fx->ps1);
    comm_ar_destroy(fx->small);
    comm_ar_destroy(fx->mod3);
    comm_ar_destroy(fx->slice);
    comm_ar_destroy(fx->pairs);
    comm_ar_destroy(fx->flat);
    free(fx->buf);
    free(fx->ref0);
    for (int k = 0; k < 2; k++)
        free(fx->ref_s[k]), free(fx->ref_a[k]);
    free(fx);
    return 0;
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_table),
        cmocka_unit_test(test_model),
        cmocka_unit_test(test_checkers_fail),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_sum_exact),
        cmocka_unit_test(test_avg_exact),
        cmocka_unit_test(test_random),
        cmocka_unit_test(test_hierarchical),
        cmocka_unit_test(test_dedicated_servers),
        cmocka_unit_test(test_split_messages),
        cmocka_unit_test(test_bytes_sent),
    };
    int failed = cmocka_run_group_tests(tests, setup, teardown);
    /* all ranks agree on the exit status */
    MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    MPI_Finalize();
    return failed ? 1 : 0;
}
