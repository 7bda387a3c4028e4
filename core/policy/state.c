#include "policy/state.h"

#include <errno.h>
#include <jansson.h>
#include <lauxlib.h>
#include <luajit.h>
#include <lualib.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "base/log.h"
#include "base/utf8.h"

#define HOOK_COUNT 1000       /* instructions between deadline checks */
#define LOG_LINES_PER_SEC 20  /* per state, for tollgate.log and for failed calls */

/* C stack a policy call may use: library functions that call back into Lua
 * (gsub, sort, format's __tostring) nest on it, and LuaJIT itself sets no
 * bound. RESERVE stays free below it for the frames between two checks and
 * for unwinding an error. */
#define CSTACK_BUDGET (1u << 20)
#define CSTACK_RESERVE (128u << 10)
/* Nesting of those functions, as lua/tollgate/sandbox.lua counts it (its
 * MAX_NESTED); one level takes 224 bytes of C stack at least (table.sort),
 * about 9 KiB with gsub's buffer. */
#define MAX_NESTED 100
#define MIN_NESTED_BYTES 128u

/* The watchdog scans running calls this often and signals overrunning ones,
 * so that an instruction that takes long (a C call on a big string) is
 * followed by a deadline check at once, not up to HOOK_COUNT of them later. */
#define WATCH_PERIOD_NS 5000000u

#define PREFAULT_MIN (1u << 20)   /* blocks from this size on are touched in steps */
#define PREFAULT_STEP (256u << 10)

static const char *const hook_names[TG_POLICY_NHOOKS] = {
    "skip", "rate_limit", "price", "on_billing_timeout", "on_settle_failure", "settle"};
static const char *const view_names[TG_NVIEWS] = {"req", "offer", "txn", "sale"};

const char *tg_policy_hook_name(tg_policy_hook_t hook) {
  return (unsigned)hook < TG_POLICY_NHOOKS ? hook_names[hook] : "?";
}

extern const struct tg_lua_file {
  const char *name;
  const char *data;
  size_t len;
} tg_lua_files[];

const char *tg_policy_embedded(const char *name, size_t *len) {
  for (const struct tg_lua_file *f = tg_lua_files; f->name; f++) {
    if (strcmp(f->name, name) == 0) {
      if (len)
        *len = f->len;
      return f->data;
    }
  }
  return NULL;
}

const char *tg_policy_embedded_name(size_t i) {
  for (size_t k = 0; tg_lua_files[k].name; k++)
    if (k == i)
      return tg_lua_files[k].name;
  return NULL;
}

void tg_policy_metrics_get(tg_policy_metrics_t *m) {
  static const char *const l_err[] = {"tenant_id", "hook", "kind", NULL};
  static const char *const l_reload[] = {"tenant_id", "result", NULL};
  static const char *const l_reload_dry[] = {"tenant_id", "result", NULL};
  static const char *const l_tenant[] = {"tenant_id", NULL};
  static const char *const l_version[] = {"tenant_id", "version", NULL};
  static const char *const l_hook[] = {"tenant_id", "hook", NULL};
  static const double buckets[] = {5e-6, 10e-6, 25e-6, 50e-6, 100e-6, 250e-6,
                                   500e-6, 1e-3, 5e-3, 10e-3, 50e-3};
  m->errors = tg_metric_new(TG_METRIC_COUNTER, "policy_errors_total",
                            "Policy hook calls that failed, by kind (error, timeout, memory, type); the request "
                            "failed closed, and the gateway log has the policy's file:line.",
                            l_err, NULL, 0);
  m->reloads = tg_metric_new(TG_METRIC_COUNTER, "policy_reloads_total",
                             "Policy reloads that published (ok) or were refused (error)",
                             l_reload, NULL, 0);
  m->reload_errors = tg_metric_new(TG_METRIC_COUNTER, "policy_reload_errors_total",
                                   "Policy reloads refused by validation", l_tenant, NULL, 0);
  m->version_info = tg_metric_new(TG_METRIC_GAUGE, "policy_version_info",
                                  "The active policy version of each tenant (one series per "
                                  "tenant, value 1)", l_version, NULL, 0);
  m->duration = tg_metric_new(TG_METRIC_HISTOGRAM, "policy_hook_duration_seconds",
                              "Time spent in policy hook calls, by tenant and hook (_count: "
                              "the calls)", l_hook, buckets, sizeof buckets / sizeof buckets[0]);
  m->dry_runs = tg_metric_new(TG_METRIC_COUNTER, "policy_dry_runs_total",
                              "Dry runs of a policy reload, by result (valid, invalid, "
                              "unchanged); nothing was published", l_reload_dry, NULL, 0);
}

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static double wall_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (double)ts.tv_sec + (double)(ts.tv_nsec / 1000000) / 1000.0;
}

static tg_policy_state_t *state_of(lua_State *L) {
  void *ud = NULL;
  lua_getallocf(L, &ud);
  return ud;
}

/* A big new block costs a page fault per page on first touch, inside the C
 * function that asked for it, where no hook fires (tens of milliseconds for
 * some MiB on a VM). It is touched here, a step at a time with the deadline
 * checked between steps, so one allocation cannot outlast the call's time. */
static void *big_alloc(tg_policy_state_t *st, void *ptr, size_t osize, size_t nsize) {
  char *p = malloc(nsize);
  if (p == NULL)
    return NULL;
  for (size_t off = 0; off < nsize; off += PREFAULT_STEP) {
    size_t end = nsize - off > PREFAULT_STEP ? off + PREFAULT_STEP : nsize;
    for (size_t q = off; q < end; q += 4096)
      ((volatile char *)p)[q] = 0;
    if (now_ns() >= st->deadline_ns) {
      free(p);
      st->timed_out = true;
      return NULL;
    }
  }
  if (ptr) {
    memcpy(p, ptr, osize);
    free(ptr);
  }
  return p;
}

/* Counts every byte the state holds and refuses growth past the cap; the
 * refusal is remembered so the call is reported as a memory error even if
 * the policy caught the "not enough memory" error itself. */
static void *state_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  tg_policy_state_t *st = ud;
  if (nsize == 0) {
    free(ptr);
    st->mem_used -= osize;
    return NULL;
  }
  if (nsize > osize && st->mem_used + (nsize - osize) > st->mem_limit) {
    st->mem_failed = true;
    return NULL;
  }
  void *p = nsize >= PREFAULT_MIN && nsize > osize ? big_alloc(st, ptr, osize, nsize)
                                                   : realloc(ptr, nsize);
  if (p == NULL) {
    if (nsize <= osize)
      return ptr; /* a failed shrink keeps the larger block */
    if (!st->timed_out)
      st->mem_failed = true;
    return NULL;
  }
  st->mem_used = st->mem_used - osize + nsize;
  return p;
}

static void count_hook(lua_State *L, lua_Debug *ar);

/* ---- Watchdog. One thread per process looks at every thread that runs
 * policy code; one that is still in a call past its deadline gets kick_signal,
 * whose handler (on that thread, as LuaJIT's own interpreter does for Ctrl-C)
 * makes the count hook fire at the next instruction. A slot's deadline is 0
 * when no call runs, KICKING while the watchdog signals the thread (the
 * thread waits before it publishes anything else, so it is alive and the
 * kick is for the call it is in) and KICKED once it did. */

#define WATCH_KICKING 1u
#define WATCH_KICKED 2u

typedef struct watch_slot {
  pthread_t thread;
  _Atomic uint64_t deadline;
  struct watch_slot *next;
} watch_slot_t;

static pthread_mutex_t watch_lock = PTHREAD_MUTEX_INITIALIZER; /* watch_slots */
static watch_slot_t *watch_slots;
static pthread_once_t watch_once = PTHREAD_ONCE_INIT;
static pthread_key_t watch_key;
static bool watch_ok;
static int kick_signal;
static _Thread_local watch_slot_t *tl_slot;
static _Thread_local tg_policy_state_t *volatile tl_running; /* the state in a call */

