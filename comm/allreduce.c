/* comm_ar: all-reduce algorithms on MPI point-to-point (see allreduce.h).
 *
 * Layout of this file: error helpers, context, message helpers that split
 * transfers above max_msg elements (inter_msg between nodes, a window of
 * pieces in flight), the algorithms (each an "impl" working
 * on any communicator, so hierarchical can run them among node leaders),
 * the public wrappers and table, the cost model.
 *
 * Non-power-of-two rank counts: recursive doubling and Rabenseifner fold the
 * extra ranks in (MPICH style): with pof2 the largest power of two <= p and
 * rem = p - pof2, each even rank below 2*rem hands its whole vector to the
 * odd rank above it and sits out, the pof2 remaining ranks run the
 * power-of-two algorithm, and the odd ranks hand the result back. Ring, tree,
 * parameter server and hierarchical need no power of two.
 */
#include "comm/allreduce.h"

#include "comm/topo.h"

#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* One tag per algorithm (and per phase where a pair talks both ways). */
enum {
    TAG_RING = 7101,
    TAG_RD = 7102,
    TAG_RAB = 7103,
    TAG_TREE = 7104,
    TAG_PS_PUSH = 7105,
    TAG_PS_PULL = 7106,
    TAG_HIER_UP = 7107,
    TAG_HIER_DOWN = 7108,
};

/* Parameter server message size cap (elements): bounds server memory to
 * workers * PS_SEG floats and pipelines summing with receiving. */
#define PS_SEG ((size_t)1 << 20)

/* Pieces of one transfer in flight at once (each way) when it is split:
 * enough to keep a link busy (AR_WINDOW x inter_msg bytes queued) without
 * one request per piece of a 256 MiB buffer. */
#define AR_WINDOW 64

/* Hierarchical: smallest slice (elements) for the sliced scheme; below it the
 * leader scheme's fewer intra-node steps win. */
#define HIER_SLICE_MIN ((size_t)1024)

typedef int (*ar_impl)(comm_ar *ar, MPI_Comm comm, float *buf, size_t n);

struct comm_ar {
    MPI_Comm comm;        /* dup of the user's communicator */
    MPI_Comm node_comm;   /* ranks of my node, key = rank */
    MPI_Comm leader_comm; /* node rank 0 of every node; MPI_COMM_NULL elsewhere */
    MPI_Comm slice_comm;  /* same node rank on every node (sliced; > 1 node) */
    int sliced_ok;        /* every node holds node_size ranks */
    int sliced;           /* sliced_ok and opted in (or chosen by the stream check) */
    int rank, size, node_rank, node_size, n_nodes;
    int ps_ranks, n_contrib; /* dedicated servers; size - ps_ranks */
    size_t max_msg;          /* elements per point-to-point message */
    size_t inter_msg;        /* the same between ranks on different nodes */
    int *node_of;            /* node of every rank of comm */
    ar_impl inter;           /* hierarchical: algorithm among leaders */
    float *scratch;
    size_t scratch_cap;
    MPI_Request *reqs;
    size_t reqs_cap;
    uint64_t bytes_sent;
};

/* ---- errors ------------------------------------------------------------ */

int comm_world_rank(void) {
    int init = 0, fin = 0, r = -1;
    MPI_Initialized(&init);
    MPI_Finalized(&fin);
    if (init && !fin) MPI_Comm_rank(MPI_COMM_WORLD, &r);
    return r;
}

int comm_mpi_error(int mpi_rc, const char *file, int line, const char *what) {
    char msg[MPI_MAX_ERROR_STRING + 1] = "unknown MPI error";
    int len = 0;
    if (MPI_Error_string(mpi_rc, msg, &len) != MPI_SUCCESS)
        snprintf(msg, sizeof msg, "MPI error code %d", mpi_rc);
    fprintf(stderr, "%s:%d: rank %d: %s: %s\n", file, line, comm_world_rank(), what, msg);
    return COMM_ERR_MPI;
}

__attribute__((format(printf, 4, 5))) static int ar_fail(int code, const char *file, int line,
                                                         const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "%s:%d: rank %d: %s\n", file, line, comm_world_rank(), msg); /* one write */
    return code;
}
#define AR_FAIL(code, ...)                                                                         \
    do {                                                                                           \
        err = ar_fail(code, __FILE__, __LINE__, __VA_ARGS__);                                      \
        goto done;                                                                                 \
    } while (0)

/* ---- scratch ----------------------------------------------------------- */

static float *ar_scratch(comm_ar *ar, size_t n) {
    if (n < 1) n = 1;
    if (n > ar->scratch_cap) {
        void *p = NULL;
        free(ar->scratch);
        ar->scratch = NULL;
        ar->scratch_cap = 0;
        if (n > SIZE_MAX / sizeof(float) || posix_memalign(&p, 64, n * sizeof(float))) {
            ar_fail(0, __FILE__, __LINE__, "out of memory (%zu floats of scratch)", n);
            return NULL;
        }
        ar->scratch = p;
        ar->scratch_cap = n;
    }
    return ar->scratch;
}

static MPI_Request *ar_reqs(comm_ar *ar, size_t n) {
    if (n < 1) n = 1;
    if (n > ar->reqs_cap) {
        MPI_Request *r = realloc(ar->reqs, n * sizeof *r);
        if (!r) {
            ar_fail(0, __FILE__, __LINE__, "out of memory (%zu requests)", n);
            return NULL;
        }
        ar->reqs = r;
        ar->reqs_cap = n;
    }
    return ar->reqs;
}

/* ---- local reductions --------------------------------------------------- */

static void vadd(float *restrict dst, const float *restrict src, size_t n) {
#pragma omp simd
    for (size_t i = 0; i < n; i++)
        dst[i] += src[i];
}

