/* bench ckpt: GB/s of checkpoint save and load through io/ckpt (one shared
 * HDF5 file, collective MPI-IO), next to the raw sequential write and read
 * bandwidth of the same directory measured in the same run (DESIGN.md
 * section 7: the target is save >= 70% of raw write).
 *
 * Two tensor sets: the model + AdamW m, v of a job (default jobs/small.yaml,
 * the same tensor list and row split src/gptio.c writes) and a synthetic set
 * of --size-mb MB in a few dozen tensors of 2 to 100 MB. Each rank writes
 * only its own rows. For comparison, with no effect on io/ckpt:
 *   - raw write: one process, write() of 64 MiB + fdatasync; with N ranks
 *     also each rank pwrite()ing its slice of one file; the faster of the
 *     two is the baseline ("of raw"), reads likewise;
 *   - MPI-IO: MPI_File_write_at_all of contiguous slices, no HDF5;
 *   - fpr+VDS: a file per rank (HDF5 sec2 driver) plus a main file whose
 *     virtual datasets (H5Pset_virtual) stitch the shards into the global
 *     tensors, committed the same way (tmp dir, fsync, rename);
 *   - the checksum (ckpt_hash) alone, the CPU work save and load add.
 * Reads are timed cold: files are fsync'ed, then posix_fadvise(DONTNEED)
 * drops their pages, and the table shows the fraction still resident (mincore)
 * just before the read. A VM's host may still cache the virtual disk.
 * After each table: where io/ckpt's time goes (ckpt_stats phases, the
 * slowest rank's, median) and how many collective MPI-IO calls it made.
 * Each figure is the median of --reps runs; the methods take turns inside a
 * repetition, starting at a different one each time, so background load and
 * order effects spread evenly. GB = 1e9 bytes.
 * Not here: multi-node cache dropping (pages are dropped on every rank's
 * node, but residency is measured on rank 0's only).
 */
#include "bench/bench.h"

#include "io/ckpt.h"
#include "io/fsutil.h"
#include "src/config.h"
#include "src/gpt.h"
#include "src/spmd.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <hdf5.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#define MAXREPS 32
#define CHUNK ((size_t)64 << 20) /* raw write()/read() size */

enum {
    W_RAW1,
    W_RAWN,
    W_MPIIO,
    W_CKPT,
    W_FPR,
    HASH,
    R_RAW1,
    R_RAW1_WARM,
    R_RAWN,
    R_MPIIO,
    R_CKPT,
    R_CKPT_WARM,
    R_CKPT_REPL,
    R_FPR,
    NOPS
};
static const struct {
    const char *key, *label;
    int read; /* ratio against raw read (cold, or warm for *_WARM) instead of raw write */
} ops[NOPS] = {
    {"raw_write", "raw write, 1 writer (write+fdatasync)", 0},
    {"raw_write_n", "raw write, N writers (slices of 1 file)", 0},
    {"mpiio_write", "MPI-IO write_at_all + sync (no HDF5)", 0},
    {"ckpt_save", "ckpt_save (shared file, collective)", 0},
    {"fpr_vds_save", "file per rank + VDS main file save", 0},
    {"checksum", "ckpt_hash of own shard only (CPU)", 0},
    {"raw_read", "raw read, 1 reader, cold", 1},
    {"raw_read_warm", "raw read, 1 reader, warm cache", 2},
    {"raw_read_n", "raw read, N readers (slices), cold", 1},
    {"mpiio_read", "MPI-IO read_at_all (no HDF5), cold", 1},
    {"ckpt_load", "ckpt_load own rows, cold", 1},
    {"ckpt_load_warm", "ckpt_load own rows, warm cache", 2},
    {"ckpt_load_repl", "ckpt_load full replica/rank (gptio), cold", 1},
    {"fpr_vds_load", "fpr+VDS load own rows via main file, cold", 1},
};

/* ckpt_stats phases, in the order printed */
#define NPHASE 7
static const char *const phase_name[NPHASE] = {"prep",  "hash",   "create", "xfer",
                                               "close", "commit", "total"};

static void phases_of(const ckpt_stats *s, double *v) {
    double x[NPHASE] = {s->prep, s->hash, s->create, s->xfer, s->close, s->commit, s->total};
    memcpy(v, x, sizeof x);
}

typedef struct {
    MPI_Comm comm;
    int rank, p, reps, keep;
    char work[4096]; /* DIR/mpilm-bench-PID: everything this run writes */
    char err[1024];
} bctx;

typedef struct {
    const char *name; /* the job's name (e.g. "small") or "synth" */
    char label[64];
    int id;                          /* 0, 1: keeps step numbers of the two sets apart */
    ckpt_tensor *save, *load, *repl; /* own rows of src; own rows of dst; all rows (or NULL) */
    int nt;
    uint64_t bytes; /* global bytes of all tensors */
    float *src, *dst, *full, *fullsrc;
    size_t own; /* floats this rank holds */
    double t[NOPS][MAXREPS];
    double resident[NOPS]; /* max fraction of the file cached before a read */
    int have[NOPS];
    /* phase times of ckpt_save and cold ckpt_load: [save/load][phase][rep],
     * the slowest rank's; calls: collective MPI-IO transfers per save/load */
    double ph[2][NPHASE][MAXREPS];
    int calls[2];
} bcase;

/* ---------------------------------------------------------------- helpers */

static double now_sync(MPI_Comm c) {
    MPI_Barrier(c);
    return spmd_now();
}

static void fill(float *x, size_t n, uint64_t seed) {
    uint64_t s = seed * 0x9e3779b97f4a7c15ULL + 1;
    for (size_t i = 0; i < n; i++) {
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        x[i] = (float)((int32_t)(s >> 32)) * (1.0f / 2147483648.0f);
    }
}

