/* serve: `mpilm serve` (see serve.h).
 *
 * Rank 0 owns the requests: in batch mode it reads IN.jsonl, in HTTP mode
 * the connection threads of src/serve_http.c parse the bodies; either way
 * each request becomes a serve_job for the scheduler (src/serve_sched.h),
 * which runs it on some replica and hands the result back to rank 0. Batch
 * results are written in input order once all are done. A request's text
 * depends only on the request, its seed and the weights, not on the rank
 * count or on the other requests in the batch (src/infer.h).
 */
#include "src/serve.h"

#include "io/ckpt.h"
#include "io/qckpt.h"
#include "kernels/kern.h"
#include "src/gptio.h"
#include "src/infer.h"
#include "src/serve_http.h"
#include "src/serve_sched.h"
#include "src/spmd.h"

#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define PROG "mpilm serve"
#define MAX_NEW_LIMIT 65536
#define MAX_INPUT_BYTES (1LL << 30)

/* ---------------- a small strict JSON reader for flat objects ---------------- */

typedef struct {
    const char *p, *e;
} jcur;

enum { JV_STR, JV_NUM, JV_TRUE, JV_FALSE, JV_NULL };

static void jws(jcur *c) {
    while (c->p < c->e && (*c->p == ' ' || *c->p == '\t' || *c->p == '\r' || *c->p == '\n'))
        c->p++;
}

static int hex4(const char *p, const char *e, unsigned *v) {
    if (e - p < 4) return -1;
    *v = 0;
    for (int i = 0; i < 4; i++) {
        char ch = p[i];
        int d = ch >= '0' && ch <= '9'   ? ch - '0'
                : ch >= 'a' && ch <= 'f' ? ch - 'a' + 10
                : ch >= 'A' && ch <= 'F' ? ch - 'A' + 10
                                         : -1;
        if (d < 0) return -1;
        *v = *v * 16 + (unsigned)d;
    }
    return 0;
}

static size_t put_utf8(char *o, unsigned cp) {
    if (cp < 0x80) {
        o[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (char)(0xC0 | cp >> 6);
        o[1] = (char)(0x80 | (cp & 63));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | cp >> 12);
        o[1] = (char)(0x80 | ((cp >> 6) & 63));
        o[2] = (char)(0x80 | (cp & 63));
        return 3;
    }
    o[0] = (char)(0xF0 | cp >> 18);
    o[1] = (char)(0x80 | ((cp >> 12) & 63));
    o[2] = (char)(0x80 | ((cp >> 6) & 63));
    o[3] = (char)(0x80 | (cp & 63));
    return 4;
}

/* Length of the valid UTF-8 sequence at p (1..4), 0 if invalid. */
static int utf8_len(const unsigned char *p, const unsigned char *e) {
    unsigned c = p[0];
    if (c < 0x80) return 1;
    int n = c >= 0xC2 && c <= 0xDF   ? 2
            : c >= 0xE0 && c <= 0xEF ? 3
            : c >= 0xF0 && c <= 0xF4 ? 4
                                     : 0;
    if (!n || e - p < n) return 0;
    for (int i = 1; i < n; i++)
        if ((p[i] & 0xC0) != 0x80) return 0;
    if (c == 0xE0 && p[1] < 0xA0) return 0; /* overlong */
    if (c == 0xED && p[1] > 0x9F) return 0; /* surrogates */
    if (c == 0xF0 && p[1] < 0x90) return 0;
    if (c == 0xF4 && p[1] > 0x8F) return 0;
    return n;
}

/* String at c->p (after the opening quote is checked here) into a malloc'ed
 * UTF-8 buffer. */
static int jstring(jcur *c, char **out, size_t *len, char *err, size_t errlen) {
    if (c->p >= c->e || *c->p != '"') {
        snprintf(err, errlen, "expected a string");
        return -1;
    }
    c->p++;
    char *o = malloc((size_t)(c->e - c->p) + 1);
    size_t n = 0;
    if (!o) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    while (c->p < c->e && *c->p != '"') {
        unsigned char ch = (unsigned char)*c->p;
        if (ch < 0x20) {
            snprintf(err, errlen, "control character in a string");
            goto bad;
        }
        if (ch != '\\') {
            int l = utf8_len((const unsigned char *)c->p, (const unsigned char *)c->e);
            if (!l) {
                snprintf(err, errlen, "invalid UTF-8 in a string");
                goto bad;
            }
            memcpy(o + n, c->p, (size_t)l);
            n += (size_t)l, c->p += l;
            continue;
        }
        if (++c->p >= c->e) break;
        char esc = *c->p++;
        switch (esc) {
        case '"':
            o[n++] = '"';
            break;
        case '\\':
            o[n++] = '\\';
            break;
        case '/':
            o[n++] = '/';
            break;
        case 'b':
            o[n++] = '\b';
            break;
        case 'f':
            o[n++] = '\f';
            break;
        case 'n':
            o[n++] = '\n';
            break;
        case 'r':
            o[n++] = '\r';
            break;
        case 't':
            o[n++] = '\t';
            break;
        case 'u': {
            unsigned v, w;
            if (hex4(c->p, c->e, &v)) {
                snprintf(err, errlen, "bad \\u escape");
                goto bad;
            }
            c->p += 4;
            if (v >= 0xD800 && v <= 0xDBFF) {
                if (c->e - c->p < 6 || c->p[0] != '\\' || c->p[1] != 'u' ||
                    hex4(c->p + 2, c->e, &w) || w < 0xDC00 || w > 0xDFFF) {
                    snprintf(err, errlen, "unpaired surrogate in \\u escape");
                    goto bad;
                }
                c->p += 6;
                v = 0x10000 + ((v - 0xD800) << 10) + (w - 0xDC00);
            } else if (v >= 0xDC00 && v <= 0xDFFF) {
                snprintf(err, errlen, "unpaired surrogate in \\u escape");
                goto bad;
            }
            n += put_utf8(o + n, v); /* 6 input chars give at most 4 bytes */
            break;
        }
        default:
            snprintf(err, errlen, "bad escape \\%c", esc);
            goto bad;
        }
    }
    if (c->p >= c->e) {
        snprintf(err, errlen, "unterminated string");
        goto bad;
    }
    c->p++;
    o[n] = 0;
    *out = o;
    *len = n;
    return 0;
bad:
    free(o);
    return -1;
}

