/**
 * `lakebase-proxy wait`, `lakebase-proxy shutdown` and POST /quitquitquit, through the real
 * program, and the AdminAddress rule of who may ask for a shutdown.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { createServer, type Server, type Socket } from 'node:net';
import { freePort, startTokenPostgres, type TestPostgres } from './harness/postgres.js';
import { BIN, connectionFor, proxyClient, startProxyProcess } from './harness/proxy.js';
import { httpCall } from './harness/http.js';
import { adminPeers, parseDuration } from '../src/cli/admin.js';
import { ConfigError } from '../src/config/properties.js';

let db: TestPostgres;
const token = 'admin-token-' + Date.now();
before(async () => {
  db = await startTokenPostgres(token);
});
after(async () => db?.stop());

/** Runs the program with `args` to its end: exit code and everything it wrote. */
function run(args: string[]): { child: ChildProcess; exited: Promise<{ code: number | null; output: string }> } {
  const child = spawn(process.execPath, [BIN, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  child.stdout.on('data', (chunk: Buffer) => (output += chunk.toString()));
  child.stderr.on('data', (chunk: Buffer) => (output += chunk.toString()));
  return { child, exited: new Promise((resolve) => child.once('exit', (code) => resolve({ code, output }))) };
}

test('AdminAddress: loopback by default, addresses and CIDR ranges of both families, none; anything else names the key', () => {
  const loopback = adminPeers('127.0.0.0/8,::1');
  for (const peer of ['127.0.0.1', '127.4.5.6', '::1', '::ffff:127.0.0.1']) assert.equal(loopback(peer), true, peer);
  for (const peer of ['10.0.0.1', '::ffff:10.0.0.1', 'fd00::1', undefined]) assert.equal(loopback(peer), false, String(peer));
  const private10 = adminPeers('10.0.0.0/8, fd00::/8');
  assert.equal(private10('10.200.0.7'), true);
  assert.equal(private10('fd12::5'), true);
  assert.equal(private10('127.0.0.1'), false);
  const none = adminPeers('none');
  assert.equal(none('127.0.0.1'), false);
  for (const bad of ['localhost', '10.0.0.0/33', '::1/129', '1.2.3.4/8/1', '', '10.0.0.0/x']) {
    assert.throws(() => adminPeers(bad), (e: Error) => e instanceof ConfigError && e.message.startsWith('AdminAddress:'), bad);
  }
});

test('durations for wait --max: units, and a bare number in milliseconds', () => {
  assert.deepEqual(['30s', '500ms', '2m', '1h', '1m30s', '250'].map((d) => parseDuration(d, 'x')), [30_000, 500, 120_000, 3_600_000, 90_000, 250]);
  assert.throws(() => parseDuration('soon', 'wait --max'), /wait --max: "soon" is not a duration/);
});

test('wait: exits 0 once a proxy started after it reports /startup ready', async () => {
  const httpPort = await freePort();
  const waiting = run(['wait', '--max', '60s', '--http-port', String(httpPort)]);
  let waitEnded = false;
  void waiting.exited.then(() => (waitEnded = true));
  // Long enough for several polls that find nobody: it keeps waiting.
  await new Promise((resolve) => setTimeout(resolve, 1000));
  assert.equal(waitEnded, false, 'wait keeps waiting while no proxy answers');
  const proxy = await startProxyProcess(['--connection', connectionFor(db, token), '--http-port', String(httpPort)]);
  try {
    const { code, output } = await waiting.exited;
    assert.equal(code, 0, output);
  } finally {
    await proxy.stop();
  }
});

test('wait: exits 1 after --max while no proxy answers, or while one answers /startup 503', async () => {
  const httpPort = await freePort();
  const none = await run(['wait', '--max=300ms', '--http-port', String(httpPort)]).exited;
  assert.equal(none.code, 1);
  assert.match(none.output, /did not report \/startup ready within 300 ms \(last: .*ECONNREFUSED/);

  // A start-up connection test against an upstream that never answers holds the proxy in "starting".
  const silent: Server = createServer((socket: Socket) => socket.on('error', () => {}));
  await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve));
  const upstreamPort = (silent.address() as { port: number }).port;
  const starting = run(['--connection', `Server=127.0.0.1;Port=${upstreamPort};User=someone;Password=x;ConnectTimeout=60000`, '--run-connection-test', '--port', '0', '--http-port', String(httpPort)]);
  try {
    // Once its HTTP endpoint is up (before the connection test), it says "starting".
    const deadline = Date.now() + 30_000;
    let answer = await httpCall(httpPort, '/startup').catch(() => undefined);
    while (answer === undefined && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 50));
      answer = await httpCall(httpPort, '/startup').catch(() => undefined);
    }
    assert.equal(answer?.status, 503, await Promise.race([starting.exited.then((e) => e.output), Promise.resolve('(still running)')]));
    const waited = await run(['wait', '--max', '1s', '--http-port', String(httpPort)]).exited;
    assert.equal(waited.code, 1, waited.output);
    assert.match(waited.output, /\(last: 503 starting\)/);
  } finally {
    starting.child.kill('SIGKILL');
    await starting.exited;
    silent.close();
  }
});

