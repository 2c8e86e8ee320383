/**
 * `lakebase-proxy service install|uninstall|status [--config FILE]`: the proxy as a background
 * service of the logged-in user, started at login and restarted after a failure. A systemd user
 * unit on Linux (logs in the journal), a launchd agent on macOS (logs in ~/Library/Logs). Both
 * run this program with one config file and one environment file for secrets (mode 0600, read by
 * `node --env-file`), both kept in the user's lakebase-proxy config folder by default.
 *
 * Everything outside the process (the platform, home folder, the service manager's commands)
 * comes through ServiceHost, so that tests can run each platform's steps on any machine.
 */
import { spawn } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { homedir, userInfo } from 'node:os';
import { dirname, isAbsolute, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { loadConfig } from '../config/load.js';
import { ConfigError } from '../config/properties.js';
import { defaultSettingsPath } from '../oauth/settings-store.js';
import type { ParsedArgs } from './args.js';

export interface ServiceHost {
  readonly platform: NodeJS.Platform;
  readonly home: string;
  readonly env: NodeJS.ProcessEnv;
  readonly uid: number;
  /** The node binary and the program file the service runs. */
  readonly node: string;
  readonly program: string;
  /** Runs a command of the service manager (systemctl, launchctl). */
  run(command: string, args: readonly string[]): Promise<{ code: number; stdout: string; stderr: string }>;
  /** Writes one line for the person at the terminal. */
  say(line: string): void;
}

export function processHost(): ServiceHost {
  return {
    platform: process.platform,
    home: homedir(),
    env: process.env,
    uid: process.platform === 'win32' ? -1 : userInfo().uid,
    node: process.execPath,
    program: fileURLToPath(new URL('../../../bin/lakebase-proxy.js', import.meta.url)),
    run: (command, args) =>
      new Promise((done) => {
        const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'] });
        let stdout = '';
        let stderr = '';
        child.stdout.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
        child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
        child.once('error', (error) => done({ code: 127, stdout, stderr: error.message }));
        child.once('close', (code) => done({ code: code ?? 1, stdout, stderr }));
      }),
    say: (line) => process.stdout.write(line + '\n'),
  };
}

const NAME = 'lakebase-proxy';
/** The launchd label, also the plist's file name. */
export const LAUNCHD_LABEL = 'lakebase-proxy';

/** Where one platform keeps the service's files. */
export interface ServicePlan {
  readonly manager: 'systemd' | 'launchd';
  /** The unit file or the agent's plist. */
  readonly file: string;
  readonly configFile: string;
  readonly envFile: string;
  /** What the service runs: node, its --env-file, the program and --config. */
  readonly argv: readonly string[];
  /** launchd: the file stdout and stderr go to. */
  readonly logFile: string | undefined;
  /** How a person reads the logs. */
  readonly logs: string;
  /** Variables the service needs from the installing shell (XDG_CONFIG_HOME). */
  readonly environment: Readonly<Record<string, string>>;
}

export function servicePlan(host: ServiceHost, configFile: string | undefined): ServicePlan {
  const folder = dirname(defaultSettingsPath(host.env, host.platform, host.home));
  const config = configFile === undefined ? join(folder, `${NAME}.yaml`) : resolve(configFile);
  const envFile = join(folder, `${NAME}.env`);
  const argv = [host.node, `--env-file=${envFile}`, host.program, '--config', config];
  const xdg = host.env['XDG_CONFIG_HOME'];
  switch (host.platform) {
    case 'linux': {
      const units = join(xdg && isAbsolute(xdg) ? xdg : join(host.home, '.config'), 'systemd', 'user');
      return {
        manager: 'systemd',
        file: join(units, `${NAME}.service`),
        configFile: config,
        envFile,
        argv,
        logFile: undefined,
        logs: `journalctl --user -u ${NAME}`,
        // The user manager does not read the login shell's profile: the same config folder as here.
        environment: xdg && isAbsolute(xdg) ? { XDG_CONFIG_HOME: xdg } : {},
      };
    }
    case 'darwin': {
      const logFile = join(host.home, 'Library', 'Logs', NAME, `${NAME}.log`);
      return {
        manager: 'launchd',
        file: join(host.home, 'Library', 'LaunchAgents', `${LAUNCHD_LABEL}.plist`),
        configFile: config,
        envFile,
        argv,
        logFile,
        logs: logFile,
        environment: {},
      };
    }
    default:
      throw new ConfigError(
        `service: Linux (a systemd user unit) and macOS (a launchd agent) only; on ${host.platform}, start "lakebase-proxy --config FILE" with the system's own tools (see the README)`,
      );
  }
}

/** One word of an ExecStart= line: quoted, with systemd's specifiers (%) and variables ($) kept literal. */
function systemdWord(word: string): string {
  return `"${word.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/%/g, '%%').replace(/\$/g, '$$$$')}"`;
}

export function systemdUnit(plan: ServicePlan): string {
  const lines = [
    '# Written by "lakebase-proxy service install"; "lakebase-proxy service uninstall" removes it.',
    '[Unit]',
    'Description=lakebase-proxy: a local Postgres endpoint for Databricks Lakebase',
    '',
    '[Service]',
    'Type=simple',
    `ExecStart=${plan.argv.map(systemdWord).join(' ')}`,
    ...Object.entries(plan.environment).map(([key, value]) => `Environment=${systemdWord(`${key}=${value}`)}`),
    // pino writes JSON lines to the journal; the proxy drains sessions on SIGTERM.
    'Environment="LAKEBASE_PROXY_LOG_FORMAT=json"',
    'Restart=on-failure',
    'RestartSec=5',
    'TimeoutStopSec=30',
    '',
    '[Install]',
    'WantedBy=default.target',
  ];
  return lines.join('\n') + '\n';
}

const xml = (text: string): string => text.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');

export function launchdPlist(plan: ServicePlan): string {
  return [
    '<?xml version="1.0" encoding="UTF-8"?>',
    '<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">',
    '<!-- Written by "lakebase-proxy service install"; "lakebase-proxy service uninstall" removes it. -->',
    '<plist version="1.0">',
    '<dict>',
    `  <key>Label</key><string>${LAUNCHD_LABEL}</string>`,
    '  <key>ProgramArguments</key>',
    '  <array>',
    ...plan.argv.map((word) => `    <string>${xml(word)}</string>`),
    '  </array>',
    '  <key>EnvironmentVariables</key>',
    '  <dict>',
    '    <key>LAKEBASE_PROXY_LOG_FORMAT</key><string>json</string>',
    '  </dict>',
    '  <key>RunAtLoad</key><true/>',
    // Restarted after a failure, not after a clean stop.
    '  <key>KeepAlive</key>',
    '  <dict><key>SuccessfulExit</key><false/></dict>',
    '  <key>ThrottleInterval</key><integer>5</integer>',
    `  <key>StandardOutPath</key><string>${xml(plan.logFile as string)}</string>`,
    `  <key>StandardErrorPath</key><string>${xml(plan.logFile as string)}</string>`,
    '</dict>',
    '</plist>',
  ].join('\n') + '\n';
}

const ENV_TEMPLATE = `# Secrets for the lakebase-proxy service: VARIABLE=value lines, read at each start.
# Only its owner may read this file (mode 0600). For example:
# LAKEBASE_PROXY_OAUTH_CLIENT_SECRET=...
`;

export async function serviceCommand(args: ParsedArgs, host: ServiceHost): Promise<number> {
  const [action, ...extra] = args.rest;
  if (extra.length > 0 || args.flags.length > 0 || args.connections.length > 0) {
    throw new ConfigError('service takes install, uninstall or status and --config FILE only; put every other setting in that file');
  }
  if (action !== 'install' && action !== 'uninstall' && action !== 'status') {
    throw new ConfigError(`service: ${action === undefined ? 'say' : `unknown action "${action}";`} install, uninstall or status`);
  }
  const plan = servicePlan(host, args.configFile);
  const manager = plan.manager === 'systemd' ? systemd(host, plan) : launchd(host, plan);
  switch (action) {
    case 'install':
      return install(host, plan, manager, args);
    case 'uninstall':
      return uninstall(host, plan, manager);
    case 'status':
      return status(host, plan, manager);
  }
}

/** What each service manager does for the three actions. */
interface Manager {
  readonly content: string;
  /** Loads (or reloads) and starts the service; an error names the failed command. */
  start(): Promise<void>;
  /** Stops and unloads it; nothing to stop is no error. */
  stop(): Promise<void>;
  /** A word for the service's state. */
  state(): Promise<string>;
  readonly running: string;
}

/** Runs a command that must succeed; an error names it and says what it printed. */
function command(host: ServiceHost) {
  return async (name: string, args: readonly string[]): Promise<void> => {
    const { code, stdout, stderr } = await host.run(name, args);
    if (code !== 0) throw new Error(`${name} ${args.join(' ')} failed (exit ${code}): ${(stderr || stdout).trim()}`);
  };
}

function systemd(host: ServiceHost, plan: ServicePlan): Manager {
  const run = command(host);
  const unit = `${NAME}.service`;
  return {
    content: systemdUnit(plan),
    running: 'active',
    async start() {
      await run('systemctl', ['--user', 'daemon-reload']);
      await run('systemctl', ['--user', 'enable', unit]);
      await run('systemctl', ['--user', 'restart', unit]);
    },
    async stop() {
      // Not loaded, or no user manager to ask: nothing runs, and the file goes all the same.
      await host.run('systemctl', ['--user', 'disable', '--now', unit]);
      await host.run('systemctl', ['--user', 'daemon-reload']);
    },
    async state() {
      // is-active prints the state and exits non-zero for every state but active.
      const { stdout, stderr } = await host.run('systemctl', ['--user', 'is-active', unit]);
      return stdout.trim() || `unknown (${stderr.trim()})`;
    },
  };
}

function launchd(host: ServiceHost, plan: ServicePlan): Manager {
  const run = command(host);
  const domain = `gui/${host.uid}`;
  const target = `${domain}/${LAUNCHD_LABEL}`;
  return {
    content: launchdPlist(plan),
    running: 'running',
    async start() {
      // A loaded agent keeps its old definition: unload it first (not loaded: nothing to do).
      await host.run('launchctl', ['bootout', target]);
      await run('launchctl', ['enable', target]);
      await run('launchctl', ['bootstrap', domain, plan.file]);
    },
    async stop() {
      await host.run('launchctl', ['bootout', target]);
    },
    async state() {
      const { code, stdout } = await host.run('launchctl', ['print', target]);
      if (code !== 0) return 'not loaded';
      return /^\s*state = (.+)$/m.exec(stdout)?.[1]?.trim() ?? 'loaded';
    },
  };
}

async function install(host: ServiceHost, plan: ServicePlan, manager: Manager, args: ParsedArgs): Promise<number> {
  if (!existsSync(plan.configFile)) {
    throw new ConfigError(`service install: no config file at ${plan.configFile}; write the settings there (see config/lakebase-proxy.yaml) or give --config FILE`);
  }
  // The service would fail at every start with a wrong setting: refuse it now, naming the key.
  await loadConfig({ ...args, configFile: plan.configFile }, {}, host.home);
  mkdirSync(dirname(plan.envFile), { recursive: true, mode: 0o700 });
  if (!existsSync(plan.envFile)) {
    writeFileSync(plan.envFile, ENV_TEMPLATE, { mode: 0o600 });
  } else if ((statSync(plan.envFile).mode & 0o077) !== 0) {
    chmodSync(plan.envFile, 0o600);
    host.say(`${plan.envFile} was readable by other users; it is now mode 0600`);
  }
  mkdirSync(dirname(plan.file), { recursive: true });
  if (plan.logFile) mkdirSync(dirname(plan.logFile), { recursive: true });
  writeFileSync(plan.file, manager.content, { mode: 0o644 });
  host.say(`wrote ${plan.file}`);
  await manager.start();
  host.say(`${NAME} runs as a ${plan.manager === 'systemd' ? 'systemd user service' : 'launchd agent'}, at each login, with --config ${plan.configFile}`);
  host.say(`secrets: ${plan.envFile} (VARIABLE=value lines, mode 0600); logs: ${plan.logs}`);
  return 0;
}

async function uninstall(host: ServiceHost, plan: ServicePlan, manager: Manager): Promise<number> {
  if (!existsSync(plan.file)) {
    host.say(`${NAME} is not installed as a service (no ${plan.file})`);
    return 0;
  }
  await manager.stop();
  rmSync(plan.file);
  host.say(`stopped and removed ${plan.file}; kept ${plan.configFile} and ${plan.envFile}`);
  return 0;
}

async function status(host: ServiceHost, plan: ServicePlan, manager: Manager): Promise<number> {
  if (!existsSync(plan.file)) {
    host.say(`${NAME} is not installed as a service (no ${plan.file}); "lakebase-proxy service install" installs it`);
    return 1;
  }
  const state = await manager.state();
  const installed = readFileSync(plan.file, 'utf8');
  host.say(`${plan.manager === 'systemd' ? 'unit' : 'agent'}: ${plan.file}${installed === manager.content ? '' : ' (written for another config file or program: install again to update it)'}`);
  host.say(`state: ${state}`);
  host.say(`config: ${plan.configFile}`);
  host.say(`secrets: ${plan.envFile}`);
  host.say(`logs: ${plan.logs}`);
  return state === manager.running ? 0 : 1;
}
