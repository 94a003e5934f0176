/* h5util: shared HDF5 helpers of io/. */
#include "io/h5util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    char *buf;
    size_t len;
} h5_msg;

static herr_t h5_walk(unsigned n, const H5E_error2_t *e, void *data) {
    h5_msg *m = data;
    if (n == 0 && e->desc) { /* innermost error: the most specific reason */
        size_t used = strlen(m->buf);
        snprintf(m->buf + used, m->len - used, ": %s", e->desc);
    }
    return 0;
}

int h5u_fail(const char *what, const char *file, int line, char *err, size_t len) {
    snprintf(err, len, "%s:%d: %s failed", file, line, what);
    h5_msg m = {err, len};
    H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, h5_walk, &m);
    H5Eclear2(H5E_DEFAULT);
    return -1;
}

hid_t h5u_fapl(MPI_Comm comm) {
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
    if (fapl < 0) return fapl;
    if (H5Pset_fapl_mpio(fapl, comm, MPI_INFO_NULL) < 0 ||
        H5Pset_all_coll_metadata_ops(fapl, 1) < 0 || H5Pset_coll_metadata_write(fapl, 1) < 0 ||
        H5Pset_alignment(fapl, 64 * 1024, 1024 * 1024) < 0) {
        H5Pclose(fapl);
        return -1;
    }
    return fapl;
}

int h5u_attr_write(hid_t obj, const char *name, hid_t ftype, hid_t mtype, int n,
                      const void *v) {
    hsize_t dim = (hsize_t)n;
    hid_t sp = n == 1 ? H5Screate(H5S_SCALAR) : H5Screate_simple(1, &dim, NULL);
    hid_t a = sp < 0 ? -1 : H5Acreate2(obj, name, ftype, sp, H5P_DEFAULT, H5P_DEFAULT);
    int rc = (a < 0 || H5Awrite(a, mtype, v) < 0) ? -1 : 0;
    if (a >= 0) H5Aclose(a);
    if (sp >= 0) H5Sclose(sp);
    return rc;
}

int h5u_attr_write_str(hid_t obj, const char *name, const char *s) {
    hid_t t = H5Tcopy(H5T_C_S1);
    int rc = -1;
    if (t >= 0 && H5Tset_size(t, strlen(s) + 1) >= 0 && H5Tset_strpad(t, H5T_STR_NULLTERM) >= 0)
        rc = h5u_attr_write(obj, name, t, t, 1, s);
    if (t >= 0) H5Tclose(t);
    return rc;
}

int h5u_attr_read(hid_t obj, const char *name, hid_t mtype, void *v) {
    if (H5Aexists(obj, name) <= 0) return -1;
    hid_t a = H5Aopen(obj, name, H5P_DEFAULT);
    int rc = (a < 0 || H5Aread(a, mtype, v) < 0) ? -1 : 0;
    if (a >= 0) H5Aclose(a);
    return rc;
}

char *h5u_attr_read_str(hid_t obj, const char *name) {
    if (H5Aexists(obj, name) <= 0) return NULL;
    hid_t a = H5Aopen(obj, name, H5P_DEFAULT), ft = a < 0 ? -1 : H5Aget_type(a);
    char *s = NULL;
    if (ft >= 0 && H5Tget_class(ft) == H5T_STRING && !H5Tis_variable_str(ft)) {
        size_t n = H5Tget_size(ft);
        hid_t mt = H5Tcopy(ft);
        s = calloc(n + 1, 1);
        if (s && H5Aread(a, mt, s) < 0) {
            free(s);
            s = NULL;
        }
        H5Tclose(mt);
    }
    if (ft >= 0) H5Tclose(ft);
    if (a >= 0) H5Aclose(a);
    return s;
}

int h5u_agree(MPI_Comm comm, int rc, char *err, size_t errlen) {
    int bad = rc != 0, any = 0;
    MPI_Allreduce(&bad, &any, 1, MPI_INT, MPI_MAX, comm);
    if (any && !bad) snprintf(err, errlen, "another rank failed writing the checkpoint");
    return any ? -1 : 0;
}
