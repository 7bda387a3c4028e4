#ifndef TG_RECORD_H
#define TG_RECORD_H

#include <stddef.h>
#include <stdint.h>

#include "ledger/v1/ledger.pb-c.h"

/* The ledger.v1 records the gateway writes to its log that are not a
 * purchase (proto/ledger/v1/ledger.proto): credits, captures, releases.
 * Pure functions, any thread. */

/* Wall-clock milliseconds (CLOCK_REALTIME): Record.at_unix_ms. */
int64_t tg_record_now_ms(void);

/* A Record holding one LedgerChange, packed into a new buffer (free it), its
 * size in *len; NULL when out of memory. txid and reference may be NULL
 * (empty); instance names the writer (config instance). */
uint8_t *tg_record_ledger_change(Ledger__V1__LedgerChangeKind kind, const char *ref, const char *currency,
                                 int64_t amount, const char *txid, const char *reference, const char *instance,
                                 size_t *len);

#endif