static int cmp_dbl(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(const double *v, int n) {
    double s[MAXREPS];
    memcpy(s, v, (size_t)n * sizeof *s);
    qsort(s, (size_t)n, sizeof *s, cmp_dbl);
    return n % 2 ? s[n / 2] : 0.5 * (s[n / 2 - 1] + s[n / 2]);
}

/* Fraction of PATH's pages in the page cache (mincore), or -1. */
static double resident_file(const char *path, uint64_t *bytes) {
    int fd = open(path, O_RDONLY);
    struct stat st;
    double r = -1;
    if (fd < 0) return -1;
    if (fstat(fd, &st) == 0 && st.st_size > 0) {
        long pg = sysconf(_SC_PAGESIZE);
        size_t np = ((size_t)st.st_size + (size_t)pg - 1) / (size_t)pg;
        void *m = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
        unsigned char *v = malloc(np);
        if (m != MAP_FAILED && v && mincore(m, (size_t)st.st_size, v) == 0) {
            size_t in = 0;
            for (size_t i = 0; i < np; i++)
                in += v[i] & 1;
            r = (double)in / (double)np;
            *bytes = (uint64_t)st.st_size;
        }
        free(v);
        if (m != MAP_FAILED) munmap(m, (size_t)st.st_size);
    }
    close(fd);
    return r;
}

/* Calls fn on PATH, or on every regular file directly in PATH if it is a
 * directory. */
static void each_file(const char *path, void (*fn)(const char *, void *), void *arg) {
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode)) {
        fn(path, arg);
        return;
    }
    DIR *d = opendir(path);
    struct dirent *e;
    while (d && (e = readdir(d)) != NULL) {
        char f[4400];
        snprintf(f, sizeof f, "%s/%s", path, e->d_name);
        if (e->d_name[0] != '.' && stat(f, &st) == 0 && S_ISREG(st.st_mode)) fn(f, arg);
    }
    if (d) closedir(d);
}

static void drop_one(const char *file, void *arg) {
    (void)arg;
    int fd = open(file, O_RDONLY);
    if (fd < 0) return;
    fdatasync(fd); /* DONTNEED drops only clean pages */
    posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    close(fd);
}

static void count_one(const char *file, void *arg) {
    double *acc = arg; /* [resident bytes, bytes] */
    uint64_t b = 0;
    double r = resident_file(file, &b);
    if (r >= 0) {
        acc[0] += r * (double)b;
        acc[1] += (double)b;
    }
}

/* Drops the cached pages of PATH (a file, or the files directly in a
 * directory) after syncing them, on every rank (so on each rank's node).
 * Returns the fraction of bytes still resident afterwards. Collective. */
static double drop_cache(MPI_Comm comm, const char *path) {
    double acc[2] = {0, 0};
    each_file(path, drop_one, NULL);
    MPI_Barrier(comm);
    each_file(path, count_one, acc);
    return acc[1] > 0 ? acc[0] / acc[1] : 0;
}

/* Fraction resident without dropping anything (for the warm reads). */
static double resident_path(const char *path) {
    uint64_t b = 0;
    double r = resident_file(path, &b);
    return r < 0 ? 0 : r;
}

/* ---------------------------------------------------------------- raw I/O */

static int write_all(int fd, const char *buf, size_t n, off_t off) {
    while (n) {
        ssize_t w = pwrite(fd, buf, n, off);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        buf += w;
        n -= (size_t)w;
        off += w;
    }
    return 0;
}

/* Writes bytes [lo, hi) of PATH from a CHUNK-sized pattern buffer. */
static int raw_write(const char *path, int create, uint64_t lo, uint64_t hi, const char *chunk) {
    int fd = open(path, O_WRONLY | (create ? O_CREAT | O_TRUNC : 0), 0644);
    if (fd < 0) return -1;
    int rc = 0;
    for (uint64_t o = lo; o < hi && rc == 0; o += CHUNK) {
        size_t n = hi - o < CHUNK ? (size_t)(hi - o) : CHUNK;
        rc = write_all(fd, chunk, n, (off_t)o);
    }
    if (rc == 0) rc = fdatasync(fd);
    if (close(fd) != 0) rc = -1;
    return rc;
}

static int raw_read(const char *path, uint64_t lo, uint64_t hi, char *buf) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    uint64_t o = lo;
    while (o < hi) {
        size_t n = hi - o < CHUNK ? (size_t)(hi - o) : CHUNK;
        ssize_t r = pread(fd, buf, n, (off_t)o);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        o += (uint64_t)r;
    }
    close(fd);
    return o == hi ? 0 : -1;
}

/* Collective: each rank writes (or reads) its contiguous slice [lo, hi) of
 * PATH with MPI_File_write_at_all (read_at_all), CHUNK bytes a call from/into
 * buf; writes end with MPI_File_sync. */
static int mpiio_io(MPI_Comm comm, const char *path, uint64_t lo, uint64_t hi, char *buf,
                    int write) {
    MPI_File f;
    int mode = write ? MPI_MODE_CREATE | MPI_MODE_WRONLY : MPI_MODE_RDONLY;
    if (MPI_File_open(comm, path, mode, MPI_INFO_NULL, &f) != MPI_SUCCESS) return -1;
    int rc = 0;
    uint64_t mine = (hi - lo + CHUNK - 1) / CHUNK, rounds = 0;
    MPI_Allreduce(&mine, &rounds, 1, MPI_UINT64_T, MPI_MAX, comm);
    for (uint64_t i = 0; i < rounds; i++) { /* same number of collective calls on every rank */
        uint64_t o = lo + i * CHUNK;
        int n = o < hi ? (int)(hi - o < CHUNK ? hi - o : CHUNK) : 0;
        MPI_Offset off = (MPI_Offset)(o < hi ? o : lo);
        int e = write ? MPI_File_write_at_all(f, off, buf, n, MPI_BYTE, MPI_STATUS_IGNORE)
                      : MPI_File_read_at_all(f, off, buf, n, MPI_BYTE, MPI_STATUS_IGNORE);
        if (e != MPI_SUCCESS) rc = -1;
    }
    if (write && MPI_File_sync(f) != MPI_SUCCESS) rc = -1;
    if (MPI_File_close(&f) != MPI_SUCCESS) rc = -1;
    return rc;
}

