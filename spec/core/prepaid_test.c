#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include "base/crc32c.h"
#include "ledger/prepaid.h"
#include "ledger/v1/ledger.pb-c.h"
#include "ledger/wal.h"
#include "test.h"
#include "tmpfiles.h"

#define CREDIT LEDGER__V1__LEDGER_CHANGE_KIND__LEDGER_CHANGE_KIND_CREDIT
#define DEBIT LEDGER__V1__LEDGER_CHANGE_KIND__LEDGER_CHANGE_KIND_DEBIT
#define CAPTURE LEDGER__V1__LEDGER_CHANGE_KIND__LEDGER_CHANGE_KIND_CAPTURE
#define APPROVED LEDGER__V1__TRANSACTION_OUTCOME__TRANSACTION_OUTCOME_APPROVED
#define DEFERRED LEDGER__V1__TRANSACTION_OUTCOME__TRANSACTION_OUTCOME_DEFERRED
#define SIGN_FAILED LEDGER__V1__TRANSACTION_OUTCOME__TRANSACTION_OUTCOME_SIGN_FAILED

/* One encoded ledger.v1.Record. */
typedef struct {
  uint8_t b[2048];
  size_t n;
} rec_t;

static rec_t pack(Ledger__V1__Record *r) {
  rec_t out;
  r->at_unix_ms = 1700000000000;
  r->instance = "test";
  out.n = ledger__v1__record__get_packed_size(r);
  if (out.n > sizeof out.b)
    abort();
  ledger__v1__record__pack(r, out.b);
  return out;
}

static rec_t change(Ledger__V1__LedgerChangeKind kind, const char *ref, const char *cur, int64_t amount,
                    const char *reference) {
  Ledger__V1__LedgerChange c = LEDGER__V1__LEDGER_CHANGE__INIT;
  c.kind = kind;
  c.billing_reference = (char *)ref;
  c.currency = (char *)cur;
  c.amount = amount;
  c.reference = (char *)reference;
  Ledger__V1__Record r = LEDGER__V1__RECORD__INIT;
  r.kind_case = LEDGER__V1__RECORD__KIND_LEDGER_CHANGE;
  r.ledger_change = &c;
  return pack(&r);
}

static rec_t credit(const char *ref, const char *cur, int64_t amount, const char *reference) {
  return change(CREDIT, ref, cur, amount, reference);
}

/* A transaction on ref with up to two totals (cur2 NULL: one). */
static rec_t tx(Ledger__V1__TransactionOutcome outcome, const char *billing_type, const char *ref,
                const char *cur1, int64_t a1, const char *cur2, int64_t a2) {
  Ledger__V1__Amount t1 = LEDGER__V1__AMOUNT__INIT, t2 = LEDGER__V1__AMOUNT__INIT;
  t1.currency = (char *)cur1;
  t1.amount = a1;
  t2.currency = (char *)(cur2 ? cur2 : "");
  t2.amount = a2;
  Ledger__V1__Amount *totals[2] = {&t1, &t2};
  Ledger__V1__Transaction t = LEDGER__V1__TRANSACTION__INIT;
  t.id = "tx_1";
  t.outcome = outcome;
  t.billing_reference = (char *)ref;
  t.billing_type = (char *)billing_type;
  t.n_totals = cur2 ? 2 : 1;
  t.totals = totals;
  Ledger__V1__Record r = LEDGER__V1__RECORD__INIT;
  r.kind_case = LEDGER__V1__RECORD__KIND_TRANSACTION;
  r.transaction = &t;
  return pack(&r);
}

static rec_t approved(const char *ref, const char *cur, int64_t amount) {
  return tx(APPROVED, "builtin", ref, cur, amount, NULL, 0);
}

static int apply(tg_prepaid_t *p, uint64_t seq, rec_t r) {
  return tg_prepaid_apply(p, seq, r.b, r.n);
}

static int64_t bal(tg_prepaid_t *p, const char *ref, const char *cur) {
  int64_t b = -999, h = -999;
  if (tg_prepaid_balance(p, ref, cur, &b, &h) != 0)
    return -12345;
  return b;
}

static int64_t held(tg_prepaid_t *p, const char *ref, const char *cur) {
  int64_t h = -999;
  if (tg_prepaid_balance(p, ref, cur, NULL, &h) != 0)
    return -12345;
  return h;
}

TEST(hold_release_capture) {
  tg_prepaid_t *p = tg_prepaid_new();
  CHECK(p != NULL);
  CHECK_INT(apply(p, 1, credit("acct-1", "USD", 1000, "")), 0);
  uint64_t h1 = 0, h2 = 0, h3 = 0;
  int64_t avail = -1;
  CHECK_INT(tg_prepaid_hold(p, "acct-1", "USD", 300, &h1, &avail), 0);
  CHECK(h1 != 0);
  CHECK_INT(avail, 700);
  CHECK_INT(tg_prepaid_hold(p, "acct-1", "USD", 800, &h2, &avail), -ENOSPC);
  CHECK_INT(avail, 700);
  CHECK_INT(held(p, "acct-1", "USD"), 300);
  CHECK_INT(tg_prepaid_release(p, h1), 0);
  CHECK_INT(held(p, "acct-1", "USD"), 0);
  CHECK_INT(tg_prepaid_release(p, h1), -ENOENT); /* no double effect */
  CHECK_INT(tg_prepaid_capture(p, h1), -ENOENT);
  CHECK_INT(held(p, "acct-1", "USD"), 0);

  /* The whole balance: held, then charged by the durable record, then captured. */
  CHECK_INT(tg_prepaid_hold(p, "acct-1", "USD", 1000, &h2, &avail), 0);
  CHECK_INT(avail, 0);
  CHECK(h2 != h1);
  CHECK_INT(tg_prepaid_hold(p, "acct-1", "USD", 1, &h3, &avail), -ENOSPC);
  CHECK_INT(avail, 0);
  CHECK_INT(apply(p, 2, approved("acct-1", "USD", 1000)), 0);
  CHECK_INT(bal(p, "acct-1", "USD"), 0);
  CHECK_INT(held(p, "acct-1", "USD"), 1000); /* counted twice until the capture: conservative */
  CHECK_INT(tg_prepaid_hold(p, "acct-1", "USD", 1, &h3, &avail), -ENOSPC);
  CHECK_INT(avail, -1000);
  CHECK_INT(tg_prepaid_capture(p, h2), 0);
  CHECK_INT(tg_prepaid_capture(p, h2), -ENOENT);
  CHECK_INT(tg_prepaid_release(p, h2), -ENOENT);
  CHECK_INT(bal(p, "acct-1", "USD"), 0);
  CHECK_INT(held(p, "acct-1", "USD"), 0);
  CHECK_INT(tg_prepaid_capture(p, 0), -ENOENT);
  CHECK_INT(tg_prepaid_capture(p, 987654321), -ENOENT);
  tg_prepaid_free(p);
}