static void on_kick(int sig) {
  (void)sig;
  watch_slot_t *s = tl_slot;
  tg_policy_state_t *st = tl_running;
  if (s == NULL || st == NULL ||
      atomic_load_explicit(&s->deadline, memory_order_relaxed) != WATCH_KICKED)
    return; /* the call it was meant for is over */
  st->fast_hook = 1;
  lua_sethook(st->L, count_hook, LUA_MASKCOUNT, 1);
}

static void *watchdog(void *arg) {
  (void)arg;
  struct timespec period = {0, WATCH_PERIOD_NS};
  for (;;) {
    nanosleep(&period, NULL);
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    uint64_t now = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    pthread_mutex_lock(&watch_lock);
    for (watch_slot_t *s = watch_slots; s; s = s->next) {
      uint64_t d = atomic_load_explicit(&s->deadline, memory_order_acquire);
      if (d <= WATCH_KICKED || now < d ||
          !atomic_compare_exchange_strong(&s->deadline, &d, WATCH_KICKING))
        continue;
      pthread_kill(s->thread, kick_signal);
      atomic_store_explicit(&s->deadline, WATCH_KICKED, memory_order_release);
    }
    pthread_mutex_unlock(&watch_lock);
  }
  return NULL;
}

static void slot_free(void *p) {
  watch_slot_t *slot = p;
  pthread_mutex_lock(&watch_lock);
  for (watch_slot_t **s = &watch_slots; *s; s = &(*s)->next) {
    if (*s == slot) {
      *s = slot->next;
      break;
    }
  }
  pthread_mutex_unlock(&watch_lock);
  free(slot);
}

static void watch_init(void) {
  kick_signal = SIGRTMIN + 6; /* clear of the first ones, which libraries tend to take */
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_kick;
  sa.sa_flags = SA_RESTART;
  sigemptyset(&sa.sa_mask);
  if (sigaction(kick_signal, &sa, NULL) != 0 || pthread_key_create(&watch_key, slot_free) != 0)
    return;
  /* The watchdog blocks every signal, so that none meant for the process
   * lands on it. */
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  pthread_attr_t a;
  pthread_attr_init(&a);
  pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
  pthread_attr_setstacksize(&a, 64u << 10);
  pthread_t t;
  watch_ok = pthread_create(&t, &a, watchdog, NULL) == 0;
  pthread_attr_destroy(&a);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  if (!watch_ok)
    tg_log(TG_LOG_WARN, "policy watchdog did not start: a long C call may overrun the time limit",
           NULL);
}

/* This thread's slot, registered on first use (NULL without a watchdog). */
static watch_slot_t *watch_slot(void) {
  if (tl_slot)
    return tl_slot;
  pthread_once(&watch_once, watch_init);
  if (!watch_ok)
    return NULL;
  watch_slot_t *s = calloc(1, sizeof *s);
  if (s == NULL)
    return NULL;
  s->thread = pthread_self();
  atomic_init(&s->deadline, 0);
  if (pthread_setspecific(watch_key, s) != 0) {
    free(s);
    return NULL;
  }
  pthread_mutex_lock(&watch_lock);
  s->next = watch_slots;
  watch_slots = s;
  pthread_mutex_unlock(&watch_lock);
  tl_slot = s;
  return s;
}

/* Publishes this thread's deadline (0: no call), waiting out a kick in flight. */
static void watch_publish(uint64_t deadline) {
  watch_slot_t *s = tl_slot;
  if (s == NULL)
    return;
  uint64_t cur = atomic_load_explicit(&s->deadline, memory_order_relaxed);
  for (;;) {
    if (cur == WATCH_KICKING) {
      sched_yield();
      cur = atomic_load_explicit(&s->deadline, memory_order_relaxed);
      continue;
    }
    if (atomic_compare_exchange_weak_explicit(&s->deadline, &cur, deadline, memory_order_release,
                                              memory_order_relaxed))
      return;
  }
}

/* ---- C stack bound */

static _Thread_local uintptr_t tl_stack_lo; /* lowest usable address; 1: unknown */

static uintptr_t stack_low(void) {
  if (tl_stack_lo == 0) {
    tl_stack_lo = 1;
    pthread_attr_t a;
    void *addr;
    size_t size;
    if (pthread_getattr_np(pthread_self(), &a) == 0) {
      if (pthread_attr_getstack(&a, &addr, &size) == 0)
        tl_stack_lo = (uintptr_t)addr;
      pthread_attr_destroy(&a);
    }
  }
  return tl_stack_lo;
}

/* Sets the floor for a call starting here: CSTACK_BUDGET below this frame,
 * but never closer than CSTACK_RESERVE to the end of this thread's stack, so
 * a thread with a small stack gets errors, not a crash. */
static void set_cstack_floor(tg_policy_state_t *st) {
  uintptr_t sp = (uintptr_t)__builtin_frame_address(0);
  uintptr_t lo = stack_low();
  uintptr_t floor = sp - CSTACK_BUDGET;
  st->cstack_base = sp;
  if (lo <= 1)
    floor = sp - CSTACK_BUDGET / 4; /* unknown bounds: stay well inside any default */
  else if (floor < lo + CSTACK_RESERVE)
    floor = lo + CSTACK_RESERVE;
  st->cstack_floor = floor;
}

static bool cstack_exhausted(const tg_policy_state_t *st) {
  return (uintptr_t)__builtin_frame_address(0) < st->cstack_floor;
}

/* ---- Time */

static void count_hook(lua_State *L, lua_Debug *ar) {
  (void)ar;
  tg_policy_state_t *st = state_of(L);
  if (cstack_exhausted(st)) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, st->cstack_msg_ref);
    lua_error(L);
  }
  if (now_ns() < st->deadline_ns)
    return;
  st->timed_out = true;
  if (!st->fast_hook) {
    /* Every instruction from now on, so that code catching the error
     * (pcall in a loop) is interrupted again at once. */
    st->fast_hook = 1;
    lua_sethook(L, count_hook, LUA_MASKCOUNT, 1);
  }
  lua_rawgeti(L, LUA_REGISTRYINDEX, st->timeout_msg_ref);
  lua_error(L);
}

static void arm(tg_policy_state_t *st, uint32_t ms) {
  st->timed_out = false;
  st->mem_failed = false;
  if (st->fast_hook) {
    st->fast_hook = 0;
    lua_sethook(st->L, count_hook, LUA_MASKCOUNT, HOOK_COUNT);
  }
  st->deadline_ns = now_ns() + (uint64_t)ms * 1000000u;
  watch_publish(st->deadline_ns);
}

/* Brackets a call or a load on this thread: the watchdog, the C stack floor
 * and os.clock() follow it. */
static void call_begin(tg_policy_state_t *st, uint32_t ms) {
  watch_slot();
  set_cstack_floor(st);
  tl_running = st;
  arm(st, ms);
  st->call_start_ns = st->deadline_ns - (uint64_t)ms * 1000000u;
}

/* Ends the call; a call that ran past its deadline inside C, where no hook
 * fires, is a timeout all the same. Returns its duration. */
static uint64_t call_end(tg_policy_state_t *st) {
  uint64_t now = now_ns();
  if (now > st->deadline_ns)
    st->timed_out = true;
  watch_publish(0);
  tl_running = NULL;
  st->deadline_ns = UINT64_MAX;
  uint64_t took = now - st->call_start_ns;
  st->clock_ns += took;
  st->call_start_ns = 0;
  return took;
}

/* sandbox opts.guard: runs after every pcall/xpcall inside the policy and
 * after each fixture. The messages are preallocated so raising needs no
 * memory at the cap. */
static int l_guard(lua_State *L) {
  tg_policy_state_t *st = state_of(L);
  if (!st->timed_out && now_ns() >= st->deadline_ns)
    st->timed_out = true; /* the time went by inside a C function */
  if (st->timed_out) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, st->timeout_msg_ref);
    return lua_error(L);
  }
  if (st->mem_failed) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, st->memory_msg_ref);
    return lua_error(L);
  }
  return 0;
}

