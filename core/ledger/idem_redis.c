#include "ledger/idem.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
#define MAX_INSTANCE 128
#define KEY_PREFIX "tg:idem:"
#define KEY_LEN (sizeof(KEY_PREFIX) - 1 + 64)

/* Counts idempotency_hits_total (idem.c). */
void tg_idem_count_hit(int state);

/* One script for the three calls, so one SCRIPT LOAD per connection.
 * KEYS[1]: the key; ARGV[1]: the call; ARGV[2]: our PENDING value
 * "P<hex hash><instance>", whose bytes 2..65 are the request hash.
 *  b(egin), ARGV[3] pending ttl: {0} new, {1} pending, {2, response} done, {3} conflict;
 *  f(inish), ARGV[3] response, ARGV[4] ttl: 1 stored over our PENDING value,
 *    2 stored over nothing or a value with the same hash, 0 left alone (another hash);
 *  a(bort): 1 deleted (it was our PENDING value), 0 not.
 * GET answers false for a missing key. */
static const char script[] =
    "local key, mine = KEYS[1], ARGV[2]\n"
    "local hash = string.sub(mine, 2, 65)\n"
    "local op = ARGV[1]\n"
    "if op == 'b' then\n"
    "  if redis.call('SET', key, mine, 'NX', 'PX', ARGV[3]) then return {0} end\n"
    "  local v = redis.call('GET', key)\n"
    "  if not v then return {0} end\n"
    "  if string.sub(v, 2, 65) ~= hash then return {3} end\n"
    "  if string.sub(v, 1, 1) == 'D' then return {2, string.sub(v, 66)} end\n"
    "  return {1}\n"
    "elseif op == 'f' then\n"
    "  local v = redis.call('GET', key)\n"
    "  if v and v ~= mine and string.sub(v, 2, 65) ~= hash then return 0 end\n"
    "  redis.call('SET', key, 'D' .. hash .. ARGV[3], 'PX', ARGV[4])\n"
    "  if v == mine then return 1 end\n"
    "  return 2\n"
    "elseif op == 'a' then\n"
    "  if redis.call('GET', key) == mine then redis.call('DEL', key) return 1 end\n"
    "  return 0\n"
    "end\n"
    "return redis.error_reply('ERR tollgate idem: unknown call')\n";

enum { OP_BEGIN, OP_FINISH, OP_ABORT };

typedef struct op op_t;
typedef struct op_list {
  op_t *head, *tail;
  size_t count;
} op_list_t;

struct op {
  op_t *prev, *next; /* in waiting or decided */
  op_list_t *list;   /* the list it is on, or NULL */
  tg_idem_redis_t *r;
  tg_idem_redis_cb cb; /* NULL for the abort sent after a begin that timed out */
  void *arg;
  int kind;
  int status;           /* decided without Redis: the state to deliver */
  uint64_t deadline_ms; /* uv_hrtime in ms */
  bool in_redis;        /* a hiredis callback for this op is outstanding */
  bool delivered;
  bool resent; /* NOSCRIPT answered once and EVAL was sent */
  char key[KEY_LEN];
  size_t mine_len;
  size_t resp_len;
  char data[]; /* our PENDING value (mine_len), then the response (resp_len) */
};

struct tg_idem_redis {
  uv_loop_t *loop;
  char *host;
  int port;
  char *password;
  int db;
  uint32_t timeout_ms;
  char ttl[24], pending_ttl[24]; /* ms, as decimal text for the script */
  char *instance;
  size_t instance_len;
  char sha[41]; /* SHA-1 of the script, hex: what SCRIPT LOAD answers and EVALSHA names */
  char addr[300];

  redisAsyncContext *ac; /* NULL while down */
  bool ready;            /* the script is loaded on this connection */
  bool closing;
  uv_timer_t deadline_timer; /* the first deadline in waiting */
  uv_timer_t reconnect_timer;
  uv_idle_t deliver_idle; /* runs the callbacks of decided on the next loop turn */
  int open_handles;
  op_list_t waiting; /* sent to Redis, unanswered, in deadline order (one timeout for all) */
  op_list_t decided; /* failed at once (no connection), callback pending */

