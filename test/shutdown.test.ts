/** SIGTERM and SIGINT through the real program, with sessions running. */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { connect as netConnect } from 'node:net';
import pg from 'pg';
import { serialize } from 'pg-protocol';
import { startTokenPostgres, type TestPostgres } from './harness/postgres.js';
import { connectionFor, proxyClient, startProxyProcess } from './harness/proxy.js';
import { findTool, run } from './harness/tools.js';

const psql = findTool('psql');

let db: TestPostgres;
const token = 'shutdown-token';
before(async () => {
  db = await startTokenPostgres(token);
});
after(async () => db?.stop());

const start = (flags: string[]) => startProxyProcess(['--connection', connectionFor(db, token), '--no-http', ...flags]);

async function connected(port: number): Promise<pg.Client> {
  const c = proxyClient(port, db, { user: 'x' });
  await c.connect();
  return c;
}

/** A client that connects while the proxy drains: Postgres' answer while it shuts down, not a closed port. */
const shuttingDown = (e: { code?: string; message?: string }): boolean => e.code === '57P03' && e.message === 'the proxy is shutting down';

test('SIGTERM lets a running query finish, answers new clients 57P03 while it drains, and exits 0', async () => {
  const proxy = await start(['--max-sigterm-delay', '10s']);
  const c = await connected(proxy.port);
  const query = c.query('select pg_sleep(1.5), 42 as answer');
  await new Promise((r) => setTimeout(r, 200));
  proxy.child.kill('SIGTERM');
  await new Promise((r) => setTimeout(r, 200));
  await assert.rejects(connected(proxy.port), shuttingDown);
  if (psql) {
    const ran = await run(psql, ['-X', '-c', 'select 1', `host=127.0.0.1 port=${proxy.port} user=late dbname=${db.database} connect_timeout=10`]);
    assert.equal(ran.code, 2, ran.stderr);
    assert.match(ran.stderr, /FATAL: {2}the proxy is shutting down/);
  }
  assert.equal((await query).rows[0].answer, 42);
  await c.end();
  assert.equal(await proxy.exited, 0);
  assert.match(proxy.output(), /"endedByThemselves":true/);
  assert.match(proxy.output(), /"sqlstate":"57P03"/, 'the refusal is logged');
  await assert.rejects(connected(proxy.port), /ECONNREFUSED/, 'the port is closed once the process has stopped');
});

test('while the proxy drains, a cancel request still reaches the running query', async () => {
  const proxy = await start(['--max-sigterm-delay', '20s']);
  const c = await connected(proxy.port);
  const query = c.query('select pg_sleep(30)').then(() => 'finished', (e: { code?: string }) => e.code);
  await new Promise((r) => setTimeout(r, 200));
  proxy.child.kill('SIGTERM');
  await new Promise((r) => setTimeout(r, 200));
  await assert.rejects(connected(proxy.port), shuttingDown, 'draining');
  const key = c as unknown as { processID: number; secretKey: number };
  const cancel = netConnect({ host: '127.0.0.1', port: proxy.port }, () => cancel.end(serialize.cancel(key.processID, key.secretKey)));
  cancel.on('error', () => {});
  assert.equal(await query, '57014', 'canceled by the request');
  await c.end();
  assert.equal(await proxy.exited, 0);
});

test('--min-sigterm-delay keeps accepting new clients for a while', async () => {
  const proxy = await start(['--min-sigterm-delay', '800', '--max-sigterm-delay', '5000']);
  proxy.child.kill('SIGTERM');
  await new Promise((r) => setTimeout(r, 200));
  const c = await connected(proxy.port);
  assert.equal((await c.query('select 1 as one')).rows[0].one, 1);
  await c.end();
  assert.equal(await proxy.exited, 0);
});

/** A proxy with one session in the middle of a 30-second query, then SIGTERM; resolves with how the query ended. */
async function termDuringLongQuery(flags: string[]): Promise<{ proxy: Awaited<ReturnType<typeof start>>; query: Promise<'finished' | 'failed'> }> {
  const proxy = await start(flags);
  const c = await connected(proxy.port);
  const query = c.query('select pg_sleep(30)').then(() => 'finished' as const, () => 'failed' as const);
  await new Promise((r) => setTimeout(r, 200));
  proxy.child.kill('SIGTERM');
  return { proxy, query };
}

test('sessions still open after --max-sigterm-delay are closed, and the exit code says so', async () => {
  const { proxy, query } = await termDuringLongQuery(['--max-sigterm-delay', '300']);
  assert.equal(await query, 'failed');
  assert.equal(await proxy.exited, 143);
  for (let i = 0; i < 50 && (await db.backendsOf(db.tokenRole)) > 0; i++) await new Promise((r) => setTimeout(r, 100));
  assert.equal(await db.backendsOf(db.tokenRole), 0, 'no upstream backend left behind');
});

test('--exit-zero-on-sigterm exits 0 even when sessions had to be closed', async () => {
  const { proxy } = await termDuringLongQuery(['--max-sigterm-delay', '200', '--exit-zero-on-sigterm']);
  assert.equal(await proxy.exited, 0);
});

test('a second signal ends at once', async () => {
  const { proxy, query } = await termDuringLongQuery(['--max-sigterm-delay', '60000']);
  await new Promise((r) => setTimeout(r, 300));
  const started = Date.now();
  proxy.child.kill('SIGINT');
  assert.equal(await proxy.exited, 130);
  assert.ok(Date.now() - started < 5000);
  assert.equal(await query, 'failed');
});
