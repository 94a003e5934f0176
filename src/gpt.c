/* gpt: GPT-2 forward/backward on one rank (a pipeline stage and a tensor-
 * parallel shard of it), composed from kernels/kern.h. Activations are
 * sized for the largest (B,T) seen and reused across calls.
 */
#include "src/gpt.h"

#include "kernels/kern.h"
#include "src/rng.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Activations of one layer for a micro-batch, N = B*T rows; widths are the
 * local (TP shard) ones where marked. */
typedef struct {
    float *ln1, *ln1_mean, *ln1_rstd; /* (N,C) (N) (N) */
    float *qkv;                       /* (N,3C/tp) */
    float *atty;                      /* (N,C/tp) */
    float *att;                       /* (B,NH/tp,T,T) */
    float *x2;                        /* (N,C) residual after attention */
    float *ln2, *ln2_mean, *ln2_rstd; /* (N,C) (N) (N) */
    float *fch, *fch_gelu;            /* (N,4C/tp) */
} layer_acts;

/* Everything one micro-batch keeps between its forward and backward. */
typedef struct {
    float *mem;
    float **resid;  /* nl+1 buffers (N,C): input of local layer l; resid[nl] = output */
    layer_acts *la; /* nl of them, or 1 shared when recomputing */
    float *lnf, *lnf_mean, *lnf_rstd, *logits; /* last stage only */
} slot_acts;

struct gpt {
    gpt_config cfg;
    gpt_part part;
    int nl, C, Cl, NHl;      /* local layers, width, local width and heads */
    int ntensors, lt0, head; /* first layer tensor, LM head tensor (or -1) */
    gpt_tensor *tensors;
    size_t nparams;
    float *params, *grads;
    int cap_b, cap_t;
    slot_acts *slots;
    layer_acts shared; /* recompute: the one set of layer activations */
    float *shared_mem, *tmp, *d_resid, *d_ln, *d_big, *d_qkv, *d_atty, *d_att;
    double tp_seconds;
    gpt_grad_hook hook; /* see gpt_set_grad_hook */
    void *hook_ud;
    int hook_armed;
};

static const char *layer_names[GPT_NLAYER_TENSORS] = {
    "ln_1.weight",      "ln_1.bias",      "attn.qkv.weight", "attn.qkv.bias",
    "attn.proj.weight", "attn.proj.bias", "ln_2.weight",     "ln_2.bias",
    "mlp.fc.weight",    "mlp.fc.bias",    "mlp.proj.weight", "mlp.proj.bias"};
static const gpt_shard layer_shard[GPT_NLAYER_TENSORS] = {
    GPT_REPL, GPT_REPL, GPT_SPLIT_QKV,  GPT_SPLIT_QKV,  GPT_SPLIT_COLS, GPT_REPL,
    GPT_REPL, GPT_REPL, GPT_SPLIT_ROWS, GPT_SPLIT_ROWS, GPT_SPLIT_COLS, GPT_REPL};

int gpt_config_check(const gpt_config *c, char *err, size_t errlen) {
    const struct {
        const char *key;
        int v;
    } pos[] = {{"model.n_layer", c->n_layer},
               {"model.n_head", c->n_head},
               {"model.n_embd", c->n_embd},
               {"model.block_size", c->block_size},
               {"model.vocab_size", c->vocab_size}};
    for (size_t i = 0; i < sizeof pos / sizeof pos[0]; i++)
        if (pos[i].v <= 0) {
            snprintf(err, errlen, "%s must be positive (got %d)", pos[i].key, pos[i].v);
            return -1;
        }
    if (c->n_embd % c->n_head) {
        snprintf(err, errlen, "model.n_embd (%d) must be divisible by model.n_head (%d)", c->n_embd,
                 c->n_head);
        return -1;
    }
    return 0;
}

int gpt_global_ntensors(const gpt_config *cfg) {
    return 4 + GPT_NLAYER_TENSORS * cfg->n_layer;
}