TEST(zero_amount_unknown_account_and_bad_arguments) {
  tg_prepaid_t *p = tg_prepaid_new();
  uint64_t h = 0, h2 = 0;
  int64_t avail = -1;
  CHECK_INT(tg_prepaid_hold(p, "nobody", "USD", 1, &h, &avail), -ENOSPC);
  CHECK_INT(avail, 0);
  CHECK_INT(tg_prepaid_balance(p, "nobody", "USD", NULL, NULL), -ENOENT);
  CHECK_INT(tg_prepaid_hold(p, "nobody", "USD", 0, &h, &avail), 0); /* a hold of 0 always succeeds */
  CHECK(h != 0);
  CHECK_INT(avail, 0);
  CHECK_INT(tg_prepaid_balance(p, "nobody", "USD", NULL, NULL), -ENOENT); /* made no account */
  CHECK_INT(tg_prepaid_capture(p, h), 0);
  CHECK_INT(tg_prepaid_capture(p, h), -ENOENT);

  CHECK_INT(apply(p, 1, credit("acct", "USD", 10, "")), 0);
  CHECK_INT(tg_prepaid_hold(p, "acct", "USD", 10, &h, NULL), 0);
  CHECK_INT(tg_prepaid_hold(p, "acct", "USD", 0, &h2, &avail), 0); /* even with nothing available */
  CHECK_INT(avail, 0);
  CHECK_INT(tg_prepaid_release(p, h2), 0);
  CHECK_INT(held(p, "acct", "USD"), 10);

  char ref256[257], ref257[258];
  memset(ref256, 'r', 256);
  ref256[256] = '\0';
  memset(ref257, 'r', 257);
  ref257[257] = '\0';
  CHECK_INT(tg_prepaid_hold(p, "acct", "USD", -1, &h, NULL), -EINVAL);
  CHECK_INT(tg_prepaid_hold(p, "", "USD", 1, &h, NULL), -EINVAL);
  CHECK_INT(tg_prepaid_hold(p, NULL, "USD", 1, &h, NULL), -EINVAL);
  CHECK_INT(tg_prepaid_hold(p, ref257, "USD", 1, &h, NULL), -EINVAL);
  CHECK_INT(tg_prepaid_hold(p, ref256, "USD", 1, &h, NULL), -ENOSPC);
  CHECK_INT(tg_prepaid_hold(p, "acct", "", 1, &h, NULL), -EINVAL);
  CHECK_INT(tg_prepaid_hold(p, "acct", "US D", 1, &h, NULL), -EINVAL);
  CHECK_INT(tg_prepaid_hold(p, "acct", "usd-x", 1, &h, NULL), -EINVAL);
  CHECK_INT(tg_prepaid_hold(p, "acct", "ABCDEFGHIJKLMNOPQ", 1, &h, NULL), -EINVAL); /* 17 */
  CHECK_INT(tg_prepaid_hold(p, "acct", "ABCDEFGHIJKLMNOP", 1, &h, NULL), -ENOSPC);  /* 16 */
  CHECK_INT(tg_prepaid_hold(p, "acct", "USD", 1, NULL, NULL), -EINVAL);
  CHECK_INT(tg_prepaid_hold(p, "acct", "usd", 1, &h, NULL), -ENOSPC); /* another account */
  CHECK_INT(tg_prepaid_balance(p, "acct", "U$D", NULL, NULL), -EINVAL);
  tg_prepaid_free(p);
}

TEST(apply_records) {
  quiet_logs();
  tg_prepaid_t *p = tg_prepaid_new();
  CHECK_INT(tg_prepaid_last_seq(p), 0);
  CHECK_INT(apply(p, 1, credit("a", "USD", 5000, "top-1")), 0);
  CHECK_INT(apply(p, 2, credit("a", "EUR", 700, "top-2")), 0);
  CHECK_INT(apply(p, 3, tx(APPROVED, "builtin", "a", "USD", 1200, "EUR", 200)), 0);
  CHECK_INT(bal(p, "a", "USD"), 3800);
  CHECK_INT(bal(p, "a", "EUR"), 500);
  CHECK_INT(apply(p, 4, tx(APPROVED, "", "a", "USD", 800, NULL, 0)), 0); /* no billing type: ours */
  CHECK_INT(bal(p, "a", "USD"), 3000);
  /* No balance change: */
  CHECK_INT(apply(p, 5, tx(DEFERRED, "builtin", "a", "USD", 100, NULL, 0)), 0);
  CHECK_INT(apply(p, 6, tx(SIGN_FAILED, "builtin", "a", "USD", 100, NULL, 0)), 0);
  CHECK_INT(apply(p, 7, tx(APPROVED, "connect", "a", "USD", 100, NULL, 0)), 0);
  CHECK_INT(apply(p, 8, change(CAPTURE, "a", "USD", 100, "")), 0);
  CHECK_INT(apply(p, 9, tx(APPROVED, "builtin", "a", "USD", -100, NULL, 0)), 0); /* skipped */
  CHECK_INT(apply(p, 10, credit("a", "USD", -5, "")), 0);
  CHECK_INT(apply(p, 11, credit("a", "US D", 5, "")), 0);
  Ledger__V1__UsageReport u = LEDGER__V1__USAGE_REPORT__INIT;
  Ledger__V1__Record r = LEDGER__V1__RECORD__INIT;
  r.kind_case = LEDGER__V1__RECORD__KIND_USAGE_REPORT;
  r.usage_report = &u;
  CHECK_INT(apply(p, 12, pack(&r)), 0);
  Ledger__V1__Record empty = LEDGER__V1__RECORD__INIT; /* a kind this build does not know */
  CHECK_INT(apply(p, 13, pack(&empty)), 0);
  CHECK_INT(bal(p, "a", "USD"), 3000);
  CHECK_INT(bal(p, "a", "EUR"), 500);
  CHECK_INT(tg_prepaid_balance(p, "a", "USD", NULL, NULL), 0);
  CHECK_INT(tg_prepaid_balance(p, "a", "usd", NULL, NULL), -ENOENT);
  CHECK_INT(tg_prepaid_last_seq(p), 13);

  /* A sequence at or below the last applied changes nothing. */
  CHECK_INT(apply(p, 13, credit("a", "USD", 1, "")), 0);
  CHECK_INT(apply(p, 2, approved("a", "USD", 1)), 0);
  CHECK_INT(bal(p, "a", "USD"), 3000);
  CHECK_INT(tg_prepaid_last_seq(p), 13);

  /* A payload that does not decode. */
  CHECK_INT(tg_prepaid_apply(p, 14, "\xff\xff\xff\xff", 4), -EBADMSG);
  CHECK_INT(tg_prepaid_wal_cb(p, 15, "\x52\x05\x0a", 3), -EBADMSG); /* truncated field */
  CHECK_INT(bal(p, "a", "USD"), 3000);
  CHECK_INT(tg_prepaid_last_seq(p), 15);

  /* Debits: an operator correction, and a charge the hold did not cover. */
  CHECK_INT(apply(p, 16, change(DEBIT, "a", "USD", 4000, "fix-1")), 0);
  CHECK_INT(bal(p, "a", "USD"), -1000);
  CHECK_INT(apply(p, 17, approved("new", "USD", 5)), 0);
  CHECK_INT(bal(p, "new", "USD"), -5);
  /* int64 limits clamp. */
  CHECK_INT(apply(p, 18, credit("big", "USD", INT64_MAX, "")), 0);
  CHECK_INT(apply(p, 19, credit("big", "USD", INT64_MAX, "")), 0);
  CHECK(bal(p, "big", "USD") == INT64_MAX);
  tg_prepaid_free(p);
}

