/*
 * The relay's hot path in C, on Node's own event loop (libuv), with no JavaScript per read or write.
 *
 * Node.js does the TLS handshake and the Postgres login to the upstream (certificate checks,
 * SCRAM channel binding, session resumption all stay in src/proxy/upstream.ts). When the login
 * is done, the TypeScript side hands over the two file descriptors and the TLS 1.3 traffic
 * secrets (from Node's public 'keylog' event) and the last application record seen each way;
 * from then on this file reads the client's plain bytes, seals them into TLS 1.3 records for the
 * upstream, opens the upstream's records for the client, and keeps the few facts the proxy needs
 * (bytes each way, whether a query is running, where the upstream's messages end).
 *
 * TLS 1.3 record protection (RFC 8446, section 5.2): nonce = iv XOR sequence number; additional
 * data = the 5-byte record header; plaintext = content || content type || zero padding.
 * Key derivation (section 7.1): HKDF-Expand-Label(secret, "key" | "iv" | "traffic upd", "", length).
 *
 * OpenSSL and libuv come from the node binary itself (it exports their symbols), so nothing is
 * linked in. Everything runs on the main thread: no locks.
 */
#include <errno.h>
#include <fcntl.h>
#include <node_api.h>
#include <openssl/evp.h>
#include <openssl/crypto.h>
#include <stdint.h>
#include <stdio.h> /* snprintf */
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#define MAX_PLAIN 16384            /* TLS record plaintext limit */
#define MAX_CIPHER (MAX_PLAIN + 256)
#define TAG 16
#define HEADER 5
#define READ_SIZE 65536
#define LINGER_MS 5000
#define OWN_QUEUE_LIMIT 65536

enum end_reason { END_NONE = 0, END_CLIENT_CLOSED, END_UPSTREAM_CLOSED, END_CLIENT_ERROR, END_UPSTREAM_ERROR, END_SHUTDOWN, END_IDLE };
static const char *END_NAMES[] = { "", "client_closed", "upstream_closed", "client_error", "upstream_error", "shutdown", "idle_timeout" };

/* One direction's TLS 1.3 keys. */
typedef struct {
  const EVP_CIPHER *cipher;
  const EVP_MD *md;
  int key_len;
  unsigned char secret[48];
  int secret_len;
  unsigned char iv[12];
  uint64_t seq;
  EVP_CIPHER_CTX *ctx;
} keys_t;

/* Bytes waiting to be written to a socket; the memory exists only while something waits. */
typedef struct {
  unsigned char *data;
  size_t off, len, cap;
} pending_t;

/* Follows the message boundaries of the upstream's stream, as src/wire/message-boundaries.ts does. */
typedef struct {
  uint32_t remaining;
  unsigned char header[5];
  int header_have;
  int current_type, last_type;
  int broken;
} boundaries_t;

typedef struct side {
  int fd;
  uv_poll_t poll;
  int polling;       /* events currently asked of libuv */
  int read_done;     /* EOF or error seen on read */
  int write_shut;    /* our FIN sent (or the socket is beyond writing) */
  int want_shut;     /* send FIN once `out` is empty */
  pending_t out;
} side_t;

typedef struct session {
  napi_env env;
  side_t client, upstream;
  keys_t tx, rx;              /* tx: to the upstream; rx: from it */
  pending_t cipher_in;        /* a partial record from the upstream */
  boundaries_t messages;       /* the upstream's, as the client gets them */
  int client_terminated;      /* the client's last bytes were a Terminate */
  int upstream_idle;          /* the upstream's last message was ReadyForQuery */
  enum end_reason end;
  double bytes_to_upstream, bytes_to_client;
  uint64_t last_activity;
  uv_timer_t linger;
  int linger_started;
  int closing;                /* handles are being closed */
  int open_handles;
  int native_done, js_released;
  napi_ref on_end, on_abandoned, farewell, counters_ref;
  double *counters;           /* [to_upstream, to_client] shared with JavaScript (metrics) */
} session_t;

static unsigned char scratch_in[READ_SIZE];
static unsigned char scratch_out[READ_SIZE + (READ_SIZE / MAX_PLAIN + 1) * (HEADER + 1 + TAG) + 64];
static napi_async_context async_context;

/* ---------- buffers ---------- */

static int pending_append(pending_t *p, const unsigned char *data, size_t n) {
  if (n == 0) return 0;
  if (p->off > 0 && p->off == p->len) p->off = p->len = 0;
  if (p->len + n > p->cap) {
    if (p->off > 0) {
      memmove(p->data, p->data + p->off, p->len - p->off);
      p->len -= p->off;
      p->off = 0;
    }
    if (p->len + n > p->cap) {
      size_t cap = p->cap ? p->cap : 4096;
      while (cap < p->len + n) cap *= 2;
      unsigned char *grown = realloc(p->data, cap);
      if (!grown) return -1;
      p->data = grown;
      p->cap = cap;
    }
  }
  memcpy(p->data + p->len, data, n);
  p->len += n;
  return 0;
}

static size_t pending_size(const pending_t *p) { return p->len - p->off; }

static void pending_free(pending_t *p) {
  free(p->data);
  p->data = NULL;
  p->off = p->len = p->cap = 0;
}

/* ---------- keys ---------- */

