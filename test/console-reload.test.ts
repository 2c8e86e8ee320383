/**
 * RELOAD on the console and SIGHUP, through the real program and a config file: a changed pool
 * size applies at once (a client waiting for the full pool is served), a target added starts
 * listening, a target removed stops accepting while its open session goes on, a broken file is
 * refused with the error a start gives and the running configuration kept; SHUTDOWN does what
 * SIGTERM does.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { startTokenPostgres, type TestPostgres } from './harness/postgres.js';
import { BIN, proxyClient, startProxyProcess, type ProxyProcess } from './harness/proxy.js';
import { configTop, consoleClient, consoleQuery, psql, psqlConsole, type ConsoleAddress } from './harness/console.js';
import { freePort, run } from './harness/tools.js';
import { cleanEnvironment, waitUntil } from './reliability-support.js';

const token = `console-reload-${Date.now()}`;
let db: TestPostgres;
let dir: string;
let configFile: string;
let proxy: ProxyProcess;
let portA: number;
let portB: number;
let admin: ConsoleAddress;

/** The config file: targets a (and b), `top` lines at the top level. */
function writeConfig(options: { top?: string[]; withB?: boolean; raw?: string } = {}): void {
  const text =
    options.raw ??
    [
      ...configTop(db, token, dir),
      'QueryWaitTimeout: 60s',
      ...(options.top ?? ['PoolSize: 1']),
      'targets:',
      '  - name: a',
      `    ListenPort: ${portA}`,
      ...(options.withB ? ['  - name: b', `    ListenPort: ${portB}`] : []),
    ].join('\n');
  writeFileSync(configFile, `${text}\n`);
}

before(async () => {
  cleanEnvironment();
  db = await startTokenPostgres(token);
  dir = mkdtempSync(join(tmpdir(), 'lbp-reload-'));
  configFile = join(dir, 'proxy.yaml');
  [portA, portB] = [await freePort(), await freePort()];
  writeConfig();
  proxy = await startProxyProcess(['--config', configFile, '--no-http'], {}, 15_000, false);
  admin = { host: dir, port: portA };
});

after(async () => {
  await proxy?.stop('SIGINT');
  await db?.stop();
  rmSync(dir, { recursive: true, force: true });
});

/** RELOAD on the console: its notices, or the error it got. */
async function reload(): Promise<{ notices: string[]; error?: pg.DatabaseError }> {
  const client = consoleClient(admin);
  const notices: string[] = [];
  client.on('notice', (n) => notices.push(n.message ?? ''));
  await client.connect();
  try {
    await client.query('RELOAD');
    return { notices };
  } catch (error) {
    return { notices, error: error as pg.DatabaseError };
  } finally {
    await client.end();
  }
}

async function connected(port: number, name: string): Promise<pg.Client> {
  const client = proxyClient(port, db, { user: 'someone', application_name: name });
  await client.connect();
  return client;
}

async function targetRow(name: string): Promise<Record<string, unknown> | undefined> {
  return (await consoleQuery(admin, 'SHOW TARGETS')).rows.find((r) => r['target'] === name);
}

test('RELOAD with a larger PoolSize serves a client that was waiting for the full pool', async () => {
  const first = await connected(portA, 'reload-first');
  const second = proxyClient(portA, db, { user: 'someone', application_name: 'reload-second' });
  let served = false;
  const connecting = second.connect().then(() => (served = true));
  try {
    await waitUntil(async () => (await consoleQuery(admin, 'SHOW POOLS')).rows.some((p) => p['cl_waiting'] === 1), 10_000, 'the second client waiting');
    assert.equal(served, false);
    writeConfig({ top: ['PoolSize: 2'] });
    const { notices, error } = await reload();
    assert.equal(error, undefined, error?.message);
    assert.deepEqual(notices, ['target a: PoolSize now 2']);
    await connecting;
    assert.equal((await second.query('select 1 as n')).rows[0].n, 1);
    assert.equal((await first.query('select 2 as n')).rows[0].n, 2, 'the open session is untouched');
    assert.equal((await consoleQuery(admin, 'SHOW DATABASES')).rows[0]?.['pool_size'], 2);
    assert.match(proxy.output(), /"command":"RELOAD","msg":"console command"/);
  } finally {
    await first.end();
    await second.end().catch(() => undefined);
  }
});

test('RELOAD starts an added target and drains a removed one, whose open session goes on', async () => {
  writeConfig({ top: ['PoolSize: 2'], withB: true });
  const added = await reload();
  assert.equal(added.error, undefined, added.error?.message);
  assert.match(added.notices.join('\n'), new RegExp(`target b added: listening on 127\\.0\\.0\\.1:${portB} and ${dir}/\\.s\\.PGSQL\\.${portB}`));
  const onB = await connected(portB, 'reload-on-b');
  assert.equal((await onB.query('select current_user as u')).rows[0].u, db.tokenRole);
  assert.equal((await targetRow('b'))?.['state'], 'running');

  writeConfig({ top: ['PoolSize: 2'] });
  const removed = await reload();
  assert.equal(removed.error, undefined, removed.error?.message);
  assert.deepEqual(removed.notices, ['target b removed: it accepts no new client; 1 open session(s) go on']);
  await assert.rejects(connected(portB, 'reload-late'), /ECONNREFUSED/);
  assert.equal((await onB.query('select 5 as n')).rows[0].n, 5, 'the open session goes on');
  assert.equal((await targetRow('b'))?.['state'], 'draining');
  await onB.end();
  await waitUntil(async () => (await targetRow('b')) === undefined, 10_000, 'b gone once drained');
  assert.match(proxy.output(), /"target":"b","msg":"removed target drained"/);
});

