#!/usr/bin/env node
/**
 * Writes the named seed inputs of native/fuzz/harness.c into native/fuzz/corpus/ (`node
 * native/fuzz/seeds.mjs`). Each seed is a script in the harness's input language: a config byte,
 * then steps (see step() in harness.c). libFuzzer grows the corpus from these; the files it
 * found and kept are committed beside them (see .ci/fuzz.sh).
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const corpus = join(dirname(fileURLToPath(import.meta.url)), 'corpus');

// The config byte.
const SERVER_FIRST = 0x01, RESUME = 0x02, TLS12 = 0x04, SNI = 0x08, REACT = 0x10, SMALL_BUFFERS = 0x20;
const HOST_NAME = 0x40, HOST_IP = 0x80, HOST_WRONG = 0xc0;
// The second byte: which sockets are TCP over the loopback (else socketpairs); a pooled relay.
const UNIX = 0, TCP_UPSTREAM = 1, TCP_CLIENT = 2, TCP = 3, POOLED = 4;

const u16 = (n) => [(n >> 8) & 0xff, n & 0xff];
const TYPES = { D: 0, C: 3, Z: 4, E: 5, N: 6 };

// The steps (after the two config bytes): each returns bytes the harness reads (op % 24 picks the step, high bits its variant).
const step = {
  serverMessages: (...messages) => [0, 1, messages.length - 1, ...messages.flatMap(([type, body]) => (type === 'Z' ? [TYPES.Z] : [TYPES[type], body]))],
  serverRaw: (bytes) => [0, 0, bytes.length, ...bytes],
  serverBig: (kib) => [0, 3, kib - 1],
  serverCut: (n) => [0, 4, n],
  serverFlush: (n) => [3, ...u16(n - 1)],
  serverRead: (n = 65536) => [6, ...u16(Math.min(n, 65535) - 1)],
  clientQuery: (body) => [8, 1, body],
  clientRaw: (bytes) => [8, 0, bytes.length, ...bytes],
  clientTerminate: () => [8, 3],
  clientCut: () => [8, 4],
  clientBig: (kib) => [8, 5, kib - 1],
  clientFlush: (n) => [10, ...u16(n - 1)],
  clientRead: (n = 65536) => [11, ...u16(Math.min(n, 65535) - 1)],
  loop: (n = 1) => [12, n - 1],
  keyUpdate: (requested) => [requested ? 86 : 14],
  ticket: () => [38],
  closeNotify: (fin) => [fin ? 135 : 15],
  serverFin: () => [16],
  serverClose: () => [136],
  serverReset: () => [208],
  flipBit: (at, bit) => [137, ...u16(at), bit],
  garbage: (bytes) => [17, bytes.length - 1, ...bytes],
  clientFin: () => [18],
  clientClose: () => [138],
  clientReset: () => [210],
  clientStopReading: () => [19],
  loginQuery: (body) => [20, 1, body],
  loginEnd: () => [212], // before the relay: close_notify and FIN upstream
  detach: () => [140], // a pooled relay: lets the client go
  flood: () => [236], // in the relay: 4 MiB from the server at once
  pause: (paused) => [paused ? 141 : 21],
  attach: (how = 1, ...rest) => [22, how, ...rest],
  attachEarly: () => [142, 1],
  state: () => [23],
  close: (end) => [215, end], // 0 shutdown, 1 idle_timeout, 2 upstream_error; 128 client_closed, 129 client_error, 130 upstream_closed
};

/** The TLS handshake, each flight whole. */
const handshake = [step.loop(), step.serverRead(), step.serverFlush(65536), step.loop(2), step.serverRead(), step.serverFlush(65536), step.loop(2)];
/** The login: the startup message up, AuthenticationOk..ReadyForQuery down. */
const login = [step.loginQuery(10), step.loop(), step.serverRead(), step.serverMessages(['N', 20], ['Z']), step.serverFlush(65536), step.loop(2)];
const query = (body) => [step.clientQuery(body), step.loop(2), step.serverRead()];
const rows = [step.serverMessages(['D', 30], ['D', 40], ['C', 8], ['Z']), step.serverFlush(65536), step.loop(2), step.clientRead()];

