#include "policy/tools.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <signal.h>
#include <spawn.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "policy/policy.h"

#define CELL_MAX 60 /* characters of a table cell; longer ones are cut with "..." */

static void usage(FILE *f) {
  fprintf(f, "usage: tollgate policy test FILE [--spec DIR] [--tenant T]\n"
             "         validate FILE (compile, hooks, fixtures); with --spec, run the busted\n"
             "         specs in DIR against it (TOLLGATE_POLICY names FILE for them)\n"
             "       tollgate policy diff OLD NEW [--tenant T]\n"
             "         how NEW decides differently from OLD on the fixtures of both\n");
}

static int bad_usage(void) {
  usage(stderr);
  return 2;
}

/* "policies/news.lua" -> "news", as the busted harness names tenants; a
 * copy such as "news.new.lua" or "news.lua.orig" names the same tenant (a
 * tenant name is [a-z0-9_-]). */
static void tenant_of(const char *path, char *out, size_t outlen) {
  const char *base = strrchr(path, '/');
  base = base ? base + 1 : path;
  size_t n = strspn(base, "abcdefghijklmnopqrstuvwxyz0123456789_-");
  if (n == 0)
    n = strcspn(base, ".");
  snprintf(out, outlen, "%.*s", (int)n, base);
}

static void join_hooks(const tg_policy_summary_t *sum, char *out, size_t outlen) {
  size_t used = 0;
  out[0] = '\0';
  for (int h = 0; h < TG_POLICY_NHOOKS; h++) {
    if (!sum->hooks[h])
      continue;
    int n = snprintf(out + used, outlen - used, "%s%s", used ? ", " : "",
                     tg_policy_hook_name((tg_policy_hook_t)h));
    if (n < 0 || (size_t)n >= outlen - used)
      break;
    used += (size_t)n;
  }
  if (used == 0)
    snprintf(out, outlen, "none (every hook answers as the default policy)");
}

/* ---- busted */

/* The executable `name` on PATH into out, or false. */
static bool find_on_path(const char *name, char *out, size_t outlen) {
  const char *path = getenv("PATH");
  if (path == NULL || *path == '\0')
    return false;
  for (const char *p = path; *p;) {
    size_t n = strcspn(p, ":");
    if (n > 0 && snprintf(out, outlen, "%.*s/%s", (int)n, p, name) < (int)outlen &&
        access(out, X_OK) == 0)
      return true;
    p += n;
    if (*p == ':')
      p++;
  }
  return false;
}

/* Creates the folders of dir/name ("tollgate/harness.lua") below dir. */
static int make_parents(const char *dir, const char *name) {
  char path[PATH_MAX];
  if (snprintf(path, sizeof path, "%s/%s", dir, name) >= (int)sizeof path)
    return -ENAMETOOLONG;
  for (char *slash = path + strlen(dir) + 1; (slash = strchr(slash, '/')) != NULL; slash++) {
    *slash = '\0';
    if (mkdir(path, 0700) != 0 && errno != EEXIST)
      return -errno;
    *slash = '/';
  }
  return 0;
}

static int write_file(const char *path, const char *data, size_t len) {
  int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0)
    return -errno;
  while (len > 0) {
    ssize_t n = write(fd, data, len);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0) {
      int e = n < 0 ? -errno : -EIO;
      close(fd);
      return e;
    }
    data += n;
    len -= (size_t)n;
  }
  return close(fd) == 0 ? 0 : -errno;
}

/* Removes what write_runtime wrote (files first, then their folders). */
static void remove_runtime(const char *dir) {
  const char *name;
  char path[PATH_MAX];
  for (size_t i = 0; (name = tg_policy_embedded_name(i)) != NULL; i++)
    if (snprintf(path, sizeof path, "%s/%s", dir, name) < (int)sizeof path)
      unlink(path);
  /* Folders, deepest first: the embedded names are few and shallow. */
  for (int pass = 0; pass < 4; pass++) {
    for (size_t i = 0; (name = tg_policy_embedded_name(i)) != NULL; i++) {
      if (snprintf(path, sizeof path, "%s/%s", dir, name) >= (int)sizeof path)
        continue;
      char *slash;
      while ((slash = strrchr(path, '/')) != NULL && (size_t)(slash - path) > strlen(dir)) {
        *slash = '\0';
        rmdir(path);
      }
    }
  }
  rmdir(dir);
}

