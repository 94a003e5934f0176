/* serve: `mpilm serve` batch mode (issue 8): JSONL requests in, JSONL
 * results out, continuous batching on every rank (src/infer.h), requests
 * handed out by rank 0 round-robin, results written by rank 0 in input
 * order. Not here: the engine (src/infer.c).
 */
#ifndef MPILM_SERVE_H
#define MPILM_SERVE_H

#include <mpi.h>
#include <stddef.h>
#include <stdint.h>

/* Collective over comm. Exit status: 0, 1 (failure), 2 (usage). */
int serve_main(int argc, char **argv, MPI_Comm comm);

/* One parsed request line (exposed for tests). */
typedef struct {
    char *id;     /* the id as JSON text ("null" when absent), malloc'ed */
    char *prompt; /* bytes (UTF-8 of the JSON string), malloc'ed */
    size_t prompt_len;
    long long max_new_tokens;  /* -1: default */
    double temperature, top_p; /* < 0: default */
    long long top_k, seed;     /* -1: default */
    char *stop;                /* NULL: default */
} serve_line;

/* Parses one flat JSON object. 0, or -1 with the reason in err (id is set
 * whenever it could be read). Free with serve_line_free. */
int serve_parse_line(const char *s, size_t n, serve_line *out, char *err, size_t errlen);
void serve_line_free(serve_line *l);

#endif
