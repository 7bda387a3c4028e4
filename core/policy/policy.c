#include "policy/policy.h"
#include "base/hex.h"

#include <errno.h>
#include <jansson.h>
#include <mbedtls/sha256.h>
#include <mbedtls/version.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "base/log.h"
#include "base/utf8.h"
#include "policy/state.h"

#define DEFAULT_POLICY "default_policy.lua"

/* One tenant's policy as published: immutable, shared by the snapshots
 * that contain it (refcounted). */
typedef struct entry {
  atomic_int refs;
  char *tenant;
  char *path;                 /* NULL: the embedded default policy */
  char *source;               /* owned copy, or the embedded bytes (path NULL) */
  size_t len;
  char version[TG_POLICY_VERSION_LEN];
  double loaded_at;
} entry_t;

typedef struct snapshot {
  atomic_int refs;
  uint64_t generation;
  size_t n;
  entry_t **entries;          /* in configuration order */
} snapshot_t;

/* A tenant's last reload attempt, for /status. */
typedef struct attempt {
  bool done;
  tg_policy_reload_status_t status;
  double at;
  char version[TG_POLICY_VERSION_LEN];
  char error[TG_POLICY_MSG_LEN];
} attempt_t;

struct tg_policy_registry {
  tg_policy_options_t opt;
  char *gateway_version;
  pthread_mutex_t reload_lock; /* serializes reloads and dry runs (validation takes milliseconds) */
  pthread_mutex_t pub_lock;    /* held only to take a reference on `current` */
  snapshot_t *_Atomic current;
  atomic_uint_fast64_t generation;
  tg_policy_metrics_t m;
  pthread_mutex_t attempt_lock; /* attempts: written by reloads, read by tg_policy_info */
  attempt_t *attempts;          /* one per tenant, in configuration order (the set is fixed) */
};

/* A worker's view of one tenant: the state requests pin. */
typedef struct slot {
  entry_t *entry;             /* referenced: may be older than rt->snap's after a failed build */
  tg_policy_state_t *st;      /* NULL only when the first build failed */
} slot_t;

struct tg_policy_runtime {
  tg_policy_registry_t *r;
  snapshot_t *snap;           /* referenced */
  uint64_t generation;
  slot_t *slots;              /* parallel to snap->entries */
};

/* ---- Snapshots */

static void entry_unref(entry_t *e) {
  if (e == NULL || atomic_fetch_sub_explicit(&e->refs, 1, memory_order_acq_rel) != 1)
    return;
  free(e->tenant);
  free(e->path);
  if (e->path)
    free(e->source);
  free(e);
}

static void snapshot_unref(snapshot_t *s) {
  if (s == NULL || atomic_fetch_sub_explicit(&s->refs, 1, memory_order_acq_rel) != 1)
    return;
  for (size_t i = 0; i < s->n; i++)
    entry_unref(s->entries[i]);
  free(s->entries);
  free(s);
}

/* The published snapshot with a reference the caller drops. The mutex only
 * covers load + increment: without it a reload could free the snapshot in
 * between. Taken when the generation moved, never per request. */
static snapshot_t *snapshot_get(tg_policy_registry_t *r) {
  pthread_mutex_lock(&r->pub_lock);
  snapshot_t *s = atomic_load_explicit(&r->current, memory_order_acquire);
  atomic_fetch_add_explicit(&s->refs, 1, memory_order_relaxed);
  pthread_mutex_unlock(&r->pub_lock);
  return s;
}

static void publish(tg_policy_registry_t *r, snapshot_t *s) {
  pthread_mutex_lock(&r->pub_lock);
  snapshot_t *old = atomic_load_explicit(&r->current, memory_order_relaxed);
  atomic_store_explicit(&r->current, s, memory_order_release);
  atomic_store_explicit(&r->generation, s->generation, memory_order_release);
  pthread_mutex_unlock(&r->pub_lock);
  snapshot_unref(old);
  if (r->opt.on_publish)
    r->opt.on_publish(r->opt.on_publish_ud, s->generation);
}

/* ---- Sources and validation */

static void sha256_hex(const char *data, size_t len, char out[TG_POLICY_VERSION_LEN]) {
  unsigned char digest[32];
#if MBEDTLS_VERSION_NUMBER >= 0x03000000
  mbedtls_sha256((const unsigned char *)data, len, digest, 0);
#else
  mbedtls_sha256_ret((const unsigned char *)data, len, digest, 0);
#endif
  tg_hex_encode(digest, 32, out);
}

static int read_source(const char *path, char **out, size_t *len, char *err, size_t errlen) {
  FILE *f = fopen(path, "rb");
  char *buf = NULL;
  int rc;
  if (f == NULL) {
    rc = -errno;
    snprintf(err, errlen, "%s: cannot open: %s", path, strerror(errno));
    return rc;
  }
  struct stat sb;
  if (fstat(fileno(f), &sb) != 0) {
    rc = -errno;
    snprintf(err, errlen, "%s: cannot stat: %s", path, strerror(errno));
    goto fail;
  }
  if (!S_ISREG(sb.st_mode) || sb.st_size > (off_t)TG_POLICY_MAX_SOURCE) {
    rc = -EINVAL;
    snprintf(err, errlen, "%s: not a regular file of at most %u bytes", path,
             TG_POLICY_MAX_SOURCE);
    goto fail;
  }
  buf = malloc((size_t)sb.st_size + 1);
  if (buf == NULL) {
    rc = -ENOMEM;
    snprintf(err, errlen, "%s: out of memory", path);
    goto fail;
  }
  size_t n = fread(buf, 1, (size_t)sb.st_size + 1, f);
  if (ferror(f) || n > (size_t)sb.st_size) {
    rc = ferror(f) ? -EIO : -EAGAIN;
    snprintf(err, errlen, "%s: %s", path, ferror(f) ? "read error" : "file changed while read");
    goto fail;
  }
  fclose(f);
  buf[n] = '\0';
  *out = buf;
  *len = n;
  return 0;

fail:
  free(buf);
  fclose(f);
  return rc;
}

static void options_defaults(tg_policy_options_t *o, const tg_policy_options_t *in) {
  memset(o, 0, sizeof *o);
  if (in)
    *o = *in;
  if (o->time_limit_ms == 0)
    o->time_limit_ms = TG_POLICY_DEFAULT_TIME_LIMIT_MS;
  if (o->load_time_limit_ms == 0)
    o->load_time_limit_ms = TG_POLICY_DEFAULT_LOAD_TIME_LIMIT_MS;
  if (o->memory_limit == 0)
    o->memory_limit = TG_POLICY_DEFAULT_MEMORY_LIMIT;
}

