#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "comp/v1/ai_system.pb-c.h"
#include "rpc/pbjson.h"
#include "ramp/v1/exchange.pb-c.h"
#include "test.h"

/* Our protos have no bytes, float, 32-bit integer, oneof, map or optional
 * fields yet, so a message type covering them is described by hand here, the
 * way protoc-c would generate it:
 *
 *   message Kitchen {
 *     int32 i32 = 1; uint32 u32 = 2; uint64 u64 = 3; sint64 s64 = 4;
 *     fixed32 f32 = 5; sfixed64 sf64 = 6; float fl = 7; double db = 8;
 *     bool flag = 9; bytes payload = 10; repeated int32 nums = 11;
 *     repeated double ds = 12; repeated bytes blobs = 13;
 *     oneof choice { string name = 14; int64 code = 15; Kitchen child = 16; }
 *     Kitchen next = 17; map<string, int64> counts = 18;
 *     map<int32, string> tags = 19; optional int32 opt = 20 (proto2 style);
 *     optional string opt_str = 21; optional bytes opt_bytes = 22;
 *     repeated string words = 23; ramp.v1.PaymentModel color = 24;
 *     fixed64 f64 = 25; string label = 26;
 *   } */

typedef struct Kitchen Kitchen;

typedef struct {
  ProtobufCMessage base;
  char *key;
  int64_t value;
} CountsEntry;

typedef struct {
  ProtobufCMessage base;
  int32_t key;
  char *value;
} TagsEntry;

struct Kitchen {
  ProtobufCMessage base;
  int32_t i32;
  uint32_t u32;
  uint64_t u64;
  int64_t s64;
  uint32_t f32;
  int64_t sf64;
  float fl;
  double db;
  protobuf_c_boolean flag;
  ProtobufCBinaryData payload;
  size_t n_nums;
  int32_t *nums;
  size_t n_ds;
  double *ds;
  size_t n_blobs;
  ProtobufCBinaryData *blobs;
  Kitchen *next;
  size_t n_counts;
  CountsEntry **counts;
  size_t n_tags;
  TagsEntry **tags;
  protobuf_c_boolean has_opt;
  int32_t opt;
  char *opt_str;
  protobuf_c_boolean has_opt_bytes;
  ProtobufCBinaryData opt_bytes;
  size_t n_words;
  char **words;
  int color;
  uint64_t f64;
  char *label;
  uint32_t choice_case;
  union {
    char *name;
    int64_t code;
    Kitchen *child;
  };
};

extern const ProtobufCMessageDescriptor kitchen_desc, counts_entry_desc, tags_entry_desc;

static void kitchen_init(ProtobufCMessage *m) {
  memset(m, 0, sizeof(Kitchen));
  m->descriptor = &kitchen_desc;
  ((Kitchen *)m)->label = (char *)protobuf_c_empty_string;
}

static void counts_entry_init(ProtobufCMessage *m) {
  memset(m, 0, sizeof(CountsEntry));
  m->descriptor = &counts_entry_desc;
  ((CountsEntry *)m)->key = (char *)protobuf_c_empty_string;
}

static void tags_entry_init(ProtobufCMessage *m) {
  memset(m, 0, sizeof(TagsEntry));
  m->descriptor = &tags_entry_desc;
  ((TagsEntry *)m)->value = (char *)protobuf_c_empty_string;
}

