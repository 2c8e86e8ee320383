/**
 * PoolMode=transaction against a real Postgres: many clients on a small pool, named prepared
 * statements across server switches (node pg, pgjdbc, pgbench -M prepared), the LRU limit,
 * Close, settings per client, leaked state reset before reuse, cancel while queued and while
 * running, clients and servers that vanish mid-transaction, and random extended-protocol
 * sequences answered exactly as one Postgres session answers them.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import type { TestPostgres } from './harness/postgres.js';
import { connectionFor, startProxy, type InProcessProxy } from './harness/proxy.js';
import { busyClients, seeded, withPoolMode } from './pool-transaction-support.js';
import { startTokenPostgres } from './harness/postgres.js';
import { cancelRequest, pgClient, sleep, waitUntil } from './reliability-support.js';
import { findTool, run } from './harness/tools.js';
import { serialize, summary, WireClient } from './harness/wire.js';
import { Metrics } from '../src/ops/metrics.js';

let db: TestPostgres;
const token = 'tok-' + randomBytes(600).toString('base64url');
const pgbench = findTool('pgbench');

before(async () => {
  db = await startTokenPostgres(token);
  await db.query('create table if not exists tx_items (id int primary key, label text)');
  await db.query("insert into tx_items select g, 'item ' || g from generate_series(1, 100) g on conflict do nothing");
  await db.query(`grant select, insert, update, delete on tx_items to "${db.tokenRole}"`);
});
after(() => db?.stop());

const withTransactionPool = <T>(extra: string, fn: (proxy: InProcessProxy) => Promise<T>): Promise<T> => withPoolMode(db, token, 'transaction', extra, fn);

async function connected(proxy: InProcessProxy, extra: Partial<pg.ClientConfig> = {}): Promise<pg.Client> {
  const c = pgClient(proxy.port, db, extra);
  await c.connect();
  return c;
}

async function session<T>(proxy: InProcessProxy, fn: (c: pg.Client) => Promise<T>, extra: Partial<pg.ClientConfig> = {}): Promise<T> {
  const c = await connected(proxy, extra);
  try {
    return await fn(c);
  } finally {
    await c.end().catch(() => {});
  }
}

async function pidOf(c: pg.Client): Promise<number> {
  return (await c.query<{ pid: number }>('select pg_backend_pid() as pid')).rows[0]?.pid as number;
}

/** Backends of the proxy's role now: its upstream connections. */
async function upstreamCount(): Promise<number> {
  const rows = await db.query<{ n: number }>(`select count(*)::int as n from pg_stat_activity where usename = '${db.tokenRole}'`);
  return rows[0]?.n ?? 0;
}

/** The most upstream connections seen while `fn` runs (sampled every 20 ms). */
async function mostUpstream(fn: () => Promise<void>): Promise<number> {
  let most = 0;
  let running = true;
  const sampler = (async () => {
    while (running) {
      most = Math.max(most, await upstreamCount());
      await sleep(20);
    }
  })();
  try {
    await fn();
  } finally {
    running = false;
    await sampler;
  }
  return Math.max(most, await upstreamCount());
}

test('500 clients through PoolSize 5: every answer right, no error, never more than 5 upstream connections', async () => {
  await withTransactionPool('PoolSize=5', async (proxy) => {
    const wrong: string[] = [];
    const most = await mostUpstream(async () => {
      await Promise.all(
        Array.from({ length: 500 }, async (_, i) => {
          await session(proxy, async (c) => {
            const doubled = (await c.query('select $1::int * 2 as v', [i])).rows[0].v;
            const id = (i % 100) + 1;
            const label = (await c.query({ name: 'label', text: 'select label from tx_items where id = $1', values: [id] })).rows[0].label;
            await c.query('begin');
            const inside = (await c.query(`select ${i} as v`)).rows[0].v;
            await c.query('commit');
            if (doubled !== 2 * i || label !== `item ${id}` || inside !== i) wrong.push(`client ${i}: ${doubled} ${label} ${inside}`);
          });
        }),
      );
    });
    assert.deepEqual(wrong, []);
    assert.ok(most <= 5, `at most PoolSize upstream connections (saw ${most})`);
    const ends = proxy.logs.filter((l) => l['msg'] === 'session ended');
    assert.equal(ends.length, 500);
    assert.ok(ends.every((l) => l['end'] === 'client_closed'), 'every session ended by its client');
  });
});

