#ifndef TG_WAL_H
#define TG_WAL_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

/* The write-ahead log: records appended by the worker threads, made durable
 * by group commit on one writer thread, verified and replayed at open.
 *
 * On disk: a directory of segment files named <first sequence, 20 digits>.wal
 * (so names sort in log order). A segment starts with a 24-byte header
 *   magic "TGWALSEG" | u32 version (1) | u32 CRC32C of the other 20 bytes |
 *   u64 sequence of its first record
 * then records, each
 *   u32 payload length (> 0) | u32 CRC32C of (length, payload) | payload
 * all integers little-endian. The payload is opaque here. Sequences start at 1
 * and have no gaps: a record's sequence is its segment's first sequence plus
 * its index in the segment. A segment is rotated when the next record would
 * take it past segment_bytes (a record that cannot fit a segment is refused).
 *
 * Group commit: tg_wal_append copies the record into a bounded queue and
 * returns; the writer thread takes what is queued when batch_bytes are
 * waiting or batch_interval_us after the oldest waiting record arrived,
 * writes it, calls fdatasync once (once per segment touched), calls the
 * on_durable hook for each record (when set), and only then posts each
 * record's completion to the loop of the client it was appended through
 * (uv_async). A worker never waits on the disk, and takes the
 * queue's mutex only for the time of a list insertion.
 *
 * Failure: when a write or fdatasync fails, the log is failed for good (after
 * a failed fdatasync the kernel may have dropped the dirty pages, so nothing
 * written since the last good sync can be trusted): every record of the batch
 * and every one still queued completes with the error, and later appends
 * return it at once. Reopening (recovery) is the way back.
 *
 * Retention (tg_wal_retain): closed segments whose records a balance
 * snapshot covers are removed, oldest first, when the log is above a size or
 * they are older than an age. The log then starts at a sequence above 1: the
 * first segment's header gives it, and recovery checks continuity from there
 * (tg_wal_recovery_t first_seq).
 *
 * Metrics (tg_wal_metrics_init): txlog_wal_pending_bytes and
 * txlog_wal_pending_records (gauges: appended, not yet durable),
 * txlog_flush_duration_seconds (histogram: write + fdatasync of one batch),
 * txlog_fsync_batch_records (histogram: records made durable per batch),
 * txlog_retention_removed_segments_total (counter: segments retention removed),
 * txlog_wal_used_bytes and txlog_wal_capacity_bytes (gauges: what the
 * capacity limit counts, and the limit; an append keeps room for one segment
 * header, so the log never passes capacity_bytes). */

typedef struct tg_wal tg_wal_t;
typedef struct tg_wal_client tg_wal_client_t;

#define TG_WAL_HEADER_SIZE 24
#define TG_WAL_RECORD_OVERHEAD 8
#define TG_WAL_MAX_RECORD (64u << 20) /* largest payload */

/* One verified record, for replay. payload is valid only during the callback.
 * Return 0 to go on; any other value stops the scan and is returned by it. */
typedef int (*tg_wal_record_cb)(void *arg, uint64_t seq, const void *payload, size_t len);

typedef struct tg_wal_opts {
  const char *dir;            /* segment directory (data_dir/wal), made if missing; copied */
  uint64_t segment_bytes;     /* rotate at this size; default 64 MiB */
  uint64_t capacity_bytes;    /* all segments plus the queue; above it appends fail -ENOSPC; 1 GiB */
  size_t batch_bytes;         /* flush when this much waits; default 64 KiB */
  uint32_t batch_interval_us; /* or this long after the oldest waiting record; 1000. 0: at once */
  size_t queue_bytes;         /* at most this much not yet durable, else -EAGAIN; default 16 MiB */
  size_t queue_records;       /* at most this many not yet durable, else -EAGAIN; default 65536 */
  tg_wal_record_cb replay;    /* called for every record at open, in order; NULL: none */
  void *replay_arg;
  /* Called for every appended record once it is durable (its batch written
   * and fdatasync'd), strictly in sequence order, on the writer thread,
   * before the completions of its batch are posted: a completion callback
   * already sees what on_durable did. Not called for a record of a batch that
   * failed. Its return value is ignored (the record is durable regardless).
   * It holds up the writer, so it must be quick, and it must not append to
   * this log or close it. NULL: none. */
  tg_wal_record_cb on_durable;
  void *on_durable_arg;
} tg_wal_opts_t;