/* ------------------------------------------------- file per rank + VDS */

static int h5fail(const char *what, int line, char *err, size_t len) {
    snprintf(err, len, "bench_ckpt.c:%d: %s failed", line, what);
    H5Eclear2(H5E_DEFAULT);
    return -1;
}
#define H5C(call) ((call) < 0 ? h5fail(#call, __LINE__, err, errlen) : 0)

static void part_of(uint64_t rows, int r, int p, uint64_t *lo, uint64_t *n) {
    *lo = rows * (uint64_t)r / (uint64_t)p;
    *n = rows * (uint64_t)(r + 1) / (uint64_t)p - *lo;
}

/* This rank's shard file: one dataset per tensor, holding its own rows. */
static int fpr_write_shard(const char *path, const ckpt_tensor *t, int nt, char *err,
                           size_t errlen) {
    hid_t fapl = -1, f = -1, lcpl = -1;
    int rc = -1;
    if (H5C(fapl = H5Pcreate(H5P_FILE_ACCESS)) || H5C(H5Pset_fapl_sec2(fapl)) ||
        H5C(f = H5Fcreate(path, H5F_ACC_EXCL, H5P_DEFAULT, fapl)) ||
        H5C(lcpl = H5Pcreate(H5P_LINK_CREATE)) || H5C(H5Pset_create_intermediate_group(lcpl, 1)))
        goto done;
    for (int i = 0; i < nt; i++) {
        if (!t[i].nrows) continue;
        hsize_t dims[2] = {t[i].nrows, t[i].cols};
        hid_t sp = H5Screate_simple(t[i].ndim, dims, NULL), d = -1;
        int bad =
            H5C(sp) ||
            H5C(d = H5Dcreate2(f, t[i].name, H5T_IEEE_F32LE, sp, lcpl, H5P_DEFAULT, H5P_DEFAULT)) ||
            H5C(H5Dwrite(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, t[i].data));
        if (d >= 0) H5Dclose(d);
        if (sp >= 0) H5Sclose(sp);
        if (bad) goto done;
    }
    rc = 0;
done:
    if (lcpl >= 0) H5Pclose(lcpl);
    if (f >= 0 && H5Fclose(f) < 0 && rc == 0) rc = h5fail("H5Fclose", __LINE__, err, errlen);
    if (fapl >= 0) H5Pclose(fapl);
    return rc;
}

/* Rank 0: main file whose datasets map every rank's shard into the global
 * shape. part[r * 2 * nt + 2 * i] = row0, + 1 = nrows of tensor i on rank r. */
static int fpr_write_main(const char *path, const ckpt_tensor *t, int nt, int p,
                          const uint64_t *part, const uint64_t *sums, long long step, char *err,
                          size_t errlen) {
    hid_t f = -1, lcpl = -1, as = -1, a = -1;
    int rc = -1;
    if (H5C(f = H5Fcreate(path, H5F_ACC_EXCL, H5P_DEFAULT, H5P_DEFAULT)) ||
        H5C(lcpl = H5Pcreate(H5P_LINK_CREATE)) || H5C(H5Pset_create_intermediate_group(lcpl, 1)))
        goto done;
    for (int i = 0; i < nt; i++) {
        hsize_t dims[2] = {t[i].rows, t[i].cols};
        hid_t vs = -1, dcpl = -1, d = -1, das = -1, da = -1;
        int bad = H5C(vs = H5Screate_simple(t[i].ndim, dims, NULL)) ||
                  H5C(dcpl = H5Pcreate(H5P_DATASET_CREATE));
        for (int r = 0; r < p && !bad; r++) {
            uint64_t row0 = part[((size_t)r * nt + i) * 2],
                     nrows = part[((size_t)r * nt + i) * 2 + 1];
            if (!nrows) continue;
            hsize_t start[2] = {row0, 0}, count[2] = {nrows, t[i].cols};
            char src[64];
            snprintf(src, sizeof src, "shard-%05d.h5", r); /* relative: found next to main */
            hid_t ss = H5Screate_simple(t[i].ndim, count, NULL);
            bad = H5C(ss) ||
                  H5C(H5Sselect_hyperslab(vs, H5S_SELECT_SET, start, NULL, count, NULL)) ||
                  H5C(H5Pset_virtual(dcpl, vs, src, t[i].name, ss));
            if (ss >= 0) H5Sclose(ss);
        }
        if (!bad && H5C(H5Sselect_all(vs))) bad = 1;
        if (!bad)
            bad =
                H5C(d = H5Dcreate2(f, t[i].name, H5T_IEEE_F32LE, vs, lcpl, dcpl, H5P_DEFAULT)) ||
                H5C(das = H5Screate(H5S_SCALAR)) ||
                H5C(da = H5Acreate2(d, "checksum", H5T_STD_U64LE, das, H5P_DEFAULT, H5P_DEFAULT)) ||
                H5C(H5Awrite(da, H5T_NATIVE_UINT64, &sums[i]));
        if (da >= 0) H5Aclose(da);
        if (das >= 0) H5Sclose(das);
        if (d >= 0) H5Dclose(d);
        if (dcpl >= 0) H5Pclose(dcpl);
        if (vs >= 0) H5Sclose(vs);
        if (bad) goto done;
    }
    if (H5C(as = H5Screate(H5S_SCALAR)) ||
        H5C(a = H5Acreate2(f, "step", H5T_STD_I64LE, as, H5P_DEFAULT, H5P_DEFAULT)) ||
        H5C(H5Awrite(a, H5T_NATIVE_LLONG, &step)))
        goto done;
    rc = 0;
done:
    if (a >= 0) H5Aclose(a);
    if (as >= 0) H5Sclose(as);
    if (lcpl >= 0) H5Pclose(lcpl);
    if (f >= 0 && H5Fclose(f) < 0 && rc == 0) rc = h5fail("H5Fclose", __LINE__, err, errlen);
    return rc;
}