/* HMAC(key, data) with a fetched digest (RFC 2104): OpenSSL 3's one-shot HMAC() looks the algorithm up on every call. */
static int hmac(const EVP_MD *md, const unsigned char *key, int key_len, const unsigned char *data, size_t n, unsigned char *out) {
  unsigned char pad[128], inner[EVP_MAX_MD_SIZE];
  int block = EVP_MD_get_block_size(md);
  unsigned int inner_len = 0, out_len = 0;
  if (key_len > block || block > (int)sizeof pad) return -1;
  EVP_MD_CTX *ctx = EVP_MD_CTX_new();
  int ok = ctx != NULL;
  memset(pad, 0x36, (size_t)block);
  for (int i = 0; i < key_len; i++) pad[i] ^= key[i];
  ok = ok && EVP_DigestInit_ex(ctx, md, NULL) == 1 && EVP_DigestUpdate(ctx, pad, (size_t)block) == 1 && EVP_DigestUpdate(ctx, data, n) == 1 &&
       EVP_DigestFinal_ex(ctx, inner, &inner_len) == 1;
  memset(pad, 0x5c, (size_t)block);
  for (int i = 0; i < key_len; i++) pad[i] ^= key[i];
  ok = ok && EVP_DigestInit_ex(ctx, md, NULL) == 1 && EVP_DigestUpdate(ctx, pad, (size_t)block) == 1 && EVP_DigestUpdate(ctx, inner, inner_len) == 1 &&
       EVP_DigestFinal_ex(ctx, out, &out_len) == 1;
  EVP_MD_CTX_free(ctx);
  OPENSSL_cleanse(pad, sizeof pad);
  OPENSSL_cleanse(inner, sizeof inner);
  return ok ? (int)out_len : -1;
}

/* HKDF-Expand-Label with an empty context, for lengths up to one hash block (all TLS 1.3 needs here). */
static int expand_label(const EVP_MD *md, const unsigned char *secret, int secret_len, const char *label, unsigned char *out, int out_len) {
  unsigned char info[2 + 1 + 255 + 1 + 1];
  size_t label_len = strlen(label);
  size_t i = 0;
  info[i++] = (unsigned char)(out_len >> 8);
  info[i++] = (unsigned char)out_len;
  info[i++] = (unsigned char)(6 + label_len);
  memcpy(info + i, "tls13 ", 6);
  i += 6;
  memcpy(info + i, label, label_len);
  i += label_len;
  info[i++] = 0;    /* context length */
  info[i++] = 0x01; /* HKDF-Expand's block counter T(1) */
  unsigned char block[EVP_MAX_MD_SIZE];
  int block_len = hmac(md, secret, secret_len, info, i, block);
  if (block_len < out_len) return -1;
  memcpy(out, block, (size_t)out_len);
  OPENSSL_cleanse(block, sizeof block);
  return 0;
}

/* Derives key and IV from `k->secret` and makes the cipher context; the sequence number is the caller's. */
static int keys_install(keys_t *k, int encrypt) {
  unsigned char key[32];
  if (expand_label(k->md, k->secret, k->secret_len, "key", key, k->key_len) != 0) return -1;
  if (expand_label(k->md, k->secret, k->secret_len, "iv", k->iv, 12) != 0) return -1;
  if (!k->ctx) k->ctx = EVP_CIPHER_CTX_new();
  int ok = k->ctx && EVP_CipherInit_ex(k->ctx, k->cipher, NULL, NULL, NULL, encrypt) == 1 &&
           EVP_CIPHER_CTX_ctrl(k->ctx, EVP_CTRL_AEAD_SET_IVLEN, 12, NULL) == 1 &&
           EVP_CipherInit_ex(k->ctx, NULL, NULL, key, NULL, encrypt) == 1;
  OPENSSL_cleanse(key, sizeof key);
  return ok ? 0 : -1;
}

/* The next generation of traffic secret (KeyUpdate, RFC 8446 section 7.2). */
static int keys_update(keys_t *k, int encrypt) {
  unsigned char next[48];
  if (expand_label(k->md, k->secret, k->secret_len, "traffic upd", next, k->secret_len) != 0) return -1;
  memcpy(k->secret, next, k->secret_len);
  OPENSSL_cleanse(next, sizeof next);
  k->seq = 0;
  return keys_install(k, encrypt);
}

static void keys_free(keys_t *k) {
  if (k->ctx) EVP_CIPHER_CTX_free(k->ctx);
  k->ctx = NULL;
  OPENSSL_cleanse(k->secret, sizeof k->secret);
  OPENSSL_cleanse(k->iv, sizeof k->iv);
}

static void nonce_for(const keys_t *k, uint64_t seq, unsigned char nonce[12]) {
  memcpy(nonce, k->iv, 12);
  for (int i = 0; i < 8; i++) nonce[11 - i] ^= (unsigned char)(seq >> (8 * i));
}

/* Seals `n` bytes of `type` into one record at `out`; returns its length or -1. */
static int seal(keys_t *k, int type, const unsigned char *in, size_t n, unsigned char *out) {
  size_t body = n + 1 + TAG;
  out[0] = 23;
  out[1] = 3;
  out[2] = 3;
  out[3] = (unsigned char)(body >> 8);
  out[4] = (unsigned char)body;
  unsigned char nonce[12], type_byte = (unsigned char)type;
  nonce_for(k, k->seq, nonce);
  int len = 0, fin = 0;
  if (EVP_CipherInit_ex(k->ctx, NULL, NULL, NULL, nonce, 1) != 1) return -1;
  if (EVP_CipherUpdate(k->ctx, NULL, &len, out, HEADER) != 1) return -1;
  if (n > 0 && EVP_CipherUpdate(k->ctx, out + HEADER, &len, in, (int)n) != 1) return -1;
  if (EVP_CipherUpdate(k->ctx, out + HEADER + n, &len, &type_byte, 1) != 1) return -1;
  if (EVP_CipherFinal_ex(k->ctx, out + HEADER + n + 1, &fin) != 1) return -1;
  if (EVP_CIPHER_CTX_ctrl(k->ctx, EVP_CTRL_AEAD_GET_TAG, TAG, out + HEADER + n + 1) != 1) return -1;
  k->seq++;
  return (int)(HEADER + body);
}

