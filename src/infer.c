/* infer: KV-cache inference engine on one rank (see infer.h). */
#include "src/infer.h"

#include "io/qckpt.h"
#include "kernels/kern.h"
#include "kernels/quant.h"
#include "src/spmd.h"

#include <errno.h>
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
    /* paged KV cache: NPG pages of INFER_KV_PAGE positions, (L, NPG, PAGE, C)
     * each for K and V; slot s holds pages ptab[s*MP .. s*MP + npg[s]) */
    float *kc, *vc;
    int MP, NPG, nfree;
    unsigned char *used; /* (NPG) */
    size_t blk;          /* floats per (layer, page): PAGE * C */
    int *ptab, *npg;
    int *pos; /* (S) */
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
    /* dynamic chunks as quant_matmul (a thread that loses its core on a
     * shared node holds back 16 rows, not half); results do not change */
#pragma omp parallel for schedule(dynamic, 16)
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
    return infer_create_kv(g, max_batch, 0, out, err, errlen);
}

int infer_create_kv(gpt *g, int max_batch, size_t kv_bytes, infer_engine **out, char *err,
                    size_t errlen) {
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
    e->MP = (e->Tmax + INFER_KV_PAGE - 1) / INFER_KV_PAGE;
    size_t page = 2 * (size_t)e->L * INFER_KV_PAGE * C * sizeof(float), full = (size_t)e->S * e->MP;
    size_t npg = kv_bytes ? kv_bytes / page : full;
    if (npg < 1) {
        snprintf(err, errlen, "KV-cache budget of %zu bytes is less than one page (%zu bytes)",
                 kv_bytes, page);
        infer_destroy(e);
        return -1;
    }
    e->NPG = (int)(npg < full ? npg : full);
    e->blk = (size_t)INFER_KV_PAGE * C;
    size_t kv = (size_t)e->NPG * e->L * e->blk, R = (size_t)e->R;
    e->kc = malloc(kv * sizeof(float));
    e->vc = malloc(kv * sizeof(float));
    e->ptab = malloc((size_t)e->S * e->MP * sizeof(int));
    e->npg = calloc((size_t)e->S, sizeof(int));
    e->used = calloc((size_t)e->NPG, 1);
    e->nfree = e->NPG;
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
    if (!e->kc || !e->vc || !e->ptab || !e->npg || !e->used || !e->pos || !e->x || !e->ln ||
        !e->qkv || !e->atty || !e->fc || !e->tmp || !e->mean || !e->rstd || !e->att || !e->logits)
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
    free(e->kc), free(e->vc), free(e->ptab), free(e->npg), free(e->used), free(e->pos);
    free(e->x), free(e->ln), free(e->qkv), free(e->atty), free(e->fc), free(e->tmp);
    free(e->mean), free(e->rstd), free(e->att), free(e->logits);
    free(e);
}

size_t infer_kv_bytes(const infer_engine *e) {
    return 2 * (size_t)e->NPG * e->L * INFER_KV_PAGE * e->C * sizeof(float);
}

/* Positions t0 .. t0 + return - 1 (at most p) of a sequence with page table
 * pt lie in adjacent pages, i.e. are consecutive rows of the pool. Decode
 * attention walks such runs: going page by page (16 rows at a time) was
 * measured ~25% slower at a context of 1024, where contiguous runs match a
 * contiguous per-slot cache. */
static inline int run_len(const int *pt, int t0, int p) {
    int k = t0 / INFER_KV_PAGE, n = INFER_KV_PAGE - t0 % INFER_KV_PAGE;
    while (t0 + n <= p && pt[k + 1] == pt[k] + 1)
        n += INFER_KV_PAGE, k++;
    return n < p + 1 - t0 ? n : p + 1 - t0;
}

/* K (base kc) or V (base vc) row of position t of slot s in layer l */
static inline float *kv_row(const infer_engine *e, float *base, int s, int l, int t) {
    int pg = e->ptab[(size_t)s * e->MP + t / INFER_KV_PAGE];
    return base + ((size_t)l * e->NPG + pg) * e->blk + (size_t)(t % INFER_KV_PAGE) * e->C;
}