static void vdiv(float *buf, size_t n, float d) {
#pragma omp simd
    for (size_t i = 0; i < n; i++)
        buf[i] /= d;
}

/* ---- point-to-point with message splitting ------------------------------ */

/* Largest message to `peer` of `comm`: inter_msg when the peer is on another
 * node (every peer of the leader and slice communicators is), else max_msg.
 * Symmetric, so both ends of a transfer split it the same way. */
static size_t cap(const comm_ar *ar, MPI_Comm comm, int peer) {
    int across = peer >= 0 && (comm == ar->leader_comm || comm == ar->slice_comm ||
                               (comm == ar->comm && ar->node_of[peer] != ar->node_of[ar->rank]));
    return across ? ar->inter_msg : ar->max_msg;
}

/* Elements of the next message: what is left, at most c. */
static int cut(size_t left, size_t c) {
    return (int)(left < c ? left : c);
}

/* Sends scount floats to dst while receiving rcount from src (either may be
 * 0: nothing is posted), split at cap() into pieces with up to AR_WINDOW of
 * them in flight each way. Both sides split alike, so pieces match in order
 * (MPI's non-overtaking rule). Pieces under the transport's eager limit
 * stream where one large message would wait for a rendezvous handshake
 * queued behind the other direction's data (Open MPI over TCP). */
static int xchg(comm_ar *ar, MPI_Comm comm, const float *sbuf, size_t scount, int dst, float *rbuf,
                size_t rcount, int src, int tag) {
    int err = 0;
    size_t so = 0, ro = 0, sc = cap(ar, comm, dst), rc = cap(ar, comm, src);
    MPI_Request *rq = ar_reqs(ar, 2 * AR_WINDOW);
    if (!rq) return COMM_ERR_NOMEM;
    while (so < scount || ro < rcount) {
        int nr = 0;
        for (int w = 0; w < AR_WINDOW && ro < rcount; w++) {
            int c = cut(rcount - ro, rc);
            MPI_CHECK(MPI_Irecv(rbuf + ro, c, MPI_FLOAT, src, tag, comm, &rq[nr++]));
            ro += (size_t)c;
        }
        for (int w = 0; w < AR_WINDOW && so < scount; w++) {
            int c = cut(scount - so, sc);
            MPI_CHECK(MPI_Isend(sbuf + so, c, MPI_FLOAT, dst, tag, comm, &rq[nr++]));
            so += (size_t)c;
            ar->bytes_sent += (uint64_t)c * sizeof(float);
        }
        MPI_CHECK(MPI_Waitall(nr, rq, MPI_STATUSES_IGNORE));
    }
done:
    return err;
}

static int send_f(comm_ar *ar, MPI_Comm comm, const float *buf, size_t n, int dst, int tag) {
    return xchg(ar, comm, buf, n, dst, NULL, 0, MPI_PROC_NULL, tag);
}

static int recv_f(comm_ar *ar, MPI_Comm comm, float *buf, size_t n, int src, int tag) {
    return xchg(ar, comm, NULL, 0, MPI_PROC_NULL, buf, n, src, tag);
}

/* Block i of n elements cut into k near-equal blocks: offset (and length as
 * blk_off(i+1) - blk_off(i)); the first n % k blocks get one more. */
static size_t blk_off(size_t n, size_t k, size_t i) {
    return i * (n / k) + (i < n % k ? i : n % k);
}
static size_t blk_len(size_t n, size_t k, size_t i) {
    return n / k + (i < n % k);
}

static int comm_geom(MPI_Comm comm, int *rank, int *size) {
    int err = 0;
    MPI_CHECK(MPI_Comm_rank(comm, rank));
    MPI_CHECK(MPI_Comm_size(comm, size));
done:
    return err;
}

/* ---- ring ---------------------------------------------------------------
 * Reduce-scatter around the ring (p-1 steps, chunk c ends fully reduced on
 * rank c-1), then all-gather (p-1 steps) copying the reduced chunks, so every
 * rank ends with the same bits. Any p; chunks of count/p (+1), empty chunks
 * (count < p) send nothing. The two halves are also hierarchical's steps
 * inside a node.
 * Cost: 2(p-1) alpha + 2(p-1)/p n beta + (p-1)/p n gamma. Bandwidth-optimal;
 * latency grows linearly with p, so poor for small messages at large p. */
static int ring_rs(comm_ar *ar, MPI_Comm comm, int rank, int p, float *buf, size_t n, int tag) {
    int err = 0;
    size_t P = (size_t)p;
    float *tmp = ar_scratch(ar, blk_len(n, P, 0));
    if (!tmp) return COMM_ERR_NOMEM;
    int right = (rank + 1) % p, left = (rank + p - 1) % p;
    for (int s = 0; s < p - 1; s++) {
        size_t sc = (size_t)((rank - s + p) % p), rc = (size_t)((rank - s - 1 + 2 * p) % p);
        size_t rl = blk_len(n, P, rc);
        if ((err = xchg(ar, comm, buf + blk_off(n, P, sc), blk_len(n, P, sc), right, tmp, rl, left,
                        tag)))
            return err;
        vadd(buf + blk_off(n, P, rc), tmp, rl);
    }
    return 0;
}

static int ring_ag(comm_ar *ar, MPI_Comm comm, int rank, int p, float *buf, size_t n, int tag) {
    int err = 0;
    size_t P = (size_t)p;
    int right = (rank + 1) % p, left = (rank + p - 1) % p;
    for (int s = 0; s < p - 1; s++) {
        size_t sc = (size_t)((rank + 1 - s + p) % p), rc = (size_t)((rank - s + p) % p);
        if ((err = xchg(ar, comm, buf + blk_off(n, P, sc), blk_len(n, P, sc), right,
                        buf + blk_off(n, P, rc), blk_len(n, P, rc), left, tag)))
            return err;
    }
    return 0;
}

