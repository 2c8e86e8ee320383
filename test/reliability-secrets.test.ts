/**
 * No secret in anything the real program says, over whole sessions and failures: its stdout and
 * stderr at debug level, what clients receive (message, detail, hint, where), `check`, `--help`
 * and start-up errors, with the secrets given in --connection, in the environment and in a config
 * file. (OAuth flows and the token source's errors are in oauth-secrets.test.ts and
 * reliability-oauth.test.ts; metrics in metrics.test.ts; --help with --connection in cli.test.ts.)
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type pg from 'pg';
import { untrustedCert } from './harness/certs.js';
import { startTokenPostgres, type TestPostgres } from './harness/postgres.js';
import { BIN, connectionFor, startProxyProcess, type ProxyProcess } from './harness/proxy.js';
import { cancelRequest, cleanEnvironment, listen, pgClient } from './reliability-support.js';

cleanEnvironment();
let db: TestPostgres;
let dir: string;
const token = 'tok-' + randomBytes(600).toString('base64url');
const clientSecret = 'dose' + randomBytes(24).toString('hex');
const refreshToken = 'doau' + randomBytes(32).toString('base64url');
/** A JWT whose exp claim is past: the proxy refuses it itself. */
const expiredJwt = `${b64({ alg: 'none' })}.${b64({ exp: Math.floor(Date.now() / 1000) - 60, sub: 'x' })}.${randomBytes(64).toString('base64url')}`;

function b64(o: object): string {
  return Buffer.from(JSON.stringify(o)).toString('base64url');
}

/** The distinctive parts of every secret: a text holding any of them has leaked it. */
function pieces(): string[] {
  const all = [token, clientSecret, refreshToken, expiredJwt, db.md5Password, db.scramPassword];
  return all.flatMap((s) => [s, s.slice(-24)]);
}

function assertNoSecret(texts: readonly string[], where: string): void {
  for (const secret of pieces()) {
    for (const text of texts) assert.ok(!text.includes(secret), `${where}: a secret (${secret.slice(0, 6)}...) in: ${text.slice(0, 400)}`);
  }
}

/** Everything a client can read of an error. */
function clientSide(error: unknown): string[] {
  const e = error as pg.DatabaseError;
  return [String(e.message), String(e.detail), String(e.hint), String(e.where), JSON.stringify(e)];
}

interface Ran {
  readonly code: number | null;
  readonly output: string;
}

function program(args: readonly string[], env: NodeJS.ProcessEnv = {}): Promise<Ran> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [BIN, ...args], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    child.stdout.on('data', (d: Buffer) => (output += d.toString()));
    child.stderr.on('data', (d: Buffer) => (output += d.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), 20_000);
    child.once('error', reject);
    child.once('close', (code) => {
      clearTimeout(timer);
      resolve({ code, output });
    });
  });
}

before(async () => {
  db = await startTokenPostgres(token);
  dir = mkdtempSync(join(tmpdir(), 'lbp-secrets-'));
});

