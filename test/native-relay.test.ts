/**
 * The native relay (native/relay.c, OpenSSL's TLS in C): which sessions it takes (TLS 1.3 with
 * each cipher suite, TLS 1.2), and the sessions it leaves to the JavaScript relay (a client on
 * TLS, --relay js, an addon that cannot load), which must work the same.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect as netConnect } from 'node:net';
import { serialize } from 'pg-protocol';
import pg from 'pg';
import type { TestPostgres } from './harness/postgres.js';
import { startProxiedPostgres, startProxy, startProxyProcess, connectionFor, type InProcessProxy, type ProxyProcess } from './harness/proxy.js';
import { native } from '../src/proxy/native-relay.js';
import { encodeStartupMessage } from '../src/wire/startup-packets.js';

let db: TestPostgres;
let proxy: InProcessProxy;
let close: () => Promise<void>;
const token = 'tok-' + randomBytes(600).toString('base64url');

before(async () => ({ db, proxy, close } = await startProxiedPostgres(token, ['--relay', 'native'])));
after(() => close?.());

const hasCompiler = ['cc', 'gcc', 'clang'].some((cc) => spawnSync(cc, ['--version'], { stdio: 'ignore' }).status === 0);

/** Sets server settings that a reload applies (the TLS ones do) and waits until new sessions see them. */
async function serverSettings(settings: Record<string, string | null>): Promise<void> {
  for (const [name, value] of Object.entries(settings)) {
    await db.query(value === null ? `alter system reset ${name}` : `alter system set ${name} = '${value}'`);
  }
  await db.query('select pg_reload_conf()');
  await new Promise((resolve) => setTimeout(resolve, 300));
}

/** One session through `port`: its TLS version and cipher upstream, a 1 MB answer's digest, the proxy's log line for it. */
async function session(
  through: InProcessProxy,
  name: string,
  extra: Partial<pg.ClientConfig> = {},
): Promise<{ version: string; cipher: string; digest: string; expected: string; relay: unknown }> {
  const c = new pg.Client({ host: '127.0.0.1', port: through.port, user: 'anyone', database: db.database, application_name: name, ...extra });
  await c.connect();
  let result;
  try {
    const ssl = (await c.query('select version, cipher from pg_stat_ssl where pid = pg_backend_pid()')).rows[0];
    const seed = randomBytes(8).toString('hex');
    // An answer of many TLS records, and an extended query with parameters both ways.
    const big = (await c.query("select string_agg(md5($1 || g::text), '') as s from generate_series(1, 32000) g", [seed])).rows[0].s as string;
    const echo = (await c.query('select $1::text as t', ['é☃'.repeat(5000)])).rows[0].t as string;
    assert.equal(echo, 'é☃'.repeat(5000));
    const expected = (await db.query<{ s: string }>("select string_agg(md5($1 || g::text), '') as s from generate_series(1, 32000) g", [seed]))[0]?.s as string;
    result = { version: ssl.version as string, cipher: ssl.cipher as string, digest: sha(big), expected: sha(expected) };
  } finally {
    await c.end();
  }
  await new Promise((resolve) => setTimeout(resolve, 100));
  const line = through.logs.filter((l) => l.msg === 'session ended').at(-1);
  return { ...result, relay: line?.relay };
}

function sha(text: string): string {
  return createHash('sha256').update(text).digest('hex');
}

test('npm install built the native relay (on a machine with a C compiler)', (t) => {
  if (!hasCompiler) {
    t.skip('no C compiler here: the proxy uses the JavaScript relay');
    return;
  }
  assert.ok(native.addon, `the addon did not load: ${native.problem}`);
});

test('each TLS 1.3 cipher suite: the session goes native, and a large answer and parameters pass intact', async (t) => {
  if (!native.addon) {
    t.skip(`no native relay: ${native.problem}`);
    return;
  }
  try {
    for (const suite of ['TLS_AES_256_GCM_SHA384', 'TLS_AES_128_GCM_SHA256', 'TLS_CHACHA20_POLY1305_SHA256']) {
      await serverSettings({ ssl_tls13_ciphers: suite });
      const s = await session(proxy, `cipher-${suite}`);
      assert.equal(s.version, 'TLSv1.3');
      assert.equal(s.cipher, suite);
      assert.equal(s.relay, 'native', suite);
      assert.equal(s.digest, s.expected, `${suite}: the answer arrived intact`);
    }
  } finally {
    await serverSettings({ ssl_tls13_ciphers: null });
  }
});

test('a TLS 1.2 upstream: OpenSSL in C speaks it too, so its sessions go native', async () => {
  try {
    await serverSettings({ ssl_max_protocol_version: 'TLSv1.2' });
    for (const name of ['tls12-first', 'tls12-second']) {
      const s = await session(proxy, name);
      assert.equal(s.version, 'TLSv1.2');
      assert.equal(s.relay, native.addon ? 'native' : 'js');
      assert.equal(s.digest, s.expected);
    }
  } finally {
    await serverSettings({ ssl_max_protocol_version: null });
  }
  assert.equal((await session(proxy, 'tls13-again')).relay, native.addon ? 'native' : 'js');
});

