/*
 * libFuzzer target for native/txclient.c (see .ci/fuzz.sh). The first byte of an input picks one
 * of two things to do with the rest: with its low bit, the pure parts; else a session, the other
 * bits its config (callbacks that react, small client socket buffers, TLS 1.2, clients or
 * upstreams over TCP, clients ended or closed at the end, a second client from the start).
 *
 * The pure parts: bytes (raw, or messages built from the input) go to lp_unit_length with the
 * input's `parsed`, `bound` and limit, and every Query and Parse text among them to lp_text_plain.
 * lp_unit_length must answer as its contract, written out here (unit_contract), says: 0 while the
 * unit is not all there, LP_NOT_FAST, or the end of a run of whole messages that is one Query
 * alone or ends at its first Sync, never past `n` or the limit, with no named statement or portal,
 * no Close, no Query after other messages and no text lp_text_plain refuses. A unit's answer
 * stands when bytes are added behind it, and any shorter prefix of it is not all there. A text
 * lp_text_plain takes has none of the words of session state the engine watches for (its
 * LEAKY_TEXT and LEAKY_TAGS, set_config, COPY, DECLARE, RESET) and no command that does not begin
 * with a letter or begins with SET; the same text in other letter case gets the same answer.
 *
 * The client end to end: up to three clients (each an lp_client on its end of a socketpair, or
 * of TCP over the loopback) and up to two upstream connections (lp_conn, each logged in through a
 * TLS handshake with the OpenSSL server of support.c) on one loop. The input is a script: the
 * clients send units and everything else (cut, pipelined, garbage), read, half-close, close or
 * reset; the servers answer (ReadyForQuery idle or in a transaction, ParameterStatus, COPY, a
 * message cut short, garbage), close or reset; the engine (the harness, as the callbacks'
 * JavaScript) goes fast or back to JS mode, writes, pauses, ends or closes a client, lends a
 * connection at once from `need` or later, or reacts inside any callback as the input says. The
 * pool writes its own queries on a connection that is not lent, and closes one that came back
 * from a lending gone wrong, as the engine does. When the input is used up, the peers cooperate:
 * the servers answer every Query and Sync, the clients send and read everything, the engine lends
 * to every client that waits and takes back what none can carry; then every client and
 * connection is ended.
 *
 * The desk (op 19 with an odd `which`, see desk_step()): the script opens one (a second after it
 * closed), with a wait timeout and a check delay of a few ms, puts clients on it in settings 1 to 3
 * (or 0), and flips lp_desk_set's room and js_waiting, offers the pool's connections, wakes,
 * reclaims (by id, any), stops and goes on, and closes it; the engine's attaches carry a ticket
 * (lp_desk_join) in the client's settings or others, expiring never, at once or soon. C's
 * hand-offs call nobody: the target is linked with --wrap=lp_conn_sink, so the harness sees every
 * lending C starts and ends and every connection left idle on a desk (__wrap_lp_conn_sink), and
 * its model follows each connection on and off the desk by its ticket. While the peers cooperate
 * the pool tells the desk the truth (room, js_waiting), wakes it when it has room and reclaims
 * from it for a client that asks; at the end the desk closes before the clients or after them.
 *
 * Session mode on the desk (desk steps 13 to 15): the pool sets the reset query (DISCARD ALL at
 * the open, a longer Query, a Sync, or none), parks a clean connection it holds (lp_desk_park, in
 * settings 1 to 3 or 0, its ticket's expiry as the tickets'), and a client's session takes one
 * (lp_desk_take) and at once, as server.ts does, is relayed on it (lp_desk_relay: up to four
 * session clients, each on its own socketpair or TCP socket, greeted with nothing, a login's
 * answer, the input's bytes or more than the socket takes, with bytes it sent before), or the
 * relay fails (a bad descriptor) and the connection is untaken, or it is untaken at once (a relay
 * and an untake of another ticket first change nothing). The session's client sends anything, a
 * Query, a Terminate (and more after it), reads, half-closes, closes or resets, stops reading;
 * the caller ends the session (lp_conn_detach, an idle timeout) or closes its connection
 * (lp_conn_close); the server answers the reset as the input says (CommandComplete and
 * ReadyForQuery idle, a ParameterStatus, an error or a notice, another status, a ReadyForQuery
 * alone, bytes after it, a length below 4, 70 KiB, raw bytes), in up to three writes read apart,
 * then maybe closes; the pool sweeps resets (0, 1, 5 ms, or none), and lp_desk_stop and
 * lp_desk_close come between any of these. The pool takes back what the desk gives it as pool.ts
 * does: rolls back a session left in a transaction, closes one left mid-query or mid-message or
 * whose reset did not answer plainly, parks a clean one again (REACT); inside a session's end it
 * may sweep, stop or close the desk. While the peers cooperate the server answers the reset
 * query too; at the end the sessions' clients leave (a Terminate and a FIN with CFG_END, else a
 * close), and a reset that never completes ends with its server.
 *
 * Checked for every input:
 *  - every byte a server receives is a prefix of, in order, its login, the pool's writes and the
 *    units of the clients it was lent to, each taken from that client's stream (the engine's
 *    first bytes, then the socket's) where the engine's share of it ends; each lending's bytes
 *    are whole fast units by the contract above;
 *  - every client receives a prefix of, in order, what the engine wrote and what the servers
 *    sent it in its lendings (the pool's unread bytes first); the engine gets the rest of the
 *    client's stream, in order, with no byte twice or lost (up to the client's end, or the
 *    engine's: C drops a unit it held then, and what it reads after lp_client_end is not checked);
 *  - a lending goes back once, with what its answers say: released only with every unit answered
 *    and the server idle, a handover only with every unit answered and a unit the fast path does
 *    not carry first in the rest, `running` when answers are still to come, the status of the
 *    last ReadyForQuery, the flags of its Parse and Bind, and its ParameterStatus messages (whole
 *    ones, as the engine reads them, when the lending ends between two messages);
 *  - `need` only in fast mode, once until answered; no data for the engine while a connection is
 *    lent; an attach only after `need`; the pool's reader gets a lent connection's bytes only as
 *    it is given back (give_back() lets it read just before `back`), and the client none after;
 *  - once the peers cooperated, no client keeps a whole unit unsent or bytes unread, and every
 *    server has what was sent to it;
 *  - with a desk: a connection is lent to one client at a time; C hands one on (to the next
 *    client, or idle on the desk) only after a clean lending (every unit answered, idle, no
 *    ParameterStatus, no tag of session state), with the desk not stopped, js_waiting unset and
 *    the ticket not expired, only to a client of the desk in the ticket's settings (never 0) that
 *    is not waiting for the engine, takes an idle one only within the check delay, and the pool's
 *    reader gets nothing of a connection on the desk; every ticket leaves its desk exactly once
 *    (`back` with its id, `out` for a reason that holds, a reclaim), `reclaimed` only by a stop or
 *    the close; lp_desk_stats, lp_desk_idle_ms, lp_client_state's desk id, counts[0] and the waits
 *    agree with the model; a client waiting on the desk is served or gets `need` (with how long it
 *    waited) once the peers cooperate; a stop leaves none waiting and none idle;
 *  - session mode: every connection is in exactly one place (the pool's, lent, idle on a desk, in a
 *    session, or resetting) and lp_desk_stats's idle and resetting counts agree; lp_desk_park
 *    takes what it may (the desk going on, settings not 0, lendable); lp_desk_take gives the most
 *    recently idle connection of its settings within the check delay, the stale ones before it
 *    out, none only when none is idle there; every session gets exactly one `session`, with the
 *    session's byte counts, no Terminate upstream, `reusable` only when the client's bytes and
 *    the server's end between two messages with a ReadyForQuery last, `status` that one's, never
 *    with `abandoned`; C keeps the connection (LP_SESSION_RESET) exactly when reusable, idle, the
 *    desk going on, js_waiting unset and the ticket not expired (else LP_SESSION_BACK, or
 *    LP_SESSION_ENDED once it ended), and then the reset query is the next the server reads;
 *    the reset's answer is decided in the very call whose bytes decide it: idle on the desk again
 *    (or the desk's next client) only after CommandComplete messages and a ReadyForQuery idle,
 *    nothing else and nothing after, with the desk still keeping it; the same answer otherwise
 *    comes out (released); any other to `reset` with every byte the server sent since, and
 *    `reset` with none only after the connection's end (or the sweep's close); a sweep leaves no
 *    reset that ran its timeout; the session's client gets its greeting, then the server's bytes,
 *    then the farewell (only between two messages, after no ErrorResponse, once);
 *  - exactly one `end` per client, per connection and per desk, no descriptor more than at the
 *    start, and the loop holds no handle.
 * ASan, UBSan and LeakSanitizer watch the memory. A failed check aborts, so libFuzzer keeps the
 * input. native/fuzz/txclient-seeds.mjs writes named examples.
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

#include "../txclient.h"
#include "support.h"

/* txclient.c's: a longer unit goes to the engine. */
#define UNIT_LIMIT ((size_t)1 << 20)
#define MAX_CLIENTS 3
#define MAX_CONNS 2
#define MAX_SESSIONS 4

static uint32_t be32(const unsigned char *p) { return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]; }

/* ---------- the contract of the pure parts ---------- */

static int lower(int c) { return c >= 'A' && c <= 'Z' ? c + 32 : c; }

static int starts_with_word(const unsigned char *text, size_t n, const char *word) {
  size_t len = strlen(word);
  if (len > n) return 0;
  for (size_t i = 0; i < len; i++)
    if (lower(text[i]) != word[i]) return 0;
  return 1;
}

/*
 * What a plain text must not hold anywhere, whatever the case: the engine's LEAKY_TEXT (temporary
 * objects, pg_temp, WITH HOLD, advisory locks), its LEAKY_TAGS (LISTEN, PREPARE, LOAD,
 * DEALLOCATE), set_config, DISCARD and RESET (settings and statements dropped), COPY (which the
 * engine follows) and DECLARE (a cursor that may outlive the transaction).
 */
static const char *const SESSION_WORDS[] = { "temp", "hold", "advisory", "set_config", "listen", "prepare", "load", "deallocate", "discard", "reset", "copy", "declare" };
#define SESSION_WORD_COUNT (sizeof SESSION_WORDS / sizeof SESSION_WORDS[0])

/* Whether the text lp_text_plain took is plain by the contract; else why not. */
static const char *plain_violation(const unsigned char *text, size_t n) {
  for (size_t i = 0; i < n; i++)
    for (size_t w = 0; w < SESSION_WORD_COUNT; w++)
      if (starts_with_word(text + i, n - i, SESSION_WORDS[w])) return SESSION_WORDS[w];
  /* Postgres starts a command after a ';' outside quotes and comments; every ';' counts here, so
     each of its commands is seen: one that begins with SET, a comment or a parenthesis shows. */
  for (size_t start = 0; start <= n;) {
    size_t i = start;
    while (i < n && (text[i] == ' ' || text[i] == '\t' || text[i] == '\n' || text[i] == '\r' || text[i] == '\f' || text[i] == '\v')) i++;
    if (i < n) {
      int c = lower(text[i]);
      if (c < 'a' || c > 'z') return "a command that does not begin with a letter";
      if (starts_with_word(text + i, n - i, "set")) return "a command that begins with SET";
    }
    const unsigned char *semicolon = i < n ? memchr(text + i, ';', n - i) : NULL;
    if (!semicolon) break;
    start = (size_t)(semicolon - text) + 1;
  }
  return NULL;
}

/* lp_text_plain and what its contract says of it, for one text. */
static int checked_plain(const unsigned char *text, size_t n) {
  int plain = lp_text_plain(text, n);
  if (plain != 0 && plain != 1) fail("lp_text_plain returned %d", plain);
  const char *why = plain ? plain_violation(text, n) : NULL;
  if (why) fail("lp_text_plain took a text of %zu bytes with %s", n, why);
  return plain;
}

/* A Query's body: a NUL-terminated text (Postgres refuses bytes after its NUL) that is plain. */
static int query_plain(const unsigned char *body, size_t blen) { return blen >= 1 && body[blen - 1] == 0 && checked_plain(body, blen - 1); }

/* One message of an extended sequence the fast path carries, given what the unit made before it;
   `named`: a client's named statement may be bound (to the unnamed portal) or described. */
static int extended_fast(int type, const unsigned char *body, size_t blen, int *parsed, int *bound, int named) {
  switch (type) {
    case 'P': { /* the unnamed statement, a plain text */
      if (blen < 1 || body[0] != 0) return 0;
      const unsigned char *nul = memchr(body + 1, 0, blen - 1);
      if (!nul || !checked_plain(body + 1, (size_t)(nul - body - 1))) return 0;
      *parsed = 1;
      return 1;
    }
    case 'B': /* the unnamed portal, of the unnamed statement the lending made, or of a named one */
      if (blen < 2 || body[0] != 0) return 0;
      if (body[1] == 0 ? !*parsed : !named || !memchr(body + 1, 0, blen - 1)) return 0;
      *bound = 1;
      return 1;
    case 'D':
      if (blen >= 2 && body[0] == 'S' && body[1] != 0) return named && memchr(body + 1, 0, blen - 1) == body + blen - 1;
      return blen >= 2 && body[1] == 0 && ((body[0] == 'S' && *parsed) || (body[0] == 'P' && *bound));
    case 'E':
      return blen >= 1 && body[0] == 0 && *bound;
    case 'H':
      return 1;
    default: /* a Close, a FunctionCall, COPY's messages, a Terminate...: the engine's */
      return 0;
  }
}

/*
 * The contract of lp_unit_length, written out. Every message must end within `limit` (its header
 * too, before its length is known); the unit is one Query alone, or extended messages up to the
 * first Sync.
 */
static size_t unit_contract(const unsigned char *d, size_t n, int parsed, int bound, size_t limit, int named, int *unfinished_flush) {
  /* An unfinished sequence with a Flush in it is the engine's: its client may wait for the answers it flushed. */
  int flushed = 0;
  *unfinished_flush = 0;
  for (size_t at = 0;;) {
    if (n - at < 5) {
      *unfinished_flush = flushed;
      return at + 5 > limit || flushed ? LP_NOT_FAST : 0;
    }
    uint32_t len = be32(d + at + 1);
    if (len < 4 || at + 1 + (size_t)len > limit) return LP_NOT_FAST;
    if (at + 1 + (size_t)len > n) {
      *unfinished_flush = flushed;
      return flushed ? LP_NOT_FAST : 0;
    }
    size_t end = at + 1 + (size_t)len;
    int type = d[at];
    flushed |= type == 'H';
    if (type == 'S') return end;
    if (type == 'Q') return at == 0 && query_plain(d + at + 5, len - 4) ? end : LP_NOT_FAST;
    if (!extended_fast(type, d + at + 5, len - 4, &parsed, &bound, named)) return LP_NOT_FAST;
    at = end;
  }
}

/* What a unit leaves made for the rest of its lending (txclient.h's LP_LENT_*). */
static int unit_makes(const unsigned char *d, size_t n) {
  int flags = 0;
  for (size_t at = 0; at + 5 <= n; at += 1 + be32(d + at + 1)) {
    if (d[at] == 'P') flags |= LP_LENT_PARSED;
    if (d[at] == 'B') flags |= LP_LENT_BOUND;
  }
  return flags;
}

/* Whether the messages of `d` (whole ones) include one of `type`. */
static int memchr_type(const unsigned char *d, size_t n, int type) {
  for (size_t at = 0; at + 5 <= n; at += 1 + be32(d + at + 1)) {
    if (d[at] == type) return 1;
    if (be32(d + at + 1) < 4) return 0;
  }
  return 0;
}

/* lp_unit_length, checked against the contract and against itself with bytes added or taken away. */
static size_t checked_unit(const unsigned char *d, size_t n, int parsed, int bound, size_t limit, const unsigned char *more, size_t more_n) {
  size_t got = lp_unit_length(d, n, parsed, bound, limit, NULL);
  int unfinished_flush;
  size_t expected = unit_contract(d, n, parsed, bound, limit, 0, &unfinished_flush);
  if (got != expected)
    fail("lp_unit_length of %zu bytes (parsed %d, bound %d, limit %zu) is %zd, the contract says %zd", n, parsed, bound, limit, (ssize_t)got, (ssize_t)expected);
  if (got != 0 && got != LP_NOT_FAST && (got > n || got > limit || got < 5)) fail("lp_unit_length: a unit of %zu bytes in %zu (limit %zu)", got, n, limit);
  /* Where names of the client's statements may be (a lending's first unit): the contract with them,
     and a unit that names none says so. */
  int named = -1, unfinished_named;
  size_t with_names = lp_unit_length(d, n, parsed, bound, limit, &named);
  size_t expected_named = unit_contract(d, n, parsed, bound, limit, 1, &unfinished_named);
  if (with_names != expected_named) fail("lp_unit_length with names allowed is %zd, the contract says %zd", (ssize_t)with_names, (ssize_t)expected_named);
  if (got != LP_NOT_FAST && named != 0) fail("lp_unit_length says a unit without names names some");
  if (got == 0) return got;
  if (got != LP_NOT_FAST && !memchr_type(d, got, 'H')) {
    /* Any prefix of a unit is a unit not all there yet (unless it has a Flush: then the engine's). */
    size_t cuts[] = { got - 1, got / 2, 1 };
    for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++)
      if (lp_unit_length(d, cuts[i], parsed, bound, limit, NULL) != 0) fail("lp_unit_length: a prefix of %zu bytes of a %zu-byte unit is not 0", cuts[i], got);
  }
  if (more_n > 0 && !unfinished_flush) {
    /* What comes behind a unit, or behind what decided against one, changes nothing. */
    size_t decided = got == LP_NOT_FAST ? n : got;
    unsigned char *longer = malloc(decided + more_n);
    memcpy(longer, d, decided);
    memcpy(longer + decided, more, more_n);
    size_t again = lp_unit_length(longer, decided + more_n, parsed, bound, limit, NULL);
    free(longer);
    if (again != got) fail("lp_unit_length: %zd for %zu bytes, %zd with %zu more behind", (ssize_t)got, decided, (ssize_t)again, more_n);
  }
  return got;
}

/* lp_text_plain of `text`, and of the same text in other letter case, with a session word or a SET put in. */
static void check_text(const unsigned char *text, size_t n) {
  int plain = checked_plain(text, n);
  unsigned char *other = malloc(n + 40);
  for (size_t i = 0; i < n; i++) {
    int c = text[i];
    other[i] = (unsigned char)(c >= 'a' && c <= 'z' ? c - 32 : c >= 'A' && c <= 'Z' ? c + 32 : c);
  }
  if (lp_text_plain(other, n) != plain) fail("lp_text_plain: %d for a text of %zu bytes, %d in other letter case", plain, n, !plain);
  /* Wherever a session word goes, in whatever case, the text is not plain any more. */
  size_t at = n ? in_size(n) : 0;
  const char *word = SESSION_WORDS[in_u8() % SESSION_WORD_COUNT];
  size_t len = strlen(word);
  memcpy(other, text, at);
  for (size_t i = 0; i < len; i++) other[at + i] = (unsigned char)((in_u8() & 1) && word[i] >= 'a' ? word[i] - 32 : word[i]);
  memcpy(other + at + len, text + at, n - at);
  if (lp_text_plain(other, n + len)) fail("lp_text_plain took a text with \"%s\" put in at %zu", word, at);
  /* Nor with a SET after the text's last semicolon. */
  static const char set[] = ";\n set x = 1";
  memcpy(other, text, n);
  memcpy(other + n, set, sizeof set - 1);
  if (lp_text_plain(other, n + sizeof set - 1)) fail("lp_text_plain took a text that ends with a SET command");
  free(other);
}

/* The texts of every Query and Parse in `d`, as far as its lengths lead. */
static void check_texts(const unsigned char *d, size_t n) {
  for (size_t at = 0; at + 5 <= n;) {
    uint32_t len = be32(d + at + 1);
    if (len < 4 || len > n - at - 1) return;
    const unsigned char *body = d + at + 5;
    size_t blen = len - 4;
    if (d[at] == 'Q' && blen > 0) check_text(body, blen - 1);
    if (d[at] == 'P' && blen > 1) {
      const unsigned char *nul = memchr(body, 0, blen);
      const unsigned char *end = nul ? memchr(nul + 1, 0, (size_t)(body + blen - nul - 1)) : NULL;
      if (end) check_text(nul + 1, (size_t)(end - nul - 1));
    }
    at += 1 + (size_t)len;
  }
}

