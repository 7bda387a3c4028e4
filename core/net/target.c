#include "net/target.h"

#include <arpa/inet.h>
#include <errno.h>
#include <string.h>
#include <strings.h>

static int fail(const char **why, const char *reason) {
  *why = reason;
  return -EINVAL;
}

static int hexval(unsigned char ch) {
  if (ch >= '0' && ch <= '9')
    return ch - '0';
  if (ch >= 'a' && ch <= 'f')
    return ch - 'a' + 10;
  if (ch >= 'A' && ch <= 'F')
    return ch - 'A' + 10;
  return -1;
}

static int is_alnum(unsigned char ch) {
  return (ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z');
}

static int is_unreserved(unsigned char ch) {
  return is_alnum(ch) || ch == '-' || ch == '.' || ch == '_' || ch == '~';
}

static unsigned char lower(unsigned char ch) {
  return ch >= 'A' && ch <= 'Z' ? (unsigned char)(ch + 32) : ch;
}

/* Decodes unreserved %XX, upper-cases the rest and merges runs of '/'. The
 * write index never passes the read index, so out may be in. */
static int decode_path(const char *in, size_t len, char *out, size_t *out_len, const char **why) {
  static const char hex[] = "0123456789ABCDEF";
  size_t w = 0;
  for (size_t i = 0; i < len; i++) {
    unsigned char ch = (unsigned char)in[i];
    if (ch == '%') {
      int hi = i + 2 < len ? hexval((unsigned char)in[i + 1]) : -1;
      int lo = i + 2 < len ? hexval((unsigned char)in[i + 2]) : -1;
      if (hi < 0 || lo < 0)
        return fail(why, "invalid percent-encoding in the request target");
      unsigned char v = (unsigned char)(hi << 4 | lo);
      i += 2;
      if (v == 0)
        return fail(why, "encoded NUL in the request target");
      if (v == '/' || v == '\\')
        return fail(why, "encoded slash in the request target");
      if (is_unreserved(v)) {
        out[w++] = (char)v;
      } else {
        out[w++] = '%';
        out[w++] = hex[v >> 4];
        out[w++] = hex[v & 15];
      }
      continue;
    }
    if (ch < 0x21 || ch > 0x7e || ch == '\\' || ch == '#' || ch == '?')
      return fail(why, "invalid character in the request target");
    if (ch == '/' && w > 0 && out[w - 1] == '/')
      continue;
    out[w++] = (char)ch;
  }
  *out_len = w;
  return 0;
}

/* RFC 3986 5.2.4 over a path that starts with '/' and has no empty segment
 * but maybe the last: in place, the write index never passes the read one. */
static int remove_dots(char *p, size_t len, size_t *out_len, const char **why) {
  size_t r = 0, o = 0, depth = 0;
  while (r < len) {
    size_t start = r + 1;
    const char *slash = memchr(p + start, '/', len - start);
    size_t end = slash ? (size_t)(slash - p) : len;
    size_t n = end - start;
    const char *seg = p + start;
    int last = end == len;
    if (n == 1 && seg[0] == '.') {
      if (last)
        p[o++] = '/';
      r = end;
      continue;
    }
    if (n == 2 && seg[0] == '.' && seg[1] == '.') {
      if (depth == 0)
        return fail(why, "the request target climbs above the root");
      while (p[o - 1] != '/')
        o--;
      o--; /* the '/' that started the popped segment */
      depth--;
      if (last)
        p[o++] = '/';
      r = end;
      continue;
    }
    if ((n >= 2 && seg[0] == '.' && seg[1] == ';') ||
        (n >= 3 && seg[0] == '.' && seg[1] == '.' && seg[2] == ';'))
      return fail(why, "dot segment with parameters in the request target");
    memmove(p + o, p + r, end - r);
    o += end - r;
    if (n > 0)
      depth++;
    r = end;
  }
  *out_len = o;
  return 0;
}

int tg_target_path(const char *in, size_t len, char *out, size_t *out_len, const char **why) {
  if (len == 0 || in[0] != '/')
    return fail(why, "the request target is not an absolute path");
  size_t n;
  int rc = decode_path(in, len, out, &n, why);
  if (rc == 0)
    rc = remove_dots(out, n, &n, why);
  if (rc != 0)
    return rc;
  out[n] = '\0';
  *out_len = n;
  return 0;
}

static int ipv6_literal(const char *in, size_t len, char *out, const char **why) {
  /* in holds the bytes between '[' and ']'. */
  char tmp[INET6_ADDRSTRLEN];
  unsigned char addr[16];
  if (len == 0 || len >= sizeof tmp)
    return fail(why, "invalid IPv6 literal in the host");
  for (size_t i = 0; i < len; i++) {
    unsigned char ch = (unsigned char)in[i];
    if (!(hexval(ch) >= 0 || ch == ':' || ch == '.'))
      return fail(why, ch == '%' ? "IPv6 zone id in the host" : "invalid IPv6 literal in the host");
    tmp[i] = (char)ch;
  }
  tmp[len] = '\0';
  if (inet_pton(AF_INET6, tmp, addr) != 1)
    return fail(why, "invalid IPv6 literal in the host");
  for (size_t i = 0; i < len; i++)
    out[i] = (char)lower((unsigned char)tmp[i]);
  return 0;
}

int tg_target_host(const char *in, size_t len, char *out, size_t *out_len, const char **why) {
  size_t w = 0, i = 0;
  if (len == 0) {
    out[0] = '\0';
    *out_len = 0;
    return 0;
  }
  if (in[0] == '[') {
    const char *close = memchr(in, ']', len);
    if (close == NULL)
      return fail(why, "invalid IPv6 literal in the host");
    size_t n = (size_t)(close - in) - 1;
    char lit[INET6_ADDRSTRLEN];
    if (n >= sizeof lit)
      return fail(why, "invalid IPv6 literal in the host");
    int rc = ipv6_literal(in + 1, n, lit, why);
    if (rc != 0)
      return rc;
    out[w++] = '[';
    memmove(out + w, lit, n);
    w += n;
    out[w++] = ']';
    i = n + 2;
  } else {
    size_t label = 0;
    for (; i < len && in[i] != ':'; i++) {
      unsigned char ch = (unsigned char)in[i];
      if (ch == '.') {
        if (label == 0)
          return fail(why, "empty label in the host");
        label = 0;
      } else if (is_alnum(ch) || ch == '-' || ch == '_') {
        label++;
      } else {
        return fail(why, ch == '@' ? "userinfo in the host" : "invalid character in the host");
      }
      out[w++] = (char)lower(ch);
    }
    if (w == 0)
      return fail(why, "empty host name");
    if (out[w - 1] == '.')
      w--; /* "example.com." names the same host as "example.com" */
    if (w == 0 || w > 253)
      return fail(why, "invalid host name length");
  }
  if (i < len) {
    if (in[i] != ':')
      return fail(why, "invalid character after the host");
    i++;
    size_t digits = len - i;
    if (digits > 5)
      return fail(why, "invalid port in the host");
    unsigned long port = 0;
    for (; i < len; i++) {
      unsigned char ch = (unsigned char)in[i];
      if (ch < '0' || ch > '9')
        return fail(why, ch == '@' ? "userinfo in the host" : "invalid port in the host");
      port = port * 10 + (ch - '0');
    }
    if (port > 65535)
      return fail(why, "port out of range in the host");
    if (digits > 0) {
      /* Without leading zeros: never longer than the digits it replaces. */
      char d[6];
      size_t k = 0;
      do {
        d[k++] = (char)('0' + port % 10);
        port /= 10;
      } while (port);
      out[w++] = ':';
      while (k)
        out[w++] = d[--k];
    }
  }
  out[w] = '\0';
  *out_len = w;
  return 0;
}

/* Query bytes are kept verbatim, but only printable ASCII other than '#'. */
static int check_query(const char *q, size_t n, const char **why) {
  for (size_t i = 0; i < n; i++) {
    unsigned char ch = (unsigned char)q[i];
    if (ch < 0x21 || ch > 0x7e)
      return fail(why, "invalid character in the query");
    if (ch == '#')
      return fail(why, "fragment in the request target");
  }
  return 0;
}

int tg_target_parse(const char *in, size_t len, char *out, tg_target_t *t, const char **why) {
  memset(t, 0, sizeof *t);
  *why = NULL;
  if (len == 1 && in[0] == '*') {
    memcpy(out, "*", 2);
    t->path = out;
    t->path_len = 1;
    t->asterisk = 1;
    return 0;
  }
  const char *p = in, *end = in + len;
  const char *auth = NULL;
  size_t auth_len = 0;
  if (len == 0)
    return fail(why, "empty request target");
  if (in[0] != '/') {
    /* absolute-form: scheme "://" authority path-abempty [ "?" query ] */
    const char *colon = memchr(in, ':', len);
    if (colon == NULL || colon == in || end - colon < 3 || colon[1] != '/' || colon[2] != '/')
      return fail(why, "invalid request target");
    size_t slen = (size_t)(colon - in);
    if (!((slen == 4 && strncasecmp(in, "http", 4) == 0) ||
          (slen == 5 && strncasecmp(in, "https", 5) == 0)))
      return fail(why, "unsupported scheme in the request target");
    auth = colon + 3;
    const char *a = auth;
    while (a < end && *a != '/' && *a != '?' && *a != '#')
      a++;
    auth_len = (size_t)(a - auth);
    if (memchr(auth, '@', auth_len))
      return fail(why, "userinfo in the request target");
    if (auth_len == 0)
      return fail(why, "empty host in the request target");
    p = a;
  }
  const char *qm = memchr(p, '?', (size_t)(end - p));
  const char *hash = memchr(p, '#', (size_t)(end - p));
  if (hash && (qm == NULL || hash < qm))
    return fail(why, "fragment in the request target");
  const char *path_end = qm ? qm : end;
  char *o = out;
  size_t n = 0;
  if (path_end == p) {
    if (auth == NULL)
      return fail(why, "invalid request target");
    memcpy(o, "/", 2); /* "http://host" and "http://host?q" mean path "/" */
    n = 1;
  } else {
    int rc = tg_target_path(p, (size_t)(path_end - p), o, &n, why);
    if (rc != 0)
      return rc;
  }
  t->path = o;
  t->path_len = n;
  o += n + 1;
  if (qm) {
    size_t qn = (size_t)(end - qm - 1);
    if (check_query(qm + 1, qn, why) != 0)
      return -EINVAL;
    memcpy(o, qm + 1, qn);
    o[qn] = '\0';
    t->query = o;
    t->query_len = qn;
    o += qn + 1;
  }
  if (auth) {
    size_t hn;
    int rc = tg_target_host(auth, auth_len, o, &hn, why);
    if (rc != 0)
      return rc;
    t->host = o;
    t->host_len = hn;
  }
  return 0;
}
