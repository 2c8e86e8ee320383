/**
 * Review probes for PoolMode=transaction: each test states what a client must see (what one
 * Postgres session, or PoolMode=none, shows) in a case the first tests did not cover.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import pg from 'pg';
import type { TestPostgres } from './harness/postgres.js';
import { connectionFor, startProxy, type InProcessProxy } from './harness/proxy.js';
import { answersAlike, busyClients, seeded, withPoolMode, type Step } from './pool-transaction-support.js';
import { startTokenPostgres } from './harness/postgres.js';
import { cancelRequest, LONG, pgClient, sleep, waitUntil } from './reliability-support.js';
import { serialize, summary, WireClient } from './harness/wire.js';
import type { BackendMessage } from 'pg-protocol/dist/messages.js';
import { createToken, TokenError, type Token, type TokenSource } from '../src/token/token-source.js';

let db: TestPostgres;
const token = 'tok-' + randomBytes(600).toString('base64url');

before(async () => {
  db = await startTokenPostgres(token);
  const role = `"${db.tokenRole}"`;
  await db.query('create table if not exists rv_items (id int primary key, label text)');
  await db.query("insert into rv_items select g, 'item ' || g from generate_series(1, 100) g on conflict do nothing");
  await db.query('create table if not exists rv_copy (x int)');
  await db.query(`grant select, insert, update, delete on rv_items, rv_copy to ${role}`);
  await db.query(`create schema if not exists rv_sa authorization ${role}`);
  await db.query(`create schema if not exists rv_sb authorization ${role}`);
  await db.query('create table if not exists rv_sa.rv_t (x int)');
  await db.query('create table if not exists rv_sb.rv_t (y text)');
  await db.query('insert into rv_sa.rv_t values (1)');
  await db.query("insert into rv_sb.rv_t values ('b')");
  await db.query(`grant select on rv_sa.rv_t, rv_sb.rv_t to ${role}`);
});
after(() => db?.stop());

const withTransactionPool = <T>(extra: string, fn: (proxy: InProcessProxy) => Promise<T>): Promise<T> => withPoolMode(db, token, 'transaction', extra, fn);

/** A proxy that logs in once per client: what one Postgres session answers. */
const withDirect = <T>(fn: (port: number) => Promise<T>): Promise<T> => withPoolMode(db, token, 'none', '', (proxy) => fn(proxy.port));

const wire = (port: number, startup: Record<string, string> = {}): Promise<WireClient> => WireClient.open(port, { user: 'anyone', database: db.database, ...startup });

async function connected(port: number, extra: Partial<pg.ClientConfig> = {}): Promise<pg.Client> {
  const c = pgClient(port, db, extra);
  await c.connect();
  return c;
}

async function one<T = unknown>(port: number, sql: string, extra: Partial<pg.ClientConfig> = {}): Promise<T> {
  const c = await connected(port, extra);
  try {
    return Object.values((await c.query(sql)).rows[0] as Record<string, unknown>)[0] as T;
  } finally {
    await c.end().catch(() => {});
  }
}

/** Messages until one named `name` (included). */
async function until(w: WireClient, name: string): Promise<string[]> {
  const out: string[] = [];
  for (;;) {
    const m = await w.next();
    out.push(summary(m));
    if (m.name === name) return out;
  }
}

/** The same batches on a pooled and a direct client; the answers up to `readies` ReadyForQuery each must match. */
async function differential(pooledPort: number, directPort: number, steps: Step[], startup: Record<string, string> = {}): Promise<void> {
  const pooled = await wire(pooledPort, startup);
  const direct = await wire(directPort, startup);
  try {
    await answersAlike(pooled, direct, steps, async (w, step) => (step.until ? until(w, step.until) : (await w.untilReady(step.readies ?? 1)).map(summary)));
  } finally {
    pooled.end();
    direct.end();
  }
}

test('COPY FROM STDIN over the extended protocol with its Sync sent first (libpq does): answered as Postgres does, and the connection goes back', async () => {
  await withTransactionPool('PoolSize=1;QueryWaitTimeout=3s', async (proxy) => {
    const w = await wire(proxy.port);
    try {
      // A statement the connection then has.
      w.send(serialize.parse({ name: 'n', text: 'select 2 as two' }), serialize.sync());
      assert.deepEqual((await w.untilReady()).map(summary), ['parseComplete', 'ready I']);
      w.send(serialize.parse({ text: 'copy rv_copy from stdin' }), serialize.bind({}), serialize.execute(), serialize.sync());
      assert.deepEqual(await until(w, 'copyInResponse'), ['parseComplete', 'bindComplete', 'copyInResponse']);
      // Postgres ignores a Sync in copy-in mode: libpq sends another after CopyDone.
      w.send(serialize.copyData(Buffer.from('1\n')), serialize.copyDone(), serialize.sync());
      assert.deepEqual((await w.untilReady()).map(summary), ['complete COPY 1', 'ready I']);
      // The connection is back in the pool: another client gets it.
      assert.equal(await one(proxy.port, 'select 3 as v'), 3);
      // A Parse the connection has already is answered at once.
      w.send(serialize.parse({ name: 'm', text: 'select 2 as two' }), serialize.bind({ statement: 'm' }), serialize.execute(), serialize.sync());
      assert.deepEqual((await w.untilReady(1, 5000)).map(summary), ['parseComplete', 'bindComplete', 'row ["2"]', 'complete SELECT 1', 'ready I']);
    } finally {
      w.end();
    }
  });
});

test('a Flush from a client with nothing running does not keep a connection from the others', async () => {
  await withTransactionPool('PoolSize=1;QueryWaitTimeout=3s', async (proxy) => {
    const w = await wire(proxy.port);
    try {
      w.send(serialize.flush());
      await sleep(300);
      assert.equal(await one(proxy.port, 'select 1 as v'), 1);
    } finally {
      w.end();
    }
  });
});

