/* infer: KV-cache inference engine on one rank (see infer.h). */
#include "src/infer.h"

#include "io/qckpt.h"
#include "kernels/kern.h"
#include "kernels/quant.h"
#include "src/spmd.h"

#include <hdf5.h>
#include <immintrin.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* One linear layer y = x W^T + b: fp32 W, or quantized blocks when fmt >= 0. */
typedef struct {
    const float *w, *b;
    int fmt; /* -1: fp32 */
    void *q; /* owned quant_tensor buffer */
    int in, out;
} lin;

typedef struct {
    const float *ln1w, *ln1b, *ln2w, *ln2b;
    lin qkv, proj, fc, fcp;
} layer;

struct infer_engine {
    gpt *g;
    int L, C, NH, V, Tmax, S; /* S: slots */
    const float *wte, *wpe, *lnfw, *lnfb;
    layer *ly;
    lin head;
    float *kc, *vc; /* (S, L, Tmax, C) */
    int *pos;       /* (S) */
    /* scratch for R = max(Tmax, S) rows */
    int R;
    float *x, *ln, *qkv, *atty, *fc, *tmp, *mean, *rstd, *att, *logits;
    long long steps, rows;
};

const char *infer_finish_name(int f) {
    return f == INFER_STOP ? "stop" : "length";
}

/* Decode-sized fp32 product y (N, out) = x (N, in) W^T + b: OpenMP over
 * output rows, each weight row read once for all N inputs, every y element
 * computed by the same instruction sequence whatever N and the thread count
 * (so a sequence's result does not depend on its batch). BLAS sgemm with
 * M = 1..8 packs the whole weight matrix on every call, which costs as much
 * as the product itself in this memory-bound regime. Used for every decode
 * batch, so batch invariance holds at any --max-batch (at large batches
 * sgemm would be faster). */
static float dot_f32(const float *a, const float *b, int n) {
    int i = 0;
    float s = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), a3);
    }
    __m256 t = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    s = _mm_cvtss_f32(h);
#endif
    for (; i < n; i++)
        s += a[i] * b[i];
    return s;
}

static void small_matmul(float *y, const float *x, const float *w, const float *bias, int N, int in,
                         int out) {
#pragma omp parallel for schedule(static)
    for (int o = 0; o < out; o++) {
        const float *wr = w + (size_t)o * in;
        float bo = bias ? bias[o] : 0.f;
        for (int b = 0; b < N; b++)
            y[(size_t)b * out + o] = dot_f32(x + (size_t)b * in, wr, in) + bo;
    }
}

/* decode: 1 when called from a decode step (batch-invariant kernels) */
static void lin_fwd(const lin *l, float *y, const float *x, int N, int decode) {
    if (l->fmt >= 0)
        quant_matmul((quant_fmt)l->fmt, l->q, (size_t)l->out, (size_t)l->in, x, (size_t)N, l->b, y);
    else if (decode)
        small_matmul(y, x, l->w, l->b, N, l->in, l->out);
    else
        kern_matmul_fwd(y, x, l->w, l->b, (size_t)N, l->in, l->out);
}

static const float *P(gpt *g, const char *name) {
    int i = gpt_find(g, name);
    return i < 0 ? NULL : gpt_params(g) + gpt_tensor_at(g, i)->offset;
}

static lin mk_lin(gpt *g, const char *w, const char *b, int in, int out) {
    lin l = {P(g, w), b ? P(g, b) : NULL, -1, NULL, in, out};
    return l;
}

