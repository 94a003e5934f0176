/* ckpt: sharded HDF5 checkpoints (DESIGN.md section 5).
 *
 * One shared file, step-N/checkpoint.h5, written with collective MPI-IO: every
 * tensor is a contiguous float32 dataset of its full global shape and each
 * rank writes only its own part (rows, or row segments x a column range).
 * h5py/h5dump see whole tensors. The parallel HDF5 driver creates every
 * dataset (collective metadata, contiguous, allocated at creation, never
 * filled, 1 MiB-aligned when large), then all raw data of the checkpoint
 * moves in ONE MPI_File_write_at_all through the MPI-IO handle HDF5 opened,
 * at the datasets' addresses (HDF5 1.10 has no multi-dataset H5Dwrite; one
 * collective H5Dwrite per tensor cost several collective rounds each: 15-23%
 * of raw disk bandwidth for 228 tensors at 4 ranks). Memory and file bytes
 * are both little-endian float32: nothing is converted. The checksums are
 * computed while the disk writes the data back, and stored after it. Load:
 * rank 0 reads the metadata (serial driver) and broadcasts one table of
 * addresses and checksums; one MPI_File_read_at_all puts every rank's
 * selection straight into its buffers. A file per rank + virtual datasets
 * (bench ckpt's fpr+VDS variant) measured mixed here: faster saves at 4
 * ranks and faster cold loads in most cases, slower saves of the model at 1
 * rank, below 70% of raw for the model at 4 ranks too; it needs N+1 files
 * per step whose shard paths every reader must resolve. One self-contained
 * file per step is kept (bench/RESULTS.md, "ckpt").
 * Each dataset carries a `checksum` attribute: a position-dependent 64-bit
 * hash summed over elements, so ranks can hash their own shards and add the
 * parts (any partition gives the same value). A step directory is written as
 * step-N.tmp and renamed by rank 0 after every rank has closed the file;
 * `latest` is then replaced by an atomic rename.
 * Not here: which tensors a model has or how they are sharded (src/).
 */
#ifndef MPILM_CKPT_H
#define MPILM_CKPT_H

#include <hdf5.h>
#include <mpi.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define CKPT_FORMAT "mpilm-checkpoint"
#define CKPT_FORMAT_VERSION 1
/* ckpt_save failed after the file was created (I/O error mid-write): the
 * previous checkpoint is intact, but HDF5 cannot shut down cleanly, so the
 * caller must end the job (MPI_Abort) after reporting. */
#define CKPT_ERR_FATAL (-2)

#define CKPT_MAX_SEG 4

/* A tensor of global shape (rows, cols) (cols = 1 for 1-D) and this rank's
 * part of it. Simple form: rows [row0, row0 + nrows), all columns. General
 * form (nseg > 0): row segments seg_row0/seg_nrows in increasing order, each
 * restricted to columns [col0, col0 + ncols) (ncols = 0: all); data holds the
 * segments back to back, each nrows x ncols row-major. A tensor-parallel
 * shard is such a selection (e.g. the q, k and v rows of a head group). */
typedef struct {
    const char *name; /* dataset path, e.g. "model/wte" */
    int ndim;
    uint64_t rows, cols;
    uint64_t row0, nrows;
    float *data;
    int nseg;
    uint64_t seg_row0[CKPT_MAX_SEG], seg_nrows[CKPT_MAX_SEG], col0, ncols;
} ckpt_tensor;

/* Elements of t's selection. */
uint64_t ckpt_tensor_count(const ckpt_tensor *t);

typedef struct {
    long long step, tokens_seen;
    int layout[3];     /* dp, tp, pp */
    long long optim_t; /* optimizer updates done */
    long long seed;
    char *config; /* resolved YAML; on load malloc'ed, caller frees */
} ckpt_meta;

/* Seconds per phase of one save or load on this rank (benchmarks). */
typedef struct {
    double prep;   /* save: step directory, free-space check; load: rank 0 reads
                    * the metadata, broadcast */
    double hash;   /* checksums of this rank's data */
    double create; /* save: file, datasets, checksum attributes (HDF5 metadata) */
    double xfer;   /* the collective raw-data transfer */
    double close;  /* save: H5Fclose (collective metadata flush) */
    double commit; /* save: fsync, rename, latest, retention */
    double total;
    int calls; /* collective MPI-IO transfers (1 per GiB a rank moves) */
} ckpt_stats;

typedef struct {
    int keep_last;  /* keep the newest N complete steps (0 = all) */
    int keep_every; /* also keep steps that are multiples of this (0 = none) */
    /* fault injection for tests: this rank kills itself with SIGKILL after
     * creating `fault_after` datasets (-1 = never) */
    int fault_rank, fault_after;
} ckpt_save_opts;

