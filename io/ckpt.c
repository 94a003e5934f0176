/* ckpt: parallel HDF5 writer/reader with atomic commit and checksums.
 *
 * Follows HDF5's parallel I/O advice: collective metadata reads and writes,
 * collective raw-data transfers (and a check that they stayed collective),
 * 1 MiB alignment of large datasets, contiguous layout with early allocation,
 * and file/memory types that match (little-endian IEEE float32), so no
 * datatype conversion happens on the write path.
 */
#include "io/ckpt.h"

#include "io/fsutil.h"
#include "io/h5util.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <hdf5.h>
#include <pthread.h>
#include <time.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

uint64_t ckpt_hash(const float *x, size_t n, uint64_t first) {
    uint64_t s = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t bits;
        memcpy(&bits, &x[i], 4);
        uint64_t z = ((first + i) << 32 ^ bits) + 0x9e3779b97f4a7c15ULL;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        s += z ^ (z >> 31);
    }
    return s;
}

/* A tensor selection in normal form: segments and a column range. */
typedef struct {
    int nseg;
    uint64_t row0[CKPT_MAX_SEG], nrows[CKPT_MAX_SEG], col0, ncols;
} sel_t;

static sel_t sel_of(const ckpt_tensor *t) {
    sel_t s = {0};
    if (t->nseg > 0) {
        s.nseg = t->nseg;
        for (int i = 0; i < t->nseg; i++) {
            s.row0[i] = t->seg_row0[i];
            s.nrows[i] = t->seg_nrows[i];
        }
        s.col0 = t->col0;
        s.ncols = t->ncols ? t->ncols : t->cols;
    } else {
        s.nseg = t->nrows ? 1 : 0;
        s.row0[0] = t->row0;
        s.nrows[0] = t->nrows;
        s.ncols = t->cols;
    }
    return s;
}

uint64_t ckpt_tensor_count(const ckpt_tensor *t) {
    sel_t s = sel_of(t);
    uint64_t n = 0;
    for (int i = 0; i < s.nseg; i++) n += s.nrows[i] * s.ncols;
    return n;
}

/* Hash of the selection's elements (global positions row * cols + col). */
static uint64_t sel_hash(const ckpt_tensor *t, const float *data) {
    sel_t s = sel_of(t);
    uint64_t h = 0;
    for (int i = 0; i < s.nseg; i++)
        for (uint64_t r = 0; r < s.nrows[i]; r++, data += s.ncols)
            h += ckpt_hash(data, s.ncols, (s.row0[i] + r) * t->cols + s.col0);
    return h;
}

/* The selection as an HDF5 file-space selection (union of hyperslabs). */
static int sel_h5(const ckpt_tensor *t, hid_t space) {
    sel_t s = sel_of(t);
    if (s.nseg == 0) return H5Sselect_none(space) < 0 ? -1 : 0;
    for (int i = 0; i < s.nseg; i++) {
        hsize_t start[2] = {s.row0[i], s.col0}, count[2] = {s.nrows[i], s.ncols};
        if (H5Sselect_hyperslab(space, i ? H5S_SELECT_OR : H5S_SELECT_SET, start, NULL, count,
                                NULL) < 0)
            return -1;
    }
    return 0;
}

/* Rows [lo, hi) of a tensor that rank r of p owns in the I/O partition. */
static void io_part(uint64_t rows, int r, int p, uint64_t *lo, uint64_t *hi) {
    *lo = rows * (uint64_t)r / (uint64_t)p;
    *hi = rows * (uint64_t)(r + 1) / (uint64_t)p;
}

int ckpt_clean_tmp(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return 0;
    struct dirent *e;
    int rc = 0;
    while ((e = readdir(d)) != NULL) {
        size_t n = strlen(e->d_name);
        if (strncmp(e->d_name, "step-", 5) == 0 && n > 4 && !strcmp(e->d_name + n - 4, ".tmp")) {
            char p[4096];
            snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
            rc |= fs_rm_rf(p);
        }
    }
    closedir(d);
    return rc;
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Keeps the newest keep_last complete step directories, and those whose step
 * is a multiple of keep_every. Rank 0 only. */
static void retain(const char *dir, int keep_last, int keep_every) {
    if (keep_last <= 0) return;
    DIR *d = opendir(dir);
    if (!d) return;
    char *names[4096];
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL && n < 4096)
        if (!strncmp(e->d_name, "step-", 5) && !strchr(e->d_name, '.'))
            names[n++] = strdup(e->d_name);
    closedir(d);
    qsort(names, (size_t)n, sizeof *names, cmp_str); /* zero-padded: name order = step order */
    for (int i = 0; i < n; i++) {
        long long step = atoll(names[i] + 5);
        if (i < n - keep_last && !(keep_every > 0 && step % keep_every == 0)) {
            char p[4096];
            snprintf(p, sizeof p, "%s/%s", dir, names[i]);
            fs_rm_rf(p);
        }
        free(names[i]);
    }
}

