#include "config/config.h"

#include "base/log.h"
#include "base/secret.h"

#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <luajit.h>

#define MAX_SOURCE_BYTES (16u << 20)
#define HOOK_EVERY 1000 /* VM instructions between deadline checks */
#define MAX_SECTION_DEPTH 8
#define MAX_PATH 24
#define MAX_KEY_PATH 512
#define MAX_EXACT_INTEGER 9007199254740992.0 /* 2^53: larger doubles are not exact */

enum { ABORT_NONE = 0, ABORT_TIME, ABORT_MEMORY };

/* One step of the path to a value, for messages and line lookup:
 * a string key, or (key NULL) a list position. */
typedef struct path_comp {
  const char *key;
  long long idx;
} path_comp_t;

enum { TK_EOF = 0, TK_NAME, TK_STRING, TK_NUMBER, TK_OP };

typedef struct token {
  int type;
  int line;
  const char *s; /* for strings: the text between the quotes, escapes left as written */
  size_t len;
} token_t;

typedef struct src_field {
  const char *key; /* NULL: integer key idx, or a key we could not read */
  size_t keylen;
  long long idx;
  int line;
  int child;       /* node of a constructor value, or -1 */
  const char *ref; /* value is a bare variable name */
  size_t reflen;
} src_field_t;

typedef struct src_node {
  int line;
  src_field_t *fields;
  size_t nfields, cap;
} src_node_t;

typedef struct src_assign {
  const char *name;
  size_t len;
  int node;
} src_assign_t;

/* Where the table constructors of the source are. Lua keeps no positions for
 * table fields, so validation errors find their line in this index instead;
 * it follows literal constructors and variables assigned one at top level. */
typedef struct src_index {
  bool built;
  token_t *toks;
  size_t ntoks, tokcap;
  src_node_t *nodes;
  size_t nnodes, nodecap;
  src_assign_t *assigns;
  size_t nassigns, assigncap;
  int root;            /* node returned by the chunk, or -1 */
  const char *rootref; /* or the variable it returns */
  size_t rootreflen;
  int return_line;
} src_index_t;

typedef struct ctx {
  /* sandbox limits: the allocator's userdata, found again with lua_getallocf */
  size_t mem_used;
  size_t mem_limit;
  struct timespec deadline;
  int abort;
  int abort_line;

  const char *name; /* the path as the caller gave it, for messages */
  char *src;
  size_t srclen;
  src_index_t idx;

  lua_State *L;
  tg_config_t *cfg;
  path_comp_t path[MAX_PATH];
  int depth;
  bool failed;
  char *err;
  size_t errlen;
} ctx_t;

static int failv(ctx_t *c, int line, const char *fmt, va_list ap) {
  if (c->failed)
    return -1;
  c->failed = true;
  if (c->err == NULL || c->errlen == 0)
    return -1;
  int n = line > 0 ? snprintf(c->err, c->errlen, "%s:%d: ", c->name, line)
                   : snprintf(c->err, c->errlen, "%s: ", c->name);
  if (n >= 0 && (size_t)n < c->errlen)
    vsnprintf(c->err + n, c->errlen - (size_t)n, fmt, ap);
  return -1;
}

static int fail_line(ctx_t *c, int line, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail_line(ctx_t *c, int line, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  failv(c, line, fmt, ap);
  va_end(ap);
  return -1;
}

static void format_path(const path_comp_t *path, int depth, char *out, size_t outlen) {
  size_t o = 0;
  out[0] = '\0';
  for (int i = 0; i < depth && o < outlen; i++) {
    int n = path[i].key ? snprintf(out + o, outlen - o, "%s%s", i ? "." : "", path[i].key)
                        : snprintf(out + o, outlen - o, "[%lld]", path[i].idx);
    if (n < 0)
      break;
    o += (size_t)n;
  }
}

static int locate(ctx_t *c, const path_comp_t *path, int depth);

/* An error about the value at the current path: "FILE:LINE: path: reason". */
static int fail_here(ctx_t *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail_here(ctx_t *c, const char *fmt, ...) {
  char where[256], msg[768];
  va_list ap;
  if (c->failed)
    return -1;
  format_path(c->path, c->depth, where, sizeof(where));
  va_start(ap, fmt);
  vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);
  int line = locate(c, c->path, c->depth);
  if (where[0])
    return fail_line(c, line, "%s: %s", where, msg);
  return fail_line(c, line, "%s", msg);
}

static int fail_oom(ctx_t *c) {
  return fail_line(c, 0, "out of memory");
}

static void *sandbox_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  ctx_t *c = ud;
  if (ptr == NULL)
    osize = 0;
  if (nsize == 0) {
    free(ptr);
    c->mem_used -= osize;
    return NULL;
  }
  if (nsize > osize && nsize - osize > c->mem_limit - c->mem_used) {
    /* LuaJIT raises "not enough memory"; abort makes it uncatchable. */
    c->abort = ABORT_MEMORY;
    return NULL;
  }
  void *p = realloc(ptr, nsize);
  if (p != NULL)
    c->mem_used = c->mem_used - osize + nsize;
  return p;
}

static ctx_t *sandbox_ctx(lua_State *L) {
  void *ud = NULL;
  lua_getallocf(L, &ud);
  return ud;
}

static bool past(const struct timespec *deadline) {
  struct timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  return now.tv_sec > deadline->tv_sec ||
         (now.tv_sec == deadline->tv_sec && now.tv_nsec >= deadline->tv_nsec);
}

static void sandbox_hook(lua_State *L, lua_Debug *ar) {
  ctx_t *c = sandbox_ctx(L);
  if (c->abort == ABORT_NONE && !past(&c->deadline))
    return;
  if (c->abort == ABORT_NONE) {
    c->abort = ABORT_TIME;
    if (lua_getinfo(L, "l", ar))
      c->abort_line = ar->currentline;
  }
  lua_pushliteral(L, "time limit exceeded");
  lua_error(L);
}

/* pcall for the chunk: the time and memory limits pass through it, so a
 * config cannot catch its way past them. */
static int sandbox_pcall(lua_State *L) {
  ctx_t *c = sandbox_ctx(L);
  luaL_checkany(L, 1);
  int status = lua_pcall(L, lua_gettop(L) - 1, LUA_MULTRET, 0);
  if (c->abort != ABORT_NONE)
    return lua_error(L);
  luaL_checkstack(L, 1, "pcall");
  lua_pushboolean(L, status == 0);
  lua_insert(L, 1);
  return lua_gettop(L);
}

static const char *const sandbox_globals[] = {
    "pairs", "ipairs", "next", "type", "tostring", "tonumber", "select", "error", "assert", "unpack",
};

/* Builds the chunk's environment (an allowlist) and leaves it on the stack.
 * The state is private to one load, so its library tables may be trimmed. */
static void sandbox_env(lua_State *L) {
  static const lua_CFunction libs[] = {luaopen_base, luaopen_string, luaopen_table, luaopen_math};
  for (size_t i = 0; i < sizeof(libs) / sizeof(libs[0]); i++) {
    lua_pushcfunction(L, libs[i]);
    lua_call(L, 0, 0);
  }
  lua_newtable(L);
  int env = lua_gettop(L);
  for (size_t i = 0; i < sizeof(sandbox_globals) / sizeof(sandbox_globals[0]); i++) {
    lua_getfield(L, LUA_GLOBALSINDEX, sandbox_globals[i]);
    lua_setfield(L, env, sandbox_globals[i]);
  }
  lua_pushcfunction(L, sandbox_pcall);
  lua_setfield(L, env, "pcall");
  static const char *const tables[] = {"string", "table", "math"};
  for (size_t i = 0; i < 3; i++) {
    lua_getfield(L, LUA_GLOBALSINDEX, tables[i]);
    lua_setfield(L, env, tables[i]);
  }
  /* string.dump also sits behind every string's metatable: remove it there. */
  lua_getfield(L, env, "string");
  lua_pushnil(L);
  lua_setfield(L, -2, "dump");
  lua_pop(L, 1);
}

static bool is_alpha(char ch) {
  return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z');
}

static bool tok_is(const token_t *t, const char *op) {
  size_t n = strlen(op);
  return (t->type == TK_OP || t->type == TK_NAME) && t->len == n && memcmp(t->s, op, n) == 0;
}

static bool grow(void **arr, size_t *cap, size_t n, size_t size) {
  if (n < *cap)
    return true;
  size_t ncap = *cap ? *cap * 2 : 16;
  void *p = realloc(*arr, ncap * size);
  if (p == NULL)
    return false;
  *arr = p;
  *cap = ncap;
  return true;
}

/* Level of a long bracket "[==[" at p, or -1. */
static int long_bracket(const char *p, const char *end) {
  const char *q = p + 1;
  while (q < end && *q == '=')
    q++;
  return (q < end && *q == '[') ? (int)(q - p - 1) : -1;
}

/* Skips a long bracket body at p (opening bracket of the given level);
 * returns the position after the closing bracket. */
static const char *skip_long(const char *p, const char *end, int level, int *line, const char **body,
                             size_t *bodylen) {
  p += level + 2;
  *body = p;
  while (p < end) {
    if (*p == ']') {
      const char *q = p + 1;
      while (q < end && *q == '=')
        q++;
      if (q < end && *q == ']' && q - p - 1 == level) {
        *bodylen = (size_t)(p - *body);
        return q + 1;
      }
    } else if (*p == '\n') {
      (*line)++;
    }
    p++;
  }
  *bodylen = (size_t)(end - *body);
  return end;
}

static int lex(src_index_t *ix, const char *src, size_t len) {
  const char *p = src, *end = src + len;
  int line = 1;
  while (p < end) {
    token_t t = {TK_OP, line, p, 1};
    char ch = *p;
    if (ch == '\n') {
      line++;
      p++;
      continue;
    }
    if (ch == ' ' || ch == '\t' || ch == '\r' || ch == '\f' || ch == '\v') {
      p++;
      continue;
    }
    if (ch == '-' && p + 1 < end && p[1] == '-') {
      p += 2;
      int level = (p < end && *p == '[') ? long_bracket(p, end) : -1;
      if (level >= 0) {
        const char *body;
        size_t blen;
        p = skip_long(p, end, level, &line, &body, &blen);
      } else {
        while (p < end && *p != '\n')
          p++;
      }
      continue;
    }
    if (ch == '[' && long_bracket(p, end) >= 0) {
      t.type = TK_STRING;
      p = skip_long(p, end, long_bracket(p, end), &line, &t.s, &t.len);
    } else if (ch == '"' || ch == '\'') {
      t.type = TK_STRING;
      t.s = ++p;
      while (p < end && *p != ch && *p != '\n') {
        if (*p == '\\' && p + 1 < end) {
          if (p[1] == '\n')
            line++;
          p++;
        }
        p++;
      }
      t.len = (size_t)(p - t.s);
      if (p < end && *p == ch)
        p++;
    } else if (ch == '_' || is_alpha(ch)) {
      t.type = TK_NAME;
      while (p < end && (*p == '_' || is_alpha(*p) || (*p >= '0' && *p <= '9')))
        p++;
      t.len = (size_t)(p - t.s);
    } else if ((ch >= '0' && ch <= '9') || (ch == '.' && p + 1 < end && p[1] >= '0' && p[1] <= '9')) {
      t.type = TK_NUMBER;
      while (p < end) {
        char d = *p;
        if (is_alpha(d) || (d >= '0' && d <= '9') || d == '.' || d == '_')
          p++;
        else if ((d == '+' || d == '-') && ((p[-1] | 0x20) == 'e' || (p[-1] | 0x20) == 'p'))
          p++;
        else
          break;
      }
      t.len = (size_t)(p - t.s);
    } else {
      static const char *const ops[] = {"...", "==", "~=", "<=", ">=", "..", "::"};
      for (size_t i = 0; i < sizeof(ops) / sizeof(ops[0]); i++) {
        size_t n = strlen(ops[i]);
        if ((size_t)(end - p) >= n && memcmp(p, ops[i], n) == 0) {
          t.len = n;
          break;
        }
      }
      p += t.len;
    }
    if (!grow((void **)&ix->toks, &ix->tokcap, ix->ntoks + 1, sizeof(token_t)))
      return -1;
    ix->toks[ix->ntoks++] = t;
  }
  if (!grow((void **)&ix->toks, &ix->tokcap, ix->ntoks + 1, sizeof(token_t)))
    return -1;
  ix->toks[ix->ntoks] = (token_t){TK_EOF, line, end, 0};
  return 0;
}

