/**
 * deploy/kubernetes/, without a cluster: every object validates against the Kubernetes schemas
 * (the kubernetes-models package, offline); the flags, variables, ports and probe paths are the
 * program's own; the gateway's shape (replicas, Service, PodDisruptionBudget, non-root, read-only
 * root, resources, secrets only from Secrets, TLS and SCRAM off loopback, a SIGTERM delay that
 * covers endpoint removal); and each proxy container run for real: the program with the
 * container's args and environment (on the image's), its Secret and ConfigMap files in place,
 * against the test Postgres and the Databricks stand-in; it starts, each probe answers as the
 * manifest expects, a client gets a session, and /quitquitquit or SIGTERM drains it.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import { parseAllDocuments, parse as parseYaml } from 'yaml';
import { ConfigMap } from 'kubernetes-models/v1/ConfigMap';
import { Service } from 'kubernetes-models/v1/Service';
import { Deployment } from 'kubernetes-models/apps/v1/Deployment';
import { PodDisruptionBudget } from 'kubernetes-models/policy/v1/PodDisruptionBudget';
import { testCA } from './harness/certs.js';
import { startStandinWithPostgres, type StandinWithPostgres } from './harness/oauth-fixture.js';
import { freePort } from './harness/postgres.js';
import { startProxyProcess } from './harness/proxy.js';
import { httpCall } from './harness/http.js';
import { BY_FLAG, envName, findProperty, PROPERTIES } from '../src/config/properties.js';

const DIR = fileURLToPath(new URL('../../deploy/kubernetes/', import.meta.url));
const DOCKERFILE = fileURLToPath(new URL('../../Dockerfile', import.meta.url));

// --- the manifests, as Kubernetes would read them ------------------------------------------

interface EnvVar {
  name: string;
  value?: string;
  valueFrom?: { secretKeyRef?: { name: string; key: string }; configMapKeyRef?: { name: string; key: string } };
}
interface Probe {
  httpGet?: { path: string; port: string | number };
  periodSeconds?: number;
  failureThreshold?: number;
}
interface Container {
  name: string;
  image: string;
  args?: string[];
  env?: EnvVar[];
  ports?: Array<{ name?: string; containerPort: number }>;
  startupProbe?: Probe;
  livenessProbe?: Probe;
  readinessProbe?: Probe;
  restartPolicy?: string;
  volumeMounts?: Array<{ name: string; mountPath: string }>;
  resources?: { requests?: Record<string, string>; limits?: Record<string, string> };
  securityContext?: Record<string, unknown>;
}
interface PodSpec {
  containers: Container[];
  initContainers?: Container[];
  volumes?: Array<{ name: string; configMap?: { name: string }; secret?: { secretName: string }; emptyDir?: object }>;
  securityContext?: Record<string, unknown>;
  terminationGracePeriodSeconds?: number;
}
interface K8sObject {
  apiVersion: string;
  kind: string;
  metadata: { name: string; labels?: Record<string, string> };
  data?: Record<string, string>;
  spec?: any;
}

const MODELS: Record<string, new (data: any) => { validate(): void }> = {
  'v1/ConfigMap': ConfigMap,
  'v1/Service': Service,
  'apps/v1/Deployment': Deployment,
  'policy/v1/PodDisruptionBudget': PodDisruptionBudget,
};

const files = readdirSync(DIR).filter((f) => f.endsWith('.yaml')).sort();
const manifests = new Map(
  files.map((file) => [
    file,
    parseAllDocuments(readFileSync(join(DIR, file), 'utf8')).map((doc) => {
      assert.deepEqual(doc.errors, [], `${file}: YAML errors`);
      return doc.toJS() as K8sObject;
    }),
  ]),
);
const objects = (file: string): K8sObject[] => manifests.get(file) ?? assert.fail(`no ${file}`);
const find = (file: string, kind: string): K8sObject => objects(file).find((o) => o.kind === kind) ?? assert.fail(`${file}: no ${kind}`);

function podSpec(deployment: K8sObject): PodSpec {
  return deployment.spec.template.spec as PodSpec;
}

/** The proxy's containers (the image built from this repository's Dockerfile) in a manifest. */
function proxyContainers(file: string): Array<{ deployment: K8sObject; container: Container; init: boolean }> {
  const found = [];
  for (const deployment of objects(file).filter((o) => o.kind === 'Deployment')) {
    const spec = podSpec(deployment);
    for (const [list, init] of [[spec.initContainers ?? [], true], [spec.containers, false]] as const) {
      for (const container of list) if (container.image.startsWith('lakebase-proxy:')) found.push({ deployment, container, init });
    }
  }
  return found;
}

