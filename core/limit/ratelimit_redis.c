#include "limit/ratelimit.h"
#include "base/hex.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netdb.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <hiredis/async.h>
#include <hiredis/hiredis.h>
/* Defines static functions, one of them named on_close: no name of ours may clash. */
#include <hiredis/adapters/libuv.h>
#include <mbedtls/sha1.h>

#include "base/log.h"
#include "base/secret.h"

#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 2000
#define STALL_MIN_MS 1000 /* no reply for this long (or 10 x timeout) while requests wait: reconnect */
#define LOG_EVERY_MS 10000
#define DEFAULT_TIMEOUT_MS 20

/* The GCRA of ratelimit.c on the Redis clock. KEYS[1]: the bucket; ARGV[1]:
 * T, ARGV[2]: tau, both us. The TAT is stored as an integer string ('%.0f':
 * tostring would give 1.7e+15) and expires when the bucket is full again.
 * Returns {1, 0} allowed or {0, retry_after_us}. Redis before 5 needs
 * replicate_commands to write after TIME; later versions ignore it. */
static const char script[] =
    "if redis.replicate_commands then redis.replicate_commands() end\n"
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000000 + tonumber(t[2])\n"
    "local interval = tonumber(ARGV[1])\n"
    "local tau = tonumber(ARGV[2])\n"
    "local tat = tonumber(redis.call('GET', KEYS[1])) or now\n"
    "if tat < now then tat = now end\n"
    "if tat - now > tau then return {0, tat - tau - now} end\n"
    "local new = tat + interval\n"
    "redis.call('SET', KEYS[1], string.format('%.0f', new), 'PX', math.ceil((new - now) / 1000))\n"
    "return {1, 0}\n";

typedef struct req req_t;
struct req {
  req_t *prev, *next; /* in waiting or decided, or unlinked */
  tg_ratelimit_redis_t *r;
  tg_ratelimit_cb cb;
  void *arg;
  uint64_t deadline_ms; /* uv_hrtime in ms */
  double rate;
  uint32_t burst;
  uint64_t interval, tau; /* us */
  bool in_redis;          /* a hiredis callback for this request is outstanding */
  bool delivered;
  bool resent; /* NOSCRIPT answered once and EVAL was sent */
  struct req_list *list; /* the list q is on, or NULL */
  int allowed;
  uint32_t retry_ms;
  tg_ratelimit_source_t source;
  const char *tenant; /* into data */
  const char *key;    /* the caller's key, into rkey */
  size_t key_len;
  const char *rkey; /* "tg:rl:<tenant>:<key>", into data */
  size_t rkey_len;
  char data[];
};

typedef struct req_list {
  req_t *head, *tail;
  size_t count;
} req_list_t;

struct tg_ratelimit_redis {
  uv_loop_t *loop;
  tg_ratelimit_t *local;
  char *host;
  int port;
  char *password;
  uint32_t timeout_ms;
  int db;
  char sha[41]; /* SHA-1 of script, hex: what SCRIPT LOAD answers and EVALSHA names */
  char addr[300];

  redisAsyncContext *ac; /* NULL while down */
  bool ready;            /* the script is loaded on this connection */
  bool closing;
  uv_timer_t deadline_timer; /* the first deadline in waiting */
  uv_timer_t reconnect_timer;
  uv_idle_t deliver_idle; /* runs the callbacks of decided on the next loop turn */
  int open_handles;
  req_list_t waiting; /* sent to Redis, undecided, in deadline order */
  req_list_t decided; /* decided at once (no connection), callback pending */

  uint32_t backoff_ms;
  uint64_t rng;
  size_t inflight;           /* takes sent on the current connection, not yet answered */
  uint64_t last_activity_ms; /* last reply, connect, or first send after a quiet spell */
  uint64_t last_log_ms;       /* the last fallback log line */
  uint64_t last_setup_log_ms; /* the last "refused" log line */
  bool logged; /* a fallback was logged since Redis last answered */
  char last_error[160];
};

