/**
 * Desk review: a CancelRequest on its way to a desk connection. The engine gives a connection
 * back only once the server closed the connection of a cancel sent for its client
 * (TransactionSession.#giveBackAfterCancel): a transaction released on the desk does not go to the
 * next client in C while such a cancel is on its way.
 *
 * Why the server's close is enough: Postgres signals the backend before it closes the cancel
 * connection, and a signal taken while the backend waits for a command is dropped (PostgresMain
 * checks for interrupts before it leaves DoingCommandRead). So the test checks, in the server's
 * log, that b's statement came after the signal (the forwarder cannot see the close itself: the
 * server says it first with a TLS close_notify, to the forwarder mere bytes). The forwarder passes
 * half-closes on as they are: one that ended the proxy's side as soon as the proxy ended its own
 * told the proxy the cancel had arrived before the server read it, and b's query was cancelled now
 * and then on a loaded machine.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import type { TestPostgres } from './harness/postgres.js';
import { startTokenPostgres } from './harness/postgres.js';
import { startProxy } from './harness/proxy.js';
import { cancelRequest, waitUntil } from './reliability-support.js';
import { serialize } from './harness/wire.js';
import { ask, deskStats, firstValue, lockGate, startHoldingForwarder, waitsOnLock, wireOpen, deskSkip } from './pool-transaction-desk-review-support.js';

let db: TestPostgres;
const token = 'tok-' + randomBytes(600).toString('base64url');

before(async () => {
  // The cancel's signal (DEBUG2, logged just before it is sent) and the statements, in the order they happened.
  db = await startTokenPostgres(token, { extraConf: { log_min_messages: 'debug2', log_statement: 'all' } });
  // Each client's query waits on its own table's lock until the test lets it go: no sleeps to outlast.
  await db.query(`create table cancel_gate_a (); create table cancel_gate_b (); grant select on cancel_gate_a, cancel_gate_b to "${db.tokenRole}"`);
});
after(() => db?.stop());

test("a client's cancel still on its way does not cancel the query of the next client the desk hands its connection to", { skip: deskSkip }, async () => {
  const forwarder = await startHoldingForwarder(db);
  const connection = `Server=localhost;Port=${forwarder.port};User=${db.tokenRole};SSLRootCert=${db.ca.caFile};OAuthAccessToken=${token};Database=${db.database};PoolMode=transaction;PoolSize=1;QueryWaitTimeout=60s`;
  const proxy = await startProxy(['--connection', connection]);
  const a = await wireOpen(proxy.port, db);
  const b = await wireOpen(proxy.port, db);
  const gateA = await lockGate(db, 'cancel_gate_a');
  const gateB = await lockGate(db, 'cancel_gate_b');
  try {
    await ask(a, 'select 1');
    await ask(b, 'select 1');
    await ask(a, 'select 1'); // the fast path: the only connection joins the desk
    await waitUntil(() => deskStats(proxy, db)?.count === 1, 5000, 'the connection on the desk (precondition)');
    const backend = firstValue(await ask(a, 'select pg_backend_pid()'));

    a.send(serialize.query('select count(*) from cancel_gate_a'));
    const aDone = a.untilReady(1, 30_000);
    await waitUntil(() => waitsOnLock(db, 'cancel_gate_a'), 10_000, "a's query runs (precondition)");
    // b waits on the desk for a's connection.
    b.send(serialize.query("select 'desk-review-b' as marker, count(*) from cancel_gate_b"));
    let bAnswered = false;
    const bDone = b.untilReady(1, 60_000).finally(() => (bAnswered = true));
    await waitUntil(() => deskStats(proxy, db)?.waiting === 1, 5000, 'b waits on the desk (precondition)');

    // a's cancel: the proxy opens a new connection to the server for it, held here.
    forwarder.hold();
    void cancelRequest(proxy.port, a.processId, a.secretKey);
    await waitUntil(() => forwarder.held === 1, 5000, 'the proxy sent the cancel (precondition)');
    await gateA.open();
    const aAnswer = await aDone;
    assert.ok(!aAnswer.some((m) => m.name === 'error'), 'a finished before its cancel arrived');

    forwarder.release();
    const signalled = `processing cancel request: sending SIGINT to process ${String(backend)}`;
    await waitUntil(() => readFileSync(db.logFile, 'utf8').includes(signalled), 20_000, 'the server signalled the backend');
    // b's query waits on its lock until the test opens it: a cancel that reached it would fail it.
    await waitUntil(async () => bAnswered || (await waitsOnLock(db, 'cancel_gate_b')), 20_000, "b's query runs once the cancel arrived");
    await gateB.open();
    const got = firstValue(await bDone);

    const log = readFileSync(db.logFile, 'utf8');
    const bStarted = log.indexOf("statement: select 'desk-review-b'");
    assert.ok(bStarted >= 0, "b's statement is in the server's log");
    assert.ok(log.indexOf(signalled) < bStarted, "b's statement reached the backend before a's cancel was signalled: the desk's connection was handed on too early");
    assert.equal(got, 'desk-review-b', `b's query was cancelled by a's CancelRequest: ${String(got)}`);
  } finally {
    forwarder.release();
    await gateA.close();
    await gateB.close();
    a.socket.destroy();
    b.socket.destroy();
    await proxy.close();
    await forwarder.close();
  }
});