test('a broken file is refused with the error a start gives, and the running configuration is kept', async () => {
  const broken: Array<[string, string]> = [
    ['invalid YAML', 'PoolSize: [1\n'],
    ['a value out of range', `Server: localhost\nPoolSize: 0\ntargets:\n  - name: a\n    ListenPort: ${portA}\n`],
    ['an unknown setting', `Server: localhost\nPoolSiz: 3\n`],
    ['two targets on one port, unnamed', `Server: localhost\nUser: x\nOAuthAccessToken: y\nListenPort: ${portA}\ntargets:\n  - Database: one\n  - Database: two\n`],
  ];
  for (const [what, text] of broken) {
    writeConfig({ raw: text });
    const start = await run(process.execPath, [BIN, '--config', configFile, '--no-http'], { timeoutMs: 15_000 });
    assert.equal(start.code, 1, what);
    const startError = start.stderr.trim().replace(/^lakebase-proxy: /, '');
    const { error } = await reload();
    assert.equal(error?.code, 'F0000', what);
    assert.equal(error?.message, `${startError}; the running configuration is kept`, what);
  }
  writeConfig({ top: ['PoolSize: 2'] });
  const client = await connected(portA, 'reload-after-broken');
  assert.equal((await client.query('select 6 as n')).rows[0].n, 6);
  await client.end();
  assert.equal((await consoleQuery(admin, 'SHOW DATABASES')).rows[0]?.['pool_size'], 2, 'the running configuration');
  assert.match(proxy.output(), /"msg":"reload refused; the running configuration is kept"/);
});

test('a change that needs a restart is reported and the running value kept', async () => {
  writeConfig({ top: ['PoolSize: 2', 'Relay: js', 'ServerIdleTimeout: 5m'] });
  const { notices, error } = await reload();
  assert.equal(error, undefined, error?.message);
  assert.deepEqual(notices.sort(), ['target a: Relay changed; that needs a restart, the running value is kept', 'target a: ServerIdleTimeout now 5m']);
  const config = (await consoleQuery(admin, 'SHOW CONFIG')).rows;
  assert.equal(config.find((r) => r['target'] === 'a' && r['key'] === 'Relay')?.['value'], 'native');
  assert.equal(config.find((r) => r['target'] === 'a' && r['key'] === 'ServerIdleTimeout')?.['value'], '5m');
  assert.equal(config.find((r) => r['target'] === 'a' && r['key'] === 'OAuthAccessToken')?.['value'], '(set)', 'a secret only says that it is set');
  assert.ok(!JSON.stringify(config).includes(token));
  writeConfig({ top: ['PoolSize: 2'] });
  await reload();
});

test('SIGHUP reloads as RELOAD does', async () => {
  writeConfig({ top: ['PoolSize: 3'] });
  proxy.child.kill('SIGHUP');
  await waitUntil(async () => (await consoleQuery(admin, 'SHOW DATABASES')).rows[0]?.['pool_size'] === 3, 10_000, 'PoolSize 3 applied');
  assert.match(proxy.output(), /"by":"SIGHUP","changes":\["target a: PoolSize now 3"\],"msg":"configuration reloaded"/);
  writeConfig({ raw: 'PoolSize: [' });
  proxy.child.kill('SIGHUP');
  await waitUntil(() => /"by":"SIGHUP","err":"[^"]*not valid YAML[^"]*","msg":"reload refused/.test(proxy.output()), 10_000, 'the refusal logged');
  assert.equal(proxy.child.exitCode, null, 'the process goes on');
  writeConfig({ top: ['PoolSize: 3'] });
});

test('SHUTDOWN on the console does what SIGTERM does', { skip: psql ? false : 'psql is not installed' }, async () => {
  const other = await startProxyProcess(['--config', configFile, '--no-http', '--port', String(await freePort())], {}, 15_000);
  try {
    const address = { host: '127.0.0.1', port: other.port, user: 'someone' };
    const refused = await psqlConsole(address, 'SHUTDOWN');
    assert.match(refused.stderr, /ERROR: {2}42501/, 'not over TCP with trust');
    const socketDir = mkdtempSync(join(tmpdir(), 'lbp-reload-shutdown-'));
    await other.stop('SIGINT');
    const owned = await startProxyProcess(['--config', configFile, '--no-http', '--port', String(await freePort()), '--unix-socket', socketDir], {}, 15_000);
    const ran = await psqlConsole({ host: socketDir, port: owned.port }, 'SHUTDOWN');
    assert.equal(ran.stdout, 'SHUTDOWN\n', ran.stderr);
    assert.equal(await owned.exited, 0);
    assert.match(owned.output(), /"signal":"SIGTERM","by":"admin@unix socket".*"msg":"shutting down"/);
    rmSync(socketDir, { recursive: true, force: true });
  } finally {
    await other.stop('SIGINT');
  }
});
