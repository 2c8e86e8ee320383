/**
 * The client side of the startup, seen from raw sockets and from the pg client: encryption
 * negotiation, malformed packets, the startup timeout, protocol negotiation and local client
 * authentication. Every session that gets through logs in to a real Postgres over TLS.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { connect as netConnect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Duplex } from 'node:stream';
import { connect as tlsConnect, TLSSocket } from 'node:tls';
import fc from 'fast-check';
import pg from 'pg';
import { serialize } from 'pg-protocol';
import { BIN, connectionFor, proxyClient, startProxy, type InProcessProxy } from './harness/proxy.js';
import { startTokenPostgres, type TestPostgres } from './harness/postgres.js';
import { parseFields } from '../src/wire/backend-messages.js';

const SSL_REQUEST = 80877103;
const GSSENC_REQUEST = 80877104;
const CANCEL_REQUEST = 80877102;
const STARTUP_TIMEOUT_MS = 400;
const TLS_STARTUP_TIMEOUT_MS = 1000;

let db: TestPostgres;
let usersDir: string;
let usersFile: string;
/** Trust, no client TLS, a short startup timeout. */
let plain: InProcessProxy;
/** Trust, with client TLS, a startup timeout a little longer (a TLS handshake under load). */
let tls: InProcessProxy;
/** scram-sha-256 against the users file, with client TLS offered. */
let scram: InProcessProxy;
/** password against the users file, a short startup timeout. */
let password: InProcessProxy;
const token = 'tok-' + randomBytes(24).toString('base64url');
const alicePassword = 'alice-' + randomBytes(9).toString('base64url');

before(async () => {
  db = await startTokenPostgres(token);
  // One user by cleartext password, one by the SCRAM verifier Postgres itself stored.
  const [row] = await db.query<{ v: string }>('select rolpassword as v from pg_authid where rolname = $1', [db.scramRole]);
  usersDir = mkdtempSync(join(tmpdir(), 'lbp-startup-'));
  usersFile = join(usersDir, 'users');
  writeFileSync(usersFile, `# local users\nalice:${alicePassword}\n\nbob:${row?.v}\n`, { mode: 0o600 });
  const conn = ['--connection', connectionFor(db, token)];
  const tlsFlags = ['--tls-cert', db.ca.serverCertFile, '--tls-key', db.ca.serverKeyFile];
  [plain, tls, scram, password] = await Promise.all([
    startProxy([...conn, '--startup-timeout', String(STARTUP_TIMEOUT_MS)]),
    startProxy([...conn, ...tlsFlags, '--startup-timeout', String(TLS_STARTUP_TIMEOUT_MS)]),
    startProxy([...conn, ...tlsFlags, '--client-auth', 'scram-sha-256', '--client-users', usersFile]),
    startProxy([...conn, '--client-auth', 'password', '--client-users', usersFile, '--startup-timeout', String(STARTUP_TIMEOUT_MS)]),
  ]);
});

after(async () => {
  await Promise.all([plain, tls, scram, password].map((p) => p?.close()));
  await db?.stop();
  if (usersDir) rmSync(usersDir, { recursive: true, force: true });
});

// ---------------------------------------------------------------------------------------------
// A raw Postgres client: bytes out, bytes and typed messages in, each read bounded in time.

interface Message {
  readonly type: string;
  readonly body: Buffer;
}