#define FIELD(nm, id, label, type, q, off, desc, def, flags)                                     \
  { nm, id, PROTOBUF_C_LABEL_##label, PROTOBUF_C_TYPE_##type, q, off, desc, def, flags, 0, NULL, NULL }
#define KOFF(m) offsetof(Kitchen, m)

static const ProtobufCFieldDescriptor counts_entry_fields[] = {
    FIELD("key", 1, NONE, STRING, 0, offsetof(CountsEntry, key), NULL, &protobuf_c_empty_string, 0),
    FIELD("value", 2, NONE, INT64, 0, offsetof(CountsEntry, value), NULL, NULL, 0),
};
static const ProtobufCFieldDescriptor tags_entry_fields[] = {
    FIELD("key", 1, NONE, INT32, 0, offsetof(TagsEntry, key), NULL, NULL, 0),
    FIELD("value", 2, NONE, STRING, 0, offsetof(TagsEntry, value), NULL, &protobuf_c_empty_string, 0),
};
static const unsigned entry_by_name[] = {0, 1};
static const ProtobufCIntRange entry_ranges[] = {{1, 0}, {0, 2}};

const ProtobufCMessageDescriptor counts_entry_desc = {
    PROTOBUF_C__MESSAGE_DESCRIPTOR_MAGIC, "test.Kitchen.CountsEntry", "CountsEntry",
    "Test__Kitchen__CountsEntry", "test", sizeof(CountsEntry), 2, counts_entry_fields,
    entry_by_name, 1, entry_ranges, counts_entry_init, NULL, NULL, NULL};
const ProtobufCMessageDescriptor tags_entry_desc = {
    PROTOBUF_C__MESSAGE_DESCRIPTOR_MAGIC, "test.Kitchen.TagsEntry", "TagsEntry",
    "Test__Kitchen__TagsEntry", "test", sizeof(TagsEntry), 2, tags_entry_fields,
    entry_by_name, 1, entry_ranges, tags_entry_init, NULL, NULL, NULL};

static const ProtobufCFieldDescriptor kitchen_fields[] = {
    FIELD("i32", 1, NONE, INT32, 0, KOFF(i32), NULL, NULL, 0),
    FIELD("u32", 2, NONE, UINT32, 0, KOFF(u32), NULL, NULL, 0),
    FIELD("u64", 3, NONE, UINT64, 0, KOFF(u64), NULL, NULL, 0),
    FIELD("s64", 4, NONE, SINT64, 0, KOFF(s64), NULL, NULL, 0),
    FIELD("f32", 5, NONE, FIXED32, 0, KOFF(f32), NULL, NULL, 0),
    FIELD("sf64", 6, NONE, SFIXED64, 0, KOFF(sf64), NULL, NULL, 0),
    FIELD("fl", 7, NONE, FLOAT, 0, KOFF(fl), NULL, NULL, 0),
    FIELD("db", 8, NONE, DOUBLE, 0, KOFF(db), NULL, NULL, 0),
    FIELD("flag", 9, NONE, BOOL, 0, KOFF(flag), NULL, NULL, 0),
    FIELD("payload", 10, NONE, BYTES, 0, KOFF(payload), NULL, NULL, 0),
    FIELD("nums", 11, REPEATED, INT32, KOFF(n_nums), KOFF(nums), NULL, NULL,
          PROTOBUF_C_FIELD_FLAG_PACKED),
    FIELD("ds", 12, REPEATED, DOUBLE, KOFF(n_ds), KOFF(ds), NULL, NULL,
          PROTOBUF_C_FIELD_FLAG_PACKED),
    FIELD("blobs", 13, REPEATED, BYTES, KOFF(n_blobs), KOFF(blobs), NULL, NULL, 0),
    FIELD("name", 14, NONE, STRING, KOFF(choice_case), KOFF(name), NULL, &protobuf_c_empty_string,
          PROTOBUF_C_FIELD_FLAG_ONEOF),
    FIELD("code", 15, NONE, INT64, KOFF(choice_case), KOFF(code), NULL, NULL,
          PROTOBUF_C_FIELD_FLAG_ONEOF),
    FIELD("child", 16, NONE, MESSAGE, KOFF(choice_case), KOFF(child), &kitchen_desc, NULL,
          PROTOBUF_C_FIELD_FLAG_ONEOF),
    FIELD("next", 17, NONE, MESSAGE, 0, KOFF(next), &kitchen_desc, NULL, 0),
    FIELD("counts", 18, REPEATED, MESSAGE, KOFF(n_counts), KOFF(counts), &counts_entry_desc, NULL,
          0),
    FIELD("tags", 19, REPEATED, MESSAGE, KOFF(n_tags), KOFF(tags), &tags_entry_desc, NULL, 0),
    FIELD("opt", 20, OPTIONAL, INT32, KOFF(has_opt), KOFF(opt), NULL, NULL, 0),
    FIELD("opt_str", 21, OPTIONAL, STRING, 0, KOFF(opt_str), NULL, NULL, 0),
    FIELD("opt_bytes", 22, OPTIONAL, BYTES, KOFF(has_opt_bytes), KOFF(opt_bytes), NULL, NULL, 0),
    FIELD("words", 23, REPEATED, STRING, KOFF(n_words), KOFF(words), NULL, NULL, 0),
    FIELD("color", 24, NONE, ENUM, 0, KOFF(color), &ramp__v1__payment_model__descriptor, NULL, 0),
    FIELD("f64", 25, NONE, FIXED64, 0, KOFF(f64), NULL, NULL, 0),
    FIELD("label", 26, NONE, STRING, 0, KOFF(label), NULL, &protobuf_c_empty_string, 0),
};
static const unsigned kitchen_by_name[] = {
    12 /* blobs */, 15 /* child */, 14 /* code */, 23 /* color */, 17 /* counts */,
    7 /* db */,     11 /* ds */,    4 /* f32 */,   24 /* f64 */,   6 /* fl */,
    8 /* flag */,   0 /* i32 */,    25 /* label */, 13 /* name */, 16 /* next */,
    10 /* nums */,  19 /* opt */,   21 /* opt_bytes */, 20 /* opt_str */, 9 /* payload */,
    3 /* s64 */,    5 /* sf64 */,   18 /* tags */, 1 /* u32 */,    2 /* u64 */,
    22 /* words */};
static const ProtobufCIntRange kitchen_ranges[] = {{1, 0}, {0, 26}};

const ProtobufCMessageDescriptor kitchen_desc = {
    PROTOBUF_C__MESSAGE_DESCRIPTOR_MAGIC, "test.Kitchen", "Kitchen", "Test__Kitchen", "test",
    sizeof(Kitchen), 26, kitchen_fields, kitchen_by_name, 1, kitchen_ranges, kitchen_init, NULL,
    NULL, NULL};

static Kitchen *kitchen_new(void) {
  Kitchen *k = malloc(sizeof *k);
  if (k)
    kitchen_init(&k->base);
  return k;
}

static char err[256];

static ProtobufCMessage *decode(const ProtobufCMessageDescriptor *d, const char *json) {
  err[0] = '\0';
  return tg_pbjson_decode(d, json, strlen(json), err, sizeof err);
}

/* Decodes json expecting failure; returns the reason (empty if it succeeded). */
static const char *decode_err(const ProtobufCMessageDescriptor *d, const char *json) {
  ProtobufCMessage *m = decode(d, json);
  if (m) {
    protobuf_c_message_free_unpacked(m, NULL);
    return "(decoded)";
  }
  return err;
}

static uint8_t *pack(const ProtobufCMessage *m, size_t *n) {
  *n = protobuf_c_message_get_packed_size(m);
  uint8_t *b = malloc(*n + 1);
  protobuf_c_message_pack(m, b);
  return b;
}

/* encode -> decode -> pack must give exactly the bytes of the original. */
static int round_trips(const ProtobufCMessage *m) {
  size_t len = 0, na, nb;
  char *text = tg_pbjson_encode_text(m, &len);
  if (!text)
    return 0;
  ProtobufCMessage *back = tg_pbjson_decode(m->descriptor, text, len, err, sizeof err);
  if (!back) {
    fprintf(stderr, "  decode of %s failed: %s\n", text, err);
    free(text);
    return 0;
  }
  uint8_t *a = pack(m, &na), *b = pack(back, &nb);
  int same = na == nb && memcmp(a, b, na) == 0;
  if (!same)
    fprintf(stderr, "  round trip differs for %s\n", text);
  free(a);
  free(b);
  free(text);
  protobuf_c_message_free_unpacked(back, NULL);
  return same;
}

static char *encode(const ProtobufCMessage *m) {
  size_t len = 0;
  char *t = tg_pbjson_encode_text(m, &len);
  if (t && strlen(t) != len) {
    free(t);
    return NULL;
  }
  return t;
}

#define CHECK_JSON(msg, expected)                                                              \
  do {                                                                                         \
    char *t_ = encode((const ProtobufCMessage *)(msg));                                        \
    int ok_ = t_ && strcmp(t_, expected) == 0;                                                 \
    if (!ok_)                                                                                  \
      fprintf(stderr, "  got      %s\n  expected %s\n", t_ ? t_ : "(null)", expected);         \
    free(t_);                                                                                  \
    CHECK(ok_);                                                                                \
  } while (0)

TEST(camel_case_names) {
  char b[64];
  tg_pbjson_camel("usage_purposes", b, sizeof b);
  CHECK_STR(b, "usagePurposes");
  tg_pbjson_camel("ai_system", b, sizeof b);
  CHECK_STR(b, "aiSystem");
  tg_pbjson_camel("uri", b, sizeof b);
  CHECK_STR(b, "uri");
  tg_pbjson_camel("a_b_c", b, sizeof b);
  CHECK_STR(b, "aBC");
  tg_pbjson_camel("foo__bar_1x", b, sizeof b);
  CHECK_STR(b, "fooBar1x");
  tg_pbjson_camel("catalog_built_at_unix", b, 8);
  CHECK_STR(b, "catalog");
  tg_pbjson_camel("x", b, 1);
  CHECK_STR(b, "");
}

TEST(hand_descriptor_is_sound) {
  for (unsigned i = 1; i < kitchen_desc.n_fields; i++)
    CHECK(strcmp(kitchen_fields[kitchen_by_name[i - 1]].name,
                 kitchen_fields[kitchen_by_name[i]].name) < 0);
  CHECK(protobuf_c_message_descriptor_get_field_by_name(&kitchen_desc, "opt_bytes") ==
        &kitchen_fields[21]);
  CHECK(protobuf_c_message_descriptor_get_field(&kitchen_desc, 26) == &kitchen_fields[25]);
}

TEST(encode_discover_request_exact) {
  Comp__V1__UsagePurpose purposes[] = {COMP__V1__USAGE_PURPOSE__USAGE_PURPOSE_AI_TRAIN,
                                       COMP__V1__USAGE_PURPOSE__USAGE_PURPOSE_AI_INPUT};
  Comp__V1__AISystem ai = COMP__V1__AISYSTEM__INIT;
  ai.name = "Acme";
  ai.user_agent = "bot/1";
  ai.n_usage_purposes = 2;
  ai.usage_purposes = purposes;
  ai.user_type = COMP__V1__USER_TYPE__USER_TYPE_COMMERCIAL;
  Ramp__V1__ResourceQuery q1 = RAMP__V1__RESOURCE_QUERY__INIT, q2 = RAMP__V1__RESOURCE_QUERY__INIT;
  q1.uri = "https://pub.example/a";
  Ramp__V1__ResourceQuery *qs[] = {&q1, &q2};
  Ramp__V1__DiscoverResourcesRequest req = RAMP__V1__DISCOVER_RESOURCES_REQUEST__INIT;
  req.ai_system = &ai;
  req.n_resources = 2;
  req.resources = qs;
  CHECK_JSON(&req, "{\"aiSystem\":{\"name\":\"Acme\",\"userAgent\":\"bot/1\",\"usagePurposes\":"
                   "[\"USAGE_PURPOSE_AI_TRAIN\",\"USAGE_PURPOSE_AI_INPUT\"],\"userType\":"
                   "\"USER_TYPE_COMMERCIAL\"},\"resources\":[{\"uri\":\"https://pub.example/a\"},{}]}");
  CHECK(round_trips(&req.base));

  json_t *j = tg_pbjson_encode(&req.base);
  CHECK(j != NULL);
  CHECK_STR(json_string_value(json_object_get(json_object_get(j, "aiSystem"), "userAgent")),
            "bot/1");
  json_decref(j);
}

TEST(encode_defaults_omitted_and_int64_as_string) {
  Ramp__V1__DiscoverResourcesRequest empty = RAMP__V1__DISCOVER_RESOURCES_REQUEST__INIT;
  CHECK_JSON(&empty, "{}");

  Ramp__V1__Money price = RAMP__V1__MONEY__INIT;
  price.currency = "USD";
  price.amount = -1500000;
  Ramp__V1__Pricing pricing = RAMP__V1__PRICING__INIT;
  pricing.model = RAMP__V1__PAYMENT_MODEL__PAYMENT_MODEL_USE;
  pricing.price = &price;
  pricing.included_tokens = 9007199254740993LL; /* not representable as a double */
  Ramp__V1__Terms terms = RAMP__V1__TERMS__INIT; /* all defaults: still emitted as {} */
  Ramp__V1__Offer offer = RAMP__V1__OFFER__INIT;
  offer.id = "o1";
  offer.pricing = &pricing;
  offer.terms = &terms;
  offer.expires_at_unix = INT64_MIN;
  Ramp__V1__Offer *offers[] = {&offer};
  Ramp__V1__ResourceResult r1 = RAMP__V1__RESOURCE_RESULT__INIT,
                           r2 = RAMP__V1__RESOURCE_RESULT__INIT;
  r1.uri = "u1";
  r1.n_offers = 1;
  r1.offers = offers;
  r2.uri = "u2";
  r2.absence_reason = RAMP__V1__ABSENCE_REASON__ABSENCE_REASON_NOT_FOR_SALE;
  r2.absence_detail = "";
  Ramp__V1__ResourceResult *results[] = {&r1, &r2};
  Ramp__V1__DiscoverResourcesResponse resp = RAMP__V1__DISCOVER_RESOURCES_RESPONSE__INIT;
  resp.n_results = 2;
  resp.results = results;
  resp.catalog_built_at_unix = 1700000000;
  CHECK_JSON(&resp,
             "{\"results\":[{\"uri\":\"u1\",\"offers\":[{\"id\":\"o1\",\"pricing\":{\"model\":"
             "\"PAYMENT_MODEL_USE\",\"price\":{\"currency\":\"USD\",\"amount\":\"-1500000\"},"
             "\"includedTokens\":\"9007199254740993\"},\"terms\":{},\"expiresAtUnix\":"
             "\"-9223372036854775808\"}]},{\"uri\":\"u2\",\"absenceReason\":"
             "\"ABSENCE_REASON_NOT_FOR_SALE\"}],\"catalogBuiltAtUnix\":\"1700000000\"}");
  CHECK(round_trips(&resp.base));
}

TEST(encode_unknown_enum_number_and_ascii_escapes) {
  Comp__V1__UsagePurpose purposes[] = {(Comp__V1__UsagePurpose)77};
  Comp__V1__AISystem ai = COMP__V1__AISYSTEM__INIT;
  ai.name = "caf\xc3\xa9 \xf0\x9f\x98\x80 \"q\"\n";
  ai.user_type = (Comp__V1__UserType)-3;
  ai.n_usage_purposes = 1;
  ai.usage_purposes = purposes;
  CHECK_JSON(&ai, "{\"name\":\"caf\\u00E9 \\uD83D\\uDE00 \\\"q\\\"\\n\",\"usagePurposes\":[77],"
                  "\"userType\":-3}");
  CHECK(round_trips(&ai.base));

  /* protobuf-c does not check UTF-8 when unpacking; JSON cannot carry it. */
  ai.name = "bad \xff";
  CHECK(tg_pbjson_encode_text(&ai.base, NULL) == NULL);
  CHECK(tg_pbjson_encode(&ai.base) == NULL);
  CHECK(tg_pbjson_encode(NULL) == NULL);
}

TEST(round_trip_transaction_messages) {
  Comp__V1__AISystem ai = COMP__V1__AISYSTEM__INIT;
  ai.id = "sys-1";
  ai.billing_reference = "acct-9";
  ai.country = "DE";
  Ramp__V1__TransactionItem it1 = RAMP__V1__TRANSACTION_ITEM__INIT,
                            it2 = RAMP__V1__TRANSACTION_ITEM__INIT;
  it1.offer_id = "a";
  it1.estimated_tokens = INT64_MAX;
  it2.offer_id = "b";
  Ramp__V1__TransactionItem *items[] = {&it1, &it2};
  Ramp__V1__ExecuteTransactionRequest req = RAMP__V1__EXECUTE_TRANSACTION_REQUEST__INIT;
  req.ai_system = &ai;
  req.idempotency_key = "k-1";
  req.n_items = 2;
  req.items = items;
  CHECK(round_trips(&req.base));

  Ramp__V1__Money cost = RAMP__V1__MONEY__INIT;
  cost.currency = "USDC";
  cost.amount = 42;
  Ramp__V1__SignedItem si = RAMP__V1__SIGNED_ITEM__INIT;
  si.offer_id = "a";
  si.retrieval_url = "https://cdn.example/x?sig=abc&exp=1";
  si.expires_at_unix = 1;
  si.cost = &cost;
  Ramp__V1__SignedItem *sis[] = {&si};
  Ramp__V1__ReportingObligation rep = RAMP__V1__REPORTING_OBLIGATION__INIT;
  rep.required = 1;
  rep.due_at_unix = 2;
  Ramp__V1__ExecuteTransactionResponse resp = RAMP__V1__EXECUTE_TRANSACTION_RESPONSE__INIT;
  resp.transaction_id = "tx";
  resp.status = RAMP__V1__TRANSACTION_STATUS__TRANSACTION_STATUS_DENIED;
  resp.denial_reason = RAMP__V1__DENIAL_REASON__DENIAL_REASON_RATE_LIMITED;
  resp.total_cost = &cost;
  resp.n_items = 1;
  resp.items = sis;
  resp.reporting = &rep;
  CHECK_JSON(&resp, "{\"transactionId\":\"tx\",\"status\":\"TRANSACTION_STATUS_DENIED\","
                    "\"denialReason\":\"DENIAL_REASON_RATE_LIMITED\",\"totalCost\":{\"currency\":"
                    "\"USDC\",\"amount\":\"42\"},\"items\":[{\"offerId\":\"a\",\"retrievalUrl\":"
                    "\"https://cdn.example/x?sig=abc&exp=1\",\"expiresAtUnix\":\"1\",\"cost\":{"
                    "\"currency\":\"USDC\",\"amount\":\"42\"}}],\"reporting\":{\"required\":true,"
                    "\"dueAtUnix\":\"2\"}}");
  CHECK(round_trips(&resp.base));

  Ramp__V1__UsageRecord u = RAMP__V1__USAGE_RECORD__INIT;
  u.offer_id = "a";
  u.consumed_tokens = -7;
  Ramp__V1__UsageRecord *us[] = {&u, &u, &u};
  Ramp__V1__ReportUsageResponse rur = RAMP__V1__REPORT_USAGE_RESPONSE__INIT;
  rur.accepted = 1;
  rur.n_usage = 3;
  rur.usage = us;
  CHECK(round_trips(&rur.base));
}

TEST(decode_both_spellings) {
  const char *snake = "{\"ai_system\":{\"user_agent\":\"ua\",\"usage_purposes\":[\"USAGE_PURPOSE_"
                      "SEARCH\"],\"user_type\":\"USER_TYPE_EDUCATION\",\"billing_reference\":\"b\"},"
                      "\"resources\":[{\"uri\":\"x\"}]}";
  const char *camel = "{\"aiSystem\":{\"userAgent\":\"ua\",\"usagePurposes\":[\"USAGE_PURPOSE_"
                      "SEARCH\"],\"userType\":\"USER_TYPE_EDUCATION\",\"billingReference\":\"b\"},"
                      "\"resources\":[{\"uri\":\"x\"}]}";
  Ramp__V1__DiscoverResourcesRequest *a =
      (Ramp__V1__DiscoverResourcesRequest *)decode(&ramp__v1__discover_resources_request__descriptor,
                                                   snake);
  CHECK(a != NULL);
  Ramp__V1__DiscoverResourcesRequest *b =
      (Ramp__V1__DiscoverResourcesRequest *)decode(&ramp__v1__discover_resources_request__descriptor,
                                                   camel);
  CHECK(b != NULL);
  CHECK_STR(a->ai_system->user_agent, "ua");
  CHECK_STR(b->ai_system->billing_reference, "b");
  CHECK_INT(b->ai_system->user_type, COMP__V1__USER_TYPE__USER_TYPE_EDUCATION);
  CHECK_INT(b->ai_system->n_usage_purposes, 1);
  CHECK_INT(b->ai_system->usage_purposes[0], COMP__V1__USAGE_PURPOSE__USAGE_PURPOSE_SEARCH);
  CHECK_INT(b->n_resources, 1);
  CHECK_STR(b->resources[0]->uri, "x");
  CHECK_STR(b->ai_system->name, ""); /* untouched default */
  size_t na, nb;
  uint8_t *pa = pack(&a->base, &na), *pb = pack(&b->base, &nb);
  int same = na == nb && memcmp(pa, pb, na) == 0;
  free(pa);
  free(pb);
  protobuf_c_message_free_unpacked(&a->base, NULL);
  protobuf_c_message_free_unpacked(&b->base, NULL);
  CHECK(same);

  CHECK_STR(decode_err(&comp__v1__aisystem__descriptor, "{\"user_agent\":\"a\",\"userAgent\":\"b\"}"),
            "field \"user_agent\" set twice");
  CHECK_STR(decode_err(&comp__v1__aisystem__descriptor, "{\"name\":\"a\",\"name\":\"b\"}"),
            "invalid JSON: duplicate object key near '\"name\"' (line 1, column 18)");
}

TEST(decode_enums_by_number_and_null_defaults) {
  Comp__V1__AISystem *ai = (Comp__V1__AISystem *)decode(
      &comp__v1__aisystem__descriptor,
      "{\"usagePurposes\":[3,\"USAGE_PURPOSE_AI_INPUT\",99],\"userType\":2,\"name\":null,"
      "\"country\":\"\"}");
  CHECK(ai != NULL);
  CHECK_INT(ai->n_usage_purposes, 3);
  CHECK_INT(ai->usage_purposes[0], 3);
  CHECK_INT(ai->usage_purposes[1], 4);
  CHECK_INT(ai->usage_purposes[2], 99);
  CHECK_INT(ai->user_type, 2);
  CHECK_STR(ai->name, "");
  CHECK_STR(ai->country, "");
  protobuf_c_message_free_unpacked(&ai->base, NULL);

  Ramp__V1__DiscoverResourcesRequest *r = (Ramp__V1__DiscoverResourcesRequest *)decode(
      &ramp__v1__discover_resources_request__descriptor, "{\"aiSystem\":null,\"resources\":null}");
  CHECK(r != NULL);
  CHECK(r->ai_system == NULL);
  CHECK_INT(r->n_resources, 0);
  protobuf_c_message_free_unpacked(&r->base, NULL);

  r = (Ramp__V1__DiscoverResourcesRequest *)decode(
      &ramp__v1__discover_resources_request__descriptor, " { \"aiSystem\" : { } , \"resources\":[] } ");
  CHECK(r != NULL);
  CHECK(r->ai_system != NULL);
  CHECK_INT(r->n_resources, 0);
  CHECK(r->resources == NULL);
  protobuf_c_message_free_unpacked(&r->base, NULL);

  CHECK_STR(decode_err(&comp__v1__aisystem__descriptor, "{\"userType\":\"USER_TYPE_NOPE\"}"),
            "userType: unknown value \"USER_TYPE_NOPE\" for enum comp.v1.UserType");
  CHECK_STR(decode_err(&comp__v1__aisystem__descriptor, "{\"userType\":\"1\"}"),
            "userType: unknown value \"1\" for enum comp.v1.UserType");
  CHECK_STR(decode_err(&comp__v1__aisystem__descriptor, "{\"userType\":1.5}"),
            "userType: expected enum, got a fractional number");
  CHECK_STR(decode_err(&comp__v1__aisystem__descriptor, "{\"userType\":4294967296}"),
            "userType: value out of range for enum");
  CHECK_STR(decode_err(&comp__v1__aisystem__descriptor, "{\"userType\":true}"),
            "userType: expected enum comp.v1.UserType");
  CHECK_STR(decode_err(&comp__v1__aisystem__descriptor, "{\"usagePurposes\":[1,null]}"),
            "usagePurposes[1]: null is not a valid array element");
}

static int64_t decode_amount(const char *json, int *ok) {
  Ramp__V1__Money *m = (Ramp__V1__Money *)decode(&ramp__v1__money__descriptor, json);
  *ok = m != NULL;
  int64_t v = m ? m->amount : 0;
  if (m)
    protobuf_c_message_free_unpacked(&m->base, NULL);
  return v;
}

TEST(decode_int64_from_numbers_and_strings) {
  int ok;
  CHECK_INT(decode_amount("{\"amount\":123}", &ok), 123);
  CHECK(ok);
  CHECK_INT(decode_amount("{\"amount\":\"123\"}", &ok), 123);
  CHECK(ok);
  CHECK(decode_amount("{\"amount\":\"-9223372036854775808\"}", &ok) == INT64_MIN);
  CHECK(ok);
  CHECK(decode_amount("{\"amount\":-9223372036854775808}", &ok) == INT64_MIN);
  CHECK(ok);
  CHECK(decode_amount("{\"amount\":9223372036854775807}", &ok) == INT64_MAX);
  CHECK(ok);
  CHECK(decode_amount("{\"amount\":\"9007199254740993\"}", &ok) == 9007199254740993LL);
  CHECK(ok);
  CHECK_INT(decode_amount("{\"amount\":1e3}", &ok), 1000);
  CHECK(ok);
  CHECK_INT(decode_amount("{\"amount\":\"-2.5e1\"}", &ok), -25);
  CHECK(ok);
  CHECK_INT(decode_amount("{\"amount\":-0.0}", &ok), 0);
  CHECK(ok);
  CHECK_INT(decode_amount("{\"amount\":\"007\"}", &ok), 7);
  CHECK(ok);

  const ProtobufCMessageDescriptor *d = &ramp__v1__money__descriptor;
  CHECK_STR(decode_err(d, "{\"amount\":\"9223372036854775808\"}"),
            "amount: value out of range for int64");
  CHECK_STR(decode_err(d, "{\"amount\":\"-9223372036854775809\"}"),
            "amount: value out of range for int64");
  CHECK_STR(decode_err(d, "{\"amount\":\"99999999999999999999999\"}"),
            "amount: value out of range for int64");
  CHECK_STR(decode_err(d, "{\"amount\":1e19}"), "amount: value out of range for int64");
  CHECK_STR(decode_err(d, "{\"amount\":1e300}"), "amount: value out of range for int64");
  CHECK_STR(decode_err(d, "{\"amount\":1.5}"), "amount: expected int64, got a fractional number");
  CHECK_STR(decode_err(d, "{\"amount\":\"1.5\"}"),
            "amount: expected int64, got a fractional number");
  CHECK_STR(decode_err(d, "{\"amount\":\"12abc\"}"), "amount: expected int64, got \"12abc\"");
  CHECK_STR(decode_err(d, "{\"amount\":\" 12\"}"), "amount: expected int64, got \" 12\"");
  CHECK_STR(decode_err(d, "{\"amount\":\"12 \"}"), "amount: expected int64, got \"12 \"");
  CHECK_STR(decode_err(d, "{\"amount\":\"+12\"}"), "amount: expected int64, got \"+12\"");
  CHECK_STR(decode_err(d, "{\"amount\":\"\"}"), "amount: expected int64, got \"\"");
  CHECK_STR(decode_err(d, "{\"amount\":\"-\"}"), "amount: expected int64, got \"-\"");
  CHECK_STR(decode_err(d, "{\"amount\":\"0x10\"}"), "amount: expected int64, got \"0x10\"");
  CHECK_STR(decode_err(d, "{\"amount\":true}"), "amount: expected int64");
  CHECK_STR(decode_err(d, "{\"amount\":[1]}"), "amount: expected int64");
  CHECK_STR(decode_err(d, "{\"currency\":5}"), "currency: expected string");
}

TEST(decode_error_paths) {
  const ProtobufCMessageDescriptor *req = &ramp__v1__discover_resources_request__descriptor;
  CHECK_STR(decode_err(req, "{\"resources\":[{\"uri\":\"a\"},{\"uri\":\"b\"},{\"uri\":5}]}"),
            "resources[2].uri: expected string");
  CHECK_STR(decode_err(&ramp__v1__offer__descriptor, "{\"id\":\"o\",\"x\":1}"),
            "unknown field \"x\" in ramp.v1.Offer");
  CHECK_STR(decode_err(&ramp__v1__discover_resources_response__descriptor,
                       "{\"results\":[{\"offers\":[{\"pricing\":{\"price\":{\"amount\":\"1\","
                       "\"cents\":2}}}]}]}"),
            "results[0].offers[0].pricing.price: unknown field \"cents\" in ramp.v1.Money");
  CHECK_STR(decode_err(req, "{\"resources\":{}}"), "resources: expected array");
  CHECK_STR(decode_err(req, "{\"resources\":[\"x\"]}"), "resources[0]: expected object");
  CHECK_STR(decode_err(req, "{\"ai_system\":[]}"), "ai_system: expected object");
  CHECK_STR(decode_err(&ramp__v1__reporting_obligation__descriptor, "{\"required\":\"true\"}"),
            "required: expected boolean");
  CHECK_STR(decode_err(&ramp__v1__reporting_obligation__descriptor, "{\"required\":1}"),
            "required: expected boolean");
  CHECK_STR(decode_err(req, "{\"aiSystem\":{\"usagePurposes\":\"USAGE_PURPOSE_ALL\"}}"),
            "aiSystem.usagePurposes: expected array");

  /* Top level and syntax. */
  CHECK_STR(decode_err(req, "[]"), "expected a JSON object for ramp.v1.DiscoverResourcesRequest");
  CHECK_STR(decode_err(req, "1"), "invalid JSON: '[' or '{' expected near '1' (line 1, column 1)");
  CHECK_STR(decode_err(req, ""), "invalid JSON: '[' or '{' expected near end of file (line 1, "
                                 "column 0)");
  CHECK_STR(decode_err(req, "{"), "invalid JSON: string or '}' expected near end of file (line 1, "
                                  "column 1)");
  CHECK_STR(decode_err(req, "{} x"), "invalid JSON: end of file expected near 'x' (line 1, "
                                     "column 4)");
  CHECK(strncmp(decode_err(req, "{\"aiSystem\":{\"name\":\"\xff\"}}"), "invalid JSON: ", 14) ==
        0);
  CHECK(strncmp(decode_err(req, "{\"aiSystem\":{\"name\":\"a\\u0000b\"}}"), "invalid JSON: ",
                14) == 0);
  CHECK(tg_pbjson_decode(req, NULL, 0, err, sizeof err) == NULL);
  CHECK(strncmp(err, "invalid JSON: ", 14) == 0);

  /* Client text in the reason is reduced to printable ASCII. */
  CHECK_STR(decode_err(&ramp__v1__money__descriptor, "{\"m\xc3\xa9\\n\":1}"),
            "unknown field \"m???\" in ramp.v1.Money");

  /* The reason is cut to the buffer, and may be omitted. */
  char small[8];
  const char *bad = "{\"resources\":[{\"uri\":5}]}";
  CHECK(tg_pbjson_decode(req, bad, strlen(bad), small, sizeof small) == NULL);
  CHECK_STR(small, "resourc");
  CHECK(tg_pbjson_decode(req, bad, strlen(bad), NULL, 0) == NULL);

  /* len is honoured: the bytes after it are not read. */
  const char *padded = "{\"uri\":\"a\"}garbage";
  Ramp__V1__ResourceQuery *q = (Ramp__V1__ResourceQuery *)tg_pbjson_decode(
      &ramp__v1__resource_query__descriptor, padded, 11, err, sizeof err);
  CHECK(q != NULL);
  CHECK_STR(q->uri, "a");
  protobuf_c_message_free_unpacked(&q->base, NULL);

  /* A failure deep inside leaves nothing behind (checked by the sanitizer build). */
  CHECK_STR(decode_err(req, "{\"aiSystem\":{\"name\":\"n\",\"usagePurposes\":[1,2]},\"resources\":"
                            "[{\"uri\":\"a\"},{\"uri\":\"b\"},{\"uri\":\"c\",\"x\":0}]}"),
            "resources[2]: unknown field \"x\" in ramp.v1.ResourceQuery");
}

static int bytes_eq(const ProtobufCBinaryData *b, const char *data, size_t n) {
  return b->len == n && (n == 0 || memcmp(b->data, data, n) == 0);
}

TEST(kitchen_encode_exact) {
  Kitchen next = {0}, k = {0};
  kitchen_init(&next.base);
  kitchen_init(&k.base);
  next.i32 = 1;
  k.i32 = -5;
  k.u32 = 4000000000u;
  k.u64 = UINT64_MAX;
  k.s64 = -9;
  k.f32 = 7;
  k.sf64 = -1;
  k.fl = 1.5f;
  k.db = -INFINITY;
  k.flag = 1;
  uint8_t payload[] = {0x00, 0x01, 0xfe, 0xff};
  k.payload.data = payload;
  k.payload.len = sizeof payload;
  int32_t nums[] = {1, -2, 3};
  k.n_nums = 3;
  k.nums = nums;
  double ds[] = {NAN, 2.0, INFINITY, 0.25};
  k.n_ds = 4;
  k.ds = ds;
  ProtobufCBinaryData blobs[] = {{0, NULL}, {1, (uint8_t *)"a"}};
  k.n_blobs = 2;
  k.blobs = blobs;
  k.next = &next;
  CountsEntry c1, c2;
  counts_entry_init(&c1.base);
  counts_entry_init(&c2.base);
  c1.key = "a";
  c1.value = 1;
  c2.key = "b\xc3\xa9";
  c2.value = -2;
  CountsEntry *counts[] = {&c1, &c2};
  k.n_counts = 2;
  k.counts = counts;
  TagsEntry t1;
  tags_entry_init(&t1.base);
  t1.key = -7;
  t1.value = "seven";
  TagsEntry *tags[] = {&t1};
  k.n_tags = 1;
  k.tags = tags;
  k.has_opt = 1; /* explicit presence: emitted although 0 */
  k.has_opt_bytes = 1;
  char *words[] = {"x", ""};
  k.n_words = 2;
  k.words = words;
  k.color = RAMP__V1__PAYMENT_MODEL__PAYMENT_MODEL_TRAINING;
  k.f64 = 5;
  k.label = "lbl";
  k.choice_case = 15; /* oneof member set to its default: still emitted */
  k.code = 0;
  CHECK_JSON(&k, "{\"i32\":-5,\"u32\":4000000000,\"u64\":\"18446744073709551615\",\"s64\":\"-9\","
                 "\"f32\":7,\"sf64\":\"-1\",\"fl\":1.5,\"db\":\"-Infinity\",\"flag\":true,"
                 "\"payload\":\"AAH+/w==\",\"nums\":[1,-2,3],\"ds\":[\"NaN\",2.0,\"Infinity\",0.25],"
                 "\"blobs\":[\"\",\"YQ==\"],\"code\":\"0\",\"next\":{\"i32\":1},\"counts\":{\"a\":"
                 "\"1\",\"b\\u00E9\":\"-2\"},\"tags\":{\"-7\":\"seven\"},\"opt\":0,\"optBytes\":\"\","
                 "\"words\":[\"x\",\"\"],\"color\":\"PAYMENT_MODEL_TRAINING\",\"f64\":\"5\","
                 "\"label\":\"lbl\"}");
  CHECK(round_trips(&k.base));

  Kitchen empty;
  kitchen_init(&empty.base);
  CHECK_JSON(&empty, "{}");
  k = empty;
  k.choice_case = 16;
  k.child = &next;
  k.opt_str = "";
  CHECK_JSON(&k, "{\"child\":{\"i32\":1},\"optStr\":\"\"}");
  CHECK(round_trips(&k.base));
  k.choice_case = 14;
  k.name = "";
  CHECK_JSON(&k, "{\"name\":\"\",\"optStr\":\"\"}");
}

TEST(kitchen_decode_scalars) {
  Kitchen *k = (Kitchen *)decode(
      &kitchen_desc, "{\"i32\":-2147483648,\"u32\":\"4294967295\",\"u64\":1e19,"
                     "\"s64\":\"-1\",\"f32\":4294967295,\"sf64\":-3,\"fl\":\"-2.5\",\"db\":\"NaN\","
                     "\"flag\":false,\"f64\":\"18446744073709551615\",\"color\":8,\"opt\":0,"
                     "\"opt_str\":\"\",\"label\":\"\"}");
  CHECK(k != NULL);
  CHECK_INT(k->i32, INT32_MIN);
  CHECK(k->u32 == UINT32_MAX);
  CHECK(k->u64 == 10000000000000000000u);
  CHECK_INT(k->s64, -1);
  CHECK(k->f32 == UINT32_MAX);
  CHECK_INT(k->sf64, -3);
  CHECK(k->fl == -2.5f);
  CHECK(isnan(k->db));
  CHECK(k->f64 == UINT64_MAX);
  CHECK_INT(k->color, 8);
  CHECK(k->has_opt && k->opt == 0);
  CHECK(k->opt_str != NULL && k->opt_str[0] == '\0');
  protobuf_c_message_free_unpacked(&k->base, NULL);
}

TEST(kitchen_decode_ranges) {
  const ProtobufCMessageDescriptor *d = &kitchen_desc;
  CHECK_STR(decode_err(d, "{\"u64\":18446744073709551615e0}"),
            "u64: value out of range for uint64");
  CHECK_STR(decode_err(d, "{\"i32\":2147483648}"), "i32: value out of range for int32");
  CHECK_STR(decode_err(d, "{\"i32\":-2147483649}"), "i32: value out of range for int32");
  CHECK_STR(decode_err(d, "{\"i32\":\"2147483648\"}"), "i32: value out of range for int32");
  CHECK_STR(decode_err(d, "{\"u32\":-1}"), "u32: value out of range for uint32");
  CHECK_STR(decode_err(d, "{\"u32\":4294967296}"), "u32: value out of range for uint32");
  CHECK_STR(decode_err(d, "{\"f32\":\"-1\"}"), "f32: value out of range for fixed32");
  CHECK_STR(decode_err(d, "{\"u64\":\"18446744073709551616\"}"),
            "u64: value out of range for uint64");
  CHECK_STR(decode_err(d, "{\"u64\":-1}"), "u64: value out of range for uint64");
  CHECK_STR(decode_err(d, "{\"f64\":\"-5\"}"), "f64: value out of range for fixed64");
  CHECK_STR(decode_err(d, "{\"i32\":0.5}"), "i32: expected int32, got a fractional number");
  CHECK_STR(decode_err(d, "{\"fl\":1e39}"), "fl: value out of range for float");
  CHECK_STR(decode_err(d, "{\"fl\":\"-1e39\"}"), "fl: value out of range for float");
  CHECK_STR(decode_err(d, "{\"db\":\"inf\"}"), "db: expected double, got \"inf\"");
  CHECK_STR(decode_err(d, "{\"db\":\"nan\"}"), "db: expected double, got \"nan\"");
  CHECK_STR(decode_err(d, "{\"db\":\"1e999\"}"), "db: expected double, got \"1e999\"");
  CHECK_STR(decode_err(d, "{\"db\":\" 1\"}"), "db: expected double, got \" 1\"");
  CHECK_STR(decode_err(d, "{\"db\":null,\"db\":1}"),
            "invalid JSON: duplicate object key near '\"db\"' (line 1, column 15)");
  CHECK_STR(decode_err(d, "{\"db\":{}}"), "db: expected double");
  CHECK_STR(decode_err(d, "{\"flag\":\"false\"}"), "flag: expected boolean");
  CHECK_STR(decode_err(d, "{\"u64\":18446744073709551615}"),
            "invalid JSON: too big integer near '18446744073709551615' (line 1, column 27)");

  Kitchen *k = (Kitchen *)decode(d, "{\"fl\":3.4028234663852886e38,\"db\":\"-Infinity\","
                                    "\"ds\":[\"Infinity\",\"1.25\",-0.5,3],\"i32\":1e2,"
                                    "\"s64\":\"-1E2\"}");
  CHECK(k != NULL);
  CHECK(k->fl == 3.4028234663852886e38f);
  CHECK(isinf(k->db) && k->db < 0);
  CHECK_INT(k->n_ds, 4);
  CHECK(isinf(k->ds[0]) && k->ds[1] == 1.25 && k->ds[2] == -0.5 && k->ds[3] == 3.0);
  CHECK_INT(k->i32, 100);
  CHECK_INT(k->s64, -100);
  protobuf_c_message_free_unpacked(&k->base, NULL);
}

TEST(kitchen_bytes_base64_variants) {
  static const char want[] = {0x00, 0x01, (char)0xfe, (char)0xff};
  const char *forms[] = {"AAH+/w==", "AAH+/w", "AAH-_w==", "AAH-_w", "AAH+_w=="};
  for (size_t i = 0; i < sizeof forms / sizeof *forms; i++) {
    char json[64];
    snprintf(json, sizeof json, "{\"payload\":\"%s\",\"blobs\":[\"%s\",\"\"]}", forms[i],
             forms[i]);
    Kitchen *k = (Kitchen *)decode(&kitchen_desc, json);
    CHECK(k != NULL);
    CHECK(bytes_eq(&k->payload, want, 4));
    CHECK_INT(k->n_blobs, 2);
    CHECK(bytes_eq(&k->blobs[0], want, 4));
    CHECK(bytes_eq(&k->blobs[1], "", 0));
    protobuf_c_message_free_unpacked(&k->base, NULL);
  }
  Kitchen *k = (Kitchen *)decode(&kitchen_desc, "{\"payload\":\"YWI\",\"optBytes\":\"\"}");
  CHECK(k != NULL);
  CHECK(bytes_eq(&k->payload, "ab", 2));
  CHECK(k->has_opt_bytes && k->opt_bytes.len == 0);
  protobuf_c_message_free_unpacked(&k->base, NULL);

  /* Larger than the on-stack scratch buffer. */
  char big[2100] = "{\"payload\":\"";
  size_t n = strlen(big);
  for (int i = 0; i < 2000; i++)
    big[n++] = "QUJD"[i % 4];
  strcpy(big + n, "\"}");
  k = (Kitchen *)decode(&kitchen_desc, big);
  CHECK(k != NULL);
  CHECK_INT(k->payload.len, 1500);
  CHECK(memcmp(k->payload.data, "ABCABC", 6) == 0);
  CHECK(round_trips(&k->base));
  protobuf_c_message_free_unpacked(&k->base, NULL);

  const char *bad[] = {"A", "AAH*", "AA=A", "AAA==", "====", "AAH+/w===", "QQ=", "AAH+_w=", "AA\\nAA",
                       "AAAA AAA"};
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
    char json[64];
    snprintf(json, sizeof json, "{\"payload\":\"%s\"}", bad[i]);
    CHECK_STR(decode_err(&kitchen_desc, json), "payload: invalid base64");
  }
  CHECK_STR(decode_err(&kitchen_desc, "{\"blobs\":[\"AA\",\"*\"]}"), "blobs[1]: invalid base64");
  CHECK_STR(decode_err(&kitchen_desc, "{\"payload\":[1]}"), "payload: expected base64 string");
}

