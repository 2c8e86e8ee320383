/*
 * The upstream connection and the relay (see relay.h). Everything runs on one libuv loop
 * thread; nothing here blocks.
 *
 * OpenSSL on a non-blocking socket: SSL_read and SSL_write return want-read or want-write, and
 * the poller then waits on exactly that direction; a write retried after want-write passes the
 * same bytes again (from the head of `up.out`, which only grows until written:
 * SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER allows its memory to move). SSL_read may hold plaintext
 * that no poll event will announce (a record larger than the read, or several records read at
 * once), so every place that lifts backpressure reads the upstream again at once.
 *
 * OpenSSL's error queue is per thread and shared with Node.js's own TLS: it is cleared before
 * every call that may fail and after every failure is read, so no error of ours reaches Node.
 */
#include "relay.h"
#include "buffer.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define READ_SIZE 65536
/* Buffers read from the upstream per event at most (1 MiB): a server faster than the relay must not hold the loop. */
#define READS_PER_EVENT 16
/* Plaintext below this, with nothing buffered in OpenSSL, ends a read (see up_read). */
#define SMALL_READ 16384
#define LINGER_MS 5000
/* RFC 8446 section 5.5: AES-GCM keys must change well before 2^24.5 records; we update at 2^23. */
#define KEY_UPDATE_RECORDS (1u << 23)

const char *const LP_END_NAMES[] = { "", "client_closed", "upstream_closed", "client_error", "upstream_error", "shutdown", "idle_timeout" };

enum state { S_HANDSHAKE, S_LOGIN, S_RELAY };


/* Follows the message boundaries of the upstream's stream, as src/wire/message-boundaries.ts does. */
typedef struct {
  uint32_t remaining;
  unsigned char header[5];
  int header_have;
  int current_type, last_type;
  int last_status; /* the status byte of the last ReadyForQuery */
  int broken;
} boundaries_t;

/*
 * A socket's poll handle and descriptor, allocated apart from the connection: a pooled
 * connection lets its client's go and attaches another's while the first is still closing.
 */
typedef struct {
  uv_poll_t handle; /* first: the handle's address is the box's */
  int fd;
  lp_conn *counted; /* the connection that waits for this close, or NULL */
} box_t;

typedef struct {
  int fd;
  box_t *box;      /* NULL: no socket on this side (yet, or any more) */
  int polling;     /* events asked of libuv now */
  int read_done;   /* EOF or error seen on read */
  int write_shut;  /* our FIN (and close_notify) sent, or the side is beyond writing */
  int want_shut;   /* send FIN once `out` is empty */
  buf_t out;
} side_t;

struct lp_ctx {
  SSL_CTX *ssl;
  SSL_SESSION *session; /* the newest session offered by a verified handshake, to resume */
  int refs;
};

struct lp_conn {
  uv_loop_t *loop;
  lp_ctx *ctx;
  SSL *ssl;
  const lp_callbacks *cb;
  void *user;
  enum state state;
  side_t up, cl;         /* up.out: plaintext for SSL_write; cl.out: plaintext for the client */
  int handshake_wants;   /* UV_READABLE or UV_WRITABLE */
  int write_wants_read;  /* SSL_write said want-read */
  int read_wants_write;  /* SSL_read said want-write */
  int shutdown_pending;  /* close_notify to send once the socket takes it */
  int tls_broken;        /* a fatal TLS or socket error: no close_notify at the end */
  int paused;            /* before the relay: the reader asked for no more data */
  lp_sink sink;          /* before the relay: where plaintext goes instead of cb->data (a lent connection) */
  const lp_callbacks *rcb; /* the relay's abandoned, farewell, detached: `cb`, or hooks (lp_conn_hooks; their end comes first) */
  void *ruser;
  void *sink_user;
  int want_drain;        /* before the relay: the writer waits for up.out to empty */
  boundaries_t messages; /* the upstream's, as the client gets them */
  boundaries_t client_messages; /* the client's, for a pooled relay: where its Terminate is */
  int pooled;            /* the upstream outlives the client */
  int client_terminated; /* the client's last bytes were a Terminate */
  int upstream_idle;     /* the upstream's last message was ReadyForQuery */
  enum lp_end end;
  double to_upstream, to_client;
  double *counters;
  uint64_t last_activity;
  uint32_t records;      /* records sealed since the last key update (an upper bound) */
  uv_timer_t linger;
  int linger_init;
  int closing;
  int open_handles;
};

static unsigned char scratch[READ_SIZE];

/* ---------- message boundaries ---------- */

/*
 * Follows the messages in `chunk`. With `stop` >= 0, stops before a message of that type and
 * returns its offset; otherwise returns n.
 */
static size_t boundaries_scan(boundaries_t *b, const unsigned char *chunk, size_t n, int stop) {
  size_t i = 0;
  while (i < n && !b->broken) {
    if (b->remaining > 0) {
      size_t take = n - i < b->remaining ? n - i : b->remaining;
      if (b->current_type == 'Z' && b->remaining == 1) b->last_status = chunk[i];
      b->remaining -= (uint32_t)take;
      i += take;
      if (b->remaining == 0) b->last_type = b->current_type;
      continue;
    }
    if (b->header_have == 0 && stop >= 0 && chunk[i] == stop) return i;
    const unsigned char *h;
    if (b->header_have == 0 && n - i >= 5) {
      h = chunk + i;
      i += 5;
    } else {
      size_t want = (size_t)(5 - b->header_have);
      size_t take = want < n - i ? want : n - i;
      memcpy(b->header + b->header_have, chunk + i, take);
      b->header_have += (int)take;
      i += take;
      if (b->header_have < 5) return n;
      b->header_have = 0;
      h = b->header;
    }
    uint32_t length = ((uint32_t)h[1] << 24) | ((uint32_t)h[2] << 16) | ((uint32_t)h[3] << 8) | h[4];
    if (length < 4 || length > INT32_MAX) {
      b->broken = 1;
      return n;
    }
    b->current_type = h[0];
    b->remaining = length - 4;
    if (b->remaining == 0) b->last_type = h[0];
  }
  return n;
}

