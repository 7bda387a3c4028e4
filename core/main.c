#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#include "billing/billconf.h"
#include "base/buf.h"
#include "config/config.h"
#include "gateway/gateway.h"
#include "gateway/walcli.h"
#include "pipeline/paywall.h"
#include "base/log.h"
#include "base/secret.h"
#include "policy/policy.h"
#include "policy/tools.h"
#include "signer/signer.h"

static void usage(FILE *f) {
  fprintf(f, "usage: tollgate run -c FILE     start the gateway\n"
             "       tollgate check -c FILE   validate the configuration and its policies, then exit\n"
             "       tollgate policy test FILE [--spec DIR] [--tenant T]\n"
             "                                validate a policy, run its fixtures (and busted specs)\n"
             "       tollgate policy diff OLD NEW [--tenant T]\n"
             "                                how NEW decides differently from OLD on their fixtures\n"
             "       tollgate wal ls|verify|cat -c FILE\n"
             "                                read the write-ahead log, never modifying it (wal --help)\n"
             "       tollgate version\n");
}

typedef struct app {
  tg_gateway_t *gw;
  uv_signal_t sigterm, sigint, sighup;
  int stopping;
} app_t;

static void on_signal(uv_signal_t *s, int signum) {
  app_t *app = s->data;
  if (signum == SIGHUP) {
    tg_log(TG_LOG_INFO, "SIGHUP: reloading policies", NULL);
    if (app->gw)
      tg_gateway_reload(app->gw);
    return;
  }
  if (app->stopping)
    return;
  app->stopping = 1;
  tg_log(TG_LOG_INFO, "stopping", "signal", signum == SIGTERM ? "SIGTERM" : "SIGINT", NULL);
  uv_close((uv_handle_t *)&app->sigterm, NULL);
  uv_close((uv_handle_t *)&app->sigint, NULL);
  uv_close((uv_handle_t *)&app->sighup, NULL);
  if (app->gw)
    tg_gateway_unwatch(app->gw);
}

