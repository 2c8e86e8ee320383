/** Command-line parsing: what was asked for, before any configuration source is read. */
import { BY_FLAG, ConfigError, DURATION_FORMS, envName, PROPERTIES } from '../config/properties.js';

export interface ParsedArgs {
  readonly command: string | undefined;
  /** Each --connection string; several mean several targets. */
  readonly connections: readonly string[];
  /** [flag, value] in order, for properties that have a flag. */
  readonly flags: ReadonlyArray<readonly [string, string]>;
  readonly configFile: string | undefined;
  readonly help: boolean;
  readonly version: boolean;
  /** Arguments not consumed here, for a subcommand to read. */
  readonly rest: string[];
}

const BOOLEAN_FLAGS = new Set(PROPERTIES.filter((p) => p.kind.type === 'bool' && p.flag).map((p) => p.flag as string));

/** `--flag value` and `--flag=value`; boolean flags take no value (or `--flag=false`). */
export function parseArgs(argv: readonly string[]): ParsedArgs {
  const rest: string[] = [];
  const flags: Array<[string, string]> = [];
  const connections: string[] = [];
  let command: string | undefined;
  let configFile: string | undefined;
  let help = false;
  let version = false;
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
    else if (name === '--config') configFile = value();
    else if (BOOLEAN_FLAGS.has(name)) flags.push([name, eq > 0 ? arg.slice(eq + 1) : 'true']);
    else if (BY_FLAG.has(name)) flags.push([name, value()]);
    else if (command === undefined && !arg.startsWith('-')) command = arg;
    else rest.push(arg);
  }
  return { command, connections, flags, configFile, help, version, rest };
}

export function helpText(): string {
  const lines = [
    'lakebase-proxy: a local Postgres endpoint that logs in to Databricks Lakebase with OAuth tokens',
    '',
    'Usage:',
    '  lakebase-proxy --connection "Server=...;DatabricksInstance=...;OAuthClientId=...;..." [options]',
    '  lakebase-proxy --config FILE [options]',
    '  lakebase-proxy check [--connection ...]        log in, run SELECT 1, exit 0 or 1',
    '  lakebase-proxy url [TARGET ...] [--connection ...]  print the psql command, libpq URI and JDBC URL of each target',
    '  lakebase-proxy auth login|url|exchange|refresh|token [--connection ...]',
    '  lakebase-proxy wait [--max 30s]                exit 0 once the proxy on this host reports /startup ready, 1 after --max',
    '  lakebase-proxy shutdown                        POST /quitquitquit to the proxy on this host: what SIGTERM does',
    '  lakebase-proxy service install|uninstall|status [--config FILE]',
    '                                                 run it at login: a systemd user unit (Linux), a launchd agent (macOS)',
    '',
    'Sources, later wins: defaults, --config FILE (YAML), ~/.databrickscfg profile, DATABRICKS_HOST /',
    'DATABRICKS_CLIENT_ID / DATABRICKS_CLIENT_SECRET, LAKEBASE_PROXY_* variables, --connection, flags.',
    '',
    `Durations (timeouts, delays) take a unit: ${DURATION_FORMS}.`,
    '',
    'Connection properties (in --connection "Key=Value;Key=Value", keys case-insensitive):',
  ];
  const describe = (p: (typeof PROPERTIES)[number]): string =>
    `${p.help}${p.default !== undefined ? ` [default ${p.default}]` : ''} (env ${envName(p)})`;
  for (const p of PROPERTIES.filter((property) => !property.flag)) lines.push(`  ${p.name.padEnd(22)} ${describe(p)}`);
  lines.push('', 'Options (each also a property of the name shown, in a config file or connection string):');
  lines.push(`  ${'--connection, -c STR'.padEnd(30)} connection properties, as above; give it again for another target (env LAKEBASE_PROXY_CONNECTION)`);
  lines.push(`  ${'--config FILE'.padEnd(30)} YAML configuration file (env LAKEBASE_PROXY_CONFIG)`);
  for (const p of PROPERTIES.filter((property) => property.flag)) {
    const flag = `${p.flag}${p.kind.type === 'bool' ? '' : ' VALUE'}`;
    lines.push(`  ${flag.padEnd(30)} ${p.name}: ${describe(p)}`);
  }
  lines.push(`  ${'--help, --version'.padEnd(30)}`);
  return lines.join('\n') + '\n';
}
