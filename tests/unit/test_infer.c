/* The inference engine (src/infer.h) on a small random model:
 *  - greedy continuation with the KV cache equals greedy continuation
 *    computed by re-running the full gpt_forward on the growing sequence
 *    (no cache), token for token, and the logits agree to ~1e-5;
 *  - the same request + seed gives the same tokens alone (batch 1) and
 *    inside a continuous batch of 8 mixed requests (and of 3);
 *  - the step-wise batcher: requests joining a running batch at staggered
 *    times, in reverse order, give the same tokens again; pop reports each
 *    exactly once; infer_kv_need counts the positions a request can use;
 *  - sampling: top_k 1 and tiny top_p are greedy, the stream depends only
 *    on (seed, position), stop strings and the context limit end requests.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "src/gpt.h"
#include "src/infer.h"
#include "src/rng.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static gpt *make_model(int L, int NH, int C, int Tmax, int V) {
    gpt_config cfg = {L, NH, C, Tmax, V};
    gpt *g = NULL;
    assert_int_equal(gpt_create(&cfg, &g), 0);
    gpt_init_weights(g, 11);
    rng_state r;
    rng_seed(&r, 5);
    float *p = gpt_params(g);
    /* larger weights and non-trivial LayerNorms: peaked, distinct logits */
    for (int i = 0; i < gpt_ntensors(g); i++) {
        const gpt_tensor *t = gpt_tensor_at(g, i);
        for (size_t j = 0; j < t->numel; j++) {
            if (t->ndim == 1)
                p[t->offset + j] += 0.2f * rng_normal(&r);
            else
                p[t->offset + j] *= 8.0f;
        }
    }
    return g;
}

static int argmax(const float *x, int n) {
    int b = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[b]) b = i;
    return b;
}

static void test_greedy_matches_full_forward(void **st) {
    (void)st;
    const int L = 2, NH = 4, C = 32, Tm = 40, V = 64;
    gpt *g = make_model(L, NH, C, Tm, V);
    infer_engine *e = NULL;
    char err[256];
    assert_int_equal(infer_create(g, 2, &e, err, sizeof err), 0);
    int seq[64], n = 7;
    for (int i = 0; i < n; i++)
        seq[i] = (i * 13 + 5) % V;
    /* slot 1, so slot indexing is exercised */
    assert_int_equal(infer_prefill(e, 1, seq, n), 0);
    double maxd = 0;
    while (n < Tm) {
        const float *lc = infer_logits(e, 1);
        int tc = argmax(lc, V);
        assert_true(gpt_forward(g, seq, NULL, 1, n, 0.f) == 0.0);
        const float *lf = gpt_logits(g) + (size_t)(n - 1) * V;
        int tf = argmax(lf, V);
        double scale = 0;
        for (int v = 0; v < V; v++) {
            double d = fabs((double)lc[v] - lf[v]);
            maxd = d > maxd ? d : maxd;
            scale = fabs(lf[v]) > scale ? fabs(lf[v]) : scale;
        }
        if (tc != tf) fail_msg("position %d: cached greedy token %d, full forward %d", n, tc, tf);
        assert_true(maxd <= 1e-4 * (scale > 1 ? scale : 1));
        seq[n++] = tc;
        if (n < Tm) assert_int_equal(infer_decode(e, 1, (int[]){1}, &tc), 0);
    }
    printf("greedy: %d tokens equal, max |logit diff| %.3g\n", n - 7, maxd);
    infer_destroy(e);
    gpt_destroy(g);
}

static void make_requests(infer_request *rq, int (*prompts)[16], int n, int V) {
    for (int i = 0; i < n; i++) {
        int np = 1 + (i * 5) % 13;
        for (int j = 0; j < np; j++)
            prompts[i][j] = (i * 31 + j * 7 + 3) % V;
        rq[i] = (infer_request){.prompt = prompts[i],
                                .n_prompt = np,
                                .max_new_tokens = 3 + (i * 7) % 20,
                                .sampling = {.temperature = (i % 4) * 0.5f,
                                             .top_k = (i % 3 == 1) ? 10 : 0,
                                             .top_p = (i % 3 == 2) ? 0.9f : 1.f,
                                             .seed = 1000 + (uint64_t)i}};
    }
}

