/**
 * Review of 73e4ae5 (session mode in C: idle pooled connections wait on the pool's desk, C relays
 * and resets whole sessions on them) against a real Postgres:
 * - a client waiting in a full pool for other startup parameters is served when a connection
 *   comes free, whether its reset ran in JavaScript or in C (parking a clean connection on the
 *   desk used to wake no waiting client: it waited out QueryWaitTimeout);
 * - a reset C ran after a desk session is counted once in server_resets_total, also when its
 *   answer went to JavaScript (a ParameterStatus);
 * - a desk session's connection closed at shutdown is counted as closed for shutdown, as a
 *   session on a connection from the pool's JavaScript side is, not as closed by the server;
 * - a CancelRequest still on its way for a client that has left does not cancel the query of the
 *   next client its connection serves (session mode had no guard, before 73e4ae5 either;
 *   transaction mode has one, TransactionSession's #cancelling): the session's connection goes
 *   back to the pool, which waits for the cancel before its reset (ServerConnection.cancelling).
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import pg from 'pg';
import type { TestPostgres } from './harness/postgres.js';
import { startTokenPostgres } from './harness/postgres.js';
import { connectionFor, startProxy, type InProcessProxy } from './harness/proxy.js';
import { readFileSync } from 'node:fs';
import { cancelRequest, pgClient, waitUntil } from './reliability-support.js';
import { serialize, type WireClient } from './harness/wire.js';
import { ask, firstValue, lockGate, startHoldingForwarder, waitsOnLock, wireOpen } from './pool-transaction-desk-review-support.js';
import { native } from '../src/proxy/native-relay.js';
import { Metrics } from '../src/ops/metrics.js';
import type { ProxyObserver } from '../src/proxy/observer.js';

let db: TestPostgres;
const token = 'tok-' + randomBytes(600).toString('base64url');

before(async () => {
  // The cancel's signal (DEBUG2, logged just before it is sent) and the statements, in the order they happened.
  db = await startTokenPostgres(token, { extraConf: { log_min_messages: 'debug2', log_statement: 'all' } });
  await db.query(`create table desk_review_cancel_a (); create table desk_review_cancel_b (); grant select on desk_review_cancel_a, desk_review_cancel_b to public`);
  // A reset (ServerResetQuery) that waits on this table's lock while the test holds it, and answers plainly (CommandComplete "DO").
  await db.query('create table desk_review_reset_gate (); grant select on desk_review_reset_gate to public');
});
after(() => db?.stop());

const skip = native.addon ? false : `the desk needs the native relay: ${native.problem}`;

async function withPool<T>(extra: string, fn: (proxy: InProcessProxy) => Promise<T>, observer?: ProxyObserver): Promise<T> {
  const proxy = await startProxy(['--connection', connectionFor(db, token, extra), '--relay', 'native'], observer ? { observer } : {});
  try {
    return await fn(proxy);
  } finally {
    await proxy.close();
  }
}

async function pidOf(c: pg.Client): Promise<number> {
  return (await c.query<{ pid: number }>('select pg_backend_pid() as pid')).rows[0]?.pid as number;
}

async function session<T>(proxy: InProcessProxy, fn: (c: pg.Client) => Promise<T>, extra: Partial<pg.ClientConfig> = {}): Promise<T> {
  const c = pgClient(proxy.port, db, extra);
  await c.connect();
  try {
    return await fn(c);
  } finally {
    await c.end().catch(() => {});
  }
}

const pool = (proxy: InProcessProxy) => proxy.server.pools.get(db.database);
const deskIdle = (proxy: InProcessProxy): number => pool(proxy)?.desk?.stats.idle ?? 0;
const sessionsOnDesk = (proxy: InProcessProxy): number => proxy.logs.filter((l) => l['msg'] === 'session started' && l['onDesk'] === true).length;
const sessionsEnded = (proxy: InProcessProxy): number => proxy.logs.filter((l) => l['msg'] === 'session ended').length;
const backendGone = async (pid: number): Promise<boolean> => (await db.query<{ n: number }>('select count(*)::int as n from pg_stat_activity where pid = $1', [pid]))[0]?.n === 0;

function sample(text: string, name: string, labels = ''): number {
  const line = text.split('\n').find((l) => l.startsWith(`lakebase_proxy_${name}{target="review"${labels}} `));
  return Number(line?.split(' ').at(-1));
}

test('a full pool: a client waiting for other parameters gets a login once the only connection comes free (reset in JavaScript, then parked on the desk)', { skip }, async () => {
  await withPool('PoolSize=1;QueryWaitTimeout=5s', async (proxy) => {
    const holder = pgClient(proxy.port, db, { application_name: 'desk-review-a' });
    await holder.connect();
    const holderPid = await pidOf(holder);
    const other = pgClient(proxy.port, db, { application_name: 'desk-review-b' });
    const connecting = other.connect();
    await waitUntil(() => pool(proxy)?.stats.waiting === 1, 5000, 'the other client waits (precondition)');
    await holder.end();
    // Its connection is reset and parked on the desk: the waiting client must be told (then it evicts that connection and logs in).
    await connecting;
    try {
      assert.equal((await other.query<{ app: string }>("select current_setting('application_name') as app")).rows[0]?.app, 'desk-review-b');
      assert.notEqual(await pidOf(other), holderPid, 'a login of its own');
    } finally {
      await other.end();
    }
  });
});

test('a full pool: a client waiting for other parameters gets a login once a reset C ran ends (LP_DESK_RELEASED)', { skip }, async () => {
  await withPool('PoolSize=1;QueryWaitTimeout=5s;ServerResetQuery="do $$begin perform count(*) from desk_review_reset_gate; end$$"', async (proxy) => {
    const app = { application_name: 'desk-review-c' };
    await session(proxy, pidOf, app);
    await waitUntil(() => deskIdle(proxy) === 1, 5000, 'the connection parked on the desk (precondition)');
    const gate = await lockGate(db, 'desk_review_reset_gate');
    try {
      await session(proxy, pidOf, app); // on the desk; its reset in C waits on the gate
      assert.equal(sessionsOnDesk(proxy), 1, 'the second session ran on the desk (precondition)');
      await waitUntil(() => pool(proxy)?.desk?.stats.resetting === 1, 5000, 'C resets the connection (precondition)');
      const other = pgClient(proxy.port, db, { application_name: 'desk-review-d' });
      const connecting = other.connect();
      await waitUntil(() => pool(proxy)?.stats.waiting === 1, 5000, 'the other client waits (precondition)');
      await gate.open(); // the reset answers CommandComplete and ReadyForQuery: released to the pool, for its waiting client
      await connecting;
      try {
        assert.equal((await other.query<{ app: string }>("select current_setting('application_name') as app")).rows[0]?.app, 'desk-review-d');
      } finally {
        await other.end();
      }
    } finally {
      await gate.close();
    }
  });
});

test('server_resets_total: a reset C ran after a desk session counts once, also when its answer goes to JavaScript (a ParameterStatus)', { skip }, async () => {
  const metrics = new Metrics();
  await withPool(
    '',
    async (proxy) => {
      const app = { application_name: 'desk-review-e' };
      await session(proxy, pidOf, app); // a login; reset in JavaScript (1), then parked on the desk
      await waitUntil(() => deskIdle(proxy) === 1, 5000, 'the connection parked on the desk (precondition)');
      // On the desk: its SET makes DISCARD ALL report application_name, so C hands the answer to JavaScript.
      await session(proxy, (c) => c.query("set application_name = 'changed'"), app);
      assert.equal(sessionsOnDesk(proxy), 1, 'the second session ran on the desk (precondition)');
      await waitUntil(() => sessionsEnded(proxy) === 2 && deskIdle(proxy) === 1 && pool(proxy)?.desk?.stats.resetting === 0, 5000, 'reset (2) and parked again');
      const text = await metrics.text();
      assert.equal(sample(text, 'server_resets_total'), 2, 'two sessions, two resets');
      assert.equal(sample(text, 'server_logins_total'), 1);
    },
    metrics.observerFor('review'),
  );
});

test("server_closes_total: a desk session's connection closed at shutdown counts as reason shutdown, not server_closed", { skip }, async () => {
  const metrics = new Metrics();
  const proxy = await startProxy(['--connection', connectionFor(db, token), '--relay', 'native'], { observer: metrics.observerFor('review') });
  let pid = 0;
  try {
    const app = { application_name: 'desk-review-f' };
    pid = await session(proxy, pidOf, app);
    await waitUntil(() => deskIdle(proxy) === 1, 5000, 'the connection parked on the desk (precondition)');
    const c = pgClient(proxy.port, db, app);
    await c.connect();
    assert.equal(await pidOf(c), pid);
    assert.equal(sessionsOnDesk(proxy), 1, 'the session runs on the desk (precondition)');
  } finally {
    await proxy.close(); // closes the running session, and its connection with it
  }
  await waitUntil(() => backendGone(pid), 5000, 'the connection closed');
  const text = await metrics.text();
  assert.equal(sample(text, 'server_closes_total', ',reason="server_closed"'), 0, 'the server closed nothing');
  assert.equal(sample(text, 'server_closes_total', ',reason="shutdown"'), 1);
});

test('shutdown: a connection whose reset C runs closes at once, like the idle ones (the janitor that would time the reset out has stopped)', { skip }, async () => {
  const metrics = new Metrics();
  const proxy = await startProxy(['--connection', connectionFor(db, token, 'ServerResetQuery="do $$begin perform count(*) from desk_review_reset_gate; end$$"'), '--relay', 'native'], {
    observer: metrics.observerFor('review'),
  });
  const app = { application_name: 'desk-review-g' };
  const closedForShutdown = async (): Promise<number> => sample(await metrics.text(), 'server_closes_total', ',reason="shutdown"');
  try {
    const pid = await session(proxy, pidOf, app);
    await waitUntil(() => deskIdle(proxy) === 1, 5000, 'the connection parked on the desk (precondition)');
    const gate = await lockGate(db, 'desk_review_reset_gate');
    try {
      assert.equal(await session(proxy, pidOf, app), pid);
      assert.equal(sessionsOnDesk(proxy), 1, 'the second session ran on the desk (precondition)');
      await waitUntil(() => pool(proxy)?.desk?.stats.resetting === 1, 5000, 'C resets the connection (precondition)');
      await proxy.close();
      // The reset waits on the lock for as long as the test holds it: the connection must not.
      await waitUntil(async () => (await closedForShutdown()) === 1, 5000, 'the connection closed at shutdown');
    } finally {
      await gate.close();
    }
  } finally {
    await proxy.close();
  }
});

test("a desk session's cancel still on its way when its client left does not cancel the next client's query on that connection", { skip }, () => cancelOnItsWay(true));

test("the same for a session on a fresh login (the pool's JavaScript side): its connection waits for the cancel before its reset", { skip }, () => cancelOnItsWay(false));

/** a's CancelRequest is held on its way while a finishes and leaves; b, next on a's connection, must not be cancelled. `onDesk`: a's session is C's. */
async function cancelOnItsWay(onDesk: boolean): Promise<void> {
  const forwarder = await startHoldingForwarder(db);
  const connection = `Server=localhost;Port=${forwarder.port};User=${db.tokenRole};SSLRootCert=${db.ca.caFile};OAuthAccessToken=${token};Database=${db.database};PoolSize=1;QueryWaitTimeout=60s`;
  const proxy = await startProxy(['--connection', connection, '--relay', 'native']);
  const app = { application_name: 'desk-review-cancel' };
  const gateA = await lockGate(db, 'desk_review_cancel_a');
  const gateB = await lockGate(db, 'desk_review_cancel_b');
  let a: WireClient | undefined;
  let b: WireClient | undefined;
  try {
    if (onDesk) {
      const first = await wireOpen(proxy.port, db, app);
      await ask(first, 'select 1');
      first.end();
      await waitUntil(() => deskIdle(proxy) === 1, 5000, 'the connection parked on the desk (precondition)');
    }
    a = await wireOpen(proxy.port, db, app);
    assert.equal(sessionsOnDesk(proxy), onDesk ? 1 : 0, `a's session runs ${onDesk ? 'on the desk' : 'in JavaScript'} (precondition)`);
    const backend = firstValue(await ask(a, 'select pg_backend_pid()'));
    a.send(serialize.query('select count(*) from desk_review_cancel_a'));
    const aDone = a.untilReady(1, 30_000);
    await waitUntil(() => waitsOnLock(db, 'desk_review_cancel_a'), 10_000, "a's query runs (precondition)");
    // a's cancel: the proxy opens a new connection to the server for it, held here.
    forwarder.hold();
    void cancelRequest(proxy.port, a.processId, a.secretKey);
    await waitUntil(() => forwarder.held === 1, 5000, 'the proxy sent the cancel (precondition)');
    await gateA.open();
    assert.ok(!(await aDone).some((m) => m.name === 'error'), 'a finished before its cancel arrived');
    a.end(); // between two queries: C resets its connection
    await waitUntil(() => sessionsEnded(proxy) === (onDesk ? 2 : 1), 5000, "a's session ended");

    // b, of a's parameters: greeted at once on a's connection (the defect), or made to wait until the cancel landed.
    let greeted: WireClient | undefined;
    const opening = wireOpen(proxy.port, db, app).then((client) => (greeted = client));
    await waitUntil(() => greeted !== undefined || (pool(proxy)?.stats.waiting ?? 0) + (pool(proxy)?.stats.loggingIn ?? 0) > 0, 10_000, 'b greeted, or waiting');
    const marker = "select 'desk-review-b' as marker, count(*) from desk_review_cancel_b";
    let bDone: Promise<unknown> | undefined;
    let bAnswered = false;
    const query = (client: WireClient): void => {
      client.send(serialize.query(marker));
      bDone = client.untilReady(1, 60_000).finally(() => (bAnswered = true));
    };
    if (greeted) {
      b = greeted;
      query(b);
      await waitUntil(() => waitsOnLock(db, 'desk_review_cancel_b'), 10_000, "b's query runs before the cancel arrives");
    }
    forwarder.release();
    const signalled = `processing cancel request: sending SIGINT to process ${String(backend)}`;
    await waitUntil(() => readFileSync(db.logFile, 'utf8').includes(signalled), 20_000, 'the server signalled the backend');
    if (!b) {
      b = await opening;
      query(b);
    }
    // b's query waits on its lock until the test opens it: a cancel that reached it answers it at once, with an error.
    await waitUntil(async () => bAnswered || (await waitsOnLock(db, 'desk_review_cancel_b')), 20_000, "b's query runs once the cancel arrived");
    await gateB.open();
    const got = firstValue((await bDone) as Parameters<typeof firstValue>[0]);
    assert.equal(got, 'desk-review-b', `b's query was cancelled by a's CancelRequest: ${String(got)}`);
  } finally {
    forwarder.release();
    await gateA.close();
    await gateB.close();
    a?.socket.destroy();
    b?.socket.destroy();
    await proxy.close();
    await forwarder.close();
  }
}