/* Texts for the messages the input builds: plain ones, and one of each kind the fast path refuses. */
static const char *const TEXTS[] = {
  "SELECT 1", "select now()", "", "insert into t values (1); update t set a = 2 where b = 3", "BEGIN", "COMMIT", "  rollback;",
  "SET search_path = x", "set local a = 1", "select set_config('a', 'b', false)", "create TEMP table t (a int)", "LISTEN c",
  "DISCARD ALL", "prepare p as select 1", "/* hint */ select 1", "select 1;  reset all", "(select 1)", "copy t from stdin",
  "declare c cursor with hold for select 1", "select pg_advisory_lock(1)", "select 1;\tSeT x = 2", "select ';' ; select 2",
};
#define TEXT_COUNT (sizeof TEXTS / sizeof TEXTS[0])

/* A text: one of TEXTS, or letters and spaces of the input's length. */
static void put_text(bytes_t *b) {
  unsigned pick = in_u8();
  if (pick < 200) {
    const char *text = TEXTS[pick % TEXT_COUNT];
    put(b, text, strlen(text));
  } else {
    for (size_t n = in_u8(); n > 0; n--) put_u8(b, "abcdefghijklmnopqrstuvwxyz  ,;()'*"[in_u8() % 35]);
  }
}

/* A message: its type, its length from what follows (or the input's, a lie), its body. */
static void put_message(bytes_t *b, int type, const bytes_t *body) {
  put_u8(b, (unsigned)type);
  put_u32(b, (uint32_t)(body->n + 4));
  put(b, body->d, body->n);
}

/* One message of a client's: Query, Parse, Bind, Describe, Execute, Sync, Flush, Close, Terminate, CopyData, FunctionCall. */
static void put_client_message(bytes_t *out, unsigned kind) {
  bytes_t body = { 0 };
  int type;
  switch (kind % 11) {
    case 0: type = 'Q'; put_text(&body); put_u8(&body, 0); break;
    case 1: /* Parse: the unnamed statement, or a named one */
      type = 'P';
      if (in_u8() & 1) put(&body, "s1", 2);
      put_u8(&body, 0);
      put_text(&body);
      put(&body, "\0\0\0", 3);
      break;
    case 2: /* Bind: the unnamed portal and statement, or named ones */
      type = 'B';
      if (in_u8() & 1) put(&body, "p1", 2);
      put_u8(&body, 0);
      if (in_u8() & 1) put(&body, "s1", 2);
      put(&body, "\0\0\0\0\0\0\0", 7);
      break;
    case 3: type = 'D'; put_u8(&body, (in_u8() & 1) ? 'S' : 'P'); if (in_u8() & 1) put(&body, "p1", 2); put_u8(&body, 0); break;
    case 4: type = 'E'; if (in_u8() & 1) put(&body, "p1", 2); put(&body, "\0\0\0\0\0", 5); break;
    case 5: case 6: type = 'S'; break;
    case 7: type = 'H'; break;
    case 8: type = 'C'; put_u8(&body, (in_u8() & 1) ? 'S' : 'P'); put_u8(&body, 0); break;
    case 9: type = 'X'; break;
    default: type = (in_u8() & 1) ? 'd' : 'F'; put_pattern(&body, in_u8() % 64, out->n); break;
  }
  put_message(out, type, &body);
  bytes_free(&body);
}

/* The pure parts: `parsed`, `bound`, the limit and the bytes from the input. */
static void run_pure(void) {
  unsigned how = in_u8();
  int parsed = how & 1, bound = (how >> 1) & 1;
  bytes_t d = { 0 }, more = { 0 };
  if (how & 4) { /* messages built from the input: lengths that hold, so the contract's deeper rules are reached */
    for (unsigned n = in_u8() % 8 + 1; n > 0 && in_left > 0; n--) put_client_message(&d, in_u8());
    if (how & 0x40 && d.n > 0) d.n -= 1 + in_u8() % (d.n < 16 ? d.n : 16); /* cut short */
    for (size_t n = in_u8() % 8; n > 0; n--) put_u8(&more, in_u8());
  } else {
    size_t n = in_left / 2 + 1;
    while (n-- > 1 && in_left > 0) put_u8(&d, in_u8());
    while (in_left > 0) put_u8(&more, in_u8());
  }
  size_t limit;
  switch ((how >> 3) & 7) {
    case 0: case 1: case 2: limit = UNIT_LIMIT; break;
    case 3: limit = d.n; break;
    case 4: limit = d.n / 2; break;
    case 5: limit = SIZE_MAX; break;
    default: limit = in_size(d.n + 16); break;
  }
  checked_unit(d.d ? d.d : (const unsigned char *)"", d.n, parsed, bound, limit, more.d, more.n);
  check_texts(d.d, d.n);
  if (!(how & 4) && d.n > 0) check_text(d.d, d.n);
  bytes_free(&d);
  bytes_free(&more);
}

/* ---------- message streams ---------- */

/* Follows a stream's messages across chunks (as txclient.c follows the upstream's). */
typedef struct {
  unsigned char header[5];
  int have;           /* header bytes of the current message */
  uint32_t remaining; /* body bytes still to come */
  int type;           /* of the current message, once its header is whole */
  int broken;         /* a length below 4: no boundary can be told any more */
} framer_t;

/*
 * Takes bytes up to the end of the current message, at most n: returns how many. *started is set
 * when the header became whole, *ended when the message did (both: a message with no body).
 */
static size_t frame(framer_t *f, const unsigned char *d, size_t n, int *started, int *ended) {
  *started = *ended = 0;
  if (f->broken) return n;
  size_t i = 0;
  if (f->have < 5) {
    while (f->have < 5 && i < n) f->header[f->have++] = d[i++];
    if (f->have < 5) return i;
    f->type = f->header[0];
    uint32_t len = be32(f->header + 1);
    if (len < 4) {
      f->broken = 1;
      return n;
    }
    f->remaining = len - 4;
    *started = 1;
  }
  size_t take = n - i < f->remaining ? n - i : f->remaining;
  f->remaining -= (uint32_t)take;
  i += take;
  if (f->remaining == 0) {
    *ended = 1;
    f->have = 0;
  }
  return i;
}

/* ---------- the session ---------- */

typedef struct upstream upstream_t;
typedef struct session_client session_client_t;

/* ---------- the desk's model ---------- */

#define MAX_DESKS 2   /* one open at a time; a second after the first closed */
#define MAX_JOINS 200 /* tickets per session: ids 1 up, each used once */
#define WAITS_CAP 3   /* small, so `full` comes often */

typedef struct desk desk_t;

/* A connection's ticket on a desk (lp_desk_join): made by an attach with `join` or an offer. */
typedef struct {
  int id, sid;
  desk_t *desk;
  int up;           /* the connection's index */
  int made;         /* the connection joined (a ticket C did not take is not counted) */
  int on;           /* on the desk: joined, not left yet */
  int lefts;        /* times it left (`back` with its id, `out`, a reclaim): once by the end */
  uint64_t expires; /* txclient.c's deadline_of for the ticket's expires_in_ms: no hand-off from then on */
  session_client_t *session; /* the session that took it (lp_desk_take and lp_desk_relay), until its `session` */
} join_t;

struct desk {
  int index;
  lp_desk *handle;    /* from lp_desk_open to `end` (callbacks are told apart by it) */
  int opened, closed; /* lp_desk_close was called: the handle is not used again */
  int ends;
  int room, js_waiting, stopped; /* as the harness set them */
  uint64_t wait_timeout, check_delay;
  double counts[2], waits[WAITS_CAP];
  double waits_read;  /* waits taken out of `waits` in `full` */
  int kept;           /* releases the harness saw C keep on the desk (counts[0] must agree) */
  int handed;         /* lendings C made from the desk: each records a wait */
  bytes_t reset_query; /* session mode: as lp_desk_reset_query last set it */
};

/* Where a connection of a desk is between two of txclient.c's calls to lp_conn_sink (RESET_OUT:
   its reset's reader unset: `out` (released) or `reset` is due). */
enum { LIMBO_NONE, LIMBO_RELEASED, LIMBO_IDLE, LIMBO_RESET_OUT };

typedef struct {
  int index;
  int open;               /* the slot was used */
  lp_client *k;           /* NULL before and once `end` came */
  int ends;
  int fd;                 /* the harness's end of the socket (-1 once closed) */
  int eof, shut, stopped; /* the harness's end: EOF read, FIN sent (or closed), reading shut */
  int lossy;              /* what was queued for the client may be dropped: no check that it all arrived */
  int peer_gone;          /* the harness's end went away (a FIN counts): C may end the client */
  bytes_t pending;        /* the client's bytes not yet on the socket */
  bytes_t sent;           /* on the socket, in order */
  bytes_t got;            /* what the client read */
  size_t checked;         /* how much of `got` was checked (`expected` only grows) */
  /* C's input: the engine's first bytes and the socket's, in the order C took them, materialized
     as far as C handed them on (to the engine or upstream). */
  bytes_t input;
  size_t sock_in_input;   /* socket bytes in `input` */
  size_t at;              /* bytes of `input` handed on */
  double counters[2];     /* [to upstream, to client], as C adds to them */
  double counted_up, counted_cl; /* what of them the expectations below hold */
  bytes_t expected;       /* what the client may read */
  bytes_t held;           /* the engine's: what it got in JS mode and did not consume */
  int fast, needing, paused, js_ended, js_closed;
  int input_done;         /* C reads no more of the client (its end came, or the engine's), and drops what it held */
  upstream_t *lent;       /* the connection lent to it */
  size_t lend_start;      /* where in `input` the lending's units start */
  bytes_t answers;        /* the lending's bytes for the client: the pool's unread bytes, then the sink's */
  int attaches, backs;    /* lendings (the engine's attaches and the desk's hand-offs), and their ends (`back`, or kept by the desk) */
  bytes_t named;          /* the waiting unit, when `need` said it names statements: attached as its own rewrite */
  desk_t *desk;           /* lp_client_desk's, as the harness last set it (NULL: none) */
  int sid;
} client_t;

struct upstream {
  int index;
  int open;
  lp_conn *conn;          /* NULL before and once `end` came */
  int ends;
  int handshake_ok;
  int logged_in;
  int dead;               /* the pool lends it no more: its stream ended, or a lending went wrong */
  int closed;             /* lp_conn_close was called */
  int paused;             /* the pool's reader paused it */
  int faults;             /* something was done that may lose bytes upstream */
  tls_server_t srv;
  bytes_t up_expected;    /* what the server may read: the login, the pool's writes, lendings' units */
  size_t checked;         /* how much of srv.got was checked (`up_expected` only grows) */
  size_t srv_at;          /* the server's plaintext given out: to the pool's reader or to a lending */
  size_t answered;        /* srv.got up to here was answered by the cooperating server */
  int pool_outstanding;   /* the pool's queries whose ReadyForQuery has not come */
  framer_t pool_frame;
  int pool_keeps;         /* the message the pool's reader is in goes to `unread` */
  bytes_t unread;         /* what the pool's reader got between its queries: for the next lending */
  client_t *lent_to;
  int returning;          /* the pool's reader got bytes while lent: the lending is ending, `back` is due */
  /* Seen through lp_conn_sink (see __wrap_lp_conn_sink): */
  join_t *join;           /* on a desk (lent or idle there): its ticket */
  client_t *released_by;  /* C unset the lending's reader: `back` is due, or C keeps it on the desk */
  int idle;               /* idle on the desk */
  int limbo;              /* LIMBO_*: off a lending or idle, inside C, on its way to the next */
  uint64_t idle_since;
  int spoke, idle_ended;  /* what came while idle on the desk: the `out` it must give */
  lp_sink real_sink;      /* txclient.c's reader, behind the harness's (sink_seen) */
  void *real_user;
  /* Session mode: */
  session_client_t *session; /* a session has it (taken and relayed), until its `session` */
  int resetting;          /* its session's end kept it: the reset query went, the answer is awaited */
  uint64_t reset_since;
  bytes_t reset_answer;   /* what the reset's reader got */
  int reset_ended;        /* the reset's reader got the end */
};

/* A client's session on a connection of the desk (lp_desk_take, lp_desk_relay): the harness holds the client's end. */
struct session_client {
  int index;
  int open;               /* the slot was used */
  upstream_t *u;          /* the connection, from the relay to its `session` */
  join_t *j;
  int fd;                 /* the harness's end (-1 once closed) */
  int eof, shut, stopped; /* EOF read, FIN sent (or closed), reading shut */
  bytes_t pending;        /* the client's bytes not yet on the socket */
  bytes_t stream;         /* what C may send upstream, in order: the bytes read before (`first`), then the socket's */
  size_t first_n;
  bytes_t got;            /* what the client read */
  size_t checked;
  double counters[2];     /* [to upstream, to client], as relay.c adds to them */
  double counted_up, counted_cl;
  size_t at;              /* bytes of `stream` accounted upstream */
  size_t hello_left;      /* greeting bytes counted in counters[1] not yet accounted */
  bytes_t expected;       /* what the client may read: the greeting, the server's bytes, a farewell */
  bytes_t relayed;        /* the greeting and the server's bytes, as relay.c follows them (no farewell) */
  int tolds;              /* `session` callbacks */
  int kept;               /* C set its connection's next reader as the session ended (kept on the desk) */
  int farewells;
  int write_failed;       /* the pool's reader got the connection's end inside the session's end */
};

#define CFG_PURE 0x01
#define CFG_REACT 0x02      /* callbacks react as the input says */
#define CFG_SMALL 0x04      /* the client sockets take little at a time */
#define CFG_TLS12 0x08
#define CFG_TCP_CLIENT 0x10 /* clients over TCP (a close with unread bytes resets) */
#define CFG_TCP_UP 0x20
#define CFG_END 0x40        /* at the end the engine ends its clients (FIN after what is queued), else closes them */
#define CFG_TWO 0x80        /* a second client from the start */

typedef struct {
  uv_loop_t loop;
  unsigned config;
  lp_ctx *ctx;
  client_t clients[MAX_CLIENTS];
  upstream_t ups[MAX_CONNS];
  int descriptors; /* open before the session */
  desk_t desks[MAX_DESKS];
  int desks_opened;
  desk_t *desk;    /* the open one (not closed), or NULL */
  join_t joins[MAX_JOINS];
  int joins_made;
  int join_mode;   /* the engine's tickets at an attach: 0 none, 1 the client's sid, 2 another sid, 3 sid 0 */
  int expiry_mode; /* their expires_in_ms: 0 never, 1 already, 2 a few ms */
  int close_desk_last; /* at the end the desk closes after the clients, not before */
  client_t *attaching; /* inside the engine's lp_client_attach for this client */
  upstream_t *offering; /* inside lp_desk_offer of this connection, */
  join_t *offer_join;   /* with this ticket, */
  int offer_taken;      /* which a waiting client took */
  desk_t *stopping;     /* inside lp_desk_stop(1) or lp_desk_close: `out` reclaims */
  session_client_t sessions[MAX_SESSIONS];
  upstream_t *parking;  /* inside lp_desk_park of this connection */
} session_t;

static session_t *S;

/* Callbacks react only while the script runs: the end is the same for every input. */
static int reacting(void) { return (S->config & CFG_REACT) && in_left > 0; }

/* ---------- what C handed on, against what was sent ---------- */

/* `n` bytes of C's input from `from` on (the socket's come after what `input` holds). */
static const unsigned char *input_at(client_t *c, size_t from, size_t n) {
  if (n == 0) return (const unsigned char *)"";
  while (c->input.n < from + n) {
    if (c->sock_in_input >= c->sent.n)
      fail("client %d: C handed on %zu bytes, its input holds %zu (%zu from the socket, all it sent)", c->index, from + n, c->input.n, c->sent.n);
    size_t take = from + n - c->input.n;
    if (take > c->sent.n - c->sock_in_input) take = c->sent.n - c->sock_in_input;
    put(&c->input, c->sent.d + c->sock_in_input, take);
    c->sock_in_input += take;
  }
  return c->input.d + from;
}

/* C handed `n` bytes to the engine: the next of its input. */
static void handed_to_engine(client_t *c, const unsigned char *data, size_t n, const char *how) {
  if (n == 0) return;
  const unsigned char *expected = input_at(c, c->at, n);
  for (size_t i = 0; i < n; i++)
    if (data[i] != expected[i]) fail("client %d: %s: byte %zu of %zu (input byte %zu) is 0x%02x, the client's stream has 0x%02x", c->index, how, i, n, c->at + i, data[i], expected[i]);
  c->at += n;
  put(&c->held, data, n);
}

/*
 * What C counted since the last look goes into the expectations: to upstream, the next bytes of
 * the client's input (the lent connection's server must read them in order after what it had);
 * to the client, the next bytes of the lent connection's server plaintext.
 */
static void account(client_t *c) {
  if (c->counters[0] != c->counted_up) {
    if (!c->lent) fail("client %d: %g bytes went upstream with no connection lent", c->index, c->counters[0] - c->counted_up);
    size_t n = (size_t)(c->counters[0] - c->counted_up);
    put(&c->lent->up_expected, input_at(c, c->at, n), n);
    c->at += n;
    c->counted_up = c->counters[0];
  }
  if (c->counters[1] != c->counted_cl) {
    upstream_t *u = c->lent;
    if (!u) fail("client %d: %g bytes for it counted with no connection lent", c->index, c->counters[1] - c->counted_cl);
    if (u->returning) fail("client %d: bytes of connection %d for it after the pool's reader got some", c->index, u->index);
    size_t n = (size_t)(c->counters[1] - c->counted_cl);
    if (u->srv_at + n > u->srv.sent.n) fail("client %d: %zu bytes of connection %d's for it, the server sent %zu more", c->index, n, u->index, u->srv.sent.n - u->srv_at);
    put(&c->expected, u->srv.sent.d + u->srv_at, n);
    put(&c->answers, u->srv.sent.d + u->srv_at, n);
    u->srv_at += n;
    c->counted_cl = c->counters[1];
  }
}

static void session_account(session_client_t *s);

static void account_all(void) {
  for (int i = 0; i < MAX_CLIENTS; i++)
    if (S->clients[i].open) account(&S->clients[i]);
  for (int i = 0; i < MAX_SESSIONS; i++)
    if (S->sessions[i].u) session_account(&S->sessions[i]);
}

static void check_client_bytes(client_t *c) {
  account_all();
  char what[64];
  snprintf(what, sizeof what, "client %d's bytes vs the engine's and its lendings'", c->index);
  check_prefix_from(what, &c->got, c->checked, c->got.n, &c->expected, NULL);
  c->checked = c->got.n;
}

static void check_server_bytes(upstream_t *u) {
  account_all();
  char what[64];
  snprintf(what, sizeof what, "server %d's plaintext vs what went upstream", u->index);
  check_prefix_from(what, &u->srv.got, u->checked, u->srv.got.n, &u->up_expected, NULL);
  u->checked = u->srv.got.n;
}

/* ---------- a lending's end, against its bytes ---------- */

/* What txclient.c should have learnt of a lending's answers, following them as the contract says. */
typedef struct {
  int ready;        /* ReadyForQuery messages */
  int status;       /* the first body byte of the last one that had one */
  int whole;        /* the answers end between two messages */
  int broken;       /* a length below 4, or COPY IN or BOTH: no more can be told */
  int lost;         /* ParameterStatus beyond the 64 KiB kept */
  int leaked;       /* a whole CommandComplete whose tag is of session state (txclient.c's leaky_tag) */
  bytes_t reports;  /* the ParameterStatus messages, as far as they came */
} answers_t;

/* The tags whose CommandComplete marks a lending LP_LENT_LEAKED: the word, then the tag's end or a space. */
static int leaky_tag(const unsigned char *tag, size_t n) {
  static const char *const tags[] = { "SET", "RESET", "LISTEN", "PREPARE", "LOAD", "DEALLOCATE", "DISCARD" };
  for (size_t i = 0; i < sizeof tags / sizeof tags[0]; i++) {
    size_t len = strlen(tags[i]);
    if (n > len && memcmp(tag, tags[i], len) == 0 && (tag[len] == 0 || tag[len] == ' ')) return 1;
  }
  return 0;
}

#define REPORTS_LIMIT 65536

