/**
 * Second review of the listener in C (native/listener.c, src/proxy/native-listener.ts, ProxyServer
 * #arrived / #onDesk): each test is named after the problem it pins.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { TestPostgres } from './harness/postgres.js';
import { startTokenPostgres } from './harness/postgres.js';
import { connectionFor, startProxy, type InProcessProxy } from './harness/proxy.js';
import { serialize } from './harness/wire.js';
import { openFds, pgClient, sleep, waitUntil } from './reliability-support.js';
import { received, requireNative, sqlstateIn, tcp } from './listener-support.js';
import { Metrics } from '../src/ops/metrics.js';
import type { ProxyObserver } from '../src/proxy/observer.js';
import { DeskSession } from '../src/pool/desk.js';

let db: TestPostgres;
const USER = 'anyone';
const token = 'tok-' + randomBytes(40).toString('base64url');

before(async () => {
  db = await startTokenPostgres(token);
});
after(() => db?.stop());

/** `hooks` run after the metrics observer's own method: a test may act from inside a callback of the listener in C. */
async function withProxy<T>(
  flags: string[],
  fn: (proxy: InProcessProxy, metrics: Metrics) => Promise<T>,
  hooks: Partial<ProxyObserver> = {},
  closeWithinMs = Infinity,
): Promise<T> {
  const metrics = new Metrics();
  const base = metrics.observerFor('listener');
  const observer: ProxyObserver = { ...base };
  for (const [name, hook] of Object.entries(hooks) as Array<[keyof ProxyObserver, (...args: unknown[]) => void]>) {
    const own = base[name] as (...args: unknown[]) => unknown;
    (observer as unknown as Record<string, unknown>)[name] = (...args: unknown[]) => {
      const result = own(...args);
      hook(...args);
      return result;
    };
  }
  const proxy = await startProxy(['--connection', connectionFor(db, token), '--relay', 'native', ...flags], { observer });
  try {
    return await fn(proxy, metrics);
  } finally {
    // Bounded where a failure may leave a session behind: the test fails, it does not hang.
    const closing = proxy.close();
    if (closeWithinMs === Infinity) await closing;
    else if (!(await Promise.race([closing.then(() => true), sleep(closeWithinMs).then(() => false)]))) proxy.server.closeAll();
  }
}

async function gauge(metrics: Metrics, name: string): Promise<number> {
  return Number(new RegExp(`^lakebase_proxy_${name}\\{[^}]*\\} (\\d+)`, 'm').exec(await metrics.text())?.[1] ?? 0);
}

async function visit(proxy: InProcessProxy): Promise<void> {
  const client = pgClient(proxy.port, db);
  await client.connect();
  try {
    await client.query('select 1');
  } finally {
    await client.end();
  }
}

async function parked(proxy: InProcessProxy): Promise<void> {
  await waitUntil(() => [...proxy.server.pools.values()].some((pool) => pool.stats.idle > 0), 5000, 'an idle pooled connection');
}

const startup = (): Buffer => serialize.startup({ user: USER, database: db.database });

test('quick path: a client that resets right after its startup leaves the gauge at 0 and its connection idle', async (t) => {
  if (!requireNative(t)) return;
  await withProxy([], async (proxy, metrics) => {
    await visit(proxy);
    await parked(proxy);
    const fds = openFds(process.pid);
    for (let i = 0; i < 20; i++) {
      const socket = await tcp(proxy.port);
      socket.write(startup());
      socket.resetAndDestroy();
    }
    await waitUntil(async () => (await gauge(metrics, 'client_connections_total')) === 21, 5000, 'all counted');
    await waitUntil(async () => (await gauge(metrics, 'client_connections_open')) === 0, 5000, 'none open');
    assert.equal(proxy.server.connections, 0);
    await parked(proxy);
    await waitUntil(() => openFds(process.pid) <= fds, 5000, `no fd leaked (${fds})`);
  });
});

test('a startup timeout whose callback stops the listener (re-entrant): the others in their startup go to Node.js, nothing hangs', async (t) => {
  if (!requireNative(t)) return;
  let proxyRef: InProcessProxy | undefined;
  await withProxy(
    ['--startup-timeout', '300ms'],
    async (proxy, metrics) => {
      proxyRef = proxy;
      const fds = openFds(process.pid);
      const sockets = await Promise.all([tcp(proxy.port), tcp(proxy.port), tcp(proxy.port)]);
      const closed = sockets.map(received);
      await Promise.all(closed);
      await waitUntil(async () => (await gauge(metrics, 'client_connections_open')) === 0, 5000, 'none open');
      await proxy.server.drained();
      await waitUntil(() => openFds(process.pid) <= fds, 5000, `no fd leaked (${fds})`);
    },
    { failure: (reason) => void (reason === 'startup_timeout' && proxyRef?.server.stopAccepting()) },
  );
});

