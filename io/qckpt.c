/* qckpt: writer and reader of quantized checkpoints (layout in io/qckpt.h).
 *
 * The writer is io/ckpt's: ckpt_begin (step-N.tmp, free-space check),
 * h5u_write_dsets (every rank creates every dataset; the owner of a tensor
 * selects all of it, the others nothing; one collective transfer; checksums
 * agreed in one reduction), ckpt_write_attrs and ckpt_finish (close, fsync,
 * rename, latest). The reader is independent per rank (a quantized model is
 * small and every rank needs all of it to evaluate).
 */
#include "io/qckpt.h"

#include "io/fsutil.h"
#include "io/h5util.h"
#include "kernels/quant.h"

#include <dirent.h>
#include <hdf5.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* Prefixes err with "PATH: dataset /NAME: " unless it already names PATH. */
static void name_it(char *err, size_t errlen, const char *path, const char *ds) {
    if (strstr(err, path)) return;
    char why[1024];
    snprintf(why, sizeof why, "%s", err);
    if (ds)
        snprintf(err, errlen, "%s: dataset /%s: %s", path, ds, why);
    else
        snprintf(err, errlen, "%s: %s", path, why);
}

uint64_t qckpt_hash(const void *x, size_t n, int bytes, uint64_t first) {
    const uint8_t *b = x;
    uint64_t s = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t v = bytes == 1 ? b[i] : (uint32_t)b[2 * i] | (uint32_t)b[2 * i + 1] << 8;
        float f;
        memcpy(&f, &v, 4);
        s += ckpt_hash(&f, 1, first + i);
    }
    return s;
}

/* IEEE binary16, little endian: h5py maps it to numpy float16. */
static hid_t fp16_type(void) {
    hid_t t = H5Tcopy(H5T_IEEE_F32LE);
    if (t < 0) return t;
    if (H5Tset_fields(t, 15, 10, 5, 0, 10) < 0 || H5Tset_size(t, 2) < 0 ||
        H5Tset_ebias(t, 15) < 0) {
        H5Tclose(t);
        return -1;
    }
    return t;
}

/* ---- output check ------------------------------------------------------------ */

int qckpt_out_check(const char *root, int force, char *err, size_t errlen) {
    struct stat st;
    if (stat(root, &st) != 0) return 0; /* will be created */
    if (!S_ISDIR(st.st_mode)) {
        snprintf(err, errlen, "%s: output exists and is not a directory", root);
        return -1;
    }
    if (force) return 0;
    char p[4200];
    snprintf(p, sizeof p, "%s/latest", root);
    int holds = stat(p, &st) == 0;
    snprintf(p, sizeof p, "%s/checkpoint.h5", root);
    holds |= stat(p, &st) == 0;
    DIR *d = opendir(root);
    struct dirent *e;
    while (d && !holds && (e = readdir(d)) != NULL)
        if (!strncmp(e->d_name, "step-", 5) && !strchr(e->d_name, '.')) holds = 1;
    if (d) closedir(d);
    if (holds) {
        snprintf(err, errlen, "%s already holds a checkpoint (use --force to replace it)", root);
        return -1;
    }
    return 0;
}

/* ---- writer --------------------------------------------------------------------- */

/* Collective: the /qmodel/<name> group of every quantized tensor with its
 * attributes (metadata only, the same calls on every rank). */
static int write_groups(hid_t file, hid_t lcpl, const qckpt_tensor *t, int nt, char *err,
                        size_t errlen) {
    for (int i = 0; i < nt; i++) {
        if (t[i].fmt == QCKPT_FP32) continue;
        quant_fmt f = (quant_fmt)t[i].fmt;
        char path[256];
        snprintf(path, sizeof path, "qmodel/%s", t[i].name);
        long long shape[2] = {(long long)t[i].rows, (long long)t[i].cols};
        int block = QUANT_BLOCK;
        hid_t g = -1;
        int bad = H5_CHECK(g = H5Gcreate2(file, path, lcpl, H5P_DEFAULT, H5P_DEFAULT)) ||
                  H5_CHECK(h5u_attr_write_str(g, "format", quant_fmt_name(f))) ||
                  H5_CHECK(h5u_attr_write(g, "shape", H5T_STD_I64LE, H5T_NATIVE_LLONG, 2, shape)) ||
                  H5_CHECK(h5u_attr_write(g, "block", H5T_STD_I32LE, H5T_NATIVE_INT, 1, &block));
        if (g >= 0) H5Gclose(g);
        if (bad) {
            name_it(err, errlen, path, NULL);
            return -1;
        }
    }
    return 0;
}

