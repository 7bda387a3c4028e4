#include "base/metrics.h"

#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <sys/wait.h>
#include <unistd.h>

#include "test.h"

/* A parser for the text format, independent of the renderer: it checks the
 * syntax and the rules a scraper relies on, and hands back samples. */

#define MAX_LABELS 6

typedef struct {
  char name[96];
  int nlabels;
  char lname[MAX_LABELS][32];
  char lval[MAX_LABELS][256];
  double value;
} sample_t;

typedef struct {
  sample_t *v;
  size_t n, cap;
  char err[512];
} expo_t;

static int expo_fail(expo_t *e, const char *line, const char *why) {
  snprintf(e->err, sizeof e->err, "%s in line: %.200s", why, line);
  return -1;
}

static size_t name_len(const char *s, int colon) {
  size_t i = 0;
  while ((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= 'A' && s[i] <= 'Z') || s[i] == '_' ||
         (colon && s[i] == ':') || (i > 0 && s[i] >= '0' && s[i] <= '9'))
    i++;
  return i;
}

static int parse_value(const char *s, double *out) {
  if (strcmp(s, "+Inf") == 0) {
    *out = INFINITY;
    return 0;
  }
  if (strcmp(s, "-Inf") == 0) {
    *out = -INFINITY;
    return 0;
  }
  if (strcmp(s, "NaN") == 0) {
    *out = NAN;
    return 0;
  }
  char *end;
  *out = strtod(s, &end);
  return *s && *end == '\0' && strchr(s, 'x') == NULL && strchr(s, 'n') == NULL ? 0 : -1;
}

static const char *label_of(const sample_t *s, const char *name) {
  for (int i = 0; i < s->nlabels; i++)
    if (strcmp(s->lname[i], name) == 0)
      return s->lval[i];
  return NULL;
}

/* Same series apart from le. */
static int same_series(const sample_t *a, const sample_t *b) {
  int na = 0, nb = 0;
  for (int i = 0; i < a->nlabels; i++) {
    if (strcmp(a->lname[i], "le") == 0)
      continue;
    na++;
    const char *v = label_of(b, a->lname[i]);
    if (v == NULL || strcmp(v, a->lval[i]) != 0)
      return 0;
  }
  for (int i = 0; i < b->nlabels; i++)
    if (strcmp(b->lname[i], "le") != 0)
      nb++;
  return na == nb;
}

static int ends_with(const char *s, const char *suffix) {
  size_t a = strlen(s), b = strlen(suffix);
  return a >= b && strcmp(s + a - b, suffix) == 0;
}

