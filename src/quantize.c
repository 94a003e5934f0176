/* quantize: the `mpilm quantize` driver (see quantize.h). */
#include "src/quantize.h"

#include "io/ckpt.h"
#include "io/qckpt.h"
#include "io/tokfile.h"
#include "kernels/kern.h"
#include "kernels/quant.h"
#include "src/config.h"
#include "src/data.h"
#include "src/eval.h"
#include "src/gpt.h"
#include "src/gptio.h"
#include "src/spmd.h"

#include <getopt.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define PROG "mpilm quantize"
#define FMT_AUTO QUANT_NFMT
#define DEFAULT_MAX_REL_ERROR 0.07

static void usage(FILE *f) {
    fprintf(f,
            "usage: mpilm quantize --ckpt CKPT --out OUT --format q8|q4|q4a|nf4|auto\n"
            "                      [--max-rel-error E] [--quantize-embeddings] [--force]\n"
            "                      [--eval DATA [--split val] [--batches N] [--batch-size B]]\n"
            "                      [--json]\n\n"
            "Quantizes the linear weights of checkpoint CKPT (a step directory or a\n"
            "checkpoint root, whose `latest` is used) in blocks of 32 weights with fp16\n"
            "scales and writes OUT/step-N/checkpoint.h5 (+ OUT/latest) atomically:\n"
            "/qmodel/<name>/{q,scale,min} and float tensors under /model/ (io/qckpt.h).\n"
            "Embeddings (wte, wpe), LayerNorms and biases stay fp32 unless\n"
            "--quantize-embeddings (wte, wpe). Formats (bits/weight incl. scales):\n"
            "  q8 8.5, q4 4.5, q4a 5.0, nf4 4.5;\n"
            "  auto: per tensor the 4-bit format with the lowest error if its relative\n"
            "  RMSE is below E (default %.3g), else q8 if below E, else fp32.\n"
            "Ranks divide the tensors by size; any rank count works. OUT must not hold\n"
            "a checkpoint unless --force. --eval DATA: loss, perplexity, KL divergence\n"
            "and top-1 agreement of the fp32 and quantized models on DATA/SPLIT.tok\n"
            "(default every whole batch of B = 8 rows).\n",
            DEFAULT_MAX_REL_ERROR);
}

void quantize_assign(const uint64_t *size, int n, int p, int *owner) {
    int *order = malloc((size_t)(n > 0 ? n : 1) * sizeof *order);
    uint64_t *load = calloc((size_t)p, sizeof *load);
    for (int i = 0; i < n; i++) order[i] = i;
    /* insertion sort: size descending, index ascending (n is small) */
    for (int i = 1; i < n; i++) {
        int v = order[i], j = i - 1;
        while (j >= 0 && size[order[j]] < size[v]) {
            order[j + 1] = order[j];
            j--;
        }
        order[j + 1] = v;
    }
    for (int k = 0; k < n; k++) {
        int best = 0;
        for (int r = 1; r < p; r++)
            if (load[r] < load[best]) best = r;
        owner[order[k]] = best;
        load[best] += size[order[k]];
    }
    free(order);
    free(load);
}

typedef struct {
    int fmt;                 /* QCKPT_FP32 or quant_fmt */
    double rel_rmse, bits;   /* bits per weight incl. scales */
    double bytes;            /* stored bytes */
    double err4[QUANT_NFMT]; /* auto: error of every format tried (-1: not tried) */
} tensor_report;

/* Quantizes w (rows, cols) as `want` (a format or FMT_AUTO) into *out
 * (malloc'ed; NULL when kept fp32). */
