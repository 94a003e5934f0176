/* Gradient checks of every backward kernel in kernels/kern.h.
 *
 * For each kernel, a scalar L = sum(out * R) with fixed random R. The float
 * backward kernel (fed dout = R) gives dL/d(inputs); the reference is a
 * central finite difference of L computed by an independent double-precision
 * forward written here. Pass: normwise relative error below 1e-4 for every
 * input tensor (float kernels against a double reference).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "kernels/kern.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TOL 1e-4

static uint64_t lcg = 12345;
static double urand(void) { /* test-local generator, [-1, 1) */
    lcg = lcg * 6364136223846793005ULL + 1442695040888963407ULL;
    return (double)(lcg >> 11) / 4503599627370496.0 - 1.0;
}
static void fill(double *d, float *f, size_t n, double scale) {
    for (size_t i = 0; i < n; i++) {
        f[i] = (float)(scale * urand());
        d[i] = f[i];
    }
}

/* Reference forward: writes L for the inputs in x (one flat double array). */
typedef double (*ref_fn)(const double *x, const void *ctx);

/* Compares analytic gradient g (float, n entries) with central differences
 * of ref over x[off, off+n). Returns the normwise relative error. */
static double check(const char *what, ref_fn f, double *x, size_t off, const float *g, size_t n,
                    const void *ctx) {
    double num2 = 0, err2 = 0;
    for (size_t i = 0; i < n; i++) {
        double keep = x[off + i], h = 1e-4 * (fabs(keep) > 1 ? fabs(keep) : 1);
        x[off + i] = keep + h;
        double lp = f(x, ctx);
        x[off + i] = keep - h;
        double lm = f(x, ctx);
        x[off + i] = keep;
        double d = (lp - lm) / (2 * h);
        num2 += d * d;
        err2 += (d - g[i]) * (d - g[i]);
    }
    double rel = sqrt(err2) / (sqrt(num2) + 1e-30);
    printf("  %-28s n=%-5zu rel err %.2e\n", what, n, rel);
    return rel;
}

/* ---- layernorm ---------------------------------------------------------- */
typedef struct {
    int N, C;
    const double *R;
} ln_ctx;
static double ref_ln(const double *x, const void *vc) {
    const ln_ctx *c = vc;
    const double *inp = x, *w = x + c->N * c->C, *b = w + c->C;
    double L = 0;
    for (int n = 0; n < c->N; n++) {
        double m = 0, v = 0;
        for (int i = 0; i < c->C; i++) m += inp[n * c->C + i];
        m /= c->C;
        for (int i = 0; i < c->C; i++) v += pow(inp[n * c->C + i] - m, 2);
        double s = 1 / sqrt(v / c->C + 1e-5);
        for (int i = 0; i < c->C; i++)
            L += ((inp[n * c->C + i] - m) * s * w[i] + b[i]) * c->R[n * c->C + i];
    }
    return L;
}
static void test_layernorm(void **state) {
    (void)state;
    int N = 5, C = 16;
    size_t nx = (size_t)N * C + 2 * C;
    double *x = malloc(nx * 8), *R = malloc((size_t)N * C * 8);
    float *xf = malloc(nx * 4), *Rf = malloc((size_t)N * C * 4), *out = malloc((size_t)N * C * 4);
    float *g = calloc(nx, 4), mean[5], rstd[5];
    fill(x, xf, nx, 1.0);
    for (int i = 0; i < C; i++) xf[N * C + i] = (float)(x[N * C + i] = 1.0 + 0.3 * urand());
    fill(R, Rf, (size_t)N * C, 1.0);
    kern_layernorm_fwd(out, mean, rstd, xf, xf + N * C, xf + N * C + C, N, C);
    kern_layernorm_bwd(g, g + N * C, g + N * C + C, Rf, xf, xf + N * C, mean, rstd, N, C);
    ln_ctx c = {N, C, R};
    assert_true(check("layernorm dinp", ref_ln, x, 0, g, (size_t)N * C, &c) < TOL);
    assert_true(check("layernorm dweight", ref_ln, x, N * C, g + N * C, C, &c) < TOL);
    assert_true(check("layernorm dbias", ref_ln, x, N * C + C, g + N * C + C, C, &c) < TOL);
    free(x), free(R), free(xf), free(Rf), free(out), free(g);
}

