/**
 * `lakebase-proxy url [TARGET]` through the real program: the psql command, the libpq URI and the
 * JDBC URL of each target, from its listen settings and default database, with no secret; and
 * what it prints works when pasted (psql, the pg client) against the proxy started the same way.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { startTokenPostgres, type TestPostgres } from './harness/postgres.js';
import { BIN, connectionFor, startProxyProcess } from './harness/proxy.js';
import { findTool, freePort, run } from './harness/tools.js';

for (const key of Object.keys(process.env)) if (/^(LAKEBASE_PROXY_|DATABRICKS_|PG)/.test(key)) delete process.env[key];

let db: TestPostgres;
let socketDir: string;
const token = 'url-token-' + Math.random().toString(36).slice(2);
const secret = 'url-client-secret-' + Math.random().toString(36).slice(2);

before(async () => {
  db = await startTokenPostgres(token);
  socketDir = mkdtempSync(join(tmpdir(), 'lbp-url-'));
});
after(async () => {
  await db?.stop();
  if (socketDir) rmSync(socketDir, { recursive: true, force: true });
});

/** The label: value lines of one target in `url`'s output. */
function linesOf(stdout: string, target: string): Map<string, string> {
  const block = stdout.split('\n\n').find((b) => b.startsWith(`${target}:\n`)) ?? '';
  return new Map(
    block
      .split('\n')
      .slice(1)
      .map((line) => /^ {2}([^:]+):\s+(.*)$/.exec(line))
      .filter((m): m is RegExpExecArray => m !== null)
      .map((m) => [m[1] as string, m[2] as string]),
  );
}

test('url prints the psql command, libpq URI and JDBC URL of the listener and the unix socket, with no secret; they work', async () => {
  const port = await freePort();
  const args = ['--connection', `${connectionFor(db, token)};OAuthClientSecret=${secret}`, '--port', String(port), '--unix-socket', socketDir, '--no-http'];
  const printed = await run(process.execPath, [BIN, 'url', ...args], { env: { LAKEBASE_PROXY_OAUTH_CLIENT_SECRET: secret } });
  assert.equal(printed.code, 0, printed.stderr);
  assert.ok(!printed.stdout.includes(secret) && !printed.stdout.includes(token) && !printed.stderr.includes(secret), 'no secret');
  const lines = linesOf(printed.stdout, 'default');
  assert.equal(lines.get('psql'), `psql "host=127.0.0.1 port=${port} dbname=${db.database}"`);
  assert.equal(lines.get('URI'), `postgresql://127.0.0.1:${port}/${db.database}`);
  assert.equal(lines.get('JDBC'), `jdbc:postgresql://127.0.0.1:${port}/${db.database}`);
  assert.equal(lines.get('psql (unix socket)'), `psql "host=${socketDir} port=${port} dbname=${db.database}"`);
  assert.equal(lines.get('URI (unix socket)'), `postgresql:///${db.database}?host=${encodeURIComponent(socketDir)}&port=${port}`);

  const proxy = await startProxyProcess(args);
  try {
    // The URIs name no user (the proxy takes any with trust): the client's own, as libpq's would be.
    process.env['PGUSER'] = 'anyone';
    for (const uri of [lines.get('URI') as string, lines.get('URI (unix socket)') as string]) {
      const c = new pg.Client({ connectionString: uri });
      await c.connect();
      assert.equal((await c.query('select current_user as u')).rows[0].u, db.tokenRole, uri);
      await c.end();
    }
    const psql = findTool('psql');
    if (psql) {
      for (const command of [lines.get('psql') as string, lines.get('psql (unix socket)') as string]) {
        const ran = await run('/bin/sh', ['-c', `${command.replace(/^psql /, `${psql} `)} -X -A -t -c 'select current_user'`]);
        assert.equal(ran.stdout.trim(), db.tokenRole, `${command}: ${ran.stderr}`);
      }
    }
  } finally {
    await proxy.stop('SIGINT');
  }
});

test('url TARGET picks targets by name, quotes what needs quoting, and names the targets when one is unknown', async () => {
  const two = ['--connection', 'Server=a;ListenPort=6101;Database=my db', '--connection', 'Server=b;ListenPort=6102;ListenAddress=::1;ClientAuth=scram-sha-256'];
  const both = await run(process.execPath, [BIN, 'url', ...two]);
  assert.equal(both.code, 0, both.stderr);
  assert.equal(linesOf(both.stdout, 'target1').get('psql'), `psql 'host=127.0.0.1 port=6101 dbname='\\''my db'\\'''`);
  assert.equal(linesOf(both.stdout, 'target1').get('URI'), 'postgresql://127.0.0.1:6101/my%20db');
  const second = await run(process.execPath, [BIN, 'url', 'target2', ...two]);
  assert.equal(second.code, 0, second.stderr);
  assert.doesNotMatch(second.stdout, /target1/);
  assert.equal(linesOf(second.stdout, 'target2').get('JDBC'), 'jdbc:postgresql://[::1]:6102/databricks_postgres');
  assert.match(second.stdout, /client authentication scram-sha-256: add a user from ClientUsers/);
  const unknown = await run(process.execPath, [BIN, 'url', 'nope', ...two]);
  assert.equal(unknown.code, 1);
  assert.equal(unknown.stderr, 'lakebase-proxy: url: no target named "nope"; the targets are target1, target2\n');
});

test('--help names the url command, and the README shows what it prints', async () => {
  const help = await run(process.execPath, [BIN, '--help']);
  assert.match(help.stdout, /lakebase-proxy url \[TARGET \.\.\.\] \[--connection \.\.\.\] +print the psql command, libpq URI and JDBC URL of each target/);
  const example = await run(process.execPath, [BIN, 'url', '--connection', 'Server=h;User=u', '--unix-socket', '/tmp']);
  const readme = readFileSync(new URL('../../README.md', import.meta.url), 'utf8');
  assert.ok(readme.includes('```text\n' + example.stdout + '```'), `the README's example is what url prints:\n${example.stdout}`);
});
