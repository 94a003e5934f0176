/* comm_ar: all-reduce algorithms on MPI point-to-point, behind one signature.
 *
 * Every algorithm reduces a float buffer in place across the ranks of a
 * context's communicator (SUM, or AVG = SUM / n_contributors), works for any
 * rank count (non-powers of two included) and any element count (0, fewer
 * elements than ranks, more than INT_MAX), and gives bitwise identical results
 * on all ranks of one call: each element's final value is computed by one rank
 * (or by pairs of ranks from the same two operands, a+b == b+a) and then
 * copied, never re-summed in a rank-specific order. Different algorithms may
 * round differently from each other.
 *
 * Costs are given in the alpha-beta-gamma model of Thakur, Rabenseifner and
 * Gropp (2005): alpha per message, beta per byte sent, gamma per byte reduced;
 * p ranks, n bytes. comm_ar_model_time() evaluates them.
 *
 * Not here: choosing an algorithm (the adaptive selector), fusing tensors
 * into buckets, compression, GPU buffers (NCCL).
 *
 * This header also holds the error conventions shared by comm/: functions
 * return 0 or a negative COMM_ERR_* code and print one line naming
 * file:line, the MPI_COMM_WORLD rank and the cause; MPI_CHECK is the one
 * check macro for MPI calls in comm/.
 */
#ifndef MPILM_COMM_ALLREDUCE_H
#define MPILM_COMM_ALLREDUCE_H

#include <mpi.h>
#include <stddef.h>
#include <stdint.h>

/* ---- errors shared by comm/ ------------------------------------------- */

enum {
    COMM_OK = 0,
    COMM_ERR_MPI = -1,   /* an MPI call failed (message printed) */
    COMM_ERR_ARG = -2,   /* invalid argument or option */
    COMM_ERR_NOMEM = -3, /* allocation failed */
};

/* MPI_COMM_WORLD rank for messages; -1 outside MPI_Init..MPI_Finalize. */
int comm_world_rank(void);

/* Prints "file:line: rank R: what: <MPI error string>" to stderr and returns
 * COMM_ERR_MPI. R is the MPI_COMM_WORLD rank (-1 if MPI is not running). */
int comm_mpi_error(int mpi_rc, const char *file, int line, const char *what);

/* MPI_CHECK(call): on failure reports (see comm_mpi_error), sets the local
 * `int err` and jumps to the function's `done:` cleanup label. Communicators
 * used with it must have MPI_ERRORS_RETURN set (comm_ar's do). */
