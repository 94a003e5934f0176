/* ckpt_cmd: list, resolve, verify and inspect checkpoints. */
#include "src/ckpt_cmd.h"

#include "io/ckpt.h"
#include "io/qckpt.h"
#include "src/config.h"
#include "src/gptio.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static void usage(FILE *f) {
    fprintf(f, "usage: mpilm ckpt ls DIR | latest DIR | verify CKPT | inspect CKPT\n\n"
               "  ls DIR        step directories of a checkpoint root: step, size, layout,\n"
               "                complete or not; '*' marks the one `latest` names\n"
               "  latest DIR    prints the path of the step `latest` names (exit 1 if none)\n"
               "  verify CKPT   checks attributes, every tensor's shape against the stored\n"
               "                config, and every checksum; exit 1 on any problem\n"
               "  inspect CKPT  metadata, tensor table and stored config\n"
               "CKPT is a step directory, its checkpoint.h5, or a root (then `latest`).\n");
}

static double du(const char *path) {
    struct stat st;
    if (lstat(path, &st) != 0) return 0;
    if (!S_ISDIR(st.st_mode)) return (double)st.st_blocks * 512;
    double s = 0;
    DIR *d = opendir(path);
    struct dirent *e;
    while (d && (e = readdir(d)) != NULL) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        char sub[4096];
        snprintf(sub, sizeof sub, "%s/%s", path, e->d_name);
        s += du(sub);
    }
    if (d) closedir(d);
    return s;
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int cmd_ls(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) {
        fprintf(stderr, "mpilm ckpt ls: %s: cannot open directory\n", dir);
        return 1;
    }
    char *names[4096], latest[256] = "", path[4200];
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL && n < 4096)
        if (!strncmp(e->d_name, "step-", 5)) names[n++] = strdup(e->d_name);
    closedir(d);
    qsort(names, (size_t)n, sizeof *names, cmp_str);
    snprintf(path, sizeof path, "%s/latest", dir);
    FILE *f = fopen(path, "r");
    if (f) {
        if (!fgets(latest, sizeof latest, f)) latest[0] = 0;
        latest[strcspn(latest, "\r\n")] = 0;
        fclose(f);
    }
    printf("%-22s %10s %10s %-10s %s\n", "directory", "step", "size MiB", "layout", "state");
    for (int i = 0; i < n; i++) {
        snprintf(path, sizeof path, "%s/%s/checkpoint.h5", dir, names[i]);
        ckpt_meta m;
        char err[1024], layout[32] = "-", step[32] = "-";
        const char *state;
        if (strstr(names[i], ".tmp")) state = "incomplete (save in progress or crashed)";
        else if (ckpt_read_meta(path, &m, err, sizeof err) == 0) {
            state = "complete";
            snprintf(layout, sizeof layout, "%dx%dx%d", m.layout[0], m.layout[1], m.layout[2]);
            snprintf(step, sizeof step, "%lld", m.step);
            free(m.config);
        } else state = "unreadable";
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        printf("%-22s %10s %10.1f %-10s %s%s\n", names[i], step, du(path) / 1048576.0, layout,
               state, strcmp(names[i], latest) ? "" : " *latest");
        free(names[i]);
    }
    struct stat st;
    snprintf(path, sizeof path, "%s/%s", dir, latest);
    if (latest[0] && stat(path, &st) != 0) printf("latest names %s, which is missing\n", latest);
    return 0;
}

/* Model-level check: every tensor of the stored config's model is there
 * (for a quantized checkpoint: loads it, which checks shapes and checksums
 * of every /qmodel block and float tensor, and dequantizes). */
static int check_model(const char *file, const ckpt_meta *m, int quantized) {
    job_config cfg;
    char err[1024];
    if (config_load_text(&cfg, file, m->config, err, sizeof err)) {
        printf("%s: stored config does not parse: %s\n", file, err);
        return 1;
    }
    gpt *g = NULL;
    if (gpt_create(&cfg.model, &g)) {
        printf("%s: cannot build the stored model\n", file);
        return 1;
    }
    int nt = 0, problems = 1;
    ckpt_tensor *t = gptio_tensor_list(g, !quantized, &nt);
    if (t && quantized) {
        ckpt_meta qm;
        problems = qckpt_load_model(MPI_COMM_SELF, file, t, nt, &qm, err, sizeof err) != 0;
        if (problems) printf("%s\n", err);
        else free(qm.config);
    } else if (t)
        problems = ckpt_check_shapes(file, t, nt, stdout);
    gptio_free_list(t, nt);
    gpt_destroy(g);
    return problems != 0;
}

static int cmd_verify(const char *path, int inspect) {
    char file[4200], err[1024];
    ckpt_meta m;
    if (ckpt_resolve(path, file, sizeof file, err, sizeof err) ||
        ckpt_read_meta(file, &m, err, sizeof err)) {
        printf("%s\n", err);
        return 1;
    }
    if (inspect)
        printf("file         %s\nformat       %s v%d\nstep         %lld\ntokens_seen  %lld\n"
               "layout       dp=%d tp=%d pp=%d\noptim_t      %lld\nseed         %lld\n\ntensors:\n",
               file, CKPT_FORMAT, CKPT_FORMAT_VERSION, m.step, m.tokens_seen, m.layout[0],
               m.layout[1], m.layout[2], m.optim_t, m.seed);
    int quantized = qckpt_is_quantized(file) == 1;
    int bad = check_model(file, &m, quantized);
    /* the generic pass checks float32 datasets; quantized blocks were
     * checked by the quantized loader above */
    int problems = quantized ? 0 : ckpt_verify(file, stdout, inspect);
    if (quantized && inspect) printf("  (quantized checkpoint: blocks under /qmodel, verified by loading)\n");
    if (inspect) printf("\nconfig:\n%s", m.config);
    free(m.config);
    if (problems != 0 || bad) {
        printf("FAILED: %s\n", file);
        return 1;
    }
    if (!inspect) printf("OK: %s (step %lld): attributes, tensor shapes and checksums verified\n", file, m.step);
    return 0;
}

static int run(int argc, char **argv) {
    if (argc == 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
        usage(stdout);
        return 0;
    }
    if (argc != 3) {
        usage(stderr);
        return 2;
    }
    const char *sub = argv[1], *arg = argv[2];
    if (!strcmp(sub, "ls")) return cmd_ls(arg);
    if (!strcmp(sub, "verify")) return cmd_verify(arg, 0);
    if (!strcmp(sub, "inspect")) return cmd_verify(arg, 1);
    if (!strcmp(sub, "latest")) {
        char file[4200], err[1024];
        char latest[4200];
        snprintf(latest, sizeof latest, "%s/latest", arg);
        struct stat st;
        if (stat(latest, &st) != 0) {
            fprintf(stderr, "mpilm ckpt latest: %s: no such file\n", latest);
            return 1;
        }
        if (ckpt_resolve(arg, file, sizeof file, err, sizeof err)) {
            fprintf(stderr, "mpilm ckpt latest: %s\n", err);
            return 1;
        }
        char *slash = strrchr(file, '/');
        if (slash) *slash = 0; /* the step directory, not its file */
        printf("%s\n", file);
        return 0;
    }
    usage(stderr);
    return 2;
}

int ckpt_cmd_main(int argc, char **argv, MPI_Comm comm) {
    int rank, rc = 0;
    MPI_Comm_rank(comm, &rank);
    if (rank == 0) rc = run(argc, argv);
    MPI_Bcast(&rc, 1, MPI_INT, 0, comm);
    return rc;
}
