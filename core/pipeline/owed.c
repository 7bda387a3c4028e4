#include "pipeline/owed.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "base/hash.h"
#include "base/log.h"
#include "ledger/record.h"

#define BUCKETS 4096

typedef struct entry {
  struct entry *next;
  int in_flight;
  int64_t amount;
  char txid[40];
  char currency[17];
  char ref[257];
  char hold[64];
} entry_t;

struct tg_owed {
  pthread_mutex_t mu;
  entry_t *b[BUCKETS];
  size_t n;
  int settling; /* captures of the current round still out */
};

static size_t bucket(const char *txid) { return (size_t)(tg_fnv1a_str(txid) % BUCKETS); }

tg_owed_t *tg_owed_new(void) {
  tg_owed_t *o = calloc(1, sizeof *o);
  if (o)
    pthread_mutex_init(&o->mu, NULL);
  return o;
}

void tg_owed_free(tg_owed_t *o) {
  if (o == NULL)
    return;
  for (size_t i = 0; i < BUCKETS; i++)
    for (entry_t *e = o->b[i], *next; e; e = next) {
      next = e->next;
      free(e);
    }
  pthread_mutex_destroy(&o->mu);
  free(o);
}

int tg_owed_add(tg_owed_t *o, const char *txid, const char *ref, const char *currency, int64_t amount,
                const char *hold) {
  if (strlen(txid) >= sizeof((entry_t *)0)->txid || strlen(ref) >= sizeof((entry_t *)0)->ref ||
      strlen(currency) >= sizeof((entry_t *)0)->currency || (hold && strlen(hold) >= sizeof((entry_t *)0)->hold))
    return -EINVAL;
  size_t k = bucket(txid);
  pthread_mutex_lock(&o->mu);
  for (entry_t *e = o->b[k]; e; e = e->next)
    if (strcmp(e->txid, txid) == 0) {
      pthread_mutex_unlock(&o->mu);
      return 0;
    }
  entry_t *e = calloc(1, sizeof *e);
  if (e) {
    strcpy(e->txid, txid);
    strcpy(e->ref, ref);
    strcpy(e->currency, currency);
    strcpy(e->hold, hold ? hold : "");
    e->amount = amount;
    e->next = o->b[k];
    o->b[k] = e;
    o->n++;
  }
  pthread_mutex_unlock(&o->mu);
  return e ? 0 : -ENOMEM;
}

void tg_owed_remove(tg_owed_t *o, const char *txid) {
  size_t k = bucket(txid);
  pthread_mutex_lock(&o->mu);
  for (entry_t **pp = &o->b[k]; *pp; pp = &(*pp)->next)
    if (strcmp((*pp)->txid, txid) == 0) {
      entry_t *e = *pp;
      *pp = e->next;
      o->n--;
      free(e);
      break;
    }
  pthread_mutex_unlock(&o->mu);
}

size_t tg_owed_count(tg_owed_t *o) {
  pthread_mutex_lock(&o->mu);
  size_t n = o->n;
  pthread_mutex_unlock(&o->mu);
  return n;
}

typedef struct job {
  tg_owed_t *o;
  tg_wal_client_t *w;
  const char *instance;
  char txid[40], currency[17], ref[257], hold[64];
  int64_t amount;
} job_t;

static void job_done(job_t *j) {
  j->o->settling--;
  free(j);
}

static void on_recorded(void *arg, int status, uint64_t seq) {
  job_t *j = arg;
  (void)seq;
  if (status == 0)
    tg_owed_remove(j->o, j->txid);
  job_done(j);
}

static void unmark(job_t *j) {
  size_t k = bucket(j->txid);
  pthread_mutex_lock(&j->o->mu);
  for (entry_t *e = j->o->b[k]; e; e = e->next)
    if (strcmp(e->txid, j->txid) == 0)
      e->in_flight = 0;
  pthread_mutex_unlock(&j->o->mu);
}

static void on_captured(void *arg, int status, int64_t balance) {
  job_t *j = arg;
  (void)balance;
  if (status < 0) {
    unmark(j); /* tried again next round */
    job_done(j);
    return;
  }
  size_t len;
  uint8_t *rec = tg_record_ledger_change(LEDGER__V1__LEDGER_CHANGE_KIND__LEDGER_CHANGE_KIND_CAPTURE, j->ref,
                                         j->currency, j->amount, j->txid, NULL, j->instance, &len);
  if (rec == NULL || tg_wal_append(j->w, rec, len, on_recorded, j, NULL) != 0) {
    unmark(j);
    job_done(j);
  }
  free(rec);
}

void tg_owed_settle(tg_owed_t *o, tg_prepaid_redis_t *r, tg_wal_client_t *w, const char *instance, size_t max) {
  if (o->settling > 0 || !tg_prepaid_redis_ready(r))
    return;
  size_t started = 0;
  for (size_t k = 0; k < BUCKETS && started < max; k++) {
    pthread_mutex_lock(&o->mu);
    job_t *batch[16];
    size_t nb = 0;
    for (entry_t *e = o->b[k]; e && nb < 16 && started + nb < max; e = e->next) {
      if (e->in_flight)
        continue;
      job_t *j = calloc(1, sizeof *j);
      if (j == NULL)
        break;
      e->in_flight = 1;
      j->o = o, j->w = w, j->instance = instance, j->amount = e->amount;
      strcpy(j->txid, e->txid), strcpy(j->currency, e->currency), strcpy(j->ref, e->ref), strcpy(j->hold, e->hold);
      batch[nb++] = j;
    }
    pthread_mutex_unlock(&o->mu);
    for (size_t i = 0; i < nb; i++) {
      job_t *j = batch[i];
      o->settling++;
      started++;
      if (tg_prepaid_redis_capture(r, j->ref, j->currency, j->amount, j->hold, j->txid, on_captured, j) != 0) {
        unmark(j);
        job_done(j);
      }
    }
  }
  if (started)
    tg_log(TG_LOG_INFO, "ledger: paying owed captures to Redis", NULL);
}
