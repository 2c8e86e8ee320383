/*
 * libFuzzer target for native/relay.c (see .ci/fuzz.sh): one input is one upstream connection
 * (two when a session is to be resumed), driven through relay.h as addon.c drives it, against a
 * real OpenSSL server. The input is a script: two config bytes (TLS 1.2 or 1.3, verification and
 * the name checked, SNI, resumption, small socket buffers, socketpairs or TCP over the loopback,
 * callbacks that react), then steps (see step(); native/fuzz/seeds.mjs writes named examples).
 *
 * relay.c owns one end of the upstream socket (lp_conn_connect); at the other an OpenSSL server
 * works on memory BIOs, and its ciphertext reaches the socket only when the input says so, in
 * pieces of the input's sizes: records arrive cut anywhere, with KeyUpdates, session tickets and
 * close_notify among them, or corrupted, or with garbage between them. The harness writes the
 * client's end (queries, a Terminate, messages cut short, garbage) and reads it. Either peer may
 * half-close, close (with unread bytes: the relay sees ECONNRESET; TCP may reset), or stop
 * reading. Callbacks react as the JavaScript side may: pause, write, close, even attach the
 * relay from inside the data callback, close from inside `abandoned`; lp_conn_close comes at any
 * point, with any end.
 *
 * When the input is used up, both peers cooperate to an orderly end; a connection still waiting
 * on something then sees both peers close their sockets, and must end at once (the relay's linger
 * timer is stopped as it starts, so a connection that only that timer would end shows as a hang).
 * Checked for every input:
 *  - the server receives a prefix of the plaintext sent upstream (login writes, the relay's
 *    first bytes, then the client's stream), and the login's reader a prefix of the server's,
 *    none of it while paused;
 *  - the client receives a prefix of what the relay was given for it (its first bytes, then
 *    the server's plaintext after the login), followed at most by the farewell, which comes only
 *    between two messages and after no ErrorResponse;
 *  - exactly one `end` callback, with counters that match what moved; every descriptor the
 *    relay took is closed and the loop holds no handle;
 *  - a handshake without verification never fails on the certificate; with verify-full, a
 *    certificate for another name never passes; a session offered before is resumed;
 *  - when nothing went wrong (no fault injected, no early close), everything arrives: the
 *    server gets all of it, the client all of it, and the counters say so;
 *  - with far more waiting upstream than one read takes, one turn of the loop does not take it all.
 * ASan, UBSan and LeakSanitizer watch the memory. A failed check aborts, so libFuzzer keeps
 * the input. The input's reader, the server and the sockets are support.c's, shared with
 * txclient-harness.c.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <openssl/err.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "../relay.h"
#include "support.h"

/* ---------- one connection ---------- */

/* What the harness's farewell callback returns: an ErrorResponse no server byte stream here builds. */
static const unsigned char FAREWELL[] = { 'E', 0, 0, 0, 38, 'S', 'F', 'A', 'T', 'A', 'L', 0, 'C', '0', '8', '0', '0', '6', 0,
                                          'M', 'f', 'u', 'z', 'z', '-', 'f', 'a', 'r', 'e', 'w', 'e', 'l', 'l', '-', '0', '8', '0', '0', '6', 0, 0 };

typedef struct {
  uv_loop_t loop;
  lp_conn *conn;            /* NULL before connect and once `end` came */
  int relay_fd, up_fd;      /* the descriptors relay.c took (-1 if not taken) */
  tls_server_t srv;         /* the server, at the other end of the upstream socket */
  int cl_fd;                /* the harness's end of the client pair (-1 once closed) */
  int cl_relay_end;         /* the relay's end of the client pair, before lp_conn_relay takes it */
  int cl_eof, cl_shut;
  int handshake_calls, handshake_ok, ends, farewells, abandons, login_ended;
  int attached;             /* lp_conn_relay took the client (a detach does not undo it) */
  int pooled;               /* the relay keeps the upstream when the client leaves */
  int detached;             /* the pooled relay let its client go: before the relay again */
  int paused;               /* the login's reader asked for no more data */
  size_t login_written;     /* bytes lp_conn_write took before the relay */
  bytes_t first_up;         /* the relay's first bytes for the upstream */
  size_t first_cl_n;        /* and how many it had for the client */
  size_t consumed;          /* login_got.n when the relay started */
  double detach_up, detach_cl; /* the client's byte counts, as `detached` said them */
  bytes_t after_got;        /* what the data callback got after the detach */
  size_t after_from;        /* where in srv.sent that stream starts */
  int faults;               /* something was done that may lose bytes */
  enum lp_end end;
  double end_up, end_cl;
  double counters[2];
  size_t farewell_at;       /* counters[1] when the farewell was asked for */
  size_t srv_checked;       /* how much of srv.got check_upstream() has seen */
  bytes_t up_expected;      /* what the server may read: login writes and the relay's first bytes, then cl_sent (after
                               a detach: what the relay passed on of those, then the writes since) */
  bytes_t cl_sent;          /* what the client put on its socket (the relay reads it only once attached) */
  bytes_t login_got;        /* what the data callback got */
  bytes_t cl_expected;      /* what the client may read: the first bytes, then srv.sent after login_got */
  bytes_t cl_pending;       /* the client's bytes not yet on the socket */
  bytes_t cl_got;
  int react_in_callbacks;
  int server_first;         /* in the drain, the server closes first */
  unsigned sockets;         /* bit 0: the upstream over TCP, bit 1: the client over TCP, bit 2: a pooled relay */
  int verifying;            /* the lp_ctx checks the certificate */
  int wrong_host;           /* verify-full against a name the certificate lacks */
  int resumable;            /* a session was left by an earlier connection */
  int resumed;
  int flooded;
} session_t;

