/** The workspace misbehaving: down, slow, 500s, bad JSON, no expires_in; and a refresh that fails. */
import { after, before, beforeEach, test } from 'node:test';
import assert from 'node:assert/strict';
import { createTokenSource } from '../src/oauth/index.js';
import { ASSUMED_LIFETIME_MS } from '../src/oauth/workspace-client.js';
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

async function failure(promise: Promise<unknown>): Promise<TokenError> {
  const err = await promise.then(
    () => assert.fail('expected a TokenError'),
    (e: unknown) => e,
  );
  assert.ok(err instanceof TokenError, `a TokenError, got ${String(err)}`);
  return err;
}

test('a workspace that is down gives 08006 naming the URL', async () => {
  await standin.down();
  const error = await failure(source().getToken(noNotice));
  assert.equal(error.code, 'unreachable');
  assert.equal(error.sqlstate, '08006');
  assert.match(error.message, new RegExp(`^cannot reach ${standin.url}/oidc/.well-known/oauth-authorization-server \\(3 attempts\\): ECONNREFUSED$`));
});

test('an answer slower than requestTimeoutMs is a timeout (08006), retried', async () => {
  const s = source({ requestTimeoutMs: 300 });
  await s.getToken(noNotice); // discovery done; the token is cached
  await s.close();
  standin.fault({ kind: 'slow', delayMs: 2_000 });
  const started = Date.now();
  const error = await failure(source({ requestTimeoutMs: 300 }).getToken(noNotice));
  assert.equal(error.code, 'timeout');
  assert.equal(error.sqlstate, '08006');
  assert.match(error.message, /^no answer from https:\/\/localhost:\d+\/oidc\/v1\/token within 0\.3 s \(3 attempts\)$/);
  const elapsed = Date.now() - started;
  assert.ok(elapsed >= 900 && elapsed < 8_000, `three bounded tries, took ${elapsed} ms`);
});

test('500 answers are retried with backoff, then fail in plain words', async () => {
  standin.fault({ kind: 'status', status: 500 }); // on the token endpoint: discovery passes
  const error = await failure(source().getToken(noNotice));
  assert.equal(error.code, 'server_error');
  assert.equal(error.sqlstate, '28000');
  assert.match(error.message, /answered HTTP 500 \(3 attempts\): the workspace is having trouble, try again later$/);
  assert.equal(standin.counts.tokenRequests, 3);
});

test('one 503 is retried and the next answer is used', async () => {
  standin.fault({ kind: 'status', status: 503, times: 1 });
  const token = await source().getToken(noNotice);
  assert.equal(standin.counts.tokenRequests, 2);
  assert.equal(await postgresLogin(db, token.value), 'ok');
});

test('malformed JSON is a bad_response, not retried', async () => {
  standin.fault({ kind: 'malformed-json' });
  const error = await failure(source().getToken(noNotice));
  assert.equal(error.code, 'bad_response');
  assert.match(error.message, /^unexpected answer from https:\/\/localhost:\d+\/oidc\/v1\/token: malformed JSON$/);
  assert.equal(standin.counts.tokenRequests, 1);
});

test('without expires_in the JWT exp claim gives the lifetime; an opaque token is assumed to live 10 minutes', async () => {
  standin.fault({ kind: 'no-expires-in' });
  const jwt = await source().getToken(noNotice);
  assert.ok(jwt.expiresAt && Math.abs(jwt.expiresAt.getTime() - (Date.now() + 3600_000)) < 5_000);

  standin.fault({ kind: 'no-expires-in', opaque: true });
  const capture = captureLogger();
  const opaque = await source({}, { logger: capture.logger }).getToken(noNotice);
  assert.ok(opaque.expiresAt && Math.abs(opaque.expiresAt.getTime() - (Date.now() + ASSUMED_LIFETIME_MS)) < 5_000);
  assert.match(capture.text(), /gave no lifetime; assuming one/);
  assert.equal(await postgresLogin(db, opaque.value), 'ok');
});

test('a failed refresh keeps serving the still-valid token', async () => {
  standin.tokenLifetimeSeconds = 6;
  const results: string[] = [];
  const s = source({}, { onRefresh: (r) => results.push(r) });
  const first = await s.getToken(noNotice);
  standin.fault({ kind: 'status', status: 500 });
  // Past half its life the background refresh fails (3 tries); clients still get the valid token.
  await waitFor(() => results.includes('failure'), 5_000, 'a failed background refresh');
  const still = await s.getToken(noNotice);
  assert.equal(still.value, first.value);
  assert.equal(await postgresLogin(db, still.value), 'ok');
  // Once the workspace answers again, the next refresh replaces it.
  standin.fault(undefined);
  await waitFor(() => results.at(-1) === 'success', 3_000, 'a successful refresh');
  const next = await s.getToken(noNotice);
  assert.notEqual(next.value, first.value);
  assert.equal(await postgresLogin(db, next.value), 'ok');
});

test('a refresh failure after expiry reaches the client as an error, and the source recovers', async () => {
  standin.tokenLifetimeSeconds = 1;
  const s = source();
  await s.getToken(noNotice);
  await standin.down();
  await new Promise((resolve) => setTimeout(resolve, 1_100));
  const error = await failure(s.getToken(noNotice));
  assert.equal(error.sqlstate, '08006');
  await standin.up();
  standin.tokenLifetimeSeconds = 3600;
  const token = await s.getToken(noNotice);
  assert.equal(await postgresLogin(db, token.value), 'ok');
});
