/* gptio: a gpt (and optionally its AdamW state) to and from an HDF5
 * checkpoint (io/ckpt): names /model/<name>, /optim/adam_m/<name>,
 * /optim/adam_v/<name>. Replicated tensors (data parallelism) are written in
 * disjoint row ranges, one per rank, so each rank writes only its shard.
 */
#ifndef MPILM_GPTIO_H
#define MPILM_GPTIO_H

#include "io/ckpt.h"
#include "src/gpt.h"
#include "src/optim.h"

/* Collective over comm. */
int gptio_save(MPI_Comm comm, const char *dir, gpt *g, const optim *o, const ckpt_meta *meta,
               const ckpt_save_opts *opts, char *err, size_t errlen);
/* Collective; o may be NULL (model only). */
int gptio_load(MPI_Comm comm, const char *file, gpt *g, optim *o, ckpt_meta *meta, char *err,
               size_t errlen);
/* Collective: resolves PATH (step dir or root), builds the model its config
 * describes and loads the weights. */
int gptio_open(MPI_Comm comm, const char *path, gpt **g, ckpt_meta *meta, char *err,
               size_t errlen);

#endif