static void read_answers(const bytes_t *b, answers_t *a) {
  memset(a, 0, sizeof *a);
  a->status = 'I';
  unsigned char header[5], tag[12];
  int have = 0, type = 0, status_due = 0;
  size_t tag_have = 0;
  uint32_t remaining = 0;
  for (size_t i = 0; i < b->n;) {
    if (have < 5) {
      header[have++] = b->d[i++];
      if (have < 5) continue;
      type = header[0];
      uint32_t len = be32(header + 1);
      if (len < 4 || type == 'G' || type == 'W') {
        a->broken = 1;
        break;
      }
      remaining = len - 4;
      status_due = type == 'Z';
      tag_have = 0;
      if (type == 'S' && !a->lost) {
        if (a->reports.n + 5 + remaining > REPORTS_LIMIT) a->lost = 1;
        else put(&a->reports, header, 5);
      }
    } else {
      size_t take = b->n - i < remaining ? b->n - i : remaining;
      if (type == 'S' && !a->lost) put(&a->reports, b->d + i, take);
      for (size_t t = 0; type == 'C' && t < take && tag_have < sizeof tag; t++) tag[tag_have++] = b->d[i + t];
      if (status_due && take > 0) {
        a->status = b->d[i];
        status_due = 0;
      }
      remaining -= (uint32_t)take;
      i += take;
    }
    if (have == 5 && remaining == 0) {
      a->ready += type == 'Z';
      a->leaked |= type == 'C' && leaky_tag(tag, tag_have);
      have = 0;
    }
  }
  a->whole = !a->broken && have == 0;
}

/* Whether `reports` is whole ParameterStatus messages, as the engine reads them. */
static int whole_reports(const unsigned char *d, size_t n) {
  size_t at = 0;
  while (at + 5 <= n && d[at] == 'S' && be32(d + at + 1) >= 4 && be32(d + at + 1) <= n - at - 1) at += 1 + be32(d + at + 1);
  return at == n;
}

/* What a lending sent upstream: whole fast units, each by the contract given what the ones before made. */
static int lending_units(client_t *c, int *made) {
  int parsed = 0, bound = 0, units = 0, uf;
  *made = 0;
  for (size_t at = c->lend_start; at < c->at;) {
    const unsigned char *unit = input_at(c, at, c->at - at);
    size_t n = unit_contract(unit, c->at - at, parsed, bound, UNIT_LIMIT, at == c->lend_start, &uf);
    if (n == 0 || n == LP_NOT_FAST) fail("client %d: the %zu bytes it sent upstream from input byte %zu on are no whole fast unit", c->index, c->at - at, at);
    *made |= unit_makes(unit, n);
    parsed = (*made & LP_LENT_PARSED) != 0;
    bound = (*made & LP_LENT_BOUND) != 0;
    units++;
    at += n;
  }
  return units;
}

static void check_lending(client_t *c, enum lp_back how, int status, int flags, int running, const unsigned char *reports, size_t reports_len,
                          const unsigned char *rest, size_t rest_len) {
  int made, uf;
  int units = lending_units(c, &made);
  if ((flags & (LP_LENT_PARSED | LP_LENT_BOUND)) != made) fail("client %d: back (%s) with flags %d, its units made %d", c->index, LP_BACK_NAMES[how], flags, made);
  answers_t a;
  read_answers(&c->answers, &a);
  if (verbose)
    fprintf(stderr, "back: client %d %s status %c flags %d running %d reports %zu rest %zu; %d units, answers %zu bytes, %d ready, whole %d broken %d\n", c->index, LP_BACK_NAMES[how],
            status > 32 && status < 127 ? status : '?', flags, running, reports_len, rest_len, units, c->answers.n, a.ready, a.whole, a.broken);
  if (how == LP_BACK_RELEASED || how == LP_BACK_HANDOVER) {
    if (a.broken) fail("client %d: %s after answers it could not follow", c->index, LP_BACK_NAMES[how]);
    if (a.ready != units || !a.whole) fail("client %d: %s with %d units sent and %d ReadyForQuery (whole %d)", c->index, LP_BACK_NAMES[how], units, a.ready, a.whole);
    if (!whole_reports(reports, reports_len)) fail("client %d: %s with reports that are not whole ParameterStatus messages (%zu bytes)", c->index, LP_BACK_NAMES[how], reports_len);
  }
  if (how == LP_BACK_RELEASED && status != 'I') fail("client %d: released with status 0x%02x", c->index, status);
  if (how != LP_BACK_UPSTREAM_GONE && !a.broken) {
    if (status != a.status) fail("client %d: %s with status 0x%02x, the last ReadyForQuery says 0x%02x", c->index, LP_BACK_NAMES[how], status, a.status);
    if (how == LP_BACK_CLIENT_GONE && running != (a.ready < units || !a.whole))
      fail("client %d: client_gone with running %d, %d units sent and %d ReadyForQuery (whole %d)", c->index, running, units, a.ready, a.whole);
    if (((flags & LP_LENT_LEAKED) != 0) != a.leaked) fail("client %d: %s with leaked %d, its answers say %d", c->index, LP_BACK_NAMES[how], (flags & LP_LENT_LEAKED) != 0, a.leaked);
    if (((flags & LP_LENT_REPORTS_LOST) != 0) != a.lost) fail("client %d: %s with reports_lost %d, expected %d", c->index, LP_BACK_NAMES[how], (flags & LP_LENT_REPORTS_LOST) != 0, a.lost);
    if (!a.lost && (reports_len != a.reports.n || (reports_len && memcmp(reports, a.reports.d, reports_len) != 0)))
      fail("client %d: %s with %zu bytes of reports, its answers held %zu", c->index, LP_BACK_NAMES[how], reports_len, a.reports.n);
  }
  if (how == LP_BACK_HANDOVER) {
    if (rest_len == 0) fail("client %d: handover with nothing to hand over", c->index);
    size_t n = unit_contract(rest, rest_len, (flags & LP_LENT_PARSED) != 0, (flags & LP_LENT_BOUND) != 0, UNIT_LIMIT, 0, &uf);
    if (n != LP_NOT_FAST) fail("client %d: handover of %zu bytes whose head the fast path carries (%zd)", c->index, rest_len, (ssize_t)n);
  } else if (rest_len != 0 || rest) {
    fail("client %d: %s with %zu bytes of rest", c->index, LP_BACK_NAMES[how], rest_len);
  }
  bytes_free(&a.reports);
}

/* ---------- the engine and the pool ---------- */

static void run_loop(int times);
static int attach(client_t *c, upstream_t *u);
static void react_client(client_t *c, const char *where);

/* Bytes the engine writes to a client: position-dependent, so a loss or a repeat shows. */
static void engine_write(client_t *c) {
  if (!c->k || c->lent) return; /* not while a connection is lent (txclient.h) */
  bytes_t b = { 0 };
  put_u8(&b, 'N');
  size_t body = in_u8();
  body = body < 200 ? body % 48 : (body - 199) * 1024; /* small, or up to 56 KiB: more than the socket takes */
  put_u32(&b, (uint32_t)(body + 4));
  put_pattern(&b, body, c->expected.n);
  account_all();
  put(&c->expected, b.d, b.n);
  long queued = lp_client_write(c->k, b.d, b.n);
  if (verbose) fprintf(stderr, "engine: write %zu bytes to client %d: %ld\n", b.n, c->index, queued);
  bytes_free(&b);
}

/* The engine gives the client to the fast path, with the bytes it holds (all, some, or none). */
static void engine_fast(client_t *c, unsigned how) {
  if (!c->k) return;
  size_t from = how % 3 == 0 ? c->held.n : how % 3 == 1 ? 0 : in_size(c->held.n);
  size_t n = c->held.n - from;
  const unsigned char *first = n ? c->held.d + from : NULL;
  account_all();
  if (c->input_done) {
    if (lp_client_fast(c->k, first ? first : (const unsigned char *)"", n) == 0) fail("client %d: lp_client_fast accepted after the client's end", c->index);
    return;
  }
  int was_fast = c->fast;
  size_t input_before = c->input.n;
  if (!was_fast) {
    /* C handed on all it read in JS mode: the engine's bytes come next, then the socket's. */
    if (c->input.n != c->at) fail("client %d: fast mode from JS mode with %zu bytes of its input not handed on", c->index, c->input.n - c->at);
    put(&c->input, first, n);
    c->fast = 1;
  }
  bytes_t copy = { 0 };
  put(&copy, first, n);
  c->held.n = 0;
  int r = lp_client_fast(c->k, copy.d ? copy.d : (const unsigned char *)"", n);
  if (verbose) fprintf(stderr, "engine: fast client %d with %zu bytes: %d\n", c->index, n, r);
  if (r != 0) {
    if (!was_fast) {
      c->fast = 0;
      c->input.n = input_before; /* refused: nothing was taken, and nothing was called */
    }
    put(&c->held, copy.d, copy.n);
  } else if (was_fast) {
    fail("client %d: lp_client_fast accepted in fast mode", c->index);
  }
  bytes_free(&copy);
}

/* The engine takes the client back from the fast path (no connection for it, say). */
static void engine_js(client_t *c) {
  if (!c->k) return;
  account_all();
  size_t n = 0;
  const unsigned char *rest = lp_client_js(c->k, &n);
  if (verbose) fprintf(stderr, "engine: js client %d: %zu bytes\n", c->index, n);
  if (c->fast && !c->lent && !c->js_closed) {
    c->fast = 0;
    c->needing = 0;
    handed_to_engine(c, rest, n, "lp_client_js");
  } else if (n != 0) {
    fail("client %d: lp_client_js handed %zu bytes (fast %d, lent %d)", c->index, n, c->fast, c->lent != NULL);
  }
}

static void engine_end(client_t *c) {
  if (!c->k) return;
  if (verbose) fprintf(stderr, "engine: end client %d\n", c->index);
  c->js_ended = c->input_done = 1;
  lp_client_end(c->k); /* a lent connection comes back first, with the client still in fast mode */
  c->fast = c->needing = 0;
}

static void engine_close(client_t *c) {
  if (!c->k) return;
  if (verbose) fprintf(stderr, "engine: close client %d\n", c->index);
  c->js_closed = c->lossy = c->input_done = 1;
  c->fast = c->needing = 0;
  lp_client_close(c->k);
  c->desk = NULL; /* it let go of the desk as it closed */
}

/* The pool has the connection: not lent, not on a desk (whose connections are C's until they leave it). */
static int pool_holds(const upstream_t *u) { return u->conn && !u->lent_to && !u->join; }

/* A connection the pool can lend now: logged in, idle for the pool, not lent, not going. */
static upstream_t *idle_upstream(void) {
  for (int i = 0; i < MAX_CONNS; i++) {
    upstream_t *u = &S->ups[i];
    if (pool_holds(u) && u->logged_in && !u->dead && u->pool_outstanding == 0) return u;
  }
  return NULL;
}

/* The pool writes a query of its own (a ROLLBACK after a lending left a transaction, say). */
static void pool_query(upstream_t *u, const char *text) {
  if (!pool_holds(u) || u->closed) return;
  bytes_t q = { 0 };
  put_u8(&q, 'Q');
  put_u32(&q, (uint32_t)(strlen(text) + 5));
  put(&q, text, strlen(text) + 1);
  account_all();
  put(&u->up_expected, q.d, q.n); /* before: a write that fails may have sent some */
  if (lp_conn_write(u->conn, q.d, q.n) >= 0) u->pool_outstanding++;
  bytes_free(&q);
}

static void pool_close(upstream_t *u) {
  if (!u->conn || u->closed) return;
  if (u->lent_to) fail("the harness closes connection %d while it is lent", u->index);
  if (u->join) fail("the harness closes connection %d while it is on desk %d", u->index, u->join->desk->index);
  if (verbose) fprintf(stderr, "pool: close connection %d\n", u->index);
  u->closed = u->dead = 1;
  lp_conn_close(u->conn, LP_END_SHUTDOWN);
}

/* ---------- the desk ---------- */

static client_t *pick_client(unsigned which);

static client_t *client_of_handle(const void *k) {
  for (int i = 0; i < MAX_CLIENTS; i++)
    if (k && S->clients[i].k == k) return &S->clients[i];
  return NULL;
}

static upstream_t *upstream_of_conn(const lp_conn *conn) {
  for (int i = 0; i < MAX_CONNS; i++)
    if (conn && S->ups[i].conn == conn) return &S->ups[i];
  fail("txclient.c set the reader of a connection the harness does not know");
}

static uint64_t now_ms(void) { return uv_now(&S->loop); }

/* A ticket for `u` on `k` in settings `sid`, its expiry as the session's mode says (NULL: no tickets left). */
static join_t *join_new(upstream_t *u, desk_t *k, int sid, lp_desk_join *ticket) {
  if (S->joins_made >= MAX_JOINS) return NULL;
  join_t *j = &S->joins[S->joins_made++];
  memset(j, 0, sizeof *j);
  j->id = S->joins_made;
  j->sid = sid;
  j->desk = k;
  j->up = u->index;
  double in_ms = S->expiry_mode == 0 ? 1e300 : S->expiry_mode == 1 ? 0 : (double)(1 + j->id % 8);
  /* As txclient.c's deadline_of: no expiry, already expired, or this many ms from the loop's now. */
  j->expires = !(in_ms < 1e15) ? UINT64_MAX : in_ms <= 0 ? 0 : now_ms() + (uint64_t)in_ms;
  ticket->id = j->id;
  ticket->sid = sid;
  ticket->expires_in_ms = in_ms;
  return j;
}

static void join_on(upstream_t *u, join_t *j) {
  if (u->join) fail("connection %d joins desk %d (ticket %d) while on desk %d (ticket %d)", u->index, j->desk->index, j->id, u->join->desk->index, u->join->id);
  j->made = j->on = 1;
  u->join = j;
}

/* The connection left its desk (`back` with its id, `out`, a reclaim): the pool's again. */
static void join_off(upstream_t *u, const char *how) {
  join_t *j = u->join;
  if (!j || !j->on) fail("connection %d left a desk by %s, it was on none", u->index, how);
  if (verbose) fprintf(stderr, "desk %d: connection %d (ticket %d) leaves by %s\n", j->desk->index, u->index, j->id, how);
  j->on = 0;
  j->lefts++;
  u->join = NULL;
  u->idle = 0;
  u->limbo = LIMBO_NONE;
}

static join_t *join_of_id(desk_t *k, int id) {
  if (id < 1 || id > S->joins_made) return NULL;
  join_t *j = &S->joins[id - 1];
  return j->desk == k ? j : NULL;
}

/* The client's lending is over without `back`: C kept its connection on the desk. */
static void lending_over(client_t *c, upstream_t *u) {
  c->backs++;
  c->lent = NULL;
  u->lent_to = NULL;
  u->returning = 0;
  c->answers.n = 0;
}

/*
 * C unset the lending's reader with no `back` to follow: it kept the connection on the desk, for
 * the next client or idle there. Only after a clean transaction: every unit answered, idle, no
 * ParameterStatus, no tag of session state; the desk not stopped, no client of the pool waiting,
 * the ticket not expired.
 */
static void kept_on_desk(upstream_t *u) {
  client_t *c = u->released_by;
  join_t *j = u->join;
  u->released_by = NULL;
  if (!j) fail("connection %d: its lending to client %d ended with no `back`, and it is on no desk", u->index, c->index);
  desk_t *k = j->desk;
  if (c->lent != u) fail("connection %d kept on desk %d after client %d, which it was not lent to", u->index, k->index, c->index);
  if (k->stopped) fail("desk %d: connection %d kept after the desk was stopped", k->index, u->index);
  if (k->js_waiting) fail("desk %d: connection %d kept while the pool's clients wait (js_waiting)", k->index, u->index);
  if (now_ms() >= j->expires) fail("desk %d: connection %d kept past its ticket's expiry", k->index, u->index);
  if (u->returning) fail("desk %d: connection %d kept after the pool's reader got its bytes (they are lost to the next client)", k->index, u->index);
  if (!lp_conn_lendable(u->conn)) fail("desk %d: connection %d kept, not lendable", k->index, u->index);
  int made;
  int units = lending_units(c, &made);
  answers_t a;
  read_answers(&c->answers, &a);
  const char *dirty = a.broken ? "answers it could not follow" : !a.whole ? "an answer cut short" : units == 0 ? "nothing sent" : a.ready != units ? "a unit unanswered"
                      : a.status != 'I' ? "a transaction open" : a.reports.n > 0 ? "a ParameterStatus" : a.lost ? "ParameterStatus lost" : a.leaked ? "a tag of session state" : NULL;
  bytes_free(&a.reports);
  if (dirty)
    fail("desk %d: connection %d kept after client %d's lending (%d units, %d ReadyForQuery, status %c) with %s", k->index, u->index, c->index, units, a.ready,
         a.status > 32 && a.status < 127 ? a.status : '?', dirty);
  if (verbose) fprintf(stderr, "desk %d: connection %d kept after client %d's %d units\n", k->index, u->index, c->index, units);
  k->kept++;
  lending_over(c, u);
  u->limbo = LIMBO_RELEASED;
}

/* C lent `u` to `c`: the engine's attach (set up already), or a hand-off of the desk's, checked here. */
static void lent_by_c(upstream_t *u, client_t *c) {
  if (S->attaching == c && c->lent == u && u->lent_to == c) return;
  if (u->lent_to) fail("connection %d lent to client %d while lent to client %d", u->index, c->index, u->lent_to->index);
  if (c->lent) fail("client %d lent connection %d while connection %d is lent to it", c->index, u->index, c->lent->index);
  account(c);
  int offered = S->offering == u && !u->join;
  if (offered) {
    join_on(u, S->offer_join);
    S->offer_taken = 1;
  } else if (!u->join) {
    fail("connection %d lent to client %d by C, neither attached nor on a desk", u->index, c->index);
  } else if (u->limbo == LIMBO_NONE) {
    fail("connection %d lent to client %d from desk %d, neither idle nor just released", u->index, c->index, u->join->desk->index);
  }
  join_t *j = u->join;
  desk_t *k = j->desk;
  uint64_t now = now_ms();
  if (k->stopped) fail("desk %d: connection %d handed to client %d after the desk was stopped", k->index, u->index, c->index);
  if (c->desk != k) fail("desk %d: connection %d handed to client %d, which is %s", k->index, u->index, c->index, c->desk ? "on another desk" : "on no desk");
  if (j->sid != c->sid) fail("desk %d: connection %d (sid %d) handed to client %d of sid %d", k->index, u->index, j->sid, c->index, c->sid);
  if (j->sid == 0) fail("desk %d: connection %d of sid 0 (which matches nothing) handed to client %d", k->index, u->index, c->index);
  /* An offer, or a park, hands on what the caller just gave (pool.ts checks the expiry before either). */
  if (!offered && S->parking != u && now >= j->expires) fail("desk %d: connection %d handed to client %d past its ticket's expiry", k->index, u->index, c->index);
  if (u->limbo == LIMBO_IDLE && now - u->idle_since >= k->check_delay)
    fail("desk %d: connection %d handed to client %d after %llu ms idle (check delay %llu)", k->index, u->index, c->index, (unsigned long long)(now - u->idle_since),
         (unsigned long long)k->check_delay);
  if (c->needing) fail("desk %d: connection %d handed to client %d, which waits for the pool's (need)", k->index, u->index, c->index);
  if (!c->fast) fail("desk %d: connection %d handed to client %d in JS mode", k->index, u->index, c->index);
  if (u->unread.n) fail("desk %d: connection %d handed on with %zu bytes its pool's reader kept", k->index, u->index, u->unread.n);
  if (verbose) fprintf(stderr, "desk %d: connection %d (ticket %d) to client %d (%s)\n", k->index, u->index, j->id, c->index, offered ? "offered" : u->limbo == LIMBO_IDLE ? "idle" : "released");
  u->limbo = LIMBO_NONE;
  u->idle = 0;
  k->handed++;
  c->lent = u;
  u->lent_to = c;
  c->lend_start = c->at;
  c->answers.n = 0;
  c->attaches++;
}

static int session_kept(upstream_t *u, client_t *c);
static void reset_clean(upstream_t *u);
static void reset_read(upstream_t *u, lp_conn *conn, lp_sink sink, void *real_user, const unsigned char *data, size_t n, const char *error);
static int reset_verdict(const unsigned char *p, size_t n);
static void from_session_desk(upstream_t *u, int clean, int sid);
static void on_desk_session(lp_desk *d, void *user, int id, enum lp_session how, enum lp_end end, double to_upstream, double to_client, int reusable, int status,
                            int abandoned);
static size_t on_desk_farewell(lp_desk *d, void *user, int id, const char *reason, unsigned char *out, size_t cap);
static void on_desk_reset(lp_desk *d, void *user, int id, const unsigned char *answer, size_t n);
enum { RESET_PENDING, RESET_PLAIN, RESET_DIRTY };

