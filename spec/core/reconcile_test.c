#include "test.h"

#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>

#include "billing/reconcile.h"
#include "ledger/record.h"
#include "ledger/v1/ledger.pb-c.h"

/* The billing book (billing/reconcile.h): what remote billing services
 * owe, the deferred cap, replay from log records, retention's bound, and the
 * tenant health the policy and /readyz read. The reconciler that pays the
 * book runs against a real Connect billing service in
 * spec/interop/billing.test.js. */

static const char *const names[] = {"news", "wiki", "local"};
static const bool remote[] = {true, true, false};

static tg_billing_book_t *book(void) { return tg_billing_book_new(3, names, remote, "gw-test"); }

/* A Transaction record of tenant, packed (free it). */
static uint8_t *tx_record(const char *txid, const char *tenant, Ledger__V1__TransactionOutcome outcome,
                          const char *billing_type, int64_t amount, size_t *len) {
  Ledger__V1__Record rec = LEDGER__V1__RECORD__INIT;
  Ledger__V1__Transaction tx = LEDGER__V1__TRANSACTION__INIT;
  Ledger__V1__Amount total = LEDGER__V1__AMOUNT__INIT;
  Ledger__V1__Amount *totals[1] = {&total};
  Ledger__V1__TransactionItem item = LEDGER__V1__TRANSACTION_ITEM__INIT;
  Ledger__V1__TransactionItem *items[1] = {&item};
  rec.kind_case = LEDGER__V1__RECORD__KIND_TRANSACTION;
  rec.transaction = &tx;
  tx.id = (char *)txid;
  tx.outcome = outcome;
  tx.billing_reference = "acct-0001";
  tx.billing_type = (char *)billing_type;
  tx.ai_system_id = "bot-1";
  total.currency = "USD";
  total.amount = amount;
  tx.n_totals = 1;
  tx.totals = totals;
  item.tenant = (char *)tenant;
  item.amount = amount;
  item.currency = "USD";
  tx.n_items = 1;
  tx.items = items;
  *len = ledger__v1__record__get_packed_size(&rec);
  uint8_t *out = malloc(*len);
  if (out)
    ledger__v1__record__pack(&rec, out);
  return out;
}

/* 0, or the replay's error (-ENOMEM when no record could be made). */
static int replay_tx(tg_billing_book_t *b, uint64_t seq, const char *txid, const char *tenant,
                     Ledger__V1__TransactionOutcome outcome, const char *type, int64_t amount) {
  size_t len;
  uint8_t *rec = tx_record(txid, tenant, outcome, type, amount, &len);
  int rc = rec ? tg_billing_book_replay(b, seq, rec, len) : -ENOMEM;
  free(rec);
  return rc;
}

static int replay_change(tg_billing_book_t *b, uint64_t seq, Ledger__V1__LedgerChangeKind kind, const char *txid) {
  size_t len;
  uint8_t *rec = tg_record_ledger_change(kind, "acct-0001", "USD", 0, txid, NULL, "gw-test", &len);
  int rc = rec ? tg_billing_book_replay(b, seq, rec, len) : -ENOMEM;
  free(rec);
  return rc;
}

#define OUTCOME(x) LEDGER__V1__TRANSACTION_OUTCOME__TRANSACTION_OUTCOME_##x
#define CHANGE(x) LEDGER__V1__LEDGER_CHANGE_KIND__LEDGER_CHANGE_KIND_##x

TEST(deferred_money_stays_within_the_cap_per_tenant_and_currency) {
  tg_billing_book_t *b = book();
  CHECK(b != NULL);
  CHECK(b != NULL);
  CHECK_INT(tg_billing_book_defer(b, 0, "tx_1", "acct-0001", "USD", 600, "bot-1", 1000), 0);
  /* 600 + 500 > 1000: refused, nothing entered */
  CHECK_INT(tg_billing_book_defer(b, 0, "tx_2", "acct-0001", "USD", 500, "bot-1", 1000), -ENOSPC);
  CHECK_INT(tg_billing_book_count(b), 1);
  /* exactly to the cap is allowed */
  CHECK_INT(tg_billing_book_defer(b, 0, "tx_3", "acct-0001", "USD", 400, "bot-1", 1000), 0);
  /* another currency and another tenant have their own room */
  CHECK_INT(tg_billing_book_defer(b, 0, "tx_4", "acct-0001", "EUR", 1000, "bot-1", 1000), 0);
  CHECK_INT(tg_billing_book_defer(b, 1, "tx_5", "acct-0001", "USD", 1000, "bot-1", 1000), 0);
  /* the same transaction twice is refused */
  CHECK_INT(tg_billing_book_defer(b, 1, "tx_5", "acct-0001", "USD", 1, "bot-1", 2000), -EEXIST);
  /* a cap of 0 never defers */
  CHECK_INT(tg_billing_book_defer(b, 1, "tx_6", "acct-0001", "GBP", 1, "bot-1", 0), -ENOSPC);
  /* captured: the room comes back */
  tg_billing_book_done(b, "tx_1");
  CHECK_INT(tg_billing_book_defer(b, 0, "tx_2", "acct-0001", "USD", 500, "bot-1", 1000), 0);
  CHECK_INT(tg_billing_book_count(b), 4);
  /* strings too long are refused, not cut */
  char longid[200];
  memset(longid, 'x', sizeof longid - 1);
  longid[sizeof longid - 1] = '\0';
  CHECK_INT(tg_billing_book_defer(b, 0, longid, "acct-0001", "JPY", 1, "bot-1", 1000), -EINVAL);
  CHECK_INT(tg_billing_book_defer(b, 7, "tx_7", "acct-0001", "USD", 1, "bot-1", 1000), -EINVAL);
  tg_billing_book_free(b);
}