test('COPY data a client still sends after its COPY failed does not take a connection', async () => {
  await withTransactionPool('PoolSize=1;QueryWaitTimeout=3s', async (proxy) => {
    const w = await wire(proxy.port);
    try {
      w.send(serialize.query('copy rv_copy from stdin'));
      await until(w, 'copyInResponse');
      w.send(serialize.copyData(Buffer.from('not a number\n')));
      assert.deepEqual((await w.untilReady()).map(summary), ['error 22P02', 'ready I']);
      // What was on its way when the error came.
      w.send(serialize.copyData(Buffer.from('5\n')), serialize.copyDone());
      await sleep(300);
      assert.equal(await one(proxy.port, 'select 1 as v'), 1);
    } finally {
      w.end();
    }
  });
});

test('search_path from the startup options is in force (Postgres 18 reports search_path)', async () => {
  await withDirect(async (direct) => {
    await withTransactionPool('PoolSize=1', async (proxy) => {
      const sql = "select current_setting('search_path') as v";
      const want = await one(direct, sql, { options: '-c search_path=rv_sa' });
      assert.equal(want, 'rv_sa');
      assert.equal(await one(proxy.port, sql, { options: '-c search_path=rv_sa' }), want);
    });
  });
});

test('SET search_path does not reach the next client of the connection', async () => {
  await withTransactionPool('PoolSize=1', async (proxy) => {
    const a = await connected(proxy.port);
    await a.query('set search_path = rv_sa');
    await a.end();
    assert.equal(await one(proxy.port, "select current_setting('search_path') as v"), '"$user", public');
  });
});

test('set_config of an unreported setting does not reach the next client of the connection', async () => {
  await withTransactionPool('PoolSize=1', async (proxy) => {
    const a = await connected(proxy.port);
    await a.query("select set_config('work_mem', '1234kB', false)");
    await a.end();
    assert.notEqual(await one(proxy.port, "select current_setting('work_mem') as v"), '1234kB');
    // One that is local leaves nothing: the connection is not reset (no NOTICE).
    const b = await connected(proxy.port);
    const notices: string[] = [];
    b.on('notice', (n) => notices.push(n.message ?? ''));
    await b.query("select set_config('rv.tenant', '42', true)");
    await b.query('select 1');
    await b.end();
    assert.deepEqual(notices, []);
  });
});

test('a SET hidden behind RESET ALL (one command tag, several ParameterStatus) does not reach the next client', async () => {
  await withTransactionPool('PoolSize=1', async (proxy) => {
    const a = await connected(proxy.port, { application_name: 'rv-a', options: '-c TimeZone=Asia/Tokyo' });
    await a.query("reset all; set work_mem = '1234kB'");
    await a.end();
    assert.notEqual(await one(proxy.port, "select current_setting('work_mem') as v"), '1234kB');
  });
});

test('temporary tables made without CREATE TEMP TABLE do not reach the next client', async () => {
  await withTransactionPool('PoolSize=1', async (proxy) => {
    for (const leave of ['select 1 as x into temp rv_tmp1', 'create table pg_temp.rv_tmp2 (x int)', 'create temp recursive view rv_tmp3 (n) as select 1 union all select n + 1 from rv_tmp3 where n < 2']) {
      const a = await connected(proxy.port);
      await a.query(leave);
      await a.end();
      assert.equal(await one(proxy.port, 'select count(*)::int as n from pg_class where relnamespace = pg_my_temp_schema()'), 0, leave);
    }
  });
});

test('a statement name whose Parse failed may be parsed again later in the same pipeline', async () => {
  await withDirect(async (direct) => {
    await withTransactionPool('PoolSize=1', async (proxy) => {
      await differential(proxy.port, direct, [
        {
          send: [
            serialize.parse({ name: 'a', text: 'select from nowhere_at_all' }),
            serialize.sync(),
            serialize.parse({ name: 'a', text: 'select 1 as one' }),
            serialize.bind({ statement: 'a' }),
            serialize.execute(),
            serialize.sync(),
          ],
          readies: 2,
        },
      ]);
    });
  });
});

test('a query sent with Terminate right behind it still runs (as Postgres runs it)', async () => {
  await withTransactionPool('PoolSize=1', async (proxy) => {
    const w = await wire(proxy.port);
    w.socket.end(Buffer.concat([serialize.query("insert into rv_items values (5001, 'fire and forget')"), serialize.end()]));
    await waitUntil(async () => (await db.query<{ n: number }>('select count(*)::int as n from rv_items where id = 5001'))[0]?.n === 1, 10_000, 'the insert ran');
  });
});

test('SET LOCAL (what the NOTICE recommends) is not reported as leaked session state; a SET hidden behind one is', async () => {
  await withTransactionPool('PoolSize=1', async (proxy) => {
    const c = await connected(proxy.port);
    const notices: string[] = [];
    c.on('notice', (n) => notices.push(n.message ?? ''));
    try {
      await c.query('begin');
      await c.query("set local work_mem = '2MB'");
      await c.query({ text: "set local statement_timeout = '5s'", queryMode: 'extended' } as pg.QueryConfig); // extended protocol: its Parse text
      await c.query('commit');
      await c.query('select 1');
      assert.deepEqual(notices, []);
      // One text, a SET LOCAL and a SET: the SET leaves session state, and is told.
      await c.query("set local work_mem = '3MB'; set work_mem = '5MB'");
      await c.query('select 1');
      assert.equal(notices.length, 1);
      assert.match(notices[0] ?? '', /PoolMode=transaction/);
    } finally {
      await c.end();
    }
  });
});

test('clients with different search_path share no plan: each reads its own schema through the same statement text', async () => {
  await withTransactionPool('PoolSize=1', async (proxy) => {
    const a = await connected(proxy.port, { options: '-c search_path=rv_sa' });
    const b = await connected(proxy.port, { options: '-c search_path=rv_sb' });
    try {
      const q = { name: 'q', text: 'select * from rv_t' };
      assert.deepEqual((await a.query(q)).rows, [{ x: 1 }]);
      assert.deepEqual((await b.query(q)).rows, [{ y: 'b' }]);
    } finally {
      await a.end();
      await b.end();
    }
  });
});