/* The harness's reader in front of txclient.c's: what an idle connection of a desk says is swallowed (`out` follows). */
static void sink_seen(lp_conn *conn, void *user, const unsigned char *data, size_t n, const char *error) {
  upstream_t *u = user;
  lp_sink sink = u->real_sink;
  void *real_user = u->real_user;
  if (u->resetting) {
    reset_read(u, conn, sink, real_user, data, n, error);
    return;
  }
  if (u->idle) {
    if (!data) {
      u->idle_ended = 1;
    } else if (n > 0) {
      if (u->srv_at + n > u->srv.sent.n || memcmp(data, u->srv.sent.d + u->srv_at, n) != 0)
        fail("connection %d: %zu bytes for its idle reader on the desk are not the server's plaintext from byte %zu on", u->index, n, u->srv_at);
      u->srv_at += n;
      u->spoke = 1;
    }
  } else {
    client_t *c = client_of_handle(real_user);
    if (!c || c->lent != u) fail("connection %d: bytes for a lending the harness does not know", u->index);
  }
  sink(conn, real_user, data, n, error);
}

void __real_lp_conn_sink(lp_conn *c, lp_sink sink, void *user);

/*
 * Between txclient.c and relay.c (the target is linked with --wrap=lp_conn_sink): every lending,
 * its end, and every stay idle on a desk go through here, also those C makes with no callback to
 * tell (a desk's hand-offs). The model follows them, and checks each.
 */
void __wrap_lp_conn_sink(lp_conn *conn, lp_sink sink, void *user) {
  upstream_t *u = upstream_of_conn(conn);
  if (!sink) {
    if (u->session) fail("connection %d: its reader unset during a session", u->index);
    if (u->resetting) {
      u->resetting = 0;
      u->limbo = LIMBO_RESET_OUT;
    } else if (u->lent_to) {
      account(u->lent_to); /* what was counted so far is this lending's */
      if (u->released_by) fail("connection %d: its lending's reader unset twice", u->index);
      u->released_by = u->lent_to;
    } else if (u->idle) {
      u->idle = 0;
      u->limbo = LIMBO_IDLE;
    } else {
      fail("connection %d: its reader unset, it was neither lent nor idle on a desk nor resetting", u->index);
    }
    u->real_sink = NULL;
    __real_lp_conn_sink(conn, NULL, NULL);
    return;
  }
  client_t *c = client_of_handle(user);
  if (u->session) {
    /* The session ended and C keeps the connection: the reset's reader, or idle or lent at once. */
    if (session_kept(u, c)) {
      u->real_sink = sink;
      u->real_user = user;
      __real_lp_conn_sink(conn, sink_seen, u);
      return;
    }
  } else if (u->resetting) {
    reset_clean(u);
  }
  if (u->released_by) kept_on_desk(u);
  if (c) {
    lent_by_c(u, c);
  } else {
    if (u->limbo != LIMBO_RELEASED) fail("connection %d idle on a desk with no clean release before", u->index);
    u->limbo = LIMBO_NONE;
    u->idle = 1;
    u->idle_since = now_ms();
    u->spoke = u->idle_ended = 0;
    if (verbose) fprintf(stderr, "desk %d: connection %d idle\n", u->join->desk->index, u->index);
  }
  u->real_sink = sink;
  u->real_user = user;
  __real_lp_conn_sink(conn, sink_seen, u);
}

/* lp_desk_stats and lp_desk_idle_ms against the model; counts[0] and the waits against what the harness saw. */
static void desk_check(desk_t *k) {
  if (!k || !k->handle || k->closed) return;
  int idle, count, waiting, resetting;
  double max_wait;
  lp_desk_stats(k->handle, &idle, &count, &waiting, &max_wait, &resetting);
  int on = 0, idle_here = 0, may_wait = 0, resetting_here = 0;
  uint64_t now = now_ms();
  for (int i = 0; i < S->joins_made; i++) {
    join_t *j = &S->joins[i];
    if (j->desk != k || !j->on) continue;
    upstream_t *u = &S->ups[j->up];
    on++;
    idle_here += u->idle;
    resetting_here += u->resetting;
    double idle_ms = lp_desk_idle_ms(k->handle, j->id);
    double expected = u->idle ? (double)(now - u->idle_since) : -1;
    if (idle_ms != expected) fail("desk %d: lp_desk_idle_ms of connection %d (ticket %d) is %g, the model says %g", k->index, u->index, j->id, idle_ms, expected);
  }
  for (int i = 0; i < MAX_CLIENTS; i++) {
    client_t *c = &S->clients[i];
    may_wait += c->k && c->desk == k && c->fast && !c->lent && !c->needing;
  }
  if (count != on) fail("desk %d: lp_desk_stats counts %d connections, %d joined and did not leave", k->index, count, on);
  if (idle != idle_here) fail("desk %d: lp_desk_stats counts %d idle, the model %d", k->index, idle, idle_here);
  if (resetting != resetting_here) fail("desk %d: lp_desk_stats counts %d resetting, the model %d", k->index, resetting, resetting_here);
  if (waiting < 0 || waiting > may_wait) fail("desk %d: %d clients waiting, %d could", k->index, waiting, may_wait);
  if (max_wait < 0 || (waiting == 0 && max_wait != 0)) fail("desk %d: max wait %g ms with %d waiting", k->index, max_wait, waiting);
  if (k->counts[0] != k->kept) fail("desk %d: counts[0] says %g transactions released on the desk, the harness saw %d", k->index, k->counts[0], k->kept);
  if (k->waits_read + k->counts[1] != k->handed) fail("desk %d: %g waits recorded, the desk handed %d connections", k->index, k->waits_read + k->counts[1], k->handed);
}

static desk_t *desk_of(lp_desk *d, void *user, const char *callback) {
  desk_t *k = user;
  if (!k || k < S->desks || k >= S->desks + MAX_DESKS) fail("desk %s: wrong user pointer", callback);
  if (k->ends) fail("desk %d: %s after its end", k->index, callback);
  if (k->handle != d) fail("desk %d: %s with another desk", k->index, callback);
  return k;
}

static void on_desk_out(lp_desk *d, void *user, int id, enum lp_desk_out why) {
  desk_t *k = desk_of(d, user, "out");
  join_t *j = join_of_id(k, id);
  if (!j || !j->on) fail("desk %d: out of ticket %d, which is not on it", k->index, id);
  upstream_t *u = &S->ups[j->up];
  if (why == LP_DESK_RELEASED ? u->limbo != LIMBO_RESET_OUT : u->limbo != LIMBO_IDLE)
    fail("desk %d: out (%d) of connection %d, which was not %s there", k->index, (int)why, u->index, why == LP_DESK_RELEASED ? "resetting" : "idle");
  uint64_t now = now_ms();
  switch (why) {
    case LP_DESK_RELEASED: {
      int verdict = reset_verdict(u->reset_answer.d, u->reset_answer.n);
      if (verdict != RESET_PLAIN) fail("desk %d: connection %d out (released) after a reset answered %s", k->index, u->index, verdict == RESET_PENDING ? "in part" : "not plainly");
      if (!k->stopped && !k->js_waiting && now < j->expires && lp_conn_lendable(u->conn))
        fail("desk %d: connection %d out (released) after a plain reset, the desk going on, no client of the pool waiting, not expired", k->index, u->index);
      break;
    }
    case LP_DESK_RECLAIMED: if (S->stopping != k) fail("desk %d: connection %d out (reclaimed), the desk was not being stopped", k->index, u->index); break;
    case LP_DESK_SPOKE: if (!u->spoke) fail("desk %d: connection %d out (spoke), its server sent nothing", k->index, u->index); break;
    case LP_DESK_ENDED: if (!u->idle_ended) fail("desk %d: connection %d out (ended), its stream did not end", k->index, u->index); break;
    case LP_DESK_STALE:
      if (now < j->expires && now - u->idle_since < k->check_delay && lp_conn_lendable(u->conn))
        fail("desk %d: connection %d out (stale) after %llu ms idle, not expired, lendable", k->index, u->index, (unsigned long long)(now - u->idle_since));
      break;
    default: fail("desk %d: out %d", k->index, (int)why);
  }
  static const char *const names[] = { "", "out (ended)", "out (spoke)", "out (stale)", "out (reclaimed)", "out (released)" };
  join_off(u, names[why]);
  if (why == LP_DESK_RELEASED) { /* clean after its session: the pool's idle connection (or parked again, pool.ts #idleOrHandOff) */
    from_session_desk(u, 1, j->sid);
    return;
  }
  /* What it said was swallowed: the pool closes it, as it closes one that ended; a stale one it checks, here: closes, or keeps. */
  if (why == LP_DESK_SPOKE || why == LP_DESK_ENDED || (why == LP_DESK_STALE && reacting() && (in_u8() & 1))) {
    u->dead = 1;
    pool_close(u);
  }
}

static void on_desk_full(lp_desk *d, void *user) {
  desk_t *k = desk_of(d, user, "full");
  size_t n = (size_t)k->counts[1];
  if (n > WAITS_CAP) fail("desk %d: %zu waits in %d places", k->index, n, WAITS_CAP);
  for (size_t i = 0; i < n; i++)
    if (!(k->waits[i] >= 0 && k->waits[i] < 60)) fail("desk %d: a wait of %g s", k->index, k->waits[i]);
  k->waits_read += (double)n;
  k->counts[1] = 0;
}

static void on_desk_end(lp_desk *d, void *user) {
  desk_t *k = desk_of(d, user, "end");
  if (verbose) fprintf(stderr, "desk %d: end\n", k->index);
  if (!k->closed) fail("desk %d: end before lp_desk_close", k->index);
  for (int i = 0; i < S->joins_made; i++)
    if (S->joins[i].desk == k && S->joins[i].on) fail("desk %d: end with connection %d (ticket %d) on it", k->index, S->joins[i].up, S->joins[i].id);
  /* A client still on it holds a reference (a client torn down let go before its `end`): freed early, ASan says so. */
  k->ends++;
  k->handle = NULL;
}

static const lp_desk_callbacks desk_callbacks = { on_desk_out, on_desk_full, on_desk_end, on_desk_session, on_desk_farewell, on_desk_reset };

/* The desk's wait timer: the harness's turns of the loop leave it running (they stop the clients' linger timers). */
static int desk_timer(uv_handle_t *timer) {
  void *data = uv_handle_get_data(timer);
  for (int i = 0; i < MAX_DESKS; i++)
    if (data && S->desks[i].handle == data) return 1;
  return 0;
}

/* The engine puts the client on a desk with settings `sid`, or takes it off (k NULL). */
static void desk_client(client_t *c, desk_t *k, int sid) {
  if (!c->k) return;
  if (verbose) fprintf(stderr, "engine: client %d on desk %d, sid %d\n", c->index, k ? k->index : -1, sid);
  lp_client_desk(c->k, k ? k->handle : NULL, sid); /* a client that waited there gets `need` (with the model's desk still) */
  if (!c->k) return;
  c->desk = k;
  c->sid = sid;
}

/* Wait timeouts and check delays in ms: a few, so inputs stay fast (the check delays: stale at once, soon, or not in a run). */
static const uint64_t WAIT_MS[] = { 1, 3, 0, 8 };
static const uint64_t CHECK_MS[] = { 100000, 4, 0, 30 };

static void desk_config(desk_t *k, unsigned param) {
  k->wait_timeout = WAIT_MS[param & 3];
  k->check_delay = CHECK_MS[(param >> 2) & 3];
  lp_desk_config(k->handle, (double)k->wait_timeout, (double)k->check_delay);
}

static void desk_reset_query(desk_t *k, unsigned kind);

static void desk_open(unsigned param) {
  if (S->desk || S->desks_opened >= MAX_DESKS) return;
  desk_t *k = &S->desks[S->desks_opened];
  memset(k, 0, sizeof *k);
  k->index = S->desks_opened++;
  k->handle = lp_desk_open(&S->loop, &desk_callbacks, k, k->counts, k->waits, WAITS_CAP);
  if (!k->handle) fail("lp_desk_open");
  k->opened = 1;
  S->desk = k;
  S->join_mode = 1;
  S->expiry_mode = 0;
  desk_config(k, param);
  desk_reset_query(k, 0); /* pool.ts's default ServerResetQuery */
  if (verbose) fprintf(stderr, "desk %d: open (wait timeout %llu ms, check delay %llu ms)\n", k->index, (unsigned long long)k->wait_timeout, (unsigned long long)k->check_delay);
  /* Every client on it, in settings 1: the engine's clients of one pool are mostly alike. */
  for (int i = 0; i < MAX_CLIENTS; i++) desk_client(&S->clients[i], k, 1);
}

static void desk_stop(desk_t *k, int stopped) {
  if (verbose) fprintf(stderr, "desk %d: %s\n", k->index, stopped ? "stop" : "go on");
  desk_t *was = S->stopping;
  k->stopped = stopped;
  if (stopped) S->stopping = k;
  lp_desk_stop(k->handle, stopped);
  S->stopping = was;
  if (!stopped || !k->handle) return;
  int idle, count, waiting, resetting;
  double max_wait;
  lp_desk_stats(k->handle, &idle, &count, &waiting, &max_wait, &resetting);
  if (idle || waiting) fail("desk %d: stopped with %d idle, %d waiting", k->index, idle, waiting);
}

/* For good: the waiting clients go to `need`, the idle connections out (reclaimed); `end` once nothing refers to it. */
static void desk_close(desk_t *k) {
  if (!k || k->closed) return;
  if (verbose) fprintf(stderr, "desk %d: close\n", k->index);
  desk_check(k);
  desk_t *was = S->stopping;
  k->stopped = k->closed = 1;
  if (S->desk == k) S->desk = NULL;
  S->stopping = k;
  lp_desk_close(k->handle);
  S->stopping = was;
}

/* The pool offers a connection it holds to the first client waiting on the desk with `sid`. */
static void desk_offer(desk_t *k, upstream_t *u, int sid) {
  if (!pool_holds(u) || !u->logged_in || u->dead || u->pool_outstanding > 0 || u->unread.n > 0) return;
  if (u->paused) { /* lent unpaused (NativeUpstream.lend); what OpenSSL held goes to the pool's reader first */
    u->paused = 0;
    lp_conn_pause(u->conn, 0);
    if (!pool_holds(u) || u->dead || u->pool_outstanding > 0 || u->unread.n > 0) return;
  }
  lp_desk_join ticket;
  join_t *j = join_new(u, k, sid, &ticket);
  if (!j) return;
  account_all();
  upstream_t *was_u = S->offering;
  join_t *was_j = S->offer_join;
  int was_taken = S->offer_taken;
  S->offering = u;
  S->offer_join = j;
  S->offer_taken = 0;
  int r = lp_desk_offer(k->handle, u->conn, &ticket);
  int taken = S->offer_taken;
  S->offering = was_u;
  S->offer_join = was_j;
  S->offer_taken = was_taken;
  if (verbose) fprintf(stderr, "pool: offer connection %d (ticket %d, sid %d) to desk %d: %d\n", u->index, j->id, sid, k->index, r);
  if (r != taken) fail("desk %d: lp_desk_offer returned %d, a client %s it", k->index, r, taken ? "took" : "did not take");
}

/* The pool takes an idle connection back from the desk: the one named, or the most recently used. */
static void desk_reclaim(desk_t *k, unsigned which, int any) {
  if (any) {
    upstream_t *best = NULL;
    int was_idle[MAX_CONNS];
    for (int i = 0; i < MAX_CONNS; i++) {
      upstream_t *u = &S->ups[i];
      was_idle[i] = u->idle && u->join && u->join->desk == k;
      if (was_idle[i] && (!best || u->idle_since > best->idle_since)) best = u;
    }
    double idle_ms = -1;
    int id = lp_desk_reclaim_any(k->handle, &idle_ms);
    if (verbose) fprintf(stderr, "pool: reclaim any from desk %d: ticket %d\n", k->index, id);
    if (!best) {
      if (id != 0) fail("desk %d: lp_desk_reclaim_any gave ticket %d, none is idle", k->index, id);
      return;
    }
    join_t *j = join_of_id(k, id);
    upstream_t *u = j ? &S->ups[j->up] : NULL;
    if (!u || !was_idle[u->index] || u->join != j || u->limbo != LIMBO_IDLE) fail("desk %d: lp_desk_reclaim_any gave ticket %d, not an idle one", k->index, id);
    if (u->idle_since != best->idle_since) fail("desk %d: lp_desk_reclaim_any gave connection %d, not the most recently used", k->index, u->index);
    if (idle_ms != (double)(now_ms() - u->idle_since)) fail("desk %d: reclaimed connection %d idle %g ms, the model says %llu", k->index, u->index, idle_ms, (unsigned long long)(now_ms() - u->idle_since));
    join_off(u, "lp_desk_reclaim_any");
    return;
  }
  /* The ticket: one of those of the session (on this desk or not, idle or not), or one never given. */
  int id = S->joins_made ? (int)(which % (unsigned)(S->joins_made + 1)) + 1 : 1;
  join_t *j = join_of_id(k, id);
  upstream_t *u = j && j->on ? &S->ups[j->up] : NULL;
  int expected = u && u->idle;
  int r = lp_desk_reclaim(k->handle, id);
  if (verbose) fprintf(stderr, "pool: reclaim ticket %d from desk %d: %d\n", id, k->index, r);
  if (r != expected) fail("desk %d: lp_desk_reclaim of ticket %d returned %d, the model says %d", k->index, id, r, expected);
  if (r && u->limbo != LIMBO_IDLE) fail("desk %d: connection %d reclaimed, its reader was not unset", k->index, u->index);
  if (r) join_off(u, "lp_desk_reclaim");
}

/* ---------- session mode on the desk ---------- */

static void make_client_bytes(size_t salt, bytes_t *out);
static void srv_read(upstream_t *u, size_t max);
static void desk_park(desk_t *k, upstream_t *u, int sid);

/* txclient.c's: a reset's answer longer than this is not plain. */
#define RESET_ANSWER_LIMIT 65536

/*
 * What a reset's answer decides, by the contract (txclient.h): plain once it is CommandComplete
 * messages (one or more) and a ReadyForQuery idle, with nothing else and nothing after; not plain
 * at its ReadyForQuery when anything else came (the caller reads it then), at a length below 4, or
 * beyond what txclient.c keeps; else its rest is still to come.
 */
static int reset_verdict(const unsigned char *p, size_t n) {
  if (n > RESET_ANSWER_LIMIT) return RESET_DIRTY;
  int plain = 1, completes = 0;
  for (size_t at = 0; n - at >= 5;) {
    uint32_t len = be32(p + at + 1);
    if (len < 4) return RESET_DIRTY;
    if (n - at - 1 < len) return RESET_PENDING;
    int type = p[at];
    at += 1 + (size_t)len;
    if (type == 'Z') return plain && completes > 0 && len == 5 && p[at - 1] == 'I' && at == n ? RESET_PLAIN : RESET_DIRTY;
    if (type == 'C') completes++;
    else plain = 0;
  }
  return RESET_PENDING;
}

/* pool.ts's readAnswer: ok when the answer ends at its first ReadyForQuery, idle, with no ErrorResponse before. */
static int answer_ok(const unsigned char *p, size_t n) {
  int ok = 1;
  for (size_t at = 0; at + 5 <= n;) {
    size_t end = at + 1 + (size_t)be32(p + at + 1);
    if (end > n || end < at + 5) return 0;
    if (p[at] == 'E') ok = 0;
    else if (p[at] == 'Z') return ok && end == n && end > at + 5 && p[at + 5] == 'I';
    at = end;
  }
  return 0;
}

/*
 * A stream of messages as relay.c's boundaries follow it: whether it ends between two, the last
 * type and ReadyForQuery status (unknown after one whose length is not 5: relay.c takes the byte
 * its reads put last), Terminates in it.
 */
typedef struct {
  int whole, broken, last_type, last_status, status_unknown, terminates;
} follow_t;

static follow_t follow(const unsigned char *d, size_t n) {
  follow_t f = { 1, 0, 'Z', 'I', 0, 0 }; /* lp_conn_relay starts at the upstream's ReadyForQuery, idle */
  for (size_t at = 0; at < n;) {
    uint32_t len = n - at >= 5 ? be32(d + at + 1) : 0;
    if (n - at >= 5 && (len < 4 || len > INT32_MAX)) {
      f.broken = 1;
      f.whole = 0;
      break;
    }
    if (n - at < 5 || n - at - 1 < len) {
      f.whole = 0;
      break;
    }
    if (d[at] == 'Z' && len == 5) f.last_status = d[at + 5];
    if (d[at] == 'Z') f.status_unknown = len != 5;
    f.terminates += d[at] == 'X';
    f.last_type = d[at];
    at += 1 + (size_t)len;
  }
  return f;
}

/*
 * What relay.c counted for a session since the last look goes into the expectations: upstream, the
 * next bytes of the client's stream; for the client, the rest of the greeting, then the next bytes
 * of the server's plaintext.
 */
