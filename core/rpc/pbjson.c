#include "rpc/pbjson.h"

#include <float.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mbedtls/base64.h>

#define MEMBER(m, off) ((char *)(m) + (off))

/* Bits of the seen-field set kept on the stack; larger messages allocate it. */
#define SEEN_WORDS 4

typedef struct out_buf {
  char *data;
  size_t len, cap;
} out_buf_t;

/* One step of the path to the value being decoded, kept on the C stack and
 * only formatted when an error is reported. */
typedef struct seg {
  const struct seg *up;
  enum { SEG_FIELD, SEG_INDEX, SEG_KEY } kind;
  const char *s; /* field name or map key as the client wrote it */
  size_t n;
  size_t index;
} seg_t;

typedef struct dec {
  char *err;
  size_t errlen;
  int failed;
  int depth;
  int ignore_unknown;
  const seg_t *top;
} dec_t;

/* An integer as sign and magnitude, so that every range check is exact. */
typedef struct bigint {
  bool neg;
  uint64_t mag;
} bigint_t;

static const char *type_name(ProtobufCType t) {
  switch (t) {
  case PROTOBUF_C_TYPE_INT32: return "int32";
  case PROTOBUF_C_TYPE_SINT32: return "sint32";
  case PROTOBUF_C_TYPE_SFIXED32: return "sfixed32";
  case PROTOBUF_C_TYPE_INT64: return "int64";
  case PROTOBUF_C_TYPE_SINT64: return "sint64";
  case PROTOBUF_C_TYPE_SFIXED64: return "sfixed64";
  case PROTOBUF_C_TYPE_UINT32: return "uint32";
  case PROTOBUF_C_TYPE_FIXED32: return "fixed32";
  case PROTOBUF_C_TYPE_UINT64: return "uint64";
  case PROTOBUF_C_TYPE_FIXED64: return "fixed64";
  case PROTOBUF_C_TYPE_FLOAT: return "float";
  case PROTOBUF_C_TYPE_DOUBLE: return "double";
  case PROTOBUF_C_TYPE_BOOL: return "bool";
  case PROTOBUF_C_TYPE_ENUM: return "enum";
  case PROTOBUF_C_TYPE_STRING: return "string";
  case PROTOBUF_C_TYPE_BYTES: return "bytes";
  case PROTOBUF_C_TYPE_MESSAGE: return "message";
  }
  return "?";
}

static size_t elt_size(ProtobufCType t) {
  switch (t) {
  case PROTOBUF_C_TYPE_INT32:
  case PROTOBUF_C_TYPE_SINT32:
  case PROTOBUF_C_TYPE_SFIXED32:
  case PROTOBUF_C_TYPE_UINT32:
  case PROTOBUF_C_TYPE_FIXED32:
  case PROTOBUF_C_TYPE_ENUM:
    return sizeof(int32_t);
  case PROTOBUF_C_TYPE_INT64:
  case PROTOBUF_C_TYPE_SINT64:
  case PROTOBUF_C_TYPE_SFIXED64:
  case PROTOBUF_C_TYPE_UINT64:
  case PROTOBUF_C_TYPE_FIXED64:
    return sizeof(int64_t);
  case PROTOBUF_C_TYPE_FLOAT: return sizeof(float);
  case PROTOBUF_C_TYPE_DOUBLE: return sizeof(double);
  case PROTOBUF_C_TYPE_BOOL: return sizeof(protobuf_c_boolean);
  case PROTOBUF_C_TYPE_STRING: return sizeof(char *);
  case PROTOBUF_C_TYPE_BYTES: return sizeof(ProtobufCBinaryData);
  case PROTOBUF_C_TYPE_MESSAGE: return sizeof(ProtobufCMessage *);
  }
  return 0;
}

void tg_pbjson_camel(const char *name, char *out, size_t outlen) {
  size_t i = 0;
  bool up = false;
  if (outlen == 0)
    return;
  for (; *name && i + 1 < outlen; name++) {
    char c = *name;
    if (c == '_') {
      up = true;
      continue;
    }
    if (up && c >= 'a' && c <= 'z')
      c = (char)(c - 'a' + 'A');
    up = false;
    out[i++] = c;
  }
  out[i] = '\0';
}

/* Matches the camel-case form of snake_case name (UpperCamel when
 * upper_first, else lowerCamel) against the start of s (n bytes), computed on
 * the fly so that lookups allocate nothing. Returns the bytes of s matched,
 * or -1 when they differ. */
static long camel_match(const char *name, bool upper_first, const char *s, size_t n) {
  size_t i = 0;
  bool up = upper_first;
  for (; *name; name++) {
    char c = *name;
    if (c == '_') {
      up = true;
      continue;
    }
    if (up && c >= 'a' && c <= 'z')
      c = (char)(c - 'a' + 'A');
    up = false;
    if (i >= n || s[i] != c)
      return -1;
    i++;
  }
  return (long)i;
}

/* Whether key (klen bytes) is the lowerCamelCase form of name. */
static bool camel_eq(const char *name, const char *key, size_t klen) {
  return camel_match(name, false, key, klen) == (long)klen;
}

