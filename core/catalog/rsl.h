#ifndef TG_RSL_H
#define TG_RSL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* RSL 1.0 (Really Simple Licensing, application/rsl+xml) parser on expat.
 *
 * The document is parsed into a plain tree of heap data that the catalog turns
 * into its own index. Pure functions, no global state: safe from any thread.
 *
 * Strict mode: every non-conformance is an error with its line; the parse fails
 * after reporting all of them. Lenient mode (default, for ingestion): broken
 * parts are skipped or mapped with a counted warning; the parse fails only for
 * malformed XML, a wrong root or namespace, a DTD / entity declaration, or a limit.
 *
 * Lenient rules, chosen to keep the most restrictive reading:
 * - draft usage tokens "train-ai" and "tdm" (text and data mining) map to ai-train;
 *   draft payment type "inference" maps to use;
 * - an unknown token inside <permits>/<prohibits> is dropped (warning);
 * - a <content> without url is dropped; a <content> without <license> is kept with
 *   nlicenses == 0 ("no license": nothing is offered for it);
 * - a <license> holding a <payment> with an unknown type or a bad amount is dropped
 *   whole, so a broken price never turns into "free";
 * - repeated <permits>/<prohibits> of one type are unioned; a repeated single-valued
 *   element (<schema>, <amount>, ...) keeps the first value;
 * - unknown elements in the RSL namespace are skipped with their subtree.
 * Elements of other namespaces are ignored with their subtree in both modes. */

#define TG_RSL_NS "https://rslstandard.org/rsl"

#define TG_RSL_USAGE_ALL (1u << 0)
#define TG_RSL_USAGE_AI_ALL (1u << 1)
#define TG_RSL_USAGE_AI_TRAIN (1u << 2)
#define TG_RSL_USAGE_AI_INPUT (1u << 3)
#define TG_RSL_USAGE_AI_INDEX (1u << 4)
#define TG_RSL_USAGE_SEARCH (1u << 5)

#define TG_RSL_USER_COMMERCIAL (1u << 0)
#define TG_RSL_USER_NON_COMMERCIAL (1u << 1)
#define TG_RSL_USER_EDUCATION (1u << 2)
#define TG_RSL_USER_GOVERNMENT (1u << 3)
#define TG_RSL_USER_PERSONAL (1u << 4)

typedef enum {
  TG_RSL_PAY_PURCHASE,
  TG_RSL_PAY_SUBSCRIPTION,
  TG_RSL_PAY_TRAINING,
  TG_RSL_PAY_CRAWL,
  TG_RSL_PAY_USE,
  TG_RSL_PAY_CONTRIBUTION,
  TG_RSL_PAY_ATTRIBUTION,
  TG_RSL_PAY_FREE,
} tg_rsl_pay_type_t;

typedef struct {
  tg_rsl_pay_type_t type;
  bool has_amount;   /* an <amount> was present */
  int64_t amount;    /* atomic units: micro-units of currency ("0.015" -> 15000) */
  char currency[8];  /* as written, e.g. "USD"; "" when absent */
  char *standard;    /* <standard> text or NULL */
  char *custom;      /* <custom> text or NULL */
  char **accepts;    /* each <accepts>: its text, or its type attribute when empty */
  size_t naccepts;
} tg_rsl_payment_t;

typedef struct {
  char *type; /* type attribute or NULL */
  char *text; /* trimmed element text or NULL */
} tg_rsl_legal_t;

typedef struct {
  char *type;     /* type attribute or NULL */
  char *endpoint; /* endpoint attribute, else the trimmed text, or NULL */
} tg_rsl_reporting_t;

typedef struct {
  /* A permits list is closed: with has_permit_* true, anything unlisted is denied
   * (an empty list denies all); with it false there was no such <permits>. */
  bool has_permit_usage, has_permit_user, has_permit_geo;
  uint32_t permit_usage, prohibit_usage; /* TG_RSL_USAGE_* */
  uint32_t permit_user, prohibit_user;   /* TG_RSL_USER_* */
  char **permit_geo, **prohibit_geo;     /* ISO 3166-1 alpha-2, uppercased */
  size_t npermit_geo, nprohibit_geo;
  tg_rsl_payment_t *payments; /* none means free */
  size_t npayments;
  tg_rsl_legal_t *legal;
  size_t nlegal;
  tg_rsl_reporting_t *reporting;
  size_t nreporting;
} tg_rsl_license_t;

typedef struct {
  char *url;     /* verbatim: absolute URL or robots.txt-style pattern (`*`, `$`) */
  char *server;  /* license server base URL or NULL */
  bool encrypted;
  int64_t lastmod; /* unix seconds, 0 when unknown */
  char *schema, *alternate, *copyright, *terms; /* trimmed texts or NULL */
  tg_rsl_license_t *licenses; /* nlicenses == 0: "no license" */
  size_t nlicenses;
} tg_rsl_content_t;

typedef struct {
  tg_rsl_content_t *contents;
  size_t ncontents;
} tg_rsl_doc_t;

typedef struct {
  bool strict;         /* default false (lenient) */
  size_t max_bytes;    /* 0: default 8 MiB */
  size_t max_depth;    /* 0: default 32 */
  size_t max_elements; /* 0: default 2,000,000 */
} tg_rsl_options_t;

#define TG_RSL_REPORT_MAX 32
#define TG_RSL_REPORT_MSG 160

typedef struct {
  size_t warnings, errors;  /* all of them, including those not listed */
  size_t nmessages;         /* listed, at most TG_RSL_REPORT_MAX, in document order */
  char messages[TG_RSL_REPORT_MAX][TG_RSL_REPORT_MSG]; /* "line N: reason" */
} tg_rsl_report_t;

/* Parses len bytes of xml (need not be NUL-terminated). opt may be NULL (lenient,
 * default limits); report may be NULL and is reset first.
 * Returns 0 and stores a new document in *out (the caller frees it with
 * tg_rsl_doc_free), or: -EINVAL for a malformed or refused document (in strict
 * mode also any non-conformance), -E2BIG for a limit exceeded, -ENOMEM; *out is
 * then NULL and report says why. */
int tg_rsl_parse(const char *xml, size_t len, const tg_rsl_options_t *opt, tg_rsl_doc_t **out,
                 tg_rsl_report_t *report);

/* Frees doc and everything in it; NULL is a no-op. */
void tg_rsl_doc_free(tg_rsl_doc_t *doc);

const char *tg_rsl_pay_type_name(tg_rsl_pay_type_t t);

#endif