/** `--flag value` pairs of a container's args (the program's flags all take `--flag value`, or are booleans). */
function flagValue(args: readonly string[], flag: string): string | undefined {
  const i = args.indexOf(flag);
  return i === -1 ? undefined : args[i + 1];
}

test('the manifests are sidecar.yaml and gateway.yaml, and every object validates against the Kubernetes schemas', () => {
  assert.deepEqual(files, ['gateway.yaml', 'sidecar.yaml']);
  for (const [file, docs] of manifests) {
    for (const object of docs) {
      const Model = MODELS[`${object.apiVersion}/${object.kind}`];
      assert.ok(Model, `${file}: ${object.apiVersion} ${object.kind} is a kind this test knows`);
      assert.doesNotThrow(() => new Model(object).validate(), `${file}: ${object.kind} ${object.metadata.name}`);
    }
  }
  // The schemas do catch a wrong manifest: a port given as a word, a probe without a handler's shape.
  const broken = structuredClone(find('gateway.yaml', 'Deployment'));
  broken.spec.template.spec.containers[0].ports[0].containerPort = 'five-four-three-two';
  assert.throws(() => new Deployment(broken).validate(), /containerPort/);
  const noSelector = structuredClone(find('gateway.yaml', 'Deployment'));
  delete noSelector.spec.selector;
  assert.throws(() => new Deployment(noSelector).validate(), /selector/);
});

test("the flags, variables, config keys, ports and probe paths in the manifests are the program's own", () => {
  const envNames = new Set([...PROPERTIES.map(envName), 'LAKEBASE_PROXY_CONNECTION', 'LAKEBASE_PROXY_CONFIG']);
  for (const file of files) {
    const containers = proxyContainers(file);
    assert.ok(containers.length > 0, `${file} runs the proxy`);
    for (const { container } of containers) {
      const args = container.args ?? [];
      for (const arg of args.filter((a) => a.startsWith('--'))) assert.ok(BY_FLAG.has(arg) || arg === '--config', `${file}: ${arg} is a flag of the program`);
      for (const { name } of container.env ?? []) assert.ok(envNames.has(name), `${file}: ${name} is a variable the program reads`);
      // Each declared port is the one the program listens on for it.
      const ports = new Map((container.ports ?? []).map((p) => [p.name, p.containerPort]));
      assert.equal(String(ports.get('http')), flagValue(args, '--http-port'), `${file}: the http port is --http-port`);
      if (ports.has('postgres')) assert.equal(String(ports.get('postgres')), flagValue(args, '--port'), `${file}: the postgres port is --port`);
      const expected = { startupProbe: '/startup', livenessProbe: '/liveness', readinessProbe: '/readiness' } as const;
      for (const [probe, path] of Object.entries(expected)) {
        const handler = container[probe as keyof typeof expected]?.httpGet;
        assert.ok(handler, `${file}: ${container.name} has a ${probe}`);
        assert.equal(handler.path, path, `${file}: ${probe} path`);
        assert.equal(handler.port, 'http', `${file}: ${probe} on the http port`);
      }
    }
    for (const configMap of objects(file).filter((o) => o.kind === 'ConfigMap')) {
      for (const [key, text] of Object.entries(configMap.data ?? {})) {
        for (const setting of Object.keys(parseYaml(text) as object)) assert.ok(findProperty(setting), `${file}: ${key}: ${setting} is a setting`);
      }
    }
  }
});

