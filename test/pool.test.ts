/**
 * Pooled upstream logins (PoolMode=session, the default) against a real Postgres: reuse without
 * the previous client's state, parameters per client, clients that leave mid-transaction or
 * mid-query, a full pool, token expiry, a server that closes an idle connection, idle close,
 * cancel through a reused connection, and PoolMode=none.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import type { TestPostgres } from './harness/postgres.js';
import { connectionFor, startProxy, type InProcessProxy } from './harness/proxy.js';
import { WireClient } from './harness/wire.js';
import { startTokenPostgres } from './harness/postgres.js';
import { cancelRequest, pgClient, sleep, waitUntil } from './reliability-support.js';
import { native } from '../src/proxy/native-relay.js';
import { createToken, type TokenSource } from '../src/token/token-source.js';
import { Metrics } from '../src/ops/metrics.js';

let db: TestPostgres;
const token = 'tok-' + randomBytes(600).toString('base64url');

before(async () => {
  db = await startTokenPostgres(token);
});
after(() => db?.stop());

/** A proxy with the pool's settings in its connection string; closed after `fn`. */
async function withPool<T>(extra: string, fn: (proxy: InProcessProxy) => Promise<T>, args: string[] = [], tokenSource?: TokenSource): Promise<T> {
  const proxy = await startProxy(['--connection', connectionFor(db, token, extra), '--relay', 'native', ...args], tokenSource ? { tokenSource } : {});
  try {
    return await fn(proxy);
  } finally {
    await proxy.close();
  }
}

async function pidOf(c: pg.Client): Promise<number> {
  return (await c.query<{ pid: number }>('select pg_backend_pid() as pid')).rows[0]?.pid as number;
}

/** One client: connect, run `fn`, end. */
async function session<T>(proxy: InProcessProxy, fn: (c: pg.Client) => Promise<T>, extra: Partial<pg.ClientConfig> = {}): Promise<T> {
  const c = pgClient(proxy.port, db, extra);
  await c.connect();
  try {
    return await fn(c);
  } finally {
    await c.end().catch(() => {});
  }
}

/** The pool's connection is back in the pool once the log says the session ended and a reset ran. */
async function released(proxy: InProcessProxy, sessions: number): Promise<void> {
  await waitUntil(() => proxy.logs.filter((l) => l['msg'] === 'session ended').length >= sessions, 5000, `${sessions} sessions ended`);
  await sleep(100); // the reset's round trip
}

function requireNative(t: { skip: (message: string) => void }): boolean {
  if (native.addon) return true;
  t.skip(`pooling needs the native relay: ${native.problem}`);
  return false;
}

test('a second client reuses the first one\'s connection and sees none of its state', async (t) => {
  if (!requireNative(t)) return;
  await withPool('', async (proxy) => {
    const first = await session(proxy, async (c) => {
      await c.query('create temp table leftover (x int)');
      await c.query('prepare leftover_stmt as select 1');
      await c.query("set work_mem = '1234kB'");
      await c.query('select pg_advisory_lock(4242)');
      await c.query('listen leftover_channel');
      await c.query('create temp sequence leftover_seq');
      await c.query("select nextval('leftover_seq')");
      return pidOf(c);
    });
    await released(proxy, 1);
    const seen = await session(proxy, async (c) => ({
      pid: await pidOf(c),
      temp: (await c.query("select count(*)::int as n from pg_class where relname in ('leftover', 'leftover_seq') and relpersistence = 't'")).rows[0].n,
      prepared: (await c.query('select count(*)::int as n from pg_prepared_statements')).rows[0].n,
      workMem: (await c.query('show work_mem')).rows[0].work_mem,
      locks: (await c.query("select count(*)::int as n from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()")).rows[0].n,
      channels: (await c.query('select count(*)::int as n from pg_listening_channels()')).rows[0].n,
    }));
    assert.equal(seen.pid, first, 'the same backend served both clients');
    assert.deepEqual({ ...seen, pid: 0 }, { pid: 0, temp: 0, prepared: 0, workMem: '4MB', locks: 0, channels: 0 });
    const ends = proxy.logs.filter((l) => l['msg'] === 'session ended');
    assert.deepEqual(
      ends.map((l) => [l['pooled'], l['reused']]),
      [
        [true, false],
        [true, true],
      ],
    );
    // The advisory lock is free for anyone now.
    assert.equal((await db.query<{ ok: boolean }>('select pg_try_advisory_lock(4242) as ok'))[0]?.ok, true);
    await db.query('select pg_advisory_unlock(4242)');
  });
});

