/* The usage book (pipeline/usage.h): obligations rebuilt from log records,
 * overdue transitions and counts per AI system, pricing per 1,000 tokens,
 * claims and idempotent reports, retention bound, eviction. */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "catalog/rsl.h"
#include "ledger/v1/ledger.pb-c.h"
#include "pipeline/usage.h"
#include "test.h"
#include "tmpfiles.h"

static tg_config_tenant_t tenants[2];
static tg_config_t cfg;

static void setup(void) {
  quiet_logs(); /* the eviction test's warning */
  (void)now_s;
  memset(tenants, 0, sizeof tenants);
  tenants[0].name = "news";
  tenants[0].usage = (tg_config_usage_t){60, 1, TG_CONFIG_TOKEN_PRICING_PER_1K};
  tenants[1].name = "blog";
  tenants[1].usage = (tg_config_usage_t){0, 0, TG_CONFIG_TOKEN_PRICING_FLAT};
  memset(&cfg, 0, sizeof cfg);
  cfg.tenants = tenants;
  cfg.ntenants = 2;
}

typedef struct txspec {
  const char *id, *tenant, *ai, *ref;
  int outcome;
  int64_t due;
  size_t nitems;
  const char *offers[3];
  int64_t amounts[3], estimated[3];
  uint32_t types[3];
} txspec_t;

/* Packs a Transaction record and applies it to u at seq. */
static int apply_tx(tg_usage_t *u, uint64_t seq, const txspec_t *s) {
  Ledger__V1__Record rec = LEDGER__V1__RECORD__INIT;
  Ledger__V1__Transaction tx = LEDGER__V1__TRANSACTION__INIT;
  Ledger__V1__TransactionItem items[3], *ptrs[3];
  Ledger__V1__Amount total = LEDGER__V1__AMOUNT__INIT, *totals[1] = {&total};
  rec.kind_case = LEDGER__V1__RECORD__KIND_TRANSACTION;
  rec.transaction = &tx;
  tx.id = (char *)s->id;
  tx.outcome = s->outcome ? (Ledger__V1__TransactionOutcome)s->outcome
                          : LEDGER__V1__TRANSACTION_OUTCOME__TRANSACTION_OUTCOME_APPROVED;
  tx.ai_system_id = (char *)(s->ai ? s->ai : "");
  tx.billing_reference = (char *)(s->ref ? s->ref : "acct-1");
  tx.report_due_at_unix = s->due;
  total.currency = "USD";
  tx.n_totals = 1;
  tx.totals = totals;
  for (size_t i = 0; i < s->nitems; i++) {
    ledger__v1__transaction_item__init(&items[i]);
    items[i].tenant = (char *)(s->tenant ? s->tenant : "news");
    items[i].offer_id = (char *)s->offers[i];
    items[i].amount = s->amounts[i];
    items[i].currency = "USD";
    items[i].payment_type = s->types[i];
    items[i].estimated_tokens = s->estimated[i];
    ptrs[i] = &items[i];
  }
  tx.n_items = s->nitems;
  tx.items = ptrs;
  size_t len = ledger__v1__record__get_packed_size(&rec);
  uint8_t *buf = malloc(len);
  ledger__v1__record__pack(&rec, buf);
  int rc = tg_usage_apply(u, seq, buf, len);
  free(buf);
  return rc;
}

/* A one-item transaction of tenant news (per_1k, type "use"). */
static txspec_t one(const char *id, const char *ai, int64_t due) {
  txspec_t s = {0};
  s.id = id;
  s.ai = ai;
  s.due = due;
  s.nitems = 1;
  s.offers[0] = "offer-a";
  s.amounts[0] = 15000;
  s.estimated[0] = 1000;
  s.types[0] = TG_RSL_PAY_USE;
  return s;
}

/* Logs a claim as its record would be (the durable path). */
static int apply_claim(tg_usage_t *u, uint64_t seq, const tg_usage_claim_t *c) {
  size_t len;
  uint8_t *buf = tg_usage_record(c, "ledger", "", "test", "req-1", &len);
  if (buf == NULL)
    return -ENOMEM;
  int rc = tg_usage_apply(u, seq, buf, len);
  free(buf);
  return rc;
}