test('malformed client messages: 08P01 for the client, the proxy goes on', async () => {
  const frame = (type: string, body: Buffer): Buffer => {
    const out = Buffer.alloc(5 + body.length);
    out.write(type, 0, 'latin1');
    out.writeInt32BE(4 + body.length, 1);
    body.copy(out, 5);
    return out;
  };
  const cases: Array<[string, Buffer]> = [
    ['Parse without terminator', frame('P', Buffer.from('abc'))],
    ['Parse with a negative count', frame('P', Buffer.from([0x61, 0, 0x73, 0, 0xff, 0xff]))],
    ['Bind without terminator', frame('B', Buffer.from('p'))],
    ['Describe of kind X', frame('D', Buffer.from('Xname\0'))],
    ['Close with trailing bytes', frame('C', Buffer.from('Sname\0zz'))],
    ['length 3', Buffer.from([0x51, 0, 0, 0, 3])],
    ['length 2 GiB', Buffer.from([0x51, 0x7f, 0xff, 0xff, 0xff])],
  ];
  await withTransactionPool('PoolSize=1', async (proxy) => {
    for (const [what, bytes] of cases) {
      const w = await wire(proxy.port);
      w.send(bytes);
      const m = await w.next();
      assert.equal(summary(m), 'error 08P01', what);
      w.socket.destroy();
    }
    assert.equal(await one(proxy.port, 'select 1 as v'), 1);
  });
});

test('a client that leaves while the pool has no connection (all closed idle) does not end the pool of the clients still there', async () => {
  await withTransactionPool('PoolSize=1;ServerIdleTimeout=1s', async (proxy) => {
    const a = await connected(proxy.port);
    const b = await connected(proxy.port);
    try {
      await a.query('select 1');
      await b.query('select 1');
      // ServerIdleTimeout closes the idle connection: the pool has none.
      await waitUntil(async () => (await db.backendsOf(db.tokenRole)) === 0, 20_000, 'the idle connection closed');
      await a.end();
      assert.equal((await b.query('select 2 as v')).rows[0].v, 2);
    } finally {
      await b.end().catch(() => {});
    }
  });
});

/** The test token, except that the first request fails once `failFirst` is called. */
class FirstFails implements TokenSource {
  calls = 0;
  failFirst!: () => void;
  readonly #gate = new Promise<void>((resolve) => (this.failFirst = resolve));
  async getToken(): Promise<Token> {
    if (++this.calls === 1) {
      await this.#gate;
      throw new TokenError('token_missing', 'the first token request fails');
    }
    return createToken(token, undefined);
  }
  describe(): string {
    return 'first request fails';
  }
  currentExpiry(): Date | undefined {
    return undefined;
  }
  async close(): Promise<void> {}
}

test('a login that fails wakes a client waiting for the room it took: that client logs in at once, not after QueryWaitTimeout', async () => {
  const tokens = new FirstFails();
  // Not woken, the second client would get 53300 once QueryWaitTimeout passed: its answer says which.
  const proxy = await startProxy(['--connection', connectionFor(db, token, 'PoolMode=transaction;PoolSize=1;QueryWaitTimeout=30s')], { tokenSource: tokens });
  try {
    const first = connected(proxy.port).then(
      () => 'logged in',
      (error: Error) => error.message,
    );
    await waitUntil(() => tokens.calls === 1, 10_000, 'the first login asks for its token');
    const second = one(proxy.port, 'select 1 as v', { connectionTimeoutMillis: 120_000 });
    await waitUntil(() => [...proxy.server.pools.values()].some((pool) => pool.stats.waiting === 1), 10_000, 'the second client waits');
    tokens.failFirst();
    assert.match(await first, /first token request fails/);
    assert.equal(await second, 1);
    assert.equal(tokens.calls, 2, 'the second client logged in itself');
  } finally {
    await proxy.close();
  }
});

test('a cancel for a query that ends while the cancel is on its way does not reach the next client of the connection', async () => {
  await withTransactionPool('PoolSize=1', async (proxy) => {
    const locker = new pg.Client({ host: db.socketDir, port: db.port, user: db.superuser.user, database: db.database });
    await locker.connect();
    const hits: number[] = [];
    try {
      for (let round = 1; round <= 20; round++) {
        await locker.query('select pg_advisory_lock(4377)');
        const a = await wire(proxy.port);
        const b = await wire(proxy.port);
        try {
          a.send(serialize.query('select pg_advisory_xact_lock_shared(4377)'));
          await waitUntil(async () => (await db.query<{ n: number }>("select count(*)::int as n from pg_stat_activity where wait_event_type = 'Lock' and query like '%xact_lock_shared%'"))[0]?.n === 1, 10_000, 'a waits for the lock');
          b.send(serialize.query('select pg_sleep(0.2)'));
          await waitUntil(() => [...proxy.server.pools.values()].some((pool) => pool.stats.waiting === 1), 10_000, 'b waits for the connection');
          // a's query ends as its client cancels it.
          const unlocked = locker.query('select pg_advisory_unlock(4377)');
          const cancelled = cancelRequest(proxy.port, a.processId, a.secretKey);
          await Promise.all([unlocked, cancelled]);
          await a.untilReady();
          const answers = (await b.untilReady()).map(summary);
          if (answers.includes('error 57014')) hits.push(round);
        } finally {
          a.end();
          b.end();
        }
      }
    } finally {
      await locker.end();
    }
    assert.deepEqual(hits, [], 'rounds in which the other client was cancelled');
  });
});

