/**
 * PoolMode=transaction: SET LOCAL, DISCARD ALL and shutdown, as a review of session 5's changes
 * probed them (each of these failed once): what one client SETs never reaches the next, what a
 * client is told matches what Postgres tells it, and a refusal at shutdown is counted as one.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import pg from 'pg';
import type { TestPostgres } from './harness/postgres.js';
import { connectionFor, startProxy, type InProcessProxy } from './harness/proxy.js';
import { withPoolMode } from './pool-transaction-support.js';
import { startTokenPostgres } from './harness/postgres.js';
import { pgClient, waitUntil } from './reliability-support.js';
import { serialize, summary, WireClient } from './harness/wire.js';
import type { BackendMessage } from 'pg-protocol/dist/messages.js';
import { Metrics } from '../src/ops/metrics.js';

let db: TestPostgres;
const token = 'tok-' + randomBytes(600).toString('base64url');

before(async () => {
  db = await startTokenPostgres(token);
});
after(() => db?.stop());

const withTransactionPool = <T>(extra: string, fn: (proxy: InProcessProxy) => Promise<T>): Promise<T> => withPoolMode(db, token, 'transaction', extra, fn);
const withDirect = <T>(fn: (port: number) => Promise<T>): Promise<T> => withPoolMode(db, token, 'none', '', (proxy) => fn(proxy.port));
const wire = (port: number, startup: Record<string, string> = {}): Promise<WireClient> => WireClient.open(port, { user: 'anyone', database: db.database, ...startup });

async function one<T = unknown>(port: number, sql: string): Promise<T> {
  const c = pgClient(port, db, {});
  await c.connect();
  try {
    return Object.values((await c.query(sql)).rows[0] as Record<string, unknown>)[0] as T;
  } finally {
    await c.end().catch(() => {});
  }
}

/** Sends `messages` on a fresh wire client, reads `readies` ReadyForQuery, ends it; whether a leak NOTICE came. */
async function noticed(port: number, batches: Array<{ send: Buffer[]; readies?: number }>): Promise<boolean> {
  const w = await wire(port);
  let notice = false;
  try {
    for (const batch of batches) {
      w.send(...batch.send);
      for (const m of await w.untilReady(batch.readies ?? 1)) if (m.name === 'notice' && /PoolMode=transaction/.test((m as { message?: string }).message ?? '')) notice = true;
    }
  } finally {
    w.end();
  }
  return notice;
}

/**
 * A client's `batches` leave a session SET of work_mem on the connection: the client must be told,
 * and the next client (PoolSize 1: on the same connection) must see the default.
 */
async function assertSetReset(port: number, batches: Array<{ send: Buffer[]; readies?: number }>): Promise<void> {
  const told = await noticed(port, batches);
  const next = await one(port, "select current_setting('work_mem') as v");
  assert.deepEqual({ told, next }, { told: true, next: '4MB' });
}

const pbe = (text: string): Buffer[] => [serialize.parse({ text }), serialize.bind({}), serialize.execute()];

test('a SET is reset before the next client although a SET LOCAL Parse that never runs shares its Sync', async () => {
  await withTransactionPool('PoolSize=1', async (proxy) => {
    await assertSetReset(proxy.port, [{ send: [serialize.parse({ name: 'later', text: "set local work_mem = '1MB'" }), ...pbe("set work_mem = '7777kB'"), serialize.sync()] }]);
  });
});

test('a SET is reset before the next client although a failing SET LOCAL is pipelined behind it', async () => {
  await withTransactionPool('PoolSize=1', async (proxy) => {
    await assertSetReset(proxy.port, [{ send: [serialize.query("set work_mem = '7778kB'"), serialize.query("set local work_mem = 'bogus'")], readies: 2 }]);
  });
});

