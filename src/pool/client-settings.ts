/**
 * Transaction mode: a client's settings follow it from one server connection to the next. What
 * it asked for at startup (parameters, and `options` as `-c name=value` or `--name=value`), and
 * what the server reported to it since, are set with `set_config` on each connection it lands on
 * where they differ. Settings the server does not report are tracked per connection.
 */
import type { ServerConnection } from './server-connection.js';

/** A startup the transaction pool cannot carry: the client is refused with this SQLSTATE. */
export class UnsupportedStartup extends Error {
  override readonly name = 'UnsupportedStartup';
  readonly sqlstate = '0A000';
}

/**
 * Reported parameters a session may change with set_config; the others (server_version,
 * is_superuser, session_authorization...) are the server's. Postgres 18 reports search_path.
 */
const SETTABLE = new Set(['application_name', 'client_encoding', 'datestyle', 'intervalstyle', 'timezone', 'standard_conforming_strings', 'default_transaction_read_only', 'search_path', 'scram_iterations']);

/** A reported parameter whose value follows the client to each connection it lands on. */
export function carried(name: string): boolean {
  return SETTABLE.has(name.toLowerCase());
}

/** A setting's name as set_config and pg_settings take it: letters, digits, _ and $, one dot for a custom one. */
const SETTING_NAME = /^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?$/;

/** Startup parameters that are not settings. */
const NOT_SETTINGS = new Set(['user', 'database', 'options']);

/**
 * The settings of a startup packet, by name as sent: its parameters and what `options` holds
 * (`-c name=value`, `--name=value`; a backslash escapes the next character, as Postgres reads it).
 * Throws UnsupportedStartup for a replication connection and for other command-line switches.
 */
export function startupSettings(parameters: ReadonlyMap<string, string>): Map<string, string> {
  const settings = new Map<string, string>();
  for (const [name, value] of parameters) {
    if (name === 'replication') throw new UnsupportedStartup('replication connections cannot go through PoolMode=transaction');
    if (NOT_SETTINGS.has(name) || name.startsWith('_pq_.')) continue;
    settings.set(name, value);
  }
  const words = splitOptions(parameters.get('options') ?? '');
  for (let i = 0; i < words.length; i++) {
    const word = words[i] as string;
    let assignment: string | undefined;
    if (word === '-c') assignment = words[++i];
    else if (word.startsWith('-c')) assignment = word.slice(2);
    else if (word.startsWith('--')) assignment = word.slice(2);
    const at = assignment?.indexOf('=') ?? -1;
    if (assignment === undefined || at <= 0) {
      throw new UnsupportedStartup(`startup option "${word}" is not supported in PoolMode=transaction: only -c name=value and --name=value`);
    }
    settings.set(assignment.slice(0, at).replaceAll('-', '_'), assignment.slice(at + 1));
  }
  for (const name of settings.keys()) {
    if (!SETTING_NAME.test(name)) throw new UnsupportedStartup(`startup parameter "${name}" is not a setting name`);
  }
  return settings;
}

function splitOptions(options: string): string[] {
  const words: string[] = [];
  let word = '';
  let inWord = false;
  for (let i = 0; i < options.length; i++) {
    const c = options[i] as string;
    if (c === '\\' && i + 1 < options.length) {
      word += options[++i];
      inWord = true;
    } else if (c === ' ' || c === '\t' || c === '\n' || c === '\r') {
      if (inWord) words.push(word);
      word = '';
      inWord = false;
    } else {
      word += c;
      inWord = true;
    }
  }
  if (inWord) words.push(word);
  return words;
}

/** What a client wants of the session it runs in, wherever that is. */
export class ClientSettings {
  #reported: Map<string, string>;
  /** Whether `#reported` is another client's too (copied at this client's first change). */
  #sharing: boolean;
  /** Settings of its startup the server does not report, as sent (never changed: shared). */
  readonly unreported: ReadonlyMap<string, string>;
  /** What its greeting reported: what DISCARD ALL brings back, as its own startup would (never changed: shared). */
  #greeting: ReadonlyMap<string, string> | undefined;

  private constructor(reported: Map<string, string>, unreported: ReadonlyMap<string, string>, sharing: boolean, greeting?: ReadonlyMap<string, string>) {
    this.#reported = reported;
    this.unreported = unreported;
    this.#sharing = sharing;
    this.#greeting = greeting;
  }

  /** The greeting is made of what is reported now. */
  greeted(): void {
    this.#greeting = this.#reported;
    this.#sharing = true;
  }

