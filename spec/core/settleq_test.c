#include <errno.h>
#include <sys/stat.h>
#include <time.h>
#include <uv.h>

#include "base/buf.h"
#include "base/metrics.h"
#include "ledger/v1/ledger.pb-c.h"
#include "ledger/wal.h"
#include "pay/settleq.h"
#include "test.h"
#include "tmpfiles.h"

#define ST(x) LEDGER__V1__SETTLEMENT_STATE__SETTLEMENT_STATE_##x
#define ASSET "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
#define PAYER "0x857b06519E91e3A54538791bDbb0E22373e36b66"

/* ---- the lead's hooks, scripted */

typedef struct hooks_state {
  tg_settle_status_t script[16]; /* answer of each send in order; past the end: OK */
  int nscript;
  int sends, probes, failures;
  bool probe_used; /* past probe_answers */
  int probe_answers[8];
  int nprobe_answers;
  int probe_status;
  bool async;      /* answer from a timer rather than inside the call */
  bool hold;       /* never answer (until released) */
  char sent[1024]; /* ids, comma separated, in send order */
  char failure[256];
  char failed_id[TG_SETTLEQ_ID_LEN];
  tg_settle_done_cb held_done;
  void *held_arg;
} hooks_state_t;

static hooks_state_t hs;

typedef struct later {
  uv_timer_t t;
  tg_settle_done_cb done;
  void *arg;
  tg_settle_status_t status;
} later_t;

static void answer(tg_settle_done_cb done, void *arg, tg_settle_status_t st) {
  tg_settle_result_t r = {st, NULL, NULL, "http://127.0.0.1:4021"};
  if (st == TG_SETTLE_OK || st == TG_SETTLE_PENDING)
    r.transaction = "0x1111111111111111111111111111111111111111111111111111111111111111";
  if (st == TG_SETTLE_REFUSED)
    r.reason = "invalid_exact_evm_payload_signature";
  if (st == TG_SETTLE_RETRY)
    r.reason = "facilitator timed out";
  done(arg, &r);
}

static void on_later_closed(uv_handle_t *h) { free(h->data); }

static void on_later(uv_timer_t *t) {
  later_t *l = t->data;
  answer(l->done, l->arg, l->status);
  uv_close((uv_handle_t *)t, on_later_closed);
}

static uv_loop_t *hook_loop;

static void h_send(void *ud, const tg_settle_item_t *it, tg_settle_done_cb done, void *arg) {
  (void)ud;
  tg_settle_status_t st = hs.sends < hs.nscript ? hs.script[hs.sends] : TG_SETTLE_OK;
  hs.sends++;
  size_t l = strlen(hs.sent);
  snprintf(hs.sent + l, sizeof hs.sent - l, "%s%s", l ? "," : "", it->id);
  if (hs.hold) {
    hs.held_done = done;
    hs.held_arg = arg;
    return;
  }
  if (!hs.async) {
    answer(done, arg, st);
    return;
  }
  later_t *x = calloc(1, sizeof *x);
  x->done = done, x->arg = arg, x->status = st;
  uv_timer_init(hook_loop, &x->t);
  x->t.data = x;
  uv_timer_start(&x->t, on_later, 1, 0);
}

static void h_probe(void *ud, const tg_settle_item_t *it, tg_settle_probe_cb done, void *arg) {
  (void)ud, (void)it;
  bool used = hs.probes < hs.nprobe_answers ? hs.probe_answers[hs.probes] != 0 : hs.probe_used;
  hs.probes++;
  done(arg, hs.probe_status, used);
}

static void h_failure(void *ud, const tg_settle_item_t *it, const char *reason) {
  (void)ud;
  hs.failures++;
  snprintf(hs.failure, sizeof hs.failure, "%s", reason);
  snprintf(hs.failed_id, sizeof hs.failed_id, "%s", it->id);
}

/* ---- a gateway: a log in a folder, one loop, the book and its runner */

typedef struct env {
  char dir[1024];
  tg_wal_t *w;
  uv_loop_t loop;
  tg_wal_client_t *c;
  tg_settleq_t *q;
  tg_settleq_runner_t *r;
  tg_wal_recovery_t rec;
} env_t;

static int replay(void *arg, uint64_t seq, const void *p, size_t len) { return tg_settleq_replay(arg, seq, p, len); }

static uint64_t capacity_; /* 0: the default */

/* Opens (or reopens) the log in TMPDIR/name and replays it into a new book. */
static int env_open(env_t *e, const char *name) {
  quiet_logs();
  (void)now_s, (void)tmp_write;
  tg_settleq_metrics_init();
  memset(e, 0, sizeof *e);
  snprintf(e->dir, sizeof e->dir, "%s", tmp_path(name));
  e->q = tg_settleq_new("gw-test");
  tg_wal_opts_t o;
  tg_wal_opts_init(&o);
  o.dir = e->dir;
  o.batch_interval_us = 0;
  o.replay = replay;
  o.replay_arg = e->q;
  if (capacity_)
    o.capacity_bytes = capacity_;
  char err[256];
  if (e->q == NULL || tg_wal_open(&o, &e->w, &e->rec, err, sizeof err) != 0)
    return -1;
  hook_loop = &e->loop;
  uv_loop_init(&e->loop);
  return tg_wal_client_new(e->w, &e->loop, &e->c);
}