/* Collective. Writes DIR/step-%08d (via .tmp), updates DIR/latest and
 * applies the retention policy. Returns 0, -1 or CKPT_ERR_FATAL on every
 * rank, with a message in err. Refuses to start when the file system has
 * less free space than the checkpoint needs. */
int ckpt_save(MPI_Comm comm, const char *dir, const ckpt_tensor *t, int nt, const ckpt_meta *meta,
              const ckpt_save_opts *opts, char *err, size_t errlen);
/* ckpt_save, also filling stats (may be NULL) with this rank's phase times. */
int ckpt_save_timed(MPI_Comm comm, const char *dir, const ckpt_tensor *t, int nt,
                    const ckpt_meta *meta, const ckpt_save_opts *opts, ckpt_stats *stats, char *err,
                    size_t errlen);

/* Asynchronous save: ckpt_async_start copies this rank's rows of every
 * tensor into a host buffer (the only time training is blocked) and a
 * background thread runs ckpt_save on its own duplicate of the communicator,
 * so it cannot be confused with the training collectives. Needs
 * MPI_THREAD_MULTIPLE. One save at a time: start waits for the previous. */
typedef struct ckpt_async ckpt_async;
int ckpt_async_create(MPI_Comm comm, ckpt_async **out); /* collective */
/* Collective (all ranks start the same save). */
int ckpt_async_start(ckpt_async *a, const char *dir, const ckpt_tensor *t, int nt,
                     const ckpt_meta *meta, const ckpt_save_opts *opts);
/* Waits for the running save (no-op when none); returns its status (the same
 * on every rank) and its message in err. *seconds gets its duration. */
int ckpt_async_wait(ckpt_async *a, double *seconds, char *err, size_t errlen);
void ckpt_async_destroy(ckpt_async *a); /* waits, then frees; NULL-safe */

/* Resolves PATH (a step directory, or a checkpoint root holding `latest`) to
 * the path of its checkpoint.h5. */
int ckpt_resolve(const char *path, char *out, size_t outlen, char *err, size_t errlen);

/* Collective load from FILE (a checkpoint.h5): reads metadata, then each
 * tensor's selection into data (any selection: overlapping between ranks or
 * covering only part of a tensor), after checking its shape, and verifies
 * every tensor's whole checksum. Every rank must pass the same list of
 * names. 0 or -1 on every rank; rank 0's err holds the reason. */
int ckpt_load(MPI_Comm comm, const char *file, ckpt_tensor *t, int nt, ckpt_meta *meta, char *err,
              size_t errlen);
/* ckpt_load, also filling stats (may be NULL) with this rank's phase times. */
int ckpt_load_timed(MPI_Comm comm, const char *file, ckpt_tensor *t, int nt, ckpt_meta *meta,
                    ckpt_stats *stats, char *err, size_t errlen);

/* Reads only the root attributes (no MPI; any rank). */
int ckpt_read_meta(const char *file, ckpt_meta *meta, char *err, size_t errlen);

/* Hash of n floats that start at global element index first. */
uint64_t ckpt_hash(const float *x, size_t n, uint64_t first);

/* Serial checks of a whole file: root attributes, then every dataset's
 * shape, type and checksum. Prints one line per problem to `out` (and a
 * table of tensors when verbose); returns the number of problems (0 = ok),
 * or -1 when the file cannot be opened as a checkpoint. */
int ckpt_verify(const char *file, FILE *out, int verbose);

/* Serial: checks that every tensor t[i].name exists with shape (rows, cols);
 * prints one line per problem, returns their number (-1: cannot open). */
int ckpt_check_shapes(const char *file, const ckpt_tensor *t, int nt, FILE *out);

/* Removes leftover step-*.tmp directories in DIR (a crashed save). */
int ckpt_clean_tmp(const char *dir);

/* ---- the steps of a save, shared with io/qckpt.c --------------------------- */

/* Collective. Rank 0 creates DIR/step-STEP.tmp (replacing debris) after
 * checking that `need` bytes are free; path gets its checkpoint.h5. */
int ckpt_begin(MPI_Comm comm, const char *dir, long long step, double need, char *path,
               size_t pathlen, char *err, size_t errlen);
/* Collective: the root attributes of DESIGN.md section 5 on FILE. */
int ckpt_write_attrs(hid_t file, const ckpt_meta *meta, char *err, size_t errlen);
/* Collective: closes FILE (rc = 0) and commits (fsync, rename to step-STEP,
 * `latest`, retention by keep_last/keep_every), or (rc != 0) removes the
 * partial step and returns CKPT_ERR_FATAL when the file is open. *close_s
 * (may be NULL) gets the H5Fclose time. 0 or -1 on every rank. */
int ckpt_finish(MPI_Comm comm, const char *dir, long long step, hid_t file, int rc, int keep_last,
                int keep_every, double *close_s, char *err, size_t errlen);

#endif
