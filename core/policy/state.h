#ifndef TG_POLICY_STATE_H
#define TG_POLICY_STATE_H

/* Internal to the policy module: one sandboxed Lua state running one
 * tenant's policy (core/policy/state.c). core/policy.c owns the registry and
 * the per-worker runtimes and decides when states are built and closed. */

#include <lua.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>

#include "base/metrics.h"
#include "policy/policy.h"

typedef struct tg_pstate_cfg {
  const char *tenant;
  const char *chunkname;      /* "@/etc/tollgate/policies/news.lua" */
  const char *source;
  size_t len;
  const char *version;        /* sha256 hex of source */
  const char *gateway_version;
  uint32_t time_limit_ms, load_time_limit_ms;
  size_t memory_limit;
} tg_pstate_cfg_t;

enum { TG_VIEW_REQ = 0, TG_VIEW_OFFER, TG_VIEW_TXN, TG_VIEW_SALE, TG_NVIEWS };

typedef struct tg_pview {
  int kind;
  const void *data;           /* the C struct of the current call; NULL between calls */
  struct tg_policy_state *st;
} tg_pview_t;

struct tg_policy_state {
  lua_State *L;
  size_t mem_used, mem_limit;
  uint64_t deadline_ns;       /* CLOCK_MONOTONIC; the count hook raises past it */
  uint32_t time_limit_ms, load_time_limit_ms;
  bool timed_out, mem_failed; /* set by the hook / the allocator during a call */
  /* The hook fires every instruction: after a timeout, or once the watchdog
   * saw the call overrun (set from its signal handler, hence the type). */
  volatile sig_atomic_t fast_hook;
  bool suspect;               /* memory stayed near the cap: rebuild before next use */
  uintptr_t cstack_base;      /* the C stack where the current call started */
  uintptr_t cstack_floor;     /* the C stack may not grow below this address in a call */
  uint64_t call_start_ns;     /* start of the current call or load */
  uint64_t clock_ns;          /* time spent in finished calls: what os.clock() counts */
  char fixture[160];          /* label of the fixture running (validation), or "" */
  unsigned nfixtures;         /* the policy's fixtures (all run, when validating) */
  int cstack_msg_ref;
  int hook_ref[TG_POLICY_NHOOKS];    /* LUA_NOREF when the policy lacks the hook */
  int finish_ref[TG_POLICY_NHOOKS];  /* sandbox.finish[hook]: says why a result breaks the rules */
  int view_ref[TG_NVIEWS];
  tg_pview_t *view[TG_NVIEWS];
  int timeout_msg_ref, memory_msg_ref;
  double log_window;          /* tollgate.log rate limit: window start, lines in it */
  unsigned log_lines, log_dropped;
  double err_window;          /* same for error logs of failed calls */
  unsigned err_lines, err_dropped;
  tg_metric_t *m_errors, *m_duration;
  char tenant[65];
  char version[TG_POLICY_VERSION_LEN];
  /* bookkeeping of core/policy.c */
  int refs;                   /* the runtime's slot + requests that pinned it */
};

/* Builds a state and runs the policy's top level; with fixtures, also runs
 * the fixtures the policy declares (validation). NULL with *code set to a
 * TG_POLICY_ERR_* (or -ENOMEM) and err "FILE:LINE: reason". */
struct tg_policy_state *tg_pstate_new(const tg_pstate_cfg_t *cfg, bool fixtures, int *code,
                                      char *err, size_t errlen);
void tg_pstate_free(struct tg_policy_state *st);

/* Runs the fixtures of both versions through the hooks of both
 * (lua/tollgate/diff.lua) in a throwaway state, bounded as a validation is:
 * the runtime and each version load under the load time limit, each hook
 * call under the hook limit, and the state under the memory limit (cand's
 * limits, tenant and chunkname; live gives a source and a chunkname). 0 with
 * *out = {"compared":N,"differing":N,"differences":[...]} (a new reference;
 * the entries as tg_policy_comparison_t describes), or a TG_POLICY_ERR_* (or
 * -ENOMEM) with err "FILE:LINE: reason" ("FILE: <fixture>: exceeded ..."). */
struct json_t;
int tg_pstate_compare(const tg_pstate_cfg_t *live, const tg_pstate_cfg_t *cand,
                      struct json_t **out, char *err, size_t errlen);

/* Metric families of the module (declared on first use; idempotent). */
typedef struct tg_policy_metrics {
  tg_metric_t *errors, *reloads, *reload_errors, *version_info, *duration, *dry_runs;
} tg_policy_metrics_t;
void tg_policy_metrics_get(tg_policy_metrics_t *m);

#endif
