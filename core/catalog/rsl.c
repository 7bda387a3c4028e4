#include "catalog/rsl.h"

#include <ctype.h>
#include <errno.h>
#include <expat.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* expat joins namespace URI and local name with this separator. */
#define NS_SEP ' '

typedef enum {
  K_NONE,
  K_RSL,
  K_CONTENT,
  K_LICENSE,
  K_PERMITS,
  K_PROHIBITS,
  K_PAYMENT,
  K_AMOUNT,
  K_STANDARD,
  K_CUSTOM,
  K_ACCEPTS,
  K_LEGAL,
  K_REPORTING,
  K_SCHEMA,
  K_ALTERNATE,
  K_COPYRIGHT,
  K_TERMS,
} kind_t;

static const char *const kind_names[] = {
    "",        "rsl",      "content", "license",   "permits",   "prohibits",
    "payment", "amount",   "standard", "custom",   "accepts",   "legal",
    "reporting", "schema", "alternate", "copyright", "terms",
};

typedef enum { LIST_USAGE, LIST_USER, LIST_GEO } list_t;

typedef struct {
  XML_Parser xp;
  tg_rsl_options_t opt;
  tg_rsl_report_t *rep;
  tg_rsl_doc_t *doc;
  int rc;            /* first fatal error, 0 while none */
  bool nonconformant; /* strict mode: at least one error */
  size_t depth, elements;
  size_t skip;   /* > 0 inside an ignored subtree */
  kind_t *stack; /* kind per depth, max_depth entries */
  char *text;    /* text of the current leaf element */
  size_t tlen, tcap;
  bool collect;
  bool license_bad; /* drop the current license at its end */
  bool payment_has_amount_elem;
  list_t list_type; /* type of the open <permits>/<prohibits> */
  char *attr_type;  /* type attribute of the open leaf element */
  char *attr_endpoint;
} parser_t;

static void report_add(parser_t *p, bool error, unsigned long line, const char *fmt, va_list ap) {
  if (!p->rep)
    return;
  if (error)
    p->rep->errors++;
  else
    p->rep->warnings++;
  if (p->rep->nmessages >= TG_RSL_REPORT_MAX)
    return;
  char *m = p->rep->messages[p->rep->nmessages++];
  int n = snprintf(m, TG_RSL_REPORT_MSG, "line %lu: ", line);
  if (n > 0 && n < TG_RSL_REPORT_MSG)
    vsnprintf(m + n, TG_RSL_REPORT_MSG - (size_t)n, fmt, ap);
}

static unsigned long cur_line(parser_t *p) {
  return p->xp ? (unsigned long)XML_GetCurrentLineNumber(p->xp) : 1;
}

/* A non-conformance: an error that fails the parse in strict mode, a warning otherwise. */
static void issue(parser_t *p, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  report_add(p, p->opt.strict, cur_line(p), fmt, ap);
  va_end(ap);
  if (p->opt.strict)
    p->nonconformant = true;
}

/* Fails the whole document and stops expat. */
static void fatal(parser_t *p, int rc, const char *fmt, ...) {
  if (p->rc)
    return;
  p->rc = rc;
  if (rc != -ENOMEM) {
    va_list ap;
    va_start(ap, fmt);
    report_add(p, true, cur_line(p), fmt, ap);
    va_end(ap);
  }
  if (p->xp)
    XML_StopParser(p->xp, XML_FALSE);
}

static void oom(parser_t *p) { fatal(p, -ENOMEM, "out of memory"); }

/* Appends one zeroed element to the array at arrp (a T **) holding *n; the capacity
 * doubles at powers of two, so no capacity field is needed. The pointer is moved
 * with memcpy because arrp's pointee is a T *, not a void *. */
static void *grow(void *arrp, size_t *n, size_t sz) {
  char *arr;
  memcpy(&arr, arrp, sizeof arr);
  if (*n == 0 || (*n & (*n - 1)) == 0) {
    size_t cap = *n ? *n * 2 : 1;
    if (cap > SIZE_MAX / sz)
      return NULL;
    char *na = realloc(arr, cap * sz);
    if (!na)
      return NULL;
    arr = na;
    memcpy(arrp, &arr, sizeof arr);
  }
  char *e = arr + (*n)++ * sz;
  memset(e, 0, sz);
  return e;
}