/*
 * Opens one record (header included) with sequence number `seq` into `out`; returns the inner
 * plaintext length (content type last, padding removed) or -1 when it does not authenticate.
 */
static int open_record(keys_t *k, uint64_t seq, const unsigned char *record, size_t length, unsigned char *out, int *type) {
  size_t body = length - HEADER;
  if (body < TAG + 1 || body > MAX_CIPHER) return -1;
  unsigned char nonce[12];
  nonce_for(k, seq, nonce);
  int len = 0, fin = 0;
  size_t plain = body - TAG;
  if (EVP_CipherInit_ex(k->ctx, NULL, NULL, NULL, nonce, 0) != 1) return -1;
  if (EVP_CipherUpdate(k->ctx, NULL, &len, record, HEADER) != 1) return -1;
  if (EVP_CipherUpdate(k->ctx, out, &len, record + HEADER, (int)plain) != 1) return -1;
  if (EVP_CIPHER_CTX_ctrl(k->ctx, EVP_CTRL_AEAD_SET_TAG, TAG, (void *)(record + HEADER + plain)) != 1) return -1;
  if (EVP_CipherFinal_ex(k->ctx, out + len, &fin) != 1) return -1;
  while (plain > 0 && out[plain - 1] == 0) plain--;
  if (plain == 0) return -1; /* no content type: a protocol error */
  *type = out[plain - 1];
  return (int)(plain - 1);
}

/* ---------- message boundaries ---------- */

static void boundaries_observe(boundaries_t *b, const unsigned char *chunk, size_t n) {
  size_t i = 0;
  while (i < n && !b->broken) {
    if (b->remaining > 0) {
      size_t take = n - i < b->remaining ? n - i : b->remaining;
      b->remaining -= (uint32_t)take;
      i += take;
      if (b->remaining == 0) b->last_type = b->current_type;
      continue;
    }
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
      if (b->header_have < 5) return;
      b->header_have = 0;
      h = b->header;
    }
    int32_t length = (int32_t)(((uint32_t)h[1] << 24) | ((uint32_t)h[2] << 16) | ((uint32_t)h[3] << 8) | h[4]);
    if (length < 4) {
      b->broken = 1;
      return;
    }
    b->current_type = h[0];
    b->remaining = (uint32_t)length - 4;
    if (b->remaining == 0) b->last_type = h[0];
  }
}

static int at_boundary(const boundaries_t *b) { return !b->broken && b->remaining == 0 && b->header_have == 0; }

/* ---------- calls into JavaScript ---------- */

static napi_value call_js(session_t *s, napi_ref ref, size_t argc, napi_value *argv) {
  napi_value fn, recv, result = NULL;
  if (!ref || napi_get_reference_value(s->env, ref, &fn) != napi_ok || !fn) return NULL;
  napi_get_global(s->env, &recv);
  if (napi_make_callback(s->env, async_context, recv, fn, argc, argv, &result) != napi_ok) {
    bool pending = false;
    napi_is_exception_pending(s->env, &pending);
    if (pending) {
      napi_value error;
      napi_get_and_clear_last_exception(s->env, &error);
      napi_fatal_exception(s->env, error);
    }
    return NULL;
  }
  return result;
}

/* ---------- the relay ---------- */

/* "read ECONNRESET", as Node.js words a socket error. */
static const char *error_text(const char *op, int code) {
  static char text[64];
  snprintf(text, sizeof text, "%s %s", op, uv_err_name(-code));
  return text;
}

static const char *socket_error(int fd, const char *op) {
  int code = 0;
  socklen_t length = sizeof code;
  if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &code, &length) != 0 || code == 0) code = ECONNRESET;
  return error_text(op, code);
}

static void update_polls(session_t *s);
static void finish(session_t *s);
static void teardown(session_t *s);
static void linger_cb(uv_timer_t *timer);
static int maybe_done(session_t *s);

static void touch(session_t *s) { s->last_activity = uv_now(uv_handle_get_loop((uv_handle_t *)&s->client.poll)); }

/* Decides how the session ended (the first end wins), and asks for a cancel of an abandoned query. */
static void decide(session_t *s, enum end_reason end) {
  if (s->end != END_NONE) return;
  /* After a Terminate the server closes first, often before the client's FIN arrives: the client ended it. */
  s->end = end == END_UPSTREAM_CLOSED && s->client_terminated ? END_CLIENT_CLOSED : end;
  if ((end == END_CLIENT_CLOSED || end == END_CLIENT_ERROR) && !s->client_terminated && !s->upstream_idle) {
    napi_handle_scope scope;
    napi_open_handle_scope(s->env, &scope);
    call_js(s, s->on_abandoned, 0, NULL);
    napi_close_handle_scope(s->env, scope);
  }
}

/* Writes what is pending to a side; returns 0, or -1 with errno on a hard error. */
static int flush(side_t *side) {
  while (pending_size(&side->out) > 0) {
    ssize_t n = send(side->fd, side->out.data + side->out.off, pending_size(&side->out), MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
      return -1;
    }
    side->out.off += (size_t)n;
  }
  pending_free(&side->out);
  if (side->want_shut && !side->write_shut) {
    shutdown(side->fd, SHUT_WR);
    side->write_shut = 1;
  }
  return 0;
}

