#include "base/b64.h"

#include <errno.h>
#include <string.h>

#include <mbedtls/base64.h>

#include "test.h"

/* RFC 4648 section 10. */
TEST(rfc4648_vectors) {
  static const char *const in[] = {"", "f", "fo", "foo", "foob", "fooba", "foobar"};
  static const char *const padded[] = {"", "Zg==", "Zm8=", "Zm9v", "Zm9vYg==", "Zm9vYmE=", "Zm9vYmFy"};
  static const char *const bare[] = {"", "Zg", "Zm8", "Zm9v", "Zm9vYg", "Zm9vYmE", "Zm9vYmFy"};
  char out[16];
  for (size_t i = 0; i < sizeof in / sizeof in[0]; i++) {
    size_t n = strlen(in[i]);
    CHECK_INT(tg_b64_encode((const uint8_t *)in[i], n, 0, 1, out, sizeof out), 0);
    CHECK_STR(out, padded[i]);
    CHECK_INT(tg_b64_len(n, 1), strlen(padded[i]));
    CHECK_INT(tg_b64_encode((const uint8_t *)in[i], n, 1, 0, out, sizeof out), 0);
    CHECK_STR(out, bare[i]);
    CHECK_INT(tg_b64_len(n, 0), strlen(bare[i]));
  }
}

/* Every byte value, every length mod 3: the same text as mbedTLS' encoder,
 * translated to the URL alphabet where asked. */
TEST(matches_mbedtls_and_the_url_alphabet) {
  uint8_t in[256];
  char ours[400], theirs[400];
  for (int i = 0; i < 256; i++)
    in[i] = (uint8_t)(255 - i);
  for (size_t n = 0; n <= sizeof in; n += 1 + n / 16) {
    size_t olen = 0;
    CHECK_INT(mbedtls_base64_encode((unsigned char *)theirs, sizeof theirs, &olen, in, n), 0);
    theirs[olen] = '\0';
    CHECK_INT(tg_b64_encode(in, n, 0, 1, ours, sizeof ours), 0);
    CHECK_STR(ours, theirs);
    for (size_t k = 0; k < olen; k++)
      theirs[k] = theirs[k] == '+' ? '-' : theirs[k] == '/' ? '_' : theirs[k];
    while (olen > 0 && theirs[olen - 1] == '=')
      theirs[--olen] = '\0';
    CHECK_INT(tg_b64_encode(in, n, 1, 0, ours, sizeof ours), 0);
    CHECK_STR(ours, theirs);
  }
}

TEST(too_small_writes_nothing) {
  char out[4] = "xyz";
  CHECK_INT(tg_b64_encode((const uint8_t *)"foo", 3, 0, 1, out, sizeof out), -ENOSPC); /* 4 + NUL */
  CHECK_STR(out, "");
  CHECK_INT(tg_b64_encode((const uint8_t *)"fo", 2, 1, 0, out, sizeof out), 0);
  CHECK_STR(out, "Zm8");
}

/* The decoder undoes the encoder for every length, and refuses every other
 * spelling: a non-zero unused tail, padding, other alphabets, 1 mod 4. */
