/**
 * Desk review: a client queues on the desk (desk_queue) when the pool has "no room" and a desk
 * connection of its settings exists, even one lent for a long transaction. The desk's own idle
 * connections of OTHER settings are not room (Pool.#sync counts the pool's idle list and logins
 * only), although the pool would hand one over at once (#takeIdle: reclaimAny, then a settings
 * query). The client waits for QueryWaitTimeout with an idle connection there for it.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import type { TestPostgres } from './harness/postgres.js';
import { startTokenPostgres } from './harness/postgres.js';
import { withPoolMode } from './pool-transaction-support.js';
import { waitUntil } from './reliability-support.js';
import { serialize } from './harness/wire.js';
import { ask, deskStats, firstValue, wireOpen, deskSkip } from './pool-transaction-desk-review-support.js';

let db: TestPostgres;
const token = 'tok-' + randomBytes(600).toString('base64url');

before(async () => {
  db = await startTokenPostgres(token);
});
after(() => db?.stop());

test('a client does not wait on the desk while a desk connection of other settings sits idle', { skip: deskSkip }, async () => {
  await withPoolMode(db, token, 'transaction', 'PoolSize=2;QueryWaitTimeout=60s', async (proxy) => {
    const a = await wireOpen(proxy.port, db);
    const b = await wireOpen(proxy.port, db);
    const c = await wireOpen(proxy.port, db, { application_name: 'desk_review_y' }); // reported: another shared map, another settings id
    try {
      await ask(a, 'select 1');
      await ask(b, 'select 1');
      await ask(c, 'select 1');
      // a: a desk connection in the default settings, held inside a transaction.
      await ask(a, 'select 1');
      await ask(a, 'select 1');
      await ask(a, 'begin');
      // c: the other connection, on the desk in c's settings, idle.
      await ask(c, 'select 1');
      await ask(c, 'select 1');
      await ask(c, 'select 1');
      const pool = proxy.server.pools.get(db.database);
      assert.ok(pool);
      assert.deepEqual(deskStats(proxy, db) && { count: deskStats(proxy, db)?.count, idle: deskStats(proxy, db)?.idle }, { count: 2, idle: 1 }, 'precondition: a lent and an idle desk connection');
      assert.equal(pool.size, 2, 'precondition: the pool is full');

      b.send(serialize.query("select 'b' as v"));
      let bAnswered = false;
      const bDone = b.untilReady(1, 90_000).then((m) => {
        bAnswered = true;
        return m;
      });
      await waitUntil(() => bAnswered, 15_000, 'b answered').catch(() => {});
      const answeredBeforeCommit = bAnswered;
      const waitedOnDesk = deskStats(proxy, db)?.waiting;
      await ask(a, 'commit');
      assert.equal(firstValue(await bDone), 'b');
      assert.ok(answeredBeforeCommit, `b waited (on the desk: ${String(waitedOnDesk)}) for a's connection while c's sat idle on the desk`);
    } finally {
      a.end();
      b.end();
      c.end();
    }
  });
});