void gpt_global_name(const gpt_config *cfg, int i, char *name, size_t len, int shape[2],
                     int *ndim) {
    int C = cfg->n_embd, L = cfg->n_layer;
    const int dims[GPT_NLAYER_TENSORS][2] = {{C, 0},     {C, 0},     {3 * C, C}, {3 * C, 0},
                                             {C, C},     {C, 0},     {C, 0},     {C, 0},
                                             {4 * C, C}, {4 * C, 0}, {C, 4 * C}, {C, 0}};
    if (i == 0 || i == 1) {
        snprintf(name, len, "%s", i == 0 ? "wte" : "wpe");
        shape[0] = i == 0 ? cfg->vocab_size : cfg->block_size;
        shape[1] = C;
        *ndim = 2;
    } else if (i < 2 + GPT_NLAYER_TENSORS * L) {
        int l = (i - 2) / GPT_NLAYER_TENSORS, k = (i - 2) % GPT_NLAYER_TENSORS;
        snprintf(name, len, "h.%d.%s", l, layer_names[k]);
        shape[0] = dims[k][0];
        shape[1] = dims[k][1] ? dims[k][1] : 1;
        *ndim = dims[k][1] ? 2 : 1;
    } else {
        snprintf(name, len, "%s", i == 2 + GPT_NLAYER_TENSORS * L ? "ln_f.weight" : "ln_f.bias");
        shape[0] = C;
        shape[1] = 1;
        *ndim = 1;
    }
}

/* Adds global tensor gi to the local table with its TP shard. */
static void add_tensor(gpt *g, int gi, gpt_shard shard, int in_norm) {
    gpt_tensor *t = &g->tensors[g->ntensors++];
    int gs[2], nd, tp = g->part.tp;
    gpt_global_name(&g->cfg, gi, t->name, sizeof t->name, gs, &nd);
    t->ndim = nd;
    t->gshape[0] = gs[0];
    t->gshape[1] = gs[1];
    t->shape[0] = shard == GPT_SPLIT_ROWS || shard == GPT_SPLIT_QKV ? gs[0] / tp : gs[0];
    t->shape[1] = shard == GPT_SPLIT_COLS ? gs[1] / tp : gs[1];
    t->numel = (size_t)t->shape[0] * (size_t)t->shape[1];
    t->offset = g->nparams;
    t->shard = shard;
    t->gindex = gi;
    t->decay = nd == 2;
    /* replicated tensors are counted by TP rank 0 only */
    t->in_norm = in_norm && (shard != GPT_REPL || g->part.tp_rank == 0);
    g->nparams += t->numel;
}

int gpt_create_part(const gpt_config *cfg, const gpt_part *part, gpt **out) {
    char err[128];
    *out = NULL;
    if (gpt_config_check(cfg, err, sizeof err)) return -1;
    if (part->tp < 1 || cfg->n_head % part->tp || part->layer0 < 0 || part->layer1 > cfg->n_layer ||
        part->layer0 > part->layer1)
        return -1;
    gpt *g = calloc(1, sizeof *g);
    if (!g) return -1;
    int L = cfg->n_layer;
    g->cfg = *cfg;
    g->part = *part;
    if (g->part.nslots < 1) g->part.nslots = 1;
    g->nl = part->layer1 - part->layer0;
    g->C = cfg->n_embd;
    g->Cl = cfg->n_embd / part->tp;
    g->NHl = cfg->n_head / part->tp;
    g->head = -1;
    g->tensors = calloc((size_t)(5 + GPT_NLAYER_TENSORS * L), sizeof(gpt_tensor));
    if (!g->tensors) goto fail;
    if (part->first) {
        add_tensor(g, 0, GPT_REPL, 1);
        add_tensor(g, 1, GPT_REPL, 1);
    }
    g->lt0 = g->ntensors;
    for (int l = part->layer0; l < part->layer1; l++)
        for (int k = 0; k < GPT_NLAYER_TENSORS; k++)
            add_tensor(g, 2 + l * GPT_NLAYER_TENSORS + k, layer_shard[k], 1);
    if (part->last) {
        add_tensor(g, 2 + GPT_NLAYER_TENSORS * L, GPT_REPL, 1);
        add_tensor(g, 3 + GPT_NLAYER_TENSORS * L, GPT_REPL, 1);
        if (part->first)
            g->head = 0;
        else { /* the tied LM head: a copy of wte, counted once (on the first stage) */
            g->head = g->ntensors;
            add_tensor(g, 0, GPT_REPL, 0);
        }
    }
    g->params = calloc(g->nparams ? g->nparams : 1, sizeof(float));
    g->grads = calloc(g->nparams ? g->nparams : 1, sizeof(float));
    if (!g->params || !g->grads) goto fail;
    *out = g;
    return 0;
fail:
    gpt_destroy(g);
    return -1;
}