/* protoc names a map's entry message after the field: "usage_counts" ->
 * "UsageCountsEntry", nested in the message holding the field. protobuf-c keeps
 * no map_entry option, so this naming plus the key/value shape identifies one. */
static bool entry_name_eq(const char *field, const char *short_name) {
  long m = camel_match(field, true, short_name, strlen(short_name));
  return m >= 0 && strcmp(short_name + m, "Entry") == 0;
}

static const ProtobufCMessageDescriptor *map_entry(const ProtobufCMessageDescriptor *parent,
                                                   const ProtobufCFieldDescriptor *f) {
  const ProtobufCMessageDescriptor *e = f->descriptor;
  if (f->label != PROTOBUF_C_LABEL_REPEATED || f->type != PROTOBUF_C_TYPE_MESSAGE || !e ||
      e->n_fields != 2)
    return NULL;
  const ProtobufCFieldDescriptor *k = &e->fields[0], *v = &e->fields[1];
  if (k->id != 1 || v->id != 2 || strcmp(k->name, "key") != 0 || strcmp(v->name, "value") != 0 ||
      k->label == PROTOBUF_C_LABEL_REPEATED || v->label == PROTOBUF_C_LABEL_REPEATED)
    return NULL;
  switch (k->type) {
  case PROTOBUF_C_TYPE_FLOAT:
  case PROTOBUF_C_TYPE_DOUBLE:
  case PROTOBUF_C_TYPE_BYTES:
  case PROTOBUF_C_TYPE_ENUM:
  case PROTOBUF_C_TYPE_MESSAGE:
    return NULL;
  default:
    break;
  }
  if (!entry_name_eq(f->name, e->short_name))
    return NULL;
  size_t pn = strlen(parent->name);
  if (strncmp(e->name, parent->name, pn) != 0 || e->name[pn] != '.' ||
      strcmp(e->name + pn + 1, e->short_name) != 0)
    return NULL;
  return e;
}

static json_t *encode_message(const ProtobufCMessage *m, int depth);

/* The text's length is taken from the buffer, never from snprintf's return
 * (which is what it wanted to write, not what it wrote). */
static json_t *int64_string(int64_t v) {
  char b[24];
  snprintf(b, sizeof b, "%" PRId64, v);
  return json_string(b);
}

static json_t *uint64_string(uint64_t v) {
  char b[24];
  snprintf(b, sizeof b, "%" PRIu64, v);
  return json_string(b);
}

static json_t *encode_double(double v) {
  if (isnan(v))
    return json_string("NaN");
  if (isinf(v))
    return json_string(v > 0 ? "Infinity" : "-Infinity");
  return json_real(v);
}

static json_t *encode_bytes(const ProtobufCBinaryData *b) {
  if (b->len == 0)
    return json_string("");
  if (b->len > (SIZE_MAX - 8) / 4 * 3)
    return NULL;
  size_t cap = (b->len + 2) / 3 * 4 + 1, olen = 0;
  unsigned char *tmp = malloc(cap);
  if (!tmp)
    return NULL;
  json_t *j = NULL;
  if (mbedtls_base64_encode(tmp, cap, &olen, b->data, b->len) == 0)
    j = json_stringn_nocheck((const char *)tmp, olen);
  free(tmp);
  return j;
}

/* Encodes one value of field f's type stored at slot (a member or an array
 * element). String fields holding invalid UTF-8 fail: JSON cannot carry them. */
static json_t *encode_value(const ProtobufCFieldDescriptor *f, const void *slot, int depth) {
  switch (f->type) {
  case PROTOBUF_C_TYPE_INT32:
  case PROTOBUF_C_TYPE_SINT32:
  case PROTOBUF_C_TYPE_SFIXED32:
    return json_integer(*(const int32_t *)slot);
  case PROTOBUF_C_TYPE_UINT32:
  case PROTOBUF_C_TYPE_FIXED32:
    return json_integer(*(const uint32_t *)slot);
  case PROTOBUF_C_TYPE_INT64:
  case PROTOBUF_C_TYPE_SINT64:
  case PROTOBUF_C_TYPE_SFIXED64:
    return int64_string(*(const int64_t *)slot);
  case PROTOBUF_C_TYPE_UINT64:
  case PROTOBUF_C_TYPE_FIXED64:
    return uint64_string(*(const uint64_t *)slot);
  case PROTOBUF_C_TYPE_FLOAT:
    return encode_double(*(const float *)slot);
  case PROTOBUF_C_TYPE_DOUBLE:
    return encode_double(*(const double *)slot);
  case PROTOBUF_C_TYPE_BOOL:
    return json_boolean(*(const protobuf_c_boolean *)slot);
  case PROTOBUF_C_TYPE_ENUM: {
    int v = *(const int32_t *)slot;
    const ProtobufCEnumValue *ev = protobuf_c_enum_descriptor_get_value(f->descriptor, v);
    return ev ? json_string(ev->name) : json_integer(v);
  }
  case PROTOBUF_C_TYPE_STRING: {
    const char *s = *(char *const *)slot;
    return json_string(s ? s : "");
  }
  case PROTOBUF_C_TYPE_BYTES:
    return encode_bytes(slot);
  case PROTOBUF_C_TYPE_MESSAGE: {
    const ProtobufCMessage *sub = *(ProtobufCMessage *const *)slot;
    return sub ? encode_message(sub, depth + 1) : json_object();
  }
  }
  return NULL;
}