static void list_push(req_list_t *l, req_t *q) {
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

static void list_remove(req_t *q) {
  req_list_t *l = q->list;
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

static uint64_t now_ms(void) {
  return uv_hrtime() / 1000000;
}

static void set_error(tg_ratelimit_redis_t *r, const char *what, const char *detail) {
  snprintf(r->last_error, sizeof(r->last_error), "%s%s%s", what, detail && *detail ? ": " : "",
           detail ? detail : "");
}

/* Runs the callback once; the request is freed unless hiredis still holds it. */
static void deliver(req_t *q) {
  if (q->list)
    list_remove(q);
  q->delivered = true;
  tg_ratelimit_count(q->tenant, q->allowed, q->source);
  q->cb(q->arg, q->allowed, q->retry_ms, q->source);
  if (!q->in_redis)
    free(q);
}

static void note_fallback(tg_ratelimit_redis_t *r, const char *reason) {
  tg_ratelimit_count_fallback(reason);
  uint64_t now = now_ms();
  if (r->last_log_ms != 0 && now - r->last_log_ms < LOG_EVERY_MS)
    return;
  r->last_log_ms = now ? now : 1;
  r->logged = true;
  tg_log(TG_LOG_WARN, "redis unreachable, using local limits", "redis", r->addr, "reason", reason, "error",
         r->last_error[0] ? r->last_error : NULL, NULL);
}

/* A refused AUTH, SELECT or SCRIPT LOAD repeats at every reconnect: logged once per interval too. */
static void log_refusal(tg_ratelimit_redis_t *r, const char *msg, const char *error) {
  uint64_t now = now_ms();
  if (r->last_setup_log_ms != 0 && now - r->last_setup_log_ms < LOG_EVERY_MS)
    return;
  r->last_setup_log_ms = now ? now : 1;
  tg_log(TG_LOG_ERROR, msg, "redis", r->addr, "error", error, NULL);
}

/* Decides q with the local table, now. */
static void decide_locally(req_t *q, const char *reason) {
  uint32_t retry = 0;
  int rc = tg_ratelimit_check(q->r->local, q->tenant, q->key, q->key_len, q->rate, q->burst, tg_ratelimit_now_us(),
                              &retry);
  q->allowed = rc != 0; /* arguments were checked at take: rc is 0 or 1 */
  q->retry_ms = rc == 0 ? retry : 0;
  q->source = TG_RATELIMIT_FALLBACK;
  note_fallback(q->r, reason);
}

static void reply_cb(redisAsyncContext *ac, void *reply, void *privdata);
static void schedule_reconnect(tg_ratelimit_redis_t *r);

/* Queues EVALSHA (or EVAL after NOSCRIPT) for q on the current connection. */
static int send_take(tg_ratelimit_redis_t *r, req_t *q, bool eval) {
  char interval[24], tau[24];
  snprintf(interval, sizeof(interval), "%" PRIu64, q->interval);
  snprintf(tau, sizeof(tau), "%" PRIu64, q->tau);
  const char *argv[6] = {eval ? "EVAL" : "EVALSHA", eval ? script : r->sha, "1", q->rkey, interval, tau};
  /* Lengths from the text, not from snprintf's return (the untruncated size). */
  size_t lens[6] = {eval ? 4 : 7, eval ? sizeof(script) - 1 : 40, 1, q->rkey_len, strlen(interval), strlen(tau)};
  if (r->ac == NULL || redisAsyncCommandArgv(r->ac, reply_cb, q, 6, argv, lens) != REDIS_OK)
    return -1;
  q->in_redis = true;
  if (r->inflight++ == 0)
    r->last_activity_ms = now_ms();
  return 0;
}

/* The context is gone or going: forget it and plan the next attempt. */
static void detach(tg_ratelimit_redis_t *r, const redisAsyncContext *ac, const char *what) {
  if (r->ac != ac)
    return;
  if (ac->c.err)
    set_error(r, what, ac->c.errstr);
  r->ac = NULL;
  r->ready = false;
  r->inflight = 0;
  schedule_reconnect(r);
}

/* Closes the current connection now; waiting requests fall back. */
static void drop(tg_ratelimit_redis_t *r) {
  redisAsyncContext *ac = r->ac;
  if (ac == NULL)
    return;
  r->ac = NULL;
  r->ready = false;
  r->inflight = 0;
  /* Inside a hiredis callback this is deferred until the callback returns. */
  redisAsyncFree(ac);
  schedule_reconnect(r);
}

static void reply_cb(redisAsyncContext *ac, void *reply, void *privdata) {
  redisReply *rep = reply;
  req_t *q = privdata;
  tg_ratelimit_redis_t *r = q->r;
  q->in_redis = false;
  if (r->ac == ac && r->inflight > 0)
    r->inflight--;
  if (rep == NULL) /* the context is being freed */
    detach(r, ac, "connection lost");
  else
    r->last_activity_ms = now_ms();
  if (q->delivered) { /* timed out before */
    free(q);
    return;
  }
  if (rep == NULL) {
    decide_locally(q, "unavailable");
    deliver(q);
    return;
  }
  if (rep->type == REDIS_REPLY_ERROR && strncmp(rep->str, "NOSCRIPT", 8) == 0 && !q->resent && r->ac == ac) {
    /* The server lost its script cache (restart, failover, SCRIPT FLUSH): EVAL caches it again. */
    q->resent = true;
    if (send_take(r, q, true) == 0)
      return;
  }
  if (rep->type == REDIS_REPLY_ARRAY && rep->elements == 2 && rep->element[0]->type == REDIS_REPLY_INTEGER &&
      rep->element[1]->type == REDIS_REPLY_INTEGER) {
    long long retry_us = rep->element[1]->integer;
    q->allowed = rep->element[0]->integer == 1;
    q->retry_ms = 0;
    if (!q->allowed) {
      uint64_t ms = retry_us > 0 ? ((uint64_t)retry_us + 999) / 1000 : 1;
      q->retry_ms = ms == 0 ? 1 : ms > UINT32_MAX ? UINT32_MAX : (uint32_t)ms;
    }
    q->source = TG_RATELIMIT_REDIS;
    deliver(q);
    return;
  }
  set_error(r, "unexpected reply", rep->type == REDIS_REPLY_ERROR ? rep->str : NULL);
  decide_locally(q, "error");
  deliver(q);
}

/* AUTH and SELECT: a refusal is a configuration error; keep retrying with backoff. */
static void setup_cb(redisAsyncContext *ac, void *reply, void *privdata) {
  tg_ratelimit_redis_t *r = privdata;
  redisReply *rep = reply;
  if (rep == NULL) {
    detach(r, ac, "connection lost");
    return;
  }
  if (rep->type == REDIS_REPLY_ERROR && r->ac == ac) {
    set_error(r, "connection setup refused", rep->str);
    log_refusal(r, "redis refused the connection setup", rep->str);
    drop(r);
  }
}

static void script_cb(redisAsyncContext *ac, void *reply, void *privdata) {
  tg_ratelimit_redis_t *r = privdata;
  redisReply *rep = reply;
  if (rep == NULL) {
    detach(r, ac, "connection lost");
    return;
  }
  if (r->ac != ac)
    return;
  if (rep->type == REDIS_REPLY_STRING && rep->len == 40 && memcmp(rep->str, r->sha, 40) == 0) {
    r->ready = true;
    r->backoff_ms = BACKOFF_MIN_MS;
    r->last_activity_ms = now_ms();
    r->last_error[0] = '\0';
    if (r->logged)
      tg_log(TG_LOG_INFO, "redis reachable again, using distributed limits", "redis", r->addr, NULL);
    r->logged = false;
    return;
  }
  set_error(r, "SCRIPT LOAD failed", rep->type == REDIS_REPLY_ERROR ? rep->str : "unexpected reply");
  log_refusal(r, "redis refused the rate limit script", r->last_error);
  drop(r);
}

static void connect_cb(const redisAsyncContext *ac, int status) {
  tg_ratelimit_redis_t *r = ac->data;
  if (status != REDIS_OK) {
    detach(r, ac, "cannot connect"); /* hiredis frees the context after this returns */
    return;
  }
  r->last_activity_ms = now_ms();
}

static void disconnect_cb(const redisAsyncContext *ac, int status) {
  (void)status;
  detach(ac->data, ac, "connection lost");
}

/* libuv reports POLLERR (a refused or reset connection) as an error status
 * and stops the handle; the adapter's poll callback ignores that status, so
 * hiredis would never learn of the failure and the connection would hang.
 * These four hooks stand in for the adapter's own (same state, same
 * handle) with a poll callback that hands the error to hiredis. */
static void poll_cb(uv_poll_t *handle, int status, int events) {
  redisLibuvEvents *p = handle->data;
  if (p->context == NULL)
    return;
  if (status == 0) {
    redisLibuvPoll(handle, status, events);
    return;
  }
  /* Connecting: the write path reads SO_ERROR; connected: the read fails. Either frees the context. */
  if (p->context->c.flags & REDIS_CONNECTED)
    redisAsyncHandleRead(p->context);
  else
    redisAsyncHandleWrite(p->context);
}

static void watch(redisLibuvEvents *p, int add, int del) {
  p->events = (p->events | add) & ~del;
  if (p->events)
    uv_poll_start(&p->handle, p->events, poll_cb);
  else
    uv_poll_stop(&p->handle);
}

static void add_read(void *privdata) {
  watch(privdata, UV_READABLE, 0);
}

static void del_read(void *privdata) {
  watch(privdata, 0, UV_READABLE);
}

static void add_write(void *privdata) {
  watch(privdata, UV_WRITABLE, 0);
}

static void del_write(void *privdata) {
  watch(privdata, 0, UV_WRITABLE);
}

static void connect_redis(tg_ratelimit_redis_t *r) {
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
    /* A failed attach leaves its hooks set with no data: they must not run. */
    memset(&ac->ev, 0, sizeof(ac->ev));
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
  r->last_activity_ms = now_ms();
  /* Pipelined: Redis runs them in order, so a take queued right after
   * already finds the script. Queuing also makes hiredis report the connect. */
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
  tg_ratelimit_redis_t *r = t->data;
  if (!r->closing && r->ac == NULL)
    connect_redis(r);
}

static void schedule_reconnect(tg_ratelimit_redis_t *r) {
  if (r->closing || uv_is_active((uv_handle_t *)&r->reconnect_timer))
    return;
  /* Jittered so that the workers of many instances do not return in step. */
  r->rng ^= r->rng << 13;
  r->rng ^= r->rng >> 7;
  r->rng ^= r->rng << 17;
  uint32_t half = r->backoff_ms / 2;
  uint64_t delay = half + r->rng % (half + 1);
  uv_timer_start(&r->reconnect_timer, reconnect_timer_cb, delay, 0);
  r->backoff_ms = r->backoff_ms * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : r->backoff_ms * 2;
}

static void deadline_timer_cb(uv_timer_t *t);

static void arm_deadline(tg_ratelimit_redis_t *r) {
  req_t *q = r->waiting.head;
  if (q == NULL || r->closing)
    return;
  uint64_t now = now_ms();
  uv_timer_start(&r->deadline_timer, deadline_timer_cb, q->deadline_ms > now ? q->deadline_ms - now : 0, 0);
}

static void deadline_timer_cb(uv_timer_t *t) {
  tg_ratelimit_redis_t *r = t->data;
  uint64_t now = now_ms();
  bool timed_out = false;
  req_t *q;
  while ((q = r->waiting.head) != NULL && q->deadline_ms <= now) {
    list_remove(q);
    decide_locally(q, "timeout");
    deliver(q); /* stays allocated until hiredis answers or drops it */
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
  tg_ratelimit_redis_t *r = h->data;
  /* Only those decided before this turn: callbacks that take again wait for the next. */
  size_t n = r->decided.count;
  req_t *q;
  while (n-- > 0 && (q = r->decided.head) != NULL)
    deliver(q);
  if (r->decided.head == NULL)
    uv_idle_stop(&r->deliver_idle);
}

int tg_ratelimit_redis_take(tg_ratelimit_redis_t *r, const char *tenant, const char *key, size_t key_len,
                            double rate_per_s, uint32_t burst, tg_ratelimit_cb cb, void *arg) {
  uint64_t interval, tau;
  if (r == NULL || tenant == NULL || cb == NULL || (key == NULL && key_len > 0) ||
      tg_ratelimit_params(rate_per_s, burst, &interval, &tau) != 0)
    return -EINVAL;
  if (r->closing)
    return -ECANCELED;
  size_t tlen = strlen(tenant);
  size_t rkey_len = 6 + tlen + 1 + key_len;
  req_t *q = calloc(1, sizeof(*q) + tlen + 1 + rkey_len + 1);
  if (q == NULL)
    return -ENOMEM;
  char *p = q->data;
  memcpy(p, tenant, tlen + 1);
  q->tenant = p;
  p += tlen + 1;
  q->rkey = p;
  q->rkey_len = rkey_len;
  memcpy(p, "tg:rl:", 6);
  memcpy(p + 6, tenant, tlen);
  p[6 + tlen] = ':';
  if (key_len)
    memcpy(p + 7 + tlen, key, key_len);
  q->key = p + 7 + tlen;
  q->key_len = key_len;
  q->r = r;
  q->cb = cb;
  q->arg = arg;
  q->rate = rate_per_s;
  q->burst = burst;
  q->interval = interval;
  q->tau = tau;
  q->deadline_ms = now_ms() + r->timeout_ms;
  if (send_take(r, q, false) == 0) {
    list_push(&r->waiting, q);
    if (!uv_is_active((uv_handle_t *)&r->deadline_timer))
      arm_deadline(r);
    return 0;
  }
  if (r->last_error[0] == '\0')
    set_error(r, "not connected", NULL);
  decide_locally(q, "unavailable");
  list_push(&r->decided, q);
  uv_idle_start(&r->deliver_idle, deliver_idle_cb);
  return 0;
}

int tg_ratelimit_redis_ready(const tg_ratelimit_redis_t *r) {
  return r != NULL && r->ac != NULL && r->ready;
}

static void handle_closed(uv_handle_t *h) {
  tg_ratelimit_redis_t *r = h->data;
  if (--r->open_handles > 0)
    return;
  free(r->host);
  if (r->password) {
    explicit_bzero(r->password, strlen(r->password));
    free(r->password);
  }
  free(r);
}

int tg_ratelimit_redis_new(uv_loop_t *loop, const tg_ratelimit_redis_opts_t *opts, tg_ratelimit_t *local,
                           tg_ratelimit_redis_t **out, char *err, size_t errlen) {
  tg_ratelimit_redis_t *r = NULL;
  int rc = -ENOMEM;
  if (out)
    *out = NULL;
  if (out == NULL || loop == NULL || opts == NULL || opts->host == NULL || local == NULL) {
    snprintf(err, errlen, "redis rate limiter: missing loop, host, local table or result");
    return -EINVAL;
  }
  r = calloc(1, sizeof(*r));
  if (r == NULL)
    goto fail;
  r->loop = loop;
  r->local = local;
  r->port = opts->port;
  r->db = opts->db;
  r->timeout_ms = opts->timeout_ms ? opts->timeout_ms : DEFAULT_TIMEOUT_MS;
  r->backoff_ms = BACKOFF_MIN_MS;
  r->rng = (uv_hrtime() ^ (uint64_t)(uintptr_t)r) | 1;
  r->host = strdup(opts->host);
  if (r->host == NULL || (opts->password && (r->password = strdup(opts->password)) == NULL))
    goto fail;
  snprintf(r->addr, sizeof(r->addr), strchr(r->host, ':') ? "[%s]:%d" : "%s:%d", r->host, r->port);
  unsigned char digest[20];
  if (mbedtls_sha1_ret((const unsigned char *)script, sizeof(script) - 1, digest) != 0) {
    snprintf(err, errlen, "redis rate limiter: cannot hash the script (mbedTLS SHA-1 failed)");
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
  snprintf(err, errlen, "redis rate limiter: cannot create its timers: %s", uv_strerror(rc));
  if (r->open_handles > 0) {
    /* handle_closed frees r with the last of them. */
    r->closing = true;
    uv_handle_t *hs[] = {(uv_handle_t *)&r->deadline_timer, (uv_handle_t *)&r->reconnect_timer};
    for (int i = 0, n = r->open_handles; i < n; i++)
      uv_close(hs[i], handle_closed);
    return rc;
  }
  goto fail_msg;
fail:
  snprintf(err, errlen, "redis rate limiter: out of memory");
fail_msg:
  if (r) {
    free(r->host);
    free(r->password);
    free(r);
  }
  return rc;
}

void tg_ratelimit_redis_free(tg_ratelimit_redis_t *r) {
  if (r == NULL || r->closing)
    return;
  r->closing = true;
  uv_timer_stop(&r->deadline_timer);
  uv_timer_stop(&r->reconnect_timer);
  req_t *q;
  while ((q = r->waiting.head) != NULL) {
    list_remove(q);
    decide_locally(q, "unavailable");
    deliver(q);
  }
  while ((q = r->decided.head) != NULL)
    deliver(q);
  uv_idle_stop(&r->deliver_idle);
  if (r->ac != NULL) {
    redisAsyncContext *ac = r->ac;
    r->ac = NULL;
    /* Outstanding replies come back as NULL and free their (delivered) requests. */
    redisAsyncFree(ac);
  }
  uv_close((uv_handle_t *)&r->deadline_timer, handle_closed);
  uv_close((uv_handle_t *)&r->reconnect_timer, handle_closed);
  uv_close((uv_handle_t *)&r->deliver_idle, handle_closed);
}

static bool is_ip(const char *h) {
  unsigned char buf[sizeof(struct in6_addr)];
  return inet_pton(AF_INET, h, buf) == 1 || inet_pton(AF_INET6, h, buf) == 1;
}


int tg_ratelimit_redis_opts_init(tg_ratelimit_redis_opts_t *o, const tg_config_redis_t *cfg, char *err,
                                 size_t errlen) {
  memset(o, 0, sizeof(*o));
  if (cfg == NULL || cfg->host == NULL) {
    snprintf(err, errlen, "no redis section in the config");
    return -1;
  }
  o->port = cfg->port;
  o->timeout_ms = cfg->timeout_ms;
  o->db = cfg->db;
  if (!is_ip(cfg->host)) {
    /* hiredis resolves with a blocking getaddrinfo at every connect: once
     * here, on the main thread, spares the workers that. */
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res = NULL;
    char ip[INET6_ADDRSTRLEN];
    if (getaddrinfo(cfg->host, NULL, &hints, &res) == 0 && res != NULL &&
        getnameinfo(res->ai_addr, res->ai_addrlen, ip, sizeof(ip), NULL, 0, NI_NUMERICHOST) == 0)
      o->host = strdup(ip);
    else
      tg_log(TG_LOG_WARN, "cannot resolve the redis host now; workers will retry", "host", cfg->host, NULL);
    if (res)
      freeaddrinfo(res);
  }
  if (o->host == NULL && (o->host = strdup(cfg->host)) == NULL) {
    snprintf(err, errlen, "out of memory");
    goto fail;
  }
  if (cfg->password_file && (o->password = tg_secret_read(cfg->password_file, "redis password", 0, err, errlen)) == NULL)
    goto fail;
  return 0;
fail:
  tg_ratelimit_redis_opts_clear(o);
  return -1;
}

void tg_ratelimit_redis_opts_clear(tg_ratelimit_redis_opts_t *o) {
  free(o->host);
  if (o->password) {
    explicit_bzero(o->password, strlen(o->password));
    free(o->password);
  }
  memset(o, 0, sizeof(*o));
}
