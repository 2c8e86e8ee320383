/*
 * libFuzzer target for native/listener.c (see .ci/fuzz.sh). The first byte of an input picks
 * what to do with the rest: with its low bit, lp_startup_step; else a session, the other bits its
 * config (TCP over the loopback instead of a unix socket, over IPv6 when the machine has ::1, a
 * config byte after the open, the end without a last settle, lp_listener_open refused first: a
 * pipe, no memory).
 *
 * lp_startup_step: the rest of the input, cut at every point (and, when its length word asks for
 * more, padded with bytes up to that length and a little beyond), must get the answer of
 * reference_step(), the pre-startup framing written out here from the protocol page.
 *
 * A session: a real lp_listener on a real listening socket (TCP on 127.0.0.1 or ::1, or an abstract
 * unix socket), in a loop of its own. The input is a script: up to six clients connect, put
 * encryption requests, startup packets with any length word, CancelRequests, raw bytes or a length
 * word alone in their outbox and write it in pieces of any size, half-close, close or reset, read;
 * 68 more connect at once (a flood, past the 64 accepts of one event); the loop turns, or waits a
 * millisecond or two so deadlines come (or, rarely, out an EMFILE's backoff); the config changes
 * (negotiate, max_pending, the timeout); one accept4, recv or send of the listener's fails (EINTR,
 * EAGAIN, EMFILE, EPROTO, ECONNRESET, EPIPE), or one malloc or calloc; the caller (the harness, as
 * the callback's JavaScript) reads or closes the sockets it was handed, or reacts inside a callback
 * (closes the socket at once, changes the config, closes the listener); the listener is closed at
 * any point. At the end the script settles (unless the config says not to), the listener is closed,
 * and the loop runs until the listener has let go of its handles.
 *
 * The target is built with listener.o's accept4, recv, send, close, malloc and calloc renamed to
 * the spies below (objcopy in .ci/fuzz.sh): each goes on to the real call (unless the script
 * makes it fail), and the model follows every descriptor of the listener's and what it read of
 * each client. Checked for every input:
 *  - the listener accepts only on its listening socket (SOCK_NONBLOCK | SOCK_CLOEXEC), only
 *    clients waiting to be, never after lp_listener_close nor within 100 ms of an EMFILE;
 *  - it reads only a client in its startup, only while what it holds calls for more
 *    (reference_step), into room for at least what is needed; sends only one 'N', only when what
 *    it holds is exactly an SSLRequest or GSSENCRequest;
 *  - it closes only its listening socket (after lp_listener_close, once) and clients in their
 *    startup: dropped only after their socket said EOF or an error (or POLLERR), or after a failed
 *    malloc (GONE, the callback right after the close), or by lp_listener_close (no callback);
 *    timed out (TIMEOUT, the callback right after the close) only at or
 *    after the deadline the model computed at the accept; a deadline due at the start of a turn
 *    of the loop has fired by its end;
 *  - every callback comes before lp_listener_close, for a client the model knows, with the peer's
 *    address: RAW at once for a client accepted with negotiate off (or whose arrival could not be
 *    allocated), BUSY at once for one accepted with max_pending clients in their startup (its own
 *    and the `outside` ones lp_listener_outside set), RAW with the bytes read so far for each
 *    client in its startup within lp_listener_hand_over, STARTUP
 *    with `data` exactly the bytes the listener read since the last refused request (the client's
 *    bytes, after those requests) that lp_startup_step and reference_step both call DONE, TIMEOUT
 *    and GONE with fd -1; the fd of the others is the accepted socket, open (fstat), non-blocking,
 *    close-on-exec, the client's (getpeername), TCP_NODELAY over TCP; no client is handed over,
 *    dropped or timed out twice;
 *  - lp_listener_pending equals the model's count of clients in their startup, in every callback
 *    and after every step; lp_listener_close leaves none;
 *  - each client receives only 'N's, never more than its refusals (and all of them, while the
 *    listener or the caller holds its socket); it sees its end only once the listener or the
 *    caller closed its socket (or the listening socket closed before its accept); the caller
 *    reads from a handed socket, after `data`, the rest of the client's bytes in order;
 *  - when the script settles (and at the end): every connected client is accepted; none stays in
 *    its startup with a whole packet or a lone encryption request sent, nor after its FIN; every
 *    client the listener or the caller closed sees its end; the caller has every byte sent;
 *  - lp_listener_open refuses a pipe, and fails with no memory, with a reason, leaving the
 *    descriptor open;
 *  - after lp_listener_close and a few turns the loop holds no handle, the listening socket is
 *    closed, no descriptor is open that was not before the session (the harness closes what it
 *    was handed), and LeakSanitizer finds the listener freed.
 * ASan and UBSan watch the memory. A failed check aborts, so libFuzzer keeps the input.
 * native/fuzz/listener-seeds.mjs writes named examples; FUZZ_VERBOSE=1 prints each step.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "../listener.h"
#include "support.h"

/* Clients the script names; a flood adds more, past what the listener accepts in one event (64). */
#define SCRIPT_CLIENTS 6
#define FLOOD_CLIENTS 68
#define MAX_CLIENTS (SCRIPT_CLIENTS + FLOOD_CLIENTS)
/* A client's bytes in all: the longest packet read whole, and more after it. */
#define MAX_WRITTEN 24576
/* Real milliseconds an input may sleep for deadlines to come (a sleep costs more than the rest of an input). */
#define SLEEP_BUDGET_MS 2
/* An EMFILE's backoff is waited out at most this often (an input replayed alone always does). */
#define BACKOFF_WAIT_EVERY_MS 5000
/* listener.c's BACKOFF_MS: no accept4 this long after an EMFILE. */
#define BACKOFF_MS 100
/* How long the sockets may take to deliver what settling waits for. */
#define SETTLE_LIMIT_MS 2000

enum { CFG_PURE = 0x01, CFG_TCP = 0x02, CFG_CONFIG = 0x04, CFG_ABRUPT = 0x08, CFG_OPEN_FAILS = 0x10, CFG_IPV6 = 0x20 };

static uint32_t be32(const unsigned char *p) { return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]; }

/* ---------- the pre-startup framing ---------- */

/* Request codes: 1234 in the high 16 bits, 5679 (SSL) or 5680 (GSSAPI) in the low ones. */
static const unsigned char SSL_REQUEST[8] = { 0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f };
static const unsigned char GSSENC_REQUEST[8] = { 0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30 };
#define PROTOCOL_3_0 196608u
#define CANCEL_CODE 80877102u
#define SSL_CODE 80877103u
#define GSSENC_CODE 80877104u

/*
 * What the bytes a client sent first call for, from the protocol page rather than from
 * listener.c: a lone encryption request (exactly its 8 bytes) is refused; a length word (it
 * counts itself; no type byte) below 8 or above Postgres' 10,000 plus the word ends the framing at
 * once; else the packet is read whole.
 * @see https://www.postgresql.org/docs/current/protocol-message-formats.html
 */