int infer_create(gpt *g, int max_batch, infer_engine **out, char *err, size_t errlen) {
    *out = NULL;
    const gpt_config *c = gpt_cfg(g);
    const gpt_part *pt = gpt_get_part(g);
    if (max_batch < 1 || pt->tp != 1 || !pt->first || !pt->last || pt->layer0 != 0 ||
        pt->layer1 != c->n_layer) {
        snprintf(err, errlen, "inference needs the whole model on one rank and max_batch >= 1");
        return -1;
    }
    infer_engine *e = calloc(1, sizeof *e);
    if (!e) goto oom;
    e->g = g;
    e->L = c->n_layer, e->C = c->n_embd, e->NH = c->n_head, e->V = c->vocab_size;
    e->Tmax = c->block_size, e->S = max_batch;
    e->R = e->Tmax > e->S ? e->Tmax : e->S;
    int C = e->C;
    e->wte = P(g, "wte"), e->wpe = P(g, "wpe"), e->lnfw = P(g, "ln_f.weight"),
    e->lnfb = P(g, "ln_f.bias");
    e->head = mk_lin(g, "wte", NULL, C, e->V);
    e->ly = calloc((size_t)e->L, sizeof *e->ly);
    if (!e->ly) goto oom;
    for (int l = 0; l < e->L; l++) {
        char a[64], b[64];
        layer *y = &e->ly[l];
#define NM(buf, s) (snprintf(buf, sizeof buf, "h.%d.%s", l, s), buf)
        y->ln1w = P(g, NM(a, "ln_1.weight")), y->ln1b = P(g, NM(b, "ln_1.bias"));
        y->ln2w = P(g, NM(a, "ln_2.weight")), y->ln2b = P(g, NM(b, "ln_2.bias"));
        y->qkv = mk_lin(g, NM(a, "attn.qkv.weight"), NM(b, "attn.qkv.bias"), C, 3 * C);
        y->proj = mk_lin(g, NM(a, "attn.proj.weight"), NM(b, "attn.proj.bias"), C, C);
        y->fc = mk_lin(g, NM(a, "mlp.fc.weight"), NM(b, "mlp.fc.bias"), C, 4 * C);
        y->fcp = mk_lin(g, NM(a, "mlp.proj.weight"), NM(b, "mlp.proj.bias"), 4 * C, C);
#undef NM
        if (!y->ln1w || !y->ln2b || !y->qkv.w || !y->fcp.b) {
            snprintf(err, errlen, "model layer %d: tensors missing", l);
            infer_destroy(e);
            return -1;
        }
    }
    size_t kv = (size_t)e->S * e->L * e->Tmax * C, R = (size_t)e->R;
    e->kc = malloc(kv * sizeof(float));
    e->vc = malloc(kv * sizeof(float));
    e->pos = calloc((size_t)e->S, sizeof(int));
    e->x = malloc(R * C * sizeof(float));
    e->ln = malloc(R * C * sizeof(float));
    e->qkv = malloc(R * 3 * C * sizeof(float));
    e->atty = malloc(R * C * sizeof(float));
    e->fc = malloc(R * 4 * C * sizeof(float));
    e->tmp = malloc(R * C * sizeof(float));
    e->mean = malloc(R * sizeof(float));
    e->rstd = malloc(R * sizeof(float));
    /* prefill: NH*T*T probabilities; decode: S*NH*Tmax scores */
    size_t na = (size_t)e->NH * e->Tmax * (e->Tmax > e->S ? e->Tmax : e->S);
    e->att = malloc(na * sizeof(float));
    e->logits = malloc((size_t)e->S * e->V * sizeof(float));
    if (!e->kc || !e->vc || !e->pos || !e->x || !e->ln || !e->qkv || !e->atty || !e->fc ||
        !e->tmp || !e->mean || !e->rstd || !e->att || !e->logits)
        goto oom;
    *out = e;
    return 0;
oom:
    snprintf(err, errlen, "out of memory for the inference engine (%d slots)", max_batch);
    infer_destroy(e);
    return -1;
}

static void lin_free(lin *l) {
    free(l->q);
    l->q = NULL;
}

void infer_destroy(infer_engine *e) {
    if (!e) return;
    if (e->ly)
        for (int l = 0; l < e->L; l++) {
            lin_free(&e->ly[l].qkv), lin_free(&e->ly[l].proj);
            lin_free(&e->ly[l].fc), lin_free(&e->ly[l].fcp);
        }
    lin_free(&e->head);
    free(e->ly);
    free(e->kc), free(e->vc), free(e->pos);
    free(e->x), free(e->ln), free(e->qkv), free(e->atty), free(e->fc), free(e->tmp);
    free(e->mean), free(e->rstd), free(e->att), free(e->logits);
    free(e);
}

