/*
 * The listener for plain clients (see listener.h).
 *
 * A client in its startup is an `arrival`: a poll handle on its socket, the bytes read so far and
 * its deadline. Arrivals wait in a list ordered by deadline, so one timer (armed for the first)
 * times them all out. An arrival reads at once after accept (the client's first packet is often
 * there already) and again at each readable event; it leaves the list to the caller (done), or
 * closed (gone, timed out, listener closed). Its memory goes once libuv lets go of its handle.
 */
#define _GNU_SOURCE /* accept4 */
#include "listener.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SSL_REQUEST_CODE 80877103u
#define GSSENC_REQUEST_CODE 80877104u
/* Accepted per readable event at most: the loop's other work goes on during a flood. */
#define ACCEPTS_PER_EVENT 64
/* After EMFILE and the like, accepting waits this long (the backlog holds the clients meanwhile). */
#define BACKOFF_MS 100
/* Most startup packets fit; a longer one gets a buffer of its length. */
#define INLINE_BYTES 512

typedef struct arrival {
  uv_poll_t poll; /* first: the handle's address is the arrival's */
  lp_listener *l;
  struct arrival *prev, *next;
  uint64_t deadline;
  int fd;
  size_t have, cap;
  unsigned char *buf;
  struct sockaddr_storage peer;
  unsigned char inline_buf[INLINE_BYTES];
} arrival;

struct lp_listener {
  uv_loop_t *loop;
  uv_poll_t poll;
  uv_timer_t deadlines, backoff;
  int fd;
  int tcp;
  lp_arrival_cb cb;
  void *user;
  int negotiate, max_pending;
  uint64_t timeout_ms;
  int pending, outside;
  arrival *head, *tail;
  int closing;
  int open_handles;
};

static uint32_t be32(const unsigned char *p) { return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]; }

enum lp_startup_step lp_startup_step(const unsigned char *data, size_t n, size_t *need) {
  if (n < 4) {
    *need = 4;
    return LP_STARTUP_MORE;
  }
  uint32_t length = be32(data);
  if (length < 8 || length > LP_STARTUP_MAX) return LP_STARTUP_DONE;
  if (n < length) {
    *need = length;
    return LP_STARTUP_MORE;
  }
  uint32_t code = be32(data + 4);
  if (length == 8 && (code == SSL_REQUEST_CODE || code == GSSENC_REQUEST_CODE) && n == 8) return LP_STARTUP_REFUSE_ENCRYPTION;
  return LP_STARTUP_DONE;
}

/* ---------- arrivals ---------- */

static void arrival_freed(uv_handle_t *handle) {
  arrival *a = (arrival *)handle;
  lp_listener *l = a->l;
  if (a->buf != a->inline_buf) free(a->buf);
  free(a);
  if (--l->open_handles == 0) free(l);
}

static void deadlines_cb(uv_timer_t *timer);

/* The timer for the first deadline (the list is in deadline order). */
static void arm_deadlines(lp_listener *l) {
  if (l->closing) return;
  if (!l->head) {
    uv_timer_stop(&l->deadlines);
    return;
  }
  uint64_t now = uv_now(l->loop);
  uv_timer_start(&l->deadlines, deadlines_cb, l->head->deadline > now ? l->head->deadline - now : 0, 0);
}

/* Out of the list; its handle closes (no more events), its socket stays as it is. */
static void arrival_leave(arrival *a) {
  lp_listener *l = a->l;
  int was_head = l->head == a;
  if (a->prev) a->prev->next = a->next;
  else l->head = a->next;
  if (a->next) a->next->prev = a->prev;
  else l->tail = a->prev;
  a->prev = a->next = NULL;
  l->pending--;
  uv_close((uv_handle_t *)&a->poll, arrival_freed);
  if (was_head) arm_deadlines(l);
}

/* The listener is closing: closed, nobody told. */
static void arrival_drop(arrival *a) {
  arrival_leave(a);
  close(a->fd);
  a->fd = -1;
}

