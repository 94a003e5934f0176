/* serve_http: libmicrohttpd front end of `mpilm serve` (see serve_http.h). */
#include "src/serve_http.h"

#include "src/serve.h"

#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* latency histogram bounds, seconds */
static const double BUCKETS[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
#define NBUCKETS (int)(sizeof BUCKETS / sizeof BUCKETS[0])

enum { ST_OK, ST_BAD, ST_TOO_LARGE, ST_ERROR, ST_UNAVAILABLE, ST_N };
static const char *ST_NAME[ST_N] = {"ok", "bad_request", "too_large", "error", "unavailable"};

/* a request queued for the main thread, waiting for its answer */
typedef struct pending {
    void *req;
    int done, status;
    char *reply;
    struct pending *next;
} pending;

struct serve_http {
    struct MHD_Daemon *d;
    int quiesced_fd;
    serve_http_opts o;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pending *head, *tail;
    long long waiting; /* queued or taken, not answered */
    int closed;
    /* metrics, under mu */
    long long requests[ST_N], tokens, hist[NBUCKETS + 1], lat_count;
    double lat_sum;
    serve_stats st;
};

/* per-connection state: the body read so far */
typedef struct {
    char *buf;
    size_t n, cap;
    int too_large;
} conn;

static enum MHD_Result respond(struct MHD_Connection *c, int status, const char *type,
                               const char *body, const char *allow) {
    struct MHD_Response *r =
        MHD_create_response_from_buffer(strlen(body), (void *)body, MHD_RESPMEM_MUST_COPY);
    if (!r) return MHD_NO;
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    if (allow) MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, allow);
    enum MHD_Result rc = MHD_queue_response(c, (unsigned)status, r);
    MHD_destroy_response(r);
    return rc;
}

static enum MHD_Result respond_error(serve_http *h, struct MHD_Connection *c, int status, int st,
                                     const char *why) {
    char body[512];
    char *q = serve_json_quote(why, strlen(why));
    snprintf(body, sizeof body, "{\"error\": %s}\n", q ? q : "\"error\"");
    free(q);
    pthread_mutex_lock(&h->mu);
    h->requests[st]++;
    pthread_mutex_unlock(&h->mu);
    return respond(c, status, "application/json", body, NULL);
}

static char *health_json(serve_http *h) {
    pthread_mutex_lock(&h->mu);
    serve_stats st = h->st;
    pthread_mutex_unlock(&h->mu);
    char *q = serve_json_quote(st.model, strlen(st.model));
    char *b = malloc(1400 + (q ? strlen(q) : 0));
    if (b)
        sprintf(b,
                "{\"status\": \"ok\", \"model\": %s, \"step\": %lld, \"ranks\": %d, "
                "\"replicas\": %lld, \"queued\": %lld, \"running\": %lld}\n",
                q ? q : "null", st.model_step, h->o.ranks, st.replicas, st.queued, st.running);
    free(q);
    return b;
}

