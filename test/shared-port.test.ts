/**
 * Several databases on one port, through the real program: config-file targets that share a
 * ListenPort are selected by the client's database name, each with its own identity, password
 * source and upstream database; an unknown name gets 3D000 with the names it could use; a target
 * on a port of its own works as before; a cancel request through the shared port finds its
 * session. And the configurations a shared port cannot serve are refused at start.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { connect as netConnect, createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { parseArgs } from '../src/cli/args.js';
import { loadConfig } from '../src/config/load.js';
import { listenerGroups } from '../src/config/shared-ports.js';
import { startPostgres, type TestPostgres } from './harness/postgres.js';
import { startProxyProcess, type ProxyProcess } from './harness/proxy.js';
import { cleanEnvironment, sleep } from './reliability-support.js';

let db: TestPostgres;
let dir: string;
let proxy: ProxyProcess;
let shared: number;
let solo: number;
const token = `shared-port-token-${Date.now()}`;

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const probe = createServer();
    probe.once('error', reject);
    probe.listen(0, '127.0.0.1', () => {
      const { port } = probe.address() as { port: number };
      probe.close(() => resolve(port));
    });
  });
}

before(async () => {
  cleanEnvironment();
  dir = mkdtempSync(join(tmpdir(), 'lbp-shared-port-'));
  db = await startPostgres();
  await db.setTokenPassword(token);
  [shared, solo] = [await freePort(), await freePort()];
  const config = join(dir, 'shared.yaml');
  writeFileSync(
    config,
    [
      'Server: localhost',
      `Port: ${db.port}`,
      `SSLRootCert: ${db.ca.caFile}`,
      'targets:',
      '  - Name: analytics',
      `    ListenPort: ${shared}`,
      `    User: ${db.tokenRole}`,
      `    OAuthAccessToken: ${token}`,
      `    Database: ${db.database}`,
      '  - name: ops',
      `    ListenPort: ${shared}`,
      `    User: ${db.scramRole}`,
      `    Password: ${db.scramPassword}`,
      '    Database: postgres',
      '  - name: solo',
      `    ListenPort: ${solo}`,
      `    User: ${db.tokenRole}`,
      `    OAuthAccessToken: ${token}`,
    ].join('\n'),
  );
  proxy = await startProxyProcess(['--config', config, '--no-http'], {}, 15_000, false);
  for (let i = 0; i < 100 && listening().length < 2; i++) await sleep(50);
});

after(async () => {
  await proxy?.stop('SIGINT');
  await db?.stop();
  rmSync(dir, { recursive: true, force: true });
});

function listening(): Array<{ target: string; port: number; databases?: string[] }> {
  return proxy
    .output()
    .split('\n')
    .filter((line) => line.includes('"msg":"listening"'))
    .map((line) => JSON.parse(line) as { target: string; port: number; databases?: string[] });
}

async function session(port: number, database: string): Promise<{ user: string; database: string }> {
  const c = new pg.Client({ host: '127.0.0.1', port, user: 'someone', database, connectionTimeoutMillis: 10_000 });
  c.on('error', () => {});
  await c.connect();
  try {
    const row = (await c.query<{ u: string; d: string }>('select current_user as u, current_database() as d')).rows[0];
    return { user: row?.u ?? '', database: row?.d ?? '' };
  } finally {
    await c.end();
  }
}

test('two targets on one port: the database name picks the target, with its own identity and upstream database', async () => {
  assert.deepEqual(
    listening().map((l) => [l.port, l.databases]),
    [
      [shared, ['analytics', 'ops']],
      [solo, undefined],
    ],
  );
  assert.deepEqual(await session(shared, 'analytics'), { user: db.tokenRole, database: db.database });
  assert.deepEqual(await session(shared, 'ops'), { user: db.scramRole, database: 'postgres' });
  // Both at once, and again: nothing of one session leaks into the other.
  assert.deepEqual(await Promise.all([session(shared, 'ops'), session(shared, 'analytics')]), [
    { user: db.scramRole, database: 'postgres' },
    { user: db.tokenRole, database: db.database },
  ]);
});

test('an unknown database name gets 3D000 listing the names this port serves; the port goes on', async () => {
  await assert.rejects(session(shared, 'nope'), (error: pg.DatabaseError) => {
    assert.equal(error.code, '3D000');
    assert.equal(error.message, 'database "nope" does not exist; this port serves: analytics, ops');
    return true;
  });
  // No database named: Postgres' default is the user name, which names no target either.
  await assert.rejects(
    (async () => {
      const c = new pg.Client({ host: '127.0.0.1', port: shared, user: 'someone', connectionTimeoutMillis: 10_000 });
      c.on('error', () => {});
      try {
        await c.connect();
      } finally {
        await c.end().catch(() => {});
      }
    })(),
    (error: pg.DatabaseError) => error.code === '3D000' && /database "someone" does not exist/.test(error.message),
  );
  assert.equal((await session(shared, 'analytics')).user, db.tokenRole);
});

test('a target on a port of its own keeps working as before: the client names the upstream database', async () => {
  assert.deepEqual(await session(solo, db.database), { user: db.tokenRole, database: db.database });
  assert.deepEqual(await session(solo, 'postgres'), { user: db.tokenRole, database: 'postgres' });
});

test('a cancel request sent to the shared port reaches the session of either target', async () => {
  for (const database of ['ops', 'analytics']) {
    const c = new pg.Client({ host: '127.0.0.1', port: shared, user: 'someone', database });
    c.on('error', () => {});
    await c.connect();
    try {
      const { processID, secretKey } = c as unknown as { processID: number; secretKey: number };
      const sleeping = c.query('select pg_sleep(30)');
      await sleep(300);
      const cancel = Buffer.alloc(16);
      cancel.writeInt32BE(16, 0);
      cancel.writeInt32BE(80877102, 4);
      cancel.writeInt32BE(processID, 8);
      cancel.writeInt32BE(secretKey, 12);
      netConnect({ host: '127.0.0.1', port: shared }).end(cancel);
      await assert.rejects(sleeping, (e: pg.DatabaseError) => e.code === '57014');
      assert.equal((await c.query('select 1 as one')).rows[0].one, 1);
    } finally {
      await c.end();
    }
  }
});

test('a shared port is refused at start when its targets are not named, share a name, or differ in a listener setting', async () => {
  const load = (argv: string[]) => loadConfig(parseArgs(argv), {}, dir);
  const file = (name: string, text: string): string => {
    const path = join(dir, name);
    writeFileSync(path, text);
    return path;
  };
  const unnamed = await load(['--connection', 'Server=a;User=u', '--connection', 'Server=b;User=u', '--port', '6543']);
  assert.throws(() => listenerGroups(unnamed.targets), /^ConfigError: ListenPort: targets target1, target2 would all listen on 127\.0\.0\.1:6543; give each its own ListenPort, or name them/);

  const differing = await load(['--config', file('differ.yaml', 'Server: h\nUser: u\nListenPort: 6543\ntargets:\n  - name: a\n  - name: b\n    StartupTimeout: 5000\n')]);
  assert.throws(() => listenerGroups(differing.targets), /^ConfigError: StartupTimeout: targets a and b share 127\.0\.0\.1:6543 but not their StartupTimeout/);

  await assert.rejects(load(['--config', file('twice.yaml', 'Server: h\nUser: u\ntargets:\n  - name: a\n  - name: a\n')]), /two targets are named "a"/);

  const apart = await load(['--config', file('apart.yaml', 'Server: h\nUser: u\ntargets:\n  - name: a\n    ListenPort: 6543\n  - name: b\n    ListenPort: 6544\n  - name: c\n    ListenPort: 0\n  - name: d\n    ListenPort: 0\n')]);
  assert.deepEqual(listenerGroups(apart.targets), [[0], [1], [2], [3]]);
});
