/**
 * Clients that hold connections without finishing their startup, against the real program: one
 * that trickles a byte a second (the startup timeout is a deadline, not an idle timer), and
 * thousands of half-open connections that must not keep a real client out nor leak a socket, nor
 * take the session slots of --max-connections (startups have their own limit, --max-startups).
 * (A client that sends nothing or half a packet is in startup.test.ts.)
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { connect as netConnect, type Socket } from 'node:net';
import { serialize } from 'pg-protocol';
import type { TestPostgres } from './harness/postgres.js';
import { connectionFor, startProxiedPostgresProcess, startProxyProcess, type ProxyProcess } from './harness/proxy.js';
import { cleanEnvironment, LONG, openFds, pgClient, sleep, waitUntil, whoAmI } from './reliability-support.js';

cleanEnvironment();

const STARTUP_TIMEOUT_MS = 2500;
let db: TestPostgres;
let proxy: ProxyProcess;
let close: () => Promise<void>;
const token = 'tok-' + randomBytes(48).toString('base64url');

before(async () => ({ db, proxy, close } = await startProxiedPostgresProcess(token, ['--no-http', '--startup-timeout', String(STARTUP_TIMEOUT_MS)])));
after(() => close?.());

function connect(port: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const socket = netConnect({ host: '127.0.0.1', port });
    socket.once('connect', () => {
      socket.off('error', reject);
      socket.on('error', () => {});
      socket.resume(); // read what the proxy says (an SSLRequest's N), so its close is seen
      resolve(socket);
    });
    socket.once('error', reject);
  });
}

function closed(socket: Socket): Promise<number> {
  return new Promise((resolve) => {
    if (socket.destroyed) resolve(Date.now());
    else socket.once('close', () => resolve(Date.now()));
  });
}

test('a startup trickling one byte a second is dropped at --startup-timeout, before it completes', async () => {
  const startup = serialize.startup({ user: 'anyone', database: db.database, application_name: 'trickle' });
  const socket = await connect(proxy.port);
  const received: Buffer[] = [];
  socket.on('data', (chunk: Buffer) => received.push(chunk));
  const started = Date.now();
  const done = closed(socket);
  let sent = 0;
  let ended = false;
  void done.then(() => (ended = true));
  while (!ended && sent < startup.length) {
    socket.write(startup.subarray(sent, sent + 1));
    sent++;
    await Promise.race([sleep(1000), done]);
  }
  const elapsed = (await done) - started;
  assert.ok(sent < startup.length, `dropped before the ${startup.length}-byte packet was complete (sent ${sent})`);
  assert.ok(elapsed >= STARTUP_TIMEOUT_MS - 100 && elapsed < STARTUP_TIMEOUT_MS + 1500, `dropped after ${elapsed} ms, each byte in time`);
  assert.equal(Buffer.concat(received).length, 0, 'nothing is answered to an incomplete startup');
  await waitUntil(() => proxy.output().includes('client did not complete its startup in time'), 2000, 'the drop logged');
});

test(`${LONG ? '10,000' : '2,000'} half-open connections do not keep a real client out, and are all dropped at --startup-timeout`, async () => {
  const count = LONG ? 10_000 : 2_000;
  // A longer deadline than above: opening them all takes seconds when the machine is busy.
  const timeoutMs = 6000;
  const held = await startProxyProcess(['--connection', connectionFor(db, token), '--no-http', '--startup-timeout', String(timeoutMs)]);
  const pid = held.child.pid as number;
  const fdsBefore = openFds(pid);
  const ssl = serialize.requestSsl();
  const startup = serialize.startup({ user: 'anyone', database: db.database });
  // Four ways to stall: say nothing, half a startup, an SSLRequest and no more, a length and no body.
  const stall = (socket: Socket, i: number): void => {
    switch (i % 4) {
      case 0:
        break;
      case 1:
        socket.write(startup.subarray(0, 11));
        break;
      case 2:
        socket.write(ssl);
        break;
      default:
        socket.write(Buffer.from([0, 0, 0x27, 0x10, 0, 3, 0, 0])); // 10,000 bytes announced, 4 sent
    }
  };
  const opened = Date.now();
  const sockets: Socket[] = [];
  try {
    for (let i = 0; i < count; i += 250) {
      const batch = await Promise.all(Array.from({ length: Math.min(250, count - i) }, () => connect(held.port)));
      batch.forEach((s, j) => stall(s, i + j));
      sockets.push(...batch);
    }
    const closings = sockets.map(closed);
    // A real client gets in and runs a query while they are all held. The kernel hands the proxy
    // connections in order, so by then it has accepted every half-open one.
    assert.equal(await whoAmI(held.port, db), db.tokenRole);
    const fdsDuring = openFds(pid);
    assert.ok(Date.now() - opened < timeoutMs, `the login ended before the first half-open connection could be dropped (${Date.now() - opened} ms)`);
    assert.ok(fdsDuring >= fdsBefore + count, `the proxy held ${fdsDuring - fdsBefore} descriptors more than before`);
    const last = Math.max(...(await Promise.all(closings))) - opened;
    assert.ok(last >= timeoutMs - 100 && last < timeoutMs + 10_000, `all dropped by the proxy, the last ${last} ms after the first was opened`);
    await waitUntil(() => openFds(pid) <= fdsBefore + 2, 5000, 'the proxy back to its descriptors before');
    assert.equal(await whoAmI(held.port, db), db.tokenRole);
  } finally {
    for (const s of sockets) s.destroy();
    await held.stop('SIGINT');
  }
});

/** `count` connections that stay in their startup (nothing, or an SSLRequest and no more). */
async function halfOpen(port: number, count: number): Promise<Socket[]> {
  const sockets = await Promise.all(Array.from({ length: count }, () => connect(port)));
  sockets.forEach((s, i) => i % 2 === 1 && s.write(serialize.requestSsl()));
  return sockets;
}

