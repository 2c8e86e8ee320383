/** What the OAuth tests (test/oauth-*.test.ts, reliability-oauth) share: a stand-in tied to a real Postgres. */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach } from 'node:test';
import { startDatabricksStandin, type DatabricksStandin, type StandinOptions } from './databricks-standin.js';
import { startPostgres, type TestPostgres } from './postgres.js';

export interface StandinWithPostgres {
  readonly db: TestPostgres;
  readonly standin: DatabricksStandin;
  /** A private temp folder (for settings files); close() removes it. */
  readonly dir: string;
  /** Closes the stand-in, stops Postgres and removes `dir`. */
  close(): Promise<void>;
}

export interface StandinWithPostgresOptions extends Omit<StandinOptions, 'onIssue'> {
  /** Only database credentials become the password (workspace tokens are not Postgres passwords then). */
  readonly databaseCredentialsOnly?: boolean;
  /** The start of `dir`'s name in the temp folder; default 'lbp-oauth-'. */
  readonly dirPrefix?: string;
}

/**
 * A test Postgres and a Databricks stand-in whose tokens become the token role's password as they
 * are issued, valid until they expire: Postgres then accepts a token exactly while it is valid.
 */
export async function startStandinWithPostgres(options: StandinWithPostgresOptions = {}): Promise<StandinWithPostgres> {
  const { databaseCredentialsOnly = false, dirPrefix = 'lbp-oauth-', ...standinOptions } = options;
  const db = await startPostgres();
  let standin: DatabricksStandin;
  try {
    standin = await startDatabricksStandin({
      ...standinOptions,
      onIssue: (token, expiresAt, kind) => (databaseCredentialsOnly && kind !== 'database' ? undefined : db.setTokenPassword(token, expiresAt)),
    });
  } catch (error) {
    await db.stop();
    throw error;
  }
  const dir = mkdtempSync(join(tmpdir(), dirPrefix));
  return {
    db,
    standin,
    dir,
    async close() {
      await standin.close();
      await db.stop();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/**
 * Registers an afterEach hook that closes whatever the returned function was given during the
 * test. For token sources: one left running would refresh in the background and change the
 * role's password under the next test.
 */
export function closedAfterEachTest<T extends { close(): Promise<void> }>(): (item: T) => T {
  const open: T[] = [];
  afterEach(() => Promise.all(open.splice(0).map((item) => item.close())));
  return (item) => {
    open.push(item);
    return item;
  };
}
