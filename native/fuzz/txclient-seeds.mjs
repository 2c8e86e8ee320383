#!/usr/bin/env node
/**
 * Writes the named seed inputs of native/fuzz/txclient-harness.c into native/fuzz/txclient-corpus/
 * (`node native/fuzz/txclient-seeds.mjs`). Each seed is a script in the harness's input language:
 * a config byte, then steps (see step() in txclient-harness.c), or, with PURE, bytes for
 * lp_unit_length and lp_text_plain. libFuzzer grows the corpus from these; the files it found
 * and kept are committed beside them (see .ci/fuzz.sh).
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const corpus = join(dirname(fileURLToPath(import.meta.url)), 'txclient-corpus');

// The config byte.
const PURE = 0x01, REACT = 0x02, SMALL_BUFFERS = 0x04, TLS12 = 0x08, TCP_CLIENT = 0x10, TCP_UPSTREAM = 0x20, END_CLIENTS = 0x40, TWO_CLIENTS = 0x80;

const u16 = (n) => [(n >> 8) & 0xff, n & 0xff];
// A step's byte: its kind (op % 24) and `which` (op / 24: the client or connection, and the variant).
const op = (kind, which = 0) => which * 24 + kind;

// Indexes into TEXTS of txclient-harness.c.
const TEXT = { select1: 0, now: 1, empty: 2, insertUpdate: 3, begin: 4, commit: 5, set: 7, setLocal: 8, tempTable: 10, selectSemicolonSet: 20 };

// The client's messages, as put_client_message() reads them.
const msg = {
  query: (text) => [0, text],
  parse: (text, named = false) => [1, named ? 1 : 0, text],
  bind: (portal = false, statement = false) => [2, portal ? 1 : 0, statement ? 1 : 0],
  describe: (statement = true, named = false) => [3, statement ? 1 : 0, named ? 1 : 0],
  execute: (named = false) => [4, named ? 1 : 0],
  sync: () => [5],
  flush: () => [7],
  close: (statement = true) => [8, statement ? 1 : 0],
  terminate: () => [9],
};

// The server's messages, as make_server_bytes() reads them (indexes into "DDCZZZSNEA12n").
const ANSWER = { D: 0, C: 2, Z: 3, S: 6, N: 7, E: 8, A: 9, ParseComplete: 10, BindComplete: 11, NoData: 12 };
const STATUS = { I: 0, T: 2, E: 3 };

const step = {
  clientQuery: (text = TEXT.select1) => [op(0), 1, text],
  // Parse, Bind, Describe, Execute, Sync of the unnamed statement and portal: `parts` leaves some out (see make_client_bytes).
  clientExtended: (text = TEXT.select1, parts = 4) => [op(0), 3, parts, ...(parts & 1 ? [] : [0, text]), ...(parts & 2 ? [] : [0, 0]), ...(parts & 4 ? [1, 0] : []), ...(parts & 8 ? [] : [0])],
  clientMessage: (message) => [op(0), 5, ...message],
  clientRaw: (bytes) => [op(0), 0, bytes.length, ...bytes],
  clientBigQuery: (kib) => [op(0), 6, kib - 1],
  clientHugeLength: () => [op(0), 0x86], // a Query whose length is more than a unit may hold
  clientCut: (message, cut) => [op(0), 7, ...message, cut],
  clientFlush: (n, which = 0) => [op(2, which), ...u16(n - 1)],
  clientRead: (n = 65536, which = 0) => [op(3, which), ...u16(Math.min(n, 65535) - 1)],
  serverMessages: (...messages) => [op(4), 1, messages.length - 1, ...messages.flatMap(([type, arg]) => [ANSWER[type], ...(type === 'Z' ? [STATUS[arg ?? 'I']] : 'DNEA'.includes(type) ? [arg ?? 20] : [])])],
  serverRaw: (bytes) => [op(4), 0, bytes.length, ...bytes],
  serverBigRow: (kib) => [op(4), 4, kib - 1],
  serverCut: (n) => [op(4), 5, n],
  serverCopyIn: () => [op(4), 6, 1],
  serverBigReport: () => [op(4), 6, 0, 2],
  serverReady: (status = 'I') => [op(4), 7, { I: 0, T: 1, E: 2 }[status]],
  serverFlush: (n = 65536) => [op(6), ...u16(Math.min(n, 65535) - 1)],
  serverRead: (n = 65536) => [op(7), ...u16(Math.min(n, 65535) - 1)],
  loop: (n = 1) => [op(8), n - 1],
  later: (n = 1) => [op(9), n - 1], // with a desk open: 1 ms later (its timers)
  fast: (how = 0, which = 0) => [op(10, which), how], // how % 3: 0 nothing held, 1 all the engine holds, 2 what it holds from an offset
  attach: (which = 0) => [op(11, which)],
  js: (which = 0) => [op(12, which)],
  engineWrite: (size = 20, which = 0) => [op(13, which), size],
  engineEnd: () => [op(14, 0)],
  engineClose: () => [op(14, 1)],
  pause: (paused) => [op(15, paused ? 1 : 0)],
  clientFin: () => [op(16, 0)],
  clientClose: () => [op(16, 1)],
  clientReset: () => [op(16, 2)],
  clientStopReading: () => [op(16, 3)],
  serverCloseNotify: (fin = false) => [op(17, fin ? 4 : 0)],
  serverFin: () => [op(17, 1)],
  serverClose: () => [op(17, 2)],
  serverReset: () => [op(17, 3)],
  poolQuery: () => [op(18, 1)],
  state: () => [op(19)],
  openClient: () => [op(20, 0)],
  openConnection: () => [op(20, 1)],
  poolPause: (paused) => [op(21, paused ? 1 : 0)],
  poolClose: () => [op(21, 2)],
  answer: () => [op(22)],
  lend: () => [op(23)], // the pool lends an idle connection to a client that waits for one
  offer: (sid = 1) => [op(23, 1 + 2 * (sid - 1))], // with a desk: the pool offers its idle connection to the desk's clients waiting in `sid`
};

// A step with the desk (op 19, `which` odd: with two clients open, client 1): its kind, and how (see desk_step()).
const deskStep = (what, how = 0, which = 1) => [op(19, which), what + 16 * how];
// Wait timeouts and check delays (indexes into WAIT_MS and CHECK_MS): a few ms, so inputs stay fast.
const WAIT = { ms1: 0, ms3: 1, ms0: 2, ms8: 3 };
const CHECK = { never: 0, ms4: 1, ms0: 2, ms30: 3 };
const desk = {
  // Opened with every client on it in settings 1; the engine's attaches give tickets in the client's settings.
  open: (wait = WAIT.ms8, check = CHECK.never) => deskStep(0, wait | (check << 2)),
  // Client `k` (of three open, or of two with k < 2) off the desk, or on it in `sid`.
  client: (sid, k = 1) => deskStep(1, (sid === null ? 0 : sid === 0 ? 4 : sid) + (k > 0 ? 8 : 0), k === 2 ? 3 : 1),
  set: (room, jsWaiting) => deskStep(2, (room ? 1 : 0) | (jsWaiting ? 2 : 0)),
  config: (wait, check) => deskStep(3, wait | (check << 2)),
  offer: (sid = 1) => deskStep(4, sid - 1),
  wake: () => deskStep(5),
  reclaim: (which = 0) => deskStep(6, which), // the ticket: which % (tickets + 1) + 1
  reclaimAny: () => deskStep(7),
  stop: () => deskStep(8),
  goOn: () => deskStep(9),
  close: () => deskStep(10),
  // The engine's tickets: 0 none, 1 in the client's settings, 2 in other settings, 3 in settings 0; expiry 0 never, 1 already, 2 a few ms.
  tickets: (mode, expiry = 0) => deskStep(11, mode + 4 * expiry),
  closeLast: () => deskStep(12, 1),
};
// With a desk open, a CommandComplete takes one more byte: its tag (SELECT 1, SET, LISTEN, DISCARD ALL).
const TAG = { select: 0, set: 1 };
const deskAnswer = (...messages) => [op(4), 1, messages.length - 1, ...messages.flatMap(([type, arg]) => [ANSWER[type], ...(type === 'Z' ? [STATUS[arg ?? 'I']] : type === 'C' ? [TAG[arg ?? 'select']] : 'DNEA'.includes(type) ? [arg ?? 20] : [])])];
// Session mode on the desk (desk steps 13 to 15, see desk_step()): the pool's reset query, parks, takes and sweeps; a session's client; its connection and server.
const RESET_QUERY = { discardAll: 0, none: 1, twoCommands: 2, sync: 3 };
// A take's next byte: its relay (a greeting: none, a login's answer, raw bytes, or one larger than a socket takes; FIRST: the client's bytes read before), an untake, or a relay that fails.
// An untake first relays and untakes another ticket ((how >> 4) % (tickets + 1) + 1), which changes nothing.
const RELAY = { plain: 0, untake: 2, badFd: 3, hello: 1 << 2, bigHello: 3 << 2, FIRST: 0x40 };
// The server's answers to a reset (server_reset_answer): the kind's low 3 bits, a variant (8, 16), pieces ((kind >> 5 & 3) % 3 + 1), then a close (0x80).
const RESET = { plain: 0, parameterStatus: 1, error: 2, inTransaction: 3, readyAlone: 3 | (2 << 3), extraAfter: 4 | 8, shortLength: 5, oversize: 6 | 8, raw: 7, PIECES2: 1 << 5, PIECES3: 2 << 5, CLOSE: 0x80 };
const SWEEP = { ms0: 0, ms1: 1, ms5: 2, never: 3 };
const session = {
  resetQuery: (kind) => deskStep(13, 0 + 4 * kind),
  park: (sid = 1) => deskStep(13, 1 + 4 * sid), // the step's connection (the last opened), else the first the pool can lend
  // `more`: the bytes the relay reads (the greeting's, the client's first).
  take: (sid = 1, how = RELAY.hello, more = []) => [deskStep(13, 2 + 4 * sid), how, ...more],
  sweep: (t) => deskStep(13, 3 + 4 * t),
  // The session's client (`k`: among two open, 0 or 1).
  client: (action, k = 0) => deskStep(14, 2 * action + k),
  query: (text = TEXT.select1, k = 0) => [deskStep(14, 2 + k), text],
  send: (bytes, k = 0) => [deskStep(14, k), 0, bytes.length, ...bytes], // raw bytes
  message: (message, k = 0) => [deskStep(14, k), 5, ...message],
  read: (k = 0) => [deskStep(14, 6 + k), 0xff, 0xff],
  terminate: (then = null, k = 0) => [deskStep(14, 8 + k), then === null ? 0 : 1, ...(then === null ? [] : [then])],
  fin: (k = 0) => deskStep(14, 10 + k),
  close: (k = 0) => deskStep(14, 12 + k),
  // The caller on the session's connection: an idle timeout (detach), a close, its state.
  idleTimeout: (k = 0) => deskStep(15, 0 + 4 * k),
  closeConn: (k = 0) => deskStep(15, 1 + 4 * k),
  state: (k = 0) => deskStep(15, 2 + 4 * k),
  // The server of a connection whose reset runs (else the step's) answers it (`more`: the raw bytes, or the pieces' sizes as u16).
  resetAnswer: (kind, more = []) => [deskStep(15, 3), kind, ...more],
};
/** A session's Query reaches the server, and its answer the session's client. */
const sessionRoundTrip = (k = 0) => [session.query(TEXT.select1, k), step.loop(2), step.serverRead(), step.answer(), step.serverFlush(), step.loop(2), session.read(k)];
/** The session's client leaves with a Terminate; its reset query reaches the server. */
const sessionLeaves = [session.terminate(), step.loop(2), step.serverRead()];
/** The cooperating server answers the reset. */
const resetAnswered = [step.answer(), step.serverFlush(), step.loop(2), step.state()];

