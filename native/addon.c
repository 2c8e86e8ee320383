/*
 * The N-API face of relay.c, for src/proxy/native-relay.ts. Main thread only: the callbacks run
 * JavaScript directly (the addon must not be loaded in worker threads).
 *
 *   context(verify, systemStore, caPem)                     -> ctx | string (why not)
 *   connect(ctx, fd, sni|null, host|null, onHandshake(error|null, verifyCode), onData(buffer|null, error|null),
 *           onEnd(end, bytesToUpstream, bytesToClient))     -> conn | string (nothing started; fd not taken)
 *   write(conn, buffer) -> bytes still queued (-1: closed; onData gets an empty Buffer once written)
 *   end(conn) (close_notify and FIN after what is queued);  pause(conn, paused);  certificate(conn) -> Buffer | undefined
 *   info(conn) -> [version, cipher, resumed]
 *   relay(conn, clientFd, toClientFirst, toUpstreamFirst, counters: Float64Array(2), onAbandoned(), farewell(reason|null) -> Buffer,
 *         onDetached(end, bytesToUpstream, bytesToClient, reusable, status) | null (a pooled relay))
 *        -> undefined | string (refused; the connection is unchanged)
 *   detach(conn, end);  close(conn, end);  state(conn) -> [queryRunning 0|1, idleMs]
 *
 * A transaction-mode client (txclient.h):
 *   clientCallbacks(onData(self, buffer|null, error|null), onNeed(self, unit|null, waitedMs),
 *          onBack(self, how (enum lp_back), status (a char code), flags, running, reports|null, rest|null, reason|null, deskId), onEnd(self),
 *          onRewrite(self, unit, deskId) -> Buffer | null): once, before any client
 *   client(fd, counters: Float64Array(2), totals: Float64Array(2), self) -> client | string
 *   clientWrite(client, buffer) -> bytes still queued (-1: closed; onData gets an empty Buffer once written)
 *   clientEnd(client);  clientClose(client);  clientPause(client, paused);  clientDesk(client, desk|null, sid);  clientHold(client)
 *   clientFast(client, first) -> boolean
 *   clientAttach(client, conn, unread, settings, unit, joinId, sid, expiresInMs) -> true (joined the desk) | false | string (refused)
 *   textPlain(buffer) -> boolean (lp_text_plain)
 *   clientJs(client) -> Buffer (the unread bytes);  clientState(client) -> [lent 0|1, running 0|1, idleMs, deskId]
 * A desk (txclient.h):
 *   desk(counts: Float64Array(2), waits: Float64Array, onOut(id, why), onFull()) -> desk | string
 *   deskSet(desk, room, jsWaiting);  deskConfig(desk, waitTimeoutMs, checkDelayMs);  deskStop(desk, stopped);  deskClose(desk)
 *   deskOffer(desk, conn, id, sid, expiresInMs) -> boolean;  deskWake(desk) -> boolean;  deskReclaim(desk, id) -> boolean
 *   deskIdleMs(desk, id) -> ms | -1;  deskReclaimAny(desk) -> [id (0: none), idleMs]  deskStats(desk) -> [idle, count, waiting, maxWaitMs, resetting]
 * Sessions on a desk (txclient.h, session mode):
 *   deskSessions(desk, counters: Float64Array(2), resetQuery: Buffer, onSession(id, how, end, toUpstream, toClient, reusable, status, abandoned),
 *                onFarewell(id, reason|null) -> Buffer, onReset(id, answer|null)): once, before the rest;  deskResetQuery(desk, message)
 *   deskPark(desk, conn, id, sid, expiresInMs) -> boolean;  deskTake(desk, sid) -> id | 0;  deskUntake(desk, id)
 *   deskRelay(desk, id, clientFd, hello, first, own) -> undefined | string (then: state, detach, close of the connection);  deskSweep(desk, resetTimeoutMs)
 *            (own: the descriptor is taken as it is, not copied, when the relay starts)
 *   deskHold(desk, id)
 * A listener (listener.h):
 *   listen(fd, onArrival(kind (enum lp_arrival), fd, data|null, address|null, port, localAddress|null, localPort)) -> listener | string
 *   listenConfig(listener, negotiate, maxPending, timeoutMs);  listenPending(listener) -> number;  listenOutside(listener, n);  listenHandOver(listener);  listenClose(listener)
 *
 * Descriptors are taken as copies (dup): the caller closes its own (but deskRelay's with own).
 */
#include <arpa/inet.h>
#include <fcntl.h>
#include <node_api.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "listener.h"
#include "relay.h"
#include "txclient.h"
#include "buffer.h"

typedef struct {
  napi_env env;
  lp_conn *conn; /* NULL once ended */
  int js_released;
  napi_ref on_handshake, on_data, on_end, on_abandoned, farewell, counters, on_detached;
} binding_t;

static napi_async_context async_context;

/* Handles are tagged: a context passed where a connection belongs is refused, not misread. */
static const napi_type_tag CTX_TAG = { 0x6c616b6562617365ULL, 0x2d70726f78792d31ULL };
static const napi_type_tag CONN_TAG = { 0x6c616b6562617365ULL, 0x2d70726f78792d32ULL };
static const napi_type_tag CLIENT_TAG = { 0x6c616b6562617365ULL, 0x2d70726f78792d33ULL };
static const napi_type_tag DESK_TAG = { 0x6c616b6562617365ULL, 0x2d70726f78792d34ULL };
static const napi_type_tag LISTENER_TAG = { 0x6c616b6562617365ULL, 0x2d70726f78792d35ULL };

static int tagged(napi_env env, napi_value value, const napi_type_tag *tag) {
  bool ok = false;
  return napi_check_object_type_tag(env, value, tag, &ok) == napi_ok && ok;
}

