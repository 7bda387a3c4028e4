#include "pay/nonce.h"

#include <errno.h>
#include <pthread.h>
#include <stdalign.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include <mbedtls/sha256.h>

#define NSHARDS 64
#define SHARD_BITS 6
#define MIN_ENTRIES 64

void tg_nonce_key(const char *network, const uint8_t asset[20], const uint8_t payer[20],
                  const uint8_t nonce[32], uint8_t out[32]) {
  size_t nlen = network ? strlen(network) : 0;
  if (nlen > 255)
    nlen = 255;
  uint8_t len = (uint8_t)nlen, l20 = 20, l32 = 32;
  mbedtls_sha256_context c;
  mbedtls_sha256_init(&c);
  /* With the software SHA-256 these calls cannot fail on valid arguments. */
  (void)mbedtls_sha256_starts_ret(&c, 0);
  (void)mbedtls_sha256_update_ret(&c, &len, 1);
  (void)mbedtls_sha256_update_ret(&c, (const uint8_t *)(network ? network : ""), nlen);
  (void)mbedtls_sha256_update_ret(&c, &l20, 1);
  (void)mbedtls_sha256_update_ret(&c, asset, 20);
  (void)mbedtls_sha256_update_ret(&c, &l20, 1);
  (void)mbedtls_sha256_update_ret(&c, payer, 20);
  (void)mbedtls_sha256_update_ret(&c, &l32, 1);
  (void)mbedtls_sha256_update_ret(&c, nonce, 32);
  (void)mbedtls_sha256_finish_ret(&c, out);
  mbedtls_sha256_free(&c);
}

/* A slot is empty when expires is 0 (claims need expires > now, and Unix
 * times here are positive). */
typedef struct slot {
  uint8_t key[32];
  int64_t expires;
} slot_t;

/* Linear probing with backward-shift deletion (no tombstones), at most half full. */
typedef struct shard {
  alignas(64) pthread_mutex_t mu;
  slot_t *slots;
  size_t mask;
  size_t count, max;
  int64_t min_expires; /* no entry expires before this (a lower bound) */
} shard_t;

struct tg_nonce_store {
  uint64_t seed[2];
  shard_t shards[NSHARDS];
};

static uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/* Keys are SHA-256 outputs, but payers choose the inputs and can grind low
 * bits; the secret seed keeps them from aiming at a shard's slots. */
static uint64_t key_hash(const tg_nonce_store_t *s, const uint8_t key[32]) {
  uint64_t k0, k1;
  memcpy(&k0, key, 8);
  memcpy(&k1, key + 8, 8);
  return mix64(k0 ^ s->seed[0]) ^ mix64(k1 ^ s->seed[1]);
}

static shard_t *shard_of(tg_nonce_store_t *s, uint64_t h) { return &s->shards[h >> (64 - SHARD_BITS)]; }

/* Removes slot i, shifting later members of its cluster back. */
static void remove_at(const tg_nonce_store_t *s, shard_t *sh, size_t i) {
  size_t j = i;
  for (;;) {
    j = (j + 1) & sh->mask;
    if (sh->slots[j].expires == 0)
      break;
    size_t home = key_hash(s, sh->slots[j].key) & sh->mask;
    /* slot j may move to i unless its home lies cyclically in (i, j]. */
    bool stays = i <= j ? (home > i && home <= j) : (home > i || home <= j);
    if (!stays) {
      sh->slots[i] = sh->slots[j];
      i = j;
    }
  }
  sh->slots[i].expires = 0;
  sh->count--;
}

static size_t sweep_shard(const tg_nonce_store_t *s, shard_t *sh, int64_t now) {
  size_t dropped = 0;
  int64_t min = INT64_MAX;
  for (size_t i = 0; i <= sh->mask;) {
    const slot_t *e = &sh->slots[i];
    if (e->expires != 0 && e->expires <= now) {
      remove_at(s, sh, i); /* slot i may now hold another entry: look again */
      dropped++;
      continue;
    }
    if (e->expires != 0 && e->expires < min)
      min = e->expires;
    i++;
  }
  /* An entry moved back over the wrap into a visited slot was seen live already. */
  sh->min_expires = min;
  return dropped;
}

/* The slot holding key, or the empty slot ending its probe. */
static size_t find(const shard_t *sh, uint64_t h, const uint8_t key[32]) {
  size_t i = h & sh->mask;
  while (sh->slots[i].expires != 0 && memcmp(sh->slots[i].key, key, 32) != 0)
    i = (i + 1) & sh->mask;
  return i;
}

