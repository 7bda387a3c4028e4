#ifndef TG_TLS_H
#define TG_TLS_H

#include <stddef.h>

#include "../buf.h"

/* TLS over memory buffers with mbedTLS, so it plugs into libuv streams:
 * ciphertext read from the socket goes in with tg_tls_feed(), plaintext comes
 * out of tg_tls_read(); plaintext to send goes in with tg_tls_write(), and the
 * ciphertext to put on the socket is taken from tg_tls_output().
 * A context is per worker thread (mbedTLS RNG state is not shared). */

typedef struct tg_tls_ctx tg_tls_ctx_t;
typedef struct tg_tls tg_tls_t;

/* Server context from PEM cert chain and key files. NULL with err on failure. */
tg_tls_ctx_t *tg_tls_server_ctx_new(const char *cert_file, const char *key_file, char *err,
                                    size_t errlen);
/* Client context. ca_file NULL: the system bundle
 * (/etc/ssl/certs/ca-certificates.crt). Peer certificates are always verified
 * against it, and the host name checked. */
tg_tls_ctx_t *tg_tls_client_ctx_new(const char *ca_file, char *err, size_t errlen);
void tg_tls_ctx_free(tg_tls_ctx_t *ctx);

/* A session. hostname: the server name to verify and send as SNI (clients),
 * NULL for servers. */
tg_tls_t *tg_tls_new(tg_tls_ctx_t *ctx, const char *hostname);
void tg_tls_free(tg_tls_t *t);

/* Hands ciphertext received from the peer to the session. 0 or -ENOMEM. */
int tg_tls_feed(tg_tls_t *t, const char *data, size_t len);

/* Advances the handshake and decrypts: returns the number of plaintext bytes
 * written to buf (> 0), 0 when more ciphertext is needed (check
 * tg_tls_output: the handshake may have produced some), TG_TLS_CLOSED when
 * the peer sent close_notify, or another negative value on a fatal error
 * (tg_tls_error() describes it). */
#define TG_TLS_CLOSED (-10000)
int tg_tls_read(tg_tls_t *t, char *buf, size_t len);

/* Encrypts plaintext (queued until the handshake is done). 0 or negative. */
int tg_tls_write(tg_tls_t *t, const char *data, size_t len);

/* Queues close_notify. */
void tg_tls_close(tg_tls_t *t);

/* Ciphertext waiting to go to the socket: the caller takes it (appends to
 * out and the session forgets it). */
int tg_tls_take_output(tg_tls_t *t, tg_buf_t *out);
int tg_tls_has_output(const tg_tls_t *t);

int tg_tls_handshake_done(const tg_tls_t *t);
/* Human-readable reason of the last error (static or session-owned string). */
const char *tg_tls_error(const tg_tls_t *t);

#endif