static void arrival_hand(arrival *a, enum lp_arrival kind) {
  lp_listener *l = a->l;
  int fd = a->fd;
  a->fd = -1;
  arrival_leave(a); /* the handle is out of the poller now: the caller may watch the socket its own way */
  if (kind == LP_ARRIVED_TIMEOUT || kind == LP_ARRIVED_GONE) {
    close(fd);
    fd = -1;
  }
  /* a->buf and a->peer live until the handle's close callback, after this call */
  l->cb(l, l->user, kind, fd, fd >= 0 ? a->buf : NULL, fd >= 0 ? a->have : 0, (const struct sockaddr *)&a->peer);
}

/* Reads what the client sent; 1 when the arrival is over (handed on or dropped), 0 to wait for more. */
static int arrival_read(arrival *a) {
  for (;;) {
    size_t need = 0;
    switch (lp_startup_step(a->buf, a->have, &need)) {
      case LP_STARTUP_DONE:
        arrival_hand(a, LP_ARRIVED_STARTUP);
        return 1;
      case LP_STARTUP_REFUSE_ENCRYPTION:
        if (send(a->fd, "N", 1, MSG_NOSIGNAL) != 1) {
          arrival_hand(a, LP_ARRIVED_GONE); /* a one-byte answer on a new connection cannot block: the client is gone */
          return 1;
        }
        a->have = 0;
        continue;
      case LP_STARTUP_MORE:
        break;
    }
    if (need > a->cap) {
      unsigned char *bigger = malloc(need);
      if (!bigger) {
        arrival_hand(a, LP_ARRIVED_GONE);
        return 1;
      }
      memcpy(bigger, a->buf, a->have);
      if (a->buf != a->inline_buf) free(a->buf);
      a->buf = bigger;
      a->cap = need;
    }
    ssize_t got = recv(a->fd, a->buf + a->have, a->cap - a->have, 0);
    if (got > 0) {
      a->have += (size_t)got;
      continue;
    }
    if (got < 0 && errno == EINTR) continue;
    if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;
    arrival_hand(a, LP_ARRIVED_GONE);
    return 1;
  }
}

static void arrival_poll_cb(uv_poll_t *handle, int status, int events) {
  (void)events;
  arrival *a = (arrival *)handle;
  if (status < 0) arrival_hand(a, LP_ARRIVED_GONE);
  else arrival_read(a);
}

static void deadlines_cb(uv_timer_t *timer) {
  lp_listener *l = uv_handle_get_data((uv_handle_t *)timer);
  uint64_t now = uv_now(l->loop);
  while (!l->closing && l->head && l->head->deadline <= now) arrival_hand(l->head, LP_ARRIVED_TIMEOUT);
  arm_deadlines(l);
}

/* In the list by deadline (after those due no later: a timeout shortened by a reload sorts before). */
static void arrival_link(lp_listener *l, arrival *a) {
  arrival *after = l->tail;
  while (after && after->deadline > a->deadline) after = after->prev;
  a->prev = after;
  a->next = after ? after->next : l->head;
  if (a->next) a->next->prev = a;
  else l->tail = a;
  if (after) after->next = a;
  else l->head = a;
  l->pending++;
  if (l->head == a) arm_deadlines(l);
}

static void arrive(lp_listener *l, int fd, const struct sockaddr_storage *peer) {
  if (l->tcp) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  if (!l->negotiate) {
    l->cb(l, l->user, LP_ARRIVED_RAW, fd, NULL, 0, (const struct sockaddr *)peer);
    return;
  }
  if (l->max_pending > 0 && l->pending + l->outside >= l->max_pending) {
    l->cb(l, l->user, LP_ARRIVED_BUSY, fd, NULL, 0, (const struct sockaddr *)peer);
    return;
  }
  arrival *a = calloc(1, sizeof *a);
  if (!a || uv_poll_init_socket(l->loop, &a->poll, fd) != 0) {
    free(a);
    l->cb(l, l->user, LP_ARRIVED_RAW, fd, NULL, 0, (const struct sockaddr *)peer);
    return;
  }
  a->l = l;
  a->fd = fd;
  a->buf = a->inline_buf;
  a->cap = INLINE_BYTES;
  a->peer = *peer;
  a->deadline = uv_now(l->loop) + l->timeout_ms;
  l->open_handles++;
  arrival_link(l, a);
  if (!arrival_read(a)) uv_poll_start(&a->poll, UV_READABLE, arrival_poll_cb);
}

