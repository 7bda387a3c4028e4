#include "net/tls.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mbedtls/ctr_drbg.h>
#include <mbedtls/entropy.h>
#include <mbedtls/error.h>
#include <mbedtls/pk.h>
#include <mbedtls/ssl.h>
#include <mbedtls/x509_crt.h>

#define SYSTEM_CA_BUNDLE "/etc/ssl/certs/ca-certificates.crt"

struct tg_tls_ctx {
  mbedtls_ssl_config conf;
  mbedtls_entropy_context entropy;
  mbedtls_ctr_drbg_context drbg;
  mbedtls_x509_crt certs; /* server: own chain; client: trusted CAs */
  mbedtls_pk_context key; /* server only */
  int is_server;
};

struct tg_tls {
  tg_tls_ctx_t *ctx;
  mbedtls_ssl_context ssl;
  /* The three buffers are freed, not kept, once emptied: a session that
   * waits for its peer (an idle keep-alive connection) holds none of them. */
  tg_buf_t in;      /* ciphertext from the peer not yet read by mbedTLS */
  size_t in_off;    /* bytes of in already handed to mbedTLS */
  tg_buf_t out;     /* ciphertext for the peer */
  tg_buf_t pending; /* plaintext written before the handshake finished */
  int handshake_done;
  int closed;           /* we sent close_notify */
  int fail;             /* sticky fatal error (negative errno), 0 while healthy */
  unsigned char ip[16]; /* client to an IP literal: the address to verify */
  size_t ip_len;        /* 4 or 16, 0 for host names */
  char *err;            /* reason of the fatal error, allocated when it happens */
};

#define ERR_LEN 256

/* mbedTLS checks the list pointer for its whole life: it must be static. */
static const char *alpn_protos[] = {"http/1.1", NULL};

static void mbed_reason(int rc, const char *what, char *err, size_t errlen) {
  char msg[160];
  mbedtls_strerror(rc, msg, sizeof msg);
  snprintf(err, errlen, "%s: %s (-0x%04x)", what, msg, (unsigned)-rc);
}

static void set_err(char *err, size_t errlen, const char *fmt, const char *arg) {
  if (err && errlen)
    snprintf(err, errlen, fmt, arg);
}

static tg_tls_ctx_t *ctx_new(int is_server, char *err, size_t errlen) {
  tg_tls_ctx_t *ctx = calloc(1, sizeof *ctx);
  if (ctx == NULL) {
    set_err(err, errlen, "%s", "out of memory");
    return NULL;
  }
  ctx->is_server = is_server;
  mbedtls_ssl_config_init(&ctx->conf);
  mbedtls_entropy_init(&ctx->entropy);
  mbedtls_ctr_drbg_init(&ctx->drbg);
  mbedtls_x509_crt_init(&ctx->certs);
  mbedtls_pk_init(&ctx->key);

  static const unsigned char pers[] = "tollgate-tls";
  int rc =
      mbedtls_ctr_drbg_seed(&ctx->drbg, mbedtls_entropy_func, &ctx->entropy, pers, sizeof pers - 1);
  if (rc != 0) {
    if (err && errlen)
      mbed_reason(rc, "seeding the RNG", err, errlen);
    goto fail;
  }
  rc = mbedtls_ssl_config_defaults(&ctx->conf,
                                   is_server ? MBEDTLS_SSL_IS_SERVER : MBEDTLS_SSL_IS_CLIENT,
                                   MBEDTLS_SSL_TRANSPORT_STREAM, MBEDTLS_SSL_PRESET_DEFAULT);
  if (rc != 0) {
    if (err && errlen)
      mbed_reason(rc, "TLS defaults", err, errlen);
    goto fail;
  }
  mbedtls_ssl_conf_rng(&ctx->conf, mbedtls_ctr_drbg_random, &ctx->drbg);
  mbedtls_ssl_conf_min_version(&ctx->conf, MBEDTLS_SSL_MAJOR_VERSION_3,
                               MBEDTLS_SSL_MINOR_VERSION_3);
  mbedtls_ssl_conf_renegotiation(&ctx->conf, MBEDTLS_SSL_RENEGOTIATION_DISABLED);
  rc = mbedtls_ssl_conf_alpn_protocols(&ctx->conf, alpn_protos);
  if (rc != 0) {
    if (err && errlen)
      mbed_reason(rc, "ALPN", err, errlen);
    goto fail;
  }
  return ctx;

fail:
  tg_tls_ctx_free(ctx);
  return NULL;
}