test('a portal is taken for a SET LOCAL only once the server bound it: a refused re-Bind leaves it the SET it was, and that SET is reset before the next client', async () => {
  await withTransactionPool('PoolSize=1', async (proxy) => {
    await assertSetReset(proxy.port, [
      { send: [serialize.query('begin')] },
      {
        send: [
          serialize.parse({ name: 'w', text: "set work_mem = '7780kB'" }),
          serialize.parse({ name: 'l', text: 'set local statement_timeout = 0' }),
          serialize.bind({ portal: 'p', statement: 'w' }),
          serialize.sync(),
        ],
      },
      { send: [serialize.query('savepoint a')] },
      { send: [serialize.bind({ portal: 'p', statement: 'l' }), serialize.sync()] }, // 42P03: p is bound already
      { send: [serialize.query('rollback to savepoint a')] },
      { send: [serialize.execute({ portal: 'p' }), serialize.sync()] }, // runs the SET of w
      { send: [serialize.query('commit')] },
    ]);
  });
});

test('a SET LOCAL of a reported setting hides no SET in its Sync (it is not counted twice, alone and by its report)', async () => {
  await withTransactionPool('PoolSize=1', async (proxy) => {
    await assertSetReset(proxy.port, [
      { send: [serialize.query('begin')] },
      { send: [...pbe("set local application_name = 'briefly'"), ...pbe("set work_mem = '7779kB'"), serialize.sync()] },
      { send: [serialize.query('commit')] },
    ]);
  });
});

test('a named SET LOCAL statement used again (Bind and Execute, no Parse) draws no NOTICE', async () => {
  await withTransactionPool('PoolSize=1', async (proxy) => {
    const c = pgClient(proxy.port, db, {});
    await c.connect();
    const notices: string[] = [];
    c.on('notice', (n) => notices.push(n.message ?? ''));
    try {
      for (let i = 0; i < 2; i++) {
        await c.query('begin');
        await c.query({ name: 'local_wm', text: "set local work_mem = '2MB'" });
        await c.query('commit');
      }
      await c.query('select 1');
      assert.deepEqual(notices, []);
    } finally {
      await c.end();
    }
  });
});

test('a client refused because shutdown closed the pool is counted as shutting_down, not as a pool timeout', async () => {
  const metrics = new Metrics();
  const proxy = await startProxy(['--connection', connectionFor(db, token, 'PoolMode=transaction;PoolSize=1')], { observer: metrics.observerFor('tx') });
  try {
    const holder = pgClient(proxy.port, db, {});
    await holder.connect();
    await holder.query('begin');
    const waiting = new pg.Client({ host: '127.0.0.1', port: proxy.port, user: 'anyone', database: db.database, application_name: 'never-seen' });
    const refused = waiting.connect().then(
      () => 'connected',
      (error: { code?: string; message: string }) => error.code ?? error.message,
    );
    await waitUntil(() => [...proxy.server.pools.values()].some((pool) => pool.stats.waiting === 1), 10_000, 'it waits for a connection');
    proxy.server.refuseNewClients();
    assert.equal(await refused, '57P01');
    await holder.query('commit').catch(() => {});
    await holder.end().catch(() => {});
    const sample = async (reason: string): Promise<number> => {
      const line = (await metrics.text()).split('\n').find((l) => l.startsWith('lakebase_proxy_login_failures_total{') && l.includes(`reason="${reason}"`));
      return Number(line?.split(' ').at(-1) ?? 0);
    };
    assert.deepEqual({ timeout: await sample('pool_timeout'), shutdown: await sample('shutting_down') }, { timeout: 0, shutdown: 1 });
  } finally {
    await proxy.close();
  }
});

/** Rows and ParameterStatus of `batches`, each batch read to its readies. */
async function seen(port: number, batches: Array<{ send: Buffer[]; readies?: number }>): Promise<string[]> {
  const w = await wire(port, { options: '-c TimeZone=Asia/Tokyo' });
  const out: string[] = [];
  try {
    for (const batch of batches) {
      w.send(...batch.send);
      const step: string[] = [];
      for (const m of (await w.untilReady(batch.readies ?? 1)) as Array<BackendMessage & { parameterName?: string; parameterValue?: string; fields?: unknown[]; code?: string }>) {
        if (m.name === 'parameterStatus' && m.parameterName === 'TimeZone') step.push(`${m.parameterName}=${m.parameterValue}`);
        else if (m.name === 'dataRow') step.push(`row ${JSON.stringify(m.fields)}`);
        else if (m.name === 'error') step.push(`error ${m.code}`);
      }
      out.push(step.join(' '));
    }
  } finally {
    w.end();
  }
  return out;
}

