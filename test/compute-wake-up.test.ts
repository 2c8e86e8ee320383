/**
 * Compute wake-up through the real program: a compute that refuses, resets and answers 57P03
 * while it starts is waited for within ConnectTimeout (one log line, counted in /metrics), a
 * compute the API reports as starting is waited for whatever the failure, and a stopped instance
 * is an error that says so at once.
 */
import { after, afterEach, before, beforeEach, test } from 'node:test';
import assert from 'node:assert/strict';
import type { DatabricksStandin } from './harness/databricks-standin.js';
import { startStandinWithPostgres } from './harness/oauth-fixture.js';
import type { TestPostgres } from './harness/postgres.js';
import { startProxyProcess, type ProxyProcess } from './harness/proxy.js';
import { startWakingCompute, type WakingCompute } from './harness/waking-compute.js';
import { cleanEnvironment, loginError, sleep, whoAmI } from './reliability-support.js';

let db: TestPostgres;
let standin: DatabricksStandin;
let close: () => Promise<void>;
const running: Array<{ stop(): Promise<unknown> }> = [];

before(async () => {
  cleanEnvironment();
  ({ db, standin, close } = await startStandinWithPostgres({ databaseCredentialsOnly: true, dirPrefix: 'lbp-wake-' }));
});
after(() => close?.());
beforeEach(() => standin.reset());
afterEach(async () => {
  for (const item of running.splice(0).reverse()) await item.stop();
});

const ENDPOINT = 'projects/shop/branches/main/endpoints/primary';

async function compute(initial: Parameters<typeof startWakingCompute>[1]): Promise<WakingCompute> {
  const c = await startWakingCompute(db, initial);
  running.push({ stop: () => c.close() });
  return c;
}

async function proxy(port: number, extra: string, flags: string[] = ['--no-http']): Promise<ProxyProcess> {
  const connection = [
    `DatabricksInstance=${standin.url}`,
    `OAuthClientId=${standin.clientId}`,
    'OAuthSettingsLocation=memory://',
    `Port=${port}`,
    `User=${db.tokenRole}`,
    `SSLRootCert=${db.ca.caFile}`,
    `Database=${db.database}`,
    'ConnectTimeout=20000',
    'PoolMode=none', // every client logs in: what a waking compute does to a login is the subject
    extra,
  ].join(';');
  const p = await startProxyProcess(['--connection', connection, ...flags], { LAKEBASE_PROXY_OAUTH_CLIENT_SECRET: standin.clientSecret });
  running.push({ stop: () => p.stop('SIGINT') });
  return p;
}

const waitingLines = (p: ProxyProcess): string[] => p.output().split('\n').filter((line) => line.includes('"msg":"waiting for the compute to start"'));

async function metrics(p: ProxyProcess): Promise<string> {
  const line = p.output().split('\n').find((l) => l.includes('serving /metrics'));
  const { port } = JSON.parse(line as string) as { port: number };
  return (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
}

test('a compute that refuses for 2 s, then resets, then answers 57P03: the client waits and gets in; one log line, counted in /metrics', async () => {
  standin.setInstance('sleepy', { state: 'STARTING', read_write_dns: 'localhost' });
  const c = await compute('refuse');
  const p = await proxy(c.port, 'LakebaseInstance=sleepy', ['--http-port', '0']);
  const logins = [whoAmI(p.port, db, { connectionTimeoutMillis: 40_000 }), whoAmI(p.port, db, { connectionTimeoutMillis: 40_000 })];
  await sleep(2_000);
  c.after(1, 'starting');
  c.after(1, 'up');
  await c.set('reset');
  standin.setInstance('sleepy', { state: 'AVAILABLE', read_write_dns: 'localhost' });
  assert.deepEqual(await Promise.all(logins), [db.tokenRole, db.tokenRole]);
  assert.ok(c.seen.reset >= 1 && c.seen.starting >= 1, `reset ${c.seen.reset}, 57P03 ${c.seen.starting}`);
  assert.equal(waitingLines(p).length, 1, 'one line for the wake-up, not one per client or per try');
  assert.match(await metrics(p), /lakebase_proxy_compute_waits_total\{target="default",outcome="connected"\} 2/);
});

test('while the API says the endpoint is INIT, a failure that is no refusal (TLS refused) is waited out too', async () => {
  standin.setEndpoint(ENDPOINT, { current_state: 'INIT', host: 'localhost' });
  const c = await compute('no-tls');
  c.after(2, 'up');
  const p = await proxy(c.port, `LakebaseEndpoint=${ENDPOINT}`);
  assert.equal(await whoAmI(p.port, db, { connectionTimeoutMillis: 40_000 }), db.tokenRole);
  assert.equal(c.seen['no-tls'], 2);
  assert.ok(standin.counts.endpoint_lookups >= 2, 'looked up again after the failed connects');
  // Once the endpoint is ACTIVE, the same failure is the client's at once.
  standin.setEndpoint(ENDPOINT, { current_state: 'ACTIVE', host: 'localhost' });
  await c.set('no-tls');
  const error = await loginError(p.port, db);
  assert.equal(error.code, '08001', error.message);
  assert.match(error.message, /refused TLS/);
  assert.equal(c.seen['no-tls'], 3, 'one try only');
});

test('a stopped instance is an 08001 that says so, without waiting: by name, and behind an explicit Server', async () => {
  standin.setInstance('parked', { state: 'STOPPED', read_write_dns: 'localhost' });
  const c = await compute('refuse');
  const byName = await proxy(c.port, 'LakebaseInstance=parked');
  let error = await loginError(byName.port, db);
  assert.equal(error.code, '08001', error.message);
  assert.match(error.message, /^Lakebase instance "parked" is stopped \(state STOPPED\): start it/);
  assert.equal(waitingLines(byName).length, 0);

  const withServer = await proxy(c.port, 'LakebaseInstance=parked;Server=localhost');
  error = await loginError(withServer.port, db);
  assert.equal(error.code, '08001', error.message);
  assert.match(error.message, /instance "parked" is stopped/);
  assert.doesNotMatch(error.message, /timed out|did not start/);
  assert.equal(waitingLines(withServer).length, 0);
});

test('a compute that stays down: the wait ends at ConnectTimeout with the reason and the setting', async () => {
  standin.setInstance('gone', { state: 'AVAILABLE', read_write_dns: 'localhost' });
  const c = await compute('refuse');
  const p = await proxy(c.port, 'LakebaseInstance=gone;ConnectTimeout=1500');
  const error = await loginError(p.port, db);
  assert.equal(error.code, '08001', error.message);
  assert.match(error.message, /ECONNREFUSED.*the compute did not start within ConnectTimeout, 1500 ms/);
  assert.equal(waitingLines(p).length, 1);
});

test('refusals are waited out only for Lakebase hosts: the host names Databricks gives, not any server', async () => {
  const { isLakebaseHost } = await import('../src/proxy/wake-up.js');
  for (const host of [
    'instance-0123abcd-4567-89ab-cdef-0123456789ab.database.cloud.databricks.com',
    'instance-0123abcd-4567-89ab-cdef-0123456789ab.database.azuredatabricks.net',
    'ep-rapid-cherry-y12fhu7x.database.us-east-1.cloud.databricks.com',
    'ep-rapid-cherry-y12fhu7x-pooler.database.westeurope.azuredatabricks.net',
  ]) {
    assert.ok(isLakebaseHost(host), host);
  }
  for (const host of ['localhost', '127.0.0.1', 'db.example.com', 'database.cloud.databricks.com.evil.example', 'dbc-1234.cloud.databricks.com']) {
    assert.ok(!isLakebaseHost(host), host);
  }
});