static void chunkname_of(const char *path, char *out, size_t outlen) {
  snprintf(out, outlen, "@%s", path ? path : DEFAULT_POLICY);
}

static tg_pstate_cfg_t pstate_cfg(const tg_policy_options_t *o, const char *tenant,
                                  const char *chunkname, const char *src, size_t len,
                                  const char *version) {
  tg_pstate_cfg_t c = {
      .tenant = tenant,
      .chunkname = chunkname,
      .source = src,
      .len = len,
      .version = version,
      .gateway_version = o->version,
      .time_limit_ms = o->time_limit_ms,
      .load_time_limit_ms = o->load_time_limit_ms,
      .memory_limit = o->memory_limit,
  };
  return c;
}

static double wall_clock(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Compiles src, runs its top level and its fixtures in a throwaway state;
 * sum (may be NULL) gets what a valid one holds. */
static int validate(const tg_policy_options_t *o, const char *tenant, const char *path,
                    const char *src, size_t len, char *err, size_t errlen,
                    tg_policy_summary_t *sum) {
  char chunk[1100];
  chunkname_of(path, chunk, sizeof chunk);
  tg_pstate_cfg_t c = pstate_cfg(o, tenant, chunk, src, len, "");
  int code = 0;
  tg_policy_state_t *st = tg_pstate_new(&c, true, &code, err, errlen);
  if (st == NULL)
    return code == -ENOMEM ? -ENOMEM : -EINVAL;
  if (sum) {
    sha256_hex(src, len, sum->version);
    sum->fixtures = st->nfixtures;
    for (int h = 0; h < TG_POLICY_NHOOKS; h++)
      sum->hooks[h] = tg_policy_has_hook(st, (tg_policy_hook_t)h);
  }
  tg_pstate_free(st);
  return 0;
}

/* ---- Comparing two versions, in whichever process runs it */

const char *tg_policy_dry_status_name(tg_policy_dry_status_t status) {
  static const char *const names[] = {"unchanged", "valid", "invalid"};
  return (unsigned)status <= TG_POLICY_DRY_INVALID ? names[status] : "?";
}

/* Validates the candidate as a reload would, then compares it with live
 * (tg_pstate_compare). out->tenant and the versions are the caller's. */
static void compare_sources(const tg_policy_options_t *o, const char *tenant,
                            const char *live_path, const char *live_src, size_t live_len,
                            const char *cand_path, const char *cand_src, size_t cand_len,
                            tg_policy_comparison_t *out) {
  int rc = validate(o, tenant, cand_path, cand_src, cand_len, out->error, sizeof out->error, NULL);
  out->status = rc == 0 ? TG_POLICY_DRY_VALID : TG_POLICY_DRY_INVALID;
  char live_chunk[1100], cand_chunk[1100], why[TG_POLICY_MSG_LEN];
  chunkname_of(live_path, live_chunk, sizeof live_chunk);
  chunkname_of(cand_path, cand_chunk, sizeof cand_chunk);
  tg_pstate_cfg_t lc = pstate_cfg(o, tenant, live_chunk, live_src, live_len, "");
  tg_pstate_cfg_t cc = pstate_cfg(o, tenant, cand_chunk, cand_src, cand_len, "");
  json_t *report = NULL;
  if (tg_pstate_compare(&lc, &cc, &report, why, sizeof why) != 0) {
    /* A candidate that does not load fails both the same way: said once. */
    if (out->status == TG_POLICY_DRY_VALID || strcmp(why, out->error) != 0)
      snprintf(out->compare_error, sizeof out->compare_error, "%s", why);
    return;
  }
  out->compared = (size_t)json_integer_value(json_object_get(report, "compared"));
  out->differing = (size_t)json_integer_value(json_object_get(report, "differing"));
  out->differences = json_incref(json_object_get(report, "differences"));
  json_decref(report);
}

/* The comparison as JSON (what the validator process hands back), and back. */
static json_t *comparison_to_json(const tg_policy_comparison_t *c) {
  json_t *j = json_pack("{s:s, s:I, s:I, s:O*}", "status", tg_policy_dry_status_name(c->status),
                        "compared", (json_int_t)c->compared, "differing",
                        (json_int_t)c->differing, "differences", c->differences);
  if (j && c->error[0])
    json_object_set_new(j, "error", tg_utf8_json_string(c->error));
  if (j && c->compare_error[0])
    json_object_set_new(j, "compare_error", tg_utf8_json_string(c->compare_error));
  return j;
}

static int comparison_from_json(const char *text, size_t len, tg_policy_comparison_t *c) {
  json_t *j = json_loadb(text, len, JSON_ALLOW_NUL, NULL); /* a rate-limit key may hold NUL */
  const char *status = json_string_value(json_object_get(j, "status"));
  if (status == NULL) {
    json_decref(j);
    return -EINVAL;
  }
  c->status = strcmp(status, "valid") == 0 ? TG_POLICY_DRY_VALID : TG_POLICY_DRY_INVALID;
  c->compared = (size_t)json_integer_value(json_object_get(j, "compared"));
  c->differing = (size_t)json_integer_value(json_object_get(j, "differing"));
  json_t *d = json_object_get(j, "differences");
  c->differences = json_is_array(d) ? json_incref(d) : NULL;
  const char *e = json_string_value(json_object_get(j, "error"));
  const char *ce = json_string_value(json_object_get(j, "compare_error"));
  snprintf(c->error, sizeof c->error, "%s", e ? e : "");
  snprintf(c->compare_error, sizeof c->compare_error, "%s", ce ? ce : "");
  json_decref(j);
  return 0;
}

void tg_policy_comparisons_free(tg_policy_comparison_t *c, size_t n, bool owned) {
  if (c == NULL)
    return;
  for (size_t i = 0; i < n; i++) {
    json_decref(c[i].differences);
    c[i].differences = NULL;
  }
  if (owned)
    free(c);
}

/* ---- Validation in a child process. A policy that crashes LuaJIT (a bug we
 * do not know of yet) takes down the validator, not the gateway serving
 * every tenant: reloads run validate() in `exe policy-validate`, which gets
 * the source on fd 0 and writes its verdict to fd 3 (its stdout and stderr
 * stay the gateway's, for the log lines the policy writes). */

#define VALIDATOR_DEFAULT_TIMEOUT_MS 30000u
#define VALIDATOR_FD 3

static const char *validator_exe;
static uint32_t validator_timeout_ms;

void tg_policy_set_validator(const char *exe, uint32_t timeout_ms) {
  validator_exe = exe;
  validator_timeout_ms = timeout_ms ? timeout_ms : VALIDATOR_DEFAULT_TIMEOUT_MS;
}

static uint64_t mono_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static int write_all(int fd, const char *p, size_t len) {
  while (len > 0) {
    ssize_t n = write(fd, p, len);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      return -1;
    p += n;
    len -= (size_t)n;
  }
  return 0;
}

/* What became of a validator process. */
typedef struct verdict {
  int exit_status;            /* -1: did not exit by itself (crash, timeout, not started) */
  char *text;                 /* what it wrote on VALIDATOR_FD (malloc'd, NUL-terminated) */
  size_t len;
} verdict_t;

#define VERDICT_MAX (16u << 20)

static int new_memfd(const char *name, const char *data, size_t len) {
  int fd = memfd_create(name, MFD_CLOEXEC);
  if (fd >= 0 && (write_all(fd, data, len) != 0 || lseek(fd, 0, SEEK_SET) != 0)) {
    close(fd);
    fd = -1;
  }
  return fd;
}

/* Runs the validator on src, with live_src (may be NULL) to compare it
 * against (`--compare LIVE_PATH`, the live source on fd 4), and waits for it.
 * 0 when it exited (v filled), or -EINVAL/-ENOMEM with err: it could not
 * start, crashed or overran its time. */
static int run_validator(const tg_policy_options_t *o, const char *tenant, const char *path,
                         const char *src, size_t len, const char *live_path,
                         const char *live_src, size_t live_len, verdict_t *v, char *err,
                         size_t errlen) {
  int in = new_memfd("tollgate-policy-source", src, len);
  int live = live_src ? new_memfd("tollgate-policy-live", live_src, live_len) : -1;
  int out = memfd_create("tollgate-policy-verdict", MFD_CLOEXEC);
  int rc = -EINVAL;
  bool fa_ok = false, at_ok = false;
  posix_spawn_file_actions_t fa;
  posix_spawnattr_t at;
  v->exit_status = -1;
  v->text = NULL;
  v->len = 0;
  if (in < 0 || out < 0 || (live_src && live < 0)) {
    snprintf(err, errlen, "%s: cannot hand the policy to its validator: %s", path,
             strerror(errno));
    goto done;
  }
  char t_ms[16], l_ms[16], mem[24];
  snprintf(t_ms, sizeof t_ms, "%u", o->time_limit_ms);
  snprintf(l_ms, sizeof l_ms, "%u", o->load_time_limit_ms);
  snprintf(mem, sizeof mem, "%zu", o->memory_limit);
  char *argv[] = {(char *)validator_exe, "policy-validate", "--tenant", (char *)tenant,
                  "--path", (char *)path, "--time-limit-ms", t_ms, "--load-time-limit-ms",
                  l_ms, "--memory-limit", mem, "--version",
                  (char *)(o->version ? o->version : ""), live_src ? "--compare" : NULL,
                  (char *)live_path, NULL};
  fa_ok = posix_spawn_file_actions_init(&fa) == 0;
  at_ok = posix_spawnattr_init(&at) == 0;
  /* posix_spawn, not fork: the gateway has threads, and only this thread
   * would live on in a forked child until exec. Signals the gateway ignores
   * (SIGPIPE) or blocks would stay so across exec: reset both. */
  sigset_t none, dflt;
  sigemptyset(&none);
  sigemptyset(&dflt);
  sigaddset(&dflt, SIGPIPE);
  if (!fa_ok || !at_ok || posix_spawn_file_actions_adddup2(&fa, in, 0) != 0 ||
      posix_spawn_file_actions_adddup2(&fa, out, VALIDATOR_FD) != 0 ||
      (live >= 0 && posix_spawn_file_actions_adddup2(&fa, live, VALIDATOR_FD + 1) != 0) ||
      posix_spawn_file_actions_addclosefrom_np(&fa, VALIDATOR_FD + 2) != 0 ||
      posix_spawnattr_setsigmask(&at, &none) != 0 ||
      posix_spawnattr_setsigdefault(&at, &dflt) != 0 ||
      posix_spawnattr_setflags(&at, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF) != 0) {
    rc = -ENOMEM;
    snprintf(err, errlen, "%s: cannot start its validator: out of memory", path);
    goto done;
  }
  pid_t pid;
  int e = posix_spawn(&pid, validator_exe, &fa, &at, argv, environ);
  if (e != 0) {
    snprintf(err, errlen, "%s: cannot start its validator %s: %s", path, validator_exe,
             strerror(e));
    goto done;
  }
  /* Validation is bounded in the child already; this bounds the child. */
  uint64_t deadline = mono_ms() + validator_timeout_ms;
  int status = 0;
  bool killed = false;
  for (;;) {
    pid_t w = waitpid(pid, &status, WNOHANG);
    if (w == pid)
      break;
    if (w < 0 && errno != EINTR) {
      snprintf(err, errlen, "%s: lost its validator: %s", path, strerror(errno));
      goto done;
    }
    if (!killed && mono_ms() >= deadline) {
      kill(pid, SIGKILL);
      killed = true;
    }
    struct timespec nap = {0, 1000000};
    nanosleep(&nap, NULL);
  }
  if (killed) {
    snprintf(err, errlen, "%s: validation did not finish within %u ms", path,
             validator_timeout_ms);
  } else if (WIFSIGNALED(status)) {
    const char *name = sigabbrev_np(WTERMSIG(status));
    snprintf(err, errlen, "%s: the policy crashed its validation (signal %d, SIG%s)", path,
             WTERMSIG(status), name ? name : "?");
  } else {
    struct stat sb;
    size_t size = fstat(out, &sb) == 0 && sb.st_size > 0 ? (size_t)sb.st_size : 0;
    if (size > VERDICT_MAX)
      size = VERDICT_MAX;
    v->text = malloc(size + 1);
    if (v->text == NULL) {
      rc = -ENOMEM;
      snprintf(err, errlen, "%s: out of memory", path);
      goto done;
    }
    ssize_t n = size ? pread(out, v->text, size, 0) : 0;
    v->len = n > 0 ? (size_t)n : 0;
    v->text[v->len] = '\0';
    v->exit_status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    rc = 0;
  }

done:
  if (fa_ok)
    posix_spawn_file_actions_destroy(&fa);
  if (at_ok)
    posix_spawnattr_destroy(&at);
  if (in >= 0)
    close(in);
  if (live >= 0)
    close(live);
  if (out >= 0)
    close(out);
  return rc;
}

/* Runs the validator on src; 0, or -EINVAL/-ENOMEM with err "FILE...: reason". */
static int validate_in_child(const tg_policy_options_t *o, const char *tenant, const char *path,
                             const char *src, size_t len, char *err, size_t errlen) {
  verdict_t v;
  int rc = run_validator(o, tenant, path, src, len, NULL, NULL, 0, &v, err, errlen);
  if (rc != 0)
    return rc;
  if (v.exit_status == 0) {
    free(v.text);
    return 0;
  }
  while (v.len > 0 && (v.text[v.len - 1] == '\n' || v.text[v.len - 1] == '\0'))
    v.text[--v.len] = '\0';
  if (v.len > 0)
    snprintf(err, errlen, "%s", v.text);
  else
    snprintf(err, errlen, "%s: its validator failed (exit status %d)", path, v.exit_status);
  free(v.text);
  return v.exit_status == 3 ? -ENOMEM : -EINVAL;
}

/* compare_sources in the validator process: a crash or an overrun there
 * makes the candidate INVALID with that reason, as a reload would. */
static void compare_in_child(const tg_policy_options_t *o, const char *tenant, const char *path,
                             const char *live_src, size_t live_len, const char *src, size_t len,
                             tg_policy_comparison_t *out) {
  verdict_t v;
  if (run_validator(o, tenant, path, src, len, path, live_src, live_len, &v, out->error,
                    sizeof out->error) != 0) {
    out->status = TG_POLICY_DRY_INVALID;
    return;
  }
  if ((v.exit_status != 0 && v.exit_status != 1) ||
      comparison_from_json(v.text, v.len, out) != 0) {
    out->status = TG_POLICY_DRY_INVALID;
    snprintf(out->error, sizeof out->error, "%s: its validator failed (exit status %d)", path,
             v.exit_status);
  }
  free(v.text);
}

static int parse_u64(const char *s, uint64_t max, uint64_t *out) {
  char *end;
  errno = 0;
  unsigned long long v = strtoull(s, &end, 10);
  if (errno || end == s || *end || v > max)
    return -1;
  *out = v;
  return 0;
}

/* Reads all of fd, at most TG_POLICY_MAX_SOURCE bytes (one more: too long). */
static int read_fd(int fd, char **out, size_t *outlen) {
  char *buf = malloc(TG_POLICY_MAX_SOURCE + 1);
  size_t len = 0;
  if (buf == NULL)
    return -ENOMEM;
  for (;;) {
    ssize_t n = read(fd, buf + len, TG_POLICY_MAX_SOURCE + 1 - len);
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0) {
      free(buf);
      return -EIO;
    }
    if (n == 0 || (len += (size_t)n) > TG_POLICY_MAX_SOURCE)
      break;
  }
  *out = buf;
  *outlen = len;
  return 0;
}

