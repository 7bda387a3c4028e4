#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include "gateway/walcli.h"
#include "ledger/v1/ledger.pb-c.h"
#include "ledger/wal.h"
#include "ramp/v1/exchange.pb-c.h"
#include "test.h"
#include "tmpfiles.h"

#define T0_MS INT64_C(1796551200000) /* 2026-12-06T10:00:00Z */
#define SECRET_REF "acct_secret_demo"
#define SECRET_URL "https://cdn.example/v?token=bearer-secret"
#define SEG1 "00000000000000000001.wal"

/* ---- a gateway's data_dir */

typedef struct site {
  char conf[1100]; /* configuration file */
  char data_dir[1024];
  char wal[1100]; /* data_dir/wal */
} site_t;

/* A configuration whose data_dir is TMPDIR/name (not made). */
static void site_init(site_t *s, const char *name) {
  quiet_logs();
  (void)now_s; /* tmpfiles.h's clock: nothing here is timed */
  char file[64], src[512];
  snprintf(file, sizeof file, "%s.conf", name);
  snprintf(src, sizeof src,
           "return {\n  listen = { { host = \"127.0.0.1\", port = 8080 } },\n  data_dir = \"%s\",\n}\n",
           name);
  snprintf(s->conf, sizeof s->conf, "%s", tmp_write(file, src));
  snprintf(s->data_dir, sizeof s->data_dir, "%s", tmp_path(name));
  snprintf(s->wal, sizeof s->wal, "%s/wal", s->data_dir);
}

typedef struct payload {
  uint8_t *data;
  size_t len;
} payload_t;

static payload_t pack(const Ledger__V1__Record *r) {
  payload_t p = {malloc(ledger__v1__record__get_packed_size(r)), 0};
  p.len = ledger__v1__record__pack(r, p.data);
  return p;
}

static payload_t raw(const void *bytes, size_t len) {
  payload_t p = {malloc(len), len};
  memcpy(p.data, bytes, len);
  return p;
}

static void on_done(void *arg, int status, uint64_t seq) {
  int *counts = arg; /* done, errors */
  (void)seq;
  counts[0]++;
  if (status != 0)
    counts[1]++;
}

/* Appends the payloads (freed) through tg_wal, as the gateway does: a client
 * on a loop, each record durable before the next. 0 or -1. */
static int write_log(const site_t *s, uint64_t segment_bytes, payload_t *p, int n) {
  mkdir(s->data_dir, 0700);
  tg_wal_opts_t o;
  tg_wal_opts_init(&o);
  o.dir = s->wal;
  o.batch_interval_us = 0;
  if (segment_bytes)
    o.segment_bytes = segment_bytes;
  tg_wal_t *w;
  char err[256];
  if (tg_wal_open(&o, &w, NULL, err, sizeof err) != 0) {
    fprintf(stderr, "  open: %s\n", err);
    return -1;
  }
  uv_loop_t loop;
  uv_loop_init(&loop);
  tg_wal_client_t *c = NULL;
  int counts[2] = {0, 0}, r = tg_wal_client_new(w, &loop, &c);
  for (int i = 0; r == 0 && i < n; i++) {
    r = tg_wal_append(c, p[i].data, p[i].len, on_done, counts, NULL);
    while (r == 0 && counts[0] < i + 1)
      uv_run(&loop, UV_RUN_ONCE);
  }
  for (int i = 0; i < n; i++)
    free(p[i].data);
  if (c != NULL && tg_wal_client_free(c) != 0)
    r = -1;
  uv_run(&loop, UV_RUN_DEFAULT);
  tg_wal_close(w);
  uv_loop_close(&loop);
  return r == 0 && counts[1] == 0 ? 0 : -1;
}

/* A transaction of tenants[0..n) (each item 1500 micro-USD), its answer
 * stored with a retrieval URL that must never be printed. */
static payload_t transaction(const char *id, int64_t at, const char *ref, const char *detail,
                             const char **tenants, int n) {
  Ledger__V1__TransactionItem items[4], *itemp[4];
  Ramp__V1__SignedItem signed_items[4], *signedp[4];
  char offers[4][32], uris[4][64];
  for (int i = 0; i < n; i++) {
    ledger__v1__transaction_item__init(&items[i]);
    snprintf(offers[i], sizeof offers[i], "off_%s", tenants[i]);
    snprintf(uris[i], sizeof uris[i], "https://%s.example/a", tenants[i]);
    items[i].tenant = (char *)tenants[i];
    items[i].offer_id = offers[i];
    items[i].uri = uris[i];
    items[i].amount = 1500;
    items[i].currency = "USD";
    items[i].estimated_tokens = 1000;
    items[i].url_expires_at_unix = T0_MS / 1000 + 300;
    itemp[i] = &items[i];
    ramp__v1__signed_item__init(&signed_items[i]);
    signed_items[i].offer_id = offers[i];
    signed_items[i].uri = uris[i];
    signed_items[i].retrieval_url = SECRET_URL;
    signedp[i] = &signed_items[i];
  }
  Ramp__V1__ExecuteTransactionResponse resp = RAMP__V1__EXECUTE_TRANSACTION_RESPONSE__INIT;
  resp.transaction_id = (char *)id;
  resp.status = RAMP__V1__TRANSACTION_STATUS__TRANSACTION_STATUS_APPROVED;
  resp.n_items = (size_t)n;
  resp.items = signedp;
  uint8_t respbuf[2048];
  size_t resplen = ramp__v1__execute_transaction_response__pack(&resp, respbuf);

  uint8_t hash[32];
  for (int i = 0; i < 32; i++)
    hash[i] = (uint8_t)i;
  Ledger__V1__Amount total = LEDGER__V1__AMOUNT__INIT, *totalp = &total;
  total.currency = "USD";
  total.amount = 1500 * n;
  Ledger__V1__Transaction t = LEDGER__V1__TRANSACTION__INIT;
  t.id = (char *)id;
  t.outcome = LEDGER__V1__TRANSACTION_OUTCOME__TRANSACTION_OUTCOME_APPROVED;
  t.idempotency_key = "idem-1";
  t.request_hash.data = hash;
  t.request_hash.len = sizeof hash;
  t.billing_reference = (char *)ref;
  t.billing_type = "builtin";
  t.n_items = (size_t)n;
  t.items = itemp;
  t.n_totals = 1;
  t.totals = &totalp;
  t.ai_system_id = "agent-7";
  t.response.data = respbuf;
  t.response.len = resplen;
  t.detail = (char *)detail;
  t.request_id = "req-1";
  Ledger__V1__Record r = LEDGER__V1__RECORD__INIT;
  r.at_unix_ms = at;
  r.instance = "gw-1";
  r.kind_case = LEDGER__V1__RECORD__KIND_TRANSACTION;
  r.transaction = &t;
  return pack(&r);
}

