/* mpilm: one binary, subcommands (DESIGN.md section 2). main owns process-wide
 * matters only: the BLAS kernel fix-up, MPI start and stop, signal handlers,
 * and turning a subcommand's result into the exit status of every rank.
 */
#include "bench/bench.h"
#include "kernels/kern.h"
#include "src/ckpt_cmd.h"
#include "src/data.h"
#include "src/eval.h"
#include "src/quantize.h"
#include "src/serve.h"
#include "src/train.h"

#include <mpi.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MPILM_VERSION "0.1.0"

/* Set by SIGUSR1/SIGTERM; the training loop polls it between steps. */
static volatile sig_atomic_t stop_flag;
static void on_stop(int sig) { stop_flag = sig; }

static void usage(FILE *f) {
    fprintf(f,
            "mpilm %s - train, quantize and serve GPT models with MPI\n\n"
            "usage: mpilm COMMAND [options]   (under mpirun -n N / srun, or alone)\n\n"
            "commands:\n"
            "  data prepare --input PATH... --out DIR   byte-tokenize text into token files\n"
            "  train JOB.yaml [--set key=value ...]     train (data parallel over ranks)\n"
            "  eval --ckpt CKPT --data DIR [...]        validation loss and perplexity\n"
            "  ckpt ls|latest|verify|inspect PATH       checkpoint tools\n"
            "  quantize --ckpt CKPT --out OUT --format F  8/4-bit quantized checkpoint\n"
            "  serve --ckpt CKPT --prompts IN.jsonl --out OUT.jsonl  generate text (batch mode)\n"
            "  serve --ckpt CKPT --http 127.0.0.1:PORT [--watch]    HTTP server (POST /completion)\n"
            "  bench gemm|train|ckpt [options]          benchmarks (CSV with --csv)\n\n"
            "Every command has --help. Environment: OMP_NUM_THREADS (threads per rank),\n"
            "MPILM_BLAS_FIX=auto|off|force (replace a misdetected OpenBLAS kernel).\n",
            MPILM_VERSION);
}

/* Debian's OpenBLAS 0.3.21 does not know some newer CPUs and falls back to
 * a Prescott kernel (~7x slower sgemm). OPENBLAS_CORETYPE is read when the
 * library loads, so the fix is to set it and re-execute before MPI starts.
 * MPILM_BLAS_FIX=force treats the current kernel as misdetected (tests). */
static void fix_blas(char **argv) {
    const char *mode = getenv("MPILM_BLAS_FIX");
    if (mode && !strcmp(mode, "off")) return;
    int force = mode && !strcmp(mode, "force");
    if (getenv("MPILM_BLAS_FIXED") || (getenv("OPENBLAS_CORETYPE") && !force)) return;
    const char *better = kern_blas_better_coretype();
    if (!better && force) {
        __builtin_cpu_init();
        better = __builtin_cpu_supports("avx512f") ? "SkylakeX"
                 : __builtin_cpu_supports("avx2")  ? "Haswell" : NULL;
    }
    if (!better) return;
    setenv("OPENBLAS_CORETYPE", better, 1);
    setenv("MPILM_BLAS_FIXED", kern_blas_corename(), 1);
    execv("/proc/self/exe", argv);
    /* exec failed: carry on with the slow kernel rather than fail */
}

int main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "--version")) {
        printf("mpilm %s\n", MPILM_VERSION);
        return 0;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "data")) return data_prepare_main(argc - 1, argv + 1);
    int known = !strcmp(cmd, "train") || !strcmp(cmd, "eval") || !strcmp(cmd, "bench") ||
                !strcmp(cmd, "ckpt") ||
                !strcmp(cmd, "quantize") || !strcmp(cmd, "serve");
    if (!known) {
        fprintf(stderr, "mpilm: unknown command '%s' (see mpilm --help)\n", cmd);
        return 2;
    }
    fix_blas(argv);

    int provided, rc;
    /* MULTIPLE: the background checkpoint writer runs collectives on its
     * own communicator while training continues */
    MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
    struct sigaction sa = {.sa_handler = on_stop};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    /* the HTTP server stops cleanly on Ctrl-C too */
    if (!strcmp(cmd, "serve")) sigaction(SIGINT, &sa, NULL);
    /* Each role gets its own communicator, so MPMD launches (train : serve)
     * keep their collectives apart. */
    int appnum = 0, flag = 0, *attr = NULL;
    MPI_Comm_get_attr(MPI_COMM_WORLD, MPI_APPNUM, &attr, &flag);
    if (flag && attr) appnum = *attr;
    MPI_Comm comm;
    MPI_Comm_split(MPI_COMM_WORLD, appnum, 0, &comm);

    if (!strcmp(cmd, "train")) rc = train_main(argc - 1, argv + 1, comm, &stop_flag);
    else if (!strcmp(cmd, "eval")) rc = eval_main(argc - 1, argv + 1, comm);
    else if (!strcmp(cmd, "ckpt")) rc = ckpt_cmd_main(argc - 1, argv + 1, comm);
    else if (!strcmp(cmd, "quantize")) rc = quantize_main(argc - 1, argv + 1, comm);
    else if (!strcmp(cmd, "serve")) rc = serve_main(argc - 1, argv + 1, comm, &stop_flag);
    else rc = bench_main(argc - 1, argv + 1, comm);

    /* Subcommands agree on errors (spmd_agree), so every rank gets here; the
     * worst status wins so that mpirun/srun report the failure. */
    int worst = 0;
    MPI_Allreduce(&rc, &worst, 1, MPI_INT, MPI_MAX, comm);
    MPI_Comm_free(&comm);
    MPI_Finalize();
    return worst;
}
