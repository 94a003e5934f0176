/* config: one schema table drives parsing, overrides, defaults, printing. */
#include "src/config.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <yaml.h>

typedef enum { K_INT, K_FLOAT, K_BOOL, K_STR, K_ENUM, K_BW, K_TIME } key_type;

typedef struct {
    const char *key;
    key_type type;
    size_t off, size;    /* size: for strings */
    const char *def;     /* default as text; NULL = required */
    double lo, hi;       /* numeric range */
    const char *choices; /* K_ENUM: "a|b|c" */
} key_spec;

#define O(f) offsetof(job_config, f)
#define S(f) sizeof(((job_config *)0)->f)
#define BIG 1e18
static const key_spec schema[] = {
    {"model.n_layer", K_INT, O(model.n_layer), 0, NULL, 1, 1024, NULL},
    {"model.n_head", K_INT, O(model.n_head), 0, NULL, 1, 1024, NULL},
    {"model.n_embd", K_INT, O(model.n_embd), 0, NULL, 1, 65536, NULL},
    {"model.block_size", K_INT, O(model.block_size), 0, NULL, 1, 65536, NULL},
    {"model.vocab_size", K_INT, O(model.vocab_size), 0, "256", 2, 1 << 24, NULL},
    {"data.dir", K_STR, O(data.dir), S(data.dir), NULL, 0, 0, NULL},
    {"train.steps", K_INT, O(train.steps), 0, NULL, 0, 1e9, NULL},
    {"train.micro_batch", K_INT, O(train.micro_batch), 0, NULL, 1, 1 << 20, NULL},
    {"train.global_batch", K_INT, O(train.global_batch), 0, NULL, 1, 1 << 30, NULL},
    {"train.lr", K_FLOAT, O(train.lr), 0, NULL, 0, 10, NULL},
    {"train.min_lr", K_FLOAT, O(train.min_lr), 0, "0", 0, 10, NULL},
    {"train.warmup", K_INT, O(train.warmup), 0, "0", 0, 1e9, NULL},
    {"train.schedule", K_ENUM, O(train.schedule), S(train.schedule), "cosine", 0, 0,
     "cosine|linear|constant"},
    {"train.weight_decay", K_FLOAT, O(train.weight_decay), 0, "0.1", 0, 10, NULL},
    {"train.grad_clip", K_FLOAT, O(train.grad_clip), 0, "1.0", 0, BIG, NULL},
    {"train.beta1", K_FLOAT, O(train.beta1), 0, "0.9", 0, 0.999999, NULL},
    {"train.beta2", K_FLOAT, O(train.beta2), 0, "0.95", 0, 0.999999, NULL},
    {"train.eps", K_FLOAT, O(train.eps), 0, "1e-8", 0, 1, NULL},
    {"train.seed", K_INT, O(train.seed), 0, "1337", 0, 2147483647, NULL},
    {"train.eval_every", K_INT, O(train.eval_every), 0, "0", 0, 1e9, NULL},
    {"train.eval_batches", K_INT, O(train.eval_batches), 0, "8", 1, 1e9, NULL},
    {"train.precision", K_ENUM, O(train.precision), S(train.precision), "fp32", 0, 0, "fp32"},
    {"train.recompute", K_BOOL, O(train.recompute), 0, "false", 0, 0, NULL},
    {"parallel.tp", K_INT, O(parallel.tp), 0, "1", 1, 4096, NULL},
    {"parallel.pp", K_INT, O(parallel.pp), 0, "1", 1, 4096, NULL},
    {"parallel.microbatches", K_INT, O(parallel.microbatches), 0, "0", 0, 1 << 20, NULL},
    {"comm.strategy", K_ENUM, O(comm.strategy), S(comm.strategy), "mpi", 0, 0,
     "adaptive|mpi|ring|recursive_doubling|rabenseifner|tree|parameter_server|hierarchical"},
    {"comm.thresholds.bandwidth", K_BW, O(comm.bw_threshold), 0, "10GB/s", 0, BIG, NULL},
    {"comm.thresholds.latency", K_TIME, O(comm.lat_threshold), 0, "1ms", 0, BIG, NULL},
    {"comm.fallback", K_ENUM, O(comm.fallback), S(comm.fallback), "parameter_server", 0, 0,
     "none|mpi|ring|recursive_doubling|rabenseifner|tree|parameter_server|hierarchical"},
    {"comm.bucket_mb", K_FLOAT, O(comm.bucket_mb), 0, "25", 0, 1e6, NULL},
    {"comm.overlap", K_BOOL, O(comm.overlap), 0, "false", 0, 0, NULL},
    {"comm.ps_ranks", K_INT, O(comm.ps_ranks), 0, "0", 0, 4096, NULL},
    {"comm.compression.type", K_ENUM, O(comm.compression.type), S(comm.compression.type), "none", 0,
     0, "none|fp16|bf16|int|int8|int4|int2|topk|powersgd"},
    {"comm.compression.ratio", K_FLOAT, O(comm.compression.ratio), 0, "0.01", 0, 1, NULL},
    {"comm.compression.min_ratio", K_FLOAT, O(comm.compression.min_ratio), 0, "1.5", 1, BIG, NULL},
    {"comm.compression.bits", K_INT, O(comm.compression.bits), 0, "8", 2, 16, NULL},
    {"comm.compression.rank", K_INT, O(comm.compression.rank), 0, "4", 1, 1024, NULL},
    {"comm.compression.error_feedback", K_BOOL, O(comm.compression.error_feedback), 0, "true", 0, 0,
     NULL},
    {"comm.compression.warmup_steps", K_INT, O(comm.compression.warmup_steps), 0, "50", 0, 1e9,
     NULL},
    {"comm.compression.payload", K_ENUM, O(comm.compression.payload), S(comm.compression.payload),
     "auto", 0, 0, "auto|update|gradient"},
    {"checkpoint.dir", K_STR, O(checkpoint.dir), S(checkpoint.dir), "", 0, 0, NULL},
    {"checkpoint.every", K_INT, O(checkpoint.every), 0, "0", 0, 1e9, NULL},
    {"checkpoint.keep_last", K_INT, O(checkpoint.keep_last), 0, "3", 0, 1e9, NULL},
    {"checkpoint.keep_every", K_INT, O(checkpoint.keep_every), 0, "0", 0, 1e9, NULL},
    {"checkpoint.async", K_BOOL, O(checkpoint.async), 0, "false", 0, 0, NULL},
    {"checkpoint.resume", K_ENUM, O(checkpoint.resume), S(checkpoint.resume), "auto", 0, 0,
     "auto|never"},
    {"log.dir", K_STR, O(log.dir), S(log.dir), "", 0, 0, NULL},
    {"log.every", K_INT, O(log.every), 0, "1", 1, 1e9, NULL},
};
#undef O
#undef S
#define NKEYS ((int)(sizeof schema / sizeof schema[0]))
_Static_assert(NKEYS <= 64, "job_config.origin too small");

