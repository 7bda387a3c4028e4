#include "billing/billing.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct builtin {
  tg_billing_t base;
  tg_prepaid_t *ledger;
} builtin_t;

static void authorize(tg_billing_t *b, const tg_billing_auth_t *a, tg_billing_cb cb, void *arg) {
  builtin_t *bi = (builtin_t *)b;
  tg_billing_result_t r = {.status = TG_BILLING_APPROVED, .available = -1};
  uint64_t hold = 0;
  int64_t available = 0;
  int rc = tg_prepaid_hold(bi->ledger, a->billing_ref, a->currency, a->amount, &hold, &available);
  if (rc == 0) {
    snprintf(r.hold, sizeof r.hold, "%" PRIu64, hold);
  } else if (rc == -ENOSPC) {
    char red[16];
    tg_billing_redact(a->billing_ref, red);
    r.status = TG_BILLING_DECLINED;
    r.available = available;
    snprintf(r.detail, sizeof r.detail,
             "account %s has %" PRId64 " %s available, %" PRId64 " needed: top it up", red, available,
             a->currency, a->amount);
  } else {
    r.status = TG_BILLING_UNAVAILABLE;
    snprintf(r.detail, sizeof r.detail, "the built-in ledger refused the hold (%s)", strerror(-rc));
  }
  cb(arg, &r);
}

static int parse_hold(const char *hold, uint64_t *out) {
  char *end;
  if (hold == NULL || hold[0] < '1' || hold[0] > '9')
    return -EINVAL;
  errno = 0;
  unsigned long long v = strtoull(hold, &end, 10);
  if (*end != '\0' || errno != 0)
    return -EINVAL;
  *out = v;
  return 0;
}

static void finish(tg_billing_t *b, const char *hold, int capture, tg_billing_cb cb, void *arg) {
  builtin_t *bi = (builtin_t *)b;
  tg_billing_result_t r = {.status = TG_BILLING_APPROVED, .available = -1};
  uint64_t id;
  int rc = parse_hold(hold, &id);
  if (rc == 0)
    rc = capture ? tg_prepaid_capture(bi->ledger, id) : tg_prepaid_release(bi->ledger, id);
  if (rc != 0) {
    r.status = TG_BILLING_DECLINED;
    snprintf(r.detail, sizeof r.detail, "no such hold (already %s?)", capture ? "captured" : "released");
  }
  cb(arg, &r);
}

static void capture(tg_billing_t *b, const char *hold, tg_billing_cb cb, void *arg) { finish(b, hold, 1, cb, arg); }
static void release(tg_billing_t *b, const char *hold, tg_billing_cb cb, void *arg) { finish(b, hold, 0, cb, arg); }
static int health(tg_billing_t *b) { return ((builtin_t *)b)->ledger ? 0 : -ENODEV; }
static void builtin_free(tg_billing_t *b) { free(b); }

static const tg_billing_ops_t builtin_ops = {"builtin", authorize, capture, release, health, builtin_free};

tg_billing_t *tg_billing_builtin_new(uv_loop_t *loop, tg_prepaid_t *ledger) {
  builtin_t *bi = calloc(1, sizeof *bi);
  if (bi == NULL)
    return NULL;
  bi->base.ops = &builtin_ops;
  bi->base.loop = loop;
  bi->ledger = ledger;
  return &bi->base;
}

const double tg_billing_auth_buckets[] = {0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005,
                                           0.01,    0.03,    0.1,    0.5,    1};
const size_t tg_billing_auth_nbuckets = sizeof tg_billing_auth_buckets / sizeof tg_billing_auth_buckets[0];

void tg_billing_free(tg_billing_t *b) {
  if (b)
    b->ops->free(b);
}

void tg_billing_redact(const char *ref, char out[16]) {
  size_t n = ref ? strlen(ref) : 0;
  if (n <= 4)
    snprintf(out, 16, "****");
  else
    snprintf(out, 16, "****%s", ref + n - 4);
}