TEST(charge_flat_and_per_1k) {
  setup();
  int64_t c = -1;
  CHECK_INT(tg_usage_item_charge(&tenants[1], 15000, TG_RSL_PAY_USE, 5000, &c), 0);
  CHECK_INT(c, 15000); /* flat */
  CHECK_INT(tg_usage_item_charge(&tenants[0], 15000, TG_RSL_PAY_PURCHASE, 5000, &c), 0);
  CHECK_INT(c, 15000); /* per_1k only prices "use" */
  CHECK_INT(tg_usage_item_charge(&tenants[0], 15000, TG_RSL_PAY_USE, 1500, &c), 0);
  CHECK_INT(c, 22500);
  CHECK_INT(tg_usage_item_charge(&tenants[0], 1, TG_RSL_PAY_USE, 1, &c), 0);
  CHECK_INT(c, 1); /* ceil(0.001) */
  CHECK_INT(tg_usage_item_charge(&tenants[0], 1, TG_RSL_PAY_USE, 1001, &c), 0);
  CHECK_INT(c, 2);
  CHECK_INT(tg_usage_item_charge(&tenants[0], 7, TG_RSL_PAY_USE, 0, &c), 0);
  CHECK_INT(c, 0);
  CHECK_INT(tg_usage_item_charge(&tenants[0], INT64_MAX, TG_RSL_PAY_USE, 1000000000000, &c), -EOVERFLOW);
  CHECK_INT(tg_usage_item_charge(&tenants[0], INT64_MAX, TG_RSL_PAY_USE, 1000, &c), 0);
  CHECK_INT(c, INT64_MAX);
  CHECK_INT(tg_usage_item_charge(&tenants[0], INT64_MAX, TG_RSL_PAY_USE, 1001, &c), -EOVERFLOW);
  CHECK_INT(tg_usage_item_charge(&tenants[0], -1, TG_RSL_PAY_USE, 1, &c), -EINVAL);
}

TEST(due_from_config_or_license) {
  setup();
  int64_t due = -1;
  CHECK_INT(tg_usage_due(&tenants[0], false, 1000, &due), 1);
  CHECK_INT(due, 1060);
  CHECK_INT(tg_usage_due(&tenants[1], false, 1000, &due), 0);
  CHECK_INT(due, 0);
  CHECK_INT(tg_usage_due(&tenants[1], true, 1000, &due), 1);
  CHECK_INT(due, 1000 + 86400);
}