test('clients that leave right after their greeting (Terminate and FIN at once, as a connection check does) leave the connection in the pool', async (t) => {
  if (!requireNative(t)) return;
  await withPool('', async (proxy) => {
    for (let i = 0; i < 5; i++) {
      const client = await WireClient.open(proxy.port, { user: 'app', database: db.database, application_name: 'pool-greet-leave' });
      client.end();
      await waitUntil(() => client.closed, 5000, 'the proxy closed the client');
    }
    await sleep(200); // the reset's round trip
    const backends = await db.query<{ pid: number }>("select pid from pg_stat_activity where application_name = 'pool-greet-leave' and backend_type = 'client backend'");
    assert.equal(backends.length, 1, 'one login served all five clients');
    assert.equal(await session(proxy, pidOf, { application_name: 'pool-greet-leave' }), backends[0]?.pid, 'and the next client reuses it');
  });
});

test('a client greeted while its connection is still being reset, gone before its relay starts, gives the connection back', async (t) => {
  if (!requireNative(t)) return;
  await withPool('PoolSize=1;ServerResetQuery=select pg_sleep(0.5)', async (proxy) => {
    const app = { user: 'app', database: db.database, application_name: 'pool-gone-early' };
    const first = await WireClient.open(proxy.port, app);
    first.end(); // its reset (half a second) starts
    await waitUntil(() => first.closed, 5000, 'the first client closed');
    await sleep(50);
    const second = await WireClient.open(proxy.port, app); // greeted at once; its relay waits for the reset
    second.socket.resetAndDestroy();
    await sleep(1500); // the reset, and the second client's own
    const backends = await db.query<{ pid: number }>("select pid from pg_stat_activity where application_name = 'pool-gone-early' and backend_type = 'client backend'");
    assert.equal(backends.length, 1, 'the connection stayed in the pool');
    assert.equal(await session(proxy, pidOf, { application_name: 'pool-gone-early' }), backends[0]?.pid);
  });
});

test('startup parameters per client: each sees what it asked for, and a reuse only among equal ones', async (t) => {
  if (!requireNative(t)) return;
  await withPool('PoolSize=1', async (proxy) => {
    const ask = { application_name: 'app-a', options: '-c work_mem=2MB -c statement_timeout=7s' };
    const show = async (c: pg.Client): Promise<Record<string, string>> => ({
      pid: String(await pidOf(c)),
      application_name: (await c.query('show application_name')).rows[0].application_name,
      work_mem: (await c.query('show work_mem')).rows[0].work_mem,
      statement_timeout: (await c.query('show statement_timeout')).rows[0].statement_timeout,
      TimeZone: (await c.query('show timezone')).rows[0].TimeZone,
    });
    const a1 = await session(proxy, show, ask);
    await released(proxy, 1);
    const a2 = await session(proxy, async (c) => {
      const shown = await show(c);
      await c.query("set application_name = 'changed'; set timezone = 'Asia/Tokyo'");
      return shown;
    }, ask);
    await released(proxy, 2);
    const b = await session(proxy, show, { application_name: 'app-b' });
    await released(proxy, 3);
    const a3 = await session(proxy, show, ask);
    assert.deepEqual({ ...a1, pid: '' }, { pid: '', application_name: 'app-a', work_mem: '2MB', statement_timeout: '7s', TimeZone: a1.TimeZone });
    assert.equal(a2.pid, a1.pid, 'the same parameters reuse the connection');
    assert.deepEqual(a2, a1);
    assert.equal(b.application_name, 'app-b');
    assert.equal(b.work_mem, '4MB', 'not the previous login\'s options');
    assert.equal(b.statement_timeout, '0');
    assert.notEqual(b.pid, a1.pid, 'other parameters: a login of their own (PoolSize 1: the idle one was closed for it)');
    assert.deepEqual({ ...a3, pid: '' }, { ...a1, pid: '' }, 'a SET of the previous client is gone');
  });
});

