/**
 * The console on a port that several targets share: it answers on the port's front, names each
 * target's pool and database as clients name them (the target's name), PAUSE holds one target's
 * clients and not the other's, and RELOAD adds a target to the port and removes one from it.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { startTokenPostgres, type TestPostgres } from './harness/postgres.js';
import { consoleClient, consoleQuery, consoleState, startRuntime, type ConsoleAddress, type RunningRuntime } from './harness/console.js';
import { freePort } from './harness/tools.js';
import { cleanEnvironment, waitUntil } from './reliability-support.js';

const token = `console-shared-${Date.now()}`;
let db: TestPostgres;
let dir: string;
let file: string;
let port: number;
let proxy: RunningRuntime;
let admin: ConsoleAddress;

function writeConfig(names: readonly string[]): void {
  writeFileSync(
    file,
    [
      'Server: localhost',
      `Port: ${db.port}`,
      `SSLRootCert: ${db.ca.caFile}`,
      `User: "${db.tokenRole}"`,
      `OAuthAccessToken: ${token}`,
      `Database: ${db.database}`,
      `UnixSocket: ${dir}`,
      `ListenPort: ${port}`,
      'targets:',
      ...names.map((name) => `  - name: ${name}`),
    ].join('\n'),
  );
}

before(async () => {
  cleanEnvironment();
  db = await startTokenPostgres(token);
  dir = mkdtempSync(join(tmpdir(), 'lbp-console-shared-'));
  file = join(dir, 'proxy.yaml');
  port = await freePort();
  writeConfig(['analytics', 'ops']);
  proxy = await startRuntime(['--config', file]);
  admin = { host: dir, port };
});

after(async () => {
  await proxy?.close();
  await db?.stop();
  rmSync(dir, { recursive: true, force: true });
});

async function session(database: string): Promise<pg.Client> {
  const client = new pg.Client({ host: '127.0.0.1', port, user: 'someone', database, connectionTimeoutMillis: 10_000 });
  client.on('error', () => {});
  await client.connect();
  return client;
}

test('the shared port serves the console; its tables name each target as clients do', async () => {
  assert.deepEqual(
    (await consoleQuery(admin, 'SHOW DATABASES')).rows.map((r) => [r['name'], r['database'], r['target']]),
    [
      ['analytics', db.database, 'analytics'],
      ['ops', db.database, 'ops'],
    ],
  );
  const client = await session('analytics');
  try {
    const pools = (await consoleQuery(admin, 'SHOW POOLS')).rows;
    assert.deepEqual(
      pools.map((p) => [p['database'], p['cl_active'], p['sv_active']]),
      [['analytics', 1, 1]],
    );
    const mine = (await consoleQuery({ host: '127.0.0.1', port }, 'SHOW CLIENTS')).rows.find((c) => c['database'] === 'analytics');
    assert.equal(mine?.['target'], 'analytics');
  } finally {
    await client.end();
  }
});

test('PAUSE of one target holds its new clients, not the other target\'s', async () => {
  const pausing = consoleClient(admin);
  await pausing.connect();
  try {
    await pausing.query('PAUSE ops');
    const held = session('ops');
    await waitUntil(async () => (await consoleQuery(admin, 'SHOW CLIENTS')).rows.some((c) => c['target'] === 'ops' && c['paused'] === 1), 10_000, 'the ops client held');
    const other = await session('analytics');
    assert.equal((await other.query('select 1 as n')).rows[0].n, 1);
    await other.end();
    await pausing.query('RESUME ops');
    const client = await held;
    assert.equal((await client.query('select 2 as n')).rows[0].n, 2);
    await client.end();
  } finally {
    await pausing.end();
  }
});

test('RELOAD adds a target to the shared port and removes one from it', async () => {
  writeConfig(['analytics', 'ops', 'reports']);
  assert.equal(await consoleState(admin, 'RELOAD'), 'ok');
  const reports = await session('reports');
  assert.equal((await reports.query('select current_database() as d')).rows[0].d, db.database);
  writeConfig(['analytics', 'reports']);
  assert.equal(await consoleState(admin, 'RELOAD'), 'ok');
  await assert.rejects(session('ops'), (error: pg.DatabaseError) => error.code === '3D000' && error.message === 'database "ops" does not exist; this port serves: analytics, reports');
  assert.equal((await reports.query('select 3 as n')).rows[0].n, 3);
  await reports.end();
  await waitUntil(async () => !(await consoleQuery(admin, 'SHOW TARGETS')).rows.some((r) => r['target'] === 'ops'), 10_000, 'ops gone');
  writeConfig(['analytics', 'reports', 'pgbouncer']);
  await assert.rejects(consoleQuery(admin, 'RELOAD'), (error: pg.DatabaseError) => error.code === 'F0000' && /the name pgbouncer reaches the admin console/.test(error.message));
});