static payload_t credit(int64_t at, const char *ref, int64_t amount) {
  Ledger__V1__LedgerChange c = LEDGER__V1__LEDGER_CHANGE__INIT;
  c.kind = LEDGER__V1__LEDGER_CHANGE_KIND__LEDGER_CHANGE_KIND_CREDIT;
  c.billing_reference = (char *)ref;
  c.currency = "USD";
  c.amount = amount;
  c.reference = "topup-1";
  Ledger__V1__Record r = LEDGER__V1__RECORD__INIT;
  r.at_unix_ms = at;
  r.instance = "gw-1";
  r.kind_case = LEDGER__V1__RECORD__KIND_LEDGER_CHANGE;
  r.ledger_change = &c;
  return pack(&r);
}

static payload_t usage(int64_t at, const char *tx, int64_t consumed) {
  Ledger__V1__UsageReport u = LEDGER__V1__USAGE_REPORT__INIT;
  u.transaction_id = (char *)tx;
  u.offer_id = "off_news";
  u.consumed_tokens = consumed;
  u.estimated_tokens = 1000;
  Ledger__V1__Record r = LEDGER__V1__RECORD__INIT;
  r.at_unix_ms = at;
  r.instance = "gw-1";
  r.kind_case = LEDGER__V1__RECORD__KIND_USAGE_REPORT;
  r.usage_report = &u;
  return pack(&r);
}

/* A record of a kind written by a newer gateway: field 20, unknown here. */
static payload_t future_kind(int64_t at) {
  Ledger__V1__Record r = LEDGER__V1__RECORD__INIT;
  r.at_unix_ms = at;
  r.instance = "gw-1";
  payload_t p = pack(&r);
  p.data = realloc(p.data, p.len + 3);
  memcpy(p.data + p.len, "\xa2\x01\x00", 3);
  p.len += 3;
  return p;
}

/* The log most tests read: every kind, over several segments. */
static void write_fixture(site_t *s, const char *name, tg_wal_recovery_t *rec, int *failed) {
  site_init(s, name);
  const char *both[] = {"news", "blog"}, *blog[] = {"blog"};
  payload_t p[] = {
      transaction("tx_1", T0_MS + 123, SECRET_REF, "", both, 2),
      credit(T0_MS + 1000, SECRET_REF, 5000000),
      usage(T0_MS + 2000, "tx_1", 900),
      transaction("tx_2", T0_MS + 3600000, "abc", "caf\xc3\xa9", blog, 1),
      future_kind(T0_MS + 3600001),
  };
  char err[256];
  if (write_log(s, 700, p, 5) != 0 || tg_wal_scan(s->wal, NULL, NULL, rec, err, sizeof err) != 0) {
    fprintf(stderr, "  fixture: %s\n", err);
    *failed = 1;
  }
}

/* ---- running the command */

typedef struct result {
  int status;
  char *out, *err;
} result_t;

/* The captured outputs of the last RING runs: a result is valid until RING more runs. */
#define RING 16
static result_t ring_[RING];
static int next_;

/* tg_walcli_main("wal", args..., NULL) with out and err captured. */
static result_t run(const char *arg, ...) {
  char *argv[32];
  int argc = 0;
  argv[argc++] = "wal";
  va_list ap;
  va_start(ap, arg);
  for (const char *a = arg; a != NULL && argc < 31; a = va_arg(ap, const char *))
    argv[argc++] = (char *)a;
  va_end(ap);
  argv[argc] = NULL;
  result_t *r = &ring_[next_++ % RING];
  free(r->out);
  free(r->err);
  size_t ol, el;
  FILE *o = open_memstream(&r->out, &ol), *e = open_memstream(&r->err, &el);
  r->status = tg_walcli_main(argc, argv, o, e);
  fclose(o);
  fclose(e);
  return *r;
}

/* The JSON lines of out as an array (NULL when one does not parse as an object). */
static json_t *lines_of(const char *out) {
  json_t *a = json_array();
  for (const char *p = out; *p;) {
    const char *nl = strchr(p, '\n');
    if (nl == NULL) { /* every line ends with a newline */
      json_decref(a);
      return NULL;
    }
    json_error_t je;
    json_t *j = json_loadb(p, (size_t)(nl - p), 0, &je);
    if (!json_is_object(j)) {
      fprintf(stderr, "  not a JSON object: %.*s (%s)\n", (int)(nl - p), p, je.text);
      json_decref(j);
      json_decref(a);
      return NULL;
    }
    json_array_append_new(a, j);
    p = nl + 1;
  }
  return a;
}

/* "1,4": the seq of each line, for filters. */
static const char *seqs_of(const char *out) {
  static char buf[256];
  buf[0] = '\0';
  json_t *a = lines_of(out);
  if (a == NULL)
    return "(invalid)";
  size_t i;
  json_t *j;
  json_array_foreach(a, i, j) {
    size_t l = strlen(buf);
    snprintf(buf + l, sizeof buf - l, "%s%lld", i ? "," : "",
             (long long)json_integer_value(json_object_get(j, "seq")));
  }
  json_decref(a);
  return buf;
}

static const char *jstr(json_t *o, const char *path) {
  /* "a.b.c" */
  char key[64];
  const char *p = path;
  while (o != NULL && *p) {
    size_t n = strcspn(p, ".");
    snprintf(key, sizeof key, "%.*s", (int)n, p);
    o = json_object_get(o, key);
    p += n + (p[n] == '.');
  }
  return json_string_value(o);
}

static bool ascii_only(const char *s) {
  for (; *s; s++)
    if ((unsigned char)*s >= 0x80)
      return false;
  return true;
}

static off_t file_size(const char *path) {
  struct stat st;
  return stat(path, &st) == 0 ? st.st_size : -1;
}

