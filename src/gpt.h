/* gpt: the GPT-2 model of DESIGN.md section 4 on one rank: parameter table,
 * initialisation, forward pass, fused loss and backward pass.
 *
 * A rank may hold only part of the model (gpt_part): a contiguous range of
 * layers (a pipeline stage), with the embedding on the first stage and the
 * final LayerNorm and tied LM head on the last, and a tensor-parallel shard
 * of each layer in the manner of Megatron-LM: attention split by heads (QKV
 * column-parallel, output projection row-parallel), MLP column- then
 * row-parallel, one all-reduce over the TP group after each row-parallel
 * product in forward and one after each column-parallel input gradient in
 * backward. Embedding and LM head are replicated on the TP ranks: with the
 * byte tokenizer the vocabulary is 256, so splitting it would save nothing
 * and would need a parallel softmax.
 *
 * Parameters live in one contiguous fp32 buffer in table order, gradients in
 * a second buffer of the same layout, so optimizer and communication see
 * flat arrays. Not here: optimizer (optim), data/pipeline communication
 * (train, comm), checkpoints (gptio).
 */
#ifndef MPILM_GPT_H
#define MPILM_GPT_H

#include <mpi.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    int n_layer, n_head, n_embd, block_size, vocab_size;
} gpt_config;

/* Per-layer tensors, in table order. */
enum {
    GPT_LN1W, GPT_LN1B, GPT_QKVW, GPT_QKVB, GPT_ATTPW, GPT_ATTPB,
    GPT_LN2W, GPT_LN2B, GPT_FCW, GPT_FCB, GPT_FCPW, GPT_FCPB, GPT_NLAYER_TENSORS
};

/* How a tensor is split over the TP ranks. */
typedef enum {
    GPT_REPL,       /* replicated: every TP rank holds all of it */
    GPT_SPLIT_ROWS, /* rows split in tp contiguous parts (fc weight/bias) */
    GPT_SPLIT_QKV,  /* rows split per head inside each of the q, k, v thirds */
    GPT_SPLIT_COLS  /* columns split (row-parallel weights: attn.proj, mlp.proj) */
} gpt_shard;

typedef struct {
    char name[48];
    size_t offset, numel; /* in floats, into params/grads (local shard) */
    int ndim, shape[2];   /* local shape */
    int gshape[2];        /* global shape */
    gpt_shard shard;
    int gindex;           /* index in the global table (init stream, checkpoints) */
    int decay;            /* weight decay applies (2-D weights) */
    int in_norm;          /* this rank counts it in the global gradient norm */
} gpt_tensor;

/* What a rank holds. tp = 1, all layers, first = last = 1: the whole model. */
typedef struct {
    int tp, tp_rank;
    MPI_Comm tp_comm; /* MPI_COMM_NULL when tp == 1 */
    int layer0, layer1;
    int first, last;
    int nslots;    /* micro-batches whose activations are kept at once (>= 1) */
    int recompute; /* keep only layer inputs; recompute the rest in backward */
} gpt_part;

typedef struct gpt gpt;

/* Checks a configuration; on error writes a message naming the key to err. */
int gpt_config_check(const gpt_config *cfg, char *err, size_t errlen);
/* The whole model on one rank. */
int gpt_create(const gpt_config *cfg, gpt **out);
int gpt_create_part(const gpt_config *cfg, const gpt_part *part, gpt **out);
void gpt_destroy(gpt *g);

const gpt_config *gpt_cfg(const gpt *g);
const gpt_part *gpt_get_part(const gpt *g);
size_t gpt_nparams(const gpt *g);
int gpt_ntensors(const gpt *g);
const gpt_tensor *gpt_tensor_at(const gpt *g, int i);
int gpt_find(const gpt *g, const char *name); /* index or -1 */
float *gpt_params(gpt *g);
float *gpt_grads(gpt *g);
/* Index of the LM head weight (the tied wte copy) on the last stage, else -1. */
int gpt_head_tensor(const gpt *g);
/* Number of tensors of the whole model, and the name of global tensor i. */
int gpt_global_ntensors(const gpt_config *cfg);
void gpt_global_name(const gpt_config *cfg, int i, char *name, size_t len, int shape[2],
                     int *ndim);

/* GPT-2 initialisation; a tensor's values depend only on (seed, its global
 * index), so every layout initialises the same model. */
void gpt_init_weights(gpt *g, uint64_t seed);
void gpt_zero_grad(gpt *g);

/* Whole model, one rank: forward pass on tokens (B,T). With targets returns
 * the SUM of the B*T token losses; with dscale != 0 also runs the backward
 * pass, accumulating dscale * d(sum loss)/d(params) into the gradients.
 * Without targets returns 0 and leaves logits in gpt_logits. Returns -1 if
 * activations cannot be allocated. */
double gpt_forward(gpt *g, const int *tok, const int *tgt, int B, int T, float dscale);
const float *gpt_logits(const gpt *g); /* (B,T,V) of the last forward, slot 0 */

/* Pipeline stage pieces. Forward of one micro-batch into activation slot
 * `slot`: from tokens (first stage) or from x_in (B,T,C) (other stages). On
 * the last stage with targets returns the loss sum, and with dscale != 0
 * keeps d(loss)/d(logits) for the backward pass. -1 on allocation failure. */
double gpt_stage_forward(gpt *g, int slot, const int *tok, const float *x_in, const int *tgt,
                         int B, int T, float dscale);
const float *gpt_stage_output(const gpt *g, int slot); /* (B,T,C) leaving the stage */
/* Backward of the micro-batch in `slot`: dy (B,T,C) is the gradient of the
 * stage output (NULL on the last stage); tok for the embedding (first stage).
 * Afterwards gpt_stage_input_grad holds d(stage input) (not first stage). */
void gpt_stage_backward(gpt *g, int slot, const int *tok, const float *dy, int B, int T);
const float *gpt_stage_input_grad(const gpt *g);
/* Gradient-ready hook (overlap of the data-parallel all-reduce with
 * backward): while armed, gpt_stage_backward calls fn(ud, t0, t1) as soon as
 * the local tensors [t0, t1) have their final gradient of the step (each
 * layer, ln_f, the embeddings; not the LM head copy of a last stage nor wte
 * when pp > 1, which the trainer sums between stages afterwards). The
 * pipeline arms it for the last micro-batch's backward only. */
typedef void (*gpt_grad_hook)(void *ud, int t0, int t1);
void gpt_set_grad_hook(gpt *g, gpt_grad_hook fn, void *ud);
void gpt_arm_grad_hook(gpt *g, int armed);

/* Seconds spent in TP all-reduces since creation. */
double gpt_tp_comm_seconds(const gpt *g);
/* Activation bytes this rank holds for micro-batches of (B,T), all slots,
 * with or without recomputation. */
size_t gpt_part_activation_bytes(const gpt *g, int B, int T, int recompute);
/* Allocates the activations for (B,T) now (0 or -1). */
int gpt_reserve(gpt *g, int B, int T);

/* FLOPs of one training token (forward + backward) at sequence length T. */
double gpt_flops_per_token(const gpt_config *cfg, int T);

#endif
