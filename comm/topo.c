/* comm_topo: node grouping by shared-memory split, host name or measured
 * latency (see topo.h). Not here: bandwidth probes, algorithm selection. */
#include "comm/topo.h"

#include "comm/allreduce.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { TOPO_TAG_PING = 7201, TOPO_TAG_PONG = 7202 };

int comm_topo_canonical(int *labels, int p) {
    /* downwards: labels[i] = first index with the same label (indices below
     * i are still untouched); upwards: representatives get new numbers */
    for (int i = p - 1; i >= 0; i--) {
        int j = 0;
        while (labels[j] != labels[i])
            j++;
        labels[i] = j;
    }
    int n = 0;
    for (int i = 0; i < p; i++)
        labels[i] = labels[i] == i ? n++ : labels[labels[i]];
    return n;
}

static int topo_shared(MPI_Comm comm, int rank, int *node_of_rank) {
    int err = 0, leader = rank;
    MPI_Comm node = MPI_COMM_NULL;
    MPI_CHECK(MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node));
    MPI_CHECK(MPI_Comm_set_errhandler(node, MPI_ERRORS_RETURN));
    /* key = rank, so node rank 0 is the node's lowest rank */
    MPI_CHECK(MPI_Bcast(&leader, 1, MPI_INT, 0, node));
    MPI_CHECK(MPI_Allgather(&leader, 1, MPI_INT, node_of_rank, 1, MPI_INT, comm));
done:
    if (node != MPI_COMM_NULL) MPI_Comm_free(&node);
    return err;
}

static int topo_hostname(MPI_Comm comm, int rank, int size, int *node_of_rank) {
    int err = 0, len = 0;
    char *names = calloc((size_t)size, MPI_MAX_PROCESSOR_NAME);
    char me[MPI_MAX_PROCESSOR_NAME] = {0};
    if (!names) {
        fprintf(stderr, "%s:%d: rank %d: out of memory\n", __FILE__, __LINE__, rank);
        return COMM_ERR_NOMEM; /* allocation size is the same on all ranks */
    }
    MPI_CHECK(MPI_Get_processor_name(me, &len));
    MPI_CHECK(MPI_Allgather(me, MPI_MAX_PROCESSOR_NAME, MPI_CHAR, names, MPI_MAX_PROCESSOR_NAME,
                            MPI_CHAR, comm));
    for (int i = 0; i < size; i++) {
        int j = 0;
        while (strncmp(names + (size_t)j * MPI_MAX_PROCESSOR_NAME,
                       names + (size_t)i * MPI_MAX_PROCESSOR_NAME, MPI_MAX_PROCESSOR_NAME))
            j++;
        node_of_rank[i] = j;
    }
done:
    free(names);
    return err;
}

/* Round-robin tournament: partner of rank i in round r among P players
 * (P even, the last one a bye when the real count is odd). */
static int rr_partner(int i, int r, int P) {
    int m = P - 1;
    if (i == m) return (int)(((long)r * (P / 2)) % m);
    int j = ((r - i) % m + m) % m;
    return j == i ? m : j;
}

int comm_topo_latency(MPI_Comm comm, int iters, size_t bytes, double *lat) {
    int err = 0, rank = 0, size = 0;
    char *msg = NULL;
    if (iters < 1) iters = 1;
    if (bytes > (size_t)1 << 20) bytes = (size_t)1 << 20;
    MPI_CHECK(MPI_Comm_rank(comm, &rank));
    MPI_CHECK(MPI_Comm_size(comm, &size));
    memset(lat, 0, (size_t)size * (size_t)size * sizeof *lat);
    msg = calloc(bytes ? bytes : 1, 1);
    if (!msg) {
        fprintf(stderr, "%s:%d: rank %d: out of memory\n", __FILE__, __LINE__, rank);
        return COMM_ERR_NOMEM;
    }
    int P = size + (size & 1), warm = 2;
    for (int r = 0; r < P - 1 && size > 1; r++) {
        int peer = rr_partner(rank, r, P);
        if (peer >= size) continue; /* bye */
        double best = INFINITY;
        for (int it = 0; it < warm + iters; it++) {
            if (rank < peer) {
                double t0 = MPI_Wtime();
                MPI_CHECK(MPI_Send(msg, (int)bytes, MPI_BYTE, peer, TOPO_TAG_PING, comm));
                MPI_CHECK(MPI_Recv(msg, (int)bytes, MPI_BYTE, peer, TOPO_TAG_PONG, comm,
                                   MPI_STATUS_IGNORE));
                double dt = MPI_Wtime() - t0;
                if (it >= warm && dt < best) best = dt;
            } else {
                MPI_CHECK(MPI_Recv(msg, (int)bytes, MPI_BYTE, peer, TOPO_TAG_PING, comm,
                                   MPI_STATUS_IGNORE));
                MPI_CHECK(MPI_Send(msg, (int)bytes, MPI_BYTE, peer, TOPO_TAG_PONG, comm));
            }
        }
        if (rank < peer) lat[(size_t)rank * size + peer] = best / 2;
    }
    /* each pair was written once, by its lower rank */
    MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, lat, size * size, MPI_DOUBLE, MPI_SUM, comm));
    for (int i = 0; i < size; i++)
        for (int j = 0; j < i; j++)
            lat[(size_t)i * size + j] = lat[(size_t)j * size + i];
