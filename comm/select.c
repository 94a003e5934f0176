/* comm_sel: probe, cost model and adaptive choice of the all-reduce
 * algorithm (see select.h).
 *
 * Layout: pure model and choice, probe (ping-pong per link class + local
 * sum), context, re-selection, explain.
 */
#include "comm/select.h"

#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { TAG_PROBE = 7201, TAG_PROBE_N = 7202 };

#define MAX_CAND COMM_SEL_MAXCAND
#define MIB ((size_t)1 << 20)
/* calibration sizes and timed calls per candidate (after one warm-up call
 * up to 1 MiB; the largest size takes its page faults in the median) */
static const size_t cal_sizes[COMM_SEL_NCAL] = {8, (size_t)64 << 10, MIB, 16 * MIB};
static const int cal_reps[COMM_SEL_NCAL] = {11, 7, 5, 3};
#define CAL_PRUNE 3.0 /* not timed further when over 3x the best (from 1 MiB) */
#define EXPLAIN_MAX ((size_t)256 << 20)

/* Inter-node algorithms of hierarchical the model considers. */
static const char *const inter_names[] = {"ring", "recursive_doubling", "rabenseifner",
                                          "tree", "parameter_server",   NULL};

/* Online tuning (comm_sel_opts.tune): per message size, the candidates
 * predicted within TUNE_WITHIN of the best, each timed `tune` times. */
#define TUNE_MAX 64 /* sizes; later ones keep the predicted choice */
#define TUNE_CAND 3
#define TUNE_REPS 7
#define TUNE_WITHIN 1.5

/* The choice: algorithm name, hierarchical's inter (or NULL), prediction,
 * and whether the fallback was taken. */
typedef struct {
    const char *name, *inter;
    double t;
    int fallback;
} choice;

typedef struct {
    size_t bytes;
    int nc, calls, best; /* best: index into c once all nc x reps are timed, else -1 */
    choice c[TUNE_CAND];
    double t[TUNE_CAND][TUNE_REPS];
    double med[TUNE_CAND];
} tune_entry;

struct comm_sel {
    MPI_Comm comm; /* dup, MPI_ERRORS_RETURN */
    int rank, size;
    comm_ar *ar;
    int *node_of_rank;
    comm_sel_layout lay;
    comm_sel_probe pr;
    comm_sel_calib cal;
    comm_sel_opts o; /* algos/fallback/probe/node_of_rank pointers not kept */
    const char *cand[MAX_CAND + 1];
    const char *fallback; /* table name or NULL */
    /* pick cache */
    size_t last_bytes;
    const comm_ar_algo *last_algo;
    const char *last_inter, *cur_inter; /* chosen / set on ar */
    /* re-selection */
    int slow_run, n_reprobes;
    double calib;
    char event[1024];
    /* online tuning */
    tune_entry tune[TUNE_MAX];
    int ntune;
};

/* ---- formatting ------------------------------------------------------------ */

