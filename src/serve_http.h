/* serve_http: the HTTP front end of `mpilm serve --http HOST:PORT` (issue
 * 8), on libmicrohttpd with a thread per connection.
 *
 *   POST /completion  JSON request in, JSON result out (the body is parsed
 *                     and checked on the connection's thread by the caller's
 *                     parse hook; 400 with the reason, 413 over the size
 *                     limit, 503 once the server is closing)
 *   GET  /health      200 {"status": "ok", "model", "step", "ranks", ...}
 *   GET  /metrics     Prometheus text exposition
 *   other paths 404, other methods 405.
 *
 * Threads: connection threads only parse, queue the request and wait for
 * its answer (mutex + condition variable); the caller's main thread takes
 * queued requests (serve_http_take), runs them and answers
 * (serve_http_reply). No MPI here.
 *
 * Not here: running requests, the JSON request format (src/serve.c).
 */
#ifndef MPILM_SERVE_HTTP_H
#define MPILM_SERVE_HTTP_H

#include "src/serve_sched.h"

#include <stddef.h>

typedef struct serve_http serve_http;

typedef struct {
    size_t max_request_bytes; /* larger bodies get 413 */
    int ranks;                /* for /health */
    /* Connection thread: parses body[0..n). 0 and *req, or an HTTP status
     * (400) and *reply, a malloc'ed JSON body {"error": ...}. Must be
     * thread-safe. */
    int (*parse)(void *ctx, const char *body, size_t n, void **req, char **reply);
    void (*free_req)(void *ctx, void *req); /* a request nobody will take */
    void *ctx;
} serve_http_opts;

/* Binds HOSTPORT ("HOST:PORT", "[V6]:PORT", ":PORT" or "PORT"; no host:
 * 127.0.0.1; port 0: a free one) and starts serving. *url gets
 * "http://HOST:PORT" with the port bound. 0 or -1 with a message. */
int serve_http_start(const char *hostport, const serve_http_opts *o, serve_http **out, char *url,
                     size_t urllen, char *err, size_t errlen);

/* Main thread: the next queued request (its parse result), or NULL; *handle
 * identifies it for the reply. */
void *serve_http_take(serve_http *h, void **handle);
/* Main thread: answers a taken request with status and a JSON body (copied);
 * tokens, latency_s and ok feed /metrics. */
void serve_http_reply(serve_http *h, void *handle, int status, const char *json, int ok,
                      long long tokens, double latency_s);
/* Main thread: the gauges /metrics and /health show. */
void serve_http_publish(serve_http *h, const serve_stats *st);
/* Stops accepting connections (SIGTERM); requests already queued or
 * running are still answered. */
void serve_http_quiesce(serve_http *h);
/* 1 when nothing is queued or waiting for its answer; from then on new
 * requests get 503 (closing). */
int serve_http_try_close(serve_http *h);
/* Stops the daemon (joins its threads) and frees; NULL-safe. */
void serve_http_stop(serve_http *h);

#endif
