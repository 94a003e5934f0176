/* ckpt: parallel HDF5 writer/reader with atomic commit and checksums.
 *
 * Follows HDF5's parallel I/O advice: collective metadata writes, collective
 * raw-data transfers (one MPI_File_write_at_all / read_at_all for the whole
 * checkpoint, so there is no per-dataset fallback to independent I/O to
 * check for), 1 MiB alignment of large datasets, contiguous layout allocated
 * at creation and never filled, and file/memory types that match
 * (little-endian IEEE float32), so no datatype conversion happens.
 * Not here: the dataset writer itself (io/h5util.c, shared with qckpt).
 */
#include "io/ckpt.h"

#include "io/fsutil.h"
#include "io/h5util.h"

#include <dirent.h>
#include <errno.h>
#include <hdf5.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
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

/* A tensor's selection in normal form: segments and a column range. */
typedef h5u_sel sel_t;
_Static_assert(CKPT_MAX_SEG == H5U_MAX_SEG, "ckpt_tensor segments must fit an h5u_sel");

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
    for (int i = 0; i < s.nseg; i++)
        n += s.nrows[i] * s.ncols;
    return n;
}

/* h5u_hash_fn: ckpt_hash of d's selection (global positions row * cols +
 * col), segments back to back in d->data. */
static uint64_t sel_hash(const h5u_dset *d, void *arg) {
    const float *data = d->data;
    const h5u_sel *s = &d->sel;
    uint64_t h = 0;
    (void)arg;
    for (int i = 0; i < s->nseg; i++)
        for (uint64_t r = 0; r < s->nrows[i]; r++, data += s->ncols)
            h += ckpt_hash(data, s->ncols, (s->row0[i] + r) * d->cols + s->col0);
    return h;
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

/* Prefixes err with "PATH: " unless it already names PATH. */
static void name_file(char *err, size_t errlen, const char *path) {
    if (strstr(err, path)) return;
    char why[1024];
    snprintf(why, sizeof why, "%s", err);
    snprintf(err, errlen, "%s: %s", path, why);
}

int ckpt_begin(MPI_Comm comm, const char *dir, long long step, double need, char *path,
               size_t pathlen, char *err, size_t errlen) {
    int rank, rc = 0, all = 0;
    MPI_Comm_rank(comm, &rank);
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s/step-%08lld.tmp", dir, step);
    snprintf(path, pathlen, "%s/checkpoint.h5", tmp);
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
            snprintf(err, errlen,
                     "%s: not enough free space for the checkpoint (%.1f MiB needed, "
                     "%.1f MiB free)",
                     tmp, need / 1048576.0, (double)vfs.f_bavail * vfs.f_frsize / 1048576.0);
            fs_rm_rf(tmp);
            rc = -1;
        }
    }
    MPI_Allreduce(&rc, &all, 1, MPI_INT, MPI_MIN, comm);
    if (all && rank != 0) snprintf(err, errlen, "rank 0 could not prepare %s", tmp);
    return all ? -1 : 0;
}

int ckpt_write_attrs(hid_t file, const ckpt_meta *meta, char *err, size_t errlen) {
    long long ver = CKPT_FORMAT_VERSION;
    return H5_CHECK(h5u_attr_write_str(file, "format", CKPT_FORMAT)) ||
                   H5_CHECK(h5u_attr_write(file, "format_version", H5T_STD_I64LE, H5T_NATIVE_LLONG,
                                           1, &ver)) ||
                   H5_CHECK(h5u_attr_write(file, "step", H5T_STD_I64LE, H5T_NATIVE_LLONG, 1,
                                           &meta->step)) ||
                   H5_CHECK(h5u_attr_write(file, "tokens_seen", H5T_STD_I64LE, H5T_NATIVE_LLONG, 1,
                                           &meta->tokens_seen)) ||
                   H5_CHECK(h5u_attr_write(file, "layout", H5T_STD_I32LE, H5T_NATIVE_INT, 3,
                                           meta->layout)) ||
                   H5_CHECK(h5u_attr_write(file, "optim_t", H5T_STD_I64LE, H5T_NATIVE_LLONG, 1,
                                           &meta->optim_t)) ||
                   H5_CHECK(h5u_attr_write(file, "seed", H5T_STD_I64LE, H5T_NATIVE_LLONG, 1,
                                           &meta->seed)) ||
                   H5_CHECK(h5u_attr_write_str(file, "config", meta->config ? meta->config : ""))
               ? -1
               : 0;
}

