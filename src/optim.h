/* optim: AdamW over the flat parameter buffer of a gpt (weight decay on 2-D
 * weights only), global-norm clipping and the learning-rate schedule.
 * Not here: how gradients are reduced across ranks (comm).
 */
#ifndef MPILM_OPTIM_H
#define MPILM_OPTIM_H

#include "src/gpt.h"

typedef struct {
    float *m, *v;
    size_t n;
    int t; /* number of updates done */
    float beta1, beta2, eps, weight_decay;
} optim;

int optim_init(optim *o, size_t nparams, float beta1, float beta2, float eps, float wd);
void optim_free(optim *o);
/* One AdamW update with gradients scaled by gscale (clipping). */
void optim_step(optim *o, gpt *g, float lr, float gscale);

/* The step split in two for comm.compression.payload "update": optim_delta
 * updates this rank's moments from its own gradients (scaled by gscale)
 * and replaces the gradients with its parameter change times out_scale;
 * after the changes are summed over the ranks, optim_apply adds them and
 * the weight decay. Same arithmetic as optim_step up to rounding. */
void optim_delta(optim *o, gpt *g, float lr, float gscale, float out_scale);
void optim_apply(const optim *o, gpt *g, float lr);

/* Learning rate at step s (0-based) of `steps`: linear warm-up over `warmup`
 * steps, then cosine|linear decay to min_lr, or constant. */
double optim_lr(const char *schedule, double lr, double min_lr, int warmup, int steps, int s);
/* Scale that clips a gradient of this norm to max_norm (1 when within). */
float optim_clip_scale(double norm, double max_norm);

#endif
