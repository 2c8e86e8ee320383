/**
 * The OAuth server misbehaving under the real program (AuthScheme=OAuthClient against the
 * Databricks stand-in, tokens that live 6 s): while the token is valid, clients keep getting in
 * whether the server answers 500, malformed JSON, nothing (down) or too late; once no valid token
 * is left, a new client gets an ErrorResponse that says why (28000 or 08006); when the server
 * recovers, service resumes without a restart; an open session never notices; and the program's
 * whole output holds none of the secrets. (The token source alone is in oauth-faults.test.ts; an
 * outage with no token ever obtained is in oauth-proxy.test.ts.)
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import type { DatabricksStandin, Fault } from './harness/databricks-standin.js';
import { startStandinWithPostgres } from './harness/oauth-fixture.js';
import type { TestPostgres } from './harness/postgres.js';
import { startProxyProcess, type ProxyProcess } from './harness/proxy.js';
import { cleanEnvironment, pgClient, sleep, waitUntil, whoAmI } from './reliability-support.js';

cleanEnvironment();

// Long enough that, on a loaded machine, the checks before expiry finish before it.
const LIFETIME_S = 12;
let db: TestPostgres;
let standin: DatabricksStandin;
let close: () => Promise<void>;
let proxy: ProxyProcess;

before(async () => {
  ({ db, standin, close } = await startStandinWithPostgres());
  standin.tokenLifetimeSeconds = LIFETIME_S;
  const connection = [
    `Server=localhost;Port=${db.port};User=${db.tokenRole};SSLRootCert=${db.ca.caFile};Database=${db.database}`,
    `DatabricksInstance=${standin.url};AuthScheme=OAuthClient;OAuthClientId=${standin.clientId};OAuthClientSecret=${standin.clientSecret}`,
    'OAuthSettingsLocation=memory://',
  ].join(';');
  // The stand-in's certificate comes from the test CA, which test/run.js puts in NODE_EXTRA_CA_CERTS.
  proxy = await startProxyProcess(['--connection', connection, '--no-http', '--oauth-timeout', '1s', '--log-level', 'debug']);
});

after(async () => {
  await proxy?.stop('SIGINT');
  await close?.();
});

type Named = readonly [string, Fault | 'down'];
const FAULTS: readonly Named[] = [
  ['HTTP 500', { kind: 'status', status: 500 }],
  ['malformed JSON', { kind: 'malformed-json' }],
  ['down', 'down'],
  ['slower than --oauth-timeout', { kind: 'slow', delayMs: 4000 }],
];

async function inject(fault: Fault | 'down' | undefined): Promise<void> {
  if (fault === 'down') {
    standin.fault(undefined);
    await standin.down();
    return;
  }
  await standin.up();
  standin.fault(fault);
}

/** The error a login gets, or 'ok'. */
async function login(): Promise<{ code?: string; message: string } | 'ok'> {
  try {
    assert.equal(await whoAmI(proxy.port, db), db.tokenRole);
    return 'ok';
  } catch (error) {
    return error as { code?: string; message: string };
  }
}

test('OAuth server 500 / malformed / down / slow: served while the token is valid, a clear error once none is, service resumes on recovery', async (t) => {
  const open = pgClient(proxy.port, db);
  await open.connect(); // the first token is obtained here
  const obtained = Date.now();
  try {
    // While the token is valid: every fault in turn, across the background refresh at half-life.
    for (const [name, fault] of FAULTS) {
      await inject(fault);
      assert.equal(await login(), 'ok', `served with the still-valid token while the server is ${name}`);
      await sleep(900);
    }
    await waitUntil(() => proxy.output().includes('"msg":"token refresh failed"'), LIFETIME_S * 1000, 'a failed background refresh');
    assert.ok(proxy.output().includes('"servingValidToken":true'), 'the refresh failure says the valid token is still served');
    assert.equal(await login(), 'ok', 'served after the background refresh failed');
    assert.equal((await open.query('select 1 as one')).rows[0].one, 1);

    // No valid token left: each fault gives its own clear error; open sessions go on.
    await sleep(Math.max(0, obtained + LIFETIME_S * 1000 - Date.now()));
    const expected: Record<string, [string, RegExp]> = {
      'HTTP 500': ['28000', /answered HTTP 500 \(3 attempts\)/],
      'malformed JSON': ['28000', /malformed JSON/],
      down: ['08006', /cannot reach https:\/\/localhost:\d+\/oidc\/v1\/token \(3 attempts\): ECONNREFUSED/],
      'slower than --oauth-timeout': ['08006', /no answer from https:\/\/localhost:\d+\/oidc\/v1\/token within 1 s/],
    };
    for (const [name, fault] of FAULTS) {
      await inject(fault);
      const started = Date.now();
      const result = await login();
      assert.notEqual(result, 'ok', `${name}: refused once the token expired`);
      if (result === 'ok') continue;
      const [code, pattern] = expected[name] as [string, RegExp];
      assert.equal(result.code, code, `${name}: ${result.message}`);
      assert.match(result.message, new RegExp(`^could not obtain a token for ${db.tokenRole.replace(/\./g, '\\.')}: `), name);
      assert.match(result.message, pattern, name);
      t.diagnostic(`${name}: ${result.code} after ${Date.now() - started} ms: ${result.message}`);
    }
    assert.equal((await open.query('select 2 as two')).rows[0].two, 2, 'an open session does not depend on the token');

    // Recovery: no restart, the next client gets a new token (also one whose answer lacks expires_in).
    await inject({ kind: 'no-expires-in', times: 1 });
    assert.equal(await login(), 'ok', 'service resumes when the server recovers');
    await inject(undefined);
    assert.equal(await login(), 'ok');
    assert.equal(proxy.child.exitCode, null, 'the same process throughout');
  } finally {
    await inject(undefined);
    await open.end().catch(() => {});
  }

  const output = proxy.output();
  const secrets = standin.secrets();
  assert.ok(secrets.length >= 3, `${secrets.length} secrets issued`);
  for (const secret of secrets) assert.ok(!output.includes(secret), `a secret (${secret.slice(0, 6)}...) is in the program output`);
});