/* sandbox.set_cstack: false once library functions that call back into Lua
 * (the upvalues: string.gsub, string.format, table.sort) are nested
 * MAX_NESTED deep, as the sandbox counts them in plain Lua, or the C stack
 * budget is spent. Fewer levels also keep the unwinding of an error through
 * them short: each costs microseconds per C frame. */
static int l_cstack(lua_State *L) {
  tg_policy_state_t *st = state_of(L);
  uintptr_t sp = (uintptr_t)__builtin_frame_address(0);
  if (sp < st->cstack_floor) {
    lua_pushboolean(L, 0);
    return 1;
  }
  if (st->cstack_base - sp < MAX_NESTED * MIN_NESTED_BYTES) {
    lua_pushboolean(L, 1); /* too little C stack in use to hold that many levels */
    return 1;
  }
  int n = 0;
  lua_Debug ar;
  for (int level = 1; n < MAX_NESTED && lua_getstack(L, level, &ar); level++) {
    lua_getinfo(L, "f", &ar);
    for (int i = 1; i <= 3; i++) {
      if (lua_rawequal(L, -1, lua_upvalueindex(i))) {
        n++;
        break;
      }
    }
    lua_pop(L, 1);
  }
  lua_pushboolean(L, n < MAX_NESTED);
  return 1;
}

/* sandbox opts.clock, behind os.clock(): seconds this state spent running
 * its load and its hook calls (the current one so far included), never the
 * process's CPU time, which would tell one tenant how busy the others keep
 * the gateway. */
static int l_clock(lua_State *L) {
  tg_policy_state_t *st = state_of(L);
  uint64_t ns = st->clock_ns;
  if (st->call_start_ns)
    ns += now_ns() - st->call_start_ns;
  lua_pushnumber(L, (double)ns / 1e9);
  return 1;
}

static int l_now(lua_State *L) {
  lua_pushnumber(L, wall_now());
  return 1;
}

/* The sandbox options every load of a policy gets, into the table on top:
 * tollgate.tenant and .version, the clock and guard of this runtime, and
 * tollgate.money (at stack index 1) as the one module require() returns. */
static void set_common_opts(lua_State *L, const char *tenant, const char *version) {
  lua_pushstring(L, tenant ? tenant : "");
  lua_setfield(L, -2, "tenant");
  lua_pushstring(L, version ? version : "");
  lua_setfield(L, -2, "version");
  lua_pushcfunction(L, l_now);
  lua_setfield(L, -2, "now");
  lua_pushcfunction(L, l_guard);
  lua_setfield(L, -2, "guard");
  lua_createtable(L, 0, 1);
  lua_pushvalue(L, 1);
  lua_setfield(L, -2, "tollgate.money");
  lua_setfield(L, -2, "modules");
}

/* Lets `burst` lines per second through; returns false to drop one. */
static bool log_allowed(double *window, unsigned *lines, unsigned *dropped) {
  double t = wall_now();
  if (t - *window >= 1.0) {
    *window = t;
    *lines = 0;
  }
  if (*lines >= LOG_LINES_PER_SEC) {
    (*dropped)++;
    return false;
  }
  (*lines)++;
  return true;
}

static int l_log(lua_State *L) {
  tg_policy_state_t *st = state_of(L);
  const char *level = luaL_checkstring(L, 1);
  const char *msg = luaL_checkstring(L, 2);
  if (!log_allowed(&st->log_window, &st->log_lines, &st->log_dropped))
    return 0;
  int lv = tg_log_level_parse(level);
  char dropped[24];
  snprintf(dropped, sizeof dropped, "%u", st->log_dropped);
  st->log_dropped = 0;
  char version[TG_POLICY_VERSION_SHOWN + 1];
  snprintf(version, sizeof version, "%.*s", TG_POLICY_VERSION_SHOWN, st->version);
  tg_log(lv < 0 ? TG_LOG_INFO : (tg_log_level_t)lv, msg, "source", "policy", "tenant_id",
         st->tenant, "version", version, "dropped_before", dropped, NULL);
  return 0;
}

/* sandbox run_fixtures opts.on_call(hook, label): each fixture gets a full
 * hook time limit, and a limit hit names it. */
static int l_on_call(lua_State *L) {
  tg_policy_state_t *st = state_of(L);
  const char *label = lua_tostring(L, 2);
  snprintf(st->fixture, sizeof st->fixture, "%s", label ? label : "fixture");
  arm(st, st->time_limit_ms);
  return 0;
}

/* ---- Views over the C structs: userdata whose __index reads the struct of
 * the current call. One userdata per kind per state, reused for every call,
 * so a hook call allocates nothing for its arguments. */

static const char *const req_fields[] = {"method", "path", "query", "host", "tenant",
                                         "ip", "user_agent", "purpose", "purposes", "ai_id",
                                         "ai_name", "user_type", "country", "header",
                                         "kind", "uri", "rpc", NULL};
static const char *const offer_fields[] = {"uri", "model", "amount", "currency", "purposes",
                                           "lastmod", "license_url", NULL};
static const char *const txn_fields[] = {"id", "tenant", "amount", "currency", "ai_id",
                                         "billing_ref", "items", "attempts", "reason",
                                         "network", "payer", "transaction", "error", "failing_ms", NULL};
static const char *const sale_fields[] = {"amount", "currency", "network", "asset", "payer",
                                          "scheme", NULL};

static int field_index(const char *const *names, const char *k, size_t len) {
  for (int i = 0; names[i]; i++)
    if (names[i][0] == k[0] && strlen(names[i]) == len && memcmp(names[i], k, len) == 0)
      return i;
  return -1;
}

static void push_str(lua_State *L, const char *s) {
  if (s)
    lua_pushstring(L, s);
  else
    lua_pushnil(L);
}

static void push_list(lua_State *L, const char *const *items, size_t n) {
  lua_createtable(L, (int)n, 0);
  for (size_t i = 0; i < n; i++) {
    push_str(L, items[i]);
    lua_rawseti(L, -2, (int)i + 1);
  }
}

static tg_pview_t *check_view(lua_State *L, int idx) {
  tg_pview_t *v = lua_touserdata(L, idx);
  if (v->data == NULL)
    luaL_error(L, "view '%s' used outside its hook call", view_names[v->kind]);
  return v;
}

static int l_req_header(lua_State *L) {
  tg_pview_t *self = lua_touserdata(L, lua_upvalueindex(1));
  int arg = lua_touserdata(L, 1) == self ? 2 : 1; /* req:header(n) and req.header(n) */
  size_t nlen;
  const char *name = luaL_checklstring(L, arg, &nlen);
  const tg_policy_req_t *req = check_view(L, lua_upvalueindex(1))->data;
  size_t vlen = 0;
  const char *v = req->header ? req->header(req->header_ud, name, nlen, &vlen) : NULL;
  if (v)
    lua_pushlstring(L, v, vlen);
  else
    lua_pushnil(L);
  return 1;
}

static int req_index(lua_State *L, const tg_policy_req_t *r, int f) {
  switch (f) {
  case 0: push_str(L, r->method); break;
  case 1: push_str(L, r->path); break;
  case 2: push_str(L, r->query); break;
  case 3: push_str(L, r->host); break;
  case 4: push_str(L, r->tenant); break;
  case 5: push_str(L, r->ip); break;
  case 6: push_str(L, r->user_agent); break;
  case 7: push_str(L, r->npurposes ? r->purposes[0] : NULL); break;
  case 8: push_list(L, r->purposes, r->npurposes); break;
  case 9: push_str(L, r->ai_id); break;
  case 10: push_str(L, r->ai_name); break;
  case 11: push_str(L, r->user_type); break;
  case 12: push_str(L, r->country); break;
  case 14: lua_pushstring(L, r->kind == TG_POLICY_KIND_CONNECT ? "connect" : "http"); break;
  case 15: push_str(L, r->uri); break;
  case 16: push_str(L, r->rpc); break;
  default: lua_pushnil(L);
  }
  return 1;
}