size_t infer_kv_bytes(const infer_engine *e) {
    return 2 * (size_t)e->S * e->L * e->Tmax * e->C * sizeof(float);
}

const float *infer_logits(const infer_engine *e, int slot) {
    return e->logits + (size_t)slot * e->V;
}
int infer_pos(const infer_engine *e, int slot) {
    return e->pos[slot];
}

void infer_batch_stats(const infer_engine *e, long long *steps, long long *rows) {
    *steps = e->steps;
    *rows = e->rows;
}

/* ---- quantized weights straight from the checkpoint ---- */

static hid_t fp16_type(void) {
    hid_t t = H5Tcopy(H5T_IEEE_F32LE);
    if (t < 0) return -1;
    if (H5Tset_fields(t, 15, 10, 5, 0, 10) < 0 || H5Tset_size(t, 2) < 0 ||
        H5Tset_ebias(t, 15) < 0) {
        H5Tclose(t);
        return -1;
    }
    return t;
}

static int read_part(hid_t g, const char *file, const char *qpath, const char *ds, hid_t mtype,
                     hsize_t rows, hsize_t cols, void *buf, int bytes, char *err, size_t errlen) {
    hid_t d = -1, sp = -1, a = -1;
    hsize_t dims[2] = {0, 0};
    uint64_t want = 0;
    int rc = -1;
    if (H5Lexists(g, ds, H5P_DEFAULT) <= 0 || (d = H5Dopen2(g, ds, H5P_DEFAULT)) < 0 ||
        (sp = H5Dget_space(d)) < 0 || H5Sget_simple_extent_ndims(sp) != 2 ||
        H5Sget_simple_extent_dims(sp, dims, NULL) < 0 || dims[0] != rows || dims[1] != cols) {
        snprintf(err, errlen, "%s: /%s/%s missing or of the wrong shape", file, qpath, ds);
        goto done;
    }
    if (H5Dread(d, mtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf) < 0 ||
        H5Aexists(d, "checksum") <= 0 || (a = H5Aopen(d, "checksum", H5P_DEFAULT)) < 0 ||
        H5Aread(a, H5T_NATIVE_UINT64, &want) < 0) {
        snprintf(err, errlen, "%s: cannot read /%s/%s", file, qpath, ds);
        goto done;
    }
    if (qckpt_hash(buf, (size_t)(rows * cols), bytes, 0) != want) {
        snprintf(err, errlen, "%s: /%s/%s is corrupt (checksum mismatch)", file, qpath, ds);
        goto done;
    }
    rc = 0;
done:
    if (a >= 0) H5Aclose(a);
    if (sp >= 0) H5Sclose(sp);
    if (d >= 0) H5Dclose(d);
    return rc;
}