static void session_account(session_client_t *s) {
  upstream_t *u = s->u;
  if (s->counters[0] != s->counted_up) {
    if (!u) fail("session %d: %g bytes went upstream after its end", s->index, s->counters[0] - s->counted_up);
    size_t n = (size_t)(s->counters[0] - s->counted_up);
    if (s->at + n > s->stream.n) fail("session %d: %zu bytes of it went upstream, its client sent %zu", s->index, s->at + n, s->stream.n);
    put(&u->up_expected, s->stream.d + s->at, n);
    s->at += n;
    s->counted_up = s->counters[0];
  }
  if (s->counters[1] != s->counted_cl) {
    if (!u) fail("session %d: %g bytes for its client after its end", s->index, s->counters[1] - s->counted_cl);
    size_t n = (size_t)(s->counters[1] - s->counted_cl);
    size_t hello = n < s->hello_left ? n : s->hello_left;
    s->hello_left -= hello;
    n -= hello;
    if (u->srv_at + n > u->srv.sent.n) fail("session %d: %zu bytes of connection %d's for its client, the server sent %zu more", s->index, n, u->index, u->srv.sent.n - u->srv_at);
    put(&s->expected, u->srv.sent.d + u->srv_at, n);
    put(&s->relayed, u->srv.sent.d + u->srv_at, n);
    u->srv_at += n;
    s->counted_cl = s->counters[1];
  }
}

static void check_session_bytes(session_client_t *s) {
  account_all();
  char what[64];
  snprintf(what, sizeof what, "session %d's client's bytes vs its greeting and server's", s->index);
  check_prefix_from(what, &s->got, s->checked, s->got.n, &s->expected, NULL);
  s->checked = s->got.n;
}

static session_client_t *session_of_id(desk_t *k, int id, const char *callback) {
  join_t *j = join_of_id(k, id);
  if (!j || !j->session) fail("desk %d: %s for ticket %d, which no session took", k->index, callback, id);
  if (j->session->u != &S->ups[j->up] || S->ups[j->up].session != j->session) fail("desk %d: %s for ticket %d, whose session is over", k->index, callback, id);
  return j->session;
}

/* Whether the desk keeps a connection at a session's end or a reset's (the client's part aside): going on, none of the pool's clients waiting, not expired. */
static const char *desk_refuses(const desk_t *k, const join_t *j) {
  return k->stopped ? "the desk is stopped" : k->js_waiting ? "the pool's clients wait" : now_ms() >= j->expires ? "its ticket expired" : NULL;
}

/* The session's connection got its next reader from C as the session ended: kept on the desk. Returns whether its reset runs. */
static int session_kept(upstream_t *u, client_t *c) {
  session_client_t *s = u->session;
  join_t *j = u->join;
  if (!j || s->j != j) fail("connection %d: a reader set at its session's end, off the desk", u->index);
  desk_t *k = j->desk;
  session_account(s);
  if (s->kept++) fail("session %d: its connection kept twice", s->index);
  const char *refused = desk_refuses(k, j);
  if (refused) fail("desk %d: connection %d kept after session %d though %s", k->index, u->index, s->index, refused);
  if (!lp_conn_lendable(u->conn)) fail("desk %d: connection %d kept after session %d, not lendable", k->index, u->index, s->index);
  if (k->reset_query.n == 0) {
    u->limbo = LIMBO_RELEASED; /* idle, or the desk's next client, at once */
    return 0;
  }
  if (c) fail("desk %d: connection %d lent to client %d before its reset", k->index, u->index, c->index);
  put(&u->up_expected, k->reset_query.d, k->reset_query.n); /* the next the server reads */
  u->resetting = 1;
  u->reset_since = now_ms();
  u->reset_answer.n = 0;
  u->reset_ended = 0;
  if (verbose) fprintf(stderr, "desk %d: connection %d resets after session %d\n", k->index, u->index, s->index);
  return 1;
}

/* C parked the connection after its reset (idle, or the desk's next client): only after a plain answer, when the desk keeps it. */
static void reset_clean(upstream_t *u) {
  join_t *j = u->join;
  desk_t *k = j->desk;
  int verdict = reset_verdict(u->reset_answer.d, u->reset_answer.n);
  if (verdict != RESET_PLAIN)
    fail("desk %d: connection %d parked after its reset answered %s (%zu bytes)", k->index, u->index, verdict == RESET_PENDING ? "in part" : "not plainly", u->reset_answer.n);
  const char *refused = desk_refuses(k, j);
  if (refused) fail("desk %d: connection %d parked after its reset though %s", k->index, u->index, refused);
  if (!lp_conn_lendable(u->conn)) fail("desk %d: connection %d parked after its reset, not lendable", k->index, u->index);
  if (verbose) fprintf(stderr, "desk %d: connection %d clean after its reset\n", k->index, u->index);
  u->resetting = 0;
  u->reset_answer.n = 0;
  u->limbo = LIMBO_RELEASED;
}

/* The reset's reader: the server's plaintext, in order; the answer is decided in the call whose bytes decide it, not before. */
static void reset_read(upstream_t *u, lp_conn *conn, lp_sink sink, void *real_user, const unsigned char *data, size_t n, const char *error) {
  int verdict = RESET_PENDING;
  if (!data) {
    u->reset_ended = 1;
  } else if (n > 0) {
    if (u->srv_at + n > u->srv.sent.n || memcmp(data, u->srv.sent.d + u->srv_at, n) != 0)
      fail("connection %d: %zu bytes for its reset's reader are not the server's plaintext from byte %zu on", u->index, n, u->srv_at);
    u->srv_at += n;
    put(&u->reset_answer, data, n);
    verdict = reset_verdict(u->reset_answer.d, u->reset_answer.n);
  }
  sink(conn, real_user, data, n, error);
  if (!data && u->resetting) fail("connection %d: still resetting after its end", u->index);
  if (data && n > 0 && (verdict == RESET_PENDING) != u->resetting)
    fail("connection %d: its reset's answer (%zu bytes) is %s, and the reset %s", u->index, u->reset_answer.n, verdict == RESET_PENDING ? "not all there" : "decided",
         u->resetting ? "runs on" : "ended");
}

/* The connection is the pool's again after a session on the desk (pool.ts): clean, idle for the pool or parked again; else it closes. */
static void from_session_desk(upstream_t *u, int clean, int sid) {
  memset(&u->pool_frame, 0, sizeof u->pool_frame);
  u->pool_keeps = 0;
  u->reset_answer.n = 0;
  u->reset_ended = 0;
  if (!clean) {
    u->dead = 1;
    if (!reacting() || (in_u8() & 1)) pool_close(u);
    return;
  }
  if (reacting() && in_u8() % 3 == 0 && S->desk) desk_park(S->desk, u, sid);
}

static void on_desk_session(lp_desk *d, void *user, int id, enum lp_session how, enum lp_end end, double to_upstream, double to_client, int reusable, int status,
                            int abandoned) {
  desk_t *k = desk_of(d, user, "session");
  session_client_t *s = session_of_id(k, id, "session");
  upstream_t *u = s->u;
  join_t *j = s->j;
  static const char *const names[] = { "", "reset", "back", "ended" };
  if (how < LP_SESSION_RESET || how > LP_SESSION_ENDED) fail("session %d: `session` %d", s->index, (int)how);
  session_account(s);
  if (verbose)
    fprintf(stderr, "desk %d: session %d on connection %d: %s (%s), reusable %d, status %c, abandoned %d, [%g, %g]\n", k->index, s->index, u->index, names[how], LP_END_NAMES[end], reusable,
            status > 32 && status < 127 ? status : '?', abandoned, to_upstream, to_client);
  if (s->tolds++) fail("session %d: `session` twice", s->index);
  if (to_upstream != s->counters[0] || to_client != s->counters[1])
    fail("session %d: `session` with [%g, %g] bytes, relay.c counted [%g, %g]", s->index, to_upstream, to_client, s->counters[0], s->counters[1]);
  if (end == LP_END_NONE) fail("session %d: `session` with no end", s->index);
  /* What relay.c followed: the client's bytes that went upstream, the greeting and the server's bytes. */
  follow_t up = follow(s->stream.d, s->at), down = follow(s->relayed.d, s->relayed.n);
  if (up.terminates) fail("session %d: a Terminate went upstream", s->index);
  if (reusable && !(up.whole && down.whole && down.last_type == 'Z'))
    fail("session %d: reusable, with the client's bytes %s and the server's %s (last type 0x%02x)", s->index, up.whole ? "whole" : "cut", down.whole ? "whole" : "cut", down.last_type);
  if (how != LP_SESSION_ENDED && !down.broken && !down.status_unknown && status != down.last_status)
    fail("session %d: %s with status 0x%02x, the last ReadyForQuery says 0x%02x", s->index, names[how], status, down.last_status);
  if (reusable && abandoned) fail("session %d: reusable and abandoned", s->index);
  const char *refused = desk_refuses(k, j);
  int keep = reusable && status == 'I' && !refused;
  switch (how) {
    case LP_SESSION_RESET:
      if (!keep) fail("session %d: reset, not %s", s->index, !reusable ? "reusable" : status != 'I' ? "idle" : refused);
      if (!s->kept) fail("session %d: reset, its connection got no reader from C", s->index);
      if (s->write_failed) fail("session %d: reset after the connection's end", s->index);
      if (abandoned) fail("session %d: reset, abandoned", s->index);
      if (k->reset_query.n > 0 && !(u->resetting && u->join == j)) fail("session %d: reset, and no reset runs on connection %d", s->index, u->index);
      break;
    case LP_SESSION_BACK:
      if (s->kept) fail("session %d: back, its connection kept on the desk", s->index);
      if (keep && lp_conn_lendable(u->conn)) fail("session %d: back, though its connection could be kept (reusable, idle, the desk going on)", s->index);
      if (keep && k->reset_query.n == 0) fail("session %d: back, reusable and idle with no reset query to fail", s->index);
      if (keep) put(&u->up_expected, k->reset_query.d, k->reset_query.n); /* its write failed: some may have gone */
      if (s->write_failed && !keep) fail("session %d: the pool's reader got the connection's end, and no reset query was written", s->index);
      if (!j->on) fail("session %d: back, its ticket off the desk already", s->index);
      join_off(u, "session back");
      break;
    default:
      if (s->kept) fail("session %d: ended, its connection kept on the desk", s->index);
      if (!j->on) fail("session %d: ended, its ticket off the desk already", s->index);
      join_off(u, "session ended");
      u->dead = 1;
      break;
  }
  s->u = NULL;
  u->session = NULL;
  if (how == LP_SESSION_BACK) {
    /* The pool's (pool.ts #sessionEnded, the server's release): a client that left mid-query or mid-message is cancelled and closed; a transaction is rolled back. */
    int clean = reusable && !abandoned && !s->write_failed;
    from_session_desk(u, clean, j->sid);
    if (clean && status != 'I') pool_query(u, "ROLLBACK");
  } else if (how == LP_SESSION_RESET && reacting() && S->desk == k) {
    unsigned react = in_u8() % 6;
    if (react == 0) lp_desk_sweep(k->handle, 0); /* inside the session's end: its reset too */
    else if (react == 1) desk_close(k);
    else if (react == 2) desk_stop(k, 1);
  }
}

static size_t on_desk_farewell(lp_desk *d, void *user, int id, const char *reason, unsigned char *out, size_t cap) {
  desk_t *k = desk_of(d, user, "farewell");
  session_client_t *s = session_of_id(k, id, "farewell");
  session_account(s);
  if (s->farewells++) fail("session %d: farewell twice", s->index);
  follow_t down = follow(s->relayed.d, s->relayed.n);
  if (!down.whole || down.last_type == 'E') fail("session %d: farewell after %s", s->index, down.whole ? "an ErrorResponse" : "a message cut short");
  if (verbose) fprintf(stderr, "desk %d: farewell for session %d (%s)\n", k->index, s->index, reason ? reason : "closed");
  if (reacting() && in_u8() % 4 == 0) return 0;
  /* An ErrorResponse 08006 naming why, as the engine's. */
  bytes_t body = { 0 }, m = { 0 };
  put(&body, "SFATAL\0C08006\0M", 15);
  const char *text = reason ? reason : "the server closed the connection";
  put(&body, text, strlen(text) + 1);
  put_u8(&body, 0);
  put_message(&m, 'E', &body);
  size_t n = m.n <= cap ? m.n : 0;
  memcpy(out, m.d, n);
  put(&s->expected, m.d, n);
  bytes_free(&body);
  bytes_free(&m);
  return n;
}

static void on_desk_reset(lp_desk *d, void *user, int id, const unsigned char *answer, size_t n) {
  desk_t *k = desk_of(d, user, "reset");
  join_t *j = join_of_id(k, id);
  if (!j || !j->on) fail("desk %d: reset of ticket %d, which is not on it", k->index, id);
  upstream_t *u = &S->ups[j->up];
  if (u->limbo != LIMBO_RESET_OUT) fail("desk %d: reset of connection %d, whose reset's reader was not unset", k->index, u->index);
  if (verbose) fprintf(stderr, "desk %d: reset of connection %d answered %zu bytes%s\n", k->index, u->index, n, answer ? "" : " (none)");
  if (answer) {
    if (n != u->reset_answer.n || memcmp(answer, u->reset_answer.d, n) != 0) fail("desk %d: reset of connection %d with %zu bytes, its reader got %zu", k->index, u->index, n, u->reset_answer.n);
    int verdict = reset_verdict(answer, n);
    if (verdict != RESET_DIRTY) fail("desk %d: reset of connection %d with an answer that is %s", k->index, u->index, verdict == RESET_PLAIN ? "plain" : "not all there");
  } else if (n != 0 || !u->reset_ended) {
    fail("desk %d: reset of connection %d with no answer, %zu bytes, its reader %s", k->index, u->index, n, u->reset_ended ? "got the end" : "did not get the end");
  }
  int ok = answer && answer_ok(answer, n);
  join_off(u, "reset");
  from_session_desk(u, ok, j->sid);
}

/* The pool parks a clean connection it holds on the desk, in settings `sid` (pool.ts #idleOrHandOff). */
static void desk_park(desk_t *k, upstream_t *u, int sid) {
  if (!k || !u || k->closed || !pool_holds(u) || !u->logged_in || u->dead || u->pool_outstanding > 0 || u->unread.n > 0) return;
  if (u->paused) { /* lent unpaused (NativeUpstream.lend) */
    u->paused = 0;
    lp_conn_pause(u->conn, 0);
    if (!pool_holds(u) || u->dead || u->pool_outstanding > 0 || u->unread.n > 0) return;
  }
  lp_desk_join ticket;
  join_t *j = join_new(u, k, sid, &ticket);
  if (!j) return;
  account_all();
  int lendable = lp_conn_lendable(u->conn);
  join_on(u, j); /* before the call: it may go to a waiting client, or out, inside it */
  u->limbo = LIMBO_RELEASED;
  upstream_t *was = S->parking;
  S->parking = u;
  int r = lp_desk_park(k->handle, u->conn, &ticket);
  S->parking = was;
  if (verbose) fprintf(stderr, "pool: park connection %d (ticket %d, sid %d) on desk %d: %d\n", u->index, j->id, sid, k->index, r);
  int expected = !k->stopped && sid != 0 && lendable;
  if (r != expected) fail("desk %d: lp_desk_park of connection %d (sid %d, stopped %d, lendable %d) returned %d", k->index, u->index, sid, k->stopped, lendable, r);
  if (!r) {
    if (u->limbo != LIMBO_RELEASED || u->join != j) fail("desk %d: lp_desk_park refused connection %d and set its reader", k->index, u->index);
    j->made = j->on = 0;
    u->join = NULL;
    u->limbo = LIMBO_NONE;
  } else if (u->limbo == LIMBO_RELEASED && u->join == j) {
    fail("desk %d: lp_desk_park took connection %d and set no reader", k->index, u->index);
  }
}

static void desk_reset_query(desk_t *k, unsigned kind) {
  static const char *const texts[] = { "DISCARD ALL", NULL, "RESET ALL; SELECT pg_advisory_unlock_all()", "" };
  bytes_t q = { 0 };
  const char *text = texts[kind % 4];
  if (text && kind % 4 == 3) {
    put(&q, "S\0\0\0\4", 5); /* a Sync: the cooperating server answers it as a Query */
  } else if (text) {
    put_u8(&q, 'Q');
    put_u32(&q, (uint32_t)(strlen(text) + 5));
    put(&q, text, strlen(text) + 1);
  }
  if (lp_desk_reset_query(k->handle, q.d ? q.d : (const unsigned char *)"", q.n) != 0) fail("lp_desk_reset_query");
  k->reset_query.n = 0;
  put(&k->reset_query, q.d, q.n);
  if (verbose) fprintf(stderr, "pool: desk %d's reset query: %zu bytes\n", k->index, q.n);
  bytes_free(&q);
}

/* The greeting C writes for the session's client first: none, a login's answer, the input's bytes, or more than a socket takes. */
static void make_hello(bytes_t *b, unsigned kind) {
  static const unsigned char login[] = "R\0\0\0\10\0\0\0\0" "S\0\0\0\031client_encoding\0UTF8\0" "K\0\0\0\14\0\0\0\1\0\0\0\2" "Z\0\0\0\5I";
  switch (kind % 4) {
    case 0: break;
    case 1: put(b, login, sizeof login - 1); break;
    case 2:
      for (size_t n = in_u8(); n > 0; n--) put_u8(b, in_u8());
      break;
    default: {
      size_t body = (size_t)(in_u8() % 128 + 1) * 1024;
      put_u8(b, 'N');
      put_u32(b, (uint32_t)(body + 4));
      put_pattern(b, body, 7);
      put(b, login, sizeof login - 1);
    }
  }
}

static session_client_t *free_session_slot(void) {
  for (int i = 0; i < MAX_SESSIONS; i++)
    if (!S->sessions[i].open) return &S->sessions[i];
  return NULL;
}

/* The taken connection back to idle (its session did not start): idle, or the desk's next client. */
static void session_untake(desk_t *k, upstream_t *u) {
  if (verbose) fprintf(stderr, "pool: untake connection %d\n", u->index);
  u->limbo = LIMBO_RELEASED;
  lp_desk_untake(k->handle, u->join->id);
  if (u->limbo == LIMBO_RELEASED) fail("desk %d: lp_desk_untake of connection %d set no reader", k->index, u->index);
}

/* A client's session on the taken connection `u` (lp_desk_relay), as server.ts starts one; `bad`: with a descriptor it cannot use. */
static void session_relay(desk_t *k, upstream_t *u, unsigned how) {
  session_client_t *s = free_session_slot();
  join_t *j = u->join;
  int bad = how % 4 == 3;
  if (!s) {
    session_untake(k, u);
    return;
  }
  int fds[2] = { -1, -1 };
  if (!bad) {
    connected_pair((S->config & CFG_TCP_CLIENT) != 0, fds);
    set_nonblocking(fds[1]);
    if ((S->config & CFG_SMALL) && !(S->config & CFG_TCP_CLIENT)) {
      small_buffers(fds[0], 4096);
      small_buffers(fds[1], 4096);
    }
  }
  bytes_t hello = { 0 }, first = { 0 };
  make_hello(&hello, how / 4);
  if (how & 0x40) make_client_bytes(0, &first);
  memset(s, 0, sizeof *s);
  s->index = (int)(s - S->sessions);
  s->open = 1;
  s->u = u;
  s->j = j;
  s->fd = fds[1];
  put(&s->stream, first.d, first.n);
  s->first_n = first.n;
  put(&s->expected, hello.d, hello.n);
  put(&s->relayed, hello.d, hello.n);
  s->hello_left = hello.n;
  u->session = s;
  j->session = s;
  account_all();
  const char *error = NULL;
  if (verbose) fprintf(stderr, "pool: session %d on connection %d (ticket %d): greeting %zu bytes, first %zu\n", s->index, u->index, j->id, hello.n, first.n);
  int r = lp_desk_relay(k->handle, j->id, fds[0], hello.d ? hello.d : (const unsigned char *)"", hello.n, first.d ? first.d : (const unsigned char *)"", first.n, s->counters, &error);
  bytes_free(&hello);
  bytes_free(&first);
  if (r == 0 && bad) fail("desk %d: lp_desk_relay took descriptor -1", k->index);
  if (r == 0) return;
  if (!bad) fail("desk %d: lp_desk_relay of connection %d: %s", k->index, u->index, error ? error : "?");
  if (!error) fail("desk %d: lp_desk_relay refused with no error", k->index);
  if (s->tolds || s->counters[0] != 0 || s->counters[1] != 0) fail("desk %d: lp_desk_relay refused after relaying", k->index);
  bytes_free(&s->stream);
  bytes_free(&s->expected);
  bytes_free(&s->relayed);
  memset(s, 0, sizeof *s);
  s->fd = -1;
  u->session = NULL;
  j->session = NULL;
  /* Still taken: lp_desk_relay on it again refuses nothing here; the pool puts it back. */
  session_untake(k, u);
}

