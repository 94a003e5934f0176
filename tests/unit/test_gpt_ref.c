/* Whole-model check: logits, loss and every parameter gradient of a tiny GPT
 * against the independent numpy implementation in tests/ref/gpt_ref.py
 * (float64). Pass: per-tensor normwise relative error below 1e-5.
 * Runs from the repository root (tests/run.sh does).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "kernels/kern.h"
#include "src/gpt.h"
#include "src/rng.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TOL 1e-5

static double rel_err(const float *a, const double *ref, size_t n) {
    double e = 0, r = 0;
    for (size_t i = 0; i < n; i++) {
        e += (a[i] - ref[i]) * (a[i] - ref[i]);
        r += ref[i] * ref[i];
    }
    return sqrt(e) / (sqrt(r) + 1e-30);
}

static void run_case(int L, int NH, int C, int Tmax, int V, int B, int T) {
    gpt_config cfg = {L, NH, C, Tmax, V};
    gpt *g = NULL;
    assert_int_equal(gpt_create(&cfg, &g), 0);
    gpt_init_weights(g, 7);
    /* make every parameter matter: non-trivial LayerNorms and biases, larger weights */
    rng_state r;
    rng_seed(&r, 99);
    float *p = gpt_params(g);
    for (int i = 0; i < gpt_ntensors(g); i++) {
        const gpt_tensor *t = gpt_tensor_at(g, i);
        for (size_t j = 0; j < t->numel; j++) {
            if (t->ndim == 1) p[t->offset + j] += 0.2f * rng_normal(&r);
            else p[t->offset + j] *= 10.0f;
        }
    }
    int n = B * T, *tok = malloc(n * sizeof(int)), *tgt = malloc(n * sizeof(int));
    for (int i = 0; i < n; i++) {
        tok[i] = (int)(rng_u64(&r) % V);
        tgt[i] = (int)(rng_u64(&r) % V);
    }
    char in[] = "/tmp/mpilm_gptref_in_XXXXXX", out[64], cmd[256];
    int fd = mkstemp(in);
    assert_true(fd >= 0);
    snprintf(out, sizeof out, "%s.out", in);
    FILE *f = fdopen(fd, "wb");
    int hdr[7] = {L, NH, C, Tmax, V, B, T};
    fwrite(hdr, 4, 7, f);
    fwrite(tok, 4, n, f);
    fwrite(tgt, 4, n, f);
    fwrite(p, 4, gpt_nparams(g), f);
    fclose(f);
    snprintf(cmd, sizeof cmd, "/usr/bin/python3 tests/ref/gpt_ref.py %s %s", in, out);
    assert_int_equal(system(cmd), 0);

    size_t nl = (size_t)n * V, np = gpt_nparams(g);
    double *ref = malloc((nl + 1 + np) * sizeof(double));
    f = fopen(out, "rb");
    assert_non_null(f);
    assert_int_equal(fread(ref, 8, nl + 1 + np, f), nl + 1 + np);
    fclose(f);
    remove(in);
    remove(out);

    gpt_forward(g, tok, NULL, B, T, 0.f);
    double e = rel_err(gpt_logits(g), ref, nl);
    printf("  logits            rel err %.2e\n", e);
    assert_true(e < TOL);
    gpt_zero_grad(g);
    double loss = gpt_forward(g, tok, tgt, B, T, 1.0f / n) / n;
    printf("  loss %.8f ref %.8f\n", loss, ref[nl]);
    assert_true(fabs(loss - ref[nl]) < TOL * fabs(ref[nl]));
    const float *gr = gpt_grads(g);
    double worst = 0;
    for (int i = 0; i < gpt_ntensors(g); i++) {
        const gpt_tensor *t = gpt_tensor_at(g, i);
        double te = rel_err(gr + t->offset, ref + nl + 1 + t->offset, t->numel);
        printf("  grad %-22s rel err %.2e\n", t->name, te);
        worst = te > worst ? te : worst;
    }
    assert_true(worst < TOL);
    free(ref);
    free(tok);
    free(tgt);
    gpt_destroy(g);
}

static void test_tiny(void **s) {
    (void)s;
    run_case(2, 2, 16, 8, 11, 2, 6); /* T < block_size: unused wpe rows get zero gradient */
}
static void test_wider(void **s) {
    (void)s;
    run_case(3, 4, 32, 16, 37, 3, 16);
}

int main(void) {
    kern_set_threads(2);
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_tiny), cmocka_unit_test(test_wider)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