static int parse_expo(const char *text, expo_t *e) {
  char family[96] = "", type[16] = "", help_for[96] = "";
  char line[4096];
  size_t family_start = 0;
  memset(e, 0, sizeof *e);
  for (const char *p = text; *p;) {
    const char *eol = strchr(p, '\n');
    if (eol == NULL)
      return expo_fail(e, p, "missing final newline");
    size_t len = (size_t)(eol - p);
    if (len >= sizeof line)
      return expo_fail(e, p, "line too long");
    memcpy(line, p, len);
    line[len] = '\0';
    p = eol + 1;

    if (strncmp(line, "# HELP ", 7) == 0) {
      size_t n = name_len(line + 7, 1);
      if (n == 0 || n >= sizeof help_for || line[7 + n] != ' ')
        return expo_fail(e, line, "bad HELP");
      memcpy(help_for, line + 7, n);
      help_for[n] = '\0';
      for (const char *c = line + 8 + n; *c; c++)
        if (*c == '\\' && c[1] != '\\' && c[1] != 'n')
          return expo_fail(e, line, "bad escape in HELP");
        else if (*c == '\\')
          c++;
      continue;
    }
    if (strncmp(line, "# TYPE ", 7) == 0) {
      size_t n = name_len(line + 7, 1);
      if (n == 0 || n >= sizeof family || line[7 + n] != ' ')
        return expo_fail(e, line, "bad TYPE");
      memcpy(family, line + 7, n);
      family[n] = '\0';
      snprintf(type, sizeof type, "%s", line + 8 + n);
      if (strcmp(family, help_for) != 0)
        return expo_fail(e, line, "TYPE without HELP just before");
      for (size_t i = 0; i < e->n; i++)
        if (strncmp(e->v[i].name, family, strlen(family)) == 0 &&
            (e->v[i].name[strlen(family)] == '\0' ||
             strcmp(type, "histogram") == 0))
          return expo_fail(e, line, "family declared twice or after its samples");
      if (strcmp(type, "counter") && strcmp(type, "gauge") && strcmp(type, "histogram"))
        return expo_fail(e, line, "unknown type");
      family_start = e->n;
      continue;
    }
    if (line[0] == '#' || line[0] == '\0')
      return expo_fail(e, line, "unexpected comment or blank line");

    if (e->n == e->cap) {
      e->cap = e->cap ? e->cap * 2 : 64;
      e->v = realloc(e->v, e->cap * sizeof *e->v);
      if (e->v == NULL)
        return expo_fail(e, line, "out of memory");
    }
    sample_t *s = &e->v[e->n];
    memset(s, 0, sizeof *s);
    size_t n = name_len(line, 1);
    if (n == 0 || n >= sizeof s->name)
      return expo_fail(e, line, "bad metric name");
    memcpy(s->name, line, n);
    const char *c = line + n;
    if (*c == '{') {
      c++;
      while (*c != '}') {
        if (s->nlabels == MAX_LABELS)
          return expo_fail(e, line, "too many labels");
        size_t ln = name_len(c, 0);
        if (ln == 0 || ln >= sizeof s->lname[0] || c[ln] != '=' || c[ln + 1] != '"')
          return expo_fail(e, line, "bad label name");
        memcpy(s->lname[s->nlabels], c, ln);
        c += ln + 2;
        size_t vn = 0;
        char *v = s->lval[s->nlabels];
        for (; *c != '"'; c++) {
          if (*c == '\0' || vn + 1 >= sizeof s->lval[0])
            return expo_fail(e, line, "unterminated label value");
          if (*c == '\\') {
            c++;
            if (*c == 'n')
              v[vn++] = '\n';
            else if (*c == '\\' || *c == '"')
              v[vn++] = *c;
            else
              return expo_fail(e, line, "bad escape in label value");
          } else {
            v[vn++] = *c;
          }
        }
        v[vn] = '\0';
        for (int i = 0; i < s->nlabels; i++)
          if (strcmp(s->lname[i], s->lname[s->nlabels]) == 0)
            return expo_fail(e, line, "duplicate label");
        s->nlabels++;
        c++;
        if (*c == ',')
          c++;
        else if (*c != '}')
          return expo_fail(e, line, "bad label separator");
      }
      c++;
    }
    if (*c != ' ' || parse_value(c + 1, &s->value) != 0)
      return expo_fail(e, line, "bad value");

    const char *suffix = s->name + strlen(family);
    if (strncmp(s->name, family, strlen(family)) != 0)
      return expo_fail(e, line, "sample outside its family");
    if (strcmp(type, "histogram") == 0) {
      if (strcmp(suffix, "_bucket") && strcmp(suffix, "_sum") && strcmp(suffix, "_count"))
        return expo_fail(e, line, "bad histogram sample name");
      if ((strcmp(suffix, "_bucket") == 0) != (label_of(s, "le") != NULL))
        return expo_fail(e, line, "le on a non-bucket or missing on a bucket");
    } else if (*suffix != '\0' || label_of(s, "le")) {
      return expo_fail(e, line, "bad sample name");
    }
    if (strcmp(type, "counter") == 0 && !(s->value >= 0))
      return expo_fail(e, line, "negative counter");

    for (size_t i = family_start; i < e->n; i++) {
      const sample_t *o = &e->v[i];
      const char *le_o = label_of(o, "le"), *le_s = label_of(s, "le");
      if (strcmp(o->name, s->name) == 0 && same_series(o, s) &&
          (le_o == NULL || strcmp(le_o, le_s) == 0))
        return expo_fail(e, line, "duplicate series");
    }
    if (strcmp(suffix, "_bucket") == 0) {
      double le;
      if (parse_value(label_of(s, "le"), &le) != 0)
        return expo_fail(e, line, "bad le");
      /* Buckets of one series come together, ascending, cumulative. */
      const sample_t *prev = e->n > family_start ? &e->v[e->n - 1] : NULL;
      if (prev && strcmp(prev->name, s->name) == 0 && same_series(prev, s)) {
        double prev_le;
        parse_value(label_of(prev, "le"), &prev_le);
        if (!(le > prev_le) || s->value < prev->value)
          return expo_fail(e, line, "buckets not ascending or not cumulative");
      } else if (prev && ends_with(prev->name, "_bucket")) {
        return expo_fail(e, line, "bucket series without _sum and _count");
      }
    }
    if (strcmp(suffix, "_count") == 0) {
      const sample_t *inf = NULL;
      for (size_t i = family_start; i < e->n; i++) {
        const char *le = label_of(&e->v[i], "le");
        if (le && strcmp(le, "+Inf") == 0 && same_series(&e->v[i], s))
          inf = &e->v[i];
      }
      if (inf == NULL || inf->value != s->value)
        return expo_fail(e, line, "_count differs from the +Inf bucket");
    }
    e->n++;
  }
  return 0;
}

/* The sample with exactly these labels (pairs of name and value, then NULL). */
static const sample_t *find_sample(const expo_t *e, const char *name, ...) {
  for (size_t i = 0; i < e->n; i++) {
    const sample_t *s = &e->v[i];
    if (strcmp(s->name, name) != 0)
      continue;
    va_list ap;
    va_start(ap, name);
    int n = 0, ok = 1;
    for (const char *k; (k = va_arg(ap, const char *)) != NULL; n++) {
      const char *v = va_arg(ap, const char *), *have = label_of(s, k);
      if (have == NULL || strcmp(have, v) != 0)
        ok = 0;
    }
    va_end(ap);
    if (ok && n == s->nlabels)
      return s;
  }
  return NULL;
}

#define VAL(e, ...) (find_sample((e), __VA_ARGS__, NULL) ? find_sample((e), __VA_ARGS__, NULL)->value : NAN)

static char *render(void) {
  tg_buf_t b = {0};
  if (tg_metrics_render(&b) != 0)
    return NULL;
  return b.data ? b.data : strdup("");
}

