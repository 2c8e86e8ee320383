import { readFileSync } from 'node:fs';
import { createLogger, type Logger } from '../ops/log.js';
import { ConfigError, envName, PROPERTIES, type Settings } from '../config/properties.js';
import { loadConfig, type LoadedConfig } from '../config/load.js';
import { refuseSharedPorts, resolveOAuth } from '../config/target.js';
import { runAuthCommand } from '../oauth/index.js';
import { prepareTarget, type PreparedTarget } from './prepare.js';
import { checkOAuthSettings } from '../oauth/index.js';
import { connectionTest } from '../ops/check.js';
import { untilSignal, type Shutdown } from '../ops/shutdown.js';
import { Metrics } from '../ops/metrics.js';
import { startOpsServer, type OpsServer } from '../ops/http.js';
import { helpText, parseArgs, type ParsedArgs } from './args.js';
import { Runtime } from './runtime.js';
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
      process.stdout.write(`lakebase-proxy ${packageVersion()}\n`);
      return 0;
    }
    const config = await loadConfig(args);
    const logger = loggerFor(config.process);
    switch (args.command) {
      case undefined:
      case 'serve':
        if (args.rest.length > 0) throw new ConfigError(`unknown option ${args.rest[0]}; see --help`);
        return await serve(args, config, logger);
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

async function prepare(config: LoadedConfig, logger: Logger): Promise<PreparedTarget[]> {
  const running: PreparedTarget[] = [];
  for (const target of config.targets) {
    if (target.settings.string('Password') === undefined) await checkOAuthSettings(resolveOAuth(target.settings));
    running.push(await prepareTarget(target.settings, target.name, logger.child({ target: target.name })));
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

async function serve(args: ParsedArgs, config: LoadedConfig, logger: Logger): Promise<number> {
  const metrics = new Metrics();
  const quitAllowed = adminPeers(config.process.string('AdminAddress') as string);
  const state = { started: false, shuttingDown: false };
  let ops: OpsServer | undefined;
  let shutdown: Shutdown | undefined;
  const runtime = new Runtime({ args, logger, metrics, version: `lakebase-proxy ${packageVersion()}`, shutdown: (by) => shutdown?.begin(by) }, config);
  // Handlers first: a signal that follows the "listening" line at once must find them.
  shutdown = untilSignal(
    runtime.servers,
    {
      minDelayMs: config.process.duration('MinSigtermDelay'),
      maxDelayMs: config.process.duration('MaxSigtermDelay'),
      exitZero: config.process.bool('ExitZeroOnSigterm'),
    },
    state,
    logger,
  );
  // SIGHUP reads the configuration again, as RELOAD on the console does (an error is logged, the running configuration kept).
  const onHangUp = (): void => void runtime.reload('SIGHUP').catch(() => undefined);
  process.on('SIGHUP', onHangUp);
  let targets: readonly PreparedTarget[] = [];
  try {
    targets = await runtime.prepare();
    if (!config.process.bool('NoHttp')) {
      // Before the listeners, so that /startup answers 503 while they start.
      ops = await startOpsServer({
        address: config.process.string('HttpAddress') as string,
        port: config.process.int('HttpPort'),
        metrics,
        health: { get started() { return state.started; }, get shuttingDown() { return state.shuttingDown; }, atCapacity: () => runtime.servers.some((s) => s.atCapacity) },
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
    await runtime.listen();
    state.started = true;
    warnAboutSecretsOnTheCommandLine(config, logger);
  } catch (error) {
    process.off('SIGHUP', onHangUp);
    await runtime.abandon(targets);
    await ops?.close();
    throw error;
  }
  const code = await shutdown.stopped;
  process.off('SIGHUP', onHangUp);
  await ops?.close();
  await runtime.close();
  return code;
}

function packageVersion(): string {
  return (JSON.parse(readFileSync(new URL('../../../package.json', import.meta.url), 'utf8')) as { version: string }).version;
}