static size_t max_inflight; /* 0: the default */

static int env_run(env_t *e, bool probe) {
  tg_settleq_hooks_t h = {h_send, probe ? h_probe : NULL, h_failure, NULL};
  tg_settleq_runner_opts_t o;
  tg_settleq_runner_opts_init(&o);
  o.backoff_min_ms = 10;
  o.backoff_max_ms = 40;
  o.tick_ms = 5;
  o.max_inflight = max_inflight;
  return tg_settleq_runner_new(e->q, &e->loop, e->c, &h, &o, &e->r);
}

/* Stops everything; the folder stays (for a restart). */
static void env_close(env_t *e) {
  tg_settleq_runner_free(e->r);
  e->r = NULL;
  tg_wal_client_release(e->c);
  uv_run(&e->loop, UV_RUN_DEFAULT);
  tg_wal_close(e->w);
  uv_loop_close(&e->loop);
  tg_settleq_free(e->q);
}

static void noop_timer(uv_timer_t *t) { (void)t; }

/* Runs the loop until cond(e) or 5 s. */
static bool run_until(env_t *e, bool (*cond)(env_t *)) {
  uv_timer_t guard; /* keeps UV_RUN_ONCE from blocking without a runner */
  uv_timer_init(&e->loop, &guard);
  uv_timer_start(&guard, noop_timer, 5, 5);
  double until = now_s() + 5;
  bool ok;
  while (!(ok = cond(e)) && now_s() < until)
    uv_run(&e->loop, UV_RUN_ONCE);
  uv_close((uv_handle_t *)&guard, NULL);
  uv_run(&e->loop, UV_RUN_NOWAIT);
  return ok;
}

static bool book_empty(env_t *e) { return tg_settleq_count(e->q) == 0 && tg_settleq_runner_busy(e->r) == 0; }

/* ---- items and records */

static tg_settle_item_t item_of(const char *tenant, int i, int64_t valid_before, char *req, size_t reqsize) {
  snprintf(req, reqsize, "{\"x402Version\":2,\"paymentPayload\":{\"n\":%d}}", i);
  tg_settle_item_t it = {.tenant = tenant,
                         .network = "eip155:84532",
                         .scheme = "exact",
                         .asset = ASSET,
                         .payer = PAYER,
                         .amount = "1500",
                         .request_id = "req-1",
                         .valid_before = valid_before,
                         .request = req,
                         .request_len = strlen(req)};
  memset(it.nonce, i, sizeof it.nonce);
  return it;
}

typedef struct enq_result {
  int done, status;
  char id[TG_SETTLEQ_ID_LEN];
} enq_result_t;

static void on_enqueued(void *arg, int status, const char *id) {
  enq_result_t *r = arg;
  r->done++;
  r->status = status;
  snprintf(r->id, sizeof r->id, "%s", id);
}

static enq_result_t enq_;
static bool enq_done(env_t *e) {
  (void)e;
  return enq_.done > 0;
}

/* Enqueues one item and waits for its PENDING record to be durable. */
static int enqueue_wait(env_t *e, const tg_settle_item_t *it, char id[TG_SETTLEQ_ID_LEN]) {
  memset(&enq_, 0, sizeof enq_);
  int rc = tg_settleq_enqueue(e->q, e->c, it, on_enqueued, &enq_, id);
  if (rc != 0)
    return rc;
  if (!run_until(e, enq_done))
    return -ETIMEDOUT;
  return strcmp(enq_.id, id) == 0 ? enq_.status : -EPROTO;
}

/* Appends a record through the env's client and waits for it. */
static int ndone_;
static void on_appended(void *arg, int status, uint64_t seq) {
  (void)seq;
  *(int *)arg = status;
  ndone_++;
}
static bool appended(env_t *e) {
  (void)e;
  return ndone_ > 0;
}
static int append_wait(env_t *e, const tg_settle_item_t *it, uint32_t state, uint32_t attempts) {
  size_t len;
  uint8_t *rec = tg_settleq_record(it, state, attempts, state == ST(SETTLED) ? "0xabc" : NULL,
                                   state == ST(FAILED) ? "refused" : NULL, NULL, 0, "gw-test", &len);
  int status = -1;
  ndone_ = 0;
  int rc = tg_wal_append(e->c, rec, len, on_appended, &status, NULL);
  free(rec);
  if (rc != 0 || !run_until(e, appended))
    return -1;
  return status;
}