class Wire {
  #buffer = Buffer.alloc(0);
  #ended = false;
  #wake: (() => void) | undefined;
  readonly closed: Promise<void>;
  readonly #onData = (chunk: Buffer): void => {
    this.#buffer = Buffer.concat([this.#buffer, chunk]);
    this.#wake?.();
  };

  constructor(readonly socket: Duplex) {
    socket.on('data', this.#onData);
    socket.on('error', () => {});
    this.closed = new Promise((resolve) =>
      socket.once('close', () => {
        this.#ended = true;
        this.#wake?.();
        resolve();
      }),
    );
  }

  static async connect(port: number): Promise<Wire> {
    const socket = netConnect({ host: '127.0.0.1', port });
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', reject);
    });
    return new Wire(socket);
  }

  get buffered(): number {
    return this.#buffer.length;
  }

  write(bytes: Buffer): void {
    this.socket.write(bytes);
  }

  /** Resolves once `n` bytes are buffered; false if the peer closed first. */
  async #need(n: number, timeoutMs: number): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (this.#buffer.length < n) {
      if (this.#ended) return false;
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${n} bytes (have ${this.#buffer.length})`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.#wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.#wake = undefined;
    }
    return true;
  }

  #take(n: number): Buffer {
    const out = this.#buffer.subarray(0, n);
    this.#buffer = this.#buffer.subarray(n);
    return out;
  }

  /** The one-byte answer to an SSLRequest or GSSENCRequest. */
  async answer(timeoutMs = 3000): Promise<string> {
    assert.ok(await this.#need(1, timeoutMs), 'closed before answering');
    return this.#take(1).toString('latin1');
  }

  /** The next typed message, or undefined when the peer closed. */
  async message(timeoutMs = 3000): Promise<Message | undefined> {
    if (!(await this.#need(5, timeoutMs))) {
      assert.equal(this.#buffer.length, 0, 'closed in the middle of a message header');
      return undefined;
    }
    const length = this.#buffer.readInt32BE(1);
    assert.ok(await this.#need(1 + length, timeoutMs), 'closed in the middle of a message');
    const message = this.#take(1 + length);
    return { type: String.fromCharCode(message[0] as number), body: Buffer.from(message.subarray(5)) };
  }

  /** Messages up to and including the first of type `type`. */
  async until(type: string, timeoutMs = 3000): Promise<Message[]> {
    const out: Message[] = [];
    for (;;) {
      const m = await this.message(timeoutMs);
      assert.ok(m, `closed before "${type}"; got ${out.map((x) => x.type).join('')}: ${describe(out)}`);
      out.push(m);
      if (m.type === type) return out;
    }
  }

  /** Every message until the peer closes. */
  async rest(timeoutMs = 3000): Promise<Message[]> {
    const out: Message[] = [];
    for (let m = await this.message(timeoutMs); m; m = await this.message(timeoutMs)) out.push(m);
    await this.closed;
    return out;
  }

  /** Stops reading this socket (to wrap it in TLS); there must be nothing buffered. */
  detach(): Duplex {
    assert.equal(this.#buffer.length, 0, 'bytes after the one-byte answer');
    this.socket.off('data', this.#onData);
    return this.socket;
  }

  destroy(): void {
    this.socket.destroy();
  }
}

function describe(messages: readonly Message[]): string {
  return messages
    .filter((m) => m.type === 'E')
    .map((m) => JSON.stringify(Object.fromEntries(parseFields(m.body))))
    .join(' ');
}

function int32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeInt32BE(n);
  return b;
}

/** An untyped startup-phase packet: length, then `body`. */
function packet(body: Buffer): Buffer {
  return Buffer.concat([int32(4 + body.length), body]);
}

function startupPacket(parameters: Record<string, string>, major = 3, minor = 0): Buffer {
  const pairs = Object.entries(parameters).flatMap(([k, v]) => [Buffer.from(`${k}\0${v}\0`, 'utf8')]);
  return packet(Buffer.concat([int32((major << 16) | minor), ...pairs, Buffer.from([0])]));
}

const sslRequest = packet(int32(SSL_REQUEST));
const gssencRequest = packet(int32(GSSENC_REQUEST));

function errorOf(messages: readonly Message[]): Record<string, string> {
  const errors = messages.filter((m) => m.type === 'E');
  assert.equal(errors.length, 1, `expected one ErrorResponse, got ${messages.map((m) => m.type).join('') || 'nothing'}`);
  return Object.fromEntries(parseFields((errors[0] as Message).body));
}

/** After AuthenticationOk: the greeting up to ReadyForQuery, a query, Terminate. */
async function expectWorkingSession(wire: Wire): Promise<Message[]> {
  const greeting = await wire.until('Z', 10000);
  assert.deepEqual(greeting.filter((m) => m.type === 'E'), [], describe(greeting));
  wire.write(serialize.query('select current_user'));
  const reply = await wire.until('Z', 10000);
  const row = reply.find((m) => m.type === 'D');
  assert.ok(row, `no DataRow in ${reply.map((m) => m.type).join('')}: ${describe(reply)}`);
  assert.ok(row.body.includes(Buffer.from(db.tokenRole)), 'the session runs as the token identity');
  wire.write(serialize.end());
  await wire.closed;
  return greeting;
}

async function authOk(wire: Wire): Promise<void> {
  const m = await wire.message();
  assert.ok(m, 'closed instead of authenticating');
  assert.equal(m.type, 'R', describe([m]));
  assert.equal(m.body.readInt32BE(0), 0, 'AuthenticationOk');
}

async function pgQuery(proxy: InProcessProxy, config: Partial<pg.ClientConfig> = {}): Promise<string> {
  const c = proxyClient(proxy.port, db, config);
  await c.connect();
  try {
    return (await c.query('select current_user as u')).rows[0].u as string;
  } finally {
    await c.end();
  }
}

async function pgError(proxy: InProcessProxy, config: Partial<pg.ClientConfig>): Promise<pg.DatabaseError> {
  try {
    await pgQuery(proxy, config);
  } catch (error) {
    return error as pg.DatabaseError;
  }
  assert.fail('the connection should have been refused');
}

async function noOpenConnections(proxy: InProcessProxy): Promise<void> {
  for (let i = 0; i < 50 && proxy.server.connections > 0; i++) await new Promise((r) => setTimeout(r, 20));
  assert.equal(proxy.server.connections, 0, 'every refused connection is closed by the proxy');
}

// ---------------------------------------------------------------------------------------------
// Encryption negotiation

/** Sends each encryption request, expects N to each, then a plaintext startup and a working session. */
async function refusedThenSession(requests: Buffer[], parameters: Record<string, string>): Promise<void> {
  const wire = await Wire.connect(plain.port);
  for (const request of requests) {
    wire.write(request);
    assert.equal(await wire.answer(), 'N');
  }
  wire.write(startupPacket(parameters));
  await authOk(wire);
  await expectWorkingSession(wire);
}

test('SSLRequest is answered N without client TLS, then a plaintext startup works', async () => {
  await refusedThenSession([sslRequest], { user: 'anyone', database: db.database });
});

test('GSSENCRequest is answered N, then a normal startup works; so does GSS, then SSL, then startup (libpq order)', async () => {
  await refusedThenSession([gssencRequest], { user: 'anyone' });
  await refusedThenSession([gssencRequest, sslRequest], { user: 'anyone' });
});

test('with --tls-cert/--tls-key, GSSENCRequest gets N and SSLRequest upgrades; the startup runs inside TLS', async () => {
  const wire = await Wire.connect(tls.port);
  wire.write(gssencRequest);
  assert.equal(await wire.answer(), 'N');
  wire.write(sslRequest);
  assert.equal(await wire.answer(), 'S');
  const secure = tlsConnect({ socket: wire.detach() as Socket, ca: db.ca.caPem, servername: 'localhost' });
  await new Promise<void>((resolve, reject) => {
    secure.once('secureConnect', resolve);
    secure.once('error', reject);
  });
  assert.ok(secure.authorized, 'the proxy presents the configured certificate');
  const inner = new Wire(secure);
  inner.write(startupPacket({ user: 'anyone' }));
  await authOk(inner);
  await expectWorkingSession(inner);
});

test('the pg client with ssl verifies the proxy certificate and runs over TLS', async () => {
  const c = new pg.Client({ host: '127.0.0.1', port: tls.port, user: 'anyone', database: db.database, ssl: { ca: db.ca.caPem } });
  await c.connect();
  try {
    const stream = (c as unknown as { connection: { stream: Duplex } }).connection.stream;
    assert.ok(stream instanceof TLSSocket, 'the client socket is a TLS socket');
    assert.equal(stream.authorized, true);
    assert.equal(stream.getPeerCertificate().subject?.CN, 'localhost');
    assert.equal((await c.query('select current_user as u')).rows[0].u, db.tokenRole);
  } finally {
    await c.end();
  }
  // Without TLS configured the pg client is told the server does not do SSL.
  await assert.rejects(pgQuery(plain, { ssl: { ca: db.ca.caPem } }), /does not support SSL/);
});

test('a second SSLRequest inside TLS is a protocol violation', async () => {
  const wire = await Wire.connect(tls.port);
  wire.write(sslRequest);
  assert.equal(await wire.answer(), 'S');
  const secure = tlsConnect({ socket: wire.detach() as Socket, ca: db.ca.caPem, servername: 'localhost' });
  await new Promise<void>((resolve, reject) => {
    secure.once('secureConnect', resolve);
    secure.once('error', reject);
  });
  const inner = new Wire(secure);
  inner.write(sslRequest);
  assert.equal(errorOf(await inner.rest()).C, '08P01');
});

// ---------------------------------------------------------------------------------------------
// Malformed startups: one ErrorResponse with the SQLSTATE Postgres uses, then the proxy closes.

const bigStartup = (total: number): Buffer => {
  const base = startupPacket({ user: 'anyone', application_name: '' });
  return startupPacket({ user: 'anyone', application_name: 'x'.repeat(total - base.length) });
};

const malformed: ReadonlyArray<readonly [string, Buffer, string]> = [
  ['a length of 3', Buffer.concat([int32(3), int32(196608)]), '08P01'],
  ['a length of 0', int32(0), '08P01'],
  ['a negative length', Buffer.concat([int32(-8), int32(196608)]), '08P01'],
  ['a length of 2 GB', Buffer.concat([int32(0x7fffffff), int32(196608)]), '08P01'],
  ['a startup packet of 10,005 bytes (a payload of 10,001)', bigStartup(10005), '08P01'],
  ['protocol 2.0', startupPacket({ user: 'anyone' }, 2, 0), '0A000'],
  ['protocol 4.0', startupPacket({ user: 'anyone' }, 4, 0), '0A000'],
  ['protocol 1234.5677 (next to the CancelRequest code)', startupPacket({ user: 'anyone' }, 1234, 5677), '0A000'],
  ['no user', startupPacket({ database: 'databricks_postgres' }), '28000'],
  ['an empty user', startupPacket({ user: '' }), '28000'],
  ['a parameter without terminator', packet(Buffer.concat([int32(196608), Buffer.from('user\0anyone')])), '08P01'],
  ['bytes after the terminator', packet(Buffer.concat([int32(196608), Buffer.from('user\0anyone\0\0junk')])), '08P01'],
  ['an SSLRequest with a payload', packet(Buffer.concat([int32(SSL_REQUEST), int32(0)])), '08P01'],
  ['a GSSENCRequest with a payload', packet(Buffer.concat([int32(GSSENC_REQUEST), Buffer.from([1])])), '08P01'],
  ['a cancel request that is too short', packet(Buffer.concat([int32(CANCEL_REQUEST), int32(1)])), '08P01'],
  ['data after the SSLRequest, before the answer', Buffer.concat([sslRequest, startupPacket({ user: 'anyone' })]), '08P01'],
  ['data after the GSSENCRequest, before the answer', Buffer.concat([gssencRequest, startupPacket({ user: 'anyone' })]), '08P01'],
];

for (const [name, bytes, sqlstate] of malformed) {
  test(`malformed startup, ${name}: ErrorResponse ${sqlstate}, closed, the proxy serves the next client`, async () => {
    const wire = await Wire.connect(plain.port);
    wire.write(bytes);
    const error = errorOf(await wire.rest());
    assert.equal(error.C, sqlstate, error.M);
    assert.equal(error.S, 'FATAL');
    assert.ok(error.M && error.M.length > 0);
    await noOpenConnections(plain);
    assert.equal(await pgQuery(plain), db.tokenRole);
  });
}

test('data after the SSLRequest is refused also when client TLS is configured (CVE-2021-23222)', async () => {
  const wire = await Wire.connect(tls.port);
  wire.write(Buffer.concat([sslRequest, startupPacket({ user: 'anyone' })]));
  const error = errorOf(await wire.rest());
  assert.equal(error.C, '08P01');
  assert.match(error.M ?? '', /unencrypted data after SSL request/);
});

test('a startup packet of 10,004 bytes (a payload of 10,000, as Postgres allows) is accepted', async () => {
  const bytes = bigStartup(10004);
  assert.equal(bytes.length, 10004);
  const wire = await Wire.connect(plain.port);
  wire.write(bytes);
  await authOk(wire);
  wire.destroy();
});

/** Resolves with the milliseconds until the proxy closed the connection. */
async function droppedAfter(wire: Wire, started: number): Promise<number> {
  await Promise.race([wire.closed, new Promise((_, reject) => setTimeout(() => reject(new Error('not dropped')), 5000))]);
  return Date.now() - started;
}

test('a client that sends nothing, half a packet, or stops inside the TLS upgrade is dropped after --startup-timeout', async () => {
  const stalls = [Buffer.alloc(0), startupPacket({ user: 'anyone' }).subarray(0, 9)].map(async (bytes) => {
    const started = Date.now();
    const wire = await Wire.connect(plain.port);
    if (bytes.length > 0) wire.write(bytes);
    return droppedAfter(wire, started);
  });
  const inTls = (async () => {
    const started = Date.now();
    const wire = await Wire.connect(tls.port);
    wire.write(sslRequest);
    assert.equal(await wire.answer(), 'S');
    return droppedAfter(wire, started); // no ClientHello
  })();
  const elapsed = await Promise.all([...stalls, inTls]);
  const limits = [STARTUP_TIMEOUT_MS, STARTUP_TIMEOUT_MS, TLS_STARTUP_TIMEOUT_MS];
  for (const [i, name] of ['nothing', 'half a packet', 'TLS upgrade'].entries()) {
    const [ms, limit] = [elapsed[i] as number, limits[i] as number];
    assert.ok(ms >= limit - 50 && ms < limit + 2000, `${name}: dropped after ${ms} ms`);
  }
  assert.ok(plain.logs.some((l) => l.msg === 'client did not complete its startup in time; dropped'));
  assert.equal(await pgQuery(plain), db.tokenRole);
  assert.equal(await pgQuery(tls, { ssl: { ca: db.ca.caPem } }), db.tokenRole);
});

test('a client that stalls in its password exchange is dropped after --startup-timeout', async () => {
  const wire = await Wire.connect(password.port);
  wire.write(startupPacket({ user: 'alice' }));
  const request = await wire.message();
  assert.equal(request?.type, 'R');
  assert.equal(request?.body.readInt32BE(0), 3, 'AuthenticationCleartextPassword');
  const started = Date.now();
  await Promise.race([wire.closed, new Promise((_, reject) => setTimeout(() => reject(new Error('not dropped')), 5000))]);
  assert.ok(Date.now() - started < STARTUP_TIMEOUT_MS + 2000);
});

test('random and mutated startup bytes never crash the proxy', async () => {
  const valid = startupPacket({ user: 'anyone', database: 'fuzz' });
  const bytes = fc.oneof(
    fc.uint8Array({ maxLength: 64 }),
    fc.tuple(fc.integer({ min: 0, max: valid.length - 1 }), fc.uint8Array({ minLength: 1, maxLength: 4 }), fc.integer({ min: 1, max: valid.length })).map(
      ([at, patch, cut]) => {
        const b = Buffer.from(valid);
        Buffer.from(patch).copy(b, at);
        return b.subarray(0, cut);
      },
    ),
    fc.constantFrom(sslRequest, gssencRequest).chain((first) => fc.uint8Array({ maxLength: 32 }).map((rest) => Buffer.concat([first, rest]))),
  );
  await fc.assert(
    fc.asyncProperty(bytes, async (input) => {
      const wire = await Wire.connect(plain.port);
      wire.write(Buffer.from(input));
      wire.socket.end();
      await Promise.race([wire.closed, new Promise((_, reject) => setTimeout(() => reject(new Error('connection left open')), 5000))]);
    }),
    { numRuns: 150 },
  );
  await noOpenConnections(plain);
  assert.equal(await pgQuery(plain), db.tokenRole);
});

// ---------------------------------------------------------------------------------------------
// Protocol version negotiation

test('protocol 3.2 with a _pq_ option gets NegotiateProtocolVersion (3.0, the option) and a working 3.0 session', async () => {
  const wire = await Wire.connect(plain.port);
  wire.write(startupPacket({ user: 'anyone', '_pq_.x': 'on', database: db.database }, 3, 2));
  const negotiate = await wire.message();
  assert.equal(negotiate?.type, 'v');
  const body = (negotiate as Message).body;
  assert.equal(body.readInt32BE(0), 0, 'newest minor version supported: 3.0');
  assert.equal(body.readInt32BE(4), 1, 'one option not recognized');
  assert.equal(body.toString('utf8', 8), '_pq_.x\0');
  await authOk(wire);
  const greeting = await expectWorkingSession(wire);
  const key = greeting.find((m) => m.type === 'K');
  assert.equal(key?.body.length, 8, 'a protocol 3.0 BackendKeyData: 4-byte key');
});

test('protocol 3.2 without options also negotiates down; protocol 3.0 gets no NegotiateProtocolVersion', async () => {
  const newer = await Wire.connect(plain.port);
  newer.write(startupPacket({ user: 'anyone' }, 3, 2));
  const negotiate = await newer.message();
  assert.equal(negotiate?.type, 'v');
  assert.equal(negotiate?.body.readInt32BE(0), 0);
  assert.equal(negotiate?.body.readInt32BE(4), 0);
  await authOk(newer);
  await expectWorkingSession(newer);

  const current = await Wire.connect(plain.port);
  current.write(startupPacket({ user: 'anyone' }));
  await authOk(current);
  await expectWorkingSession(current);
});

// ---------------------------------------------------------------------------------------------
// Client authentication

test('--client-auth scram-sha-256: the right password works, a wrong one and an unknown user get 28P01', async () => {
  assert.equal(await pgQuery(scram, { user: 'alice', password: alicePassword }), db.tokenRole);
  // bob's line is the verifier Postgres stored for the SCRAM role: its password works here too.
  assert.equal(await pgQuery(scram, { user: 'bob', password: db.scramPassword }), db.tokenRole);
  const wrong = await pgError(scram, { user: 'alice', password: alicePassword + 'x' });
  assert.equal(wrong.code, '28P01');
  assert.match(wrong.message, /password authentication failed for user "alice"/);
  const unknown = await pgError(scram, { user: 'mallory', password: alicePassword });
  assert.equal(unknown.code, '28P01');
  assert.match(unknown.message, /password authentication failed for user "mallory"/);
  assert.ok(!scram.logText().includes(alicePassword), 'no password in the log');
});

test('--client-auth scram-sha-256 over TLS: a channel-binding-capable client (gs2 flag y) logs in', async () => {
  const config = { user: 'alice', password: alicePassword, ssl: { ca: db.ca.caPem }, enableChannelBinding: true };
  assert.equal(await pgQuery(scram, config), db.tokenRole);
});

test('--client-auth scram-sha-256: a client choosing SCRAM-SHA-256-PLUS or another mechanism is refused', async () => {
  const initial = (mechanism: string, data: string): Buffer => serialize.sendSASLInitialResponseMessage(mechanism, data);
  for (const [mechanism, sqlstate] of [
    ['SCRAM-SHA-256-PLUS', '28000'],
    ['PLAIN', '28000'],
  ] as const) {
    const wire = await Wire.connect(scram.port);
    wire.write(startupPacket({ user: 'alice' }));
    assert.equal((await wire.message())?.body.readInt32BE(0), 10, 'AuthenticationSASL');
    wire.write(initial(mechanism, 'p=tls-server-end-point,,n=*,r=abc'));
    assert.equal(errorOf(await wire.rest()).C, sqlstate, mechanism);
  }
  // The right mechanism with a channel-binding flag the proxy does not offer.
  const wire = await Wire.connect(scram.port);
  wire.write(startupPacket({ user: 'alice' }));
  await wire.message();
  wire.write(initial('SCRAM-SHA-256', 'p=tls-server-end-point,,n=*,r=abc'));
  assert.equal(errorOf(await wire.rest()).C, '08P01');
});

test('--client-auth password: the right password works, a wrong one and an unknown user get 28P01', async () => {
  assert.equal(await pgQuery(password, { user: 'alice', password: alicePassword }), db.tokenRole);
  assert.equal(await pgQuery(password, { user: 'bob', password: db.scramPassword }), db.tokenRole);
  const wrong = await pgError(password, { user: 'alice', password: 'nope' });
  assert.equal(wrong.code, '28P01');
  const unknown = await pgError(password, { user: 'mallory', password: alicePassword });
  assert.equal(unknown.code, '28P01');
  assert.ok(!password.logText().includes(alicePassword), 'no password in the log');
});

test('--client-auth password: a message other than a password during authentication is 08P01', async () => {
  const wire = await Wire.connect(password.port);
  wire.write(startupPacket({ user: 'alice' }));
  assert.equal((await wire.message())?.body.readInt32BE(0), 3);
  wire.write(serialize.query('select 1'));
  assert.equal(errorOf(await wire.rest()).C, '08P01');
});

test('trust on a non-loopback address is refused at start-up with a message naming ClientAuth', async () => {
  const base = ['--connection', connectionFor(db, token), '--address', '0.0.0.0', '--port', '0', '--log-format', 'json'];
  await assert.rejects(startProxy([...base, '--client-auth', 'trust']), /^ConfigError: ClientAuth \(from [^)]+\): trust on the non-loopback address 0\.0\.0\.0/);
  // Without --client-auth a non-loopback listener wants scram-sha-256, so it needs local users.
  await assert.rejects(startProxy(base), /ClientUsers: missing: --client-auth scram-sha-256 needs a file of local users/);

  const child = spawn(process.execPath, [BIN, ...base, '--client-auth', 'trust'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  let stdout = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  const timer = setTimeout(() => child.kill('SIGKILL'), 10000);
  const code = await new Promise<number | null>((resolve) => child.once('exit', resolve));
  clearTimeout(timer);
  assert.equal(code, 1, stdout + stderr);
  assert.equal(stdout, '');
  assert.equal(stderr.trim().split('\n').length, 1, stderr);
  assert.match(stderr, /^lakebase-proxy: ClientAuth .*0\.0\.0\.0.*--client-auth scram-sha-256/);
  assert.ok(!stderr.includes(token), 'the token is not shown');
});
