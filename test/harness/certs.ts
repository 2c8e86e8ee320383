/**
 * Test certificates: a throw-away CA, a server certificate signed by it (SAN DNS:localhost and
 * IP:127.0.0.1) and an unrelated self-signed "untrusted" certificate for verification-failure
 * tests. Pure JavaScript (the `selfsigned` package, WebCrypto underneath): no openssl CLI needed.
 *
 * `test/run.js` generates one set per test run with `writeTestCA()` and exports TEST_CA_DIR (and
 * NODE_EXTRA_CA_CERTS=<ca file>) to every test process; `testCA()` / `untrustedCert()` load that set.
 * Without TEST_CA_DIR (a test file run on its own) a set is generated into a temporary folder once
 * per process and removed when the process exits.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, chownSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import type { Socket } from 'node:net';
import { join } from 'node:path';
import { generate } from 'selfsigned';

export interface TestCA {
  /** PEM of the CA certificate (what clients should trust). */
  readonly caPem: string;
  readonly caFile: string;
  /** Server certificate signed by the CA, SAN DNS:localhost and IP:127.0.0.1. */
  readonly serverCertPem: string;
  readonly serverKeyPem: string;
  readonly serverCertFile: string;
  readonly serverKeyFile: string;
  /** Folder holding the files. */
  readonly dir: string;
}

export interface TestCert {
  readonly certPem: string;
  readonly keyPem: string;
  readonly certFile: string;
  readonly keyFile: string;
}

/** File names inside a test CA folder. */
export const CA_FILES = {
  caCert: 'ca.crt',
  caKey: 'ca.key',
  serverCert: 'server.crt',
  serverKey: 'server.key',
  untrustedCert: 'untrusted.crt',
  untrustedKey: 'untrusted.key',
} as const;

/** The OS account a PostgreSQL server runs as when the tests run as root. */
export interface OsUser {
  readonly name: string;
  readonly uid: number;
  readonly gid: number;
}

/**
 * When running as root: the account to run PostgreSQL as (it refuses to run as root) —
 * `postgres` if it exists, else `nobody`. Undefined when not root (the server runs as us).
 */
export function postgresOsUser(): OsUser | undefined {
  if (typeof process.getuid !== 'function' || process.getuid() !== 0) return undefined;
  let passwd = '';
  try {
    passwd = readFileSync('/etc/passwd', 'utf8');
  } catch {
    // fall through to the error below
  }
  const users = new Map<string, OsUser>();
  for (const line of passwd.split('\n')) {
    const [name, , uid, gid] = line.split(':');
    if (name && uid !== undefined && gid !== undefined && /^\d+$/.test(uid) && /^\d+$/.test(gid)) {
      users.set(name, { name, uid: Number(uid), gid: Number(gid) });
    }
  }
  const wanted = process.env['TEST_PG_OS_USER'];
  const found = wanted ? users.get(wanted) : (users.get('postgres') ?? users.get('nobody'));
  if (!found || found.uid === 0) {
    throw new Error(
      `running as root, but found no non-root OS user to run PostgreSQL as ` +
        `(looked for ${wanted ? `"${wanted}"` : '"postgres" and "nobody"'} in /etc/passwd)`,
    );
  }
  return found;
}

/**
 * Starts a tiny shell process that holds a pipe from this process: when this process ends in any
 * way (even SIGKILL) the pipe closes, and it stops process `pid` if given (SIGQUIT, then SIGKILL
 * after 5 s) and removes `path`. Kill the returned process to cancel. Undefined if /bin/sh failed.
 */
export function startWatchdog(path: string, pid?: number): ChildProcess | undefined {
  const script = [
    'while read -r _; do :; done',
    'if [ -n "$2" ]; then',
    // Alive = signalable and (where /proc exists) not a zombie waiting for init to reap it.
    '  alive() {',
    '    kill -0 "$1" 2>/dev/null || return 1',
    '    [ -r "/proc/$1/stat" ] || return 0',
    '    state=$(sed "s/.*) //" "/proc/$1/stat" 2>/dev/null | cut -c1)',
    '    [ -n "$state" ] && [ "$state" != Z ]',
    '  }',
    '  kill -QUIT "$2" 2>/dev/null',
    '  i=0',
    '  while alive "$2" && [ "$i" -lt 50 ]; do sleep 0.1 2>/dev/null || sleep 1; i=$((i+1)); done',
    '  alive "$2" && kill -KILL "$2" 2>/dev/null',
    'fi',
    'rm -rf "$1"',
  ].join('\n');
  try {
    const child = spawn('/bin/sh', ['-c', script, 'lbp-test-watchdog', path, pid === undefined ? '' : String(pid)], {
      stdio: ['pipe', 'ignore', 'ignore'],
      cwd: '/',
    });
    child.on('error', () => undefined);
    child.stdin?.on('error', () => undefined);
    // Neither the process nor the pipe may keep this process alive.
    child.unref();
    (child.stdin as unknown as Socket | null)?.unref?.();
    return child;
  } catch {
    return undefined;
  }
}

const DAY_MS = 24 * 60 * 60 * 1000;

function validity(): { notBeforeDate: Date; notAfterDate: Date } {
  const now = Date.now();
  // Back-date a little against clock skew between processes/machines.
  return { notBeforeDate: new Date(now - DAY_MS), notAfterDate: new Date(now + 3650 * DAY_MS) };
}

type GenerateOptions = NonNullable<Parameters<typeof generate>[1]>;
type Extensions = NonNullable<GenerateOptions['extensions']>;

