/** Found by the second review of the fast path (failed before its fix): a Flush inside an extended sequence whose Sync has not come (not as its last message). */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import type { TestPostgres } from './harness/postgres.js';
import { startTokenPostgres } from './harness/postgres.js';
import { withPoolMode } from './pool-transaction-support.js';
import { serialize, summary, WireClient } from './harness/wire.js';

let db: TestPostgres;
const token = 'tok-' + randomBytes(600).toString('base64url');
before(async () => {
  db = await startTokenPostgres(token);
});
after(() => db?.stop());

test('Parse, Flush, then Bind/Describe/Execute without Sync: the Flush is answered (libpq pipeline: PQsendPrepare, PQsendFlushRequest, PQsendQueryPrepared, PQflush)', async () => {
  await withPoolMode(db, token, 'transaction', 'PoolSize=2', async (proxy) => {
    const w = await WireClient.open(proxy.port, { user: 'anyone', database: db.database });
    try {
      w.send(serialize.query('select 1'));
      await w.untilReady(); // the engine's first transaction: the next units go to the fast path
      w.send(
        serialize.parse({ text: 'select 42' }),
        serialize.flush(),
        serialize.bind({}),
        serialize.describe({ type: 'P' }),
        serialize.execute({}),
      );
      // Postgres answers ParseComplete at the Flush, and everything before the Flush is due now.
      const first = await w.next(3000);
      assert.equal(summary(first), 'parseComplete');
      w.send(serialize.sync());
      const rest = (await w.untilReady(1, 3000)).map(summary);
      assert.deepEqual(rest, ['bindComplete', 'rowDescription', 'row ["42"]', 'complete SELECT 1', 'ready I']);
    } finally {
      w.end();
    }
  });
});