int gpt_create(const gpt_config *cfg, gpt **out) {
    gpt_part p = {.tp = 1,
                  .tp_rank = 0,
                  .tp_comm = MPI_COMM_NULL,
                  .layer0 = 0,
                  .layer1 = cfg->n_layer,
                  .first = 1,
                  .last = 1,
                  .nslots = 1};
    return gpt_create_part(cfg, &p, out);
}

static void free_acts(gpt *g) {
    for (int s = 0; g->slots && s < g->part.nslots; s++) {
        free(g->slots[s].mem);
        free(g->slots[s].resid);
        free(g->slots[s].la);
    }
    free(g->slots);
    free(g->shared_mem);
    g->slots = NULL;
    g->shared_mem = NULL;
    g->cap_b = g->cap_t = 0;
}

void gpt_destroy(gpt *g) {
    if (!g) return;
    free_acts(g);
    free(g->tensors);
    free(g->params);
    free(g->grads);
    free(g);
}

const gpt_config *gpt_cfg(const gpt *g) {
    return &g->cfg;
}
const gpt_part *gpt_get_part(const gpt *g) {
    return &g->part;
}
size_t gpt_nparams(const gpt *g) {
    return g->nparams;
}
int gpt_ntensors(const gpt *g) {
    return g->ntensors;
}
const gpt_tensor *gpt_tensor_at(const gpt *g, int i) {
    return &g->tensors[i];
}
float *gpt_params(gpt *g) {
    return g->params;
}
float *gpt_grads(gpt *g) {
    return g->grads;
}
int gpt_head_tensor(const gpt *g) {
    return g->head;
}
double gpt_tp_comm_seconds(const gpt *g) {
    return g->tp_seconds;
}
const float *gpt_logits(const gpt *g) {
    return g->slots ? g->slots[0].logits : NULL;
}

int gpt_find(const gpt *g, const char *name) {
    for (int i = 0; i < g->ntensors; i++)
        if (strcmp(g->tensors[i].name, name) == 0) return i;
    return -1;
}

/* Copies this rank's shard of a global (rows, cols) tensor. */
static void take_shard(const gpt *g, const gpt_tensor *t, const float *full, float *dst) {
    int tp = g->part.tp, r = g->part.tp_rank, R = t->gshape[0], Cc = t->gshape[1];
    switch (t->shard) {
    case GPT_REPL:
        memcpy(dst, full, t->numel * sizeof(float));
        break;
    case GPT_SPLIT_ROWS:
        memcpy(dst, full + (size_t)r * (R / tp) * Cc, t->numel * sizeof(float));
        break;
    case GPT_SPLIT_QKV: /* q, k and v thirds each give their rows of this rank's heads */
        for (int part = 0; part < 3; part++) {
            size_t rows = (size_t)R / 3 / tp, src = (size_t)part * (R / 3) + r * rows;
            memcpy(dst + part * rows * Cc, full + src * Cc, rows * Cc * sizeof(float));
        }
        break;
    case GPT_SPLIT_COLS:
        for (int i = 0; i < R; i++)
            memcpy(dst + (size_t)i * (Cc / tp), full + (size_t)i * Cc + r * (Cc / tp),
                   (size_t)(Cc / tp) * sizeof(float));
        break;
    }
}

