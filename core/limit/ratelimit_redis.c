#include "limit/ratelimit.h"

#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <netdb.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "base/log.h"
#include "base/redisconn.h"
#include "base/secret.h"

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

/* One take waiting for its decision; the connection keeps the command. */
typedef struct req {
  tg_ratelimit_redis_t *r;
  tg_ratelimit_cb cb;
  void *arg;
  double rate;
  uint32_t burst;
  const char *tenant; /* into data */
  const char *key;    /* the caller's key, into rkey */
  size_t key_len;
  const char *rkey; /* "tg:rl:<tenant>:<key>", into data */
  size_t rkey_len;
  char data[];
} req_t;

struct tg_ratelimit_redis {
  tg_redisconn_t *conn;
  tg_ratelimit_t *local;
};

/* Runs the callback once and frees the request. */
static void deliver(req_t *q, int allowed, uint32_t retry_ms, tg_ratelimit_source_t source) {
  tg_ratelimit_count(q->tenant, allowed, source);
  q->cb(q->arg, allowed, retry_ms, source);
  free(q);
}

/* Decides q with the local table, now; the first fallback in 10 s is logged. */
static void decide_locally(req_t *q, const char *reason) {
  uint32_t retry = 0;
  int rc = tg_ratelimit_check(q->r->local, q->tenant, q->key, q->key_len, q->rate, q->burst, tg_ratelimit_now_us(),
                              &retry);
  tg_ratelimit_count_fallback(reason);
  tg_redisconn_log_down(q->r->conn, reason);
  /* Arguments were checked at take: rc is 0 or 1. */
  deliver(q, rc != 0, rc == 0 ? retry : 0, TG_RATELIMIT_FALLBACK);
}

static uint32_t retry_ms_of(long long retry_us) {
  uint64_t ms = retry_us > 0 ? ((uint64_t)retry_us + 999) / 1000 : 1;
  return ms == 0 ? 1 : ms > UINT32_MAX ? UINT32_MAX : (uint32_t)ms;
}

static void reply_cb(void *arg, int status, const redisReply *rep) {
  req_t *q = arg;
  if (status != 0) {
    decide_locally(q, status == -ETIMEDOUT ? "timeout" : "unavailable");
    return;
  }
  if (rep->type == REDIS_REPLY_ARRAY && rep->elements == 2 && rep->element[0]->type == REDIS_REPLY_INTEGER &&
      rep->element[1]->type == REDIS_REPLY_INTEGER) {
    bool allowed = rep->element[0]->integer == 1;
    deliver(q, allowed, allowed ? 0 : retry_ms_of(rep->element[1]->integer), TG_RATELIMIT_REDIS);
    return;
  }
  tg_redisconn_set_error(q->r->conn, "unexpected reply", rep->type == REDIS_REPLY_ERROR ? rep->str : NULL);
  decide_locally(q, "error");
}

/* A request with its tenant and Redis key "tg:rl:<tenant>:<key>" in one allocation. */
static req_t *req_new(const char *tenant, const char *key, size_t key_len) {
  size_t tlen = strlen(tenant);
  size_t rkey_len = 6 + tlen + 1 + key_len;
  req_t *q = calloc(1, sizeof(*q) + tlen + 1 + rkey_len + 1);
  if (q == NULL)
    return NULL;
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
  return q;
}

int tg_ratelimit_redis_take(tg_ratelimit_redis_t *r, const char *tenant, const char *key, size_t key_len,
                            double rate_per_s, uint32_t burst, tg_ratelimit_cb cb, void *arg) {
  uint64_t interval, tau;
  if (r == NULL || tenant == NULL || cb == NULL || (key == NULL && key_len > 0) ||
      tg_ratelimit_params(rate_per_s, burst, &interval, &tau) != 0)
    return -EINVAL;
  req_t *q = req_new(tenant, key, key_len);
  if (q == NULL)
    return -ENOMEM;
  q->r = r;
  q->cb = cb;
  q->arg = arg;
  q->rate = rate_per_s;
  q->burst = burst;
  char t[24], tau_s[24];
  snprintf(t, sizeof(t), "%" PRIu64, interval);
  snprintf(tau_s, sizeof(tau_s), "%" PRIu64, tau);
  const char *argv[3] = {q->rkey, t, tau_s};
  /* Lengths from the text, not from snprintf's return (the untruncated size). */
  const size_t lens[3] = {q->rkey_len, strlen(t), strlen(tau_s)};
  const tg_redisconn_eval_t e = {.nkeys = 1, .argc = 3, .argv = argv, .lens = lens};
  int rc = tg_redisconn_call(r->conn, &e, NULL, reply_cb, q);
  if (rc != 0)
    free(q);
  return rc;
}

int tg_ratelimit_redis_ready(const tg_ratelimit_redis_t *r) {
  return r != NULL && tg_redisconn_ready(r->conn);
}

int tg_ratelimit_redis_new(uv_loop_t *loop, const tg_ratelimit_redis_opts_t *opts, tg_ratelimit_t *local,
                           tg_ratelimit_redis_t **out, char *err, size_t errlen) {
  static const tg_redisconn_script_t scripts[] = {{script, sizeof(script) - 1}};
  if (out)
    *out = NULL;
  if (out == NULL || loop == NULL || opts == NULL || opts->host == NULL || local == NULL) {
    snprintf(err, errlen, "redis rate limiter: missing loop, host, local table or result");
    return -EINVAL;
  }
  tg_ratelimit_redis_t *r = calloc(1, sizeof(*r));
  if (r == NULL) {
    snprintf(err, errlen, "redis rate limiter: out of memory");
    return -ENOMEM;
  }
  r->local = local;
  tg_redisconn_opts_t co = {
      .host = opts->host, .port = opts->port, .password = opts->password, .db = opts->db,
      .timeout_ms = opts->timeout_ms, .scripts = scripts, .nscripts = 1, .what = "redis rate limiter",
      .down_msg = "redis unreachable, using local limits",
      .up_msg = "redis reachable again, using distributed limits"};
  int rc = tg_redisconn_new(loop, &co, &r->conn, err, errlen);
  if (rc != 0) {
    free(r);
    return rc;
  }
  *out = r;
  return 0;
}

void tg_ratelimit_redis_free(tg_ratelimit_redis_t *r) {
  if (r == NULL)
    return;
  tg_redisconn_free(r->conn); /* takes still waiting are decided locally now */
  free(r);
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