static int quantize_one(const float *w, size_t rows, size_t cols, int want, double max_err,
                        tensor_report *r, void **out) {
    size_t n = rows * cols;
    float *d = malloc(n * sizeof(float));
    void *best = NULL;
    int rc = -1;
    *out = NULL;
    r->fmt = QCKPT_FP32;
    r->rel_rmse = 0;
    for (int f = 0; f < QUANT_NFMT; f++) r->err4[f] = -1;
    if (!d) return -1;
    int cand[4], nc = 0;
    if (want == FMT_AUTO) {
        cand[nc++] = QUANT_Q4;
        cand[nc++] = QUANT_Q4A;
        cand[nc++] = QUANT_NF4;
        cand[nc++] = QUANT_Q8;
    } else
        cand[nc++] = want;
    int chosen = QCKPT_FP32;
    double chosen_err = 0;
    for (int k = 0; k < nc; k++) {
        quant_fmt f = (quant_fmt)cand[k];
        if (want == FMT_AUTO && f == QUANT_Q8 && chosen != QCKPT_FP32) break; /* 4-bit fits */
        void *buf = malloc(quant_tensor_bytes(f, rows, cols));
        if (!buf) goto done;
        int qrc = quant_tensor(f, w, rows, cols, buf);
        if (qrc == 0) qrc = dequant_tensor(f, buf, rows, cols, d);
        if (qrc != 0) { /* e.g. -ERANGE: weights beyond fp16 scales */
            free(buf);
            if (want != FMT_AUTO) {
                rc = qrc;
                goto done;
            }
            continue;
        }
        double e = quant_rel_rmse(w, d, n);
        r->err4[f] = e;
        int take = want != FMT_AUTO ||
                   (e < max_err && (chosen == QCKPT_FP32 || (f != QUANT_Q8 && e < chosen_err)));
        if (take) {
            free(best);
            best = buf;
            chosen = f;
            chosen_err = e;
        } else
            free(buf);
    }
    r->fmt = chosen;
    r->rel_rmse = chosen_err;
    *out = best;
    best = NULL;
    rc = 0;
done:
    free(best);
    free(d);
    if (chosen == QCKPT_FP32 || rc) {
        r->bits = 32;
        r->bytes = (double)n * 4;
    } else {
        r->bytes = (double)quant_tensor_bytes((quant_fmt)chosen, rows, cols);
        r->bits = r->bytes * 8 / (double)n;
    }
    return rc;
}

static const char *fmt_str(int f) { return f == QCKPT_FP32 ? "fp32" : quant_fmt_name((quant_fmt)f); }

/* Collective: KL(p_fp32 || p_quant) summed over next-token distributions,
 * top-1 agreements, over batches [0, nb) spread round-robin. */
static void compare_models(MPI_Comm comm, gpt *a, gpt *b, const tokfile *tf, int B, int nb,
                           double *kl_mean, double *top1) {
    int rank, p, T = gpt_cfg(a)->block_size, V = gpt_cfg(a)->vocab_size;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &p);
    size_t N = (size_t)B * T;
    int *inp = malloc(N * sizeof(int)), *tgt = malloc(N * sizeof(int));
    float *la = malloc(N * (size_t)V * sizeof(float));
    double loc[2] = {0, 0}, all[2] = {0, 0};
    for (int i = rank; inp && tgt && la && i < nb; i += p) {
        data_read_rows(tf, (uint64_t)i * B * T, B, T, inp, tgt);
        gpt_forward(a, inp, NULL, B, T, 0.f);
        memcpy(la, gpt_logits(a), N * (size_t)V * sizeof(float));
        gpt_forward(b, inp, NULL, B, T, 0.f);
        const float *lb = gpt_logits(b);
        for (size_t n = 0; n < N; n++) {
            const float *x = la + n * V, *y = lb + n * V;
            double mx = x[0], my = y[0];
            int ax = 0, ay = 0;
            for (int v = 1; v < V; v++) {
                if (x[v] > mx) mx = x[v], ax = v;
                if (y[v] > my) my = y[v], ay = v;
            }
            double sx = 0, sy = 0;
            for (int v = 0; v < V; v++) {
                sx += exp(x[v] - mx);
                sy += exp(y[v] - my);
            }
            double lzx = mx + log(sx), lzy = my + log(sy), kl = 0;
            for (int v = 0; v < V; v++) {
                double lpx = x[v] - lzx, lpy = y[v] - lzy;
                kl += exp(lpx) * (lpx - lpy);
            }
            loc[0] += kl;
            loc[1] += ax == ay;
        }
    }
    free(inp);
    free(tgt);
    free(la);
    MPI_Allreduce(loc, all, 2, MPI_DOUBLE, MPI_SUM, comm);
    double tokens = (double)nb * (double)N;
    *kl_mean = all[0] / tokens;
    *top1 = all[1] / tokens;
}

/* Directory part of a path (a checkpoint.h5 -> its step directory). */
static void dir_of(const char *file, char *out, size_t n) {
    snprintf(out, n, "%s", file);
    char *s = strrchr(out, '/');
    if (s) *s = 0;
    else snprintf(out, n, ".");
}

static int same_path(const char *a, const char *b) {
    char ra[PATH_MAX], rb[PATH_MAX];
    return realpath(a, ra) && realpath(b, rb) && !strcmp(ra, rb);
}