/* Strict JSON number; *raw/rawlen: its text. */
static int jnumber(jcur *c, double *v, const char **raw, size_t *rawlen) {
    const char *p = c->p, *e = c->e, *s = p;
    if (p < e && *p == '-') p++;
    if (p >= e) return -1;
    if (*p == '0')
        p++;
    else if (*p >= '1' && *p <= '9')
        while (p < e && *p >= '0' && *p <= '9')
            p++;
    else
        return -1;
    if (p < e && *p == '.') {
        p++;
        if (p >= e || *p < '0' || *p > '9') return -1;
        while (p < e && *p >= '0' && *p <= '9')
            p++;
    }
    if (p < e && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < e && (*p == '+' || *p == '-')) p++;
        if (p >= e || *p < '0' || *p > '9') return -1;
        while (p < e && *p >= '0' && *p <= '9')
            p++;
    }
    char buf[64];
    size_t n = (size_t)(p - s);
    if (n >= sizeof buf) return -1;
    memcpy(buf, s, n);
    buf[n] = 0;
    *v = strtod(buf, NULL);
    *raw = s, *rawlen = n;
    c->p = p;
    return 0;
}

void serve_line_free(serve_line *l) {
    if (!l) return;
    free(l->id), free(l->prompt), free(l->stop);
    memset(l, 0, sizeof *l);
}

static const char *type_name(int t) {
    return t == JV_STR    ? "a string"
           : t == JV_NUM  ? "a number"
           : t == JV_NULL ? "null"
                          : "a boolean";
}

/* JSON-escaped copy of bytes s[0..n) into a malloc'ed "..." string: valid
 * UTF-8 passes through, other bytes become U+FFFD. */
char *serve_json_quote(const char *s, size_t n) {
    char *o = malloc(n * 6 + 3), *q = o;
    if (!o) return NULL;
    *q++ = '"';
    const unsigned char *p = (const unsigned char *)s, *e = p + n;
    while (p < e) {
        unsigned ch = *p;
        if (ch == '"' || ch == '\\') {
            *q++ = '\\';
            *q++ = (char)ch;
            p++;
        } else if (ch == '\n') {
            *q++ = '\\';
            *q++ = 'n';
            p++;
        } else if (ch == '\t') {
            *q++ = '\\';
            *q++ = 't';
            p++;
        } else if (ch == '\r') {
            *q++ = '\\';
            *q++ = 'r';
            p++;
        } else if (ch < 0x20 || ch == 0x7f) {
            q += sprintf(q, "\\u%04x", ch);
            p++;
        } else {
            int l = utf8_len(p, e);
            if (!l) {
                q += sprintf(q, "\\ufffd");
                p++;
            } else {
                memcpy(q, p, (size_t)l);
                q += l;
                p += l;
            }
        }
    }
    *q++ = '"';
    *q = 0;
    return o;
}

static int as_int(double v, long long lo, long long hi, long long *out) {
    if (!(v >= (double)lo && v <= (double)hi) || v != floor(v)) return -1;
    *out = (long long)v;
    return 0;
}

