#include "catalog/ingest.h"

#include <errno.h>
#include <malloc.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <uv.h>

#include "catalog/catalog.h"
#include "net/client.h"
#include "base/log.h"
#include "base/metrics.h"
#include "base/trace.h"
#include "catalog/rsl.h"

typedef struct tenant {
  struct tg_ingest *ing;
  const tg_config_tenant_t *cfg;
  tg_snapshot_t *snap;
  bool is_http;
  uv_timer_t timer;
  bool busy;  /* an attempt (HTTP fetch) is in flight */
  bool again; /* a refresh was asked while busy */
  uint64_t started_ns;
  /* Validators of the published catalog: only a successful build sets them,
   * so a broken document is fetched and parsed again next time. */
  bool have_stat;
  struct timespec mtime;
  off_t size;
  char *etag, *last_modified;
  tg_span_t *span;             /* the HTTP fetch in flight (base/trace.h); NULL: not traced */
  /* Under ing->lock: pending (asked by tg_ingest_refresh) and the status. */
  bool pending;
  tg_ingest_status_t st;
} tenant_t;

struct tg_ingest {
  const tg_config_t *cfg;
  tenant_t *tenants;
  size_t ntenants, nsources;
  size_t max_bytes;
  uint32_t timeout_ms;
  char *ca_file;
  uv_loop_t loop;
  uv_async_t async;
  uv_timer_t collect; /* frees retired catalogs once their last reader is done */
  uv_thread_t thread;
  tg_httpc_t *httpc;
  uv_mutex_t lock;
  uv_cond_t cond;
  size_t ninitial; /* tenants whose first attempt finished */
  bool stopping;   /* under lock: asked to stop */
  bool closing;    /* ingestion thread only: handles are closing */
  unsigned seed;   /* jitter; ingestion thread only */
  tg_metric_t *m_offers, *m_last, *m_duration, *m_errors;
};

static bool is_url(const char *s) {
  return strncasecmp(s, "http://", 7) == 0 || strncasecmp(s, "https://", 8) == 0;
}

static void schedule_next(tenant_t *t);
static void start_attempt(tenant_t *t);

static void on_timer(uv_timer_t *h) { start_attempt(h->data); }

/* Ends an attempt: status, metrics, log, next timer. */
static void finish(tenant_t *t, const char *reason, const char *detail, bool published,
                   size_t entries, size_t warnings) {
  tg_ingest_t *ing = t->ing;
  double secs = (double)(uv_hrtime() - t->started_ns) / 1e9;
  const char *name = t->cfg->name;
  const char *lab1[] = {name};
  int64_t now = (int64_t)time(NULL);
  /* Only this thread writes the status, so reading it here needs no lock. */
  size_t cur_entries = published ? entries : t->st.entries;
  char ms[32];
  snprintf(ms, sizeof ms, "%.1f", secs * 1000.0);

  /* Metrics and log first: whoever sees the status change also sees them. */
  tg_histogram_observe(ing->m_duration, lab1, secs);
  if (reason) {
    const char *lab2[] = {name, reason};
    tg_counter_add(ing->m_errors, lab2, 1);
    tg_log(TG_LOG_WARN, "catalog refresh failed", "tenant", name, "reason", reason, "detail",
           detail ? detail : "", "ms", ms, NULL);
  } else {
    tg_gauge_set(ing->m_offers, lab1, (double)cur_entries);
    tg_gauge_set(ing->m_last, lab1, (double)now);
    char e[32], w[32];
    snprintf(e, sizeof e, "%zu", cur_entries);
    snprintf(w, sizeof w, "%zu", published ? warnings : (size_t)0);
    tg_log(TG_LOG_INFO, published ? "catalog loaded" : "catalog unchanged", "tenant", name,
           "entries", e, "warnings", w, "ms", ms, NULL);
  }

  uv_mutex_lock(&ing->lock);
  tg_ingest_status_t *st = &t->st;
  st->attempts++;
  st->failing = reason != NULL;
  if (reason) {
    snprintf(st->last_reason, sizeof st->last_reason, "%s", reason);
    snprintf(st->last_error, sizeof st->last_error, "%s: %s", reason, detail ? detail : "");
  } else {
    st->last_success = now;
    if (published) {
      st->loaded = true;
      st->loads++;
      st->entries = entries;
      st->warnings = warnings;
    }
  }
  if (!st->attempted) {
    st->attempted = true;
    ing->ninitial++;
    uv_cond_broadcast(&ing->cond);
  }
  uv_mutex_unlock(&ing->lock);
  t->busy = false;
  schedule_next(t);
}

