/* bench compress: gradient compression (comm/compress.h) measured two ways.
 *
 * Training (default): N data-parallel training steps of a job (default
 * jobs/small.yaml) on the ranks of the launch, once per compressor, same
 * seed and data, dense ("none") first: mean step time, time the step waited
 * for the gradient all-reduce, bytes sent per step per rank, speed-up of the
 * step against dense, and the loss after the N steps (mean of the last
 * training losses, and the validation loss) against dense, all in one run.
 * Step figures are means over the compressed steps (after warm-up and the
 * first step).
 *
 * --micro: one bucket of --count floats through comm_cx_allreduce per
 * compressor, median time over ranks' maxima and the time per phase (see
 * comm_cx_phase), against MPI_Allreduce of the same bucket in the same run.
 *
 * Not here: the compressors themselves, the trainer; no file is kept but the
 * CSV (--csv).
 */
#include "bench/bench.h"

#include "comm/allreduce.h"
#include "comm/compress.h"
#include "io/fsutil.h"
#include "src/spmd.h"
#include "src/train.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_SPECS 32
#define MAX_ITERS 1000

/* "NAME[:PARAM][/PAYLOAD]": topk:RATIO, powersgd:RANK, int8/4/2 with "-sr"
 * for stochastic rounding (the trainer rounds to nearest under error
 * feedback); PAYLOAD update or gradient (comm.compression.payload; none
 * given: the job's) */
typedef struct {
    char text[32];
    comm_cx_type type;
    double param;
    int stochastic;
    char payload[16];
} cx_spec;

static int parse_specs(const char *list, cx_spec *out, int max) {
    char buf[512];
    int n = 0;
    snprintf(buf, sizeof buf, "%s", list);
    for (char *sv = NULL, *t = strtok_r(buf, ",", &sv); t; t = strtok_r(NULL, ",", &sv)) {
        if (n == max) return -1;
        cx_spec *s = &out[n];
        memset(s, 0, sizeof *s);
        snprintf(s->text, sizeof s->text, "%s", t);
        char name[32];
        snprintf(name, sizeof name, "%s", t);
        char *slash = strchr(name, '/');
        if (slash) {
            *slash = 0;
            if (strcmp(slash + 1, "update") && strcmp(slash + 1, "gradient")) return -1;
            snprintf(s->payload, sizeof s->payload, "%s", slash + 1);
        }
        char *colon = strchr(name, ':');
        if (colon) *colon = 0, s->param = atof(colon + 1);
        size_t l = strlen(name);
        if (l > 3 && !strcmp(name + l - 3, "-sr")) name[l - 3] = 0, s->stochastic = 1;
        if (comm_cx_type_from_name(name, &s->type)) return -1;
        if (s->type == COMM_CX_TOPK && !(s->param > 0 && s->param <= 1)) s->param = 0.01;
        if (s->type == COMM_CX_POWERSGD && s->param < 1) s->param = 4;
        if (s->stochastic && comm_cx_int_type(8) != s->type && comm_cx_int_type(4) != s->type &&
            comm_cx_int_type(2) != s->type)
            return -1;
        n++;
    }
    return n;
}