/* Whether field f of m is emitted: proto3 implicit presence omits defaults,
 * explicit presence (oneof, proto2 optional, messages) follows the has-state. */
static bool field_present(const ProtobufCMessage *m, const ProtobufCFieldDescriptor *f) {
  const void *p = MEMBER(m, f->offset);
  if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) {
    if (*(const uint32_t *)MEMBER(m, f->quantifier_offset) != f->id)
      return false;
    return f->type != PROTOBUF_C_TYPE_MESSAGE || *(void *const *)p != NULL;
  }
  if (f->label == PROTOBUF_C_LABEL_REPEATED)
    return *(const size_t *)MEMBER(m, f->quantifier_offset) > 0;
  if (f->type == PROTOBUF_C_TYPE_MESSAGE)
    return *(void *const *)p != NULL;
  if (f->label == PROTOBUF_C_LABEL_REQUIRED)
    return f->type != PROTOBUF_C_TYPE_STRING || *(void *const *)p != NULL;
  if (f->label == PROTOBUF_C_LABEL_OPTIONAL) {
    if (f->type == PROTOBUF_C_TYPE_STRING) {
      const void *s = *(void *const *)p;
      return s != NULL && s != f->default_value;
    }
    return *(const protobuf_c_boolean *)MEMBER(m, f->quantifier_offset);
  }
  switch (f->type) {
  case PROTOBUF_C_TYPE_INT32:
  case PROTOBUF_C_TYPE_SINT32:
  case PROTOBUF_C_TYPE_SFIXED32:
  case PROTOBUF_C_TYPE_UINT32:
  case PROTOBUF_C_TYPE_FIXED32:
  case PROTOBUF_C_TYPE_ENUM:
    return *(const uint32_t *)p != 0;
  case PROTOBUF_C_TYPE_INT64:
  case PROTOBUF_C_TYPE_SINT64:
  case PROTOBUF_C_TYPE_SFIXED64:
  case PROTOBUF_C_TYPE_UINT64:
  case PROTOBUF_C_TYPE_FIXED64:
    return *(const uint64_t *)p != 0;
  case PROTOBUF_C_TYPE_FLOAT:
    return *(const float *)p != 0;
  case PROTOBUF_C_TYPE_DOUBLE:
    return *(const double *)p != 0;
  case PROTOBUF_C_TYPE_BOOL:
    return *(const protobuf_c_boolean *)p != 0;
  case PROTOBUF_C_TYPE_STRING: {
    const char *s = *(const char *const *)p;
    return s != NULL && s[0] != '\0';
  }
  case PROTOBUF_C_TYPE_BYTES:
    return ((const ProtobufCBinaryData *)p)->len != 0;
  case PROTOBUF_C_TYPE_MESSAGE:
    break;
  }
  return false;
}

static json_t *encode_map(const ProtobufCMessageDescriptor *e, ProtobufCMessage *const *arr,
                          size_t n, int depth) {
  const ProtobufCFieldDescriptor *kf = &e->fields[0], *vf = &e->fields[1];
  json_t *obj = json_object();
  if (!obj)
    return NULL;
  for (size_t i = 0; i < n; i++) {
    const ProtobufCMessage *ent = arr[i];
    if (!ent)
      continue;
    const void *kp = MEMBER(ent, kf->offset);
    char num[24];
    const char *key = num;
    switch (kf->type) {
    case PROTOBUF_C_TYPE_INT32:
    case PROTOBUF_C_TYPE_SINT32:
    case PROTOBUF_C_TYPE_SFIXED32:
      snprintf(num, sizeof num, "%" PRId32, *(const int32_t *)kp);
      break;
    case PROTOBUF_C_TYPE_UINT32:
    case PROTOBUF_C_TYPE_FIXED32:
      snprintf(num, sizeof num, "%" PRIu32, *(const uint32_t *)kp);
      break;
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64:
      snprintf(num, sizeof num, "%" PRId64, *(const int64_t *)kp);
      break;
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64:
      snprintf(num, sizeof num, "%" PRIu64, *(const uint64_t *)kp);
      break;
    case PROTOBUF_C_TYPE_BOOL:
      key = *(const protobuf_c_boolean *)kp ? "true" : "false";
      break;
    default: /* string: map_entry() admits no other key type */
      key = *(const char *const *)kp ? *(const char *const *)kp : "";
      break;
    }
    json_t *v = encode_value(vf, MEMBER(ent, vf->offset), depth);
    if (!v || json_object_set_new(obj, key, v) != 0)
      goto fail;
  }
  return obj;
fail:
  json_decref(obj);
  return NULL;
}