void gpt_init_weights(gpt *g, uint64_t seed) {
    /* Each tensor has its own stream (seed, global index); a rank generates
     * the whole tensor and keeps its shard, so the model is the same for
     * every layout. */
    float proj_std = 0.02f / sqrtf(2.0f * g->cfg.n_layer);
    for (int i = 0; i < g->ntensors; i++) {
        const gpt_tensor *t = &g->tensors[i];
        float *p = g->params + t->offset;
        const char *dot = strrchr(t->name, '.');
        if (t->ndim == 1) {
            int is_ln = strstr(t->name, "ln_") != NULL;
            float v = (is_ln && dot && strcmp(dot, ".weight") == 0) ? 1.0f : 0.0f;
            for (size_t j = 0; j < t->numel; j++)
                p[j] = v;
            continue;
        }
        int is_proj = strstr(t->name, "attn.proj.weight") || strstr(t->name, "mlp.proj.weight");
        float std = is_proj ? proj_std : 0.02f;
        size_t n = (size_t)t->gshape[0] * t->gshape[1];
        float *full = t->shard == GPT_REPL ? p : malloc(n * sizeof(float));
        rng_state r;
        rng_seed(&r, seed * 1000003ULL + (uint64_t)t->gindex);
        for (size_t j = 0; full && j < n; j++)
            full[j] = std * rng_normal(&r);
        if (full && full != p) {
            take_shard(g, t, full, p);
            free(full);
        }
    }
}

void gpt_zero_grad(gpt *g) {
    memset(g->grads, 0, g->nparams * sizeof(float));
}

static size_t layer_floats(const gpt *g, size_t N, size_t att) {
    size_t C = g->C, Cl = g->Cl;
    return N * (C + 3 * Cl + Cl + C + C + 4 * Cl + 4 * Cl) + 4 * N + att;
}

/* Floats per activation slot and shared between slots, for (B,T). */
static void act_sizes(const gpt *g, int B, int T, int rec, size_t *per_slot, size_t *shared) {
    size_t N = (size_t)B * T, C = g->C, Cl = g->Cl, V = g->cfg.vocab_size;
    size_t att = (size_t)B * g->NHl * T * T, nl = g->nl;
    *per_slot = (nl + 1) * N * C + (rec ? 0 : nl * layer_floats(g, N, att)) +
                (g->part.last ? N * C + 2 * N + N * V : 0);
    *shared = (rec ? layer_floats(g, N, att) : 0) + N * C /* tmp */ + N * C * 2 + N * 4 * Cl +
              N * 3 * Cl + N * Cl + att;
}

size_t gpt_part_activation_bytes(const gpt *g, int B, int T, int recompute) {
    size_t per_slot, shared;
    act_sizes(g, B, T, recompute, &per_slot, &shared);
    return (per_slot * (size_t)g->part.nslots + shared) * sizeof(float);
}

static float *take(float **p, size_t n) {
    float *r = *p;
    *p += n;
    return r;
}

static void carve_layer(layer_acts *a, float **p, size_t N, size_t C, size_t Cl, size_t att) {
    a->ln1 = take(p, N * C);
    a->ln1_mean = take(p, N);
    a->ln1_rstd = take(p, N);
    a->qkv = take(p, N * 3 * Cl);
    a->atty = take(p, N * Cl);
    a->att = take(p, att);
    a->x2 = take(p, N * C);
    a->ln2 = take(p, N * C);
    a->ln2_mean = take(p, N);
    a->ln2_rstd = take(p, N);
    a->fch = take(p, N * 4 * Cl);
    a->fch_gelu = take(p, N * 4 * Cl);
}

