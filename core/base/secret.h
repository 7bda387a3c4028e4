#ifndef TG_SECRET_H
#define TG_SECRET_H

#include <stddef.h>

/* One reader for every *_file secret (admin token, Redis password, signer
 * keys): a regular file of at most TG_SECRET_MAX bytes whose content, with
 * surrounding white space trimmed, is the secret.
 *
 * what names the secret in errors ("admin token"). Flags:
 *   TG_SECRET_TOKEN   refuse white space and control characters inside
 * A file readable by group or others is read, with a warning in the log.
 * Returns a new string (free with tg_secret_free, which wipes it), or NULL
 * with err set. The secret never reaches err or a log; the path may. Any
 * thread; blocking file I/O: at start or on the thread pool. */

#define TG_SECRET_MAX 4096
#define TG_SECRET_TOKEN 1

char *tg_secret_read(const char *path, const char *what, int flags, char *err, size_t errlen);

/* Wipes and frees s (NULL is fine). */
void tg_secret_free(char *s);

/* 1 when path exists and is readable by group or others (a secret file that
 * should be chmod 600), else 0. For `tollgate check`, which warns. */
int tg_secret_exposed(const char *path);

#endif
