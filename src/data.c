/* data: corpus preparation and batch reads. */
#include "src/data.h"

#include "io/fsutil.h"

#include <dirent.h>
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

typedef struct {
    uint32_t *tok;
    size_t n, cap;
    int files, skipped;
} corpus;

static int corpus_add_file(corpus *c, const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "mpilm data prepare: %s: %s\n", path, strerror(errno));
        return -1;
    }
    unsigned char buf[65536];
    size_t got, start = c->n;
    while ((got = fread(buf, 1, sizeof buf, f)) > 0) {
        if (c->n + got > c->cap) {
            size_t cap = (c->cap ? c->cap * 2 : 1 << 20) + got;
            uint32_t *t = realloc(c->tok, cap * sizeof *t);
            if (!t) {
                fclose(f);
                return -1;
            }
            c->tok = t;
            c->cap = cap;
        }
        for (size_t i = 0; i < got; i++) {
            if (buf[i] == 0) { /* binary file (index, image...): not text */
                c->n = start;
                c->skipped++;
                fclose(f);
                return 0;
            }
            c->tok[c->n++] = buf[i];
        }
    }
    fclose(f);
    c->files++;
    return 0;
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Files of a directory tree in sorted order, so the corpus is reproducible. */
static int corpus_add_path(corpus *c, const char *path) {
    struct stat st;
    if (stat(path, &st) != 0) {
        fprintf(stderr, "mpilm data prepare: %s: %s\n", path, strerror(errno));
        return -1;
    }
    if (!S_ISDIR(st.st_mode)) return S_ISREG(st.st_mode) ? corpus_add_file(c, path) : 0;
    DIR *d = opendir(path);
    if (!d) {
        fprintf(stderr, "mpilm data prepare: %s: %s\n", path, strerror(errno));
        return -1;
    }
    char **names = NULL;
    size_t n = 0, cap = 0;
    struct dirent *e;
    int rc = 0;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        if (n == cap) {
            cap = cap ? 2 * cap : 64;
            char **nn = realloc(names, cap * sizeof *nn);
            if (!nn) {
                rc = -1;
                break;
            }
            names = nn;
        }
        names[n++] = strdup(e->d_name);
    }
    closedir(d);
    if (n) qsort(names, n, sizeof *names, cmp_str);
    for (size_t i = 0; i < n; i++) {
        char sub[4096];
        snprintf(sub, sizeof sub, "%s/%s", path, names[i]);
        /* symlinks to files in the same tree would be read twice */
        struct stat ls;
        if (rc == 0 && lstat(sub, &ls) == 0 && !S_ISLNK(ls.st_mode)) rc = corpus_add_path(c, sub);
        free(names[i]);
    }
    free(names);
    return rc;
}

static void usage(FILE *f) {
    fprintf(f, "usage: mpilm data prepare --input PATH... --out DIR [--val-fraction F] "
               "[--tokenizer byte]\n\n"
               "Reads text files (directories are walked in sorted order; binary files are\n"
               "skipped), tokenizes them as bytes (vocab 256) and writes DIR/train.tok and\n"
               "DIR/val.tok. The last F of the token stream is the validation split\n"
               "(default 0.05).\n");
}

int data_prepare_main(int argc, char **argv) {
    if (argc < 2 || strcmp(argv[1], "prepare") != 0) {
        if (argc >= 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
            usage(stdout);
            return 0;
        }
        usage(stderr);
        return 2;
    }
    argc--;
    argv++;
    const char *out = NULL, *tokenizer = "byte";
    double valf = 0.05;
    const char **inputs = calloc((size_t)argc + 1, sizeof *inputs);
    int nin = 0, rc = 1;
    static const struct option opts[] = {{"input", required_argument, 0, 'i'},
                                         {"out", required_argument, 0, 'o'},
                                         {"val-fraction", required_argument, 0, 'v'},
                                         {"tokenizer", required_argument, 0, 't'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    int o;
    optind = 1;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (o == 'i') {
            inputs[nin++] = optarg;
            while (optind < argc && argv[optind][0] != '-') inputs[nin++] = argv[optind++];
        } else if (o == 'o') out = optarg;
        else if (o == 'v') {
            char *end;
            valf = strtod(optarg, &end);
            if (*end || valf <= 0 || valf >= 1) {
                fprintf(stderr, "mpilm data prepare: --val-fraction %s: expected 0 < F < 1\n", optarg);
                goto done;
            }
        } else if (o == 't') tokenizer = optarg;
        else if (o == 'h') {
            usage(stdout);
            rc = 0;
            goto done;
        } else {
            usage(stderr);
            goto done;
        }
    }
    if (!nin || !out) {
        usage(stderr);
        goto done;
    }
    if (strcmp(tokenizer, "byte") != 0) {
        fprintf(stderr, "mpilm data prepare: --tokenizer %s: only 'byte' is available\n", tokenizer);
        goto done;
    }
    corpus c = {0};
    for (int i = 0; i < nin; i++)
        if (corpus_add_path(&c, inputs[i])) {
            free(c.tok);
            goto done;
        }
    size_t nval = (size_t)(c.n * valf), ntrain = c.n - nval;
    if (nval < 2 || ntrain < 2) {
        fprintf(stderr, "mpilm data prepare: only %zu bytes of text in %d file(s): too small\n",
                c.n, c.files);
        free(c.tok);
        goto done;
    }
    if (fs_mkdirs(out) != 0) {
        fprintf(stderr, "mpilm data prepare: %s: %s\n", out, strerror(errno));
        free(c.tok);
        goto done;
    }
    char path[4096], err[512];
    snprintf(path, sizeof path, "%s/train.tok", out);
    int w = tokfile_write(path, c.tok, ntrain, 256, err, sizeof err);
    snprintf(path, sizeof path, "%s/val.tok", out);
    if (!w) w = tokfile_write(path, c.tok + ntrain, nval, 256, err, sizeof err);
    if (w) fprintf(stderr, "mpilm data prepare: %s\n", err);
    else {
        printf("prepared %s: %d files (%d binary skipped), %zu train + %zu val tokens (vocab 256)\n",
               out, c.files, c.skipped, ntrain, nval);
        rc = 0;
    }
    free(c.tok);
done:
    free(inputs);
    return rc;
}

uint64_t data_num_batches(const tokfile *tf, int rows, int T) {
    uint64_t per = (uint64_t)rows * (uint64_t)T;
    return tf->n_tokens < per + 1 ? 0 : (tf->n_tokens - 1) / per;
}

void data_read_rows(const tokfile *tf, uint64_t first, int rows, int T, int *inp, int *tgt) {
    size_t n = (size_t)rows * T;
    tokfile_read(tf, first, n, inp);
    tokfile_read(tf, first + 1, n, tgt);
}
