#include "gateway/walcli.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <limits.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "base/buf.h"
#include "base/crc32c.h"
#include "base/file.h"
#include "base/hex.h"
#include "base/utf8.h"
#include "config/config.h"
#include "ledger/v1/ledger.pb-c.h"
#include "ledger/wal.h"
#include "ramp/v1/exchange.pb-c.h"

#define SEG_NAME_LEN 24 /* <first sequence, 20 digits>.wal */
#define MAX_REPORTED 10 /* undecodable records named one by one, then counted */
/* What a segment that vanished while read means. */
#define RETAINED " (a running gateway's retention may have removed it while it was read: run again)"
#define REDACT_KEEP 4 /* characters of a billing reference left visible */

static void usage(FILE *f) {
  fprintf(f, "usage: tollgate wal ls -c CONFIG\n"
             "         one line per log segment: first sequence, records, bytes, first and last record time\n"
             "       tollgate wal verify -c CONFIG\n"
             "         check every CRC, the sequence continuity and that every record decodes\n"
             "       tollgate wal cat -c CONFIG [--tenant T] [--tx ID] [--since TIME] [--until TIME]\n"
             "         the records as JSON lines, in log order, billing references redacted;\n"
             "         --tenant: transactions with an item of T; --tx: a transaction and its ledger\n"
             "         changes and usage reports; --since (inclusive), --until (exclusive): TIME is\n"
             "         2026-12-06T10:00:00Z (UTC, fraction allowed), 2026-12-06 or unix seconds\n"
             "The log is data_dir/wal of CONFIG. It is only read, never modified: safe while the\n"
             "gateway runs. With log shipping (ledger.ship) or a data_dir/ship.ckpt, ls and verify\n"
             "end with \"shipped through seq N, M records pending\" and cat marks each record \"shipped\".\n"
             "Exit 0: fine; 1: damage or an error; 2: bad usage.\n");
}

static int bad_usage(FILE *err, const char *why, const char *arg) {
  if (why != NULL)
    fprintf(err, "tollgate wal: %s%s%s\n", why, arg ? ": " : "", arg ? arg : "");
  usage(err);
  return 2;
}

/* ---- times */

/* ms since the epoch as 2026-12-06T10:00:00.123Z. */
static void fmt_time(int64_t ms, char *out, size_t outlen) {
  int64_t s = ms / 1000, frac = ms % 1000;
  if (frac < 0) {
    frac += 1000;
    s--;
  }
  time_t t = (time_t)s;
  struct tm tm;
  if (gmtime_r(&t, &tm) == NULL || tm.tm_year < -1900 || tm.tm_year > 9999 - 1900) {
    snprintf(out, outlen, "%" PRId64 "ms", ms); /* no four-digit year: say what it is */
    return;
  }
  snprintf(out, outlen, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
           tm.tm_hour, tm.tm_min, tm.tm_sec, (int)frac);
}

/* Exactly n digits at *p. */
static bool digits(const char **p, int n, int *out) {
  int v = 0;
  for (int i = 0; i < n; i++) {
    if ((*p)[i] < '0' || (*p)[i] > '9')
      return false;
    v = v * 10 + ((*p)[i] - '0');
  }
  *p += n;
  *out = v;
  return true;
}

/* Unix seconds, or ISO-8601 UTC: YYYY-MM-DD, or YYYY-MM-DDTHH:MM:SS[.fff]Z. */
static bool parse_time(const char *s, int64_t *ms) {
  size_t nd = strspn(s, "0123456789");
  if (nd > 0 && s[nd] == '\0') {
    if (nd > 12)
      return false;
    *ms = (int64_t)strtoll(s, NULL, 10) * 1000;
    return true;
  }
  const char *p = s;
  int y, mo, d, h = 0, mi = 0, se = 0, frac = 0;
  if (!digits(&p, 4, &y) || *p++ != '-' || !digits(&p, 2, &mo) || *p++ != '-' || !digits(&p, 2, &d))
    return false;
  if (*p != '\0') {
    if (*p != 'T' && *p != 't')
      return false;
    p++;
    if (!digits(&p, 2, &h) || *p++ != ':' || !digits(&p, 2, &mi) || *p++ != ':' || !digits(&p, 2, &se))
      return false;
    if (*p == '.') {
      p++;
      size_t nf = strspn(p, "0123456789");
      if (nf == 0 || nf > 9)
        return false;
      for (size_t i = 0; i < 3; i++)
        frac = frac * 10 + (i < nf ? p[i] - '0' : 0);
      p += nf;
    }
    if ((*p != 'Z' && *p != 'z') || p[1] != '\0')
      return false;
  }
  if (mo < 1 || mo > 12 || d < 1 || d > 31 || h > 23 || mi > 59 || se > 59)
    return false;
  struct tm tm = {0};
  tm.tm_year = y - 1900;
  tm.tm_mon = mo - 1;
  tm.tm_mday = d;
  tm.tm_hour = h;
  tm.tm_min = mi;
  tm.tm_sec = se;
  time_t t = timegm(&tm);
  if (t == (time_t)-1 || tm.tm_mday != d || tm.tm_mon != mo - 1) /* 2026-02-30 normalises away */
    return false;
  *ms = (int64_t)t * 1000 + frac;
  return true;
}

/* ---- segments on disk (the format of ledger/wal.h) */

