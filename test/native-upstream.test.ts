/**
 * The native upstream connection on its own (OpenSSL's TLS in C, before any relay), against a
 * small TLS server of the test's: session resumption on every connection after the first, and
 * backpressure when the server stops reading (what the JavaScript relay needs of it when the
 * native relay refuses a session).
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, connect as netConnect, type Server, type Socket } from 'node:net';
import { TLSSocket, createSecureContext } from 'node:tls';
import { native, NativeUpstream } from '../src/proxy/native-relay.js';
import { testCA, type TestCA } from './harness/certs.js';

let ca: TestCA;
let server: Server;
let port = 0;
/** The server side of each connection, once its TLS handshake is done. */
const accepted: TLSSocket[] = [];

before(async () => {
  ca = await testCA();
  const context = createSecureContext({ cert: ca.serverCertPem, key: ca.serverKeyPem });
  // Postgres's way in: an 8-byte SSLRequest answered 'S', then TLS. Node's TLS server sends no new
  // ticket on a resumed handshake: the client must keep its session usable by itself.
  server = createServer((raw: Socket) => {
    raw.once('data', () => {
      raw.write('S');
      const tls = new TLSSocket(raw, { isServer: true, secureContext: context });
      tls.on('error', () => {});
      tls.once('secure', () => accepted.push(tls));
    });
    raw.on('error', () => {});
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  port = (server.address() as { port: number }).port;
});

after(async () => {
  for (const tls of accepted) tls.destroy();
  await new Promise((resolve) => server.close(resolve));
});

/** TCP and the SSLRequest in Node.js, then the socket goes to C for TLS, as upstream.ts does; and the server's side. */
async function open(target: Parameters<typeof NativeUpstream.connect>[1]): Promise<{ upstream: NativeUpstream; peer: TLSSocket }> {
  const before = accepted.length;
  const raw = netConnect({ host: '127.0.0.1', port });
  await new Promise<void>((resolve, reject) => raw.once('connect', resolve).once('error', reject));
  raw.write(Buffer.from([0, 0, 0, 8, 4, 210, 22, 47]));
  await new Promise<void>((resolve) => raw.once('data', () => resolve()));
  raw.pause();
  const upstream = NativeUpstream.connect(raw, target);
  upstream.on('error', () => {});
  await upstream.handshake;
  // TLS 1.3: the client is done a flight before the server is.
  for (let i = 0; i < 200 && accepted.length === before; i++) await new Promise((resolve) => setTimeout(resolve, 10));
  return { upstream, peer: accepted[before] as TLSSocket };
}

test('TLS 1.3 sessions resume on every connection after the first, not every other one', async (t) => {
  if (!native.addon) {
    t.skip(`no native relay: ${native.problem}`);
    return;
  }
  const target = { host: 'localhost', port, sslMode: 'verify-full' as const, rootCert: Buffer.from(ca.caPem) };
  const resumed: boolean[] = [];
  for (let i = 0; i < 4; i++) {
    const { upstream, peer } = await open(target);
    try {
      // The ticket comes after the handshake: a round trip makes sure it has arrived.
      peer.once('data', (chunk: Buffer) => peer.write(chunk));
      upstream.write(Buffer.from('ping'));
      await new Promise((resolve) => upstream.once('data', resolve));
      resumed.push(upstream.tlsInfo.resumed);
      assert.equal(upstream.tlsInfo.version, 'TLSv1.3');
      assert.ok(upstream.certificate()?.length, 'the server certificate, resumed or not (SCRAM channel binding needs it)');
    } finally {
      upstream.destroy();
    }
  }
  assert.deepEqual(resumed, [false, true, true, true]);
});

test('writes wait while the server does not read: the Duplex pushes back instead of C queueing without bound', async (t) => {
  if (!native.addon) {
    t.skip(`no native relay: ${native.problem}`);
    return;
  }
  const { upstream, peer } = await open({ host: 'localhost', port, sslMode: 'verify-full', rootCert: Buffer.from(ca.caPem) });
  try {
    peer.pause(); // reads nothing from now on
    const chunk = Buffer.alloc(1 << 20, 0x61);
    // Write while each write is taken (its callback comes); stop at the first that waits half a second.
    let written = 0;
    for (;;) {
      const taken = await Promise.race([
        new Promise<boolean>((resolve) => upstream.write(chunk, () => resolve(true))),
        new Promise<boolean>((resolve) => setTimeout(() => resolve(false), 500)),
      ]);
      written += chunk.length;
      if (!taken || written > 512 << 20) break;
    }
    assert.ok(written < 64 << 20, `a write waited after ${written >> 20} MiB: the socket's buffers, not an unbounded queue in C`);
    // The server reads again: everything written arrives.
    let received = 0;
    peer.on('data', (data: Buffer) => (received += data.length));
    peer.resume();
    for (let i = 0; i < 400 && received < written; i++) await new Promise((resolve) => setTimeout(resolve, 25));
    assert.equal(received, written);
  } finally {
    upstream.destroy();
  }
});

test('end() passes a half-close on: close_notify, then the server sees the end of the stream', async (t) => {
  if (!native.addon) {
    t.skip(`no native relay: ${native.problem}`);
    return;
  }
  const { upstream, peer } = await open({ host: 'localhost', port, sslMode: 'verify-full', rootCert: Buffer.from(ca.caPem) });
  try {
    const chunks: Buffer[] = [];
    peer.on('data', (data: Buffer) => chunks.push(data));
    const ended = new Promise<void>((resolve) => peer.once('end', () => resolve()));
    upstream.end(Buffer.from('last words'));
    await ended;
    assert.equal(Buffer.concat(chunks).toString(), 'last words');
  } finally {
    upstream.destroy();
  }
});
