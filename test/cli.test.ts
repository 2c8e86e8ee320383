/**
 * The real program (bin/lakebase-proxy.js): help, start-up errors and exit codes, the unix
 * socket, and psql / pgbench through it where they are installed.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { PROPERTIES } from '../src/config/properties.js';
import { startTokenPostgres, type TestPostgres } from './harness/postgres.js';
import { BIN, connectionFor, startProxyProcess, type ProxyProcess } from './harness/proxy.js';
import { findTool, missingTool, run, type Ran } from './harness/tools.js';

// The program reads its settings from the environment too: keep the developer's out of these runs.
for (const key of Object.keys(process.env)) {
  if (/^(LAKEBASE_PROXY_|DATABRICKS_|PG)/.test(key)) delete process.env[key];
}

const psql = findTool('psql');
const pgbench = findTool('pgbench');
const noPsql = missingTool('psql');
const noPgbench = missingTool('pgbench');

const program = (args: readonly string[]): Promise<Ran> => run(process.execPath, [BIN, ...args]);

/** A failed start: exit code 1, nothing on stdout, one line on stderr; returns that line. */
function oneLineFailure(ran: Ran): string {
  assert.equal(ran.code, 1, `exit code; output:\n${ran.stdout}${ran.stderr}`);
  assert.equal(ran.stdout, '');
  const lines = ran.stderr.split('\n').filter((l) => l !== '');
  assert.equal(lines.length, 1, `one line on stderr, got:\n${ran.stderr}`);
  return lines[0] as string;
}

let db: TestPostgres;
let proxy: ProxyProcess;
let socketDir: string;
let workDir: string;
const token = 'tok-' + randomBytes(32).toString('base64url');

before(async () => {
  db = await startTokenPostgres(token);
  socketDir = mkdtempSync(join(tmpdir(), 'lbp-cli-sock-'));
  workDir = mkdtempSync(join(tmpdir(), 'lbp-cli-'));
  proxy = await startProxyProcess([
    '--no-http',
    '--connection',
    connectionFor(db, token),
    '--unix-socket',
    socketDir,
    '--tls-cert',
    db.ca.serverCertFile,
    '--tls-key',
    db.ca.serverKeyFile,
  ]);
});

after(async () => {
  if (proxy && proxy.child.exitCode === null) await proxy.stop('SIGKILL');
  await db?.stop();
  for (const dir of [socketDir, workDir]) if (dir) rmSync(dir, { recursive: true, force: true });
});

/** libpq settings that reach the proxy over TCP, verifying its certificate. */
function libpqTcp(): string {
  return `host=localhost hostaddr=127.0.0.1 port=${proxy.port} dbname=${db.database} user=someone sslmode=verify-full sslrootcert=${db.ca.caFile} connect_timeout=10`;
}

const libpqEnv = { PGCONNECT_TIMEOUT: '10', PGAPPNAME: 'cli-test' };

// ---------------------------------------------------------------------------------------------
// Help and start-up errors

test('--help lists every option and never prints a secret given in --connection', async () => {
  const secret = 'sekrit-' + randomBytes(8).toString('hex');
  const ran = await program(['--connection', `Server=h;User=u;OAuthAccessToken=${secret};OAuthClientSecret=${secret}`, '--help']);
  assert.equal(ran.code, 0, ran.stderr);
  for (const flag of ['--connection', '--help', ...PROPERTIES.flatMap((p) => (p.flag ? [p.flag] : []))]) {
    assert.ok(ran.stdout.includes(flag), `--help mentions ${flag}`);
  }
  for (const name of ['Server', 'Port', 'User', 'SSLMode', 'SSLRootCert', 'OAuthAccessToken']) assert.ok(ran.stdout.includes(name), `--help mentions ${name}`);
  assert.ok(!(ran.stdout + ran.stderr).includes(secret), 'the secret is not printed');
});

test('a busy port: exit code 1 and one line on stderr naming the port and --port', async () => {
  const holder: Server = createServer();
  await new Promise<void>((resolve) => holder.listen(0, '127.0.0.1', resolve));
  const port = (holder.address() as { port: number }).port;
  try {
    const line = oneLineFailure(await program(['--connection', connectionFor(db, token), '--no-http', '--port', String(port)]));
    assert.match(line, new RegExp(`\\b${port}\\b`));
    assert.match(line, /--port/);
    assert.ok(!line.includes(token));
  } finally {
    await new Promise((resolve) => holder.close(resolve));
  }
});

test('an unknown key in --connection: an error naming the key, without the secrets', async () => {
  const line = oneLineFailure(await program(['--connection', `Server=h;User=u;OAuthAccessToken=${token};Colour=blue`]));
  assert.match(line, /"Colour"/);
  assert.match(line, /--connection/);
  assert.ok(!line.includes(token));
});

