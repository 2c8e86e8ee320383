/** `/metrics` after real sessions: the pg client through the in-process proxy to a real Postgres. */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { connect as netConnect } from 'node:net';
import pg from 'pg';
import promClient from 'prom-client';
import { waitFor } from './harness/databricks-standin.js';
import { startTokenPostgres, type TestPostgres } from './harness/postgres.js';
import { connectionFor, proxyClient, startProxy, type InProcessProxy } from './harness/proxy.js';
import { startOpsServer } from '../src/ops/http.js';
import { Metrics, METRIC_PREFIX } from '../src/ops/metrics.js';
import { silentLogger } from '../src/ops/log.js';
import { StaticTokenSource } from '../src/token/static-token.js';
import { native } from '../src/proxy/native-relay.js';

let db: TestPostgres;
let proxy: InProcessProxy;
let wrongProxy: InProcessProxy;
let ops: { port: number; close(): Promise<void> };
const metrics = new Metrics();
const token = 'tok-' + randomBytes(600).toString('base64url'); // as long as a Databricks token
const wrongToken = 'tok-' + randomBytes(600).toString('base64url');
const expiresAt = new Date(Math.ceil(Date.now() / 1000) * 1000 + 3_600_000);
const tokenSource = new StaticTokenSource(token, expiresAt);
const CLIENT_USER = 'metrics.client.user@example.com';
const QUERY_MARK = 'query_text_must_not_leak_5f1c';

before(async () => {
  db = await startTokenPostgres(token);
  proxy = await startProxy(['--connection', connectionFor(db, token), '--max-connections', '2'], {
    tokenSource,
    observer: metrics.observerFor('default'),
  });
  wrongProxy = await startProxy(['--connection', connectionFor(db, wrongToken)], { observer: metrics.observerFor('second') });
  metrics.watchTokenExpiry('default', () => tokenSource.currentExpiry());
  metrics.watchTokenExpiry('second', () => undefined);
  ops = await startOpsServer({ address: '127.0.0.1', port: 0, metrics, health: { started: true, shuttingDown: false, atCapacity: () => false }, logger: silentLogger });
});

after(async () => {
  await ops?.close();
  await proxy?.close();
  await wrongProxy?.close();
  await db?.stop();
});

/** One sample: metric name plus its labels, e.g. `x_total{direction="to_client",target="default"}`. */
type Samples = Map<string, number>;

function key(name: string, labels: Record<string, string> = {}): string {
  const parts = Object.entries(labels)
    .sort(([a], [b]) => a.localeCompare(b))
    .map(([k, v]) => `${k}="${v}"`);
  return parts.length ? `${name}{${parts.join(',')}}` : name;
}