test('psql on a reused connection: the greeting carries the parameters a fresh login would', async (t) => {
  if (!requireNative(t)) return;
  const psql = spawnSync('psql', ['--version']).status === 0 ? 'psql' : undefined;
  if (!psql) {
    t.skip('no psql here');
    return;
  }
  await withPool('', async (proxy) => {
    // Not spawnSync: the proxy runs in this process and must go on serving while psql runs.
    const run = async (): Promise<string[]> => {
      const r = await runProgram(psql, ['-X', '-A', '-t', '-h', '127.0.0.1', '-p', String(proxy.port), '-U', 'anyone', '-d', db.database, '-c', "select pg_backend_pid(), current_setting('application_name'), current_setting('DateStyle')", '-c', '\\echo :SERVER_VERSION_NAME :ENCODING'], {
        env: { ...process.env, PGAPPNAME: 'psql-pool', PGDATESTYLE: 'SQL, DMY', PGCLIENTENCODING: 'LATIN1' },
      });
      assert.equal(r.status, 0, r.stderr);
      return r.stdout.trim().split('\n');
    };
    const [first, firstGreeting] = await run();
    await released(proxy, 1);
    const [second, secondGreeting] = await run();
    const [pid1, app1, style1] = (first as string).split('|');
    const [pid2, app2, style2] = (second as string).split('|');
    assert.equal(pid2, pid1, 'reused');
    assert.deepEqual([app1, style1, app2, style2], ['psql-pool', 'SQL, DMY', 'psql-pool', 'SQL, DMY']);
    assert.equal(secondGreeting, firstGreeting);
    assert.match(secondGreeting as string, /LATIN1$/);
  });
});

test('a client that vanishes inside a transaction: rolled back before the connection serves anyone else', async (t) => {
  if (!requireNative(t)) return;
  await db.query('create table if not exists pool_rollback (v text)');
  await db.query('grant all on pool_rollback to public');
  await withPool('', async (proxy) => {
    const c = pgClient(proxy.port, db);
    await c.connect();
    const pid = await pidOf(c);
    await c.query('begin');
    await c.query("insert into pool_rollback values ('uncommitted')");
    (c as unknown as { connection: { stream: import('node:net').Socket } }).connection.stream.destroy();
    await released(proxy, 1);
    const after = await session(proxy, async (c2) => ({
      pid: await pidOf(c2),
      rows: (await c2.query('select count(*)::int as n from pool_rollback')).rows[0].n,
      inTransaction: (await c2.query('select now() = statement_timestamp() as fresh')).rows[0].fresh,
    }));
    assert.deepEqual(after, { pid, rows: 0, inTransaction: true });
  });
});

test('a client that vanishes mid-query: the query is cancelled and that connection is not reused', async (t) => {
  if (!requireNative(t)) return;
  await withPool('', async (proxy) => {
    const c = pgClient(proxy.port, db, { application_name: 'pool-vanish' });
    c.on('error', () => {});
    await c.connect();
    const pid = await pidOf(c);
    void c.query('select pg_sleep(30)').catch(() => {});
    await waitUntil(async () => (await db.query("select count(*)::int as n from pg_stat_activity where pid = $1 and query like '%pg_sleep(30)%' and state = 'active'", [pid]))[0].n === 1, 5000, 'the query runs');
    (c as unknown as { connection: { stream: import('node:net').Socket } }).connection.stream.destroy();
    await waitUntil(async () => (await db.query('select count(*)::int as n from pg_stat_activity where pid = $1', [pid]))[0].n === 0, 10_000, 'the backend is gone');
    const next = await session(proxy, pidOf, { application_name: 'pool-vanish' });
    assert.notEqual(next, pid);
  });
});