tg_tls_ctx_t *tg_tls_server_ctx_new(const char *cert_file, const char *key_file, char *err,
                                    size_t errlen) {
  if (cert_file == NULL || key_file == NULL) {
    set_err(err, errlen, "%s", "TLS needs both a certificate and a key file");
    return NULL;
  }
  tg_tls_ctx_t *ctx = ctx_new(1, err, errlen);
  if (ctx == NULL)
    return NULL;
  char what[300];
  int rc = mbedtls_x509_crt_parse_file(&ctx->certs, cert_file);
  if (rc != 0) {
    snprintf(what, sizeof what, "certificate %s", cert_file);
    goto fail_mbed;
  }
  rc = mbedtls_pk_parse_keyfile(&ctx->key, key_file, NULL);
  if (rc != 0) {
    snprintf(what, sizeof what, "key %s", key_file);
    goto fail_mbed;
  }
  rc = mbedtls_pk_check_pair(&ctx->certs.pk, &ctx->key);
  if (rc != 0) {
    snprintf(what, sizeof what, "key %s does not match certificate %s", key_file, cert_file);
    goto fail_mbed;
  }
  rc = mbedtls_ssl_conf_own_cert(&ctx->conf, &ctx->certs, &ctx->key);
  if (rc != 0) {
    snprintf(what, sizeof what, "certificate %s", cert_file);
    goto fail_mbed;
  }
  /* Clients are not asked for certificates; no session cache or ticket
   * callbacks are configured, so every connection does a full handshake. */
  mbedtls_ssl_conf_authmode(&ctx->conf, MBEDTLS_SSL_VERIFY_NONE);
  return ctx;

fail_mbed:
  if (err && errlen)
    mbed_reason(rc, what, err, errlen);
  tg_tls_ctx_free(ctx);
  return NULL;
}

tg_tls_ctx_t *tg_tls_client_ctx_new(const char *ca_file, char *err, size_t errlen) {
  if (ca_file == NULL)
    ca_file = SYSTEM_CA_BUNDLE;
  tg_tls_ctx_t *ctx = ctx_new(0, err, errlen);
  if (ctx == NULL)
    return NULL;
  /* A positive result counts certificates that failed to parse: system
   * bundles may hold a few mbedTLS does not understand; keep the rest. */
  int rc = mbedtls_x509_crt_parse_file(&ctx->certs, ca_file);
  if (rc < 0 || ctx->certs.version == 0) {
    if (err && errlen) {
      char what[300];
      snprintf(what, sizeof what, "CA file %s", ca_file);
      if (rc < 0)
        mbed_reason(rc, what, err, errlen);
      else
        snprintf(err, errlen, "%s: no usable certificate", what);
    }
    tg_tls_ctx_free(ctx);
    return NULL;
  }
  mbedtls_ssl_conf_ca_chain(&ctx->conf, &ctx->certs, NULL);
  mbedtls_ssl_conf_authmode(&ctx->conf, MBEDTLS_SSL_VERIFY_REQUIRED);
  mbedtls_ssl_conf_session_tickets(&ctx->conf, MBEDTLS_SSL_SESSION_TICKETS_DISABLED);
  return ctx;
}

void tg_tls_ctx_free(tg_tls_ctx_t *ctx) {
  if (ctx == NULL)
    return;
  mbedtls_ssl_config_free(&ctx->conf);
  mbedtls_x509_crt_free(&ctx->certs);
  mbedtls_pk_free(&ctx->key);
  mbedtls_ctr_drbg_free(&ctx->drbg);
  mbedtls_entropy_free(&ctx->entropy);
  free(ctx);
}