static void boundaries_observe(boundaries_t *b, const unsigned char *chunk, size_t n) { boundaries_scan(b, chunk, n, -1); }

static void boundaries_reset(boundaries_t *b) {
  memset(b, 0, sizeof *b);
  b->current_type = b->last_type = b->last_status = -1;
}

static int at_boundary(const boundaries_t *b) { return !b->broken && b->remaining == 0 && b->header_have == 0; }

/* ---------- errors ---------- */

/* "read ECONNRESET", as Node.js words a socket error. */
static const char *errno_text(const char *op, int code) {
  static char text[64];
  snprintf(text, sizeof text, "%s %s", op, uv_err_name(-code));
  return text;
}

static const char *socket_error(int fd, const char *op) {
  int code = 0;
  socklen_t length = sizeof code;
  if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &code, &length) != 0 || code == 0) code = ECONNRESET;
  return errno_text(op, code);
}

/*
 * Why an SSL call failed, in words; NULL for an orderly end (close_notify, or EOF without it:
 * Postgres's messages carry their own lengths, so a truncation cannot pass unnoticed).
 * Clears the error queue.
 */
static const char *tls_failure(lp_conn *c, int ret, const char *op) {
  static char text[160];
  int code = SSL_get_error(c->ssl, ret);
  int saved = errno;
  unsigned long e = ERR_peek_last_error();
  const char *result = NULL;
  if (code == SSL_ERROR_ZERO_RETURN) {
    result = NULL;
  } else if (code == SSL_ERROR_SYSCALL && e == 0) {
    result = saved == 0 || ret == 0 ? NULL : errno_text(op, saved);
  } else {
    const char *reason = e ? ERR_reason_error_string(e) : NULL;
    snprintf(text, sizeof text, "TLS %s failed: %s", op, reason ? reason : "unknown error");
    result = text;
  }
  if (result) c->tls_broken = 1;
  ERR_clear_error();
  return result;
}

/* ---------- the connection's life ---------- */

static void update_polls(lp_conn *c);
static void teardown(lp_conn *c, enum lp_end end);
static void up_read(lp_conn *c, int force);
static void up_write(lp_conn *c);

static void touch(lp_conn *c) { c->last_activity = uv_now(c->loop); }

/* Before the relay: plaintext, a drained queue (n == 0) or the end, to the sink or the caller. */
static void deliver(lp_conn *c, const unsigned char *data, size_t n, const char *error) {
  if (c->sink) c->sink(c, c->sink_user, data, n, error);
  else c->cb->data(c, c->user, data, n, error);
}

/*
 * The first end decides how the session ended; after a Terminate the server closes first. A
 * relay ended while a query runs, by anything but the upstream's own end (the client left, the
 * caller closed or detached it), leaves that query to the caller to cancel: `abandoned` is
 * called here and nowhere else, so once.
 */
static void decide(lp_conn *c, enum lp_end end) {
  if (c->end != LP_END_NONE) return;
  c->end = end == LP_END_UPSTREAM_CLOSED && c->client_terminated ? LP_END_CLIENT_CLOSED : end;
  if (c->state == S_RELAY && !c->up.read_done && !c->client_terminated && !c->upstream_idle) c->rcb->abandoned(c, c->ruser);
}

static void conn_handle_closed(lp_conn *c) {
  if (--c->open_handles > 0) return;
  if (c->ssl) SSL_free(c->ssl);
  buf_free(&c->up.out);
  buf_free(&c->cl.out);
  enum lp_end end = c->end == LP_END_NONE ? LP_END_SHUTDOWN : c->end;
  if (c->rcb != c->cb) c->rcb->end(c, c->ruser, end, c->to_upstream, c->to_client);
  c->cb->end(c, c->user, end, c->to_upstream, c->to_client);
  lp_ctx_release(c->ctx);
  free(c);
}

static void on_timer_closed(uv_handle_t *handle) { conn_handle_closed(uv_handle_get_data(handle)); }

static void box_closed(uv_handle_t *handle) {
  box_t *box = (box_t *)handle;
  lp_conn *c = box->counted;
  close(box->fd);
  free(box);
  if (c) conn_handle_closed(c);
}

/* Stops polling the side and closes its socket (once libuv has let go of it). */
static void box_close(side_t *side, lp_conn *counted) {
  box_t *box = side->box;
  if (!box) return;
  box->counted = counted;
  side->box = NULL;
  side->fd = -1;
  side->polling = 0;
  uv_close((uv_handle_t *)&box->handle, box_closed);
}

static int box_open(lp_conn *c, side_t *side, int fd) {
  box_t *box = calloc(1, sizeof *box);
  if (!box) return -1;
  if (uv_poll_init_socket(c->loop, &box->handle, fd) != 0) {
    free(box);
    return -1;
  }
  box->fd = fd;
  uv_handle_set_data((uv_handle_t *)&box->handle, c);
  side->box = box;
  side->fd = fd;
  side->polling = 0;
  return 0;
}