#define CHECK(call)                                                                   \
  do {                                                                                \
    if ((call) != napi_ok) {                                                          \
      napi_throw_error(env, NULL, "lakebase-proxy native relay: " #call " failed");   \
      return NULL;                                                                    \
    }                                                                                 \
  } while (0)

static napi_value string(napi_env env, const char *text) {
  napi_value value = NULL;
  napi_create_string_utf8(env, text, NAPI_AUTO_LENGTH, &value);
  return value;
}

static napi_value undefined(napi_env env) {
  napi_value value = NULL;
  napi_get_undefined(env, &value);
  return value;
}

/* A callback into JavaScript; an exception there is Node's uncaught exception, as for any callback. */
static napi_value call_js(napi_env env, napi_ref ref, size_t argc, napi_value *argv) {
  napi_value fn, recv, result = NULL;
  if (!ref || napi_get_reference_value(env, ref, &fn) != napi_ok || !fn) return NULL;
  napi_get_global(env, &recv);
  if (napi_make_callback(env, async_context, recv, fn, argc, argv, &result) != napi_ok) {
    bool pending = false;
    napi_is_exception_pending(env, &pending);
    if (pending) {
      napi_value error;
      napi_get_and_clear_last_exception(env, &error);
      napi_fatal_exception(env, error);
    }
    return NULL;
  }
  return result;
}

/*
 * A callback whose answer C needs now, with nothing queued by it to run after (no promises): a
 * plain call, without call_js' callback scope (whose microtask and tick queues cost more than the
 * callback itself, once a transaction). An exception is Node's uncaught exception all the same.
 */
static napi_value call_js_now(napi_env env, napi_ref ref, size_t argc, napi_value *argv) {
  napi_value fn, recv, result = NULL;
  if (!ref || napi_get_reference_value(env, ref, &fn) != napi_ok || !fn) return NULL;
  napi_get_global(env, &recv);
  if (napi_call_function(env, recv, fn, argc, argv, &result) != napi_ok) {
    bool pending = false;
    napi_is_exception_pending(env, &pending);
    if (pending) {
      napi_value error;
      napi_get_and_clear_last_exception(env, &error);
      napi_fatal_exception(env, error);
    }
    return NULL;
  }
  return result;
}

static void release(binding_t *b) {
  if (b->conn || !b->js_released) return;
  free(b);
}

static void delete_ref(napi_env env, napi_ref *ref) {
  if (*ref) napi_delete_reference(env, *ref);
  *ref = NULL;
}

/* ---------- callbacks from relay.c ---------- */

static void on_handshake(lp_conn *c, void *user, const char *error, long verify) {
  (void)c;
  binding_t *b = user;
  napi_handle_scope scope;
  napi_open_handle_scope(b->env, &scope);
  napi_value argv[2];
  if (error) argv[0] = string(b->env, error);
  else napi_get_null(b->env, &argv[0]);
  napi_create_int64(b->env, verify, &argv[1]);
  napi_ref ref = b->on_handshake;
  b->on_handshake = NULL; /* once */
  call_js(b->env, ref, 2, argv);
  if (ref) napi_delete_reference(b->env, ref);
  napi_close_handle_scope(b->env, scope);
}

static void on_data(lp_conn *c, void *user, const unsigned char *data, size_t n, const char *error) {
  (void)c;
  binding_t *b = user;
  napi_handle_scope scope;
  napi_open_handle_scope(b->env, &scope);
  napi_value argv[2];
  if (data) napi_create_buffer_copy(b->env, n, data, NULL, &argv[0]);
  else napi_get_null(b->env, &argv[0]);
  if (error) argv[1] = string(b->env, error);
  else napi_get_null(b->env, &argv[1]);
  call_js(b->env, b->on_data, 2, argv);
  napi_close_handle_scope(b->env, scope);
}

static void on_abandoned(lp_conn *c, void *user) {
  (void)c;
  binding_t *b = user;
  napi_handle_scope scope;
  napi_open_handle_scope(b->env, &scope);
  call_js(b->env, b->on_abandoned, 0, NULL);
  napi_close_handle_scope(b->env, scope);
}

static size_t on_farewell(lp_conn *c, void *user, const char *reason, unsigned char *out, size_t cap) {
  (void)c;
  binding_t *b = user;
  size_t written = 0;
  napi_handle_scope scope;
  napi_open_handle_scope(b->env, &scope);
  napi_value argv[1];
  if (reason) argv[0] = string(b->env, reason);
  else napi_get_null(b->env, &argv[0]);
  napi_value result = call_js(b->env, b->farewell, 1, argv);
  bool is_buffer = false;
  void *data;
  size_t length;
  if (result && napi_is_buffer(b->env, result, &is_buffer) == napi_ok && is_buffer &&
      napi_get_buffer_info(b->env, result, &data, &length) == napi_ok && length <= cap) {
    memcpy(out, data, length);
    written = length;
  }
  napi_close_handle_scope(b->env, scope);
  return written;
}

/* The references that live as long as one relay of the connection. */
static void delete_relay_refs(napi_env env, binding_t *b) {
  delete_ref(env, &b->counters);
  delete_ref(env, &b->on_abandoned);
  delete_ref(env, &b->farewell);
  delete_ref(env, &b->on_detached);
}

static void on_detached(lp_conn *c, void *user, enum lp_end end, double to_upstream, double to_client, int reusable, int status) {
  (void)c;
  binding_t *b = user;
  napi_env env = b->env;
  napi_handle_scope scope;
  napi_open_handle_scope(env, &scope);
  napi_value argv[5];
  argv[0] = string(env, LP_END_NAMES[end]);
  napi_create_double(env, to_upstream, &argv[1]);
  napi_create_double(env, to_client, &argv[2]);
  napi_get_boolean(env, reusable, &argv[3]);
  char letter[2] = { status > 0 && status < 128 ? (char)status : '?', 0 };
  argv[4] = string(env, letter);
  napi_ref ref = b->on_detached;
  b->on_detached = NULL;
  delete_relay_refs(env, b);
  call_js(env, ref, 5, argv);
  if (ref) napi_delete_reference(env, ref);
  napi_close_handle_scope(env, scope);
}

static void on_end(lp_conn *c, void *user, enum lp_end end, double to_upstream, double to_client) {
  (void)c;
  binding_t *b = user;
  napi_env env = b->env;
  b->conn = NULL;
  napi_handle_scope scope;
  napi_open_handle_scope(env, &scope);
  napi_value argv[3];
  argv[0] = string(env, LP_END_NAMES[end]);
  napi_create_double(env, to_upstream, &argv[1]);
  napi_create_double(env, to_client, &argv[2]);
  call_js(env, b->on_end, 3, argv);
  napi_close_handle_scope(env, scope);
  delete_ref(env, &b->on_handshake);
  delete_ref(env, &b->on_data);
  delete_ref(env, &b->on_end);
  delete_relay_refs(env, b);
  release(b);
}

static const lp_callbacks callbacks = { on_handshake, on_data, on_abandoned, on_farewell, on_detached, on_end };

/* ---------- the JavaScript interface ---------- */

static void ctx_finalize(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  lp_ctx_release(data);
}

static void conn_finalize(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  binding_t *b = data;
  b->js_released = 1;
  release(b);
}

static int get_buffer(napi_env env, napi_value value, void **data, size_t *length) {
  bool is_buffer = false;
  if (napi_is_buffer(env, value, &is_buffer) != napi_ok || !is_buffer) return -1;
  return napi_get_buffer_info(env, value, data, length) == napi_ok ? 0 : -1;
}

static int get_args(napi_env env, napi_callback_info info, size_t want, napi_value *argv) {
  size_t argc = want;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < want) {
    napi_throw_type_error(env, NULL, "lakebase-proxy native relay: too few arguments");
    return -1;
  }
  return 0;
}

/* The connection behind a handle; NULL once it ended. */
static binding_t *binding_of(napi_env env, napi_value value) {
  void *data = NULL;
  if (!tagged(env, value, &CONN_TAG) || napi_get_value_external(env, value, &data) != napi_ok) return NULL;
  return data;
}

/* A copy of a string argument (NULL for null or undefined), or NULL with an exception thrown. */
static char *optional_string(napi_env env, napi_value value, int *failed) {
  napi_valuetype type;
  *failed = 0;
  if (napi_typeof(env, value, &type) != napi_ok) return (*failed = 1), NULL;
  if (type == napi_null || type == napi_undefined) return NULL;
  size_t length;
  if (napi_get_value_string_utf8(env, value, NULL, 0, &length) != napi_ok) return (*failed = 1), NULL;
  char *text = malloc(length + 1);
  if (!text || napi_get_value_string_utf8(env, value, text, length + 1, &length) != napi_ok) {
    free(text);
    *failed = 1;
    return NULL;
  }
  return text;
}

static napi_value context(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  if (get_args(env, info, 3, argv)) return NULL;
  bool verify, system_store;
  void *pem = NULL;
  size_t pem_len = 0;
  CHECK(napi_get_value_bool(env, argv[0], &verify));
  CHECK(napi_get_value_bool(env, argv[1], &system_store));
  if (verify && get_buffer(env, argv[2], &pem, &pem_len)) {
    napi_throw_type_error(env, NULL, "context: a Buffer of PEM certificates expected");
    return NULL;
  }
  const char *error = NULL;
  lp_ctx *ctx = lp_ctx_new(verify, system_store, pem, pem_len, &error);
  if (!ctx) return string(env, error);
  napi_value handle;
  if (napi_create_external(env, ctx, ctx_finalize, NULL, &handle) != napi_ok || napi_type_tag_object(env, handle, &CTX_TAG) != napi_ok) {
    lp_ctx_release(ctx);
    napi_throw_error(env, NULL, "context: napi_create_external failed");
    return NULL;
  }
  return handle;
}

static napi_value connect_conn(napi_env env, napi_callback_info info) {
  napi_value argv[7];
  if (get_args(env, info, 7, argv)) return NULL;
  void *ctx = NULL;
  int32_t fd;
  if (!tagged(env, argv[0], &CTX_TAG)) {
    napi_throw_type_error(env, NULL, "connect: a context expected");
    return NULL;
  }
  CHECK(napi_get_value_external(env, argv[0], &ctx));
  CHECK(napi_get_value_int32(env, argv[1], &fd));
  int failed_sni, failed_host;
  char *sni = optional_string(env, argv[2], &failed_sni);
  char *host = optional_string(env, argv[3], &failed_host);
  binding_t *b = calloc(1, sizeof *b);
  int copy = -1;
  const char *error = NULL;
  if (failed_sni || failed_host) error = "connect: server name and host must be strings or null";
  else if (!b) error = "out of memory";
  else if ((copy = fcntl(fd, F_DUPFD_CLOEXEC, 0)) < 0) error = "could not take the socket over (dup failed)";
  napi_value handle = NULL;
  if (!error) {
    b->env = env;
    if (napi_create_reference(env, argv[4], 1, &b->on_handshake) != napi_ok || napi_create_reference(env, argv[5], 1, &b->on_data) != napi_ok ||
        napi_create_reference(env, argv[6], 1, &b->on_end) != napi_ok || napi_create_external(env, b, conn_finalize, NULL, &handle) != napi_ok ||
        napi_type_tag_object(env, handle, &CONN_TAG) != napi_ok) {
      error = "connect: could not keep the callbacks";
    }
  }
  if (!error) {
    uv_loop_t *loop;
    if (napi_get_uv_event_loop(env, &loop) != napi_ok) error = "connect: no event loop";
    else b->conn = lp_conn_connect(loop, ctx, copy, sni, host, &callbacks, b, &error);
  }
  free(sni);
  free(host);
  if (error || !b->conn) {
    if (copy >= 0) close(copy);
    if (b) {
      delete_ref(env, &b->on_handshake);
      delete_ref(env, &b->on_data);
      delete_ref(env, &b->on_end);
      if (handle) b->conn = NULL; /* the finalizer frees it */
      else free(b);
    }
    return string(env, error ? error : "connect failed");
  }
  return handle;
}