static int cmp_dbl(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* ---- --micro ------------------------------------------------------------ */

/* Gaussian gradients with a spread of magnitudes per 1024 elements, distinct
 * per rank (splitmix64 + Box-Muller). */
static void fill_grad(float *g, size_t n, int rank) {
    uint64_t s = 0x1234567ULL + (uint64_t)rank * 0x9e3779b97f4a7c15ULL;
    for (size_t i = 0; i < n; i++) {
        uint64_t z = (s += 0x9e3779b97f4a7c15ULL);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        z ^= z >> 31;
        double u1 = ((double)(z >> 40) + 0.5) / 16777216.0;
        double u2 = (double)(z & 0xffffff) / 16777216.0;
        double scale = ldexp(1.0, -8 - (int)((i / 1024) % 8));
        g[i] = (float)(scale * sqrt(-2 * log(u1)) * cos(6.283185307179586 * u2));
    }
}

static int micro(MPI_Comm comm, size_t count, int iters, const cx_spec *sp, int ns,
                 const char *dense, const char *label, const char *csv) {
    int rank, world, err = 0;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &world);
    float *src = malloc(count * sizeof(float)), *g = malloc(count * sizeof(float));
    double *t = malloc((size_t)(iters + 1) * sizeof(double));
    /* per call and phase, for medians per phase */
    double *pt = malloc((size_t)(iters + 1) * COMM_CX_NPHASES * sizeof(double));
    comm_ar *ar = NULL;
    const comm_ar_algo *algo = comm_ar_find(dense);
    /* powersgd: the bucket as matrices of 256 columns (the rest dense) */
    size_t cols = 256, nm = count / (cols * 256), rows_each = 256;
    size_t *mr = malloc((nm + 1) * sizeof(size_t)), *mc = malloc((nm + 1) * sizeof(size_t));
    int bad = !src || !g || !t || !pt || !mr || !mc;
    if (spmd_agree(comm, bad, "mpilm bench compress", "out of memory")) {
        err = 1;
        goto done;
    }
    if (spmd_agree(comm, !algo, "mpilm bench compress", "unknown --dense algorithm") ||
        spmd_agree(comm, comm_ar_create(comm, NULL, &ar), "mpilm bench compress",
                   "comm_ar_create failed")) {
        err = 1;
        goto done;
    }
    for (size_t m = 0; m < nm; m++)
        mr[m] = rows_each, mc[m] = cols;
    fill_grad(src, count, rank);
    if (rank == 0)
        printf("bench compress --micro: %zu floats (%.2f MiB), %d ranks, %d timed calls after 3 "
               "warm-up calls; time = median over calls of the slowest rank; dense parts "
               "(powersgd) via %s\n",
               count, count * 4.0 / 1048576, world, iters, dense);
    double base_ms = 0;
    FILE *f = NULL;
    if (rank == 0 && csv) {
        char hdr[1024] =
            "label,ranks,count,compressor,median_ms,min_ms,vs_mpi_allreduce,bytes_sent";
        for (int ph = 0; ph < COMM_CX_NPHASES; ph++) {
            strcat(hdr, ",");
            strcat(hdr, comm_cx_phase_name((comm_cx_phase)ph));
        }
        f = bench_csv_open(csv, hdr);
        if (!f) fprintf(stderr, "mpilm bench compress: cannot open %s\n", csv);
    }
    for (int s = -1; s < ns && !err; s++) {
        comm_cx *cx = NULL;
        const char *name = "mpi_allreduce";
        if (s >= 0) {
            comm_cx_opts o;
            comm_cx_opts_default(&o);
            o.type = sp[s].type;
            o.stochastic = sp[s].stochastic;
            if (o.type == COMM_CX_TOPK) o.ratio = sp[s].param;
            if (o.type == COMM_CX_POWERSGD) {
                o.rank = (int)sp[s].param;
                o.n_mats = nm, o.mat_rows = mr, o.mat_cols = mc;
            }
            int rc = comm_cx_create(comm, &o, count, &cx);
            if (spmd_agree(comm, rc, "mpilm bench compress", "comm_cx_create failed")) {
                err = 1;
                break;
            }
            comm_cx_set_dense(cx, ar, algo->fn);
            name = sp[s].text;
        }
        uint64_t bytes = 0;
        for (int it = -3; it < iters; it++) {
            memcpy(g, src, count * sizeof(float));
            MPI_Barrier(comm);
            double t0 = spmd_now();
            int rc = 0;
            if (cx)
                rc = comm_cx_allreduce(cx, g, count, it + 3, COMM_SUM, &bytes);
            else
                rc = MPI_Allreduce(MPI_IN_PLACE, g, (int)count, MPI_FLOAT, MPI_SUM, comm);
            double dt = spmd_now() - t0;
            if (spmd_agree(comm, rc, "mpilm bench compress", "all-reduce failed")) {
                err = 1;
                break;
            }
            MPI_Allreduce(MPI_IN_PLACE, &dt, 1, MPI_DOUBLE, MPI_MAX, comm);
            double *ph = pt + (size_t)(it < 0 ? iters : it) * COMM_CX_NPHASES;
            memset(ph, 0, COMM_CX_NPHASES * sizeof *ph);
            if (cx) comm_cx_phase_times(cx, ph), comm_cx_phase_reset(cx);
            if (it >= 0) t[it] = dt * 1e3;
        }
        if (err) {
            comm_cx_destroy(cx);
            break;
        }
        qsort(t, (size_t)iters, sizeof *t, cmp_dbl);
        double med = t[iters / 2], mn = t[0];
        if (!cx) base_ms = med;
        /* median per phase over the calls, then the slowest rank's */
        double ph[COMM_CX_NPHASES] = {0};
        for (int p = 0; p < COMM_CX_NPHASES; p++) {
            double v[MAX_ITERS];
            for (int i = 0; i < iters; i++)
                v[i] = pt[(size_t)i * COMM_CX_NPHASES + p];
            qsort(v, (size_t)iters, sizeof *v, cmp_dbl);
            ph[p] = v[iters / 2];
        }
        MPI_Allreduce(MPI_IN_PLACE, ph, COMM_CX_NPHASES, MPI_DOUBLE, MPI_MAX, comm);
        if (!cx) bytes = (uint64_t)(2.0 * (world - 1) / world * 4.0 * (double)count);
        if (rank == 0) {
            printf("  %-14s %8.3f ms (min %8.3f)  %5.2fx MPI_Allreduce  %9llu B/call", name, med,
                   mn, med / base_ms, (unsigned long long)bytes);
            int any = 0;
            for (int p = 0; p < COMM_CX_NPHASES; p++)
                if (ph[p] > 0) {
                    printf("%s%s %.3f", any ? ", " : "  | ", comm_cx_phase_name((comm_cx_phase)p),
                           ph[p] * 1e3);
                    any = 1;
                }
            printf("\n");
            if (f) {
                fprintf(f, "%s,%d,%zu,%s,%.4f,%.4f,%.3f,%llu", label, world, count, name, med, mn,
                        med / base_ms, (unsigned long long)bytes);
                for (int p = 0; p < COMM_CX_NPHASES; p++)
                    fprintf(f, ",%.4f", ph[p] * 1e3);
                fprintf(f, "\n");
            }
        }
        comm_cx_destroy(cx);
    }
    if (f) fclose(f);
done:
    comm_ar_destroy(ar);
    free(src), free(g), free(t), free(pt), free(mr), free(mc);
    return err;
}