static session_t *S;

/* The relay runs: lp_conn_relay took the client and has not let it go. */
static int relaying(void) { return S->attached && !S->detached; }

/* The server's plaintext so far; `up_expected` only grows before the relay, while the server has read none of the client's stream. */
static void check_upstream(void) {
  check_prefix_from("server plaintext vs what was sent upstream", &S->srv.got, S->srv_checked, S->srv.got.n, &S->up_expected, S->detached ? NULL : &S->cl_sent);
  S->srv_checked = S->srv.got.n;
}

static void srv_collect(void) { server_collect(&S->srv); }

static void attach(void);

/* As NativeUpstream does: pausing counts once the handshake is done, but not while the relay runs. */
static void pause_login(int paused) {
  if (!S->conn) return;
  if (S->handshake_ok && !relaying()) S->paused = paused;
  lp_conn_pause(S->conn, paused);
}

/* ---------- callbacks ---------- */

static void on_handshake(lp_conn *c, void *user, const char *error, long verify) {
  if (user != S) fail("handshake: wrong user pointer");
  S->conn = c;
  if (++S->handshake_calls > 1) fail("handshake callback called %d times", S->handshake_calls);
  S->handshake_ok = error == NULL;
  if (verbose && error) fprintf(stderr, "handshake failed: %s (verify %ld)\n", error, verify);
  /* Without verification (SSLMode=require) the certificate is never why a handshake failed. */
  if (error && !S->verifying && verify != X509_V_OK) fail("a handshake without verification failed \"%s\", verify result %ld: blamed on the certificate", error, verify);
  S->resumed = error == NULL && lp_conn_resumed(c);
  if (!error && S->react_in_callbacks && in_u8() % 4 == 0) {
    unsigned char startup[8] = { 0, 0, 0, 8, 0, 3, 0, 0 };
    if (lp_conn_write(c, startup, sizeof startup) >= 0) put(&S->up_expected, startup, sizeof startup);
  }
}

static void on_data(lp_conn *c, void *user, const unsigned char *data, size_t n, const char *error) {
  if (user != S) fail("data: wrong user pointer");
  if (relaying()) fail("data callback while the relay runs");
  if (S->login_ended) fail("data callback after the end of the login's stream");
  if (!data) {
    S->login_ended = 1;
    (void)error;
    return;
  }
  if (n == 0) return; /* no bytes: what lp_conn_write queued is written (backpressure) */
  if (S->paused) fail("data callback while the login's reader is paused");
  if (S->detached) { /* the server's stream goes on where the client's part of it ended */
    put(&S->after_got, data, n);
    if (S->after_from + S->after_got.n > S->srv.sent.n || memcmp(S->after_got.d, S->srv.sent.d + S->after_from, S->after_got.n) != 0)
      fail("after the detach, the reader's %zu bytes are not the server's plaintext from byte %zu on (%zu sent)", S->after_got.n, S->after_from, S->srv.sent.n);
  } else {
    put(&S->login_got, data, n);
    check_prefix("login reader vs server plaintext", &S->login_got, S->login_got.n, &S->srv.sent);
  }
  if (!S->react_in_callbacks) return;
  switch (in_u8() % 8) {
    case 0: pause_login(1); break;
    case 1: {
      unsigned char query[] = { 'Q', 0, 0, 0, 5, 0 };
      if (lp_conn_write(c, query, sizeof query) >= 0) put(&S->up_expected, query, sizeof query);
      break;
    }
    case 2: S->faults = 1; lp_conn_close(c, LP_END_UPSTREAM_ERROR); break;
    case 3: attach(); break;
    default: break;
  }
}

static void on_abandoned(lp_conn *c, void *user) {
  (void)c;
  if (user != S) fail("abandoned: wrong user pointer");
  if (!relaying()) fail("abandoned outside the relay");
  if (++S->abandons > 1) fail("abandoned twice");
  if (S->react_in_callbacks && in_u8() % 4 == 0) { /* the caller gives up on the connection as it hears of it */
    if (verbose) fprintf(stderr, "abandoned: the caller closes\n");
    S->faults = 1;
    lp_conn_close(c, LP_END_SHUTDOWN);
  }
}

static size_t on_farewell(lp_conn *c, void *user, const char *reason, unsigned char *out, size_t cap) {
  (void)c;
  (void)reason;
  if (user != S) fail("farewell: wrong user pointer");
  if (!relaying()) fail("farewell outside the relay");
  if (++S->farewells > 1) fail("farewell asked for twice");
  S->farewell_at = (size_t)S->counters[1];
  if (cap < sizeof FAREWELL) fail("farewell: only %zu bytes of room", cap);
  memcpy(out, FAREWELL, sizeof FAREWELL);
  return sizeof FAREWELL;
}

static void on_end(lp_conn *c, void *user, enum lp_end end, double to_upstream, double to_client) {
  if (user != S) fail("end: wrong user pointer");
  if (S->conn && S->conn != c) fail("end: another connection");
  if (++S->ends > 1) fail("end callback called %d times", S->ends);
  if (end <= LP_END_NONE || end > LP_END_IDLE) fail("end: %d is no end", (int)end);
  S->end = end;
  S->end_up = to_upstream;
  S->end_cl = to_client;
  S->conn = NULL;
}

