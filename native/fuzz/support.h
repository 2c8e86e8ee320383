/*
 * What the libFuzzer targets share (harness.c for relay.c, txclient-harness.c for txclient.c):
 * the input read as a script, growable byte strings, failures that abort so libFuzzer keeps the
 * input, socket pairs, and the OpenSSL server that stands in for Postgres.
 *
 * The server works on memory BIOs: its ciphertext reaches the socket only when a harness flushes
 * it, in pieces of the input's sizes, so records arrive cut anywhere. A harness adds its own
 * bookkeeping around these calls (what it expects each peer to receive).
 */
#ifndef LAKEBASE_PROXY_FUZZ_SUPPORT_H
#define LAKEBASE_PROXY_FUZZ_SUPPORT_H

#include <openssl/ssl.h>
#include <uv.h>
#include <stddef.h>
#include <stdint.h>

/* ---------- the input ---------- */

extern const uint8_t *in_data;
extern size_t in_left;

/* The next byte of the input; 0 once it is used up (so every script ends). */
unsigned in_u8(void);
/* Two bytes as a size up to `max`. */
size_t in_size(size_t max);

/* ---------- growable byte strings ---------- */

typedef struct {
  unsigned char *d;
  size_t n, cap;
} bytes_t;

/* Appends n bytes (p NULL: room only, filled by the caller). */
void put(bytes_t *b, const void *p, size_t n);
void put_u8(bytes_t *b, unsigned v);
void put_u32(bytes_t *b, uint32_t v);
void drop_front(bytes_t *b, size_t n);
void bytes_free(bytes_t *b);
/* Bytes whose value depends on their position in the stream: a loss, a repeat or a swap shows. */
void put_pattern(bytes_t *b, size_t n, size_t salt);

/* ---------- failures ---------- */

extern const char *fuzz_target; /* names the harness in a failure */
extern const char *phase;
extern int verbose; /* FUZZ_VERBOSE=1: each step on stderr */

void fail(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
/* `got` (its first got_n bytes, of which the first `from` were checked before) is a prefix of `a` followed by `b`. */
void check_prefix_from(const char *what, const bytes_t *got, size_t from, size_t got_n, const bytes_t *a, const bytes_t *b);
void check_prefix(const char *what, const bytes_t *got, size_t got_n, const bytes_t *expected);

/* ---------- sockets ---------- */

void set_nonblocking(int fd);
void small_buffers(int fd, int size);
/* Two connected stream sockets: a socketpair, or TCP over the loopback (where a close may send an RST). */
void connected_pair(int tcp, int fds[2]);
int fd_open(int fd);
/* The number of descriptors the process holds (a leak shows as a count that grew). */
int open_descriptors(void);
/* A peer closes its socket; with `reset` (TCP), the other end gets an RST instead of a FIN.
   Returns whether there was a socket to close. */
int peer_close(int *fd, int *shut, int *eof, int reset);

/* ---------- the server ---------- */

/* Made once by make_server(): a self-signed certificate for localhost and 127.0.0.1, TLS 1.3 (and 1.2) contexts. */
extern SSL_CTX *server_ctx, *server_ctx_tls12;
extern char *ca_pem;
extern size_t ca_len;
void make_server(void);

typedef struct {
  int fd;          /* its end of the upstream socket (-1 once closed) */
  SSL *ssl;
  BIO *in, *out;
  int eof;         /* EOF (or an error) seen on fd */
  int shut;        /* fd shut for writing, or closed */
  int got_close;   /* it read the peer's close_notify, or EOF */
  int broken;      /* its SSL failed */
  bytes_t cipher;  /* ciphertext not yet on the socket */
  size_t flushed;  /* ciphertext put on the socket */
  bytes_t sent;    /* its plaintext, all of it */
  bytes_t got;     /* plaintext it read */
} tls_server_t;

void server_init(tls_server_t *s, SSL_CTX *ctx, int fd);
void server_free(tls_server_t *s);
/* The ciphertext OpenSSL made, into `cipher`. */
void server_collect(tls_server_t *s);
/* Ciphertext onto the socket, up to `max` bytes. */
void server_flush(tls_server_t *s, size_t max);
/* Reads the socket (up to `max` bytes), then what the server can make of it: handshake or plaintext into `got`. */
void server_read(tls_server_t *s, size_t max);
/* Plaintext to send (appended to `sent`); 0 when the server cannot write any more. */
int server_write(tls_server_t *s, const unsigned char *data, size_t n);
void server_close_notify(tls_server_t *s);
/* FIN; returns 1 when that cut something short (records not flushed, or the handshake). */
int server_fin(tls_server_t *s);

/*
 * `times` turns of `loop`. A linger timer (the last resort against a peer that never answers) is
 * stopped as soon as it starts: the harnesses' peers always answer, so what only that timer would
 * end hangs instead, and the drain reports it.
 */
void run_loop_of(uv_loop_t *loop, int times);
/* The same, leaving running the timers `keep` names: ones the code under test relies on (a wait timeout). */
void run_loop_keeping(uv_loop_t *loop, int times, int (*keep)(uv_handle_t *timer));

#endif