static void take_page(infer_engine *e, int s, int pg) {
    e->used[pg] = 1;
    e->nfree--;
    e->ptab[(size_t)s * e->MP + e->npg[s]++] = pg;
}

/* Gives slot s pages for positions [0, n): 0, or -1 when the pool is empty
 * (a scheduler that reserves infer_kv_need per sequence never sees that).
 * A sequence's pages are kept adjacent where the pool allows (a free run
 * for a new sequence, else the page after its last one), so that attention
 * streams through them as one block (see run_len). */
static int kv_grow(infer_engine *e, int s, int n) {
    int need = (n + INFER_KV_PAGE - 1) / INFER_KV_PAGE;
    if (need - e->npg[s] > e->nfree) return -1;
    if (e->npg[s] == 0 && need > 1) { /* first fit of a run of `need` pages */
        for (int i = 0, run = 0; i < e->NPG; i++) {
            run = e->used[i] ? 0 : run + 1;
            if (run == need) {
                for (int pg = i - need + 1; pg <= i; pg++)
                    take_page(e, s, pg);
                return 0;
            }
        }
    }
    while (e->npg[s] < need) {
        int last = e->npg[s] ? e->ptab[(size_t)s * e->MP + e->npg[s] - 1] : -1;
        int pg = last + 1 < e->NPG && !e->used[last + 1] ? last + 1 : -1;
        if (pg < 0) { /* start anew in the middle of the largest free gap, so
                       * that sequences growing side by side each get room */
            int best = 0, at = 0;
            for (int i = 0, run = 0; i < e->NPG; i++) {
                run = e->used[i] ? 0 : run + 1;
                if (run > best) best = run, at = i - run + 1;
            }
            pg = at + best / 2;
        }
        take_page(e, s, pg);
    }
    return 0;
}

