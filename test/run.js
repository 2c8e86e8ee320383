#!/usr/bin/env node
// Runs the compiled tests: `npx tsc -p tsconfig.json && node test/run.js [filter ...]`.
// - generates one test CA for the whole run (TEST_CA_DIR; NODE_EXTRA_CA_CERTS so every test
//   process trusts it, e.g. for HTTPS stand-ins) and removes it afterwards;
// - gives the test processes a shared folder for the PostgreSQL template cluster
//   (TEST_PG_TEMPLATE_DIR) so initdb runs once per run, and removes it afterwards;
// - runs every dist/test/**/*.test.js whose path (relative to dist/test) contains one of the
//   filters (all files without filters) with `node --test`, two files at a time;
// - exits with the test runner's exit code.
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, relative, sep } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const projectRoot = dirname(dirname(fileURLToPath(import.meta.url)));
const distTest = join(projectRoot, 'dist', 'test');
const certsModule = join(distTest, 'harness', 'certs.js');

if (!existsSync(certsModule)) {
  console.error(`${relative(process.cwd(), certsModule)} is missing: compile first (npx tsc -p tsconfig.json)`);
  process.exit(2);
}

/** @param {string} dir @returns {string[]} */
function findTests(dir) {
  /** @type {string[]} */
  const found = [];
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) {
      if (entry.name !== 'node_modules') found.push(...findTests(path));
    } else if (entry.isFile() && entry.name.endsWith('.test.js')) {
      found.push(path);
    }
  }
  return found;
}

const filters = process.argv.slice(2).filter((a) => a.length > 0);
const files = findTests(distTest)
  .filter((f) => filters.length === 0 || filters.some((x) => relative(distTest, f).split(sep).join('/').includes(x)))
  .sort();

if (files.length === 0) {
  console.error(`no test files under ${relative(process.cwd(), distTest) || '.'}${filters.length ? ` match ${filters.join(', ')}` : ''}`);
  process.exit(1);
}

const { writeTestCA } = await import(pathToFileURL(certsModule).href);
const caDir = mkdtempSync(join(tmpdir(), 'lbp-test-ca-'));
// Shared by the test processes of this run: the PostgreSQL template cluster (test/harness/postgres.ts).
const pgTemplateDir = mkdtempSync(join(tmpdir(), 'lbp-pg-templates-'));
let cleaned = false;
const cleanup = () => {
  if (cleaned) return;
  cleaned = true;
  for (const dir of [caDir, pgTemplateDir]) rmSync(dir, { recursive: true, force: true });
};
process.on('exit', cleanup);

let ca;
try {
  ca = await writeTestCA(caDir);
} catch (err) {
  console.error('could not generate the test CA:', err);
  process.exit(2);
}

// --test-concurrency / --test-timeout exist from Node 20.11 (and 21.2). A test gets 5 minutes: on a
// machine shared with other work, the benchmark smoke run (PgBouncer included) needs more than 2.
const [major = 0, minor = 0] = process.versions.node.split('.').map(Number);
const modern = major > 20 || (major === 20 && minor >= 11);
const args = [
  '--test',
  '--test-reporter=spec',
  ...(modern ? ['--test-concurrency=2', '--test-timeout=300000'] : []),
  ...files,
];

const child = spawn(process.execPath, args, {
  cwd: projectRoot,
  stdio: 'inherit',
  env: { ...process.env, TEST_CA_DIR: ca.dir, NODE_EXTRA_CA_CERTS: ca.caFile, TEST_PG_TEMPLATE_DIR: pgTemplateDir },
});

for (const signal of /** @type {const} */ (['SIGINT', 'SIGTERM', 'SIGHUP'])) {
  process.on(signal, () => {
    child.kill(signal);
  });
}

child.on('error', (err) => {
  console.error('could not run node --test:', err);
  cleanup();
  process.exit(2);
});

child.on('exit', (code, signal) => {
  cleanup();
  process.exit(code ?? (signal ? 128 + (signalNumber(signal) ?? 1) : 1));
});

/** @param {string} signal */
function signalNumber(signal) {
  return /** @type {Record<string, number>} */ ({ SIGHUP: 1, SIGINT: 2, SIGQUIT: 3, SIGKILL: 9, SIGTERM: 15 })[signal];
}
