/* metrics: JSON lines and Prometheus textfile writer. */
#include "io/metrics.h"

#include "io/fsutil.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int metrics_open(metrics *m, const char *dir, int fresh, char *err, size_t errlen) {
    memset(m, 0, sizeof *m);
    snprintf(m->dir, sizeof m->dir, "%s", dir);
    char path[1100];
    if (fs_mkdirs(dir) != 0) {
        snprintf(err, errlen, "%s: cannot create log directory: %s", dir, strerror(errno));
        return -1;
    }
    snprintf(path, sizeof path, "%s/metrics.jsonl", dir);
    m->jsonl = fopen(path, fresh ? "w" : "a");
    if (!m->jsonl) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }
    return 0;
}

void metrics_close(metrics *m) {
    if (m && m->jsonl) fclose(m->jsonl);
    if (m) m->jsonl = NULL;
}

static void add(metrics *m, const char *key, const char *val, int num) {
    if (m->nf >= METRICS_MAX_FIELDS) return;
    snprintf(m->key[m->nf], sizeof m->key[0], "%s", key);
    snprintf(m->val[m->nf], sizeof m->val[0], "%s", val);
    m->is_num[m->nf++] = num;
}

void metrics_num(metrics *m, const char *key, double v) {
    char b[64];
    if (isfinite(v)) snprintf(b, sizeof b, "%.9g", v);
    else snprintf(b, sizeof b, "null"); /* JSON has no NaN */
    add(m, key, b, isfinite(v));
}

void metrics_int(metrics *m, const char *key, long long v) {
    char b[32];
    snprintf(b, sizeof b, "%lld", v);
    add(m, key, b, 1);
}

void metrics_str(metrics *m, const char *key, const char *v) {
    char b[96];
    size_t j = 0;
    for (size_t i = 0; v[i] && j + 3 < sizeof b; i++) { /* minimal JSON escaping */
        if (v[i] == '"' || v[i] == '\\') b[j++] = '\\';
        b[j++] = (unsigned char)v[i] < 0x20 ? ' ' : v[i];
    }
    b[j] = 0;
    add(m, key, b, 0);
}

int metrics_emit(metrics *m, int prom) {
    int rc = 0;
    if (m->jsonl) {
        fputc('{', m->jsonl);
        for (int i = 0; i < m->nf; i++)
            fprintf(m->jsonl, "%s\"%s\": %s%s%s", i ? ", " : "", m->key[i], m->is_num[i] ? "" : "\"",
                    m->val[i], m->is_num[i] ? "" : "\"");
        fputs("}\n", m->jsonl);
        rc = fflush(m->jsonl);
    }
    if (prom) {
        char tmp[1100], path[1100];
        snprintf(tmp, sizeof tmp, "%s/.metrics.prom.tmp", m->dir);
        snprintf(path, sizeof path, "%s/metrics.prom", m->dir);
        FILE *f = fopen(tmp, "w");
        if (f) {
            for (int i = 0; i < m->nf; i++) {
                if (!m->is_num[i]) continue;
                fprintf(f, "# TYPE mpilm_%s gauge\nmpilm_%s %s\n", m->key[i], m->key[i], m->val[i]);
            }
            for (int i = 0; i < m->nf; i++)
                if (!m->is_num[i] && strcmp(m->val[i], "null"))
                    fprintf(f, "# TYPE mpilm_%s_info gauge\nmpilm_%s_info{%s=\"%s\"} 1\n", m->key[i],
                            m->key[i], m->key[i], m->val[i]);
            rc |= fclose(f);
            rc |= rename(tmp, path);
        } else rc = -1;
    }
    m->nf = 0;
    return rc;
}