int main(int argc, char **argv) {
  /* Hidden: the child a reload validates a policy in (core/policy/policy.h). */
  if (argc > 1 && strcmp(argv[1], "policy-validate") == 0)
    return tg_policy_validator_main(argc - 1, argv + 1);
  /* Tools for one policy file, no configuration needed (policy/tools.h). */
  if (argc > 1 && strcmp(argv[1], "policy") == 0)
    return tg_policy_tool_main(argc - 1, argv + 1);
  /* Read-only tools for the write-ahead log (gateway/walcli.h). */
  if (argc > 1 && strcmp(argv[1], "wal") == 0)
    return tg_walcli_main(argc - 1, argv + 1, stdout, stderr);
  const char *cmd = "run", *path = NULL;
  int i = 1;
  if (argc > 1 && argv[1][0] != '-')
    cmd = argv[i++];
  for (; i < argc; i++) {
    if ((strcmp(argv[i], "-c") == 0 || strcmp(argv[i], "--config") == 0) && i + 1 < argc) {
      path = argv[++i];
    } else if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
      usage(stdout);
      return 0;
    } else {
      usage(stderr);
      return 2;
    }
  }
  if (strcmp(cmd, "version") == 0) {
    printf("tollgate %s\n", TG_VERSION);
    return 0;
  }
  if ((strcmp(cmd, "run") != 0 && strcmp(cmd, "check") != 0) || path == NULL) {
    usage(stderr);
    return 2;
  }

  tg_config_t cfg;
  char err[1024];
  if (tg_config_load(path, &cfg, err, sizeof err) != 0) {
    fprintf(stderr, "tollgate: %s\n", err);
    return 1;
  }
  if (strcmp(cmd, "check") == 0) {
    /* The same validation a reload runs: compile, top level, hooks, fixtures. */
    /* With the configured limits, as the running gateway applies them. */
    tg_policy_options_t popt = {0};
    popt.time_limit_ms = cfg.policy_time_limit_ms;
    popt.load_time_limit_ms = cfg.policy_load_time_limit_ms;
    popt.memory_limit = cfg.policy_memory_limit;
    popt.version = TG_VERSION;
    if (tg_policy_check_config(&cfg, &popt, err, sizeof err) != 0) {
      fprintf(stderr, "tollgate: %s\n", err);
      tg_config_free(&cfg);
      return 1;
    }
    /* Each signer as the gateway builds it at start: key read, options
     * checked, a probe URL signed. */
    for (size_t i = 0; i < cfg.ntenants; i++) {
      tg_signer_t s;
      if (tg_signer_from_config(&cfg.tenants[i].signer, &s, err, sizeof err) != 0) {
        fprintf(stderr, "tollgate: %s: tenant %s: %s\n", cfg.path, cfg.tenants[i].name, err);
        tg_config_free(&cfg);
        return 1;
      }
      const char *key_file = tg_config_get(&cfg.tenants[i].signer, "key_file");
      if (key_file && tg_secret_exposed(key_file))
        fprintf(stderr, "tollgate: warning: %s is readable by group or others; chmod 600 it\n", key_file);
      tg_signer_free(&s);
    }
    /* Each tenant's billing section, as the gateway reads it at start (token included). */
    for (size_t i = 0; i < cfg.ntenants; i++) {
      tg_billconf_t bc;
      if (tg_billconf_parse(&cfg.tenants[i].billing, &bc, err, sizeof err) != 0) {
        fprintf(stderr, "tollgate: %s: tenant %s: %s\n", cfg.path, cfg.tenants[i].name, err);
        tg_config_free(&cfg);
        return 1;
      }
      const char *tf = tg_config_get(&cfg.tenants[i].billing, "token_file");
      if (tf && tg_secret_exposed(tf))
        fprintf(stderr, "tollgate: warning: %s is readable by group or others; chmod 600 it\n", tf);
      tg_billconf_free(&bc);
    }
    /* Each tenant's payments section, as the gateway reads it at start. */
    if (tg_paywall_check_config(&cfg, err, sizeof err) != 0) {
      fprintf(stderr, "tollgate: %s: %s\n", cfg.path, err);
      tg_config_free(&cfg);
      return 1;
    }
    /* The same warning `run` logs, where the operator checking will see it. */
    const char *secrets[] = {cfg.admin_token_file, cfg.redis.password_file};
    for (size_t k = 0; k < sizeof secrets / sizeof secrets[0]; k++)
      if (tg_secret_exposed(secrets[k]))
        fprintf(stderr, "tollgate: warning: %s is readable by group or others; chmod 600 it\n",
                secrets[k]);
    printf("tollgate: configuration %s is valid (%zu tenants, policies checked)\n", cfg.path,
           cfg.ntenants);
    tg_config_free(&cfg);
    return 0;
  }
  int lvl = cfg.log_level ? tg_log_level_parse(cfg.log_level) : TG_LOG_INFO;
  tg_log_set_level(lvl < 0 ? TG_LOG_INFO : (tg_log_level_t)lvl);
  signal(SIGPIPE, SIG_IGN);
  /* A policy that crashes its validation must not crash the gateway serving
   * every tenant: reloads validate in a child of this very binary. */
  tg_policy_set_validator("/proc/self/exe", 0);

  app_t app = {0};
  uv_loop_t *loop = uv_default_loop();
  uv_signal_init(loop, &app.sigterm);
  uv_signal_init(loop, &app.sigint);
  uv_signal_init(loop, &app.sighup);
  app.sigterm.data = app.sigint.data = app.sighup.data = &app;
  uv_signal_start(&app.sigterm, on_signal, SIGTERM);
  uv_signal_start(&app.sigint, on_signal, SIGINT);
  uv_signal_start(&app.sighup, on_signal, SIGHUP);

  if (tg_gateway_start(&app.gw, &cfg, err, sizeof err) != 0) {
    fprintf(stderr, "tollgate: %s\n", err);
    /* A listener's "HOST:PORT: Address already in use": say how to find the holder and
     * where the port is set, the two things a newcomer asks next. */
    const char *busy = strstr(err, strerror(EADDRINUSE));
    if (busy != NULL && busy - err >= 3 && busy[-2] == ':') {
      const char *p = busy - 2;
      while (p > err && p[-1] >= '0' && p[-1] <= '9')
        p--;
      int port = atoi(p);
      if (port > 0 && p > err && p[-1] == ':')
        fprintf(stderr,
                "tollgate: another process listens on port %d; `ss -ltnp 'sport = :%d'` names it "
                "(as root). Stop it, or choose another port in %s (listen, admin)\n",
                port, port, cfg.path);
    }
    tg_log(TG_LOG_ERROR, "start failed", "reason", err, NULL);
    tg_config_free(&cfg);
    return 1;
  }
  if (tg_gateway_watch(app.gw, loop) != 0)
    tg_log(TG_LOG_WARN, "policy files are not watched: reload with SIGHUP or the admin route", NULL);
  tg_log(TG_LOG_INFO, "ready", "version", TG_VERSION, "config", cfg.path, NULL);
  uv_run(loop, UV_RUN_DEFAULT); /* until a stop signal closes the handles */
  tg_gateway_stop(app.gw);
  tg_log(TG_LOG_INFO, "stopped", NULL);
  uv_loop_close(loop);
  tg_config_free(&cfg);
  return 0;
}