const char *comm_sel_fmt_bytes(size_t bytes, char *buf, size_t len) {
    static const char *unit[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    double v = (double)bytes;
    int u = 0;
    while (v >= 1024 && u < 4)
        v /= 1024, u++;
    if (v == floor(v))
        snprintf(buf, len, "%.0f %s", v, unit[u]);
    else
        snprintf(buf, len, "%.1f %s", v, unit[u]);
    return buf;
}

static const char *fmt_time(double s, char *buf, size_t len) {
    if (s < 1e-3)
        snprintf(buf, len, "%.1f us", s * 1e6);
    else if (s < 1)
        snprintf(buf, len, "%.2f ms", s * 1e3);
    else
        snprintf(buf, len, "%.2f s", s);
    return buf;
}

static const char *fmt_bw(double beta, char *buf, size_t len) {
    if (!(beta > 0))
        snprintf(buf, len, "n/a");
    else if (1 / beta >= 1e9)
        snprintf(buf, len, "%.2f GB/s", 1e-9 / beta);
    else
        snprintf(buf, len, "%.1f MB/s", 1e-6 / beta);
    return buf;
}

/* ---- model ------------------------------------------------------------------- */

static int is(const char *a, const char *b) {
    return a && b && !strcmp(a, b);
}

/* Ranks of a node that may cross the node's link at once in `name`. */
static int nic_share(const char *name, const comm_sel_layout *lay) {
    if (is(name, "recursive_doubling") || is(name, "rabenseifner") || is(name, "parameter_server"))
        return lay->ppn;
    return 1;
}

static double predict_flat(const comm_sel_probe *pr, const comm_sel_layout *lay, const char *name,
                           size_t bytes) {
    int multi = lay->nodes > 1;
    double a = multi ? pr->alpha_inter : pr->alpha_intra;
    double b = multi ? pr->beta_inter * nic_share(name, lay) : pr->beta_intra;
    return comm_ar_model_time(name, lay->p, bytes, a, b, pr->gamma);
}

double comm_sel_predict(const comm_sel_probe *pr, const comm_sel_layout *lay, const char *name,
                        const char *inter, size_t bytes) {
    if (!pr || !lay || !name || lay->p < 1) return -1;
    if (is(name, "hierarchical")) {
        if (!inter) {
            double best = -1;
            for (int i = 0; inter_names[i]; i++) {
                double t = comm_sel_predict(pr, lay, name, inter_names[i], bytes);
                if (t >= 0 && (best < 0 || t < best)) best = t;
            }
            return best;
        }
        if (is(inter, "hierarchical") || !comm_ar_find(inter)) return -1;
        if (is(inter, "mpi")) {
            double t = -1;
            for (int i = 0; i < 3; i++) {
                double u = comm_sel_predict(pr, lay, name, inter_names[i], bytes);
                if (t < 0 || u < t) t = u;
            }
            return t;
        }
        int nodes = lay->nodes < 1 ? 1 : lay->nodes, ppn = lay->ppn < 1 ? 1 : lay->ppn;
        return comm_ar_model_time_hier(nodes, ppn, bytes, pr->alpha_intra, pr->beta_intra, inter,
                                       pr->alpha_inter, pr->beta_inter, pr->gamma);
    }
    if (is(name, "mpi")) {
        double t = -1;
        for (int i = 0; i < 3; i++) {
            double u = predict_flat(pr, lay, inter_names[i], bytes);
            if (t < 0 || u < t) t = u;
        }
        return t;
    }
    if (!comm_ar_find(name)) return -1;
    return predict_flat(pr, lay, name, bytes);
}

static int degraded(const comm_sel_probe *pr, const comm_sel_layout *lay, const comm_sel_opts *o) {
    if (!o || lay->nodes < 2) return 0;
    if (o->bw_threshold > 0 && pr->beta_inter > 0 && 1 / pr->beta_inter < o->bw_threshold) return 1;
    if (o->lat_threshold > 0 && pr->alpha_inter > o->lat_threshold) return 1;
    return 0;
}

/* Default candidates: every table entry, "mpi" included. */
static int default_cands(const char **out, int max) {
    int n = 0;
    for (int i = 0; comm_ar_algos[i].name && n < max; i++)
        out[n++] = comm_ar_algos[i].name;
    out[n] = NULL;
    return n;
}

/* Calibration factor (measured / prior) of `name` (with hierarchical's
 * inter-node algorithm `inter`, or NULL) at `bytes`: log-log interpolation
 * between its calibrated sizes, held beyond them; 1 without a calibration
 * or for a name not calibrated (a fallback outside the candidates); 0 (not
 * eligible) for an inter-node algorithm hierarchical was not timed with, and
 * above the last size it was timed at when larger sizes were calibrated
 * without it. */
static double cal_factor(const comm_sel_calib *c, const char *name, const char *inter,
                         size_t bytes) {
    int i = 0, named = 0;
    if (!c || c->n == 0) return 1;
    for (; i < c->ncand; i++) {
        if (!is(c->cand[i], name)) continue;
        named = 1;
        if (!c->inter[i] || (inter && is(c->inter[i], inter))) break;
    }
    if (i == c->ncand) return named ? 0 : 1;
    int last = -1;
    for (int j = 0; j < c->n && c->t[j][i] >= 0; j++)
        last = j;
    if (last < 0) return 0;
    if (bytes > c->bytes[last]) return last == c->n - 1 ? c->f[last][i] : 0;
    if (bytes <= c->bytes[0]) return c->f[0][i];
    int j = 0;
    while (j + 1 <= last && c->bytes[j + 1] < bytes)
        j++;
    if (j == last) return c->f[last][i];
    double w = log((double)bytes / (double)c->bytes[j]) /
               log((double)c->bytes[j + 1] / (double)c->bytes[j]);
    return exp((1 - w) * log(c->f[j][i]) + w * log(c->f[j + 1][i]));
}

static const char *fallback_name(const comm_sel_opts *o) {
    const char *f = o && o->fallback ? o->fallback : "parameter_server";
    return is(f, "none") ? NULL : f;
}

/* Predicted seconds of `name` at `bytes` (model x calibration), < 0 when not
 * eligible; for hierarchical the best inter-node algorithm, into *inter. */
static double cand_time(const comm_sel_probe *pr, const comm_sel_layout *lay,
                        const comm_sel_calib *cal, const char *name, size_t bytes,
                        const char **inter) {
    *inter = NULL;
    if (!is(name, "hierarchical")) {
        double k = cal_factor(cal, name, NULL, bytes);
        return k > 0 ? comm_sel_predict(pr, lay, name, NULL, bytes) * k : -1;
    }
    double best = -1;
    for (int j = 0; inter_names[j]; j++) {
        double k = cal_factor(cal, name, inter_names[j], bytes);
        double t = k > 0 ? comm_sel_predict(pr, lay, name, inter_names[j], bytes) * k : -1;
        if (t >= 0 && (best < 0 || t < best)) best = t, *inter = inter_names[j];
    }
    return best;
}

static choice choose(const comm_sel_probe *pr, const comm_sel_layout *lay, const char *const *cand,
                     const char *fb, double slack, int degr, const comm_sel_calib *cal,
                     size_t bytes) {
    choice c = {NULL, NULL, -1, 0};
    for (int i = 0; cand[i]; i++) {
        const char *x;
        double t = cand_time(pr, lay, cal, cand[i], bytes, &x);
        if (t >= 0 && (c.t < 0 || t < c.t)) c = (choice){cand[i], x, t, 0};
    }
    const char *fi = NULL;
    double tf = fb ? cand_time(pr, lay, cal, fb, bytes, &fi) : -1;
    if (degr && fb && !is(fb, c.name) && tf >= 0) {
        if (tf <= slack * c.t) c = (choice){fb, fi, tf, 1};
    } else if (degr && fb && is(fb, c.name)) {
        c.fallback = 1;
    }
    if (!c.name) c = (choice){"ring", NULL, 0, 0};
    return c;
}

static const char *choice_str(choice c, char *buf, size_t len) {
    if (c.inter)
        snprintf(buf, len, "%s(%s)", c.name, c.inter);
    else
        snprintf(buf, len, "%s", c.name);
    return buf;
}

static double slack_of(const comm_sel_opts *o) {
    return o && o->fallback_slack > 0 ? o->fallback_slack : 1.25;
}

const char *comm_sel_best(const comm_sel_probe *pr, const comm_sel_layout *lay,
                          const comm_sel_opts *opts, size_t bytes, char *buf, size_t len,
                          double *t) {
    const char *def[MAX_CAND + 1];
    const char *const *cand = opts && opts->algos ? opts->algos : def;
    if (!(opts && opts->algos)) default_cands(def, MAX_CAND);
    choice c = choose(pr, lay, cand, fallback_name(opts), slack_of(opts), degraded(pr, lay, opts),
                      NULL, bytes);
    if (t) *t = c.t;
    return choice_str(c, buf, len);
}

/* ---- probe ---------------------------------------------------------------- */

static int dcmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, dcmp);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* Ping-pong between me and peer (the initiator drives the count): median
 * one-way time of `bytes`-byte messages over up to `reps` round trips within
 * `budget` seconds (at least 3). Only the initiator's result is meaningful. */
