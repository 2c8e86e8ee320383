import { readFileSync } from 'node:fs';
import { createLogger, type Logger } from '../ops/log.js';
import { ConfigError } from '../config/properties.js';
import { resolveOAuth, resolveProxy } from '../config/target.js';
import { ProxyServer } from '../proxy/server.js';
import { StaticTokenSource } from '../token/static-token.js';
import { TokenError, type TokenSource } from '../token/token-source.js';
import type { OAuthOptions } from '../oauth/options.js';
import { helpText, parseArgs } from './args.js';

/** Runs the program; resolves with the exit code. */
export async function main(argv: readonly string[]): Promise<number> {
  let args;
  try {
    args = parseArgs(argv);
  } catch (error) {
    return fail(error);
  }
  if (args.help) {
    process.stdout.write(helpText());
    return 0;
  }
  if (args.version) {
    const pkg = JSON.parse(readFileSync(new URL('../../../package.json', import.meta.url), 'utf8')) as { version: string };
    process.stdout.write(`lakebase-proxy ${pkg.version}\n`);
    return 0;
  }
  const logger = createLogger({ level: args.logLevel, ...(args.logFormat ? { format: args.logFormat } : {}) });
  switch (args.command) {
    case undefined:
    case 'serve':
      if (args.rest.length > 0) return fail(new ConfigError(`unknown option ${args.rest[0]}; see --help`));
      return serve(args.settings, logger).catch(fail);
    default:
      return fail(new ConfigError(`unknown command "${args.command}"; see --help`));
  }
}

function fail(error: unknown): number {
  const message = error instanceof ConfigError || error instanceof TokenError ? error.message : error instanceof Error ? error.message : String(error);
  process.stderr.write(`lakebase-proxy: ${message}\n`);
  return 1;
}

export function createTokenSource(oauth: OAuthOptions, password: string | undefined): TokenSource {
  if (password !== undefined) return new StaticTokenSource(password, undefined);
  if (oauth.initiateOAuth === 'OFF') {
    if (oauth.accessToken === undefined) throw new ConfigError('OAuthAccessToken: missing; InitiateOAuth=OFF uses the token given there');
    return new StaticTokenSource(oauth.accessToken);
  }
  throw new ConfigError('InitiateOAuth: only OFF is available in this build');
}

async function serve(settings: import('../config/properties.js').Settings, logger: Logger): Promise<number> {
  const options = await resolveProxy(settings, 'default');
  const tokenSource = createTokenSource(resolveOAuth(settings), settings.string('Password'));
  if (options.upstream.sslMode === 'require') {
    logger.warn({ upstream: options.upstream.host }, 'SSLMode=require: the upstream certificate is not verified');
  }
  const proxy = new ProxyServer(options, { tokenSource, logger });
  await proxy.listen();
  logger.info(
    { address: options.listen.address, port: proxy.port, socket: proxy.socketPath, upstream: `${options.upstream.host}:${options.upstream.port}`, identity: options.identity, token: undefined, tokenSource: tokenSource.describe() },
    'listening',
  );
  return new Promise<number>((resolve) => {
    const stop = (): void => {
      void proxy.close().then(() => tokenSource.close()).then(() => resolve(0));
    };
    process.once('SIGINT', stop);
    process.once('SIGTERM', stop);
  });
}
