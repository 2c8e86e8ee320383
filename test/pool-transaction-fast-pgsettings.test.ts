/** Found by the second review of the fast path (failed before its fix, in the engine too): a plain text that sets a setting for the session (UPDATE pg_settings, the view's rule calls set_config). */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import type { TestPostgres } from './harness/postgres.js';
import { startTokenPostgres } from './harness/postgres.js';
import { withPoolMode } from './pool-transaction-support.js';
import { serialize, summary, WireClient } from './harness/wire.js';
import { sleep } from './reliability-support.js';

let db: TestPostgres;
const token = 'tok-' + randomBytes(600).toString('base64url');
before(async () => {
  db = await startTokenPostgres(token);
});
after(() => db?.stop());

const open = (port: number): Promise<WireClient> => WireClient.open(port, { user: 'anyone', database: db.database });

test('UPDATE pg_settings by one client does not reach the next client on that connection', async () => {
  await withPoolMode(db, token, 'transaction', 'PoolSize=1', async (proxy) => {
    const a = await open(proxy.port);
    a.send(serialize.query('select 1'));
    await a.untilReady();
    a.send(serialize.query("update pg_settings set setting = '1234ms' where name = 'statement_timeout'"));
    const got = (await a.untilReady()).map(summary);
    a.end();
    await sleep(200);
    const b = await open(proxy.port);
    try {
      b.send(serialize.query('show statement_timeout'));
      const answers = await b.untilReady();
      const row = answers.find((m) => m.name === 'dataRow') as unknown as { fields: string[] };
      assert.equal(row.fields[0], '0', `client A (${got.join(',')}) left statement_timeout on the connection for client B`);
    } finally {
      b.end();
    }
  });
});