static int pingpong(MPI_Comm comm, int peer, int init, char *buf, size_t bytes, int reps,
                    double budget, double *one_way) {
    int err = 0, n = 0;
    double *t = NULL;
    int cnt = (int)bytes;
    if (!(t = malloc((size_t)(reps > 3 ? reps : 3) * sizeof *t))) return COMM_ERR_NOMEM;
    if (init) {
        /* warm-up round trip, which also sizes the run */
        double t0 = MPI_Wtime();
        MPI_CHECK(MPI_Send(buf, cnt, MPI_BYTE, peer, TAG_PROBE, comm));
        MPI_CHECK(MPI_Recv(buf, cnt, MPI_BYTE, peer, TAG_PROBE, comm, MPI_STATUS_IGNORE));
        double rtt = MPI_Wtime() - t0;
        n = rtt > 0 ? (int)(budget / rtt) : reps;
        if (n > reps) n = reps;
        if (n < 3) n = 3;
        MPI_CHECK(MPI_Send(&n, 1, MPI_INT, peer, TAG_PROBE_N, comm));
        for (int i = 0; i < n; i++) {
            t0 = MPI_Wtime();
            MPI_CHECK(MPI_Send(buf, cnt, MPI_BYTE, peer, TAG_PROBE, comm));
            MPI_CHECK(MPI_Recv(buf, cnt, MPI_BYTE, peer, TAG_PROBE, comm, MPI_STATUS_IGNORE));
            t[i] = (MPI_Wtime() - t0) / 2;
        }
        qsort(t, (size_t)n, sizeof *t, dcmp);
        *one_way = n % 2 ? t[n / 2] : (t[n / 2 - 1] + t[n / 2]) / 2;
    } else {
        MPI_CHECK(MPI_Recv(buf, cnt, MPI_BYTE, peer, TAG_PROBE, comm, MPI_STATUS_IGNORE));
        MPI_CHECK(MPI_Send(buf, cnt, MPI_BYTE, peer, TAG_PROBE, comm));
        MPI_CHECK(MPI_Recv(&n, 1, MPI_INT, peer, TAG_PROBE_N, comm, MPI_STATUS_IGNORE));
        for (int i = 0; i < n; i++) {
            MPI_CHECK(MPI_Recv(buf, cnt, MPI_BYTE, peer, TAG_PROBE, comm, MPI_STATUS_IGNORE));
            MPI_CHECK(MPI_Send(buf, cnt, MPI_BYTE, peer, TAG_PROBE, comm));
        }
        *one_way = 0;
    }
done:
    free(t);
    return err;
}

/* Inverse bandwidth of the link between ranks a (initiator) and b, from the
 * difference of big and 8-byte ping-pongs (one pair alone: link capacity). */
static int probe_beta(comm_sel *s, int a, int b, size_t big, double budget, char *buf,
                      double *beta) {
    int err = 0;
    *beta = 0;
    if (s->rank != a && s->rank != b) return 0;
    int init = s->rank == a, peer = init ? b : a;
    double t_small = 0, t_big = 0;
    if ((err = pingpong(s->comm, peer, init, buf, 8, 20, budget / 4, &t_small))) return err;
    if ((err = pingpong(s->comm, peer, init, buf, big, 9, budget, &t_big))) return err;
    if (init) {
        double bt = (t_big - t_small) / (double)(big - 8);
        *beta = bt > 1e-13 ? bt : 1e-13;
    }
    return 0;
}

/* Latency of 8-byte messages with every rank in a pair at once, as in a
 * collective step (so the number includes what ranks sharing cores and
 * links cost each other): partner = the rank with node-local index i^1 on
 * the same node (intra) or index i on node k^1 (inter). Adds this rank's
 * median one-way time to *sum and 1 to *cnt when it initiates a pair. */
static int probe_alpha(comm_sel *s, int intra, char *buf, double *sum, double *cnt) {
    int err = 0, me = s->rank, k = s->node_of_rank[me], li = 0, partner = -1;
    for (int r = 0; r < me; r++)
        li += s->node_of_rank[r] == k;
    int want_node = intra ? k : (k ^ 1), want_li = intra ? (li ^ 1) : li, j = 0;
    for (int r = 0; r < s->size && partner < 0; r++)
        if (s->node_of_rank[r] == want_node && j++ == want_li) partner = r;
    MPI_CHECK(MPI_Barrier(s->comm));
    if (partner >= 0 && partner != me) {
        double t = 0;
        if ((err = pingpong(s->comm, partner, me < partner, buf, 8, 40, 0.04, &t))) goto done;
        if (me < partner) *sum += t, *cnt += 1;
    }
done:
    return err;
}

/* Seconds per byte of dst += src over n floats (best of a few passes). */
static double measure_gamma(float *dst, const float *src, size_t n) {
    double best = 1e30;
    for (int r = 0; r < 4; r++) {
        double t0 = MPI_Wtime();
#pragma omp simd
        for (size_t i = 0; i < n; i++)
            dst[i] += src[i];
        double t = MPI_Wtime() - t0;
        if (t < best) best = t;
    }
    /* keep the loop from being optimised away */
    volatile float sink = dst[n / 2];
    (void)sink;
    return best / (double)(n * sizeof(float));
}

static int calibrate(comm_sel *s);
static double prior(const comm_sel *s, const char *name, size_t bytes, const char **inter);

/* Collective, across nodes only: comm_ar_stream_check on s->ar, recorded in
 * the probe. */
static int stream_check(comm_sel *s) {
    s->pr.inter_msg = 0;
    memset(s->pr.stream, 0, sizeof s->pr.stream);
    if (!s->ar || s->lay.nodes < 2) return 0;
    s->cur_inter = NULL; /* the check changes ar's inter-node algorithm */
    int err = comm_ar_stream_check(s->ar, s->pr.stream);
    s->pr.inter_msg = comm_ar_inter_msg(s->ar) < (size_t)INT_MAX ? comm_ar_inter_msg(s->ar) : 0;
    return err;
}

/* Collective: measures s->pr, then calibrates. The pairs: the two lowest ranks of the first
 * node holding two ranks (intra), the lowest ranks of nodes 0 and 1 (inter). */