/* ---------- the listening socket ---------- */

static void listen_poll_cb(uv_poll_t *handle, int status, int events);

static void backoff_cb(uv_timer_t *timer) {
  lp_listener *l = uv_handle_get_data((uv_handle_t *)timer);
  if (!l->closing) uv_poll_start(&l->poll, UV_READABLE, listen_poll_cb);
}

static void listen_poll_cb(uv_poll_t *handle, int status, int events) {
  (void)events;
  lp_listener *l = uv_handle_get_data((uv_handle_t *)handle);
  if (status < 0) return;
  for (int i = 0; i < ACCEPTS_PER_EVENT && !l->closing; i++) {
    struct sockaddr_storage peer;
    socklen_t len = sizeof peer;
    memset(&peer, 0, sizeof peer);
    int fd = accept4(l->fd, (struct sockaddr *)&peer, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd >= 0) {
      arrive(l, fd, &peer);
      continue;
    }
    if (errno == EINTR || errno == ECONNABORTED || errno == EPROTO) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
      /* Out of descriptors (EMFILE) or worse: the listening socket stays readable, so polling it would spin. */
      uv_poll_stop(&l->poll);
      uv_timer_start(&l->backoff, backoff_cb, BACKOFF_MS, 0);
    }
    return;
  }
}

static void listener_handle_closed(uv_handle_t *handle) {
  lp_listener *l = uv_handle_get_data(handle);
  if (--l->open_handles == 0) free(l);
}

lp_listener *lp_listener_open(uv_loop_t *loop, int fd, lp_arrival_cb cb, void *user, const char **error) {
  struct sockaddr_storage own;
  socklen_t len = sizeof own;
  if (getsockname(fd, (struct sockaddr *)&own, &len) != 0) {
    *error = "the listening socket cannot be read";
    return NULL;
  }
  int flags = fcntl(fd, F_GETFL);
  if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) != 0) {
    *error = "the listening socket cannot be made non-blocking";
    return NULL;
  }
  lp_listener *l = calloc(1, sizeof *l);
  if (!l) {
    *error = "out of memory";
    return NULL;
  }
  if (uv_poll_init_socket(loop, &l->poll, fd) != 0) {
    free(l);
    *error = "the listening socket cannot be polled";
    return NULL;
  }
  l->loop = loop;
  l->fd = fd;
  l->tcp = own.ss_family == AF_INET || own.ss_family == AF_INET6;
  l->cb = cb;
  l->user = user;
  l->negotiate = 1;
  l->timeout_ms = 60000;
  uv_handle_set_data((uv_handle_t *)&l->poll, l);
  uv_timer_init(loop, &l->deadlines);
  uv_handle_set_data((uv_handle_t *)&l->deadlines, l);
  uv_timer_init(loop, &l->backoff);
  uv_handle_set_data((uv_handle_t *)&l->backoff, l);
  l->open_handles = 3;
  uv_poll_start(&l->poll, UV_READABLE, listen_poll_cb);
  return l;
}

void lp_listener_config(lp_listener *l, int negotiate, int max_pending, double timeout_ms) {
  l->negotiate = negotiate;
  l->max_pending = max_pending > 0 ? max_pending : 0;
  l->timeout_ms = timeout_ms > 0 ? (uint64_t)timeout_ms : 0;
}

int lp_listener_pending(const lp_listener *l) { return l->pending; }

void lp_listener_outside(lp_listener *l, int n) { l->outside = n > 0 ? n : 0; }

void lp_listener_hand_over(lp_listener *l) {
  while (!l->closing && l->head) arrival_hand(l->head, LP_ARRIVED_RAW);
}

void lp_listener_close(lp_listener *l) {
  if (l->closing) return;
  l->closing = 1;
  while (l->head) arrival_drop(l->head);
  uv_close((uv_handle_t *)&l->poll, listener_handle_closed);
  /* Now, not at the close callback: the port is free in this turn, as Node.js' own listener leaves
     it (a reload may listen there next). libuv lets a polled fd be closed right after uv_close. */
  close(l->fd);
  l->fd = -1;
  uv_close((uv_handle_t *)&l->deadlines, listener_handle_closed);
  uv_close((uv_handle_t *)&l->backoff, listener_handle_closed);
}
