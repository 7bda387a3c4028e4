#ifndef TG_TEST_CHILD_H
#define TG_TEST_CHILD_H

/* A fixture process for unit tests (the node servers in spec/core/fixtures):
 * started with its stdin and stdout on pipes, so the test can read the line
 * it prints once listening and send it commands; it exits when its stdin
 * closes, so a crashed test leaves nothing running. */

#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

typedef struct child {
  pid_t pid;
  int in;  /* its stdin, written by the test; -1 when closed */
  int out; /* its stdout, read by the test; -1 when closed */
} child_t;

/* Starts argv[0] (looked up in PATH). Returns 0, or -1 with c unchanged. */
static int child_start(child_t *c, char *const argv[]) {
  int in[2], out[2];
  if (pipe(in) != 0)
    return -1;
  if (pipe(out) != 0) {
    close(in[0]);
    close(in[1]);
    return -1;
  }
  pid_t pid = fork();
  if (pid < 0)
    return -1;
  if (pid == 0) {
    dup2(in[0], 0);
    dup2(out[1], 1);
    close(in[0]);
    close(in[1]);
    close(out[0]);
    close(out[1]);
    execvp(argv[0], argv);
    _exit(127);
  }
  close(in[0]);
  close(out[1]);
  c->pid = pid;
  c->in = in[1];
  c->out = out[0];
  return 0;
}

/* Reads one line (without its newline) byte by byte, so whatever follows
 * stays unread. 0, or -1 on timeout, EOF or a line longer than cap - 1. */
static int child_read_line(child_t *c, char *line, size_t cap, int timeout_ms) {
  size_t len = 0;
  line[0] = '\0';
  struct pollfd pfd = {.fd = c->out, .events = POLLIN};
  while (len < cap - 1) {
    if (poll(&pfd, 1, timeout_ms) <= 0)
      return -1;
    ssize_t n = read(c->out, line + len, 1);
    if (n <= 0)
      return -1;
    if (line[len] == '\n') {
      line[len] = '\0';
      return 0;
    }
    line[++len] = '\0';
  }
  return -1;
}

/* Closes the pipes, then SIGTERM and reaps it. Safe to call twice. */
static void child_stop(child_t *c) {
  if (c->in >= 0)
    close(c->in);
  if (c->out >= 0)
    close(c->out);
  c->in = c->out = -1;
  if (c->pid > 0) {
    kill(c->pid, SIGTERM);
    waitpid(c->pid, NULL, 0);
    c->pid = 0;
  }
}

#endif
