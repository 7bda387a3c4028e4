#include "policy/policy.h"
#include "base/hex.h"

#include <errno.h>
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

struct tg_policy_registry {
  tg_policy_options_t opt;
  char *gateway_version;
  pthread_mutex_t reload_lock; /* serializes reloads (validation takes milliseconds) */
  pthread_mutex_t pub_lock;    /* held only to take a reference on `current` */
  snapshot_t *_Atomic current;
  atomic_uint_fast64_t generation;
  tg_policy_metrics_t m;
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

/* Compiles src, runs its top level and its fixtures in a throwaway state. */
static int validate(const tg_policy_options_t *o, const char *tenant, const char *path,
                    const char *src, size_t len, char *err, size_t errlen) {
  char chunk[1100];
  chunkname_of(path, chunk, sizeof chunk);
  tg_pstate_cfg_t c = pstate_cfg(o, tenant, chunk, src, len, "");
  int code = 0;
  tg_policy_state_t *st = tg_pstate_new(&c, true, &code, err, errlen);
  if (st == NULL)
    return code == -ENOMEM ? -ENOMEM : -EINVAL;
  tg_pstate_free(st);
  return 0;
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

/* Runs the validator on src; 0, or -EINVAL/-ENOMEM with err "FILE...: reason". */
static int validate_in_child(const tg_policy_options_t *o, const char *tenant, const char *path,
                             const char *src, size_t len, char *err, size_t errlen) {
  int in = memfd_create("tollgate-policy-source", MFD_CLOEXEC);
  int out = memfd_create("tollgate-policy-verdict", MFD_CLOEXEC);
  int rc = -EINVAL;
  bool fa_ok = false, at_ok = false;
  posix_spawn_file_actions_t fa;
  posix_spawnattr_t at;
  if (in < 0 || out < 0 || write_all(in, src, len) != 0 || lseek(in, 0, SEEK_SET) != 0) {
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
                  (char *)(o->version ? o->version : ""), NULL};
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
      posix_spawn_file_actions_addclosefrom_np(&fa, VALIDATOR_FD + 1) != 0 ||
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
  } else if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
    rc = 0;
  } else {
    char verdict[TG_POLICY_MSG_LEN];
    ssize_t n = pread(out, verdict, sizeof verdict - 1, 0);
    while (n > 0 && (verdict[n - 1] == '\n' || verdict[n - 1] == '\0'))
      n--;
    verdict[n > 0 ? n : 0] = '\0';
    if (n > 0)
      snprintf(err, errlen, "%s", verdict);
    else
      snprintf(err, errlen, "%s: its validator failed (exit status %d)", path,
               WIFEXITED(status) ? WEXITSTATUS(status) : -1);
    if (WIFEXITED(status) && WEXITSTATUS(status) == 3)
      rc = -ENOMEM;
  }

done:
  if (fa_ok)
    posix_spawn_file_actions_destroy(&fa);
  if (at_ok)
    posix_spawnattr_destroy(&at);
  if (in >= 0)
    close(in);
  if (out >= 0)
    close(out);
  return rc;
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

int tg_policy_validator_main(int argc, char **argv) {
  tg_policy_options_t o = {0};
  const char *tenant = "", *path = NULL;
  for (int i = 1; i + 1 < argc; i += 2) {
    uint64_t v = 0;
    const char *k = argv[i], *val = argv[i + 1];
    if (strcmp(k, "--tenant") == 0)
      tenant = val;
    else if (strcmp(k, "--path") == 0)
      path = val;
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
  char *src = malloc(TG_POLICY_MAX_SOURCE + 1);
  size_t len = 0;
  if (src == NULL)
    return 3;
  for (;;) {
    ssize_t n = read(0, src + len, TG_POLICY_MAX_SOURCE + 1 - len);
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0) {
      free(src);
      return 2;
    }
    if (n == 0 || (len += (size_t)n) > TG_POLICY_MAX_SOURCE)
      break;
  }
  char err[TG_POLICY_MSG_LEN];
  int rc = len > TG_POLICY_MAX_SOURCE ? -EINVAL : 0;
  if (rc != 0)
    snprintf(err, sizeof err, "%s: not a regular file of at most %u bytes", path,
             TG_POLICY_MAX_SOURCE);
  else
    rc = validate(&opt, tenant, path, src, len, err, sizeof err);
  free(src);
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
    rc = validate(o, tenant, path, e->source, e->len, err, errlen);
  if (rc != 0)
    goto fail;
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  e->loaded_at = (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
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

static void version_gauge(tg_policy_registry_t *r, const entry_t *e, double v) {
  const char *labels[] = {e->tenant, shown(e->version).s};
  tg_gauge_set(r->m.version_info, labels, v);
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
  pthread_mutex_init(&r->reload_lock, NULL);
  pthread_mutex_init(&r->pub_lock, NULL);
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
    version_gauge(r, s->entries[i], 1);
  atomic_init(&r->current, s);
  atomic_init(&r->generation, s->generation);
  *out = r;
  return 0;

oom:
  snprintf(err, errlen, "policy registry: out of memory");
fail:
  snapshot_unref(s);
  if (r) {
    if (r->gateway_version) {
      pthread_mutex_destroy(&r->reload_lock);
      pthread_mutex_destroy(&r->pub_lock);
    }
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
    rc = 0;
  }
  snapshot_unref(s);
  return rc;
}

static void count_reload(tg_policy_registry_t *r, const char *tenant, bool ok) {
  const char *labels[] = {tenant, ok ? "ok" : "error"};
  tg_counter_add(r->m.reloads, labels, 1);
  if (!ok) {
    const char *l2[] = {tenant};
    tg_counter_add(r->m.reload_errors, l2, 1);
  }
}

/* Re-reads and validates one tenant; *fresh is a new entry when it changed. */
static void reload_one(tg_policy_registry_t *r, const entry_t *cur, entry_t **fresh,
                       tg_policy_reload_result_t *res) {
  memset(res, 0, sizeof *res);
  snprintf(res->tenant, sizeof res->tenant, "%s", cur->tenant);
  memcpy(res->version, cur->version, TG_POLICY_VERSION_LEN);
  *fresh = NULL;
  if (cur->path == NULL) {
    res->status = TG_POLICY_RELOAD_UNCHANGED; /* the embedded default never changes */
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
      return;
    }
    memcpy(refused, version, sizeof refused);
    /* Read again inside entry_load: simpler than handing the buffer over,
     * and a file replaced in between is validated as it is now. */
    if (entry_load(&r->opt, cur->tenant, cur->path, true, fresh, res->error,
                   sizeof res->error) == 0) {
      res->status = TG_POLICY_RELOAD_UPDATED;
      memcpy(res->version, (*fresh)->version, TG_POLICY_VERSION_LEN);
      count_reload(r, cur->tenant, true);
      /* The one log line of a reload (whatever asked for it); versions are
       * shown by their first TG_POLICY_VERSION_SHOWN characters everywhere. */
      tg_log(TG_LOG_INFO, "policy reloaded", "tenant_id", cur->tenant, "path", cur->path, "version",
             shown((*fresh)->version).s, "previous", shown(cur->version).s, NULL);
      return;
    }
  }
  res->status = TG_POLICY_RELOAD_FAILED;
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
    reload_one(r, cur->entries[i], &fresh[i], &res[nres]);
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
        version_gauge(r, cur->entries[i], 0);
        version_gauge(r, next->entries[i], 1);
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
