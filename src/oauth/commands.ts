/**
 * `lakebase-proxy auth ...`: the seed connector's three procedures (GetOAuthAuthorizationUrl,
 * GetOAuthAccessToken, RefreshOAuthAccessToken) as commands, plus `login` and `token`.
 *
 * Tokens are stored in OAuthSettingsLocation, not printed: `exchange` and `refresh` print them
 * only with --print-tokens (what the seed's procedures return), and `token` prints the one token
 * it was asked for. Standard output of an explicit command is not a log.
 */
import { spawn } from 'node:child_process';
import * as oidc from 'openid-client';
import type { Logger } from '../ops/log.js';
import { TokenError } from '../token/token-source.js';
import { browserLogin } from './browser-login.js';
import { buildTokenSource, settingsStore, workspaceClient } from './sources.js';
import type { OAuthOptions } from './options.js';
import { fingerprint, settingsKey, type SettingsEntry } from './settings-store.js';
import { LOGIN_NOTICE_PREFIX, withTokens } from './workspace-token.js';
import type { IssuedTokens } from './workspace-client.js';

export const AUTH_HELP = `Usage: lakebase-proxy auth <command> [flags] --connection "DatabricksInstance=...;..."

Commands:
  login              Sign in with a browser (authorization code with PKCE) and store the access
                     and refresh tokens in OAuthSettingsLocation. The URL is printed as well: open
                     it yourself when no browser starts (LAKEBASE_PROXY_NO_BROWSER=1 never starts one).
  url [--callback-url URL]
                     Print the login URL as JSON and keep its PKCE verifier and state in
                     OAuthSettingsLocation (the seed's GetOAuthAuthorizationUrl). Open the URL on any
                     device; the browser then lands on the callback URL with ?code=... in it.
  exchange --verifier CODE
                     Trade that code (or the whole callback URL) for tokens and store them (the
                     seed's GetOAuthAccessToken). OAuthVerifier in --connection works too.
  refresh [--refresh-token TOKEN]
                     Get a new access token with the given or stored refresh token and store it
                     (the seed's RefreshOAuthAccessToken); for AuthScheme=OAuthClient, a new
                     client-credentials token.
  token              Print a valid token: the Postgres password the proxy would use (a database
                     credential when LakebaseInstance or LakebaseEndpoint is set). Never opens a
                     browser: run \`auth login\` first for OAuthPKCE.

Flags:
  --print-tokens     exchange, refresh: put accessToken and refreshToken in the JSON output
  -h, --help         this text

login, url, exchange and refresh print JSON on standard output. Tokens are stored in
OAuthSettingsLocation (default: OAuthSettings.txt in the lakebase-proxy config folder, mode 0600).
The browser commands use OAuthClientId (default databricks-cli) whatever AuthScheme says.
`;

export interface AuthCommandIO {
  readonly stdout: NodeJS.WritableStream;
  readonly stderr: NodeJS.WritableStream;
  readonly logger: Logger;
}

class UsageError extends Error {
  override readonly name = 'UsageError';
}

const FLAGS: Record<string, { readonly value: boolean; readonly commands: readonly string[] }> = {
  'callback-url': { value: true, commands: ['url', 'login'] },
  verifier: { value: true, commands: ['exchange'] },
  code: { value: true, commands: ['exchange'] },
  'refresh-token': { value: true, commands: ['refresh'] },
  'print-tokens': { value: false, commands: ['exchange', 'refresh'] },
};

/** Runs `auth <args>`; resolves to the exit code (0 done, 1 failed, 2 usage). */
export async function runAuthCommand(args: string[], options: OAuthOptions, io: AuthCommandIO): Promise<number> {
  const [command, ...rest] = args;
  if (command === undefined || command === 'help' || command === '--help' || command === '-h' || rest.includes('--help') || rest.includes('-h')) {
    (command === undefined ? io.stderr : io.stdout).write(AUTH_HELP);
    return command === undefined ? 2 : 0;
  }
  try {
    const flags = parseFlags(command, rest);
    switch (command) {
      case 'login':
        return await login(options, flags, io);
      case 'url':
        return await authorizationUrl(options, flags, io);
      case 'exchange':
        return await exchange(options, flags, io);
      case 'refresh':
        return await refresh(options, flags, io);
      case 'token':
        return await token(options, io);
      default:
        throw new UsageError(`unknown command "auth ${command}"`);
    }
  } catch (err) {
    if (err instanceof UsageError) {
      io.stderr.write(`lakebase-proxy auth: ${err.message}\nRun \`lakebase-proxy auth --help\` for the commands.\n`);
      return 2;
    }
    if (err instanceof TokenError) {
      io.stderr.write(`lakebase-proxy auth ${command}: ${err.message}\n`);
      return 1;
    }
    throw err;
  }
}