/*
 * A client's session takes an idle connection of settings `sid` (lp_desk_take): the most recently
 * idle one that needs no check, those due for a check out (stale) first. Then at once, as
 * server.ts does, its relay, or an untake.
 */
static void session_take(desk_t *k, int sid, unsigned how) {
  upstream_t *candidates[MAX_CONNS];
  uint64_t since[MAX_CONNS];
  int n = 0;
  for (int i = 0; i < MAX_CONNS; i++) {
    upstream_t *o = &S->ups[i];
    if (o->idle && o->join && o->join->desk == k && o->join->sid == sid) {
      since[n] = o->idle_since;
      candidates[n++] = o;
    }
  }
  account_all();
  int id = lp_desk_take(k->handle, sid);
  if (verbose) fprintf(stderr, "pool: take sid %d from desk %d: ticket %d\n", sid, k->index, id);
  upstream_t *u = NULL;
  if (id) {
    join_t *j = join_of_id(k, id);
    u = j && j->on ? &S->ups[j->up] : NULL;
    if (!u || u->join != j || u->limbo != LIMBO_IDLE) fail("desk %d: lp_desk_take gave ticket %d, not an idle connection there", k->index, id);
    if (k->stopped || j->sid != sid) fail("desk %d: lp_desk_take of sid %d gave connection %d (sid %d, stopped %d)", k->index, sid, u->index, j->sid, k->stopped);
    uint64_t now = now_ms();
    if (now >= j->expires || now - u->idle_since >= k->check_delay || !lp_conn_lendable(u->conn))
      fail("desk %d: lp_desk_take gave connection %d, due for a check (idle %llu ms, check delay %llu)", k->index, u->index, (unsigned long long)(now - u->idle_since),
           (unsigned long long)k->check_delay);
    u->limbo = LIMBO_NONE;
  }
  for (int i = 0; i < n; i++) {
    upstream_t *o = candidates[i];
    if (o == u || !o->idle) continue;
    if (!u && !k->stopped && sid != 0) fail("desk %d: lp_desk_take of sid %d gave none, connection %d of it is idle there", k->index, sid, o->index);
    if (u && since[i] > u->idle_since) fail("desk %d: lp_desk_take gave connection %d, connection %d of its settings is idle there since later", k->index, u->index, o->index);
  }
  if (!u) return;
  if (how % 4 != 2) {
    session_relay(k, u, how);
    return;
  }
  /* Untaken; before, a relay and an untake of another ticket (of the session, one never given) change nothing. */
  int other = (int)((how >> 4) % (unsigned)(S->joins_made + 1)) + 1;
  join_t *o = join_of_id(k, other);
  if (other != id && !(o && o->on && S->ups[o->up].session)) {
    const char *error = NULL;
    if (lp_desk_relay(k->handle, other, -1, (const unsigned char *)"", 0, (const unsigned char *)"", 0, NULL, &error) != -1 || !error)
      fail("desk %d: lp_desk_relay of ticket %d, not taken, did not refuse", k->index, other);
    lp_desk_untake(k->handle, other);
  }
  session_untake(k, u);
}

/* lp_desk_sweep: every reset that ran `timeout_ms` or more ends (`reset` with no answer), none other. */
static void session_sweep(desk_t *k, double timeout_ms) {
  account_all();
  if (verbose) fprintf(stderr, "pool: sweep desk %d (%g ms)\n", k->index, timeout_ms);
  lp_desk_sweep(k->handle, timeout_ms);
  uint64_t now = now_ms(), limit = (uint64_t)timeout_ms;
  for (int i = 0; i < MAX_CONNS; i++) {
    upstream_t *u = &S->ups[i];
    if (u->resetting && u->join && u->join->desk == k && now - u->reset_since >= limit)
      fail("desk %d: connection %d resetting for %llu ms after a sweep of %g ms", k->index, u->index, (unsigned long long)(now - u->reset_since), timeout_ms);
  }
}

/* The open session the step names. */
static session_client_t *pick_session(unsigned which) {
  int n = 0;
  for (int i = 0; i < MAX_SESSIONS; i++) n += S->sessions[i].open;
  if (n == 0) return NULL;
  for (int i = 0, k = (int)(which % (unsigned)n); i < MAX_SESSIONS; i++)
    if (S->sessions[i].open && k-- == 0) return &S->sessions[i];
  return NULL;
}

static void sess_flush(session_client_t *s, size_t max) {
  if (s->fd < 0 || s->shut || s->pending.n == 0) return;
  size_t n = max < s->pending.n ? max : s->pending.n;
  ssize_t w = send(s->fd, s->pending.d, n, MSG_DONTWAIT | MSG_NOSIGNAL);
  if (w > 0) {
    put(&s->stream, s->pending.d, (size_t)w);
    drop_front(&s->pending, (size_t)w);
  }
}

static void sess_read(session_client_t *s, size_t max) {
  if (s->fd < 0 || s->eof || s->stopped) return;
  unsigned char b[65536];
  if (max > sizeof b) max = sizeof b;
  ssize_t r = recv(s->fd, b, max, MSG_DONTWAIT);
  if (r > 0) put(&s->got, b, (size_t)r);
  else if (r == 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) s->eof = 1;
  check_session_bytes(s);
}

static const unsigned char TERMINATE[5] = { 'X', 0, 0, 0, 4 };

/* The session's client: sends (anything, a Query, a Terminate and maybe more), reads, half-closes, closes or resets, stops reading. */
static void session_client_step(session_client_t *s, unsigned action) {
  if (!s) return;
  bytes_t b = { 0 };
  switch (action % 8) {
    case 0: make_client_bytes(s->stream.n, &b); break;
    case 1: put_client_message(&b, 0); break;
    case 2: sess_flush(s, 1 + in_size(70000)); break;
    case 3: sess_read(s, 1 + in_size(70000)); break;
    case 4:
      put(&b, TERMINATE, sizeof TERMINATE);
      if (in_u8() & 1) put_client_message(&b, 0); /* after the Terminate: the server never gets it */
      break;
    case 5:
      if (s->fd >= 0 && !s->shut) {
        shutdown(s->fd, SHUT_WR);
        s->shut = 1;
      }
      break;
    case 6: peer_close(&s->fd, &s->shut, &s->eof, (S->config & CFG_TCP_CLIENT) && (in_u8() & 1)); break;
    default:
      if (s->fd >= 0) shutdown(s->fd, SHUT_RD);
      s->stopped = 1;
      break;
  }
  if (b.n) {
    if (verbose) fprintf(stderr, "session %d: client sends %zu bytes\n", s->index, b.n);
    put(&s->pending, b.d, b.n);
    sess_flush(s, SIZE_MAX);
  }
  bytes_free(&b);
}

/* The cooperating server does not answer what it read so far again (a reset's answer of the input's came): up to its last whole message. */
static void answered_so_far(upstream_t *u) {
  while (u->answered + 5 <= u->srv.got.n) {
    uint32_t len = be32(u->srv.got.d + u->answered + 1);
    if (len < 4 || u->answered + 1 + len > u->srv.got.n) break;
    u->answered += 1 + len;
  }
}

/*
 * The server answers a reset as the input says: CommandComplete and ReadyForQuery idle, with a
 * ParameterStatus, an error, another status or none before, bytes after, a length below 4, more
 * than 64 KiB, raw bytes; in pieces (each its own write, the loop turning between), then maybe a close.
 */
static void server_reset_answer(upstream_t *u) {
  static const unsigned char done[] = "C\0\0\0\020DISCARD ALL\0", idle[] = "Z\0\0\0\5I";
  bytes_t b = { 0 }, body = { 0 };
  unsigned kind = in_u8();
  switch (kind % 8) {
    case 0: put(&b, done, sizeof done - 1); put(&b, idle, sizeof idle - 1); break;
    case 1: /* a ParameterStatus before or after the CommandComplete */
      put(&body, "application_name\0x\0", 19);
      if (kind & 8) put(&b, done, sizeof done - 1);
      put_message(&b, 'S', &body);
      if (!(kind & 8)) put(&b, done, sizeof done - 1);
      put(&b, idle, sizeof idle - 1);
      break;
    case 2: /* an error, or a notice */
      put(&body, "SERROR\0C42501\0Mno\0\0", 19);
      put_message(&b, (kind & 8) ? 'N' : 'E', &body);
      put(&b, idle, sizeof idle - 1);
      break;
    case 3: /* in a transaction, failed, or a ReadyForQuery alone (idle, or in a transaction) */
      if (!(kind & 16)) put(&b, done, sizeof done - 1);
      put(&b, "Z\0\0\0\5", 5);
      put_u8(&b, "TEIT"[(kind >> 3) & 3]);
      break;
    case 4: /* bytes after the ReadyForQuery */
      put(&b, done, sizeof done - 1);
      put(&b, idle, sizeof idle - 1);
      if (kind & 8) put(&b, "N\0\0\0\4", 5);
      else put_u8(&b, in_u8());
      break;
    case 5: /* a length below 4, at once or after a CommandComplete */
      if (kind & 8) put(&b, done, sizeof done - 1);
      put(&b, "C\0\0\0\3", 5);
      put(&b, idle, sizeof idle - 1);
      break;
    case 6: /* more than txclient.c keeps: one message of 70 KiB, or CommandCompletes */
      if (kind & 8) {
        put_u8(&b, 'N');
        put_u32(&b, 70 * 1024 + 4);
        put_pattern(&b, 70 * 1024, 3);
      } else {
        while (b.n < 70 * 1024) put(&b, done, sizeof done - 1);
      }
      put(&b, done, sizeof done - 1);
      put(&b, idle, sizeof idle - 1);
      break;
    default:
      for (size_t n = in_u8(); n > 0; n--) put_u8(&b, in_u8());
      break;
  }
  srv_read(u, 65536);
  answered_so_far(u);
  size_t pieces = 1 + ((kind >> 5) & 3) % 3;
  if (verbose) fprintf(stderr, "server %d: answers a reset with %zu bytes in %zu pieces\n", u->index, b.n, pieces);
  for (size_t at = 0, i = 1; at < b.n; i++) {
    size_t n = i >= pieces ? b.n - at : 1 + in_size(b.n - at - 1);
    if (!server_write(&u->srv, b.d + at, n)) break;
    server_flush(&u->srv, SIZE_MAX);
    run_loop(1);
    at += n;
  }
  if (kind & 0x80) { /* then it goes: close_notify and FIN */
    u->faults = 1;
    server_close_notify(&u->srv);
    server_flush(&u->srv, SIZE_MAX);
    server_fin(&u->srv);
  }
  bytes_free(&b);
  bytes_free(&body);
}

/* The connection whose reset runs that `which` names (the next from it, in turn), else `otherwise`. */
static upstream_t *resetting_upstream(unsigned which, upstream_t *otherwise) {
  for (int i = 0; i < MAX_CONNS; i++) {
    upstream_t *u = &S->ups[(which + (unsigned)i) % MAX_CONNS];
    if (u->resetting) return u;
  }
  return otherwise;
}

/* The caller on a session's connection (DeskSession): an idle timeout lets the client go, any other end closes it; or it reads the state. */
static void session_conn_step(session_client_t *s, unsigned action) {
  upstream_t *u = s ? s->u : NULL;
  if (!u || !u->conn) return;
  account_all();
  switch (action % 3) {
    case 0:
      if (verbose) fprintf(stderr, "pool: session %d: idle timeout\n", s->index);
      lp_conn_detach(u->conn, LP_END_IDLE);
      break;
    case 1:
      if (verbose) fprintf(stderr, "pool: session %d: close\n", s->index);
      u->closed = u->dead = 1;
      lp_conn_close(u->conn, LP_END_SHUTDOWN);
      break;
    default: {
      int running;
      double idle;
      lp_conn_state(u->conn, &running, &idle);
      if (running != 0 && running != 1) fail("session %d: lp_conn_state says running %d", s->index, running);
      break;
    }
  }
}

/* Every connection is in one place: the pool's, lent to a client, idle on a desk, in a session, or resetting (between two steps). */
static void places_check(void) {
  for (int i = 0; i < MAX_CONNS; i++) {
    upstream_t *u = &S->ups[i];
    if (!u->conn) continue;
    int places = pool_holds(u) + (u->lent_to != NULL) + u->idle + (u->session != NULL) + u->resetting;
    if (places != 1)
      fail("connection %d is in %d places (pool %d, lent %d, idle %d, session %d, resetting %d)", u->index, places, pool_holds(u), u->lent_to != NULL, u->idle, u->session != NULL,
           u->resetting);
    if ((u->idle || u->session || u->resetting) && !(u->join && u->join->on)) fail("connection %d on a desk with no ticket", u->index);
    if (u->limbo != LIMBO_NONE || u->released_by) fail("connection %d between two readers (limbo %d) after a step", u->index, u->limbo);
  }
}

/* A step of the engine or the pool with the desk: the next byte's low bits say which, its high bits how. */
static void desk_step(unsigned which, upstream_t *u) {
  unsigned b = in_u8(), what = b % 16, param = b / 16;
  desk_t *k = S->desk;
  if (verbose) fprintf(stderr, "desk step %u (%u)\n", what, param);
  if (what == 0) {
    desk_open(param);
    return;
  }
  /* Session mode: a session's client, and the caller and the server of its connection, whether the desk is open or not. */
  if (what == 14) {
    session_client_step(pick_session(which / 2 + param), param / 2);
    places_check();
    return;
  }
  if (what == 15) {
    if (param % 4 == 3) server_reset_answer(resetting_upstream(which / 2 + param / 4, u));
    else session_conn_step(pick_session(which / 2 + param / 4), param % 4);
    places_check();
    desk_check(S->desk);
    return;
  }
  if (!k) return;
  switch (what) {
    case 1: /* a client (any: `which` is odd here) off the desk, or on it in settings 1 to 3, or 0 (which matches nothing) */
      desk_client(pick_client(which / 2 + param / 8), param % 8 == 0 ? NULL : k, param % 8 == 4 ? 0 : (int)(param % 4));
      break;
    case 2:
      k->room = param & 1;
      k->js_waiting = (param >> 1) & 1;
      if (verbose) fprintf(stderr, "pool: desk %d: room %d, js_waiting %d\n", k->index, k->room, k->js_waiting);
      lp_desk_set(k->handle, k->room, k->js_waiting);
      break;
    case 3: desk_config(k, param); break;
    case 4: desk_offer(k, u, (int)(param % 3) + 1); break;
    case 5: {
      int r = lp_desk_wake(k->handle);
      if (verbose) fprintf(stderr, "pool: wake desk %d: %d\n", k->index, r);
      break;
    }
    case 6: desk_reclaim(k, param, 0); break;
    case 7: desk_reclaim(k, param, 1); break;
    case 8: desk_stop(k, 1); break;
    case 9: desk_stop(k, 0); break;
    case 10: desk_close(k); break;
    case 11:
      S->join_mode = (int)(param % 4);
      S->expiry_mode = (int)(param / 4 % 3);
      break;
    case 12: S->close_desk_last = param & 1; break;
    case 13: /* session mode: the reset query, a park, a session's take (the next byte: its relay, or an untake), a sweep */
      if (param % 4 == 0) desk_reset_query(k, param / 4);
      else if (param % 4 == 1) desk_park(k, pool_holds(u) && !u->dead ? u : idle_upstream(), (int)(param / 4)); /* the step's connection, else any the pool can lend */
      else if (param % 4 == 2) session_take(k, (int)(param / 4), in_u8());
      else session_sweep(k, (const double[]){ 0, 1, 5, 1e9 }[param / 4]);
      break;
    default: break;
  }
  places_check();
  desk_check(S->desk);
}

/* ---------- client callbacks ---------- */

static client_t *client_of(lp_client *k, void *user, const char *callback) {
  client_t *c = user;
  if (!c || c < S->clients || c >= S->clients + MAX_CLIENTS) fail("%s: wrong user pointer", callback);
  if (c->ends) fail("client %d: %s after its end", c->index, callback);
  if (c->k != k) fail("client %d: %s with another client", c->index, callback);
  return c;
}

static void on_client_data(lp_client *k, void *user, const unsigned char *data, size_t n, const char *error) {
  client_t *c = client_of(k, user, "data");
  if (c->lent) fail("client %d: data for the engine while a connection is lent", c->index);
  account_all();
  if (!data) {
    if (verbose) fprintf(stderr, "client %d: end of its stream (%s)\n", c->index, error ? error : "clean");
    c->fast = c->needing = 0;
    c->input_done = 1;
    if (error) c->lossy = 1;
    if (reacting()) react_client(c, "end of stream");
    return;
  }
  if (n == 0) return; /* what was queued for the client is written */
  if (!c->fast && c->paused) fail("client %d: %zu bytes read while paused", c->index, n);
  if (c->js_ended) return; /* C reads on after lp_client_end, past what it dropped of a unit: the engine ignores it */
  if (c->fast) { /* a unit the fast path does not carry: the rest of the input is the engine's */
    if (c->needing) fail("client %d: handed to the engine while waiting for a connection", c->index);
    c->fast = 0;
  }
  handed_to_engine(c, data, n, "data");
  if (verbose) fprintf(stderr, "client %d: %zu bytes for the engine\n", c->index, n);
  if (reacting()) react_client(c, "data");
}

static void on_need(lp_client *k, void *user, const unsigned char *unit, size_t unit_n, double waited_ms) {
  client_t *c = client_of(k, user, "need");
  if (waited_ms != 0 && !c->desk) fail("client %d: need after %g ms waiting, on no desk", c->index, waited_ms);
  if (!(waited_ms >= 0)) fail("client %d: need after %g ms waiting", c->index, waited_ms);
  if (waited_ms != 0 && unit) fail("client %d: need with a unit of named statements after waiting on a desk", c->index);
  /* A unit with the client's statement names goes back rewritten: here, the same names (the server does not care). */
  c->named.n = 0;
  if (unit) put(&c->named, unit, unit_n);
  account_all();
  if (verbose) fprintf(stderr, "client %d: need (waited %g ms)\n", c->index, waited_ms);
  if (!c->fast) fail("client %d: need outside fast mode", c->index);
  if (c->needing) fail("client %d: need twice", c->index);
  if (c->lent) fail("client %d: need while a connection is lent", c->index);
  c->needing = 1;
  if (!reacting()) return;
  unsigned how = in_u8() % 8;
  upstream_t *u = idle_upstream();
  if (how <= 2 && u) attach(c, u);
  else if (how == 3) engine_js(c);
  else if (how == 4) engine_close(c);
  else if (how == 5) engine_end(c);
}

static void on_back(lp_client *k, void *user, enum lp_back how, int status, int flags, int running, const unsigned char *reports, size_t reports_len,
                    const unsigned char *rest, size_t rest_len, const char *reason, int id) {
  client_t *c = client_of(k, user, "back");
  if (how < LP_BACK_RELEASED || how > LP_BACK_UPSTREAM_GONE) fail("client %d: back %d", c->index, (int)how);
  account_all();
  upstream_t *u = c->lent;
  if (!u) fail("client %d: back (%s) with no connection lent: given back twice?", c->index, LP_BACK_NAMES[how]);
  if (u->released_by != c) fail("client %d: back (%s) of connection %d, whose reader C did not unset first", c->index, LP_BACK_NAMES[how], u->index);
  u->released_by = NULL;
  /* A connection of a desk leaves it here, with its ticket; any other comes back with 0. */
  int expected_id = u->join ? u->join->id : 0;
  if (id != expected_id) fail("client %d: back (%s) of connection %d with id %d, its ticket is %d", c->index, LP_BACK_NAMES[how], u->index, id, expected_id);
  if (u->join) join_off(u, "back");
  c->backs++;
  check_lending(c, how, status, flags, running, reports, reports_len, rest, rest_len);
  if (how != LP_BACK_UPSTREAM_GONE && reason) fail("client %d: %s with a reason", c->index, LP_BACK_NAMES[how]);
  c->lent = NULL;
  u->lent_to = NULL;
  u->returning = 0;
  c->answers.n = 0;
  if (how == LP_BACK_HANDOVER) {
    c->fast = c->needing = 0;
    handed_to_engine(c, rest, rest_len, "handover");
  }
  /* The pool has the connection again, as the engine takes it (transaction-session.ts, #back). */
  if (how != LP_BACK_UPSTREAM_GONE) u->paused = 0; /* given back unpaused */
  if (how == LP_BACK_UPSTREAM_GONE) {
    /* The engine closes the connection and ends the client with an ErrorResponse 08006. */
    u->dead = 1;
    if (!reacting() || in_u8() % 2 == 0) pool_close(u);
    engine_write(c);
    engine_end(c);
    return;
  } else if (how == LP_BACK_CLIENT_GONE && running) {
    u->dead = 1; /* cancelled, then closed: later (the drain, or a step) */
  } else if (status != 'I') {
    pool_query(u, "ROLLBACK");
  }
  if (reacting()) react_client(c, "back");
}

