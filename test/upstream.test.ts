/**
 * The upstream login, against a real Postgres over TLS and against small stand-ins for broken
 * upstreams: what the client sees when the token is wrong or expired, when the upstream is down,
 * silent or lying about TLS, when its certificate does not verify, and when it goes away mid-session;
 * SCRAM-SHA-256-PLUS, MD5, SNI and the startup parameters that reach the server. With PoolMode=none:
 * every client logs in (pooled logins are in pool.test.ts).
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import dns from 'node:dns';
import { readFileSync } from 'node:fs';
import { connect as netConnect, createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { connect as tlsConnect, createSecureContext, TLSSocket, type SecureContext } from 'node:tls';
import pg from 'pg';
import { serialize } from 'pg-protocol';
import { generate } from 'selfsigned';
import { CA_FILES, untrustedCert } from './harness/certs.js';
import type { TestPostgres } from './harness/postgres.js';
import { connectionFor, proxyClient, startProxiedPostgres, startProxy, type InProcessProxy } from './harness/proxy.js';
import { FrameReader } from '../src/wire/frame-reader.js';

let db: TestPostgres;
/** The token role with the right token. */
let proxy: InProcessProxy;
let close: () => Promise<void>;
const token = 'tok-' + randomBytes(600).toString('base64url');

before(async () => ({ db, proxy, close } = await startProxiedPostgres(token, ['--pool-mode', 'none'])));
after(() => close?.());

/** pg's end() never settles on a client whose connection already broke: bound it. */
async function endQuietly(c: pg.Client): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([c.end().catch(() => {}), new Promise<void>((resolve) => (timer = setTimeout(resolve, 1000)))]);
  clearTimeout(timer);
}

async function currentUser(port: number): Promise<string> {
  const c = proxyClient(port, db);
  await c.connect();
  try {
    return (await c.query('select current_user as u')).rows[0].u as string;
  } finally {
    await c.end();
  }
}

/** The error the pg client gets when connecting through the proxy on `port`. */
async function loginError(port: number): Promise<pg.DatabaseError> {
  const c = proxyClient(port, db);
  try {
    await c.connect();
  } catch (error) {
    return error as pg.DatabaseError;
  } finally {
    await endQuietly(c);
  }
  assert.fail('the login should have failed');
}

async function withProxy<T>(connection: string, fn: (p: InProcessProxy) => Promise<T>, flags: string[] = []): Promise<T> {
  const p = await startProxy(['--connection', connection, '--pool-mode', 'none', ...flags]);
  try {
    return await fn(p);
  } finally {
    await p.close();
  }
}

/** A connection string for the test server with a fixed password instead of a token. */
function passwordConnection(user: string, password: string, extra = ''): string {
  return `Server=localhost;Port=${db.port};User=${user};Password=${password};SSLRootCert=${db.ca.caFile};Database=${db.database}${extra ? ';' + extra : ''}`;
}

// ---------------------------------------------------------------------------------------------
// Stand-ins: a TLS relay in front of the test server, and scripted broken upstreams.

interface Listening {
  readonly port: number;
  close(): Promise<void>;
}

function listen(server: Server): Promise<number> {
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve((server.address() as { port: number }).port)));
}

function closeServer(server: Server, sockets: Set<Socket>): Promise<void> {
  for (const s of sockets) s.destroy();
  return new Promise((resolve) => server.close(() => resolve()));
}

/** Reads the 8-byte SSLRequest a proxy sends first. */
function sslRequestFrom(socket: Socket): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    socket.once('data', (chunk: Buffer) => {
      socket.pause();
      resolve(chunk);
    });
    socket.once('error', reject);
  });
}

interface TlsRelay extends Listening {
  /** The SNI each connection asked for (false: none). */
  readonly servernames: Array<string | false>;
  /** Each relayed connection: the proxy's raw socket, then the server side, to break one on purpose. */
  readonly pairs: Array<[Socket, TLSSocket]>;
}