/* What recovery at open found. */
typedef struct tg_wal_recovery {
  uint64_t segments;        /* segment files read */
  uint64_t records;         /* verified records (all replayed) */
  uint64_t bytes;           /* total size of the segments after truncation */
  uint64_t next_seq;        /* sequence the next append gets */
  uint64_t dropped_bytes;   /* torn or corrupt tail of the last segment, truncated */
  uint64_t dropped_records; /* record frames in that tail (an estimate: a torn length can hide more) */
  uint64_t first_seq;       /* sequence of the first record the log holds (its first segment's
                             * header; above 1 once retention removed segments); next_seq when
                             * it holds none. Records first_seq..next_seq-1 were all replayed. */
} tg_wal_recovery_t;

/* Counters since open, for tests, benchmarks and `tollgate wal` (any thread). */
typedef struct tg_wal_stats {
  uint64_t batches; /* batches made durable */
  uint64_t fsyncs;  /* fdatasync/fsync calls, rotation and header included */
  uint64_t records; /* records made durable */
  uint64_t bytes;   /* record bytes (frames) written */
} tg_wal_stats_t;

/* Defaults above; dir NULL. */
void tg_wal_opts_init(tg_wal_opts_t *o);

/* Declares the five metrics (start-up, before workers run). 0 or -ENOMEM.
 * Without it the log works and counts nothing in the registry. */
int tg_wal_metrics_init(void);

/* Opens (or creates) the log in o->dir: reads every segment in order and
 * verifies every record, calling o->replay for each on this thread.
 *  - a torn or corrupt tail of the last segment (a short frame, a bad CRC, a
 *    zero length, garbage) is truncated and counted in rec->dropped_*; a last
 *    segment shorter than its header (a crash while it was made) is removed;
 *  - damage anywhere else (a record of an earlier segment, a bad header, a
 *    gap in the sequences, or a bad CRC in the last segment followed by a
 *    valid record: a flipped bit, not a torn write) fails with -EBADMSG and
 *    err naming the segment file and the byte offset; nothing is modified.
 * Then starts the writer thread. Returns 0 with *out (and *rec when not
 * NULL), or a negative errno with err: -EINVAL (bad options), -EBADMSG,
 * -ENOMEM, an I/O error, or what o->replay returned. Any thread; blocking
 * (call it at start-up, not on a worker loop). */
int tg_wal_open(const tg_wal_opts_t *o, tg_wal_t **out, tg_wal_recovery_t *rec, char *err, size_t errlen);

/* Reads and verifies the log in dir without modifying it (for `tollgate wal`
 * verify/cat): as recovery, but a damaged tail of the last segment is an
 * error too (-EBADMSG, err with segment and offset). cb may be NULL. rec as
 * in tg_wal_open (next_seq and counts). Blocking. */
int tg_wal_scan(const char *dir, tg_wal_record_cb cb, void *arg, tg_wal_recovery_t *rec, char *err,
                size_t errlen);

/* Reads the records of the log in dir from sequence from_seq on, in order,
 * calling cb for each (cb may stop the read: its nonzero value is returned).
 * For a reader beside a running log (the shipper): segments before the one
 * holding from_seq are not read, nothing is modified, and a torn or
 * unverified frame at the end of the last segment (a write in progress, or a
 * tail recovery will cut) ends the read without error. *next_seq (when not
 * NULL) gets the sequence after the last record handed to cb. Returns 0, the
 * value of cb, -ENOENT when from_seq is below the log's first record
 * (retention removed it), -EBADMSG (err: segment and offset) for damage
 * before the end, or an I/O error. Blocking; any thread. */
int tg_wal_read_from(const char *dir, uint64_t from_seq, tg_wal_record_cb cb, void *arg, uint64_t *next_seq,
                     char *err, size_t errlen);

/* Stops accepting appends, makes everything queued durable (or fails it),
 * posts every completion, joins the writer and frees the log. Completions
 * are delivered later by each client's loop: clients outlive this. Any
 * thread but the writer; no append may run concurrently or after. */
void tg_wal_close(tg_wal_t *w);

void tg_wal_stats(tg_wal_t *w, tg_wal_stats_t *out);

/* Bytes of the log on disk: every segment (headers and durable records).
 * Any thread. */
uint64_t tg_wal_bytes(tg_wal_t *w);

/* What capacity_bytes bounds: tg_wal_bytes plus the records appended and not
 * yet durable. An append of a record of n bytes fails -ENOSPC when this plus
 * n + TG_WAL_RECORD_OVERHEAD would pass tg_wal_capacity. Any thread. */
uint64_t tg_wal_used_bytes(tg_wal_t *w);
uint64_t tg_wal_capacity(tg_wal_t *w);

