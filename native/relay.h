/*
 * The upstream connection in C: an OpenSSL `SSL` object on a non-blocking socket, driven by
 * libuv, and the relay between it and a plain client socket.
 *
 * OpenSSL does all of TLS (handshake, certificate checks, records, KeyUpdate, alerts,
 * close_notify, session tickets); this code only moves plaintext. The Postgres login is done by
 * the caller through lp_conn_write() and the `data` callback; lp_conn_relay() then attaches a
 * client socket and moves bytes both ways with backpressure until either side ends. A pooled
 * relay keeps the upstream when the client leaves: the client's Terminate is not passed on, the
 * client socket is closed, and the connection goes back to the caller (`detached`).
 *
 * No N-API here: addon.c binds it to JavaScript, fuzz/harness.c drives it directly.
 */
#ifndef LAKEBASE_PROXY_RELAY_H
#define LAKEBASE_PROXY_RELAY_H

#include <openssl/ssl.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

enum lp_end { LP_END_NONE = 0, LP_END_CLIENT_CLOSED, LP_END_UPSTREAM_CLOSED, LP_END_CLIENT_ERROR, LP_END_UPSTREAM_ERROR, LP_END_SHUTDOWN, LP_END_IDLE };
extern const char *const LP_END_NAMES[];

/* A target's TLS settings and the last session it offered for resumption. */
typedef struct lp_ctx lp_ctx;
typedef struct lp_conn lp_conn;

typedef struct {
  /* The handshake ended: `error` is NULL on success; `verify` is X509_V_OK or why the certificate failed. */
  void (*handshake)(lp_conn *c, void *user, const char *error, long verify);
  /* Before the relay: plaintext from the upstream (n > 0), or its end (data NULL; error NULL for a clean end). */
  void (*data)(lp_conn *c, void *user, const unsigned char *data, size_t n, const char *error);
  /* The relay ended while a query may run upstream (the caller cancels it): the client went away,
     or the caller closed or detached it. At most once a relay; the caller may close here. */
  void (*abandoned)(lp_conn *c, void *user);
  /* The relay: the ErrorResponse a client gets when the upstream goes away between two messages
     (reason NULL: it closed). Writes at most `cap` bytes to `out`; returns the length, 0 for none. */
  size_t (*farewell)(lp_conn *c, void *user, const char *reason, unsigned char *out, size_t cap);
  /* A pooled relay: the client left (Terminate, EOF, an error, or lp_conn_detach) while the
     upstream had not ended (else the relay ends as an unpooled one does), and the connection is
     back before the relay, reading for the caller again. `reusable`: the client left between
     two messages of its own, with the upstream at ReadyForQuery, whose status ('I', 'T' or 'E')
     is `status`. The byte counts are this client's. */
  void (*detached)(lp_conn *c, void *user, enum lp_end end, double to_upstream, double to_client, int reusable, int status);
  /* Last call for this connection: every handle and descriptor is closed, `c` is about to be freed. */
  void (*end)(lp_conn *c, void *user, enum lp_end end, double to_upstream, double to_client);
} lp_callbacks;

/* verify: 0 (SSLMode=require) or 1; ca_pem: the PEM certificates to trust (may hold many);
   system_store: trust OpenSSL's default paths too. NULL on error. */
lp_ctx *lp_ctx_new(int verify, int system_store, const char *ca_pem, size_t ca_len, const char **error);
void lp_ctx_release(lp_ctx *ctx);

/*
 * Starts the TLS handshake on `fd` (a connected TCP socket after the SSLRequest's 'S'; the
 * connection takes it over and closes it). `sni`: the server name to send, or NULL; `host`: the
 * name or address to check the certificate against (verify-full), or NULL. Returns NULL with
 * `error` set when nothing was started (then `fd` is not closed).
 */
lp_conn *lp_conn_connect(uv_loop_t *loop, lp_ctx *ctx, int fd, const char *sni, const char *host, const lp_callbacks *cb, void *user, const char **error);
/* Before the relay: sends plaintext (queued while the socket is full). Returns the bytes still
   queued, -1 when closed; once a queue is written, `data` is called with n == 0 (backpressure). */
long lp_conn_write(lp_conn *c, const unsigned char *data, size_t n);
/* Before the relay: our close_notify and FIN once what is queued is written (a half-close). */
void lp_conn_end(lp_conn *c);
/* Before the relay: stops or resumes delivering data (backpressure of the login's reader). */
void lp_conn_pause(lp_conn *c, int paused);
/* The server certificate, DER, into out (NULL to ask the length); -1 when there is none. */
int lp_conn_certificate(lp_conn *c, unsigned char *out, int cap);
const char *lp_conn_version(lp_conn *c);
const char *lp_conn_cipher(lp_conn *c);
int lp_conn_resumed(lp_conn *c);
/*
 * Attaches a plain client socket (taken over: closed at the end) and relays. `to_client_first`:
 * bytes for the client first (the greeting); `to_upstream_first`: the client's bytes read
 * before. `counters`: [to upstream, to client], added to as bytes move (may be NULL).
 */
int lp_conn_relay(lp_conn *c, int client_fd, const unsigned char *to_client_first, size_t to_client_len,
                  const unsigned char *to_upstream_first, size_t to_upstream_len, double *counters, int pooled, const char **error);
/* The next relay's abandoned, farewell and detached go to `hooks` with `user` instead of the
   connection's callbacks (C code that runs a relay itself: txclient.c's sessions), until it
   detaches; its end goes to `hooks` first, then to the connection's own `end`. NULL: none. */
void lp_conn_hooks(lp_conn *c, const lp_callbacks *hooks, void *user);
/* A pooled relay: lets the client go now (idle timeout) and keeps the upstream; `detached` follows.
   When the upstream has ended already, the connection ends instead (`end` follows). */
void lp_conn_detach(lp_conn *c, enum lp_end end);
/*
 * Before the relay: plaintext, a drained write queue (n == 0) and the end (data NULL) go to
 * `sink` instead of the `data` callback, until lp_conn_sink(c, NULL, NULL). C code lends a
 * logged-in connection this way (txclient.c); lp_conn_write and lp_conn_pause work as before.
 */
typedef void (*lp_sink)(lp_conn *c, void *user, const unsigned char *data, size_t n, const char *error);
void lp_conn_sink(lp_conn *c, lp_sink sink, void *user);
/* Logged in, open both ways, not relaying: it can be lent. */
int lp_conn_lendable(const lp_conn *c);
/* Ends the connection now (shutdown, idle timeout, a failed login): the `end` callback follows. */
void lp_conn_close(lp_conn *c, enum lp_end end);
/* Whether a query runs (the client sent something not yet answered by ReadyForQuery), and ms since the last byte. */
void lp_conn_state(lp_conn *c, int *query_running, double *idle_ms);

#endif