static char *dup_trim(const char *s, size_t len) {
  while (len && isspace((unsigned char)*s))
    s++, len--;
  while (len && isspace((unsigned char)s[len - 1]))
    len--;
  char *d = malloc(len + 1);
  if (d) {
    memcpy(d, s, len);
    d[len] = '\0';
  }
  return d;
}

static const char *attr(const XML_Char **atts, const char *name) {
  for (size_t i = 0; atts[i]; i += 2)
    if (strcmp(atts[i], name) == 0)
      return atts[i + 1];
  return NULL;
}

static tg_rsl_content_t *cur_content(parser_t *p) {
  return &p->doc->contents[p->doc->ncontents - 1];
}

static tg_rsl_license_t *cur_license(parser_t *p) {
  tg_rsl_content_t *c = cur_content(p);
  return &c->licenses[c->nlicenses - 1];
}

static tg_rsl_payment_t *cur_payment(parser_t *p) {
  tg_rsl_license_t *l = cur_license(p);
  return &l->payments[l->npayments - 1];
}

static void free_strv(char **v, size_t n) {
  for (size_t i = 0; i < n; i++)
    free(v[i]);
  free(v);
}

static void license_free(tg_rsl_license_t *l) {
  free_strv(l->permit_geo, l->npermit_geo);
  free_strv(l->prohibit_geo, l->nprohibit_geo);
  for (size_t i = 0; i < l->npayments; i++) {
    free(l->payments[i].standard);
    free(l->payments[i].custom);
    free_strv(l->payments[i].accepts, l->payments[i].naccepts);
  }
  free(l->payments);
  for (size_t i = 0; i < l->nlegal; i++) {
    free(l->legal[i].type);
    free(l->legal[i].text);
  }
  free(l->legal);
  for (size_t i = 0; i < l->nreporting; i++) {
    free(l->reporting[i].type);
    free(l->reporting[i].endpoint);
  }
  free(l->reporting);
}

static void content_free(tg_rsl_content_t *c) {
  free(c->url);
  free(c->server);
  free(c->schema);
  free(c->alternate);
  free(c->copyright);
  free(c->terms);
  for (size_t i = 0; i < c->nlicenses; i++)
    license_free(&c->licenses[i]);
  free(c->licenses);
}

void tg_rsl_doc_free(tg_rsl_doc_t *doc) {
  if (!doc)
    return;
  for (size_t i = 0; i < doc->ncontents; i++)
    content_free(&doc->contents[i]);
  free(doc->contents);
  free(doc);
}

static const char *const pay_names[] = {
    "purchase", "subscription", "training", "crawl", "use", "contribution", "attribution", "free",
};

const char *tg_rsl_pay_type_name(tg_rsl_pay_type_t t) {
  return (unsigned)t < sizeof pay_names / sizeof pay_names[0] ? pay_names[t] : "?";
}

/* Decimal to micro-units with integer arithmetic: digits, optional '.' and 1-6
 * fraction digits; no sign, no exponent. Returns 0 or -EINVAL / -ERANGE. */
static int parse_amount(const char *s, int64_t *out) {
  const int64_t unit = 1000000;
  int64_t whole = 0, frac = 0;
  size_t nd = 0, nf = 0;
  for (; isdigit((unsigned char)*s); s++, nd++) {
    if (whole > (INT64_MAX / unit - 9) / 10)
      return -ERANGE;
    whole = whole * 10 + (*s - '0');
  }
  if (*s == '.') {
    s++;
    for (; isdigit((unsigned char)*s); s++, nf++) {
      if (nf == 6)
        return -ERANGE;
      frac = frac * 10 + (*s - '0');
    }
    if (nf == 0)
      return -EINVAL;
  }
  if (nd == 0 || *s != '\0')
    return -EINVAL;
  for (size_t i = nf; i < 6; i++)
    frac *= 10;
  *out = whole * unit + frac;
  return 0;
}

static int64_t days_from_civil(int64_t y, int m, int d) {
  y -= m <= 2;
  int64_t era = (y >= 0 ? y : y - 399) / 400;
  int64_t yoe = y - era * 400;
  int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
  int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
  return era * 146097 + doe - 719468;
}