static void on_client_end(lp_client *k, void *user) {
  client_t *c = client_of(k, user, "end");
  account_all();
  if (verbose) fprintf(stderr, "client %d: end\n", c->index);
  if (c->lent) fail("client %d: end with a connection lent", c->index);
  c->ends++;
  c->k = NULL;
  c->fast = c->needing = 0;
  c->desk = NULL;
}

/* The engine names the client's statements as the desk's connection has them: here, the same
   names (the servers do not care), so the bytes checks hold as for any unit. */
static const unsigned char *on_rewrite(lp_client *k, void *user, const unsigned char *unit, size_t n, int id, size_t *out_n) {
  static bytes_t rewritten;
  client_t *c = client_of(k, user, "rewrite");
  account_all();
  if (!c->lent || !c->lent->join || c->lent->join->id != id) fail("client %d: rewrite for connection %d, not the desk's lending it has", c->index, id);
  rewritten.n = 0;
  put(&rewritten, unit, n);
  *out_n = n;
  return rewritten.d;
}

static const lp_client_callbacks client_callbacks = { on_client_data, on_need, on_back, on_client_end, on_rewrite };

/* How the engine reacts inside a client's callback, as the input says. */
static void react_client(client_t *c, const char *where) {
  unsigned how = in_u8() % 10;
  if (verbose && how < 6) fprintf(stderr, "client %d: reacts in %s (%u)\n", c->index, where, how);
  switch (how) {
    case 0: engine_write(c); break;
    case 1: engine_fast(c, in_u8()); break;
    case 2: engine_close(c); break;
    case 3: engine_end(c); break;
    case 4: {
      upstream_t *u = idle_upstream();
      if (u) attach(c, u);
      break;
    }
    case 5: engine_js(c); break;
    default: break;
  }
}

/* ---------- connection callbacks ---------- */

static upstream_t *upstream_of(void *user, const char *callback) {
  upstream_t *u = user;
  if (!u || u < S->ups || u >= S->ups + MAX_CONNS) fail("%s: wrong user pointer", callback);
  if (u->ends) fail("connection %d: %s after its end", u->index, callback);
  return u;
}

static void on_handshake(lp_conn *conn, void *user, const char *error, long verify) {
  upstream_t *u = upstream_of(user, "handshake");
  (void)verify;
  u->conn = conn;
  u->handshake_ok = error == NULL;
  if (verbose && error) fprintf(stderr, "connection %d: handshake failed: %s\n", u->index, error);
}

/* The pool's reader: answers to its own queries are consumed, what comes between them kept for the next lending. */
static void pool_read(upstream_t *u, const unsigned char *data, size_t n) {
  for (size_t i = 0; i < n;) {
    if (u->pool_frame.have == 0 && !u->pool_frame.broken) u->pool_keeps = u->pool_outstanding == 0;
    int started, ended;
    size_t took = frame(&u->pool_frame, data + i, n - i, &started, &ended);
    if (u->pool_frame.broken) u->dead = 1; /* the engine could not follow it either */
    if (u->pool_keeps || u->pool_frame.broken) put(&u->unread, data + i, took);
    if (ended && !u->pool_keeps && u->pool_frame.type == 'Z') u->pool_outstanding--;
    i += took;
  }
}

static void on_conn_data(lp_conn *conn, void *user, const unsigned char *data, size_t n, const char *error) {
  upstream_t *u = upstream_of(user, "data");
  (void)conn;
  account_all();
  /* give_back() hands the connection to the pool's reader (unpaused, reading) just before `back`:
     bytes may come first. The lending must be over: none for the client after these. */
  if (u->lent_to) {
    u->returning = 1;
  } else if (u->session) {
    /* Only inside the session's end: the reset query's write failed and ended the connection (txclient.c's s_detached). */
    if (data) fail("connection %d: the pool's reader got %zu bytes during a session", u->index, n);
    if (verbose) fprintf(stderr, "connection %d: its end for the pool's reader inside its session's end\n", u->index);
    u->session->write_failed = 1;
  } else if (u->join) fail("connection %d: the pool's reader got %s while it is on desk %d", u->index, data ? "bytes" : "its end", u->join->desk->index);
  if (!data) {
    if (verbose) fprintf(stderr, "connection %d: end of its stream (%s)\n", u->index, error ? error : "clean");
    u->dead = 1;
    return;
  }
  if (n == 0) return;
  if (u->paused) fail("connection %d: data while paused", u->index);
  if (u->srv_at + n > u->srv.sent.n || memcmp(data, u->srv.sent.d + u->srv_at, n) != 0)
    fail("connection %d: the pool's %zu bytes are not the server's plaintext from byte %zu on (%zu sent)", u->index, n, u->srv_at, u->srv.sent.n);
  u->srv_at += n;
  pool_read(u, data, n);
}

static void on_abandoned(lp_conn *conn, void *user) {
  (void)conn;
  fail("connection %d: abandoned, with no relay", upstream_of(user, "abandoned")->index);
}

static size_t on_farewell(lp_conn *conn, void *user, const char *reason, unsigned char *out, size_t cap) {
  (void)conn, (void)reason, (void)out, (void)cap;
  fail("connection %d: farewell, with no relay", upstream_of(user, "farewell")->index);
}

static void on_detached(lp_conn *conn, void *user, enum lp_end end, double to_upstream, double to_client, int reusable, int status) {
  (void)conn, (void)end, (void)to_upstream, (void)to_client, (void)reusable, (void)status;
  fail("connection %d: detached, with no relay", upstream_of(user, "detached")->index);
}

static void on_conn_end(lp_conn *conn, void *user, enum lp_end end, double to_upstream, double to_client) {
  upstream_t *u = upstream_of(user, "end");
  (void)to_upstream, (void)to_client;
  if (u->conn && u->conn != conn) fail("connection %d: end of another connection", u->index);
  if (verbose) fprintf(stderr, "connection %d: end %s\n", u->index, LP_END_NAMES[end]);
  if (u->lent_to) fail("connection %d: ended while lent to client %d, which was not told", u->index, u->lent_to->index);
  if (u->join) fail("connection %d: ended while on desk %d, which did not let it go", u->index, u->join->desk->index);
  if (u->session) fail("connection %d: ended during session %d, which was not told", u->index, u->session->index);
  u->ends++;
  u->conn = NULL;
  u->dead = 1;
}

static const lp_callbacks conn_callbacks = { on_handshake, on_conn_data, on_abandoned, on_farewell, on_detached, on_conn_end };

/* ---------- lending ---------- */

/* The pool lends `u` to `c` (after `need`, or to see a refusal change nothing), with the bytes its reader kept. */
static int attach(client_t *c, upstream_t *u) {
  if (!c->k || c->lent || !pool_holds(u) || !u->logged_in || u->dead || u->pool_outstanding > 0) return -1;
  if (u->paused) { /* lent unpaused, as NativeUpstream.lend() does: what OpenSSL held goes to the pool's reader first */
    u->paused = 0;
    lp_conn_pause(u->conn, 0);
    if (!u->conn || u->dead || u->pool_outstanding > 0) return -1;
  }
  /* The engine's ticket, when the client is on a desk (transaction-session.ts, #landFast): the
     connection joins it unless the desk is stopped (a rewritten unit too). */
  lp_desk_join ticket;
  join_t *j = NULL;
  if (c->desk && S->join_mode != 0 && !c->desk->closed) {
    int sid = S->join_mode == 1 ? c->sid : S->join_mode == 2 ? c->sid % 3 + 1 : 0;
    j = join_new(u, c->desk, sid, &ticket);
  }
  int joins = j && !c->desk->stopped;
  if (joins) join_on(u, j); /* before the call: the connection may come back inside it, with its id */
  account_all();
  bytes_t unread = u->unread;
  memset(&u->unread, 0, sizeof u->unread);
  int was_needing = c->needing;
  /* Before the call: the lending may begin, and even end, inside it. */
  c->lent = u;
  u->lent_to = c;
  c->lend_start = c->at;
  c->answers.n = 0;
  put(&c->expected, unread.d, unread.n);
  put(&c->answers, unread.d, unread.n);
  c->counted_cl += (double)unread.n; /* C counts them as it relays them */
  c->needing = 0;
  client_t *was_attaching = S->attaching;
  S->attaching = c;
  int r = lp_client_attach(c->k, u->conn, unread.d ? unread.d : (const unsigned char *)"", unread.n, NULL, 0, c->named.n ? c->named.d : NULL, c->named.n, j ? &ticket : NULL);
  S->attaching = was_attaching;
  if (r >= 0) c->named.n = 0;
  if (verbose) fprintf(stderr, "pool: attach connection %d to client %d with %zu unread bytes, ticket %d: %d\n", u->index, c->index, unread.n, j ? j->id : 0, r);
  if (r >= 0 && r != joins) fail("client %d: lp_client_attach returned %d with %s", c->index, r, joins ? "a ticket for its desk" : j ? "a ticket it may not take" : "no ticket");
  if (r == -1 && joins) {
    if (j->lefts) fail("client %d: lp_client_attach refused, and connection %d left the desk", c->index, u->index);
    j->made = j->on = 0;
    u->join = NULL;
  }
  if (r < 0) {
    c->lent = NULL;
    u->lent_to = NULL;
    c->expected.n -= unread.n;
    c->answers.n = 0;
    c->counted_cl -= (double)unread.n;
    c->needing = was_needing;
    u->unread = unread;
    return -1;
  }
  if (!was_needing) fail("client %d: lp_client_attach accepted with no `need`", c->index);
  c->attaches++;
  bytes_free(&unread);
  return 0;
}

/* ---------- the peers ---------- */

/* Turns of the loop (support.h; the client's linger timer is stopped as it starts, see drain()). */
static void run_loop(int times) { run_loop_keeping(&S->loop, times, desk_timer); }

static void cl_flush(client_t *c, size_t max) {
  if (c->fd < 0 || c->shut || c->pending.n == 0) return;
  size_t n = max < c->pending.n ? max : c->pending.n;
  ssize_t w = send(c->fd, c->pending.d, n, MSG_DONTWAIT | MSG_NOSIGNAL);
  if (w > 0) {
    put(&c->sent, c->pending.d, (size_t)w);
    drop_front(&c->pending, (size_t)w);
  }
}

static void cl_read(client_t *c, size_t max) {
  if (c->fd < 0 || c->eof || c->stopped) return;
  unsigned char b[65536];
  if (max > sizeof b) max = sizeof b;
  if (max == 0) return;
  ssize_t r = recv(c->fd, b, max, MSG_DONTWAIT);
  if (r > 0) put(&c->got, b, (size_t)r);
  else if (r == 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) c->eof = 1;
  check_client_bytes(c);
}

/* The client's bytes: units the fast path carries and everything else, cut or whole. */
static void make_client_bytes(size_t salt, bytes_t *out) {
  unsigned kind = in_u8();
  switch (kind % 8) {
    case 0: /* raw bytes of the input */
      for (size_t n = in_u8(); n > 0; n--) put_u8(out, in_u8());
      break;
    case 1: case 2: put_client_message(out, 0); break; /* a Query */
    case 3: case 4: { /* an extended sequence: Parse, Bind, Describe, Execute, Sync, as the bits say */
      unsigned parts = in_u8();
      if (!(parts & 1)) put_client_message(out, 1);
      if (!(parts & 2)) put_client_message(out, 2);
      if (parts & 4) put_client_message(out, 3);
      if (!(parts & 8)) put_client_message(out, 4);
      if (parts & 16) put_client_message(out, 7);
      if (!(parts & 32)) put_client_message(out, 5);
      break;
    }
    case 5: put_client_message(out, in_u8()); break; /* any one message */
    case 6: { /* a Query of up to 128 KiB, or one whose length says more than a unit may hold */
      size_t body = (size_t)(in_u8() % 128 + 1) * 1024;
      if (kind & 0x80) {
        put(out, "Q\x00\x10\x00\x10SELECT", 11);
        break;
      }
      put_u8(out, 'Q');
      put_u32(out, (uint32_t)(body + 5));
      bytes_t text = { 0 };
      put(&text, "select ", 7);
      while (text.n < body) put_u8(&text, "abcdefghijklmnopqrstuvwxyz "[(text.n * 7 + salt) % 27]);
      put(out, text.d, body);
      put_u8(out, 0);
      bytes_free(&text);
      break;
    }
    default: { /* a message cut short: its rest may come later, as raw bytes */
      bytes_t whole = { 0 };
      put_client_message(&whole, in_u8());
      put(out, whole.d, whole.n - 1 - in_u8() % (whole.n - 1));
      bytes_free(&whole);
      break;
    }
  }
}

/* The server's answers: what Postgres sends, and what it should not. */
static void make_server_bytes(upstream_t *u, bytes_t *out) {
  unsigned kind = in_u8() % 8;
  if (kind == 0) { /* raw bytes of the input: anything, even lying lengths */
    for (size_t n = in_u8(); n > 0; n--) put_u8(out, in_u8());
  } else if (kind <= 3) {
    for (unsigned m = 1 + in_u8() % 4; m > 0; m--) {
      static const char types[] = "DDCZZZSNEA12n";
      int type = types[in_u8() % (sizeof types - 1)];
      bytes_t body = { 0 };
      if (type == 'Z') put_u8(&body, "IITE"[in_u8() % 4]);
      else if (type == 'S') put(&body, "application_name\0fuzz\0", 22);
      else if (type == 'C' && S->desks_opened) { /* with a desk: sometimes a tag of session state (LP_LENT_LEAKED) */
        static const char *const tags[] = { "SELECT 1", "SET", "LISTEN", "DISCARD ALL" };
        const char *tag = tags[in_u8() % 4];
        put(&body, tag, strlen(tag) + 1);
      } else if (type == 'C') put(&body, "SELECT 1", 9);
      else if (type != '1' && type != '2' && type != 'n') put_pattern(&body, in_u8() % 64, u->srv.sent.n);
      put_message(out, type, &body);
      bytes_free(&body);
    }
  } else if (kind == 4) { /* one large DataRow */
    size_t body = (size_t)(in_u8() % 128 + 1) * 1024;
    put_u8(out, 'D');
    put_u32(out, (uint32_t)(body + 4));
    put_pattern(out, body, u->srv.sent.n);
  } else if (kind == 5) { /* a message cut short: its rest may come in a later write */
    put_u8(out, 'D');
    put_u32(out, 200);
    put_pattern(out, in_u8() % 200, u->srv.sent.n);
  } else if (kind == 6) { /* COPY IN, which the fast path cannot carry, or a ParameterStatus beyond what is kept */
    if (in_u8() & 1) {
      put(out, "G\0\0\0\7\0\0\0", 8);
    } else {
      bytes_t body = { 0 };
      put(&body, "x\0", 2);
      put_pattern(&body, (size_t)(in_u8() % 4 + 63) * 1024, 1);
      put_u8(&body, 0);
      put_message(out, 'S', &body);
      bytes_free(&body);
    }
  } else { /* ReadyForQuery alone */
    put(out, "Z\0\0\0\5", 5);
    put_u8(out, "ITE"[in_u8() % 3]);
  }
}

/* The cooperating server: CommandComplete and ReadyForQuery (idle) for every Query and Sync it has read. */
static void server_answer(upstream_t *u) {
  bytes_t out = { 0 };
  while (u->answered + 5 <= u->srv.got.n) {
    const unsigned char *m = u->srv.got.d + u->answered;
    uint32_t len = be32(m + 1);
    if (len < 4) {
      u->answered = u->srv.got.n; /* the check of what it read says what went wrong */
      break;
    }
    if (u->answered + 1 + len > u->srv.got.n) break;
    static const unsigned char done[] = "C\0\0\0\015SELECT 1\0" "Z\0\0\0\5I";
    if (m[0] == 'Q' || m[0] == 'S') put(&out, done, sizeof done - 1);
    u->answered += 1 + len;
  }
  if (out.n && server_write(&u->srv, out.d, out.n) && verbose) fprintf(stderr, "server %d: answers %zu bytes\n", u->index, out.n);
  bytes_free(&out);
}

static void srv_read(upstream_t *u, size_t max) {
  server_read(&u->srv, max);
  check_server_bytes(u);
}

/* ---------- opening ---------- */

static void open_client(client_t *c) {
  int fds[2];
  connected_pair((S->config & CFG_TCP_CLIENT) != 0, fds);
  set_nonblocking(fds[1]);
  if ((S->config & CFG_SMALL) && !(S->config & CFG_TCP_CLIENT)) {
    small_buffers(fds[0], 4096);
    small_buffers(fds[1], 4096);
  }
  c->fd = fds[1];
  c->open = 1;
  const char *error = NULL;
  c->k = lp_client_open(&S->loop, fds[0], &client_callbacks, c, c->counters, NULL, &error);
  if (!c->k) fail("lp_client_open: %s", error ? error : "?");
  if (verbose) fprintf(stderr, "client %d: open\n", c->index);
}

/* A connection, logged in: the TLS handshake and the startup message's answer, both peers cooperating. */
static void open_upstream(upstream_t *u) {
  const char *saved = phase;
  phase = "login";
  int fds[2];
  connected_pair((S->config & CFG_TCP_UP) != 0, fds);
  set_nonblocking(fds[1]);
  server_init(&u->srv, (S->config & CFG_TLS12) ? server_ctx_tls12 : server_ctx, fds[1]);
  u->open = 1;
  const char *error = NULL;
  lp_conn *conn = lp_conn_connect(&S->loop, S->ctx, fds[0], "localhost", NULL, &conn_callbacks, u, &error);
  if (!conn) fail("lp_conn_connect: %s", error ? error : "?");
  if (!u->ends) u->conn = conn;
  for (int turns = 0; turns < 200 && u->conn && !u->handshake_ok; turns++) {
    server_read(&u->srv, 65536);
    server_flush(&u->srv, SIZE_MAX);
    run_loop(1);
  }
  if (!u->handshake_ok) fail("connection %d: no handshake", u->index);
  static const unsigned char startup[8] = { 0, 0, 0, 8, 0, 3, 0, 0 };
  if (lp_conn_write(u->conn, startup, sizeof startup) < 0) fail("connection %d: the startup message was refused", u->index);
  put(&u->up_expected, startup, sizeof startup);
  for (int turns = 0; turns < 200 && u->srv.got.n < sizeof startup; turns++) {
    run_loop(1);
    server_read(&u->srv, 65536);
  }
  if (u->srv.got.n != sizeof startup) fail("connection %d: the server read %zu bytes of the startup message", u->index, u->srv.got.n);
  u->answered = sizeof startup;
  static const unsigned char login[] = "R\0\0\0\10\0\0\0\0" "S\0\0\0\031client_encoding\0UTF8\0" "K\0\0\0\14\0\0\0\1\0\0\0\2" "Z\0\0\0\5I";
  u->pool_outstanding = 1;
  if (!server_write(&u->srv, login, sizeof login - 1)) fail("connection %d: the server could not write the login", u->index);
  for (int turns = 0; turns < 200 && u->conn && u->pool_outstanding > 0; turns++) {
    server_flush(&u->srv, SIZE_MAX);
    run_loop(1);
  }
  if (u->pool_outstanding > 0) fail("connection %d: the login's answer did not arrive", u->index);
  u->logged_in = 1;
  if (verbose) fprintf(stderr, "connection %d: logged in\n", u->index);
  phase = saved;
}

/* ---------- the script ---------- */

/* The open client (or connection) the step names: `which` among those opened so far. */
static client_t *pick_client(unsigned which) {
  int n = 0;
  for (int i = 0; i < MAX_CLIENTS; i++) n += S->clients[i].open;
  if (n == 0) return NULL;
  for (int i = 0, k = (int)(which % (unsigned)n); i < MAX_CLIENTS; i++)
    if (S->clients[i].open && k-- == 0) return &S->clients[i];
  return NULL;
}

static upstream_t *pick_upstream(unsigned which) {
  int n = 0;
  for (int i = 0; i < MAX_CONNS; i++) n += S->ups[i].open;
  if (n == 0) return NULL;
  for (int i = 0, k = (int)(which % (unsigned)n); i < MAX_CONNS; i++)
    if (S->ups[i].open && k-- == 0) return &S->ups[i];
  return NULL;
}

