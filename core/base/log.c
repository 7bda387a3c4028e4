#include "base/log.h"
#include "base/hex.h"

#include <errno.h>
#include <mbedtls/sha256.h>
#include <mbedtls/version.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "base/buf.h"
#include "base/utf8.h"

static _Atomic int log_level = TG_LOG_INFO;
static _Atomic int log_fd = STDOUT_FILENO;
/* Held across a line's write loop, so that a partial write's remainder is not
 * overtaken by another thread's line. */
static pthread_mutex_t write_lock = PTHREAD_MUTEX_INITIALIZER;

static const char *const level_names[] = {"debug", "info", "warn", "error"};

/* Lines up to this size are built on the stack. */
#define LINE_STACK 2048

void tg_log_set_level(tg_log_level_t level) {
  if ((unsigned)level <= TG_LOG_ERROR)
    atomic_store_explicit(&log_level, (int)level, memory_order_relaxed);
}

tg_log_level_t tg_log_get_level(void) {
  return (tg_log_level_t)atomic_load_explicit(&log_level, memory_order_relaxed);
}

int tg_log_level_parse(const char *name) {
  if (name == NULL)
    return -1;
  for (int i = TG_LOG_DEBUG; i <= TG_LOG_ERROR; i++)
    if (strcasecmp(name, level_names[i]) == 0)
      return i;
  return -1;
}

void tg_log_set_fd(int fd) {
  atomic_store_explicit(&log_fd, fd < 0 ? STDOUT_FILENO : fd, memory_order_relaxed);
}

/* A log line under construction: on the stack, moved to the heap when it
 * outgrows LINE_STACK. After a failed allocation the line is dropped. */
typedef struct {
  char *data;
  size_t len, cap;
  bool heap, failed;
  char stack[LINE_STACK];
} line_t;

static void put(line_t *l, const char *s, size_t n) {
  if (l->failed)
    return;
  if (n > l->cap - l->len) {
    size_t cap = l->cap * 2;
    while (cap - l->len < n)
      cap *= 2;
    char *p = l->heap ? realloc(l->data, cap) : malloc(cap);
    if (p == NULL) {
      l->failed = true;
      return;
    }
    if (!l->heap)
      memcpy(p, l->data, l->len);
    l->data = p;
    l->cap = cap;
    l->heap = true;
  }
  memcpy(l->data + l->len, s, n);
  l->len += n;
}

static void puts_(line_t *l, const char *s) { put(l, s, strlen(s)); }

/* A JSON string literal for s: RFC 8259 escapes, and each ill-formed UTF-8
 * subpart replaced by U+FFFD, so the line always parses. One pass over s;
 * jansson's encoder is several times slower and would need s to be valid
 * UTF-8 first. */
static void put_string(line_t *l, const char *s) {
  static const char hexdigits[] = "0123456789abcdef";
  size_t len = strlen(s), run = 0, i = 0;
  put(l, "\"", 1);
  while (i < len) {
    unsigned char c = (unsigned char)s[i];
    if (c >= 0x20 && c != '"' && c != '\\' && c < 0x80) {
      i++;
      continue;
    }
    if (c >= 0x80) {
      uint32_t cp;
      size_t n = tg_utf8_decode(s + i, len - i, &cp);
      if (cp != TG_UTF8_INVALID) {
        i += n;
        continue;
      }
      put(l, s + run, i - run);
      put(l, "\xEF\xBF\xBD", 3);
      i += n;
      run = i;
      continue;
    }
    put(l, s + run, i - run);
    char esc[7] = {'\\', 0};
    size_t n = 2;
    switch (c) {
    case '"':
    case '\\':
      esc[1] = (char)c;
      break;
    case '\n':
      esc[1] = 'n';
      break;
    case '\r':
      esc[1] = 'r';
      break;
    case '\t':
      esc[1] = 't';
      break;
    case '\b':
      esc[1] = 'b';
      break;
    case '\f':
      esc[1] = 'f';
      break;
    default:
      memcpy(esc + 1, "u00", 3);
      esc[4] = hexdigits[c >> 4];
      esc[5] = hexdigits[c & 0xf];
      n = 6;
    }
    put(l, esc, n);
    i++;
    run = i;
  }
  put(l, s + run, i - run);
  put(l, "\"", 1);
}

/* Field keys already written, as offsets into the line, to drop duplicates:
 * a JSON object's names should be unique (RFC 8259). */
#define MAX_TRACKED_KEYS 64

typedef struct {
  size_t off[MAX_TRACKED_KEYS], len[MAX_TRACKED_KEYS];
  size_t n;
} keys_t;

