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
typedef struct lp_desk lp_desk;
/* A connection joining a desk (see lp_desk below): the caller's id for it, the id of its settings. */
typedef struct {
  int id, sid;
  double expires_in_ms; /* no new transaction after this (token, ServerLifetime) */
} lp_desk_join;

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
  void (*need)(lp_client *k, void *user, const unsigned char *unit, size_t n, double waited_ms);
  /* The lent connection is back (see enum lp_back): `status` of its last ReadyForQuery; `flags`
     LP_LENT_*; `reports`: the ParameterStatus messages relayed; `rest`: LP_BACK_HANDOVER's unread
     client bytes (the client is in JS mode); `reason`: why the upstream went (LP_BACK_UPSTREAM_GONE),
     NULL for a clean end; `running` (LP_BACK_CLIENT_GONE): answers were still to come. `id`: the
     connection's id on a desk (it has left the desk), else 0.
     LP_BACK_SETTINGS_FAILED: the settings sent ahead of the client's units failed; none of them
     went, the client is in JS mode with them in `rest`, the connection at its ReadyForQuery. */
  void (*back)(lp_client *k, void *user, enum lp_back how, int status, int flags, int running, const unsigned char *reports, size_t reports_len,
               const unsigned char *rest, size_t rest_len, const char *reason, int id);
  /* Last call: the socket is closed, `k` is about to be freed. */
  void (*end)(lp_client *k, void *user);
  /* A lending of the desk (connection `id`) begins with a unit that names the client's statements:
     the unit with the names the connection has them by (valid until the next call of any client's
     `rewrite`; *n its length), or NULL when it lacks one (then the connection and the unit go back
     with LP_BACK_HANDOVER, nothing sent). */
  const unsigned char *(*rewrite)(lp_client *k, void *user, const unsigned char *unit, size_t n, int id, size_t *out_n);
} lp_client_callbacks;

/* Takes over `fd` (closed at the end). `counters`, `totals`: [to upstream, to client] of the fast path, added to (may be NULL). */
lp_client *lp_client_open(uv_loop_t *loop, int fd, const lp_client_callbacks *cb, void *user, double *counters, double *totals, const char **error);
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
 * `settings`). `join`: the connection joins the client's desk (not with `settings`), and
 * comes back to `back` with its id. -1 when refused, 1 when it joined the desk, else 0.
 */
int lp_client_attach(lp_client *k, lp_conn *conn, const unsigned char *unread, size_t n, const unsigned char *settings, size_t settings_len,
                     const unsigned char *unit, size_t unit_len, const lp_desk_join *join);
/* Fast mode with nothing lent, to JS mode: returns the unread bytes (valid until the next call of this function, for any client). */
const unsigned char *lp_client_js(lp_client *k, size_t *n);
/* Whether a connection is lent, whether answers are still to come, ms since the last byte either way, the desk id of the one lent (0: none). */
void lp_client_state(lp_client *k, int *lent, int *running, double *idle_ms, int *desk_id);
/* The desk whose connections this client may take without a call to the caller (NULL: none), with its settings' id (see lp_desk).
   A lending of the desk under way still goes on to the desk's next client only while it is the client's desk. */
void lp_client_desk(lp_client *k, lp_desk *desk, int sid);
/* The lending under way goes back to the caller at its end (`back`), not to the desk's next client (a cancel is on its way to it). */
void lp_client_hold(lp_client *k);

/*
 * A desk: the pool's hand-off in C. Connections the caller lent to a client of the desk with
 * `join` (lp_client_attach), or offered (lp_desk_offer), stay on the desk between transactions:
 * a transaction released cleanly (ReadyForQuery idle, nothing leaked or reported, the desk not
 * stopped, no client of the caller waiting, not expired) hands its connection to the first client
 * waiting on the desk with the same settings id, or leaves it idle there; a client of the desk
 * whose unit finds an idle one of its settings takes it. No call to the caller either way: it is
 * told after the fact, through `counts` and `waits` (read them when it likes).
 *
 * Anything else goes the caller's way as before: the connection leaves the desk with `back`
 * (with its id), and a client the desk cannot serve gets `need`. A client waits on the desk only
 * when the caller has no room (lp_desk_set: no idle connection of its own, no room for a login),
 * no connection of the desk is idle, and some connection of the desk has its settings; it goes to
 * `need` after the desk's wait timeout, when no connection of its settings is left on the desk,
 * or when one of other settings goes idle there (one waiting client for each), with how long it
 * waited. A unit that names the client's statements goes with the names `rewrite` gives it.
 * `sid`: an id of the settings a connection is in, and a client wants (the caller's; 0 matches
 * nothing).
 */

enum lp_desk_out { LP_DESK_ENDED = 1, LP_DESK_SPOKE, LP_DESK_STALE, LP_DESK_RECLAIMED, LP_DESK_RELEASED };
/* How a session on the desk ended (session mode, lp_desk_relay): the connection stays on the desk
   and C resets it (LP_SESSION_RESET), it left the desk and is the caller's again, before the relay
   (LP_SESSION_BACK), or it ended (LP_SESSION_ENDED: it left the desk, and its `end` follows). */
