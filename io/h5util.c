/* h5util: shared HDF5 and MPI-IO helpers of io/ (see h5util.h). */
#include "io/h5util.h"

#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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

int h5u_attr_write(hid_t obj, const char *name, hid_t ftype, hid_t mtype, int n, const void *v) {
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

int h5u_mpi_check(int mpi_rc, const char *what, const char *file, int line, char *err, size_t len) {
    if (mpi_rc == MPI_SUCCESS) return 0;
    char msg[MPI_MAX_ERROR_STRING] = "";
    int n = 0;
    MPI_Error_string(mpi_rc, msg, &n);
    snprintf(err, len, "%s:%d: %s failed: %s", file, line, what, msg);
    return -1;
}

static int cmp_piece(const void *a, const void *b) {
    const h5u_piece *x = a, *y = b;
    return x->off < y->off ? -1 : x->off > y->off;
}

/* A rank moves at most this many bytes per collective call (MPI counts and
 * displacements in the types stay far from INT_MAX). */
#define XFER_ROUND ((uint64_t)1 << 30)

int h5u_xfer(MPI_Comm comm, MPI_File fh, h5u_piece *p, size_t n, int write, int *calls, char *err,
             size_t errlen) {
    int rc = -1, *bl = NULL;
    MPI_Aint *fd = NULL, *md = NULL;
    MPI_Datatype ft = MPI_DATATYPE_NULL, mt = MPI_DATATYPE_NULL;
    /* file views need increasing offsets; neighbours contiguous in both the
     * file and memory (rows of one segment, tensors packed back to back)
     * become one block */
    qsort(p, n, sizeof *p, cmp_piece);
    size_t m = 0;
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++) {
        if (!p[i].len) continue;
        total += p[i].len;
        if (m && p[m - 1].off + p[m - 1].len == p[i].off && p[m - 1].buf + p[m - 1].len == p[i].buf)
            p[m - 1].len += p[i].len;
        else
            p[m++] = p[i];
    }
    unsigned long long mine = (total + XFER_ROUND - 1) / XFER_ROUND, rounds = 0;
    size_t cap = m + (size_t)mine + 1;
    bl = malloc(cap * sizeof *bl);
    fd = malloc(cap * sizeof *fd);
    md = malloc(cap * sizeof *md);
    int bad = !bl || !fd || !md;
    if (bad) snprintf(err, errlen, "out of memory for %zu I/O pieces", m);
    /* every rank must make the same number of collective calls */
    MPI_Allreduce(&mine, &rounds, 1, MPI_UNSIGNED_LONG_LONG, MPI_MAX, comm);
    size_t i = 0;
    uint64_t used = 0; /* bytes of p[i] already moved */
    for (unsigned long long r = 0; r < rounds; r++) {
        int k = 0, cnt = 0;
        uint64_t sz = 0;
        while (!bad && i < m && sz < XFER_ROUND) {
            uint64_t take = p[i].len - used < XFER_ROUND - sz ? p[i].len - used : XFER_ROUND - sz;
            bl[k] = (int)take;
            fd[k] = (MPI_Aint)(p[i].off + used);
            MPI_Get_address(p[i].buf + used, &md[k]);
            k++;
            sz += take;
            used += take;
            if (used == p[i].len) i++, used = 0;
        }
        if (k) {
            bad |= MPIIO_CHECK(MPI_Type_create_hindexed(k, bl, fd, MPI_BYTE, &ft)) ||
                   MPIIO_CHECK(MPI_Type_commit(&ft)) ||
                   MPIIO_CHECK(MPI_Type_create_hindexed(k, bl, md, MPI_BYTE, &mt)) ||
                   MPIIO_CHECK(MPI_Type_commit(&mt));
            cnt = bad ? 0 : 1;
        }
        /* collective even for a rank with nothing (or a failure) to move */
        MPI_Status st;
        int e = MPI_File_set_view(fh, 0, MPI_BYTE, cnt ? ft : MPI_BYTE, "native", MPI_INFO_NULL);
        if (!bad) bad = h5u_mpi_check(e, "MPI_File_set_view", __FILE__, __LINE__, err, errlen);
        e = write ? MPI_File_write_at_all(fh, 0, MPI_BOTTOM, cnt, cnt ? mt : MPI_BYTE, &st)
                  : MPI_File_read_at_all(fh, 0, MPI_BOTTOM, cnt, cnt ? mt : MPI_BYTE, &st);
        if (!bad)
            bad = h5u_mpi_check(e, write ? "MPI_File_write_at_all" : "MPI_File_read_at_all",
                                __FILE__, __LINE__, err, errlen);
        MPI_Count got = 0;
        if (!bad && cnt &&
            (MPI_Get_elements_x(&st, MPI_BYTE, &got) != MPI_SUCCESS || (uint64_t)got != sz)) {
            snprintf(err, errlen, "%s %llu of %llu bytes (file truncated?)",
                     write ? "wrote" : "read", (unsigned long long)got, (unsigned long long)sz);
            bad = 1;
        }
        if (ft != MPI_DATATYPE_NULL) MPI_Type_free(&ft);
        if (mt != MPI_DATATYPE_NULL) MPI_Type_free(&mt);
    }
    /* back to the plain byte view HDF5's MPI-IO driver expects */
    int e = MPI_File_set_view(fh, 0, MPI_BYTE, MPI_BYTE, "native", MPI_INFO_NULL);
    if (!bad) bad = h5u_mpi_check(e, "MPI_File_set_view", __FILE__, __LINE__, err, errlen);
    if (calls) *calls = (int)rounds;
    rc = bad ? -1 : 0;
    free(bl);
    free(fd);
    free(md);
    return rc;
}

