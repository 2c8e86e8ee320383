/**
 * Review of 9e8d1e7 (#evictsUnsettled): random pipelines of named statements (several
 * Sync-terminated sequences in one write, errors anywhere, BEGIN/COMMIT/ROLLBACK, DISCARD ALL,
 * DEALLOCATE ALL, Close, a Query inside an extended sequence) sent by several clients sharing a
 * small pool with MaxPreparedStatements 1..3, each also sent to one direct Postgres session: the
 * answers must be the same.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import type { TestPostgres } from './harness/postgres.js';
import { startTokenPostgres } from './harness/postgres.js';
import { seeded, withPoolMode } from './pool-transaction-support.js';
import { serialize, summary, WireClient } from './harness/wire.js';

let db: TestPostgres;
const token = 'tok-' + randomBytes(600).toString('base64url');
before(async () => {
  db = await startTokenPostgres(token);
});
after(() => db?.stop());

const open = (port: number): Promise<WireClient> => WireClient.open(port, { user: 'anyone', database: db.database });

/** Texts the clients share (the same text is one server statement): good ones, and one failing at Bind. */
const TEXTS = ['select 1 as a', 'select 2 as b', 'select 3 as c', 'select 4 as d', 'select 1/0 as z'];
const NAMES = ['a', 'b', 'c', 'd'];

/** One random pipeline: the messages and a description. */
function pipeline(rnd: (n: number) => number): { sent: Buffer[]; desc: string[]; firstEnd: number } {
  const sent: Buffer[] = [];
  const desc: string[] = [];
  const sequences = 1 + rnd(4);
  let last = false;
  let firstEnd = 0;
  for (let s = 0; s < sequences && !last; s++) {
    const ops = rnd(5);
    let executed = false;
    for (let i = 0; i < ops && !last; i++) {
      const op = rnd(100);
      const name = NAMES[rnd(NAMES.length)] as string;
      if (op < 4) {
        // A Parse that fails, under a name that never gets a statement (Postgres checks the text before the name: not compared here).
        desc.push('P e=bad');
        sent.push(serialize.parse({ name: 'e', text: 'select nosuchcolumn' }));
      } else if (op < 25) {
        const text = TEXTS[rnd(TEXTS.length)] as string;
        desc.push(`P ${name}=${TEXTS.indexOf(text)}`);
        sent.push(serialize.parse({ name, text }));
      } else if (op < 50) {
        executed = true;
        desc.push(`BE ${name}`);
        sent.push(serialize.bind({ statement: name }), serialize.execute({}));
      } else if (op < 58) {
        desc.push(`D ${name}`);
        sent.push(serialize.describe({ type: 'S', name }));
      } else if (op < 68) {
        desc.push(`C ${name}`);
        sent.push(serialize.close({ type: 'S', name }));
      } else if (op < 73) {
        desc.push('err');
        sent.push(serialize.describe({ type: 'S', name: 'no_such_statement' }));
      } else if (op < 80) {
        const text = ['begin', 'commit', 'rollback', 'select 1/0'][rnd(4)] as string;
        executed = true;
        desc.push(`X ${text}`);
        sent.push(serialize.parse({ text }), serialize.bind({}), serialize.execute({}));
      } else if (op < 82) {
        // Last in the pipeline: a Bind or Describe of a dropped name behind it is answered from the proxy's account (not compared here).
        last = true;
        desc.push('X deallocate all');
        sent.push(serialize.parse({ text: 'deallocate all' }), serialize.bind({}), serialize.execute({}));
      } else if (op < 84) {
        desc.push('F');
        sent.push(serialize.flush());
      } else if (op < 87 && !executed) {
        // A simple Query inside the extended sequence (Postgres skips it after an error there). Not
        // behind an Execute: Postgres then fails the command after the Sync with XX000 "unexpected state STARTED".
        const text = ['select 5', 'select 1/0', 'begin', 'commit'][rnd(4)] as string;
        desc.push(`Q ${text}`);
        sent.push(serialize.query(text));
      } else {
        executed = true;
        desc.push(`BDE ${name}`);
        sent.push(serialize.bind({ statement: name }), serialize.describe({ type: 'P' }), serialize.execute({}));
      }
    }
    const end = rnd(100);
    if (end < 80) {
      desc.push('S');
      sent.push(serialize.sync());
    } else {
      const text = ['discard all', 'deallocate all', 'begin', 'rollback', 'commit', 'select 1/0'][rnd(6)] as string;
      desc.push(`S Q ${text}`);
      sent.push(serialize.sync(), serialize.query(text));
    }
    if (s === 0) firstEnd = sent.length;
  }
  return { sent, desc, firstEnd };
}

