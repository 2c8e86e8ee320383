/**
 * Desk review 2: clients' named statements on the desk's lendings (`rewrite`, TransactionSession
 * #deskNames) against a model, with each client pipelining several units at once, statement names
 * shared by clients with other texts, a unit naming two statements, MaxPreparedStatements=1
 * (eviction between the transactions of a desk connection), Close, re-Parse, DISCARD ALL.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import type { TestPostgres } from './harness/postgres.js';
import { startTokenPostgres } from './harness/postgres.js';
import { seeded, withPoolMode } from './pool-transaction-support.js';
import { serialize, summary, WireClient } from './harness/wire.js';
import { deskSkip } from './pool-transaction-desk-review-support.js';

let db: TestPostgres;
const token = 'tok-' + randomBytes(600).toString('base64url');
before(async () => {
  db = await startTokenPostgres(token);
});
after(() => db?.stop());

const TAGS = ['t0', 't1', 't2', 't3'];
const text = (tag: string): string => `select '${tag}'::text as v, $1::int as p`;

async function run(w: WireClient, rnd: (n: number) => number, batches: number, who: number, log: string[]): Promise<void> {
  const model = new Map<string, string>();
  const names = ['s1', 's2', 's3'];
  for (let batch = 0; batch < batches; batch++) {
    const sent: Buffer[] = [];
    const expected: string[] = [];
    const descs: string[] = [];
    const ops = 1 + rnd(6);
    for (let i = 0; i < ops; i++) {
      const op = rnd(100);
      const name = names[rnd(names.length)] as string;
      const other = names[rnd(names.length)] as string;
      if (op < 14) {
        const tag = TAGS[(rnd(TAGS.length) + who) % TAGS.length] as string;
        descs.push(`parse ${name}=${tag}`);
        sent.push(serialize.parse({ name, text: text(tag), types: [23] }), serialize.sync());
        if (model.has(name)) expected.push('error 42P05', 'ready I');
        else {
          expected.push('parseComplete', 'ready I');
          model.set(name, tag);
        }
      } else if (op < 20) {
        descs.push(`close ${name}`);
        sent.push(serialize.close({ type: 'S', name }), serialize.sync());
        expected.push('closeComplete', 'ready I');
        model.delete(name);
      } else if (op < 22) {
        descs.push('discard all');
        sent.push(serialize.query('discard all'));
        expected.push('complete DISCARD ALL', 'ready I');
        model.clear();
      } else if (op < 30) {
        descs.push(`describe ${name}`);
        sent.push(serialize.describe({ type: 'S', name }), serialize.sync());
        expected.push(...(model.has(name) ? ['parameterDescription', 'rowDescription', 'ready I'] : ['error 26000', 'ready I']));
      } else if (op < 45) {
        descs.push(`bind ${name} bind ${other}`);
        sent.push(
          serialize.bind({ statement: name, values: ['3'] }),
          serialize.execute({}),
          serialize.bind({ statement: other, values: ['4'] }),
          serialize.execute({}),
          serialize.sync(),
        );
        const a = model.get(name);
        const b = model.get(other);
        if (!a) expected.push('error 26000', 'ready I');
        else if (!b) expected.push('bindComplete', `row ["${a}","3"]`, 'complete SELECT 1', 'error 26000', 'ready I');
        else expected.push('bindComplete', `row ["${a}","3"]`, 'complete SELECT 1', 'bindComplete', `row ["${b}","4"]`, 'complete SELECT 1', 'ready I');
      } else {
        descs.push(`bind ${name}`);
        const tag = model.get(name);
        sent.push(serialize.bind({ statement: name, values: ['5'] }), serialize.describe({ type: 'P' }), serialize.execute({}), serialize.sync());
        expected.push(...(tag ? ['bindComplete', 'rowDescription', `row ["${tag}","5"]`, 'complete SELECT 1', 'ready I'] : ['error 26000', 'ready I']));
      }
    }
    w.send(...sent);
    const readies = sent.filter((m) => m[0] === 0x53 || m[0] === 0x51).length;
    const got = (await w.untilReady(readies, 15_000)).map(summary).filter((s) => s !== 'parameterStatus' && s !== 'notice');
    const line = `client ${who} batch ${batch} [${descs.join('; ')}]: ${got.join(',')}`;
    log.push(line);
    assert.deepEqual(got, expected, `${line}\n${log.slice(-10).join('\n')}`);
  }
}

for (const [seed, extra] of [
  [1, 'PoolSize=1;MaxPreparedStatements=1'],
  [2, 'PoolSize=2;MaxPreparedStatements=1'],
  [3, 'PoolSize=2;MaxPreparedStatements=2'],
  [4, 'PoolSize=1;MaxPreparedStatements=3'],
  [5, 'PoolSize=3;MaxPreparedStatements=1'],
] as const) {
  // Session 7 saw seed 5 fail 1 run in 10 under load (42P05): a later sequence evicted and
  // prepared again a statement whose Parse an earlier failing sequence had sent (see
  // TransactionSession #evictsUnsettled; pool-transaction-review.test.ts has the case alone).
  test(`pipelined named statements on the desk against a model, seed ${seed} (${extra})`, { skip: deskSkip }, async () => {
    await withPoolMode(db, token, 'transaction', extra, async (proxy) => {
      const log: string[] = [];
      const clients = await Promise.all(Array.from({ length: 5 }, () => WireClient.open(proxy.port, { user: 'anyone', database: db.database })));
      try {
        await Promise.all(clients.map((w, i) => run(w, seeded(seed * 100 + i), 80, i, log)));
        const desk = proxy.server.pools.get(db.database)?.desk;
        log.push(`desk ${JSON.stringify(desk?.stats)}`);
      } finally {
        for (const w of clients) w.end();
      }
    });
  });
}
