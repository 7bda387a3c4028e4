#include "pay/nonce.h"

#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "base/hex.h"
#include "base/redisconn.h"

#define MAX_INSTANCE 128
#define KEY_PREFIX "tg:nonce:"
#define KEY_LEN (sizeof(KEY_PREFIX) - 1 + 64)
#define VALUE_MAX (MAX_INSTANCE + 1 + 16 + 1 + 20)

/* KEYS[1] the key; ARGV[1] the call.
 *  c(laim), ARGV[2] our value, ARGV[3] expiry (Unix ms): 1 set, 0 held already;
 *  r(elease), ARGV[2] a value or "": 1 deleted, 0 absent (or, with a value,
 *    held by another claim: the undo of a late claim deletes only its own). */
static const char script[] = "local key, op = KEYS[1], ARGV[1]\n"
                             "if op == 'c' then\n"
                             "  if redis.call('SET', key, ARGV[2], 'NX', 'PXAT', ARGV[3]) then return 1 end\n"
                             "  return 0\n"
                             "elseif op == 'r' then\n"
                             "  if ARGV[2] ~= '' and redis.call('GET', key) ~= ARGV[2] then return 0 end\n"
                             "  return redis.call('DEL', key)\n"
                             "end\n"
                             "return redis.error_reply('ERR tollgate nonce: unknown call')\n";

enum { OP_CLAIM, OP_RELEASE };

typedef struct op {
  tg_nonce_redis_t *r;
  tg_nonce_redis_cb cb;
  void *ud;
  int kind;
} op_t;

struct tg_nonce_redis {
  tg_redisconn_t *conn;
  char *instance;
  size_t instance_len;
  char tag[17]; /* random per connection: with the counter, each claim's value is unique */
  uint64_t seq;
};

static void deliver(op_t *q, int status) {
  if (status == -ETIMEDOUT || status == -ECONNREFUSED || status == -EIO)
    tg_redisconn_log_down(q->r->conn, status == -ETIMEDOUT      ? "timeout"
                                      : status == -ECONNREFUSED ? "unavailable"
                                                                : "error");
  tg_nonce_redis_cb cb = q->cb;
  void *ud = q->ud;
  free(q);
  cb(status, ud);
}

static bool late_claim(const redisReply *rep) {
  return rep->type == REDIS_REPLY_INTEGER && rep->integer == 1;
}

static void reply_cb(void *arg, int status, const redisReply *rep) {
  op_t *q = arg;
  if (status != 0) {
    deliver(q, status);
    return;
  }
  if (rep->type == REDIS_REPLY_INTEGER && (rep->integer == 0 || rep->integer == 1)) {
    if (q->kind == OP_CLAIM)
      deliver(q, rep->integer == 1 ? 0 : -EEXIST);
    else
      deliver(q, rep->integer == 1 ? 0 : -ENOENT);
    return;
  }
  tg_redisconn_set_error(q->r->conn, "unexpected reply", rep->type == REDIS_REPLY_ERROR ? rep->str : NULL);
  deliver(q, -EIO);
}