TEST(credit_idempotent_on_reference) {
  tg_prepaid_t *p = tg_prepaid_new();
  int64_t after = 0;
  CHECK_INT(tg_prepaid_credit_check(p, "a", "USD", 100, "inv-1", &after), 0);
  CHECK_INT(after, 100);
  CHECK_INT(apply(p, 1, credit("a", "USD", 100, "inv-1")), 0);
  CHECK_INT(tg_prepaid_credit_check(p, "a", "USD", 100, "inv-1", &after), -EALREADY);
  CHECK_INT(after, 100);
  CHECK_INT(apply(p, 2, credit("a", "USD", 100, "inv-1")), 0); /* slipped through: still ignored */
  CHECK_INT(bal(p, "a", "USD"), 100);
  CHECK_INT(apply(p, 3, credit("a", "USD", 50, "inv-2")), 0);
  CHECK_INT(apply(p, 4, credit("a", "USD", 25, "")), 0); /* no reference: no idempotency */
  CHECK_INT(apply(p, 5, credit("a", "USD", 25, "")), 0);
  CHECK_INT(bal(p, "a", "USD"), 200);
  CHECK_INT(tg_prepaid_credit_check(p, "a", "USD", 10, NULL, &after), 0);
  CHECK_INT(after, 210);
  CHECK_INT(tg_prepaid_credit_check(p, "a", "USD", 10, "", &after), 0);
  /* Debits keep their own set: a correction may name the top-up it corrects. */
  CHECK_INT(apply(p, 6, change(DEBIT, "a", "USD", 30, "inv-1")), 0);
  CHECK_INT(apply(p, 7, change(DEBIT, "a", "USD", 30, "inv-1")), 0);
  CHECK_INT(bal(p, "a", "USD"), 170);
  CHECK_INT(tg_prepaid_credit_check(p, "a", "USD", 1, "inv-1", &after), -EALREADY);
  /* Limits. */
  CHECK_INT(tg_prepaid_credit_check(p, "a", "USD", 0, "x", &after), -EINVAL);
  CHECK_INT(tg_prepaid_credit_check(p, "a", "USD", -1, "x", &after), -EINVAL);
  CHECK_INT(tg_prepaid_credit_check(p, "", "USD", 1, "x", &after), -EINVAL);
  CHECK_INT(tg_prepaid_credit_check(p, "a", "U.S", 1, "x", &after), -EINVAL);
  CHECK_INT(tg_prepaid_credit_check(p, "a", "USD", INT64_MAX, "x", &after), -EOVERFLOW);
  CHECK_INT(tg_prepaid_credit_check(p, "a", "USD", TG_PREPAID_MAX_CREDIT_BALANCE - 170 + 1, "x", &after),
            -EOVERFLOW);
  CHECK_INT(tg_prepaid_credit_check(p, "a", "USD", TG_PREPAID_MAX_CREDIT_BALANCE - 170, "x", &after), 0);
  CHECK(after == TG_PREPAID_MAX_CREDIT_BALANCE);
  CHECK_INT(tg_prepaid_credit_check(p, "fresh", "USD", TG_PREPAID_MAX_CREDIT_BALANCE, NULL, &after), 0);
  tg_prepaid_free(p);
}

/* tg_prepaid_each into one sorted text, to compare ledgers. */
typedef struct {
  char lines[64][400];
  int n;
} listing_t;

static int add_line(void *arg, const char *ref, const char *cur, int64_t balance, int64_t h) {
  listing_t *l = arg;
  if (l->n >= 64)
    return -1;
  snprintf(l->lines[l->n++], sizeof l->lines[0], "%s|%s|%" PRId64 "|%" PRId64, ref, cur, balance, h);
  return 0;
}

static int cmp_line(const void *a, const void *b) {
  return strcmp(a, b);
}

static void listing(tg_prepaid_t *p, char *out, size_t size) {
  static listing_t l;
  l.n = 0;
  out[0] = '\0';
  if (tg_prepaid_each(p, add_line, &l) != 0) {
    snprintf(out, size, "(each failed)");
    return;
  }
  qsort(l.lines, (size_t)l.n, sizeof l.lines[0], cmp_line);
  for (int i = 0; i < l.n; i++) {
    strncat(out, l.lines[i], size - strlen(out) - 1);
    strncat(out, "\n", size - strlen(out) - 1);
  }
}

