#ifndef TG_PATHTRIE_H
#define TG_PATHTRIE_H

#include <stddef.h>
#include <stdint.h>

/* An immutable index of path patterns with robots.txt matching, built once
 * off the request path and then read by any number of threads without locks.
 *
 * Pattern syntax (bytes, not NUL-terminated; binary-safe):
 *   '*'           matches any run of bytes, including the empty run and '/'.
 *   '$' at the end anchors the match at the end of the path; a '$' anywhere
 *                 else is an ordinary byte.
 *   anything else is literal: no decoding, so "%2F" only matches "%2F".
 * A pattern without the trailing '$' is a prefix match: "/a" matches "/a",
 * "/ab" and "/a/b". The empty pattern therefore matches every path, and "$"
 * matches only the empty path. Absolute URLs are the caller's business: strip
 * scheme and host first; include the query in the path if it should count.
 *
 * Specificity is the pattern's length in bytes as added, wildcards and '$'
 * included (Google's robots.txt rule). Ties are not resolved here: every
 * matching pattern is returned, so the caller can apply its own rule (for RSL,
 * "prohibits beats permits").
 *
 * Duplicates are kept: adding the same pattern twice returns both values.
 *
 * Cost: a match walks a compressed trie along the path, so literal patterns
 * cost nothing per stored pattern; a pattern with '*' is stored at the node of
 * its literal prefix (up to the first '*') and only the remainder is globbed,
 * with an iterative matcher (no recursion, no exponential backtracking). */

typedef struct tg_pathtrie_builder tg_pathtrie_builder_t;
typedef struct tg_pathtrie tg_pathtrie_t;

typedef struct tg_pathtrie_hit {
  uint32_t value;       /* the value given to tg_pathtrie_builder_add */
  uint32_t specificity; /* the pattern's length in bytes; larger is more specific */
} tg_pathtrie_hit_t;

/* Build phase: single thread. Returns NULL on out of memory. */
tg_pathtrie_builder_t *tg_pathtrie_builder_new(void);

/* Copies the pattern (the builder keeps no reference to it). value is opaque
 * to the trie, typically an index into the caller's table.
 * Returns 0, -EINVAL (pattern NULL with len > 0), -E2BIG (a pattern of 1 MiB
 * or more, or the builder would pass 4 GiB of pattern bytes or 2^30 patterns)
 * or -ENOMEM. On error the builder is unchanged and still usable. */
int tg_pathtrie_builder_add(tg_pathtrie_builder_t *b, const char *pattern, size_t len,
                            uint32_t value);

/* Frees a builder that will not be built. NULL is a no-op. */
void tg_pathtrie_builder_free(tg_pathtrie_builder_t *b);

/* Consumes and frees the builder whatever happens, and returns the immutable
 * trie, or NULL on out of memory. Sorts the patterns, then builds the trie in
 * one breadth-first pass: O(n log n) in the number of patterns. */
tg_pathtrie_t *tg_pathtrie_build(tg_pathtrie_builder_t *b);

/* Frees the trie. The caller makes sure no thread still reads it (for example
 * by freeing an old snapshot only after its last reader has finished). NULL is
 * a no-op. */
void tg_pathtrie_free(tg_pathtrie_t *t);

/* Bytes held by the trie, headers and arrays included (not malloc overhead). */
size_t tg_pathtrie_bytes(const tg_pathtrie_t *t);

/* Number of patterns the trie was built from. */
size_t tg_pathtrie_count(const tg_pathtrie_t *t);

/* Finds every pattern that matches path[0..len) and writes up to max_hits of
 * them to hits, most specific first; among equal specificity, smaller value
 * first. Returns the number of matching patterns, which may exceed max_hits:
 * then hits holds the max_hits most specific ones. hits may be NULL when
 * max_hits is 0 (to count). Pure read: safe from any number of threads at once,
 * no allocation. */
size_t tg_pathtrie_match(const tg_pathtrie_t *t, const char *path, size_t len,
                         tg_pathtrie_hit_t *hits, size_t max_hits);

#endif
