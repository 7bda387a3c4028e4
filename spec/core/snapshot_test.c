#include "base/snapshot.h"
#include "test.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

#define MAGIC 0x534e4150u /* "SNAP" */
#define DEAD 0xdeadbeefu
#define WORDS 1024        /* 4 KiB payload */

typedef struct snap {
  uint32_t magic;
  uint32_t seq;
  uint32_t sum;
  uint32_t words[WORDS];
} snap_t;

/* Bookkeeping of destroy calls per sequence number: exactly once each. */
#define MAX_SNAPS 200000
static atomic_uint destroyed[MAX_SNAPS];
static atomic_uint ndestroyed;
static atomic_uint bad_destroy; /* destroy saw a corrupt or twice-destroyed snapshot */

static void reset_counts(void) {
  for (size_t i = 0; i < MAX_SNAPS; i++)
    atomic_store(&destroyed[i], 0);
  atomic_store(&ndestroyed, 0);
  atomic_store(&bad_destroy, 0);
}

static uint32_t checksum(const snap_t *p) {
  uint32_t h = 2166136261u;
  for (size_t i = 0; i < WORDS; i++)
    h = (h ^ p->words[i]) * 16777619u;
  return h;
}

static snap_t *snap_make(uint32_t seq) {
  snap_t *p = malloc(sizeof(*p));
  if (!p)
    abort();
  p->magic = MAGIC;
  p->seq = seq;
  for (size_t i = 0; i < WORDS; i++)
    p->words[i] = seq * 2654435761u + (uint32_t)i;
  p->sum = checksum(p);
  return p;
}

/* 1 when every byte of p reads as the snapshot it was built as. */
static int snap_ok(const snap_t *p) {
  return p->magic == MAGIC && p->seq < MAX_SNAPS && checksum(p) == p->sum;
}

static void snap_destroy(void *data) {
  snap_t *p = data;
  if (!snap_ok(p) || atomic_fetch_add(&destroyed[p->seq], 1) != 0)
    atomic_fetch_add(&bad_destroy, 1);
  atomic_fetch_add(&ndestroyed, 1);
  p->magic = DEAD; /* poison, for builds without ASan */
  memset(p->words, 0xdd, sizeof(p->words));
  free(p);
}

static unsigned destroyed_count(uint32_t seq) { return atomic_load(&destroyed[seq]); }

TEST(empty_until_first_publish) {
  reset_counts();
  tg_snapshot_t *s = tg_snapshot_new(snap_destroy);
  CHECK(s != NULL);
  tg_snapshot_reader_t *r = tg_snapshot_reader_register(s);
  CHECK(r != NULL);
  tg_snapshot_pin_t pin = tg_snapshot_acquire(r);
  CHECK(pin.data == NULL);
  tg_snapshot_release(r, pin);
  CHECK_INT(tg_snapshot_collect(s), 0);
  tg_snapshot_reader_unregister(r);
  tg_snapshot_free(s);
  CHECK_INT(atomic_load(&ndestroyed), 0);
}

TEST(old_snapshot_lives_while_pinned) {
  reset_counts();
  tg_snapshot_t *s = tg_snapshot_new(snap_destroy);
  tg_snapshot_reader_t *r = tg_snapshot_reader_register(s);
  CHECK_INT(tg_snapshot_publish(s, snap_make(1)), 0);
  tg_snapshot_pin_t a = tg_snapshot_acquire(r);
  CHECK(a.data != NULL);
  CHECK_INT(((snap_t *)a.data)->seq, 1);

  CHECK_INT(tg_snapshot_publish(s, snap_make(2)), 0);
  CHECK_INT(tg_snapshot_retired(s), 1);
  CHECK_INT(tg_snapshot_collect(s), 1);
  CHECK_INT(destroyed_count(1), 0);
  CHECK(snap_ok(a.data));

  tg_snapshot_pin_t b = tg_snapshot_acquire(r);
  CHECK_INT(((snap_t *)b.data)->seq, 2);
  tg_snapshot_release(r, a);
  CHECK_INT(tg_snapshot_collect(s), 0);
  CHECK_INT(destroyed_count(1), 1);
  CHECK_INT(destroyed_count(2), 0);

  tg_snapshot_release(r, b);
  CHECK_INT(tg_snapshot_collect(s), 0);
  CHECK_INT(destroyed_count(2), 0); /* current: never destroyed while published */
  tg_snapshot_reader_unregister(r);
  tg_snapshot_free(s);
  CHECK_INT(destroyed_count(1), 1);
  CHECK_INT(destroyed_count(2), 1);
  CHECK_INT(atomic_load(&ndestroyed), 2);
  CHECK_INT(atomic_load(&bad_destroy), 0);
}