  /**
   * DISCARD ALL (RESET ALL): Postgres brings back the session's defaults, which for a client are
   * its startup's; the pooled connection brought back its login's. The client's values go back to
   * its greeting's (landed on the next connection it takes); returns those that changed for it.
   */
  resetToGreeting(): Array<[string, string]> {
    const greeting = this.#greeting;
    if (!greeting) return [];
    const changed = [...greeting].filter(([name, value]) => this.#reported.get(name) !== value);
    this.#reported = greeting as Map<string, string>;
    this.#sharing = true;
    return changed;
  }

  /**
   * The reported settings while they are a map shared with other clients and nothing else is set
   * (no unreported startup setting): a connection landed in them needs nothing set for this
   * client (landOn), and the desk (desk.ts) hands such connections on by this map's identity.
   */
  get shared(): ReadonlyMap<string, string> | undefined {
    return this.#sharing && this.unreported.size === 0 ? this.#reported : undefined;
  }

  /** Reported parameters as the server reported them to this client (its greeting, then ParameterStatus). */
  get reported(): ReadonlyMap<string, string> {
    return this.#reported;
  }

  report(name: string, value: string): void {
    if (this.#reported.get(name) === value) return;
    if (this.#sharing) {
      this.#reported = new Map(this.#reported);
      this.#sharing = false;
    }
    this.#reported.set(name, value);
  }

  /** For another client with the same startup: it begins where this one began (the maps are shared until one changes). */
  copy(): ClientSettings {
    this.#sharing = true;
    return new ClientSettings(this.#reported, this.unreported, true, this.#greeting);
  }

  /** The search_path the client's statements resolve names with ('' when it did not set one). */
  get searchPath(): string {
    for (const settings of [this.reported, this.unreported]) {
      for (const [name, value] of settings) if (name.toLowerCase() === 'search_path') return value;
    }
    return '';
  }

  /**
   * Before the greeting: the login's reported values with the startup's own in their place (the
   * server reports them in its own words once set, and the greeting then takes those).
   */
  static fromStartup(startup: ReadonlyMap<string, string>, server: ServerConnection): ClientSettings {
    const byLowerName = new Map([...server.loginParameters.keys()].map((name) => [name.toLowerCase(), name]));
    const reported = new Map(server.loginParameters);
    const unreported = new Map<string, string>();
    for (const [name, value] of startup) {
      const reportedName = byLowerName.get(name.toLowerCase());
      if (reportedName !== undefined) reported.set(reportedName, value);
      else unreported.set(name.toLowerCase(), value);
    }
    return new ClientSettings(reported, unreported, false);
  }

  /**
   * The query that makes `server` this client's (one round trip), or undefined when it is already:
   * set_config for each setting that differs, and the unreported settings another client's startup
   * left there back to their defaults. `server.applied` is updated as if it succeeded.
   */
  landOn(server: ServerConnection): string | undefined {
    // The same unchanging settings as the last client here, and nothing changed since: nothing to set.
    const landed = server.landed;
    if (this.#sharing && landed?.reported === this.#reported && landed.version === server.parametersVersion && this.unreported.size === 0 && server.applied.size === 0) return undefined;
    const calls: string[] = [];
    for (const [name, value] of this.#reported) {
      if (carried(name) && server.parameters.get(name) !== value) calls.push(setConfig(name, value));
    }
    for (const [name, value] of this.unreported) {
      if (server.applied.get(name) !== value) {
        calls.push(setConfig(name, value));
        server.applied.set(name, value);
      }
    }
    const stale = [...server.applied.keys()].filter((name) => !this.unreported.has(name));
    for (const name of stale) server.applied.delete(name);
    if (calls.length === 0 && stale.length === 0) {
      // Only a shared map stays as it is: one of the client's own changes in place.
      server.landed = this.#sharing ? { reported: this.#reported, version: server.parametersVersion } : undefined;
      return undefined;
    }
    let query = calls.length > 0 ? `SELECT ${calls.join(', ')}` : '';
    if (stale.length > 0) {
      if (query !== '') query += '; ';
      query += `SELECT pg_catalog.set_config(name, reset_val, false) FROM pg_catalog.pg_settings WHERE name IN (${stale.map(literal).join(', ')})`;
    }
    return query;
  }

  /**
   * landOn()'s query ran on `server` where nothing reads its reports (the fast path): the
   * server's reported values are the client's now, in the words the server reported them in.
   */
  landedOn(server: ServerConnection): void {
    for (const [name, value] of this.#reported) if (carried(name)) server.setParameter(name, value);
  }
}

function setConfig(name: string, value: string): string {
  return `pg_catalog.set_config(${literal(name)}, ${literal(value)}, false)`;
}

/** An escape string literal: the same text whatever standard_conforming_strings says. */
export function literal(text: string): string {
  return `E'${text.replaceAll('\\', '\\\\').replaceAll("'", "\\'")}'`;
}