int tg_policy_validator_main(int argc, char **argv) {
  tg_policy_options_t o = {0};
  const char *tenant = "", *path = NULL, *live_path = NULL;
  for (int i = 1; i + 1 < argc; i += 2) {
    uint64_t v = 0;
    const char *k = argv[i], *val = argv[i + 1];
    if (strcmp(k, "--tenant") == 0)
      tenant = val;
    else if (strcmp(k, "--path") == 0)
      path = val;
    else if (strcmp(k, "--compare") == 0)
      live_path = val;
    else if (strcmp(k, "--version") == 0)
      o.version = val;
    else if (strcmp(k, "--time-limit-ms") == 0 && parse_u64(val, UINT32_MAX, &v) == 0)
      o.time_limit_ms = (uint32_t)v;
    else if (strcmp(k, "--load-time-limit-ms") == 0 && parse_u64(val, UINT32_MAX, &v) == 0)
      o.load_time_limit_ms = (uint32_t)v;
    else if (strcmp(k, "--memory-limit") == 0 && parse_u64(val, SIZE_MAX, &v) == 0)
      o.memory_limit = (size_t)v;
    else
      return 2;
  }
  if (path == NULL || argc % 2 == 0)
    return 2;
  tg_policy_options_t opt;
  options_defaults(&opt, &o);
  char *src = NULL, *live = NULL;
  size_t len = 0, live_len = 0;
  int rc = read_fd(0, &src, &len);
  if (rc == 0 && live_path)
    rc = read_fd(VALIDATOR_FD + 1, &live, &live_len);
  if (rc != 0) {
    free(src);
    return rc == -ENOMEM ? 3 : 2;
  }
  char err[TG_POLICY_MSG_LEN];
  if (len > TG_POLICY_MAX_SOURCE || live_len > TG_POLICY_MAX_SOURCE) {
    rc = -EINVAL;
    snprintf(err, sizeof err, "%s: not a regular file of at most %u bytes", path,
             TG_POLICY_MAX_SOURCE);
  } else if (live_path) {
    /* A dry run: the verdict is the comparison, as JSON. */
    tg_policy_comparison_t c;
    memset(&c, 0, sizeof c);
    compare_sources(&opt, tenant, live_path, live, live_len, path, src, len, &c);
    json_t *j = comparison_to_json(&c);
    char *text = j ? json_dumps(j, JSON_COMPACT) : NULL;
    rc = text && write_all(VALIDATOR_FD, text, strlen(text)) == 0 ? 0 : -ENOMEM;
    free(text);
    json_decref(j);
    tg_policy_comparisons_free(&c, 1, false);
    free(src);
    free(live);
    return rc != 0 ? 3 : c.status == TG_POLICY_DRY_VALID ? 0 : 1;
  } else {
    rc = validate(&opt, tenant, path, src, len, err, sizeof err, NULL);
  }
  free(src);
  free(live);
  if (rc == 0)
    return 0;
  write_all(VALIDATOR_FD, err, strlen(err));
  return rc == -ENOMEM ? 3 : 1;
}