TEST(unpinned_old_snapshot_freed_on_publish) {
  reset_counts();
  tg_snapshot_t *s = tg_snapshot_new(snap_destroy);
  tg_snapshot_reader_t *r = tg_snapshot_reader_register(s);
  tg_snapshot_publish(s, snap_make(1));
  tg_snapshot_pin_t a = tg_snapshot_acquire(r);
  tg_snapshot_release(r, a);
  tg_snapshot_publish(s, snap_make(2));
  CHECK_INT(destroyed_count(1), 1);
  CHECK_INT(tg_snapshot_retired(s), 0);
  tg_snapshot_reader_unregister(r);
  tg_snapshot_free(s);
  CHECK_INT(atomic_load(&ndestroyed), 2);
  CHECK_INT(atomic_load(&bad_destroy), 0);
}

/* Several pins on one version (fast path): freed only after the last one. */
TEST(repeated_pins_counted) {
  reset_counts();
  tg_snapshot_t *s = tg_snapshot_new(snap_destroy);
  tg_snapshot_reader_t *r = tg_snapshot_reader_register(s);
  tg_snapshot_publish(s, snap_make(1));
  tg_snapshot_pin_t p[5];
  for (int i = 0; i < 5; i++) {
    p[i] = tg_snapshot_acquire(r);
    CHECK_INT(((snap_t *)p[i].data)->seq, 1);
  }
  tg_snapshot_publish(s, snap_make(2));
  for (int i = 0; i < 4; i++) {
    tg_snapshot_release(r, p[i]);
    CHECK_INT(tg_snapshot_collect(s), 1);
    CHECK_INT(destroyed_count(1), 0);
  }
  CHECK(snap_ok(p[4].data));
  tg_snapshot_release(r, p[4]);
  CHECK_INT(tg_snapshot_collect(s), 0);
  CHECK_INT(destroyed_count(1), 1);
  tg_snapshot_reader_unregister(r);
  tg_snapshot_free(s);
  CHECK_INT(atomic_load(&ndestroyed), 2);
  CHECK_INT(atomic_load(&bad_destroy), 0);
}

/* One thread holding several versions at once (requests started at different
 * times, all waiting on Redis), and a second reader pinning one of them. */
TEST(pins_on_several_versions_and_readers) {
  reset_counts();
  tg_snapshot_t *s = tg_snapshot_new(snap_destroy);
  tg_snapshot_reader_t *r = tg_snapshot_reader_register(s);
  tg_snapshot_reader_t *r2 = tg_snapshot_reader_register(s);
  tg_snapshot_pin_t p[4];
  for (uint32_t i = 0; i < 4; i++) {
    tg_snapshot_publish(s, snap_make(i));
    p[i] = tg_snapshot_acquire(r);
    CHECK_INT(((snap_t *)p[i].data)->seq, i);
  }
  tg_snapshot_pin_t q = tg_snapshot_acquire(r2); /* version 3 */
  tg_snapshot_publish(s, snap_make(4));
  CHECK_INT(tg_snapshot_retired(s), 4);

  tg_snapshot_release(r, p[1]);
  CHECK_INT(tg_snapshot_collect(s), 3);
  CHECK_INT(destroyed_count(1), 1);
  CHECK_INT(destroyed_count(0) + destroyed_count(2) + destroyed_count(3), 0);

  tg_snapshot_release(r, p[3]);
  CHECK_INT(tg_snapshot_collect(s), 3); /* r2 still holds 3 */
  CHECK(snap_ok(q.data));
  tg_snapshot_release(r2, q);
  CHECK_INT(tg_snapshot_collect(s), 2);
  CHECK_INT(destroyed_count(3), 1);

  /* Records freed by the releases are reused for new pins. */
  tg_snapshot_pin_t n = tg_snapshot_acquire(r);
  CHECK_INT(((snap_t *)n.data)->seq, 4);
  tg_snapshot_release(r, n);
  tg_snapshot_release(r, p[0]);
  tg_snapshot_release(r, p[2]);
  CHECK_INT(tg_snapshot_collect(s), 0);
  CHECK_INT(tg_snapshot_reader_unregister(r2), 0);
  CHECK_INT(tg_snapshot_reader_unregister(r), 0);
  tg_snapshot_free(s);
  CHECK_INT(atomic_load(&ndestroyed), 5);
  for (uint32_t i = 0; i < 5; i++)
    CHECK_INT(destroyed_count(i), 1);
  CHECK_INT(atomic_load(&bad_destroy), 0);
}