static void flip_byte(const char *path, off_t at, int *failed) {
  int fd = open(path, O_RDWR);
  uint8_t b;
  if (fd < 0 || pread(fd, &b, 1, at) != 1) {
    *failed = 1;
    return;
  }
  b ^= 0x10;
  if (pwrite(fd, &b, 1, at) != 1)
    *failed = 1;
  close(fd);
}

/* ---- tests */

TEST(ls_lists_every_segment) {
  site_t s;
  tg_wal_recovery_t rec;
  int bad = 0;
  write_fixture(&s, "ls", &rec, &bad);
  CHECK(!bad);
  CHECK(rec.segments >= 2); /* the fixture spans segments */
  result_t r = run("ls", "-c", s.conf, NULL);
  CHECK_INT(r.status, 0);
  CHECK_STR(r.err, "");
  char want[128];
  snprintf(want, sizeof want, "total: %d segments, 5 records, %d bytes\n", (int)rec.segments, (int)rec.bytes);
  CHECK(strstr(r.out, want) != NULL);
  /* One line per segment (and the heading and the total). */
  int lines = 0;
  for (const char *p = r.out; (p = strchr(p, '\n')) != NULL; p++)
    lines++;
  CHECK_INT(lines, (int)rec.segments + 2);
  CHECK(strstr(r.out, "\n" SEG1 " ") != NULL);
  CHECK(strstr(r.out, "2026-12-06T10:00:00.123Z") != NULL); /* first record */
  CHECK(strstr(r.out, "2026-12-06T11:00:00.001Z") != NULL); /* last record */
  /* The first segment's line: sequence 1, its records and bytes as the file holds them. */
  char path[1200];
  snprintf(path, sizeof path, "%s/" SEG1, s.wal);
  const char *line = strstr(r.out, SEG1);
  unsigned long long first, records, bytes;
  CHECK_INT(sscanf(line + strlen(SEG1), "%llu %llu %llu", &first, &records, &bytes), 3);
  CHECK_INT(first, 1);
  CHECK(records >= 1);
  CHECK_INT(bytes, file_size(path));
}

TEST(verify_counts_a_sound_log) {
  site_t s;
  tg_wal_recovery_t rec;
  int bad = 0;
  write_fixture(&s, "verify", &rec, &bad);
  CHECK(!bad);
  result_t r = run("verify", "-c", s.conf, NULL);
  CHECK_INT(r.status, 0);
  char want[128];
  snprintf(want, sizeof want, "ok: %d segments, 5 records, %d bytes\n", (int)rec.segments, (int)rec.bytes);
  CHECK(strncmp(r.out, want, strlen(want)) == 0);
  CHECK(strstr(r.out, "1 record is of a kind this version does not know") != NULL);
}

TEST(cat_prints_every_record_as_json) {
  site_t s;
  tg_wal_recovery_t rec;
  int bad = 0;
  write_fixture(&s, "cat", &rec, &bad);
  CHECK(!bad);
  result_t r = run("cat", "-c", s.conf, NULL);
  CHECK_INT(r.status, 0);
  CHECK_STR(r.err, "");
  json_t *a = lines_of(r.out);
  CHECK(a != NULL);
  CHECK_INT(json_array_size(a), 5);
  const char *kinds[] = {"transaction", "ledger_change", "usage_report", "transaction", "unknown"};
  for (size_t i = 0; i < 5; i++) {
    json_t *j = json_array_get(a, i);
    CHECK_INT(json_integer_value(json_object_get(j, "seq")), (long long)i + 1);
    CHECK_STR(jstr(j, "kind"), kinds[i]);
    CHECK_STR(jstr(j, "instance"), "gw-1");
  }
  json_t *tx = json_array_get(a, 0);
  CHECK_STR(jstr(tx, "at"), "2026-12-06T10:00:00.123Z");
  CHECK_STR(jstr(tx, "transaction.id"), "tx_1");
  CHECK_STR(jstr(tx, "transaction.outcome"), "approved");
  CHECK_STR(jstr(tx, "transaction.billing_reference"), "****demo");
  CHECK_STR(jstr(tx, "transaction.request_hash"),
            "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f");
  json_t *items = json_object_get(json_object_get(tx, "transaction"), "items");
  CHECK_INT(json_array_size(items), 2);
  CHECK_STR(jstr(json_array_get(items, 1), "tenant"), "blog");
  json_t *amount = json_object_get(json_array_get(items, 0), "amount");
  CHECK(json_is_integer(amount)); /* money stays an integer */
  CHECK_INT(json_integer_value(amount), 1500);
  json_t *total = json_object_get(
      json_array_get(json_object_get(json_object_get(tx, "transaction"), "totals"), 0), "amount");
  CHECK(json_is_integer(total));
  CHECK_INT(json_integer_value(total), 3000);
  json_t *resp = json_object_get(json_object_get(tx, "transaction"), "response");
  CHECK(json_integer_value(json_object_get(resp, "bytes")) > 0);
  CHECK_STR(jstr(resp, "status"), "approved");
  CHECK_STR(jstr(resp, "transaction_id"), "tx_1");
  CHECK_INT(json_integer_value(json_object_get(resp, "items")), 2);

  json_t *lc = json_array_get(a, 1);
  CHECK_STR(jstr(lc, "ledger_change.kind"), "credit");
  CHECK_STR(jstr(lc, "ledger_change.billing_reference"), "****demo");
  CHECK(json_is_integer(json_object_get(json_object_get(lc, "ledger_change"), "amount")));
  CHECK_INT(json_integer_value(json_object_get(json_object_get(lc, "ledger_change"), "amount")), 5000000);
  json_t *u = json_array_get(a, 2);
  CHECK_STR(jstr(u, "usage_report.transaction_id"), "tx_1");
  CHECK_INT(json_integer_value(json_object_get(json_object_get(u, "usage_report"), "consumed_tokens")), 900);
  json_t *tx2 = json_array_get(a, 3);
  CHECK_STR(jstr(tx2, "transaction.billing_reference"), "****"); /* 4 characters or fewer */
  CHECK_STR(jstr(tx2, "transaction.detail"), "caf\xc3\xa9");
  CHECK_STR(jstr(json_array_get(a, 4), "at"), "2026-12-06T11:00:00.001Z");
  json_decref(a);

  /* Secrets never reach the output, and the output is ASCII. */
  CHECK(strstr(r.out, "secret") == NULL);
  CHECK(strstr(r.out, "bearer") == NULL);
  CHECK(strstr(r.out, "cdn.example") == NULL);
  CHECK(strstr(r.out, "retrieval") == NULL);
  CHECK(ascii_only(r.out));
  CHECK(strstr(r.out, "caf\\u00e9") != NULL || strstr(r.out, "caf\\u00E9") != NULL); /* escaped */
}