/* Sends `data` now as far as the socket takes it, keeping the rest; -1 with errno on a hard error. */
static int send_or_keep(side_t *side, const unsigned char *data, size_t n) {
  if (side->write_shut) return 0;
  size_t sent = 0;
  if (pending_size(&side->out) == 0) {
    while (sent < n) {
      ssize_t w = send(side->fd, data + sent, n - sent, MSG_NOSIGNAL);
      if (w < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) break;
        return -1;
      }
      sent += (size_t)w;
    }
  }
  if (sent < n && pending_append(&side->out, data + sent, n - sent) != 0) {
    errno = ENOMEM;
    return -1;
  }
  return 0;
}

/* Seals plain bytes for the upstream and sends them. */
static int to_upstream(session_t *s, const unsigned char *data, size_t n) {
  size_t off = 0;
  while (off < n) {
    size_t used = 0;
    for (size_t batch = 0; off < n && batch < READ_SIZE; ) {
      size_t piece = n - off < MAX_PLAIN ? n - off : MAX_PLAIN;
      int len = seal(&s->tx, 23, data + off, piece, scratch_out + used);
      if (len < 0) {
        errno = EPROTO;
        return -1;
      }
      used += (size_t)len;
      off += piece;
      batch += piece;
    }
    if (send_or_keep(&s->upstream, scratch_out, used) != 0) return -1;
  }
  return 0;
}

/* The client's FIN or error: pass it on to the upstream once what is queued has been written. */
static void client_ended(session_t *s, int error) {
  s->client.read_done = 1;
  decide(s, error ? END_CLIENT_ERROR : END_CLIENT_CLOSED);
  if (s->closing) return; /* JavaScript closed the session meanwhile */
  if (error) {
    teardown(s);
    return;
  }
  if (!s->upstream.write_shut && !s->upstream.want_shut) {
    unsigned char alert[2] = { 1, 0 }, record[HEADER + 2 + 1 + TAG]; /* close_notify */
    int len = seal(&s->tx, 21, alert, 2, record);
    if (len > 0) send_or_keep(&s->upstream, record, (size_t)len);
    s->upstream.want_shut = 1;
    if (flush(&s->upstream) != 0) {
      teardown(s);
      return;
    }
  }
  finish(s);
}

/*
 * The upstream's FIN, close_notify or error. When neither side said goodbye (the client a
 * Terminate, the upstream an ErrorResponse) and the upstream stopped between two messages, the
 * client gets an ErrorResponse 08006 (built by JavaScript, which knows the upstream's name).
 */
static void upstream_ended(session_t *s, const char *error) {
  int told = 0;
  s->upstream.read_done = 1;
  pending_free(&s->cipher_in);
  if (s->end == END_NONE && !s->client_terminated && at_boundary(&s->messages) && s->messages.last_type != 'E') {
    napi_handle_scope scope;
    napi_open_handle_scope(s->env, &scope);
    napi_value reason;
    if (error) napi_create_string_utf8(s->env, error, NAPI_AUTO_LENGTH, &reason);
    else napi_get_null(s->env, &reason);
    napi_value message = call_js(s, s->farewell, 1, &reason);
    bool is_buffer = false;
    if (message) napi_is_buffer(s->env, message, &is_buffer);
    if (is_buffer) {
      void *data;
      size_t length;
      napi_get_buffer_info(s->env, message, &data, &length);
      send_or_keep(&s->client, data, length);
      told = 1; /* the client is told, then closed gently */
    }
    napi_close_handle_scope(s->env, scope);
  }
  if (s->closing) return; /* JavaScript closed the session meanwhile */
  decide(s, error ? END_UPSTREAM_ERROR : END_UPSTREAM_CLOSED);
  if (s->closing) return;
  if (error && !told && pending_size(&s->client.out) == 0) {
    teardown(s);
    return;
  }
  s->client.want_shut = 1;
  if (flush(&s->client) != 0) {
    teardown(s);
    return;
  }
  finish(s);
}

/* Handshake messages after the handshake: session tickets (ignored) and KeyUpdate. */
static int post_handshake(session_t *s, const unsigned char *p, size_t n) {
  while (n >= 4) {
    size_t length = ((size_t)p[1] << 16) | ((size_t)p[2] << 8) | p[3];
    if (4 + length > n) return -1; /* split across records: not sent by servers in practice */
    if (p[0] == 24) { /* KeyUpdate */
      if (length != 1 || keys_update(&s->rx, 0) != 0) return -1;
      if (p[4] == 1) { /* update_requested: answer with ours, then switch */
        unsigned char update[5] = { 24, 0, 0, 1, 0 }, record[HEADER + 5 + 1 + TAG];
        int len = seal(&s->tx, 22, update, 5, record);
        if (len < 0 || send_or_keep(&s->upstream, record, (size_t)len) != 0 || keys_update(&s->tx, 1) != 0) return -1;
      }
    } else if (p[0] != 4) { /* anything but NewSessionTicket */
      return -1;
    }
    p += 4 + length;
    n -= 4 + length;
  }
  return n == 0 ? 0 : -1;
}

/*
 * Opens every complete record in `data`, sends the plaintext to the client; returns the bytes
 * consumed, or -1 (errno set; `*closed` when the upstream sent close_notify).
 */
