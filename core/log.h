#ifndef TG_LOG_H
#define TG_LOG_H

#include <stddef.h>

/* JSON-lines logging to stdout: one object per line with ts (RFC 3339, ms),
 * level, msg, and key/value fields. Lines from several threads never
 * interleave. Secrets never belong in a field: pass them through the
 * redaction helpers below, or not at all. */

typedef enum { TG_LOG_DEBUG = 0, TG_LOG_INFO, TG_LOG_WARN, TG_LOG_ERROR } tg_log_level_t;

void tg_log_set_level(tg_log_level_t level);
tg_log_level_t tg_log_get_level(void);
/* "debug", "info", "warn", "error" -> level; -1 when unknown. */
int tg_log_level_parse(const char *name);
/* Redirects output (tests); NULL restores stdout. */
void tg_log_set_fd(int fd);

/* Logs msg with fields given as NULL-terminated pairs of key and string
 * value: tg_log(TG_LOG_INFO, "listening", "addr", "127.0.0.1:8080", NULL).
 * request_id may be NULL. Values are JSON-escaped. */
void tg_log(tg_log_level_t level, const char *msg, ...) __attribute__((sentinel));
void tg_log_req(tg_log_level_t level, const char *request_id, const char *msg, ...)
    __attribute__((sentinel));

/* Redaction. Billing references show only their last 4 characters:
 * "acct-12345678" -> "****5678"; shorter than 5 -> "****". out is always
 * NUL-terminated. */
void tg_redact_ref(const char *ref, char *out, size_t outlen);
/* Keys and secrets: always "[redacted]" (a helper so call sites read plainly). */
const char *tg_redact_secret(const char *secret);
/* Signed URLs: "sha256:<first 16 hex of SHA-256>", never the URL itself. */
void tg_redact_url(const char *url, char *out, size_t outlen);

#endif
