/*
 * A transaction-mode client and the fast path (see txclient.h). One libuv loop thread; nothing
 * here blocks. The lent connection's plaintext comes through relay.c's sink; what goes to it,
 * through lp_conn_write, which queues and reports the queue's drain to the sink (n == 0).
 *
 * Every callback may call back into this client (write, end, close, attach): after each, the
 * code checks `closing` and whether the state it was in still holds. The struct is freed only
 * from libuv's close callbacks, never inside a callback to the caller.
 */
#include "txclient.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "buffer.h"

#define READ_SIZE 65536
/* A unit longer than this goes to the engine (which streams nothing either, but has its own limits). */
#define UNIT_LIMIT (1u << 20)
/* The client's queue above which the lent connection is not read, and the connection's above which the client is not. */
#define HIGH_WATER (256u << 10)
/* ParameterStatus messages kept for the engine per lending. */
#define REPORTS_LIMIT 65536
#define LINGER_MS 5000
/* Session mode: what a reset may answer before it counts as failed. */
#define RESET_ANSWER_LIMIT 65536

const char *const LP_BACK_NAMES[] = { "", "released", "handover", "client_gone", "upstream_gone", "settings_failed" };

/* Follows the upstream's messages during a lending. */
typedef struct {
  unsigned char header[5];
  int have;            /* header bytes read of the current message */
  uint32_t remaining;  /* body bytes still to come */
  int type;
  int status_due;      /* a ReadyForQuery whose status byte is next */
  unsigned char tag[12]; /* the start of a CommandComplete's tag */
  size_t tag_have;
} scan_t;

typedef struct desk_entry desk_entry;

struct lp_client {
  uv_loop_t *loop;
  const lp_client_callbacks *cb;
  void *user;
  uv_poll_t *poll;    /* allocated apart: freed by its close callback */
  uv_timer_t *linger; /* while the socket waits for the client's end after our FIN */
  int fd;
  int polling;
  int fast;
  int js_paused;
  int read_done;  /* the client's end (or an error) was read */
  int write_shut; /* our FIN went, or writing failed */
  int want_shut;  /* FIN once `out` is written */
  int want_drain; /* the engine was told to wait for the queue */
  int closing;
  int open_handles;
  int needing;    /* `need` was called: a unit waits for a connection */
  int up_full;    /* the lent connection's queue is over HIGH_WATER: the client is not read */
  buf_t in;       /* fast mode: the client's bytes not yet sent */
  buf_t out;      /* for the client */
  lp_conn *conn;  /* lent */
  int outstanding;/* units sent whose ReadyForQuery has not come */
  int status;
  int flags;      /* LP_LENT_* */
  int sent;       /* a unit went in this lending: until then nothing is to be released */
  int hidden;     /* ReadyForQuery messages still to come that answer the caller's prefix, not the client */
  int settings_wait; /* the client's units wait for the prefix's answers (it may fail: see LP_BACK_SETTINGS_FAILED) */
  size_t head_named; /* the waiting unit names a client's statement (its length): it goes only rewritten */
  int broken;     /* the upstream sent what the fast path cannot follow */
  scan_t scan;
  buf_t reports;
  double *counters, *totals;
  uint64_t last_activity;
  lp_desk *desk;      /* whose connections it takes without asking (lp_client_desk) */
  int sid;
  desk_entry *entry;  /* the lent connection is the desk's */
  int hold;           /* this lending goes back to the caller at its end, not on (lp_client_hold) */
  int waiting;        /* on the desk's queue (needing too) */
  uint64_t wait_since;
  lp_client *wprev, *wnext;
};

/* A connection on a desk: lent to `client`, or idle. */
struct desk_entry {
  lp_desk *desk;
  lp_conn *conn;
  int id, sid;
  uint64_t expires;
  uint64_t idle_since;
  lp_client *client;
  int busy;          /* session mode: ENTRY_SESSION (a client's session has it) or ENTRY_RESETTING */
  int abandoned;     /* its session's client left during a query */
  int reset_failed;  /* the sweep ended a reset that took too long */
  int hold;          /* its session's end goes to the caller (lp_desk_hold) */
  uint64_t reset_since;
  buf_t answer;      /* the reset's answer so far */
  desk_entry *prev, *next;
};
enum { ENTRY_SESSION = 1, ENTRY_RESETTING };

struct lp_desk {
  uv_loop_t *loop;
  const lp_desk_callbacks *cb;
  void *user;
  uv_timer_t *timer; /* the first waiting client's wait timeout */
  desk_entry *entries;
  int count, idle;
  lp_client *head, *tail; /* waiting, first come first */
  int waiting;
  int room, js_waiting, stopped, closed, freeing;
  int unstarve; /* a connection left: waiting clients of settings no connection here has go to the caller (at the timer) */
  int spill;    /* a connection went idle with clients of other settings waiting: as many go to the caller (at the timer) */
  uint64_t wait_timeout, check_delay;
  int resetting;     /* session mode: connections whose reset runs */
  buf_t reset_query; /* session mode: the message that resets a connection after its session */
  int refs; /* clients whose `desk` this is, and calls under way that may close it */
  double *counts, *waits;
  size_t waits_cap;
};

static unsigned char scratch[READ_SIZE];

static uint32_t be32(const unsigned char *p) { return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]; }

/* ---------- what the fast path carries ---------- */