test('secrets come only from Secrets through the environment or mounted files: never in args, values or ConfigMaps', () => {
  const secretProperties = PROPERTIES.filter((p) => p.secret);
  for (const file of files) {
    for (const { container } of proxyContainers(file)) {
      const args = (container.args ?? []).join(' ');
      assert.ok(!args.includes('--connection'), `${file}: no connection string in args`);
      for (const p of secretProperties) {
        assert.ok(!args.toLowerCase().includes(p.name.toLowerCase()), `${file}: ${p.name} not in args`);
        const variable = (container.env ?? []).find((e) => e.name === envName(p));
        if (variable) assert.ok(variable.valueFrom?.secretKeyRef && variable.value === undefined, `${file}: ${variable.name} comes from a Secret`);
      }
      assert.ok((container.env ?? []).some((e) => e.valueFrom?.secretKeyRef), `${file}: the OAuth secret comes from a Secret`);
    }
    for (const configMap of objects(file).filter((o) => o.kind === 'ConfigMap')) {
      for (const text of Object.values(configMap.data ?? {})) {
        const keys = Object.keys(parseYaml(text) as object).map((k) => findProperty(k));
        assert.ok(!keys.some((p) => p?.secret), `${file}: no secret in ConfigMap ${configMap.metadata.name}`);
      }
    }
  }
});

test('sidecar.yaml: the proxy is a native sidecar (an init container that restarts always) on the Pod loopback', () => {
  const [found, ...more] = proxyContainers('sidecar.yaml');
  assert.ok(found && more.length === 0);
  assert.equal(found.init, true);
  assert.equal(found.container.restartPolicy, 'Always');
  assert.equal(flagValue(found.container.args ?? [], '--address'), '127.0.0.1');
  const app = podSpec(found.deployment).containers[0] as Container;
  const env = Object.fromEntries((app.env ?? []).map((e) => [e.name, e.value]));
  assert.equal(env['PGHOST'], '127.0.0.1');
  assert.equal(env['PGPORT'], flagValue(found.container.args ?? [], '--port'));
});

test('gateway.yaml: replicas behind a Service with a disruption budget, non-root, read-only, bounded, TLS and SCRAM, a drain that covers endpoint removal', () => {
  const deployment = find('gateway.yaml', 'Deployment');
  const [found] = proxyContainers('gateway.yaml');
  assert.ok(found);
  const { container } = found;
  const args = container.args ?? [];
  const spec = podSpec(deployment);
  const labels = deployment.spec.template.metadata.labels as Record<string, string>;
  const selects = (selector: Record<string, string>): boolean => Object.entries(selector).every(([k, v]) => labels[k] === v);

  assert.ok(deployment.spec.replicas >= 2);
  const service = find('gateway.yaml', 'Service');
  assert.ok(selects(service.spec.selector));
  const portNames = new Set((container.ports ?? []).map((p) => p.name));
  for (const port of service.spec.ports as Array<{ targetPort: string }>) assert.ok(portNames.has(port.targetPort), `Service targets ${port.targetPort}`);
  const budget = find('gateway.yaml', 'PodDisruptionBudget');
  assert.ok(selects(budget.spec.selector.matchLabels));
  assert.ok(budget.spec.minAvailable >= 1 && budget.spec.minAvailable < deployment.spec.replicas);

  const security = { ...spec.securityContext, ...container.securityContext };
  assert.equal(security['runAsNonRoot'], true);
  assert.ok(Number(security['runAsUser']) > 0);
  assert.equal(security['readOnlyRootFilesystem'], true);
  assert.equal(security['allowPrivilegeEscalation'], false);
  assert.ok(container.resources?.requests?.['cpu'] && container.resources.requests['memory'] && container.resources.limits?.['memory']);

  // Off loopback: TLS to clients and SCRAM against a users file, nothing insecure allowed.
  assert.equal(flagValue(args, '--address'), '0.0.0.0');
  for (const flag of ['--tls-cert', '--tls-key', '--client-users']) assert.ok(flagValue(args, flag), flag);
  assert.equal(flagValue(args, '--client-auth'), 'scram-sha-256');
  assert.ok(!args.includes('--allow-insecure-listen'));

  // New clients are accepted until the Pod is out of every endpoint list: at least one failed
  // readiness period, and a margin for kube-proxy; the whole drain fits the grace period.
  const minMs = Number(flagValue(args, '--min-sigterm-delay'));
  const maxMs = Number(flagValue(args, '--max-sigterm-delay'));
  const readiness = container.readinessProbe as Probe;
  assert.ok(minMs >= ((readiness.periodSeconds ?? 10) * (readiness.failureThreshold ?? 3) + 5) * 1000, `--min-sigterm-delay ${minMs}`);
  assert.ok((spec.terminationGracePeriodSeconds ?? 30) * 1000 >= minMs + maxMs + 5000, 'terminationGracePeriodSeconds');
});