static int stop_at_first(void *arg, const char *ref, const char *cur, int64_t balance, int64_t h) {
  (void)ref, (void)cur, (void)balance, (void)h;
  (*(int *)arg)++;
  return 7;
}

TEST(each_lists_every_account) {
  tg_prepaid_t *p = tg_prepaid_new();
  char out[4096];
  listing(p, out, sizeof out);
  CHECK_STR(out, "");
  char ref[32];
  for (int i = 0; i < 40; i++) {
    snprintf(ref, sizeof ref, "acct-%02d", i);
    CHECK_INT(apply(p, (uint64_t)i + 1, credit(ref, i % 2 ? "EUR" : "USD", 100 + i, "")), 0);
  }
  uint64_t h;
  CHECK_INT(tg_prepaid_hold(p, "acct-03", "EUR", 3, &h, NULL), 0);
  listing(p, out, sizeof out);
  CHECK(strncmp(out, "acct-00|USD|100|0\nacct-01|EUR|101|0\nacct-02|USD|102|0\nacct-03|EUR|103|3\n", 72) == 0);
  CHECK(strstr(out, "acct-39|EUR|139|0\n") != NULL);
  int lines = 0;
  for (const char *s = out; (s = strchr(s, '\n')) != NULL; s++)
    lines++;
  CHECK_INT(lines, 40);
  int calls = 0;
  CHECK_INT(tg_prepaid_each(p, stop_at_first, &calls), 7);
  CHECK_INT(calls, 1);
  tg_prepaid_free(p);
}

/* Four workers hold, charge (through apply, serialized as the WAL writer
 * would) or release, and capture, against one account at once. */
typedef struct {
  tg_prepaid_t *p;
  unsigned seed;
  int64_t charged;
  int ok, refused, bad;
} worker_t;

static pthread_mutex_t writer_mu = PTHREAD_MUTEX_INITIALIZER;
static uint64_t writer_seq;

static void *worker_main(void *arg) {
  worker_t *w = arg;
  for (int i = 0; i < 3000; i++) {
    int64_t amount = 1 + rand_r(&w->seed) % 13, avail = 0, b = 0, h = 0;
    uint64_t id = 0;
    int r = tg_prepaid_hold(w->p, "shared", "USD", amount, &id, &avail);
    if (r == -ENOSPC) {
      w->refused++;
      continue;
    }
    if (r != 0 || avail < 0) {
      w->bad++;
      continue;
    }
    w->ok++;
    if (i % 4 == 0) {
      w->bad += tg_prepaid_release(w->p, id) != 0;
    } else {
      pthread_mutex_lock(&writer_mu);
      w->bad += apply(w->p, ++writer_seq, approved("shared", "USD", amount)) != 0;
      pthread_mutex_unlock(&writer_mu);
      w->charged += amount;
      w->bad += tg_prepaid_capture(w->p, id) != 0;
      w->bad += tg_prepaid_capture(w->p, id) != -ENOENT;
    }
    if (tg_prepaid_balance(w->p, "shared", "USD", &b, &h) != 0 || b < 0 || h < 0)
      w->bad++;
  }
  return NULL;
}

TEST(concurrent_holds_never_overspend) {
  tg_prepaid_t *p = tg_prepaid_new();
  enum { START = 20000 };
  writer_seq = 1;
  CHECK_INT(apply(p, 1, credit("shared", "USD", START, "")), 0);
  worker_t w[4];
  pthread_t th[4];
  double t0 = now_s();
  for (int i = 0; i < 4; i++) {
    w[i] = (worker_t){.p = p, .seed = 17u * (unsigned)i + 1};
    CHECK_INT(pthread_create(&th[i], NULL, worker_main, &w[i]), 0);
  }
  int64_t charged = 0;
  int ok = 0, refused = 0;
  for (int i = 0; i < 4; i++) {
    pthread_join(th[i], NULL);
    CHECK_INT(w[i].bad, 0);
    charged += w[i].charged;
    ok += w[i].ok;
    refused += w[i].refused;
  }
  fprintf(stderr, "  %d holds, %d refused, %" PRId64 " charged, %.3f s\n", ok, refused, charged,
          now_s() - t0);
  CHECK(refused > 0); /* the funds ran out: the race was on the limit */
  CHECK(charged > START - 13 * 4);
  CHECK_INT(bal(p, "shared", "USD"), START - charged);
  CHECK(bal(p, "shared", "USD") >= 0);
  CHECK_INT(held(p, "shared", "USD"), 0);
  tg_prepaid_free(p);
}

static long file_size(const char *path) {
  struct stat st;
  return stat(path, &st) == 0 ? (long)st.st_size : -1;
}

static void write_bytes(const char *path, const void *data, size_t n) {
  FILE *f = fopen(path, "wb");
  if (f == NULL || fwrite(data, 1, n, f) != n)
    abort();
  fclose(f);
}

static size_t read_bytes(const char *path, uint8_t *buf, size_t cap) {
  FILE *f = fopen(path, "rb");
  if (f == NULL)
    abort();
  size_t n = fread(buf, 1, cap, f);
  fclose(f);
  return n;
}