/* Collective. Every phase ends in agreement, so a rank that fails (a full
 * disk, say) never leaves the others waiting in the next collective call. */
static int write_tensor(hid_t file, hid_t lcpl, hid_t dxpl, const ckpt_tensor *t, MPI_Comm comm,
                        int *independent, char *err, size_t errlen) {
    hsize_t dims[2] = {t->rows, t->cols};
    hid_t sp = -1, d = -1, ms = -1;
    int rc = -1;
    hsize_t n = ckpt_tensor_count(t), one = n ? n : 1;
    int ok = !H5_CHECK(sp = H5Screate_simple(t->ndim, dims, NULL)) &&
             !H5_CHECK(d = H5Dcreate2(file, t->name, H5T_IEEE_F32LE, sp, lcpl, H5P_DEFAULT,
                                      H5P_DEFAULT)) &&
             !H5_CHECK(ms = H5Screate_simple(1, &one, NULL)) && !H5_CHECK(sel_h5(t, sp));
    if (ok && !n) ok = !H5_CHECK(H5Sselect_none(ms));
    if (h5u_agree(comm, !ok, err, errlen)) goto done;
    ok = !H5_CHECK(H5Dwrite(d, H5T_NATIVE_FLOAT, ms, sp, dxpl, t->data));
    if (h5u_agree(comm, !ok, err, errlen)) goto done;
    H5D_mpio_actual_io_mode_t mode;
    if (H5Pget_mpio_actual_io_mode(dxpl, &mode) >= 0 && mode == H5D_MPIO_NO_COLLECTIVE)
        (*independent)++;
    uint64_t part = sel_hash(t, t->data), sum = 0;
    MPI_Allreduce(&part, &sum, 1, MPI_UINT64_T, MPI_SUM, comm);
    ok = !H5_CHECK(h5u_attr_write(d, "checksum", H5T_STD_U64LE, H5T_NATIVE_UINT64, 1, &sum));
    rc = h5u_agree(comm, !ok, err, errlen);
done:
    if (ms >= 0) H5Sclose(ms);
    if (d >= 0) H5Dclose(d);
    if (sp >= 0) H5Sclose(sp);
    return rc;
}