TEST(url_decode_is_strict_and_undoes_encode) {
  uint8_t in[64], back[64];
  char text[100];
  for (int i = 0; i < 64; i++)
    in[i] = (uint8_t)(i * 37 + 11);
  for (size_t n = 0; n <= sizeof in; n++) {
    size_t got = 999;
    CHECK_INT(tg_b64_encode(in, n, 1, 0, text, sizeof text), 0);
    size_t len = strlen(text);
    CHECK_INT(tg_b64url_decode(text, len, back, sizeof back, &got), 0);
    CHECK_INT(got, n);
    CHECK(memcmp(back, in, n) == 0);
    if (len % 4 != 0) { /* the last character carries unused bits: flip the lowest */
      char bad[100];
      memcpy(bad, text, len);
      bad[len - 1] = bad[len - 1] == 'A' ? 'B' : bad[len - 1] == 'B' ? 'A' : bad[len - 1];
      if (bad[len - 1] != text[len - 1])
        CHECK_INT(tg_b64url_decode(bad, len, back, sizeof back, &got), -EINVAL);
    }
    if (n > 0)
      CHECK_INT(tg_b64url_decode(text, len, back, n - 1, &got), -ENOSPC);
  }
  size_t got;
  CHECK_INT(tg_b64url_decode("Zg==", 4, back, sizeof back, &got), -EINVAL);
  CHECK_INT(tg_b64url_decode("Zm+v", 4, back, sizeof back, &got), -EINVAL);
  CHECK_INT(tg_b64url_decode("Zm/v", 4, back, sizeof back, &got), -EINVAL);
  CHECK_INT(tg_b64url_decode("Zm 9", 4, back, sizeof back, &got), -EINVAL);
  CHECK_INT(tg_b64url_decode("Zm9vY", 5, back, sizeof back, &got), -EINVAL);
  CHECK_INT(tg_b64url_decode("Zh", 2, back, sizeof back, &got), -EINVAL); /* 'h' leaves bits set */
  CHECK_INT(tg_b64url_decode("Zg", 2, back, sizeof back, &got), 0);
  CHECK_INT(got, 1);
  CHECK_INT(back[0], 'f');
  CHECK_INT(tg_b64url_decode("", 0, back, sizeof back, &got), 0);
  CHECK_INT(got, 0);
}

/* The padded standard form (payment headers): undoes the encoder for every
 * length; padding exactly where it goes, the standard alphabet only, unused
 * bits zero; each refusal says which. */
TEST(std_decode_is_strict_and_undoes_encode) {
  uint8_t in[64], back[64];
  char text[100];
  for (int i = 0; i < 64; i++)
    in[i] = (uint8_t)(i * 53 + 7);
  for (size_t n = 0; n <= sizeof in; n++) {
    size_t got = 999;
    CHECK_INT(tg_b64_encode(in, n, 0, 1, text, sizeof text), 0);
    size_t len = strlen(text);
    CHECK_INT(tg_b64_decode(text, len, 0, 1, back, sizeof back, &got, NULL), 0);
    CHECK_INT(got, n);
    CHECK(memcmp(back, in, n) == 0);
    if (n % 3 != 0) /* unpadded: refused */
      CHECK_INT(tg_b64_decode(text, len - (3 - n % 3), 0, 1, back, sizeof back, &got, NULL), -EDOM);
    if (n > 0)
      CHECK_INT(tg_b64_decode(text, len, 0, 1, back, n - 1, &got, NULL), -ENOSPC);
  }
  size_t got, bad = 99;
  CHECK_INT(tg_b64_decode("Zm9v", 4, 0, 1, back, sizeof back, &got, NULL), 0);
  CHECK_INT(tg_b64_decode("Zg==", 4, 0, 1, back, sizeof back, &got, NULL), 0);
  CHECK_INT(got, 1);
  CHECK_INT(tg_b64_decode("Zh==", 4, 0, 1, back, sizeof back, &got, NULL), -EBADMSG);
  CHECK_INT(tg_b64_decode("Zm-v", 4, 0, 1, back, sizeof back, &got, &bad), -EINVAL);
  CHECK_INT(bad, 2);
  CHECK_INT(tg_b64_decode("Zm+v", 4, 0, 1, back, sizeof back, &got, NULL), 0);
  CHECK_INT(tg_b64_decode("Z=g=", 4, 0, 1, back, sizeof back, &got, &bad), -EINVAL);
  CHECK_INT(tg_b64_decode("Z===", 4, 0, 1, back, sizeof back, &got, NULL), -EINVAL); /* a third = is misplaced */
  CHECK_INT(tg_b64_decode("====", 4, 0, 1, back, sizeof back, &got, NULL), -EINVAL);
  CHECK_INT(tg_b64_decode("Zm9v\n", 5, 0, 1, back, sizeof back, &got, NULL), -EDOM);
  CHECK_INT(tg_b64_decode("Zm 9", 4, 0, 1, back, sizeof back, &got, &bad), -EINVAL);
  CHECK_INT(bad, 2);
  CHECK_INT(tg_b64_decode("", 0, 0, 1, back, sizeof back, &got, NULL), 0);
  CHECK_INT(got, 0);
}