/* Collective: the file-per-rank writer, committed like ckpt_save (write into
 * DIR/fpr-STEP.tmp, fsync every file, rank 0 renames and fsyncs DIR). */
static int fpr_save(bctx *c, const ckpt_tensor *t, int nt, long long step) {
    char *err = c->err;
    size_t errlen = sizeof c->err;
    char tmp[4200], fin[4200], path[4300];
    snprintf(tmp, sizeof tmp, "%s/fpr-%08lld.tmp", c->work, step);
    snprintf(fin, sizeof fin, "%s/fpr-%08lld", c->work, step);
    int rc = 0, all = 0;
    err[0] = 0;
    if (c->rank == 0 && mkdir(tmp, 0755) != 0) {
        snprintf(err, errlen, "%s: %s", tmp, strerror(errno));
        rc = -1;
    }
    MPI_Allreduce(&rc, &all, 1, MPI_INT, MPI_MIN, c->comm);
    if (all) return -1;
    uint64_t *mine = calloc((size_t)nt * 3, sizeof *mine), *sums = calloc((size_t)nt, sizeof *sums);
    uint64_t *part = c->rank == 0 ? calloc((size_t)c->p * nt * 2, sizeof *part) : NULL;
    if (!mine || !sums || (c->rank == 0 && !part)) rc = -1;
    snprintf(path, sizeof path, "%s/shard-%05d.h5", tmp, c->rank);
    if (rc == 0 && fpr_write_shard(path, t, nt, err, errlen) == 0 && fs_fsync_path(path) == 0) {
        for (int i = 0; i < nt; i++) {
            mine[2 * i] = t[i].row0;
            mine[2 * i + 1] = t[i].nrows;
            mine[2 * nt + i] = ckpt_hash(t[i].data, t[i].nrows * t[i].cols, t[i].row0 * t[i].cols);
        }
    } else if (rc == 0) {
        if (!err[0]) snprintf(err, errlen, "%s: %s", path, strerror(errno));
        rc = -1;
    }
    MPI_Allreduce(&rc, &all, 1, MPI_INT, MPI_MIN, c->comm);
    if (all == 0) {
        MPI_Gather(mine, 2 * nt, MPI_UINT64_T, part, 2 * nt, MPI_UINT64_T, 0, c->comm);
        MPI_Reduce(mine + 2 * nt, sums, nt, MPI_UINT64_T, MPI_SUM, 0, c->comm);
        if (c->rank == 0) {
            snprintf(path, sizeof path, "%s/checkpoint.h5", tmp);
            if (fpr_write_main(path, t, nt, c->p, part, sums, step, err, errlen) != 0 ||
                fs_fsync_path(path) != 0 || fs_fsync_path(tmp) != 0 || fs_rm_rf(fin) != 0 ||
                rename(tmp, fin) != 0 || fs_fsync_path(c->work) != 0) {
                if (!err[0]) snprintf(err, errlen, "%s: %s", fin, strerror(errno));
                rc = -1;
            }
        }
        MPI_Allreduce(&rc, &all, 1, MPI_INT, MPI_MIN, c->comm);
    }
    free(mine);
    free(sums);
    free(part);
    return all ? -1 : 0;
}

/* Collective: each rank reads its own rows through the main file's virtual
 * datasets (sec2, independent) and the checksums are verified. */
static int fpr_load(bctx *c, const char *file, ckpt_tensor *t, int nt) {
    char *err = c->err;
    size_t errlen = sizeof c->err;
    int rc = -1, all = 0;
    err[0] = 0;
    uint64_t *mine = calloc((size_t)nt, sizeof *mine), *sums = calloc((size_t)nt, sizeof *sums);
    uint64_t *want = calloc((size_t)nt, sizeof *want);
    hid_t f = -1;
    if (!mine || !sums || !want || H5C(f = H5Fopen(file, H5F_ACC_RDONLY, H5P_DEFAULT))) goto done;
    for (int i = 0; i < nt; i++) {
        hid_t d = -1, fs = -1, ms = -1, a = -1;
        hsize_t start[2] = {t[i].row0, 0}, count[2] = {t[i].nrows, t[i].cols};
        hsize_t n = t[i].nrows * t[i].cols, one = n ? n : 1;
        int bad = H5C(d = H5Dopen2(f, t[i].name, H5P_DEFAULT)) || H5C(fs = H5Dget_space(d)) ||
                  H5C(ms = H5Screate_simple(1, &one, NULL));
        if (!bad && n)
            bad = H5C(H5Sselect_hyperslab(fs, H5S_SELECT_SET, start, NULL, count, NULL)) ||
                  H5C(H5Dread(d, H5T_NATIVE_FLOAT, ms, fs, H5P_DEFAULT, t[i].data));
        if (!bad)
            bad = H5C(a = H5Aopen(d, "checksum", H5P_DEFAULT)) ||
                  H5C(H5Aread(a, H5T_NATIVE_UINT64, &want[i]));
        mine[i] = ckpt_hash(t[i].data, (size_t)n, t[i].row0 * t[i].cols);
        if (a >= 0) H5Aclose(a);
        if (ms >= 0) H5Sclose(ms);
        if (fs >= 0) H5Sclose(fs);
        if (d >= 0) H5Dclose(d);
        if (bad) goto done;
    }
    rc = 0;
done:
    if (f >= 0) H5Fclose(f);
    MPI_Allreduce(&rc, &all, 1, MPI_INT, MPI_MIN, c->comm);
    if (all == 0) {
        MPI_Allreduce(mine, sums, nt, MPI_UINT64_T, MPI_SUM, c->comm);
        for (int i = 0; i < nt && rc == 0; i++)
            if (sums[i] != want[i]) {
                snprintf(err, errlen, "%s: /%s checksum mismatch", file, t[i].name);
                rc = -1;
            }
        MPI_Allreduce(&rc, &all, 1, MPI_INT, MPI_MIN, c->comm);
    }
    free(mine);
    free(sums);
    free(want);
    return all ? -1 : 0;
}