static void test_batch_invariance(void **st) {
    (void)st;
    const int V = 64, N = 8;
    gpt *g = make_model(2, 2, 32, 32, V);
    infer_engine *e = NULL;
    char err[256];
    assert_int_equal(infer_create(g, N, &e, err, sizeof err), 0);
    int prompts[N][16];
    infer_request rq[N];
    make_requests(rq, prompts, N, V);
    infer_result batch[N], b3[N], alone;
    assert_int_equal(infer_run(e, rq, N, batch, 8, 0), 0);
    long long steps, rows;
    infer_batch_stats(e, &steps, &rows);
    assert_true(rows > steps); /* decode steps really were batched */
    assert_int_equal(infer_run(e, rq, N, b3, 3, 0), 0);
    for (int i = 0; i < N; i++) {
        assert_int_equal(infer_run(e, &rq[i], 1, &alone, 1, 0), 0);
        assert_int_equal(alone.generated, rq[i].max_new_tokens); /* context 32 is enough */
        assert_int_equal(batch[i].n_tokens, alone.n_tokens);
        assert_int_equal(b3[i].n_tokens, alone.n_tokens);
        assert_memory_equal(batch[i].tokens, alone.tokens, alone.n_tokens * sizeof(int));
        assert_memory_equal(b3[i].tokens, alone.tokens, alone.n_tokens * sizeof(int));
        infer_result_free(&alone);
        infer_result_free(&batch[i]);
        infer_result_free(&b3[i]);
    }
    printf("batch invariance: %d requests, %lld decode steps, mean batch %.2f\n", N, steps,
           (double)rows / steps);
    infer_destroy(e);
    gpt_destroy(g);
}

static void test_batcher_staggered(void **st) {
    (void)st;
    enum { N = 8 };
    const int V = 64;
    gpt *g = make_model(2, 2, 32, 32, V);
    infer_engine *e = NULL;
    infer_batcher *b = NULL;
    char err[256];
    assert_int_equal(infer_create(g, 4, &e, err, sizeof err), 0);
    assert_int_equal(infer_batcher_create(e, 4, &b), 0);
    int prompts[N][16];
    infer_request rq[N];
    make_requests(rq, prompts, N, V);
    infer_result res[N], alone;
    int seen[N] = {0}, next = N - 1, done = 0, steps = 0;
    void *tag;
    /* one new request every other step, newest index first, while room */
    while (done < N) {
        if (next >= 0 && steps % 2 == 0 && infer_batcher_free_slots(b) > 0) {
            assert_true(infer_batcher_add(b, &rq[next], &res[next], 0, &seen[next]) >= 0);
            next--;
        }
        assert_true(infer_batcher_running(b) <= 4);
        assert_int_equal(infer_batcher_step(b), 0);
        steps++;
        while (infer_batcher_pop(b, &tag)) {
            (*(int *)tag)++;
            done++;
        }
        assert_true(steps < 1000);
    }
    for (int i = 0; i < N; i++) {
        assert_int_equal(seen[i], 1);
        assert_int_equal(infer_run(e, &rq[i], 1, &alone, 1, 0), 0);
        assert_int_equal(res[i].n_tokens, alone.n_tokens);
        assert_memory_equal(res[i].tokens, alone.tokens, alone.n_tokens * sizeof(int));
        infer_result_free(&alone);
        infer_result_free(&res[i]);
    }
    /* KV need: prompt + max_new - 1 positions, capped at the context, in
     * pages of 16 positions */
    const gpt_config *c = gpt_cfg(g);
    size_t per = 2 * (size_t)c->n_layer * c->n_embd * sizeof(float), page = 16 * per;
    assert_int_equal(infer_kv_need(c, 5, 10), page);
    assert_int_equal(infer_kv_need(c, 5, 1), page);
    assert_int_equal(infer_kv_need(c, 15, 3), 2 * page);
    assert_int_equal(infer_kv_need(c, 30, 100), 2 * page);
    assert_int_equal(4 * infer_kv_need(c, 32, 1), infer_kv_bytes(e));
    infer_batcher_destroy(b);
    infer_destroy(e);
    /* a pool of 2 pages for 4 slots: the memory is the budget; a prefill
     * without a free page fails, a released sequence gives its pages back */
    assert_int_equal(infer_create_kv(g, 4, 2 * page + 100, &e, err, sizeof err), 0);
    assert_int_equal(infer_kv_bytes(e), 2 * page);
    int p20[20] = {0};
    assert_int_equal(infer_prefill(e, 0, p20, 20), 0);
    assert_int_equal(infer_prefill(e, 1, p20, 1), -1);
    infer_release(e, 0);
    assert_int_equal(infer_pos(e, 0), 0);
    assert_int_equal(infer_prefill(e, 1, p20, 16), 0);
    assert_int_equal(infer_prefill(e, 2, p20, 16), 0);
    int sl[1] = {1}, tk[1] = {3};
    assert_int_equal(infer_decode(e, 1, sl, tk), -1); /* position 16 needs a third page */
    infer_destroy(e);
    assert_int_equal(infer_create_kv(g, 4, page - 1, &e, err, sizeof err), -1);
    gpt_destroy(g);
}

