#include "base/redisconn.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <hiredis/async.h>
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

typedef struct cmd {
  unsigned script;
  int nkeys, argc;
  const char **argv; /* into the call's data */
  size_t *lens;
} cmd_t;

typedef struct call call_t;
typedef struct call_list {
  call_t *head, *tail;
  size_t count;
} call_list_t;

struct call {
  call_t *prev, *next; /* in waiting or decided */
  call_list_t *list;   /* the list it is on, or NULL */
  tg_redisconn_t *c;
  tg_redisconn_cb cb;
  void *arg;
  int status;           /* decided without Redis: the status to deliver */
  uint64_t deadline_ms; /* uv_hrtime in ms */
  bool in_redis;        /* a hiredis callback for this call is outstanding */
  bool delivered;
  bool undoing; /* the undo was sent: its reply is wanted, nobody is told */
  bool resent;  /* NOSCRIPT answered once and EVAL was sent */
  cmd_t cmd, undo;
  bool (*undo_when)(const redisReply *late); /* NULL: no undo */
  char data[];
};

typedef struct script {
  const char *text;
  size_t len;
  char sha[41]; /* SHA-1, hex: what SCRIPT LOAD answers and EVALSHA names */
} script_t;

struct tg_redisconn {
  uv_loop_t *loop;
  char *host;
  int port;
  char *password;
  int db;
  uint32_t timeout_ms;
  const char *what, *down_msg, *up_msg;
  char *instance;
  char addr[300];
  script_t *scripts;
  size_t nscripts;

  redisAsyncContext *ac; /* NULL while down */
  size_t loaded;         /* scripts loaded on this connection */
  bool closing;
  uv_timer_t deadline_timer; /* the first deadline in waiting */
  uv_timer_t reconnect_timer;
  uv_idle_t deliver_idle; /* runs the callbacks of decided on the next loop turn */
  int open_handles;
  call_list_t waiting; /* sent, unanswered, in deadline order (one timeout for all) */
  call_list_t decided; /* failed at once (no connection), callback pending */

  uint32_t backoff_ms;
  uint64_t rng;
  size_t inflight;           /* calls sent on the current connection, not yet answered */
  uint64_t last_activity_ms; /* last reply, connect, or first send after a quiet spell */
  uint64_t last_down_log_ms; /* the last down_msg line; 0 once ready again */
  uint64_t last_refusal_log_ms;
  char last_error[160];
};

static uint64_t mono_ms(void) {
  return uv_hrtime() / 1000000;
}