/* Reads (path NULL: the embedded default) and validates into a new entry;
 * isolated: in the validator process, when there is one. */
static int entry_load(const tg_policy_options_t *o, const char *tenant, const char *path,
                      bool isolated, entry_t **out, char *err, size_t errlen) {
  entry_t *e = calloc(1, sizeof *e);
  int rc = -ENOMEM;
  if (e == NULL)
    goto oom;
  atomic_init(&e->refs, 1);
  e->tenant = strdup(tenant);
  if (e->tenant == NULL)
    goto oom;
  if (path) {
    e->path = strdup(path);
    if (e->path == NULL)
      goto oom;
    rc = read_source(path, &e->source, &e->len, err, errlen);
    if (rc != 0)
      goto fail;
  } else {
    e->source = (char *)tg_policy_embedded(DEFAULT_POLICY, &e->len);
    if (e->source == NULL) {
      rc = -ENOENT;
      snprintf(err, errlen, "%s: not embedded in this build", DEFAULT_POLICY);
      goto fail;
    }
  }
  sha256_hex(e->source, e->len, e->version);
  if (isolated && validator_exe && path)
    rc = validate_in_child(o, tenant, path, e->source, e->len, err, errlen);
  else
    rc = validate(o, tenant, path, e->source, e->len, err, errlen, NULL);
  if (rc != 0)
    goto fail;
  e->loaded_at = wall_clock();
  *out = e;
  return 0;

oom:
  snprintf(err, errlen, "%s: out of memory", path ? path : DEFAULT_POLICY);
fail:
  entry_unref(e);
  return rc;
}

