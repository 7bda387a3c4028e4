#ifndef TG_SNAPSHOT_H
#define TG_SNAPSHOT_H

/* Publication of immutable snapshots (catalog, tenants, ...) to worker
 * threads, with safe reclamation of the old ones.
 *
 * Writers (rare: ingestion, admin reload) build a new snapshot off the request
 * path and publish it with one atomic pointer store. Readers (workers) pin the
 * current snapshot for the life of one request, which may span async waits
 * (Redis, outbound HTTP): the request finishes on the snapshot it started with.
 * A retired snapshot is destroyed once no pin on it remains.
 *
 * Design: hazard records with counts, one list of records per reader thread.
 * A record says "this thread holds <count> pins on version <ver>"; only its
 * owner thread writes it. Pinning the version that the thread pinned last,
 * while it is still pinned, is one acquire load plus one relaxed store on the
 * thread's own cache line. Otherwise the reader claims a record, publishes
 * (ver, count=1) and re-reads the current pointer: if it changed meanwhile the
 * writer may not have seen the record, so the reader retries (the hazard
 * pointer handshake, both sides sequentially consistent). The collector frees
 * a retired version when no record of any reader holds it with count > 0.
 * Versions are never republished, so a retired one can never be pinned anew.
 *
 * Threading: tg_snapshot_publish, tg_snapshot_collect, reader register and
 * unregister take one mutex and may be called from any thread. A reader
 * (tg_snapshot_reader_t) belongs to the thread that registered it: acquire and
 * release on it only from that thread; they take no lock. */

/* Use: the owner (catalog) keeps one tg_snapshot_t; each worker registers a
 * reader in on_worker_start and unregisters it in on_worker_stop; a request
 * acquires when it starts and releases on every way it ends (answer, error,
 * client gone), after its last read. Ingestion publishes; a timer calls
 * tg_snapshot_collect. destroy runs on the collecting thread: freeing a large
 * catalog there stalls that thread, so collect off the worker loops (the
 * ingestion thread) when snapshots are big. */

#include <stddef.h>

typedef struct tg_snapshot tg_snapshot_t;
typedef struct tg_snapshot_reader tg_snapshot_reader_t;

/* A pinned snapshot: data stays valid and unchanged until the pin is
 * released. data is NULL when nothing was published yet. */
typedef struct tg_snapshot_pin {
  void *data;
  void *handle; /* opaque: the record holding the pin */
} tg_snapshot_pin_t;

/* A new, empty publication point. destroy(data) frees one snapshot; it is
 * called exactly once per published snapshot, from the thread running
 * tg_snapshot_collect, tg_snapshot_publish or tg_snapshot_free, without the
 * internal lock held. NULL on out of memory. */
tg_snapshot_t *tg_snapshot_new(void (*destroy)(void *data));

/* Publishes data (non-NULL) as the current snapshot, taking ownership of it.
 * The previous snapshot is retired and collected (see tg_snapshot_collect).
 * Returns 0, or -ENOMEM, in which case nothing changed and the caller still
 * owns data. Any thread; publishers are serialized by the internal mutex. */
int tg_snapshot_publish(tg_snapshot_t *s, void *data);

/* Destroys every retired snapshot that no reader pins any more. Called by
 * publish; call it also periodically (e.g. from a timer once a second) so
 * that a snapshot pinned by a slow request is freed soon after it finishes.
 * Returns the number of retired snapshots still pinned. Any thread. */
size_t tg_snapshot_collect(tg_snapshot_t *s);

/* Number of retired snapshots not yet destroyed (for metrics and tests). */
size_t tg_snapshot_retired(tg_snapshot_t *s);

/* Registers the calling thread as a reader (a worker, in on_worker_start).
 * NULL on out of memory. */
tg_snapshot_reader_t *tg_snapshot_reader_register(tg_snapshot_t *s);

/* Unregisters and frees r (on its thread, in on_worker_stop) and returns 0
 * when every pin taken on r was released. Otherwise returns the number of pins
 * still out and leaves r registered, so that the snapshots they pin stay alive
 * (a leak until tg_snapshot_free rather than a use after free); r must not be
 * used again except to release those pins. */
size_t tg_snapshot_reader_unregister(tg_snapshot_reader_t *r);

/* Pins the current snapshot. Lock-free; may allocate a record the first time
 * a thread holds more distinct versions at once than ever before; on out of
 * memory it returns a pin with data NULL (treat as "no snapshot"). Thread of r
 * only. */
tg_snapshot_pin_t tg_snapshot_acquire(tg_snapshot_reader_t *r);

/* Releases a pin taken on r (thread of r only). A pin with data NULL may be
 * released too (no-op). Never destroys anything itself: that is the
 * collector's job, which keeps this path free of locks and frees. */
void tg_snapshot_release(tg_snapshot_reader_t *r, tg_snapshot_pin_t pin);

/* Frees s at shutdown: destroys the current and every retired snapshot, and
 * frees readers left registered. No thread may use s or any of its readers
 * any more (join the workers first). */
void tg_snapshot_free(tg_snapshot_t *s);

#endif
