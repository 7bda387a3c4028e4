#include "ledger/prepaid_redis.h"

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include <hiredis/async.h>
#include <hiredis/hiredis.h>
/* Defines static functions, one of them named on_close: no name of ours may clash. */
#include <hiredis/adapters/libuv.h>
#include <mbedtls/sha1.h>

#include "base/hex.h"
#include "base/log.h"

#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 2000
#define STALL_MIN_MS 1000 /* no reply for this long (or 10 x timeout) while calls wait: reconnect */
#define LOG_EVERY_MS 10000
#define DEFAULT_TIMEOUT_MS 20
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

static const struct {
  const char *text;
  size_t len;
} scripts[OP_COUNT] = {
    {hold_script, sizeof(hold_script) - 1},       {capture_script, sizeof(capture_script) - 1},
    {release_script, sizeof(release_script) - 1}, {credit_script, sizeof(credit_script) - 1},
    {balance_script, sizeof(balance_script) - 1},
};

#define ALL_LOADED ((1u << OP_COUNT) - 1)
#define MAX_PARTS 8 /* keys then arguments of one script call */

typedef struct op op_t;
typedef struct op_list {
  op_t *head, *tail;
  size_t count;
} op_list_t;

struct op {
  op_t *prev, *next; /* in waiting or decided */
  op_list_t *list;   /* the list it is on, or NULL */
  tg_prepaid_redis_t *r;
  void *cb; /* typed by kind; NULL for the release sent after a hold that timed out */
  void *arg;
  int kind;
  int status;           /* decided without Redis: the status to deliver */
  uint64_t deadline_ms; /* uv_hrtime in ms */
  bool in_redis;        /* a hiredis callback for this op is outstanding */
  bool delivered;
  bool resent; /* NOSCRIPT answered once and EVAL was sent */
  int nkeys, nparts;
  const char *part[MAX_PARTS]; /* into data */
  size_t part_len[MAX_PARTS];
  char hold_id[TG_PREPAID_REDIS_HOLD_ID_LEN + 1];
  size_t used, cap;
  char data[];
};

struct tg_prepaid_redis {
  uv_loop_t *loop;
  char *host;
  int port;
  char *password;
  int db;
  uint32_t timeout_ms;
  char hold_ttl[24], captured_ttl[24], limit[24]; /* decimal text for the scripts */
  char *instance;
  char sha[OP_COUNT][41]; /* SHA-1 of each script, hex */
  char addr[300];
  uint64_t id_prefix; /* random, drawn once: the first half of every hold id */
  uint64_t id_counter;

  redisAsyncContext *ac; /* NULL while down */
  unsigned loaded;       /* bit per script loaded on this connection */
  bool closing;
  uv_timer_t deadline_timer; /* the first deadline in waiting */
  uv_timer_t reconnect_timer;
  uv_idle_t deliver_idle; /* runs the callbacks of decided on the next loop turn */
  int open_handles;
  op_list_t waiting; /* sent to Redis, unanswered, in deadline order */
  op_list_t decided; /* failed at once (no connection), callback pending */

  uint32_t backoff_ms;
  uint64_t rng;
  size_t inflight;
  uint64_t last_activity_ms;
  uint64_t last_log_ms;
  char last_error[160];
};

static uint64_t mono_ms(void) {
  return uv_hrtime() / 1000000;
}

static void list_push(op_list_t *l, op_t *q) {
  q->prev = l->tail;
  q->next = NULL;
  if (l->tail)
    l->tail->next = q;
  else
    l->head = q;
  l->tail = q;
  l->count++;
  q->list = l;
}

static void list_remove(op_t *q) {
  op_list_t *l = q->list;
  if (q->prev)
    q->prev->next = q->next;
  else
    l->head = q->next;
  if (q->next)
    q->next->prev = q->prev;
  else
    l->tail = q->prev;
  q->prev = q->next = NULL;
  l->count--;
  q->list = NULL;
}

static void set_error(tg_prepaid_redis_t *r, const char *what, const char *detail) {
  snprintf(r->last_error, sizeof(r->last_error), "%s%s%s", what, detail && *detail ? ": " : "",
           detail ? detail : "");
}

static bool is_ready(const tg_prepaid_redis_t *r) {
  return r->ac != NULL && r->loaded == ALL_LOADED;
}