static napi_value write_conn(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (get_args(env, info, 2, argv)) return NULL;
  binding_t *b = binding_of(env, argv[0]);
  void *data;
  size_t length;
  napi_value result;
  if (get_buffer(env, argv[1], &data, &length)) {
    napi_throw_type_error(env, NULL, "write: a Buffer expected");
    return NULL;
  }
  long queued = b && b->conn ? lp_conn_write(b->conn, data, length) : -1;
  napi_create_double(env, (double)queued, &result);
  return result;
}

static napi_value end_conn(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (get_args(env, info, 1, argv)) return NULL;
  binding_t *b = binding_of(env, argv[0]);
  if (b && b->conn) lp_conn_end(b->conn);
  return undefined(env);
}

static napi_value pause_conn(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (get_args(env, info, 2, argv)) return NULL;
  binding_t *b = binding_of(env, argv[0]);
  bool paused;
  CHECK(napi_get_value_bool(env, argv[1], &paused));
  if (b && b->conn) lp_conn_pause(b->conn, paused);
  return undefined(env);
}

static napi_value certificate(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (get_args(env, info, 1, argv)) return NULL;
  binding_t *b = binding_of(env, argv[0]);
  int n = b && b->conn ? lp_conn_certificate(b->conn, NULL, 0) : -1;
  if (n <= 0) return undefined(env);
  void *data;
  napi_value buffer;
  CHECK(napi_create_buffer(env, (size_t)n, &data, &buffer));
  if (lp_conn_certificate(b->conn, data, n) != n) return undefined(env);
  return buffer;
}

static napi_value info_conn(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (get_args(env, info, 1, argv)) return NULL;
  binding_t *b = binding_of(env, argv[0]);
  napi_value result, resumed;
  CHECK(napi_create_array_with_length(env, 3, &result));
  if (!b || !b->conn) return result;
  CHECK(napi_set_element(env, result, 0, string(env, lp_conn_version(b->conn))));
  CHECK(napi_set_element(env, result, 1, string(env, lp_conn_cipher(b->conn))));
  CHECK(napi_get_boolean(env, lp_conn_resumed(b->conn), &resumed));
  CHECK(napi_set_element(env, result, 2, resumed));
  return result;
}

static napi_value relay(napi_env env, napi_callback_info info) {
  napi_value argv[8];
  if (get_args(env, info, 8, argv)) return NULL;
  binding_t *b = binding_of(env, argv[0]);
  int32_t client_fd;
  void *to_client, *to_upstream;
  size_t to_client_len, to_upstream_len;
  napi_typedarray_type counters_type;
  size_t counters_len;
  void *counters;
  CHECK(napi_get_value_int32(env, argv[1], &client_fd));
  if (get_buffer(env, argv[2], &to_client, &to_client_len) || get_buffer(env, argv[3], &to_upstream, &to_upstream_len)) {
    napi_throw_type_error(env, NULL, "relay: buffers expected");
    return NULL;
  }
  CHECK(napi_get_typedarray_info(env, argv[4], &counters_type, &counters_len, &counters, NULL, NULL));
  if (counters_type != napi_float64_array || counters_len < 2) {
    napi_throw_type_error(env, NULL, "relay: counters must be a Float64Array(2)");
    return NULL;
  }
  if (!b || !b->conn) return string(env, "the upstream connection has ended");
  if (b->farewell) return string(env, "the upstream connection is relaying already");
  int copy = fcntl(client_fd, F_DUPFD_CLOEXEC, 0);
  if (copy < 0) return string(env, "could not take the client socket over (dup failed)");
  napi_valuetype detached_type;
  CHECK(napi_typeof(env, argv[7], &detached_type));
  int pooled = detached_type == napi_function;
  if (napi_create_reference(env, argv[4], 1, &b->counters) != napi_ok || napi_create_reference(env, argv[5], 1, &b->on_abandoned) != napi_ok ||
      napi_create_reference(env, argv[6], 1, &b->farewell) != napi_ok || (pooled && napi_create_reference(env, argv[7], 1, &b->on_detached) != napi_ok)) {
    close(copy);
    delete_relay_refs(env, b);
    return string(env, "relay: could not keep the callbacks");
  }
  const char *error = NULL;
  if (lp_conn_relay(b->conn, copy, to_client, to_client_len, to_upstream, to_upstream_len, counters, pooled, &error) != 0) {
    close(copy);
    delete_relay_refs(env, b);
    return string(env, error);
  }
  return undefined(env);
}

static enum lp_end end_named(const char *name) {
  for (int end = LP_END_CLIENT_CLOSED; end <= LP_END_IDLE; end++) {
    if (strcmp(name, LP_END_NAMES[end]) == 0) return (enum lp_end)end;
  }
  return LP_END_SHUTDOWN;
}

/* detach(conn, end) and close(conn, end): the same arguments, one of two endings. */
static napi_value end_with(napi_env env, napi_callback_info info, void (*how)(lp_conn *, enum lp_end)) {
  napi_value argv[2];
  if (get_args(env, info, 2, argv)) return NULL;
  binding_t *b = binding_of(env, argv[0]);
  char name[32];
  size_t len;
  CHECK(napi_get_value_string_utf8(env, argv[1], name, sizeof name, &len));
  if (b && b->conn) how(b->conn, end_named(name));
  return undefined(env);
}

static napi_value detach_conn(napi_env env, napi_callback_info info) { return end_with(env, info, lp_conn_detach); }

static napi_value close_conn(napi_env env, napi_callback_info info) { return end_with(env, info, lp_conn_close); }

static napi_value state(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (get_args(env, info, 1, argv)) return NULL;
  binding_t *b = binding_of(env, argv[0]);
  int running = 0;
  double idle = 0;
  if (b && b->conn) lp_conn_state(b->conn, &running, &idle);
  napi_value result, a, d;
  CHECK(napi_create_array_with_length(env, 2, &result));
  CHECK(napi_create_int32(env, running, &a));
  CHECK(napi_create_double(env, idle, &d));
  CHECK(napi_set_element(env, result, 0, a));
  CHECK(napi_set_element(env, result, 1, d));
  return result;
}

/* ---------- transaction-mode clients (txclient.h) ---------- */

typedef struct {
  napi_env env;
  lp_client *client; /* NULL once ended */
  int js_released;
  napi_ref self, counters; /* self: the JavaScript object the callbacks get first (clientCallbacks) */
} kbinding_t;

/*
 * The clients' callbacks, set once for all (clientCallbacks): each gets the client's own object
 * first. Five references and closures per client would cost more than the rest of an idle one.
 */
enum { K_DATA, K_NEED, K_BACK, K_END, K_REWRITE, K_CALLBACKS };
static napi_ref client_fns[K_CALLBACKS];

static napi_value call_js_now(napi_env env, napi_ref ref, size_t argc, napi_value *argv);

/* Calls client callback `which` with the client's object before `argv` (`now`: call_js_now). */
static napi_value call_client(kbinding_t *b, int which, size_t argc, napi_value *argv, int now) {
  napi_value all[9];
  if (argc + 1 > sizeof all / sizeof all[0] || !b->self || napi_get_reference_value(b->env, b->self, &all[0]) != napi_ok || !all[0]) return NULL;
  for (size_t i = 0; i < argc; i++) all[i + 1] = argv[i];
  return now ? call_js_now(b->env, client_fns[which], argc + 1, all) : call_js(b->env, client_fns[which], argc + 1, all);
}

/*
 * The totals arrays clients add to: one per target, shared by all its clients, so kept here once
 * (a reference per client would cost as much as the rest of an idle client's binding). Never
 * released: a target's array lives as long as the process's metrics do.
 */
