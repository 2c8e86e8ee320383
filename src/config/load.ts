/**
 * Reads every configuration source into Settings, one per target plus one for the process,
 * later sources winning: defaults, the config file (top level, then the target's entry), a
 * ~/.databrickscfg profile, Databricks' unified-auth variables, LAKEBASE_PROXY_* variables,
 * --connection, flags.
 */
import { readFile } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { parse as parseYaml } from 'yaml';
import type { ParsedArgs } from '../cli/args.js';
import { parseConnectionString } from './connection-string.js';
import { BY_FLAG, ConfigError, envName, PROPERTIES, Settings } from './properties.js';

export interface Target {
  readonly name: string;
  /** The name was given (a config file's `name:`), not made up (target1): clients may select the target by it on a shared port. */
  readonly named: boolean;
  readonly settings: Settings;
}

export interface LoadedConfig {
  readonly process: Settings;
  readonly targets: readonly Target[];
}

type Layer = { readonly source: string; readonly pairs: ReadonlyArray<readonly [string, string]> };

export async function loadConfig(args: ParsedArgs, env: NodeJS.ProcessEnv = process.env, home = homedir()): Promise<LoadedConfig> {
  const file = args.configFile ?? env.LAKEBASE_PROXY_CONFIG;
  const document = file === undefined ? undefined : await readConfigFile(file);
  const fileTop: Layer[] = document ? [{ source: file as string, pairs: document.top }] : [];

  const envPairs: Array<[string, string]> = [];
  for (const property of PROPERTIES) {
    const value = env[envName(property)];
    if (value !== undefined) envPairs.push([property.name, value]);
  }
  const connectionFromEnv = env.LAKEBASE_PROXY_CONNECTION;
  const envLayers: Layer[] = [
    ...(connectionFromEnv ? [{ source: 'LAKEBASE_PROXY_CONNECTION', pairs: parseConnectionString(connectionFromEnv) }] : []),
    { source: 'environment (LAKEBASE_PROXY_*)', pairs: envPairs },
  ];
  const flagLayer: Layer = {
    source: 'the command line',
    pairs: args.flags.map(([flag, value]) => [(BY_FLAG.get(flag) as { name: string }).name, value] as const),
  };

  // Each target: its entry in the file (if any), and its --connection (if any).
  let targetSpecs: Array<{ name: string; named: boolean; fileLayers: Layer[]; commandLayers: Layer[] }>;
  const connection = (text: string, source: string): Layer => ({ source, pairs: parseConnectionString(text) });
  if (document && document.targets.length > 0) {
    if (args.connections.length > 1) throw new ConfigError(`several --connection strings and targets in ${file}: use one or the other`);
    targetSpecs = document.targets.map((t, i) => ({
      name: t.name ?? `target${i + 1}`,
      named: t.name !== undefined,
      fileLayers: [...fileTop, { source: `${file} (targets[${i}])`, pairs: t.pairs }],
      commandLayers: args.connections.map((c) => connection(c, '--connection')),
    }));
  } else if (args.connections.length > 1) {
    targetSpecs = args.connections.map((c, i) => ({ name: `target${i + 1}`, named: false, fileLayers: fileTop, commandLayers: [connection(c, `--connection #${i + 1}`)] }));
  } else {
    targetSpecs = [{ name: 'default', named: false, fileLayers: fileTop, commandLayers: args.connections.map((c) => connection(c, '--connection')) }];
  }
  const names = targetSpecs.map((t) => t.name);
  const twice = names.find((name, i) => names.indexOf(name) !== i);
  if (twice !== undefined) throw new ConfigError(`${file}: two targets are named "${twice}"; each target needs a name of its own`);

  const processSettings = new Settings();
  for (const layer of [...fileTop, ...envLayers, flagLayer]) apply(processSettings, layer);

  const targets: Target[] = [];
  for (const spec of targetSpecs) {
    const { fileLayers, commandLayers } = spec;
    const ordered = [...fileLayers, ...envLayers, ...commandLayers, flagLayer];
    const profile = findLast(ordered, 'Profile') ?? (env.DATABRICKS_CONFIG_PROFILE ? { value: env.DATABRICKS_CONFIG_PROFILE, source: 'DATABRICKS_CONFIG_PROFILE' } : undefined);
    const databricks: Layer[] = [];
    if (profile) databricks.push(await profileLayer(profile.value, profile.source, env.DATABRICKS_CONFIG_FILE ?? join(home, '.databrickscfg')));
    databricks.push({
      source: 'DATABRICKS_* environment',
      pairs: (
        [
          ['DatabricksInstance', env.DATABRICKS_HOST],
          ['OAuthClientId', env.DATABRICKS_CLIENT_ID],
          ['OAuthClientSecret', env.DATABRICKS_CLIENT_SECRET],
          ['PersonalAccessToken', env.DATABRICKS_TOKEN],
        ] satisfies Array<[string, string | undefined]>
      ).filter((pair): pair is [string, string] => pair[1] !== undefined && pair[1] !== ''),
    });
    const settings = new Settings();
    for (const layer of [...fileLayers, ...databricks, ...envLayers, ...commandLayers, flagLayer]) apply(settings, layer);
    targets.push({ name: spec.name, named: spec.named, settings });
  }
  return { process: processSettings, targets };
}