static int digits(const char **s, int n) {
  int v = 0;
  for (int i = 0; i < n; i++, (*s)++) {
    if (!isdigit((unsigned char)**s))
      return -1;
    v = v * 10 + (**s - '0');
  }
  return v;
}

/* ISO 8601: YYYY-MM-DD, optionally Thh:mm[:ss[.frac]] and Z or +-hh:mm (none: UTC). */
static int parse_time(const char *s, int64_t *out) {
  int y = digits(&s, 4);
  if (y < 0 || *s++ != '-')
    return -EINVAL;
  int mo = digits(&s, 2);
  if (mo < 1 || mo > 12 || *s++ != '-')
    return -EINVAL;
  int d = digits(&s, 2);
  if (d < 1 || d > 31)
    return -EINVAL;
  int64_t t = days_from_civil(y, mo, d) * 86400;
  if (*s == 'T' || *s == 't' || *s == ' ') {
    s++;
    int h = digits(&s, 2);
    if (h < 0 || h > 23 || *s++ != ':')
      return -EINVAL;
    int mi = digits(&s, 2);
    if (mi < 0 || mi > 59)
      return -EINVAL;
    int sec = 0;
    if (*s == ':') {
      s++;
      sec = digits(&s, 2);
      if (sec < 0 || sec > 60)
        return -EINVAL;
      if (*s == '.') {
        s++;
        if (!isdigit((unsigned char)*s))
          return -EINVAL;
        while (isdigit((unsigned char)*s))
          s++;
      }
    }
    t += h * 3600 + mi * 60 + sec;
    if (*s == 'Z' || *s == 'z') {
      s++;
    } else if (*s == '+' || *s == '-') {
      int sign = *s++ == '+' ? 1 : -1;
      int oh = digits(&s, 2);
      if (oh < 0 || oh > 23)
        return -EINVAL;
      if (*s == ':')
        s++;
      int om = digits(&s, 2);
      if (om < 0 || om > 59)
        return -EINVAL;
      t -= sign * (oh * 3600 + om * 60);
    }
  }
  if (*s)
    return -EINVAL;
  *out = t;
  return 0;
}

static kind_t kind_of(const char *local) {
  for (size_t k = K_RSL; k < sizeof kind_names / sizeof kind_names[0]; k++)
    if (strcmp(kind_names[k], local) == 0)
      return (kind_t)k;
  return K_NONE;
}

static bool allowed_in(kind_t parent, kind_t k) {
  switch (parent) {
  case K_RSL:
    return k == K_CONTENT;
  case K_CONTENT:
    return k == K_LICENSE || k == K_SCHEMA || k == K_ALTERNATE || k == K_COPYRIGHT || k == K_TERMS;
  case K_LICENSE:
    return k == K_PERMITS || k == K_PROHIBITS || k == K_PAYMENT || k == K_LEGAL || k == K_REPORTING;
  case K_PAYMENT:
    return k == K_AMOUNT || k == K_STANDARD || k == K_CUSTOM || k == K_ACCEPTS;
  default:
    return false;
  }
}

static bool is_leaf(kind_t k) {
  return k == K_PERMITS || k == K_PROHIBITS || k == K_AMOUNT || k == K_STANDARD || k == K_CUSTOM ||
         k == K_ACCEPTS || k == K_LEGAL || k == K_REPORTING || k == K_SCHEMA ||
         k == K_ALTERNATE || k == K_COPYRIGHT || k == K_TERMS;
}

static bool parse_bool(const char *v, bool *out) {
  if (strcmp(v, "true") == 0 || strcmp(v, "1") == 0)
    *out = true;
  else if (strcmp(v, "false") == 0 || strcmp(v, "0") == 0)
    *out = false;
  else
    return false;
  return true;
}

static int pay_type_of(parser_t *p, const char *v) {
  for (size_t i = 0; i < sizeof pay_names / sizeof pay_names[0]; i++)
    if (strcmp(pay_names[i], v) == 0)
      return (int)i;
  if (strcmp(v, "inference") == 0) {
    issue(p, "draft payment type \"inference\" (use \"use\")");
    return TG_RSL_PAY_USE;
  }
  return -1;
}

