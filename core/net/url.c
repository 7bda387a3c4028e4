#include "net/url.h"

#include <arpa/inet.h>
#include <errno.h>
#include <string.h>
#include <strings.h>

static int is_host_char(char ch) {
  return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
         ch == '-' || ch == '.' || ch == '_';
}

int tg_url_parse(const char *s, tg_url_t *out) {
  tg_url_t url = {0}, *u = &url;
  for (const char *p = s; *p; p++)
    if ((unsigned char)*p <= 0x20 || *p == 0x7f)
      return -EINVAL;
  const char *p;
  if (strncasecmp(s, "http://", 7) == 0) {
    p = s + 7;
  } else if (strncasecmp(s, "https://", 8) == 0) {
    p = s + 8;
    u->tls = 1;
  } else {
    return -EINVAL;
  }
  const char *auth_end = p + strcspn(p, "/?#");
  const char *port_start = NULL;
  if (memchr(p, '@', (size_t)(auth_end - p)))
    return -EINVAL; /* credentials in URLs are not supported */
  if (*p == '[') {
    const char *close = memchr(p, ']', (size_t)(auth_end - p));
    if (close == NULL)
      return -EINVAL;
    u->host = p + 1;
    u->host_len = (size_t)(close - u->host);
    u->bracketed = 1;
    char tmp[INET6_ADDRSTRLEN];
    unsigned char addr[16];
    if (u->host_len == 0 || u->host_len >= sizeof tmp)
      return -EINVAL;
    memcpy(tmp, u->host, u->host_len);
    tmp[u->host_len] = '\0';
    if (inet_pton(AF_INET6, tmp, addr) != 1)
      return -EINVAL;
    if (close + 1 < auth_end) {
      if (close[1] != ':')
        return -EINVAL;
      port_start = close + 2;
    }
  } else {
    const char *colon = memchr(p, ':', (size_t)(auth_end - p));
    u->host = p;
    u->host_len = (size_t)((colon ? colon : auth_end) - p);
    if (u->host_len == 0 || u->host_len > 253)
      return -EINVAL;
    for (size_t i = 0; i < u->host_len; i++)
      if (!is_host_char(u->host[i]))
        return -EINVAL;
    if (colon)
      port_start = colon + 1;
  }
  unsigned long port = u->tls ? 443 : 80;
  if (port_start && port_start < auth_end) {
    port = 0;
    for (const char *q = port_start; q < auth_end; q++) {
      if (*q < '0' || *q > '9' || port > 65535)
        return -EINVAL;
      port = port * 10 + (unsigned long)(*q - '0');
    }
    if (port == 0 || port > 65535)
      return -EINVAL;
  }
  u->port = (uint16_t)port;
  u->target = auth_end;
  u->target_len = strcspn(auth_end, "#");
  *out = url;
  return 0;
}