static int ring_impl(comm_ar *ar, MPI_Comm comm, float *buf, size_t n) {
    int err = 0, rank, p;
    if ((err = comm_geom(comm, &rank, &p))) return err;
    if (p == 1 || n == 0) return 0;
    if ((err = ring_rs(ar, comm, rank, p, buf, n, TAG_RING))) return err;
    return ring_ag(ar, comm, rank, p, buf, n, TAG_RING);
}

/* ---- fold-in / fold-out of the ranks beyond the largest power of two ----- */

typedef struct {
    int pof2, rem, newrank; /* newrank -1: folded out */
} fold;

static int real_rank(const fold *f, int newrank) {
    return newrank < f->rem ? 2 * newrank + 1 : newrank + f->rem;
}

static int fold_in(comm_ar *ar, MPI_Comm comm, int rank, int p, float *buf, float *tmp, size_t n,
                   int tag, fold *f) {
    int err = 0;
    f->pof2 = 1;
    while (f->pof2 * 2 <= p)
        f->pof2 *= 2;
    f->rem = p - f->pof2;
    if (rank < 2 * f->rem) {
        if (rank % 2 == 0) {
            err = send_f(ar, comm, buf, n, rank + 1, tag);
            f->newrank = -1;
        } else {
            err = recv_f(ar, comm, tmp, n, rank - 1, tag);
            if (!err) vadd(buf, tmp, n);
            f->newrank = rank / 2;
        }
    } else {
        f->newrank = rank - f->rem;
    }
    return err;
}

static int fold_out(comm_ar *ar, MPI_Comm comm, int rank, float *buf, size_t n, int tag,
                    const fold *f) {
    if (rank >= 2 * f->rem) return 0;
    if (rank % 2) return send_f(ar, comm, buf, n, rank - 1, tag);
    return recv_f(ar, comm, buf, n, rank + 1, tag);
}

/* ---- recursive doubling ---------------------------------------------------
 * lg p steps; in step k partners 2^k apart swap their whole vectors and both
 * add (a+b on one side, b+a on the other: the same bits). Non-power-of-two:
 * fold-in/out (see top of file).
 * Cost (p power of two): lg p (alpha + n beta + n gamma); otherwise plus
 * 2 alpha + 2 n beta + n gamma. Latency-optimal: for small messages; sends
 * the whole vector every step, so poor for large ones. */
static int rd_impl(comm_ar *ar, MPI_Comm comm, float *buf, size_t n) {
    int err = 0, rank, p;
    fold f;
    if ((err = comm_geom(comm, &rank, &p))) return err;
    if (p == 1 || n == 0) return 0;
    float *tmp = ar_scratch(ar, n);
    if (!tmp) return COMM_ERR_NOMEM;
    if ((err = fold_in(ar, comm, rank, p, buf, tmp, n, TAG_RD, &f))) return err;
    for (int mask = 1; f.newrank >= 0 && mask < f.pof2; mask <<= 1) {
        int partner = real_rank(&f, f.newrank ^ mask);
        if ((err = xchg(ar, comm, buf, n, partner, tmp, n, partner, TAG_RD))) return err;
        vadd(buf, tmp, n);
    }
    return fold_out(ar, comm, rank, buf, n, TAG_RD, &f);
}

/* ---- Rabenseifner -----------------------------------------------------------
 * Reduce-scatter by recursive halving (step k: keep half of the current
 * block range, send the other half to the partner, add what comes back; the
 * rank with new rank r ends owning fully reduced block r of pof2 blocks),
 * then all-gather by recursive doubling (copies only). Non-power-of-two:
 * fold-in/out of whole vectors (see top of file).
 * Cost (p power of two): 2 lg p alpha + 2(p-1)/p n beta + (p-1)/p n gamma;
 * otherwise (with p' = pof2) plus 2 alpha + 2 n beta + n gamma, i.e. the fold
 * costs as much bandwidth as the algorithm itself. Good for large messages;
 * count < pof2 leaves empty blocks (still lg p messages each way). */
static int rab_impl(comm_ar *ar, MPI_Comm comm, float *buf, size_t n) {
    int err = 0, rank, p;
    fold f;
    if ((err = comm_geom(comm, &rank, &p))) return err;
    if (p == 1 || n == 0) return 0;
    float *tmp = ar_scratch(ar, n);
    if (!tmp) return COMM_ERR_NOMEM;
    if ((err = fold_in(ar, comm, rank, p, buf, tmp, n, TAG_RAB, &f))) return err;
    if (f.newrank >= 0) {
        size_t K = (size_t)f.pof2, me = (size_t)f.newrank, lo = 0, hi = K;
        for (size_t mask = K / 2; mask >= 1; mask /= 2) {
            int partner = real_rank(&f, (int)(me ^ mask));
            size_t mid = lo + mask, klo, khi, slo, shi;
            if (me & mask)
                klo = mid, khi = hi, slo = lo, shi = mid;
            else
                klo = lo, khi = mid, slo = mid, shi = hi;
            size_t kn = blk_off(n, K, khi) - blk_off(n, K, klo);
            size_t sn = blk_off(n, K, shi) - blk_off(n, K, slo);
            if ((err = xchg(ar, comm, buf + blk_off(n, K, slo), sn, partner, tmp, kn, partner,
                            TAG_RAB)))
                return err;
            vadd(buf + blk_off(n, K, klo), tmp, kn);
            lo = klo, hi = khi;
        }
        for (size_t mask = 1; mask < K; mask *= 2) {
            size_t pn = me ^ mask, mlo = me & ~(mask - 1), plo = pn & ~(mask - 1);
            int partner = real_rank(&f, (int)pn);
            if ((err = xchg(ar, comm, buf + blk_off(n, K, mlo),
                            blk_off(n, K, mlo + mask) - blk_off(n, K, mlo), partner,
                            buf + blk_off(n, K, plo),
                            blk_off(n, K, plo + mask) - blk_off(n, K, plo), partner, TAG_RAB)))
                return err;
        }
    }
    return fold_out(ar, comm, rank, buf, n, TAG_RAB, &f);
}

