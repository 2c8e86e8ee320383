/**
 * The admin console (database lakebase_proxy) of a proxy in front of a real Postgres: psql runs
 * each command; what SHOW says matches the sessions and upstream connections that really exist;
 * who may change the proxy (a trusted loopback client may not: 42501); PAUSE with a transaction
 * running; KILL CLIENT; the errors a client gets for what the console does not do; the console
 * on a port that several targets share.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { startTokenPostgres, type TestPostgres } from './harness/postgres.js';
import { connectionFor, proxyClient } from './harness/proxy.js';
import { configTop, consoleClient, consoleQuery, consoleState, psql, psqlConsole, startRuntime, type ConsoleAddress, type RunningRuntime } from './harness/console.js';
import { freePort } from './harness/tools.js';
import { cancelRequest, cleanEnvironment, waitUntil } from './reliability-support.js';
import { deskSkip } from './pool-transaction-desk-review-support.js';

const token = `console-token-${Date.now()}`;
let db: TestPostgres;
let dir: string;
let proxy: RunningRuntime;
let tcp: ConsoleAddress;
let unix: ConsoleAddress;

before(async () => {
  cleanEnvironment();
  db = await startTokenPostgres(token);
  dir = mkdtempSync(join(tmpdir(), 'lbp-console-'));
  proxy = await startRuntime(['--connection', connectionFor(db, token), '--port', '0', '--unix-socket', dir, '--pool-size', '2']);
  tcp = { host: '127.0.0.1', port: proxy.port() };
  unix = { host: dir, port: proxy.port() };
});

after(async () => {
  await proxy?.close();
  await db?.stop();
  rmSync(dir, { recursive: true, force: true });
});

/** A session through the proxy to the real database, named so that SHOW can be checked against pg_stat_activity. */
async function session(name: string): Promise<pg.Client> {
  const client = proxyClient(proxy.port(), db, { user: 'someone', application_name: name });
  await client.connect();
  return client;
}

