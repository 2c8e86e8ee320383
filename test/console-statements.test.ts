/** The console's language: what a Query message's text becomes, and the errors it gets. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { ConsoleError, parseStatements } from '../src/admin/statements.js';
import { planCall } from '../src/admin/procedures.js';

test('commands, in any case, with comments, several to a query', () => {
  assert.deepEqual(parseStatements('show Pools; -- a comment\n SHOW clients;;/* and */ pause ; RESUME "Mixed Case"; resume \'quoted\''), [
    { kind: 'show', item: 'pools' },
    { kind: 'show', item: 'clients' },
    { kind: 'pause', target: undefined },
    { kind: 'resume', target: 'Mixed Case' },
    { kind: 'resume', target: 'quoted' },
  ]);
  assert.deepEqual(parseStatements('  ;  '), []);
  assert.deepEqual(parseStatements('RELOAD; shutdown; KILL CLIENT 42; kill_client 7'), [{ kind: 'reload' }, { kind: 'shutdown' }, { kind: 'kill', client: 42 }, { kind: 'kill', client: 7 }]);
});

test('CALL arguments: named with => := or =, positional, quoted with doubled quotes, booleans and NULL', () => {
  assert.deepEqual(parseStatements("CALL GetOAuthAccessToken(verifier => 'it''s', print_tokens := true, Target = 'a', x => null, n => 5)"), [
    {
      kind: 'call',
      procedure: 'GetOAuthAccessToken',
      args: [
        { name: 'verifier', value: "it's" },
        { name: 'print_tokens', value: true },
        { name: 'target', value: 'a' },
        { name: 'x', value: null },
        { name: 'n', value: '5' },
      ],
    },
  ]);
  assert.deepEqual(parseStatements("call getoauthauthorizationurl('http://x')")[0], { kind: 'call', procedure: 'getoauthauthorizationurl', args: [{ name: undefined, value: 'http://x' }] });
  const plan = planCall('GETOAUTHACCESSTOKEN', [{ name: 'verifier', value: 'secret-code' }, { name: 'Print_Tokens', value: true }]);
  assert.equal(plan.procedure.name, 'GetOAuthAccessToken');
  assert.deepEqual(plan.logged, { verifier: '[redacted]', print_tokens: true });
  assert.throws(() => planCall('RefreshOAuthAccessToken', [{ name: undefined, value: 'x' }]), (e: ConsoleError) => e.sqlstate === '42883');
  assert.throws(() => planCall('GetOAuthAccessToken', [{ name: 'verifier', value: 'a' }, { name: 'verifier', value: 'b' }]), (e: ConsoleError) => e.sqlstate === '42601');
});

test('what is not a console command gets a SQLSTATE and a hint, never another error', () => {
  for (const [text, state] of [
    ['select 1', '42601'],
    ['SHOW', '42601'],
    ['SHOW POOLS extra', '42601'],
    ['KILL CLIENT', '42601'],
    ['KILL CLIENT 99999999999999999999', '42601'],
    ['CALL', '42601'],
    ['CALL x', '42601'],
    ['CALL x(a => )', '42601'],
    ['CALL x(a b)', '42601'],
    ['CALL x(a => b)', '42601'],
    ["SHOW 'unterminated", '42601'],
    ['SHOW "unterminated', '42601'],
    ['PAUSE 3', '42601'],
    ['$1', '42601'],
  ]) {
    assert.throws(() => parseStatements(text as string), (e: unknown) => e instanceof ConsoleError && e.sqlstate === state, text);
  }
  fc.assert(
    fc.property(fc.string({ maxLength: 80 }), (text) => {
      try {
        parseStatements(text);
      } catch (error) {
        if (!(error instanceof ConsoleError)) throw error;
      }
    }),
    { numRuns: 2000 },
  );
});
