/**
 * Desk review: many clients on a small transaction pool while everything that can go wrong does
 * (clients that vanish while they wait on the desk or mid-result, idle and busy server connections
 * terminated, PAUSE/RESUME, reloads that shrink and grow the pool). Meant to be run with the
 * sanitized addon too (LAKEBASE_PROXY_NATIVE_ADDON, see .ci/sanitize.sh). Afterwards the pool's
 * count must match what is there: no connection held by nobody, none on the desk but idle, no
 * client waiting; and a last phase closes the proxy with clients waiting on the desk.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import type { TestPostgres } from './harness/postgres.js';
import { startTokenPostgres } from './harness/postgres.js';
import { connectionFor, startProxy } from './harness/proxy.js';
import { seeded } from './pool-transaction-support.js';
import { sleep, waitUntil } from './reliability-support.js';
import { serialize, WireClient } from './harness/wire.js';
import { ask, deskStats, wireOpen, deskSkip, poolChaos, quietly } from './pool-transaction-desk-review-support.js';

let db: TestPostgres;
const token = 'tok-' + randomBytes(600).toString('base64url');

before(async () => {
  db = await startTokenPostgres(token, { extraConf: { max_connections: '200' } });
});
after(() => db?.stop());

test('the desk under chaos: counts that match, and a shutdown with clients waiting on it', { skip: deskSkip }, async () => {
  const proxy = await startProxy(['--connection', connectionFor(db, token, 'PoolMode=transaction;PoolSize=3;QueryWaitTimeout=2s;ServerCheckDelay=1s')]);
  const random = seeded(7);
  let running = true;
  const pool = (): NonNullable<ReturnType<typeof proxy.server.pools.get>> => proxy.server.pools.get(db.database) as NonNullable<ReturnType<typeof proxy.server.pools.get>>;
  try {
    const worker = async (i: number): Promise<void> => {
      const extra: Record<string, string> = i % 7 === 0 ? { options: '-c work_mem=5MB' } : {};
      while (running) {
        const w = await quietly(wireOpen(proxy.port, db, extra));
        if (!w) {
          await sleep(20);
          continue;
        }
        try {
          for (let n = 0; n < 20 && running; n++) {
            const r = random(100);
            if (r < 40) await ask(w, `select ${n}`, 10_000);
            else if (r < 55) {
              await ask(w, 'begin', 10_000);
              await ask(w, 'select pg_sleep(0.01)', 10_000);
              await ask(w, 'commit', 10_000);
            } else if (r < 65) {
              w.send(serialize.parse({ text: 'select $1::int as v' }), serialize.bind({ values: [String(n)] }), serialize.execute({}), serialize.sync());
              await w.untilReady(1, 10_000);
            } else if (r < 72) {
              // Gone while it waits (on the desk, or in the pool), or while its query runs.
              w.send(serialize.query('select pg_sleep(0.05)'));
              await sleep(random(30));
              w.socket.destroy();
              break;
            } else if (r < 76) {
              w.socket.pause();
              w.send(serialize.query("select repeat('x', 1000) from generate_series(1, 2000)"));
              await sleep(random(50));
              w.socket.resetAndDestroy();
              break;
            } else if (r < 80) {
              await ask(w, "set application_name = 'chaos'", 10_000); // the engine's: off the desk
            } else if (r < 84) {
              await ask(w, 'begin', 10_000);
              w.socket.destroy(); // leaves inside a transaction (on the desk's connection)
              break;
            } else {
              await ask(w, 'select 1', 10_000);
            }
          }
        } catch {
          // refused (QueryWaitTimeout), the connection lost: this client is done
        } finally {
          w.socket.destroy();
        }
      }
    };
    const chaos = (): Promise<void> => poolChaos(proxy, db, random, () => running);
    const workers = Array.from({ length: 24 }, (_, i) => worker(i));
    const chaotic = chaos();
    await sleep(15_000);
    running = false;
    await Promise.all([...workers, chaotic]);

    // Everyone gone: the pool holds idle connections only, each one really there.
    await waitUntil(() => proxy.server.clients().length === 0, 20_000, 'every client session ended');
    await waitUntil(
      async () => {
        const s = pool().stats;
        return s.active === 0 && s.loggingIn === 0 && s.checking === 0 && s.resetting === 0 && s.waiting === 0;
      },
      20_000,
      `no connection held by nobody: ${JSON.stringify(pool().stats)} desk ${JSON.stringify(deskStats(proxy, db))}`,
    );
    const desk = deskStats(proxy, db);
    assert.equal(desk?.count, desk?.idle, 'the desk holds idle connections only');
    await waitUntil(async () => (await db.backendsOf(db.tokenRole)) === pool().size, 10_000, `the pool counts what is there: ${pool().size}`);

    // Last: clients waiting on the desk when the proxy shuts down.
    pool().update({ ...pool().settings, size: 1, queryWaitTimeoutMs: 60_000 });
    const holder = await wireOpen(proxy.port, db);
    await ask(holder, 'select 1');
    const waiters: WireClient[] = [];
    for (let i = 0; i < 5; i++) {
      const w = await wireOpen(proxy.port, db);
      await ask(w, 'select 1');
      waiters.push(w);
    }
    await ask(holder, 'select 1');
    await ask(holder, 'begin');
    for (const w of waiters) w.send(serialize.query('select 2'));
    await waitUntil(() => (deskStats(proxy, db)?.waiting ?? 0) + (pool().stats.waiting ?? 0) >= 5, 5000, 'five clients wait');
    await sleep(300);
    const closing = proxy.server.close();
    holder.socket.destroy();
    await closing;
    for (const w of waiters) w.socket.destroy();
  } finally {
    running = false;
    await proxy.close().catch(() => {});
  }
});
