/**
 * The relay end to end: the real pg client through the proxy to a real Postgres over TLS. The
 * native relay by default; relay-js.test.ts runs the same file with `--relay js`.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { connect as netConnect } from 'node:net';
import { pipeline } from 'node:stream/promises';
import { Readable, Writable } from 'node:stream';
import pg from 'pg';
import copyStreams from 'pg-copy-streams';
import type { TestPostgres } from './harness/postgres.js';
import { startProxiedPostgres, type InProcessProxy } from './harness/proxy.js';
import { native } from '../src/proxy/native-relay.js';

const relay = process.env['LAKEBASE_PROXY_TEST_RELAY'] === 'js' ? 'js' : 'native';

let db: TestPostgres;
let proxy: InProcessProxy;
let close: () => Promise<void>;
const token = 'tok-' + randomBytes(600).toString('base64url'); // as long as a Databricks token

before(async () => ({ db, proxy, close } = await startProxiedPostgres(token, ['--relay', relay])));
after(() => close?.());

function client(extra: Partial<pg.ClientConfig> = {}): pg.Client {
  return new pg.Client({ host: '127.0.0.1', port: proxy.port, user: 'anyone', database: db.database, ...extra });
}

async function withClient<T>(fn: (c: pg.Client) => Promise<T>, extra: Partial<pg.ClientConfig> = {}): Promise<T> {
  const c = client(extra);
  await c.connect();
  try {
    return await fn(c);
  } finally {
    await c.end();
  }
}

test('simple and extended queries run as the token identity over TLS', async () => {
  await withClient(async (c) => {
    const simple = await c.query('select current_user as who, ssl from pg_stat_ssl where pid = pg_backend_pid()');
    assert.equal(simple.rows[0].who, db.tokenRole);
    assert.equal(simple.rows[0].ssl, true);
    const extended = await c.query('select $1::int + $2::int as sum, $3::text as t', [40, 2, 'é☃']);
    assert.deepEqual(extended.rows[0], { sum: 42, t: 'é☃' });
    const prepared = { name: 'p1', text: 'select $1::text || $1::text as twice' };
    assert.equal((await c.query({ ...prepared, values: ['ab'] })).rows[0].twice, 'abab');
    assert.equal((await c.query({ ...prepared, values: ['cd'] })).rows[0].twice, 'cdcd');
  });
});

test('startup parameters reach the upstream; the database defaults when the client names none', async () => {
  await withClient(
    async (c) => {
      const r = await c.query("select current_setting('application_name') as app, current_setting('search_path') as sp, current_database() as db");
      assert.deepEqual(r.rows[0], { app: 'relay-test', sp: 'pg_catalog,public', db: db.database });
    },
    { application_name: 'relay-test', options: '-c search_path=pg_catalog,public', database: 'anyone' },
  );
  // A database that does not exist upstream is the upstream's error, passed through.
  await assert.rejects(withClient(async () => {}, { database: 'no_such_db' }), (e: pg.DatabaseError) => e.code === '3D000');
});

test('rows of several megabytes pass both ways', async () => {
  await withClient(async (c) => {
    const big = randomBytes(3 * 1024 * 1024).toString('base64');
    const r = await c.query('select md5($1::text) as h, length($1::text) as n, repeat($2::text, 5000000) as r', [big, 'z']);
    assert.equal(r.rows[0].h, createHash('md5').update(big).digest('hex'));
    assert.equal(r.rows[0].n, big.length);
    assert.equal(r.rows[0].r.length, 5000000);
  });
});

test('COPY out and COPY in of tens of megabytes keep their checksums', async () => {
  await withClient(async (c) => {
    await c.query('create table copy_src as select g as id, md5(g::text) || repeat(chr(65 + g % 26), 200) as payload from generate_series(1, 100000) g');
    const outHash = createHash('sha256');
    let outBytes = 0;
    await pipeline(
      c.query(copyStreams.to('copy copy_src to stdout')),
      new Writable({
        write(chunk: Buffer, _e, cb) {
          outHash.update(chunk);
          outBytes += chunk.length;
          cb();
        },
      }),
    );
    assert.ok(outBytes > 20 * 1024 * 1024, `copied ${outBytes} bytes`);
    const direct = await db.query<{ h: string }>(
      "select encode(sha256(string_agg(id || E'\\t' || payload || E'\\n', '' order by id)::bytea), 'hex') as h from copy_src",
    );
    assert.equal(outHash.digest('hex'), direct[0]?.h);

    await c.query('create table copy_dst (id int, payload text)');
    const lines = async function* () {
      for (let i = 1; i <= 100000; i += 1000) {
        let chunk = '';
        for (let j = i; j < i + 1000; j++) chunk += `${j}\t${createHash('md5').update(String(j)).digest('hex')}${'Q'.repeat(200)}\n`;
        yield Buffer.from(chunk);
      }
    };
    await pipeline(Readable.from(lines()), c.query(copyStreams.from('copy copy_dst from stdin')));
    const [a, b] = await Promise.all([
      db.query<{ h: string }>("select md5(string_agg(id || ':' || payload, ',' order by id)) as h from copy_dst"),
      db.query<{ h: string }>("select md5(string_agg(id || ':' || md5(id::text) || repeat('Q', 200), ',' order by id)) as h from generate_series(1, 100000) id"),
    ]);
    assert.equal(a[0]?.h, b[0]?.h);
  });
});

test('a cancel with the proxy key stops pg_sleep; upstream pid and key stay hidden', async () => {
  await withClient(async (c) => {
    const realPid = (await c.query('select pg_backend_pid() as pid')).rows[0].pid as number;
    const { processID, secretKey } = c as unknown as { processID: number; secretKey: number };
    assert.notEqual(processID, realPid, 'the client must not see the upstream process id');
    const sleeping = c.query('select pg_sleep(30)');
    await new Promise((r) => setTimeout(r, 300));
    const cancel = Buffer.alloc(16);
    cancel.writeInt32BE(16, 0);
    cancel.writeInt32BE(80877102, 4);
    cancel.writeInt32BE(processID, 8);
    cancel.writeInt32BE(secretKey, 12);
    const started = Date.now();
    netConnect({ host: '127.0.0.1', port: proxy.port }).end(cancel);
    await assert.rejects(sleeping, (e: pg.DatabaseError) => e.code === '57014');
    assert.ok(Date.now() - started < 10000);
    assert.equal((await c.query('select 1 as one')).rows[0].one, 1, 'the session goes on after a cancel');
  });
});

test('a cancel with a wrong key does nothing', async () => {
  await withClient(async (c) => {
    const { processID, secretKey } = c as unknown as { processID: number; secretKey: number };
    const sleeping = c.query('select pg_sleep(1.5) as slept');
    const cancel = Buffer.alloc(16);
    cancel.writeInt32BE(16, 0);
    cancel.writeInt32BE(80877102, 4);
    cancel.writeInt32BE(processID, 8);
    cancel.writeInt32BE(secretKey ^ 1, 12);
    netConnect({ host: '127.0.0.1', port: proxy.port }).end(cancel);
    assert.equal((await sleeping).rowCount, 1);
  });
});

test('a client that vanishes mid-query leaves no upstream backend behind', async () => {
  const backends = async (): Promise<number> =>
    Number((await db.query<{ n: string }>("select count(*) as n from pg_stat_activity where application_name = 'vanishing'"))[0]?.n);
  const c = client({ application_name: 'vanishing' });
  c.on('error', () => {});
  await c.connect();
  void c.query('select pg_sleep(60)').catch(() => {});
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(await backends(), 1);
  (c as unknown as { connection: { stream: { destroy(): void } } }).connection.stream.destroy();
  for (let i = 0; i < 100 && (await backends()) > 0; i++) await new Promise((r) => setTimeout(r, 100));
  assert.equal(await backends(), 0);
});

test('many sessions at once are independent', async () => {
  const results = await Promise.all(
    Array.from({ length: 40 }, (_, i) => withClient(async (c) => (await c.query('select $1::int * 2 as v, pg_backend_pid() as pid', [i])).rows[0])),
  );
  assert.deepEqual(results.map((r) => r.v), Array.from({ length: 40 }, (_, i) => i * 2));
});

test('each session ends with one log line that holds no token', async () => {
  await withClient(async (c) => c.query('select 1'), { application_name: 'log-line' });
  await new Promise((r) => setTimeout(r, 200));
  const ended = proxy.logs.filter((l) => l.msg === 'session ended');
  assert.ok(ended.length > 0);
  const last = ended.at(-1) as Record<string, unknown>;
  assert.ok((last.bytesToClient as number) > 0 && (last.bytesToUpstream as number) > 0);
  assert.equal(last.end, 'client_closed');
  assert.equal(last.relay, relay === 'native' && native.addon ? 'native' : 'js');
  assert.ok(!proxy.logText().includes(token));
});
