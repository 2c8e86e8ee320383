/**
 * SIGTERM under load, through the real program: 40 sessions each with a query in flight, and a
 * client trying to connect every few milliseconds throughout. Every query in flight finishes;
 * every new connection either becomes a whole working session or is answered 57P03 (refused once
 * the process has stopped), never a half-built one (AuthenticationOk and then nothing); the
 * process exits 0 and leaves no upstream backend.
 * (One session and the delays are in shutdown.test.ts.)
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { connect as netConnect } from 'node:net';
import { serialize } from 'pg-protocol';
import { parseFields } from '../src/wire/backend-messages.js';
import { startTokenPostgres, type TestPostgres } from './harness/postgres.js';
import { connectionFor, startProxyProcess } from './harness/proxy.js';
import { cleanEnvironment, pgClient, sleep, waitUntil } from './reliability-support.js';

cleanEnvironment();
let db: TestPostgres;
const token = 'tok-' + randomBytes(48).toString('base64url');

before(async () => {
  db = await startTokenPostgres(token);
});

after(async () => {
  await db?.stop();
});

type Attempt = 'session' | 'refused' | `error ${string}` | 'half-built';

/** One raw connection attempt: startup, then (if it gets that far) a query and Terminate. */
function attempt(port: number): Promise<Attempt> {
  return new Promise((resolve) => {
    const socket = netConnect({ host: '127.0.0.1', port });
    let reply = Buffer.alloc(0);
    let authenticated = false;
    let ready = 0;
    let settled = false;
    const done = (outcome: Attempt): void => {
      if (settled) return;
      settled = true;
      socket.destroy();
      resolve(outcome);
    };
    socket.setTimeout(15_000, () => done(authenticated ? 'half-built' : 'error timeout'));
    socket.once('connect', () => socket.write(serialize.startup({ user: 'late', database: db.database })));
    socket.on('error', () => {});
    socket.on('data', (chunk: Buffer) => {
      reply = Buffer.concat([reply, chunk]);
      while (reply.length >= 5 && reply.length >= 1 + reply.readInt32BE(1)) {
        const type = String.fromCharCode(reply[0] as number);
        const body = reply.subarray(5, 1 + reply.readInt32BE(1));
        reply = reply.subarray(1 + reply.readInt32BE(1));
        if (type === 'R' && body.readInt32BE(0) === 0) authenticated = true;
        if (type === 'E') return done(`error ${Object.fromEntries(parseFields(body))['C']}`);
        if (type === 'Z' && ++ready === 1) socket.write(serialize.query('select 1'));
        if (type === 'Z' && ready === 2) {
          socket.end(serialize.end());
          return done('session');
        }
      }
    });
    socket.once('close', () => done(authenticated ? 'half-built' : 'refused'));
  });
}

test('SIGTERM under load: queries in flight finish, new connections are whole sessions or refused, exit 0, nothing left upstream', async (t) => {
  const proxy = await startProxyProcess(['--connection', connectionFor(db, token), '--no-http', '--max-sigterm-delay', '15000', '--pool-size', '200']);
  const clients = Array.from({ length: 40 }, () => pgClient(proxy.port, db, { application_name: 'in-flight' }));
  await Promise.all(clients.map((c) => c.connect()));

  // New connections all along, before and after the signal.
  let connecting = true;
  const attempts: Attempt[] = [];
  const connector = (async () => {
    while (connecting) {
      attempts.push(await attempt(proxy.port));
      await sleep(5);
    }
  })();

  // Each session keeps a query of 0.3-1 s in flight until the signal, then finishes it and leaves.
  let signalled = false;
  const finished: number[] = [];
  const errors: string[] = [];
  const sessions = clients.map(async (c, n) => {
    while (!signalled) {
      try {
        const r = await c.query('select pg_sleep($1::float), $2::int as n', [0.3 + (n % 8) / 10, n]);
        if (r.rows[0].n !== n) errors.push(`session ${n}: wrong answer`);
        if (signalled) finished.push(n);
      } catch (error) {
        errors.push(`session ${n}: ${(error as Error).message}`);
        return;
      }
    }
    await c.end();
  });
  await sleep(700);
  await waitUntil(async () => (await db.query("select 1 from pg_stat_activity where application_name = 'in-flight' and state = 'active'")).length >= 30, 5000, 'queries in flight');
  proxy.child.kill('SIGTERM');
  signalled = true;
  await Promise.all(sessions);
  const code = await proxy.exited;
  connecting = false;
  await connector;

  assert.deepEqual(errors, [], 'no session lost its query');
  assert.equal(finished.length, 40, 'every query in flight at the signal finished with its answer');
  assert.equal(code, 0, proxy.output().split('\n').slice(-5).join('\n'));
  assert.match(proxy.output(), /"endedByThemselves":true/);
  const counts: Record<string, number> = {};
  for (const a of attempts) counts[a] = (counts[a] ?? 0) + 1;
  t.diagnostic(JSON.stringify(counts));
  assert.ok((counts['session'] ?? 0) > 0 && (counts['error 57P03'] ?? 0) > 0, 'connections both before and after the signal');
  assert.deepEqual(
    Object.keys(counts).filter((k) => k !== 'session' && k !== 'refused' && k !== 'error 57P03'),
    [],
    'a new connection is a working session, or answered 57P03 while the proxy drains (refused once it has stopped), never half-built',
  );
  await waitUntil(async () => (await db.backendsOf(db.tokenRole)) === 0, 5000, 'no upstream backend left');
});