static json_t *encode_field(const ProtobufCMessage *m, const ProtobufCFieldDescriptor *f,
                            int depth) {
  const void *p = MEMBER(m, f->offset);
  if (f->label != PROTOBUF_C_LABEL_REPEATED || (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF))
    return encode_value(f, p, depth);
  size_t n = *(const size_t *)MEMBER(m, f->quantifier_offset);
  const char *arr = *(const char *const *)p;
  const ProtobufCMessageDescriptor *e = map_entry(m->descriptor, f);
  if (e)
    return encode_map(e, (ProtobufCMessage *const *)arr, n, depth);
  json_t *a = json_array();
  if (!a)
    return NULL;
  size_t sz = elt_size(f->type);
  for (size_t i = 0; i < n; i++) {
    if (json_array_append_new(a, encode_value(f, arr + i * sz, depth)) != 0) {
      json_decref(a);
      return NULL;
    }
  }
  return a;
}

static json_t *encode_message(const ProtobufCMessage *m, int depth) {
  if (depth > TG_PBJSON_MAX_DEPTH)
    return NULL;
  const ProtobufCMessageDescriptor *d = m->descriptor;
  json_t *obj = json_object();
  if (!obj)
    return NULL;
  for (unsigned i = 0; i < d->n_fields; i++) {
    const ProtobufCFieldDescriptor *f = &d->fields[i];
    if (!field_present(m, f))
      continue;
    json_t *v = encode_field(m, f, depth);
    if (!v)
      goto fail;
    char stack[128], *key = stack;
    size_t need = strlen(f->name) + 1;
    if (need > sizeof stack && !(key = malloc(need))) {
      json_decref(v);
      goto fail;
    }
    tg_pbjson_camel(f->name, key, need);
    int rc = json_object_set_new_nocheck(obj, key, v);
    if (key != stack)
      free(key);
    if (rc != 0)
      goto fail;
  }
  return obj;
fail:
  json_decref(obj);
  return NULL;
}

json_t *tg_pbjson_encode(const ProtobufCMessage *msg) {
  if (!msg || !msg->descriptor)
    return NULL;
  return encode_message(msg, 1);
}

static int dump_cb(const char *buf, size_t size, void *data) {
  out_buf_t *o = data;
  if (size >= o->cap - o->len) {
    size_t cap = o->cap ? o->cap : 256;
    while (size >= cap - o->len) {
      if (cap > SIZE_MAX / 2)
        return -1;
      cap *= 2;
    }
    char *p = realloc(o->data, cap);
    if (!p)
      return -1;
    o->data = p;
    o->cap = cap;
  }
  memcpy(o->data + o->len, buf, size);
  o->len += size;
  return 0;
}

char *tg_pbjson_encode_text(const ProtobufCMessage *msg, size_t *len) {
  json_t *j = tg_pbjson_encode(msg);
  if (!j)
    return NULL;
  /* Our own buffer rather than json_dumps(): the caller's free() must match
   * even if someone installs jansson allocation hooks. */
  out_buf_t o = {NULL, 0, 0};
  int rc = json_dump_callback(j, dump_cb, &o, JSON_COMPACT | JSON_ENSURE_ASCII);
  json_decref(j);
  if (rc != 0 || dump_cb("", 1, &o) != 0) {
    free(o.data);
    return NULL;
  }
  if (len)
    *len = o.len - 1;
  return o.data;
}

/* Path text shown in errors: the innermost part is kept when it is long. */
#define PATH_MAX_SHOWN 128
#define KEY_MAX_SHOWN 40

static void prepend(char *buf, size_t *start, bool *cut, const char *s, size_t n) {
  if (n > *start) {
    s += n - *start;
    n = *start;
    *cut = true;
  }
  *start -= n;
  memcpy(buf + *start, s, n);
}

/* Formats the path from the innermost step outwards into buf, returning where
 * the text starts; an elided head is marked with "...". */
static const char *format_path(const seg_t *s, char buf[PATH_MAX_SHOWN]) {
  size_t start = PATH_MAX_SHOWN - 1;
  bool cut = false;
  buf[start] = '\0';
  for (; s && !cut; s = s->up) {
    char num[32];
    switch (s->kind) {
    case SEG_FIELD:
      prepend(buf, &start, &cut, s->s, s->n);
      if (s->up)
        prepend(buf, &start, &cut, ".", 1);
      break;
    case SEG_INDEX:
      snprintf(num, sizeof num, "[%zu]", s->index);
      prepend(buf, &start, &cut, num, strlen(num));
      break;
    case SEG_KEY:
      prepend(buf, &start, &cut, "\"]", 2);
      prepend(buf, &start, &cut, s->s, s->n < KEY_MAX_SHOWN ? s->n : KEY_MAX_SHOWN);
      prepend(buf, &start, &cut, "[\"", 2);
      break;
    }
  }
  if (cut)
    memcpy(buf + start, "...", 3);
  return buf + start;
}

/* Records the first error as "<path>: <reason>". Client-supplied text lands in
 * it, so anything outside printable ASCII becomes '?' (the reason is relayed in
 * JSON error bodies, and a cut UTF-8 sequence would make those invalid). */