/* Renders and parses; a parse error fails the calling test. */
#define RENDER_PARSE(text, e)                                                                  \
  do {                                                                                         \
    text = render();                                                                           \
    CHECK(text != NULL);                                                                       \
    if (parse_expo(text, &(e)) != 0) {                                                         \
      fprintf(stderr, "  %s\n%s", (e).err, text);                                              \
      CHECK(!"exposition parses");                                                             \
    }                                                                                          \
  } while (0)

TEST(counter_exact) {
  tg_metrics_reset();
  const char *names[] = {"route", "code", NULL};
  tg_metric_t *c = tg_metric_new(TG_METRIC_COUNTER, "tg_requests_total", "Requests served.",
                                 names, NULL, 0);
  CHECK(c != NULL);
  tg_counter_add(c, (const char *[]){"/a", "200"}, 1);
  tg_counter_add(c, (const char *[]){"/a", "200"}, 41);
  tg_counter_add(c, (const char *[]){"/a", "500"}, 3);
  tg_counter_add(c, (const char *[]){"/b", "200"}, UINT64_C(9007199254740992));
  tg_counter_add(c, (const char *[]){"/a", "200"}, 0);
  char *text;
  expo_t e;
  RENDER_PARSE(text, e);
  CHECK(strstr(text, "# HELP tg_requests_total Requests served.\n"
                     "# TYPE tg_requests_total counter\n") == text);
  /* Sorted by label values, whatever the order of first use. */
  CHECK(strstr(text, "tg_requests_total{route=\"/a\",code=\"200\"} 42\n"
                     "tg_requests_total{route=\"/a\",code=\"500\"} 3\n"
                     "tg_requests_total{route=\"/b\",code=\"200\"} 9007199254740992\n") != NULL);
  CHECK_INT(e.n, 3);
  CHECK(VAL(&e, "tg_requests_total", "route", "/a", "code", "500") == 3);
  free(text);
  free(e.v);
}

TEST(unlabelled_families_render_zero) {
  tg_metrics_reset();
  CHECK(tg_metric_new(TG_METRIC_COUNTER, "tg_a_total", "A.", NULL, NULL, 0) != NULL);
  CHECK(tg_metric_new(TG_METRIC_GAUGE, "tg_b", "B.", NULL, NULL, 0) != NULL);
  const char *labels[] = {"x", NULL};
  CHECK(tg_metric_new(TG_METRIC_COUNTER, "tg_c_total", "C.", labels, NULL, 0) != NULL);
  CHECK(tg_metric_new(TG_METRIC_HISTOGRAM, "tg_d_seconds", "D.", NULL, (double[]){1, 2}, 2) !=
        NULL);
  char *text;
  expo_t e;
  RENDER_PARSE(text, e);
  CHECK_STR(text, "# HELP tg_a_total A.\n# TYPE tg_a_total counter\ntg_a_total 0\n"
                  "# HELP tg_b B.\n# TYPE tg_b gauge\ntg_b 0\n"
                  "# HELP tg_c_total C.\n# TYPE tg_c_total counter\n"
                  "# HELP tg_d_seconds D.\n# TYPE tg_d_seconds histogram\n"
                  "tg_d_seconds_bucket{le=\"1\"} 0\ntg_d_seconds_bucket{le=\"2\"} 0\n"
                  "tg_d_seconds_bucket{le=\"+Inf\"} 0\ntg_d_seconds_sum 0\ntg_d_seconds_count 0\n");
  free(text);
  free(e.v);
}

TEST(gauge_values_and_formatting) {
  tg_metrics_reset();
  const char *names[] = {"k", NULL};
  tg_metric_t *g = tg_metric_new(TG_METRIC_GAUGE, "tg_value", "Values.", names, NULL, 0);
  CHECK(g != NULL);
  tg_gauge_set(g, (const char *[]){"tenth"}, 0.1);
  tg_gauge_set(g, (const char *[]){"third"}, 1.0 / 3);
  tg_gauge_set(g, (const char *[]){"big"}, 1e300);
  tg_gauge_set(g, (const char *[]){"int"}, 3);
  tg_gauge_set(g, (const char *[]){"neg"}, -2.5);
  tg_gauge_set(g, (const char *[]){"nan"}, NAN);
  tg_gauge_set(g, (const char *[]){"inf"}, INFINITY);
  tg_gauge_set(g, (const char *[]){"minf"}, -INFINITY);
  tg_gauge_set(g, (const char *[]){"tiny"}, 5e-324);
  tg_gauge_set(g, (const char *[]){"acc"}, 10);
  tg_gauge_add(g, (const char *[]){"acc"}, -2.5);
  tg_gauge_add(g, (const char *[]){"acc"}, 0.5);
  tg_gauge_add(g, (const char *[]){"fresh"}, 7);
  tg_gauge_set(g, (const char *[]){"last"}, 1);
  tg_gauge_set(g, (const char *[]){"last"}, 2);
  char *text;
  expo_t e;
  RENDER_PARSE(text, e);
  CHECK(strstr(text, "tg_value{k=\"tenth\"} 0.1\n"));
  CHECK(strstr(text, "tg_value{k=\"third\"} 0.3333333333333333\n"));
  CHECK(strstr(text, "tg_value{k=\"big\"} 1e+300\n"));
  CHECK(strstr(text, "tg_value{k=\"int\"} 3\n"));
  CHECK(strstr(text, "tg_value{k=\"neg\"} -2.5\n"));
  CHECK(strstr(text, "tg_value{k=\"nan\"} NaN\n"));
  CHECK(strstr(text, "tg_value{k=\"inf\"} +Inf\n"));
  CHECK(strstr(text, "tg_value{k=\"minf\"} -Inf\n"));
  CHECK(strstr(text, "tg_value{k=\"acc\"} 8\n"));
  CHECK(strstr(text, "tg_value{k=\"fresh\"} 7\n"));
  CHECK(strstr(text, "tg_value{k=\"last\"} 2\n"));
  /* Every value reads back to the exact double. */
  CHECK(VAL(&e, "tg_value", "k", "third") == 1.0 / 3);
  CHECK(VAL(&e, "tg_value", "k", "tiny") == 5e-324);
  CHECK(VAL(&e, "tg_value", "k", "tenth") == 0.1);
  CHECK(isnan(find_sample(&e, "tg_value", "k", "nan", NULL)->value));
  CHECK_INT(e.n, 12);
  free(text);
  free(e.v);
}