/* One whole dataset: all of it on the owner (mine), nothing elsewhere. */
static h5u_dset whole(const char *name, hid_t ftype, int ndim, uint64_t rows, uint64_t cols,
                      const void *buf, int mine) {
    h5u_dset d = {
        .name = name, .ftype = ftype, .ndim = ndim, .rows = rows, .cols = cols, .data = buf};
    if (mine) d.sel = (h5u_sel){.nseg = 1, .row0 = {0}, .nrows = {rows}, .col0 = 0, .ncols = cols};
    return d;
}

/* h5u_hash_fn: the owner's hash of a whole dataset: ckpt_hash of floats,
 * qckpt_hash of 1- and 2-byte elements. */
static uint64_t whole_hash(const h5u_dset *d, void *arg) {
    (void)arg;
    if (!d->sel.nseg) return 0;
    size_t n = (size_t)(d->rows * d->cols), es = H5Tget_size(d->ftype);
    return es == 4 ? ckpt_hash(d->data, n, 0) : qckpt_hash(d->data, n, (int)es, 0);
}

/* The datasets of tensors t[0..nt) (up to 3 each) into d, their names into
 * names[] (malloc'ed); first[i] = index in d of t[i]'s first dataset.
 * Returns how many, or -1 with a message. */
static int dset_list(const qckpt_tensor *t, int nt, int rank, hid_t f16, h5u_dset *d, char **names,
                     int *first, char *err, size_t errlen) {
    int n = 0;
    for (int i = 0; i < nt; i++) {
        int mine = rank == t[i].owner;
        char path[256];
        first[i] = n;
        if (t[i].fmt == QCKPT_FP32) {
            snprintf(path, sizeof path, "model/%s", t[i].name);
            if (!(names[n] = strdup(path))) goto oom;
            d[n] =
                whole(names[n], H5T_IEEE_F32LE, t[i].ndim, t[i].rows, t[i].cols, t[i].data, mine);
            n++;
            continue;
        }
        quant_fmt f = (quant_fmt)t[i].fmt;
        quant_layout l;
        if (t[i].ndim != 2 || quant_layout_of(f, t[i].rows, t[i].cols, &l) != 0) {
            snprintf(err, errlen, "cannot store tensor %s as %s", t[i].name,
                     quant_fmt_name(f) ? quant_fmt_name(f) : "?");
            return -1;
        }
        const uint8_t *b = t[i].data;
        static const char *const part[3] = {"q", "scale", "min"};
        for (int k = 0; k < (l.min_bytes ? 3 : 2); k++) {
            snprintf(path, sizeof path, "qmodel/%s/%s", t[i].name, part[k]);
            if (!(names[n] = strdup(path))) goto oom;
            if (k == 0)
                d[n] = whole(names[n], f == QUANT_Q8 ? H5T_STD_I8LE : H5T_STD_U8LE, 2, t[i].rows,
                             l.nblk * l.code_bytes, mine ? b + l.q_off : NULL, mine);
            else
                d[n] = whole(names[n], f16, 2, t[i].rows, l.nblk,
                             mine ? b + (k == 1 ? l.scale_off : l.min_off) : NULL, mine);
            n++;
        }
    }
    return n;
oom:
    snprintf(err, errlen, "out of memory for the dataset list");
    return -1;
}