static int probe(comm_sel *s) {
    int err = 0;
    char *buf = NULL;
    float *g = NULL;
    const size_t big_intra = (size_t)4 << 20, big_inter = (size_t)4 << 20;
    const size_t gn = (size_t)1 << 18; /* 1 MiB of floats, twice */
    double v[5] = {0, 0, 0, 0, 0};
    double t0 = MPI_Wtime();
    if (!(buf = calloc(1, big_intra > big_inter ? big_intra : big_inter)) ||
        !(g = calloc(2 * gn, sizeof *g))) {
        err = COMM_ERR_NOMEM;
        goto agree;
    }
    int ia = -1, ib = -1, xa = -1, xb = -1;
    for (int r = 0; r < s->size && ib < 0; r++)
        for (int q = r + 1; q < s->size; q++)
            if (s->node_of_rank[q] == s->node_of_rank[r]) {
                ia = r, ib = q;
                break;
            }
    for (int r = 0; r < s->size; r++) {
        if (xa < 0 && s->node_of_rank[r] == 0) xa = r;
        if (xb < 0 && s->node_of_rank[r] == 1) xb = r;
    }
    double al[4] = {0, 0, 0, 0}; /* sums and counts: intra, inter */
    if (ia >= 0 && (err = probe_alpha(s, 1, buf, &al[0], &al[1]))) goto agree;
    if (xb >= 0 && (err = probe_alpha(s, 0, buf, &al[2], &al[3]))) goto agree;
    MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, al, 4, MPI_DOUBLE, MPI_SUM, s->comm));
    if (al[1] > 0) v[0] = al[0] / al[1];
    if (al[3] > 0) v[2] = al[2] / al[3];
    if (ia >= 0 && (err = probe_beta(s, ia, ib, big_intra, 0.1, buf, &v[1]))) goto agree;
    if (xb >= 0 && (err = probe_beta(s, xa, xb, big_inter, 0.25, buf, &v[3]))) goto agree;
    /* every rank sums at once, as in an all-reduce; the slowest counts */
    MPI_CHECK(MPI_Barrier(s->comm));
    v[4] = measure_gamma(g, g + gn, gn);
agree:;
    /* errors and values agreed in one reduction: -err is positive */
    double w[6] = {v[0], v[1], v[2], v[3], v[4], (double)-err};
    MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, w, 6, MPI_DOUBLE, MPI_MAX, s->comm));
    if (w[5] > 0) {
        err = -(int)w[5];
        goto done;
    }
    s->pr.alpha_intra = w[0], s->pr.beta_intra = w[1];
    s->pr.alpha_inter = w[2], s->pr.beta_inter = w[3];
    s->pr.gamma = w[4];
    if (s->lay.nodes < 2) /* one node: the inter-node class is the intra one */
        s->pr.alpha_inter = w[0], s->pr.beta_inter = w[1];
    if (s->lay.ppn < 2) /* one rank per node: no intra class */
        s->pr.alpha_intra = w[2], s->pr.beta_intra = w[3];
    /* all ranks hold rank 0's duration */
    double dt = MPI_Wtime() - t0;
    MPI_CHECK(MPI_Bcast(&dt, 1, MPI_DOUBLE, 0, s->comm));
    s->pr.seconds = dt;
    if ((err = stream_check(s))) goto done;
    err = calibrate(s);
done:
    free(buf);
    free(g);
    return err;
}

/* The model's prior for candidate `name` at `bytes`; for hierarchical also
 * the inter-node algorithm it would use. */
static double prior(const comm_sel *s, const char *name, size_t bytes, const char **inter) {
    *inter = NULL;
    if (!is(name, "hierarchical")) return comm_sel_predict(&s->pr, &s->lay, name, NULL, bytes);
    double best = -1;
    for (int j = 0; inter_names[j]; j++) {
        double t = comm_sel_predict(&s->pr, &s->lay, name, inter_names[j], bytes);
        if (t >= 0 && (best < 0 || t < best)) best = t, *inter = inter_names[j];
    }
    return best;
}

/* The model's time of calibration entry i (hierarchical with its own
 * inter-node algorithm, or the model's best one). */
static double entry_prior(const comm_sel *s, const comm_sel_calib *c, int i, size_t bytes) {
    const char *x;
    if (c->inter[i]) return comm_sel_predict(&s->pr, &s->lay, c->cand[i], c->inter[i], bytes);
    return prior(s, c->cand[i], bytes, &x);
}

/* Collective: times the candidates for real (see select.h) into s->cal.
 * Every decision (sizes, pruning, budget) is taken from numbers agreed by
 * MAX reductions, so all ranks run the same calls. */