static bool opens_block(const token_t *t) {
  return t->type == TK_NAME &&
         (tok_is(t, "function") || tok_is(t, "do") || tok_is(t, "if") || tok_is(t, "repeat"));
}

static bool closes_block(const token_t *t) {
  return t->type == TK_NAME && (tok_is(t, "end") || tok_is(t, "until"));
}

/* Skips one field value: up to ',' ';' or the closing '}' at this level. */
static void skip_value(src_index_t *ix, size_t *pos) {
  int depth = 0;
  for (; ix->toks[*pos].type != TK_EOF; (*pos)++) {
    const token_t *t = &ix->toks[*pos];
    if (t->type == TK_OP && t->len == 1) {
      char ch = t->s[0];
      if (depth == 0 && (ch == ',' || ch == ';' || ch == '}' || ch == ')' || ch == ']'))
        return;
      if (ch == '(' || ch == '[' || ch == '{')
        depth++;
      else if (ch == ')' || ch == ']' || ch == '}')
        depth--;
    } else if (opens_block(t)) {
      depth++;
    } else if (closes_block(t)) {
      depth--;
    }
  }
}

static bool is_sep(const token_t *t) {
  return tok_is(t, ",") || tok_is(t, ";") || tok_is(t, "}");
}

/* Parses the constructor whose '{' is at *pos; leaves *pos after its '}'. */
static int parse_ctor(src_index_t *ix, size_t *pos, int nesting) {
  if (!grow((void **)&ix->nodes, &ix->nodecap, ix->nnodes + 1, sizeof(src_node_t)))
    return -1;
  int self = (int)ix->nnodes++;
  ix->nodes[self] = (src_node_t){ix->toks[*pos].line, NULL, 0, 0};
  long long npos = 0;
  (*pos)++;
  for (;;) {
    token_t *t = &ix->toks[*pos];
    if (t->type == TK_EOF)
      break;
    if (tok_is(t, "}")) {
      (*pos)++;
      break;
    }
    if (tok_is(t, ",") || tok_is(t, ";")) {
      (*pos)++;
      continue;
    }
    src_field_t f = {NULL, 0, 0, t->line, -1, NULL, 0};
    if (t->type == TK_NAME && tok_is(t + 1, "=")) {
      f.key = t->s;
      f.keylen = t->len;
      *pos += 2;
    } else if (tok_is(t, "[")) {
      if ((t[1].type == TK_STRING || t[1].type == TK_NUMBER) && tok_is(t + 2, "]") && tok_is(t + 3, "=")) {
        if (t[1].type == TK_STRING) {
          f.key = t[1].s;
          f.keylen = t[1].len;
        } else {
          char num[64];
          snprintf(num, sizeof(num), "%.*s", (int)(t[1].len < 63 ? t[1].len : 63), t[1].s);
          f.idx = strtoll(num, NULL, 0);
        }
        *pos += 4;
      } else {
        (*pos)++;
        skip_value(ix, pos);
        if (tok_is(&ix->toks[*pos], "]"))
          (*pos)++;
        if (tok_is(&ix->toks[*pos], "="))
          (*pos)++;
      }
    } else {
      f.idx = ++npos;
    }
    const token_t *v = &ix->toks[*pos];
    if (tok_is(v, "{") && nesting < 64) {
      f.child = parse_ctor(ix, pos, nesting + 1);
      if (f.child < -1)
        return -2;
    } else if (v->type == TK_NAME && is_sep(v + 1)) {
      f.ref = v->s;
      f.reflen = v->len;
    }
    skip_value(ix, pos);
    src_node_t *node = &ix->nodes[self]; /* nodes may have moved */
    if (!grow((void **)&node->fields, &node->cap, node->nfields + 1, sizeof(src_field_t)))
      return -2;
    node->fields[node->nfields++] = f;
    if (!is_sep(&ix->toks[*pos]))
      break; /* malformed: stop rather than loop */
  }
  return self;
}

static int build_index(ctx_t *c) {
  src_index_t *ix = &c->idx;
  if (ix->built)
    return ix->root;
  ix->built = true;
  ix->root = -1;
  if (lex(ix, c->src, c->srclen) != 0)
    return -1;
  int block = 0, paren = 0;
  size_t pos = 0;
  while (ix->toks[pos].type != TK_EOF) {
    token_t *t = &ix->toks[pos];
    if (t->type == TK_NAME && block == 0 && paren == 0 && tok_is(t, "return")) {
      ix->return_line = t->line;
      if (tok_is(t + 1, "{")) {
        pos++;
        ix->root = parse_ctor(ix, &pos, 0);
        if (ix->root < -1)
          return ix->root = -1;
        continue;
      }
      if (t[1].type == TK_NAME && (is_sep(t + 2) || t[2].type == TK_EOF || tok_is(t + 2, "end"))) {
        ix->rootref = t[1].s;
        ix->rootreflen = t[1].len;
      }
    } else if (t->type == TK_NAME && block == 0 && paren == 0 && tok_is(t + 1, "=") && tok_is(t + 2, "{") &&
               (pos == 0 || !(tok_is(t - 1, ".") || tok_is(t - 1, ":") || tok_is(t - 1, ",")))) {
      pos += 2;
      int node = parse_ctor(ix, &pos, 0);
      if (node < 0)
        return -1;
      if (!grow((void **)&ix->assigns, &ix->assigncap, ix->nassigns + 1, sizeof(src_assign_t)))
        return -1;
      ix->assigns[ix->nassigns++] = (src_assign_t){t->s, t->len, node};
      continue;
    } else if (opens_block(t)) {
      block++;
    } else if (closes_block(t)) {
      block--;
    } else if (tok_is(t, "{")) {
      if (parse_ctor(ix, &pos, 0) < -1)
        return -1;
      continue;
    } else if (tok_is(t, "(") || tok_is(t, "[")) {
      paren++;
    } else if (tok_is(t, ")") || tok_is(t, "]")) {
      paren--;
    }
    pos++;
  }
  return ix->root;
}

static int resolve_ref(const src_index_t *ix, const char *name, size_t len) {
  for (size_t i = ix->nassigns; i-- > 0;)
    if (ix->assigns[i].len == len && memcmp(ix->assigns[i].name, name, len) == 0)
      return ix->assigns[i].node;
  return -1;
}

static const src_field_t *find_field(const src_node_t *node, const path_comp_t *pc) {
  size_t klen = pc->key ? strlen(pc->key) : 0;
  for (size_t i = node->nfields; i-- > 0;) { /* the last duplicate wins, as in Lua */
    const src_field_t *f = &node->fields[i];
    if (pc->key ? (f->key && f->keylen == klen && memcmp(f->key, pc->key, klen) == 0)
                : (f->key == NULL && f->idx == pc->idx))
      return f;
  }
  return NULL;
}

/* The source line of the value at path, or of the nearest enclosing table
 * the index can follow; 0 when the returned table is not a literal. */
static int locate(ctx_t *c, const path_comp_t *path, int depth) {
  src_index_t *ix = &c->idx;
  build_index(c);
  int node = ix->root >= 0 ? ix->root : (ix->rootref ? resolve_ref(ix, ix->rootref, ix->rootreflen) : -1);
  if (node < 0)
    return 0;
  int line = ix->nodes[node].line;
  for (int i = 0; i < depth; i++) {
    const src_field_t *f = find_field(&ix->nodes[node], &path[i]);
    if (f == NULL)
      break;
    line = f->line;
    node = f->child >= 0 ? f->child : (f->ref ? resolve_ref(ix, f->ref, f->reflen) : -1);
    if (node < 0)
      break;
  }
  return line;
}

static void free_index(src_index_t *ix) {
  for (size_t i = 0; i < ix->nnodes; i++)
    free(ix->nodes[i].fields);
  free(ix->nodes);
  free(ix->toks);
  free(ix->assigns);
  memset(ix, 0, sizeof(*ix));
}

static void path_push(ctx_t *c, const char *key, long long idx) {
  if (c->depth < MAX_PATH)
    c->path[c->depth] = (path_comp_t){key, idx};
  c->depth++;
}

/* Pushes t[key] (raw: sandboxed tables have no metatables anyway) and enters
 * it in the path; leave() undoes both. */
static int field(ctx_t *c, int t, const char *key) {
  lua_pushstring(c->L, key);
  lua_rawget(c->L, t);
  path_push(c, key, 0);
  return lua_type(c->L, -1);
}

static int element(ctx_t *c, int t, long long i) {
  lua_rawgeti(c->L, t, (int)i);
  path_push(c, NULL, i);
  return lua_type(c->L, -1);
}

static void leave(ctx_t *c) {
  lua_pop(c->L, 1);
  c->depth--;
}

static const char *type_name(ctx_t *c, int idx) {
  return lua_typename(c->L, lua_type(c->L, idx));
}

static int want_type(ctx_t *c, int type, const char *what) {
  if (lua_type(c->L, -1) == type)
    return 0;
  return fail_here(c, "expected %s, got %s", what, type_name(c, -1));
}

/* Copies the string on top of the stack; it must be non-empty text. */
static int want_string(ctx_t *c, char **out) {
  size_t n;
  if (want_type(c, LUA_TSTRING, "a string") != 0)
    return -1;
  const char *s = lua_tolstring(c->L, -1, &n);
  if (n == 0)
    return fail_here(c, "must not be empty");
  if (memchr(s, '\0', n) != NULL)
    return fail_here(c, "must not contain a NUL byte");
  char *copy = strndup(s, n);
  if (copy == NULL)
    return fail_oom(c);
  free(*out);
  *out = copy;
  return 0;
}

static bool exact_integer(lua_Number d) {
  return isfinite(d) && d == floor(d) && fabs(d) <= MAX_EXACT_INTEGER;
}