static int find_key(const char *key) {
    for (int i = 0; i < NKEYS; i++)
        if (strcmp(schema[i].key, key) == 0) return i;
    return -1;
}

/* Is prefix a section ("comm", "comm.thresholds") of some key? */
static int is_section(const char *prefix) {
    size_t n = strlen(prefix);
    for (int i = 0; i < NKEYS; i++)
        if (strncmp(schema[i].key, prefix, n) == 0 && schema[i].key[n] == '.') return 1;
    return 0;
}

static int fail(char *err, size_t len, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, len, fmt, ap);
    va_end(ap);
    return -1;
}

int config_parse_bandwidth(const char *s, double *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || errno || v < 0) return -1;
    while (isspace((unsigned char)*end))
        end++;
    static const struct {
        const char *u;
        double f;
    } units[] = {{"B/s", 1},      {"KB/s", 1e3},     {"MB/s", 1e6},        {"GB/s", 1e9},
                 {"TB/s", 1e12},  {"KiB/s", 1024.0}, {"MiB/s", 1048576.0}, {"GiB/s", 1073741824.0},
                 {"Kbit/s", 125}, {"Mbit/s", 125e3}, {"Gbit/s", 125e6},    {"", 1}};
    for (size_t i = 0; i < sizeof units / sizeof units[0]; i++)
        if (strcasecmp(end, units[i].u) == 0 && (units[i].u[0] || *end == 0)) {
            *out = v * units[i].f;
            return 0;
        }
    return -1;
}

int config_parse_time(const char *s, double *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || errno || v < 0) return -1;
    while (isspace((unsigned char)*end))
        end++;
    double f = !strcmp(end, "s") || !*end ? 1
               : !strcmp(end, "ms")       ? 1e-3
               : !strcmp(end, "us")       ? 1e-6
               : !strcmp(end, "ns")       ? 1e-9
                                          : -1;
    if (f < 0) return -1;
    *out = v * f;
    return 0;
}