TEST(histogram_exact) {
  tg_metrics_reset();
  const char *names[] = {"route", NULL};
  tg_metric_t *h = tg_metric_new(TG_METRIC_HISTOGRAM, "tg_latency_seconds", "Latency.", names,
                                 (double[]){0.1, 1, 10}, 3);
  CHECK(h != NULL);
  const char *r[] = {"/x"};
  tg_histogram_observe(h, r, 0.05);
  tg_histogram_observe(h, r, 0.1); /* le is inclusive */
  tg_histogram_observe(h, r, 0.5);
  tg_histogram_observe(h, r, 5);
  tg_histogram_observe(h, r, 50);
  tg_histogram_observe(h, r, -1);
  char *text;
  expo_t e;
  RENDER_PARSE(text, e);
  CHECK(strstr(text, "tg_latency_seconds_bucket{route=\"/x\",le=\"0.1\"} 3\n"
                     "tg_latency_seconds_bucket{route=\"/x\",le=\"1\"} 4\n"
                     "tg_latency_seconds_bucket{route=\"/x\",le=\"10\"} 5\n"
                     "tg_latency_seconds_bucket{route=\"/x\",le=\"+Inf\"} 6\n"
                     "tg_latency_seconds_sum{route=\"/x\"} 54.65\n"
                     "tg_latency_seconds_count{route=\"/x\"} 6\n") != NULL);
  free(text);
  free(e.v);

  /* Default buckets, and NaN counted in +Inf only. */
  tg_metric_t *d = tg_metric_new(TG_METRIC_HISTOGRAM, "tg_default_seconds", "Defaults.", NULL,
                                 NULL, 0);
  CHECK(d != NULL);
  tg_histogram_observe(d, NULL, 0.003);
  tg_histogram_observe(d, NULL, NAN);
  RENDER_PARSE(text, e);
  CHECK(VAL(&e, "tg_default_seconds_bucket", "le", "0.0005") == 0);
  CHECK(VAL(&e, "tg_default_seconds_bucket", "le", "0.0025") == 0);
  CHECK(VAL(&e, "tg_default_seconds_bucket", "le", "0.005") == 1);
  CHECK(VAL(&e, "tg_default_seconds_bucket", "le", "10") == 1);
  CHECK(VAL(&e, "tg_default_seconds_bucket", "le", "+Inf") == 2);
  CHECK(VAL(&e, "tg_default_seconds_count") == 2);
  CHECK(isnan(VAL(&e, "tg_default_seconds_sum")));
  free(text);
  free(e.v);
}

TEST(label_escaping) {
  tg_metrics_reset();
  const char *names[] = {"v", NULL};
  tg_metric_t *c = tg_metric_new(TG_METRIC_COUNTER, "tg_escape_total",
                                 "Help with \\ backslash\nand newline.", names, NULL, 0);
  CHECK(c != NULL);
  const char *raw = "a\"b\\c\nd}e,f=g";
  tg_counter_add(c, (const char *[]){raw}, 2);
  tg_counter_add(c, (const char *[]){"caf\xc3\xa9 \xe2\x82\xac"}, 1); /* valid UTF-8 kept */
  tg_counter_add(c, (const char *[]){"bad\xff"}, 1);
  tg_counter_add(c, (const char *[]){"bad\xfe"}, 4); /* repairs to the same label: merged */
  tg_counter_add(c, (const char *[]){NULL}, 5);     /* NULL counts as "" */
  tg_counter_add(c, (const char *[]){""}, 1);
  char *text;
  expo_t e;
  RENDER_PARSE(text, e);
  CHECK(strstr(text, "# HELP tg_escape_total Help with \\\\ backslash\\nand newline.\n"));
  CHECK(strstr(text, "tg_escape_total{v=\"a\\\"b\\\\c\\nd}e,f=g\"} 2\n"));
  CHECK(VAL(&e, "tg_escape_total", "v", raw) == 2);
  CHECK(VAL(&e, "tg_escape_total", "v", "caf\xc3\xa9 \xe2\x82\xac") == 1);
  CHECK(VAL(&e, "tg_escape_total", "v", "bad\xef\xbf\xbd") == 5);
  CHECK(VAL(&e, "tg_escape_total", "v", "") == 6);
  CHECK_INT(e.n, 4);
  free(text);
  free(e.v);
}