/* ---- matmul ------------------------------------------------------------- */
typedef struct {
    int N, C, OC;
    const double *R;
} mm_ctx;
static double ref_mm(const double *x, const void *vc) {
    const mm_ctx *c = vc;
    const double *inp = x, *w = x + c->N * c->C, *b = w + c->OC * c->C;
    double L = 0;
    for (int n = 0; n < c->N; n++)
        for (int o = 0; o < c->OC; o++) {
            double s = b[o];
            for (int i = 0; i < c->C; i++) s += inp[n * c->C + i] * w[o * c->C + i];
            L += s * c->R[n * c->OC + o];
        }
    return L;
}
static void test_matmul(void **state) {
    (void)state;
    int N = 6, C = 8, OC = 12;
    size_t nx = (size_t)N * C + (size_t)OC * C + OC;
    double *x = malloc(nx * 8), *R = malloc((size_t)N * OC * 8);
    float *xf = malloc(nx * 4), *Rf = malloc((size_t)N * OC * 4), *out = malloc((size_t)N * OC * 4);
    float *g = calloc(nx, 4);
    fill(x, xf, nx, 1.0);
    fill(R, Rf, (size_t)N * OC, 1.0);
    float *w = xf + N * C, *b = w + OC * C;
    kern_matmul_fwd(out, xf, w, b, N, C, OC);
    /* forward agrees with the reference too */
    mm_ctx c = {N, C, OC, R};
    double L = 0;
    for (int i = 0; i < N * OC; i++) L += out[i] * R[i];
    assert_true(fabs(L - ref_mm(x, &c)) < 1e-4 * (1 + fabs(L)));
    kern_matmul_bwd(g, g + N * C, g + N * C + OC * C, Rf, xf, w, N, C, OC);
    assert_true(check("matmul dinp", ref_mm, x, 0, g, (size_t)N * C, &c) < TOL);
    assert_true(check("matmul dweight", ref_mm, x, N * C, g + N * C, (size_t)OC * C, &c) < TOL);
    assert_true(check("matmul dbias", ref_mm, x, N * C + OC * C, g + N * C + OC * C, OC, &c) < TOL);
    free(x), free(R), free(xf), free(Rf), free(out), free(g);
}