test('a full pool: a waiting client is served when a connection comes free; another times out with an error naming the pool and QueryWaitTimeout', async (t) => {
  if (!requireNative(t)) return;
  await withPool('PoolSize=1;QueryWaitTimeout=1500', async (proxy) => {
    const holder = pgClient(proxy.port, db);
    await holder.connect();
    const holderPid = await pidOf(holder);
    const waiter = pgClient(proxy.port, db);
    const waiting = waiter.connect();
    await sleep(300);
    await holder.end();
    await waiting;
    assert.equal(await pidOf(waiter), holderPid, 'the waiter got the freed connection');
    const late = pgClient(proxy.port, db);
    const error = (await late.connect().then(
      () => undefined,
      (e: pg.DatabaseError) => e,
    )) as pg.DatabaseError | undefined;
    await late.end().catch(() => {});
    assert.ok(error, 'the third client was refused');
    assert.equal(error.code, '53300');
    assert.match(error.message, /pool test\/databricks_postgres .*QueryWaitTimeout \(1\.5 s\).*PoolSize/);
    await waiter.end();
    assert.ok((await db.backendsOf(db.tokenRole)) <= 1, 'never more than PoolSize upstream connections');
  });
});

test('a connection is not handed out once the token it logged in with expired', async (t) => {
  if (!requireNative(t)) return;
  let fetched = 0;
  const shortLived: TokenSource = {
    getToken: async () => {
      fetched++;
      return createToken(token, new Date(Date.now() + 1200));
    },
    describe: () => 'a short-lived test token',
    currentExpiry: () => undefined,
    close: async () => {},
  };
  await withPool(
    '',
    async (proxy) => {
      const first = await session(proxy, pidOf);
      await released(proxy, 1);
      const reused = await session(proxy, pidOf);
      assert.equal(reused, first, 'reused while the token is valid');
      await released(proxy, 2);
      await sleep(1400);
      const after = await session(proxy, pidOf);
      assert.notEqual(after, first, 'a new login once the token expired');
      assert.equal(fetched, 2);
      await waitUntil(async () => (await db.query('select count(*)::int as n from pg_stat_activity where pid = $1', [first]))[0].n === 0, 5000, 'the expired connection closed');
    },
    [],
    shortLived,
  );
});

test('a pooled connection the server terminated while idle is never handed out: the next client gets in', async (t) => {
  if (!requireNative(t)) return;
  await withPool('', async (proxy) => {
    const first = await session(proxy, pidOf);
    await released(proxy, 1);
    await db.query('select pg_terminate_backend($1)', [first]);
    // pg_terminate_backend returns before the backend has gone (and said so): once it has, the pool knows.
    await waitUntil(async () => (await db.query('select count(*)::int as n from pg_stat_activity where pid = $1', [first]))[0].n === 0, 5000, 'the backend is gone');
    const next = await session(proxy, async (c) => ({ pid: await pidOf(c), one: (await c.query('select 1 as one')).rows[0].one }));
    assert.notEqual(next.pid, first);
    assert.equal(next.one, 1);
  });
});

test('ServerCheckDelay: a connection idle longer answers an empty query first; a dead one is replaced', async (t) => {
  if (!requireNative(t)) return;
  await withPool('ServerCheckDelay=200', async (proxy) => {
    const first = await session(proxy, pidOf);
    await released(proxy, 1);
    await sleep(300);
    assert.equal(await session(proxy, pidOf), first, 'checked and reused');
  });
});

test('ServerIdleTimeout closes an idle pooled connection (a compute can scale to zero); MinPoolSize keeps some', async (t) => {
  if (!requireNative(t)) return;
  await withPool('ServerIdleTimeout=500', async (proxy) => {
    const first = await session(proxy, pidOf, { application_name: 'pool-idle' });
    await released(proxy, 1);
    await waitUntil(async () => (await db.query('select count(*)::int as n from pg_stat_activity where pid = $1', [first]))[0].n === 0, 5000, 'the idle connection closed');
  });
  await withPool('ServerIdleTimeout=300;MinPoolSize=1', async (proxy) => {
    const first = await session(proxy, pidOf);
    await released(proxy, 1);
    await sleep(1600);
    assert.equal(await session(proxy, pidOf), first, 'kept by MinPoolSize');
  });
});