static void teardown(lp_conn *c, enum lp_end end) {
  if (c->closing) return;
  c->closing = 1; /* first: decide() may call into JavaScript, which may ask to close again */
  if (c->sink) {
    /* Closed while lent (lp_conn_close): the borrower hears of it, or it would keep a freed connection. */
    lp_sink sink = c->sink;
    c->sink = NULL;
    sink(c, c->sink_user, NULL, 0, "the connection was closed");
  }
  decide(c, end);
  if (c->ssl && c->state != S_HANDSHAKE && !c->tls_broken && !(SSL_get_shutdown(c->ssl) & SSL_SENT_SHUTDOWN)) {
    /* Best effort, before the socket closes: a close_notify, so the server knows the end was ours. */
    ERR_clear_error();
    SSL_shutdown(c->ssl);
    ERR_clear_error();
  }
  c->open_handles = 1 + (c->cl.box != NULL) + c->linger_init;
  box_close(&c->up, c);
  box_close(&c->cl, c);
  if (c->linger_init) uv_close((uv_handle_t *)&c->linger, on_timer_closed);
}

static void linger_cb(uv_timer_t *timer) {
  lp_conn *c = uv_handle_get_data((uv_handle_t *)timer);
  teardown(c, LP_END_SHUTDOWN);
}

/* Both directions are over and nothing waits to be written: the session is. */
static int maybe_done(lp_conn *c) {
  if (c->closing) return 1;
  if (!c->up.read_done || !c->cl.read_done || pending(&c->up.out) > 0 || pending(&c->cl.out) > 0 || c->shutdown_pending) return 0;
  teardown(c, LP_END_SHUTDOWN);
  return 1;
}

/* One side has ended: the other gets LINGER_MS to finish (its FIN, what is queued for it). */
static void finish(lp_conn *c) {
  if (maybe_done(c) || c->linger_init) return;
  uv_timer_init(c->loop, &c->linger);
  uv_handle_set_data((uv_handle_t *)&c->linger, c);
  c->linger_init = 1;
  uv_timer_start(&c->linger, linger_cb, LINGER_MS, 0);
}

/* ---------- the upstream (TLS) ---------- */

/* Our close_notify, then FIN. */
static void up_shutdown_write(lp_conn *c) {
  if (c->up.write_shut) return;
  if (!c->tls_broken) {
    ERR_clear_error();
    int r = SSL_shutdown(c->ssl);
    if (r < 0) {
      int code = SSL_get_error(c->ssl, r);
      ERR_clear_error();
      if (code == SSL_ERROR_WANT_WRITE) {
        c->shutdown_pending = 1;
        return;
      }
    }
  }
  c->shutdown_pending = 0;
  c->up.write_shut = 1;
  shutdown(c->up.fd, SHUT_WR);
  /* Nothing may follow our close_notify, yet OpenSSL answers a TLS 1.3 KeyUpdate that asks for one
     from inside SSL_read, and on the shut socket that write (EPIPE) would fail the read and lose
     what the server still sends. Its writes go nowhere from now on (SSL_set_fd gave the socket BIO
     one reference for reading and one for writing: this drops the second). */
  BIO *sink = BIO_new(BIO_s_null());
  if (sink) SSL_set0_wbio(c->ssl, sink);
}

static void up_failed(lp_conn *c, const char *reason);

/* Writes what `up.out` holds; stops at want-read or want-write. */
static void up_write(lp_conn *c) {
  c->write_wants_read = 0;
  while (pending(&c->up.out) > 0 && !c->up.write_shut) {
    size_t n = pending(&c->up.out);
    if (n > (1u << 30)) n = 1u << 30;
    ERR_clear_error();
    int w = SSL_write(c->ssl, c->up.out.data + c->up.out.off, (int)n);
    if (w > 0) {
      c->records += (uint32_t)((size_t)w / 16384 + 1);
      buf_consumed(&c->up.out, (size_t)w);
      continue;
    }
    int code = SSL_get_error(c->ssl, w);
    if (code == SSL_ERROR_WANT_WRITE) {
      ERR_clear_error();
      return;
    }
    if (code == SSL_ERROR_WANT_READ) {
      ERR_clear_error();
      c->write_wants_read = 1;
      return;
    }
    const char *why = tls_failure(c, w, "write");
    up_failed(c, why ? why : "write EPIPE");
    return;
  }
  if (c->records >= KEY_UPDATE_RECORDS && !c->up.write_shut) {
    /* OpenSSL sends it before our next record. */
    ERR_clear_error();
    SSL_key_update(c->ssl, SSL_KEY_UPDATE_NOT_REQUESTED);
    ERR_clear_error();
    c->records = 0;
  }
  if (c->shutdown_pending || (c->up.want_shut && pending(&c->up.out) == 0)) up_shutdown_write(c);
  if (c->want_drain && c->state == S_LOGIN && pending(&c->up.out) == 0) {
    c->want_drain = 0;
    deliver(c, (const unsigned char *)"", 0, NULL); /* empty data: the queue drained */
  }
}

/* Plaintext for the upstream: written now when nothing waits before it, else queued. */
static int up_send(lp_conn *c, const unsigned char *data, size_t n) {
  if (c->up.write_shut) return 0; /* the upstream went away: what the client sends is dropped */
  if (buf_append(&c->up.out, data, n) != 0) return -1;
  if (pending(&c->up.out) == n) up_write(c);
  return 0;
}