int ckpt_save(MPI_Comm comm, const char *dir, const ckpt_tensor *t, int nt,
              const ckpt_meta *meta, const ckpt_save_opts *opts, char *err, size_t errlen) {
    int rank, rc = 0, all = 0, independent = 0;
    MPI_Comm_rank(comm, &rank);
    char tmp[4096], fin[4096], path[4200];
    snprintf(tmp, sizeof tmp, "%s/step-%08lld.tmp", dir, meta->step);
    snprintf(fin, sizeof fin, "%s/step-%08lld", dir, meta->step);
    snprintf(path, sizeof path, "%s/checkpoint.h5", tmp);
    err[0] = 0;
    double need = 64.0 * 1024; /* data plus HDF5 metadata (measured: < 1 KiB a dataset) */
    for (int i = 0; i < nt; i++) need += (double)t[i].rows * t[i].cols * 4 + 1024;
    if (rank == 0) {
        fs_rm_rf(tmp);
        struct statvfs vfs;
        if (fs_mkdirs(dir) != 0 || mkdir(tmp, 0755) != 0) {
            snprintf(err, errlen, "%s: cannot create checkpoint directory: %s", tmp,
                     strerror(errno));
            rc = -1;
        } else if (statvfs(tmp, &vfs) == 0 && (double)vfs.f_bavail * vfs.f_frsize < need) {
            /* HDF5 cannot recover from a failed collective write, so a full
             * disk is refused before the file is created */
            snprintf(err, errlen, "%s: not enough free space for the checkpoint (%.1f MiB needed, "
                                  "%.1f MiB free)", tmp, need / 1048576.0,
                     (double)vfs.f_bavail * vfs.f_frsize / 1048576.0);
            fs_rm_rf(tmp);
            rc = -1;
        }
    }
    MPI_Allreduce(&rc, &all, 1, MPI_INT, MPI_MIN, comm);
    if (all) return -1;

    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    hid_t fapl = -1, file = -1, lcpl = -1, dxpl = -1;
    rc = -1;
    if (H5_CHECK(fapl = h5u_fapl(comm))) goto close;
    file = H5Fcreate(path, H5F_ACC_EXCL, H5P_DEFAULT, fapl);
    if (h5u_agree(comm, file < 0 ? h5u_fail("H5Fcreate", __FILE__, __LINE__, err, errlen) : 0, err,
              errlen))
        goto close;
    if (H5_CHECK(lcpl = H5Pcreate(H5P_LINK_CREATE)) ||
        H5_CHECK(H5Pset_create_intermediate_group(lcpl, 1)) ||
        H5_CHECK(dxpl = H5Pcreate(H5P_DATASET_XFER)) ||
        H5_CHECK(H5Pset_dxpl_mpio(dxpl, H5FD_MPIO_COLLECTIVE)))
        goto close;
    /* Dataset creation is collective: every rank walks the same list. */
    for (int i = 0; i < nt; i++) {
        if (opts->fault_rank == rank && opts->fault_after == i) raise(SIGKILL);
        if (write_tensor(file, lcpl, dxpl, &t[i], comm, &independent, err, errlen)) {
            char why[1024];
            snprintf(why, sizeof why, "%s", err);
            snprintf(err, errlen, "%s: dataset /%s: %s", path, t[i].name, why);
            goto close;
        }
    }
    long long ver = CKPT_FORMAT_VERSION;
    int bad = H5_CHECK(h5u_attr_write_str(file, "format", CKPT_FORMAT)) ||
        H5_CHECK(h5u_attr_write(file, "format_version", H5T_STD_I64LE, H5T_NATIVE_LLONG, 1, &ver)) ||
        H5_CHECK(h5u_attr_write(file, "step", H5T_STD_I64LE, H5T_NATIVE_LLONG, 1, &meta->step)) ||
        H5_CHECK(h5u_attr_write(file, "tokens_seen", H5T_STD_I64LE, H5T_NATIVE_LLONG, 1,
                            &meta->tokens_seen)) ||
        H5_CHECK(h5u_attr_write(file, "layout", H5T_STD_I32LE, H5T_NATIVE_INT, 3, meta->layout)) ||
        H5_CHECK(h5u_attr_write(file, "optim_t", H5T_STD_I64LE, H5T_NATIVE_LLONG, 1, &meta->optim_t)) ||
        H5_CHECK(h5u_attr_write(file, "seed", H5T_STD_I64LE, H5T_NATIVE_LLONG, 1, &meta->seed)) ||
        H5_CHECK(h5u_attr_write_str(file, "config", meta->config ? meta->config : ""));
    if (h5u_agree(comm, bad, err, errlen)) goto close;
    rc = 0;
close:
    if (dxpl >= 0) H5Pclose(dxpl);
    if (lcpl >= 0) H5Pclose(lcpl);
    if (rc && file >= 0) {
        /* A failed collective write leaves HDF5's metadata cache out of step
         * between ranks and H5Fclose would hang: leave the file open, remove
         * the partial step, and tell the caller to abort the job. */
        if (rank == 0) fs_rm_rf(tmp);
        if (!strstr(err, path)) {
            char why[1024];
            snprintf(why, sizeof why, "%s", err);
            snprintf(err, errlen, "%s: %s", path, why);
        }
        return CKPT_ERR_FATAL;
    }
    if (file >= 0 && H5Fclose(file) < 0 && rc == 0) rc = h5u_fail("H5Fclose", __FILE__, __LINE__, err, errlen);
    if (rc && !strstr(err, path)) { /* name the file in every message */
        char why[1024];
        snprintf(why, sizeof why, "%s", err);
        snprintf(err, errlen, "%s: %s", path, why);
    }
    if (fapl >= 0) H5Pclose(fapl);
    MPI_Allreduce(&rc, &all, 1, MPI_INT, MPI_MIN, comm);
    if (all == 0 && rank == 0) {
        /* every rank has closed: make it durable, then publish atomically */
        char latest[4200], ltmp[4200], name[64];
        snprintf(latest, sizeof latest, "%s/latest", dir);
        snprintf(ltmp, sizeof ltmp, "%s/.latest.tmp", dir);
        snprintf(name, sizeof name, "step-%08lld", meta->step);
        FILE *f = NULL;
        fs_rm_rf(fin); /* a same-step directory from an earlier run is replaced */
        if (fs_fsync_path(path) != 0 || rename(tmp, fin) != 0 || fs_fsync_path(dir) != 0 ||
            !(f = fopen(ltmp, "w")) || fprintf(f, "%s\n", name) < 0 || fflush(f) != 0 ||
            fsync(fileno(f)) != 0 || fclose(f) != 0 || (f = NULL, rename(ltmp, latest) != 0) ||
            fs_fsync_path(dir) != 0) {
            if (f) fclose(f);
            snprintf(err, errlen, "%s: cannot commit checkpoint: %s", fin, strerror(errno));
            rc = -1;
        } else
            retain(dir, opts->keep_last, opts->keep_every);
        if (independent)
            fprintf(stderr, "warning: %d checkpoint writes fell back to independent I/O\n",
                    independent);
    }
    if (all != 0 && rank == 0) fs_rm_rf(tmp);
    MPI_Allreduce(&rc, &all, 1, MPI_INT, MPI_MIN, comm);
    return all ? -1 : 0;
}