/* Failures repeat for every request while Redis is down: one line per interval. */
static void log_failure(tg_prepaid_redis_t *r, const char *reason) {
  uint64_t now = mono_ms();
  if (r->last_log_ms != 0 && now - r->last_log_ms < LOG_EVERY_MS)
    return;
  r->last_log_ms = now ? now : 1;
  tg_log(TG_LOG_WARN, "prepaid: redis unavailable, refusing holds", "redis", r->addr, "instance", r->instance,
         "reason", reason, "error", r->last_error[0] ? r->last_error : NULL, NULL);
}

/* Runs the callback once; the op is freed unless hiredis still holds it. */
static void deliver(op_t *q, int status, int64_t a, int64_t b) {
  if (q->list)
    list_remove(q);
  q->delivered = true;
  if (status == -ETIMEDOUT || status == -ECONNREFUSED || status == -EIO)
    log_failure(q->r, status == -ETIMEDOUT ? "timeout" : status == -ECONNREFUSED ? "unavailable" : "error");
  if (status < 0 && status != -ENOSPC)
    a = b = 0;
  if (q->cb) {
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
  }
  if (!q->in_redis)
    free(q);
}

static void reply_cb(redisAsyncContext *ac, void *reply, void *privdata);
static void schedule_reconnect(tg_prepaid_redis_t *r);

/* Queues EVALSHA (EVAL after NOSCRIPT) of q's script on the current connection. */
static int send_op(tg_prepaid_redis_t *r, op_t *q, bool eval) {
  const char *argv[3 + MAX_PARTS];
  size_t lens[3 + MAX_PARTS];
  char nkeys[4];
  snprintf(nkeys, sizeof(nkeys), "%d", q->nkeys);
  argv[0] = eval ? "EVAL" : "EVALSHA";
  lens[0] = strlen(argv[0]);
  argv[1] = eval ? scripts[q->kind].text : r->sha[q->kind];
  lens[1] = eval ? scripts[q->kind].len : 40;
  argv[2] = nkeys;
  lens[2] = strlen(nkeys);
  for (int i = 0; i < q->nparts; i++) {
    argv[3 + i] = q->part[i];
    lens[3 + i] = q->part_len[i];
  }
  if (r->ac == NULL || redisAsyncCommandArgv(r->ac, reply_cb, q, 3 + q->nparts, argv, lens) != REDIS_OK)
    return -1;
  q->in_redis = true;
  if (r->inflight++ == 0)
    r->last_activity_ms = mono_ms();
  return 0;
}

static void detach(tg_prepaid_redis_t *r, const redisAsyncContext *ac, const char *what) {
  if (r->ac != ac)
    return;
  set_error(r, what, ac->c.err ? ac->c.errstr : NULL);
  r->ac = NULL;
  r->loaded = 0;
  r->inflight = 0;
  schedule_reconnect(r);
}

/* Closes the current connection now: calls waiting on it get -EIO. */
static void drop(tg_prepaid_redis_t *r) {
  redisAsyncContext *ac = r->ac;
  if (ac == NULL)
    return;
  r->ac = NULL;
  r->loaded = 0;
  r->inflight = 0;
  redisAsyncFree(ac); /* inside a hiredis callback, deferred until it returns */
  schedule_reconnect(r);
}

/* A hold that succeeded after its caller was told -ETIMEDOUT: nobody will
 * capture it, so give the money back now rather than after hold_ttl_ms. Its
 * first three keys are the account's, as release wants. */
static void release_late_hold(tg_prepaid_redis_t *r, op_t *q) {
  q->kind = OP_RELEASE;
  q->cb = NULL;
  q->resent = false;
  q->nkeys = 3;
  q->part[3] = q->hold_id;
  q->part_len[3] = TG_PREPAID_REDIS_HOLD_ID_LEN;
  q->nparts = 4;
  if (send_op(r, q, false) != 0)
    free(q);
}

static bool two_ints(const redisReply *rep) {
  return rep->type == REDIS_REPLY_ARRAY && rep->elements == 2 && rep->element[0]->type == REDIS_REPLY_INTEGER &&
         rep->element[1]->type == REDIS_REPLY_INTEGER;
}