/* The states of id's records, in log order: "PASRF..." */
typedef struct states {
  const char *id;
  char s[64];
  char last_error[192];
  char last_tx[96];
  uint32_t last_attempts;
} states_t;

static int on_scan(void *arg, uint64_t seq, const void *p, size_t len) {
  states_t *st = arg;
  (void)seq;
  Ledger__V1__Record *r = ledger__v1__record__unpack(NULL, len, p);
  if (r == NULL)
    return -1;
  if (r->kind_case == LEDGER__V1__RECORD__KIND_SETTLEMENT && strcmp(r->settlement->id, st->id) == 0) {
    static const char letters[] = "?PASFR";
    size_t l = strlen(st->s);
    if (l + 1 < sizeof st->s)
      st->s[l] = r->settlement->state < 6 ? letters[r->settlement->state] : '!', st->s[l + 1] = '\0';
    snprintf(st->last_error, sizeof st->last_error, "%s", r->settlement->error);
    snprintf(st->last_tx, sizeof st->last_tx, "%s", r->settlement->transaction);
    st->last_attempts = r->settlement->attempts;
  }
  ledger__v1__record__free_unpacked(r, NULL);
  return 0;
}

static states_t states_of(env_t *e, const char *id) {
  states_t st = {.id = id};
  char err[256];
  if (tg_wal_scan(e->dir, on_scan, &st, NULL, err, sizeof err) != 0)
    snprintf(st.s, sizeof st.s, "(scan failed: %.40s)", err);
  return st;
}

/* A metric's value as rendered ("name{labels}"), -1 when absent. */
static double metric(const char *series) {
  tg_buf_t b = {0};
  double v = -1;
  if (tg_metrics_render(&b) != 0)
    return -2;
  tg_buf_append(&b, "", 1);
  size_t sl = strlen(series);
  for (const char *p = (const char *)b.data; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL)
    if (strncmp(p, series, sl) == 0 && p[sl] == ' ') {
      v = strtod(p + sl + 1, NULL);
      break;
    }
  tg_buf_free(&b);
  return v;
}

static double unsettled(const char *tenant) {
  char s[256];
  snprintf(s, sizeof s,
           "t402_unsettled_amount{tenant_id=\"%s\",network=\"eip155:84532\","
           "asset=\"%s\"}",
           tenant, ASSET);
  return metric(s);
}

static double settlements(const char *status) {
  char s[256];
  snprintf(s, sizeof s,
           "t402_settlements_total{network=\"eip155:84532\",scheme=\"exact\","
           "status=\"%s\"}",
           status);
  double v = metric(s);
  return v < 0 ? 0 : v;
}

static int64_t later_s(void) { return (int64_t)time(NULL) + 3600; }

static int count_of(const char *list, const char *id) {
  int n = 0;
  for (const char *p = list; (p = strstr(p, id)) != NULL; p += strlen(id))
    n++;
  return n;
}

/* ---- tests */

TEST(record_round_trip) {
  char req[128];
  tg_settle_item_t it = item_of("news", 7, 1796551260, req, sizeof req);
  it.id = "st_00112233445566778899aabbccddeeff";
  size_t len;
  uint8_t *b = tg_settleq_record(&it, ST(PENDING), 0, NULL, NULL, NULL, 0, "gw-1", &len);
  CHECK(b != NULL);
  Ledger__V1__Record *r = ledger__v1__record__unpack(NULL, len, b);
  free(b);
  CHECK(r != NULL);
  CHECK_INT(r->kind_case, LEDGER__V1__RECORD__KIND_SETTLEMENT);
  CHECK_STR(r->instance, "gw-1");
  CHECK(r->at_unix_ms > 0);
  const Ledger__V1__Settlement *s = r->settlement;
  CHECK_STR(s->id, it.id);
  CHECK_STR(s->tenant, "news");
  CHECK_STR(s->network, "eip155:84532");
  CHECK_STR(s->scheme, "exact");
  CHECK_STR(s->asset, ASSET);
  CHECK_STR(s->payer, PAYER);
  CHECK_STR(s->amount, "1500");
  CHECK_STR(s->request_id, "req-1");
  CHECK_INT(s->state, ST(PENDING));
  CHECK_INT(s->valid_before, 1796551260);
  CHECK_INT(s->request.len, strlen(req));
  CHECK(memcmp(s->request.data, req, strlen(req)) == 0);
  CHECK_INT(s->nonce.len, 32);
  CHECK_INT(s->nonce.data[31], 7);
  ledger__v1__record__free_unpacked(r, NULL);

  /* Later records name it but do not repeat the request. */
  b = tg_settleq_record(&it, ST(RETRY), 3, "0xfeed", "settlement pending", "http://f", 1796551230123, "gw-1", &len);
  r = ledger__v1__record__unpack(NULL, len, b);
  free(b);
  CHECK(r != NULL);
  s = r->settlement;
  CHECK_INT(s->state, ST(RETRY));
  CHECK_INT(s->attempts, 3);
  CHECK_STR(s->transaction, "0xfeed");
  CHECK_STR(s->error, "settlement pending");
  CHECK_STR(s->facilitator, "http://f");
  CHECK_INT(s->next_attempt_unix_ms, 1796551230123);
  CHECK_INT(s->request.len, 0);
  CHECK_INT(s->nonce.len, 0);
  CHECK_STR(s->tenant, "news");
  ledger__v1__record__free_unpacked(r, NULL);
}