done:
    free(msg);
    return err;
}

static int dcmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int uf_find(int *parent, int i) {
    while (parent[i] != i)
        i = parent[i] = parent[parent[i]];
    return i;
}

int comm_topo_cluster(const double *lat, int p, double min_ratio, int *group_of, int *n_groups) {
    int err = 0;
    double *vals = NULL;
    if (p < 1 || !lat || !group_of) {
        fprintf(stderr, "%s:%d: comm_topo_cluster: invalid arguments\n", __FILE__, __LINE__);
        return COMM_ERR_ARG;
    }
    if (min_ratio <= 1) min_ratio = 3;
    size_t m = (size_t)p * (size_t)(p - 1) / 2, k = 0;
    for (int i = 0; i < p; i++)
        group_of[i] = 0;
    if (n_groups) *n_groups = 1;
    if (m == 0) return 0;
    vals = malloc(m * sizeof *vals);
    if (!vals) {
        fprintf(stderr, "%s:%d: comm_topo_cluster: out of memory\n", __FILE__, __LINE__);
        return COMM_ERR_NOMEM;
    }
    for (int i = 0; i < p; i++)
        for (int j = i + 1; j < p; j++) {
            double a = lat[(size_t)i * p + j], b = lat[(size_t)j * p + i];
            if (!isfinite(a) || !isfinite(b) || a < 0 || b < 0) {
                fprintf(stderr, "%s:%d: comm_topo_cluster: bad latency %g/%g for pair %d,%d\n",
                        __FILE__, __LINE__, a, b, i, j);
                err = COMM_ERR_ARG;
                goto done;
            }
            vals[k++] = fmax(0.5 * (a + b), 1e-12);
        }
    qsort(vals, m, sizeof *vals, dcmp);
    double best = 1, thresh = 0;
    for (size_t i = 0; i + 1 < m; i++) {
        double r = vals[i + 1] / vals[i];
        if (r > best) {
            best = r;
            thresh = sqrt(vals[i] * vals[i + 1]);
        }
    }
    if (best < min_ratio) goto done; /* one latency class: one group */
    for (int i = 0; i < p; i++)
        group_of[i] = i;
    for (int i = 0; i < p; i++)
        for (int j = i + 1; j < p; j++)
            if (fmax(0.5 * (lat[(size_t)i * p + j] + lat[(size_t)j * p + i]), 1e-12) < thresh) {
                int a = uf_find(group_of, i), b = uf_find(group_of, j);
                if (a != b) group_of[a > b ? a : b] = a < b ? a : b;
            }
    for (int i = 0; i < p; i++)
        group_of[i] = uf_find(group_of, i);
    {
        int n = comm_topo_canonical(group_of, p);
        if (n_groups) *n_groups = n;
    }
done:
    free(vals);
    return err;
}

int comm_topo_groups(MPI_Comm comm, comm_topo_method method, int *node_of_rank, int *n_nodes) {
    int err = 0, rank = 0, size = 0, n = 0;
    double *lat = NULL;
    MPI_Errhandler old = MPI_ERRHANDLER_NULL;
    MPI_CHECK(MPI_Comm_get_errhandler(comm, &old));
    MPI_CHECK(MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN));
    MPI_CHECK(MPI_Comm_rank(comm, &rank));
    MPI_CHECK(MPI_Comm_size(comm, &size));
    switch (method) {
    case COMM_TOPO_SHARED:
        err = topo_shared(comm, rank, node_of_rank);
        break;
    case COMM_TOPO_HOSTNAME:
        err = topo_hostname(comm, rank, size, node_of_rank);
        break;
    case COMM_TOPO_LATENCY:
        lat = malloc((size_t)size * (size_t)size * sizeof *lat);
        if (!lat) {
            fprintf(stderr, "%s:%d: rank %d: out of memory\n", __FILE__, __LINE__, rank);
            err = COMM_ERR_NOMEM;
            goto done;
        }
        err = comm_topo_latency(comm, 10, 8, lat);
        if (!err) err = comm_topo_cluster(lat, size, 0, node_of_rank, NULL);
        break;
    default:
        fprintf(stderr, "%s:%d: rank %d: unknown topology method %d\n", __FILE__, __LINE__, rank,
                (int)method);
        err = COMM_ERR_ARG;
    }
    if (err) goto done;
    n = comm_topo_canonical(node_of_rank, size);
    if (n_nodes) *n_nodes = n;
done:
    if (old != MPI_ERRHANDLER_NULL) {
        MPI_Comm_set_errhandler(comm, old);
        MPI_Errhandler_free(&old);
    }
    free(lat);
    return err;
}
