/**
 * The pool's line of waiting clients, without a server: logins are made here, each a Duplex that
 * stands for a logged-in connection.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { PassThrough } from 'node:stream';
import { Pool, type Lease, type PoolObserver } from '../src/pool/pool.js';
import { ServerConnection } from '../src/pool/server-connection.js';
import type { UpstreamSession } from '../src/proxy/upstream.js';

const observer: PoolObserver = {
  login() {},
  reuse() {},
  reset() {},
  closed() {},
  waited() {},
  transaction() {},
  prepared() {},
  leaked() {},
};

const settings = { size: 2, minSize: 0, queryWaitTimeoutMs: 60_000, resetQuery: '', lifetimeMs: 0, idleTimeoutMs: 0, checkDelayMs: 60_000 };

function connection(id: number): ServerConnection {
  const session = { socket: new PassThrough(), greeting: [], processId: id, secretKey: Buffer.alloc(4), leftover: Buffer.alloc(0), tls: { version: 'TLSv1.3', cipher: 'x' }, native: undefined };
  return ServerConnection.fromLogin(session as unknown as UpstreamSession, 'key', undefined, 0, true);
}

test('clients waiting for a connection get one in the order they came, whatever logins happen meanwhile', async () => {
  const pool = new Pool('fair', settings, observer);
  let logins = 0;
  let finishLogin: (() => void) | undefined;
  const login = async (): Promise<ServerConnection> => {
    const id = ++logins;
    if (id === 3) await new Promise<void>((resolve) => (finishLogin = resolve));
    return connection(id);
  };
  const signal = new AbortController().signal;
  try {
    const a = await pool.acquire('key', login, signal);
    const b = await pool.acquire('key', login, signal);
    const order: string[] = [];
    const waiting: Array<Promise<Lease>> = ['w1', 'w2', 'w3'].map((name) =>
      pool.acquire('key', login, signal).then((lease) => {
        order.push(name);
        return lease;
      }),
    );
    await new Promise((resolve) => setImmediate(resolve));
    assert.equal(pool.stats.waiting, 3);
    // a's connection closes: w1, first in line, logs in (slowly).
    a.server.upstream.destroy();
    await new Promise((resolve) => setImmediate(resolve));
    assert.ok(finishLogin, 'w1 logs in');
    finishLogin();
    const first = await (waiting[0] as Promise<Lease>);
    await new Promise((resolve) => setImmediate(resolve));
    // b gives its connection back: it goes to the next in line, w2.
    pool.giveBack(b.server, 'I', false);
    await Promise.race([waiting[1], waiting[2]]);
    assert.deepEqual(order, ['w1', 'w2']);
    // And the last one in line gets the next.
    pool.giveBack(first.server, 'I', false);
    await waiting[2];
    assert.deepEqual(order, ['w1', 'w2', 'w3']);
  } finally {
    pool.close();
  }
});
