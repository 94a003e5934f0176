/* pipe: one training step of a pipeline stage under the 1F1B schedule, and
 * the forward-only pass for evaluation. Activations and their gradients go
 * to the neighbouring stages with non-blocking sends and blocking receives:
 * a send never waits, so a stage only ever blocks on a receive whose sender
 * has already issued (or will issue without waiting for us) the message, and
 * no layout can deadlock. With pp = 1 the step is plain gradient accumulation.
 * Not here: gradient reduction and the optimizer (train).
 */
#ifndef MPILM_PIPE_H
#define MPILM_PIPE_H

#include "io/tokfile.h"
#include "src/gpt.h"
#include "src/grid.h"

typedef struct {
    double fwd_s, bwd_s, wait_s; /* compute in forward, in backward; blocked in receives */
} pipe_times;

typedef struct pipe_ctx pipe_ctx;

/* m micro-batches of B x T per step on this data-parallel rank. */
int pipe_create(gpt *g, const grid *gr, int m, int B, int T, pipe_ctx **out);
void pipe_destroy(pipe_ctx *p);
/* Activation slots a stage needs under 1F1B: min(pp - stage, m). */
int pipe_slots(const grid *gr, int m);

/* Collective over the pipeline. Micro-batch a reads global rows
 * (a * dp + dp_rank) * B .. + B of the batch that starts at token `base`.
 * Accumulates dscale * gradients; returns this rank's share of the loss sum
 * (non-zero on the last stage's TP rank 0 only). */
double pipe_train_step(pipe_ctx *p, const tokfile *tf, uint64_t base, float dscale,
                       pipe_times *tm);
/* Collective: loss sum over eval batches i = dp_rank, dp_rank + dp, ... of B
 * rows from the start of tf (wrapping), counted as in pipe_train_step. */
double pipe_eval(pipe_ctx *p, const tokfile *tf, int nbatches);

#endif
