/* The harnesses' shared pieces (see support.h). */
#define _GNU_SOURCE
#include "support.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* ---------- the input ---------- */

const uint8_t *in_data;
size_t in_left;

unsigned in_u8(void) {
  if (in_left == 0) return 0;
  in_left--;
  return *in_data++;
}

size_t in_size(size_t max) { return max ? ((in_u8() << 8) | in_u8()) % (max + 1) : 0; }

/* ---------- growable byte strings ---------- */

void put(bytes_t *b, const void *p, size_t n) {
  if (n == 0) return;
  if (b->n + n > b->cap) {
    b->cap = (b->n + n) * 2;
    b->d = realloc(b->d, b->cap);
    if (!b->d) abort();
  }
  if (p) memcpy(b->d + b->n, p, n);
  b->n += n;
}

void put_u8(bytes_t *b, unsigned v) {
  unsigned char c = (unsigned char)v;
  put(b, &c, 1);
}

void put_u32(bytes_t *b, uint32_t v) {
  unsigned char be[4] = { (unsigned char)(v >> 24), (unsigned char)(v >> 16), (unsigned char)(v >> 8), (unsigned char)v };
  put(b, be, 4);
}

void drop_front(bytes_t *b, size_t n) {
  memmove(b->d, b->d + n, b->n - n);
  b->n -= n;
}

void bytes_free(bytes_t *b) {
  free(b->d);
  memset(b, 0, sizeof *b);
}

void put_pattern(bytes_t *b, size_t n, size_t salt) {
  put(b, NULL, n);
  for (size_t i = b->n - n; i < b->n; i++) {
    size_t at = i + salt;
    b->d[i] = (unsigned char)((at * 131) ^ (at >> 8) ^ (at >> 16));
  }
}

/* ---------- failures ---------- */

const char *fuzz_target = "RELAY";
const char *phase = "setup";
int verbose;

void fail(const char *fmt, ...) {
  va_list a;
  va_start(a, fmt);
  fprintf(stderr, "\n%s INVARIANT FAILED (%s): ", fuzz_target, phase);
  vfprintf(stderr, fmt, a);
  fputc('\n', stderr);
  va_end(a);
  abort();
}

void check_prefix_from(const char *what, const bytes_t *got, size_t from, size_t got_n, const bytes_t *a, const bytes_t *b) {
  size_t expected_n = a->n + (b ? b->n : 0);
  if (got_n > expected_n) fail("%s: %zu bytes arrived, only %zu were sent", what, got_n, expected_n);
  for (size_t i = from; i < got_n; i++) {
    unsigned char expected = i < a->n ? a->d[i] : b->d[i - a->n];
    if (got->d[i] != expected) fail("%s: byte %zu differs (0x%02x, sent 0x%02x) of %zu arrived, %zu sent", what, i, got->d[i], expected, got_n, expected_n);
  }
}

void check_prefix(const char *what, const bytes_t *got, size_t got_n, const bytes_t *expected) { check_prefix_from(what, got, 0, got_n, expected, NULL); }

/* ---------- sockets ---------- */