static int calibrate(comm_sel *s) {
    int err = 0, nc = 0;
    comm_sel_calib *c = &s->cal;
    float *buf = NULL;
    double *tt = NULL;
    memset(c, 0, sizeof *c);
    for (int i = 0; s->cand[i] && nc < COMM_SEL_MAXCAND; i++) {
        if (is(s->cand[i], "hierarchical") && s->lay.nodes > 1) {
            static const char *const hx[] = {"ring", "recursive_doubling", "rabenseifner", NULL};
            for (int j = 0; hx[j] && nc < COMM_SEL_MAXCAND; j++)
                if (j < 2 || s->lay.nodes >= 4) c->cand[nc] = s->cand[i], c->inter[nc++] = hx[j];
        } else {
            c->cand[nc++] = s->cand[i];
        }
    }
    c->ncand = nc;
    double budget = s->o.calib_budget > 0 ? s->o.calib_budget : s->lay.nodes > 1 ? 10.0 : 1.0;
    if (!s->ar || s->size < 2 || s->o.calib_budget < 0) return 0;
    size_t maxn = cal_sizes[COMM_SEL_NCAL - 1] / sizeof(float);
    int maxreps = 0;
    for (int j = 0; j < COMM_SEL_NCAL; j++)
        maxreps = cal_reps[j] > maxreps ? cal_reps[j] : maxreps;
    buf = calloc(maxn, sizeof *buf);
    tt = calloc((size_t)maxreps * nc + 2, sizeof *tt);
    int local = !buf || !tt ? -COMM_ERR_NOMEM : 0, ok = 1;
    MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &local, 1, MPI_INT, MPI_MAX, s->comm));
    if (local) {
        err = -local;
        goto done;
    }
    double t0 = MPI_Wtime(), elapsed = 0;
    for (int j = 0; j < COMM_SEL_NCAL && ok; j++) {
        size_t b = cal_sizes[j];
        int reps = cal_reps[j], active[COMM_SEL_MAXCAND], na = 0;
        const char *inter[COMM_SEL_MAXCAND];
        double best = -1;
        for (int i = 0; j > 0 && i < nc; i++)
            if (c->t[j - 1][i] >= 0 && (best < 0 || c->t[j - 1][i] < best)) best = c->t[j - 1][i];
        for (int i = 0; i < nc; i++) {
            active[i] = j == 0 || (c->t[j - 1][i] >= 0 &&
                                   !(c->bytes[j - 1] >= MIB && c->t[j - 1][i] > CAL_PRUNE * best));
            na += active[i];
        }
        /* budget: the previous size's time plus what the prior adds for the
         * larger size (additive: a slow small message, e.g. ranks waiting for
         * a core, is latency, it does not scale with the size); the largest
         * size shrinks to 4 MiB before giving up */
        for (; j > 0; b /= 4) {
            double est = 0;
            for (int i = 0; i < nc; i++) {
                double p1 = entry_prior(s, c, i, b), p0 = entry_prior(s, c, i, c->bytes[j - 1]);
                if (active[i]) est += (c->t[j - 1][i] + fmax(p1 - p0, 0)) * (reps + (b <= MIB));
            }
            if (elapsed + est <= budget) break;
            if (j < COMM_SEL_NCAL - 1 || b / 4 <= c->bytes[j - 1]) {
                ok = 0;
                break;
            }
        }
        if (!ok || na == 0) break;
        size_t n = b / sizeof(float);
        for (int i = 0; i < nc; i++)
            if (!(inter[i] = c->inter[i])) prior(s, c->cand[i], b, &inter[i]);
        memset(tt, 0, ((size_t)reps * nc + 2) * sizeof *tt);
        /* every rank makes the same calls even after a local error, which
         * is agreed below */
        for (int w = b <= MIB ? -1 : 0; w < reps; w++)
            for (int k = 0; k < nc; k++) {
                int i = (k + (w < 0 ? 0 : w)) % nc; /* rotate the order */
                if (!active[i]) continue;
                const comm_ar_algo *a = comm_ar_find(c->cand[i]);
                if (inter[i] && comm_ar_set_inter(s->ar, inter[i])) local = COMM_ERR_ARG;
                MPI_CHECK(MPI_Barrier(s->comm));
                double ts = MPI_Wtime();
                int rc = a->fn(s->ar, buf, n, COMM_SUM);
                if (rc && !local) local = rc;
                if (w >= 0) tt[(size_t)w * nc + i] = MPI_Wtime() - ts;
            }
        tt[(size_t)reps * nc] = MPI_Wtime() - t0;
        tt[(size_t)reps * nc + 1] = -local;
        MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, tt, reps * nc + 2, MPI_DOUBLE, MPI_MAX, s->comm));
        if (tt[(size_t)reps * nc + 1] > 0) {
            err = -(int)tt[(size_t)reps * nc + 1];
            goto done;
        }
        elapsed = tt[(size_t)reps * nc];
        c->bytes[j] = b, c->reps[j] = reps;
        for (int i = 0; i < nc; i++) {
            c->t[j][i] = c->f[j][i] = -1;
            if (!active[i]) continue;
            double v[16];
            for (int r = 0; r < reps; r++)
                v[r] = tt[(size_t)r * nc + i];
            double med = median(v, reps);
            double p = entry_prior(s, c, i, b);
            c->t[j][i] = med;
            c->f[j][i] = p > 0 && med > 0 ? med / p : 1;
        }
        c->n = j + 1;
        if (b != cal_sizes[j]) break; /* shrunk: the last size */
    }
    c->seconds = elapsed;
    s->cur_inter = NULL; /* the calibration changed ar's inter-node algorithm */
done:
    free(buf);
    free(tt);
    return err;
}

/* ---- context -------------------------------------------------------------------- */

int comm_sel_create(MPI_Comm comm, comm_ar *ar, const comm_sel_opts *opts, comm_sel **out) {
    int err = 0;
    comm_sel *s = NULL;
    if (!out) return COMM_ERR_ARG;
    *out = NULL;
    if (!(s = calloc(1, sizeof *s))) return COMM_ERR_NOMEM;
    s->comm = MPI_COMM_NULL;
    if (opts) s->o = *opts;
    s->ar = ar;
    s->calib = 1;
    MPI_CHECK(MPI_Comm_dup(comm, &s->comm));
    MPI_CHECK(MPI_Comm_set_errhandler(s->comm, MPI_ERRORS_RETURN));
    MPI_CHECK(MPI_Comm_rank(s->comm, &s->rank));
    MPI_CHECK(MPI_Comm_size(s->comm, &s->size));
    /* options: the same on every rank, so every rank fails alike */
    int n = 0;
    if (s->o.algos) {
        for (int i = 0; s->o.algos[i]; i++) {
            const comm_ar_algo *a = comm_ar_find(s->o.algos[i]);
            if (!a || n >= MAX_CAND) {
                fprintf(stderr, "comm_sel_create: unknown algorithm '%s'\n", s->o.algos[i]);
                err = COMM_ERR_ARG;
                goto done;
            }
            s->cand[n++] = a->name;
        }
        s->cand[n] = NULL;
    } else {
        n = default_cands(s->cand, MAX_CAND);
    }
    if (n == 0) {
        fprintf(stderr, "comm_sel_create: no candidate algorithm\n");
        err = COMM_ERR_ARG;
        goto done;
    }
    const char *fb = fallback_name(&s->o);
    if (fb) {
        const comm_ar_algo *a = comm_ar_find(fb);
        if (!a) {
            fprintf(stderr, "comm_sel_create: unknown fallback algorithm '%s'\n", fb);
            err = COMM_ERR_ARG;
            goto done;
        }
        s->fallback = a->name;
    }
    s->o.algos = NULL, s->o.fallback = NULL, s->o.node_of_rank = NULL, s->o.probe = NULL;
    if (!(s->node_of_rank = malloc((size_t)s->size * sizeof *s->node_of_rank))) {
        err = COMM_ERR_NOMEM;
        goto done;
    }
    if (opts && opts->node_of_rank) {
        for (int i = 0; i < s->size; i++)
            s->node_of_rank[i] = opts->node_of_rank[i];
        s->lay.nodes = comm_topo_canonical(s->node_of_rank, s->size);
    } else if ((err = comm_topo_groups(s->comm, s->o.topo, s->node_of_rank, &s->lay.nodes))) {
        goto done;
    }
    s->lay.p = s->size;
    for (int k = 0; k < s->lay.nodes; k++) {
        int c = 0;
        for (int i = 0; i < s->size; i++)
            c += s->node_of_rank[i] == k;
        if (c > s->lay.ppn) s->lay.ppn = c;
    }
    if (opts && opts->probe)
        s->pr = *opts->probe;
    else if ((err = probe(s)))
        goto done;
done:
    if (err) {
        comm_sel_destroy(s);
        return err;
    }
    *out = s;
    return 0;
}