TEST(kitchen_oneof) {
  Kitchen *k = (Kitchen *)decode(&kitchen_desc, "{\"name\":null,\"code\":\"-4\"}");
  CHECK(k != NULL);
  CHECK_INT(k->choice_case, 15);
  CHECK_INT(k->code, -4);
  protobuf_c_message_free_unpacked(&k->base, NULL);

  k = (Kitchen *)decode(&kitchen_desc, "{\"name\":\"\"}");
  CHECK(k != NULL);
  CHECK_INT(k->choice_case, 14);
  CHECK_STR(k->name, "");
  CHECK(round_trips(&k->base));
  protobuf_c_message_free_unpacked(&k->base, NULL);

  k = (Kitchen *)decode(&kitchen_desc, "{\"child\":{\"child\":{\"name\":\"deep\"}}}");
  CHECK(k != NULL);
  CHECK_INT(k->choice_case, 16);
  CHECK_INT(k->child->choice_case, 16);
  CHECK_STR(k->child->child->name, "deep");
  CHECK(round_trips(&k->base));
  protobuf_c_message_free_unpacked(&k->base, NULL);

  CHECK_STR(decode_err(&kitchen_desc, "{\"name\":\"a\",\"code\":1}"),
            "code: only one of \"name\" and \"code\" may be set (oneof)");
  /* A failure inside a oneof message member is freed through the case. */
  CHECK_STR(decode_err(&kitchen_desc, "{\"child\":{\"words\":[\"a\",1]}}"),
            "child.words[1]: expected string");
  CHECK_STR(decode_err(&kitchen_desc, "{\"child\":{\"name\":\"a\",\"child\":{}}}"),
            "child.child: only one of \"name\" and \"child\" may be set (oneof)");
}