/* ---- training ----------------------------------------------------------- */

/* value of "key": NUMBER in a JSON line; 0 when absent */
static int jnum(const char *line, const char *key, double *v) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\": ", key);
    const char *p = strstr(line, pat);
    if (!p) return 0;
    *v = strtod(p + strlen(pat), NULL);
    return 1;
}

static void jstr(const char *line, const char *key, char *out, size_t len) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\": \"", key);
    const char *p = strstr(line, pat);
    if (!p) return;
    p += strlen(pat);
    const char *e = strchr(p, '"');
    if (!e) return;
    snprintf(out, len, "%.*s", (int)(e - p), p);
}

typedef struct {
    double step_ms, comm_ms, busy_ms, bytes, loss, val_loss;
    int timed;
    char mode[32], algorithm[64];
} run_stats;

/* Means over steps > max(1, from) of metrics.jsonl; loss = mean of the last
 * `last` training losses. Rank 0 only. */
static int read_metrics(const char *file, int from, int last, int steps, run_stats *r) {
    FILE *f = fopen(file, "r");
    if (!f) return -1;
    memset(r, 0, sizeof *r);
    r->val_loss = -1;
    double *loss = calloc((size_t)steps + 1, sizeof *loss);
    char line[4096];
    int nl = 0;
    while (loss && fgets(line, sizeof line, f)) {
        double step = 0, v = 0;
        if (!jnum(line, "step", &step)) continue;
        if (jnum(line, "val_loss", &v)) r->val_loss = v;
        if (!jnum(line, "loss", &v)) continue;
        if (nl <= steps) loss[nl++] = v;
        if ((int)step <= (from > 1 ? from : 1)) continue;
        double a = 0, b = 0, c = 0, d = 0;
        jnum(line, "step_ms", &a), jnum(line, "dp_allreduce_ms", &b);
        jnum(line, "dp_allreduce_busy_ms", &c), jnum(line, "bytes_sent", &d);
        r->step_ms += a, r->comm_ms += b, r->busy_ms += c, r->bytes += d;
        r->timed++;
        jstr(line, "compression", r->mode, sizeof r->mode);
        jstr(line, "algorithm", r->algorithm, sizeof r->algorithm);
    }
    fclose(f);
    if (r->timed)
        r->step_ms /= r->timed, r->comm_ms /= r->timed, r->busy_ms /= r->timed,
            r->bytes /= r->timed;
    int k = last < nl ? last : nl;
    for (int i = nl - k; i < nl; i++)
        r->loss += loss[i] / k;
    free(loss);
    return r->timed ? 0 : -1;
}