/* The root `quant` attribute (JSON). malloc'ed. */
static char *quant_json(const qckpt_tensor *t, int nt) {
    size_t cap = 1024 + (size_t)nt * 160, used = 0;
    char *s = malloc(cap);
    if (!s) return NULL;
    used += (size_t)snprintf(
        s + used, cap - used,
        "{\"version\": %d, \"block\": %d, \"scale_type\": \"float16\", \"layout\": \"planar: "
        "/qmodel/<name>/q [rows, nblk*32] int8 (q8) or [rows, nblk*16] uint8 (4-bit, byte j = "
        "weight j low nibble | weight j+16 high nibble, q4 nibble = code+8); scale [rows, nblk] "
        "float16; min [rows, nblk] float16 (q4a); nblk = ceil(cols/32), last block zero-padded; "
        "q8/q4: w = scale*code, q4a: w = scale*nibble + min, nf4: w = scale*nf4[nibble]\", "
        "\"formats\": {",
        QCKPT_VERSION, QUANT_BLOCK);
    for (int i = 0; i < nt && used < cap; i++)
        used +=
            (size_t)snprintf(s + used, cap - used, "%s\"%s\": \"%s\"", i ? ", " : "", t[i].name,
                             t[i].fmt == QCKPT_FP32 ? "fp32" : quant_fmt_name((quant_fmt)t[i].fmt));
    if (used < cap) snprintf(s + used, cap - used, "}}");
    return s;
}

int qckpt_save(MPI_Comm comm, const char *root, const qckpt_tensor *t, int nt,
               const ckpt_meta *meta, const qckpt_save_opts *opts, char *err, size_t errlen) {
    int rank, rc = 0, all = 0;
    MPI_Comm_rank(comm, &rank);
    char path[4200];
    err[0] = 0;
    if (rank == 0) rc = qckpt_out_check(root, opts->force, err, errlen);
    MPI_Allreduce(&rc, &all, 1, MPI_INT, MPI_MIN, comm);
    if (all) {
        if (rank != 0) snprintf(err, errlen, "rank 0 could not prepare the output");
        return -1;
    }
    double need = 64.0 * 1024;
    for (int i = 0; i < nt; i++)
        need += (double)t[i].rows * t[i].cols * 4 + 4096;
    if (ckpt_begin(comm, root, meta->step, need, path, sizeof path, err, errlen)) return -1;

    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    hid_t fapl = -1, file = -1, lcpl = -1, f16 = -1;
    char *qj = NULL, **names = calloc(3 * (size_t)nt + 1, sizeof *names);
    h5u_dset *d = calloc(3 * (size_t)nt + 1, sizeof *d);
    int *first = calloc((size_t)nt + 1, sizeof *first), nd = -1;
    rc = -1;
    if (!names || !d || !first)
        snprintf(err, errlen, "out of memory for %d tensors", nt);
    else if (!H5_CHECK(f16 = fp16_type()))
        nd = dset_list(t, nt, rank, f16, d, names, first, err, errlen);
    if (h5u_agree(comm, nd < 0, err, errlen)) goto close;
    if (H5_CHECK(fapl = h5u_fapl(comm))) goto close;
    file = H5Fcreate(path, H5F_ACC_EXCL, H5P_DEFAULT, fapl);
    if (h5u_agree(comm, file < 0 ? h5u_fail("H5Fcreate", __FILE__, __LINE__, err, errlen) : 0, err,
                  errlen))
        goto close;
    if (h5u_agree(comm,
                  H5_CHECK(lcpl = H5Pcreate(H5P_LINK_CREATE)) ||
                      H5_CHECK(H5Pset_create_intermediate_group(lcpl, 1)) ||
                      write_groups(file, lcpl, t, nt, err, errlen),
                  err, errlen))
        goto close;
    /* fault injection counts tensors: kill before the first dataset of
     * tensor fault_after */
    int kill = opts->fault_rank == rank && opts->fault_after >= 0
                   ? (opts->fault_after < nt ? first[opts->fault_after] : nd)
                   : -1;
    if (h5u_write_dsets(comm, file, fapl, d, nd, whole_hash, NULL, kill, NULL, err, errlen))
        goto close;
    qj = quant_json(t, nt);
    int bad = !qj || ckpt_write_attrs(file, meta, err, errlen) ||
              H5_CHECK(h5u_attr_write_str(file, "quant", qj));
    if (h5u_agree(comm, bad, err, errlen)) goto close;
    rc = 0;
close:
    free(qj);
    for (int i = 0; names && i < 3 * nt; i++)
        free(names[i]);
    free(names);
    free(d);
    free(first);
    if (f16 >= 0) H5Tclose(f16);
    if (lcpl >= 0) H5Pclose(lcpl);
    rc = ckpt_finish(comm, root, meta->step, file, rc, 0, 0, NULL, err, errlen);
    if (fapl >= 0) H5Pclose(fapl);
    return rc;
}