static void handle_reply(op_t *q, const redisReply *rep) {
  if (q->kind == OP_CREDIT && rep->type == REDIS_REPLY_ERROR && strncmp(rep->str, "OVERFLOW", 8) == 0) {
    deliver(q, -EOVERFLOW, 0, 0);
    return;
  }
  if (two_ints(rep)) {
    long long x = rep->element[0]->integer, y = rep->element[1]->integer;
    switch (q->kind) {
    case OP_HOLD:
      if (x == 0 || x == 1) {
        deliver(q, x == 1 ? 0 : -ENOSPC, y, 0);
        return;
      }
      break;
    case OP_BALANCE:
      deliver(q, 0, x, y);
      return;
    default:
      if (x == 0 || x == 1) {
        deliver(q, (int)x, y, 0);
        return;
      }
    }
  }
  set_error(q->r, "unexpected reply", rep->type == REDIS_REPLY_ERROR ? rep->str : NULL);
  tg_log(TG_LOG_ERROR, "prepaid: unexpected reply from redis", "redis", q->r->addr, "error", q->r->last_error,
         NULL);
  deliver(q, -EIO, 0, 0);
}

static void reply_cb(redisAsyncContext *ac, void *reply, void *privdata) {
  const redisReply *rep = reply;
  op_t *q = privdata;
  tg_prepaid_redis_t *r = q->r;
  q->in_redis = false;
  if (r->ac == ac && r->inflight > 0)
    r->inflight--;
  if (rep == NULL) /* the context is being freed */
    detach(r, ac, "connection lost");
  else
    r->last_activity_ms = mono_ms();
  if (rep && rep->type == REDIS_REPLY_ERROR && strncmp(rep->str, "NOSCRIPT", 8) == 0 && !q->resent && r->ac == ac &&
      (!q->delivered || q->kind == OP_RELEASE)) {
    /* The server lost its script cache (restart, failover, SCRIPT FLUSH): EVAL caches it again. */
    q->resent = true;
    if (send_op(r, q, true) == 0)
      return;
  }
  if (q->delivered) { /* timed out (or cancelled) before */
    if (rep && q->kind == OP_HOLD && two_ints(rep) && rep->element[0]->integer == 1 && !r->closing)
      release_late_hold(r, q);
    else
      free(q);
    return;
  }
  if (rep == NULL) {
    deliver(q, -EIO, 0, 0);
    return;
  }
  handle_reply(q, rep);
}

/* AUTH and SELECT: a refusal is a configuration error; keep retrying with backoff. */
static void setup_cb(redisAsyncContext *ac, void *reply, void *privdata) {
  tg_prepaid_redis_t *r = privdata;
  const redisReply *rep = reply;
  if (rep == NULL) {
    detach(r, ac, "connection lost");
    return;
  }
  if (rep->type == REDIS_REPLY_ERROR && r->ac == ac) {
    set_error(r, "connection setup refused", rep->str);
    drop(r);
  }
}

static void script_cb(redisAsyncContext *ac, void *reply, void *privdata) {
  tg_prepaid_redis_t *r = privdata;
  const redisReply *rep = reply;
  if (rep == NULL) {
    detach(r, ac, "connection lost");
    return;
  }
  if (r->ac != ac)
    return;
  if (rep->type == REDIS_REPLY_STRING && rep->len == 40) {
    for (int i = 0; i < OP_COUNT; i++)
      if (memcmp(rep->str, r->sha[i], 40) == 0)
        r->loaded |= 1u << i;
    if (r->loaded == ALL_LOADED) {
      r->backoff_ms = BACKOFF_MIN_MS;
      r->last_activity_ms = mono_ms();
      if (r->last_log_ms != 0)
        tg_log(TG_LOG_INFO, "prepaid: redis reachable again", "redis", r->addr, NULL);
      r->last_log_ms = 0;
      r->last_error[0] = '\0';
    }
    return;
  }
  set_error(r, "SCRIPT LOAD failed", rep->type == REDIS_REPLY_ERROR ? rep->str : "unexpected reply");
  drop(r);
}

static void connect_cb(const redisAsyncContext *ac, int status) {
  tg_prepaid_redis_t *r = ac->data;
  if (status != REDIS_OK) {
    detach(r, ac, "cannot connect"); /* hiredis frees the context after this returns */
    return;
  }
  r->last_activity_ms = mono_ms();
}

static void disconnect_cb(const redisAsyncContext *ac, int status) {
  (void)status;
  detach(ac->data, ac, "connection lost");
}

