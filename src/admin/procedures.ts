/**
 * The seed connector's three procedures as CALLs on the console, doing what the `auth url`,
 * `auth exchange` and `auth refresh` commands do (src/oauth/commands.ts: the same code, the same
 * settings file, the same secrecy): one row with the seed's output names, tokens only with
 * print_tokens => true.
 *
 *   CALL GetOAuthAuthorizationUrl(callback_url => 'http://localhost:8020')      -> URL
 *   CALL GetOAuthAccessToken(verifier => '<code or callback URL>')              -> OAuthAccessToken, OAuthRefreshToken, ExpiresIn
 *   CALL RefreshOAuthAccessToken([refresh_token => '...'])                      -> the same
 *
 * Each also takes target => '<name>' (needed when the proxy runs several targets).
 */
import type { Logger } from '../ops/log.js';
import { resolveOAuth } from '../config/target.js';
import { beginLogin, exchangeCode, refreshTokens, UsageError, type ObtainedTokens, type StepNames } from '../oauth/commands.js';
import { TokenError } from '../token/token-source.js';
import type { TargetView } from './host.js';
import type { Argument } from './statements.js';
import { ConsoleError } from './statements.js';
import type { Table } from './tables.js';
import { timestamp } from './tables.js';

interface Procedure {
  /** As the seed spells it. */
  readonly name: string;
  /** Its arguments, by normalized name (lower case, no underscores), each with its spelling in messages. */
  readonly args: Readonly<Record<string, { readonly spelled: string; readonly secret: boolean }>>;
  /** The argument a value without a name is. */
  readonly positional: string | undefined;
  run(target: TargetView, args: ReadonlyMap<string, string | boolean | null>, logger: Logger): Promise<Table>;
}

/** What the oauth module's advice says on the console. */
const STEPS: StepNames = {
  url: 'CALL GetOAuthAuthorizationUrl()',
  exchange: 'CALL GetOAuthAccessToken()',
  login: 'CALL GetOAuthAuthorizationUrl() and CALL GetOAuthAccessToken()',
  verifier: 'verifier',
  refreshToken: 'refresh_token',
  memoryKeeps: true,
};

const TARGET = { spelled: 'target', secret: false };
const PRINT_TOKENS = { spelled: 'print_tokens', secret: false };

const PROCEDURES: readonly Procedure[] = [
  {
    name: 'GetOAuthAuthorizationUrl',
    args: { callbackurl: { spelled: 'callback_url', secret: false }, target: TARGET },
    positional: 'callbackurl',
    async run(target, args, logger) {
      const begun = await beginLogin(resolveOAuth(target.settings), text(args, 'callbackurl', 'callback_url'), logger, STEPS);
      return {
        columns: [
          { name: 'URL', type: 'text' },
          { name: 'state', type: 'text' },
          { name: 'callback_url', type: 'text' },
          { name: 'settings_location', type: 'text' },
          { name: 'target', type: 'text' },
        ],
        rows: [[begun.url, begun.state, begun.callbackUrl, begun.settingsLocation, target.name]],
      };
    },
  },
  {
    name: 'GetOAuthAccessToken',
    args: { verifier: { spelled: 'verifier', secret: true }, authmode: { spelled: 'auth_mode', secret: false }, printtokens: PRINT_TOKENS, target: TARGET },
    positional: 'verifier',
    async run(target, args, logger) {
      const mode = text(args, 'authmode', 'auth_mode');
      if (mode !== undefined && mode.toUpperCase() !== 'WEB') throw new ConsoleError('22023', `auth_mode => '${mode}' is not supported; the only mode is WEB`);
      const options = resolveOAuth(target.settings);
      const verifier = text(args, 'verifier', 'verifier') ?? options.verifier;
      if (verifier === undefined) {
        throw new ConsoleError('22023', "GetOAuthAccessToken needs verifier => '<code>' (the code from the callback URL, or the whole URL)", 'CALL GetOAuthAuthorizationUrl() gives the URL to sign in at');
      }
      return tokenRow(await exchangeCode(options, verifier, logger, STEPS), flag(args, 'printtokens'), target);
    },
  },
  {
    name: 'RefreshOAuthAccessToken',
    args: { refreshtoken: { spelled: 'refresh_token', secret: true }, oauthrefreshtoken: { spelled: 'OAuthRefreshToken', secret: true }, printtokens: PRINT_TOKENS, target: TARGET },
    positional: undefined,
    async run(target, args, logger) {
      const given = text(args, 'refreshtoken', 'refresh_token') ?? text(args, 'oauthrefreshtoken', 'OAuthRefreshToken');
      return tokenRow(await refreshTokens(resolveOAuth(target.settings), given, logger, STEPS), flag(args, 'printtokens'), target);
    },
  },
];

