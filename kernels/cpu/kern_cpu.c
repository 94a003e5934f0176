/* CPU backend of kernels/kern.h: CBLAS for matrix products, fused OpenMP
 * loops for everything else. Reductions over rows use per-thread partials
 * summed in thread order, so results are bit-identical run after run for a
 * given thread count. Not here: the model's data flow (src/gpt.c).
 */
#include "kernels/kern.h"

#include <cblas.h>
#include <math.h>
#include <stdint.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

char *openblas_get_corename(void);
void openblas_set_num_threads(int num_threads);

#define GELU_K 0.7978845608028654f /* sqrt(2/pi) */

/* exp(x) for float, within ~2 ulp, written so the compiler vectorizes it
 * (libm's tanhf/expf calls do not, and took a third of a training step):
 * x = n*ln2 + r, exp(r) by a degree-6 polynomial, 2^n built in the exponent. */
static inline float fast_expf(float x) {
    x = x < -87.3f ? -87.3f : x > 88.3f ? 88.3f : x;
    /* round to nearest by adding and removing 1.5 * 2^23 (no libm call) */
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = fmaf(n, -0.693145751953125f, x);
    r = fmaf(n, -1.428606765330187e-06f, r);
    float p = 1.3888889e-3f;
    p = fmaf(p, r, 8.3333333e-3f);
    p = fmaf(p, r, 4.1666667e-2f);
    p = fmaf(p, r, 1.6666667e-1f);
    p = fmaf(p, r, 0.5f);
    p = fmaf(p, r, 1.0f);
    p = fmaf(p, r, 1.0f);
    union {
        int32_t i;
        float f;
    } s = {.i = ((int32_t)n + 127) << 23};
    return p * s.f;
}

/* tanh(u) = 1 - 2 / (exp(2u) + 1): exact limits +-1, vectorizable */
static inline float fast_tanhf(float u) { return 1.0f - 2.0f / (fast_expf(2.0f * u) + 1.0f); }

/* Static split of [0,n) into nt ranges; range of thread id. */
static void split_range(size_t n, int id, int nt, size_t *lo, size_t *hi) {
    size_t q = n / (size_t)nt, r = n % (size_t)nt;
    *lo = (size_t)id * q + ((size_t)id < r ? (size_t)id : r);
    *hi = *lo + q + ((size_t)id < r ? 1 : 0);
}

void kern_encoder_fwd(float *out, const int *tok, const float *wte, const float *wpe, int B, int T,
                      int C) {
#pragma omp parallel for schedule(static)
    for (int bt = 0; bt < B * T; bt++) {
        const float *e = wte + (size_t)tok[bt] * C, *p = wpe + (size_t)(bt % T) * C;
        float *o = out + (size_t)bt * C;
        for (int i = 0; i < C; i++) o[i] = e[i] + p[i];
    }
}