TEST(cat_filters) {
  site_t s;
  tg_wal_recovery_t rec;
  int bad = 0;
  write_fixture(&s, "filters", &rec, &bad);
  CHECK(!bad);
  const char *c = s.conf;
  CHECK_STR(seqs_of(run("cat", "-c", c, "--tenant", "news", NULL).out), "1");
  CHECK_STR(seqs_of(run("cat", "-c", c, "--tenant", "blog", NULL).out), "1,4");
  CHECK_STR(seqs_of(run("cat", "-c", c, "--tenant", "nobody", NULL).out), "");
  CHECK_STR(seqs_of(run("cat", "-c", c, "--tx", "tx_1", NULL).out), "1,3");
  CHECK_STR(seqs_of(run("cat", "-c", c, "--tx", "tx_2", NULL).out), "4");
  CHECK_STR(seqs_of(run("cat", "-c", c, "--since", "2026-12-06T10:00:01Z", NULL).out), "2,3,4,5");
  CHECK_STR(seqs_of(run("cat", "-c", c, "--since", "2026-12-06T10:00:01.001Z", NULL).out), "3,4,5");
  CHECK_STR(seqs_of(run("cat", "-c", c, "--since", "1796551201", NULL).out), "2,3,4,5"); /* unix seconds */
  CHECK_STR(seqs_of(run("cat", "-c", c, "--until", "2026-12-06T10:00:01Z", NULL).out), "1");
  CHECK_STR(
      seqs_of(run("cat", "-c", c, "--since", "2026-12-06T10:30:00Z", "--until", "2026-12-06T12:00:00Z", NULL)
                  .out),
      "4,5");
  CHECK_STR(seqs_of(run("cat", "-c", c, "--since", "2026-12-07", NULL).out), "");
  CHECK_STR(seqs_of(run("cat", "-c", c, "--tenant", "blog", "--since", "2026-12-06T10:00:01Z", NULL).out),
            "4");
  result_t r = run("cat", "-c", c, "--tx", "nope", NULL);
  CHECK_INT(r.status, 0);
  CHECK_STR(r.out, "");
}

TEST(bad_usage_exits_2) {
  site_t s;
  site_init(&s, "usage");
  CHECK_INT(run(NULL).status, 2);
  CHECK_INT(run("ls", NULL).status, 2); /* -c is required */
  CHECK_INT(run("tail", "-c", s.conf, NULL).status, 2);
  CHECK_INT(run("ls", "-c", NULL).status, 2);
  CHECK_INT(run("ls", "-c", s.conf, "--tenant", "news", NULL).status, 2); /* a cat option */
  CHECK_INT(run("cat", "-c", s.conf, "--bogus", NULL).status, 2);
  CHECK_INT(run("cat", "-c", s.conf, "extra", NULL).status, 2);
  CHECK_INT(run("cat", "-c", s.conf, "--since", "yesterday", NULL).status, 2);
  CHECK_INT(run("cat", "-c", s.conf, "--until", "2026-02-30T00:00:00Z", NULL).status, 2);
  CHECK_INT(run("cat", "-c", s.conf, "--since", "2026-12-06T10:00:00", NULL).status, 2); /* UTC only: Z */
  result_t r = run("cat", "-c", s.conf, "--tx", NULL);
  CHECK_INT(r.status, 2);
  CHECK(strstr(r.err, "usage: tollgate wal") != NULL);
  r = run("--help", NULL);
  CHECK_INT(r.status, 0);
  CHECK(strstr(r.out, "tollgate wal cat -c CONFIG [--tenant T]") != NULL);
  CHECK_INT(run("verify", "--help", NULL).status, 0);
  /* A configuration that does not load is an error, not a usage error. */
  r = run("ls", "-c", tmp_path("missing.conf"), NULL);
  CHECK_INT(r.status, 1);
  CHECK(strstr(r.err, "missing.conf") != NULL);
}

TEST(no_log_yet) {
  site_t s;
  site_init(&s, "fresh");
  result_t r = run("ls", "-c", s.conf, NULL);
  CHECK_INT(r.status, 0);
  CHECK(strstr(r.out, "no log yet") != NULL);
  r = run("verify", "-c", s.conf, NULL);
  CHECK_INT(r.status, 0);
  CHECK(strstr(r.out, "no log yet") != NULL);
  r = run("cat", "-c", s.conf, NULL);
  CHECK_INT(r.status, 0);
  CHECK_STR(r.out, ""); /* stdout stays JSON lines */
  CHECK(strstr(r.err, "no log yet") != NULL);
}

/* Six usage reports of one size, three to a segment. */
static size_t write_six(site_t *s, const char *name, int *failed) {
  site_init(s, name);
  payload_t p[6];
  for (int i = 0; i < 6; i++)
    p[i] = usage(T0_MS + i, "tx_1", 100 + i);
  size_t len = p[0].len;
  if (write_log(s, TG_WAL_HEADER_SIZE + 3 * (TG_WAL_RECORD_OVERHEAD + len), p, 6) != 0)
    *failed = 1;
  return len;
}