TEST(snapshot_round_trip_and_seq_skipping) {
  tg_prepaid_t *p = tg_prepaid_new();
  const char *path = tmp_path("ledger.snap");
  CHECK_INT(tg_prepaid_snapshot_due(p, 1), 0);
  CHECK_INT(apply(p, 1, credit("a", "USD", 1000, "t1")), 0);
  CHECK_INT(apply(p, 2, credit("b", "EUR", 50, "")), 0);
  CHECK_INT(apply(p, 3, approved("a", "USD", 300)), 0);
  CHECK_INT(apply(p, 4, change(DEBIT, "b", "EUR", 80, "")), 0);
  uint64_t h;
  CHECK_INT(tg_prepaid_hold(p, "a", "USD", 100, &h, NULL), 0); /* holds are not in the snapshot */
  CHECK_INT(tg_prepaid_snapshot_due(p, 4), 1);
  CHECK_INT(tg_prepaid_snapshot_due(p, 5), 0);
  CHECK_INT(tg_prepaid_snapshot_write(p, path), 0);
  CHECK_INT(tg_prepaid_snapshot_due(p, 1), 0);
  CHECK_INT(tg_prepaid_snapshot_due(p, 0), 0);
  char tmp[1100];
  snprintf(tmp, sizeof tmp, "%s.tmp", path);
  CHECK_INT(file_size(tmp), -1);

  uint8_t buf[4096];
  size_t n = read_bytes(path, buf, sizeof buf);
  CHECK(n > 16);
  CHECK(memcmp(buf, "TGSNAP01", 8) == 0);
  CHECK_INT(buf[8] | buf[9] << 8 | buf[10] << 16 | (uint32_t)buf[11] << 24, n - 16);
  Ledger__V1__Snapshot *s = ledger__v1__snapshot__unpack(NULL, n - 16, buf + 16);
  CHECK(s != NULL);
  CHECK_INT(s->wal_seq, 4);
  CHECK_INT(s->n_balances, 2);
  CHECK(s->at_unix_ms > 1700000000000);
  ledger__v1__snapshot__free_unpacked(s, NULL);

  tg_prepaid_t *q = tg_prepaid_new();
  uint64_t seq = 0;
  CHECK_INT(tg_prepaid_snapshot_load(q, path, &seq), 0);
  CHECK_INT(seq, 4);
  CHECK_INT(tg_prepaid_last_seq(q), 4);
  CHECK_INT(tg_prepaid_snapshot_due(q, 1), 0);
  CHECK_INT(bal(q, "a", "USD"), 700);
  CHECK_INT(held(q, "a", "USD"), 0);
  CHECK_INT(bal(q, "b", "EUR"), -30);
  /* Replaying the log from its start over the snapshot: 1..4 change nothing. */
  CHECK_INT(apply(q, 1, credit("a", "USD", 1000, "t1")), 0);
  CHECK_INT(apply(q, 2, credit("b", "EUR", 50, "")), 0);
  CHECK_INT(apply(q, 3, approved("a", "USD", 300)), 0);
  CHECK_INT(apply(q, 4, change(DEBIT, "b", "EUR", 80, "")), 0);
  CHECK_INT(bal(q, "a", "USD"), 700);
  CHECK_INT(bal(q, "b", "EUR"), -30);
  /* ... but the reference of record 1 is relearnt. */
  CHECK_INT(apply(q, 5, credit("a", "USD", 1000, "t1")), 0);
  CHECK_INT(bal(q, "a", "USD"), 700);
  CHECK_INT(apply(q, 6, approved("a", "USD", 200)), 0);
  CHECK_INT(bal(q, "a", "USD"), 500);
  CHECK_INT(tg_prepaid_snapshot_due(q, 2), 1);

  CHECK_INT(tg_prepaid_snapshot_load(q, path, &seq), -EBUSY); /* only into a fresh ledger */
  CHECK_INT(tg_prepaid_snapshot_load(p, path, &seq), -EBUSY);
  tg_prepaid_t *r = tg_prepaid_new();
  CHECK_INT(tg_prepaid_snapshot_load(r, tmp_path("missing.snap"), &seq), -ENOENT);
  CHECK_INT(tg_prepaid_snapshot_write(r, tmp_path("nodir/x.snap")), -ENOENT);
  /* An empty ledger round-trips too. */
  CHECK_INT(tg_prepaid_snapshot_write(r, tmp_path("empty.snap")), 0);
  tg_prepaid_t *e = tg_prepaid_new();
  CHECK_INT(tg_prepaid_snapshot_load(e, tmp_path("empty.snap"), &seq), 0);
  CHECK_INT(seq, 0);
  tg_prepaid_free(e);
  tg_prepaid_free(r);
  tg_prepaid_free(q);
  tg_prepaid_free(p);
}

/* A snapshot file around payload, with a correct frame. */
static void write_framed(const char *path, const uint8_t *payload, size_t n) {
  static uint8_t buf[8192];
  memcpy(buf, "TGSNAP01", 8);
  for (int i = 0; i < 4; i++) {
    buf[8 + i] = (uint8_t)(n >> (8 * i));
    buf[12 + i] = (uint8_t)(tg_crc32c(0, payload, n) >> (8 * i));
  }
  memcpy(buf + 16, payload, n);
  write_bytes(path, buf, 16 + n);
}

static size_t pack_snapshot(uint8_t *out, const char *ref1, const char *cur1, const char *ref2,
                            const char *cur2) {
  Ledger__V1__Balance b1 = LEDGER__V1__BALANCE__INIT, b2 = LEDGER__V1__BALANCE__INIT;
  b1.billing_reference = (char *)ref1;
  b1.currency = (char *)cur1;
  b1.balance = 10;
  b2.billing_reference = (char *)ref2;
  b2.currency = (char *)cur2;
  b2.balance = 20;
  Ledger__V1__Balance *v[2] = {&b1, &b2};
  Ledger__V1__Snapshot s = LEDGER__V1__SNAPSHOT__INIT;
  s.wal_seq = 9;
  s.n_balances = 2;
  s.balances = v;
  return ledger__v1__snapshot__pack(&s, out);
}

/* The ledger is untouched by a failed load, and still loads a good file. */
static int still_fresh(tg_prepaid_t *p) {
  return tg_prepaid_last_seq(p) == 0 && tg_prepaid_balance(p, "a", "USD", NULL, NULL) == -ENOENT;
}

