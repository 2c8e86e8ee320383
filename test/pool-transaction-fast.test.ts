/**
 * PoolMode=transaction's fast path (native/txclient.h): the client socket in C carries plain
 * transactions on a connection lent for each, and hands everything else to the engine
 * (transaction-session.ts) at a message boundary. Against a real Postgres, through the proxy's
 * metrics: what went the fast way, that its answers are right and in order, that what it hands
 * over (inside a transaction, a function's ParameterStatus) the engine takes on exactly, and
 * that clients that leave or wait too long on it leave nothing behind.
 *
 * With the JavaScript relay (LAKEBASE_PROXY_TEST_RELAY=js) or no native build the same
 * transactions must give the same answers with nothing on the fast path.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import type { TestPostgres } from './harness/postgres.js';
import { connectionFor, startProxy, type InProcessProxy } from './harness/proxy.js';
import { startTokenPostgres } from './harness/postgres.js';
import { pgClient, sleep, waitUntil } from './reliability-support.js';
import { serialize, summary, WireClient } from './harness/wire.js';
import { Metrics } from '../src/ops/metrics.js';
import { native } from '../src/proxy/native-relay.js';

let db: TestPostgres;
const token = 'tok-' + randomBytes(600).toString('base64url');
/** Whether the proxies of this run have the fast path. */
const fast = native.addon !== undefined && process.env['LAKEBASE_PROXY_TEST_RELAY'] !== 'js';

before(async () => {
  db = await startTokenPostgres(token);
  await db.query(`create or replace function lp_fast_set_name() returns int language plpgsql as $$ begin perform set_config('application_name', 'set_by_function', false); return 1; end $$`);
  await db.query(`grant execute on function lp_fast_set_name() to "${db.tokenRole}"`);
});
after(() => db?.stop());

interface Counted {
  proxy: InProcessProxy;
  /** [all transactions, those of the fast path] so far. */
  counts(): Promise<[number, number]>;
}

async function withCountedPool<T>(extra: string, fn: (pool: Counted) => Promise<T>): Promise<T> {
  const metrics = new Metrics();
  const proxy = await startProxy(['--connection', connectionFor(db, token, `PoolMode=transaction;${extra}`)], { observer: metrics.observerFor('fast') });
  const sample = (text: string, name: string): number => Number(text.split('\n').find((l) => l.startsWith(`lakebase_proxy_${name}{target="fast"} `))?.split(' ').at(-1) ?? 0);
  try {
    return await fn({
      proxy,
      async counts() {
        const text = await metrics.text();
        return [sample(text, 'pool_transactions_total'), sample(text, 'pool_fast_path_transactions_total')];
      },
    });
  } finally {
    await proxy.close();
  }
}

const rowsOf = (messages: Parameters<typeof summary>[0][]): string[] => messages.map(summary);

test('plain transactions go the fast way, simple and extended, many clients on two connections, with right answers in order', async () => {
  await withCountedPool('PoolSize=2', async ({ proxy, counts }) => {
    const clients = await Promise.all(Array.from({ length: 12 }, async () => {
      const c = pgClient(proxy.port, db);
      await c.connect();
      return c;
    }));
    try {
      await Promise.all(
        clients.map(async (c, i) => {
          for (let n = 0; n < 25; n++) {
            // Unnamed statements (extended protocol) and simple queries, interleaved.
            const doubled = await c.query<{ v: number }>('select $1::int * 2 as v', [i * 100 + n]);
            assert.equal(doubled.rows[0]?.v, (i * 100 + n) * 2);
            const simple = await c.query<{ v: string }>(`select 'client ${i} query ${n}' as v`);
            assert.equal(simple.rows[0]?.v, `client ${i} query ${n}`);
          }
        }),
      );
    } finally {
      await Promise.all(clients.map((c) => c.end()));
    }
    // Two Queries in one write, and an extended sequence with two Syncs: answered in order.
    const w = await WireClient.open(proxy.port, { user: 'anyone', database: db.database });
    try {
      w.send(serialize.query('select 1 as a'), serialize.query('select 2 as b'));
      assert.deepEqual(rowsOf(await w.untilReady(2)), ['rowDescription', 'row ["1"]', 'complete SELECT 1', 'ready I', 'rowDescription', 'row ["2"]', 'complete SELECT 1', 'ready I']);
      w.send(
        serialize.parse({ text: 'select $1::text as t' }),
        serialize.bind({ values: ['first'] }),
        serialize.describe({ type: 'P' }),
        serialize.execute({}),
        serialize.sync(),
        serialize.bind({ values: ['second'] }),
        serialize.execute({}),
        serialize.sync(),
      );
      assert.deepEqual(rowsOf(await w.untilReady(2)), [
        'parseComplete',
        'bindComplete',
        'rowDescription',
        'row ["first"]',
        'complete SELECT 1',
        'ready I',
        'bindComplete',
        'row ["second"]',
        'complete SELECT 1',
        'ready I',
      ]);
    } finally {
      w.end();
    }
    const [all, carried] = await counts();
    // 12 clients x 25 x 2, then the pipelined pair and the two Syncs (each lending counts once).
    if (fast) {
      assert.equal(carried, all, 'every one of these went the fast way');
      assert.ok(all >= 600 + 2, `${all} transactions`);
    } else {
      assert.equal(carried, 0);
    }
  });
});

