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

/** A command given wrongly (a missing or malformed argument): exit 2, or SQLSTATE 22023 on the console. */
export class UsageError extends Error {
  override readonly name = 'UsageError';
}

/**
 * How the person runs each step, for the advice in errors: the `auth` commands on the command
 * line, the CALLs on the console (src/admin/procedures.ts).
 */
export interface StepNames {
  /** Begins a login (the seed's GetOAuthAuthorizationUrl). */
  readonly url: string;
  /** Finishes it (GetOAuthAccessToken). */
  readonly exchange: string;
  /** Signs in from the start. */
  readonly login: string;
  /** Where the code from the callback goes. */
  readonly verifier: string;
  /** Where a refresh token is given. */
  readonly refreshToken: string;
  /** Whether a login begun in memory:// outlives the step (a process that keeps running: the console). */
  readonly memoryKeeps: boolean;
}

const CLI_STEPS: StepNames = {
  url: '`lakebase-proxy auth url`',
  exchange: '`lakebase-proxy auth exchange`',
  login: '`lakebase-proxy auth login`',
  verifier: '--verifier',
  refreshToken: '--refresh-token',
  memoryKeeps: false,
};

/** A login begun: the URL to open, and where its PKCE verifier and state are kept. */
export interface BegunLogin {
  readonly url: string;
  readonly state: string;
  readonly callbackUrl: string;
  readonly settingsLocation: string;
}

/** Tokens obtained and stored (or kept in memory://). */
export interface ObtainedTokens {
  readonly settingsLocation: string;
  readonly stored: boolean;
  readonly tokens: IssuedTokens;
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
  printJson(io, await beginLogin(options, stringFlag(flags, 'callback-url'), io.logger));
  return 0;
}

async function exchange(options: OAuthOptions, flags: Flags, io: AuthCommandIO): Promise<number> {
  const given = stringFlag(flags, 'verifier') ?? stringFlag(flags, 'code') ?? options.verifier;
  if (given === undefined) throw new UsageError('auth exchange needs --verifier CODE (the code from the callback URL, or the whole URL)');
  const obtained = await exchangeCode(options, given, io.logger);
  printJson(io, summary(obtained.settingsLocation, obtained.stored, obtained.tokens, flags.has('print-tokens')));
  return 0;
}

async function refresh(options: OAuthOptions, flags: Flags, io: AuthCommandIO): Promise<number> {
  const obtained = await refreshTokens(options, stringFlag(flags, 'refresh-token'), io.logger);
  printJson(io, summary(obtained.settingsLocation, obtained.stored, obtained.tokens, flags.has('print-tokens')));
  return 0;
}

/**
 * The seed's GetOAuthAuthorizationUrl: a login URL for `callbackUrl` (default CallbackURL), its
 * PKCE verifier and state kept in OAuthSettingsLocation for exchangeCode.
 */
export async function beginLogin(options: OAuthOptions, callbackUrl: string | undefined, logger: Logger, steps: StepNames = CLI_STEPS): Promise<BegunLogin> {
  const client = workspaceClient(options, logger, 'browser');
  const store = settingsStore(options);
  if (!store.persistent && !steps.memoryKeeps) {
    throw new TokenError(
      'settings_error',
      `${steps.url} keeps the PKCE verifier for ${steps.exchange}, but OAuthSettingsLocation ${store.location} keeps nothing once this command ends: use a file`,
    );
  }
  const redirectUri = callbackUrl ?? options.callbackUrl;
  const codeVerifier = oidc.randomPKCECodeVerifier();
  const state = oidc.randomState();
  const url = await client.authorizationUrl(redirectUri, state, await oidc.calculatePKCECodeChallenge(codeVerifier));
  const pending = { codeVerifier, state, redirectUri, createdAt: new Date().toISOString() };
  await store.update(settingsKey(client.workspace, client.clientId), (entry) =>
    Promise.resolve({ result: undefined, next: { ...entry, pending } }),
  );
  return { url: url.href, state, callbackUrl: redirectUri, settingsLocation: store.location };
}

/**
 * The seed's GetOAuthAccessToken: trades the code from the callback (or the whole callback URL)
 * of the login beginLogin began for tokens, and stores them.
 */
export async function exchangeCode(options: OAuthOptions, verifier: string, logger: Logger, steps: StepNames = CLI_STEPS): Promise<ObtainedTokens> {
  const { code, state } = parseVerifier(verifier, steps);
  const client = workspaceClient(options, logger, 'browser');
  const store = settingsStore(options);
  const tokens = await store.update(settingsKey(client.workspace, client.clientId), async (entry) => {
    const pending = entry?.pending;
    if (!pending) {
      throw new TokenError(
        'login_required',
        `OAuthSettingsLocation ${store.location} holds no login begun by ${steps.url} for ${client.workspace.origin} and client ${client.clientId}: run ${steps.url} first, with the same settings`,
      );
    }
    if (state !== undefined && state !== pending.state) {
      throw new TokenError('login_required', `the callback URL belongs to another login than the one ${steps.url} began (its state differs): run ${steps.url} again`);
    }
    const issued = await client.exchangeCode(code, pending.codeVerifier, pending.redirectUri);
    const next: SettingsEntry = { ...withTokens(entry, issued), pending: undefined, seen: [...(entry.seen ?? []), fingerprint(code)].slice(-20) };
    return { result: issued, next };
  });
  return { settingsLocation: store.location, stored: store.persistent, tokens };
}

/**
 * The seed's RefreshOAuthAccessToken: a new access token from the given or stored refresh token
 * (for AuthScheme=OAuthClient without one, a new client-credentials token), stored.
 */
export async function refreshTokens(options: OAuthOptions, given: string | undefined, logger: Logger, steps: StepNames = CLI_STEPS): Promise<ObtainedTokens> {
  const client = workspaceClient(options, logger, 'scheme');
  const store = settingsStore(options);
  const tokens = await store.update(settingsKey(client.workspace, client.clientId), async (entry) => {
    let issued: IssuedTokens;
    let seen = entry?.seen ?? [];
    if (options.authScheme === 'OAuthClient' && given === undefined) {
      issued = await client.clientCredentials();
    } else {
      // A stored refresh token is newer than the connection string's (it may have been rotated).
      const refreshToken = given ?? entry?.refreshToken ?? options.refreshToken;
      if (refreshToken === undefined) {
        throw new TokenError(
          'login_required',
          `no refresh token: give ${steps.refreshToken}, OAuthRefreshToken, or sign in with ${steps.login} (settings ${store.location})`,
        );
      }
      issued = await client.refresh(refreshToken);
      seen = [...seen, fingerprint(refreshToken)].slice(-20);
    }
    return { result: issued, next: { ...withTokens(entry ?? {}, issued), seen } };
  });
  return { settingsLocation: store.location, stored: store.persistent, tokens };
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
function parseVerifier(given: string, steps: StepNames): { code: string; state: string | undefined } {
  if (given === '') throw new UsageError(`${steps.verifier} is empty: give the code from the callback URL, or the whole URL`);
  if (!/^https?:\/\//i.test(given)) return { code: given, state: undefined };
  let url: URL;
  try {
    url = new URL(given);
  } catch {
    throw new UsageError(`${steps.verifier} looks like a URL but is not one`);
  }
  const error = url.searchParams.get('error');
  if (error) throw new TokenError('login_required', `the callback URL reports a failed login: ${error}`);
  const code = url.searchParams.get('code');
  if (!code) throw new UsageError(`the callback URL given to ${steps.verifier} has no code parameter`);
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