test('a query pipelined behind DISCARD ALL runs with the client\'s startup settings, as Postgres runs it', async () => {
  await withDirect(async (direct) => {
    await withTransactionPool('PoolSize=1', async (proxy) => {
      const batches = [{ send: [serialize.query('select 1'), serialize.query('discard all'), serialize.query("select current_setting('TimeZone')")], readies: 3 }];
      const want = await seen(direct, batches);
      assert.deepEqual(await seen(proxy.port, batches), want);
    });
  });
});

test('a SET behind DISCARD ALL in one Sync is reported and kept, as Postgres keeps it', async () => {
  await withDirect(async (direct) => {
    await withTransactionPool('PoolSize=1', async (proxy) => {
      const batches = [
        { send: [serialize.query("set timezone = 'UTC'")] },
        { send: [...pbe('discard all'), ...pbe("set timezone = 'Europe/Paris'"), serialize.sync()] },
        { send: [serialize.query("select current_setting('TimeZone')")] },
      ];
      const want = await seen(direct, batches);
      assert.deepEqual(await seen(proxy.port, batches), want);
    });
  });
});

test('DISCARD ALL and DEALLOCATE ALL drop the client\'s named statements, as Postgres does: the name can be parsed again, a name not parsed again is gone', async () => {
  await withDirect(async (direct) => {
    await withTransactionPool('PoolSize=1', async (proxy) => {
      for (const command of ['discard all', 'deallocate all']) {
        const batches = [
          { send: [serialize.parse({ name: 'a', text: 'select 1 as v' }), serialize.parse({ name: 'b', text: 'select 2 as v' }), serialize.sync()] },
          { send: [serialize.query(command), serialize.parse({ name: 'a', text: 'select 3 as v' }), serialize.bind({ statement: 'a' }), serialize.execute(), serialize.sync()], readies: 2 },
          { send: [serialize.bind({ statement: 'b' }), serialize.execute(), serialize.sync()] },
        ];
        const want = await seen(direct, batches);
        assert.deepEqual(want, ['', 'row ["3"]', 'error 26000'], command);
        assert.deepEqual(await seen(proxy.port, batches), want, command);
      }
    });
  });
});

test('DISCARD ALL through the extended protocol (as pgjdbc sends it), with Parses pipelined behind it in the same Sync, as Postgres runs them', async () => {
  await withDirect(async (direct) => {
    await withTransactionPool('PoolSize=1', async (proxy) => {
      const batches = [
        { send: [serialize.parse({ name: 'a', text: 'select 1 as v' }), serialize.parse({ name: 'b', text: 'select 2 as v' }), serialize.sync()] },
        {
          send: [
            ...pbe('discard all'),
            serialize.parse({ name: 'a', text: 'select 3 as v' }), // the name is free again by then
            serialize.parse({ name: 'n', text: 'select 4 as v' }), // made behind it: stays
            serialize.bind({ statement: 'a' }),
            serialize.execute(),
            serialize.sync(),
          ],
        },
        { send: [serialize.bind({ statement: 'n' }), serialize.execute(), serialize.sync()] },
        { send: [serialize.bind({ statement: 'b' }), serialize.execute(), serialize.sync()] },
        // The same texts again, on the connection that ran the DISCARD ALL: prepared there anew.
        { send: [serialize.parse({ name: 'c', text: 'select 1 as v' }), serialize.bind({ statement: 'c' }), serialize.execute(), serialize.sync()] },
      ];
      const want = await seen(direct, batches);
      assert.deepEqual(want, ['', 'row ["3"]', 'row ["4"]', 'error 26000', 'row ["1"]']);
      assert.deepEqual(await seen(proxy.port, batches), want);
    });
  });
});

