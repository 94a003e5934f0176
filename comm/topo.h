/* comm_topo: which ranks share a node.
 *
 * Node groups feed the hierarchical all-reduce (comm/allreduce.h) and the
 * cost model. Three ways to find them: MPI's shared-memory split, equal
 * processor (host) names, or ping-pong latencies between all pairs clustered
 * into classes, for when neither of the first two tells the truth (emulated
 * clusters, containers that hide the host). Groups are numbered 0..n-1 in the
 * order of their lowest rank, so every rank computes the same numbering.
 * Not here: bandwidth probing and algorithm selection.
 */
#ifndef MPILM_COMM_TOPO_H
#define MPILM_COMM_TOPO_H

#include <mpi.h>
#include <stddef.h>

typedef enum {
    COMM_TOPO_SHARED = 0, /* MPI_Comm_split_type(MPI_COMM_TYPE_SHARED) */
    COMM_TOPO_HOSTNAME,   /* equal MPI_Get_processor_name */
    COMM_TOPO_LATENCY,    /* comm_topo_latency + comm_topo_cluster */
} comm_topo_method;

/* Collective. node_of_rank[size] receives each rank's node id (0..n-1,
 * numbered by lowest rank); *n_nodes (may be NULL) the node count. The same
 * result on every rank. Returns 0 or a negative COMM_ERR_*. */
int comm_topo_groups(MPI_Comm comm, comm_topo_method method, int *node_of_rank, int *n_nodes);

/* Collective. lat[size*size] (row-major) receives the one-way latency in
 * seconds between every pair (half the fastest of `iters` round trips of
 * `bytes`-byte messages after a warm-up), symmetric, 0 on the diagonal; the
 * same matrix on every rank. Pairs are measured in size-1 (or size) rounds
 * of disjoint pairs (round-robin tournament). */
int comm_topo_latency(MPI_Comm comm, int iters, size_t bytes, double *lat);

/* Local, pure. Clusters a p x p latency matrix (row-major; the two
 * directions are averaged) into groups: sorts the pair latencies, finds the
 * largest ratio between consecutive values and, if it is at least min_ratio
 * (<= 1: default 3), joins ranks whose latency lies below the geometric mean
 * of the two values around that gap (connected components). Otherwise all
 * ranks form one group. Limitation: a layout is only recognised when both
 * classes occur (at least one pair of ranks shares a node and one does not).
 * Returns 0, or COMM_ERR_ARG on p < 1 or a negative / non-finite entry. */
int comm_topo_cluster(const double *lat, int p, double min_ratio, int *group_of, int *n_groups);

/* Local. Renumbers arbitrary labels in place to 0..n-1 in order of first
 * appearance; returns n. */
int comm_topo_canonical(int *labels, int p);

#endif
