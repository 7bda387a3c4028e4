#include "rpc/connect.h"
#include "base/b64.h"
#include "base/hex.h"

#include <errno.h>
#include <pthread.h>
#include <stdalign.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <jansson.h>
#include <llhttp.h>
#include <mbedtls/base64.h>
#include <uv.h>
#include <zlib.h>

#include "base/metrics.h"
#include "base/utf8.h"
#include "rpc/pbjson.h"

/* Responses at least this large are gzipped when the client accepts gzip
 * (connect-es uses the same 1 KiB default: smaller bodies are not worth it). */
#define COMPRESS_MIN_BYTES 1024
/* Proto replies up to this size are packed on the stack. */
#define STACK_PACK_BYTES 4096
/* The first request-scoped arena block lives inside the call allocation. */
#define ARENA_INLINE_BYTES 2048
#define ARENA_BLOCK_BYTES 8192
#define MESSAGE_MAX 512
#define EXTRA_HEADERS_MAX 4 /* tg_connect_call_add_header */

#define ACCEPT_POST "application/json, application/proto"

static const char *const code_names[] = {
    "ok",
    "canceled",
    "unknown",
    "invalid_argument",
    "deadline_exceeded",
    "not_found",
    "already_exists",
    "permission_denied",
    "resource_exhausted",
    "failed_precondition",
    "aborted",
    "out_of_range",
    "unimplemented",
    "internal",
    "unavailable",
    "data_loss",
    "unauthenticated",
};

/* The Connect specification's table; 499 is nginx's "client closed request". */
static const int code_http[] = {
    200, 499, 500, 400, 504, 404, 409, 403, 429, 400, 409, 400, 501, 500, 503, 500, 401,
};

const char *tg_connect_code_name(tg_connect_code_t code) {
  if ((unsigned)code >= sizeof code_names / sizeof code_names[0])
    return "unknown";
  return code_names[code];
}

int tg_connect_code_http(tg_connect_code_t code) {
  if ((unsigned)code >= sizeof code_http / sizeof code_http[0])
    return 500;
  return code_http[code];
}

typedef struct route {
  tg_connect_method_t m; /* path and name point to the copies below */
  char *path;
  size_t path_len;
  char *name;
} route_t;

/* Routes sorted by (path length, bytes): lookups are a binary search over
 * memory nobody writes once workers run, so no lock is needed. */
struct tg_connect_router {
  route_t *routes;
  size_t n;
  size_t max_message;
};

tg_connect_router_t *tg_connect_router_new(void) {
  tg_connect_router_t *r = calloc(1, sizeof *r);
  if (r)
    r->max_message = TG_CONNECT_MAX_MESSAGE_BYTES;
  return r;
}

void tg_connect_router_free(tg_connect_router_t *r) {
  if (r == NULL)
    return;
  for (size_t i = 0; i < r->n; i++) {
    free(r->routes[i].path);
    free(r->routes[i].name);
  }
  free(r->routes);
  free(r);
}

void tg_connect_router_set_max_message(tg_connect_router_t *r, size_t max_bytes) {
  r->max_message = max_bytes;
}

static int route_cmp(const char *a, size_t alen, const route_t *b) {
  if (alen != b->path_len)
    return alen < b->path_len ? -1 : 1;
  return memcmp(a, b->path, alen);
}

static const route_t *route_find(const tg_connect_router_t *r, const char *path, size_t len) {
  size_t lo = 0, hi = r->n;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    int c = route_cmp(path, len, &r->routes[mid]);
    if (c == 0)
      return &r->routes[mid];
    if (c < 0)
      hi = mid;
    else
      lo = mid + 1;
  }
  return NULL;
}

int tg_connect_router_add(tg_connect_router_t *r, const tg_connect_method_t *m) {
  if (m->path == NULL || m->path[0] != '/' || m->input == NULL || m->output == NULL ||
      m->fn == NULL)
    return -EINVAL;
  size_t len = strlen(m->path);
  size_t pos = 0;
  while (pos < r->n && route_cmp(m->path, len, &r->routes[pos]) > 0)
    pos++;
  if (pos < r->n && route_cmp(m->path, len, &r->routes[pos]) == 0)
    return -EEXIST;

  route_t nr = {.m = *m, .path_len = len};
  nr.path = strdup(m->path);
  nr.name = strdup(m->name ? m->name : m->path);
  route_t *grown = realloc(r->routes, (r->n + 1) * sizeof *grown);
  if (nr.path == NULL || nr.name == NULL || grown == NULL) {
    free(nr.path);
    free(nr.name);
    if (grown)
      r->routes = grown;
    return -ENOMEM;
  }
  r->routes = grown;
  nr.m.path = nr.path;
  nr.m.name = nr.name;
  memmove(&r->routes[pos + 1], &r->routes[pos], (r->n - pos) * sizeof *grown);
  r->routes[pos] = nr;
  r->n++;
  return 0;
}

static tg_metric_t *metric_total, *metric_duration;

int tg_connect_metrics_init(void) {
  static const char *const total_labels[] = {"method", "code", "tenant_id", NULL};
  static const char *const duration_labels[] = {"method", "tenant_id", NULL};
  metric_total = tg_metric_new(TG_METRIC_COUNTER, "exchange_rpc_total",
                               "Connect RPCs answered, by method, Connect code and tenant.",
                               total_labels, NULL, 0);
  metric_duration =
      tg_metric_new(TG_METRIC_HISTOGRAM, "exchange_rpc_duration_seconds",
                    "Time from the request line to the Connect answer, by method and tenant.",
                    duration_labels, NULL, 0);
  return metric_total && metric_duration ? 0 : -ENOMEM;
}

typedef enum { CODEC_PROTO, CODEC_JSON } codec_t;
typedef enum { TIMER_NONE, TIMER_ACTIVE, TIMER_CLOSING } timer_state_t;

typedef struct arena_block {
  struct arena_block *next;
  alignas(max_align_t) char data[];
} arena_block_t;

