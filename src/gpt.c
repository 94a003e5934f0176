/* gpt: GPT-2 forward/backward on one rank, composed from kernels/kern.h.
 * Activations are sized for the largest (B,T) seen and reused across calls.
 */
#include "src/gpt.h"

#include "kernels/kern.h"
#include "src/rng.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Activations of one layer for a micro-batch, N = B*T rows. */
typedef struct {
    float *ln1, *ln1_mean, *ln1_rstd; /* (N,C) (N) (N) */
    float *qkv;                       /* (N,3C) */
    float *atty;                      /* (N,C) */
    float *att;                       /* (B,NH,T,T) */
    float *x2;                        /* (N,C) residual after attention */
    float *ln2, *ln2_mean, *ln2_rstd; /* (N,C) (N) (N) */
    float *fch, *fch_gelu;            /* (N,4C) */
} gpt_layer_acts;

struct gpt {
    gpt_config cfg;
    int ntensors;
    gpt_tensor *tensors;
    size_t nparams;
    float *params, *grads;
    /* activations, for up to cap_n rows and cap_t sequence length */
    int cap_b, cap_t;
    float *act_mem;
    float **resid; /* L+1 buffers (N,C): input of layer l, resid[L] = output */
    gpt_layer_acts *la;
    float *lnf, *lnf_mean, *lnf_rstd, *logits, *tmp;
    /* backward scratch */
    float *d_resid, *d_ln, *d_big, *d_qkv, *d_atty, *d_att;
};

static const char *layer_names[GPT_NLAYER_TENSORS] = {
    "ln_1.weight",    "ln_1.bias",     "attn.qkv.weight", "attn.qkv.bias",
    "attn.proj.weight", "attn.proj.bias", "ln_2.weight",   "ln_2.bias",
    "mlp.fc.weight",  "mlp.fc.bias",   "mlp.proj.weight", "mlp.proj.bias"};

int gpt_config_check(const gpt_config *c, char *err, size_t errlen) {
    const struct {
        const char *key;
        int v;
    } pos[] = {{"model.n_layer", c->n_layer},       {"model.n_head", c->n_head},
               {"model.n_embd", c->n_embd},         {"model.block_size", c->block_size},
               {"model.vocab_size", c->vocab_size}};
    for (size_t i = 0; i < sizeof pos / sizeof pos[0]; i++)
        if (pos[i].v <= 0) {
            snprintf(err, errlen, "%s must be positive (got %d)", pos[i].key, pos[i].v);
            return -1;
        }
    if (c->n_embd % c->n_head) {
        snprintf(err, errlen, "model.n_embd (%d) must be divisible by model.n_head (%d)",
                 c->n_embd, c->n_head);
        return -1;
    }
    return 0;
}

static void add_tensor(gpt *g, const char *name, int ndim, int d0, int d1, int decay) {
    gpt_tensor *t = &g->tensors[g->ntensors++];
    snprintf(t->name, sizeof t->name, "%s", name);
    t->ndim = ndim;
    t->shape[0] = d0;
    t->shape[1] = ndim == 2 ? d1 : 1;
    t->numel = (size_t)d0 * (size_t)t->shape[1];
    t->offset = g->nparams;
    t->decay = decay;
    g->nparams += t->numel;
}