/* ---------------------------------------------------------- tensor sets */

static void case_free(bcase *k) { /* idempotent */
    if (k->save)
        for (int i = 0; i < k->nt; i++)
            free((char *)k->save[i].name);
    free(k->save);
    free(k->load);
    free(k->repl);
    free(k->src);
    free(k->dst);
    free(k->full);
    free(k->fullsrc);
    memset(k, 0, sizeof *k);
}

/* Tensor lists over shapes (rows[i], cols[i]): own rows at row0 = R*r/p as
 * gptio does, data packed in src (own rows), dst (load target). Takes
 * ownership of names[] (malloc'ed), also on failure. */
static int case_build(bcase *k, int rank, int p, int nt, char **names, const int *ndim,
                      const uint64_t *rows, const uint64_t *cols) {
    k->nt = nt;
    k->save = calloc((size_t)nt, sizeof *k->save);
    if (!k->save) {
        for (int i = 0; i < nt; i++)
            free(names[i]);
        return -1;
    }
    for (int i = 0; i < nt; i++)
        k->save[i].name = names[i];
    k->load = calloc((size_t)nt, sizeof *k->load);
    if (!k->load) return -1;
    for (int i = 0; i < nt; i++)
        if (!names[i]) return -1;
    size_t own = 0;
    for (int i = 0; i < nt; i++) {
        ckpt_tensor *s = &k->save[i];
        s->ndim = ndim[i];
        s->rows = rows[i];
        s->cols = cols[i];
        part_of(rows[i], rank, p, &s->row0, &s->nrows);
        own += s->nrows * s->cols;
        k->bytes += rows[i] * cols[i] * 4;
    }
    k->own = own;
    k->src = malloc((own ? own : 1) * sizeof(float));
    k->dst = malloc((own ? own : 1) * sizeof(float));
    if (!k->src || !k->dst) return -1;
    size_t off = 0;
    for (int i = 0; i < nt; i++) {
        k->load[i] = k->save[i];
        k->save[i].data = k->src + off;
        k->load[i].data = k->dst + off;
        off += k->save[i].nrows * k->save[i].cols;
    }
    return 0;
}

/* The model + AdamW m, v of a job: names, shapes and row split of src/gptio.c.
 * Also a replicated list (all rows on every rank, as gptio_load asks). */
static int case_model(bcase *k, const char *job, int rank, int p, char *err, size_t errlen) {
    static const char *const groups[3] = {"model", "optim/adam_m", "optim/adam_v"};
    job_config cfg;
    gpt *g = NULL;
    if (config_load(&cfg, job, NULL, 0, err, errlen)) return -1;
    if (gpt_create(&cfg.model, &g)) {
        snprintf(err, errlen, "%s: cannot allocate the model", job);
        return -1;
    }
    int n = gpt_ntensors(g), nt = 3 * n, rc = -1, owned = 0;
    size_t np = gpt_nparams(g);
    char **names = calloc((size_t)nt, sizeof *names);
    int *nd = calloc((size_t)nt, sizeof *nd);
    uint64_t *rows = calloc((size_t)nt, sizeof *rows), *cols = calloc((size_t)nt, sizeof *cols);
    size_t *offs = calloc((size_t)nt, sizeof *offs);
    if (!names || !nd || !rows || !cols || !offs) goto done;
    owned = 1;
    for (int j = 0; j < 3; j++)
        for (int i = 0; i < n; i++) {
            const gpt_tensor *gt = gpt_tensor_at(g, i);
            char name[128];
            snprintf(name, sizeof name, "%s/%s", groups[j], gt->name);
            names[j * n + i] = strdup(name);
            nd[j * n + i] = gt->ndim;
            rows[j * n + i] = (uint64_t)gt->shape[0];
            cols[j * n + i] = gt->ndim == 2 ? (uint64_t)gt->shape[1] : 1;
            offs[j * n + i] = j * np + gt->offset;
        }
    if (case_build(k, rank, p, nt, names, nd, rows, cols)) goto done;
    const char *base =
        strrchr(job, '/') ? strrchr(job, '/') + 1 : job; /* "small" of jobs/small.yaml */
    snprintf(k->label, sizeof k->label, "%.*s", (int)strcspn(base, "."), base);
    k->name = k->label;
    /* the global buffers (params: GPT-2 init; m, v: random), own rows copied into src */
    k->fullsrc = malloc(3 * np * sizeof(float));
    k->full = malloc(3 * np * sizeof(float));
    k->repl = calloc((size_t)nt, sizeof *k->repl);
    if (!k->fullsrc || !k->full || !k->repl) goto done;
    gpt_init_weights(g, 1337);
    memcpy(k->fullsrc, gpt_params(g), np * sizeof(float));
    fill(k->fullsrc + np, 2 * np, 7);
    for (int i = 0; i < nt; i++) {
        ckpt_tensor *s = &k->save[i];
        memcpy(s->data, k->fullsrc + offs[i] + s->row0 * s->cols, s->nrows * s->cols * 4);
        k->repl[i] = *s;
        k->repl[i].row0 = 0;
        k->repl[i].nrows = s->rows;
        k->repl[i].data = k->full + offs[i];
    }
    rc = 0;
done:
    if (rc && !err[0]) snprintf(err, errlen, "out of memory building the %s tensor list", job);
    if (rc && !owned)
        for (int i = 0; names && i < nt; i++)
            free(names[i]);
    if (rc) case_free(k);
    free(names);
    free(nd);
    free(rows);
    free(cols);
    free(offs);
    gpt_destroy(g);
    return rc;
}