test('a named statement prepared on one server connection runs on another (node pg)', async () => {
  await withTransactionPool('PoolSize=2', async (proxy) => {
    const a = await connected(proxy);
    const b = await connected(proxy);
    try {
      const statement = { name: 'where', text: 'select pg_backend_pid() as pid, $1::int * 3 as v' };
      const first = (await a.query({ ...statement, values: [1] })).rows[0];
      // b holds the connection a used (the most recently used one is handed out first).
      await b.query('begin');
      assert.equal(await pidOf(b), first.pid);
      const second = (await a.query({ ...statement, values: [2] })).rows[0];
      assert.notEqual(second.pid, first.pid, 'a ran on the other connection');
      assert.equal(second.v, 6);
      await b.query('commit');
      // And back: each connection now has it; b may use the same name for another text.
      const mine = (await b.query({ name: 'where', text: 'select $1::text as v', values: ['b'] })).rows[0];
      assert.equal(mine.v, 'b');
      assert.equal((await a.query({ ...statement, values: [3] })).rows[0].v, 9);
    } finally {
      await a.end();
      await b.end();
    }
  });
});

test('MaxPreparedStatements: a connection keeps the most recently used, and every statement still runs', async () => {
  await withTransactionPool('PoolSize=1;MaxPreparedStatements=3', async (proxy) => {
    await session(proxy, async (c) => {
      for (let round = 0; round < 2; round++) {
        for (let n = 1; n <= 5; n++) {
          const r = await c.query({ name: `s${n}`, text: `select $1::int + ${n} as v`, values: [10] });
          assert.equal(r.rows[0].v, 10 + n);
        }
      }
      const held = (await c.query("select count(*)::int as n from pg_prepared_statements where name like 'lp\\_%'")).rows[0].n;
      assert.equal(held, 3);
    });
  });
});

test('Close of a statement is answered here; a Parse of a name still in use fails with 42P05 up to its Sync', async () => {
  await withTransactionPool('PoolSize=1', async (proxy) => {
    const w = await WireClient.open(proxy.port, { user: 'anyone', database: db.database });
    try {
      w.send(serialize.parse({ name: 'a', text: 'select 1 as one' }), serialize.bind({ statement: 'a' }), serialize.execute(), serialize.sync());
      assert.deepEqual((await w.untilReady()).map(summary), ['parseComplete', 'bindComplete', 'row ["1"]', 'complete SELECT 1', 'ready I']);
      // The same name again: 42P05, and the Bind and Execute before the Sync are skipped.
      w.send(serialize.parse({ name: 'a', text: 'select 2' }), serialize.bind({ statement: 'a' }), serialize.execute(), serialize.sync());
      assert.deepEqual((await w.untilReady()).map(summary), ['error 42P05', 'ready I']);
      w.send(serialize.close({ type: 'S', name: 'a' }), serialize.sync());
      assert.deepEqual((await w.untilReady()).map(summary), ['closeComplete', 'ready I']);
      w.send(serialize.bind({ statement: 'a' }), serialize.execute(), serialize.sync());
      assert.deepEqual((await w.untilReady()).map(summary), ['error 26000', 'ready I']);
      w.send(serialize.parse({ name: 'a', text: 'select 2 as two' }), serialize.bind({ statement: 'a' }), serialize.execute(), serialize.sync());
      assert.deepEqual((await w.untilReady()).map(summary), ['parseComplete', 'bindComplete', 'row ["2"]', 'complete SELECT 1', 'ready I']);
    } finally {
      w.end();
    }
  });
});

