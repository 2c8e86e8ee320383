/**
 * Regressions found reviewing the listener in C (native/listener.c, src/proxy/native-listener.ts,
 * ProxyServer #listenInC / #arrived / #onDesk): each test is named after the problem it pins.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect, type Socket } from 'node:net';
import type { TestPostgres } from './harness/postgres.js';
import { startTokenPostgres } from './harness/postgres.js';
import { connectionFor, startProxy, type InProcessProxy } from './harness/proxy.js';
import { configTop, startRuntime } from './harness/console.js';
import { freePort } from './harness/tools.js';
import { serialize } from './harness/wire.js';
import { cleanEnvironment, pgClient, waitUntil } from './reliability-support.js';
import { native } from '../src/proxy/native-relay.js';

let db: TestPostgres;
const USER = 'anyone';
const token = 'tok-' + randomBytes(40).toString('base64url');

before(async () => {
  db = await startTokenPostgres(token);
});
after(() => db?.stop());

function requireNative(t: { skip: (message: string) => void }): boolean {
  if (native.addon) return true;
  t.skip(`the listener in C needs the native relay: ${native.problem}`);
  return false;
}

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

async function tcp(port: number, host = '127.0.0.1'): Promise<Socket> {
  const socket = connect({ host, port });
  socket.on('error', () => {});
  await new Promise<void>((resolve, reject) => {
    socket.once('connect', resolve);
    socket.once('error', reject);
  });
  return socket;
}

/** Until `socket` closes; what it received. */
function received(socket: Socket): Promise<Buffer> {
  const chunks: Buffer[] = [];
  socket.on('data', (chunk: Buffer) => chunks.push(chunk));
  return new Promise((resolve) => socket.once('close', () => resolve(Buffer.concat(chunks))));
}

/** The SQLSTATE of the first ErrorResponse in `bytes`. */
function sqlstateIn(bytes: Buffer): string | undefined {
  for (let i = 0; i + 5 <= bytes.length; ) {
    const type = String.fromCharCode(bytes[i] as number);
    const length = bytes.readInt32BE(i + 1);
    if (type === 'E') {
      const body = bytes.subarray(i + 5, i + 1 + length);
      for (let j = 0; j < body.length && body[j] !== 0; ) {
        const end = body.indexOf(0, j + 1);
        if (body[j] === 0x43 /* C */) return body.toString('utf8', j + 1, end);
        j = end + 1;
      }
    }
    i += 1 + length;
  }
  return undefined;
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
