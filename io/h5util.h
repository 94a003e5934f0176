/* h5util: what the HDF5 writers in io/ share: the one check macro for HDF5
 * calls (H5_CHECK: file:line, the call, and HDF5's own innermost message into
 * the caller's err/errlen), the parallel file-access properties, attribute
 * helpers and collective agreement on a phase's success.
 */
#ifndef MPILM_H5UTIL_H
#define MPILM_H5UTIL_H

#include <hdf5.h>
#include <mpi.h>
#include <stddef.h>

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

#endif