#define TOTALS_KEPT 64
static struct {
  double *data;
  napi_ref ref;
} totals_kept[TOTALS_KEPT];

/* Keeps `value` (a Float64Array at `data`) alive for C; -1 when there are too many. */
static int keep_totals(napi_env env, napi_value value, double *data) {
  for (int i = 0; i < TOTALS_KEPT; i++) {
    if (totals_kept[i].data == data) return 0;
    if (totals_kept[i].data) continue;
    if (napi_create_reference(env, value, 1, &totals_kept[i].ref) != napi_ok) return -1;
    totals_kept[i].data = data;
    return 0;
  }
  return -1;
}

static void kbinding_release(kbinding_t *b) {
  if (b->client || !b->js_released) return;
  free(b);
}

static napi_value buffer_or_null(napi_env env, const unsigned char *data, size_t n) {
  napi_value value = NULL;
  if (data && n > 0) napi_create_buffer_copy(env, n, data, NULL, &value);
  else napi_get_null(env, &value);
  return value;
}

static void k_on_data(lp_client *k, void *user, const unsigned char *data, size_t n, const char *error) {
  (void)k;
  kbinding_t *b = user;
  napi_handle_scope scope;
  napi_open_handle_scope(b->env, &scope);
  napi_value argv[2];
  if (data) napi_create_buffer_copy(b->env, n, data, NULL, &argv[0]);
  else napi_get_null(b->env, &argv[0]);
  if (error) argv[1] = string(b->env, error);
  else napi_get_null(b->env, &argv[1]);
  call_client(b, K_DATA, 2, argv, 0);
  napi_close_handle_scope(b->env, scope);
}

static void k_on_need(lp_client *k, void *user, const unsigned char *unit, size_t n, double waited_ms) {
  (void)k;
  kbinding_t *b = user;
  napi_handle_scope scope;
  napi_open_handle_scope(b->env, &scope);
  napi_value argv[2] = { buffer_or_null(b->env, unit, n), NULL };
  napi_create_double(b->env, waited_ms, &argv[1]);
  call_client(b, K_NEED, 2, argv, 0);
  napi_close_handle_scope(b->env, scope);
}

static void k_on_back(lp_client *k, void *user, enum lp_back how, int status, int flags, int running, const unsigned char *reports, size_t reports_len,
                      const unsigned char *rest, size_t rest_len, const char *reason, int id) {
  (void)k;
  kbinding_t *b = user;
  napi_env env = b->env;
  napi_handle_scope scope;
  napi_open_handle_scope(env, &scope);
  napi_value argv[8];
  /* Numbers, not strings: this runs once a transaction. */
  napi_create_int32(env, (int32_t)how, &argv[0]);
  napi_create_int32(env, status, &argv[1]);
  napi_create_int32(env, flags, &argv[2]);
  napi_get_boolean(env, running, &argv[3]);
  argv[4] = buffer_or_null(env, reports, reports_len);
  argv[5] = buffer_or_null(env, rest, rest_len);
  if (reason) argv[6] = string(env, reason);
  else napi_get_null(env, &argv[6]);
  napi_create_int32(env, id, &argv[7]);
  call_client(b, K_BACK, 8, argv, 0);
  napi_close_handle_scope(env, scope);
}

static void k_on_end(lp_client *k, void *user) {
  (void)k;
  kbinding_t *b = user;
  napi_env env = b->env;
  b->client = NULL;
  napi_handle_scope scope;
  napi_open_handle_scope(env, &scope);
  call_client(b, K_END, 0, NULL, 0);
  napi_close_handle_scope(env, scope);
  delete_ref(env, &b->self);
  delete_ref(env, &b->counters);
  kbinding_release(b);
}

/* What JavaScript's last rewrite returned (one loop thread: valid until the next call). */
static buf_t rewritten;

static const unsigned char *k_on_rewrite(lp_client *k, void *user, const unsigned char *unit, size_t n, int id, size_t *out_n) {
  (void)k;
  kbinding_t *b = user;
  napi_env env = b->env;
  *out_n = 0;
  buf_free(&rewritten);
  napi_handle_scope scope;
  napi_open_handle_scope(env, &scope);
  napi_value argv[2] = { buffer_or_null(env, unit, n), NULL };
  napi_create_int32(env, id, &argv[1]);
  napi_value result = call_client(b, K_REWRITE, 2, argv, 1);
  void *data;
  size_t length;
  const unsigned char *out = NULL;
  if (result && get_buffer(env, result, &data, &length) == 0 && length > 0 && buf_append(&rewritten, data, length) == 0) {
    out = rewritten.data + rewritten.off;
    *out_n = length;
  }
  napi_close_handle_scope(env, scope);
  return out;
}

static const lp_client_callbacks client_callbacks = { k_on_data, k_on_need, k_on_back, k_on_end, k_on_rewrite };

static void client_finalize(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  kbinding_t *b = data;
  b->js_released = 1;
  kbinding_release(b);
}

/* The client behind a handle; NULL once it ended. */
static kbinding_t *kbinding_of(napi_env env, napi_value value) {
  void *data = NULL;
  if (!tagged(env, value, &CLIENT_TAG) || napi_get_value_external(env, value, &data) != napi_ok) return NULL;
  return data;
}

/* A Float64Array of at least `want` elements, or NULL with a TypeError thrown naming `what`. */
static double *float64s(napi_env env, napi_value value, size_t want, size_t *length, const char *what) {
  bool is_typed = false;
  napi_typedarray_type type;
  size_t n = 0;
  void *data = NULL;
  if (napi_is_typedarray(env, value, &is_typed) != napi_ok || !is_typed || napi_get_typedarray_info(env, value, &type, &n, &data, NULL, NULL) != napi_ok ||
      type != napi_float64_array || n < want || !data) {
    napi_throw_type_error(env, NULL, what);
    return NULL;
  }
  if (length) *length = n;
  return data;
}

static napi_value open_client(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  if (get_args(env, info, 4, argv)) return NULL;
  int32_t fd;
  CHECK(napi_get_value_int32(env, argv[0], &fd));
  double *counters = float64s(env, argv[1], 2, NULL, "client: counters must be a Float64Array(2)");
  double *totals = counters ? float64s(env, argv[2], 2, NULL, "client: totals must be a Float64Array(2)") : NULL;
  if (!totals) return NULL;
  for (int i = 0; i < K_CALLBACKS; i++) {
    if (!client_fns[i]) {
      napi_throw_error(env, NULL, "client: clientCallbacks first");
      return NULL;
    }
  }
  kbinding_t *b = calloc(1, sizeof *b);
  if (!b) return string(env, "out of memory");
  b->env = env;
  napi_value handle = NULL;
  const char *error = NULL;
  int copy = -1;
  if (napi_create_reference(env, argv[1], 1, &b->counters) != napi_ok || keep_totals(env, argv[2], totals) != 0 ||
      napi_create_reference(env, argv[3], 1, &b->self) != napi_ok || napi_create_external(env, b, client_finalize, NULL, &handle) != napi_ok ||
      napi_type_tag_object(env, handle, &CLIENT_TAG) != napi_ok) {
    error = "client: could not keep the callbacks";
  } else if ((copy = fcntl(fd, F_DUPFD_CLOEXEC, 0)) < 0) {
    error = "could not take the client socket over (dup failed)";
  } else {
    uv_loop_t *loop;
    if (napi_get_uv_event_loop(env, &loop) != napi_ok) error = "client: no event loop";
    else b->client = lp_client_open(loop, copy, &client_callbacks, b, counters, totals, &error);
  }
  if (!b->client) {
    if (copy >= 0) close(copy);
    delete_ref(env, &b->self);
    delete_ref(env, &b->counters);
    if (!handle) free(b); /* else the finalizer frees it */
    return string(env, error ? error : "client: could not open");
  }
  return handle;
}

static napi_value client_callbacks_set(napi_env env, napi_callback_info info) {
  napi_value argv[K_CALLBACKS];
  if (get_args(env, info, K_CALLBACKS, argv)) return NULL;
  for (int i = 0; i < K_CALLBACKS; i++) {
    delete_ref(env, &client_fns[i]);
    CHECK(napi_create_reference(env, argv[i], 1, &client_fns[i]));
  }
  return undefined(env);
}

