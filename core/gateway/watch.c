#include "gateway/watch.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/log.h"
#include "gateway/reload.h"

typedef struct folder {
  uv_fs_event_t ev;
  tg_watch_t *w;
  char dir[1024];           /* as configured: re-resolved at each re-arm */
  int active;               /* 0: failed to start, already closing */
} folder_t;

struct tg_watch {
  tg_policy_registry_t *registry;
  uv_timer_t debounce;
  uint32_t debounce_ms;
  folder_t *folders;
  size_t nfolders;
  size_t open_handles;      /* freed when the last close callback ran */
};

static void on_fs_event(uv_fs_event_t *ev, const char *filename, int events, int status);

/* A folder reached through a symlink (a ConfigMap's ..data/policies) is
 * watched by its inode, which the kubelet deletes after each update: watch
 * the path again, so the next update is seen in the folder it points to now. */
static void rearm(tg_watch_t *w) {
  for (size_t k = 0; k < w->nfolders; k++) {
    folder_t *f = &w->folders[k];
    if (!f->active)
      continue;
    uv_fs_event_stop(&f->ev);
    if (uv_fs_event_start(&f->ev, on_fs_event, f->dir, 0) != 0)
      tg_log(TG_LOG_WARN, "cannot watch policy folder", "dir", f->dir, NULL);
  }
}

static void on_debounced(uv_timer_t *t) {
  tg_watch_t *w = t->data;
  rearm(w);
  tg_reload_policies(w->registry, NULL, NULL);
}

static void on_fs_event(uv_fs_event_t *ev, const char *filename, int events, int status) {
  folder_t *f = (folder_t *)ev;
  (void)filename;
  (void)events;
  if (status < 0)
    return;
  uv_timer_start(&f->w->debounce, on_debounced, f->w->debounce_ms, 0);
}

static int watched(tg_watch_t *w, const char *dir) {
  for (size_t k = 0; k < w->nfolders; k++) {
    char have[1024];
    size_t len = sizeof have;
    if (w->folders[k].active && uv_fs_event_getpath(&w->folders[k].ev, have, &len) == 0 && strcmp(have, dir) == 0)
      return 1;
  }
  return 0;
}

static void on_closed(uv_handle_t *h) {
  tg_watch_t *w = h->data;
  if (--w->open_handles == 0) {
    free(w->folders);
    free(w);
  }
}

tg_watch_t *tg_watch_start(tg_policy_registry_t *r, uv_loop_t *loop, uint32_t debounce_ms) {
  size_t n = tg_policy_count(r);
  tg_watch_t *w = calloc(1, sizeof *w);
  if (w == NULL || (w->folders = calloc(n ? n : 1, sizeof *w->folders)) == NULL) {
    free(w);
    return NULL;
  }
  w->registry = r;
  w->debounce_ms = debounce_ms;
  uv_timer_init(loop, &w->debounce);
  w->debounce.data = w;
  w->open_handles = 1;
  for (size_t i = 0; i < n; i++) {
    tg_policy_info_t info;
    if (tg_policy_info(r, i, &info) != 0 || info.path[0] == '\0')
      continue;
    char dir[1024];
    snprintf(dir, sizeof dir, "%s", info.path);
    char *slash = strrchr(dir, '/');
    if (slash)
      *slash = '\0';
    if (watched(w, dir))
      continue;
    /* A slot is never reused: a handle that failed to start is still
     * closing when the next one would take its place. */
    folder_t *f = &w->folders[w->nfolders++];
    f->w = w;
    snprintf(f->dir, sizeof f->dir, "%s", dir);
    f->ev.data = w;
    w->open_handles++;
    uv_fs_event_init(loop, &f->ev);
    if (uv_fs_event_start(&f->ev, on_fs_event, dir, 0) != 0) {
      tg_log(TG_LOG_WARN, "cannot watch policy folder", "dir", dir, NULL);
      uv_close((uv_handle_t *)&f->ev, on_closed);
      continue;
    }
    f->active = 1;
  }
  return w;
}

void tg_watch_stop(tg_watch_t *w) {
  if (w == NULL)
    return;
  for (size_t i = 0; i < w->nfolders; i++)
    if (w->folders[i].active)
      uv_close((uv_handle_t *)&w->folders[i].ev, on_closed);
  w->debounce.data = w;
  uv_close((uv_handle_t *)&w->debounce, on_closed);
}
