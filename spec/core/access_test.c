/* gateway/access.h: which requests the access log writes, and its line. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>
#include <uv.h>

#include "base/log.h"
#include "gateway/access.h"
#include "test.h"

TEST(sampling_obeys_the_configuration) {
  tg_config_access_log_t off = {0};
  CHECK(!tg_access_sampled(&off, 1, 0, 500));
  tg_config_access_log_t all = {true, 1.0, false};
  tg_config_access_log_t none = {true, 0.0, false};
  tg_config_access_log_t errs = {true, 0.0, true};
  for (uint64_t id = 1; id < 100; id++) {
    CHECK(tg_access_sampled(&all, id, 0, 200));
    CHECK(!tg_access_sampled(&none, id, 0, 200));
    CHECK(!tg_access_sampled(&none, id, 0, 503));
    CHECK(!tg_access_sampled(&errs, id, 0, 200));
    CHECK(!tg_access_sampled(&errs, id, 0, 304));
    CHECK(tg_access_sampled(&errs, id, 0, 402));
    CHECK(tg_access_sampled(&errs, id, 1, 500));
  }
}

TEST(a_share_of_requests_is_sampled) {
  tg_config_access_log_t quarter = {true, 0.25, false};
  int n = 0;
  for (uint64_t id = 1; id <= 10000; id++)
    n += tg_access_sampled(&quarter, id, (int)(id % 4), 200);
  /* 10000 draws at p = 0.25: sd 43; 2000..3000 is over 11 sd either way. */
  CHECK(n > 2000 && n < 3000);
}

TEST(the_line_has_the_notes_and_no_query) {
  char path[] = "/tmp/tg-access-XXXXXX";
  int fd = mkstemp(path);
  CHECK(fd >= 0);
  tg_log_set_fd(fd);
  tg_config_access_log_t all = {true, 1.0, true};
  tg_http_req_t req;
  memset(&req, 0, sizeof req);
  snprintf(req.request_id, sizeof req.request_id, "rid-1");
  req.method_name = "GET";
  req.path = "/article/1";
  req.query = "token=sekrit-query";
  req.start_ns = uv_hrtime();
  snprintf(req.note.tenant, sizeof req.note.tenant, "news");
  req.note.priced = true;
  req.note.price = 1500;
  snprintf(req.note.currency, sizeof req.note.currency, "USD");
  snprintf(req.note.payer, sizeof req.note.payer, "0x1234\xe2\x80\xa6" "abcd");
  tg_access_log(&all, &req, 402, 321);
  tg_log_set_fd(-1);
  char buf[2048] = {0};
  ssize_t n = pread(fd, buf, sizeof buf - 1, 0);
  close(fd);
  unlink(path);
  CHECK(n > 0);
  CHECK(strchr(buf, '\n') == buf + n - 1); /* one line */
  CHECK(strstr(buf, "sekrit") == NULL);
  json_t *o = json_loads(buf, 0, NULL);
  CHECK(o != NULL);
  CHECK_STR(json_string_value(json_object_get(o, "msg")), "access");
  CHECK_STR(json_string_value(json_object_get(o, "request_id")), "rid-1");
  CHECK_STR(json_string_value(json_object_get(o, "tenant")), "news");
  CHECK_STR(json_string_value(json_object_get(o, "route")), "http");
  CHECK_STR(json_string_value(json_object_get(o, "path")), "/article/1");
  CHECK_STR(json_string_value(json_object_get(o, "status")), "402");
  CHECK_STR(json_string_value(json_object_get(o, "price")), "1500");
  CHECK_STR(json_string_value(json_object_get(o, "currency")), "USD");
  CHECK_STR(json_string_value(json_object_get(o, "payer")), "0x1234\xe2\x80\xa6" "abcd");
  CHECK_STR(json_string_value(json_object_get(o, "bytes")), "321");
  CHECK(json_string_value(json_object_get(o, "duration_ms")) != NULL);
  json_decref(o);
}
