/**
 * The listener in C (native/listener.c, src/proxy/native-listener.ts): with session mode on the
 * native relay, trust and no client TLS, C accepts TCP clients, answers an SSLRequest 'N' and
 * reads the startup; a client whose pool has an idle connection of its parameters is then served
 * from the desk in one call, and Node.js never has its socket (the 'session started' line says
 * startupInC). Every other client becomes a Node.js socket with the bytes C read and goes the
 * usual way: those tests check that nothing is lost on the way. (startup.test.ts and
 * reliability-slow-clients.test.ts run their startup cases through this listener too.)
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import type { Socket } from 'node:net';
import pg from 'pg';
import type { TestPostgres } from './harness/postgres.js';
import { startTokenPostgres } from './harness/postgres.js';
import { connectionFor, startProxy, type InProcessProxy } from './harness/proxy.js';
import { WireClient, serialize } from './harness/wire.js';
import { firstChunk, pgClient, sleep, waitUntil } from './reliability-support.js';
import { received, requireNative, sqlstateIn, tcp } from './listener-support.js';
import { Metrics } from '../src/ops/metrics.js';
import { makeVerifier } from '../src/auth/scram.js';

let db: TestPostgres;
const token = 'tok-' + randomBytes(40).toString('base64url');
/** The user proxyClient logs in as (trust: any name). */
const USER = 'anyone';

before(async () => {
  db = await startTokenPostgres(token);
});
after(() => db?.stop());


async function withProxy<T>(flags: string[], fn: (proxy: InProcessProxy, metrics: Metrics) => Promise<T>): Promise<T> {
  const metrics = new Metrics();
  const proxy = await startProxy(['--connection', connectionFor(db, token), '--relay', 'native', ...flags], { observer: metrics.observerFor('listener') });
  try {
    return await fn(proxy, metrics);
  } finally {
    await proxy.close();
  }
}

const started = (proxy: InProcessProxy): Array<Record<string, unknown>> => proxy.logs.filter((l) => l['msg'] === 'session started');
const inC = (proxy: InProcessProxy): number => started(proxy).filter((l) => l['startupInC'] === true).length;

/** One pooled client's visit: connect, `sql`, leave; its backend pid and the first column of `sql`'s row. */
async function visit(proxy: InProcessProxy, sql = 'select 1', extra: Partial<pg.ClientConfig> = {}): Promise<{ pid: number; value: string }> {
  const client = pgClient(proxy.port, db, extra);
  await client.connect();
  try {
    const pid = (await client.query<{ pid: number }>('select pg_backend_pid() as pid')).rows[0]?.pid as number;
    const row = (await client.query({ text: sql, rowMode: 'array' })).rows[0] as unknown[];
    return { pid, value: String(row[0]) };
  } finally {
    await client.end();
  }
}

/** Until the pool of the default database has an idle connection on its desk. */
async function parked(proxy: InProcessProxy): Promise<void> {
  await waitUntil(() => [...proxy.server.pools.values()].some((pool) => pool.stats.idle > 0), 5000, 'an idle pooled connection');
}


const SSL_REQUEST = Buffer.from([0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]);

function startup(parameters: Record<string, string>): Buffer {
  return serialize.startup(parameters);
}



test('a client whose pool has an idle connection is served from the startup C read: same backend, its own parameters, its address in SHOW CLIENTS', async (t) => {
  if (!requireNative(t)) return;
  await withProxy([], async (proxy) => {
    const first = await visit(proxy, "select current_setting('application_name')", { application_name: 'one' });
    await parked(proxy);
    assert.equal(inC(proxy), 0, 'the first client logged in the usual way (no idle connection yet)');
    const client = pgClient(proxy.port, db, { application_name: 'one' });
    await client.connect();
    try {
      assert.equal(inC(proxy), 1, "the second client's session started from C's startup");
      const pid = (await client.query<{ pid: number }>('select pg_backend_pid() as pid')).rows[0]?.pid;
      assert.equal(pid, first.pid, 'the same upstream backend');
      assert.equal((await client.query<{ a: string }>("select current_setting('application_name') as a")).rows[0]?.a, 'one');
      const localPort = (client as unknown as { connection: { stream: Socket } }).connection.stream.localPort;
      const shown = proxy.server.clients().find((c) => c.remote?.port === localPort);
      assert.ok(shown, 'the client is listed with its own address and port');
      assert.equal(shown.remote?.address, '127.0.0.1');
      assert.equal(shown.user, USER);
      assert.equal(shown.applicationName, 'one');
      assert.equal(shown.state, 'active');
      assert.equal(shown.local.port, proxy.port);
    } finally {
      await client.end();
    }
  });
});

