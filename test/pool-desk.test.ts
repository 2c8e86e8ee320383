/**
 * Session mode in C (the pool's desk, native/txclient.c "session mode on the desk"): a client
 * whose pool has an idle connection of its login parameters is greeted, relayed and, after it
 * leaves, reset by C, with no JavaScript between its startup and its relay. These tests tell such
 * a session by its 'session started' log line (onDesk) and check what C does on its own: the
 * greeting, the reset and its answer, and what it hands back to the pool (a reset that answered
 * more than a CommandComplete, a failed reset, a client gone mid-query, clients of the pool
 * waiting). The rest of the session pool's behaviour, through both paths, is pool.test.ts'.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import pg from 'pg';
import type { TestPostgres } from './harness/postgres.js';
import { startTokenPostgres } from './harness/postgres.js';
import { connectionFor, startProxy, type InProcessProxy } from './harness/proxy.js';
import { WireClient } from './harness/wire.js';
import { serialize } from 'pg-protocol';
import { pgClient, sleep, waitUntil } from './reliability-support.js';
import { native } from '../src/proxy/native-relay.js';
import { Metrics } from '../src/ops/metrics.js';

let db: TestPostgres;
const token = 'tok-' + randomBytes(40).toString('base64url');

before(async () => {
  db = await startTokenPostgres(token);
});
after(() => db?.stop());

async function withPool<T>(extra: string, fn: (proxy: InProcessProxy, metrics: Metrics) => Promise<T>): Promise<T> {
  const metrics = new Metrics();
  const proxy = await startProxy(['--connection', connectionFor(db, token, extra), '--relay', 'native'], { observer: metrics.observerFor('desk') });
  try {
    return await fn(proxy, metrics);
  } finally {
    await proxy.close();
  }
}

function requireNative(t: { skip: (message: string) => void }): boolean {
  if (native.addon) return true;
  t.skip(`sessions on the desk need the native relay: ${native.problem}`);
  return false;
}

const started = (proxy: InProcessProxy): Array<Record<string, unknown>> => proxy.logs.filter((l) => l['msg'] === 'session started');
const onDesk = (proxy: InProcessProxy): number => started(proxy).filter((l) => l['onDesk'] === true).length;
const ended = (proxy: InProcessProxy): number => proxy.logs.filter((l) => l['msg'] === 'session ended').length;

/** The sample of `name` with `labels` in a /metrics text (0 when absent). */
function sample(text: string, name: string, labels: string): number {
  const line = text.split('\n').find((l) => l.startsWith(`lakebase_proxy_${name}{`) && l.includes(labels));
  return line ? Number(line.split(' ').pop()) : 0;
}

/** Until the pool has `n` idle connections (on the desk or its own). */
async function idle(metrics: Metrics, n: number): Promise<void> {
  await waitUntil(async () => sample(await metrics.text(), 'server_connections', 'state="idle"') === n, 5000, `${n} idle connections`);
}

async function pidOf(c: pg.Client): Promise<number> {
  return (await c.query<{ pid: number }>('select pg_backend_pid() as pid')).rows[0]?.pid as number;
}

/** Runs `sql` (simple protocol, one or more statements): the first column of every row, as text. */
async function rows(client: WireClient, sql: string): Promise<string[]> {
  client.send(serialize.query(sql));
  const answer = await client.untilReady();
  const failed = answer.find((m) => m.name === 'error');
  if (failed) throw failed;
  return answer.filter((m) => m.name === 'dataRow').map((m) => String((m as unknown as { fields: unknown[] }).fields[0]));
}

/** Terminate, and until the proxy closed the socket. */
async function terminate(client: WireClient): Promise<void> {
  client.end();
  await waitUntil(() => client.closed, 5000, 'the proxy closed the client');
}

const startup = (extra: Record<string, string> = {}): Record<string, string> => ({ user: 'anyone', database: db.database, application_name: 'desk-test', ...extra });

/** ParameterStatus messages of a greeting, as name=value. */
function reported(client: WireClient): string[] {
  return client.greeting.filter((m) => m.name === 'parameterStatus').map((m) => `${(m as unknown as { parameterName: string }).parameterName}=${(m as unknown as { parameterValue: string }).parameterValue}`);
}

