#ifndef TG_SHIP_H
#define TG_SHIP_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

/* Log shipping: a drainer that copies the write-ahead log's records, in
 * order, to a Redis Stream, so that losing the machine loses nothing.
 *
 * One stream per instance, key "tg:txlog:" <instance>; record seq becomes
 * entry id "<seq>-1" with one field, rec = the payload bytes. The ids come
 * from this instance's log, so they only grow, and a resend after a crash is
 * refused by Redis (an id at or below the stream's top): never a duplicate.
 * Each call is one Lua script that XADDs a chunk of records and skips the ids
 * the stream already holds (atomic per chunk); a round sends up to batch
 * records as pipelined chunks, and a chunk after the first checks that the
 * stream holds the record before it, so a chunk lost to a timeout is never
 * skipped over by the next.
 *
 * What was shipped (the highest sequence confirmed) is kept in
 * data_dir/ship.ckpt (decimal text and a newline, replaced atomically, at
 * most once a second and at free) and read back from the stream at start:
 * shipping resumes after max(checkpoint, the stream's last id).
 *
 * While Redis is down (or answers errors) rounds are retried with jittered
 * backoff, 100 ms doubling to 5 s; the log keeps accepting meanwhile.
 *
 * Records are read from the segment files (tg_wal_read_from), on the loop
 * thread: it is meant for a loop of its own or a quiet one.
 *
 * Metrics (tg_ship_metrics_init): txlog_store_errors_total{store="redis"}
 * (failed calls), txlog_shipped_records_total (records added to the stream),
 * txlog_ship_lag_seconds (gauge: how long the oldest unshipped record has
 * been known durable to the shipper; 0 when nothing is pending),
 * txlog_ship_pending_records (gauge: durable records not yet shipped).
 *
 * Threads: the loop's thread, except where a prototype says otherwise. */

typedef struct tg_ship tg_ship_t;

typedef struct tg_ship_opts {
  const char *wal_dir;  /* the log's segment directory; copied */
  const char *data_dir; /* where ship.ckpt lives; copied */
  const char *instance; /* stream key suffix, 1..128 bytes; copied */
  const char *host;     /* Redis */
  int port;
  const char *password; /* or NULL */
  int db;
  uint32_t timeout_ms; /* per call; 0: 1000 */
  uint32_t batch;      /* records per round; 0: 512 */
  /* Records up to it are durable already (tg_wal_recovery_t next_seq - 1
   * after tg_wal_open); later ones are shipped once tg_ship_kick says they
   * are: a record written but not yet fdatasync'd is never shipped (a crash
   * could lose it and its sequence go to another record). UINT64_MAX: every
   * record in the files (a log no process is writing). */
  uint64_t durable_seq;
} tg_ship_opts_t;

/* Declares the three metrics (start-up). 0 or -ENOMEM. */
int tg_ship_metrics_init(void);

/* Reads the checkpoint, connects (Redis being down is not a failure) and
 * starts shipping what is durable: at each kick, and once a second.
 * Returns 0 and *out, or a negative errno and err: -EINVAL (missing option,
 * instance too long), -EBADMSG (a checkpoint file that is not a number),
 * -ENOMEM, or a connection or libuv error. Loop thread. */
int tg_ship_new(uv_loop_t *loop, const tg_ship_opts_t *o, tg_ship_t **out, char *err, size_t errlen);

/* Records up to durable_seq are durable: ship them soon. Any thread (an
 * on_durable hook may call it: it only stores an atomic and wakes the loop). */
void tg_ship_kick(tg_ship_t *s, uint64_t durable_seq);

/* The highest sequence the stream is known to hold (every record up to it is
 * shipped): segments at or below it may be recycled. Any thread. */
uint64_t tg_ship_shipped_seq(const tg_ship_t *s);

/* The highest sequence known durable (opts.durable_seq or the last kick):
 * minus tg_ship_shipped_seq, what is pending. Any thread. */
uint64_t tg_ship_durable_seq(const tg_ship_t *s);

/* txlog_ship_lag_seconds as of now (the oldest record known durable and not
 * shipped, 0 when none), for /readyz. Any thread. */
double tg_ship_lag_seconds(const tg_ship_t *s);

/* Writes the checkpoint, cancels what is in flight and frees s: its memory
 * goes in close callbacks, run the loop before uv_loop_close. No kick may
 * run concurrently or after. Loop thread. */
void tg_ship_free(tg_ship_t *s);

#endif
