#ifndef TG_WORKER_H
#define TG_WORKER_H

#include <uv.h>

/* One worker thread: its own loop. Everything a worker owns is touched only
 * from its thread; nothing here is locked. Layers above keep their per-worker
 * state in arrays indexed by id (pipeline/app.h), so that nothing reaches its
 * own state through an untyped pointer. */
typedef struct tg_worker {
  int id;          /* 0 .. nworkers-1 */
  uv_loop_t *loop;
} tg_worker_t;

/* The worker running on the calling thread, or NULL on any other thread. */
tg_worker_t *tg_worker_self(void);
void tg_worker_set_self(tg_worker_t *w);

#endif
