/**
 * Who may use the identity, through the real program: upstream certificate verification is on by
 * default (the system's CAs, nothing trusted by accident) and turning it off says so at start;
 * the unix socket's mode follows --unix-socket-mode; a listener beyond loopback defaults to SCRAM
 * and offers TLS when given a certificate. (The 0600 default, trust refused on 0.0.0.0 and a
 * certificate not from SSLRootCert are in cli.test.ts, startup.test.ts and upstream.test.ts.)
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { mkdtempSync, readdirSync, rmSync, statSync, watch, writeFileSync } from 'node:fs';
import { createServer, connect as netConnect } from 'node:net';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import pg from 'pg';
import { serialize } from 'pg-protocol';
import { startTokenPostgres, type TestPostgres } from './harness/postgres.js';
import { connectionFor, startProxy, startProxyProcess } from './harness/proxy.js';
import { cleanEnvironment, loginError, whoAmI } from './reliability-support.js';
import { freePort } from './harness/tools.js';

cleanEnvironment();
let db: TestPostgres;
let dir: string;
const token = 'tok-' + randomBytes(48).toString('base64url');

before(async () => {
  db = await startTokenPostgres(token);
  dir = mkdtempSync(join(tmpdir(), 'lbp-access-'));
});

after(async () => {
  await db?.stop();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

/** The test server's settings without SSLRootCert: only the CAs the process trusts by itself. */
const noRootCert = (extra = ''): string => connectionFor(db, token).replace(`;SSLRootCert=${db.ca.caFile}`, '') + (extra ? `;${extra}` : '');

test('upstream verification is on by default: without SSLRootCert a test-CA certificate fails unless the process trusts that CA', async () => {
  assert.doesNotMatch(noRootCert(), /SSLRootCert/);
  // test/run.js trusts the test CA through NODE_EXTRA_CA_CERTS: take it away from this child.
  const strict = await startProxyProcess(['--connection', noRootCert(), '--no-http'], { NODE_EXTRA_CA_CERTS: undefined });
  try {
    const error = await loginError(strict.port, db);
    assert.equal(error.code, '08001', error.message);
    assert.match(error.message, new RegExp(`^TLS handshake with upstream localhost:${db.port} failed: .+ \\(set SSLRootCert to the CA file that signed it, or SSLMode=require`));
    assert.doesNotMatch(strict.output(), /SSLMode=require: the upstream certificate is not verified/, 'no warning: verification is on');
  } finally {
    await strict.stop('SIGINT');
  }
  // The same settings work once the process trusts the CA: the failure above was the verification.
  const trusting = await startProxyProcess(['--connection', noRootCert(), '--no-http'], { NODE_EXTRA_CA_CERTS: db.ca.caFile });
  try {
    assert.equal(await whoAmI(trusting.port, db), db.tokenRole);
  } finally {
    await trusting.stop('SIGINT');
  }
});

test('SSLMode=require logs a warning at start, naming the setting, then connects without verifying', async () => {
  const lax = await startProxyProcess(['--connection', noRootCert('SSLMode=require'), '--no-http'], { NODE_EXTRA_CA_CERTS: undefined });
  try {
    const warning = lax
      .output()
      .split('\n')
      .filter((l) => l.startsWith('{'))
      .map((l) => JSON.parse(l) as { level: number; msg: string; upstream?: string })
      .find((l) => /SSLMode=require/.test(l.msg));
    assert.ok(warning, `a warning at start:\n${lax.output()}`);
    assert.equal(warning.level, 40, 'logged at warn level');
    assert.match(warning.msg, /not verified/);
    assert.ok(lax.output().indexOf('SSLMode=require') < lax.output().indexOf('"msg":"listening"'), 'before the listening line');
    assert.equal(await whoAmI(lax.port, db), db.tokenRole);
  } finally {
    await lax.stop('SIGINT');
  }
});

test('--unix-socket-mode 0660 and 0666 set the socket file mode; the default stays 0600', async () => {
  for (const mode of ['0660', '0666', undefined] as const) {
    const socketDir = mkdtempSync(join(dir, 'sock-'));
    const flags = ['--unix-socket', socketDir, ...(mode ? ['--unix-socket-mode', mode] : [])];
    const proxy = await startProxyProcess(['--connection', connectionFor(db, token), '--no-http', ...flags]);
    try {
      const path = proxy.socketPath as string;
      assert.equal(path, join(socketDir, `.s.PGSQL.${proxy.port}`));
      assert.equal((statSync(path).mode & 0o777).toString(8), mode ? mode.slice(1) : '600');
      const c = new pg.Client({ host: socketDir, port: proxy.port, user: 'someone', database: db.database });
      await c.connect();
      assert.equal((await c.query('select current_user as u')).rows[0].u, db.tokenRole);
      await c.end();
    } finally {
      await proxy.stop('SIGINT');
    }
  }
});

