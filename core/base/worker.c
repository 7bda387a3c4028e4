#include "base/worker.h"

static _Thread_local tg_worker_t *self;

tg_worker_t *tg_worker_self(void) { return self; }

void tg_worker_set_self(tg_worker_t *w) { self = w; }
