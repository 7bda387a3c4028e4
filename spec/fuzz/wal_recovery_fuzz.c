/* libFuzzer target for recovery of the write-ahead log (ledger/wal.h) and
 * the replay of its records into the prepaid ledger (ledger/prepaid.h).
 * Each input is the body of the last segment (what follows a valid 24-byte
 * header): frames, torn frames, garbage. Whatever it is:
 *  - tg_wal_open succeeds (truncating a torn or corrupt tail) or refuses
 *    with -EBADMSG (damage it must not repair) or what replay returned, and
 *    never crashes or reads out of bounds;
 *  - a log it opened opens again with the same records and nothing more to
 *    truncate (recovery reaches a fixed point);
 *  - tg_wal_scan, the tools' read-only reader, agrees with that second open;
 *  - every record replayed is applied to a prepaid ledger, which survives
 *    any payload (a protobuf that does not decode is -EBADMSG, never a
 *    crash) and keeps its sums in int64. */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "base/crc32c.h"
#include "ledger/prepaid.h"
#include "ledger/wal.h"

#define FAIL(...)                                                                              \
  do {                                                                                         \
    fprintf(stderr, "wal_recovery_fuzz: " __VA_ARGS__);                                        \
    fprintf(stderr, "\n");                                                                     \
    abort();                                                                                   \
  } while (0)

static char dir[64];
static char seg[128];

static void put32(uint8_t *p, uint32_t v) {
  for (int i = 0; i < 4; i++)
    p[i] = (uint8_t)(v >> (8 * i));
}

static void put64(uint8_t *p, uint64_t v) {
  for (int i = 0; i < 8; i++)
    p[i] = (uint8_t)(v >> (8 * i));
}

static int setup(void) {
  if (dir[0])
    return 0;
  snprintf(dir, sizeof dir, "/tmp/tg-walfuzz-XXXXXX");
  if (mkdtemp(dir) == NULL)
    return -1;
  snprintf(seg, sizeof seg, "%s/00000000000000000001.wal", dir);
  return 0;
}

/* The segment: a valid header for first sequence 1, then the input. */
static void write_segment(const uint8_t *data, size_t size) {
  uint8_t h[TG_WAL_HEADER_SIZE];
  memcpy(h, "TGWALSEG", 8);
  put32(h + 8, 1);
  put64(h + 16, 1);
  uint8_t crc_in[20];
  memcpy(crc_in, h, 12);
  memcpy(crc_in + 12, h + 16, 8);
  put32(h + 12, tg_crc32c(0, crc_in, sizeof crc_in));
  int fd = open(seg, O_WRONLY | O_CREAT | O_TRUNC, 0600);
  if (fd < 0 || write(fd, h, sizeof h) != (ssize_t)sizeof h ||
      (size && write(fd, data, size) != (ssize_t)size))
    FAIL("cannot write %s", seg);
  close(fd);
}

typedef struct replay {
  tg_prepaid_t *ledger;
  uint64_t records;
  uint64_t last_seq;
} replay_t;

static int on_record(void *arg, uint64_t seq, const void *payload, size_t len) {
  replay_t *r = arg;
  if (len == 0 || payload == NULL)
    FAIL("replayed an empty record");
  if (seq != r->last_seq + 1)
    FAIL("sequence %llu after %llu", (unsigned long long)seq, (unsigned long long)r->last_seq);
  r->last_seq = seq;
  r->records++;
  int rc = tg_prepaid_apply(r->ledger, seq, payload, len);
  if (rc != 0 && rc != -EBADMSG && rc != -ENOMEM)
    FAIL("apply returned %d", rc);
  return 0;
}

static int open_once(replay_t *r, tg_wal_recovery_t *rec) {
  tg_wal_opts_t o;
  tg_wal_opts_init(&o);
  o.dir = dir;
  o.replay = on_record;
  o.replay_arg = r;
  tg_wal_t *w = NULL;
  char err[256];
  int rc = tg_wal_open(&o, &w, rec, err, sizeof err);
  if (rc == 0)
    tg_wal_close(w);
  else if (rc != -EBADMSG)
    FAIL("open: %d (%s)", rc, err);
  return rc;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size > (1u << 20) || setup() != 0)
    return 0;
  write_segment(data, size);
  replay_t a = {tg_prepaid_new(), 0, 0};
  if (a.ledger == NULL)
    return 0;
  tg_wal_recovery_t ra = {0}, rb = {0}, rs = {0};
  int rc = open_once(&a, &ra);
  if (rc == 0) {
    if (ra.records != a.records)
      FAIL("recovery counted %llu records, replayed %llu", (unsigned long long)ra.records,
           (unsigned long long)a.records);
    replay_t b = {tg_prepaid_new(), 0, 0};
    if (b.ledger == NULL)
      FAIL("out of memory");
    if (open_once(&b, &rb) != 0)
      FAIL("a recovered log does not open again");
    if (rb.records != ra.records || rb.dropped_bytes != 0)
      FAIL("second open: %llu records (first %llu), %llu bytes dropped", (unsigned long long)rb.records,
           (unsigned long long)ra.records, (unsigned long long)rb.dropped_bytes);
    char err[256];
    if (tg_wal_scan(dir, NULL, NULL, &rs, err, sizeof err) != 0 || rs.records != rb.records)
      FAIL("scan disagrees with open: %s", err);
    tg_prepaid_free(b.ledger);
  }
  tg_prepaid_free(a.ledger);
  /* Start the next input from an empty directory. */
  char path[160];
  snprintf(path, sizeof path, "%s/00000000000000000001.wal", dir);
  unlink(path);
  return 0;
}