#define MPI_CHECK(call)                                                                            \
    do {                                                                                           \
        int mpi_rc_ = (call);                                                                      \
        if (mpi_rc_ != MPI_SUCCESS) {                                                              \
            err = comm_mpi_error(mpi_rc_, __FILE__, __LINE__, #call);                              \
            goto done;                                                                             \
        }                                                                                          \
    } while (0)

/* ---- all-reduce ------------------------------------------------------- */

typedef enum { COMM_SUM = 0, COMM_AVG = 1 } comm_op;

/* Opaque context: a dup of the user's communicator (MPI_ERRORS_RETURN), the
 * node and node-leader communicators, scratch memory and options. One call
 * at a time per context (not thread-safe); the calls of all ranks must use
 * the same algorithm, count and op. */
typedef struct comm_ar comm_ar;

typedef struct {
    /* 0: every rank contributes data (parameter_server then uses co-located
     * servers: rank r owns shard r). k > 0: the last k ranks are dedicated
     * servers that contribute no data: parameter_server shards the buffer over
     * them, every other algorithm treats them as contributing zeros. On server
     * ranks buf must still hold count floats; its input is ignored and its
     * output unspecified. AVG divides by size - k. */
    int ps_ranks;
    /* Node id (>= 0) of every rank, same array on all ranks; NULL: detect with
     * MPI_Comm_split_type(SHARED) (see comm/topo.h). Used by hierarchical. */
    const int *node_of_rank;
    /* Inter-node algorithm of hierarchical (any table name but itself);
     * NULL: "rabenseifner". */
    const char *inter;
    /* 1: hierarchical uses the sliced (Rabenseifner-style) scheme when every
     * node holds the same number q of ranks and count >= q x 1024: ring
     * reduce-scatter inside the node, the inter-node algorithm on each rank's
     * 1/q slice (all local ranks cross the network at once), ring all-gather.
     * 0: the leader scheme (tree reduce, inter among leaders, tree
     * broadcast) unless comm_ar_stream_check measures sliced faster. */
    int hier_sliced;
    /* Largest point-to-point message in elements; 0: INT_MAX. Larger transfers
     * are split. Tests lower it to exercise the splitting. */
    size_t max_msg;
    /* Largest message between ranks on different nodes; 0: max_msg. Split
     * transfers keep a window of pieces in flight. Pieces under the
     * transport's eager limit stream where whole messages stall (Open MPI's
     * TCP transport: see comm_sel's stream check, which sets it). */
    size_t inter_msg;
} comm_ar_opts;

/* Collective over comm. opts may be NULL (all defaults). On error *out is
 * NULL and every rank returns the same code when the error is in opts. */
int comm_ar_create(MPI_Comm comm, const comm_ar_opts *opts, comm_ar **out);
/* Collective (frees communicators). NULL-safe. */
void comm_ar_destroy(comm_ar *ar);

/* Local. Selects hierarchical's inter-node algorithm; every rank must make
 * the same choice before the next call. Returns COMM_ERR_ARG for an unknown
 * name or "hierarchical". */
int comm_ar_set_inter(comm_ar *ar, const char *name);

/* Collective, for contexts spanning nodes (returns 0 at once on one node):
 * how hierarchical's transfers between nodes go. One large message per
 * transfer stalls on some transports when transfers follow each other both
 * ways: Open MPI's TCP transport waits for a rendezvous reply queued behind
 * the other direction's data (1.5-1.7x slower on the emulated 1 Gbit/s
 * link, bench/RESULTS.md), while pieces under its eager limit stream. Times
 * 3 back-to-back 4 MiB hierarchical(ring) calls with whole messages, with
 * COMM_AR_STREAM_PIECE-element pieces, and (equal nodes of 2+ ranks) with
 * pieces and the sliced scheme, alternating, best of two each; keeps pieces
 * when they take at most 0.9x of whole messages and then sliced when it
 * takes at most 0.97x of the leader scheme (an opted-in sliced scheme
 * stays). Seconds per call in t[0..2] (may be NULL; t[2] 0 when not
 * eligible); hierarchical's inter-node algorithm is left as it was. Same
 * result on every rank (agreed by a MAX reduction). */
int comm_ar_stream_check(comm_ar *ar, double t[3]);
/* Local: whether hierarchical uses the sliced scheme (when count allows). */
int comm_ar_hier_sliced(const comm_ar *ar);
/* Local: "stream check: ... -> pieces, sliced" for the log, from the times
 * comm_ar_stream_check returned and the context's settings. */
const char *comm_ar_stream_str(const comm_ar *ar, const double t[3], char *buf, size_t len);
/* 64000 bytes: under Open MPI's default TCP eager limit (64 KiB, header
 * included). */
#define COMM_AR_STREAM_PIECE ((size_t)16000)

/* Local. Sets inter_msg (elements; 0: max_msg); every rank must set the same
 * value before the next call. comm_ar_inter_msg returns the value in use. */
void comm_ar_set_inter_msg(comm_ar *ar, size_t count);
size_t comm_ar_inter_msg(const comm_ar *ar);

/* Local queries: number of nodes seen by hierarchical; bytes this rank sent
 * so far through this context (for `mpi`, the ring-equivalent estimate). */
int comm_ar_n_nodes(const comm_ar *ar);
uint64_t comm_ar_bytes_sent(const comm_ar *ar);

/* The shared signature. Collective over the context's communicator. buf holds
 * count floats on every rank (may be NULL when count == 0). Returns 0 or a
 * negative COMM_ERR_*; a local argument error returns at once, so callers
 * must pass consistent arguments on all ranks. */
typedef int (*comm_ar_fn)(comm_ar *ar, float *buf, size_t count, comm_op op);

typedef struct {
    const char *name; /* "ring", "recursive_doubling", ... */
    comm_ar_fn fn;
    const char *cost; /* alpha-beta-gamma cost, human readable */
} comm_ar_algo;

/* All algorithms, terminated by an entry with name == NULL. */
extern const comm_ar_algo comm_ar_algos[];
/* Entry by name, NULL if unknown. */
const comm_ar_algo *comm_ar_find(const char *name);

/* The algorithms (also reachable through the table). All collective. */
int comm_ar_ring(comm_ar *ar, float *buf, size_t count, comm_op op);
int comm_ar_recursive_doubling(comm_ar *ar, float *buf, size_t count, comm_op op);
int comm_ar_rabenseifner(comm_ar *ar, float *buf, size_t count, comm_op op);
int comm_ar_tree(comm_ar *ar, float *buf, size_t count, comm_op op);
int comm_ar_parameter_server(comm_ar *ar, float *buf, size_t count, comm_op op);
int comm_ar_hierarchical(comm_ar *ar, float *buf, size_t count, comm_op op);
int comm_ar_mpi(comm_ar *ar, float *buf, size_t count, comm_op op);

/* Model time in seconds of algorithm `name` on p ranks for `bytes` bytes:
 * alpha s/message, beta s/byte sent, gamma s/byte reduced. Returns < 0 for an
 * unknown name and for "hierarchical" (which needs the node layout: use
 * comm_ar_model_time_hier). "parameter_server" is the co-located variant;
 * "mpi" is taken as the best of ring, recursive doubling and Rabenseifner. */
double comm_ar_model_time(const char *name, int p, size_t bytes, double alpha, double beta,
                          double gamma);
/* Hierarchical (leader scheme) on `nodes` nodes of `ppn` ranks: binomial
 * reduce and broadcast inside a node (alpha_intra, beta_intra) around `inter`
 * among the leaders. The opt-in sliced scheme is not modelled. */
double comm_ar_model_time_hier(int nodes, int ppn, size_t bytes, double alpha_intra,
                               double beta_intra, const char *inter, double alpha_inter,
                               double beta_inter, double gamma);

#endif