int tg_policy_check_file(const char *path, const char *tenant, const tg_policy_options_t *opt,
                         char *err, size_t errlen) {
  tg_policy_options_t o;
  options_defaults(&o, opt);
  entry_t *e = NULL;
  int rc = entry_load(&o, tenant ? tenant : "", path, false, &e, err, errlen);
  entry_unref(e);
  return rc;
}

int tg_policy_check_file_summary(const char *path, const char *tenant,
                                 const tg_policy_options_t *opt, tg_policy_summary_t *sum,
                                 char *err, size_t errlen) {
  tg_policy_options_t o;
  options_defaults(&o, opt);
  memset(sum, 0, sizeof *sum);
  char *src = NULL;
  size_t len = 0;
  int rc = 0;
  if (path) {
    rc = read_source(path, &src, &len, err, errlen);
  } else if ((src = (char *)tg_policy_embedded(DEFAULT_POLICY, &len)) == NULL) {
    snprintf(err, errlen, "%s: not embedded in this build", DEFAULT_POLICY);
    rc = -ENOENT;
  }
  if (rc == 0)
    rc = validate(&o, tenant ? tenant : "", path, src, len, err, errlen, sum);
  if (path)
    free(src);
  return rc;
}

int tg_policy_check_config(const tg_config_t *cfg, const tg_policy_options_t *opt, char *err,
                           size_t errlen) {
  for (size_t i = 0; i < cfg->ntenants; i++) {
    int rc = tg_policy_check_file(cfg->tenants[i].policy_file, cfg->tenants[i].name, opt, err,
                                  errlen);
    if (rc != 0)
      return rc;
  }
  return 0;
}

/* ---- Registry */

/* A version as shown to people (logs, answers, metric labels). */
typedef struct {
  char s[TG_POLICY_VERSION_SHOWN + 1];
} shown_t;

static shown_t shown(const char *version) {
  shown_t v;
  snprintf(v.s, sizeof v.s, "%.*s", TG_POLICY_VERSION_SHOWN, version);
  return v;
}

/* policy_version_info holds one series per tenant, its active version. */
static void version_gauge(tg_policy_registry_t *r, const entry_t *e, bool active) {
  shown_t v = shown(e->version);
  const char *labels[] = {e->tenant, v.s};
  if (active)
    tg_gauge_set(r->m.version_info, labels, 1);
  else
    tg_gauge_remove(r->m.version_info, labels);
}

int tg_policy_registry_new(const tg_config_t *cfg, const tg_policy_options_t *opt,
                           tg_policy_registry_t **out, char *err, size_t errlen) {
  *out = NULL;
  tg_policy_registry_t *r = calloc(1, sizeof *r);
  snapshot_t *s = NULL;
  int rc = -ENOMEM;
  if (r == NULL)
    goto oom;
  options_defaults(&r->opt, opt);
  r->gateway_version = strdup(r->opt.version ? r->opt.version : "");
  if (r->gateway_version == NULL)
    goto oom;
  r->opt.version = r->gateway_version;
  r->attempts = calloc(cfg->ntenants ? cfg->ntenants : 1, sizeof *r->attempts);
  if (r->attempts == NULL)
    goto oom;
  pthread_mutex_init(&r->reload_lock, NULL);
  pthread_mutex_init(&r->pub_lock, NULL);
  pthread_mutex_init(&r->attempt_lock, NULL);
  tg_policy_metrics_get(&r->m);

  s = calloc(1, sizeof *s);
  if (s == NULL)
    goto oom;
  atomic_init(&s->refs, 1);
  s->generation = 1;
  s->entries = calloc(cfg->ntenants ? cfg->ntenants : 1, sizeof *s->entries);
  if (s->entries == NULL)
    goto oom;
  for (size_t i = 0; i < cfg->ntenants; i++) {
    const tg_config_tenant_t *t = &cfg->tenants[i];
    rc = entry_load(&r->opt, t->name, t->policy_file, false, &s->entries[i], err, errlen);
    if (rc != 0)
      goto fail;
    s->n++;
  }
  for (size_t i = 0; i < s->n; i++)
    version_gauge(r, s->entries[i], true);
  atomic_init(&r->current, s);
  atomic_init(&r->generation, s->generation);
  *out = r;
  return 0;

oom:
  snprintf(err, errlen, "policy registry: out of memory");
fail:
  snapshot_unref(s);
  if (r) {
    if (r->attempts) {
      pthread_mutex_destroy(&r->reload_lock);
      pthread_mutex_destroy(&r->pub_lock);
      pthread_mutex_destroy(&r->attempt_lock);
    }
    free(r->attempts);
    free(r->gateway_version);
    free(r);
  }
  return rc;
}

void tg_policy_registry_free(tg_policy_registry_t *r) {
  if (r == NULL)
    return;
  snapshot_unref(atomic_load(&r->current));
  pthread_mutex_destroy(&r->reload_lock);
  pthread_mutex_destroy(&r->pub_lock);
  pthread_mutex_destroy(&r->attempt_lock);
  free(r->attempts);
  free(r->gateway_version);
  free(r);
}