static int offer_index(lua_State *L, const tg_policy_offer_t *o, int f) {
  switch (f) {
  case 0: push_str(L, o->uri); break;
  case 1: push_str(L, o->model); break;
  case 2:
    /* No currency means no price at all: nil, never a 0 a policy could pass
     * on as "free". */
    if (o->currency)
      lua_pushnumber(L, (lua_Number)o->amount);
    else
      lua_pushnil(L);
    break;
  case 3: push_str(L, o->currency); break;
  case 4: push_list(L, o->purposes, o->npurposes); break;
  case 5:
    if (o->lastmod)
      lua_pushnumber(L, (lua_Number)o->lastmod);
    else
      lua_pushnil(L);
    break;
  case 6: push_str(L, o->license_url); break;
  default: lua_pushnil(L);
  }
  return 1;
}

static int txn_index(lua_State *L, const tg_policy_txn_t *t, int f) {
  char ref[TG_REDACT_REF_LEN];
  switch (f) {
  case 0: push_str(L, t->id); break;
  case 1: push_str(L, t->tenant); break;
  case 2: lua_pushnumber(L, (lua_Number)t->amount); break;
  case 3: push_str(L, t->currency); break;
  case 4: push_str(L, t->ai_id); break;
  case 5:
    if (t->billing_ref) {
      tg_redact_ref(t->billing_ref, ref, sizeof ref);
      lua_pushstring(L, ref);
    } else {
      lua_pushnil(L);
    }
    break;
  case 6: lua_pushnumber(L, t->items); break;
  case 7: lua_pushnumber(L, t->attempts); break;
  case 8: push_str(L, t->reason); break;
  case 9: push_str(L, t->network); break;
  case 10: push_str(L, t->payer); break;
  case 11: push_str(L, t->transaction); break;
  case 12: push_str(L, t->error); break;
  case 13: lua_pushnumber(L, (lua_Number)t->failing_ms); break;
  default: lua_pushnil(L);
  }
  return 1;
}

static int sale_index(lua_State *L, const tg_policy_sale_t *s, int f) {
  switch (f) {
  case 0: lua_pushnumber(L, (lua_Number)s->amount); break;
  case 1: push_str(L, s->currency); break;
  case 2: push_str(L, s->network); break;
  case 3: push_str(L, s->asset); break;
  case 4: push_str(L, s->payer); break;
  case 5: push_str(L, s->scheme); break;
  default: lua_pushnil(L);
  }
  return 1;
}

/* __index(view, key); upvalue 1: the header closure (req only). */
static int l_view_index(lua_State *L) {
  tg_pview_t *v = check_view(L, 1);
  size_t len = 0;
  const char *k = lua_type(L, 2) == LUA_TSTRING ? lua_tolstring(L, 2, &len) : NULL;
  if (k == NULL || len == 0) {
    lua_pushnil(L);
    return 1;
  }
  switch (v->kind) {
  case TG_VIEW_REQ: {
    int f = field_index(req_fields, k, len);
    if (f == 13) { /* header: the closure lives in the metatable */
      lua_getmetatable(L, 1);
      lua_rawgeti(L, -1, 1);
      return 1;
    }
    return req_index(L, v->data, f);
  }
  case TG_VIEW_OFFER:
    return offer_index(L, v->data, field_index(offer_fields, k, len));
  case TG_VIEW_SALE:
    return sale_index(L, v->data, field_index(sale_fields, k, len));
  default:
    return txn_index(L, v->data, field_index(txn_fields, k, len));
  }
}

static int l_view_newindex(lua_State *L) {
  tg_pview_t *v = lua_touserdata(L, 1);
  const char *k = lua_type(L, 2) == LUA_TSTRING ? lua_tostring(L, 2) : "?";
  return luaL_error(L, "attempt to modify read-only view '%s' (field '%s')", view_names[v->kind],
                    k);
}

static int l_view_tostring(lua_State *L) {
  tg_pview_t *v = lua_touserdata(L, 1);
  lua_pushstring(L, view_names[v->kind]);
  return 1;
}

static void make_view(tg_policy_state_t *st, int kind) {
  lua_State *L = st->L;
  tg_pview_t *v = lua_newuserdata(L, sizeof *v);
  v->kind = kind;
  v->data = NULL;
  v->st = st;
  lua_createtable(L, 1, 4);
  lua_pushcfunction(L, l_view_index);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, l_view_newindex);
  lua_setfield(L, -2, "__newindex");
  lua_pushcfunction(L, l_view_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pushboolean(L, 0);
  lua_setfield(L, -2, "__metatable");
  if (kind == TG_VIEW_REQ) {
    lua_pushvalue(L, -2);
    lua_pushcclosure(L, l_req_header, 1);
    lua_rawseti(L, -2, 1);
  }
  lua_setmetatable(L, -2);
  st->view[kind] = v;
  st->view_ref[kind] = luaL_ref(L, LUA_REGISTRYINDEX);
}

/* ---- Building a state */

typedef struct init_ctx {
  tg_policy_state_t *st;
  const tg_pstate_cfg_t *cfg;
  bool fixtures;
  const char *stage;           /* what failed, for messages about the embedded code */
} init_ctx_t;

/* The embedded runtime is compiled to bytecode once per process: parsing
 * sandbox.lua takes 2 ms, loading its bytecode 0.06 ms, and every reload
 * builds a state per worker. Only this trusted code is ever loaded as
 * bytecode; policies are refused it. */
static const char *const runtime_modules[] = {"tollgate/money.lua", "tollgate/sandbox.lua"};
#define NRUNTIME (sizeof runtime_modules / sizeof runtime_modules[0])

typedef struct bytecode {
  char *data;
  size_t len, cap;
} bytecode_t;

static bytecode_t precompiled[NRUNTIME];
static pthread_once_t precompile_once = PTHREAD_ONCE_INIT;

static int bytecode_write(lua_State *L, const void *p, size_t sz, void *ud) {
  (void)L;
  bytecode_t *b = ud;
  if (b->len + sz > b->cap) {
    size_t cap = (b->len + sz) * 2;
    char *n = realloc(b->data, cap);
    if (n == NULL)
      return 1;
    b->data = n;
    b->cap = cap;
  }
  memcpy(b->data + b->len, p, sz);
  b->len += sz;
  return 0;
}

static void precompile(void) {
  lua_State *L = luaL_newstate();
  if (L == NULL)
    return;
  for (size_t i = 0; i < NRUNTIME; i++) {
    size_t len;
    const char *src = tg_policy_embedded(runtime_modules[i], &len);
    char chunk[96];
    snprintf(chunk, sizeof chunk, "=lua/%s", runtime_modules[i]);
    bytecode_t b = {0};
    if (src && luaL_loadbuffer(L, src, len, chunk) == 0 && lua_dump(L, bytecode_write, &b) == 0)
      precompiled[i] = b; /* kept for the life of the process */
    else
      free(b.data); /* the source is parsed per state instead */
    lua_settop(L, 0);
  }
  lua_close(L);
}

static void load_embedded(lua_State *L, size_t i) {
  pthread_once(&precompile_once, precompile);
  char chunk[96];
  snprintf(chunk, sizeof chunk, "=lua/%s", runtime_modules[i]);
  size_t len = precompiled[i].len;
  const char *code = precompiled[i].data;
  if (code == NULL)
    code = tg_policy_embedded(runtime_modules[i], &len);
  if (code == NULL)
    luaL_error(L, "embedded lua/%s is missing", runtime_modules[i]);
  if (luaL_loadbuffer(L, code, len, chunk) != 0)
    lua_error(L);
  lua_call(L, 0, 1);
}

/* The trusted runtime every state starts with: the base libraries without
 * what no code here may reach, then tollgate.money at stack index 1 and
 * tollgate.sandbox at 2. */