/* Sets key i from text; `where` prefixes the error. */
static int set_value(job_config *c, int i, const char *v, const char *where, char *err,
                     size_t len) {
    const key_spec *k = &schema[i];
    char *p = (char *)c + k->off, *end;
    double d = 0;
    switch (k->type) {
    case K_INT: {
        errno = 0;
        long x = strtol(v, &end, 10);
        if (!*v || *end || errno)
            return fail(err, len, "%s: expected an integer, got '%s'", where, v);
        d = (double)x;
        if (d < k->lo || d > k->hi)
            return fail(err, len, "%s: %ld is out of range [%.0f, %.0f]", where, x, k->lo, k->hi);
        if (strcmp(k->key, "train.seed") == 0)
            *(long *)p = x;
        else
            *(int *)p = (int)x;
        return 0;
    }
    case K_FLOAT:
        errno = 0;
        d = strtod(v, &end);
        if (!*v || *end || errno || !isfinite(d))
            return fail(err, len, "%s: expected a number, got '%s'", where, v);
        if (d < k->lo || d > k->hi)
            return fail(err, len, "%s: %g is out of range [%g, %g]", where, d, k->lo, k->hi);
        *(double *)p = d;
        return 0;
    case K_BW:
        if (config_parse_bandwidth(v, &d))
            return fail(err, len, "%s: expected a bandwidth like 10GB/s or 1Gbit/s, got '%s'",
                        where, v);
        *(double *)p = d;
        return 0;
    case K_TIME:
        if (config_parse_time(v, &d))
            return fail(err, len, "%s: expected a time like 1ms or 20us, got '%s'", where, v);
        *(double *)p = d;
        return 0;
    case K_BOOL:
        if (!strcasecmp(v, "true") || !strcasecmp(v, "yes") || !strcasecmp(v, "on"))
            *(int *)p = 1;
        else if (!strcasecmp(v, "false") || !strcasecmp(v, "no") || !strcasecmp(v, "off"))
            *(int *)p = 0;
        else
            return fail(err, len, "%s: expected true or false, got '%s'", where, v);
        return 0;
    case K_ENUM: {
        size_t n = strlen(v);
        const char *c0 = k->choices;
        int ok = 0;
        while (c0 && *c0) {
            const char *bar = strchr(c0, '|');
            size_t m = bar ? (size_t)(bar - c0) : strlen(c0);
            ok |= (m == n && strncmp(c0, v, n) == 0);
            c0 = bar ? bar + 1 : NULL;
        }
        if (!ok) return fail(err, len, "%s: '%s' is not one of %s", where, v, k->choices);
    }
    /* fall through */
    case K_STR:
        if (strlen(v) >= k->size) return fail(err, len, "%s: value too long", where);
        snprintf(p, k->size, "%s", v);
        return 0;
    }
    return -1;
}

/* Walks a mapping node; prefix is the dotted path of the mapping. */
static int walk(job_config *c, yaml_document_t *doc, yaml_node_t *map, const char *prefix,
                int *seen, char *err, size_t len) {
    for (yaml_node_pair_t *pr = map->data.mapping.pairs.start; pr < map->data.mapping.pairs.top;
         pr++) {
        yaml_node_t *kn = yaml_document_get_node(doc, pr->key);
        yaml_node_t *vn = yaml_document_get_node(doc, pr->value);
        int line = (int)kn->start_mark.line + 1;
        if (kn->type != YAML_SCALAR_NODE)
            return fail(err, len, "%s:%d: keys must be plain names", c->file, line);
        char path[160];
        snprintf(path, sizeof path, "%s%s%s", prefix, *prefix ? "." : "",
                 (const char *)kn->data.scalar.value);
        char where[CFG_STR + 192];
        snprintf(where, sizeof where, "%s:%d: %s", c->file, line, path);
        int i = find_key(path);
        if (vn->type == YAML_MAPPING_NODE) {
            if (!is_section(path)) return fail(err, len, "%s: unknown key", where);
            if (walk(c, doc, vn, path, seen, err, len)) return -1;
            continue;
        }
        if (i < 0)
            return fail(err, len, "%s: unknown %s", where,
                        is_section(path) ? "section (expected a mapping)" : "key");
        if (seen[i]) return fail(err, len, "%s: key given twice", where);
        if (vn->type != YAML_SCALAR_NODE)
            return fail(err, len, "%s: expected a single value, got a list", where);
        if (set_value(c, i, (const char *)vn->data.scalar.value, where, err, len)) return -1;
        seen[i] = 1;
        snprintf(c->origin[i], sizeof c->origin[i], "%s:%d", c->file, line);
    }
    return 0;
}

