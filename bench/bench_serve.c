/* bench serve: decode speed of the inference engine (src/infer.h) for fp32
 * and quantized weights, at several batch sizes, on every rank of the launch
 * (each rank a whole-model replica decoding its own sequences; aggregate
 * tokens/s). Models are built in memory with the model's own initialisation:
 * "small" (jobs/small.yaml's shape, weights fit in L2/L3) and "large" (12 x
 * 1024, ~150M parameters, ~600 MB fp32: far beyond the L3 cache, so decode
 * streams the weights from DRAM), quantized in memory (infer_quantize).
 * Baselines measured in the same run: fp32 decode (speed-up column) and a
 * streaming read of a large buffer by the same threads on all ranks (the
 * memory bandwidth that bounds a memory-bound decode).
 * Not here: request scheduling, HTTP, sampling cost (greedy argmax only).
 */
#include "bench/bench.h"

#include "kernels/kern.h"
#include "kernels/quant.h"
#include "src/gpt.h"
#include "src/infer.h"
#include "src/spmd.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const char *name;
    gpt_config cfg;
} model_def;

/* small: jobs/small.yaml's model section; large: GPT-2-medium-like width */
static const model_def models[] = {
    {"small", {6, 8, 256, 256, 256}},
    {"large", {12, 16, 1024, 256, 256}},
};

static int cmp_dbl(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile of sorted v[0..n). */
static double pct(const double *v, int n, double p) {
    int i = (int)(p / 100.0 * n + 0.999999) - 1;
    return v[i < 0 ? 0 : i >= n ? n - 1 : i];
}

/* Sum of n uint32 words, 4 AVX2 accumulators: a pure streaming read (an
 * fp32 sum would be bound by the latency of its one add chain). */
static uint32_t read_words(const uint32_t *p, size_t n) {
#if defined(__AVX2__)
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm256_add_epi32(a0, _mm256_loadu_si256((const __m256i *)(const void *)(p + i)));
        a1 = _mm256_add_epi32(a1, _mm256_loadu_si256((const __m256i *)(const void *)(p + i + 8)));
        a2 = _mm256_add_epi32(a2, _mm256_loadu_si256((const __m256i *)(const void *)(p + i + 16)));
        a3 = _mm256_add_epi32(a3, _mm256_loadu_si256((const __m256i *)(const void *)(p + i + 24)));
    }
    uint32_t t[8], s = 0;
    _mm256_storeu_si256((__m256i *)(void *)t,
                        _mm256_add_epi32(_mm256_add_epi32(a0, a1), _mm256_add_epi32(a2, a3)));
    for (int k = 0; k < 8; k++)
        s += t[k];
#else
    uint32_t s = 0;
    size_t i = 0;
#endif
    for (; i < n; i++) /* integer: the compiler may vectorize it */
        s += p[i];
    return s;
}

/* Streaming read bandwidth of all ranks together (GB/s, best of 3): each
 * rank reads a 256 MB buffer with its threads, all ranks at once. */
static double stream_gbs(MPI_Comm comm) {
    size_t n = (size_t)64 << 20, chunk = (size_t)1 << 16; /* words */
    uint32_t *buf = malloc(n * sizeof(uint32_t));
    int ok = buf != NULL, all, world;
    MPI_Comm_size(comm, &world);
    MPI_Allreduce(&ok, &all, 1, MPI_INT, MPI_MIN, comm);
    if (!all) {
        free(buf);
        return 0;
    }
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++)
        buf[i] = (uint32_t)i;
    double best = 0;
    volatile uint32_t sink = 0;
    for (int r = 0; r < 3; r++) {
        MPI_Barrier(comm);
        double t0 = spmd_now();
        uint32_t s = 0;
#pragma omp parallel for schedule(static) reduction(+ : s)
        for (size_t c = 0; c < n / chunk; c++)
            s += read_words(buf + c * chunk, chunk);
        double t = spmd_now() - t0, tmax;
        sink += s;
        MPI_Allreduce(&t, &tmax, 1, MPI_DOUBLE, MPI_MAX, comm);
        double gbs = (double)world * n * sizeof(uint32_t) / tmax / 1e9;
        best = gbs > best ? gbs : best;
    }
    (void)sink;
    free(buf);
    return best;
}

typedef struct {
    double tok_s, p50_ms, p99_ms, mean_ms;
} run_stats;

/* B sequences: prefill a prompt of P tokens each, then W + N greedy decode
 * steps, the last N timed. Collective (timings gathered on rank 0). */