TEST(book_from_records_and_overdue_per_ai_system) {
  setup();
  tg_usage_t *u = tg_usage_new(&cfg, 0);
  CHECK(u != NULL);
  int64_t future = (int64_t)time(NULL) + 3600;
  txspec_t a = one("tx_a", "bot-1", 1000), b = one("tx_b", "bot-1", 2000), c = one("tx_c", "bot-1", future);
  txspec_t d = one("tx_d", "bot-2", 1000), e = one("tx_e", "", 1000), f = one("tx_f", "bot-1", 0);
  txspec_t g = one("tx_g", "bot-1", 500);
  g.outcome = LEDGER__V1__TRANSACTION_OUTCOME__TRANSACTION_OUTCOME_SIGN_FAILED; /* never an obligation */
  txspec_t h = one("tx_h", "bot-1", 3000);
  h.outcome = LEDGER__V1__TRANSACTION_OUTCOME__TRANSACTION_OUTCOME_DEFERRED; /* served: owes a report */
  CHECK_INT(apply_tx(u, 1, &a), 0);
  CHECK_INT(apply_tx(u, 2, &b), 0);
  CHECK_INT(apply_tx(u, 3, &c), 0);
  CHECK_INT(apply_tx(u, 4, &d), 0);
  CHECK_INT(apply_tx(u, 5, &e), 0);
  CHECK_INT(apply_tx(u, 6, &f), 0);
  CHECK_INT(apply_tx(u, 7, &g), 0);
  CHECK_INT(apply_tx(u, 8, &h), 0);
  CHECK_INT(apply_tx(u, 9, &a), 0); /* the same id again: ignored */
  CHECK_INT(tg_usage_apply(u, 10, "\xff\xff\xff", 3), -EBADMSG);
  tg_usage_stats_t st;
  tg_usage_stats(u, "news", &st);
  CHECK_INT(st.entries, 7); /* g is not kept */
  CHECK_INT(st.pending, 6); /* f owes nothing */
  CHECK_INT(st.overdue, 0);
  char detail[160] = "";
  /* bot-1 has a, b and h past due, c not yet. */
  CHECK_INT(tg_usage_overdue(u, "bot-1", "acct-1", 3, detail, sizeof detail), 0);
  CHECK_INT(tg_usage_overdue(u, "bot-1", "acct-1", 2, detail, sizeof detail), 1);
  CHECK_STR(detail, "3 usage reports overdue since 1970-01-01T00:16:40Z: report them with ReportUsage");
  CHECK_INT(tg_usage_overdue(u, "bot-1", "acct-1", 0, detail, sizeof detail), 0); /* 0: never */
  tg_usage_stats(u, "news", &st);
  CHECK_INT(st.overdue, 3); /* the query marked bot-1's */
  CHECK_INT(tg_usage_overdue(u, "bot-2", "acct-1", 1, detail, sizeof detail), 0);
  CHECK_INT(tg_usage_overdue(u, "bot-3", "acct-1", 1, detail, sizeof detail), 0);
  tg_usage_stats(u, "news", &st);
  CHECK_INT(st.overdue, 4); /* + d */
  tg_usage_tick(u, (int64_t)time(NULL));
  tg_usage_stats(u, "news", &st);
  CHECK_INT(st.overdue, 5); /* + e */
  CHECK_INT(st.pending, 1); /* c */
  /* No id: grouped by billing reference (only e so far; a, b have an id). */
  CHECK_INT(tg_usage_overdue(u, "", "acct-1", 1, detail, sizeof detail), 0);
  txspec_t e2 = one("tx_e2", "", 900);
  CHECK_INT(apply_tx(u, 11, &e2), 0);
  CHECK_INT(tg_usage_overdue(u, NULL, "acct-1", 1, detail, sizeof detail), 1);
  CHECK_STR(detail, "2 usage reports overdue since 1970-01-01T00:15:00Z: report them with ReportUsage");
  CHECK_INT(tg_usage_overdue(NULL, "bot-1", "acct-1", 1, detail, sizeof detail), 0);
  tg_usage_free(u);
}

