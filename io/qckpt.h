/* qckpt: quantized checkpoints (DESIGN.md section 5, issue 7).
 *
 * The same file and directory conventions as io/ckpt (OUT/step-N/checkpoint.h5
 * written as step-N.tmp, renamed by rank 0 once every rank has closed the
 * file, then OUT/latest replaced atomically; the root attributes of a
 * training checkpoint; a `checksum` attribute on every dataset), holding
 *
 *   /qmodel/<name>/q      codes, 2-D [rows, nblk*32] int8 (q8) or
 *                         [rows, nblk*16] uint8 (q4, q4a, nf4: byte j of a
 *                         block holds weight j in its low nibble and weight
 *                         j+16 in its high nibble; q4 nibbles are code+8)
 *   /qmodel/<name>/scale  [rows, nblk] IEEE binary16 (HDF5 16-bit float type,
 *                         read by h5py as numpy float16)
 *   /qmodel/<name>/min    [rows, nblk] binary16, q4a only
 *   group attributes      format ("q8"...), shape [rows, cols] (int64),
 *                         block (32)
 *   /model/<name>         float32 tensors left unquantized
 *   root `quant`          JSON text: {"version", "block", "scale_type",
 *                         "layout", "formats": {name: fmt or "fp32"}}
 *
 * nblk = ceil(cols/32); a row's last block is zero-padded (kernels/quant.h).
 * Dequantization: q8 w = scale*q; q4 w = scale*(nibble-8); q4a w =
 * scale*nibble + min; nf4 w = scale*codebook[nibble].
 * Checksums: /model datasets as io/ckpt (ckpt_hash of the floats); the
 * integer and fp16 datasets: ckpt_hash over their elements zero-extended to
 * 32 bits (qckpt_hash).
 * Not here: which tensors get which format (src/quantize.c).
 */
#ifndef MPILM_QCKPT_H
#define MPILM_QCKPT_H

#include "io/ckpt.h"

#include <mpi.h>
#include <stddef.h>
#include <stdint.h>

#define QCKPT_FP32 (-1)
#define QCKPT_VERSION 1

/* One tensor of the quantized model. Only `owner` holds data. */
typedef struct {
    const char *name; /* tensor name without group, e.g. "h.0.attn.qkv.weight" */
    int ndim;
    uint64_t rows, cols; /* cols = 1 for 1-D */
    int fmt;             /* QCKPT_FP32 or a quant_fmt */
    int owner;           /* rank that holds data */
    const void *data;    /* on owner: rows*cols floats, or the quant_tensor buffer */
} qckpt_tensor;

typedef struct {
    int force; /* replace an existing checkpoint in the output root */
    /* fault injection for tests: this rank kills itself with SIGKILL after
     * writing `fault_after` tensors (-1 = never) */
    int fault_rank, fault_after;
} qckpt_save_opts;

/* Serial: 0 when ROOT may receive a quantized checkpoint: it does not hold
 * one (no `latest`, no checkpoint.h5, no complete step-* directory), or
 * force is set. -1 with a message otherwise. */
int qckpt_out_check(const char *root, int force, char *err, size_t errlen);

/* Collective. Writes ROOT/step-%08d (meta->step) via .tmp, then ROOT/latest.
 * Every rank creates every dataset; each writes the tensors it owns. 0 or -1
 * on every rank (CKPT_ERR_FATAL after a failed collective write, as
 * ckpt_save). */
int qckpt_save(MPI_Comm comm, const char *root, const qckpt_tensor *t, int nt,
               const ckpt_meta *meta, const qckpt_save_opts *opts, char *err, size_t errlen);

/* Serial: 1 if FILE is a quantized checkpoint (root `quant` attribute), 0 if
 * not, -1 if it cannot be opened. */
int qckpt_is_quantized(const char *file);

/* Collective (each rank reads independently): fills every t[i] (name
 * "model/<x>", rows [row0, row0+nrows)) from FILE, dequantizing /qmodel/<x>
 * when it exists, else reading /model/<x>; checks shapes and checksums;
 * reads the root attributes into meta. 0 or -1 on every rank. */
int qckpt_load_model(MPI_Comm comm, const char *file, ckpt_tensor *t, int nt, ckpt_meta *meta,
                     char *err, size_t errlen);

/* ckpt_hash of n elements of `bytes` bytes each (1 or 2), zero-extended. */
uint64_t qckpt_hash(const void *x, size_t n, int bytes, uint64_t first);

#endif
