/**
 * The Node.js lines: the suite runs on the line .ci/node-lines.sh asked for (with the native
 * relay loaded there), and package.json, the README and the Dockerfile name the lines CI runs.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { native } from '../src/proxy/native-relay.js';

const read = (path: string): string => readFileSync(new URL(`../../${path}`, import.meta.url), 'utf8');
const major = (version: string): number => Number(version.replace(/^v/, '').split('.')[0]);

/** The lines .ci/node-lines.sh runs by default. */
function testedLines(): number[] {
  const found = /NODE_LINES:-([0-9 ]+)\}/.exec(read('.ci/node-lines.sh'));
  assert.ok(found, '.ci/node-lines.sh names its default lines as ${NODE_LINES:-...}');
  return (found[1] as string).trim().split(/\s+/).map(Number);
}

test('the suite runs on the Node.js line it was started for, and the native relay loads there', (t) => {
  const expected = process.env['LAKEBASE_PROXY_EXPECT_NODE'];
  if (!expected) {
    t.skip('run by .ci/node-lines.sh, which names the line');
    return;
  }
  assert.equal(major(process.version), Number(expected), `expected Node.js ${expected}, running ${process.version}`);
  if (process.env['LAKEBASE_PROXY_EXPECT_NATIVE'] === '1') assert.ok(native.addon, `the native relay did not load on ${process.version}: ${native.problem}`);
});

test('package.json, the README and the Dockerfile agree with the lines CI runs', () => {
  const lines = testedLines();
  assert.ok(lines.length >= 2, `${lines}`);
  const engines = (JSON.parse(read('package.json')) as { engines: { node: string } }).engines.node;
  const floor = /^>=(\d+)$/.exec(engines);
  assert.ok(floor, `engines.node is ">=N": ${engines}`);
  // The oldest line allowed is one CI runs, and every line CI runs is allowed.
  assert.equal(Number(floor[1]), Math.min(...lines));
  const readme = read('README.md');
  const said = /tested on Node\.js\s+([0-9, and]+)/.exec(readme);
  assert.ok(said, 'the README says "tested on Node.js ..."');
  assert.deepEqual((said[1] as string).match(/\d+/g)?.map(Number), lines);
  const image = /^ARG NODE_IMAGE=node:(\d+)-/m.exec(read('Dockerfile'));
  assert.ok(image, 'the Dockerfile names its base image as ARG NODE_IMAGE=node:N-...');
  assert.ok(lines.includes(Number(image[1])), `the Dockerfile's node:${image[1]} is a line CI runs (${lines.join(', ')})`);
});