void kern_encoder_bwd(float *dwte, float *dwpe, const float *dout, const int *tok, int B, int T,
                      int C) {
    /* Threads own channel ranges so that rows with the same token never race. */
#pragma omp parallel
    {
        size_t lo, hi;
        split_range((size_t)C, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
        for (int bt = 0; bt < B * T; bt++) {
            const float *d = dout + (size_t)bt * C;
            float *e = dwte + (size_t)tok[bt] * C, *p = dwpe + (size_t)(bt % T) * C;
            for (size_t i = lo; i < hi; i++) {
                e[i] += d[i];
                p[i] += d[i];
            }
        }
    }
}

void kern_layernorm_fwd(float *out, float *mean, float *rstd, const float *inp, const float *w,
                        const float *b, size_t N, int C) {
#pragma omp parallel for schedule(static)
    for (size_t n = 0; n < N; n++) {
        const float *x = inp + n * C;
        float m = 0.f, v = 0.f;
        for (int i = 0; i < C; i++) m += x[i];
        m /= C;
        for (int i = 0; i < C; i++) v += (x[i] - m) * (x[i] - m);
        float s = 1.0f / sqrtf(v / C + 1e-5f);
        float *o = out + n * C;
        for (int i = 0; i < C; i++) o[i] = (x[i] - m) * s * w[i] + b[i];
        mean[n] = m;
        rstd[n] = s;
    }
}

void kern_layernorm_bwd(float *dinp, float *dw, float *db, const float *dout, const float *inp,
                        const float *w, const float *mean, const float *rstd, size_t N, int C) {
    int nt = omp_get_max_threads();
    float *part = calloc((size_t)nt * 2 * C, sizeof(float)); /* per-thread dw|db */
#pragma omp parallel num_threads(nt)
    {
        int id = omp_get_thread_num();
        size_t lo, hi;
        split_range(N, id, omp_get_num_threads(), &lo, &hi);
        float *pw = part + (size_t)id * 2 * C, *pb = pw + C;
        for (size_t n = lo; n < hi; n++) {
            const float *x = inp + n * C, *d = dout + n * C;
            float m = mean[n], s = rstd[n], dm = 0.f, dnm = 0.f;
            for (int i = 0; i < C; i++) {
                float nrm = (x[i] - m) * s, dn = w[i] * d[i];
                dm += dn;
                dnm += dn * nrm;
            }
            dm /= C;
            dnm /= C;
            float *di = dinp + n * C;
            for (int i = 0; i < C; i++) {
                float nrm = (x[i] - m) * s;
                pb[i] += d[i];
                pw[i] += nrm * d[i];
                di[i] += (w[i] * d[i] - dm - nrm * dnm) * s;
            }
        }
    }
    for (int t = 0; t < nt; t++)
        for (int i = 0; i < C; i++) {
            dw[i] += part[(size_t)t * 2 * C + i];
            db[i] += part[(size_t)t * 2 * C + C + i];
        }
    free(part);
}

void kern_matmul_fwd(float *out, const float *inp, const float *w, const float *bias, size_t N,
                     int C, int OC) {
    float beta = 0.f;
    if (bias) {
#pragma omp parallel for schedule(static)
        for (size_t n = 0; n < N; n++) memcpy(out + n * OC, bias, (size_t)OC * sizeof(float));
        beta = 1.f;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)N, OC, C, 1.f, inp, C, w, C, beta,
                out, OC);
}

void kern_matmul_bwd(float *dinp, float *dw, float *dbias, const float *dout, const float *inp,
                     const float *w, size_t N, int C, int OC) {
    if (dinp)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)N, C, OC, 1.f, dout, OC, w, C,
                    0.f, dinp, C);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, OC, C, (int)N, 1.f, dout, OC, inp, C, 1.f,
                dw, C);
    if (dbias) {
        /* Threads own column ranges: deterministic, no partials needed. */
#pragma omp parallel
        {
            size_t lo, hi;
            split_range((size_t)OC, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
            for (size_t n = 0; n < N; n++) {
                const float *d = dout + n * OC;
                for (size_t o = lo; o < hi; o++) dbias[o] += d[o];
            }
        }
    }
}

void kern_attention_fwd(float *out, float *att, const float *qkv, int B, int T, int C, int NH) {
    int hs = C / NH, C3 = 3 * C;
    float scale = 1.0f / sqrtf((float)hs);
    /* One (batch, head) per iteration; BLAS runs single-threaded inside. */
#pragma omp parallel for schedule(static)
    for (int bh = 0; bh < B * NH; bh++) {
        int b = bh / NH, h = bh % NH;
        const float *q = qkv + (size_t)b * T * C3 + h * hs, *k = q + C, *v = q + 2 * C;
        float *p = att + (size_t)bh * T * T;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, hs, scale, q, C3, k, C3, 0.f, p,
                    T);
        for (int t = 0; t < T; t++) {
            float *row = p + (size_t)t * T, mx = row[0], sum = 0.f;
            for (int j = 1; j <= t; j++) mx = row[j] > mx ? row[j] : mx;
            for (int j = 0; j <= t; j++) row[j] = fast_expf(row[j] - mx);
            for (int j = 0; j <= t; j++) sum += row[j];
            float inv = 1.0f / sum;
            for (int j = 0; j <= t; j++) row[j] *= inv;
            for (int j = t + 1; j < T; j++) row[j] = 0.f;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, hs, T, 1.f, p, T, v, C3, 0.f,
                    out + (size_t)b * T * C + h * hs, C);
    }
}

