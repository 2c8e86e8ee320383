/** The benchmark runs end to end in its quick mode (figures are not judged here: see bench/README.md). */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { runBenchmark, smokeProblems } from '../bench/benchmark.js';

test('the benchmark runs end to end in its quick mode', async () => {
  assert.deepEqual(smokeProblems(await runBenchmark({ quick: true })), []);
});
