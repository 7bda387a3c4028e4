#include "test.h"
#include "tls_fixture.h"

#include <errno.h>

#include "net/tls.h"

static tls_fixture_t fx;
static int fx_state; /* 0 not made, 1 ready, -1 failed */

static void remove_fixture(void) { tls_fixture_remove(&fx); }

static const tls_fixture_t *fixture(void) {
  if (fx_state == 0) {
    fx_state = tls_fixture_make(&fx) == 0 ? 1 : -1;
    if (fx_state == 1)
      atexit(remove_fixture);
  }
  return fx_state == 1 ? &fx : NULL;
}

/* One side of an in-memory connection: its session, the plaintext it has
 * received, and the last non-positive result of tg_tls_read. */
typedef struct side {
  tg_tls_t *tls;
  tg_buf_t plain;
  int rc;
} side_t;

/* Moves ciphertext from one side's output to the other's input and reads. */
static int deliver(side_t *from, side_t *to) {
  if (!tg_tls_has_output(from->tls))
    return 0;
  tg_buf_t wire = {0};
  if (tg_tls_take_output(from->tls, &wire) != 0 || tg_tls_feed(to->tls, wire.data, wire.len) != 0) {
    tg_buf_free(&wire);
    return -1;
  }
  tg_buf_free(&wire);
  char buf[4096];
  for (;;) {
    int n = tg_tls_read(to->tls, buf, sizeof buf);
    if (n <= 0) {
      to->rc = n;
      break;
    }
    tg_buf_append(&to->plain, buf, (size_t)n);
  }
  return 1;
}

/* Shuttles bytes both ways until both sides are quiet. */
static void pump(side_t *a, side_t *b) {
  for (int round = 0; round < 100; round++) {
    int moved = deliver(a, b);
    moved |= deliver(b, a);
    if (!moved)
      return;
  }
}

typedef struct pair {
  tg_tls_ctx_t *sctx, *cctx;
  side_t client, server;
} pair_t;

/* Sets up a client (trusting ca_file, verifying host) and a server session
 * and pumps the handshake. */
static int pair_open(pair_t *p, const char *ca_file, const char *host) {
  memset(p, 0, sizeof *p);
  const tls_fixture_t *f = fixture();
  if (f == NULL)
    return -1;
  char err[256];
  p->sctx = tg_tls_server_ctx_new(f->cert, f->key, err, sizeof err);
  if (p->sctx == NULL) {
    fprintf(stderr, "  server ctx: %s\n", err);
    return -1;
  }
  p->cctx = tg_tls_client_ctx_new(ca_file, err, sizeof err);
  if (p->cctx == NULL) {
    fprintf(stderr, "  client ctx: %s\n", err);
    return -1;
  }
  p->server.tls = tg_tls_new(p->sctx, NULL);
  p->client.tls = tg_tls_new(p->cctx, host);
  if (p->server.tls == NULL || p->client.tls == NULL)
    return -1;
  char none[1];
  p->client.rc = tg_tls_read(p->client.tls, none, sizeof none); /* ClientHello */
  pump(&p->client, &p->server);
  return 0;
}

static void pair_close(pair_t *p) {
  tg_tls_free(p->client.tls);
  tg_tls_free(p->server.tls);
  tg_tls_ctx_free(p->cctx);
  tg_tls_ctx_free(p->sctx);
  tg_buf_free(&p->client.plain);
  tg_buf_free(&p->server.plain);
}