void kern_attention_bwd(float *dqkv, float *scratch, const float *dout, const float *qkv,
                        const float *att, int B, int T, int C, int NH) {
    int hs = C / NH, C3 = 3 * C;
    float scale = 1.0f / sqrtf((float)hs);
#pragma omp parallel for schedule(static)
    for (int bh = 0; bh < B * NH; bh++) {
        int b = bh / NH, h = bh % NH;
        size_t qo = (size_t)b * T * C3 + h * hs;
        const float *q = qkv + qo, *k = q + C, *v = q + 2 * C;
        const float *p = att + (size_t)bh * T * T, *dy = dout + (size_t)b * T * C + h * hs;
        float *dp = scratch + (size_t)bh * T * T, *dq = dqkv + qo, *dk = dq + C, *dv = dq + 2 * C;
        /* dP = dY V^T, then dS = P * (dP - rowsum(P * dP)) */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, hs, 1.f, dy, C, v, C3, 0.f, dp,
                    T);
        for (int t = 0; t < T; t++) {
            const float *pr = p + (size_t)t * T;
            float *dr = dp + (size_t)t * T, dot = 0.f;
            for (int j = 0; j <= t; j++) dot += pr[j] * dr[j];
            for (int j = 0; j <= t; j++) dr[j] = pr[j] * (dr[j] - dot);
            for (int j = t + 1; j < T; j++) dr[j] = 0.f;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, hs, T, scale, dp, T, k, C3, 0.f,
                    dq, C3);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, hs, T, scale, dp, T, q, C3, 0.f, dk,
                    C3);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, hs, T, 1.f, p, T, dy, C, 0.f, dv,
                    C3);
    }
}

void kern_gelu_fwd(float *out, const float *inp, size_t n) {
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < n; i++) {
        float x = inp[i];
        out[i] = 0.5f * x * (1.0f + fast_tanhf(GELU_K * (x + 0.044715f * x * x * x)));
    }
}

void kern_gelu_bwd(float *dinp, const float *inp, const float *dout, size_t n) {
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < n; i++) {
        float x = inp[i], u = GELU_K * (x + 0.044715f * x * x * x);
        float th = fast_tanhf(u), sech2 = 1.0f - th * th;
        float g = 0.5f * (1.0f + th) + 0.5f * x * sech2 * GELU_K * (1.0f + 3.0f * 0.044715f * x * x);
        dinp[i] = g * dout[i];
    }
}