int ckpt_resolve(const char *path, char *out, size_t outlen, char *err, size_t errlen) {
    struct stat st;
    char latest[4200];
    if (stat(path, &st) != 0) {
        snprintf(err, errlen, "%s: no such checkpoint: %s", path, strerror(errno));
        return -1;
    }
    if (S_ISREG(st.st_mode)) {
        snprintf(out, outlen, "%s", path);
        return 0;
    }
    snprintf(latest, sizeof latest, "%s/latest", path);
    FILE *f = fopen(latest, "r");
    if (f) {
        char name[256] = "";
        int ok = fgets(name, sizeof name, f) != NULL;
        fclose(f);
        name[strcspn(name, "\r\n")] = 0;
        if (!ok || !name[0] || strchr(name, '/')) {
            snprintf(err, errlen, "%s: malformed (expected a step directory name)", latest);
            return -1;
        }
        snprintf(out, outlen, "%s/%s/checkpoint.h5", path, name);
        if (stat(out, &st) != 0) {
            snprintf(err, errlen, "%s points to %s, which does not exist", latest, name);
            return -1;
        }
        return 0;
    }
    snprintf(out, outlen, "%s/checkpoint.h5", path);
    if (stat(out, &st) != 0) {
        snprintf(err, errlen, "%s: neither a checkpoint step (no checkpoint.h5) nor a checkpoint "
                              "root (no latest)", path);
        return -1;
    }
    return 0;
}

static void shape_str(char *b, size_t n, int nd, uint64_t d0, uint64_t d1) {
    if (nd == 2) snprintf(b, n, "[%llu, %llu]", (unsigned long long)d0, (unsigned long long)d1);
    else snprintf(b, n, "[%llu]", (unsigned long long)d0);
}

/* Reads one tensor: partition rows across ranks, read collectively, verify
 * the checksum over the whole tensor, then redistribute rows to what each
 * rank asked for (Alltoallv), so every byte leaves the disk once. */
