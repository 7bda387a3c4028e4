/* libFuzzer target for the Connect codecs: each input is decoded as proto3
 * JSON (tg_pbjson_decode_ex) and as binary protobuf (protobuf_c_message_unpack)
 * into every ramp.v1 request and response message (JSON both strict and
 * ignoring unknown fields, as the gateway serves). Whatever decodes is
 * re-encoded and decoded again; the round trip must be stable, and a refused
 * input must come with a printable one-line reason. Any breach aborts, which
 * libFuzzer reports as a crash with the input saved. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rpc/pbjson.h"
#include "ramp/v1/exchange.pb-c.h"

static const ProtobufCMessageDescriptor *const descriptors[] = {
    &ramp__v1__discover_resources_request__descriptor,
    &ramp__v1__execute_transaction_request__descriptor,
    &ramp__v1__report_usage_request__descriptor,
    /* Responses: the gateway only encodes them, but they carry the field
     * kinds the requests lack (bool, enums, nested Money, int64). */
    &ramp__v1__discover_resources_response__descriptor,
    &ramp__v1__execute_transaction_response__descriptor,
    &ramp__v1__report_usage_response__descriptor,
};

static void fail(const char *what, const ProtobufCMessageDescriptor *d, const char *a,
                 const char *b) {
  fprintf(stderr, "connect_codec_fuzz: %s (%s)\n", what, d->name);
  if (a)
    fprintf(stderr, "  first:  %s\n", a);
  if (b)
    fprintf(stderr, "  second: %s\n", b);
  abort();
}

/* The contract of tg_pbjson_decode's err: NUL-terminated, one line of
 * printable ASCII, not empty. */
static void check_reason(const ProtobufCMessageDescriptor *d, const char *err, size_t errlen) {
  const char *nul = memchr(err, '\0', errlen);
  if (nul == NULL)
    fail("decode error reason is not NUL-terminated", d, NULL, NULL);
  if (nul == err)
    fail("decode refused the input without a reason", d, NULL, NULL);
  for (const char *p = err; p < nul; p++)
    if (*p < 0x20 || *p > 0x7e)
      fail("decode error reason holds a non-printable byte", d, err, NULL);
}

static uint8_t *pack(const ProtobufCMessage *m, size_t *len) {
  *len = protobuf_c_message_get_packed_size(m);
  uint8_t *buf = malloc(*len ? *len : 1);
  if (buf == NULL)
    abort();
  if (protobuf_c_message_pack(m, buf) != *len)
    fail("pack wrote a size other than get_packed_size", m->descriptor, NULL, NULL);
  return buf;
}

/* JSON text -> message -> JSON text -> message -> JSON text: the two texts
 * must match, and so must the binary forms of the two messages. */
static void json_round_trip(const ProtobufCMessageDescriptor *d, ProtobufCMessage *m) {
  char err[256];
  size_t len1 = 0, len2 = 0;
  char *text1 = tg_pbjson_encode_text(m, &len1);
  if (text1 == NULL) {
    /* Only a string with invalid UTF-8 may refuse to encode, and JSON input
     * cannot produce one; binary input can (protobuf-c does not check). */
    return;
  }
  if (strlen(text1) != len1)
    fail("encode_text length disagrees with the text", d, text1, NULL);
  for (size_t i = 0; i < len1; i++)
    if ((unsigned char)text1[i] > 0x7f || (unsigned char)text1[i] < 0x20)
      fail("encode_text output is not ASCII without raw control bytes", d, text1, NULL);
  memset(err, 'x', sizeof err);
  ProtobufCMessage *m2 = tg_pbjson_decode(d, text1, len1, err, sizeof err);
  if (m2 == NULL) {
    check_reason(d, err, sizeof err);
    fail("our own JSON does not decode", d, text1, err);
  }
  char *text2 = tg_pbjson_encode_text(m2, &len2);
  if (text2 == NULL)
    fail("a message decoded from our JSON does not encode", d, text1, NULL);
  if (len1 != len2 || memcmp(text1, text2, len1) != 0)
    fail("JSON round trip is not stable", d, text1, text2);
  size_t plen2, plen3;
  uint8_t *p2 = pack(m2, &plen2);
  ProtobufCMessage *m3 = tg_pbjson_decode(d, text2, len2, err, sizeof err);
  if (m3 == NULL)
    fail("our own JSON does not decode the second time", d, text2, err);
  uint8_t *p3 = pack(m3, &plen3);
  if (plen2 != plen3 || memcmp(p2, p3, plen2) != 0)
    fail("binary form changes across a JSON round trip", d, text1, text2);
  free(p2);
  free(p3);
  protobuf_c_message_free_unpacked(m3, NULL);
  protobuf_c_message_free_unpacked(m2, NULL);
  free(text2);
  free(text1);
}

static ProtobufCMessage *decode_checked(const ProtobufCMessageDescriptor *d, const uint8_t *data,
                                        size_t size, unsigned flags) {
  char err[256];
  memset(err, 'x', sizeof err);
  ProtobufCMessage *m = tg_pbjson_decode_ex(d, (const char *)data, size, flags, err, sizeof err);
  if (m == NULL) {
    check_reason(d, err, sizeof err);
    return NULL;
  }
  if (m->descriptor != d)
    fail("decode returned a message of another type", d, NULL, NULL);
  return m;
}

/* Strict decoding (unknown fields refused) and the lenient mode the gateway
 * serves with must agree whenever the strict one accepts. */
static void try_json(const ProtobufCMessageDescriptor *d, const uint8_t *data, size_t size) {
  ProtobufCMessage *strict = decode_checked(d, data, size, 0);
  ProtobufCMessage *lenient = decode_checked(d, data, size, TG_PBJSON_IGNORE_UNKNOWN);
  if (strict && !lenient)
    fail("ignoring unknown fields refused what strict decoding took", d, NULL, NULL);
  if (strict) {
    char *a = tg_pbjson_encode_text(strict, NULL);
    char *b = tg_pbjson_encode_text(lenient, NULL);
    if (a == NULL || b == NULL) /* decoded from JSON: every string is valid UTF-8 */
      fail("a message decoded from JSON does not encode", d, a, b);
    if (strcmp(a, b) != 0)
      fail("strict and lenient decoding disagree", d, a, b);
    free(a);
    free(b);
    json_round_trip(d, strict);
    protobuf_c_message_free_unpacked(strict, NULL);
  }
  if (lenient) {
    json_round_trip(d, lenient);
    protobuf_c_message_free_unpacked(lenient, NULL);
  }
}

/* Binary input goes through JSON and back. (protobuf-c's own binary round
 * trip is not checked: it keeps field number 0 from an overlong tag, 80 00,
 * and then cannot read what it packs; the gateway only ever unpacks.) */
static void try_proto(const ProtobufCMessageDescriptor *d, const uint8_t *data, size_t size) {
  ProtobufCMessage *m = protobuf_c_message_unpack(d, NULL, size, data);
  if (m == NULL)
    return;
  if (m->descriptor != d)
    fail("unpack returned a message of another type", d, NULL, NULL);
  json_round_trip(d, m);
  protobuf_c_message_free_unpacked(m, NULL);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  for (size_t i = 0; i < sizeof descriptors / sizeof descriptors[0]; i++) {
    try_json(descriptors[i], data, size);
    try_proto(descriptors[i], data, size);
  }
  return 0;
}