static int boundary_at(const bytes_t *stream, size_t at, int *last_type);

/* Where a pooled relay stops the client's stream: at its first Terminate between two messages,
   or nowhere (n) when there is none or the lengths go wrong before one (as boundaries_scan follows it). */
static size_t terminate_at(const unsigned char *d, size_t n) {
  for (size_t i = 0; i < n;) {
    if (d[i] == 'X') return i;
    if (n - i < 5) return n;
    uint32_t length = ((uint32_t)d[i + 1] << 24) | ((uint32_t)d[i + 2] << 16) | ((uint32_t)d[i + 3] << 8) | d[i + 4];
    if (length < 4 || length > INT32_MAX) return n;
    i += 1 + (size_t)length;
  }
  return n;
}

/* The client's stream through the relay: its first bytes, then what the client sent (before a detach). */
static void client_stream(bytes_t *out) {
  put(out, S->first_up.d, S->first_up.n);
  put(out, S->cl_sent.d, S->cl_sent.n);
}

/* A pooled relay let its client go: the connection is before the relay again, reading for the caller. */
static void on_detached(lp_conn *c, void *user, enum lp_end end, double to_upstream, double to_client, int reusable, int status) {
  (void)c;
  if (user != S) fail("detached: wrong user pointer");
  if (verbose) fprintf(stderr, "detached: %s [%g, %g] reusable %d status 0x%02x\n", end > LP_END_NONE && end <= LP_END_IDLE ? LP_END_NAMES[end] : "?", to_upstream, to_client, reusable, status & 0xff);
  if (!S->pooled) fail("detached without a pooled relay");
  if (!relaying()) fail("detached outside the relay");
  if (end <= LP_END_NONE || end > LP_END_IDLE) fail("detached: %d is no end", (int)end);
  if (to_upstream != S->counters[0] || to_client != S->counters[1]) fail("detached says [%g, %g], the counters [%g, %g]", to_upstream, to_client, S->counters[0], S->counters[1]);
  bytes_t stream = { 0 };
  client_stream(&stream);
  size_t up = (size_t)to_upstream, cl = (size_t)to_client;
  if (up > stream.n) fail("detached: to_upstream %zu, the client's stream has %zu", up, stream.n);
  if (up > terminate_at(stream.d, stream.n)) fail("detached: the client's Terminate (byte %zu) was passed on (%zu bytes)", terminate_at(stream.d, stream.n), up);
  if (cl < S->first_cl_n || cl > S->cl_expected.n) fail("detached: to_client %zu, the client's stream has %zu (%zu first bytes)", cl, S->cl_expected.n, S->first_cl_n);
  if (reusable) { /* the upstream at ReadyForQuery, between two messages of the client's */
    int last;
    if (!boundary_at(&stream, up, &last)) fail("reusable, but the client's stream is inside a message (%zu bytes)", up);
    /* A relay starts at the upstream's ReadyForQuery, idle (the caller's promise, relay.c assumes it). */
    bytes_t seen = { 0 };
    put(&seen, "Z\0\0\0\5I", 6);
    put(&seen, S->cl_expected.d, cl);
    if (!boundary_at(&seen, seen.n, &last) || last != 'Z') fail("reusable, but the server's last message (%zu bytes) is no whole ReadyForQuery", cl);
    if (status != seen.d[seen.n - 1]) fail("reusable with status 0x%02x, the ReadyForQuery says 0x%02x", status, seen.d[seen.n - 1]);
    bytes_free(&seen);
  }
  /* What reaches the server now: the login's writes, what the relay passed on, then the caller's writes. */
  S->up_expected.n = S->login_written;
  put(&S->up_expected, stream.d, up);
  bytes_free(&stream);
  S->detached = 1;
  S->detach_up = to_upstream;
  S->detach_cl = to_client;
  S->after_from = S->consumed + (cl - S->first_cl_n);
  S->paused = 0;
}

static const lp_callbacks callbacks = { on_handshake, on_data, on_abandoned, on_farewell, on_detached, on_end };

/* ---------- the peers ---------- */

/* Turns of the loop, the relay's linger timer stopped as it starts (support.h). */
static void run_loop(int times) { run_loop_of(&S->loop, times); }

/* The server's ciphertext onto the socket, up to `max` bytes. */
static void srv_flush(size_t max) { server_flush(&S->srv, max); }

/* Reads the socket into the server, then what the server can make of it. */
static void srv_read(size_t max) {
  server_read(&S->srv, max);
  check_upstream();
}

static void srv_write(const bytes_t *plain) {
  if (server_write(&S->srv, plain->d, plain->n) && relaying()) put(&S->cl_expected, plain->d, plain->n);
}

static void srv_close_notify(void) { server_close_notify(&S->srv); }

static void srv_fin(void) {
  if (server_fin(&S->srv)) S->faults = 1; /* records or the handshake cut short */
}

/* A peer closes its socket (see peer_close): what was in flight may be lost. */
static void srv_close(int reset) {
  if (peer_close(&S->srv.fd, &S->srv.shut, &S->srv.eof, reset)) S->faults = 1;
}