static int ensure_acts(gpt *g, int B, int T) {
    if (B <= g->cap_b && T == g->cap_t) return 0;
    free_acts(g);
    size_t N = (size_t)B * T, C = g->C, Cl = g->Cl, V = g->cfg.vocab_size;
    size_t att = (size_t)B * g->NHl * T * T, nl = g->nl, ns = g->part.nslots;
    int rec = g->part.recompute;
    size_t per_slot, shared;
    act_sizes(g, B, T, rec, &per_slot, &shared);
    g->slots = calloc(ns, sizeof(slot_acts));
    g->shared_mem = malloc(shared * sizeof(float));
    if (!g->slots || !g->shared_mem) goto fail;
    for (size_t s = 0; s < ns; s++) {
        slot_acts *sa = &g->slots[s];
        sa->mem = malloc(per_slot * sizeof(float));
        sa->resid = calloc(nl + 1, sizeof(float *));
        sa->la = calloc(nl ? nl : 1, sizeof(layer_acts));
        if (!sa->mem || !sa->resid || !sa->la) goto fail;
        float *p = sa->mem;
        for (size_t l = 0; l <= nl; l++)
            sa->resid[l] = take(&p, N * C);
        for (size_t l = 0; !rec && l < nl; l++)
            carve_layer(&sa->la[l], &p, N, C, Cl, att);
        if (g->part.last) {
            sa->lnf = take(&p, N * C);
            sa->lnf_mean = take(&p, N);
            sa->lnf_rstd = take(&p, N);
            sa->logits = take(&p, N * V);
        }
    }
    float *p = g->shared_mem;
    if (rec) carve_layer(&g->shared, &p, N, C, Cl, att);
    g->tmp = take(&p, N * C);
    g->d_resid = take(&p, N * C);
    g->d_ln = take(&p, N * C);
    g->d_big = take(&p, N * 4 * Cl);
    g->d_qkv = take(&p, N * 3 * Cl);
    g->d_atty = take(&p, N * Cl);
    g->d_att = take(&p, att);
    g->cap_b = B;
    g->cap_t = T;
    return 0;
fail:
    free_acts(g);
    return -1;
}

/* Sum over the TP group (Megatron's g in forward, f in backward). */
static void tp_allreduce(gpt *g, float *x, size_t n) {
    if (g->part.tp == 1) return;
    double t0 = MPI_Wtime();
    MPI_Allreduce(MPI_IN_PLACE, x, (int)n, MPI_FLOAT, MPI_SUM, g->part.tp_comm);
    g->tp_seconds += MPI_Wtime() - t0;
}

#define PW(g, l, k) ((g)->params + (g)->tensors[(g)->lt0 + (l)*GPT_NLAYER_TENSORS + (k)].offset)
#define GW(g, l, k) ((g)->grads + (g)->tensors[(g)->lt0 + (l)*GPT_NLAYER_TENSORS + (k)].offset)
#define LN_F(g, which) ((g)->tensors[(g)->lt0 + (g)->nl * GPT_NLAYER_TENSORS + (which)].offset)

/* Forward of local layer l: x -> out, activations into a. Row-parallel
 * biases are added by TP rank 0 only, so the all-reduce adds them once. */
static void layer_fwd(gpt *g, int l, layer_acts *a, const float *x, float *out, int B, int T) {
    size_t N = (size_t)B * T;
    int C = g->C, Cl = g->Cl, r0 = g->part.tp_rank == 0;
    kern_layernorm_fwd(a->ln1, a->ln1_mean, a->ln1_rstd, x, PW(g, l, GPT_LN1W), PW(g, l, GPT_LN1B),
                       N, C);
    kern_matmul_fwd(a->qkv, a->ln1, PW(g, l, GPT_QKVW), PW(g, l, GPT_QKVB), N, C, 3 * Cl);
    kern_attention_fwd(a->atty, a->att, a->qkv, B, T, Cl, g->NHl);
    kern_matmul_fwd(g->tmp, a->atty, PW(g, l, GPT_ATTPW), r0 ? PW(g, l, GPT_ATTPB) : NULL, N, Cl,
                    C);
    tp_allreduce(g, g->tmp, N * C);
    kern_residual_fwd(a->x2, x, g->tmp, N * C);
    kern_layernorm_fwd(a->ln2, a->ln2_mean, a->ln2_rstd, a->x2, PW(g, l, GPT_LN2W),
                       PW(g, l, GPT_LN2B), N, C);
    kern_matmul_fwd(a->fch, a->ln2, PW(g, l, GPT_FCW), PW(g, l, GPT_FCB), N, C, 4 * Cl);
    kern_gelu_fwd(a->fch_gelu, a->fch, N * 4 * Cl);
    kern_matmul_fwd(g->tmp, a->fch_gelu, PW(g, l, GPT_FCPW), r0 ? PW(g, l, GPT_FCPB) : NULL, N,
                    4 * Cl, C);
    tp_allreduce(g, g->tmp, N * C);
    kern_residual_fwd(out, a->x2, g->tmp, N * C);
}