static void usage(void) {
    printf(
        "usage: mpilm bench compress [--job JOB.yaml] [--steps N] [--warmup W]\n"
        "                            [--compressors LIST] [--set k=v]... [--label L] [--csv FILE]\n"
        "       mpilm bench compress --micro [--count N] [--iters K] [--compressors LIST]\n"
        "                            [--dense ALGO] [--label L] [--csv FILE]\n"
        "Training: N steps of JOB (default jobs/small.yaml, 30 steps) per compressor on the\n"
        "ranks of the launch, same seed and data; compression starts after W steps (default\n"
        "5; comm.compression.warmup_steps). Reports mean step ms, the time the step waited\n"
        "for the gradient all-reduce, bytes sent per step per rank (means over compressed\n"
        "steps), speed-up vs dense, and the loss after N steps (mean of the last 10 training\n"
        "losses) and the final validation loss, each vs dense in %%.\n"
        "--micro: one bucket of N floats (default 120576, jobs/tiny.yaml's gradient)\n"
        "through comm_cx_allreduce, K timed calls (default 50), median time per phase\n"
        "(comm_cx_phase), against MPI_Allreduce of the same bucket; the compressor's dense\n"
        "all-reduces (powersgd's P and Q) use ALGO (comm_ar table name, default mpi).\n"
        "LIST: comma-separated none,fp16,bf16,int8,int4,int2,topk:RATIO,powersgd:RANK\n"
        "(int8-sr etc.: stochastic rounding; the trainer rounds to nearest with error\n"
        "feedback), each optionally with /update or /gradient (comm.compression.payload).\n"
        "Default: none,fp16,bf16,int8,int4,int2,topk:0.01,topk:0.01/gradient,topk:0.1,\n"
        "powersgd:4,powersgd:2\n"
        "(micro: without none, with int8-sr,int4-sr,int2-sr).\n");
}

