/**
 * What the console reads and drives: the running process (src/cli/runtime.ts implements it).
 * The console keeps no state of its own about targets; every SHOW reads the live objects.
 */
import type { Settings } from '../config/properties.js';
import type { ProxyServer } from '../proxy/server.js';
import type { TokenSource } from '../token/token-source.js';

/** What happened to a target's tokens so far (SHOW TOKENS). */
export interface TokenHistory {
  /** The last token obtained, and when. */
  readonly obtainedAt: number | undefined;
  /** The last fetch or refresh, and how it went. */
  readonly lastRefreshAt: number | undefined;
  readonly lastRefreshResult: 'success' | 'failure' | undefined;
  readonly successes: number;
  readonly failures: number;
}

export interface TargetView {
  readonly name: string;
  /** The settings it runs with. */
  readonly settings: Settings;
  /** Where its sessions and pools are. */
  readonly server: ProxyServer;
  /** The server that listens for it: itself, or the front of the port it shares. */
  readonly listener: ProxyServer;
  /** On a shared port: clients select it by its name as their database. */
  readonly shared: boolean;
  readonly tokenSource: TokenSource;
  readonly tokens: TokenHistory;
  /** Removed by a reload: accepts no one, its sessions go on to their end. */
  readonly draining: boolean;
}

/** What a target relayed and waited since the start (SHOW STATS). */
export interface Traffic {
  readonly bytesToUpstream: number;
  readonly bytesToClient: number;
  readonly sessions: number;
  readonly logins: number;
  readonly reuses: number;
  readonly failures: number;
  /** Pooled clients that waited for a connection (a reuse, a login or a free slot), and how long in all. */
  readonly waits: number;
  readonly waitSeconds: number;
}

/** What a reload changed, one line each, for the log and the console's notices. */
export interface ReloadReport {
  readonly changes: readonly string[];
}

export interface ConsoleHost {
  /** `lakebase-proxy 0.1.0`. */
  readonly version: string;
  /** The process settings in force. */
  process(): Settings;
  targets(): readonly TargetView[];
  /** Every server that listens (the fronts of shared ports included): clients in their startup are theirs. */
  listeners(): readonly ProxyServer[];
  traffic(target: string): Traffic;
  /** Reads the configuration again and applies it; rejects with the error a start would give, nothing changed. */
  reload(by: string): Promise<ReloadReport>;
  /** What SIGTERM does. */
  shutdown(by: string): void;
}