/* ---- binomial tree ----------------------------------------------------------
 * Reduce to rank 0 along a binomial tree (rank r's children are r + 2^k for
 * 2^k below r's lowest set bit), then broadcast down the same tree. Any p.
 * Cost: 2 ceil(lg p) (alpha + n beta) + ceil(lg p) n gamma. Few messages but
 * the whole vector on every edge and idle leaves: for small messages only. */
static int tree_reduce(comm_ar *ar, MPI_Comm comm, float *buf, size_t n, int tag) {
    int err = 0, rank, p;
    if ((err = comm_geom(comm, &rank, &p))) return err;
    if (p == 1 || n == 0) return 0;
    float *tmp = NULL;
    for (int mask = 1; mask < p; mask <<= 1) {
        if (rank & mask) return send_f(ar, comm, buf, n, rank - mask, tag);
        if (rank + mask < p) {
            if (!tmp && !(tmp = ar_scratch(ar, n))) return COMM_ERR_NOMEM;
            if ((err = recv_f(ar, comm, tmp, n, rank + mask, tag))) return err;
            vadd(buf, tmp, n);
        }
    }
    return 0;
}

static int tree_bcast(comm_ar *ar, MPI_Comm comm, float *buf, size_t n, int tag) {
    int err = 0, rank, p, top;
    if ((err = comm_geom(comm, &rank, &p))) return err;
    if (p == 1 || n == 0) return 0;
    if (rank) {
        top = rank & -rank;
        if ((err = recv_f(ar, comm, buf, n, rank - top, tag))) return err;
    } else {
        top = 1;
        while (top < p)
            top <<= 1;
    }
    for (int m = top >> 1; m > 0; m >>= 1)
        if (rank + m < p && (err = send_f(ar, comm, buf, n, rank + m, tag))) return err;
    return 0;
}

static int tree_impl(comm_ar *ar, MPI_Comm comm, float *buf, size_t n) {
    int err = tree_reduce(ar, comm, buf, n, TAG_TREE);
    return err ? err : tree_bcast(ar, comm, buf, n, TAG_TREE);
}

/* ---- parameter server -------------------------------------------------------
 * The buffer is cut into one shard per server. Workers push each shard to
 * its server (messages of at most PS_SEG elements), the server sums the
 * contributions of one segment in a fixed order (its own data first when it
 * is a worker, then the other workers by rank; one rank computes each value)
 * and pushes the sum back to every worker. nserv == 0: co-located,
 * every rank is worker and server of shard `rank`; nserv = k > 0: the last k
 * ranks are servers only, workers are ranks 0..p-k-1.
 * Cost, co-located: 2(p-1) alpha + 2(p-1)/p n beta + (p-1)/p n gamma if the
 * network carries a rank's p-1 concurrent messages at full rate (no incast
 * congestion modelled). Dedicated, W workers, k servers: server-bound,
 * 2W alpha + 2 W n/k beta + W n/k gamma. The one algorithm that lets ranks
 * without data (servers) take part. */
