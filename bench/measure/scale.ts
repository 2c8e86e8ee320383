/**
 * Scale: many idle sessions held open at once through one path, and the resident memory that
 * path's process gains per session (VmRSS after, minus before, over the session count).
 *
 * Sessions open in two halves, so that the memory of the second half alone gives the marginal
 * cost of a session as well: the first figure also carries the process's one-off growth (V8
 * enlarges its young generation under the load of the logins, by tens of MiB in all).
 */
import pg from 'pg';

export interface ScaleResult {
  readonly asked: number;
  readonly opened: number;
  readonly errors: number;
  /** The first few error messages, for the report. */
  readonly errorSamples: string[];
  readonly openSeconds: number;
  readonly rssBeforeKiB: number;
  readonly rssHalfKiB: number;
  readonly rssAfterKiB: number;
  /** (after - before) / opened. */
  readonly kibPerSession: number;
  /** (after - half) / sessions of the second half. */
  readonly marginalKibPerSession: number;
  /** Sessions that answered SELECT 1 once open. */
  readonly alive: number;
}

export interface ScaleOptions {
  readonly sessions: number;
  /** Logins in flight at once. */
  readonly concurrency: number;
  readonly rssKiB: () => number;
  /** Time for the process to settle before each memory reading. */
  readonly settleMs: number;
  readonly progress?: (opened: number) => void;
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

export async function holdSessions(config: pg.ClientConfig, options: ScaleOptions): Promise<ScaleResult> {
  const clients: pg.Client[] = [];
  const errors: string[] = [];
  let alive = 0;

  /** Opens sessions until `target` were tried, then runs one query in each new one. */
  const openUpTo = async (target: number, tried: { n: number }): Promise<void> => {
    const fresh: pg.Client[] = [];
    const worker = async (): Promise<void> => {
      while (tried.n < target) {
        tried.n++;
        const client = new pg.Client(config);
        client.on('error', (error: Error) => errors.push(`idle session: ${error.message}`));
        try {
          await client.connect();
          clients.push(client);
          fresh.push(client);
          if (clients.length % 500 === 0) options.progress?.(clients.length);
        } catch (error) {
          errors.push((error as Error).message);
        }
      }
    };
    await Promise.all(Array.from({ length: options.concurrency }, worker));
    // One query per session before a memory reading: a pooler may log a client in without a
    // server connection and attach one at its first query; every path is measured with both.
    for (let i = 0; i < fresh.length; i += 200) {
      const answers = await Promise.allSettled(fresh.slice(i, i + 200).map((client) => client.query('SELECT 1 AS one')));
      for (const answer of answers) {
        if (answer.status === 'fulfilled' && answer.value.rows[0]?.one === 1) alive++;
        else if (answer.status === 'rejected') errors.push(`SELECT 1: ${(answer.reason as Error).message}`);
      }
    }
  };

  await sleep(options.settleMs);
  const rssBeforeKiB = options.rssKiB();
  const tried = { n: 0 };
  const started = process.hrtime.bigint();
  const half = Math.floor(options.sessions / 2);
  await openUpTo(half, tried);
  const openedHalf = clients.length;
  await sleep(options.settleMs);
  const rssHalfKiB = options.rssKiB();
  await openUpTo(options.sessions, tried);
  const openSeconds = Number(process.hrtime.bigint() - started) / 1e9 - options.settleMs / 1000;
  await sleep(options.settleMs);
  const rssAfterKiB = options.rssKiB();

  for (let i = 0; i < clients.length; i += 500) {
    await Promise.allSettled(clients.slice(i, i + 500).map((client) => client.end()));
  }
  const opened = clients.length;
  return {
    asked: options.sessions,
    opened,
    errors: errors.length,
    errorSamples: [...new Set(errors)].slice(0, 5),
    openSeconds,
    rssBeforeKiB,
    rssHalfKiB,
    rssAfterKiB,
    kibPerSession: opened > 0 ? (rssAfterKiB - rssBeforeKiB) / opened : Number.NaN,
    marginalKibPerSession: opened > openedHalf ? (rssAfterKiB - rssHalfKiB) / (opened - openedHalf) : Number.NaN,
    alive,
  };
}
