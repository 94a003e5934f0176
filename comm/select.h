/* comm_sel: the adaptive all-reduce selector (`comm.strategy: adaptive`).
 *
 * A short collective probe (tens of ms on one node, ~0.5 s over a 1 Gbit/s
 * link) measures, per link class (inside a node, between nodes), the
 * ping-pong latency alpha (s/message; 8-byte messages with all ranks paired
 * at once, as in a collective step, so the cost of ranks sharing cores is
 * in it) and the inverse bandwidth beta (s/byte; one pair alone, 4 MiB
 * messages), and the local reduction cost gamma
 * (s/byte summed, all ranks at once); across nodes a stream check then
 * times back-to-back 4 MiB hierarchical calls with whole messages and with
 * eager-sized pieces between nodes and keeps the faster (comm_ar inter_msg;
 * Open MPI over TCP stalls on whole messages sent both ways). The alpha-
 * beta-gamma model of comm/allreduce.h (comm_ar_model_time and
 * comm_ar_model_time_hier) then predicts every algorithm's time per message
 * size: the prior. The probe then calibrates: it times every candidate
 * (MPI_Allreduce included) for real at 8 B, 64 KiB, 1 MiB and 16 MiB (4 MiB
 * or fewer sizes where the time budget, 1 s on one node and 10 s across
 * nodes, would be exceeded; candidates over 3x the best from 1 MiB on are
 * not timed further), one MAX-over-ranks timing per call, median of a few
 * calls. Each candidate's prediction is its prior times a correction factor
 * measured/prior, interpolated log-log between calibration sizes and held
 * beyond them, so at a calibrated size the choice is the measured best; a
 * candidate no longer timed at a size is not chosen above it. The selector
 * picks the cheapest prediction. Every rank holds bitwise the same probe and
 * calibration numbers (agreed by exact MAX reductions), so every rank picks
 * the same algorithm for the same size with no communication per pick.
 *
 * Thresholds (seed style `thresholds: {bandwidth, latency}`, `fallback`): when
 * the communicator spans nodes and the measured inter-node bandwidth is below
 * the bandwidth threshold or its latency above the latency threshold, the
 * fallback algorithm is used for every size where the model predicts it at
 * most `fallback_slack` times slower than the best (default 1.25); where it
 * predicts more, the model's best is used and explain says so.
 *
 * Online re-selection: comm_sel_record() compares each call's measured time
 * (max over ranks, agreed in the call) with the prediction; after `after`
 * consecutive calls off by more than `factor`, all ranks re-probe together
 * and may switch; the switch is reported through a callback and
 * comm_sel_last_event().
 *
 * Model limits (deliberate; the calibration corrects them where it measured): flat algorithms
 * across nodes are costed with the inter-node alpha/beta, and with beta multiplied by the ranks per
 * node for the algorithms whose cross-node steps let all ranks of a node send through the node's
 * link at once (recursive doubling, Rabenseifner, parameter server); ring and tree are taken to
 * cross it one message at a time. No contention of oversubscribed cores, no eager/rendezvous
 * protocol switch.
 *
 * Not here: the algorithms (comm/allreduce.h), fusion buckets, compression,
 * parsing of the job file (the caller fills comm_sel_opts).
 */
#ifndef MPILM_COMM_SELECT_H
#define MPILM_COMM_SELECT_H

#include "comm/allreduce.h"
#include "comm/topo.h"

#include <mpi.h>
#include <stddef.h>
#include <stdio.h>

/* Calibration: candidates timed for real at a few sizes during the probe;
 * identical on every rank. t[j][i]: median over reps of the slowest rank's
 * seconds of cand[i] at bytes[j], < 0 where not timed (pruned or over the
 * budget); f[j][i] = t / model prior. */