int quantize_main(int argc, char **argv, MPI_Comm comm) {
    int rank, p, o, json = 0, force = 0, qemb = 0, B = 8, nb = 0, fault_rank = -1,
                    fault_after = -1;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &p);
    const char *ckpt = NULL, *out = NULL, *fmt_name = NULL, *data = NULL, *split = "val";
    double max_err = DEFAULT_MAX_REL_ERROR;
    static const struct option opts[] = {
        {"ckpt", required_argument, 0, 'c'},
        {"out", required_argument, 0, 'o'},
        {"format", required_argument, 0, 'f'},
        {"max-rel-error", required_argument, 0, 'e'},
        {"quantize-embeddings", no_argument, 0, 'E'},
        {"eval", required_argument, 0, 'd'},
        {"split", required_argument, 0, 's'},
        {"batches", required_argument, 0, 'n'},
        {"batch-size", required_argument, 0, 'b'},
        {"json", no_argument, 0, 'j'},
        {"force", no_argument, 0, 'F'},
        {"fault-rank", required_argument, 0, 'R'}, /* tests: kill a rank mid-write */
        {"fault-after", required_argument, 0, 'A'},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    optind = 1;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case 'c': ckpt = optarg; break;
        case 'o': out = optarg; break;
        case 'f': fmt_name = optarg; break;
        case 'e': max_err = atof(optarg); break;
        case 'E': qemb = 1; break;
        case 'd': data = optarg; break;
        case 's': split = optarg; break;
        case 'n': nb = atoi(optarg); break;
        case 'b': B = atoi(optarg); break;
        case 'j': json = 1; break;
        case 'F': force = 1; break;
        case 'R': fault_rank = atoi(optarg); break;
        case 'A': fault_after = atoi(optarg); break;
        case 'h':
            if (rank == 0) usage(stdout);
            return 0;
        default:
            if (rank == 0) usage(stderr);
            return 2;
        }
    }
    if (!ckpt || !out || !fmt_name || B <= 0 || nb < 0 || !(max_err > 0)) {
        if (rank == 0) usage(stderr);
        return 2;
    }
    int want;
    quant_fmt qf;
    if (!strcmp(fmt_name, "auto")) want = FMT_AUTO;
    else if (quant_fmt_from_name(fmt_name, &qf) == 0) want = (int)qf;
    else {
        if (rank == 0)
            fprintf(stderr, "%s: unknown format '%s' (expected q8, q4, q4a, nf4 or auto)\n", PROG,
                    fmt_name);
        return 2;
    }
    kern_set_threads(spmd_threads_per_rank(comm));

    char err[1024] = "", file[4200], sdir[4200], root[4200];
    ckpt_meta meta = {0}, m2 = {0};
    job_config cfg;
    gpt *g = NULL, *g32 = NULL, *gq = NULL;
    ckpt_tensor *mine = NULL;
    qckpt_tensor *qt = NULL;
    tensor_report *rep = NULL;
    void **qbuf = NULL;
    uint64_t *size = NULL;
    int *owner = NULL, nt = 0, rc = 1, nmine = 0;
    tokfile tf = {0};
    double t0 = spmd_now(), t_read = 0, t_quant = 0, t_write = 0, t_eval = 0;

    /* 1. the input: complete, a float checkpoint; the output: free */
    int orc = ckpt_resolve(ckpt, file, sizeof file, err, sizeof err);
    if (!orc) {
        dir_of(file, sdir, sizeof sdir);
        size_t n = strlen(sdir);
        if (n >= 4 && !strcmp(sdir + n - 4, ".tmp")) {
            snprintf(err, sizeof err,
                     "%s: incomplete checkpoint (a .tmp step directory is a save that did not "
                     "finish); use a complete step or the checkpoint root",
                     sdir);
            orc = -1;
        }
    }
    if (!orc) orc = ckpt_read_meta(file, &meta, err, sizeof err);
    if (!orc && qckpt_is_quantized(file) == 1) {
        snprintf(err, sizeof err, "%s is already a quantized checkpoint", file);
        orc = -1;
    }
    if (!orc) {
        char e2[512];
        if (config_load_text(&cfg, file, meta.config, e2, sizeof e2)) {
            snprintf(err, sizeof err, "%s: stored config does not parse: %s", file, e2);
            orc = -1;
        } else if (gpt_create(&cfg.model, &g) != 0) {
            snprintf(err, sizeof err, "%s: cannot allocate the model", file);
            orc = -1;
        }
    }
    if (!orc) {
        dir_of(sdir, root, sizeof root);
        if (same_path(out, sdir) || same_path(out, root)) {
            snprintf(err, sizeof err, "%s: output is the input checkpoint's directory; choose "
                                      "another --out", out);
            orc = -1;
        } else if (rank == 0)
            orc = qckpt_out_check(out, force, err, sizeof err);
    }
    if (spmd_agree(comm, orc, PROG, err)) goto done;

    /* 2. plan: every tensor gets an owner, balanced by size */
    nt = gpt_ntensors(g);
    size = calloc((size_t)nt, sizeof *size);
    owner = calloc((size_t)nt, sizeof *owner);
    mine = calloc((size_t)nt, sizeof *mine);
    qt = calloc((size_t)nt, sizeof *qt);
    rep = calloc((size_t)nt, sizeof *rep);
    qbuf = calloc((size_t)nt, sizeof *qbuf);
    char (*names)[64] = calloc((size_t)nt, 64);
    orc = !size || !owner || !mine || !qt || !rep || !qbuf || !names;
    if (spmd_agree(comm, orc, PROG, "out of memory")) {
        free(names);
        goto done;
    }
    for (int i = 0; i < nt; i++) size[i] = gpt_tensor_at(g, i)->numel;
    quantize_assign(size, nt, p, owner);
    for (int i = 0; i < nt; i++) {
        const gpt_tensor *gt = gpt_tensor_at(g, i);
        if (owner[i] != rank) continue;
        ckpt_tensor *c = &mine[nmine++];
        snprintf(names[i], 64, "model/%s", gt->name);
        c->name = names[i];
        c->ndim = gt->ndim;
        c->rows = (uint64_t)gt->shape[0];
        c->cols = gt->ndim == 2 ? (uint64_t)gt->shape[1] : 1;
        c->row0 = 0;
        c->nrows = c->rows;
        c->data = gpt_params(g) + gt->offset;
    }

    /* 3. each rank reads and verifies only its tensors */
    double t = spmd_now();
    orc = ckpt_load(MPI_COMM_SELF, file, mine, nmine, &m2, err, sizeof err);
    free(m2.config);
    m2.config = NULL;
    t_read = spmd_now() - t;
    if (spmd_agree(comm, orc, PROG, err)) {
        free(names);
        goto done;
    }

    /* 4. quantize mine */
    t = spmd_now();
    orc = 0;
    for (int i = 0; i < nt && !orc; i++) {
        const gpt_tensor *gt = gpt_tensor_at(g, i);
        int emb = !strcmp(gt->name, "wte") || !strcmp(gt->name, "wpe");
        if (owner[i] != rank) continue;
        if (gt->ndim != 2 || (emb && !qemb)) {
            rep[i].fmt = QCKPT_FP32;
            rep[i].bits = 32;
            rep[i].bytes = (double)gt->numel * 4;
            for (int f = 0; f < QUANT_NFMT; f++) rep[i].err4[f] = -1;
            continue;
        }
        int q = quantize_one(gpt_params(g) + gt->offset, (size_t)gt->shape[0],
                             (size_t)gt->shape[1], want, max_err, &rep[i], &qbuf[i]);
        if (q) {
            snprintf(err, sizeof err, "%s: tensor %s cannot be quantized as %s (%s)", file,
                     gt->name, fmt_name,
                     q == -34 ? "weights too large for fp16 scales" : "invalid weights");
            orc = -1;
        }
    }
    t_quant = spmd_now() - t;
    if (spmd_agree(comm, orc, PROG, err)) {
        free(names);
        goto done;
    }
    /* everyone learns every tensor's format and figures (owner's values, zeros elsewhere) */
    {
        int nd = 4 + QUANT_NFMT;
        double *v = calloc((size_t)nt * nd, sizeof(double)), *s = calloc((size_t)nt * nd, sizeof(double));
        for (int i = 0; v && s && i < nt; i++) {
            if (owner[i] != rank) continue;
            v[i * nd] = rep[i].fmt;
            v[i * nd + 1] = rep[i].rel_rmse;
            v[i * nd + 2] = rep[i].bits;
            v[i * nd + 3] = rep[i].bytes;
            for (int f = 0; f < QUANT_NFMT; f++) v[i * nd + 4 + f] = rep[i].err4[f];
        }
        orc = !v || !s;
        if (!orc) MPI_Allreduce(v, s, nt * nd, MPI_DOUBLE, MPI_SUM, comm);
        for (int i = 0; !orc && i < nt; i++) {
            rep[i].fmt = (int)lround(s[i * nd]);
            rep[i].rel_rmse = s[i * nd + 1];
            rep[i].bits = s[i * nd + 2];
            rep[i].bytes = s[i * nd + 3];
            for (int f = 0; f < QUANT_NFMT; f++) rep[i].err4[f] = s[i * nd + 4 + f];
        }
        free(v);
        free(s);
        if (spmd_agree(comm, orc, PROG, "out of memory")) {
            free(names);
            goto done;
        }
    }

    /* 5. write collectively */
    for (int i = 0; i < nt; i++) {
        const gpt_tensor *gt = gpt_tensor_at(g, i);
        qt[i].name = gt->name;
        qt[i].ndim = gt->ndim;
        qt[i].rows = (uint64_t)gt->shape[0];
        qt[i].cols = gt->ndim == 2 ? (uint64_t)gt->shape[1] : 1;
        qt[i].fmt = rep[i].fmt;
        qt[i].owner = owner[i];
        qt[i].data = owner[i] != rank ? NULL
                     : rep[i].fmt == QCKPT_FP32 ? (const void *)(gpt_params(g) + gt->offset)
                                                : qbuf[i];
    }
    t = spmd_now();
    qckpt_save_opts so = {force, fault_rank, fault_after};
    orc = qckpt_save(comm, out, qt, nt, &meta, &so, err, sizeof err);
    t_write = spmd_now() - t;
    free(names);
    if (orc == CKPT_ERR_FATAL) {
        if (rank == 0 || !strstr(err, "another rank")) fprintf(stderr, "%s: %s\n", PROG, err);
        MPI_Abort(comm, 1);
    }
    if (spmd_agree(comm, orc, PROG, err)) goto done;
    double tq[3] = {t_read, t_quant, t_write}, tmax[3];
    MPI_Reduce(tq, tmax, 3, MPI_DOUBLE, MPI_MAX, 0, comm);
    double t_total = spmd_now() - t0;

    /* 6. optional evaluation: fp32 vs the checkpoint just written */
    double loss32 = 0, lossq = 0, kl = 0, top1 = 0;
    long long tokens = 0;
    if (data) {
        t = spmd_now();
        if (spmd_agree(comm, gptio_open(comm, ckpt, &g32, &m2, err, sizeof err), PROG, err))
            goto done;
        free(m2.config);
        m2.config = NULL;
        if (spmd_agree(comm, gptio_open(comm, out, &gq, &m2, err, sizeof err), PROG, err))
            goto done;
        free(m2.config);
        m2.config = NULL;
        orc = eval_open_split(data, split, g32, B, &nb, &tf, err, sizeof err);
        if (spmd_agree(comm, orc, PROG, err)) goto done;
        loss32 = eval_loss(comm, g32, &tf, B, nb, &tokens);
        lossq = eval_loss(comm, gq, &tf, B, nb, &tokens);
        compare_models(comm, g32, gq, &tf, B, nb, &kl, &top1);
        t_eval = spmd_now() - t;
    }

    /* 7. report */
    if (rank == 0) {
        double before = 0, after = 0, qw = 0, qbits = 0;
        for (int i = 0; i < nt; i++) {
            before += (double)size[i] * 4;
            after += rep[i].bytes;
            if (rep[i].fmt != QCKPT_FP32) {
                qw += (double)size[i];
                qbits += rep[i].bytes * 8;
            }
        }
        double nparam = before / 4;
        char outfile[4400];
        snprintf(outfile, sizeof outfile, "%s/step-%08lld/checkpoint.h5", out, meta.step);
        struct stat st;
        double fbytes = stat(outfile, &st) == 0 ? (double)st.st_size : 0;
        if (json) {
            printf("{\"checkpoint\": \"%s\", \"out\": \"%s\", \"step\": %lld, \"format\": \"%s\", "
                   "\"max_rel_error\": %g, \"ranks\": %d, \"tensors\": [",
                   file, outfile, meta.step, fmt_name, max_err, p);
            for (int i = 0; i < nt; i++) {
                const gpt_tensor *gt = gpt_tensor_at(g, i);
                printf("%s{\"name\": \"%s\", \"shape\": [%d, %d], \"format\": \"%s\", "
                       "\"bits_per_weight\": %.4f, \"rel_rmse\": %.6g, \"bytes\": %.0f, "
                       "\"rank\": %d",
                       i ? ", " : "", gt->name, gt->shape[0], gt->ndim == 2 ? gt->shape[1] : 1,
                       fmt_str(rep[i].fmt), rep[i].bits, rep[i].rel_rmse, rep[i].bytes,
                       owner[i]);
                if (want == FMT_AUTO && rep[i].err4[0] >= 0) {
                    printf(", \"tried\": {");
                    int first = 1;
                    for (int f = 0; f < QUANT_NFMT; f++)
                        if (rep[i].err4[f] >= 0) {
                            printf("%s\"%s\": %.6g", first ? "" : ", ",
                                   quant_fmt_name((quant_fmt)f), rep[i].err4[f]);
                            first = 0;
                        }
                    printf("}");
                }
                printf("}");
            }
            printf("], \"params\": %.0f, \"size_before\": %.0f, \"size_after\": %.0f, "
                   "\"file_bytes\": %.0f, \"ratio\": %.4f, \"bits_per_weight\": %.4f, "
                   "\"quantized_params\": %.0f, \"quantized_bits_per_weight\": %.4f, "
                   "\"time_s\": {\"read\": %.4f, \"quantize\": %.4f, \"write\": %.4f, "
                   "\"total\": %.4f}",
                   nparam, before, after, fbytes, before / after, after * 8 / nparam, qw,
                   qw > 0 ? qbits / qw : 0, tmax[0], tmax[1], tmax[2], t_total);
            if (data)
                printf(", \"eval\": {\"split\": \"%s\", \"tokens\": %lld, \"batches\": %d, "
                       "\"fp32\": {\"val_loss\": %.6f, \"perplexity\": %.6f}, "
                       "\"quant\": {\"val_loss\": %.6f, \"perplexity\": %.6f}, "
                       "\"ppl_increase_pct\": %.4f, \"kl\": %.6g, \"top1_agreement\": %.6f, "
                       "\"time_s\": %.3f}",
                       split, tokens, nb, loss32, exp(loss32), lossq, exp(lossq),
                       (exp(lossq - loss32) - 1) * 100, kl, top1, t_eval);
            printf("}\n");
        } else {
            printf("%s (step %lld) -> %s, format %s%s, %d rank(s)\n", file, meta.step, outfile,
                   fmt_name, want == FMT_AUTO ? "" : "", p);
            if (want == FMT_AUTO) printf("auto: max relative RMSE %g\n", max_err);
            printf("  %-28s %-12s %-5s %6s %10s %4s\n", "tensor", "shape", "fmt", "bits",
                   "rel_rmse", "rank");
            for (int i = 0; i < nt; i++) {
                const gpt_tensor *gt = gpt_tensor_at(g, i);
                char shape[32];
                if (gt->ndim == 2) snprintf(shape, sizeof shape, "%dx%d", gt->shape[0], gt->shape[1]);
                else snprintf(shape, sizeof shape, "%d", gt->shape[0]);
                printf("  %-28s %-12s %-5s %6.2f %10.5f %4d\n", gt->name, shape,
                       fmt_str(rep[i].fmt), rep[i].bits, rep[i].rel_rmse, owner[i]);
            }
            printf("size: %.3f MiB fp32 -> %.3f MiB (%.2fx, %.2f bits/weight overall, %.2f over "
                   "the %.0f quantized weights); file %.3f MiB\n",
                   before / 1048576, after / 1048576, before / after, after * 8 / nparam,
                   qw > 0 ? qbits / qw : 0, qw, fbytes / 1048576);
            printf("time: read %.3f s, quantize %.3f s, write %.3f s, total %.3f s\n", tmax[0],
                   tmax[1], tmax[2], t_total);
            if (data)
                printf("eval on %s (%lld tokens): fp32 loss %.5f ppl %.4f | quantized loss %.5f "
                       "ppl %.4f (%+.3f%%) | KL %.3g | top-1 agreement %.4f\n",
                       split, tokens, loss32, exp(loss32), lossq, exp(lossq),
                       (exp(lossq - loss32) - 1) * 100, kl, top1);
        }
        fflush(stdout);
    }
    rc = 0;
done:
    tokfile_close(&tf);
    for (int i = 0; qbuf && i < nt; i++) free(qbuf[i]);
    free(qbuf);
    free(rep);
    free(qt);
    free(mine);
    free(owner);
    free(size);
    free(meta.config);
    free(m2.config);
    gpt_destroy(g);
    gpt_destroy(g32);
    gpt_destroy(gq);
    return rc;
}