void set_nonblocking(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

void small_buffers(int fd, int size) {
  setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
  setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
}

void connected_pair(int tcp, int fds[2]) {
  if (!tcp) {
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, fds) != 0) fail("socketpair: %s", strerror(errno));
    return;
  }
  struct sockaddr_in address = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
  socklen_t length = sizeof address;
  int listener = socket(AF_INET, SOCK_STREAM, 0), one = 1;
  if (listener < 0 || bind(listener, (struct sockaddr *)&address, sizeof address) != 0 || listen(listener, 1) != 0 ||
      getsockname(listener, (struct sockaddr *)&address, &length) != 0)
    fail("TCP listener: %s", strerror(errno));
  fds[0] = socket(AF_INET, SOCK_STREAM, 0);
  if (fds[0] < 0 || connect(fds[0], (struct sockaddr *)&address, sizeof address) != 0 || (fds[1] = accept(listener, NULL, NULL)) < 0) fail("TCP connect: %s", strerror(errno));
  close(listener);
  setsockopt(fds[0], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  setsockopt(fds[1], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

int fd_open(int fd) { return fd >= 0 && fcntl(fd, F_GETFD) != -1; }

int open_descriptors(void) {
  DIR *dir = opendir("/proc/self/fd");
  if (!dir) fail("/proc/self/fd: %s", strerror(errno));
  int n = 0;
  for (struct dirent *entry; (entry = readdir(dir)) != NULL;) n += entry->d_name[0] != '.';
  closedir(dir);
  return n - 1; /* the directory's own descriptor */
}

int peer_close(int *fd, int *shut, int *eof, int reset) {
  if (*fd < 0) return 0;
  if (reset) {
    struct linger now = { 1, 0 };
    setsockopt(*fd, SOL_SOCKET, SO_LINGER, &now, sizeof now);
  }
  close(*fd);
  *fd = -1;
  *shut = *eof = 1;
  return 1;
}

/* ---------- the server ---------- */

SSL_CTX *server_ctx, *server_ctx_tls12;
char *ca_pem;
size_t ca_len;

void make_server(void) {
  EVP_PKEY *key = EVP_EC_gen("P-256");
  X509 *cert = X509_new();
  if (!key || !cert) fail("key or certificate");
  X509_set_version(cert, 2);
  ASN1_INTEGER_set(X509_get_serialNumber(cert), 1);
  X509_gmtime_adj(X509_getm_notBefore(cert), -3600);
  X509_gmtime_adj(X509_getm_notAfter(cert), 3600L * 24 * 365);
  X509_NAME *name = X509_get_subject_name(cert);
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)"localhost", -1, -1, 0);
  X509_set_issuer_name(cert, name);
  X509_set_pubkey(cert, key);
  X509V3_CTX v3;
  X509V3_set_ctx(&v3, cert, cert, NULL, NULL, 0);
  X509_EXTENSION *san = X509V3_EXT_conf_nid(NULL, &v3, NID_subject_alt_name, "DNS:localhost,IP:127.0.0.1");
  if (!san || !X509_add_ext(cert, san, -1)) fail("subjectAltName");
  X509_EXTENSION_free(san);
  if (!X509_sign(cert, key, EVP_sha256())) fail("X509_sign");
  BIO *pem = BIO_new(BIO_s_mem());
  PEM_write_bio_X509(pem, cert);
  char *text;
  long n = BIO_get_mem_data(pem, &text);
  ca_pem = malloc((size_t)n);
  memcpy(ca_pem, text, (size_t)n);
  ca_len = (size_t)n;
  BIO_free(pem);
  for (int i = 0; i < 2; i++) {
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (!ctx || SSL_CTX_use_certificate(ctx, cert) != 1 || SSL_CTX_use_PrivateKey(ctx, key) != 1) fail("server context");
    if (i == 1) SSL_CTX_set_max_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_session_id_context(ctx, (const unsigned char *)"fuzz", 4);
    if (i == 0) server_ctx = ctx;
    else server_ctx_tls12 = ctx;
  }
  X509_free(cert);
  EVP_PKEY_free(key);
}

void server_init(tls_server_t *s, SSL_CTX *ctx, int fd) {
  memset(s, 0, sizeof *s);
  s->fd = fd;
  s->ssl = SSL_new(ctx);
  s->in = BIO_new(BIO_s_mem());
  s->out = BIO_new(BIO_s_mem());
  SSL_set_bio(s->ssl, s->in, s->out);
  SSL_set_accept_state(s->ssl);
}

void server_free(tls_server_t *s) {
  if (s->fd >= 0) close(s->fd);
  s->fd = -1;
  SSL_free(s->ssl);
  s->ssl = NULL;
  bytes_free(&s->cipher);
  bytes_free(&s->sent);
  bytes_free(&s->got);
}