TEST(declaration_rules) {
  tg_metrics_reset();
  const char *ab[] = {"a", "b", NULL}, *ba[] = {"b", "a", NULL};
  tg_metric_t *c = tg_metric_new(TG_METRIC_COUNTER, "tg_x_total", "X.", ab, NULL, 0);
  CHECK(c != NULL);
  CHECK(tg_metric_new(TG_METRIC_COUNTER, "tg_x_total", "X again.", ab, NULL, 0) == c);
  CHECK(tg_metric_new(TG_METRIC_GAUGE, "tg_x_total", "X.", ab, NULL, 0) == NULL);
  CHECK(tg_metric_new(TG_METRIC_COUNTER, "tg_x_total", "X.", ba, NULL, 0) == NULL);
  CHECK(tg_metric_new(TG_METRIC_COUNTER, "tg_x_total", "X.", NULL, NULL, 0) == NULL);
  CHECK(tg_metric_new(TG_METRIC_COUNTER, "9lives", "", NULL, NULL, 0) == NULL);
  CHECK(tg_metric_new(TG_METRIC_COUNTER, "has-dash", "", NULL, NULL, 0) == NULL);
  CHECK(tg_metric_new(TG_METRIC_COUNTER, "", "", NULL, NULL, 0) == NULL);
  CHECK(tg_metric_new(TG_METRIC_COUNTER, NULL, "", NULL, NULL, 0) == NULL);
  CHECK(tg_metric_new(TG_METRIC_COUNTER, "ns:sub_total", NULL, NULL, NULL, 0) != NULL);
  CHECK(tg_metric_new(TG_METRIC_COUNTER, "tg_l1", "", (const char *[]){"a:b", NULL}, NULL, 0) ==
        NULL);
  CHECK(tg_metric_new(TG_METRIC_COUNTER, "tg_l2", "", (const char *[]){"__x", NULL}, NULL, 0) ==
        NULL);
  CHECK(tg_metric_new(TG_METRIC_COUNTER, "tg_l3", "", (const char *[]){"a", "a", NULL}, NULL,
                      0) == NULL);
  CHECK(tg_metric_new(TG_METRIC_COUNTER, "tg_l4", "",
                      (const char *[]){"a", "b", "c", "d", "e", NULL}, NULL, 0) == NULL);
  CHECK(tg_metric_new(TG_METRIC_COUNTER, "tg_l5", "", (const char *[]){"a", "b", "c", "d", NULL},
                      NULL, 0) != NULL);
  CHECK(tg_metric_new(TG_METRIC_COUNTER, "tg_l6", "", (const char *[]){"le", NULL}, NULL, 0) !=
        NULL);
  CHECK(tg_metric_new(TG_METRIC_HISTOGRAM, "tg_h1", "", (const char *[]){"le", NULL}, NULL, 0) ==
        NULL);
  CHECK(tg_metric_new(TG_METRIC_HISTOGRAM, "tg_h2", "", NULL, (double[]){1, 1}, 2) == NULL);
  CHECK(tg_metric_new(TG_METRIC_HISTOGRAM, "tg_h3", "", NULL, (double[]){2, 1}, 2) == NULL);
  CHECK(tg_metric_new(TG_METRIC_HISTOGRAM, "tg_h4", "", NULL, (double[]){1, NAN}, 2) == NULL);
  tg_metric_t *h5 = tg_metric_new(TG_METRIC_HISTOGRAM, "tg_h5", "", NULL,
                                  (double[]){-1, 0, INFINITY}, 3);
  CHECK(h5 != NULL);
  CHECK(tg_metric_new(TG_METRIC_HISTOGRAM, "tg_h5", "", NULL, (double[]){-1, 0}, 2) == h5);
  CHECK(tg_metric_new(TG_METRIC_HISTOGRAM, "tg_h5", "", NULL, (double[]){-1, 1}, 2) == NULL);
  CHECK(tg_metric_new((tg_metric_type_t)7, "tg_bad_type", "", NULL, NULL, 0) == NULL);

  /* Updates of the wrong type are ignored, not misread. */
  tg_gauge_set(c, (const char *[]){"1", "2"}, 5);
  tg_histogram_observe(c, (const char *[]){"1", "2"}, 5);
  tg_counter_add(NULL, NULL, 1);
  tg_histogram_observe(h5, NULL, -1);
  char *text;
  expo_t e;
  RENDER_PARSE(text, e);
  CHECK(find_sample(&e, "tg_x_total", "a", "1", "b", "2", NULL) == NULL);
  CHECK(strstr(text, "# HELP tg_x_total X.\n"));
  CHECK(strstr(text, "# HELP ns:sub_total \n"));
  CHECK(strstr(text, "tg_h5_bucket{le=\"-1\"} 1\ntg_h5_bucket{le=\"0\"} 1\n"
                     "tg_h5_bucket{le=\"+Inf\"} 1\n"));
  /* Families in declaration order. */
  char *x = strstr(text, "# TYPE tg_x_total"), *ns = strstr(text, "# TYPE ns:sub_total"),
       *l6 = strstr(text, "# TYPE tg_l6"), *h5t = strstr(text, "# TYPE tg_h5");
  CHECK(x && ns && l6 && h5t && x < ns && ns < l6 && l6 < h5t);
  free(text);
  free(e.v);
}

