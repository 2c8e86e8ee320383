/**
 * A KeyUpdate from the upstream in the middle of a session: the native relay must switch to the
 * next traffic keys (and, when asked, send its own KeyUpdate and switch its sending keys too).
 * Neither Postgres nor Node.js can be made to send one, so the upstream here is OpenSSL's own
 * test server (`openssl s_server`, whose stdin commands `k` and `K` call SSL_key_update()), behind
 * a small shim that answers the SSLRequest; the test speaks the Postgres server side through the
 * server's stdin and stdout. Skipped where no `openssl` program is installed.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { connect as netConnect, createServer, type Server, type Socket } from 'node:net';
import pg from 'pg';
import { testCA, type TestCA } from './harness/certs.js';
import { startProxy, type InProcessProxy } from './harness/proxy.js';
import { listen, waitUntil } from './reliability-support.js';
import { native } from '../src/proxy/native-relay.js';

const hasOpenssl =
  spawnSync('openssl', ['version'], { stdio: 'ignore' }).status === 0 && spawnSync('stdbuf', ['--version'], { stdio: 'ignore' }).status === 0;
let ca: TestCA;
let shim: Server;
let shimPort: number;
/** The s_server of the session under test; one per session (it accepts one connection). */
let server: { child: ChildProcess; out: () => Buffer; port: number } | undefined;

/** Postgres backend messages, as the test (playing the server) writes them. */
function message(type: string, body: Buffer = Buffer.alloc(0)): Buffer {
  const header = Buffer.alloc(5);
  header.write(type, 0, 'latin1');
  header.writeInt32BE(body.length + 4, 1);
  return Buffer.concat([header, body]);
}
const int32 = (n: number): Buffer => {
  const b = Buffer.alloc(4);
  b.writeInt32BE(n);
  return b;
};
const cstring = (s: string): Buffer => Buffer.from(`${s}\0`, 'utf8');
const LOGIN = Buffer.concat([
  message('R', int32(0)), // AuthenticationOk
  message('S', Buffer.concat([cstring('server_version'), cstring('18.0')])),
  message('S', Buffer.concat([cstring('client_encoding'), cstring('UTF8')])),
  message('K', Buffer.concat([int32(4242), int32(77)])),
  message('Z', Buffer.from('I')),
]);
/** The answer to `select <text>`: one text column named "v". */
function answer(text: string): Buffer {
  const field = Buffer.concat([cstring('v'), int32(0), Buffer.from([0, 0]), int32(25), Buffer.from([0xff, 0xff]), int32(-1), Buffer.from([0, 0])]);
  const value = Buffer.from(text, 'utf8');
  return Buffer.concat([
    message('T', Buffer.concat([Buffer.from([0, 1]), field])),
    message('D', Buffer.concat([Buffer.from([0, 1]), int32(value.length), value])),
    message('C', cstring('SELECT 1')),
    message('Z', Buffer.from('I')),
  ]);
}

async function startServer(): Promise<void> {
  const probe = createServer();
  const port = await listen(probe);
  await new Promise<void>((resolve) => probe.close(() => resolve()));
  // Not -quiet: the stdin commands work only without it. Status lines go to stdout too; the test
  // looks for the Postgres bytes in it rather than parsing it all.
  // stdbuf: its status lines unbuffered, so that "SSL_do_handshake -> 1" (the key update sent) shows at once.
  const child = spawn('stdbuf', ['-o0', 'openssl', 's_server', '-accept', `127.0.0.1:${port}`, '-naccept', '1', '-tls1_3', '-msg', '-cert', ca.serverCertFile, '-key', ca.serverKeyFile], {
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  const chunks: Buffer[] = [];
  child.stdout?.on('data', (chunk: Buffer) => chunks.push(chunk));
  child.stderr?.resume();
  server = { child, out: () => Buffer.concat(chunks), port };
  await waitUntil(() => server!.out().includes('ACCEPT'), 10_000, 'openssl s_server listening');
}

before(async () => {
  if (!hasOpenssl || !native.addon) return;
  ca = await testCA();
  // The shim: answers the SSLRequest with 'S', then passes the TLS bytes to the s_server of the moment.
  shim = createServer((socket: Socket) => {
    socket.on('error', () => {});
    socket.once('data', (request: Buffer) => {
      assert.equal(request.length, 8, 'an SSLRequest first');
      socket.pause();
      const upstream = netConnect({ host: '127.0.0.1', port: server!.port }, () => {
        socket.write('S');
        socket.pipe(upstream).pipe(socket);
        socket.resume();
      });
      upstream.on('error', () => socket.destroy());
      socket.once('close', () => upstream.destroy());
    });
  });
  shimPort = await listen(shim);
});

after(async () => {
  server?.child.kill();
  await new Promise<void>((resolve) => (shim ? shim.close(() => resolve()) : resolve()));
});

for (const [command, what] of [
  ['k', 'a KeyUpdate that asks for nothing back'],
  ['K', 'a KeyUpdate that asks for ours: both directions switch keys'],
] as const) {
  test(`${what}: queries before and after it pass through the native relay`, async (t) => {
    if (!hasOpenssl || !native.addon) {
      t.skip(hasOpenssl ? `no native relay: ${native.problem}` : 'no openssl (or stdbuf) program here');
      return;
    }
    await startServer();
    const proxy: InProcessProxy = await startProxy([
      '--connection',
      `Server=localhost;Port=${shimPort};User=keyupdate;SSLRootCert=${ca.caFile};OAuthAccessToken=tok-keyupdate;Database=db`,
      '--relay',
      'native',
    ]);
    const c = new pg.Client({ host: '127.0.0.1', port: proxy.port, user: 'anyone', database: 'db' });
    c.on('error', () => {});
    const stdin = server!.child.stdin!;
    try {
      const connecting = c.connect();
      await waitUntil(() => server!.out().includes(cstring('keyupdate')), 10_000, 'the startup message at the server');
      stdin.write(LOGIN);
      await connecting;
      await waitUntil(() => proxy.logs.some((l) => l.msg === 'session started'), 5000, 'the session started');
      assert.equal(proxy.logs.find((l) => l.msg === 'session started')?.relay, 'native');

      const query = async (text: string): Promise<string> => {
        const result = c.query(`select '${text}' as v`);
        await waitUntil(() => server!.out().includes(Buffer.from(`select '${text}'`)), 5000, `the query "${text}" at the server`);
        stdin.write(answer(text));
        return (await result).rows[0].v as string;
      };
      assert.equal(await query('before'), 'before');
      stdin.write(`${command}\n`);
      await waitUntil(() => server!.out().includes('SSL_do_handshake -> 1'), 5000, 'the key update sent');
      assert.equal(await query('after the key update'), 'after the key update', 'the relay opens records under the next keys');
      assert.equal(await query('and again'), 'and again');
      // -msg lists the handshake messages: ">>>" sent by the server, "<<<" received from the relay.
      const received = server!.out().toString('latin1').split('\n').filter((line) => line.startsWith('<<<') && line.includes('KeyUpdate'));
      assert.equal(received.length, command === 'K' ? 1 : 0, `KeyUpdate messages from the relay: ${received.join('; ')}`);
    } finally {
      await c.end().catch(() => {});
      await proxy.close();
      server!.child.kill();
    }
  });
}