int gpt_create(const gpt_config *cfg, gpt **out) {
    char err[128];
    *out = NULL;
    if (gpt_config_check(cfg, err, sizeof err)) return -1;
    gpt *g = calloc(1, sizeof *g);
    if (!g) return -1;
    int L = cfg->n_layer, C = cfg->n_embd;
    g->cfg = *cfg;
    g->tensors = calloc((size_t)(4 + GPT_NLAYER_TENSORS * L), sizeof(gpt_tensor));
    if (!g->tensors) goto fail;
    add_tensor(g, "wte", 2, cfg->vocab_size, C, 1);
    add_tensor(g, "wpe", 2, cfg->block_size, C, 1);
    const int dims[GPT_NLAYER_TENSORS][2] = {{C, 0},     {C, 0}, {3 * C, C}, {3 * C, 0},
                                             {C, C},     {C, 0}, {C, 0},     {C, 0},
                                             {4 * C, C}, {4 * C, 0}, {C, 4 * C}, {C, 0}};
    for (int l = 0; l < L; l++)
        for (int k = 0; k < GPT_NLAYER_TENSORS; k++) {
            char name[48];
            snprintf(name, sizeof name, "h.%d.%s", l, layer_names[k]);
            int nd = dims[k][1] ? 2 : 1;
            add_tensor(g, name, nd, dims[k][0], dims[k][1], nd == 2);
        }
    add_tensor(g, "ln_f.weight", 1, C, 0, 0);
    add_tensor(g, "ln_f.bias", 1, C, 0, 0);
    g->params = calloc(g->nparams, sizeof(float));
    g->grads = calloc(g->nparams, sizeof(float));
    if (!g->params || !g->grads) goto fail;
    *out = g;
    return 0;
fail:
    gpt_destroy(g);
    return -1;
}