test('a cancel through a reused connection reaches its query', async (t) => {
  if (!requireNative(t)) return;
  await withPool('', async (proxy) => {
    const first = await session(proxy, pidOf);
    await released(proxy, 1);
    const c = pgClient(proxy.port, db);
    await c.connect();
    try {
      assert.equal(await pidOf(c), first);
      const sleeping = c.query('select pg_sleep(30)');
      await sleep(200);
      const { processID, secretKey } = c as unknown as { processID: number; secretKey: number };
      assert.notEqual(processID, first, 'the client sees the proxy\'s key, not the server\'s');
      await cancelRequest(proxy.port, processID, secretKey);
      await assert.rejects(sleeping, (e: pg.DatabaseError) => e.code === '57014');
    } finally {
      await c.end();
    }
  });
});

test('PoolMode=none: one upstream login per client, as before', async (t) => {
  if (!requireNative(t)) return;
  await withPool('PoolMode=none', async (proxy) => {
    const first = await session(proxy, pidOf);
    await released(proxy, 1);
    const second = await session(proxy, pidOf);
    assert.notEqual(second, first);
    assert.equal(proxy.logs.filter((l) => l['msg'] === 'session ended' && l['pooled'] !== undefined).length, 0);
  });
});

test('1,000 short-lived clients, 50 at a time, never hold more than PoolSize upstream connections', async (t) => {
  if (!requireNative(t)) return;
  await withPool('PoolSize=5', async (proxy) => {
    let most = 0;
    let watching = true;
    const watcher = (async () => {
      while (watching) {
        most = Math.max(most, await db.backendsOf(db.tokenRole));
        await sleep(20);
      }
    })();
    let done = 0;
    const worker = async (n: number): Promise<void> => {
      for (let i = n; i < 1000; i += 50) {
        const v = await session(proxy, async (c) => (await c.query('select $1::int as v', [i])).rows[0].v as number);
        assert.equal(v, i);
        done++;
      }
    };
    await Promise.all(Array.from({ length: 50 }, (_, n) => worker(n)));
    watching = false;
    await watcher;
    assert.equal(done, 1000);
    assert.ok(most <= 5, `at most PoolSize upstream connections (saw ${most})`);
  });
});

/** Runs a program to its end without blocking this process's event loop. */
function runProgram(command: string, args: string[], options: { env: NodeJS.ProcessEnv }): Promise<{ status: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(command, args, { env: options.env });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (chunk: Buffer) => (stdout += chunk.toString('utf8')));
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString('utf8')));
    const timer = setTimeout(() => child.kill('SIGKILL'), 20_000);
    child.on('close', (status) => {
      clearTimeout(timer);
      resolve({ status, stdout, stderr });
    });
  });
}

test('/metrics counts the pool: a login, a reuse, a reset, connections by state, a close by reason', async (t) => {
  if (!requireNative(t)) return;
  const metrics = new Metrics();
  const proxy = await startProxy(['--connection', connectionFor(db, token, 'ServerIdleTimeout=400'), '--relay', 'native'], { observer: metrics.observerFor('pooled') });
  try {
    await session(proxy, pidOf);
    await released(proxy, 1);
    await session(proxy, pidOf);
    await released(proxy, 2);
    const sample = (text: string, name: string, labels = ''): number => {
      const line = text.split('\n').find((l) => l.startsWith(`lakebase_proxy_${name}{target="pooled"${labels}} `));
      return Number(line?.split(' ').at(-1));
    };
    const idle = await metrics.text();
    assert.equal(sample(idle, 'server_logins_total'), 1);
    assert.equal(sample(idle, 'server_reuses_total'), 1);
    assert.equal(sample(idle, 'server_resets_total'), 2);
    assert.equal(sample(idle, 'server_connections', ',state="idle"'), 1);
    assert.equal(sample(idle, 'server_connections', ',state="active"'), 0);
    assert.equal(sample(idle, 'clients_waiting'), 0);
    assert.equal(sample(idle, 'pool_wait_duration_seconds_count'), 2);
    await waitUntil(async () => sample(await metrics.text(), 'server_closes_total', ',reason="idle"') === 1, 5000, 'the idle close counted');
    assert.equal(sample(await metrics.text(), 'server_connections', ',state="idle"'), 0);
  } finally {
    await proxy.close();
  }
});