TEST(handshake_and_data_both_ways) {
  pair_t p;
  int rc = pair_open(&p, fixture() ? fx.ca : NULL, "localhost");
  if (rc != 0)
    pair_close(&p);
  CHECK_INT(rc, 0);
  int ok_client = tg_tls_handshake_done(p.client.tls),
      ok_server = tg_tls_handshake_done(p.server.tls);
  if (!ok_client)
    fprintf(stderr, "  client: %s\n", tg_tls_error(p.client.tls));
  CHECK(ok_client && ok_server);
  CHECK_STR(tg_tls_alpn(p.client.tls), "http/1.1");
  CHECK_STR(tg_tls_alpn(p.server.tls), "http/1.1");
  CHECK_STR(tg_tls_error(p.client.tls), "");

  CHECK_INT(tg_tls_write(p.client.tls, "GET / HTTP/1.1\r\n\r\n", 18), 0);
  pump(&p.client, &p.server);
  CHECK_INT(p.server.plain.len, 18);
  CHECK(memcmp(p.server.plain.data, "GET / HTTP/1.1\r\n\r\n", 18) == 0);
  CHECK_INT(tg_tls_write(p.server.tls, "HTTP/1.1 204 No Content\r\n\r\n", 27), 0);
  pump(&p.client, &p.server);
  CHECK_STR(p.client.plain.data, "HTTP/1.1 204 No Content\r\n\r\n");
  CHECK_INT(p.client.rc, 0);
  CHECK_INT(p.server.rc, 0);
  pair_close(&p);
}

static void fill_pattern(char *buf, size_t len, unsigned seed) {
  for (size_t i = 0; i < len; i++)
    buf[i] = (char)((i * 31 + seed) % 251);
}

TEST(large_writes_span_records_and_queue_before_handshake) {
  const tls_fixture_t *f = fixture();
  CHECK(f != NULL);
  char err[256];
  tg_tls_ctx_t *sctx = tg_tls_server_ctx_new(f->cert, f->key, err, sizeof err);
  tg_tls_ctx_t *cctx = tg_tls_client_ctx_new(f->ca, err, sizeof err);
  CHECK(sctx && cctx);
  side_t client = {tg_tls_new(cctx, "localhost"), {0}, 0};
  side_t server = {tg_tls_new(sctx, NULL), {0}, 0};
  CHECK(client.tls && server.tls);

  size_t up_len = 100000, down_len = 70001;
  char *up = malloc(up_len), *down = malloc(down_len);
  CHECK(up && down);
  fill_pattern(up, up_len, 7);
  fill_pattern(down, down_len, 13);
  /* Written before the handshake: queued, then sent once it completes. */
  CHECK_INT(tg_tls_write(client.tls, up, up_len), 0);
  CHECK(!tg_tls_handshake_done(client.tls));
  char none[1];
  CHECK_INT(tg_tls_read(client.tls, none, sizeof none), 0);
  CHECK(tg_tls_has_output(client.tls));
  pump(&client, &server);
  CHECK(tg_tls_handshake_done(server.tls));
  CHECK_INT(server.plain.len, up_len);
  CHECK(memcmp(server.plain.data, up, up_len) == 0);

  CHECK_INT(tg_tls_write(server.tls, down, down_len), 0);
  /* More than one 16 KiB record's worth of ciphertext. */
  CHECK(tg_tls_has_output(server.tls));
  tg_buf_t wire = {0};
  CHECK_INT(tg_tls_take_output(server.tls, &wire), 0);
  CHECK(wire.len > down_len + 5 * 5);
  CHECK(!tg_tls_has_output(server.tls));
  /* Feed it in small pieces: records split across reads must reassemble. */
  for (size_t off = 0; off < wire.len; off += 1000) {
    size_t n = wire.len - off < 1000 ? wire.len - off : 1000;
    CHECK_INT(tg_tls_feed(client.tls, wire.data + off, n), 0);
    char buf[3000];
    int r;
    while ((r = tg_tls_read(client.tls, buf, sizeof buf)) > 0)
      tg_buf_append(&client.plain, buf, (size_t)r);
    CHECK_INT(r, 0);
  }
  tg_buf_free(&wire);
  CHECK_INT(client.plain.len, down_len);
  CHECK(memcmp(client.plain.data, down, down_len) == 0);

  free(up);
  free(down);
  tg_buf_free(&client.plain);
  tg_buf_free(&server.plain);
  tg_tls_free(client.tls);
  tg_tls_free(server.tls);
  tg_tls_ctx_free(cctx);
  tg_tls_ctx_free(sctx);
}

