/**
 * Desk review: first come, first served across the two queues. A client that waits on the desk
 * (its settings shared) came before one that waits in JavaScript (a startup setting the server
 * does not report keeps it off the desk); the connection released next goes back to JavaScript
 * (desk_keeps: js_waiting), to the later client, while the earlier one goes on waiting. Under a
 * steady stream of such clients the desk's waiters are served last, or refused by QueryWaitTimeout.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import type { TestPostgres } from './harness/postgres.js';
import { startTokenPostgres } from './harness/postgres.js';
import { withPoolMode } from './pool-transaction-support.js';
import { sleep, waitUntil } from './reliability-support.js';
import { serialize } from './harness/wire.js';
import { ask, deskStats, firstValue, wireOpen, deskSkip } from './pool-transaction-desk-review-support.js';

let db: TestPostgres;
const token = 'tok-' + randomBytes(600).toString('base64url');

before(async () => {
  db = await startTokenPostgres(token);
});
after(() => db?.stop());

test('the client that waited first (on the desk) is served before one that came later (in JavaScript)', { skip: deskSkip }, async () => {
  await withPoolMode(db, token, 'transaction', 'PoolSize=1;QueryWaitTimeout=60s', async (proxy) => {
    const a = await wireOpen(proxy.port, db);
    const b = await wireOpen(proxy.port, db);
    const c = await wireOpen(proxy.port, db, { options: '-c work_mem=5MB' });
    try {
      // c first: its startup setting lands on the connection, which joins the desk only at a's second transaction.
      await ask(c, 'select 1');
      await ask(a, 'select 1');
      await ask(b, 'select 1');
      await ask(a, 'select 1');
      await ask(a, 'begin'); // the only connection, on the desk, held by a
      assert.equal(deskStats(proxy, db)?.count, 1, 'the connection is on the desk (precondition)');
      const order: string[] = [];
      b.send(serialize.query("select 'b', pg_sleep(0.5)"));
      const bDone = b.untilReady(1, 90_000).then((m) => (order.push('b'), m));
      await waitUntil(() => deskStats(proxy, db)?.waiting === 1, 5000, 'b waits on the desk (precondition)');
      await sleep(50);
      c.send(serialize.query("select 'c', pg_sleep(0.5)"));
      const cDone = c.untilReady(1, 90_000).then((m) => (order.push('c'), m));
      await waitUntil(() => proxy.server.pools.get(db.database)?.stats.waiting === 2, 5000, 'c waits in the pool (precondition)');
      await ask(a, 'commit');
      assert.equal(firstValue(await bDone), 'b');
      assert.equal(firstValue(await cDone), 'c');
      assert.deepEqual(order, ['b', 'c'], 'the client that waited first was served second');
    } finally {
      a.end();
      b.end();
      c.end();
    }
  });
});