static void free_acts(gpt *g) {
    free(g->act_mem);
    free(g->resid);
    free(g->la);
    g->act_mem = NULL;
    g->resid = NULL;
    g->la = NULL;
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

const gpt_config *gpt_cfg(const gpt *g) { return &g->cfg; }
size_t gpt_nparams(const gpt *g) { return g->nparams; }
int gpt_ntensors(const gpt *g) { return g->ntensors; }
const gpt_tensor *gpt_tensor_at(const gpt *g, int i) { return &g->tensors[i]; }
float *gpt_params(gpt *g) { return g->params; }
float *gpt_grads(gpt *g) { return g->grads; }
const float *gpt_logits(const gpt *g) { return g->logits; }

int gpt_find(const gpt *g, const char *name) {
    for (int i = 0; i < g->ntensors; i++)
        if (strcmp(g->tensors[i].name, name) == 0) return i;
    return -1;
}

void gpt_init_weights(gpt *g, uint64_t seed) {
    /* Each tensor has its own stream (seed, index), so a tensor's values do
     * not depend on which other tensors a rank holds. */
    float proj_std = 0.02f / sqrtf(2.0f * g->cfg.n_layer);
    for (int i = 0; i < g->ntensors; i++) {
        const gpt_tensor *t = &g->tensors[i];
        float *p = g->params + t->offset;
        const char *dot = strrchr(t->name, '.');
        int is_ln = strstr(t->name, "ln_") != NULL;
        if (t->ndim == 1) {
            float v = (is_ln && dot && strcmp(dot, ".weight") == 0) ? 1.0f : 0.0f;
            for (size_t j = 0; j < t->numel; j++) p[j] = v;
            continue;
        }
        int is_proj = strstr(t->name, "attn.proj.weight") || strstr(t->name, "mlp.proj.weight");
        float std = is_proj ? proj_std : 0.02f;
        rng_state r;
        rng_seed(&r, seed * 1000003ULL + (uint64_t)i);
        for (size_t j = 0; j < t->numel; j++) p[j] = std * rng_normal(&r);
    }
}

void gpt_zero_grad(gpt *g) { memset(g->grads, 0, g->nparams * sizeof(float)); }

size_t gpt_activation_bytes(const gpt_config *c, int B, int T) {
    size_t N = (size_t)B * T, C = (size_t)c->n_embd, L = (size_t)c->n_layer;
    size_t att = (size_t)B * c->n_head * T * T;
    size_t per_layer = N * (C + 3 * C + C + C + C + 4 * C + 4 * C) + 4 * N + att;
    size_t fwd = (L + 1) * N * C + L * per_layer + N * C + 2 * N + N * (size_t)c->vocab_size +
                 N * C;
    size_t bwd = N * C * 2 + N * 4 * C + N * 3 * C + N * C + att;
    return (fwd + bwd) * sizeof(float);
}

static int ensure_acts(gpt *g, int B, int T) {
    if (B <= g->cap_b && T == g->cap_t) return 0;
    free_acts(g);
    int L = g->cfg.n_layer, C = g->cfg.n_embd, NH = g->cfg.n_head, V = g->cfg.vocab_size;
    size_t N = (size_t)B * T, att = (size_t)B * NH * T * T;
    size_t total = gpt_activation_bytes(&g->cfg, B, T) / sizeof(float);
    g->act_mem = malloc(total * sizeof(float));
    g->resid = calloc((size_t)L + 1, sizeof(float *));
    g->la = calloc((size_t)L, sizeof(gpt_layer_acts));
    if (!g->act_mem || !g->resid || !g->la) {
        free_acts(g);
        return -1;
    }
    float *p = g->act_mem;
#define TAKE(n) (p += (n), p - (n))
    for (int l = 0; l <= L; l++) g->resid[l] = TAKE(N * C);
    for (int l = 0; l < L; l++) {
        gpt_layer_acts *a = &g->la[l];
        a->ln1 = TAKE(N * C);
        a->ln1_mean = TAKE(N);
        a->ln1_rstd = TAKE(N);
        a->qkv = TAKE(N * 3 * C);
        a->atty = TAKE(N * C);
        a->att = TAKE(att);
        a->x2 = TAKE(N * C);
        a->ln2 = TAKE(N * C);
        a->ln2_mean = TAKE(N);
        a->ln2_rstd = TAKE(N);
        a->fch = TAKE(N * 4 * C);
        a->fch_gelu = TAKE(N * 4 * C);
    }
    g->lnf = TAKE(N * C);
    g->lnf_mean = TAKE(N);
    g->lnf_rstd = TAKE(N);
    g->logits = TAKE(N * V);
    g->tmp = TAKE(N * C);
    g->d_resid = TAKE(N * C);
    g->d_ln = TAKE(N * C);
    g->d_big = TAKE(N * 4 * C);
    g->d_qkv = TAKE(N * 3 * C);
    g->d_atty = TAKE(N * C);
    g->d_att = TAKE(att);
#undef TAKE
    g->cap_b = B;
    g->cap_t = T;
    return 0;
}

#define PW(g, l, k) ((g)->params + (g)->tensors[2 + (l) * GPT_NLAYER_TENSORS + (k)].offset)
#define GW(g, l, k) ((g)->grads + (g)->tensors[2 + (l) * GPT_NLAYER_TENSORS + (k)].offset)

static void backward(gpt *g, const int *tok, int B, int T) {
    int L = g->cfg.n_layer, C = g->cfg.n_embd, NH = g->cfg.n_head, V = g->cfg.vocab_size;
    size_t N = (size_t)B * T;
    const gpt_tensor *lnfw = &g->tensors[g->ntensors - 2], *lnfb = &g->tensors[g->ntensors - 1];
    float *wte = g->params, *dwte = g->grads;
    /* logits hold dlogits (from the fused cross-entropy) */
    kern_matmul_bwd(g->d_ln, dwte, NULL, g->logits, g->lnf, wte, N, C, V);
    memset(g->d_resid, 0, N * C * sizeof(float));
    kern_layernorm_bwd(g->d_resid, g->grads + lnfw->offset, g->grads + lnfb->offset, g->d_ln,
                       g->resid[L], g->params + lnfw->offset, g->lnf_mean, g->lnf_rstd, N, C);
    for (int l = L - 1; l >= 0; l--) {
        gpt_layer_acts *a = &g->la[l];
        /* MLP branch: d_resid is d(x3), shared by the skip and the branch */
        kern_matmul_bwd(g->d_big, GW(g, l, GPT_FCPW), GW(g, l, GPT_FCPB), g->d_resid, a->fch_gelu,
                        PW(g, l, GPT_FCPW), N, 4 * C, C);
        kern_gelu_bwd(g->d_big, a->fch, g->d_big, N * 4 * C);
        kern_matmul_bwd(g->d_ln, GW(g, l, GPT_FCW), GW(g, l, GPT_FCB), g->d_big, a->ln2,
                        PW(g, l, GPT_FCW), N, C, 4 * C);
        kern_layernorm_bwd(g->d_resid, GW(g, l, GPT_LN2W), GW(g, l, GPT_LN2B), g->d_ln, a->x2,
                           PW(g, l, GPT_LN2W), a->ln2_mean, a->ln2_rstd, N, C);
        /* attention branch: d_resid is now d(x2) */
        kern_matmul_bwd(g->d_atty, GW(g, l, GPT_ATTPW), GW(g, l, GPT_ATTPB), g->d_resid, a->atty,
                        PW(g, l, GPT_ATTPW), N, C, C);
        kern_attention_bwd(g->d_qkv, g->d_att, g->d_atty, a->qkv, a->att, B, T, C, NH);
        kern_matmul_bwd(g->d_ln, GW(g, l, GPT_QKVW), GW(g, l, GPT_QKVB), g->d_qkv, a->ln1,
                        PW(g, l, GPT_QKVW), N, C, 3 * C);
        kern_layernorm_bwd(g->d_resid, GW(g, l, GPT_LN1W), GW(g, l, GPT_LN1B), g->d_ln,
                           g->resid[l], PW(g, l, GPT_LN1W), a->ln1_mean, a->ln1_rstd, N, C);
    }
    kern_encoder_bwd(dwte, g->grads + g->tensors[1].offset, g->d_resid, tok, B, T, C);
}

double gpt_forward(gpt *g, const int *tok, const int *tgt, int B, int T, float dscale) {
    if (T > g->cfg.block_size || ensure_acts(g, B, T)) return -1.0;
    int L = g->cfg.n_layer, C = g->cfg.n_embd, NH = g->cfg.n_head, V = g->cfg.vocab_size;
    size_t N = (size_t)B * T;
    const gpt_tensor *lnfw = &g->tensors[g->ntensors - 2], *lnfb = &g->tensors[g->ntensors - 1];
    kern_encoder_fwd(g->resid[0], tok, g->params, g->params + g->tensors[1].offset, B, T, C);
    for (int l = 0; l < L; l++) {
        gpt_layer_acts *a = &g->la[l];
        kern_layernorm_fwd(a->ln1, a->ln1_mean, a->ln1_rstd, g->resid[l], PW(g, l, GPT_LN1W),
                           PW(g, l, GPT_LN1B), N, C);
        kern_matmul_fwd(a->qkv, a->ln1, PW(g, l, GPT_QKVW), PW(g, l, GPT_QKVB), N, C, 3 * C);
        kern_attention_fwd(a->atty, a->att, a->qkv, B, T, C, NH);
        kern_matmul_fwd(g->tmp, a->atty, PW(g, l, GPT_ATTPW), PW(g, l, GPT_ATTPB), N, C, C);
        kern_residual_fwd(a->x2, g->resid[l], g->tmp, N * C);
        kern_layernorm_fwd(a->ln2, a->ln2_mean, a->ln2_rstd, a->x2, PW(g, l, GPT_LN2W),
                           PW(g, l, GPT_LN2B), N, C);
        kern_matmul_fwd(a->fch, a->ln2, PW(g, l, GPT_FCW), PW(g, l, GPT_FCB), N, C, 4 * C);
        kern_gelu_fwd(a->fch_gelu, a->fch, N * 4 * C);
        kern_matmul_fwd(g->tmp, a->fch_gelu, PW(g, l, GPT_FCPW), PW(g, l, GPT_FCPB), N, 4 * C, C);
        kern_residual_fwd(g->resid[l + 1], a->x2, g->tmp, N * C);
    }
    kern_layernorm_fwd(g->lnf, g->lnf_mean, g->lnf_rstd, g->resid[L], g->params + lnfw->offset,
                       g->params + lnfb->offset, N, C);
    kern_matmul_fwd(g->logits, g->lnf, g->params, NULL, N, C, V);
    if (!tgt) return 0.0;
    double loss = kern_xent_fwd_bwd(g->logits, tgt, N, V, dscale);
    if (dscale != 0.f) backward(g, tok, B, T);
    return loss;
}

double gpt_flops_per_token(const gpt_config *c, int T) {
    /* PaLM-style count: 6 x (matmul parameters, incl. the LM head) plus the
     * attention products, 12 * L * T * C (forward + backward). */
    double C = c->n_embd, L = c->n_layer;
    double n_mat = 12.0 * L * C * C + (double)c->vocab_size * C;
    return 6.0 * n_mat + 12.0 * L * T * C;
}