void server_collect(tls_server_t *s) {
  unsigned char b[16384];
  int n;
  while ((n = BIO_read(s->out, b, sizeof b)) > 0) put(&s->cipher, b, (size_t)n);
}

void server_flush(tls_server_t *s, size_t max) {
  server_collect(s);
  if (s->fd < 0 || s->shut || s->cipher.n == 0) return;
  size_t n = max < s->cipher.n ? max : s->cipher.n;
  ssize_t w = send(s->fd, s->cipher.d, n, MSG_DONTWAIT | MSG_NOSIGNAL);
  if (w > 0) {
    drop_front(&s->cipher, (size_t)w);
    s->flushed += (size_t)w;
  }
}

void server_read(tls_server_t *s, size_t max) {
  if (s->fd < 0) return;
  unsigned char b[65536];
  if (max > sizeof b) max = sizeof b;
  if (!s->eof && max > 0) {
    ssize_t r = recv(s->fd, b, max, MSG_DONTWAIT);
    if (r > 0) BIO_write(s->in, b, (int)r);
    else if (r == 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) {
      s->eof = 1;
      BIO_set_mem_eof_return(s->in, 0);
    }
  }
  if (s->broken) return;
  ERR_clear_error();
  if (!SSL_is_init_finished(s->ssl)) {
    int r = SSL_do_handshake(s->ssl);
    if (r <= 0) {
      int code = SSL_get_error(s->ssl, r);
      if (code != SSL_ERROR_WANT_READ && code != SSL_ERROR_WANT_WRITE) s->broken = 1;
      ERR_clear_error();
      server_collect(s);
      return;
    }
  }
  for (;;) {
    int r = SSL_read(s->ssl, b, sizeof b);
    if (r > 0) {
      put(&s->got, b, (size_t)r);
      continue;
    }
    int code = SSL_get_error(s->ssl, r);
    if (code == SSL_ERROR_ZERO_RETURN) s->got_close = 1;
    else if (code == SSL_ERROR_SYSCALL && s->eof) s->got_close = 1; /* EOF without close_notify */
    else if (code != SSL_ERROR_WANT_READ && code != SSL_ERROR_WANT_WRITE) s->broken = 1;
    ERR_clear_error();
    break;
  }
  server_collect(s);
}

int server_write(tls_server_t *s, const unsigned char *data, size_t n) {
  if (s->shut || s->broken || !SSL_is_init_finished(s->ssl) || (SSL_get_shutdown(s->ssl) & SSL_SENT_SHUTDOWN) || n == 0) return 0;
  ERR_clear_error();
  size_t written = 0;
  if (SSL_write_ex(s->ssl, data, n, &written) != 1 || written != n) {
    s->broken = 1;
    ERR_clear_error();
    return 0;
  }
  put(&s->sent, data, n);
  server_collect(s);
  return 1;
}

void server_close_notify(tls_server_t *s) {
  if (s->broken || !SSL_is_init_finished(s->ssl)) return;
  ERR_clear_error();
  SSL_shutdown(s->ssl);
  ERR_clear_error();
  server_collect(s);
}

int server_fin(tls_server_t *s) {
  if (s->fd < 0 || s->shut) return 0;
  int cut = s->cipher.n > 0 || !SSL_is_init_finished(s->ssl);
  shutdown(s->fd, SHUT_WR);
  s->shut = 1;
  return cut;
}

static void stop_timer(uv_handle_t *handle, void *arg) {
  int (*const *keep)(uv_handle_t *) = arg;
  if (uv_handle_get_type(handle) == UV_TIMER && uv_is_active(handle) && !(*keep && (*keep)(handle))) uv_timer_stop((uv_timer_t *)handle);
}

void run_loop_keeping(uv_loop_t *loop, int times, int (*keep)(uv_handle_t *timer)) {
  for (int i = 0; i < times; i++) {
    uv_run(loop, UV_RUN_NOWAIT);
    uv_walk(loop, stop_timer, &keep);
  }
}

void run_loop_of(uv_loop_t *loop, int times) { run_loop_keeping(loop, times, NULL); }
