/**
 * Desk review 2: TransactionSession #deskNames counts each statement of the unit as reused (and
 * touches it) while it walks the unit, before it knows the connection has them all. A unit whose
 * first statement the desk connection has and whose second it lacks goes to the engine
 * (handover), which counts the first one again: one Bind, two "reused" in
 * lakebase_proxy_prepared_statements_total. (#serverNames, the pool's lending, counts only once it
 * rewrote the whole unit.)
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import type { TestPostgres } from './harness/postgres.js';
import { startTokenPostgres } from './harness/postgres.js';
import { connectionFor, startProxy } from './harness/proxy.js';
import { serialize, summary, WireClient } from './harness/wire.js';
import { Metrics } from '../src/ops/metrics.js';
import { ask, deskStats, deskSkip } from './pool-transaction-desk-review-support.js';

let db: TestPostgres;
const token = 'tok-' + randomBytes(600).toString('base64url');
before(async () => {
  db = await startTokenPostgres(token);
});
after(() => db?.stop());

test("a desk lending's unit that goes to the engine counts each statement it uses once", { skip: deskSkip }, async () => {
  const metrics = new Metrics();
  const proxy = await startProxy(['--connection', connectionFor(db, token, 'PoolMode=transaction;PoolSize=1;MaxPreparedStatements=1')], { observer: metrics.observerFor('tx') });
  const sample = (text: string, labels: string): number => {
    const line = text.split('\n').find((l) => l.startsWith(`lakebase_proxy_prepared_statements_total{target="tx"${labels}} `));
    return Number(line?.split(' ').at(-1) ?? 0);
  };
  const w = await WireClient.open(proxy.port, { user: 'anyone', database: db.database });
  try {
    await ask(w, 'select 1');
    w.send(serialize.parse({ name: 's1', text: "select 'one'::text as v", types: [] }), serialize.sync());
    await w.untilReady(1);
    w.send(serialize.parse({ name: 's2', text: "select 'two'::text as v", types: [] }), serialize.sync()); // evicts s1 from the connection
    await w.untilReady(1);
    await ask(w, 'select 1'); // the fast path: the connection joins the desk
    await ask(w, 'select 1');
    assert.equal(deskStats(proxy, db)?.idle, 1, 'precondition: the connection idle on the desk');
    const before = await metrics.text();
    w.send(serialize.bind({ statement: 's2', values: [] }), serialize.execute({}), serialize.bind({ statement: 's1', values: [] }), serialize.execute({}), serialize.sync());
    const got = (await w.untilReady(1)).map(summary);
    assert.deepEqual(got, ['bindComplete', 'row ["two"]', 'complete SELECT 1', 'bindComplete', 'row ["one"]', 'complete SELECT 1', 'ready I']);
    const after = await metrics.text();
    const reused = sample(after, ',outcome="reused"') - sample(before, ',outcome="reused"');
    const prepared = sample(after, ',outcome="prepared"') - sample(before, ',outcome="prepared"');
    assert.deepEqual({ reused, prepared }, { reused: 1, prepared: 1 }, 's2 found on the connection once, s1 prepared again once');
  } finally {
    w.end();
    await proxy.close();
  }
});
