/* bench train: tokens/s and MFU of a job (default jobs/small.yaml) on the
 * ranks of the launch, for a few steps, with no files written. MFU is
 * against the sgemm peak measured on the same ranks in the same run. */
#include "bench/bench.h"

#include "src/spmd.h"
#include "src/train.h"

#include <stdlib.h>
#include <string.h>

int bench_train(int argc, char **argv, MPI_Comm comm) {
    const char *job = "jobs/small.yaml", *csv = NULL;
    const char *sets[64];
    int nsets = 0, steps = 10, rank, world;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &world);
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--job") && i + 1 < argc) job = argv[++i];
        else if (!strcmp(argv[i], "--csv") && i + 1 < argc) csv = argv[++i];
        else if (!strcmp(argv[i], "--steps") && i + 1 < argc) steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--set") && i + 1 < argc && nsets < 60) sets[nsets++] = argv[++i];
        else {
            if (rank == 0)
                printf("usage: mpilm bench train [--job JOB.yaml] [--steps N] [--set k=v]... "
                       "[--csv FILE]\n");
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
    snprintf(c.log.dir, sizeof c.log.dir, "%s", "/tmp/mpilm-bench-train");
    train_result r;
    if (train_run(comm, &c, 1, NULL, &r)) return 1;
    if (rank == 0) {
        printf("bench train: %s | %d ranks | %.1f ms/step | %.0f tokens/s | MFU %.1f%% of "
               "measured sgemm peak %.1f GFLOP/s | loss %.4f\n",
               job, world, r.step_ms, r.tokens_per_s, 100 * r.mfu, r.peak_gflops, r.final_loss);
        FILE *f = csv ? bench_csv_open(csv, "job,ranks,step_ms,tokens_per_s,mfu,peak_gflops") : NULL;
        if (f) {
            fprintf(f, "%s,%d,%.2f,%.1f,%.4f,%.1f\n", job, world, r.step_ms, r.tokens_per_s, r.mfu,
                    r.peak_gflops);
            fclose(f);
        }
    }
    return 0;
}
