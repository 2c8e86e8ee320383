/**
 * AuthScheme=DatabricksCli: the token of a person who already ran `databricks auth login`, taken
 * as the Databricks SDKs take it (their `databricks-cli` auth type): by running
 * `databricks auth token --profile <profile>` (or `--host <workspace>` without a profile), which
 * prints JSON with `access_token`, `token_type` and `expiry` (and the CLI's refresh token, which
 * the proxy never keeps: the CLI refreshes by itself). The token is cached like any other and
 * taken again by running the command before it expires.
 */
import { execFile } from 'node:child_process';
import type { Logger } from '../ops/log.js';
import { jwtExpiry } from '../token/static-token.js';
import { TokenError } from '../token/token-source.js';
import type { TokenFetcher } from './cached-token-source.js';
import { redact } from './errors.js';
import { ASSUMED_LIFETIME_MS, issuedTokens, type IssuedTokens } from './workspace-client.js';

export interface DatabricksCliOptions {
  /** The workspace URL: `--host`, and what `databricks auth login` must be given. */
  readonly workspace: URL;
  /** A ~/.databrickscfg profile: `--profile` instead of `--host`. */
  readonly profile: string | undefined;
  /** Bound on one run of the CLI (it may refresh its token over the network). */
  readonly timeoutMs: number;
  readonly logger: Logger;
  /** The executable; `databricks` (found on the PATH) unless a test says otherwise. */
  readonly command?: string;
}

export class DatabricksCliFetcher implements TokenFetcher {
  readonly #options: DatabricksCliOptions;

  constructor(options: DatabricksCliOptions) {
    this.#options = options;
  }

  get #args(): string[] {
    const { profile, workspace } = this.#options;
    return profile === undefined ? ['auth', 'token', '--host', workspace.origin] : ['auth', 'token', '--profile', profile];
  }

  /** What `databricks auth login` needs to make this command work. */
  get #login(): string {
    const { profile, workspace } = this.#options;
    return `databricks auth login --host ${workspace.origin}${profile === undefined ? '' : ` --profile ${profile}`}`;
  }

  describe(): string {
    return `Databricks CLI (databricks ${this.#args.join(' ')})`;
  }

  async fetch(): Promise<IssuedTokens> {
    const obtainedAt = new Date();
    const stdout = await this.#run();
    let answer: Record<string, unknown>;
    try {
      const parsed: unknown = JSON.parse(stdout);
      if (typeof parsed !== 'object' || parsed === null) throw new Error('not an object');
      answer = parsed as Record<string, unknown>;
    } catch {
      throw new TokenError('bad_response', `databricks ${this.#args.join(' ')} printed no JSON; is the databricks on the PATH the Databricks CLI 0.205 or later?`);
    }
    const accessToken = answer['access_token'];
    if (typeof accessToken !== 'string' || accessToken === '') {
      throw new TokenError('bad_response', `databricks ${this.#args.join(' ')} printed no access_token`);
    }
    const expiry = typeof answer['expiry'] === 'string' ? new Date(answer['expiry']) : undefined;
    if (expiry !== undefined && !Number.isNaN(expiry.getTime())) {
      return issuedTokens({ accessToken, refreshToken: undefined, expiresAt: expiry, obtainedAt, expiryAssumed: false });
    }
    const exp = jwtExpiry(accessToken);
    if (exp !== undefined) return issuedTokens({ accessToken, refreshToken: undefined, expiresAt: exp, obtainedAt, expiryAssumed: false });
    this.#options.logger.warn({ assumedLifetimeSeconds: ASSUMED_LIFETIME_MS / 1000 }, 'databricks auth token gave no expiry; assuming a lifetime');
    return issuedTokens({ accessToken, refreshToken: undefined, expiresAt: new Date(obtainedAt.getTime() + ASSUMED_LIFETIME_MS), obtainedAt, expiryAssumed: true });
  }

  #run(): Promise<string> {
    const { command = 'databricks', timeoutMs } = this.#options;
    return new Promise((resolve, reject) => {
      execFile(command, this.#args, { timeout: timeoutMs, maxBuffer: 1 << 20, windowsHide: true }, (error, stdout, stderr) => {
        if (!error) {
          resolve(stdout);
          return;
        }
        const code = (error as NodeJS.ErrnoException).code;
        if (code === 'ENOENT') {
          reject(
            new TokenError(
              'login_required',
              `AuthScheme=DatabricksCli runs the Databricks CLI, and there is no ${command} on the PATH: install it (https://docs.databricks.com/dev-tools/cli/install), run \`${this.#login}\`, and start the proxy again`,
            ),
          );
          return;
        }
        if (error.killed) {
          reject(new TokenError('timeout', `databricks ${this.#args.join(' ')} did not finish within ${timeoutMs / 1000} s (OAuthTimeout)`));
          return;
        }
        // The CLI's own words (its first line: "Error: cache: databricks OAuth is not configured for this host ...").
        const said = redact(String(stderr).trim().split('\n')[0] ?? '', []).replace(/^Error: /, '');
        const legacy = /no such command|unknown command "auth"/i.test(String(stderr)) ? ' (this looks like the legacy Python CLI: install the Databricks CLI 0.205 or later)' : '';
        reject(new TokenError('login_required', `databricks ${this.#args.join(' ')} failed${said ? `: ${said}` : ''}${legacy}; run \`${this.#login}\``));
      });
    });
  }
}