test('a statement to prepare after an error, before the Sync, on a connection at MaxPreparedStatements: skipped as Postgres skips it (the proxy hung in a loop)', async () => {
  await withTransactionPool('PoolSize=1;MaxPreparedStatements=1', async (proxy) => {
    const w = await wire(proxy.port);
    try {
      w.send(serialize.parse({ name: 'a', text: 'select 1 as one' }), serialize.sync());
      assert.deepEqual((await w.untilReady()).map(summary), ['parseComplete', 'ready I']);
      // An error the client sees before it goes on: the server skips to the Sync from here.
      w.send(serialize.execute({ portal: 'no_such_portal' }), serialize.flush());
      assert.equal(summary(await w.next()), 'error 34000');
      w.send(serialize.parse({ name: 'b', text: 'select 2 as two' }), serialize.bind({ statement: 'b' }), serialize.execute(), serialize.sync());
      assert.deepEqual((await w.untilReady()).map(summary), ['ready I']);
      w.send(serialize.bind({ statement: 'a' }), serialize.execute(), serialize.sync());
      assert.deepEqual((await w.untilReady()).map(summary), ['bindComplete', 'row ["1"]', 'complete SELECT 1', 'ready I']);
      assert.equal(await one(proxy.port, 'select 3 as v'), 3);
    } finally {
      w.end();
    }
  });
});

// Found in session 8 (the named-pipeline model test failed 1 run in 10 under load): the second
// sequence evicted the statement whose Parse the first had sent, then prepared it again. The
// first one's error undid its Parse in the proxy's account after that: the server had the
// statement and the proxy did not, so the third sequence's Bind got 42P05.
test('pipelined sequences at MaxPreparedStatements=1, the first failing before its Parse, the next evicting and preparing that statement again: as Postgres answers', async () => {
  await withDirect(async (direct) => {
    await withTransactionPool('PoolSize=1;MaxPreparedStatements=1', async (proxy) => {
      const bad = serialize.describe({ type: 'S', name: 'no_such_statement' });
      const use = (name: string): Buffer[] => [serialize.bind({ statement: name }), serialize.execute()];
      await differential(proxy.port, direct, [
        { send: [serialize.parse({ name: 'a', text: 'select 1 as one' }), serialize.parse({ name: 'b', text: 'select 2 as two' }), serialize.parse({ name: 'c', text: 'select 3 as three' }), serialize.sync()] },
        { send: [bad, ...use('a'), serialize.sync(), ...use('b'), ...use('a'), serialize.sync(), ...use('a'), serialize.sync()], readies: 3 },
        { send: [...use('a'), ...use('b'), ...use('c'), serialize.sync()] },
      ]);
    });
  });
});

test('a Close or an answered Parse that an earlier error skips, then a Sync, then a Bind of that name in the same pipeline: as Postgres answers', async () => {
  await withDirect(async (direct) => {
    await withTransactionPool('PoolSize=1', async (proxy) => {
      const bad = serialize.describe({ type: 'S', name: 'no_such_statement' });
      await differential(proxy.port, direct, [
        { send: [serialize.parse({ name: 'a', text: 'select 1 as one' }), serialize.parse({ name: 'x', text: 'select 2 as two' }), serialize.sync()] },
        // The Close is skipped: a still exists.
        { send: [bad, serialize.close({ type: 'S', name: 'a' }), serialize.sync(), serialize.bind({ statement: 'a' }), serialize.execute(), serialize.sync()], readies: 2 },
        // The Parse (its text prepared on the connection already, answered by the proxy) is skipped: b does not exist.
        { send: [bad, serialize.parse({ name: 'b', text: 'select 2 as two' }), serialize.sync(), serialize.bind({ statement: 'b' }), serialize.execute(), serialize.sync()], readies: 2 },
        { send: [serialize.describe({ type: 'S', name: 'b' }), serialize.sync()] },
      ]);
    });
  });
});

test('a Parse of a name in use, or of a statement the connection has, in an aborted transaction: answered as Postgres does', async () => {
  await withDirect(async (direct) => {
    await withTransactionPool('PoolSize=1', async (proxy) => {
      const rollback = [serialize.parse({ text: 'rollback' }), serialize.bind({}), serialize.execute()];
      await differential(proxy.port, direct, [
        { send: [serialize.parse({ name: 'a', text: 'select 1 as one' }), serialize.sync()] },
        { send: [serialize.query('begin; select 1/0')] },
        // Postgres refuses all but COMMIT and ROLLBACK first (25P02), then a name in use (42P05).
        { send: [serialize.parse({ name: 'a', text: 'select 3' }), serialize.sync()] },
        { send: [serialize.parse({ name: 'a', text: 'commit' }), serialize.bind({}), serialize.execute(), serialize.flush()], until: 'error' },
        { send: [serialize.sync()] },
        // A ROLLBACK through Execute ends the aborted transaction: a Parse after it, answered by the proxy, is not refused.
        { send: [...rollback, serialize.flush()], until: 'commandComplete' },
        { send: [serialize.parse({ name: 'b', text: 'select 1 as one' }), serialize.bind({ statement: 'b' }), serialize.execute(), serialize.sync()] },
        { send: [serialize.query('begin; select 1/0')] },
        { send: [...rollback, serialize.parse({ name: 'c', text: 'select 1 as one' }), serialize.bind({ statement: 'c' }), serialize.execute(), serialize.sync()] },
      ]);
    });
  });
});

test('a named statement whose text is not UTF-8 (client_encoding LATIN1) reaches the server byte for byte', async () => {
  /** A Parse with the text's bytes as given (pg-protocol writes UTF-8). */
  const parseBytes = (name: string, text: Buffer): Buffer => {
    const body = Buffer.concat([Buffer.from(`${name}\0`), text, Buffer.from([0, 0, 0])]);
    const head = Buffer.alloc(5);
    head.write('P');
    head.writeInt32BE(4 + body.length, 1);
    return Buffer.concat([head, body]);
  };
  const text = Buffer.from("select length('caf\u00e9') as n", 'latin1');
  await withDirect(async (direct) => {
    await withTransactionPool('PoolSize=1', async (proxy) => {
      await differential(proxy.port, direct, [
        // (WireClient's startup says UTF8: pg-protocol adds it.)
        { send: [serialize.query("set client_encoding = 'LATIN1'")] },
        { send: [parseBytes('l1', text), serialize.bind({ statement: 'l1' }), serialize.execute(), serialize.sync()] },
      ]);
    });
  });
});

