/**
 * Desk review: a client whose settings a function changed during a lending (ParameterStatus,
 * LP_BACK_RELEASED with reports) keeps its desk settings id in C (k->sid), so its next unit takes
 * an idle desk connection in its OLD settings: the setting the server reported to it is gone on
 * the server, while the client was told it is in force. Before the desk, the engine landed the
 * client's (changed) settings on every connection it took (ClientSettings.landOn).
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import type { TestPostgres } from './harness/postgres.js';
import { startTokenPostgres } from './harness/postgres.js';
import { withPoolMode } from './pool-transaction-support.js';
import { waitUntil } from './reliability-support.js';
import { ask, deskStats, firstValue, wireOpen, deskSkip } from './pool-transaction-desk-review-support.js';

let db: TestPostgres;
const token = 'tok-' + randomBytes(600).toString('base64url');

before(async () => {
  db = await startTokenPostgres(token);
  await db.query(
    `create or replace function lp_desk_set_name() returns int language plpgsql as $$ begin perform set_config('application_name', 'set_by_function', false); return 1; end $$`,
  );
  await db.query(`grant execute on function lp_desk_set_name() to "${db.tokenRole}"`);
});
after(() => db?.stop());

test('a setting a function changed follows its client onto the next desk connection it takes', { skip: deskSkip }, async () => {
  await withPoolMode(db, token, 'transaction', 'PoolSize=2', async (proxy) => {
    const a = await wireOpen(proxy.port, db);
    const b = await wireOpen(proxy.port, db);
    try {
      await ask(a, 'select 1'); // JS mode first: the next units go the fast way
      await ask(b, 'select 1');
      // Two transactions at once: both connections join the desk, and stay there idle.
      await ask(a, 'begin');
      await ask(b, 'begin');
      await ask(a, 'commit');
      await ask(b, 'commit');
      await waitUntil(() => deskStats(proxy, db)?.idle === 2, 5000, 'two idle connections on the desk (precondition)');

      const ran = await ask(a, 'select lp_desk_set_name() as v');
      const reported = ran.filter((m) => m.name === 'parameterStatus') as unknown as Array<{ parameterName: string; parameterValue: string }>;
      assert.deepEqual(
        reported.map((m) => `${m.parameterName}=${m.parameterValue}`),
        ['application_name=set_by_function'],
        'the client was told its application_name changed',
      );
      // One idle desk connection left, in the settings the client had before.
      assert.equal(deskStats(proxy, db)?.idle, 1, 'precondition: one idle desk connection');

      const shown = firstValue(await ask(a, "select current_setting('application_name') as a"));
      assert.equal(shown, 'set_by_function', 'the client runs on a connection without the setting it was told is in force');
    } finally {
      a.end();
      b.end();
    }
  });
});
