#ifndef TG_PREPAID_H
#define TG_PREPAID_H

#include <stddef.h>
#include <stdint.h>

/* The built-in prepaid ledger: balances per (billing reference, currency) in
 * memory, for the embedded default billing. Amounts are int64 atomic units of
 * the currency (micro-USD for USD), never floats.
 *
 * Model: an account is (ref, currency) -> {balance, held}; available =
 * balance - held. A worker holds an amount before it answers (the hold is not
 * logged). The charge itself comes from the write-ahead log: when a
 * ledger.v1.Record holding an APPROVED transaction is durable, tg_prepaid_apply
 * (wired as the log's on_durable hook, and as its replay at open) debits the
 * transaction's totals; the worker then captures the hold, which only gives
 * the held amount back. Between the two the amount counts twice against
 * available: conservative, never an overspend. A refused, unsigned or unlogged
 * transaction releases its hold instead. Credits (top-ups) and operator debits
 * are ledger_change records applied the same way.
 *
 * Restart: balances = the snapshot file (tg_prepaid_snapshot_load) plus every
 * record after its sequence (replayed through tg_prepaid_wal_cb; a record at or
 * below the last applied sequence changes no balance, so replaying the whole
 * log over a snapshot is safe). Holds are not durable: a restart forgets them,
 * with the requests they belonged to. The snapshot also holds the credit and
 * debit references applied up to its sequence (credit_references,
 * debit_references), so a retried top-up stays ignored after the log's
 * retention removed its record; the records still in the log (replayed from
 * its start) add theirs. A snapshot written by an older build has no
 * references: only those still in the log are relearnt.
 *
 * Snapshot file: magic "TGSNAP01" | u32 payload length | u32 CRC32C of the
 * payload | payload (a ledger.v1.Snapshot), integers little-endian, replaced
 * atomically (path.tmp, fsync, rename, fsync of the directory).
 *
 * Limits: a ref is 1..256 bytes, a currency 1..16 bytes of [A-Za-z0-9], both
 * compared byte for byte ("usd" is not "USD"). A credit may not take a balance
 * above 2^53 (tg_prepaid_credit_check), so a balance is exact in JSON.
 *
 * Threads: every function may be called from any thread, concurrently, except
 * tg_prepaid_free. Accounts are in 64 shards, each with its own mutex and hash
 * table; holds in 64 more, by hold id. hold, capture and release take one
 * shard lock at a time and never the ledger mutex that apply, credit_check and
 * the snapshot copy serialize on. */

typedef struct tg_prepaid tg_prepaid_t;

#define TG_PREPAID_MAX_REF 256
#define TG_PREPAID_MAX_CURRENCY 16
#define TG_PREPAID_MAX_CREDIT_BALANCE (INT64_C(1) << 53)
/* Transactions of this billing type (or of none given) are charged here. */
#define TG_PREPAID_BILLING_TYPE "builtin"

/* An empty ledger; NULL on out of memory. */
tg_prepaid_t *tg_prepaid_new(void);

/* Frees the ledger, its accounts and any hold left. No other call may run
 * concurrently or after (close the log first: its writer calls apply). */
void tg_prepaid_free(tg_prepaid_t *p);

/* Holds amount (>= 0) on (ref, currency): when available >= amount, held +=
 * amount and returns 0 with *hold_id (unique, nonzero) and *available (after
 * the hold, when not NULL). Otherwise -ENOSPC (insufficient funds) with
 * *available as it is (0 for an account that does not exist). A hold of 0
 * always succeeds, on any account. -EINVAL: amount < 0, a bad ref or
 * currency, hold_id NULL. -ENOMEM. The strings are not kept. */
int tg_prepaid_hold(tg_prepaid_t *p, const char *ref, const char *currency, int64_t amount,
                    uint64_t *hold_id, int64_t *available);

/* Ends a hold once the answer is given and its transaction is durable (so
 * apply has already debited the balance): held -= amount, the hold is
 * forgotten. 0, or -ENOENT for an unknown hold id (a second capture or
 * release of the same hold has no effect). */
int tg_prepaid_capture(tg_prepaid_t *p, uint64_t hold_id);

/* Ends a hold that will not be charged (refused, signing failed, logging
 * failed): held -= amount, the hold is forgotten. 0 or -ENOENT, as capture. */
int tg_prepaid_release(tg_prepaid_t *p, uint64_t hold_id);

/* Applies one WAL record (payload: a ledger.v1.Record) of sequence seq:
 *  - transaction, outcome APPROVED, billing type TG_PREPAID_BILLING_TYPE or
 *    empty: balance -= each of its totals on (billing_reference, currency),
 *    the account made if missing;
 *  - ledger_change CREDIT: balance += amount; DEBIT: balance -= amount. Each
 *    is idempotent on a non-empty `reference` (one set per kind: a reference
 *    already applied is ignored);
 *  - anything else (CAPTURE, RELEASE, other kinds, a kind this build does not
 *    know): no change.
 * A record with seq <= the last applied sequence changes no balance (its
 * credit or debit reference is still remembered: the balances hold it). An
 * amount <= 0, a bad ref or currency in a record is skipped and logged. A
 * result outside int64 is clamped and logged (credit_check keeps balances far
 * below: it does not happen in practice). Returns 0, or -EBADMSG when the
 * payload does not decode (logged; nothing applied, the sequence still
 * counts): recovery treats that as fatal. -ENOMEM. Any thread, but records
 * must come in sequence order (the WAL writer, or replay at open). */
