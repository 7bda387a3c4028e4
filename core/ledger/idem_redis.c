#include "ledger/idem.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/hex.h"
#include "base/log.h"
#include "base/redisconn.h"

#define MAX_INSTANCE 128
#define KEY_PREFIX "tg:idem:"
#define KEY_LEN (sizeof(KEY_PREFIX) - 1 + 64)
#define MINE_MAX (1 + 64 + MAX_INSTANCE)

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

/* One call's caller; the connection keeps the command. */
typedef struct op {
  tg_idem_redis_t *r;
  tg_idem_redis_cb cb;
  void *arg;
  int kind;
} op_t;

struct tg_idem_redis {
  tg_redisconn_t *conn;
  char ttl[24], pending_ttl[24]; /* ms, as decimal text for the script */
  char *instance;
  size_t instance_len;
};

/* Runs the callback once and frees the op. */
static void deliver(op_t *q, int state, const void *resp, size_t len) {
  if (state == -ETIMEDOUT || state == -ECONNREFUSED || state == -EIO)
    tg_redisconn_log_down(q->r->conn, state == -ETIMEDOUT      ? "timeout"
                                      : state == -ECONNREFUSED ? "unavailable"
                                                               : "error");
  if (q->kind == OP_BEGIN && state > 0)
    tg_idem_count_hit(state);
  q->cb(q->arg, state, state >= 0 ? resp : NULL, state >= 0 ? len : 0);
  free(q);
}

static bool begin_state(const redisReply *rep, long long *st) {
  if (rep->type != REDIS_REPLY_ARRAY || rep->elements < 1 || rep->element[0]->type != REDIS_REPLY_INTEGER)
    return false;
  *st = rep->element[0]->integer;
  return true;
}

/* A begin answered NEW after its caller was told -ETIMEDOUT: nobody will
 * finish it, so the connection releases the key rather than after pending_ttl_ms. */
static bool late_new(const redisReply *rep) {
  long long st;
  return begin_state(rep, &st) && st == TG_IDEM_NEW;
}

static bool handle_begin(op_t *q, const redisReply *rep) {
  long long st;
  if (!begin_state(rep, &st))
    return false;
  if (st == TG_IDEM_NEW || st == TG_IDEM_PENDING || st == TG_IDEM_CONFLICT) {
    deliver(q, (int)st, NULL, 0);
    return true;
  }
  if (st == TG_IDEM_DONE && rep->elements == 2 && rep->element[1]->type == REDIS_REPLY_STRING) {
    deliver(q, TG_IDEM_DONE, rep->element[1]->str, rep->element[1]->len);
    return true;
  }
  return false;
}

static bool handle_finish(op_t *q, const redisReply *rep) {
  if (rep->type != REDIS_REPLY_INTEGER || rep->integer < 0 || rep->integer > 2)
    return false;
  if (rep->integer == 2)
    tg_log(TG_LOG_WARN, "idempotency: a pending key expired before its transaction finished "
                        "(raise pending_ttl_ms)",
           "redis", tg_redisconn_addr(q->r->conn), NULL);
  deliver(q, rep->integer == 0 ? -ESTALE : 0, NULL, 0);
  return true;
}

static bool handle_abort(op_t *q, const redisReply *rep) {
  if (rep->type != REDIS_REPLY_INTEGER || (rep->integer != 0 && rep->integer != 1))
    return false;
  deliver(q, rep->integer == 1 ? 0 : -ENOENT, NULL, 0);
  return true;
}

static void reply_cb(void *arg, int status, const redisReply *rep) {
  op_t *q = arg;
  if (status != 0) {
    deliver(q, status, NULL, 0);
    return;
  }
  bool (*const handle[])(op_t *, const redisReply *) = {handle_begin, handle_finish, handle_abort};
  if (handle[q->kind](q, rep))
    return;
  tg_redisconn_set_error(q->r->conn, "unexpected reply", rep->type == REDIS_REPLY_ERROR ? rep->str : NULL);
  deliver(q, -EIO, NULL, 0);
}