/* MB total in tensors of 2..100 MB (a repeating pattern), 1024 floats a row. */
static int case_synth(bcase *k, int size_mb, int rank, int p) {
    static const int pat[] = {100, 2, 24, 8, 48, 4, 32, 12, 64, 6, 16};
    const uint64_t cols = 1024, rowb = cols * 4;
    uint64_t left = (uint64_t)size_mb << 20;
    int nt = 0, cap = 256;
    char **names = calloc((size_t)cap, sizeof *names);
    int *nd = calloc((size_t)cap, sizeof *nd);
    uint64_t *rows = calloc((size_t)cap, sizeof *rows), *cl = calloc((size_t)cap, sizeof *cl);
    int rc = -1;
    if (!names || !nd || !rows || !cl) goto done;
    for (; left >= rowb && nt < cap; nt++) {
        uint64_t b = (uint64_t)pat[nt % (int)(sizeof pat / sizeof *pat)] << 20;
        if (b > left) b = left;
        char name[64];
        snprintf(name, sizeof name, "synth/t%03d", nt);
        names[nt] = strdup(name);
        nd[nt] = 2;
        rows[nt] = b / rowb;
        cl[nt] = cols;
        left -= rows[nt] * rowb;
    }
    rc = case_build(k, rank, p, nt, names, nd, rows, cl);
    if (rc == 0) {
        k->name = "synth";
        k->id = 1;
        /* distinct data per rank: its rows of the global tensors */
        fill(k->src, k->own, 1000 + (uint64_t)rank);
    }
done:
    if (rc) case_free(k);
    free(names);
    free(nd);
    free(rows);
    free(cl);
    return rc;
}

/* ------------------------------------------------------------ measuring */

static void record(bcase *k, int op, int rep, double secs, double res) {
    k->t[op][rep] = secs;
    k->have[op] = 1;
    if (res > k->resident[op]) k->resident[op] = res;
}

/* Agrees on rc across ranks; on failure prints c->err from the lowest failing rank. */
static int agree(bctx *c, int rc, const char *what) {
    char msg[1200];
    snprintf(msg, sizeof msg, "%s: %s", what, c->err[0] ? c->err : strerror(errno));
    return spmd_agree(c->comm, rc, "mpilm bench ckpt", msg);
}

static int check_equal(bctx *c, const float *a, const float *b, size_t n, const char *what) {
    int bad = n && memcmp(a, b, n * sizeof(float)) != 0;
    snprintf(c->err, sizeof c->err, "data read back differs from data written");
    return agree(c, bad ? -1 : 0, what);
}

/* One method of one repetition (write, then its reads). Collective. */
static int run_method(bctx *c, bcase *k, int m, int rep, char *chunk, char *rbuf) {
    MPI_Comm comm = c->comm;
    char raw[4200], ck[4200], fpr[4200], file[4300];
    snprintf(raw, sizeof raw, "%s/raw.bin", c->work);
    snprintf(ck, sizeof ck, "%s/ckpt", c->work);
    long long step = 100LL * k->id + rep + 1;
    uint64_t B = k->bytes, lo = B * (uint64_t)c->rank / (uint64_t)c->p,
             hi = B * (uint64_t)(c->rank + 1) / (uint64_t)c->p;
    double t0, res;
    int rc = 0;
    c->err[0] = 0;
    switch (m) {
    case 0: /* raw, one writer then one reader (rank 0; others wait) */
        t0 = now_sync(comm);
        if (c->rank == 0) rc = raw_write(raw, 1, 0, B, chunk);
        if (agree(c, rc, "raw write")) return -1;
        record(k, W_RAW1, rep, now_sync(comm) - t0, 0);
        for (int warm = 0; warm < 2; warm++) {
            res = warm ? resident_path(raw) : drop_cache(comm, raw);
            t0 = now_sync(comm);
            if (c->rank == 0) rc = raw_read(raw, 0, B, rbuf);
            if (agree(c, rc, "raw read")) return -1;
            record(k, warm ? R_RAW1_WARM : R_RAW1, rep, now_sync(comm) - t0, res);
        }
        break;
    case 1: /* raw, every rank its slice of one file */
        if (c->p == 1) return 0;
        if (c->rank == 0) rc = raw_write(raw, 1, 0, 0, chunk); /* create empty */
        if (agree(c, rc, "raw write")) return -1;
        t0 = now_sync(comm);
        rc = raw_write(raw, 0, lo, hi, chunk);
        if (agree(c, rc, "raw write (slices)")) return -1;
        record(k, W_RAWN, rep, now_sync(comm) - t0, 0);
        res = drop_cache(comm, raw);
        t0 = now_sync(comm);
        rc = raw_read(raw, lo, hi, rbuf);
        if (agree(c, rc, "raw read (slices)")) return -1;
        record(k, R_RAWN, rep, now_sync(comm) - t0, res);
        break;
    case 2: /* MPI-IO, no HDF5 */
        t0 = now_sync(comm);
        rc = mpiio_io(comm, raw, lo, hi, chunk, 1);
        if (agree(c, rc, "MPI-IO write")) return -1;
        record(k, W_MPIIO, rep, now_sync(comm) - t0, 0);
        res = drop_cache(comm, raw);
        t0 = now_sync(comm);
        rc = mpiio_io(comm, raw, lo, hi, rbuf, 0);
        if (agree(c, rc, "MPI-IO read")) return -1;
        record(k, R_MPIIO, rep, now_sync(comm) - t0, res);
        break;
    case 3: { /* io/ckpt */
        ckpt_meta meta = {.step = step, .layout = {c->p, 1, 1}, .seed = 1, .config = "bench"}, got;
        ckpt_save_opts so = {.keep_last = 0, .keep_every = 0, .fault_rank = -1, .fault_after = -1};
        ckpt_stats st = {0};
        double v[NPHASE], vmax[NPHASE];
        t0 = now_sync(comm);
        rc = ckpt_save_timed(comm, ck, k->save, k->nt, &meta, &so, &st, c->err, sizeof c->err);
        if (agree(c, rc, "ckpt_save")) return -1;
        record(k, W_CKPT, rep, now_sync(comm) - t0, 0);
        phases_of(&st, v);
        MPI_Reduce(v, vmax, NPHASE, MPI_DOUBLE, MPI_MAX, 0, comm);
        for (int ph = 0; ph < NPHASE; ph++)
            k->ph[0][ph][rep] = vmax[ph];
        k->calls[0] = st.calls;
        snprintf(file, sizeof file, "%s/step-%08lld/checkpoint.h5", ck, step);
        for (int warm = 0; warm < 2; warm++) {
            res = warm ? resident_path(file) : drop_cache(comm, file);
            memset(k->dst, 0, k->own * sizeof(float));
            t0 = now_sync(comm);
            rc = ckpt_load_timed(comm, file, k->load, k->nt, &got, &st, c->err, sizeof c->err);
            if (agree(c, rc, "ckpt_load")) return -1;
            record(k, warm ? R_CKPT_WARM : R_CKPT, rep, now_sync(comm) - t0, res);
            phases_of(&st, v);
            MPI_Reduce(v, vmax, NPHASE, MPI_DOUBLE, MPI_MAX, 0, comm);
            for (int ph = 0; !warm && ph < NPHASE; ph++)
                k->ph[1][ph][rep] = vmax[ph];
            k->calls[1] = st.calls;
            free(got.config);
            if (check_equal(c, k->src, k->dst, k->own, "ckpt_load")) return -1;
        }
        if (k->repl) {
            res = drop_cache(comm, file);
            size_t nfull = 0;
            for (int i = 0; i < k->nt; i++)
                nfull += k->repl[i].rows * k->repl[i].cols;
            memset(k->full, 0, nfull * sizeof(float));
            t0 = now_sync(comm);
            rc = ckpt_load(comm, file, k->repl, k->nt, &got, c->err, sizeof c->err);
            if (agree(c, rc, "ckpt_load (replicated)")) return -1;
            record(k, R_CKPT_REPL, rep, now_sync(comm) - t0, res);
            free(got.config);
            if (check_equal(c, k->fullsrc, k->full, nfull, "ckpt_load (replicated)")) return -1;
        }
        break;
    }
    case 4: /* file per rank + VDS */
        t0 = now_sync(comm);
        rc = fpr_save(c, k->save, k->nt, step);
        if (agree(c, rc, "file-per-rank save")) return -1;
        record(k, W_FPR, rep, now_sync(comm) - t0, 0);
        snprintf(fpr, sizeof fpr, "%s/fpr-%08lld", c->work, step);
        snprintf(file, sizeof file, "%s/checkpoint.h5", fpr);
        res = drop_cache(comm, fpr);
        memset(k->dst, 0, k->own * sizeof(float));
        t0 = now_sync(comm);
        rc = fpr_load(c, file, k->load, k->nt);
        if (agree(c, rc, "file-per-rank load")) return -1;
        record(k, R_FPR, rep, now_sync(comm) - t0, res);
        if (check_equal(c, k->src, k->dst, k->own, "file-per-rank load")) return -1;
        break;
    case 5: { /* the checksum alone (every rank its shard, as in save and load) */
        volatile uint64_t sink = 0;
        t0 = now_sync(comm);
        for (int i = 0; i < k->nt; i++)
            sink += ckpt_hash(k->save[i].data, k->save[i].nrows * k->save[i].cols,
                              k->save[i].row0 * k->save[i].cols);
        record(k, HASH, rep, now_sync(comm) - t0, 0);
        (void)sink;
        break;
    }
    }
    /* remove what this method wrote before the next one runs */
    MPI_Barrier(comm);
    if (c->keep && rep == c->reps - 1) return 0;
    if (c->rank == 0) {
        unlink(raw);
        fs_rm_rf(ck);
        snprintf(fpr, sizeof fpr, "%s/fpr-%08lld", c->work, step);
        fs_rm_rf(fpr);
    }
    MPI_Barrier(comm);
    return 0;
}