void comm_sel_destroy(comm_sel *s) {
    int fin = 0;
    if (!s) return;
    MPI_Finalized(&fin);
    if (!fin && s->comm != MPI_COMM_NULL) MPI_Comm_free(&s->comm);
    free(s->node_of_rank);
    free(s);
}

/* The start-up choice (model x calibration), ignoring tuning. */
static choice sel_predicted(const comm_sel *s, size_t bytes) {
    comm_sel_opts o = s->o;
    return choose(&s->pr, &s->lay, s->cand, s->fallback, slack_of(&o),
                  degraded(&s->pr, &s->lay, &o), &s->cal, bytes);
}

static const tune_entry *tune_find(const comm_sel *s, size_t bytes) {
    for (int i = 0; i < s->ntune; i++)
        if (s->tune[i].bytes == bytes) return &s->tune[i];
    return NULL;
}

/* The tuning entry of `bytes`, made on first use: the predicted choice and
 * the other candidates within TUNE_WITHIN of it, fastest predicted first
 * (only the predicted one, settled at once, when nothing is to compare).
 * NULL when tuning is off or the table is full. */
static tune_entry *tune_get(comm_sel *s, size_t bytes) {
    tune_entry *e = (tune_entry *)tune_find(s, bytes);
    if (e || s->o.tune <= 0 || s->size < 2 || s->ntune == TUNE_MAX) return e;
    choice best = sel_predicted(s, bytes);
    e = &s->tune[s->ntune++];
    memset(e, 0, sizeof *e);
    e->bytes = bytes, e->best = -1, e->nc = 1, e->c[0] = best;
    /* the fallback in force is the user's policy: not tuned */
    for (int i = 0; s->cand[i] && !best.fallback && best.t > 0; i++) {
        const char *x;
        double t = cand_time(&s->pr, &s->lay, &s->cal, s->cand[i], bytes, &x);
        if (is(s->cand[i], best.name) || t < 0 || t > TUNE_WITHIN * best.t) continue;
        /* insertion into c[1..], fastest predicted first, at most TUNE_CAND */
        int k = e->nc < TUNE_CAND ? e->nc++ : TUNE_CAND;
        for (; k > 1 && e->c[k - 1].t > t; k--)
            if (k < TUNE_CAND) e->c[k] = e->c[k - 1];
        if (k < TUNE_CAND) e->c[k] = (choice){s->cand[i], x, t, 0};
    }
    if (e->nc == 1) e->best = 0; /* nothing to compare */
    return e;
}

static choice sel_choose(const comm_sel *s, size_t bytes) {
    const tune_entry *e = tune_find(s, bytes);
    if (e && e->best >= 0 && e->nc > 1) {
        choice c = e->c[e->best];
        c.t = e->med[e->best];
        return c;
    }
    return sel_predicted(s, bytes);
}

const comm_ar_algo *comm_sel_pick(comm_sel *s, size_t bytes) {
    tune_entry *e = tune_get(s, bytes);
    if (e && e->best < 0) { /* tuning: the candidates in turn */
        choice c = e->c[e->calls % e->nc];
        s->last_algo = comm_ar_find(c.name);
        s->last_inter = c.inter;
        s->last_bytes = 0; /* not cached */
    } else if (!s->last_algo || bytes != s->last_bytes) {
        choice c = sel_choose(s, bytes);
        s->last_algo = comm_ar_find(c.name);
        s->last_inter = c.inter;
        s->last_bytes = bytes;
    }
    if (s->last_inter && s->ar && s->cur_inter != s->last_inter &&
        comm_ar_set_inter(s->ar, s->last_inter) == 0)
        s->cur_inter = s->last_inter;
    return s->last_algo;
}

const char *comm_sel_choice(const comm_sel *s, size_t bytes, char *buf, size_t len, double *t) {
    choice c = sel_choose(s, bytes);
    if (t) *t = c.t;
    return choice_str(c, buf, len);
}

const comm_sel_probe *comm_sel_get_probe(const comm_sel *s) {
    return &s->pr;
}
const char *comm_sel_hier_inter(const comm_sel *s, size_t bytes) {
    const char *x = NULL;
    cand_time(&s->pr, &s->lay, &s->cal, "hierarchical", bytes, &x);
    return x ? x : "rabenseifner";
}
const comm_sel_calib *comm_sel_get_calib(const comm_sel *s) {
    return &s->cal;
}
const comm_sel_layout *comm_sel_get_layout(const comm_sel *s) {
    return &s->lay;
}
const char *comm_sel_last_event(const comm_sel *s) {
    return s->event;
}
int comm_sel_n_reprobes(const comm_sel *s) {
    return s->n_reprobes;
}
int comm_sel_degraded(const comm_sel *s) {
    comm_sel_opts o = s->o;
    return degraded(&s->pr, &s->lay, &o);
}

/* ---- re-selection ------------------------------------------------------------ */

