/* Opens N keep-alive connections to HOST:PORT, completes one request on each
 * (the raw HTTP request in REQUEST_FILE), then holds them all open and idle so
 * that spec/bench/run.sh can read the server's memory. Prints
 * "ready open=<n> closed=<n>" once every connection is established and has
 * been idle for a second, then sleeps until killed (or for at most 10 min).
 *
 * Usage: idle_conns HOST PORT N REQUEST_FILE
 * Needs N + a few file descriptors: run under `ulimit -n 65536`. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

static int write_all(int fd, const char *p, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0 && errno == EINTR)
      continue;
    if (w <= 0)
      return -1;
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

/* Reads one response (head plus Content-Length body) and checks for a 200;
 * keep-alive needs the exact length, so a response without one is refused. */
static int read_response(int fd) {
  char buf[8192];
  size_t have = 0;
  char *end = NULL;
  while (end == NULL) {
    if (have == sizeof buf - 1)
      return -1;
    ssize_t r = read(fd, buf + have, sizeof buf - 1 - have);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0)
      return -1;
    have += (size_t)r;
    buf[have] = '\0';
    end = strstr(buf, "\r\n\r\n");
  }
  if (strncmp(buf, "HTTP/1.1 200 ", 13) != 0)
    return -1;
  long clen = -1;
  for (char *line = strstr(buf, "\r\n"); line && line < end; line = strstr(line + 2, "\r\n")) {
    if (strncasecmp(line + 2, "Content-Length:", 15) == 0)
      clen = strtol(line + 17, NULL, 10);
  }
  if (clen < 0)
    return -1;
  size_t want = (size_t)(end + 4 - buf) + (size_t)clen;
  while (have < want) {
    char sink[4096];
    size_t n = want - have < sizeof sink ? want - have : sizeof sink;
    ssize_t r = read(fd, sink, n);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0)
      return -1;
    have += (size_t)r;
  }
  return have == want ? 0 : -1;
}

static char *read_file(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (f == NULL)
    return NULL;
  char *data = malloc(65536);
  size_t n = data ? fread(data, 1, 65536, f) : 0;
  fclose(f);
  *len = n;
  return data;
}

int main(int argc, char **argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: idle_conns HOST PORT N REQUEST_FILE\n");
    return 2;
  }
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[2]))};
  if (inet_pton(AF_INET, argv[1], &sa.sin_addr) != 1) {
    fprintf(stderr, "idle_conns: bad IPv4 address %s\n", argv[1]);
    return 2;
  }
  int n = atoi(argv[3]);
  size_t reqlen;
  char *req = read_file(argv[4], &reqlen);
  if (n <= 0 || req == NULL || reqlen == 0) {
    fprintf(stderr, "idle_conns: bad count or unreadable request file\n");
    return 2;
  }
  int *fds = calloc((size_t)n, sizeof *fds);
  if (fds == NULL)
    return 1;
  alarm(600); /* never outlive a benchmark that lost track of us */

  for (int i = 0; i < n; i++) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
      fprintf(stderr, "idle_conns: socket #%d: %s\n", i, strerror(errno));
      return 1;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
      fprintf(stderr, "idle_conns: connect #%d: %s\n", i, strerror(errno));
      return 1;
    }
    if (write_all(fd, req, reqlen) != 0 || read_response(fd) != 0) {
      fprintf(stderr, "idle_conns: request on connection #%d failed\n", i);
      return 1;
    }
    fds[i] = fd;
  }

  /* A server that drops idle keep-alive connections early would make the
   * memory figure meaningless: count the ones that are still open. */
  sleep(1);
  int closed = 0;
  for (int i = 0; i < n; i++) {
    struct pollfd p = {.fd = fds[i], .events = POLLIN | POLLRDHUP};
    if (poll(&p, 1, 0) != 0)
      closed++;
  }
  printf("ready open=%d closed=%d\n", n - closed, closed);
  fflush(stdout);
  for (;;)
    pause();
}