/* One repetition: every method, starting at a different one each repetition
 * so no method always follows the same neighbour (deletes, writeback). */
#define NMETHODS 6
static int run_rep(bctx *c, bcase *k, int rep, char *chunk, char *rbuf) {
    for (int j = 0; j < NMETHODS; j++)
        if (run_method(c, k, (j + rep) % NMETHODS, rep, chunk, rbuf)) return -1;
    return 0;
}

static const char *fs_name(const char *dir) {
    struct statfs s;
    if (statfs(dir, &s) != 0) return "?";
    switch ((unsigned long)s.f_type) {
    case 0xEF53:
        return "ext4";
    case 0x58465342:
        return "xfs";
    case 0x9123683E:
        return "btrfs";
    case 0x01021994:
        return "tmpfs (RAM!)";
    case 0x794c7630:
        return "overlayfs";
    case 0x6969:
        return "nfs";
    case 0x0BD00BD0:
        return "lustre";
    default:
        return "other";
    }
}

static void report(bctx *c, bcase *k, FILE *csv) {
    double med[NOPS] = {0}, gbps[NOPS] = {0};
    for (int o = 0; o < NOPS; o++)
        if (k->have[o]) {
            med[o] = median(k->t[o], c->reps);
            gbps[o] = (double)k->bytes / med[o] / 1e9;
        }
    printf("\n%s: %d tensors, %.1f MB (%s)\n", k->name, k->nt, (double)k->bytes / 1e6,
           k->repl ? "model + AdamW m, v" : "synthetic, 2..100 MB each");
    printf("  %-44s %9s %17s %7s %7s %7s\n", "what", "median s", "min..max s", "GB/s", "of raw",
           "cached");
    for (int o = 0; o < NOPS; o++) {
        if (!k->have[o]) continue;
        double lo = k->t[o][0], hi = lo;
        for (int r = 1; r < c->reps; r++) {
            lo = k->t[o][r] < lo ? k->t[o][r] : lo;
            hi = k->t[o][r] > hi ? k->t[o][r] : hi;
        }
        /* the faster of the raw variants (1 process, or N ranks' slices) */
        double w = gbps[W_RAWN] > gbps[W_RAW1] ? gbps[W_RAWN] : gbps[W_RAW1];
        double r = gbps[R_RAWN] > gbps[R_RAW1] ? gbps[R_RAWN] : gbps[R_RAW1];
        double ratio = gbps[o] / (ops[o].read == 2 ? gbps[R_RAW1_WARM] : ops[o].read ? r : w);
        char cached[16] = "";
        if (ops[o].read) snprintf(cached, sizeof cached, "%.0f%%", 100 * k->resident[o]);
        printf("  %-44s %9.3f %8.3f..%-7.3f %7.3f %6.0f%% %7s\n", ops[o].label, med[o], lo, hi,
               gbps[o], 100 * ratio, cached);
        if (csv)
            fprintf(csv, "%s.%s,%d,%llu,%.6f,%.4f,%.4f\n", k->name, ops[o].key, c->p,
                    (unsigned long long)k->bytes, med[o], gbps[o], ratio);
    }
    /* where the time of io/ckpt goes: each phase's slowest rank, median */
    for (int w = 0; w < 2; w++) {
        printf("  %-44s", w ? "ckpt_load cold, phases (s, slowest rank)"
                            : "ckpt_save phases (s, slowest rank)");
        for (int ph = 0; ph < NPHASE; ph++) {
            if (w && (ph == 2 || ph == 4 || ph == 5)) continue; /* save-only phases */
            printf(" %s %.4f", phase_name[ph], median(k->ph[w][ph], c->reps));
        }
        printf(" | %d collective MPI-IO call%s\n", k->calls[w], k->calls[w] == 1 ? "" : "s");
    }
}