static enum lp_startup_step reference_step(const unsigned char *d, size_t n, size_t *need) {
  if (n == 8 && (memcmp(d, SSL_REQUEST, 8) == 0 || memcmp(d, GSSENC_REQUEST, 8) == 0)) return LP_STARTUP_REFUSE_ENCRYPTION;
  if (n < 4) {
    *need = 4;
    return LP_STARTUP_MORE;
  }
  uint64_t length = be32(d);
  if (length < 8 || length > 10000 + 4) return LP_STARTUP_DONE;
  if (n < length) {
    *need = (size_t)length;
    return LP_STARTUP_MORE;
  }
  return LP_STARTUP_DONE;
}

static const char *const STEP_NAMES[] = { "MORE", "REFUSE_ENCRYPTION", "DONE" };

static const char *step_name(enum lp_startup_step s) { return (unsigned)s < 3 ? STEP_NAMES[s] : "?"; }

static void check_step(const unsigned char *d, size_t n) {
  size_t need = 0, want = 0;
  enum lp_startup_step got = lp_startup_step(d, n, &need);
  enum lp_startup_step expected = reference_step(d, n, &want);
  if (got != expected) fail("lp_startup_step of %zu bytes (length word %u): %s, the reference says %s", n, n >= 4 ? be32(d) : 0, step_name(got), step_name(expected));
  if (got == LP_STARTUP_MORE && need != want) fail("lp_startup_step of %zu bytes: MORE with need %zu, the reference says %zu", n, need, want);
}

/* Every cut of the rest of the input; the short ones from a copy of their own, so a read past them shows. */
static void run_pure(void) {
  const unsigned char *d = in_data;
  size_t n = in_left;
  in_left = 0;
  for (size_t i = 0; i <= n; i++) {
    if (i > 16) {
      check_step(d, i);
      continue;
    }
    unsigned char *copy = malloc(i ? i : 1);
    memcpy(copy, d, i);
    check_step(copy, i);
    free(copy);
  }
  if (n < 4 || be32(d) <= n || be32(d) > LP_STARTUP_MAX + 8) return;
  bytes_t padded = { 0 };
  put(&padded, d, n);
  put_pattern(&padded, be32(d) + 8 - n, n);
  for (size_t i = n + 1; i <= padded.n; i++) check_step(padded.d, i);
  bytes_free(&padded);
}

/* ---------- the session's model ---------- */

enum client_state {
  C_NONE,     /* no connection (not opened, or its connect failed) */
  C_BACKLOG,  /* connected, not accepted */
  C_ACCEPTED, /* accepted as RAW or BUSY: its callback comes next */
  C_STARTUP,  /* in its startup in the listener */
  C_HANDED,   /* the caller's */
  C_GONE,     /* the listener closed it */
};
static const char *const STATE_NAMES[] = { "unconnected", "in the backlog", "accepted", "in its startup", "handed over", "closed by the listener" };
static const char *const KIND_NAMES[] = { "?", "STARTUP", "BUSY", "RAW", "TIMEOUT", "GONE" };

static const char *kind_name(int kind) { return kind >= 1 && kind < (int)(sizeof KIND_NAMES / sizeof KIND_NAMES[0]) ? KIND_NAMES[kind] : "?"; }

typedef struct {
  int index;
  enum client_state state;
  int tried;   /* it connected, or tried to */
  int fd;      /* the client's end; -1 once closed */
  int shut;    /* it sent its end (shutdown, close or reset) */
  int closed;  /* its socket is closed */
  int saw_end; /* it read EOF or an error */
  struct sockaddr_storage addr;
  socklen_t addr_len;
  bytes_t outbox;  /* to write */
  bytes_t written; /* every byte it wrote */
  size_t n_got;    /* the 'N's it read */
  /* The listener's side, as its system calls show it. */
  enum lp_arrival expect; /* at its accept: RAW or BUSY at once, or 0 */
  int lfd;                /* the accepted socket, while the listener has it */
  uint64_t deadline;
  unsigned accepted_in; /* the turn of the loop */
  size_t read_total; /* bytes the listener read from it */
  size_t consumed;   /* of those, the refused requests' */
  int refusals;
  int failed;  /* a recv or send of the listener's on it said EOF or an error */
  int drop_ok; /* at its close by the listener: failed, or its socket in error */
  /* The caller's, once handed over. */
  enum lp_arrival kind;
  int hfd; /* -1 once the caller closed it */
  size_t handed_from;
  bytes_t handed; /* `data`, then what the caller read */
  int handed_end;
} client_t;

enum fault { FAULT_NONE, FAULT_ACCEPT, FAULT_RECV, FAULT_SEND, FAULT_ALLOC };
static const char *const FAULT_NAMES[] = { "none", "accept4", "recv", "send", "malloc or calloc" };

/* What the caller does inside a callback (a step sets it). */
enum { REACT_CLOSE_FD = 1, REACT_RESET = 2, REACT_CONFIG = 4, REACT_CLOSE_LISTENER = 8 };

typedef struct {
  uv_loop_t loop;
  lp_listener *l; /* NULL once closed */
  int family;
  int tcp;
  struct sockaddr_storage listen_addr;
  socklen_t listen_addr_len;
  int listen_fd;
  int listen_closed;
  int closing;  /* lp_listener_close was called */
  int in_close; /* inside it */
  int negotiate, max_pending, outside;
  int handing; /* inside lp_listener_hand_over */
  uint64_t timeout_ms;
  unsigned react, react_config;
  client_t clients[MAX_CLIENTS];
  int pending;           /* the model's count of clients in their startup */
  client_t *awaited;     /* accepted as RAW or BUSY, its callback not come yet */
  client_t *just_closed; /* closed by the listener outside lp_listener_close: a drop, or TIMEOUT next */
  enum fault fault;
  int fault_errno;
  int alloc_failed; /* a malloc of the listener's failed: a drop is next */
  client_t *last_accepted;
  int backoff;
  uint64_t backoff_until;
  int waited_backoff;
  int slept_ms;
  unsigned turns;
  int descriptors;
  unsigned serial;
} session_t;

static session_t *S;
static unsigned sessions;
/* One port for every session's TCP listener (SO_REUSEADDR), by family: no port per input left in TIME_WAIT. */
static int tcp_port[2];

static client_t *client_by_lfd(int fd) {
  for (int i = 0; i < MAX_CLIENTS; i++)
    if (S->clients[i].state == C_STARTUP && S->clients[i].lfd == fd) return &S->clients[i];
  return NULL;
}

static const char *holder_of(int fd) {
  for (int i = 0; i < MAX_CLIENTS; i++) {
    const client_t *c = &S->clients[i];
    if (c->fd == fd) return "a client's own end";
    if (c->state == C_HANDED && c->hfd == fd) return "the caller's (handed over)";
    if (c->state == C_ACCEPTED && c->lfd == fd) return "one accepted as RAW or BUSY";
  }
  return "not its own";
}

/* memcmp, but out of libFuzzer's sight: the clients' names would only crowd its dictionary. */
static int same_bytes(const void *x, const void *y, size_t n) {
  const unsigned char *p = x, *q = y;
  for (size_t i = 0; i < n; i++)
    if (p[i] != q[i]) return 0;
  return 1;
}

