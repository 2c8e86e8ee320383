/**
 * Review 2, the deterministic form of pool-transaction-desk-review2-gone-named: a client reset
 * while the engine holds its frames (not read: a Flush behind its DISCARD ALL waits for that
 * answer) is told so inside NativeClient.write(): lp_client_write -> to_client's failed send ->
 * client_ended -> the `data` callback, synchronously. Its session ends there (#clientGone ->
 * #detach -> Pool.giveBack), and the pool hands the connection to the client waiting for it
 * (Pool.lendTo's waiter -> #landFast -> #use, which resumes the upstream), all before write()
 * returns false; then #flush pauses `server`, read before the write: the waiting client's
 * connection now. That client never gets its answer, and the connection is held for good.
 * The server's answer is held back by a forwarder until the reset client is gone.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { createServer, connect as netConnect, type Socket } from 'node:net';
import type { TestPostgres } from './harness/postgres.js';
import { startTokenPostgres } from './harness/postgres.js';
import { startProxy } from './harness/proxy.js';
import { sleep, waitUntil } from './reliability-support.js';
import { serialize, summary } from './harness/wire.js';
import { ask, wireOpen, deskSkip } from './pool-transaction-desk-review-support.js';

let db: TestPostgres;
const token = 'tok-' + randomBytes(600).toString('base64url');
before(async () => {
  db = await startTokenPostgres(token);
});
after(() => db?.stop());

/** A TCP forwarder to Postgres whose server-to-proxy direction can be held (what comes meanwhile goes at release, in one write). */
async function gatedForwarder(port: number): Promise<{ port: number; hold(): void; release(): void; close(): Promise<void> }> {
  const sockets = new Set<Socket>();
  const gates: Array<{ held: Buffer[]; holding: boolean; front: Socket }> = [];
  let holding = false;
  const server = createServer((front) => {
    const back = netConnect({ host: '127.0.0.1', port });
    sockets.add(front).add(back);
    const gate = { held: [] as Buffer[], holding, front };
    gates.push(gate);
    front.on('error', () => back.destroy());
    back.on('error', () => front.destroy());
    front.on('close', () => back.destroy());
    back.on('close', () => front.destroy());
    front.pipe(back);
    back.on('data', (chunk: Buffer) => (gate.holding ? gate.held.push(chunk) : front.write(chunk)));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', () => resolve()));
  return {
    port: (server.address() as { port: number }).port,
    hold() {
      holding = true;
      for (const g of gates) g.holding = true;
    },
    release() {
      holding = false;
      for (const g of gates) {
        g.holding = false;
        if (g.held.length > 0) g.front.write(Buffer.concat(g.held.splice(0)));
      }
    },
    async close() {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

test('a client reset while the engine holds its frames does not stall the client its connection goes to', { skip: deskSkip }, async () => {
  const forwarder = await gatedForwarder(db.port);
  const connection = `Server=localhost;Port=${forwarder.port};User=${db.tokenRole};SSLRootCert=${db.ca.caFile};OAuthAccessToken=${token};Database=${db.database};PoolMode=transaction;PoolSize=1;QueryWaitTimeout=60s`;
  const proxy = await startProxy(['--connection', connection]);
  const x = await wireOpen(proxy.port, db);
  const y = await wireOpen(proxy.port, db);
  try {
    const pool = proxy.server.pools.get(db.database);
    assert.ok(pool);
    // y: a statement of its own on the pool's one connection, then the fast path.
    y.send(serialize.parse({ name: 's1', text: "select 'y'::text as v" }), serialize.sync());
    assert.deepEqual((await y.untilReady(1)).map(summary), ['parseComplete', 'ready I']);
    await ask(y, 'select 1');

    forwarder.hold();
    // x: the engine's; its Flush waits behind the DISCARD ALL (x's socket is not read meanwhile).
    x.send(serialize.query('discard all'), serialize.flush());
    await waitUntil(() => pool.stats.active === 1, 5000, 'precondition: x holds the connection');
    // y: a unit naming s1 waits for the connection (the DISCARD ALL drops s1 there: the engine takes y's transaction).
    y.send(serialize.bind({ statement: 's1', values: [] }), serialize.execute({}), serialize.sync());
    await waitUntil(() => pool.stats.waiting === 1, 5000, 'precondition: y waits for the connection');
    x.socket.resetAndDestroy();
    await sleep(300);
    forwarder.release();

    const got = (await y.untilReady(1, 15_000)).map(summary);
    assert.deepEqual(got, ['bindComplete', 'row ["y"]', 'complete SELECT 1', 'ready I']);
  } finally {
    y.end();
    await proxy.close().catch(() => {});
    await forwarder.close();
  }
});
