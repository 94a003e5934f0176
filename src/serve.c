/* serve: `mpilm serve --prompts IN.jsonl --out OUT.jsonl` (see serve.h).
 *
 * Rank 0 reads IN.jsonl and broadcasts it; every rank parses the same lines
 * the same way, so they agree on the valid requests without more messages;
 * valid request k runs on rank k % P (round-robin hand-out), each rank runs
 * its own continuous-batching loop on a full model replica, and rank 0
 * gathers the result lines and writes them in input order. A request's text
 * depends only on the request and its seed, not on the rank count or on the
 * other requests in the batch (src/infer.h).
 */
#include "src/serve.h"

#include "io/ckpt.h"
#include "io/qckpt.h"
#include "kernels/kern.h"
#include "src/gptio.h"
#include "src/infer.h"
#include "src/spmd.h"

#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
static char *json_quote(const char *s, size_t n) {
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
                L->id = json_quote(sval, slen);
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
                    L->id = json_quote(v, vl);
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
        "usage: mpilm serve --ckpt CKPT --prompts IN.jsonl --out OUT.jsonl\n"
        "                   [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]\n"
        "                   [--seed S] [--stop STR] [--max-batch B] [--quiet]\n\n"
        "Generates text for every request of IN.jsonl, one JSON object a line:\n"
        "  {\"id\": ..., \"prompt\": \"...\", \"max_new_tokens\": N, \"temperature\": T,\n"
        "   \"top_k\": K, \"top_p\": P, \"seed\": S, \"stop\": \"...\"}  (only prompt required;\n"
        "the options give the defaults: 64 tokens, greedy (T 0), top-k off (0), top-p off\n"
        "(1), seed 0). OUT.jsonl gets one line per request, in input order:\n"
        "  {\"id\", \"text\", \"tokens\", \"finish_reason\", \"timings\": {\"prompt_ms\",\n"
        "   \"decode_ms\", \"ttft_ms\", \"tokens_per_s\"}}\n"
        "or {\"id\", \"error\"} for a bad line (the others still run). Text is bytes (byte\n"
        "tokenizer); bytes that are not valid UTF-8 are written as U+FFFD.\n"
        "CKPT: a step directory or a checkpoint root (its `latest`), fp32 or quantized\n"
        "(`mpilm quantize`; linear layers then run on the quantized blocks).\n"
        "Each rank holds a model replica and runs up to B (default 8) sequences at once\n"
        "(continuous batching); rank 0 hands requests out round-robin. The texts do not\n"
        "depend on the rank count or on the batch.\n");
}

typedef struct {
    int line;  /* 1-based input line */
    int valid; /* request index among valid ones, or -1 */
    serve_line sl;
    char err[300];
} in_line;

static double pct(double *v, int n, double p) {
    if (n == 0) return 0;
    int k = (int)ceil(p / 100.0 * n) - 1;
    return v[k < 0 ? 0 : k >= n ? n - 1 : k];
}
static int dcmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Appends to a growing byte buffer. */
typedef struct {
    char *b;
    size_t n, cap;
} sbuf;
static int sb_put(sbuf *s, const void *p, size_t n) {
    if (s->n + n + 1 > s->cap) {
        size_t c = (s->cap ? s->cap * 2 : 4096);
        while (c < s->n + n + 1)
            c *= 2;
        char *nb = realloc(s->b, c);
        if (!nb) return -1;
        s->b = nb, s->cap = c;
    }
    memcpy(s->b + s->n, p, n);
    s->n += n;
    s->b[s->n] = 0;
    return 0;
}

/* record shipped to rank 0 per request */
typedef struct {
    int line, generated;
    double latency_ms, ttft_ms;
    int len; /* bytes of JSON that follow */
} rec_hdr;