static int same_address(const client_t *c, const struct sockaddr *a) {
  if (a->sa_family != c->addr.ss_family) return 0;
  if (a->sa_family == AF_INET) {
    const struct sockaddr_in *x = (const struct sockaddr_in *)a, *y = (const struct sockaddr_in *)&c->addr;
    return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
  }
  if (a->sa_family == AF_INET6) {
    const struct sockaddr_in6 *x = (const struct sockaddr_in6 *)a, *y = (const struct sockaddr_in6 *)&c->addr;
    return x->sin6_port == y->sin6_port && same_bytes(&x->sin6_addr, &y->sin6_addr, sizeof x->sin6_addr);
  }
  return a->sa_family == AF_UNIX && same_bytes(a, &c->addr, c->addr_len);
}

static client_t *client_by_address(const struct sockaddr *a) {
  for (int i = 0; i < MAX_CLIENTS; i++)
    if (S->clients[i].state != C_NONE && same_address(&S->clients[i], a)) return &S->clients[i];
  return NULL;
}

/* Byte `i` on of `b` (a pointer even when `b` holds nothing yet). */
static const unsigned char *from(const bytes_t *b, size_t i) { return b->d ? b->d + i : (const unsigned char *)""; }

static enum lp_startup_step held_step(const client_t *c, size_t *need) {
  size_t dummy;
  return reference_step(from(&c->written, c->consumed), c->read_total - c->consumed, need ? need : &dummy);
}

/* What must follow an event at once did: checked at each of the listener's calls and callbacks,
   and after each turn; `closing_fd` is the descriptor being closed (a failed client's drop). */
static void check_between(int closing_fd) {
  if (S->alloc_failed && closing_fd < 0) fail("a malloc of the listener's failed, and no drop came next");
  if (S->awaited) fail("client %d accepted as %s, not handed over at once", S->awaited->index, kind_name(S->awaited->expect));
  if (S->just_closed) {
    const client_t *c = S->just_closed;
    S->just_closed = NULL;
    fail("client %d closed by the listener (%s), and no GONE or TIMEOUT came", c->index, c->drop_ok ? "EOF or an error" : "its socket well");
  }
  for (int i = 0; i < MAX_CLIENTS; i++) {
    const client_t *c = &S->clients[i];
    if (c->state == C_STARTUP && c->failed && c->lfd != closing_fd) fail("client %d kept in its startup after its socket said EOF or an error", i);
  }
}

static void check_pending(void) {
  int n = 0;
  for (int i = 0; i < MAX_CLIENTS; i++) n += S->clients[i].state == C_STARTUP;
  if (n != S->pending) fail("the model counts %d clients in their startup and holds %d", S->pending, n);
  if (S->l && !S->closing && lp_listener_pending(S->l) != S->pending) fail("lp_listener_pending says %d, the model %d", lp_listener_pending(S->l), S->pending);
}

/* ---------- the listener's system calls (listener.o's, renamed by objcopy) ---------- */

int listener_accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags);
ssize_t listener_recv(int fd, void *buf, size_t n, int flags);
ssize_t listener_send(int fd, const void *buf, size_t n, int flags);
int listener_close(int fd);

int listener_accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags) {
  check_between(-1);
  if (fd != S->listen_fd || S->listen_closed) fail("accept4 on descriptor %d, not the listening socket", fd);
  if (S->closing) fail("accept4 after lp_listener_close");
  if (flags != (SOCK_NONBLOCK | SOCK_CLOEXEC)) fail("accept4 with flags 0x%x", (unsigned)flags);
  uint64_t now = uv_now(&S->loop);
  if (S->backoff && now < S->backoff_until) fail("accept4 %llu ms after an EMFILE", (unsigned long long)(now - (S->backoff_until - BACKOFF_MS)));
  S->backoff = 0;
  int e = 0, client_fd = -1;
  if (S->fault == FAULT_ACCEPT) {
    S->fault = FAULT_NONE;
    e = S->fault_errno;
  } else {
    client_fd = accept4(fd, addr, len, flags);
    if (client_fd < 0) e = errno;
  }
  if (client_fd < 0) {
    if (e != EAGAIN && e != EWOULDBLOCK && e != EINTR && e != ECONNABORTED && e != EPROTO) {
      S->backoff = 1;
      S->backoff_until = now + BACKOFF_MS;
    }
    errno = e;
    return -1;
  }
  client_t *c = client_by_address(addr);
  if (!c || c->state != C_BACKLOG) fail("accepted a connection of no client waiting (%s)", c ? STATE_NAMES[c->state] : "an unknown peer");
  c->lfd = client_fd;
  c->deadline = now + S->timeout_ms;
  c->accepted_in = S->turns;
  S->last_accepted = c;
  c->expect = !S->negotiate ? LP_ARRIVED_RAW : S->max_pending > 0 && S->pending + S->outside >= S->max_pending ? LP_ARRIVED_BUSY : 0;
  if (c->expect) {
    c->state = C_ACCEPTED;
    S->awaited = c;
  } else {
    c->state = C_STARTUP;
    S->pending++;
  }
  if (verbose) fprintf(stderr, "  listener: accepts client %d (%s, deadline %llu)\n", c->index, c->expect ? kind_name(c->expect) : "startup", (unsigned long long)c->deadline);
  return client_fd;
}

ssize_t listener_recv(int fd, void *buf, size_t n, int flags) {
  check_between(-1);
  client_t *c = client_by_lfd(fd);
  if (!c) fail("recv on descriptor %d (%s), of no client in its startup", fd, holder_of(fd));
  if (flags != 0) fail("client %d: recv with flags 0x%x", c->index, (unsigned)flags);
  size_t need = 0;
  enum lp_startup_step held = held_step(c, &need);
  size_t have = c->read_total - c->consumed;
  if (held != LP_STARTUP_MORE) fail("client %d: recv holding %zu bytes, which call for %s", c->index, have, step_name(held));
  if (n < need - have) fail("client %d: recv into %zu bytes holding %zu of the %zu needed", c->index, n, have, need);
  ssize_t got;
  if (S->fault == FAULT_RECV) {
    S->fault = FAULT_NONE;
    errno = S->fault_errno;
    got = -1;
  } else {
    got = recv(fd, buf, n, flags);
  }
  int e = errno;
  if (got > 0) {
    if (c->read_total + (size_t)got > c->written.n || memcmp(buf, from(&c->written, c->read_total), (size_t)got) != 0)
      fail("client %d: the listener read %zd bytes at %zu that the client did not send there (%zu sent)", c->index, got, c->read_total, c->written.n);
    c->read_total += (size_t)got;
  } else if (got == 0 || (e != EAGAIN && e != EWOULDBLOCK && e != EINTR)) {
    c->failed = 1;
  }
  if (verbose) fprintf(stderr, "  listener: recv client %d: %zd%s%s\n", c->index, got, got < 0 ? " " : "", got < 0 ? strerror(e) : "");
  errno = e;
  return got;
}