static bool start_content(parser_t *p, const XML_Char **atts) {
  const char *url = attr(atts, "url");
  if (!url || !*url) {
    issue(p, "<content> without url skipped");
    return false;
  }
  tg_rsl_content_t *c = grow(&p->doc->contents, &p->doc->ncontents, sizeof *c);
  if (!c || !(c->url = strdup(url)))
    return oom(p), false;
  const char *v;
  if ((v = attr(atts, "server")) && !(c->server = strdup(v)))
    return oom(p), false;
  if ((v = attr(atts, "encrypted")) && !parse_bool(v, &c->encrypted))
    issue(p, "bad encrypted value \"%.40s\"", v);
  if ((v = attr(atts, "lastmod")) && parse_time(v, &c->lastmod) != 0) {
    c->lastmod = 0;
    issue(p, "bad lastmod \"%.40s\"", v);
  }
  return true;
}

static bool start_payment(parser_t *p, const XML_Char **atts) {
  tg_rsl_license_t *l = cur_license(p);
  const char *v = attr(atts, "type");
  if (!v) {
    issue(p, "<payment> without type, license skipped");
    p->license_bad = true;
    return false;
  }
  int t = pay_type_of(p, v);
  if (t < 0) {
    issue(p, "unknown payment type \"%.40s\", license skipped", v);
    p->license_bad = true;
    return false;
  }
  tg_rsl_payment_t *pay = grow(&l->payments, &l->npayments, sizeof *pay);
  if (!pay)
    return oom(p), false;
  pay->type = (tg_rsl_pay_type_t)t;
  p->payment_has_amount_elem = false;
  return true;
}

static bool start_list(parser_t *p, const XML_Char **atts, kind_t k) {
  const char *v = attr(atts, "type");
  if (v && strcmp(v, "usage") == 0)
    p->list_type = LIST_USAGE;
  else if (v && strcmp(v, "user") == 0)
    p->list_type = LIST_USER;
  else if (v && strcmp(v, "geo") == 0)
    p->list_type = LIST_GEO;
  else {
    issue(p, "<%s> with missing or unknown type \"%.40s\" skipped", kind_names[k], v ? v : "");
    return false;
  }
  if (k == K_PERMITS) {
    tg_rsl_license_t *l = cur_license(p);
    bool *has = p->list_type == LIST_USAGE  ? &l->has_permit_usage
                : p->list_type == LIST_USER ? &l->has_permit_user
                                            : &l->has_permit_geo;
    if (*has)
      issue(p, "repeated <permits type=\"%s\">, lists unioned", v);
    *has = true;
  }
  return true;
}

