/* Open-loop load at a fixed rate, for the benchmark's half-load latency.
 *
 * wrk has no rate control, and the delay() hook of its scripts only has
 * millisecond timers, so paced wrk sends each millisecond's requests in one
 * burst, which adds queueing of its own. This sends request k at exactly
 * t0 + k / RATE (timerfd with 1 ns timer slack) on whichever keep-alive
 * connection is free, and measures each latency from that intended time, so
 * a stall of the server or the machine counts against every request it
 * delays (no coordinated omission); latency from the actual send is kept too.
 *
 * Usage: pace HOST PORT RATE SECONDS CONNS REQUEST_FILE [PLACEHOLDER [START]]
 * REQUEST_FILE holds one raw HTTP/1.1 request; the answer must be a 200 with
 * Content-Length. Prints one line "BENCHJSON {...}" in the format of
 * connect.lua, preceded by the members in $BENCH_LABEL. Single-threaded.
 * With PLACEHOLDER (a string found in REQUEST_FILE, e.g. inside an
 * idempotency key), every occurrence of it in request k is overwritten by the
 * decimal START + k, zero-padded to the placeholder's width (same length, so
 * Content-Length and protobuf lengths stay right): every request differs, so
 * none is a replay. START defaults to 0; a counter that outgrows the width is
 * an error at start. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define INBUF 16384

typedef struct conn {
  int fd;
  int busy;
  uint64_t intended_ns, sent_ns;
  size_t have;
  char in[INBUF];
} conn_t;

typedef struct errors {
  uint64_t connect, read, write, status, timeout;
} errors_t;

static struct sockaddr_in peer;
static char *request;
static size_t request_len;
/* The per-request counter (PLACEHOLDER): offsets of its occurrences in request. */
static size_t ph_off[16], ph_count, ph_len;
static uint64_t ph_start;

/* Writes START + k over every occurrence of the placeholder. */
static void stamp(uint64_t k) {
  if (ph_count == 0)
    return;
  char digits[64];
  uint64_t v = ph_start + k;
  for (size_t i = ph_len; i-- > 0;) {
    digits[i] = (char)('0' + v % 10);
    v /= 10;
  }
  for (size_t j = 0; j < ph_count; j++)
    memcpy(request + ph_off[j], digits, ph_len);
}
static errors_t errs;

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int open_conn(int ep, conn_t *c, int idx) {
  c->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (c->fd < 0)
    return -1;
  int one = 1;
  setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  /* Blocking connect: loopback answers at once, and only at start or after an error. */
  if (connect(c->fd, (struct sockaddr *)&peer, sizeof peer) != 0) {
    close(c->fd);
    c->fd = -1;
    return -1;
  }
  fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) | O_NONBLOCK);
  struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)idx};
  if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) != 0)
    return -1;
  c->busy = 0;
  c->have = 0;
  return 0;
}

static void reopen_conn(int ep, conn_t *c, int idx) {
  if (c->fd >= 0)
    close(c->fd); /* also leaves the epoll set */
  c->fd = -1;
  if (open_conn(ep, c, idx) != 0)
    errs.connect++;
}

/* 1: a whole response is in c->in; 0: not yet; -1: malformed or not a 200. */
static int response_complete(conn_t *c) {
  c->in[c->have] = '\0';
  char *end = strstr(c->in, "\r\n\r\n");
  if (end == NULL)
    return c->have + 1 >= INBUF ? -1 : 0;
  long clen = -1;
  for (char *line = strstr(c->in, "\r\n"); line && line < end; line = strstr(line + 2, "\r\n"))
    if (strncasecmp(line + 2, "Content-Length:", 15) == 0)
      clen = strtol(line + 17, NULL, 10);
  if (clen < 0)
    return -1;
  size_t want = (size_t)(end + 4 - c->in) + (size_t)clen;
  if (c->have < want)
    return want + 1 > INBUF ? -1 : 0;
  if (c->have > want || strncmp(c->in, "HTTP/1.1 200 ", 13) != 0)
    return -1;
  return 1;
}

static int cmp_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

