/* h5util: what the HDF5 writers in io/ share: the one check macro for HDF5
 * calls (H5_CHECK: file:line, the call, and HDF5's own innermost message into
 * the caller's err/errlen) and for MPI-IO calls (MPIIO_CHECK, the same for
 * MPI_File_*: io/ cannot use comm/'s MPI_CHECK), the parallel file-access
 * properties, attribute helpers, collective agreement on a phase's success,
 * and the writer of a list of datasets that ckpt_save and qckpt_save share
 * (h5u_write_dsets) with its raw-data mover (h5u_xfer).
 * Not here: checkpoint directories, commit, what the tensors are (ckpt.c).
 */
#ifndef MPILM_H5UTIL_H
#define MPILM_H5UTIL_H

#include <hdf5.h>
#include <mpi.h>
#include <stddef.h>
#include <stdint.h>

/* Writes "file:line: what failed: <HDF5 message>" to err; returns -1. */
int h5u_fail(const char *what, const char *file, int line, char *err, size_t len);
/* Needs `char *err` and `size_t errlen` in scope; 0 or -1. */
#define H5_CHECK(call) ((call) < 0 ? h5u_fail(#call, __FILE__, __LINE__, err, errlen) : 0)

/* MPI-IO access with collective metadata and 1 MiB alignment of datasets of
 * 64 KiB or more (HDF5's parallel I/O advice); -1 on error. */
hid_t h5u_fapl(MPI_Comm comm);

int h5u_attr_write(hid_t obj, const char *name, hid_t ftype, hid_t mtype, int n, const void *v);
int h5u_attr_write_str(hid_t obj, const char *name, const char *s);
int h5u_attr_read(hid_t obj, const char *name, hid_t mtype, void *v); /* -1 if absent */
char *h5u_attr_read_str(hid_t obj, const char *name);                 /* malloc'ed or NULL */

/* Collective: -1 on every rank if rc failed on any. A rank that saw no error
 * itself gets "another rank failed writing the checkpoint" in err. */
int h5u_agree(MPI_Comm comm, int rc, char *err, size_t errlen);

/* 0 if mpi_rc is MPI_SUCCESS, else writes "file:line: what failed: <MPI
 * error string>" to err and returns -1. */
int h5u_mpi_check(int mpi_rc, const char *what, const char *file, int line, char *err, size_t len);
/* Needs `char *err` and `size_t errlen` in scope; 0 or -1. */
#define MPIIO_CHECK(call) h5u_mpi_check((call), #call, __FILE__, __LINE__, err, errlen)

/* A run of bytes: len bytes at file offset off <-> memory at buf. */
typedef struct {
    uint64_t off, len;
    char *buf;
} h5u_piece;

/* Collective: writes (write = 1) or reads every rank's pieces with
 * MPI_File_write_at_all / read_at_all through a file view, in as few calls
 * as possible (one per GiB that the busiest rank moves; every rank makes the
 * same number). Sorts and merges p in place. Written pieces must not overlap
 * between ranks; read pieces may. A short read (truncated file) is an error.
 * *calls (may be NULL) gets the number of collective transfers. */
int h5u_xfer(MPI_Comm comm, MPI_File fh, h5u_piece *p, size_t n, int write, int *calls, char *err,
             size_t errlen);

#define H5U_MAX_SEG 4
/* A part of a (rows, cols) array: row segments in increasing order, each
 * restricted to columns [col0, col0 + ncols); nseg = 0: nothing. */
typedef struct {
    int nseg;
    uint64_t row0[H5U_MAX_SEG], nrows[H5U_MAX_SEG], col0, ncols;
} h5u_sel;

/* Pieces of sel in a contiguous (rows, cols) array of esize-byte elements
 * stored at file offset base, memory at data (the selection's elements,
 * segments back to back, row-major). Returns how many it wrote to out
 * (NULL: only counts). */
size_t h5u_sel_pieces(const h5u_sel *s, uint64_t cols, size_t esize, uint64_t base, char *data,
                      h5u_piece *out);

/* One dataset of a checkpoint file and this rank's part of it. */
typedef struct {
    const char *name;    /* from the file root; missing groups are created */
    hid_t ftype;         /* file type; data already holds its bytes (no conversion) */
    int ndim;            /* 1 or 2 */
    uint64_t rows, cols; /* cols = 1 for 1-D */
    h5u_sel sel;         /* what this rank writes (disjoint between ranks) */
    const void *data;    /* the selection's elements */
} h5u_dset;

/* This rank's part of d's `checksum` attribute (the parts are summed). */
typedef uint64_t (*h5u_hash_fn)(const h5u_dset *d, void *arg);

/* Seconds per phase of h5u_write_dsets on this rank. */
typedef struct {
    double create, write, hash, attrs;
    int calls; /* collective MPI-IO transfers */
} h5u_times;

/* Collective (every rank passes the same list, with its own selections):
 * creates each dataset (contiguous, allocated at creation, never filled),
 * moves every rank's raw data with one collective MPI-IO transfer (h5u_xfer
 * on the handle HDF5 opened: HDF5 1.10 has no multi-dataset write, and one
 * collective H5Dwrite per dataset costs several collective rounds each),
 * starts the disk's writeback, hashes this rank's parts meanwhile, and
 * writes each `checksum` attribute = the parts summed over ranks (one
 * MPI_Allreduce for all). FILE must have been created with fapl =
 * h5u_fapl(comm). kill_after >= 0 (fault injection for tests): this rank
 * raises SIGKILL after creating that many datasets. 0 or -1 on every rank;
 * after -1 the file cannot be closed (see CKPT_ERR_FATAL). */
int h5u_write_dsets(MPI_Comm comm, hid_t file, hid_t fapl, const h5u_dset *d, int n,
                    h5u_hash_fn hash, void *arg, int kill_after, h5u_times *tm, char *err,
                    size_t errlen);

#endif