static void XMLCALL on_start(void *ud, const XML_Char *name, const XML_Char **atts) {
  parser_t *p = ud;
  if (p->rc)
    return;
  if (++p->depth > p->opt.max_depth)
    return fatal(p, -E2BIG, "nesting deeper than %zu", p->opt.max_depth);
  if (++p->elements > p->opt.max_elements)
    return fatal(p, -E2BIG, "more than %zu elements", p->opt.max_elements);
  if (p->skip) {
    p->skip++;
    return;
  }
  const char *sep = strchr(name, NS_SEP);
  const char *local = sep ? sep + 1 : name;
  bool ours = sep && (size_t)(sep - name) == strlen(TG_RSL_NS) &&
              memcmp(name, TG_RSL_NS, strlen(TG_RSL_NS)) == 0;
  if (p->depth == 1) {
    if (!ours || strcmp(local, "rsl") != 0)
      return fatal(p, -EINVAL, "root must be <rsl> in namespace %s", TG_RSL_NS);
    p->stack[0] = K_RSL;
    return;
  }
  if (!ours) {
    p->skip = 1;
    return;
  }
  kind_t parent = p->stack[p->depth - 2];
  kind_t k = kind_of(local);
  if (k == K_NONE || k == K_RSL) {
    issue(p, "unknown element <%.40s> skipped", local);
    p->skip = 1;
    return;
  }
  if (!allowed_in(parent, k)) {
    issue(p, "<%s> not allowed in <%s>, skipped", kind_names[k], kind_names[parent]);
    p->skip = 1;
    return;
  }
  bool ok = true;
  switch (k) {
  case K_CONTENT:
    ok = start_content(p, atts);
    break;
  case K_LICENSE: {
    tg_rsl_content_t *c = cur_content(p);
    ok = grow(&c->licenses, &c->nlicenses, sizeof(tg_rsl_license_t)) != NULL;
    if (!ok)
      oom(p);
    p->license_bad = false;
    break;
  }
  case K_PAYMENT:
    ok = start_payment(p, atts);
    break;
  case K_PERMITS:
  case K_PROHIBITS:
    ok = start_list(p, atts, k);
    break;
  case K_AMOUNT: {
    const char *cur = attr(atts, "currency");
    tg_rsl_payment_t *pay = cur_payment(p);
    if (p->payment_has_amount_elem) {
      issue(p, "repeated <amount>, first kept");
      ok = false;
    } else if (cur && strlen(cur) >= sizeof pay->currency) {
      issue(p, "bad currency \"%.40s\", license skipped", cur);
      p->license_bad = true;
      ok = false;
    } else {
      snprintf(pay->currency, sizeof pay->currency, "%s", cur ? cur : "");
    }
    p->payment_has_amount_elem = true;
    break;
  }
  default:
    break;
  }
  if (p->rc)
    return;
  if (!ok) {
    p->skip = 1;
    return;
  }
  p->stack[p->depth - 1] = k;
  if (is_leaf(k)) {
    p->collect = true;
    p->tlen = 0;
    free(p->attr_type);
    free(p->attr_endpoint);
    p->attr_type = p->attr_endpoint = NULL;
    const char *v;
    if ((v = attr(atts, "type")) && !(p->attr_type = strdup(v)))
      return oom(p);
    if (k == K_REPORTING && (v = attr(atts, "endpoint")) && !(p->attr_endpoint = strdup(v)))
      return oom(p);
  }
}

static void XMLCALL on_text(void *ud, const XML_Char *s, int len) {
  parser_t *p = ud;
  if (p->rc || p->skip || !p->collect || len <= 0)
    return;
  if (p->tlen + (size_t)len + 1 > p->tcap) {
    size_t cap = p->tcap ? p->tcap : 64;
    while (cap < p->tlen + (size_t)len + 1)
      cap *= 2;
    char *n = realloc(p->text, cap);
    if (!n)
      return oom(p);
    p->text = n;
    p->tcap = cap;
  }
  memcpy(p->text + p->tlen, s, (size_t)len);
  p->tlen += (size_t)len;
}

static int push_str(char ***v, size_t *n, const char *s, size_t len) {
  char **slot = grow(v, n, sizeof *slot);
  if (!slot)
    return -ENOMEM;
  if (!(*slot = dup_trim(s, len))) {
    (*n)--;
    return -ENOMEM;
  }
  return 0;
}

static uint32_t usage_bit(parser_t *p, const char *t) {
  static const char *const names[] = {"all", "ai-all", "ai-train", "ai-input", "ai-index", "search"};
  for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
    if (strcmp(names[i], t) == 0)
      return 1u << i;
  if (strcmp(t, "train-ai") == 0 || strcmp(t, "tdm") == 0) {
    issue(p, "draft usage token \"%s\" (use \"ai-train\")", t);
    return TG_RSL_USAGE_AI_TRAIN;
  }
  return 0;
}

static uint32_t user_bit(const char *t) {
  static const char *const names[] = {"commercial", "non-commercial", "education", "government",
                                      "personal"};
  for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
    if (strcmp(names[i], t) == 0)
      return 1u << i;
  return 0;
}