static void cl_flush(size_t max) {
  if (S->cl_fd < 0 || S->cl_shut || S->cl_pending.n == 0) return;
  size_t n = max < S->cl_pending.n ? max : S->cl_pending.n;
  ssize_t w = send(S->cl_fd, S->cl_pending.d, n, MSG_DONTWAIT | MSG_NOSIGNAL);
  if (w > 0) {
    put(&S->cl_sent, S->cl_pending.d, (size_t)w);
    drop_front(&S->cl_pending, (size_t)w);
  }
}

static void cl_read(size_t max) {
  if (S->cl_fd < 0 || S->cl_eof) return;
  unsigned char b[65536];
  if (max > sizeof b) max = sizeof b;
  if (max == 0) return;
  ssize_t r = recv(S->cl_fd, b, max, MSG_DONTWAIT);
  if (r > 0) put(&S->cl_got, b, (size_t)r);
  else if (r == 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) S->cl_eof = 1;
}

static void cl_fin(void) {
  if (S->cl_fd < 0 || S->cl_shut) return;
  if (S->cl_pending.n > 0) S->faults = 1;
  shutdown(S->cl_fd, SHUT_WR);
  S->cl_shut = 1;
}

static void cl_close(int reset) {
  if (peer_close(&S->cl_fd, &S->cl_shut, &S->cl_eof, reset)) S->faults = 1;
}

/* Postgres-like messages from the server: DataRow, CommandComplete, ReadyForQuery, ErrorResponse, NoticeResponse. */
static void make_server_bytes(bytes_t *out) {
  unsigned kind = in_u8() % 5;
  if (kind == 0) { /* raw bytes of the input: anything, even lying lengths */
    size_t n = in_u8();
    for (size_t i = 0; i < n; i++) put_u8(out, in_u8());
  } else if (kind <= 2) {
    for (unsigned m = 1 + in_u8() % 4; m > 0; m--) {
      static const char types[] = "DDDCZEN";
      char type = types[in_u8() % (sizeof types - 1)];
      size_t body = type == 'Z' ? 1 : in_u8() % 64;
      put_u8(out, (unsigned)type);
      put_u32(out, (uint32_t)(body + 4));
      if (type == 'Z') put_u8(out, 'I');
      else put_pattern(out, body, S->srv.sent.n);
    }
  } else if (kind == 3) { /* one large DataRow, records of 16 KiB and more than the client's socket takes */
    size_t body = (size_t)(in_u8() % 128 + 1) * 1024;
    put_u8(out, 'D');
    put_u32(out, (uint32_t)(body + 4));
    put_pattern(out, body, S->srv.sent.n);
  } else { /* a message cut short: the rest may come in a later write */
    put_u8(out, 'D');
    put_u32(out, 200);
    put_pattern(out, in_u8() % 200, S->srv.sent.n);
  }
}

/* The client's bytes: queries, a Terminate, a message cut short, garbage, a large CopyData. */
static void make_client_bytes(bytes_t *out) {
  switch (in_u8() % 6) {
    case 0: {
      size_t n = in_u8();
      for (size_t i = 0; i < n; i++) put_u8(out, in_u8());
      break;
    }
    case 1:
    case 2: {
      size_t body = in_u8() % 100;
      put_u8(out, 'Q');
      put_u32(out, (uint32_t)(body + 5));
      put_pattern(out, body, S->up_expected.n + S->cl_sent.n);
      put_u8(out, 0);
      break;
    }
    case 3: put(out, "X\0\0\0\4", 5); break;
    case 4: put(out, "Q\0\0\0\100SELECT", 11); break;
    default: {
      size_t body = (size_t)(in_u8() % 128 + 1) * 1024;
      put_u8(out, 'd');
      put_u32(out, (uint32_t)(body + 4));
      put_pattern(out, body, S->up_expected.n + S->cl_sent.n);
      break;
    }
  }
}

/* What the relay is given first: a greeting that ends in ReadyForQuery, or the input's bytes. */
static void make_first_bytes(bytes_t *to_client, bytes_t *to_upstream) {
  unsigned how = in_u8();
  if (how & 1) {
    put(to_client, "R\0\0\0\10\0\0\0\0", 9);
    put(to_client, "Z\0\0\0\5I", 6);
  } else if (how & 2) {
    for (size_t n = in_u8() % 16; n > 0; n--) put_u8(to_client, in_u8());
  }
  /* What the login's reader had of the server and did not use goes first, as NativeRelay.start() does. */
  if ((how & 4) && S->login_got.n > 0) put(to_client, S->login_got.d + S->login_got.n - 1, 1);
  if (how & 8) make_client_bytes(to_upstream);
}

static void attach(void) {
  if (S->attached || !S->conn || S->cl_relay_end < 0) return;
  bytes_t first_cl = { 0 }, first_up = { 0 };
  make_first_bytes(&first_cl, &first_up);
  /* The stretch of server plaintext the login's reader consumed is not the client's. */
  size_t consumed = S->login_got.n;
  const char *error = NULL;
  size_t up_before = S->up_expected.n;
  put(&S->up_expected, first_up.d, first_up.n);
  put(&S->cl_expected, first_cl.d, first_cl.n);
  if (S->srv.sent.n > consumed) put(&S->cl_expected, S->srv.sent.d + consumed, S->srv.sent.n - consumed);
  S->attached = 1;
  S->paused = 0;
  S->login_written = up_before;
  put(&S->first_up, first_up.d, first_up.n);
  S->first_cl_n = first_cl.n;
  S->consumed = consumed;
  if (lp_conn_relay(S->conn, S->cl_relay_end, first_cl.d, first_cl.n, first_up.d, first_up.n, S->counters, S->pooled, &error) != 0) {
    /* Refused: nothing was taken. */
    S->attached = 0;
    S->up_expected.n = up_before;
    S->cl_expected.n = 0;
    close(S->cl_relay_end);
  } else {
    S->relay_fd = S->cl_relay_end;
  }
  S->cl_relay_end = -1;
  bytes_free(&first_cl);
  bytes_free(&first_up);
}