struct tg_connect_call {
  tg_http_req_t *req; /* NULL once answered */
  const route_t *route;
  ProtobufCMessage *request; /* decoded input */
  int request_in_arena;      /* 1: lives in the arena, 0: malloc'd by pbjson */
  codec_t codec;
  unsigned is_get : 1;
  unsigned gzip_response : 1; /* client accepts gzip */
  unsigned answered : 1;
  unsigned expired : 1;
  unsigned finished : 1;    /* the handler called reply or fail */
  unsigned in_dispatch : 1; /* inside the handler's first invocation */
  timer_state_t timer_state;
  uint64_t start_ns;
  uint64_t deadline_ns; /* 0: no deadline */
  uv_timer_t timer;
  char tenant[64];
  tg_span_t *span; /* the server span (base/trace.h); NULL: not traced */
  tg_http_header_t extra[EXTRA_HEADERS_MAX]; /* sent with the answer; strings in the arena */
  unsigned nextra;
  ProtobufCAllocator allocator; /* protobuf-c view of the arena */
  char *arena_cur, *arena_end;
  arena_block_t *blocks;
  alignas(max_align_t) char arena_inline[ARENA_INLINE_BYTES];
};

/* Bump allocation: everything the request decodes into is freed at once with
 * the call, so the hot path does no per-field malloc. */
void *tg_connect_call_alloc(tg_connect_call_t *call, size_t n) {
  const size_t align = alignof(max_align_t);
  if (n == 0)
    n = 1;
  if (n > SIZE_MAX - align)
    return NULL;
  n = (n + align - 1) & ~(align - 1);
  if ((size_t)(call->arena_end - call->arena_cur) < n) {
    size_t size = n > ARENA_BLOCK_BYTES ? n : ARENA_BLOCK_BYTES;
    arena_block_t *b = malloc(sizeof *b + size);
    if (b == NULL)
      return NULL;
    b->next = call->blocks;
    call->blocks = b;
    if (n >= ARENA_BLOCK_BYTES) /* a big one-off: keep bumping in the current block */
      return b->data;
    call->arena_cur = b->data;
    call->arena_end = b->data + size;
  }
  void *p = call->arena_cur;
  call->arena_cur += n;
  return p;
}

static void *arena_pb_alloc(void *data, size_t n) { return tg_connect_call_alloc(data, n); }

static void arena_pb_free(void *data, void *p) {
  (void)data;
  (void)p;
}

static struct zcache *zcache_get(void);
static void *call_cache_take(void);
static int call_cache_put(tg_connect_call_t *call);

static tg_connect_call_t *call_new(tg_http_req_t *req, const route_t *route) {
  tg_connect_call_t *call = call_cache_take();
  if (call == NULL)
    call = malloc(sizeof *call);
  if (call == NULL)
    return NULL;
  memset(call, 0, offsetof(tg_connect_call_t, arena_inline));
  call->req = req;
  call->route = route;
  call->start_ns = req->start_ns ? req->start_ns : uv_hrtime();
  call->allocator.alloc = arena_pb_alloc;
  call->allocator.free = arena_pb_free;
  call->allocator.allocator_data = call;
  call->arena_cur = call->arena_inline;
  call->arena_end = call->arena_inline + sizeof call->arena_inline;
  return call;
}

static void call_free(tg_connect_call_t *call) {
  tg_span_finish(&call->span, NULL);
  if (call->request && !call->request_in_arena)
    protobuf_c_message_free_unpacked(call->request, NULL);
  arena_block_t *b = call->blocks;
  while (b) {
    arena_block_t *next = b->next;
    free(b);
    b = next;
  }
  if (call_cache_put(call) != 0)
    free(call);
}

/* One deflate and one inflate state per thread, reset between uses: a fresh
 * deflate state costs ~256 KiB of allocation. Freed when the thread exits. */
/* Calls are made and freed on their worker, so the same per-thread cache
 * keeps a few freed call structs: it spares the allocator a 2 KiB block
 * (past glibc's fast bins) per call. */
#define CALL_CACHE_MAX 64

typedef struct zcache {
  z_stream def;
  z_stream inf;
  int def_ok, inf_ok;
  tg_connect_call_t *calls[CALL_CACHE_MAX];
  unsigned ncalls;
} zcache_t;

static pthread_key_t zcache_key;
static pthread_once_t zcache_once = PTHREAD_ONCE_INIT;

static void zcache_destroy(void *p) {
  zcache_t *z = p;
  if (z->def_ok)
    deflateEnd(&z->def);
  if (z->inf_ok)
    inflateEnd(&z->inf);
  while (z->ncalls)
    free(z->calls[--z->ncalls]);
  free(z);
}

static void zcache_key_init(void) { pthread_key_create(&zcache_key, zcache_destroy); }

static zcache_t *zcache_get(void) {
  pthread_once(&zcache_once, zcache_key_init);
  zcache_t *z = pthread_getspecific(zcache_key);
  if (z == NULL) {
    z = calloc(1, sizeof *z);
    if (z == NULL || pthread_setspecific(zcache_key, z) != 0) {
      free(z);
      return NULL;
    }
  }
  return z;
}

static void *call_cache_take(void) {
  zcache_t *z = zcache_get();
  return z && z->ncalls ? z->calls[--z->ncalls] : NULL;
}

static int call_cache_put(tg_connect_call_t *call) {
  zcache_t *z = zcache_get();
  if (z == NULL || z->ncalls == CALL_CACHE_MAX)
    return -1;
  z->calls[z->ncalls++] = call;
  return 0;
}

/* gzip of in into a new buffer; NULL on failure (the caller then sends the
 * body uncompressed). */
