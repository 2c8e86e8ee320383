/**
 * scripts/build-native.js, the `npm install` step: one line saying whether the native relay was
 * built (and why not), node-gyp's log only on failure or with LAKEBASE_PROXY_BUILD_VERBOSE=1.
 * Each case builds a copy of binding.gyp, native/ and scripts/ in a temporary folder, so the
 * project's own build/ is never touched.
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { appendFileSync, cpSync, existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('../../', import.meta.url));
const prefix = join(dirname(process.execPath), '..');
// What the script needs outside npm: npm's node-gyp and the headers beside this node (a node from
// the npm registry's `node` package has neither, and node-gyp would try to download headers).
const skip =
  existsSync(join(prefix, 'lib', 'node_modules', 'npm', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js')) &&
  existsSync(join(prefix, 'include', 'node', 'node_api.h'))
    ? false
    : 'no node-gyp and Node.js headers beside this node';

const folders: string[] = [];
after(() => folders.forEach((f) => rmSync(f, { recursive: true, force: true })));

function copy(): string {
  const dir = mkdtempSync(join(tmpdir(), 'lbp-build-'));
  folders.push(dir);
  for (const part of ['binding.gyp', 'native', 'scripts']) cpSync(join(root, part), join(dir, part), { recursive: true });
  return dir;
}

function build(dir: string, env: NodeJS.ProcessEnv = {}): { status: number | null; stdout: string; stderr: string } {
  const base = { ...process.env };
  for (const key of ['npm_lifecycle_event', 'npm_config_nodedir', 'LAKEBASE_PROXY_BUILD_VERBOSE']) delete base[key];
  return spawnSync(process.execPath, ['scripts/build-native.js'], { cwd: dir, env: { ...base, ...env }, encoding: 'utf8', timeout: 120_000 });
}

test('a build that works prints one line and none of node-gyp\'s', { skip }, () => {
  const dir = copy();
  const ran = build(dir);
  assert.equal(ran.status, 0, ran.stderr);
  assert.equal(ran.stdout, 'lakebase-proxy: native relay built (build/Release/lakebase_relay.node)\n');
  assert.equal(ran.stderr, '');
  assert.ok(existsSync(join(dir, 'build', 'Release', 'lakebase_relay.node')));
});

test('a build that fails shows node-gyp\'s log, then one line with the reason; the install goes on', { skip }, () => {
  const dir = copy();
  appendFileSync(join(dir, 'native', 'relay.c'), '\nint broken_on_purpose = ;\n');
  const ran = build(dir);
  assert.equal(ran.status, 0, 'npm install must not fail for it');
  assert.equal(ran.stdout, '');
  assert.match(ran.stderr, /gyp info/, 'the full log');
  const last = ran.stderr.trimEnd().split('\n').at(-1) ?? '';
  assert.match(last, /^lakebase-proxy: native relay not built \(node-gyp exited with 1: \.\.\/native\/relay\.c:\d+:\d+: error: .*\); the proxy works without it, relaying in JavaScript\./);
});

test('LAKEBASE_PROXY_BUILD_VERBOSE=1 shows node-gyp\'s log of a build that works', { skip }, () => {
  const ran = build(copy(), { LAKEBASE_PROXY_BUILD_VERBOSE: '1' });
  assert.equal(ran.status, 0, ran.stderr);
  assert.match(`${ran.stdout}${ran.stderr}`, /gyp info ok/);
  assert.match(ran.stdout, /lakebase-proxy: native relay built \(build\/Release\/lakebase_relay\.node\)\n$/);
});
