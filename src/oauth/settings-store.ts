/**
 * OAuthSettingsLocation: where tokens persist between runs, as JSON keyed by workspace and client
 * id so that one file can serve several targets.
 *
 * Databricks may rotate a refresh token on every use, so two processes sharing one file must
 * never spend the same one. Every read-refresh-write therefore runs under an exclusive lock file
 * (`<file>.lock`, created with O_EXCL) and re-reads the file once it holds the lock: a process that
 * finds a token another one just stored uses it instead of refreshing. A lock left by a process
 * that died is broken when its pid is gone (same host) or it is older than the longest a refresh
 * can take. Writes go to a temporary file that is renamed over the old one, mode 0600, in a folder
 * created 0700; an existing file that other users can read or write is refused.
 */
import { createHash, randomUUID } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import type { Stats } from 'node:fs';
import { mkdir, open, readFile, rename, rm, stat, unlink } from 'node:fs/promises';
import { homedir, hostname } from 'node:os';
import { isAbsolute, posix, resolve as resolvePath, win32 } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { TokenError } from '../token/token-source.js';

export const MEMORY_LOCATION = 'memory://';
export const SETTINGS_FILE_NAME = 'OAuthSettings.txt';
const APP_FOLDER = 'lakebase-proxy';

/** A browser login begun by `auth url`, waiting for `auth exchange` (or OAuthVerifier). */
export interface PendingLogin {
  readonly codeVerifier: string;
  readonly state: string;
  readonly redirectUri: string;
  readonly createdAt: string;
}

/** What is kept for one workspace and client id. Times are RFC 3339 strings. */
export interface SettingsEntry {
  readonly accessToken?: string;
  readonly expiresAt?: string;
  readonly obtainedAt?: string;
  /** The lifetime was not given by the server and is a guess. */
  readonly expiryAssumed?: boolean;
  readonly refreshToken?: string;
  readonly pending?: PendingLogin;
  /**
   * Fingerprints of OAuthAccessToken/OAuthRefreshToken values already taken in, and of
   * OAuthVerifier codes already spent: a value given again on the next start is not used twice.
   */
  readonly seen?: readonly string[];
}

interface SettingsFile {
  version: 1;
  targets: Record<string, SettingsEntry>;
}

/** What an update does: `next` undefined leaves the entry alone, null deletes it. */
export interface SettingsUpdate<T> {
  readonly result: T;
  readonly next?: SettingsEntry | null;
}

export interface SettingsStore {
  /** The file path, or `memory://...`; for messages. */
  readonly location: string;
  /** false for memory://: nothing outlives the process. */
  readonly persistent: boolean;
  read(key: string): Promise<SettingsEntry | undefined>;
  /** Runs `change` on a fresh read of the entry while holding the exclusive lock, then writes. */
  update<T>(key: string, change: (entry: SettingsEntry | undefined) => Promise<SettingsUpdate<T>>): Promise<T>;
}

export interface SettingsStoreOptions {
  /** A lock older than this is taken to be left by a dead process. */
  readonly lockStaleMs: number;
}

/** The entry key for one target: one file may hold several. */
export function settingsKey(workspace: URL, clientId: string): string {
  return `${workspace.origin} ${clientId}`;
}

/** A short one-way fingerprint of a value, for `SettingsEntry.seen`. */
export function fingerprint(value: string): string {
  return createHash('sha256').update(value).digest('hex').slice(0, 24);
}

/** The default OAuthSettingsLocation: `OAuthSettings.txt` in the user's config folder for lakebase-proxy. */
export function defaultSettingsPath(
  env: NodeJS.ProcessEnv = process.env,
  platform: NodeJS.Platform = process.platform,
  home: string = homedir(),
): string {
  switch (platform) {
    case 'win32':
      return win32.join(env['APPDATA'] || win32.join(home, 'AppData', 'Roaming'), APP_FOLDER, SETTINGS_FILE_NAME);
    case 'darwin':
      return posix.join(home, 'Library', 'Application Support', APP_FOLDER, SETTINGS_FILE_NAME);
    default: {
      const xdg = env['XDG_CONFIG_HOME'];
      // The XDG spec says a relative value is invalid and must be ignored.
      return posix.join(xdg && posix.isAbsolute(xdg) ? xdg : posix.join(home, '.config'), APP_FOLDER, SETTINGS_FILE_NAME);
    }
  }
}

/** Opens the store at `location` (a path, `~/...`, `memory://`, or undefined for the default file). */
export function openSettingsStore(location: string | undefined, options: SettingsStoreOptions): SettingsStore {
  if (location !== undefined && location.toLowerCase().startsWith(MEMORY_LOCATION)) {
    return new MemorySettingsStore(location);
  }
  let path = location ?? defaultSettingsPath();
  if (path === '~' || path.startsWith('~/')) path = homedir() + path.slice(1);
  return new FileSettingsStore(isAbsolute(path) ? path : resolvePath(path), options);
}