int ckpt_finish(MPI_Comm comm, const char *dir, long long step, hid_t file, int rc, int keep_last,
                int keep_every, double *close_s, char *err, size_t errlen) {
    int rank, all = 0;
    MPI_Comm_rank(comm, &rank);
    char tmp[4096], fin[4096], path[4200];
    snprintf(tmp, sizeof tmp, "%s/step-%08lld.tmp", dir, step);
    snprintf(fin, sizeof fin, "%s/step-%08lld", dir, step);
    snprintf(path, sizeof path, "%s/checkpoint.h5", tmp);
    if (rc && file >= 0) {
        /* A failed collective write leaves HDF5's metadata cache out of step
         * between ranks and H5Fclose would hang: leave the file open, remove
         * the partial step, and tell the caller to abort the job. */
        if (rank == 0) fs_rm_rf(tmp);
        name_file(err, errlen, path);
        return CKPT_ERR_FATAL;
    }
    double t0 = MPI_Wtime();
    if (file >= 0 && H5Fclose(file) < 0 && rc == 0)
        rc = h5u_fail("H5Fclose", __FILE__, __LINE__, err, errlen);
    if (close_s) *close_s = MPI_Wtime() - t0;
    if (rc) name_file(err, errlen, path); /* name the file in every message */
    MPI_Allreduce(&rc, &all, 1, MPI_INT, MPI_MIN, comm);
    if (all == 0 && rank == 0) {
        /* every rank has closed: make it durable, then publish atomically */
        char latest[4200], ltmp[4200], name[64];
        snprintf(latest, sizeof latest, "%s/latest", dir);
        snprintf(ltmp, sizeof ltmp, "%s/.latest.tmp", dir);
        snprintf(name, sizeof name, "step-%08lld", step);
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
            retain(dir, keep_last, keep_every);
    }
    if (all != 0 && rank == 0) fs_rm_rf(tmp);
    MPI_Allreduce(&rc, &all, 1, MPI_INT, MPI_MIN, comm);
    return all ? -1 : 0;
}

int ckpt_save(MPI_Comm comm, const char *dir, const ckpt_tensor *t, int nt, const ckpt_meta *meta,
              const ckpt_save_opts *opts, char *err, size_t errlen) {
    return ckpt_save_timed(comm, dir, t, nt, meta, opts, NULL, err, errlen);
}