/**
 * Terminates the proxy's TLS with `context` and opens its own TLS session to the test server:
 * a man in the middle, transparent to passwords, visible to channel binding.
 */
async function startTlsRelay(context: SecureContext): Promise<TlsRelay> {
  const sockets = new Set<Socket>();
  const servernames: Array<string | false> = [];
  const pairs: Array<[Socket, TLSSocket]> = [];
  const server = createServer(async (raw) => {
    sockets.add(raw);
    raw.on('error', () => {});
    await sslRequestFrom(raw);
    raw.write('S');
    const front = new TLSSocket(raw, { isServer: true, secureContext: context });
    front.on('error', () => {});
    await new Promise((resolve) => front.once('secure', resolve));
    servernames.push((front as TLSSocket & { servername: string | false }).servername);
    const backRaw = netConnect({ host: '127.0.0.1', port: db.port });
    sockets.add(backRaw);
    backRaw.on('error', () => {});
    backRaw.write(serialize.requestSsl());
    await sslRequestFrom(backRaw);
    const back = tlsConnect({ socket: backRaw, rejectUnauthorized: false });
    back.on('error', () => {});
    await new Promise((resolve) => back.once('secureConnect', resolve));
    pairs.push([raw, back]);
    front.pipe(back);
    back.pipe(front);
    for (const [a, b] of [
      [front, back],
      [back, front],
    ] as const) {
      a.on('close', () => b.destroy());
    }
  });
  const port = await listen(server);
  return { port, servernames, pairs, close: () => closeServer(server, sockets) };
}

type Script = (socket: Socket) => void | Promise<void>;

/** A TCP server that runs `script` on each connection. */
async function startScripted(script: Script): Promise<Listening> {
  const sockets = new Set<Socket>();
  const server = createServer((socket) => {
    sockets.add(socket);
    socket.on('error', () => {});
    void script(socket);
  });
  const port = await listen(server);
  return { port, close: () => closeServer(server, sockets) };
}

/** Accepts the SSLRequest and TLS (with the test CA's localhost certificate), then runs `after` on the startup. */
function tlsThen(after: (tls: TLSSocket) => void): Script {
  return async (socket) => {
    await sslRequestFrom(socket);
    socket.write('S');
    const tls = new TLSSocket(socket, {
      isServer: true,
      secureContext: createSecureContext({ cert: db.ca.serverCertPem, key: db.ca.serverKeyPem }),
    });
    tls.on('error', () => {});
    tls.once('data', () => after(tls));
  };
}

function message(type: string, body: Buffer): Buffer {
  const head = Buffer.alloc(5);
  head.write(type, 0, 'latin1');
  head.writeInt32BE(4 + body.length, 1);
  return Buffer.concat([head, body]);
}

async function freePort(): Promise<number> {
  const server = createServer();
  const port = await listen(server);
  await new Promise((resolve) => server.close(resolve));
  return port;
}

function standIn(port: number, extra = ''): string {
  return `Server=localhost;Port=${port};User=${db.tokenRole};OAuthAccessToken=${token};SSLRootCert=${db.ca.caFile}${extra ? ';' + extra : ''}`;
}

// ---------------------------------------------------------------------------------------------
// Authentication failures

test('a wrong token: the client sees 28P01 with the upstream message and the proxy context; no token in the log', async () => {
  const wrong = 'wrong-' + randomBytes(40).toString('base64url');
  await withProxy(connectionFor(db, wrong), async (p) => {
    const error = await loginError(p.port);
    assert.equal(error.code, '28P01');
    assert.equal(error.message, `password authentication failed for user "${db.tokenRole}"`, 'the upstream message, unchanged');
    assert.equal(error.severity, 'FATAL');
    assert.match(error.where ?? '', new RegExp(`^lakebase-proxy: login to localhost:${db.port} database "${db.database}" as "${db.tokenRole.replace(/\./g, '\\.')}"`));
    const failed = p.logs.find((l) => l.msg === 'upstream login failed');
    assert.equal(failed?.sqlstate, '28P01');
    const text = p.logText();
    assert.ok(!text.includes(wrong) && !text.includes(token), 'no token in the log');
    assert.ok(!JSON.stringify(error).includes(wrong), 'no token in what the client sees');
  });
});