static size_t appendf(char *buf, size_t len, size_t at, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static size_t appendf(char *buf, size_t len, size_t at, const char *fmt, ...) {
    if (at >= len) return at;
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(buf + at, len - at, fmt, ap);
    va_end(ap);
    return k < 0 ? at : (at + (size_t)k < len ? at + (size_t)k : len - 1);
}

int comm_sel_reprobe(comm_sel *s, const char *why) {
    comm_sel_probe old = s->pr;
    char before[64][48];
    int ns = 0;
    for (size_t b = 4; b <= EXPLAIN_MAX && ns < 64; b *= 2, ns++)
        comm_sel_choice(s, b, before[ns], sizeof before[ns], NULL);
    s->ntune = 0; /* the network changed: tune again */
    int err = probe(s);
    if (err) return err;
    s->n_reprobes++;
    s->last_algo = NULL;
    char *e = s->event, t1[32], t2[32], b1[32], b2[32];
    size_t len = sizeof s->event, at = 0;
    int inter = s->lay.nodes > 1;
    at = appendf(e, len, at, "comm: re-probed%s%s: %s %s, %s -> %s, %s", why ? " " : "",
                 why ? why : "", inter ? "inter-node" : "intra-node",
                 fmt_bw(inter ? old.beta_inter : old.beta_intra, b1, sizeof b1),
                 fmt_time(inter ? old.alpha_inter : old.alpha_intra, t1, sizeof t1),
                 fmt_bw(inter ? s->pr.beta_inter : s->pr.beta_intra, b2, sizeof b2),
                 fmt_time(inter ? s->pr.alpha_inter : s->pr.alpha_intra, t2, sizeof t2));
    /* changed choices, as ranges of sizes with the same change */
    int changed = 0, i = 0;
    size_t b = 4;
    while (i < ns) {
        char now[48];
        comm_sel_choice(s, b, now, sizeof now, NULL);
        if (!strcmp(now, before[i])) {
            i++, b *= 2;
            continue;
        }
        size_t lo = b, hi = b;
        int j = i + 1;
        size_t bb = b * 2;
        for (; j < ns; j++, bb *= 2) {
            char n2[48];
            comm_sel_choice(s, bb, n2, sizeof n2, NULL);
            if (strcmp(n2, now) || strcmp(before[j], before[i])) break;
            hi = bb;
        }
        char l1[24], l2[24];
        comm_sel_fmt_bytes(lo, l1, sizeof l1);
        comm_sel_fmt_bytes(hi, l2, sizeof l2);
        if (lo == hi)
            at = appendf(e, len, at, "; %s: %s -> %s", l1, before[i], now);
        else
            at = appendf(e, len, at, "; %s..%s: %s -> %s", l1, l2, before[i], now);
        changed = 1;
        i = j, b = bb;
    }
    if (!changed) at = appendf(e, len, at, "; no change of algorithm");
    if (s->o.on_event) s->o.on_event(s->o.ud, e);
    return 0;
}

static const char *tune_str(const tune_entry *e, char *buf, size_t len) {
    char b[24], t[32], nm[48];
    size_t at =
        appendf(buf, len, 0, "tuned %s after %d calls:", comm_sel_fmt_bytes(e->bytes, b, sizeof b),
                e->calls);
    for (int k = 0; k < e->nc; k++)
        at = appendf(buf, len, at, "%s %s %s", k ? "," : "", choice_str(e->c[k], nm, sizeof nm),
                     fmt_time(e->med[k], t, sizeof t));
    appendf(buf, len, at, " -> %s", choice_str(e->c[e->best], nm, sizeof nm));
    return buf;
}

/* One agreed timing of the candidate comm_sel_pick handed out; after the
 * last one the fastest median wins (the same on every rank). */
static void tune_add(comm_sel *s, tune_entry *e, double m) {
    int reps = s->o.tune < TUNE_REPS ? s->o.tune : TUNE_REPS;
    e->t[e->calls % e->nc][e->calls / e->nc] = m;
    if (++e->calls < e->nc * reps) return;
    e->best = 0;
    for (int k = 0; k < e->nc; k++) {
        e->med[k] = median(e->t[k], reps);
        if (e->med[k] < e->med[e->best]) e->best = k;
    }
    s->last_algo = NULL;
    tune_str(e, s->event, sizeof s->event);
    if (s->o.on_event) s->o.on_event(s->o.ud, s->event);
}

int comm_sel_tuned(const comm_sel *s, size_t bytes, char *buf, size_t len) {
    const tune_entry *e = tune_find(s, bytes);
    if (!e) return s->o.tune > 0 && s->size > 1 && s->ntune < TUNE_MAX ? 0 : -1;
    if (e->nc < 2) return -1;
    if (e->best < 0) return 0;
    if (buf && len) tune_str(e, buf, len);
    return 1;
}

int comm_sel_record(comm_sel *s, size_t bytes, double seconds) {
    int err = 0;
    double m = seconds;
    MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &m, 1, MPI_DOUBLE, MPI_MAX, s->comm));
    if (s->size < 2) return 0;
    tune_entry *e = (tune_entry *)tune_find(s, bytes);
    if (e && e->best < 0) {
        tune_add(s, e, m);
        return 0;
    }
    double pred;
    char cur[48];
    comm_sel_choice(s, bytes, cur, sizeof cur, &pred);
    double want = pred * s->calib;
    if (!(want > 0)) return 0;
    double f = s->o.factor > 1 ? s->o.factor : 2.0, r = m / want;
    int after = s->o.after > 0 ? s->o.after : 3;
    if (r <= f && r >= 1 / f) {
        s->slow_run = 0;
        return 0;
    }
    if (++s->slow_run < after) return 0;
    s->slow_run = 0;
    char why[200], l[24], t1[32], t2[32];
    snprintf(why, sizeof why, "after %d %s buckets (%s %s: %s measured vs %s predicted)", after,
             r > 1 ? "slow" : "fast", comm_sel_fmt_bytes(bytes, l, sizeof l), cur,
             fmt_time(m, t1, sizeof t1), fmt_time(want, t2, sizeof t2));
    if ((err = comm_sel_reprobe(s, why))) return err;
    /* if the new model still misses this measurement, the model is off for
     * this machine rather than the network changed: calibrate, so the same
     * mismatch does not re-probe again and again */
    double np;
    comm_sel_choice(s, bytes, cur, sizeof cur, &np);
    double r2 = np > 0 ? m / np : 1;
    s->calib = (r2 > f || r2 < 1 / f) ? r2 : 1;
    return 1;
