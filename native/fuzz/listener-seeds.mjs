#!/usr/bin/env node
/**
 * Writes the named seed inputs of native/fuzz/listener-harness.c into native/fuzz/listener-corpus/
 * (`node native/fuzz/listener-seeds.mjs`). Each seed is a script in the harness's input language:
 * a config byte, then steps (see step() in listener-harness.c), or, with PURE, bytes for
 * lp_startup_step. libFuzzer grows the corpus from these; the files it found and kept are
 * committed beside them (see .ci/fuzz.sh).
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const corpus = join(dirname(fileURLToPath(import.meta.url)), 'listener-corpus');

// The config byte.
const PURE = 0x01, TCP = 0x02, CONFIG = 0x04, ABRUPT = 0x08, OPEN_FAILS = 0x10, IPV6 = 0x20; // IPV6: with TCP, over ::1 (127.0.0.1 where there is none)

const u16 = (n) => [(n >> 8) & 0xff, n & 0xff];
const u32 = (n) => [(n >>> 24) & 0xff, (n >>> 16) & 0xff, (n >>> 8) & 0xff, n & 0xff];
// A step's byte: its kind (op % 16) and the client it is about (op / 16, modulo 6).
const op = (kind, client = 0) => client * 16 + kind;

// Indexes into LENGTHS, CODES, WRITE_SIZES, MAX_PENDING and TIMEOUTS of listener-harness.c.
const LENGTH = { 0: 0, 1: 1, 3: 2, 4: 3, 7: 4, 8: 5, 9: 6, 12: 7, 16: 8, 511: 9, 512: 10, 513: 11, 1000: 12, 10003: 13, 10004: 14, 10005: 15, 10010: 16, 65536: 17, max31: 18, max32: 19, sslCode: 20 };
const CODE = { v3: 0, ssl: 1, gssenc: 2, cancel: 3, zero: 4, other: 5 };
const SIZE = { 1: 0, 2: 1, 3: 2, 4: 3, 5: 4, 7: 5, 8: 6, 9: 7, 12: 8, 16: 9, 511: 10, 512: 11, 513: 12, 4096: 13, 10004: 14, all: 15 };
const MAX_PENDING = { 0: 0, 1: 1, 2: 2, 3: 3, '-1': 4 };
const TIMEOUT = { 0: 0, 1: 1, 2: 2, 3: 3, 5: 4, 60000: 5, 30000: 6, 86400000: 7 };

// What goes into a client's outbox (compose() in the harness).
const what = {
  ssl: () => [0],
  gssenc: () => [1],
  startup: () => [2],
  cancel: () => [3],
  packet: (length, code = CODE.v3) => [4, LENGTH[length], code],
  packetOfLength: (n, code = CODE.v3) => [4, 31, ...u16(n), code], // in_size(10012) of the two bytes
  raw: (bytes) => [5, bytes.length, ...bytes],
  lengthWord: (n) => [6, ...u32(n)],
  pattern: (n) => [7, ...u16(n)],
};

const config = (negotiate = true, maxPending = 0, timeoutMs = 60000) => (negotiate ? 0 : 1) | (MAX_PENDING[maxPending] << 1) | (TIMEOUT[timeoutMs] << 4);
const REACT = { closeFd: 1, reset: 2, config: 4, closeListener: 8 };
// The fault step's byte: its kind (% 4), then the error (/ 4).
const FAULT = {
  accept: { EINTR: 0, ECONNABORTED: 4, EAGAIN: 8, EMFILE: 12, EPROTO: 16 },
  recv: { EINTR: 1, EAGAIN: 5, ECONNRESET: 9 },
  send: { EAGAIN: 2, EPIPE: 6 },
  alloc: 3,
};

const step = {
  connect: () => [op(0)],
  compose: (client, w) => [op(1, client), ...w],
  write: (client, size = 'all') => [op(2, client), SIZE[size]],
  send: (client, w) => [op(3, client), ...w], // compose, then write it all
  halfClose: (client) => [op(4, client), 0],
  close: (client) => [op(4, client), 1],
  reset: (client) => [op(4, client), 2],
  read: (client) => [op(5, client)],
  loop: (n = 1) => [op(6), n - 1],
  wait: (ms = 1) => [op(7), ms],
  waitBackoff: () => [op(7), 3], // past an EMFILE's backoff (100 ms)
  config: (...args) => [op(8), config(...args)],
  // With a second byte: `outside` clients in their startup elsewhere (0 to 3), then lp_listener_hand_over when asked.
  configOutside: (outside, handOver = false, ...args) => [op(8), config(...args) | 0x80, outside | (handOver ? 4 : 0)],
  closeListener: () => [op(9)],
  callerRead: (client) => [op(10, client)],
  callerClose: (client, reset = false) => [op(11, client), reset ? 1 : 0],
  fault: (code) => [op(12), code],
  react: (bits, configByte = config()) => [op(13), bits, configByte],
  settle: () => [op(14)],
  // 68 more clients at once, past the 64 accepts of one event: sending nothing, a StartupMessage or an SSLRequest.
  flood: (what = 'nothing') => [op(15), { nothing: 0, startup: 1, ssl: 2 }[what]],
};

// A client that connects, sends `parts` (each written whole), and the loop turns after each.
const client = (n, ...parts) => [step.connect(), ...parts.map((w) => [step.send(n, w), step.loop()])];
const bytesOf = (length, fill = 0x61) => Array.from({ length }, (_, i) => (i * 7 + fill) & 0xff);

const seeds = {
  // The usual client: an SSLRequest refused with 'N', then its StartupMessage; the caller reads the rest.
  'ssl-then-startup': [0, client(0, what.ssl(), what.startup()), step.read(0), step.settle()],
  'ssl-then-startup-tcp': [TCP, client(0, what.ssl(), what.startup()), step.read(0), step.settle()],
  'ssl-then-startup-ipv6': [TCP | IPV6, client(0, what.ssl(), what.startup()), step.read(0), step.settle()],
  'gssenc-ssl-startup': [0, client(0, what.gssenc(), what.ssl(), what.startup()), step.read(0), step.settle()],
  // The startup first (no encryption request), with bytes after it the caller must get.
  'startup-with-extra': [0, step.connect(), step.compose(0, what.startup()), step.compose(0, what.pattern(40)), step.write(0), step.loop(), step.callerRead(0), step.settle()],
  // An SSLRequest with more behind it in one write: not refused, handed over as it is.
  'ssl-and-startup-one-write': [0, step.connect(), step.compose(0, what.ssl()), step.compose(0, what.startup()), step.write(0), step.loop(), step.settle()],
  // Split anywhere: an SSLRequest a byte at a time, then the startup in pieces of 3.
  'ssl-bytewise': [0, step.connect(), step.compose(0, what.ssl()), ...Array.from({ length: 8 }, () => [step.write(0, 1), step.loop()]), step.read(0), step.compose(0, what.startup()),
    ...Array.from({ length: 30 }, () => [step.write(0, 3), step.loop()]), step.settle()],
  'length-word-split': [TCP, step.connect(), step.compose(0, what.packet(1000)), step.write(0, 2), step.loop(), step.write(0, 2), step.loop(), step.write(0, 511), step.loop(), step.write(0),
    step.loop(), step.settle()],
  // Length words no startup packet has, and the longest that is read whole (and one more).
  'length-0': [0, client(0, what.packet(0)), step.settle()],
  'length-7': [0, client(0, what.packet(7)), step.settle()],
  'length-8-ssl-code-extra': [0, step.connect(), step.compose(0, what.packet(8, CODE.ssl)), step.compose(0, what.raw([1])), step.write(0), step.loop(), step.settle()],
  'length-10004': [0, client(0, what.packet(10004)), step.settle()],
  'length-10005': [0, client(0, what.packet(10005)), step.settle()],
  'length-10010': [TCP, client(0, what.packet(10010)), step.settle()],
  'length-max': [0, client(0, what.packet('max32')), step.settle()],
  'length-word-alone': [0, client(0, what.lengthWord(9000)), step.settle(), step.halfClose(0), step.loop(2), step.settle()],
  'cancel-request': [0, client(0, what.cancel()), step.settle()],
  // Clients that go mid-startup: a FIN, a close, a reset (TCP).
  'half-close-mid-packet': [0, step.connect(), step.compose(0, what.startup()), step.write(0, 9), step.loop(), step.halfClose(0), step.loop(2), step.read(0), step.settle()],
  'half-close-after-ssl': [TCP, client(0, what.ssl()), step.halfClose(0), step.loop(2), step.read(0), step.settle()],
  'close-mid-packet': [TCP, step.connect(), step.compose(0, what.startup()), step.write(0, 5), step.loop(), step.close(0), step.loop(2), step.settle()],
  'reset-after-ssl-unread': [TCP, client(0, what.ssl()), step.reset(0), step.loop(2), step.settle()],
  'close-before-accept': [0, step.connect(), step.send(0, what.startup()), step.close(0), step.loop(2), step.settle()],
  // MaxStartups: one in its startup, the next clients turned away (BUSY).
  'busy': [CONFIG, config(true, 1), step.connect(), step.loop(), step.connect(), step.connect(), step.loop(), step.settle(), step.send(0, what.startup()), step.loop(), step.connect(), step.loop(),
    step.settle()],
  'busy-tcp': [CONFIG | TCP, config(true, 2), client(0, what.pattern(3)), client(1, what.ssl()), client(2, what.startup()), step.settle()],
  // Negotiate off: every client as accepted (RAW), its bytes all at the caller.
  'raw': [CONFIG, config(false), client(0, what.ssl(), what.startup()), client(1), step.settle()],
  // Timeouts: 0 ms (due at the next turn), 1 and 2 ms (a wait), a shorter one sorted before a longer.
  'timeout-0': [CONFIG, config(true, 0, 0), client(0, what.pattern(3)), step.loop(2), step.read(0), step.settle()],
  'timeout-1-wait': [CONFIG | TCP, config(true, 0, 1), client(0, what.ssl()), step.wait(2), step.loop(), step.read(0), step.settle()],
  'timeout-order': [CONFIG, config(true, 0, 5), step.connect(), step.loop(), step.config(true, 0, 1), step.connect(), step.loop(), step.config(true, 0, 0), step.connect(), step.loop(2), step.wait(2),
    step.wait(2), step.wait(2), step.settle()],
  'timeout-then-startup': [CONFIG, config(true, 0, 2), client(0, what.ssl()), step.wait(2), step.send(0, what.startup()), step.loop(2), step.settle()],
  // The listener closed with clients in their startup, in the backlog and connecting after.
  'close-with-pending': [0, client(0, what.ssl()), client(1, what.pattern(5)), step.connect(), step.closeListener(), step.connect(), step.loop(2), step.read(0), step.read(1), step.settle()],
  'close-tcp-backlog': [TCP, client(0), step.connect(), step.closeListener(), step.loop(), step.settle()],
  // The caller's reactions: the socket closed inside the callback; the config, the listener closed inside one.
  // lp_listener_hand_over: every client in its startup goes over (RAW) with what was read of it, mid-packet or after a refusal.
  'hand-over-mid-packet': [TCP, client(0, what.ssl()), step.connect(), step.compose(1, what.startup()), step.write(1, 9), step.loop(), step.connect(), step.compose(2, what.lengthWord(300)),
    step.write(2, 2), step.loop(), step.read(0), step.configOutside(0, true), step.callerRead(0), step.callerRead(1), step.callerRead(2), step.send(1, what.pattern(5)), step.callerRead(1),
    step.settle()],
  // Inside a callback: the caller hands the others over (a reaction's config with hand-over).
  'react-hand-over': [0, step.react(REACT.config | 0x40, config(true, 0, 60000)), step.connect(), step.compose(0, what.startup()), step.write(0, 5), step.loop(), client(1, what.startup()),
    step.callerRead(0), step.settle()],
  // MaxStartups counts the clients outside: with 1 outside and a limit of 2, the second client here is turned away.
  'outside-busy': [TCP, step.configOutside(1, false, true, 2), client(0, what.pattern(3)), step.connect(), step.loop(), step.configOutside(0, false, true, 2), step.connect(), step.loop(),
    step.settle()],
  'react-close-fd': [0, step.react(REACT.closeFd), client(0, what.startup()), client(1, what.ssl(), what.startup()), step.read(1), step.settle()],
  'react-close-listener': [TCP, step.react(REACT.closeListener), client(0, what.pattern(2)), client(1, what.startup()), step.loop(), step.connect(), step.loop()],
  'react-config-busy': [0, step.react(REACT.config, config(true, 1)), client(0, what.startup()), client(1, what.pattern(3)), step.connect(), step.loop(), step.settle()],
  'react-close-listener-timeout': [CONFIG, config(true, 0, 0), step.react(REACT.closeListener | REACT.closeFd), client(0), client(1), step.loop(2)],
  'caller-close-reset': [TCP, client(0, what.startup()), step.callerClose(0, true), step.loop(), step.read(0), step.settle()],
  // Faults in the listener's calls.
  'fault-accept-eintr': [0, step.fault(FAULT.accept.EINTR), client(0, what.startup()), step.settle()],
  'fault-accept-eproto-recv-eintr': [0, step.fault(FAULT.accept.EPROTO), client(0), step.fault(FAULT.recv.EINTR), step.send(0, what.startup()), step.loop(), step.settle()],
  'fault-accept-emfile': [0, step.fault(FAULT.accept.EMFILE), client(0, what.startup()), step.loop(3), step.settle()],
  'fault-accept-emfile-backoff': [0, step.fault(FAULT.accept.EMFILE), client(0, what.startup()), step.loop(), step.waitBackoff(), step.loop(), step.settle()],
  // Out of memory: for an arrival (the client goes over as accepted), for a packet longer than the inline buffer (dropped).
  'fault-alloc-arrival': [0, step.fault(FAULT.alloc), client(0, what.startup()), client(1, what.startup()), step.settle()],
  'fault-alloc-long-packet': [0, client(0, what.ssl()), step.fault(FAULT.alloc), step.send(0, what.packet(1000)), step.loop(), step.settle()],
  // lp_listener_open refusing a pipe, and with no memory, before the real one.
  'open-fails': [OPEN_FAILS, client(0, what.startup()), step.settle()],
  'fault-accept-aborted': [0, step.fault(FAULT.accept.ECONNABORTED), client(0), client(1, what.ssl()), step.settle()],
  'fault-recv-eagain': [0, step.fault(FAULT.recv.EAGAIN), client(0, what.startup()), step.loop(), step.settle()],
  'fault-recv-reset': [0, client(0), step.fault(FAULT.recv.ECONNRESET), step.send(0, what.pattern(3)), step.loop(), step.settle()],
  'fault-send-epipe': [0, step.fault(FAULT.send.EPIPE), client(0, what.ssl()), step.read(0), step.settle()],
  'flood-startup': [0, step.flood('startup'), step.loop(3), step.settle()],
  'flood-ssl-timeout-0': [CONFIG, config(true, 0, 0), step.flood('ssl'), step.loop(2), step.settle()],
  'flood-busy-tcp': [CONFIG | TCP, config(true, 3), step.flood(), step.loop(2), step.settle()],
  // Six clients, mixed, ended without a settle.
  'six-abrupt': [ABRUPT | TCP, client(0, what.ssl()), client(1, what.startup()), client(2, what.packet(10004)), client(3, what.lengthWord(3)), client(4, what.gssenc()), client(5, what.cancel()),
    step.loop(2)],
  // lp_startup_step alone: the rest of the input cut at every point (and padded to its length word).
  'pure-ssl': [PURE, 0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f],
  'pure-gssenc-extra': [PURE, 0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30, 0],
  'pure-startup': [PURE, 0, 0, 0, 23, 0, 3, 0, 0, ...Buffer.from('user\0fuzz\0\0'), 0, 0, 0, 0],
  'pure-length-10004': [PURE, 0, 0, 0x27, 0x14, 0, 3, 0, 0],
  'pure-length-10005': [PURE, 0, 0, 0x27, 0x15, 0, 3, 0, 0],
  'pure-length-7': [PURE, 0, 0, 0, 7, ...bytesOf(12)],
  'pure-length-huge': [PURE, 0xff, 0xff, 0xff, 0xff, ...bytesOf(4)],
};

mkdirSync(corpus, { recursive: true });
for (const [name, parts] of Object.entries(seeds)) writeFileSync(join(corpus, `seed-${name}`), Buffer.from(parts.flat(Infinity)));
console.log(`${Object.keys(seeds).length} seeds in ${corpus}`);