TEST(claims_reports_and_idempotency) {
  setup();
  tg_usage_t *u = tg_usage_new(&cfg, 0);
  int64_t now = (int64_t)time(NULL);
  txspec_t t = one("tx_1", "bot-1", now + 60);
  t.nitems = 3;
  t.offers[1] = "offer-b";
  t.amounts[1] = 1000;
  t.estimated[1] = 10;
  t.types[1] = TG_RSL_PAY_PURCHASE; /* flat: no adjustment */
  t.offers[2] = "offer-c";
  t.amounts[2] = 3;
  t.estimated[2] = 999;
  t.types[2] = TG_RSL_PAY_USE;
  CHECK_INT(apply_tx(u, 1, &t), 0);
  tg_usage_claim_t *c = calloc(1, sizeof *c);
  char why[256];
  tg_usage_use_t uses[2] = {{"offer-a", 2501}, {"offer-c", 1001}};
  CHECK_INT(tg_usage_claim(u, "tx_nope", "bot-1", "acct-1", uses, 2, now, c, why, sizeof why), -ENOENT);
  CHECK_INT(tg_usage_claim(u, "tx_1", "bot-2", "acct-1", uses, 2, now, c, why, sizeof why), -EPERM);
  CHECK_INT(tg_usage_claim(u, "tx_1", "bot-1", "acct-2", uses, 2, now, c, why, sizeof why), -EPERM);
  CHECK_INT(tg_usage_claim(u, "tx_1", "", "acct-1", uses, 2, now, c, why, sizeof why), -EPERM);
  tg_usage_use_t bad[1] = {{"offer-z", 1}};
  CHECK_INT(tg_usage_claim(u, "tx_1", "bot-1", "acct-1", bad, 1, now, c, why, sizeof why), -EINVAL);
  CHECK_STR(why, "usage[0].offer_id: not an item of transaction tx_1");
  CHECK_INT(tg_usage_claim(u, "tx_1", "bot-1", "acct-1", uses, 2, now, c, why, sizeof why), 0);
  CHECK_INT(c->nitems, 3);
  CHECK_STR(c->items[0].offer_id, "offer-a");
  CHECK_INT(c->items[0].consumed, 2501);
  CHECK_INT(c->items[1].consumed, 10); /* not named: as estimated */
  /* a: ceil(15000*2501/1000) - 15000 = 37515 - 15000; c: ceil(3*1001/1000) - ceil(3*999/1000) = 4 - 3 */
  CHECK_INT(c->items[0].adjustment, 22515);
  CHECK_INT(c->items[1].adjustment, 0);
  CHECK_INT(c->items[2].adjustment, 1);
  CHECK_INT(c->adjustment, 22516);
  CHECK(c->any_per_1k);
  CHECK(!c->late);
  CHECK_STR(c->currency, "USD");
  CHECK_STR(c->tenant, "news");
  tg_usage_claim_t *c2 = calloc(1, sizeof *c2);
  CHECK_INT(tg_usage_claim(u, "tx_1", "bot-1", "acct-1", uses, 2, now, c2, why, sizeof why), -EBUSY);
  tg_usage_claim_clear(c2);
  /* Given back (its record was not logged): claimable again. */
  tg_usage_unclaim(u, "tx_1");
  tg_usage_claim_clear(c);
  CHECK_INT(tg_usage_claim(u, "tx_1", "bot-1", "acct-1", uses, 2, now, c, why, sizeof why), 0);
  CHECK_INT(apply_claim(u, 2, c), 0);
  tg_usage_stats_t st;
  tg_usage_stats(u, "news", &st);
  CHECK_INT(st.pending, 0);
  CHECK_INT(st.reported, 1);
  CHECK_INT(st.on_time, 1);
  /* The same counts (offer-b named with its estimate counts the same): the first answer. */
  tg_usage_use_t same[3] = {{"offer-c", 1001}, {"offer-b", 10}, {"offer-a", 2501}};
  CHECK_INT(tg_usage_claim(u, "tx_1", "bot-1", "acct-1", same, 3, now + 500, c2, why, sizeof why), TG_USAGE_SAME);
  CHECK_INT(c2->adjustment, 22516);
  CHECK_INT(c2->reported_at, now);
  CHECK_INT(c2->items[0].consumed, 2501);
  CHECK_INT(c2->items[0].estimated, 1000);
  CHECK(!c2->late);
  tg_usage_claim_clear(c2);
  tg_usage_use_t other[1] = {{"offer-a", 2502}};
  CHECK_INT(tg_usage_claim(u, "tx_1", "bot-1", "acct-1", other, 1, now, c2, why, sizeof why), -EEXIST);
  /* A second report record (another instance's race): the first stands. */
  c->items[0].consumed = 1;
  CHECK_INT(apply_claim(u, 3, c), 0);
  CHECK_INT(tg_usage_claim(u, "tx_1", "bot-1", "acct-1", uses, 2, now, c2, why, sizeof why), TG_USAGE_SAME);
  tg_usage_claim_clear(c2);
  tg_usage_claim_clear(c);
  free(c);
  free(c2);
  tg_usage_free(u);
}

TEST(late_report_and_compliance) {
  setup();
  tg_usage_t *u = tg_usage_new(&cfg, 0);
  int64_t now = (int64_t)time(NULL);
  txspec_t a = one("tx_a", "bot-1", now - 10), b = one("tx_b", "bot-1", now + 100), n = one("tx_n", "bot-1", 0);
  CHECK_INT(apply_tx(u, 1, &a), 0);
  CHECK_INT(apply_tx(u, 2, &b), 0);
  CHECK_INT(apply_tx(u, 3, &n), 0);
  tg_usage_tick(u, now);
  tg_usage_stats_t st;
  tg_usage_stats(u, "news", &st);
  CHECK_INT(st.overdue, 1);
  CHECK_INT(st.pending, 1);
  tg_usage_claim_t *c = calloc(1, sizeof *c);
  char why[256];
  tg_usage_use_t use[1] = {{"offer-a", 1000}};
  CHECK_INT(tg_usage_claim(u, "tx_a", "bot-1", "acct-1", use, 1, now, c, why, sizeof why), 0);
  CHECK(c->late);
  CHECK_INT(c->adjustment, 0);
  CHECK_INT(apply_claim(u, 4, c), 0);
  tg_usage_claim_clear(c);
  CHECK_INT(tg_usage_claim(u, "tx_b", "bot-1", "acct-1", use, 1, now, c, why, sizeof why), 0);
  CHECK(!c->late);
  CHECK_INT(apply_claim(u, 5, c), 0);
  tg_usage_claim_clear(c);
  /* A transaction that owed nothing takes a report too (its adjustment), and counts in no obligation. */
  tg_usage_use_t less[1] = {{"offer-a", 500}};
  CHECK_INT(tg_usage_claim(u, "tx_n", "bot-1", "acct-1", less, 1, now, c, why, sizeof why), 0);
  CHECK_INT(c->adjustment, 7500 - 15000);
  CHECK_INT(apply_claim(u, 6, c), 0);
  tg_usage_claim_clear(c);
  tg_usage_stats(u, "news", &st);
  CHECK_INT(st.overdue, 0);
  CHECK_INT(st.pending, 0);
  CHECK_INT(st.reported, 2);
  CHECK_INT(st.late, 1);
  CHECK_INT(st.on_time, 1);
  free(c);
  tg_usage_free(u);
}