__attribute__((format(printf, 2, 3))) static int fail(dec_t *d, const char *fmt, ...) {
  if (d->failed)
    return -1;
  d->failed = 1;
  if (!d->err || d->errlen == 0)
    return -1;
  char pathbuf[PATH_MAX_SHOWN], reason[256];
  const char *path = format_path(d->top, pathbuf);
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(reason, sizeof reason, fmt, ap);
  va_end(ap);
  snprintf(d->err, d->errlen, "%s%s%s", path, path[0] ? ": " : "", reason);
  for (char *c = d->err; *c; c++)
    if ((unsigned char)*c < 0x20 || (unsigned char)*c > 0x7e)
      *c = '?';
  return -1;
}

static int decode_message(dec_t *d, const json_t *obj, ProtobufCMessage *m);

/* Parses JSON number syntax held in a string ("1e3", "2.5") with jansson
 * itself, so the grammar is strict and independent of the C locale. */
static json_t *number_from_text(const char *s, size_t n) {
  /* jansson skips surrounding whitespace; a number must fill the string. */
  if (n == 0 || !(s[0] == '-' || (s[0] >= '0' && s[0] <= '9')) || s[n - 1] < '0' ||
      s[n - 1] > '9')
    return NULL;
  json_t *j = json_loadb(s, n, JSON_DECODE_ANY, NULL);
  if (j && !json_is_number(j)) {
    json_decref(j);
    return NULL;
  }
  return j;
}

/* Integral value of a JSON number; strings hold decimal digits, or, unless
 * digits_only (map keys), any JSON number text. */
static int get_bigint(dec_t *d, const json_t *v, ProtobufCType t, bool digits_only,
                      bigint_t *out) {
  if (json_is_integer(v)) {
    json_int_t x = json_integer_value(v);
    out->neg = x < 0;
    out->mag = out->neg ? (uint64_t)0 - (uint64_t)x : (uint64_t)x;
    return 0;
  }
  if (json_is_real(v)) {
    double x = json_real_value(v);
    if (x != floor(x))
      return fail(d, "expected %s, got a fractional number", type_name(t));
    out->neg = x < 0;
    x = fabs(x);
    if (x >= 18446744073709551616.0)
      return fail(d, "value out of range for %s", type_name(t));
    out->mag = (uint64_t)x;
    return 0;
  }
  if (!json_is_string(v))
    return fail(d, "expected %s", type_name(t));
  const char *s = json_string_value(v);
  size_t n = json_string_length(v);
  bool neg = n > 0 && s[0] == '-';
  uint64_t mag = 0;
  size_t i = neg ? 1 : 0;
  if (i < n) {
    for (; i < n && s[i] >= '0' && s[i] <= '9'; i++) {
      unsigned dig = (unsigned)(s[i] - '0');
      if (mag > (UINT64_MAX - dig) / 10)
        return fail(d, "value out of range for %s", type_name(t));
      mag = mag * 10 + dig;
    }
    if (i == n) {
      out->neg = neg;
      out->mag = mag;
      return 0;
    }
  }
  json_t *num = digits_only ? NULL : number_from_text(s, n);
  if (!num)
    return fail(d, "expected %s, got \"%.64s\"", type_name(t), s);
  int rc = get_bigint(d, num, t, true, out);
  json_decref(num);
  return rc;
}

/* Stores an integer of field type t into slot after an exact range check. */
static int get_int(dec_t *d, const json_t *v, ProtobufCType t, bool digits_only, void *slot) {
  bigint_t b;
  if (get_bigint(d, v, t, digits_only, &b) != 0)
    return -1;
  switch (t) {
  case PROTOBUF_C_TYPE_INT32:
  case PROTOBUF_C_TYPE_SINT32:
  case PROTOBUF_C_TYPE_SFIXED32:
  case PROTOBUF_C_TYPE_ENUM:
    if (b.mag > (b.neg ? (uint64_t)INT32_MAX + 1 : (uint64_t)INT32_MAX))
      break;
    *(int32_t *)slot = b.neg ? (int32_t)(-(int64_t)b.mag) : (int32_t)b.mag;
    return 0;
  case PROTOBUF_C_TYPE_UINT32:
  case PROTOBUF_C_TYPE_FIXED32:
    if ((b.neg && b.mag != 0) || b.mag > UINT32_MAX)
      break;
    *(uint32_t *)slot = (uint32_t)b.mag;
    return 0;
  case PROTOBUF_C_TYPE_INT64:
  case PROTOBUF_C_TYPE_SINT64:
  case PROTOBUF_C_TYPE_SFIXED64:
    if (b.mag > (b.neg ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX))
      break;
    if (b.neg)
      *(int64_t *)slot = b.mag == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)b.mag;
    else
      *(int64_t *)slot = (int64_t)b.mag;
    return 0;
  case PROTOBUF_C_TYPE_UINT64:
  case PROTOBUF_C_TYPE_FIXED64:
    if (b.neg && b.mag != 0)
      break;
    *(uint64_t *)slot = b.mag;
    return 0;
  default:
    break;
  }
  return fail(d, "value out of range for %s", type_name(t));
}

