/* bench allreduce: every all-reduce algorithm of comm/allreduce.h, the
 * adaptive selector's pick (comm/select.h) and MPI_Allreduce, in the same run,
 * over message sizes. Per size and column: OSU-style avg/min/max latency
 * (over ranks, of each rank's mean over iterations), the median over
 * iterations of the slowest rank's time, and nccl-tests-style algbw =
 * bytes / median and busbw = algbw x 2(n-1)/n. Rank 0 prints the table and,
 * per size, adaptive / MPI and adaptive / best fixed algorithm (medians).
 * Columns are interleaved within each iteration, in a fresh random order per
 * iteration (the same on all ranks), so that the noise of a shared machine
 * and the after-effects of one algorithm on the next hit all of them alike.
 * The hierarchical column uses the inter-node algorithm the selector's model
 * prefers at that size. float32 SUM, in place,
 * buffers of zeros. Not here: compression (bench compress), the trainer.
 */
#include "bench/bench.h"

#include "comm/allreduce.h"
#include "comm/select.h"
#include "comm/topo.h"
#include "src/spmd.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define MAX_COLS 16
#define MAX_SIZES 64

static void usage(FILE *f) {
    fprintf(f, "usage: mpilm bench allreduce [--sizes MIN:MAX[:FACTOR] | --sizes A,B,...]\n"
               "                             [--algos all|NAME,...] [--iters N] [--explain]\n"
               "                             [--topo shared|hostname|latency] [--label L]\n"
               "                             [--csv FILE] [--calib-budget S] [--tune N]\n"
               "Latency (avg/min/max over ranks, median over iterations), algbw and busbw of\n"
               "every all-reduce algorithm, 'adaptive' (the selector's pick per size) and\n"
               "'mpi' (MPI_Allreduce) in the same run; adaptive/MPI and adaptive/best-fixed\n"
               "ratios per size. Defaults: --sizes 4:268435456:4 --algos all --iters 20\n"
               "(5 N up to 64 KiB; fewer above 1 MiB: N x 1 MiB / size, at least 3).\n"
               "--calib-budget S: the selector's calibration budget in seconds (0: default,\n"
               "-1: none, the model alone).\n"
               "--tune N: adaptive tunes online first, as in training: the candidates\n"
               "predicted within 1.5x of the best, N timed calls each, the fastest median\n"
               "kept (default %d; 0: the start-up choice alone). The calls are reported\n"
               "apart, not in the timed iterations.\n"
               "--explain prints the selector's probe, model table and choice per size.\n",
            COMM_SEL_TUNE_DEFAULT);
}

static int parse_sizes(const char *s, size_t *out, int max) {
    int n = 0;
    if (strchr(s, ':')) {
        char *e;
        double lo = strtod(s, &e), hi, fac = 4;
        if (*e != ':') return -1;
        hi = strtod(e + 1, &e);
        if (*e == ':') fac = strtod(e + 1, &e);
        if (*e || lo < 1 || hi < lo || fac <= 1) return -1;
        for (double b = lo; b <= hi * (1 + 1e-9) && n < max; b *= fac)
            out[n++] = (size_t)b;
    } else {
        char buf[1024], *save = NULL;
        snprintf(buf, sizeof buf, "%s", s);
        for (char *t = strtok_r(buf, ",", &save); t && n < max; t = strtok_r(NULL, ",", &save)) {
            char *e;
            double b = strtod(t, &e);
            if (*e || b < 1) return -1;
            out[n++] = (size_t)b;
        }
    }
    for (int i = 0; i < n; i++)
        out[i] -= out[i] % sizeof(float); /* whole floats */
    return n;
}

static int dcmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, dcmp);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