ssize_t listener_send(int fd, const void *buf, size_t n, int flags) {
  check_between(-1);
  client_t *c = client_by_lfd(fd);
  if (!c) fail("send on descriptor %d (%s), of no client in its startup", fd, holder_of(fd));
  if (n != 1 || *(const unsigned char *)buf != 'N' || flags != MSG_NOSIGNAL) fail("client %d: send of %zu bytes (flags 0x%x), not one 'N'", c->index, n, (unsigned)flags);
  enum lp_startup_step held = held_step(c, NULL);
  if (held != LP_STARTUP_REFUSE_ENCRYPTION) fail("client %d: an 'N' for %zu bytes that call for %s", c->index, c->read_total - c->consumed, step_name(held));
  ssize_t sent;
  if (S->fault == FAULT_SEND) {
    S->fault = FAULT_NONE;
    errno = S->fault_errno;
    sent = -1;
  } else {
    sent = send(fd, buf, n, flags);
  }
  int e = errno;
  if (sent == 1) {
    c->consumed = c->read_total;
    c->refusals++;
  } else {
    c->failed = 1;
  }
  if (verbose) fprintf(stderr, "  listener: 'N' to client %d: %zd\n", c->index, sent);
  errno = e;
  return sent;
}

int listener_close(int fd) {
  check_between(fd);
  if (fd == S->listen_fd && !S->listen_closed) {
    if (!S->closing) fail("the listening socket closed before lp_listener_close");
    S->listen_closed = 1;
    if (verbose) fprintf(stderr, "  listener: closes the listening socket\n");
    return close(fd);
  }
  client_t *c = client_by_lfd(fd);
  if (!c) fail("close of descriptor %d (%s)", fd, holder_of(fd));
  /* A drop, unless TIMEOUT comes next: libuv reports a socket in error (POLLERR: a reset) to
     the poll callback, before any recv. */
  struct pollfd p = { .fd = fd, .events = POLLIN };
  c->drop_ok = c->failed || S->alloc_failed || (poll(&p, 1, 0) == 1 && (p.revents & POLLERR));
  S->alloc_failed = 0;
  c->state = C_GONE;
  c->lfd = -1;
  S->pending--;
  if (!S->in_close) S->just_closed = c;
  if (verbose) fprintf(stderr, "  listener: closes client %d (%s)\n", c->index, S->in_close ? "its close" : c->drop_ok ? "EOF or an error, or a timeout" : "a timeout?");
  return close(fd);
}

/* The listener's allocations (renamed too): one fails when a step says so. */
void *listener_malloc(size_t n);
void *listener_calloc(size_t n, size_t size);

void *listener_malloc(size_t n) {
  if (!S || S->fault != FAULT_ALLOC) return malloc(n);
  S->fault = FAULT_NONE;
  S->alloc_failed = 1;
  if (verbose) fprintf(stderr, "  listener: malloc(%zu) fails\n", n);
  return NULL;
}

void *listener_calloc(size_t n, size_t size) {
  if (!S || S->fault != FAULT_ALLOC) return calloc(n, size);
  S->fault = FAULT_NONE;
  /* An arrival's, right after its accept: the client goes over as accepted (RAW). */
  client_t *c = S->l && !S->closing ? S->last_accepted : NULL;
  if (c && c->state == C_STARTUP) {
    c->state = C_ACCEPTED;
    c->expect = LP_ARRIVED_RAW;
    S->pending--;
    S->awaited = c;
  }
  if (verbose) fprintf(stderr, "  listener: calloc fails\n");
  return NULL;
}

/* ---------- the caller ---------- */

static void check_descriptor(const client_t *c, int fd) {
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISSOCK(st.st_mode)) fail("client %d: descriptor %d is %s", c->index, fd, errno == EBADF ? "closed" : "no socket");
  if (!(fcntl(fd, F_GETFL) & O_NONBLOCK)) fail("client %d: descriptor %d is blocking", c->index, fd);
  if (!(fcntl(fd, F_GETFD) & FD_CLOEXEC)) fail("client %d: descriptor %d is not close-on-exec", c->index, fd);
  if (c->closed) return; /* its peer may be gone */
  struct sockaddr_storage peer;
  socklen_t len = sizeof peer;
  memset(&peer, 0, sizeof peer);
  if (getpeername(fd, (struct sockaddr *)&peer, &len) != 0 || !same_address(c, (struct sockaddr *)&peer)) fail("client %d: descriptor %d is not its socket", c->index, fd);
  int nodelay = 0;
  socklen_t size = sizeof nodelay;
  if (S->tcp && (getsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &nodelay, &size) != 0 || !nodelay)) fail("client %d: TCP_NODELAY is not set", c->index);
}

static void set_linger_zero(int fd) {
  struct linger now = { 1, 0 };
  setsockopt(fd, SOL_SOCKET, SO_LINGER, &now, sizeof now);
}

static void caller_close(client_t *c, int reset) {
  if (c->state != C_HANDED || c->hfd < 0) return;
  if (verbose) fprintf(stderr, "  caller: %s client %d\n", reset ? "resets" : "closes", c->index);
  if (reset && S->tcp) set_linger_zero(c->hfd);
  close(c->hfd);
  c->hfd = -1;
}

/* The caller reads what the client sent after `data`. */
static void caller_read(client_t *c) {
  if (c->state != C_HANDED || c->hfd < 0 || c->handed_end) return;
  bytes_t sent = { (unsigned char *)from(&c->written, c->handed_from), c->written.n - c->handed_from, 0 };
  unsigned char b[4096];
  for (;;) {
    ssize_t r = recv(c->hfd, b, sizeof b, MSG_DONTWAIT);
    if (r > 0) {
      size_t checked = c->handed.n;
      put(&c->handed, b, (size_t)r);
      check_prefix_from("the caller's bytes of a client", &c->handed, checked, c->handed.n, &sent, NULL);
      continue;
    }
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    if (r == 0 ? !c->shut : !c->closed) fail("client %d: the caller read %s, the client %s", c->index, r == 0 ? "EOF" : strerror(errno), c->shut ? "only half-closed" : "is open");
    c->handed_end = 1;
    return;
  }
}

static void configure(unsigned b, unsigned x);
static void close_listener(void);

static void react(client_t *c, enum lp_arrival kind) {
  unsigned r = S->react;
  if (kind != LP_ARRIVED_TIMEOUT && kind != LP_ARRIVED_GONE && (r & REACT_CLOSE_FD)) caller_close(c, r & REACT_RESET);
  if (r & REACT_CONFIG) {
    S->react &= ~(unsigned)REACT_CONFIG;
    configure(S->react_config, r >> 4);
  }
  if (r & REACT_CLOSE_LISTENER) {
    S->react &= ~(unsigned)REACT_CLOSE_LISTENER;
    close_listener();
  }
}