after(async () => {
  await db?.stop();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

test('a static token: sessions, a cancel, a killed backend, a refused and an expired token, an unreachable and an unverified upstream; no secret anywhere', async () => {
  const outputs: string[] = [];
  const errors: unknown[] = [];
  const attempt = async (work: () => Promise<unknown>): Promise<void> => {
    try {
      await work();
    } catch (error) {
      errors.push(error);
    }
  };
  const run = async (connection: string, fn: (p: ProxyProcess) => Promise<void>, env: NodeJS.ProcessEnv = {}): Promise<void> => {
    const proxy = await startProxyProcess(['--connection', connection, '--no-http', '--log-level', 'debug', '--connect-timeout', '2000'], env);
    try {
      await fn(proxy);
    } finally {
      await proxy.stop('SIGTERM');
      outputs.push(proxy.output());
    }
  };

  // The token in --connection; a full session, a cancel, a backend killed under a client.
  await run(connectionFor(db, token), async (p) => {
    const c = pgClient(p.port, db, { application_name: 'secrets' });
    c.on('error', (error) => errors.push(error)); // the FATAL of a backend killed while idle
    await c.connect();
    await c.query('select $1::text as t', ['hello']);
    const sleeping = c.query('select pg_sleep(5)').catch((e: unknown) => errors.push(e));
    await new Promise((r) => setTimeout(r, 300));
    const { processID, secretKey } = c as unknown as { processID: number; secretKey: number };
    await cancelRequest(p.port, processID, secretKey);
    await sleeping;
    await db.query("select pg_terminate_backend(pid) from pg_stat_activity where application_name = 'secrets'");
    await attempt(() => c.query('select 1'));
    await c.end().catch(() => {});
    // The upstream no longer takes the token: 28P01 for the next client.
    await db.setTokenPassword('another-' + randomBytes(8).toString('hex'));
    await attempt(() => pgClient(p.port, db).connect());
    await db.setTokenPassword(token);
  });

  // The token in the environment and in a config file.
  const upstreamOnly = connectionFor(db, token).replace(`;OAuthAccessToken=${token}`, '');
  await run(upstreamOnly, async (p) => void (await pgClient(p.port, db).connect().then((c) => c.end())), { LAKEBASE_PROXY_OAUTH_ACCESS_TOKEN: token });
  const config = join(dir, 'proxy.yaml');
  writeFileSync(config, `OAuthAccessToken: "${token}"\nOAuthClientSecret: "${clientSecret}"\nOAuthRefreshToken: "${refreshToken}"\n`, { mode: 0o600 });
  await run(upstreamOnly + ';InitiateOAuth=OFF', async (p) => void (await pgClient(p.port, db).connect().then((c) => c.end())), { LAKEBASE_PROXY_CONFIG: config });

  // An expired JWT; an upstream that is down; one whose certificate does not verify.
  await run(connectionFor(db, expiredJwt), async (p) => attempt(() => pgClient(p.port, db).connect()));
  const closed = createServer();
  const deadPort = await listen(closed);
  await new Promise((r) => closed.close(r));
  await run(connectionFor(db, token).replace(`Port=${db.port}`, `Port=${deadPort}`), async (p) => attempt(() => pgClient(p.port, db).connect()));
  const untrusted = await untrustedCert();
  await run(connectionFor(db, token).replace(db.ca.caFile, untrusted.certFile), async (p) => attempt(() => pgClient(p.port, db).connect()));

  // check, with success and failure; --help and a start-up error with secrets all around.
  const secretEnv = { LAKEBASE_PROXY_OAUTH_CLIENT_SECRET: clientSecret, DATABRICKS_CLIENT_SECRET: clientSecret, LAKEBASE_PROXY_OAUTH_REFRESH_TOKEN: refreshToken };
  for (const args of [
    ['check', '--connection', connectionFor(db, token)],
    ['check', '--connection', connectionFor(db, expiredJwt)],
    ['--help'],
    ['--connection', `${connectionFor(db, token)};OAuthClientSecret=${clientSecret};NoSuchKey=1`],
    ['--connection', `${connectionFor(db, token)};Port=notaport`],
  ]) {
    const ran = await program(args, secretEnv);
    outputs.push(ran.output);
  }

  assert.ok(errors.length >= 6, `${errors.length} client-side failures collected`);
  const codes = errors.map((e) => (e as { code?: string }).code);
  for (const code of ['57014', '57P01', '28P01', '28000', '08001']) assert.ok(codes.includes(code), `a failure with ${code} among ${codes.join(', ')}`);
  assert.ok(outputs.join('').includes('"level":20'), 'the programs logged at debug level');
  assertNoSecret(outputs, 'program output');
  assertNoSecret(errors.flatMap(clientSide), 'what a client sees');
});

test('a native password (Password=) never appears either, right or wrong', async () => {
  const outputs: string[] = [];
  for (const [user, password] of [
    [db.md5Role, db.md5Password],
    [db.scramRole, db.scramPassword],
    [db.scramRole, `${db.scramPassword}-wrong`],
  ] as const) {
    const connection = `Server=localhost;Port=${db.port};User=${user};Password=${password};SSLRootCert=${db.ca.caFile};Database=${db.database}`;
    const proxy = await startProxyProcess(['--connection', connection, '--no-http', '--log-level', 'debug']);
    try {
      const c = pgClient(proxy.port, db);
      const error = await c.connect().then(
        () => undefined,
        (e: unknown) => e,
      );
      await c.end().catch(() => {});
      if (password.endsWith('-wrong')) assert.equal((error as { code?: string }).code, '28P01');
      else assert.equal(error, undefined);
      if (error) assertNoSecret(clientSide(error), 'what a client sees');
    } finally {
      await proxy.stop('SIGTERM');
      outputs.push(proxy.output());
    }
  }
  assertNoSecret(outputs, 'program output');
});

test(
  'secrets given in --connection are not readable by other local users in /proc/<pid>/cmdline',
  async () => {
    const proxy = await startProxyProcess(['--connection', connectionFor(db, token), '--no-http']);
    try {
      const cmdline = readFileSync(`/proc/${proxy.child.pid}/cmdline`, 'utf8');
      assert.ok(!cmdline.includes(token), 'the token is in the command line that ps shows to every user');
    } finally {
      await proxy.stop('SIGTERM');
    }
  },
);

test(
  'a malformed connection string does not echo a secret typed with the wrong separator',
  async () => {
    const ran = await program(['--connection', `Server=h;User=u;OAuthAccessToken:${token}`]);
    assert.equal(ran.code, 1);
    assert.match(ran.output, /OAuthAccessToken/, 'the error still names the property');
    assertNoSecret([ran.output], 'a start-up error');
  },
);