/* hiredis' libuv adapter ignores a poll error (a refused or reset
 * connection) and stops watching, so calls would wait for their timeout on a
 * dead socket: these hooks hand the error to hiredis, which then frees the
 * context (as in idem_redis.c). */
static void poll_cb(uv_poll_t *handle, int status, int events) {
  redisLibuvEvents *p = handle->data;
  if (p->context == NULL)
    return;
  if (status == 0) {
    redisLibuvPoll(handle, status, events);
    return;
  }
  if (p->context->c.flags & REDIS_CONNECTED)
    redisAsyncHandleRead(p->context); /* the read fails */
  else
    redisAsyncHandleWrite(p->context); /* reads SO_ERROR */
}

static void watch(redisLibuvEvents *p, int add, int del) {
  p->events = (p->events | add) & ~del;
  if (p->events)
    uv_poll_start(&p->handle, p->events, poll_cb);
  else
    uv_poll_stop(&p->handle);
}

static void add_read(void *p) {
  watch(p, UV_READABLE, 0);
}

static void del_read(void *p) {
  watch(p, 0, UV_READABLE);
}

static void add_write(void *p) {
  watch(p, UV_WRITABLE, 0);
}

static void del_write(void *p) {
  watch(p, 0, UV_WRITABLE);
}

static void connect_redis(tg_prepaid_redis_t *r) {
  redisAsyncContext *ac = redisAsyncConnect(r->host, r->port);
  if (ac == NULL) {
    set_error(r, "cannot connect", "out of memory");
    goto fail;
  }
  if (ac->err) {
    set_error(r, "cannot connect", ac->errstr);
    redisAsyncFree(ac);
    goto fail;
  }
  if (redisLibuvAttach(ac, r->loop) != REDIS_OK) {
    set_error(r, "cannot connect", "cannot watch the socket");
    memset(&ac->ev, 0, sizeof(ac->ev)); /* a failed attach leaves hooks set with no data */
    redisAsyncFree(ac);
    goto fail;
  }
  ac->ev.addRead = add_read;
  ac->ev.delRead = del_read;
  ac->ev.addWrite = add_write;
  ac->ev.delWrite = del_write;
  ac->data = r;
  redisAsyncSetConnectCallback(ac, connect_cb);
  redisAsyncSetDisconnectCallback(ac, disconnect_cb);
  r->ac = ac;
  r->loaded = 0;
  r->last_activity_ms = mono_ms();
  /* Pipelined: Redis runs them in order, so a call queued right after finds the scripts. */
  if (r->password != NULL)
    redisAsyncCommand(ac, setup_cb, r, "AUTH %b", r->password, strlen(r->password));
  if (r->db != 0)
    redisAsyncCommand(ac, setup_cb, r, "SELECT %d", r->db);
  for (int i = 0; i < OP_COUNT; i++)
    redisAsyncCommand(ac, script_cb, r, "SCRIPT LOAD %b", scripts[i].text, scripts[i].len);
  return;
fail:
  schedule_reconnect(r);
}

static void reconnect_timer_cb(uv_timer_t *t) {
  tg_prepaid_redis_t *r = t->data;
  if (!r->closing && r->ac == NULL)
    connect_redis(r);
}

static void schedule_reconnect(tg_prepaid_redis_t *r) {
  if (r->closing || uv_is_active((uv_handle_t *)&r->reconnect_timer))
    return;
  /* Jittered so that the workers of many instances do not come back in step. */
  r->rng ^= r->rng << 13;
  r->rng ^= r->rng >> 7;
  r->rng ^= r->rng << 17;
  uint32_t half = r->backoff_ms / 2;
  uv_timer_start(&r->reconnect_timer, reconnect_timer_cb, half + r->rng % (half + 1), 0);
  r->backoff_ms = r->backoff_ms * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : r->backoff_ms * 2;
}

static void deadline_timer_cb(uv_timer_t *t);

static void arm_deadline(tg_prepaid_redis_t *r) {
  op_t *q = r->waiting.head;
  if (q == NULL || r->closing)
    return;
  uint64_t now = mono_ms();
  uv_timer_start(&r->deadline_timer, deadline_timer_cb, q->deadline_ms > now ? q->deadline_ms - now : 0, 0);
}

