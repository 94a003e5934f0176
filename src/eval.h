/* eval: `mpilm eval --ckpt CKPT --data DIR`: mean loss and perplexity of a
 * checkpoint on a split, with the batch layout of DESIGN.md section 5
 * (batch i = rows [i*B, (i+1)*B), B*T+1 consecutive tokens), batches spread
 * round-robin over the ranks.
 */
#ifndef MPILM_EVAL_H
#define MPILM_EVAL_H

#include "io/tokfile.h"
#include "src/gpt.h"

#include <mpi.h>

int eval_main(int argc, char **argv, MPI_Comm comm);

/* Collective: sum of token losses over batches [0, nbatches) of B rows.
 * Returns the mean loss; *tokens gets the number of tokens. */
double eval_loss(MPI_Comm comm, gpt *g, const tokfile *tf, int B, int nbatches, long long *tokens);

/* Opens DIR/SPLIT.tok for evaluating g with batches of B rows: checks the
 * vocabulary and that nb batches fit (*nb == 0: all whole batches, set on
 * return). 0, or -1 with a message naming the file. Local. */
int eval_open_split(const char *dir, const char *split, const gpt *g, int B, int *nb,
                    tokfile *tf, char *err, size_t errlen);

#endif
