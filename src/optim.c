/* optim: AdamW, schedule, clipping. */
#include "src/optim.h"

#include "kernels/kern.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

int optim_init(optim *o, size_t n, float beta1, float beta2, float eps, float wd) {
    memset(o, 0, sizeof *o);
    o->m = calloc(n, sizeof(float));
    o->v = calloc(n, sizeof(float));
    if (!o->m || !o->v) {
        optim_free(o);
        return -1;
    }
    o->n = n;
    o->beta1 = beta1;
    o->beta2 = beta2;
    o->eps = eps;
    o->weight_decay = wd;
    return 0;
}

void optim_free(optim *o) {
    if (!o) return;
    free(o->m);
    free(o->v);
    o->m = o->v = NULL;
}

void optim_step(optim *o, gpt *g, float lr, float gscale) {
    o->t++;
    float *p = gpt_params(g), *gr = gpt_grads(g);
    for (int i = 0; i < gpt_ntensors(g); i++) {
        const gpt_tensor *t = gpt_tensor_at(g, i);
        kern_adamw(p + t->offset, gr + t->offset, o->m + t->offset, o->v + t->offset, t->numel, lr,
                   o->beta1, o->beta2, o->eps, t->decay ? o->weight_decay : 0.f, gscale, o->t);
    }
}

void optim_delta(optim *o, gpt *g, float lr, float gscale, float out_scale) {
    o->t++;
    float *gr = gpt_grads(g);
    for (int i = 0; i < gpt_ntensors(g); i++) {
        const gpt_tensor *t = gpt_tensor_at(g, i);
        kern_adam_delta(gr + t->offset, o->m + t->offset, o->v + t->offset, t->numel, lr, o->beta1,
                        o->beta2, o->eps, gscale, out_scale, o->t);
    }
}

void optim_apply(const optim *o, gpt *g, float lr) {
    float *p = gpt_params(g), *gr = gpt_grads(g);
    for (int i = 0; i < gpt_ntensors(g); i++) {
        const gpt_tensor *t = gpt_tensor_at(g, i);
        kern_apply_delta(p + t->offset, gr + t->offset, t->numel, lr,
                         t->decay ? o->weight_decay : 0.f);
    }
}

double optim_lr(const char *schedule, double lr, double min_lr, int warmup, int steps, int s) {
    if (s < warmup) return lr * (s + 1) / warmup;
    if (strcmp(schedule, "constant") == 0 || steps <= warmup) return lr;
    double prog = (double)(s - warmup) / (double)(steps - warmup);
    if (prog > 1) prog = 1;
    if (strcmp(schedule, "linear") == 0) return lr - (lr - min_lr) * prog;
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + cos(M_PI * prog));
}

float optim_clip_scale(double norm, double max_norm) {
    if (max_norm <= 0 || !(norm > max_norm)) return 1.0f;
    return (float)(max_norm / (norm + 1e-6));
}