test('a reused connection is greeted, relayed and reset by C: the greeting a fresh login gives, a key of its own, none of the last client\'s state', async (t) => {
  if (!requireNative(t)) return;
  await withPool('', async (proxy, metrics) => {
    const first = await WireClient.open(proxy.port, startup());
    const [pid] = await rows(first, 'select pg_backend_pid()');
    await rows(first, "create temp table desk_leftover (x int); set work_mem = '1234kB'; prepare desk_stmt as select 1");
    await terminate(first);
    await idle(metrics, 1);
    assert.equal(onDesk(proxy), 0, 'the first client logged in through JavaScript');

    for (let i = 0; i < 2; i++) {
      const next = await WireClient.open(proxy.port, startup());
      assert.equal(onDesk(proxy), i + 1, 'served from the desk');
      assert.deepEqual(reported(next), reported(first), 'the same ParameterStatus messages as the login');
      assert.notEqual(next.processId, first.processId, 'a cancel key of its own');
      assert.deepEqual(await rows(next, 'select pg_backend_pid()'), [pid], 'the same server connection');
      assert.deepEqual(await rows(next, "select count(*) from pg_tables where tablename = 'desk_leftover'"), ['0']);
      assert.deepEqual(await rows(next, "select current_setting('work_mem'); select count(*) from pg_prepared_statements"), [(await db.query<{ w: string }>("select current_setting('work_mem') as w"))[0]?.w, '0']);
      await rows(next, "create temp table desk_leftover (x int); set work_mem = '1234kB'; prepare desk_stmt as select 1");
      await terminate(next);
      await idle(metrics, 1);
    }
    const text = await metrics.text();
    assert.equal(sample(text, 'server_logins_total', ''), 1);
    assert.equal(sample(text, 'server_reuses_total', ''), 2);
    assert.equal(sample(text, 'server_resets_total', ''), 3);
  });
});

test('a client that changed a reported setting: the reset\'s ParameterStatus reaches the pool, and the next client is greeted with the login\'s value', async (t) => {
  if (!requireNative(t)) return;
  await withPool('', async (proxy, metrics) => {
    const login = await WireClient.open(proxy.port, startup());
    await terminate(login);
    await idle(metrics, 1);
    const changer = await WireClient.open(proxy.port, startup());
    assert.equal(onDesk(proxy), 1);
    await rows(changer, "set application_name = 'changed'; set DateStyle = 'German'");
    await terminate(changer);
    await idle(metrics, 1);
    const next = await WireClient.open(proxy.port, startup());
    assert.equal(onDesk(proxy), 2, 'back on the desk after the pool read the answer');
    assert.deepEqual(reported(next), reported(login));
    assert.deepEqual(await rows(next, "select current_setting('application_name'); select current_setting('DateStyle')"), ['desk-test', 'ISO, MDY']);
    await terminate(next);
  });
});

test('ServerResetQuery answered with rows keeps the connection; one that fails closes it, and the next client logs in afresh', async (t) => {
  if (!requireNative(t)) return;
  await withPool('ServerResetQuery=select 1', async (proxy, metrics) => {
    const pids: string[] = [];
    for (let i = 0; i < 3; i++) {
      const c = await WireClient.open(proxy.port, startup());
      pids.push(...(await rows(c, 'select pg_backend_pid()')));
      await terminate(c);
      await idle(metrics, 1);
    }
    assert.equal(new Set(pids).size, 1, 'one connection throughout');
    assert.equal(onDesk(proxy), 2);
  });
  await withPool('ServerResetQuery=select 1/0', async (proxy, metrics) => {
    const pids: string[] = [];
    for (let i = 0; i < 3; i++) {
      const c = await WireClient.open(proxy.port, startup());
      pids.push(...(await rows(c, 'select pg_backend_pid()')));
      await terminate(c);
      await waitUntil(async () => sample(await metrics.text(), 'server_closes_total', 'reason="reset_failed"') === i + 1, 5000, `${i + 1} failed resets`);
    }
    assert.equal(new Set(pids).size, 3, 'a fresh login after each failed reset');
    assert.equal(onDesk(proxy), 0, 'no connection was ever clean to park');
  });
});