#define COMM_SEL_NCAL 4
#define COMM_SEL_MAXCAND 16
typedef struct {
    int n;     /* calibrated sizes (0: none) */
    int ncand; /* candidates, as in cand[] */
    const char *cand[COMM_SEL_MAXCAND];
    /* hierarchical across nodes is timed once per inter-node algorithm
     * (ring, recursive doubling; Rabenseifner from 4 nodes): the model's
     * ranking among them misses transport effects (one large TCP message
     * beats two halves on a shaped link); NULL for the others */
    const char *inter[COMM_SEL_MAXCAND];
    size_t bytes[COMM_SEL_NCAL];
    int reps[COMM_SEL_NCAL];
    double t[COMM_SEL_NCAL][COMM_SEL_MAXCAND];
    double f[COMM_SEL_NCAL][COMM_SEL_MAXCAND];
    double seconds; /* how long the calibration took */
} comm_sel_calib;

/* Probe results; identical on every rank. */
typedef struct {
    double alpha_intra, beta_intra; /* s/message, s/byte between ranks of one node */
    double alpha_inter, beta_inter; /* between nodes; copies of intra on one node */
    double gamma;                   /* s/byte of a local float sum */
    /* Stream check across nodes (0 on one node): seconds of a 4 MiB
     * hierarchical(ring) call with whole messages / pieces / pieces and the
     * sliced scheme (comm_ar_stream_check) and the piece size chosen
     * (elements; 0: whole messages); whether sliced was kept is
     * comm_ar_hier_sliced() of the context. */
    double stream[3];
    size_t inter_msg;
    double seconds; /* how long the probe took (0 for synthetic) */
} comm_sel_probe;

/* Rank layout the model uses. */
typedef struct {
    int p;     /* ranks */
    int nodes; /* nodes spanned */
    int ppn;   /* most ranks on one node */
} comm_sel_layout;

#define COMM_SEL_TUNE_DEFAULT 3

typedef struct {
    /* Thresholds on the inter-node link (0: none): bytes/s and seconds. */
    double bw_threshold, lat_threshold;
    /* Fallback below the thresholds (table name); NULL: "parameter_server".
     * "none": thresholds are reported but never switch. */
    const char *fallback;
    /* Fallback used where predicted <= slack x best; <= 0: 1.25. */
    double fallback_slack;
    /* Candidate algorithm names, NULL-terminated; NULL: all table entries,
     * "mpi" (MPI_Allreduce) included: the model takes it as the best of
     * ring/RD/Rabenseifner, the calibration measures it. */
    const char *const *algos;
    /* Node of every rank, same array on all ranks (must match what comm_ar
     * uses for hierarchical); NULL: comm_topo_groups(topo). */
    const int *node_of_rank;
    comm_topo_method topo;
    /* Synthetic probe: no measurement, these numbers (tests, what-if); no
     * calibration at create (a later re-probe measures and calibrates). */
    const comm_sel_probe *probe;
    /* Calibration time budget in seconds: 0: 1 s on one node, 10 s across
     * nodes (enough to reach 16 MiB on 2 x 2 ranks at 1 Gbit/s, where the
     * large-message choice changes: bench/RESULTS.md); < 0: no calibration
     * (the model alone). */
    double calib_budget;
    /* Re-selection: off by more than factor (<= 1: 2.0) for `after` (<= 0:
     * 3) consecutive recorded calls. */
    double factor;
    int after;
    /* Online tuning: calls timed per candidate (median) the first time a
     * message size is recorded; 0: off. The candidates are the choices
     * predicted within 1.5x of the best (at most 3); once all are timed
     * (through comm_sel_record) the measured best is kept for that size, and
     * its measured time becomes the prediction re-selection compares with.
     * Not while the fallback is in force. Cleared by a re-probe.
     * COMM_SEL_TUNE_DEFAULT: what the trainer and the benchmark use. */
    int tune;
    /* Called on every rank with a one-line message (no newline) after each
     * re-probe ("re-selection ...") and each finished tuning ("tuned ...");
     * NULL: none. Print it on one rank. */
    void (*on_event)(void *ud, const char *msg);
    void *ud;
} comm_sel_opts;

