/* pipe: 1F1B schedule. */
#include "src/pipe.h"

#include "src/data.h"

#include <stdlib.h>
#include <string.h>

struct pipe_ctx {
    gpt *g;
    const grid *gr;
    int m, B, T, nslots, prev, next;
    int *inp, *tgt;
    float *xbuf, *dybuf, *dsend;
    MPI_Request *fwd_req, bwd_req;
};

/* Message tags: direction and micro-batch, inside MPI's guaranteed range. */
#define TAG(dir, mb) (2 * ((mb) % 16000) + (dir))

int pipe_slots(const grid *gr, int m) {
    int s = gr->pp - gr->pp_rank;
    return s < m ? s : m;
}

int pipe_create(gpt *g, const grid *gr, int m, int B, int T, pipe_ctx **out) {
    pipe_ctx *p = calloc(1, sizeof *p);
    if (!p) return -1;
    size_t n = (size_t)B * T, nc = n * gpt_cfg(g)->n_embd;
    p->g = g;
    p->gr = gr;
    p->m = m;
    p->B = B;
    p->T = T;
    p->nslots = gpt_get_part(g)->nslots;
    p->prev = gr->pp_rank - 1;
    p->next = gr->pp_rank + 1 < gr->pp ? gr->pp_rank + 1 : -1;
    p->inp = malloc(n * sizeof(int));
    p->tgt = malloc(n * sizeof(int));
    p->xbuf = malloc(nc * sizeof(float));
    p->dybuf = malloc(nc * sizeof(float));
    p->dsend = malloc(nc * sizeof(float));
    p->fwd_req = malloc((size_t)p->nslots * sizeof(MPI_Request));
    if (!p->inp || !p->tgt || !p->xbuf || !p->dybuf || !p->dsend || !p->fwd_req) {
        pipe_destroy(p);
        return -1;
    }
    for (int i = 0; i < p->nslots; i++)
        p->fwd_req[i] = MPI_REQUEST_NULL;
    p->bwd_req = MPI_REQUEST_NULL;
    *out = p;
    return 0;
}

void pipe_destroy(pipe_ctx *p) {
    if (!p) return;
    free(p->inp);
    free(p->tgt);
    free(p->xbuf);
    free(p->dybuf);
    free(p->dsend);
    free(p->fwd_req);
    free(p);
}

static void read_mb(pipe_ctx *p, const tokfile *tf, uint64_t base, int a) {
    uint64_t row = (uint64_t)(a * p->gr->dp + p->gr->dp_rank) * p->B;
    data_read_rows(tf, base + row * p->T, p->B, p->T, p->inp, p->tgt);
}

static void timed_recv(pipe_ctx *p, float *buf, int from, int tag, pipe_times *tm) {
    double t0 = MPI_Wtime();
    size_t n = (size_t)p->B * p->T * gpt_cfg(p->g)->n_embd;
    MPI_Recv(buf, (int)n, MPI_FLOAT, from, tag, p->gr->pp_comm, MPI_STATUS_IGNORE);
    tm->wait_s += MPI_Wtime() - t0;
}

static double fwd(pipe_ctx *p, const tokfile *tf, uint64_t base, int a, float dscale,
                  pipe_times *tm) {
    const gpt_part *pt = gpt_get_part(p->g);
    int slot = a % p->nslots;
    size_t n = (size_t)p->B * p->T * gpt_cfg(p->g)->n_embd;
    MPI_Wait(&p->fwd_req[slot], MPI_STATUS_IGNORE); /* the slot's output was sent */
    if (!pt->first) timed_recv(p, p->xbuf, p->prev, TAG(0, a), tm);
    if (pt->first || pt->last) read_mb(p, tf, base, a);
    double t0 = MPI_Wtime();
    double loss = gpt_stage_forward(p->g, slot, p->inp, p->xbuf, pt->last ? p->tgt : NULL, p->B,
                                    p->T, dscale);
    tm->fwd_s += MPI_Wtime() - t0;
    if (!pt->last)
        MPI_Isend(gpt_stage_output(p->g, slot), (int)n, MPI_FLOAT, p->next, TAG(0, a),
                  p->gr->pp_comm, &p->fwd_req[slot]);
    return pt->last && pt->tp_rank == 0 ? loss : 0.0;
}