  uint32_t backoff_ms;
  uint64_t rng;
  size_t inflight;           /* calls sent on the current connection, not yet answered */
  uint64_t last_activity_ms; /* last reply, connect, or first send after a quiet spell */
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

static void set_error(tg_idem_redis_t *r, const char *what, const char *detail) {
  snprintf(r->last_error, sizeof(r->last_error), "%s%s%s", what, detail && *detail ? ": " : "",
           detail ? detail : "");
}

/* Failures repeat for every request while Redis is down: one line per interval. */
static void log_failure(tg_idem_redis_t *r, const char *reason) {
  uint64_t now = mono_ms();
  if (r->last_log_ms != 0 && now - r->last_log_ms < LOG_EVERY_MS)
    return;
  r->last_log_ms = now ? now : 1;
  tg_log(TG_LOG_WARN, "idempotency: redis unavailable, refusing transactions", "redis", r->addr, "reason",
         reason, "error", r->last_error[0] ? r->last_error : NULL, NULL);
}

/* Runs the callback once; the op is freed unless hiredis still holds it. */
static void deliver(op_t *q, int state, const void *resp, size_t len) {
  if (q->list)
    list_remove(q);
  q->delivered = true;
  if (state < 0 && state != -ECANCELED && state != -ESTALE && state != -ENOENT)
    log_failure(q->r, state == -ETIMEDOUT ? "timeout" : state == -ECONNREFUSED ? "unavailable" : "error");
  if (q->kind == OP_BEGIN && state > 0)
    tg_idem_count_hit(state);
  if (q->cb)
    q->cb(q->arg, state, state >= 0 ? resp : NULL, state >= 0 ? len : 0);
  if (!q->in_redis)
    free(q);
}

static void reply_cb(redisAsyncContext *ac, void *reply, void *privdata);
static void schedule_reconnect(tg_idem_redis_t *r);

/* Queues EVALSHA (EVAL after NOSCRIPT) for q on the current connection. */
static int send_op(tg_idem_redis_t *r, op_t *q, bool eval) {
  static const char *const names[] = {"b", "f", "a"};
  const char *argv[8] = {eval ? "EVAL" : "EVALSHA", eval ? script : r->sha, "1", q->key, names[q->kind], q->data};
  size_t lens[8] = {eval ? 4 : 7, eval ? sizeof(script) - 1 : 40, 1, KEY_LEN, 1, q->mine_len};
  int argc = 6;
  if (q->kind == OP_BEGIN) {
    argv[argc] = r->pending_ttl;
    lens[argc++] = strlen(r->pending_ttl);
  } else if (q->kind == OP_FINISH) {
    argv[argc] = q->data + q->mine_len;
    lens[argc++] = q->resp_len;
    argv[argc] = r->ttl;
    lens[argc++] = strlen(r->ttl);
  }
  if (r->ac == NULL || redisAsyncCommandArgv(r->ac, reply_cb, q, argc, argv, lens) != REDIS_OK)
    return -1;
  q->in_redis = true;
  if (r->inflight++ == 0)
    r->last_activity_ms = mono_ms();
  return 0;
}

/* The context is gone or going: forget it and plan the next attempt. */
static void detach(tg_idem_redis_t *r, const redisAsyncContext *ac, const char *what) {
  if (r->ac != ac)
    return;
  if (ac->c.err)
    set_error(r, what, ac->c.errstr);
  else
    set_error(r, what, NULL);
  r->ac = NULL;
  r->ready = false;
  r->inflight = 0;
  schedule_reconnect(r);
}

/* Closes the current connection now: calls waiting on it get -EIO. */
static void drop(tg_idem_redis_t *r) {
  redisAsyncContext *ac = r->ac;
  if (ac == NULL)
    return;
  r->ac = NULL;
  r->ready = false;
  r->inflight = 0;
  redisAsyncFree(ac); /* inside a hiredis callback, deferred until it returns */
  schedule_reconnect(r);
}

/* A begin answered NEW after its caller was told -ETIMEDOUT: nobody will
 * finish it, so release the key now rather than after pending_ttl_ms. */
static void release_late_new(tg_idem_redis_t *r, op_t *q) {
  q->kind = OP_ABORT;
  q->cb = NULL;
  q->resent = false;
  if (send_op(r, q, false) != 0)
    free(q);
}

static void handle_reply(op_t *q, const redisReply *rep) {
  switch (q->kind) {
  case OP_BEGIN:
    if (rep->type == REDIS_REPLY_ARRAY && rep->elements >= 1 && rep->element[0]->type == REDIS_REPLY_INTEGER) {
      long long st = rep->element[0]->integer;
      if (st == TG_IDEM_NEW || st == TG_IDEM_PENDING || st == TG_IDEM_CONFLICT) {
        deliver(q, (int)st, NULL, 0);
        return;
      }
      if (st == TG_IDEM_DONE && rep->elements == 2 && rep->element[1]->type == REDIS_REPLY_STRING) {
        deliver(q, TG_IDEM_DONE, rep->element[1]->str, rep->element[1]->len);
        return;
      }
    }
    break;
  case OP_FINISH:
    if (rep->type == REDIS_REPLY_INTEGER && rep->integer >= 0 && rep->integer <= 2) {
      if (rep->integer == 2)
        tg_log(TG_LOG_WARN, "idempotency: a pending key expired before its transaction finished "
                            "(raise pending_ttl_ms)",
               "redis", q->r->addr, NULL);
      deliver(q, rep->integer == 0 ? -ESTALE : 0, NULL, 0);
      return;
    }
    break;
  case OP_ABORT:
    if (rep->type == REDIS_REPLY_INTEGER && (rep->integer == 0 || rep->integer == 1)) {
      deliver(q, rep->integer == 1 ? 0 : -ENOENT, NULL, 0);
      return;
    }
    break;
  }
  set_error(q->r, "unexpected reply", rep->type == REDIS_REPLY_ERROR ? rep->str : NULL);
  deliver(q, -EIO, NULL, 0);
}

static void reply_cb(redisAsyncContext *ac, void *reply, void *privdata) {
  const redisReply *rep = reply;
  op_t *q = privdata;
  tg_idem_redis_t *r = q->r;
  q->in_redis = false;
  if (r->ac == ac && r->inflight > 0)
    r->inflight--;
  if (rep == NULL) /* the context is being freed */
    detach(r, ac, "connection lost");
  else
    r->last_activity_ms = mono_ms();
  if (rep && rep->type == REDIS_REPLY_ERROR && strncmp(rep->str, "NOSCRIPT", 8) == 0 && !q->resent &&
      !q->delivered && r->ac == ac) {
    /* The server lost its script cache (restart, failover, SCRIPT FLUSH): EVAL caches it again. */
    q->resent = true;
    if (send_op(r, q, true) == 0)
      return;
  }
  if (q->delivered) { /* timed out before */
    if (rep && q->kind == OP_BEGIN && rep->type == REDIS_REPLY_ARRAY && rep->elements >= 1 &&
        rep->element[0]->type == REDIS_REPLY_INTEGER && rep->element[0]->integer == TG_IDEM_NEW && !r->closing)
      release_late_new(r, q);
    else
      free(q);
    return;
  }
  if (rep == NULL) {
    deliver(q, -EIO, NULL, 0);
    return;
  }
  handle_reply(q, rep);
}

/* AUTH and SELECT: a refusal is a configuration error; keep retrying with backoff. */
static void setup_cb(redisAsyncContext *ac, void *reply, void *privdata) {
  tg_idem_redis_t *r = privdata;
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
  tg_idem_redis_t *r = privdata;
  const redisReply *rep = reply;
  if (rep == NULL) {
    detach(r, ac, "connection lost");
    return;
  }
  if (r->ac != ac)
    return;
  if (rep->type == REDIS_REPLY_STRING && rep->len == 40 && memcmp(rep->str, r->sha, 40) == 0) {
    r->ready = true;
    r->backoff_ms = BACKOFF_MIN_MS;
    r->last_activity_ms = mono_ms();
    if (r->last_log_ms != 0)
      tg_log(TG_LOG_INFO, "idempotency: redis reachable again", "redis", r->addr, NULL);
    r->last_log_ms = 0;
    r->last_error[0] = '\0';
    return;
  }
  set_error(r, "SCRIPT LOAD failed", rep->type == REDIS_REPLY_ERROR ? rep->str : "unexpected reply");
  drop(r);
}

static void connect_cb(const redisAsyncContext *ac, int status) {
  tg_idem_redis_t *r = ac->data;
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

/* The adapter's poll callback drops a non-zero status (POLLERR: a refused
 * or reset connection) and stops watching, so hiredis would never learn of
 * the failure and calls would wait for their timeout on a dead socket. These
 * hooks replace the adapter's (same state, same handle) with a callback that
 * hands the error to hiredis, which then frees the context. */
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

static void connect_redis(tg_idem_redis_t *r) {
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
  r->ready = false;
  r->last_activity_ms = mono_ms();
  /* Pipelined: Redis runs them in order, so a call queued right after finds the script. */
  if (r->password != NULL)
    redisAsyncCommand(ac, setup_cb, r, "AUTH %b", r->password, strlen(r->password));
  if (r->db != 0)
    redisAsyncCommand(ac, setup_cb, r, "SELECT %d", r->db);
  redisAsyncCommand(ac, script_cb, r, "SCRIPT LOAD %b", script, sizeof(script) - 1);
  return;
fail:
  schedule_reconnect(r);
}

static void reconnect_timer_cb(uv_timer_t *t) {
  tg_idem_redis_t *r = t->data;
  if (!r->closing && r->ac == NULL)
    connect_redis(r);
}

static void schedule_reconnect(tg_idem_redis_t *r) {
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

static void arm_deadline(tg_idem_redis_t *r) {
  op_t *q = r->waiting.head;
  if (q == NULL || r->closing)
    return;
  uint64_t now = mono_ms();
  uv_timer_start(&r->deadline_timer, deadline_timer_cb, q->deadline_ms > now ? q->deadline_ms - now : 0, 0);
}

static void deadline_timer_cb(uv_timer_t *t) {
  tg_idem_redis_t *r = t->data;
  uint64_t now = mono_ms();
  bool timed_out = false;
  op_t *q;
  while ((q = r->waiting.head) != NULL && q->deadline_ms <= now) {
    set_error(r, "no reply in time", NULL);
    deliver(q, -ETIMEDOUT, NULL, 0); /* stays allocated until hiredis answers or drops it */
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
  tg_idem_redis_t *r = h->data;
  /* Only those decided before this turn: a callback that calls again waits for the next. */
  size_t n = r->decided.count;
  op_t *q;
  while (n-- > 0 && (q = r->decided.head) != NULL)
    deliver(q, q->status, NULL, 0);
  if (r->decided.head == NULL)
    uv_idle_stop(&r->deliver_idle);
}

static int submit(tg_idem_redis_t *r, int kind, const uint8_t scope[32], const uint8_t req_hash[32],
                  const void *resp, size_t len, tg_idem_redis_cb cb, void *arg) {
  if (r == NULL || scope == NULL || req_hash == NULL || cb == NULL || (resp == NULL && len > 0))
    return -EINVAL;
  if (len > TG_IDEM_REDIS_MAX_RESPONSE)
    return -EMSGSIZE;
  if (r->closing)
    return -ECANCELED;
  size_t mine_len = 1 + 64 + r->instance_len;
  op_t *q = calloc(1, sizeof(*q) + mine_len + 1 + len);
  if (q == NULL)
    return -ENOMEM;
  q->r = r;
  q->cb = cb;
  q->arg = arg;
  q->kind = kind;
  memcpy(q->key, KEY_PREFIX, sizeof(KEY_PREFIX) - 1);
  char hex[65];
  tg_hex_encode(scope, 32, hex);
  memcpy(q->key + sizeof(KEY_PREFIX) - 1, hex, 64);
  q->data[0] = 'P';
  tg_hex_encode(req_hash, 32, q->data + 1);
  memcpy(q->data + 65, r->instance, r->instance_len);
  q->mine_len = mine_len;
  if (len)
    memcpy(q->data + mine_len, resp, len);
  q->resp_len = len;
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

int tg_idem_redis_begin(tg_idem_redis_t *r, const uint8_t scope[32], const uint8_t req_hash[32],
                        tg_idem_redis_cb cb, void *arg) {
  return submit(r, OP_BEGIN, scope, req_hash, NULL, 0, cb, arg);
}

int tg_idem_redis_finish(tg_idem_redis_t *r, const uint8_t scope[32], const uint8_t req_hash[32],
                         const void *resp, size_t len, tg_idem_redis_cb cb, void *arg) {
  return submit(r, OP_FINISH, scope, req_hash, resp, len, cb, arg);
}

int tg_idem_redis_abort(tg_idem_redis_t *r, const uint8_t scope[32], const uint8_t req_hash[32],
                        tg_idem_redis_cb cb, void *arg) {
  return submit(r, OP_ABORT, scope, req_hash, NULL, 0, cb, arg);
}

int tg_idem_redis_ready(const tg_idem_redis_t *r) {
  return r != NULL && r->ac != NULL && r->ready;
}

static void free_strings(tg_idem_redis_t *r) {
  free(r->host);
  if (r->password) {
    explicit_bzero(r->password, strlen(r->password));
    free(r->password);
  }
  free(r->instance);
}

static void handle_closed(uv_handle_t *h) {
  tg_idem_redis_t *r = h->data;
  if (--r->open_handles > 0)
    return;
  free_strings(r);
  free(r);
}

int tg_idem_redis_new(uv_loop_t *loop, const tg_idem_redis_opts_t *o, tg_idem_redis_t **out, char *err,
                      size_t errlen) {
  tg_idem_redis_t *r = NULL;
  int rc = -ENOMEM;
  if (out)
    *out = NULL;
  if (out == NULL || loop == NULL || o == NULL || o->host == NULL || o->ttl_ms == 0 || o->pending_ttl_ms == 0) {
    snprintf(err, errlen, "redis idempotency: missing loop, host, ttl_ms, pending_ttl_ms or result");
    return -EINVAL;
  }
  const char *instance = o->instance ? o->instance : "";
  if (strlen(instance) > MAX_INSTANCE) {
    snprintf(err, errlen, "redis idempotency: instance id longer than %d bytes", MAX_INSTANCE);
    return -EINVAL;
  }
  if ((r = calloc(1, sizeof(*r))) == NULL)
    goto fail;
  r->loop = loop;
  r->port = o->port;
  r->db = o->db;
  r->timeout_ms = o->timeout_ms ? o->timeout_ms : DEFAULT_TIMEOUT_MS;
  snprintf(r->ttl, sizeof(r->ttl), "%llu", (unsigned long long)o->ttl_ms);
  snprintf(r->pending_ttl, sizeof(r->pending_ttl), "%llu", (unsigned long long)o->pending_ttl_ms);
  r->backoff_ms = BACKOFF_MIN_MS;
  r->rng = (uv_hrtime() ^ (uint64_t)(uintptr_t)r) | 1;
  r->host = strdup(o->host);
  r->instance = strdup(instance);
  r->instance_len = strlen(instance);
  if (r->host == NULL || r->instance == NULL || (o->password && (r->password = strdup(o->password)) == NULL))
    goto fail;
  snprintf(r->addr, sizeof(r->addr), strchr(r->host, ':') ? "[%s]:%d" : "%s:%d", r->host, r->port);
  unsigned char digest[20];
  if (mbedtls_sha1_ret((const unsigned char *)script, sizeof(script) - 1, digest) != 0) {
    snprintf(err, errlen, "redis idempotency: cannot hash the script (mbedTLS SHA-1 failed)");
    rc = -EIO;
    goto fail_msg;
  }
  tg_hex_encode(digest, 20, r->sha);
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
  snprintf(err, errlen, "redis idempotency: cannot create its timers: %s", uv_strerror(rc));
  if (r->open_handles > 0) {
    r->closing = true; /* handle_closed frees r with the last of them */
    uv_handle_t *hs[] = {(uv_handle_t *)&r->deadline_timer, (uv_handle_t *)&r->reconnect_timer};
    for (int i = 0, n = r->open_handles; i < n; i++)
      uv_close(hs[i], handle_closed);
    return rc;
  }
  goto fail_msg;
fail:
  snprintf(err, errlen, "redis idempotency: out of memory");
fail_msg:
  if (r) {
    free_strings(r);
    free(r);
  }
  return rc;
}

void tg_idem_redis_free(tg_idem_redis_t *r) {
  if (r == NULL || r->closing)
    return;
  r->closing = true;
  uv_timer_stop(&r->deadline_timer);
  uv_timer_stop(&r->reconnect_timer);
  op_t *q;
  while ((q = r->waiting.head) != NULL)
    deliver(q, -ECANCELED, NULL, 0);
  while ((q = r->decided.head) != NULL)
    deliver(q, -ECANCELED, NULL, 0);
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