static int lower(int c) { return c >= 'A' && c <= 'Z' ? c + 32 : c; }
static int letter(int c) { c = lower(c); return c >= 'a' && c <= 'z'; }
static int space(int c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

static int has_word(const unsigned char *text, size_t n, size_t at, const char *word) {
  size_t len = strlen(word);
  if (at + len > n) return 0;
  for (size_t i = 0; i < len; i++) if (lower(text[at + i]) != word[i]) return 0;
  return 1;
}

/*
 * Words whose commands leave session state or drop statements (the engine's LEAKY_TEXT,
 * LEAKY_TAGS, set_config, DISCARD, DEALLOCATE), or that the engine follows (COPY), anywhere in
 * the text: in a name or a string too, which only sends that text the engine's way. By first
 * letter, so that most characters cost one look.
 */
static const char *const *not_plain(int first) {
  /* EXECUTE runs a prepared statement whose text this never saw; U& spells names with escapes;
     an UPDATE of pg_settings calls set_config. */
  static const char *const a[] = { "advisory", NULL }, *const c[] = { "copy", NULL }, *const d[] = { "discard", "deallocate", "declare", NULL },
                           *const e[] = { "execute", NULL }, *const h[] = { "hold", NULL }, *const l[] = { "listen", "load", NULL },
                           *const p[] = { "prepare", "pg_settings", NULL }, *const r[] = { "reset", NULL }, *const s[] = { "set_config", NULL },
                           *const t[] = { "temp", NULL }, *const u[] = { "u&", NULL };
  switch (first) {
    case 'a': return a;
    case 'c': return c;
    case 'd': return d;
    case 'e': return e;
    case 'h': return h;
    case 'l': return l;
    case 'p': return p;
    case 'r': return r;
    case 's': return s;
    case 't': return t;
    case 'u': return u;
    default: return NULL;
  }
}

int lp_text_plain(const unsigned char *text, size_t n) {
  for (size_t i = 0; i < n; i++) {
    const char *const *words = not_plain(lower(text[i]));
    for (; words && *words; words++) {
      if (has_word(text, n, i, *words)) return 0;
    }
  }
  /* Each command must begin with a letter (no comment, no parenthesis before it), and be no SET
     and no DO block (whose SETs no command tag shows; the engine misses those too). */
  for (size_t i = 0; i <= n;) {
    while (i < n && space(text[i])) i++;
    if (i == n) return 1;
    if (!letter(text[i]) || has_word(text, n, i, "set") || (has_word(text, n, i, "do") && (i + 2 == n || !letter(text[i + 2])))) return 0;
    while (i < n && text[i] != ';') i++;
    i++; /* past the ';' (or the end) */
  }
  return 1;
}

/* A NUL-terminated string at body[at]: the offset past its NUL, or 0 when there is none. */
static size_t string_end(const unsigned char *body, size_t len, size_t at) {
  if (at >= len) return 0;
  const unsigned char *nul = memchr(body + at, 0, len - at);
  return nul ? (size_t)(nul - body) + 1 : 0;
}

size_t lp_unit_length(const unsigned char *data, size_t n, int parsed, int bound, size_t limit, int *named) {
  size_t off = 0;
  if (named) *named = 0;
  /* A sequence with a Flush in it so far: the client may wait for the answers it flushed before it
     sends the rest and the Sync (libpq's pipeline mode does), which a unit would wait for forever. */
  int flushed = 0;
  for (;;) {
    if (n - off < 5) return off + 5 > limit || flushed ? LP_NOT_FAST : 0;
    int type = data[off];
    uint32_t len = be32(data + off + 1);
    if (len < 4 || len > limit || off + 1 + (size_t)len > limit) return LP_NOT_FAST;
    if (n - off < 1 + (size_t)len) return flushed ? LP_NOT_FAST : 0;
    flushed |= type == 'H';
    const unsigned char *body = data + off + 5;
    size_t blen = len - 4;
    size_t end = off + 1 + len;
    switch (type) {
      case 'Q':
        if (off != 0 || blen < 1 || body[blen - 1] != 0 || !lp_text_plain(body, blen - 1)) return LP_NOT_FAST;
        return end;
      case 'P': {
        if (blen < 1 || body[0] != 0) return LP_NOT_FAST; /* a named statement: the engine's */
        size_t query_end = string_end(body, blen, 1);
        if (query_end == 0 || !lp_text_plain(body + 1, query_end - 2)) return LP_NOT_FAST;
        parsed = 1;
        break;
      }
      case 'B':
        /* The unnamed portal, of the unnamed statement, or (`named`) of a client's named one. */
        if (blen < 2 || body[0] != 0) return LP_NOT_FAST;
        if (body[1] == 0 ? !parsed : !named || string_end(body, blen, 1) == 0) return LP_NOT_FAST;
        if (body[1] != 0) *named = 1;
        bound = 1;
        break;
      case 'D':
        if (blen < 2) return LP_NOT_FAST;
        if (body[0] == 'S' && body[1] != 0) {
          if (!named || string_end(body, blen, 1) != blen) return LP_NOT_FAST;
          *named = 1;
        } else if (body[1] != 0 || !(body[0] == 'S' ? parsed : body[0] == 'P' ? bound : 0)) {
          return LP_NOT_FAST;
        }
        break;
      case 'E':
        if (blen < 1 || body[0] != 0 || !bound) return LP_NOT_FAST;
        break;
      case 'H':
        break;
      case 'S':
        return end;
      default:
        return LP_NOT_FAST;
    }
    off = end;
  }
}

/* The flags a unit leaves (its Parse and Bind of the unnamed statement and portal). */
static int unit_flags(const unsigned char *data, size_t n) {
  int flags = 0;
  for (size_t off = 0; off + 5 <= n; off += 1 + be32(data + off + 1)) {
    if (data[off] == 'P') flags |= LP_LENT_PARSED;
    else if (data[off] == 'B') flags |= LP_LENT_BOUND;
  }
  return flags;
}

/* ---------- the socket ---------- */

static void update_poll(lp_client *k);
static void process(lp_client *k);
static void give_back(lp_client *k, enum lp_back how, const char *reason);

static void touch(lp_client *k) { k->last_activity = uv_now(k->loop); }

/* Bytes the fast path moved: `dir` 0 to the upstream, 1 to the client. */
static void count(lp_client *k, int dir, size_t n) {
  if (k->counters) k->counters[dir] += (double)n;
  if (k->totals) k->totals[dir] += (double)n;
}

static void unqueue(lp_client *k);
static void drop_desk(lp_client *k);

/* The client waits for no connection any more (on the desk's queue or the caller's). */
static void stop_needing(lp_client *k) {
  if (k->waiting) unqueue(k);
  k->needing = 0;
}

static void handle_closed(uv_handle_t *handle) {
  lp_client *k = uv_handle_get_data(handle);
  free(handle);
  if (--k->open_handles > 0) return;
  buf_free(&k->in);
  buf_free(&k->out);
  buf_free(&k->reports);
  k->cb->end(k, k->user);
  free(k);
}

/* Closes the socket and the handles; `end` follows from libuv's close callbacks. */
static void teardown(lp_client *k) {
  if (k->closing) return;
  k->closing = 1;
  if (k->conn) give_back(k, LP_BACK_CLIENT_GONE, NULL);
  drop_desk(k);
  k->open_handles = 1 + (k->linger != NULL);
  close(k->fd);
  k->fd = -1;
  uv_close((uv_handle_t *)k->poll, handle_closed);
  if (k->linger) uv_close((uv_handle_t *)k->linger, handle_closed);
}

static void linger_done(uv_timer_t *timer) { teardown(uv_handle_get_data((uv_handle_t *)timer)); }

/* The socket closes after LINGER_MS at the latest, whatever the client does (reads or not, ends or not). */
static void linger(lp_client *k) {
  if (k->linger || k->closing) return;
  k->linger = malloc(sizeof *k->linger);
  if (!k->linger) {
    teardown(k);
    return;
  }
  uv_timer_init(k->loop, k->linger);
  uv_handle_set_data((uv_handle_t *)k->linger, k);
  uv_timer_start(k->linger, linger_done, LINGER_MS, 0);
}

/* Our FIN; the socket closes at the client's end, or after LINGER_MS. */
static void shut(lp_client *k) {
  if (!k->write_shut) {
    k->write_shut = 1;
    buf_free(&k->out);
    shutdown(k->fd, SHUT_WR);
  }
  /* Also when writing had failed already: the socket must close either way (found by the fuzzer). */
  if (k->read_done) teardown(k);
  else linger(k);
}

/* Writes what `out` holds; -1 when the client cannot take it any more. */
static int flush_out(lp_client *k) {
  while (pending(&k->out) > 0 && !k->write_shut) {
    ssize_t w;
    do w = send(k->fd, k->out.data + k->out.off, pending(&k->out), MSG_NOSIGNAL);
    while (w < 0 && errno == EINTR);
    if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;
    if (w <= 0) {
      k->write_shut = 1;
      buf_free(&k->out);
      return -1;
    }
    buf_consumed(&k->out, (size_t)w);
  }
  return 0;
}

static void client_ended(lp_client *k, const char *error);

/* Bytes for the client: sent now when nothing waits before them, else queued. */
static void to_client(lp_client *k, const unsigned char *data, size_t n) {
  if (k->write_shut || n == 0) return;
  if (buf_append(&k->out, data, n) != 0) {
    client_ended(k, "out of memory");
    return;
  }
  if (pending(&k->out) == n && flush_out(k) != 0) client_ended(k, "write failed");
}

/* The client's end (error NULL: its FIN). What it sent before still counts, in JS mode. */
static void client_ended(lp_client *k, const char *error) {
  if (k->read_done || k->closing) return;
  k->read_done = 1;
  if (error) {
    k->write_shut = 1;
    buf_free(&k->out);
  }
  if (k->conn) give_back(k, LP_BACK_CLIENT_GONE, NULL);
  if (k->closing) return;
  if (k->fast) {
    /* A unit that waited for a connection goes nowhere: the engine ends the client's session. */
    k->fast = 0;
    stop_needing(k);
    buf_free(&k->in);
  }
  k->cb->data(k, k->user, NULL, 0, error);
  if (!k->closing && k->write_shut) teardown(k);
}

static int may_read(const lp_client *k) {
  if (k->read_done || k->closing) return 0;
  if (!k->fast) return !k->js_paused;
  /* Fast mode reads ahead into `in` (a unit waiting for a connection, or for answers, included:
     stopping and starting the poll costs two system calls) up to UNIT_LIMIT, and not while the
     lent connection's queue is full. */
  return !k->up_full && pending(&k->in) < UNIT_LIMIT;
}

static void on_poll(uv_poll_t *handle, int status, int events);

static void update_poll(lp_client *k) {
  if (k->closing) return;
  int events = 0;
  if (may_read(k) || (k->write_shut && !k->read_done)) events |= UV_READABLE;
  if (pending(&k->out) > 0 && !k->write_shut) events |= UV_WRITABLE;
  if (events == k->polling) return;
  k->polling = events;
  if (events) uv_poll_start(k->poll, events, on_poll);
  else uv_poll_stop(k->poll);
}

/* One read; returns whether to read again. */
static int read_once(lp_client *k) {
  ssize_t n;
  do n = recv(k->fd, scratch, READ_SIZE, 0);
  while (n < 0 && errno == EINTR);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;
  if (n <= 0) {
    if (k->write_shut) {
      teardown(k); /* lingering after our FIN: the client's end closes the socket */
      return 0;
    }
    client_ended(k, n < 0 ? strerror(errno) : NULL);
    return 0;
  }
  touch(k);
  if (k->write_shut) return 1; /* after our FIN: read to the client's end, dropped */
  if (!k->fast) {
    k->cb->data(k, k->user, scratch, (size_t)n, NULL);
    return 0;
  }
  if (buf_append(&k->in, scratch, (size_t)n) != 0) {
    client_ended(k, "out of memory");
    return 0;
  }
  process(k);
  return 0;
}

static void on_poll(uv_poll_t *handle, int status, int events) {
  lp_client *k = uv_handle_get_data((uv_handle_t *)handle);
  if (k->closing) return;
  if (status < 0) {
    /* libuv has stopped the poll: nothing more comes from this socket. Its end read already, or
       our FIN sent, nothing is left to wait for (the linger timer would only close it later). */
    k->polling = 0;
    if (k->write_shut || k->read_done) teardown(k);
    else client_ended(k, "socket error");
    return;
  }
  if (events & UV_WRITABLE) {
    if (flush_out(k) != 0) {
      client_ended(k, "write failed");
      if (k->closing) return;
    }
    if (pending(&k->out) == 0) {
      if (k->want_shut) shut(k);
      if (k->closing) return;
      if (k->conn) lp_conn_pause(k->conn, 0); /* the client took it: the lent connection is read again */
      else if (k->want_drain && !k->fast) {
        k->want_drain = 0;
        k->cb->data(k, k->user, (const unsigned char *)"", 0, NULL);
      }
    }
  }
  if (!k->closing && (events & (UV_READABLE | UV_DISCONNECT)) && (may_read(k) || k->write_shut)) read_once(k);
  if (!k->closing) update_poll(k);
}

/* ---------- lending ---------- */

static void sink(lp_conn *c, void *user, const unsigned char *data, size_t n, const char *error);

/* The rest of `in` to the engine, in JS mode. */
static void to_js(lp_client *k) {
  k->fast = 0;
  stop_needing(k);
  if (pending(&k->in) == 0) return;
  /* The bytes leave `in` before the call: the engine may call back in. */
  buf_t rest = k->in;
  memset(&k->in, 0, sizeof k->in);
  k->cb->data(k, k->user, rest.data + rest.off, pending(&rest), NULL);
  buf_free(&rest);
}

static int desk_keeps(const lp_client *k, const desk_entry *e);
static void desk_serve(desk_entry *e);
static void entry_leave(desk_entry *e);

/* The lent connection goes back to the caller with what the lending learnt, or stays on its desk. */
static void give_back(lp_client *k, enum lp_back how, const char *reason) {
  lp_conn *conn = k->conn;
  if (!conn) return;
  desk_entry *entry = k->entry;
  int kept = entry && how == LP_BACK_RELEASED && desk_keeps(k, entry);
  k->conn = NULL;
  k->entry = NULL;
  k->hold = 0;
  k->up_full = 0;
  lp_conn_sink(conn, NULL, NULL);
  /* Back unpaused, as it was lent (NativeUpstream.lend): what comes next goes to the caller's
     reader; or, kept on the desk, to its next reader (desk_serve unpauses it once that is set:
     an unpause reads what OpenSSL holds at once, found by the fuzzer). */
  if (how != LP_BACK_UPSTREAM_GONE && !kept) lp_conn_pause(conn, 0);
  buf_t reports = k->reports, rest = { 0 };
  memset(&k->reports, 0, sizeof k->reports);
  int running = k->outstanding > 0 || k->scan.have != 0; /* answers to come, or one cut short */
  if (how == LP_BACK_HANDOVER || how == LP_BACK_SETTINGS_FAILED) {
    k->fast = 0;
    stop_needing(k);
    rest = k->in;
    memset(&k->in, 0, sizeof k->in);
  }
  k->outstanding = 0;
  memset(&k->scan, 0, sizeof k->scan);
  int flags = k->flags;
  k->flags = 0;
  k->sent = 0;
  k->hidden = 0;
  k->settings_wait = 0;
  if (kept) {
    /* A clean transaction: the desk's next client, or idle there; the caller counts it later. */
    buf_free(&reports);
    entry->client = NULL;
    if (entry->desk->counts) entry->desk->counts[0]++;
    desk_serve(entry);
    return;
  }
  int id = 0;
  if (entry) {
    id = entry->id;
    entry_leave(entry);
  }
  k->cb->back(k, k->user, how, k->status, flags, running, reports.data ? reports.data + reports.off : NULL, pending(&reports),
              rest.data ? rest.data + rest.off : NULL, pending(&rest), reason, id);
  buf_free(&reports);
  buf_free(&rest);
}

static int desk_take(lp_client *k);
static int desk_queue(lp_client *k);
static int readies(const unsigned char *data, size_t n);

/*
 * The first unit of a desk's lending names the client's statements: the caller gives it with the
 * names this connection has them by (`rewrite`), and it goes instead; or, when the connection
 * lacks one, the connection and the unit go to the caller (LP_BACK_HANDOVER, nothing sent).
 * Returns whether to go on with the next unit.
 */
static int send_rewritten(lp_client *k, size_t unit) {
  lp_conn *conn = k->conn;
  size_t len = 0;
  const unsigned char *out = k->cb->rewrite(k, k->user, k->in.data + k->in.off, unit, k->entry->id, &len);
  if (k->closing || k->conn != conn || !k->fast || pending(&k->in) < unit) return 0;
  if (!out || len == 0 || readies(out, len) != 1) {
    give_back(k, LP_BACK_HANDOVER, NULL);
    return 0;
  }
  k->flags |= unit_flags(out, len);
  k->outstanding++;
  k->sent = 1;
  count(k, 0, len);
  touch(k);
  buf_consumed(&k->in, unit);
  if (lp_conn_write(conn, out, len) < 0 && k->conn == conn) give_back(k, LP_BACK_UPSTREAM_GONE, "the server connection closed");
  return !k->closing && k->conn == conn;
}

/*
 * Fast mode: sends the whole units at the head of `in` while a connection is lent; asks for one
 * when a unit waits and none is; goes to JS mode at a unit the fast path does not carry.
 */
static void process(lp_client *k) {
  while (!k->closing && k->fast && !k->needing && !k->up_full && !k->settings_wait) {
    size_t n = pending(&k->in);
    if (n == 0) break;
    const unsigned char *head = k->in.data + k->in.off;
    /* A client's named statement only in the first unit of a lending: the caller rewrites it
       (lp_client_attach, or `rewrite` for a lending of the desk). */
    int named = 0;
    int may_name = !k->conn || (k->entry && !k->sent);
    size_t unit = lp_unit_length(head, n, (k->flags & LP_LENT_PARSED) != 0, (k->flags & LP_LENT_BOUND) != 0, UNIT_LIMIT, may_name ? &named : NULL);
    if (unit == 0) break; /* the rest has yet to come */
    if (unit == LP_NOT_FAST) {
      if (!k->conn) to_js(k);
      else if (k->outstanding == 0 && k->scan.have == 0 && k->scan.remaining == 0) give_back(k, LP_BACK_HANDOVER, NULL);
      break; /* else at the answer that settles the transaction */
    }
    if (!k->conn) {
      if (k->desk) {
        /* The desk's connection at once, or the desk's queue: no call to the caller (but `rewrite`). */
        if (desk_take(k)) continue;
        if (k->closing || !k->fast || k->needing || k->conn) continue; /* the loop's condition decides */
        if (desk_queue(k)) break;
      }
      k->needing = 1;
      k->head_named = named ? unit : 0;
      k->cb->need(k, k->user, named ? head : NULL, named ? unit : 0, 0);
      break;
    }
    if (named) {
      if (!send_rewritten(k, unit)) break;
      continue;
    }
    k->flags |= unit_flags(head, unit);
    k->outstanding++;
    k->sent = 1;
    count(k, 0, unit);
    touch(k);
    lp_conn *conn = k->conn;
    long queued = lp_conn_write(conn, head, unit); /* copies the unit first */
    /* A write that failed at once has called the sink: the connection may be back, the client ended. */
    if (k->closing || k->conn != conn) break;
    buf_consumed(&k->in, unit);
    if (queued < 0) {
      give_back(k, LP_BACK_UPSTREAM_GONE, "the server connection closed");
      break;
    }
    if ((size_t)queued > HIGH_WATER) k->up_full = 1;
  }
  if (!k->closing) update_poll(k);
}

/*
 * A command tag of session state (the engine's LEAKY_TAGS, SET, RESET, DISCARD): what the text
 * filter let through anyway (a prepared statement's EXECUTE is refused there, but a function may
 * hide anything) still marks the connection for the reset.
 */
static int leaky_tag(const unsigned char *tag, size_t n) {
  static const char *const tags[] = { "SET", "RESET", "LISTEN", "PREPARE", "LOAD", "DEALLOCATE", "DISCARD", NULL };
  for (const char *const *t = tags; *t; t++) {
    size_t len = strlen(*t);
    if (n > len && memcmp(tag, *t, len) == 0 && (tag[len] == 0 || tag[len] == ' ')) return 1;
  }
  return 0;
}

/* Follows the upstream's messages: ReadyForQuery settles a unit; ParameterStatus is kept for the engine. */
static size_t scan(lp_client *k, const unsigned char *data, size_t n) {
  scan_t *s = &k->scan;
  size_t hidden = 0; /* the leading bytes of `data` that answer the settings query */
  for (size_t i = 0; i < n && !k->broken;) {
    if (s->have < 5) {
      s->header[s->have++] = data[i++];
      if (s->have < 5) continue;
      s->type = s->header[0];
      uint32_t len = be32(s->header + 1);
      if (len < 4) {
        k->broken = 1;
        break;
      }
      s->remaining = len - 4;
      /* COPY FROM STDIN or COPY BOTH would wait for the client's COPY messages, which go the engine's way. */
      if (s->type == 'G' || s->type == 'W') k->broken = 1;
      s->status_due = s->type == 'Z';
      s->tag_have = 0;
      if (s->type == 'E' && k->hidden) k->flags |= LP_LENT_SETTINGS_FAILED;
      if (s->type == 'S' && !k->hidden && !(k->flags & LP_LENT_REPORTS_LOST)) {
        if (pending(&k->reports) + 5 + s->remaining > REPORTS_LIMIT || buf_append(&k->reports, s->header, 5) != 0) k->flags |= LP_LENT_REPORTS_LOST;
      }
    } else {
      size_t take = n - i < s->remaining ? n - i : s->remaining;
      if (s->type == 'S' && !k->hidden && !(k->flags & LP_LENT_REPORTS_LOST) && buf_append(&k->reports, data + i, take) != 0) k->flags |= LP_LENT_REPORTS_LOST;
      for (size_t t = 0; s->type == 'C' && t < take && s->tag_have < sizeof s->tag; t++) s->tag[s->tag_have++] = data[i + t];
      if (s->status_due && take > 0) {
        k->status = data[i];
        s->status_due = 0;
      }
      s->remaining -= (uint32_t)take;
      i += take;
    }
    if (s->have == 5 && s->remaining == 0) {
      if (s->type == 'Z') k->outstanding--;
      else if (s->type == 'C' && !k->hidden && leaky_tag(s->tag, s->tag_have)) k->flags |= LP_LENT_LEAKED;
      s->have = 0;
      if (k->hidden > 0) {
        hidden = i;
        if (s->type == 'Z') k->hidden--;
      }
    }
  }
  if (k->outstanding < 0) k->broken = 1;
  return k->hidden > 0 ? n : hidden;
}

static void sink(lp_conn *c, void *user, const unsigned char *data, size_t n, const char *error) {
  lp_client *k = user;
  if (k->conn != c) return;
  if (!data) {
    give_back(k, LP_BACK_UPSTREAM_GONE, error);
    return;
  }
  if (n == 0) { /* the connection's queue was written */
    if (k->up_full) {
      k->up_full = 0;
      process(k);
    }
    return;
  }
  touch(k);
  size_t hidden = scan(k, data, n);
  count(k, 1, n - hidden);
  to_client(k, data + hidden, n - hidden);
  if (k->closing || k->conn != c) return;
  if (k->broken) {
    give_back(k, LP_BACK_UPSTREAM_GONE, "the server sent what the fast path cannot relay");
    return;
  }
  if (pending(&k->out) > HIGH_WATER) lp_conn_pause(c, 1);
  if (k->settings_wait && k->hidden == 0) {
    /* The settings are in force, or the client's units go to the engine (which reports the error). */
    k->settings_wait = 0;
    if (k->flags & LP_LENT_SETTINGS_FAILED) {
      give_back(k, LP_BACK_SETTINGS_FAILED, NULL);
      return;
    }
    process(k);
    if (k->closing || k->conn != c) return;
  }
  if (k->outstanding == 0 && k->scan.have == 0 && k->sent) {
    if (k->status == 'I') give_back(k, LP_BACK_RELEASED, NULL);
    if (!k->closing) process(k);
  }
  if (!k->closing) update_poll(k); /* what the client did not take waits for its socket */
}

/* ---------- the desk: the pool's hand-off in C ---------- */

/* Lends `conn` to `k` (fast mode, nothing lent), `entry` its place on a desk (or NULL). */
static void lend(lp_client *k, lp_conn *conn, desk_entry *entry) {
  stop_needing(k);
  k->conn = conn;
  k->entry = entry;
  if (entry) entry->client = k;
  k->outstanding = 0;
  k->status = 'I';
  k->flags = 0;
  k->sent = 0;
  k->hidden = 0;
  k->settings_wait = 0;
  k->broken = 0;
  memset(&k->scan, 0, sizeof k->scan);
  lp_conn_sink(conn, sink, k);
  lp_conn_pause(conn, 0); /* lent unpaused (NativeUpstream.lend): a no-op, unless a backpressure pause was left */
}

static uint64_t deadline_of(lp_desk *d, double in_ms) {
  if (!(in_ms < 1e15)) return UINT64_MAX; /* no expiry (and NaN) */
  return in_ms <= 0 ? 0 : uv_now(d->loop) + (uint64_t)in_ms;
}

/* A connection joins the desk, lent (its client set by lend()); NULL when there is no memory for it. */
static desk_entry *entry_new(lp_desk *d, lp_conn *conn, const lp_desk_join *join) {
  desk_entry *e = calloc(1, sizeof *e);
  if (!e) return NULL;
  e->desk = d;
  e->conn = conn;
  e->id = join->id;
  e->sid = join->sid;
  e->expires = deadline_of(d, join->expires_in_ms);
  e->next = d->entries;
  if (d->entries) d->entries->prev = e;
  d->entries = e;
  d->count++;
  return e;
}

static void desk_maybe_free(lp_desk *d);
static void timer_fired(uv_timer_t *timer);
static void idle_sink(lp_conn *c, void *user, const unsigned char *data, size_t n, const char *error);

/* Idle on the desk: not lent to a client, no session on it, no reset running. */
static int entry_idle(const desk_entry *e) { return !e->client && !e->busy; }

/* The connection leaves the desk (it is the caller's again, its reader unset when it was idle). */
static void entry_leave(desk_entry *e) {
  lp_desk *d = e->desk;
  if (e->prev) e->prev->next = e->next;
  else d->entries = e->next;
  if (e->next) e->next->prev = e->prev;
  d->count--;
  if (entry_idle(e)) {
    d->idle--;
    lp_conn_sink(e->conn, NULL, NULL);
  } else if (e->busy == ENTRY_RESETTING) {
    d->resetting--;
    lp_conn_sink(e->conn, NULL, NULL);
  }
  buf_free(&e->answer);
  free(e);
  /* Clients waiting for a connection of its settings may wait for none now: looked at from the
     timer, outside whatever call this is (the caller may be in the middle of its own bookkeeping). */
  if (d->head && !d->closed) {
    d->unstarve = 1;
    uv_timer_start(d->timer, timer_fired, 0, 0);
  }
  desk_maybe_free(d);
}

/* An idle connection goes out to the caller, for `why`. */
static void entry_out(desk_entry *e, enum lp_desk_out why) {
  lp_desk *d = e->desk;
  int id = e->id;
  d->refs++; /* the callback may close the desk: it is freed after this */
  entry_leave(e);
  d->cb->out(d, d->user, id, why);
  d->refs--;
  desk_maybe_free(d);
}

static void idle_sink(lp_conn *c, void *user, const unsigned char *data, size_t n, const char *error) {
  (void)c;
  (void)error;
  if (data && n == 0) return; /* a write queue drained: nothing to do */
  entry_out(user, data ? LP_DESK_SPOKE : LP_DESK_ENDED);
}

/* A transaction on the desk's connection ended cleanly: whether the connection stays on the desk. */
static int desk_keeps(const lp_client *k, const desk_entry *e) {
  const lp_desk *d = e->desk;
  if (d->stopped || d->js_waiting || k->hold || k->desk != d || k->status != 'I' || pending(&k->reports) > 0) return 0;
  if (k->flags & (LP_LENT_LEAKED | LP_LENT_REPORTS_LOST | LP_LENT_SETTINGS_FAILED)) return 0;
  return uv_now(d->loop) < e->expires && lp_conn_lendable(e->conn);
}

static void record_wait(lp_desk *d, uint64_t since) {
  if (!d->counts || !d->waits) return;
  size_t n = d->counts[1] > 0 ? (size_t)d->counts[1] : 0;
  if (n >= d->waits_cap) return; /* the caller did not read them: not recorded */
  d->waits[n] = (double)(uv_now(d->loop) - since) / 1000.0;
  d->counts[1] = (double)(n + 1);
}

/* `full` when `waits` filled up; after everything else (the callback may call back in). */
static void maybe_full(lp_desk *d) {
  if (d->counts && d->counts[1] >= (double)d->waits_cap) d->cb->full(d, d->user);
}

static void arm(lp_desk *d);

static void unqueue(lp_client *k) {
  lp_desk *d = k->desk;
  if (k->wprev) k->wprev->wnext = k->wnext;
  else d->head = k->wnext;
  if (k->wnext) k->wnext->wprev = k->wprev;
  else d->tail = k->wprev;
  k->wprev = k->wnext = NULL;
  k->waiting = 0;
  d->waiting--;
}

/* A waiting client to the caller (`need`), with how long it waited. */
static void to_caller(lp_client *k) {
  unqueue(k);
  k->cb->need(k, k->user, NULL, 0, (double)(uv_now(k->loop) - k->wait_since));
}

/* An idle (or just released) connection: to the first client waiting with its settings, else idle. */
static void desk_serve(desk_entry *e) {
  lp_desk *d = e->desk;
  lp_client *w = e->sid == 0 ? NULL : d->head;
  while (w && w->sid != e->sid) w = w->wnext;
  if (!w) {
    e->idle_since = uv_now(d->loop);
    d->idle++;
    lp_conn_sink(e->conn, idle_sink, e);
    /* Clients of other settings wait: the caller gives them this one, with their settings (from the timer, outside this call). */
    if (d->head && !d->closed) {
      d->spill = 1;
      uv_timer_start(d->timer, timer_fired, 0, 0);
    }
    lp_conn_pause(e->conn, 0); /* it may have been paused for a slow client: what it holds goes to idle_sink */
    return;
  }
  uint64_t since = w->wait_since;
  lend(w, e->conn, e);
  record_wait(d, since);
  process(w);
  maybe_full(d);
}

/* The client's unit takes an idle connection of the desk with its settings: 1 when it did. */
static int desk_take(lp_client *k) {
  lp_desk *d = k->desk;
  for (;;) {
    if (d->stopped || k->closing || !k->fast || k->conn) return 0;
    desk_entry *best = NULL;
    for (desk_entry *e = d->entries; e; e = e->next) {
      if (entry_idle(e) && k->sid != 0 && e->sid == k->sid && (!best || e->idle_since > best->idle_since)) best = e;
    }
    if (!best) return 0;
    uint64_t now = uv_now(d->loop);
    if (now >= best->expires || now - best->idle_since >= d->check_delay || !lp_conn_lendable(best->conn)) {
      /* The caller checks it, or closes it; the next is looked at. */
      entry_out(best, LP_DESK_STALE);
      continue;
    }
    d->idle--;
    lp_conn_sink(best->conn, NULL, NULL);
    lend(k, best->conn, best);
    record_wait(d, now);
    maybe_full(d);
    return !k->closing && k->conn != NULL;
  }
}

static int has_sid(const lp_desk *d, int sid) {
  if (sid == 0) return 0; /* matches nothing */
  for (const desk_entry *e = d->entries; e; e = e->next) {
    if (e->sid == sid) return 1;
  }
  return 0;
}

/* The client waits on the desk: when the caller has no connection to give now, and one of the desk has its settings. */
static int desk_queue(lp_client *k) {
  lp_desk *d = k->desk;
  /* An idle connection of other settings: the caller takes it (setting them) sooner than one of these comes free. */
  if (d->stopped || d->room || d->idle > 0 || !has_sid(d, k->sid)) return 0;
  k->needing = 1;
  k->head_named = 0;
  k->waiting = 1;
  k->wait_since = uv_now(k->loop);
  k->wprev = d->tail;
  k->wnext = NULL;
  if (d->tail) d->tail->wnext = k;
  else d->head = k;
  d->tail = k;
  d->waiting++;
  if (!uv_is_active((uv_handle_t *)d->timer)) arm(d);
  return 1;
}

/*
 * The wait timeout: clients waiting longer go to the caller (which refuses them, or has a
 * connection by now). After a connection left (`unstarve`), so do clients of settings that no
 * connection of the desk has any more: none would come to them.
 */
static void timer_fired(uv_timer_t *timer) {
  lp_desk *d = uv_handle_get_data((uv_handle_t *)timer);
  d->refs++;
  while (d->unstarve) {
    d->unstarve = 0;
    for (lp_client *w = d->head; w; w = w->wnext) {
      if (has_sid(d, w->sid)) continue;
      to_caller(w);
      d->unstarve = 1; /* the callback may have changed anything: from the start */
      break;
    }
  }
  if (d->spill) {
    /* One waiting client per idle connection (the caller takes it back from the desk for it: reclaim_any). */
    d->spill = 0;
    for (int n = d->idle; n > 0 && d->head; n--) to_caller(d->head);
  }
  uint64_t now = uv_now(d->loop);
  while (d->head && now - d->head->wait_since >= d->wait_timeout) to_caller(d->head);
  d->refs--;
  if (d->head) arm(d);
  desk_maybe_free(d);
}

static void arm(lp_desk *d) {
  if (!d->head || d->freeing) return;
  uint64_t now = uv_now(d->loop), due = d->head->wait_since + d->wait_timeout;
  uv_timer_start(d->timer, timer_fired, due > now ? due - now : 0, 0);
}

static void drop_desk(lp_client *k) {
  lp_desk *d = k->desk;
  if (!d) return;
  if (k->waiting) unqueue(k);
  k->desk = NULL;
  d->refs--;
  desk_maybe_free(d);
}

static void timer_closed(uv_handle_t *handle) {
  lp_desk *d = uv_handle_get_data(handle);
  free(handle);
  buf_free(&d->reset_query);
  d->cb->end(d, d->user);
  free(d);
}

static void desk_maybe_free(lp_desk *d) {
  if (!d->closed || d->refs > 0 || d->count > 0 || d->freeing) return;
  d->freeing = 1;
  uv_close((uv_handle_t *)d->timer, timer_closed);
}

void lp_client_hold(lp_client *k) {
  if (k->conn) k->hold = 1;
}

void lp_client_desk(lp_client *k, lp_desk *desk, int sid) {
  if (k->closing || (desk && desk->closed)) desk = NULL;
  if (desk == k->desk && !k->waiting) {
    k->sid = sid;
    return;
  }
  int waited = k->waiting;
  uint64_t since = k->wait_since;
  if (desk) desk->refs++; /* before the old one goes: it may be the same */
  drop_desk(k);
  k->desk = desk;
  k->sid = sid;
  /* It waited on the desk: the caller's now. */
  if (waited) k->cb->need(k, k->user, NULL, 0, (double)(uv_now(k->loop) - since));
}

lp_desk *lp_desk_open(uv_loop_t *loop, const lp_desk_callbacks *cb, void *user, double *counts, double *waits, size_t waits_cap) {
  lp_desk *d = calloc(1, sizeof *d);
  uv_timer_t *timer = malloc(sizeof *timer);
  if (!d || !timer) {
    free(d);
    free(timer);
    return NULL;
  }
  uv_timer_init(loop, timer);
  uv_unref((uv_handle_t *)timer); /* a waiting client's socket keeps the loop alive, not this */
  uv_handle_set_data((uv_handle_t *)timer, d);
  d->loop = loop;
  d->cb = cb;
  d->user = user;
  d->timer = timer;
  d->counts = counts;
  d->waits = waits;
  d->waits_cap = waits_cap;
  d->wait_timeout = 120000;
  d->check_delay = 30000;
  return d;
}

void lp_desk_set(lp_desk *d, int room, int js_waiting) {
  d->room = !!room;
  d->js_waiting = !!js_waiting;
}

static uint64_t ms(double value) { return !(value > 0) ? 0 : value >= 1e15 ? UINT64_MAX / 2 : (uint64_t)value; }

void lp_desk_config(lp_desk *d, double wait_timeout_ms, double check_delay_ms) {
  d->wait_timeout = ms(wait_timeout_ms);
  d->check_delay = ms(check_delay_ms);
  if (d->head) arm(d);
}

void lp_desk_stop(lp_desk *d, int stopped) {
  d->stopped = !!stopped;
  if (!stopped) return;
  d->refs++;
  while (d->head) to_caller(d->head);
  for (desk_entry *e = d->entries; e;) {
    if (!entry_idle(e)) {
      e = e->next;
      continue;
    }
    entry_out(e, LP_DESK_RECLAIMED);
    e = d->entries; /* the list may have changed: from the start (the idle ones are gone one by one) */
  }
  d->refs--;
  desk_maybe_free(d);
}

void lp_desk_close(lp_desk *d) {
  if (d->closed) return;
  lp_desk_stop(d, 1);
  d->closed = 1;
  uv_timer_stop(d->timer);
  desk_maybe_free(d);
}

int lp_desk_offer(lp_desk *d, lp_conn *conn, const lp_desk_join *join) {
  if (d->stopped || join->id <= 0 || join->sid == 0 || !lp_conn_lendable(conn)) return 0;
  lp_client *w = d->head;
  while (w && w->sid != join->sid) w = w->wnext;
  if (!w) return 0;
  desk_entry *e = entry_new(d, conn, join);
  if (!e) return 0;
  uint64_t since = w->wait_since;
  lend(w, conn, e);
  record_wait(d, since);
  process(w);
  maybe_full(d);
  return 1;
}

int lp_desk_wake(lp_desk *d) {
  if (!d->head) return 0;
  to_caller(d->head);
  return 1;
}

int lp_desk_reclaim(lp_desk *d, int id) {
  for (desk_entry *e = d->entries; e; e = e->next) {
    if (e->id != id) continue;
    if (!entry_idle(e)) return 0;
    entry_leave(e);
    return 1;
  }
  return 0;
}

int lp_desk_reclaim_any(lp_desk *d, double *idle_ms) {
  desk_entry *best = NULL;
  for (desk_entry *e = d->entries; e; e = e->next) {
    if (entry_idle(e) && (!best || e->idle_since > best->idle_since)) best = e;
  }
  if (!best) return 0;
  int id = best->id;
  *idle_ms = (double)(uv_now(d->loop) - best->idle_since);
  entry_leave(best);
  return id;
}

double lp_desk_idle_ms(lp_desk *d, int id) {
  for (desk_entry *e = d->entries; e; e = e->next) {
    if (e->id == id) return !entry_idle(e) ? -1 : (double)(uv_now(d->loop) - e->idle_since);
  }
  return -1;
}

void lp_desk_stats(lp_desk *d, int *idle, int *count, int *waiting, double *max_wait_ms, int *resetting) {
  *resetting = d->resetting;
  *idle = d->idle;
  *count = d->count;
  *waiting = d->waiting;
  *max_wait_ms = d->head ? (double)(uv_now(d->loop) - d->head->wait_since) : 0;
}

/* ---------- session mode on the desk ---------- */

static desk_entry *entry_of(lp_desk *d, int id) {
  for (desk_entry *e = d->entries; e; e = e->next) {
    if (e->id == id) return e;
  }
  return NULL;
}

/* A connection is idle on the desk again (its reader the desk's: anything the server says is trouble). */
static void entry_park(desk_entry *e) {
  e->busy = 0;
  desk_serve(e);
}

static void s_abandoned(lp_conn *c, void *user) {
  (void)c;
  ((desk_entry *)user)->abandoned = 1;
}

static size_t s_farewell(lp_conn *c, void *user, const char *reason, unsigned char *out, size_t cap) {
  (void)c;
  desk_entry *e = user;
  lp_desk *d = e->desk;
  return d->cb->farewell ? d->cb->farewell(d, d->user, e->id, reason, out, cap) : 0;
}

static void session_told(lp_desk *d, int id, enum lp_session how, enum lp_end end, double to_upstream, double to_client, int reusable, int status, int abandoned) {
  if (d->cb->session) d->cb->session(d, d->user, id, how, end, to_upstream, to_client, reusable, status, abandoned);
}

/* The reset's answer went wrong (`answer` NULL: it ended, or took too long): the caller's. */
static void reset_out(desk_entry *e, int with_answer) {
  lp_desk *d = e->desk;
  int id = e->id;
  buf_t answer = e->answer;
  e->answer = (buf_t){ 0 };
  d->refs++;
  entry_leave(e);
  if (d->cb->reset) d->cb->reset(d, d->user, id, with_answer ? answer.data + answer.off : NULL, with_answer ? pending(&answer) : 0);
  buf_free(&answer);
  d->refs--;
  desk_maybe_free(d);
}

/* What the server answered the reset: idle again once it is a CommandComplete and an idle ReadyForQuery, else the caller's. */
static void reset_sink(lp_conn *c, void *user, const unsigned char *data, size_t n, const char *error) {
  (void)c;
  (void)error;
  desk_entry *e = user;
  lp_desk *d = e->desk;
  if (data && n == 0) return; /* the reset query was written */
  if (!data || e->reset_failed) {
    reset_out(e, 0);
    return;
  }
  if (buf_append(&e->answer, data, n) != 0) {
    reset_out(e, 0);
    return;
  }
  const unsigned char *p = e->answer.data + e->answer.off;
  size_t have = pending(&e->answer), at = 0;
  int plain = 1, completed = 0;
  /* Not a message, or more than a reset answers: the caller reads it (and closes the connection). */
  if (have > RESET_ANSWER_LIMIT) {
    reset_out(e, 1);
    return;
  }
  while (have - at >= 5) {
    uint32_t length = be32(p + at + 1);
    if (length < 4) {
      reset_out(e, 1);
      return;
    }
    if (have - at - 1 < length) return; /* the rest of the message is still to come */
    unsigned char type = p[at];
    at += 1 + (size_t)length;
    if (type == 'Z') {
      int idle = length == 5 && p[at - 1] == 'I';
      if (!plain || !completed || !idle || at != have) {
        reset_out(e, 1);
        return;
      }
      /* Clean: idle here again, unless the caller wants it (its clients wait, the desk stopped, it expired). */
      buf_free(&e->answer);
      if (d->stopped || d->js_waiting || uv_now(d->loop) >= e->expires || !lp_conn_lendable(e->conn)) {
        entry_out(e, LP_DESK_RELEASED);
        return;
      }
      d->resetting--;
      entry_park(e);
      return;
    }
    if (type == 'C') completed = 1;
    else plain = 0; /* a ParameterStatus, a notice, an error: the caller reads them once the ReadyForQuery came */
  }
}

/* The session's client left with the connection kept (a pooled relay's detach). */
static void s_detached(lp_conn *c, void *user, enum lp_end end, double to_upstream, double to_client, int reusable, int status) {
  desk_entry *e = user;
  lp_desk *d = e->desk;
  int id = e->id, abandoned = e->abandoned;
  e->abandoned = 0;
  d->refs++;
  int keep = reusable && status == 'I' && !e->hold && !d->stopped && !d->js_waiting && uv_now(d->loop) < e->expires && lp_conn_lendable(c);
  if (keep && pending(&d->reset_query) > 0) {
    /* Written before the sink is set: a write that fails may end the connection inside the call. */
    if (lp_conn_write(c, d->reset_query.data + d->reset_query.off, pending(&d->reset_query)) < 0) {
      keep = 0;
    } else {
      e->busy = ENTRY_RESETTING;
      e->reset_since = uv_now(d->loop);
      d->resetting++;
      lp_conn_sink(c, reset_sink, e); /* its answer comes from later reads (relay.c reads after this call) */
    }
  } else if (keep) {
    entry_park(e);
  }
  if (!keep) entry_leave(e); /* the caller's again: relay.c gives it what the server says next */
  session_told(d, id, keep ? LP_SESSION_RESET : LP_SESSION_BACK, end, to_upstream, to_client, reusable, status, abandoned);
  d->refs--;
  desk_maybe_free(d);
}

/* The relay ended, and the connection with it (relay.c frees it after this). */
static void s_end(lp_conn *c, void *user, enum lp_end end, double to_upstream, double to_client) {
  (void)c;
  desk_entry *e = user;
  lp_desk *d = e->desk;
  int id = e->id, abandoned = e->abandoned;
  d->refs++;
  entry_leave(e);
  session_told(d, id, LP_SESSION_ENDED, end, to_upstream, to_client, 0, 0, abandoned);
  d->refs--;
  desk_maybe_free(d);
}

static const lp_callbacks session_hooks = { NULL, NULL, s_abandoned, s_farewell, s_detached, s_end };

int lp_desk_park(lp_desk *d, lp_conn *conn, const lp_desk_join *join) {
  if (d->stopped || d->closed || join->id <= 0 || join->sid == 0 || !lp_conn_lendable(conn)) return 0;
  desk_entry *e = entry_new(d, conn, join);
  if (!e) return 0;
  entry_park(e);
  return 1;
}

int lp_desk_reset_query(lp_desk *d, const unsigned char *message, size_t n) {
  buf_free(&d->reset_query);
  return n > 0 ? buf_append(&d->reset_query, message, n) : 0;
}

int lp_desk_take(lp_desk *d, int sid) {
  for (;;) {
    if (d->stopped || d->closed || sid == 0) return 0;
    desk_entry *best = NULL;
    for (desk_entry *e = d->entries; e; e = e->next) {
      if (entry_idle(e) && e->sid == sid && (!best || e->idle_since > best->idle_since)) best = e;
    }
    if (!best) return 0;
    uint64_t now = uv_now(d->loop);
    if (now >= best->expires || now - best->idle_since >= d->check_delay || !lp_conn_lendable(best->conn)) {
      entry_out(best, LP_DESK_STALE); /* the caller checks it, or closes it */
      continue;
    }
    d->idle--;
    lp_conn_sink(best->conn, NULL, NULL);
    best->busy = ENTRY_SESSION;
    best->abandoned = 0;
    best->hold = 0;
    return best->id;
  }
}

void lp_desk_untake(lp_desk *d, int id) {
  desk_entry *e = entry_of(d, id);
  if (e && e->busy == ENTRY_SESSION) entry_park(e);
}

int lp_desk_relay(lp_desk *d, int id, int client_fd, const unsigned char *hello, size_t hello_len, const unsigned char *first, size_t first_len,
                  double *counters, const char **error) {
  desk_entry *e = entry_of(d, id);
  if (!e || e->busy != ENTRY_SESSION) {
    *error = "the connection is not taken for a session";
    return -1;
  }
  lp_conn_hooks(e->conn, &session_hooks, e);
  /* The relay may end inside the call (a client gone already): the hooks hear of it, and `e` may be gone after. */
  if (lp_conn_relay(e->conn, client_fd, hello, hello_len, first, first_len, counters, 1, error) != 0) {
    lp_conn_hooks(e->conn, NULL, NULL);
    return -1;
  }
  return 0;
}

void lp_desk_hold(lp_desk *d, int id) {
  desk_entry *e = entry_of(d, id);
  if (e && e->busy == ENTRY_SESSION) e->hold = 1;
}

void lp_desk_sweep(lp_desk *d, double timeout_ms) {
  uint64_t now = uv_now(d->loop), limit = ms(timeout_ms);
  d->refs++;
  for (desk_entry *e = d->entries; e;) {
    if (e->busy != ENTRY_RESETTING || e->reset_failed || now - e->reset_since < limit) {
      e = e->next;
      continue;
    }
    e->reset_failed = 1;
    lp_conn_close(e->conn, LP_END_UPSTREAM_ERROR); /* its sink hears of it: reset_out, and `e` is gone */
    e = d->entries; /* the list changed: from the start (those done are marked) */
  }
  d->refs--;
  desk_maybe_free(d);
}

/* ---------- the API ---------- */

lp_client *lp_client_open(uv_loop_t *loop, int fd, const lp_client_callbacks *cb, void *user, double *counters, double *totals, const char **error) {
  int flags = fcntl(fd, F_GETFL);
  if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) {
    *error = "could not make the client socket non-blocking";
    return NULL;
  }
  lp_client *k = calloc(1, sizeof *k);
  uv_poll_t *poll = malloc(sizeof *poll);
  if (!k || !poll || uv_poll_init_socket(loop, poll, fd) != 0) {
    free(k);
    free(poll);
    *error = "could not poll the client socket";
    return NULL;
  }
  k->loop = loop;
  k->cb = cb;
  k->user = user;
  k->poll = poll;
  k->fd = fd;
  k->counters = counters;
  k->totals = totals;
  k->status = 'I';
  uv_handle_set_data((uv_handle_t *)poll, k);
  touch(k);
  update_poll(k);
  return k;
}