/* Writes every embedded lua/ file below a new private folder (into dir). */
static int write_runtime(char *dir, size_t dirlen, char *err, size_t errlen) {
  const char *tmp = getenv("TMPDIR");
  snprintf(dir, dirlen, "%s/tollgate-lua-XXXXXX", tmp && *tmp ? tmp : "/tmp");
  if (mkdtemp(dir) == NULL) {
    snprintf(err, errlen, "cannot create a temporary folder in %s: %s", tmp && *tmp ? tmp : "/tmp",
             strerror(errno));
    return -1;
  }
  const char *name;
  for (size_t i = 0; (name = tg_policy_embedded_name(i)) != NULL; i++) {
    size_t len = 0;
    const char *data = tg_policy_embedded(name, &len);
    char path[PATH_MAX];
    int rc = make_parents(dir, name);
    if (rc == 0)
      rc = snprintf(path, sizeof path, "%s/%s", dir, name) < (int)sizeof path
               ? write_file(path, data, len)
               : -ENAMETOOLONG;
    if (rc != 0) {
      snprintf(err, errlen, "cannot write %s/%s: %s", dir, name, strerror(-rc));
      remove_runtime(dir);
      return -1;
    }
  }
  return 0;
}

/* Runs busted on spec with the embedded runtime; its exit status, or -1
 * with err when it could not run at all. */
static int run_busted(const char *policy, const char *tenant, const char *spec, char *err,
                      size_t errlen) {
  char busted[PATH_MAX], luajit[PATH_MAX], dir[PATH_MAX], abs[PATH_MAX], lpath[PATH_MAX + 16];
  if (!find_on_path("busted", busted, sizeof busted)) {
    snprintf(err, errlen,
             "busted is not installed (--spec runs the specs with it): on Debian, apt-get "
             "install lua-busted luajit; elsewhere, luarocks install busted");
    return -1;
  }
  if (!find_on_path("luajit", luajit, sizeof luajit)) {
    snprintf(err, errlen,
             "luajit is not installed (the specs run under LuaJIT, as the gateway's policies "
             "do): on Debian, apt-get install luajit");
    return -1;
  }
  if (realpath(policy, abs) == NULL) {
    snprintf(err, errlen, "%s: %s", policy, strerror(errno));
    return -1;
  }
  if (write_runtime(dir, sizeof dir, err, errlen) != 0)
    return -1;
  snprintf(lpath, sizeof lpath, "--lpath=%s/?.lua", dir);
  setenv("TOLLGATE_POLICY", abs, 1);
  setenv("TOLLGATE_TENANT", tenant, 1);
  setenv("TOLLGATE_LUA", dir, 1);
  char *argv[] = {busted, "--lua=luajit", lpath, "--output=plainTerminal", (char *)spec, NULL};
  fflush(stdout);
  fflush(stderr);

  /* Ctrl-C stops busted (it has the default action); this process waits for
   * it, then removes the folder. */
  struct sigaction ign = {0}, old_int, old_term;
  ign.sa_handler = SIG_IGN;
  sigaction(SIGINT, &ign, &old_int);
  sigaction(SIGTERM, &ign, &old_term);
  posix_spawnattr_t at;
  sigset_t dflt;
  sigemptyset(&dflt);
  sigaddset(&dflt, SIGINT);
  sigaddset(&dflt, SIGTERM);
  int status = -1;
  pid_t pid;
  int e = posix_spawnattr_init(&at);
  if (e == 0) {
    posix_spawnattr_setsigdefault(&at, &dflt);
    posix_spawnattr_setflags(&at, POSIX_SPAWN_SETSIGDEF);
    e = posix_spawn(&pid, busted, NULL, &at, argv, environ);
    posix_spawnattr_destroy(&at);
  }
  if (e != 0) {
    snprintf(err, errlen, "cannot start %.300s: %s", busted, strerror(e));
  } else {
    int ws;
    while (waitpid(pid, &ws, 0) < 0 && errno == EINTR)
      ;
    if (WIFEXITED(ws))
      status = WEXITSTATUS(ws);
    else
      snprintf(err, errlen, "busted was stopped by signal %d", WTERMSIG(ws));
  }
  sigaction(SIGINT, &old_int, NULL);
  sigaction(SIGTERM, &old_term, NULL);
  remove_runtime(dir);
  return status;
}

