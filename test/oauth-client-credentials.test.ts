/** AuthScheme=OAuthClient: client credentials against the workspace stand-in, proved on a real Postgres. */
import { after, before, beforeEach, test } from 'node:test';
import assert from 'node:assert/strict';
import { createTokenSource } from '../src/oauth/index.js';
import { silentLogger } from '../src/ops/log.js';
import { TokenError, type TokenSource } from '../src/token/token-source.js';
import { captureLogger, postgresLogin, standinOptions, waitFor, type DatabricksStandin } from './harness/databricks-standin.js';
import { closedAfterEachTest, startStandinWithPostgres } from './harness/oauth-fixture.js';
import type { TestPostgres } from './harness/postgres.js';

let db: TestPostgres;
let standin: DatabricksStandin;
let close: () => Promise<void>;
const track = closedAfterEachTest<TokenSource>();
const noNotice = { notice: () => undefined };

before(async () => ({ db, standin, close } = await startStandinWithPostgres()));
after(() => close?.());
beforeEach(() => standin.reset());

function source(overrides: Parameters<typeof standinOptions>[1] = {}, deps: Partial<Parameters<typeof createTokenSource>[1]> = {}): TokenSource {
  return track(createTokenSource(standinOptions(standin, overrides), { logger: silentLogger, ...deps }));
}

test('a service principal gets a token at once and Postgres accepts it as the password', async () => {
  const results: string[] = [];
  const s = source({}, { onRefresh: (r) => results.push(r) });
  const token = await s.getToken(noNotice);
  assert.ok(token.value.length > 800, `Databricks-sized token, got ${token.value.length} bytes`);
  assert.ok(token.expiresAt && token.expiresAt.getTime() > Date.now() + 3500_000);
  assert.equal(await postgresLogin(db, token.value), 'ok');
  assert.equal(standin.counts.client_credentials, 1);
  assert.deepEqual(results, ['success']);
  assert.equal(s.currentExpiry()?.getTime(), token.expiresAt.getTime());
  assert.doesNotMatch(s.describe(), new RegExp(standin.clientSecret));
  assert.equal(Object.keys(token).includes('value'), false, 'the token value is not enumerable');
  assert.doesNotMatch(JSON.stringify(token), /eyJ/);
});

test('a cached token is served without another request', async () => {
  const s = source();
  const first = await s.getToken(noNotice);
  const second = await s.getToken(noNotice);
  assert.equal(second.value, first.value);
  assert.equal(standin.counts.tokenRequests, 1);
});

test('1,000 concurrent getToken calls make exactly one token request', async () => {
  const s = source();
  const tokens = await Promise.all(Array.from({ length: 1000 }, () => s.getToken(noNotice)));
  assert.equal(new Set(tokens.map((t) => t.value)).size, 1);
  assert.equal(standin.counts.tokenRequests, 1);
  assert.equal(standin.counts.discovery, 1);
});

test('the token is refreshed in the background at half its life, and the new one works', async () => {
  standin.tokenLifetimeSeconds = 2;
  const s = source();
  const first = await s.getToken(noNotice);
  await waitFor(() => s.currentExpiry()?.getTime() !== first.expiresAt?.getTime(), 5_000, 'a background refresh');
  // Long-lived from here, so that a slow machine still logs in before the token expires.
  standin.tokenLifetimeSeconds = 3600;
  await waitFor(() => (s.currentExpiry()?.getTime() ?? 0) > Date.now() + 60_000, 5_000, 'another background refresh');
  const latest = await s.getToken(noNotice);
  assert.notEqual(latest.value, first.value);
  assert.equal(await postgresLogin(db, latest.value), 'ok');
  assert.ok(latest.expiresAt && first.expiresAt && latest.expiresAt > first.expiresAt);
  assert.equal(standin.counts.client_credentials, 3, 'no refresh while the token is fresh');
});