static long open_records(session_t *s, const unsigned char *data, size_t n, int *closed, const char **problem) {
  size_t used = 0, plain_len = 0;
  unsigned char *plain = scratch_out;
  while (n - used >= HEADER) {
    const unsigned char *r = data + used;
    size_t body = ((size_t)r[3] << 8) | r[4];
    if (r[0] != 23 || body > MAX_CIPHER) {
      *problem = "malformed TLS record";
      return -1;
    }
    if (n - used < HEADER + body) break;
    if (plain_len + body > sizeof scratch_out) break; /* sent below, the rest on the next round */
    int type = 0;
    int len = open_record(&s->rx, s->rx.seq, r, HEADER + body, plain + plain_len, &type);
    if (len < 0) {
      *problem = "TLS record failed to authenticate";
      return -1;
    }
    s->rx.seq++;
    used += HEADER + body;
    if (type == 23) {
      plain_len += (size_t)len;
    } else if (type == 21) {
      if (len >= 2 && plain[plain_len + 1] == 0) *closed = 1;
      else *problem = "TLS alert from the upstream";
      break;
    } else if (type == 22) {
      if (post_handshake(s, plain + plain_len, (size_t)len) != 0) {
        *problem = "unexpected TLS handshake message";
        return -1;
      }
    } else {
      *problem = "unexpected TLS record type";
      return -1;
    }
  }
  if (plain_len > 0) {
    s->bytes_to_client += (double)plain_len;
    s->counters[1] += (double)plain_len;
    boundaries_observe(&s->messages, plain, plain_len);
    s->upstream_idle = at_boundary(&s->messages) && s->messages.last_type == 'Z';
    if (send_or_keep(&s->client, plain, plain_len) != 0) return -2;
  }
  if (*problem) return -1;
  return (long)used;
}

/* Ciphertext from the upstream (read now or left from the login). */
static void upstream_bytes(session_t *s, const unsigned char *data, size_t n) {
  int closed = 0;
  const char *problem = NULL;
  const unsigned char *from = data;
  size_t have = n;
  if (pending_size(&s->cipher_in) > 0) {
    if (pending_append(&s->cipher_in, data, n) != 0) {
      upstream_ended(s, "out of memory");
      return;
    }
    from = s->cipher_in.data + s->cipher_in.off;
    have = pending_size(&s->cipher_in);
  }
  size_t consumed = 0;
  while (consumed < have) {
    long used = open_records(s, from + consumed, have - consumed, &closed, &problem);
    if (used == -2) {
      client_ended(s, 1);
      return;
    }
    if (used < 0 || problem) {
      upstream_ended(s, problem ? problem : "TLS error");
      return;
    }
    if (closed) {
      upstream_ended(s, NULL);
      return;
    }
    if (used == 0) break;
    consumed += (size_t)used;
  }
  if (from == data) {
    if (consumed < have && pending_append(&s->cipher_in, data + consumed, have - consumed) != 0) upstream_ended(s, "out of memory");
  } else {
    s->cipher_in.off += consumed;
    if (pending_size(&s->cipher_in) == 0) pending_free(&s->cipher_in);
  }
}

/* Plain bytes from the client. */
static void client_bytes(session_t *s, const unsigned char *data, size_t n) {
  static const unsigned char terminate[5] = { 'X', 0, 0, 0, 4 };
  s->bytes_to_upstream += (double)n;
  s->counters[0] += (double)n;
  s->client_terminated = n >= 5 && memcmp(data + n - 5, terminate, 5) == 0;
  s->upstream_idle = 0; /* until its next ReadyForQuery */
  if (to_upstream(s, data, n) != 0) upstream_ended(s, error_text("write", errno));
}

/*
 * One read of a side: bytes are passed on; EOF or an error ends the side. With `failed` (the
 * socket is in error), "nothing to read" ends it too, with the socket's own error. Returns
 * whether bytes were read and the side is still open.
 */
static int read_side(session_t *s, side_t *side, int from_client, int failed) {
  ssize_t n;
  do n = recv(side->fd, scratch_in, READ_SIZE, 0);
  while (n < 0 && errno == EINTR);
  if (n > 0) {
    if (from_client) client_bytes(s, scratch_in, (size_t)n);
    else upstream_bytes(s, scratch_in, (size_t)n);
    return !s->closing && !side->read_done;
  }
  int again = n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
  if (again && !failed) return 0;
  if (n == 0) {
    if (from_client) client_ended(s, 0);
    else upstream_ended(s, NULL);
  } else if (from_client) {
    client_ended(s, 1);
  } else {
    upstream_ended(s, again ? socket_error(side->fd, "read") : error_text("read", errno));
  }
  return 0;
}

static void poll_cb(session_t *s, side_t *side, int status, int events) {
  if (s->closing) return;
  int from_client = side == &s->client;
  if (status < 0) { /* libuv says EBADF for any POLLERR, and has stopped the handle */
    side->polling = 0;
    /*
     * It may still hold what the peer sent before the error (the server's last ErrorResponse,
     * the client's Terminate): read it all, backpressure set aside (the kernel's buffer bounds
     * it), then end the side with the socket's own error.
     */
    if (!side->read_done) while (read_side(s, side, from_client, 1)) {}
    if (!s->closing && !maybe_done(s)) update_polls(s);
    return;
  }
  touch(s);
  if (events & UV_WRITABLE) {
    if (flush(side) != 0) {
      if (from_client) client_ended(s, 1);
      else upstream_ended(s, error_text("write", errno));
      return;
    }
  }
  if ((events & (UV_READABLE | UV_DISCONNECT)) && !side->read_done && !s->closing) {
    side_t *other = from_client ? &s->upstream : &s->client;
    if (pending_size(&other->out) == 0) read_side(s, side, from_client, 0);
  }
  if (!s->closing && !maybe_done(s)) update_polls(s);
}

static void client_poll_cb(uv_poll_t *handle, int status, int events) {
  session_t *s = uv_handle_get_data((uv_handle_t *)handle);
  poll_cb(s, &s->client, status, events);
}