/* A worker stopping with a request still in flight must not free what that
 * request reads; free() at shutdown reclaims it all exactly once. */
TEST(unregister_with_pins_out) {
  reset_counts();
  tg_snapshot_t *s = tg_snapshot_new(snap_destroy);
  tg_snapshot_reader_t *r = tg_snapshot_reader_register(s);
  tg_snapshot_reader_t *r2 = tg_snapshot_reader_register(s);
  tg_snapshot_publish(s, snap_make(1));
  tg_snapshot_pin_t a = tg_snapshot_acquire(r);
  tg_snapshot_pin_t b = tg_snapshot_acquire(r2);
  tg_snapshot_publish(s, snap_make(2));
  CHECK_INT(tg_snapshot_reader_unregister(r), 1);
  tg_snapshot_release(r2, b);
  CHECK_INT(tg_snapshot_reader_unregister(r2), 0);
  CHECK_INT(tg_snapshot_collect(s), 1);
  CHECK_INT(destroyed_count(1), 0);
  CHECK(snap_ok(a.data));
  tg_snapshot_release(r, a);
  CHECK_INT(tg_snapshot_collect(s), 0);
  CHECK_INT(destroyed_count(1), 1);

  /* Never released: kept until free(), which also frees the reader. */
  r = tg_snapshot_reader_register(s);
  a = tg_snapshot_acquire(r);
  tg_snapshot_publish(s, snap_make(3));
  CHECK_INT(tg_snapshot_reader_unregister(r), 1);
  CHECK_INT(tg_snapshot_collect(s), 1);
  CHECK_INT(destroyed_count(2), 0);
  tg_snapshot_free(s);
  for (uint32_t i = 1; i <= 3; i++)
    CHECK_INT(destroyed_count(i), 1);
  CHECK_INT(atomic_load(&ndestroyed), 3);
  CHECK_INT(atomic_load(&bad_destroy), 0);
}

/* destroy runs without the internal lock: it may use s (here: would deadlock). */
static tg_snapshot_t *reentrant_s;
static size_t reentrant_seen;

static void destroy_reentrant(void *data) {
  reentrant_seen += 1 + tg_snapshot_retired(reentrant_s);
  snap_destroy(data);
}

TEST(destroy_may_call_back) {
  reset_counts();
  reentrant_seen = 0;
  tg_snapshot_t *s = reentrant_s = tg_snapshot_new(destroy_reentrant);
  tg_snapshot_publish(s, snap_make(1));
  tg_snapshot_publish(s, snap_make(2));
  CHECK_INT(reentrant_seen, 1);
  CHECK_INT(destroyed_count(1), 1);
  tg_snapshot_free(s);
  CHECK_INT(atomic_load(&ndestroyed), 2);
}

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

#define NREADERS 4
#define HELD 8 /* pins a reader keeps across iterations, like requests waiting on I/O */

typedef struct stress {
  tg_snapshot_t *s;
  atomic_int stop;
  atomic_ulong acquires;
  atomic_uint errors;
} stress_t;

static uint32_t xorshift(uint32_t *x) {
  *x ^= *x << 13;
  *x ^= *x >> 17;
  *x ^= *x << 5;
  return *x;
}

/* A held pin must still read as its snapshot and must not be destroyed. */
static int pin_sound(tg_snapshot_pin_t p) {
  const snap_t *d = p.data;
  return d && snap_ok(d) && destroyed_count(d->seq) == 0;
}

static void *reader_main(void *arg) {
  stress_t *st = arg;
  tg_snapshot_reader_t *r = tg_snapshot_reader_register(st->s);
  tg_snapshot_pin_t held[HELD];
  memset(held, 0, sizeof(held));
  uint32_t rnd = (uint32_t)(uintptr_t)r | 1, last_seq = 0;
  unsigned long n = 0, errors = 0;
  while (!atomic_load_explicit(&st->stop, memory_order_relaxed)) {
    tg_snapshot_pin_t p = tg_snapshot_acquire(r);
    n++;
    if (!p.data)
      continue; /* nothing published yet */
    const snap_t *d = p.data;
    if (!pin_sound(p) || d->seq < last_seq) /* the current version only moves forward */
      errors++;
    last_seq = d->seq;
    /* Keep it for a while (an async request) or answer at once. */
    uint32_t x = xorshift(&rnd);
    if (x % 4 == 0) {
      size_t slot = (x >> 8) % HELD;
      if (held[slot].data) {
        if (!pin_sound(held[slot]))
          errors++;
        tg_snapshot_release(r, held[slot]);
      }
      held[slot] = p;
    } else {
      tg_snapshot_release(r, p);
    }
  }
  for (size_t i = 0; i < HELD; i++)
    if (held[i].data) {
      if (!pin_sound(held[i]))
        errors++;
      tg_snapshot_release(r, held[i]);
    }
  if (tg_snapshot_reader_unregister(r) != 0)
    errors++;
  atomic_fetch_add(&st->acquires, n);
  atomic_fetch_add(&st->errors, (unsigned)errors);
  return NULL;
}

