#ifndef TG_PBJSON_H
#define TG_PBJSON_H

#include <stddef.h>

#include <jansson.h>
#include <protobuf-c/protobuf-c.h>

/* The proto3 JSON mapping over protobuf-c descriptors (protobuf-c has none).
 * Output: lowerCamelCase names, default values omitted, int64/uint64/fixed64
 * as decimal strings, enums by name, bytes as standard base64 with padding,
 * repeated as arrays, nested messages as objects, NaN/Infinity as strings.
 * Input: both the proto name and lowerCamelCase accepted, numbers as JSON
 * numbers or strings, enums by name or number, bytes base64 or base64url with
 * or without padding, null as the default, unknown fields rejected. */

/* Encodes msg to a new JSON object; NULL on allocation failure. */
json_t *tg_pbjson_encode(const ProtobufCMessage *msg);

/* Encodes msg to a compact JSON text (ASCII-safe is not forced); caller frees
 * with free(). *len receives the length. NULL on failure. */
char *tg_pbjson_encode_text(const ProtobufCMessage *msg, size_t *len);

/* Decodes JSON text into a new message of type d; caller frees with
 * protobuf_c_message_free_unpacked(msg, NULL). On error returns NULL and
 * writes a one-line reason naming the field path into err. */
ProtobufCMessage *tg_pbjson_decode(const ProtobufCMessageDescriptor *d, const char *text,
                                   size_t len, char *err, size_t errlen);

/* lowerCamelCase of a proto field name ("usage_purposes" -> "usagePurposes"). */
void tg_pbjson_camel(const char *name, char *out, size_t outlen);

#endif