static void upstream_poll_cb(uv_poll_t *handle, int status, int events) {
  session_t *s = uv_handle_get_data((uv_handle_t *)handle);
  poll_cb(s, &s->upstream, status, events);
}

/* Reads a side only while the other side has nothing queued: backpressure both ways. */
static void update_polls(session_t *s) {
  side_t *sides[2] = { &s->client, &s->upstream };
  for (int i = 0; i < 2; i++) {
    side_t *side = sides[i], *other = sides[1 - i];
    int events = 0;
    /* The upstream's own queue counts too: KeyUpdate answers go there without a read of the client. */
    if (!side->read_done && pending_size(&other->out) == 0 && !other->write_shut && pending_size(&side->out) < OWN_QUEUE_LIMIT) events |= UV_READABLE;
    if (pending_size(&side->out) > 0) events |= UV_WRITABLE;
    if (events == side->polling) continue;
    side->polling = events;
    if (events) uv_poll_start(&side->poll, events, i == 0 ? client_poll_cb : upstream_poll_cb);
    else uv_poll_stop(&side->poll);
  }
}

static void release(session_t *s) {
  if (s->native_done && s->js_released) free(s);
}

static void on_handle_closed(uv_handle_t *handle) {
  session_t *s = uv_handle_get_data(handle);
  if (--s->open_handles > 0) return;
  close(s->client.fd);
  close(s->upstream.fd);
  pending_free(&s->client.out);
  pending_free(&s->upstream.out);
  pending_free(&s->cipher_in);
  keys_free(&s->tx);
  keys_free(&s->rx);
  napi_handle_scope scope;
  napi_open_handle_scope(s->env, &scope);
  napi_value argv[3];
  napi_create_string_utf8(s->env, END_NAMES[s->end == END_NONE ? END_SHUTDOWN : s->end], NAPI_AUTO_LENGTH, &argv[0]);
  napi_create_double(s->env, s->bytes_to_upstream, &argv[1]);
  napi_create_double(s->env, s->bytes_to_client, &argv[2]);
  call_js(s, s->on_end, 3, argv);
  napi_close_handle_scope(s->env, scope);
  napi_delete_reference(s->env, s->on_end);
  napi_delete_reference(s->env, s->on_abandoned);
  napi_delete_reference(s->env, s->farewell);
  napi_delete_reference(s->env, s->counters_ref);
  s->native_done = 1;
  release(s);
}

/* Closes both sockets now. */
static void teardown(session_t *s) {
  if (s->closing) return;
  s->closing = 1;
  s->open_handles = 3;
  uv_close((uv_handle_t *)&s->client.poll, on_handle_closed);
  uv_close((uv_handle_t *)&s->upstream.poll, on_handle_closed);
  if (!s->linger_started) uv_timer_init(uv_handle_get_loop((uv_handle_t *)&s->client.poll), &s->linger);
  uv_handle_set_data((uv_handle_t *)&s->linger, s);
  uv_close((uv_handle_t *)&s->linger, on_handle_closed);
}

static void linger_cb(uv_timer_t *timer) { teardown(uv_handle_get_data((uv_handle_t *)timer)); }

/* Both directions are over and nothing waits to be written: the session is. */
static int maybe_done(session_t *s) {
  if (s->closing || !s->client.read_done || !s->upstream.read_done) return 0;
  if (pending_size(&s->client.out) > 0 || pending_size(&s->upstream.out) > 0) return 0;
  teardown(s);
  return 1;
}

/* One side has ended: the other gets LINGER_MS to finish (its FIN, what is queued for it). */
static void finish(session_t *s) {
  if (s->closing || maybe_done(s) || s->linger_started) return;
  s->linger_started = 1;
  uv_timer_init(uv_handle_get_loop((uv_handle_t *)&s->client.poll), &s->linger);
  uv_handle_set_data((uv_handle_t *)&s->linger, s);
  uv_timer_start(&s->linger, linger_cb, LINGER_MS, 0);
}

/* ---------- the JavaScript interface ---------- */

#define CHECK(call) do { if ((call) != napi_ok) { napi_throw_error(env, NULL, "lakebase-proxy native relay: " #call " failed"); return NULL; } } while (0)

/* The algorithms, fetched once: an implicit fetch (EVP_aes_128_gcm() and the like) costs a lookup on every init. */
static EVP_CIPHER *aes128gcm, *aes256gcm, *chacha;
static EVP_MD *sha256, *sha384;

static int cipher_for(const char *name, keys_t *k) {
  if (!aes128gcm) {
    aes128gcm = EVP_CIPHER_fetch(NULL, "AES-128-GCM", NULL);
    aes256gcm = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
    chacha = EVP_CIPHER_fetch(NULL, "ChaCha20-Poly1305", NULL);
    sha256 = EVP_MD_fetch(NULL, "SHA256", NULL);
    sha384 = EVP_MD_fetch(NULL, "SHA384", NULL);
  }
  if (strcmp(name, "TLS_AES_128_GCM_SHA256") == 0) { k->cipher = aes128gcm; k->md = sha256; k->key_len = 16; }
  else if (strcmp(name, "TLS_AES_256_GCM_SHA384") == 0) { k->cipher = aes256gcm; k->md = sha384; k->key_len = 32; }
  else if (strcmp(name, "TLS_CHACHA20_POLY1305_SHA256") == 0) { k->cipher = chacha; k->md = sha256; k->key_len = 32; }
  else return -1;
  if (!k->cipher || !k->md) return -1;
  k->secret_len = EVP_MD_get_size(k->md);
  return 0;
}