static int want_integer(ctx_t *c, long long lo, long long hi, long long *out) {
  if (want_type(c, LUA_TNUMBER, "an integer") != 0)
    return -1;
  lua_Number d = lua_tonumber(c->L, -1);
  if (!exact_integer(d) || d < (lua_Number)lo || d > (lua_Number)hi)
    return fail_here(c, "must be an integer in %lld..%lld, got %.14g", lo, hi, d);
  *out = (long long)d;
  return 0;
}

static int opt_string(ctx_t *c, int t, const char *key, char **out) {
  int rc = field(c, t, key) == LUA_TNIL ? 0 : want_string(c, out);
  leave(c);
  return rc;
}

static int req_string(ctx_t *c, int t, const char *key, char **out) {
  if (field(c, t, key) == LUA_TNIL) {
    leave(c);
    return fail_here(c, "missing '%s'", key);
  }
  int rc = want_string(c, out);
  leave(c);
  return rc;
}

/* *out keeps its default when the key is absent. */
static int opt_integer(ctx_t *c, int t, const char *key, long long lo, long long hi, long long *out) {
  int rc = field(c, t, key) == LUA_TNIL ? 0 : want_integer(c, lo, hi, out);
  leave(c);
  return rc;
}

static int opt_boolean(ctx_t *c, int t, const char *key, bool *out) {
  int rc = 0;
  if (field(c, t, key) != LUA_TNIL && (rc = want_type(c, LUA_TBOOLEAN, "a boolean (true or false)")) == 0)
    *out = lua_toboolean(c->L, -1);
  leave(c);
  return rc;
}

/* An optional number in 0..1 (a share: sampling). */
static int opt_fraction(ctx_t *c, int t, const char *key, double *out) {
  int rc = 0;
  if (field(c, t, key) == LUA_TNIL)
    ;
  else if (want_type(c, LUA_TNUMBER, "a number in 0..1") != 0)
    rc = -1;
  else if (!(lua_tonumber(c->L, -1) >= 0 && lua_tonumber(c->L, -1) <= 1))
    rc = fail_here(c, "must be a number in 0..1, got %.14g", lua_tonumber(c->L, -1));
  else
    *out = lua_tonumber(c->L, -1);
  leave(c);
  return rc;
}

/* Resolves p against the config's folder and drops "." and ".." lexically:
 * the folder comes from realpath, so this matches what the kernel sees
 * unless p itself walks out of a symlink. */
static char *resolve_path(const char *dir, const char *p) {
  size_t n = strlen(dir) + strlen(p) + 3;
  char *raw = malloc(n), *out = malloc(n);
  if (raw == NULL || out == NULL)
    goto fail;
  if (p[0] == '/')
    snprintf(raw, n, "%s", p);
  else
    snprintf(raw, n, "%s/%s", dir, p);
  size_t o = 0;
  const char *s = raw;
  for (;;) {
    while (*s == '/')
      s++;
    if (*s == '\0')
      break;
    const char *e = strchr(s, '/');
    size_t len = e ? (size_t)(e - s) : strlen(s);
    if (len == 2 && s[0] == '.' && s[1] == '.') {
      while (o > 0 && out[o - 1] != '/')
        o--;
      if (o > 0)
        o--;
    } else if (!(len == 1 && s[0] == '.')) {
      out[o++] = '/';
      memcpy(out + o, s, len);
      o += len;
    }
    s += len;
  }
  if (o == 0)
    out[o++] = '/';
  out[o] = '\0';
  free(raw);
  return out;
fail:
  free(raw);
  free(out);
  return NULL;
}

/* NULL when path is a regular file we can open for reading, else why not. */
static const char *unreadable(const char *path) {
  struct stat st;
  int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0)
    return strerror(errno);
  int rc = fstat(fd, &st);
  int e = errno;
  close(fd);
  if (rc != 0)
    return strerror(e);
  if (S_ISDIR(st.st_mode))
    return "is a directory";
  if (!S_ISREG(st.st_mode))
    return "not a regular file";
  return NULL;
}

/* Turns the string on top of the stack into an absolute path to a readable file. */
static int want_file(ctx_t *c, char **out) {
  char *rel = NULL;
  if (want_string(c, &rel) != 0)
    return -1;
  char *abs = resolve_path(c->cfg->dir, rel);
  free(rel);
  if (abs == NULL)
    return fail_oom(c);
  const char *why = unreadable(abs);
  if (why != NULL) {
    fail_here(c, "cannot read '%s': %s", abs, why);
    free(abs);
    return -1;
  }
  free(*out);
  *out = abs;
  return 0;
}

static int opt_file(ctx_t *c, int t, const char *key, char **out) {
  int rc = field(c, t, key) == LUA_TNIL ? 0 : want_file(c, out);
  leave(c);
  return rc;
}

/* Optimal string alignment distance, for "did you mean" hints. */
static size_t edit_distance(const char *a, const char *b) {
  size_t n = strlen(a), m = strlen(b);
  if (n > 64 || m > 64)
    return SIZE_MAX;
  size_t d[65][65];
  for (size_t i = 0; i <= n; i++)
    d[i][0] = i;
  for (size_t j = 0; j <= m; j++)
    d[0][j] = j;
  for (size_t i = 1; i <= n; i++)
    for (size_t j = 1; j <= m; j++) {
      size_t cost = a[i - 1] != b[j - 1];
      size_t v = d[i - 1][j] + 1;
      if (d[i][j - 1] + 1 < v)
        v = d[i][j - 1] + 1;
      if (d[i - 1][j - 1] + cost < v)
        v = d[i - 1][j - 1] + cost;
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] && d[i - 2][j - 2] + 1 < v)
        v = d[i - 2][j - 2] + 1;
      d[i][j] = v;
    }
  return d[n][m];
}

static bool in_list(const char *s, const char *const *list) {
  for (; *list; list++)
    if (strcmp(s, *list) == 0)
      return true;
  return false;
}

static void describe_key(ctx_t *c, int idx, char *out, size_t outlen) {
  if (lua_type(c->L, idx) == LUA_TNUMBER)
    snprintf(out, outlen, "[%.14g]", lua_tonumber(c->L, idx));
  else
    snprintf(out, outlen, "of type %s", type_name(c, idx));
}

/* Every key of the table at t must be one of allowed. With several unknown
 * keys the first in the file is reported, so the message is stable. */
static int check_keys(ctx_t *c, int t, const char *const *allowed) {
  lua_State *L = c->L;
  const char *bad = NULL;
  int badline = 0;
  lua_pushnil(L);
  while (lua_next(L, t)) {
    lua_pop(L, 1);
    if (lua_type(L, -1) != LUA_TSTRING) {
      char what[64], names[256] = "";
      describe_key(c, -1, what, sizeof(what));
      lua_pop(L, 1);
      for (const char *const *k = allowed; *k; k++)
        snprintf(names + strlen(names), sizeof(names) - strlen(names), "%s%s", k == allowed ? "" : ", ", *k);
      return fail_here(c, "unexpected key %s: expected named keys (%s)", what, names);
    }
    const char *k = lua_tostring(L, -1); /* stays alive: it is a key of t */
    if (in_list(k, allowed))
      continue;
    path_push(c, k, 0);
    int line = locate(c, c->path, c->depth);
    c->depth--;
    bool earlier = bad == NULL || (line > 0 && (badline == 0 || line < badline)) ||
                   (line == badline && strcmp(k, bad) < 0);
    if (earlier) {
      bad = k;
      badline = line;
    }
  }
  if (bad == NULL)
    return 0;
  char where[256], hint[96] = "";
  format_path(c->path, c->depth, where, sizeof(where));
  const char *best = NULL;
  size_t bestd = SIZE_MAX, limit = strlen(bad) <= 4 ? 1 : 2;
  for (const char *const *k = allowed; *k; k++) {
    size_t d = edit_distance(bad, *k);
    if (d <= limit && d < bestd) {
      best = *k;
      bestd = d;
    }
  }
  if (best)
    snprintf(hint, sizeof(hint), " (did you mean '%s'?)", best);
  return fail_line(c, badline, "unknown key '%s' in %s%s", bad, where[0] ? where : "config", hint);
}

/* The table at t must be a list 1..n; *n gets its length. */
static int check_list(ctx_t *c, int t, long long *n) {
  lua_State *L = c->L;
  long long count = 0, max = 0;
  lua_pushnil(L);
  while (lua_next(L, t)) {
    lua_pop(L, 1);
    lua_Number d = lua_type(L, -1) == LUA_TNUMBER ? lua_tonumber(L, -1) : 0;
    if (lua_type(L, -1) != LUA_TNUMBER || !exact_integer(d) || d < 1 || d > INT_MAX) {
      int rc;
      if (lua_type(L, -1) == LUA_TSTRING) {
        path_push(c, lua_tostring(L, -1), 0);
        int line = locate(c, c->path, c->depth);
        c->depth--;
        char where[256];
        format_path(c->path, c->depth, where, sizeof(where));
        rc = fail_line(c, line, "%s: expected a list of tables { {...}, {...} }, found key '%s'", where,
                       lua_tostring(L, -1));
      } else {
        char what[64];
        describe_key(c, -1, what, sizeof(what));
        rc = fail_here(c, "expected a list, found key %s", what);
      }
      lua_pop(L, 1);
      return rc;
    }
    count++;
    if (d > max)
      max = (long long)d;
  }
  if (max != count)
    return fail_here(c, "expected a list without holes, but [%lld] is set and only %lld entries exist", max,
                     count);
  *n = count;
  return 0;
}

static bool valid_hostname(const char *h, size_t n) {
  if (n == 0 || n > 253)
    return false;
  size_t label = 0;
  for (size_t i = 0; i < n; i++) {
    char ch = h[i];
    if (ch == '.') {
      if (label == 0 || h[i - 1] == '-')
        return false;
      label = 0;
      continue;
    }
    bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '-' ||
              ch == '_';
    if (!ok || (ch == '-' && label == 0) || ++label > 63)
      return false;
  }
  return label > 0 && h[n - 1] != '-';
}

static bool valid_ip(const char *h, size_t n, int family) {
  char buf[INET6_ADDRSTRLEN + 1];
  unsigned char addr[sizeof(struct in6_addr)];
  if (n >= sizeof(buf))
    return false;
  memcpy(buf, h, n);
  buf[n] = '\0';
  return inet_pton(family, buf, addr) == 1;
}

/* An address to bind: an IP literal or a name to resolve. */
static bool valid_bind_host(const char *h) {
  size_t n = strlen(h);
  return valid_ip(h, n, AF_INET) || valid_ip(h, n, AF_INET6) || valid_hostname(h, n);
}

static bool valid_port_text(const char *p, size_t n) {
  if (n == 0 || n > 5)
    return false;
  long v = 0;
  for (size_t i = 0; i < n; i++) {
    if (p[i] < '0' || p[i] > '9')
      return false;
    v = v * 10 + (p[i] - '0');
  }
  return v >= 1 && v <= 65535;
}

/* A Host header value a tenant answers to: name, IPv4, or [IPv6], each with
 * an optional ":port". */
