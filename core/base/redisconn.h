#ifndef TG_REDISCONN_H
#define TG_REDISCONN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <hiredis/hiredis.h>
#include <uv.h>

/* One worker's connection to Redis, on its libuv loop, for modules whose
 * every call is one Lua script (the rate limiter, idempotency, the prepaid
 * ledger). It owns what they share:
 *  - connecting at once, then AUTH and SELECT when configured (pipelined
 *    before anything else), and reconnecting after any drop with jittered
 *    backoff (100 ms doubling to 2 s), so that many workers do not return in
 *    step; a refused AUTH, SELECT or SCRIPT LOAD drops the connection and is
 *    logged at most once per 10 s;
 *  - a script registry: the module names its scripts when it creates the
 *    connection; every connect runs SCRIPT LOAD for each, and a call names a
 *    script by its index: EVALSHA, and EVAL once when the server answers
 *    NOSCRIPT (restart, failover, SCRIPT FLUSH);
 *  - a timeout per call, and stall detection: a connection that answered
 *    nothing for max(1 s, 10 x timeout_ms) while calls wait is dropped;
 *  - refused or reset sockets seen at once (hiredis' libuv adapter ignores
 *    POLLERR: its poll hooks are replaced here);
 *  - one "redis down" log line per 10 s and one "back" line when ready again.
 *
 * Threads: every function is for the loop's thread only.
 * Failure codes a call's callback gets (status): see tg_redisconn_cb. */

typedef struct tg_redisconn tg_redisconn_t;

/* A Lua script. text is borrowed for the connection's whole life (a static string). */
typedef struct tg_redisconn_script {
  const char *text;
  size_t len;
} tg_redisconn_script_t;

/* Strings are borrowed during tg_redisconn_new, which copies them, except
 * scripts and the three messages, which must outlive the connection. */
typedef struct tg_redisconn_opts {
  const char *host;     /* IP literal or a name (resolved by hiredis at each connect) */
  int port;
  const char *password; /* AUTH password or NULL; never logged, wiped on free */
  int db;               /* SELECT db when not 0 */
  uint32_t timeout_ms;  /* per call; 0: 20 */
  const tg_redisconn_script_t *scripts; /* loaded on every connect; a call names one by index */
  size_t nscripts;
  const char *what;     /* who uses it, for err and log lines ("redis idempotency") */
  const char *down_msg; /* the line tg_redisconn_log_down writes */
  const char *up_msg;   /* the line written when ready again after a down_msg */
  const char *instance; /* added to down_msg lines when not NULL */
} tg_redisconn_opts_t;

/* Connects at once. Redis being down is not a failure (calls fail until it
 * answers). Returns 0 and *out, or *out NULL and err ("<what>: why"):
 * -EINVAL (a NULL argument, no host, no scripts), -ENOMEM, -EIO (hashing a
 * script), or the libuv error creating a timer (handles already made are
 * closing: run the loop before closing it). */
int tg_redisconn_new(uv_loop_t *loop, const tg_redisconn_opts_t *o, tg_redisconn_t **out, char *err,
                     size_t errlen);

/* One script call: argv[0..nkeys) are its keys, the rest its arguments.
 * Everything is copied by tg_redisconn_call. */
#define TG_REDISCONN_MAX_ARGS 16
typedef struct tg_redisconn_eval {
  unsigned script; /* index into opts.scripts */
  int nkeys;
  int argc;
  const char *const *argv;
  const size_t *lens;
} tg_redisconn_eval_t;

/* What to send when a reply comes after its call's timeout: when(reply) says
 * whether the late effect must be undone (a begin that got the key, a hold
 * that took money), and then eval runs, its reply ignored. */
typedef struct tg_redisconn_undo {
  tg_redisconn_eval_t eval;
  bool (*when)(const redisReply *late);
} tg_redisconn_undo_t;

/* status 0 with the reply (an error reply too: the caller reads it; valid
 * during the callback only), or reply NULL and:
 *   -ETIMEDOUT     no answer within timeout_ms (the script may still run)
 *   -ECONNREFUSED  not connected when called (down, reconnecting, refused)
 *   -EIO           the connection was lost or dropped while waiting
 *   -ECANCELED     tg_redisconn_free ran first */
typedef void (*tg_redisconn_cb)(void *arg, int status, const redisReply *reply);

/* Sends e (undo may be NULL). Returns 0, and then cb(arg, ...) runs exactly
 * once, on the loop, never inside this call; or -EINVAL (bad script index,
 * too many arguments), -ENOMEM or -ECANCELED (being freed), and cb never
 * runs. arg must stay valid until cb runs. */
int tg_redisconn_call(tg_redisconn_t *c, const tg_redisconn_eval_t *e, const tg_redisconn_undo_t *undo,
                      tg_redisconn_cb cb, void *arg);

/* 1 while connected with every script loaded, else 0. */
int tg_redisconn_ready(const tg_redisconn_t *c);

/* "host:port" ("[v6]:port"), for log lines. Valid until free. */
const char *tg_redisconn_addr(const tg_redisconn_t *c);

/* Records why the last call failed (shown by the next down line). */
void tg_redisconn_set_error(tg_redisconn_t *c, const char *what, const char *detail);

/* Logs down_msg with reason and the last error, at most once per 10 s. */
void tg_redisconn_log_down(tg_redisconn_t *c, const char *reason);

/* Closes the connection: every call still waiting gets -ECANCELED before
 * this returns (their callbacks may call again: they get -ECANCELED). Not
 * from inside one of c's callbacks. Memory is released by close callbacks:
 * run the loop (UV_RUN_DEFAULT) before uv_loop_close. c is invalid after. */
void tg_redisconn_free(tg_redisconn_t *c);

#endif
