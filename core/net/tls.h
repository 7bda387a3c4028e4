#ifndef TG_TLS_H
#define TG_TLS_H

#include <stddef.h>

#include "base/buf.h"

/* TLS over memory buffers with mbedTLS, so it plugs into libuv streams:
 * ciphertext read from the socket goes in with tg_tls_feed(), plaintext comes
 * out of tg_tls_read(); plaintext to send goes in with tg_tls_write(), and the
 * ciphertext to put on the socket is taken with tg_tls_take_output().
 *
 * A context and every session made from it belong to one thread (a worker):
 * each context has its own RNG (CTR-DRBG) and configuration. Debian's mbedTLS
 * is built with MBEDTLS_THREADING_C, but nothing here relies on it.
 * TLS 1.2 is the minimum (mbedTLS 2.28 has no TLS 1.3); ALPN offers and
 * accepts "http/1.1"; no session resumption (no tickets, no cache), no
 * renegotiation.
 *
 * Typical use on a socket:
 *   on read:   tg_tls_feed(t, data, n);
 *              while ((n = tg_tls_read(t, buf, sizeof buf)) > 0) consume(buf, n);
 *              n == 0: wait for more; TG_TLS_CLOSED: peer closed; < 0: fatal.
 *   always after reading or writing: if tg_tls_has_output(t), take it and
 *              write it to the socket (also after a fatal error: it may hold
 *              an alert for the peer). */

typedef struct tg_tls_ctx tg_tls_ctx_t;
typedef struct tg_tls tg_tls_t;

/* Server context from PEM cert chain (leaf first) and key files; the key must
 * match the leaf. NULL with a reason in err on failure. */
tg_tls_ctx_t *tg_tls_server_ctx_new(const char *cert_file, const char *key_file, char *err,
                                    size_t errlen);
/* Client context. ca_file NULL: the system bundle
 * (/etc/ssl/certs/ca-certificates.crt). Peer certificates are always verified
 * against it, and the host name checked. NULL with a reason in err on failure. */
tg_tls_ctx_t *tg_tls_client_ctx_new(const char *ca_file, char *err, size_t errlen);
/* Frees the context; every session made from it must be freed first. NULL is a no-op. */
void tg_tls_ctx_free(tg_tls_ctx_t *ctx);

/* A session; ctx must outlive it. hostname (copied): the server name to send
 * as SNI and to verify the certificate against; required for client contexts
 * (NULL returns NULL: a client never skips the name check), ignored for
 * server contexts. A host name is matched against the certificate's DNS
 * names (and CN); an IP literal ("127.0.0.1", "::1") against its iPAddress
 * names only, and is not sent as SNI. NULL on allocation failure. */
tg_tls_t *tg_tls_new(tg_tls_ctx_t *ctx, const char *hostname);
void tg_tls_free(tg_tls_t *t);

/* Hands ciphertext received from the peer to the session (copied). 0 or -ENOMEM. */
int tg_tls_feed(tg_tls_t *t, const char *data, size_t len);

/* Advances the handshake and decrypts: returns the number of plaintext bytes
 * written to buf (> 0; call again until it returns 0, more may be buffered),
 * 0 when more ciphertext is needed (check tg_tls_has_output: the handshake
 * may have produced some), TG_TLS_CLOSED when the peer sent close_notify, or
 * on a fatal error -EPROTO (protocol error, failed certificate verification)
 * or -ENOMEM, with tg_tls_error() describing it; once failed, every later
 * call returns the same error. A client calls it once right after
 * tg_tls_new() to produce its ClientHello. */
#define TG_TLS_CLOSED (-10000)
int tg_tls_read(tg_tls_t *t, char *buf, size_t len);

/* Encrypts plaintext (copied). Before the handshake is done it is queued and
 * sent once the handshake completes (inside tg_tls_read). Large writes are
 * split into records of at most 16 KiB. 0, -EPROTO (session failed or
 * closed) or -ENOMEM. */
int tg_tls_write(tg_tls_t *t, const char *data, size_t len);

/* Queues close_notify (only once the handshake is done; before that there is
 * nothing to close politely). Later writes fail with -EPROTO. */
void tg_tls_close(tg_tls_t *t);

/* Ciphertext waiting to go to the socket: appended to out, and the session
 * forgets it. 0 or -ENOMEM (then nothing was moved). */
int tg_tls_take_output(tg_tls_t *t, tg_buf_t *out);
int tg_tls_has_output(const tg_tls_t *t);

int tg_tls_handshake_done(const tg_tls_t *t);
/* ALPN protocol agreed in the handshake ("http/1.1"), or NULL when none. */
const char *tg_tls_alpn(const tg_tls_t *t);
/* Human-readable reason of the last error, "" when none (session-owned,
 * valid until the session is freed). */
const char *tg_tls_error(const tg_tls_t *t);

#endif
