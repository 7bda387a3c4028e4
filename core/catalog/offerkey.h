#ifndef TG_OFFERKEY_H
#define TG_OFFERKEY_H

#include <stddef.h>

#include "catalog/offer.h"

/* The key that signs offer ids, kept in <data_dir>/offer.key (64 hex digits,
 * mode 0600), made on first start. Instances behind one load balancer share
 * the file, so that an offer discovered on one is accepted by another.
 * data_dir NULL: a random key in memory only (offers die with the process;
 * logged as a warning).
 *
 * Fills k (initialized here; the caller clears it with tg_offer_keyring_clear
 * whatever this returns). Main thread, at start. Returns 0, or -EINVAL (a
 * malformed key file) / -EIO (no randomness, cannot write) with err set. The
 * key never reaches err or a log. */
int tg_offerkey_load(tg_offer_keyring_t *k, const char *data_dir, char *err, size_t errlen);

#endif
