/**
 * A stand-in `databricks` executable (a small Node.js script) for AuthScheme=DatabricksCli: put
 * its folder first on the PATH of the program under test.
 *
 * `databricks auth token --host <host>` or `--profile <profile>` prints what the real CLI prints
 * (`json.MarshalIndent` of a golang.org/x/oauth2 Token, two-space indent, no newline at the end):
 *
 *   {
 *     "access_token": "<token>",
 *     "token_type": "Bearer",
 *     "refresh_token": "<refresh token>",
 *     "expiry": "2025-06-01T11:00:00.123456789+02:00"
 *   }
 *
 * Its token is a real one of the Databricks stand-in: each run asks the stand-in's token endpoint
 * for one (client credentials of the stand-in's service principal), as the real CLI would refresh
 * its cached token. With `fail` it exits 1 with the real CLI's message for a host it has no login
 * for. Every run appends its arguments, as a JSON array, to `log`.
 */
import { chmodSync, existsSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { DatabricksStandin } from './databricks-standin.js';

export interface CliStandin {
  /** The folder holding `databricks`: put it on the PATH. */
  readonly dir: string;
  /** The argument lists of every run so far. */
  runs(): string[][];
  /** Make the next runs fail as the CLI does for a host it has no login for (or succeed again). */
  fail(failing: boolean): void;
  /** Every refresh token the CLI printed: they must never reach the proxy's output. */
  refreshTokens(): string[];
}

const SCRIPT = `#!/usr/bin/env node
const { appendFileSync, existsSync, readFileSync } = require('node:fs');
const { randomBytes } = require('node:crypto');
const state = JSON.parse(readFileSync(__dirname + '/state.json', 'utf8'));
const args = process.argv.slice(2);
appendFileSync(__dirname + '/runs.log', JSON.stringify(args) + '\\n');
if (args[0] !== 'auth' || args[1] !== 'token') {
  process.stderr.write('Error: unknown command "' + args.join(' ') + '" for "databricks"\\n');
  process.exit(1);
}
const host = args[args.indexOf('--host') + 1];
if (existsSync(__dirname + '/failing')) {
  process.stderr.write('Error: cache: databricks OAuth is not configured for this host. Try logging in again with \`databricks auth login --host ' + (host || state.url) + '\` before retrying. If this fails, please report this issue to the Databricks CLI maintainers at https://github.com/databricks/cli/issues/new\\n');
  process.exit(1);
}
(async () => {
  const basic = Buffer.from(state.clientId + ':' + state.clientSecret).toString('base64');
  const response = await fetch(state.url + '/oidc/v1/token', {
    method: 'POST',
    headers: { authorization: 'Basic ' + basic, 'content-type': 'application/x-www-form-urlencoded' },
    body: 'grant_type=client_credentials&scope=all-apis',
  });
  const token = await response.json();
  const refresh = 'doau' + randomBytes(32).toString('base64url');
  appendFileSync(__dirname + '/refresh.log', refresh + '\\n');
  // Go's time.Time in JSON: RFC 3339 with nanoseconds and the local offset (here +02:00).
  const at = new Date(Date.now() + token.expires_in * 1000 + 2 * 3600 * 1000).toISOString().replace('Z', '');
  const expiry = at.slice(0, 19) + '.' + at.slice(20, 23) + '456789+02:00';
  process.stdout.write(JSON.stringify({ access_token: token.access_token, token_type: 'Bearer', refresh_token: refresh, expiry }, null, 2));
})().catch((error) => {
  process.stderr.write('Error: ' + error.message + '\\n');
  process.exit(1);
});
`;

export function installDatabricksCli(dir: string, standin: DatabricksStandin): CliStandin {
  writeFileSync(join(dir, 'state.json'), JSON.stringify({ url: standin.url, clientId: standin.clientId, clientSecret: standin.clientSecret }));
  const path = join(dir, 'databricks');
  // CommonJS, whatever the package.json above says.
  writeFileSync(join(dir, 'package.json'), '{"type":"commonjs"}');
  writeFileSync(path, SCRIPT);
  chmodSync(path, 0o755);
  const lines = (file: string): string[] => (existsSync(join(dir, file)) ? readFileSync(join(dir, file), 'utf8').split('\n').filter(Boolean) : []);
  return {
    dir,
    runs: () => lines('runs.log').map((line) => JSON.parse(line) as string[]),
    fail(failing) {
      if (failing) writeFileSync(join(dir, 'failing'), '');
      else rmSync(join(dir, 'failing'), { force: true });
    },
    refreshTokens: () => lines('refresh.log'),
  };
}