/* ---- reader ---------------------------------------------------------------------- */

int qckpt_is_quantized(const char *file) {
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    hid_t f = H5Fopen(file, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (f < 0) {
        H5Eclear2(H5E_DEFAULT);
        return -1;
    }
    int q = H5Aexists(f, "quant") > 0;
    H5Fclose(f);
    return q;
}

/* Reads a whole dataset of `want_nd` dims equal to want[] into buf with
 * memory type mtype and checks its checksum. */
static int read_ds(hid_t loc, const char *fname, const char *dsname, const char *name, hid_t mtype,
                   int want_nd, const hsize_t *want, void *buf, int hash_bytes, char *err,
                   size_t errlen) {
    hid_t d = -1, sp = -1;
    int rc = -1;
    hsize_t dims[2] = {0, 1};
    if (H5Lexists(loc, name, H5P_DEFAULT) <= 0) {
        snprintf(err, errlen, "%s: dataset /%s is missing", fname, dsname);
        return -1;
    }
    if (H5_CHECK(d = H5Dopen2(loc, name, H5P_DEFAULT)) || H5_CHECK(sp = H5Dget_space(d))) goto done;
    int nd = H5Sget_simple_extent_ndims(sp);
    if (nd != want_nd || H5Sget_simple_extent_dims(sp, dims, NULL) < 0 || dims[0] != want[0] ||
        (nd == 2 && dims[1] != want[1])) {
        snprintf(err, errlen,
                 "%s: dataset /%s has shape (%llu, %llu), the model expects (%llu, %llu) "
                 "(checkpoint of a different model shape?)",
                 fname, dsname, (unsigned long long)dims[0],
                 (unsigned long long)(nd == 2 ? dims[1] : 1), (unsigned long long)want[0],
                 (unsigned long long)(want_nd == 2 ? want[1] : 1));
        goto done;
    }
    if (H5_CHECK(H5Dread(d, mtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf))) goto done;
    size_t n = (size_t)(dims[0] * (nd == 2 ? dims[1] : 1));
    uint64_t want_sum = 0,
             have = hash_bytes == 4 ? ckpt_hash(buf, n, 0) : qckpt_hash(buf, n, hash_bytes, 0);
    if (h5u_attr_read(d, "checksum", H5T_NATIVE_UINT64, &want_sum) != 0) {
        snprintf(err, errlen, "%s: dataset /%s has no checksum attribute", fname, dsname);
        goto done;
    }
    if (want_sum != have) {
        snprintf(err, errlen, "%s: dataset /%s is corrupt (checksum %016llx, expected %016llx)",
                 fname, dsname, (unsigned long long)have, (unsigned long long)want_sum);
        goto done;
    }
    rc = 0;
done:
    if (rc && !strstr(err, fname)) name_it(err, errlen, fname, dsname);
    if (sp >= 0) H5Sclose(sp);
    if (d >= 0) H5Dclose(d);
    return rc;
}

/* Fills t (full tensor into tmp, then t's rows) from an open file. */
static int load_one(hid_t file, hid_t f16, const char *fname, ckpt_tensor *t, char *err,
                    size_t errlen) {
    const char *x = strncmp(t->name, "model/", 6) == 0 ? t->name + 6 : t->name;
    char qpath[256], ds[300];
    size_t n = (size_t)(t->rows * t->cols);
    float *full = malloc((n ? n : 1) * sizeof(float));
    void *qbuf = NULL;
    hid_t g = -1;
    int rc = -1;
    if (!full) {
        snprintf(err, errlen, "%s: out of memory reading %s", fname, x);
        return -1;
    }
    snprintf(qpath, sizeof qpath, "qmodel/%s", x);
    if (H5Lexists(file, "qmodel", H5P_DEFAULT) > 0 && H5Lexists(file, qpath, H5P_DEFAULT) > 0) {
        char *fmt_s = NULL;
        long long shape[2] = {0, 0};
        quant_fmt f;
        quant_layout l;
        if (H5_CHECK(g = H5Gopen2(file, qpath, H5P_DEFAULT))) goto done;
        fmt_s = h5u_attr_read_str(g, "format");
        if (!fmt_s || quant_fmt_from_name(fmt_s, &f) != 0 ||
            h5u_attr_read(g, "shape", H5T_NATIVE_LLONG, shape) != 0) {
            snprintf(err, errlen, "%s: group /%s: missing or unknown format/shape attributes (%s)",
                     fname, qpath, fmt_s ? fmt_s : "no format");
            free(fmt_s);
            goto done;
        }
        free(fmt_s);
        if (t->ndim != 2 || (uint64_t)shape[0] != t->rows || (uint64_t)shape[1] != t->cols) {
            snprintf(err, errlen,
                     "%s: group /%s has shape (%lld, %lld), the model expects (%llu, %llu)", fname,
                     qpath, shape[0], shape[1], (unsigned long long)t->rows,
                     (unsigned long long)t->cols);
            goto done;
        }
        if (quant_layout_of(f, t->rows, t->cols, &l) != 0 || !(qbuf = malloc(l.total))) {
            snprintf(err, errlen, "%s: cannot allocate %s", fname, qpath);
            goto done;
        }
        hsize_t qd[2] = {t->rows, l.nblk * l.code_bytes}, sd[2] = {t->rows, l.nblk};
        uint8_t *b = qbuf;
        snprintf(ds, sizeof ds, "%s/q", qpath);
        if (read_ds(g, fname, ds, "q", f == QUANT_Q8 ? H5T_STD_I8LE : H5T_STD_U8LE, 2, qd,
                    b + l.q_off, 1, err, errlen))
            goto done;
        snprintf(ds, sizeof ds, "%s/scale", qpath);
        if (read_ds(g, fname, ds, "scale", f16, 2, sd, b + l.scale_off, 2, err, errlen)) goto done;
        snprintf(ds, sizeof ds, "%s/min", qpath);
        if (l.min_bytes && read_ds(g, fname, ds, "min", f16, 2, sd, b + l.min_off, 2, err, errlen))
            goto done;
        if (dequant_tensor(f, qbuf, t->rows, t->cols, full) != 0) {
            snprintf(err, errlen, "%s: /%s cannot be dequantized", fname, qpath);
            goto done;
        }
    } else {
        hsize_t dims[2] = {t->rows, t->cols};
        if (read_ds(file, fname, t->name, t->name, H5T_NATIVE_FLOAT, t->ndim, dims, full, 4, err,
                    errlen))
            goto done;
    }
    if (t->nseg > 0) { /* general selection: row segments x a column range */
        uint64_t c0 = t->col0, nc = t->ncols ? t->ncols : t->cols;
        float *dst = t->data;
        for (int k = 0; k < t->nseg; k++)
            for (uint64_t r = t->seg_row0[k]; r < t->seg_row0[k] + t->seg_nrows[k]; r++) {
                memcpy(dst, full + r * t->cols + c0, (size_t)nc * sizeof(float));
                dst += nc;
            }
    } else
        memcpy(t->data, full + t->row0 * t->cols, (size_t)(t->nrows * t->cols) * sizeof(float));
    rc = 0;
done:
    if (g >= 0) H5Gclose(g);
    free(qbuf);
    free(full);
    return rc;
}

int qckpt_load_model(MPI_Comm comm, const char *fname, ckpt_tensor *t, int nt, ckpt_meta *meta,
                     char *err, size_t errlen) {
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    err[0] = 0;
    int rc = ckpt_read_meta(fname, meta, err, errlen);
    hid_t file = -1, f16 = -1;
    if (rc == 0 && (file = H5Fopen(fname, H5F_ACC_RDONLY, H5P_DEFAULT)) < 0) {
        snprintf(err, errlen, "%s: cannot open as HDF5", fname);
        H5Eclear2(H5E_DEFAULT);
        rc = -1;
    }
    if (rc == 0 && H5_CHECK(f16 = fp16_type())) rc = -1;
    for (int i = 0; rc == 0 && i < nt; i++)
        rc = load_one(file, f16, fname, &t[i], err, errlen);
    if (f16 >= 0) H5Tclose(f16);
    if (file >= 0) H5Fclose(file);
    int all = 0, bad = rc != 0;
    MPI_Allreduce(&bad, &all, 1, MPI_INT, MPI_MAX, comm);
    if (all) {
        if (!bad) snprintf(err, errlen, "another rank failed reading %s", fname);
        free(meta->config);
        meta->config = NULL;
        return -1;
    }
    return 0;
}