TEST(enqueue_refuses_bad_items) {
  env_t e;
  CHECK(env_open(&e, "bad") == 0);
  char req[128], id[TG_SETTLEQ_ID_LEN];
  tg_settle_item_t it = item_of("bad", 1, later_s(), req, sizeof req);
  enq_result_t r = {0};
  it.amount = "1.5";
  CHECK_INT(tg_settleq_enqueue(e.q, e.c, &it, on_enqueued, &r, id), -EINVAL);
  it.amount = "";
  CHECK_INT(tg_settleq_enqueue(e.q, e.c, &it, on_enqueued, &r, id), -EINVAL);
  it.amount = "1500";
  it.tenant = NULL;
  CHECK_INT(tg_settleq_enqueue(e.q, e.c, &it, on_enqueued, &r, id), -EINVAL);
  it.tenant = "bad";
  it.request_len = 0;
  CHECK_INT(tg_settleq_enqueue(e.q, e.c, &it, on_enqueued, &r, id), -EINVAL);
  it.request_len = strlen(req);
  CHECK_INT(tg_settleq_enqueue(e.q, e.c, &it, NULL, &r, id), -EINVAL);
  CHECK_INT(tg_settleq_count(e.q), 0);
  CHECK_INT(r.done, 0);
  env_close(&e);
}

TEST(enqueue_then_settled) {
  memset(&hs, 0, sizeof hs);
  hs.async = true;
  env_t e;
  CHECK(env_open(&e, "settle") == 0);
  double pending0 = settlements("pending"), settled0 = settlements("settled");
  char req[3][128], id[3][TG_SETTLEQ_ID_LEN];
  for (int i = 0; i < 3; i++) {
    tg_settle_item_t it = item_of("settle", i + 1, later_s(), req[i], sizeof req[i]);
    CHECK_INT(enqueue_wait(&e, &it, id[i]), 0);
    CHECK(strncmp(id[i], "st_", 3) == 0 && strlen(id[i]) == 35);
  }
  CHECK(strcmp(id[0], id[1]) != 0);
  /* Durable and in the book before any runner: what a restart would find too.
   */
  CHECK_INT(tg_settleq_count(e.q), 3);
  CHECK(tg_settleq_oldest_seq(e.q) == 1);
  CHECK(tg_settleq_covered(e.q, 100) == 0);
  CHECK(unsettled("settle") == 4500);
  CHECK(settlements("pending") == pending0 + 3);
  bool queued = false;
  CHECK_INT(tg_settleq_info(e.q, id[1], NULL, NULL, &queued), 0);
  CHECK(queued);

  CHECK_INT(env_run(&e, false), 0);
  CHECK(run_until(&e, book_empty));
  CHECK_INT(hs.sends, 3);
  for (int i = 0; i < 3; i++) {
    CHECK_INT(count_of(hs.sent, id[i]), 1);
    states_t st = states_of(&e, id[i]);
    CHECK_STR(st.s, "PAS");
    CHECK_STR(st.last_tx, "0x1111111111111111111111111111111111111111111111111111111111111111");
    CHECK_INT(st.last_attempts, 1);
    CHECK_INT(tg_settleq_info(e.q, id[i], NULL, NULL, NULL), -ENOENT);
  }
  CHECK(unsettled("settle") == 0);
  CHECK(settlements("settled") == settled0 + 3);
  CHECK(tg_settleq_oldest_seq(e.q) == 0);
  CHECK(tg_settleq_covered(e.q, 100) == 100);
  CHECK_INT(hs.failures, 0);
  env_close(&e);
}

TEST(retryable_failure_then_settled) {
  memset(&hs, 0, sizeof hs);
  hs.script[0] = TG_SETTLE_RETRY;
  hs.script[1] = TG_SETTLE_PENDING;
  hs.nscript = 2;
  env_t e;
  CHECK(env_open(&e, "retry") == 0);
  double retry0 = settlements("retry");
  CHECK_INT(env_run(&e, false), 0);
  char req[128], id[TG_SETTLEQ_ID_LEN];
  tg_settle_item_t it = item_of("retry", 1, later_s(), req, sizeof req);
  CHECK_INT(enqueue_wait(&e, &it, id), 0);
  CHECK(run_until(&e, book_empty));
  CHECK_INT(hs.sends, 3); /* unavailable, pending, settled: each sent after its ATTEMPT */
  states_t st = states_of(&e, id);
  CHECK_STR(st.s, "PARARAS");
  CHECK_INT(st.last_attempts, 3);
  CHECK(settlements("retry") == retry0 + 2);
  CHECK_INT(hs.failures, 0);
  env_close(&e);
}