test('psql runs each command on the console', { skip: psql ? false : 'psql is not installed' }, async () => {
  const items = ['POOLS', 'CLIENTS', 'SERVERS', 'STATS', 'DATABASES', 'CONFIG', 'VERSION', 'LISTS', 'TOKENS', 'TARGETS'];
  const shown = await psqlConsole(tcp, items.map((item) => `SHOW ${item}`).join('; '));
  assert.equal(shown.code, 0, shown.stderr);
  assert.equal(shown.stdout.match(/^\(\d+ rows?\)$/gm)?.length, items.length, `a table for each SHOW:\n${shown.stdout}`);
  assert.match(shown.stdout, /^target\|identity\|source\|description\|/m, 'SHOW TOKENS among them');
  const help = await psqlConsole(tcp, 'SHOW HELP');
  assert.equal(help.code, 0);
  assert.match(help.stderr, /NOTICE: {2}00000: Console usage\nDETAIL: {2}\n\tSHOW HELP\|POOLS/);
  assert.match(help.stderr, /CALL GetOAuthAccessToken\(verifier =>/);
  // The state-changing commands, over the unix socket (mode 0600: the proxy's own OS user).
  const changed = await psqlConsole(unix, 'PAUSE; RESUME default; RELOAD');
  assert.equal(changed.code, 0, changed.stderr);
  assert.equal(changed.stdout, 'PAUSE\nRESUME\nRELOAD\n');
  assert.match(changed.stderr, /NOTICE: {2}00000: no change/);
  // Several statements in one query run in order, as Postgres runs them; the alias pgbouncer works too.
  const two = await psqlConsole({ ...tcp, database: 'pgbouncer' }, 'SHOW VERSION; SHOW LISTS');
  assert.equal(two.code, 0, two.stderr);
  assert.match(two.stdout, /^version\nlakebase-proxy 0\.0\.0-test\n\(1 row\)\nlist\|items\ndatabases\|1\n/);
  const bad = await psqlConsole(tcp, 'select 1');
  assert.equal(bad.code, 1);
  assert.match(bad.stderr, /ERROR: {2}42601: "select" is not a command of the lakebase_proxy console/);
  assert.match(bad.stderr, /HINT: {2}SHOW HELP lists the console commands/);
  const victim = await session('console-psql-kill');
  const id = (await consoleQuery(tcp, 'SHOW CLIENTS')).rows.find((c) => c['application_name'] === 'console-psql-kill')?.['id'];
  const kill = await psqlConsole(unix, `KILL CLIENT ${String(id)}`);
  assert.equal(kill.stdout, 'KILL\n', kill.stderr);
  await assert.rejects(victim.query('select 1'));
  await victim.end().catch(() => undefined);
  const shutdown = await psqlConsole(unix, 'SHUTDOWN');
  assert.equal(shutdown.stdout, 'SHUTDOWN\n');
  assert.deepEqual(proxy.shutdowns, ['admin@unix socket'], 'SHUTDOWN asks for what SIGTERM does, once');
  proxy.shutdowns.length = 0;
});

test('the greeting carries what drivers read, and a BackendKeyData', async () => {
  const client = consoleClient(tcp);
  const parameters = new Map<string, string>();
  let key: { processID: number; secretKey: number } | undefined;
  client.connection.on('parameterStatus', (m: { parameterName: string; parameterValue: string }) => parameters.set(m.parameterName, m.parameterValue));
  client.connection.on('backendKeyData', (m: { processID: number; secretKey: number }) => (key = m));
  await client.connect();
  try {
    assert.match(parameters.get('server_version') ?? '', /^16\.0 \(lakebase-proxy 0\.0\.0-test console\)$/);
    assert.equal(parameters.get('client_encoding'), 'UTF8');
    assert.equal(parameters.get('server_encoding'), 'UTF8');
    assert.equal(parameters.get('standard_conforming_strings'), 'on');
    assert.equal(parameters.get('DateStyle'), 'ISO, MDY');
    assert.equal(parameters.get('integer_datetimes'), 'on');
    assert.equal(parameters.get('is_superuser'), 'off', 'a trusted TCP client is no admin');
    assert.ok(key && key.processID > 0);
    assert.equal((await client.query('SHOW VERSION')).rows[0].version, 'lakebase-proxy 0.0.0-test');
  } finally {
    await client.end();
  }
  const owner = consoleClient(unix);
  const ownerParameters = new Map<string, string>();
  owner.connection.on('parameterStatus', (m: { parameterName: string; parameterValue: string }) => ownerParameters.set(m.parameterName, m.parameterValue));
  await owner.connect();
  await owner.end();
  assert.equal(ownerParameters.get('is_superuser'), 'on');
});

test('a trusted loopback client may SHOW but is refused every command that changes the proxy or touches tokens (42501)', async () => {
  for (const sql of ['PAUSE', 'RESUME', 'RELOAD', 'SHUTDOWN', 'KILL CLIENT 1', 'CALL GetOAuthAuthorizationUrl()', "CALL GetOAuthAccessToken(verifier => 'x')", 'CALL RefreshOAuthAccessToken()', 'CALL NoSuchProcedure()']) {
    assert.equal(await consoleState(tcp, sql), '42501', sql);
  }
  assert.equal(await consoleState(tcp, 'SHOW TOKENS'), 'ok');
  assert.deepEqual(proxy.shutdowns, []);
  assert.equal(proxy.runtime.targets()[0]?.server.paused, false);
  const refused = proxy.logs.filter((l) => l['msg'] === 'console command refused: not an admin');
  assert.ok(refused.some((l) => l['command'] === 'PAUSE' && l['user'] === 'admin' && /^127\.0\.0\.1:\d+$/.test(String(l['peer']))), 'the refusal is logged with who asked');
  const verifier = refused.find((l) => l['command'] === 'CALL GetOAuthAccessToken');
  assert.deepEqual(verifier?.['arguments'], { verifier: '[redacted]' }, 'a secret argument is never logged');
});

test('a unix socket other users may reach grants nothing more than TCP', async () => {
  const open = mkdtempSync(join(tmpdir(), 'lbp-console-open-'));
  chmodSync(open, 0o755);
  const shared = await startRuntime(['--connection', connectionFor(db, token), '--port', '0', '--unix-socket', open, '--unix-socket-mode', '0666']);
  try {
    const address = { host: open, port: shared.port() };
    assert.equal(await consoleState(address, 'SHOW POOLS'), 'ok');
    assert.equal(await consoleState(address, 'PAUSE'), '42501');
  } finally {
    await shared.close();
    rmSync(open, { recursive: true, force: true });
  }
});

test('AdminUsers authenticated by SCRAM may run every command; other users of --client-users may only SHOW', async () => {
  const users = join(dir, 'users.txt');
  writeFileSync(users, 'alice:alice-password\nbob:bob-password\n', { mode: 0o600 });
  const scram = await startRuntime(['--connection', connectionFor(db, token), '--port', '0', '--client-auth', 'scram-sha-256', '--client-users', users, '--admin-users', 'alice, carol']);
  try {
    const alice = { host: '127.0.0.1', port: scram.port(), user: 'alice', password: 'alice-password' };
    const bob = { host: '127.0.0.1', port: scram.port(), user: 'bob', password: 'bob-password' };
    assert.equal(await consoleState(bob, 'SHOW CLIENTS'), 'ok');
    assert.equal(await consoleState(bob, 'PAUSE'), '42501');
    assert.equal(await consoleState(alice, 'PAUSE'), 'ok');
    assert.equal(scram.runtime.targets()[0]?.server.paused, true);
    assert.equal(await consoleState(alice, 'RESUME'), 'ok');
    assert.equal(await consoleState({ ...alice, password: 'wrong' }, 'SHOW VERSION'), '28P01');
    assert.ok(scram.logs.some((l) => l['msg'] === 'console command' && l['command'] === 'PAUSE' && l['user'] === 'alice'));
  } finally {
    await scram.close();
  }
});

test('SHOW CLIENTS, SERVERS and POOLS show the sessions and upstream connections that exist', async () => {
  const client = await session('console-show');
  try {
    const pid = (await client.query<{ pid: number }>('select pg_backend_pid() as pid')).rows[0]?.pid;
    const clients = (await consoleQuery(tcp, 'SHOW CLIENTS')).rows;
    const mine = clients.find((c) => c['application_name'] === 'console-show');
    assert.ok(mine, 'the session is listed');
    assert.equal(mine['user'], 'someone');
    assert.equal(mine['database'], db.database);
    assert.equal(mine['state'], 'active');
    assert.equal(mine['type'], 'C');
    assert.equal(mine['target'], 'default');
    assert.ok(clients.some((c) => c['database'] === 'lakebase_proxy' && c['state'] === 'active'), 'the console client itself is listed');
    const servers = (await consoleQuery(tcp, 'SHOW SERVERS')).rows;
    const upstream = servers.find((s) => s['remote_pid'] === pid);
    assert.ok(upstream, `the upstream backend ${String(pid)} is listed: ${JSON.stringify(servers)}`);
    assert.equal(upstream['state'], 'active');
    assert.equal(upstream['user'], db.tokenRole);
    assert.equal(upstream['link'], mine['ptr'], 'the server is linked to its client');
    assert.equal(mine['link'], upstream['ptr']);
    assert.match(String(upstream['tls']), /^TLSv1\.[23]\//);
    const pool = (await consoleQuery(tcp, 'SHOW POOLS')).rows.find((p) => p['database'] === db.database);
    assert.equal(pool?.['cl_active'], 1);
    assert.equal(pool?.['sv_active'], 1);
    assert.equal(pool?.['user'], db.tokenRole);
  } finally {
    await client.end();
  }
  await waitUntil(async () => (await consoleQuery(tcp, 'SHOW POOLS')).rows.some((p) => p['sv_idle'] === 1 && p['cl_active'] === 0), 10_000, 'the connection back in the pool, idle');
  const lists = (await consoleQuery(tcp, 'SHOW LISTS')).rows;
  assert.equal(lists.find((l) => l['list'] === 'used_servers')?.['items'], 1);
  const stats = (await consoleQuery(tcp, 'SHOW STATS')).rows[0];
  assert.ok(Number(stats?.['total_received']) > 0 && Number(stats?.['total_sent']) > 0, 'bytes relayed are counted');
  assert.ok(Number(stats?.['total_sessions']) >= 1);
});

test('transaction mode: a connection idle on the desk (the fast path hands it on in C) is idle in SHOW SERVERS, as in SHOW POOLS', { skip: deskSkip }, async () => {
  const pooled = await startRuntime(['--connection', connectionFor(db, token), '--port', '0', '--pool-mode', 'transaction', '--pool-size', '1']);
  const address = { host: '127.0.0.1', port: pooled.port() };
  const client = proxyClient(pooled.port(), db, { user: 'someone', application_name: 'console-desk' });
  try {
    await client.connect();
    const pid = (await client.query<{ pid: number }>('select pg_backend_pid() as pid')).rows[0]?.pid;
    // The fast path's transactions: the connection joins the desk and stays there between them.
    for (let i = 0; i < 3; i++) await client.query('select 1');
    const desk = (): { count: number; idle: number } | undefined => pooled.runtime.servers[0]?.pools.get(db.database)?.desk?.stats;
    await waitUntil(() => desk()?.count === 1 && desk()?.idle === 1, 10_000, 'the connection idle on the desk (precondition)');
    const server = (await consoleQuery(address, 'SHOW SERVERS')).rows.find((s) => s['remote_pid'] === pid);
    assert.equal(server?.['state'], 'idle', JSON.stringify(server));
    const pool = (await consoleQuery(address, 'SHOW POOLS')).rows.find((p) => p['database'] === db.database);
    assert.equal(pool?.['sv_idle'], 1);
    assert.equal(pool?.['sv_active'], 0);
    // A transaction open on it: lent to the client, active.
    await client.query('begin');
    await client.query('select 1');
    assert.equal((await consoleQuery(address, 'SHOW SERVERS')).rows.find((s) => s['remote_pid'] === pid)?.['state'], 'active');
    await client.query('commit');
  } finally {
    await client.end();
    await pooled.close();
  }
});

test('KILL CLIENT ends one session; the others go on', async () => {
  const doomed = await session('console-doomed');
  const other = await session('console-other');
  try {
    const id = (await consoleQuery(tcp, 'SHOW CLIENTS')).rows.find((c) => c['application_name'] === 'console-doomed')?.['id'];
    assert.ok(id !== undefined);
    assert.equal(await consoleState(unix, `KILL CLIENT ${String(id)}`), 'ok');
    await assert.rejects(doomed.query('select 1'));
    assert.equal((await other.query('select 2 as n')).rows[0].n, 2);
    assert.equal(await consoleState(unix, `KILL CLIENT ${String(id)}`), '42704', 'gone: no such client');
    assert.ok(proxy.logs.some((l) => l['command'] === 'KILL CLIENT' && l['client'] === Number(id)));
  } finally {
    await doomed.end().catch(() => undefined);
    await other.end();
  }
});

test('PAUSE waits for the running transaction to end and holds new clients until RESUME', async () => {
  const running = await session('console-running');
  await running.query('begin');
  await running.query('create temporary table t (n int)');
  const admin = consoleClient(unix);
  await admin.connect();
  let paused = false;
  const pause = admin.query('PAUSE').then(() => (paused = true));
  await waitUntil(() => proxy.runtime.targets()[0]?.server.paused === true, 10_000, 'the gate closed');
  // A client that comes now is held after its startup.
  const held = proxyClient(proxy.port(), db, { user: 'someone', application_name: 'console-held' });
  let connected = false;
  const connecting = held.connect().then(() => (connected = true));
  await waitUntil(async () => (await consoleQuery(tcp, 'SHOW CLIENTS')).rows.some((c) => c['application_name'] === 'console-held' && c['state'] === 'waiting' && c['paused'] === 1), 10_000, 'the new client held');
  const pool = (await consoleQuery(tcp, 'SHOW POOLS')).rows.find((p) => p['database'] === db.database);
  assert.equal(pool?.['cl_waiting'], 1);
  assert.equal(pool?.['paused'], 1);
  assert.equal(paused, false, 'PAUSE waits while a session runs');
  assert.equal(connected, false);
  // The transaction ends and its client leaves (session mode: the server is released then).
  await running.query('insert into t values (1)');
  await running.query('commit');
  await running.end();
  await pause;
  assert.equal(connected, false, 'still held after PAUSE completed');
  assert.deepEqual((await consoleQuery(tcp, 'SHOW SERVERS')).rows, [], 'the paused target has closed its upstream connections');
  await admin.query('RESUME');
  await connecting;
  assert.equal((await held.query('select 3 as n')).rows[0].n, 3);
  await held.end();
  await admin.end();
});

test('a cancel request ends a waiting PAUSE; the target stays paused until RESUME', async () => {
  const running = await session('console-cancel');
  const admin = consoleClient(unix);
  await admin.connect();
  try {
    const key = admin as unknown as { processID: number; secretKey: number };
    const pause = admin.query('PAUSE').then(
      () => 'done',
      (error: { code?: string; message?: string }) => `${error.code}: ${error.message}`,
    );
    await waitUntil(() => proxy.runtime.targets()[0]?.server.paused === true, 10_000, 'the gate closed');
    await cancelRequest(proxy.port(), key.processID, key.secretKey);
    assert.equal(await pause, '57014: canceling statement due to user request: default stays paused, holding new clients, until RESUME');
    assert.equal(proxy.runtime.targets()[0]?.server.paused, true);
    assert.equal((await running.query('select 4 as n')).rows[0].n, 4, 'the running session goes on');
    assert.equal((await admin.query('SHOW VERSION')).rows.length, 1, 'the console session goes on');
    await admin.query('RESUME');
  } finally {
    await running.end();
    await admin.end();
  }
});

test('the extended protocol gets a clear error and the session goes on; bad input never breaks the console', async () => {
  const client = consoleClient(tcp);
  await client.connect();
  try {
    await assert.rejects(client.query('SHOW POOLS WHERE', []), (error: pg.DatabaseError) => error.code === '42601');
    await assert.rejects(client.query({ text: 'SHOW VERSION', values: [1] }), (error: pg.DatabaseError) => {
      assert.equal(error.code, '0A000');
      assert.match(error.message, /simple query protocol only/);
      assert.match(error.hint ?? '', /SHOW HELP/);
      return true;
    });
    assert.equal((await client.query('SHOW VERSION')).rows[0].version, 'lakebase-proxy 0.0.0-test');
    assert.equal((await client.query('')).command, null, 'an empty query');
    for (const [sql, code] of [
      ['SHOW', '42601'],
      ['SHOW nonsense', '42704'],
      ["SHOW 'pools'", '42601'],
      ['KILL 5', '42601'],
      ['KILL CLIENT x', '42601'],
      ['PAUSE a b', '42601'],
      ["CALL GetOAuthAccessToken(verifier => 'unterminated", '42601'],
      ['/* unterminated', '42601'],
      ['SHOW POOLS @', '42601'],
    ]) {
      await assert.rejects(client.query(sql as string), (error: pg.DatabaseError) => error.code === code, sql);
    }
    assert.equal((await client.query('show version;')).rows.length, 1, 'lower case and a trailing semicolon');
  } finally {
    await client.end();
  }
});

test('PAUSE and RESUME name a target; an unknown one is 42704, a target not paused 55000', async () => {
  assert.equal(await consoleState(unix, 'PAUSE nowhere'), '42704');
  assert.equal(await consoleState(unix, 'RESUME default'), '55000');
  assert.equal(await consoleState(unix, `PAUSE "${db.database}"`), 'ok', 'by the database name clients use');
  assert.equal(await consoleState(unix, "RESUME 'default'"), 'ok');
});

test('a shutdown turns away the clients PAUSE holds (57P03) instead of waiting for a RESUME', async () => {
  const other = await startRuntime(['--connection', connectionFor(db, token), '--port', '0', '--unix-socket', dir]);
  try {
    assert.equal(await consoleState({ host: dir, port: other.port() }, 'PAUSE'), 'ok');
    const held = proxyClient(other.port(), db, { user: 'someone', application_name: 'console-held-at-shutdown' });
    const outcome = held.connect().then(
      () => 'connected',
      (error: { code?: string }) => error.code,
    );
    await waitUntil(() => other.runtime.targets()[0]?.server.clients().some((c) => c.paused) === true, 10_000, 'the client held');
    for (const server of other.runtime.servers) server.refuseNewClients();
    assert.equal(await outcome, '57P03');
    await Promise.all(other.runtime.servers.map((s) => s.drained()));
  } finally {
    await other.close();
  }
});

test('a client PAUSE holds past QueryWaitTimeout gets 57P03 naming the pause and the setting', async () => {
  const other = await startRuntime(['--connection', connectionFor(db, token), '--port', '0', '--unix-socket', dir, '--query-wait-timeout', '300ms']);
  try {
    assert.equal(await consoleState({ host: dir, port: other.port() }, 'PAUSE'), 'ok');
    const held = proxyClient(other.port(), db, { user: 'someone' });
    await assert.rejects(held.connect(), (error: pg.DatabaseError) => {
      assert.equal(error.code, '57P03');
      assert.equal(error.message, 'target default is paused (PAUSE from the console) and was not resumed within QueryWaitTimeout (0.3 s)');
      return true;
    });
    assert.ok(other.logs.some((l) => l['msg'] === 'client held by PAUSE turned away' && l['sqlstate'] === '57P03'));
  } finally {
    await other.close();
  }
});

// --- A port that several targets share -----------------------------------------------------
// The console answers on the port's front, names each target's pool and database as clients
// name them (the target's name), PAUSE holds one target's clients and not the other's, and
// RELOAD adds a target to the port and removes one from it.

let sharedDir: string | undefined;
let sharedProxy: RunningRuntime | undefined;
let file: string;
let port: number;
let admin: ConsoleAddress;

function writeConfig(names: readonly string[]): void {
  writeFileSync(
    file,
    [
      ...configTop(db, token, sharedDir as string),
      `ListenPort: ${port}`,
      'targets:',
      ...names.map((name) => `  - name: ${name}`),
    ].join('\n'),
  );
}

/** The shared port's runtime, started by the first of its tests (after the tests above). */
async function sharedPort(): Promise<void> {
  if (sharedProxy) return;
  sharedDir = mkdtempSync(join(tmpdir(), 'lbp-console-shared-'));
  file = join(sharedDir, 'proxy.yaml');
  port = await freePort();
  writeConfig(['analytics', 'ops']);
  sharedProxy = await startRuntime(['--config', file]);
  admin = { host: sharedDir, port };
}

after(async () => {
  await sharedProxy?.close();
  if (sharedDir) rmSync(sharedDir, { recursive: true, force: true });
});

async function sharedSession(database: string): Promise<pg.Client> {
  const client = new pg.Client({ host: '127.0.0.1', port, user: 'someone', database, connectionTimeoutMillis: 10_000 });
  client.on('error', () => {});
  await client.connect();
  return client;
}

test('the shared port serves the console; its tables name each target as clients do', async () => {
  await sharedPort();
  assert.deepEqual(
    (await consoleQuery(admin, 'SHOW DATABASES')).rows.map((r) => [r['name'], r['database'], r['target']]),
    [
      ['analytics', db.database, 'analytics'],
      ['ops', db.database, 'ops'],
    ],
  );
  const client = await sharedSession('analytics');
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

test('PAUSE of one target on a shared port holds its new clients, not the other target\'s', async () => {
  await sharedPort();
  const pausing = consoleClient(admin);
  await pausing.connect();
  try {
    await pausing.query('PAUSE ops');
    const held = sharedSession('ops');
    await waitUntil(async () => (await consoleQuery(admin, 'SHOW CLIENTS')).rows.some((c) => c['target'] === 'ops' && c['paused'] === 1), 10_000, 'the ops client held');
    const other = await sharedSession('analytics');
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

test('RELOAD adds a target to a shared port and removes one from it', async () => {
  await sharedPort();
  writeConfig(['analytics', 'ops', 'reports']);
  assert.equal(await consoleState(admin, 'RELOAD'), 'ok');
  const reports = await sharedSession('reports');
  assert.equal((await reports.query('select current_database() as d')).rows[0].d, db.database);
  writeConfig(['analytics', 'reports']);
  assert.equal(await consoleState(admin, 'RELOAD'), 'ok');
  await assert.rejects(sharedSession('ops'), (error: pg.DatabaseError) => error.code === '3D000' && error.message === 'database "ops" does not exist; this port serves: analytics, reports');
  assert.equal((await reports.query('select 3 as n')).rows[0].n, 3);
  await reports.end();
  await waitUntil(async () => !(await consoleQuery(admin, 'SHOW TARGETS')).rows.some((r) => r['target'] === 'ops'), 10_000, 'ops gone');
  writeConfig(['analytics', 'reports', 'pgbouncer']);
  await assert.rejects(consoleQuery(admin, 'RELOAD'), (error: pg.DatabaseError) => error.code === 'F0000' && /the name pgbouncer reaches the admin console/.test(error.message));
});