long lp_client_write(lp_client *k, const unsigned char *data, size_t n) {
  if (k->closing || k->write_shut || k->want_shut) return -1;
  touch(k);
  to_client(k, data, n);
  if (k->closing || k->write_shut) return -1;
  k->want_drain = pending(&k->out) > 0;
  update_poll(k);
  return (long)pending(&k->out);
}

void lp_client_end(lp_client *k) {
  if (k->closing || k->want_shut) return;
  k->want_shut = 1;
  if (k->conn) give_back(k, LP_BACK_CLIENT_GONE, NULL);
  if (k->closing) return;
  k->fast = 0;
  stop_needing(k);
  buf_free(&k->in);
  if (pending(&k->out) == 0) shut(k);
  else linger(k); /* a client that does not read what is queued does not keep the socket */
  if (!k->closing) update_poll(k);
}

void lp_client_close(lp_client *k) { teardown(k); }

void lp_client_pause(lp_client *k, int paused) {
  if (k->closing) return;
  k->js_paused = !!paused;
  update_poll(k);
}

int lp_client_fast(lp_client *k, const unsigned char *first, size_t n) {
  if (k->closing || k->fast || k->read_done || k->want_shut) return -1;
  if (buf_append(&k->in, first, n) != 0) return -1;
  k->fast = 1;
  process(k);
  return 0;
}