static napi_value client_write(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (get_args(env, info, 2, argv)) return NULL;
  kbinding_t *b = kbinding_of(env, argv[0]);
  void *data;
  size_t length;
  if (get_buffer(env, argv[1], &data, &length)) {
    napi_throw_type_error(env, NULL, "clientWrite: a Buffer expected");
    return NULL;
  }
  napi_value result;
  CHECK(napi_create_double(env, b && b->client ? (double)lp_client_write(b->client, data, length) : -1, &result));
  return result;
}

static napi_value client_end(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (get_args(env, info, 1, argv)) return NULL;
  kbinding_t *b = kbinding_of(env, argv[0]);
  if (b && b->client) lp_client_end(b->client);
  return undefined(env);
}

static napi_value client_close(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (get_args(env, info, 1, argv)) return NULL;
  kbinding_t *b = kbinding_of(env, argv[0]);
  if (b && b->client) lp_client_close(b->client);
  return undefined(env);
}

static napi_value client_pause(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (get_args(env, info, 2, argv)) return NULL;
  kbinding_t *b = kbinding_of(env, argv[0]);
  bool paused;
  CHECK(napi_get_value_bool(env, argv[1], &paused));
  if (b && b->client) lp_client_pause(b->client, paused);
  return undefined(env);
}

static napi_value client_fast(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (get_args(env, info, 2, argv)) return NULL;
  kbinding_t *b = kbinding_of(env, argv[0]);
  void *data;
  size_t length;
  if (get_buffer(env, argv[1], &data, &length)) {
    napi_throw_type_error(env, NULL, "clientFast: a Buffer expected");
    return NULL;
  }
  napi_value result;
  CHECK(napi_get_boolean(env, b && b->client && lp_client_fast(b->client, data, length) == 0, &result));
  return result;
}

static napi_value client_attach(napi_env env, napi_callback_info info) {
  napi_value argv[8];
  if (get_args(env, info, 8, argv)) return NULL;
  kbinding_t *k = kbinding_of(env, argv[0]);
  binding_t *c = binding_of(env, argv[1]);
  void *data, *settings, *unit;
  size_t length, settings_len, unit_len;
  if (get_buffer(env, argv[2], &data, &length) || get_buffer(env, argv[3], &settings, &settings_len) || get_buffer(env, argv[4], &unit, &unit_len)) {
    napi_throw_type_error(env, NULL, "clientAttach: Buffers expected");
    return NULL;
  }
  lp_desk_join join;
  CHECK(napi_get_value_int32(env, argv[5], &join.id));
  CHECK(napi_get_value_int32(env, argv[6], &join.sid));
  CHECK(napi_get_value_double(env, argv[7], &join.expires_in_ms));
  if (!k || !k->client) return string(env, "the client has ended");
  if (!c || !c->conn) return string(env, "the upstream connection has ended");
  if (c->farewell) return string(env, "the upstream connection is relaying");
  int joined = lp_client_attach(k->client, c->conn, data, length, settings, settings_len, unit, unit_len, &join);
  if (joined < 0) return string(env, "the client waits for no connection, or the connection cannot be lent");
  napi_value result;
  CHECK(napi_get_boolean(env, joined == 1, &result));
  return result;
}

static napi_value client_js(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (get_args(env, info, 1, argv)) return NULL;
  kbinding_t *b = kbinding_of(env, argv[0]);
  size_t n = 0;
  const unsigned char *rest = b && b->client ? lp_client_js(b->client, &n) : NULL;
  napi_value result;
  CHECK(napi_create_buffer_copy(env, n, n ? rest : (const unsigned char *)"", NULL, &result));
  return result;
}

static napi_value client_state(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (get_args(env, info, 1, argv)) return NULL;
  kbinding_t *b = kbinding_of(env, argv[0]);
  int lent = 0, running = 0, desk_id = 0;
  double idle = 0;
  if (b && b->client) lp_client_state(b->client, &lent, &running, &idle, &desk_id);
  napi_value result, v;
  CHECK(napi_create_array_with_length(env, 4, &result));
  CHECK(napi_create_int32(env, lent, &v));
  CHECK(napi_set_element(env, result, 0, v));
  CHECK(napi_create_int32(env, running, &v));
  CHECK(napi_set_element(env, result, 1, v));
  CHECK(napi_create_double(env, idle, &v));
  CHECK(napi_set_element(env, result, 2, v));
  CHECK(napi_create_int32(env, desk_id, &v));
  CHECK(napi_set_element(env, result, 3, v));
  return result;
}

/* ---------- desks (txclient.h) ---------- */

typedef struct {
  napi_env env;
  lp_desk *desk; /* NULL once closed by the caller (C frees it later) */
  int ended, js_released;
  napi_ref on_out, on_full, counts, waits;
  /* Session mode (deskSessions): the relays' byte counters and the callbacks. */
  napi_ref session_counters, on_session, on_farewell, on_reset;
  double *counters;
} dbinding_t;

static void dbinding_release(dbinding_t *b) {
  if (!b->ended || !b->js_released) return;
  free(b);
}

static void d_on_out(lp_desk *d, void *user, int id, enum lp_desk_out why) {
  (void)d;
  dbinding_t *b = user;
  if (b->js_released) return; /* closed by the finalizer: no JavaScript then */
  napi_handle_scope scope;
  napi_open_handle_scope(b->env, &scope);
  napi_value argv[2];
  napi_create_int32(b->env, id, &argv[0]);
  napi_create_int32(b->env, (int32_t)why, &argv[1]);
  call_js(b->env, b->on_out, 2, argv);
  napi_close_handle_scope(b->env, scope);
}

static void d_on_full(lp_desk *d, void *user) {
  (void)d;
  dbinding_t *b = user;
  if (b->js_released) return;
  napi_handle_scope scope;
  napi_open_handle_scope(b->env, &scope);
  call_js(b->env, b->on_full, 0, NULL);
  napi_close_handle_scope(b->env, scope);
}

static void d_on_end(lp_desk *d, void *user) {
  (void)d;
  dbinding_t *b = user;
  b->ended = 1;
  b->desk = NULL;
  delete_ref(b->env, &b->on_out);
  delete_ref(b->env, &b->on_full);
  delete_ref(b->env, &b->counts);
  delete_ref(b->env, &b->waits);
  delete_ref(b->env, &b->session_counters);
  delete_ref(b->env, &b->on_session);
  delete_ref(b->env, &b->on_farewell);
  delete_ref(b->env, &b->on_reset);
  b->counters = NULL;
  dbinding_release(b);
}

static void d_on_session(lp_desk *d, void *user, int id, enum lp_session how, enum lp_end end, double to_upstream, double to_client, int reusable, int status,
                         int abandoned) {
  (void)d;
  dbinding_t *b = user;
  if (b->js_released) return;
  napi_env env = b->env;
  napi_handle_scope scope;
  napi_open_handle_scope(env, &scope);
  napi_value argv[8];
  napi_create_int32(env, id, &argv[0]);
  napi_create_int32(env, (int32_t)how, &argv[1]);
  argv[2] = string(env, LP_END_NAMES[end]);
  napi_create_double(env, to_upstream, &argv[3]);
  napi_create_double(env, to_client, &argv[4]);
  napi_get_boolean(env, reusable, &argv[5]);
  char letter[2] = { status > 0 && status < 128 ? (char)status : '?', 0 };
  argv[6] = string(env, letter);
  napi_get_boolean(env, abandoned, &argv[7]);
  call_js(env, b->on_session, 8, argv);
  napi_close_handle_scope(env, scope);
}

static size_t d_on_farewell(lp_desk *d, void *user, int id, const char *reason, unsigned char *out, size_t cap) {
  (void)d;
  dbinding_t *b = user;
  if (b->js_released) return 0;
  size_t written = 0;
  napi_handle_scope scope;
  napi_open_handle_scope(b->env, &scope);
  napi_value argv[2];
  napi_create_int32(b->env, id, &argv[0]);
  if (reason) argv[1] = string(b->env, reason);
  else napi_get_null(b->env, &argv[1]);
  napi_value result = call_js_now(b->env, b->on_farewell, 2, argv);
  void *data;
  size_t length;
  if (result && get_buffer(b->env, result, &data, &length) == 0 && length <= cap) {
    memcpy(out, data, length);
    written = length;
  }
  napi_close_handle_scope(b->env, scope);
  return written;
}

static void d_on_reset(lp_desk *d, void *user, int id, const unsigned char *answer, size_t n) {
  (void)d;
  dbinding_t *b = user;
  if (b->js_released) return;
  napi_handle_scope scope;
  napi_open_handle_scope(b->env, &scope);
  napi_value argv[2];
  napi_create_int32(b->env, id, &argv[0]);
  if (answer) napi_create_buffer_copy(b->env, n, answer, NULL, &argv[1]);
  else napi_get_null(b->env, &argv[1]);
  call_js(b->env, b->on_reset, 2, argv);
  napi_close_handle_scope(b->env, scope);
}