TEST(refused_fails_once) {
  memset(&hs, 0, sizeof hs);
  hs.script[0] = TG_SETTLE_REFUSED;
  hs.nscript = 1;
  env_t e;
  CHECK(env_open(&e, "refused") == 0);
  double failed0 = settlements("failed");
  CHECK_INT(env_run(&e, true), 0);
  char req[128], id[TG_SETTLEQ_ID_LEN];
  tg_settle_item_t it = item_of("refused", 1, later_s(), req, sizeof req);
  CHECK_INT(enqueue_wait(&e, &it, id), 0);
  CHECK(run_until(&e, book_empty));
  CHECK_INT(hs.sends, 1);
  CHECK_INT(hs.probes, 0); /* nothing was sent before: a refusal is the answer */
  CHECK_INT(hs.failures, 1);
  CHECK_STR(hs.failed_id, id);
  CHECK_STR(hs.failure, "invalid_exact_evm_payload_signature");
  states_t st = states_of(&e, id);
  CHECK_STR(st.s, "PAF");
  CHECK_STR(st.last_error, "invalid_exact_evm_payload_signature");
  CHECK(settlements("failed") == failed0 + 1);
  CHECK(unsettled("refused") == 0);
  env_close(&e);
}

/* A timed-out send may have gone through: the refusal of the next one is
 * checked against the chain before it is called a failure. Returns the
 * states of its records. */
static const char *refused_after_timeout(const char *name, bool used_at_last, char id[TG_SETTLEQ_ID_LEN]) {
  static states_t st;
  memset(&hs, 0, sizeof hs);
  hs.script[0] = TG_SETTLE_RETRY;
  hs.script[1] = TG_SETTLE_REFUSED;
  hs.nscript = 2;
  hs.probe_answers[0] = 0; /* before the second send: unused */
  hs.probe_answers[1] = used_at_last;
  hs.nprobe_answers = 2;
  env_t e;
  char req[128];
  tg_settle_item_t it = item_of(name, 1, later_s(), req, sizeof req);
  if (env_open(&e, name) != 0 || env_run(&e, true) != 0 || enqueue_wait(&e, &it, id) != 0 || !run_until(&e, book_empty))
    return "(did not settle)";
  st = states_of(&e, id);
  env_close(&e);
  return st.s;
}

TEST(refused_after_a_timeout_asks_the_chain) {
  char id[TG_SETTLEQ_ID_LEN];
  CHECK_STR(refused_after_timeout("timeout_used", true, id), "PARAS");
  CHECK_INT(hs.sends, 2);
  CHECK_INT(hs.probes, 2);
  CHECK_INT(hs.failures, 0);

  CHECK_STR(refused_after_timeout("timeout_unused", false, id), "PARAF");
  CHECK_INT(hs.sends, 2);
  CHECK_INT(hs.probes, 2);
  CHECK_INT(hs.failures, 1);
  CHECK_STR(hs.failure, "invalid_exact_evm_payload_signature");
  CHECK_STR(hs.failed_id, id);
}

TEST(expired_authorization_fails_without_a_send) {
  memset(&hs, 0, sizeof hs);
  env_t e;
  CHECK(env_open(&e, "expired") == 0);
  CHECK_INT(env_run(&e, true), 0);
  char req[128], id[TG_SETTLEQ_ID_LEN];
  tg_settle_item_t it = item_of("expired", 1, (int64_t)time(NULL) - 5, req, sizeof req);
  CHECK_INT(enqueue_wait(&e, &it, id), 0);
  CHECK(run_until(&e, book_empty));
  CHECK_INT(hs.sends, 0);
  CHECK_INT(hs.probes, 0); /* never sent: nothing to ask */
  CHECK_INT(hs.failures, 1);
  CHECK(strstr(hs.failure, "validBefore") != NULL);
  CHECK_STR(states_of(&e, id).s, "PF");
  env_close(&e);
}

