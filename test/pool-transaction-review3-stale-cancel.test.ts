/**
 * Review of 0259669 (cancels the server does not confirm close their connection): a cancel on its
 * way to a connection that #detach closes (Postgres spoiled the session: an Execute, then a Query,
 * before the Sync) stays in #cancelling, and the client's next connection waits for it at its
 * own give-back, and is closed when that cancel was not confirmed: the next client (or the same
 * one) cannot reuse a connection no cancel went to.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import type { TestPostgres } from './harness/postgres.js';
import { startTokenPostgres } from './harness/postgres.js';
import { startProxy } from './harness/proxy.js';
import { cancelRequest, waitUntil } from './reliability-support.js';
import { serialize } from './harness/wire.js';
import { createServer, connect as netConnect, type Socket } from 'node:net';
import { ask, firstValue, lockGate, waitsOnLock, wireOpen } from './pool-transaction-desk-review-support.js';

let db: TestPostgres;
const token = 'tok-' + randomBytes(600).toString('base64url');

before(async () => {
  db = await startTokenPostgres(token);
  await db.query(`create table stale_cancel_gate (); grant select on stale_cancel_gate to "${db.tokenRole}"`);
});
after(() => db?.stop());

/**
 * A forwarder to the test server; once `mute()` was called, a new connection never passes the
 * server's end or close on, nor its bytes once the proxy ended its side: a server that never says
 * it took a CancelRequest.
 */
async function startMutingForwarder(port: number): Promise<{ port: number; mute(): void; close(): Promise<void> }> {
  const sockets = new Set<Socket>();
  let muting = false;
  const server = createServer({ allowHalfOpen: true }, (front) => {
    const muted = muting;
    const back = netConnect({ host: '127.0.0.1', port, allowHalfOpen: true });
    for (const s of [front, back]) {
      sockets.add(s);
      s.on('error', () => {});
      s.once('close', () => sockets.delete(s));
    }
    front.pipe(back);
    back.pipe(front, { end: !muted });
    if (muted) {
      // The server's answer to the proxy's end (its close_notify) stays here.
      front.once('end', () => {
        back.unpipe(front);
        back.resume();
      });
    } else {
      back.once('close', () => front.destroy());
    }
    front.once('close', () => back.destroy());
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', () => resolve()));
  return {
    port: (server.address() as { port: number }).port,
    mute: () => void (muting = true),
    async close() {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

test('a cancel that went to a connection closed since does not close the client\'s next connection', async () => {
  const forwarder = await startMutingForwarder(db.port);
  const connection = `Server=localhost;Port=${forwarder.port};User=${db.tokenRole};SSLRootCert=${db.ca.caFile};OAuthAccessToken=${token};Database=${db.database};PoolMode=transaction;PoolSize=1;QueryWaitTimeout=60s;ConnectTimeout=3s`;
  const proxy = await startProxy(['--connection', connection]);
  const a = await wireOpen(proxy.port, db);
  const gate = await lockGate(db, 'stale_cancel_gate');
  try {
    await ask(a, 'select 1');
    const first = firstValue(await ask(a, 'select pg_backend_pid()'));
    // A named statement: the engine carries the sequence. An Execute, then a Query, before the
    // Sync: Postgres spoils the session (#spoiled), and #detach closes the connection.
    a.send(
      serialize.parse({ name: 'gated', text: 'select count(*) from stale_cancel_gate' }),
      serialize.bind({ statement: 'gated' }),
      serialize.execute({}),
      serialize.query('select 1'),
    );
    await waitUntil(() => waitsOnLock(db, 'stale_cancel_gate'), 10_000, "a's query runs (precondition)");
    // The request reaches the server, its close never reaches the proxy: sendCancel resolves false.
    forwarder.mute();
    void cancelRequest(proxy.port, a.processId, a.secretKey);
    a.send(serialize.sync());
    const spoiled = await a.untilReady(1, 30_000);
    assert.ok(spoiled.some((m) => m.name === 'error'), "a's query was cancelled (precondition)");
    await waitUntil(async () => (await db.query('select 1 from pg_stat_activity where pid = $1', [Number(first)])).length === 0, 10_000, 'the spoiled connection was closed (precondition)');

    // A new connection, no cancel ever went to it: it goes back, and a's next transaction finds it
    // again. (A named statement: the engine gives it back, not the desk in C.)
    a.send(serialize.parse({ name: 'pid', text: 'select pg_backend_pid()' }), serialize.bind({ statement: 'pid' }), serialize.execute({}), serialize.sync());
    const second = firstValue(await a.untilReady(1, 30_000));
    const third = firstValue(await ask(a, 'select pg_backend_pid()'));
    assert.match(String(second), /^\d+$/);
    assert.equal(third, second, 'the connection no cancel went to was closed after its transaction (the stale cancel of the closed one decided)');
  } finally {
    await gate.close();
    a.socket.destroy();
    await proxy.close();
    await forwarder.close();
  }
});
