/**
 * Desk review 2: a desk connection whose lifetime ends while it is lent (ServerLifetime) serves no
 * new transaction: not the desk's next waiting client (desk_keeps), not the next unit of its
 * client (desk_take), not one of another client after a stay idle on the desk.
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

test('a desk connection past its lifetime serves no new transaction', { skip: deskSkip }, async () => {
  await withPoolMode(db, token, 'transaction', 'PoolSize=1;ServerLifetime=3s;QueryWaitTimeout=60s', async (proxy) => {
    const a = await wireOpen(proxy.port, db);
    const b = await wireOpen(proxy.port, db);
    try {
      await ask(a, 'select 1');
      await ask(b, 'select 1');
      await ask(a, 'select 1');
      await ask(a, 'select 1');
      const first = firstValue(await ask(a, 'begin; select pg_backend_pid()::text'));
      assert.equal(deskStats(proxy, db)?.count, 1, 'precondition: the connection on the desk, lent');
      b.send(serialize.query('select pg_backend_pid()::text'));
      await waitUntil(() => deskStats(proxy, db)?.waiting === 1, 5000, 'precondition: b waits on the desk');
      await sleep(3500); // past ServerLifetime (less up to 10 %)
      await ask(a, 'commit');
      const second = firstValue(await b.untilReady(1, 30_000));
      assert.notEqual(second, first, 'b ran on the connection past its lifetime');
      const third = firstValue(await ask(a, 'select pg_backend_pid()::text'));
      assert.notEqual(third, first);
    } finally {
      a.end();
      b.end();
    }
  });
});