TEST(reset_then_reuse_in_same_thread) {
  tg_metrics_reset();
  tg_metric_t *c = tg_metric_new(TG_METRIC_COUNTER, "tg_r_total", "R.", NULL, NULL, 0);
  CHECK(c != NULL);
  tg_counter_add(c, NULL, 5);
  tg_metrics_reset();
  tg_metric_t *c2 = tg_metric_new(TG_METRIC_COUNTER, "tg_r2_total", "R2.", NULL, NULL, 0);
  tg_metric_t *c3 = tg_metric_new(TG_METRIC_COUNTER, "tg_r3_total", "R3.", NULL, NULL, 0);
  CHECK(c2 != NULL && c3 != NULL);
  tg_counter_add(c3, NULL, 2);
  tg_counter_add(c2, NULL, 1);
  char *text;
  expo_t e;
  RENDER_PARSE(text, e);
  CHECK(strstr(text, "tg_r_total") == NULL);
  CHECK(VAL(&e, "tg_r2_total") == 1);
  CHECK(VAL(&e, "tg_r3_total") == 2);
  free(text);
  free(e.v);
}

TEST(many_series_in_one_shard) {
  /* Enough series to grow the owner's hash table several times. */
  tg_metrics_reset();
  const char *names[] = {"id", NULL};
  tg_metric_t *c = tg_metric_new(TG_METRIC_COUNTER, "tg_ids_total", "Ids.", names, NULL, 0);
  CHECK(c != NULL);
  char id[16];
  for (int round = 1; round <= 2; round++)
    for (int i = 0; i < 2000; i++) {
      snprintf(id, sizeof id, "%05d", i);
      tg_counter_add(c, (const char *[]){id}, (uint64_t)i);
    }
  char *text;
  expo_t e;
  RENDER_PARSE(text, e);
  CHECK_INT(e.n, 2000);
  for (int i = 0; i < 2000; i++) {
    snprintf(id, sizeof id, "%05d", i);
    CHECK(strcmp(label_of(&e.v[i], "id"), id) == 0); /* sorted */
    CHECK(e.v[i].value == 2.0 * i);
  }
  free(text);
  free(e.v);
}

#define WORKERS 4
#define ITERS 100000

static tg_metric_t *conc_counter, *conc_hist, *conc_gauge;
static atomic_int workers_done;
static const char *const routes[3] = {"/a", "/b", "/c\"q"};

static void *worker(void *arg) {
  (void)arg;
  for (int i = 0; i < ITERS; i++) {
    const char *route = routes[i % 3];
    tg_counter_add(conc_counter, (const char *[]){route, i % 2 ? "200" : "500"}, 1);
    tg_histogram_observe(conc_hist, (const char *[]){route}, (double)(i % 10));
    tg_gauge_add(conc_gauge, NULL, 1);
  }
  atomic_fetch_add(&workers_done, 1);
  return NULL;
}

typedef struct {
  int scrapes;
  char err[600];
} scrape_result_t;

static void *scraper(void *arg) {
  scrape_result_t *r = arg;
  double last[3] = {0, 0, 0};
  while (atomic_load(&workers_done) < WORKERS) {
    char *text = render();
    expo_t e;
    if (text == NULL || parse_expo(text, &e) != 0) {
      snprintf(r->err, sizeof r->err, "%s", text ? e.err : "render failed");
      free(text);
      return NULL;
    }
    /* Counters never go backwards between scrapes. */
    for (int k = 0; k < 3; k++) {
      const sample_t *s = find_sample(&e, "tg_conc_total", "route", routes[k], "code", "200", NULL);
      double v = s ? s->value : 0;
      if (v < last[k]) {
        snprintf(r->err, sizeof r->err, "counter went backwards");
        free(text);
        free(e.v);
        return NULL;
      }
      last[k] = v;
    }
    r->scrapes++;
    free(text);
    free(e.v);
  }
  return NULL;
}