static int ps_run(comm_ar *ar, MPI_Comm comm, float *buf, size_t n, int nserv) {
    int err = 0, rank, p;
    MPI_Request *rq;
    if ((err = comm_geom(comm, &rank, &p))) return err;
    if (p == 1 || n == 0) return 0;
    int ns = nserv ? nserv : p, first = p - ns, nw = nserv ? p - nserv : p;
    int is_srv = rank >= first, is_wrk = rank < nw, me = rank - first;
    size_t S = (size_t)ns, seg = ar->max_msg < PS_SEG ? ar->max_msg : PS_SEG;
    size_t maxshard = blk_len(n, S, 0), segl = maxshard < seg ? maxshard : seg;
    size_t nseg_all = 0, nseg_me = 0;
    for (size_t j = 0; j < S; j++) {
        size_t k = (blk_len(n, S, j) + seg - 1) / seg;
        if (!(is_srv && (int)j == me))
            nseg_all += k;
        else
            nseg_me = k;
    }
    int peers = nw - (is_srv && is_wrk); /* workers other than me */
    size_t n_push = is_wrk ? nseg_all : 0, n_pull = is_srv ? nseg_me * (size_t)peers : 0;
    if (n_push > INT_MAX || n_pull > INT_MAX)
        return ar_fail(COMM_ERR_ARG, __FILE__, __LINE__,
                       "parameter_server: %zu elements in too many messages (raise max_msg)", n);
    if (!(rq = ar_reqs(ar, n_push + n_pull + (size_t)peers))) return COMM_ERR_NOMEM;
    MPI_Request *push = rq, *pull = rq + n_push, *in = pull + n_pull;
    float *tmp = NULL;
    if (is_srv && peers > 0 && !(tmp = ar_scratch(ar, (size_t)peers * segl))) return COMM_ERR_NOMEM;
    size_t q = 0;
    /* 1. workers: push every segment of every other shard */
    for (size_t j = 0; is_wrk && j < S; j++) {
        if (is_srv && (int)j == me) continue;
        size_t off = blk_off(n, S, j), len = blk_len(n, S, j);
        for (size_t o = 0; o < len; o += seg, q++) {
            int c = (int)(len - o < seg ? len - o : seg);
            MPI_CHECK(MPI_Isend(buf + off + o, c, MPI_FLOAT, first + (int)j, TAG_PS_PUSH, comm,
                                &push[q]));
            ar->bytes_sent += (uint64_t)c * sizeof(float);
        }
    }
    /* 2. server: per segment, receive from all other workers, sum in rank
     *    order into buf (starting from my own data if I am a worker), send back */
    if (is_srv) {
        size_t off = blk_off(n, S, (size_t)me), len = blk_len(n, S, (size_t)me), qq = 0;
        for (size_t o = 0; o < len; o += seg) {
            int c = (int)(len - o < seg ? len - o : seg), k = 0;
            for (int w = 0; w < nw; w++) {
                if (w == rank) continue;
                MPI_CHECK(
                    MPI_Irecv(tmp + (size_t)k * segl, c, MPI_FLOAT, w, TAG_PS_PUSH, comm, &in[k]));
                k++;
            }
            MPI_CHECK(MPI_Waitall(peers, in, MPI_STATUSES_IGNORE));
            float *acc = buf + off + o;
            k = 0;
            for (int w = 0; w < nw; w++) {
                if (w == rank) continue;
                if (k == 0 && !is_wrk)
                    memcpy(acc, tmp, (size_t)c * sizeof(float));
                else
                    vadd(acc, tmp + (size_t)k * segl, (size_t)c);
                k++;
            }
            for (int w = 0; w < nw; w++)
                if (w != rank) {
                    MPI_CHECK(MPI_Isend(acc, c, MPI_FLOAT, w, TAG_PS_PULL, comm, &pull[qq++]));
                    ar->bytes_sent += (uint64_t)c * sizeof(float);
                }
        }
    }
    /* 3. workers: once the pushes left, pull the sums into place */
    if (is_wrk) {
        MPI_CHECK(MPI_Waitall((int)n_push, push, MPI_STATUSES_IGNORE));
        q = 0;
        for (size_t j = 0; j < S; j++) {
            if (is_srv && (int)j == me) continue;
            size_t off = blk_off(n, S, j), len = blk_len(n, S, j);
            for (size_t o = 0; o < len; o += seg, q++) {
                int c = (int)(len - o < seg ? len - o : seg);
                MPI_CHECK(MPI_Irecv(buf + off + o, c, MPI_FLOAT, first + (int)j, TAG_PS_PULL, comm,
                                    &push[q]));
            }
        }
        MPI_CHECK(MPI_Waitall((int)n_push, push, MPI_STATUSES_IGNORE));
    }
    if (is_srv) MPI_CHECK(MPI_Waitall((int)n_pull, pull, MPI_STATUSES_IGNORE));
done:
    return err;
}

static int ps_impl(comm_ar *ar, MPI_Comm comm, float *buf, size_t n) {
    return ps_run(ar, comm, buf, n, 0);
}

/* ---- hierarchical ---------------------------------------------------------
 * Two schemes, chosen by comm_ar_opts.hier_sliced, the node layout and the
 * count (the same on all ranks):
 *  - sliced (opted in, all nodes hold the same number q of ranks and count >=
 *    q * HIER_SLICE_MIN): ring reduce-scatter inside each node, so local rank l
 *    holds the node's sum of slice (l+1) mod q; the inter-node algorithm
 *    (ar->inter) on that slice among the ranks with local index l of every
 *    node (q inter-node all-reduces of n/q at once, so every rank's
 *    connection carries a share instead of one leader's); ring all-gather
 *    inside the node. The Rabenseifner-style two-level scheme.
 *  - leader (otherwise): binomial-tree reduce to each node's leader (lowest
 *    rank of the node), the inter-node algorithm among the leaders, binomial
 *    broadcast inside the node. Nodes of any size and any rank placement.
 * Cost with N nodes of q ranks, sliced: 2(q-1)(alpha_intra + n/q beta_intra)
 * + (q-1)/q n gamma + inter(N, n/q) with the q slices sharing the node's
 * link; leader: 2 ceil(lg q)(alpha_intra + n beta_intra) + ceil(lg q) n gamma
 * + inter(N, n). Wins when inter-node links are much slower than intra-node
 * ones; on one node it is a ring (sliced) or a tree (leader). Sliced is not
 * the default: its concurrent TCP streams were slower than the leaders' on
 * the emulated 2 x 2 cluster while whole messages stalled, and 1-6% faster
 * at 1-4 MiB with pieces; comm_ar_stream_check measures it. */
static int hier_impl(comm_ar *ar, MPI_Comm comm, float *buf, size_t n) {
    int err = 0, q = ar->node_size, l = ar->node_rank;
    (void)comm;
    if (n == 0) return 0;
    if (ar->sliced && n >= (size_t)q * HIER_SLICE_MIN) {
        size_t Q = (size_t)q, c = (size_t)((l + 1) % q);
        if ((err = ring_rs(ar, ar->node_comm, l, q, buf, n, TAG_HIER_UP))) return err;
        if (ar->slice_comm != MPI_COMM_NULL &&
            (err = ar->inter(ar, ar->slice_comm, buf + blk_off(n, Q, c), blk_len(n, Q, c))))
            return err;
        return ring_ag(ar, ar->node_comm, l, q, buf, n, TAG_HIER_DOWN);
    }
    if ((err = tree_reduce(ar, ar->node_comm, buf, n, TAG_HIER_UP))) return err;
    if (ar->leader_comm != MPI_COMM_NULL && (err = ar->inter(ar, ar->leader_comm, buf, n)))
        return err;
    return tree_bcast(ar, ar->node_comm, buf, n, TAG_HIER_DOWN);
}