// --- each proxy container, run --------------------------------------------------------------

let env: StandinWithPostgres;
let work: string;
before(async () => {
  env = await startStandinWithPostgres({ dirPrefix: 'lbp-k8s-' });
  work = mkdtempSync(join(tmpdir(), 'lbp-k8s-run-'));
});
after(async () => {
  await env?.close();
  if (work) rmSync(work, { recursive: true, force: true });
});

const CLIENT_USER = 'analyst';
const CLIENT_PASSWORD = 'k8s-client-password-' + Date.now();

/** The Secrets the manifests' comments tell to create, with test values. */
async function secrets(): Promise<Record<string, Record<string, string>>> {
  const ca = await testCA();
  return {
    'lakebase-proxy-oauth': { 'client-secret': env.standin.clientSecret },
    'lakebase-gateway-oauth': { 'client-secret': env.standin.clientSecret },
    'lakebase-gateway-tls': { 'tls.crt': ca.serverCertPem, 'tls.key': ca.serverKeyPem },
    'lakebase-gateway-users': { 'client-users': `${CLIENT_USER}:${CLIENT_PASSWORD}\n` },
  };
}

/** The runtime image's ENV (the Dockerfile's last stage): what a container starts with. */
function imageEnv(): Record<string, string> {
  const text = readFileSync(DOCKERFILE, 'utf8').replace(/\\\n/g, ' ');
  const stage = text.slice(text.search(/^FROM \S+ AS runtime$/m));
  const line = /^ENV (.+)$/m.exec(stage);
  assert.ok(line, 'the runtime stage sets ENV');
  return Object.fromEntries([...(line[1] as string).matchAll(/(\w+)=(\S+)/g)].map((m) => [m[1] as string, m[2] as string]));
}

