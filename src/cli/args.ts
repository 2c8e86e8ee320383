/** Command-line parsing into Settings: flags from the property table, plus --connection. */
import { parseConnectionString } from '../config/connection-string.js';
import { BY_FLAG, ConfigError, PROPERTIES, Settings } from '../config/properties.js';

export interface ParsedArgs {
  readonly command: string | undefined;
  readonly settings: Settings;
  readonly logLevel: string;
  readonly logFormat: 'json' | 'pretty' | undefined;
  readonly help: boolean;
  readonly version: boolean;
  /** Arguments not consumed here, for a subcommand to read. */
  readonly rest: string[];
}

const BOOLEAN_FLAGS = new Set(PROPERTIES.filter((p) => p.kind.type === 'bool' && p.flag).map((p) => p.flag as string));

/**
 * `--flag value` and `--flag=value`. A connection string goes first and flags after it, so that
 * flags win, whatever their order on the command line.
 */
export function parseArgs(argv: readonly string[], settings = new Settings()): ParsedArgs {
  const rest: string[] = [];
  const flags: Array<[string, string]> = [];
  const connections: string[] = [];
  let command: string | undefined;
  let help = false;
  let version = false;
  let logLevel = 'info';
  let logFormat: ParsedArgs['logFormat'];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i] as string;
    const eq = arg.startsWith('--') ? arg.indexOf('=') : -1;
    const name = eq > 0 ? arg.slice(0, eq) : arg;
    const value = (): string => {
      if (eq > 0) return arg.slice(eq + 1);
      const next = argv[i + 1];
      if (next === undefined) throw new ConfigError(`${name} needs a value; see --help`);
      i++;
      return next;
    };
    if (name === '--help' || name === '-h') help = true;
    else if (name === '--version') version = true;
    else if (name === '--connection' || name === '-c') connections.push(value());
    else if (name === '--log-level') logLevel = value();
    else if (name === '--log-format') {
      const format = value();
      if (format !== 'json' && format !== 'pretty') throw new ConfigError(`--log-format: "${format}" is not valid; expected json or pretty`);
      logFormat = format;
    } else if (BOOLEAN_FLAGS.has(name)) flags.push([name, eq > 0 ? arg.slice(eq + 1) : 'true']);
    else if (BY_FLAG.has(name)) flags.push([name, value()]);
    else if (command === undefined && !arg.startsWith('-')) command = arg;
    else rest.push(arg);
  }
  for (const text of connections) {
    for (const [key, val] of parseConnectionString(text)) settings.set(key, val, '--connection');
  }
  for (const [flag, val] of flags) settings.set((BY_FLAG.get(flag) as { name: string }).name, val, flag);
  return { command, settings, logLevel, logFormat, help, version, rest };
}

export function helpText(): string {
  const lines = [
    'lakebase-proxy: a local Postgres endpoint that logs in to Databricks Lakebase with OAuth tokens',
    '',
    'Usage:',
    '  lakebase-proxy --connection "Server=...;User=...;DatabricksInstance=...;..." [options]',
    '  lakebase-proxy auth login|url|exchange|refresh|token [--connection ...]',
    '',
    'Connection properties (in --connection "Key=Value;Key=Value", keys case-insensitive):',
  ];
  for (const p of PROPERTIES.filter((property) => !property.flag)) {
    lines.push(`  ${p.name.padEnd(22)} ${p.help}${p.default !== undefined ? ` [default ${p.default}]` : ''}`);
  }
  lines.push('', 'Options (each also a connection property of the name shown):');
  lines.push(`  ${'--connection, -c STR'.padEnd(30)} connection properties, as above`);
  for (const p of PROPERTIES.filter((property) => property.flag)) {
    const flag = `${p.flag}${p.kind.type === 'bool' ? '' : ' VALUE'}`;
    lines.push(`  ${flag.padEnd(30)} ${p.help} (${p.name})${p.default !== undefined ? ` [default ${p.default}]` : ''}`);
  }
  lines.push(`  ${'--log-level LEVEL'.padEnd(30)} trace, debug, info, warn, error or silent [default info]`);
  lines.push(`  ${'--log-format json|pretty'.padEnd(30)} [default: pretty on a terminal, else json]`);
  lines.push(`  ${'--help, --version'.padEnd(30)}`);
  return lines.join('\n') + '\n';
}