/* The log of a gateway that stopped with five settlements in every state. */
static int write_five(env_t *e, char req[5][128], char ids[5][TG_SETTLEQ_ID_LEN], const char *tenant) {
  static const char *const names[5] = {"st_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "st_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
                                       "st_cccccccccccccccccccccccccccccccc", "st_dddddddddddddddddddddddddddddddd",
                                       "st_eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee"};
  tg_settle_item_t it[5];
  for (int i = 0; i < 5; i++) {
    it[i] = item_of(tenant, i + 1, later_s(), req[i], sizeof req[0]);
    snprintf(ids[i], TG_SETTLEQ_ID_LEN, "%s", names[i]);
    it[i].id = ids[i];
    if (append_wait(e, &it[i], ST(PENDING), 0) != 0)
      return -1;
  }
  /* a: PENDING only (served, never tried); b: ATTEMPT (sent or not: unknown);
   * c: ATTEMPT, RETRY; d: settled; e: failed. */
  if (append_wait(e, &it[1], ST(ATTEMPT), 1) || append_wait(e, &it[2], ST(ATTEMPT), 1) ||
      append_wait(e, &it[2], ST(RETRY), 1) || append_wait(e, &it[3], ST(ATTEMPT), 1) ||
      append_wait(e, &it[3], ST(SETTLED), 1) || append_wait(e, &it[4], ST(ATTEMPT), 1) ||
      append_wait(e, &it[4], ST(FAILED), 1))
    return -1;
  return 0;
}

TEST(restart_rebuilds_the_unsettled) {
  memset(&hs, 0, sizeof hs);
  env_t e;
  char req[5][128], ids[5][TG_SETTLEQ_ID_LEN];
  CHECK(env_open(&e, "rebuild") == 0);
  CHECK_INT(write_five(&e, req, ids, "rebuild"), 0);
  env_close(&e);

  CHECK(env_open(&e, "rebuild") == 0);
  CHECK_INT(e.rec.records, 12);
  CHECK_INT(tg_settleq_count(e.q), 3);
  uint32_t attempts = 9;
  bool sent = true, queued = false;
  CHECK_INT(tg_settleq_info(e.q, ids[0], &attempts, &sent, &queued), 0);
  CHECK_INT(attempts, 0);
  CHECK(!sent && queued);
  CHECK_INT(tg_settleq_info(e.q, ids[1], &attempts, &sent, NULL), 0);
  CHECK_INT(attempts, 1);
  CHECK(sent);
  CHECK_INT(tg_settleq_info(e.q, ids[2], &attempts, &sent, NULL), 0);
  CHECK_INT(attempts, 1);
  CHECK(sent);
  CHECK_INT(tg_settleq_info(e.q, ids[3], NULL, NULL, NULL), -ENOENT);
  CHECK_INT(tg_settleq_info(e.q, ids[4], NULL, NULL, NULL), -ENOENT);
  CHECK(tg_settleq_oldest_seq(e.q) == 1); /* a's PENDING */
  CHECK(unsettled("rebuild") == 4500);
  env_close(&e);
}

TEST(after_restart_an_attempt_is_probed_first) {
  memset(&hs, 0, sizeof hs);
  hs.probe_used = true; /* b and c went through before the stop */
  env_t e;
  char req[5][128], ids[5][TG_SETTLEQ_ID_LEN];
  CHECK(env_open(&e, "probe") == 0);
  CHECK_INT(write_five(&e, req, ids, "probe"), 0);
  env_close(&e);

  CHECK(env_open(&e, "probe") == 0);
  CHECK_INT(env_run(&e, true), 0);
  CHECK(run_until(&e, book_empty));
  CHECK_INT(hs.probes, 2); /* b and c: a was never sent */
  CHECK_INT(hs.sends, 1);
  CHECK_STR(hs.sent, ids[0]);
  CHECK_STR(states_of(&e, ids[0]).s, "PAS");
  states_t b = states_of(&e, ids[1]);
  CHECK_STR(b.s, "PAS");
  CHECK_STR(b.last_tx, "");
  CHECK(strstr(b.last_error, "earlier attempt") != NULL);
  CHECK_STR(states_of(&e, ids[2]).s, "PARS");
  CHECK_STR(states_of(&e, ids[3]).s, "PAS"); /* untouched */
  CHECK_STR(states_of(&e, ids[4]).s, "PAF");
  CHECK_INT(hs.failures, 0);
  CHECK(unsettled("probe") == 0);
  env_close(&e);
}

TEST(after_restart_unused_nonce_is_sent_once) {
  memset(&hs, 0, sizeof hs);
  hs.probe_used = false;
  env_t e;
  char req[5][128], ids[5][TG_SETTLEQ_ID_LEN];
  CHECK(env_open(&e, "unused") == 0);
  CHECK_INT(write_five(&e, req, ids, "unused"), 0);
  env_close(&e);

  CHECK(env_open(&e, "unused") == 0);
  CHECK_INT(env_run(&e, true), 0);
  CHECK(run_until(&e, book_empty));
  CHECK_INT(hs.probes, 2);
  CHECK_INT(hs.sends, 3);
  for (int i = 0; i < 3; i++)
    CHECK_INT(count_of(hs.sent, ids[i]), 1);
  CHECK_STR(states_of(&e, ids[1]).s, "PAAS");
  CHECK_INT(states_of(&e, ids[1]).last_attempts, 2);
  env_close(&e);
}