int serve_parse_line(const char *s, size_t n, serve_line *L, char *err, size_t errlen) {
    memset(L, 0, sizeof *L);
    L->max_new_tokens = L->top_k = L->seed = -1;
    L->temperature = L->top_p = -1;
    jcur c = {s, s + n};
    unsigned seen = 0;
    static const char *fields[] = {"id",    "prompt", "max_new_tokens", "temperature",
                                   "top_k", "top_p",  "seed",           "stop"};
    const int NF = 8;
    char *key = NULL, *sval = NULL;
    size_t klen, slen;
    int rc = -1;
    jws(&c);
    if (c.p >= c.e || *c.p != '{') {
        snprintf(err, errlen, "malformed JSON: expected an object");
        goto done;
    }
    c.p++;
    jws(&c);
    int first = 1;
    while (1) {
        jws(&c);
        if (first && c.p < c.e && *c.p == '}') {
            c.p++;
            break;
        }
        char e2[128];
        if (jstring(&c, &key, &klen, e2, sizeof e2)) {
            snprintf(err, errlen, "malformed JSON: %s", first ? "expected a key" : e2);
            goto done;
        }
        first = 0;
        jws(&c);
        if (c.p >= c.e || *c.p != ':') {
            snprintf(err, errlen, "malformed JSON: expected ':' after \"%.40s\"", key);
            goto done;
        }
        c.p++;
        jws(&c);
        int t;
        double num = 0;
        const char *raw = NULL;
        size_t rawlen = 0;
        if (c.p < c.e && *c.p == '"') {
            if (jstring(&c, &sval, &slen, e2, sizeof e2)) {
                snprintf(err, errlen, "malformed JSON: %s", e2);
                goto done;
            }
            t = JV_STR;
        } else if (c.p < c.e && (*c.p == '-' || (*c.p >= '0' && *c.p <= '9'))) {
            if (jnumber(&c, &num, &raw, &rawlen)) {
                snprintf(err, errlen, "malformed JSON: bad number for \"%.40s\"", key);
                goto done;
            }
            t = JV_NUM;
        } else if (c.e - c.p >= 4 && !memcmp(c.p, "true", 4))
            t = JV_TRUE, c.p += 4;
        else if (c.e - c.p >= 5 && !memcmp(c.p, "false", 5))
            t = JV_FALSE, c.p += 5;
        else if (c.e - c.p >= 4 && !memcmp(c.p, "null", 4))
            t = JV_NULL, c.p += 4;
        else if (c.p < c.e && (*c.p == '{' || *c.p == '[')) {
            snprintf(err, errlen, "field \"%.40s\": nested objects and arrays are not supported",
                     key);
            goto done;
        } else {
            snprintf(err, errlen, "malformed JSON: bad value for \"%.40s\"", key);
            goto done;
        }
        int f = -1;
        for (int i = 0; i < NF; i++)
            if (strlen(fields[i]) == klen && !memcmp(fields[i], key, klen)) f = i;
        if (f < 0) {
            snprintf(err, errlen, "unknown field \"%.40s\"", key);
            goto skip_rest;
        }
        if (seen & (1u << f)) {
            snprintf(err, errlen, "duplicate field \"%s\"", fields[f]);
            goto skip_rest;
        }
        seen |= 1u << f;
        long long iv;
        switch (f) {
        case 0: /* id: string or number */
            if (t == JV_STR)
                L->id = serve_json_quote(sval, slen);
            else if (t == JV_NUM)
                L->id = strndup(raw, rawlen);
            else {
                snprintf(err, errlen, "field \"id\" must be a string or a number, not %s",
                         type_name(t));
                goto skip_rest;
            }
            break;
        case 1:
            if (t != JV_STR) {
                snprintf(err, errlen, "field \"prompt\" must be a string, not %s", type_name(t));
                goto skip_rest;
            }
            L->prompt = sval, L->prompt_len = slen, sval = NULL;
            break;
        case 2:
            if (t != JV_NUM || as_int(num, 1, MAX_NEW_LIMIT, &iv)) {
                snprintf(err, errlen, "field \"max_new_tokens\" must be an integer in [1, %d]",
                         MAX_NEW_LIMIT);
                goto skip_rest;
            }
            L->max_new_tokens = iv;
            break;
        case 3:
            if (t != JV_NUM || !(num >= 0 && num <= 100)) {
                snprintf(err, errlen, "field \"temperature\" must be a number in [0, 100]");
                goto skip_rest;
            }
            L->temperature = num;
            break;
        case 4:
            if (t != JV_NUM || as_int(num, 0, INT_MAX, &iv)) {
                snprintf(err, errlen, "field \"top_k\" must be an integer >= 0");
                goto skip_rest;
            }
            L->top_k = iv;
            break;
        case 5:
            if (t != JV_NUM || !(num > 0 && num <= 1)) {
                snprintf(err, errlen, "field \"top_p\" must be a number in (0, 1]");
                goto skip_rest;
            }
            L->top_p = num;
            break;
        case 6:
            if (t != JV_NUM || as_int(num, 0, 9007199254740992LL, &iv)) {
                snprintf(err, errlen, "field \"seed\" must be an integer in [0, 2^53]");
                goto skip_rest;
            }
            L->seed = iv;
            break;
        case 7:
            if (t == JV_NULL) break;
            if (t != JV_STR || slen == 0 || memchr(sval, 0, slen)) {
                snprintf(err, errlen, "field \"stop\" must be a non-empty string or null");
                goto skip_rest;
            }
            L->stop = sval, sval = NULL;
            break;
        }
        free(key), free(sval);
        key = sval = NULL;
        jws(&c);
        if (c.p < c.e && *c.p == ',') {
            c.p++;
            continue;
        }
        if (c.p < c.e && *c.p == '}') {
            c.p++;
            break;
        }
        snprintf(err, errlen, "malformed JSON: expected ',' or '}'");
        goto done;
    }
    jws(&c);
    if (c.p != c.e) {
        snprintf(err, errlen, "malformed JSON: text after the object");
        goto done;
    }
    if (!L->prompt) {
        snprintf(err, errlen, "field \"prompt\" is missing");
        goto done;
    }
    rc = 0;
    goto done;
skip_rest:
    /* a semantic error: still try to find the id for the error line */
    if (!L->id) {
        const char *p = s, *e = s + n;
        while ((p = memmem(p, (size_t)(e - p), "\"id\"", 4))) {
            jcur d = {p + 4, e};
            jws(&d);
            if (d.p < e && *d.p == ':') {
                d.p++;
                jws(&d);
                char *v = NULL, e3[64];
                size_t vl;
                double nv;
                const char *r;
                size_t rl;
                if (d.p < e && *d.p == '"' && !jstring(&d, &v, &vl, e3, sizeof e3)) {
                    L->id = serve_json_quote(v, vl);
                    free(v);
                } else if (!jnumber(&d, &nv, &r, &rl))
                    L->id = strndup(r, rl);
                break;
            }
            p += 4;
        }
    }
done:
    free(key), free(sval);
    if (rc) {
        char *id = L->id;
        L->id = NULL;
        serve_line_free(L);
        L->id = id;
    }
    if (!L->id) L->id = strdup("null");
    return rc;
}

/* ---------------- the command ---------------- */

