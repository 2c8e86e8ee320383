/**
 * Regressions found reviewing the listener in C (native/listener.c, src/proxy/native-listener.ts,
 * ProxyServer #listenInC / #arrived / #onDesk): each test is named after the problem it pins.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect, type Socket } from 'node:net';
import { createSecureContext, TLSSocket } from 'node:tls';
import type { TestPostgres } from './harness/postgres.js';
import { startTokenPostgres } from './harness/postgres.js';
import { connectionFor, startProxy, type InProcessProxy } from './harness/proxy.js';
import { configTop, startRuntime } from './harness/console.js';
import { freePort } from './harness/tools.js';
import { serialize } from './harness/wire.js';
import { cleanEnvironment, pgClient, waitUntil } from './reliability-support.js';
import { received, requireNative, sqlstateIn, tcp } from './listener-support.js';

let db: TestPostgres;
const USER = 'anyone';
const token = 'tok-' + randomBytes(40).toString('base64url');

before(async () => {
  db = await startTokenPostgres(token);
});
after(() => db?.stop());


async function withProxy<T>(flags: string[], fn: (proxy: InProcessProxy) => Promise<T>): Promise<T> {
  const proxy = await startProxy(['--connection', connectionFor(db, token), '--relay', 'native', ...flags]);
  try {
    return await fn(proxy);
  } finally {
    await proxy.close();
  }
}

const inC = (proxy: InProcessProxy): number => proxy.logs.filter((l) => l['msg'] === 'session started' && l['startupInC'] === true).length;

async function visit(port: number, host = '127.0.0.1'): Promise<number> {
  const client = pgClient(port, db, { host });
  await client.connect();
  try {
    return (await client.query<{ pid: number }>('select pg_backend_pid() as pid')).rows[0]?.pid as number;
  } finally {
    await client.end();
  }
}

async function parked(proxy: InProcessProxy): Promise<void> {
  await waitUntil(() => [...proxy.server.pools.values()].some((pool) => pool.stats.idle > 0), 5000, 'an idle pooled connection');
}




test('a target renamed by a reload listens on the port its predecessor left in the same turn: C closes the listening socket at once', async (t) => {
  if (!requireNative(t)) return;
  cleanEnvironment();
  const dir = mkdtempSync(join(tmpdir(), 'lbp-listener-review-'));
  const config = join(dir, 'proxy.yaml');
  const port = await freePort();
  const write = (name: string): void => writeFileSync(config, [...configTop(db, token, dir), 'targets:', `  - name: ${name}`, `    ListenPort: ${port}`, ''].join('\n'));
  write('a');
  const proxy = await startRuntime(['--config', config]);
  try {
    assert.ok(await visit(port));
    write('b');
    const report = await proxy.runtime.reload('test');
    assert.match(report.changes.join('\n'), new RegExp(`target b added: listening on 127\\.0\\.0\\.1:${port}`));
    assert.ok(await visit(port), 'target b serves on the port');
  } finally {
    await proxy.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

test("SHOW CLIENTS shows the local address a client from C's startup reached, not the listen address (0.0.0.0), as for Node.js' clients", async (t) => {
  if (!requireNative(t)) return;
  await withProxy(['--address', '0.0.0.0', '--client-auth', 'trust', '--allow-insecure-listen'], async (proxy) => {
    await visit(proxy.port);
    await parked(proxy);
    const client = pgClient(proxy.port, db);
    await client.connect();
    try {
      assert.equal(inC(proxy), 1, 'served from the startup C read');
      const localPort = (client as unknown as { connection: { stream: Socket } }).connection.stream.localPort;
      const shown = proxy.server.clients().find((c) => c.remote?.port === localPort);
      assert.ok(shown);
      assert.deepEqual(shown.local, { address: '127.0.0.1', port: proxy.port });
    } finally {
      await client.end();
    }
  });
});

test('an IPv6 listen address: C serves the client and shows its address as Node.js does', async (t) => {
  if (!requireNative(t)) return;
  await withProxy(['--address', '::1'], async (proxy) => {
    await visit(proxy.port, '::1');
    await parked(proxy);
    const client = pgClient(proxy.port, db, { host: '::1' });
    await client.connect();
    try {
      assert.equal(inC(proxy), 1, 'served from the startup C read');
      const localPort = (client as unknown as { connection: { stream: Socket } }).connection.stream.localPort;
      const shown = proxy.server.clients().find((c) => c.remote?.port === localPort);
      assert.equal(shown?.remote?.address, '::1');
      assert.deepEqual(shown?.local, { address: '::1', port: proxy.port });
    } finally {
      await client.end();
    }
  });
});

test('MaxStartups counts the clients in their startup on the unix socket in C too: a TCP client past the limit gets 53300 at once, not a place in C', async (t) => {
  if (!requireNative(t)) return;
  const dir = mkdtempSync(join(tmpdir(), 'lbp-listener-review-'));
  try {
    await withProxy(['--max-startups', '1', '--startup-timeout', '3s', '--unix-socket', dir], async (proxy) => {
      const unix = connect({ path: proxy.server.socketPath as string });
      unix.on('error', () => {});
      try {
        await waitUntil(() => proxy.server.connections === 1, 5000, 'the unix socket client in its startup');
        // It sends nothing: Node.js' listener turns it away at accept; C must not keep it until the startup timeout.
        const late = await tcp(proxy.port);
        assert.equal(sqlstateIn(await received(late)), '53300', 'too many clients starting up');
      } finally {
        unix.destroy();
      }
    });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

/** A client connected and accepted (the one after it was served: accept is in order), that sent nothing yet. */
async function acceptedSilent(proxy: InProcessProxy): Promise<Socket> {
  const socket = await tcp(proxy.port);
  await visit(proxy.port);
  await waitUntil(() => proxy.server.connections === 0, 5000, 'the visit gone');
  return socket;
}