static void bwd(pipe_ctx *p, const tokfile *tf, uint64_t base, int a, pipe_times *tm) {
    const gpt_part *pt = gpt_get_part(p->g);
    int slot = a % p->nslots;
    size_t n = (size_t)p->B * p->T * gpt_cfg(p->g)->n_embd;
    if (!pt->last) timed_recv(p, p->dybuf, p->next, TAG(1, a), tm);
    if (pt->first) read_mb(p, tf, base, a);
    double t0 = MPI_Wtime();
    gpt_arm_grad_hook(p->g, a == p->m - 1); /* 1F1B runs the backwards in order */
    gpt_stage_backward(p->g, slot, p->inp, p->dybuf, p->B, p->T);
    gpt_arm_grad_hook(p->g, 0);
    tm->bwd_s += MPI_Wtime() - t0;
    if (!pt->first) {
        MPI_Wait(&p->bwd_req, MPI_STATUS_IGNORE);
        memcpy(p->dsend, gpt_stage_input_grad(p->g), n * sizeof(float));
        MPI_Isend(p->dsend, (int)n, MPI_FLOAT, p->prev, TAG(1, a), p->gr->pp_comm, &p->bwd_req);
    }
}

double pipe_train_step(pipe_ctx *p, const tokfile *tf, uint64_t base, float dscale,
                       pipe_times *tm) {
    int m = p->m, warm = p->gr->pp - p->gr->pp_rank - 1;
    if (warm > m) warm = m;
    double loss = 0;
    /* 1F1B: warm-up forwards, then one forward and one backward, then the
     * remaining backwards (with pp = 1: forward, backward, forward, ...). */
    for (int a = 0; a < warm; a++)
        loss += fwd(p, tf, base, a, dscale, tm);
    for (int i = 0; i < m - warm; i++) {
        loss += fwd(p, tf, base, warm + i, dscale, tm);
        bwd(p, tf, base, i, tm);
    }
    for (int a = m - warm; a < m; a++)
        bwd(p, tf, base, a, tm);
    MPI_Waitall(p->nslots, p->fwd_req, MPI_STATUSES_IGNORE);
    MPI_Wait(&p->bwd_req, MPI_STATUS_IGNORE);
    return loss;
}

double pipe_eval(pipe_ctx *p, const tokfile *tf, int nbatches) {
    const gpt_part *pt = gpt_get_part(p->g);
    int B = p->B, T = p->T;
    uint64_t nb = data_num_batches(tf, B, T);
    size_t n = (size_t)B * T * gpt_cfg(p->g)->n_embd;
    double loss = 0;
    pipe_times tm = {0};
    for (int i = p->gr->dp_rank, k = 0; i < nbatches; i += p->gr->dp, k++) {
        if (!pt->first) timed_recv(p, p->xbuf, p->prev, TAG(0, k), &tm);
        if (pt->first || pt->last)
            data_read_rows(tf, (uint64_t)(i % nb) * B * T, B, T, p->inp, p->tgt);
        double l = gpt_stage_forward(p->g, 0, p->inp, p->xbuf, pt->last ? p->tgt : NULL, B, T, 0.f);
        if (pt->last && pt->tp_rank == 0) loss += l;
        /* a blocking send cannot deadlock: the next stage only receives */
        if (!pt->last)
            MPI_Send(gpt_stage_output(p->g, 0), (int)n, MPI_FLOAT, p->next, TAG(0, k),
                     p->gr->pp_comm);
    }
    return loss;
}