static void test_sampling(void **st) {
    (void)st;
    float lg[50];
    for (int i = 0; i < 50; i++)
        lg[i] = (float)sin(i * 1.7) * 3;
    int best = argmax(lg, 50);
    infer_sampling greedy = {0, 0, 1, 1}, k1 = {1.5f, 1, 1, 7}, p0 = {1.f, 0, 1e-6f, 9},
                   hot = {1.f, 0, 1.f, 3};
    for (int pos = 0; pos < 100; pos++) {
        assert_int_equal(infer_sample(lg, 50, &greedy, pos), best);
        assert_int_equal(infer_sample(lg, 50, &k1, pos), best);
        assert_int_equal(infer_sample(lg, 50, &p0, pos), best);
        assert_int_equal(infer_sample(lg, 50, &hot, pos), infer_sample(lg, 50, &hot, pos));
        double u = infer_uniform(3, pos);
        assert_true(u >= 0 && u < 1);
    }
    /* top-k 5 only ever picks among the 5 largest */
    infer_sampling k5 = {2.f, 5, 1, 1};
    int seen = 0;
    for (int pos = 0; pos < 400; pos++) {
        int t = infer_sample(lg, 50, &k5, pos), rank = 0;
        for (int i = 0; i < 50; i++)
            rank += lg[i] > lg[t];
        assert_true(rank < 5);
        seen |= 1 << rank;
    }
    assert_int_equal(seen, 31); /* and all 5 of them at temperature 2 */
}

static void test_stop_and_context(void **st) {
    (void)st;
    const int V = 64, Tm = 16;
    gpt *g = make_model(1, 2, 16, Tm, V);
    infer_engine *e = NULL;
    char err[256];
    assert_int_equal(infer_create(g, 2, &e, err, sizeof err), 0);
    int prompt[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
    infer_request q = {.prompt = prompt, .n_prompt = 10, .max_new_tokens = 100};
    infer_result r;
    /* context: positions 0..15 can be fed, so 16 - 10 + 1 = 7 tokens */
    assert_int_equal(infer_run(e, &q, 1, &r, 2, 0), 0);
    assert_int_equal(r.generated, Tm - 10 + 1);
    assert_int_equal(r.finish, INFER_CONTEXT);
    assert_string_equal(infer_finish_name(r.finish), "length");
    /* stop at the 3rd generated token */
    char stop[3] = {(char)r.tokens[1], (char)r.tokens[2], 0};
    int ok = r.tokens[1] > 0 && r.tokens[2] > 0;
    infer_result_free(&r);
    if (ok) {
        q.stop = stop;
        infer_result r2;
        assert_int_equal(infer_run(e, &q, 1, &r2, 2, 0), 0);
        assert_int_equal(r2.finish, INFER_STOP);
        assert_true(r2.generated <= 3);
        assert_int_equal(r2.n_tokens, r2.generated - 2);
        infer_result_free(&r2);
    }
    /* prompt of exactly block_size: one token */
    int full[16] = {0};
    infer_request qf = {.prompt = full, .n_prompt = Tm, .max_new_tokens = 5};
    assert_int_equal(infer_run(e, &qf, 1, &r, 1, 0), 0);
    assert_int_equal(r.generated, 1);
    infer_result_free(&r);
    infer_destroy(e);
    gpt_destroy(g);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_greedy_matches_full_forward),
        cmocka_unit_test(test_batch_invariance),
        cmocka_unit_test(test_batcher_staggered),
        cmocka_unit_test(test_sampling),
        cmocka_unit_test(test_stop_and_context),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
