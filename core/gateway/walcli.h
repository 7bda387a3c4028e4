#ifndef TG_WALCLI_H
#define TG_WALCLI_H

#include <stdio.h>

/* `tollgate wal ...`: what an operator runs on the write-ahead log
 * (ledger/wal.h) of a configured gateway, data_dir/wal. Read-only: the log
 * is read with tg_wal_scan, never opened for writing, so it may run while
 * the gateway runs. Each record payload is decoded as ledger.v1.Record.
 *
 *   tollgate wal ls -c CONFIG
 *     One line per segment: file, first sequence, records, bytes (header
 *     and verified records), times of its first and last record (ISO-8601
 *     UTC); then a total line.
 *   tollgate wal verify -c CONFIG
 *     Every CRC, the sequence continuity and every payload's decoding.
 *     Prints "ok: N segments, N records, N bytes", or the damage (segment
 *     file and byte offset, the sequence where known).
 *   tollgate wal cat -c CONFIG [--tenant T] [--tx ID] [--since TIME] [--until TIME]
 *     The records as JSON lines in log order (one object per record, ASCII
 *     only): {"seq":N,"at":"2026-12-06T10:00:00.123Z","instance":"...",
 *     "kind":"transaction","transaction":{...}}, the kind's fields (proto
 *     names, money as integers) under its name; a kind this version does not
 *     know is "kind":"unknown" with no fields. billing_reference shows only its last 4 characters, the stored
 *     response only its size, status, transaction id and item count (its
 *     retrieval URLs are bearer credentials), request_hash as hex. Filters
 *     combine with AND: --tenant a transaction with an item of T (or a
 *     settlement of T), --tx a transaction's id or the transaction_id of a
 *     ledger change or usage report, --since (inclusive) and --until
 *     (exclusive) the record time, as 2026-12-06T10:00:00Z (fraction
 *     allowed), 2026-12-06, or unix seconds.
 *
 * Log shipping (ledger.ship, ledger/ship.h): when it is configured, or
 * data_dir/ship.ckpt exists, ls and verify end with "shipped through seq N,
 * M records pending" (N: the checkpoint, 0 when none; M: records of the log
 * after it), and each cat line has "shipped":true|false. The checkpoint is
 * written at most once a second by a running gateway: it may trail the
 * store by that much. A checkpoint that does not read is a warning.
 *
 * A log directory that does not exist is "no log yet": exit 0. A torn tail
 * of the last segment (a gateway writing it, or killed mid-write) is a
 * warning for ls and cat, which show the records before it, and an error
 * for verify, which says that a running gateway may be mid-write. Segments
 * rotated or removed (retention) while the log is read are followed: ls and
 * verify start again when one they were reading vanished; cat, whose lines
 * are already out, says so and fails.
 *
 * Exit status: 0 fine; 1 damage, an undecodable record, a configuration or
 * I/O error; 2 bad usage. argv[0] is "wal". Results and JSON lines go to
 * out, warnings and errors to err (both flushed, not closed). Not
 * thread-safe with respect to out and err; otherwise no global state. */
int tg_walcli_main(int argc, char **argv, FILE *out, FILE *err);

#endif