static int submit(tg_nonce_redis_t *r, int kind, const uint8_t key[32], int64_t expires_unix_ms,
                  tg_nonce_redis_cb cb, void *ud) {
  if (r == NULL || key == NULL || cb == NULL || (kind == OP_CLAIM && expires_unix_ms <= 0))
    return -EINVAL;
  char k[KEY_LEN + 1], value[VALUE_MAX + 1], at[24];
  memcpy(k, KEY_PREFIX, sizeof(KEY_PREFIX) - 1);
  tg_hex_encode(key, 32, k + sizeof(KEY_PREFIX) - 1);
  int vlen = snprintf(value, sizeof value, "%s#%s%" PRIu64, r->instance, r->tag, ++r->seq);
  int alen = snprintf(at, sizeof at, "%" PRId64, expires_unix_ms);
  if (vlen < 0 || (size_t)vlen >= sizeof value || alen < 0 || (size_t)alen >= sizeof at)
    return -EINVAL;
  const char *argv[4] = {k, kind == OP_CLAIM ? "c" : "r", kind == OP_CLAIM ? value : "", at};
  size_t lens[4] = {KEY_LEN, 1, kind == OP_CLAIM ? (size_t)vlen : 0, (size_t)alen};
  const char *undo_argv[3] = {k, "r", value};
  const size_t undo_lens[3] = {KEY_LEN, 1, (size_t)vlen};
  const tg_redisconn_eval_t e = {.nkeys = 1, .argc = kind == OP_CLAIM ? 4 : 3, .argv = argv, .lens = lens};
  const tg_redisconn_undo_t undo = {{.nkeys = 1, .argc = 3, .argv = undo_argv, .lens = undo_lens},
                                    late_claim};
  op_t *q = malloc(sizeof(*q));
  if (q == NULL)
    return -ENOMEM;
  *q = (op_t){.r = r, .cb = cb, .ud = ud, .kind = kind};
  int rc = tg_redisconn_call(r->conn, &e, kind == OP_CLAIM ? &undo : NULL, reply_cb, q);
  if (rc != 0)
    free(q);
  return rc;
}

int tg_nonce_redis_claim(tg_nonce_redis_t *r, const uint8_t key[32], int64_t expires_unix_ms,
                         tg_nonce_redis_cb cb, void *ud) {
  return submit(r, OP_CLAIM, key, expires_unix_ms, cb, ud);
}

int tg_nonce_redis_release(tg_nonce_redis_t *r, const uint8_t key[32], tg_nonce_redis_cb cb, void *ud) {
  return submit(r, OP_RELEASE, key, 0, cb, ud);
}

int tg_nonce_redis_ready(const tg_nonce_redis_t *r) { return r != NULL && tg_redisconn_ready(r->conn); }

int tg_nonce_redis_new(uv_loop_t *loop, const tg_nonce_redis_opts_t *o, tg_nonce_redis_t **out, char *err,
                       size_t errlen) {
  static const tg_redisconn_script_t scripts[] = {{script, sizeof(script) - 1}};
  if (out)
    *out = NULL;
  if (out == NULL || loop == NULL || o == NULL || o->host == NULL) {
    snprintf(err, errlen, "redis nonce: missing loop, host or result");
    return -EINVAL;
  }
  const char *instance = o->instance ? o->instance : "";
  if (strlen(instance) > MAX_INSTANCE) {
    snprintf(err, errlen, "redis nonce: instance id longer than %d bytes", MAX_INSTANCE);
    return -EINVAL;
  }
  tg_nonce_redis_t *r = calloc(1, sizeof(*r));
  if (r == NULL || (r->instance = strdup(instance)) == NULL) {
    free(r);
    snprintf(err, errlen, "redis nonce: out of memory");
    return -ENOMEM;
  }
  r->instance_len = strlen(instance);
  uint8_t rnd[8] = {0};
  if (getrandom(rnd, sizeof rnd, 0) != (ssize_t)sizeof rnd)
    memcpy(rnd, &r, sizeof rnd < sizeof r ? sizeof rnd : sizeof r); /* unique enough per process */
  tg_hex_encode(rnd, sizeof rnd, r->tag);
  tg_redisconn_opts_t co = {.host = o->host,
                            .port = o->port,
                            .password = o->password,
                            .db = o->db,
                            .timeout_ms = o->timeout_ms,
                            .scripts = scripts,
                            .nscripts = 1,
                            .what = "redis nonce",
                            .down_msg = "payments: redis unavailable, refusing payments (nonce store)",
                            .up_msg = "payments: redis reachable again (nonce store)",
                            .instance = o->instance};
  int rc = tg_redisconn_new(loop, &co, &r->conn, err, errlen);
  if (rc != 0) {
    free(r->instance);
    free(r);
    return rc;
  }
  *out = r;
  return 0;
}

void tg_nonce_redis_free(tg_nonce_redis_t *r) {
  if (r == NULL)
    return;
  tg_redisconn_free(r->conn); /* the calls still waiting get -ECANCELED now */
  free(r->instance);
  free(r);
}
