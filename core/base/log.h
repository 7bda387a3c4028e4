#ifndef TG_LOG_H
#define TG_LOG_H

#include <stddef.h>

/* JSON-lines logging to stdout: one object per line with ts (RFC 3339, ms,
 * UTC), level, msg, request_id when given, then key/value fields. Lines from
 * several threads never interleave: each is built in memory and written whole
 * with one write(2) under a mutex (retried on EINTR and partial writes). Text
 * that is not valid UTF-8 is logged with U+FFFD in place of the bad bytes, so
 * every line is valid JSON. Secrets never belong in a field: pass them through
 * the redaction helpers below, or not at all.
 *
 * Threads: every function is safe from any thread. Logging never changes errno. */

typedef enum { TG_LOG_DEBUG = 0, TG_LOG_INFO, TG_LOG_WARN, TG_LOG_ERROR } tg_log_level_t;

/* Lines below the level are dropped; the default is TG_LOG_INFO. */
void tg_log_set_level(tg_log_level_t level);
tg_log_level_t tg_log_get_level(void);
/* "debug", "info", "warn", "error" (any case) -> level; -1 when unknown. */
int tg_log_level_parse(const char *name);
/* Redirects output (tests); a negative fd restores stdout. The caller keeps
 * ownership of fd and must keep it open while logging may use it. */
void tg_log_set_fd(int fd);

/* Logs msg with fields given as pairs of key and string value, then NULL:
 * tg_log(TG_LOG_INFO, "listening", "addr", "127.0.0.1:8080", NULL).
 * A NULL value logs as JSON null. A field named ts, level, msg or request_id
 * is logged as "fields.<key>" so it cannot hide the line's own.
 * request_id may be NULL. Values are JSON-escaped. */
void tg_log(tg_log_level_t level, const char *msg, ...) __attribute__((sentinel));
void tg_log_req(tg_log_level_t level, const char *request_id, const char *msg, ...)
    __attribute__((sentinel));

/* Buffer sizes that always hold the redaction helpers' full output. */
#define TG_REDACT_REF_LEN 24
#define TG_REDACT_URL_LEN 24

/* Redaction. Billing references show only their last 4 characters:
 * "acct-12345678" -> "****5678"; shorter than 5 -> "****" (NULL too).
 * Characters are UTF-8 code points. out is always NUL-terminated (outlen > 0),
 * truncated when shorter than TG_REDACT_REF_LEN. */
void tg_redact_ref(const char *ref, char *out, size_t outlen);
/* Keys and secrets: always "[redacted]" (a helper so call sites read plainly). */
const char *tg_redact_secret(const char *secret);
/* Signed URLs: "sha256:<first 16 hex of SHA-256>", never the URL itself
 * (NULL hashes as ""). out is sized as for tg_redact_ref, TG_REDACT_URL_LEN. */
void tg_redact_url(const char *url, char *out, size_t outlen);

#endif
