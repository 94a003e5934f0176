/* metrics: LOGDIR/metrics.jsonl (one JSON object per line, appended) and
 * LOGDIR/metrics.prom (Prometheus text exposition format, replaced
 * atomically for node-exporter's textfile collector). Used by rank 0 only.
 * A record is built field by field, then written as one line.
 */
#ifndef MPILM_METRICS_H
#define MPILM_METRICS_H

#include <stdio.h>

#define METRICS_MAX_FIELDS 32

typedef struct {
    FILE *jsonl;
    char dir[512];
    /* current record */
    int nf;
    char key[METRICS_MAX_FIELDS][32];
    char val[METRICS_MAX_FIELDS][96];
    int is_num[METRICS_MAX_FIELDS];
} metrics;

/* Creates DIR (and parents) and opens DIR/metrics.jsonl for appending
 * (truncates when fresh != 0). */
int metrics_open(metrics *m, const char *dir, int fresh, char *err, size_t errlen);
void metrics_close(metrics *m);
void metrics_num(metrics *m, const char *key, double v);
void metrics_int(metrics *m, const char *key, long long v);
void metrics_str(metrics *m, const char *key, const char *v);
/* Appends the record as a JSON line and, if prom != 0, rewrites
 * metrics.prom with its numeric fields as gauges mpilm_<key>. */
int metrics_emit(metrics *m, int prom);

#endif