TEST(kitchen_maps) {
  Kitchen *k = (Kitchen *)decode(
      &kitchen_desc, "{\"counts\":{\"a\":\"1\",\"\":2,\"z\\u00e9\":-3},\"tags\":{\"7\":\"seven\","
                     "\"-2147483648\":\"min\"}}");
  CHECK(k != NULL);
  CHECK_INT(k->n_counts, 3);
  CHECK_STR(k->counts[0]->key, "a");
  CHECK_INT(k->counts[0]->value, 1);
  CHECK_STR(k->counts[1]->key, "");
  CHECK_INT(k->counts[1]->value, 2);
  CHECK_STR(k->counts[2]->key, "z\xc3\xa9");
  CHECK_INT(k->n_tags, 2);
  CHECK_INT(k->tags[1]->key, INT32_MIN);
  CHECK_STR(k->tags[1]->value, "min");
  char *t = encode(&k->base);
  CHECK_STR(t, "{\"counts\":{\"a\":\"1\",\"\":\"2\",\"z\\u00E9\":\"-3\"},\"tags\":{\"7\":"
               "\"seven\",\"-2147483648\":\"min\"}}");
  free(t);
  CHECK(round_trips(&k->base));
  protobuf_c_message_free_unpacked(&k->base, NULL);

  CHECK_STR(decode_err(&kitchen_desc, "{\"tags\":{\"x\":\"a\"}}"),
            "tags[\"x\"]: expected int32, got \"x\"");
  CHECK_STR(decode_err(&kitchen_desc, "{\"tags\":{\"1e2\":\"a\"}}"),
            "tags[\"1e2\"]: expected int32, got \"1e2\"");
  CHECK_STR(decode_err(&kitchen_desc, "{\"tags\":{\"2147483648\":\"a\"}}"),
            "tags[\"2147483648\"]: value out of range for int32");
  CHECK_STR(decode_err(&kitchen_desc, "{\"tags\":{\"1\":5}}"), "tags[\"1\"]: expected string");
  CHECK_STR(decode_err(&kitchen_desc, "{\"counts\":{\"a\":null}}"),
            "counts[\"a\"]: null is not a valid map value");
  CHECK_STR(decode_err(&kitchen_desc, "{\"counts\":[]}"), "counts: expected object");
}