test('a token that expired while the machine slept is refreshed before use', async () => {
  standin.tokenLifetimeSeconds = 1;
  const s = source();
  const first = await s.getToken(noNotice);
  standin.tokenLifetimeSeconds = 3600;
  // Block the event loop past the expiry: no timer runs, as when a laptop sleeps.
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 1_200);
  const after = await s.getToken(noNotice);
  assert.notEqual(after.value, first.value);
  assert.ok(after.expiresAt && after.expiresAt.getTime() > Date.now());
  assert.equal(await postgresLogin(db, after.value), 'ok');
});

test('a wrong secret fails once, in plain words, with no secret in the message or the log', async () => {
  const capture = captureLogger();
  const wrongSecret = `dose-wrong-${'x'.repeat(20)}`;
  const s = source({ clientSecret: wrongSecret }, { logger: capture.logger });
  const error = await s.getToken(noNotice).then(
    () => assert.fail('expected a TokenError'),
    (err: unknown) => err,
  );
  assert.ok(error instanceof TokenError);
  assert.equal(error.code, 'invalid_client');
  assert.equal(error.sqlstate, '28000');
  // The stand-in answers as Databricks does: 401, a WWW-Authenticate challenge, the error in the body.
  assert.equal(error.message, `invalid_client from ${standin.url}/oidc/v1/token (Client authentication failed): check OAuthClientSecret and OAuthClientId`);
  assert.equal(standin.counts.tokenRequests, 1, 'invalid_client is not retried');
  for (const text of [error.message, JSON.stringify(error), String(error.stack), capture.text()]) {
    assert.ok(!text.includes(wrongSecret), 'no secret in the error or the log');
    assert.ok(!text.includes(standin.clientSecret));
  }
  assert.match(capture.text(), /token request failed/);
});

test('missing OAuthClientId or OAuthClientSecret is refused at once, naming the key', () => {
  assert.throws(() => source({ clientId: undefined }), (err: unknown) => err instanceof TokenError && /OAuthClientId/.test(err.message));
  assert.throws(() => source({ clientSecret: undefined }), (err: unknown) => err instanceof TokenError && /OAuthClientSecret/.test(err.message));
  assert.throws(() => source({ databricksInstance: undefined }), (err: unknown) => err instanceof TokenError && /DatabricksInstance/.test(err.message));
  assert.throws(
    () => source({ databricksInstance: 'instance-0123abcd-aaaa.database.cloud.databricks.com' }),
    (err: unknown) => err instanceof TokenError && /is a database host/.test(err.message),
  );
  assert.throws(() => source({ databricksInstance: 'http://localhost:1' }), (err: unknown) => err instanceof TokenError && /https/.test(err.message));
});

test('InitiateOAuth=OFF serves OAuthAccessToken as given, and names the key when it is missing', async () => {
  const issued = await source().getToken(noNotice);
  standin.resetCounts();
  const s = source({ initiateOAuth: 'OFF', accessToken: issued.value });
  const token = await s.getToken(noNotice);
  assert.equal(token.value, issued.value);
  // The stand-in's exp claim is its clock's second; the source's own expiry, its receipt's millisecond: compared with the claim itself.
  const exp = (JSON.parse(Buffer.from(issued.value.split('.')[1] as string, 'base64url').toString('utf8')) as { exp: number }).exp;
  assert.equal(token.expiresAt?.getTime(), exp * 1000, 'expiry from the JWT exp claim');
  assert.ok(Math.abs(exp * 1000 - issued.expiresAt!.getTime()) <= 2000, 'the claim agrees with expires_in');
  assert.equal(standin.counts.tokenRequests, 0);
  assert.equal(await postgresLogin(db, token.value), 'ok');
  assert.throws(
    () => source({ initiateOAuth: 'OFF', accessToken: undefined }),
    (err: unknown) => err instanceof TokenError && err.code === 'token_missing' && /OAuthAccessToken/.test(err.message),
  );
});
