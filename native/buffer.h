/* Byte queues of the native code (relay.c, txclient.c): the memory exists only while something waits. */
#ifndef LAKEBASE_PROXY_BUFFER_H
#define LAKEBASE_PROXY_BUFFER_H

#include <stdlib.h>
#include <string.h>

typedef struct {
  unsigned char *data;
  size_t off, len, cap;
} buf_t;


static inline size_t pending(const buf_t *b) { return b->len - b->off; }

static inline int buf_append(buf_t *b, const unsigned char *data, size_t n) {
  if (n == 0) return 0;
  if (b->off > 0 && b->off == b->len) b->off = b->len = 0;
  if (b->len + n > b->cap) {
    if (b->off > 0) {
      memmove(b->data, b->data + b->off, b->len - b->off);
      b->len -= b->off;
      b->off = 0;
    }
    if (b->len + n > b->cap) {
      /* Small first (most messages are): glibc serves blocks this size from its per-thread cache. */
      size_t cap = b->cap ? b->cap : n <= 256 ? 256 : 4096;
      while (cap < b->len + n) cap *= 2;
      unsigned char *grown = realloc(b->data, cap);
      if (!grown) return -1;
      b->data = grown;
      b->cap = cap;
    }
  }
  memcpy(b->data + b->len, data, n);
  b->len += n;
  return 0;
}

static inline void buf_consumed(buf_t *b, size_t n) {
  b->off += n;
  if (b->off == b->len) { /* an idle session holds no buffer */
    free(b->data);
    b->data = NULL;
    b->off = b->len = b->cap = 0;
  }
}

static inline void buf_free(buf_t *b) {
  free(b->data);
  b->data = NULL;
  b->off = b->len = b->cap = 0;
}

#endif