/*
 * Far more waits on the upstream socket than one read takes, and the client takes all of it at
 * once: one turn of the loop must not relay all of it. A relay that reads for as long as the
 * upstream has bytes holds Node's event loop for as long as a fast server sends (a COPY out
 * whose client went away: every other session, every timer, and the cancel request that would
 * stop it, wait). Needs buffers beyond the system's limits (SO_*BUFFORCE, root); skipped without.
 */
static void flood(void) {
  enum { FLOOD = 4 << 20 };
  int big = 4 * FLOOD;
  if (S->flooded || !relaying() || S->srv.shut || S->srv.broken || S->srv.fd < 0 || S->cl_fd < 0 || S->relay_fd < 0 || (S->sockets & 3) != 0) return;
  S->flooded = 1; /* once a connection: it is slow */
  if (setsockopt(S->srv.fd, SOL_SOCKET, SO_SNDBUFFORCE, &big, sizeof big) != 0 || setsockopt(S->up_fd, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof big) != 0 ||
      setsockopt(S->relay_fd, SOL_SOCKET, SO_SNDBUFFORCE, &big, sizeof big) != 0 || setsockopt(S->cl_fd, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof big) != 0)
    return;
  srv_flush(SIZE_MAX);
  bytes_t rows = { 0 };
  for (int i = 0; i < 8; i++) {
    put_u8(&rows, 'D');
    put_u32(&rows, (FLOOD / 8) + 4);
    put_pattern(&rows, FLOOD / 8, S->srv.sent.n);
  }
  srv_write(&rows);
  size_t queued = S->srv.cipher.n;
  for (int i = 0; i < 64 && S->srv.cipher.n > 0; i++) srv_flush(SIZE_MAX);
  if (S->srv.cipher.n == 0 && queued > FLOOD) {
    double before = S->counters[1];
    run_loop(1);
    if (S->counters[1] - before >= FLOOD) fail("one turn of the loop relayed all %g bytes the upstream had sent: it did not yield", S->counters[1] - before);
  }
  bytes_free(&rows);
}

/* One step of the input's script. */
static void step(void) {
  unsigned op = in_u8();
  if (verbose) fprintf(stderr, "step %u (%u): conn %s attached %d; server sent %zu, cipher queued %zu; client sent %zu, got %zu\n", op % 24, op, S->conn ? "open" : "ended", S->attached,
                       S->srv.sent.n, S->srv.cipher.n, S->cl_sent.n, S->cl_got.n);
  bytes_t b = { 0 };
  switch (op % 24) {
    case 0: case 1: case 2: make_server_bytes(&b); srv_write(&b); break;
    case 3: case 4: case 5: srv_flush(1 + in_size(70000)); break;
    case 6: case 7: srv_read(1 + in_size(70000)); break;
    case 8: case 9: make_client_bytes(&b); put(&S->cl_pending, b.d, b.n); cl_flush(b.n); break;
    case 10: cl_flush(1 + in_size(70000)); break;
    case 11: cl_read(1 + in_size(70000)); break;
    case 12: case 13: run_loop(1 + in_u8() % 4); break;
    case 14: /* KeyUpdate, asking for one back or not; or a session ticket */
      if (!S->srv.broken && SSL_is_init_finished(S->srv.ssl) && !(SSL_get_shutdown(S->srv.ssl) & SSL_SENT_SHUTDOWN) && SSL_version(S->srv.ssl) == TLS1_3_VERSION) {
        ERR_clear_error();
        if (op & 0x20) SSL_new_session_ticket(S->srv.ssl);
        else SSL_key_update(S->srv.ssl, (op & 0x40) ? SSL_KEY_UPDATE_REQUESTED : SSL_KEY_UPDATE_NOT_REQUESTED);
        SSL_do_handshake(S->srv.ssl);
        ERR_clear_error();
        srv_collect();
      }
      break;
    case 15: /* close_notify; then, whole on the socket, FIN */
      srv_close_notify();
      if (op & 0x80) {
        srv_flush(SIZE_MAX);
        srv_fin();
      }
      break;
    case 16: if (op & 0x80) srv_close((op & 0x40) != 0); else srv_fin(); break;
    case 17: /* the stream damaged: a flipped bit or garbage between two pieces */
      srv_collect();
      S->faults = 1;
      if ((op & 0x80) && S->srv.cipher.n > 0) S->srv.cipher.d[in_size(S->srv.cipher.n - 1)] ^= (unsigned char)(1u << (in_u8() % 8));
      else {
        bytes_t garbage = { 0 };
        for (size_t n = 1 + in_u8() % 32; n > 0; n--) put_u8(&garbage, in_u8());
        if (S->srv.fd >= 0 && !S->srv.shut) (void)!send(S->srv.fd, garbage.d, garbage.n, MSG_DONTWAIT | MSG_NOSIGNAL);
        bytes_free(&garbage);
      }
      break;
    case 18: if (op & 0x80) cl_close((op & 0x40) != 0); else cl_fin(); break;
    case 19: if (S->cl_fd >= 0 && !S->cl_eof) { S->faults = 1; shutdown(S->cl_fd, SHUT_RD); S->cl_eof = 1; } break;
    case 20:
      if (S->conn && !relaying() && (op & 0xc0) == 0xc0) {
        S->faults = 1; /* a relay may start after it, with the upstream beyond writing */
        lp_conn_end(S->conn);
      } else if (S->conn && !relaying()) {
        make_client_bytes(&b);
        if (lp_conn_write(S->conn, b.d, b.n) >= 0) put(&S->up_expected, b.d, b.n);
      } else if (S->conn && (op & 0xc0) == 0xc0) {
        flood();
      } else if (S->conn && (op & 0xc0) == 0x80 && S->pooled) {
        S->faults = 1; /* what was queued for the client is dropped */
        lp_conn_detach(S->conn, LP_END_IDLE);
      } else if (S->conn) {
        lp_conn_pause(S->conn, (int)(op & 0x80)); /* the relay ignores it */
      }
      break;
    case 21: pause_login((op & 0x80) != 0); break;
    case 22: if (S->handshake_ok || (op & 0x80)) attach(); break;
    default:
      if (S->conn && (op & 0xc0) == 0xc0) {
        S->faults = 1;
        /* The ends NativeRelay passes (shutdown, idle_timeout, upstream_error), or with the high
           bit any other addon.c accepts. */
        static const enum lp_end ends[] = { LP_END_SHUTDOWN, LP_END_IDLE, LP_END_UPSTREAM_ERROR, LP_END_CLIENT_CLOSED, LP_END_CLIENT_ERROR, LP_END_UPSTREAM_CLOSED };
        unsigned which = in_u8();
        lp_conn_close(S->conn, ends[(which & 0x80 ? 3 : 0) + (which & 0x7f) % 3]);
      } else if (S->conn) {
        int running;
        double idle;
        lp_conn_state(S->conn, &running, &idle);
        if (running && !relaying()) fail("a query runs outside the relay");
        int n = lp_conn_certificate(S->conn, NULL, 0);
        if (n > 0) {
          unsigned char *der = malloc((size_t)n);
          if (lp_conn_certificate(S->conn, der, n) != n) fail("certificate: length changed");
          free(der);
        }
        (void)lp_conn_version(S->conn);
        (void)lp_conn_cipher(S->conn);
        (void)lp_conn_resumed(S->conn);
      }
      break;
  }
  bytes_free(&b);
}