static int get_buffer(napi_env env, napi_value value, void **data, size_t *length) {
  bool is_buffer = false;
  if (napi_is_buffer(env, value, &is_buffer) != napi_ok || !is_buffer) return -1;
  return napi_get_buffer_info(env, value, data, length) == napi_ok ? 0 : -1;
}

/*
 * Finds the sequence number that opens `record` with `k`, trying count-1 down to 0: the record is
 * the last application record seen that way, `count` the records seen that way in all (some were
 * under the handshake keys). Returns the sequence number of the record after it, or -1.
 */
static int64_t find_next_seq(keys_t *k, const unsigned char *record, size_t length, int64_t count) {
  unsigned char *plain = malloc(length);
  if (!plain) return -1;
  int64_t found = -1;
  for (int64_t seq = count - 1; seq >= 0 && found < 0; seq--) {
    int type;
    if (open_record(k, (uint64_t)seq, record, length, plain, &type) >= 0) found = seq + 1;
  }
  OPENSSL_cleanse(plain, length);
  free(plain);
  return found;
}

/* A session that failed to start after its first handle was made: closes the copies and frees it. */
static void free_unstarted(uv_handle_t *handle) {
  session_t *s = uv_handle_get_data(handle);
  close(s->client.fd);
  close(s->upstream.fd);
  keys_free(&s->tx);
  keys_free(&s->rx);
  free(s);
}

static void session_finalize(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  session_t *s = data;
  s->js_released = 1;
  release(s);
}

/*
 * start(clientFd, upstreamFd, cipherName, clientSecret, serverSecret,
 *       lastClientRecord, clientRecords, lastServerRecord, serverRecords,
 *       toUpstreamFirst, upstreamCipherFirst, toClientFirst, counters: Float64Array(2),
 *       onEnd(end, bytesToUpstream, bytesToClient), onAbandoned(), farewell(reason|null) -> Buffer|undefined)
 * -> a session handle, or a string saying why the relay cannot take over (nothing was touched then).
 * The relay works on copies of the two descriptors (dup); the caller closes its own.
 */
static napi_value start(napi_env env, napi_callback_info info) {
  size_t argc = 16;
  napi_value argv[16];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc != 16) {
    napi_throw_type_error(env, NULL, "start: 16 arguments expected");
    return NULL;
  }
  int32_t client_fd, upstream_fd;
  CHECK(napi_get_value_int32(env, argv[0], &client_fd));
  CHECK(napi_get_value_int32(env, argv[1], &upstream_fd));
  char cipher_name[64];
  size_t name_len;
  CHECK(napi_get_value_string_utf8(env, argv[2], cipher_name, sizeof cipher_name, &name_len));
  void *client_secret, *server_secret, *last_client, *last_server, *first_up, *first_cipher, *first_client;
  size_t client_secret_len, server_secret_len, last_client_len, last_server_len, first_up_len, first_cipher_len, first_client_len;
  int64_t client_records, server_records;
  if (get_buffer(env, argv[3], &client_secret, &client_secret_len) || get_buffer(env, argv[4], &server_secret, &server_secret_len) ||
      get_buffer(env, argv[5], &last_client, &last_client_len) || get_buffer(env, argv[7], &last_server, &last_server_len) ||
      get_buffer(env, argv[9], &first_up, &first_up_len) || get_buffer(env, argv[10], &first_cipher, &first_cipher_len) ||
      get_buffer(env, argv[11], &first_client, &first_client_len)) {
    napi_throw_type_error(env, NULL, "start: buffers expected");
    return NULL;
  }
  CHECK(napi_get_value_int64(env, argv[6], &client_records));
  CHECK(napi_get_value_int64(env, argv[8], &server_records));
  napi_typedarray_type counters_type;
  size_t counters_len;
  void *counters;
  CHECK(napi_get_typedarray_info(env, argv[12], &counters_type, &counters_len, &counters, NULL, NULL));
  if (counters_type != napi_float64_array || counters_len < 2) {
    napi_throw_type_error(env, NULL, "start: counters must be a Float64Array(2)");
    return NULL;
  }

  session_t *s = calloc(1, sizeof *s);
  napi_value why;
  const char *refusal = NULL;
  if (!s) refusal = "out of memory";
  else if (cipher_for(cipher_name, &s->tx) != 0 || cipher_for(cipher_name, &s->rx) != 0) refusal = "cipher not supported by the native relay";
  else if ((int)client_secret_len != s->tx.secret_len || (int)server_secret_len != s->rx.secret_len) refusal = "traffic secret of the wrong length";
  if (!refusal) {
    memcpy(s->tx.secret, client_secret, client_secret_len);
    memcpy(s->rx.secret, server_secret, server_secret_len);
    /* The client's own records open with its key too: the same AEAD, the other way. */
    if (keys_install(&s->tx, 0) != 0 || keys_install(&s->rx, 0) != 0) refusal = "could not derive the traffic keys";
  }
  int64_t tx_seq = -1, rx_seq = -1;
  if (!refusal) {
    tx_seq = find_next_seq(&s->tx, last_client, last_client_len, client_records);
    rx_seq = find_next_seq(&s->rx, last_server, last_server_len, server_records);
    if (tx_seq < 0 || rx_seq < 0) refusal = "the records seen do not open with the traffic secrets";
  }
  if (!refusal && keys_install(&s->tx, 1) != 0) refusal = "could not derive the traffic keys";
  if (refusal) {
    if (s) {
      keys_free(&s->tx);
      keys_free(&s->rx);
      free(s);
    }
    CHECK(napi_create_string_utf8(env, refusal, NAPI_AUTO_LENGTH, &why));
    return why;
  }
  uv_loop_t *loop;
  CHECK(napi_get_uv_event_loop(env, &loop));
  /* Copies of both descriptors: Node.js closes its own sockets once this returns. */
  int client_copy = fcntl(client_fd, F_DUPFD_CLOEXEC, 0);
  int upstream_copy = client_copy < 0 ? -1 : fcntl(upstream_fd, F_DUPFD_CLOEXEC, 0);
  int failed = client_copy < 0 || upstream_copy < 0 ? -errno : 0;
  if (!failed) failed = uv_poll_init_socket(loop, &s->client.poll, client_copy);
  if (failed) {
    if (client_copy >= 0) close(client_copy);
    if (upstream_copy >= 0) close(upstream_copy);
    keys_free(&s->tx);
    keys_free(&s->rx);
    free(s);
    CHECK(napi_create_string_utf8(env, uv_strerror(failed), NAPI_AUTO_LENGTH, &why));
    return why;
  }
  s->client.fd = client_copy;
  s->upstream.fd = upstream_copy;
  uv_handle_set_data((uv_handle_t *)&s->client.poll, s);
  failed = uv_poll_init_socket(loop, &s->upstream.poll, upstream_copy);
  if (failed) {
    uv_close((uv_handle_t *)&s->client.poll, free_unstarted);
    CHECK(napi_create_string_utf8(env, uv_strerror(failed), NAPI_AUTO_LENGTH, &why));
    return why;
  }
  uv_handle_set_data((uv_handle_t *)&s->upstream.poll, s);
  s->tx.seq = (uint64_t)tx_seq;
  s->rx.seq = (uint64_t)rx_seq;
  s->env = env;
  s->upstream_idle = 1;
  s->messages.current_type = s->messages.last_type = -1;
  s->counters = counters;
  CHECK(napi_create_reference(env, argv[12], 1, &s->counters_ref));
  CHECK(napi_create_reference(env, argv[13], 1, &s->on_end));
  CHECK(napi_create_reference(env, argv[14], 1, &s->on_abandoned));
  CHECK(napi_create_reference(env, argv[15], 1, &s->farewell));
  touch(s);

  napi_value handle;
  CHECK(napi_create_external(env, s, session_finalize, NULL, &handle));
  /*
   * What arrived during the login, in the order it happened: the greeting (it ends with
   * ReadyForQuery) and anything the upstream sent after it, then what the client sent after
   * its startup, which makes a query run.
   */
  if (first_client_len > 0) {
    s->bytes_to_client += (double)first_client_len;
    s->counters[1] += (double)first_client_len;
    boundaries_observe(&s->messages, first_client, first_client_len);
    s->upstream_idle = at_boundary(&s->messages) && s->messages.last_type == 'Z';
    if (send_or_keep(&s->client, first_client, first_client_len) != 0) client_ended(s, 1);
  }
  if (!s->closing && first_cipher_len > 0) upstream_bytes(s, first_cipher, first_cipher_len);
  if (!s->closing && !s->upstream.read_done && first_up_len > 0) client_bytes(s, first_up, first_up_len);
  if (!s->closing && !maybe_done(s)) update_polls(s);
  return handle;
}