typedef struct comm_sel comm_sel;

/* Collective over comm (the communicator `ar` was created on): finds the
 * node groups and probes (unless opts->probe). opts may be NULL. Returns 0 or
 * a negative COMM_ERR_*; on error *out is NULL. */
int comm_sel_create(MPI_Comm comm, comm_ar *ar, const comm_sel_opts *opts, comm_sel **out);
/* Collective (frees the communicator dup). NULL-safe. */
void comm_sel_destroy(comm_sel *sel);

/* Local. The algorithm for an all-reduce of `bytes` bytes; the same on every
 * rank. For hierarchical it also sets ar's inter-node algorithm
 * (comm_ar_set_inter) to the one the model chose. Never NULL. */
const comm_ar_algo *comm_sel_pick(comm_sel *sel, size_t bytes);
/* Local. The inter-node algorithm the model prefers for hierarchical at
 * `bytes` (what the calibration and a hierarchical pick use). */
const char *comm_sel_hier_inter(const comm_sel *sel, size_t bytes);
/* Local. Name of the choice for `bytes`, e.g. "rabenseifner" or
 * "hierarchical(ring)"; written to buf (returned). Predicted seconds in *t. */
const char *comm_sel_choice(const comm_sel *sel, size_t bytes, char *buf, size_t len, double *t);

/* Collective: every rank calls it after the same all-reduce with its own
 * measured seconds (the max over ranks is agreed inside, one MPI_Allreduce
 * of a double). Returns 1 when it re-probed (the event text is then in
 * comm_sel_last_event and was passed to on_event), 0 when not, < 0 on error. */
int comm_sel_record(comm_sel *sel, size_t bytes, double seconds);
/* Local. 1 when online tuning has finished for `bytes` (text "tuned 4 MiB:
 * ring 1.2 ms, tree 1.9 ms -> ring" in buf), 0 when it is under way or not
 * started, -1 when it does not apply (tuning off, one rank, fallback, a
 * single candidate, or no room left in the table). */
int comm_sel_tuned(const comm_sel *sel, size_t bytes, char *buf, size_t len);
/* Collective: probe again now (as comm_sel_record does when triggered). */
int comm_sel_reprobe(comm_sel *sel, const char *why);

/* Local queries. */
const comm_sel_probe *comm_sel_get_probe(const comm_sel *sel);
const comm_sel_calib *comm_sel_get_calib(const comm_sel *sel);
const comm_sel_layout *comm_sel_get_layout(const comm_sel *sel);
const char *comm_sel_last_event(const comm_sel *sel); /* "" if none */
int comm_sel_n_reprobes(const comm_sel *sel);
/* 1 when the thresholds put the selector in fallback mode. */
int comm_sel_degraded(const comm_sel *sel);

/* Local. Prints the probe, the thresholds, the model's table of predicted
 * times per algorithm for 4 B .. 256 MiB (powers of two) and the choice per
 * size. Call it on one rank. */
void comm_sel_explain(const comm_sel *sel, FILE *f);

/* Local, pure: predicted seconds of `name` ("hierarchical" with the given
 * inter-node algorithm, NULL: best one) for a probe and layout; < 0 for an
 * unknown name. Used by the selector and by tests. */
double comm_sel_predict(const comm_sel_probe *pr, const comm_sel_layout *lay, const char *name,
                        const char *inter, size_t bytes);

/* Local, pure: the selection for a probe and layout under opts (only the
 * thresholds, fallback, slack and algos fields are used); writes the name
 * (as comm_sel_choice) to buf, the prediction to *t (may be NULL). */
const char *comm_sel_best(const comm_sel_probe *pr, const comm_sel_layout *lay,
                          const comm_sel_opts *opts, size_t bytes, char *buf, size_t len,
                          double *t);

/* Local: "1.5 KiB", "64 MiB" (powers of two) into buf. */
const char *comm_sel_fmt_bytes(size_t bytes, char *buf, size_t len);

#endif
