/** The benchmark runs end to end in its quick mode (figures are not judged here: see bench/README.md). */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { runBenchmark, smokeProblems } from '../bench/benchmark.js';

// PgBouncer too where it is installed, on a machine that the suite's other files keep busy.
test('the benchmark runs end to end in its quick mode', { timeout: 300_000 }, async () => {
  assert.deepEqual(smokeProblems(await runBenchmark({ quick: true })), []);
});