/* Bytes moved by the peers so far (each count only grows, and only as far as the input allows). */
static size_t moved(void) { return S->srv.flushed + S->srv.got.n + S->cl_sent.n + S->cl_got.n + S->login_got.n; }

/*
 * The end of every input. First both peers cooperate until the connection ends: every byte
 * moves, then each side closes, the way the input chose. That takes as many turns as the bytes
 * need (megabytes through 4 KiB socket buffers take hundreds); the connection is stuck when
 * nothing has moved for STALLED turns in a row. A connection that something went wrong with may
 * still wait on a peer (one that stopped reading, say): then both peers close their sockets, and
 * the relay must end at once.
 */
static void drain(void) {
  enum { STALLED = 300 };
  phase = "drain";
  int turns = 0, stalled = 0;
  for (; stalled < STALLED && S->conn; turns++) {
    size_t before = moved();
    if (S->handshake_ok && !S->attached && !S->login_ended) attach();
    if (S->detached) {
      S->cl_pending.n = 0; /* the client is gone: what it had not sent stays unsent */
      if (S->paused) pause_login(0);
    }
    srv_flush(SIZE_MAX);
    srv_read(65536);
    cl_flush(SIZE_MAX);
    cl_read(65536);
    run_loop(1);
    stalled = moved() == before ? stalled + 1 : 0;
    if (stalled > 200) usleep(1000); /* TCP's own timers (delayed ACKs, zero-window probes) get time */
    if (turns < 10) continue;
    if (stalled > 100 && S->handshake_calls == 0) srv_fin(); /* a handshake that cannot end (the server broke) */
    if (stalled > 100 && S->handshake_ok && !S->attached && S->conn) lp_conn_close(S->conn, LP_END_SHUTDOWN);
    /* Nothing more to send: the client leaves first, or the server, as the input chose. */
    int idle = S->srv.cipher.n == 0 && S->cl_pending.n == 0;
    if (idle && S->attached && S->server_first && !S->srv.broken && !(SSL_get_shutdown(S->srv.ssl) & SSL_SENT_SHUTDOWN)) srv_close_notify();
    if (idle && S->attached && !S->server_first) cl_fin();
    if (idle && S->detached && !S->server_first && S->conn) lp_conn_end(S->conn); /* the caller is done with the upstream */
    /* Each peer answers the other's end with its own. */
    if (S->cl_eof) cl_fin();
    if ((S->srv.eof || S->srv.got_close || S->srv.broken || (S->server_first && S->attached)) && !S->srv.shut) {
      if (!S->srv.broken && !(SSL_get_shutdown(S->srv.ssl) & SSL_SENT_SHUTDOWN)) srv_close_notify();
      srv_collect();
      if (S->srv.cipher.n == 0 || S->srv.broken) srv_fin();
    }
  }
  if (verbose) fprintf(stderr, "drain: %d turns, %zu bytes moved\n", turns, moved());
  if (S->conn && !S->faults && !S->srv.broken) fail("the connection did not end: nothing moved for %d loop turns (%d in all)", STALLED, turns);
  if (S->conn) {
    phase = "both peers gone";
    srv_close(0);
    cl_close(0);
    for (int i = 0; i < 100 && S->conn; i++) run_loop(1);
    if (S->conn) fail("the connection did not end after both peers closed their sockets (100 loop turns)");
  }
  if (S->ends != 1) fail("%d end callbacks", S->ends);
  /* What the peers still can read. */
  for (size_t got = 1; got > 0;) {
    got = S->srv.got.n + S->cl_got.n;
    srv_read(65536);
    cl_read(65536);
    got = S->srv.got.n + S->cl_got.n - got;
  }
}