/* Builds {"next":{"next":...{}...}} with n objects in all. */
static char *nested_json(int n) {
  char *s = malloc((size_t)n * 10 + 8), *p = s;
  for (int i = 1; i < n; i++)
    p += sprintf(p, "{\"next\":");
  *p++ = '{';
  for (int i = 0; i < n; i++)
    *p++ = '}';
  *p = '\0';
  return s;
}

TEST(depth_limit) {
  char *ok = nested_json(TG_PBJSON_MAX_DEPTH);
  Kitchen *k = (Kitchen *)decode(&kitchen_desc, ok);
  free(ok);
  CHECK(k != NULL);
  CHECK(round_trips(&k->base));

  /* One level deeper than the limit refuses to encode too. */
  Kitchen *top = kitchen_new();
  top->next = k;
  CHECK(tg_pbjson_encode_text(&top->base, NULL) == NULL);
  protobuf_c_message_free_unpacked(&top->base, NULL);

  char *bomb = nested_json(TG_PBJSON_MAX_DEPTH + 1);
  const char *e = decode_err(&kitchen_desc, bomb);
  free(bomb);
  CHECK(strncmp(e, "...", 3) == 0);
  CHECK(strstr(e, ".next.next: messages nested deeper than 64") != NULL);

  /* Far deeper nesting never reaches us: jansson stops at its own limit. */
  size_t n = 100000;
  char *deep = malloc(n * 2 + 1);
  memset(deep, '[', n);
  memset(deep + n, ']', n);
  deep[2 * n] = '\0';
  e = decode_err(&kitchen_desc, deep);
  free(deep);
  CHECK(strncmp(e, "invalid JSON: ", 14) == 0);

  bomb = nested_json(5000);
  e = decode_err(&kitchen_desc, bomb);
  free(bomb);
  CHECK(strncmp(e, "invalid JSON: ", 14) == 0 || strstr(e, "nested deeper") != NULL);
}