static int decode_run(MPI_Comm comm, infer_engine *e, const gpt_config *c, int B, int P, int W,
                      int N, run_stats *st) {
    int rank, world, rc = 0;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &world);
    int *slots = malloc((size_t)B * sizeof(int)), *tok = malloc((size_t)B * sizeof(int));
    int *prompt = malloc((size_t)P * sizeof(int));
    double *dt = malloc((size_t)(N > 0 ? N : 1) * sizeof(double));
    double *all = rank == 0 ? malloc((size_t)world * (N > 0 ? N : 1) * sizeof(double)) : NULL;
    if (!slots || !tok || !prompt || !dt || (rank == 0 && !all)) rc = -1;
    for (int s = 0; !rc && s < B; s++) {
        for (int i = 0; i < P; i++)
            prompt[i] = (rank * 977 + s * 31 + i * 7 + 1) % c->vocab_size;
        slots[s] = s;
        rc = infer_prefill(e, s, prompt, P);
    }
    double tsum = 0;
    for (int k = 0; !rc && k < W + N; k++) {
        for (int s = 0; s < B; s++) { /* greedy: argmax of each slot's logits */
            const float *lg = infer_logits(e, s);
            int best = 0;
            for (int v = 1; v < c->vocab_size; v++)
                if (lg[v] > lg[best]) best = v;
            tok[s] = best;
        }
        if (k == W) MPI_Barrier(comm);
        double t0 = spmd_now();
        rc = infer_decode(e, B, slots, tok);
        double t = spmd_now() - t0;
        if (k >= W) {
            dt[k - W] = t;
            tsum += t;
        }
    }
    if (spmd_agree(comm, rc, "mpilm bench serve", "decode failed (out of memory?)")) {
        rc = -1;
        goto done;
    }
    double tmax;
    MPI_Allreduce(&tsum, &tmax, 1, MPI_DOUBLE, MPI_MAX, comm);
    MPI_Gather(dt, N, MPI_DOUBLE, all, N, MPI_DOUBLE, 0, comm);
    if (rank == 0) {
        qsort(all, (size_t)world * N, sizeof(double), cmp_dbl);
        st->tok_s = (double)world * B * N / tmax;
        st->p50_ms = 1e3 * pct(all, world * N, 50);
        st->p99_ms = 1e3 * pct(all, world * N, 99);
        double s = 0;
        for (int i = 0; i < world * N; i++)
            s += all[i];
        st->mean_ms = 1e3 * s / (world * N);
    }
done:
    free(slots), free(tok), free(prompt), free(dt), free(all);
    return rc;
}

/* Parses a comma list of ints into v (at most cap); count or -1. */
static int int_list(const char *s, int *v, int cap) {
    char buf[256];
    snprintf(buf, sizeof buf, "%s", s);
    int n = 0;
    for (char *sp = NULL, *t = strtok_r(buf, ",", &sp); t; t = strtok_r(NULL, ",", &sp)) {
        if (n == cap || atoi(t) < 1) return -1;
        v[n++] = atoi(t);
    }
    return n;
}

