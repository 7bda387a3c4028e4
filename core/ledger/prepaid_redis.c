#include "ledger/prepaid_redis.h"

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "base/log.h"
#include "base/redisconn.h"

#define DEFAULT_HOLD_TTL_MS 60000
#define DEFAULT_CAPTURED_TTL_MS (7ull * 24 * 3600 * 1000)
#define MAX_INSTANCE 128

/* Shared by the scripts that look at holds. Redis < 5 needs effects
 * replication before a write that follows TIME; later versions ignore it.
 * sweep drops (at most 1000) expired holds, and puts `held` back to 0 when
 * no hold is left (the hold keys expired on their own). Amounts are decimal
 * strings handed to HINCRBY: no float math on money. */
#define PRELUDE                                                                                     \
  "if redis.replicate_commands then redis.replicate_commands() end\n"                               \
  "local acct, holds, amounts = KEYS[1], KEYS[2], KEYS[3]\n"                                        \
  "local t = redis.call('TIME')\n"                                                                  \
  "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"                         \
  "local dead = redis.call('ZRANGEBYSCORE', holds, '-inf', now, 'LIMIT', 0, 1000)\n"                \
  "if #dead > 0 then\n"                                                                             \
  "  for _, id in ipairs(dead) do\n"                                                                \
  "    local a = redis.call('HGET', amounts, id)\n"                                                 \
  "    if a then redis.call('HINCRBY', acct, 'held', '-' .. a) end\n"                               \
  "  end\n"                                                                                         \
  "  redis.call('ZREM', holds, unpack(dead))\n"                                                     \
  "  redis.call('HDEL', amounts, unpack(dead))\n"                                                   \
  "end\n"                                                                                           \
  "if redis.call('ZCARD', holds) == 0 then\n"                                                       \
  "  local h = redis.call('HGET', acct, 'held')\n"                                                  \
  "  if h and h ~= '0' then redis.call('HSET', acct, 'held', '0') end\n"                            \
  "end\n"                                                                                           \
  "local function drop_hold(id)\n"                                                                  \
  "  local a = redis.call('HGET', amounts, id)\n"                                                   \
  "  if not a then return 0 end\n"                                                                  \
  "  redis.call('HDEL', amounts, id)\n"                                                             \
  "  redis.call('ZREM', holds, id)\n"                                                               \
  "  redis.call('HINCRBY', acct, 'held', '-' .. a)\n"                                               \
  "  return 1\n"                                                                                    \
  "end\n"

/* KEYS acct holds amounts; ARGV amount, hold id, ttl ms. {1, available after} or {0, available}. */
static const char hold_script[] =
    PRELUDE
    "local v = redis.call('HMGET', acct, 'balance', 'held')\n"
    "local avail = tonumber(v[1] or '0') - tonumber(v[2] or '0')\n"
    "local amount = tonumber(ARGV[1])\n"
    "if amount == 0 then return {1, avail} end\n"
    "if avail < amount then return {0, avail} end\n"
    "if redis.call('HSETNX', amounts, ARGV[2], ARGV[1]) == 0 then\n"
    "  return redis.error_reply('ERR tollgate prepaid: hold id already in use')\n"
    "end\n"
    "local ttl = tonumber(ARGV[3])\n"
    "redis.call('ZADD', holds, now + ttl, ARGV[2])\n"
    "redis.call('HINCRBY', acct, 'held', ARGV[1])\n"
    "if redis.call('PTTL', holds) < ttl then\n"
    "  redis.call('PEXPIRE', holds, ARGV[3])\n"
    "  redis.call('PEXPIRE', amounts, ARGV[3])\n"
    "end\n"
    "return {1, avail - amount}\n";

/* KEYS acct holds amounts captured; ARGV amount, hold id (maybe ""), captured ttl ms.
 * {1, balance after} or {0, balance} when txid was captured already. */
