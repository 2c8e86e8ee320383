/** LakebaseInstance / LakebaseEndpoint: the workspace token exchanged for a database credential. */
import { after, before, beforeEach, test } from 'node:test';
import assert from 'node:assert/strict';
import { createTokenSource, LOGIN_NOTICE_PREFIX } from '../src/oauth/index.js';
import { silentLogger } from '../src/ops/log.js';
import { TokenError, type TokenSource } from '../src/token/token-source.js';
import { postgresLogin, standinOptions, waitFor, type DatabricksStandin } from './harness/databricks-standin.js';
import { closedAfterEachTest, startStandinWithPostgres } from './harness/oauth-fixture.js';
import type { TestPostgres } from './harness/postgres.js';

let db: TestPostgres;
let standin: DatabricksStandin;
let close: () => Promise<void>;
const track = closedAfterEachTest<TokenSource>();
const noNotice = { notice: () => undefined };
const ENDPOINT = 'projects/p1/branches/main/endpoints/ep-primary';

// Only database credentials are Postgres passwords here.
before(async () => ({ db, standin, close } = await startStandinWithPostgres({ instances: ['my-instance'], databaseCredentialsOnly: true })));
after(() => close?.());
beforeEach(() => standin.reset());

function source(overrides: Parameters<typeof standinOptions>[1]): TokenSource {
  return track(createTokenSource(standinOptions(standin, overrides), { logger: silentLogger }));
}

test('LakebaseInstance: POST /api/2.0/database/credentials, and the credential is the password', async () => {
  const s = source({ lakebaseInstance: 'my-instance' });
  const token = await s.getToken(noNotice);
  assert.equal(await postgresLogin(db, token.value), 'ok');
  const body = standin.lastCredentialRequest.get('/api/2.0/database/credentials') as { request_id: string; instance_names: string[] };
  assert.deepEqual(body.instance_names, ['my-instance']);
  assert.match(body.request_id, /^[0-9a-f-]{36}$/);
  assert.match(s.describe(), /database credential for instance my-instance, from OAuthClient/);
  await s.getToken(noNotice);
  assert.equal(standin.counts.database_credentials, 1, 'cached');
  assert.equal(standin.counts.tokenRequests, 1);
});

test('LakebaseEndpoint: POST /api/2.0/postgres/credentials with the endpoint path', async () => {
  const token = await source({ lakebaseEndpoint: ENDPOINT }).getToken(noNotice);
  assert.equal(await postgresLogin(db, token.value), 'ok');
  assert.deepEqual(standin.lastCredentialRequest.get('/api/2.0/postgres/credentials'), { endpoint: ENDPOINT });
  assert.equal(standin.counts.postgres_credentials, 1);
});

test('the credential is renewed at half its own life; the workspace token is reused while fresh', async () => {
  standin.databaseTokenLifetimeSeconds = 2;
  const s = source({ lakebaseInstance: 'my-instance' });
  const first = await s.getToken(noNotice);
  assert.ok(first.expiresAt && first.expiresAt.getTime() - Date.now() < 2_100, 'the credential expiry, not the workspace token');
  standin.databaseTokenLifetimeSeconds = 3600; // so that a slow machine still logs in before expiry
  await waitFor(() => standin.counts.database_credentials >= 2, 3_000, 'a renewed credential');
  const second = await s.getToken(noNotice);
  assert.notEqual(second.value, first.value);
  assert.equal(await postgresLogin(db, second.value), 'ok');
  assert.equal(standin.counts.tokenRequests, 1);
});

test('a workspace token revoked before its expiry is replaced once the credential API refuses it', async () => {
  standin.databaseTokenLifetimeSeconds = 1;
  const s = source({ lakebaseInstance: 'my-instance' });
  await s.getToken(noNotice);
  standin.revokeAccessTokens();
  await new Promise((resolve) => setTimeout(resolve, 1_100));
  standin.databaseTokenLifetimeSeconds = 3600;
  const token = await s.getToken(noNotice);
  assert.equal(await postgresLogin(db, token.value), 'ok');
  assert.equal(standin.counts.tokenRequests, 2);
});

test('1,000 concurrent getToken calls make one token request and one credential request', async () => {
  const s = source({ lakebaseEndpoint: ENDPOINT });
  const tokens = await Promise.all(Array.from({ length: 1000 }, () => s.getToken(noNotice)));
  assert.equal(new Set(tokens.map((t) => t.value)).size, 1);
  assert.equal(standin.counts.tokenRequests, 1);
  assert.equal(standin.counts.postgres_credentials, 1);
});

test('an unknown instance is refused in plain words', async () => {
  await assert.rejects(
    source({ lakebaseInstance: 'nope' }).getToken(noNotice),
    (err: unknown) =>
      err instanceof TokenError &&
      /answered HTTP 404 RESOURCE_DOES_NOT_EXIST: Database instance 'nope' does not exist: check LakebaseInstance or LakebaseEndpoint$/.test(err.message),
  );
  assert.equal(standin.counts.database_credentials, 1, 'a 4xx is not retried');
});

test('InitiateOAuth=OFF with LakebaseInstance exchanges the given workspace token', async () => {
  const workspace = await source({}).getToken(noNotice);
  standin.resetCounts();
  const token = await source({ initiateOAuth: 'OFF', accessToken: workspace.value, lakebaseInstance: 'my-instance' }).getToken(noNotice);
  assert.equal(await postgresLogin(db, token.value), 'ok');
  assert.equal(standin.counts.tokenRequests, 0);
  assert.equal(standin.counts.database_credentials, 1);
  assert.throws(
    () => source({ lakebaseInstance: 'a', lakebaseEndpoint: ENDPOINT }),
    (err: unknown) => err instanceof TokenError && /LakebaseInstance .* or LakebaseEndpoint .*not both/.test(err.message),
  );
});

test('OAuthPKCE with LakebaseInstance: the login URL reaches the waiting client through the credential exchange', async () => {
  const s = source({ authScheme: 'OAuthPKCE', clientId: undefined, clientSecret: undefined, lakebaseInstance: 'my-instance' });
  const notices: string[] = [];
  const token = s.getToken({ notice: (m) => notices.push(m) });
  await waitFor(() => notices.length > 0, 5_000, 'the login notice');
  await standin.completeLogin(notices[0]!.slice(LOGIN_NOTICE_PREFIX.length));
  assert.equal(await postgresLogin(db, (await token).value), 'ok');
  assert.equal(standin.counts.database_credentials, 1);
});
