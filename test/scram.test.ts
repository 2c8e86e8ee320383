/**
 * src/auth/scram.ts against what Postgres itself computes: its stored SCRAM verifiers and MD5
 * hashes, its password preparation (SASLprep), and the RFC 5929 channel-binding hash for each
 * certificate signature algorithm.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes, X509Certificate } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { generate } from 'selfsigned';
import {
  keyDerivations,
  makeVerifier,
  md5PasswordResponse,
  parseVerifier,
  PasswordMismatch,
  SCRAM,
  SCRAM_PLUS,
  ScramClient,
  ScramError,
  ScramServer,
  tlsServerEndPoint,
  verifyPassword,
  type ScramVerifier,
} from '../src/auth/scram.js';
import { quoteIdent, quoteLiteral, startPostgres, type TestPostgres } from './harness/postgres.js';
import { connectionFor, startProxy } from './harness/proxy.js';
import { connectUpstream } from '../src/proxy/upstream.js';

let db: TestPostgres;

before(async () => {
  db = await startPostgres();
});

after(async () => {
  await db?.stop();
});

async function storedPassword(role: string): Promise<string> {
  const [row] = await db.query<{ v: string }>('select rolpassword as v from pg_authid where rolname = $1', [role]);
  assert.ok(row?.v, `a stored password for ${role}`);
  return row.v;
}

async function createRole(role: string, password: string): Promise<ScramVerifier> {
  await db.query(`create role ${quoteIdent(role)} login password ${quoteLiteral(password)}`);
  const verifier = parseVerifier(await storedPassword(role));
  assert.ok(verifier, 'Postgres stored a SCRAM-SHA-256 verifier');
  return verifier;
}

/** One full exchange between our client and our server; returns what the client's proof made of it. */
function exchange(verifier: ScramVerifier, password: string, binding?: Buffer): void {
  const client = new ScramClient(password, binding ? SCRAM_PLUS : SCRAM, binding, binding !== undefined);
  const server = new ScramServer(verifier);
  const serverFirst = server.serverFirstMessage(client.clientFirstMessage());
  client.verifyServerFinal(server.serverFinalMessage(client.clientFinalMessage(serverFirst)));
}

test('a SCRAM verifier stored by Postgres verifies its password and no other', async () => {
  const verifier = parseVerifier(await storedPassword(db.scramRole));
  assert.ok(verifier);
  assert.equal(verifier.iterations, 4096);
  assert.equal(verifyPassword(verifier, db.scramPassword), true);
  assert.equal(verifyPassword(verifier, db.scramPassword + ' '), false);
  exchange(verifier, db.scramPassword);
  assert.throws(() => exchange(verifier, 'wrong'), PasswordMismatch);
});

const unicodePasswords: ReadonlyArray<readonly [string, string]> = [
  ['a soft hyphen (mapped to nothing)', 'pass\u00adword-é'],
  ['a zero-width space (a non-ASCII space)', 'pass\u200bword-é'],
  ['an ogham space mark (a non-ASCII space NFKC keeps)', 'pass\u1680word'],
  ['a no-break space', 'pass\u00a0word'],
  ['full-width letters (NFKC)', 'ｐａｓｓｗｏｒｄ'],
  ['a decomposed accent (NFKC composes it)', 'cafe\u0301-secret'],
];

test('non-ASCII passwords are prepared as Postgres prepares them (SASLprep)', async () => {
  for (const [index, [name, password]] of unicodePasswords.entries()) {
    const verifier = await createRole(`prep_${index}`, password);
    assert.equal(verifyPassword(verifier, password), true, name);
    exchange(verifier, password);
    // Our own verifiers (the users file) agree with Postgres' on the same password.
    const ours = makeVerifier(password);
    assert.equal(verifyPassword(ours, password), true, name);
  }
});

test('a native role with a SASLprep-sensitive password logs in upstream through the proxy (Password=)', async () => {
  const password = unicodePasswords[0]?.[1] as string;
  await createRole('prep_upstream', password);
  const proxy = await startProxy(['--connection', `${connectionFor(db, 'unused')};User=prep_upstream;Password=${password}`]);
  try {
    const c = new pg.Client({ host: '127.0.0.1', port: proxy.port, user: 'anyone', database: db.database });
    await c.connect();
    try {
      assert.equal((await c.query('select current_user as u')).rows[0].u, 'prep_upstream');
    } finally {
      await c.end();
    }
  } finally {
    await proxy.close();
  }
});