/* ---- policy test */

static int cmd_test(int argc, char **argv) {
  const char *file = NULL, *spec = NULL, *tenant_opt = NULL;
  for (int i = 0; i < argc; i++) {
    if (strcmp(argv[i], "--spec") == 0 && i + 1 < argc)
      spec = argv[++i];
    else if (strcmp(argv[i], "--tenant") == 0 && i + 1 < argc)
      tenant_opt = argv[++i];
    else if (argv[i][0] != '-' && file == NULL)
      file = argv[i];
    else
      return bad_usage();
  }
  if (file == NULL)
    return bad_usage();
  struct stat sb;
  if (spec && stat(spec, &sb) != 0) {
    fprintf(stderr, "tollgate: --spec %s: %s\n", spec, strerror(errno));
    return 2;
  }
  char tenant[65];
  if (tenant_opt)
    snprintf(tenant, sizeof tenant, "%s", tenant_opt);
  else
    tenant_of(file, tenant, sizeof tenant);

  tg_policy_options_t opt = {.version = TG_VERSION};
  tg_policy_summary_t sum;
  char err[TG_POLICY_MSG_LEN], hooks[128];
  printf("policy    %s\ntenant    %s\n", file, tenant);
  if (tg_policy_check_file_summary(file, tenant, &opt, &sum, err, sizeof err) != 0) {
    printf("FAIL      %s\n", err);
    printf("FAIL: %s is refused (a reload would keep the old version)\n", file);
    return 1;
  }
  join_hooks(&sum, hooks, sizeof hooks);
  printf("version   %.*s\nhooks     %s\nfixtures  %u passed\n", TG_POLICY_VERSION_SHOWN,
         sum.version, hooks, sum.fixtures);
  if (spec) {
    printf("specs     %s (busted --lua=luajit)\n", spec);
    int st = run_busted(file, tenant, spec, err, sizeof err);
    if (st != 0) {
      if (st < 0)
        printf("FAIL      specs: %s\n", err);
      else
        printf("FAIL      specs: busted exit status %d (the failing specs are listed above)\n",
               st);
      printf("FAIL: %s\n", file);
      return 1;
    }
    printf("specs     passed\n");
  }
  printf("ok: %s\n", file);
  return 0;
}

/* ---- policy diff */

/* One side's results as a table cell: `15000, "USD"`, `nil`, `error: ...`. */
static void cell_of(const json_t *r, char *out, size_t outlen) {
  const char *e = json_string_value(json_object_get(r, "error"));
  if (e) {
    snprintf(out, outlen, "error: %s", e);
  } else if (json_array_size(r) == 0) {
    snprintf(out, outlen, "nil");
  } else {
    size_t used = 0, i;
    json_t *v;
    out[0] = '\0';
    json_array_foreach(r, i, v) {
      char *t = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT);
      int n = snprintf(out + used, outlen - used, "%s%s", i ? ", " : "", t ? t : "?");
      free(t);
      if (n < 0 || (size_t)n >= outlen - used)
        break;
      used += (size_t)n;
    }
  }
  if (strlen(out) > CELL_MAX)
    memcpy(out + CELL_MAX - 3, "...", 4);
}

typedef struct row {
  char fixture[CELL_MAX + 1], hook[24], live[CELL_MAX + 1], cand[CELL_MAX + 1];
} row_t;

