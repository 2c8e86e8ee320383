/** The logger's redaction: every secret field censored, and nothing else (a SQLSTATE `code` is logged). */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Writable } from 'node:stream';
import { createLogger } from '../src/ops/log.js';

function capture(): { logger: ReturnType<typeof createLogger>; lines(): Array<Record<string, unknown>> } {
  const chunks: string[] = [];
  const destination = new Writable({
    write(chunk: Buffer, _encoding, callback) {
      chunks.push(chunk.toString('utf8'));
      callback();
    },
  });
  const logger = createLogger({ level: 'debug', format: 'json', destination });
  return { logger, lines: () => chunks.join('').split('\n').filter(Boolean).map((l) => JSON.parse(l) as Record<string, unknown>) };
}

test('a field named code is logged: a SQLSTATE, an errno code, an error code one level down', () => {
  const { logger, lines } = capture();
  logger.info({ code: '57P03', sqlstate: '28P01' }, 'refused');
  logger.warn({ err: { code: 'ECONNREFUSED', message: 'connect ECONNREFUSED 127.0.0.1:5432' } }, 'failed');
  const [first, second] = lines();
  assert.equal(first?.['code'], '57P03');
  assert.equal(first?.['sqlstate'], '28P01');
  assert.equal((second?.['err'] as { code?: unknown } | undefined)?.code, 'ECONNREFUSED');
});

test('every field that holds a secret is censored, at the top and one level down', () => {
  const fields = [
    'token', 'accessToken', 'refreshToken', 'idToken', 'clientSecret', 'password', 'secret', 'verifier', 'codeVerifier', 'authorizationCode',
    'access_token', 'refresh_token', 'id_token', 'client_secret', 'code_verifier', 'authorization_code',
    'Password', 'OAuthClientSecret', 'OAuthAccessToken', 'OAuthRefreshToken', 'OAuthVerifier',
  ];
  const { logger, lines } = capture();
  for (const field of fields) {
    const value = `secret-${field}-${Math.random().toString(36).slice(2)}`;
    logger.info({ [field]: value, nested: { [field]: value }, operation: 'authorization_code' }, 'with a secret');
    const line = lines().at(-1) ?? {};
    assert.equal(line[field], '[redacted]', field);
    assert.deepEqual(line['nested'], { [field]: '[redacted]' }, `nested ${field}`);
    assert.equal(line['operation'], 'authorization_code', 'a value is not a field name');
    assert.ok(!JSON.stringify(line).includes(value), field);
  }
});

test('an error keeps its message and type, its secret fields censored, as err, under another name and as the line itself', () => {
  const { logger, lines } = capture();
  const secret = `secret-${Math.random().toString(36).slice(2)}`;
  const error = Object.assign(new Error('token refresh failed'), { code: 'E_TOKEN', refreshToken: secret });
  logger.warn({ err: error }, 'as err');
  logger.warn({ failure: error }, 'under another name');
  logger.warn(error);
  const [asErr, other, itself] = lines();
  for (const [name, line] of [['err', asErr?.['err']], ['itself', itself?.['err']]] as const) {
    const logged = line as Record<string, unknown> | undefined;
    assert.equal(logged?.['message'], 'token refresh failed', name);
    assert.equal(logged?.['type'], 'Error', name);
    assert.equal(logged?.['code'], 'E_TOKEN', name);
    assert.equal(logged?.['refreshToken'], '[redacted]', name);
  }
  assert.deepEqual(other?.['failure'], { code: 'E_TOKEN', refreshToken: '[redacted]' });
  for (const line of lines()) assert.ok(!JSON.stringify(line).includes(secret));
});

test("a child logger's bindings are censored, at the top and one level down", () => {
  const { logger, lines } = capture();
  const secret = `secret-${Math.random().toString(36).slice(2)}`;
  logger.child({ target: 'default', clientSecret: secret, oauth: { accessToken: secret, host: 'h' } }).info('bound');
  const [line] = lines();
  assert.equal(line?.['target'], 'default');
  assert.equal(line?.['clientSecret'], '[redacted]');
  assert.deepEqual(line?.['oauth'], { accessToken: '[redacted]', host: 'h' });
  assert.ok(!JSON.stringify(line).includes(secret));
});