/* ---- attention ---------------------------------------------------------- */
typedef struct {
    int B, T, C, NH;
    const double *R;
} at_ctx;
static double ref_att(const double *qkv, const void *vc) {
    const at_ctx *c = vc;
    int hs = c->C / c->NH, C3 = 3 * c->C;
    double L = 0, sc = 1 / sqrt((double)hs);
    for (int b = 0; b < c->B; b++)
        for (int h = 0; h < c->NH; h++)
            for (int t = 0; t < c->T; t++) {
                const double *q = qkv + (b * c->T + t) * C3 + h * hs;
                double s[64], mx = -1e300, z = 0;
                for (int j = 0; j <= t; j++) {
                    const double *k = qkv + (b * c->T + j) * C3 + c->C + h * hs;
                    s[j] = 0;
                    for (int i = 0; i < hs; i++) s[j] += q[i] * k[i];
                    s[j] *= sc;
                    mx = s[j] > mx ? s[j] : mx;
                }
                for (int j = 0; j <= t; j++) z += (s[j] = exp(s[j] - mx));
                for (int i = 0; i < hs; i++) {
                    double y = 0;
                    for (int j = 0; j <= t; j++)
                        y += s[j] / z * qkv[(b * c->T + j) * C3 + 2 * c->C + h * hs + i];
                    L += y * c->R[(b * c->T + t) * c->C + h * hs + i];
                }
            }
    return L;
}
static void test_attention(void **state) {
    (void)state;
    int B = 2, T = 5, C = 8, NH = 2;
    size_t n = (size_t)B * T * 3 * C, no = (size_t)B * T * C, na = (size_t)B * NH * T * T;
    double *x = malloc(n * 8), *R = malloc(no * 8);
    float *xf = malloc(n * 4), *Rf = malloc(no * 4), *out = malloc(no * 4), *att = malloc(na * 4);
    float *scratch = malloc(na * 4), *g = malloc(n * 4);
    fill(x, xf, n, 1.0);
    fill(R, Rf, no, 1.0);
    kern_attention_fwd(out, att, xf, B, T, C, NH);
    at_ctx c = {B, T, C, NH, R};
    double L = 0;
    for (size_t i = 0; i < no; i++) L += out[i] * R[i];
    assert_true(fabs(L - ref_att(x, &c)) < 1e-4 * (1 + fabs(L)));
    kern_attention_bwd(g, scratch, Rf, xf, att, B, T, C, NH);
    assert_true(check("attention dqkv", ref_att, x, 0, g, n, &c) < TOL);
    free(x), free(R), free(xf), free(Rf), free(out), free(att), free(scratch), free(g);
}

/* ---- gelu --------------------------------------------------------------- */
static double ref_gelu(const double *x, const void *vc) {
    const double *R = vc;
    double L = 0;
    for (int i = 0; i < 64; i++)
        L += 0.5 * x[i] * (1 + tanh(sqrt(2 / M_PI) * (x[i] + 0.044715 * pow(x[i], 3)))) * R[i];
    return L;
}
static void test_gelu(void **state) {
    (void)state;
    double x[64], R[64];
    float xf[64], Rf[64], out[64], g[64];
    fill(x, xf, 64, 3.0);
    fill(R, Rf, 64, 1.0);
    kern_gelu_fwd(out, xf, 64);
    kern_gelu_bwd(g, xf, Rf, 64);
    assert_true(check("gelu dinp", ref_gelu, x, 0, g, 64, R) < TOL);
}

/* ---- fused softmax cross-entropy ------------------------------------------ */
typedef struct {
    int N, V;
    const int *tgt;
} xe_ctx;
static double ref_xent(const double *z, const void *vc) {
    const xe_ctx *c = vc;
    double L = 0;
    for (int n = 0; n < c->N; n++) {
        double mx = -1e300, s = 0;
        for (int i = 0; i < c->V; i++) mx = z[n * c->V + i] > mx ? z[n * c->V + i] : mx;
        for (int i = 0; i < c->V; i++) s += exp(z[n * c->V + i] - mx);
        L += log(s) + mx - z[n * c->V + c->tgt[n]];
    }
    return L;
}
static void test_xent(void **state) {
    (void)state;
    int N = 4, V = 11, tgt[4] = {0, 3, 10, 5};
    double z[44];
    float zf[44];
    fill(z, zf, 44, 2.0);
    xe_ctx c = {N, V, tgt};
    double L = kern_xent_fwd_bwd(zf, tgt, N, V, 1.0f);
    assert_true(fabs(L - ref_xent(z, &c)) < 1e-5 * fabs(L));
    assert_true(check("xent dlogits", ref_xent, z, 0, zf, 44, &c) < TOL);
}