const normal = (name: string): string => name.toLowerCase().replace(/_/g, '');

/** The arguments as named and checked, and what of them may be logged (names, and values that are no secret). */
export interface CallPlan {
  readonly procedure: Procedure;
  readonly args: ReadonlyMap<string, string | boolean | null>;
  readonly logged: Readonly<Record<string, unknown>>;
}

export function planCall(procedureName: string, given: readonly Argument[]): CallPlan {
  const procedure = PROCEDURES.find((p) => p.name.toLowerCase() === procedureName.toLowerCase());
  if (!procedure) {
    throw new ConsoleError('42883', `procedure ${procedureName} does not exist`, `the console has ${PROCEDURES.map((p) => `CALL ${p.name}()`).join(', ')}`);
  }
  const args = new Map<string, string | boolean | null>();
  const logged: Record<string, unknown> = {};
  for (const arg of given) {
    const key = arg.name === undefined ? procedure.positional : normal(arg.name);
    if (key === undefined) throw new ConsoleError('42883', `${procedure.name} takes named arguments only, e.g. ${procedure.name}(target => 'name')`);
    const spec = procedure.args[key];
    if (spec === undefined) {
      throw new ConsoleError('42883', `procedure ${procedure.name} has no argument "${arg.name ?? ''}"; it takes ${Object.values(procedure.args).map((a) => a.spelled).join(', ')}`);
    }
    if (args.has(key)) throw new ConsoleError('42601', `${procedure.name}: argument ${spec.spelled} is given twice`);
    args.set(key, arg.value);
    logged[spec.spelled] = spec.secret ? '[redacted]' : arg.value;
  }
  return { procedure, args, logged };
}

/** Runs a planned CALL for `target`; a failure becomes the error the `auth` command would print, with its SQLSTATE. */
export async function runCall(plan: CallPlan, target: TargetView, logger: Logger): Promise<Table> {
  try {
    return await plan.procedure.run(target, plan.args, logger);
  } catch (error) {
    if (error instanceof TokenError) throw new ConsoleError(error.sqlstate, error.message);
    if (error instanceof UsageError) throw new ConsoleError('22023', error.message);
    throw error;
  }
}

function text(args: ReadonlyMap<string, string | boolean | null>, key: string, spelled: string): string | undefined {
  const value = args.get(key);
  if (value === undefined || value === null) return undefined;
  if (typeof value !== 'string') throw new ConsoleError('22023', `${spelled} takes text, e.g. ${spelled} => '...'`);
  return value;
}

function flag(args: ReadonlyMap<string, string | boolean | null>, key: string): boolean {
  const value = args.get(key);
  if (value === undefined || value === null) return false;
  if (typeof value === 'boolean') return value;
  if (/^(true|yes|on|1)$/i.test(value)) return true;
  if (/^(false|no|off|0)$/i.test(value)) return false;
  throw new ConsoleError('22023', `print_tokens takes true or false, not '${value}'`);
}

function tokenRow(obtained: ObtainedTokens, printTokens: boolean, target: TargetView): Table {
  const { tokens } = obtained;
  return {
    columns: [
      { name: 'OAuthAccessToken', type: 'text' },
      { name: 'OAuthRefreshToken', type: 'text' },
      { name: 'ExpiresIn', type: 'int8' },
      { name: 'expires_at', type: 'text' },
      { name: 'has_refresh_token', type: 'text' },
      { name: 'stored', type: 'text' },
      { name: 'settings_location', type: 'text' },
      { name: 'target', type: 'text' },
    ],
    rows: [
      [
        printTokens ? tokens.accessToken : null,
        printTokens ? (tokens.refreshToken ?? null) : null,
        Math.max(0, Math.floor((tokens.expiresAt.getTime() - Date.now()) / 1000)),
        timestamp(tokens.expiresAt.getTime()),
        tokens.refreshToken !== undefined ? 'true' : 'false',
        obtained.stored ? 'true' : 'false',
        obtained.settingsLocation,
        target.name,
      ],
    ],
  };
}