int bench_compress(int argc, char **argv, MPI_Comm comm) {
    const char *job = "jobs/small.yaml", *csv = NULL, *label = "local", *list = NULL;
    const char *dense_algo = "mpi";
    const char *sets[64];
    int nsets = 0, steps = 30, warm = 5, is_micro = 0, iters = 50, rank, world, rc = 0;
    size_t count = 120576;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &world);
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--job") && i + 1 < argc)
            job = argv[++i];
        else if (!strcmp(argv[i], "--csv") && i + 1 < argc)
            csv = argv[++i];
        else if (!strcmp(argv[i], "--label") && i + 1 < argc)
            label = argv[++i];
        else if (!strcmp(argv[i], "--steps") && i + 1 < argc)
            steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--warmup") && i + 1 < argc)
            warm = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--compressors") && i + 1 < argc)
            list = argv[++i];
        else if (!strcmp(argv[i], "--count") && i + 1 < argc)
            count = (size_t)atoll(argv[++i]);
        else if (!strcmp(argv[i], "--iters") && i + 1 < argc)
            iters = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--micro"))
            is_micro = 1;
        else if (!strcmp(argv[i], "--dense") && i + 1 < argc)
            dense_algo = argv[++i];
        else if (!strcmp(argv[i], "--set") && i + 1 < argc && nsets < 56)
            sets[nsets++] = argv[++i];
        else {
            if (rank == 0) usage();
            return strcmp(argv[i], "--help") && strcmp(argv[i], "-h") ? 2 : 0;
        }
    }
    cx_spec sp[MAX_SPECS];
    if (!list)
        list = is_micro ? "fp16,bf16,int8,int4,int2,int8-sr,int4-sr,int2-sr,topk:0.01,topk:0.1,"
                          "powersgd:4"
                        : "none,fp16,bf16,int8,int4,int2,topk:0.01,topk:0.01/gradient,topk:0.1,"
                          "powersgd:4,powersgd:2";
    int ns = parse_specs(list, sp, MAX_SPECS);
    if (ns <= 0 || steps < 2 || warm < 0 || warm >= steps || iters < 1 || iters > MAX_ITERS ||
        count < 1 || count > (size_t)INT32_MAX) {
        if (rank == 0) fprintf(stderr, "mpilm bench compress: bad arguments (see --help)\n");
        return 2;
    }
    if (is_micro) return micro(comm, count, iters, sp, ns, dense_algo, label, csv) ? 1 : 0;

    char st[64], ev[64], wu[64];
    snprintf(st, sizeof st, "train.steps=%d", steps);
    snprintf(ev, sizeof ev, "train.eval_every=%d", steps);
    snprintf(wu, sizeof wu, "comm.compression.warmup_steps=%d", warm);
    sets[nsets++] = st;
    sets[nsets++] = ev;
    sets[nsets++] = wu;
    sets[nsets++] = "checkpoint.dir=";
    sets[nsets++] = "log.every=1";
    char dir[128];
    if (rank == 0) snprintf(dir, sizeof dir, "/tmp/mpilm-bench-compress.%d", (int)getpid());
    MPI_Bcast(dir, sizeof dir, MPI_CHAR, 0, comm);
    run_stats dense = {0};
    int have_dense = 0;
    FILE *f = NULL;
    if (rank == 0 && csv)
        f = bench_csv_open(csv,
                           "label,ranks,job,compressor,steps,warmup,step_ms,comm_wait_ms,"
                           "comm_busy_ms,bytes_per_step,speedup_vs_dense,loss,loss_vs_dense_pct,"
                           "val_loss,val_vs_dense_pct,mode,algorithm");
    if (rank == 0 && csv && !f) fprintf(stderr, "mpilm bench compress: cannot open %s\n", csv);
    for (int s = 0; s < ns && !rc; s++) {
        char t1[64], t2[64], t3[64];
        const char *cs[72];
        int nc = 0;
        for (int i = 0; i < nsets; i++)
            cs[nc++] = sets[i];
        snprintf(t1, sizeof t1, "comm.compression.type=%s", comm_cx_type_name(sp[s].type));
        cs[nc++] = t1;
        if (sp[s].type == COMM_CX_TOPK) {
            snprintf(t2, sizeof t2, "comm.compression.ratio=%g", sp[s].param);
            cs[nc++] = t2;
        }
        if (sp[s].type == COMM_CX_POWERSGD) {
            snprintf(t3, sizeof t3, "comm.compression.rank=%d", (int)sp[s].param);
            cs[nc++] = t3;
        }
        char t4[64];
        if (sp[s].payload[0]) {
            snprintf(t4, sizeof t4, "comm.compression.payload=%s", sp[s].payload);
            cs[nc++] = t4;
        }
        job_config c;
        char err[1024];
        rc = config_load(&c, job, cs, nc, err, sizeof err);
        if (spmd_agree(comm, rc, "mpilm bench compress", err)) return 1;
        snprintf(c.log.dir, sizeof c.log.dir, "%s/%d", dir, s);
        if (s == 0 && rank == 0)
            printf("bench compress: %s | %d ranks | %d steps, compression from step %d | "
                   "strategy %s | model %d layers x %d, global batch %d x %d\n",
                   job, world, steps, warm + 1, c.comm.strategy, c.model.n_layer, c.model.n_embd,
                   c.train.global_batch, c.model.block_size);
        train_result r;
        if (train_run(comm, &c, 1, NULL, &r)) {
            rc = 1;
            break;
        }
        if (rank != 0) continue;
        char mf[CFG_STR + 32];
        snprintf(mf, sizeof mf, "%s/metrics.jsonl", c.log.dir);
        run_stats m;
        /* the first step and the dense warm-up steps are not timed */
        if (read_metrics(mf, sp[s].type == COMM_CX_NONE ? 1 : warm + 1, 10, steps, &m)) {
            fprintf(stderr, "mpilm bench compress: cannot read %s\n", mf);
            continue;
        }
        if (sp[s].type == COMM_CX_NONE && !have_dense) dense = m, have_dense = 1;
        double sp_up = have_dense ? dense.step_ms / m.step_ms : 0;
        double dl = have_dense ? 100 * (m.loss - dense.loss) / dense.loss : 0;
        double dv = have_dense && dense.val_loss > 0
                        ? 100 * (m.val_loss - dense.val_loss) / dense.val_loss
                        : 0;
        if (s == 0)
            printf("  %-19s %9s %9s %9s %12s %8s %8s %8s %8s %8s  %s\n", "compressor", "step ms",
                   "wait ms", "busy ms", "bytes/step", "speedup", "loss", "vs dense", "val",
                   "vs dense", "mode");
        printf("  %-19s %9.1f %9.1f %9.1f %12.0f %7.2fx %8.4f %+7.2f%% %8.4f %+7.2f%%  %s\n",
               sp[s].text, m.step_ms, m.comm_ms, m.busy_ms, m.bytes, sp_up, m.loss, dl, m.val_loss,
               dv, m.mode);
        fflush(stdout);
        if (f)
            fprintf(f, "%s,%d,%s,%s,%d,%d,%.2f,%.2f,%.2f,%.0f,%.3f,%.5f,%.3f,%.5f,%.3f,%s,%s\n",
                    label, world, job, sp[s].text, steps, sp[s].type == COMM_CX_NONE ? 0 : warm,
                    m.step_ms, m.comm_ms, m.busy_ms, m.bytes, sp_up, m.loss, dl, m.val_loss, dv,
                    m.mode, m.algorithm);
    }
    if (f) fclose(f);
    if (rank == 0) fs_rm_rf(dir);
    return rc ? 1 : 0;
}
