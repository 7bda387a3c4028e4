#include "base/crc32c.h"
#include "test.h"

/* Bit at a time, straight from the definition: the reference for the table. */
static uint32_t crc_bitwise(const uint8_t *p, size_t n) {
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; i++) {
    c ^= p[i];
    for (int k = 0; k < 8; k++)
      c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
  }
  return ~c;
}

TEST(check_value) {
  CHECK_INT(tg_crc32c(0, "123456789", 9), 0xE3069283u);
  CHECK_INT(tg_crc32c(0, "", 0), 0);
}

/* RFC 3720 B.4: 32 bytes of zeros, of 0xff, ascending. */
TEST(rfc3720_vectors) {
  uint8_t b[32];
  memset(b, 0, sizeof b);
  CHECK_INT(tg_crc32c(0, b, 32), 0x8A9136AAu);
  memset(b, 0xff, sizeof b);
  CHECK_INT(tg_crc32c(0, b, 32), 0x62A8AB43u);
  for (int i = 0; i < 32; i++)
    b[i] = (uint8_t)i;
  CHECK_INT(tg_crc32c(0, b, 32), 0x46DD794Eu);
}

TEST(pieces_and_alignment_match_bitwise) {
  uint8_t buf[1031];
  for (size_t i = 0; i < sizeof buf; i++)
    buf[i] = (uint8_t)(i * 131 + 7);
  for (size_t off = 0; off < 9; off++)
    for (size_t n = 0; n + off <= sizeof buf; n += 37) {
      uint32_t want = crc_bitwise(buf + off, n);
      CHECK_INT(tg_crc32c(0, buf + off, n), want);
      size_t h = n / 3;
      CHECK_INT(tg_crc32c(tg_crc32c(0, buf + off, h), buf + off + h, n - h), want);
    }
}