/* The memory "BIO": mbedTLS writes records into out and reads from in. */
static int bio_send(void *p, const unsigned char *data, size_t len) {
  tg_tls_t *t = p;
  if (tg_buf_append(&t->out, data, len) != 0)
    return MBEDTLS_ERR_SSL_ALLOC_FAILED;
  return (int)len;
}

static int bio_recv(void *p, unsigned char *buf, size_t len) {
  tg_tls_t *t = p;
  size_t avail = t->in.len - t->in_off;
  if (avail == 0)
    return MBEDTLS_ERR_SSL_WANT_READ;
  size_t n = len < avail ? len : avail;
  memcpy(buf, t->in.data + t->in_off, n);
  t->in_off += n;
  if (t->in_off == t->in.len) {
    tg_buf_free(&t->in);
    t->in_off = 0;
  }
  return (int)n;
}

/* mbedTLS 2.28 verifies names against DNS SANs and the CN only. For an IP
 * literal we set no hostname (IP literals are not valid SNI either) and match
 * the leaf's iPAddress SANs here instead; a miss fails verification. */
static int verify_ip(void *p, mbedtls_x509_crt *crt, int depth, uint32_t *flags) {
  tg_tls_t *t = p;
  if (depth != 0)
    return 0;
  for (const mbedtls_x509_sequence *san = &crt->subject_alt_names; san; san = san->next) {
    if (san->buf.tag == (MBEDTLS_ASN1_CONTEXT_SPECIFIC | MBEDTLS_X509_SAN_IP_ADDRESS) &&
        san->buf.len == t->ip_len && memcmp(san->buf.p, t->ip, t->ip_len) == 0)
      return 0;
  }
  *flags |= MBEDTLS_X509_BADCERT_CN_MISMATCH;
  return 0;
}

tg_tls_t *tg_tls_new(tg_tls_ctx_t *ctx, const char *hostname) {
  if (ctx == NULL || (!ctx->is_server && (hostname == NULL || *hostname == '\0')))
    return NULL;
  tg_tls_t *t = calloc(1, sizeof *t);
  if (t == NULL)
    return NULL;
  t->ctx = ctx;
  mbedtls_ssl_init(&t->ssl);
  if (mbedtls_ssl_setup(&t->ssl, &ctx->conf) != 0)
    goto fail;
  if (!ctx->is_server) {
    if (inet_pton(AF_INET, hostname, t->ip) == 1)
      t->ip_len = 4;
    else if (inet_pton(AF_INET6, hostname, t->ip) == 1)
      t->ip_len = 16;
    if (t->ip_len)
      mbedtls_ssl_set_verify(&t->ssl, verify_ip, t);
    else if (mbedtls_ssl_set_hostname(&t->ssl, hostname) != 0)
      goto fail;
  }
  mbedtls_ssl_set_bio(&t->ssl, t, bio_send, bio_recv, NULL);
  return t;

fail:
  tg_tls_free(t);
  return NULL;
}

void tg_tls_free(tg_tls_t *t) {
  if (t == NULL)
    return;
  mbedtls_ssl_free(&t->ssl);
  tg_buf_free(&t->in);
  tg_buf_free(&t->out);
  tg_buf_free(&t->pending);
  free(t->err);
  free(t);
}

int tg_tls_feed(tg_tls_t *t, const char *data, size_t len) {
  if (t->in_off > 0) {
    tg_buf_consume(&t->in, t->in_off);
    t->in_off = 0;
  }
  return tg_buf_append(&t->in, data, len);
}

/* Records a fatal mbedTLS error; returns the sticky errno-style code. The
 * reason is lost only when there is no memory for it. */
static int fail(tg_tls_t *t, int rc, const char *what) {
  if (t->err == NULL)
    t->err = malloc(ERR_LEN);
  if (rc == MBEDTLS_ERR_SSL_ALLOC_FAILED) {
    t->fail = -ENOMEM;
    if (t->err)
      snprintf(t->err, ERR_LEN, "%s: out of memory", what);
    return t->fail;
  }
  t->fail = -EPROTO;
  if (t->err == NULL)
    return t->fail;
  uint32_t flags = mbedtls_ssl_get_verify_result(&t->ssl);
  if (rc == MBEDTLS_ERR_X509_CERT_VERIFY_FAILED && flags != 0 && flags != (uint32_t)-1) {
    char info[200];
    int n = mbedtls_x509_crt_verify_info(info, sizeof info, "", flags);
    /* One line per problem, each ending in '\n': join them for a log line. */
    for (int i = 0; i < n; i++)
      if (info[i] == '\n')
        info[i] = (i == n - 1) ? '\0' : ';';
    snprintf(t->err, ERR_LEN, "certificate verification failed: %s", info);
  } else {
    mbed_reason(rc, what, t->err, ERR_LEN);
  }
  return t->fail;
}