static void usage(FILE *f) {
    fprintf(
        f,
        "usage: mpilm serve --ckpt CKPT (--prompts IN.jsonl --out OUT.jsonl | --http HOST:PORT)\n"
        "                   [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]\n"
        "                   [--seed S] [--stop STR] [--max-batch B] [--kv-budget-mb M]\n"
        "                   [--max-new-tokens-limit N] [--max-request-bytes N]\n"
        "                   [--watch] [--watch-interval S] [--quiet]\n\n"
        "A request is one JSON object:\n"
        "  {\"id\": ..., \"prompt\": \"...\", \"max_new_tokens\": N, \"temperature\": T,\n"
        "   \"top_k\": K, \"top_p\": P, \"seed\": S, \"stop\": \"...\"}  (only prompt required;\n"
        "the options give the defaults: 64 tokens, greedy (T 0), top-k off (0), top-p off\n"
        "(1), seed 0). A result is\n"
        "  {\"id\", \"text\", \"tokens\", \"finish_reason\", \"model_step\", \"timings\":\n"
        "   {\"prompt_ms\", \"decode_ms\", \"ttft_ms\", \"tokens_per_s\"}}\n"
        "or {\"id\", \"error\"} for a bad request. Text is bytes (byte tokenizer); bytes\n"
        "that are not valid UTF-8 are written as U+FFFD.\n\n"
        "Batch mode: --prompts IN.jsonl (one request a line) --out OUT.jsonl (one result a\n"
        "line, in input order; a bad line gets an error line, the others still run); a\n"
        "summary with latency and time-to-first-token percentiles on stdout.\n"
        "HTTP mode: --http HOST:PORT (127.0.0.1 unless another host is given; port 0:\n"
        "a free port, printed as \"serve: listening on http://HOST:PORT\").\n"
        "  POST /completion  a request in, a result out; 400 with {\"error\": reason}\n"
        "                    (malformed JSON, bad field, max_new_tokens over the limit),\n"
        "                    413 for a body over --max-request-bytes (default 1 MiB)\n"
        "  GET /health       {\"status\": \"ok\", \"model\", \"step\", \"ranks\", ...}\n"
        "  GET /metrics      Prometheus text format (requests, tokens, latency histogram,\n"
        "                    running sequences, KV cache reserved and budget, reloads)\n"
        "  SIGTERM/SIGINT (to rank 0's process): stop accepting, answer what was accepted,\n"
        "  exit 0.\n\n"
        "Ranks: alone, rank 0 runs the model; with P > 1 ranks, rank 0 schedules and ranks\n"
        "1..P-1 each hold a replica. Each replica runs up to B (--max-batch, default 8)\n"
        "sequences at once (continuous batching) within a KV-cache budget of M MiB\n"
        "(--kv-budget-mb; default: B full-context sequences); a request reserves the cache\n"
        "its prompt + max_new_tokens need when it starts, waits in rank 0's queue while no\n"
        "replica has room, and gets an error if it can never fit. The texts depend only on\n"
        "the request, its seed and the weights: not on the rank count, batch or order.\n"
        "--max-new-tokens-limit N: largest max_new_tokens accepted (default 1024).\n"
        "--watch: CKPT is a checkpoint root; every S seconds (--watch-interval, default 2)\n"
        "rank 0 looks at its `latest` and, when it names a new step, the replicas load it\n"
        "one at a time between batches (a failed load keeps the old weights).\n"
        "CKPT: a step directory or a checkpoint root (its `latest`), fp32 or quantized\n"
        "(`mpilm quantize`; linear layers then run on the quantized blocks).\n"
        "Exit status: 0; 1 when the checkpoint, the files or the address are unusable;\n"
        "2 for a usage error.\n");
}

/* Defaults and limits for requests; read-only once serving starts (the HTTP
 * threads read it). */
typedef struct {
    long long def_new, def_k, def_seed, new_limit;
    double def_t, def_p;
    const char *stop;
    gpt_config cfg;
} req_defaults;

/* One request (a batch line or an HTTP body) */
typedef struct {
    serve_line sl;
    int *toks;
    serve_job job;
    int line;      /* batch: 1-based input line */
    int valid;     /* parsed and checked */
    char err[300]; /* why not */
    char *out;     /* the result object (no newline) */
    void *http;    /* reply handle */
} sreq;

static void sreq_clear(sreq *r) {
    serve_line_free(&r->sl);
    serve_job_clear(&r->job);
    free(r->toks), free(r->out);
    r->toks = NULL, r->out = NULL;
}

/* Parses and checks one request; 0, or -1 with the reason in err. */
static int build_request(const req_defaults *d, const char *s, size_t n, sreq *r, char *err,
                         size_t errlen) {
    if (serve_parse_line(s, n, &r->sl, err, errlen)) return -1;
    const serve_line *L = &r->sl;
    if (L->prompt_len == 0) {
        snprintf(err, errlen, "prompt is empty");
        return -1;
    }
    if (L->prompt_len > (size_t)d->cfg.block_size) {
        snprintf(err, errlen, "prompt of %zu tokens is longer than the context of %d",
                 L->prompt_len, d->cfg.block_size);
        return -1;
    }
    if (L->max_new_tokens > d->new_limit) {
        snprintf(err, errlen, "max_new_tokens %lld is over the limit of %lld", L->max_new_tokens,
                 d->new_limit);
        return -1;
    }
    if (!(r->toks = malloc(L->prompt_len * sizeof(int)))) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    for (size_t j = 0; j < L->prompt_len; j++) {
        r->toks[j] = (unsigned char)L->prompt[j];
        if (r->toks[j] >= d->cfg.vocab_size) {
            snprintf(err, errlen, "prompt has bytes outside the vocabulary of %d",
                     d->cfg.vocab_size);
            return -1;
        }
    }
    r->job = (serve_job){
        .prompt = r->toks,
        .n_prompt = (int)L->prompt_len,
        .max_new_tokens = (int)(L->max_new_tokens >= 0 ? L->max_new_tokens : d->def_new),
        .sampling = {.temperature = (float)(L->temperature >= 0 ? L->temperature : d->def_t),
                     .top_k = (int)(L->top_k >= 0 ? L->top_k : d->def_k),
                     .top_p = (float)(L->top_p >= 0 ? L->top_p : d->def_p),
                     .seed = (uint64_t)(L->seed >= 0 ? L->seed : d->def_seed)},
        .stop = L->stop ? L->stop : d->stop,
        .user = r};
    r->valid = 1;
    return 0;
}