/* Parses, builds and publishes one document; then finishes the attempt. */
static void load_document(tenant_t *t, const char *body, size_t len) {
  tg_ingest_t *ing = t->ing;
  tg_rsl_options_t ro = {
      .strict = t->cfg->catalog_strict, .max_bytes = ing->max_bytes, .max_elements = TG_INGEST_MAX_ELEMENTS};
  tg_rsl_report_t *rep = malloc(sizeof *rep);
  tg_rsl_doc_t *doc = NULL;
  tg_catalog_t *cat = NULL;
  char detail[192];
  if (!rep) {
    finish(t, "parse", "out of memory", false, 0, 0);
    return;
  }
  int rc = tg_rsl_parse(body, len, &ro, &doc, rep);
  if (rc != 0) {
    snprintf(detail, sizeof detail, "%s", rep->nmessages ? rep->messages[0] : strerror(-rc));
    if (rc == -E2BIG)
      goto too_large;
    finish(t, "parse", detail, false, 0, 0);
    goto out;
  }
  rc = tg_catalog_build(doc, (const char *const *)t->cfg->hosts, t->cfg->nhosts, &cat, detail,
                        sizeof detail);
  if (rc != 0) {
    finish(t, "build", detail, false, 0, 0);
    goto out;
  }
  size_t entries = tg_catalog_entries(cat);
  if (tg_snapshot_publish(t->snap, cat) != 0) {
    tg_catalog_free(cat);
    finish(t, "build", "out of memory publishing", false, 0, 0);
    goto out;
  }
  tg_snapshot_collect(t->snap);
  finish(t, NULL, NULL, true, entries, rep->warnings);
  goto out;
too_large:
  finish(t, "too_large", detail, false, 0, 0);
out:
  tg_rsl_doc_free(doc);
  free(rep);
  /* A build frees a parse tree and often a whole old catalog: hand the pages
   * back, or the process keeps its peak (two catalogs and a tree) for good. */
  malloc_trim(0);
}

/* Reads the file whole, unless mtime and size match the published one. */
static void refresh_file(tenant_t *t) {
  const char *path = t->cfg->catalog_source;
  char detail[192];
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    snprintf(detail, sizeof detail, "%s: %s", path, strerror(errno));
    finish(t, "fetch", detail, false, 0, 0);
    return;
  }
  struct stat sb;
  if (fstat(fd, &sb) != 0) {
    snprintf(detail, sizeof detail, "%s: %s", path, strerror(errno));
    close(fd);
    finish(t, "fetch", detail, false, 0, 0);
    return;
  }
  if (t->have_stat && sb.st_size == t->size && sb.st_mtim.tv_sec == t->mtime.tv_sec &&
      sb.st_mtim.tv_nsec == t->mtime.tv_nsec) {
    close(fd);
    finish(t, NULL, NULL, false, 0, 0);
    return;
  }
  if (sb.st_size < 0 || (uint64_t)sb.st_size > t->ing->max_bytes) {
    snprintf(detail, sizeof detail, "%s: %lld bytes, cap %zu", path, (long long)sb.st_size,
             t->ing->max_bytes);
    close(fd);
    finish(t, "too_large", detail, false, 0, 0);
    return;
  }
  size_t want = (size_t)sb.st_size, got = 0;
  char *buf = malloc(want + 1);
  if (!buf) {
    close(fd);
    finish(t, "fetch", "out of memory", false, 0, 0);
    return;
  }
  while (got < want) {
    ssize_t n = read(fd, buf + got, want - got);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      break;
    got += (size_t)n;
  }
  close(fd);
  if (got != want) {
    snprintf(detail, sizeof detail, "%s: short read", path);
    free(buf);
    finish(t, "fetch", detail, false, 0, 0);
    return;
  }
  uint64_t before = t->st.loads; /* only this thread writes loads */
  load_document(t, buf, got);
  free(buf);
  if (t->st.loads != before) {
    t->have_stat = true;
    t->mtime = sb.st_mtim;
    t->size = sb.st_size;
  }
}