TEST(damaged_snapshot_is_refused) {
  tg_prepaid_t *p = tg_prepaid_new();
  const char *good = tmp_path("good.snap"), *bad = tmp_path("bad.snap");
  CHECK_INT(apply(p, 1, credit("a", "USD", 1000, "")), 0);
  CHECK_INT(apply(p, 2, credit("b", "USD", 5, "")), 0);
  CHECK_INT(tg_prepaid_snapshot_write(p, good), 0);
  static uint8_t buf[4096];
  size_t n = read_bytes(good, buf, sizeof buf);
  tg_prepaid_t *q = tg_prepaid_new();
  uint64_t seq = 77;

  buf[n - 3] ^= 0x20; /* a flipped bit in the payload: CRC */
  write_bytes(bad, buf, n);
  CHECK_INT(tg_prepaid_snapshot_load(q, bad, &seq), -EBADMSG);
  buf[n - 3] ^= 0x20;
  buf[0] = 'X'; /* magic */
  write_bytes(bad, buf, n);
  CHECK_INT(tg_prepaid_snapshot_load(q, bad, &seq), -EBADMSG);
  buf[0] = 'T';
  write_bytes(bad, buf, n - 1); /* torn */
  CHECK_INT(tg_prepaid_snapshot_load(q, bad, &seq), -EBADMSG);
  CHECK_INT(tg_prepaid_snapshot_load(q, tmp_write("short.snap", "TGSNAP01\x05"), &seq), -EBADMSG);
  write_bytes(bad, "", 0);
  CHECK_INT(tg_prepaid_snapshot_load(q, bad, &seq), -EBADMSG);
  write_framed(bad, (const uint8_t *)"\xff\xff\xff", 3); /* good frame, not a protobuf */
  CHECK_INT(tg_prepaid_snapshot_load(q, bad, &seq), -EBADMSG);
  uint8_t pb[1024];
  write_framed(bad, pb, pack_snapshot(pb, "a", "USD", "b", "U$D")); /* a bad currency */
  CHECK_INT(tg_prepaid_snapshot_load(q, bad, &seq), -EBADMSG);
  write_framed(bad, pb, pack_snapshot(pb, "a", "USD", "a", "USD")); /* the same account twice */
  CHECK_INT(tg_prepaid_snapshot_load(q, bad, &seq), -EBADMSG);
  CHECK(still_fresh(q));
  CHECK_INT(seq, 77);

  write_framed(bad, pb, pack_snapshot(pb, "a", "USD", "a", "EUR")); /* the control: valid */
  CHECK_INT(tg_prepaid_snapshot_load(q, bad, &seq), 0);
  CHECK_INT(seq, 9);
  CHECK_INT(bal(q, "a", "EUR"), 20);
  tg_prepaid_t *r = tg_prepaid_new();
  CHECK_INT(tg_prepaid_snapshot_load(r, good, &seq), 0);
  CHECK_INT(seq, 2);
  CHECK_INT(bal(r, "a", "USD"), 1000);
  CHECK_INT(bal(r, "b", "USD"), 5);
  tg_prepaid_free(r);
  tg_prepaid_free(q);
  tg_prepaid_free(p);
}

/* ---- end to end through the write-ahead log ---- */

typedef struct {
  tg_prepaid_t *p;
  int done, errors;
  int64_t seen_balance; /* a@USD in the completion of the charge */
  uint64_t hold;        /* captured in that completion */
  int capture_rc;
} e2e_t;

static void on_appended(void *arg, int status, uint64_t seq) {
  e2e_t *e = arg;
  (void)seq;
  e->errors += status != 0;
  e->done++;
}

static void on_charged(void *arg, int status, uint64_t seq) {
  e2e_t *e = arg;
  e->seen_balance = bal(e->p, "a", "USD"); /* durable, so applied already */
  e->capture_rc = tg_prepaid_capture(e->p, e->hold);
  on_appended(arg, status, seq);
}

static int append_all(tg_wal_client_t *c, uv_loop_t *loop, e2e_t *e, const rec_t *recs, int n) {
  int want = e->done + n;
  for (int i = 0; i < n; i++)
    if (tg_wal_append(c, recs[i].b, recs[i].n, on_appended, e, NULL) != 0)
      return -1;
  while (e->done < want)
    uv_run(loop, UV_RUN_ONCE);
  return 0;
}

static int open_into(const char *dir, tg_prepaid_t *p, tg_wal_t **w, tg_wal_recovery_t *rec) {
  tg_wal_opts_t o;
  tg_wal_opts_init(&o);
  o.dir = dir;
  o.replay = tg_prepaid_wal_cb;
  o.replay_arg = p;
  o.on_durable = tg_prepaid_wal_cb;
  o.on_durable_arg = p;
  char err[256];
  return tg_wal_open(&o, w, rec, err, sizeof err);
}

TEST(wal_end_to_end_with_replay) {
  const char *dir = tmp_path("wal");
  const char *snap = tmp_path("e2e.snap");
  tg_prepaid_t *p = tg_prepaid_new();
  tg_wal_t *w;
  CHECK_INT(open_into(dir, p, &w, NULL), 0);
  uv_loop_t loop;
  uv_loop_init(&loop);
  tg_wal_client_t *c;
  CHECK_INT(tg_wal_client_new(w, &loop, &c), 0);
  e2e_t e = {.p = p};

  rec_t first[] = {credit("a", "USD", 1000000, "top-1"), credit("a", "EUR", 500, "top-2"),
                   credit("b", "USD", 42, "")};
  CHECK_INT(append_all(c, &loop, &e, first, 3), 0);
  CHECK_INT(bal(p, "a", "USD"), 1000000);
  CHECK_INT(tg_prepaid_last_seq(p), 3);

  /* A purchase: hold, log, capture when durable. */
  int64_t avail;
  CHECK_INT(tg_prepaid_hold(p, "a", "USD", 250000, &e.hold, &avail), 0);
  CHECK_INT(avail, 750000);
  rec_t charge = approved("a", "USD", 250000);
  CHECK_INT(tg_wal_append(c, charge.b, charge.n, on_charged, &e, NULL), 0);
  while (e.done < 4)
    uv_run(&loop, UV_RUN_ONCE);
  CHECK_INT(e.seen_balance, 750000);
  CHECK_INT(e.capture_rc, 0);
  CHECK_INT(held(p, "a", "USD"), 0);
  CHECK_INT(tg_prepaid_snapshot_write(p, snap), 0); /* at seq 4, the log open */

  rec_t second[] = {credit("a", "USD", 1000000, "top-1"), /* a repeated top-up */
                    change(DEBIT, "b", "USD", 2, "fix-1"),
                    tx(SIGN_FAILED, "builtin", "a", "USD", 99, NULL, 0),
                    tx(APPROVED, "builtin", "a", "USD", 1, "EUR", 100),
                    credit("c", "USDC", 7, "top-3")};
  CHECK_INT(append_all(c, &loop, &e, second, 5), 0);
  CHECK_INT(e.errors, 0);
  CHECK_INT(tg_prepaid_last_seq(p), 9);
  CHECK_INT(tg_wal_client_free(c), 0);
  tg_wal_close(w);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_INT(uv_loop_close(&loop), 0);

  static char want[8192], got[8192];
  listing(p, want, sizeof want);
  CHECK_STR(want, "a|EUR|400|0\na|USD|749999|0\nb|USD|40|0\nc|USDC|7|0\n");

  /* Restart from the whole log. */
  tg_prepaid_t *q = tg_prepaid_new();
  tg_wal_recovery_t rec;
  CHECK_INT(open_into(dir, q, &w, &rec), 0);
  tg_wal_close(w);
  CHECK_INT(rec.records, 9);
  CHECK_INT(tg_prepaid_last_seq(q), 9);
  listing(q, got, sizeof got);
  CHECK_STR(got, want);

  /* Restart from the snapshot plus the log: records 1..4 are skipped. */
  tg_prepaid_t *r = tg_prepaid_new();
  uint64_t seq = 0;
  CHECK_INT(tg_prepaid_snapshot_load(r, snap, &seq), 0);
  CHECK_INT(seq, 4);
  CHECK_INT(open_into(dir, r, &w, &rec), 0);
  tg_wal_close(w);
  CHECK_INT(tg_prepaid_last_seq(r), 9);
  listing(r, got, sizeof got);
  CHECK_STR(got, want);
  int64_t after;
  CHECK_INT(tg_prepaid_credit_check(r, "a", "USD", 5, "top-1", &after), -EALREADY);

  /* A record that does not decode stops recovery. */
  tg_prepaid_free(q);
  q = tg_prepaid_new();
  CHECK_INT(open_into(dir, q, &w, NULL), 0);
  uv_loop_init(&loop);
  CHECK_INT(tg_wal_client_new(w, &loop, &c), 0);
  quiet_logs();
  rec_t junk = {.b = {0xff, 0xff, 0xff}, .n = 3};
  CHECK_INT(append_all(c, &loop, &e, &junk, 1), 0);
  CHECK_INT(tg_wal_client_free(c), 0);
  tg_wal_close(w);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_INT(uv_loop_close(&loop), 0);
  tg_prepaid_t *s = tg_prepaid_new();
  CHECK_INT(open_into(dir, s, &w, NULL), -EBADMSG);
  tg_prepaid_free(s);
  tg_prepaid_free(r);
  tg_prepaid_free(q);
  tg_prepaid_free(p);
}