typedef struct seg {
  char name[SEG_NAME_LEN + 1];
  uint64_t first_seq;
  uint64_t records; /* verified records read so far */
  uint64_t bytes;   /* header and verified records: where the next record starts */
  uint64_t size;    /* file size when last looked at */
  int64_t first_ms; /* at_unix_ms of the first and last decoded record */
  int64_t last_ms;
  bool timed; /* a record was decoded */
} seg_t;

typedef struct segs {
  seg_t *v;
  size_t n, cap;
} segs_t;

static bool is_seg_name(const char *s) {
  return strlen(s) == SEG_NAME_LEN && strcmp(s + 20, ".wal") == 0 && strspn(s, "0123456789") == 20;
}

static int seg_cmp(const void *a, const void *b) {
  uint64_t x = ((const seg_t *)a)->first_seq, y = ((const seg_t *)b)->first_seq;
  return x < y ? -1 : x > y;
}

/* Appends the segments of dir that start after the last one in s (all of
 * them when s is empty), in order, as tg_wal_scan lists them. 0 or -errno. */
static int list_segments(const char *dir, segs_t *s) {
  DIR *d = opendir(dir);
  if (d == NULL)
    return -errno;
  segs_t found = {0};
  int r = 0;
  struct dirent *de;
  while ((de = readdir(d)) != NULL) {
    if (!is_seg_name(de->d_name))
      continue;
    uint64_t first = strtoull(de->d_name, NULL, 10);
    if (s->n > 0 && first <= s->v[s->n - 1].first_seq)
      continue;
    if (found.n == found.cap) {
      size_t cap = found.cap ? found.cap * 2 : 16;
      seg_t *nv = realloc(found.v, cap * sizeof *nv);
      if (nv == NULL) {
        r = -ENOMEM;
        goto out;
      }
      found.v = nv;
      found.cap = cap;
    }
    seg_t *g = &found.v[found.n++];
    memset(g, 0, sizeof *g);
    memcpy(g->name, de->d_name, SEG_NAME_LEN + 1);
    g->first_seq = first;
    g->bytes = TG_WAL_HEADER_SIZE;
    struct stat st;
    if (fstatat(dirfd(d), g->name, &st, 0) == 0)
      g->size = (uint64_t)st.st_size;
  }
  if (found.n == 0)
    goto out;
  qsort(found.v, found.n, sizeof *found.v, seg_cmp);
  if (s->n + found.n > s->cap) {
    seg_t *nv = realloc(s->v, (s->n + found.n) * sizeof *nv);
    if (nv == NULL) {
      r = -ENOMEM;
      goto out;
    }
    s->v = nv;
    s->cap = s->n + found.n;
  }
  memcpy(s->v + s->n, found.v, found.n * sizeof *found.v);
  s->n += found.n;
out:
  free(found.v);
  closedir(d);
  return r;
}