test('shutdown: a running query finishes, new clients are refused, the proxy exits 0, as on SIGTERM', async () => {
  const httpPort = await freePort();
  const proxy = await startProxyProcess(['--connection', connectionFor(db, token), '--http-port', String(httpPort), '--max-sigterm-delay', '20000']);
  const client = proxyClient(proxy.port, db);
  await client.connect();
  const query = client.query('select pg_sleep(1), 42 as answer');
  await new Promise((resolve) => setTimeout(resolve, 200));
  const shutdown = await run(['shutdown', '--http-port', String(httpPort)]).exited;
  assert.equal(shutdown.code, 0, shutdown.output);
  assert.equal((await query).rows[0].answer, 42);
  await client.end();
  assert.equal(await proxy.exited, 0);
  assert.match(proxy.output(), /"msg":"\/quitquitquit: shutting down as on SIGTERM"/);
  assert.match(proxy.output(), /"signal":"SIGTERM".*"msg":"shutting down"/);
  assert.match(proxy.output(), /"endedByThemselves":true/);
});

test('/quitquitquit: POST only, and only from the peers AdminAddress allows', async () => {
  const httpPort = await freePort();
  const proxy = await startProxyProcess(['--connection', connectionFor(db, token), '--http-port', String(httpPort), '--admin-address', '10.0.0.0/8']);
  try {
    assert.equal((await httpCall(httpPort, '/quitquitquit', 'GET')).status, 405);
    const refused = await httpCall(httpPort, '/quitquitquit', 'POST');
    assert.equal(refused.status, 403);
    assert.match(refused.body, /AdminAddress/);
    const byCommand = await run(['shutdown', '--http-port', String(httpPort)]).exited;
    assert.equal(byCommand.code, 1);
    assert.match(byCommand.output, /refused the shutdown: 403/);
    // Still serving.
    const client = proxyClient(proxy.port, db);
    await client.connect();
    assert.equal((await client.query('select 1 as one')).rows[0].one, 1);
    await client.end();
  } finally {
    assert.equal(await proxy.stop(), 0);
  }
});

test('shutdown with no proxy there, or no HTTP endpoint: exit 1 and why', async () => {
  const httpPort = await freePort();
  const nobody = await run(['shutdown', '--http-port', String(httpPort)]).exited;
  assert.equal(nobody.code, 1);
  assert.match(nobody.output, new RegExp(`no proxy answered at http://127\\.0\\.0\\.1:${httpPort}: .*ECONNREFUSED`));
  const off = await run(['shutdown', '--no-http']).exited;
  assert.equal(off.code, 1);
  assert.match(off.output, /NoHttp/);
  const unknown = await run(['wait', '--soon']).exited;
  assert.equal(unknown.code, 1);
  assert.match(unknown.output, /wait: unknown option --soon/);
});