uint64_t tg_policy_generation(tg_policy_registry_t *r) {
  return atomic_load_explicit(&r->generation, memory_order_acquire);
}

static const entry_t *find_entry(const snapshot_t *s, const char *tenant, size_t *idx) {
  for (size_t i = 0; i < s->n; i++) {
    if (strcmp(s->entries[i]->tenant, tenant) == 0) {
      if (idx)
        *idx = i;
      return s->entries[i];
    }
  }
  return NULL;
}

int tg_policy_version(tg_policy_registry_t *r, const char *tenant,
                      char out[TG_POLICY_VERSION_LEN]) {
  snapshot_t *s = snapshot_get(r);
  const entry_t *e = find_entry(s, tenant, NULL);
  if (e)
    memcpy(out, e->version, TG_POLICY_VERSION_LEN);
  snapshot_unref(s);
  return e ? 0 : -ENOENT;
}

size_t tg_policy_count(tg_policy_registry_t *r) {
  snapshot_t *s = snapshot_get(r);
  size_t n = s->n;
  snapshot_unref(s);
  return n;
}

int tg_policy_info(tg_policy_registry_t *r, size_t i, tg_policy_info_t *out) {
  snapshot_t *s = snapshot_get(r);
  int rc = -ENOENT;
  if (i < s->n) {
    const entry_t *e = s->entries[i];
    snprintf(out->tenant, sizeof out->tenant, "%s", e->tenant);
    snprintf(out->path, sizeof out->path, "%s", e->path ? e->path : "");
    memcpy(out->version, e->version, TG_POLICY_VERSION_LEN);
    out->loaded_at = e->loaded_at;
    pthread_mutex_lock(&r->attempt_lock);
    const attempt_t *a = &r->attempts[i];
    out->reloaded = a->done;
    out->last_status = a->status;
    out->last_at = a->at;
    memcpy(out->last_version, a->version, sizeof out->last_version);
    memcpy(out->last_error, a->error, sizeof out->last_error);
    pthread_mutex_unlock(&r->attempt_lock);
    rc = 0;
  }
  snapshot_unref(s);
  return rc;
}

int tg_policy_file_state(tg_policy_registry_t *r, size_t i, bool *differs,
                         char version[TG_POLICY_VERSION_LEN], char *err, size_t errlen) {
  snapshot_t *s = snapshot_get(r);
  int rc = -ENOENT;
  if (errlen)
    err[0] = '\0';
  if (i < s->n) {
    const entry_t *e = s->entries[i];
    char *src = NULL;
    size_t len = 0;
    rc = 0;
    if (e->path == NULL) {
      memcpy(version, e->version, TG_POLICY_VERSION_LEN);
      *differs = false;
    } else if (read_source(e->path, &src, &len, err, errlen) == 0) {
      sha256_hex(src, len, version);
      free(src);
      *differs = strcmp(version, e->version) != 0;
    } else {
      version[0] = '\0';
      *differs = true;
    }
  }
  snapshot_unref(s);
  return rc;
}

/* The attempt of tenant i that res reports; file_version: what was read. */
static void record_attempt(tg_policy_registry_t *r, size_t i, const tg_policy_reload_result_t *res,
                           const char *file_version) {
  pthread_mutex_lock(&r->attempt_lock);
  attempt_t *a = &r->attempts[i];
  a->done = true;
  a->status = res->status;
  a->at = wall_clock();
  snprintf(a->version, sizeof a->version, "%s", file_version);
  snprintf(a->error, sizeof a->error, "%s",
           res->status == TG_POLICY_RELOAD_FAILED ? res->error : "");
  pthread_mutex_unlock(&r->attempt_lock);
}

static void count_reload(tg_policy_registry_t *r, const char *tenant, bool ok) {
  const char *labels[] = {tenant, ok ? "ok" : "error"};
  tg_counter_add(r->m.reloads, labels, 1);
  if (!ok) {
    const char *l2[] = {tenant};
    tg_counter_add(r->m.reload_errors, l2, 1);
  }
}

/* Re-reads and validates tenant i; *fresh is a new entry when it changed. */
static void reload_one(tg_policy_registry_t *r, size_t i, const entry_t *cur, entry_t **fresh,
                       tg_policy_reload_result_t *res) {
  memset(res, 0, sizeof *res);
  snprintf(res->tenant, sizeof res->tenant, "%s", cur->tenant);
  memcpy(res->version, cur->version, TG_POLICY_VERSION_LEN);
  *fresh = NULL;
  if (cur->path == NULL) {
    res->status = TG_POLICY_RELOAD_UNCHANGED; /* the embedded default never changes */
    record_attempt(r, i, res, cur->version);
    return;
  }
  char *src = NULL;
  size_t len = 0;
  char refused[TG_POLICY_VERSION_LEN] = "";
  if (read_source(cur->path, &src, &len, res->error, sizeof res->error) == 0) {
    char version[TG_POLICY_VERSION_LEN];
    sha256_hex(src, len, version);
    free(src);
    if (strcmp(version, cur->version) == 0) {
      res->status = TG_POLICY_RELOAD_UNCHANGED;
      record_attempt(r, i, res, version);
      return;
    }
    memcpy(refused, version, sizeof refused);
    /* Read again inside entry_load: simpler than handing the buffer over,
     * and a file replaced in between is validated as it is now. */
    if (entry_load(&r->opt, cur->tenant, cur->path, true, fresh, res->error,
                   sizeof res->error) == 0) {
      res->status = TG_POLICY_RELOAD_UPDATED;
      memcpy(res->version, (*fresh)->version, TG_POLICY_VERSION_LEN);
      record_attempt(r, i, res, (*fresh)->version);
      count_reload(r, cur->tenant, true);
      /* The one log line of a reload (whatever asked for it); versions are
       * shown by their first TG_POLICY_VERSION_SHOWN characters everywhere. */
      tg_log(TG_LOG_INFO, "policy reloaded", "tenant_id", cur->tenant, "path", cur->path, "version",
             shown((*fresh)->version).s, "previous", shown(cur->version).s, NULL);
      return;
    }
  }
  res->status = TG_POLICY_RELOAD_FAILED;
  record_attempt(r, i, res, refused);
  count_reload(r, cur->tenant, false);
  /* Name what was refused (when it could be read), and what stays. */
  tg_log(TG_LOG_ERROR, "policy reload refused", "tenant_id", cur->tenant, "path", cur->path,
         "version", refused[0] ? shown(refused).s : "unreadable", "active", shown(cur->version).s,
         "reason", res->error, NULL);
}