const turn = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

test('a client in its startup in C when the shutdown begins is waited for by drained() and gets 57P03 at its startup, as with Node.js\' listener', async (t) => {
  if (!requireNative(t)) return;
  await withProxy([], async (proxy) => {
    const waiting = await acceptedSilent(proxy);
    try {
      proxy.server.refuseNewClients();
      let drained = false;
      const draining = proxy.server.drained().then(() => (drained = true));
      for (let i = 0; i < 5; i++) await turn();
      assert.equal(drained, false, 'drained() waits for the client accepted before the refusal');
      const answer = received(waiting);
      waiting.write(serialize.startup({ user: USER, database: db.database }));
      assert.equal(sqlstateIn(await answer), '57P03', 'the proxy is shutting down');
      await draining;
    } finally {
      waiting.destroy();
    }
  });
});

test('a client in its startup in C when the listener stops (a target removed by a reload) goes on with the bytes C read of it, and gets 57P03 at its startup, as with Node.js\' listener', async (t) => {
  if (!requireNative(t)) return;
  await withProxy([], async (proxy) => {
    const waiting = await acceptedSilent(proxy);
    try {
      const answer = received(waiting);
      const bytes = serialize.startup({ user: USER, database: db.database });
      waiting.write(bytes.subarray(0, 11));
      await visit(proxy.port); // C has read the first bytes meanwhile
      proxy.server.stopAccepting();
      await assert.rejects(tcp(proxy.port), 'the port is closed');
      waiting.write(bytes.subarray(11));
      assert.equal(sqlstateIn(await answer), '57P03', 'the proxy is shutting down');
    } finally {
      waiting.destroy();
    }
  });
});

test('a reload that configures client TLS: C stops answering SSLRequest with N, and the next client gets TLS', async (t) => {
  if (!requireNative(t)) return;
  await withProxy([], async (proxy) => {
    await visit(proxy.port);
    await parked(proxy);
    const plain = proxy.server.options;
    const tls = createSecureContext({ cert: readFileSync(db.ca.serverCertFile), key: readFileSync(db.ca.serverKeyFile) });
    proxy.server.update({ ...plain, clientAuth: { ...plain.clientAuth, tls } });
    const client = pgClient(proxy.port, db, { ssl: { rejectUnauthorized: false } });
    await client.connect();
    try {
      const stream = (client as unknown as { connection: { stream: Socket } }).connection.stream;
      assert.ok(stream instanceof TLSSocket && stream.encrypted, 'the client is on TLS');
      assert.equal((await client.query<{ n: number }>('select 1 as n')).rows[0]?.n, 1);
    } finally {
      await client.end();
    }
    assert.equal(inC(proxy), 0, 'nothing served from C while TLS is configured');
  });
});

/** A startup packet of exactly `length` bytes with no user (28000 once framed whole). */
function noUserStartup(length: number): Buffer {
  const packet = Buffer.alloc(length);
  packet.writeInt32BE(length, 0);
  packet.writeInt32BE(196608, 4); // 3.0
  const name = Buffer.from('application_name\0');
  name.copy(packet, 8);
  packet.fill(0x61, 8 + name.length, length - 2); // its value; then its terminator and the packet's
  return packet;
}

const SSL_REQUEST = Buffer.from([0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]);
const GSSENC_REQUEST = Buffer.from([0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30]);

/** What the proxy answers to `chunks`, written one per event loop turn. */
async function answerTo(port: number, chunks: Buffer[]): Promise<Buffer> {
  const socket = await tcp(port);
  socket.setNoDelay(true);
  const answer = received(socket);
  for (const chunk of chunks) {
    socket.write(chunk);
    await turn();
  }
  return answer;
}

test('startup framing in C at its edges: lengths 0 to 7, 10,004 and 10,005, repeated encryption requests, a long packet cut around the length word and the inline buffer', async (t) => {
  if (!requireNative(t)) return;
  await withProxy([], async (proxy) => {
    for (let length = 0; length < 8; length++) {
      const bytes = Buffer.alloc(8);
      bytes.writeInt32BE(length, 0);
      assert.equal(sqlstateIn(await answerTo(proxy.port, [bytes])), '08P01', `a length word of ${length}`);
    }
    assert.equal(sqlstateIn(await answerTo(proxy.port, [noUserStartup(10004)])), '28000', 'the longest packet, read whole');
    const over = await answerTo(proxy.port, [noUserStartup(10005)]);
    assert.equal(sqlstateIn(over), '08P01', 'one byte more');
    assert.match(over.toString('latin1'), /invalid startup packet length 10005/);
    // A client waits for each answer (bytes after a request, unanswered, are Postgres' 08P01: the test above).
    const negotiating = await tcp(proxy.port);
    for (const request of [SSL_REQUEST, GSSENC_REQUEST, SSL_REQUEST]) {
      const answer = new Promise<Buffer>((resolve) => negotiating.once('data', resolve));
      negotiating.write(request);
      assert.deepEqual(await answer, Buffer.from('N'), 'each request refused with N');
    }
    const negotiated = received(negotiating);
    negotiating.write(noUserStartup(40));
    assert.equal(sqlstateIn(await negotiated), '28000');
    const long = noUserStartup(600);
    for (const at of [1, 3, 4, 5, 8, 511, 512, 513, 599]) {
      assert.equal(sqlstateIn(await answerTo(proxy.port, [long.subarray(0, at), long.subarray(at)])), '28000', `cut at ${at}`);
    }
    assert.ok(await visit(proxy.port), 'the proxy serves the next client');
  });
});