/* Prometheus text exposition format 0.0.4 */
static char *metrics_text(serve_http *h) {
    size_t cap = 16384;
    char *b = malloc(cap), *p = b;
    if (!b) return NULL;
    pthread_mutex_lock(&h->mu);
#define OUT(...) p += snprintf(p, cap - (size_t)(p - b), __VA_ARGS__)
    OUT("# HELP mpilm_serve_requests_total Completion requests answered, by outcome.\n"
        "# TYPE mpilm_serve_requests_total counter\n");
    for (int i = 0; i < ST_N; i++)
        OUT("mpilm_serve_requests_total{status=\"%s\"} %lld\n", ST_NAME[i], h->requests[i]);
    OUT("# HELP mpilm_serve_tokens_generated_total Tokens generated for answered requests.\n"
        "# TYPE mpilm_serve_tokens_generated_total counter\n"
        "mpilm_serve_tokens_generated_total %lld\n",
        h->tokens);
    OUT("# HELP mpilm_serve_request_latency_seconds Time from arrival to answer of successful "
        "completions.\n# TYPE mpilm_serve_request_latency_seconds histogram\n");
    long long cum = 0;
    for (int i = 0; i < NBUCKETS; i++) {
        cum += h->hist[i];
        OUT("mpilm_serve_request_latency_seconds_bucket{le=\"%g\"} %lld\n", BUCKETS[i], cum);
    }
    cum += h->hist[NBUCKETS];
    OUT("mpilm_serve_request_latency_seconds_bucket{le=\"+Inf\"} %lld\n"
        "mpilm_serve_request_latency_seconds_sum %.6f\n"
        "mpilm_serve_request_latency_seconds_count %lld\n",
        cum, h->lat_sum, h->lat_count);
    const serve_stats *s = &h->st;
    OUT("# HELP mpilm_serve_running_sequences Sequences in the replicas' batches now.\n"
        "# TYPE mpilm_serve_running_sequences gauge\nmpilm_serve_running_sequences %lld\n"
        "# HELP mpilm_serve_queued_requests Requests waiting for a replica with room.\n"
        "# TYPE mpilm_serve_queued_requests gauge\nmpilm_serve_queued_requests %lld\n"
        "# HELP mpilm_serve_replicas Model replicas.\n"
        "# TYPE mpilm_serve_replicas gauge\nmpilm_serve_replicas %lld\n",
        s->running, s->queued, s->replicas);
    OUT("# HELP mpilm_serve_decode_steps_total Batched decode steps run.\n"
        "# TYPE mpilm_serve_decode_steps_total counter\nmpilm_serve_decode_steps_total %lld\n"
        "# HELP mpilm_serve_decode_rows_total Sequences advanced by decode steps (rows / steps "
        "= mean batch size).\n"
        "# TYPE mpilm_serve_decode_rows_total counter\nmpilm_serve_decode_rows_total %lld\n",
        s->decode_steps, s->decode_rows);
    OUT("# HELP mpilm_serve_kv_cache_reserved_bytes KV cache reserved by running sequences.\n"
        "# TYPE mpilm_serve_kv_cache_reserved_bytes gauge\n"
        "mpilm_serve_kv_cache_reserved_bytes %lld\n"
        "# HELP mpilm_serve_kv_cache_budget_bytes KV-cache budget, all replicas.\n"
        "# TYPE mpilm_serve_kv_cache_budget_bytes gauge\nmpilm_serve_kv_cache_budget_bytes %lld\n",
        s->kv_reserved, s->kv_budget);
    OUT("# HELP mpilm_serve_reloads_total Weight reloads (--watch), per replica.\n"
        "# TYPE mpilm_serve_reloads_total counter\n"
        "mpilm_serve_reloads_total{result=\"ok\"} %lld\n"
        "mpilm_serve_reloads_total{result=\"failed\"} %lld\n"
        "# HELP mpilm_serve_model_step Training step of the newest weights served.\n"
        "# TYPE mpilm_serve_model_step gauge\nmpilm_serve_model_step %lld\n",
        s->reloads_ok, s->reloads_failed, s->model_step);
#undef OUT
    pthread_mutex_unlock(&h->mu);
    return b;
}

static enum MHD_Result completion(serve_http *h, struct MHD_Connection *c, conn *cc) {
    void *req = NULL;
    char *reply = NULL;
    int st = h->o.parse(h->o.ctx, cc->buf ? cc->buf : "", cc->n, &req, &reply);
    if (st) {
        pthread_mutex_lock(&h->mu);
        h->requests[ST_BAD]++;
        pthread_mutex_unlock(&h->mu);
        enum MHD_Result r = respond(c, st, "application/json",
                                    reply ? reply : "{\"error\": \"bad request\"}\n", NULL);
        free(reply);
        return r;
    }
    pending p = {.req = req};
    pthread_mutex_lock(&h->mu);
    if (h->closed) {
        pthread_mutex_unlock(&h->mu);
        h->o.free_req(h->o.ctx, req);
        return respond_error(h, c, 503, ST_UNAVAILABLE, "the server is shutting down");
    }
    if (h->tail)
        h->tail->next = &p;
    else
        h->head = &p;
    h->tail = &p;
    h->waiting++;
    while (!p.done)
        pthread_cond_wait(&h->cv, &h->mu);
    pthread_mutex_unlock(&h->mu);
    enum MHD_Result r = respond(c, p.status, "application/json", p.reply ? p.reply : "{}", NULL);
    free(p.reply);
    return r;
}