static void init_runtime(lua_State *L, init_ctx_t *c) {
  tg_policy_state_t *st = c->st;

  /* No io, package, debug, jit (opening it would re-enable the JIT) or ffi. */
  static const lua_CFunction libs[] = {luaopen_base, luaopen_table, luaopen_string,
                                       luaopen_math, luaopen_os};
  for (size_t i = 0; i < sizeof libs / sizeof libs[0]; i++) {
    lua_pushcfunction(L, libs[i]);
    lua_call(L, 0, 0);
  }
  /* The trusted code needs none of these: gone before anything else runs. */
  static const char *const os_drop[] = {"execute", "exit", "getenv", "remove", "rename",
                                        "tmpname", "setlocale", NULL};
  lua_getglobal(L, "os");
  for (int i = 0; os_drop[i]; i++) {
    lua_pushnil(L);
    lua_setfield(L, -2, os_drop[i]);
  }
  lua_pop(L, 1);
  static const char *const g_drop[] = {"dofile", "loadfile", "collectgarbage", "gcinfo", NULL};
  for (int i = 0; g_drop[i]; i++) {
    lua_pushnil(L);
    lua_setglobal(L, g_drop[i]);
  }

  lua_pushstring(L, "policy exceeded its time limit");
  st->timeout_msg_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushstring(L, "policy exceeded its memory limit");
  st->memory_msg_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushstring(L, "C stack overflow (library functions calling back into Lua nested too deeply)");
  st->cstack_msg_ref = luaL_ref(L, LUA_REGISTRYINDEX);

  c->stage = "lua/tollgate/money.lua";
  load_embedded(L, 0); /* 1: money */
  c->stage = "lua/tollgate/sandbox.lua";
  load_embedded(L, 1); /* 2: sandbox */
  c->stage = NULL;

  lua_getfield(L, 2, "harden");
  lua_pushboolean(L, 1);
  lua_call(L, 1, 0);
  lua_getfield(L, 2, "set_cstack");
  lua_getglobal(L, "string");
  lua_getfield(L, -1, "gsub");
  lua_getfield(L, -2, "format");
  lua_remove(L, -3);
  lua_getglobal(L, "table");
  lua_getfield(L, -1, "sort");
  lua_remove(L, -2);
  lua_pushcclosure(L, l_cstack, 3);
  lua_call(L, 1, 0);
}