test('a client gone mid-query on a desk session: the query is cancelled and the connection closed, not parked', async (t) => {
  if (!requireNative(t)) return;
  await withPool('', async (proxy, metrics) => {
    const login = await WireClient.open(proxy.port, startup());
    const [pid] = await rows(login, 'select pg_backend_pid()');
    await terminate(login);
    await idle(metrics, 1);
    const c = pgClient(proxy.port, db, { application_name: 'desk-test' });
    c.on('error', () => {});
    await c.connect();
    assert.equal(onDesk(proxy), 1);
    assert.equal(String(await pidOf(c)), pid);
    void c.query('select pg_sleep(30)').catch(() => {});
    await waitUntil(async () => (await db.query("select count(*)::int as n from pg_stat_activity where pid = $1 and state = 'active'", [Number(pid)]))[0]?.n === 1, 5000, 'the query runs');
    (c as unknown as { connection: { stream: import('node:net').Socket } }).connection.stream.destroy();
    await waitUntil(async () => (await db.query('select count(*)::int as n from pg_stat_activity where pid = $1', [Number(pid)]))[0]?.n === 0, 10_000, 'the backend is gone');
    await waitUntil(() => proxy.logs.some((l) => l['msg'] === 'session ended during a query; cancelling it upstream'), 5000, 'the cancel');
    const next = await WireClient.open(proxy.port, startup());
    assert.notDeepEqual(await rows(next, 'select pg_backend_pid()'), [pid]);
    await terminate(next);
  });
});

test('a desk session\'s connection goes to a client waiting in the full pool when its session ends', async (t) => {
  if (!requireNative(t)) return;
  await withPool('PoolSize=1;QueryWaitTimeout=5000', async (proxy, metrics) => {
    const login = await WireClient.open(proxy.port, startup());
    const [pid] = await rows(login, 'select pg_backend_pid()');
    await terminate(login);
    await idle(metrics, 1);
    const holder = await WireClient.open(proxy.port, startup());
    assert.equal(onDesk(proxy), 1);
    const waiter = pgClient(proxy.port, db, { application_name: 'desk-test' });
    const waiting = waiter.connect();
    await waitUntil(async () => sample(await metrics.text(), 'clients_waiting', '') === 1, 5000, 'the second client waits');
    await rows(holder, "set work_mem = '2345kB'");
    await terminate(holder);
    await waiting;
    assert.equal(String(await pidOf(waiter)), pid, 'the waiter got the connection');
    assert.equal((await waiter.query("select current_setting('work_mem') <> '2345kB' as clean")).rows[0]?.clean, true, 'after its reset');
    await waiter.end();
    await waitUntil(() => ended(proxy) === 3, 5000, 'three sessions ended');
  });
});

test('--idle-timeout on a desk session lets the client go and keeps the connection for the next', async (t) => {
  if (!requireNative(t)) return;
  const metrics = new Metrics();
  const proxy = await startProxy(['--connection', connectionFor(db, token, ''), '--relay', 'native', '--idle-timeout', '300ms'], { observer: metrics.observerFor('desk') });
  try {
    const login = await WireClient.open(proxy.port, startup());
    const [pid] = await rows(login, 'select pg_backend_pid()');
    await terminate(login);
    await idle(metrics, 1);
    const sleeper = await WireClient.open(proxy.port, startup());
    assert.equal(onDesk(proxy), 1);
    await waitUntil(() => proxy.logs.some((l) => l['msg'] === 'session ended' && l['end'] === 'idle_timeout'), 5000, 'the idle timeout');
    await sleep(50);
    await idle(metrics, 1);
    const next = await WireClient.open(proxy.port, startup());
    assert.deepEqual(await rows(next, 'select pg_backend_pid()'), [pid]);
    await terminate(next);
    sleeper.socket.destroy();
  } finally {
    await proxy.close();
  }
});
