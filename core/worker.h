#ifndef TG_WORKER_H
#define TG_WORKER_H

#include <uv.h>

struct tg_httpc;

/* One worker thread: its own loop and its own per-worker state. Everything a
 * worker owns is touched only from its thread; nothing here is locked. */
typedef struct tg_worker {
  int id;                  /* 0 .. nworkers-1 */
  uv_loop_t *loop;
  struct tg_httpc *httpc;  /* outbound HTTP client of this worker (may be NULL) */
  void *app;               /* application state for this worker, set in on_worker_start */
} tg_worker_t;

/* The worker running on the calling thread, or NULL on any other thread. */
tg_worker_t *tg_worker_self(void);
void tg_worker_set_self(tg_worker_t *w);

#endif