TEST(after_restart_without_probe_sent_once) {
  memset(&hs, 0, sizeof hs);
  hs.async = true;
  env_t e;
  char req[5][128], ids[5][TG_SETTLEQ_ID_LEN];
  CHECK(env_open(&e, "noprobe") == 0);
  CHECK_INT(write_five(&e, req, ids, "noprobe"), 0);
  env_close(&e);

  CHECK(env_open(&e, "noprobe") == 0);
  CHECK_INT(env_run(&e, false), 0);
  CHECK(run_until(&e, book_empty));
  CHECK_INT(hs.sends, 3);
  for (int i = 0; i < 3; i++)
    CHECK_INT(count_of(hs.sent, ids[i]), 1);
  CHECK_STR(states_of(&e, ids[2]).s, "PARAS");
  env_close(&e);

  /* And a third start finds nothing to do. */
  CHECK(env_open(&e, "noprobe") == 0);
  CHECK_INT(tg_settleq_count(e.q), 0);
  env_close(&e);
}

static bool one_held(env_t *e) {
  (void)e;
  return hs.held_done != NULL;
}

/* Killed between serving and settling: the settlement is sent after the
 * restart, exactly once. */
TEST(killed_between_serving_and_settling) {
  memset(&hs, 0, sizeof hs);
  hs.hold = true;
  env_t e;
  CHECK(env_open(&e, "killed") == 0);
  char req[2][128], id[2][TG_SETTLEQ_ID_LEN];
  tg_settle_item_t a = item_of("killed", 1, later_s(), req[0], sizeof req[0]);
  tg_settle_item_t b = item_of("killed", 2, later_s(), req[1], sizeof req[1]);
  CHECK_INT(enqueue_wait(&e, &a, id[0]), 0); /* served: never tried */
  max_inflight = 1;                          /* a is sent, b waits for room */
  CHECK_INT(env_run(&e, false), 0);
  max_inflight = 0;
  CHECK_INT(enqueue_wait(&e, &b, id[1]), 0);
  CHECK(run_until(&e, one_held)); /* a sent, its answer not in yet */
  CHECK_INT(hs.sends, 1);
  /* The runner stops with the send in flight; its late answer is dropped. */
  tg_settleq_runner_free(e.r);
  e.r = NULL;
  hs.held_done(hs.held_arg, &(tg_settle_result_t){TG_SETTLE_OK, "0x22", NULL, NULL});
  CHECK_INT(tg_settleq_count(e.q), 2);
  env_close(&e);

  memset(&hs, 0, sizeof hs);
  hs.probe_used = false;
  CHECK(env_open(&e, "killed") == 0);
  CHECK_INT(tg_settleq_count(e.q), 2);
  CHECK_INT(env_run(&e, true), 0);
  CHECK(run_until(&e, book_empty));
  CHECK_INT(hs.sends, 2);
  CHECK_INT(hs.probes, 1); /* the one whose ATTEMPT was written */
  CHECK_INT(count_of(hs.sent, id[0]), 1);
  CHECK_INT(count_of(hs.sent, id[1]), 1);
  env_close(&e);

  CHECK(env_open(&e, "killed") == 0);
  CHECK_INT(tg_settleq_count(e.q), 0);
  env_close(&e);
}

TEST(retention_keeps_what_is_owed) {
  memset(&hs, 0, sizeof hs);
  env_t e;
  CHECK(env_open(&e, "retain") == 0);
  char req[128], id[TG_SETTLEQ_ID_LEN];
  tg_settle_item_t it = item_of("retain", 1, later_s(), req, sizeof req);
  CHECK_INT(append_wait(&e, &it, ST(ATTEMPT), 1), 0); /* seq 1: an unknown id, ignored */
  CHECK_INT(enqueue_wait(&e, &it, id), 0);
  CHECK(tg_settleq_oldest_seq(e.q) == 2);
  CHECK(tg_settleq_covered(e.q, 10) == 1);
  CHECK(tg_settleq_covered(e.q, 0) == 0);
  env_close(&e);
}

/* Workers enqueue on their own loops while the runner pays from another. */
typedef struct worker {
  uv_thread_t t;
  env_t *e;
  int n, done, errors;
  char tenant[32];
} worker_t;

static void on_worker_enqueued(void *arg, int status, const char *id) {
  worker_t *w = arg;
  (void)id;
  if (status != 0)
    w->errors++;
  __atomic_add_fetch(&w->done, 1, __ATOMIC_RELEASE);
}