static void end_list(parser_t *p, bool permits) {
  tg_rsl_license_t *l = cur_license(p);
  char *s = p->text;
  s[p->tlen] = '\0';
  for (char *save = NULL, *t = strtok_r(s, " \t\r\n", &save); t; t = strtok_r(NULL, " \t\r\n", &save)) {
    if (p->list_type == LIST_GEO) {
      if (strlen(t) != 2 || !isalpha((unsigned char)t[0]) || !isalpha((unsigned char)t[1])) {
        issue(p, "bad country code \"%.40s\" dropped", t);
        continue;
      }
      t[0] = (char)toupper((unsigned char)t[0]);
      t[1] = (char)toupper((unsigned char)t[1]);
      int rc = permits ? push_str(&l->permit_geo, &l->npermit_geo, t, 2)
                       : push_str(&l->prohibit_geo, &l->nprohibit_geo, t, 2);
      if (rc)
        return oom(p);
      continue;
    }
    uint32_t bit = p->list_type == LIST_USAGE ? usage_bit(p, t) : user_bit(t);
    if (!bit) {
      issue(p, "unknown %s token \"%.40s\" dropped", p->list_type == LIST_USAGE ? "usage" : "user", t);
      continue;
    }
    if (p->list_type == LIST_USAGE)
      *(permits ? &l->permit_usage : &l->prohibit_usage) |= bit;
    else
      *(permits ? &l->permit_user : &l->prohibit_user) |= bit;
  }
}

/* Stores the trimmed text into *slot unless already set (first wins). */
static void set_once(parser_t *p, char **slot, kind_t k) {
  if (*slot) {
    issue(p, "repeated <%s>, first kept", kind_names[k]);
    return;
  }
  if (!(*slot = dup_trim(p->text, p->tlen)))
    oom(p);
}

static void end_leaf(parser_t *p, kind_t k) {
  p->collect = false;
  if (!p->text && !(p->text = malloc(p->tcap = 64)))
    return oom(p);
  p->text[p->tlen] = '\0';
  switch (k) {
  case K_PERMITS:
  case K_PROHIBITS:
    return end_list(p, k == K_PERMITS);
  case K_AMOUNT: {
    char *v = dup_trim(p->text, p->tlen);
    if (!v)
      return oom(p);
    tg_rsl_payment_t *pay = cur_payment(p);
    int rc = parse_amount(v, &pay->amount);
    if (rc)
      issue(p, "bad amount \"%.40s\"%s, license skipped", v,
            rc == -ERANGE ? " (more than 6 decimals or too large)" : "");
    free(v);
    if (rc)
      p->license_bad = true;
    else
      pay->has_amount = true;
    return;
  }
  case K_STANDARD:
    return set_once(p, &cur_payment(p)->standard, k);
  case K_CUSTOM:
    return set_once(p, &cur_payment(p)->custom, k);
  case K_ACCEPTS: {
    tg_rsl_payment_t *pay = cur_payment(p);
    char *v = dup_trim(p->text, p->tlen);
    if (!v)
      return oom(p);
    if (!*v && p->attr_type) {
      free(v);
      v = p->attr_type;
      p->attr_type = NULL;
    }
    char **slot = grow(&pay->accepts, &pay->naccepts, sizeof *slot);
    if (!slot) {
      free(v);
      return oom(p);
    }
    *slot = v;
    return;
  }
  case K_LEGAL: {
    tg_rsl_license_t *l = cur_license(p);
    tg_rsl_legal_t *g = grow(&l->legal, &l->nlegal, sizeof *g);
    if (!g || !(g->text = dup_trim(p->text, p->tlen)))
      return oom(p);
    g->type = p->attr_type;
    p->attr_type = NULL;
    return;
  }
  case K_REPORTING: {
    tg_rsl_license_t *l = cur_license(p);
    tg_rsl_reporting_t *r = grow(&l->reporting, &l->nreporting, sizeof *r);
    if (!r)
      return oom(p);
    r->type = p->attr_type;
    r->endpoint = p->attr_endpoint;
    p->attr_type = p->attr_endpoint = NULL;
    if (!r->endpoint && p->tlen && !(r->endpoint = dup_trim(p->text, p->tlen)))
      return oom(p);
    return;
  }
  case K_SCHEMA:
    return set_once(p, &cur_content(p)->schema, k);
  case K_ALTERNATE:
    return set_once(p, &cur_content(p)->alternate, k);
  case K_COPYRIGHT:
    return set_once(p, &cur_content(p)->copyright, k);
  case K_TERMS:
    return set_once(p, &cur_content(p)->terms, k);
  default:
    return;
  }
}