test('an SSLRequest answered N by C, then a startup in single bytes with a query right behind it: served from the desk, the query answered', async (t) => {
  if (!requireNative(t)) return;
  await withProxy([], async (proxy) => {
    await visit(proxy);
    await parked(proxy);
    const socket = await tcp(proxy.port);
    try {
      const answer = firstChunk(socket);
      for (const byte of SSL_REQUEST) {
        socket.write(Buffer.from([byte]));
        await sleep(2);
      }
      assert.deepEqual(await answer, Buffer.from('N'), 'SSLRequest refused with N');
      const bytes = Buffer.concat([startup({ user: USER, database: db.database }), serialize.query('select 40 + 2')]);
      const client = WireClient.over(socket);
      socket.resume(); // paused by firstChunk
      for (const byte of bytes) {
        socket.write(Buffer.from([byte]));
        await sleep(1);
      }
      const greeting = await client.untilReady();
      assert.ok(!greeting.some((m) => m.name === 'error'), 'logged in');
      assert.equal(greeting[0]?.name, 'authenticationOk');
      const answered = await client.untilReady();
      const row = answered.find((m) => m.name === 'dataRow') as unknown as { fields: string[] } | undefined;
      assert.equal(row?.fields[0], '42', 'the query sent with the startup ran');
      assert.equal(inC(proxy), 1, 'served from C');
      client.end();
    } finally {
      socket.destroy();
    }
  });
});

test('a startup C read that the desk cannot serve goes the usual way with its bytes intact: other parameters, a query sent with the startup', async (t) => {
  if (!requireNative(t)) return;
  await withProxy([], async (proxy) => {
    await visit(proxy);
    await parked(proxy);
    // Other parameters: no idle connection of its login key, so a login of its own.
    const other = await visit(proxy, "select current_setting('application_name')", { application_name: 'other' });
    assert.equal(other.value, 'other');
    // A query right behind the startup, on the usual way.
    const socket = await tcp(proxy.port);
    try {
      const client = WireClient.over(socket);
      socket.write(Buffer.concat([startup({ user: USER, database: db.database, application_name: 'third' }), serialize.query('select 6 * 7')]));
      const greeting = await client.untilReady();
      assert.ok(!greeting.some((m) => m.name === 'error'), 'logged in');
      const row = (await client.untilReady()).find((m) => m.name === 'dataRow') as unknown as { fields: string[] } | undefined;
      assert.equal(row?.fields[0], '42');
      client.end();
    } finally {
      socket.destroy();
    }
    assert.equal(inC(proxy), 0, 'none of them was served from C');
  });
});

test('StartupTimeout in C: a client that sends nothing, half a length word or half a packet is closed, and logged and counted as a startup timeout', async (t) => {
  if (!requireNative(t)) return;
  await withProxy(['--startup-timeout', '300ms'], async (proxy, metrics) => {
    const sockets = await Promise.all([tcp(proxy.port), tcp(proxy.port), tcp(proxy.port)]);
    const closed = sockets.map(received);
    sockets[1]?.write(Buffer.from([0, 0]));
    sockets[2]?.write(startup({ user: USER }).subarray(0, 12));
    for (const bytes of await Promise.all(closed)) assert.equal(bytes.length, 0, 'closed without a word, as Postgres does');
    // Dropped by the timeout (its log line and reason below), not before it: the listener fuzz harness checks each deadline, with no clock here.
    await waitUntil(() => proxy.logs.filter((l) => l['msg'] === 'client did not complete its startup in time; dropped').length === 3, 5000, 'three log lines');
    assert.match(await metrics.text(), /lakebase_proxy_login_failures_total\{[^}]*reason="startup_timeout"[^}]*\} 3/);
    assert.equal(await visit(proxy).then((v) => v.value), '1', 'the proxy serves the next client');
  });
});