/* Where the first message boundary at or after `at` is, and the type of the message before it. */
static int boundary_at(const bytes_t *stream, size_t at, int *last_type) {
  size_t i = 0;
  *last_type = -1;
  while (i < at) {
    if (at - i < 5) return 0;
    uint32_t length = ((uint32_t)stream->d[i + 1] << 24) | ((uint32_t)stream->d[i + 2] << 16) | ((uint32_t)stream->d[i + 3] << 8) | stream->d[i + 4];
    if (length < 4 || length > INT32_MAX) return 0;
    *last_type = stream->d[i];
    i += 1 + (size_t)length;
  }
  return i == at;
}

static void verify_session(void) {
  phase = "checks";
  if (verbose)
    fprintf(stderr, "session: handshake %d ok %d resumed %d attached %d pooled %d detached %d [%g, %g] end %s [%g, %g] server got %zu of %zu, client got %zu of %zu, farewells %d, abandoned %d, faults %d, server broken %d\n",
            S->handshake_calls, S->handshake_ok, S->resumed, S->attached, S->pooled, S->detached, S->detach_up, S->detach_cl, S->ends ? LP_END_NAMES[S->end] : "-", S->end_up, S->end_cl, S->srv.got.n, S->up_expected.n + (S->detached ? 0 : S->cl_sent.n),
            S->cl_got.n, S->cl_expected.n, S->farewells, S->abandons, S->faults, S->srv.broken);
  int clean = !S->faults && !S->srv.broken;
  if (clean && S->handshake_calls == 0) fail("the connection ended without a handshake callback");
  if (S->wrong_host && S->handshake_ok) fail("verify-full accepted a certificate for another name");
  if (clean && !S->wrong_host && !S->handshake_ok) fail("the handshake failed");
  if (clean && S->resumable && !S->wrong_host && !S->resumed) fail("the session of the first connection was not resumed");
  /* Descriptors: every one relay.c took is closed. */
  if (fd_open(S->up_fd)) fail("the upstream descriptor %d is still open", S->up_fd);
  if (S->relay_fd >= 0 && fd_open(S->relay_fd)) fail("the client descriptor %d is still open", S->relay_fd);
  /* Counters: what the end callback (for a client that was let go, `detached`) says is what the Float64Array says. */
  double to_up = S->detached ? S->detach_up : S->end_up, to_cl = S->detached ? S->detach_cl : S->end_cl;
  if (S->attached && (S->counters[0] != to_up || S->counters[1] != to_cl))
    fail("counters [%g, %g] but %s says [%g, %g]", S->counters[0], S->counters[1], S->detached ? "detached" : "end", to_up, to_cl);
  if (S->detached && (S->end_up != 0 || S->end_cl != 0)) fail("end says [%g, %g], with no client since the detach", S->end_up, S->end_cl);
  /* The server got a prefix of what went upstream (checked as it read), and the login's reader of the server's plaintext. */
  S->srv_checked = 0; /* all of it again: up_expected may have grown since a byte was checked */
  check_upstream();
  check_prefix("login reader vs server plaintext", &S->login_got, S->login_got.n, &S->srv.sent);
  if (!S->attached) {
    if (S->cl_got.n > 0) fail("the client got %zu bytes without a relay", S->cl_got.n);
    return;
  }
  if (to_cl > (double)S->cl_expected.n) fail("to_client %g is more than the %zu bytes the relay was given", to_cl, S->cl_expected.n);
  /* The client: a prefix of its stream, then at most the farewell, which comes between two messages after anything but an ErrorResponse. */
  size_t plain = S->cl_got.n;
  if (S->farewells) {
    size_t at = S->farewell_at;
    if (at > S->cl_expected.n) fail("farewell after %zu bytes of %zu", at, S->cl_expected.n);
    int last;
    if (!boundary_at(&S->cl_expected, at, &last)) fail("farewell after %zu bytes: not between two messages", at);
    if (last == 'E') fail("farewell after an ErrorResponse");
    if (plain > at) {
      size_t tail = plain - at;
      if (tail > sizeof FAREWELL || memcmp(S->cl_got.d + at, FAREWELL, tail) != 0) fail("the client got %zu bytes after the farewell's place (%zu) that are not the farewell", tail, at);
      plain = at;
    }
  }
  check_prefix("client bytes vs what the relay was given for it", &S->cl_got, plain, &S->cl_expected);
  if ((double)plain > to_cl) fail("the client got %zu bytes, to_client says %g", plain, to_cl);
  /* After a detach, up_expected holds no more of the client's stream than to_upstream: the prefix check covered it. */
  size_t relayed_up = S->srv.got.n > S->login_written ? S->srv.got.n - S->login_written : 0;
  if (!S->detached && (double)relayed_up > to_up) fail("the server got %zu bytes from the relay, to_upstream says %g", relayed_up, to_up);
  if (to_up > (double)(S->first_up.n + S->cl_sent.n)) fail("to_upstream %g is more than the client sent", to_up);
  if (S->faults || S->srv.broken) return;
  /* Nothing went wrong: everything arrived; a pooled relay passes the client's stream on up to its Terminate. */
  bytes_t stream = { 0 };
  client_stream(&stream);
  size_t relayable = S->pooled ? terminate_at(stream.d, stream.n) : stream.n;
  bytes_free(&stream);
  if (S->detached) {
    if (to_up != (double)relayable) fail("clean run: the relay passed on %g bytes of the client's, not the %zu before its Terminate or end", to_up, relayable);
    if (S->srv.got.n != S->up_expected.n) fail("clean run: the server got %zu of %zu bytes", S->srv.got.n, S->up_expected.n);
    if (S->after_got.n != S->srv.sent.n - S->after_from) fail("clean run: after the detach the reader got %zu of the server's %zu bytes", S->after_got.n, S->srv.sent.n - S->after_from);
    return; /* the client left: what was queued for it may have been dropped */
  }
  if (S->srv.got.n != S->login_written + relayable) fail("clean run: the server got %zu of %zu bytes", S->srv.got.n, S->login_written + relayable);
  if (plain != S->cl_expected.n) fail("clean run: the client got %zu of %zu bytes", plain, S->cl_expected.n);
  if (to_cl != (double)S->cl_expected.n || to_up != (double)relayed_up) fail("clean run: counters [%g, %g], bytes moved [%zu, %zu]", to_up, to_cl, relayed_up, S->cl_expected.n);
  if (S->farewells && S->cl_got.n != S->farewell_at + sizeof FAREWELL) fail("clean run: the farewell did not arrive whole");
}