int tg_policy_reload(tg_policy_registry_t *r, const char *tenant,
                     tg_policy_reload_result_t **results, size_t *nresults) {
  if (results)
    *results = NULL;
  if (nresults)
    *nresults = 0;
  pthread_mutex_lock(&r->reload_lock);
  snapshot_t *cur = snapshot_get(r);
  snapshot_t *next = NULL;
  entry_t **fresh = calloc(cur->n ? cur->n : 1, sizeof *fresh);
  tg_policy_reload_result_t *res = calloc(cur->n ? cur->n : 1, sizeof *res);
  size_t nres = 0, updated = 0;
  bool failed = false;
  int rc = -ENOMEM;
  if (fresh == NULL || res == NULL)
    goto done;
  size_t only = 0;
  if (tenant && find_entry(cur, tenant, &only) == NULL) {
    rc = -ENOENT;
    goto done;
  }
  for (size_t i = 0; i < cur->n; i++) {
    if (tenant && i != only)
      continue;
    reload_one(r, i, cur->entries[i], &fresh[i], &res[nres]);
    failed |= res[nres].status == TG_POLICY_RELOAD_FAILED;
    updated += fresh[i] != NULL;
    nres++;
  }
  if (updated) {
    next = calloc(1, sizeof *next);
    if (next == NULL || (next->entries = calloc(cur->n, sizeof *next->entries)) == NULL)
      goto done;
    atomic_init(&next->refs, 1);
    next->generation = cur->generation + 1;
    next->n = cur->n;
    for (size_t i = 0; i < cur->n; i++) {
      if (fresh[i]) {
        next->entries[i] = fresh[i];
        fresh[i] = NULL;
        version_gauge(r, cur->entries[i], false);
        version_gauge(r, next->entries[i], true);
      } else {
        next->entries[i] = cur->entries[i];
        atomic_fetch_add_explicit(&next->entries[i]->refs, 1, memory_order_relaxed);
      }
    }
    publish(r, next);
    next = NULL;
  }
  rc = failed ? -EINVAL : 0;
  if (results) {
    *results = res;
    res = NULL;
  }
  if (nresults)
    *nresults = nres;

done:
  if (next) {
    free(next->entries);
    free(next);
  }
  if (fresh)
    for (size_t i = 0; i < cur->n; i++)
      entry_unref(fresh[i]);
  free(fresh);
  free(res);
  snapshot_unref(cur);
  pthread_mutex_unlock(&r->reload_lock);
  return rc;
}

/* ---- Dry runs */

static void fill_versions(tg_policy_comparison_t *c, const char *tenant, const char *live,
                          const char *cand) {
  snprintf(c->tenant, sizeof c->tenant, "%s", tenant ? tenant : "");
  snprintf(c->live_version, sizeof c->live_version, "%s", live);
  snprintf(c->candidate_version, sizeof c->candidate_version, "%s", cand);
}

int tg_policy_compare_files(const char *live_path, const char *cand_path, const char *tenant,
                            const tg_policy_options_t *opt, tg_policy_comparison_t *out) {
  tg_policy_options_t o;
  options_defaults(&o, opt);
  memset(out, 0, sizeof *out);
  char *live = NULL, *cand = NULL;
  size_t live_len = 0, cand_len = 0;
  char live_v[TG_POLICY_VERSION_LEN] = "", cand_v[TG_POLICY_VERSION_LEN] = "";
  int rc = read_source(live_path, &live, &live_len, out->error, sizeof out->error);
  if (rc != 0)
    return rc;
  sha256_hex(live, live_len, live_v);
  /* The live side only has to load: its fixtures are what it was published with. */
  char chunk[1100];
  chunkname_of(live_path, chunk, sizeof chunk);
  tg_pstate_cfg_t lc = pstate_cfg(&o, tenant, chunk, live, live_len, live_v);
  int code = 0;
  tg_policy_state_t *st = tg_pstate_new(&lc, false, &code, out->error, sizeof out->error);
  if (st == NULL) {
    free(live);
    return code == -ENOMEM ? -ENOMEM : -EINVAL;
  }
  tg_pstate_free(st);
  if (read_source(cand_path, &cand, &cand_len, out->error, sizeof out->error) != 0) {
    out->status = TG_POLICY_DRY_INVALID;
  } else {
    sha256_hex(cand, cand_len, cand_v);
    if (strcmp(live_v, cand_v) == 0)
      out->status = TG_POLICY_DRY_UNCHANGED;
    else
      compare_sources(&o, tenant ? tenant : "", live_path, live, live_len, cand_path, cand,
                      cand_len, out);
  }
  fill_versions(out, tenant, live_v, cand_v);
  free(live);
  free(cand);
  return 0;
}

static void dry_run_one(tg_policy_registry_t *r, const entry_t *cur,
                        tg_policy_comparison_t *out) {
  memset(out, 0, sizeof *out);
  char cand_v[TG_POLICY_VERSION_LEN] = "";
  char *src = NULL;
  size_t len = 0;
  if (cur->path == NULL) {
    out->status = TG_POLICY_DRY_UNCHANGED; /* the embedded default never changes */
    memcpy(cand_v, cur->version, sizeof cand_v);
  } else if (read_source(cur->path, &src, &len, out->error, sizeof out->error) != 0) {
    out->status = TG_POLICY_DRY_INVALID;
  } else {
    sha256_hex(src, len, cand_v);
    if (strcmp(cand_v, cur->version) == 0)
      out->status = TG_POLICY_DRY_UNCHANGED;
    else if (validator_exe)
      compare_in_child(&r->opt, cur->tenant, cur->path, cur->source, cur->len, src, len, out);
    else
      compare_sources(&r->opt, cur->tenant, cur->path, cur->source, cur->len, cur->path, src,
                      len, out);
    free(src);
  }
  fill_versions(out, cur->tenant, cur->version, cand_v);
  const char *result = tg_policy_dry_status_name(out->status);
  const char *labels[] = {cur->tenant, result};
  tg_counter_add(r->m.dry_runs, labels, 1);
  char differing[24];
  snprintf(differing, sizeof differing, "%zu", out->differing);
  tg_log(TG_LOG_INFO, "policy dry run", "tenant_id", cur->tenant, "path", cur->path, "result",
         result, "version", cand_v[0] ? shown(cand_v).s : "unreadable", "active",
         shown(cur->version).s, "differing", differing, "reason",
         out->error[0] ? out->error : out->compare_error[0] ? out->compare_error : NULL, NULL);
}

