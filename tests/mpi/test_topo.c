// mpi-ranks: 1 2 3 4
/* test_topo: node grouping (comm/topo.h). The latency clustering runs on
 * synthetic matrices (two nodes, interleaved placement, uneven nodes, three
 * levels, noise, one class, bad input); the MPI part checks that the
 * shared-memory split, host names and measured latencies give a valid,
 * rank-independent grouping here. Not here: the emulated multi-node cluster
 * (tests/e2e), where the latency method meets real inter-node links.
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
#include "comm/topo.h"

#define MAXP 16

static void agree(int local_fail, const char *what) {
    int any = 0;
    MPI_Allreduce(&local_fail, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    if (any) fail_msg("%s failed on some rank (see stderr)", what);
}

/* deterministic noise in [0, 1) */
static double noise(int i, int j, unsigned seed) {
    uint64_t z = (uint64_t)i * 0x9e3779b97f4a7c15ULL ^ (uint64_t)j * 0xbf58476d1ce4e5b9ULL ^ seed;
    z = (z ^ (z >> 29)) * 0x94d049bb133111ebULL;
    return (double)((z ^ (z >> 32)) & 0xffffff) / (double)0x1000000;
}

/* lat[i][j] = intra if node[i] == node[j] else inter, times (1 + jitter*noise) */
static void synth(double *lat, int p, const int *node, double intra, double inter, double jitter) {
    for (int i = 0; i < p; i++)
        for (int j = 0; j < p; j++)
            lat[i * p + j] = i == j ? 0
                                    : (node[i] == node[j] ? intra : inter) *
                                          (1 + jitter * noise(i < j ? i : j, i < j ? j : i, 7));
}

static void expect_groups(const double *lat, int p, const int *want, int want_n) {
    int got[MAXP], n = -1;
    assert_int_equal(comm_topo_cluster(lat, p, 0, got, &n), 0);
    assert_int_equal(n, want_n);
    for (int i = 0; i < p; i++)
        assert_int_equal(got[i], want[i]);
}

static void test_cluster_two_nodes(void **state) {
    (void)state;
    double lat[MAXP * MAXP];
    int node[8] = {0, 0, 0, 0, 1, 1, 1, 1};
    synth(lat, 8, node, 1e-6, 2e-5, 0.3);
    expect_groups(lat, 8, node, 2);
}

static void test_cluster_interleaved(void **state) {
    (void)state;
    double lat[MAXP * MAXP];
    /* round-robin placement: ranks 0,2,4 on one node, 1,3,5 on another */
    int node[6] = {0, 1, 0, 1, 0, 1};
    synth(lat, 6, node, 5e-7, 1e-5, 0.2);
    expect_groups(lat, 6, node, 2);
}

static void test_cluster_uneven(void **state) {
    (void)state;
    double lat[MAXP * MAXP];
    /* labels out of order: numbering must follow the lowest rank */
    int node[7] = {3, 3, 9, 9, 9, 1, 1}, want[7] = {0, 0, 1, 1, 1, 2, 2};
    synth(lat, 7, node, 1e-6, 1e-5, 0.5);
    expect_groups(lat, 7, want, 3);
}

static void test_cluster_singleton(void **state) {
    (void)state;
    double lat[MAXP * MAXP];
    /* a big node and a lone rank: most pairs are intra-node */
    int node[8] = {0, 0, 0, 1, 0, 0, 0, 0};
    synth(lat, 8, node, 1e-6, 8e-6, 0.3);
    expect_groups(lat, 8, node, 2);
}

static void test_cluster_three_levels(void **state) {
    (void)state;
    double lat[MAXP * MAXP];
    /* 2 nodes x 2 sockets x 2 cores: socket 0.4 us, node 1 us, network 20 us;
     * the largest gap is the network one */
    int p = 8, want[8] = {0, 0, 0, 0, 1, 1, 1, 1};
    for (int i = 0; i < p; i++)
        for (int j = 0; j < p; j++)
            lat[i * p + j] = i == j ? 0 : i / 4 != j / 4 ? 2e-5 : i / 2 != j / 2 ? 1e-6 : 4e-7;
    expect_groups(lat, p, want, 2);
}

static void test_cluster_one_class(void **state) {
    (void)state;
    double lat[MAXP * MAXP];
    int node[MAXP] = {0}, zero[MAXP] = {0};
    /* one node, noisy within 2x: one group */
    synth(lat, 12, node, 1e-6, 1e-6, 1.0);
    expect_groups(lat, 12, zero, 1);
    /* every rank its own node: also a single class, so one group */
    for (int i = 0; i < 5; i++)
        node[i] = i;
    synth(lat, 5, node, 1e-6, 3e-5, 0.1);
    expect_groups(lat, 5, zero, 1);
    /* p = 1 and p = 2: nothing to compare */
    expect_groups(lat, 1, zero, 1);
    expect_groups(lat, 2, zero, 1);
}

