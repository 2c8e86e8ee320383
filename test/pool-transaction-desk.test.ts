/**
 * PoolMode=transaction's desk (src/pool/desk.ts, native/txclient.h lp_desk): the pool's hand-off
 * in C. Against a real Postgres, through the proxy's metrics and pg_stat_activity: connections
 * released cleanly go from client to client in C (pool_desk_transactions_total) with right
 * answers; what waits on the desk is counted as waiting and refused at QueryWaitTimeout; the pool's
 * own waiters (clients the desk cannot serve) are not starved by it; connections idle on the desk
 * are closed at ServerIdleTimeout, and one the server ended there is never handed out; a PAUSE
 * takes the desk's idle connections back.
 *
 * With the JavaScript relay (LAKEBASE_PROXY_TEST_RELAY=js) or no native build the same traffic
 * must give the same answers with nothing on the desk.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import type { TestPostgres } from './harness/postgres.js';
import { connectionFor, startProxy, type InProcessProxy } from './harness/proxy.js';
import { startTokenPostgres } from './harness/postgres.js';
import { pgClient, waitUntil } from './reliability-support.js';
import { serialize, WireClient } from './harness/wire.js';
import { Metrics } from '../src/ops/metrics.js';
import { native } from '../src/proxy/native-relay.js';

let db: TestPostgres;
const token = 'tok-' + randomBytes(600).toString('base64url');
/** Whether the proxies of this run have the fast path, and so the desk. */
const fast = native.addon !== undefined && process.env['LAKEBASE_PROXY_TEST_RELAY'] !== 'js';

before(async () => {
  db = await startTokenPostgres(token);
});
after(() => db?.stop());

interface Measured {
  proxy: InProcessProxy;
  /** A sample of the proxy's /metrics (0 when absent). */
  metric(name: string, labels?: string): Promise<number>;
}

async function withMeasuredPool<T>(extra: string, fn: (pool: Measured) => Promise<T>): Promise<T> {
  const metrics = new Metrics();
  const proxy = await startProxy(['--connection', connectionFor(db, token, `PoolMode=transaction;${extra}`)], { observer: metrics.observerFor('desk') });
  try {
    return await fn({
      proxy,
      async metric(name, labels = '') {
        const text = await metrics.text();
        const line = text.split('\n').find((l) => l.startsWith(`lakebase_proxy_${name}{target="desk"${labels}} `));
        return Number(line?.split(' ').at(-1) ?? 0);
      },
    });
  } finally {
    await proxy.close();
  }
}

async function upstreamCount(): Promise<number> {
  const rows = await db.query<{ n: number }>(`select count(*)::int as n from pg_stat_activity where usename = '${db.tokenRole}'`);
  return rows[0]?.n ?? 0;
}

async function wire(port: number): Promise<WireClient> {
  return await WireClient.open(port, { user: 'anyone', database: db.database });
}

/** One transaction, so that the client's next ones find a connection in its settings on the desk. */
async function warm(w: WireClient): Promise<void> {
  w.send(serialize.query('select 1'));
  await w.untilReady();
}

test('clients of the same settings hand connections to each other in C, with right answers, on PoolSize connections', async () => {
  await withMeasuredPool('PoolSize=2', async ({ proxy, metric }) => {
    const clients = Array.from({ length: 16 }, () => pgClient(proxy.port, db));
    await Promise.all(clients.map((c) => c.connect()));
    let most = 0;
    try {
      await Promise.all(
        clients.map(async (c, i) => {
          for (let n = 0; n < 25; n++) {
            const doubled = await c.query<{ v: number }>('select $1::int * 2 as v', [i * 100 + n]);
            assert.equal(doubled.rows[0]?.v, (i * 100 + n) * 2);
            const simple = await c.query<{ v: string }>(`select 'client ${i} query ${n}' as v`);
            assert.equal(simple.rows[0]?.v, `client ${i} query ${n}`);
            if (n % 5 === 0) most = Math.max(most, await upstreamCount());
          }
        }),
      );
    } finally {
      await Promise.all(clients.map((c) => c.end()));
    }
    assert.ok(most <= 2, `at most PoolSize upstream connections (saw ${most})`);
    const all = await metric('pool_transactions_total');
    const desk = await metric('pool_desk_transactions_total');
    assert.ok(all >= 16 * 50, `${all} transactions`);
    if (fast) {
      assert.equal(await metric('pool_fast_path_transactions_total'), all, 'every one went the fast way');
      // The first lending of each connection goes through the pool; after that, C hands them on.
      assert.ok(desk >= all / 2, `${desk} of ${all} handed on in C`);
      // Each hand-off counts as a reuse and a wait, as the pool's own do.
      assert.ok((await metric('server_reuses_total')) >= desk, 'reuses counted');
      assert.ok((await metric('pool_wait_duration_seconds_count')) >= desk, 'waits counted');
    } else {
      assert.equal(desk, 0);
    }
  });
});