/* ---- MPI baseline --------------------------------------------------------
 * MPI_Allreduce (the library picks its algorithm); split above max_msg.
 * Cost: the library's choice; modelled as the best of ring, recursive
 * doubling and Rabenseifner. */
static int mpi_impl(comm_ar *ar, MPI_Comm comm, float *buf, size_t n) {
    int err = 0, rank, p;
    if ((err = comm_geom(comm, &rank, &p))) return err;
    for (size_t o = 0; o < n;) {
        int c = cut(n - o, ar->max_msg);
        MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, buf + o, c, MPI_FLOAT, MPI_SUM, comm));
        o += (size_t)c;
    }
    if (p > 1) ar->bytes_sent += (uint64_t)(2.0 * (p - 1) / p * (double)n * sizeof(float));
done:
    return err;
}

/* ---- public wrappers ------------------------------------------------------- */

static int ar_run(comm_ar *ar, float *buf, size_t n, comm_op op, ar_impl impl, int ps) {
    int err = 0;
    if (!ar) AR_FAIL(COMM_ERR_ARG, "all-reduce: NULL context");
    if (n && !buf) AR_FAIL(COMM_ERR_ARG, "all-reduce: NULL buffer for %zu elements", n);
    if (op != COMM_SUM && op != COMM_AVG) AR_FAIL(COMM_ERR_ARG, "all-reduce: bad op %d", (int)op);
    if (ps) {
        err = ps_run(ar, ar->comm, buf, n, ar->ps_ranks);
    } else {
        if (ar->rank >= ar->n_contrib && n) memset(buf, 0, n * sizeof *buf);
        err = impl(ar, ar->comm, buf, n);
    }
    if (!err && op == COMM_AVG && ar->n_contrib > 1) vdiv(buf, n, (float)ar->n_contrib);
done:
    return err;
}

int comm_ar_ring(comm_ar *ar, float *buf, size_t count, comm_op op) {
    return ar_run(ar, buf, count, op, ring_impl, 0);
}
int comm_ar_recursive_doubling(comm_ar *ar, float *buf, size_t count, comm_op op) {
    return ar_run(ar, buf, count, op, rd_impl, 0);
}
int comm_ar_rabenseifner(comm_ar *ar, float *buf, size_t count, comm_op op) {
    return ar_run(ar, buf, count, op, rab_impl, 0);
}
int comm_ar_tree(comm_ar *ar, float *buf, size_t count, comm_op op) {
    return ar_run(ar, buf, count, op, tree_impl, 0);
}
int comm_ar_parameter_server(comm_ar *ar, float *buf, size_t count, comm_op op) {
    return ar_run(ar, buf, count, op, ps_impl, 1);
}
int comm_ar_hierarchical(comm_ar *ar, float *buf, size_t count, comm_op op) {
    return ar_run(ar, buf, count, op, hier_impl, 0);
}
int comm_ar_mpi(comm_ar *ar, float *buf, size_t count, comm_op op) {
    return ar_run(ar, buf, count, op, mpi_impl, 0);
}

const comm_ar_algo comm_ar_algos[] = {
    {"ring", comm_ar_ring, "2(p-1)a + 2(p-1)/p n b + (p-1)/p n g"},
    {"recursive_doubling", comm_ar_recursive_doubling,
     "lg p (a + n b + n g) [+ 2a + 2n b + n g if p not 2^k]"},
    {"rabenseifner", comm_ar_rabenseifner,
     "2 lg p a + 2(p-1)/p n b + (p-1)/p n g [+ 2a + 2n b + n g if p not 2^k]"},
    {"tree", comm_ar_tree, "2 ceil(lg p)(a + n b) + ceil(lg p) n g"},
    {"parameter_server", comm_ar_parameter_server,
     "co-located: 2(p-1)a + 2(p-1)/p n b + (p-1)/p n g; k servers: 2W a + 2W n/k b + W n/k g"},
    {"hierarchical", comm_ar_hierarchical,
     "2 ceil(lg q)(a_i + n b_i) + ceil(lg q) n g + inter(nodes, n); sliced: "
     "2(q-1)(a_i + n/q b_i) + (q-1)/q n g + inter(nodes, n/q) x q"},
    {"mpi", comm_ar_mpi, "MPI library's choice"},
    {NULL, NULL, NULL},
};

/* impls by name, for hierarchical's inter-node step */
static const struct {
    const char *name;
    ar_impl impl;
} impls[] = {
    {"ring", ring_impl}, {"recursive_doubling", rd_impl}, {"rabenseifner", rab_impl},
    {"tree", tree_impl}, {"parameter_server", ps_impl},   {"mpi", mpi_impl},
};

const comm_ar_algo *comm_ar_find(const char *name) {
    for (const comm_ar_algo *a = comm_ar_algos; name && a->name; a++)
        if (!strcmp(a->name, name)) return a;
    return NULL;
}

static ar_impl find_inter(const char *name) {
    for (size_t i = 0; i < sizeof impls / sizeof impls[0]; i++)
        if (!strcmp(impls[i].name, name)) return impls[i].impl;
    return NULL;
}

int comm_ar_set_inter(comm_ar *ar, const char *name) {
    int err = 0;
    ar_impl f = name ? find_inter(name) : NULL;
    if (!ar || !f)
        AR_FAIL(COMM_ERR_ARG, "hierarchical: unknown inter-node algorithm '%s'",
                name ? name : "(null)");
    ar->inter = f;
done:
    return err;
}