static const lp_desk_callbacks desk_callbacks = { d_on_out, d_on_full, d_on_end, d_on_session, d_on_farewell, d_on_reset };

static void desk_finalize(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  dbinding_t *b = data;
  b->js_released = 1;
  /* Dropped without deskClose: closed now (freed once no client or connection refers to it). No
     client refers to it then (each one's callbacks keep its pool, and so this handle, alive), and
     the callbacks above stay quiet: a finalizer may not run JavaScript. */
  if (b->desk) {
    lp_desk *d = b->desk;
    b->desk = NULL;
    lp_desk_close(d);
  }
  dbinding_release(b);
}

/* The desk behind a handle; NULL once closed. */
static lp_desk *desk_of(napi_env env, napi_value value) {
  void *data = NULL;
  if (!tagged(env, value, &DESK_TAG) || napi_get_value_external(env, value, &data) != napi_ok) return NULL;
  return ((dbinding_t *)data)->desk;
}

static napi_value open_desk(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  if (get_args(env, info, 4, argv)) return NULL;
  size_t waits_cap = 0;
  double *counts = float64s(env, argv[0], 2, NULL, "desk: counts must be a Float64Array(2)");
  double *waits = counts ? float64s(env, argv[1], 1, &waits_cap, "desk: waits must be a Float64Array") : NULL;
  if (!waits) return NULL;
  dbinding_t *b = calloc(1, sizeof *b);
  if (!b) return string(env, "out of memory");
  b->env = env;
  uv_loop_t *loop;
  napi_value handle = NULL;
  if (napi_create_reference(env, argv[0], 1, &b->counts) != napi_ok || napi_create_reference(env, argv[1], 1, &b->waits) != napi_ok ||
      napi_create_reference(env, argv[2], 1, &b->on_out) != napi_ok || napi_create_reference(env, argv[3], 1, &b->on_full) != napi_ok ||
      napi_get_uv_event_loop(env, &loop) != napi_ok || !(b->desk = lp_desk_open(loop, &desk_callbacks, b, counts, waits, waits_cap))) {
    delete_ref(env, &b->on_out);
    delete_ref(env, &b->on_full);
    delete_ref(env, &b->counts);
    delete_ref(env, &b->waits);
    free(b);
    return string(env, "desk: could not open");
  }
  if (napi_create_external(env, b, desk_finalize, NULL, &handle) != napi_ok || napi_type_tag_object(env, handle, &DESK_TAG) != napi_ok) {
    if (!handle) {
      b->js_released = 1;
      lp_desk_close(b->desk); /* frees it at once (nothing refers to it): d_on_end frees b */
    }
    return string(env, "desk: could not make its handle");
  }
  return handle;
}

static napi_value desk_set(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  if (get_args(env, info, 3, argv)) return NULL;
  lp_desk *d = desk_of(env, argv[0]);
  bool room, js_waiting;
  CHECK(napi_get_value_bool(env, argv[1], &room));
  CHECK(napi_get_value_bool(env, argv[2], &js_waiting));
  if (d) lp_desk_set(d, room, js_waiting);
  return undefined(env);
}

static napi_value desk_config(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  if (get_args(env, info, 3, argv)) return NULL;
  lp_desk *d = desk_of(env, argv[0]);
  double wait_timeout, check_delay;
  CHECK(napi_get_value_double(env, argv[1], &wait_timeout));
  CHECK(napi_get_value_double(env, argv[2], &check_delay));
  if (d) lp_desk_config(d, wait_timeout, check_delay);
  return undefined(env);
}

static napi_value desk_stop(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (get_args(env, info, 2, argv)) return NULL;
  lp_desk *d = desk_of(env, argv[0]);
  bool stopped;
  CHECK(napi_get_value_bool(env, argv[1], &stopped));
  if (d) lp_desk_stop(d, stopped);
  return undefined(env);
}

static napi_value desk_close(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (get_args(env, info, 1, argv)) return NULL;
  void *data = NULL;
  if (tagged(env, argv[0], &DESK_TAG) && napi_get_value_external(env, argv[0], &data) == napi_ok && ((dbinding_t *)data)->desk) {
    dbinding_t *b = data;
    lp_desk *d = b->desk;
    b->desk = NULL; /* the handle is done with; C frees the desk once nothing refers to it */
    lp_desk_close(d);
  }
  return undefined(env);
}

/* deskOffer and deskPark: (desk, conn, id, sid, expiresInMs) -> whether the connection joined the desk. */
static napi_value desk_join(napi_env env, napi_callback_info info, int (*how)(lp_desk *, lp_conn *, const lp_desk_join *)) {
  napi_value argv[5];
  if (get_args(env, info, 5, argv)) return NULL;
  lp_desk *d = desk_of(env, argv[0]);
  binding_t *c = binding_of(env, argv[1]);
  lp_desk_join join;
  CHECK(napi_get_value_int32(env, argv[2], &join.id));
  CHECK(napi_get_value_int32(env, argv[3], &join.sid));
  CHECK(napi_get_value_double(env, argv[4], &join.expires_in_ms));
  napi_value result;
  CHECK(napi_get_boolean(env, d && c && c->conn && !c->farewell && how(d, c->conn, &join) == 1, &result));
  return result;
}

static napi_value desk_offer(napi_env env, napi_callback_info info) { return desk_join(env, info, lp_desk_offer); }

static napi_value desk_wake(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (get_args(env, info, 1, argv)) return NULL;
  lp_desk *d = desk_of(env, argv[0]);
  napi_value result;
  CHECK(napi_get_boolean(env, d && lp_desk_wake(d), &result));
  return result;
}

static napi_value desk_reclaim(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (get_args(env, info, 2, argv)) return NULL;
  lp_desk *d = desk_of(env, argv[0]);
  int32_t id;
  CHECK(napi_get_value_int32(env, argv[1], &id));
  napi_value result;
  CHECK(napi_get_boolean(env, d && lp_desk_reclaim(d, id), &result));
  return result;
}

static napi_value desk_reclaim_any(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (get_args(env, info, 1, argv)) return NULL;
  lp_desk *d = desk_of(env, argv[0]);
  double idle = 0;
  int id = d ? lp_desk_reclaim_any(d, &idle) : 0;
  napi_value result, v;
  CHECK(napi_create_array_with_length(env, 2, &result));
  CHECK(napi_create_int32(env, id, &v));
  CHECK(napi_set_element(env, result, 0, v));
  CHECK(napi_create_double(env, idle, &v));
  CHECK(napi_set_element(env, result, 1, v));
  return result;
}

static napi_value desk_idle_ms(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (get_args(env, info, 2, argv)) return NULL;
  lp_desk *d = desk_of(env, argv[0]);
  int32_t id;
  CHECK(napi_get_value_int32(env, argv[1], &id));
  napi_value result;
  CHECK(napi_create_double(env, d ? lp_desk_idle_ms(d, id) : -1, &result));
  return result;
}

static napi_value desk_stats(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (get_args(env, info, 1, argv)) return NULL;
  lp_desk *d = desk_of(env, argv[0]);
  int idle = 0, count = 0, waiting = 0, resetting = 0;
  double max_wait = 0;
  if (d) lp_desk_stats(d, &idle, &count, &waiting, &max_wait, &resetting);
  napi_value result, v;
  CHECK(napi_create_array_with_length(env, 5, &result));
  CHECK(napi_create_int32(env, resetting, &v));
  CHECK(napi_set_element(env, result, 4, v));
  CHECK(napi_create_int32(env, idle, &v));
  CHECK(napi_set_element(env, result, 0, v));
  CHECK(napi_create_int32(env, count, &v));
  CHECK(napi_set_element(env, result, 1, v));
  CHECK(napi_create_int32(env, waiting, &v));
  CHECK(napi_set_element(env, result, 2, v));
  CHECK(napi_create_double(env, max_wait, &v));
  CHECK(napi_set_element(env, result, 3, v));
  return result;
}

/* Session mode: the desk's binding when it is open and set up for sessions (deskSessions); NULL otherwise. */
static dbinding_t *sessions_of(napi_env env, napi_value value) {
  void *data = NULL;
  if (!tagged(env, value, &DESK_TAG) || napi_get_value_external(env, value, &data) != napi_ok) return NULL;
  dbinding_t *b = data;
  return b->desk && b->counters ? b : NULL;
}