/* What one tg_wal_retain did. */
typedef struct tg_wal_retain_stats {
  uint64_t removed_segments;
  uint64_t removed_bytes;
  uint64_t first_seq; /* the log's first sequence after it (its first segment left) */
  uint64_t bytes;     /* tg_wal_bytes after it */
} tg_wal_retain_stats_t;

/* Retention. Removes closed segments (never the one being written) whose
 * every record has a sequence <= covered_seq (pass the wal_seq of a balance
 * snapshot already durable on disk: tg_prepaid_snapshot_write_seq; records
 * after it must stay, they are what a restart replays over it), oldest
 * first, each only while
 *   - the log is above max_bytes (tg_wal_bytes, lowered by each removal), or
 *   - the segment's file mtime (the time its last record was written) is more
 *     than max_age_s seconds ago;
 * 0 disables either bound (both 0: nothing is removed). Only a prefix of the
 * log goes: the first segment that stays stops it (no gap, which recovery
 * would refuse). The directory is fsync'd after the unlinks. The capacity
 * accounting goes down by what was removed: a log that answered -ENOSPC
 * accepts appends again. Counts txlog_retention_removed_segments_total.
 *
 * Safe while workers append and the writer writes (it reads the segment being
 * written under the log's mutex, and unlinks outside it); calls are
 * serialized. Returns 0, or the first error (listing the directory, stat,
 * unlink, fsync of the directory): what was removed before it stays removed
 * and is in *out (when not NULL). Blocking (unlink, fsync): any thread but
 * the writer (not from on_durable), off the worker loops; not concurrently
 * with tg_wal_close. */
int tg_wal_retain(tg_wal_t *w, uint64_t covered_seq, uint64_t max_bytes, uint32_t max_age_s,
                  tg_wal_retain_stats_t *out);

/* tg_wal_retain, but a segment whose mtime is keep_age_s seconds ago or less
 * stays even above max_bytes (and stops the removal: only a prefix goes).
 * For what the log holds beyond the snapshot: the local idempotency table is
 * rebuilt from the transactions still in the log, so a segment younger than
 * its TTL must stay or a retried request is charged again after a restart.
 * The log may then reach capacity_bytes (-ENOSPC) instead. 0: no floor. */
int tg_wal_retain_keep(tg_wal_t *w, uint64_t covered_seq, uint64_t max_bytes, uint32_t max_age_s,
                       uint32_t keep_age_s, tg_wal_retain_stats_t *out);

/* A loop's handle on the log: its appends complete on that loop. One per
 * worker loop (or any thread running a libuv loop). Returns 0 and *out, or
 * -ENOMEM / the uv_async_init error. Loop thread only. */
int tg_wal_client_new(tg_wal_t *w, uv_loop_t *loop, tg_wal_client_t **out);

/* Frees the client: only once no append through it is waiting for its
 * callback (tg_wal_client_inflight is 0), else -EBUSY and nothing is done.
 * The memory goes in a close callback: run the loop before uv_loop_close.
 * Loop thread only. */
int tg_wal_client_free(tg_wal_client_t *c);

/* Frees the client now when nothing waits for a callback, else once the
 * last of them has run: its handle keeps the loop running until then (the
 * log must stay open meanwhile), then closes, so a loop being wound down
 * ends by itself. For stopping a worker with appends in flight. Loop thread. */
void tg_wal_client_release(tg_wal_client_t *c);

/* Appends through c still waiting for their callback. Loop thread. */
size_t tg_wal_client_inflight(const tg_wal_client_t *c);

/* Done: status 0 and the record's sequence once it is durable, or a
 * negative errno (-EIO, ...) when the log failed before it was; seq is then
 * the sequence it would have had. Runs on the client's loop thread. */
typedef void (*tg_wal_append_cb)(void *arg, int status, uint64_t seq);

/* Appends len bytes (copied: payload may be freed on return). Returns 0, sets
 * *seq (when not NULL) to the record's sequence, and cb(arg, ...) runs later
 * on c's loop exactly once (never from inside this call). Fails at once,
 * without calling cb: -EINVAL (len 0 or NULL cb), -EMSGSIZE (len above
 * TG_WAL_MAX_RECORD or above segment_bytes - header), -ENOSPC (the log would
 * pass capacity_bytes: a distinct answer, the log is full until retention
 * frees room), -EAGAIN (the queue is full: the disk is behind; retry later
 * or answer "unavailable"), -ENOMEM, -ESHUTDOWN (closing), or the error that
 * failed the log (-EIO, ...). Never blocks on the disk. Thread of c's loop
 * (each thread appends through its own client); arg must stay valid until cb. */
int tg_wal_append(tg_wal_client_t *c, const void *payload, size_t len, tg_wal_append_cb cb, void *arg,
                  uint64_t *seq);

#endif