static void step(void) {
  unsigned op = in_u8(), which = op / 24;
  client_t *c = pick_client(which);
  upstream_t *u = pick_upstream(which);
  if (verbose) fprintf(stderr, "step %u (%u): client %d, connection %d\n", op % 24, op, c ? c->index : -1, u ? u->index : -1);
  bytes_t b = { 0 };
  switch (op % 24) {
    case 0: case 1: /* the client sends */
      make_client_bytes(c->sent.n, &b);
      put(&c->pending, b.d, b.n);
      cl_flush(c, SIZE_MAX);
      break;
    case 2: cl_flush(c, 1 + in_size(70000)); break;
    case 3: cl_read(c, 1 + in_size(70000)); break;
    case 4: case 5: /* the server answers */
      make_server_bytes(u, &b);
      server_write(&u->srv, b.d, b.n);
      break;
    case 6: server_flush(&u->srv, 1 + in_size(70000)); break;
    case 7: srv_read(u, 1 + in_size(70000)); break;
    case 8: case 9:
      if (op % 24 == 9 && S->desk) usleep(1000); /* with a desk, time for its wait timeout and check delay to pass */
      run_loop(1 + in_u8() % 4);
      break;
    case 10: engine_fast(c, in_u8()); break;
    case 11: attach(c, u); break;
    case 12: engine_js(c); break;
    case 13: engine_write(c); break;
    case 14: if (which & 1) engine_close(c); else engine_end(c); break;
    case 15:
      if (c->k) {
        c->paused = which & 1;
        lp_client_pause(c->k, c->paused);
      }
      break;
    case 16: /* the client's end: a FIN, a close, a reset (TCP; a socketpair closed with bytes unread resets too), or no more reading */
      if (c->fd < 0) break;
      if (which % 4 == 0) {
        if (c->pending.n) c->lossy = 1;
        shutdown(c->fd, SHUT_WR);
        c->shut = c->peer_gone = 1;
      } else if (which % 4 == 3) {
        shutdown(c->fd, SHUT_RD);
        c->stopped = c->lossy = 1;
      } else {
        peer_close(&c->fd, &c->shut, &c->eof, which % 4 == 2);
        c->lossy = c->peer_gone = 1;
      }
      break;
    case 17: /* the server's end: close_notify (and FIN), FIN, a close, a reset */
      u->faults = 1;
      if (which % 4 == 0) {
        server_close_notify(&u->srv);
        if (which & 4) {
          server_flush(&u->srv, SIZE_MAX);
          server_fin(&u->srv);
        }
      } else if (which % 4 == 1) {
        server_fin(&u->srv);
      } else {
        peer_close(&u->srv.fd, &u->srv.shut, &u->srv.eof, which % 4 == 3);
      }
      break;
    case 18: pool_query(u, (which & 1) ? "SELECT 1" : "ROLLBACK"); break;
    case 19: /* the state the engine reads; or a step with the desk */
      if (which & 1) {
        desk_step(which, u);
        break;
      }
      for (int i = 0; i < MAX_CLIENTS; i++) {
        client_t *o = &S->clients[i];
        if (!o->k) continue;
        int lent, running, desk_id;
        double idle;
        lp_client_state(o->k, &lent, &running, &idle, &desk_id);
        if (lent != (o->lent != NULL)) fail("client %d: lp_client_state says lent %d, it is %d", o->index, lent, o->lent != NULL);
        if (running && !lent) fail("client %d: running with nothing lent", o->index);
        int ticket = o->lent && o->lent->join ? o->lent->join->id : 0;
        if (desk_id != ticket) fail("client %d: lp_client_state says desk id %d, the lent connection's ticket is %d", o->index, desk_id, ticket);
      }
      desk_check(S->desk);
      places_check();
      if (u->conn && !u->session) {
        int running;
        double idle;
        lp_conn_state(u->conn, &running, &idle);
        if (running) fail("connection %d: a query runs, with no relay", u->index);
      }
      break;
    case 20: /* another client, or connection */
      for (int i = 0; i < MAX_CLIENTS && !(which & 1); i++)
        if (!S->clients[i].open) {
          open_client(&S->clients[i]);
          break;
        }
      for (int i = 0; i < MAX_CONNS && (which & 1); i++)
        if (!S->ups[i].open) {
          open_upstream(&S->ups[i]);
          break;
        }
      break;
    case 21: /* the pool's reader pauses the connection, or resumes it; or the pool closes it */
      if (!pool_holds(u)) break;
      if (which % 3 == 2) {
        pool_close(u);
      } else {
        u->paused = which % 3 == 1;
        lp_conn_pause(u->conn, u->paused);
      }
      break;
    case 22: server_answer(u); break;
    default: { /* the pool's idle connection is lent to whoever needs one, or offered to the desk's waiting clients */
      upstream_t *idle = idle_upstream();
      if (idle && S->desk && (which & 1)) {
        desk_offer(S->desk, idle, (int)(which / 2 % 3) + 1);
        break;
      }
      for (int i = 0; i < MAX_CLIENTS && idle; i++)
        if (S->clients[i].needing && S->clients[i].k) {
          attach(&S->clients[i], idle);
          break;
        }
      break;
    }
  }
  bytes_free(&b);
}

/* ---------- the end ---------- */

static size_t moved(void) {
  size_t n = 0;
  for (int i = 0; i < MAX_CLIENTS; i++) n += S->clients[i].sent.n + S->clients[i].got.n + S->clients[i].at + (size_t)S->clients[i].counters[1];
  for (int i = 0; i < MAX_CONNS; i++) n += S->ups[i].srv.flushed + S->ups[i].srv.got.n + S->ups[i].srv_at + S->ups[i].srv.sent.n;
  for (int i = 0; i < MAX_SESSIONS; i++) n += S->sessions[i].stream.n + S->sessions[i].got.n + (size_t)S->sessions[i].counters[0] + (size_t)S->sessions[i].counters[1];
  return n;
}

static int desk_waiting(void) {
  if (!S->desk) return 0;
  int idle, count, waiting, resetting;
  double max_wait;
  lp_desk_stats(S->desk->handle, &idle, &count, &waiting, &max_wait, &resetting);
  return waiting;
}

/* The pool as it runs (pool.ts): tells the desk the truth about its room and its waiting clients, wakes the desk's when it has room. */
static void pool_tells_desk(void) {
  desk_t *k = S->desk;
  if (!k) return;
  int needing = 0;
  for (int i = 0; i < MAX_CLIENTS; i++) needing |= S->clients[i].k && S->clients[i].needing;
  int room = idle_upstream() != NULL;
  if (room != k->room || needing != k->js_waiting) {
    if (verbose) fprintf(stderr, "pool: desk %d: room %d, js_waiting %d\n", k->index, room, needing);
    k->room = room;
    k->js_waiting = needing;
    lp_desk_set(k->handle, room, needing);
  }
  if (room && desk_waiting() > 0) lp_desk_wake(k->handle);
}

/* Both kinds of peer do their part until nothing moves. */
static void cooperate(void) {
  enum { STALLED = 12 };
  int waited = 0;
  for (int stalled = 0, turns = 0; stalled < STALLED && turns < 5000; turns++) {
    size_t before = moved();
    pool_tells_desk();
    for (int i = 0; i < MAX_CLIENTS; i++) {
      client_t *c = &S->clients[i];
      if (!c->open) continue;
      if (c->k && c->paused) {
        c->paused = 0;
        lp_client_pause(c->k, 0);
      }
      if (c->k && c->needing) {
        upstream_t *u = idle_upstream();
        if (!u && S->desk) { /* the desk's idle connections are the pool's too (pool.ts, #takeIdle) */
          desk_reclaim(S->desk, 0, 1);
          u = idle_upstream();
        }
        if (u) attach(c, u);
      }
      cl_flush(c, SIZE_MAX);
      cl_read(c, 65536);
    }
    for (int i = 0; i < MAX_SESSIONS; i++) {
      session_client_t *s = &S->sessions[i];
      if (!s->open) continue;
      sess_flush(s, SIZE_MAX);
      sess_read(s, 65536);
    }
    for (int i = 0; i < MAX_CONNS; i++) {
      upstream_t *u = &S->ups[i];
      if (!u->open) continue;
      if (u->paused && pool_holds(u)) {
        u->paused = 0;
        lp_conn_pause(u->conn, 0);
      }
      srv_read(u, 65536);
      server_answer(u);
      server_flush(&u->srv, SIZE_MAX);
    }
    run_loop(1);
    stalled = moved() == before ? stalled + 1 : 0;
    /* A client waiting on the desk is served, or goes to `need` at the wait timeout: a few ms. */
    if (desk_waiting() > 0 && waited++ < 300) {
      usleep(1000);
      stalled = 0;
    }
    /* TCP's own timers (delayed ACKs, window probes) need time, not turns. */
    if (stalled > 6 && (S->config & (CFG_TCP_CLIENT | CFG_TCP_UP))) usleep(1000);
  }
}

/*
 * Once the peers cooperated, nothing is left waiting that could go: a client's whole unit was
 * sent (a connection was lent to it) or handed to the engine, every byte a client sent was read,
 * and a server read all that was written to it.
 */
static void check_settled(void) {
  phase = "settled";
  desk_check(S->desk);
  places_check();
  if (desk_waiting() > 0) fail("desk %d: %d clients wait on it after the peers cooperated", S->desk->index, desk_waiting());
  for (int i = 0; i < MAX_CLIENTS; i++) {
    client_t *c = &S->clients[i];
    if (!c->k || c->input_done || c->peer_gone || c->stopped || c->fd < 0) continue;
    /* A lent connection that went wrong may hold the client back (its queue full): the engine closes it. */
    if (c->lent && (c->lent->dead || c->lent->faults || c->lent->srv.broken)) continue;
    size_t total = c->input.n + (c->sent.n - c->sock_in_input);
    if (c->pending.n > 0 && !c->lent) fail("client %d: %zu bytes it sends are not read", c->index, c->pending.n);
    if (!c->fast) {
      if (total != c->at) fail("client %d: in JS mode with %zu bytes of its input not handed to the engine", c->index, total - c->at);
      continue;
    }
    answers_t a;
    read_answers(&c->answers, &a);
    int parsed = 0, bound = 0, made = 0, units = 0, uf;
    for (size_t at = c->lend_start; c->lent && at < c->at;) {
      const unsigned char *unit = input_at(c, at, c->at - at);
      size_t n = unit_contract(unit, c->at - at, parsed, bound, UNIT_LIMIT, at == c->lend_start, &uf);
      if (n == 0 || n == LP_NOT_FAST) break; /* check_lending says so at the back */
      made |= unit_makes(unit, n);
      parsed = (made & LP_LENT_PARSED) != 0;
      bound = (made & LP_LENT_BOUND) != 0;
      units++;
      at += n;
    }
    int answered = !a.broken && a.whole && a.ready == units;
    bytes_free(&a.reports);
    size_t head = total > c->at ? unit_contract(input_at(c, c->at, total - c->at), total - c->at, parsed, bound, UNIT_LIMIT, !c->lent, &uf) : 0;
    if (head == LP_NOT_FAST && c->lent && !answered) continue; /* it waits for the answers, which may never be whole */
    if (head != 0) fail("client %d: after the peers cooperated, a %s waits (%zu bytes in, %s)", c->index, head == LP_NOT_FAST ? "unit for the engine" : "whole fast unit", total - c->at,
                        c->lent ? "a connection lent" : c->needing ? "needing" : "nothing lent");
  }
  for (int i = 0; i < MAX_CONNS; i++) {
    upstream_t *u = &S->ups[i];
    if (!u->conn || u->dead || u->faults || u->srv.broken) continue;
    account_all();
    if (u->srv.got.n != u->up_expected.n) fail("server %d read %zu of the %zu bytes sent to it", u->index, u->srv.got.n, u->up_expected.n);
  }
}

/*
 * The end of every input. The peers cooperate until nothing moves; the engine takes back what
 * waits for a connection none can give, and they cooperate again; then the checks of a settled
 * session. Then the engine ends or closes every client (each peer answers a FIN with a close),
 * the pool closes every connection, and all must end within a few turns: the client's linger
 * timer is stopped as it starts, so a client only that timer would end shows as a hang.
 */
static void drain(void) {
  phase = "drain";
  cooperate();
  for (int i = 0; i < MAX_CLIENTS; i++)
    if (S->clients[i].k && S->clients[i].needing) engine_js(&S->clients[i]);
  cooperate();
  check_settled();
  phase = "closing";
  if (!S->close_desk_last) desk_close(S->desk);
  for (int i = 0; i < MAX_CLIENTS; i++) {
    client_t *c = &S->clients[i];
    if (c->k && (S->config & CFG_END)) engine_end(c);
    else if (c->k) engine_close(c);
  }
  /* The sessions' clients leave: a Terminate and a FIN (CFG_END), or a close. */
  for (int i = 0; i < MAX_SESSIONS; i++) {
    session_client_t *s = &S->sessions[i];
    if (s->fd < 0) continue;
    if (S->config & CFG_END) {
      put(&s->pending, TERMINATE, sizeof TERMINATE);
      sess_flush(s, SIZE_MAX);
      shutdown(s->fd, SHUT_WR);
      s->shut = 1;
    } else {
      peer_close(&s->fd, &s->shut, &s->eof, 0);
    }
  }
  int turns = 0;
  for (int open = 1; open && turns < 300; turns++) {
    open = 0;
    for (int i = 0; i < MAX_CLIENTS; i++) {
      client_t *c = &S->clients[i];
      if (!c->open) continue;
      cl_read(c, 65536);
      if (c->eof || c->stopped) peer_close(&c->fd, &c->shut, &c->eof, 0);
      open |= c->k != NULL;
    }
    int sessions = 0;
    for (int i = 0; i < MAX_SESSIONS; i++) {
      session_client_t *s = &S->sessions[i];
      if (!s->open) continue;
      sess_flush(s, SIZE_MAX);
      sess_read(s, 65536);
      if (s->eof || s->stopped) peer_close(&s->fd, &s->shut, &s->eof, 0);
      sessions += s->tolds == 0;
    }
    open |= sessions > 0;
    for (int i = 0; i < MAX_CONNS; i++) {
      upstream_t *u = &S->ups[i];
      if (!u->open) continue;
      if (pool_holds(u)) pool_close(u);
      srv_read(u, 65536);
      if (u->resetting) { /* the server answers the reset; one whose answer never completes goes (the sweep is the pool's, and stops with it) */
        server_answer(u);
        server_flush(&u->srv, SIZE_MAX);
        if (turns > 50) {
          u->faults = 1;
          peer_close(&u->srv.fd, &u->srv.shut, &u->srv.eof, 0);
        }
      }
      open |= u->conn != NULL;
    }
    /* The desk last: once its clients are gone (then its end comes at once, or as its connections leave). */
    int clients = sessions;
    for (int i = 0; i < MAX_CLIENTS; i++) clients += S->clients[i].k != NULL;
    if (!clients) desk_close(S->desk);
    for (int i = 0; i < S->desks_opened; i++) open |= S->desks[i].handle != NULL;
    run_loop(1);
    if (turns > 100) usleep(1000);
  }
  for (int i = 0; i < MAX_CLIENTS; i++)
    if (S->clients[i].k) fail("client %d did not end (%d turns after the engine ended it)", i, turns);
  for (int i = 0; i < MAX_CONNS; i++)
    if (S->ups[i].conn) fail("connection %d did not end (%d turns after the pool closed it)", i, turns);
  for (int i = 0; i < S->desks_opened; i++)
    if (S->desks[i].handle) fail("desk %d did not end (%d turns after it was closed)", i, turns);
  for (int i = 0; i < MAX_SESSIONS; i++)
    if (S->sessions[i].open && S->sessions[i].tolds == 0) fail("session %d did not end (%d turns after its client left)", i, turns);
}

static void verify_session(void) {
  phase = "checks";
  for (int i = 0; i < MAX_CLIENTS; i++) {
    client_t *c = &S->clients[i];
    if (!c->open) continue;
    if (verbose) fprintf(stderr, "client %d: sent %zu, got %zu of %zu, input %zu handed on %zu, attaches %d, backs %d, counters [%g, %g]\n", i, c->sent.n, c->got.n, c->expected.n,
                         c->input.n, c->at, c->attaches, c->backs, c->counters[0], c->counters[1]);
    if (c->ends != 1) fail("client %d: %d end callbacks", i, c->ends);
    if (c->backs != c->attaches) fail("client %d: %d lendings, %d came back", i, c->attaches, c->backs);
    check_client_bytes(c);
  }
  for (int i = 0; i < MAX_CONNS; i++) {
    upstream_t *u = &S->ups[i];
    if (!u->open) continue;
    if (u->ends != 1) fail("connection %d: %d end callbacks", i, u->ends);
    if (u->released_by) fail("connection %d: its lending to client %d ended with neither `back` nor a stay on the desk", i, u->released_by->index);
    check_server_bytes(u);
  }
  for (int i = 0; i < S->joins_made; i++) {
    join_t *j = &S->joins[i];
    if (j->made && (j->on || j->lefts != 1)) fail("ticket %d (connection %d, desk %d): %s, left %d times", j->id, j->up, j->desk->index, j->on ? "still on the desk" : "off", j->lefts);
  }
  for (int i = 0; i < S->desks_opened; i++)
    if (S->desks[i].ends != 1) fail("desk %d: %d end callbacks", i, S->desks[i].ends);
  for (int i = 0; i < MAX_SESSIONS; i++) {
    session_client_t *s = &S->sessions[i];
    if (!s->open) continue;
    if (verbose) fprintf(stderr, "session %d: sent %zu (%zu before), got %zu of %zu, counters [%g, %g], farewells %d\n", i, s->stream.n, s->first_n, s->got.n, s->expected.n, s->counters[0],
                         s->counters[1], s->farewells);
    if (s->tolds != 1) fail("session %d: %d `session` callbacks", i, s->tolds);
    check_session_bytes(s);
  }
}

static void free_session(void) {
  for (int i = 0; i < MAX_CLIENTS; i++) {
    client_t *c = &S->clients[i];
    if (c->fd >= 0) close(c->fd);
    bytes_free(&c->pending);
    bytes_free(&c->sent);
    bytes_free(&c->got);
    bytes_free(&c->input);
    bytes_free(&c->expected);
    bytes_free(&c->held);
    bytes_free(&c->answers);
    bytes_free(&c->named);
  }
  for (int i = 0; i < MAX_CONNS; i++) {
    upstream_t *u = &S->ups[i];
    if (u->open) server_free(&u->srv);
    bytes_free(&u->up_expected);
    bytes_free(&u->unread);
    bytes_free(&u->reset_answer);
  }
  for (int i = 0; i < MAX_SESSIONS; i++) {
    session_client_t *s = &S->sessions[i];
    if (s->fd >= 0) close(s->fd);
    bytes_free(&s->pending);
    bytes_free(&s->stream);
    bytes_free(&s->got);
    bytes_free(&s->expected);
    bytes_free(&s->relayed);
  }
  for (int i = 0; i < S->desks_opened; i++) bytes_free(&S->desks[i].reset_query);
}

static void run_session(unsigned config) {
  session_t s;
  memset(&s, 0, sizeof s);
  S = &s;
  s.config = config;
  s.descriptors = open_descriptors();
  for (int i = 0; i < MAX_CLIENTS; i++) {
    s.clients[i].index = i;
    s.clients[i].fd = -1;
  }
  for (int i = 0; i < MAX_CONNS; i++) {
    s.ups[i].index = i;
    s.ups[i].srv.fd = -1;
  }
  for (int i = 0; i < MAX_SESSIONS; i++) {
    s.sessions[i].index = i;
    s.sessions[i].fd = -1;
  }
  const char *error = NULL;
  s.ctx = lp_ctx_new(0, 0, NULL, 0, &error);
  if (!s.ctx) fail("lp_ctx_new: %s", error);
  if (uv_loop_init(&s.loop) != 0) fail("uv_loop_init");
  open_upstream(&s.ups[0]);
  open_client(&s.clients[0]);
  if (config & CFG_TWO) open_client(&s.clients[1]);
  phase = "script";
  while (in_left > 0) step();
  drain();
  verify_session();
  free_session();
  lp_ctx_release(s.ctx);
  /* What libuv still has to close (the handles' close callbacks ran: `end` came). */
  uv_run(&s.loop, UV_RUN_NOWAIT);
  if (uv_loop_close(&s.loop) != 0) fail("the loop still holds handles after the end");
  int descriptors = open_descriptors();
  if (descriptors != s.descriptors) fail("%d descriptors open after the session, %d before", descriptors, s.descriptors);
  S = NULL;
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  fuzz_target = "TXCLIENT";
  verbose = getenv("FUZZ_VERBOSE") != NULL;
  signal(SIGPIPE, SIG_IGN); /* as in Node.js: OpenSSL writes the upstream socket with write() */
  make_server();
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