TEST(threads_with_concurrent_scrapes) {
  tg_metrics_reset();
  conc_counter = tg_metric_new(TG_METRIC_COUNTER, "tg_conc_total", "Concurrent.",
                               (const char *[]){"route", "code", NULL}, NULL, 0);
  conc_hist = tg_metric_new(TG_METRIC_HISTOGRAM, "tg_conc_seconds", "Concurrent histogram.",
                            (const char *[]){"route", NULL}, (double[]){2.5, 5, 7.5}, 3);
  conc_gauge = tg_metric_new(TG_METRIC_GAUGE, "tg_conc_gauge", "Concurrent gauge.", NULL, NULL, 0);
  CHECK(conc_counter && conc_hist && conc_gauge);
  atomic_store(&workers_done, 0);

  pthread_t w[WORKERS], s;
  scrape_result_t res = {0};
  CHECK(pthread_create(&s, NULL, scraper, &res) == 0);
  for (int i = 0; i < WORKERS; i++)
    CHECK(pthread_create(&w[i], NULL, worker, NULL) == 0);
  for (int i = 0; i < WORKERS; i++)
    pthread_join(w[i], NULL);
  pthread_join(s, NULL);
  if (res.err[0])
    fprintf(stderr, "  scraper: %s\n", res.err);
  CHECK(res.err[0] == '\0');
  CHECK(res.scrapes > 0);
  printf("  (%d concurrent scrapes)\n", res.scrapes);

  /* The workers have exited; their shards must still count. */
  char *text;
  expo_t e;
  RENDER_PARSE(text, e);
  for (int k = 0; k < 3; k++) {
    /* Per worker, i in [0, ITERS) with i % 3 == k and a given parity of i. */
    long odd = 0, even = 0;
    for (int i = k; i < ITERS; i += 3)
      if (i % 2)
        odd++;
      else
        even++;
    CHECK(VAL(&e, "tg_conc_total", "route", routes[k], "code", "200") == (double)odd * WORKERS);
    CHECK(VAL(&e, "tg_conc_total", "route", routes[k], "code", "500") == (double)even * WORKERS);
  }
  double per_route[3] = {33334, 33333, 33333};
  for (int k = 0; k < 3; k++) {
    double n = per_route[k] * WORKERS;
    CHECK(VAL(&e, "tg_conc_seconds_count", "route", routes[k]) == n);
  }
  /* Values i % 10 across all routes: 3 of 10 are <= 2.5, 6 <= 5, 8 <= 7.5. */
  double le25 = 0, le5 = 0, le75 = 0, inf = 0, sum = 0;
  for (int k = 0; k < 3; k++) {
    le25 += VAL(&e, "tg_conc_seconds_bucket", "route", routes[k], "le", "2.5");
    le5 += VAL(&e, "tg_conc_seconds_bucket", "route", routes[k], "le", "5");
    le75 += VAL(&e, "tg_conc_seconds_bucket", "route", routes[k], "le", "7.5");
    inf += VAL(&e, "tg_conc_seconds_bucket", "route", routes[k], "le", "+Inf");
    sum += VAL(&e, "tg_conc_seconds_sum", "route", routes[k]);
  }
  CHECK(le25 == 0.3 * ITERS * WORKERS);
  CHECK(le5 == 0.6 * ITERS * WORKERS);
  CHECK(le75 == 0.8 * ITERS * WORKERS);
  CHECK(inf == (double)ITERS * WORKERS);
  CHECK(sum == 4.5 * ITERS * WORKERS);
  CHECK(VAL(&e, "tg_conc_gauge") == (double)ITERS * WORKERS);
  free(text);
  free(e.v);
}

static tg_metric_t *gauge_race;

static void *gauge_setter(void *arg) {
  double v = (double)(intptr_t)arg;
  for (int i = 0; i < 10000; i++)
    tg_gauge_set(gauge_race, (const char *[]){"shared"}, v);
  return NULL;
}

static void *short_lived(void *arg) {
  tg_counter_add(arg, NULL, 1);
  return NULL;
}

TEST(gauge_set_from_threads_is_one_value) {
  tg_metrics_reset();
  gauge_race = tg_metric_new(TG_METRIC_GAUGE, "tg_race", "Race.", (const char *[]){"k", NULL},
                             NULL, 0);
  CHECK(gauge_race != NULL);
  pthread_t t[4];
  for (intptr_t i = 0; i < 4; i++)
    CHECK(pthread_create(&t[i], NULL, gauge_setter, (void *)(i + 1)) == 0);
  for (int i = 0; i < 4; i++)
    pthread_join(t[i], NULL);
  char *text;
  expo_t e;
  RENDER_PARSE(text, e);
  CHECK_INT(e.n, 1);
  double v = VAL(&e, "tg_race", "k", "shared");
  CHECK(v == 1 || v == 2 || v == 3 || v == 4);
  free(text);
  free(e.v);
}

/* An *_info gauge keeps one series per subject: the replaced label set
 * leaves the exposition, and may come back later. */
TEST(gauge_remove_hides_a_series) {
  tg_metrics_reset();
  tg_metric_t *g = tg_metric_new(TG_METRIC_GAUGE, "tg_version_info", "Versions.",
                                 (const char *[]){"tenant", "version", NULL}, NULL, 0);
  tg_metric_t *c = tg_metric_new(TG_METRIC_COUNTER, "tg_kept_total", "Kept.",
                                 (const char *[]){"k", NULL}, NULL, 0);
  CHECK(g != NULL && c != NULL);
  tg_gauge_set(g, (const char *[]){"news", "aaa"}, 1);
  tg_gauge_set(g, (const char *[]){"docs", "ccc"}, 1);
  CHECK_INT(tg_gauge_remove(g, (const char *[]){"news", "aaa"}), 1);
  CHECK_INT(tg_gauge_remove(g, (const char *[]){"news", "aaa"}), 0); /* already gone */
  CHECK_INT(tg_gauge_remove(g, (const char *[]){"news", "never"}), 0);
  tg_gauge_set(g, (const char *[]){"news", "bbb"}, 1);
  tg_counter_add(c, (const char *[]){"x"}, 1);
  CHECK_INT(tg_gauge_remove(c, (const char *[]){"x"}), 0); /* not a gauge: kept */
  char *text;
  expo_t e;
  RENDER_PARSE(text, e);
  CHECK(strstr(text, "version=\"aaa\"") == NULL);
  CHECK(strstr(text, "tg_version_info{tenant=\"news\",version=\"bbb\"} 1\n") != NULL);
  CHECK(strstr(text, "tg_version_info{tenant=\"docs\",version=\"ccc\"} 1\n") != NULL);
  CHECK(strstr(text, "tg_kept_total{k=\"x\"} 1\n") != NULL);
  CHECK_INT(e.n, 3);
  free(text);
  free(e.v);

  /* Back (a rollback to that version): shown again with its new value; an
   * add on a removed series starts from 0, not from its old value. */
  tg_gauge_set(g, (const char *[]){"news", "aaa"}, 1);
  CHECK_INT(tg_gauge_remove(g, (const char *[]){"news", "bbb"}), 1);
  tg_gauge_set(g, (const char *[]){"docs", "ddd"}, 5);
  CHECK_INT(tg_gauge_remove(g, (const char *[]){"docs", "ddd"}), 1);
  tg_gauge_add(g, (const char *[]){"docs", "ddd"}, 2);
  RENDER_PARSE(text, e);
  CHECK(strstr(text, "tg_version_info{tenant=\"news\",version=\"aaa\"} 1\n") != NULL);
  CHECK(strstr(text, "version=\"bbb\"") == NULL);
  CHECK(VAL(&e, "tg_version_info", "tenant", "docs", "version", "ddd") == 2);
  CHECK_INT(e.n, 4);
  free(text);
  free(e.v);
}