size_t h5u_sel_pieces(const h5u_sel *s, uint64_t cols, size_t esize, uint64_t base, char *data,
                      h5u_piece *out) {
    size_t n = 0;
    uint64_t nc = s->ncols ? s->ncols : cols;
    for (int k = 0; k < s->nseg; k++) {
        if (nc == cols) { /* whole rows: one run */
            uint64_t len = s->nrows[k] * cols * esize;
            if (out) out[n] = (h5u_piece){base + s->row0[k] * cols * esize, len, data};
            n++;
            data += len;
            continue;
        }
        for (uint64_t r = s->row0[k]; r < s->row0[k] + s->nrows[k]; r++, n++) {
            if (out) out[n] = (h5u_piece){base + (r * cols + s->col0) * esize, nc * esize, data};
            data += nc * esize;
        }
    }
    return n;
}

int h5u_write_dsets(MPI_Comm comm, hid_t file, hid_t fapl, const h5u_dset *d, int n,
                    h5u_hash_fn hash, void *arg, int kill_after, h5u_times *tm, char *err,
                    size_t errlen) {
    int rank, rc = -1, ok = 1;
    MPI_Comm_rank(comm, &rank);
    hid_t dcpl = -1, lcpl = -1, *dsh = malloc(((size_t)n + 1) * sizeof *dsh);
    uint64_t *part = malloc(((size_t)n + 1) * sizeof *part),
             *sum = malloc(((size_t)n + 1) * sizeof *sum),
             *off = calloc((size_t)n + 1, sizeof *off);
    h5u_piece *pc = NULL;
    size_t npc = 0;
    int nopen = 0, calls = 0;
    double t0 = MPI_Wtime(), t1 = t0, t2 = t0, t3 = t0;
    if (!part || !sum || !off || !dsh) {
        snprintf(err, errlen, "out of memory for %d datasets", n);
        ok = 0;
    }
    /* Contiguous (what readers map), space allocated now so its address is
     * known, and never filled: every byte is written below. */
    ok = ok && !H5_CHECK(dcpl = H5Pcreate(H5P_DATASET_CREATE)) &&
         !H5_CHECK(H5Pset_layout(dcpl, H5D_CONTIGUOUS)) &&
         !H5_CHECK(H5Pset_alloc_time(dcpl, H5D_ALLOC_TIME_EARLY)) &&
         !H5_CHECK(H5Pset_fill_time(dcpl, H5D_FILL_TIME_NEVER)) &&
         !H5_CHECK(lcpl = H5Pcreate(H5P_LINK_CREATE)) &&
         !H5_CHECK(H5Pset_create_intermediate_group(lcpl, 1));
    /* dataset creation is a collective metadata operation: every rank walks
     * the same list; HDF5 writes the metadata collectively at close. The
     * datasets stay open for their checksum attributes. */
    for (int i = 0; ok && i < n; i++) {
        if (kill_after == i) raise(SIGKILL);
        hsize_t dims[2] = {d[i].rows, d[i].cols};
        hid_t sp = -1;
        dsh[i] = -1;
        ok = !H5_CHECK(sp = H5Screate_simple(d[i].ndim, dims, NULL)) &&
             !H5_CHECK(dsh[i] =
                           H5Dcreate2(file, d[i].name, d[i].ftype, sp, lcpl, dcpl, H5P_DEFAULT));
        if (dsh[i] >= 0) nopen = i + 1;
        if (ok && d[i].rows && d[i].cols) {
            haddr_t a = H5Dget_offset(dsh[i]);
            if (a == HADDR_UNDEF) {
                snprintf(err, errlen, "dataset /%s has no file address after creation", d[i].name);
                ok = 0;
            }
            off[i] = (uint64_t)a;
            npc += h5u_sel_pieces(&d[i].sel, d[i].cols, H5Tget_size(d[i].ftype), 0, NULL, NULL);
        }
        if (sp >= 0) H5Sclose(sp);
        if (!ok && !strstr(err, d[i].name)) {
            char why[1024];
            snprintf(why, sizeof why, "%s", err);
            snprintf(err, errlen, "dataset /%s: %s", d[i].name, why);
        }
    }
    void *vh = NULL;
    if (ok) ok = !H5_CHECK(H5Fget_vfd_handle(file, fapl, &vh));
    if (ok && !(pc = malloc((npc ? npc : 1) * sizeof *pc))) {
        snprintf(err, errlen, "out of memory for %zu I/O pieces", npc);
        ok = 0;
    }
    if (h5u_agree(comm, !ok, err, errlen)) goto done;
    t1 = MPI_Wtime();
    npc = 0;
    for (int i = 0; i < n; i++)
        if (d[i].rows && d[i].cols)
            npc += h5u_sel_pieces(&d[i].sel, d[i].cols, H5Tget_size(d[i].ftype), off[i],
                                  (char *)d[i].data, pc + npc);
    ok = h5u_xfer(comm, *(MPI_File *)vh, pc, npc, 1, &calls, err, errlen) == 0;
    if (h5u_agree(comm, !ok, err, errlen)) goto done;
    t2 = MPI_Wtime();
    /* Let the disk start writing the data back now (the commit's fsync then
     * finds most of it done) and hash meanwhile: the CPU work of the
     * checksums overlaps the disk work instead of preceding it. */
    char name[4200];
    if (H5Fget_name(file, name, sizeof name) > 0) {
        int fd = open(name, O_RDONLY);
        if (fd >= 0) {
            sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE);
            close(fd);
        }
    }
    for (int i = 0; i < n; i++)
        part[i] = hash(&d[i], arg);
    t3 = MPI_Wtime();
    /* every checksum in one reduction, the attributes after the data */
    MPI_Allreduce(part, sum, n, MPI_UINT64_T, MPI_SUM, comm);
    for (int i = 0; ok && i < n; i++)
        ok = !H5_CHECK(
            h5u_attr_write(dsh[i], "checksum", H5T_STD_U64LE, H5T_NATIVE_UINT64, 1, &sum[i]));
    rc = h5u_agree(comm, !ok, err, errlen);
done:
    if (tm) {
        tm->create = t1 - t0;
        tm->write = t2 - t1;
        tm->hash = t3 - t2;
        tm->attrs = MPI_Wtime() - t3;
        tm->calls = calls;
    }
    for (int i = 0; i < nopen; i++)
        if (dsh[i] >= 0) H5Dclose(dsh[i]);
    if (lcpl >= 0) H5Pclose(lcpl);
    if (dcpl >= 0) H5Pclose(dcpl);
    free(dsh);
    free(pc);
    free(part);
    free(sum);
    free(off);
    return rc;
}