test('an expired token (VALID UNTIL in the past) gets 28P01', async () => {
  await db.setTokenPassword(token, new Date(Date.now() - 60_000));
  try {
    const error = await loginError(proxy.port);
    assert.equal(error.code, '28P01');
    assert.match(db.logTail(4096), /has an expired password/, 'refused for its expiry, not for another reason');
  } finally {
    await db.setTokenPassword(token);
  }
  assert.equal(await currentUser(proxy.port), db.tokenRole);
});

test("any upstream refusal reaches the client with the upstream's own SQLSTATE (53300 connection limit)", async () => {
  await db.query(`alter role "${db.tokenRole}" connection limit 0`);
  try {
    const error = await loginError(proxy.port);
    assert.equal(error.code, '53300');
    assert.match(error.message, /too many connections for role/);
    assert.match(error.where ?? '', /^lakebase-proxy: login to /);
  } finally {
    await db.query(`alter role "${db.tokenRole}" connection limit -1`);
  }
});

test('a static JWT past its exp claim is refused by the proxy itself with 28000', async () => {
  const part = (o: object): string => Buffer.from(JSON.stringify(o)).toString('base64url');
  const jwt = `${part({ alg: 'none' })}.${part({ exp: Math.floor(Date.now() / 1000) - 60 })}.sig`;
  await db.setTokenPassword(jwt);
  try {
    await withProxy(connectionFor(db, jwt), async (p) => {
      const error = await loginError(p.port);
      assert.equal(error.code, '28000');
      assert.match(error.message, /expired/);
      assert.ok(!error.message.includes(jwt) && !p.logText().includes(jwt));
    });
  } finally {
    await db.setTokenPassword(token);
  }
});

// ---------------------------------------------------------------------------------------------
// Connection failures: the client sees 08001 or 08006 with a message naming the upstream.

test('upstream down (connection refused): 08001 naming host:port', async () => {
  const port = await freePort();
  await withProxy(standIn(port), async (p) => {
    const error = await loginError(p.port);
    assert.equal(error.code, '08001');
    assert.match(error.message, new RegExp(`localhost:${port}`));
    assert.match(error.message, /ECONNREFUSED/);
  });
});

test('upstream down on a host name with IPv4 and IPv6 addresses: the message still says why', async () => {
  // Node reports a failed happy-eyeballs connect as an AggregateError with an empty message.
  const port = await freePort();
  const original = dns.lookup;
  const patched = ((hostname: string, options: unknown, callback: (...args: unknown[]) => void) => {
    if (hostname !== 'dual-stack.test') return (original as (...args: unknown[]) => void)(hostname, options, callback);
    const all = typeof options === 'object' && options !== null && (options as { all?: boolean }).all;
    if (all) callback(null, [{ address: '127.0.0.1', family: 4 }, { address: '::1', family: 6 }]);
    else callback(null, '127.0.0.1', 4);
  }) as typeof dns.lookup;
  dns.lookup = patched;
  try {
    await withProxy(`Server=dual-stack.test;Port=${port};User=x;OAuthAccessToken=t`, async (p) => {
      const error = await loginError(p.port);
      assert.equal(error.code, '08001');
      assert.match(error.message, new RegExp(`dual-stack\\.test:${port}: .*ECONNREFUSED`));
    });
  } finally {
    dns.lookup = original;
  }
});