int ckpt_save_timed(MPI_Comm comm, const char *dir, const ckpt_tensor *t, int nt,
                    const ckpt_meta *meta, const ckpt_save_opts *opts, ckpt_stats *stats, char *err,
                    size_t errlen) {
    int rank, rc = -1;
    MPI_Comm_rank(comm, &rank);
    char path[4200];
    ckpt_stats st = {0};
    double t0 = MPI_Wtime(), t1;
    err[0] = 0;
    double need = 64.0 * 1024; /* data plus HDF5 metadata (measured: < 1 KiB a dataset) */
    for (int i = 0; i < nt; i++)
        need += (double)t[i].rows * t[i].cols * 4 + 1024;
    if (ckpt_begin(comm, dir, meta->step, need, path, sizeof path, err, errlen)) return -1;
    t1 = MPI_Wtime();
    st.prep = t1 - t0;

    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    hid_t fapl = -1, file = -1;
    h5u_dset *d = calloc(nt > 0 ? (size_t)nt : 1, sizeof *d);
    int ok = d != NULL;
    if (!ok) snprintf(err, errlen, "out of memory for %d tensor descriptors", nt);
    for (int i = 0; ok && i < nt; i++)
        d[i] = (h5u_dset){.name = t[i].name,
                          .ftype = H5T_IEEE_F32LE,
                          .ndim = t[i].ndim,
                          .rows = t[i].rows,
                          .cols = t[i].cols,
                          .sel = sel_of(&t[i]),
                          .data = t[i].data};
    if (h5u_agree(comm, !ok, err, errlen)) goto close;
    if (H5_CHECK(fapl = h5u_fapl(comm))) goto close;
    file = H5Fcreate(path, H5F_ACC_EXCL, H5P_DEFAULT, fapl);
    if (h5u_agree(comm, file < 0 ? h5u_fail("H5Fcreate", __FILE__, __LINE__, err, errlen) : 0, err,
                  errlen))
        goto close;
    h5u_times tm = {0};
    int kill = opts->fault_rank == rank ? opts->fault_after : -1;
    rc = h5u_write_dsets(comm, file, fapl, d, nt, sel_hash, NULL, kill, &tm, err, errlen);
    st.create = tm.create;
    st.xfer = tm.write;
    st.hash = tm.hash;
    st.calls = tm.calls;
    if (rc) goto close;
    rc = -1;
    if (h5u_agree(comm, ckpt_write_attrs(file, meta, err, errlen), err, errlen)) goto close;
    rc = 0;
close:
    free(d);
    t1 = MPI_Wtime();
    rc = ckpt_finish(comm, dir, meta->step, file, rc, opts->keep_last, opts->keep_every, &st.close,
                     err, errlen);
    if (fapl >= 0) H5Pclose(fapl);
    st.commit = MPI_Wtime() - t1 - st.close;
    st.total = MPI_Wtime() - t0;
    if (stats) *stats = st;
    return rc;
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
        snprintf(err, errlen,
                 "%s: neither a checkpoint step (no checkpoint.h5) nor a checkpoint "
                 "root (no latest)",
                 path);
        return -1;
    }
    return 0;
}

