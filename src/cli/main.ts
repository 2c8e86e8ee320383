import { readFileSync } from 'node:fs';
import { createLogger, type Logger } from '../ops/log.js';
import { ConfigError, envName, PROPERTIES, type Settings } from '../config/properties.js';
import { loadConfig, type LoadedConfig } from '../config/load.js';
import { refuseSharedPorts, resolveOAuth } from '../config/target.js';
import { ProxyServer } from '../proxy/server.js';
import { sharedPort } from '../proxy/shared-port.js';
import { listenerGroups } from '../config/shared-ports.js';
import { runAuthCommand } from '../oauth/index.js';
import { prepareTarget, type PreparedTarget } from './prepare.js';
import { checkOAuthSettings } from '../oauth/index.js';
import { connectionTest } from '../ops/check.js';
import { untilSignal } from '../ops/shutdown.js';
import { Metrics } from '../ops/metrics.js';
import { startOpsServer, type OpsServer } from '../ops/http.js';
import { helpText, parseArgs } from './args.js';
import { formatUrls, targetUrls } from './url.js';
import { adminPeers, shutdownCommand, waitCommand } from './admin.js';
import { processHost, serviceCommand } from './service.js';

/** Runs the program; resolves with the exit code. */
export async function main(argv: readonly string[]): Promise<number> {
  // Overwrites the command line that `ps` and /proc/<pid>/cmdline show every local user, which may hold secrets.
  process.title = 'lakebase-proxy';
  try {
    const args = parseArgs(argv);
    if (args.help && args.command !== 'auth') {
      process.stdout.write(helpText());
      return 0;
    }
    if (args.version) {
      const pkg = JSON.parse(readFileSync(new URL('../../../package.json', import.meta.url), 'utf8')) as { version: string };
      process.stdout.write(`lakebase-proxy ${pkg.version}\n`);
      return 0;
    }
    const config = await loadConfig(args);
    const logger = loggerFor(config.process);
    switch (args.command) {
      case undefined:
      case 'serve':
        if (args.rest.length > 0) throw new ConfigError(`unknown option ${args.rest[0]}; see --help`);
        return await serve(config, logger);
      case 'check':
        if (args.rest.length > 0) throw new ConfigError(`unknown option ${args.rest[0]}; see --help`);
        return await check(config, logger);
      case 'url': {
        const option = args.rest.find((a) => a.startsWith('-'));
        if (option !== undefined) throw new ConfigError(`unknown option ${option}; see --help`);
        refuseSharedPorts(config.targets);
        process.stdout.write(formatUrls(targetUrls(config.targets, args.rest)));
        return 0;
      }
      case 'wait':
        return await waitCommand(config.process, args.rest);
      case 'shutdown':
        return await shutdownCommand(config.process, args.rest);
      case 'service':
        return await serviceCommand(args, processHost());
      case 'auth': {
        const target = config.targets[0];
        if (config.targets.length !== 1 || !target) throw new ConfigError('auth commands work on one target; give one --connection');
        return await runAuthCommand(args.help ? [...args.rest, '--help'] : args.rest, resolveOAuth(target.settings), {
          stdout: process.stdout,
          stderr: process.stderr,
          logger,
        });
      }
      default:
        throw new ConfigError(`unknown command "${args.command}"; see --help`);
    }
  } catch (error) {
    return fail(error);
  }
}

function fail(error: unknown): number {
  process.stderr.write(`lakebase-proxy: ${error instanceof Error ? error.message : String(error)}\n`);
  return 1;
}

function warnAboutSecretsOnTheCommandLine(config: LoadedConfig, logger: Logger): void {
  for (const target of config.targets) {
    for (const property of PROPERTIES) {
      const source = property.secret ? target.settings.source(property.name) : undefined;
      if (source?.startsWith('--connection')) {
        logger.warn(
          { target: target.name, setting: property.name },
          `${property.name} was given on the command line, which other local users may see while the program starts; prefer ${envName(property)} or a config file`,
        );
      }
    }
  }
}

function loggerFor(settings: Settings): Logger {
  const format = settings.string('LogFormat') as 'json' | 'pretty' | undefined;
  return createLogger({ level: settings.string('LogLevel') as string, ...(format ? { format } : {}) });
}

export { createTokenSource } from './prepare.js';

async function prepare(config: LoadedConfig, logger: Logger, metrics?: Metrics): Promise<PreparedTarget[]> {
  const running: PreparedTarget[] = [];
  for (const target of config.targets) {
    if (target.settings.string('Password') === undefined) await checkOAuthSettings(resolveOAuth(target.settings));
    const onRefresh = metrics ? (result: 'success' | 'failure') => metrics.tokenRefreshed(target.name, result) : undefined;
    const prepared = await prepareTarget(target.settings, target.name, logger.child({ target: target.name }), onRefresh);
    metrics?.watchTokenExpiry(target.name, () => prepared.tokenSource.currentExpiry());
    running.push(prepared);
  }
  return running;
}