static void list_push(call_list_t *l, call_t *q) {
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

static void list_remove(call_t *q) {
  call_list_t *l = q->list;
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

void tg_redisconn_set_error(tg_redisconn_t *c, const char *what, const char *detail) {
  snprintf(c->last_error, sizeof(c->last_error), "%s%s%s", what, detail && *detail ? ": " : "",
           detail ? detail : "");
}

/* True at most once per LOG_EVERY_MS for *last. */
static bool log_due(uint64_t *last) {
  uint64_t now = mono_ms();
  if (*last != 0 && now - *last < LOG_EVERY_MS)
    return false;
  *last = now ? now : 1;
  return true;
}

void tg_redisconn_log_down(tg_redisconn_t *c, const char *reason) {
  if (!log_due(&c->last_down_log_ms))
    return;
  const char *error = c->last_error[0] ? c->last_error : NULL;
  if (c->instance)
    tg_log(TG_LOG_WARN, c->down_msg, "redis", c->addr, "instance", c->instance, "reason", reason, "error", error,
           NULL);
  else
    tg_log(TG_LOG_WARN, c->down_msg, "redis", c->addr, "reason", reason, "error", error, NULL);
}

/* A refused AUTH, SELECT or SCRIPT LOAD repeats at every reconnect: logged once per interval. */
static void log_refusal(tg_redisconn_t *c, const char *msg) {
  if (log_due(&c->last_refusal_log_ms))
    tg_log(TG_LOG_ERROR, msg, "client", c->what, "redis", c->addr, "error", c->last_error, NULL);
}

/* Runs the callback once; the call is freed unless hiredis still holds it. */
static void deliver(call_t *q, int status, const redisReply *reply) {
  if (q->list)
    list_remove(q);
  q->delivered = true;
  q->cb(q->arg, status, reply);
  if (!q->in_redis)
    free(q);
}

/* ---- the connection */

static void reply_cb(redisAsyncContext *ac, void *reply, void *privdata);
static void schedule_reconnect(tg_redisconn_t *c);

/* Queues EVALSHA (EVAL after NOSCRIPT) of cmd on the current connection. */
static int send_cmd(tg_redisconn_t *c, call_t *q, const cmd_t *cmd, bool eval) {
  const script_t *s = &c->scripts[cmd->script];
  const char *argv[3 + TG_REDISCONN_MAX_ARGS];
  size_t lens[3 + TG_REDISCONN_MAX_ARGS];
  char nkeys[12];
  snprintf(nkeys, sizeof(nkeys), "%d", cmd->nkeys);
  argv[0] = eval ? "EVAL" : "EVALSHA";
  lens[0] = strlen(argv[0]);
  argv[1] = eval ? s->text : s->sha;
  lens[1] = eval ? s->len : 40;
  argv[2] = nkeys;
  lens[2] = strlen(nkeys);
  memcpy(argv + 3, cmd->argv, (size_t)cmd->argc * sizeof(*argv));
  memcpy(lens + 3, cmd->lens, (size_t)cmd->argc * sizeof(*lens));
  if (c->ac == NULL || redisAsyncCommandArgv(c->ac, reply_cb, q, 3 + cmd->argc, argv, lens) != REDIS_OK)
    return -1;
  q->in_redis = true;
  if (c->inflight++ == 0)
    c->last_activity_ms = mono_ms();
  return 0;
}

/* The context is gone or going: forget it and plan the next attempt. */
static void detach(tg_redisconn_t *c, const redisAsyncContext *ac, const char *what) {
  if (c->ac != ac)
    return;
  tg_redisconn_set_error(c, what, ac->c.err ? ac->c.errstr : NULL);
  c->ac = NULL;
  c->loaded = 0;
  c->inflight = 0;
  schedule_reconnect(c);
}

/* Closes the current connection now: calls waiting on it get -EIO. */
static void drop(tg_redisconn_t *c) {
  redisAsyncContext *ac = c->ac;
  if (ac == NULL)
    return;
  c->ac = NULL;
  c->loaded = 0;
  c->inflight = 0;
  redisAsyncFree(ac); /* inside a hiredis callback, deferred until it returns */
  schedule_reconnect(c);
}

static bool is_noscript(const redisReply *rep) {
  return rep && rep->type == REDIS_REPLY_ERROR && strncmp(rep->str, "NOSCRIPT", 8) == 0;
}

/* A reply that came after its caller was told (timeout or cancel). */
static void late_reply(tg_redisconn_t *c, call_t *q, const redisReply *rep) {
  if (rep && !q->undoing && q->undo_when && !c->closing && q->undo_when(rep)) {
    q->undoing = true;
    q->resent = false;
    if (send_cmd(c, q, &q->undo, false) == 0)
      return;
  }
  free(q);
}

static void reply_cb(redisAsyncContext *ac, void *reply, void *privdata) {
  const redisReply *rep = reply;
  call_t *q = privdata;
  tg_redisconn_t *c = q->c;
  q->in_redis = false;
  if (c->ac == ac && c->inflight > 0)
    c->inflight--;
  if (rep == NULL) /* the context is being freed */
    detach(c, ac, "connection lost");
  else
    c->last_activity_ms = mono_ms();
  bool wanted = !q->delivered || q->undoing;
  if (is_noscript(rep) && wanted && !q->resent && c->ac == ac) {
    q->resent = true;
    if (send_cmd(c, q, q->undoing ? &q->undo : &q->cmd, true) == 0)
      return;
  }
  if (q->delivered)
    late_reply(c, q, rep);
  else
    deliver(q, rep ? 0 : -EIO, rep);
}

static void became_ready(tg_redisconn_t *c) {
  c->backoff_ms = BACKOFF_MIN_MS;
  c->last_activity_ms = mono_ms();
  if (c->last_down_log_ms != 0)
    tg_log(TG_LOG_INFO, c->up_msg, "redis", c->addr, NULL);
  c->last_down_log_ms = 0;
  c->last_error[0] = '\0';
}

/* AUTH and SELECT: a refusal is a configuration error; keep retrying with backoff. */
static void setup_cb(redisAsyncContext *ac, void *reply, void *privdata) {
  tg_redisconn_t *c = privdata;
  const redisReply *rep = reply;
  if (rep == NULL) {
    detach(c, ac, "connection lost");
    return;
  }
  if (rep->type == REDIS_REPLY_ERROR && c->ac == ac) {
    tg_redisconn_set_error(c, "connection setup refused", rep->str);
    log_refusal(c, "redis refused the connection setup");
    drop(c);
  }
}

/* SCRIPT LOAD answers in order: the loaded-th script. */
static void script_cb(redisAsyncContext *ac, void *reply, void *privdata) {
  tg_redisconn_t *c = privdata;
  const redisReply *rep = reply;
  if (rep == NULL) {
    detach(c, ac, "connection lost");
    return;
  }
  if (c->ac != ac)
    return;
  const script_t *s = c->loaded < c->nscripts ? &c->scripts[c->loaded] : NULL;
  if (s && rep->type == REDIS_REPLY_STRING && rep->len == 40 && memcmp(rep->str, s->sha, 40) == 0) {
    if (++c->loaded == c->nscripts)
      became_ready(c);
    return;
  }
  tg_redisconn_set_error(c, "SCRIPT LOAD failed", rep->type == REDIS_REPLY_ERROR ? rep->str : "unexpected reply");
  log_refusal(c, "redis refused a script");
  drop(c);
}

static void connect_cb(const redisAsyncContext *ac, int status) {
  tg_redisconn_t *c = ac->data;
  if (status != REDIS_OK) {
    detach(c, ac, "cannot connect"); /* hiredis frees the context after this returns */
    return;
  }
  c->last_activity_ms = mono_ms();
}

static void disconnect_cb(const redisAsyncContext *ac, int status) {
  (void)status;
  detach(ac->data, ac, "connection lost");
}

/* libuv reports POLLERR (a refused or reset connection) as an error status
 * and stops the handle; the adapter's poll callback ignores that status, so
 * hiredis would never learn of the failure and calls would wait for their
 * timeout on a dead socket. These hooks stand in for the adapter's (same
 * state, same handle) with a poll callback that hands the error to hiredis,
 * which then frees the context. */
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

/* A context on the loop, with our poll hooks; NULL (and last_error) on failure. */
static redisAsyncContext *open_context(tg_redisconn_t *c) {
  redisAsyncContext *ac = redisAsyncConnect(c->host, c->port);
  if (ac == NULL) {
    tg_redisconn_set_error(c, "cannot connect", "out of memory");
    return NULL;
  }
  if (ac->err) {
    tg_redisconn_set_error(c, "cannot connect", ac->errstr);
    redisAsyncFree(ac);
    return NULL;
  }
  if (redisLibuvAttach(ac, c->loop) != REDIS_OK) {
    tg_redisconn_set_error(c, "cannot connect", "cannot watch the socket");
    memset(&ac->ev, 0, sizeof(ac->ev)); /* a failed attach leaves hooks set with no data */
    redisAsyncFree(ac);
    return NULL;
  }
  ac->ev.addRead = add_read;
  ac->ev.delRead = del_read;
  ac->ev.addWrite = add_write;
  ac->ev.delWrite = del_write;
  ac->data = c;
  redisAsyncSetConnectCallback(ac, connect_cb);
  redisAsyncSetDisconnectCallback(ac, disconnect_cb);
  return ac;
}

static void connect_redis(tg_redisconn_t *c) {
  redisAsyncContext *ac = open_context(c);
  if (ac == NULL) {
    schedule_reconnect(c);
    return;
  }
  c->ac = ac;
  c->loaded = 0;
  c->last_activity_ms = mono_ms();
  /* Pipelined: Redis runs them in order, so a call queued right after finds
   * the scripts. Queuing also makes hiredis report the connect. */
  if (c->password != NULL)
    redisAsyncCommand(ac, setup_cb, c, "AUTH %b", c->password, strlen(c->password));
  if (c->db != 0)
    redisAsyncCommand(ac, setup_cb, c, "SELECT %d", c->db);
  for (size_t i = 0; i < c->nscripts; i++)
    redisAsyncCommand(ac, script_cb, c, "SCRIPT LOAD %b", c->scripts[i].text, c->scripts[i].len);
}

static void reconnect_timer_cb(uv_timer_t *t) {
  tg_redisconn_t *c = t->data;
  if (!c->closing && c->ac == NULL)
    connect_redis(c);
}

static void schedule_reconnect(tg_redisconn_t *c) {
  if (c->closing || uv_is_active((uv_handle_t *)&c->reconnect_timer))
    return;
  /* Jittered so that the workers of many instances do not come back in step. */
  c->rng ^= c->rng << 13;
  c->rng ^= c->rng >> 7;
  c->rng ^= c->rng << 17;
  uint32_t half = c->backoff_ms / 2;
  uv_timer_start(&c->reconnect_timer, reconnect_timer_cb, half + c->rng % (half + 1), 0);
  c->backoff_ms = c->backoff_ms * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : c->backoff_ms * 2;
}

/* ---- calls */

static void deadline_timer_cb(uv_timer_t *t);

static void arm_deadline(tg_redisconn_t *c) {
  call_t *q = c->waiting.head;
  if (q == NULL || c->closing)
    return;
  uint64_t now = mono_ms();
  uv_timer_start(&c->deadline_timer, deadline_timer_cb, q->deadline_ms > now ? q->deadline_ms - now : 0, 0);
}

static void deadline_timer_cb(uv_timer_t *t) {
  tg_redisconn_t *c = t->data;
  uint64_t now = mono_ms();
  bool timed_out = false;
  call_t *q;
  while ((q = c->waiting.head) != NULL && q->deadline_ms <= now) {
    tg_redisconn_set_error(c, "no reply in time", NULL);
    deliver(q, -ETIMEDOUT, NULL); /* stays allocated until hiredis answers or drops it */
    timed_out = true;
  }
  uint64_t stall = c->timeout_ms * 10u > STALL_MIN_MS ? c->timeout_ms * 10u : STALL_MIN_MS;
  if (timed_out && c->ac != NULL && now - c->last_activity_ms >= stall) {
    tg_redisconn_set_error(c, "no reply", "connection stalled");
    drop(c);
  }
  arm_deadline(c);
}

static void deliver_idle_cb(uv_idle_t *h) {
  tg_redisconn_t *c = h->data;
  /* Only those decided before this turn: a callback that calls again waits for the next. */
  size_t n = c->decided.count;
  call_t *q;
  while (n-- > 0 && (q = c->decided.head) != NULL)
    deliver(q, q->status, NULL);
  if (c->decided.head == NULL)
    uv_idle_stop(&c->deliver_idle);
}

static size_t cmd_size(const tg_redisconn_eval_t *e) {
  size_t n = (size_t)e->argc * (sizeof(char *) + sizeof(size_t) + 1);
  for (int i = 0; i < e->argc; i++)
    n += e->lens[i];
  return n;
}

/* Copies e into the call's data at *at: pointer arrays first, then the bytes. */
static void cmd_copy(cmd_t *to, const tg_redisconn_eval_t *e, char **at) {
  to->script = e->script;
  to->nkeys = e->nkeys;
  to->argc = e->argc;
  to->argv = (const char **)*at;
  to->lens = (size_t *)(*at + (size_t)e->argc * sizeof(char *));
  char *p = *at + (size_t)e->argc * (sizeof(char *) + sizeof(size_t));
  for (int i = 0; i < e->argc; i++) {
    memcpy(p, e->argv[i], e->lens[i]);
    p[e->lens[i]] = '\0';
    to->argv[i] = p;
    to->lens[i] = e->lens[i];
    p += e->lens[i] + 1;
  }
  *at = p;
}

static bool valid_eval(const tg_redisconn_t *c, const tg_redisconn_eval_t *e) {
  return e->script < c->nscripts && e->argc >= 0 && e->argc <= TG_REDISCONN_MAX_ARGS && e->nkeys >= 0 &&
         e->nkeys <= e->argc && (e->argc == 0 || (e->argv && e->lens));
}

static call_t *call_new(tg_redisconn_t *c, const tg_redisconn_eval_t *e, const tg_redisconn_undo_t *undo) {
  /* data holds pointer arrays: keep it aligned for them. */
  size_t size = sizeof(call_t) + cmd_size(e) + (undo ? cmd_size(&undo->eval) : 0) + 2 * sizeof(void *);
  call_t *q = calloc(1, size);
  if (q == NULL)
    return NULL;
  char *at = q->data + (-(uintptr_t)q->data & (sizeof(void *) - 1));
  cmd_copy(&q->cmd, e, &at);
  if (undo) {
    at += -(uintptr_t)at & (sizeof(void *) - 1);
    cmd_copy(&q->undo, &undo->eval, &at);
    q->undo_when = undo->when;
  }
  q->c = c;
  return q;
}

int tg_redisconn_call(tg_redisconn_t *c, const tg_redisconn_eval_t *e, const tg_redisconn_undo_t *undo,
                      tg_redisconn_cb cb, void *arg) {
  if (c == NULL || e == NULL || cb == NULL || !valid_eval(c, e) ||
      (undo && (undo->when == NULL || !valid_eval(c, &undo->eval))))
    return -EINVAL;
  if (c->closing)
    return -ECANCELED;
  call_t *q = call_new(c, e, undo);
  if (q == NULL)
    return -ENOMEM;
  q->cb = cb;
  q->arg = arg;
  q->deadline_ms = mono_ms() + c->timeout_ms;
  if (send_cmd(c, q, &q->cmd, false) == 0) {
    list_push(&c->waiting, q);
    if (!uv_is_active((uv_handle_t *)&c->deadline_timer))
      arm_deadline(c);
    return 0;
  }
  if (c->last_error[0] == '\0')
    tg_redisconn_set_error(c, "not connected", NULL);
  q->status = -ECONNREFUSED;
  list_push(&c->decided, q);
  uv_idle_start(&c->deliver_idle, deliver_idle_cb);
  return 0;
}

int tg_redisconn_ready(const tg_redisconn_t *c) {
  return c != NULL && c->ac != NULL && c->loaded == c->nscripts;
}

const char *tg_redisconn_addr(const tg_redisconn_t *c) {
  return c->addr;
}

/* ---- life */

static void free_all(tg_redisconn_t *c) {
  free(c->host);
  if (c->password) {
    explicit_bzero(c->password, strlen(c->password));
    free(c->password);
  }
  free(c->instance);
  free(c->scripts);
  free(c);
}

static void handle_closed(uv_handle_t *h) {
  tg_redisconn_t *c = h->data;
  if (--c->open_handles == 0)
    free_all(c);
}

static int copy_opts(tg_redisconn_t *c, const tg_redisconn_opts_t *o) {
  c->port = o->port;
  c->db = o->db;
  c->timeout_ms = o->timeout_ms ? o->timeout_ms : DEFAULT_TIMEOUT_MS;
  c->what = o->what;
  c->down_msg = o->down_msg;
  c->up_msg = o->up_msg;
  c->host = strdup(o->host);
  c->scripts = calloc(o->nscripts, sizeof(*c->scripts));
  if (c->host == NULL || c->scripts == NULL || (o->password && (c->password = strdup(o->password)) == NULL) ||
      (o->instance && (c->instance = strdup(o->instance)) == NULL))
    return -ENOMEM;
  snprintf(c->addr, sizeof(c->addr), strchr(c->host, ':') ? "[%s]:%d" : "%s:%d", c->host, c->port);
  return 0;
}

static int hash_scripts(tg_redisconn_t *c, const tg_redisconn_opts_t *o) {
  for (size_t i = 0; i < o->nscripts; i++) {
    unsigned char digest[20];
    script_t *s = &c->scripts[i];
    s->text = o->scripts[i].text;
    s->len = o->scripts[i].len;
    if (mbedtls_sha1_ret((const unsigned char *)s->text, s->len, digest) != 0)
      return -EIO;
    tg_hex_encode(digest, 20, s->sha);
  }
  c->nscripts = o->nscripts;
  return 0;
}

/* Counted as each starts: on a failure the caller closes those already open. */
static int open_handles(tg_redisconn_t *c) {
  int rc;
  c->deadline_timer.data = c->reconnect_timer.data = c->deliver_idle.data = c;
  if ((rc = uv_timer_init(c->loop, &c->deadline_timer)) != 0)
    return rc;
  c->open_handles++;
  if ((rc = uv_timer_init(c->loop, &c->reconnect_timer)) != 0)
    return rc;
  c->open_handles++;
  if ((rc = uv_idle_init(c->loop, &c->deliver_idle)) != 0)
    return rc;
  c->open_handles++;
  return 0;
}

static void close_handles(tg_redisconn_t *c) {
  uv_handle_t *hs[] = {(uv_handle_t *)&c->deadline_timer, (uv_handle_t *)&c->reconnect_timer,
                       (uv_handle_t *)&c->deliver_idle};
  for (int i = 0, n = c->open_handles; i < n; i++)
    uv_close(hs[i], handle_closed); /* handle_closed frees c with the last of them */
}

int tg_redisconn_new(uv_loop_t *loop, const tg_redisconn_opts_t *o, tg_redisconn_t **out, char *err,
                     size_t errlen) {
  if (out)
    *out = NULL;
  if (out == NULL || loop == NULL || o == NULL || o->host == NULL || o->scripts == NULL || o->nscripts == 0) {
    snprintf(err, errlen, "%s: missing loop, host, scripts or result", o && o->what ? o->what : "redis");
    return -EINVAL;
  }
  tg_redisconn_t *c = calloc(1, sizeof(*c));
  int rc = -ENOMEM;
  if (c == NULL || copy_opts(c, o) != 0)
    goto fail_oom;
  c->loop = loop;
  c->backoff_ms = BACKOFF_MIN_MS;
  c->rng = (uv_hrtime() ^ (uint64_t)(uintptr_t)c) | 1;
  if ((rc = hash_scripts(c, o)) != 0) {
    snprintf(err, errlen, "%s: cannot hash the scripts (mbedTLS SHA-1 failed)", o->what);
    goto fail;
  }
  if ((rc = open_handles(c)) != 0) {
    snprintf(err, errlen, "%s: cannot create its timers: %s", o->what, uv_strerror(rc));
    goto fail;
  }
  connect_redis(c);
  *out = c;
  return 0;
fail_oom:
  snprintf(err, errlen, "%s: out of memory", o->what);
fail:
  if (c && c->open_handles > 0) {
    c->closing = true;
    close_handles(c);
  } else if (c) {
    free_all(c);
  }
  return rc;
}

void tg_redisconn_free(tg_redisconn_t *c) {
  if (c == NULL || c->closing)
    return;
  c->closing = true;
  uv_timer_stop(&c->deadline_timer);
  uv_timer_stop(&c->reconnect_timer);
  call_t *q;
  while ((q = c->waiting.head) != NULL)
    deliver(q, -ECANCELED, NULL);
  while ((q = c->decided.head) != NULL)
    deliver(q, -ECANCELED, NULL);
  uv_idle_stop(&c->deliver_idle);
  if (c->ac != NULL) {
    redisAsyncContext *ac = c->ac;
    c->ac = NULL;
    redisAsyncFree(ac); /* outstanding replies come back NULL and free their (delivered) calls */
  }
  close_handles(c);
}