test('an upstream that accepts and says nothing: 08001 after --connect-timeout, naming host:port', async () => {
  const silent = await startScripted(() => {});
  try {
    await withProxy(
      standIn(silent.port),
      async (p) => {
        const started = Date.now();
        const error = await loginError(p.port);
        assert.equal(error.code, '08001');
        assert.match(error.message, new RegExp(`timed out after 300 ms connecting to upstream localhost:${silent.port}`));
        assert.ok(Date.now() - started < 3000);
      },
      ['--connect-timeout', '300'],
    );
  } finally {
    await silent.close();
  }
});

test('an upstream that goes silent after TLS and the startup: 08001 after --connect-timeout', async () => {
  const silent = await startScripted(tlsThen(() => {}));
  try {
    await withProxy(
      standIn(silent.port),
      async (p) => {
        const error = await loginError(p.port);
        assert.equal(error.code, '08001');
        assert.match(error.message, new RegExp(`localhost:${silent.port}`));
      },
      ['--connect-timeout', '300'],
    );
  } finally {
    await silent.close();
  }
});

test('an upstream that closes at once, refuses TLS, or sends bytes after its S: 08006/08001/08P01 naming it', async () => {
  const cases: Array<[Script, string, RegExp]> = [
    [(s) => void s.destroy(), '08006', /closed the connection/],
    [async (s) => void (await sslRequestFrom(s), s.write('N')), '08001', /refused TLS.*Lakebase requires TLS/],
    [async (s) => void (await sslRequestFrom(s), s.write('SE')), '08P01', /unencrypted data after its SSL answer/],
    [tlsThen((t) => t.destroy()), '08006', /closed the connection during login/],
  ];
  for (const [script, sqlstate, pattern] of cases) {
    const upstream = await startScripted(script);
    try {
      await withProxy(standIn(upstream.port), async (p) => {
        const error = await loginError(p.port);
        assert.equal(error.code, sqlstate, error.message);
        assert.match(error.message, pattern);
        assert.match(error.message, new RegExp(`localhost:${upstream.port}`));
      });
    } finally {
      await upstream.close();
    }
  }
});

test('an upstream asking for an authentication method the proxy lacks (GSSAPI): 28000 naming it', async () => {
  const gss = await startScripted(tlsThen((t) => t.write(message('R', Buffer.from([0, 0, 0, 7])))));
  try {
    await withProxy(standIn(gss.port), async (p) => {
      const error = await loginError(p.port);
      assert.equal(error.code, '28000');
      assert.match(error.message, new RegExp(`upstream localhost:${gss.port} asked for authentication method 7`));
    });
  } finally {
    await gss.close();
  }
});

// ---------------------------------------------------------------------------------------------
// TLS verification

test('a certificate from a CA not in SSLRootCert: 08001 naming the upstream, with the fix in the message', async () => {
  const untrusted = await untrustedCert();
  await withProxy(connectionFor(db, token).replace(db.ca.caFile, untrusted.certFile), async (p) => {
    const error = await loginError(p.port);
    assert.equal(error.code, '08001');
    assert.match(error.message, new RegExp(`TLS handshake with upstream localhost:${db.port} failed: .+ \\(set SSLRootCert`));
  });
});

test('SSLMode=require connects even with an untrusted root', async () => {
  const untrusted = await untrustedCert();
  await withProxy(connectionFor(db, token, 'SSLMode=require').replace(db.ca.caFile, untrusted.certFile), async (p) => {
    assert.equal(await currentUser(p.port), db.tokenRole);
  });
});