static bool content_type_ok(const tg_httpc_response_t *resp) {
  const tg_http_header_t *h = tg_httpc_header(resp, "Content-Type");
  if (!h)
    return false;
  static const char *const ok[] = {"application/rsl+xml", "application/xml", "text/xml"};
  const char *v = h->value;
  while (*v == ' ' || *v == '\t')
    v++;
  for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
    size_t n = strlen(ok[i]);
    if (strncasecmp(v, ok[i], n) == 0 && (v[n] == '\0' || v[n] == ';' || v[n] == ' '))
      return true;
  }
  return false;
}

static char *dup_header(const tg_httpc_response_t *resp, const char *name) {
  const tg_http_header_t *h = tg_httpc_header(resp, name);
  return h && h->value[0] ? strdup(h->value) : NULL;
}

static void on_fetch(int err, const tg_httpc_response_t *resp, void *ud) {
  tenant_t *t = ud;
  char detail[192];
  if (t->span) {
    if (err == 0)
      tg_span_set_int(t->span, "http.response.status_code", resp->status);
    tg_span_finish(&t->span, err != 0 ? tg_httpc_strerror(err) : resp->status >= 400 ? "http error" : NULL);
  }
  if (err == -ECANCELED) { /* only tg_ingest_stop frees the client */
    t->busy = false;
    return;
  }
  if (err != 0) {
    const char *reason = err == UV_ETIMEDOUT ? "timeout" : err == -EFBIG ? "too_large" : "fetch";
    const char *more = tg_httpc_last_error(t->ing->httpc);
    snprintf(detail, sizeof detail, "%s%s%s", tg_httpc_strerror(err), more[0] ? ": " : "", more);
    finish(t, reason, detail, false, 0, 0);
    return;
  }
  if (resp->status == 304) {
    finish(t, NULL, NULL, false, 0, 0);
    return;
  }
  if (resp->status < 200 || resp->status > 299) {
    snprintf(detail, sizeof detail, "status %d", resp->status);
    finish(t, "http_status", detail, false, 0, 0);
    return;
  }
  if (!content_type_ok(resp)) {
    const tg_http_header_t *h = tg_httpc_header(resp, "Content-Type");
    snprintf(detail, sizeof detail, "%s", h ? h->value : "(none)");
    finish(t, "content_type", detail, false, 0, 0);
    return;
  }
  char *etag = dup_header(resp, "ETag");
  char *lm = dup_header(resp, "Last-Modified");
  uint64_t before = t->st.loads;
  load_document(t, resp->body, resp->body_len);
  if (t->st.loads != before) {
    free(t->etag);
    free(t->last_modified);
    t->etag = etag;
    t->last_modified = lm;
  } else {
    free(etag);
    free(lm);
  }
}

static tg_http_header_t header(const char *name, const char *value) {
  return (tg_http_header_t){
      .name = name, .name_len = strlen(name), .value = value, .value_len = strlen(value)};
}