static void worker_main(void *arg) {
  worker_t *w = arg;
  uv_loop_t loop;
  uv_loop_init(&loop);
  tg_wal_client_t *c;
  if (tg_wal_client_new(w->e->w, &loop, &c) != 0) {
    w->errors = w->n;
    return;
  }
  for (int i = 0; i < w->n; i++) {
    char req[128];
    tg_settle_item_t it = item_of(w->tenant, i, later_s(), req, sizeof req);
    int rc;
    while ((rc = tg_settleq_enqueue(w->e->q, c, &it, on_worker_enqueued, w, NULL)) == -EAGAIN)
      uv_run(&loop, UV_RUN_ONCE);
    if (rc != 0)
      w->errors++, __atomic_add_fetch(&w->done, 1, __ATOMIC_RELEASE);
  }
  while (__atomic_load_n(&w->done, __ATOMIC_ACQUIRE) < w->n)
    uv_run(&loop, UV_RUN_ONCE);
  tg_wal_client_free(c);
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
}

static worker_t workers_[4];
static bool all_settled(env_t *e) {
  int done = 0;
  for (int i = 0; i < 4; i++)
    done += __atomic_load_n(&workers_[i].done, __ATOMIC_ACQUIRE);
  return done == 4 * 50 && book_empty(e);
}

TEST(enqueues_from_several_workers) {
  memset(&hs, 0, sizeof hs);
  hs.async = true;
  env_t e;
  CHECK(env_open(&e, "workers") == 0);
  double settled0 = settlements("settled");
  CHECK_INT(env_run(&e, false), 0);
  for (int i = 0; i < 4; i++) {
    workers_[i] = (worker_t){.e = &e, .n = 50};
    snprintf(workers_[i].tenant, sizeof workers_[i].tenant, "workers%d", i);
    CHECK(uv_thread_create(&workers_[i].t, worker_main, &workers_[i]) == 0);
  }
  bool ok = run_until(&e, all_settled);
  for (int i = 0; i < 4; i++)
    uv_thread_join(&workers_[i].t);
  CHECK(ok || run_until(&e, all_settled));
  for (int i = 0; i < 4; i++) {
    CHECK_INT(workers_[i].errors, 0);
    CHECK(unsettled(workers_[i].tenant) == 0);
  }
  CHECK_INT(hs.sends, 200); /* each once */
  CHECK(settlements("settled") == settled0 + 200);
  env_close(&e);
}

/* A synchronous settle answered pending: queued as possibly sent, so the
 * chain is asked before any send, also after a restart. */
TEST(queued_after_a_pending_synchronous_settle) {
  memset(&hs, 0, sizeof hs);
  env_t e;
  CHECK(env_open(&e, "syncpending") == 0);
  char req[128], id[TG_SETTLEQ_ID_LEN];
  tg_settle_item_t it = item_of("syncpending", 1, later_s(), req, sizeof req);
  it.transaction = "0x2222";
  CHECK_INT(enqueue_wait(&e, &it, id), 0);
  uint32_t attempts = 0;
  bool sent = false;
  CHECK_INT(tg_settleq_info(e.q, id, &attempts, &sent, NULL), 0);
  CHECK_INT(attempts, 1);
  CHECK(sent);
  env_close(&e);

  CHECK(env_open(&e, "syncpending") == 0);
  sent = false;
  CHECK_INT(tg_settleq_info(e.q, id, &attempts, &sent, NULL), 0);
  CHECK(sent);
  hs.probe_used = true; /* the pending transaction went through */
  CHECK_INT(env_run(&e, true), 0);
  CHECK(run_until(&e, book_empty));
  CHECK_INT(hs.sends, 0);
  CHECK_INT(hs.probes, 1);
  states_t st = states_of(&e, id);
  CHECK_STR(st.s, "PS");
  env_close(&e);
}

static bool some_turns(env_t *e) {
  (void)e;
  static int n;
  return ++n % 40 == 0; /* some loop turns: the runner ticks every 5 ms */
}

/* A log with no room for the ATTEMPT record: nothing is sent, the settlement stays owed. */
TEST(no_send_without_its_attempt_record) {
  memset(&hs, 0, sizeof hs);
  char req[128], id[TG_SETTLEQ_ID_LEN];
  tg_settle_item_t it = item_of("full", 1, later_s(), req, sizeof req);
  size_t len;
  free(tg_settleq_record(&it, ST(PENDING), 0, NULL, NULL, NULL, 0, "gw-test", &len));
  capacity_ = TG_WAL_HEADER_SIZE * 3 + len + TG_WAL_RECORD_OVERHEAD + 16; /* no room for a second record */
  env_t e;
  int rc = env_open(&e, "full");
  capacity_ = 0;
  CHECK(rc == 0);
  CHECK_INT(enqueue_wait(&e, &it, id), 0);
  CHECK_INT(env_run(&e, false), 0);
  run_until(&e, some_turns);
  CHECK_INT(hs.sends, 0);
  CHECK_INT(tg_settleq_count(e.q), 1);
  uint32_t attempts = 9;
  bool sent = true;
  CHECK_INT(tg_settleq_info(e.q, id, &attempts, &sent, NULL), 0);
  CHECK_INT(attempts, 0);
  CHECK(!sent);
  CHECK_STR(states_of(&e, id).s, "P");
  env_close(&e);
}