static bool valid_tenant_host(const char *h) {
  size_t n = strlen(h);
  if (h[0] == '[') {
    const char *close = memchr(h, ']', n);
    if (close == NULL || !valid_ip(h + 1, (size_t)(close - h - 1), AF_INET6))
      return false;
    const char *rest = close + 1;
    return *rest == '\0' || (*rest == ':' && valid_port_text(rest + 1, strlen(rest + 1)));
  }
  const char *colon = strchr(h, ':');
  if (colon == NULL)
    return valid_hostname(h, n);
  return valid_hostname(h, (size_t)(colon - h)) && valid_port_text(colon + 1, strlen(colon + 1));
}

static bool valid_tenant_name(const char *s) {
  size_t n = strlen(s);
  if (n == 0 || n > 64)
    return false;
  for (size_t i = 0; i < n; i++) {
    char ch = s[i];
    if (!((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '_' || ch == '-'))
      return false;
  }
  return true;
}

static int add_item(ctx_t *c, tg_config_section_t *s, size_t *cap, const char *key, char *value) {
  char *k = strdup(key);
  if (k == NULL || !grow((void **)&s->items, cap, s->nitems + 1, sizeof(tg_config_kv_t))) {
    free(k);
    free(value);
    return fail_oom(c);
  }
  s->items[s->nitems++] = (tg_config_kv_t){k, value};
  return 0;
}

static bool ends_with(const char *s, const char *suffix) {
  size_t n = strlen(s), m = strlen(suffix);
  return n >= m && strcmp(s + n - m, suffix) == 0;
}

/* Flattens the table at t into s under prefix (a buffer of MAX_KEY_PATH
 * bytes holding plen bytes). */
static int flatten(ctx_t *c, int t, char *prefix, size_t plen, tg_config_section_t *s, size_t *cap,
                   int level) {
  lua_State *L = c->L;
  if (level > MAX_SECTION_DEPTH)
    return fail_here(c, "nested more than %d levels deep", MAX_SECTION_DEPTH);
  luaL_checkstack(L, 6, "config section");
  lua_pushnil(L);
  while (lua_next(L, t)) {
    char num[32];
    const char *k;
    int rc = 0;
    if (lua_type(L, -2) == LUA_TSTRING) {
      size_t klen;
      k = lua_tolstring(L, -2, &klen);
      path_push(c, k, 0);
      if (klen == 0 || memchr(k, '.', klen) || memchr(k, '\0', klen)) {
        rc = fail_here(c, "key names must be non-empty and contain no '.'");
        goto next;
      }
    } else if (lua_type(L, -2) == LUA_TNUMBER && exact_integer(lua_tonumber(L, -2)) &&
               lua_tonumber(L, -2) >= 1) {
      long long i = (long long)lua_tonumber(L, -2);
      snprintf(num, sizeof(num), "%lld", i);
      k = num;
      path_push(c, NULL, i);
    } else {
      char what[64];
      describe_key(c, -2, what, sizeof(what));
      lua_pop(L, 2);
      return fail_here(c, "unexpected key %s: keys are names or list positions", what);
    }
    size_t klen = strlen(k), nlen = plen + (plen ? 1 : 0) + klen;
    if (nlen >= MAX_KEY_PATH) {
      rc = fail_here(c, "key path longer than %d bytes", MAX_KEY_PATH - 1);
      goto next;
    }
    if (plen)
      prefix[plen] = '.';
    memcpy(prefix + plen + (plen ? 1 : 0), k, klen + 1);

    char *value = NULL;
    switch (lua_type(L, -1)) {
    case LUA_TTABLE:
      rc = flatten(c, lua_gettop(L), prefix, nlen, s, cap, level + 1);
      break;
    case LUA_TSTRING:
      /* A *_file value is a path: resolved like every path in the file. */
      rc = ends_with(k, "_file") ? want_file(c, &value) : want_string(c, &value);
      if (rc == 0)
        rc = add_item(c, s, cap, prefix, value);
      break;
    case LUA_TNUMBER: {
      lua_Number d = lua_tonumber(L, -1);
      if (!isfinite(d) || d != floor(d)) {
        rc = fail_here(c, "%.14g is not an integer (amounts are integers in the asset's atomic units; write "
                          "other values as strings)", d);
      } else if (fabs(d) > MAX_EXACT_INTEGER) {
        rc = fail_here(c, "%.0f is too large to be exact as a number: write it as a string", d);
      } else {
        snprintf(num, sizeof(num), "%lld", (long long)d);
        value = strdup(num);
        rc = value ? add_item(c, s, cap, prefix, value) : fail_oom(c);
      }
      break;
    }
    case LUA_TBOOLEAN:
      value = strdup(lua_toboolean(L, -1) ? "true" : "false");
      rc = value ? add_item(c, s, cap, prefix, value) : fail_oom(c);
      break;
    default:
      rc = fail_here(c, "expected a string, number, boolean or table, got %s", type_name(c, -1));
    }
    prefix[plen] = '\0';
  next:
    c->depth--;
    if (rc != 0) {
      lua_pop(L, 2);
      return -1;
    }
    lua_pop(L, 1);
  }
  return 0;
}

static int cmp_kv(const void *a, const void *b) {
  return strcmp(((const tg_config_kv_t *)a)->key, ((const tg_config_kv_t *)b)->key);
}

/* The kinds a signer or billing section may name by its 'type'. keys NULL:
 * the kind's settings are not fixed yet. A kind not implemented is refused,
 * so that no section is accepted that nothing reads. */
typedef struct kind {
  const char *type;
  const char *const *keys;
  bool implemented;
} kind_t;

/* The signer kinds' keys (signer/signer.h reads and checks their values). */
static const char *const nginx_secure_link_keys[] = {"type", "base_url", "key_file", "ttl_s", "expression", NULL};
static const char *const akamai_keys[] = {"type",      "base_url",  "key_file",     "ttl_s",  "token_name",
                                          "algorithm", "acl",       "url_form",     "escape_early", NULL};
static const char *const gcdn_keys[] = {"type", "base_url", "key_file", "ttl_s", "key_name", "url_prefix", NULL};
static const char *const cloudfront_keys[] = {"type", "base_url", "key_file", "ttl_s", "key_pair_id", NULL};
static const char *const builtin_billing_keys[] = {"type", NULL};
static const kind_t signer_kinds[] = {{"nginx_secure_link", nginx_secure_link_keys, true},
                                      {"akamai_edgeauth", akamai_keys, true},
                                      {"cloudfront", cloudfront_keys, true},
                                      {"gcdn", gcdn_keys, true},
                                      {NULL, NULL, false}};
static const char *const connect_billing_keys[] = {
    "type",          "url",         "token_file",         "deadline_ms",          "call_timeout_ms",
    "breaker_failures", "breaker_cooldown_ms", "health_interval_ms", "deferred_cap", "reconcile_backoff_ms",
    "reconcile_max_backoff_ms", NULL};
static const kind_t billing_kinds[] = {
    {"builtin", builtin_billing_keys, true}, {"connect", connect_billing_keys, true}, {NULL, NULL, false}};

/* The section at sec names one of kinds in its 'type', has only that kind's
 * keys, and the kind is implemented. */
static int check_kind(ctx_t *c, int sec, const char *what, const kind_t *kinds) {
  int tt = field(c, sec, "type");
  if (tt == LUA_TNIL) {
    leave(c);
    return fail_here(c, "missing 'type'");
  }
  if (tt != LUA_TSTRING) {
    fail_here(c, "expected a string, got %s", type_name(c, -1));
    leave(c);
    return -1;
  }
  const char *type = lua_tostring(c->L, -1);
  const kind_t *k = kinds;
  while (k->type && strcmp(k->type, type) != 0)
    k++;
  if (k->type == NULL) {
    char names[128] = "";
    for (const kind_t *n = kinds; n->type; n++)
      snprintf(names + strlen(names), sizeof names - strlen(names), "%s%s", n == kinds ? "" : ", ", n->type);
    fail_here(c, "'%.64s' is not a %s type (one of %s)", type, what, names);
    leave(c);
    return -1;
  }
  leave(c);
  if (k->keys && check_keys(c, sec, k->keys) != 0)
    return -1;
  if (!k->implemented) {
    field(c, sec, "type");
    fail_here(c, "%s type %s is not implemented yet: remove the %s section (a later issue adds it)", what,
              k->type, what);
    leave(c);
    return -1;
  }
  return 0;
}

/* A nested table of a tenant, flattened for the module that reads it; with
 * kinds, checked against the kind its 'type' names first. */
static int load_section(ctx_t *c, int t, const char *key, const kind_t *kinds, tg_config_section_t *s) {
  int rc = 0;
  int type = field(c, t, key);
  if (type == LUA_TNIL)
    goto done;
  if ((rc = want_type(c, LUA_TTABLE, "a table")) != 0)
    goto done;
  int sec = lua_gettop(c->L);
  if (kinds && (rc = check_kind(c, sec, key, kinds)) != 0)
    goto done;
  char prefix[MAX_KEY_PATH] = "";
  size_t cap = 0;
  if ((rc = flatten(c, sec, prefix, 0, s, &cap, 1)) != 0)
    goto done;
  qsort(s->items, s->nitems, sizeof(s->items[0]), cmp_kv);
  for (size_t i = 1; i < s->nitems; i++)
    if (strcmp(s->items[i - 1].key, s->items[i].key) == 0) {
      rc = fail_here(c, "key '%s' is given twice", s->items[i].key);
      goto done;
    }
done:
  leave(c);
  return rc;
}

/* payments.x402.price was the HTTP path's flat price before that path
 * quoted from the catalog like DiscoverResources: a key that nothing reads
 * any more is refused with where prices come from now. */
static int refuse_x402_price(ctx_t *c, int t) {
  int rc = 0;
  if (field(c, t, "payments") == LUA_TTABLE) {
    if (field(c, lua_gettop(c->L), "x402") == LUA_TTABLE) {
      if (field(c, lua_gettop(c->L), "price") != LUA_TNIL)
        rc = fail_here(c, "prices come from the tenant's catalog (the RSL <amount>) and its policy's price "
                          "hook, the same on HTTP and DiscoverResources: remove payments.x402.price");
      leave(c);
    }
    leave(c);
  }
  leave(c);
  return rc;
}

static const char *const top_keys[] = {"listen", "admin",  "workers", "data_dir", "log_level",
                                       "limits", "redis",  "rate_limit", "exchange", "ingest",
                                       "policy", "ledger", "instance", "tenants",  "tracing", "access_log", NULL};
static const char *const listener_keys[] = {"host", "port", "tls_cert", "tls_key", NULL};
static const char *const admin_keys[] = {"host", "port", "token_file", NULL};
static const char *const limit_keys[] = {"max_header_bytes", "max_body_bytes", "header_timeout_ms",
                                         "body_timeout_ms", "idle_timeout_ms", "max_connections",
                                         "shutdown_grace_ms", NULL};
static const char *const tenant_keys[] = {"name", "hosts", "catalog", "policy", "signer", "billing",
                                          "payments", "usage", NULL};
static const char *const usage_keys[] = {"report_within_s", "overdue_limit", "token_pricing", NULL};
static const char *const catalog_keys[] = {"source", "refresh_s", "strict", NULL};
static const char *const redis_keys[] = {"host", "port", "password_file", "timeout_ms", "db", NULL};
static const char *const rate_limit_keys[] = {"mode", "table_size", NULL};
static const char *const ledger_keys[] = {"mode", "wal", "snapshot_every", "idempotency", "ship", "accounts", NULL};
static const char *const ship_keys[] = {"store", "batch", "timeout_ms", NULL};
static const char *const tracing_keys[] = {"endpoint", "sample", "service_name", "batch", "flush_ms", "queue", NULL};
static const char *const access_log_keys[] = {"sample", "errors", NULL};
static const char *const account_keys[] = {"billing_reference", "currency", "amount", "reference", NULL};

/* The table on top of the stack as a listener (or the admin listener). */
static int load_listener(ctx_t *c, tg_config_listener_t *l, bool admin) {
  int t = lua_gettop(c->L);
  long long port = -1;
  if (want_type(c, LUA_TTABLE, "a table { host = ..., port = ... }") != 0 ||
      check_keys(c, t, admin ? admin_keys : listener_keys) != 0 || req_string(c, t, "host", &l->host) != 0)
    return -1;
  if (!valid_bind_host(l->host)) {
    field(c, t, "host");
    fail_here(c, "'%s' is not an IP address or host name", l->host);
    leave(c);
    return -1;
  }
  if (field(c, t, "port") == LUA_TNIL) {
    leave(c);
    return fail_here(c, "missing 'port' (0 picks a free port)");
  }
  int rc = want_integer(c, 0, 65535, &port);
  leave(c);
  if (rc != 0)
    return -1;
  l->port = (int)port;
  if (admin) {
    if (field(c, t, "token_file") == LUA_TNIL) {
      leave(c);
      return fail_here(c, "missing 'token_file': the admin listener requires a token");
    }
    rc = want_file(c, &c->cfg->admin_token_file);
    leave(c);
    return rc;
  }
  if (opt_file(c, t, "tls_cert", &l->tls_cert) != 0 || opt_file(c, t, "tls_key", &l->tls_key) != 0)
    return -1;
  if ((l->tls_cert == NULL) != (l->tls_key == NULL)) {
    field(c, t, l->tls_cert ? "tls_cert" : "tls_key");
    fail_here(c, "tls_cert and tls_key go together");
    leave(c);
    return -1;
  }
  return 0;
}

static int load_listen(ctx_t *c, int root) {
  tg_config_t *cfg = c->cfg;
  long long n = 0;
  int rc = -1;
  if (field(c, root, "listen") == LUA_TNIL) {
    leave(c);
    return fail_here(c, "missing 'listen': at least one listener is required");
  }
  int t = lua_gettop(c->L);
  if (want_type(c, LUA_TTABLE, "a list of listeners") != 0 || check_list(c, t, &n) != 0)
    goto done;
  if (n == 0) {
    fail_here(c, "at least one listener is required");
    goto done;
  }
  if (n > TG_CONFIG_MAX_LISTENERS) {
    fail_here(c, "at most %d listeners, got %lld", TG_CONFIG_MAX_LISTENERS, n);
    goto done;
  }
  for (long long i = 1; i <= n; i++) {
    element(c, t, i);
    cfg->nlisten = (size_t)i;
    int lrc = load_listener(c, &cfg->listen[i - 1], false);
    if (lrc == 0) {
      for (long long j = 0; j < i - 1; j++) {
        const tg_config_listener_t *a = &cfg->listen[j], *b = &cfg->listen[i - 1];
        if (b->port != 0 && a->port == b->port && strcasecmp(a->host, b->host) == 0) {
          field(c, lua_gettop(c->L), "port");
          lrc = fail_here(c, "%s:%d is already listen[%lld]", b->host, b->port, j + 1);
          leave(c);
          break;
        }
      }
    }
    leave(c);
    if (lrc != 0)
      goto done;
  }
  rc = 0;
done:
  leave(c);
  return rc;
}

static int load_admin(ctx_t *c, int root) {
  tg_config_t *cfg = c->cfg;
  int rc = 0;
  if (field(c, root, "admin") != LUA_TNIL) {
    rc = load_listener(c, &cfg->admin, true);
    for (size_t j = 0; rc == 0 && j < cfg->nlisten; j++) {
      if (cfg->admin.port != 0 && cfg->admin.port == cfg->listen[j].port &&
          strcasecmp(cfg->admin.host, cfg->listen[j].host) == 0) {
        field(c, lua_gettop(c->L), "port");
        rc = fail_here(c, "%s:%d is already listen[%zu]", cfg->admin.host, cfg->admin.port, j + 1);
        leave(c);
      }
    }
  }
  leave(c);
  return rc;
}

static int load_limits(ctx_t *c, int root) {
  tg_config_t *cfg = c->cfg;
  long long v[7] = {16384, 4194304, 10000, 30000, 60000, 10000, 10000};
  int rc = 0;
  if (field(c, root, "limits") != LUA_TNIL) {
    int t = lua_gettop(c->L);
    rc = want_type(c, LUA_TTABLE, "a table") != 0 || check_keys(c, t, limit_keys) != 0 ? -1 : 0;
    for (int i = 0; rc == 0 && i < 7; i++)
      rc = opt_integer(c, t, limit_keys[i], 1, UINT32_MAX, &v[i]);
  }
  leave(c);
  cfg->max_header_bytes = (size_t)v[0];
  cfg->max_body_bytes = (size_t)v[1];
  cfg->header_timeout_ms = (uint32_t)v[2];
  cfg->body_timeout_ms = (uint32_t)v[3];
  cfg->idle_timeout_ms = (uint32_t)v[4];
  cfg->max_connections = (uint32_t)v[5];
  cfg->shutdown_grace_ms = (uint32_t)v[6];
  return rc;
}

static int load_redis(ctx_t *c, int root) {
  tg_config_redis_t *r = &c->cfg->redis;
  long long port = 6379, timeout = 20, db = 0;
  int rc = 0;
  if (field(c, root, "redis") != LUA_TNIL) {
    int t = lua_gettop(c->L);
    if (want_type(c, LUA_TTABLE, "a table { host = ..., port = ... }") != 0 || check_keys(c, t, redis_keys) != 0 ||
        opt_string(c, t, "host", &r->host) != 0 || opt_integer(c, t, "port", 1, 65535, &port) != 0 ||
        opt_file(c, t, "password_file", &r->password_file) != 0 ||
        opt_integer(c, t, "timeout_ms", 1, 60000, &timeout) != 0 || opt_integer(c, t, "db", 0, 65535, &db) != 0)
      rc = -1;
    if (rc == 0 && r->host == NULL && (r->host = strdup("127.0.0.1")) == NULL)
      rc = fail_oom(c);
    if (rc == 0 && !valid_bind_host(r->host)) {
      field(c, t, "host");
      rc = fail_here(c, "'%s' is not an IP address or host name", r->host);
      leave(c);
    }
  }
  leave(c);
  r->port = (int)port;
  r->timeout_ms = (uint32_t)timeout;
  r->db = (int)db;
  return rc;
}

/* The optional access_log section (config.h): absent, no access log. */
static int load_access_log(ctx_t *c, int root) {
  tg_config_access_log_t *al = &c->cfg->access_log;
  int rc = 0;
  if (field(c, root, "access_log") != LUA_TNIL) {
    int t = lua_gettop(c->L);
    al->enabled = true;
    al->sample = 1.0;
    al->errors = true;
    if (want_type(c, LUA_TTABLE, "a table { sample = 1.0, errors = true }") != 0 ||
        check_keys(c, t, access_log_keys) != 0 || opt_boolean(c, t, "errors", &al->errors) != 0 ||
        opt_fraction(c, t, "sample", &al->sample) != 0)
      rc = -1;
  }
  leave(c);
  return rc;
}

/* The optional tracing section (config.h): absent, tracing is off. */
static int load_tracing(ctx_t *c, int root) {
  tg_config_tracing_t *tr = &c->cfg->tracing;
  long long batch = 512, flush = 1000, queue = 8192;
  int rc = 0;
  tr->sample = 1.0;
  if (field(c, root, "tracing") != LUA_TNIL) {
    int t = lua_gettop(c->L);
    if (want_type(c, LUA_TTABLE, "a table { endpoint = ..., sample = ... }") != 0 ||
        check_keys(c, t, tracing_keys) != 0 || req_string(c, t, "endpoint", &tr->endpoint) != 0 ||
        opt_string(c, t, "service_name", &tr->service_name) != 0 ||
        opt_integer(c, t, "batch", 1, 65536, &batch) != 0 || opt_integer(c, t, "flush_ms", 10, 600000, &flush) != 0 ||
        opt_integer(c, t, "queue", 16, 1 << 20, &queue) != 0 || opt_fraction(c, t, "sample", &tr->sample) != 0)
      rc = -1;
    if (rc == 0 && strncmp(tr->endpoint, "http://", 7) != 0 && strncmp(tr->endpoint, "https://", 8) != 0) {
      field(c, t, "endpoint");
      rc = fail_here(c, "'%s' is not an http(s) URL", tr->endpoint);
      leave(c);
    }
    if (rc == 0 && tr->service_name == NULL && (tr->service_name = strdup("tollgate")) == NULL)
      rc = fail_oom(c);
  }
  leave(c);
  tr->batch = (uint32_t)batch;
  tr->flush_ms = (uint32_t)flush;
  tr->queue = (uint32_t)queue;
  return rc;
}

/* After load_redis: mode "redis" needs its section. */
static int load_rate_limit(ctx_t *c, int root) {
  tg_config_t *cfg = c->cfg;
  long long size = 65536;
  char *mode = NULL;
  int rc = 0;
  if (field(c, root, "rate_limit") != LUA_TNIL) {
    int t = lua_gettop(c->L);
    if (want_type(c, LUA_TTABLE, "a table { mode = ..., table_size = ... }") != 0 ||
        check_keys(c, t, rate_limit_keys) != 0 || opt_string(c, t, "mode", &mode) != 0 ||
        opt_integer(c, t, "table_size", 16, 1 << 26, &size) != 0)
      rc = -1;
    if (rc == 0 && (size & (size - 1)) != 0) {
      field(c, t, "table_size");
      rc = fail_here(c, "must be a power of two, got %lld", size);
      leave(c);
    }
    if (rc == 0 && mode != NULL) {
      if (strcmp(mode, "redis") == 0) {
        cfg->rate_limit_mode = TG_CONFIG_RATE_LIMIT_REDIS;
      } else if (strcmp(mode, "local") != 0) {
        field(c, t, "mode");
        rc = fail_here(c, "'%s' is not one of local, redis", mode);
        leave(c);
      }
    }
    if (rc == 0 && cfg->rate_limit_mode == TG_CONFIG_RATE_LIMIT_REDIS && cfg->redis.host == NULL) {
      field(c, t, "mode");
      rc = fail_here(c, "'redis' needs a top-level redis = { host = ..., port = ... } section");
      leave(c);
    }
  }
  leave(c);
  free(mode);
  cfg->rate_limit_table_size = (size_t)size;
  return rc;
}

typedef struct int_key {
  const char *key;
  long long lo, hi;
} int_key_t;

/* An optional section of integer settings: each key in its range, v[i] (the
 * default) kept when the key is absent. keys ends with a NULL key. */
static int load_ints(ctx_t *c, int root, const char *section, const int_key_t *keys, long long *v) {
  const char *names[8];
  size_t n = 0;
  for (; keys[n].key && n < sizeof names / sizeof names[0] - 1; n++)
    names[n] = keys[n].key;
  names[n] = NULL;
  int rc = 0;
  if (field(c, root, section) != LUA_TNIL) {
    int t = lua_gettop(c->L);
    rc = want_type(c, LUA_TTABLE, "a table") != 0 || check_keys(c, t, names) != 0 ? -1 : 0;
    for (size_t i = 0; rc == 0 && i < n; i++)
      rc = opt_integer(c, t, keys[i].key, keys[i].lo, keys[i].hi, &v[i]);
  }
  leave(c);
  return rc;
}

/* The ranges are documented in config.h: keep them in step. */
static int load_settings(ctx_t *c, int root) {
  tg_config_t *cfg = c->cfg;
  static const int_key_t exchange[] = {{"offer_ttl_s", 1, 86400}, {"idempotency_key_max", 16, 1024}, {NULL, 0, 0}};
  static const int_key_t ingest[] = {{"max_bytes", 1024, 1LL << 30},
                                     {"timeout_ms", 100, 600000},
                                     {"initial_wait_ms", 0, 600000},
                                     {NULL, 0, 0}};
  static const int_key_t policy[] = {{"time_limit_ms", 1, 10000},
                                     {"load_time_limit_ms", 1, 60000},
                                     {"memory_limit", 1LL << 20, 1LL << 31},
                                     {"watch_debounce_ms", 0, 60000},
                                     {NULL, 0, 0}};
  long long ex[] = {TG_CONFIG_DEFAULT_OFFER_TTL_S, TG_CONFIG_DEFAULT_IDEMPOTENCY_KEY_MAX};
  long long in[] = {TG_CONFIG_DEFAULT_INGEST_MAX_BYTES, TG_CONFIG_DEFAULT_INGEST_TIMEOUT_MS,
                    TG_CONFIG_DEFAULT_INGEST_INITIAL_WAIT_MS};
  long long po[] = {TG_CONFIG_DEFAULT_POLICY_TIME_LIMIT_MS, TG_CONFIG_DEFAULT_POLICY_LOAD_TIME_LIMIT_MS,
                    TG_CONFIG_DEFAULT_POLICY_MEMORY_LIMIT, TG_CONFIG_DEFAULT_POLICY_WATCH_DEBOUNCE_MS};
  int rc = load_ints(c, root, "exchange", exchange, ex) != 0 || load_ints(c, root, "ingest", ingest, in) != 0 ||
                   load_ints(c, root, "policy", policy, po) != 0
               ? -1
               : 0;
  cfg->offer_ttl_s = (uint32_t)ex[0];
  cfg->idempotency_key_max = (uint32_t)ex[1];
  cfg->ingest_max_bytes = (size_t)in[0];
  cfg->ingest_timeout_ms = (uint32_t)in[1];
  cfg->ingest_initial_wait_ms = (uint32_t)in[2];
  cfg->policy_time_limit_ms = (uint32_t)po[0];
  cfg->policy_load_time_limit_ms = (uint32_t)po[1];
  cfg->policy_memory_limit = (size_t)po[2];
  cfg->policy_watch_debounce_ms = (uint32_t)po[3];
  return rc;
}

/* One ledger.accounts entry: an opening credit, applied once per reference. */
static int load_account(ctx_t *c, tg_config_account_t *a) {
  int t = lua_gettop(c->L);
  long long amount = 0;
  if (want_type(c, LUA_TTABLE, "a table { billing_reference = ..., amount = ... }") != 0 ||
      check_keys(c, t, account_keys) != 0 || req_string(c, t, "billing_reference", &a->billing_reference) != 0 ||
      opt_string(c, t, "currency", &a->currency) != 0 || opt_string(c, t, "reference", &a->reference) != 0 ||
      opt_integer(c, t, "amount", 1, 1LL << 53, &amount) != 0)
    return -1;
  a->amount = amount;
  if (amount == 0) {
    return fail_here(c, "missing 'amount' (atomic units of the currency, > 0)");
  }
  size_t rl = strlen(a->billing_reference);
  if (rl == 0 || rl > 256) {
    field(c, t, "billing_reference");
    fail_here(c, "must be 1 to 256 bytes");
    leave(c);
    return -1;
  }
  if (a->currency == NULL && (a->currency = strdup("USD")) == NULL)
    return fail_oom(c);
  bool ok = a->currency[0] != '\0' && strlen(a->currency) <= 16;
  for (const char *p = a->currency; ok && *p; p++)
    ok = (*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9');
  if (!ok) {
    field(c, t, "currency");
    fail_here(c, "'%.32s' is not a currency code ([A-Za-z0-9], 1 to 16 characters)", a->currency);
    leave(c);
    return -1;
  }
  if (a->reference == NULL) {
    size_t n = strlen(a->billing_reference) + strlen(a->currency) + 16;
    if ((a->reference = malloc(n)) == NULL)
      return fail_oom(c);
    snprintf(a->reference, n, "config:%s:%s", a->billing_reference, a->currency);
  }
  return 0;
}

/* ledger.ship, in the ledger table t (after load_redis: store "redis" needs its section). */
static int load_ship(ctx_t *c, int t, tg_config_ledger_t *l) {
  long long batch = 512, timeout = 1000;
  char *store = NULL;
  int rc = 0;
  if (field(c, t, "ship") != LUA_TNIL) {
    int st = lua_gettop(c->L);
    if (want_type(c, LUA_TTABLE, "a table { store = ... }") != 0 || check_keys(c, st, ship_keys) != 0 ||
        opt_string(c, st, "store", &store) != 0 || opt_integer(c, st, "batch", 1, 65536, &batch) != 0 ||
        opt_integer(c, st, "timeout_ms", 1, 60000, &timeout) != 0)
      rc = -1;
    if (rc == 0 && store != NULL && strcmp(store, "none") != 0) {
      field(c, st, "store");
      if (strcmp(store, "redis") != 0)
        rc = fail_here(c, "'%s' is not one of none, redis", store);
      else if (c->cfg->redis.host == NULL)
        rc = fail_here(c, "'redis' needs a top-level redis = { host = ..., port = ... } section");
      else
        l->ship_store = TG_CONFIG_SHIP_REDIS;
      leave(c);
    }
  }
  leave(c);
  free(store);
  l->ship_batch = (uint32_t)batch;
  l->ship_timeout_ms = (uint32_t)timeout;
  return rc;
}

/* After load_redis: mode "redis" needs its section. The ranges are in config.h. */
static int load_ledger(ctx_t *c, int root) {
  tg_config_ledger_t *l = &c->cfg->ledger;
  static const int_key_t wal[] = {{"capacity_bytes", 1LL << 20, 1LL << 40},
                                  {"segment_bytes", 1LL << 16, 1LL << 30},
                                  {"batch_bytes", 512, 1LL << 26},
                                  {"batch_interval_us", 0, 1000000},
                                  {"retention_bytes", 0, 1LL << 40},
                                  {"retention_age_s", 0, 1LL << 31},
                                  {NULL, 0, 0}};
  static const int_key_t idem[] = {{"ttl_s", 1, 30LL * 86400},
                                   {"max_entries", 1024, 1LL << 26},
                                   {"pending_ttl_ms", 100, 3600000},
                                   {"wait_ms", 0, 60000},
                                   {NULL, 0, 0}};
  long long w[] = {TG_CONFIG_DEFAULT_WAL_CAPACITY, 64LL << 20, 64LL << 10, 0, 512LL << 20, 7LL * 86400};
  long long id[] = {86400, 1000000, 30000, 2000};
  long long every = 100000, n = 0;
  char *mode = NULL;
  int rc = 0;
  if (field(c, root, "ledger") != LUA_TNIL) {
    int t = lua_gettop(c->L);
    if (want_type(c, LUA_TTABLE, "a table") != 0 || check_keys(c, t, ledger_keys) != 0 ||
        opt_string(c, t, "mode", &mode) != 0 || load_ints(c, t, "wal", wal, w) != 0 ||
        load_ints(c, t, "idempotency", idem, id) != 0 ||
        opt_integer(c, t, "snapshot_every", 1000, 1LL << 31, &every) != 0 || load_ship(c, t, l) != 0)
      rc = -1;
    if (rc == 0 && mode != NULL) {
      if (strcmp(mode, "redis") == 0) {
        l->mode = TG_CONFIG_LEDGER_REDIS;
      } else if (strcmp(mode, "local") != 0) {
        field(c, t, "mode");
        rc = fail_here(c, "'%s' is not one of local, redis", mode);
        leave(c);
      }
    }
    if (rc == 0 && l->mode == TG_CONFIG_LEDGER_REDIS && c->cfg->redis.host == NULL) {
      field(c, t, "mode");
      rc = fail_here(c, "'redis' needs a top-level redis = { host = ..., port = ... } section");
      leave(c);
    }
    if (rc == 0 && w[1] > w[0]) {
      field(c, t, "wal");
      rc = fail_here(c, "segment_bytes (%lld) is above capacity_bytes (%lld)", w[1], w[0]);
      leave(c);
    }
    if (rc == 0 && field(c, t, "accounts") != LUA_TNIL) {
      int at = lua_gettop(c->L);
      if (want_type(c, LUA_TTABLE, "a list of accounts") != 0 || check_list(c, at, &n) != 0)
        rc = -1;
      else if (n > 0 && (l->accounts = calloc((size_t)n, sizeof *l->accounts)) == NULL)
        rc = fail_oom(c);
      for (long long i = 1; rc == 0 && i <= n; i++) {
        element(c, at, i);
        l->naccounts = (size_t)i;
        rc = load_account(c, &l->accounts[i - 1]);
        leave(c);
      }
    }
    leave(c);
  }
  leave(c);
  free(mode);
  l->wal_capacity_bytes = (uint64_t)w[0];
  l->wal_segment_bytes = (uint64_t)w[1];
  l->wal_batch_bytes = (uint32_t)w[2];
  l->wal_batch_interval_us = (uint32_t)w[3];
  l->wal_retention_bytes = (uint64_t)w[4];
  l->wal_retention_age_s = (uint32_t)w[5];
  l->snapshot_every = (uint32_t)every;
  l->idem_ttl_s = (uint32_t)id[0];
  l->idem_max_entries = (uint32_t)id[1];
  l->idem_pending_ttl_ms = (uint32_t)id[2];
  l->idem_wait_ms = (uint32_t)id[3];
  return rc;
}

static bool is_url(const char *s) {
  return strncasecmp(s, "http://", 7) == 0 || strncasecmp(s, "https://", 8) == 0;
}

static int load_catalog(ctx_t *c, int t, tg_config_tenant_t *tn) {
  int rc = 0;
  long long refresh = 300;
  if (field(c, t, "catalog") != LUA_TNIL) {
    int ct = lua_gettop(c->L);
    if (want_type(c, LUA_TTABLE, "a table { source = ... }") != 0 || check_keys(c, ct, catalog_keys) != 0 ||
        opt_integer(c, ct, "refresh_s", 1, UINT32_MAX, &refresh) != 0 ||
        opt_boolean(c, ct, "strict", &tn->catalog_strict) != 0) {
      rc = -1;
    } else if (field(c, ct, "source") == LUA_TNIL) {
      leave(c);
      rc = fail_here(c, "missing 'source' (an RSL file or an http(s) URL)");
    } else {
      const char *s = lua_type(c->L, -1) == LUA_TSTRING ? lua_tostring(c->L, -1) : NULL;
      if (s != NULL && is_url(s)) {
        const char *host = s + (s[4] == ':' ? 7 : 8);
        bool clean = true;
        for (const char *p = s; *p; p++)
          if ((unsigned char)*p <= ' ' || *p == 0x7f)
            clean = false;
        rc = (*host == '\0' || *host == '/' || !clean) ? fail_here(c, "'%s' is not a valid URL", s)
                                                       : want_string(c, &tn->catalog_source);
      } else {
        rc = want_file(c, &tn->catalog_source);
      }
      leave(c);
    }
  }
  leave(c);
  tn->catalog_refresh_s = (uint32_t)refresh;
  return rc;
}

static int load_hosts(ctx_t *c, int t, tg_config_tenant_t *tn) {
  long long n = 0;
  int rc = -1;
  if (field(c, t, "hosts") == LUA_TNIL) {
    leave(c);
    return fail_here(c, "missing 'hosts' (the Host names this tenant answers to)");
  }
  int ht = lua_gettop(c->L);
  if (want_type(c, LUA_TTABLE, "a list of host names") != 0 || check_list(c, ht, &n) != 0)
    goto done;
  if (n == 0) {
    fail_here(c, "at least one host is required");
    goto done;
  }
  tn->hosts = calloc((size_t)n, sizeof(char *));
  if (tn->hosts == NULL) {
    fail_oom(c);
    goto done;
  }
  for (long long i = 1; i <= n; i++) {
    element(c, ht, i);
    tn->nhosts = (size_t)i;
    int hrc = want_string(c, &tn->hosts[i - 1]);
    if (hrc == 0) {
      for (char *p = tn->hosts[i - 1]; *p; p++)
        if (*p >= 'A' && *p <= 'Z')
          *p = (char)(*p + 32);
      if (!valid_tenant_host(tn->hosts[i - 1]))
        hrc = fail_here(c, "'%s' is not a valid host name (name, IPv4 or [IPv6], optional :port)",
                        tn->hosts[i - 1]);
    }
    leave(c);
    if (hrc != 0)
      goto done;
  }
  rc = 0;
done:
  leave(c);
  return rc;
}

/* The tenant's usage section (absent: zero, flat). */
static int load_usage(ctx_t *c, int t, tg_config_tenant_t *tn) {
  int rc = 0;
  long long within = 0, limit = 0;
  char *pricing = NULL;
  if (field(c, t, "usage") != LUA_TNIL) {
    int ut = lua_gettop(c->L);
    if (want_type(c, LUA_TTABLE, "a table { report_within_s = ..., overdue_limit = ..., token_pricing = ... }") != 0 ||
        check_keys(c, ut, usage_keys) != 0 || opt_integer(c, ut, "report_within_s", 0, 31536000, &within) != 0 ||
        opt_integer(c, ut, "overdue_limit", 0, 1000000, &limit) != 0 ||
        opt_string(c, ut, "token_pricing", &pricing) != 0) {
      rc = -1;
    } else if (pricing != NULL && strcmp(pricing, "flat") != 0 && strcmp(pricing, "per_1k") != 0) {
      field(c, ut, "token_pricing");
      rc = fail_here(c, "'%s' is not a token pricing: \"flat\" or \"per_1k\"", pricing);
      leave(c);
    }
  }
  leave(c);
  tn->usage.report_within_s = (uint32_t)within;
  tn->usage.overdue_limit = (uint32_t)limit;
  tn->usage.token_pricing =
      pricing && strcmp(pricing, "per_1k") == 0 ? TG_CONFIG_TOKEN_PRICING_PER_1K : TG_CONFIG_TOKEN_PRICING_FLAT;
  free(pricing);
  return rc;
}

static int load_tenant(ctx_t *c, tg_config_tenant_t *tn) {
  int t = lua_gettop(c->L);
  if (want_type(c, LUA_TTABLE, "a table { name = ..., hosts = {...} }") != 0 ||
      check_keys(c, t, tenant_keys) != 0 || req_string(c, t, "name", &tn->name) != 0)
    return -1;
  if (!valid_tenant_name(tn->name)) {
    field(c, t, "name");
    fail_here(c, "'%s' is not a valid tenant name ([a-z0-9_-], 1 to 64 characters)", tn->name);
    leave(c);
    return -1;
  }
  if (load_hosts(c, t, tn) != 0 || load_catalog(c, t, tn) != 0 || opt_file(c, t, "policy", &tn->policy_file) != 0 ||
      load_section(c, t, "signer", signer_kinds, &tn->signer) != 0 ||
      load_section(c, t, "billing", billing_kinds, &tn->billing) != 0 ||
      refuse_x402_price(c, t) != 0 || load_section(c, t, "payments", NULL, &tn->payments) != 0 ||
      load_usage(c, t, tn) != 0)
    return -1;
  return 0;
}

typedef struct named {
  const char *s;
  size_t tenant, pos;
} named_t;

static int cmp_named(const void *a, const void *b) {
  const named_t *x = a, *y = b;
  int r = strcmp(x->s, y->s);
  if (r == 0)
    r = x->tenant != y->tenant ? (x->tenant < y->tenant ? -1 : 1) : (x->pos < y->pos ? -1 : x->pos > y->pos);
  return r;
}

/* Among equal neighbours of a sorted list, the repeat that comes first in
 * the file; its earlier twin goes in *first. */
static const named_t *first_repeat(const named_t *v, size_t n, const named_t **first) {
  const named_t *best = NULL;
  for (size_t i = 1; i < n; i++)
    if (strcmp(v[i - 1].s, v[i].s) == 0 &&
        (best == NULL || v[i].tenant < best->tenant || (v[i].tenant == best->tenant && v[i].pos < best->pos))) {
      best = &v[i];
      *first = &v[i - 1];
    }
  return best;
}

/* Tenant names and hosts are unique: sorted, so thousands of tenants stay cheap. */
static int check_unique(ctx_t *c) {
  tg_config_t *cfg = c->cfg;
  size_t nhosts = 0;
  int rc = 0;
  for (size_t i = 0; i < cfg->ntenants; i++)
    nhosts += cfg->tenants[i].nhosts;
  named_t *v = malloc((cfg->ntenants + nhosts + 1) * sizeof(named_t));
  if (v == NULL)
    return fail_oom(c);
  const named_t *dup, *orig = NULL;
  for (size_t i = 0; i < cfg->ntenants; i++)
    v[i] = (named_t){cfg->tenants[i].name, i, 0};
  qsort(v, cfg->ntenants, sizeof(*v), cmp_named);
  if ((dup = first_repeat(v, cfg->ntenants, &orig)) != NULL) {
    c->depth = 0;
    path_push(c, "tenants", 0);
    path_push(c, NULL, (long long)dup->tenant + 1);
    path_push(c, "name", 0);
    rc = fail_here(c, "tenant '%s' is already defined by tenants[%zu]", dup->s, orig->tenant + 1);
    goto done;
  }
  size_t k = 0;
  for (size_t i = 0; i < cfg->ntenants; i++)
    for (size_t j = 0; j < cfg->tenants[i].nhosts; j++)
      v[k++] = (named_t){cfg->tenants[i].hosts[j], i, j};
  qsort(v, k, sizeof(*v), cmp_named);
  if ((dup = first_repeat(v, k, &orig)) != NULL) {
    c->depth = 0;
    path_push(c, "tenants", 0);
    path_push(c, NULL, (long long)dup->tenant + 1);
    path_push(c, "hosts", 0);
    path_push(c, NULL, (long long)dup->pos + 1);
    if (orig->tenant == dup->tenant)
      rc = fail_here(c, "host '%s' is listed twice", dup->s);
    else
      rc = fail_here(c, "host '%s' is already used by tenant '%s'", dup->s, cfg->tenants[orig->tenant].name);
  }
done:
  free(v);
  return rc;
}

static int load_tenants(ctx_t *c, int root) {
  tg_config_t *cfg = c->cfg;
  long long n = 0;
  int rc = -1;
  if (field(c, root, "tenants") == LUA_TNIL) {
    leave(c);
    return 0;
  }
  int t = lua_gettop(c->L);
  if (want_type(c, LUA_TTABLE, "a list of tenants") != 0 || check_list(c, t, &n) != 0)
    goto done;
  if (n > 0 && (cfg->tenants = calloc((size_t)n, sizeof(tg_config_tenant_t))) == NULL) {
    fail_oom(c);
    goto done;
  }
  for (long long i = 1; i <= n; i++) {
    element(c, t, i);
    cfg->ntenants = (size_t)i;
    int trc = load_tenant(c, &cfg->tenants[i - 1]);
    leave(c);
    if (trc != 0)
      goto done;
  }
  rc = 0;
done:
  leave(c);
  return rc == 0 ? check_unique(c) : rc;
}

/* instance: names this gateway in log records and shared keys; default the
 * host name. */
static int load_instance(ctx_t *c, int root) {
  tg_config_t *cfg = c->cfg;
  if (opt_string(c, root, "instance", &cfg->instance) != 0)
    return -1;
  if (cfg->instance == NULL) {
    /* The host name and the first listener's port: two gateways on one
     * machine are two instances. */
    char host[256] = "", id[64];
    if (gethostname(host, sizeof host - 1) != 0 || host[0] == '\0')
      snprintf(host, sizeof host, "tollgate");
    snprintf(id, sizeof id, "%.48s:%d", host, cfg->nlisten ? cfg->listen[0].port : 0);
    if ((cfg->instance = strdup(id)) == NULL)
      return fail_oom(c);
  }
  bool ok = cfg->instance[0] != '\0' && strlen(cfg->instance) <= 64;
  for (const char *p = cfg->instance; ok && *p; p++)
    ok = (unsigned char)*p > 0x20 && (unsigned char)*p < 0x7f;
  if (!ok) {
    field(c, root, "instance");
    fail_here(c, "must be 1 to 64 printable ASCII characters without spaces");
    leave(c);
    return -1;
  }
  return 0;
}

static int validate(ctx_t *c, int root) {
  tg_config_t *cfg = c->cfg;
  long long workers = 0;
  char *data_dir = NULL;
  if (check_keys(c, root, top_keys) != 0 || load_listen(c, root) != 0 || load_admin(c, root) != 0 ||
      opt_integer(c, root, "workers", 0, 256, &workers) != 0 || opt_string(c, root, "data_dir", &data_dir) != 0)
    goto fail;
  cfg->workers = (int)workers;
  cfg->data_dir = resolve_path(cfg->dir, data_dir ? data_dir : "data");
  free(data_dir);
  data_dir = NULL;
  if (cfg->data_dir == NULL) {
    fail_oom(c);
    goto fail;
  }
  if (opt_string(c, root, "log_level", &cfg->log_level) != 0)
    goto fail;
  if (cfg->log_level == NULL && (cfg->log_level = strdup("info")) == NULL) {
    fail_oom(c);
    goto fail;
  }
  if (tg_log_level_parse(cfg->log_level) < 0) {
    field(c, root, "log_level");
    fail_here(c, "'%s' is not one of debug, info, warn, error", cfg->log_level);
    leave(c);
    goto fail;
  }
  if (load_limits(c, root) != 0 || load_redis(c, root) != 0 || load_rate_limit(c, root) != 0 ||
      load_settings(c, root) != 0 || load_ledger(c, root) != 0 || load_instance(c, root) != 0 ||
      load_tracing(c, root) != 0 || load_access_log(c, root) != 0 || load_tenants(c, root) != 0)
    goto fail;
  return 0;
fail:
  free(data_dir);
  return -1;
}

/* LuaJIT's messages start with the chunk name "config:LINE:"; report them
 * as FILE:LINE instead (a short chunk name is never truncated). */
static void fail_lua(ctx_t *c, const char *msg) {
  if (msg == NULL) {
    fail_line(c, 0, "error object is not a string");
    return;
  }
  if (strncmp(msg, "config:", 7) == 0 && msg[7] >= '0' && msg[7] <= '9') {
    char *end;
    long line = strtol(msg + 7, &end, 10);
    if (end[0] == ':' && line > 0 && line < INT_MAX) {
      fail_line(c, (int)line, "%s", end[1] == ' ' ? end + 2 : end + 1);
      return;
    }
  }
  fail_line(c, 0, "%s", msg);
}

static int run(lua_State *L) {
  ctx_t *c = lua_touserdata(L, 1);
  lua_settop(L, 0);
  sandbox_env(L);
  if (luaL_loadbufferx(L, c->src, c->srclen, "=config", "t") != 0) {
    if (c->abort == ABORT_MEMORY)
      fail_line(c, 0, "evaluating the config used more than %u MiB", TG_CONFIG_MEMORY_LIMIT >> 20);
    else
      fail_lua(c, lua_tostring(L, -1));
    return 0;
  }
  lua_pushvalue(L, 1);
  lua_setfenv(L, -2);
  clock_gettime(CLOCK_MONOTONIC, &c->deadline);
  c->deadline.tv_sec += TG_CONFIG_TIME_LIMIT_MS / 1000;
  c->deadline.tv_nsec += (long)(TG_CONFIG_TIME_LIMIT_MS % 1000) * 1000000L;
  if (c->deadline.tv_nsec >= 1000000000L) {
    c->deadline.tv_sec++;
    c->deadline.tv_nsec -= 1000000000L;
  }
  lua_sethook(L, sandbox_hook, LUA_MASKCOUNT, HOOK_EVERY);
  int status = lua_pcall(L, 0, 1, 0);
  lua_sethook(L, NULL, 0, 0);
  if (c->abort == ABORT_TIME)
    fail_line(c, c->abort_line, "evaluating the config took longer than %d ms (an endless loop?)",
              TG_CONFIG_TIME_LIMIT_MS);
  else if (c->abort == ABORT_MEMORY)
    fail_line(c, 0, "evaluating the config used more than %u MiB", TG_CONFIG_MEMORY_LIMIT >> 20);
  else if (status != 0)
    fail_lua(c, lua_tostring(L, -1));
  if (status != 0 || c->abort != ABORT_NONE)
    return 0;
  /* The chunk is done: what remains are a few strings for validation. */
  c->mem_limit = SIZE_MAX;
  if (lua_type(L, -1) != LUA_TTABLE) {
    build_index(c);
    fail_line(c, c->idx.return_line, "the config must return a table, got %s", type_name(c, -1));
    return 0;
  }
  validate(c, lua_gettop(L));
  return 0;
}

static int read_source(ctx_t *c, const char *path) {
  struct stat st;
  int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0)
    return fail_line(c, 0, "cannot open: %s", strerror(errno));
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    close(fd);
    return fail_line(c, 0, "not a regular file");
  }
  if ((uintmax_t)st.st_size > MAX_SOURCE_BYTES) {
    close(fd);
    return fail_line(c, 0, "larger than %u MiB", MAX_SOURCE_BYTES >> 20);
  }
  c->src = malloc((size_t)st.st_size + 1);
  if (c->src == NULL) {
    close(fd);
    return fail_oom(c);
  }
  size_t n = 0;
  while (n < (size_t)st.st_size) {
    ssize_t r = read(fd, c->src + n, (size_t)st.st_size - n);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0) {
      int e = r < 0 ? errno : 0;
      close(fd);
      return fail_line(c, 0, "cannot read: %s", e ? strerror(e) : "file shrank while reading");
    }
    n += (size_t)r;
  }
  close(fd);
  c->src[n] = '\0';
  c->srclen = n;
  if (n > 0 && c->src[0] == LUA_SIGNATURE[0])
    return fail_line(c, 0, "precompiled (bytecode) chunks are not accepted; give the Lua source");
  return 0;
}

