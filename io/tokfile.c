/* tokfile: header check, mmap reader, atomic writer. */
#include "io/tokfile.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static const char magic[8] = {'M', 'P', 'I', 'L', 'M', 'T', 'O', 'K'};

static void put32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static void put64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static uint32_t get32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t get64(const unsigned char *p) { return get32(p) | (uint64_t)get32(p + 4) << 32; }

int tokfile_write(const char *path, const uint32_t *tok, size_t n, uint32_t vocab, char *err,
                  size_t errlen) {
    uint32_t bpt = vocab <= 256 ? 1 : vocab <= 65536 ? 2 : 4;
    unsigned char hdr[TOKFILE_HEADER] = {0}, buf[4096];
    char tmp[4096];
    memcpy(hdr, magic, 8);
    put32(hdr + 8, TOKFILE_VERSION);
    put32(hdr + 12, vocab);
    put64(hdr + 16, n);
    put32(hdr + 24, bpt);
    snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid());
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        snprintf(err, errlen, "%s: cannot create: %s", tmp, strerror(errno));
        return -1;
    }
    int ok = fwrite(hdr, 1, sizeof hdr, f) == sizeof hdr;
    size_t fill = 0;
    for (size_t i = 0; ok && i < n; i++) {
        if (tok[i] >= vocab) {
            snprintf(err, errlen, "%s: token %u at %zu is not below vocab size %u", path, tok[i],
                     i, vocab);
            fclose(f);
            unlink(tmp);
            return -1;
        }
        for (uint32_t b = 0; b < bpt; b++) buf[fill++] = (unsigned char)(tok[i] >> (8 * b));
        if (fill + 4 > sizeof buf) {
            ok = fwrite(buf, 1, fill, f) == fill;
            fill = 0;
        }
    }
    if (ok && fill) ok = fwrite(buf, 1, fill, f) == fill;
    ok = ok && fflush(f) == 0 && fsync(fileno(f)) == 0;
    if (fclose(f) != 0) ok = 0;
    if (!ok || rename(tmp, path) != 0) {
        snprintf(err, errlen, "%s: write failed: %s", path, strerror(errno));
        unlink(tmp);
        return -1;
    }
    return 0;
}

int tokfile_open(const char *path, tokfile *tf, char *err, size_t errlen) {
    memset(tf, 0, sizeof *tf);
    int fd = open(path, O_RDONLY);
    if (fd < 0) {
        snprintf(err, errlen, "%s: cannot open token file: %s", path, strerror(errno));
        return -1;
    }
    struct stat st;
    int rc = -1;
    if (fstat(fd, &st) != 0 || st.st_size < TOKFILE_HEADER) {
        snprintf(err, errlen, "%s: not a token file (%lld bytes, shorter than its header)", path,
                 (long long)st.st_size);
        goto done;
    }
    void *m = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (m == MAP_FAILED) {
        snprintf(err, errlen, "%s: mmap failed: %s", path, strerror(errno));
        goto done;
    }
    const unsigned char *h = m;
    uint32_t ver = get32(h + 8), vocab = get32(h + 12), bpt = get32(h + 24);
    uint64_t n = get64(h + 16);
    if (memcmp(h, magic, 8) != 0)
        snprintf(err, errlen, "%s: not a token file (bad magic)", path);
    else if (ver != TOKFILE_VERSION)
        snprintf(err, errlen, "%s: unsupported token file version %u (expected %u)", path, ver,
                 TOKFILE_VERSION);
    else if (bpt != 1 && bpt != 2 && bpt != 4)
        snprintf(err, errlen, "%s: bad bytes per token %u", path, bpt);
    else if (n > (uint64_t)(st.st_size - TOKFILE_HEADER) / bpt ||
             TOKFILE_HEADER + n * bpt != (uint64_t)st.st_size)
        snprintf(err, errlen,
                 "%s: header says %llu tokens (%llu bytes) but the file has %lld bytes "
                 "(truncated or corrupt)",
                 path, (unsigned long long)n, (unsigned long long)(TOKFILE_HEADER + n * bpt),
                 (long long)st.st_size);
    else {
        tf->map = m;
        tf->map_len = (size_t)st.st_size;
        tf->n_tokens = n;
        tf->vocab_size = vocab;
        tf->bytes_per_token = bpt;
        rc = 0;
    }
    if (rc) munmap(m, (size_t)st.st_size);
done:
    close(fd);
    return rc;
}

void tokfile_close(tokfile *tf) {
    if (tf && tf->map) munmap((void *)tf->map, tf->map_len);
    if (tf) memset(tf, 0, sizeof *tf);
}

void tokfile_read(const tokfile *tf, uint64_t first, size_t count, int *dst) {
    const unsigned char *p = tf->map + TOKFILE_HEADER + first * tf->bytes_per_token;
    if (tf->bytes_per_token == 1)
        for (size_t i = 0; i < count; i++) dst[i] = p[i];
    else if (tf->bytes_per_token == 2)
        for (size_t i = 0; i < count; i++) dst[i] = p[2 * i] | p[2 * i + 1] << 8;
    else
        for (size_t i = 0; i < count; i++) dst[i] = (int)get32(p + 4 * i);
}
