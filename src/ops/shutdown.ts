/**
 * SIGTERM and SIGINT as Cloud SQL Auth Proxy handles them: keep accepting for MinSigtermDelay,
 * then refuse new clients (SQLSTATE 57P03, as Postgres does while shutting down: the listeners stay
 * open until the end) and wait up to MaxSigtermDelay for open sessions, then close what is left.
 * Exit 0 when every session ended by itself (or with ExitZeroOnSigterm), else 128 + the signal's
 * number. A second signal closes everything at once.
 */
import { constants } from 'node:os';
import type { Logger } from './log.js';
import type { ProxyServer } from '../proxy/server.js';

export interface ShutdownOptions {
  readonly minDelayMs: number;
  readonly maxDelayMs: number;
  readonly exitZero: boolean;
}

export interface ShutdownState {
  shuttingDown: boolean;
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

export interface Shutdown {
  /** Resolves with the exit code once a signal (or begin()) has ended the servers. */
  readonly stopped: Promise<number>;
  /** What SIGTERM does, asked for by `by` (the console's SHUTDOWN). */
  begin(by: string): void;
}

/** Waits for SIGTERM or SIGINT; `servers` may grow meanwhile (targets added by a reload). */
export function untilSignal(servers: readonly ProxyServer[], options: ShutdownOptions, state: ShutdownState, logger: Logger): Shutdown {
  let begin: (by: string) => void = () => {};
  const stopped = new Promise<number>((resolve) => {
    let finished = false;
    const finish = (code: number): void => {
      if (finished) return;
      finished = true;
      process.off('SIGTERM', onSignal);
      process.off('SIGINT', onSignal);
      resolve(code);
    };
    const onSignal = (signal: NodeJS.Signals, by?: string): void => {
      const failureCode = 128 + (constants.signals[signal] ?? 15);
      if (state.shuttingDown) {
        logger.warn({ signal }, 'second signal: closing every session now');
        for (const server of servers) {
          server.stopAccepting();
          server.closeAll();
        }
        finish(failureCode);
        return;
      }
      state.shuttingDown = true;
      const open = (): number => servers.reduce((n, s) => n + s.connections, 0);
      logger.info({ signal, ...(by ? { by } : {}), sessions: open(), minSigtermDelayMs: options.minDelayMs, maxSigtermDelayMs: options.maxDelayMs }, 'shutting down');
      void (async () => {
        if (options.minDelayMs > 0) await sleep(options.minDelayMs);
        for (const server of servers) server.refuseNewClients();
        const drained = Promise.all(servers.map((s) => s.drained())).then(() => true);
        const endedByThemselves = open() === 0 || (await Promise.race([drained, sleep(options.maxDelayMs).then(() => false)]));
        if (!endedByThemselves) {
          logger.warn({ sessions: open() }, 'closing sessions still open after --max-sigterm-delay');
          for (const server of servers) server.closeAll();
          await Promise.race([drained, sleep(2000)]);
        }
        for (const server of servers) server.stopAccepting();
        logger.info({ endedByThemselves }, 'stopped');
        finish(endedByThemselves || options.exitZero ? 0 : failureCode);
      })();
    };
    process.on('SIGTERM', onSignal);
    process.on('SIGINT', onSignal);
    begin = (by) => onSignal('SIGTERM', by);
  });
  return { stopped, begin: (by) => begin(by) };
}