/* Backward of local layer l; g->d_resid holds d(out) on entry, d(x) on exit. */
static void layer_bwd(gpt *g, int l, layer_acts *a, const float *x, int B, int T) {
    size_t N = (size_t)B * T;
    int C = g->C, Cl = g->Cl, NHl = g->NHl;
    kern_matmul_bwd(g->d_big, GW(g, l, GPT_FCPW), GW(g, l, GPT_FCPB), g->d_resid, a->fch_gelu,
                    PW(g, l, GPT_FCPW), N, 4 * Cl, C);
    kern_gelu_bwd(g->d_big, a->fch, g->d_big, N * 4 * Cl);
    kern_matmul_bwd(g->d_ln, GW(g, l, GPT_FCW), GW(g, l, GPT_FCB), g->d_big, a->ln2,
                    PW(g, l, GPT_FCW), N, C, 4 * Cl);
    tp_allreduce(g, g->d_ln, N * C);
    kern_layernorm_bwd(g->d_resid, GW(g, l, GPT_LN2W), GW(g, l, GPT_LN2B), g->d_ln, a->x2,
                       PW(g, l, GPT_LN2W), a->ln2_mean, a->ln2_rstd, N, C);
    kern_matmul_bwd(g->d_atty, GW(g, l, GPT_ATTPW), GW(g, l, GPT_ATTPB), g->d_resid, a->atty,
                    PW(g, l, GPT_ATTPW), N, Cl, C);
    kern_attention_bwd(g->d_qkv, g->d_att, g->d_atty, a->qkv, a->att, B, T, Cl, NHl);
    kern_matmul_bwd(g->d_ln, GW(g, l, GPT_QKVW), GW(g, l, GPT_QKVB), g->d_qkv, a->ln1,
                    PW(g, l, GPT_QKVW), N, C, 3 * Cl);
    tp_allreduce(g, g->d_ln, N * C);
    kern_layernorm_bwd(g->d_resid, GW(g, l, GPT_LN1W), GW(g, l, GPT_LN1B), g->d_ln, x,
                       PW(g, l, GPT_LN1W), a->ln1_mean, a->ln1_rstd, N, C);
}

static layer_acts *acts_of(gpt *g, slot_acts *sa, int l) {
    return g->part.recompute ? &g->shared : &sa->la[l];
}

int gpt_reserve(gpt *g, int B, int T) {
    return T > g->cfg.block_size ? -1 : ensure_acts(g, B, T);
}

double gpt_stage_forward(gpt *g, int slot, const int *tok, const float *x_in, const int *tgt, int B,
                         int T, float dscale) {
    if (T > g->cfg.block_size || slot < 0 || slot >= g->part.nslots || ensure_acts(g, B, T))
        return -1.0;
    size_t N = (size_t)B * T;
    int C = g->C, V = g->cfg.vocab_size;
    slot_acts *sa = &g->slots[slot];
    if (g->part.first)
        kern_encoder_fwd(sa->resid[0], tok, g->params, g->params + g->tensors[1].offset, B, T, C);
    else if (x_in)
        memcpy(sa->resid[0], x_in, N * C * sizeof(float));
    for (int l = 0; l < g->nl; l++)
        layer_fwd(g, l, acts_of(g, sa, l), sa->resid[l], sa->resid[l + 1], B, T);
    if (!g->part.last) return 0.0;
    kern_layernorm_fwd(sa->lnf, sa->lnf_mean, sa->lnf_rstd, sa->resid[g->nl],
                       g->params + LN_F(g, 0), g->params + LN_F(g, 1), N, C);
    kern_matmul_fwd(sa->logits, sa->lnf, g->params + g->tensors[g->head].offset, NULL, N, C, V);
    if (!tgt) return 0.0;
    return kern_xent_fwd_bwd(sa->logits, tgt, N, V, dscale);
}