TEST(close_notify_reaches_peer) {
  pair_t p;
  int rc = pair_open(&p, fixture() ? fx.ca : NULL, "localhost");
  if (rc != 0)
    pair_close(&p);
  CHECK_INT(rc, 0);
  CHECK(tg_tls_handshake_done(p.client.tls));
  CHECK_INT(tg_tls_write(p.client.tls, "bye", 3), 0);
  tg_tls_close(p.client.tls);
  CHECK_INT(tg_tls_write(p.client.tls, "more", 4), -EPROTO);
  pump(&p.client, &p.server);
  CHECK_STR(p.server.plain.data, "bye");
  CHECK_INT(p.server.rc, TG_TLS_CLOSED);
  /* The server answers with its own close_notify. */
  tg_tls_close(p.server.tls);
  pump(&p.client, &p.server);
  CHECK_INT(p.client.rc, TG_TLS_CLOSED);
  pair_close(&p);
}

TEST(unknown_ca_fails_verification) {
  pair_t p;
  int rc = pair_open(&p, fixture() ? fx.other_ca : NULL, "localhost");
  if (rc != 0)
    pair_close(&p);
  CHECK_INT(rc, 0);
  CHECK(!tg_tls_handshake_done(p.client.tls));
  CHECK_INT(p.client.rc, -EPROTO);
  const char *why = tg_tls_error(p.client.tls);
  int says_verify = strstr(why, "verification failed") != NULL && strstr(why, "trusted") != NULL;
  if (!says_verify)
    fprintf(stderr, "  reason: %s\n", why);
  CHECK(says_verify);
  /* The client told the server with an alert, so the server fails too. */
  CHECK(p.server.rc < 0 && p.server.rc != TG_TLS_CLOSED);
  CHECK(!tg_tls_handshake_done(p.server.tls));
  /* Sticky: later calls keep failing. */
  char buf[16];
  CHECK_INT(tg_tls_read(p.client.tls, buf, sizeof buf), -EPROTO);
  CHECK_INT(tg_tls_write(p.client.tls, "x", 1), -EPROTO);
  pair_close(&p);
}

TEST(hostname_mismatch_fails_verification) {
  pair_t p;
  int rc = pair_open(&p, fixture() ? fx.ca : NULL, "example.com");
  if (rc != 0)
    pair_close(&p);
  CHECK_INT(rc, 0);
  CHECK(!tg_tls_handshake_done(p.client.tls));
  CHECK_INT(p.client.rc, -EPROTO);
  const char *why = tg_tls_error(p.client.tls);
  int says_cn = strstr(why, "Common Name") != NULL;
  if (!says_cn)
    fprintf(stderr, "  reason: %s\n", why);
  CHECK(says_cn);
  pair_close(&p);
}

TEST(bad_configuration_is_reported) {
  const tls_fixture_t *f = fixture();
  CHECK(f != NULL);
  char err[256] = "";
  CHECK(tg_tls_server_ctx_new("/nonexistent/cert.pem", f->key, err, sizeof err) == NULL);
  CHECK(strstr(err, "/nonexistent/cert.pem") != NULL);
  err[0] = '\0';
  CHECK(tg_tls_server_ctx_new(f->cert, "/nonexistent/key.pem", err, sizeof err) == NULL);
  CHECK(strstr(err, "/nonexistent/key.pem") != NULL);
  /* A key that does not belong to the certificate. */
  char other_key[160];
  snprintf(other_key, sizeof other_key, "%s/other-ca.key", f->dir);
  err[0] = '\0';
  CHECK(tg_tls_server_ctx_new(f->cert, other_key, err, sizeof err) == NULL);
  CHECK(strstr(err, "does not match") != NULL);
  err[0] = '\0';
  CHECK(tg_tls_client_ctx_new("/nonexistent/ca.pem", err, sizeof err) == NULL);
  CHECK(strstr(err, "/nonexistent/ca.pem") != NULL);

  tg_tls_ctx_t *cctx = tg_tls_client_ctx_new(f->ca, err, sizeof err);
  CHECK(cctx != NULL);
  /* A client session without a name to verify is refused. */
  CHECK(tg_tls_new(cctx, NULL) == NULL);
  CHECK(tg_tls_new(cctx, "") == NULL);
  tg_tls_ctx_free(cctx);
}