/* 1: loaded, 0: not quantized in the file, -1: error */
static int load_lin(hid_t file, hid_t f16, const char *fname, const char *name, lin *l, char *err,
                    size_t errlen) {
    char qpath[128];
    snprintf(qpath, sizeof qpath, "qmodel/%s", name);
    if (H5Lexists(file, "qmodel", H5P_DEFAULT) <= 0 || H5Lexists(file, qpath, H5P_DEFAULT) <= 0)
        return 0;
    hid_t g = H5Gopen2(file, qpath, H5P_DEFAULT), a = -1, t = -1;
    char fmt_s[16] = "";
    long long shape[2] = {0, 0};
    quant_fmt f;
    quant_layout lay;
    void *buf = NULL;
    int rc = -1;
    if (g < 0 || H5Aexists(g, "format") <= 0 || (a = H5Aopen(g, "format", H5P_DEFAULT)) < 0 ||
        (t = H5Aget_type(a)) < 0 || H5Tget_class(t) != H5T_STRING || H5Tis_variable_str(t) ||
        H5Tget_size(t) >= sizeof fmt_s || H5Aread(a, t, fmt_s) < 0 ||
        quant_fmt_from_name(fmt_s, &f) != 0) {
        snprintf(err, errlen, "%s: /%s: missing or unknown format attribute", fname, qpath);
        goto done;
    }
    H5Aclose(a);
    a = -1;
    if (H5Aexists(g, "shape") <= 0 || (a = H5Aopen(g, "shape", H5P_DEFAULT)) < 0 ||
        H5Aread(a, H5T_NATIVE_LLONG, shape) < 0 || shape[0] != l->out || shape[1] != l->in) {
        snprintf(err, errlen, "%s: /%s: shape (%lld, %lld), the model expects (%d, %d)", fname,
                 qpath, shape[0], shape[1], l->out, l->in);
        goto done;
    }
    if (quant_layout_of(f, (size_t)l->out, (size_t)l->in, &lay) != 0 ||
        !(buf = malloc(lay.total))) {
        snprintf(err, errlen, "%s: cannot allocate /%s", fname, qpath);
        goto done;
    }
    uint8_t *b = buf;
    if (read_part(g, fname, qpath, "q", f == QUANT_Q8 ? H5T_NATIVE_INT8 : H5T_NATIVE_UINT8,
                  (hsize_t)l->out, (hsize_t)(lay.nblk * lay.code_bytes), b + lay.q_off, 1, err,
                  errlen) ||
        read_part(g, fname, qpath, "scale", f16, (hsize_t)l->out, (hsize_t)lay.nblk,
                  b + lay.scale_off, 2, err, errlen) ||
        (lay.min_bytes && read_part(g, fname, qpath, "min", f16, (hsize_t)l->out, (hsize_t)lay.nblk,
                                    b + lay.min_off, 2, err, errlen)))
        goto done;
    free(l->q);
    l->q = buf;
    buf = NULL;
    l->fmt = (int)f;
    rc = 1;
done:
    free(buf);
    if (t >= 0) H5Tclose(t);
    if (a >= 0) H5Aclose(a);
    if (g >= 0) H5Gclose(g);
    return rc;
}

int infer_load_quant(infer_engine *e, const char *file, int *nquant, char *err, size_t errlen) {
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    *nquant = 0;
    hid_t f = H5Fopen(file, H5F_ACC_RDONLY, H5P_DEFAULT), f16 = fp16_type();
    int rc = 0;
    if (f < 0 || f16 < 0) {
        snprintf(err, errlen, "%s: cannot open as HDF5", file);
        rc = -1;
    }
    for (int l = 0; rc >= 0 && l <= e->L; l++) {
        lin *ls[4] = {&e->head, NULL, NULL, NULL};
        const char *nm[4] = {"wte", NULL, NULL, NULL};
        char names[4][64];
        int k = 1;
        if (l < e->L) {
            static const char *sfx[4] = {"attn.qkv.weight", "attn.proj.weight", "mlp.fc.weight",
                                         "mlp.proj.weight"};
            lin *lw[4] = {&e->ly[l].qkv, &e->ly[l].proj, &e->ly[l].fc, &e->ly[l].fcp};
            for (k = 0; k < 4; k++) {
                snprintf(names[k], sizeof names[k], "h.%d.%s", l, sfx[k]);
                nm[k] = names[k];
                ls[k] = lw[k];
            }
        }
        for (int j = 0; rc >= 0 && j < k; j++) {
            int r = load_lin(f, f16, file, nm[j], ls[j], err, errlen);
            if (r < 0)
                rc = -1;
            else
                *nquant += r;
        }
    }
    if (f16 >= 0) H5Tclose(f16);
    if (f >= 0) H5Fclose(f);
    H5Eclear2(H5E_DEFAULT);
    return rc < 0 ? -1 : 0;
}

/* ---- forward pieces ---- */

/* Final LayerNorm and LM head of nrows rows of the residual stream. */
static void final_logits(infer_engine *e, const float *xrow, int nrows, float *logits, int decode) {
    kern_layernorm_fwd(e->ln, e->mean, e->rstd, xrow, e->lnfw, e->lnfb, (size_t)nrows, e->C);
    lin_fwd(&e->head, logits, e->ln, nrows, decode);
}