/* Parses the file, or `text` (named `file` in messages) when text != NULL. */
static int parse_file(job_config *c, const char *file, const char *text, int *seen, char *err,
                      size_t len) {
    FILE *f = NULL;
    if (!text && !(f = fopen(file, "rb")))
        return fail(err, len, "%s: cannot open job file: %s", file, strerror(errno));
    yaml_parser_t parser;
    yaml_document_t doc;
    int rc = -1, have_doc = 0;
    yaml_parser_initialize(&parser);
    if (f)
        yaml_parser_set_input_file(&parser, f);
    else
        yaml_parser_set_input_string(&parser, (const unsigned char *)text, strlen(text));
    if (!yaml_parser_load(&parser, &doc)) {
        fail(err, len, "%s:%d: YAML syntax error: %s", file, (int)parser.problem_mark.line + 1,
             parser.problem ? parser.problem : "unknown");
        goto done;
    }
    have_doc = 1;
    yaml_node_t *root = yaml_document_get_root_node(&doc);
    if (!root) {
        fail(err, len, "%s: empty job file", file);
        goto done;
    }
    if (root->type != YAML_MAPPING_NODE) {
        fail(err, len, "%s:%d: the job file must be a mapping of sections", file,
             (int)root->start_mark.line + 1);
        goto done;
    }
    rc = walk(c, &doc, root, "", seen, err, len);
done:
    if (have_doc) yaml_document_delete(&doc);
    yaml_parser_delete(&parser);
    if (f) fclose(f);
    return rc;
}

static int load(job_config *c, const char *file, const char *text, const char *const *sets,
                int nsets, char *err, size_t len) {
    int seen[NKEYS] = {0};
    memset(c, 0, sizeof *c);
    snprintf(c->file, sizeof c->file, "%s", file);
    if (parse_file(c, file, text, seen, err, len)) return -1;
    for (int s = 0; s < nsets; s++) {
        const char *eq = strchr(sets[s], '=');
        char key[160];
        if (!eq || eq == sets[s] || (size_t)(eq - sets[s]) >= sizeof key)
            return fail(err, len, "--set %s: expected key.sub=value", sets[s]);
        snprintf(key, sizeof key, "%.*s", (int)(eq - sets[s]), sets[s]);
        int i = find_key(key);
        char where[200];
        snprintf(where, sizeof where, "--set %s", key);
        if (i < 0) return fail(err, len, "%s: unknown key", where);
        if (set_value(c, i, eq + 1, where, err, len)) return -1;
        seen[i] = 1;
        snprintf(c->origin[i], sizeof c->origin[i], "--set");
    }
    for (int i = 0; i < NKEYS; i++) {
        if (seen[i]) continue;
        if (!schema[i].def)
            return fail(err, len, "%s: missing required key %s", file, schema[i].key);
        char where[200];
        snprintf(where, sizeof where, "default of %s", schema[i].key);
        if (set_value(c, i, schema[i].def, where, err, len)) return -1;
        snprintf(c->origin[i], sizeof c->origin[i], "default");
    }
    if (!c->log.dir[0]) snprintf(c->log.dir, sizeof c->log.dir, "runs/default");
    if (c->train.min_lr > c->train.lr) {
        char w[CFG_STR + 64];
        return fail(err, len, "%s: min_lr (%g) is larger than lr (%g)",
                    config_where(c, "train.min_lr", w, sizeof w), c->train.min_lr, c->train.lr);
    }
    char msg[256];
    if (gpt_config_check(&c->model, msg, sizeof msg)) {
        char w[CFG_STR + 64];
        return fail(err, len, "%s: %s", config_where(c, "model.n_embd", w, sizeof w), msg);
    }
    return 0;
}

int config_load(job_config *c, const char *file, const char *const *sets, int nsets, char *err,
                size_t len) {
    return load(c, file, NULL, sets, nsets, err, len);
}

int config_load_text(job_config *c, const char *name, const char *text, char *err, size_t len) {
    return load(c, name, text, NULL, 0, err, len);
}

const char *config_where(const job_config *c, const char *key, char *buf, size_t len) {
    int i = find_key(key);
    const char *o = i >= 0 ? c->origin[i] : "";
    if (!strcmp(o, "--set"))
        snprintf(buf, len, "--set %s", key);
    else if (!strcmp(o, "default") || !*o)
        snprintf(buf, len, "%s: %s (default)", c->file, key);
    else
        snprintf(buf, len, "%s: %s", o, key);
    return buf;
}

