import { test } from 'node:test';
import assert from 'node:assert/strict';
import { serialize } from 'pg-protocol';
import { FrameReader, FramingError, type Frame } from '../src/wire/frame-reader.js';
import { decodeStartupPacket, StartupPacketError } from '../src/wire/startup-packets.js';
import { errorResponse, parseFields, BackendCode } from '../src/wire/backend-messages.js';
import { parseConnectionString } from '../src/config/connection-string.js';

function drain(reader: FrameReader): Array<{ type: number; body: string }> {
  const out: Array<{ type: number; body: string }> = [];
  let frame: Frame | undefined;
  while ((frame = reader.next())) out.push({ type: frame.type, body: frame.body.toString('hex') });
  return out;
}

/** Feeds `bytes` split at every pair of points and checks the frames are always the same. */
function everySplit(bytes: Buffer, typed: boolean, expected: Array<{ type: number; body: string }>): void {
  for (let a = 0; a <= bytes.length; a++) {
    for (let b = a; b <= bytes.length; b += Math.max(1, Math.floor(bytes.length / 17))) {
      const reader = new FrameReader(10000, typed);
      const got: Array<{ type: number; body: string }> = [];
      for (const part of [bytes.subarray(0, a), bytes.subarray(a, b), bytes.subarray(b)]) {
        reader.push(Buffer.from(part)); // a copy, as a socket gives a fresh chunk
        got.push(...drain(reader));
      }
      assert.deepEqual(got, expected, `split at ${a},${b}`);
      assert.equal(reader.buffered, 0);
    }
  }
}

test('typed frames come out the same at every split point of a multi-message buffer', () => {
  const messages = [
    serialize.query('select 1'),
    serialize.parse({ text: 'select $1::int', types: [] }),
    serialize.bind({ values: ['42'] }),
    serialize.describe({ type: 'P' }),
    serialize.execute(),
    serialize.sync(),
    serialize.password('x'.repeat(900)),
    serialize.end(),
  ];
  const expected = messages.map((m) => ({ type: m[0] as number, body: m.subarray(5).toString('hex') }));
  everySplit(Buffer.concat(messages), true, expected);
});

test('untyped startup packets come out the same at every split point', () => {
  const ssl = serialize.requestSsl();
  const startup = serialize.startup({ user: 'u', database: 'd', application_name: 'split' });
  everySplit(Buffer.concat([ssl, startup]), false, [
    { type: -1, body: ssl.subarray(4).toString('hex') },
    { type: -1, body: startup.subarray(4).toString('hex') },
  ]);
});

test('frames stay valid after later pushes (views are never overwritten)', () => {
  const reader = new FrameReader(10000, true);
  const q = serialize.query('select 1');
  reader.push(Buffer.concat([q, q.subarray(0, 3)]));
  const first = reader.next() as Frame;
  const copy = Buffer.from(first.body);
  reader.push(q.subarray(3));
  reader.push(Buffer.concat([q, Buffer.from([0x51, 0, 0, 0x10])])); // forces the buffer to grow
  assert.ok(reader.next());
  assert.ok(reader.next());
  assert.deepEqual(first.body, copy);
});

test('takeRemaining hands over exactly the unframed bytes', () => {
  const reader = new FrameReader(10000, true);
  const q = serialize.query('select 1');
  reader.push(Buffer.concat([q, q.subarray(0, 4)]));
  assert.ok(reader.next());
  assert.equal(reader.next(), undefined);
  assert.deepEqual(reader.takeRemaining(), q.subarray(0, 4));
  assert.equal(reader.buffered, 0);
});

test('lengths negative, zero, too small, off by one and huge are refused before allocating', () => {
  for (const length of [-1, 0, 3, 7, 10001, 0x7fffffff, -0x80000000]) {
    const reader = new FrameReader(10000, false);
    const b = Buffer.alloc(8);
    b.writeInt32BE(length, 0);
    reader.push(b);
    assert.throws(() => reader.next(), FramingError, `length ${length}`);
  }
  const typed = new FrameReader(100, true);
  typed.push(Buffer.from([0x51, 0, 0, 0, 3]));
  assert.throws(() => typed.next(), FramingError);
  const exact = new FrameReader(100, true);
  const ok = Buffer.alloc(101);
  ok[0] = 0x51;
  ok.writeInt32BE(100, 1);
  exact.push(ok);
  assert.equal(exact.next()?.body.length, 96);
});