test('settings follow each client: startup parameters, options and SET of reported ones, on a shared connection', async () => {
  await withTransactionPool('PoolSize=1', async (proxy) => {
    const show = async (c: pg.Client): Promise<string[]> => {
      const r = await c.query("select pg_backend_pid() as pid, current_setting('application_name') as app, current_setting('work_mem') as mem, current_setting('TimeZone') as tz, current_setting('DateStyle') as ds");
      return [r.rows[0].pid, r.rows[0].app, r.rows[0].mem, r.rows[0].tz, r.rows[0].ds];
    };
    const a = await connected(proxy, { application_name: 'client-a', options: '-c work_mem=2MB -c TimeZone=UTC' });
    const b = await connected(proxy, { application_name: 'client-b' });
    try {
      const [pidA, ...seenA] = await show(a);
      const [pidB, ...seenB] = await show(b);
      assert.equal(pidA, pidB, 'one connection served both');
      assert.deepEqual(seenA, ['client-a', '2MB', 'UTC', 'ISO, MDY']);
      assert.deepEqual(seenB.slice(0, 2), ['client-b', '4MB']);
      assert.notEqual(seenB[2], 'UTC');
      await a.query("set application_name = 'renamed-a'");
      await b.query("set DateStyle = 'German, DMY'");
      assert.deepEqual((await show(a)).slice(1), ['renamed-a', '2MB', 'UTC', 'ISO, MDY']);
      assert.deepEqual((await show(b)).slice(1, 2).concat((await show(b)).slice(4)), ['client-b', 'German, DMY']);
    } finally {
      await a.end();
      await b.end();
    }
  });
});

test('state a client leaves behind is reset before another client uses the connection, and the client is told once', async () => {
  const kinds: Array<{ kind: string; leave: string; check: string }> = [
    { kind: 'temporary table', leave: 'create temp table leftover (x int)', check: "select count(*)::int as n from pg_class where relname = 'leftover' and relpersistence = 't'" },
    { kind: 'SET of an unreported setting', leave: "set work_mem = '1234kB'", check: "select (current_setting('work_mem') = '1234kB')::int as n" },
    { kind: 'LISTEN', leave: 'listen leftover_channel', check: 'select count(*)::int as n from pg_listening_channels()' },
    { kind: 'SQL PREPARE', leave: 'prepare leftover_stmt as select 1', check: "select count(*)::int as n from pg_prepared_statements where name = 'leftover_stmt'" },
    { kind: 'advisory lock', leave: 'select pg_advisory_lock(4243)', check: "select count(*)::int as n from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()" },
    { kind: 'WITH HOLD cursor', leave: 'declare leftover_cursor cursor with hold for select 1', check: "select count(*)::int as n from pg_cursors where name = 'leftover_cursor'" },
  ];
  await withTransactionPool('PoolSize=1', async (proxy) => {
    for (const { kind, leave, check } of kinds) {
      const notices: string[] = [];
      const pid = await session(proxy, async (c) => {
        c.on('notice', (n) => notices.push(n.message ?? ''));
        await c.query(leave);
        await c.query('select 1');
        await c.query(leave.startsWith('create') ? 'create temp table leftover2 (x int)' : 'select 2');
        return pidOf(c);
      });
      const seen = await session(proxy, async (c) => ({ pid: await pidOf(c), n: (await c.query(check)).rows[0].n }));
      assert.equal(seen.n, 0, `${kind}: the next client sees none of it`);
      assert.equal(seen.pid, pid, `${kind}: the connection was reset and reused, not replaced`);
      assert.equal(notices.filter((n) => n.includes('PoolMode=transaction')).length, 1, `${kind}: one notice (${notices.join(' | ')})`);
    }
    // A SET of a setting the server reports follows the client and leaves nothing.
    const notices: string[] = [];
    await session(proxy, async (c) => {
      c.on('notice', (n) => notices.push(n.message ?? ''));
      await c.query("set application_name = 'fine'");
    });
    assert.deepEqual(notices, []);
  });
});

test('cancel: a running query is cancelled; a client with nothing running (queued for a connection) is not affected', async () => {
  await withTransactionPool('PoolSize=1', async (proxy) => {
    const w = await WireClient.open(proxy.port, { user: 'anyone', database: db.database });
    try {
      w.send(serialize.query('select pg_sleep(30)'));
      await waitUntil(async () => (await db.query<{ n: number }>("select count(*)::int as n from pg_stat_activity where query = 'select pg_sleep(30)' and state = 'active'"))[0]?.n === 1, 10_000, 'the sleep runs');
      await cancelRequest(proxy.port, w.processId, w.secretKey);
      assert.deepEqual((await w.untilReady()).map(summary).slice(-2), ['error 57014', 'ready I']);
      // Queued: the only connection is held by another client's transaction.
      const holder = await connected(proxy);
      await holder.query('begin');
      w.send(serialize.query('select 7 as seven'));
      await sleep(200);
      await cancelRequest(proxy.port, w.processId, w.secretKey);
      await sleep(200);
      await holder.query('commit');
      await holder.end();
      assert.deepEqual((await w.untilReady()).map(summary), ['rowDescription', 'row ["7"]', 'complete SELECT 1', 'ready I']);
    } finally {
      w.end();
    }
  });
});