type Flags = Map<string, string | true>;

function parseFlags(command: string, args: string[]): Flags {
  const flags: Flags = new Map();
  for (let i = 0; i < args.length; i++) {
    const arg = args[i] ?? '';
    const match = /^--([a-z-]+)(?:=(.*))?$/s.exec(arg);
    const name = match?.[1];
    const spec = name === undefined ? undefined : FLAGS[name];
    if (match === null || name === undefined || spec === undefined || !spec.commands.includes(command)) {
      throw new UsageError(`"${arg.startsWith('--') ? arg.replace(/=.*$/s, '') : arg}" is not a flag of "auth ${command}"`);
    }
    if (!spec.value) {
      flags.set(name, true);
      continue;
    }
    const value = match[2] ?? args[++i];
    if (value === undefined || value === '') throw new UsageError(`--${name} needs a value`);
    flags.set(name, value);
  }
  return flags;
}

function stringFlag(flags: Flags, name: string): string | undefined {
  const value = flags.get(name);
  return typeof value === 'string' ? value : undefined;
}

async function login(options: OAuthOptions, flags: Flags, io: AuthCommandIO): Promise<number> {
  const client = workspaceClient(options, io.logger, 'browser');
  const store = settingsStore(options);
  const tokens = await browserLogin(client, {
    callbackUrl: stringFlag(flags, 'callback-url') ?? options.callbackUrl,
    timeoutMs: options.loginTimeoutMs,
    onUrl: (url) => {
      io.stderr.write(`${LOGIN_NOTICE_PREFIX.trimEnd()}\n  ${url}\n`);
      openBrowser(url, io.logger);
    },
    logger: io.logger,
  });
  await store.update(settingsKey(client.workspace, client.clientId), (entry) =>
    Promise.resolve({ result: undefined, next: withTokens(entry ?? {}, tokens) }),
  );
  printJson(io, summary(store.location, store.persistent, tokens, false));
  return 0;
}

async function authorizationUrl(options: OAuthOptions, flags: Flags, io: AuthCommandIO): Promise<number> {
  const client = workspaceClient(options, io.logger, 'browser');
  const store = settingsStore(options);
  if (!store.persistent) {
    throw new TokenError(
      'settings_error',
      `\`auth url\` keeps the PKCE verifier for \`auth exchange\`, but OAuthSettingsLocation ${store.location} keeps nothing once this command ends: use a file`,
    );
  }
  const redirectUri = stringFlag(flags, 'callback-url') ?? options.callbackUrl;
  const codeVerifier = oidc.randomPKCECodeVerifier();
  const state = oidc.randomState();
  const url = await client.authorizationUrl(redirectUri, state, await oidc.calculatePKCECodeChallenge(codeVerifier));
  const pending = { codeVerifier, state, redirectUri, createdAt: new Date().toISOString() };
  await store.update(settingsKey(client.workspace, client.clientId), (entry) =>
    Promise.resolve({ result: undefined, next: { ...entry, pending } }),
  );
  printJson(io, { url: url.href, state, callbackUrl: redirectUri, settingsLocation: store.location });
  return 0;
}

async function exchange(options: OAuthOptions, flags: Flags, io: AuthCommandIO): Promise<number> {
  const given = stringFlag(flags, 'verifier') ?? stringFlag(flags, 'code') ?? options.verifier;
  if (given === undefined) throw new UsageError('auth exchange needs --verifier CODE (the code from the callback URL, or the whole URL)');
  const { code, state } = parseVerifier(given);
  const client = workspaceClient(options, io.logger, 'browser');
  const store = settingsStore(options);
  const tokens = await store.update(settingsKey(client.workspace, client.clientId), async (entry) => {
    const pending = entry?.pending;
    if (!pending) {
      throw new TokenError(
        'login_required',
        `OAuthSettingsLocation ${store.location} holds no login begun by \`lakebase-proxy auth url\` for ${client.workspace.origin} and client ${client.clientId}: run \`auth url\` first, with the same settings`,
      );
    }
    if (state !== undefined && state !== pending.state) {
      throw new TokenError('login_required', 'the callback URL belongs to another login than the one `auth url` began (its state differs): run `auth url` again');
    }
    const issued = await client.exchangeCode(code, pending.codeVerifier, pending.redirectUri);
    const next: SettingsEntry = { ...withTokens(entry, issued), pending: undefined, seen: [...(entry.seen ?? []), fingerprint(code)].slice(-20) };
    return { result: issued, next };
  });
  printJson(io, summary(store.location, store.persistent, tokens, flags.has('print-tokens')));
  return 0;
}