static napi_value desk_sessions(napi_env env, napi_callback_info info) {
  napi_value argv[6];
  if (get_args(env, info, 6, argv)) return NULL;
  void *data = NULL;
  if (!tagged(env, argv[0], &DESK_TAG) || napi_get_value_external(env, argv[0], &data) != napi_ok || !((dbinding_t *)data)->desk) return undefined(env);
  dbinding_t *b = data;
  double *counters = float64s(env, argv[1], 2, NULL, "deskSessions: counters must be a Float64Array(2)");
  void *reset;
  size_t reset_len;
  if (!counters) return NULL;
  if (get_buffer(env, argv[2], &reset, &reset_len)) {
    napi_throw_type_error(env, NULL, "deskSessions: the reset query must be a Buffer");
    return NULL;
  }
  if (b->counters) return string(env, "deskSessions: set already");
  if (lp_desk_reset_query(b->desk, reset, reset_len) != 0) return string(env, "out of memory");
  if (napi_create_reference(env, argv[1], 1, &b->session_counters) != napi_ok || napi_create_reference(env, argv[3], 1, &b->on_session) != napi_ok ||
      napi_create_reference(env, argv[4], 1, &b->on_farewell) != napi_ok || napi_create_reference(env, argv[5], 1, &b->on_reset) != napi_ok) {
    delete_ref(env, &b->session_counters);
    delete_ref(env, &b->on_session);
    delete_ref(env, &b->on_farewell);
    delete_ref(env, &b->on_reset);
    return string(env, "deskSessions: could not keep the callbacks");
  }
  b->counters = counters;
  return undefined(env);
}

static napi_value desk_reset_query(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (get_args(env, info, 2, argv)) return NULL;
  dbinding_t *b = sessions_of(env, argv[0]);
  void *reset;
  size_t reset_len;
  if (get_buffer(env, argv[1], &reset, &reset_len)) {
    napi_throw_type_error(env, NULL, "deskResetQuery: a Buffer expected");
    return NULL;
  }
  if (b && lp_desk_reset_query(b->desk, reset, reset_len) != 0) return string(env, "out of memory");
  return undefined(env);
}

static napi_value desk_park(napi_env env, napi_callback_info info) { return desk_join(env, info, lp_desk_park); }

static napi_value desk_take(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (get_args(env, info, 2, argv)) return NULL;
  dbinding_t *b = sessions_of(env, argv[0]);
  int32_t sid;
  CHECK(napi_get_value_int32(env, argv[1], &sid));
  napi_value result;
  CHECK(napi_create_int32(env, b ? lp_desk_take(b->desk, sid) : 0, &result));
  return result;
}

/* deskUntake and deskHold: (desk, id) -> undefined. */
static napi_value desk_session_call(napi_env env, napi_callback_info info, void (*how)(lp_desk *, int)) {
  napi_value argv[2];
  if (get_args(env, info, 2, argv)) return NULL;
  dbinding_t *b = sessions_of(env, argv[0]);
  int32_t id;
  CHECK(napi_get_value_int32(env, argv[1], &id));
  if (b) how(b->desk, id);
  return undefined(env);
}

static napi_value desk_untake(napi_env env, napi_callback_info info) { return desk_session_call(env, info, lp_desk_untake); }

static napi_value desk_relay(napi_env env, napi_callback_info info) {
  napi_value argv[6];
  if (get_args(env, info, 6, argv)) return NULL;
  dbinding_t *b = sessions_of(env, argv[0]);
  int32_t id, client_fd;
  void *hello, *first;
  size_t hello_len, first_len;
  CHECK(napi_get_value_int32(env, argv[1], &id));
  CHECK(napi_get_value_int32(env, argv[2], &client_fd));
  if (get_buffer(env, argv[3], &hello, &hello_len) || get_buffer(env, argv[4], &first, &first_len)) {
    napi_throw_type_error(env, NULL, "deskRelay: buffers expected");
    return NULL;
  }
  bool own;
  CHECK(napi_get_value_bool(env, argv[5], &own));
  if (!b) return string(env, "the desk is closed");
  int copy = own ? client_fd : fcntl(client_fd, F_DUPFD_CLOEXEC, 0);
  if (copy < 0) return string(env, "could not take the client socket over (dup failed)");
  const char *error = NULL;
  if (lp_desk_relay(b->desk, id, copy, hello, hello_len, first, first_len, b->counters, &error) != 0) {
    if (!own) close(copy);
    return string(env, error);
  }
  return undefined(env);
}

static napi_value desk_sweep(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (get_args(env, info, 2, argv)) return NULL;
  dbinding_t *b = sessions_of(env, argv[0]);
  double timeout;
  CHECK(napi_get_value_double(env, argv[1], &timeout));
  if (b) lp_desk_sweep(b->desk, timeout);
  return undefined(env);
}

static napi_value desk_hold(napi_env env, napi_callback_info info) { return desk_session_call(env, info, lp_desk_hold); }

static napi_value client_hold(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (get_args(env, info, 1, argv)) return NULL;
  kbinding_t *k = kbinding_of(env, argv[0]);
  if (k && k->client) lp_client_hold(k->client);
  return undefined(env);
}

static napi_value client_desk(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  if (get_args(env, info, 3, argv)) return NULL;
  kbinding_t *k = kbinding_of(env, argv[0]);
  napi_valuetype type;
  CHECK(napi_typeof(env, argv[1], &type));
  lp_desk *d = type == napi_null ? NULL : desk_of(env, argv[1]);
  int32_t sid;
  CHECK(napi_get_value_int32(env, argv[2], &sid));
  if (k && k->client) lp_client_desk(k->client, d, sid);
  return undefined(env);
}

static napi_value text_plain(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (get_args(env, info, 1, argv)) return NULL;
  void *data;
  size_t length;
  if (get_buffer(env, argv[0], &data, &length)) {
    napi_throw_type_error(env, NULL, "textPlain: a Buffer expected");
    return NULL;
  }
  napi_value result;
  CHECK(napi_get_boolean(env, lp_text_plain(data, length), &result));
  return result;
}

/* ---------- the listener (listener.h) ---------- */

typedef struct {
  napi_env env;
  lp_listener *l; /* NULL once closed */
  napi_ref on_arrival;
} lbinding_t;

/* `sa`'s address as text into `address` (empty for AF_UNIX) and its port. */
static int address_of(const struct sockaddr *sa, char address[INET6_ADDRSTRLEN]) {
  address[0] = 0;
  if (sa->sa_family == AF_INET) {
    const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
    inet_ntop(AF_INET, &in->sin_addr, address, INET6_ADDRSTRLEN);
    return ntohs(in->sin_port);
  }
  if (sa->sa_family == AF_INET6) {
    const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
    inet_ntop(AF_INET6, &in6->sin6_addr, address, INET6_ADDRSTRLEN);
    return ntohs(in6->sin6_port);
  }
  return 0;
}

static void l_on_arrival(lp_listener *l, void *user, enum lp_arrival kind, int fd, const unsigned char *data, size_t n, const struct sockaddr *peer) {
  (void)l;
  lbinding_t *b = user;
  napi_env env = b->env;
  char address[INET6_ADDRSTRLEN], local[INET6_ADDRSTRLEN] = "";
  int port = address_of(peer, address), local_port = 0;
  /* The address the client reached (SHOW CLIENTS' local_addr), for a client Node.js never has a socket of. */
  struct sockaddr_storage own;
  socklen_t own_len = sizeof own;
  if (kind == LP_ARRIVED_STARTUP && getsockname(fd, (struct sockaddr *)&own, &own_len) == 0) local_port = address_of((struct sockaddr *)&own, local);
  napi_handle_scope scope;
  napi_open_handle_scope(env, &scope);
  napi_value argv[7];
  napi_create_int32(env, kind, &argv[0]);
  napi_create_int32(env, fd, &argv[1]);
  argv[2] = buffer_or_null(env, data, n);
  if (address[0]) argv[3] = string(env, address);
  else napi_get_null(env, &argv[3]);
  napi_create_int32(env, port, &argv[4]);
  if (local[0]) argv[5] = string(env, local);
  else napi_get_null(env, &argv[5]);
  napi_create_int32(env, local_port, &argv[6]);
  call_js(env, b->on_arrival, 7, argv);
  napi_close_handle_scope(env, scope);
}

