/* gptio: a gpt (and optionally its AdamW state) to and from an HDF5
 * checkpoint (io/ckpt): names /model/<name>, /optim/adam_m/<name>,
 * /optim/adam_v/<name>. Replicated tensors (data parallelism) are written in
 * pieces, one per rank (tensor-parallel shards as multi-segment hyperslabs),
 * so each rank writes only its own part; loading reads any layout's file
 * into any other layout.
 */
#ifndef MPILM_GPTIO_H
#define MPILM_GPTIO_H

#include "io/ckpt.h"
#include "src/gpt.h"
#include "src/optim.h"

/* State of each rank that exact resume needs beyond the model and AdamW
 * (the gradient compressors' residuals, per-rank AdamW moments): the
 * float32 dataset `name` of shape (rows, maxlen), this rank's len values in
 * row `row`, zero-padded. Every rank passes the same name, rows and maxlen
 * (> 0). */
typedef struct {
    const char *name;
    float *data;
    uint64_t len, maxlen;
    int row, rows;
} gptio_rank_state;
#define GPTIO_MAX_RANK_STATES 4

/* Collective over comm (every rank of the grid); this rank is data-parallel
 * replica dp_rank of dp, which splits the writing of replicated pieces.
 * rs: nrs (<= GPTIO_MAX_RANK_STATES, the same on every rank) rank states. */
int gptio_save(MPI_Comm comm, int dp_rank, int dp, const char *dir, gpt *g, const optim *o,
               const gptio_rank_state *rs, int nrs, const ckpt_meta *meta,
               const ckpt_save_opts *opts, char *err, size_t errlen);
/* Collective: the same, written in the background by `a` (see io/ckpt.h);
 * returns once this rank's shard is copied. */
int gptio_save_async(ckpt_async *a, int dp_rank, int dp, const char *dir, gpt *g, const optim *o,
                     const gptio_rank_state *rs, int nrs, const ckpt_meta *meta,
                     const ckpt_save_opts *opts);
/* Collective: reads this rank's row of rs->name into rs->data (rs->len
 * values; the rest of the row must be zero padding). 1: loaded; 0: the file
 * has no such dataset or another shape (reason in err, nothing read); -1:
 * error (checksum, I/O; in err). */
int gptio_load_rank_state(MPI_Comm comm, const char *file, gptio_rank_state *rs, char *err,
                          size_t errlen);
/* Collective; o may be NULL (model only). */
int gptio_load(MPI_Comm comm, const char *file, gpt *g, optim *o, ckpt_meta *meta, char *err,
               size_t errlen);
/* Collective: resolves PATH (step dir or root), builds the model its config
 * describes and loads the weights. */
int gptio_open(MPI_Comm comm, const char *path, gpt **g, ckpt_meta *meta, char *err, size_t errlen);

/* Serial: the tensors of g (model and AdamW state) that a checkpoint must
 * hold, as a list for ckpt_check_shapes; free with gptio_free_list. */
ckpt_tensor *gptio_tensor_list(gpt *g, int with_optim, int *nt);
void gptio_free_list(ckpt_tensor *t, int nt);

#endif