/* ---- references in the snapshot, and the log's retention ---- */

TEST(snapshot_keeps_credit_and_debit_references) {
  tg_prepaid_t *p = tg_prepaid_new();
  const char *path = tmp_path("refs.snap");
  CHECK_INT(tg_prepaid_snapshot_seq(p), 0);
  CHECK_INT(apply(p, 1, credit("a", "USD", 100, "inv-1")), 0);
  CHECK_INT(apply(p, 2, change(DEBIT, "a", "USD", 10, "fix-1")), 0);
  CHECK_INT(apply(p, 3, credit("a", "USD", 5, "")), 0); /* no reference: none kept */
  CHECK_INT(apply(p, 4, credit("b", "EUR", 7, "inv-2")), 0);
  uint64_t written = 0;
  CHECK_INT(tg_prepaid_snapshot_write_seq(p, path, &written), 0);
  CHECK_INT(written, 4);
  CHECK_INT(tg_prepaid_snapshot_seq(p), 4);

  uint8_t buf[4096];
  size_t n = read_bytes(path, buf, sizeof buf);
  Ledger__V1__Snapshot *s = ledger__v1__snapshot__unpack(NULL, n - 16, buf + 16);
  CHECK(s != NULL);
  CHECK_INT(s->n_credit_references, 2);
  CHECK_INT(s->n_debit_references, 1);
  CHECK_STR(s->debit_references[0], "fix-1");
  int c1 = strcmp(s->credit_references[0], "inv-1") == 0 ? 0 : 1; /* in no particular order */
  CHECK_STR(s->credit_references[c1], "inv-1");
  CHECK_STR(s->credit_references[1 - c1], "inv-2");
  ledger__v1__snapshot__free_unpacked(s, NULL);

  /* Loaded with no log behind it (the records have left it): still known. */
  tg_prepaid_t *q = tg_prepaid_new();
  uint64_t seq = 0;
  CHECK_INT(tg_prepaid_snapshot_load(q, path, &seq), 0);
  CHECK_INT(seq, 4);
  CHECK_INT(tg_prepaid_snapshot_seq(q), 4);
  int64_t after = 0;
  CHECK_INT(tg_prepaid_credit_check(q, "a", "USD", 100, "inv-1", &after), -EALREADY);
  CHECK_INT(after, 95);
  CHECK_INT(tg_prepaid_credit_check(q, "b", "EUR", 7, "inv-2", &after), -EALREADY);
  CHECK_INT(tg_prepaid_credit_check(q, "a", "USD", 100, "fix-1", &after), 0); /* a debit's, not a credit's */
  CHECK_INT(apply(q, 5, credit("a", "USD", 100, "inv-1")), 0);   /* a retried top-up */
  CHECK_INT(apply(q, 6, change(DEBIT, "a", "USD", 10, "fix-1")), 0); /* a retried correction */
  CHECK_INT(bal(q, "a", "USD"), 95);
  CHECK_INT(apply(q, 7, credit("a", "USD", 1, "inv-3")), 0);
  CHECK_INT(bal(q, "a", "USD"), 96);
  CHECK_INT(tg_prepaid_last_seq(q), 7);
  /* And written again, they stay (with the new one). */
  CHECK_INT(tg_prepaid_snapshot_write_seq(q, path, &written), 0);
  CHECK_INT(written, 7);
  tg_prepaid_t *r = tg_prepaid_new();
  CHECK_INT(tg_prepaid_snapshot_load(r, path, &seq), 0);
  CHECK_INT(tg_prepaid_credit_check(r, "a", "USD", 1, "inv-1", &after), -EALREADY);
  CHECK_INT(tg_prepaid_credit_check(r, "a", "USD", 1, "inv-3", &after), -EALREADY);
  CHECK_INT(apply(r, 8, change(DEBIT, "a", "USD", 10, "fix-1")), 0);
  CHECK_INT(bal(r, "a", "USD"), 96);

  /* A snapshot of an older build (no references) still loads. */
  uint8_t pb[1024];
  const char *old = tmp_path("old.snap");
  write_framed(old, pb, pack_snapshot(pb, "a", "USD", "b", "USD"));
  tg_prepaid_t *o = tg_prepaid_new();
  CHECK_INT(tg_prepaid_snapshot_load(o, old, &seq), 0);
  CHECK_INT(tg_prepaid_credit_check(o, "a", "USD", 1, "inv-1", &after), 0);
  tg_prepaid_free(o);

  /* An empty or repeated reference is damage; the ledger stays fresh. */
  Ledger__V1__Snapshot bad = LEDGER__V1__SNAPSHOT__INIT;
  bad.wal_seq = 3;
  char *refs[2] = {"x", "x"};
  bad.credit_references = refs;
  bad.n_credit_references = 2;
  const char *badp = tmp_path("badrefs.snap");
  write_framed(badp, pb, ledger__v1__snapshot__pack(&bad, pb));
  o = tg_prepaid_new();
  CHECK_INT(tg_prepaid_snapshot_load(o, badp, &seq), -EBADMSG);
  refs[1] = "";
  write_framed(badp, pb, ledger__v1__snapshot__pack(&bad, pb));
  CHECK_INT(tg_prepaid_snapshot_load(o, badp, &seq), -EBADMSG);
  CHECK(still_fresh(o));
  CHECK_INT(tg_prepaid_credit_check(o, "a", "USD", 1, "x", &after), 0); /* nothing half-loaded */
  /* The same reference as a credit and as a debit is fine. */
  bad.n_credit_references = 1;
  bad.debit_references = refs;
  bad.n_debit_references = 1;
  write_framed(badp, pb, ledger__v1__snapshot__pack(&bad, pb));
  CHECK_INT(tg_prepaid_snapshot_load(o, badp, &seq), 0);
  CHECK_INT(tg_prepaid_credit_check(o, "a", "USD", 1, "x", &after), -EALREADY);
  tg_prepaid_free(o);
  tg_prepaid_free(r);
  tg_prepaid_free(q);
  tg_prepaid_free(p);
}