static const char capture_script[] =
    PRELUDE
    "if not redis.call('SET', KEYS[4], '1', 'NX', 'PX', ARGV[3]) then\n"
    "  return {0, tonumber(redis.call('HGET', acct, 'balance') or '0')}\n"
    "end\n"
    "if ARGV[2] ~= '' then drop_hold(ARGV[2]) end\n"
    "if ARGV[1] == '0' then return {1, tonumber(redis.call('HGET', acct, 'balance') or '0')} end\n"
    "return {1, redis.call('HINCRBY', acct, 'balance', '-' .. ARGV[1])}\n";

/* KEYS acct holds amounts; ARGV hold id. {1, 0} dropped or {0, 0}. */
static const char release_script[] =
    PRELUDE
    "return {drop_hold(ARGV[1]), 0}\n";

/* KEYS acct [credit]; ARGV amount, limit. {1, balance after}, {0, balance}
 * (reference applied already) or the error OVERFLOW. amount > limit - bal is
 * exact for amount <= 2^53 (bal + amount could round). */
static const char credit_script[] =
    "local acct, ref = KEYS[1], KEYS[2]\n"
    "local bal = tonumber(redis.call('HGET', acct, 'balance') or '0')\n"
    "if ref and redis.call('EXISTS', ref) == 1 then return {0, bal} end\n"
    "if tonumber(ARGV[1]) > tonumber(ARGV[2]) - bal then\n"
    "  return redis.error_reply('OVERFLOW tollgate prepaid: the balance would pass 2^53')\n"
    "end\n"
    "if ref then redis.call('SET', ref, '1') end\n"
    "return {1, redis.call('HINCRBY', acct, 'balance', ARGV[1])}\n";

/* KEYS acct holds amounts. {balance, held}. */
static const char balance_script[] =
    PRELUDE
    "local v = redis.call('HMGET', acct, 'balance', 'held')\n"
    "return {tonumber(v[1] or '0'), tonumber(v[2] or '0')}\n";

enum { OP_HOLD, OP_CAPTURE, OP_RELEASE, OP_CREDIT, OP_BALANCE, OP_COUNT };

/* Registered with the connection in this order: the index is the op's kind. */
static const tg_redisconn_script_t scripts[OP_COUNT] = {
    {hold_script, sizeof(hold_script) - 1},       {capture_script, sizeof(capture_script) - 1},
    {release_script, sizeof(release_script) - 1}, {credit_script, sizeof(credit_script) - 1},
    {balance_script, sizeof(balance_script) - 1},
};

#define MAX_PARTS 8 /* keys then arguments of one script call */

/* One call's caller; the connection keeps the command. */
typedef struct op {
  tg_prepaid_redis_t *r;
  void *cb; /* typed by kind */
  void *arg;
  int kind;
  char hold_id[TG_PREPAID_REDIS_HOLD_ID_LEN + 1];
} op_t;

/* The keys and arguments of one call, built on the stack. */
typedef struct parts {
  int n, nkeys;
  const char *argv[MAX_PARTS];
  size_t lens[MAX_PARTS];
  size_t used;
  char buf[3 * (32 + TG_PREPAID_REDIS_MAX_REF + TG_PREPAID_REDIS_MAX_CURRENCY) + 2 * (32 + TG_PREPAID_REDIS_MAX_ID) +
           3 * 24];
} parts_t;

struct tg_prepaid_redis {
  tg_redisconn_t *conn;
  char hold_ttl[24], captured_ttl[24], limit[24]; /* decimal text for the scripts */
  uint64_t id_prefix; /* random, drawn once: the first half of every hold id */
  uint64_t id_counter;
};

/* Runs the callback once and frees the op. */
static void deliver(op_t *q, int status, int64_t a, int64_t b) {
  if (status == -ETIMEDOUT || status == -ECONNREFUSED || status == -EIO)
    tg_redisconn_log_down(q->r->conn, status == -ETIMEDOUT      ? "timeout"
                                      : status == -ECONNREFUSED ? "unavailable"
                                                                : "error");
  if (status < 0 && status != -ENOSPC)
    a = b = 0;
  switch (q->kind) {
  case OP_HOLD:
    ((tg_prepaid_redis_hold_cb)q->cb)(q->arg, status, status == 0 ? q->hold_id : NULL, a);
    break;
  case OP_BALANCE:
    ((tg_prepaid_redis_balance_cb)q->cb)(q->arg, status, a, b);
    break;
  default:
    ((tg_prepaid_redis_done_cb)q->cb)(q->arg, status, a);
  }
  free(q);
}