TEST(unpacked_binary_then_json) {
  /* A message that came from the wire (protobuf-c's own allocation) encodes,
   * and JSON decoding yields the same bytes back. */
  Ramp__V1__Money m = RAMP__V1__MONEY__INIT;
  m.currency = "EUR";
  m.amount = 5;
  size_t n;
  uint8_t *b = pack(&m.base, &n);
  Ramp__V1__Money *u = ramp__v1__money__unpack(NULL, n, b);
  free(b);
  CHECK(u != NULL);
  CHECK(round_trips(&u->base));
  ramp__v1__money__free_unpacked(u, NULL);
}

TEST(decode_ignore_unknown_flag) {
  const char *text = "{\"resources\":[{\"uri\":\"https://a.example/x\",\"future\":1}],\"newTop\":{\"a\":[1]}}";
  char err[256];
  ProtobufCMessage *m = tg_pbjson_decode(&ramp__v1__discover_resources_request__descriptor, text,
                                         strlen(text), err, sizeof err);
  CHECK(m == NULL);
  m = tg_pbjson_decode_ex(&ramp__v1__discover_resources_request__descriptor, text, strlen(text),
                          TG_PBJSON_IGNORE_UNKNOWN, err, sizeof err);
  CHECK(m != NULL);
  Ramp__V1__DiscoverResourcesRequest *r = (Ramp__V1__DiscoverResourcesRequest *)m;
  CHECK_INT(r->n_resources, 1);
  CHECK_STR(r->resources[0]->uri, "https://a.example/x");
  protobuf_c_message_free_unpacked(m, NULL);
  /* Known fields keep their checks with the flag. */
  const char *bad = "{\"resources\":[{\"uri\":5}],\"x\":1}";
  m = tg_pbjson_decode_ex(&ramp__v1__discover_resources_request__descriptor, bad, strlen(bad),
                          TG_PBJSON_IGNORE_UNKNOWN, err, sizeof err);
  CHECK(m == NULL);
  CHECK_STR(err, "resources[0].uri: expected string");
}
