/* train: the SPMD training loop (data parallelism). */
#include "src/train.h"

#include "comm/allreduce.h"
#include "io/metrics.h"
#include "io/tokfile.h"
#include "kernels/kern.h"
#include "src/data.h"
#include "src/gpt.h"
#include "src/gptio.h"
#include "src/optim.h"
#include "src/spmd.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define PROG "mpilm train"

typedef struct {
    MPI_Comm comm;
    int rank, world, dp;
    const job_config *cfg;
    gpt *g;
    optim opt;
    comm_ar *ar;
    const comm_ar_algo *algo;
    tokfile train, val;
    int *inp, *tgt;
    metrics met;
    int have_met;
    ckpt_async *async; /* background checkpoint writer (checkpoint.async) */
} trainer;

static void fmt_eta(char *b, size_t n, double s) {
    if (!(s >= 0) || s > 1e7) s = 0;
    long t = (long)(s + 0.5);
    snprintf(b, n, "%ld:%02ld:%02ld", t / 3600, t / 60 % 60, t % 60);
}

static void fmt_bytes(char *b, size_t n, double v) {
    const char *u[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int i = 0;
    while (v >= 1024 && i < 4) v /= 1024, i++;
    snprintf(b, n, "%.1f %s", v, u[i]);
}

/* Mean validation loss over eval_batches micro-batches, spread over ranks. */
static double evaluate(trainer *t) {
    const job_config *c = t->cfg;
    int B = c->train.micro_batch, T = c->model.block_size;
    uint64_t nb = data_num_batches(&t->val, B, T);
    double sum = 0, all = 0;
    for (int i = t->rank; i < c->train.eval_batches; i += t->world) {
        data_read_rows(&t->val, (uint64_t)(i % nb) * B * T, B, T, t->inp, t->tgt);
        sum += gpt_forward(t->g, t->inp, t->tgt, B, T, 0.f);
    }
    MPI_Allreduce(&sum, &all, 1, MPI_DOUBLE, MPI_SUM, t->comm);
    return all / ((double)c->train.eval_batches * B * T);
}

/* Waits for a background save; reports it. Collective. */
static int save_wait(trainer *t) {
    char err[1024] = "";
    double secs = 0;
    int rc = ckpt_async_wait(t->async, &secs, err, sizeof err);
    if (spmd_agree(t->comm, rc, PROG, err)) {
        if (rc == CKPT_ERR_FATAL) MPI_Abort(t->comm, 1); /* see io/ckpt.h */
        return -1;
    }
    if (t->rank == 0 && secs > 0) printf("checkpoint: background save finished (%.2f s)\n", secs);
    return 0;
}

static int save(trainer *t, int step, long long tokens) {
    const job_config *c = t->cfg;
    char err[1024] = "";
    char *yaml = config_to_yaml(c);
    ckpt_meta m = {.step = step, .tokens_seen = tokens, .layout = {t->dp, 1, 1},
                   .optim_t = t->opt.t, .seed = c->train.seed, .config = yaml};
    ckpt_save_opts so = {c->checkpoint.keep_last, c->checkpoint.keep_every, -1, -1};
    /* MPILM_FAULT=ckpt_kill:RANK:N kills RANK after N datasets of a save
     * (fault-injection tests of the atomic commit) */
    const char *fault = getenv("MPILM_FAULT");
    if (fault && sscanf(fault, "ckpt_kill:%d:%d", &so.fault_rank, &so.fault_after) != 2)
        so.fault_rank = so.fault_after = -1;
    double t0 = spmd_now();
    int rc;
    if (t->async) {
        if (save_wait(t)) {
            free(yaml);
            return -1;
        }
        rc = gptio_save_async(t->comm, t->async, c->checkpoint.dir, t->g, &t->opt, &m, &so);
        snprintf(err, sizeof err, "cannot start the background checkpoint writer");
    } else
        rc = gptio_save(t->comm, c->checkpoint.dir, t->g, &t->opt, &m, &so, err, sizeof err);
    free(yaml);
    if (spmd_agree(t->comm, rc ? -1 : 0, PROG, err)) {
        if (rc == CKPT_ERR_FATAL) MPI_Abort(t->comm, 1); /* see io/ckpt.h */
        return -1;
    }
    if (t->rank == 0)
        printf("checkpoint: %s/step-%08d (%s%.3f s)\n", c->checkpoint.dir, step,
               t->async ? "snapshot; writing in the background; training blocked " : "",
               spmd_now() - t0);
    return 0;
}

/* Resumes from checkpoint.dir/latest when asked and present: returns the
 * step to start from (0 for a fresh run) or -1 on error. */
static int maybe_resume(trainer *t) {
    const job_config *c = t->cfg;
    if (!c->checkpoint.dir[0] || strcmp(c->checkpoint.resume, "auto") != 0) return 0;
    if (t->rank == 0) ckpt_clean_tmp(c->checkpoint.dir);
    char latest[CFG_STR + 16], file[4200], err[1024] = "";
    snprintf(latest, sizeof latest, "%s/latest", c->checkpoint.dir);
    struct stat st;
    int have = stat(latest, &st) == 0, any = 0;
    MPI_Allreduce(&have, &any, 1, MPI_INT, MPI_MAX, t->comm);
    if (!any) return 0;
    ckpt_meta m = {0};
    int rc = ckpt_resolve(c->checkpoint.dir, file, sizeof file, err, sizeof err);
    if (spmd_agree(t->comm, rc, PROG, err)) return -1;
    rc = gptio_load(t->comm, file, t->g, &t->opt, &m, err, sizeof err);
    free(m.config);
    if (spmd_agree(t->comm, rc, PROG, err)) return -1;
    if (t->rank == 0)
        printf("resumed from %s at step %lld (written with layout dp=%d tp=%d pp=%d)\n", file,
               m.step, m.layout[0], m.layout[1], m.layout[2]);
    return (int)m.step;
}

static int setup(trainer *t, MPI_Comm comm, const job_config *c) {
    char err[1024] = "", path[CFG_STR + 16];
    memset(t, 0, sizeof *t);
    t->comm = comm;
    t->cfg = c;
    MPI_Comm_rank(comm, &t->rank);
    MPI_Comm_size(comm, &t->world);
    if (spmd_agree(comm, config_check_layout(c, t->world, err, sizeof err), PROG, err)) return -1;
    t->dp = t->world;
    kern_set_threads(spmd_threads_per_rank(comm));

    int B = c->train.micro_batch, T = c->model.block_size, rc = 0;
    snprintf(path, sizeof path, "%s/train.tok", c->data.dir);
    rc = tokfile_open(path, &t->train, err, sizeof err);
    if (!rc) {
        snprintf(path, sizeof path, "%s/val.tok", c->data.dir);
        rc = tokfile_open(path, &t->val, err, sizeof err);
    }
    if (!rc && t->train.vocab_size > (uint32_t)c->model.vocab_size) {
        snprintf(err, sizeof err, "%s: token vocabulary %u is larger than model.vocab_size %d",
                 path, t->train.vocab_size, c->model.vocab_size);
        rc = -1;
    }
    if (!rc && data_num_batches(&t->train, c->train.global_batch, T) == 0) {
        snprintf(err, sizeof err,
                 "%s/train.tok: %llu tokens, fewer than one global batch (%d rows x %d + 1)",
                 c->data.dir, (unsigned long long)t->train.n_tokens, c->train.global_batch, T);
        rc = -1;
    }
    if (!rc && data_num_batches(&t->val, B, T) == 0) {
        snprintf(err, sizeof err,
                 "%s/val.tok: %llu tokens, fewer than one micro-batch (%d rows x %d + 1)",
                 c->data.dir, (unsigned long long)t->val.n_tokens, B, T);
        rc = -1;
    }
    if (spmd_agree(comm, rc, PROG, err)) return -1;

    rc = gpt_create(&c->model, &t->g) || optim_init(&t->opt, gpt_nparams(t->g), c->train.beta1,
                                                    c->train.beta2, c->train.eps,
                                                    c->train.weight_decay);
    t->inp = malloc((size_t)B * T * sizeof(int));
    t->tgt = malloc((size_t)B * T * sizeof(int));
    if (spmd_agree(comm, rc || !t->inp || !t->tgt, PROG, "out of memory for the model")) return -1;
    gpt_init_weights(t->g, (uint64_t)c->train.seed);

    comm_ar_opts ao = {.ps_ranks = c->comm.ps_ranks};
    rc = comm_ar_create(comm, &ao, &t->ar);
    t->algo = comm_ar_find(c->comm.strategy);
    snprintf(err, sizeof err, "comm.strategy %s: cannot set up the all-reduce", c->comm.strategy);
    if (spmd_agree(comm, rc || !t->algo, PROG, err)) return -1;

    if (c->checkpoint.async && c->checkpoint.dir[0]) {
        int level;
        MPI_Query_thread(&level);
        rc = level < MPI_THREAD_MULTIPLE || ckpt_async_create(comm, &t->async);
        snprintf(err, sizeof err, "checkpoint.async needs MPI_THREAD_MULTIPLE, which this MPI "
                                  "library did not provide");
        if (spmd_agree(comm, rc, PROG, err)) return -1;
    }
    if (t->rank == 0) {
        rc = metrics_open(&t->met, c->log.dir, 1, err, sizeof err);
        t->have_met = rc == 0;
    }
    return spmd_agree(comm, rc, PROG, err);
}

static void teardown(trainer *t) {
    ckpt_async_destroy(t->async);
    if (t->have_met) metrics_close(&t->met);
    comm_ar_destroy(t->ar);
    optim_free(&t->opt);
    gpt_destroy(t->g);
    tokfile_close(&t->train);
    tokfile_close(&t->val);
    free(t->inp);
    free(t->tgt);
}

int train_run(MPI_Comm comm, const job_config *c, int quiet, volatile sig_atomic_t *stop_flag,
              train_result *res) {
    trainer t;
    memset(res, 0, sizeof *res);
    res->final_val_loss = -1;
    int rc = setup(&t, comm, c);
    if (rc) goto done;
    int start = maybe_resume(&t);
    if (start < 0) {
        rc = -1;
        goto done;
    }
    int B = c->train.micro_batch, T = c->model.block_size, G = c->train.global_batch;
    int accum = G / (B * t.dp), steps = c->train.steps;
    uint64_t nb = data_num_batches(&t.train, G, T);
    double tokens_per_step = (double)G * T, fpt = gpt_flops_per_token(&c->model, T);
    double peak_local = kern_sgemm_gflops(512, 0.3), peak = 0;
    MPI_Allreduce(&peak_local, &peak, 1, MPI_DOUBLE, MPI_SUM, comm);
    res->peak_gflops = peak;
    if (t.rank == 0 && !quiet) {
        size_t np = gpt_nparams(t.g);
        char pb[32], ab[32];
        fmt_bytes(pb, sizeof pb, (double)np * 4);
        fmt_bytes(ab, sizeof ab, (double)gpt_activation_bytes(&c->model, B, T));
        printf("mpilm train: %s | %zu parameters | layout dp=%d tp=1 pp=1 | %d threads/rank\n",
               c->file, np, t.dp, kern_threads());
        printf("per rank: parameters %s, gradients %s, optimizer %s x2, activations %s\n", pb, pb,
               pb, ab);
        printf("batch: global %d x %d tokens = %d micro-batches of %d per rank x %d ranks | "
               "all-reduce: %s\n",
               G, T, accum, B, t.dp, t.algo->name);
        printf("BLAS: OpenBLAS %s kernel | measured sgemm peak %.1f GFLOP/s (all ranks)\n",
               kern_blas_corename(), peak);
        fflush(stdout);
    }
    double t_run = spmd_now(), sum_ms = 0, sum_tps = 0;
    int timed = 0;
    float dscale = (float)(1.0 / tokens_per_step);
    for (int s = start; s < steps; s++) {
        double t0 = spmd_now();
        double lr = optim_lr(c->train.schedule, c->train.lr, c->train.min_lr, c->train.warmup,
                             steps, s);
        gpt_zero_grad(t.g);
        /* global rows of step s: [s*G, (s+1)*G) in batch order; rank r takes
         * micro-batch a*dp + r of its accumulation loop */
        uint64_t base = (uint64_t)(s % nb) * G * T;
        double loss_sum = 0;
        for (int a = 0; a < accum; a++) {
            uint64_t row = (uint64_t)(a * t.dp + t.rank) * B;
            data_read_rows(&t.train, base + row * T, B, T, t.inp, t.tgt);
            double l = gpt_forward(t.g, t.inp, t.tgt, B, T, dscale);
            if (l < 0) {
                rc = -1;
                break;
            }
            loss_sum += l;
        }
        if (spmd_agree(comm, rc, PROG, "out of memory for activations")) goto done;
        double t1 = spmd_now();
        uint64_t sent0 = comm_ar_bytes_sent(t.ar);
        rc = t.algo->fn(t.ar, gpt_grads(t.g), gpt_nparams(t.g), COMM_SUM);
        double loss_all = 0;
        MPI_Allreduce(&loss_sum, &loss_all, 1, MPI_DOUBLE, MPI_SUM, comm);
        double comm_s = spmd_now() - t1;
        if (spmd_agree(comm, rc, PROG, "gradient all-reduce failed")) goto done;
        double loss = loss_all / tokens_per_step;
        double gnorm = sqrt(kern_sumsq(gpt_grads(t.g), gpt_nparams(t.g)));
        if (!isfinite(loss) || !isfinite(gnorm)) {
            char m[128];
            snprintf(m, sizeof m, "step %d: loss %g, gradient norm %g: training diverged", s + 1,
                     loss, gnorm);
            rc = spmd_agree(comm, -1, PROG, m);
            goto done;
        }
        optim_step(&t.opt, t.g, (float)lr, optim_clip_scale(gnorm, c->train.grad_clip));
        double dt = spmd_now() - t0, tps = tokens_per_step / dt;
        double mfu = peak > 0 ? tps * fpt / (peak * 1e9) : 0;
        if (s > start) { /* the first step pays for allocation and warm-up */
            sum_ms += dt * 1e3;
            sum_tps += tps;
            timed++;
        }
        res->final_loss = loss;
        res->steps_done = s + 1;
        int last = s + 1 == steps, val_due = c->train.eval_every > 0 &&
                                                ((s + 1) % c->train.eval_every == 0 || last);
        double val = val_due ? evaluate(&t) : -1;
        if (val_due) res->final_val_loss = val;
        if (t.rank == 0) {
            metrics *m = &t.met;
            metrics_int(m, "step", s + 1);
            metrics_num(m, "loss", loss);
            metrics_num(m, "lr", lr);
            metrics_num(m, "grad_norm", gnorm);
            metrics_num(m, "step_ms", dt * 1e3);
            metrics_num(m, "tokens_per_s", tps);
            metrics_num(m, "mfu", mfu);
            if (val_due) metrics_num(m, "val_loss", val);
            metrics_num(m, "comm_ms", comm_s * 1e3);
            metrics_int(m, "bytes_sent", (long long)(comm_ar_bytes_sent(t.ar) - sent0));
            metrics_str(m, "algorithm", t.algo->name);
            metrics_str(m, "compression", c->comm.compression.type);
            metrics_emit(m, 1);
            if (!quiet && ((s + 1) % c->log.every == 0 || last || val_due)) {
                char eta[32];
                double per = (spmd_now() - t_run) / (s + 1 - start);
                fmt_eta(eta, sizeof eta, per * (steps - s - 1));
                printf("step %*d/%d | loss %.4f | lr %.2e | gnorm %.3f | %.1f ms | %.0f tok/s | "
                       "MFU %.1f%% | ETA %s",
                       (int)(log10(steps) + 1), s + 1, steps, loss, lr, gnorm, dt * 1e3, tps,
                       mfu * 100, eta);
                if (val_due) printf(" | val %.4f", val);
                printf("\n");
                fflush(stdout);
            }
        }
        int every = c->checkpoint.every, stop = stop_flag ? *stop_flag : 0, any_stop = 0;
        MPI_Allreduce(&stop, &any_stop, 1, MPI_INT, MPI_MAX, comm);
        int save_now = c->checkpoint.dir[0] && (any_stop || last || (every > 0 && (s + 1) % every == 0));
        if (save_now && (rc = save(&t, s + 1, (long long)(s + 1) * (long long)tokens_per_step)))
            goto done;
        if (any_stop && !last) {
            if (t.rank == 0)
                printf("stopped by signal after step %d%s; exit status %d\n", s + 1,
                       c->checkpoint.dir[0] ? " (checkpoint saved)" : "", TRAIN_EXIT_PREEMPTED);
            res->preempted = 1;
            break;
        }
    }
    if (rc == 0 && t.async) rc = save_wait(&t); /* the last save must be complete */
    if (timed) {
        res->step_ms = sum_ms / timed;
        res->tokens_per_s = sum_tps / timed;
        res->mfu = peak > 0 ? res->tokens_per_s * fpt / (peak * 1e9) : 0;
    }
    if (t.rank == 0 && !quiet && !res->preempted)
        printf("done: %d steps, final loss %.4f%s, %.0f tok/s, MFU %.1f%% (of measured sgemm "
               "peak)\n",
               res->steps_done, res->final_loss, "", res->tokens_per_s, res->mfu * 100);
done:
    teardown(&t);
    return rc ? -1 : 0;
}

static void usage(FILE *f) {
    fprintf(f,
            "usage: mpilm train JOB.yaml [--set key.sub=value ...]\n\n"
            "Trains the GPT model described by JOB.yaml on all ranks of the launch\n"
            "(mpirun -n N / srun), data-parallel over the ranks. Keys: see README.md\n"
            "and jobs/*.yaml. --set overrides any key, e.g. --set train.steps=10.\n"
            "Rank 0 prints one progress line per log.every steps and writes\n"
            "LOGDIR/metrics.jsonl and LOGDIR/metrics.prom. SIGUSR1 or SIGTERM: finish\n"
            "the step, save a checkpoint (when checkpoint.dir is set), exit %d.\n",
            TRAIN_EXIT_PREEMPTED);
}

int train_main(int argc, char **argv, MPI_Comm comm, volatile sig_atomic_t *stop_flag) {
    int rank;
    MPI_Comm_rank(comm, &rank);
    const char *job = NULL;
    const char **sets = calloc((size_t)argc + 1, sizeof *sets);
    int nsets = 0, bad = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            if (rank == 0) usage(stdout);
            free(sets);
            return 0;
        } else if (!strcmp(argv[i], "--set") && i + 1 < argc) sets[nsets++] = argv[++i];
        else if (!strncmp(argv[i], "--set=", 6)) sets[nsets++] = argv[i] + 6;
        else if (argv[i][0] != '-' && !job) job = argv[i];
        else bad = 1;
    }
    if (bad || !job) {
        if (rank == 0) usage(stderr);
        free(sets);
        return 2;
    }
    job_config cfg;
    char err[1024];
    int rc = config_load(&cfg, job, sets, nsets, err, sizeof err);
    free(sets);
    if (spmd_agree(comm, rc, PROG, err)) return 1;
    train_result res;
    if (train_run(comm, &cfg, 0, stop_flag, &res)) return 1;
    return res.preempted ? TRAIN_EXIT_PREEMPTED : 0;
}