static void cl_shutdown_write(lp_conn *c) {
  if (c->cl.write_shut) return;
  c->cl.write_shut = 1;
  shutdown(c->cl.fd, SHUT_WR);
}

/*
 * The upstream ended (reason NULL: it closed; else why). Before the relay the login's reader
 * hears of it and the connection closes. In the relay, the client gets what was queued for it,
 * and, when the upstream went first between two messages without saying why, an ErrorResponse
 * 08006 naming it, as libpq reports a lost server.
 */
static void up_ended(lp_conn *c, const char *reason) {
  if (c->up.read_done) return;
  c->up.read_done = 1;
  if (c->state != S_RELAY) {
    deliver(c, NULL, 0, reason);
    teardown(c, reason ? LP_END_UPSTREAM_ERROR : LP_END_UPSTREAM_CLOSED);
    return;
  }
  int first = c->end == LP_END_NONE;
  decide(c, reason ? LP_END_UPSTREAM_ERROR : LP_END_UPSTREAM_CLOSED);
  if (reason) {
    c->up.write_shut = 1;
    c->shutdown_pending = 0;
    buf_free(&c->up.out);
  }
  if (first && !c->client_terminated && at_boundary(&c->messages) && c->messages.last_type != 'E' && !c->cl.write_shut) {
    unsigned char farewell[1024];
    size_t n = c->rcb->farewell(c, c->ruser, reason, farewell, sizeof farewell);
    if (n > 0 && n <= sizeof farewell) buf_append(&c->cl.out, farewell, n);
  }
  c->cl.want_shut = 1;
  if (pending(&c->cl.out) == 0) cl_shutdown_write(c);
  finish(c);
}

static void up_failed(lp_conn *c, const char *reason) {
  c->tls_broken = 1;
  c->up.write_shut = 1;
  c->shutdown_pending = 0;
  buf_free(&c->up.out);
  if (c->state == S_RELAY) {
    up_ended(c, reason);
  } else {
    deliver(c, NULL, 0, reason);
    teardown(c, LP_END_UPSTREAM_ERROR);
  }
}

static int send_all(lp_conn *c, const unsigned char *data, size_t n, size_t *sent);
static void client_ended(lp_conn *c, int error);

/* Plaintext from the upstream for the client: counted, followed, sent now or queued. */
static void to_client(lp_conn *c, const unsigned char *data, size_t n) {
  if (c->cl.write_shut) return;
  c->to_client += (double)n;
  if (c->counters) c->counters[1] += (double)n;
  boundaries_observe(&c->messages, data, n);
  c->upstream_idle = at_boundary(&c->messages) && c->messages.last_type == 'Z';
  size_t sent = 0;
  if (pending(&c->cl.out) == 0 && send_all(c, data, n, &sent) != 0) {
    client_ended(c, 1);
    return;
  }
  if (sent < n && buf_append(&c->cl.out, data + sent, n - sent) != 0) client_ended(c, 1);
}

static int may_read_up(const lp_conn *c) {
  if (c->up.read_done || c->closing) return 0;
  if (c->state == S_LOGIN) return !c->paused;
  if (c->state != S_RELAY) return 0;
  /* A client beyond writing: the upstream is read to its end all the same, its bytes dropped. */
  return pending(&c->cl.out) == 0 || c->cl.write_shut;
}

/*
 * Reads the upstream while it has plaintext and the reader takes it: records are gathered into
 * one buffer before they go on, one send for many records. With `force` (the socket is in
 * error), backpressure is set aside: what the peer sent before the error is read out first.
 */
static void up_read(lp_conn *c, int force) {
  c->read_wants_write = 0;
  for (int reads = 0; !c->up.read_done && !c->closing && (force || may_read_up(c)); reads++) {
    /* The rest is on the socket, whose poll reports it on the loop's next turn, after every other
       connection and timer (else a client gone with a COPY out still coming, its bytes dropped,
       would keep the loop here, and the cancel that stops that COPY could not be sent). */
    size_t want = READ_SIZE;
    if (!force && reads >= READS_PER_EVENT) {
      /* Enough for this turn, but what OpenSSL holds goes too: no poll would report it. */
      if (!SSL_has_pending(c->ssl)) return;
      want = SSL_pending(c->ssl) > 0 ? (size_t)SSL_pending(c->ssl) : 1;
    }
    size_t have = 0;
    int r = 0;
    /* A small answer with nothing more buffered: the poll says when more comes, instead of a read
       that finds nothing (a system call per query). Large ones read on to READ_SIZE. */
    int settled = 0;
    while (have < want) {
      ERR_clear_error();
      r = SSL_read(c->ssl, scratch + have, (int)(want - have));
      if (r <= 0) break;
      have += (size_t)r;
      if (!force && have < SMALL_READ && !SSL_has_pending(c->ssl)) {
        settled = 1;
        break;
      }
    }
    int code = r > 0 ? SSL_ERROR_NONE : SSL_get_error(c->ssl, r);
    const char *why = NULL;
    if (code != SSL_ERROR_NONE && code != SSL_ERROR_WANT_READ && code != SSL_ERROR_WANT_WRITE) why = tls_failure(c, r, "read");
    else ERR_clear_error();
    if (have > 0) {
      touch(c);
      if (c->state == S_RELAY) to_client(c, scratch, have);
      else deliver(c, scratch, have, NULL);
      if (c->closing) return;
    }
    if (settled) return;
    if (code == SSL_ERROR_NONE) continue;
    if (code == SSL_ERROR_WANT_READ) return;
    if (code == SSL_ERROR_WANT_WRITE) {
      c->read_wants_write = 1;
      return;
    }
    up_ended(c, why);
    return;
  }
}