test('pgjdbc and psycopg2 on a reused connection: SHOW of each startup parameter equals what the driver asked for', async (t) => {
  if (!requireNative(t)) return;
  const jar = '/usr/share/java/postgresql.jar';
  const haveJdbc = existsSync(jar) && spawnSync('java', ['-version']).status === 0;
  const havePsycopg = spawnSync('/usr/bin/python3', ['-c', 'import psycopg2']).status === 0;
  if (!haveJdbc && !havePsycopg) {
    t.skip('neither pgjdbc (libpostgresql-jdbc-java) nor psycopg2 (python3-psycopg2) is installed');
    return;
  }
  await withPool('', async (proxy) => {
    const dir = mkdtempSync(join(tmpdir(), 'lbp-drivers-'));
    try {
      const runs: Array<{ name: string; run: () => Promise<string> }> = [];
      if (haveJdbc) {
        writeFileSync(
          join(dir, 'Show.java'),
          `import java.sql.*;
public class Show {
  public static void main(String[] a) throws Exception {
    try (Connection c = DriverManager.getConnection("jdbc:postgresql://127.0.0.1:${proxy.port}/${db.database}?user=anyone&ApplicationName=jdbc-pool&options=-c%20statement_timeout=5s&sslmode=disable");
         Statement s = c.createStatement()) {
      StringBuilder out = new StringBuilder();
      for (String q : new String[] {"select pg_backend_pid()", "show application_name", "show statement_timeout", "show DateStyle", "show extra_float_digits", "show client_encoding"}) {
        try (ResultSet r = s.executeQuery(q)) { r.next(); out.append(r.getString(1)).append('|'); }
      }
      System.out.println(out);
    }
  }
}
`,
        );
        runs.push({
          name: 'pgjdbc',
          run: async () => {
            const r = await runProgram('java', ['-cp', jar, join(dir, 'Show.java')], { env: process.env });
            assert.equal(r.status, 0, r.stderr);
            return r.stdout.trim();
          },
        });
      }
      if (havePsycopg) {
        writeFileSync(
          join(dir, 'show.py'),
          `import psycopg2
c = psycopg2.connect(host="127.0.0.1", port=${proxy.port}, user="anyone", dbname="${db.database}", application_name="psycopg-pool", options="-c statement_timeout=6s")
cur = c.cursor()
out = []
for q in ["select pg_backend_pid()", "show application_name", "show statement_timeout", "show DateStyle", "show extra_float_digits", "show client_encoding"]:
    cur.execute(q)
    out.append(str(cur.fetchone()[0]))
print("|".join(out) + "|")
c.close()
`,
        );
        runs.push({
          name: 'psycopg2',
          run: async () => {
            const r = await runProgram('/usr/bin/python3', [join(dir, 'show.py')], { env: process.env });
            assert.equal(r.status, 0, r.stderr);
            return r.stdout.trim();
          },
        });
      }
      let sessions = 0;
      for (const { name, run } of runs) {
        const first = (await run()).split('|');
        await released(proxy, ++sessions);
        const second = (await run()).split('|');
        await released(proxy, ++sessions);
        assert.equal(second[0], first[0], `${name}: the second connection reused the first's backend`);
        assert.deepEqual(second.slice(1), first.slice(1), `${name}: the same settings`);
        if (name === 'pgjdbc') assert.deepEqual(second.slice(1, 6), ['jdbc-pool', '5s', 'ISO, MDY', '3', 'UTF8']);
        else assert.deepEqual(second.slice(1, 3), ['psycopg-pool', '6s']);
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