int serve_main(int argc, char **argv, MPI_Comm comm) {
    int rank, P, o;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &P);
    const char *ckpt = NULL, *in = NULL, *outp = NULL, *stop = NULL;
    long long def_new = 64, def_k = 0, def_seed = 0;
    double def_t = 0, def_p = 1;
    int maxb = 8, quiet = 0;
    static const struct option opts[] = {{"ckpt", required_argument, 0, 'c'},
                                         {"prompts", required_argument, 0, 'i'},
                                         {"out", required_argument, 0, 'o'},
                                         {"max-new-tokens", required_argument, 0, 'n'},
                                         {"temperature", required_argument, 0, 't'},
                                         {"top-k", required_argument, 0, 'k'},
                                         {"top-p", required_argument, 0, 'p'},
                                         {"seed", required_argument, 0, 's'},
                                         {"stop", required_argument, 0, 'S'},
                                         {"max-batch", required_argument, 0, 'b'},
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
        case 'n':
            def_new = strtoll(optarg, &end, 10);
            bad |= *end || def_new < 1 || def_new > MAX_NEW_LIMIT;
            break;
        case 't':
            def_t = strtod(optarg, &end);
            bad |= *end || !(def_t >= 0 && def_t <= 100);
            break;
        case 'k':
            def_k = strtoll(optarg, &end, 10);
            bad |= *end || def_k < 0 || def_k > INT_MAX;
            break;
        case 'p':
            def_p = strtod(optarg, &end);
            bad |= *end || !(def_p > 0 && def_p <= 1);
            break;
        case 's':
            def_seed = strtoll(optarg, &end, 10);
            bad |= *end || def_seed < 0 || errno;
            break;
        case 'S':
            stop = optarg;
            bad |= !*optarg;
            break;
        case 'b':
            maxb = (int)strtol(optarg, &end, 10);
            bad |= *end || maxb < 1 || maxb > 4096;
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
    if (bad || optind != argc || !ckpt || !in || !outp) {
        if (rank == 0) {
            if (bad) fprintf(stderr, PROG ": an option value is out of range\n");
            usage(stderr);
        }
        return 2;
    }
    kern_set_threads(spmd_threads_per_rank(comm));
    char err[1024] = "", file[4200];
    gpt *g = NULL;
    ckpt_meta meta = {0};
    infer_engine *e = NULL;
    char *text = NULL;
    in_line *lines = NULL;
    int nlines = 0, rc = 1, nm = 0;
    infer_request *rq = NULL;
    infer_result *rs = NULL;
    int *toks = NULL, *ridx = NULL;
    sbuf mine = {0};
    char *all = NULL;
    int *counts = NULL, *displs = NULL;
    FILE *fo = NULL;

    /* 1. model (fp32 floats for everything; quantized blocks for the linears) */
    double tl = spmd_now();
    if (spmd_agree(comm, gptio_open(comm, ckpt, &g, &meta, err, sizeof err), PROG, err)) goto done;
    int lrc = ckpt_resolve(ckpt, file, sizeof file, err, sizeof err), nq = 0;
    if (!lrc) lrc = infer_create(g, maxb, &e, err, sizeof err);
    if (!lrc && qckpt_is_quantized(file) > 0) lrc = infer_load_quant(e, file, &nq, err, sizeof err);
    if (spmd_agree(comm, lrc, PROG, err)) goto done;
    const gpt_config *cfg = gpt_cfg(g);
    if (rank == 0 && !quiet)
        fprintf(stderr,
                PROG ": %s (step %lld): %d layers, %d embd, context %d; %s; %d rank(s) x %d slots, "
                     "KV cache %.1f MiB/rank; loaded in %.2f s\n",
                file, meta.step, cfg->n_layer, cfg->n_embd, cfg->block_size,
                nq ? "quantized linear layers" : "fp32", P, maxb, infer_kv_bytes(e) / 1048576.0,
                spmd_now() - tl);

    /* 2. requests: rank 0 reads, everyone parses the same bytes */
    long long len = 0;
    if (rank == 0) {
        FILE *fi = fopen(in, "rb");
        if (!fi) {
            snprintf(err, sizeof err, "%s: %s", in, strerror(errno));
            len = -1;
        } else {
            fseek(fi, 0, SEEK_END);
            len = ftell(fi);
            fseek(fi, 0, SEEK_SET);
            if (len < 0 || len > MAX_INPUT_BYTES) {
                snprintf(err, sizeof err, "%s: unreadable or larger than 1 GiB", in);
                len = -1;
            } else if (!(text = malloc((size_t)len + 1)) ||
                       fread(text, 1, (size_t)len, fi) != (size_t)len) {
                snprintf(err, sizeof err, "%s: read failed", in);
                len = -1;
            }
            fclose(fi);
        }
        if (len >= 0) {
            fo = fopen(outp, "wb");
            if (!fo) {
                snprintf(err, sizeof err, "%s: %s", outp, strerror(errno));
                len = -1;
            }
        }
    }
    MPI_Bcast(&len, 1, MPI_LONG_LONG, 0, comm);
    if (spmd_agree(comm, len < 0 ? -1 : 0, PROG, err)) goto done;
    if (rank != 0 && !(text = malloc((size_t)len + 1))) len = -1;
    if (spmd_agree(comm, len < 0 ? -1 : 0, PROG, "out of memory for the requests")) goto done;
    MPI_Bcast(text, (int)len, MPI_CHAR, 0, comm);
    text[len] = 0;
    int cap = 0, nvalid = 0;
    for (long long a = 0, ln = 1; a < len; ln++) {
        char *nl = memchr(text + a, '\n', (size_t)(len - a));
        long long b = nl ? nl - text : len;
        size_t n = (size_t)(b - a);
        const char *s = text + a;
        a = b + 1;
        size_t k = 0;
        while (k < n && (s[k] == ' ' || s[k] == '\t' || s[k] == '\r'))
            k++;
        if (k == n) continue; /* blank line: not a request */
        if (nlines == cap) {
            cap = cap ? 2 * cap : 64;
            in_line *nl2 = realloc(lines, (size_t)cap * sizeof *lines);
            if (!nl2) goto oom;
            lines = nl2;
        }
        in_line *L = &lines[nlines++];
        memset(L, 0, sizeof *L);
        L->line = (int)ln;
        L->valid = -1;
        char e2[256];
        if (serve_parse_line(s, n, &L->sl, e2, sizeof e2)) {
            snprintf(L->err, sizeof L->err, "line %d: %s", L->line, e2);
            continue;
        }
        if (L->sl.prompt_len == 0) {
            snprintf(L->err, sizeof L->err, "line %d: prompt is empty", L->line);
            continue;
        }
        if (L->sl.prompt_len > (size_t)cfg->block_size) {
            snprintf(L->err, sizeof L->err,
                     "line %d: prompt of %zu tokens is longer than the context of %d", L->line,
                     L->sl.prompt_len, cfg->block_size);
            continue;
        }
        int vbad = 0;
        for (size_t j = 0; j < L->sl.prompt_len; j++)
            vbad |= (unsigned char)L->sl.prompt[j] >= (unsigned)cfg->vocab_size;
        if (vbad) {
            snprintf(L->err, sizeof L->err,
                     "line %d: prompt has bytes outside the vocabulary of %d", L->line,
                     cfg->vocab_size);
            continue;
        }
        L->valid = nvalid++;
    }

    /* 3. this rank's requests: valid ones with index % P == rank */
    for (int i = 0; i < nlines; i++)
        nm += lines[i].valid >= 0 && lines[i].valid % P == rank;
    rq = calloc((size_t)nm + 1, sizeof *rq);
    rs = calloc((size_t)nm + 1, sizeof *rs);
    ridx = calloc((size_t)nm + 1, sizeof *ridx);
    size_t ntok = 0;
    for (int i = 0; i < nlines; i++)
        if (lines[i].valid >= 0 && lines[i].valid % P == rank) ntok += lines[i].sl.prompt_len;
    toks = malloc((ntok + 1) * sizeof(int));
    if (!rq || !rs || !ridx || !toks) goto oom;
    nm = 0;
    ntok = 0;
    for (int i = 0; i < nlines; i++) {
        serve_line *s = &lines[i].sl;
        if (lines[i].valid < 0 || lines[i].valid % P != rank) continue;
        for (size_t j = 0; j < s->prompt_len; j++)
            toks[ntok + j] = (unsigned char)s->prompt[j];
        rq[nm] = (infer_request){
            .prompt = toks + ntok,
            .n_prompt = (int)s->prompt_len,
            .max_new_tokens = (int)(s->max_new_tokens >= 0 ? s->max_new_tokens : def_new),
            .sampling = {.temperature = (float)(s->temperature >= 0 ? s->temperature : def_t),
                         .top_k = (int)(s->top_k >= 0 ? s->top_k : def_k),
                         .top_p = (float)(s->top_p >= 0 ? s->top_p : def_p),
                         .seed = (uint64_t)(s->seed >= 0 ? s->seed : def_seed)},
            .stop = s->stop ? s->stop : stop};
        ntok += s->prompt_len;
        ridx[nm++] = i;
    }

    /* 4. run */
    MPI_Barrier(comm);
    double t0 = spmd_now();
    int run_rc = infer_run(e, rq, nm, rs, maxb, t0);
    double t_local = spmd_now() - t0;
    if (spmd_agree(comm, run_rc, PROG, "inference failed (out of memory?)")) goto done;
    long long st[2], sta[2];
    infer_batch_stats(e, &st[0], &st[1]);
    MPI_Reduce(st, sta, 2, MPI_LONG_LONG, MPI_SUM, 0, comm);

    /* 5. results as records to rank 0 */
    for (int j = 0; j < nm; j++) {
        infer_result *r = &rs[j];
        serve_line *s = &lines[ridx[j]].sl;
        char *bytes = malloc((size_t)r->n_tokens + 1), *q = NULL, *lb = NULL;
        if (!bytes) goto oom;
        for (int t = 0; t < r->n_tokens; t++)
            bytes[t] = (char)r->tokens[t];
        q = json_quote(bytes, (size_t)r->n_tokens);
        free(bytes);
        size_t lbn = (q ? strlen(q) : 0) + strlen(s->id) + 400;
        lb = malloc(lbn);
        if (!q || !lb) {
            free(q), free(lb);
            goto oom;
        }
        double tps = r->decode_ms > 0 ? (r->generated - 1) / (r->decode_ms / 1e3) : 0;
        int m =
            snprintf(lb, lbn,
                     "{\"id\": %s, \"text\": %s, \"tokens\": %d, \"finish_reason\": \"%s\", "
                     "\"timings\": {\"prompt_ms\": %.3f, \"decode_ms\": %.3f, \"ttft_ms\": %.3f, "
                     "\"tokens_per_s\": %.2f}}\n",
                     s->id, q, r->generated, infer_finish_name(r->finish), r->prompt_ms,
                     r->decode_ms, r->ttft_ms, tps);
        rec_hdr h = {lines[ridx[j]].line, r->generated, r->latency_ms, r->ttft_ms, m};
        int prc = sb_put(&mine, &h, sizeof h) || sb_put(&mine, lb, (size_t)m);
        free(q), free(lb);
        if (prc) goto oom;
    }
    if (mine.n > INT_MAX) goto oom;
    int my = (int)mine.n;
    if (rank == 0) {
        counts = malloc((size_t)P * sizeof(int));
        displs = malloc((size_t)P * sizeof(int));
    }
    MPI_Gather(&my, 1, MPI_INT, counts, 1, MPI_INT, 0, comm);
    long long tot = 0;
    if (rank == 0) {
        for (int r = 0; r < P; r++) {
            displs[r] = (int)tot;
            tot += counts[r];
        }
        if (tot > INT_MAX) {
            fprintf(stderr, PROG ": results larger than 2 GiB\n");
            tot = 0; /* gathered nothing; the output will miss lines */
        }
        all = malloc((size_t)tot + 1);
    }
    MPI_Gatherv(mine.b, my, MPI_CHAR, all, counts, displs, MPI_CHAR, 0, comm);

    /* 6. rank 0: in input order, then the summary */
    int werr = 0;
    if (rank == 0) {
        double wall = spmd_now() - t0;
        char **out = calloc((size_t)nlines + 1, sizeof *out);
        int *outlen = calloc((size_t)nlines + 1, sizeof *outlen), nres = 0;
        double *lat = malloc(((size_t)nvalid + 1) * sizeof(double)),
               *ttft = malloc(((size_t)nvalid + 1) * sizeof(double));
        long long gen = 0;
        int errors = 0;
        if (!out || !outlen || !lat || !ttft) werr = 1;
        /* line number -> index in lines[] (lines are increasing) */
        for (long long off = 0; !werr && off < tot;) {
            rec_hdr h;
            memcpy(&h, all + off, sizeof h);
            off += sizeof h;
            int lo = 0, hi = nlines - 1;
            while (lo < hi) {
                int mid = (lo + hi) / 2;
                if (lines[mid].line < h.line)
                    lo = mid + 1;
                else
                    hi = mid;
            }
            out[lo] = all + off;
            outlen[lo] = h.len;
            off += h.len;
            lat[nres] = h.latency_ms, ttft[nres++] = h.ttft_ms;
            gen += h.generated;
        }
        for (int i = 0; !werr && i < nlines; i++) {
            if (lines[i].valid < 0) {
                errors++;
                char *q = json_quote(lines[i].err, strlen(lines[i].err));
                if (!q || fprintf(fo, "{\"id\": %s, \"error\": %s}\n", lines[i].sl.id, q) < 0)
                    werr = 1;
                free(q);
            } else if (!out[i]) {
                werr = 1;
            } else if (fwrite(out[i], 1, (size_t)outlen[i], fo) != (size_t)outlen[i])
                werr = 1;
        }
        if (fclose(fo) != 0) werr = 1;
        fo = NULL;
        if (werr)
            snprintf(err, sizeof err, "%s: cannot write the results", outp);
        else if (!quiet) {
            qsort(lat, (size_t)nres, sizeof(double), dcmp);
            qsort(ttft, (size_t)nres, sizeof(double), dcmp);
            printf("serve: %d requests (%d ok, %d errors) | %lld tokens generated in %.3f s | "
                   "%.1f tok/s | mean decode batch %.2f\n",
                   nlines, nres, errors, gen, wall, wall > 0 ? gen / wall : 0,
                   sta[0] ? (double)sta[1] / sta[0] : 0);
            printf("latency ms: p50 %.1f | p90 %.1f | p99 %.1f ; time to first token ms: p50 %.1f "
                   "| p90 %.1f | p99 %.1f\n",
                   pct(lat, nres, 50), pct(lat, nres, 90), pct(lat, nres, 99), pct(ttft, nres, 50),
                   pct(ttft, nres, 90), pct(ttft, nres, 99));
        }
        (void)t_local;
        free(out), free(outlen), free(lat), free(ttft);
    }
    if (spmd_agree(comm, werr ? -1 : 0, PROG, err)) goto done;
    rc = 0;
    goto done;
oom:
    /* reached by a rank alone; the others would block in the next collective,
     * so stop everything */
    fprintf(stderr, PROG ": rank %d: out of memory\n", rank);
    MPI_Abort(comm, 1);
done:
    if (fo) fclose(fo);
    for (int i = 0; i < nlines; i++)
        serve_line_free(&lines[i].sl);
    free(lines);
    if (rs)
        for (int j = 0; j < nm; j++)
            infer_result_free(&rs[j]);
    free(rs);
    free(rq), free(ridx), free(toks), free(text), free(mine.b), free(all), free(counts),
        free(displs);
    free(meta.config);
    infer_destroy(e);
    gpt_destroy(g);
    return rc;
}
