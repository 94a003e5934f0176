/* serve: the `mpilm serve` command (issue 8): options, the JSON request
 * format (a strict reader of one flat object, shared by the JSONL batch mode
 * and POST /completion), results as JSON, batch mode (JSONL in, JSONL out in
 * input order, latency summary) and HTTP mode (src/serve_http.h).
 * Not here: scheduling across ranks and hot reload (src/serve_sched.h), the
 * engine (src/infer.h).
 */
#ifndef MPILM_SERVE_H
#define MPILM_SERVE_H

#include <mpi.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>

/* Collective over comm. Exit status: 0, 1 (failure), 2 (usage). stop: set
 * by SIGTERM/SIGINT (main's handler); HTTP mode then stops accepting,
 * answers what it accepted and returns 0. */
int serve_main(int argc, char **argv, MPI_Comm comm, volatile sig_atomic_t *stop);

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

/* Bytes s[0..n) as a JSON string literal (quotes included), malloc'ed:
 * valid UTF-8 passes through, other bytes become U+FFFD. Thread-safe. */
char *serve_json_quote(const char *s, size_t n);

#endif
