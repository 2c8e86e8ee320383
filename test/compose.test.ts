/**
 * The container files, checked without a Docker engine: docker-compose.yml parsed and held to the
 * files, ports and health checks it names; the Dockerfile's stages, user and health check (the
 * latter run for real against the ops endpoint); the demo's certificate script run with openssl;
 * and `docker-compose config` where the binary exists.
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawnSync } from 'node:child_process';
import { X509Certificate } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Script } from 'node:vm';
import { parse } from 'yaml';
import { CA_FILES } from './harness/certs.js';
import { parseConnectionString } from '../src/config/connection-string.js';
import { envName, PROPERTIES, Settings } from '../src/config/properties.js';
import { parseUsers, resolveOAuth, resolveProxy } from '../src/config/target.js';
import { startOpsServer } from '../src/ops/http.js';
import { silentLogger } from '../src/ops/log.js';
import { Metrics } from '../src/ops/metrics.js';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const at = (path: string): string => join(ROOT, path);

interface Service {
  profiles?: string[];
  build?: { context: string; target?: string };
  image?: string;
  command?: string[];
  entrypoint?: string[];
  environment?: Record<string, string> | string[];
  volumes?: string[];
  ports?: string[];
  depends_on?: Record<string, { condition: string }>;
  healthcheck?: { test: string[] };
  restart?: string;
}

const compose = parse(readFileSync(at('docker-compose.yml'), 'utf8')) as { services: Record<string, Service>; volumes?: Record<string, unknown> };
const services = compose.services;
const service = (name: string): Service => {
  const found = services[name];
  assert.ok(found, `no service ${name}`);
  return found;
};
const environment = (s: Service): Record<string, string | undefined> =>
  Array.isArray(s.environment)
    ? Object.fromEntries(s.environment.map((e) => (e.includes('=') ? [e.slice(0, e.indexOf('=')), e.slice(e.indexOf('=') + 1)] : [e, undefined])))
    : { ...(s.environment ?? {}) };

interface Mount {
  source: string;
  target: string;
  named: boolean;
}
function mounts(s: Service): Mount[] {
  return (s.volumes ?? []).map((v) => {
    const [source = '', target = ''] = v.split(':');
    return { source, target, named: !source.startsWith('.') && !source.startsWith('/') };
  });
}

/** The Dockerfile as instructions (continuations joined, comments dropped), each with its stage. */
interface Instruction {
  keyword: string;
  args: string;
  stage: string;
}
function dockerfile(): { stages: string[]; instructions: Instruction[] } {
  const instructions: Instruction[] = [];
  const stages: string[] = [];
  let pending = '';
  for (const line of readFileSync(at('Dockerfile'), 'utf8').split('\n')) {
    if (line.trimStart().startsWith('#')) continue;
    pending += line.replace(/\\\s*$/, ' ');
    if (/\\\s*$/.test(line)) continue;
    const text = pending.trim();
    pending = '';
    if (text === '') continue;
    const [keyword = '', ...rest] = text.split(/\s+/);
    const args = rest.join(' ');
    if (keyword.toUpperCase() === 'FROM') {
      const name = /\sAS\s+(\S+)$/i.exec(text)?.[1];
      stages.push(name ?? `#${stages.length}`);
    }
    instructions.push({ keyword: keyword.toUpperCase(), args, stage: stages.at(-1) ?? '' });
  }
  return { stages, instructions };
}
const docker = dockerfile();
const inStage = (stage: string, keyword: string): Instruction[] => docker.instructions.filter((i) => i.stage === stage && i.keyword === keyword);
/** The JSON-array form of an instruction's arguments, after any --options. */
const execForm = (args: string): string[] => JSON.parse(args.slice(args.indexOf('['))) as string[];

function enabled(profile: string): string[] {
  return Object.entries(services)
    .filter(([, s]) => s.profiles === undefined || s.profiles.includes(profile))
    .map(([name]) => name);
}

test('the demo profile runs exactly the demo services; the real proxy has a profile of its own', () => {
  assert.deepEqual(enabled('demo').sort(), ['demo-certs', 'oauth', 'postgres', 'proxy-demo']);
  assert.deepEqual(enabled('lakebase'), ['proxy']);
});