TEST(flipped_byte_in_an_earlier_segment) {
  site_t s;
  int bad = 0;
  size_t len = write_six(&s, "flip", &bad);
  CHECK(!bad);
  result_t r = run("verify", "-c", s.conf, NULL);
  CHECK_INT(r.status, 0);
  CHECK(strncmp(r.out, "ok: 2 segments, 6 records, ", 27) == 0);
  r = run("ls", "-c", s.conf, NULL);
  CHECK(strstr(r.out, "\n00000000000000000004.wal ") != NULL);

  char path[1200];
  snprintf(path, sizeof path, "%s/" SEG1, s.wal);
  off_t size = file_size(path);
  size_t rec2 = TG_WAL_HEADER_SIZE + TG_WAL_RECORD_OVERHEAD + len; /* record 2 starts here */
  flip_byte(path, (off_t)(rec2 + TG_WAL_RECORD_OVERHEAD + 2), &bad);
  CHECK(!bad);
  char where[64];
  snprintf(where, sizeof where, "offset %zu", rec2);

  r = run("verify", "-c", s.conf, NULL);
  CHECK_INT(r.status, 1);
  CHECK_STR(r.out, "");
  CHECK(strstr(r.err, SEG1) != NULL);
  CHECK(strstr(r.err, where) != NULL);
  CHECK(strstr(r.err, "running gateway") == NULL); /* not the end of the log */
  r = run("ls", "-c", s.conf, NULL);
  CHECK_INT(r.status, 1);
  CHECK(strstr(r.err, where) != NULL);
  r = run("cat", "-c", s.conf, NULL);
  CHECK_INT(r.status, 1);
  CHECK_STR(seqs_of(r.out), "1");   /* what comes before the damage */
  CHECK_INT(file_size(path), size); /* read-only */
}

TEST(torn_tail_of_the_last_segment_is_a_warning) {
  site_t s;
  int bad = 0;
  write_six(&s, "torn", &bad);
  CHECK(!bad);
  char path[1200];
  snprintf(path, sizeof path, "%s/00000000000000000004.wal", s.wal);
  /* A record being written: its length and CRC, part of its payload. */
  int fd = open(path, O_WRONLY | O_APPEND);
  CHECK(fd >= 0);
  CHECK_INT(write(fd, "\x40\x00\x00\x00\x01\x02\x03\x04\x08\x01", 10), 10);
  close(fd);
  off_t size = file_size(path);

  result_t r = run("ls", "-c", s.conf, NULL);
  CHECK_INT(r.status, 0);
  CHECK(strstr(r.out, "total: 2 segments, 6 records") != NULL);
  CHECK(strstr(r.err, "warning") != NULL);
  CHECK(strstr(r.err, "00000000000000000004.wal") != NULL);
  r = run("cat", "-c", s.conf, NULL);
  CHECK_INT(r.status, 0);
  CHECK_STR(seqs_of(r.out), "1,2,3,4,5,6");
  CHECK(strstr(r.err, "warning") != NULL);
  r = run("verify", "-c", s.conf, NULL);
  CHECK_INT(r.status, 1);
  CHECK(strstr(r.err, "00000000000000000004.wal") != NULL);
  CHECK(strstr(r.err, "running gateway may be writing it") != NULL);
  CHECK_INT(file_size(path), size); /* never truncated by a reader */
}

TEST(flipped_byte_inside_the_last_segment_is_damage) {
  site_t s;
  int bad = 0;
  size_t len = write_six(&s, "midlast", &bad);
  CHECK(!bad);
  char path[1200];
  snprintf(path, sizeof path, "%s/00000000000000000004.wal", s.wal);
  /* Record 5, followed by the good record 6: a flipped bit, not a torn write. */
  size_t rec5 = TG_WAL_HEADER_SIZE + TG_WAL_RECORD_OVERHEAD + len;
  flip_byte(path, (off_t)(rec5 + TG_WAL_RECORD_OVERHEAD + 1), &bad);
  CHECK(!bad);
  result_t r = run("ls", "-c", s.conf, NULL);
  CHECK_INT(r.status, 1);
  CHECK(strstr(r.err, "warning") == NULL);
  r = run("cat", "-c", s.conf, NULL);
  CHECK_INT(r.status, 1);
  CHECK_STR(seqs_of(r.out), "1,2,3,4");
  r = run("verify", "-c", s.conf, NULL);
  CHECK_INT(r.status, 1);
  CHECK(strstr(r.err, "running gateway") == NULL);
}

TEST(a_payload_that_is_not_a_record_is_damage) {
  site_t s;
  site_init(&s, "garbage");
  payload_t p[] = {usage(T0_MS, "tx_1", 1), raw("\x08\xff\xff", 3), usage(T0_MS + 1, "tx_1", 2)};
  size_t len1 = p[0].len;
  int bad = 0;
  CHECK_INT(write_log(&s, 0, p, 3), 0);
  (void)bad;
  char where[64];
  snprintf(where, sizeof where, "offset %zu: record 2 ", TG_WAL_HEADER_SIZE + TG_WAL_RECORD_OVERHEAD + len1);
  result_t r = run("verify", "-c", s.conf, NULL);
  CHECK_INT(r.status, 1);
  CHECK_STR(r.out, "");
  CHECK(strstr(r.err, SEG1) != NULL);
  CHECK(strstr(r.err, where) != NULL);
  CHECK(strstr(r.err, "not a ledger.v1.Record") != NULL);
  r = run("cat", "-c", s.conf, NULL);
  CHECK_INT(r.status, 1);
  CHECK_STR(seqs_of(r.out), "1,3");
  CHECK(strstr(r.err, where) != NULL);
  r = run("ls", "-c", s.conf, NULL);
  CHECK_INT(r.status, 1);
  CHECK(strstr(r.out, "total: 1 segment, 3 records") != NULL);
}

/* The gateway appending (rotating every three records) while ls and cat
 * read: every run succeeds (a record or segment being written is a warning),
 * and every record is counted in the segment that holds it. */
typedef struct writer {
  const site_t *s;
  int n;
  atomic_int done;
  int failed;
} writer_t;

static void write_while_read(void *arg) {
  writer_t *wr = arg;
  payload_t *p = calloc((size_t)wr->n, sizeof *p);
  for (int i = 0; i < wr->n; i++)
    p[i] = usage(T0_MS + i, "tx_1", 1000 + i); /* one size: 3 to a segment */
  if (write_log(wr->s, TG_WAL_HEADER_SIZE + 3 * (TG_WAL_RECORD_OVERHEAD + p[0].len), p, wr->n) != 0)
    wr->failed = 1;
  free(p);
  atomic_store(&wr->done, 1);
}