static session_t *session_of(napi_env env, napi_callback_info info, napi_value *rest, size_t want) {
  size_t argc = 1 + want;
  napi_value argv[4];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 1 + want) return NULL;
  void *data = NULL;
  if (napi_get_value_external(env, argv[0], &data) != napi_ok) return NULL;
  for (size_t i = 0; i < want; i++) rest[i] = argv[1 + i];
  return data;
}

/* close(handle, end): ends the session now (shutdown, idle timeout). */
static napi_value close_session(napi_env env, napi_callback_info info) {
  napi_value rest[1];
  session_t *s = session_of(env, info, rest, 1);
  if (!s || s->native_done || s->closing) return NULL;
  char name[32];
  size_t len;
  CHECK(napi_get_value_string_utf8(env, rest[0], name, sizeof name, &len));
  enum end_reason end = strcmp(name, "idle_timeout") == 0 ? END_IDLE : END_SHUTDOWN;
  if (s->end == END_NONE && !s->upstream_idle) call_js(s, s->on_abandoned, 0, NULL);
  decide(s, end);
  teardown(s);
  return NULL;
}

/* state(handle) -> [queryRunning (0|1), milliseconds since the last byte either way] */
static napi_value state(napi_env env, napi_callback_info info) {
  session_t *s = session_of(env, info, NULL, 0);
  napi_value result, running, idle;
  CHECK(napi_create_array_with_length(env, 2, &result));
  int query = s && !s->native_done ? !s->upstream_idle : 0;
  double idle_ms = 0;
  if (s && !s->native_done) idle_ms = (double)(uv_now(uv_handle_get_loop((uv_handle_t *)&s->client.poll)) - s->last_activity);
  CHECK(napi_create_int32(env, query, &running));
  CHECK(napi_create_double(env, idle_ms, &idle));
  CHECK(napi_set_element(env, result, 0, running));
  CHECK(napi_set_element(env, result, 1, idle));
  return result;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_value name;
  CHECK(napi_create_string_utf8(env, "lakebase-proxy relay", NAPI_AUTO_LENGTH, &name));
  CHECK(napi_async_init(env, NULL, name, &async_context));
  napi_property_descriptor methods[] = {
    { "start", NULL, start, NULL, NULL, NULL, napi_default, NULL },
    { "close", NULL, close_session, NULL, NULL, NULL, napi_default, NULL },
    { "state", NULL, state, NULL, NULL, NULL, napi_default, NULL },
  };
  CHECK(napi_define_properties(env, exports, sizeof methods / sizeof methods[0], methods));
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