static void put_field(line_t *l, keys_t *k, const char *key, const char *value) {
  static const char *const reserved[] = {"ts", "level", "msg", "request_id"};
  size_t mark = l->len;
  put(l, ",", 1);
  size_t key_at = l->len;
  bool is_reserved = false;
  for (size_t i = 0; i < sizeof reserved / sizeof reserved[0]; i++)
    is_reserved |= strcmp(key, reserved[i]) == 0;
  if (is_reserved) {
    /* Cannot hide the line's own field. */
    tg_buf_t b = {0};
    if (tg_buf_puts(&b, "fields.") != 0 || tg_buf_puts(&b, key) != 0) {
      l->failed = true;
      tg_buf_free(&b);
      return;
    }
    put_string(l, b.data);
    tg_buf_free(&b);
  } else {
    put_string(l, key);
  }
  if (l->failed)
    return;
  size_t key_len = l->len - key_at;
  for (size_t i = 0; i < k->n; i++) {
    if (k->len[i] == key_len && memcmp(l->data + k->off[i], l->data + key_at, key_len) == 0) {
      l->len = mark; /* the first value given for a key wins */
      return;
    }
  }
  if (k->n < MAX_TRACKED_KEYS) {
    k->off[k->n] = key_at;
    k->len[k->n++] = key_len;
  }
  put(l, ":", 1);
  if (value)
    put_string(l, value);
  else
    puts_(l, "null");
}

static void timestamp(char *out, size_t cap) {
  struct timespec now;
  struct tm tm;
  clock_gettime(CLOCK_REALTIME, &now);
  gmtime_r(&now.tv_sec, &tm);
  size_t n = strftime(out, cap, "%Y-%m-%dT%H:%M:%S", &tm);
  snprintf(out + n, cap - n, ".%03dZ", (int)(now.tv_nsec / 1000000));
}

/* Under write_lock: the last line was cut off part way, so the next one starts
 * with a newline to end the fragment instead of continuing it. */
static bool torn;

/* Returns how much of p went out. */
static size_t write_all(int fd, const char *p, size_t n) {
  size_t done = 0;
  while (done < n) {
    ssize_t w = write(fd, p + done, n - done);
    if (w > 0) {
      done += (size_t)w;
      continue;
    }
    if (w < 0 && errno == EINTR)
      continue;
    if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      /* A non-blocking stdout (e.g. shared with libuv): wait a while for room,
       * but never stall the caller's thread for good. */
      struct pollfd pfd = {.fd = fd, .events = POLLOUT};
      if (poll(&pfd, 1, 1000) > 0)
        continue;
    }
    break;
  }
  return done;
}

static void write_line(const char *p, size_t n) {
  int fd = atomic_load_explicit(&log_fd, memory_order_relaxed);
  pthread_mutex_lock(&write_lock);
  if (torn)
    torn = write_all(fd, "\n", 1) != 1;
  if (!torn) {
    size_t done = write_all(fd, p, n);
    torn = done > 0 && done < n;
  }
  pthread_mutex_unlock(&write_lock);
}

static void vlog(tg_log_level_t level, const char *request_id, const char *msg, va_list ap) {
  if ((unsigned)level > TG_LOG_ERROR ||
      (int)level < atomic_load_explicit(&log_level, memory_order_relaxed))
    return;
  int saved_errno = errno;
  line_t l = {.cap = LINE_STACK};
  l.data = l.stack;
  keys_t keys = {.n = 0};
  char ts[40];
  timestamp(ts, sizeof ts);
  puts_(&l, "{\"ts\":\"");
  puts_(&l, ts);
  puts_(&l, "\",\"level\":\"");
  puts_(&l, level_names[level]);
  puts_(&l, "\",\"msg\":");
  put_string(&l, msg ? msg : "");
  if (request_id) {
    puts_(&l, ",\"request_id\":");
    put_string(&l, request_id);
  }
  for (const char *key; (key = va_arg(ap, const char *)) != NULL;)
    put_field(&l, &keys, key, va_arg(ap, const char *));
  put(&l, "}\n", 2);
  if (!l.failed)
    write_line(l.data, l.len);
  if (l.heap)
    free(l.data);
  errno = saved_errno;
}

void tg_log(tg_log_level_t level, const char *msg, ...) {
  va_list ap;
  va_start(ap, msg);
  vlog(level, NULL, msg, ap);
  va_end(ap);
}

void tg_log_req(tg_log_level_t level, const char *request_id, const char *msg, ...) {
  va_list ap;
  va_start(ap, msg);
  vlog(level, request_id, msg, ap);
  va_end(ap);
}

void tg_redact_ref(const char *ref, char *out, size_t outlen) {
  if (out == NULL || outlen == 0)
    return;
  const char *tail = "";
  if (ref) {
    /* Walk back over 4 code points (skipping continuation bytes); a ref of
     * 4 or fewer shows nothing. */
    size_t i = strlen(ref), chars = 0;
    while (i > 0 && chars < 4) {
      i--;
      if (((unsigned char)ref[i] & 0xC0) != 0x80)
        chars++;
    }
    if (i > 0)
      tail = ref + i;
  }
  snprintf(out, outlen, "****%s", tail);
}

const char *tg_redact_secret(const char *secret) {
  (void)secret;
  return "[redacted]";
}

void tg_redact_url(const char *url, char *out, size_t outlen) {
  if (out == NULL || outlen == 0)
    return;
  if (url == NULL)
    url = "";
  unsigned char digest[32];
#if MBEDTLS_VERSION_NUMBER >= 0x03000000
  mbedtls_sha256((const unsigned char *)url, strlen(url), digest, 0);
#else
  mbedtls_sha256_ret((const unsigned char *)url, strlen(url), digest, 0);
#endif
  char hex[17];
  tg_hex_encode(digest, 8, hex);
  snprintf(out, outlen, "sha256:%s", hex);
}