static unsigned char *gzip_compress(const void *in, size_t in_len, size_t *out_len) {
  zcache_t *z = zcache_get();
  if (z == NULL || in_len > UINT_MAX)
    return NULL;
  if (!z->def_ok) {
    if (deflateInit2(&z->def, Z_DEFAULT_COMPRESSION, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) !=
        Z_OK)
      return NULL;
    z->def_ok = 1;
  } else if (deflateReset(&z->def) != Z_OK) {
    return NULL;
  }
  uLong bound = deflateBound(&z->def, (uLong)in_len);
  unsigned char *out = malloc(bound);
  if (out == NULL)
    return NULL;
  z->def.next_in = (Bytef *)in;
  z->def.avail_in = (uInt)in_len;
  z->def.next_out = out;
  z->def.avail_out = (uInt)bound;
  if (deflate(&z->def, Z_FINISH) != Z_STREAM_END) {
    free(out);
    return NULL;
  }
  *out_len = bound - z->def.avail_out;
  return out;
}

typedef enum { INFLATE_OK, INFLATE_BAD, INFLATE_TOO_BIG, INFLATE_NOMEM } inflate_rc_t;

/* Inflates a gzip body (several concatenated members allowed, as in Go's
 * reader) into a new buffer of at most max bytes. */
static inflate_rc_t gzip_inflate(const void *in, size_t in_len, size_t max, unsigned char **out,
                                 size_t *out_len, char *why, size_t whylen) {
  zcache_t *z = zcache_get();
  if (z == NULL || in_len > UINT_MAX)
    return INFLATE_NOMEM;
  if (!z->inf_ok) {
    if (inflateInit2(&z->inf, 15 + 16) != Z_OK)
      return INFLATE_NOMEM;
    z->inf_ok = 1;
  } else if (inflateReset(&z->inf) != Z_OK) {
    return INFLATE_NOMEM;
  }
  size_t cap = in_len < 1024 ? 4096 : in_len * 4;
  if (cap > max + 1)
    cap = max + 1;
  unsigned char *buf = malloc(cap);
  if (buf == NULL)
    return INFLATE_NOMEM;
  size_t len = 0;
  z_stream *s = &z->inf;
  s->next_in = (Bytef *)in;
  s->avail_in = (uInt)in_len;
  inflate_rc_t rc = INFLATE_OK;
  for (;;) {
    if (len == cap) {
      if (cap > max) {
        rc = INFLATE_TOO_BIG;
        break;
      }
      size_t ncap = cap * 2 > max + 1 ? max + 1 : cap * 2;
      unsigned char *nb = realloc(buf, ncap);
      if (nb == NULL) {
        rc = INFLATE_NOMEM;
        break;
      }
      buf = nb;
      cap = ncap;
    }
    size_t room = cap - len > UINT_MAX ? UINT_MAX : cap - len;
    s->next_out = buf + len;
    s->avail_out = (uInt)room;
    int zrc = inflate(s, Z_NO_FLUSH);
    len += room - s->avail_out;
    if (zrc == Z_STREAM_END) {
      if (s->avail_in == 0)
        break;
      if (inflateReset(s) != Z_OK) { /* another gzip member follows */
        rc = INFLATE_NOMEM;
        break;
      }
      continue;
    }
    if (zrc == Z_OK || (zrc == Z_BUF_ERROR && s->avail_out == 0))
      continue;
    if (zrc == Z_MEM_ERROR) {
      rc = INFLATE_NOMEM;
      break;
    }
    snprintf(why, whylen, "%s",
             zrc == Z_BUF_ERROR ? "unexpected EOF"
             : s->msg           ? s->msg
                                : "invalid gzip data");
    rc = INFLATE_BAD;
    break;
  }
  if (rc == INFLATE_OK && len > max)
    rc = INFLATE_TOO_BIG;
  if (rc != INFLATE_OK) {
    free(buf);
    return rc;
  }
  *out = buf;
  *out_len = len;
  return INFLATE_OK;
}

static void record(tg_connect_call_t *call, tg_connect_code_t code) {
  if (call->span) {
    tg_span_set_str(call->span, "tenant", call->tenant);
    tg_span_set_str(call->span, "rpc.connect.code", tg_connect_code_name(code));
    if (code != TG_CONNECT_OK)
      tg_span_set_error(call->span, tg_connect_code_name(code));
    tg_span_finish(&call->span, NULL);
  }
  if (metric_total == NULL)
    return;
  const char *name = call->route->name;
  const char *total[] = {name, tg_connect_code_name(code), call->tenant};
  tg_counter_add(metric_total, total, 1);
  const char *dur[] = {name, call->tenant};
  tg_histogram_observe(metric_duration, dur, (double)(uv_hrtime() - call->start_ns) / 1e9);
}

/* Headers shared by every Connect answer: the codings we take, Vary on GET
 * because the body depends on Accept-Encoding and GETs are cacheable, and
 * the handler's own (tg_connect_call_add_header). h holds BASE_HEADERS_MAX. */
#define BASE_HEADERS_MAX (3 + EXTRA_HEADERS_MAX)
static size_t base_headers(const tg_connect_call_t *call, tg_http_header_t *h,
                           const char *content_type) {
  size_t n = 0;
  h[n++] = (tg_http_header_t){"Content-Type", 12, content_type, strlen(content_type)};
  h[n++] = (tg_http_header_t){"Accept-Encoding", 15, "gzip", 4};
  if (call->is_get)
    h[n++] = (tg_http_header_t){"Vary", 4, "Accept-Encoding", 15};
  for (unsigned i = 0; i < call->nextra; i++)
    h[n++] = call->extra[i];
  return n;
}

static bool is_tchar(unsigned char ch) {
  return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
         (ch && strchr("!#$%&'*+-.^_`|~", ch) != NULL);
}

/* Headers the protocol or the server writes itself: a second copy would
 * contradict the first. */
static const char *const owned_headers[] = {"content-type", "content-encoding", "content-length",
                                            "accept-encoding", "vary", "connection",
                                            "transfer-encoding", "date", "server", NULL};