test('a transaction begun on the fast path goes on in the engine at a named Parse, and the client comes back to the fast path after it, its named statement too', async () => {
  await withCountedPool('PoolSize=1', async ({ proxy, counts }) => {
    const w = await WireClient.open(proxy.port, { user: 'anyone', database: db.database });
    try {
      w.send(serialize.query('begin'));
      assert.deepEqual(rowsOf(await w.untilReady()), ['complete BEGIN', 'ready T']);
      w.send(serialize.query('select 41 as v'));
      assert.deepEqual(rowsOf(await w.untilReady()), ['rowDescription', 'row ["41"]', 'complete SELECT 1', 'ready T']);
      // A named statement: the engine's, inside the transaction the fast path began.
      w.send(serialize.parse({ name: 'named', text: 'select $1::int + 1 as v' }), serialize.bind({ statement: 'named', values: ['1'] }), serialize.execute({}), serialize.sync());
      assert.deepEqual(rowsOf(await w.untilReady()), ['parseComplete', 'bindComplete', 'row ["2"]', 'complete SELECT 1', 'ready T']);
      w.send(serialize.query('commit'));
      assert.deepEqual(rowsOf(await w.untilReady()), ['complete COMMIT', 'ready I']);
      const before = await counts();
      w.send(serialize.query('select 3 as v'));
      assert.deepEqual(rowsOf(await w.untilReady()), ['rowDescription', 'row ["3"]', 'complete SELECT 1', 'ready I']);
      // The named statement lives on (the engine prepares it where the client lands).
      w.send(serialize.bind({ statement: 'named', values: ['9'] }), serialize.execute({}), serialize.sync());
      assert.deepEqual(rowsOf(await w.untilReady()), ['bindComplete', 'row ["10"]', 'complete SELECT 1', 'ready I']);
      const [all, carried] = await counts();
      assert.equal(all - (before[0] ?? 0), 2);
      // Both went the fast way: the plain SELECT, and the Bind of the named statement the connection has (under its server name).
      assert.equal(carried - (before[1] ?? 0), fast ? 2 : 0);
    } finally {
      w.end();
    }
  });
});