int bench_serve(int argc, char **argv, MPI_Comm comm) {
    const char *model = "all", *fmts = "fp32,q8,q4,nf4", *batches = "1,8,32", *csv = NULL;
    int N = 24, P = 16, W = 2, rank, world;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &world);
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--model") && i + 1 < argc)
            model = argv[++i];
        else if (!strcmp(argv[i], "--formats") && i + 1 < argc)
            fmts = argv[++i];
        else if (!strcmp(argv[i], "--batch") && i + 1 < argc)
            batches = argv[++i];
        else if (!strcmp(argv[i], "--tokens") && i + 1 < argc)
            N = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--prompt") && i + 1 < argc)
            P = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--csv") && i + 1 < argc)
            csv = argv[++i];
        else {
            if (rank == 0)
                printf(
                    "usage: mpilm bench serve [--model small|large|all] [--formats "
                    "fp32,q8,q4,nf4]\n"
                    "                         [--batch 1,8,32] [--tokens N] [--prompt P] [--csv "
                    "FILE]\n"
                    "Decode tokens/s and p50/p99 per-step latency of `mpilm serve`'s engine for\n"
                    "each weight format (fp32, q8, q4, q4a, nf4; quantized in memory) and batch\n"
                    "size, every rank a replica decoding its own sequences (aggregate tokens/s).\n"
                    "Models: small (jobs/small.yaml's shape) and large (12 x 1024, ~150M\n"
                    "parameters, 600 MB fp32, random init). Per batch: a P-token prompt per\n"
                    "sequence (default 16), 2 untimed decode steps, then N timed (default 24).\n"
                    "Also: weight bytes per step, the bandwidth that implies, and a streaming\n"
                    "read of all ranks measured in the same run; speed-up vs fp32.\n");
            return strcmp(argv[i], "--help") ? 2 : 0;
        }
    }
    int bs[16], nb = int_list(batches, bs, 16), fl[8], nf = 0;
    char fbuf[128];
    snprintf(fbuf, sizeof fbuf, "%s", fmts);
    for (char *sp = NULL, *t = strtok_r(fbuf, ",", &sp); t; t = strtok_r(NULL, ",", &sp)) {
        quant_fmt qf;
        int ok = nf < 8 && (!strcmp(t, "fp32") || quant_fmt_from_name(t, &qf) == 0);
        if (!ok || nb < 1 || N < 1 || P < 1) {
            if (rank == 0)
                fprintf(stderr,
                        "mpilm bench serve: bad --formats, --batch, --tokens or --prompt\n");
            return 2;
        }
        fl[nf++] = !strcmp(t, "fp32") ? -1 : (int)qf;
    }
    int maxb = 1;
    for (int i = 0; i < nb; i++)
        maxb = bs[i] > maxb ? bs[i] : maxb;
    int threads = spmd_threads_per_rank(comm);
    kern_set_threads(threads);
    double sgbs = stream_gbs(comm);
    if (rank == 0)
        printf("bench serve: %d rank%s x %d thread%s, kernels %s, streaming read of all ranks "
               "%.1f GB/s\n",
               world, world > 1 ? "s" : "", threads, threads > 1 ? "s" : "",
               quant_isa_name(quant_isa_best()), sgbs);
    FILE *f = rank == 0 && csv ? bench_csv_open(csv, "model,params,ranks,threads,format,batch,"
                                                     "tokens,tok_s,p50_ms,p99_ms,speedup_fp32,"
                                                     "weight_bytes,implied_gbs,stream_gbs")
                               : NULL;
    int rc = 0;
    for (size_t m = 0; !rc && m < sizeof models / sizeof models[0]; m++) {
        if (strcmp(model, "all") && strcmp(model, models[m].name)) continue;
        const gpt_config *c = &models[m].cfg;
        if (P + W + N > c->block_size) {
            if (rank == 0)
                fprintf(stderr, "mpilm bench serve: prompt + tokens + 2 > %d\n", c->block_size);
            rc = 2;
            break;
        }
        gpt *g = NULL;
        infer_engine *e = NULL;
        char err[512] = "out of memory for the model";
        int lrc = gpt_create(c, &g);
        if (!lrc) gpt_init_weights(g, 1337);
        if (!lrc) lrc = infer_create(g, maxb, &e, err, sizeof err);
        if (spmd_agree(comm, lrc, "mpilm bench serve", err)) {
            rc = 1;
        } else {
            if (rank == 0)
                printf(
                    "model %s: %d layers x %d, %.1fM parameters, %d timed decode steps per batch\n"
                    "  %-5s %5s %10s %9s %9s %8s %10s %12s\n",
                    models[m].name, c->n_layer, c->n_embd, gpt_nparams(g) / 1e6, N, "fmt", "batch",
                    "tok/s", "p50 ms", "p99 ms", "vs fp32", "weights MB", "implied GB/s");
            double base[16] = {0};
            for (int fi = 0; !rc && fi < nf; fi++) {
                double tq = spmd_now();
                lrc = infer_quantize(e, fl[fi], err, sizeof err);
                if (spmd_agree(comm, lrc, "mpilm bench serve", err)) {
                    rc = 1;
                    break;
                }
                const char *fn = fl[fi] < 0 ? "fp32" : quant_fmt_name((quant_fmt)fl[fi]);
                size_t wb = infer_weight_bytes(e);
                if (rank == 0 && fl[fi] >= 0)
                    printf("  (%s: quantized in %.1f s)\n", fn, spmd_now() - tq);
                for (int bi = 0; !rc && bi < nb; bi++) {
                    run_stats st = {0};
                    if (decode_run(comm, e, c, bs[bi], P, W, N, &st)) {
                        rc = 1;
                        break;
                    }
                    if (rank != 0) continue;
                    if (fl[fi] < 0) base[bi] = st.tok_s;
                    double sp = base[bi] > 0 ? st.tok_s / base[bi] : 0;
                    /* weights are read once per step per rank */
                    double igbs = (double)world * wb / (st.mean_ms * 1e-3) / 1e9;
                    char sps[16] = "-";
                    if (sp > 0) snprintf(sps, sizeof sps, "x%.2f", sp);
                    printf("  %-5s %5d %10.1f %9.2f %9.2f %8s %10.1f %12.1f\n", fn, bs[bi],
                           st.tok_s, st.p50_ms, st.p99_ms, sps, wb / 1e6, igbs);
                    if (f)
                        fprintf(f, "%s,%zu,%d,%d,%s,%d,%d,%.2f,%.3f,%.3f,%.3f,%zu,%.2f,%.2f\n",
                                models[m].name, gpt_nparams(g), world, threads, fn, bs[bi], N,
                                st.tok_s, st.p50_ms, st.p99_ms, sp, wb, igbs, sgbs);
                }
            }
        }
        infer_destroy(e);
        gpt_destroy(g);
    }
    if (f) fclose(f);
    return rc;
}
