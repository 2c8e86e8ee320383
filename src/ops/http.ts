/**
 * The operations endpoint: `/metrics` and the health checks, with the meanings Cloud SQL Auth
 * Proxy gives them. Readiness looks only at the process's own state and never dials the
 * database: a probe that logs in upstream turns a slow database into restarts of every proxy.
 */
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Logger } from './log.js';
import type { Metrics } from './metrics.js';

/** The process's state, read at each request. */
export interface HealthState {
  /** Every listener is up (and the start-up connection test, if any, passed). */
  readonly started: boolean;
  /** A SIGTERM or SIGINT arrived. */
  readonly shuttingDown: boolean;
  /** A target is at --max-connections: a new client would be turned away. */
  atCapacity(): boolean;
}

export interface OpsServerOptions {
  readonly address: string;
  /** 0 picks a free port. */
  readonly port: number;
  readonly metrics: Metrics;
  readonly health: HealthState;
  readonly logger: Logger;
  /** POST /quitquitquit: asks for what SIGTERM does, from the peers `allowed` lets in. */
  readonly quit?: { allowed(address: string | undefined): boolean; request(): void };
}

export interface OpsServer {
  /** The port actually bound. */
  readonly port: number;
  close(): Promise<void>;
}

type Answer = readonly [status: number, body: string];

const OK: Answer = [200, 'ok'];

export async function startOpsServer(options: OpsServerOptions): Promise<OpsServer> {
  const { metrics, health, logger, quit } = options;
  const log = logger.child({ component: 'http' });

  const probes: Record<string, () => Answer> = {
    '/startup': () => (health.started ? OK : [503, 'starting']),
    '/liveness': () => OK,
    '/readiness': () => {
      if (!health.started) return [503, 'starting'];
      if (health.shuttingDown) return [503, 'shutting down'];
      if (health.atCapacity()) return [503, 'at max connections'];
      return OK;
    },
  };

  const server = createServer((req, res) => {
    void handle(req, res).catch((error: unknown) => {
      log.warn({ err: error instanceof Error ? error.message : String(error), path: pathOf(req) }, 'ops request failed');
      if (!res.headersSent) send(res, 500, 'text/plain; charset=utf-8', 'internal error');
      else res.destroy();
    });
  });

  async function handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const path = pathOf(req);
    if (path === '/quitquitquit' && quit) {
      quitquitquit(req, res, quit);
      return;
    }
    const probe = probes[path];
    if (probe === undefined && path !== '/metrics') {
      send(res, 404, 'text/plain; charset=utf-8', 'not found');
      return;
    }
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.setHeader('allow', 'GET, HEAD');
      send(res, 405, 'text/plain; charset=utf-8', 'method not allowed');
      return;
    }
    if (probe === undefined) {
      send(res, 200, metrics.contentType, await metrics.text());
      return;
    }
    const [status, body] = probe();
    send(res, status, 'text/plain; charset=utf-8', body);
  }

  function quitquitquit(req: IncomingMessage, res: ServerResponse, { allowed, request }: NonNullable<OpsServerOptions['quit']>): void {
    const peer = req.socket.remoteAddress;
    if (req.method !== 'POST') {
      res.setHeader('allow', 'POST');
      send(res, 405, 'text/plain; charset=utf-8', 'method not allowed');
    } else if (!allowed(peer)) {
      log.warn({ peer }, 'refused /quitquitquit from a peer AdminAddress does not allow');
      send(res, 403, 'text/plain; charset=utf-8', 'forbidden: this peer may not shut the proxy down (AdminAddress)');
    } else {
      log.info({ peer }, '/quitquitquit: shutting down as on SIGTERM');
      res.once('finish', request);
      send(res, 200, 'text/plain; charset=utf-8', 'shutting down');
    }
  }

  await new Promise<void>((resolve, reject) => {
    const onError = (error: NodeJS.ErrnoException): void => {
      reject(
        error.code === 'EADDRINUSE'
          ? new Error(`port ${options.port} on ${options.address} is already in use for the metrics and health endpoints; choose another with --http-port, or turn them off with --no-http`)
          : new Error(`cannot serve metrics and health on ${options.address}:${options.port}: ${error.message}`),
      );
    };
    server.once('error', onError);
    server.listen({ host: options.address, port: options.port }, () => {
      server.off('error', onError);
      resolve();
    });
  });
  server.on('error', (error) => log.error({ err: error.message }, 'ops endpoint error'));
  const port = (server.address() as AddressInfo).port;
  log.info({ address: options.address, port }, 'serving /metrics, /startup, /liveness, /readiness');

  let closing: Promise<void> | undefined;
  return {
    port,
    close() {
      closing ??= new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      });
      return closing;
    },
  };
}

function pathOf(req: IncomingMessage): string {
  const url = req.url ?? '/';
  const query = url.indexOf('?');
  return query === -1 ? url : url.slice(0, query);
}

function send(res: ServerResponse, status: number, contentType: string, body: string): void {
  res.writeHead(status, {
    'content-type': contentType,
    'content-length': Buffer.byteLength(body),
    'cache-control': 'no-store',
  });
  res.end(body);
}