test('verify-full checks the host name (verify-ca does not); SNI is the host name, none for an IP', async () => {
  const ca = db.ca;
  const other = await generate([{ name: 'commonName', value: 'other.example' }], {
    keyType: 'ec',
    curve: 'P-256',
    algorithm: 'sha256',
    extensions: [{ name: 'subjectAltName', altNames: [{ type: 2, value: 'other.example' }] }],
    ca: { key: readFileSync(join(ca.dir, CA_FILES.caKey), 'utf8'), cert: ca.caPem },
  });
  const wrongName = await startTlsRelay(createSecureContext({ cert: other.cert, key: other.private }));
  const rightName = await startTlsRelay(createSecureContext({ cert: ca.serverCertPem, key: ca.serverKeyPem }));
  try {
    await withProxy(standIn(wrongName.port), async (p) => {
      const error = await loginError(p.port);
      assert.equal(error.code, '08001');
      assert.match(error.message, new RegExp(`TLS handshake with upstream localhost:${wrongName.port} failed: Hostname/IP does not match`));
    });
    await withProxy(standIn(wrongName.port, 'SSLMode=verify-ca'), async (p) => assert.equal(await currentUser(p.port), db.tokenRole));
    await withProxy(standIn(rightName.port), async (p) => assert.equal(await currentUser(p.port), db.tokenRole));
    await withProxy(standIn(rightName.port).replace('Server=localhost', 'Server=127.0.0.1'), async (p) => assert.equal(await currentUser(p.port), db.tokenRole));
    assert.deepEqual(rightName.servernames, ['localhost', false]);
  } finally {
    await Promise.all([wrongName.close(), rightName.close()]);
  }
});

// ---------------------------------------------------------------------------------------------
// Other password methods (Password= for native roles)

test('SCRAM-SHA-256 role via Password= works, and uses SCRAM-SHA-256-PLUS channel binding', async () => {
  await withProxy(passwordConnection(db.scramRole, db.scramPassword), async (p) => {
    assert.equal(await currentUser(p.port), db.scramRole);
  });
  // Behind a TLS man in the middle the proxy binds to the middle's certificate, which the server
  // sees as a mismatch: proof that the binding is in use (plain SCRAM would pass, as MD5 does).
  // The MD5 login goes first so that the SCRAM one resumes its TLS session: a resumed session
  // carries no certificate, and the binding must not silently fall away then (a regression).
  // The direct login above, verified by the server, shows the binding data itself is right.
  const untrusted = await untrustedCert();
  const middle = await startTlsRelay(createSecureContext({ cert: untrusted.certPem, key: untrusted.keyPem }));
  try {
    const via = (user: string, password: string): string =>
      passwordConnection(user, password, 'SSLMode=require').replace(`Port=${db.port}`, `Port=${middle.port}`);
    await withProxy(via(db.md5Role, db.md5Password), async (p) => assert.equal(await currentUser(p.port), db.md5Role));
    await withProxy(via(db.scramRole, db.scramPassword), async (p) => {
      const error = await loginError(p.port);
      assert.equal(error.code, '28000', error.message);
      assert.equal(error.message, 'SCRAM channel binding check failed');
      assert.ok(!p.logText().includes(db.scramPassword));
    });
  } finally {
    await middle.close();
  }
});

test('a wrong SCRAM password gets the upstream 28P01', async () => {
  await withProxy(passwordConnection(db.scramRole, 'not-' + db.scramPassword), async (p) => {
    const error = await loginError(p.port);
    assert.equal(error.code, '28P01');
    assert.match(error.message, new RegExp(`password authentication failed for user "${db.scramRole}"`));
  });
});

test('MD5 role via Password= works', async () => {
  await withProxy(passwordConnection(db.md5Role, db.md5Password), async (p) => {
    assert.equal(await currentUser(p.port), db.md5Role);
    const error = await withProxy(passwordConnection(db.md5Role, 'wrong'), async (q) => loginError(q.port));
    assert.equal(error.code, '28P01');
  });
});

// ---------------------------------------------------------------------------------------------
// Startup parameters

