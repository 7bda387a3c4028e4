/* libFuzzer target for the whole request path: an in-process gateway (HTTP
 * server, Connect router, exchange handlers, health and 404 routes) on a
 * loopback port. Each input is written to a new connection as raw bytes, the
 * write side is shut, and the answer is read until the server closes. The
 * server's own timeouts are short, and every wait here is bounded by poll(),
 * so a hang shows as a slow unit (libFuzzer's -timeout), never a stuck run. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "config/config.h"
#include "gateway/gateway.h"
#include "base/log.h"

/* Longest wait for the server to finish with one input. Above the server's
 * timeouts below, so the server always acts first. */
#define ANSWER_WAIT_MS 3000

static tg_gateway_t *gateway;
static int port;

/* The configuration a file would give, filled by hand: nothing on disk. */
static char *tenant_hosts[] = {"news.example"};
static tg_config_tenant_t tenant = {.name = "news", .hosts = tenant_hosts, .nhosts = 1};
static tg_config_t config = {
    .nlisten = 1,
    .workers = 1,
    .max_header_bytes = 8192,
    .max_body_bytes = 65536,
    .header_timeout_ms = 300,
    .body_timeout_ms = 300,
    .idle_timeout_ms = 300,
    .max_connections = 1000,
    .shutdown_grace_ms = 500,
    .tenants = &tenant,
    .ntenants = 1,
};

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  signal(SIGPIPE, SIG_IGN);
  /* Bad input is logged as warnings; keep the fuzzer's output readable. */
  tg_log_set_level(TG_LOG_ERROR);
  config.listen[0].host = "127.0.0.1";
  config.listen[0].port = 0;
  char err[256];
  if (tg_gateway_start(&gateway, &config, err, sizeof err) != 0) {
    fprintf(stderr, "http_request_fuzz: gateway did not start: %s\n", err);
    abort();
  }
  port = tg_gateway_port(gateway, 0);
  return 0;
}

static int64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Waits for fd to be ready for events until the deadline; 1 ready, 0 not. */
static int wait_fd(int fd, short events, int64_t deadline) {
  for (;;) {
    int64_t left = deadline - now_ms();
    if (left <= 0)
      return 0;
    struct pollfd p = {fd, events, 0};
    int n = poll(&p, 1, (int)left);
    if (n > 0)
      return 1;
    if (n < 0 && errno != EINTR)
      return 0;
  }
}

/* Every input leaves a client socket in TIME_WAIT (we shut our side first),
 * and thousands run per second: spread connections over many loopback source
 * addresses, or one address's ephemeral ports run out within seconds. */
static int dial(void) {
  static unsigned counter;
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return -1;
  unsigned c = counter++;
  struct sockaddr_in src = {.sin_family = AF_INET};
  src.sin_addr.s_addr = htonl(0x7f010000u | (1 + (c / 254) % 64) << 8 | (1 + c % 254));
  int one = 1;
  setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
  if (bind(fd, (struct sockaddr *)&src, sizeof src) != 0) {
    close(fd);
    return -1;
  }
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, (struct sockaddr *)&a, sizeof a) == 0)
    return fd;
  /* libFuzzer's timeout alarm can interrupt connect(); the handshake goes
   * on regardless, so wait for it instead of failing the unit. */
  if (errno == EINTR && wait_fd(fd, POLLOUT, now_ms() + ANSWER_WAIT_MS)) {
    int soerr = 0;
    socklen_t sl = sizeof soerr;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) == 0 && soerr == 0)
      return fd;
    errno = soerr;
  }
  int saved = errno;
  close(fd);
  errno = saved;
  return -1;
}

static void keep_head(char *head, size_t *len, const char *buf, ssize_t n) {
  if (n <= 0 || *len >= 16)
    return;
  size_t take = 16 - *len < (size_t)n ? 16 - *len : (size_t)n;
  memcpy(head + *len, buf, take);
  *len += take;
}

/* Whatever the input, an answer (if any) is HTTP/1.1 and never a 500: the
 * gateway has no reason to fail internally on anything a client sends. */
static void check_answer(const char *head, size_t len, size_t size) {
  if (len == 0)
    return;
  if (len < 13 || memcmp(head, "HTTP/1.1 ", 9) != 0) {
    fprintf(stderr, "http_request_fuzz: the answer does not start with a status line: %.*s\n",
            (int)len, head);
    abort();
  }
  if (memcmp(head + 9, "500", 3) == 0) {
    fprintf(stderr, "http_request_fuzz: 500 for a %zu-byte input\n", size);
    abort();
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  int fd = dial();
  if (fd < 0) {
    /* The server stopped accepting: that is a finding, not noise. */
    fprintf(stderr, "http_request_fuzz: cannot connect to the gateway: %s\n", strerror(errno));
    abort();
  }
  int64_t deadline = now_ms() + ANSWER_WAIT_MS;
  /* The server may stop reading (an error answer, a paused pipeline): write
   * what it takes and read meanwhile, so neither side blocks the other. */
  size_t off = 0;
  char buf[16384];
  char head[16];   /* the first bytes of the answer */
  size_t head_len = 0;
  int peer_closed = 0;
  while (off < size && !peer_closed) {
    struct pollfd p = {fd, POLLOUT | POLLIN, 0};
    int64_t left = deadline - now_ms();
    if (left <= 0)
      break;
    int ready = poll(&p, 1, (int)left);
    if (ready < 0 && errno == EINTR)
      continue;
    if (ready <= 0)
      break;
    if (p.revents & POLLIN) {
      ssize_t n = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
      keep_head(head, &head_len, buf, n);
      if (n == 0)
        peer_closed = 1;
      else if (n < 0 && errno != EAGAIN && errno != EINTR)
        peer_closed = 1;
    }
    if (p.revents & (POLLERR | POLLHUP))
      peer_closed = 1;
    if (!peer_closed && (p.revents & POLLOUT)) {
      ssize_t n = send(fd, data + off, size - off, MSG_DONTWAIT | MSG_NOSIGNAL);
      if (n > 0)
        off += (size_t)n;
      else if (n < 0 && errno != EAGAIN && errno != EINTR)
        peer_closed = 1;
    }
  }
  shutdown(fd, SHUT_WR);
  while (!peer_closed && wait_fd(fd, POLLIN, deadline)) {
    ssize_t n = recv(fd, buf, sizeof buf, 0);
    keep_head(head, &head_len, buf, n);
    if (n <= 0 && !(n < 0 && errno == EINTR))
      break;
  }
  close(fd);
  check_answer(head, head_len, size);
  return 0;
}