enum lp_session { LP_SESSION_RESET = 1, LP_SESSION_BACK, LP_SESSION_ENDED };
typedef struct {
  /* An idle connection left the desk: it ended (LP_DESK_ENDED), the server sent something
     (LP_DESK_SPOKE), it expired or has been idle past the check delay (LP_DESK_STALE), or the
     desk was stopped (LP_DESK_RECLAIMED); or a session's connection, clean after its reset, is for
     the caller (LP_DESK_RELEASED: its clients wait, the desk is stopped, or it expired). It is
     the caller's again (its reader unset). */
  void (*out)(lp_desk *d, void *user, int id, enum lp_desk_out why);
  /* `waits` is full: read it now (set counts[1] to 0). */
  void (*full)(lp_desk *d, void *user);
  /* Last call: the desk is freed. */
  void (*end)(lp_desk *d, void *user);
  /* Session mode (may be NULL without it). The session on connection `id` ended (enum
     lp_session); `reusable` and `status` as lp_callbacks.detached says; `abandoned`: a query ran
     when the client left (the caller cancels it). The byte counts are the session's. */
  void (*session)(lp_desk *d, void *user, int id, enum lp_session how, enum lp_end end, double to_upstream, double to_client, int reusable, int status,
                  int abandoned);
  /* Session mode: the ErrorResponse for a client whose upstream went away (as lp_callbacks.farewell). */
  size_t (*farewell)(lp_desk *d, void *user, int id, const char *reason, unsigned char *out, size_t cap);
  /* Session mode: a connection's reset after its session did not answer plainly (a
     CommandComplete and ReadyForQuery idle, nothing else), or failed (`answer` NULL: it ended or
     took too long); it left the desk, the caller's again, with what the server answered. */
  void (*reset)(lp_desk *d, void *user, int id, const unsigned char *answer, size_t n);
} lp_desk_callbacks;

/* `counts`: [transactions released on the desk, waits in `waits`] (added to); `waits`: seconds each client of the desk waited, `waits_cap` of them. */
lp_desk *lp_desk_open(uv_loop_t *loop, const lp_desk_callbacks *cb, void *user, double *counts, double *waits, size_t waits_cap);
/* `room`: the caller can give a connection now (an idle one, or a login); `js_waiting`: clients wait for the caller's connections. */
void lp_desk_set(lp_desk *d, int room, int js_waiting);
void lp_desk_config(lp_desk *d, double wait_timeout_ms, double check_delay_ms);
/* Stops (pause): the waiting clients go to `need`, idle connections out (LP_DESK_RECLAIMED), releases to `back`; or goes on. */
void lp_desk_stop(lp_desk *d, int stopped);
/* Stops for good; freed once no client and no connection refers to it (`end`). The handle is not used again. */
void lp_desk_close(lp_desk *d);
/* A connection of the caller for the first client waiting with `join->sid`: 1 when taken (it is on the desk, lent), else 0. */
int lp_desk_offer(lp_desk *d, lp_conn *conn, const lp_desk_join *join);
/* The first waiting client to `need` (the caller has room now): 1 when there was one. */
int lp_desk_wake(lp_desk *d);
/* An idle connection of the desk back to the caller: 1 when it was idle there. */
int lp_desk_reclaim(lp_desk *d, int id);
/* The most recently used idle connection of the desk back to the caller (its clients wait): its id (0: none), and how long it was idle. */
int lp_desk_reclaim_any(lp_desk *d, double *idle_ms);
/* How long the connection `id` has been idle on the desk, -1 when it is not idle there. */
double lp_desk_idle_ms(lp_desk *d, int id);
void lp_desk_stats(lp_desk *d, int *idle, int *count, int *waiting, double *max_wait_ms, int *resetting);

/*
 * Session mode on the desk (the session pool, src/pool/pool.ts): a clean, idle connection the
 * caller parks (lp_desk_park) serves whole sessions from C. A client takes the most recently idle
 * one of its settings (lp_desk_take) and C relays it (lp_desk_relay, a pooled relay). When the
 * client leaves between two messages with the server idle, C sends the reset query
 * (lp_desk_reset_query) and, once the server answers it with a CommandComplete and an idle
 * ReadyForQuery and nothing else, the connection is idle on the desk again: no call to the caller
 * but `session` for the session's end. Anything else goes the caller's way: `session` with
 * LP_SESSION_BACK (a transaction left open, a query running, the caller's clients waiting), or
 * `reset` with what the server answered.
 */
/* A clean connection (logged in, at ReadyForQuery idle) waits idle on the desk: 1 when it does. */
int lp_desk_park(lp_desk *d, lp_conn *conn, const lp_desk_join *join);
/* The message sent to reset a connection after its session (a Query; n == 0: none). Copied. */
int lp_desk_reset_query(lp_desk *d, const unsigned char *message, size_t n);
/* The most recently idle connection of settings `sid` that needs no check (not expired, idle for
   less than the check delay), taken for a session: its id, or 0 (stale ones went out first:
   LP_DESK_STALE). lp_desk_relay follows, or lp_desk_untake. */
int lp_desk_take(lp_desk *d, int sid);
/* The taken connection `id` back to idle (its session did not start). */
void lp_desk_untake(lp_desk *d, int id);
/* Relays the client on `client_fd` (taken over: closed at the end) on the taken connection `id`,
   as lp_conn_relay does (`hello`: bytes for the client first; `first`: the client's bytes read
   before). -1 with `error` set when it cannot (then the connection is still taken). */
int lp_desk_relay(lp_desk *d, int id, int client_fd, const unsigned char *hello, size_t hello_len, const unsigned char *first, size_t first_len,
                  double *counters, const char **error);
/* During the session, the connection's own calls work as for any pooled relay: lp_conn_state,
   lp_conn_detach (the client goes, C resets the connection), lp_conn_close. */
/* The session on `id` ends with its connection back to the caller (LP_SESSION_BACK), not reset
   here: a cancel is on its way to its query, which the caller waits for. */
void lp_desk_hold(lp_desk *d, int id);
/* Resets that have run `timeout_ms` or more end (`reset` with no answer). */
void lp_desk_sweep(lp_desk *d, double timeout_ms);

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