/** Bytes of Buffers held by this process (the proxy runs in it) once garbage is collected, when --expose-gc allows. */
function heldBytes(): number {
  (globalThis as { gc?: () => void }).gc?.();
  return process.memoryUsage().arrayBuffers;
}

test('a client that does not read a large result: the proxy holds a bounded amount of it, and the client gets all of it once it reads', async () => {
  await withTransactionPool('PoolSize=1', async (proxy) => {
    const w = await wire(proxy.port);
    try {
      const before = heldBytes();
      w.socket.pause();
      // 200 rows of 1 MB.
      w.send(serialize.query("select repeat('x', 1000000) as big from generate_series(1, 200)"));
      // The server waits until it can write more: everything the proxy would take, it has.
      await waitUntil(
        async () => (await db.query<{ n: number }>("select count(*)::int as n from pg_stat_activity where wait_event = 'ClientWrite' and query like 'select repeat%'"))[0]?.n === 1,
        30_000,
        'the server waits to write',
      );
      await sleep(200);
      const held = heldBytes() - before;
      w.socket.resume();
      const answers = await w.untilReady(1, 60_000);
      assert.equal(answers.filter((m) => m.name === 'dataRow').length, 200);
      assert.ok(held < 64 * 1024 * 1024, `the proxy held ${Math.round(held / 1048576)} MiB of a result its client did not read`);
    } finally {
      w.end();
    }
  });
});

test('a client message of hundreds of MiB is not held whole by the proxy', { todo: 'review finding: transaction mode frames every message, up to 1 GiB, in memory', skip: LONG ? false : 'hundreds of MiB: LAKEBASE_PROXY_LONG_TESTS=1' }, async () => {
  await withTransactionPool('PoolSize=1', async (proxy) => {
    const w = await wire(proxy.port);
    try {
      const before = heldBytes();
      const head = Buffer.alloc(5);
      head.write('Q');
      head.writeInt32BE(4 + 300 * 1048576, 1);
      w.socket.write(Buffer.concat([head, Buffer.from('select length(\'')]));
      const chunk = Buffer.alloc(1048576, 0x78);
      for (let i = 0; i < 200; i++) {
        if (!w.socket.write(chunk)) await new Promise((resolve) => w.socket.once('drain', resolve));
      }
      await sleep(1000);
      const held = heldBytes() - before;
      assert.ok(held < 64 * 1024 * 1024, `the proxy holds ${Math.round(held / 1048576)} MiB of a message not yet complete`);
    } finally {
      w.socket.destroy();
    }
  });
});

test('clients that vanish at each point: nothing of theirs stays on a connection, no listener stays behind, the pool serves the next client', async () => {
  await withTransactionPool('PoolSize=2;MaxPreparedStatements=4', async (proxy) => {
    const backends = async (): Promise<string[]> =>
      (await db.query<{ s: string }>(`select state || ':' || left(query, 40) as s from pg_stat_activity where usename = '${db.tokenRole}' and state <> 'idle'`)).map((r) => r.s);
    const prepared = async (w: WireClient): Promise<void> => {
      w.send(serialize.parse({ name: 'p', text: 'select 1 as one' }), serialize.sync());
      await w.untilReady();
    };
    const cases: Array<[string, (w: WireClient) => Promise<void>]> = [
      ['while waiting for a connection', async (w) => {
        w.send(serialize.query('select 1'));
        await waitUntil(() => [...proxy.server.pools.values()].some((pool) => pool.stats.waiting === 1), 10_000, 'it waits');
      }],
      ['in a transaction', async (w) => {
        w.send(serialize.query("begin; insert into rv_items values (7001, 'vanished')"));
        await w.untilReady();
      }],
      ['in COPY FROM STDIN', async (w) => {
        w.send(serialize.query('copy rv_copy from stdin'));
        await until(w, 'copyInResponse');
        w.send(serialize.copyData(Buffer.from('7\n')));
      }],
      ['in COPY FROM STDIN over the extended protocol', async (w) => {
        w.send(serialize.parse({ text: 'copy rv_copy from stdin' }), serialize.bind({}), serialize.execute(), serialize.sync());
        await until(w, 'copyInResponse');
      }],
      ['in COPY TO STDOUT', async (w) => {
        w.send(serialize.query('copy (select g, repeat(\'x\', 1000) from generate_series(1, 200000) g) to stdout'));
        await until(w, 'copyOutResponse');
      }],
      ['in an extended sequence without its Sync', async (w) => {
        await prepared(w);
        w.send(serialize.bind({ statement: 'p' }), serialize.flush());
        await until(w, 'bindComplete');
      }],
      ['after an error, before the Sync', async (w) => {
        w.send(serialize.execute({ portal: 'none' }), serialize.flush());
        await w.next();
      }],
      ['with a Parse waiting for the answer before it', async (w) => {
        await prepared(w);
        w.send(serialize.query('select pg_sleep(0.3)'), serialize.parse({ name: 'q', text: 'select 1 as one' }), serialize.sync());
      }],
      ['with Terminate behind a query', async (w) => {
        w.send(serialize.query('select pg_sleep(0.3)'), serialize.end());
      }],
    ];
    const holder = await connected(proxy.port);
    for (const [when, leave] of cases) {
      const w = await wire(proxy.port);
      // The first case needs the pool busy: two transactions hold both connections.
      const busy = when === 'while waiting for a connection' ? [holder, await connected(proxy.port)] : [];
      for (const c of busy) await c.query('begin');
      await leave(w);
      w.socket.destroy();
      for (const c of busy) await c.query('commit');
      if (busy[1]) await busy[1].end();
      await waitUntil(async () => (await backends()).length === 0, 20_000, `${when}: nothing runs upstream (${(await backends()).join(', ')})`);
      assert.equal(await one(proxy.port, 'select count(*)::int as n from rv_items where id = 7001'), 0, when);
    }
    await holder.end();
    // Many clients, many transactions on the same two connections.
    await Promise.all(
      Array.from({ length: 40 }, async (_, i) => {
        const c = await connected(proxy.port);
        try {
          for (let n = 0; n < 3; n++) await c.query({ name: `n${n}`, text: `select ${n} + $1::int as v`, values: [i] });
        } finally {
          await c.end();
        }
      }),
    );
    // Listeners on the pooled connections: those of an idle connection only, however many clients used them.
    for (const pool of proxy.server.pools.values()) {
      for (const { server } of pool.servers) {
        const counts = ['data', 'end', 'close', 'drain', 'error'].map((event) => `${event} ${server.upstream.listenerCount(event)}`);
        assert.ok(server.upstream.listenerCount('data') <= 1 && server.upstream.listenerCount('drain') <= 1, `${server.processId}: ${counts.join(', ')}`);
      }
      assert.equal(pool.size, 2);
    }
    await waitUntil(() => proxy.server.clients().length === 0, 10_000, 'every session ended');
  });
});