/* {"id": ..., "error": ...} for an id (JSON text) and a reason; malloc'ed */
static char *error_object(const char *id, const char *why) {
    char *q = serve_json_quote(why, strlen(why));
    size_t n = (q ? strlen(q) : 0) + strlen(id) + 32;
    char *o = q ? malloc(n) : NULL;
    if (o) snprintf(o, n, "{\"id\": %s, \"error\": %s}", id, q);
    free(q);
    return o;
}

/* The result object of a finished request (no newline); malloc'ed */
static char *result_object(const sreq *r) {
    const serve_job *j = &r->job;
    if (j->failed) return error_object(r->sl.id, j->err);
    char *bytes = malloc((size_t)j->n_tokens + 1), *q = NULL, *o = NULL;
    if (!bytes) return NULL;
    for (int t = 0; t < j->n_tokens; t++)
        bytes[t] = (char)j->tokens[t];
    q = serve_json_quote(bytes, (size_t)j->n_tokens);
    free(bytes);
    size_t n = (q ? strlen(q) : 0) + strlen(r->sl.id) + 400;
    if (q && (o = malloc(n))) {
        double tps = j->decode_ms > 0 ? (j->generated - 1) / (j->decode_ms / 1e3) : 0;
        snprintf(o, n,
                 "{\"id\": %s, \"text\": %s, \"tokens\": %d, \"finish_reason\": \"%s\", "
                 "\"model_step\": %lld, \"timings\": {\"prompt_ms\": %.3f, \"decode_ms\": %.3f, "
                 "\"ttft_ms\": %.3f, \"tokens_per_s\": %.2f}}",
                 r->sl.id, q, j->generated, infer_finish_name(j->finish), j->model_step,
                 j->prompt_ms, j->decode_ms, j->ttft_ms, tps);
    }
    free(q);
    return o;
}

static double pct(double *v, int n, double p) {
    if (n == 0) return 0;
    int k = (int)ceil(p / 100.0 * n) - 1;
    return v[k < 0 ? 0 : k >= n ? n - 1 : k];
}
static int dcmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* What rank 0 counts for the summary line */
typedef struct {
    double *lat, *ttft;
    int n, cap, errors;
    long long gen;
    serve_stats st;
} tally;

static int tally_add(tally *t, const serve_job *j) {
    if (j->failed) {
        t->errors++;
        return 0;
    }
    if (t->n == t->cap) {
        int cap = t->cap ? 2 * t->cap : 256;
        double *a = realloc(t->lat, (size_t)cap * sizeof *a);
        if (!a) return -1;
        t->lat = a;
        double *b = realloc(t->ttft, (size_t)cap * sizeof *b);
        if (!b) return -1;
        t->ttft = b, t->cap = cap;
    }
    t->lat[t->n] = j->latency_ms, t->ttft[t->n++] = j->ttft_ms;
    t->gen += j->generated;
    return 0;
}

static void tally_print(tally *t, int requests, double wall) {
    qsort(t->lat, (size_t)t->n, sizeof(double), dcmp);
    qsort(t->ttft, (size_t)t->n, sizeof(double), dcmp);
    printf("serve: %d requests (%d ok, %d errors) | %lld tokens generated in %.3f s | "
           "%.1f tok/s | mean decode batch %.2f\n",
           requests, t->n, requests - t->n, t->gen, wall, wall > 0 ? t->gen / wall : 0,
           t->st.decode_steps ? (double)t->st.decode_rows / t->st.decode_steps : 0);
    printf("latency ms: p50 %.1f | p90 %.1f | p99 %.1f ; time to first token ms: p50 %.1f "
           "| p90 %.1f | p99 %.1f\n",
           pct(t->lat, t->n, 50), pct(t->lat, t->n, 90), pct(t->lat, t->n, 99),
           pct(t->ttft, t->n, 50), pct(t->ttft, t->n, 90), pct(t->ttft, t->n, 99));
    fflush(stdout);
}

/* ---- batch mode (rank 0 side) ---- */

typedef struct {
    sreq *r;
    int n, submitted, oom, cancelled;
    double t0;
    volatile sig_atomic_t *stop;
    tally t;
} batch_ctx;