void comm_ar_set_inter_msg(comm_ar *ar, size_t count) {
    if (ar) ar->inter_msg = count && count < ar->max_msg ? count : ar->max_msg;
}

size_t comm_ar_inter_msg(const comm_ar *ar) {
    return ar ? ar->inter_msg : 0;
}

int comm_ar_stream_check(comm_ar *ar, double t[3]) {
    const size_t n = (size_t)1 << 20; /* 4 MiB */
    const int calls = 3;
    int err = 0, local = 0;
    double w[4] = {1e30, 1e30, 1e30, 0};
    float *buf = NULL;
    if (t) t[0] = t[1] = t[2] = 0;
    if (!ar) return ar_fail(COMM_ERR_ARG, __FILE__, __LINE__, "stream check: NULL context");
    if (ar->n_nodes < 2) return 0;
    ar_impl inter = ar->inter;
    int sliced = ar->sliced, modes = ar->sliced_ok && ar->node_size > 1 ? 3 : 2;
    ar->inter = ring_impl;
    if (!(buf = calloc(n, sizeof *buf))) local = COMM_ERR_NOMEM;
    /* modes: whole messages, pieces (leader scheme), pieces (sliced) */
    for (int rep = 0; rep < 2 * modes; rep++) {
        int m = rep % modes;
        comm_ar_set_inter_msg(ar, m ? COMM_AR_STREAM_PIECE : 0);
        ar->sliced = m == 2;
        MPI_CHECK(MPI_Barrier(ar->comm));
        double t0 = MPI_Wtime();
        for (int k = 0; k < calls && buf && !local; k++)
            local = hier_impl(ar, ar->comm, buf, n);
        w[m] = fmin(w[m], (MPI_Wtime() - t0) / calls);
    }
    w[3] = -local;
    MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, w, 4, MPI_DOUBLE, MPI_MAX, ar->comm));
    if (w[3] > 0) {
        err = -(int)w[3];
        goto done;
    }
    int pieces = w[1] <= 0.9 * w[0];
    comm_ar_set_inter_msg(ar, pieces ? COMM_AR_STREAM_PIECE : 0);
    sliced = sliced || (pieces && modes == 3 && w[2] <= 0.97 * w[1]);
    if (t) t[0] = w[0], t[1] = w[1], t[2] = modes == 3 ? w[2] : 0;
done:
    ar->inter = inter;
    ar->sliced = sliced;
    free(buf);
    return err;
}

const char *comm_ar_stream_str(const comm_ar *ar, const double t[3], char *buf, size_t len) {
    int k = snprintf(buf, len,
                     "stream check: 4 MiB hierarchical(ring) %.2f ms per call with whole messages "
                     "between nodes, %.2f ms with %zu-B pieces",
                     t[0] * 1e3, t[1] * 1e3, COMM_AR_STREAM_PIECE * sizeof(float));
    if (k > 0 && (size_t)k < len && t[2] > 0)
        k += snprintf(buf + k, len - (size_t)k, ", %.2f ms with pieces, sliced", t[2] * 1e3);
    if (k > 0 && (size_t)k < len)
        snprintf(buf + k, len - (size_t)k, " -> %s%s",
                 ar->inter_msg < ar->max_msg ? "pieces" : "whole messages",
                 comm_ar_hier_sliced(ar) ? ", sliced" : "");
    return buf;
}

int comm_ar_hier_sliced(const comm_ar *ar) {
    return ar ? ar->sliced : 0;
}

int comm_ar_n_nodes(const comm_ar *ar) {
    return ar ? ar->n_nodes : 0;
}
uint64_t comm_ar_bytes_sent(const comm_ar *ar) {
    return ar ? ar->bytes_sent : 0;
}

/* ---- context ---------------------------------------------------------------- */