/** Every `memory://` store of one location in this process shares its content, like a file would. */
const memoryFiles = new Map<string, SettingsFile>();

class MemorySettingsStore implements SettingsStore {
  readonly persistent = false;
  constructor(readonly location: string) {}

  read(key: string): Promise<SettingsEntry | undefined> {
    return Promise.resolve(memoryFiles.get(this.location)?.targets[key]);
  }

  update<T>(key: string, change: (entry: SettingsEntry | undefined) => Promise<SettingsUpdate<T>>): Promise<T> {
    return serialized(this.location, async () => {
      const file = memoryFiles.get(this.location) ?? { version: 1, targets: {} };
      const { result, next } = await change(file.targets[key]);
      if (next !== undefined) {
        applyUpdate(file, key, next);
        memoryFiles.set(this.location, file);
      }
      return result;
    });
  }
}

class FileSettingsStore implements SettingsStore {
  readonly persistent = true;
  readonly #lockPath: string;

  constructor(
    readonly location: string,
    private readonly options: SettingsStoreOptions,
  ) {
    this.#lockPath = `${location}.lock`;
  }

  async read(key: string): Promise<SettingsEntry | undefined> {
    return (await this.#load()).targets[key];
  }

  update<T>(key: string, change: (entry: SettingsEntry | undefined) => Promise<SettingsUpdate<T>>): Promise<T> {
    // In-process callers queue here; the lock file orders processes.
    return serialized(this.location, async () => {
      await this.#ensureFolder();
      const release = await this.#lock();
      try {
        const file = await this.#load();
        const { result, next } = await change(file.targets[key]);
        if (next !== undefined) {
          applyUpdate(file, key, next);
          await this.#write(file);
        }
        return result;
      } finally {
        await release();
      }
    });
  }

  async #load(): Promise<SettingsFile> {
    let text: string;
    try {
      const problem = fileProblem(await stat(this.location), this.location);
      if (problem) throw this.#error(problem);
      text = await readFile(this.location, 'utf8');
    } catch (err) {
      if (err instanceof TokenError) throw err;
      if (errorCode(err) === 'ENOENT') return { version: 1, targets: {} };
      throw this.#error(`cannot be read (${errorCode(err) ?? 'error'})`, err);
    }
    if (text.trim() === '') return { version: 1, targets: {} };
    let parsed: unknown;
    try {
      parsed = JSON.parse(text);
    } catch {
      throw this.#error('is not lakebase-proxy settings JSON: fix or delete it');
    }
    if (typeof parsed !== 'object' || parsed === null || typeof (parsed as { targets?: unknown }).targets !== 'object') {
      throw this.#error('is not lakebase-proxy settings JSON: fix or delete it');
    }
    const targets = (parsed as { targets: unknown }).targets;
    return { version: 1, targets: { ...(targets as Record<string, SettingsEntry>) } };
  }