static uint32_t get32(const uint8_t *p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* A whole, sound header for the segment named name. */
static bool header_ok(const uint8_t *d, size_t size, const char *name) {
  return size >= TG_WAL_HEADER_SIZE && memcmp(d, "TGWALSEG", 8) == 0 && get32(d + 8) == 1 &&
         get32(d + 12) == tg_crc32c(tg_crc32c(0, d, 12), d + 16, 8) &&
         ((uint64_t)get32(d + 16) | (uint64_t)get32(d + 20) << 32) == strtoull(name, NULL, 10);
}

/* A whole record with a good CRC at off (the CRC covers the length too). */
static bool frame_ok(const uint8_t *d, size_t size, size_t off) {
  if (off > size || size - off < TG_WAL_RECORD_OVERHEAD)
    return false;
  uint32_t len = get32(d + off);
  return len > 0 && len <= TG_WAL_MAX_RECORD && size - off - TG_WAL_RECORD_OVERHEAD >= len &&
         tg_crc32c(tg_crc32c(0, d + off, 4), d + off + TG_WAL_RECORD_OVERHEAD, len) == get32(d + off + 4);
}

/* After tg_wal_scan failed with -EBADMSG and msg ("DIR/SEGMENT: offset N:
 * why"): is it the end of the last segment, a record (or a segment) being
 * written or torn by a crash, which recovery would truncate, rather than
 * damage? Decided as tg_wal_open decides, on the file as it is now: a record
 * that has become whole since was being written. Without a name and offset
 * in msg it is damage. */
static bool torn_tail(const char *dir, const char *msg) {
  size_t dl = strlen(dir);
  if (strncmp(msg, dir, dl) != 0 || msg[dl] != '/')
    return false;
  char name[SEG_NAME_LEN + 1];
  snprintf(name, sizeof name, "%.*s", SEG_NAME_LEN, msg + dl + 1);
  const char *p = msg + dl + 1 + strlen(name);
  if (!is_seg_name(name) || strncmp(p, ": offset ", 9) != 0 || p[9] < '0' || p[9] > '9')
    return false;
  uint64_t off = strtoull(p + 9, NULL, 10);

  segs_t all = {0};
  if (list_segments(dir, &all) != 0 || all.n == 0) {
    free(all.v);
    return false;
  }
  bool last = strcmp(all.v[all.n - 1].name, name) == 0;
  free(all.v);
  char path[PATH_MAX];
  uint8_t *d = NULL;
  size_t size = 0;
  if (snprintf(path, sizeof path, "%s/%s", dir, name) >= (int)sizeof path || tg_file_read(path, &d, &size, NULL) != 0)
    return false;
  bool tail;
  if (off == 0) /* a header: torn only while the segment is being made, not a sequence gap */
    tail = strstr(p, "bad segment header") != NULL &&
           (header_ok(d, size, name) || (last && size < TG_WAL_HEADER_SIZE));
  else if (off < TG_WAL_HEADER_SIZE || off > size)
    tail = false;
  else if (frame_ok(d, size, (size_t)off))
    tail = true; /* whole now: it was being written */
  else if (!last)
    tail = false;
  else {
    /* A bad CRC followed by a good record is a flipped bit, not a torn write. */
    uint32_t len = size - off >= TG_WAL_RECORD_OVERHEAD ? get32(d + off) : 0;
    tail = !(len > 0 && len <= TG_WAL_MAX_RECORD && size - off - TG_WAL_RECORD_OVERHEAD >= len &&
             frame_ok(d, size, (size_t)off + TG_WAL_RECORD_OVERHEAD + len));
  }
  free(d);
  return tail;
}

/* ---- reading the log */

typedef struct walk walk_t;

/* A decoded record; return 0 to go on. */
typedef int (*record_fn)(walk_t *w, uint64_t seq, const Ledger__V1__Record *r);

struct walk {
  const char *dir;
  segs_t segs;         /* as listed, extended when the gateway rotates while we read */
  size_t cur;          /* the segment of the last record */
  record_fn on_record; /* NULL: decode only */
  void *arg;
  FILE *err;
  uint64_t undecodable; /* verified payloads that are not a ledger.v1.Record */
  uint64_t unknown;     /* records of a kind this version does not know */
  int failed;           /* what stopped the scan from here (-ENOMEM, a write error) */
};

/* The segment holding record seq of len bytes. The list was taken before the
 * scan; a gateway may have rotated since: a record that does not fit the last
 * segment known (as big as it is now) is in a new one. */
static seg_t *locate(walk_t *w, uint64_t seq, size_t len) {
  for (int tries = 0; tries < 2; tries++) {
    while (w->cur + 1 < w->segs.n && w->segs.v[w->cur + 1].first_seq <= seq)
      w->cur++;
    if (w->segs.n > 0 && w->segs.v[w->cur].first_seq <= seq) {
      seg_t *s = &w->segs.v[w->cur];
      uint64_t end = s->bytes + TG_WAL_RECORD_OVERHEAD + len;
      if (w->cur + 1 < w->segs.n || end <= s->size)
        return s;
      char path[PATH_MAX];
      struct stat st;
      if (snprintf(path, sizeof path, "%s/%s", w->dir, s->name) < (int)sizeof path && stat(path, &st) == 0)
        s->size = (uint64_t)st.st_size;
      if (end <= s->size)
        return s;
    }
    if (list_segments(w->dir, &w->segs) != 0)
      break;
  }
  return w->segs.n > 0 ? &w->segs.v[w->cur] : NULL;
}

static int on_frame(void *arg, uint64_t seq, const void *payload, size_t len) {
  walk_t *w = arg;
  seg_t *s = locate(w, seq, len);
  uint64_t off = s ? s->bytes : 0;
  if (s != NULL) {
    s->records++;
    s->bytes += TG_WAL_RECORD_OVERHEAD + len;
  }
  Ledger__V1__Record *r = ledger__v1__record__unpack(NULL, len, payload);
  if (r == NULL) {
    if (++w->undecodable <= MAX_REPORTED)
      fprintf(w->err,
              "tollgate wal: %s/%s: offset %" PRIu64 ": record %" PRIu64
              " (%zu bytes) is not a ledger.v1.Record\n",
              w->dir, s ? s->name : "?", off, seq, len);
    return 0;
  }
  if (s != NULL) {
    if (!s->timed)
      s->first_ms = r->at_unix_ms;
    s->last_ms = r->at_unix_ms;
    s->timed = true;
  }
  switch (r->kind_case) {
  case LEDGER__V1__RECORD__KIND_TRANSACTION:
  case LEDGER__V1__RECORD__KIND_LEDGER_CHANGE:
  case LEDGER__V1__RECORD__KIND_USAGE_REPORT:
  case LEDGER__V1__RECORD__KIND_SETTLEMENT:
    break;
  default:
    w->unknown++;
  }
  int rc = w->on_record ? w->on_record(w, seq, r) : 0;
  ledger__v1__record__free_unpacked(r, NULL);
  return rc;
}

/* Scans w->dir into w (segments listed first). Returns tg_wal_scan's answer. */
/* After tg_wal_scan failed with -ENOENT and msg ("DIR/SEGMENT: ..."): did
 * the segment go away while it was read (retention in a running gateway
 * removes the oldest ones)? */
static bool vanished(const char *dir, const char *msg) {
  size_t dl = strlen(dir);
  char name[SEG_NAME_LEN + 1], path[PATH_MAX];
  if (strncmp(msg, dir, dl) != 0 || msg[dl] != '/')
    return false;
  snprintf(name, sizeof name, "%.*s", SEG_NAME_LEN, msg + dl + 1);
  struct stat st;
  return is_seg_name(name) && snprintf(path, sizeof path, "%s/%s", dir, name) < (int)sizeof path &&
         stat(path, &st) != 0 && errno == ENOENT;
}

/* Scans w->dir into w (segments listed first). Returns tg_wal_scan's answer.
 * Without streamed output (ls, verify) a scan that lost a segment to
 * retention starts again. */
static int walk_log(walk_t *w, tg_wal_recovery_t *rec, char *errbuf, size_t errlen) {
  int r;
  for (int attempt = 0;; attempt++) {
    memset(rec, 0, sizeof *rec);
    w->segs.n = 0;
    w->cur = 0;
    w->undecodable = w->unknown = 0;
    if ((r = list_segments(w->dir, &w->segs)) != 0) {
      snprintf(errbuf, errlen, "%s: %s", w->dir, strerror(-r));
      return r;
    }
    r = tg_wal_scan(w->dir, on_frame, w, rec, errbuf, errlen);
    if (r != -ENOENT || w->on_record != NULL || attempt == 2 || !vanished(w->dir, errbuf))
      break;
  }
  if (w->segs.n < rec->segments) /* made (empty) after our listing */
    list_segments(w->dir, &w->segs);
  /* Listed, then removed by retention before the scan listed them. */
  size_t gone = 0;
  char path[PATH_MAX];
  struct stat st;
  while (gone < w->segs.n && w->segs.v[gone].records == 0 &&
         snprintf(path, sizeof path, "%s/%s", w->dir, w->segs.v[gone].name) < (int)sizeof path &&
         stat(path, &st) != 0 && errno == ENOENT)
    gone++;
  if (gone > 0) {
    memmove(w->segs.v, w->segs.v + gone, (w->segs.n - gone) * sizeof *w->segs.v);
    w->segs.n -= gone;
  }
  return r;
}

/* ---- JSON of a record */

/* Sets o[k] = v (stolen); a NULL v (out of memory) marks *bad. */
static void put(json_t *o, const char *k, json_t *v, bool *bad) {
  if (v == NULL || json_object_set_new(o, k, v) != 0)
    *bad = true;
}

static json_t *str(const char *s) { return tg_utf8_json_string(s); }

/* An enum by its name without the prefix, lowercase ("approved"); a value
 * this version does not know as its number. */
static json_t *enum_json(const ProtobufCEnumDescriptor *d, int value, const char *prefix) {
  const ProtobufCEnumValue *v = protobuf_c_enum_descriptor_get_value(d, value);
  if (v == NULL)
    return json_integer(value);
  const char *name = v->name;
  size_t pl = strlen(prefix);
  if (strncmp(name, prefix, pl) == 0)
    name += pl;
  char buf[128];
  size_t i = 0;
  for (; name[i] != '\0' && i + 1 < sizeof buf; i++)
    buf[i] = (char)tolower((unsigned char)name[i]);
  buf[i] = '\0';
  return json_string(buf);
}

/* "****" and the last REDACT_KEEP characters; "****" alone when there are
 * no more than that; "" stays "" (there is none to hide). */
static json_t *redacted(const char *s) {
  if (s == NULL || *s == '\0')
    return json_string("");
  tg_buf_t b = {0};
  if (tg_utf8_repair(&b, s, strlen(s)) != 0)
    return NULL;
  size_t i = b.len;
  int chars = 0;
  while (i > 0 && chars < REDACT_KEEP) {
    i--;
    if (((unsigned char)b.data[i] & 0xC0) != 0x80)
      chars++;
  }
  json_t *v = NULL;
  if (i == 0) {
    v = json_string("****");
  } else {
    char *t = malloc(4 + (b.len - i) + 1);
    if (t != NULL) {
      memcpy(t, "****", 4);
      memcpy(t + 4, b.data + i, b.len - i);
      t[4 + b.len - i] = '\0';
      v = json_string(t);
      free(t);
    }
  }
  tg_buf_free(&b);
  return v;
}

static json_t *hex_json(const ProtobufCBinaryData *bin) {
  char *h = malloc(2 * bin->len + 1);
  if (h == NULL)
    return NULL;
  tg_hex_encode(bin->data, bin->len, h);
  json_t *v = json_string(h);
  free(h);
  return v;
}

/* The answer as stored, without its retrieval URLs (bearer credentials). */
static json_t *response_json(const ProtobufCBinaryData *resp, bool *bad) {
  json_t *o = json_object();
  if (o == NULL)
    return NULL;
  put(o, "bytes", json_integer((json_int_t)resp->len), bad);
  if (resp->len == 0)
    return o;
  Ramp__V1__ExecuteTransactionResponse *r =
      ramp__v1__execute_transaction_response__unpack(NULL, resp->len, resp->data);
  if (r == NULL) {
    put(o, "decoded", json_false(), bad);
    return o;
  }
  put(o, "transaction_id", str(r->transaction_id), bad);
  put(o, "status", enum_json(&ramp__v1__transaction_status__descriptor, r->status, "TRANSACTION_STATUS_"),
      bad);
  put(o, "items", json_integer((json_int_t)r->n_items), bad);
  ramp__v1__execute_transaction_response__free_unpacked(r, NULL);
  return o;
}

static json_t *transaction_json(const Ledger__V1__Transaction *t, bool *bad) {
  json_t *o = json_object();
  if (o == NULL)
    return NULL;
  put(o, "id", str(t->id), bad);
  put(o, "outcome",
      enum_json(&ledger__v1__transaction_outcome__descriptor, t->outcome, "TRANSACTION_OUTCOME_"), bad);
  put(o, "idempotency_key", str(t->idempotency_key), bad);
  put(o, "request_hash", hex_json(&t->request_hash), bad);
  put(o, "billing_reference", redacted(t->billing_reference), bad);
  put(o, "billing_type", str(t->billing_type), bad);
  json_t *items = json_array();
  for (size_t i = 0; items != NULL && i < t->n_items; i++) {
    const Ledger__V1__TransactionItem *it = t->items[i];
    json_t *j = json_object();
    if (j == NULL || json_array_append_new(items, j) != 0) {
      *bad = true;
      break;
    }
    put(j, "tenant", str(it->tenant), bad);
    put(j, "offer_id", str(it->offer_id), bad);
    put(j, "uri", str(it->uri), bad);
    put(j, "amount", json_integer(it->amount), bad);
    put(j, "currency", str(it->currency), bad);
    put(j, "payment_type", json_integer(it->payment_type), bad);
    put(j, "estimated_tokens", json_integer(it->estimated_tokens), bad);
    put(j, "url_expires_at_unix", json_integer(it->url_expires_at_unix), bad);
  }
  put(o, "items", items, bad);
  json_t *totals = json_array();
  for (size_t i = 0; totals != NULL && i < t->n_totals; i++) {
    json_t *j = json_object();
    if (j == NULL || json_array_append_new(totals, j) != 0) {
      *bad = true;
      break;
    }
    put(j, "currency", str(t->totals[i]->currency), bad);
    put(j, "amount", json_integer(t->totals[i]->amount), bad);
  }
  put(o, "totals", totals, bad);
  put(o, "ai_system_id", str(t->ai_system_id), bad);
  put(o, "response", response_json(&t->response, bad), bad);
  put(o, "detail", str(t->detail), bad);
  put(o, "request_id", str(t->request_id), bad);
  put(o, "report_due_at_unix", json_integer(t->report_due_at_unix), bad);
  return o;
}

static json_t *ledger_change_json(const Ledger__V1__LedgerChange *c, bool *bad) {
  json_t *o = json_object();
  if (o == NULL)
    return NULL;
  put(o, "kind", enum_json(&ledger__v1__ledger_change_kind__descriptor, c->kind, "LEDGER_CHANGE_KIND_"), bad);
  put(o, "billing_reference", redacted(c->billing_reference), bad);
  put(o, "currency", str(c->currency), bad);
  put(o, "amount", json_integer(c->amount), bad);
  put(o, "transaction_id", str(c->transaction_id), bad);
  put(o, "reference", str(c->reference), bad);
  return o;
}

static json_t *usage_report_json(const Ledger__V1__UsageReport *u, bool *bad) {
  json_t *o = json_object();
  if (o == NULL)
    return NULL;
  put(o, "transaction_id", str(u->transaction_id), bad);
  if (u->offer_id[0] != '\0' || u->consumed_tokens || u->estimated_tokens) { /* the first layout's fields */
    put(o, "offer_id", str(u->offer_id), bad);
    put(o, "consumed_tokens", json_integer(u->consumed_tokens), bad);
    put(o, "estimated_tokens", json_integer(u->estimated_tokens), bad);
  }
  put(o, "ai_system_id", str(u->ai_system_id), bad);
  put(o, "billing_reference", redacted(u->billing_reference), bad);
  put(o, "tenant", str(u->tenant), bad);
  put(o, "reported_at_unix", json_integer(u->reported_at_unix), bad);
  put(o, "due_at_unix", json_integer(u->due_at_unix), bad);
  put(o, "late", json_boolean(u->late), bad);
  json_t *items = json_array();
  for (size_t i = 0; items != NULL && i < u->n_items; i++) {
    const Ledger__V1__UsageItem *it = u->items[i];
    json_t *j = json_object();
    if (j == NULL || json_array_append_new(items, j) != 0) {
      *bad = true;
      break;
    }
    put(j, "offer_id", str(it->offer_id), bad);
    put(j, "consumed_tokens", json_integer(it->consumed_tokens), bad);
    put(j, "estimated_tokens", json_integer(it->estimated_tokens), bad);
    put(j, "adjustment", json_integer(it->adjustment), bad);
  }
  put(o, "items", items, bad);
  if (u->adjustment) {
    json_t *a = json_object();
    put(a, "currency", str(u->adjustment->currency), bad);
    put(a, "amount", json_integer(u->adjustment->amount), bad);
    put(o, "adjustment", a, bad);
  }
  put(o, "adjustment_billing", str(u->adjustment_billing), bad);
  put(o, "adjustment_detail", str(u->adjustment_detail), bad);
  put(o, "request_id", str(u->request_id), bad);
  return o;
}

/* A settlement record (pay/settleq.h). The facilitator body it carries holds
 * the buyer's signed authorization: its size is shown, never its bytes. */
static json_t *settlement_json(const Ledger__V1__Settlement *s, bool *bad) {
  json_t *o = json_object();
  if (o == NULL)
    return NULL;
  put(o, "id", str(s->id), bad);
  put(o, "state", enum_json(&ledger__v1__settlement_state__descriptor, (int)s->state, "SETTLEMENT_STATE_"), bad);
  put(o, "attempts", json_integer(s->attempts), bad);
  put(o, "tenant", str(s->tenant), bad);
  put(o, "network", str(s->network), bad);
  put(o, "scheme", str(s->scheme), bad);
  put(o, "asset", str(s->asset), bad);
  put(o, "payer", str(s->payer), bad);
  put(o, "amount", str(s->amount), bad); /* atomic units, decimal: a uint256 does not fit a JSON integer */
  put(o, "nonce", hex_json(&s->nonce), bad);
  put(o, "valid_before", json_integer(s->valid_before), bad);
  put(o, "request_id", str(s->request_id), bad);
  put(o, "transaction", str(s->transaction), bad);
  put(o, "error", str(s->error), bad);
  put(o, "facilitator", str(s->facilitator), bad);
  if (s->next_attempt_unix_ms != 0) {
    char at[96];
    fmt_time(s->next_attempt_unix_ms, at, sizeof at);
    put(o, "next_attempt", json_string(at), bad);
  }
  json_t *req = json_object();
  put(req, "bytes", json_integer((json_int_t)s->request.len), bad);
  put(o, "request", req, bad);
  return o;
}

/* {"seq":N,"at":"...","instance":"...","kind":"transaction","transaction":{...}}:
 * the kind's fields under its own name, as proto3 JSON puts a oneof member,
 * so they never collide with the record's (a ledger change has a kind too). */
static json_t *record_json(uint64_t seq, const Ledger__V1__Record *r) {
  json_t *o = json_object();
  if (o == NULL)
    return NULL;
  bool bad = false;
  char at[96];
  fmt_time(r->at_unix_ms, at, sizeof at);
  put(o, "seq", json_integer((json_int_t)seq), &bad);
  put(o, "at", json_string(at), &bad);
  put(o, "instance", str(r->instance), &bad);
  switch (r->kind_case) {
  case LEDGER__V1__RECORD__KIND_TRANSACTION:
    put(o, "kind", json_string("transaction"), &bad);
    put(o, "transaction", transaction_json(r->transaction, &bad), &bad);
    break;
  case LEDGER__V1__RECORD__KIND_LEDGER_CHANGE:
    put(o, "kind", json_string("ledger_change"), &bad);
    put(o, "ledger_change", ledger_change_json(r->ledger_change, &bad), &bad);
    break;
  case LEDGER__V1__RECORD__KIND_USAGE_REPORT:
    put(o, "kind", json_string("usage_report"), &bad);
    put(o, "usage_report", usage_report_json(r->usage_report, &bad), &bad);
    break;
  case LEDGER__V1__RECORD__KIND_SETTLEMENT:
    put(o, "kind", json_string("settlement"), &bad);
    put(o, "settlement", settlement_json(r->settlement, &bad), &bad);
    break;
  default:
    put(o, "kind", json_string("unknown"), &bad); /* a newer gateway wrote it: never guess */
    break;
  }
  if (bad) {
    json_decref(o);
    return NULL;
  }
  return o;
}

/* ---- the commands */

typedef struct opts {
  const char *cmd;
  const char *config;
  const char *tenant;
  const char *tx;
  bool has_since, has_until;
  int64_t since_ms, until_ms;
  bool ship;        /* log shipping configured, or a checkpoint found: say what is shipped */
  uint64_t shipped; /* data_dir/ship.ckpt: every record up to it is in the store */
} opts_t;

/* "shipped through seq N, M records pending" for a log whose last record is last. */
static void print_shipped(const opts_t *o, uint64_t last, FILE *out) {
  if (!o->ship)
    return;
  uint64_t pending = last > o->shipped ? last - o->shipped : 0;
  fprintf(out, "shipped through seq %" PRIu64 ", %" PRIu64 " record%s pending\n", o->shipped, pending,
          pending == 1 ? "" : "s");
}

static bool matches(const opts_t *o, const Ledger__V1__Record *r) {
  if (o->has_since && r->at_unix_ms < o->since_ms)
    return false;
  if (o->has_until && r->at_unix_ms >= o->until_ms)
    return false;
  if (o->tenant != NULL) {
    bool hit = false;
    if (r->kind_case == LEDGER__V1__RECORD__KIND_TRANSACTION) {
      for (size_t i = 0; i < r->transaction->n_items && !hit; i++)
        hit = strcmp(r->transaction->items[i]->tenant, o->tenant) == 0;
    } else if (r->kind_case == LEDGER__V1__RECORD__KIND_SETTLEMENT) {
      hit = strcmp(r->settlement->tenant, o->tenant) == 0;
    }
    if (!hit)
      return false;
  }
  if (o->tx != NULL) {
    const char *id = NULL;
    if (r->kind_case == LEDGER__V1__RECORD__KIND_TRANSACTION)
      id = r->transaction->id;
    else if (r->kind_case == LEDGER__V1__RECORD__KIND_LEDGER_CHANGE)
      id = r->ledger_change->transaction_id;
    else if (r->kind_case == LEDGER__V1__RECORD__KIND_USAGE_REPORT)
      id = r->usage_report->transaction_id;
    if (id == NULL || strcmp(id, o->tx) != 0)
      return false;
  }
  return true;
}

typedef struct cat {
  const opts_t *o;
  FILE *out;
  uint64_t printed;
} cat_t;

static int cat_record(walk_t *w, uint64_t seq, const Ledger__V1__Record *r) {
  cat_t *c = w->arg;
  if (!matches(c->o, r))
    return 0;
  json_t *j = record_json(seq, r);
  if (j != NULL && c->o->ship && json_object_set_new(j, "shipped", json_boolean(seq <= c->o->shipped)) != 0) {
    json_decref(j);
    j = NULL;
  }
  char *line = j ? json_dumps(j, JSON_COMPACT | JSON_ENSURE_ASCII | JSON_PRESERVE_ORDER) : NULL;
  json_decref(j);
  if (line == NULL) {
    w->failed = -ENOMEM;
    return -ENOMEM;
  }
  int n = fprintf(c->out, "%s\n", line);
  free(line);
  if (n < 0) {
    w->failed = -EIO;
    return -EIO;
  }
  c->printed++;
  return 0;
}

/* What ls and cat say when the scan did not end cleanly; returns the exit
 * status it deserves (0: a torn tail of the last segment, a warning). */
static int report_end(const walk_t *w, int r, const char *msg, FILE *err) {
  int status = 0;
  if (w->failed != 0) {
    fprintf(err, "tollgate wal: %s\n", w->failed == -ENOMEM ? "out of memory" : "cannot write the output");
    return 1;
  }
  if (r == -EBADMSG && torn_tail(w->dir, msg)) {
    fprintf(err,
            "tollgate wal: warning: %s: the end of the last segment is incomplete (a running gateway "
            "may be writing it); the records before it are shown\n",
            msg);
  } else if (r == -ENOENT && vanished(w->dir, msg)) {
    fprintf(err,
            "tollgate wal: %s: the segment was removed (by retention: the gateway runs) while it was "
            "read; run again\n",
            msg);
    status = 1;
  } else if (r != 0) {
    fprintf(err, "tollgate wal: %s\n", msg);
    if (r == -EBADMSG)
      fprintf(err, "tollgate wal: the log is damaged; the records before the damage are shown\n");
    status = 1;
  }
  if (w->undecodable > 0) {
    fprintf(err, "tollgate wal: %" PRIu64 " record%s not ledger.v1.Record (see `tollgate wal verify`)\n",
            w->undecodable, w->undecodable == 1 ? " is" : "s are");
    status = 1;
  }
  return status;
}

static int cmd_ls(walk_t *w, const opts_t *o, FILE *out, FILE *err) {
  tg_wal_recovery_t rec;
  char msg[1024] = "";
  int r = walk_log(w, &rec, msg, sizeof msg);
  if (r != 0 && r != -EBADMSG && w->failed == 0) {
    fprintf(err, "tollgate wal: %s%s\n", msg, r == -ENOENT ? RETAINED : "");
    return 1;
  }
  size_t shown = w->segs.n < rec.segments ? w->segs.n : (size_t)rec.segments;
  uint64_t records = 0, bytes = 0;
  fprintf(out, "%-24s %12s %10s %12s  %-24s  %s\n", "SEGMENT", "FIRST SEQ", "RECORDS", "BYTES",
          "FIRST RECORD", "LAST RECORD");
  for (size_t i = 0; i < shown; i++) {
    const seg_t *s = &w->segs.v[i];
    char first[96] = "-", last[96] = "-";
    if (s->timed) {
      fmt_time(s->first_ms, first, sizeof first);
      fmt_time(s->last_ms, last, sizeof last);
    }
    fprintf(out, "%-24s %12" PRIu64 " %10" PRIu64 " %12" PRIu64 "  %-24s  %s\n", s->name, s->first_seq,
            s->records, s->bytes, first, last);
    records += s->records;
    bytes += s->bytes;
  }
  fprintf(out, "total: %zu segment%s, %" PRIu64 " record%s, %" PRIu64 " bytes\n", shown,
          shown == 1 ? "" : "s", records, records == 1 ? "" : "s", bytes);
  print_shipped(o, rec.next_seq ? rec.next_seq - 1 : 0, out);
  return report_end(w, r, msg, err);
}

static int cmd_verify(walk_t *w, const opts_t *o, FILE *out, FILE *err) {
  tg_wal_recovery_t rec;
  char msg[1024] = "";
  int r = walk_log(w, &rec, msg, sizeof msg);
  if (w->failed != 0 || r == -ENOMEM) {
    fprintf(err, "tollgate wal: out of memory\n");
    return 1;
  }
  if (r == 0 && w->undecodable == 0) {
    fprintf(out, "ok: %" PRIu64 " segments, %" PRIu64 " records, %" PRIu64 " bytes\n", rec.segments,
            rec.records, rec.bytes);
    print_shipped(o, rec.next_seq ? rec.next_seq - 1 : 0, out);
    if (w->unknown > 0)
      fprintf(out,
              "note: %" PRIu64
              " record%s of a kind this version does not know (written by a newer gateway)\n",
              w->unknown, w->unknown == 1 ? " is" : "s are");
    return 0;
  }
  if (r == -EBADMSG) {
    fprintf(err, "tollgate wal: damaged: %s\n", msg);
    fprintf(err, "tollgate wal: %" PRIu64 " record%s verified before it\n", rec.records,
            rec.records == 1 ? "" : "s");
    if (torn_tail(w->dir, msg))
      fprintf(err,
              "tollgate wal: this is the end of the last segment: a running gateway may be writing it "
              "(run verify again), or it was stopped mid-write (it truncates such a tail when it starts)\n");
  } else if (r != 0) {
    fprintf(err, "tollgate wal: %s%s\n", msg, r == -ENOENT ? RETAINED : "");
  }
  if (w->undecodable > 0)
    fprintf(err, "tollgate wal: damaged: %" PRIu64 " record%s not ledger.v1.Record\n", w->undecodable,
            w->undecodable == 1 ? " is" : "s are");
  return 1;
}

static int cmd_cat(walk_t *w, const opts_t *o, FILE *out, FILE *err) {
  cat_t c = {.o = o, .out = out};
  w->on_record = cat_record;
  w->arg = &c;
  tg_wal_recovery_t rec;
  char msg[1024] = "";
  int r = walk_log(w, &rec, msg, sizeof msg);
  return report_end(w, r, msg, err);
}

/* Options after the subcommand. Returns 0, or the exit status (2, or 0 for --help). */
static int parse_opts(int argc, char **argv, opts_t *o, FILE *out, FILE *err) {
  bool is_cat = strcmp(o->cmd, "cat") == 0;
  for (int i = 2; i < argc; i++) {
    const char *a = argv[i];
    if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
      usage(out);
      return -1;
    }
    const char *known[] = {"-c", "--config", "--tenant", "--tx", "--since", "--until"};
    bool takes = false;
    for (size_t k = 0; k < sizeof known / sizeof known[0]; k++)
      takes = takes || strcmp(a, known[k]) == 0;
    if (!takes)
      return bad_usage(err, a[0] == '-' ? "unknown option" : "unexpected argument", a);
    if (!is_cat && a[1] == '-' && strcmp(a, "--config") != 0)
      return bad_usage(err, "only `wal cat` takes", a);
    if (i + 1 >= argc)
      return bad_usage(err, "a value is needed after", a);
    const char *v = argv[++i];
    if (strcmp(a, "-c") == 0 || strcmp(a, "--config") == 0) {
      o->config = v;
    } else if (strcmp(a, "--tenant") == 0) {
      o->tenant = v;
    } else if (strcmp(a, "--tx") == 0) {
      o->tx = v;
    } else if (strcmp(a, "--since") == 0) {
      if (!parse_time(v, &o->since_ms))
        return bad_usage(err, "--since: not a time (2026-12-06T10:00:00Z, 2026-12-06 or unix seconds)", v);
      o->has_since = true;
    } else {
      if (!parse_time(v, &o->until_ms))
        return bad_usage(err, "--until: not a time (2026-12-06T10:00:00Z, 2026-12-06 or unix seconds)", v);
      o->has_until = true;
    }
  }
  if (o->config == NULL)
    return bad_usage(err, "-c CONFIG is required", NULL);
  return 0;
}

