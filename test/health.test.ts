/** The health endpoints in each state of the process, with the meanings Cloud SQL Auth Proxy gives them. */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { createServer, type Server, type Socket } from 'node:net';
import { request } from 'node:http';
import pg from 'pg';
import { waitFor } from './harness/databricks-standin.js';
import { startTokenPostgres, type TestPostgres } from './harness/postgres.js';
import { connectionFor, startProxy, type InProcessProxy } from './harness/proxy.js';
import { startOpsServer, type HealthState, type OpsServer } from '../src/ops/http.js';
import { Metrics } from '../src/ops/metrics.js';
import { silentLogger } from '../src/ops/log.js';

/** What src/cli/main.ts flips; the ops server reads it at each request. */
const state = {
  started: false,
  shuttingDown: false,
  capacity: (): boolean => false,
};
const health: HealthState = {
  get started() {
    return state.started;
  },
  get shuttingDown() {
    return state.shuttingDown;
  },
  atCapacity: () => state.capacity(),
};

let db: TestPostgres;
let ops: OpsServer;
const token = 'tok-' + randomBytes(600).toString('base64url');

before(async () => {
  [db, ops] = await Promise.all([
    startTokenPostgres(token),
    startOpsServer({ address: '127.0.0.1', port: 0, metrics: new Metrics(), health, logger: silentLogger }),
  ]);
});

after(async () => {
  await ops?.close();
  await db?.stop();
});

interface Answer {
  status: number;
  body: string;
  headers: Record<string, string | string[] | undefined>;
}

/** node:http rather than fetch: fetch cannot send a HEAD and read that no body came. */
function call(path: string, method = 'GET', port = ops.port): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port, path, method, agent: false }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (chunk: string) => (body += chunk));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body, headers: res.headers }));
    });
    req.on('error', reject);
    req.end();
  });
}

async function probes(): Promise<Record<string, string>> {
  const answers: Record<string, string> = {};
  for (const path of ['/startup', '/liveness', '/readiness']) {
    const { status, body } = await call(path);
    answers[path] = `${status} ${body}`;
  }
  return answers;
}

test('while starting: startup and readiness 503, liveness 200', async () => {
  assert.deepEqual(await probes(), { '/startup': '503 starting', '/liveness': '200 ok', '/readiness': '503 starting' });
});

test('once started: all three 200 ok', async () => {
  state.started = true;
  assert.deepEqual(await probes(), { '/startup': '200 ok', '/liveness': '200 ok', '/readiness': '200 ok' });
});

test('while shutting down: readiness 503, the process still live', async () => {
  state.shuttingDown = true;
  try {
    assert.deepEqual(await probes(), { '/startup': '200 ok', '/liveness': '200 ok', '/readiness': '503 shutting down' });
  } finally {
    state.shuttingDown = false;
  }
});

test('at --max-connections: readiness 503 while a real session holds the only slot, 200 once it ends', async () => {
  const proxy: InProcessProxy = await startProxy(['--connection', connectionFor(db, token), '--max-connections', '1']);
  state.capacity = () => proxy.server.atCapacity;
  const c = new pg.Client({ host: '127.0.0.1', port: proxy.port, user: 'anyone', database: db.database });
  try {
    assert.equal((await call('/readiness')).status, 200);
    await c.connect();
    assert.equal((await c.query('select 1 as one')).rows[0].one, 1);
    assert.deepEqual(await probes(), { '/startup': '200 ok', '/liveness': '200 ok', '/readiness': '503 at max connections' });
    // The same limit, as a client sees it.
    const extra = new pg.Client({ host: '127.0.0.1', port: proxy.port, user: 'anyone', database: db.database });
    await assert.rejects(extra.connect(), (e: pg.DatabaseError) => e.code === '53300');
    await c.end();
    await waitFor(() => proxy.server.connections === 0, 5000, 'the session to close');
    assert.deepEqual(await probes(), { '/startup': '200 ok', '/liveness': '200 ok', '/readiness': '200 ok' });
  } finally {
    state.capacity = () => false;
    await c.end().catch(() => {});
    await proxy.close();
  }
});

test('readiness never dials the database: probes leave an upstream untouched', async () => {
  let dialled = 0;
  const upstream: Server = createServer((socket: Socket) => {
    dialled++;
    socket.destroy();
  });
  await new Promise<void>((resolve) => upstream.listen(0, '127.0.0.1', resolve));
  const port = (upstream.address() as { port: number }).port;
  const proxy = await startProxy(['--connection', `Server=127.0.0.1;Port=${port};User=someone;OAuthAccessToken=${token};SSLMode=require`, '--max-connections', '1']);
  state.capacity = () => proxy.server.atCapacity;
  try {
    for (let i = 0; i < 20; i++) assert.equal((await call('/readiness')).status, 200);
    assert.equal(dialled, 0);
    assert.equal(proxy.server.connections, 0);
  } finally {
    state.capacity = () => false;
    await proxy.close();
    await new Promise<void>((resolve) => upstream.close(() => resolve()));
  }
});

test('/metrics answers in the Prometheus text format', async () => {
  const { status, body, headers } = await call('/metrics');
  assert.equal(status, 200);
  assert.match(String(headers['content-type']), /^text\/plain; version=0\.0\.4/);
  assert.match(body, /^# TYPE lakebase_proxy_client_connections_total counter$/m);
  assert.match(body, /^lakebase_proxy_process_start_time_seconds \d+/m);
});

test('unknown paths are 404; a query string is ignored; other methods than GET and HEAD are 405', async () => {
  for (const path of ['/', '/nope', '/metrics/', '/readiness/extra', '/quitquitquit']) {
    const { status, body } = await call(path);
    assert.equal(status, 404, path);
    assert.equal(body, 'not found');
  }
  assert.equal((await call('/readiness?verbose=1')).body, 'ok');
  for (const [method, path] of [['POST', '/readiness'], ['PUT', '/metrics'], ['DELETE', '/liveness'], ['POST', '/startup']] as const) {
    const { status, headers } = await call(path, method);
    assert.equal(status, 405, `${method} ${path}`);
    assert.equal(headers['allow'], 'GET, HEAD');
  }
  const head = await call('/readiness', 'HEAD');
  assert.equal(head.status, 200);
  assert.equal(head.body, '');
  assert.equal(head.headers['content-length'], '2');
  assert.equal(head.headers['cache-control'], 'no-store');
});

test('a busy port is an error naming the port and --http-port', async () => {
  const squatter = createServer();
  await new Promise<void>((resolve) => squatter.listen(0, '127.0.0.1', resolve));
  const port = (squatter.address() as { port: number }).port;
  try {
    await assert.rejects(
      startOpsServer({ address: '127.0.0.1', port, metrics: new Metrics(), health, logger: silentLogger }),
      (error: Error) => error.message.includes(`port ${port}`) && error.message.includes('--http-port'),
    );
  } finally {
    await new Promise<void>((resolve) => squatter.close(() => resolve()));
  }
});

test('close() frees the port at once, even with a keep-alive connection open, and may be called twice', async () => {
  const server = await startOpsServer({ address: '127.0.0.1', port: 0, metrics: new Metrics(), health, logger: silentLogger });
  const res = await fetch(`http://127.0.0.1:${server.port}/liveness`); // undici keeps the connection alive
  assert.equal(await res.text(), 'ok');
  const started = Date.now();
  await Promise.all([server.close(), server.close()]);
  assert.ok(Date.now() - started < 1000);
  await assert.rejects(call('/liveness', 'GET', server.port), (e: NodeJS.ErrnoException) => e.code === 'ECONNREFUSED');
});