/* ReadyForQuery messages that answer `data`: its Queries and Syncs. */
static int readies(const unsigned char *data, size_t n) {
  int count = 0;
  for (size_t off = 0; off + 5 <= n && be32(data + off + 1) >= 4; off += 1 + be32(data + off + 1)) count += data[off] == 'Q' || data[off] == 'S';
  return count;
}

int lp_client_attach(lp_client *k, lp_conn *conn, const unsigned char *unread, size_t n, const unsigned char *settings, size_t settings_len,
                     const unsigned char *unit, size_t unit_len, const lp_desk_join *join) {
  if (k->closing || !k->fast || !k->needing || k->waiting || k->conn || !lp_conn_lendable(conn)) return -1;
  /* A unit of named statements goes rewritten, or not at all; a rewritten one is one unit. */
  if ((k->head_named > 0) != (unit_len > 0) || (unit_len > 0 && (readies(unit, unit_len) != 1 || pending(&k->in) < k->head_named))) return -1;
  /* The settings' answers come before the client's units go: a rewritten unit would have to wait too. */
  if (settings_len > 0 && unit_len > 0) return -1;
  /* Joins the desk only as the client's settings are (nothing set ahead): it stays there clean. */
  desk_entry *entry = NULL;
  if (join && join->id > 0 && k->desk && !k->desk->stopped && settings_len == 0) entry = entry_new(k->desk, conn, join);
  lend(k, conn, entry);
  if (k->conn == conn && n > 0) sink(conn, k, unread, n, NULL);
  if (k->conn == conn && !k->closing && settings_len > 0) {
    /* Its answers, to its ReadyForQuery messages, are the caller's: counted as outstanding, not relayed. */
    k->hidden = readies(settings, settings_len);
    k->outstanding += k->hidden;
    k->settings_wait = k->hidden > 0;
    if (lp_conn_write(conn, settings, settings_len) < 0 && k->conn == conn) give_back(k, LP_BACK_UPSTREAM_GONE, "the server connection closed");
  }
  if (k->conn == conn && !k->closing && unit_len > 0) {
    /* The waiting unit, its names the server's: sent instead of the client's bytes. */
    k->flags |= unit_flags(unit, unit_len);
    k->outstanding++;
    k->sent = 1;
    count(k, 0, unit_len);
    buf_consumed(&k->in, k->head_named);
    k->head_named = 0;
    if (lp_conn_write(conn, unit, unit_len) < 0 && k->conn == conn) give_back(k, LP_BACK_UPSTREAM_GONE, "the server connection closed");
  }
  k->head_named = 0;
  if (!k->closing && k->conn == conn) process(k);
  return entry ? 1 : 0;
}

const unsigned char *lp_client_js(lp_client *k, size_t *n) {
  /* What the last call handed over, for any client: kept until the next call (one loop thread; addon.c copies it at once). */
  static buf_t handed;
  buf_free(&handed);
  *n = 0;
  if (k->closing || !k->fast || k->conn) return NULL;
  k->fast = 0;
  stop_needing(k);
  k->head_named = 0;
  handed = k->in;
  memset(&k->in, 0, sizeof k->in);
  *n = pending(&handed);
  update_poll(k);
  return *n ? handed.data + handed.off : NULL;
}

void lp_client_state(lp_client *k, int *lent, int *running, double *idle_ms, int *desk_id) {
  *desk_id = k->entry ? k->entry->id : 0;
  *lent = k->conn != NULL;
  *running = k->conn != NULL && k->outstanding > k->hidden; /* the client's own units, not the settings ahead of them */
  *idle_ms = (double)(uv_now(k->loop) - k->last_activity);
}