TEST(short_lived_threads) {
  /* Threads that come and go: each one's count survives it. */
  tg_metrics_reset();
  tg_metric_t *c = tg_metric_new(TG_METRIC_COUNTER, "tg_short_total", "Short.", NULL, NULL, 0);
  CHECK(c != NULL);
  for (int i = 0; i < 200; i++) {
    pthread_t t;
    CHECK(pthread_create(&t, NULL, short_lived, c) == 0);
    pthread_join(t, NULL);
  }
  char *text;
  expo_t e;
  RENDER_PARSE(text, e);
  CHECK(VAL(&e, "tg_short_total") == 200);
  free(text);
  free(e.v);
}

TEST(render_failure_leaves_buffer) {
  tg_metrics_reset();
  CHECK(tg_metric_new(TG_METRIC_COUNTER, "tg_p_total", "P.", NULL, NULL, 0) != NULL);
  tg_buf_t b = {0};
  CHECK(tg_buf_puts(&b, "prefix\n") == 0);
  CHECK(tg_metrics_render(&b) == 0);
  CHECK(strncmp(b.data, "prefix\n# HELP tg_p_total", 24) == 0);
  tg_buf_free(&b);
}

TEST(promtool_accepts) {
  tg_metrics_reset();
  tg_metric_t *c = tg_metric_new(TG_METRIC_COUNTER, "tg_prom_requests_total", "Requests \\ \"x\".",
                                 (const char *[]){"route", "code", NULL}, NULL, 0);
  tg_metric_t *g = tg_metric_new(TG_METRIC_GAUGE, "tg_prom_temperature_celsius", "Temp.\nNext.",
                                 (const char *[]){"where", NULL}, NULL, 0);
  tg_metric_t *h = tg_metric_new(TG_METRIC_HISTOGRAM, "tg_prom_latency_seconds", "Latency.",
                                 (const char *[]){"route", NULL}, NULL, 0);
  tg_metric_t *u = tg_metric_new(TG_METRIC_GAUGE, "tg_prom_up", "Up.", NULL, NULL, 0);
  CHECK(c && g && h && u);
  tg_counter_add(c, (const char *[]){"/a\"b\\c\nd", "200"}, 3);
  tg_counter_add(c, (const char *[]){"bad\xff\xc3", "500"}, 1);
  tg_gauge_set(g, (const char *[]){"inside"}, 21.5);
  tg_gauge_set(g, (const char *[]){"space"}, -270.45);
  tg_gauge_set(g, (const char *[]){"nan"}, NAN);
  tg_gauge_set(g, (const char *[]){"inf"}, -INFINITY);
  tg_gauge_set(g, (const char *[]){"small"}, 1e-9);
  for (int i = 0; i < 100; i++)
    tg_histogram_observe(h, (const char *[]){i % 2 ? "/x" : "/y"}, i * 0.0137);
  char *text = render();
  CHECK(text != NULL);

  /* No promtool is a failed install (deploy/dev.sh installs prometheus), never a skip. */
  if (access("/usr/bin/promtool", X_OK) != 0) {
    free(text);
    CHECK(!"promtool is at /usr/bin/promtool (Debian package prometheus)");
  }
  char path[] = "/tmp/tg_metrics_test_XXXXXX";
  int fd = mkstemp(path);
  CHECK(fd >= 0);
  CHECK(write(fd, text, strlen(text)) == (ssize_t)strlen(text));
  close(fd);
  char cmd[256];
  snprintf(cmd, sizeof cmd, "/usr/bin/promtool check metrics < %s 2>&1", path);
  FILE *p = popen(cmd, "r");
  CHECK(p != NULL);
  char out[2048] = "";
  size_t n = fread(out, 1, sizeof out - 1, p);
  out[n] = '\0';
  int status = pclose(p);
  unlink(path);
  if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0))
    fprintf(stderr, "  promtool said:\n%s\n  on:\n%s", out, text);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  free(text);
}
