/* bench train: tokens/s and MFU of a job (default jobs/small.yaml) on the
 * ranks of the launch, for a few steps, with no files written. MFU is
 * against the sgemm peak measured on the same ranks in the same run. */
#include "bench/bench.h"

#include "io/fsutil.h"

#include "src/spmd.h"
#include "src/train.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* One run of job c at layout tp x pp with m micro-batches per pipeline
 * (m = 0: the job's own global batch). Prints and appends a CSV row. */
static int run_one(MPI_Comm comm, job_config c, int tp, int pp, int m, const char *csv) {
    int rank, world;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &world);
    if (world % (tp * pp)) return 0; /* layout does not fit this rank count */
    int dp = world / (tp * pp);
    c.parallel.tp = tp;
    c.parallel.pp = pp;
    c.parallel.microbatches = 0;
    if (m > 0) c.train.global_batch = c.train.micro_batch * dp * m;
    char err[1024];
    if (config_check_layout(&c, world, err, sizeof err)) {
        if (rank == 0) printf("  skip tp=%d pp=%d: %s\n", tp, pp, err);
        return 0;
    }
    m = c.train.global_batch / (c.train.micro_batch * dp);
    train_result r;
    if (train_run(comm, &c, 1, NULL, &r)) return 1;
    double pred = (double)(pp - 1) / (m + pp - 1);
    if (rank == 0) {
        printf("  dp=%d tp=%d pp=%d m=%-3d %9.1f ms/step %9.0f tokens/s  MFU %5.1f%%  bubble %5.1f%% "
               "(predicted %5.1f%%)  dp all-reduce wait %.1f ms/step  loss %.4f\n",
               dp, tp, pp, m, r.step_ms, r.tokens_per_s, 100 * r.mfu, 100 * r.bubble, 100 * pred,
               r.comm_ms, r.final_loss);
        FILE *f = csv ? bench_csv_open(csv, "job,ranks,dp,tp,pp,microbatches,step_ms,tokens_per_s,"
                                            "mfu,peak_gflops,bubble,bubble_predicted")
                      : NULL;
        if (f) {
            fprintf(f, "%s,%d,%d,%d,%d,%d,%.2f,%.1f,%.4f,%.1f,%.4f,%.4f\n", c.file, world, dp, tp,
                    pp, m, r.step_ms, r.tokens_per_s, r.mfu, r.peak_gflops, r.bubble, pred);
            fclose(f);
        }
    }
    return 0;
}

int bench_train(int argc, char **argv, MPI_Comm comm) {
    const char *job = "jobs/small.yaml", *csv = NULL, *layouts = "1x1", *mbs = "0";
    const char *sets[64];
    int nsets = 0, steps = 10, rank, world;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &world);
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--job") && i + 1 < argc) job = argv[++i];
        else if (!strcmp(argv[i], "--csv") && i + 1 < argc) csv = argv[++i];
        else if (!strcmp(argv[i], "--steps") && i + 1 < argc) steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--layouts") && i + 1 < argc) layouts = argv[++i];
        else if (!strcmp(argv[i], "--microbatches") && i + 1 < argc) mbs = argv[++i];
        else if (!strcmp(argv[i], "--set") && i + 1 < argc && nsets < 60) sets[nsets++] = argv[++i];
        else {
            if (rank == 0)
                printf("usage: mpilm bench train [--job JOB.yaml] [--steps N] [--layouts TPxPP,...]\n"
                       "                         [--microbatches M,...] [--set k=v]... [--csv FILE]\n"
                       "tokens/s, MFU and the measured pipeline bubble next to (p-1)/(m+p-1), for\n"
                       "each layout (tp x pp; dp = ranks / (tp*pp)) and micro-batch count m per\n"
                       "pipeline (0: the job's global batch). Default job jobs/small.yaml.\n");
            return strcmp(argv[i], "--help") ? 2 : 0;
        }
    }
    char st[64];
    snprintf(st, sizeof st, "train.steps=%d", steps);
    sets[nsets++] = st;
    sets[nsets++] = "train.eval_every=0";
    sets[nsets++] = "checkpoint.dir=";
    job_config c;
    char err[1024];
    int rc = config_load(&c, job, sets, nsets, err, sizeof err);
    if (spmd_agree(comm, rc, "mpilm bench train", err)) return 1;
    /* per process: concurrent benchmarks on one node must not share files */
    snprintf(c.log.dir, sizeof c.log.dir, "/tmp/mpilm-bench-train.%d", (int)getpid());
    if (rank == 0) printf("bench train: %s | %d ranks | %d steps (timing from step 2)\n", job, world, steps);
    char lay[256], mb[256];
    snprintf(lay, sizeof lay, "%s", layouts);
    for (char *sl = NULL, *l = strtok_r(lay, ",", &sl); l; l = strtok_r(NULL, ",", &sl)) {
        int tp = 1, pp = 1;
        if (sscanf(l, "%dx%d", &tp, &pp) != 2 || tp < 1 || pp < 1) {
            if (rank == 0) fprintf(stderr, "mpilm bench train: bad layout '%s' (want TPxPP)\n", l);
            return 2;
        }
        snprintf(mb, sizeof mb, "%s", mbs);
        for (char *sm = NULL, *m = strtok_r(mb, ",", &sm); m; m = strtok_r(NULL, ",", &sm))
            if ((rc = run_one(comm, c, tp, pp, atoi(m), csv))) break;
        if (rc) break;
    }
    if (rank == 0) fs_rm_rf(c.log.dir);
    return rc ? 1 : 0;
}