test('a local user with a SASLprep-sensitive password logs in with the pg client (--client-auth scram-sha-256)', async () => {
  const token = 'tok-' + randomBytes(12).toString('hex');
  await db.setTokenPassword(token);
  const dir = mkdtempSync(join(tmpdir(), 'lbp-scram-'));
  try {
    const usersFile = join(dir, 'users');
    writeFileSync(usersFile, unicodePasswords.map(([, password], i) => `user${i}:${password}`).join('\n') + '\n', { mode: 0o600 });
    const proxy = await startProxy(['--connection', connectionFor(db, token), '--client-auth', 'scram-sha-256', '--client-users', usersFile]);
    try {
      for (const [i, [name, password]] of unicodePasswords.entries()) {
        const c = new pg.Client({ host: '127.0.0.1', port: proxy.port, user: `user${i}`, password, database: db.database });
        await c.connect().catch((error: Error) => assert.fail(`${name}: ${error.message}`));
        await c.end();
      }
    } finally {
      await proxy.close();
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('the client refuses a server that does not prove it knows the password', () => {
  const verifier = makeVerifier('right');
  const impostor = makeVerifier('other');
  const client = new ScramClient('right', SCRAM, undefined, false);
  const server = new ScramServer(verifier);
  const serverFirst = server.serverFirstMessage(client.clientFirstMessage());
  const clientFinal = client.clientFinalMessage(serverFirst);
  server.serverFinalMessage(clientFinal);
  // A server-final signed with another key, an error, and a missing signature are all refused.
  const forged = `v=${Buffer.from(impostor.serverKey).toString('base64')}`;
  assert.throws(() => client.verifyServerFinal(forged), ScramError);
  assert.throws(() => client.verifyServerFinal('e=invalid-proof'), /server rejected SCRAM exchange: invalid-proof/);
  assert.throws(() => client.verifyServerFinal('x=1'), ScramError);
});

test('the client refuses a server-first that does not extend its nonce or has a bad iteration count', () => {
  const client = (): ScramClient => new ScramClient('pw', SCRAM, undefined, false);
  const nonceOf = (c: ScramClient): string => /r=([^,]+)/.exec(c.clientFirstMessage())?.[1] as string;
  const salt = randomBytes(16).toString('base64');
  const a = client();
  assert.throws(() => a.clientFinalMessage(`r=someone-else,s=${salt},i=4096`), /nonce/);
  const b = client();
  assert.throws(() => b.clientFinalMessage(`r=${nonceOf(b)},s=${salt},i=4096`), /nonce/);
  for (const iterations of ['0', '-1', 'many', '100000000']) {
    const c = client();
    assert.throws(() => c.clientFinalMessage(`r=${nonceOf(c)}x,s=${salt},i=${iterations}`), /iteration/);
  }
});

test('the server refuses a changed channel-binding header or nonce in client-final', () => {
  const verifier = makeVerifier('pw');
  const client = new ScramClient('pw', SCRAM, undefined, false);
  const server = new ScramServer(verifier);
  const serverFirst = server.serverFirstMessage(client.clientFirstMessage());
  const final = client.clientFinalMessage(serverFirst);
  assert.throws(() => server.serverFinalMessage(final.replace(/^c=[^,]+/, `c=${Buffer.from('y,,').toString('base64')}`)), /channel binding/);
  assert.throws(() => server.serverFinalMessage(final.replace(/,r=([^,]+)/, ',r=$1x')), /nonce/);
  assert.throws(() => server.serverFinalMessage('c=biws'), /malformed/);
  assert.throws(() => new ScramServer(verifier).serverFirstMessage('p=tls-server-end-point,,n=*,r=abc'), /channel binding is not supported/);
});

test('SCRAM-SHA-256-PLUS sends the tls-server-end-point hash in its channel binding', () => {
  const binding = randomBytes(32);
  const client = new ScramClient('pw', SCRAM_PLUS, binding, true);
  assert.match(client.clientFirstMessage(), /^p=tls-server-end-point,,n=\*,r=/);
  const nonce = /r=([^,]+)/.exec(client.clientFirstMessage())?.[1] as string;
  const final = client.clientFinalMessage(`r=${nonce}server,s=${randomBytes(16).toString('base64')},i=4096`);
  const c = Buffer.from(/^c=([^,]+)/.exec(final)?.[1] as string, 'base64');
  assert.deepEqual(c, Buffer.concat([Buffer.from('p=tls-server-end-point,,'), binding]));
  // Able to bind but not offered PLUS: "y", which tells a server that does offer it of a downgrade.
  assert.match(new ScramClient('pw', SCRAM, binding, false).clientFirstMessage(), /^y,,/);
  assert.match(new ScramClient('pw', SCRAM, undefined, true).clientFirstMessage(), /^n,,/);
});

test('tls-server-end-point hashes with the certificate signature hash, SHA-256 for SHA-1 (RFC 5929)', async () => {
  const cases: ReadonlyArray<readonly [Parameters<typeof generate>[1], string, string]> = [
    [{ keyType: 'ec', curve: 'P-256', algorithm: 'sha256' }, '2a8648ce3d040302', 'sha256'],
    [{ keyType: 'ec', curve: 'P-384', algorithm: 'sha384' }, '2a8648ce3d040303', 'sha384'],
    [{ keyType: 'ec', curve: 'P-521', algorithm: 'sha512' }, '2a8648ce3d040304', 'sha512'],
    [{ keyType: 'rsa', keySize: 1024, algorithm: 'sha1' }, '2a864886f70d010105', 'sha256'],
    [{ keyType: 'rsa', keySize: 1024, algorithm: 'sha384' }, '2a864886f70d01010c', 'sha384'],
    [{ keyType: 'rsa', keySize: 1024, algorithm: 'sha512' }, '2a864886f70d01010d', 'sha512'],
  ];
  const generated = await Promise.all(cases.map(([options]) => generate([{ name: 'commonName', value: 'localhost' }], options)));
  for (const [i, [, oid, hash]] of cases.entries()) {
    const der = new X509Certificate((generated[i] as { cert: string }).cert).raw;
    assert.ok(der.toString('hex').includes(`06${(oid.length / 2).toString(16).padStart(2, '0')}${oid}`), `fixture signed with OID ${oid}`);
    assert.deepEqual(tlsServerEndPoint(der), createHash(hash).update(der).digest(), `${oid} -> ${hash}`);
  }
  // The test server's own certificate, which the upstream tests bind to.
  const serverDer = new X509Certificate(db.ca.serverCertPem).raw;
  assert.deepEqual(tlsServerEndPoint(serverDer), createHash('sha256').update(serverDer).digest());
});

test("the MD5 response matches Postgres' stored md5 hash", async () => {
  const stored = await storedPassword(db.md5Role);
  assert.match(stored, /^md5[0-9a-f]{32}$/);
  const salt = randomBytes(4);
  const expected = 'md5' + createHash('md5').update(Buffer.concat([Buffer.from(stored.slice(3)), salt])).digest('hex');
  assert.equal(md5PasswordResponse(db.md5Role, db.md5Password, salt), expected);
  assert.notEqual(md5PasswordResponse(db.md5Role, db.md5Password + 'x', salt), expected);
});

test('PBKDF2 runs once per password and server salt: later SCRAM logins and password checks reuse the keys, and a wrong password still fails', async () => {
  const target = { host: 'localhost', port: db.port, sslMode: 'verify-full' as const, rootCert: Buffer.from(db.ca.caPem), connectTimeoutMs: 10000, keepAliveMs: 0 };
  const login = async (password: string): Promise<void> => {
    const session = await connectUpstream(target, db.scramRole, password, new Map([['database', db.database]]));
    session.socket.destroy();
  };
  // A password (and so a salt) no earlier test used: the first login must derive.
  const password = `fresh-${randomBytes(8).toString('hex')}`;
  await db.query(`alter role ${quoteIdent(db.scramRole)} password ${quoteLiteral(password)}`);
  try {
    const before = keyDerivations();
    await login(password);
    assert.equal(keyDerivations(), before + 1, 'the first SCRAM login derives the keys');
    await login(password);
    await login(password);
    assert.equal(keyDerivations(), before + 1, 'the next logins with the same password and salt do not');
    await assert.rejects(login(password + 'x'), /password authentication failed/);
    assert.equal(keyDerivations(), before + 2, 'another password is derived on its own');
  } finally {
    await db.query(`alter role ${quoteIdent(db.scramRole)} password ${quoteLiteral(db.scramPassword)}`);
  }

  const verifier = makeVerifier('right');
  const afterVerifier = keyDerivations();
  assert.equal(verifyPassword(verifier, 'right'), true);
  assert.equal(verifyPassword(verifier, 'right'), true);
  assert.equal(verifyPassword(verifier, 'wrong'), false);
  assert.equal(verifyPassword(verifier, 'wrong'), false, 'a cached wrong password stays wrong');
  assert.equal(keyDerivations(), afterVerifier + 1, "makeVerifier's keys served both checks of the right password; the wrong one was derived once");
});