test('a server connection that dies idle in the pool, mid-query, mid-COPY or under a held Parse: its client (if any) gets an error and ends, the others go on', async () => {
  await withTransactionPool('PoolSize=2', async (proxy) => {
    const pidOf = async (w: WireClient): Promise<number> => {
      w.send(serialize.query('select pg_backend_pid()'));
      return Number(((await w.untilReady()).find((m) => m.name === 'dataRow') as unknown as { fields: string[] }).fields[0]);
    };
    const terminate = (pid: number): Promise<unknown> => db.query(`select pg_terminate_backend(${pid})`);
    const running = (text: string): Promise<void> =>
      waitUntil(async () => (await db.query<{ n: number }>(`select count(*)::int as n from pg_stat_activity where query like '${text}%' and state = 'active'`))[0]?.n === 1, 10_000, text);
    const other = await connected(proxy.port);
    try {
      // Idle in the pool.
      const idle = await wire(proxy.port);
      const idlePid = await pidOf(idle);
      await terminate(idlePid);
      await waitUntil(async () => (await db.query<{ n: number }>(`select count(*)::int as n from pg_stat_activity where pid = ${idlePid}`))[0]?.n === 0, 10_000, 'the idle backend ended');
      assert.notEqual(await pidOf(idle), idlePid);
      idle.end();
      assert.equal((await other.query('select 1 as v')).rows[0].v, 1);
      const cases: Array<[string, (w: WireClient) => Promise<void>]> = [
        ['mid-query', async (w) => {
          w.send(serialize.query('select pg_sleep(20)'));
          await running('select pg_sleep(20)');
        }],
        ['mid-COPY', async (w) => {
          w.send(serialize.query('begin'), serialize.query('copy rv_copy from stdin'));
          await until(w, 'copyInResponse');
        }],
        ['under a held Parse', async (w) => {
          w.send(serialize.parse({ name: 'h', text: 'select 1 as one' }), serialize.sync());
          await w.untilReady();
          w.send(serialize.query('select pg_sleep(19)'), serialize.parse({ name: 'g', text: 'select 1 as one' }), serialize.sync());
          await running('select pg_sleep(19)');
        }],
      ];
      for (const [when, start] of cases) {
        const w = await wire(proxy.port);
        await start(w);
        const pid = (await db.query<{ pid: number }>(`select pid from pg_stat_activity where usename = '${db.tokenRole}' and state <> 'idle' and query not like '%pg_stat_activity%' and pid <> pg_backend_pid() order by backend_start desc limit 1`))[0]?.pid;
        await terminate(pid as number);
        const seen: string[] = [];
        for (;;) {
          const m = await w.next().catch(() => undefined);
          if (!m) break;
          seen.push(summary(m));
        }
        assert.ok(seen.some((m) => m === 'error 08006' || m === 'error 57P01'), `${when}: ${seen.join(', ')}`);
        assert.ok(w.closed, `${when}: the client's session ended`);
        assert.equal((await other.query('select 2 as v')).rows[0].v, 2, when);
      }
    } finally {
      await other.end();
    }
  });
});

test('FunctionCall in and out of a transaction, and a message waiting for a connection past QueryWaitTimeout', async () => {
  // int4pl(20, 22), arguments and result in text.
  const args = [Buffer.from('20'), Buffer.from('22')];
  const body = Buffer.concat([
    Buffer.from([0, 0, 0, 177, 0, 1, 0, 0, 0, 2]),
    ...args.map((arg) => Buffer.concat([Buffer.from([0, 0, 0, arg.length]), arg])),
    Buffer.from([0, 0]),
  ]);
  const call = Buffer.concat([Buffer.from('F'), Buffer.from([0, 0, 0, 0]), body]);
  call.writeInt32BE(4 + body.length, 1);
  await withDirect(async (direct) => {
    await withTransactionPool('PoolSize=1;QueryWaitTimeout=2s', async (proxy) => {
      await differential(proxy.port, direct, [{ send: [call] }, { send: [serialize.query('begin')] }, { send: [call] }, { send: [serialize.query('commit')] }]);
      const w = await wire(proxy.port);
      const holder = await connected(proxy.port);
      await holder.query('begin');
      try {
        w.send(serialize.parse({ name: 'late', text: 'select 1' }), serialize.sync());
        const m = await w.next();
        assert.equal(summary(m), 'error 53300');
        await waitUntil(() => w.closed, 10_000, 'the late client is let go');
        assert.equal((await holder.query('select 3 as v')).rows[0].v, 3);
      } finally {
        await holder.end();
      }
    });
  });
});