test('the unix socket has its mode from the moment it appears: never changed in place, even under umask 000', async () => {
  for (const mode of ['0600', '0660'] as const) {
    const socketDir = mkdtempSync(join(dir, 'sock-born-'));
    // What the folder sees: a socket file bound there and chmod-ed after shows an attribute change
    // ('change') for its name; one that arrives with its mode shows only its arrival ('rename').
    const events: string[] = [];
    const watcher = watch(socketDir, (event, name) => {
      if (typeof name === 'string' && name.startsWith('.s.PGSQL.')) events.push(event);
    });
    const previous = process.umask(0o000);
    let proxy;
    try {
      proxy = await startProxy(['--connection', connectionFor(db, token), '--unix-socket', socketDir, '--unix-socket-mode', mode]);
    } finally {
      process.umask(previous);
    }
    try {
      const path = proxy.server.socketPath as string;
      assert.equal((statSync(path).mode & 0o777).toString(8), mode.slice(1));
      await new Promise((resolve) => setTimeout(resolve, 200)); // inotify events are delivered asynchronously
      assert.ok(events.includes('rename'), `the socket's arrival was seen: ${events.join(', ')}`);
      assert.deepEqual(events.filter((e) => e === 'change'), [], 'no mode change after the socket appeared');
      assert.deepEqual(readdirSync(socketDir), [basename(path)], 'nothing else left in the folder');
      assert.equal(await whoAmI(proxy.port, db), db.tokenRole);
      const c = new pg.Client({ host: socketDir, port: proxy.port, user: 'someone', database: db.database });
      await c.connect();
      assert.equal((await c.query('select current_user as u')).rows[0].u, db.tokenRole);
      await c.end();
    } finally {
      watcher.close();
      await proxy.close();
    }
    assert.deepEqual(readdirSync(socketDir), [], 'the socket file is removed on close');
  }
});

test('a socket file left by a dead process is replaced; one a server answers on is refused', async () => {
  const socketDir = mkdtempSync(join(dir, 'sock-left-'));
  const port = await freePort();
  const path = join(socketDir, `.s.PGSQL.${port}`);
  const args = ['--connection', connectionFor(db, token), '--port', String(port), '--unix-socket', socketDir];
  const live = createServer().listen(path);
  await once(live, 'listening');
  await assert.rejects(startProxy(args), new RegExp(`unix socket ${path} is in use by another server`));
  await new Promise((resolve) => live.close(resolve));
  writeFileSync(path, 'left by a process that died');
  const proxy = await startProxy(args);
  try {
    assert.ok(statSync(path).isSocket());
    assert.equal(statSync(path).mode & 0o777, 0o600);
  } finally {
    await proxy.close();
  }
});

test('a listener beyond loopback defaults to SCRAM and, given a certificate, offers TLS to clients', async () => {
  const users = join(dir, 'users');
  const password = 'pw-' + randomBytes(9).toString('base64url');
  writeFileSync(users, `carol:${password}\n`, { mode: 0o600 });
  const proxy = await startProxy([
    '--connection',
    connectionFor(db, token),
    '--address',
    '0.0.0.0',
    '--client-users',
    users,
    '--tls-cert',
    db.ca.serverCertFile,
    '--tls-key',
    db.ca.serverKeyFile,
  ]);
  try {
    assert.equal(proxy.server.options.clientAuth.authMethod, 'scram-sha-256');
    const c = new pg.Client({ host: '127.0.0.1', port: proxy.port, user: 'carol', password, database: db.database, ssl: { ca: db.ca.caPem, servername: 'localhost' } });
    await c.connect();
    const stream = (c as unknown as { connection: { stream: { encrypted?: boolean } } }).connection.stream;
    assert.equal(stream.encrypted, true, 'the client session runs over TLS');
    assert.equal((await c.query('select current_user as u')).rows[0].u, db.tokenRole);
    await c.end();
    const wrong = new pg.Client({ host: '127.0.0.1', port: proxy.port, user: 'carol', password: 'nope', database: db.database, ssl: { ca: db.ca.caPem, servername: 'localhost' } });
    wrong.on('error', () => {});
    await assert.rejects(wrong.connect(), (e: pg.DatabaseError) => e.code === '28P01');
  } finally {
    await proxy.close();
  }
});

test(
  'a listener beyond loopback without a certificate either refuses to start or still offers TLS (client passwords and data would cross the network in the clear)',
  async () => {
    const users = join(dir, 'users-plain');
    writeFileSync(users, 'dave:pw\n', { mode: 0o600 });
    const started = await startProxy(['--connection', connectionFor(db, token), '--address', '0.0.0.0', '--client-users', users]).catch((error: Error) => error);
    if (started instanceof Error) {
      assert.match(started.message, /TLSCert/);
      return;
    }
    try {
      const socket = netConnect({ host: '127.0.0.1', port: started.port });
      socket.on('error', () => {});
      socket.write(serialize.requestSsl());
      const [answer] = (await once(socket, 'data')) as [Buffer];
      socket.destroy();
      assert.equal(answer.toString('latin1'), 'S', 'the SSLRequest is accepted');
    } finally {
      await started.close();
    }
  },
);