test('a client on TLS, and --relay js: the JavaScript relay, with the same results', async () => {
  const tlsProxy = await startProxy(['--connection', connectionFor(db, token), '--tls-cert', db.ca.serverCertFile, '--tls-key', db.ca.serverKeyFile, '--relay', 'native']);
  const jsProxy = await startProxy(['--connection', connectionFor(db, token), '--relay', 'js']);
  try {
    const overTls = await session(tlsProxy, 'client-tls', { ssl: { ca: db.ca.caPem, servername: 'localhost' } });
    assert.equal(overTls.relay, 'js');
    assert.equal(overTls.digest, overTls.expected);
    const js = await session(jsProxy, 'relay-js');
    assert.equal(js.relay, 'js');
    assert.equal(js.digest, js.expected);
  } finally {
    await Promise.all([tlsProxy.close(), jsProxy.close()]);
  }
});

test('a query sent right behind the startup counts as running: --idle-timeout does not close the session under it', async () => {
  for (const relay of ['native', 'js']) {
    const idle = await startProxy(['--connection', connectionFor(db, token), '--idle-timeout', '400', '--relay', relay]);
    try {
      // Startup and query in one write, before any answer: the query reaches the relay with the login's leftovers.
      const socket = netConnect({ host: '127.0.0.1', port: idle.port });
      socket.write(Buffer.concat([encodeStartupMessage(new Map([['user', 'anyone'], ['database', db.database]])), serialize.query("select pg_sleep(1.2), 'done' as v")]));
      const received: Buffer[] = [];
      socket.on('data', (chunk: Buffer) => {
        received.push(chunk);
        // The answer is in: the client says goodbye (before the idle timeout could after it).
        if (Buffer.concat(received).includes('SELECT 1\0')) socket.end(serialize.end());
      });
      await new Promise<void>((resolve) => {
        socket.on('close', () => resolve());
        socket.on('error', () => resolve());
        setTimeout(() => socket.end(serialize.end()), 5000);
      });
      const all = Buffer.concat(received).toString('latin1');
      assert.match(all, /SELECT 1/, `${relay}: the query completed (CommandComplete) before any idle close`);
      assert.match(all, /done/);
      // The line comes once both sides have closed: the upstream answers the Terminate by closing.
      for (let i = 0; i < 60 && !idle.logs.some((l) => l.msg === 'session ended'); i++) await new Promise((r) => setTimeout(r, 50));
      const line = idle.logs.filter((l) => l.msg === 'session ended').at(-1);
      assert.equal(line?.relay, relay === 'native' && native.addon ? 'native' : 'js');
      assert.equal(line?.end, 'client_closed', `${relay}: ended by the client, not by the idle timeout: ${JSON.stringify(line)}`);
    } finally {
      await idle.close();
    }
  }
});

test('an addon that cannot load (a symbol this Node.js lacks): the proxy says so once and relays in JavaScript, no crash', async (t) => {
  const cc = ['cc', 'gcc', 'clang'].find((c) => spawnSync(c, ['--version'], { stdio: 'ignore' }).status === 0);
  if (!cc) {
    t.skip('no C compiler here to build the broken addon');
    return;
  }
  // Built the way binding.gyp builds ours (immediate binding), calling a function no Node.js exports.
  const dir = mkdtempSync(join(tmpdir(), 'lbp-broken-addon-'));
  try {
    writeFileSync(join(dir, 'broken.c'), 'extern void SSL_function_this_node_lacks(void);\nvoid napi_register_module_v1(void) { SSL_function_this_node_lacks(); }\n');
    const built = spawnSync(cc, ['-shared', '-fPIC', '-Wl,-z,now', '-o', join(dir, 'broken.node'), join(dir, 'broken.c')], { encoding: 'utf8' });
    assert.equal(built.status, 0, built.stderr);
    const { proxy: child, close: stop } = await startProgram(db, token, { LAKEBASE_PROXY_NATIVE_ADDON: join(dir, 'broken.node') });
    try {
      for (let i = 0; i < 2; i++) {
        const c = new pg.Client({ host: '127.0.0.1', port: child.port, user: 'anyone', database: db.database });
        await c.connect();
        assert.equal((await c.query('select 40 + 2 as v')).rows[0].v, 42);
        await c.end();
      }
      await waitForText(child.output, /"msg":"session ended"[^\n]*"relay":"js"[^\n]*\n[^\n]*"msg":"session ended"/);
      const output = child.output();
      const said = output.split('\n').filter((l) => l.includes('the native relay did not load'));
      assert.equal(said.length, 1, output);
      assert.match(said[0] as string, /SSL_function_this_node_lacks/);
      assert.doesNotMatch(output, /"relay":"native"/);
      assert.equal(child.child.exitCode, null, 'still running');
    } finally {
      await stop();
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

/** The real program in front of `db` with `env`; stopped with SIGINT. */
async function startProgram(on: TestPostgres, tok: string, env: NodeJS.ProcessEnv): Promise<{ proxy: ProxyProcess; close: () => Promise<unknown> }> {
  const started = await startProxyProcess(['--connection', connectionFor(on, tok), '--no-http', '--relay', 'native'], env);
  return { proxy: started, close: () => started.stop('SIGINT') };
}

async function waitForText(read: () => string, pattern: RegExp): Promise<void> {
  for (let i = 0; i < 100 && !pattern.test(read()); i++) await new Promise((resolve) => setTimeout(resolve, 50));
}