test('a client waiting on the desk counts as waiting and is refused at QueryWaitTimeout, naming it; the holder goes on', async () => {
  await withMeasuredPool('PoolSize=1;QueryWaitTimeout=1s', async ({ proxy, metric }) => {
    const holder = await wire(proxy.port);
    const waiter = await wire(proxy.port);
    try {
      await warm(holder);
      await warm(waiter);
      await warm(holder); // the connection is on the desk now (the first lending landed the settings)
      holder.send(serialize.query('begin'));
      await holder.untilReady();
      waiter.send(serialize.query('select 2'));
      await waitUntil(async () => (await metric('clients_waiting')) === 1, 5_000, 'the client waiting on the desk');
      const refused = await waiter.next(10_000);
      assert.equal(refused.name, 'error');
      assert.match((refused as unknown as { message: string }).message, /QueryWaitTimeout/);
      assert.equal((refused as unknown as { code: string }).code, '53300');
      assert.equal(await metric('clients_waiting'), 0);
      holder.send(serialize.query('select 3 as v'));
      const rows = (await holder.untilReady()).filter((m) => m.name === 'dataRow');
      assert.equal(rows.length, 1);
      holder.send(serialize.query('commit'));
      await holder.untilReady();
      if (fast) assert.ok((await metric('pool_desk_transactions_total')) >= 1, 'the holder took its connection from the desk');
    } finally {
      holder.end();
      waiter.socket.destroy();
    }
  });
});

test("a client the desk cannot serve (other settings) is not starved by clients the desk serves", async () => {
  await withMeasuredPool('PoolSize=1;QueryWaitTimeout=30s', async ({ proxy }) => {
    const busy = Array.from({ length: 4 }, () => pgClient(proxy.port, db));
    await Promise.all(busy.map((c) => c.connect()));
    // An unreported startup setting: its settings never match the desk's connections.
    const other = pgClient(proxy.port, db, { options: '-c work_mem=7MB' });
    await other.connect();
    let running = true;
    let served = 0;
    const loops = busy.map(async (c) => {
      while (running) {
        await c.query('select 1');
        served++;
      }
    });
    try {
      await waitUntil(() => served >= 200, 20_000, 'the desk clients running');
      // Served while the others keep the only connection busy: connections the desk releases come back to the pool for it.
      for (let n = 0; n < 5; n++) {
        const shown = await other.query<{ work_mem: string }>('show work_mem');
        assert.equal(shown.rows[0]?.work_mem, '7MB');
      }
      const before = served;
      await waitUntil(() => served >= before + 100, 20_000, 'the desk clients going on'); // and the desk's clients go on after it
    } finally {
      running = false;
      await Promise.all(loops);
      await Promise.all([...busy, other].map((c) => c.end()));
    }
  });
});

test('a connection idle on the desk: closed at ServerIdleTimeout; ended by the server, never handed out', async () => {
  await withMeasuredPool('PoolSize=2;ServerIdleTimeout=1s', async ({ proxy, metric }) => {
    const c = pgClient(proxy.port, db);
    await c.connect();
    try {
      for (let n = 0; n < 3; n++) await c.query('select 1');
      const pid = (await c.query<{ pid: number }>('select pg_backend_pid() as pid')).rows[0]?.pid;
      // Idle on the desk: the server ends it. The next transaction must not get it.
      await db.query(`select pg_terminate_backend(${pid})`);
      await waitUntil(async () => (await metric('server_closes_total', ',reason="server_closed"')) >= 1, 10_000, 'the terminated connection closed');
      const next = (await c.query<{ pid: number; v: number }>('select pg_backend_pid() as pid, 5 as v')).rows[0];
      assert.equal(next?.v, 5);
      assert.notEqual(next?.pid, pid);
      // Idle past ServerIdleTimeout: closed (the janitor takes it off the desk), so a compute can scale to zero.
      await waitUntil(async () => (await upstreamCount()) === 0, 15_000, 'the idle connection closed');
      assert.ok((await metric('server_closes_total', ',reason="idle"')) >= 1);
      assert.equal((await c.query<{ v: number }>('select 6 as v')).rows[0]?.v, 6);
    } finally {
      await c.end();
    }
  });
});

test('PAUSE takes the idle connections back from the desk and closes them; RESUME serves clients again', async () => {
  await withMeasuredPool('PoolSize=2', async ({ proxy, metric }) => {
    const c = pgClient(proxy.port, db);
    await c.connect();
    try {
      for (let n = 0; n < 3; n++) await c.query('select 1');
      assert.equal(await upstreamCount(), 1);
      // PAUSE waits for running sessions to end (a transaction-mode client stays): not awaited, aborted after.
      const pausing = new AbortController();
      const paused = proxy.server.pause(pausing.signal).catch(() => {});
      await waitUntil(async () => (await upstreamCount()) === 0, 10_000, 'the paused pool without connections');
      assert.ok((await metric('server_closes_total', ',reason="shutdown"')) >= 1);
      pausing.abort();
      await paused;
      proxy.server.resume();
      assert.equal((await c.query<{ v: number }>('select 8 as v')).rows[0]?.v, 8);
    } finally {
      await c.end();
    }
  });
});