static void on_arrival(lp_listener *l, void *user, enum lp_arrival kind, int fd, const unsigned char *data, size_t n, const struct sockaddr *peer) {
  if (user != S || l != S->l) fail("a callback with another listener or user");
  if (S->closing) fail("a %s callback after lp_listener_close", kind_name(kind));
  if (!peer) fail("a %s callback with no peer", kind_name(kind));
  client_t *c = client_by_address(peer);
  if (!c) fail("a %s callback for a peer that is no client", kind_name(kind));
  if (verbose) fprintf(stderr, "  callback: client %d %s, fd %d, %zu bytes\n", c->index, kind_name(kind), fd, n);
  int handed_over = kind == LP_ARRIVED_RAW && S->handing && c->state == C_STARTUP;
  if (kind != LP_ARRIVED_STARTUP && !handed_over && n != 0) fail("client %d: %s with %zu bytes of data", c->index, kind_name(kind), n);
  switch (kind) {
    case LP_ARRIVED_TIMEOUT:
      if (S->just_closed != c) fail("client %d: TIMEOUT (%s) not right after the listener closed its socket", c->index, STATE_NAMES[c->state]);
      S->just_closed = NULL;
      check_between(-1);
      if (fd != -1) fail("client %d: TIMEOUT with fd %d", c->index, fd);
      if (uv_now(&S->loop) < c->deadline) fail("client %d: TIMEOUT at %llu, its deadline %llu", c->index, (unsigned long long)uv_now(&S->loop), (unsigned long long)c->deadline);
      c->kind = kind;
      break;
    case LP_ARRIVED_GONE:
      if (S->just_closed != c) fail("client %d: GONE (%s) not right after the listener closed its socket", c->index, STATE_NAMES[c->state]);
      if (!c->drop_ok) fail("client %d: GONE with its socket well (no EOF, no error, no failed malloc)", c->index);
      S->just_closed = NULL;
      check_between(-1);
      if (fd != -1) fail("client %d: GONE with fd %d", c->index, fd);
      c->kind = kind;
      break;
    case LP_ARRIVED_RAW:
      if (handed_over) { /* lp_listener_hand_over: what the listener read of it so far */
        check_between(-1);
        if (fd != c->lfd) fail("client %d: RAW (handed over) with fd %d, accepted as %d", c->index, fd, c->lfd);
        check_descriptor(c, fd);
        size_t have = c->read_total - c->consumed;
        if (n != have || (n && (!data || memcmp(data, from(&c->written, c->consumed), n) != 0)))
          fail("client %d: handed over with %zu bytes, not the %zu it sent after %d refused requests", c->index, n, have, c->refusals);
        S->pending--;
        break;
      }
      /* fall through */
    case LP_ARRIVED_BUSY:
      if (S->awaited != c || c->expect != kind)
        fail("client %d: %s (%s), %s expected", c->index, kind_name(kind), STATE_NAMES[c->state], S->awaited == c ? kind_name(c->expect) : "nothing at once");
      S->awaited = NULL;
      check_between(-1);
      if (fd != c->lfd) fail("client %d: %s with fd %d, accepted as %d", c->index, kind_name(kind), fd, c->lfd);
      check_descriptor(c, fd);
      break;
    case LP_ARRIVED_STARTUP: {
      check_between(-1);
      if (c->state != C_STARTUP) fail("client %d: STARTUP while %s", c->index, STATE_NAMES[c->state]);
      if (fd != c->lfd) fail("client %d: STARTUP with fd %d, accepted as %d", c->index, fd, c->lfd);
      check_descriptor(c, fd);
      size_t have = c->read_total - c->consumed;
      if (n != have || (n && (!data || memcmp(data, from(&c->written, c->consumed), n) != 0)))
        fail("client %d: STARTUP with %zu bytes, not the %zu it sent after %d refused requests", c->index, n, have, c->refusals);
      size_t need;
      if (reference_step(data, n, &need) != LP_STARTUP_DONE || lp_startup_step(data, n, &need) != LP_STARTUP_DONE) fail("client %d: STARTUP with %zu bytes that are not done", c->index, n);
      S->pending--;
      break;
    }
    default:
      fail("client %d: a callback of kind %d", c->index, (int)kind);
  }
  if (kind != LP_ARRIVED_TIMEOUT && kind != LP_ARRIVED_GONE) {
    c->state = C_HANDED;
    c->kind = kind;
    c->hfd = fd;
    c->lfd = -1;
    c->handed_from = c->consumed;
    put(&c->handed, data, n);
  }
  check_pending();
  react(c, kind);
}

/* ---------- the listener's life ---------- */

static const int MAX_PENDING[] = { 0, 1, 2, 3, -1 };
static const double TIMEOUTS[] = { 0, 1, 2, 3, 5, 60000, 30000, 86400000 };

/* `b`: negotiate, max_pending and the timeout; `x`: the clients in their startup outside (0 to 3),
   and with 4 a hand-over after. */
static void configure(unsigned b, unsigned x) {
  if (!S->l || S->closing) return;
  int negotiate = !(b & 1), max_pending = MAX_PENDING[((b >> 1) & 7) % 5];
  double timeout = TIMEOUTS[(b >> 4) % 8];
  if (verbose) fprintf(stderr, "  config: negotiate %d, max_pending %d, timeout %g ms\n", negotiate, max_pending, timeout);
  lp_listener_config(S->l, negotiate, max_pending, timeout);
  S->negotiate = negotiate;
  S->max_pending = max_pending > 0 ? max_pending : 0;
  S->timeout_ms = (uint64_t)timeout;
  S->outside = (int)(x & 3);
  if (verbose) fprintf(stderr, "  outside: %d\n", S->outside);
  lp_listener_outside(S->l, S->outside);
  if (!(x & 4)) return;
  if (verbose) fprintf(stderr, "  lp_listener_hand_over\n");
  int outer = S->handing;
  S->handing = 1;
  lp_listener_hand_over(S->l);
  S->handing = outer;
  if (!S->closing && S->pending != 0) fail("%d clients in their startup after lp_listener_hand_over", S->pending);
}

static void close_listener(void) {
  if (!S->l || S->closing) return;
  if (verbose) fprintf(stderr, "  lp_listener_close\n");
  S->closing = S->in_close = 1;
  lp_listener_close(S->l);
  S->in_close = 0;
  if (S->pending != 0) fail("%d clients in their startup after lp_listener_close", S->pending);
  check_pending();
  S->l = NULL;
}

/* One turn of the loop; a deadline due when it started has fired by its end. */
static void turn(void) {
  uint64_t before = uv_now(&S->loop);
  unsigned this_turn = ++S->turns;
  uv_run(&S->loop, UV_RUN_NOWAIT);
  check_between(-1);
  check_pending();
  for (int i = 0; i < MAX_CLIENTS; i++) {
    const client_t *c = &S->clients[i];
    if (c->state == C_STARTUP && c->accepted_in < this_turn && c->deadline <= before)
      fail("client %d still in its startup after a turn that began at %llu, its deadline %llu", i, (unsigned long long)before, (unsigned long long)c->deadline);
  }
}