static bool two_ints(const redisReply *rep) {
  return rep->type == REDIS_REPLY_ARRAY && rep->elements == 2 && rep->element[0]->type == REDIS_REPLY_INTEGER &&
         rep->element[1]->type == REDIS_REPLY_INTEGER;
}

/* A hold that succeeded after its caller was told -ETIMEDOUT: nobody will
 * capture it, so the connection releases it rather than after hold_ttl_ms. */
static bool late_hold(const redisReply *rep) {
  return two_ints(rep) && rep->element[0]->integer == 1;
}

/* The answer of a well-formed reply; false when the reply is not one. */
static bool handle_two_ints(op_t *q, long long x, long long y) {
  switch (q->kind) {
  case OP_HOLD:
    if (x != 0 && x != 1)
      return false;
    deliver(q, x == 1 ? 0 : -ENOSPC, y, 0);
    return true;
  case OP_BALANCE:
    deliver(q, 0, x, y);
    return true;
  default:
    if (x != 0 && x != 1)
      return false;
    deliver(q, (int)x, y, 0);
    return true;
  }
}

static void reply_cb(void *arg, int status, const redisReply *rep) {
  op_t *q = arg;
  if (status != 0) {
    deliver(q, status, 0, 0);
    return;
  }
  if (q->kind == OP_CREDIT && rep->type == REDIS_REPLY_ERROR && strncmp(rep->str, "OVERFLOW", 8) == 0) {
    deliver(q, -EOVERFLOW, 0, 0);
    return;
  }
  if (two_ints(rep) && handle_two_ints(q, rep->element[0]->integer, rep->element[1]->integer))
    return;
  const char *detail = rep->type == REDIS_REPLY_ERROR ? rep->str : NULL;
  tg_redisconn_set_error(q->r->conn, "unexpected reply", detail);
  tg_log(TG_LOG_ERROR, "prepaid: unexpected reply from redis", "redis", tg_redisconn_addr(q->r->conn), "error",
         detail ? detail : "unexpected reply", NULL);
  deliver(q, -EIO, 0, 0);
}

/* ---- building a call */

static bool valid_ref(const char *s) {
  size_t n = s ? strlen(s) : 0;
  return n >= 1 && n <= TG_PREPAID_REDIS_MAX_REF;
}

static bool valid_id(const char *s) {
  size_t n = s ? strlen(s) : 0;
  return n >= 1 && n <= TG_PREPAID_REDIS_MAX_ID;
}

static bool valid_currency(const char *s) {
  size_t n = s ? strlen(s) : 0;
  if (n < 1 || n > TG_PREPAID_REDIS_MAX_CURRENCY)
    return false;
  for (size_t i = 0; i < n; i++) {
    char c = s[i];
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')))
      return false;
  }
  return true;
}

static bool valid_amount(int64_t amount) {
  return amount >= 0 && amount <= TG_PREPAID_REDIS_MAX_AMOUNT;
}

static op_t *op_new(tg_prepaid_redis_t *r, int kind, void *cb, void *arg) {
  op_t *q = calloc(1, sizeof(*q));
  if (q == NULL)
    return NULL;
  *q = (op_t){.r = r, .kind = kind, .cb = cb, .arg = arg};
  return q;
}

/* Appends one key or argument (keys first). */
__attribute__((format(printf, 2, 3))) static void add(parts_t *p, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  char *at = p->buf + p->used;
  int n = vsnprintf(at, sizeof(p->buf) - p->used, fmt, ap);
  va_end(ap);
  /* buf is sized for every call below with arguments in their limits: running out is a bug. */
  if (n < 0 || (size_t)n >= sizeof(p->buf) - p->used || p->n == MAX_PARTS)
    abort();
  p->argv[p->n] = at;
  p->lens[p->n++] = (size_t)n;
  p->used += (size_t)n + 1;
}