static enum MHD_Result handler(void *cls, struct MHD_Connection *c, const char *url,
                               const char *method, const char *version, const char *upload,
                               size_t *upload_size, void **con_cls) {
    (void)version;
    serve_http *h = cls;
    conn *cc = *con_cls;
    if (!cc) {
        if (!(cc = calloc(1, sizeof *cc))) return MHD_NO;
        *con_cls = cc;
        const char *cl =
            MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        if (cl && strtoull(cl, NULL, 10) > h->o.max_request_bytes) cc->too_large = 1;
        /* refuse at once, without reading the body */
        if (cc->too_large && !strcmp(url, "/completion") && !strcmp(method, "POST"))
            return respond_error(h, c, 413, ST_TOO_LARGE, "request body over the size limit");
        return MHD_YES;
    }
    if (*upload_size) {
        size_t n = *upload_size;
        *upload_size = 0;
        if (cc->too_large) return MHD_YES;
        if (cc->n + n > h->o.max_request_bytes) {
            cc->too_large = 1;
            free(cc->buf);
            cc->buf = NULL;
            return MHD_YES;
        }
        if (cc->n + n + 1 > cc->cap) {
            size_t cap = cc->cap ? cc->cap : 4096;
            while (cap < cc->n + n + 1)
                cap *= 2;
            char *b = realloc(cc->buf, cap);
            if (!b) return MHD_NO;
            cc->buf = b, cc->cap = cap;
        }
        memcpy(cc->buf + cc->n, upload, n);
        cc->n += n;
        return MHD_YES;
    }
    int get = !strcmp(method, "GET") || !strcmp(method, "HEAD");
    if (!strcmp(url, "/completion")) {
        if (strcmp(method, "POST"))
            return respond(c, 405, "application/json", "{\"error\": \"use POST\"}\n", "POST");
        if (cc->too_large)
            return respond_error(h, c, 413, ST_TOO_LARGE, "request body over the size limit");
        return completion(h, c, cc);
    }
    if (!strcmp(url, "/health") || !strcmp(url, "/metrics")) {
        if (!get) return respond(c, 405, "application/json", "{\"error\": \"use GET\"}\n", "GET");
        int health = !strcmp(url, "/health");
        char *b = health ? health_json(h) : metrics_text(h);
        if (!b) return MHD_NO;
        enum MHD_Result r =
            respond(c, 200, health ? "application/json" : "text/plain; version=0.0.4", b, NULL);
        free(b);
        return r;
    }
    return respond(c, 404, "application/json", "{\"error\": \"not found\"}\n", NULL);
}

static void completed(void *cls, struct MHD_Connection *c, void **con_cls,
                      enum MHD_RequestTerminationCode toe) {
    (void)cls, (void)c, (void)toe;
    conn *cc = *con_cls;
    if (cc) free(cc->buf);
    free(cc);
    *con_cls = NULL;
}