test('a client that vanishes mid-transaction: rolled back before the connection serves another client', async () => {
  await withTransactionPool('PoolSize=1', async (proxy) => {
    const w = await WireClient.open(proxy.port, { user: 'anyone', database: db.database });
    w.send(serialize.query("begin; insert into tx_items values (1000, 'never')"));
    await w.untilReady();
    w.send(serialize.query('select pg_backend_pid()'));
    const pid = Number(((await w.untilReady()).find((m) => m.name === 'dataRow') as unknown as { fields: string[] }).fields[0]);
    w.socket.destroy();
    const seen = await session(proxy, async (c) => ({ pid: await pidOf(c), n: (await c.query('select count(*)::int as n from tx_items where id = 1000')).rows[0].n }));
    assert.deepEqual(seen, { pid, n: 0 });
    // Mid-query: the query is cancelled and its connection closed; the next client gets a new one.
    const v = await WireClient.open(proxy.port, { user: 'anyone', database: db.database });
    v.send(serialize.query('select pg_sleep(30)'));
    await waitUntil(async () => (await db.query<{ n: number }>("select count(*)::int as n from pg_stat_activity where query = 'select pg_sleep(30)' and state = 'active'"))[0]?.n === 1, 10_000, 'the sleep runs');
    v.socket.destroy();
    assert.equal(await session(proxy, async (c) => (await c.query('select 5 as v')).rows[0].v), 5);
    await waitUntil(async () => (await db.query<{ n: number }>("select count(*)::int as n from pg_stat_activity where query = 'select pg_sleep(30)'"))[0]?.n === 0, 10_000, 'the sleep ends');
  });
});

test('pg_terminate_backend of a server mid-transaction: its client gets an error and ends, the others go on', async () => {
  await withTransactionPool('PoolSize=2', async (proxy) => {
    const a = await WireClient.open(proxy.port, { user: 'anyone', database: db.database });
    const b = await connected(proxy);
    try {
      a.send(serialize.query('begin; select pg_backend_pid()'));
      const pidA = Number(((await a.untilReady()).find((m) => m.name === 'dataRow') as unknown as { fields: string[] }).fields[0]);
      await b.query('begin');
      assert.notEqual(await pidOf(b), pidA);
      await db.query(`select pg_terminate_backend(${pidA})`);
      a.send(serialize.query('select 1'));
      const codes: string[] = [];
      while (!a.closed || a.pending > 0) {
        const message = await a.next().catch(() => undefined);
        if (!message) break;
        if (message.name === 'error') codes.push((message as unknown as { code: string }).code);
      }
      // The server's own FATAL (57P01) when it came first, then the proxy's 08006; the session ends.
      assert.ok(codes.length > 0 && codes.every((code) => ['57P01', '08006'].includes(code)), `a got ${codes.join(', ')}`);
      assert.ok(a.closed);
      assert.equal((await b.query('select 3 as v')).rows[0].v, 3);
      await b.query('commit');
      assert.equal(await session(proxy, async (c) => (await c.query('select 4 as v')).rows[0].v), 4);
    } finally {
      a.end();
      await b.end();
    }
  });
});