for (const file of files) {
  test(`${file}: the proxy container starts with its args and environment, answers its probes, serves a client, and drains`, async () => {
    const { deployment, container } = proxyContainers(file)[0] as ReturnType<typeof proxyContainers>[number];
    const spec = podSpec(deployment);
    const secretData = await secrets();
    const root = mkdtempSync(join(work, file.replace('.yaml', '-')));

    // Volumes where the container mounts them: ConfigMaps from the manifest, Secrets with test values.
    const mounts = new Map<string, string>();
    for (const mount of container.volumeMounts ?? []) {
      const volume = (spec.volumes ?? []).find((v) => v.name === mount.name);
      assert.ok(volume, `${file}: volume ${mount.name}`);
      const dir = join(root, mount.name);
      mkdirSync(dir);
      const data = volume.configMap
        ? find(file, 'ConfigMap').metadata.name === volume.configMap.name
          ? (find(file, 'ConfigMap').data ?? {})
          : assert.fail(`${file}: ConfigMap ${volume.configMap.name} is not in the file`)
        : volume.secret
          ? (secretData[volume.secret.secretName] ?? assert.fail(`${file}: the test has no Secret ${volume.secret.secretName}`))
          : {};
      for (const [key, value] of Object.entries(data)) writeFileSync(join(dir, key), value, { mode: 0o440 });
      mounts.set(mount.mountPath, dir);
    }
    const local = (value: string): string => {
      for (const [mountPath, dir] of mounts) if (value.startsWith(mountPath + '/')) return dir + value.slice(mountPath.length);
      return value;
    };

    // The manifest's ports become free ones (tests run side by side); everything else as written.
    const ports = new Map<string, number>();
    const args = [...(container.args ?? [])];
    for (const flag of ['--port', '--http-port']) {
      const i = args.indexOf(flag);
      assert.ok(i >= 0, `${file}: ${flag}`);
      const port = await freePort();
      ports.set(args[i + 1] as string, port);
      args[i + 1] = String(port);
    }
    const containerEnv: Record<string, string> = {};
    for (const variable of container.env ?? []) {
      const ref = variable.valueFrom?.secretKeyRef;
      containerEnv[variable.name] = ref ? (secretData[ref.name]?.[ref.key] ?? assert.fail(`${file}: the test has no Secret ${ref.name} key ${ref.key}`)) : local(variable.value ?? '');
    }
    // Only the upstream and the identity are the test's: its Postgres and its Databricks stand-in.
    const upstream = {
      LAKEBASE_PROXY_SERVER: 'localhost',
      LAKEBASE_PROXY_SERVER_PORT: String(env.db.port),
      LAKEBASE_PROXY_SSL_ROOT_CERT: env.db.ca.caFile,
      LAKEBASE_PROXY_DATABRICKS_INSTANCE: env.standin.url,
      LAKEBASE_PROXY_OAUTH_CLIENT_ID: env.standin.clientId,
      LAKEBASE_PROXY_USER: env.db.tokenRole,
    };
    // HOME under a regular file: nothing can be written there, as with a read-only root.
    writeFileSync(join(root, 'not-a-folder'), '');
    const proxy = await startProxyProcess(
      args.map(local),
      { ...imageEnv(), ...containerEnv, ...upstream, HOME: join(root, 'not-a-folder', 'home') },
      30_000,
    );
    const httpPort = ports.get(flagValue(container.args ?? [], '--http-port') as string) as number;
    const probePort = (name: string | number): number => {
      const declared = typeof name === 'number' ? name : (container.ports ?? []).find((p) => p.name === name)?.containerPort;
      return ports.get(String(declared)) ?? assert.fail(`${file}: probe port ${name}`);
    };
    let stopped = false;
    try {
      for (const probe of [container.startupProbe, container.livenessProbe, container.readinessProbe]) {
        const handler = probe?.httpGet as NonNullable<Probe['httpGet']>;
        const answer = await httpCall(probePort(handler.port), handler.path);
        assert.ok(answer.status >= 200 && answer.status < 400, `${file}: ${handler.path} answered ${answer.status} ${answer.body}`);
      }

      const tls = flagValue(container.args ?? [], '--tls-cert') !== undefined;
      const scram = flagValue(container.args ?? [], '--client-users') !== undefined;
      const connect = async (): Promise<pg.Client> => {
        const client = new pg.Client({
          host: 'localhost',
          port: proxy.port,
          database: env.db.database,
          user: scram ? CLIENT_USER : 'app',
          ...(scram ? { password: CLIENT_PASSWORD } : {}),
          ...(tls ? { ssl: { ca: env.db.ca.caPem, rejectUnauthorized: true } } : {}),
        });
        client.on('error', () => {});
        await client.connect();
        return client;
      };
      const client = await connect();
      const { rows } = await client.query('select current_user as who');
      assert.equal(rows[0].who, env.db.tokenRole);
      if (tls) assert.equal((await client.query('select 1 as one')).rows[0].one, 1);
      await client.end();
      if (scram) {
        const wrong = new pg.Client({ host: 'localhost', port: proxy.port, database: env.db.database, user: CLIENT_USER, password: 'wrong', ...(tls ? { ssl: { ca: env.db.ca.caPem } } : {}) });
        wrong.on('error', () => {});
        await assert.rejects(wrong.connect(), (e: pg.DatabaseError) => e.code === '28P01');
      }

      // Drain as Kubernetes does: POST /quitquitquit from the Pod (loopback) is SIGTERM.
      assert.equal((await httpCall(httpPort, '/quitquitquit', 'POST')).status, 200);
      const minMs = Number(flagValue(container.args ?? [], '--min-sigterm-delay') ?? 0);
      if (minMs > 0) {
        // Out of the Service at once, still accepting for the delay, live all along.
        assert.equal((await httpCall(httpPort, '/readiness')).status, 503);
        assert.equal((await httpCall(httpPort, '/liveness')).status, 200);
        const late = await connect();
        assert.equal((await late.query('select 2 as two')).rows[0].two, 2);
        await late.end();
        proxy.child.kill('SIGTERM'); // a second signal: no need to wait out the delay here
        await proxy.exited;
      } else {
        assert.equal(await proxy.exited, 0);
      }
      stopped = true;
    } finally {
      if (!stopped) await proxy.stop('SIGKILL');
    }
  });
}