int tg_connect_call_add_header(tg_connect_call_t *call, const char *name, const char *value) {
  if (call == NULL || name == NULL || value == NULL || name[0] == '\0')
    return -EINVAL;
  size_t nlen = strlen(name), vlen = strlen(value);
  for (size_t i = 0; i < nlen; i++)
    if (!is_tchar((unsigned char)name[i]))
      return -EINVAL;
  for (size_t i = 0; i < vlen; i++) /* no CR, LF or other control byte: no header injection */
    if (((unsigned char)value[i] < 0x20 && value[i] != '\t') || value[i] == 0x7f)
      return -EINVAL;
  for (const char *const *o = owned_headers; *o; o++)
    if (strcasecmp(name, *o) == 0)
      return -EINVAL;
  if (call->nextra == EXTRA_HEADERS_MAX)
    return -ENOSPC;
  char *copy = tg_connect_call_alloc(call, nlen + vlen + 2);
  if (copy == NULL)
    return -ENOMEM;
  memcpy(copy, name, nlen + 1);
  memcpy(copy + nlen + 1, value, vlen + 1);
  call->extra[call->nextra++] = (tg_http_header_t){copy, nlen, copy + nlen + 1, vlen};
  return 0;
}

/* One Connect error detail: {"type": full message name, "value": its binary
 * encoding in unpadded standard base64}. NULL on out of memory. */
static json_t *error_detail(const ProtobufCMessage *m) {
  size_t n = protobuf_c_message_get_packed_size(m);
  uint8_t *bin = malloc(n ? n : 1);
  size_t el = tg_b64_len(n, 0) + 1;
  char *enc = malloc(el);
  json_t *d = NULL;
  if (bin && enc) {
    protobuf_c_message_pack(m, bin);
    if (tg_b64_encode(bin, n, 0, 0, enc, el) >= 0) {
      d = json_object();
      if (d) {
        json_object_set_new(d, "type", json_string(m->descriptor->name));
        json_object_set_new(d, "value", json_string(enc));
      }
    }
  }
  free(bin);
  free(enc);
  return d;
}

/* Connect error bodies are JSON and never compressed (as connect-go). */
static void answer_error_detail(tg_connect_call_t *call, tg_connect_code_t code, const char *msg,
                                const ProtobufCMessage *detail) {
  json_t *o = json_object();
  char *text = NULL;
  if (o) {
    json_object_set_new(o, "code", json_string(tg_connect_code_name(code)));
    /* Messages quote client input and may be cut mid-character by the
     * formatting buffer: repaired, never dropped or mangled to ASCII. */
    if (msg && *msg)
      json_object_set_new(o, "message", tg_utf8_json_string(msg));
    json_t *d = detail ? error_detail(detail) : NULL;
    if (d)
      json_object_set_new(o, "details", json_pack("[o]", d));
    text = json_dumps(o, JSON_COMPACT);
    json_decref(o);
  }
  char fallback[64];
  const char *body = text;
  if (body == NULL) { /* out of memory: jansson cannot build it; the code names are constants */
    snprintf(fallback, sizeof fallback, "{\"code\":\"%s\"}", tg_connect_code_name(code));
    body = fallback;
  }
  tg_http_header_t h[BASE_HEADERS_MAX];
  size_t nh = base_headers(call, h, "application/json");
  tg_http_respond(call->req, tg_connect_code_http(code), h, nh, body, strlen(body));
  free(text);
  call->req = NULL;
  call->answered = 1;
  record(call, code);
}

static void answer_error(tg_connect_call_t *call, tg_connect_code_t code, const char *msg) {
  answer_error_detail(call, code, msg, NULL);
}

