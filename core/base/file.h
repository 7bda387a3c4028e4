#ifndef TG_FILE_H
#define TG_FILE_H

#include <stddef.h>
#include <stdint.h>

/* Whole-file reads and durable writes, for the files the gateway keeps
 * (write-ahead log segments, balance snapshots). Blocking I/O: start-up,
 * tools, the log's writer thread or the main loop, never a worker. Any
 * thread. Errors are negative errno values. */

/* Reads path whole: *data (malloc'd, free it; never NULL on success) and
 * *size. A file that shrank while it was read gives what there was, and
 * *shrank (when not NULL) says so: the caller decides whether that is
 * damage. 0, -ENOMEM or the -errno of open/fstat/read. */
int tg_file_read(const char *path, uint8_t **data, size_t *size, int *shrank);

/* write(2) until all n bytes are written (EINTR retried). 0 or -errno. */
int tg_file_write_all(int fd, const void *p, size_t n);

/* fsync of a directory, so that the names made or removed in it are durable. */
int tg_file_fsync_dir(const char *dir);

/* Replaces path with data atomically and durably: path.tmp (mode), fsync,
 * rename over path, fsync of its directory. On failure path is untouched and
 * path.tmp removed. */
int tg_file_write_atomic(const char *path, const void *data, size_t len, unsigned mode);

#endif