static void refresh_http(tenant_t *t) {
  static const char accept[] = "application/rsl+xml, application/xml;q=0.9, text/xml;q=0.8";
  tg_http_header_t hdr[4];
  size_t n = 0;
  char tp[TG_TRACEPARENT_LEN + 1];
  hdr[n++] = header("Accept", accept);
  tg_span_finish(&t->span, "abandoned");
  t->span = tg_span_start_root("catalog.fetch", TG_SPAN_CLIENT);
  tg_span_set_str(t->span, "tenant", t->cfg->name);
  if (tg_span_traceparent(t->span, tp) == 0)
    hdr[n++] = header("traceparent", tp);
  if (t->etag)
    hdr[n++] = header("If-None-Match", t->etag);
  if (t->last_modified)
    hdr[n++] = header("If-Modified-Since", t->last_modified);
  tg_httpc_request_t req = {.method = "GET",
                            .url = t->cfg->catalog_source,
                            .headers = hdr,
                            .nheaders = n,
                            .timeout_ms = t->ing->timeout_ms};
  int rc = tg_httpc_send(t->ing->httpc, &req, on_fetch, t);
  if (rc != 0) {
    tg_span_finish(&t->span, tg_httpc_strerror(rc));
    char detail[96];
    snprintf(detail, sizeof detail, "send: %s", tg_httpc_strerror(rc));
    finish(t, "fetch", detail, false, 0, 0);
  }
}

static void start_attempt(tenant_t *t) {
  if (t->busy) {
    t->again = true;
    return;
  }
  t->busy = true;
  t->again = false;
  uv_timer_stop(&t->timer);
  t->started_ns = uv_hrtime();
  if (t->is_http)
    refresh_http(t);
  else
    refresh_file(t);
}

static void schedule_next(tenant_t *t) {
  tg_ingest_t *ing = t->ing;
  if (ing->closing)
    return;
  if (t->again) {
    /* Asked during the attempt: run once more, on the next loop turn. */
    t->again = false;
    uv_timer_start(&t->timer, on_timer, 0, 0);
    return;
  }
  uint64_t period = (uint64_t)(t->cfg->catalog_refresh_s ? t->cfg->catalog_refresh_s : 300) * 1000;
  uint64_t span = period / 20 < 30000 ? period / 20 : 30000;
  uint64_t jitter = span ? (uint64_t)rand_r(&ing->seed) % (span + 1) : 0;
  uv_timer_start(&t->timer, on_timer, period + jitter, 0);
}

static void on_close_noop(uv_handle_t *h) { (void)h; }

static void on_collect(uv_timer_t *h) {
  tg_ingest_t *ing = h->data;
  for (size_t i = 0; i < ing->ntenants; i++)
    if (ing->tenants[i].snap && tg_snapshot_retired(ing->tenants[i].snap) > 0) {
      tg_snapshot_collect(ing->tenants[i].snap);
      if (tg_snapshot_retired(ing->tenants[i].snap) == 0)
        malloc_trim(0);
    }
}

static void on_async(uv_async_t *h) {
  tg_ingest_t *ing = h->data;
  uv_mutex_lock(&ing->lock);
  bool stop = ing->stopping;
  bool *want = calloc(ing->ntenants ? ing->ntenants : 1, sizeof *want);
  for (size_t i = 0; i < ing->ntenants; i++) {
    if (want)
      want[i] = ing->tenants[i].pending;
    ing->tenants[i].pending = false;
  }
  uv_mutex_unlock(&ing->lock);
  if (stop) {
    free(want);
    ing->closing = true;
    /* Cancels an in-flight fetch; its callback gets -ECANCELED and does
     * nothing. */
    tg_httpc_free(ing->httpc);
    ing->httpc = NULL;
    for (size_t i = 0; i < ing->ntenants; i++)
      if (ing->tenants[i].cfg->catalog_source)
        uv_close((uv_handle_t *)&ing->tenants[i].timer, on_close_noop);
    uv_close((uv_handle_t *)&ing->async, on_close_noop);
    uv_close((uv_handle_t *)&ing->collect, on_close_noop);
    return;
  }
  for (size_t i = 0; want && i < ing->ntenants; i++)
    if (want[i])
      start_attempt(&ing->tenants[i]);
  free(want);
}

static void run_thread(void *arg) {
  tg_ingest_t *ing = arg;
  uv_run(&ing->loop, UV_RUN_DEFAULT);
}

