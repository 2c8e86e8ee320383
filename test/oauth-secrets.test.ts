/**
 * Regression: no secret leaks. Every flow and failure runs with one debug-level logger; then no
 * client secret, access token, refresh token, authorization code or PKCE verifier the stand-in
 * ever saw may appear in a log line, a TokenError (message, stack, JSON, causes) or the plain
 * output of the `auth` commands.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { createTokenSource, LOGIN_NOTICE_PREFIX, runAuthCommand } from '../src/oauth/index.js';
import type { OAuthOptions } from '../src/oauth/options.js';
import { TokenError, type TokenSource } from '../src/token/token-source.js';
import { captureLogger, standinOptions, startDatabricksStandin, waitFor, type DatabricksStandin } from './harness/databricks-standin.js';

let standin: DatabricksStandin;
let dir: string;

before(async () => {
  process.env['LAKEBASE_PROXY_NO_BROWSER'] = '1';
  standin = await startDatabricksStandin({ instances: ['my-instance'] });
  dir = mkdtempSync(join(tmpdir(), 'lbp-oauth-secrets-'));
});

after(async () => {
  await standin?.close();
  rmSync(dir, { recursive: true, force: true });
});

test('no secret in any TokenError, log line or plain command output', async () => {
  const capture = captureLogger();
  const errors: unknown[] = [];
  const outputs: string[] = [];
  const sources: TokenSource[] = [];
  const noNotice = { notice: () => undefined };
  const make = (overrides: Partial<OAuthOptions>) => {
    const s = createTokenSource(standinOptions(standin, overrides), { logger: capture.logger });
    sources.push(s);
    return s;
  };
  const attempt = async (work: Promise<unknown>) => {
    try {
      await work;
    } catch (err) {
      errors.push(err);
    }
  };
  const command = async (args: string[], options: OAuthOptions) => {
    const stdout = new PassThrough();
    const stderr = new PassThrough();
    await runAuthCommand(args, options, { stdout, stderr, logger: capture.logger });
    outputs.push(String(stdout.read() ?? ''), String(stderr.read() ?? ''));
    return String(outputs.at(-2));
  };
  const file = join(dir, 'OAuthSettings.txt');
  const pkce = (overrides: Partial<OAuthOptions> = {}) =>
    standinOptions(standin, { authScheme: 'OAuthPKCE', clientId: undefined, clientSecret: undefined, settingsLocation: file, ...overrides });

  // Client credentials, refreshed; a wrong secret; an answer without token_type (it carries a token).
  standin.tokenLifetimeSeconds = 1;
  const sp = make({ lakebaseInstance: 'my-instance' });
  await sp.getToken(noNotice);
  await waitFor(() => standin.counts.client_credentials >= 2, 3_000, 'a refresh');
  await attempt(make({ clientSecret: `wrong-${standin.clientSecret}` }).getToken(noNotice));
  standin.fault({ kind: 'no-token-type' });
  await attempt(make({}).getToken(noNotice));
  standin.fault(undefined);
  await attempt(make({ lakebaseInstance: 'missing' }).getToken(noNotice));

  // A browser login, rotation, then a refused refresh token.
  const person = make(pkce());
  const notices: string[] = [];
  const token = person.getToken({ notice: (m) => notices.push(m) });
  await waitFor(() => notices.length > 0, 5_000, 'the login notice');
  await standin.completeLogin(notices[0]!.slice(LOGIN_NOTICE_PREFIX.length));
  await token;
  await waitFor(() => standin.counts.refresh_token >= 1, 3_000, 'a rotation');
  await person.close();
  standin.expireRefreshTokens();
  await new Promise((resolve) => setTimeout(resolve, 1_100));
  await attempt(make(pkce({ initiateOAuth: 'REFRESH' })).getToken(noNotice));

  // The commands, without --print-tokens.
  standin.tokenLifetimeSeconds = 3600;
  const url = JSON.parse(await command(['url'], pkce())) as { url: string };
  const callback = await standin.authorize(url.url);
  await command(['exchange', '--verifier', callback.href], pkce());
  await command(['refresh'], pkce());
  await command(['exchange', '--verifier', callback.href], pkce()); // fails: nothing pending
  await command(['refresh', '--refresh-token', 'doau-not-a-real-one'], pkce());

  await Promise.all(sources.map((s) => s.close()));
  assert.ok(errors.length >= 4, `failures collected: ${errors.length}`);
  const secrets = standin.secrets();
  assert.ok(secrets.length >= 10, `secrets collected: ${secrets.length}`);
  const texts = [capture.text(), ...outputs, ...errors.flatMap(describeError)];
  for (const secret of secrets) {
    for (const text of texts) assert.ok(!text.includes(secret), `a secret (${secret.slice(0, 6)}...) leaked into: ${text.slice(0, 300)}`);
  }
});

function describeError(err: unknown): string[] {
  assert.ok(err instanceof TokenError, `only TokenErrors leave the module, got ${String(err)}`);
  const texts = [err.message, String(err.stack), JSON.stringify(err)];
  for (let cause: unknown = err.cause; cause instanceof Error; cause = cause.cause) {
    texts.push(cause.message, String(cause.stack), JSON.stringify(cause));
  }
  return texts;
}