int tg_nonce_claim(tg_nonce_store_t *s, const uint8_t key[32], int64_t expires_unix_s, int64_t now_s) {
  if (s == NULL || key == NULL || expires_unix_s <= now_s || expires_unix_s <= 0)
    return -EINVAL;
  uint64_t h = key_hash(s, key);
  shard_t *sh = shard_of(s, h);
  int rc = 0;
  pthread_mutex_lock(&sh->mu);
  size_t i = find(sh, h, key);
  slot_t *e = &sh->slots[i];
  if (e->expires != 0) {
    if (e->expires > now_s) {
      rc = -EEXIST;
    } else {
      e->expires = expires_unix_s; /* its earlier claim expired: a new one */
      if (expires_unix_s < sh->min_expires)
        sh->min_expires = expires_unix_s;
    }
    goto out;
  }
  if (sh->count >= sh->max) {
    if (now_s >= sh->min_expires) /* else nothing has expired: no sweep */
      sweep_shard(s, sh, now_s);
    if (sh->count >= sh->max) {
      rc = -ENOSPC;
      goto out;
    }
    i = find(sh, h, key);
    e = &sh->slots[i];
  }
  memcpy(e->key, key, 32);
  e->expires = expires_unix_s;
  sh->count++;
  if (expires_unix_s < sh->min_expires)
    sh->min_expires = expires_unix_s;
out:
  pthread_mutex_unlock(&sh->mu);
  return rc;
}

void tg_nonce_release(tg_nonce_store_t *s, const uint8_t key[32]) {
  if (s == NULL || key == NULL)
    return;
  uint64_t h = key_hash(s, key);
  shard_t *sh = shard_of(s, h);
  pthread_mutex_lock(&sh->mu);
  size_t i = find(sh, h, key);
  if (sh->slots[i].expires != 0)
    remove_at(s, sh, i);
  pthread_mutex_unlock(&sh->mu);
}

size_t tg_nonce_store_sweep(tg_nonce_store_t *s, int64_t now_s) {
  size_t n = 0;
  if (s == NULL)
    return 0;
  for (size_t k = 0; k < NSHARDS; k++) {
    shard_t *sh = &s->shards[k];
    pthread_mutex_lock(&sh->mu);
    if (now_s >= sh->min_expires)
      n += sweep_shard(s, sh, now_s);
    pthread_mutex_unlock(&sh->mu);
  }
  return n;
}

size_t tg_nonce_store_count(tg_nonce_store_t *s) {
  size_t n = 0;
  if (s == NULL)
    return 0;
  for (size_t k = 0; k < NSHARDS; k++) {
    pthread_mutex_lock(&s->shards[k].mu);
    n += s->shards[k].count;
    pthread_mutex_unlock(&s->shards[k].mu);
  }
  return n;
}

static void seed(uint64_t out[2]) {
  if (getrandom(out, 2 * sizeof(uint64_t), 0) == (ssize_t)(2 * sizeof(uint64_t)))
    return;
  struct timespec ts; /* no entropy: still better than a fixed seed */
  clock_gettime(CLOCK_REALTIME, &ts);
  out[0] = mix64((uint64_t)ts.tv_nsec ^ (uint64_t)(uintptr_t)out);
  out[1] = mix64((uint64_t)ts.tv_sec ^ out[0]);
}

tg_nonce_store_t *tg_nonce_store_new(size_t max_entries) {
  if (max_entries < MIN_ENTRIES)
    max_entries = MIN_ENTRIES;
  size_t per = (max_entries + NSHARDS - 1) / NSHARDS, cap = 1;
  while (cap < 2 * per) {
    if (cap > SIZE_MAX / (4 * sizeof(slot_t)))
      return NULL;
    cap *= 2;
  }
  tg_nonce_store_t *s = aligned_alloc(64, sizeof(*s));
  if (s == NULL)
    return NULL;
  memset(s, 0, sizeof(*s));
  seed(s->seed);
  size_t k;
  for (k = 0; k < NSHARDS; k++) {
    shard_t *sh = &s->shards[k];
    sh->slots = calloc(cap, sizeof(slot_t));
    if (sh->slots == NULL || pthread_mutex_init(&sh->mu, NULL) != 0) {
      free(sh->slots);
      goto fail;
    }
    sh->mask = cap - 1;
    sh->max = per;
    sh->min_expires = INT64_MAX;
  }
  return s;
fail:
  while (k-- > 0) {
    pthread_mutex_destroy(&s->shards[k].mu);
    free(s->shards[k].slots);
  }
  free(s);
  return NULL;
}

void tg_nonce_store_free(tg_nonce_store_t *s) {
  if (s == NULL)
    return;
  for (size_t k = 0; k < NSHARDS; k++) {
    pthread_mutex_destroy(&s->shards[k].mu);
    free(s->shards[k].slots);
  }
  free(s);
}