TEST(reads_while_the_gateway_writes) {
  site_t s;
  site_init(&s, "live");
  writer_t wr = {.s = &s, .n = 600};
  uv_thread_t t;
  CHECK_INT(uv_thread_create(&t, write_while_read, &wr), 0);
  int runs = 0, bad = 0;
  char why[256] = "";
  while (!atomic_load(&wr.done) && !bad) {
    result_t r = run("ls", "-c", s.conf, NULL);
    runs++;
    if (r.status != 0) {
      snprintf(why, sizeof why, "ls: %d %s", r.status, r.err);
      bad = 1;
      break;
    }
    if (strncmp(r.out, "no log yet", 10) == 0) /* before the first record */
      continue;
    unsigned long long first, records, bytes, prev_first = 0, prev_records = 0, sum = 0, total = 0;
    const char *line = strchr(r.out, '\n');
    for (; line != NULL && sscanf(line + 1, "%*s %llu %llu %llu", &first, &records, &bytes) == 3;
         line = strchr(line + 1, '\n')) {
      if (prev_first != 0 && prev_first + prev_records != first) {
        snprintf(why, sizeof why, "segment %llu holds %llu records, the next starts at %llu", prev_first,
                 prev_records, first);
        bad = 1;
      }
      prev_first = first;
      prev_records = records;
      sum += records;
    }
    const char *tl = strstr(r.out, "total: ");
    if (tl == NULL || sscanf(tl, "total: %*s segment%*s %llu", &total) != 1 || total != sum) {
      snprintf(why, sizeof why, "total %llu, the segments hold %llu", total, sum);
      bad = 1;
    }
    r = run("cat", "-c", s.conf, NULL);
    json_t *a = lines_of(r.out);
    for (size_t i = 0; a != NULL && i < json_array_size(a); i++)
      if (json_integer_value(json_object_get(json_array_get(a, i), "seq")) != (json_int_t)i + 1) {
        snprintf(why, sizeof why, "cat: line %zu is not record %zu", i, i + 1);
        bad = 1;
      }
    if (r.status != 0 || a == NULL) {
      snprintf(why, sizeof why, "cat: %d %s", r.status, r.err);
      bad = 1;
    }
    json_decref(a);
  }
  uv_thread_join(&t);
  if (bad)
    fprintf(stderr, "  after %d runs: %s\n", runs, why);
  CHECK(!bad);
  CHECK(!wr.failed);
  CHECK(runs > 0);
  result_t r = run("verify", "-c", s.conf, NULL);
  CHECK_INT(r.status, 0);
  CHECK(strncmp(r.out, "ok: 200 segments, 600 records, ", 31) == 0);
}

TEST(a_segment_being_made_is_a_warning_a_misnamed_one_damage) {
  site_t s;
  int bad = 0;
  write_six(&s, "making", &bad);
  CHECK(!bad);
  /* The gateway rotating: the next segment exists, its header not yet written. */
  char path[1200];
  snprintf(path, sizeof path, "%s/00000000000000000007.wal", s.wal);
  int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0640);
  CHECK(fd >= 0);
  CHECK_INT(write(fd, "TGWAL", 5), 5);
  close(fd);
  result_t r = run("ls", "-c", s.conf, NULL);
  CHECK_INT(r.status, 0);
  CHECK(strstr(r.out, "total: 2 segments, 6 records") != NULL);
  CHECK(strstr(r.err, "warning") != NULL);
  CHECK_STR(seqs_of(run("cat", "-c", s.conf, NULL).out), "1,2,3,4,5,6");
  r = run("verify", "-c", s.conf, NULL);
  CHECK_INT(r.status, 1);
  CHECK(strstr(r.err, "00000000000000000007.wal: offset 0") != NULL);
  CHECK(strstr(r.err, "running gateway may be writing it") != NULL);
  CHECK_INT(file_size(path), 5);

  /* A whole segment whose header does not match its name: damage. */
  CHECK_INT(unlink(path), 0);
  char from[1200];
  snprintf(from, sizeof from, "%s/00000000000000000004.wal", s.wal);
  snprintf(path, sizeof path, "%s/00000000000000000005.wal", s.wal);
  CHECK_INT(rename(from, path), 0);
  r = run("ls", "-c", s.conf, NULL);
  CHECK_INT(r.status, 1);
  CHECK(strstr(r.err, "warning") == NULL);
  CHECK(strstr(r.err, "00000000000000000005.wal: offset 0") != NULL);
  r = run("verify", "-c", s.conf, NULL);
  CHECK_INT(r.status, 1);
  CHECK(strstr(r.err, "running gateway") == NULL);
}

TEST(a_log_whose_first_segments_were_removed) {
  site_t s;
  int bad = 0;
  write_six(&s, "retained", &bad);
  CHECK(!bad);
  char path[1200];
  snprintf(path, sizeof path, "%s/" SEG1, s.wal);
  CHECK_INT(unlink(path), 0); /* covered by a snapshot: retention took it */
  result_t r = run("ls", "-c", s.conf, NULL);
  CHECK_INT(r.status, 0);
  CHECK(strstr(r.out, "total: 1 segment, 3 records") != NULL);
  CHECK(strstr(r.out, SEG1) == NULL);
  CHECK_INT(run("verify", "-c", s.conf, NULL).status, 0);
  CHECK_STR(seqs_of(run("cat", "-c", s.conf, NULL).out), "4,5,6");
}

/* Removes the oldest segment whenever there are more than five, as retention
 * does, until told to stop. */
typedef struct remover {
  const char *dir;
  atomic_int stop;
  int removed;
} remover_t;

static void remove_oldest(void *arg) {
  remover_t *rm = arg;
  while (!atomic_load(&rm->stop)) {
    DIR *d = opendir(rm->dir);
    char oldest[256] = "";
    int n = 0;
    struct dirent *de;
    while (d != NULL && (de = readdir(d)) != NULL)
      if (strlen(de->d_name) == 24 && strstr(de->d_name, ".wal") != NULL) {
        n++;
        if (oldest[0] == '\0' || strcmp(de->d_name, oldest) < 0)
          snprintf(oldest, sizeof oldest, "%s", de->d_name);
      }
    if (d != NULL)
      closedir(d);
    char path[1200];
    snprintf(path, sizeof path, "%s/%s", rm->dir, oldest);
    if (n > 5 && unlink(path) == 0)
      rm->removed++;
    usleep(500);
  }
}

