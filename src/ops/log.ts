import { pino, type Logger } from 'pino';

export type { Logger };

/**
 * Field names that hold a secret, at the top of a line or one level down. Redaction is by
 * construction: code never logs these, and if it did, they are censored. Named precisely: `code`
 * is a SQLSTATE or an errno code and is logged; an OAuth authorization code is only ever held as
 * `code` in the token request's form (sent, never logged), as `verifier`/OAuthVerifier, or as
 * `authorizationCode`, and errors.ts cuts it out of any text that quotes it.
 */
const SECRET_FIELDS: ReadonlySet<string> = new Set([
  'token', 'accessToken', 'refreshToken', 'idToken', 'clientSecret', 'password', 'secret',
  'verifier', 'codeVerifier', 'authorizationCode',
  'access_token', 'refresh_token', 'id_token', 'client_secret', 'code_verifier', 'authorization_code',
  'Password', 'OAuthClientSecret', 'OAuthAccessToken', 'OAuthRefreshToken', 'OAuthVerifier',
]);
const CENSOR = '[redacted]';

/**
 * `object` with its secret fields censored, at the top and, when `deeper`, one level down; a copy
 * only when something was censored (an Error one level down becomes its own fields, as JSON shows
 * it). What pino's redact paths `field` and `*.field` did, at a small part of the cost: pino ran
 * their path matcher on every value of every line, the larger part of a pooled session's CPU time
 * for its one log line.
 */
function censored<T>(object: T, deeper: boolean): T {
  if (typeof object !== 'object' || object === null) return object;
  let copy: Record<string, unknown> | undefined;
  const fields = object as Record<string, unknown>;
  for (const key in fields) {
    if (!Object.hasOwn(fields, key)) continue;
    const value = fields[key];
    let clean = value;
    if (SECRET_FIELDS.has(key)) clean = value === undefined ? value : CENSOR;
    // pino's err serializer takes the Error itself, and its output is censored (below).
    else if (deeper && !(key === 'err' && value instanceof Error)) clean = censored(value, false);
    if (clean === value) continue;
    copy ??= { ...fields };
    copy[key] = clean;
  }
  return (copy ?? object) as T;
}

/** A line's fields, censored. */
const formatters = {
  log: (fields: Record<string, unknown>) => censored(fields, true),
};

/** An error as pino serializes it (type, message, stack and its own fields), its secret fields censored. */
const serializers = {
  err: (error: unknown) => censored(pino.stdSerializers.err(error as Error), false),
};

export interface LogOptions {
  readonly level?: string;
  /** 'json' (default when stderr is not a terminal) or 'pretty'. */
  readonly format?: 'json' | 'pretty';
  /** Where lines go; default stderr. */
  readonly destination?: NodeJS.WritableStream;
}

export function createLogger(options: LogOptions = {}): Logger {
  const destination = options.destination ?? process.stderr;
  const pretty = options.format === 'pretty' || (options.format === undefined && (destination as { isTTY?: boolean }).isTTY === true);
  const logger = pino(
    {
      level: options.level ?? 'info',
      base: undefined,
      serializers,
      timestamp: pino.stdTimeFunctions.isoTime,
      formatters: pretty ? { ...formatters, level: (label: string) => ({ level: label }) } : formatters,
    },
    pretty ? prettyStream(destination) : (destination as pino.DestinationStream),
  );
  // A child's bindings are censored as a line's fields are (pino's formatters.bindings sees only
  // the root's); children of children inherit this child().
  type Child = (this: unknown, bindings: pino.Bindings, options?: unknown) => unknown;
  const child = logger.child as unknown as Child;
  (logger as unknown as { child: Child }).child = function (this: unknown, bindings, options) {
    return child.call(this, censored(bindings, true), options);
  };
  return logger;
}

/** A readable one-line format for terminals, without a dependency on pino-pretty. */
function prettyStream(destination: NodeJS.WritableStream): pino.DestinationStream {
  return {
    write(line: string) {
      try {
        const { time, level, msg, ...rest } = JSON.parse(line) as Record<string, unknown>;
        const extra = Object.entries(rest).map(([k, v]) => `${k}=${typeof v === 'string' ? v : JSON.stringify(v)}`).join(' ');
        destination.write(`${String(time)} ${String(level).toUpperCase().padEnd(5)} ${String(msg ?? '')}${extra ? ' ' + extra : ''}\n`);
      } catch {
        destination.write(line);
      }
    },
  };
}

/** A logger that drops everything, for library use and tests that do not look at logs. */
export const silentLogger: Logger = pino({ level: 'silent' });
