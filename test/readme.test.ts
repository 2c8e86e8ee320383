/** The README and --help stay true to the property table. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { envName, PROPERTIES } from '../src/config/properties.js';
import { BIN } from './harness/proxy.js';

const readme = readFileSync(new URL('../../README.md', import.meta.url), 'utf8');

test('the README documents every property, its flag, its variable and its default', () => {
  for (const p of PROPERTIES) {
    const row = readme.split('\n').find((line) => line.startsWith(`| \`${p.name}\` |`));
    assert.ok(row, `README has no row for ${p.name}`);
    if (p.flag) assert.ok(row.includes(`\`${p.flag}\``), `${p.name}: flag ${p.flag}`);
    assert.ok(row.includes(envName(p)), `${p.name}: ${envName(p)}`);
    if (p.default !== undefined) assert.ok(row.includes(` ${p.default} `), `${p.name}: default ${p.default}`);
  }
});

test('the README shows the two set-up commands, and CI runs exactly those', () => {
  assert.match(readme, /```sh\nnpm ci\nnpm test\n```/);
  const ci = readFileSync(new URL('../../.ci/run', import.meta.url), 'utf8');
  assert.match(ci, /^npm ci$/m);
  assert.match(ci, /^npm test$/m);
});

test('--help lists every property and flag and shows no secret given to it', () => {
  const secret = 'help-secret-' + Date.now();
  const result = spawnSync(process.execPath, [BIN, '--help', '--connection', `OAuthClientSecret=${secret}`], { encoding: 'utf8', env: { ...process.env, LAKEBASE_PROXY_OAUTH_CLIENT_SECRET: secret } });
  assert.equal(result.status, 0);
  for (const p of PROPERTIES) {
    assert.ok(result.stdout.includes(p.name), p.name);
    if (p.flag) assert.ok(result.stdout.includes(p.flag), p.flag);
  }
  assert.ok(!result.stdout.includes(secret) && !result.stderr.includes(secret));
  assert.match(result.stdout, /Durations \(timeouts, delays\) take a unit: 500ms, 30s, 5m, 1h or 1m30s \(a bare number is milliseconds\)/);
});

test('the README says how durations are written', () => {
  assert.match(readme, /Durations \(every timeout and delay\) take a unit: `500ms`, `30s`, `5m`, `1h`, or parts together\nsuch as `1m30s`; a bare number is milliseconds/);
});