/* The listening address: the loopback address of the session's family, on `port`. */
static void loopback(int port) {
  struct sockaddr_in *in = (struct sockaddr_in *)&S->listen_addr;
  struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&S->listen_addr;
  memset(&S->listen_addr, 0, sizeof S->listen_addr);
  if (S->family == AF_INET) {
    in->sin_family = AF_INET;
    in->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    in->sin_port = htons((uint16_t)port);
    S->listen_addr_len = sizeof *in;
  } else {
    in6->sin6_family = AF_INET6;
    in6->sin6_addr = in6addr_loopback;
    in6->sin6_port = htons((uint16_t)port);
    S->listen_addr_len = sizeof *in6;
  }
}

static int open_listening_socket(void) {
  int fd = socket(S->family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0 && S->family == AF_INET6) fd = socket(S->family = AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0); /* no IPv6 here */
  if (fd < 0) fail("socket: %s", strerror(errno));
  memset(&S->listen_addr, 0, sizeof S->listen_addr);
  if (S->tcp) {
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    int *port = &tcp_port[S->family == AF_INET6];
    loopback(*port);
    int bound = bind(fd, (struct sockaddr *)&S->listen_addr, S->listen_addr_len) == 0;
    if (!bound) {
      loopback(0);
      bound = bind(fd, (struct sockaddr *)&S->listen_addr, S->listen_addr_len) == 0;
    }
    if (!bound) {
      if (S->family != AF_INET6) fail("bind: %s", strerror(errno));
      close(fd); /* no ::1 here */
      S->family = AF_INET;
      return open_listening_socket();
    }
    socklen_t len = sizeof S->listen_addr;
    getsockname(fd, (struct sockaddr *)&S->listen_addr, &len);
    *port = ntohs(S->family == AF_INET ? ((struct sockaddr_in *)&S->listen_addr)->sin_port : ((struct sockaddr_in6 *)&S->listen_addr)->sin6_port);
  } else {
    struct sockaddr_un *un = (struct sockaddr_un *)&S->listen_addr;
    un->sun_family = AF_UNIX;
    int n = snprintf(un->sun_path + 1, sizeof un->sun_path - 1, "lakebase-proxy-fuzz-listener.%d.%u", (int)getpid(), S->serial);
    S->listen_addr_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + (size_t)n);
    if (bind(fd, (struct sockaddr *)un, S->listen_addr_len) != 0) fail("bind: %s", strerror(errno));
  }
  if (listen(fd, 2 * MAX_CLIENTS) != 0) fail("listen: %s", strerror(errno));
  return fd;
}

/* ---------- the clients ---------- */

/* Returns whether it connected. */
static int client_connect(client_t *c) {
  if (c->tried) return 0;
  c->tried = 1; /* a failed connect is not retried */
  int fd = socket(S->family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) fail("socket: %s", strerror(errno));
  if (!S->tcp) {
    /* Bound to a name of its own (all of one length), so the accepted peer says which client it is. */
    struct sockaddr_un *un = (struct sockaddr_un *)&c->addr;
    un->sun_family = AF_UNIX;
    int n = snprintf(un->sun_path + 1, sizeof un->sun_path - 1, "lakebase-proxy-fuzz-client.%d.%u.%03d", (int)getpid(), S->serial, c->index);
    c->addr_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + (size_t)n);
    if (bind(fd, (struct sockaddr *)un, c->addr_len) != 0) fail("bind: %s", strerror(errno));
  }
  /* Not blocking: libFuzzer's SIGALRM would cut a blocking connect short (EINTR) while the
     kernel goes on connecting, and the listener would accept a client the model never had. */
  int e = connect(fd, (struct sockaddr *)&S->listen_addr, S->listen_addr_len) == 0 ? 0 : errno;
  if (e == EINPROGRESS) {
    struct pollfd p = { .fd = fd, .events = POLLOUT };
    while (poll(&p, 1, SETTLE_LIMIT_MS) < 0 && errno == EINTR) continue;
    socklen_t size = sizeof e;
    if (!p.revents || getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &size) != 0) fail("client %d: connect does not end", c->index);
  }
  if (e != 0) {
    if (verbose) fprintf(stderr, "  client %d: connect: %s\n", c->index, strerror(e));
    if (e == ECONNREFUSED && !S->closing) fail("client %d: connection refused by a listener not closed", c->index);
    close(fd);
    return 0;
  }
  if (S->tcp) {
    socklen_t len = sizeof c->addr;
    getsockname(fd, (struct sockaddr *)&c->addr, &len);
    c->addr_len = len;
  }
  c->fd = fd;
  c->state = C_BACKLOG;
  if (verbose) fprintf(stderr, "  client %d: connected\n", c->index);
  return 1;
}

static void put_packet(bytes_t *b, uint32_t length, uint32_t code, size_t body) {
  put_u32(b, length);
  if (body >= 4) {
    put_u32(b, code);
    body -= 4;
  }
  put_pattern(b, body, b->n);
}

static const uint32_t LENGTHS[] = { 0, 1, 3, 4, 7, 8, 9, 12, 16, 511, 512, 513, 1000, 10003, 10004, 10005, 10010, 65536, 0x7fffffff, 0xffffffff, SSL_CODE };
static const uint32_t CODES[] = { PROTOCOL_3_0, SSL_CODE, GSSENC_CODE, CANCEL_CODE, 0, 0x12345678 };
#define COUNT(a) (sizeof a / sizeof a[0])

/* Bytes into the client's outbox: `what` kind of them, the rest as the input says. */
static void compose(client_t *c, unsigned what) {
  bytes_t b = { 0 };
  switch (what % 8) {
    case 0:
      put(&b, SSL_REQUEST, 8);
      break;
    case 1:
      put(&b, GSSENC_REQUEST, 8);
      break;
    case 2: { /* a StartupMessage as libpq sends it */
      static const char params[] = "user\0fuzz\0database\0postgres\0application_name\0lakebase-proxy-fuzz\0";
      put_u32(&b, (uint32_t)(8 + sizeof params));
      put_u32(&b, PROTOCOL_3_0);
      put(&b, params, sizeof params);
      break;
    }
    case 3: /* a CancelRequest */
      put_u32(&b, 16);
      put_u32(&b, CANCEL_CODE);
      put_u32(&b, 4242);
      put_u32(&b, 0xdeadbeef);
      break;
    case 4: { /* a length word of the table (or the input's), a code, then bytes up to the length or a few */
      unsigned pick = in_u8();
      uint32_t length = pick % 32 < COUNT(LENGTHS) ? LENGTHS[pick % 32] : (uint32_t)in_size(10012);
      uint32_t code = CODES[in_u8() % COUNT(CODES)];
      size_t body = length >= 4 && length <= LP_STARTUP_MAX + 8 ? length - 4 : 20;
      put_packet(&b, length, code, body);
      break;
    }
    case 5: { /* the input's bytes */
      size_t n = in_u8();
      for (size_t i = 0; i < n; i++) put_u8(&b, in_u8());
      break;
    }
    case 6: { /* a length word alone, the input's */
      uint32_t length = (uint32_t)in_u8() << 24 | (uint32_t)in_u8() << 16 | (uint32_t)in_u8() << 8 | in_u8();
      put_u32(&b, length);
      break;
    }
    default:
      put_pattern(&b, in_size(700), c->written.n);
      break;
  }
  if (c->written.n + c->outbox.n + b.n <= MAX_WRITTEN) put(&c->outbox, b.d, b.n);
  if (verbose) fprintf(stderr, "  client %d: composes %zu bytes (%u), outbox %zu\n", c->index, b.n, what % 8, c->outbox.n);
  bytes_free(&b);
}