int tg_config_load(const char *path, tg_config_t *cfg, char *err, size_t errlen) {
  ctx_t c = {.mem_limit = TG_CONFIG_MEMORY_LIMIT, .name = path, .cfg = cfg, .err = err, .errlen = errlen};
  lua_State *L = NULL;
  memset(cfg, 0, sizeof(*cfg));
  if (err && errlen)
    err[0] = '\0';
  if (read_source(&c, path) != 0)
    goto fail;
  /* The folder is resolved, the file's own name is not: a config that is a
   * symlink (a Kubernetes ConfigMap volume: tollgate.lua -> ..data/tollgate.lua)
   * resolves relative paths next to the link, which follows the volume's
   * updates, not inside the ..<timestamp> folder the kubelet later deletes. */
  {
    const char *base = strrchr(path, '/');
    char *folder = base ? strndup(path, base == path ? 1 : (size_t)(base - path)) : strdup(".");
    char *rdir = folder ? realpath(folder, NULL) : NULL;
    int saved = errno;
    free(folder);
    if (rdir == NULL) {
      fail_line(&c, 0, "cannot resolve path: %s", strerror(saved));
      goto fail;
    }
    base = base ? base + 1 : path;
    size_t n = strlen(rdir) + strlen(base) + 2;
    cfg->path = malloc(n);
    if (cfg->path)
      snprintf(cfg->path, n, "%s%s%s", rdir, strcmp(rdir, "/") == 0 ? "" : "/", base);
    cfg->dir = rdir;
  }
  if (cfg->path == NULL || cfg->dir == NULL) {
    fail_oom(&c);
    goto fail;
  }
  L = lua_newstate(sandbox_alloc, &c);
  if (L == NULL) {
    fail_line(&c, 0, "cannot create a Lua state (out of memory, or a LuaJIT without GC64)");
    goto fail;
  }
  c.L = L;
  /* Count hooks do not fire inside JIT traces: the interpreter only. The jit
   * library is never opened, since opening it turns the JIT back on. */
  luaJIT_setmode(L, 0, LUAJIT_MODE_ENGINE | LUAJIT_MODE_OFF);
  int status = lua_cpcall(L, run, &c);
  if (status != 0 && !c.failed) {
    if (c.abort == ABORT_MEMORY || status == LUA_ERRMEM)
      fail_line(&c, 0, "out of memory while checking the config");
    else
      fail_line(&c, 0, "%s", lua_tostring(L, -1) ? lua_tostring(L, -1) : "internal error");
  }
  if (c.failed)
    goto fail;
  lua_close(L);
  free_index(&c.idx);
  free(c.src);
  return 0;
fail:
  if (L)
    lua_close(L);
  free_index(&c.idx);
  free(c.src);
  tg_config_free(cfg);
  return -1;
}