test('a bad Port value: an error naming Port, the value and where it came from', async () => {
  const line = oneLineFailure(await program(['--connection', `Server=h;Port=fivefour;User=u;OAuthAccessToken=${token}`]));
  assert.match(line, /\bPort \(from --connection\)/);
  assert.match(line, /"fivefour"/);
  assert.match(line, /1 to 65535/);
  assert.ok(!line.includes(token));
  const flag = oneLineFailure(await program(['--connection', `Server=h;User=u;OAuthAccessToken=${token}`, '--port', '70000']));
  assert.match(flag, /ListenPort \(from [^)]*\)/);
  assert.match(flag, /"70000"/);
});

test('a missing Server: an error naming Server', async () => {
  const line = oneLineFailure(await program(['--connection', `User=u;OAuthAccessToken=${token}`]));
  assert.match(line, /\bServer\b.*missing/);
  assert.ok(!line.includes(token));
});

// ---------------------------------------------------------------------------------------------
// The unix socket

test('--unix-socket DIR: DIR/.s.PGSQL.<port> with mode 0600, and the pg client with host=DIR works', async () => {
  const path = join(socketDir, `.s.PGSQL.${proxy.port}`);
  assert.equal(proxy.socketPath, path);
  const stat = statSync(path);
  assert.ok(stat.isSocket());
  assert.equal(stat.mode & 0o777, 0o600);
  const c = new pg.Client({ host: socketDir, port: proxy.port, user: 'someone', database: db.database });
  await c.connect();
  try {
    assert.equal((await c.query('select current_user as u')).rows[0].u, db.tokenRole);
  } finally {
    await c.end();
  }
});

test('psql -h DIR works through the unix socket', { skip: noPsql }, async () => {
  const ran = await run(psql as string, ['-X', '-A', '-t', '-h', socketDir, '-p', String(proxy.port), '-U', 'someone', '-d', db.database, '-c', 'select current_user'], { env: libpqEnv });
  assert.equal(ran.code, 0, ran.stderr);
  assert.equal(ran.stdout.trim(), db.tokenRole);
});

// ---------------------------------------------------------------------------------------------
// psql and pgbench over TCP and TLS

test('psql -c over verified TLS: simple queries, \\conninfo', { skip: noPsql }, async () => {
  const ran = await run(psql as string, ['-X', '-A', '-t', '-v', 'ON_ERROR_STOP=1', libpqTcp(), '-c', 'select current_user', '-c', '\\conninfo', '-c', "select 'é☃' as t"], {
    env: libpqEnv,
  });
  assert.equal(ran.code, 0, ran.stderr);
  const lines = ran.stdout.trim().split('\n');
  assert.equal(lines[0], db.tokenRole);
  assert.match(ran.stdout, /SSL connection \(protocol: TLS/);
  assert.equal(lines.at(-1), 'é☃');
});

test('psql \\copy in and out through the proxy keeps the bytes', { skip: noPsql }, async () => {
  const input = join(workDir, 'in.csv');
  const output = join(workDir, 'out.csv');
  let text = '';
  for (let i = 1; i <= 40000; i++) text += `${i},${createHash('md5').update(String(i)).digest('hex')}${'x'.repeat(100)},"quoted, ""comma"""\n`;
  writeFileSync(input, text);
  const ran = await run(
    psql as string,
    [
      '-X',
      '-v',
      'ON_ERROR_STOP=1',
      libpqTcp(),
      '-c',
      'create table cli_copy (id int primary key, payload text, note text)',
      '-c',
      `\\copy cli_copy from '${input}' with (format csv)`,
      '-c',
      `\\copy (select * from cli_copy order by id) to '${output}' with (format csv)`,
    ],
    { env: libpqEnv, timeoutMs: 30000 },
  );
  assert.equal(ran.code, 0, ran.stderr);
  assert.match(ran.stdout, /COPY 40000/);
  const hash = (file: string): string => createHash('sha256').update(readFileSync(file)).digest('hex');
  assert.ok(text.length > 5_000_000);
  assert.equal(hash(output), hash(input));
});

test('pgbench -i, then pgbench -S, 4 clients x 250 transactions, all done and none failed', { skip: noPgbench }, async () => {
  const connection = ['-h', '127.0.0.1', '-p', String(proxy.port), '-U', 'someone'];
  const init = await run(pgbench as string, ['-i', '-s', '1', '-q', ...connection, db.database], { env: libpqEnv, timeoutMs: 60000 });
  assert.equal(init.code, 0, init.stderr);
  const bench = await run(pgbench as string, ['-S', '-n', '-t', '250', '-c', '4', '-j', '2', ...connection, db.database], { env: libpqEnv, timeoutMs: 60000 });
  assert.equal(bench.code, 0, bench.stderr + bench.stdout);
  assert.match(bench.stdout, /number of transactions actually processed: 1000\/1000/);
  const failed = /number of failed transactions: (\d+)/.exec(bench.stdout);
  // pgbench before 15 prints no failure count; then a non-zero exit code is the failure signal.
  if (failed) assert.equal(failed[1], '0', bench.stdout);
});

// Last: it stops the program.
test('SIGTERM: the program exits and removes its socket file', async () => {
  const path = proxy.socketPath as string;
  assert.notEqual(await proxy.stop('SIGTERM'), null, proxy.output());
  assert.equal(existsSync(path), false);
});