int tg_prepaid_apply(tg_prepaid_t *p, uint64_t seq, const void *payload, size_t len);

/* tg_prepaid_apply with the signature of tg_wal_record_cb (arg: the ledger),
 * for tg_wal_opts_t.replay and .on_durable. */
int tg_prepaid_wal_cb(void *arg, uint64_t seq, const void *payload, size_t len);

/* The highest sequence applied (or loaded from a snapshot); 0 at first. */
uint64_t tg_prepaid_last_seq(tg_prepaid_t *p);

/* What a CREDIT of amount with this reference would give, for the admin route
 * before it appends the record: 0 and *balance_after (the projected balance),
 * -EINVAL (amount <= 0, bad ref or currency), -EOVERFLOW (the balance would
 * pass TG_PREPAID_MAX_CREDIT_BALANCE), -EALREADY (reference already applied;
 * *balance_after = the current balance). reference NULL or "": no
 * idempotency. Advisory: apply is the authority (a second credit with the
 * same reference that slips in between is still ignored there). */
int tg_prepaid_credit_check(tg_prepaid_t *p, const char *ref, const char *currency, int64_t amount,
                            const char *reference, int64_t *balance_after);

/* 0 with *balance and *held (either may be NULL), -ENOENT for no such
 * account, -EINVAL for a bad ref or currency. */
int tg_prepaid_balance(tg_prepaid_t *p, const char *ref, const char *currency, int64_t *balance,
                       int64_t *held);

/* One account. The strings are valid during the call only. Return 0 to go on;
 * any other value stops tg_prepaid_each, which returns it. */
typedef int (*tg_prepaid_each_cb)(void *arg, const char *ref, const char *currency, int64_t balance,
                                  int64_t held);

/* Calls cb for every account, in no particular order, each with its shard's
 * lock held: cb must be quick and must not call into p. Accounts made while
 * it runs may or may not be seen. Returns 0 or what cb returned. */
int tg_prepaid_each(tg_prepaid_t *p, tg_prepaid_each_cb cb, void *arg);

/* Writes the balances and the applied credit/debit references as of the last
 * applied sequence to path, atomically (see above): they are copied with apply
 * held off (a copy of every account and reference, not the file write), then
 * encoded and written without any lock. Writers are serialized. Returns 0,
 * -ENOMEM, or the I/O error (path.tmp is removed; the previous file stays).
 * Blocking: call it off the worker loops and off the WAL writer (a timer
 * thread, shutdown). */
int tg_prepaid_snapshot_write(tg_prepaid_t *p, const char *path);

/* tg_prepaid_snapshot_write, and on success *written_seq (when not NULL) =
 * the wal_seq of the file just written: every record up to it is in the file
 * (durably: renamed and the directory synced), none after it. That, not
 * tg_prepaid_last_seq after the call (apply goes on meanwhile), is the bound
 * to hand to the log's retention (tg_wal_retain's covered_seq). */
int tg_prepaid_snapshot_write_seq(tg_prepaid_t *p, const char *path, uint64_t *written_seq);

/* The wal_seq of the last snapshot written (successfully) or loaded by p; 0
 * when none. Any thread. */
uint64_t tg_prepaid_snapshot_seq(tg_prepaid_t *p);

/* Loads path into a fresh ledger (nothing applied nor loaded yet, else
 * -EBUSY): 0 with *seq (when not NULL) = the snapshot's wal_seq, which becomes
 * the last applied sequence; -ENOENT when there is no file (start from the
 * whole log); -EBADMSG when the file is damaged (bad magic, length, CRC,
 * protobuf, a bad or repeated account): refuse to start, an operator must
 * look; never start from zero. The file's credit/debit references are loaded
 * too (an empty or repeated one is -EBADMSG). Other I/O errors as -errno;
 * -ENOMEM. On error the ledger is unchanged. The caller should also check
 * that the log still holds every record after *seq (its first sequence at
 * most *seq + 1, its next at least *seq + 1: tg_wal_recovery_t first_seq and
 * next_seq). Blocking, start-up only: no other call on p may run
 * concurrently (the exception to the rule above). */
int tg_prepaid_snapshot_load(tg_prepaid_t *p, const char *path, uint64_t *seq);

/* True (1) when at least every_records records were applied since the last
 * snapshot written or loaded (every_records 0 counts as 1), so that a timer
 * off the writer thread can decide to write one. */
int tg_prepaid_snapshot_due(tg_prepaid_t *p, uint64_t every_records);

#endif
