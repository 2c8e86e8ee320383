import { pino, type Logger } from 'pino';

export type { Logger };

/**
 * Field names that hold a secret, at the top of a line or one level down. Redaction is by
 * construction: code never logs these, and if it did, pino censors them. Named precisely: `code`
 * is a SQLSTATE or an errno code and is logged; an OAuth authorization code is only ever held as
 * `code` in the token request's form (sent, never logged), as `verifier`/OAuthVerifier, or as
 * `authorizationCode`, and errors.ts cuts it out of any text that quotes it.
 */
const SECRET_FIELDS = [
  'token', 'accessToken', 'refreshToken', 'idToken', 'clientSecret', 'password', 'secret',
  'verifier', 'codeVerifier', 'authorizationCode',
  'access_token', 'refresh_token', 'id_token', 'client_secret', 'code_verifier', 'authorization_code',
  'Password', 'OAuthClientSecret', 'OAuthAccessToken', 'OAuthRefreshToken', 'OAuthVerifier',
];
const SECRET_PATHS = [...SECRET_FIELDS, ...SECRET_FIELDS.map((field) => `*.${field}`)];

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
  return pino(
    {
      level: options.level ?? 'info',
      base: undefined,
      redact: { paths: SECRET_PATHS, censor: '[redacted]' },
      timestamp: pino.stdTimeFunctions.isoTime,
      ...(pretty ? { formatters: { level: (label: string) => ({ level: label }) } } : {}),
    },
    pretty ? prettyStream(destination) : (destination as pino.DestinationStream),
  );
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