test('busy clients that reset at once: the gauge returns to 0 and no fd is left', async (t) => {
  if (!requireNative(t)) return;
  await withProxy(['--max-startups', '1', '--startup-timeout', '60s'], async (proxy, metrics) => {
    const fds = openFds(process.pid);
    const held = await tcp(proxy.port);
    await sleep(50);
    for (let i = 0; i < 20; i++) {
      const socket = await tcp(proxy.port);
      socket.resetAndDestroy();
    }
    await waitUntil(async () => (await gauge(metrics, 'client_connections_rejected_total')) === 20, 5000, 'all rejected');
    held.destroy();
    await waitUntil(async () => (await gauge(metrics, 'client_connections_open')) === 0, 5000, 'none open');
    await waitUntil(() => openFds(process.pid) <= fds, 5000, `no fd leaked (${fds})`);
  });
});

test('hand-over at refuseNewClients, the client resets: drained() resolves and the gauge is 0', async (t) => {
  if (!requireNative(t)) return;
  await withProxy([], async (proxy, metrics) => {
    const waiting = await tcp(proxy.port);
    waiting.write(startup().subarray(0, 10));
    await visit(proxy);
    proxy.server.refuseNewClients();
    waiting.resetAndDestroy();
    await proxy.server.drained();
    await waitUntil(async () => (await gauge(metrics, 'client_connections_open')) === 0, 5000, 'none open');
    const late = await tcp(proxy.port);
    const answer = received(late);
    late.write(startup());
    assert.equal(sqlstateIn(await answer), '57P03');
    await waitUntil(async () => (await gauge(metrics, 'client_connections_open')) === 0, 5000, 'none open');
  });
});

test('stopAccepting from inside a quick-path arrival (re-entrant): the client is answered, the gauge returns to 0, close() resolves', async (t) => {
  if (!requireNative(t)) return;
  let proxyRef: InProcessProxy | undefined;
  let armed = false;
  await withProxy(
    [],
    async (proxy, metrics) => {
      proxyRef = proxy;
      await visit(proxy);
      await parked(proxy);
      const other = await tcp(proxy.port);
      other.write(startup().subarray(0, 10));
      await sleep(50);
      armed = true;
      const socket = await tcp(proxy.port);
      const answer = received(socket);
      socket.write(startup());
      const bytes = await Promise.race([answer, sleep(3000).then(() => undefined)]);
      socket.destroy();
      other.destroy();
      assert.ok(bytes && sqlstateIn(bytes) !== undefined, 'the client is answered with an error, not left waiting');
      await waitUntil(async () => (await gauge(metrics, 'client_connections_open')) === 0, 5000, 'none open');
    },
    {
      clientOpened: () => {
        if (!armed) return;
        armed = false;
        proxyRef?.server.stopAccepting();
      },
    },
  );
});

/** The next DeskSession.start() throws, as the addon's deskRelay does when N-API fails (CHECK), instead of returning a refusal. */
const originalStart = DeskSession.prototype.start;

function failNextStart(t: { after: (fn: () => void) => void }): void {
  const start = DeskSession.prototype.start;
  let armed = true;
  DeskSession.prototype.start = function (this: DeskSession, ...args: Parameters<DeskSession['start']>) {
    if (armed) {
      armed = false;
      throw new Error('injected: deskRelay threw');
    }
    return start.apply(this, args);
  };
  t.after(() => {
    DeskSession.prototype.start = originalStart;
  });
}

/** Whether drained() resolves within `ms`. */
async function drainsWithin(proxy: InProcessProxy, ms: number): Promise<boolean> {
  return Promise.race([proxy.server.drained().then(() => true), sleep(ms).then(() => false)]);
}

test('a pooled session whose start throws leaves no ghost session: the client gets 08006, the gauge returns to 0, drained() resolves, the connection is idle again (startup in C, and in Node.js over the unix socket)', async (t) => {
  if (!requireNative(t)) return;
  const dir = mkdtempSync(join(tmpdir(), 'lbp-listener-review2-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  await withProxy(['--unix-socket', dir], async (proxy, metrics) => {
    await visit(proxy);
    await parked(proxy);
    for (const [way, host] of [
      ['startup read in C', '127.0.0.1'],
      ['startup read by Node.js', dir],
    ] as const) {
      await parked(proxy); // on the desk, so that this client's session starts there (a connection C is resetting is not on offer)
      failNextStart(t);
      const client = pgClient(proxy.port, db, { host });
      const error = await client.connect().then(
        () => undefined,
        (e: unknown) => e as { code?: string; message: string },
      );
      await client.end().catch(() => {});
      assert.ok(error, `${way}: the client is not served`);
      await waitUntil(async () => (await gauge(metrics, 'client_connections_open')) === 0, 3000, `${way}: no client open`);
      assert.equal(proxy.server.connections, 0, `${way}: no session left behind (SHOW CLIENTS)`);
      assert.ok(await drainsWithin(proxy, 2000), `${way}: drained() resolves`);
      assert.equal(error.code, '08006', `${way}: told that the session could not start (${error.message})`);
      await parked(proxy);
      await visit(proxy); // the connection taken for the failed start serves the next client
    }
  }, {}, 5000);
});