done:
    return err;
}

/* ---- explain -------------------------------------------------------------------- */

static const char *short_name(const char *n) {
    if (is(n, "recursive_doubling")) return "rec_dbl";
    if (is(n, "rabenseifner")) return "rabenseif";
    if (is(n, "parameter_server")) return "param_srv";
    if (is(n, "hierarchical")) return "hier";
    return n;
}

void comm_sel_explain(const comm_sel *s, FILE *f) {
    const comm_sel_probe *p = &s->pr;
    char a[32], b[32], c[32], sc[200];
    fprintf(f, "comm: layout: %d ranks on %d node%s, at most %d per node\n", s->lay.p, s->lay.nodes,
            s->lay.nodes == 1 ? "" : "s", s->lay.ppn);
    fprintf(f, "comm: probe (%.3f s): intra-node alpha %s beta %.3g ns/B (%s)\n", p->seconds,
            fmt_time(p->alpha_intra, a, sizeof a), p->beta_intra * 1e9,
            fmt_bw(p->beta_intra, b, sizeof b));
    if (s->lay.nodes > 1)
        fprintf(f, "comm: probe: inter-node alpha %s beta %.3g ns/B (%s)\n",
                fmt_time(p->alpha_inter, a, sizeof a), p->beta_inter * 1e9,
                fmt_bw(p->beta_inter, b, sizeof b));
    else
        fprintf(f, "comm: probe: inter-node: none (one node)\n");
    if (p->stream[0] > 0)
        fprintf(f, "comm: probe: %s\n", comm_ar_stream_str(s->ar, p->stream, sc, sizeof sc));
    fprintf(f, "comm: probe: gamma %.3g ns/B (local sum %s)\n", p->gamma * 1e9,
            fmt_bw(p->gamma, c, sizeof c));
    const comm_sel_calib *cal = &s->cal;
    if (cal->n > 0) {
        char l1[24], l2[24];
        fprintf(f,
                "comm: probe: calibration (%.3f s): %d candidates timed at %s..%s (median of "
                "%d-%d calls, slowest rank); predictions = model x measured/model, "
                "interpolated between sizes\n",
                cal->seconds, cal->ncand, comm_sel_fmt_bytes(cal->bytes[0], l1, sizeof l1),
                comm_sel_fmt_bytes(cal->bytes[cal->n - 1], l2, sizeof l2), cal->reps[cal->n - 1],
                cal->reps[0]);
        fprintf(f, "%5s %9s", "calib", "bytes");
        for (int i = 0; i < cal->ncand; i++) {
            char h[32];
            if (cal->inter[i])
                snprintf(h, sizeof h, "hier(%.5s)",
                         is(cal->inter[i], "recursive_doubling") ? "rd" : cal->inter[i]);
            fprintf(f, " %11s", cal->inter[i] ? h : short_name(cal->cand[i]));
        }
        fprintf(f, "  (us measured / measured:model)\n");
        for (int j = 0; j < cal->n; j++) {
            char l[24];
            fprintf(f, "%5s %9s", "calib", comm_sel_fmt_bytes(cal->bytes[j], l, sizeof l));
            for (int i = 0; i < cal->ncand; i++)
                if (cal->t[j][i] >= 0)
                    fprintf(f, " %11.1f", cal->t[j][i] * 1e6);
                else
                    fprintf(f, " %11s", "-");
            fprintf(f, "\n%5s %9s", "ratio", "");
            for (int i = 0; i < cal->ncand; i++)
                if (cal->t[j][i] >= 0)
                    fprintf(f, " %10.2fx", cal->f[j][i]);
                else
                    fprintf(f, " %11s", "-");
            fprintf(f, "\n");
        }
    } else {
        fprintf(f, "comm: probe: no calibration (model alone)\n");
    }
    if (s->o.bw_threshold > 0 || s->o.lat_threshold > 0)
        fprintf(f,
                "comm: thresholds: inter-node bandwidth < %.3g MB/s or latency > %s -> "
                "fallback %s where within %.2fx of the best: %s\n",
                s->o.bw_threshold / 1e6, fmt_time(s->o.lat_threshold, a, sizeof a),
                s->fallback ? s->fallback : "none", slack_of(&s->o),
                s->lay.nodes < 2       ? "not applicable (one node)"
                : comm_sel_degraded(s) ? "BELOW threshold: fallback mode"
                                       : "link is above the thresholds");
    fprintf(f, "comm: model: predicted time (us) per algorithm and size%s; choice per size%s\n",
            cal->n > 0 ? " (model x calibration; - = not eligible)" : "",
            comm_sel_degraded(s) ? " (* = fallback)" : "");
    fprintf(f, "%9s", "bytes");
    for (int i = 0; s->cand[i]; i++)
        fprintf(f, " %11s", short_name(s->cand[i]));
    /* with a calibration, the model's own pick is shown beside the final one:
     * the two disagree where the measurement overruled the model */
    fprintf(f, "%s  choice\n", cal->n > 0 ? "  model-alone" : "");
    for (size_t n = 4; n <= EXPLAIN_MAX; n *= 2) {
        char l[24], ch[48];
        fprintf(f, "%9s", comm_sel_fmt_bytes(n, l, sizeof l));
        for (int i = 0; s->cand[i]; i++) {
            const char *x;
            double t = cand_time(p, &s->lay, cal, s->cand[i], n, &x);
            if (t >= 0)
                fprintf(f, " %11.1f", t * 1e6);
            else
                fprintf(f, " %11s", "-");
        }
        if (cal->n > 0) {
            choice m = choose(&s->pr, &s->lay, s->cand, s->fallback, slack_of(&s->o),
                              comm_sel_degraded(s), NULL, n);
            fprintf(f, "  %s%s", choice_str(m, ch, sizeof ch), m.fallback ? "*" : "");
        }
        choice cc = sel_choose(s, n);
        fprintf(f, "  %s%s\n", choice_str(cc, ch, sizeof ch), cc.fallback ? "*" : "");
    }
}