/* ---- encoder ------------------------------------------------------------ */
typedef struct {
    int B, T, C, V;
    const int *tok;
    const double *R;
} en_ctx;
static double ref_enc(const double *x, const void *vc) {
    const en_ctx *c = vc;
    const double *wte = x, *wpe = x + c->V * c->C;
    double L = 0;
    for (int bt = 0; bt < c->B * c->T; bt++)
        for (int i = 0; i < c->C; i++)
            L += (wte[c->tok[bt] * c->C + i] + wpe[(bt % c->T) * c->C + i]) * c->R[bt * c->C + i];
    return L;
}
static void test_encoder(void **state) {
    (void)state;
    int B = 2, T = 4, C = 6, V = 5, tok[8] = {1, 1, 4, 0, 2, 1, 3, 3}; /* repeats on purpose */
    size_t nx = (size_t)(V + T) * C, no = (size_t)B * T * C;
    double *x = malloc(nx * 8), *R = malloc(no * 8);
    float *xf = malloc(nx * 4), *Rf = malloc(no * 4), *out = malloc(no * 4), *g = calloc(nx, 4);
    fill(x, xf, nx, 1.0);
    fill(R, Rf, no, 1.0);
    kern_encoder_fwd(out, tok, xf, xf + V * C, B, T, C);
    kern_encoder_bwd(g, g + V * C, Rf, tok, B, T, C);
    en_ctx c = {B, T, C, V, tok, R};
    assert_true(check("encoder dwte", ref_enc, x, 0, g, (size_t)V * C, &c) < TOL);
    assert_true(check("encoder dwpe", ref_enc, x, V * C, g + V * C, (size_t)T * C, &c) < TOL);
    free(x), free(R), free(xf), free(Rf), free(out), free(g);
}

/* AdamW: one step against the textbook formula. */
static void test_adamw(void **state) {
    (void)state;
    float p[3] = {1.0f, -2.0f, 0.5f}, g[3] = {0.1f, -0.2f, 0.0f}, m[3] = {0}, v[3] = {0};
    kern_adamw(p, g, m, v, 3, 0.01f, 0.9f, 0.95f, 1e-8f, 0.1f, 1.0f, 1);
    /* t=1: mhat = g, vhat = g^2 -> update = sign(g) (for g != 0) */
    assert_true(fabs(p[0] - (1.0 - 0.01 * (1.0 + 0.1 * 1.0))) < 1e-6);
    assert_true(fabs(p[1] - (-2.0 - 0.01 * (-1.0 + 0.1 * -2.0))) < 1e-6);
    assert_true(fabs(p[2] - (0.5 - 0.01 * (0.0 + 0.1 * 0.5))) < 1e-6);
}

/* The split step (rank's change, then apply) equals kern_adamw up to
 * rounding, and out_scale scales only the change. */
static void test_adam_delta(void **state) {
    (void)state;
    enum { N = 1000 };
    static float p1[N], p2[N], g1[N], g2[N], m1[N], v1[N], m2[N], v2[N];
    for (int i = 0; i < N; i++) p1[i] = p2[i] = sinf(0.37f * i);
    for (int t = 1; t <= 5; t++) {
        for (int i = 0; i < N; i++) g1[i] = g2[i] = cosf(0.11f * i * t) * (1 + i % 7);
        kern_adamw(p1, g1, m1, v1, N, 0.01f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.5f, t);
        kern_adam_delta(g2, m2, v2, N, 0.01f, 0.9f, 0.95f, 1e-8f, 0.5f, 0.25f, t);
        for (int i = 0; i < N; i++) g2[i] *= 4; /* four ranks' equal changes summed */
        kern_apply_delta(p2, g2, N, 0.01f, 0.1f);
    }
    for (int i = 0; i < N; i++) {
        assert_true(m1[i] == m2[i] && v1[i] == v2[i]);
        assert_true(fabsf(p1[i] - p2[i]) <= 1e-6f * (1 + fabsf(p1[i])));
    }
}

int main(void) {
    kern_set_threads(2);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_encoder), cmocka_unit_test(test_layernorm),
        cmocka_unit_test(test_matmul),  cmocka_unit_test(test_attention),
        cmocka_unit_test(test_gelu),    cmocka_unit_test(test_xent),
        cmocka_unit_test(test_adamw),   cmocka_unit_test(test_adam_delta),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