static void ingest_free(tg_ingest_t *ing) {
  for (size_t i = 0; i < ing->ntenants; i++) {
    free(ing->tenants[i].etag);
    free(ing->tenants[i].last_modified);
  }
  free(ing->tenants);
  free(ing->ca_file);
  uv_mutex_destroy(&ing->lock);
  uv_cond_destroy(&ing->cond);
  free(ing);
}

static int declare_metrics(tg_ingest_t *ing) {
  static const char *const l1[] = {"tenant_id", NULL};
  static const char *const l2[] = {"tenant_id", "reason", NULL};
  static const double buckets[] = {0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60};
  ing->m_offers = tg_metric_new(TG_METRIC_GAUGE, "catalog_entries",
                                "Entries in the tenant's current catalog.", l1, NULL, 0);
  ing->m_last = tg_metric_new(TG_METRIC_GAUGE, "catalog_last_refresh_timestamp",
                              "Unix time of the last successful catalog refresh.", l1, NULL, 0);
  ing->m_duration = tg_metric_new(TG_METRIC_HISTOGRAM, "catalog_refresh_duration_seconds",
                                  "Duration of catalog refresh attempts.", l1, buckets,
                                  sizeof buckets / sizeof buckets[0]);
  ing->m_errors = tg_metric_new(TG_METRIC_COUNTER, "catalog_refresh_errors_total",
                                "Failed catalog refreshes by reason.", l2, NULL, 0);
  return ing->m_offers && ing->m_last && ing->m_duration && ing->m_errors ? 0 : -1;
}

tg_ingest_t *tg_ingest_start(const tg_config_t *cfg, tg_snapshot_t *const *tenant_snaps, char *err,
                             size_t errlen) {
  return tg_ingest_start_opts(cfg, tenant_snaps, NULL, err, errlen);
}

tg_ingest_t *tg_ingest_start_opts(const tg_config_t *cfg, tg_snapshot_t *const *tenant_snaps,
                                  const tg_ingest_opts_t *opts, char *err, size_t errlen) {
  if (!cfg || (cfg->ntenants && !tenant_snaps)) {
    snprintf(err, errlen, "ingest: no config or snapshots");
    return NULL;
  }
  tg_ingest_t *ing = calloc(1, sizeof *ing);
  if (!ing) {
    snprintf(err, errlen, "ingest: out of memory");
    return NULL;
  }
  ing->cfg = cfg;
  ing->max_bytes = opts && opts->max_bytes ? opts->max_bytes
                  : cfg->ingest_max_bytes   ? cfg->ingest_max_bytes
                                            : TG_INGEST_MAX_BYTES;
  ing->timeout_ms = opts && opts->timeout_ms ? opts->timeout_ms
                    : cfg->ingest_timeout_ms ? cfg->ingest_timeout_ms
                                             : TG_INGEST_TIMEOUT_MS;
  ing->seed = (unsigned)uv_hrtime();
  uv_mutex_init(&ing->lock);
  uv_cond_init(&ing->cond);
  ing->ntenants = cfg->ntenants;
  ing->tenants = calloc(cfg->ntenants ? cfg->ntenants : 1, sizeof *ing->tenants);
  if (!ing->tenants || (opts && opts->ca_file && !(ing->ca_file = strdup(opts->ca_file)))) {
    snprintf(err, errlen, "ingest: out of memory");
    goto fail;
  }
  for (size_t i = 0; i < cfg->ntenants; i++) {
    tenant_t *t = &ing->tenants[i];
    t->ing = ing;
    t->cfg = &cfg->tenants[i];
    if (!t->cfg->catalog_source)
      continue;
    if (!tenant_snaps[i]) {
      snprintf(err, errlen, "ingest: tenant %s has no snapshot", t->cfg->name);
      goto fail;
    }
    t->snap = tenant_snaps[i];
    t->is_http = is_url(t->cfg->catalog_source);
    t->st.has_source = true;
    ing->nsources++;
  }
  if (declare_metrics(ing) != 0) {
    snprintf(err, errlen, "ingest: cannot declare metrics");
    goto fail;
  }
  int rc = uv_loop_init(&ing->loop);
  if (rc != 0) {
    snprintf(err, errlen, "ingest: loop: %s", uv_strerror(rc));
    goto fail;
  }
  /* The cap is on the document; headers get their own allowance on top. */
  tg_httpc_opts_t ho = {.max_conns_per_origin = 4,
                        .max_queue_per_origin = 16,
                        .max_response_bytes = ing->max_bytes + 64 * 1024,
                        .ca_file = ing->ca_file};
  if (!(ing->httpc = tg_httpc_new(&ing->loop, &ho)))
    goto fail_loop;
  ing->async.data = ing;
  if (uv_async_init(&ing->loop, &ing->async, on_async) != 0)
    goto fail_client;
  uv_timer_init(&ing->loop, &ing->collect);
  ing->collect.data = ing;
  uv_timer_start(&ing->collect, on_collect, 1000, 1000);
  uv_unref((uv_handle_t *)&ing->collect);
  for (size_t i = 0; i < ing->ntenants; i++) {
    tenant_t *t = &ing->tenants[i];
    if (!t->cfg->catalog_source)
      continue;
    uv_timer_init(&ing->loop, &t->timer);
    t->timer.data = t;
    uv_timer_start(&t->timer, on_timer, 0, 0); /* the initial load, first loop turn */
  }
  if (uv_thread_create(&ing->thread, run_thread, ing) != 0) {
    snprintf(err, errlen, "ingest: cannot start thread");
    ing->stopping = true;
    on_async(&ing->async);
    uv_run(&ing->loop, UV_RUN_DEFAULT);
    uv_loop_close(&ing->loop);
    ingest_free(ing);
    return NULL;
  }
  return ing;
fail_client:
  tg_httpc_free(ing->httpc);
  uv_run(&ing->loop, UV_RUN_DEFAULT);
fail_loop:
  snprintf(err, errlen, "ingest: cannot set up the loop");
  uv_loop_close(&ing->loop);
fail:
  ingest_free(ing);
  return NULL;
}

