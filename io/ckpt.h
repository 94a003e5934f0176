/* ckpt: sharded HDF5 checkpoints (DESIGN.md section 5).
 *
 * One shared file, step-N/checkpoint.h5, written with collective MPI-IO: every
 * tensor is a contiguous float32 dataset of its full global shape and each
 * rank writes only its own rows (a hyperslab). h5py/h5dump see whole tensors.
 * Each dataset carries a `checksum` attribute: a position-dependent 64-bit
 * hash summed over elements, so ranks can hash their own shards and add the
 * parts (any partition gives the same value). A step directory is written as
 * step-N.tmp and renamed by rank 0 after every rank has closed the file;
 * `latest` is then replaced by an atomic rename.
 * Not here: which tensors a model has or how they are sharded (src/).
 */
#ifndef MPILM_CKPT_H
#define MPILM_CKPT_H

#include <mpi.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define CKPT_FORMAT "mpilm-checkpoint"
#define CKPT_FORMAT_VERSION 1

/* A tensor of global shape (rows, cols) (cols = 1 for 1-D); this rank holds
 * rows [row0, row0 + nrows) contiguously at data. */
typedef struct {
    const char *name; /* dataset path, e.g. "model/wte" */
    int ndim;
    uint64_t rows, cols;
    uint64_t row0, nrows;
    float *data;
} ckpt_tensor;

typedef struct {
    long long step, tokens_seen;
    int layout[3];      /* dp, tp, pp */
    long long optim_t;  /* optimizer updates done */
    long long seed;
    char *config;       /* resolved YAML; on load malloc'ed, caller frees */
} ckpt_meta;

typedef struct {
    int keep_last;  /* keep the newest N complete steps (0 = all) */
    int keep_every; /* also keep steps that are multiples of this (0 = none) */
    /* fault injection for tests: this rank kills itself with SIGKILL after
     * writing `fault_after` datasets (-1 = never) */
    int fault_rank, fault_after;
} ckpt_save_opts;

/* Collective. Writes DIR/step-%08d (via .tmp), updates DIR/latest and
 * applies the retention policy. Returns 0 or -1 on every rank, with the
 * message in err on the ranks that saw the error. */
int ckpt_save(MPI_Comm comm, const char *dir, const ckpt_tensor *t, int nt,
              const ckpt_meta *meta, const ckpt_save_opts *opts, char *err, size_t errlen);

/* Resolves PATH (a step directory, or a checkpoint root holding `latest`) to
 * the path of its checkpoint.h5. */
int ckpt_resolve(const char *path, char *out, size_t outlen, char *err, size_t errlen);

/* Collective load from FILE (a checkpoint.h5): reads metadata, then each
 * tensor's rows [row0, row0+nrows) into data, after checking its shape and
 * verifying its checksum. Every rank must pass the same list of names. */
int ckpt_load(MPI_Comm comm, const char *file, ckpt_tensor *t, int nt, ckpt_meta *meta,
              char *err, size_t errlen);

/* Reads only the root attributes (no MPI; any rank). */
int ckpt_read_meta(const char *file, ckpt_meta *meta, char *err, size_t errlen);

/* Hash of n floats that start at global element index first. */
uint64_t ckpt_hash(const float *x, size_t n, uint64_t first);

/* Serial checks of a whole file: root attributes, then every dataset's
 * shape, type and checksum. Prints one line per problem to `out` (and a
 * table of tensors when verbose); returns the number of problems (0 = ok),
 * or -1 when the file cannot be opened as a checkpoint. */
int ckpt_verify(const char *file, FILE *out, int verbose);

/* Removes leftover step-*.tmp directories in DIR (a crashed save). */
int ckpt_clean_tmp(const char *dir);

#endif