static int open_small(const char *dir, tg_prepaid_t *p, tg_wal_t **w, tg_wal_recovery_t *rec) {
  tg_wal_opts_t o;
  tg_wal_opts_init(&o);
  o.dir = dir;
  o.segment_bytes = 256; /* a few records a segment */
  o.replay = tg_prepaid_wal_cb;
  o.replay_arg = p;
  o.on_durable = tg_prepaid_wal_cb;
  o.on_durable_arg = p;
  char err[256];
  return tg_wal_open(&o, w, rec, err, sizeof err);
}

/* The whole path: top-ups logged, a snapshot, retention removes their
 * records, a restart from the snapshot and what is left of the log. */
TEST(retried_top_up_after_retention_is_ignored) {
  const char *dir = tmp_path("wal_ret");
  const char *snap = tmp_path("ret.snap");
  tg_prepaid_t *p = tg_prepaid_new();
  tg_wal_t *w;
  CHECK_INT(open_small(dir, p, &w, NULL), 0);
  uv_loop_t loop;
  uv_loop_init(&loop);
  tg_wal_client_t *c;
  CHECK_INT(tg_wal_client_new(w, &loop, &c), 0);
  e2e_t e = {.p = p};
  rec_t first[] = {credit("a", "USD", 1000, "top-1"), change(DEBIT, "a", "USD", 1, "fix-1"),
                   approved("a", "USD", 100), approved("a", "USD", 100), approved("a", "USD", 100),
                   approved("a", "USD", 100), approved("a", "USD", 100), approved("a", "USD", 100)};
  CHECK_INT(append_all(c, &loop, &e, first, 8), 0);
  CHECK_INT(e.errors, 0);
  CHECK_INT(bal(p, "a", "USD"), 399);
  uint64_t covered = 0;
  CHECK_INT(tg_prepaid_snapshot_write_seq(p, snap, &covered), 0);
  CHECK_INT(covered, 8);
  rec_t after_snap[] = {approved("a", "USD", 50), credit("a", "USD", 7, "top-2")};
  CHECK_INT(append_all(c, &loop, &e, after_snap, 2), 0);
  CHECK_INT(bal(p, "a", "USD"), 356);
  tg_wal_retain_stats_t st;
  CHECK_INT(tg_wal_retain(w, covered, 1, 0, &st), 0);
  CHECK(st.removed_segments >= 1);
  CHECK(st.first_seq > 2);        /* the records of top-1 and fix-1 are gone */
  CHECK(st.first_seq <= covered + 1); /* nothing after the snapshot */
  CHECK_INT(tg_wal_client_free(c), 0);
  tg_wal_close(w);
  uv_run(&loop, UV_RUN_DEFAULT);

  /* Restart: the snapshot, then the log from where it now starts. */
  tg_prepaid_t *q = tg_prepaid_new();
  uint64_t seq = 0;
  CHECK_INT(tg_prepaid_snapshot_load(q, snap, &seq), 0);
  CHECK_INT(seq, 8);
  tg_wal_recovery_t rec;
  CHECK_INT(open_small(dir, q, &w, &rec), 0);
  CHECK_INT(rec.first_seq, st.first_seq);
  CHECK(rec.first_seq <= seq + 1 && rec.next_seq > seq); /* the log holds everything after it */
  CHECK_INT(tg_prepaid_last_seq(q), 10);
  CHECK_INT(bal(q, "a", "USD"), 356);
  int64_t after = 0;
  CHECK_INT(tg_prepaid_credit_check(q, "a", "USD", 1000, "top-1", &after), -EALREADY);
  CHECK_INT(tg_prepaid_credit_check(q, "a", "USD", 7, "top-2", &after), -EALREADY); /* from the log */
  /* A retried top-up and a retried correction that slip through are ignored. */
  CHECK_INT(tg_wal_client_new(w, &loop, &c), 0);
  e.p = q;
  rec_t retried[] = {credit("a", "USD", 1000, "top-1"), change(DEBIT, "a", "USD", 1, "fix-1"),
                     credit("a", "USD", 7, "top-2")};
  CHECK_INT(append_all(c, &loop, &e, retried, 3), 0);
  CHECK_INT(e.errors, 0);
  CHECK_INT(tg_prepaid_last_seq(q), 13);
  CHECK_INT(bal(q, "a", "USD"), 356);
  CHECK_INT(tg_wal_client_free(c), 0);
  tg_wal_close(w);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_INT(uv_loop_close(&loop), 0);
  tg_prepaid_free(q);
  tg_prepaid_free(p);
}
