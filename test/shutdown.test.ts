/** SIGTERM and SIGINT through the real program, with sessions running. */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import pg from 'pg';
import { startTokenPostgres, type TestPostgres } from './harness/postgres.js';
import { connectionFor, proxyClient, startProxyProcess } from './harness/proxy.js';

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

test('SIGTERM lets a running query finish, refuses new clients, and exits 0', async () => {
  const proxy = await start(['--max-sigterm-delay', '10000']);
  const c = await connected(proxy.port);
  const query = c.query('select pg_sleep(1.2), 42 as answer');
  await new Promise((r) => setTimeout(r, 200));
  proxy.child.kill('SIGTERM');
  await new Promise((r) => setTimeout(r, 200));
  await assert.rejects(connected(proxy.port), /ECONNREFUSED/);
  assert.equal((await query).rows[0].answer, 42);
  await c.end();
  assert.equal(await proxy.exited, 0);
  assert.match(proxy.output(), /"endedByThemselves":true/);
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
