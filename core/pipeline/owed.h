#ifndef TG_OWED_H
#define TG_OWED_H

#include <stdint.h>

#include <uv.h>

#include "ledger/prepaid_redis.h"
#include "ledger/wal.h"

/* Captures owed to a shared ledger (ledger.mode = "redis"): a transaction is
 * charged in Redis after its answer; until a CAPTURE record says the charge
 * went through, the gateway owes it. The set is rebuilt at start from the
 * log (every APPROVED "redis" transaction without its CAPTURE record), grows
 * when a capture fails at run time, and is paid off from the main loop by
 * tg_owed_settle: a capture per entry (idempotent by transaction id in Redis,
 * so paying twice charges once), then its CAPTURE record.
 *
 * Threads: add/remove from any thread (a mutex); settle on the main loop.
 * Entries are copies. */

typedef struct tg_owed tg_owed_t;

tg_owed_t *tg_owed_new(void);
void tg_owed_free(tg_owed_t *o);

/* 0, -ENOMEM or -EINVAL (a string too long). hold: the hold the capture
 * drops (NULL: none known, e.g. rebuilt from the log; it expires by itself).
 * Adding a txid already owed is a no-op. */
int tg_owed_add(tg_owed_t *o, const char *txid, const char *ref, const char *currency, int64_t amount,
                const char *hold);
void tg_owed_remove(tg_owed_t *o, const char *txid);
size_t tg_owed_count(tg_owed_t *o);

/* Starts the captures of up to max entries through r, each followed by its
 * CAPTURE record appended through w (instance names the record's writer).
 * An entry leaves the set once its capture is confirmed. A call while the
 * previous round runs does nothing. Main loop. */
void tg_owed_settle(tg_owed_t *o, tg_prepaid_redis_t *r, tg_wal_client_t *w, const char *instance, size_t max);

#endif