static int init_state(lua_State *L) {
  init_ctx_t *c = lua_touserdata(L, 1);
  tg_policy_state_t *st = c->st;
  const tg_pstate_cfg_t *cfg = c->cfg;
  lua_settop(L, 0);
  init_runtime(L, c);

  lua_getfield(L, 2, "load"); /* 3 */
  lua_pushlstring(L, cfg->source, cfg->len);
  lua_pushstring(L, cfg->chunkname);
  lua_createtable(L, 0, 7); /* opts */
  set_common_opts(L, cfg->tenant, cfg->gateway_version);
  lua_pushcfunction(L, l_log);
  lua_setfield(L, -2, "log");
  lua_pushcfunction(L, l_clock);
  lua_setfield(L, -2, "clock");
  lua_call(L, 3, 2);
  if (lua_isnil(L, -2))
    return lua_error(L); /* the message: "FILE:LINE: reason" */
  lua_pop(L, 1);
  int policy = lua_gettop(L); /* 3 */
  lua_getfield(L, policy, "fixtures");
  st->nfixtures = (unsigned)lua_objlen(L, -1);
  lua_pop(L, 1);

  if (c->fixtures) {
    lua_getfield(L, 2, "run_fixtures");
    lua_pushvalue(L, policy);
    lua_createtable(L, 0, 2);
    lua_pushcfunction(L, l_on_call);
    lua_setfield(L, -2, "on_call");
    lua_pushcfunction(L, l_guard);
    lua_setfield(L, -2, "guard");
    lua_call(L, 2, 2);
    if (!lua_toboolean(L, -2)) {
      const char *display = cfg->chunkname[0] == '@' ? cfg->chunkname + 1 : cfg->chunkname;
      st->fixture[0] = '\0'; /* the message names it already */
      lua_pushfstring(L, "%s: %s", display, lua_tostring(L, -1));
      return lua_error(L);
    }
    lua_pop(L, 2);
    /* What is left is the runtime's own bookkeeping: under the load limit. */
    st->fixture[0] = '\0';
    arm(st, st->load_time_limit_ms);
  }

  lua_getfield(L, 2, "finish");
  for (int h = 0; h < TG_POLICY_NHOOKS; h++) {
    lua_getfield(L, policy, hook_names[h]);
    st->hook_ref[h] = lua_isfunction(L, -1) ? luaL_ref(L, LUA_REGISTRYINDEX) : LUA_NOREF;
    if (st->hook_ref[h] == LUA_NOREF)
      lua_pop(L, 1);
    lua_getfield(L, -1, hook_names[h]);
    st->finish_ref[h] = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  lua_pop(L, 1);
  for (int k = 0; k < TG_NVIEWS; k++)
    make_view(st, k);
  lua_settop(L, 0);
  return 0;
}

static void error_text(lua_State *L, int idx, char *out, size_t outlen) {
  /* Never a metamethod: an error object's __tostring could run forever. */
  if (lua_type(L, idx) == LUA_TSTRING || lua_type(L, idx) == LUA_TNUMBER)
    snprintf(out, outlen, "%s", lua_tostring(L, idx));
  else
    snprintf(out, outlen, "(error object is a %s value)", luaL_typename(L, idx));
}

static int classify(const tg_policy_state_t *st, int status) {
  if (st->timed_out)
    return TG_POLICY_ERR_TIMEOUT;
  if (st->mem_failed || status == LUA_ERRMEM)
    return TG_POLICY_ERR_MEMORY;
  return TG_POLICY_ERR_RUNTIME;
}

/* A state with its limits and an empty Lua state (JIT off, count hook on);
 * NULL when out of memory. */
static tg_policy_state_t *state_create(const tg_pstate_cfg_t *cfg) {
  tg_policy_state_t *st = calloc(1, sizeof *st);
  if (st == NULL)
    return NULL;
  st->mem_limit = cfg->memory_limit ? cfg->memory_limit : TG_POLICY_DEFAULT_MEMORY_LIMIT;
  st->time_limit_ms = cfg->time_limit_ms ? cfg->time_limit_ms : TG_POLICY_DEFAULT_TIME_LIMIT_MS;
  st->load_time_limit_ms =
      cfg->load_time_limit_ms ? cfg->load_time_limit_ms : TG_POLICY_DEFAULT_LOAD_TIME_LIMIT_MS;
  st->deadline_ns = UINT64_MAX;
  snprintf(st->tenant, sizeof st->tenant, "%s", cfg->tenant ? cfg->tenant : "");
  snprintf(st->version, sizeof st->version, "%s", cfg->version ? cfg->version : "");
  for (int h = 0; h < TG_POLICY_NHOOKS; h++)
    st->hook_ref[h] = st->finish_ref[h] = LUA_NOREF;
  tg_policy_metrics_t m;
  tg_policy_metrics_get(&m);
  st->m_errors = m.errors;
  st->m_duration = m.duration;

  st->timeout_msg_ref = st->memory_msg_ref = st->cstack_msg_ref = LUA_NOREF;
  st->L = lua_newstate(state_alloc, st);
  if (st->L == NULL) {
    tg_pstate_free(st);
    return NULL;
  }
  /* Count hooks do not fire inside compiled traces: the JIT stays off. */
  luaJIT_setmode(st->L, 0, LUAJIT_MODE_ENGINE | LUAJIT_MODE_OFF);
  lua_sethook(st->L, count_hook, LUA_MASKCOUNT, HOOK_COUNT);
  return st;
}

/* Runs fn(ctx) in a protected call under the load time limit; on failure
 * returns the TG_POLICY_ERR_* kind with err "FILE...: reason". */
static int run_protected(tg_policy_state_t *st, lua_CFunction fn, init_ctx_t *c,
                         const char *display, char *err, size_t errlen) {
  call_begin(st, st->load_time_limit_ms);
  int status = lua_cpcall(st->L, fn, c);
  call_end(st);
  if (status == 0 && !st->timed_out)
    return 0;
  char msg[TG_POLICY_MSG_LEN];
  if (status != 0)
    error_text(st->L, -1, msg, sizeof msg);
  else
    msg[0] = '\0';
  int kind = classify(st, status);
  if (kind == TG_POLICY_ERR_TIMEOUT && st->fixture[0])
    snprintf(err, errlen, "%s: %s: exceeded its time limit (%u ms)", display, st->fixture,
             st->time_limit_ms);
  else if (kind == TG_POLICY_ERR_TIMEOUT)
    snprintf(err, errlen, "%s: %s (%u ms)", display,
             c->stage ? "the embedded runtime took too long to load" :
                        "loading ran past its time limit", st->load_time_limit_ms);
  else if (kind == TG_POLICY_ERR_MEMORY && st->fixture[0])
    snprintf(err, errlen, "%s: %s: exceeded its memory limit (%zu bytes)", display,
             st->fixture, st->mem_limit);
  else if (kind == TG_POLICY_ERR_MEMORY)
    snprintf(err, errlen, "%s: loading exceeded the memory limit (%zu bytes)", display,
             st->mem_limit);
  else if (c->stage)
    snprintf(err, errlen, "%s: %s failed: %s", display, c->stage, msg);
  else
    snprintf(err, errlen, "%s", msg);
  return kind;
}

static const char *display_of(const char *chunkname) {
  return chunkname[0] == '@' ? chunkname + 1 : chunkname;
}

tg_policy_state_t *tg_pstate_new(const tg_pstate_cfg_t *cfg, bool fixtures, int *code,
                                 char *err, size_t errlen) {
  const char *display = display_of(cfg->chunkname);
  tg_policy_state_t *st = state_create(cfg);
  if (st == NULL) {
    *code = -ENOMEM;
    snprintf(err, errlen, "%s: out of memory", display);
    return NULL;
  }
  init_ctx_t c = {st, cfg, fixtures, NULL};
  int kind = run_protected(st, init_state, &c, display, err, errlen);
  if (kind != 0) {
    *code = kind;
    tg_pstate_free(st);
    return NULL;
  }
  lua_gc(st->L, LUA_GCCOLLECT, 0);
  return st;
}

/* ---- Comparing two versions (lua/tollgate/diff.lua) */

#define REPORT_KEY "tollgate.diff.report"

typedef struct compare_ctx {
  init_ctx_t init;                /* init.cfg: the candidate */
  const tg_pstate_cfg_t *live;
} compare_ctx_t;

/* diff opts.on_load: each version loads under the load time limit. */
static int l_on_load(lua_State *L) {
  tg_policy_state_t *st = state_of(L);
  st->fixture[0] = '\0';
  arm(st, st->load_time_limit_ms);
  return 0;
}

static void push_source(lua_State *L, const char *src, size_t len, const char *chunkname) {
  lua_createtable(L, 0, 2);
  lua_pushlstring(L, src, len);
  lua_setfield(L, -2, "source");
  lua_pushstring(L, chunkname);
  lua_setfield(L, -2, "chunkname");
}

static int compare_state(lua_State *L) {
  compare_ctx_t *c = lua_touserdata(L, 1);
  const tg_pstate_cfg_t *cand = c->init.cfg;
  lua_settop(L, 0);
  init_runtime(L, &c->init);
  c->init.stage = "lua/tollgate/diff.lua";
  size_t len = 0;
  const char *code = tg_policy_embedded("tollgate/diff.lua", &len);
  if (code == NULL)
    luaL_error(L, "not embedded in this build");
  if (luaL_loadbuffer(L, code, len, "=lua/tollgate/diff.lua") != 0)
    lua_error(L);
  lua_call(L, 0, 1); /* 3: diff */
  c->init.stage = NULL;

  lua_getfield(L, 3, "compare");
  lua_pushvalue(L, 2);
  lua_createtable(L, 0, 12);
  push_source(L, c->live->source, c->live->len, c->live->chunkname);
  lua_setfield(L, -2, "live");
  push_source(L, cand->source, cand->len, cand->chunkname);
  lua_setfield(L, -2, "candidate");
  const char *dflt = tg_policy_embedded("default_policy.lua", &len);
  if (dflt) {
    push_source(L, dflt, len, "@default_policy.lua");
    lua_setfield(L, -2, "default");
  }
  set_common_opts(L, cand->tenant, cand->gateway_version);
  lua_pushcfunction(L, l_on_call);
  lua_setfield(L, -2, "on_call");
  lua_pushcfunction(L, l_on_load);
  lua_setfield(L, -2, "on_load");
  lua_pushinteger(L, TG_POLICY_DIFF_MAX);
  lua_setfield(L, -2, "max");
  lua_call(L, 2, 1);
  lua_setfield(L, LUA_REGISTRYINDEX, REPORT_KEY);
  return 0;
}

/* A JSON string of the Lua string at idx, cut at max bytes: bytes kept (NUL
 * too), ill-formed UTF-8 (a cut code point too) repaired. Error messages
 * and fixture names are the policy's text, of any length. */
static json_t *json_lua_string(lua_State *L, int idx, size_t max) {
  size_t len;
  const char *s = lua_tolstring(L, idx, &len);
  return tg_utf8_json_stringn(s, len > max ? max : len);
}

/* The checked results of a hook call are strings, numbers and booleans. */
static json_t *json_lua_value(lua_State *L, int idx) {
  switch (lua_type(L, idx)) {
  case LUA_TSTRING:
    return json_lua_string(L, idx, TG_POLICY_KEY_MAX); /* keys and currencies are shorter */
  case LUA_TBOOLEAN:
    return json_boolean(lua_toboolean(L, idx));
  case LUA_TNUMBER: {
    double v = lua_tonumber(L, idx);
    if (v == floor(v) && fabs(v) <= 9007199254740992.0)
      return json_integer((json_int_t)v);
    return json_real(v);
  }
  default:
    return json_null();
  }
}

/* outcome at the top of the stack: [values...] or {"error": "..."}. */
static json_t *json_outcome(lua_State *L) {
  lua_getfield(L, -1, "error");
  if (lua_type(L, -1) == LUA_TSTRING) {
    json_t *e = json_lua_string(L, -1, TG_POLICY_MSG_LEN);
    lua_pop(L, 1);
    return json_pack("{s:o}", "error", e ? e : json_null());
  }
  lua_pop(L, 1);
  lua_getfield(L, -1, "n");
  int n = (int)lua_tointeger(L, -1);
  lua_pop(L, 1);
  json_t *a = json_array();
  lua_getfield(L, -1, "values");
  for (int i = 1; a && i <= n; i++) {
    lua_rawgeti(L, -1, i);
    json_array_append_new(a, json_lua_value(L, -1));
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  return a;
}

static json_t *json_report(lua_State *L) {
  lua_getfield(L, LUA_REGISTRYINDEX, REPORT_KEY);
  if (!lua_istable(L, -1))
    return NULL;
  lua_getfield(L, -1, "compared");
  json_int_t compared = (json_int_t)lua_tonumber(L, -1);
  lua_getfield(L, -2, "differing");
  json_int_t differing = (json_int_t)lua_tonumber(L, -1);
  lua_pop(L, 2);
  json_t *list = json_array();
  lua_getfield(L, -1, "differences");
  int n = (int)lua_objlen(L, -1);
  for (int i = 1; list && i <= n; i++) {
    lua_rawgeti(L, -1, i);
    lua_getfield(L, -1, "from");
    lua_getfield(L, -2, "index");
    lua_getfield(L, -3, "name");
    lua_getfield(L, -4, "hook");
    json_t *fixture = json_pack("{s:s, s:I}", "of", lua_tostring(L, -4), "index",
                                (json_int_t)lua_tonumber(L, -3));
    if (fixture && lua_type(L, -2) == LUA_TSTRING)
      json_object_set_new(fixture, "name", json_lua_string(L, -2, 160));
    json_t *d = json_pack("{s:o*, s:s}", "fixture", fixture, "hook", lua_tostring(L, -1));
    lua_pop(L, 4);
    lua_getfield(L, -1, "live");
    if (d)
      json_object_set_new(d, "live", json_outcome(L));
    lua_pop(L, 1);
    lua_getfield(L, -1, "candidate");
    if (d)
      json_object_set_new(d, "candidate", json_outcome(L));
    lua_pop(L, 2);
    json_array_append_new(list, d);
  }
  lua_pop(L, 2);
  return json_pack("{s:I, s:I, s:o*}", "compared", compared, "differing", differing,
                   "differences", list);
}

int tg_pstate_compare(const tg_pstate_cfg_t *live, const tg_pstate_cfg_t *cand, json_t **out,
                      char *err, size_t errlen) {
  *out = NULL;
  const char *display = display_of(cand->chunkname);
  tg_policy_state_t *st = state_create(cand);
  if (st == NULL) {
    snprintf(err, errlen, "%s: out of memory", display);
    return -ENOMEM;
  }
  compare_ctx_t c = {{st, cand, false, NULL}, live};
  int kind = run_protected(st, compare_state, &c.init, display, err, errlen);
  if (kind == 0) {
    /* Reading the report allocates nothing in Lua; no limit may raise now,
     * outside a protected call. */
    st->mem_limit = SIZE_MAX;
    *out = json_report(st->L);
    if (*out == NULL) {
      snprintf(err, errlen, "%s: out of memory", display);
      kind = -ENOMEM;
    }
  }
  tg_pstate_free(st);
  return kind;
}

void tg_pstate_free(tg_policy_state_t *st) {
  if (st == NULL)
    return;
  if (st->L)
    lua_close(st->L);
  free(st);
}

/* ---- Hook calls */

static const char *const kind_names[] = {"error", "timeout", "memory", "type"};

static void fail(tg_policy_state_t *st, int hook, int code, const char *reason,
                 const char *request_id, tg_policy_error_t *err) {
  const char *kind = kind_names[code == TG_POLICY_ERR_TIMEOUT  ? 1
                                : code == TG_POLICY_ERR_MEMORY ? 2
                                : code == TG_POLICY_ERR_TYPE   ? 3
                                                               : 0];
  char msg[TG_POLICY_MSG_LEN];
  snprintf(msg, sizeof msg, "policy %s: %s: %s", st->tenant, hook_names[hook], reason);
  if (err) {
    err->code = code;
    memcpy(err->msg, msg, sizeof msg);
  }
  const char *labels[] = {st->tenant, hook_names[hook], kind};
  tg_counter_add(st->m_errors, labels, 1);
  if (log_allowed(&st->err_window, &st->err_lines, &st->err_dropped)) {
    char dropped[24], version[TG_POLICY_VERSION_SHOWN + 1];
    snprintf(dropped, sizeof dropped, "%u", st->err_dropped);
    snprintf(version, sizeof version, "%.*s", TG_POLICY_VERSION_SHOWN, st->version);
    st->err_dropped = 0;
    tg_log_req(TG_LOG_WARN, request_id, "policy hook failed", "tenant_id", st->tenant, "hook",
               hook_names[hook], "kind", kind, "reason", msg, "version", version,
               "dropped_before", dropped, NULL);
  }
}

/* Pushes the hook function and the views (data set for this call).
 * Returns false when the policy has no such hook. */
static bool begin(tg_policy_state_t *st, int hook, const void *a, int ka, const void *b,
                  int kb) {
  if (st->hook_ref[hook] == LUA_NOREF)
    return false;
  lua_State *L = st->L;
  lua_settop(L, 0);
  lua_rawgeti(L, LUA_REGISTRYINDEX, st->hook_ref[hook]);
  st->view[ka]->data = a;
  lua_rawgeti(L, LUA_REGISTRYINDEX, st->view_ref[ka]);
  if (b) {
    st->view[kb]->data = b;
    lua_rawgeti(L, LUA_REGISTRYINDEX, st->view_ref[kb]);
  }
  return true;
}

static bool is_integer_in(lua_State *L, int idx, double lo, double hi) {
  if (lua_type(L, idx) != LUA_TNUMBER)
    return false;
  double v = lua_tonumber(L, idx);
  return v >= lo && v <= hi && v == floor(v); /* NaN fails every comparison */
}

static bool ascii_alpha(unsigned char c) { return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z'); }

/* [A-Za-z][A-Za-z0-9]{0,15}, as sandbox.lua's pattern (not the locale's isalpha). */
static bool currency_ok(lua_State *L, int idx) {
  size_t n;
  if (lua_type(L, idx) != LUA_TSTRING)
    return false;
  const char *c = lua_tolstring(L, idx, &n);
  if (n == 0 || n > TG_POLICY_CURRENCY_MAX || !ascii_alpha((unsigned char)c[0]))
    return false;
  for (size_t i = 1; i < n; i++)
    if (!ascii_alpha((unsigned char)c[i]) && !(c[i] >= '0' && c[i] <= '9'))
      return false;
  return true;
}

/* The return rules of sandbox.lua (FINISH), checked here on the values at
 * stack 1..3 so that a good result costs no Lua call; the two must agree
 * (spec/core/policy_test.c checks every rule through the C runtime). */
static bool result_ok(lua_State *L, int hook) {
  switch (hook) {
  case TG_POLICY_HOOK_SKIP:
    return lua_isnil(L, 1) || lua_isboolean(L, 1);
  case TG_POLICY_HOOK_RATE_LIMIT: {
    if (lua_isnil(L, 1))
      return true;
    size_t n;
    if (lua_type(L, 1) != LUA_TSTRING || (lua_tolstring(L, 1, &n), n == 0 || n > TG_POLICY_KEY_MAX) ||
        lua_type(L, 2) != LUA_TNUMBER)
      return false;
    double rate = lua_tonumber(L, 2);
    return rate > 0 && rate < HUGE_VAL && is_integer_in(L, 3, 1, 2147483647.0);
  }
  case TG_POLICY_HOOK_PRICE:
    return lua_isnil(L, 1) || (is_integer_in(L, 1, 0, 9007199254740992.0) && currency_ok(L, 2));
  case TG_POLICY_HOOK_ON_BILLING_TIMEOUT: {
    const char *v = lua_type(L, 1) == LUA_TSTRING ? lua_tostring(L, 1) : NULL;
    return v && (strcmp(v, "reject") == 0 || strcmp(v, "deferred") == 0);
  }
  case TG_POLICY_HOOK_SETTLE: {
    const char *v = lua_type(L, 1) == LUA_TSTRING ? lua_tostring(L, 1) : NULL;
    return v && (strcmp(v, "sync") == 0 || strcmp(v, "async") == 0);
  }
  default:
    return true;
  }
}

/* A result that breaks the rules: the sandbox's FINISH function says why, in
 * the words the harness and `tollgate check` use. Leaves the reason in out. */
static void result_reason(tg_policy_state_t *st, int hook, char *out, size_t outlen) {
  lua_State *L = st->L;
  lua_rawgeti(L, LUA_REGISTRYINDEX, st->finish_ref[hook]);
  lua_insert(L, 1);
  if (lua_pcall(L, 3, 2, 0) == 0 && !lua_toboolean(L, 1) && lua_type(L, 2) == LUA_TSTRING)
    snprintf(out, outlen, "%s", lua_tostring(L, 2));
  else
    snprintf(out, outlen, "returned values of the wrong type");
  lua_settop(L, 0);
}

/* Runs the call; on success leaves ok, v1, v2, v3 at stack 1..4 with ok
 * true. Returns 0 or an error code (already reported). */
static int finish(tg_policy_state_t *st, int hook, int nargs, const char *request_id,
                  tg_policy_error_t *err) {
  lua_State *L = st->L;
  call_begin(st, st->time_limit_ms);
  int status = lua_pcall(L, nargs, 3, 0);
  uint64_t took = call_end(st);
  for (int k = 0; k < TG_NVIEWS; k++)
    st->view[k]->data = NULL;
  const char *labels[] = {st->tenant, hook_names[hook]};
  tg_histogram_observe(st->m_duration, labels, (double)took / 1e9);

  if (status != 0 || st->timed_out || st->mem_failed) {
    int code = classify(st, status);
    char reason[TG_POLICY_MSG_LEN];
    if (code == TG_POLICY_ERR_TIMEOUT)
      snprintf(reason, sizeof reason, "exceeded its time limit (%u ms)", st->time_limit_ms);
    else if (code == TG_POLICY_ERR_MEMORY)
      snprintf(reason, sizeof reason, "exceeded its memory limit (%zu bytes)", st->mem_limit);
    else
      error_text(L, -1, reason, sizeof reason);
    lua_settop(L, 0);
    if (code == TG_POLICY_ERR_MEMORY) {
      lua_gc(L, LUA_GCCOLLECT, 0);
      if (st->mem_used > st->mem_limit / 4 * 3)
        st->suspect = true;
    }
    st->mem_failed = false;
    fail(st, hook, code, reason, request_id, err);
    return code;
  }
  if (!result_ok(L, hook)) {
    char reason[TG_POLICY_MSG_LEN];
    result_reason(st, hook, reason, sizeof reason);
    fail(st, hook, TG_POLICY_ERR_TYPE, reason, request_id, err);
    return TG_POLICY_ERR_TYPE;
  }
  lua_pushboolean(L, 1);
  lua_insert(L, 1);
  if (err)
    err->code = 0;
  return 0;
}

bool tg_policy_has_hook(const tg_policy_state_t *st, tg_policy_hook_t hook) {
  return (unsigned)hook < TG_POLICY_NHOOKS && st->hook_ref[hook] != LUA_NOREF;
}

const char *tg_policy_state_version(const tg_policy_state_t *st) {
  return st->version;
}

static int nohook(tg_policy_error_t *err) {
  if (err) {
    err->code = TG_POLICY_ERR_NOHOOK;
    err->msg[0] = '\0';
  }
  return TG_POLICY_ERR_NOHOOK;
}

int tg_policy_skip(tg_policy_state_t *st, const tg_policy_req_t *req, bool *skip,
                   tg_policy_error_t *err) {
  *skip = false;
  if (!begin(st, TG_POLICY_HOOK_SKIP, req, TG_VIEW_REQ, NULL, 0))
    return nohook(err);
  int rc = finish(st, TG_POLICY_HOOK_SKIP, 1, req->request_id, err);
  if (rc == 0) {
    *skip = lua_toboolean(st->L, 2);
    lua_settop(st->L, 0);
  }
  return rc;
}

int tg_policy_rate_limit(tg_policy_state_t *st, const tg_policy_req_t *req,
                         tg_policy_rate_t *out, tg_policy_error_t *err) {
  memset(out, 0, sizeof *out);
  if (!begin(st, TG_POLICY_HOOK_RATE_LIMIT, req, TG_VIEW_REQ, NULL, 0))
    return nohook(err);
  int rc = finish(st, TG_POLICY_HOOK_RATE_LIMIT, 1, req->request_id, err);
  if (rc == 0) {
    lua_State *L = st->L;
    if (lua_type(L, 2) == LUA_TSTRING) {
      size_t len;
      const char *key = lua_tolstring(L, 2, &len);
      if (len > TG_POLICY_KEY_MAX)
        len = TG_POLICY_KEY_MAX; /* the sandbox refuses longer keys already */
      memcpy(out->key, key, len);
      out->key[len] = '\0';
      out->keylen = len;
      out->rate = lua_tonumber(L, 3);
      out->burst = (uint32_t)lua_tonumber(L, 4);
      out->limited = true;
    }
    lua_settop(L, 0);
  }
  return rc;
}

static void default_price(const tg_policy_offer_t *offer, tg_policy_price_t *out) {
  if (offer->currency == NULL || strlen(offer->currency) > TG_POLICY_CURRENCY_MAX)
    return;
  out->for_sale = true;
  out->amount = offer->model && strcmp(offer->model, "free") == 0 ? 0 : offer->amount;
  snprintf(out->currency, sizeof out->currency, "%s", offer->currency);
}

int tg_policy_price(tg_policy_state_t *st, const tg_policy_offer_t *offer,
                    const tg_policy_req_t *req, tg_policy_price_t *out, tg_policy_error_t *err) {
  memset(out, 0, sizeof *out);
  if (!begin(st, TG_POLICY_HOOK_PRICE, offer, TG_VIEW_OFFER, req, TG_VIEW_REQ)) {
    default_price(offer, out);
    return nohook(err);
  }
  int rc = finish(st, TG_POLICY_HOOK_PRICE, 2, req->request_id, err);
  if (rc == 0) {
    lua_State *L = st->L;
    if (lua_type(L, 2) == LUA_TNUMBER) {
      out->for_sale = true;
      out->amount = (int64_t)lua_tonumber(L, 2);
      size_t clen = 0;
      const char *cur = lua_tolstring(L, 3, &clen);
      if (clen > TG_POLICY_CURRENCY_MAX)
        clen = TG_POLICY_CURRENCY_MAX; /* the sandbox refuses longer codes already */
      memcpy(out->currency, cur, clen);
      out->currency[clen] = '\0';
    }
    lua_settop(L, 0);
  }
  return rc;
}

int tg_policy_on_billing_timeout(tg_policy_state_t *st, const tg_policy_txn_t *txn,
                                 tg_policy_billing_t *out, tg_policy_error_t *err) {
  *out = TG_POLICY_BILLING_REJECT;
  if (!begin(st, TG_POLICY_HOOK_ON_BILLING_TIMEOUT, txn, TG_VIEW_TXN, NULL, 0))
    return nohook(err);
  int rc = finish(st, TG_POLICY_HOOK_ON_BILLING_TIMEOUT, 1, txn->request_id, err);
  if (rc == 0) {
    const char *v = lua_tostring(st->L, 2);
    if (v && strcmp(v, "deferred") == 0)
      *out = TG_POLICY_BILLING_DEFERRED;
    lua_settop(st->L, 0);
  }
  return rc;
}

int tg_policy_on_settle_failure(tg_policy_state_t *st, const tg_policy_txn_t *txn,
                                tg_policy_error_t *err) {
  if (!begin(st, TG_POLICY_HOOK_ON_SETTLE_FAILURE, txn, TG_VIEW_TXN, NULL, 0))
    return nohook(err);
  int rc = finish(st, TG_POLICY_HOOK_ON_SETTLE_FAILURE, 1, txn->request_id, err);
  if (rc == 0)
    lua_settop(st->L, 0);
  return rc;
}

int tg_policy_settle(tg_policy_state_t *st, const tg_policy_req_t *req,
                     const tg_policy_sale_t *sale, tg_policy_settle_t dflt,
                     tg_policy_settle_t *out, tg_policy_error_t *err) {
  *out = TG_POLICY_SETTLE_SYNC;
  if (!begin(st, TG_POLICY_HOOK_SETTLE, req, TG_VIEW_REQ, sale, TG_VIEW_SALE)) {
    *out = dflt == TG_POLICY_SETTLE_ASYNC ? TG_POLICY_SETTLE_ASYNC : TG_POLICY_SETTLE_SYNC;
    return nohook(err);
  }
  int rc = finish(st, TG_POLICY_HOOK_SETTLE, 2, req->request_id, err);
  if (rc == 0) {
    const char *v = lua_tostring(st->L, 2);
    if (v && strcmp(v, "async") == 0)
      *out = TG_POLICY_SETTLE_ASYNC;
    lua_settop(st->L, 0);
  }
  return rc;
}
