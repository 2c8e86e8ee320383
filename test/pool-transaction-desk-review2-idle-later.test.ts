/**
 * Desk review 2: desk_queue does not queue a client while an idle desk connection of other
 * settings exists (9aaadb6), but a connection that becomes idle on the desk AFTER a client of other
 * settings queued there (a kept release, desk_serve finding no waiter of its settings) wakes no
 * one: the client waits for a connection of its own settings (here: one held inside a long
 * transaction) up to QueryWaitTimeout, with an idle connection there that the pool would hand it.
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

test('a client waiting on the desk is served when a desk connection of other settings becomes idle', { skip: deskSkip }, async () => {
  await withPoolMode(db, token, 'transaction', 'PoolSize=2;QueryWaitTimeout=60s', async (proxy) => {
    const a = await wireOpen(proxy.port, db);
    const b = await wireOpen(proxy.port, db);
    const c = await wireOpen(proxy.port, db, { application_name: 'desk_review_y' }); // another settings id
    try {
      await ask(a, 'select 1');
      await ask(b, 'select 1');
      await ask(c, 'select 1');
      // a: a desk connection in the default settings, held inside a transaction.
      await ask(a, 'select 1');
      await ask(a, 'select 1');
      await ask(a, 'begin');
      // c: the other connection, on the desk in c's settings, then lent to c inside a transaction.
      await ask(c, 'select 1');
      await ask(c, 'select 1');
      await ask(c, 'select 1');
      assert.deepEqual({ count: deskStats(proxy, db)?.count, idle: deskStats(proxy, db)?.idle }, { count: 2, idle: 1 }, 'precondition: a lent and an idle desk connection');
      await ask(c, 'begin');
      assert.deepEqual({ count: deskStats(proxy, db)?.count, idle: deskStats(proxy, db)?.idle }, { count: 2, idle: 0 }, 'precondition: both desk connections lent');

      b.send(serialize.query("select 'b' as v"));
      let bAnswered = false;
      const bDone = b.untilReady(1, 90_000).then((m) => {
        bAnswered = true;
        return m;
      });
      await waitUntil(() => deskStats(proxy, db)?.waiting === 1, 5000, 'precondition: b waits on the desk');
      await ask(c, 'commit'); // c's connection: kept on the desk, idle
      await waitUntil(() => bAnswered, 15_000, 'b answered').catch(() => {});
      const answeredBeforeCommit = bAnswered;
      const stats = deskStats(proxy, db);
      await ask(a, 'commit');
      assert.equal(firstValue(await bDone), 'b');
      assert.ok(answeredBeforeCommit, `b kept waiting for a's connection while c's sat idle on the desk (desk ${JSON.stringify(stats)})`);
    } finally {
      a.end();
      b.end();
      c.end();
    }
  });
});
