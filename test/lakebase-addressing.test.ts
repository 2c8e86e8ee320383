/**
 * A database by name, as the real program sees it: LakebaseInstance or LakebaseEndpoint without
 * Server, the host read from the workspace API of the Databricks stand-in (which names
 * `localhost`, the test Postgres), ReadOnly, Server winning, and a new lookup after a failed
 * connect. Only database credentials are passwords here, so a login also proves the exchange.
 */
import { after, afterEach, before, beforeEach, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import type { DatabricksStandin } from './harness/databricks-standin.js';
import { startStandinWithPostgres } from './harness/oauth-fixture.js';
import type { TestPostgres } from './harness/postgres.js';
import { BIN, startProxyProcess, type ProxyProcess } from './harness/proxy.js';
import { cleanEnvironment, loginError, whoAmI } from './reliability-support.js';

let db: TestPostgres;
let standin: DatabricksStandin;
let close: () => Promise<void>;
const running: ProxyProcess[] = [];

before(async () => {
  cleanEnvironment();
  ({ db, standin, close } = await startStandinWithPostgres({ databaseCredentialsOnly: true, dirPrefix: 'lbp-addressing-' }));
});
after(() => close?.());
beforeEach(() => standin.reset());
afterEach(async () => {
  await Promise.all(running.splice(0).map((p) => p.stop('SIGINT')));
});

const ENDPOINT = 'projects/shop/branches/main/endpoints/primary';

/** Everything but the host: the stand-in's service principal, the test server's port, CA and role. */
function connection(extra: string): string {
  return [
    `DatabricksInstance=${standin.url}`,
    `OAuthClientId=${standin.clientId}`,
    'OAuthSettingsLocation=memory://',
    `Port=${db.port}`,
    `User=${db.tokenRole}`,
    `SSLRootCert=${db.ca.caFile}`,
    `Database=${db.database}`,
    extra,
  ].join(';');
}

async function proxy(extra: string): Promise<ProxyProcess> {
  const started = await startProxyProcess(['--connection', connection(extra), '--no-http'], { LAKEBASE_PROXY_OAUTH_CLIENT_SECRET: standin.clientSecret });
  running.push(started);
  return started;
}

test('LakebaseInstance without Server: the host is the instance read_write_dns, looked up once per start', async () => {
  standin.setInstance('orders', { state: 'AVAILABLE', read_write_dns: 'localhost' });
  const p = await proxy('LakebaseInstance=orders');
  assert.equal(standin.counts.instance_lookups, 0, 'looked up at the first connect, not before');
  assert.equal(await whoAmI(p.port, db), db.tokenRole);
  assert.equal(await whoAmI(p.port, db), db.tokenRole);
  assert.equal(standin.counts.instance_lookups, 1);
  assert.deepEqual((standin.lastCredentialRequest.get('/api/2.0/database/credentials') as { instance_names: string[] }).instance_names, ['orders']);
});

test('lakebase-proxy check looks the host up too, and says which it found', async () => {
  standin.setInstance('orders', { state: 'AVAILABLE', read_write_dns: 'localhost' });
  // Not spawnSync: the stand-in answers from this process's event loop.
  const result = await promisify(execFile)(process.execPath, [BIN, 'check', '--connection', connection('LakebaseInstance=orders'), '--log-level', 'silent'], {
    encoding: 'utf8',
    env: { ...process.env, LAKEBASE_PROXY_OAUTH_CLIENT_SECRET: standin.clientSecret },
  });
  assert.match(result.stdout, new RegExp(`LakebaseInstance instance "orders": host localhost:${db.port}`));
  assert.match(result.stdout, /SELECT 1 ok/);
});

test('LakebaseEndpoint without Server: the host is the endpoint status.hosts.host', async () => {
  standin.setEndpoint(ENDPOINT, { current_state: 'ACTIVE', host: 'localhost' });
  const p = await proxy(`LakebaseEndpoint=${ENDPOINT}`);
  assert.equal(await whoAmI(p.port, db), db.tokenRole);
  assert.equal(standin.counts.endpoint_lookups, 1);
  assert.equal(standin.counts.postgres_credentials, 1);
});

test('ReadOnly=true connects to read_only_dns; without it the same instance goes to read_write_dns', async () => {
  standin.setInstance('replicated', { state: 'AVAILABLE', read_write_dns: 'primary-host.invalid', read_only_dns: 'localhost' });
  const readOnly = await proxy('LakebaseInstance=replicated;ReadOnly=true');
  assert.equal(await whoAmI(readOnly.port, db), db.tokenRole);
  const readWrite = await proxy('LakebaseInstance=replicated');
  const error = await loginError(readWrite.port, db);
  assert.equal(error.code, '08001', error.message);
  assert.match(error.message, /primary-host\.invalid/);
});

test('ReadOnly on an endpoint without a read-only host is refused with the reason', async () => {
  standin.setEndpoint(ENDPOINT, { current_state: 'ACTIVE', host: 'localhost' });
  const p = await proxy(`LakebaseEndpoint=${ENDPOINT};ReadOnly=true`);
  const error = await loginError(p.port, db);
  assert.equal(error.code, '08001', error.message);
  assert.match(error.message, /has no read-only host.*LakebaseEndpoint/);
});

test('an explicit Server wins: no lookup, the credential exchange as before', async () => {
  standin.setInstance('orders', { state: 'AVAILABLE', read_write_dns: 'elsewhere.invalid' });
  const p = await proxy('LakebaseInstance=orders;Server=localhost');
  assert.equal(await whoAmI(p.port, db), db.tokenRole);
  assert.equal(standin.counts.instance_lookups, 0);
  assert.equal(standin.counts.database_credentials, 1);
});

test('after a failed connect the host is looked up again, and a host that moved is tried at once', async () => {
  standin.setInstance('moving', { state: 'AVAILABLE', read_write_dns: 'old-host.invalid' });
  const p = await proxy('LakebaseInstance=moving');
  const error = await loginError(p.port, db);
  assert.equal(error.code, '08001', error.message);
  assert.match(error.message, /old-host\.invalid/);
  assert.equal(standin.counts.instance_lookups, 2, 'the first lookup, and one after the failed connect');
  standin.setInstance('moving', { state: 'AVAILABLE', read_write_dns: 'localhost' });
  // This client's connect goes to the old host first, fails, and the new lookup sends it to the new one.
  assert.equal(await whoAmI(p.port, db), db.tokenRole);
  assert.equal(standin.counts.instance_lookups, 3);
});

test('an unknown instance name is an 08001 that names the setting to check', async () => {
  const p = await proxy('LakebaseInstance=no-such-instance');
  const error = await loginError(p.port, db);
  assert.equal(error.code, '08001', error.message);
  assert.match(error.message, /could not look up the host of LakebaseInstance instance "no-such-instance": .*404.*check LakebaseInstance/);
});

test('a target with neither Server nor a Lakebase name is refused at start, naming both ways', async () => {
  await assert.rejects(proxy(''), /Server.*missing.*LakebaseInstance or LakebaseEndpoint/s);
});