static int get_double(dec_t *d, const json_t *v, ProtobufCType t, double *out) {
  if (json_is_number(v)) {
    *out = json_number_value(v);
  } else if (json_is_string(v)) {
    const char *s = json_string_value(v);
    if (strcmp(s, "NaN") == 0) {
      *out = NAN;
      return 0;
    }
    if (strcmp(s, "Infinity") == 0 || strcmp(s, "-Infinity") == 0) {
      *out = s[0] == '-' ? -INFINITY : INFINITY;
      return 0;
    }
    json_t *num = number_from_text(s, json_string_length(v));
    if (!num)
      return fail(d, "expected %s, got \"%.64s\"", type_name(t), s);
    *out = json_number_value(num);
    json_decref(num);
  } else {
    return fail(d, "expected %s", type_name(t));
  }
  if (t == PROTOBUF_C_TYPE_FLOAT && (*out > FLT_MAX || *out < -FLT_MAX))
    return fail(d, "value out of range for float");
  return 0;
}

/* Decodes base64 or base64url, padded or not. mbedTLS takes only the padded
 * standard alphabet, so the text is rewritten into that form first. */
static int get_bytes(dec_t *d, const json_t *v, ProtobufCBinaryData *out) {
  if (!json_is_string(v))
    return fail(d, "expected base64 string");
  const char *s = json_string_value(v);
  size_t n = json_string_length(v), pad = 0;
  while (n > 0 && s[n - 1] == '=' && pad < 2) {
    n--;
    pad++;
  }
  if (n % 4 == 1 || (pad > 0 && (n + pad) % 4 != 0))
    return fail(d, "invalid base64");
  out->data = NULL;
  out->len = 0;
  if (n == 0)
    return 0;
  size_t full = (n + 3) / 4 * 4;
  char stack[512], *norm = full <= sizeof stack ? stack : malloc(full);
  unsigned char *data = malloc(full / 4 * 3);
  size_t olen = 0;
  if (!norm || !data)
    goto nomem;
  for (size_t i = 0; i < n; i++) {
    char c = s[i];
    if (c == '-')
      c = '+';
    else if (c == '_')
      c = '/';
    else if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
               c == '+' || c == '/'))
      goto bad;
    norm[i] = c;
  }
  memset(norm + n, '=', full - n);
  if (mbedtls_base64_decode(data, full / 4 * 3, &olen, (const unsigned char *)norm, full) != 0)
    goto bad;
  if (norm != stack)
    free(norm);
  out->data = data;
  out->len = olen;
  return 0;
bad:
  if (norm != stack)
    free(norm);
  free(data);
  return fail(d, "invalid base64");
nomem:
  if (norm != stack)
    free(norm);
  free(data);
  return fail(d, "out of memory");
}

static int get_enum(dec_t *d, const json_t *v, const ProtobufCFieldDescriptor *f, void *slot) {
  const ProtobufCEnumDescriptor *ed = f->descriptor;
  if (json_is_string(v)) {
    const ProtobufCEnumValue *ev = protobuf_c_enum_descriptor_get_value_by_name(ed, json_string_value(v));
    if (!ev)
      return fail(d, "unknown value \"%.64s\" for enum %s", json_string_value(v), ed->name);
    *(int32_t *)slot = ev->value;
    return 0;
  }
  if (json_is_number(v))
    return get_int(d, v, PROTOBUF_C_TYPE_ENUM, true, slot);
  return fail(d, "expected enum %s", ed->name);
}

/* Decodes one value of field f's type into slot (a member, array element or
 * map entry member). Allocated results are attached to slot before anything
 * can fail below them, so freeing the root message releases them. */
static int decode_value(dec_t *d, const json_t *v, const ProtobufCFieldDescriptor *f, void *slot) {
  switch (f->type) {
  case PROTOBUF_C_TYPE_INT32:
  case PROTOBUF_C_TYPE_SINT32:
  case PROTOBUF_C_TYPE_SFIXED32:
  case PROTOBUF_C_TYPE_UINT32:
  case PROTOBUF_C_TYPE_FIXED32:
  case PROTOBUF_C_TYPE_INT64:
  case PROTOBUF_C_TYPE_SINT64:
  case PROTOBUF_C_TYPE_SFIXED64:
  case PROTOBUF_C_TYPE_UINT64:
  case PROTOBUF_C_TYPE_FIXED64:
    return get_int(d, v, f->type, false, slot);
  case PROTOBUF_C_TYPE_FLOAT: {
    double x;
    if (get_double(d, v, f->type, &x) != 0)
      return -1;
    *(float *)slot = (float)x;
    return 0;
  }
  case PROTOBUF_C_TYPE_DOUBLE:
    return get_double(d, v, f->type, slot);
  case PROTOBUF_C_TYPE_BOOL:
    if (!json_is_boolean(v))
      return fail(d, "expected boolean");
    *(protobuf_c_boolean *)slot = json_is_true(v);
    return 0;
  case PROTOBUF_C_TYPE_ENUM:
    return get_enum(d, v, f, slot);
  case PROTOBUF_C_TYPE_STRING: {
    if (!json_is_string(v))
      return fail(d, "expected string");
    size_t n = json_string_length(v);
    /* protobuf-c strings are C strings: a NUL would silently cut the value
     * (two idempotency keys differing after it would collide). */
    if (memchr(json_string_value(v), '\0', n) != NULL)
      return fail(d, "string contains a NUL character");
    char *s = malloc(n + 1);
    if (!s)
      return fail(d, "out of memory");
    memcpy(s, json_string_value(v), n + 1);
    *(char **)slot = s;
    return 0;
  }
  case PROTOBUF_C_TYPE_BYTES:
    return get_bytes(d, v, slot);
  case PROTOBUF_C_TYPE_MESSAGE: {
    const ProtobufCMessageDescriptor *md = f->descriptor;
    if (!json_is_object(v))
      return fail(d, "expected object");
    ProtobufCMessage *sub = malloc(md->sizeof_message);
    if (!sub)
      return fail(d, "out of memory");
    protobuf_c_message_init(md, sub);
    *(ProtobufCMessage **)slot = sub;
    return decode_message(d, v, sub);
  }
  }
  return fail(d, "unsupported field type");
}

