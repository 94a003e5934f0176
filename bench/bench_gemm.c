/* bench gemm: sgemm GFLOP/s of the products the model runs (forward and both
 * backward products of every linear layer, at the job's micro-batch), as a
 * fraction of the best large square sgemm measured in the same run. Rank 0
 * only; other ranks idle. */
#include "bench/bench.h"

#include "kernels/kern.h"
#include "src/config.h"
#include "src/spmd.h"

#include <cblas.h>
#include <stdlib.h>
#include <string.h>

/* Best rate of C(M,N) = A(M,K) op B over repetitions for `secs`. */
static double rate(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int M, int N, int K, double secs) {
    float *a = calloc((size_t)M * K, 4), *b = calloc((size_t)K * N, 4), *c = calloc((size_t)M * N, 4);
    double best = 0;
    if (a && b && c) {
        for (size_t i = 0; i < (size_t)M * K; i++) a[i] = (float)(i % 13) * 0.01f;
        for (size_t i = 0; i < (size_t)K * N; i++) b[i] = (float)(i % 7) * 0.01f;
        int lda = ta == CblasNoTrans ? K : M, ldb = tb == CblasNoTrans ? N : K;
        double end = spmd_now() + secs;
        do {
            double t0 = spmd_now();
            cblas_sgemm(CblasRowMajor, ta, tb, M, N, K, 1.f, a, lda, b, ldb, 0.f, c, N);
            double r = 2.0 * M * N * K / (spmd_now() - t0) / 1e9;
            best = r > best ? r : best;
        } while (spmd_now() < end);
    }
    free(a);
    free(b);
    free(c);
    return best;
}

int bench_gemm(int argc, char **argv, MPI_Comm comm) {
    const char *job = "jobs/small.yaml", *csv = NULL;
    double secs = 0.3;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--job") && i + 1 < argc) job = argv[++i];
        else if (!strcmp(argv[i], "--csv") && i + 1 < argc) csv = argv[++i];
        else if (!strcmp(argv[i], "--seconds") && i + 1 < argc) secs = atof(argv[++i]);
        else {
            printf("usage: mpilm bench gemm [--job JOB.yaml] [--seconds S] [--csv FILE]\n"
                   "GFLOP/s of the model's matrix products (shapes from JOB, default\n"
                   "jobs/small.yaml) next to the best large square sgemm, same run.\n");
            return strcmp(argv[i], "--help") ? 2 : 0;
        }
    }
    int rank;
    MPI_Comm_rank(comm, &rank);
    if (rank != 0) return 0;
    job_config c;
    char err[1024];
    if (config_load(&c, job, NULL, 0, err, sizeof err)) {
        fprintf(stderr, "mpilm bench gemm: %s\n", err);
        return 1;
    }
    kern_set_threads(spmd_threads_per_rank(MPI_COMM_SELF));
    const char *fixed = getenv("MPILM_BLAS_FIXED");
    printf("OpenBLAS kernel: %s%s%s%s | threads %d\n", kern_blas_corename(),
           fixed ? " (mpilm replaced the misdetected '" : "", fixed ? fixed : "", fixed ? "')" : "",
           kern_threads());
    double peak = rate(CblasNoTrans, CblasTrans, 2048, 2048, 2048, 3 * secs);
    printf("%-34s %16s %9s %8s\n", "product", "M x N x K", "GFLOP/s", "of peak");
    printf("%-34s %16s %9.1f %7.0f%%\n", "square sgemm (peak)", "2048^3", peak, 100.0);
    FILE *f = csv ? bench_csv_open(csv, "kernel,job,product,M,N,K,gflops,fraction_of_peak") : NULL;
    if (f) fprintf(f, "%s,%s,square,2048,2048,2048,%.2f,1.0\n", kern_blas_corename(), job, peak);
    int N = c.train.micro_batch * c.model.block_size, C = c.model.n_embd, V = c.model.vocab_size;
    const struct {
        const char *name;
        int oc, ic;
    } lin[] = {{"attn.qkv", 3 * C, C}, {"attn.proj", C, C}, {"mlp.fc", 4 * C, C},
               {"mlp.proj", C, 4 * C}, {"lm_head", V, C}};
    double flop = 0, time = 0;
    for (size_t i = 0; i < sizeof lin / sizeof lin[0]; i++) {
        int oc = lin[i].oc, ic = lin[i].ic;
        struct {
            const char *pass;
            CBLAS_TRANSPOSE ta, tb;
            int M, Nn, K;
        } pr[3] = {{"fwd", CblasNoTrans, CblasTrans, N, oc, ic},
                   {"bwd dinp", CblasNoTrans, CblasNoTrans, N, ic, oc},
                   {"bwd dweight", CblasTrans, CblasNoTrans, oc, ic, N}};
        for (int j = 0; j < 3; j++) {
            double r = rate(pr[j].ta, pr[j].tb, pr[j].M, pr[j].Nn, pr[j].K, secs);
            char name[64], dims[48];
            snprintf(name, sizeof name, "%s %s", lin[i].name, pr[j].pass);
            snprintf(dims, sizeof dims, "%dx%dx%d", pr[j].M, pr[j].Nn, pr[j].K);
            printf("%-34s %16s %9.1f %7.0f%%\n", name, dims, r, 100 * r / peak);
            if (f)
                fprintf(f, "%s,%s,%s,%d,%d,%d,%.2f,%.4f\n", kern_blas_corename(), job, name,
                        pr[j].M, pr[j].Nn, pr[j].K, r, r / peak);
            double fl = 2.0 * pr[j].M * pr[j].Nn * pr[j].K;
            flop += fl;
            time += fl / (r * 1e9);
        }
    }
    printf("%-34s %16s %9.1f %7.0f%%\n", "all model products (time-weighted)", "", flop / time / 1e9,
           100 * flop / time / 1e9 / peak);
    if (f) fclose(f);
    return 0;
}