test('pgbench -M prepared, 8 clients on PoolSize 2: every transaction done, none failed', { skip: pgbench ? false : 'pgbench is not installed' }, async () => {
  await withTransactionPool('PoolSize=2', async (proxy) => {
    const dir = mkdtempSync(join(tmpdir(), 'tx-bench-'));
    try {
      const script = join(dir, 'select.sql');
      writeFileSync(script, '\\set id random(1, 100)\nselect label from tx_items where id = :id;\nselect :id::int * 2;\n');
      const ran = await run(pgbench as string, ['-n', '-M', 'prepared', '-c', '8', '-j', '2', '-t', '200', '-f', script, '-h', '127.0.0.1', '-p', String(proxy.port), '-U', 'anyone', db.database], {
        env: { PGCONNECT_TIMEOUT: '10' },
        timeoutMs: 120_000,
      });
      assert.equal(ran.code, 0, ran.stderr + ran.stdout);
      assert.match(ran.stdout, /number of transactions actually processed: 1600\/1600/);
      const failed = /number of failed transactions: (\d+)/.exec(ran.stdout);
      if (failed) assert.equal(failed[1], '0', ran.stdout);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

test('pgjdbc with server-side prepared statements (prepareThreshold=1) across server switches', async (t) => {
  const jar = '/usr/share/java/postgresql.jar';
  if (!existsSync(jar) || spawnSync('java', ['-version']).status !== 0) {
    t.skip('pgjdbc (libpostgresql-jdbc-java) is not installed');
    return;
  }
  await withTransactionPool('PoolSize=2', async (proxy) => {
    const dir = mkdtempSync(join(tmpdir(), 'tx-jdbc-'));
    try {
      writeFileSync(
        join(dir, 'Switch.java'),
        `import java.sql.*;
public class Switch {
  public static void main(String[] args) throws Exception {
    String url = "jdbc:postgresql://127.0.0.1:${proxy.port}/${db.database}?user=anyone&sslmode=disable&prepareThreshold=1";
    try (Connection a = DriverManager.getConnection(url); Connection b = DriverManager.getConnection(url)) {
      PreparedStatement ps = a.prepareStatement("select pg_backend_pid(), ?::int * 3, label from tx_items where id = ?");
      java.util.Set<Integer> pids = new java.util.HashSet<>();
      for (int i = 1; i <= 20; i++) {
        if (i % 3 == 0) { b.setAutoCommit(false); b.createStatement().execute("select 1"); }
        ps.setInt(1, i); ps.setInt(2, i);
        try (ResultSet r = ps.executeQuery()) {
          r.next();
          pids.add(r.getInt(1));
          if (r.getInt(2) != 3 * i || !r.getString(3).equals("item " + i)) throw new RuntimeException("wrong answer at " + i);
        }
        if (i % 3 == 0) { b.commit(); b.setAutoCommit(true); }
      }
      System.out.println("pids " + pids.size());
    }
  }
}
`,
      );
      const ran = await run('java', ['-cp', jar, join(dir, 'Switch.java')], { timeoutMs: 120_000 });
      assert.equal(ran.code, 0, ran.stderr + ran.stdout);
      assert.match(ran.stdout, /pids 2/, 'the statement ran on both connections');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

/** A random extended-protocol workload, the same for a given seed. */
function* workload(seed: number, steps: number): Generator<Buffer[]> {
  const random = seeded(seed);
  const texts = ['select $1::int * 2 as v', 'select label from tx_items where id = $1::int', 'select 10 / ($1::int + floor(random())::int) as q', "select $1::int as v, 'x' || $1::text as t"];
  const names = ['s1', 's2', 's3'];
  for (let i = 0; i < steps; i++) {
    // A simple query on its own (one ReadyForQuery either way: an extended sequence skips one after an error).
    if (random(5) === 0) {
      yield [serialize.query((['begin', 'commit', 'rollback', 'select 42'] as const)[random(4)] as string)];
      continue;
    }
    const batch: Buffer[] = [];
    const messages = 1 + random(5);
    for (let m = 0; m < messages; m++) {
      const value = String(random(4)); // 0 makes the division fail
      switch (random(7)) {
        case 0:
        case 1:
          batch.push(serialize.parse({ name: names[random(names.length)] as string, text: texts[random(texts.length)] as string }));
          break;
        case 2:
        case 3: {
          const statement = random(4) === 0 ? '' : (names[random(names.length)] as string);
          if (statement === '') batch.push(serialize.parse({ text: texts[random(texts.length)] as string }));
          batch.push(serialize.bind({ statement, values: [value] }), serialize.execute());
          break;
        }
        case 4:
          batch.push(serialize.describe({ type: 'S', name: names[random(names.length)] as string }));
          break;
        case 5:
          batch.push(serialize.close({ type: 'S', name: names[random(names.length)] as string }));
          break;
        default:
          batch.push(serialize.flush());
      }
    }
    batch.push(serialize.sync());
    yield batch;
  }
}

test('random extended-protocol sequences on a pool shared with busy clients: answered exactly as one Postgres session answers them', async () => {
  const alone = await startProxy(['--connection', connectionFor(db, token, 'PoolMode=none')]);
  try {
    await withTransactionPool('PoolSize=2;MaxPreparedStatements=2', async (proxy) => {
      const noise = busyClients(proxy.port, db);
      try {
        for (let seed = 1; seed <= 6; seed++) {
          const pooled = await WireClient.open(proxy.port, { user: 'anyone', database: db.database });
          const direct = await WireClient.open(alone.port, { user: 'anyone', database: db.database });
          try {
            let step = 0;
            for (const batch of workload(seed, 40)) {
              step++;
              pooled.send(...batch);
              direct.send(...batch);
              const [got, want] = await Promise.all([pooled.untilReady(), direct.untilReady()]).catch((error: Error) => {
                throw new Error(`seed ${seed}, step ${step} (${batch.map((b) => String.fromCharCode(b[0] as number)).join('')}): ${error.message}`);
              });
              assert.deepEqual(got.map(summary), want.map(summary), `seed ${seed}, step ${step}`);
            }
          } finally {
            pooled.end();
            direct.end();
          }
        }
      } finally {
        assert.deepEqual(await noise.stop(), [], 'the busy clients');
      }
    });
  } finally {
    await alone.close();
  }
});

test('/metrics counts transactions, prepared statements prepared and reused, and resets for leaked state', async () => {
  const metrics = new Metrics();
  const proxy = await startProxy(['--connection', connectionFor(db, token, 'PoolMode=transaction;PoolSize=1')], { observer: metrics.observerFor('tx') });
  try {
    await session(proxy, async (c) => {
      for (let i = 1; i <= 3; i++) await c.query({ name: 'counted', text: 'select $1::int as v', values: [i] });
      await c.query('listen counted_channel');
    });
    await session(proxy, async (c) => c.query('select 1'));
    const sample = (text: string, name: string, labels = ''): number => {
      const line = text.split('\n').find((l) => l.startsWith(`lakebase_proxy_${name}{target="tx"${labels}} `));
      return Number(line?.split(' ').at(-1));
    };
    const text = await metrics.text();
    // Three statements, a LISTEN, a SELECT (the greetings are not the clients' transactions).
    assert.equal(sample(text, 'pool_transactions_total'), 5);
    assert.equal(sample(text, 'prepared_statements_total', ',outcome="prepared"'), 1);
    // Each Bind found the statement on the connection (the first right after its Parse).
    assert.equal(sample(text, 'prepared_statements_total', ',outcome="reused"'), 3);
    assert.equal(sample(text, 'server_leak_resets_total'), 1);
    assert.equal(sample(text, 'server_logins_total'), 1);
  } finally {
    await proxy.close();
  }
});

test('shutdown: a client between transactions is told and closed at once; one in a transaction finishes it first', async () => {
  const proxy = await startProxy(['--connection', connectionFor(db, token, 'PoolMode=transaction;PoolSize=2')]);
  try {
    const idle = await WireClient.open(proxy.port, { user: 'anyone', database: db.database });
    const busy = await connected(proxy);
    await busy.query('begin');
    await busy.query("insert into tx_items values (2000, 'committed during the drain')");
    proxy.server.refuseNewClients();
    const farewell = await idle.next();
    assert.equal((farewell as unknown as { code: string }).code, '57P01');
    await waitUntil(() => idle.closed, 5000, 'the idle client closed');
    await busy.query('commit');
    const after = await busy.query('select 1').then(
      () => 'answered',
      (error: { code?: string; message: string }) => error.code ?? error.message,
    );
    assert.notEqual(after, 'answered', 'no transaction after the one that was running');
    await proxy.server.drained();
    assert.equal((await db.query<{ n: number }>('select count(*)::int as n from tx_items where id = 2000'))[0]?.n, 1);
    await busy.end().catch(() => {});
  } finally {
    await db.query('delete from tx_items where id = 2000');
    await proxy.close();
  }
});

test('a client whose startup the pool has seen is greeted without a connection: it connects while every connection is busy', async () => {
  await withTransactionPool('PoolSize=1;QueryWaitTimeout=3s', async (proxy) => {
    await session(proxy, async (c) => c.query('select 1'), { application_name: 'seen' });
    const holder = await connected(proxy);
    await holder.query('begin');
    try {
      // The only connection is in the holder's transaction: a greeting that needed it would time out (53300).
      const late = await connected(proxy, { application_name: 'seen' });
      const answer = late.query('select 8 as v');
      await holder.query('commit');
      assert.equal((await answer).rows[0].v, 8);
      assert.equal((await late.query('show application_name')).rows[0].application_name, 'seen');
      await late.end();
    } finally {
      await holder.end();
    }
  });
});