static void answer_errorf(tg_connect_call_t *call, tg_connect_code_t code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void answer_errorf(tg_connect_call_t *call, tg_connect_code_t code, const char *fmt, ...) {
  char msg[MESSAGE_MAX];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  answer_error(call, code, msg);
}

static void answer_message(tg_connect_call_t *call, const ProtobufCMessage *msg) {
  if (msg == NULL || msg->descriptor != call->route->m.output) {
    answer_errorf(call, TG_CONNECT_INTERNAL, "handler replied with %s, want %s",
                  msg ? msg->descriptor->name : "nothing", call->route->m.output->name);
    return;
  }
  unsigned char stack[STACK_PACK_BYTES];
  unsigned char *heap = NULL, *gz = NULL;
  const unsigned char *body;
  size_t len;
  if (call->codec == CODEC_PROTO) {
    len = protobuf_c_message_get_packed_size(msg);
    if (len <= sizeof stack) {
      body = stack;
    } else if ((heap = malloc(len)) != NULL) {
      body = heap;
    } else {
      answer_error(call, TG_CONNECT_RESOURCE_EXHAUSTED, "out of memory packing the reply");
      return;
    }
    protobuf_c_message_pack(msg, (uint8_t *)body);
  } else {
    heap = (unsigned char *)tg_pbjson_encode_text(msg, &len);
    if (heap == NULL) {
      answer_errorf(call, TG_CONNECT_INTERNAL, "marshal %s to JSON failed", msg->descriptor->name);
      return;
    }
    body = heap;
  }
  tg_http_header_t h[BASE_HEADERS_MAX + 1];
  size_t nh =
      base_headers(call, h, call->codec == CODEC_PROTO ? "application/proto" : "application/json");
  size_t gz_len;
  if (call->gzip_response && len >= COMPRESS_MIN_BYTES &&
      (gz = gzip_compress(body, len, &gz_len)) != NULL) {
    h[nh++] = (tg_http_header_t){"Content-Encoding", 16, "gzip", 4};
    body = gz;
    len = gz_len;
  }
  tg_http_respond(call->req, 200, h, nh, body, len);
  free(gz);
  free(heap);
  call->req = NULL;
  call->answered = 1;
  record(call, TG_CONNECT_OK);
}

static void on_timer_closed(uv_handle_t *h) {
  tg_connect_call_t *call = h->data;
  call->timer_state = TIMER_NONE;
  if (call->finished)
    call_free(call);
}

static void on_deadline(uv_timer_t *t) {
  tg_connect_call_t *call = t->data;
  call->expired = 1;
  if (!call->answered)
    answer_error(call, TG_CONNECT_DEADLINE_EXCEEDED, "the client's Connect-Timeout-Ms passed");
  call->timer_state = TIMER_CLOSING;
  uv_close((uv_handle_t *)t, on_timer_closed);
}

/* The handler is done with the call: free it now, or once the timer closes. */
static void call_release(tg_connect_call_t *call) {
  if (call->timer_state == TIMER_ACTIVE) {
    uv_timer_stop(&call->timer);
    call->timer_state = TIMER_CLOSING;
    uv_close((uv_handle_t *)&call->timer, on_timer_closed);
  } else if (call->timer_state == TIMER_NONE) {
    call_free(call);
  }
}

static void finish(tg_connect_call_t *call) {
  call->finished = 1;
  if (!call->in_dispatch)
    call_release(call);
}

void tg_connect_reply(tg_connect_call_t *call, const ProtobufCMessage *response) {
  if (call->finished)
    return;
  if (!call->answered)
    answer_message(call, response);
  finish(call);
}

void tg_connect_fail(tg_connect_call_t *call, tg_connect_code_t code, const char *fmt, ...) {
  if (call->finished)
    return;
  if (!call->answered) {
    char msg[MESSAGE_MAX] = "";
    if (fmt) {
      va_list ap;
      va_start(ap, fmt);
      vsnprintf(msg, sizeof msg, fmt, ap);
      va_end(ap);
    }
    /* ok is not an error: a handler that fails with it meant unknown. */
    answer_error(call, code == TG_CONNECT_OK ? TG_CONNECT_UNKNOWN : code, msg);
  }
  finish(call);
}

void tg_connect_fail_detail(tg_connect_call_t *call, tg_connect_code_t code, const ProtobufCMessage *detail,
                           const char *msg) {
  if (call->finished)
    return;
  if (!call->answered)
    answer_error_detail(call, code == TG_CONNECT_OK ? TG_CONNECT_UNKNOWN : code, msg, detail);
  finish(call);
}

tg_http_req_t *tg_connect_call_http(tg_connect_call_t *call) { return call->req; }

tg_span_t *tg_connect_call_span(const tg_connect_call_t *call) { return call->span; }

int tg_connect_call_expired(const tg_connect_call_t *call) { return call->expired; }

uint32_t tg_connect_call_remaining_ms(const tg_connect_call_t *call) {
  if (call->deadline_ns == 0)
    return UINT32_MAX;
  uint64_t now = uv_hrtime();
  if (call->expired || now >= call->deadline_ns)
    return 0;
  uint64_t ms = (call->deadline_ns - now) / 1000000;
  return ms >= UINT32_MAX ? UINT32_MAX - 1 : (uint32_t)ms;
}

void tg_connect_call_set_tenant(tg_connect_call_t *call, const char *tenant_id) {
  size_t n = tenant_id ? strnlen(tenant_id, sizeof call->tenant - 1) : 0;
  if (n)
    memcpy(call->tenant, tenant_id, n);
  call->tenant[n] = '\0';
  if (call->req) /* the access log's (net/server.h) */
    snprintf(call->req->note.tenant, sizeof call->req->note.tenant, "%s", call->tenant);
}

/* Request parsing helpers. */

static int is_ows(char c) { return c == ' ' || c == '\t'; }

static void trim(const char **s, size_t *len) {
  while (*len && is_ows(**s)) {
    (*s)++;
    (*len)--;
  }
  while (*len && is_ows((*s)[*len - 1]))
    (*len)--;
}

static int span_eq(const char *s, size_t len, const char *lit) {
  return strlen(lit) == len && strncasecmp(s, lit, len) == 0;
}

/* application/proto, or application/json with at most charset=utf-8 (the
 * media types connect-go accepts). -1 for anything else. */
static int parse_content_type(const char *v) {
  if (v == NULL)
    return -1;
  const char *semi = strchr(v, ';');
  const char *type = v;
  size_t tlen = semi ? (size_t)(semi - v) : strlen(v);
  trim(&type, &tlen);
  int codec;
  if (span_eq(type, tlen, "application/proto"))
    codec = CODEC_PROTO;
  else if (span_eq(type, tlen, "application/json"))
    codec = CODEC_JSON;
  else
    return -1;
  while (semi) {
    const char *p = semi + 1;
    semi = strchr(p, ';');
    size_t plen = semi ? (size_t)(semi - p) : strlen(p);
    trim(&p, &plen);
    if (plen == 0)
      continue;
    const char *eq = memchr(p, '=', plen);
    if (codec != CODEC_JSON || eq == NULL)
      return -1;
    const char *name = p, *val = eq + 1;
    size_t nlen = (size_t)(eq - p), vlen = plen - nlen - 1;
    trim(&name, &nlen);
    trim(&val, &vlen);
    if (vlen >= 2 && val[0] == '"' && val[vlen - 1] == '"') {
      val++;
      vlen -= 2;
    }
    if (!span_eq(name, nlen, "charset") || !span_eq(val, vlen, "utf-8"))
      return -1;
  }
  return codec;
}

/* Accept-Encoding: an ordered list; gzip (or *) counts unless its q is 0. */
static int accepts_gzip(const char *v) {
  while (v && *v) {
    const char *comma = strchr(v, ',');
    size_t len = comma ? (size_t)(comma - v) : strlen(v);
    const char *tok = v;
    const char *semi = memchr(tok, ';', len);
    size_t tlen = semi ? (size_t)(semi - tok) : len;
    trim(&tok, &tlen);
    if (span_eq(tok, tlen, "gzip") || span_eq(tok, tlen, "*")) {
      int zero = 0;
      if (semi) {
        const char *q = semi + 1;
        size_t qlen = len - (size_t)(q - v);
        trim(&q, &qlen);
        if (qlen >= 2 && (q[0] == 'q' || q[0] == 'Q') && q[1] == '=') {
          zero = 1;
          for (size_t i = 2; i < qlen; i++)
            if (q[i] != '0' && q[i] != '.')
              zero = 0;
        }
      }
      if (!zero)
        return 1;
    }
    v = comma ? comma + 1 : NULL;
  }
  return 0;
}

/* A query parameter's raw (still percent-encoded) value; first one wins,
 * as Go's url.Values.Get. */
static int query_get(const char *q, size_t qlen, const char *key, const char **val, size_t *vlen) {
  size_t klen = strlen(key);
  const char *end = q + qlen;
  while (q && q < end) {
    const char *amp = memchr(q, '&', (size_t)(end - q));
    const char *pe = amp ? amp : end;
    const char *eq = memchr(q, '=', (size_t)(pe - q));
    const char *ke = eq ? eq : pe;
    if ((size_t)(ke - q) == klen && memcmp(q, key, klen) == 0) {
      *val = eq ? eq + 1 : pe;
      *vlen = (size_t)(pe - *val);
      return 1;
    }
    q = amp ? amp + 1 : NULL;
  }
  return 0;
}

/* Form decoding of a query value ('+' is a space); out needs len bytes.
 * -1 on a bad escape. */
static long percent_decode(const char *in, size_t len, char *out) {
  size_t o = 0;
  for (size_t i = 0; i < len; i++) {
    if (in[i] == '%') {
      if (i + 2 >= len)
        return -1;
      int hi = tg_hex_value(in[i + 1]), lo = tg_hex_value(in[i + 2]);
      if (hi < 0 || lo < 0)
        return -1;
      out[o++] = (char)(hi << 4 | lo);
      i += 2;
    } else {
      out[o++] = in[i] == '+' ? ' ' : in[i];
    }
  }
  return (long)o;
}

/* Small decoded query values (encoding, base64, ...) compared as text. */
static int query_text(const char *q, size_t qlen, const char *key, char *out, size_t outlen,
                      int *present) {
  const char *v;
  size_t vlen;
  *present = query_get(q, qlen, key, &v, &vlen);
  out[0] = '\0';
  if (!*present)
    return 0;
  if (vlen >= outlen) { /* too long to be any value we know: keep a prefix */
    memcpy(out, v, outlen - 1);
    out[outlen - 1] = '\0';
    return 0;
  }
  long n = percent_decode(v, vlen, out);
  if (n < 0)
    return -1;
  out[n] = '\0';
  return 0;
}

/* Base64 of a GET message: URL-safe per the spec, standard alphabet also
 * taken (as connect-es), padding optional. Decodes in place. -1 if invalid. */
static long base64_decode_lenient(char *s, size_t len, char *why, size_t whylen) {
  while (len && s[len - 1] == '=')
    len--;
  if (len % 4 == 1) {
    snprintf(why, whylen, "illegal base64 data: bad length");
    return -1;
  }
  for (size_t i = 0; i < len; i++) {
    char c = s[i];
    if (c == '-')
      s[i] = '+';
    else if (c == '_')
      s[i] = '/';
    else if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
               c == '+' || c == '/')) {
      snprintf(why, whylen, "illegal base64 data at input byte %zu", i);
      return -1;
    }
  }
  /* mbedTLS wants padded input: pad into a scratch tail (at most 2 bytes). */
  size_t padded = (len + 3) / 4 * 4;
  char *tmp = malloc(padded + 1);
  if (tmp == NULL) {
    snprintf(why, whylen, "out of memory");
    return -1;
  }
  memcpy(tmp, s, len);
  memset(tmp + len, '=', padded - len);
  size_t olen = 0;
  int rc =
      mbedtls_base64_decode((unsigned char *)s, len, &olen, (const unsigned char *)tmp, padded);
  free(tmp);
  if (rc != 0) {
    snprintf(why, whylen, "illegal base64 data");
    return -1;
  }
  return (long)olen;
}