/**
 * The answers up to the empty Query sent last (an error skips a Query inside its sequence, so the
 * ReadyForQuery count is not known beforehand; an empty Query is answered in an aborted transaction too).
 */
async function answers(w: WireClient, timeoutMs: number, first?: string): Promise<string[]> {
  const out: string[] = [];
  for (let ended = false, given = first; ; given = undefined) {
    const s = given ?? summary(await w.next(timeoutMs).catch((error: Error) => assert.fail(`${error.message} after ${out.join(',')}`)));
    if (s !== 'parameterStatus' && s !== 'notice') out.push(s);
    if (ended && s.startsWith('ready')) return out;
    if (s === 'emptyQuery') ended = true;
  }
}

async function client(proxyPort: number, directPort: number, rnd: (n: number) => number, rounds: number, who: number): Promise<void> {
  const pooled = await open(proxyPort);
  const direct = await open(directPort);
  const log: string[] = [];
  try {
    for (let round = 0; round < rounds; round++) {
      const { sent, desc, firstEnd } = pipeline(rnd);
      // A third of the rounds: the rest of the pipeline once the first answer came, after the first
      // sequence; a third: after any message, with a Flush (to both) so that the answers come.
      const how = rnd(3);
      let at = sent.length;
      if (how === 1 && firstEnd < sent.length) at = firstEnd;
      else if (how === 2 && sent.length > 1) {
        at = 1 + rnd(sent.length - 1);
        if (sent.slice(0, at).every((m) => m[0] === 0x48)) at = sent.length; // Flushes alone bring nothing
        else sent.splice(at++, 0, serialize.flush());
      }
      const split = at < sent.length;
      if (split) desc.push(`(split at ${at})`);
      direct.send(...sent, serialize.query(''));
      pooled.send(...(split ? sent.slice(0, at) : [...sent, serialize.query('')]));
      const first = split ? summary(await pooled.next(10_000)) : undefined;
      if (split) pooled.send(...sent.slice(at), serialize.query(''));
      const want = await answers(direct, 20_000).catch((error: Error) => assert.fail(`direct: ${error.message} [${desc.join('; ')}]`));
      const got = await answers(pooled, 10_000, first).catch((error: Error) => [`(${error.message})`]);
      log.push(`client ${who} round ${round} [${desc.join('; ')}]`);
      assert.deepEqual(got, want, log.slice(-6).join('\n'));
      // No transaction left open between rounds: the others need the pool.
      if (want.at(-1) !== 'ready I') {
        direct.send(serialize.query('rollback'), serialize.query(''));
        pooled.send(serialize.query('rollback'), serialize.query(''));
        const a = await answers(direct, 20_000);
        const b = await answers(pooled, 10_000).catch((error: Error) => [`(${error.message})`]);
        assert.deepEqual(b, a, `${log.slice(-6).join('\n')}\nthen rollback`);
      }
    }
  } finally {
    pooled.end();
    direct.end();
  }
}

const SEEDS = (process.env.REVIEW_SEEDS ?? Array.from({ length: 30 }, (_, i) => i + 1).join(',')).split(',').map(Number);
// Seeds 5, 6, 10, 14, 22, 28, 32, 37, 39 and 45 stalled before session 8's fix: a Flush held
// behind a simple-Query DISCARD ALL, dropped once its connection had gone back, left the client
// paused (TransactionSession #pump); REVIEW_ONLY=2 REVIEW_SEEDS=37 was the smallest case.
const CONFIGS = ['PoolSize=1;MaxPreparedStatements=1', 'PoolSize=2;MaxPreparedStatements=1', 'PoolSize=1;MaxPreparedStatements=2', 'PoolSize=2;MaxPreparedStatements=3'];
const ROUNDS = Number(process.env.REVIEW_ROUNDS ?? 40);

for (const seed of SEEDS) {
  const extra = `${CONFIGS[seed % CONFIGS.length] as string}${process.env.REVIEW_RELAY ? `;Relay=${process.env.REVIEW_RELAY}` : ''}`;
  test(`random pipelines of named statements from 3 clients, seed ${seed} (${extra}): as Postgres answers`, async () => {
    await withPoolMode(db, token, 'none', '', async (direct) => {
      await withPoolMode(db, token, 'transaction', extra, async (proxy) => {
        await Promise.all((process.env.REVIEW_ONLY ? [Number(process.env.REVIEW_ONLY)] : [0, 1, 2]).map((who) => client(proxy.port, direct.port, seeded(seed * 1000 + who), ROUNDS, who)));
      });
    });
  });
}