static void deadline_timer_cb(uv_timer_t *t) {
  tg_prepaid_redis_t *r = t->data;
  uint64_t now = mono_ms();
  bool timed_out = false;
  op_t *q;
  while ((q = r->waiting.head) != NULL && q->deadline_ms <= now) {
    set_error(r, "no reply in time", NULL);
    deliver(q, -ETIMEDOUT, 0, 0); /* stays allocated until hiredis answers or drops it */
    timed_out = true;
  }
  uint64_t stall = r->timeout_ms * 10u > STALL_MIN_MS ? r->timeout_ms * 10u : STALL_MIN_MS;
  if (timed_out && r->ac != NULL && now - r->last_activity_ms >= stall) {
    set_error(r, "no reply", "connection stalled");
    drop(r);
  }
  arm_deadline(r);
}

static void deliver_idle_cb(uv_idle_t *h) {
  tg_prepaid_redis_t *r = h->data;
  /* Only those decided before this turn: a callback that calls again waits for the next. */
  size_t n = r->decided.count;
  op_t *q;
  while (n-- > 0 && (q = r->decided.head) != NULL)
    deliver(q, q->status, 0, 0);
  if (r->decided.head == NULL)
    uv_idle_stop(&r->deliver_idle);
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

/* An op with room for the account's three keys, one more key and a few arguments. */
static op_t *op_new(tg_prepaid_redis_t *r, int kind, void *cb, void *arg, const char *ref, const char *cur,
                    size_t more) {
  size_t cap = 3 * (32 + strlen(ref) + strlen(cur)) + 2 * (32 + more) + 3 * 24;
  op_t *q = calloc(1, sizeof(*q) + cap);
  if (q == NULL)
    return NULL;
  q->r = r;
  q->kind = kind;
  q->cb = cb;
  q->arg = arg;
  q->cap = cap;
  return q;
}

/* Appends one key or argument (keys first). */
__attribute__((format(printf, 2, 3))) static void op_add(op_t *q, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  char *at = q->data + q->used;
  int n = vsnprintf(at, q->cap - q->used, fmt, ap);
  va_end(ap);
  /* op_new sized the buffer for every call below: running out is a bug. */
  if (n < 0 || (size_t)n >= q->cap - q->used || q->nparts == MAX_PARTS)
    abort();
  q->part[q->nparts] = at;
  q->part_len[q->nparts++] = (size_t)n;
  q->used += (size_t)n + 1;
}

static void add_account_keys(op_t *q, const char *ref, const char *cur) {
  op_add(q, "tg:acct:{%s}:%s", ref, cur);
  op_add(q, "tg:holds:{%s}:%s", ref, cur);
  op_add(q, "tg:hold:{%s}:%s", ref, cur);
  q->nkeys = 3;
}

static int submit(tg_prepaid_redis_t *r, op_t *q) {
  q->deadline_ms = mono_ms() + r->timeout_ms;
  if (send_op(r, q, false) == 0) {
    list_push(&r->waiting, q);
    if (!uv_is_active((uv_handle_t *)&r->deadline_timer))
      arm_deadline(r);
    return 0;
  }
  if (r->last_error[0] == '\0')
    set_error(r, "not connected", NULL);
  q->status = -ECONNREFUSED;
  list_push(&r->decided, q);
  uv_idle_start(&r->deliver_idle, deliver_idle_cb);
  return 0;
}

int tg_prepaid_redis_hold(tg_prepaid_redis_t *r, const char *ref, const char *currency, int64_t amount,
                          tg_prepaid_redis_hold_cb cb, void *arg) {
  if (r == NULL || cb == NULL || !valid_ref(ref) || !valid_currency(currency) || !valid_amount(amount))
    return -EINVAL;
  if (r->closing)
    return -ECANCELED;
  op_t *q = op_new(r, OP_HOLD, (void *)cb, arg, ref, currency, TG_PREPAID_REDIS_HOLD_ID_LEN);
  if (q == NULL)
    return -ENOMEM;
  snprintf(q->hold_id, sizeof(q->hold_id), "%016llx%016llx", (unsigned long long)r->id_prefix,
           (unsigned long long)++r->id_counter);
  add_account_keys(q, ref, currency);
  op_add(q, "%lld", (long long)amount);
  op_add(q, "%s", q->hold_id);
  op_add(q, "%s", r->hold_ttl);
  return submit(r, q);
}

int tg_prepaid_redis_capture(tg_prepaid_redis_t *r, const char *ref, const char *currency, int64_t amount,
                             const char *hold_id, const char *txid, tg_prepaid_redis_done_cb cb, void *arg) {
  if (hold_id == NULL)
    hold_id = "";
  if (r == NULL || cb == NULL || !valid_ref(ref) || !valid_currency(currency) || !valid_amount(amount) ||
      !valid_id(txid) || strlen(hold_id) > TG_PREPAID_REDIS_MAX_ID)
    return -EINVAL;
  if (r->closing)
    return -ECANCELED;
  op_t *q = op_new(r, OP_CAPTURE, (void *)cb, arg, ref, currency, strlen(txid) + strlen(hold_id));
  if (q == NULL)
    return -ENOMEM;
  add_account_keys(q, ref, currency);
  op_add(q, "tg:captured:%s", txid);
  q->nkeys = 4;
  op_add(q, "%lld", (long long)amount);
  op_add(q, "%s", hold_id);
  op_add(q, "%s", r->captured_ttl);
  return submit(r, q);
}

int tg_prepaid_redis_release(tg_prepaid_redis_t *r, const char *ref, const char *currency, const char *hold_id,
                             tg_prepaid_redis_done_cb cb, void *arg) {
  if (r == NULL || cb == NULL || !valid_ref(ref) || !valid_currency(currency) || !valid_id(hold_id))
    return -EINVAL;
  if (r->closing)
    return -ECANCELED;
  op_t *q = op_new(r, OP_RELEASE, (void *)cb, arg, ref, currency, strlen(hold_id));
  if (q == NULL)
    return -ENOMEM;
  add_account_keys(q, ref, currency);
  op_add(q, "%s", hold_id);
  return submit(r, q);
}

int tg_prepaid_redis_credit(tg_prepaid_redis_t *r, const char *ref, const char *currency, int64_t amount,
                            const char *reference, tg_prepaid_redis_done_cb cb, void *arg) {
  bool keyed = reference != NULL && reference[0] != '\0';
  if (r == NULL || cb == NULL || !valid_ref(ref) || !valid_currency(currency) || amount <= 0 ||
      !valid_amount(amount) || (keyed && !valid_id(reference)))
    return -EINVAL;
  if (r->closing)
    return -ECANCELED;
  op_t *q = op_new(r, OP_CREDIT, (void *)cb, arg, ref, currency, keyed ? strlen(reference) : 0);
  if (q == NULL)
    return -ENOMEM;
  op_add(q, "tg:acct:{%s}:%s", ref, currency);
  if (keyed)
    op_add(q, "tg:credit:%s", reference);
  q->nkeys = q->nparts;
  op_add(q, "%lld", (long long)amount);
  op_add(q, "%s", r->limit);
  return submit(r, q);
}

int tg_prepaid_redis_balance(tg_prepaid_redis_t *r, const char *ref, const char *currency,
                             tg_prepaid_redis_balance_cb cb, void *arg) {
  if (r == NULL || cb == NULL || !valid_ref(ref) || !valid_currency(currency))
    return -EINVAL;
  if (r->closing)
    return -ECANCELED;
  op_t *q = op_new(r, OP_BALANCE, (void *)cb, arg, ref, currency, 0);
  if (q == NULL)
    return -ENOMEM;
  add_account_keys(q, ref, currency);
  return submit(r, q);
}

int tg_prepaid_redis_ready(const tg_prepaid_redis_t *r) {
  return r != NULL && is_ready(r);
}

/* ---- life */

static void free_strings(tg_prepaid_redis_t *r) {
  free(r->host);
  if (r->password) {
    explicit_bzero(r->password, strlen(r->password));
    free(r->password);
  }
  free(r->instance);
}

static void handle_closed(uv_handle_t *h) {
  tg_prepaid_redis_t *r = h->data;
  if (--r->open_handles > 0)
    return;
  free_strings(r);
  free(r);
}

int tg_prepaid_redis_new(uv_loop_t *loop, const tg_prepaid_redis_opts_t *o, tg_prepaid_redis_t **out, char *err,
                         size_t errlen) {
  tg_prepaid_redis_t *r = NULL;
  int rc = -ENOMEM;
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
  if ((r = calloc(1, sizeof(*r))) == NULL)
    goto fail;
  r->loop = loop;
  r->port = o->port;
  r->db = o->db;
  r->timeout_ms = o->timeout_ms ? o->timeout_ms : DEFAULT_TIMEOUT_MS;
  snprintf(r->hold_ttl, sizeof(r->hold_ttl), "%llu",
           (unsigned long long)(o->hold_ttl_ms ? o->hold_ttl_ms : DEFAULT_HOLD_TTL_MS));
  snprintf(r->captured_ttl, sizeof(r->captured_ttl), "%llu",
           (unsigned long long)(o->captured_ttl_ms ? o->captured_ttl_ms : DEFAULT_CAPTURED_TTL_MS));
  snprintf(r->limit, sizeof(r->limit), "%lld", (long long)TG_PREPAID_REDIS_MAX_AMOUNT);
  r->backoff_ms = BACKOFF_MIN_MS;
  r->rng = (uv_hrtime() ^ (uint64_t)(uintptr_t)r) | 1;
  r->host = strdup(o->host);
  r->instance = strdup(instance);
  if (r->host == NULL || r->instance == NULL || (o->password && (r->password = strdup(o->password)) == NULL))
    goto fail;
  snprintf(r->addr, sizeof(r->addr), strchr(r->host, ':') ? "[%s]:%d" : "%s:%d", r->host, r->port);
  /* The hold ids of every client everywhere must differ: a random prefix, not the instance id. */
  if (getrandom(&r->id_prefix, sizeof(r->id_prefix), 0) != (ssize_t)sizeof(r->id_prefix)) {
    snprintf(err, errlen, "redis prepaid ledger: no random source for hold ids");
    rc = -EIO;
    goto fail_msg;
  }
  for (int i = 0; i < OP_COUNT; i++) {
    unsigned char digest[20];
    if (mbedtls_sha1_ret((const unsigned char *)scripts[i].text, scripts[i].len, digest) != 0) {
      snprintf(err, errlen, "redis prepaid ledger: cannot hash the scripts (mbedTLS SHA-1 failed)");
      rc = -EIO;
      goto fail_msg;
    }
    tg_hex_encode(digest, 20, r->sha[i]);
  }
  r->deadline_timer.data = r->reconnect_timer.data = r->deliver_idle.data = r;
  /* Counted as each starts: a failure closes those already open. */
  if ((rc = uv_timer_init(loop, &r->deadline_timer)) != 0)
    goto fail_handles;
  r->open_handles++;
  if ((rc = uv_timer_init(loop, &r->reconnect_timer)) != 0)
    goto fail_handles;
  r->open_handles++;
  if ((rc = uv_idle_init(loop, &r->deliver_idle)) != 0)
    goto fail_handles;
  r->open_handles++;
  connect_redis(r);
  *out = r;
  return 0;
fail_handles:
  snprintf(err, errlen, "redis prepaid ledger: cannot create its timers: %s", uv_strerror(rc));
  if (r->open_handles > 0) {
    r->closing = true; /* handle_closed frees r with the last of them */
    uv_handle_t *hs[] = {(uv_handle_t *)&r->deadline_timer, (uv_handle_t *)&r->reconnect_timer};
    for (int i = 0, n = r->open_handles; i < n; i++)
      uv_close(hs[i], handle_closed);
    return rc;
  }
  goto fail_msg;
fail:
  snprintf(err, errlen, "redis prepaid ledger: out of memory");
fail_msg:
  if (r) {
    free_strings(r);
    free(r);
  }
  return rc;
}

void tg_prepaid_redis_free(tg_prepaid_redis_t *r) {
  if (r == NULL || r->closing)
    return;
  r->closing = true;
  uv_timer_stop(&r->deadline_timer);
  uv_timer_stop(&r->reconnect_timer);
  op_t *q;
  while ((q = r->waiting.head) != NULL)
    deliver(q, -ECANCELED, 0, 0);
  while ((q = r->decided.head) != NULL)
    deliver(q, -ECANCELED, 0, 0);
  uv_idle_stop(&r->deliver_idle);
  if (r->ac != NULL) {
    redisAsyncContext *ac = r->ac;
    r->ac = NULL;
    redisAsyncFree(ac); /* outstanding replies come back NULL and free their (delivered) ops */
  }
  uv_close((uv_handle_t *)&r->deadline_timer, handle_closed);
  uv_close((uv_handle_t *)&r->reconnect_timer, handle_closed);
  uv_close((uv_handle_t *)&r->deliver_idle, handle_closed);
}
