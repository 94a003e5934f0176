/* tokfile: token files (DESIGN.md section 5). A 32-byte little-endian header
 *   char magic[8] = "MPILMTOK"; u32 version = 1; u32 vocab_size;
 *   u64 n_tokens; u32 bytes_per_token (1, 2 or 4); u32 reserved = 0
 * followed by n_tokens little-endian tokens. Readers check the header against
 * the file size and refuse anything that does not match. Files are written to
 * a temporary name and renamed, so a reader never sees half a file.
 * Not here: tokenization and batching (src/data).
 */
#ifndef MPILM_TOKFILE_H
#define MPILM_TOKFILE_H

#include <stddef.h>
#include <stdint.h>

#define TOKFILE_HEADER 32
#define TOKFILE_VERSION 1

typedef struct {
    const unsigned char *map; /* whole file, mmap'ed read-only */
    size_t map_len;
    uint64_t n_tokens;
    uint32_t vocab_size, bytes_per_token;
} tokfile;

/* Writes n tokens (each < vocab) to path. Returns 0 or -errno-like code, with
 * a message in err. */
int tokfile_write(const char *path, const uint32_t *tok, size_t n, uint32_t vocab, char *err,
                  size_t errlen);
int tokfile_open(const char *path, tokfile *tf, char *err, size_t errlen);
void tokfile_close(tokfile *tf);
/* dst[i] = token[first + i] for i < count; first + count must be <= n_tokens. */
void tokfile_read(const tokfile *tf, uint64_t first, size_t count, int *dst);

#endif
