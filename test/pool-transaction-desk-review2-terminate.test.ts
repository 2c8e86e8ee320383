/**
 * Desk review 2: a client that sends a Terminate while its unit waits on the desk. Gone at once
 * (Terminate, FIN): it leaves the desk's queue and takes nothing. Still there (Terminate, no FIN):
 * its unit runs on the desk's connection when one comes free, and the Terminate after it ends the
 * session; the connection stays the desk's for the next client.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import type { TestPostgres } from './harness/postgres.js';
import { startTokenPostgres } from './harness/postgres.js';
import { withPoolMode } from './pool-transaction-support.js';
import { waitUntil } from './reliability-support.js';
import { serialize, summary } from './harness/wire.js';
import { ask, deskStats, firstValue, wireOpen, deskSkip } from './pool-transaction-desk-review-support.js';

let db: TestPostgres;
const token = 'tok-' + randomBytes(600).toString('base64url');
before(async () => {
  db = await startTokenPostgres(token);
});
after(() => db?.stop());

test('a Terminate behind a unit waiting on the desk', { skip: deskSkip }, async () => {
  await withPoolMode(db, token, 'transaction', 'PoolSize=1;QueryWaitTimeout=60s', async (proxy) => {
    const a = await wireOpen(proxy.port, db);
    const gone = await wireOpen(proxy.port, db);
    const stays = await wireOpen(proxy.port, db);
    try {
      for (const w of [a, gone, stays]) await ask(w, 'select 1');
      await ask(a, 'select 1');
      await ask(a, 'select 1');
      await ask(a, 'begin');
      assert.deepEqual({ count: deskStats(proxy, db)?.count, idle: deskStats(proxy, db)?.idle }, { count: 1, idle: 0 }, 'precondition: the desk connection lent to a');

      gone.send(serialize.query("select 'gone' as v"));
      await waitUntil(() => deskStats(proxy, db)?.waiting === 1, 5000, 'precondition: waits on the desk');
      gone.socket.end(serialize.end());
      await waitUntil(() => deskStats(proxy, db)?.waiting === 0, 5000, 'the client gone left the queue');

      stays.send(serialize.query("select 'stays' as v"), serialize.end());
      await waitUntil(() => deskStats(proxy, db)?.waiting === 1, 5000, 'precondition: waits on the desk');
      const answer = stays.untilReady(1, 30_000);
      await ask(a, 'commit');
      assert.deepEqual((await answer).map(summary).filter((s) => s !== 'parameterStatus'), ['rowDescription', 'row ["stays"]', 'complete SELECT 1', 'ready I']);
      await waitUntil(() => stays.closed, 10_000, 'the Terminate ended the session');
      await waitUntil(() => deskStats(proxy, db)?.idle === 1, 5000, 'the connection idle on the desk');
      assert.equal(firstValue(await ask(a, "select 'after' as v")), 'after');
      const pool = proxy.server.pools.get(db.database);
      assert.equal(pool?.size, 1);
    } finally {
      a.end();
      stays.end();
    }
  });
});