test('half-open connections take no --max-connections slot: real clients get in up to the limit, and the next gets 53300', async () => {
  const held = await startProxyProcess(['--connection', connectionFor(db, token), '--no-http', '--max-connections', '2', '--startup-timeout', '60s']);
  const stalled = await halfOpen(held.port, 200);
  const sessions = [pgClient(held.port, db), pgClient(held.port, db)];
  try {
    await Promise.all(sessions.map((c) => c.connect()));
    for (const c of sessions) assert.equal((await c.query('select current_user as u')).rows[0].u, db.tokenRole);
    await assert.rejects(whoAmI(held.port, db), (e: { code?: string; message?: string }) => {
      assert.equal(e.code, '53300');
      assert.equal(e.message, 'sorry, too many clients already (lakebase-proxy --max-connections 2)');
      return true;
    });
    await sessions.shift()?.end();
    await waitUntil(async () => (await whoAmI(held.port, db).catch(() => '')) === db.tokenRole, 5000, 'a slot free again');
  } finally {
    await Promise.all(sessions.map((c) => c.end().catch(() => {})));
    for (const s of stalled) s.destroy();
    await held.stop('SIGINT');
  }
  assert.match(held.output(), /client turned away at --max-connections/);
});

test('--max-startups turns away connections beyond that many in their startup at once, with 53300; a real client gets in once they go', async () => {
  const held = await startProxyProcess(['--connection', connectionFor(db, token), '--no-http', '--max-startups', '5', '--startup-timeout', '60s']);
  // The kernel hands the proxy connections in order: it has the five before the next one.
  const stalled = await halfOpen(held.port, 5);
  try {
    await assert.rejects(whoAmI(held.port, db), (e: { code?: string; message?: string }) => {
      assert.equal(e.code, '53300');
      assert.equal(e.message, 'sorry, too many clients starting up already (lakebase-proxy --max-startups 5)');
      return true;
    });
    stalled.pop()?.destroy();
    await waitUntil(async () => (await whoAmI(held.port, db).catch(() => '')) === db.tokenRole, 5000, 'a startup slot free again');
  } finally {
    for (const s of stalled) s.destroy();
    await held.stop('SIGINT');
  }
});