test('Execute, Query, Sync (which leaves Postgres failing its next command with XX000) does not reach the next client of the connection', async () => {
  await withTransactionPool('PoolSize=1', async (proxy) => {
    const a = await wire(proxy.port);
    a.send(serialize.parse({ text: 'select 1' }), serialize.bind({}), serialize.execute(), serialize.query('select 2'), serialize.sync());
    assert.deepEqual((await a.untilReady(2)).map(summary).slice(-2), ['ready T', 'ready I']);
    const b = await wire(proxy.port);
    try {
      b.send(serialize.query('begin'));
      assert.deepEqual((await b.untilReady()).map(summary), ['complete BEGIN', 'ready T']);
      b.send(serialize.query('rollback'));
      await b.untilReady();
    } finally {
      a.end();
      b.end();
    }
  });
});

test('startups the transaction pool refuses: a bad setting value (the server says why), an unsupported option, replication; the pool goes on', async () => {
  await withTransactionPool('PoolSize=1', async (proxy) => {
    const refused = async (extra: Partial<pg.ClientConfig>): Promise<string> => {
      const c = pgClient(proxy.port, db, extra);
      try {
        await c.connect();
        return 'connected';
      } catch (error) {
        return (error as { code?: string }).code ?? (error as Error).message;
      } finally {
        await c.end().catch(() => {});
      }
    };
    assert.equal(await refused({ options: '-c work_mem=bogus' }), '22023');
    assert.equal(await refused({ options: '-X' }), '0A000');
    assert.equal(await refused({ replication: 'database' } as Partial<pg.ClientConfig>), '0A000');
    assert.equal(await one(proxy.port, "select current_setting('work_mem') as v"), (await db.query<{ v: string }>("select current_setting('work_mem') as v"))[0]?.v);
  });
});

test('DISCARD ALL (what client-side pools run on return) brings back the client\'s own startup settings, and reports them, as Postgres does', async () => {
  await withDirect(async (direct) => {
    await withTransactionPool('PoolSize=1', async (proxy) => {
      const after = async (port: number): Promise<string> => {
        const c = await connected(port, { options: '-c TimeZone=Asia/Tokyo' });
        try {
          await c.query('discard all');
          return (await c.query("select current_setting('TimeZone') as v")).rows[0].v;
        } finally {
          await c.end();
        }
      };
      assert.equal(await after(direct), 'Asia/Tokyo');
      assert.equal(await after(proxy.port), 'Asia/Tokyo');
      // What the client is told: a SET's report, then DISCARD ALL's of the startup's value, as Postgres sends them.
      const told = async (port: number): Promise<string[]> => {
        const w = await wire(port, { options: '-c TimeZone=Asia/Tokyo', application_name: 'discarding' });
        try {
          const seen: string[] = [];
          for (const text of ["set timezone = 'UTC'", "set application_name = 'renamed'", 'discard all', "select current_setting('TimeZone') as tz, current_setting('application_name') as app"]) {
            w.send(serialize.query(text));
            const step: string[] = [];
            for (const m of (await w.untilReady()) as Array<BackendMessage & { parameterName?: string; parameterValue?: string; fields?: unknown[] }>) {
              if (m.name === 'parameterStatus') step.push(`${m.parameterName}=${m.parameterValue}`);
              else if (m.name === 'dataRow') step.push(`row ${JSON.stringify(m.fields)}`);
            }
            seen.push(`${text}: ${step.sort().join(' ')}`); // reports in any order within a step
          }
          return seen;
        } finally {
          w.end();
        }
      };
      const want = await told(direct);
      assert.equal(want[2], 'discard all: TimeZone=Asia/Tokyo application_name=discarding', want.join(', '));
      assert.deepEqual(await told(proxy.port), want);
    });
  });
});

/** A message of a fuzzed batch, and what its answer looks like. */
interface Sent {
  readonly bytes: Buffer;
  readonly kind: 'P' | 'B' | 'DS' | 'DP' | 'E' | 'C' | 'S' | 'Q' | 'H';
}

