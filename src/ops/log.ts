import { pino, type Logger } from 'pino';

export type { Logger };

/**
 * Field names that may hold a secret. Redaction is by construction: code never logs these, and
 * if it did, pino censors them.
 */
const SECRET_PATHS = [
  'token', 'accessToken', 'refreshToken', 'clientSecret', 'password', 'secret', 'verifier', 'code',
  '*.token', '*.accessToken', '*.refreshToken', '*.clientSecret', '*.password', '*.secret', '*.verifier', '*.code',
  'access_token', 'refresh_token', 'client_secret', '*.access_token', '*.refresh_token', '*.client_secret',
];

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