/* data_dir/ship.ckpt (ledger/ship.h: decimal text and a newline) into o:
 * shown when shipping is configured or a checkpoint exists; one that does
 * not read is a warning, and nothing is said of shipping. */
static void read_checkpoint(const char *data_dir, bool shipping, opts_t *o, FILE *err) {
  char path[PATH_MAX];
  if (snprintf(path, sizeof path, "%s/ship.ckpt", data_dir) >= (int)sizeof path)
    return;
  uint8_t *data = NULL;
  size_t size = 0, len;
  int shrank = 0, r = tg_file_read(path, &data, &size, &shrank);
  if (r == -ENOENT) {
    o->ship = shipping; /* nothing shipped yet */
    return;
  }
  if (r != 0) {
    fprintf(err, "tollgate wal: warning: %s: %s\n", path, strerror(-r));
    return;
  }
  for (len = size; len > 0 && (data[len - 1] == '\n' || data[len - 1] == '\r');)
    len--;
  uint64_t v = 0;
  bool ok = len > 0 && len < 21;
  for (size_t i = 0; ok && i < len; i++) {
    ok = data[i] >= '0' && data[i] <= '9' && v <= (UINT64_MAX - 9) / 10;
    v = v * 10 + (uint64_t)(data[i] - '0');
  }
  free(data);
  if (!ok) {
    fprintf(err, "tollgate wal: warning: %s: not a sequence number\n", path);
    return;
  }
  o->ship = true;
  o->shipped = v;
}