static int read_tensor(hid_t file, hid_t dxpl, ckpt_tensor *t, MPI_Comm comm, const char *fname,
                       char *err, size_t errlen) {
    int rank, p, rc = -1;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &p);
    hid_t d = -1, sp = -1, ms = -1;
    float *part = NULL;
    int *sc = NULL, *sd = NULL, *rcnt = NULL, *rd = NULL;
    sel_t *req = NULL;
    float *sbuf = NULL, *rbuf = NULL;
    if (H5Lexists(file, t->name, H5P_DEFAULT) <= 0) {
        snprintf(err, errlen, "%s: dataset /%s is missing", fname, t->name);
        goto done;
    }
    if (H5_CHECK(d = H5Dopen2(file, t->name, H5P_DEFAULT)) || H5_CHECK(sp = H5Dget_space(d)))
        goto done;
    hsize_t dims[2] = {0, 1};
    int nd = H5Sget_simple_extent_ndims(sp);
    if (nd < 1 || nd > 2 || H5Sget_simple_extent_dims(sp, dims, NULL) < 0 || nd != t->ndim ||
        dims[0] != t->rows || (nd == 2 && dims[1] != t->cols)) {
        char have[64], want[64];
        shape_str(have, sizeof have, nd, dims[0], dims[1]);
        shape_str(want, sizeof want, t->ndim, t->rows, t->cols);
        snprintf(err, errlen,
                 "%s: dataset /%s has shape %s, the model expects %s "
                 "(checkpoint of a different model shape?)",
                 fname, t->name, have, want);
        goto done;
    }
    uint64_t lo, hi, cols = t->cols;
    io_part(t->rows, rank, p, &lo, &hi);
    hsize_t n = (hi - lo) * cols, one = n ? n : 1, start[2] = {lo, 0}, count[2] = {hi - lo, cols};
    part = malloc((size_t)one * sizeof(float));
    if (!part) goto done;
    if (H5_CHECK(ms = H5Screate_simple(1, &one, NULL))) goto done;
    if (n) {
        if (H5_CHECK(H5Sselect_hyperslab(sp, H5S_SELECT_SET, start, NULL, count, NULL))) goto done;
    } else if (H5_CHECK(H5Sselect_none(sp)) || H5_CHECK(H5Sselect_none(ms)))
        goto done;
    if (H5_CHECK(H5Dread(d, H5T_NATIVE_FLOAT, ms, sp, dxpl, part))) goto done;
    uint64_t want = 0, mine = ckpt_hash(part, (size_t)n, lo * cols), sum = 0;
    MPI_Allreduce(&mine, &sum, 1, MPI_UINT64_T, MPI_SUM, comm);
    if (h5u_attr_read(d, "checksum", H5T_NATIVE_UINT64, &want) != 0) {
        snprintf(err, errlen, "%s: dataset /%s has no checksum attribute", fname, t->name);
        goto done;
    }
    if (want != sum) {
        snprintf(err, errlen, "%s: dataset /%s is corrupt (checksum %016llx, expected %016llx)",
                 fname, t->name, (unsigned long long)sum, (unsigned long long)want);
        goto done;
    }
    /* redistribute: my partition rows [lo,hi) -> each rank's selection.
     * For each rank, its segments in order, each clipped to the partition
     * rows, packed row by row over its column range. */
    req = malloc(sizeof(sel_t) * (size_t)p);
    sc = calloc((size_t)p, sizeof(int));
    sd = calloc((size_t)p, sizeof(int));
    rcnt = calloc((size_t)p, sizeof(int));
    rd = calloc((size_t)p, sizeof(int));
    if (!req || !sc || !sd || !rcnt || !rd) goto done;
    sel_t mysel = sel_of(t);
    MPI_Allgather(&mysel, (int)sizeof mysel, MPI_BYTE, req, (int)sizeof mysel, MPI_BYTE, comm);
    uint64_t nsend = 0, nrecv = 0;
    for (int r = 0; r < p; r++) {
        uint64_t plo, phi, cs = 0, cr = 0;
        io_part(t->rows, r, p, &plo, &phi);
        for (int k = 0; k < req[r].nseg; k++) { /* what I send to r */
            uint64_t a0 = req[r].row0[k] > lo ? req[r].row0[k] : lo;
            uint64_t b0 = req[r].row0[k] + req[r].nrows[k] < hi ? req[r].row0[k] + req[r].nrows[k] : hi;
            if (b0 > a0) cs += (b0 - a0) * req[r].ncols;
        }
        for (int k = 0; k < mysel.nseg; k++) { /* what r sends me */
            uint64_t a0 = mysel.row0[k] > plo ? mysel.row0[k] : plo;
            uint64_t b0 = mysel.row0[k] + mysel.nrows[k] < phi ? mysel.row0[k] + mysel.nrows[k] : phi;
            if (b0 > a0) cr += (b0 - a0) * mysel.ncols;
        }
        if (nsend + cs > (uint64_t)1 << 30 || nrecv + cr > (uint64_t)1 << 30) {
            snprintf(err, errlen, "%s: tensor /%s too large for one redistribution", fname, t->name);
            goto done;
        }
        sd[r] = (int)nsend;
        sc[r] = (int)cs;
        rd[r] = (int)nrecv;
        rcnt[r] = (int)cr;
        nsend += cs;
        nrecv += cr;
    }
    sbuf = malloc((nsend ? nsend : 1) * sizeof(float));
    rbuf = malloc((nrecv ? nrecv : 1) * sizeof(float));
    if (!sbuf || !rbuf) goto done;
    float *o = sbuf;
    for (int r = 0; r < p; r++)
        for (int k = 0; k < req[r].nseg; k++) {
            uint64_t a0 = req[r].row0[k] > lo ? req[r].row0[k] : lo;
            uint64_t b0 = req[r].row0[k] + req[r].nrows[k] < hi ? req[r].row0[k] + req[r].nrows[k] : hi;
            for (uint64_t row = a0; row < b0; row++, o += req[r].ncols)
                memcpy(o, part + (row - lo) * cols + req[r].col0, req[r].ncols * sizeof(float));
        }
    MPI_Alltoallv(sbuf, sc, sd, MPI_FLOAT, rbuf, rcnt, rd, MPI_FLOAT, comm);
    const float *in = rbuf;
    for (int r = 0; r < p; r++) { /* unpack in the order rank r packed */
        uint64_t plo, phi, base = 0;
        io_part(t->rows, r, p, &plo, &phi);
        for (int k = 0; k < mysel.nseg; k++) {
            uint64_t a0 = mysel.row0[k] > plo ? mysel.row0[k] : plo;
            uint64_t b0 = mysel.row0[k] + mysel.nrows[k] < phi ? mysel.row0[k] + mysel.nrows[k] : phi;
            if (b0 > a0) {
                size_t n0 = (b0 - a0) * mysel.ncols;
                memcpy(t->data + base + (a0 - mysel.row0[k]) * mysel.ncols, in, n0 * sizeof(float));
                in += n0;
            }
            base += mysel.nrows[k] * mysel.ncols;
        }
    }
    rc = 0;