const float *gpt_stage_output(const gpt *g, int slot) {
    return g->slots[slot].resid[g->nl];
}
const float *gpt_stage_input_grad(const gpt *g) {
    return g->d_resid;
}

void gpt_set_grad_hook(gpt *g, gpt_grad_hook fn, void *ud) {
    g->hook = fn;
    g->hook_ud = ud;
}
void gpt_arm_grad_hook(gpt *g, int armed) {
    g->hook_armed = armed;
}

/* Tells the hook that tensors [t0, t0 + n) are final for this step. */
static void grads_final(gpt *g, int t0, int n) {
    if (g->hook && g->hook_armed) g->hook(g->hook_ud, t0, t0 + n);
}

void gpt_stage_backward(gpt *g, int slot, const int *tok, const float *dy, int B, int T) {
    size_t N = (size_t)B * T;
    int C = g->C, V = g->cfg.vocab_size;
    slot_acts *sa = &g->slots[slot];
    if (g->part.last) {
        /* logits hold dlogits (from the fused cross-entropy) */
        const gpt_tensor *h = &g->tensors[g->head];
        kern_matmul_bwd(g->d_ln, g->grads + h->offset, NULL, sa->logits, sa->lnf,
                        g->params + h->offset, N, C, V);
        memset(g->d_resid, 0, N * C * sizeof(float));
        kern_layernorm_bwd(g->d_resid, g->grads + LN_F(g, 0), g->grads + LN_F(g, 1), g->d_ln,
                           sa->resid[g->nl], g->params + LN_F(g, 0), sa->lnf_mean, sa->lnf_rstd, N,
                           C);
        grads_final(g, g->lt0 + g->nl * GPT_NLAYER_TENSORS, 2); /* ln_f */
    } else
        memcpy(g->d_resid, dy, N * C * sizeof(float));
    for (int l = g->nl - 1; l >= 0; l--) {
        layer_acts *a = acts_of(g, sa, l);
        if (g->part.recompute) /* rebuild this layer's activations from its input */
            layer_fwd(g, l, a, sa->resid[l], sa->resid[l + 1], B, T);
        layer_bwd(g, l, a, sa->resid[l], B, T);
        grads_final(g, g->lt0 + l * GPT_NLAYER_TENSORS, GPT_NLAYER_TENSORS);
    }
    if (g->part.first) {
        kern_encoder_bwd(g->grads, g->grads + g->tensors[1].offset, g->d_resid, tok, B, T, C);
        /* wte is final here only when no other stage adds the head's share */
        if (g->part.last)
            grads_final(g, 0, 2);
        else
            grads_final(g, 1, 1);
    }
}

double gpt_forward(gpt *g, const int *tok, const int *tgt, int B, int T, float dscale) {
    double loss = gpt_stage_forward(g, 0, tok, NULL, tgt, B, T, dscale);
    if (loss < 0 || !tgt || dscale == 0.f) return loss;
    gpt_stage_backward(g, 0, tok, NULL, B, T);
    return loss;
}

double gpt_flops_per_token(const gpt_config *c, int T) {
    /* PaLM-style count: 6 x (matmul parameters, incl. the LM head) plus the
     * attention products, 12 * L * T * C (forward + backward). */
    double C = c->n_embd, L = c->n_layer;
    double n_mat = 12.0 * L * C * C + (double)c->vocab_size * C;
    return 6.0 * n_mat + 12.0 * L * T * C;
}