/** The server reads, answers every Query and Sync, and the answers reach the clients. */
const answerAll = [step.serverRead(), step.answer(), step.serverFlush(), step.loop(3), step.clientRead(), step.clientRead(65536, 1)];

/** The unit reaches the server and its answer the client. */
const roundTrip = [step.loop(2), step.lend(), step.loop(2), step.serverRead(), step.answer(), step.serverFlush(), step.loop(2), step.clientRead()];

const seeds = {
  'query-unit': [0, step.fast(), step.clientQuery(), ...roundTrip, step.state()],
  'extended-unit': [0, step.fast(), step.clientExtended(TEXT.select1, 4), ...roundTrip],
  // A SET is not the fast path's: the engine gets it, answers, and gives the client back to C.
  'non-fast-unit': [0, step.fast(), step.clientQuery(TEXT.set), step.loop(2), step.engineWrite(30), step.clientRead(), step.fast(), step.clientQuery(), ...roundTrip],
  'pipelined-pair': [0, step.fast(), step.clientQuery(TEXT.insertUpdate), step.clientExtended(TEXT.now, 0), ...roundTrip, step.loop(2), step.serverRead(), step.answer(),
    step.serverFlush(), step.loop(2), step.clientRead()],
  'client-eof-mid-unit': [0, step.fast(), step.clientCut(msg.query(TEXT.select1), 4), step.loop(2), step.clientFin(), step.loop(3)],
  'client-eof-mid-second-unit': [0, step.fast(), step.clientQuery(), step.loop(2), step.lend(), step.loop(), step.clientCut(msg.parse(TEXT.now), 2), step.clientFin(),
    step.loop(2), step.serverRead(), step.answer(), step.serverFlush(), step.loop(3)],
  'upstream-close-mid-answer': [0, step.fast(), step.clientQuery(), step.loop(2), step.lend(), step.loop(2), step.serverRead(), step.serverMessages(['D', 30]),
    step.serverCut(100), step.serverFlush(), step.loop(), step.serverClose(), step.loop(3), step.clientRead()],
  'upstream-reset-mid-answer': [TCP_UPSTREAM, step.fast(), step.clientQuery(), step.loop(2), step.lend(), step.loop(2), step.serverRead(), step.serverBigRow(40),
    step.serverFlush(20000), step.serverReset(), step.loop(3), step.clientRead()],
  // BEGIN answered in a transaction: the connection stays lent; a SET inside it hands the client and the connection over.
  'handover-in-transaction': [0, step.fast(), step.clientQuery(TEXT.begin), step.loop(2), step.lend(), step.loop(2), step.serverRead(),
    step.serverMessages(['C'], ['Z', 'T']), step.serverFlush(), step.loop(2), step.clientQuery(TEXT.set), step.loop(3), step.poolQuery(), step.loop(2), step.clientRead()],
  'parameter-status-reported': [0, step.fast(), step.clientExtended(TEXT.now, 16), ...roundTrip.slice(0, 4), step.serverMessages(['ParseComplete'], ['BindComplete'], ['S'], ['C']),
    step.answer(), step.serverFlush(), step.loop(3), step.clientRead()],
  'copy-in-upstream-gone': [0, step.fast(), step.clientQuery(), ...roundTrip.slice(0, 4), step.serverCopyIn(), step.serverFlush(), step.loop(3), step.clientRead()],
  // The need callback lends at once (REACT: the byte after the loop is its reaction).
  'attach-inside-need': [REACT, step.fast(), step.clientQuery(), step.loop(), 0, step.loop(), step.serverRead(), step.answer(), step.serverFlush(), step.loop(2), 9, step.clientRead()],
  'two-clients-one-connection': [TWO_CLIENTS, step.fast(0, 0), step.fast(0, 1), step.clientQuery(), [op(0, 1), 1, TEXT.now], step.loop(2), step.lend(), step.loop(2),
    step.serverRead(), step.answer(), step.serverFlush(), step.loop(3), step.lend(), step.loop(2), step.serverRead(), step.answer(), step.serverFlush(), step.loop(3),
    step.clientRead(), step.clientRead(65536, 1)],
  'second-connection': [0, step.openConnection(), step.openClient(), step.fast(0, 0), step.fast(0, 1), step.clientQuery(), [op(0, 1), 1, TEXT.commit], ...roundTrip, step.lend(),
    step.loop(2)],
  'backpressure-big-units': [SMALL_BUFFERS, step.fast(), step.clientBigQuery(128), step.clientBigQuery(128), step.clientBigQuery(100), step.loop(2), step.lend(),
    step.loop(3), step.clientFlush(65535), step.loop(3), step.serverRead(), step.loop(3), step.serverRead(), step.answer(), step.serverFlush(), step.loop(3)],
  'client-stops-reading-big-answer': [SMALL_BUFFERS, step.fast(), step.clientQuery(), ...roundTrip.slice(0, 4), step.serverBigRow(128), step.serverBigRow(128),
    step.serverBigRow(100), step.answer(), step.serverFlush(), step.loop(3), step.serverFlush(), step.loop(3), step.clientRead(1000), step.loop(3)],
  'engine-writes-client-slow': [SMALL_BUFFERS, step.engineWrite(40), step.engineWrite(230), step.engineWrite(255), step.loop(2), step.clientRead(), step.loop(2), step.clientRead(), step.loop(2)],
  'unread-bytes-lent': [0, step.serverMessages(['N', 10]), step.serverFlush(), step.loop(2), step.fast(), step.clientQuery(), ...roundTrip],
  'paused-pool-reader-then-lend': [0, step.poolPause(true), step.serverMessages(['N', 10]), step.serverFlush(), step.loop(2), step.fast(), step.clientQuery(), ...roundTrip],
  'huge-length-to-engine': [0, step.fast(), step.clientHugeLength(), step.loop(3), step.js()],
  'close-client-while-lent': [0, step.fast(), step.clientQuery(), ...roundTrip.slice(0, 4), step.engineClose(), step.loop(3)],
  'client-reset-while-lent': [TCP_CLIENT, step.fast(), step.clientQuery(), ...roundTrip.slice(0, 4), step.serverBigRow(64), step.serverFlush(), step.loop(), step.clientReset(),
    step.loop(3)],
  // The desk: a connection released cleanly goes to the client waiting on the desk (no room in the pool), with no call to the engine.
  'desk-hand-off-to-waiting': [TWO_CLIENTS, desk.open(), step.fast(0, 0), step.fast(0, 1), step.clientQuery(), step.loop(2), step.lend(), step.loop(2),
    [op(0, 1), 1, TEXT.now], step.loop(2), step.state(), ...answerAll, ...answerAll, step.state()],
  // Idle on the desk after its transaction; the client's next unit takes it there.
  'desk-idle-take': [0, desk.open(), step.fast(), step.clientQuery(), ...roundTrip, step.state(), step.clientQuery(TEXT.now), step.loop(2), ...answerAll, step.state()],
  // A second client in other settings does not get the first one's connection; it waits for the pool's.
  'desk-other-settings': [TWO_CLIENTS, desk.open(), desk.client(2), step.fast(0, 0), step.fast(0, 1), step.clientQuery(), ...roundTrip, [op(0, 1), 1, TEXT.select1], step.loop(2),
    desk.reclaimAny(), step.lend(), step.loop(2), ...answerAll],
  // The waiting client leaves the queue at the wait timeout (the first holds the connection in a transaction), with how long it waited.
  'desk-wait-timeout': [TWO_CLIENTS, desk.open(WAIT.ms1), step.fast(0, 0), step.fast(0, 1), step.clientQuery(), step.loop(2), step.lend(), step.loop(2),
    [op(0, 1), 1, TEXT.now], step.loop(2), step.state(), step.later(), step.later(), step.state(), ...answerAll],
  // Stopped: the idle connection comes out (reclaimed); going on, the next unit asks the pool.
  'desk-stop-go-on': [0, desk.open(), step.fast(), step.clientQuery(), ...roundTrip, desk.stop(), step.state(), desk.goOn(), step.clientQuery(), ...roundTrip, step.state()],
  // Closed while its connection is lent: it comes back with its id at the release.
  'desk-close-while-lent': [0, desk.open(), step.fast(), step.clientQuery(), step.loop(2), step.lend(), step.loop(2), desk.close(), ...answerAll],
  // The pool offers its second connection to the client waiting on the desk.
  'desk-offer': [TWO_CLIENTS, step.openConnection(), desk.open(), step.fast(0, 0), step.fast(0, 1), step.clientQuery(), step.loop(2), step.lend(), step.loop(2),
    [op(0, 1), 1, TEXT.now], step.loop(2), step.offer(1), step.loop(2), ...answerAll, step.state()],
  // The pool's own clients wait: a release goes back to the pool (`back` with the id), not to the desk.
  'desk-js-waiting': [0, desk.open(), step.fast(), desk.set(false, true), step.clientQuery(), ...roundTrip, step.state()],
  // Not clean: a ParameterStatus, or a SET's tag, sends the connection back to the pool.
  'desk-dirty-release': [0, desk.open(), step.fast(), step.clientQuery(), step.loop(2), step.lend(), step.loop(2), step.serverRead(), deskAnswer(['S'], ['C'], ['Z']),
    step.serverFlush(), step.loop(3), step.clientRead(), step.clientQuery(), step.loop(2), step.lend(), step.loop(2), step.serverRead(), deskAnswer(['C', 'set'], ['Z']),
    step.serverFlush(), step.loop(3), step.clientRead(), step.state()],
  // Idle on the desk, the server speaks: out (spoke), and the pool closes it.
  'desk-idle-spoke': [0, desk.open(), step.fast(), step.clientQuery(), ...roundTrip, step.serverMessages(['N', 10]), step.serverFlush(), step.loop(3), step.state()],
  // A check delay of 0: the idle connection is stale at the next unit (out), which asks the pool.
  'desk-stale': [0, desk.open(WAIT.ms8, CHECK.ms0), step.fast(), step.clientQuery(), ...roundTrip, step.clientQuery(), step.loop(2), step.lend(), step.loop(2), ...answerAll],
  // The pool reclaims the idle connection by its id, then asks for any.
  'desk-reclaim': [0, desk.open(), step.fast(), step.clientQuery(), ...roundTrip, desk.reclaim(0), desk.reclaimAny(), step.clientQuery(), step.loop(2), step.lend(), step.loop(2), ...answerAll],
  // Tickets that expire at once: released to the pool, never kept; and the desk closes after its clients.
  'desk-expired-close-last': [0, desk.open(), desk.closeLast(), desk.tickets(1, 1), step.fast(), step.clientQuery(), ...roundTrip, step.clientQuery(), ...roundTrip],
  // Three clients: 0 in settings 1, 1 and 2 in settings 2; client 2 waits on the desk for client 1's connection, and client 0's, released, is not for it.
  'desk-waiting-other-settings': [0, step.openClient(), step.openClient(), step.openConnection(), desk.open(), desk.client(2, 1), desk.client(2, 2),
    step.fast(0, 0), step.fast(0, 1), step.fast(0, 2), step.clientQuery(), step.loop(2), step.lend(), step.loop(2), [op(0, 1), 1, TEXT.now], step.loop(2), step.lend(), step.loop(2),
    [op(0, 2), 1, TEXT.select1], step.loop(2), step.state(), step.serverRead(), step.answer(), step.serverFlush(), step.loop(3), step.state()],
  // A client waiting on the desk put in other settings: it asks the pool (need, with how long it waited).
  'desk-moved-while-waiting': [TWO_CLIENTS, desk.open(), step.fast(0, 0), step.fast(0, 1), step.clientQuery(), step.loop(2), step.lend(), step.loop(2), [op(0, 1), 1, TEXT.now],
    step.loop(2), step.later(), desk.client(3), step.state(), ...answerAll],
  // Session mode: parked, taken for a session (greeted), a Query relayed, the client's Terminate, the reset answered plainly: idle on the desk again.
  'session-reset-clean': [0, desk.open(), session.park(), session.take(), ...sessionRoundTrip(), ...sessionLeaves, ...resetAnswered, session.take(1, RELAY.plain), ...sessionRoundTrip(1)],
  // The reset's answers that go to the pool (`reset`): a ParameterStatus, an error, a transaction, bytes after the ReadyForQuery, a length below 4, 70 KiB; then a ReadyForQuery alone.
  'session-reset-parameter-status': [0, desk.open(), session.park(), session.take(), ...sessionRoundTrip(), ...sessionLeaves, session.resetAnswer(RESET.parameterStatus), step.loop(2), step.state()],
  // The error in a read of its own: the answer waits for its ReadyForQuery.
  'session-reset-error': [0, desk.open(), session.park(), session.take(), ...sessionLeaves, session.resetAnswer(RESET.error | RESET.PIECES2, [0, 23]), step.loop(2), step.state()],
  'session-reset-in-transaction': [0, desk.open(), session.park(), session.take(), ...sessionLeaves, session.resetAnswer(RESET.inTransaction), step.loop(2)],
  'session-reset-extra-after-ready': [0, desk.open(), session.park(), session.take(), ...sessionLeaves, session.resetAnswer(RESET.extraAfter), step.loop(2)],
  'session-reset-short-length': [0, desk.open(), session.park(), session.take(), ...sessionLeaves, session.resetAnswer(RESET.shortLength), step.loop(2)],
  'session-reset-oversize': [0, desk.open(), session.park(), session.take(), ...sessionLeaves, session.resetAnswer(RESET.oversize), step.loop(3)],
  // A ReadyForQuery alone (no CommandComplete) is no plain answer: to the pool (`reset`), which reads it.
  'session-reset-ready-alone': [0, desk.open(), session.park(), session.take(), ...sessionLeaves, session.resetAnswer(RESET.readyAlone), step.loop(2), step.state()],
  // A plain answer in three writes (each read apart), then the server closes: idle, then out (ended).
  'session-reset-split-then-close': [0, desk.open(), session.park(), session.take(), ...sessionLeaves, session.resetAnswer(RESET.plain | RESET.PIECES3 | RESET.CLOSE, [0, 3, 0, 9]),
    step.loop(3), step.state()],
  // The client leaves in the middle of a Query's answer (a FIN): back to the pool, abandoned; in a transaction: back, and the pool rolls it back.
  'session-client-eof-mid-query': [0, desk.open(), session.park(), session.take(), session.query(), step.loop(2), step.serverRead(), step.serverMessages(['D', 30]), step.serverFlush(),
    step.loop(2), session.fin(), step.loop(3), step.state()],
  'session-transaction-left-open': [0, desk.open(), session.park(), session.take(), session.query(TEXT.begin), step.loop(2), step.serverRead(), deskAnswer(['C'], ['Z', 'T']),
    step.serverFlush(), step.loop(2), session.read(), ...sessionLeaves, step.answer(), step.serverFlush(), step.loop(2), step.state()],
  // A client cut off in the middle of a message: its bytes are not whole, back to the pool.
  'session-client-cut-message': [0, desk.open(), session.park(), session.take(), session.send([0x51, 0, 0, 0, 20, 0x53]), step.loop(2), session.close(), step.loop(3)],
  // The server goes between two messages: the session's client gets the farewell, the session ends with its connection.
  'session-upstream-close': [0, desk.open(), session.park(), session.take(), ...sessionRoundTrip(), step.serverClose(), step.loop(3), session.read(), step.loop(2)],
  // The reset is never answered: the sweep ends it (`reset` with no answer).
  'session-sweep': [0, desk.open(), session.park(), session.take(), ...sessionLeaves, session.sweep(SWEEP.never), step.later(), session.sweep(SWEEP.ms0), step.loop(2), step.state()],
  // The desk closes while the reset runs: clean, the connection goes out (released).
  'session-desk-closed-during-reset': [0, desk.open(), session.park(), session.take(), ...sessionRoundTrip(), ...sessionLeaves, desk.close(), ...resetAnswered],
  // The pool's clients wait (js_waiting): a clean session's connection goes back to the pool.
  'session-js-waiting': [0, desk.open(), session.park(), session.take(), desk.set(false, true), ...sessionRoundTrip(), ...sessionLeaves, step.state()],
  // The caller ends a session: an idle timeout (the client goes, the connection is reset), or a close (it ends).
  'session-idle-timeout': [0, desk.open(), session.park(), session.take(), ...sessionRoundTrip(), session.idleTimeout(), step.loop(2), step.serverRead(), ...resetAnswered, session.read()],
  'session-close': [0, desk.open(), session.park(), session.take(), session.query(), step.loop(2), session.closeConn(), step.loop(3), session.read()],
  // No reset query: idle at once; a transaction client waiting on the desk gets the session's connection after its reset.
  'session-no-reset-query': [0, desk.open(), session.resetQuery(RESET_QUERY.none), session.park(), session.take(), ...sessionRoundTrip(), ...sessionLeaves, session.take(1, RELAY.plain),
    ...sessionRoundTrip(1)],
  'session-then-waiting-client': [0, desk.open(), session.park(), session.take(), step.fast(), step.clientQuery(), step.loop(2), step.state(), ...sessionLeaves, ...resetAnswered,
    step.serverRead(), step.answer(), step.serverFlush(), step.loop(2), step.clientRead(), step.state()],
  // Untaken; a relay that cannot start (untaken); settings with no connection; a stale one (check delay 0) goes out.
  'session-untake-refused-stale': [0, desk.open(), session.park(), session.take(1, RELAY.untake), session.take(1, RELAY.badFd), session.take(2), desk.config(WAIT.ms8, CHECK.ms0),
    session.take(1), step.state()],
  // The client's first bytes end with a Terminate: the session ends inside the relay's start.
  'session-first-terminate': [0, desk.open(), session.park(), session.take(1, RELAY.hello | RELAY.FIRST, [5, ...msg.terminate()]), step.loop(2), step.serverRead(), ...resetAnswered],
  // A greeting larger than the socket takes, a client that reads slowly; two sessions on two connections.
  'session-big-hello-two': [SMALL_BUFFERS, step.openConnection(), desk.open(), session.park(1), session.park(2), session.take(1, RELAY.bigHello, [100]), session.take(2), step.loop(2),
    session.read(), step.loop(2), session.read(), session.query(TEXT.now, 1), step.loop(2), step.serverRead(), step.answer(), step.serverFlush(), step.loop(2), session.read(1),
    session.terminate(TEXT.select1, 1), step.loop(2), session.close(), step.loop(3)],
  // A Sync for a reset query (the server answers it as a Query); the client leaves by a close, between two messages.
  'session-reset-sync-query': [0, desk.open(), session.resetQuery(RESET_QUERY.sync), session.park(), session.take(), ...sessionRoundTrip(), session.close(), step.loop(2), step.serverRead(),
    ...resetAnswered],
  // Reactions (REACT: the byte after a loop is the reaction of the callback in it): the sweep inside a session's end ends its reset at once (then the pool closes it);
  // the desk closed inside another's end (its reset answered: out, released).
  'session-react-inside-end': [REACT, desk.open(), session.park(), session.take(), session.terminate(), step.loop(), 0, 1, session.take(), step.state(), step.openConnection(),
    session.park(), session.take(), session.terminate(null, 1), step.loop(), 1, step.serverRead(), ...resetAnswered],
  'tls12-end-clients': [TLS12 | END_CLIENTS, step.fast(), step.clientExtended(TEXT.select1, 16), ...roundTrip],
  // Raw: the first half of the bytes is the unit, the second what comes behind it.
  'pure-raw-query': [PURE, 0, 0x51, 0, 0, 0, 13, ...Buffer.from('SELECT 1\0'), 0x53, 0, 0, 0, 4, ...Buffer.from('garbage\0\0')],
  // Built: a count of messages (less one), the messages, a count of bytes behind them, the bytes.
  'pure-built-extended': [PURE, 4, 4, ...msg.parse(TEXT.select1), ...msg.bind(), ...msg.describe(false), ...msg.execute(), ...msg.sync(), 3, 1, 2, 3],
  'pure-built-close': [PURE, 4 | 3, 1, ...msg.close(), ...msg.sync(), 0],
  'pure-limit': [PURE, 4 | (6 << 3), 0, ...msg.query(TEXT.insertUpdate), 0, 0, 40],
};

mkdirSync(corpus, { recursive: true });
for (const [name, parts] of Object.entries(seeds)) writeFileSync(join(corpus, `seed-${name}`), Buffer.from(parts.flat(2)));
console.log(`${Object.keys(seeds).length} seeds in ${corpus}`);
