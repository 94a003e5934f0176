/* bench: subcommand dispatch and CSV helper. */
#include "bench/bench.h"

#include <string.h>
#include <sys/stat.h>

FILE *bench_csv_open(const char *file, const char *header) {
    struct stat st;
    int fresh = stat(file, &st) != 0 || st.st_size == 0;
    FILE *f = fopen(file, "a");
    if (f && fresh) fprintf(f, "%s\n", header);
    return f;
}

int bench_main(int argc, char **argv, MPI_Comm comm) {
    int rank;
    MPI_Comm_rank(comm, &rank);
    const char *kind = argc > 1 ? argv[1] : "";
    if (!strcmp(kind, "gemm")) return bench_gemm(argc - 1, argv + 1, comm);
    if (!strcmp(kind, "train")) return bench_train(argc - 1, argv + 1, comm);
    if (!strcmp(kind, "ckpt")) return bench_ckpt(argc - 1, argv + 1, comm);
    if (!strcmp(kind, "allreduce")) return bench_allreduce(argc - 1, argv + 1, comm);
    if (!strcmp(kind, "compress")) return bench_compress(argc - 1, argv + 1, comm);
    if (!strcmp(kind, "serve")) return bench_serve(argc - 1, argv + 1, comm);
    if (rank == 0) {
        FILE *f = (!strcmp(kind, "--help") || !strcmp(kind, "-h")) ? stdout : stderr;
        fprintf(f, "usage: mpilm bench gemm|train [options] [--csv FILE]   (each has --help)\n");
        if (f == stderr && *kind) fprintf(f, "mpilm bench: unknown benchmark '%s'\n", kind);
        return f == stdout ? 0 : 2;
    }
    return 2;
}