test("the client's client_encoding reaches the upstream (pg-protocol's startup would override it with UTF8)", async () => {
  const socket = netConnect({ host: '127.0.0.1', port: proxy.port });
  socket.on('error', () => {});
  const reader = new FrameReader(1 << 20, true);
  const status = new Map<string, string>();
  const body = Buffer.concat([Buffer.from([0, 3, 0, 0]), Buffer.from('user\0anyone\0client_encoding\0LATIN1\0application_name\0enc-test\0\0')]);
  const length = Buffer.alloc(4);
  length.writeInt32BE(4 + body.length);
  socket.write(Buffer.concat([length, body]));
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('no ReadyForQuery')), 5000);
    socket.on('data', (chunk: Buffer) => {
      reader.push(chunk);
      for (let frame = reader.next(); frame; frame = reader.next()) {
        if (frame.type === 0x45) reject(new Error(frame.body.toString('latin1')));
        if (frame.type === 0x53) {
          const [name = '', value = ''] = frame.body.toString('utf8').split('\0');
          status.set(name, value);
        }
        if (frame.type === 0x5a) {
          clearTimeout(timer);
          resolve();
        }
      }
    });
  });
  socket.end(serialize.end());
  assert.equal(status.get('client_encoding'), 'LATIN1');
  assert.equal(status.get('application_name'), 'enc-test');
});

// ---------------------------------------------------------------------------------------------
// The upstream going away mid-session

test('pg_terminate_backend on one session: that client gets the upstream FATAL, the others go on', async () => {
  const victim = proxyClient(proxy.port, db, { application_name: 'victim' });
  const bystander = proxyClient(proxy.port, db, { application_name: 'bystander' });
  await Promise.all([victim.connect(), bystander.connect()]);
  try {
    const failed = new Promise<Error>((resolve) => {
      victim.removeAllListeners('error');
      victim.on('error', resolve);
    });
    const [row] = await db.query<{ done: boolean }>("select pg_terminate_backend(pid) as done from pg_stat_activity where application_name = 'victim'");
    assert.equal(row?.done, true);
    const error = (await failed) as pg.DatabaseError;
    assert.equal(error.code, '57P01', error.message);
    await assert.rejects(victim.query('select 1'));
    assert.equal((await bystander.query('select 2 as two')).rows[0].two, 2);
    assert.equal(await currentUser(proxy.port), db.tokenRole);
    for (let i = 0; i < 50 && !proxy.logs.some((l) => l.msg === 'session ended' && l.end === 'upstream_closed'); i++) {
      await new Promise((r) => setTimeout(r, 20));
    }
    assert.ok(proxy.logs.some((l) => l.msg === 'session ended' && l.end === 'upstream_closed'));
  } finally {
    await Promise.all([endQuietly(victim), endQuietly(bystander)]);
  }
});

test('an upstream connection reset mid-session: that client is disconnected, the others go on', async () => {
  const middle = await startTlsRelay(createSecureContext({ cert: db.ca.serverCertPem, key: db.ca.serverKeyPem }));
  try {
    await withProxy(standIn(middle.port), async (p) => {
      const victim = proxyClient(p.port, db);
      const bystander = proxyClient(p.port, db);
      await victim.connect();
      await bystander.connect();
      try {
        const failed = new Promise<Error>((resolve) => {
          victim.removeAllListeners('error');
          victim.on('error', resolve);
        });
        const ended = new Promise<void>((resolve) => victim.once('end', resolve));
        const pair = middle.pairs[0];
        assert.ok(pair);
        pair[1].destroy(); // the middle's session with the server
        pair[0].resetAndDestroy(); // a TCP RST toward the proxy
        await ended;
        // An 08006 from the proxy, or the pg client's own "Connection terminated unexpectedly".
        const error = (await failed) as Error & { code?: string };
        assert.ok(error.code === '08006' || /terminated unexpectedly/.test(error.message), error.message);
        await assert.rejects(victim.query('select 1'));
        assert.equal((await bystander.query('select 3 as three')).rows[0].three, 3);
        for (let i = 0; i < 50 && p.server.connections > 1; i++) await new Promise((r) => setTimeout(r, 20));
        assert.equal(p.server.connections, 1, 'the broken session is gone, the other stays');
      } finally {
        await Promise.all([endQuietly(victim), endQuietly(bystander)]);
      }
    });
  } finally {
    await middle.close();
  }
});