static void client_write(client_t *c, size_t k) {
  if (c->fd < 0 || c->shut || c->outbox.n == 0) return;
  if (k > c->outbox.n) k = c->outbox.n;
  ssize_t w = send(c->fd, c->outbox.d, k, MSG_DONTWAIT | MSG_NOSIGNAL);
  if (verbose) fprintf(stderr, "  client %d: writes %zu: %zd\n", c->index, k, w);
  if (w <= 0) return;
  put(&c->written, c->outbox.d, (size_t)w);
  drop_front(&c->outbox, (size_t)w);
}

/* The client reads: only 'N's, up to its refusals; its end only once its socket was closed on the other side. */
static void client_read(client_t *c) {
  if (c->fd < 0 || c->saw_end) return;
  unsigned char b[256];
  for (;;) {
    ssize_t r = recv(c->fd, b, sizeof b, MSG_DONTWAIT);
    if (r > 0) {
      for (ssize_t i = 0; i < r; i++)
        if (b[i] != 'N') fail("client %d received 0x%02x: only 'N' comes before its hand-over", c->index, b[i]);
      c->n_got += (size_t)r;
      if (c->n_got > (size_t)c->refusals) fail("client %d received %zu 'N's for %d refused requests", c->index, c->n_got, c->refusals);
      continue;
    }
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    int ended = c->state == C_GONE || (c->state == C_HANDED && c->hfd < 0) || (c->state == C_BACKLOG && S->listen_closed);
    if (!ended) fail("client %d read %s while %s", c->index, r == 0 ? "EOF" : strerror(errno), STATE_NAMES[c->state]);
    c->saw_end = 1;
    if (verbose) fprintf(stderr, "  client %d: its end (%s)\n", c->index, r == 0 ? "EOF" : strerror(errno));
    return;
  }
}

static void client_end(client_t *c, unsigned how) {
  if (c->fd < 0) return;
  if (how % 3 == 0) {
    if (verbose) fprintf(stderr, "  client %d: half-closes\n", c->index);
    shutdown(c->fd, SHUT_WR);
    c->shut = 1;
    return;
  }
  if (verbose) fprintf(stderr, "  client %d: %s\n", c->index, how % 3 == 2 ? "resets" : "closes");
  if (how % 3 == 2 && S->tcp) set_linger_zero(c->fd);
  close(c->fd);
  c->fd = -1;
  c->shut = c->closed = 1;
}

/* ---------- settling ---------- */

/* Why the client is not where it must end up once every socket delivered; NULL when it is. */
static const char *unsettled(const client_t *c) {
  switch (c->state) {
    case C_NONE:
      return NULL;
    case C_BACKLOG:
      if (S->listen_closed) return c->closed || c->saw_end ? NULL : "its connection not ended after the listening socket closed";
      return S->closing || c->closed || (S->backoff && uv_now(&S->loop) < S->backoff_until) ? NULL : "not accepted";
    case C_ACCEPTED:
      return "accepted, not handed over";
    case C_STARTUP: {
      if (c->shut) return "in its startup after its FIN";
      size_t need;
      enum lp_startup_step step = reference_step(from(&c->written, c->consumed), c->written.n - c->consumed, &need);
      if (step == LP_STARTUP_DONE) return "in its startup with its packet all sent";
      if (step == LP_STARTUP_REFUSE_ENCRYPTION) return "its encryption request not refused";
      return c->n_got < (size_t)c->refusals ? "an 'N' not read" : NULL;
    }
    case C_HANDED:
      if (c->hfd < 0) return c->closed || c->saw_end ? NULL : "its end not seen after the caller closed it";
      if (c->closed) return NULL;
      if (c->n_got < (size_t)c->refusals) return "an 'N' not read";
      if (c->handed.n < c->written.n - c->handed_from) return "bytes it sent not at the caller";
      return c->shut && !c->handed_end ? "its FIN not at the caller" : NULL;
    case C_GONE:
      return c->closed || c->saw_end ? NULL : "its end not seen after the listener closed it";
  }
  return "in no state";
}

static long long elapsed_ms(const struct timespec *since) {
  struct timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  return (now.tv_sec - since->tv_sec) * 1000LL + (now.tv_nsec - since->tv_nsec) / 1000000;
}

/* Turns until every client is where it must end up: the sockets deliver at once over the
   loopback, so only a slow machine waits (up to SETTLE_LIMIT_MS). */
static void settle(void) {
  struct timespec start;
  clock_gettime(CLOCK_MONOTONIC, &start);
  for (int round = 0;; round++) {
    turn();
    const char *why = NULL;
    int which = -1;
    for (int i = 0; i < MAX_CLIENTS; i++) {
      client_read(&S->clients[i]);
      caller_read(&S->clients[i]);
    }
    for (int i = 0; i < MAX_CLIENTS && !why; i++)
      if ((why = unsettled(&S->clients[i]))) which = i;
    if (!why) {
      if (verbose) fprintf(stderr, "  settled in %d turns\n", round + 1);
      return;
    }
    if (elapsed_ms(&start) > SETTLE_LIMIT_MS) fail("client %d does not settle: %s", which, why);
    if (round >= 2) usleep(100);
  }
}

/* ---------- the script ---------- */

static client_t *which_client(unsigned op) { return &S->clients[(op >> 4) % SCRIPT_CLIENTS]; }

/* The flood's clients connect at once, each with nothing, a StartupMessage or an SSLRequest sent. */
static void flood(unsigned b) {
  int connected = 0;
  for (int i = SCRIPT_CLIENTS; i < MAX_CLIENTS; i++) {
    client_t *c = &S->clients[i];
    if (!client_connect(c)) continue;
    connected++;
    if (b % 3 == 0) continue;
    compose(c, b % 3 == 1 ? 2 : 0); /* a StartupMessage, an SSLRequest */
    client_write(c, SIZE_MAX);
  }
  if (verbose) fprintf(stderr, "  flood: %d clients\n", connected);
}

static const size_t WRITE_SIZES[] = { 1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 511, 512, 513, 4096, 10004, SIZE_MAX };