int tg_policy_dry_run(tg_policy_registry_t *r, const char *tenant,
                      tg_policy_comparison_t **out, size_t *n) {
  *out = NULL;
  *n = 0;
  pthread_mutex_lock(&r->reload_lock);
  snapshot_t *cur = snapshot_get(r);
  int rc = -ENOMEM;
  size_t only = 0, k = 0;
  tg_policy_comparison_t *res = calloc(cur->n ? cur->n : 1, sizeof *res);
  if (res == NULL)
    goto done;
  if (tenant && find_entry(cur, tenant, &only) == NULL) {
    rc = -ENOENT;
    free(res);
    goto done;
  }
  rc = 0;
  for (size_t i = 0; i < cur->n; i++) {
    if (tenant && i != only)
      continue;
    dry_run_one(r, cur->entries[i], &res[k]);
    if (res[k].status == TG_POLICY_DRY_INVALID)
      rc = -EINVAL;
    k++;
  }
  *out = res;
  *n = k;

done:
  snapshot_unref(cur);
  pthread_mutex_unlock(&r->reload_lock);
  return rc;
}

/* ---- Runtime (worker thread) */

static tg_policy_state_t *build_state(tg_policy_runtime_t *rt, const entry_t *e, char *err,
                                      size_t errlen) {
  char chunk[1100];
  chunkname_of(e->path, chunk, sizeof chunk);
  tg_pstate_cfg_t c = pstate_cfg(&rt->r->opt, e->tenant, chunk, e->source, e->len, e->version);
  int code = 0;
  tg_policy_state_t *st = tg_pstate_new(&c, false, &code, err, errlen);
  if (st)
    st->refs = 1; /* the slot's */
  return st;
}

static void state_unref(tg_policy_state_t *st) {
  if (st && --st->refs == 0)
    tg_pstate_free(st);
}

static void slots_free(slot_t *slots, size_t n) {
  for (size_t i = 0; i < n; i++) {
    state_unref(slots[i].st);
    entry_unref(slots[i].entry);
  }
  free(slots);
}

/* Moves the runtime to snapshot s (referenced by the caller, owned after):
 * tenants whose version changed get a new state, the others keep theirs. */
static int runtime_adopt(tg_policy_runtime_t *rt, snapshot_t *s, char *err, size_t errlen) {
  slot_t *slots = calloc(s->n ? s->n : 1, sizeof *slots);
  if (slots == NULL) {
    snapshot_unref(s);
    snprintf(err, errlen, "policy runtime: out of memory");
    return -ENOMEM;
  }
  int rebuilt = 0, rc = 0;
  for (size_t i = 0; i < s->n; i++) {
    entry_t *e = s->entries[i];
    size_t j;
    const slot_t *old = NULL;
    if (rt->snap && find_entry(rt->snap, e->tenant, &j))
      old = &rt->slots[j];
    tg_policy_state_t *st = NULL;
    if (old && old->st && strcmp(old->entry->version, e->version) == 0) {
      st = old->st;
      st->refs++;
    } else {
      char why[TG_POLICY_MSG_LEN];
      st = build_state(rt, e, why, sizeof why);
      if (st) {
        rebuilt++;
      } else {
        /* Validation passed on the reloading thread, so this is memory or
         * time on this worker: keep serving the previous version. */
        tg_log(TG_LOG_ERROR, "policy state build failed on a worker", "tenant_id", e->tenant,
               "reason", why, NULL);
        snprintf(err, errlen, "%s", why);
        rc = -EINVAL;
        if (old && old->st) {
          e = old->entry;
          st = old->st;
          st->refs++;
        }
      }
    }
    atomic_fetch_add_explicit(&e->refs, 1, memory_order_relaxed);
    slots[i].entry = e;
    slots[i].st = st;
  }
  if (rt->snap) {
    slots_free(rt->slots, rt->snap->n); /* pinned states live on until released */
    snapshot_unref(rt->snap);
  }
  rt->slots = slots;
  rt->snap = s;
  rt->generation = s->generation;
  return rc < 0 ? rc : rebuilt;
}

tg_policy_runtime_t *tg_policy_runtime_new(tg_policy_registry_t *r, char *err, size_t errlen) {
  tg_policy_runtime_t *rt = calloc(1, sizeof *rt);
  if (rt == NULL) {
    snprintf(err, errlen, "policy runtime: out of memory");
    return NULL;
  }
  rt->r = r;
  int rc = runtime_adopt(rt, snapshot_get(r), err, errlen);
  if (rc < 0) {
    tg_policy_runtime_free(rt);
    return NULL;
  }
  return rt;
}

void tg_policy_runtime_free(tg_policy_runtime_t *rt) {
  if (rt == NULL)
    return;
  if (rt->snap) {
    slots_free(rt->slots, rt->snap->n);
    snapshot_unref(rt->snap);
  }
  free(rt);
}

int tg_policy_runtime_sync(tg_policy_runtime_t *rt) {
  if (atomic_load_explicit(&rt->r->generation, memory_order_acquire) == rt->generation)
    return 0;
  char err[TG_POLICY_MSG_LEN];
  return runtime_adopt(rt, snapshot_get(rt->r), err, sizeof err);
}

tg_policy_state_t *tg_policy_acquire(tg_policy_runtime_t *rt, const char *tenant) {
  if (atomic_load_explicit(&rt->r->generation, memory_order_acquire) != rt->generation)
    tg_policy_runtime_sync(rt);
  size_t i;
  if (find_entry(rt->snap, tenant, &i) == NULL)
    return NULL;
  slot_t *sl = &rt->slots[i];
  if (sl->st && sl->st->suspect) {
    /* Memory stayed near the cap after a collection: start afresh. */
    char why[TG_POLICY_MSG_LEN];
    tg_policy_state_t *st = build_state(rt, sl->entry, why, sizeof why);
    if (st) {
      state_unref(sl->st);
      sl->st = st;
    } else {
      tg_log(TG_LOG_ERROR, "policy state rebuild failed", "tenant_id", tenant, "reason", why,
             NULL);
    }
  }
  if (sl->st == NULL)
    return NULL;
  sl->st->refs++;
  return sl->st;
}

void tg_policy_release(tg_policy_state_t *st) {
  state_unref(st);
}