TEST(system_bundle_loads) {
  char err[256] = "";
  tg_tls_ctx_t *ctx = tg_tls_client_ctx_new(NULL, err, sizeof err);
  if (ctx == NULL)
    fprintf(stderr, "  %s\n", err);
  CHECK(ctx != NULL);
  tg_tls_t *t = tg_tls_new(ctx, "example.com");
  CHECK(t != NULL);
  char none[1];
  CHECK_INT(tg_tls_read(t, none, sizeof none), 0);
  CHECK(tg_tls_has_output(t)); /* the ClientHello */
  tg_tls_free(t);
  tg_tls_ctx_free(ctx);
}

TEST(ip_literal_matches_ip_san_only) {
  pair_t p;
  int rc = pair_open(&p, fixture() ? fx.ca : NULL, "127.0.0.1");
  if (rc != 0)
    pair_close(&p);
  CHECK_INT(rc, 0);
  int done = tg_tls_handshake_done(p.client.tls);
  if (!done)
    fprintf(stderr, "  reason: %s\n", tg_tls_error(p.client.tls));
  pair_close(&p);
  CHECK(done);

  /* Addresses the certificate does not list fail, even though its CN and
   * DNS names are unrelated to them. */
  const char *others[] = {"127.0.0.2", "::1"};
  for (size_t i = 0; i < 2; i++) {
    rc = pair_open(&p, fx.ca, others[i]);
    int failed = rc == 0 && !tg_tls_handshake_done(p.client.tls) && p.client.rc == -EPROTO;
    pair_close(&p);
    CHECK(failed);
  }
}

TEST(server_rejects_plaintext_and_output_appends) {
  const tls_fixture_t *f = fixture();
  CHECK(f != NULL);
  char err[256];
  tg_tls_ctx_t *sctx = tg_tls_server_ctx_new(f->cert, f->key, err, sizeof err);
  CHECK(sctx != NULL);
  tg_tls_t *s = tg_tls_new(sctx, NULL);
  CHECK(s != NULL);
  /* Plain HTTP on a TLS port: a fatal error, not a wait for more bytes. */
  const char *http = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
  CHECK_INT(tg_tls_feed(s, http, strlen(http)), 0);
  char buf[64];
  CHECK_INT(tg_tls_read(s, buf, sizeof buf), -EPROTO);
  CHECK(tg_tls_error(s)[0] != '\0');
  CHECK(!tg_tls_handshake_done(s));
  tg_tls_free(s);

  /* Output is appended after what the caller's buffer already holds. */
  tg_tls_ctx_t *cctx = tg_tls_client_ctx_new(f->ca, err, sizeof err);
  CHECK(cctx != NULL);
  tg_tls_t *t = tg_tls_new(cctx, "localhost");
  CHECK(t != NULL);
  CHECK_INT(tg_tls_read(t, buf, sizeof buf), 0);
  tg_buf_t out = {0};
  tg_buf_puts(&out, "prefix");
  CHECK_INT(tg_tls_take_output(t, &out), 0);
  CHECK(out.len > 6 + 5);
  CHECK(memcmp(out.data, "prefix", 6) == 0);
  CHECK_INT((unsigned char)out.data[6], 0x16); /* a TLS handshake record */
  CHECK(!tg_tls_has_output(t));
  tg_buf_free(&out);
  tg_tls_free(t);
  tg_tls_ctx_free(cctx);
  tg_tls_ctx_free(sctx);
}