int bench_allreduce(int argc, char **argv, MPI_Comm comm) {
    const char *sizes_s = "4:268435456:4", *algos_s = "all", *csv = NULL, *label = "local";
    int iters = 20, explain = 0, tune = COMM_SEL_TUNE_DEFAULT;
    double calib_budget = 0;
    comm_topo_method topo = COMM_TOPO_SHARED;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--sizes") && i + 1 < argc)
            sizes_s = argv[++i];
        else if (!strcmp(argv[i], "--algos") && i + 1 < argc)
            algos_s = argv[++i];
        else if (!strcmp(argv[i], "--iters") && i + 1 < argc)
            iters = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--csv") && i + 1 < argc)
            csv = argv[++i];
        else if (!strcmp(argv[i], "--label") && i + 1 < argc)
            label = argv[++i];
        else if (!strcmp(argv[i], "--explain"))
            explain = 1;
        else if (!strcmp(argv[i], "--tune") && i + 1 < argc)
            tune = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--calib-budget") && i + 1 < argc)
            calib_budget = atof(argv[++i]);
        else if (!strcmp(argv[i], "--topo") && i + 1 < argc) {
            const char *t = argv[++i];
            if (!strcmp(t, "shared"))
                topo = COMM_TOPO_SHARED;
            else if (!strcmp(t, "hostname"))
                topo = COMM_TOPO_HOSTNAME;
            else if (!strcmp(t, "latency"))
                topo = COMM_TOPO_LATENCY;
            else {
                usage(stderr);
                return 2;
            }
        } else {
            int help = !strcmp(argv[i], "--help") || !strcmp(argv[i], "-h");
            int rank;
            MPI_Comm_rank(comm, &rank);
            if (rank == 0) usage(help ? stdout : stderr);
            return help ? 0 : 2;
        }
    }
    int rank, p, rc = 0;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &p);
    size_t sizes[MAX_SIZES];
    int nsz = parse_sizes(sizes_s, sizes, MAX_SIZES);
    /* columns: fixed algorithms, then adaptive, then mpi */
    const comm_ar_algo *col[MAX_COLS];
    const char *cname[MAX_COLS];
    int ncol = 0, bad = nsz < 1 || iters < 1;
    if (!strcmp(algos_s, "all")) {
        for (int i = 0; comm_ar_algos[i].name; i++)
            if (strcmp(comm_ar_algos[i].name, "mpi"))
                col[ncol] = &comm_ar_algos[i], cname[ncol++] = comm_ar_algos[i].name;
    } else {
        char buf[512], *save = NULL;
        snprintf(buf, sizeof buf, "%s", algos_s);
        for (char *t = strtok_r(buf, ",", &save); t && ncol < MAX_COLS - 2;
             t = strtok_r(NULL, ",", &save)) {
            const comm_ar_algo *a = comm_ar_find(t);
            if (!a || !strcmp(t, "mpi") || !strcmp(t, "adaptive")) {
                if (!a && strcmp(t, "mpi") && strcmp(t, "adaptive")) bad = 1;
                continue;
            }
            col[ncol] = a, cname[ncol++] = a->name;
        }
    }
    int c_adapt = ncol, c_mpi = ncol + 1, nfixed = ncol;
    col[c_adapt] = NULL, cname[c_adapt] = "adaptive";
    col[c_mpi] = comm_ar_find("mpi"), cname[c_mpi] = "MPI_Allreduce";
    ncol += 2;
    if (bad) {
        if (rank == 0) {
            fprintf(stderr, "mpilm bench allreduce: bad --sizes, --algos or --iters\n");
            usage(stderr);
        }
        return 2;
    }

    comm_ar *ar = NULL;
    comm_sel *sel = NULL;
    float *buf = NULL;
    double *t = NULL, *tmax = NULL, *loc = NULL, *lmin = NULL, *lmax = NULL, *lsum = NULL;
    FILE *f = NULL;
    size_t maxb = 0;
    for (int i = 0; i < nsz; i++)
        maxb = sizes[i] > maxb ? sizes[i] : maxb;
    int err = comm_ar_create(comm, NULL, &ar);
    if (spmd_agree(comm, err, "mpilm bench allreduce", "cannot create the all-reduce context"))
        return 1;
    comm_sel_opts so = {.topo = topo, .calib_budget = calib_budget, .tune = tune};
    err = comm_sel_create(comm, ar, &so, &sel);
    if (spmd_agree(comm, err, "mpilm bench allreduce", "selector probe failed")) {
        rc = 1;
        goto done;
    }
    const comm_sel_layout *lay = comm_sel_get_layout(sel);
    if (comm_ar_n_nodes(ar) != lay->nodes && rank == 0)
        fprintf(stderr,
                "mpilm bench allreduce: note: hierarchical sees %d node(s), the selector %d "
                "(--topo)\n",
                comm_ar_n_nodes(ar), lay->nodes);
    if (rank == 0 && explain) {
        comm_sel_explain(sel, stdout);
        printf("\n");
    }
    buf = calloc(maxb / sizeof(float) + 1, sizeof(float));
    t = malloc((size_t)ncol * 5 * iters * sizeof *t);
    tmax = malloc((size_t)ncol * 5 * iters * sizeof *t);
    loc = malloc(3 * (size_t)ncol * sizeof *loc);
    lmin = malloc((size_t)ncol * sizeof *t);
    lmax = malloc((size_t)ncol * sizeof *t);
    lsum = malloc((size_t)ncol * sizeof *t);
    err = !buf || !t || !tmax || !loc || !lmin || !lmax || !lsum;
    if (spmd_agree(comm, err, "mpilm bench allreduce", "out of memory")) {
        rc = 1;
        goto done;
    }
    if (rank == 0 && csv)
        f = bench_csv_open(csv, "label,ranks,nodes,ppn,bytes,algo,choice,iters,avg_us,min_us,"
                                "max_us,med_us,algbw_GBps,busbw_GBps");
    if (rank == 0) {
        printf("# mpilm bench allreduce: %d ranks, %d node(s), <= %d per node; float32 SUM in "
               "place\n",
               p, lay->nodes, lay->ppn);
        printf("# avg/min/max: over ranks of each rank's mean (OSU); med: median over iterations "
               "of the slowest rank; algbw = bytes/med, busbw = algbw*2(n-1)/n\n");
        printf("%10s %-26s %5s %11s %11s %11s %11s %9s %9s\n", "bytes", "algorithm", "iters",
               "avg_us", "min_us", "max_us", "med_us", "algbw", "busbw");
    }
    double summary[MAX_SIZES][4]; /* adaptive, mpi, best fixed medians, best index */
    char picks[MAX_SIZES][48], tuned[MAX_SIZES][256];
    double t_start = MPI_Wtime(), t_tune = 0;
    int n_tune = 0;
    for (int s = 0; s < nsz && !rc; s++) {
        size_t bytes = sizes[s], n = bytes / sizeof(float);
        int it = iters;
        if (bytes <= ((size_t)64 << 10)) it = 5 * iters; /* cheap, and noisy */
        if (bytes > ((size_t)1 << 20)) {
            it = (int)((double)iters * (double)(1 << 20) / (double)bytes);
            if (it < 3) it = 3;
            if (it > iters) it = iters;
        }
        /* adaptive as the trainer runs it: online tuning first (the calls
         * are counted apart; a training job repeats its bucket sizes) */
        double tt0 = MPI_Wtime();
        tuned[s][0] = 0;
        for (int k = 0; c_adapt >= 0 && k < 64 && comm_sel_tuned(sel, bytes, NULL, 0) == 0; k++) {
            const comm_ar_algo *a = comm_sel_pick(sel, bytes);
            MPI_Barrier(comm);
            double t0 = MPI_Wtime();
            int e = a->fn(ar, n ? buf : NULL, n, COMM_SUM);
            if (e || comm_sel_record(sel, bytes, MPI_Wtime() - t0) < 0) break;
            n_tune++;
        }
        t_tune += MPI_Wtime() - tt0;
        if (comm_sel_tuned(sel, bytes, tuned[s], sizeof tuned[s]) != 1) tuned[s][0] = 0;
        comm_sel_choice(sel, bytes, picks[s], sizeof picks[s], NULL);
        const char *hinter = comm_sel_hier_inter(sel, bytes);
        int fail = 0, order[MAX_COLS];
        unsigned long long rng = 0x9e3779b97f4a7c15ULL ^ bytes;
        /* warm-up: one call per column */
        for (int c = 0; c < ncol; c++) {
            const comm_ar_algo *a = c == c_adapt ? comm_sel_pick(sel, bytes) : col[c];
            if (c != c_adapt && !strcmp(a->name, "hierarchical")) comm_ar_set_inter(ar, hinter);
            fail |= a->fn(ar, n ? buf : NULL, n, COMM_SUM) != 0;
        }
        for (int i = 0; i < it; i++) {
            /* Fisher-Yates with a generator every rank steps alike */
            for (int c = 0; c < ncol; c++)
                order[c] = c;
            for (int c = ncol - 1; c > 0; c--) {
                rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
                int r = (int)((rng >> 33) % (unsigned long long)(c + 1)), x = order[c];
                order[c] = order[r], order[r] = x;
            }
            for (int k = 0; k < ncol; k++) {
                int c = order[k];
                const comm_ar_algo *a = c == c_adapt ? comm_sel_pick(sel, bytes) : col[c];
                if (c != c_adapt && !strcmp(a->name, "hierarchical")) comm_ar_set_inter(ar, hinter);
                MPI_Barrier(comm);
                double t0 = MPI_Wtime();
                fail |= a->fn(ar, n ? buf : NULL, n, COMM_SUM) != 0;
                t[c * it + i] = MPI_Wtime() - t0;
            }
        }
        if (spmd_agree(comm, fail, "mpilm bench allreduce", "an all-reduce failed")) {
            rc = 1;
            break;
        }
        MPI_Reduce(t, tmax, ncol * it, MPI_DOUBLE, MPI_MAX, 0, comm);
        for (int c = 0; c < ncol; c++) {
            double m = 0;
            for (int i = 0; i < it; i++)
                m += t[c * it + i];
            loc[c] = m / it;
        }
        MPI_Reduce(loc, lmin, ncol, MPI_DOUBLE, MPI_MIN, 0, comm);
        MPI_Reduce(loc, lmax, ncol, MPI_DOUBLE, MPI_MAX, 0, comm);
        MPI_Reduce(loc, lsum, ncol, MPI_DOUBLE, MPI_SUM, 0, comm);
        if (rank != 0) continue;
        double best = -1;
        int bi = 0;
        for (int c = 0; c < ncol; c++) {
            double med = median(tmax + c * it, it);
            double algbw = med > 0 ? bytes / med / 1e9 : 0, busbw = algbw * 2.0 * (p - 1) / p;
            char name[80];
            if (c == c_adapt)
                snprintf(name, sizeof name, "adaptive=%s", picks[s]);
            else
                snprintf(name, sizeof name, "%s", cname[c]);
            printf("%10zu %-26s %5d %11.1f %11.1f %11.1f %11.1f %9.3f %9.3f\n", bytes, name, it,
                   lsum[c] / p * 1e6, lmin[c] * 1e6, lmax[c] * 1e6, med * 1e6, algbw, busbw);
            if (f)
                fprintf(f, "%s,%d,%d,%d,%zu,%s,%s,%d,%.3f,%.3f,%.3f,%.3f,%.5f,%.5f\n", label, p,
                        lay->nodes, lay->ppn, bytes, c == c_adapt ? "adaptive" : cname[c],
                        c == c_adapt ? picks[s] : "", it, lsum[c] / p * 1e6, lmin[c] * 1e6,
                        lmax[c] * 1e6, med * 1e6, algbw, busbw);
            if (c < nfixed && (best < 0 || med < best)) best = med, bi = c;
            if (c == c_adapt) summary[s][0] = med;
            if (c == c_mpi) summary[s][1] = med;
        }
        summary[s][2] = best, summary[s][3] = bi;
        fflush(stdout);
    }
    if (rank == 0 && !rc && tune > 0 && c_adapt >= 0) {
        printf("\n# online tuning of adaptive (--tune %d): %d calls, %.1f s, before the timed "
               "iterations\n",
               tune, n_tune, t_tune);
        for (int s = 0; s < nsz; s++)
            if (tuned[s][0]) printf("# %s\n", tuned[s]);
    }
    if (rank == 0 && !rc) {
        printf("\n# adaptive vs MPI_Allreduce and the best fixed algorithm (medians; < 1 = "
               "adaptive faster)\n");
        printf("%10s %-28s %12s %12s %-20s %12s %9s %9s\n", "bytes", "adaptive pick", "adaptive_us",
               "mpi_us", "best fixed", "best_us", "ad/mpi", "ad/best");
        int ok_mpi = 0, ok_best = 0, ok_mpi3 = 0;
        for (int s = 0; s < nsz; s++) {
            double a = summary[s][0], m = summary[s][1], b = summary[s][2];
            printf("%10zu %-28s %12.1f %12.1f %-20s %12.1f %9.2f %9.2f\n", sizes[s], picks[s],
                   a * 1e6, m * 1e6, cname[(int)summary[s][3]], b * 1e6, m > 0 ? a / m : 0,
                   b > 0 ? a / b : 0);
            ok_mpi += a <= m;
            ok_mpi3 += a <= 1.03 * m;
            ok_best += a <= 1.05 * b;
        }
        printf("# adaptive <= MPI_Allreduce at %d/%d sizes (<= 1.03x at %d/%d); within 5%% of the "
               "best fixed at %d/%d sizes; sweep %.1f s\n",
               ok_mpi, nsz, ok_mpi3, nsz, ok_best, nsz, MPI_Wtime() - t_start);
    }
done:
    if (f) fclose(f);
    free(buf);
    free(t);
    free(tmax);
    free(loc);
    free(lmin);
    free(lmax);
    free(lsum);
    comm_sel_destroy(sel);
    comm_ar_destroy(ar);
    return rc;
}
