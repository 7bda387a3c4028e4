#include "ledger/record.h"

#include <stdlib.h>
#include <time.h>

int64_t tg_record_now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

uint8_t *tg_record_ledger_change(Ledger__V1__LedgerChangeKind kind, const char *ref, const char *currency,
                                 int64_t amount, const char *txid, const char *reference, const char *instance,
                                 size_t *len) {
  Ledger__V1__Record rec = LEDGER__V1__RECORD__INIT;
  Ledger__V1__LedgerChange ch = LEDGER__V1__LEDGER_CHANGE__INIT;
  rec.at_unix_ms = tg_record_now_ms();
  rec.instance = (char *)(instance ? instance : "");
  rec.kind_case = LEDGER__V1__RECORD__KIND_LEDGER_CHANGE;
  rec.ledger_change = &ch;
  ch.kind = kind;
  ch.billing_reference = (char *)ref;
  ch.currency = (char *)currency;
  ch.amount = amount;
  ch.transaction_id = (char *)(txid ? txid : "");
  ch.reference = (char *)(reference ? reference : "");
  *len = ledger__v1__record__get_packed_size(&rec);
  uint8_t *out = malloc(*len ? *len : 1);
  if (out)
    ledger__v1__record__pack(&rec, out);
  return out;
}