TEST(reads_while_retention_removes_segments) {
  site_t s;
  site_init(&s, "retention");
  writer_t wr = {.s = &s, .n = 600};
  remover_t rm = {.dir = s.wal};
  uv_thread_t tw, tr;
  CHECK_INT(uv_thread_create(&tw, write_while_read, &wr), 0);
  CHECK_INT(uv_thread_create(&tr, remove_oldest, &rm), 0);
  int runs = 0, raced = 0, bad = 0;
  char why[512] = "";
  while (!atomic_load(&wr.done) && !bad) {
    result_t r = run("ls", "-c", s.conf, NULL);
    runs++;
    if (strncmp(r.out, "no log yet", 10) == 0)
      continue;
    if (r.status != 0) {
      /* Only a segment removed under every attempt may fail it, and it says so. */
      if (strstr(r.err, "retention") == NULL) {
        snprintf(why, sizeof why, "ls: %d %s", r.status, r.err);
        bad = 1;
      }
      raced++;
      continue;
    }
    unsigned long long first, records, bytes, prev_first = 0, prev_records = 0;
    for (const char *line = strchr(r.out, '\n');
         line != NULL && sscanf(line + 1, "%*s %llu %llu %llu", &first, &records, &bytes) == 3;
         line = strchr(line + 1, '\n')) {
      if (prev_first != 0 && prev_first + prev_records != first) {
        snprintf(why, sizeof why, "segment %llu holds %llu records, the next starts at %llu\n%s", prev_first,
                 prev_records, first, r.out);
        bad = 1;
      }
      prev_first = first;
      prev_records = records;
    }
    r = run("cat", "-c", s.conf, NULL);
    if (r.status != 0) {
      if (strstr(r.err, "retention") == NULL) {
        snprintf(why, sizeof why, "cat: %d %s", r.status, r.err);
        bad = 1;
      }
      raced++;
      continue;
    }
    json_t *a = lines_of(r.out);
    json_int_t first_seq = json_integer_value(json_object_get(json_array_get(a, 0), "seq"));
    for (size_t i = 0; a != NULL && i < json_array_size(a); i++)
      if (json_integer_value(json_object_get(json_array_get(a, i), "seq")) != first_seq + (json_int_t)i) {
        snprintf(why, sizeof why, "cat: line %zu is not record %lld", i, (long long)(first_seq + i));
        bad = 1;
      }
    json_decref(a);
  }
  uv_thread_join(&tw);
  atomic_store(&rm.stop, 1);
  uv_thread_join(&tr);
  if (bad)
    fprintf(stderr, "  after %d runs: %s\n", runs, why);
  CHECK(!bad);
  CHECK(!wr.failed);
  CHECK(rm.removed > 0);
  CHECK(raced < runs);
  CHECK_INT(run("verify", "-c", s.conf, NULL).status, 0);
}

/* Settlement records (pay/settleq.h): every field but the signed body, the state by name. */
static payload_t settlement(int64_t at, const char *id, uint32_t state, const char *tenant) {
  Ledger__V1__Settlement s = LEDGER__V1__SETTLEMENT__INIT;
  static uint8_t nonce[32];
  for (int i = 0; i < 32; i++)
    nonce[i] = (uint8_t)i;
  s.id = (char *)id;
  s.tenant = (char *)tenant;
  s.network = "eip155:84532";
  s.scheme = "exact";
  s.asset = "0x036CbD53842c5426634e7929541eC2318f3dCF7e";
  s.payer = "0x857b06519E91e3A54538791bDbb0E22373e36b66";
  s.amount = "123456789012345678901234567890"; /* past int64 */
  s.valid_before = 1796551260;
  s.request_id = "req-7";
  s.state = state;
  s.attempts = state == 1 ? 0 : 1;
  if (state == 1) {
    static const char body[] = "{\"paymentPayload\":{\"signature\":\"0xSIGNATURE_SECRET\"}}";
    s.request.data = (uint8_t *)body;
    s.request.len = sizeof body - 1;
    s.nonce.data = nonce;
    s.nonce.len = 32;
  }
  if (state == 5) {
    s.error = "facilitator timed out";
    s.next_attempt_unix_ms = at + 2000;
  }
  if (state == 3) {
    s.transaction = "0xabcdef";
    s.facilitator = "http://127.0.0.1:4021";
  }
  Ledger__V1__Record r = LEDGER__V1__RECORD__INIT;
  r.at_unix_ms = at;
  r.instance = "gw-1";
  r.kind_case = LEDGER__V1__RECORD__KIND_SETTLEMENT;
  r.settlement = &s;
  return pack(&r);
}

TEST(cat_prints_settlements) {
  site_t s;
  site_init(&s, "settle");
  const char *id = "st_00112233445566778899aabbccddeeff";
  payload_t p[] = {
      settlement(T0_MS, id, 1, "news"),        settlement(T0_MS + 1, id, 2, "news"),
      settlement(T0_MS + 2, id, 5, "news"),    settlement(T0_MS + 3, id, 3, "news"),
      settlement(T0_MS + 4, "st_x", 99, "blog"), /* a state a newer gateway wrote */
  };
  CHECK_INT(write_log(&s, 0, p, 5), 0);
  result_t r = run("cat", "-c", s.conf, NULL);
  CHECK_INT(r.status, 0);
  CHECK_STR(r.err, "");
  json_t *a = lines_of(r.out);
  CHECK(a != NULL);
  CHECK_INT(json_array_size(a), 5);
  const char *states[] = {"pending", "attempt", "retry", "settled"};
  for (size_t i = 0; i < 4; i++) {
    json_t *j = json_array_get(a, i);
    CHECK_STR(jstr(j, "kind"), "settlement");
    CHECK_STR(jstr(j, "settlement.id"), id);
    CHECK_STR(jstr(j, "settlement.state"), states[i]);
    CHECK_STR(jstr(j, "settlement.tenant"), "news");
    CHECK_STR(jstr(j, "settlement.amount"), "123456789012345678901234567890");
  }
  json_t *pending = json_object_get(json_array_get(a, 0), "settlement");
  CHECK_STR(jstr(pending, "nonce"), "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f");
  CHECK_STR(jstr(pending, "scheme"), "exact");
  CHECK_STR(jstr(pending, "request_id"), "req-7");
  CHECK_INT(json_integer_value(json_object_get(pending, "valid_before")), 1796551260);
  CHECK_INT(json_integer_value(json_object_get(json_object_get(pending, "request"), "bytes")), 53);
  CHECK_INT(json_integer_value(json_object_get(pending, "attempts")), 0);
  json_t *retry = json_object_get(json_array_get(a, 2), "settlement");
  CHECK_STR(jstr(retry, "error"), "facilitator timed out");
  CHECK_STR(jstr(retry, "next_attempt"), "2026-12-06T10:00:02.002Z");
  CHECK_STR(jstr(json_array_get(a, 3), "settlement.transaction"), "0xabcdef");
  CHECK_STR(jstr(json_array_get(a, 3), "settlement.facilitator"), "http://127.0.0.1:4021");
  json_t *future = json_object_get(json_array_get(a, 4), "settlement");
  CHECK(json_is_integer(json_object_get(future, "state")));
  CHECK_INT(json_integer_value(json_object_get(future, "state")), 99);
  json_decref(a);
  CHECK(strstr(r.out, "SIGNATURE_SECRET") == NULL); /* the signed body stays in the log */
  CHECK_STR(seqs_of(run("cat", "-c", s.conf, "--tenant", "blog", NULL).out), "5");
  CHECK_INT(run("verify", "-c", s.conf, NULL).status, 0);
}

