/* gpt: the GPT-2 model of DESIGN.md section 4 on one rank: parameter table,
 * initialisation, forward pass, fused loss and backward pass.
 *
 * Parameters live in one contiguous fp32 buffer, in the order of the table
 * (wte, wpe, h.0.*, ..., h.{L-1}.*, ln_f.*), and gradients in a second buffer
 * of the same layout, so optimizer and communication see flat arrays.
 * Not here: optimizer (optim), data-parallel reduction (comm), checkpoints.
 */
#ifndef MPILM_GPT_H
#define MPILM_GPT_H

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

typedef struct {
    char name[48];
    size_t offset, numel; /* in floats, into params/grads */
    int ndim, shape[2];
    int decay;            /* weight decay applies (2-D weights) */
} gpt_tensor;

typedef struct gpt gpt;

/* Checks a configuration; on error writes a message naming the key to err. */
int gpt_config_check(const gpt_config *cfg, char *err, size_t errlen);
int gpt_create(const gpt_config *cfg, gpt **out);
void gpt_destroy(gpt *g);

const gpt_config *gpt_cfg(const gpt *g);
size_t gpt_nparams(const gpt *g);
int gpt_ntensors(const gpt *g);
const gpt_tensor *gpt_tensor_at(const gpt *g, int i);
int gpt_find(const gpt *g, const char *name); /* index or -1 */
float *gpt_params(gpt *g);
float *gpt_grads(gpt *g);

/* GPT-2 initialisation, identical on every rank for a seed. */
void gpt_init_weights(gpt *g, uint64_t seed);
void gpt_zero_grad(gpt *g);

/* Forward pass on tokens (B,T). With targets: returns the SUM of the B*T
 * token losses; with dscale != 0 also runs the backward pass, accumulating
 * dscale * d(sum loss)/d(params) into the gradients. Without targets returns
 * 0 and leaves logits available through gpt_logits. Returns a negative value
 * (-1) if activations cannot be allocated. */
double gpt_forward(gpt *g, const int *tok, const int *tgt, int B, int T, float dscale);
/* Logits (B,T,V) of the last forward pass without targets. */
const float *gpt_logits(const gpt *g);

/* FLOPs of one training token (forward + backward) at sequence length T. */
double gpt_flops_per_token(const gpt_config *cfg, int T);
/* Activation bytes held for a micro-batch of (B,T). */
size_t gpt_activation_bytes(const gpt_config *cfg, int B, int T);

#endif
