/** relay.test.ts again with `--relay js`: the JavaScript relay, which the proxy falls back to, keeps the same behaviour. */
process.env['LAKEBASE_PROXY_TEST_RELAY'] = 'js';
await import('./relay.test.js');