done:
    free(sbuf);
    free(rbuf);
    free(req);
    free(sc);
    free(sd);
    free(rcnt);
    free(rd);
    free(part);
    if (ms >= 0) H5Sclose(ms);
    if (sp >= 0) H5Sclose(sp);
    if (d >= 0) H5Dclose(d);
    return rc;
}

static int read_meta(hid_t file, const char *fname, ckpt_meta *meta, char *err, size_t errlen) {
    long long ver = 0;
    char *fmt = h5u_attr_read_str(file, "format");
    int ok = fmt && strcmp(fmt, CKPT_FORMAT) == 0;
    if (!ok)
        snprintf(err, errlen, "%s: not an mpilm checkpoint (format attribute is '%s')", fname,
                 fmt ? fmt : "missing");
    free(fmt);
    if (!ok) return -1;
    if (h5u_attr_read(file, "format_version", H5T_NATIVE_LLONG, &ver) != 0 ||
        ver != CKPT_FORMAT_VERSION) {
        snprintf(err, errlen, "%s: unsupported checkpoint format_version %lld (this build reads %d)",
                 fname, ver, CKPT_FORMAT_VERSION);
        return -1;
    }
    if (h5u_attr_read(file, "step", H5T_NATIVE_LLONG, &meta->step) ||
        h5u_attr_read(file, "tokens_seen", H5T_NATIVE_LLONG, &meta->tokens_seen) ||
        h5u_attr_read(file, "layout", H5T_NATIVE_INT, meta->layout) ||
        h5u_attr_read(file, "optim_t", H5T_NATIVE_LLONG, &meta->optim_t) ||
        h5u_attr_read(file, "seed", H5T_NATIVE_LLONG, &meta->seed) ||
        !(meta->config = h5u_attr_read_str(file, "config"))) {
        snprintf(err, errlen, "%s: missing or malformed root attributes", fname);
        return -1;
    }
    return 0;
}