TEST(replay_keeps_what_billing_has_not_confirmed) {
  tg_billing_book_t *b = book();
  CHECK(b != NULL);
  CHECK_INT(replay_tx(b, 1, "tx_a", "news", OUTCOME(DEFERRED), "connect", 100), 0);  /* owed: authorize, capture */
  CHECK_INT(replay_tx(b, 2, "tx_b", "news", OUTCOME(APPROVED), "connect", 200), 0);  /* owed: capture */
  CHECK_INT(replay_tx(b, 3, "tx_c", "news", OUTCOME(APPROVED), "builtin", 300), 0);  /* the ledger's: not here */
  CHECK_INT(replay_tx(b, 4, "tx_d", "local", OUTCOME(DEFERRED), "connect", 400), 0); /* not a remote tenant now */
  CHECK_INT(replay_tx(b, 5, "tx_e", "wiki", OUTCOME(SIGN_FAILED), "connect", 500), 0);
  CHECK_INT(replay_tx(b, 6, "tx_f", "wiki", OUTCOME(DEFERRED), "connect", 600), 0);
  CHECK_INT(tg_billing_book_count(b), 3);
  CHECK_INT(tg_billing_book_oldest_seq(b), 1);
  CHECK_INT(replay_change(b, 7, CHANGE(CAPTURE), "tx_a"), 0);
  CHECK_INT(tg_billing_book_oldest_seq(b), 2);
  CHECK_INT(replay_change(b, 8, CHANGE(REFUSED), "tx_f"), 0);
  CHECK_INT(replay_change(b, 9, CHANGE(RELEASE), "tx_b"), 0); /* a release does not settle a charge */
  CHECK_INT(tg_billing_book_count(b), 1);
  CHECK_INT(replay_change(b, 10, CHANGE(CAPTURE), "tx_b"), 0);
  CHECK_INT(tg_billing_book_count(b), 0);
  CHECK_INT(tg_billing_book_oldest_seq(b), 0);
  /* a payload that is not a Record */
  CHECK_INT(tg_billing_book_replay(b, 11, "\xff\xff", 2), -EBADMSG);
  tg_billing_book_free(b);
}

TEST(replayed_deferred_money_counts_against_the_cap) {
  tg_billing_book_t *b = book();
  CHECK(b != NULL);
  CHECK_INT(replay_tx(b, 1, "tx_a", "news", OUTCOME(DEFERRED), "connect", 900), 0);
  CHECK_INT(tg_billing_book_defer(b, 0, "tx_b", "acct-0001", "USD", 200, "bot-1", 1000), -ENOSPC);
  CHECK_INT(tg_billing_book_defer(b, 0, "tx_b", "acct-0001", "USD", 100, "bot-1", 1000), 0);
  tg_billing_book_free(b);
}

TEST(a_charge_without_its_sequence_holds_retention) {
  tg_billing_book_t *b = book();
  CHECK(b != NULL);
  CHECK_INT(replay_tx(b, 40, "tx_a", "news", OUTCOME(DEFERRED), "connect", 1), 0);
  CHECK_INT(tg_billing_book_oldest_seq(b), 40);
  /* entered before its append: its sequence is unknown, nothing may go */
  CHECK_INT(tg_billing_book_owe_capture(b, 0, "tx_b", "acct-0001", "USD", 5, "bot-1", "hold-1"), 0);
  CHECK_INT(tg_billing_book_oldest_seq(b), 1);
  tg_billing_book_set_seq(b, "tx_b", 41);
  CHECK_INT(tg_billing_book_oldest_seq(b), 40);
  tg_billing_book_done(b, "tx_a");
  CHECK_INT(tg_billing_book_oldest_seq(b), 41);
  tg_billing_book_free(b);
}

TEST(failing_since_and_health) {
  tg_billing_book_t *b = book();
  CHECK(b != NULL);
  CHECK_INT(tg_billing_book_failed(b, 0, 1000), 0);
  CHECK_INT(tg_billing_book_failed(b, 0, 1250), 250);
  CHECK_INT(tg_billing_book_failed(b, 1, 1300), 0); /* each tenant its own */
  tg_billing_book_ok(b, 0);
  CHECK_INT(tg_billing_book_failed(b, 0, 5000), 0);
  tg_billing_book_health_t h;
  tg_billing_book_health_get(b, 0, &h);
  CHECK(h.remote && !h.probed && h.serving && h.rejects);
  for (int i = 0; i < 10; i++)
    tg_billing_book_health(b, 0, false);
  tg_billing_book_decided(b, 0, false);
  tg_billing_book_health_get(b, 0, &h);
  CHECK(h.probed && !h.serving && !h.rejects);
  CHECK_INT(h.consecutive_failures, 10);
  tg_billing_book_health(b, 0, true);
  tg_billing_book_health_get(b, 0, &h);
  CHECK(h.serving);
  CHECK_INT(h.consecutive_failures, 0);
  tg_billing_book_health_get(b, 2, &h);
  CHECK(!h.remote);
  tg_billing_book_free(b);
}