/* Sets the has_ flag of a proto2-style optional scalar or bytes field; strings
 * and messages carry presence in their pointer. */
static void mark_present(ProtobufCMessage *m, const ProtobufCFieldDescriptor *f) {
  if (f->label == PROTOBUF_C_LABEL_OPTIONAL && !(f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) &&
      f->type != PROTOBUF_C_TYPE_MESSAGE && f->type != PROTOBUF_C_TYPE_STRING)
    *(protobuf_c_boolean *)MEMBER(m, f->quantifier_offset) = 1;
}

static int decode_map(dec_t *d, const json_t *v, const ProtobufCMessageDescriptor *e,
                      ProtobufCMessage *m, const ProtobufCFieldDescriptor *f) {
  if (!json_is_object(v))
    return fail(d, "expected object");
  size_t n = json_object_size(v);
  if (n == 0)
    return 0;
  ProtobufCMessage **arr = calloc(n, sizeof *arr);
  if (!arr)
    return fail(d, "out of memory");
  *(ProtobufCMessage ***)MEMBER(m, f->offset) = arr;
  *(size_t *)MEMBER(m, f->quantifier_offset) = n;
  const ProtobufCFieldDescriptor *kf = &e->fields[0], *vf = &e->fields[1];
  seg_t seg = {d->top, SEG_KEY, NULL, 0, 0};
  d->top = &seg;
  size_t i = 0;
  int rc = 0;
  for (void *it = json_object_iter((json_t *)v); it && rc == 0;
       it = json_object_iter_next((json_t *)v, it), i++) {
    const char *key = json_object_iter_key(it);
    const json_t *val = json_object_iter_value(it);
    seg.s = key;
    seg.n = json_object_iter_key_len(it);
    ProtobufCMessage *ent = malloc(e->sizeof_message);
    if (!ent) {
      rc = fail(d, "out of memory");
      break;
    }
    protobuf_c_message_init(e, ent);
    arr[i] = ent;
    void *kp = MEMBER(ent, kf->offset);
    if (kf->type == PROTOBUF_C_TYPE_STRING) {
      json_t *ks = json_stringn_nocheck(key, seg.n);
      rc = ks ? decode_value(d, ks, kf, kp) : fail(d, "out of memory");
      json_decref(ks);
    } else if (kf->type == PROTOBUF_C_TYPE_BOOL) {
      if (strcmp(key, "true") == 0 || strcmp(key, "false") == 0)
        *(protobuf_c_boolean *)kp = key[0] == 't';
      else
        rc = fail(d, "expected map key true or false");
    } else {
      json_t *ks = json_stringn_nocheck(key, seg.n);
      rc = ks ? get_int(d, ks, kf->type, true, kp) : fail(d, "out of memory");
      json_decref(ks);
    }
    if (rc == 0)
      mark_present(ent, kf);
    if (rc == 0 && json_is_null(val))
      rc = fail(d, "null is not a valid map value");
    if (rc == 0)
      rc = decode_value(d, val, vf, MEMBER(ent, vf->offset));
    if (rc == 0)
      mark_present(ent, vf);
  }
  d->top = seg.up;
  return rc;
}

static int decode_repeated(dec_t *d, const json_t *v, ProtobufCMessage *m,
                           const ProtobufCFieldDescriptor *f) {
  const ProtobufCMessageDescriptor *e = map_entry(m->descriptor, f);
  if (e)
    return decode_map(d, v, e, m, f);
  if (!json_is_array(v))
    return fail(d, "expected array");
  size_t n = json_array_size(v);
  if (n == 0)
    return 0;
  size_t sz = elt_size(f->type);
  char *arr = calloc(n, sz);
  if (!arr)
    return fail(d, "out of memory");
  *(char **)MEMBER(m, f->offset) = arr;
  *(size_t *)MEMBER(m, f->quantifier_offset) = n;
  seg_t seg = {d->top, SEG_INDEX, NULL, 0, 0};
  d->top = &seg;
  int rc = 0;
  for (size_t i = 0; i < n && rc == 0; i++) {
    const json_t *el = json_array_get(v, i);
    seg.index = i;
    rc = json_is_null(el) ? fail(d, "null is not a valid array element")
                          : decode_value(d, el, f, arr + i * sz);
  }
  d->top = seg.up;
  return rc;
}

