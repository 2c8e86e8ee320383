/*
 * A listener in C for plain clients (src/proxy/native-listener.ts): it accepts, answers an
 * SSLRequest or GSSENCRequest with 'N', reads the client's first other startup packet and hands
 * the client, with the bytes read, to its caller in one call. The caller decides everything else
 * (the packet's meaning, authentication, the session): C only frames the packet, so that a
 * pooled session can start without Node.js' accept, socket object and asynchronous handshake.
 *
 * Everything runs on one libuv loop thread; nothing blocks. Untrusted input here is the length
 * word and the request code of a startup packet (lp_startup_step, the fuzzer's target).
 */
#ifndef LP_LISTENER_H
#define LP_LISTENER_H

#include <stddef.h>
#include <sys/socket.h>
#include <uv.h>

typedef struct lp_listener lp_listener;

/* How a client reaches the caller. */
enum lp_arrival {
  /* Its first packet other than an encryption request is in `data` (whole, or as far as a bad
     length word: the caller's framing says what is wrong), with any bytes that followed it. */
  LP_ARRIVED_STARTUP = 1,
  /* MaxStartups clients are in their startup here: `data` is empty, the caller turns it away. */
  LP_ARRIVED_BUSY,
  /* As accepted, nothing read (lp_listener_config: negotiate off, or C could not watch it); or
     handed over in its startup by lp_listener_hand_over, with what was read of it so far in `data`. */
  LP_ARRIVED_RAW,
  /* Its startup took longer than the timeout: C closed it (fd is -1); for the caller's log. */
  LP_ARRIVED_TIMEOUT,
  /* It went away (or failed) in its startup: C closed it (fd is -1); for the caller's counts. */
  LP_ARRIVED_GONE,
};

/* The client's socket (non-blocking, close-on-exec) is the caller's from this call on, but for
   LP_ARRIVED_TIMEOUT and LP_ARRIVED_GONE. `data` is valid during the call only. `peer` is its address (AF_UNIX: none). */
typedef void (*lp_arrival_cb)(lp_listener *l, void *user, enum lp_arrival kind, int fd, const unsigned char *data, size_t n,
                              const struct sockaddr *peer);

/* Accepts on the listening socket `fd` (taken over: closed at lp_listener_close). NULL with `error` set when it cannot. */
lp_listener *lp_listener_open(uv_loop_t *loop, int fd, lp_arrival_cb cb, void *user, const char **error);
/* negotiate: read the startup (else hand each client over as accepted); max_pending: most clients
   in their startup here at once (0: no limit); timeout_ms: for the startup. For clients from now on. */
void lp_listener_config(lp_listener *l, int negotiate, int max_pending, double timeout_ms);
/* Clients in their startup here now. */
int lp_listener_pending(const lp_listener *l);
/* Clients in their startup elsewhere (the caller's other listeners), counted with those here against max_pending. */
void lp_listener_outside(lp_listener *l, int n);
/* Hands every client in its startup here to the caller now (LP_ARRIVED_RAW): at a shutdown they
   become the caller's clients, answered as it answers its own. */
void lp_listener_hand_over(lp_listener *l);
/* Stops accepting and closes the clients still in their startup; no callback after. Frees itself
   once libuv lets go of its handles. */
void lp_listener_close(lp_listener *l);

/*
 * Pure, for the fuzzer: what the bytes read so far (`data`, `n`) call for.
 *   LP_STARTUP_MORE: `*need` bytes in all before anything can be said;
 *   LP_STARTUP_REFUSE_ENCRYPTION: exactly an SSLRequest or GSSENCRequest: answer 'N', forget the 8 bytes;
 *   LP_STARTUP_DONE: hand the client over with what was read (a whole packet, or a length word no
 *   startup packet has; an encryption request with bytes after it, which Postgres refuses).
 */
enum lp_startup_step { LP_STARTUP_MORE, LP_STARTUP_REFUSE_ENCRYPTION, LP_STARTUP_DONE };
/* The longest startup packet C reads whole, its length word included (Postgres' limit, 10,000, plus the word). */
#define LP_STARTUP_MAX 10004
enum lp_startup_step lp_startup_step(const unsigned char *data, size_t n, size_t *need);

#endif