static void print_table(const json_t *diffs) {
  size_t n = json_array_size(diffs);
  row_t *rows = calloc(n + 1, sizeof *rows);
  if (rows == NULL)
    return;
  snprintf(rows[0].fixture, sizeof rows[0].fixture, "FIXTURE");
  snprintf(rows[0].hook, sizeof rows[0].hook, "HOOK");
  snprintf(rows[0].live, sizeof rows[0].live, "OLD");
  snprintf(rows[0].cand, sizeof rows[0].cand, "NEW");
  int w[3] = {7, 4, 3};
  for (size_t i = 0; i < n; i++) {
    const json_t *d = json_array_get(diffs, i);
    const json_t *fx = json_object_get(d, "fixture");
    const char *of = json_string_value(json_object_get(fx, "of"));
    const char *name = json_string_value(json_object_get(fx, "name"));
    row_t *r = &rows[i + 1];
    snprintf(r->fixture, sizeof r->fixture, "%s #%lld%s%s%s",
             of && strcmp(of, "live") == 0 ? "old" : "new",
             (long long)json_integer_value(json_object_get(fx, "index")), name ? " '" : "",
             name ? name : "", name ? "'" : "");
    const char *hook = json_string_value(json_object_get(d, "hook"));
    snprintf(r->hook, sizeof r->hook, "%s", hook ? hook : "?");
    cell_of(json_object_get(d, "live"), r->live, sizeof r->live);
    cell_of(json_object_get(d, "candidate"), r->cand, sizeof r->cand);
  }
  for (size_t i = 0; i <= n; i++) {
    int a = (int)strlen(rows[i].fixture), b = (int)strlen(rows[i].hook),
        c = (int)strlen(rows[i].live);
    w[0] = a > w[0] ? a : w[0];
    w[1] = b > w[1] ? b : w[1];
    w[2] = c > w[2] ? c : w[2];
  }
  for (size_t i = 0; i <= n; i++)
    printf("  %-*s  %-*s  %-*s  %s\n", w[0], rows[i].fixture, w[1], rows[i].hook, w[2],
           rows[i].live, rows[i].cand);
  free(rows);
}

static int cmd_diff(int argc, char **argv) {
  const char *files[2] = {NULL, NULL}, *tenant_opt = NULL;
  int nfiles = 0;
  for (int i = 0; i < argc; i++) {
    if (strcmp(argv[i], "--tenant") == 0 && i + 1 < argc)
      tenant_opt = argv[++i];
    else if (argv[i][0] != '-' && nfiles < 2)
      files[nfiles++] = argv[i];
    else
      return bad_usage();
  }
  if (nfiles != 2)
    return bad_usage();
  char tenant[65];
  if (tenant_opt)
    snprintf(tenant, sizeof tenant, "%s", tenant_opt);
  else
    tenant_of(files[0], tenant, sizeof tenant);
  tg_policy_options_t opt = {.version = TG_VERSION};
  tg_policy_comparison_t c;
  if (tg_policy_compare_files(files[0], files[1], tenant, &opt, &c) != 0) {
    fprintf(stderr, "tollgate: %s (OLD must load)\n", c.error);
    return 2;
  }
  int rc = 0;
  printf("old  %.*s  %s\n", TG_POLICY_VERSION_SHOWN, c.live_version, files[0]);
  if (c.candidate_version[0])
    printf("new  %.*s  %s\n", TG_POLICY_VERSION_SHOWN, c.candidate_version, files[1]);
  else
    printf("new  %-*s  %s\n", TG_POLICY_VERSION_SHOWN, "unreadable", files[1]);
  if (c.status == TG_POLICY_DRY_UNCHANGED) {
    printf("the same policy: no decision differs\n");
    return 0;
  }
  if (c.status == TG_POLICY_DRY_INVALID) {
    printf("new is invalid, a reload would refuse it: %s\n", c.error);
    rc = 2;
  }
  if (c.compare_error[0]) {
    printf("the comparison did not finish: %s\n", c.compare_error);
    rc = 2;
  }
  if (c.differences) {
    printf("%zu fixture input%s compared (tenant %s): %zu decided differently%s\n", c.compared,
           c.compared == 1 ? "" : "s", tenant, c.differing, c.differing ? ":" : "");
    if (c.differing)
      print_table(c.differences);
    if (c.differing > json_array_size(c.differences))
      printf("  ... and %zu more\n", c.differing - json_array_size(c.differences));
  }
  if (rc == 0)
    rc = c.differing ? 1 : 0;
  tg_policy_comparisons_free(&c, 1, false);
  return rc;
}

int tg_policy_tool_main(int argc, char **argv) {
  if (argc >= 2 && strcmp(argv[1], "test") == 0)
    return cmd_test(argc - 2, argv + 2);
  if (argc >= 2 && strcmp(argv[1], "diff") == 0)
    return cmd_diff(argc - 2, argv + 2);
  if (argc >= 2 && (strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0)) {
    usage(stdout);
    return 0;
  }
  return bad_usage();
}
