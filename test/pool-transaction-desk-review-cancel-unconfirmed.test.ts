/**
 * Desk review: a CancelRequest whose connection the server does not close within ConnectTimeout.
 * The proxy cannot tell whether it arrived, so the server connection it went for is closed rather
 * than given to the next client, where the request could still land (sendCancel resolves false;
 * TransactionSession.#giveBackAfterCancel). On the desk, and in the engine without the fast path.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import type { TestPostgres } from './harness/postgres.js';
import { startTokenPostgres } from './harness/postgres.js';
import { startProxy } from './harness/proxy.js';
import { cancelRequest, waitUntil } from './reliability-support.js';
import { serialize } from './harness/wire.js';
import { ask, deskSkip, deskStats, firstValue, lockGate, startHoldingForwarder, waitsOnLock, wireOpen } from './pool-transaction-desk-review-support.js';

let db: TestPostgres;
const token = 'tok-' + randomBytes(600).toString('base64url');

before(async () => {
  db = await startTokenPostgres(token);
  await db.query(`create table cancel_gate_a (); grant select on cancel_gate_a to "${db.tokenRole}"`);
});
after(() => db?.stop());

test('a connection whose CancelRequest the server did not confirm is closed, not handed to the next client', async () => {
  const forwarder = await startHoldingForwarder(db);
  const connection = `Server=localhost;Port=${forwarder.port};User=${db.tokenRole};SSLRootCert=${db.ca.caFile};OAuthAccessToken=${token};Database=${db.database};PoolMode=transaction;PoolSize=1;QueryWaitTimeout=60s;ConnectTimeout=3s`;
  const proxy = await startProxy(['--connection', connection]);
  const a = await wireOpen(proxy.port, db);
  const b = await wireOpen(proxy.port, db);
  const gate = await lockGate(db, 'cancel_gate_a');
  try {
    await ask(a, 'select 1');
    await ask(b, 'select 1');
    const first = firstValue(await ask(a, 'select pg_backend_pid()')); // the pool's only connection
    if (!deskSkip) await waitUntil(() => deskStats(proxy, db)?.count === 1, 5000, 'the connection on the desk (precondition)');

    a.send(serialize.query('select count(*) from cancel_gate_a'));
    const aDone = a.untilReady(1, 30_000);
    await waitUntil(() => waitsOnLock(db, 'cancel_gate_a'), 10_000, "a's query runs (precondition)");
    b.send(serialize.query('select pg_backend_pid()'));
    const bDone = b.untilReady(1, 60_000);
    await waitUntil(() => proxy.server.pools.get(db.database)?.stats.waiting === 1, 10_000, 'b waits for the connection (precondition)');

    // The CancelRequest reaches the server (it cancels a's query), but the server's close never reaches the proxy.
    forwarder.mute();
    void cancelRequest(proxy.port, a.processId, a.secretKey);
    assert.match(String(firstValue(await aDone)), /^error 57014/, "a's query was cancelled: the request arrived");

    const second = firstValue(await bDone);
    assert.match(String(second), /^\d+$/, `b's query ran: ${String(second)}`);
    assert.notEqual(second, first, "b ran on the connection whose cancel the server did not confirm");
    await waitUntil(async () => (await db.query('select 1 from pg_stat_activity where pid = $1', [Number(first)])).length === 0, 10_000, 'the connection was closed');
  } finally {
    await gate.close();
    a.socket.destroy();
    b.socket.destroy();
    await proxy.close();
    await forwarder.close();
  }
});