/** Parses the text exposition format (no escapes needed: our label values are plain words). */
function parse(text: string): Samples {
  const samples: Samples = new Map();
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    assert.ok(match, `unparsable line: ${line}`);
    const labels: Record<string, string> = {};
    for (const pair of (match[2] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[pair[1] as string] = pair[2] as string;
    samples.set(key(match[1] as string, labels), Number(match[3]));
  }
  return samples;
}

async function scrape(): Promise<{ text: string; samples: Samples; contentType: string | null }> {
  const res = await fetch(`http://127.0.0.1:${ops.port}/metrics`);
  assert.equal(res.status, 200);
  const text = await res.text();
  return { text, samples: parse(text), contentType: res.headers.get('content-type') };
}

function value(samples: Samples, name: string, labels: Record<string, string> = {}): number {
  const found = samples.get(key(`${METRIC_PREFIX}${name}`, labels));
  assert.notEqual(found, undefined, `no sample ${key(`${METRIC_PREFIX}${name}`, labels)}`);
  return found as number;
}

function client(port = proxy.port): pg.Client {
  return proxyClient(port, db, { user: CLIENT_USER });
}

function sessionEnds(): Array<{ bytesToUpstream: number; bytesToClient: number; relay: string }> {
  return proxy.logs.filter((l) => l['msg'] === 'session ended') as unknown as Array<{ bytesToUpstream: number; bytesToClient: number; relay: string }>;
}

test('a session counts one connection, one upstream connect, and the bytes its session-end log reports', async () => {
  const before = (await scrape()).samples;
  const endsBefore = sessionEnds().length;
  const c = client();
  await c.connect();
  assert.equal(value((await scrape()).samples, 'client_connections_open', { target: 'default' }), 1);
  const r = await c.query(`select '${QUERY_MARK}' as mark, repeat('x', 100000) as filler`);
  assert.equal(r.rows[0].mark, QUERY_MARK);
  await c.end();
  await waitFor(() => sessionEnds().length === endsBefore + 1, 5000, 'the session-end log line');
  const ended = sessionEnds().at(-1) as { bytesToUpstream: number; bytesToClient: number };
  await waitFor(() => proxy.server.connections === 0, 5000, 'the connection to close');

  const after = (await scrape()).samples;
  const delta = (name: string, labels: Record<string, string>): number => value(after, name, labels) - value(before, name, labels);
  const target = { target: 'default' };
  assert.equal(delta('client_connections_total', target), 1);
  assert.equal(value(after, 'client_connections_open', target), 0);
  assert.equal(delta('upstream_connect_duration_seconds_count', target), 1);
  assert.ok(delta('upstream_connect_duration_seconds_sum', target) > 0);
  assert.equal(value(after, 'upstream_connect_duration_seconds_bucket', { ...target, le: '+Inf' }), value(after, 'upstream_connect_duration_seconds_count', target));
  assert.equal(value(after, 'upstream_connect_duration_seconds_bucket', { ...target, le: '10' }), value(after, 'upstream_connect_duration_seconds_count', target));

  const toUpstream = delta('relayed_bytes_total', { ...target, direction: 'to_upstream' });
  const toClient = delta('relayed_bytes_total', { ...target, direction: 'to_client' });
  assert.ok(ended.bytesToUpstream > 0 && ended.bytesToClient > 100000, JSON.stringify(ended));
  assert.equal(toUpstream, ended.bytesToUpstream);
  assert.equal(toClient, ended.bytesToClient);
  for (const reason of ['client_password', 'token', 'upstream_auth', 'upstream_connect', 'protocol', 'startup_timeout', 'too_many_connections', 'too_many_startups', 'shutting_down']) {
    assert.equal(delta('login_failures_total', { ...target, reason }), 0, reason);
  }
});

test('a login the upstream refuses counts upstream_auth under its own target only', async () => {
  const before = (await scrape()).samples;
  const c = client(wrongProxy.port);
  await assert.rejects(c.connect(), (e: pg.DatabaseError) => e.code === '28P01');
  await waitFor(() => wrongProxy.server.connections === 0, 5000, 'the refused connection to close');

  const after = (await scrape()).samples;
  const delta = (name: string, labels: Record<string, string>): number => value(after, name, labels) - value(before, name, labels);
  assert.equal(delta('login_failures_total', { target: 'second', reason: 'upstream_auth' }), 1);
  assert.equal(delta('client_connections_total', { target: 'second' }), 1);
  assert.equal(value(after, 'client_connections_open', { target: 'second' }), 0);
  assert.equal(value(after, 'upstream_connect_duration_seconds_count', { target: 'second' }), 0, 'only logins that succeeded are timed');
  assert.equal(delta('login_failures_total', { target: 'default', reason: 'upstream_auth' }), 0);
  assert.equal(delta('client_connections_total', { target: 'default' }), 0);
});

test('a client over --max-connections is counted as rejected, and the open gauge follows the sessions', async () => {
  const before = (await scrape()).samples;
  const held = [client(), client()];
  await Promise.all(held.map((c) => c.connect()));
  try {
    assert.equal(value((await scrape()).samples, 'client_connections_open', { target: 'default' }), 2);
    await assert.rejects(client().connect(), (e: pg.DatabaseError) => e.code === '53300');
  } finally {
    await Promise.all(held.map((c) => c.end()));
  }
  await waitFor(() => proxy.server.connections === 0, 5000, 'the held connections to close');
  const after = (await scrape()).samples;
  const delta = (name: string, labels: Record<string, string>): number => value(after, name, labels) - value(before, name, labels);
  assert.equal(delta('client_connections_rejected_total', { target: 'default' }), 1);
  assert.equal(delta('login_failures_total', { target: 'default', reason: 'too_many_connections' }), 1);
  assert.equal(delta('client_connections_total', { target: 'default' }), 3, 'a client turned away after its startup was accepted first');
  assert.equal(value(after, 'client_connections_open', { target: 'default' }), 0);
});

test('cancel requests are counted by outcome', async () => {
  const before = (await scrape()).samples;
  const sendCancel = (processId: number, secretKey: number): void => {
    const packet = Buffer.alloc(16);
    packet.writeInt32BE(16, 0);
    packet.writeInt32BE(80877102, 4);
    packet.writeInt32BE(processId, 8);
    packet.writeInt32BE(secretKey, 12);
    netConnect({ host: '127.0.0.1', port: proxy.port }).on('error', () => {}).end(packet);
  };
  const c = client();
  await c.connect();
  try {
    const { processID, secretKey } = c as unknown as { processID: number; secretKey: number };
    const sleeping = c.query('select pg_sleep(30)');
    await new Promise((r) => setTimeout(r, 200));
    sendCancel(processID, secretKey);
    await assert.rejects(sleeping, (e: pg.DatabaseError) => e.code === '57014');
    sendCancel(processID, secretKey ^ 1);
    await waitFor(() => proxy.logs.some((l) => l['msg'] === 'cancel request with an unknown key ignored'), 5000, 'the unknown cancel key');
  } finally {
    await c.end();
  }
  const after = (await scrape()).samples;
  const delta = (outcome: string): number =>
    value(after, 'cancel_requests_total', { target: 'default', outcome }) - value(before, 'cancel_requests_total', { target: 'default', outcome });
  assert.equal(delta('forwarded'), 1);
  assert.equal(delta('unknown_key'), 1);
  assert.equal(delta('error'), 0);
});

test('over every session so far, the relayed bytes equal the sums of the session-end logs', async () => {
  // Relayed so far: one in the first test, two held at the limit, one cancelled query.
  await waitFor(() => sessionEnds().length === 4, 5000, 'four session-end log lines');
  const ends = sessionEnds();
  const { samples } = await scrape();
  const sum = (field: 'bytesToUpstream' | 'bytesToClient'): number => ends.reduce((total, end) => total + end[field], 0);
  assert.equal(value(samples, 'relayed_bytes_total', { target: 'default', direction: 'to_upstream' }), sum('bytesToUpstream'));
  assert.equal(value(samples, 'relayed_bytes_total', { target: 'default', direction: 'to_client' }), sum('bytesToClient'));
  assert.equal(value(samples, 'relayed_bytes_total', { target: 'second', direction: 'to_client' }), 0);
  // Sessions by relay: as many as the log lines that name each relay, and each session in one of them.
  for (const relay of ['native', 'js']) {
    assert.equal(value(samples, 'sessions_total', { target: 'default', relay }), ends.filter((end) => end.relay === relay).length, relay);
  }
  assert.equal(value(samples, 'sessions_total', { target: 'default', relay: 'native' }) + value(samples, 'sessions_total', { target: 'default', relay: 'js' }), 4);
  assert.equal(value(samples, 'sessions_total', { target: 'default', relay: native.addon && process.env['LAKEBASE_PROXY_TEST_RELAY'] !== 'js' ? 'native' : 'js' }), 4);
});

test('token refreshes by result, and the expiry gauge read from the token source at scrape time', async () => {
  metrics.tokenRefreshed('default', 'success');
  metrics.tokenRefreshed('default', 'success');
  metrics.tokenRefreshed('default', 'failure');
  const { samples } = await scrape();
  assert.equal(value(samples, 'token_refreshes_total', { target: 'default', result: 'success' }), 2);
  assert.equal(value(samples, 'token_refreshes_total', { target: 'default', result: 'failure' }), 1);
  assert.equal(value(samples, 'token_refreshes_total', { target: 'second', result: 'success' }), 0);
  assert.equal(value(samples, 'token_expiry_timestamp_seconds', { target: 'default' }), expiresAt.getTime() / 1000);
  assert.equal(samples.has(key(`${METRIC_PREFIX}token_expiry_timestamp_seconds`, { target: 'second' })), false, 'no token, no sample');

  let current: Date | undefined = new Date(2_000_000_000_000);
  const other = new Metrics();
  other.watchTokenExpiry('t', () => current);
  assert.match(await other.text(), /^lakebase_proxy_token_expiry_timestamp_seconds\{target="t"\} 2000000000$/m);
  current = new Date(2_000_000_600_000);
  assert.match(await other.text(), /^lakebase_proxy_token_expiry_timestamp_seconds\{target="t"\} 2000000600$/m, 'read again at each scrape');
  current = undefined;
  assert.doesNotMatch(await other.text(), /^lakebase_proxy_token_expiry_timestamp_seconds\{/m);
});

test('every sample carries the prefix, the default process metrics are there, and the global registry stays empty', async () => {
  const { text, samples, contentType } = await scrape();
  assert.match(contentType ?? '', /^text\/plain; version=0\.0\.4/);
  for (const name of samples.keys()) assert.ok(name.startsWith(METRIC_PREFIX), name);
  for (const name of ['process_cpu_user_seconds_total', 'process_resident_memory_bytes', 'process_start_time_seconds', 'nodejs_heap_size_used_bytes', 'nodejs_eventloop_lag_seconds']) {
    assert.match(text, new RegExp(`^${METRIC_PREFIX}${name}(\\{[^}]*\\})? `, 'm'), name);
  }
  assert.match(text, /^# TYPE lakebase_proxy_upstream_connect_duration_seconds histogram$/m);
  assert.match(text, /^# TYPE lakebase_proxy_relayed_bytes_total counter$/m);
  assert.equal(promClient.register.getMetricsAsArray().length, 0, 'nothing on prom-client\'s global registry');
});

test('no label value or line holds a user name, a token or a query', async () => {
  const { text } = await scrape();
  for (const secret of [token, token.slice(4, 40), wrongToken.slice(4, 40), CLIENT_USER, db.tokenRole, QUERY_MARK]) {
    assert.equal(text.includes(secret), false, `the metrics hold ${secret.slice(0, 24)}`);
  }
  const labelValues = new Set<string>();
  for (const line of text.split('\n')) {
    if (line.startsWith('#')) continue;
    for (const pair of line.matchAll(/([a-zA-Z_]+)="([^"]*)"/g)) labelValues.add(`${pair[1]}=${pair[2]}`);
  }
  const allowed = /^(target=(default|second)|direction=(to_upstream|to_client)|relay=(native|js)|state=(idle|active|logging_in|checking|resetting)|reason=[a-z_]+|outcome=[a-z_]+|result=(success|failure)|le=[0-9.e+Inf-]+|quantile=[0-9.]+|(space|type|kind|version|major|minor|patch)=.*)$/;
  for (const label of labelValues) assert.match(label, allowed);
});

test('bytes() works detached from its observer, as the relay calls it, and is published at scrape time', async () => {
  const m = new Metrics();
  const { bytes } = m.observerFor('t');
  for (let i = 0; i < 10_000; i++) bytes(3, 5);
  const text = await m.text();
  assert.match(text, /^lakebase_proxy_relayed_bytes_total\{target="t",direction="to_upstream"\} 30000$/m);
  assert.match(text, /^lakebase_proxy_relayed_bytes_total\{target="t",direction="to_client"\} 50000$/m);
  assert.equal(m.observerFor('t').bytes, bytes, 'one observer per target');
});