/* ---- log shipping: what is shipped and what is pending */

/* The fixture's configuration with ledger.ship on (a Redis that is never asked). */
static void ship_config(site_t *s, const char *name) {
  char file[64], src[512];
  snprintf(file, sizeof file, "%s-ship.conf", name);
  snprintf(src, sizeof src,
           "return {\n  listen = { { host = \"127.0.0.1\", port = 8080 } },\n  data_dir = \"%s\",\n"
           "  redis = { host = \"127.0.0.1\", port = 1 },\n  ledger = { ship = { store = \"redis\" } },\n}\n",
           name);
  snprintf(s->conf, sizeof s->conf, "%s", tmp_write(file, src));
}

static void write_ckpt(const site_t *s, const char *text) {
  char path[1200];
  snprintf(path, sizeof path, "%s/ship.ckpt", s->data_dir);
  FILE *f = fopen(path, "w");
  if (f) {
    fputs(text, f);
    fclose(f);
  }
}

TEST(shipping_without_a_checkpoint_is_all_pending) {
  site_t s;
  tg_wal_recovery_t rec;
  int bad = 0;
  write_fixture(&s, "ship0", &rec, &bad);
  CHECK(!bad);
  /* Not configured, no checkpoint: nothing said of shipping. */
  CHECK(strstr(run("ls", "-c", s.conf, NULL).out, "shipped") == NULL);
  CHECK(strstr(run("cat", "-c", s.conf, NULL).out, "\"shipped\"") == NULL);
  ship_config(&s, "ship0");
  result_t r = run("ls", "-c", s.conf, NULL);
  CHECK_INT(r.status, 0);
  CHECK_STR(r.err, "");
  CHECK(strstr(r.out, "bytes\nshipped through seq 0, 5 records pending\n") != NULL);
  r = run("verify", "-c", s.conf, NULL);
  CHECK_INT(r.status, 0);
  CHECK(strstr(r.out, "shipped through seq 0, 5 records pending\n") != NULL);
  json_t *a = lines_of(run("cat", "-c", s.conf, NULL).out);
  CHECK(a != NULL);
  CHECK_INT(json_array_size(a), 5);
  for (size_t i = 0; i < json_array_size(a); i++)
    CHECK(json_is_false(json_object_get(json_array_get(a, i), "shipped")));
  json_decref(a);
}

TEST(shipping_checkpoint_splits_shipped_from_pending) {
  site_t s;
  tg_wal_recovery_t rec;
  int bad = 0;
  write_fixture(&s, "ship3", &rec, &bad);
  CHECK(!bad);
  write_ckpt(&s, "3\n");
  /* A checkpoint is shown even when shipping is no longer configured. */
  result_t r = run("ls", "-c", s.conf, NULL);
  CHECK_INT(r.status, 0);
  CHECK(strstr(r.out, "shipped through seq 3, 2 records pending\n") != NULL);
  ship_config(&s, "ship3");
  r = run("verify", "-c", s.conf, NULL);
  CHECK_INT(r.status, 0);
  CHECK(strstr(r.out, "shipped through seq 3, 2 records pending\n") != NULL);
  json_t *a = lines_of(run("cat", "-c", s.conf, NULL).out);
  CHECK(a != NULL);
  CHECK_INT(json_array_size(a), 5);
  for (size_t i = 0; i < json_array_size(a); i++) {
    json_t *j = json_array_get(a, i);
    json_int_t seq = json_integer_value(json_object_get(j, "seq"));
    CHECK(json_is_boolean(json_object_get(j, "shipped")));
    CHECK(json_is_true(json_object_get(j, "shipped")) == (seq <= 3));
  }
  json_decref(a);
  /* Filters keep the field. */
  CHECK(strstr(run("cat", "-c", s.conf, "--tx", "tx_2", NULL).out, "\"shipped\":false") != NULL);
  write_ckpt(&s, "5\n");
  CHECK(strstr(run("ls", "-c", s.conf, NULL).out, "shipped through seq 5, 0 records pending\n") != NULL);
  write_ckpt(&s, "4");
  CHECK(strstr(run("ls", "-c", s.conf, NULL).out, "shipped through seq 4, 1 record pending\n") != NULL);
}

TEST(shipping_checkpoint_that_does_not_read_is_a_warning) {
  site_t s;
  tg_wal_recovery_t rec;
  int bad = 0;
  write_fixture(&s, "shipbad", &rec, &bad);
  CHECK(!bad);
  ship_config(&s, "shipbad");
  const char *bad_ckpts[] = {"abc\n", "", "12x\n", "99999999999999999999999\n"};
  for (size_t i = 0; i < sizeof bad_ckpts / sizeof bad_ckpts[0]; i++) {
    write_ckpt(&s, bad_ckpts[i]);
    result_t r = run("ls", "-c", s.conf, NULL);
    CHECK_INT(r.status, 0);
    CHECK(strstr(r.out, "shipped") == NULL);
    CHECK(strstr(r.err, "ship.ckpt: not a sequence number") != NULL);
    CHECK(strstr(r.out, "total: ") != NULL); /* the rest as usual */
  }
}
