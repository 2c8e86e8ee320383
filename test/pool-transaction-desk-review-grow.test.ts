/**
 * Desk review: a reload that makes the pool larger (Pool.update) wakes the clients waiting in
 * JavaScript (#wakeAll) but not those waiting on the desk (native/txclient.c, desk_queue): they go
 * on waiting for a connection of the desk although the pool has room for a login now, until that
 * connection is released or QueryWaitTimeout sends them to the pool.
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

test('a client waiting on the desk gets a login once a reload makes room in the pool', { skip: deskSkip }, async () => {
  await withPoolMode(db, token, 'transaction', 'PoolSize=1;QueryWaitTimeout=60s', async (proxy) => {
    const a = await wireOpen(proxy.port, db);
    const b = await wireOpen(proxy.port, db);
    try {
      await ask(a, 'select 1');
      await ask(b, 'select 1');
      await ask(a, 'begin'); // a holds the only connection, a desk one
      b.send(serialize.query("select 'b' as v"));
      let bAnswered = false;
      const bDone = b.untilReady(1, 90_000).then((m) => {
        bAnswered = true;
        return m;
      });
      await waitUntil(() => deskStats(proxy, db)?.waiting === 1, 5000, 'b waits on the desk (precondition)');

      const pool = proxy.server.pools.get(db.database);
      assert.ok(pool);
      pool.update({ ...pool.settings, size: 2 }); // what a reload of PoolSize=2 does (ProxyServer.reload)

      // Room for a login: b is answered while a still holds its transaction (the commit waits for b, up to 15 s).
      await waitUntil(() => bAnswered, 15_000, 'b answered').catch(() => {});
      const answeredBeforeCommit = bAnswered;
      await ask(a, 'commit');
      assert.equal(firstValue(await bDone), 'b');
      assert.ok(answeredBeforeCommit, 'b waited on the desk for the connection a held, with room in the pool for a login');
    } finally {
      a.end();
      b.end();
    }
  });
});