const seeds = {
  'clean-nothing': [0, UNIX],
  'clean-server-first': [SERVER_FIRST, UNIX],
  'resumed-session': [RESUME | SNI | HOST_NAME, UNIX],
  'verify-ip': [HOST_IP, UNIX],
  'verify-wrong-name': [HOST_WRONG, UNIX],
  'tls12': [TLS12 | SNI, UNIX, ...handshake, ...login, step.attach(), ...query(20), ...rows],
  'login-and-queries': [SNI, UNIX, ...handshake, ...login, step.attach(), ...query(20), ...rows, ...query(0), ...rows, step.clientTerminate(), step.clientFin(), step.loop(3)],
  'records-cut-small': [0, UNIX, ...handshake, ...login, step.attach(), step.serverMessages(['D', 60], ['D', 60], ['Z']),
    ...Array.from({ length: 12 }, (_, i) => [step.serverFlush(1 + (i % 5)), step.loop()]).flat(), step.clientRead()],
  'backpressure-large-rows': [SMALL_BUFFERS, UNIX, ...handshake, ...login, step.attach(), step.serverBig(128), step.serverBig(100), step.serverFlush(30000),
    step.loop(3), step.serverFlush(60000), step.loop(3), step.clientRead(1000), step.loop(3), step.serverFlush(65536), step.loop(3), step.clientRead(), step.loop(3)],
  'backpressure-client-copy': [SMALL_BUFFERS, UNIX, ...handshake, ...login, step.attach(), step.clientBig(128), step.loop(3), step.clientBig(64), step.loop(3),
    step.serverRead(5000), step.loop(3), step.serverRead(), step.loop(3)],
  // The client half-closes, the relay sends close_notify and FIN; then the server asks twice for a KeyUpdate (OpenSSL writes the
  // answer to the first from inside SSL_read when the second comes) and sends rows.
  'key-update-requested-after-client-fin': [0, UNIX, ...handshake, ...login, step.attach(), step.loop(), step.clientFin(), step.loop(2), step.serverRead(), step.keyUpdate(true),
    step.keyUpdate(true), step.serverMessages(['D', 30], ['C', 8], ['Z']), step.serverFlush(65536), step.loop(3), step.clientRead()],
  'key-update-both-kinds': [0, UNIX, ...handshake, ...login, step.attach(), step.keyUpdate(true), step.serverFlush(65536), step.loop(), ...query(5),
    step.keyUpdate(false), step.ticket(), ...rows, ...query(9)],
  'terminate-then-server-closes': [0, UNIX, ...handshake, ...login, step.attach(), ...query(3), ...rows, step.clientTerminate(), step.loop(), step.serverRead(),
    step.closeNotify(true), step.serverFlush(65536), step.loop(3), step.clientRead()],
  'server-closes-between-messages': [0, UNIX, ...handshake, ...login, step.attach(), ...query(3), ...rows, step.closeNotify(false), step.serverFlush(65536), step.serverFin(),
    step.loop(3), step.clientRead()],
  'server-closes-inside-a-message': [0, UNIX, ...handshake, ...login, step.attach(), ...query(3), step.serverCut(50), step.serverFlush(65536), step.serverClose(), step.loop(3), step.clientRead()],
  'server-fin-inside-a-record': [0, UNIX, ...handshake, ...login, step.attach(), step.serverMessages(['D', 60], ['Z']), step.serverFlush(20), step.serverFin(), step.loop(3), step.clientRead()],
  'error-response-then-close': [0, UNIX, ...handshake, ...login, step.attach(), step.serverMessages(['E', 30]), step.closeNotify(true), step.serverFlush(65536), step.loop(3), step.clientRead()],
  'client-vanishes-mid-query': [0, UNIX, ...handshake, ...login, step.attach(), ...query(3), step.serverBig(64), step.serverFlush(65536), step.loop(), step.clientClose(), step.loop(3), step.serverRead()],
  'client-stops-reading': [SMALL_BUFFERS, UNIX, ...handshake, ...login, step.attach(), step.clientStopReading(), step.serverBig(64), step.serverFlush(65536), step.loop(3), ...query(3), step.loop(3)],
  'client-garbage': [0, UNIX, ...handshake, ...login, step.attach(), step.clientRaw([0xff, 0, 0, 0, 1, 0x51, 0x51]), step.clientCut(), step.loop(2), step.serverRead()],
  'record-bit-flipped': [0, UNIX, ...handshake, ...login, step.attach(), ...query(3), step.serverMessages(['D', 30], ['Z']), step.flipBit(20, 3), step.serverFlush(65536), step.loop(3), step.clientRead()],
  'garbage-between-records': [0, UNIX, ...handshake, ...login, step.attach(), step.serverMessages(['D', 30]), step.serverFlush(65536), step.garbage([23, 3, 3, 0, 5, 1, 2]), step.loop(3), step.clientRead()],
  'garbage-instead-of-hello': [0, UNIX, step.loop(), step.garbage([22, 3, 1, 0, 1, 9]), step.loop(3)],
  'server-closes-during-handshake': [0, UNIX, step.loop(), step.serverRead(), step.serverFlush(100), step.serverClose(), step.loop(3)],
  'server-closes-during-login': [0, UNIX, ...handshake, step.loginQuery(10), step.loop(), step.serverRead(), step.serverMessages(['N', 5]), step.closeNotify(true), step.serverFlush(65536), step.loop(3)],
  'login-paused-then-relay': [0, UNIX, ...handshake, step.loginQuery(10), step.loop(), step.serverRead(), step.pause(true), step.serverMessages(['N', 20], ['Z']),
    step.serverBig(20), step.serverFlush(65536), step.loop(3), step.attach(5), step.loop(2), step.clientRead()],
  // The handshake callback writes the startup message (0), the data callback attaches the relay (3, greeting 1).
  'callbacks-react': [REACT, UNIX, step.loop(), step.serverRead(), step.serverFlush(65536), step.loop(2), 0, step.serverRead(), step.serverFlush(65536), step.loop(2),
    step.serverRead(), step.serverMessages(['N', 20], ['Z']), step.serverFlush(65536), step.loop(), 3, 1, step.serverMessages(['D', 9], ['Z']), step.serverFlush(65536),
    step.loop(2), step.clientRead()],
  'close-during-login': [0, UNIX, ...handshake, step.close(0), step.loop(3)],
  'close-during-query': [0, UNIX, ...handshake, ...login, step.attach(), ...query(3), step.close(2), step.loop(3), step.state()],
  // A close that names the client as the end, while a query runs: `abandoned` once, not twice.
  'close-during-query-client-end': [0, UNIX, ...handshake, ...login, step.attach(), ...query(3), step.close(128), step.loop(3)],
  // The client leaves while a query runs; the caller closes the connection from inside `abandoned` (0).
  'close-inside-abandoned': [REACT, UNIX, step.loop(), step.serverRead(), step.serverFlush(65536), step.loop(2), 0, step.serverRead(), step.serverFlush(65536), step.loop(2),
    step.serverRead(), step.serverMessages(['N', 20], ['Z']), step.serverFlush(65536), step.loop(), 3, 1, ...query(3), step.clientClose(), step.loop(), 0, step.loop(3)],
  'relay-before-handshake': [0, UNIX, step.attachEarly(), ...handshake],
  'first-bytes-both-ways': [0, UNIX, ...handshake, ...login, step.attach(1 | 4 | 8, 1, 30), step.loop(2), step.serverRead(), step.clientRead()],
  // TLS 1.2 without verification (SSLMode=require): the server's flight, then FIN before its Finished. Not a certificate problem.
  'require-server-fin-before-finished': [TLS12, UNIX, step.loop(), step.serverRead(), step.serverFlush(65536), step.loop(2), step.serverFin(), step.loop(3)],
  'tcp-clean': [SNI | HOST_NAME, TCP, ...handshake, ...login, step.attach(), ...query(20), ...rows, step.clientTerminate(), step.clientFin(), step.loop(3)],
  'tcp-upstream-reset-mid-query': [0, TCP, ...handshake, ...login, step.attach(), ...query(3), step.serverBig(40), step.serverFlush(20000), step.serverReset(), step.loop(3), step.clientRead()],
  'tcp-upstream-reset-during-handshake': [0, TCP_UPSTREAM, step.loop(), step.serverReset(), step.loop(3)],
  'tcp-client-reset-mid-query': [SMALL_BUFFERS, TCP_CLIENT, ...handshake, ...login, step.attach(), ...query(3), step.serverBig(64), step.serverFlush(65536), step.loop(2), step.clientReset(), step.loop(3), step.serverRead()],
  // The server ends (FIN) with the client's bytes still queued for it, then its socket resets: the relay must end at once, not spin on the error until its linger timer.
  'upstream-reset-after-fin-with-writes-queued': [SMALL_BUFFERS, UNIX, ...handshake, ...login, step.attach(), step.clientBig(128), step.loop(3), step.serverMessages(['E', 30]),
    step.closeNotify(true), step.loop(3), step.serverClose(), step.loop(3), step.clientClose(), step.loop(3)],
  // A pooled relay: the client's Terminate stays here, the client goes, and what the server sends next goes to the caller, who then ends.
  'pooled-terminate-then-notice': [0, POOLED, ...handshake, ...login, step.attach(), ...query(3), ...rows, step.clientTerminate(), step.loop(2), step.serverRead(),
    step.serverMessages(['N', 10]), step.serverFlush(65536), step.loop(2)],
  // A pooled relay whose client vanishes in mid-query: abandoned, detached, and the rest of the rows go to the caller.
  'pooled-client-vanishes-mid-query': [0, POOLED, ...handshake, ...login, step.attach(), ...query(3), step.serverBig(64), step.serverFlush(65536), step.loop(),
    step.clientClose(), step.loop(3), step.serverRead()],
  // The caller lets a pooled relay's client go while rows are queued for it (an idle timeout's detach).
  'pooled-detach-mid-stream': [SMALL_BUFFERS, POOLED, ...handshake, ...login, step.attach(), ...query(3), step.serverBig(128), step.serverFlush(65536), step.loop(),
    step.detach(), step.loop(3), step.serverFlush(65536), step.loop(3)],
  // The client is gone before a pooled relay starts: writing the greeting fails, the relay detaches at once, and the
  // client's first bytes (a query) must not reach the upstream.
  'pooled-client-gone-before-the-relay': [0, POOLED, ...handshake, ...login, step.clientClose(), step.attach(1 | 8, 1, 30), step.loop(3), step.serverRead()],
  // The server closes while a pooled relay runs; the client's Terminate comes after.
  'pooled-server-closes-then-terminate': [SERVER_FIRST, POOLED, ...handshake, ...login, step.attach(), ...query(3), ...rows, step.closeNotify(true), step.loop(2),
    step.clientTerminate(), step.loop(3), step.clientRead()],
  'login-end': [0, UNIX, ...handshake, step.loginQuery(10), step.loop(), step.loginEnd(), step.loop(2), step.serverRead(), step.loop(2)],
  // 4 MiB wait on the upstream socket and the client takes everything: one turn of the loop must not relay it all.
  // A small record first: the relay's reads then end inside records (OpenSSL holds the rest of one).
  'flood-yields-the-loop': [0, UNIX, ...handshake, ...login, step.attach(), step.serverMessages(['Z']), step.flood(), step.loop(3), step.clientRead()],
};

mkdirSync(corpus, { recursive: true });
for (const [name, parts] of Object.entries(seeds)) writeFileSync(join(corpus, `seed-${name}`), Buffer.from(parts.flat(2)));
console.log(`${Object.keys(seeds).length} seeds in ${corpus}`);
