/** `lakebase-proxy check` and --run-connection-test, through the real program. */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { startTokenPostgres, type TestPostgres } from './harness/postgres.js';
import { BIN, connectionFor, startProxyProcess } from './harness/proxy.js';

let db: TestPostgres;
const token = 'check-token-' + Date.now();
before(async () => {
  db = await startTokenPostgres(token);
});
after(async () => db?.stop());

function run(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const child = spawn(process.execPath, [BIN, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  return new Promise((resolve) => child.once('exit', (code) => resolve({ code, stdout, stderr })));
}

test('check says each step it did and exits 0 when they all pass', async () => {
  const result = await run(['check', '--connection', connectionFor(db, token), '--log-level', 'silent']);
  assert.equal(result.code, 0, result.stdout + result.stderr);
  assert.match(result.stdout, /token ok from static token/);
  assert.match(result.stdout, /TLS ok \(TLSv1\.3, .*certificate verified\)/);
  assert.match(result.stdout, new RegExp(`login ok as "${db.tokenRole.replace(/\./g, '\\.')}" to database "${db.database}"`));
  assert.match(result.stdout, /SELECT 1 ok/);
  assert.ok(!(result.stdout + result.stderr).includes(token));
});

test('check names the failing step and exits 1', async () => {
  const wrong = await run(['check', '--connection', connectionFor(db, 'wrong-' + token), '--log-level', 'silent']);
  assert.equal(wrong.code, 1);
  assert.match(wrong.stdout, /login FAILED: upstream localhost:\d+ refused the login: password authentication failed/);
  assert.ok(!wrong.stdout.includes('wrong-' + token));
  const down = await run(['check', '--connection', connectionFor(db, token, 'Port=1'), '--log-level', 'silent']);
  assert.equal(down.code, 1);
  assert.match(down.stdout, /login FAILED: could not connect to upstream localhost:1/);
});

test('--run-connection-test refuses to start on a failing target, and starts on a good one', async () => {
  const bad = await run(['--connection', connectionFor(db, 'nope'), '--port', '0', '--no-http', '--run-connection-test', '--log-format', 'json']);
  assert.equal(bad.code, 1);
  assert.match(bad.stderr, /connection test of target default failed/);
  assert.ok(!bad.stderr.includes('"msg":"listening"'));
  const good = await startProxyProcess(['--connection', connectionFor(db, token), '--no-http', '--run-connection-test']);
  assert.match(good.output(), /SELECT 1 ok/);
  assert.equal(await good.stop(), 0);
});