static void free_section(tg_config_section_t *s) {
  for (size_t i = 0; i < s->nitems; i++) {
    free(s->items[i].key);
    free(s->items[i].value);
  }
  free(s->items);
}

static void free_listener(tg_config_listener_t *l) {
  free(l->host);
  free(l->tls_cert);
  free(l->tls_key);
}

void tg_config_free(tg_config_t *cfg) {
  if (cfg == NULL)
    return;
  free(cfg->path);
  free(cfg->dir);
  for (size_t i = 0; i < cfg->nlisten; i++)
    free_listener(&cfg->listen[i]);
  free_listener(&cfg->admin);
  free(cfg->admin_token_file);
  free(cfg->data_dir);
  free(cfg->log_level);
  free(cfg->redis.host);
  free(cfg->redis.password_file);
  free(cfg->instance);
  free(cfg->tracing.endpoint);
  free(cfg->tracing.service_name);
  for (size_t i = 0; i < cfg->ledger.naccounts; i++) {
    free(cfg->ledger.accounts[i].billing_reference);
    free(cfg->ledger.accounts[i].currency);
    free(cfg->ledger.accounts[i].reference);
  }
  free(cfg->ledger.accounts);
  for (size_t i = 0; i < cfg->ntenants; i++) {
    tg_config_tenant_t *t = &cfg->tenants[i];
    free(t->name);
    for (size_t j = 0; j < t->nhosts; j++)
      free(t->hosts[j]);
    free(t->hosts);
    free(t->catalog_source);
    free(t->policy_file);
    free_section(&t->signer);
    free_section(&t->billing);
    free_section(&t->payments);
  }
  free(cfg->tenants);
  memset(cfg, 0, sizeof(*cfg));
}