void infer_release(infer_engine *e, int slot) {
    if (slot < 0 || slot >= e->S) return;
    while (e->npg[slot] > 0) {
        e->used[e->ptab[(size_t)slot * e->MP + --e->npg[slot]]] = 0;
        e->nfree++;
    }
    e->pos[slot] = 0;
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

/* ---- quantized weights made in memory ---- */

/* The linear layers in a fixed order: each layer's four, then the head. */
static int lin_count(const infer_engine *e) {
    return 4 * e->L + 1;
}
static lin *lin_at(infer_engine *e, int i) {
    if (i == 4 * e->L) return &e->head;
    layer *y = &e->ly[i / 4];
    lin *ls[4] = {&y->qkv, &y->proj, &y->fc, &y->fcp};
    return ls[i % 4];
}

int infer_quantize(infer_engine *e, int fmt, char *err, size_t errlen) {
    if (fmt >= QUANT_NFMT) {
        snprintf(err, errlen, "infer_quantize: unknown format %d", fmt);
        return -1;
    }
    for (int i = 0; i < lin_count(e); i++) {
        lin *l = lin_at(e, i);
        void *buf = NULL;
        if (fmt >= 0) {
            size_t n = quant_tensor_bytes((quant_fmt)fmt, (size_t)l->out, (size_t)l->in);
            int rc = (buf = malloc(n ? n : 1)) ? quant_tensor((quant_fmt)fmt, l->w, (size_t)l->out,
                                                             (size_t)l->in, buf)
                                                : -ENOMEM;
            if (rc) {
                snprintf(err, errlen, "quantizing a [%d, %d] weight to %s: %s", l->out, l->in,
                         quant_fmt_name((quant_fmt)fmt), strerror(-rc));
                free(buf);
                return -1;
            }
        }
        free(l->q);
        l->q = buf;
        l->fmt = buf ? fmt : -1;
    }
    return 0;
}

size_t infer_weight_bytes(const infer_engine *e) {
    size_t n = 0;
    for (int i = 0; i < lin_count(e); i++) {
        const lin *l = lin_at((infer_engine *)e, i);
        n += l->fmt >= 0 ? quant_tensor_bytes((quant_fmt)l->fmt, (size_t)l->out, (size_t)l->in)
                         : (size_t)l->out * (size_t)l->in * sizeof(float);
    }
    return n;
}

/* ---- forward pieces ---- */

/* Final LayerNorm and LM head of nrows rows of the residual stream. */
static void final_logits(infer_engine *e, const float *xrow, int nrows, float *logits, int decode) {
    kern_layernorm_fwd(e->ln, e->mean, e->rstd, xrow, e->lnfw, e->lnfb, (size_t)nrows, e->C);
    lin_fwd(&e->head, logits, e->ln, nrows, decode);
}

static int prefill_reserve(infer_engine *e, int slot, const int *prompt, int n, int reserve);

/* The rest of a block after attention, for `rows` rows of e->x (attention
 * output in e->atty): projection + residual, then the MLP + residual.
 * decode: the rows are single tokens of different sequences. */
static void block_tail(infer_engine *e, const layer *y, int rows, int decode) {
    size_t N = (size_t)rows;
    int C = e->C;
    lin_fwd(&y->proj, e->tmp, e->atty, rows, decode);
    kern_residual_fwd(e->x, e->x, e->tmp, N * C);
    kern_layernorm_fwd(e->ln, e->mean, e->rstd, e->x, y->ln2w, y->ln2b, N, C);
    lin_fwd(&y->fc, e->fc, e->ln, rows, decode);
    kern_gelu_fwd(e->fc, e->fc, N * 4 * C);
    lin_fwd(&y->fcp, e->tmp, e->fc, rows, decode);
    kern_residual_fwd(e->x, e->x, e->tmp, N * C);
}

int infer_prefill(infer_engine *e, int slot, const int *prompt, int n) {
    return prefill_reserve(e, slot, prompt, n, n);
}

/* infer_prefill with pages for `reserve` (>= n) positions taken at once */
static int prefill_reserve(infer_engine *e, int slot, const int *prompt, int n, int reserve) {
    if (slot < 0 || slot >= e->S || n < 1 || n > e->Tmax) return -1;
    for (int i = 0; i < n; i++)
        if (prompt[i] < 0 || prompt[i] >= e->V) return -1;
    infer_release(e, slot);
    if (kv_grow(e, slot, reserve > e->Tmax ? e->Tmax : reserve < n ? n : reserve)) return -1;
    int C = e->C;
    size_t N = (size_t)n;
    kern_encoder_fwd(e->x, prompt, e->wte, e->wpe, 1, n, C);
    for (int l = 0; l < e->L; l++) {
        layer *y = &e->ly[l];
        kern_layernorm_fwd(e->ln, e->mean, e->rstd, e->x, y->ln1w, y->ln1b, N, C);
        lin_fwd(&y->qkv, e->qkv, e->ln, n, 0);
        for (int t = 0; t < n; t++) {
            memcpy(kv_row(e, e->kc, slot, l, t), e->qkv + (size_t)t * 3 * C + C, C * sizeof(float));
            memcpy(kv_row(e, e->vc, slot, l, t), e->qkv + (size_t)t * 3 * C + 2 * C,
                   C * sizeof(float));
        }
        kern_attention_fwd(e->atty, e->att, e->qkv, 1, n, C, e->NH);
        block_tail(e, y, n, 0);
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
        if (s < 0 || s >= e->S || e->pos[s] < 1 || e->pos[s] >= Tm || tok[b] < 0 ||
            tok[b] >= e->V || kv_grow(e, s, e->pos[s] + 1))
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
            memcpy(kv_row(e, e->kc, s, l, p) + h * hs, q + C, hs * sizeof(float));
            memcpy(kv_row(e, e->vc, s, l, p) + h * hs, q + 2 * C, hs * sizeof(float));
            float *sc = e->att + (size_t)bh * Tm, mx = -INFINITY, sum = 0.f;
            /* run by run: positions t0 .. t0 + tn - 1 are consecutive rows */
            const int *pt = e->ptab + (size_t)s * e->MP;
            for (int t0 = 0, tn; t0 <= p; t0 += tn) {
                tn = run_len(pt, t0, p);
                const float *kp = kv_row(e, e->kc, s, l, t0) + h * hs;
                for (int tt = 0; tt < tn; tt++) {
                    const float *k = kp + (size_t)tt * C;
                    float d = 0.f;
                    for (int i = 0; i < hs; i++)
                        d += q[i] * k[i];
                    sc[t0 + tt] = d * scale;
                    mx = sc[t0 + tt] > mx ? sc[t0 + tt] : mx;
                }
            }
            for (int t = 0; t <= p; t++) {
                sc[t] = expf(sc[t] - mx);
                sum += sc[t];
            }
            float inv = 1.0f / sum, *o = e->atty + (size_t)b * C + h * hs;
            for (int i = 0; i < hs; i++)
                o[i] = 0.f;
            for (int t0 = 0, tn; t0 <= p; t0 += tn) {
                tn = run_len(pt, t0, p);
                const float *vp = kv_row(e, e->vc, s, l, t0) + h * hs;
                for (int tt = 0; tt < tn; tt++) {
                    const float *v = vp + (size_t)tt * C, w = sc[t0 + tt] * inv;
                    for (int i = 0; i < hs; i++)
                        o[i] += w * v[i];
                }
            }
        }
        block_tail(e, y, nb, 1);
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
    const infer_request *q; /* NULL: free */
    infer_result *r;
    void *tag;
    int last;
    double t_first;
} slot_state;

struct infer_batcher {
    infer_engine *e;
    int nslots, running;
    slot_state *sl;
    int *bs, *bt; /* decode batch: slots, tokens */
    void **done;  /* finished tags, FIFO [head, n) */
    int done_head, done_n, done_cap;
};

size_t infer_kv_need(const gpt_config *c, int n_prompt, int max_new_tokens) {
    /* the last generated token is never fed back, so it takes no position */
    long long pos = (long long)n_prompt + (max_new_tokens > 1 ? max_new_tokens - 1 : 0);
    if (pos > c->block_size) pos = c->block_size;
    size_t pages = (size_t)(pos + INFER_KV_PAGE - 1) / INFER_KV_PAGE;
    return 2 * pages * INFER_KV_PAGE * (size_t)c->n_layer * (size_t)c->n_embd * sizeof(float);
}

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

static int push_done(infer_batcher *b, void *tag) {
    if (b->done_head == b->done_n) b->done_head = b->done_n = 0;
    if (b->done_n == b->done_cap) {
        int cap = b->done_cap ? 2 * b->done_cap : 16;
        void **d = realloc(b->done, (size_t)cap * sizeof *d);
        if (!d) return -1;
        b->done = d, b->done_cap = cap;
    }
    b->done[b->done_n++] = tag;
    return 0;
}

int infer_batcher_create(infer_engine *e, int max_batch, infer_batcher **out) {
    *out = NULL;
    if (max_batch > e->S) max_batch = e->S;
    if (max_batch < 1) max_batch = 1;
    infer_batcher *b = calloc(1, sizeof *b);
    if (!b) return -1;
    b->e = e;
    b->nslots = max_batch;
    b->sl = calloc((size_t)max_batch, sizeof *b->sl);
    b->bs = malloc((size_t)max_batch * sizeof(int));
    b->bt = malloc((size_t)max_batch * sizeof(int));
    if (!b->sl || !b->bs || !b->bt) {
        infer_batcher_destroy(b);
        return -1;
    }
    *out = b;
    return 0;
}

void infer_batcher_destroy(infer_batcher *b) {
    if (!b) return;
    free(b->sl), free(b->bs), free(b->bt), free(b->done);
    free(b);
}

int infer_batcher_free_slots(const infer_batcher *b) {
    return b->nslots - b->running;
}
int infer_batcher_running(const infer_batcher *b) {
    return b->running;
}

int infer_batcher_add(infer_batcher *b, const infer_request *q, infer_result *r, double t0,
                      void *tag) {
    infer_engine *e = b->e;
    memset(r, 0, sizeof *r);
    int s = 0;
    while (s < b->nslots && b->sl[s].q)
        s++;
    int cap = q->max_new_tokens > 0 ? q->max_new_tokens : 1;
    if (s == b->nslots || !(r->tokens = malloc((size_t)cap * sizeof(int)))) return -1;
    double ta = spmd_now();
    if (q->max_new_tokens < 1) { /* nothing to generate */
        r->finish = INFER_LENGTH;
        r->ttft_ms = r->latency_ms = (ta - t0) * 1e3;
        return push_done(b, tag) ? -1 : 1;
    }
    /* all the pages the sequence can use, at once: adjacent in memory */
    if (prefill_reserve(e, s, q->prompt, q->n_prompt, q->n_prompt + q->max_new_tokens - 1)) {
        infer_result_free(r);
        return -1;
    }
    int t = infer_sample(infer_logits(e, s), e->V, &q->sampling, q->n_prompt);
    double tb = spmd_now();
    r->prompt_ms = (tb - ta) * 1e3;
    r->ttft_ms = (tb - t0) * 1e3;
    if (push_token(e, q, r, t)) {
        r->latency_ms = r->ttft_ms;
        infer_release(e, s);
        return push_done(b, tag) ? -1 : 1; /* the slot stays free */
    }
    b->sl[s] = (slot_state){q, r, tag, t, tb};
    b->running++;
    return 0;
}

int infer_batcher_step(infer_batcher *b) {
    infer_engine *e = b->e;
    if (b->running == 0) return 0;
    /* one decode step over the running slots, in slot order */
    int nb = 0;
    for (int s = 0; s < b->nslots; s++)
        if (b->sl[s].q) {
            b->bs[nb] = s;
            b->bt[nb++] = b->sl[s].last;
        }
    if (infer_decode(e, nb, b->bs, b->bt)) return -1;
    double now = spmd_now();
    for (int j = 0; j < nb; j++) {
        slot_state *z = &b->sl[b->bs[j]];
        const infer_request *q = z->q;
        infer_result *r = z->r;
        int t =
            infer_sample(infer_logits(e, b->bs[j]), e->V, &q->sampling, q->n_prompt + r->generated);
        z->last = t;
        if (push_token(e, q, r, t)) {
            r->decode_ms = (now - z->t_first) * 1e3;
            /* latency from t0: the prefill stored ttft = t_first - t0 */
            r->latency_ms = r->ttft_ms + (now - z->t_first) * 1e3;
            if (push_done(b, z->tag)) return -1;
            infer_release(e, b->bs[j]);
            z->q = NULL;
            b->running--;
        }
    }
    return 0;
}

int infer_batcher_pop(infer_batcher *b, void **tag) {
    if (b->done_head == b->done_n) return 0;
    *tag = b->done[b->done_head++];
    return 1;
}

int infer_run(infer_engine *e, const infer_request *req, int n, infer_result *res, int max_batch,
              double t0) {
    infer_batcher *b = NULL;
    int rc = -1, next = 0;
    void *tag;
    e->steps = e->rows = 0;
    memset(res, 0, (size_t)n * sizeof *res);
    if (infer_batcher_create(e, max_batch, &b)) goto done;
    while (next < n || b->running > 0) {
        /* join: waiting requests take the free slots (prefill + first token) */
        while (next < n && b->running < b->nslots) {
            if (infer_batcher_add(b, &req[next], &res[next], t0, NULL) < 0) goto done;
            next++;
        }
        if (infer_batcher_step(b)) goto done;
        while (infer_batcher_pop(b, &tag))
            ;
    }
    rc = 0;
done:
    if (rc)
        for (int i = 0; i < n; i++)
            infer_result_free(&res[i]);
    infer_batcher_destroy(b);
    return rc;
}