int config_check_layout(const job_config *c, int world, char *err, size_t len) {
    char w[CFG_STR + 64];
    int k = c->comm.ps_ranks;
    if (k > 0) { /* dedicated servers: the last k ranks only sum gradients */
        const char *why = NULL;
        if (strcmp(c->comm.strategy, "parameter_server"))
            why = "needs comm.strategy parameter_server";
        else if (c->parallel.tp != 1 || c->parallel.pp != 1)
            why = "needs parallel.tp = parallel.pp = 1";
        else if (strcmp(c->comm.compression.type, "none"))
            why = "needs comm.compression.type none";
        else if (world <= k)
            why = "leaves no training rank";
        if (why)
            return fail(err, len, "%s: %d dedicated parameter-server ranks (of %d) %s",
                        config_where(c, "comm.ps_ranks", w, sizeof w), k, world, why);
        world -= k;
    }
    int mp = c->parallel.tp * c->parallel.pp;
    if (world % mp)
        return fail(err, len, "%s: world size %d is not divisible by tp*pp = %d",
                    config_where(c, "parallel.tp", w, sizeof w), world, mp);
    int dp = world / mp, unit = c->train.micro_batch * dp;
    if (c->train.global_batch % unit)
        return fail(err, len,
                    "%s: %d is not a multiple of micro_batch * dp = %d * %d (world size %d)",
                    config_where(c, "train.global_batch", w, sizeof w), c->train.global_batch,
                    c->train.micro_batch, dp, world);
    int m = c->train.global_batch / unit;
    if (c->parallel.microbatches && c->parallel.microbatches != m)
        return fail(err, len,
                    "%s: %d, but global_batch / (micro_batch * dp) = %d / (%d * %d) = %d "
                    "micro-batches per step (leave it out to derive it)",
                    config_where(c, "parallel.microbatches", w, sizeof w), c->parallel.microbatches,
                    c->train.global_batch, c->train.micro_batch, dp, m);
    if (c->model.n_head % c->parallel.tp)
        return fail(err, len,
                    "%s: %d does not divide model.n_head (%d): attention is split by heads",
                    config_where(c, "parallel.tp", w, sizeof w), c->parallel.tp, c->model.n_head);
    if (c->model.n_layer % c->parallel.pp)
        return fail(err, len, "%s: model.n_layer (%d) cannot be split into %d equal stages",
                    config_where(c, "parallel.pp", w, sizeof w), c->model.n_layer, c->parallel.pp);
    return 0;
}

char *config_to_yaml(const job_config *c) {
    size_t cap = 8192, n = 0;
    char *out = malloc(cap);
    if (!out) return NULL;
    char section[64] = "";
    for (int i = 0; i < NKEYS; i++) {
        const key_spec *k = &schema[i];
        const char *dot = strrchr(k->key, '.');
        char sec[64];
        snprintf(sec, sizeof sec, "%.*s", (int)(dot - k->key), k->key);
        int depth = 0;
        for (const char *q = k->key; q < dot; q++)
            depth += *q == '.';
        if (strcmp(sec, section)) {
            /* open every section level that differs from the previous key's */
            const char *a = sec;
            int lvl = 0;
            while (a) {
                const char *b = strchr(a, '.');
                size_t m = b ? (size_t)(b - a) : strlen(a);
                size_t pre = (size_t)(a - sec) + m;
                if (strncmp(sec, section, pre) || (section[pre] != '.' && section[pre] != 0))
                    n += snprintf(out + n, cap - n, "%*s%.*s:\n", 2 * lvl, "", (int)m, a);
                lvl++;
                a = b ? b + 1 : NULL;
            }
            snprintf(section, sizeof section, "%s", sec);
        }
        const char *p = (const char *)c + k->off;
        n += snprintf(out + n, cap - n, "%*s%s: ", 2 * (depth + 1), "", dot + 1);
        switch (k->type) {
        case K_INT:
            if (!strcmp(k->key, "train.seed"))
                n += snprintf(out + n, cap - n, "%ld\n", *(const long *)p);
            else
                n += snprintf(out + n, cap - n, "%d\n", *(const int *)p);
            break;
        case K_FLOAT:
            n += snprintf(out + n, cap - n, "%.9g\n", *(const double *)p);
            break;
        case K_BW:
            n += snprintf(out + n, cap - n, "%.9gB/s\n", *(const double *)p);
            break;
        case K_TIME:
            n += snprintf(out + n, cap - n, "%.9gs\n", *(const double *)p);
            break;
        case K_BOOL:
            n += snprintf(out + n, cap - n, "%s\n", *(const int *)p ? "true" : "false");
            break;
        default:
            n += snprintf(out + n, cap - n, "\"%s\"\n", p);
            break;
        }
        if (n + 512 > cap) {
            char *o2 = realloc(out, cap *= 2);
            if (!o2) {
                free(out);
                return NULL;
            }
            out = o2;
        }
    }
    return out;
}