static void step(void) {
  unsigned op = in_u8();
  client_t *c = which_client(op);
  if (verbose) fprintf(stderr, "step %u (%u), client %d\n", op % 16, op, c->index);
  switch (op % 16) {
    case 0:
      for (int i = 0; i < SCRIPT_CLIENTS; i++)
        if (!S->clients[i].tried) {
          client_connect(&S->clients[i]);
          break;
        }
      break;
    case 1:
      compose(c, in_u8());
      break;
    case 2:
      client_write(c, WRITE_SIZES[in_u8() % COUNT(WRITE_SIZES)]);
      break;
    case 3:
      compose(c, in_u8());
      client_write(c, SIZE_MAX);
      break;
    case 4:
      client_end(c, in_u8());
      break;
    case 5:
      client_read(c);
      break;
    case 6: {
      int turns = 1 + in_u8() % 4;
      for (int i = 0; i < turns; i++) turn();
      break;
    }
    case 7: { /* time goes on: a millisecond or two (within the input's budget), or past an EMFILE's backoff (once), then a turn */
      int ms = (int)(in_u8() % 4);
      if (ms == 3) {
        ms = 0;
        uv_update_time(&S->loop);
        static struct timespec last_wait;
        if (S->backoff && !S->waited_backoff && uv_now(&S->loop) < S->backoff_until && (last_wait.tv_sec == 0 || elapsed_ms(&last_wait) >= BACKOFF_WAIT_EVERY_MS)) {
          S->waited_backoff = 1;
          usleep((useconds_t)(S->backoff_until - uv_now(&S->loop) + 1) * 1000);
          clock_gettime(CLOCK_MONOTONIC, &last_wait);
        }
      }
      if (ms > SLEEP_BUDGET_MS - S->slept_ms) ms = SLEEP_BUDGET_MS - S->slept_ms;
      if (ms > 0) usleep((useconds_t)ms * 1000);
      S->slept_ms += ms;
      if (verbose) fprintf(stderr, "  slept %d ms\n", ms);
      turn();
      break;
    }
    case 8: {
      unsigned b = in_u8();
      configure(b, b & 0x80 ? in_u8() : 0);
      break;
    }
    case 9:
      close_listener();
      break;
    case 10:
      caller_read(c);
      break;
    case 11:
      caller_close(c, in_u8() & 1);
      break;
    case 12: { /* the listener's next call of a kind fails */
      static const int ACCEPT_ERRORS[] = { EINTR, ECONNABORTED, EAGAIN, EMFILE, EPROTO }, RECV_ERRORS[] = { EINTR, EAGAIN, ECONNRESET }, SEND_ERRORS[] = { EAGAIN, EPIPE };
      unsigned b = in_u8();
      S->fault = (enum fault)(1 + b % 4);
      S->fault_errno = S->fault == FAULT_ACCEPT ? ACCEPT_ERRORS[(b / 4) % 5] : S->fault == FAULT_RECV ? RECV_ERRORS[(b / 4) % 3] : S->fault == FAULT_SEND ? SEND_ERRORS[(b / 4) % 2] : ENOMEM;
      if (verbose) fprintf(stderr, "  the next %s fails: %s\n", FAULT_NAMES[S->fault], strerror(S->fault_errno));
      break;
    }
    case 13:
      S->react = in_u8();
      S->react_config = in_u8();
      if (verbose) fprintf(stderr, "  reactions 0x%x (config 0x%x)\n", S->react, S->react_config);
      break;
    case 14:
      settle();
      break;
    case 15:
      flood(in_u8());
      break;
  }
  check_between(-1);
  check_pending();
}

static void free_session(void) {
  for (int i = 0; i < MAX_CLIENTS; i++) {
    client_t *c = &S->clients[i];
    if (c->fd >= 0) {
      if (S->tcp) set_linger_zero(c->fd); /* no TIME_WAIT left behind, input after input */
      close(c->fd);
    }
    if (c->state == C_HANDED) caller_close(c, 1);
    bytes_free(&c->outbox);
    bytes_free(&c->written);
    bytes_free(&c->handed);
  }
}

/* lp_listener_open refuses what it cannot take (a pipe; no memory) with a reason, and leaves the descriptor open. */
static void refused_opens(void) {
  int pipe_fds[2];
  if (pipe2(pipe_fds, O_CLOEXEC) != 0) fail("pipe2: %s", strerror(errno));
  const char *error = NULL;
  if (lp_listener_open(&S->loop, pipe_fds[0], on_arrival, S, &error) || !error) fail("lp_listener_open took a pipe");
  if (!fd_open(pipe_fds[0])) fail("lp_listener_open closed the pipe it refused");
  close(pipe_fds[0]);
  close(pipe_fds[1]);
  error = NULL;
  S->fault = FAULT_ALLOC;
  if (lp_listener_open(&S->loop, S->listen_fd, on_arrival, S, &error) || !error) fail("lp_listener_open with no memory");
  S->fault = FAULT_NONE;
  S->alloc_failed = 0;
  if (!fd_open(S->listen_fd)) fail("lp_listener_open closed the listening socket it could not take");
  if (verbose) fprintf(stderr, "  refused opens: %s\n", error);
}

static void run_session(unsigned config) {
  session_t s;
  memset(&s, 0, sizeof s);
  S = &s;
  s.serial = sessions++;
  s.tcp = (config & CFG_TCP) != 0;
  s.family = !s.tcp ? AF_UNIX : config & CFG_IPV6 ? AF_INET6 : AF_INET;
  s.descriptors = open_descriptors();
  for (int i = 0; i < MAX_CLIENTS; i++) {
    s.clients[i].index = i;
    s.clients[i].fd = s.clients[i].lfd = s.clients[i].hfd = -1;
  }
  if (uv_loop_init(&s.loop) != 0) fail("uv_loop_init");
  s.listen_fd = open_listening_socket();
  const char *error = NULL;
  if (config & CFG_OPEN_FAILS) refused_opens();
  s.l = lp_listener_open(&s.loop, s.listen_fd, on_arrival, &s, &error);
  if (!s.l) fail("lp_listener_open: %s", error);
  s.negotiate = 1;
  s.timeout_ms = 60000;
  if (config & CFG_CONFIG) configure(in_u8(), 0);
  phase = "script";
  while (in_left > 0) step();
  phase = "end";
  if (!s.closing && !(config & CFG_ABRUPT)) settle();
  close_listener();
  for (int i = 0; i < 8 && uv_loop_alive(&s.loop); i++) uv_run(&s.loop, UV_RUN_NOWAIT);
  if (uv_loop_alive(&s.loop)) fail("the loop still has handles after lp_listener_close");
  if (!s.listen_closed) fail("the listening socket is open after lp_listener_close");
  settle();
  free_session();
  if (uv_loop_close(&s.loop) != 0) fail("the loop still holds handles after the end");
  int descriptors = open_descriptors();
  if (descriptors != s.descriptors) fail("%d descriptors open after the session, %d before", descriptors, s.descriptors);
  S = NULL;
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  fuzz_target = "LISTENER";
  verbose = getenv("FUZZ_VERBOSE") != NULL;
  signal(SIGPIPE, SIG_IGN);
  /* libuv's first loop opens the pipe of its signal handling, for the process: before the first count of descriptors. */
  uv_loop_t loop;
  if (uv_loop_init(&loop) != 0 || uv_loop_close(&loop) != 0) fail("uv_loop_init");
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  in_data = data;
  in_left = size;
  phase = "setup";
  unsigned config = in_u8();
  if (config & CFG_PURE) {
    phase = "pure";
    run_pure();
    return 0;
  }
  run_session(config);
  return 0;
}