function apply(settings: Settings, layer: Layer): void {
  for (const [key, value] of layer.pairs) settings.set(key, value, layer.source);
}

function findLast(layers: readonly Layer[], key: string): { value: string; source: string } | undefined {
  let found: { value: string; source: string } | undefined;
  for (const layer of layers) {
    for (const [k, v] of layer.pairs) if (k.toLowerCase() === key.toLowerCase()) found = { value: v, source: layer.source };
  }
  return found;
}

interface ConfigDocument {
  top: Array<[string, string]>;
  targets: Array<{ name: string | undefined; pairs: Array<[string, string]> }>;
}

async function readConfigFile(path: string): Promise<ConfigDocument> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (error) {
    throw new ConfigError(`--config: cannot read ${path}: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`);
  }
  let data: unknown;
  try {
    data = parseYaml(text);
  } catch (error) {
    throw new ConfigError(`${path}: not valid YAML: ${(error as Error).message.split('\n')[0]}`);
  }
  if (data === null || data === undefined) return { top: [], targets: [] };
  if (typeof data !== 'object' || Array.isArray(data)) throw new ConfigError(`${path}: expected a mapping of settings at the top level`);
  const top: Array<[string, string]> = [];
  const targets: ConfigDocument['targets'] = [];
  for (const [key, value] of Object.entries(data as Record<string, unknown>)) {
    if (key === 'targets') {
      if (!Array.isArray(value)) throw new ConfigError(`${path}: targets must be a list of mappings`);
      value.forEach((entry: unknown, i) => {
        if (typeof entry !== 'object' || entry === null || Array.isArray(entry)) throw new ConfigError(`${path}: targets[${i}] must be a mapping`);
        const pairs: Array<[string, string]> = [];
        let name: string | undefined;
        for (const [k, v] of Object.entries(entry as Record<string, unknown>)) {
          if (k.toLowerCase() === 'name') {
            name = scalar(path, `targets[${i}].${k}`, v);
            if (name.trim() === '') throw new ConfigError(`${path}: targets[${i}].${k} is empty; give the target a name (clients may select it by that database name)`);
          }
          else pairs.push([k, scalar(path, `targets[${i}].${k}`, v)]);
        }
        targets.push({ name, pairs });
      });
    } else {
      top.push([key, scalar(path, key, value)]);
    }
  }
  return { top, targets };
}

function scalar(path: string, key: string, value: unknown): string {
  if (typeof value === 'string' || typeof value === 'number' || typeof value === 'boolean') return String(value);
  throw new ConfigError(`${key} (from ${path}): expected a single value, not ${value === null ? 'an empty value' : Array.isArray(value) ? 'a list' : 'a mapping'}`);
}

/**
 * A ~/.databrickscfg profile (INI): its host, and the credentials its auth_type names, as the
 * Databricks SDKs read them. Without auth_type, a `token` means pat, and client_id with
 * client_secret oauth-m2m (the AuthScheme default).
 */
async function profileLayer(profile: string, source: string, path: string): Promise<Layer> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (error) {
    throw new ConfigError(`Profile (from ${source}): cannot read ${path}: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`);
  }
  let section: string | undefined;
  const values = new Map<string, string>();
  const sections = new Set<string>();
  for (const raw of text.split(/\r?\n/)) {
    const line = raw.trim();
    if (line === '' || line.startsWith('#') || line.startsWith(';')) continue;
    const header = /^\[(.+)\]$/.exec(line);
    if (header) {
      section = (header[1] as string).trim();
      sections.add(section);
      continue;
    }
    const eq = line.indexOf('=');
    if (section === profile && eq > 0) values.set(line.slice(0, eq).trim().toLowerCase(), line.slice(eq + 1).trim());
  }
  if (!sections.has(profile)) {
    throw new ConfigError(`Profile (from ${source}): no profile [${profile}] in ${path}; it has ${[...sections].map((s) => `[${s}]`).join(', ') || 'none'}`);
  }
  const map: Array<[string, string]> = [];
  const take = (key: string, property: string): void => {
    const value = values.get(key);
    if (value !== undefined && value !== '') map.push([property, value]);
  };
  const layerSource = `${path} profile [${profile}]`;
  take('host', 'DatabricksInstance');
  map.push(['Profile', profile]);
  const authType = values.get('auth_type') ?? (values.get('token') ? 'pat' : undefined);
  switch (authType) {
    case undefined:
      take('client_id', 'OAuthClientId');
      take('client_secret', 'OAuthClientSecret');
      break;
    case 'oauth-m2m':
      map.push(['AuthScheme', 'OAuthClient']);
      take('client_id', 'OAuthClientId');
      take('client_secret', 'OAuthClientSecret');
      break;
    case 'databricks-cli':
      map.push(['AuthScheme', 'DatabricksCli']);
      break;
    case 'pat':
      map.push(['AuthScheme', 'PersonalAccessToken']);
      take('token', 'PersonalAccessToken');
      break;
    default:
      throw new ConfigError(`${layerSource}: auth_type = ${authType} is not one the proxy can use; use oauth-m2m (client_id, client_secret), databricks-cli or pat (token)`);
  }
  return { source: layerSource, pairs: map };
}