TEST(retention_bound_and_eviction) {
  setup();
  tg_usage_t *u = tg_usage_new(&cfg, 3);
  int64_t now = (int64_t)time(NULL);
  txspec_t old = one("tx_old", "bot-1", now - TG_USAGE_OVERDUE_HOLD_S - 10);
  txspec_t a = one("tx_a", "bot-1", now + 100), n = one("tx_n", "bot-1", 0), b = one("tx_b", "bot-1", now + 50);
  CHECK_INT(tg_usage_oldest_seq(u), 0);
  CHECK_INT(apply_tx(u, 5, &old), 0);
  CHECK_INT(tg_usage_oldest_seq(u), 0); /* overdue for over 30 days: holds nothing */
  CHECK_INT(apply_tx(u, 7, &a), 0);
  CHECK_INT(apply_tx(u, 8, &n), 0);
  CHECK_INT(tg_usage_oldest_seq(u), 7);
  tg_usage_claim_t *c = calloc(1, sizeof *c);
  char why[256];
  tg_usage_use_t use[1] = {{"offer-a", 1000}};
  CHECK_INT(tg_usage_claim(u, "tx_a", "bot-1", "acct-1", use, 1, now, c, why, sizeof why), 0);
  CHECK_INT(apply_claim(u, 9, c), 0);
  tg_usage_claim_clear(c);
  CHECK_INT(tg_usage_oldest_seq(u), 0); /* reported: holds nothing */
  /* Full (3): the oldest closed one goes (tx_n owes nothing, closed first), open ones stay. */
  CHECK_INT(apply_tx(u, 10, &b), 0);
  tg_usage_stats_t st;
  tg_usage_stats(u, "news", &st);
  CHECK_INT(st.entries, 3);
  CHECK_INT(tg_usage_claim(u, "tx_n", "bot-1", "acct-1", use, 1, now, c, why, sizeof why), -ENOENT);
  CHECK_INT(tg_usage_claim(u, "tx_a", "bot-1", "acct-1", use, 1, now, c, why, sizeof why), TG_USAGE_SAME);
  tg_usage_claim_clear(c);
  CHECK_INT(tg_usage_oldest_seq(u), 10);
  txspec_t d = one("tx_d", "bot-1", now + 10), e = one("tx_e", "bot-1", now + 10);
  CHECK_INT(apply_tx(u, 11, &d), 0); /* evicts tx_a (closed) */
  CHECK_INT(apply_tx(u, 12, &e), 0); /* only open ones left: the oldest goes (tx_old) */
  tg_usage_stats(u, "news", &st);
  CHECK_INT(st.entries, 3);
  CHECK_INT(st.pending, 3);
  CHECK_INT(st.overdue, 0);
  CHECK_INT(tg_usage_oldest_seq(u), 10);
  free(c);
  tg_usage_free(u);
}