test('clients that leave in their startup in C (a health probe, a half packet then FIN, a reset) are counted opened and closed, as Node.js counts its own', async (t) => {
  if (!requireNative(t)) return;
  await withProxy([], async (proxy, metrics) => {
    const total = async (name: string): Promise<number> => Number(new RegExp(`^lakebase_proxy_${name}\\{[^}]*\\} (\\d+)`, 'm').exec(await metrics.text())?.[1] ?? 0);
    const probe = await tcp(proxy.port);
    probe.end();
    const half = await tcp(proxy.port);
    half.end(startup({ user: USER }).subarray(0, 10));
    const reset = await tcp(proxy.port);
    reset.write(Buffer.from([0, 0, 0]));
    reset.resetAndDestroy();
    await waitUntil(async () => (await total('client_connections_total')) === 3, 5000, 'three clients counted');
    await waitUntil(async () => (await total('client_connections_open')) === 0, 5000, 'none open');
    assert.equal(proxy.server.connections, 0);
  });
});

test('MaxStartups counts the clients in their startup in C: the one past the limit gets 53300, and a client gets in once they go', async (t) => {
  if (!requireNative(t)) return;
  await withProxy(['--max-startups', '2', '--startup-timeout', '60s'], async (proxy) => {
    const held = [await tcp(proxy.port), await tcp(proxy.port)];
    await sleep(50);
    const third = await tcp(proxy.port);
    const answer = await received(third);
    assert.equal(sqlstateIn(answer), '53300', 'too many clients starting up');
    assert.match(answer.toString('latin1'), /too many clients starting up already \(lakebase-proxy --max-startups 2\)/);
    for (const socket of held) socket.destroy();
    await waitUntil(async () => (await visit(proxy).then(() => true).catch(() => false)) === true, 5000, 'a client gets in');
  });
});

test('bad startups read by C get the answers Node.js gives: a length word out of range, data after the SSLRequest, no user, protocol 2', async (t) => {
  if (!requireNative(t)) return;
  await withProxy([], async (proxy) => {
    const cases: Array<[string, Buffer, string]> = [
      ['a length word of 4', Buffer.from([0, 0, 0, 4, 0, 3, 0, 0]), '08P01'],
      ['a length word of 100,000', Buffer.concat([Buffer.from([0, 1, 0x86, 0xa0]), Buffer.alloc(64)]), '08P01'],
      ['data after the SSLRequest', Buffer.concat([SSL_REQUEST, startup({ user: USER })]), '08P01'],
      ['no user', startup({ database: db.database }), '28000'],
      ['protocol 2.0', Buffer.from([0, 0, 0, 9, 0, 2, 0, 0, 0]), '0A000'],
    ];
    for (const [name, bytes, sqlstate] of cases) {
      const socket = await tcp(proxy.port);
      const answer = received(socket);
      socket.write(bytes);
      assert.equal(sqlstateIn(await answer), sqlstate, name);
    }
    assert.equal(await visit(proxy).then((v) => v.value), '1', 'the proxy serves the next client');
  });
});

test('at shutdown: a client that starts up after refuseNewClients gets 57P03, and so does one that was in its startup in C (handed to Node.js, as its listener would have it)', async (t) => {
  if (!requireNative(t)) return;
  await withProxy([], async (proxy) => {
    await visit(proxy);
    await parked(proxy);
    const waiting = await tcp(proxy.port);
    const waitingAnswer = received(waiting);
    await sleep(20);
    proxy.server.refuseNewClients();
    const late = await tcp(proxy.port);
    const answer = received(late);
    late.write(startup({ user: USER, database: db.database }));
    assert.equal(sqlstateIn(await answer), '57P03');
    proxy.server.stopAccepting();
    await assert.rejects(tcp(proxy.port), 'the port is closed');
    waiting.write(startup({ user: USER, database: db.database }));
    assert.equal(sqlstateIn(await waitingAnswer), '57P03', 'the client accepted before the shutdown is answered, not dropped');
  });
});

test('a reload to password authentication: C stops reading startups, and the next client is asked for its password; back to trust, C serves again', async (t) => {
  if (!requireNative(t)) return;
  await withProxy([], async (proxy) => {
    await visit(proxy);
    await parked(proxy);
    const trust = proxy.server.options;
    proxy.server.update({ ...trust, clientAuth: { ...trust.clientAuth, authMethod: 'password', users: new Map([[USER, makeVerifier('secret', 4096)]]) } });
    await assert.rejects(visit(proxy, 'select 1', { password: 'wrong' }), /password authentication failed/);
    assert.equal((await visit(proxy, 'select 1', { password: 'secret' })).value, '1');
    assert.equal(inC(proxy), 0, 'no session started from C while passwords are asked');
    proxy.server.update(trust);
    await parked(proxy);
    await visit(proxy);
    assert.equal(inC(proxy), 1, 'served from C again');
  });
});