int serve_http_start(const char *hostport, const serve_http_opts *o, serve_http **out, char *url,
                     size_t urllen, char *err, size_t errlen) {
    *out = NULL;
    char host[256] = "127.0.0.1", port[32] = "";
    const char *colon = strrchr(hostport, ':');
    if (hostport[0] == '[') { /* [v6]:port */
        const char *rb = strchr(hostport, ']');
        if (!rb || rb[1] != ':' || (size_t)(rb - hostport - 1) >= sizeof host) goto usage;
        snprintf(host, sizeof host, "%.*s", (int)(rb - hostport - 1), hostport + 1);
        snprintf(port, sizeof port, "%s", rb + 2);
    } else if (colon) {
        if ((size_t)(colon - hostport) >= sizeof host) goto usage;
        if (colon > hostport)
            snprintf(host, sizeof host, "%.*s", (int)(colon - hostport), hostport);
        snprintf(port, sizeof port, "%s", colon + 1);
    } else
        snprintf(port, sizeof port, "%s", hostport);
    char *end;
    long pn = strtol(port, &end, 10);
    if (!port[0] || *end || pn < 0 || pn > 65535) goto usage;

    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai = NULL;
    int gr = getaddrinfo(host, port, &hints, &ai);
    if (gr || !ai) {
        snprintf(err, errlen, "--http %s: cannot resolve %s: %s", hostport, host, gai_strerror(gr));
        return -1;
    }
    serve_http *h = calloc(1, sizeof *h);
    if (!h) {
        freeaddrinfo(ai);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    h->o = *o;
    h->quiesced_fd = -1;
    pthread_mutex_init(&h->mu, NULL);
    pthread_cond_init(&h->cv, NULL);
    int v6 = ai->ai_family == AF_INET6;
    h->d = MHD_start_daemon(MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD |
                                MHD_USE_ITC | (v6 ? MHD_USE_IPv6 : 0),
                            (uint16_t)pn, NULL, NULL, handler, h, MHD_OPTION_SOCK_ADDR, ai->ai_addr,
                            MHD_OPTION_NOTIFY_COMPLETED, completed, h,
                            MHD_OPTION_CONNECTION_TIMEOUT, 600u, MHD_OPTION_END);
    freeaddrinfo(ai);
    if (!h->d) {
        snprintf(err, errlen,
                 "--http %s: cannot listen on %s port %s (in use? not an address "
                 "of this host?)",
                 hostport, host, port);
        serve_http_stop(h);
        return -1;
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(h->d, MHD_DAEMON_INFO_BIND_PORT);
    snprintf(url, urllen, v6 ? "http://[%s]:%u" : "http://%s:%u", host,
             di ? (unsigned)di->port : (unsigned)pn);
    *out = h;
    return 0;
usage:
    snprintf(err, errlen, "--http %s: expected HOST:PORT, [IPV6]:PORT or PORT", hostport);
    return -1;
}

void *serve_http_take(serve_http *h, void **handle) {
    pthread_mutex_lock(&h->mu);
    pending *p = h->head;
    if (p) {
        h->head = p->next;
        if (!h->head) h->tail = NULL;
    }
    pthread_mutex_unlock(&h->mu);
    *handle = p;
    return p ? p->req : NULL;
}

void serve_http_reply(serve_http *h, void *handle, int status, const char *json, int ok,
                      long long tokens, double latency_s) {
    pending *p = handle;
    char *copy = strdup(json);
    pthread_mutex_lock(&h->mu);
    p->status = copy ? status : 500;
    p->reply = copy;
    p->done = 1;
    h->waiting--;
    h->requests[ok ? ST_OK : ST_ERROR]++;
    if (ok) {
        h->tokens += tokens;
        int b = 0;
        while (b < NBUCKETS && latency_s > BUCKETS[b])
            b++;
        h->hist[b]++;
        h->lat_sum += latency_s;
        h->lat_count++;
    }
    pthread_cond_broadcast(&h->cv);
    pthread_mutex_unlock(&h->mu);
}

void serve_http_publish(serve_http *h, const serve_stats *st) {
    pthread_mutex_lock(&h->mu);
    h->st = *st;
    pthread_mutex_unlock(&h->mu);
}

void serve_http_quiesce(serve_http *h) {
    if (h->d && h->quiesced_fd < 0) h->quiesced_fd = MHD_quiesce_daemon(h->d);
}

int serve_http_try_close(serve_http *h) {
    pthread_mutex_lock(&h->mu);
    if (!h->head && h->waiting == 0) h->closed = 1;
    int c = h->closed;
    pthread_mutex_unlock(&h->mu);
    return c;
}

void serve_http_stop(serve_http *h) {
    if (!h) return;
    if (h->d) MHD_stop_daemon(h->d);
    if (h->quiesced_fd >= 0) close(h->quiesced_fd);
    pthread_cond_destroy(&h->cv);
    pthread_mutex_destroy(&h->mu);
    free(h);
}