static void add_account_keys(parts_t *p, const char *ref, const char *cur) {
  add(p, "tg:acct:{%s}:%s", ref, cur);
  add(p, "tg:holds:{%s}:%s", ref, cur);
  add(p, "tg:hold:{%s}:%s", ref, cur);
  p->nkeys = 3;
}

static tg_redisconn_eval_t eval_of(int kind, const parts_t *p) {
  return (tg_redisconn_eval_t){.script = (unsigned)kind, .nkeys = p->nkeys, .argc = p->n, .argv = p->argv,
                               .lens = p->lens};
}

/* Sends q's call (undo: what a late success needs, or NULL); frees q when it cannot. */
static int submit(op_t *q, const parts_t *p, const tg_redisconn_undo_t *undo) {
  tg_redisconn_eval_t e = eval_of(q->kind, p);
  int rc = tg_redisconn_call(q->r->conn, &e, undo, reply_cb, q);
  if (rc != 0)
    free(q);
  return rc;
}

int tg_prepaid_redis_hold(tg_prepaid_redis_t *r, const char *ref, const char *currency, int64_t amount,
                          tg_prepaid_redis_hold_cb cb, void *arg) {
  if (r == NULL || cb == NULL || !valid_ref(ref) || !valid_currency(currency) || !valid_amount(amount))
    return -EINVAL;
  op_t *q = op_new(r, OP_HOLD, (void *)cb, arg);
  if (q == NULL)
    return -ENOMEM;
  snprintf(q->hold_id, sizeof(q->hold_id), "%016llx%016llx", (unsigned long long)r->id_prefix,
           (unsigned long long)++r->id_counter);
  parts_t p = {0}, release = {0};
  add_account_keys(&p, ref, currency);
  add(&p, "%lld", (long long)amount);
  add(&p, "%s", q->hold_id);
  add(&p, "%s", r->hold_ttl);
  add_account_keys(&release, ref, currency);
  add(&release, "%s", q->hold_id);
  tg_redisconn_undo_t undo = {eval_of(OP_RELEASE, &release), late_hold};
  return submit(q, &p, &undo);
}

int tg_prepaid_redis_capture(tg_prepaid_redis_t *r, const char *ref, const char *currency, int64_t amount,
                             const char *hold_id, const char *txid, tg_prepaid_redis_done_cb cb, void *arg) {
  if (hold_id == NULL)
    hold_id = "";
  if (r == NULL || cb == NULL || !valid_ref(ref) || !valid_currency(currency) || !valid_amount(amount) ||
      !valid_id(txid) || strlen(hold_id) > TG_PREPAID_REDIS_MAX_ID)
    return -EINVAL;
  op_t *q = op_new(r, OP_CAPTURE, (void *)cb, arg);
  if (q == NULL)
    return -ENOMEM;
  parts_t p = {0};
  add_account_keys(&p, ref, currency);
  add(&p, "tg:captured:%s", txid);
  p.nkeys = 4;
  add(&p, "%lld", (long long)amount);
  add(&p, "%s", hold_id);
  add(&p, "%s", r->captured_ttl);
  return submit(q, &p, NULL);
}

int tg_prepaid_redis_release(tg_prepaid_redis_t *r, const char *ref, const char *currency, const char *hold_id,
                             tg_prepaid_redis_done_cb cb, void *arg) {
  if (r == NULL || cb == NULL || !valid_ref(ref) || !valid_currency(currency) || !valid_id(hold_id))
    return -EINVAL;
  op_t *q = op_new(r, OP_RELEASE, (void *)cb, arg);
  if (q == NULL)
    return -ENOMEM;
  parts_t p = {0};
  add_account_keys(&p, ref, currency);
  add(&p, "%s", hold_id);
  return submit(q, &p, NULL);
}