TEST(stress_publish_under_readers) {
  reset_counts();
  stress_t st;
  st.s = tg_snapshot_new(snap_destroy);
  atomic_init(&st.stop, 0);
  atomic_init(&st.acquires, 0);
  atomic_init(&st.errors, 0);
  const char *env = getenv("TG_SNAPSHOT_PUBLISHES");
  uint32_t publishes = env ? (uint32_t)atoi(env) : 20000;
  if (publishes == 0 || publishes > MAX_SNAPS)
    publishes = 20000;

  pthread_t th[NREADERS];
  for (int i = 0; i < NREADERS; i++)
    CHECK_INT(pthread_create(&th[i], NULL, reader_main, &st), 0);
  uint64_t t0 = now_ns();
  size_t max_retired = 0;
  for (uint32_t seq = 0; seq < publishes; seq++) {
    CHECK_INT(tg_snapshot_publish(st.s, snap_make(seq)), 0);
    size_t left = tg_snapshot_collect(st.s);
    if (left > max_retired)
      max_retired = left;
  }
  atomic_store(&st.stop, 1);
  for (int i = 0; i < NREADERS; i++)
    pthread_join(th[i], NULL);
  uint64_t dt = now_ns() - t0;
  /* Every reader released everything: all but the current are freed. */
  CHECK_INT(tg_snapshot_collect(st.s), 0);
  CHECK_INT(atomic_load(&ndestroyed), publishes - 1);
  CHECK_INT(destroyed_count(publishes - 1), 0);
  tg_snapshot_free(st.s);

  unsigned long acq = atomic_load(&st.acquires);
  printf("  stress: %u publishes, %lu acquires by %d readers in %.2f s, max %zu retired pinned\n",
         publishes, acq, NREADERS, (double)dt / 1e9, max_retired);
  CHECK_INT(atomic_load(&st.errors), 0);
  CHECK_INT(atomic_load(&bad_destroy), 0);
  CHECK_INT(atomic_load(&ndestroyed), publishes);
  for (uint32_t i = 0; i < publishes; i++)
    CHECK_INT(destroyed_count(i), 1);
  CHECK(acq > 0);
}

/* Figures only: the request-path cost with no writer around. */
TEST(acquire_release_cost) {
  reset_counts();
  tg_snapshot_t *s = tg_snapshot_new(snap_destroy);
  tg_snapshot_reader_t *r = tg_snapshot_reader_register(s);
  tg_snapshot_publish(s, snap_make(7));
  tg_snapshot_pin_t outer = tg_snapshot_acquire(r); /* an in-flight request */
  const int n = 1000000;
  unsigned long seen = 0;
  uint64_t t0 = now_ns();
  for (int i = 0; i < n; i++) {
    tg_snapshot_pin_t p = tg_snapshot_acquire(r);
    seen += ((snap_t *)p.data)->seq;
    tg_snapshot_release(r, p);
  }
  uint64_t dt = now_ns() - t0;
  tg_snapshot_release(r, outer);
  /* And the slow path: no pin in flight, each acquire claims a record. */
  t0 = now_ns();
  for (int i = 0; i < n; i++) {
    tg_snapshot_pin_t p = tg_snapshot_acquire(r);
    seen += ((snap_t *)p.data)->seq;
    tg_snapshot_release(r, p);
  }
  uint64_t dt2 = now_ns() - t0;
  printf("  acquire+release: %.1f ns with a pin in flight, %.1f ns idle\n", (double)dt / n,
         (double)dt2 / n);
  CHECK_INT(seen, 2ul * n * 7);
  tg_snapshot_reader_unregister(r);
  tg_snapshot_free(s);
  CHECK_INT(atomic_load(&ndestroyed), 1);
}
