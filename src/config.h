/* config: job files (DESIGN.md section 3) parsed with libyaml against one
 * schema table, `--set key.sub=value` overrides, defaults and validation.
 * Every error names the file, line and key (or the --set argument).
 * Not here: checks that depend on the world size (config_check_layout).
 */
#ifndef MPILM_CONFIG_H
#define MPILM_CONFIG_H

#include "src/gpt.h"

#include <stddef.h>

#define CFG_STR 256

typedef struct {
    gpt_config model;
    struct {
        char dir[CFG_STR];
    } data;
    struct {
        int steps, micro_batch, global_batch, warmup, eval_every, eval_batches, recompute;
        double lr, min_lr, weight_decay, grad_clip, beta1, beta2, eps;
        long seed;
        char schedule[16], precision[16];
    } train;
    struct {
        int tp, pp, microbatches;
    } parallel;
    struct {
        char strategy[32], fallback[32];
        double bw_threshold, lat_threshold, bucket_mb;
        int overlap, ps_ranks;
        struct {
            char type[16], payload[16];
            double ratio, min_ratio;
            int bits, rank, error_feedback, warmup_steps;
        } compression;
    } comm;
    struct {
        char dir[CFG_STR], resume[16];
        int every, keep_last, keep_every, async;
    } checkpoint;
    struct {
        char dir[CFG_STR];
        int every;
    } log;
    /* where each key came from, for error messages: "FILE:LINE", "--set", "default" */
    char origin[64][CFG_STR + 16];
    char file[CFG_STR];
} job_config;

/* Loads FILE and applies the overrides ("key.sub=value"). Returns 0, or -1
 * with a one-line message in err. */
int config_load(job_config *cfg, const char *file, const char *const *sets, int nsets, char *err,
                size_t errlen);
/* Same, from YAML text (e.g. the config stored in a checkpoint). */
int config_load_text(job_config *cfg, const char *name, const char *text, char *err, size_t errlen);
/* Checks sizes against the world size: tp*pp divides world, global_batch is a
 * multiple of micro_batch*dp, and what the model needs. world counts the
 * comm.ps_ranks dedicated servers too (dp = (world - ps_ranks) / (tp*pp)). */
int config_check_layout(const job_config *cfg, int world, char *err, size_t errlen);
/* Where KEY was set ("jobs/x.yaml:7: train.lr", "--set train.lr", ...). */
const char *config_where(const job_config *cfg, const char *key, char *buf, size_t len);
/* The resolved configuration as YAML text (malloc'ed), for logs and checkpoints. */
char *config_to_yaml(const job_config *cfg);
/* Parses "10GB/s", "1ms" style values (exposed for tests). */
int config_parse_bandwidth(const char *s, double *bytes_per_s);
int config_parse_time(const char *s, double *seconds);

#endif