static uint64_t pct_us(const uint64_t *sorted, size_t n, double q) {
  if (n == 0)
    return 0;
  size_t i = (size_t)(q / 100.0 * (double)n);
  if (i >= n)
    i = n - 1;
  return sorted[i] / 1000;
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

static void arm(int tfd, uint64_t at_ns) {
  struct itimerspec its = {0};
  its.it_value.tv_sec = (time_t)(at_ns / 1000000000u);
  its.it_value.tv_nsec = (long)(at_ns % 1000000000u);
  timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
}

int main(int argc, char **argv) {
  if (argc < 7 || argc > 9) {
    fprintf(stderr, "usage: pace HOST PORT RATE SECONDS CONNS REQUEST_FILE [PLACEHOLDER [START]]\n");
    return 2;
  }
  peer.sin_family = AF_INET;
  peer.sin_port = htons((uint16_t)atoi(argv[2]));
  double rate = atof(argv[3]), secs = atof(argv[4]);
  int nconns = atoi(argv[5]);
  if (inet_pton(AF_INET, argv[1], &peer.sin_addr) != 1 || rate <= 0 || secs <= 0 || nconns <= 0) {
    fprintf(stderr, "pace: bad arguments\n");
    return 2;
  }
  request = read_file(argv[6], &request_len);
  if (request == NULL || request_len == 0) {
    fprintf(stderr, "pace: cannot read %s\n", argv[6]);
    return 2;
  }
  if (argc >= 8) {
    ph_len = strlen(argv[7]);
    ph_start = argc >= 9 ? strtoull(argv[8], NULL, 10) : 0;
    if (ph_len == 0 || ph_len > 64) {
      fprintf(stderr, "pace: PLACEHOLDER must be 1 to 64 bytes\n");
      return 2;
    }
    for (size_t at = 0; at + ph_len <= request_len && ph_count < 16;) {
      const char *hit = memmem(request + at, request_len - at, argv[7], ph_len);
      if (hit == NULL)
        break;
      ph_off[ph_count++] = (size_t)(hit - request);
      at = (size_t)(hit - request) + ph_len;
    }
    if (ph_count == 0) {
      fprintf(stderr, "pace: placeholder %s not found in %s\n", argv[7], argv[6]);
      return 2;
    }
  }
  prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);

  size_t cap = (size_t)(rate * secs) + 16;
  uint64_t *lat = malloc(cap * sizeof *lat);      /* from the intended send time */
  uint64_t *lat_sent = malloc(cap * sizeof *lat_sent); /* from the actual send */
  conn_t *conns = calloc((size_t)nconns, sizeof *conns);
  int *idle = malloc((size_t)nconns * sizeof *idle);
  int ep = epoll_create1(EPOLL_CLOEXEC);
  int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
  if (!lat || !lat_sent || !conns || !idle || ep < 0 || tfd < 0)
    return 1;
  struct epoll_event tev = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
  epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &tev);

  int nidle = 0;
  for (int i = 0; i < nconns; i++) {
    if (open_conn(ep, &conns[i], i) != 0) {
      fprintf(stderr, "pace: connect: %s\n", strerror(errno));
      return 1;
    }
    idle[nidle++] = i;
  }

  const double interval_ns = 1e9 / rate;
  const uint64_t t0 = now_ns() + 1000000; /* first request 1 ms from now */
  const uint64_t total = (uint64_t)(rate * secs);
  if (ph_count && ph_len < 19) { /* 19 digits and more hold any 64-bit start + total here */
    uint64_t limit = 1;
    for (size_t i = 0; i < ph_len; i++)
      limit *= 10;
    if (ph_start + total > limit) {
      fprintf(stderr, "pace: %llu requests from %llu do not fit the %zu-digit placeholder\n",
              (unsigned long long)total, (unsigned long long)ph_start, ph_len);
      return 2;
    }
  }
  const uint64_t t_stop = t0 + (uint64_t)(secs * 1e9);
  uint64_t next_k = 0, done = 0, bytes = 0, outstanding = 0;
  uint64_t last_done_ns = t0;

  for (;;) {
    uint64_t now = now_ns();
    /* Send every request that is due, as long as a connection is free; the
     * rest wait for one and keep their intended time. */
    while (next_k < total && nidle > 0) {
      uint64_t intended = t0 + (uint64_t)((double)next_k * interval_ns);
      if (intended > now)
        break;
      conn_t *c = &conns[idle[--nidle]];
      stamp(next_k);
      ssize_t w = write(c->fd, request, request_len);
      if (w != (ssize_t)request_len) {
        errs.write++;
        reopen_conn(ep, c, (int)(c - conns));
        if (c->fd >= 0)
          idle[nidle++] = (int)(c - conns);
        continue;
      }
      c->busy = 1;
      c->intended_ns = intended;
      c->sent_ns = now;
      c->have = 0;
      next_k++;
      outstanding++;
    }
    if (next_k >= total && outstanding == 0)
      break;
    if (now > t_stop + 2000000000u) { /* 2 s for the last answers */
      errs.timeout += outstanding;
      break;
    }
    if (next_k < total && nidle > 0)
      arm(tfd, t0 + (uint64_t)((double)next_k * interval_ns));

    struct epoll_event evs[64];
    int n = epoll_wait(ep, evs, 64, 100);
    if (n < 0 && errno != EINTR)
      return 1;
    for (int i = 0; i < n; i++) {
      if (evs[i].data.u32 == UINT32_MAX) {
        uint64_t expirations;
        /* EAGAIN when re-armed before it fired: nothing to drain. */
        ssize_t ignored = read(tfd, &expirations, sizeof expirations);
        (void)ignored;
        continue;
      }
      conn_t *c = &conns[evs[i].data.u32];
      ssize_t r = read(c->fd, c->in + c->have, INBUF - 1 - c->have);
      if (r <= 0) {
        if (r < 0 && errno == EAGAIN)
          continue;
        errs.read++;
        if (c->busy)
          outstanding--;
        reopen_conn(ep, c, (int)(c - conns));
        if (c->fd >= 0)
          idle[nidle++] = (int)(c - conns);
        continue;
      }
      c->have += (size_t)r;
      int st = response_complete(c);
      if (st == 0)
        continue;
      uint64_t t = now_ns();
      outstanding--;
      c->busy = 0;
      if (st < 0) {
        errs.status++;
        reopen_conn(ep, c, (int)(c - conns));
        if (c->fd < 0)
          continue;
      } else {
        lat[done] = t - c->intended_ns;
        lat_sent[done] = t - c->sent_ns;
        bytes += c->have;
        done++;
        last_done_ns = t;
      }
      c->have = 0;
      idle[nidle++] = (int)(c - conns);
    }
  }

  double run_s = (double)(last_done_ns - t0) / 1e9;
  double sum = 0;
  uint64_t max = 0;
  for (uint64_t i = 0; i < done; i++) {
    sum += (double)lat[i];
    if (lat[i] > max)
      max = lat[i];
  }
  qsort(lat, done, sizeof *lat, cmp_u64);
  qsort(lat_sent, done, sizeof *lat_sent, cmp_u64);
  const char *label = getenv("BENCH_LABEL");
  printf("BENCHJSON {%s%s\"requests\":%llu,\"duration_s\":%.3f,\"rps\":%.1f,\"bytes\":%llu,"
         "\"p50_us\":%llu,\"p90_us\":%llu,\"p99_us\":%llu,\"p999_us\":%llu,\"mean_us\":%.1f,\"max_us\":%llu,"
         "\"sent_p50_us\":%llu,\"sent_p99_us\":%llu,\"sent_p999_us\":%llu,"
         "\"errors\":{\"connect\":%llu,\"read\":%llu,\"write\":%llu,\"status\":%llu,\"timeout\":%llu},"
         "\"target_rps\":%.1f,\"generator\":\"pace\"}\n",
         label ? label : "", label && *label ? "," : "", (unsigned long long)done, run_s,
         run_s > 0 ? (double)done / run_s : 0.0, (unsigned long long)bytes,
         (unsigned long long)pct_us(lat, done, 50), (unsigned long long)pct_us(lat, done, 90),
         (unsigned long long)pct_us(lat, done, 99), (unsigned long long)pct_us(lat, done, 99.9),
         done ? sum / (double)done / 1000.0 : 0.0, (unsigned long long)(max / 1000),
         (unsigned long long)pct_us(lat_sent, done, 50), (unsigned long long)pct_us(lat_sent, done, 99),
         (unsigned long long)pct_us(lat_sent, done, 99.9), (unsigned long long)errs.connect,
         (unsigned long long)errs.read, (unsigned long long)errs.write,
         (unsigned long long)errs.status, (unsigned long long)errs.timeout, rate);
  return 0;
}
