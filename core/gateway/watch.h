#ifndef TG_WATCH_H
#define TG_WATCH_H

#include <uv.h>

#include "policy/policy.h"

/* Reloads policies when a policy file changes: one uv fs event per folder
 * that holds a policy (editors replace files by renaming over them, which
 * ends a watch on the file itself), debounced by debounce_ms (config
 * policy.watch_debounce_ms, 200 by default) because editors write in several
 * steps: the reload runs once that long has passed without another change. Runs on loop's thread (the main loop), which must not be
 * a worker's: a reload compiles policies.
 *
 * tg_watch_start returns NULL when out of memory; a folder that cannot be
 * watched is logged and skipped. tg_watch_stop closes the handles and frees
 * the watcher once the loop has run their close callbacks. */
typedef struct tg_watch tg_watch_t;

tg_watch_t *tg_watch_start(tg_policy_registry_t *r, uv_loop_t *loop, uint32_t debounce_ms);
void tg_watch_stop(tg_watch_t *w);

#endif