int infer_prefill(infer_engine *e, int slot, const int *prompt, int n) {
    if (slot < 0 || slot >= e->S || n < 1 || n > e->Tmax) return -1;
    for (int i = 0; i < n; i++)
        if (prompt[i] < 0 || prompt[i] >= e->V) return -1;
    int C = e->C;
    size_t N = (size_t)n;
    kern_encoder_fwd(e->x, prompt, e->wte, e->wpe, 1, n, C);
    for (int l = 0; l < e->L; l++) {
        layer *y = &e->ly[l];
        kern_layernorm_fwd(e->ln, e->mean, e->rstd, e->x, y->ln1w, y->ln1b, N, C);
        lin_fwd(&y->qkv, e->qkv, e->ln, n, 0);
        float *kc = e->kc + ((size_t)slot * e->L + l) * e->Tmax * C;
        float *vc = e->vc + ((size_t)slot * e->L + l) * e->Tmax * C;
        for (int t = 0; t < n; t++) {
            memcpy(kc + (size_t)t * C, e->qkv + (size_t)t * 3 * C + C, C * sizeof(float));
            memcpy(vc + (size_t)t * C, e->qkv + (size_t)t * 3 * C + 2 * C, C * sizeof(float));
        }
        kern_attention_fwd(e->atty, e->att, e->qkv, 1, n, C, e->NH);
        lin_fwd(&y->proj, e->tmp, e->atty, n, 0);
        kern_residual_fwd(e->x, e->x, e->tmp, N * C);
        kern_layernorm_fwd(e->ln, e->mean, e->rstd, e->x, y->ln2w, y->ln2b, N, C);
        lin_fwd(&y->fc, e->fc, e->ln, n, 0);
        kern_gelu_fwd(e->fc, e->fc, N * 4 * C);
        lin_fwd(&y->fcp, e->tmp, e->fc, n, 0);
        kern_residual_fwd(e->x, e->x, e->tmp, N * C);
    }
    final_logits(e, e->x + (N - 1) * C, 1, e->logits + (size_t)slot * e->V, 0);
    e->pos[slot] = n;
    return 0;
}

int infer_decode(infer_engine *e, int nb, const int *slots, const int *tok) {
    if (nb < 1 || nb > e->S) return -1;
    int C = e->C, NH = e->NH, hs = C / NH, Tm = e->Tmax;
    for (int b = 0; b < nb; b++) {
        int s = slots[b];
        if (s < 0 || s >= e->S || e->pos[s] < 1 || e->pos[s] >= Tm || tok[b] < 0 || tok[b] >= e->V)
            return -1;
        const float *wt = e->wte + (size_t)tok[b] * C, *wp = e->wpe + (size_t)e->pos[s] * C;
        for (int c = 0; c < C; c++)
            e->x[(size_t)b * C + c] = wt[c] + wp[c];
    }
    size_t N = (size_t)nb;
    float scale = 1.0f / sqrtf((float)hs);
    for (int l = 0; l < e->L; l++) {
        layer *y = &e->ly[l];
        kern_layernorm_fwd(e->ln, e->mean, e->rstd, e->x, y->ln1w, y->ln1b, N, C);
        lin_fwd(&y->qkv, e->qkv, e->ln, nb, 1);
        /* per (sequence, head): append k, v to the cache, attend over it */
#pragma omp parallel for schedule(static)
        for (int bh = 0; bh < nb * NH; bh++) {
            int b = bh / NH, h = bh % NH, s = slots[b], p = e->pos[s];
            const float *q = e->qkv + (size_t)b * 3 * C + h * hs;
            float *kc = e->kc + ((size_t)s * e->L + l) * Tm * C + h * hs;
            float *vc = e->vc + ((size_t)s * e->L + l) * Tm * C + h * hs;
            memcpy(kc + (size_t)p * C, q + C, hs * sizeof(float));
            memcpy(vc + (size_t)p * C, q + 2 * C, hs * sizeof(float));
            float *sc = e->att + (size_t)bh * Tm, mx = -INFINITY, sum = 0.f;
            for (int t = 0; t <= p; t++) {
                const float *k = kc + (size_t)t * C;
                float d = 0.f;
                for (int i = 0; i < hs; i++)
                    d += q[i] * k[i];
                sc[t] = d * scale;
                mx = sc[t] > mx ? sc[t] : mx;
            }
            for (int t = 0; t <= p; t++) {
                sc[t] = expf(sc[t] - mx);
                sum += sc[t];
            }
            float inv = 1.0f / sum, *o = e->atty + (size_t)b * C + h * hs;
            for (int i = 0; i < hs; i++)
                o[i] = 0.f;
            for (int t = 0; t <= p; t++) {
                const float *v = vc + (size_t)t * C, w = sc[t] * inv;
                for (int i = 0; i < hs; i++)
                    o[i] += w * v[i];
            }
        }
        lin_fwd(&y->proj, e->tmp, e->atty, nb, 1);
        kern_residual_fwd(e->x, e->x, e->tmp, N * C);
        kern_layernorm_fwd(e->ln, e->mean, e->rstd, e->x, y->ln2w, y->ln2b, N, C);
        lin_fwd(&y->fc, e->fc, e->ln, nb, 1);
        kern_gelu_fwd(e->fc, e->fc, N * 4 * C);
        lin_fwd(&y->fcp, e->tmp, e->fc, nb, 1);
        kern_residual_fwd(e->x, e->x, e->tmp, N * C);
    }
    /* logits of all rows at once, then scattered to the slots */
    float *lg = e->fc; /* (nb, V) fits: V <= 4C is not guaranteed, so check */
    int tmp_lg = (size_t)e->V > 4 * (size_t)C;
    if (tmp_lg) lg = malloc(N * e->V * sizeof(float));
    if (!lg) return -1;
    final_logits(e, e->x, nb, lg, 1);
    for (int b = 0; b < nb; b++) {
        memcpy(e->logits + (size_t)slots[b] * e->V, lg + (size_t)b * e->V, e->V * sizeof(float));
        e->pos[slots[b]]++;
    }
    if (tmp_lg) free(lg);
    e->steps++;
    e->rows += nb;
    return 0;
}

