/*
 * A transaction-mode client in C: its plain socket, and the transactions the fast path carries
 * between it and a logged-in upstream connection (relay.h) lent for one transaction at a time.
 *
 * The TypeScript engine (src/pool/transaction-session.ts) stays the whole of transaction mode;
 * this is its fast path for the commonest traffic, and every other byte goes to the engine:
 *
 *  - JS mode: what the client sends goes to the `data` callback as read, what the engine writes
 *    goes out in order (the client socket as a Duplex would).
 *  - Fast mode (lp_client_fast): C reads the client's messages in units, a Query or an extended
 *    sequence up to its Sync. A unit the fast path carries (lp_unit_length) waits for a
 *    connection (`need`); with one lent (lp_client_attach) units go upstream as they come and
 *    the answers to the client, until the upstream's ReadyForQuery, idle, answers the last unit:
 *    the connection goes back (`back`, LP_BACK_RELEASED). Any other unit puts the client in JS
 *    mode: at once when nothing is lent, else once everything sent was answered (then the lent
 *    connection goes back too, inside its transaction: LP_BACK_HANDOVER), with the unread bytes.
 *
 * The fast path carries only what needs none of the engine's bookkeeping: Queries whose text
 * cannot leave session state or change settings by a command (no SET, no temporary object...,
 * see lp_text_plain), and the unnamed statement and portal in extended sequences. The
 * ParameterStatus messages of a lending (a function may SET) are relayed and handed back with
 * the connection, for the engine's account of the client's settings.
 */
#ifndef LAKEBASE_PROXY_TXCLIENT_H
#define LAKEBASE_PROXY_TXCLIENT_H

#include "relay.h"

typedef struct lp_client lp_client;

enum lp_back { LP_BACK_RELEASED = 1, LP_BACK_HANDOVER, LP_BACK_CLIENT_GONE, LP_BACK_UPSTREAM_GONE, LP_BACK_SETTINGS_FAILED };
extern const char *const LP_BACK_NAMES[];

/* What the unnamed statement and portal of a lending became (flags of `back`). */
#define LP_LENT_PARSED 1
#define LP_LENT_BOUND 2
/* The ParameterStatus messages did not fit: the client's settings are not known. */
#define LP_LENT_REPORTS_LOST 4
/* A command tag of session state went by (SET, RESET, LISTEN, PREPARE, LOAD, DEALLOCATE, DISCARD). */
#define LP_LENT_LEAKED 8
/* The settings query sent ahead of the client's units failed (see LP_BACK_SETTINGS_FAILED). */
#define LP_LENT_SETTINGS_FAILED 16

typedef struct {
  /* JS mode: the client's bytes (n > 0), its end (data NULL; error NULL for a clean end), or the
     client took everything queued for it (n == 0, after lp_client_write returned > 0). */
  void (*data)(lp_client *k, void *user, const unsigned char *data, size_t n, const char *error);
  /* Fast mode: a unit waits for a connection: lp_client_attach, or lp_client_js. `unit`: the
     unit when it names a client's statements (the caller sends it rewritten), else NULL. */
  void (*need)(lp_client *k, void *user, const unsigned char *unit, size_t n);
  /* The lent connection is back (see enum lp_back): `status` of its last ReadyForQuery; `flags`
     LP_LENT_*; `reports`: the ParameterStatus messages relayed; `rest`: LP_BACK_HANDOVER's unread
     client bytes (the client is in JS mode); `reason`: why the upstream went (LP_BACK_UPSTREAM_GONE),
     NULL for a clean end; `running` (LP_BACK_CLIENT_GONE): answers were still to come.
     LP_BACK_SETTINGS_FAILED: the settings sent ahead of the client's units failed; none of them
     went, the client is in JS mode with them in `rest`, the connection at its ReadyForQuery. */
  void (*back)(lp_client *k, void *user, enum lp_back how, int status, int flags, int running, const unsigned char *reports, size_t reports_len,
               const unsigned char *rest, size_t rest_len, const char *reason);
  /* Last call: the socket is closed, `k` is about to be freed. */
  void (*end)(lp_client *k, void *user);
} lp_client_callbacks;

/* Takes over `fd` (closed at the end). `counters`: [to upstream, to client] of the fast path, added to (may be NULL). */
lp_client *lp_client_open(uv_loop_t *loop, int fd, const lp_client_callbacks *cb, void *user, double *counters, const char **error);
/* Bytes for the client (not while a connection is lent): returns what stays queued, -1 once closed. */
long lp_client_write(lp_client *k, const unsigned char *data, size_t n);
/* FIN once what is queued is written, then the socket closes (at the client's end, or after a linger). */
void lp_client_end(lp_client *k);
/* Closes now; a lent connection comes back first (LP_BACK_CLIENT_GONE). */
void lp_client_close(lp_client *k);
/* JS mode: stops or resumes reading. */
void lp_client_pause(lp_client *k, int paused);
/* JS mode to fast mode; `first`: bytes the engine read and left (they come before the socket's). */
int lp_client_fast(lp_client *k, const unsigned char *first, size_t n);
/*
 * Fast mode, after `need`: lends `conn` (logged in, at ReadyForQuery, idle) for the waiting units;
 * `unread`: bytes of it read before; `settings`: messages that make the connection the client's
 * (a Query of its settings), sent first and answered before any of the client's units go, their
 * answers not relayed (their ParameterStatus messages are not the client's news: the caller knows
 * what it set); `unit`: the waiting unit with the server's names of the client's statements, when
 * `need` said it names some (then required: one unit, sent instead of the client's; not with
 * `settings`). -1 when refused.
 */
int lp_client_attach(lp_client *k, lp_conn *conn, const unsigned char *unread, size_t n, const unsigned char *settings, size_t settings_len,
                     const unsigned char *unit, size_t unit_len);
/* Fast mode with nothing lent, to JS mode: returns the unread bytes (valid until the next call of this function, for any client). */
const unsigned char *lp_client_js(lp_client *k, size_t *n);
/* Whether a connection is lent, whether answers are still to come, ms since the last byte either way. */
void lp_client_state(lp_client *k, int *lent, int *running, double *idle_ms);

/*
 * Pure parts, for the fuzzer. lp_unit_length: the length of the unit at the head of `data`, 0
 * when it is not all there yet, LP_NOT_FAST when the fast path does not carry it. `parsed` and
 * `bound`: the lending made the unnamed statement and portal before it. `named`: NULL, or where
 * to say that the unit Binds (to the unnamed portal) or Describes a client's named statement,
 * which it may then.
 */
#define LP_NOT_FAST ((size_t)-1)
size_t lp_unit_length(const unsigned char *data, size_t n, int parsed, int bound, size_t limit, int *named);
/* A text that no command of it can leave session state with, or change a setting by. */
int lp_text_plain(const unsigned char *text, size_t n);

#endif