static void listener_shut(napi_env env, lbinding_t *b) {
  if (!b->l) return;
  lp_listener_close(b->l); /* no callback after this */
  b->l = NULL;
  delete_ref(env, &b->on_arrival);
}

static void listener_finalize(napi_env env, void *data, void *hint) {
  (void)hint;
  lbinding_t *b = data;
  listener_shut(env, b);
  free(b);
}

static lbinding_t *listener_of(napi_env env, napi_value value) {
  void *data = NULL;
  if (!tagged(env, value, &LISTENER_TAG) || napi_get_value_external(env, value, &data) != napi_ok) return NULL;
  return data;
}

static napi_value listen_open(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (get_args(env, info, 2, argv)) return NULL;
  int32_t fd;
  CHECK(napi_get_value_int32(env, argv[0], &fd));
  uv_loop_t *loop;
  CHECK(napi_get_uv_event_loop(env, &loop));
  lbinding_t *b = calloc(1, sizeof *b);
  if (!b) return string(env, "out of memory");
  b->env = env;
  int copy = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (copy < 0) {
    free(b);
    return string(env, "could not take the listening socket over (dup failed)");
  }
  const char *error = "could not listen";
  if (napi_create_reference(env, argv[1], 1, &b->on_arrival) != napi_ok || !(b->l = lp_listener_open(loop, copy, l_on_arrival, b, &error))) {
    close(copy);
    delete_ref(env, &b->on_arrival);
    free(b);
    return string(env, error);
  }
  napi_value handle = NULL;
  if (napi_create_external(env, b, listener_finalize, NULL, &handle) != napi_ok || napi_type_tag_object(env, handle, &LISTENER_TAG) != napi_ok) {
    if (!handle) listener_finalize(env, b, NULL);
    return string(env, "listen: could not make its handle");
  }
  return handle;
}

static napi_value listen_config(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  if (get_args(env, info, 4, argv)) return NULL;
  lbinding_t *b = listener_of(env, argv[0]);
  bool negotiate;
  int32_t max_pending;
  double timeout;
  CHECK(napi_get_value_bool(env, argv[1], &negotiate));
  CHECK(napi_get_value_int32(env, argv[2], &max_pending));
  CHECK(napi_get_value_double(env, argv[3], &timeout));
  if (b && b->l) lp_listener_config(b->l, negotiate, max_pending, timeout);
  return undefined(env);
}

static napi_value listen_pending(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (get_args(env, info, 1, argv)) return NULL;
  lbinding_t *b = listener_of(env, argv[0]);
  napi_value result;
  CHECK(napi_create_int32(env, b && b->l ? lp_listener_pending(b->l) : 0, &result));
  return result;
}

static napi_value listen_outside(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (get_args(env, info, 2, argv)) return NULL;
  lbinding_t *b = listener_of(env, argv[0]);
  int32_t n;
  CHECK(napi_get_value_int32(env, argv[1], &n));
  if (b && b->l) lp_listener_outside(b->l, n);
  return undefined(env);
}

static napi_value listen_hand_over(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (get_args(env, info, 1, argv)) return NULL;
  lbinding_t *b = listener_of(env, argv[0]);
  if (b && b->l) lp_listener_hand_over(b->l); /* calls onArrival for each, from here */
  return undefined(env);
}

static napi_value listen_close(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (get_args(env, info, 1, argv)) return NULL;
  lbinding_t *b = listener_of(env, argv[0]);
  if (b) listener_shut(env, b);
  return undefined(env);
}

static napi_value init(napi_env env, napi_value exports) {
  CHECK(napi_async_init(env, NULL, string(env, "lakebase-proxy relay"), &async_context));
  napi_property_descriptor methods[] = {
    { "context", NULL, context, NULL, NULL, NULL, napi_default, NULL },
    { "connect", NULL, connect_conn, NULL, NULL, NULL, napi_default, NULL },
    { "write", NULL, write_conn, NULL, NULL, NULL, napi_default, NULL },
    { "pause", NULL, pause_conn, NULL, NULL, NULL, napi_default, NULL },
    { "end", NULL, end_conn, NULL, NULL, NULL, napi_default, NULL },
    { "certificate", NULL, certificate, NULL, NULL, NULL, napi_default, NULL },
    { "info", NULL, info_conn, NULL, NULL, NULL, napi_default, NULL },
    { "relay", NULL, relay, NULL, NULL, NULL, napi_default, NULL },
    { "detach", NULL, detach_conn, NULL, NULL, NULL, napi_default, NULL },
    { "close", NULL, close_conn, NULL, NULL, NULL, napi_default, NULL },
    { "state", NULL, state, NULL, NULL, NULL, napi_default, NULL },
    { "client", NULL, open_client, NULL, NULL, NULL, napi_default, NULL },
    { "clientCallbacks", NULL, client_callbacks_set, NULL, NULL, NULL, napi_default, NULL },
    { "clientWrite", NULL, client_write, NULL, NULL, NULL, napi_default, NULL },
    { "clientEnd", NULL, client_end, NULL, NULL, NULL, napi_default, NULL },
    { "clientClose", NULL, client_close, NULL, NULL, NULL, napi_default, NULL },
    { "clientPause", NULL, client_pause, NULL, NULL, NULL, napi_default, NULL },
    { "clientFast", NULL, client_fast, NULL, NULL, NULL, napi_default, NULL },
    { "clientAttach", NULL, client_attach, NULL, NULL, NULL, napi_default, NULL },
    { "clientJs", NULL, client_js, NULL, NULL, NULL, napi_default, NULL },
    { "clientState", NULL, client_state, NULL, NULL, NULL, napi_default, NULL },
    { "clientDesk", NULL, client_desk, NULL, NULL, NULL, napi_default, NULL },
    { "clientHold", NULL, client_hold, NULL, NULL, NULL, napi_default, NULL },
    { "desk", NULL, open_desk, NULL, NULL, NULL, napi_default, NULL },
    { "deskSet", NULL, desk_set, NULL, NULL, NULL, napi_default, NULL },
    { "deskConfig", NULL, desk_config, NULL, NULL, NULL, napi_default, NULL },
    { "deskStop", NULL, desk_stop, NULL, NULL, NULL, napi_default, NULL },
    { "deskClose", NULL, desk_close, NULL, NULL, NULL, napi_default, NULL },
    { "deskOffer", NULL, desk_offer, NULL, NULL, NULL, napi_default, NULL },
    { "deskWake", NULL, desk_wake, NULL, NULL, NULL, napi_default, NULL },
    { "deskReclaim", NULL, desk_reclaim, NULL, NULL, NULL, napi_default, NULL },
    { "deskIdleMs", NULL, desk_idle_ms, NULL, NULL, NULL, napi_default, NULL },
    { "deskReclaimAny", NULL, desk_reclaim_any, NULL, NULL, NULL, napi_default, NULL },
    { "deskStats", NULL, desk_stats, NULL, NULL, NULL, napi_default, NULL },
    { "deskSessions", NULL, desk_sessions, NULL, NULL, NULL, napi_default, NULL },
    { "deskResetQuery", NULL, desk_reset_query, NULL, NULL, NULL, napi_default, NULL },
    { "deskPark", NULL, desk_park, NULL, NULL, NULL, napi_default, NULL },
    { "deskTake", NULL, desk_take, NULL, NULL, NULL, napi_default, NULL },
    { "deskUntake", NULL, desk_untake, NULL, NULL, NULL, napi_default, NULL },
    { "deskRelay", NULL, desk_relay, NULL, NULL, NULL, napi_default, NULL },
    { "deskSweep", NULL, desk_sweep, NULL, NULL, NULL, napi_default, NULL },
    { "deskHold", NULL, desk_hold, NULL, NULL, NULL, napi_default, NULL },
    { "textPlain", NULL, text_plain, NULL, NULL, NULL, napi_default, NULL },
    { "listen", NULL, listen_open, NULL, NULL, NULL, napi_default, NULL },
    { "listenConfig", NULL, listen_config, NULL, NULL, NULL, napi_default, NULL },
    { "listenPending", NULL, listen_pending, NULL, NULL, NULL, napi_default, NULL },
    { "listenOutside", NULL, listen_outside, NULL, NULL, NULL, napi_default, NULL },
    { "listenHandOver", NULL, listen_hand_over, NULL, NULL, NULL, napi_default, NULL },
    { "listenClose", NULL, listen_close, NULL, NULL, NULL, napi_default, NULL },
  };
  CHECK(napi_define_properties(env, exports, sizeof methods / sizeof methods[0], methods));
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