static void run_session(lp_ctx *ctx, unsigned config, unsigned sockets, int resumable) {
  session_t s;
  memset(&s, 0, sizeof s);
  S = &s;
  s.react_in_callbacks = (config & 0x10) != 0;
  s.server_first = config & 0x01;
  s.sockets = sockets;
  s.pooled = (sockets & 4) != 0;
  s.verifying = ((config >> 6) & 3) != 0;
  s.wrong_host = ((config >> 6) & 3) == 3;
  s.resumable = resumable;
  s.relay_fd = s.up_fd = s.cl_fd = s.cl_relay_end = -1;
  if (uv_loop_init(&s.loop) != 0) fail("uv_loop_init");
  int up[2], cl[2];
  connected_pair((sockets & 1) != 0, up);
  connected_pair((sockets & 2) != 0, cl);
  s.up_fd = up[0];
  s.cl_relay_end = cl[0];
  s.cl_fd = cl[1];
  set_nonblocking(up[1]);
  set_nonblocking(s.cl_fd);
  if (config & 0x20) { /* backpressure: the sockets take little at a time (not TCP's: there the
                          loopback's 64 KiB segments then wait for the persist timer, 200 ms and more) */
    if (!(sockets & 1)) small_buffers(up[0], 4096);
    if (!(sockets & 2)) {
      small_buffers(cl[0], 4096);
      small_buffers(cl[1], 4096);
    }
  }
  server_init(&s.srv, (config & 0x04) ? server_ctx_tls12 : server_ctx, up[1]);

  phase = "connect";
  static const char *const hosts[] = { NULL, "localhost", "127.0.0.1", "wrong.invalid" };
  const char *host = hosts[(config >> 6) & 3];
  const char *error = NULL;
  lp_conn *c = lp_conn_connect(&s.loop, ctx, up[0], (config & 0x08) ? "localhost" : NULL, host, &callbacks, &s, &error);
  if (!c) fail("lp_conn_connect: %s", error ? error : "?");
  if (!s.ends) s.conn = c;
  phase = "script";
  while (in_left > 0) step();
  drain();
  verify_session();

  server_free(&s.srv);
  if (s.cl_fd >= 0) close(s.cl_fd);
  if (s.cl_relay_end >= 0) close(s.cl_relay_end);
  if (uv_loop_close(&s.loop) != 0) fail("the loop still holds handles after the end");
  bytes_free(&s.up_expected);
  bytes_free(&s.cl_sent);
  bytes_free(&s.login_got);
  bytes_free(&s.cl_expected);
  bytes_free(&s.cl_pending);
  bytes_free(&s.cl_got);
  bytes_free(&s.after_got);
  bytes_free(&s.first_up);
  S = NULL;
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  verbose = getenv("FUZZ_VERBOSE") != NULL;
  signal(SIGPIPE, SIG_IGN); /* as in Node.js: OpenSSL writes the upstream socket with write() */
  make_server();
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  in_data = data;
  in_left = size;
  unsigned config = in_u8();
  unsigned sockets = in_u8(); /* bit 0: the upstream over TCP, bit 1: the client over TCP, bit 2: a pooled relay */
  const char *error = NULL;
  int verify = ((config >> 6) & 3) != 0;
  lp_ctx *ctx = lp_ctx_new(verify, 0, ca_pem, ca_len, &error);
  if (!ctx) fail("lp_ctx_new: %s", error);
  if (config & 0x02) { /* a first connection with no script leaves a session to resume */
    size_t keep = in_left;
    in_left = 0;
    run_session(ctx, config & ~0x10u, sockets, 0);
    in_left = keep;
  }
  run_session(ctx, config, sockets, (config & 0x02) != 0);
  lp_ctx_release(ctx);
  return 0;
}