static void handshake(lp_conn *c) {
  ERR_clear_error();
  int r = SSL_do_handshake(c->ssl);
  if (r == 1) {
    ERR_clear_error();
    c->state = S_LOGIN;
    c->handshake_wants = 0;
    touch(c);
    c->cb->handshake(c, c->user, NULL, X509_V_OK);
    return;
  }
  int code = SSL_get_error(c->ssl, r);
  if (code == SSL_ERROR_WANT_READ || code == SSL_ERROR_WANT_WRITE) {
    ERR_clear_error();
    c->handshake_wants = code == SSL_ERROR_WANT_READ ? UV_READABLE : UV_WRITABLE;
    return;
  }
  /* Without verification (SSLMode=require) OpenSSL still records what it found wrong with the
     certificate, but that is never why a handshake failed. */
  long verify = SSL_get_verify_mode(c->ssl) & SSL_VERIFY_PEER ? SSL_get_verify_result(c->ssl) : X509_V_OK;
  const char *why = tls_failure(c, r, "handshake");
  c->tls_broken = 1;
  if (verify != X509_V_OK) why = X509_verify_cert_error_string(verify);
  else if (!why) why = "the server closed the connection during the TLS handshake";
  c->cb->handshake(c, c->user, why, verify);
  teardown(c, LP_END_UPSTREAM_ERROR);
}

/* ---------- the client (plain) ---------- */

static int send_all(lp_conn *c, const unsigned char *data, size_t n, size_t *sent) {
  *sent = 0;
  while (*sent < n) {
    ssize_t w = send(c->cl.fd, data + *sent, n - *sent, MSG_NOSIGNAL);
    if (w > 0) {
      *sent += (size_t)w;
      continue;
    }
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;
    return -1;
  }
  return 0;
}

static void cl_flush(lp_conn *c) {
  while (pending(&c->cl.out) > 0 && !c->cl.write_shut) {
    size_t sent = 0;
    if (send_all(c, c->cl.out.data + c->cl.out.off, pending(&c->cl.out), &sent) != 0) {
      client_ended(c, 1);
      return;
    }
    if (sent == 0) return;
    buf_consumed(&c->cl.out, sent);
  }
  if (c->cl.want_shut && pending(&c->cl.out) == 0) cl_shutdown_write(c);
}

/*
 * A pooled relay lets the client go and keeps the upstream: the client's socket is closed, the
 * connection is back before the relay (reads go to the caller again), and the caller hears
 * whether it can serve another client as it is. Only while the upstream has not ended: else the
 * connection would wait before the relay for an end that was already read, and only the linger
 * timer would close it.
 */
static void detach(lp_conn *c, enum lp_end end) {
  int reusable = at_boundary(&c->client_messages) && c->upstream_idle && at_boundary(&c->messages) && c->messages.last_type == 'Z' &&
                 !c->up.read_done && !c->up.write_shut && !c->up.want_shut && !c->tls_broken && pending(&c->up.out) == 0;
  decide(c, end);
  if (c->closing) return; /* the caller closed it on hearing of the abandoned query: `end` follows */
  enum lp_end ended = c->end;
  double to_upstream = c->to_upstream, to_client = c->to_client;
  box_close(&c->cl, NULL);
  buf_free(&c->cl.out);
  c->cl.read_done = c->cl.write_shut = c->cl.want_shut = 0;
  c->state = S_LOGIN;
  c->pooled = 0;
  c->paused = 0;
  c->counters = NULL;
  c->end = LP_END_NONE;
  c->to_upstream = c->to_client = 0;
  c->client_terminated = 0;
  boundaries_reset(&c->client_messages);
  const lp_callbacks *rcb = c->rcb;
  void *ruser = c->ruser;
  lp_conn_hooks(c, NULL, NULL);
  rcb->detached(c, ruser, ended, to_upstream, to_client, reusable, c->messages.last_status);
  if (!c->closing) up_read(c, 0); /* what the upstream sent since goes to the caller */
  if (!c->closing) update_polls(c);
}

/* The client ended: what it sent goes on, then our close_notify and FIN to the upstream. */
static void client_ended(lp_conn *c, int error) {
  if (c->state != S_RELAY) return;
  if (c->pooled && !c->up.read_done) {
    detach(c, error ? LP_END_CLIENT_ERROR : LP_END_CLIENT_CLOSED);
    return;
  }
  if (c->cl.read_done && (!error || c->cl.write_shut)) return;
  c->cl.read_done = 1;
  decide(c, error ? LP_END_CLIENT_ERROR : LP_END_CLIENT_CLOSED);
  if (c->closing) return;
  if (error) {
    c->cl.write_shut = 1;
    buf_free(&c->cl.out);
  }
  c->up.want_shut = 1;
  if (pending(&c->up.out) == 0 && !c->up.write_shut) up_shutdown_write(c);
  finish(c);
}

/* What the client sent: counted, checked for a Terminate at its end, passed to the upstream. */
static void from_client(lp_conn *c, const unsigned char *data, size_t n) {
  static const unsigned char terminate[5] = { 'X', 0, 0, 0, 4 };
  if (c->up.write_shut) return;
  /* A pooled relay keeps the upstream: the client's Terminate (and anything after it) stays here. */
  size_t forward = c->pooled ? boundaries_scan(&c->client_messages, data, n, 'X') : n;
  c->to_upstream += (double)forward;
  if (c->counters) c->counters[0] += (double)forward;
  if (forward > 0) {
    c->client_terminated = forward >= 5 && memcmp(data + forward - 5, terminate, 5) == 0;
    c->upstream_idle = 0; /* until its next ReadyForQuery */
    if (up_send(c, data, forward) != 0) {
      up_failed(c, "out of memory");
      return;
    }
  }
  if (forward < n && c->state == S_RELAY && !c->closing) {
    c->client_terminated = 1;
    client_ended(c, 0); /* a detach, unless the upstream has ended */
  }
}