/* A path shaped like a procedure, /pkg.Service/Method: not ours to pass on
 * even when nothing is registered under it. */
static int looks_like_procedure(const char *p, size_t len) {
  if (len < 4 || p[0] != '/')
    return 0;
  const char *slash = memchr(p + 1, '/', len - 1);
  if (slash == NULL)
    return 0;
  size_t slen = (size_t)(slash - p - 1), mlen = len - slen - 2;
  if (slen == 0 || mlen == 0 || p[1] == '.' || slash[-1] == '.')
    return 0;
  int dot = 0;
  for (size_t i = 1; i <= slen; i++) {
    char c = p[i];
    if (c == '.')
      dot = 1;
    else if (!(c == '_' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
               (c >= '0' && c <= '9')))
      return 0;
  }
  for (size_t i = 0; i < mlen; i++) {
    char c = slash[1 + i];
    if (!(c == '_' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')))
      return 0;
  }
  return dot;
}

/* protobuf-c checks neither UTF-8 nor embedded NULs in string fields; proto3
 * (and connect-go) refuse invalid UTF-8, and a NUL would silently cut a C
 * string (two idempotency keys differing after it would collide). So walk
 * the wire bytes once and check every string field, nested ones included.
 * The data already unpacked, so it is well-formed; the walk stays bounded. */
static int read_varint(const uint8_t **p, const uint8_t *end, uint64_t *v) {
  uint64_t r = 0;
  for (int shift = 0; shift < 64 && *p < end; shift += 7) {
    uint8_t b = *(*p)++;
    r |= (uint64_t)(b & 0x7f) << shift;
    if (!(b & 0x80)) {
      *v = r;
      return 0;
    }
  }
  return -1;
}

static const ProtobufCFieldDescriptor *bad_string_field(const ProtobufCMessageDescriptor *d,
                                                        const uint8_t *p, size_t len, int depth) {
  const uint8_t *end = p + len;
  if (depth > 64)
    return NULL; /* protobuf-c refuses deeper nesting itself */
  while (p < end) {
    uint64_t key, n;
    if (read_varint(&p, end, &key) != 0)
      return NULL;
    switch (key & 7) {
    case 0:
      if (read_varint(&p, end, &n) != 0)
        return NULL;
      break;
    case 1:
      p += 8;
      break;
    case 5:
      p += 4;
      break;
    case 2: {
      if (read_varint(&p, end, &n) != 0 || n > (uint64_t)(end - p))
        return NULL;
      const ProtobufCFieldDescriptor *f =
          protobuf_c_message_descriptor_get_field(d, (unsigned)(key >> 3));
      if (f && f->type == PROTOBUF_C_TYPE_STRING &&
          (memchr(p, '\0', n) != NULL || !tg_utf8_valid((const char *)p, n)))
        return f;
      if (f && f->type == PROTOBUF_C_TYPE_MESSAGE) {
        const ProtobufCFieldDescriptor *bad = bad_string_field(f->descriptor, p, n, depth + 1);
        if (bad)
          return bad;
      }
      p += n;
      break;
    }
    default:
      return NULL;
    }
  }
  return NULL;
}

static const char *header_value(const tg_http_req_t *req, const char *name) {
  const tg_http_header_t *h = tg_http_req_header(req, name);
  return h ? h->value : NULL;
}

/* Runs the handler; frees the call when it finished synchronously, else
 * arms the deadline timer. */
static void dispatch(tg_connect_call_t *call) {
  call->in_dispatch = 1;
  call->route->m.fn(call, call->request, call->route->m.ud);
  call->in_dispatch = 0;
  if (call->finished) {
    call_free(call);
    return;
  }
  if (call->deadline_ns) {
    tg_http_req_t *req = call->req;
    uint64_t now = uv_hrtime();
    uint64_t ms = now >= call->deadline_ns ? 0 : (call->deadline_ns - now + 999999) / 1000000;
    uv_timer_init(req->worker->loop, &call->timer);
    call->timer.data = call;
    uv_timer_start(&call->timer, on_deadline, ms, 0);
    /* A deadline alone must not hold a stopping worker's loop open for days;
     * whatever the handler waits on keeps it alive if needed. */
    uv_unref((uv_handle_t *)&call->timer);
    call->timer_state = TIMER_ACTIVE;
  }
}

/* Everything between routing and the handler, in connect-go's order:
 * compression, protocol version, GET parameters, timeout, then the body.
 * Returns 1 when the handler took the call, 0 when it was answered here. */
static int serve(const tg_connect_router_t *r, tg_connect_call_t *call) {
  tg_http_req_t *req = call->req;
  const char *q = req->query ? req->query : "";
  size_t qlen = req->query ? req->query_len : 0;
  char why[256] = "";
  int present;

  char compression[32];
  const char *encoding;
  if (call->is_get) {
    if (query_text(q, qlen, "compression", compression, sizeof compression, &present) < 0)
      goto bad_query;
    encoding = compression;
  } else {
    encoding = header_value(req, "Content-Encoding");
  }
  int gzip_request = 0;
  if (encoding && *encoding && strcasecmp(encoding, "identity") != 0) {
    if (strcasecmp(encoding, "gzip") != 0) {
      answer_errorf(call, TG_CONNECT_UNIMPLEMENTED,
                    "unknown compression \"%.64s\": supported encodings are gzip, identity",
                    encoding);
      return 0;
    }
    gzip_request = 1;
  }
  const char *accept = header_value(req, "Accept-Encoding");
  /* Without Accept-Encoding the client is assumed to take what it sent. */
  call->gzip_response = accept ? accepts_gzip(accept) : gzip_request;

  if (call->is_get) {
    char version[16];
    if (query_text(q, qlen, "connect", version, sizeof version, &present) < 0)
      goto bad_query;
    if (present && strcmp(version, "v1") != 0) {
      answer_errorf(call, TG_CONNECT_INVALID_ARGUMENT, "connect must be \"v1\": got \"%s\"",
                    version);
      return 0;
    }
  } else {
    const char *version = header_value(req, "Connect-Protocol-Version");
    if (version && strcmp(version, "1") != 0) {
      answer_errorf(call, TG_CONNECT_INVALID_ARGUMENT,
                    "Connect-Protocol-Version must be \"1\": got \"%.32s\"", version);
      return 0;
    }
  }

  const char *msg_raw = NULL;
  size_t msg_raw_len = 0;
  if (call->is_get && !query_get(q, qlen, "message", &msg_raw, &msg_raw_len)) {
    answer_error(call, TG_CONNECT_INVALID_ARGUMENT, "missing message parameter");
    return 0;
  }

  const char *timeout = header_value(req, "Connect-Timeout-Ms");
  if (timeout && *timeout) { /* empty means none, as connect-go */
    size_t tlen = strlen(timeout);
    uint64_t ms = 0;
    int ok = tlen >= 1 && tlen <= 10;
    for (size_t i = 0; ok && i < tlen; i++) {
      if (timeout[i] < '0' || timeout[i] > '9')
        ok = 0;
      else
        ms = ms * 10 + (uint64_t)(timeout[i] - '0');
    }
    if (!ok) {
      answer_errorf(call, TG_CONNECT_INVALID_ARGUMENT,
                    "parse timeout: \"%.16s\" is not 1 to 10 digits", timeout);
      return 0;
    }
    call->deadline_ns = call->start_ns + ms * 1000000;
    if (ms == 0 || uv_hrtime() >= call->deadline_ns) {
      call->expired = 1;
      answer_error(call, TG_CONNECT_DEADLINE_EXCEEDED, "the client's Connect-Timeout-Ms passed");
      return 0;
    }
  }

  const char *data;
  size_t len;
  if (call->is_get) {
    char *buf = tg_connect_call_alloc(call, msg_raw_len + 1);
    if (buf == NULL)
      goto nomem;
    long n = percent_decode(msg_raw, msg_raw_len, buf);
    if (n < 0)
      goto bad_query;
    char b64[8];
    if (query_text(q, qlen, "base64", b64, sizeof b64, &present) < 0)
      goto bad_query;
    if (strcmp(b64, "1") == 0) {
      n = base64_decode_lenient(buf, (size_t)n, why, sizeof why);
      if (n < 0) {
        answer_errorf(call, TG_CONNECT_INVALID_ARGUMENT, "decode message: %s", why);
        return 0;
      }
    }
    data = buf;
    len = (size_t)n;
  } else {
    data = req->body ? req->body : "";
    len = req->body_len;
  }
  if (len > r->max_message) {
    answer_errorf(call, TG_CONNECT_RESOURCE_EXHAUSTED,
                  "message size %zu is larger than configured max %zu", len, r->max_message);
    return 0;
  }

  unsigned char *inflated = NULL;
  /* Zero-length content is never decompressed (the spec says so). */
  if (gzip_request && len > 0) {
    size_t ilen = 0;
    switch (gzip_inflate(data, len, r->max_message, &inflated, &ilen, why, sizeof why)) {
    case INFLATE_OK:
      break;
    case INFLATE_BAD:
      answer_errorf(call, TG_CONNECT_INVALID_ARGUMENT, "decompress: %s", why);
      return 0;
    case INFLATE_TOO_BIG:
      answer_errorf(call, TG_CONNECT_RESOURCE_EXHAUSTED,
                    "decompressed message is larger than configured max %zu", r->max_message);
      return 0;
    case INFLATE_NOMEM:
      goto nomem;
    }
    data = (const char *)inflated;
    len = ilen;
  }

  const ProtobufCMessageDescriptor *in = call->route->m.input;
  if (call->codec == CODEC_PROTO) {
    call->request = protobuf_c_message_unpack(in, &call->allocator, len, (const uint8_t *)data);
    call->request_in_arena = 1;
    const ProtobufCFieldDescriptor *bad;
    if (call->request == NULL) {
      snprintf(why, sizeof why, "cannot parse invalid wire-format data");
    } else if ((bad = bad_string_field(in, (const uint8_t *)data, len, 0)) != NULL) {
      snprintf(why, sizeof why, "string field %s contains invalid UTF-8 or a NUL", bad->name);
      call->request = NULL; /* arena memory: freed with the call */
    }
  } else if (len == 0) {
    /* As connect-go's JSON codec: an empty body is not a JSON object. */
    snprintf(why, sizeof why, "zero-length payload is not a valid JSON object");
  } else {
    call->request = tg_pbjson_decode_ex(in, data, len, TG_PBJSON_IGNORE_UNKNOWN, why, sizeof why);
    call->request_in_arena = 0;
  }
  free(inflated);
  if (call->request == NULL) {
    answer_errorf(call, TG_CONNECT_INVALID_ARGUMENT, "unmarshal into %s: %s", in->name, why);
    return 0;
  }
  dispatch(call);
  return 1;

bad_query:
  answer_error(call, TG_CONNECT_INVALID_ARGUMENT, "invalid URL escape in query");
  return 0;
nomem:
  answer_error(call, TG_CONNECT_RESOURCE_EXHAUSTED, "out of memory reading the request");
  return 0;
}

/* An HTTP-level rejection (405, 415) of a registered method, counted under
 * the code a Connect client infers from the status ("unknown" for both). */
static void reject(tg_http_req_t *req, const route_t *route, int status, const char *name,
                   const char *value) {
  tg_http_header_t h = {name, strlen(name), value, strlen(value)};
  uint64_t start = req->start_ns ? req->start_ns : uv_hrtime();
  tg_http_respond(req, status, &h, 1, NULL, 0);
  if (metric_total) {
    const char *total[] = {route->name, "unknown", ""};
    tg_counter_add(metric_total, total, 1);
    const char *dur[] = {route->name, ""};
    tg_histogram_observe(metric_duration, dur, (double)(uv_hrtime() - start) / 1e9);
  }
}

int tg_connect_handle(const tg_connect_router_t *r, tg_http_req_t *req) {
  const route_t *route = route_find(r, req->path, req->path_len);
  if (route == NULL) {
    if (!looks_like_procedure(req->path, req->path_len))
      return 0;
    /* connect-go (net/http's mux) and connect-node's adapter both answer an
     * unknown procedure with a bare 404, not a Connect error; clients map 404
     * to unimplemented. Not counted: the label would be attacker-chosen. */
    static const char body[] = "404 page not found\n";
    tg_http_respond_simple(req, 404, "text/plain; charset=utf-8", body, sizeof body - 1);
    return 1;
  }
  req->note.route = route->name; /* the access log's (net/server.h); the router outlives requests */

  int is_get = req->method == HTTP_GET;
  if (req->method != HTTP_POST && !(is_get && route->m.no_side_effects)) {
    reject(req, route, 405, "Allow", route->m.no_side_effects ? "GET, POST" : "POST");
    return 1;
  }

  int codec;
  if (is_get) {
    /* GET names its codec in the query; unknown or missing is 415 too. */
    char enc[16];
    int present;
    codec = -1;
    if (query_text(req->query ? req->query : "", req->query ? req->query_len : 0, "encoding", enc,
                   sizeof enc, &present) == 0 &&
        present)
      codec = strcmp(enc, "proto") == 0 ? CODEC_PROTO : strcmp(enc, "json") == 0 ? CODEC_JSON : -1;
  } else {
    codec = parse_content_type(header_value(req, "Content-Type"));
  }
  if (codec < 0) {
    reject(req, route, 415, "Accept-Post", ACCEPT_POST);
    return 1;
  }

  tg_connect_call_t *call = call_new(req, route);
  if (call == NULL) {
    static const char body[] = "{\"code\":\"resource_exhausted\",\"message\":\"out of memory\"}";
    tg_http_respond_simple(req, 429, "application/json", body, sizeof body - 1);
    return 1;
  }
  call->is_get = is_get;
  call->codec = (codec_t)codec;
  if (tg_trace_global()) {
    const tg_http_header_t *tp = tg_http_req_header(req, "traceparent");
    call->span = tg_span_start_server(route->m.name, tp ? tp->value : NULL, tp ? tp->value_len : 0);
    tg_span_set_str(call->span, "rpc.method", route->m.name);
  }
  if (!serve(r, call))
    call_free(call); /* answered before the handler ran */
  return 1;
}