const char *tg_config_get(const tg_config_section_t *s, const char *key) {
  for (size_t i = 0; i < s->nitems; i++)
    if (strcmp(s->items[i].key, key) == 0)
      return s->items[i].value;
  return NULL;
}

int tg_config_get_uint(const tg_config_section_t *s, const char *section, const char *key, uint64_t lo, uint64_t hi,
                       uint64_t def, uint64_t *out, char *err, size_t errlen) {
  const char *v = tg_config_get(s, key);
  if (v == NULL) {
    *out = def;
    return 0;
  }
  uint64_t x = 0;
  bool ok = v[0] != '\0' && !(v[0] == '0' && v[1] != '\0');
  for (const char *p = v; ok && *p; p++) {
    unsigned d = (unsigned)(*p - '0');
    ok = *p >= '0' && *p <= '9' && x <= (hi - d) / 10;
    x = x * 10 + d;
  }
  if (!ok || x < lo || x > hi) {
    snprintf(err, errlen, "%s.%s: '%.32s' is not an integer in %" PRIu64 "..%" PRIu64, section, key, v, lo, hi);
    return -EINVAL;
  }
  *out = x;
  return 0;
}


char *tg_config_read_token(const tg_config_t *cfg, char *err, size_t errlen) {
  if (cfg->admin_token_file == NULL) {
    snprintf(err, errlen, "no admin token_file is configured");
    return NULL;
  }
  return tg_secret_read(cfg->admin_token_file, "admin token", TG_SECRET_TOKEN, err, errlen);
}