async function check(config: LoadedConfig, logger: Logger): Promise<number> {
  const targets = await prepare(config, logger);
  let ok = true;
  for (const { options, tokenSource, locator } of targets) {
    ok = (await connectionTest(options, tokenSource, (line) => process.stdout.write(line + '\n'), locator)) && ok;
    await tokenSource.close();
  }
  return ok ? 0 : 1;
}

async function serve(config: LoadedConfig, logger: Logger): Promise<number> {
  refuseSharedPorts(config.targets);
  const groups = listenerGroups(config.targets);
  const metrics = new Metrics();
  const quitAllowed = adminPeers(config.process.string('AdminAddress') as string);
  const targets = await prepare(config, logger, metrics);
  const servers: ProxyServer[] = [];
  const state = { started: false, shuttingDown: false };
  let ops: OpsServer | undefined;
  const closeTokens = (): Promise<unknown> => Promise.all(targets.map((t) => t.tokenSource.close()));
  // Handlers first: a signal that follows the "listening" line at once must find them.
  const stopped = untilSignal(
    servers,
    {
      minDelayMs: config.process.duration('MinSigtermDelay'),
      maxDelayMs: config.process.duration('MaxSigtermDelay'),
      exitZero: config.process.bool('ExitZeroOnSigterm'),
    },
    state,
    logger,
  );
  try {
    if (!config.process.bool('NoHttp')) {
      // Before the listeners, so that /startup answers 503 while they start.
      ops = await startOpsServer({
        address: config.process.string('HttpAddress') as string,
        port: config.process.int('HttpPort'),
        metrics,
        health: { get started() { return state.started; }, get shuttingDown() { return state.shuttingDown; }, atCapacity: () => servers.some((s) => s.atCapacity) },
        logger,
        // The handlers untilSignal() registered, as a SIGTERM would run them (on every platform).
        quit: { allowed: quitAllowed, request: () => process.emit('SIGTERM', 'SIGTERM') },
      });
      logger.info({ address: config.process.string('HttpAddress'), port: ops.port }, 'serving /metrics, /startup, /liveness and /readiness');
    }
    if (config.process.bool('RunConnectionTest')) {
      for (const { options, tokenSource, locator } of targets) {
        const ok = await connectionTest(options, tokenSource, (line) => logger.info({ target: options.name }, line), locator);
        if (!ok) throw new ConfigError(`connection test of target ${options.name} failed; see the log above`);
      }
    }
    for (const group of groups) {
      const members = group.map((i) => targets[i] as PreparedTarget);
      for (const { options } of members) {
        if (options.upstream.sslMode === 'require') {
          logger.warn({ target: options.name, upstream: options.upstream.host }, 'SSLMode=require: the upstream certificate is not verified');
        }
      }
      const about = ({ options, tokenSource }: PreparedTarget) => ({
        target: options.name,
        upstream: `${options.upstream.host}:${options.upstream.port}`,
        identity: options.identity,
        tokenSource: tokenSource.describe(),
      });
      const deps = ({ options, tokenSource, locator }: PreparedTarget) => ({ tokenSource, locator, logger, observer: metrics.observerFor(options.name) });
      if (members.length === 1) {
        const member = members[0] as PreparedTarget;
        const server = new ProxyServer(member.options, deps(member));
        await server.listen();
        servers.push(server);
        logger.info({ ...about(member), address: member.options.listen.address, port: server.port, socket: server.socketPath }, 'listening');
        continue;
      }
      const { address, port } = (members[0] as PreparedTarget).options.listen;
      const name = `${address}:${port}`;
      const shared = sharedPort(
        members.map((member) => ({ options: member.options, deps: deps(member) })),
        { name, logger, observer: metrics.observerFor(name) },
      );
      await shared.front.listen();
      servers.push(shared.front, ...shared.targets);
      logger.info({ target: name, address, port: shared.front.port, socket: shared.front.socketPath, databases: members.map((m) => m.options.name) }, 'listening');
      for (const member of members) logger.info({ ...about(member), database: member.options.name }, 'serving clients that ask for this database');
    }
    state.started = true;
    warnAboutSecretsOnTheCommandLine(config, logger);
  } catch (error) {
    for (const server of servers) await server.close();
    await closeTokens();
    await ops?.close();
    throw error;
  }
  const code = await stopped;
  await ops?.close();
  await closeTokens();
  return code;
}
