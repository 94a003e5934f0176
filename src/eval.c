/* eval: loss/perplexity of a checkpoint. */
#include "src/eval.h"

#include "kernels/kern.h"
#include "src/data.h"
#include "src/gptio.h"
#include "src/spmd.h"

#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PROG "mpilm eval"

double eval_loss(MPI_Comm comm, gpt *g, const tokfile *tf, int B, int nbatches, long long *tokens) {
    int rank, p, T = gpt_cfg(g)->block_size;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &p);
    int *inp = malloc((size_t)B * T * sizeof(int)), *tgt = malloc((size_t)B * T * sizeof(int));
    double sum = 0, all = 0;
    for (int i = rank; inp && tgt && i < nbatches; i += p) {
        data_read_rows(tf, (uint64_t)i * B * T, B, T, inp, tgt);
        sum += gpt_forward(g, inp, tgt, B, T, 0.f);
    }
    free(inp);
    free(tgt);
    MPI_Allreduce(&sum, &all, 1, MPI_DOUBLE, MPI_SUM, comm);
    *tokens = (long long)nbatches * B * T;
    return all / (double)*tokens;
}

int eval_open_split(const char *dir, const char *split, const gpt *g, int B, int *nb,
                    tokfile *tf, char *err, size_t errlen) {
    char path[4200];
    snprintf(path, sizeof path, "%s/%s.tok", dir, split);
    int T = gpt_cfg(g)->block_size;
    if (tokfile_open(path, tf, err, errlen)) return -1;
    uint64_t avail = data_num_batches(tf, B, T);
    if (tf->vocab_size > (uint32_t)gpt_cfg(g)->vocab_size)
        snprintf(err, errlen, "%s: vocabulary %u larger than the model's %d", path, tf->vocab_size,
                 gpt_cfg(g)->vocab_size);
    else if (avail == 0)
        snprintf(err, errlen, "%s: fewer tokens than one batch of %d x %d", path, B, T);
    else if (*nb > 0 && (uint64_t)*nb > avail)
        snprintf(err, errlen, "%s: --batches %d but the split holds only %llu batches of %d x %d",
                 path, *nb, (unsigned long long)avail, B, T);
    else {
        if (*nb == 0) *nb = (int)avail;
        return 0;
    }
    tokfile_close(tf);
    return -1;
}

static void usage(FILE *f) {
    fprintf(f, "usage: mpilm eval --ckpt CKPT --data DIR [--split val|train] [--batches N]\n"
               "                  [--batch-size B] [--json]\n\n"
               "Mean next-token loss and perplexity of checkpoint CKPT (a step directory or\n"
               "a checkpoint root, whose `latest` is used) on DIR/SPLIT.tok. Batch i holds\n"
               "rows [i*B, (i+1)*B) of block_size tokens; default: every whole batch, B = 8.\n");
}

int eval_main(int argc, char **argv, MPI_Comm comm) {
    int rank, B = 8, nb = 0, json = 0, o;
    MPI_Comm_rank(comm, &rank);
    const char *ckpt = NULL, *dir = NULL, *split = "val";
    static const struct option opts[] = {
        {"ckpt", required_argument, 0, 'c'},  {"data", required_argument, 0, 'd'},
        {"split", required_argument, 0, 's'}, {"batches", required_argument, 0, 'n'},
        {"batch-size", required_argument, 0, 'b'}, {"json", no_argument, 0, 'j'},
        {"help", no_argument, 0, 'h'},        {0, 0, 0, 0}};
    optind = 1;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case 'c': ckpt = optarg; break;
        case 'd': dir = optarg; break;
        case 's': split = optarg; break;
        case 'n': nb = atoi(optarg); break;
        case 'b': B = atoi(optarg); break;
        case 'j': json = 1; break;
        case 'h':
            if (rank == 0) usage(stdout);
            return 0;
        default:
            if (rank == 0) usage(stderr);
            return 2;
        }
    }
    if (!ckpt || !dir || B <= 0 || nb < 0) {
        if (rank == 0) usage(stderr);
        return 2;
    }
    kern_set_threads(spmd_threads_per_rank(comm));
    char err[1024] = "", path[4200];
    gpt *g = NULL;
    ckpt_meta meta = {0};
    tokfile tf = {0};
    int rc = 1;
    if (spmd_agree(comm, gptio_open(comm, ckpt, &g, &meta, err, sizeof err), PROG, err)) goto done;
    snprintf(path, sizeof path, "%s/%s.tok", dir, split); /* for the report line */
    int orc = eval_open_split(dir, split, g, B, &nb, &tf, err, sizeof err);
    if (spmd_agree(comm, orc, PROG, err)) goto done;
    long long tokens = 0;
    double loss = eval_loss(comm, g, &tf, B, nb, &tokens);
    if (rank == 0) {
        if (json)
            printf("{\"checkpoint\": \"%s\", \"step\": %lld, \"split\": \"%s\", \"val_loss\": %.6f, "
                   "\"perplexity\": %.4f, \"tokens\": %lld, \"batches\": %d}\n",
                   ckpt, meta.step, split, loss, exp(loss), tokens, nb);
        else
            printf("%s (step %lld) on %s: loss %.4f | perplexity %.3f | %lld tokens in %d batches\n",
                   ckpt, meta.step, path, loss, exp(loss), tokens, nb);
    }
    rc = 0;
done:
    free(meta.config);
    tokfile_close(&tf);
    gpt_destroy(g);
    return rc;
}