test("a setting a function changes on the fast path follows its client to another connection, and is reported to it at once", async () => {
  await withCountedPool('PoolSize=2', async ({ proxy }) => {
    const w = await WireClient.open(proxy.port, { user: 'anyone', database: db.database, application_name: 'from_startup' });
    // A setting of its startup that the server does not report keeps this client off the desk
    // (native/txclient.h, lp_desk): the pool hands it the connection used most recently.
    const other = pgClient(proxy.port, db, { application_name: 'the_other', options: '-c work_mem=5MB' });
    await other.connect();
    try {
      // Two connections in the pool: two transactions at once.
      await other.query('begin');
      w.send(serialize.query('select 0 as warm'));
      await w.untilReady();
      await other.query('commit');
      w.send(serialize.query('select lp_fast_set_name() as v, pg_backend_pid() as pid'));
      const answer = await w.untilReady();
      const ranOn = (answer.find((m) => m.name === 'dataRow') as unknown as { fields: string[] }).fields[1];
      const reported = answer.filter((m) => m.name === 'parameterStatus') as unknown as Array<{ parameterName: string; parameterValue: string }>;
      assert.deepEqual(reported.map((m) => `${m.parameterName}=${m.parameterValue}`), ['application_name=set_by_function']);
      // The other client takes the connection the function ran on (the most recently used): its own name there.
      await other.query('begin');
      assert.deepEqual((await other.query<{ application_name: string }>('show application_name')).rows, [{ application_name: 'the_other' }]);
      // This one lands on the other connection: the function's setting comes with it.
      w.send(serialize.query("select current_setting('application_name') as a, pg_backend_pid() as pid"));
      const shown = (await w.untilReady()).find((m) => m.name === 'dataRow') as unknown as { fields: string[] };
      assert.notEqual(shown.fields[1], ranOn, 'on the other connection');
      assert.equal(shown.fields[0], 'set_by_function');
      await other.query('commit');
    } finally {
      w.end();
      await other.end();
    }
  });
});

test('a client that leaves while its query waits for a connection, and one that waits too long: the pool serves the next at once', async () => {
  await withCountedPool('PoolSize=1;QueryWaitTimeout=1s', async ({ proxy }) => {
    const holder = pgClient(proxy.port, db);
    await holder.connect();
    try {
      await holder.query('begin');
      const leaver = await WireClient.open(proxy.port, { user: 'anyone', database: db.database });
      leaver.send(serialize.query('select 1'));
      await sleep(100);
      leaver.socket.destroy();
      const waiter = await WireClient.open(proxy.port, { user: 'anyone', database: db.database });
      waiter.send(serialize.query('select 2'));
      const refused = await waiter.next(10_000);
      assert.equal(refused.name, 'error');
      assert.match((refused as unknown as { message: string }).message, /QueryWaitTimeout/);
      await holder.query('commit');
      const next = pgClient(proxy.port, db);
      await next.connect();
      assert.deepEqual((await next.query<{ v: number }>('select 5 as v')).rows, [{ v: 5 }]);
      await next.end();
      await waitUntil(async () => proxy.server.pools.get(db.database)?.stats.waiting === 0, 5000, 'no client waits');
    } finally {
      await holder.end().catch(() => {});
    }
  });
});

test('named prepared statements (node pg) go the fast way once the connection has them, under their server names, also after a switch of connection', async () => {
  await withCountedPool('PoolSize=2', async ({ proxy, counts }) => {
    const a = pgClient(proxy.port, db);
    const b = pgClient(proxy.port, db);
    await a.connect();
    await b.connect();
    try {
      // Two connections, each with the statement prepared once by the engine.
      await Promise.all([a.query('begin'), b.query('begin')]);
      assert.deepEqual((await a.query({ name: 'twice', text: 'select $1::int * 2 as v', values: [1] })).rows, [{ v: 2 }]);
      assert.deepEqual((await b.query({ name: 'twice', text: 'select $1::int * 2 as v', values: [2] })).rows, [{ v: 4 }]);
      await Promise.all([a.query('commit'), b.query('commit')]);
      const before = await counts();
      for (let i = 0; i < 20; i++) {
        const [x, y] = await Promise.all([
          a.query({ name: 'twice', text: 'select $1::int * 2 as v', values: [i] }),
          b.query({ name: 'twice', text: 'select $1::int * 2 as v', values: [100 + i] }),
        ]);
        assert.deepEqual(x.rows, [{ v: 2 * i }]);
        assert.deepEqual(y.rows, [{ v: 2 * (100 + i) }]);
      }
      const [all, carried] = await counts();
      assert.equal(all - (before[0] ?? 0), 40);
      assert.equal(carried - (before[1] ?? 0), fast ? 40 : 0);
      // Not the client's name on the server: the proxy's.
      assert.deepEqual((await a.query<{ n: number }>("select count(*)::int as n from pg_prepared_statements where name = 'twice'")).rows, [{ n: 0 }]);
    } finally {
      await a.end();
      await b.end();
    }
  });
});