static void shape_str(char *b, size_t n, int nd, uint64_t d0, uint64_t d1) {
    if (nd == 2)
        snprintf(b, n, "[%llu, %llu]", (unsigned long long)d0, (unsigned long long)d1);
    else
        snprintf(b, n, "[%llu]", (unsigned long long)d0);
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
        snprintf(err, errlen,
                 "%s: unsupported checkpoint format_version %lld (this build reads %d)", fname, ver,
                 CKPT_FORMAT_VERSION);
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

/* What rank 0 finds out about each tensor's dataset. */
typedef struct {
    uint64_t off, want; /* file address of the data, stored checksum */
} dset_info;

/* Rank 0 alone: opens FILE with the serial driver, reads the root
 * attributes and, for every t[i], checks that its dataset exists with t's
 * shape as contiguous float32 little-endian (bytes as they are in memory),
 * and gets its address and checksum. One process reads the metadata and
 * broadcasts it once, instead of every rank reading it (or one broadcast per
 * object with collective metadata reads). */
static int scan_file(const char *fname, const ckpt_tensor *t, int nt, ckpt_meta *meta,
                     dset_info *info, char *err, size_t errlen) {
    hid_t file = H5Fopen(fname, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (file < 0) {
        h5u_fail("H5Fopen", __FILE__, __LINE__, err, errlen);
        char why[512];
        snprintf(why, sizeof why, "%s", err);
        snprintf(err, errlen, "%s: cannot open as HDF5 (truncated or not a checkpoint?) [%s]",
                 fname, why);
        return -1;
    }
    int rc = read_meta(file, fname, meta, err, errlen);
    for (int i = 0; rc == 0 && i < nt; i++) {
        hid_t d = -1, sp = -1, ty = -1;
        hsize_t dims[2] = {0, 1};
        int nd = 0;
        rc = -1;
        if (H5Lexists(file, t[i].name, H5P_DEFAULT) <= 0) {
            snprintf(err, errlen, "%s: dataset /%s is missing", fname, t[i].name);
        } else if (H5_CHECK(d = H5Dopen2(file, t[i].name, H5P_DEFAULT)) ||
                   H5_CHECK(sp = H5Dget_space(d)) || H5_CHECK(ty = H5Dget_type(d))) {
            name_file(err, errlen, fname);
        } else if ((nd = H5Sget_simple_extent_ndims(sp)) < 1 || nd > 2 ||
                   H5Sget_simple_extent_dims(sp, dims, NULL) < 0 || nd != t[i].ndim ||
                   dims[0] != t[i].rows || (nd == 2 && dims[1] != t[i].cols)) {
            char have[64], want[64];
            shape_str(have, sizeof have, nd, dims[0], dims[1]);
            shape_str(want, sizeof want, t[i].ndim, t[i].rows, t[i].cols);
            snprintf(err, errlen,
                     "%s: dataset /%s has shape %s, the model expects %s "
                     "(checkpoint of a different model shape?)",
                     fname, t[i].name, have, want);
        } else if (H5Tequal(ty, H5T_IEEE_F32LE) <= 0) {
            snprintf(err, errlen, "%s: dataset /%s is not float32 little-endian", fname, t[i].name);
        } else if (h5u_attr_read(d, "checksum", H5T_NATIVE_UINT64, &info[i].want) != 0) {
            snprintf(err, errlen, "%s: dataset /%s has no checksum attribute", fname, t[i].name);
        } else if (t[i].rows && t[i].cols && (info[i].off = H5Dget_offset(d)) == HADDR_UNDEF) {
            snprintf(err, errlen,
                     "%s: dataset /%s is not stored contiguously (not written by "
                     "mpilm?)",
                     fname, t[i].name);
        } else
            rc = 0;
        if (ty >= 0) H5Tclose(ty);
        if (sp >= 0) H5Sclose(sp);
        if (d >= 0) H5Dclose(d);
    }
    H5Eclear2(H5E_DEFAULT);
    H5Fclose(file);
    return rc;
}

/* Checksum coverage on load: every element must be hashed exactly once over
 * the ranks, whatever the ranks asked for (overlapping replicas, TP column
 * shards, pipeline stages holding only their layers). Rank r hashes rows
 * io_part(r) of every tensor: the part inside its own selection from its
 * destination buffer, the rest (rows or columns it did not ask for) from a
 * scratch buffer filled in the same collective read. */
typedef struct {
    int mode;      /* 0: count, 1: list the scratch pieces, 2: hash */
    uint64_t base; /* file address of the tensor */
    h5u_piece *pc; /* mode 1: appended here */
    size_t npc;
    float *scr;  /* next scratch float (modes 1, 2) */
    size_t nscr; /* mode 0: scratch floats needed */
    uint64_t h;  /* mode 2: the hash */
} walk_ctx;

/* Elements [pos, pos + n) of the tensor (global row-major positions),
 * not in this rank's selection. */
static void walk_extra(walk_ctx *w, uint64_t pos, uint64_t n) {
    if (!n) return;
    if (w->mode == 0) {
        w->npc++;
        w->nscr += n;
    } else if (w->mode == 1)
        w->pc[w->npc++] = (h5u_piece){w->base + pos * 4, n * 4, (char *)w->scr};
    else
        w->h += ckpt_hash(w->scr, n, pos);
    if (w->mode) w->scr += n;
}

static void walk_rows(walk_ctx *w, const ckpt_tensor *t, uint64_t lo, uint64_t hi) {
    sel_t s = sel_of(t);
    uint64_t C = t->cols, nc = s.ncols, c0 = s.col0;
    for (uint64_t r = lo, e; r < hi; r = e) {
        int k = -1;
        uint64_t base = 0, b = 0;
        for (int j = 0; j < s.nseg; b += s.nrows[j] * nc, j++)
            if (r >= s.row0[j] && r < s.row0[j] + s.nrows[j]) k = j, base = b;
        e = hi;
        if (k < 0) { /* up to the next segment: not mine at all */
            for (int j = 0; j < s.nseg; j++)
                if (s.row0[j] > r && s.row0[j] < e) e = s.row0[j];
            walk_extra(w, r * C, (e - r) * C);
            continue;
        }
        if (s.row0[k] + s.nrows[k] < e) e = s.row0[k] + s.nrows[k];
        const float *dst = t->data + base + (r - s.row0[k]) * nc;
        if (nc == C) {
            if (w->mode == 2) w->h += ckpt_hash(dst, (e - r) * C, r * C);
            continue;
        }
        for (uint64_t row = r; row < e; row++, dst += nc) {
            walk_extra(w, row * C, c0);
            if (w->mode == 2) w->h += ckpt_hash(dst, nc, row * C + c0);
            walk_extra(w, row * C + c0 + nc, C - c0 - nc);
        }
    }
}

int ckpt_load(MPI_Comm comm, const char *fname, ckpt_tensor *t, int nt, ckpt_meta *meta, char *err,
              size_t errlen) {
    return ckpt_load_timed(comm, fname, t, nt, meta, NULL, err, errlen);
}

int ckpt_load_timed(MPI_Comm comm, const char *fname, ckpt_tensor *t, int nt, ckpt_meta *meta,
                    ckpt_stats *stats, char *err, size_t errlen) {
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    int rank, p, rc = 0, all = 0, ok = 0;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &p);
    ckpt_stats st = {0};
    double t0 = MPI_Wtime(), t1;
    err[0] = 0;
    memset(meta, 0, sizeof *meta);
    size_t n1 = nt > 0 ? (size_t)nt : 1;
    dset_info *info = calloc(n1, sizeof *info);
    uint64_t *h = calloc(n1, sizeof *h), *hsum = calloc(n1, sizeof *hsum);
    h5u_piece *pc = NULL;
    float *scratch = NULL;
    MPI_File fh = MPI_FILE_NULL;
    if (!info || !h || !hsum) {
        snprintf(err, errlen, "out of memory for %d tensor descriptors", nt);
        rc = -1;
    }
    if (rc == 0 && rank == 0) rc = scan_file(fname, t, nt, meta, info, err, errlen);
    MPI_Allreduce(&rc, &all, 1, MPI_INT, MPI_MIN, comm);
    if (all) {
        if (!rc) snprintf(err, errlen, "rank 0 could not read %s", fname);
        goto done;
    }
    /* the root attributes and the dataset table: one broadcast each */
    long long mv[8] = {meta->step,      meta->tokens_seen,
                       meta->layout[0], meta->layout[1],
                       meta->layout[2], meta->optim_t,
                       meta->seed,      meta->config ? (long long)strlen(meta->config) : 0};
    MPI_Bcast(mv, 8, MPI_LONG_LONG, 0, comm);
    if (rank != 0) {
        *meta = (ckpt_meta){.step = mv[0],
                            .tokens_seen = mv[1],
                            .layout = {(int)mv[2], (int)mv[3], (int)mv[4]},
                            .optim_t = mv[5],
                            .seed = mv[6]};
        meta->config = calloc((size_t)mv[7] + 1, 1);
        rc = meta->config ? 0 : -1;
    }
    if (h5u_agree(comm, rc, err, errlen)) goto done;
    MPI_Bcast(meta->config, (int)mv[7], MPI_CHAR, 0, comm);
    MPI_Bcast(info, (int)(n1 * sizeof *info), MPI_BYTE, 0, comm);
    t1 = MPI_Wtime();
    st.prep = t1 - t0;

    /* one collective read: each rank's own selections straight into its
     * buffers, plus what it needs to verify its share of every checksum */
    walk_ctx w = {0};
    size_t npc = 0;
    for (int i = 0; i < nt; i++) {
        uint64_t lo, hi;
        io_part(t[i].rows, rank, p, &lo, &hi);
        sel_t s = sel_of(&t[i]);
        npc += h5u_sel_pieces(&s, t[i].cols, 4, 0, NULL, NULL);
        walk_rows(&w, &t[i], lo, hi);
    }
    pc = malloc((npc + w.npc + 1) * sizeof *pc);
    scratch = malloc((w.nscr + 1) * sizeof *scratch);
    rc = pc && scratch ? 0 : -1;
    if (rc) snprintf(err, errlen, "out of memory reading %s", fname);
    int e = MPI_File_open(comm, fname, MPI_MODE_RDONLY, MPI_INFO_NULL, &fh); /* collective */
    if (!rc) rc = h5u_mpi_check(e, "MPI_File_open", __FILE__, __LINE__, err, errlen);
    if (h5u_agree(comm, rc, err, errlen)) goto done;
    w = (walk_ctx){.mode = 1, .pc = pc + npc, .scr = scratch};
    npc = 0;
    for (int i = 0; i < nt; i++) {
        if (!t[i].rows || !t[i].cols) continue;
        uint64_t lo, hi;
        io_part(t[i].rows, rank, p, &lo, &hi);
        sel_t s = sel_of(&t[i]);
        npc += h5u_sel_pieces(&s, t[i].cols, 4, info[i].off, (char *)t[i].data, pc + npc);
        w.base = info[i].off;
        walk_rows(&w, &t[i], lo, hi);
    }
    memmove(pc + npc, w.pc, w.npc * sizeof *pc); /* close the gap (0-size tensors) */
    rc = h5u_xfer(comm, fh, pc, npc + w.npc, 0, &st.calls, err, errlen);
    if (rc) name_file(err, errlen, fname);
    rc |= MPIIO_CHECK(MPI_File_close(&fh));
    if (h5u_agree(comm, rc, err, errlen)) goto done;
    t1 = MPI_Wtime();
    st.xfer = t1 - t0 - st.prep;

    /* every checksum in one reduction */
    w = (walk_ctx){.mode = 2, .scr = scratch};
    for (int i = 0; i < nt; i++) {
        uint64_t lo, hi;
        io_part(t[i].rows, rank, p, &lo, &hi);
        w.h = 0;
        walk_rows(&w, &t[i], lo, hi);
        h[i] = w.h;
    }
    st.hash = MPI_Wtime() - t1;
    MPI_Allreduce(h, hsum, nt, MPI_UINT64_T, MPI_SUM, comm);
    for (int i = 0; i < nt && rc == 0; i++)
        if (hsum[i] != info[i].want) {
            snprintf(err, errlen, "%s: dataset /%s is corrupt (checksum %016llx, expected %016llx)",
                     fname, t[i].name, (unsigned long long)hsum[i],
                     (unsigned long long)info[i].want);
            rc = -1;
        }
    ok = rc == 0; /* the same on every rank */
done:
    if (fh != MPI_FILE_NULL) MPI_File_close(&fh);
    free(pc);
    free(scratch);
    free(info);
    free(h);
    free(hsum);
    if (!ok) {
        free(meta->config);
        meta->config = NULL;
    }
    st.total = MPI_Wtime() - t0;
    if (stats) *stats = st;
    return ok ? 0 : -1;
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
    if (d < 0 || (sp = H5Dget_space(d)) < 0 || (ty = H5Dget_type(d)) < 0)
        problem = "unreadable";
    else if (H5Tequal(ty, H5T_IEEE_F32LE) <= 0)
        problem = "not float32 little-endian";
    else if ((nd = H5Sget_simple_extent_ndims(sp)) < 1 || nd > 2 ||
             H5Sget_simple_extent_dims(sp, dims, NULL) < 0)
        problem = "not a 1-D or 2-D tensor";
    else if (h5u_attr_read(d, "checksum", H5T_NATIVE_UINT64, &want) != 0)
        problem = "no checksum attribute";
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
                (double)dims[0] * (nd == 2 ? dims[1] : 1) * 4 / 1048576.0,
                (unsigned long long)want);
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
    for (int i = 0; a->names && i < a->nt; i++)
        free(a->names[i]);
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
    for (int i = 0; i < nt; i++)
        total += ckpt_tensor_count(&t[i]);
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