/** Random pipelined batches: several Syncs, Query between extended messages, portals with row limits, Describe and Close of both kinds, failing Parse, Flush-only ends. */
function* pipelines(seed: number, steps: number): Generator<Sent[]> {
  const random = seeded(seed);
  const pick = <T>(items: readonly T[]): T => items[random(items.length)] as T;
  const texts: ReadonlyArray<{ text: string; params: number }> = [
    { text: 'select $1::int * 2 as v', params: 1 },
    { text: 'select label from rv_items where id = $1::int', params: 1 },
    // random() keeps the division from a custom plan's constant folding (the error then comes at Bind, or at Execute with a generic plan).
    { text: 'select 10 / ($1::int + floor(random())::int) as q', params: 1 },
    { text: 'select g from generate_series(1, 2 + $1::int) g', params: 1 },
    { text: 'selec $1', params: 1 },
    { text: 'begin', params: 0 },
    { text: 'commit', params: 0 },
    { text: "set application_name = 'fuzzed'", params: 0 },
    { text: 'select 1 as one', params: 0 },
  ];
  const queries = ['begin', 'commit', 'rollback', 'select 42', 'select 1/0', 'select g from generate_series(1, 3) g'];
  const names = ['s1', 's2', 's3'];
  const params = new Map<string, number>();
  /** An Execute since the last Sync (across batches: one may end with a Flush). */
  let executed = false;
  for (let i = 0; i < steps; i++) {
    const batch: Sent[] = [];
    const count = 1 + random(10);
    for (let m = 0; m < count; m++) {
      const values = (n: number): string[] => Array.from({ length: n }, () => String(random(4)));
      switch (random(12)) {
        case 0:
        case 1: {
          // Not the syntax error: in an aborted transaction Postgres reports it before 25P02 and a
          // duplicate name, the proxy after (out of one, the text goes to the server first, #fail).
          // One parameter: in an aborted transaction, a statement the proxy must prepare on the
          // connection first fails (25P02) before Postgres' own checks of a Bind or Describe
          // (08P01 for a wrong count of values, none for a statement without rows).
          const name = pick(names);
          const t = pick(texts.filter((x) => !x.text.startsWith('selec ') && x.params === 1));
          params.set(name, t.params);
          batch.push({ bytes: serialize.parse({ name, text: t.text }), kind: 'P' });
          break;
        }
        case 2:
        case 3: {
          const portal = random(3) === 0 ? 'p1' : '';
          if (random(3) === 0) {
            const t = pick(texts);
            batch.push({ bytes: serialize.parse({ text: t.text }), kind: 'P' });
            batch.push({ bytes: serialize.bind({ portal, values: values(t.params) }), kind: 'B' });
          } else {
            const name = pick(names);
            batch.push({ bytes: serialize.bind({ portal, statement: name, values: values(params.get(name) ?? 1) }), kind: 'B' });
          }
          if (random(2) === 0) batch.push({ bytes: serialize.describe({ type: 'P', name: portal }), kind: 'DP' });
          batch.push({ bytes: serialize.execute({ portal, rows: pick([0, 0, 1, 2]) }), kind: 'E' });
          break;
        }
        case 4:
          // Not the unnamed portal: the proxy's own error for a duplicate name (a DO block) binds it.
          batch.push({ bytes: serialize.execute({ portal: 'p1', rows: pick([0, 1]) }), kind: 'E' });
          break;
        case 5:
          batch.push({ bytes: serialize.describe({ type: 'S', name: pick(names) }), kind: 'DS' });
          break;
        case 6:
          batch.push({ bytes: serialize.close({ type: 'S', name: pick(names) }), kind: 'C' });
          break;
        case 7:
          batch.push({ bytes: serialize.close({ type: 'P', name: pick(['', 'p1']) }), kind: 'C' });
          break;
        case 8:
          // Postgres 18 itself fails the next command (XX000) after Execute, Query, Sync: not that.
          const kinds = batch.map((x) => x.kind);
          const lastSync = kinds.lastIndexOf('S');
          if ((lastSync < 0 && executed) || kinds.slice(lastSync + 1).includes('E')) batch.push({ bytes: serialize.sync(), kind: 'S' });
          batch.push({ bytes: serialize.query(pick(queries)), kind: 'Q' });
          break;
        case 9:
          batch.push({ bytes: serialize.flush(), kind: 'H' });
          break;
        default:
          batch.push({ bytes: serialize.sync(), kind: 'S' });
      }
    }
    batch.push(random(6) === 0 ? { bytes: serialize.flush(), kind: 'H' } : { bytes: serialize.sync(), kind: 'S' });
    for (const { kind } of batch) {
      if (kind === 'E') executed = true;
      else if (kind === 'S') executed = false;
    }
    yield batch;
  }
}

/**
 * The answers to `batch`, read message by message as Postgres gives them (ignoring notices and
 * reports). `session.skipping`: an error left the server skipping to the next Sync (a batch may end
 * with a Flush).
 */
async function answersTo(w: WireClient, batch: readonly Sent[], session: { skipping: boolean }): Promise<string[]> {
  const out: string[] = [];
  const next = async (): Promise<string> => {
    for (;;) {
      const m = await w.next(15_000).catch((error: Error) => {
        throw new Error(`${error.message} after ${out.join(', ')}`);
      });
      if (m.name === 'notice' || m.name === 'parameterStatus') continue;
      const s = summary(m);
      out.push(s);
      return s;
    }
  };
  let skipping = session.skipping;
  for (const { kind } of batch) {
    if (skipping && kind !== 'S') continue;
    let s: string;
    switch (kind) {
      case 'H':
        break;
      case 'S':
      case 'Q':
        skipping = false;
        while (!(await next()).startsWith('ready')) {
          /* rows, completions, an error */
        }
        break;
      case 'DS':
        s = await next();
        if (s.startsWith('error')) skipping = true;
        else await next();
        break;
      case 'E':
        do s = await next();
        while (!/^(error|complete|emptyQuery|portalSuspended)/.test(s));
        if (s.startsWith('error')) skipping = true;
        break;
      default:
        if ((await next()).startsWith('error')) skipping = true;
    }
  }
  session.skipping = skipping;
  return out;
}

test('random pipelined batches on a pool shared with busy clients: answered exactly as one Postgres session answers them', async () => {
  const seeds = (process.env['REVIEW_FUZZ_SEEDS'] ?? '1-8').split('-').map(Number) as [number, number];
  const steps = Number(process.env['REVIEW_FUZZ_STEPS'] ?? 30);
  await withDirect(async (direct) => {
    await withTransactionPool('PoolSize=2;MaxPreparedStatements=2', async (proxy) => {
      const noise = busyClients(proxy.port, db);
      try {
        for (let seed = seeds[0]; seed <= (seeds[1] ?? seeds[0]); seed++) {
          const pooled = await wire(proxy.port);
          const alone = await wire(direct);
          try {
            let step = 0;
            const states = { pooled: { skipping: false }, alone: { skipping: false } };
            for (const batch of pipelines(seed, steps)) {
              step++;
              const bytes = batch.map((m) => m.bytes);
              pooled.send(...bytes);
              alone.send(...bytes);
              const want = await answersTo(alone, batch, states.alone).catch((error: Error) => {
                throw new Error(`seed ${seed}, step ${step}: ${batch.map((m) => m.kind).join(' ')}: direct: ${error.message}`);
              });
              if (process.env['REVIEW_FUZZ_LOG']) console.log(`seed ${seed} step ${step}: ${batch.map((m) => m.kind).join(' ')} => ${want.join(', ')}`);
              const got = await answersTo(pooled, batch, states.pooled).catch((error: Error) => [`(${error.message})`]);
              if (process.env['REVIEW_FUZZ_LOG']) console.log(`   pooled: ${got.join(', ')}`);
              assert.deepEqual(got, want, `seed ${seed}, step ${step}: ${batch.map((m) => m.kind).join(' ')}`);
            }
          } finally {
            pooled.end();
            alone.end();
          }
        }
      } finally {
        assert.deepEqual(await noise.stop(), [], 'the busy clients next to the fuzzed one');
      }
    });
  });
});