static void test_cluster_asymmetric(void **state) {
    (void)state;
    double lat[MAXP * MAXP];
    int node[4] = {0, 0, 1, 1};
    synth(lat, 4, node, 1e-6, 1e-5, 0.0);
    lat[0 * 4 + 1] = 0.5e-6, lat[1 * 4 + 0] = 1.5e-6; /* directions averaged */
    expect_groups(lat, 4, node, 2);
}

static void test_cluster_bad_input(void **state) {
    (void)state;
    double lat[4] = {0, -1, -1, 0};
    int g[2], n;
    fprintf(stderr, "(errors expected below)\n");
    assert_int_equal(comm_topo_cluster(lat, 2, 0, g, &n), COMM_ERR_ARG);
    lat[1] = lat[2] = NAN;
    assert_int_equal(comm_topo_cluster(lat, 2, 0, g, &n), COMM_ERR_ARG);
    assert_int_equal(comm_topo_cluster(lat, 0, 0, g, &n), COMM_ERR_ARG);
    assert_int_equal(comm_topo_cluster(NULL, 2, 0, g, &n), COMM_ERR_ARG);
    fprintf(stderr, "(end of expected errors)\n");
}

static void test_canonical(void **state) {
    (void)state;
    int l[6] = {7, 7, -2, 7, 40, -2}, want[6] = {0, 0, 1, 0, 2, 1};
    assert_int_equal(comm_topo_canonical(l, 6), 3);
    for (int i = 0; i < 6; i++)
        assert_int_equal(l[i], want[i]);
}

/* valid grouping: ids 0..n-1 numbered by lowest rank, same on every rank */
static int check_grouping(const int *g, int p, int n, const char *what) {
    int bad = n < 1 || n > p, next = 0, all[MAXP * 2];
    for (int i = 0; i < p && !bad; i++) {
        if (g[i] < 0 || g[i] > next) bad = 1;
        if (g[i] == next) next++;
    }
    bad |= next != n;
    memcpy(all, g, (size_t)p * sizeof *g);
    MPI_Bcast(all, p, MPI_INT, 0, MPI_COMM_WORLD);
    bad |= memcmp(all, g, (size_t)p * sizeof *g) != 0;
    if (bad) fprintf(stderr, "%s: invalid grouping (n = %d)\n", what, n);
    return bad;
}

static void test_detect(void **state) {
    (void)state;
    int rank, p, g[MAXP], n = 0, bad = 0, g_host[MAXP], n_host = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &p);
    bad |= comm_topo_groups(MPI_COMM_WORLD, COMM_TOPO_SHARED, g, &n) != 0;
    bad |= check_grouping(g, p, n, "shared");
    bad |= comm_topo_groups(MPI_COMM_WORLD, COMM_TOPO_HOSTNAME, g_host, &n_host) != 0;
    bad |= check_grouping(g_host, p, n_host, "hostname");
    /* on one host (mpirun here) both say the same */
    bad |= n != n_host || memcmp(g, g_host, (size_t)p * sizeof *g) != 0;
    bad |= comm_topo_groups(MPI_COMM_WORLD, COMM_TOPO_LATENCY, g, &n) != 0;
    bad |= check_grouping(g, p, n, "latency");
    bad |= comm_topo_groups(MPI_COMM_WORLD, (comm_topo_method)42, g, &n) != COMM_ERR_ARG;
    agree(bad, "node detection");
}

static void test_latency_matrix(void **state) {
    (void)state;
    int rank, p, bad = 0;
    double lat[MAXP * MAXP], all[MAXP * MAXP];
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &p);
    bad |= comm_topo_latency(MPI_COMM_WORLD, 3, 8, lat) != 0;
    for (int i = 0; i < p; i++)
        for (int j = 0; j < p; j++) {
            double v = lat[i * p + j];
            if (i == j)
                bad |= v != 0;
            else
                bad |= !(v > 0 && v < 10) || v != lat[j * p + i];
        }
    memcpy(all, lat, sizeof(double) * (size_t)(p * p));
    MPI_Bcast(all, p * p, MPI_DOUBLE, 0, MPI_COMM_WORLD);
    bad |= memcmp(all, lat, sizeof(double) * (size_t)(p * p)) != 0;
    if (bad) fprintf(stderr, "rank %d: bad latency matrix\n", rank);
    agree(bad, "latency matrix");
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int p;
    MPI_Comm_size(MPI_COMM_WORLD, &p);
    if (p > MAXP) {
        fprintf(stderr, "test_topo supports at most %d ranks\n", MAXP);
        MPI_Finalize();
        return 1;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_canonical),           cmocka_unit_test(test_cluster_two_nodes),
        cmocka_unit_test(test_cluster_interleaved), cmocka_unit_test(test_cluster_uneven),
        cmocka_unit_test(test_cluster_singleton),   cmocka_unit_test(test_cluster_three_levels),
        cmocka_unit_test(test_cluster_one_class),   cmocka_unit_test(test_cluster_asymmetric),
        cmocka_unit_test(test_cluster_bad_input),   cmocka_unit_test(test_detect),
        cmocka_unit_test(test_latency_matrix),
    };
    int failed = cmocka_run_group_tests(tests, NULL, NULL);
    MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    MPI_Finalize();
    return failed ? 1 : 0;
}