async function refresh(options: OAuthOptions, flags: Flags, io: AuthCommandIO): Promise<number> {
  const client = workspaceClient(options, io.logger, 'scheme');
  const store = settingsStore(options);
  const fromFlag = stringFlag(flags, 'refresh-token');
  const tokens = await store.update(settingsKey(client.workspace, client.clientId), async (entry) => {
    let issued: IssuedTokens;
    let seen = entry?.seen ?? [];
    if (options.authScheme === 'OAuthClient' && fromFlag === undefined) {
      issued = await client.clientCredentials();
    } else {
      // A stored refresh token is newer than the connection string's (it may have been rotated).
      const refreshToken = fromFlag ?? entry?.refreshToken ?? options.refreshToken;
      if (refreshToken === undefined) {
        throw new TokenError(
          'login_required',
          `no refresh token: give --refresh-token, OAuthRefreshToken, or sign in with \`lakebase-proxy auth login\` (settings ${store.location})`,
        );
      }
      issued = await client.refresh(refreshToken);
      seen = [...seen, fingerprint(refreshToken)].slice(-20);
    }
    return { result: issued, next: { ...withTokens(entry ?? {}, issued), seen } };
  });
  printJson(io, summary(store.location, store.persistent, tokens, flags.has('print-tokens')));
  return 0;
}

async function token(options: OAuthOptions, io: AuthCommandIO): Promise<number> {
  const source = buildTokenSource(options, { logger: io.logger }, { allowBrowserLogin: false });
  try {
    const value = (await source.getToken({ notice: (message) => io.stderr.write(`${message}\n`) })).value;
    io.stdout.write(`${value}\n`);
    return 0;
  } finally {
    await source.close();
  }
}

/** A code, or a whole callback URL (`http://localhost:8020/?code=...&state=...`) pasted as is. */
function parseVerifier(given: string): { code: string; state: string | undefined } {
  if (!/^https?:\/\//i.test(given)) return { code: given, state: undefined };
  let url: URL;
  try {
    url = new URL(given);
  } catch {
    throw new UsageError('--verifier looks like a URL but is not one');
  }
  const error = url.searchParams.get('error');
  if (error) throw new TokenError('login_required', `the callback URL reports a failed login: ${error}`);
  const code = url.searchParams.get('code');
  if (!code) throw new UsageError('the callback URL given to --verifier has no code parameter');
  return { code, state: url.searchParams.get('state') ?? undefined };
}

function summary(location: string, persistent: boolean, tokens: IssuedTokens, withTokens: boolean): Record<string, unknown> {
  return {
    settingsLocation: location,
    stored: persistent,
    expiresAt: tokens.expiresAt.toISOString(),
    hasRefreshToken: tokens.refreshToken !== undefined,
    ...(withTokens ? { accessToken: tokens.accessToken, refreshToken: tokens.refreshToken } : {}),
  };
}

function printJson(io: AuthCommandIO, value: unknown): void {
  io.stdout.write(`${JSON.stringify(value, null, 2)}\n`);
}

/** Starts the desktop's browser at `url`, unless LAKEBASE_PROXY_NO_BROWSER=1; failures only logged. */
function openBrowser(url: string, logger: Logger): void {
  if (process.env['LAKEBASE_PROXY_NO_BROWSER'] === '1') return;
  const [command, args]: [string, string[]] =
    process.platform === 'darwin'
      ? ['open', [url]]
      : process.platform === 'win32'
        ? ['rundll32', ['url.dll,FileProtocolHandler', url]] // no cmd.exe: `&` in the URL stays literal
        : ['xdg-open', [url]];
  try {
    const child = spawn(command, args, { stdio: 'ignore', detached: true });
    child.on('error', (err) => logger.debug({ command, err: { message: err.message } }, 'could not start a browser'));
    child.unref();
  } catch (err) {
    logger.debug({ command, err: { message: err instanceof Error ? err.message : String(err) } }, 'could not start a browser');
  }
}