function leafExtensions(): Extensions {
  return [
    { name: 'basicConstraints', cA: false, critical: true },
    { name: 'keyUsage', digitalSignature: true, keyEncipherment: true, critical: true },
    { name: 'extKeyUsage', serverAuth: true, clientAuth: true },
    {
      name: 'subjectAltName',
      altNames: [
        { type: 2, value: 'localhost' },
        { type: 7, ip: '127.0.0.1' },
      ],
    },
  ];
}

// EC P-256 keys: generated in about a millisecond and accepted by every client and by PostgreSQL.
const KEY_OPTIONS = { keyType: 'ec', curve: 'P-256', algorithm: 'sha256' } as const;

interface GeneratedSet {
  caCert: string;
  caKey: string;
  serverCert: string;
  serverKey: string;
  untrustedCert: string;
  untrustedKey: string;
}

async function generateSet(): Promise<GeneratedSet> {
  const ca = await generate([{ name: 'commonName', value: 'lakebase-proxy test CA' }], {
    ...KEY_OPTIONS,
    ...validity(),
    extensions: [
      { name: 'basicConstraints', cA: true, critical: true },
      { name: 'keyUsage', keyCertSign: true, cRLSign: true, digitalSignature: true, critical: true },
    ],
  });
  const [server, untrusted] = await Promise.all([
    generate([{ name: 'commonName', value: 'localhost' }], {
      ...KEY_OPTIONS,
      ...validity(),
      extensions: leafExtensions(),
      ca: { key: ca.private, cert: ca.cert },
    }),
    generate([{ name: 'commonName', value: 'localhost' }], {
      ...KEY_OPTIONS,
      ...validity(),
      extensions: leafExtensions(),
    }),
  ]);
  return {
    caCert: ca.cert,
    caKey: ca.private,
    serverCert: server.cert,
    serverKey: server.private,
    untrustedCert: untrusted.cert,
    untrustedKey: untrusted.private,
  };
}

function loadCA(dir: string): TestCA {
  const caFile = join(dir, CA_FILES.caCert);
  const serverCertFile = join(dir, CA_FILES.serverCert);
  const serverKeyFile = join(dir, CA_FILES.serverKey);
  return {
    caPem: readFileSync(caFile, 'utf8'),
    caFile,
    serverCertPem: readFileSync(serverCertFile, 'utf8'),
    serverKeyPem: readFileSync(serverKeyFile, 'utf8'),
    serverCertFile,
    serverKeyFile,
    dir,
  };
}

function loadUntrusted(dir: string): TestCert {
  const certFile = join(dir, CA_FILES.untrustedCert);
  const keyFile = join(dir, CA_FILES.untrustedKey);
  return { certPem: readFileSync(certFile, 'utf8'), keyPem: readFileSync(keyFile, 'utf8'), certFile, keyFile };
}

function isCADir(dir: string): boolean {
  return Object.values(CA_FILES).every((f) => existsSync(join(dir, f)));
}

/**
 * Generates a CA, a server certificate and an untrusted certificate into `dir` (created if
 * missing; a new temporary folder if omitted). Keys are mode 0600. When running as root the
 * folder and files are handed to the PostgreSQL OS user so the server can read its key.
 */
export async function writeTestCA(dir?: string): Promise<TestCA> {
  const target = dir ?? mkdtempSync(join(tmpdir(), 'lbp-test-ca-'));
  mkdirSync(target, { recursive: true, mode: 0o700 });
  const set = await generateSet();
  const files: Array<[string, string, number]> = [
    [CA_FILES.caCert, set.caCert, 0o644],
    [CA_FILES.caKey, set.caKey, 0o600],
    [CA_FILES.serverCert, set.serverCert, 0o644],
    [CA_FILES.serverKey, set.serverKey, 0o600],
    [CA_FILES.untrustedCert, set.untrustedCert, 0o644],
    [CA_FILES.untrustedKey, set.untrustedKey, 0o600],
  ];
  const owner = postgresOsUser();
  for (const [name, content, mode] of files) {
    const file = join(target, name);
    writeFileSync(file, content, { mode });
    chmodSync(file, mode); // writeFileSync's mode is masked by the umask and ignored for existing files
    if (owner) chownSync(file, owner.uid, owner.gid);
  }
  if (owner) chownSync(target, owner.uid, owner.gid);
  return loadCA(target);
}

let generatedDir: Promise<string> | undefined;

/** The folder of this process's test certificates: TEST_CA_DIR, or a per-process generated one. */
function caDir(): Promise<string> {
  const fromEnv = process.env['TEST_CA_DIR'];
  if (fromEnv) {
    if (!isCADir(fromEnv)) {
      return Promise.reject(
        new Error(`TEST_CA_DIR=${fromEnv} does not hold ${Object.values(CA_FILES).join(', ')}`),
      );
    }
    return Promise.resolve(fromEnv);
  }
  generatedDir ??= writeTestCA().then((ca) => {
    process.once('exit', () => rmSync(ca.dir, { recursive: true, force: true }));
    startWatchdog(ca.dir); // also removed if this process is killed
    return ca.dir;
  });
  return generatedDir;
}

/** The test CA and its CA-signed server certificate for localhost / 127.0.0.1. */
export async function testCA(): Promise<TestCA> {
  return loadCA(await caDir());
}

/** A self-signed certificate for localhost / 127.0.0.1 that is NOT issued by the test CA. */
export async function untrustedCert(): Promise<TestCert> {
  return loadUntrusted(await caDir());
}