/* Keys are KEY_PREFIX <hex scope>; our PENDING value is "P" <hex req_hash> <instance>. */
static int submit(tg_idem_redis_t *r, int kind, const uint8_t scope[32], const uint8_t req_hash[32],
                  const void *resp, size_t len, tg_idem_redis_cb cb, void *arg) {
  static const char *const names[] = {"b", "f", "a"};
  if (r == NULL || scope == NULL || req_hash == NULL || cb == NULL || (resp == NULL && len > 0))
    return -EINVAL;
  if (len > TG_IDEM_REDIS_MAX_RESPONSE)
    return -EMSGSIZE;
  char key[KEY_LEN + 1], mine[MINE_MAX + 1]; /* + the NUL tg_hex_encode writes */
  memcpy(key, KEY_PREFIX, sizeof(KEY_PREFIX) - 1);
  tg_hex_encode(scope, 32, key + sizeof(KEY_PREFIX) - 1);
  mine[0] = 'P';
  tg_hex_encode(req_hash, 32, mine + 1);
  memcpy(mine + 65, r->instance, r->instance_len);
  size_t mine_len = 65 + r->instance_len;
  const char *argv[5] = {key, names[kind], mine};
  size_t lens[5] = {KEY_LEN, 1, mine_len};
  int argc = 3;
  if (kind == OP_BEGIN) {
    argv[argc] = r->pending_ttl;
    lens[argc++] = strlen(r->pending_ttl);
  } else if (kind == OP_FINISH) {
    argv[argc] = len ? (const char *)resp : "";
    lens[argc++] = len;
    argv[argc] = r->ttl;
    lens[argc++] = strlen(r->ttl);
  }
  const char *abort_argv[3] = {key, "a", mine};
  const tg_redisconn_eval_t e = {.nkeys = 1, .argc = argc, .argv = argv, .lens = lens};
  const tg_redisconn_undo_t undo = {{.nkeys = 1, .argc = 3, .argv = abort_argv, .lens = lens}, late_new};
  op_t *q = malloc(sizeof(*q));
  if (q == NULL)
    return -ENOMEM;
  *q = (op_t){.r = r, .cb = cb, .arg = arg, .kind = kind};
  int rc = tg_redisconn_call(r->conn, &e, kind == OP_BEGIN ? &undo : NULL, reply_cb, q);
  if (rc != 0)
    free(q);
  return rc;
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
  return r != NULL && tg_redisconn_ready(r->conn);
}

int tg_idem_redis_new(uv_loop_t *loop, const tg_idem_redis_opts_t *o, tg_idem_redis_t **out, char *err,
                      size_t errlen) {
  static const tg_redisconn_script_t scripts[] = {{script, sizeof(script) - 1}};
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
  tg_idem_redis_t *r = calloc(1, sizeof(*r));
  if (r == NULL || (r->instance = strdup(instance)) == NULL) {
    free(r);
    snprintf(err, errlen, "redis idempotency: out of memory");
    return -ENOMEM;
  }
  r->instance_len = strlen(instance);
  snprintf(r->ttl, sizeof(r->ttl), "%llu", (unsigned long long)o->ttl_ms);
  snprintf(r->pending_ttl, sizeof(r->pending_ttl), "%llu", (unsigned long long)o->pending_ttl_ms);
  tg_redisconn_opts_t co = {
      .host = o->host, .port = o->port, .password = o->password, .db = o->db, .timeout_ms = o->timeout_ms,
      .scripts = scripts, .nscripts = 1, .what = "redis idempotency",
      .down_msg = "idempotency: redis unavailable, refusing transactions",
      .up_msg = "idempotency: redis reachable again"};
  int rc = tg_redisconn_new(loop, &co, &r->conn, err, errlen);
  if (rc != 0) {
    free(r->instance);
    free(r);
    return rc;
  }
  *out = r;
  return 0;
}

void tg_idem_redis_free(tg_idem_redis_t *r) {
  if (r == NULL)
    return;
  tg_redisconn_free(r->conn); /* the calls still waiting get -ECANCELED now */
  free(r->instance);
  free(r);
}