int tg_walcli_main(int argc, char **argv, FILE *out, FILE *err) {
  if (argc < 2)
    return bad_usage(err, NULL, NULL);
  const char *cmd = argv[1];
  if (strcmp(cmd, "-h") == 0 || strcmp(cmd, "--help") == 0 || strcmp(cmd, "help") == 0) {
    usage(out);
    return 0;
  }
  if (strcmp(cmd, "ls") != 0 && strcmp(cmd, "verify") != 0 && strcmp(cmd, "cat") != 0)
    return bad_usage(err, "unknown command", cmd);
  opts_t o = {.cmd = cmd};
  int r = parse_opts(argc, argv, &o, out, err);
  if (r != 0)
    return r < 0 ? 0 : r;

  tg_config_t cfg;
  char msg[1024];
  if (tg_config_load(o.config, &cfg, msg, sizeof msg) != 0) {
    fprintf(err, "tollgate wal: %s\n", msg);
    return 1;
  }
  char dir[PATH_MAX];
  int n = snprintf(dir, sizeof dir, "%s/wal", cfg.data_dir);
  bool shipping = cfg.ledger.ship_store != TG_CONFIG_SHIP_NONE;
  if (n < 0 || (size_t)n >= sizeof dir) {
    tg_config_free(&cfg);
    fprintf(err, "tollgate wal: data_dir is too long\n");
    return 1;
  }
  read_checkpoint(cfg.data_dir, shipping, &o, err);
  tg_config_free(&cfg);
  struct stat st;
  if (stat(dir, &st) != 0) {
    if (errno == ENOENT) {
      /* A gateway that never wrote a record: nothing is wrong. */
      fprintf(strcmp(cmd, "cat") == 0 ? err : out, "no log yet: %s does not exist\n", dir);
      return 0;
    }
    fprintf(err, "tollgate wal: %s: %s\n", dir, strerror(errno));
    return 1;
  }
  if (!S_ISDIR(st.st_mode)) {
    fprintf(err, "tollgate wal: %s: not a directory\n", dir);
    return 1;
  }

  walk_t w = {.dir = dir, .err = err};
  int status;
  if (strcmp(cmd, "ls") == 0)
    status = cmd_ls(&w, &o, out, err);
  else if (strcmp(cmd, "verify") == 0)
    status = cmd_verify(&w, &o, out, err);
  else
    status = cmd_cat(&w, &o, out, err);
  free(w.segs.v);
  if (fflush(out) != 0 || ferror(out)) {
    fprintf(err, "tollgate wal: cannot write the output\n");
    status = 1;
  }
  fflush(err);
  return status;
}