static int batch_poll(void *ctx, serve_sched *s) {
    batch_ctx *b = ctx;
    if (b->submitted && *b->stop && !b->cancelled) {
        /* interrupted: the running requests finish, the waiting ones fail */
        b->cancelled = 1;
        int n = serve_sched_cancel_queued(s, "not run: the server got a signal");
        fprintf(stderr,
                "serve: signal %d: %d waiting request(s) cancelled, finishing the running "
                "ones\n",
                (int)*b->stop, n);
    }
    if (b->submitted) return 1;
    b->submitted = 1;
    b->t0 = spmd_now();
    for (int i = 0; i < b->n; i++) {
        sreq *r = &b->r[i];
        if (!r->valid) continue;
        r->job.t_arrival = b->t0;
        r->job.user = r; /* set here: b->r moved while the file was read */
        if (serve_sched_submit(s, &r->job)) {
            snprintf(r->err, sizeof r->err, "line %d: %s", r->line, r->job.err);
            r->valid = 0;
        }
    }
    return 1;
}

static void batch_done(void *ctx, serve_sched *s, serve_job *j) {
    batch_ctx *b = ctx;
    sreq *r = j->user;
    if (j->failed) {
        char e[256];
        snprintf(e, sizeof e, "%s", j->err);
        snprintf(j->err, sizeof j->err, "line %d: %s", r->line, e);
    }
    r->out = result_object(r);
    serve_sched_stats(s, &b->t.st);
    if (!r->out || tally_add(&b->t, j)) b->oom = 1;
    serve_job_clear(j);
}

/* Reads IN (rank 0) into requests; 0 or -1 with err. */
static int batch_read(const char *in, const req_defaults *d, batch_ctx *b, char *err,
                      size_t errlen) {
    FILE *fi = fopen(in, "rb");
    char *text = NULL;
    long len = -1;
    int rc = -1, cap = 0;
    if (!fi) {
        snprintf(err, errlen, "%s: %s", in, strerror(errno));
        return -1;
    }
    if (fseek(fi, 0, SEEK_END) == 0) len = ftell(fi);
    if (len < 0 || len > MAX_INPUT_BYTES || fseek(fi, 0, SEEK_SET) != 0) {
        snprintf(err, errlen, "%s: unreadable or larger than 1 GiB", in);
        goto done;
    }
    if (!(text = malloc((size_t)len + 1)) || fread(text, 1, (size_t)len, fi) != (size_t)len) {
        snprintf(err, errlen, "%s: read failed", in);
        goto done;
    }
    text[len] = 0;
    for (long a = 0, ln = 1; a < len; ln++) {
        char *nl = memchr(text + a, '\n', (size_t)(len - a));
        long e = nl ? nl - text : len;
        size_t n = (size_t)(e - a);
        const char *s = text + a;
        a = e + 1;
        size_t k = 0;
        while (k < n && (s[k] == ' ' || s[k] == '\t' || s[k] == '\r'))
            k++;
        if (k == n) continue; /* blank line: not a request */
        if (b->n == cap) {
            cap = cap ? 2 * cap : 64;
            sreq *nr = realloc(b->r, (size_t)cap * sizeof *nr);
            if (!nr) {
                snprintf(err, errlen, "out of memory for the requests");
                goto done;
            }
            b->r = nr;
        }
        sreq *r = &b->r[b->n++];
        memset(r, 0, sizeof *r);
        r->line = (int)ln;
        char e2[256];
        if (build_request(d, s, n, r, e2, sizeof e2))
            snprintf(r->err, sizeof r->err, "line %d: %s", r->line, e2);
    }
    rc = 0;
done:
    free(text);
    fclose(fi);
    return rc;
}

/* Writes the results in input order; 0 or -1. */
static int batch_write(FILE *fo, const batch_ctx *b) {
    for (int i = 0; i < b->n; i++) {
        const sreq *r = &b->r[i];
        char *o = r->valid ? NULL : error_object(r->sl.id, r->err);
        const char *line = r->valid ? r->out : o;
        int bad = !line || fprintf(fo, "%s\n", line) < 0;
        free(o);
        if (bad) return -1;
    }
    return 0;
}

/* ---- HTTP mode (rank 0 side) ---- */

typedef struct {
    serve_http *h;
    const req_defaults *d;
    volatile sig_atomic_t *stop;
    int closing, quiet;
    long long answered;
    tally t;
    double t0;
} http_ctx;

static void sreq_free(void *ctx, void *req) {
    (void)ctx;
    sreq *r = req;
    if (r) sreq_clear(r);
    free(r);
}

/* Connection thread: body -> request; thread-safe (d is read-only). */
static int http_parse(void *ctx, const char *body, size_t n, void **req, char **reply) {
    http_ctx *c = ctx;
    double t = spmd_now();
    sreq *r = calloc(1, sizeof *r);
    char e[300];
    *req = NULL, *reply = NULL;
    if (!r) return 500;
    if (build_request(c->d, body, n, r, e, sizeof e)) {
        char *o = error_object(r->sl.id ? r->sl.id : "null", e);
        size_t on = o ? strlen(o) : 0;
        if (o && (*reply = malloc(on + 2))) snprintf(*reply, on + 2, "%s\n", o);
        free(o);
        sreq_free(NULL, r);
        return 400;
    }
    r->job.t_arrival = t;
    *req = r;
    return 0;
}

static void http_answer(http_ctx *c, sreq *r, int status) {
    char *o =
        r->job.failed || status != 200 ? error_object(r->sl.id, r->job.err) : result_object(r);
    size_t n = o ? strlen(o) : 0;
    char *line = o ? malloc(n + 2) : NULL;
    if (line) snprintf(line, n + 2, "%s\n", o);
    int ok = status == 200 && !r->job.failed && line;
    serve_http_reply(c->h, r->http, line ? status : 500,
                     line ? line : "{\"error\": \"out of memory\"}\n", ok, r->job.generated,
                     r->job.latency_ms / 1e3);
    c->answered++;
    free(o), free(line);
    sreq_free(NULL, r);
}