void kern_residual_fwd(float *out, const float *a, const float *b, size_t n) {
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

double kern_xent_fwd_bwd(float *logits, const int *tgt, size_t N, int V, float dscale) {
    int nt = omp_get_max_threads();
    double *part = calloc((size_t)nt, sizeof(double));
#pragma omp parallel num_threads(nt)
    {
        int id = omp_get_thread_num();
        size_t lo, hi;
        split_range(N, id, omp_get_num_threads(), &lo, &hi);
        double s = 0.0;
        for (size_t n = lo; n < hi; n++) {
            float *z = logits + n * V, mx = z[0], sum = 0.f;
            for (int i = 1; i < V; i++) mx = z[i] > mx ? z[i] : mx;
            for (int i = 0; i < V; i++) z[i] = fast_expf(z[i] - mx);
            for (int i = 0; i < V; i++) sum += z[i];
            float inv = 1.0f / sum;
            for (int i = 0; i < V; i++) z[i] *= inv;
            s -= log((double)z[tgt[n]]);
            if (dscale != 0.f) {
                for (int i = 0; i < V; i++) z[i] *= dscale;
                z[tgt[n]] -= dscale;
            }
        }
        part[id] = s;
    }
    double loss = 0.0;
    for (int t = 0; t < nt; t++) loss += part[t];
    free(part);
    return loss;
}

double kern_sumsq(const float *x, size_t n) {
    int nt = omp_get_max_threads();
    double *part = calloc((size_t)nt, sizeof(double));
#pragma omp parallel num_threads(nt)
    {
        int id = omp_get_thread_num();
        size_t lo, hi;
        split_range(n, id, omp_get_num_threads(), &lo, &hi);
        double s = 0.0;
        for (size_t i = lo; i < hi; i++) s += (double)x[i] * x[i];
        part[id] = s;
    }
    double s = 0.0;
    for (int t = 0; t < nt; t++) s += part[t];
    free(part);
    return s;
}

/* AdamW's moment update of one element and its bias-corrected direction
 * mhat / (sqrt(vhat) + eps); shared by the whole and the split step. */
static inline float adam_dir(float gi, float *m, float *v, float beta1, float beta2, float c1,
                             float c2, float eps) {
    float mi = beta1 * *m + (1.0f - beta1) * gi;
    float vi = beta2 * *v + (1.0f - beta2) * gi * gi;
    *m = mi;
    *v = vi;
    return (mi / c1) / (sqrtf(vi / c2) + eps);
}

void kern_adamw(float *p, const float *g, float *m, float *v, size_t n, float lr, float beta1,
                float beta2, float eps, float wd, float gscale, int t) {
    float c1 = 1.0f - powf(beta1, (float)t), c2 = 1.0f - powf(beta2, (float)t);
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) {
        float d = adam_dir(g[i] * gscale, &m[i], &v[i], beta1, beta2, c1, c2, eps);
        p[i] -= lr * (d + wd * p[i]);
    }
}

void kern_adam_delta(float *g, float *m, float *v, size_t n, float lr, float beta1, float beta2,
                     float eps, float gscale, float out_scale, int t) {
    float c1 = 1.0f - powf(beta1, (float)t), c2 = 1.0f - powf(beta2, (float)t);
    float k = -lr * out_scale;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++)
        g[i] = k * adam_dir(g[i] * gscale, &m[i], &v[i], beta1, beta2, c1, c2, eps);
}

void kern_apply_delta(float *p, const float *d, size_t n, float lr, float wd) {
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) p[i] += d[i] - lr * wd * p[i];
}

const char *kern_blas_corename(void) { return openblas_get_corename(); }

const char *kern_blas_better_coretype(void) {
    /* Kernels older than Haswell: what OpenBLAS falls back to on CPUs its
     * DYNAMIC_ARCH table does not know (e.g. 0.3.21 on newer Xeons). */
    static const char *const slow[] = {"prescott", "core2", "penryn", "dunnington", "nehalem",
                                       "atom",     "katmai", "banias", "northwood", "sandybridge",
                                       "barcelona", "opteron", "generic", NULL};
    const char *core = openblas_get_corename();
    int is_slow = 0;
    for (int i = 0; slow[i]; i++) is_slow |= core && strcasecmp(core, slow[i]) == 0;
    if (!is_slow) return NULL;
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
        return "SkylakeX";
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "Haswell";
    return NULL;
}

void kern_set_threads(int n) {
    omp_set_dynamic(0);
    omp_set_num_threads(n);
    openblas_set_num_threads(n);
}

int kern_threads(void) { return omp_get_max_threads(); }

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

double kern_sgemm_gflops(int n, double seconds) {
    size_t nn = (size_t)n * n;
    float *a = malloc(nn * sizeof(float)), *b = malloc(nn * sizeof(float)),
          *c = malloc(nn * sizeof(float));
    double rate = 0.0;
    if (a && b && c) {
        for (size_t i = 0; i < nn; i++) {
            a[i] = (float)(i % 7) * 0.1f;
            b[i] = (float)(i % 5) * 0.1f;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1.f, a, n, b, n, 0.f, c, n);
        /* best of short repetitions: the peak the machine can deliver now */
        double t_end = now_s() + seconds;
        do {
            double t0 = now_s();
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1.f, a, n, b, n, 0.f, c,
                        n);
            double r = 2.0 * n * nn / (now_s() - t0) / 1e9;
            rate = r > rate ? r : rate;
        } while (now_s() < t_end);
    }
    free(a);
    free(b);
    free(c);
    return rate;
}