test('an undo after an error behind a DISCARD ALL or DEALLOCATE ALL brings back nothing it dropped: not an evicted statement (for the next client), not a closed name', async () => {
  await withTransactionPool('PoolSize=1;MaxPreparedStatements=1', async (proxy) => {
    const evicting = await seen(proxy.port, [
      { send: [serialize.parse({ name: 'y', text: 'select 7 as v' }), serialize.sync()] },
      // DISCARD ALL drops lp_y; the division fails, and the Close that evicted lp_y for q is skipped with the rest.
      { send: [...pbe('discard all'), ...pbe('select 1/0'), serialize.parse({ name: 'q', text: 'select 8 as v' }), serialize.sync()] },
    ]);
    assert.deepEqual(evicting, ['', 'error 22012']);
    // The next client's statement of y's text is prepared again, not taken for one the server has.
    assert.deepEqual(await seen(proxy.port, [{ send: [serialize.parse({ name: 'z', text: 'select 7 as v' }), serialize.bind({ statement: 'z' }), serialize.execute(), serialize.sync()] }]), ['row ["7"]']);
    const closing = await seen(proxy.port, [
      { send: [serialize.parse({ name: 'a', text: 'select 5 as v' }), serialize.sync()] },
      // DEALLOCATE ALL drops a; the Close of a behind the failure is skipped, and its undo must not bring a back.
      { send: [...pbe('deallocate all'), ...pbe('select 1/0'), serialize.close({ type: 'S', name: 'a' }), serialize.sync()] },
      { send: [serialize.parse({ name: 'a', text: 'select 9 as v' }), serialize.bind({ statement: 'a' }), serialize.execute(), serialize.sync()] },
    ]);
    assert.deepEqual(closing, ['', 'error 22012', 'row ["9"]']);
  });
});

test('a client that DEALLOCATEs one of the proxy\'s own statements by name does not break it for the next client', async () => {
  await withTransactionPool('PoolSize=1', async (proxy) => {
    const a = pgClient(proxy.port, db, {});
    await a.connect();
    try {
      assert.equal((await a.query({ name: 'q', text: 'select 11 as v' })).rows[0].v, 11);
      const name = (await a.query<{ name: string }>("select name from pg_prepared_statements where statement = 'select 11 as v'")).rows[0]?.name;
      assert.match(name ?? '', /^lp_/);
      await a.query(`deallocate "${name}"`);
    } finally {
      await a.end();
    }
    const b = pgClient(proxy.port, db, {});
    await b.connect();
    try {
      assert.equal((await b.query({ name: 'other', text: 'select 11 as v' })).rows[0].v, 11);
    } finally {
      await b.end();
    }
  });
});

test('a DISCARD ALL sent in the middle of a COPY FROM STDIN: the proxy answers as Postgres does (it ends the session), nothing waits behind it', async () => {
  await db.query('create table if not exists settings_copy (x int)');
  await db.query(`grant insert on settings_copy to "${db.tokenRole}"`);
  const run = async (port: number): Promise<string[]> => {
    const w = await wire(port);
    const seen: string[] = [];
    try {
      w.send(serialize.query('copy settings_copy from stdin'));
      for (let m = await w.next(); m.name !== 'copyInResponse'; m = await w.next()) seen.push(summary(m));
      w.send(serialize.query('discard all'));
      seen.push(...(await w.untilReady()).map(summary));
      w.send(serialize.query('select 1 as one'));
      seen.push(...(await w.untilReady(1, 10_000)).map(summary));
    } catch (error) {
      seen.push(`(${(error as Error).message})`);
    } finally {
      w.end();
    }
    return seen;
  };
  await withDirect(async (direct) => {
    await withTransactionPool('PoolSize=1', async (proxy) => {
      const want = await run(direct);
      assert.deepEqual(await run(proxy.port), want);
    });
  });
});