static int write_records(tg_tls_t *t, const char *data, size_t len) {
  size_t off = 0;
  while (off < len) {
    /* bio_send never blocks and renegotiation is off, so WANT_* cannot occur:
     * any non-positive result is fatal. */
    int rc = mbedtls_ssl_write(&t->ssl, (const unsigned char *)data + off, len - off);
    if (rc <= 0)
      return fail(t, rc == 0 ? MBEDTLS_ERR_SSL_INTERNAL_ERROR : rc, "TLS write");
    off += (size_t)rc;
  }
  return 0;
}

int tg_tls_read(tg_tls_t *t, char *buf, size_t len) {
  if (t->fail)
    return t->fail;
  if (!t->handshake_done) {
    int rc = mbedtls_ssl_handshake(&t->ssl);
    if (rc == MBEDTLS_ERR_SSL_WANT_READ || rc == MBEDTLS_ERR_SSL_WANT_WRITE)
      return 0;
    if (rc != 0)
      return fail(t, rc, "TLS handshake");
    t->handshake_done = 1;
    if (t->pending.len > 0) {
      rc = write_records(t, t->pending.data, t->pending.len);
      tg_buf_free(&t->pending);
      if (rc != 0)
        return rc;
    }
  }
  int rc = mbedtls_ssl_read(&t->ssl, (unsigned char *)buf, len);
  if (rc > 0)
    return rc;
  if (rc == MBEDTLS_ERR_SSL_WANT_READ || rc == MBEDTLS_ERR_SSL_WANT_WRITE)
    return 0;
  /* bio_recv never reports end of stream, so 0 can only mean close_notify. */
  if (rc == MBEDTLS_ERR_SSL_PEER_CLOSE_NOTIFY || rc == 0)
    return TG_TLS_CLOSED;
  return fail(t, rc, "TLS read");
}

int tg_tls_write(tg_tls_t *t, const char *data, size_t len) {
  if (t->fail)
    return t->fail;
  if (t->closed)
    return -EPROTO;
  if (!t->handshake_done)
    return tg_buf_append(&t->pending, data, len);
  return write_records(t, data, len);
}

void tg_tls_close(tg_tls_t *t) {
  if (t->fail || t->closed || !t->handshake_done)
    return;
  t->closed = 1;
  int rc = mbedtls_ssl_close_notify(&t->ssl);
  if (rc != 0 && rc != MBEDTLS_ERR_SSL_WANT_WRITE)
    fail(t, rc, "TLS close");
}

int tg_tls_take_output(tg_tls_t *t, tg_buf_t *out) {
  if (t->out.len == 0)
    return 0;
  if (out->len == 0) {
    /* Hand the whole buffer over instead of copying it. */
    tg_buf_t empty = *out;
    *out = t->out;
    t->out = (tg_buf_t){0};
    tg_buf_free(&empty);
    return 0;
  }
  if (tg_buf_append(out, t->out.data, t->out.len) != 0)
    return -ENOMEM;
  tg_buf_free(&t->out);
  return 0;
}

int tg_tls_has_output(const tg_tls_t *t) { return t->out.len > 0; }

int tg_tls_handshake_done(const tg_tls_t *t) { return t->handshake_done; }

const char *tg_tls_alpn(const tg_tls_t *t) { return mbedtls_ssl_get_alpn_protocol(&t->ssl); }

const char *tg_tls_error(const tg_tls_t *t) {
  if (t->err)
    return t->err;
  return t->fail == -ENOMEM ? "out of memory" : t->fail ? "TLS error" : "";
}