/* One read of the client; with `force` (the socket is in error), "nothing to read" ends it. */
static int cl_read(lp_conn *c, int force) {
  if (c->state != S_RELAY || !c->cl.box) return 0;
  ssize_t n;
  do n = recv(c->cl.fd, scratch, READ_SIZE, 0);
  while (n < 0 && errno == EINTR);
  if (n > 0) {
    touch(c);
    from_client(c, scratch, (size_t)n);
    return !c->closing && c->state == S_RELAY && !c->cl.read_done;
  }
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) && !force) return 0;
  client_ended(c, n != 0);
  return 0;
}

/* ---------- polling ---------- */

static void up_poll_cb(uv_poll_t *handle, int status, int events);
static void cl_poll_cb(uv_poll_t *handle, int status, int events);

static void set_poll(side_t *side, int events, uv_poll_cb cb) {
  if (!side->box || events == side->polling) return;
  side->polling = events;
  if (events) uv_poll_start(&side->box->handle, events, cb);
  else uv_poll_stop(&side->box->handle);
}

/* Reads a side only while the other has nothing queued: backpressure both ways. */
static void update_polls(lp_conn *c) {
  if (c->closing) return;
  int up = 0, cl = 0;
  if (c->state == S_HANDSHAKE) {
    up = c->handshake_wants;
  } else {
    if ((may_read_up(c) && !c->read_wants_write) || c->write_wants_read) up |= UV_READABLE;
    if ((pending(&c->up.out) > 0 && !c->up.write_shut && !c->write_wants_read) || c->read_wants_write || c->shutdown_pending) up |= UV_WRITABLE;
  }
  if (c->state == S_RELAY) {
    /* An upstream beyond writing: the client is read all the same (its bytes dropped), to see it leave. */
    if (!c->cl.read_done && (c->up.write_shut || (pending(&c->up.out) == 0 && !c->up.want_shut))) cl |= UV_READABLE;
    if (pending(&c->cl.out) > 0 && !c->cl.write_shut) cl |= UV_WRITABLE;
  }
  set_poll(&c->up, up, up_poll_cb);
  set_poll(&c->cl, cl, cl_poll_cb);
}

static void up_io(lp_conn *c, int force) {
  if (pending(&c->up.out) > 0 || c->shutdown_pending) up_write(c);
  if (!c->closing) up_read(c, force);
  if (!c->closing && c->write_wants_read == 0 && pending(&c->up.out) > 0) up_write(c);
}

static void up_poll_cb(uv_poll_t *handle, int status, int events) {
  lp_conn *c = uv_handle_get_data((uv_handle_t *)handle);
  (void)events;
  if (c->closing) return;
  if (status < 0) { /* libuv says EBADF for any POLLERR, and has stopped the handle */
    c->up.polling = 0;
    if (c->state == S_HANDSHAKE) {
      handshake(c);
      if (!c->closing && c->state == S_HANDSHAKE) {
        c->tls_broken = 1;
        c->cb->handshake(c, c->user, socket_error(c->up.fd, "connect"), X509_V_OK);
        teardown(c, LP_END_UPSTREAM_ERROR);
      }
    } else {
      up_read(c, c->state == S_RELAY); /* a paused login reader gets nothing, not even what came before the error */
      if (!c->closing && !c->up.read_done) {
        up_failed(c, socket_error(c->up.fd, "read"));
      } else if (!c->closing && !c->up.write_shut) {
        /* The read side was over already: the error ends the write side (else the same interest
           is armed again and epoll reports the error again at once, a busy loop). */
        (void)socket_error(c->up.fd, "write"); /* reads SO_ERROR, which clears it */
        c->tls_broken = 1;
        c->up.write_shut = 1;
        c->shutdown_pending = 0;
        buf_free(&c->up.out);
      }
    }
  } else if (c->state == S_HANDSHAKE) {
    handshake(c);
  } else {
    if (events & UV_READABLE) touch(c);
    up_io(c, 0);
  }
  if (!c->closing && (c->state != S_RELAY || !maybe_done(c))) update_polls(c);
}

static void cl_poll_cb(uv_poll_t *handle, int status, int events) {
  lp_conn *c = uv_handle_get_data((uv_handle_t *)handle);
  if (c->closing) return;
  if (status < 0) {
    c->cl.polling = 0;
    if (!c->cl.read_done) while (cl_read(c, 1)) {}
    if (!c->closing) client_ended(c, 1);
  } else {
    if (events & UV_WRITABLE) {
      touch(c);
      cl_flush(c);
      /* The client took what was queued: OpenSSL may still hold plaintext no poll will announce. */
      if (!c->closing && pending(&c->cl.out) == 0) up_read(c, 0);
    }
    if (!c->closing && (events & (UV_READABLE | UV_DISCONNECT)) && !c->cl.read_done && (pending(&c->up.out) == 0 || c->up.write_shut)) cl_read(c, 0);
    if (!c->closing && pending(&c->up.out) > 0 && !c->write_wants_read) up_write(c);
  }
  if (!c->closing && !maybe_done(c)) update_polls(c);
}