test('startup packets are told apart by their magic numbers', () => {
  assert.deepEqual(decodeStartupPacket(serialize.requestSsl().subarray(4)), { kind: 'ssl' });
  const gss = Buffer.alloc(4);
  gss.writeInt32BE(80877104);
  assert.deepEqual(decodeStartupPacket(gss), { kind: 'gssenc' });
  const cancel = serialize.cancel(1234, 5678).subarray(4);
  const decoded = decodeStartupPacket(cancel);
  assert.equal(decoded.kind, 'cancel');
  assert.equal(decoded.kind === 'cancel' && decoded.processId, 1234);
  const startup = decodeStartupPacket(serialize.startup({ user: 'alice', database: 'db', options: '-c x=1' }).subarray(4));
  assert.equal(startup.kind, 'startup');
  if (startup.kind === 'startup') {
    assert.equal(startup.parameters.get('user'), 'alice');
    assert.equal(startup.parameters.get('options'), '-c x=1');
  }
});

test('malformed startup packets get the SQLSTATE Postgres uses', () => {
  const cases: Array<[string, Buffer, string]> = [
    ['protocol 2.0', Buffer.from([0, 2, 0, 0, 0x75, 0, 0x61, 0, 0]), '0A000'],
    ['protocol 4.0', Buffer.from([0, 4, 0, 0, 0]), '0A000'],
    ['no terminator', Buffer.from([0, 3, 0, 0, 0x75, 0x73, 0x65, 0x72, 0, 0x61]), '08P01'],
    ['no user', Buffer.from([0, 3, 0, 0, 0x64, 0, 0x62, 0, 0]), '28000'],
    ['empty user', Buffer.from([0, 3, 0, 0, 0x75, 0x73, 0x65, 0x72, 0, 0, 0]), '28000'],
    ['bytes after terminator', Buffer.from([0, 3, 0, 0, 0x75, 0x73, 0x65, 0x72, 0, 0x61, 0, 0, 0x41]), '08P01'],
    ['SSLRequest with payload', Buffer.concat([serialize.requestSsl().subarray(4), Buffer.from([1])]), '08P01'],
    ['short cancel', serialize.cancel(1, 2).subarray(4, 10), '08P01'],
  ];
  for (const [name, body, sqlstate] of cases) {
    assert.throws(() => decodeStartupPacket(body), (e: unknown) => e instanceof StartupPacketError && e.sqlstate === sqlstate, name);
  }
});

test('ErrorResponse fields round-trip', () => {
  const message = errorResponse({ code: '28P01', message: 'no', detail: 'why', hint: 'fix' });
  assert.equal(message[0], BackendCode.ErrorResponse);
  assert.deepEqual(parseFields(message.subarray(5)), [
    ['S', 'FATAL'],
    ['V', 'FATAL'],
    ['C', '28P01'],
    ['M', 'no'],
    ['D', 'why'],
    ['H', 'fix'],
  ]);
});

test('connection strings: case, quotes, escapes, spaces and errors', () => {
  assert.deepEqual(parseConnectionString(' Server = h ;port=5432; User="a;b" ; X=\'it\'\'s\';;Empty='), [
    ['Server', 'h'],
    ['port', '5432'],
    ['User', 'a;b'],
    ['X', "it's"],
    ['Empty', ''],
  ]);
  assert.throws(() => parseConnectionString("Server"), /"Server…" is not of the form Key=Value/);
  assert.throws(() => parseConnectionString("User=u;OAuthAccessToken:secret-value"), (e: Error) => /"OAuthAccessToken…"/.test(e.message) && !e.message.includes("secret-value"));
  assert.throws(() => parseConnectionString('User="abc'), /User has no closing "/);
  assert.throws(() => parseConnectionString('=x'), /empty name/);
  assert.throws(() => parseConnectionString('User="a"b'), /after the quoted value of User/);
});
