/**
 * 1,000 clients at once through the real program, each running the same number of queries:
 * every one completes, zero errors, every answer right, and afterwards every session closed
 * cleanly on both sides (no backend left, no descriptor left in the proxy). Counted, not timed:
 * the deadline only stops a hung run, and a slow machine passes. LAKEBASE_PROXY_LONG_TESTS=1
 * runs 100 queries per client.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import type pg from 'pg';
import type { TestPostgres } from './harness/postgres.js';
import { startProxiedPostgresProcess, type ProxyProcess } from './harness/proxy.js';
import { cleanEnvironment, LONG, openFds, pgClient, waitUntil, whoAmI } from './reliability-support.js';

cleanEnvironment();

const CLIENTS = 1000;
const QUERIES = LONG ? 100 : 4;
/**
 * Only for a run that hangs: 4,000 queries took 16 s on a busy 2-core machine (load 13). The
 * test's own timeout leaves room for the connects before and the checks after.
 */
const DEADLINE_MS = LONG ? 600_000 : 180_000;
const TEST_TIMEOUT_MS = DEADLINE_MS + 120_000;
let db: TestPostgres;
let proxy: ProxyProcess;
let close: () => Promise<void>;
const token = 'tok-' + randomBytes(600).toString('base64url');

before(async () => {
  // Each client holds two descriptors in the proxy (its socket and the upstream's): 2,000 here.
  ({ db, proxy, close } = await startProxiedPostgresProcess(token, ['--no-http', '--connect-timeout', '30s', '--pool-mode', 'none'], { extraConf: { max_connections: '1100' } }));
});

after(() => close?.());

test(`${CLIENTS} concurrent clients each complete ${QUERIES} queries with zero errors; every session closes cleanly`, { timeout: TEST_TIMEOUT_MS }, async (t) => {
  const pid = proxy.child.pid as number;
  const fdsBefore = openFds(pid);
  const errors: string[] = [];
  const clients: pg.Client[] = [];
  // Connect in waves so the test measures the relay, not the server's fork rate; then all run at once.
  for (let i = 0; i < CLIENTS; i += 100) {
    const wave = Array.from({ length: Math.min(100, CLIENTS - i) }, () => pgClient(proxy.port, db, { application_name: 'load' }));
    clients.push(...wave);
    await Promise.all(wave.map((c) => c.connect()));
  }
  assert.equal(await db.backendsOf(db.tokenRole), CLIENTS, 'every client has its own upstream session');
  const started = Date.now();
  const deadline = started + DEADLINE_MS;
  let queries = 0;
  await Promise.all(
    clients.map(async (c, n) => {
      for (let i = 0; i < QUERIES; i++) {
        if (Date.now() > deadline) {
          errors.push(`client ${n}: ${i} of ${QUERIES} queries done within ${DEADLINE_MS / 1000} s`);
          return;
        }
        try {
          if (i % 2 === 0) {
            const r = await c.query('select $1::int * 2 as v, $2::text as who', [n * 1000 + i, `c${n}`]);
            if (r.rows[0].v !== (n * 1000 + i) * 2 || r.rows[0].who !== `c${n}`) errors.push(`client ${n}: wrong answer ${JSON.stringify(r.rows[0])}`);
          } else {
            const r = await c.query(`select ${n} as n, repeat('z', ${(i * 37) % 2000}) as pad`);
            if (r.rows[0].n !== n || r.rows[0].pad.length !== (i * 37) % 2000) errors.push(`client ${n}: wrong answer`);
          }
          queries++;
        } catch (error) {
          errors.push(`client ${n}: ${(error as Error).message}`);
          return;
        }
      }
    }),
  );
  await Promise.all(clients.map((c) => c.end().catch((error: Error) => errors.push(`end: ${error.message}`))));
  assert.deepEqual(errors.slice(0, 10), [], `${errors.length} errors`);
  assert.equal(queries, CLIENTS * QUERIES, 'every client completed its queries');
  t.diagnostic(`${queries} queries in ${Date.now() - started} ms across ${CLIENTS} sessions`);

  await waitUntil(async () => (await db.backendsOf(db.tokenRole)) === 0, 15_000, 'every upstream backend gone');
  await waitUntil(() => openFds(pid) <= fdsBefore + 2, 15_000, 'the proxy back to its descriptors before');
  await waitUntil(() => (proxy.output().match(/"msg":"session ended"/g) ?? []).length >= CLIENTS, 5000, 'a log line per session');
  const ends = proxy
    .output()
    .split('\n')
    .filter((l) => l.includes('"msg":"session ended"'))
    .map((l) => (JSON.parse(l) as { end: string }).end);
  assert.deepEqual([...new Set(ends)], ['client_closed'], 'each session ended by its client, none by an error');
  assert.doesNotMatch(proxy.output(), /"level":(50|60)/, 'nothing logged as error or fatal');
  assert.equal(await whoAmI(proxy.port, db), db.tokenRole);
});