  async #write(file: SettingsFile): Promise<void> {
    const temporary = `${this.location}.${process.pid}.${randomUUID().slice(0, 8)}.tmp`;
    try {
      const handle = await open(temporary, fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_EXCL, 0o600);
      try {
        await handle.chmod(0o600); // the umask may have narrowed it further, never widened: make it exact
        await handle.writeFile(`${JSON.stringify(file, null, 2)}\n`);
        await handle.sync();
      } finally {
        await handle.close();
      }
      await rename(temporary, this.location);
    } catch (err) {
      await rm(temporary, { force: true }).catch(() => undefined);
      throw this.#error(`cannot be written (${errorCode(err) ?? 'error'})`, err);
    }
  }

  async #ensureFolder(): Promise<void> {
    const folder = posixOrWin32Dirname(this.location);
    try {
      // mode applies only to folders created here; an existing folder is left as it is.
      await mkdir(folder, { recursive: true, mode: 0o700 });
    } catch (err) {
      throw this.#error(`cannot be stored: its folder ${folder} cannot be created (${errorCode(err) ?? 'error'})`, err);
    }
  }

  async #lock(): Promise<() => Promise<void>> {
    const mine = JSON.stringify({ pid: process.pid, host: hostname(), at: Date.now(), id: randomUUID() });
    const deadline = Date.now() + this.options.lockStaleMs + 1_000;
    for (;;) {
      try {
        const handle = await open(this.#lockPath, 'wx', 0o600);
        try {
          await handle.writeFile(mine);
        } finally {
          await handle.close();
        }
        return async () => {
          const current = await readFile(this.#lockPath, 'utf8').catch(() => undefined);
          if (current === mine) await unlink(this.#lockPath).catch(() => undefined);
        };
      } catch (err) {
        if (errorCode(err) !== 'EEXIST') throw this.#error(`cannot be locked (${errorCode(err) ?? 'error'}) at ${this.#lockPath}`, err);
      }
      const holder = await this.#readLock();
      if (holder === undefined) continue; // released between our two calls
      if (holder.stale) {
        // Break it only if it is still the same lock we judged; the window between this read and
        // the unlink is a few microseconds, and exists only after a process died holding it.
        const again = await readFile(this.#lockPath, 'utf8').catch(() => undefined);
        if (again === holder.raw) await unlink(this.#lockPath).catch(() => undefined);
        continue;
      }
      if (Date.now() > deadline) {
        throw this.#error(
          `stays locked by process ${holder.pid ?? '?'} (${this.#lockPath}): if no lakebase-proxy is using it, delete that lock file`,
        );
      }
      await sleep(10 + Math.random() * 40);
    }
  }

  async #readLock(): Promise<{ raw: string; pid: number | undefined; stale: boolean } | undefined> {
    let raw: string;
    let mtimeMs: number;
    try {
      [raw, mtimeMs] = await Promise.all([readFile(this.#lockPath, 'utf8'), stat(this.#lockPath).then((s) => s.mtimeMs)]);
    } catch {
      return undefined;
    }
    let pid: number | undefined;
    let host: string | undefined;
    let at = mtimeMs;
    try {
      const parsed = JSON.parse(raw) as { pid?: unknown; host?: unknown; at?: unknown };
      if (typeof parsed.pid === 'number') pid = parsed.pid;
      if (typeof parsed.host === 'string') host = parsed.host;
      if (typeof parsed.at === 'number') at = parsed.at;
    } catch {
      // Written by a process that died between creating and filling it, or being written now:
      // judged by its age alone.
    }
    const old = Date.now() - at > this.options.lockStaleMs;
    const dead = pid !== undefined && host === hostname() && !processAlive(pid);
    return { raw, pid, stale: old || dead };
  }

  #error(what: string, cause?: unknown): TokenError {
    return new TokenError('settings_error', `OAuthSettingsLocation ${this.location} ${what}`, { cause: plainCause(cause) });
  }
}

/**
 * Why an existing settings file may not be used: not a regular file, or open to other users.
 * As ssh does with a private key, a file that the group or others may read or write is refused
 * (not repaired): its tokens may already have been read, and the person should know.
 */
function fileProblem(info: Stats, location: string): string | undefined {
  if (!info.isFile()) return 'is not a regular file';
  if (process.platform !== 'win32' && (info.mode & 0o077) !== 0) {
    return `can be read or written by other users (mode ${(info.mode & 0o777).toString(8).padStart(4, '0')}): it holds tokens; run \`chmod 600 ${location}\``;
  }
  return undefined;
}

/**
 * Refuses, before anything starts, a settings file that #load would refuse later: at the first
 * client's login that would be a surprise (and a service principal, which needs nothing stored,
 * would go on in memory with only a warning).
 */
export async function checkSettingsFile(location: string | undefined): Promise<void> {
  const store = openSettingsStore(location, { lockStaleMs: 0 });
  if (!(store instanceof FileSettingsStore)) return;
  let info: Stats;
  try {
    info = await stat(store.location);
  } catch {
    return; // missing (created when first needed) or unreadable (reported when first needed)
  }
  const problem = fileProblem(info, store.location);
  if (problem) throw new TokenError('settings_error', `OAuthSettingsLocation ${store.location} ${problem}`);
}

function applyUpdate(file: SettingsFile, key: string, next: SettingsEntry | null): void {
  if (next === null) {
    delete file.targets[key];
  } else {
    file.targets[key] = next;
  }
}

function posixOrWin32Dirname(path: string): string {
  return process.platform === 'win32' ? win32.dirname(path) : posix.dirname(path);
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return errorCode(err) === 'EPERM';
  }
}

function errorCode(err: unknown): string | undefined {
  const code = (err as { code?: unknown } | undefined)?.code;
  return typeof code === 'string' ? code : undefined;
}

function plainCause(err: unknown): Error | undefined {
  return err instanceof Error ? new Error(err.message) : undefined;
}

const queues = new Map<string, Promise<unknown>>();

/** Runs `task` after every earlier task of the same key in this process has finished. */
function serialized<T>(key: string, task: () => Promise<T>): Promise<T> {
  const previous = queues.get(key) ?? Promise.resolve();
  const run = previous.then(task);
  const tail = run.catch(() => undefined);
  queues.set(key, tail);
  void tail.then(() => {
    if (queues.get(key) === tail) queues.delete(key);
  });
  return run;
}