/* ---------- the API ---------- */

static int new_session(SSL *ssl, SSL_SESSION *session) {
  lp_ctx *ctx = SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), 0);
  if (!ctx) return 0;
  if (ctx->session) SSL_SESSION_free(ctx->session);
  ctx->session = session;
  return 1; /* we keep the reference */
}

lp_ctx *lp_ctx_new(int verify, int system_store, const char *ca_pem, size_t ca_len, const char **error) {
  ERR_clear_error();
  lp_ctx *ctx = calloc(1, sizeof *ctx);
  if (!ctx) {
    *error = "out of memory";
    return NULL;
  }
  ctx->refs = 1;
  ctx->ssl = SSL_CTX_new(TLS_client_method());
  if (!ctx->ssl) {
    free(ctx);
    *error = "SSL_CTX_new failed";
    ERR_clear_error();
    return NULL;
  }
  SSL_CTX_set_ex_data(ctx->ssl, 0, ctx);
  SSL_CTX_set_min_proto_version(ctx->ssl, TLS1_2_VERSION);
  SSL_CTX_set_mode(ctx->ssl, SSL_MODE_RELEASE_BUFFERS | SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  /* A record's header and body in one read from the socket, not two (SSL_has_pending then tells what is buffered). */
  SSL_CTX_set_read_ahead(ctx->ssl, 1);
  SSL_CTX_set_options(ctx->ssl, SSL_OP_IGNORE_UNEXPECTED_EOF | SSL_OP_NO_RENEGOTIATION);
  SSL_CTX_set_session_cache_mode(ctx->ssl, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
  SSL_CTX_sess_set_new_cb(ctx->ssl, new_session);
  SSL_CTX_set_verify(ctx->ssl, verify ? SSL_VERIFY_PEER : SSL_VERIFY_NONE, NULL);
  if (verify) {
    int loaded = 0;
    BIO *bio = ca_len > 0 && ca_len <= INT_MAX ? BIO_new_mem_buf(ca_pem, (int)ca_len) : NULL;
    X509_STORE *store = SSL_CTX_get_cert_store(ctx->ssl);
    /* _AUX, as Node.js reads CA files: TRUSTED CERTIFICATE blocks too. */
    for (X509 *cert; bio && (cert = PEM_read_bio_X509_AUX(bio, NULL, NULL, NULL)) != NULL;) {
      if (X509_STORE_add_cert(store, cert) == 1) loaded++;
      X509_free(cert);
    }
    BIO_free(bio);
    ERR_clear_error(); /* the end of the PEM text is reported as an error */
    /* Node.js run with --use-openssl-ca (or built to use it): OpenSSL's own store, as Node's TLS does. */
    if (system_store && SSL_CTX_set_default_verify_paths(ctx->ssl) == 1) loaded++;
    ERR_clear_error();
    if (loaded == 0) {
      lp_ctx_release(ctx);
      *error = "no CA certificate could be read";
      return NULL;
    }
  }
  return ctx;
}

void lp_ctx_release(lp_ctx *ctx) {
  if (!ctx || --ctx->refs > 0) return;
  if (ctx->session) SSL_SESSION_free(ctx->session);
  SSL_CTX_free(ctx->ssl);
  free(ctx);
}

lp_conn *lp_conn_connect(uv_loop_t *loop, lp_ctx *ctx, int fd, const char *sni, const char *host, const lp_callbacks *cb, void *user, const char **error) {
  ERR_clear_error();
  lp_conn *c = calloc(1, sizeof *c);
  if (!c) {
    *error = "out of memory";
    return NULL;
  }
  c->loop = loop;
  c->cb = cb;
  c->user = user;
  lp_conn_hooks(c, NULL, NULL);
  c->up.fd = fd;
  c->cl.fd = -1;
  c->upstream_idle = 1;
  boundaries_reset(&c->messages);
  boundaries_reset(&c->client_messages);
  c->ssl = SSL_new(ctx->ssl);
  int ok = c->ssl != NULL;
  if (ok && sni) ok = SSL_set_tlsext_host_name(c->ssl, sni) == 1;
  if (ok && host) {
    X509_VERIFY_PARAM *param = SSL_get0_param(c->ssl);
    unsigned char address[16];
    /* An address is checked against the certificate's IP entries, a name against its DNS names. */
    if (inet_pton(AF_INET, host, address) == 1 || inet_pton(AF_INET6, host, address) == 1) ok = X509_VERIFY_PARAM_set1_ip_asc(param, host) == 1;
    else ok = SSL_set1_host(c->ssl, host) == 1;
  }
  if (ok) ok = SSL_set_fd(c->ssl, fd) == 1;
  if (ok && ctx->session) {
    /* A copy: OpenSSL makes a TLS 1.3 session object single-use once a connection resumed with it. */
    SSL_SESSION *copy = SSL_SESSION_dup(ctx->session);
    if (copy) {
      ok = SSL_set_session(c->ssl, copy) == 1;
      SSL_SESSION_free(copy);
    }
  }
  if (ok) SSL_set_connect_state(c->ssl);
  int flags = ok ? fcntl(fd, F_GETFL) : -1;
  if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) ok = 0;
  if (ok && box_open(c, &c->up, fd) != 0) ok = 0;
  if (!ok) {
    *error = "could not set up the TLS connection";
    if (c->ssl) SSL_free(c->ssl);
    free(c);
    ERR_clear_error();
    return NULL;
  }
  c->ctx = ctx;
  ctx->refs++;
  touch(c);
  handshake(c); /* sends the ClientHello; every later step comes from the poll */
  if (!c->closing) update_polls(c);
  return c;
}

long lp_conn_write(lp_conn *c, const unsigned char *data, size_t n) {
  if (c->closing || c->state != S_LOGIN || c->up.write_shut || c->up.want_shut) return -1;
  if (up_send(c, data, n) != 0) return -1;
  if (c->closing) return -1;
  update_polls(c);
  c->want_drain = pending(&c->up.out) > 0;
  return (long)pending(&c->up.out);
}

void lp_conn_sink(lp_conn *c, lp_sink sink, void *user) {
  c->sink = sink;
  c->sink_user = user;
  /* A lent connection serves one transaction after another: OpenSSL keeps its record buffers
     instead of freeing them after each read and write (SSL_MODE_RELEASE_BUFFERS is for the
     thousands of idle relays of session mode, not for the few connections of a transaction pool). */
  if (sink && c->ssl) SSL_clear_mode(c->ssl, SSL_MODE_RELEASE_BUFFERS);
}

int lp_conn_lendable(const lp_conn *c) {
  return !c->closing && c->state == S_LOGIN && !c->up.read_done && !c->up.write_shut && !c->up.want_shut && !c->tls_broken;
}

void lp_conn_end(lp_conn *c) {
  if (c->closing || c->state != S_LOGIN || c->up.want_shut) return;
  c->up.want_shut = 1;
  if (pending(&c->up.out) == 0) up_shutdown_write(c);
  if (!c->closing) update_polls(c);
}

void lp_conn_pause(lp_conn *c, int paused) {
  if (c->closing || c->state != S_LOGIN || c->paused == !!paused) return;
  c->paused = !!paused;
  if (!paused) up_read(c, 0); /* OpenSSL may hold plaintext read before the pause */
  if (!c->closing) update_polls(c);
}

int lp_conn_certificate(lp_conn *c, unsigned char *out, int cap) {
  if (c->closing || c->state == S_HANDSHAKE) return -1;
  X509 *cert = SSL_get0_peer_certificate(c->ssl);
  if (!cert) return -1;
  int n = i2d_X509(cert, NULL);
  if (n <= 0) {
    ERR_clear_error();
    return -1;
  }
  if (!out) return n;
  if (n > cap) return -1;
  unsigned char *p = out;
  return i2d_X509(cert, &p);
}

const char *lp_conn_version(lp_conn *c) { return c->ssl ? SSL_get_version(c->ssl) : ""; }

const char *lp_conn_cipher(lp_conn *c) {
  const SSL_CIPHER *cipher = c->ssl ? SSL_get_current_cipher(c->ssl) : NULL;
  return cipher ? SSL_CIPHER_standard_name(cipher) : "";
}

int lp_conn_resumed(lp_conn *c) { return c->ssl ? SSL_session_reused(c->ssl) : 0; }

int lp_conn_relay(lp_conn *c, int client_fd, const unsigned char *to_client_first, size_t to_client_len,
                  const unsigned char *to_upstream_first, size_t to_upstream_len, double *counters, int pooled, const char **error) {
  if (c->closing || c->state != S_LOGIN) {
    *error = "the upstream connection is not logged in";
    return -1;
  }
  int flags = fcntl(client_fd, F_GETFL);
  if (flags < 0 || fcntl(client_fd, F_SETFL, flags | O_NONBLOCK) < 0 || box_open(c, &c->cl, client_fd) != 0) {
    *error = "could not poll the client socket";
    return -1;
  }
  c->state = S_RELAY;
  c->pooled = pooled;
  c->paused = 0;
  c->counters = counters;
  c->upstream_idle = 1;
  /* The caller starts a relay at the upstream's ReadyForQuery, idle (its login's or its reset's,
     which C did not read): a client that leaves before its first query leaves it reusable. */
  boundaries_reset(&c->messages);
  c->messages.last_type = 'Z';
  c->messages.last_status = 'I';
  touch(c);
  /* In the order it happened: the greeting and what the upstream sent after it, then the client's. */
  if (to_client_len > 0) to_client(c, to_client_first, to_client_len);
  /* A client gone already has ended the relay; a pooled one is detached, back before the relay
     (detach() read and polled for the caller), and none of the client's bytes are the upstream's. */
  if (c->closing || c->state != S_RELAY) return 0;
  if (!c->cl.read_done && to_upstream_len > 0) from_client(c, to_upstream_first, to_upstream_len);
  if (!c->closing && c->state == S_RELAY) up_read(c, 0); /* plaintext OpenSSL read while the login's reader was paused */
  if (!c->closing && c->state == S_RELAY && !maybe_done(c)) update_polls(c);
  return 0;
}

void lp_conn_hooks(lp_conn *c, const lp_callbacks *hooks, void *user) {
  c->rcb = hooks ? hooks : c->cb;
  c->ruser = hooks ? user : c->user;
}

void lp_conn_detach(lp_conn *c, enum lp_end end) {
  if (c->closing || c->state != S_RELAY || !c->pooled) return;
  if (c->up.read_done) teardown(c, end); /* the upstream has ended: there is nothing to keep */
  else detach(c, end);
}

void lp_conn_close(lp_conn *c, enum lp_end end) {
  teardown(c, end);
}

void lp_conn_state(lp_conn *c, int *query_running, double *idle_ms) {
  *query_running = c->state == S_RELAY && !c->closing && !c->upstream_idle;
  *idle_ms = (double)(uv_now(c->loop) - c->last_activity);
}