int comm_ar_create(MPI_Comm comm, const comm_ar_opts *opts, comm_ar **out) {
    int err = 0;
    comm_ar *ar = NULL;
    int *nodes = NULL;
    comm_ar_opts o = {0};
    if (opts) o = *opts;
    if (!out) return ar_fail(COMM_ERR_ARG, __FILE__, __LINE__, "comm_ar_create: NULL out");
    *out = NULL;
    if (!(ar = calloc(1, sizeof *ar))) AR_FAIL(COMM_ERR_NOMEM, "comm_ar_create: out of memory");
    ar->comm = ar->node_comm = ar->leader_comm = ar->slice_comm = MPI_COMM_NULL;
    MPI_CHECK(MPI_Comm_dup(comm, &ar->comm));
    MPI_CHECK(MPI_Comm_set_errhandler(ar->comm, MPI_ERRORS_RETURN));
    MPI_CHECK(MPI_Comm_rank(ar->comm, &ar->rank));
    MPI_CHECK(MPI_Comm_size(ar->comm, &ar->size));
    /* option errors are the same on every rank: no rank is left waiting */
    if (o.ps_ranks < 0 || o.ps_ranks >= ar->size)
        AR_FAIL(COMM_ERR_ARG, "comm_ar_create: ps_ranks %d outside [0, %d)", o.ps_ranks, ar->size);
    ar->ps_ranks = o.ps_ranks;
    ar->n_contrib = ar->size - o.ps_ranks;
    ar->max_msg = o.max_msg && o.max_msg < (size_t)INT_MAX ? o.max_msg : (size_t)INT_MAX;
    ar->inter_msg = o.inter_msg && o.inter_msg < ar->max_msg ? o.inter_msg : ar->max_msg;
    if (!(ar->inter = find_inter(o.inter ? o.inter : "rabenseifner")))
        AR_FAIL(COMM_ERR_ARG, "comm_ar_create: unknown inter-node algorithm '%s'", o.inter);
    if (!(nodes = ar->node_of = malloc((size_t)ar->size * sizeof *nodes)))
        AR_FAIL(COMM_ERR_NOMEM, "comm_ar_create: out of memory");
    if (o.node_of_rank) {
        /* the override must be valid and identical everywhere */
        unsigned long mm[3] = {0, 0, 1};
        for (int i = 0; i < ar->size; i++) {
            nodes[i] = o.node_of_rank[i];
            if (nodes[i] < 0) mm[2] = 0;
            mm[0] = mm[0] * 1000003UL + (unsigned long)nodes[i];
        }
        mm[1] = ~mm[0];
        MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, mm, 3, MPI_UNSIGNED_LONG, MPI_MIN, ar->comm));
        if (!mm[2] || mm[0] != ~mm[1])
            AR_FAIL(COMM_ERR_ARG, "comm_ar_create: node_of_rank negative or not the same on "
                                  "all ranks");
        ar->n_nodes = comm_topo_canonical(nodes, ar->size);
    } else if ((err = comm_topo_groups(ar->comm, COMM_TOPO_SHARED, nodes, &ar->n_nodes))) {
        goto done;
    }
    MPI_CHECK(MPI_Comm_split(ar->comm, nodes[ar->rank], ar->rank, &ar->node_comm));
    MPI_CHECK(MPI_Comm_set_errhandler(ar->node_comm, MPI_ERRORS_RETURN));
    MPI_CHECK(MPI_Comm_rank(ar->node_comm, &ar->node_rank));
    MPI_CHECK(MPI_Comm_size(ar->node_comm, &ar->node_size));
    MPI_CHECK(MPI_Comm_split(ar->comm, ar->node_rank == 0 ? 0 : MPI_UNDEFINED, ar->rank,
                             &ar->leader_comm));
    if (ar->leader_comm != MPI_COMM_NULL)
        MPI_CHECK(MPI_Comm_set_errhandler(ar->leader_comm, MPI_ERRORS_RETURN));
    /* sliced hierarchical needs equal nodes (nodes[] is the same everywhere) */
    ar->sliced_ok = 1;
    for (int k = 0; k < ar->n_nodes; k++) {
        int c = 0;
        for (int i = 0; i < ar->size; i++)
            c += nodes[i] == k;
        if (c != ar->node_size) ar->sliced_ok = 0;
    }
    ar->sliced = ar->sliced_ok && o.hier_sliced;
    if (ar->sliced_ok && ar->n_nodes > 1) {
        MPI_CHECK(MPI_Comm_split(ar->comm, ar->node_rank, ar->rank, &ar->slice_comm));
        MPI_CHECK(MPI_Comm_set_errhandler(ar->slice_comm, MPI_ERRORS_RETURN));
    }
done:
    if (err)
        comm_ar_destroy(ar);
    else
        *out = ar;
    return err;
}

void comm_ar_destroy(comm_ar *ar) {
    int fin = 0;
    if (!ar) return;
    MPI_Finalized(&fin);
    if (!fin) {
        if (ar->slice_comm != MPI_COMM_NULL) MPI_Comm_free(&ar->slice_comm);
        if (ar->leader_comm != MPI_COMM_NULL) MPI_Comm_free(&ar->leader_comm);
        if (ar->node_comm != MPI_COMM_NULL) MPI_Comm_free(&ar->node_comm);
        if (ar->comm != MPI_COMM_NULL) MPI_Comm_free(&ar->comm);
    }
    free(ar->node_of);
    free(ar->scratch);
    free(ar->reqs);
    free(ar);
}

/* ---- cost model --------------------------------------------------------------- */

static int ceil_lg(int p) {
    int l = 0;
    while ((1 << l) < p)
        l++;
    return l;
}

double comm_ar_model_time(const char *name, int p, size_t bytes, double a, double b, double g) {
    if (!name || p < 1) return -1;
    double n = (double)bytes;
    int pof2 = 1;
    while (pof2 * 2 <= p)
        pof2 *= 2;
    int lg = ceil_lg(pof2);
    double fold = p > pof2 ? 2 * a + 2 * n * b + n * g : 0;
    double f = (double)(pof2 - 1) / pof2;
    if (!strcmp(name, "ring") || !strcmp(name, "parameter_server"))
        return 2.0 * (p - 1) * a + 2.0 * (p - 1) / p * n * b + (double)(p - 1) / p * n * g;
    if (!strcmp(name, "recursive_doubling")) return lg * (a + n * b + n * g) + fold;
    if (!strcmp(name, "rabenseifner")) return 2.0 * lg * a + 2 * f * n * b + f * n * g + fold;
    if (!strcmp(name, "tree")) {
        int L = ceil_lg(p);
        return 2.0 * L * (a + n * b) + L * n * g;
    }
    if (!strcmp(name, "mpi")) {
        double t1 = comm_ar_model_time("ring", p, bytes, a, b, g);
        double t2 = comm_ar_model_time("recursive_doubling", p, bytes, a, b, g);
        double t3 = comm_ar_model_time("rabenseifner", p, bytes, a, b, g);
        return fmin(t1, fmin(t2, t3));
    }
    return -1;
}

double comm_ar_model_time_hier(int nodes, int ppn, size_t bytes, double alpha_intra,
                               double beta_intra, const char *inter, double alpha_inter,
                               double beta_inter, double gamma) {
    if (nodes < 1 || ppn < 1) return -1;
    double t = comm_ar_model_time(inter, nodes, bytes, alpha_inter, beta_inter, gamma);
    if (t < 0) return -1;
    int L = ceil_lg(ppn);
    double n = (double)bytes;
    return t + 2.0 * L * (alpha_intra + n * beta_intra) + L * n * gamma;
}
