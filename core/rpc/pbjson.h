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
 * or without padding, null as the default, unknown fields rejected.
 *
 * Presence: proto3 implicit fields are emitted when not default; oneof members
 * when their case is set (even if default); proto2-style optional fields when
 * their has_ flag (or non-default pointer) says so. Maps (protobuf-c's repeated
 * XxxEntry messages, recognised by protoc's naming) map to JSON objects.
 * Well-known types (Timestamp, Any, wrappers...) get no special form.
 *
 * All functions are reentrant and keep no global state: any thread may call
 * them concurrently on distinct messages. */

/* Messages nested deeper than this (the top level counts as 1) are refused by
 * both directions, so hostile input cannot exhaust the stack. */
#define TG_PBJSON_MAX_DEPTH 64

/* Encodes msg to a new JSON object (caller owns the reference). NULL on
 * allocation failure, nesting beyond TG_PBJSON_MAX_DEPTH, or a string field
 * holding invalid UTF-8 (protobuf-c does not check UTF-8 when unpacking). */
json_t *tg_pbjson_encode(const ProtobufCMessage *msg);

/* Encodes msg to compact, ASCII-only JSON text (non-ASCII escaped as \uXXXX),
 * NUL-terminated; caller frees with free(). *len (if len is not NULL) receives
 * the length without the NUL. NULL on the failures of tg_pbjson_encode(). */
char *tg_pbjson_encode_text(const ProtobufCMessage *msg, size_t *len);

/* Decodes JSON text (len bytes, no NUL needed) into a new message of type d;
 * caller frees with protobuf_c_message_free_unpacked(msg, NULL). On error
 * returns NULL and writes a one-line reason into err (errlen bytes, always
 * NUL-terminated, printable ASCII only), prefixed by the path of the offending
 * value, e.g. "resources[2].uri: expected string". The top level must be an
 * object; duplicate keys are rejected. A uint64 above 2^63-1 must be sent as a
 * string (jansson cannot hold it as a number), as every proto3 encoder does. */
ProtobufCMessage *tg_pbjson_decode(const ProtobufCMessageDescriptor *d, const char *text,
                                   size_t len, char *err, size_t errlen);

/* As tg_pbjson_decode, with options. TG_PBJSON_IGNORE_UNKNOWN skips fields
 * the descriptor does not know, as binary protobuf does and as connect-go's
 * JSON codec does, so clients built on a newer schema keep working. */
#define TG_PBJSON_IGNORE_UNKNOWN 1u
ProtobufCMessage *tg_pbjson_decode_ex(const ProtobufCMessageDescriptor *d, const char *text,
                                      size_t len, unsigned flags, char *err, size_t errlen);

/* lowerCamelCase of a proto field name ("usage_purposes" -> "usagePurposes"),
 * protoc's json_name rule; truncated to fit outlen (NUL included). */
void tg_pbjson_camel(const char *name, char *out, size_t outlen);

#endif
