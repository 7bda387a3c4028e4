#ifndef TG_REDIS_FIXTURE_H
#define TG_REDIS_FIXTURE_H

/* A redis-server of the test's own, on a free loopback port, for the unit
 * tests of the Redis clients. Every server still running is killed at exit,
 * so a failed test leaves none behind. Test processes only (fork, exec,
 * atexit); one thread starts and stops servers. */

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <hiredis/hiredis.h>
#include <uv.h>

#define REDIS_FIXTURE_MAX 8

typedef struct redis_server {
  pid_t pid;        /* 0 while stopped */
  int port;         /* 0: a free one, chosen by redis_start */
  const char *pass; /* --requirepass, or NULL */
} redis_server_t;

static pid_t redis_fixture_live[REDIS_FIXTURE_MAX];

/* Exits 77 (skipped; spec/core/test.h's output says it failed) when
 * redis-server is not installed. Call it from a constructor. */
static inline void redis_require_server(const char *test) {
  if (system("command -v redis-server >/dev/null 2>&1") != 0) {
    fprintf(stderr, "%s: redis-server is not installed (apt-get install redis-server): skipped\n", test);
    printf("0 passed, 1 failed\n");
    exit(77);
  }
}

static inline void redis_fixture_track(pid_t pid, pid_t replace) {
  for (int i = 0; i < REDIS_FIXTURE_MAX; i++)
    if (redis_fixture_live[i] == replace) {
      redis_fixture_live[i] = pid;
      return;
    }
}

/* SIGCONT first: a stopped server (a test of a hung Redis) must die too. */
static inline void redis_fixture_kill(pid_t pid) {
  kill(pid, SIGCONT);
  kill(pid, SIGKILL);
  waitpid(pid, NULL, 0);
}

static inline void redis_fixture_kill_all(void) {
  for (int i = 0; i < REDIS_FIXTURE_MAX; i++)
    if (redis_fixture_live[i] > 0)
      redis_fixture_kill(redis_fixture_live[i]);
}

/* A loopback port nobody listens on (now), or -1. */
static inline int redis_free_port(void) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t len = sizeof(sa);
  int port = -1;
  if (fd >= 0 && bind(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0 &&
      getsockname(fd, (struct sockaddr *)&sa, &len) == 0)
    port = ntohs(sa.sin_port);
  if (fd >= 0)
    close(fd);
  return port;
}

/* A blocking connection (200 ms timeout), authenticated when s has a
 * password; NULL when the server does not answer. Free with redisFree. */
static inline redisContext *redis_direct(const redis_server_t *s) {
  struct timeval tv = {0, 200000};
  redisContext *c = redisConnectWithTimeout("127.0.0.1", s->port, tv);
  if (c == NULL || c->err) {
    if (c)
      redisFree(c);
    return NULL;
  }
  if (s->pass) {
    redisReply *r = redisCommand(c, "AUTH %s", s->pass);
    if (r)
      freeReplyObject(r);
  }
  return c;
}

static inline void redis_stop(redis_server_t *s) {
  if (s->pid > 0) {
    redis_fixture_kill(s->pid);
    redis_fixture_track(0, s->pid);
    s->pid = 0;
  }
}

static inline bool redis_answers_ping(const redis_server_t *s) {
  redisContext *c = redis_direct(s);
  if (c == NULL)
    return false;
  redisReply *r = redisCommand(c, "PING");
  bool ok = r && r->type == REDIS_REPLY_STATUS;
  if (r)
    freeReplyObject(r);
  redisFree(c);
  return ok;
}

static inline void redis_exec(const redis_server_t *s, const char *port) {
  int null = open("/dev/null", O_WRONLY);
  dup2(null, 1);
  dup2(null, 2);
  if (s->pass)
    execlp("redis-server", "redis-server", "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--requirepass", s->pass, (char *)NULL);
  else
    execlp("redis-server", "redis-server", "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           (char *)NULL);
  _exit(127);
}

/* Starts redis-server on s->port (a free one when 0, kept in s->port, so a
 * restart comes back on the same port); 0 once it answers PING (within 5 s),
 * else -1 with nothing left running. */
static inline int redis_start(redis_server_t *s) {
  static bool at_exit;
  if (!at_exit) {
    atexit(redis_fixture_kill_all);
    at_exit = true;
  }
  if (s->port == 0)
    s->port = redis_free_port();
  char port[16];
  snprintf(port, sizeof(port), "%d", s->port);
  pid_t pid = fork();
  if (pid < 0)
    return -1;
  if (pid == 0)
    redis_exec(s, port);
  s->pid = pid;
  redis_fixture_track(pid, 0);
  for (int i = 0; i < 250; i++) {
    if (redis_answers_ping(s))
      return 0;
    usleep(20000);
  }
  fprintf(stderr, "  redis-server did not start on port %d\n", s->port);
  redis_stop(s);
  return -1;
}

/* ---- a loop for the clients under test ---- */

static inline void redis_tick_cb(uv_timer_t *t) {
  (void)t;
}

/* Initialises loop with tick, a 5 ms timer that keeps uv_run(UV_RUN_ONCE) from blocking long. */
static inline void redis_loop_open(uv_loop_t *loop, uv_timer_t *tick) {
  uv_loop_init(loop);
  uv_timer_init(loop, tick);
  uv_timer_start(tick, redis_tick_cb, 5, 5);
}

/* Closes tick and runs the loop until every handle closed (free the clients
 * first): 0 when the loop closes clean. */
static inline int redis_loop_close(uv_loop_t *loop, uv_timer_t *tick) {
  uv_close((uv_handle_t *)tick, NULL);
  uv_run(loop, UV_RUN_DEFAULT);
  return uv_loop_close(loop);
}

/* Runs the loop until cond(arg); false when timeout_ms passed first. */
static inline bool redis_run_until(uv_loop_t *loop, bool (*cond)(void *), void *arg, int timeout_ms) {
  uint64_t end = uv_hrtime() + (uint64_t)timeout_ms * 1000000;
  while (!cond(arg)) {
    if (uv_hrtime() > end)
      return false;
    uv_run(loop, UV_RUN_ONCE);
  }
  return true;
}

#endif
