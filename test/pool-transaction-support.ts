/** What the PoolMode=transaction test files share: a proxy per test, and clients that keep its pool busy. */
import assert from 'node:assert/strict';
import type { TestPostgres } from './harness/postgres.js';
import type { WireClient } from './harness/wire.js';
import { connectionFor, startProxy, type InProcessProxy } from './harness/proxy.js';
import { pgClient, sleep } from './reliability-support.js';

/** A proxy in front of `db` with `PoolMode` (and `extra` settings) for the length of `fn`. */
export async function withPoolMode<T>(db: TestPostgres, token: string, mode: string, extra: string, fn: (proxy: InProcessProxy) => Promise<T>): Promise<T> {
  const proxy = await startProxy(['--connection', connectionFor(db, token, `PoolMode=${mode}${extra ? `;${extra}` : ''}`)]);
  try {
    return await fn(proxy);
  } finally {
    await proxy.close();
  }
}

/**
 * Three clients that run short transactions with a named statement `s1` on the proxy's pool
 * until `stop()`, which resolves with the errors they met.
 */
export function busyClients(port: number, db: TestPostgres): { stop(): Promise<string[]> } {
  let busy = true;
  const errors: string[] = [];
  const clients = Array.from({ length: 3 }, async () => {
    while (busy) {
      const c = pgClient(port, db, { query_timeout: 20_000 });
      try {
        await c.connect();
        await c.query('begin');
        await c.query({ name: 's1', text: 'select $1::int + 1 as other', values: [1] });
        await sleep(5);
        await c.query('commit');
      } catch (error) {
        errors.push((error as Error).message);
      } finally {
        await c.end().catch(() => {});
      }
    }
  });
  return {
    async stop() {
      busy = false;
      await Promise.all(clients);
      return errors;
    },
  };
}

/** Numbers below `n` from a xorshift generator seeded with `seed`: the same sequence for a seed. */
export function seeded(seed: number): (n: number) => number {
  let state = seed >>> 0 || 1;
  return (n) => {
    state ^= state << 13;
    state ^= state >>> 17;
    state ^= state << 5;
    return (state >>> 0) % n;
  };
}

export interface Step {
  readonly send: Buffer[];
  readonly readies?: number;
  readonly until?: string;
}

/** Each step sent to a pooled and a direct client alike: what `read` takes of their answers must be the same. */
export async function answersAlike(pooled: WireClient, direct: WireClient, steps: readonly Step[], read: (w: WireClient, step: Step) => Promise<string[]>): Promise<void> {
  let n = 0;
  for (const step of steps) {
    n++;
    pooled.send(...step.send);
    direct.send(...step.send);
    const want = await read(direct, step);
    const got = await read(pooled, step).catch((error: Error) => [`(${error.message})`]);
    assert.deepEqual(got, want, `step ${n}`);
  }
}