int ckpt_read_meta(const char *fname, ckpt_meta *meta, char *err, size_t errlen) {
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    memset(meta, 0, sizeof *meta);
    hid_t file = H5Fopen(fname, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (file < 0) {
        snprintf(err, errlen, "%s: cannot open as HDF5 (truncated or not a checkpoint?)", fname);
        H5Eclear2(H5E_DEFAULT);
        return -1;
    }
    int rc = read_meta(file, fname, meta, err, errlen);
    H5Fclose(file);
    if (rc) {
        free(meta->config);
        meta->config = NULL;
    }
    return rc;
}

int ckpt_load(MPI_Comm comm, const char *fname, ckpt_tensor *t, int nt, ckpt_meta *meta,
              char *err, size_t errlen) {
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    hid_t fapl = -1, file = -1, dxpl = -1;
    int rc = -1, all;
    err[0] = 0;
    memset(meta, 0, sizeof *meta);
    if (H5_CHECK(fapl = h5u_fapl(comm))) goto done;
    if ((file = H5Fopen(fname, H5F_ACC_RDONLY, fapl)) < 0) {
        h5u_fail("H5Fopen", __FILE__, __LINE__, err, errlen);
        char why[512];
        snprintf(why, sizeof why, "%s", err);
        snprintf(err, errlen, "%s: cannot open as HDF5 (truncated or not a checkpoint?) [%s]",
                 fname, why);
        goto done;
    }
    if (read_meta(file, fname, meta, err, errlen)) goto done;
    if (H5_CHECK(dxpl = H5Pcreate(H5P_DATASET_XFER)) ||
        H5_CHECK(H5Pset_dxpl_mpio(dxpl, H5FD_MPIO_COLLECTIVE)))
        goto done;
    rc = 0;
    for (int i = 0; i < nt && rc == 0; i++) {
        int mine = read_tensor(file, dxpl, &t[i], comm, fname, err, errlen);
        MPI_Allreduce(&mine, &rc, 1, MPI_INT, MPI_MIN, comm);
    }
done:
    if (dxpl >= 0) H5Pclose(dxpl);
    if (file >= 0) H5Fclose(file);
    if (fapl >= 0) H5Pclose(fapl);
    MPI_Allreduce(&rc, &all, 1, MPI_INT, MPI_MIN, comm);
    if (all) {
        free(meta->config);
        meta->config = NULL;
    }
    return all ? -1 : 0;
}

typedef struct {
    FILE *out;
    int verbose, problems, datasets;
    const char *fname;
    double bytes;
} verify_ctx;

static herr_t verify_one(hid_t file, const char *name, const H5L_info_t *li, void *data) {
    verify_ctx *v = data;
    H5O_info_t oi;
    (void)li;
    if (H5Oget_info_by_name(file, name, &oi, H5P_DEFAULT) < 0 || oi.type != H5O_TYPE_DATASET)
        return 0;
    v->datasets++;
    hid_t d = H5Dopen2(file, name, H5P_DEFAULT), sp = -1, ty = -1;
    float *buf = NULL;
    hsize_t dims[2] = {0, 1};
    int nd = 0;
    const char *problem = NULL;
    uint64_t want = 0, have = 0;
    if (d < 0 || (sp = H5Dget_space(d)) < 0 || (ty = H5Dget_type(d)) < 0) problem = "unreadable";
    else if (H5Tequal(ty, H5T_IEEE_F32LE) <= 0) problem = "not float32 little-endian";
    else if ((nd = H5Sget_simple_extent_ndims(sp)) < 1 || nd > 2 ||
             H5Sget_simple_extent_dims(sp, dims, NULL) < 0)
        problem = "not a 1-D or 2-D tensor";
    else if (h5u_attr_read(d, "checksum", H5T_NATIVE_UINT64, &want) != 0) problem = "no checksum attribute";
    else {
        size_t n = (size_t)(dims[0] * (nd == 2 ? dims[1] : 1));
        buf = malloc((n ? n : 1) * sizeof(float));
        if (!buf || H5Dread(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf) < 0)
            problem = "data unreadable (truncated file?)";
        else if ((have = ckpt_hash(buf, n, 0)) != want)
            problem = "checksum mismatch (corrupt data)";
        v->bytes += (double)n * 4;
    }
    char shape[64];
    shape_str(shape, sizeof shape, nd, dims[0], dims[1]);
    if (problem) {
        v->problems++;
        fprintf(v->out, "%s: dataset /%s: %s\n", v->fname, name, problem);
    } else if (v->verbose)
        fprintf(v->out, "  %-36s %-14s %10.3f MiB  checksum %016llx ok\n", name, shape,
                (double)dims[0] * (nd == 2 ? dims[1] : 1) * 4 / 1048576.0, (unsigned long long)want);
    free(buf);
    if (ty >= 0) H5Tclose(ty);
    if (sp >= 0) H5Sclose(sp);
    if (d >= 0) H5Dclose(d);
    H5Eclear2(H5E_DEFAULT);
    return 0;
}

int ckpt_verify(const char *fname, FILE *out, int verbose) {
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    ckpt_meta m;
    char err[1024];
    if (ckpt_read_meta(fname, &m, err, sizeof err) != 0) {
        fprintf(out, "%s\n", err);
        return -1;
    }
    free(m.config);
    hid_t file = H5Fopen(fname, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (file < 0) return -1;
    verify_ctx v = {out, verbose, 0, 0, fname, 0};
    if (H5Lvisit(file, H5_INDEX_NAME, H5_ITER_INC, verify_one, &v) < 0) {
        fprintf(out, "%s: cannot walk the file's groups (corrupt metadata?)\n", fname);
        v.problems++;
    }
    H5Fclose(file);
    if (v.datasets == 0) {
        fprintf(out, "%s: no tensors\n", fname);
        v.problems++;
    }
    if (verbose)
        fprintf(out, "%d datasets, %.1f MiB, %d problem(s)\n", v.datasets, v.bytes / 1048576.0,
                v.problems);
    return v.problems;
}

int ckpt_check_shapes(const char *fname, const ckpt_tensor *t, int nt, FILE *out) {
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    hid_t file = H5Fopen(fname, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (file < 0) {
        fprintf(out, "%s: cannot open as HDF5\n", fname);
        return -1;
    }
    int problems = 0;
    for (int i = 0; i < nt; i++) {
        hsize_t dims[2] = {0, 1};
        int nd = -1;
        if (H5Lexists(file, t[i].name, H5P_DEFAULT) > 0) {
            hid_t d = H5Dopen2(file, t[i].name, H5P_DEFAULT), sp = d < 0 ? -1 : H5Dget_space(d);
            if (sp >= 0) nd = H5Sget_simple_extent_ndims(sp);
            if (sp >= 0 && (nd < 1 || nd > 2 || H5Sget_simple_extent_dims(sp, dims, NULL) < 0))
                nd = 0;
            if (sp >= 0) H5Sclose(sp);
            if (d >= 0) H5Dclose(d);
        }
        char have[64], want[64];
        shape_str(want, sizeof want, t[i].ndim, t[i].rows, t[i].cols);
        if (nd < 0) {
            fprintf(out, "%s: dataset /%s is missing (expected %s)\n", fname, t[i].name, want);
            problems++;
        } else if (nd != t[i].ndim || dims[0] != t[i].rows || (nd == 2 && dims[1] != t[i].cols)) {
            shape_str(have, sizeof have, nd, dims[0], dims[1]);
            fprintf(out, "%s: dataset /%s has shape %s, the model expects %s\n", fname, t[i].name,
                    have, want);
            problems++;
        }
    }
    H5Eclear2(H5E_DEFAULT);
    H5Fclose(file);
    return problems;
}

/* ---- asynchronous save --------------------------------------------------- */

struct ckpt_async {
    MPI_Comm comm; /* private duplicate: the writer thread's collectives */
    pthread_t thread;
    int running, rc;
    double seconds;
    char dir[4096], err[1024];
    float *snap; /* this rank's rows of all tensors, back to back */
    size_t cap;
    ckpt_tensor *t; /* copies of the descriptors, data pointing into snap */
    char **names;
    int nt;
    ckpt_meta meta;
    ckpt_save_opts opts;
};

int ckpt_async_create(MPI_Comm comm, ckpt_async **out) {
    ckpt_async *a = calloc(1, sizeof *a);
    if (!a || MPI_Comm_dup(comm, &a->comm) != MPI_SUCCESS) {
        free(a);
        return -1;
    }
    *out = a;
    return 0;
}

static void async_release(ckpt_async *a) {
    for (int i = 0; a->names && i < a->nt; i++) free(a->names[i]);
    free(a->names);
    free(a->t);
    free(a->meta.config);
    a->names = NULL;
    a->t = NULL;
    a->meta.config = NULL;
    a->nt = 0;
}

static void *async_main(void *arg) {
    ckpt_async *a = arg;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    a->rc = ckpt_save(a->comm, a->dir, a->t, a->nt, &a->meta, &a->opts, a->err, sizeof a->err);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    a->seconds = (double)(t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;
    return NULL;
}

int ckpt_async_wait(ckpt_async *a, double *seconds, char *err, size_t errlen) {
    if (!a || !a->running) return 0;
    pthread_join(a->thread, NULL);
    a->running = 0;
    if (seconds) *seconds = a->seconds;
    if (a->rc) snprintf(err, errlen, "%s", a->err);
    async_release(a);
    return a->rc;
}

int ckpt_async_start(ckpt_async *a, const char *dir, const ckpt_tensor *t, int nt,
                     const ckpt_meta *meta, const ckpt_save_opts *opts) {
    char err[1024];
    if (ckpt_async_wait(a, NULL, err, sizeof err)) fprintf(stderr, "%s\n", err);
    size_t total = 0;
    for (int i = 0; i < nt; i++) total += ckpt_tensor_count(&t[i]);
    int ok = 1;
    if (total > a->cap) {
        free(a->snap);
        a->snap = malloc(total * sizeof(float));
        a->cap = a->snap ? total : 0;
        ok = a->snap != NULL;
    }
    size_t n = nt > 0 ? (size_t)nt : 1;
    a->t = calloc(n, sizeof *a->t);
    a->names = calloc(n, sizeof *a->names);
    a->meta = *meta;
    a->meta.config = meta->config ? strdup(meta->config) : NULL;
    ok = ok && a->t && a->names;
    size_t off = 0;
    for (int i = 0; ok && i < nt; i++) {
        a->t[i] = t[i];
        a->names[i] = strdup(t[i].name);
        a->t[i].name = a->names[i];
        a->t[i].data = a->snap + off;
        memcpy(a->t[i].data, t[i].data, ckpt_tensor_count(&t[i]) * sizeof(float));
        off += ckpt_tensor_count(&t[i]);
    }
    a->nt = nt;
    /* every rank must start the thread, or the others' collectives would hang */
    int all = 0, mine = ok ? 0 : 1;
    MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_MAX, a->comm);
    if (all) {
        async_release(a);
        return -1;
    }
    snprintf(a->dir, sizeof a->dir, "%s", dir);
    a->opts = *opts;
    a->rc = 0;
    if (pthread_create(&a->thread, NULL, async_main, a) != 0) {
        /* cannot start the writer: write synchronously instead */
        a->rc = ckpt_save(a->comm, a->dir, a->t, a->nt, &a->meta, &a->opts, a->err, sizeof a->err);
        return a->rc;
    }
    a->running = 1;
    return 0;
}

void ckpt_async_destroy(ckpt_async *a) {
    if (!a) return;
    char err[1024];
    ckpt_async_wait(a, NULL, err, sizeof err);
    async_release(a);
    free(a->snap);
    MPI_Comm_free(&a->comm);
    free(a);
}