test('every published port is on 127.0.0.1, and no two services of a profile publish the same one', () => {
  for (const profile of ['demo', 'lakebase']) {
    const seen = new Map<string, string>();
    for (const name of enabled(profile)) {
      for (const port of service(name).ports ?? []) {
        const [address, host, container] = port.split(':');
        assert.equal(address, '127.0.0.1', `${name} publishes ${port} beyond loopback`);
        assert.match(`${host}:${container}`, /^\d+:\d+$/);
        assert.equal(seen.get(host as string), undefined, `${name} and ${seen.get(host as string)} both publish ${host}`);
        seen.set(host as string, name);
      }
    }
  }
  assert.deepEqual(service('proxy-demo').ports, ['127.0.0.1:5432:5432', '127.0.0.1:9090:9090']);
});

test('bind mounts, and the files the commands name under them, exist in the repository', () => {
  for (const [name, s] of Object.entries(services)) {
    for (const mount of mounts(s)) {
      if (mount.named) {
        assert.ok(compose.volumes && mount.source in compose.volumes, `${name}: volume ${mount.source} is not declared`);
        continue;
      }
      assert.ok(existsSync(at(mount.source)), `${name}: ${mount.source} does not exist`);
      assert.match(mount.target, /^\//);
    }
    const words = [...(s.entrypoint ?? []), ...(s.command ?? [])];
    for (const word of words) {
      const mount = mounts(s).find((m) => !m.named && word.startsWith(m.target + '/'));
      if (mount) assert.ok(existsSync(at(join(mount.source, word.slice(mount.target.length)))), `${name}: ${word} is not in ${mount.source}`);
    }
  }
});

test("the real proxy's --config file exists, and each target's port and the HTTP port it names are published", () => {
  const proxy = service('proxy');
  const configArg = proxy.command?.[(proxy.command?.indexOf('--config') ?? -1) + 1];
  assert.equal(configArg, '/config/lakebase-proxy.yaml');
  assert.ok(existsSync(at('config/lakebase-proxy.yaml')), 'config/lakebase-proxy.yaml is missing');
  const config = parse(readFileSync(at('config/lakebase-proxy.yaml'), 'utf8')) as Record<string, unknown>;
  const get = (object: Record<string, unknown>, key: string): unknown => Object.entries(object).find(([k]) => k.toLowerCase() === key.toLowerCase())?.[1];
  const targets = (get(config, 'targets') as Array<Record<string, unknown>> | undefined) ?? [config];
  const wanted = [...targets.map((t) => String(get(t, 'ListenPort') ?? get(config, 'ListenPort') ?? 5432)), String(get(config, 'HttpPort') ?? 9090)];
  const published = (proxy.ports ?? []).map((p) => p.split(':')[2]);
  for (const port of wanted) assert.ok(published.includes(port), `port ${port} of the config is not published`);
});

test('build targets are stages of the Dockerfile; the stand-in script the oauth service runs has a source', () => {
  for (const [name, s] of Object.entries(services)) {
    if (!s.build) continue;
    assert.equal(s.build.context, '.', name);
    assert.ok(s.build.target && docker.stages.includes(s.build.target), `${name}: no stage ${s.build.target}`);
  }
  const script = service('oauth').command?.[1] ?? '';
  assert.match(script, /^dist\/.*\.js$/);
  const source = script.replace(/^dist\//, '').replace(/\.js$/, '.ts');
  assert.ok(existsSync(at(source)), `${source} (run by the oauth service as ${script}) is missing`);
  assert.deepEqual(execForm(inStage('demo', 'CMD')[0]?.args ?? '[]'), ['node', script]);
});

test('every service_healthy dependency has a health check; node -e checks compile; completed ones run once', () => {
  const runtimeHealthcheck = inStage('runtime', 'HEALTHCHECK').length > 0;
  for (const [name, s] of Object.entries(services)) {
    for (const [dependency, { condition }] of Object.entries(s.depends_on ?? {})) {
      const target = service(dependency);
      assert.ok(s.profiles?.every((p) => target.profiles?.includes(p)), `${name} depends on ${dependency}, which its profile does not start`);
      if (condition === 'service_healthy') {
        assert.ok(target.healthcheck || (target.build?.target === 'runtime' && runtimeHealthcheck), `${dependency} has no health check`);
      } else {
        assert.equal(condition, 'service_completed_successfully', `${name} -> ${dependency}`);
        assert.ok(target.restart === undefined || target.restart === 'no', `${dependency} must run once`);
      }
    }
    const check = s.healthcheck?.test;
    if (check) {
      assert.equal(check[0], 'CMD', name);
      if (check[1] === 'node' && check[2] === '-e') assert.doesNotThrow(() => new Script(check[3] ?? ''), name);
    }
  }
});

test('the demo is consistent: one client id, secret, URL and role across services, accepted by the proxy', async () => {
  const oauth = environment(service('oauth'));
  const postgres = environment(service('postgres'));
  const demo = service('proxy-demo');
  const args = demo.command ?? [];
  const connection = new Map(parseConnectionString(args[args.indexOf('--connection') + 1] ?? '').map(([k, v]) => [k.toLowerCase(), v]));
  assert.equal(connection.get('databricksinstance'), oauth['STANDIN_URL']);
  assert.equal(connection.get('oauthclientid'), oauth['STANDIN_CLIENT_ID']);
  assert.equal(connection.get('oauthclientsecret'), oauth['STANDIN_CLIENT_SECRET']);
  assert.equal(oauth['STANDIN_ROLE'], postgres['DEMO_ROLE']);
  assert.equal(oauth['PGPASSWORD'], postgres['POSTGRES_PASSWORD']);
  assert.equal(oauth['PGDATABASE'], postgres['POSTGRES_DB']);
  assert.equal(connection.get('server'), oauth['PGHOST']);
  assert.equal(new URL(oauth['STANDIN_URL'] as string).port, oauth['STANDIN_PORT']);
  const sans = /subjectAltName=(.*)/.exec(readFileSync(at('config/demo/make-certs.sh'), 'utf8'))?.[1] ?? '';
  for (const host of [connection.get('server'), new URL(oauth['STANDIN_URL'] as string).hostname, 'localhost']) {
    assert.ok(sans.split(',').includes(`DNS:${host}`), `the demo certificate does not name ${host}`);
  }

  // The proxy's own validation, as in the container: the image's environment, the mounts mapped
  // to the repository, and the demo CA from a run of the certificate script.
  const certs = makeCerts();
  if (!certs) return; // no openssl here: the checks above must do
  const settings = new Settings();
  const runtimeEnv = Object.fromEntries(
    inStage('runtime', 'ENV').flatMap((i) => [...i.args.matchAll(/(\w+)=(\S+)/g)].map((m) => [m[1] as string, m[2] as string])),
  );
  const byEnv = new Map(PROPERTIES.map((p) => [envName(p), p]));
  for (const [name, value] of Object.entries(runtimeEnv)) {
    const property = byEnv.get(name);
    if (property) settings.set(property.name, value, name);
  }
  const toHost = (value: string): string => {
    const mount = mounts(demo).find((m) => value.startsWith(m.target + '/'));
    if (!mount) return value;
    return mount.named ? join(certs, value.slice(mount.target.length)) : at(join(mount.source, value.slice(mount.target.length)));
  };
  for (const [name, value] of Object.entries(environment(demo))) {
    const property = byEnv.get(name);
    if (property && value !== undefined) settings.set(property.name, value, name);
  }
  for (const [key, value] of connection) settings.set(key, toHost(value), '--connection');
  settings.set('ClientUsers', toHost(args[args.indexOf('--client-users') + 1] ?? ''), '--client-users');
  const options = await resolveProxy(settings, 'demo');
  assert.equal(options.listen.address, '0.0.0.0');
  assert.equal(options.clientAuth.authMethod, 'scram-sha-256');
  assert.ok(options.clientAuth.users.has('demo'));
  assert.equal(options.upstream.sslMode, 'verify-full');
  assert.equal(resolveOAuth(settings).user, postgres['DEMO_ROLE'], 'the proxy logs in as the role the demo database has');
});

test('the Dockerfile: a non-root runtime with production dependencies only, its ports, entry point and environment', () => {
  assert.equal(docker.stages.at(-1), 'runtime', 'the default build is the proxy');
  for (const stage of ['runtime', 'demo']) {
    const user = inStage(stage, 'USER').at(-1)?.args ?? '';
    assert.match(user, /^[1-9]\d*(:\d+)?$/, `${stage}: a numeric non-root user`);
  }
  assert.deepEqual(inStage('runtime', 'EXPOSE')[0]?.args.split(/\s+/), ['5432', '9090']);
  assert.deepEqual(execForm(inStage('runtime', 'ENTRYPOINT')[0]?.args ?? '[]'), ['node', 'bin/lakebase-proxy.js']);
  assert.ok(existsSync(at('bin/lakebase-proxy.js')));
  const runtimeCopies = inStage('runtime', 'COPY').map((i) => i.args);
  assert.ok(runtimeCopies.some((a) => a.startsWith('--from=prod-deps /app/node_modules')));
  assert.ok(runtimeCopies.some((a) => a.startsWith('--from=build /app/dist/src ')));
  // The native relay, built where the compiler is, lands where src/proxy/native-relay.ts loads it from.
  assert.ok(runtimeCopies.includes('--from=native /app/build/Release/lakebase_relay.node ./build/Release/lakebase_relay.node'));
  assert.ok(inStage('native', 'RUN').some((i) => i.args.includes('node-gyp') && i.args.includes('rebuild')));
  assert.ok(!runtimeCopies.some((a) => /dist\/test|dist \.\/|\/app\/dist \./.test(a)), 'no test code in the runtime image');
  assert.ok(inStage('prod-deps', 'RUN').some((i) => i.args.includes('npm ci --omit=dev')));
  assert.ok(inStage('build', 'RUN').some((i) => i.args.includes('npm ci')));
  assert.ok(inStage('build', 'RUN').some((i) => i.args.includes('tsc -p tsconfig.json')));

  // Every file copied from the context exists and is not excluded by .dockerignore.
  const ignored = new Set(readFileSync(at('.dockerignore'), 'utf8').split('\n').map((l) => l.trim()).filter((l) => l && !l.startsWith('#')));
  for (const copy of docker.instructions.filter((i) => i.keyword === 'COPY' && !i.args.startsWith('--from'))) {
    for (const source of copy.args.split(/\s+/).slice(0, -1)) {
      assert.ok(existsSync(at(source)), `COPY ${source}: missing`);
      assert.ok(!ignored.has(source) && !ignored.has(source.split('/')[0] as string), `COPY ${source}: excluded by .dockerignore`);
    }
  }
  for (const kept of ['node_modules', 'dist', '.git', '.env', 'config']) assert.ok(ignored.has(kept), `.dockerignore should exclude ${kept}`);

  // The image's LAKEBASE_PROXY_* variables are real settings.
  const names = new Set(PROPERTIES.map((p) => envName(p)));
  for (const instruction of docker.instructions.filter((i) => i.keyword === 'ENV')) {
    for (const [, name] of instruction.args.matchAll(/(LAKEBASE_PROXY_\w+)=/g)) assert.ok(names.has(name as string), `${name} is no setting`);
  }
});

test("the Dockerfile's HEALTHCHECK command passes against a live /liveness and fails when nothing listens", async () => {
  const healthcheck = inStage('runtime', 'HEALTHCHECK')[0]?.args ?? '';
  assert.match(healthcheck, /\/liveness/);
  const command = execForm(healthcheck.slice(healthcheck.indexOf('CMD')));
  assert.equal(command[0], 'node');
  const run = (port: number): Promise<number | null> =>
    new Promise((resolve) => {
      const child = execFile(process.execPath, command.slice(1), { env: { ...process.env, LAKEBASE_PROXY_HTTP_PORT: String(port) }, timeout: 10_000 });
      child.on('exit', (code) => resolve(code));
    });
  const ops = await startOpsServer({
    address: '127.0.0.1',
    port: 0,
    metrics: new Metrics(),
    health: { started: false, shuttingDown: true, atCapacity: () => true }, // liveness holds in every state
    logger: silentLogger,
  });
  try {
    assert.equal(await run(ops.port), 0);
  } finally {
    await ops.close();
  }
  const closed = await new Promise<number>((resolve) => {
    const probe = createServer().listen(0, '127.0.0.1', () => {
      const { port } = probe.address() as { port: number };
      probe.close(() => resolve(port));
    });
  });
  assert.equal(await run(closed), 1);
});

/** config/demo/make-certs.sh run once into a new folder (removed after the tests); undefined without openssl. */
let demoCerts: string | null | undefined;
let demoCertsRoot: string | undefined;
after(() => {
  if (demoCertsRoot) rmSync(demoCertsRoot, { recursive: true, force: true });
});
function makeCerts(): string | undefined {
  if (demoCerts === undefined) {
    demoCerts = null;
    if (spawnSync('openssl', ['version']).status === 0) {
      const dir = mkdtempSync(join(tmpdir(), 'lbp-demo-certs-'));
      demoCertsRoot = dir;
      const owner = `${process.getuid?.() ?? 0}:${process.getgid?.() ?? 0}`;
      const result = spawnSync('sh', [at('config/demo/make-certs.sh')], {
        env: { ...process.env, CERTS_DIR: join(dir, 'certs'), APP_OWNER: owner, PG_OWNER: owner },
        encoding: 'utf8',
      });
      assert.equal(result.status, 0, result.stderr);
      demoCerts = join(dir, 'certs');
    }
  }
  return demoCerts ?? undefined;
}

test('the demo certificate script: the harness file set, keys 0600, a chain valid for postgres and oauth, made once', (t) => {
  const certs = makeCerts();
  if (!certs) {
    t.skip('openssl is not installed');
    return;
  }
  for (const file of [...Object.values(CA_FILES), 'postgres.key']) {
    assert.ok(existsSync(join(certs, file)), `${file} missing`);
    assert.equal(statSync(join(certs, file)).mode & 0o777, file.endsWith('.key') ? 0o600 : 0o644, file);
  }
  const ca = new X509Certificate(readFileSync(join(certs, 'ca.crt')));
  const server = new X509Certificate(readFileSync(join(certs, 'server.crt')));
  assert.ok(ca.ca);
  assert.ok(server.verify(ca.publicKey), 'the server certificate is signed by the CA');
  for (const host of ['postgres', 'oauth', 'localhost']) assert.equal(server.checkHost(host), host);
  assert.equal(server.checkIP('127.0.0.1'), '127.0.0.1');
  assert.equal(readFileSync(join(certs, 'postgres.key'), 'utf8'), readFileSync(join(certs, 'server.key'), 'utf8'));
  const before = readFileSync(join(certs, 'ca.crt'), 'utf8');
  const again = spawnSync('sh', [at('config/demo/make-certs.sh')], { env: { ...process.env, CERTS_DIR: certs }, encoding: 'utf8' });
  assert.equal(again.status, 0, again.stderr);
  assert.match(again.stdout, /already/);
  assert.equal(readFileSync(join(certs, 'ca.crt'), 'utf8'), before, 'a restart keeps the CA');
});

test("the demo's init script is valid sh, and its client users file parses", () => {
  const init = at('config/demo/initdb/10-lakebase-demo.sh');
  assert.equal(spawnSync('sh', ['-n', init]).status, 0);
  assert.ok(statSync(init).mode & 0o100, 'executable, so the postgres image runs it rather than sourcing it');
  const users = parseUsers(readFileSync(at('config/demo/client-users')), new Settings());
  assert.deepEqual([...users.keys()], ['demo']);
});

test('docker-compose config accepts the file', (t) => {
  if (spawnSync('docker-compose', ['version'], { encoding: 'utf8' }).status !== 0) {
    t.skip('docker-compose is not installed');
    return;
  }
  // Compose v1 validates every service whatever the profile: one run covers them all.
  const result = spawnSync('docker-compose', ['-f', at('docker-compose.yml'), 'config', '-q'], { encoding: 'utf8', cwd: ROOT, timeout: 30_000 });
  assert.equal(result.status, 0, `docker-compose config: ${result.stderr}`);
});