static int http_poll(void *ctx, serve_sched *s) {
    http_ctx *c = ctx;
    serve_stats st;
    serve_sched_stats(s, &st);
    serve_http_publish(c->h, &st);
    if (*c->stop && !c->closing) {
        c->closing = 1;
        serve_http_quiesce(c->h);
        if (!c->quiet)
            fprintf(stderr,
                    "serve: signal %d: no new connections; answering the %lld queued and %lld "
                    "running requests\n",
                    (int)*c->stop, st.queued, st.running);
    }
    void *hd;
    sreq *r;
    while ((r = serve_http_take(c->h, &hd))) {
        r->http = hd;
        if (serve_sched_submit(s, &r->job)) http_answer(c, r, 400);
    }
    return c->closing && serve_http_try_close(c->h);
}

static void http_done(void *ctx, serve_sched *s, serve_job *j) {
    http_ctx *c = ctx;
    serve_sched_stats(s, &c->t.st);
    tally_add(&c->t, j);
    http_answer(c, j->user, j->failed ? 500 : 200);
}

int serve_main(int argc, char **argv, MPI_Comm comm, volatile sig_atomic_t *stop_flag) {
    int rank, P, o;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &P);
    const char *ckpt = NULL, *in = NULL, *outp = NULL, *http = NULL;
    req_defaults d = {.def_new = 64, .new_limit = 1024, .def_p = 1};
    long long max_req_bytes = 1 << 20;
    double kv_mb = 0, watch_s = 2;
    int maxb = 8, quiet = 0, watch = 0;
    enum { O_HTTP = 256, O_KV, O_MAXREQ, O_NEWLIM, O_WATCH, O_WATCHS };
    static const struct option opts[] = {{"ckpt", required_argument, 0, 'c'},
                                         {"prompts", required_argument, 0, 'i'},
                                         {"out", required_argument, 0, 'o'},
                                         {"http", required_argument, 0, O_HTTP},
                                         {"max-new-tokens", required_argument, 0, 'n'},
                                         {"temperature", required_argument, 0, 't'},
                                         {"top-k", required_argument, 0, 'k'},
                                         {"top-p", required_argument, 0, 'p'},
                                         {"seed", required_argument, 0, 's'},
                                         {"stop", required_argument, 0, 'S'},
                                         {"max-batch", required_argument, 0, 'b'},
                                         {"kv-budget-mb", required_argument, 0, O_KV},
                                         {"max-request-bytes", required_argument, 0, O_MAXREQ},
                                         {"max-new-tokens-limit", required_argument, 0, O_NEWLIM},
                                         {"watch", no_argument, 0, O_WATCH},
                                         {"watch-interval", required_argument, 0, O_WATCHS},
                                         {"quiet", no_argument, 0, 'q'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    optind = 1;
    int bad = 0;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        char *end = NULL;
        errno = 0;
        switch (o) {
        case 'c':
            ckpt = optarg;
            break;
        case 'i':
            in = optarg;
            break;
        case 'o':
            outp = optarg;
            break;
        case O_HTTP:
            http = optarg;
            break;
        case 'n':
            d.def_new = strtoll(optarg, &end, 10);
            bad |= *end || d.def_new < 1 || d.def_new > MAX_NEW_LIMIT;
            break;
        case 't':
            d.def_t = strtod(optarg, &end);
            bad |= *end || !(d.def_t >= 0 && d.def_t <= 100);
            break;
        case 'k':
            d.def_k = strtoll(optarg, &end, 10);
            bad |= *end || d.def_k < 0 || d.def_k > INT_MAX;
            break;
        case 'p':
            d.def_p = strtod(optarg, &end);
            bad |= *end || !(d.def_p > 0 && d.def_p <= 1);
            break;
        case 's':
            d.def_seed = strtoll(optarg, &end, 10);
            bad |= *end || d.def_seed < 0 || errno;
            break;
        case 'S':
            d.stop = optarg;
            bad |= !*optarg;
            break;
        case 'b':
            maxb = (int)strtol(optarg, &end, 10);
            bad |= *end || maxb < 1 || maxb > 4096;
            break;
        case O_KV:
            kv_mb = strtod(optarg, &end);
            bad |= *end || !(kv_mb > 0 && kv_mb < 1e9);
            break;
        case O_MAXREQ:
            max_req_bytes = strtoll(optarg, &end, 10);
            bad |= *end || max_req_bytes < 2 || max_req_bytes > MAX_INPUT_BYTES;
            break;
        case O_NEWLIM:
            d.new_limit = strtoll(optarg, &end, 10);
            bad |= *end || d.new_limit < 1 || d.new_limit > MAX_NEW_LIMIT;
            break;
        case O_WATCH:
            watch = 1;
            break;
        case O_WATCHS:
            watch_s = strtod(optarg, &end);
            bad |= *end || !(watch_s >= 0.05 && watch_s <= 86400);
            break;
        case 'q':
            quiet = 1;
            break;
        case 'h':
            if (rank == 0) usage(stdout);
            return 0;
        default:
            bad = 1;
        }
    }
    int batch = in || outp;
    const char *why = bad                       ? "an option value is out of range"
                      : !ckpt                   ? "--ckpt is required"
                      : batch && http           ? "--prompts/--out and --http exclude each other"
                      : batch && !(in && outp)  ? "--prompts and --out go together"
                      : !batch && !http         ? "give --prompts IN --out OUT or --http HOST:PORT"
                      : d.def_new > d.new_limit ? "--max-new-tokens is over --max-new-tokens-limit"
                      : optind != argc          ? "unexpected argument"
                                                : NULL;
    if (why) {
        if (rank == 0) {
            fprintf(stderr, PROG ": %s\n", why);
            usage(stderr);
        }
        return 2;
    }
    kern_set_threads(spmd_threads_per_rank(comm));
    char err[1024] = "", file[4200];
    gpt *g = NULL;
    ckpt_meta meta = {0};
    batch_ctx bc = {.stop = stop_flag};
    http_ctx hc = {.d = &d, .stop = stop_flag, .quiet = quiet};
    FILE *fo = NULL;
    int rc = 1;

    /* 1. model, on every rank (the scheduler drops rank 0's when P > 1) */
    double tl = spmd_now();
    int lrc = ckpt_resolve(ckpt, file, sizeof file, err, sizeof err);
    if (!lrc && watch) {
        char latest[4300];
        struct stat stt;
        snprintf(latest, sizeof latest, "%s/latest", ckpt);
        if (stat(latest, &stt) != 0) {
            snprintf(err, sizeof err, "--watch: %s is not a checkpoint root (no `latest`)", ckpt);
            lrc = -1;
        }
    }
    if (spmd_agree(comm, lrc, PROG, err)) goto done;
    if (spmd_agree(comm, gptio_open(comm, file, &g, &meta, err, sizeof err), PROG, err)) goto done;
    d.cfg = *gpt_cfg(g);
    size_t budget = kv_mb > 0 ? (size_t)(kv_mb * 1048576.0)
                              : (size_t)maxb * infer_kv_need(&d.cfg, d.cfg.block_size, 1);
    if (rank == 0 && !quiet)
        fprintf(stderr,
                PROG ": %s (step %lld): %d layers, %d embd, context %d; %s; %d rank(s), %d "
                     "replica(s) x %d slots, KV budget %.2f MiB/replica (%.3f MiB per full-context "
                     "sequence); loaded in %.2f s\n",
                file, meta.step, d.cfg.n_layer, d.cfg.n_embd, d.cfg.block_size,
                qckpt_is_quantized(file) > 0 ? "quantized linear layers" : "fp32", P,
                P > 1 ? P - 1 : 1, maxb, budget / 1048576.0,
                infer_kv_need(&d.cfg, d.cfg.block_size, 1) / 1048576.0, spmd_now() - tl);

    /* 2. rank 0: the requests' source and the results' destination */
    int src_rc = 0;
    if (rank == 0 && batch) {
        src_rc = batch_read(in, &d, &bc, err, sizeof err);
        if (!src_rc && !(fo = fopen(outp, "wb"))) {
            snprintf(err, sizeof err, "%s: %s", outp, strerror(errno));
            src_rc = -1;
        }
    } else if (rank == 0) {
        serve_http_opts ho = {.max_request_bytes = (size_t)max_req_bytes,
                              .ranks = P,
                              .parse = http_parse,
                              .free_req = sreq_free,
                              .ctx = &hc};
        char url[512];
        src_rc = serve_http_start(http, &ho, &hc.h, url, sizeof url, err, sizeof err);
        if (!src_rc) {
            serve_stats st = {.model_step = meta.step, .replicas = P > 1 ? P - 1 : 1};
            snprintf(st.model, sizeof st.model, "%s", file);
            serve_http_publish(hc.h, &st);
            printf("serve: listening on %s\n", url);
            printf("serve: rank 0 is pid %d (SIGTERM/SIGINT: finish and exit)\n", (int)getpid());
            fflush(stdout);
        }
    }
    if (spmd_agree(comm, src_rc, PROG, err)) goto done;

    /* 3. serve */
    serve_sched_opts so = {.max_batch = maxb,
                           .kv_budget = budget,
                           .watch = watch ? ckpt : NULL,
                           .watch_interval = watch_s,
                           .quiet = quiet};
    serve_sched_hooks hk = batch ? (serve_sched_hooks){batch_poll, batch_done, &bc}
                                 : (serve_sched_hooks){http_poll, http_done, &hc};
    hc.t0 = spmd_now();
    int run_rc = serve_sched_run(comm, g, file, meta.step, &so, &hk, err, sizeof err);
    g = NULL;              /* taken over */
    if (run_rc) goto done; /* agreed inside */

    /* 4. rank 0: results and summary */
    int werr = 0;
    if (rank == 0 && batch) {
        double wall = spmd_now() - bc.t0;
        werr = bc.oom || batch_write(fo, &bc);
        if (fclose(fo) != 0) werr = 1;
        fo = NULL;
        if (werr)
            snprintf(err, sizeof err, "%s: cannot write the results", outp);
        else if (!quiet) {
            bc.t.errors = 0;
            tally_print(&bc.t, bc.n, wall);
        }
        if (!werr && bc.cancelled) {
            snprintf(err, sizeof err,
                     "interrupted by a signal: the requests not run have error lines in %s", outp);
            werr = 1;
        }
    } else if (rank == 0) {
        serve_http_stop(hc.h);
        hc.h = NULL;
        if (!quiet) tally_print(&hc.t, (int)hc.answered, spmd_now() - hc.t0);
    }
    if (spmd_agree(comm, werr ? -1 : 0, PROG, err)) goto done;
    rc = 0;
done:
    if (fo) fclose(fo);
    for (int i = 0; i < bc.n; i++)
        sreq_clear(&bc.r[i]);
    free(bc.r);
    free(bc.t.lat), free(bc.t.ttft), free(hc.t.lat), free(hc.t.ttft);
    serve_http_stop(hc.h);
    free(meta.config);
    gpt_destroy(g);
    return rc;
}