int tg_prepaid_redis_credit(tg_prepaid_redis_t *r, const char *ref, const char *currency, int64_t amount,
                            const char *reference, tg_prepaid_redis_done_cb cb, void *arg) {
  bool keyed = reference != NULL && reference[0] != '\0';
  if (r == NULL || cb == NULL || !valid_ref(ref) || !valid_currency(currency) || amount <= 0 ||
      !valid_amount(amount) || (keyed && !valid_id(reference)))
    return -EINVAL;
  op_t *q = op_new(r, OP_CREDIT, (void *)cb, arg);
  if (q == NULL)
    return -ENOMEM;
  parts_t p = {0};
  add(&p, "tg:acct:{%s}:%s", ref, currency);
  if (keyed)
    add(&p, "tg:credit:%s", reference);
  p.nkeys = p.n;
  add(&p, "%lld", (long long)amount);
  add(&p, "%s", r->limit);
  return submit(q, &p, NULL);
}

int tg_prepaid_redis_balance(tg_prepaid_redis_t *r, const char *ref, const char *currency,
                             tg_prepaid_redis_balance_cb cb, void *arg) {
  if (r == NULL || cb == NULL || !valid_ref(ref) || !valid_currency(currency))
    return -EINVAL;
  op_t *q = op_new(r, OP_BALANCE, (void *)cb, arg);
  if (q == NULL)
    return -ENOMEM;
  parts_t p = {0};
  add_account_keys(&p, ref, currency);
  return submit(q, &p, NULL);
}

int tg_prepaid_redis_ready(const tg_prepaid_redis_t *r) {
  return r != NULL && tg_redisconn_ready(r->conn);
}

/* ---- life */

int tg_prepaid_redis_new(uv_loop_t *loop, const tg_prepaid_redis_opts_t *o, tg_prepaid_redis_t **out, char *err,
                         size_t errlen) {
  if (out)
    *out = NULL;
  if (out == NULL || loop == NULL || o == NULL || o->host == NULL || o->host[0] == '\0') {
    snprintf(err, errlen, "redis prepaid ledger: missing loop, host or result");
    return -EINVAL;
  }
  const char *instance = o->instance ? o->instance : "";
  if (strlen(instance) > MAX_INSTANCE) {
    snprintf(err, errlen, "redis prepaid ledger: instance id longer than %d bytes", MAX_INSTANCE);
    return -EINVAL;
  }
  tg_prepaid_redis_t *r = calloc(1, sizeof(*r));
  if (r == NULL) {
    snprintf(err, errlen, "redis prepaid ledger: out of memory");
    return -ENOMEM;
  }
  snprintf(r->hold_ttl, sizeof(r->hold_ttl), "%llu",
           (unsigned long long)(o->hold_ttl_ms ? o->hold_ttl_ms : DEFAULT_HOLD_TTL_MS));
  snprintf(r->captured_ttl, sizeof(r->captured_ttl), "%llu",
           (unsigned long long)(o->captured_ttl_ms ? o->captured_ttl_ms : DEFAULT_CAPTURED_TTL_MS));
  snprintf(r->limit, sizeof(r->limit), "%lld", (long long)TG_PREPAID_REDIS_MAX_AMOUNT);
  /* The hold ids of every client everywhere must differ: a random prefix, not the instance id. */
  if (getrandom(&r->id_prefix, sizeof(r->id_prefix), 0) != (ssize_t)sizeof(r->id_prefix)) {
    snprintf(err, errlen, "redis prepaid ledger: no random source for hold ids");
    free(r);
    return -EIO;
  }
  tg_redisconn_opts_t co = {
      .host = o->host, .port = o->port, .password = o->password, .db = o->db, .timeout_ms = o->timeout_ms,
      .scripts = scripts, .nscripts = OP_COUNT, .what = "redis prepaid ledger",
      .down_msg = "prepaid: redis unavailable, refusing holds", .up_msg = "prepaid: redis reachable again",
      .instance = instance};
  int rc = tg_redisconn_new(loop, &co, &r->conn, err, errlen);
  if (rc != 0) {
    free(r);
    return rc;
  }
  *out = r;
  return 0;
}

void tg_prepaid_redis_free(tg_prepaid_redis_t *r) {
  if (r == NULL)
    return;
  tg_redisconn_free(r->conn); /* the calls still waiting get -ECANCELED now */
  free(r);
}