static void XMLCALL on_end(void *ud, const XML_Char *name) {
  (void)name;
  parser_t *p = ud;
  if (p->rc)
    return;
  size_t d = p->depth--;
  if (p->skip) {
    p->skip--;
    return;
  }
  kind_t k = p->stack[d - 1];
  if (is_leaf(k))
    return end_leaf(p, k);
  if (k == K_LICENSE && p->license_bad) {
    tg_rsl_content_t *c = cur_content(p);
    license_free(&c->licenses[--c->nlicenses]);
    p->license_bad = false;
  } else if (k == K_CONTENT && cur_content(p)->nlicenses == 0) {
    issue(p, "<content url=\"%.60s\"> has no license", cur_content(p)->url);
  } else if (k == K_RSL && p->doc->ncontents == 0) {
    issue(p, "<rsl> has no <content>");
  }
}

static void XMLCALL on_doctype(void *ud, const XML_Char *name, const XML_Char *sysid,
                               const XML_Char *pubid, int has_internal_subset) {
  (void)name, (void)sysid, (void)pubid, (void)has_internal_subset;
  fatal(ud, -EINVAL, "DTD and entity declarations are refused");
}

static void XMLCALL on_entity(void *ud, const XML_Char *name, int is_param, const XML_Char *value,
                              int value_len, const XML_Char *base, const XML_Char *sysid,
                              const XML_Char *pubid, const XML_Char *notation) {
  (void)name, (void)is_param, (void)value, (void)value_len, (void)base, (void)sysid, (void)pubid,
      (void)notation;
  fatal(ud, -EINVAL, "entity declarations are refused");
}

int tg_rsl_parse(const char *xml, size_t len, const tg_rsl_options_t *opt, tg_rsl_doc_t **out,
                 tg_rsl_report_t *report) {
  parser_t p = {0};
  *out = NULL;
  if (report)
    memset(report, 0, sizeof *report);
  p.rep = report;
  if (opt)
    p.opt = *opt;
  if (!p.opt.max_bytes)
    p.opt.max_bytes = 8u << 20;
  if (!p.opt.max_depth)
    p.opt.max_depth = 32;
  if (!p.opt.max_elements)
    p.opt.max_elements = 2000000;
  if (len > p.opt.max_bytes || len > (size_t)INT32_MAX) {
    fatal(&p, -E2BIG, "document of %zu bytes exceeds %zu", len, p.opt.max_bytes);
    return p.rc;
  }
  p.doc = calloc(1, sizeof *p.doc);
  p.stack = calloc(p.opt.max_depth, sizeof *p.stack);
  p.xp = XML_ParserCreateNS(NULL, NS_SEP);
  if (!p.doc || !p.stack || !p.xp) {
    p.rc = -ENOMEM;
    goto fail;
  }
  XML_SetUserData(p.xp, &p);
  XML_SetElementHandler(p.xp, on_start, on_end);
  XML_SetCharacterDataHandler(p.xp, on_text);
  XML_SetStartDoctypeDeclHandler(p.xp, on_doctype);
  XML_SetEntityDeclHandler(p.xp, on_entity);
  XML_SetParamEntityParsing(p.xp, XML_PARAM_ENTITY_PARSING_NEVER);
  if (XML_Parse(p.xp, xml, (int)len, XML_TRUE) == XML_STATUS_ERROR && !p.rc) {
    unsigned long line = (unsigned long)XML_GetCurrentLineNumber(p.xp);
    p.rc = -EINVAL;
    if (report) {
      report->errors++;
      if (report->nmessages < TG_RSL_REPORT_MAX)
        snprintf(report->messages[report->nmessages++], TG_RSL_REPORT_MSG,
                 "line %lu: malformed XML: %s", line, XML_ErrorString(XML_GetErrorCode(p.xp)));
    }
  }
  if (p.rc)
    goto fail;
  if (p.nonconformant) {
    p.rc = -EINVAL;
    goto fail;
  }
  XML_ParserFree(p.xp);
  free(p.stack);
  free(p.text);
  free(p.attr_type);
  free(p.attr_endpoint);
  *out = p.doc;
  return 0;

fail:
  if (p.xp)
    XML_ParserFree(p.xp);
  free(p.stack);
  free(p.text);
  free(p.attr_type);
  free(p.attr_endpoint);
  tg_rsl_doc_free(p.doc);
  return p.rc;
}