TEST(replay_twice_same_book) {
  /* A restart replays the log into a new book: the same records give the same state. */
  setup();
  int64_t now = (int64_t)time(NULL);
  tg_usage_stats_t st[2];
  for (int run = 0; run < 2; run++) {
    tg_usage_t *u = tg_usage_new(&cfg, 0);
    txspec_t a = one("tx_a", "bot-1", now - 5), b = one("tx_b", "bot-1", now + 500);
    CHECK_INT(apply_tx(u, 1, &a), 0);
    CHECK_INT(apply_tx(u, 2, &b), 0);
    tg_usage_claim_t *c = calloc(1, sizeof *c);
    char why[64];
    tg_usage_use_t use[1] = {{"offer-a", 3000}};
    if (run == 0) {
      CHECK_INT(tg_usage_claim(u, "tx_b", "bot-1", "acct-1", use, 1, now, c, why, sizeof why), 0);
      CHECK_INT(c->adjustment, 30000);
    } else {
      /* the second run replays the report the first one logged */
      c->nitems = 0;
    }
    static uint8_t saved[4096];
    static size_t saved_len;
    if (run == 0) {
      uint8_t *buf = tg_usage_record(c, "ledger", "", "i", "r", &saved_len);
      CHECK(buf != NULL && saved_len < sizeof saved);
      memcpy(saved, buf, saved_len);
      free(buf);
    }
    CHECK_INT(tg_usage_apply(u, 3, saved, saved_len), 0);
    tg_usage_claim_clear(c);
    tg_usage_tick(u, now);
    tg_usage_stats(u, "news", &st[run]);
    CHECK_INT(tg_usage_claim(u, "tx_b", "bot-1", "acct-1", use, 1, now, c, why, sizeof why), TG_USAGE_SAME);
    CHECK_INT(c->adjustment, 30000);
    tg_usage_claim_clear(c);
    free(c);
    tg_usage_free(u);
  }
  CHECK_INT(st[1].reported, 1);
  CHECK_INT(st[1].overdue, 1);
  CHECK(memcmp(&st[0], &st[1], sizeof st[0]) == 0);
}

/* Loads a configuration with one tenant whose usage section is usage ("" none). */
static int load_usage(const char *usage, tg_config_t *c, char *err, size_t errlen) {
  char src[1024];
  snprintf(src, sizeof src,
           "return { listen = { { host = \"127.0.0.1\", port = 0 } },\n"
           "  tenants = { { name = \"news\", hosts = { \"news.example\" }%s%s } } }\n",
           usage[0] ? ",\n    usage = " : "", usage);
  return tg_config_load(tmp_write("usage.lua", src), c, err, errlen);
}

TEST(config_usage_section) {
  setup();
  tg_config_t c;
  char err[512];
  CHECK_INT(load_usage("", &c, err, sizeof err), 0);
  CHECK_INT(c.tenants[0].usage.report_within_s, 0);
  CHECK_INT(c.tenants[0].usage.overdue_limit, 0);
  CHECK_INT(c.tenants[0].usage.token_pricing, TG_CONFIG_TOKEN_PRICING_FLAT);
  tg_config_free(&c);
  CHECK_INT(load_usage("{ report_within_s = 86400, overdue_limit = 3, token_pricing = \"per_1k\" }", &c, err,
                       sizeof err),
            0);
  CHECK_INT(c.tenants[0].usage.report_within_s, 86400);
  CHECK_INT(c.tenants[0].usage.overdue_limit, 3);
  CHECK_INT(c.tenants[0].usage.token_pricing, TG_CONFIG_TOKEN_PRICING_PER_1K);
  tg_config_free(&c);
  CHECK_INT(load_usage("{ token_pricing = \"flat\" }", &c, err, sizeof err), 0);
  CHECK_INT(c.tenants[0].usage.token_pricing, TG_CONFIG_TOKEN_PRICING_FLAT);
  tg_config_free(&c);
  CHECK_INT(load_usage("{ token_pricing = \"per_token\" }", &c, err, sizeof err), -1);
  CHECK(strstr(err, "'per_token' is not a token pricing") != NULL);
  CHECK_INT(load_usage("{ report_within_s = 31536001 }", &c, err, sizeof err), -1);
  CHECK(strstr(err, "0..31536000") != NULL);
  CHECK_INT(load_usage("{ overdue_limit = -1 }", &c, err, sizeof err), -1);
  CHECK_INT(load_usage("{ report_within = 5 }", &c, err, sizeof err), -1);
  CHECK(strstr(err, "did you mean 'report_within_s'") != NULL);
  CHECK_INT(load_usage("42", &c, err, sizeof err), -1);
}