static int decode_field(dec_t *d, const json_t *v, ProtobufCMessage *m,
                        const ProtobufCFieldDescriptor *f) {
  if (f->label == PROTOBUF_C_LABEL_REPEATED)
    return decode_repeated(d, v, m, f);
  if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) {
    uint32_t *which = (uint32_t *)MEMBER(m, f->quantifier_offset);
    if (*which != 0) {
      const ProtobufCFieldDescriptor *other =
          protobuf_c_message_descriptor_get_field(m->descriptor, *which);
      return fail(d, "only one of \"%s\" and \"%s\" may be set (oneof)",
                  other ? other->name : "?", f->name);
    }
    /* The case is set first so that free_unpacked sees whatever lands in the
     * union, even if decoding fails halfway. */
    *which = f->id;
    return decode_value(d, v, f, MEMBER(m, f->offset));
  }
  if (decode_value(d, v, f, MEMBER(m, f->offset)) != 0)
    return -1;
  mark_present(m, f);
  return 0;
}

static const ProtobufCFieldDescriptor *find_field(const ProtobufCMessageDescriptor *md,
                                                  const char *key, size_t klen) {
  const ProtobufCFieldDescriptor *f = protobuf_c_message_descriptor_get_field_by_name(md, key);
  if (f)
    return f;
  for (unsigned i = 0; i < md->n_fields; i++)
    if (camel_eq(md->fields[i].name, key, klen))
      return &md->fields[i];
  return NULL;
}

static int decode_message(dec_t *d, const json_t *obj, ProtobufCMessage *m) {
  const ProtobufCMessageDescriptor *md = m->descriptor;
  if (d->depth >= TG_PBJSON_MAX_DEPTH)
    return fail(d, "messages nested deeper than %d", TG_PBJSON_MAX_DEPTH);
  d->depth++;
  uint64_t seen_stack[SEEN_WORDS] = {0}, *seen = seen_stack;
  size_t words = (md->n_fields + 63) / 64;
  if (words > SEEN_WORDS && !(seen = calloc(words, sizeof *seen))) {
    d->depth--;
    return fail(d, "out of memory");
  }
  seg_t seg = {d->top, SEG_FIELD, NULL, 0, 0};
  int rc = 0;
  for (void *it = json_object_iter((json_t *)obj); it && rc == 0;
       it = json_object_iter_next((json_t *)obj, it)) {
    const char *key = json_object_iter_key(it);
    size_t klen = json_object_iter_key_len(it);
    const ProtobufCFieldDescriptor *f = find_field(md, key, klen);
    if (!f) {
      if (d->ignore_unknown)
        continue;
      rc = fail(d, "unknown field \"%.100s\" in %s", key, md->name);
      break;
    }
    size_t idx = (size_t)(f - md->fields);
    if (seen[idx / 64] & ((uint64_t)1 << (idx % 64))) {
      rc = fail(d, "field \"%s\" set twice", f->name);
      break;
    }
    seen[idx / 64] |= (uint64_t)1 << (idx % 64);
    const json_t *v = json_object_iter_value(it);
    if (json_is_null(v))
      continue;
    seg.s = key;
    seg.n = klen;
    d->top = &seg;
    rc = decode_field(d, v, m, f);
    d->top = seg.up;
  }
  if (seen != seen_stack)
    free(seen);
  d->depth--;
  return rc;
}

ProtobufCMessage *tg_pbjson_decode(const ProtobufCMessageDescriptor *desc, const char *text,
                                   size_t len, char *err, size_t errlen) {
  return tg_pbjson_decode_ex(desc, text, len, 0, err, errlen);
}

ProtobufCMessage *tg_pbjson_decode_ex(const ProtobufCMessageDescriptor *desc, const char *text,
                                      size_t len, unsigned flags, char *err, size_t errlen) {
  dec_t d = {err, errlen, 0, 0, (flags & TG_PBJSON_IGNORE_UNKNOWN) != 0, NULL};
  if (err && errlen > 0)
    err[0] = '\0';
  json_error_t jerr;
  json_t *root = json_loadb(text ? text : "", text ? len : 0, JSON_REJECT_DUPLICATES, &jerr);
  if (!root) {
    fail(&d, "invalid JSON: %s (line %d, column %d)", jerr.text, jerr.line, jerr.column);
    return NULL;
  }
  ProtobufCMessage *m = NULL;
  if (!json_is_object(root)) {
    fail(&d, "expected a JSON object for %s", desc->name);
    goto fail;
  }
  m = malloc(desc->sizeof_message);
  if (!m) {
    fail(&d, "out of memory");
    goto fail;
  }
  protobuf_c_message_init(desc, m);
  if (decode_message(&d, root, m) != 0)
    goto fail;
  json_decref(root);
  return m;
fail:
  protobuf_c_message_free_unpacked(m, NULL);
  json_decref(root);
  return NULL;
}