/* ---- sampling ---- */

static uint64_t mix64(uint64_t z) {
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

double infer_uniform(uint64_t seed, int pos) {
    uint64_t z = mix64(mix64(seed) ^ mix64(0x5bd1e995ULL + (uint64_t)(uint32_t)pos));
    return (double)(z >> 11) * (1.0 / 9007199254740992.0);
}

typedef struct {
    double p;
    int i;
} cand;

static int cand_cmp(const void *a, const void *b) {
    const cand *x = a, *y = b;
    if (x->p != y->p) return x->p > y->p ? -1 : 1;
    return x->i - y->i;
}

int infer_sample(const float *logits, int V, const infer_sampling *s, int pos) {
    int best = 0;
    for (int i = 1; i < V; i++)
        if (logits[i] > logits[best]) best = i;
    if (!(s->temperature > 0.f)) return best;
    cand *c = malloc((size_t)V * sizeof *c);
    if (!c) return best;
    double mx = logits[best], sum = 0;
    for (int i = 0; i < V; i++) {
        c[i].p = exp(((double)logits[i] - mx) / s->temperature);
        c[i].i = i;
        sum += c[i].p;
    }
    qsort(c, (size_t)V, sizeof *c, cand_cmp);
    int k = s->top_k > 0 && s->top_k < V ? s->top_k : V;
    if (s->top_p > 0.f && s->top_p < 1.f) {
        double cum = 0;
        for (int i = 0; i < k; i++) {
            cum += c[i].p / sum;
            if (cum >= s->top_p) {
                k = i + 1;
                break;
            }
        }
    }
    double tot = 0;
    for (int i = 0; i < k; i++)
        tot += c[i].p;
    double u = infer_uniform(s->seed, pos) * tot, acc = 0;
    int tokv = c[k - 1].i;
    for (int i = 0; i < k; i++) {
        acc += c[i].p;
        if (u < acc) {
            tokv = c[i].i;
            break;
        }
    }
    free(c);
    return tokv;
}

/* ---- continuous batching ---- */

typedef struct {
    int req; /* -1: free */
    int last;
    double t_first;
} slot_state;

void infer_result_free(infer_result *r) {
    if (!r) return;
    free(r->tokens);
    r->tokens = NULL;
}

/* Appends token t to request r's result; returns 1 when it is finished. */
static int push_token(infer_engine *e, const infer_request *q, infer_result *r, int t) {
    r->tokens[r->n_tokens++] = t;
    r->generated++;
    if (q->stop && q->stop[0]) {
        int ls = (int)strlen(q->stop);
        if (r->n_tokens >= ls) {
            int m = 1;
            for (int i = 0; i < ls && m; i++)
                m = r->tokens[r->n_tokens - ls + i] == (unsigned char)q->stop[i];
            if (m) {
                r->n_tokens -= ls;
                r->finish = INFER_STOP;
                return 1;
            }
        }
    }
    if (r->generated >= q->max_new_tokens) {
        r->finish = INFER_LENGTH;
        return 1;
    }
    /* the next token would be fed at position n_prompt + generated - 1 */
    if (q->n_prompt + r->generated > e->Tmax) {
        r->finish = INFER_CONTEXT;
        return 1;
    }
    return 0;
}

int infer_run(infer_engine *e, const infer_request *req, int n, infer_result *res, int max_batch,
              double t0) {
    if (max_batch > e->S) max_batch = e->S;
    if (max_batch < 1) max_batch = 1;
    slot_state *sl = calloc((size_t)max_batch, sizeof *sl);
    int *bs = malloc((size_t)max_batch * sizeof(int)),
        *bt = malloc((size_t)max_batch * sizeof(int));
    int rc = -1, next = 0, active = 0;
    e->steps = e->rows = 0;
    memset(res, 0, (size_t)n * sizeof *res);
    if (!sl || !bs || !bt) goto done;
    for (int i = 0; i < max_batch; i++)
        sl[i].req = -1;
    for (int i = 0; i < n; i++) {
        int cap = req[i].max_new_tokens > 0 ? req[i].max_new_tokens : 1;
        if (!(res[i].tokens = malloc((size_t)cap * sizeof(int)))) goto done;
    }
    while (next < n || active > 0) {
        /* join: waiting requests take the free slots (prefill + first token) */
        for (int s = 0; s < max_batch && next < n; s++) {
            if (sl[s].req >= 0) continue;
            int i = next++;
            const infer_request *q = &req[i];
            infer_result *r = &res[i];
            double ta = spmd_now();
            if (q->max_new_tokens < 1) { /* nothing to generate */
                r->finish = INFER_LENGTH;
                r->ttft_ms = r->latency_ms = (ta - t0) * 1e3;
                s--;
                continue;
            }
            if (infer_prefill(e, s, q->prompt, q->n_prompt)) goto done;
            int t = infer_sample(infer_logits(e, s), e->V, &q->sampling, q->n_prompt);
            double tb = spmd_now();
            r->prompt_ms = (tb - ta) * 1e3;
            r->ttft_ms = (tb - t0) * 1e3;
            sl[s].t_first = tb;
            if (push_token(e, q, r, t)) {
                r->latency_ms = r->ttft_ms;
                s--; /* the slot stays free for the next request */
                continue;
            }
            sl[s].req = i;
            sl[s].last = t;
            active++;
        }
        if (active == 0) continue;
        /* one decode step over the active slots, in slot order */
        int nb = 0;
        for (int s = 0; s < max_batch; s++)
            if (sl[s].req >= 0) {
                bs[nb] = s;
                bt[nb++] = sl[s].last;
            }
        if (infer_decode(e, nb, bs, bt)) goto done;
        double now = spmd_now();
        for (int j = 0; j < nb; j++) {
            int s = bs[j], i = sl[s].req;
            const infer_request *q = &req[i];
            infer_result *r = &res[i];
            int t =
                infer_sample(infer_logits(e, s), e->V, &q->sampling, q->n_prompt + r->generated);
            sl[s].last = t;
            if (push_token(e, q, r, t)) {
                r->decode_ms = (now - sl[s].t_first) * 1e3;
                r->latency_ms = (now - t0) * 1e3;
                sl[s].req = -1;
                active--;
            }
        }
    }
    rc = 0;
done:
    if (rc)
        for (int i = 0; i < n; i++)
            infer_result_free(&res[i]);
    free(sl), free(bs), free(bt);
    return rc;
}