int tg_ingest_refresh(tg_ingest_t *ing, const char *tenant) {
  if (!ing)
    return -EINVAL;
  int rc = -ENOENT;
  uv_mutex_lock(&ing->lock);
  for (size_t i = 0; i < ing->ntenants; i++) {
    tenant_t *t = &ing->tenants[i];
    if (!t->cfg->catalog_source || (tenant && strcmp(tenant, t->cfg->name) != 0))
      continue;
    t->pending = true;
    rc = 0;
  }
  uv_mutex_unlock(&ing->lock);
  if (rc == 0)
    uv_async_send(&ing->async);
  return rc;
}

int tg_ingest_wait_initial(tg_ingest_t *ing, uint32_t timeout_ms) {
  if (!ing)
    return -EINVAL;
  uint64_t deadline = uv_hrtime() + (uint64_t)timeout_ms * 1000000u;
  int rc = 0;
  uv_mutex_lock(&ing->lock);
  while (ing->ninitial < ing->nsources) {
    uint64_t now = uv_hrtime();
    if (now >= deadline || uv_cond_timedwait(&ing->cond, &ing->lock, deadline - now) != 0) {
      if (ing->ninitial < ing->nsources)
        rc = -ETIMEDOUT;
      break;
    }
  }
  uv_mutex_unlock(&ing->lock);
  return rc;
}

int tg_ingest_status(tg_ingest_t *ing, size_t tenant_index, tg_ingest_status_t *out) {
  if (!ing || !out || tenant_index >= ing->ntenants)
    return -EINVAL;
  uv_mutex_lock(&ing->lock);
  *out = ing->tenants[tenant_index].st;
  uv_mutex_unlock(&ing->lock);
  return 0;
}

void tg_ingest_stop(tg_ingest_t *ing) {
  if (!ing)
    return;
  uv_mutex_lock(&ing->lock);
  ing->stopping = true;
  uv_mutex_unlock(&ing->lock);
  uv_async_send(&ing->async);
  uv_thread_join(&ing->thread);
  uv_loop_close(&ing->loop);
  ingest_free(ing);
}