int bench_ckpt(int argc, char **argv, MPI_Comm comm) {
    const char *dir = "/tmp/mpilm-bench-ckpt", *csv = NULL, *job = "jobs/small.yaml";
    int size_mb = 1024, reps = 3, keep = 0, rank, p;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &p);
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--dir") && i + 1 < argc)
            dir = argv[++i];
        else if (!strcmp(argv[i], "--csv") && i + 1 < argc)
            csv = argv[++i];
        else if (!strcmp(argv[i], "--job") && i + 1 < argc)
            job = argv[++i];
        else if (!strcmp(argv[i], "--size-mb") && i + 1 < argc)
            size_mb = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc)
            reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--keep"))
            keep = 1;
        else {
            if (rank == 0)
                printf(
                    "usage: mpilm bench ckpt [--dir DIR] [--size-mb MB] [--reps N] "
                    "[--job JOB.yaml] [--csv FILE] [--keep]\n"
                    "Checkpoint save/load GB/s through io/ckpt for JOB's model + AdamW state\n"
                    "(default jobs/small.yaml) and a synthetic MB-sized set (default 1024), next\n"
                    "to raw write+fdatasync / cold read of DIR (default /tmp/mpilm-bench-ckpt),\n"
                    "MPI-IO without HDF5 and a file-per-rank + VDS writer; median of N reps\n"
                    "(default 3). CSV: what,ranks,bytes,seconds,gbps,ratio_to_raw. --keep leaves\n"
                    "the last repetition's files (for h5dump) instead of removing them.\n");
            return strcmp(argv[i], "--help") ? 2 : 0;
        }
    }
    bctx c = {.comm = comm, .rank = rank, .p = p, .reps = reps, .keep = keep};
    if (reps < 1 || reps > MAXREPS || size_mb < 1) {
        if (rank == 0) fprintf(stderr, "mpilm bench ckpt: --reps 1..%d, --size-mb >= 1\n", MAXREPS);
        return 2;
    }
    int rc = 0;
    long long pid = (long long)getpid();
    MPI_Bcast(&pid, 1, MPI_LONG_LONG, 0, comm);
    snprintf(c.work, sizeof c.work, "%s/mpilm-bench-%lld", dir, pid);
    if (rank == 0 && (fs_mkdirs(c.work) != 0)) {
        snprintf(c.err, sizeof c.err, "%s: %s", c.work, strerror(errno));
        rc = -1;
    }
    if (agree(&c, rc, "work directory")) return 1;
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    bcase cases[2];
    memset(cases, 0, sizeof cases);
    char *chunk = malloc(CHUNK), *rbuf = malloc(CHUNK);
    rc = chunk && rbuf ? 0 : -1;
    if (chunk) fill((float *)chunk, CHUNK / 4, 99);
    if (rc == 0) rc = case_model(&cases[0], job, rank, p, c.err, sizeof c.err);
    if (rc == 0 && case_synth(&cases[1], size_mb, rank, p) != 0) {
        snprintf(c.err, sizeof c.err, "out of memory for %d MB of synthetic tensors", size_mb);
        rc = -1;
    }
    if (agree(&c, rc, "setup") == 0) {
        if (rank == 0)
            printf("bench ckpt: %d rank%s | %s on %s | median of %d reps | GB = 1e9 bytes\n", p,
                   p > 1 ? "s" : "", dir, fs_name(c.work), reps);
        for (int k = 0; k < 2 && rc == 0; k++)
            for (int r = 0; r < reps && rc == 0; r++)
                rc = run_rep(&c, &cases[k], r, chunk, rbuf);
        if (rc == 0 && rank == 0) {
            FILE *f =
                csv ? bench_csv_open(csv, "what,ranks,bytes,seconds,gbps,ratio_to_raw") : NULL;
            for (int k = 0; k < 2; k++)
                report(&c, &cases[k], f);
            if (f) fclose(f);
            printf("\n'of raw': writes against the faster raw write (1 writer or N writers), cold "
                   "reads against\nthe faster raw cold read, warm reads against raw read (warm). "
                   "'cached': pages of\nthe file(s) in the page cache "
                   "just before the read (after "
                   "posix_fadvise(DONTNEED) for cold reads).\n");
        }
    }
    MPI_Barrier(comm);
    if (rank == 0 && keep)
        printf("kept: %s\n", c.work);
    else if (rank == 0) {
        fs_rm_rf(c.work);
        rmdir(dir); /* only if empty: it may be the user's */
    }
    case_free(&cases[0]);
    case_free(&cases[1]);
    free(chunk);
    free(rbuf);
    return rc ? 1 : 0;
}
