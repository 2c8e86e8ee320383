/**
 * Properties of the client-side codec (fast-check), then a short fuzz through the real listener.
 *
 * FrameReader and decodeStartupPacket either return what they decoded or throw their own typed
 * errors (FramingError, StartupPacketError with a SQLSTATE): never another error, never a frame
 * beyond maxLength, never an allocation sized by an unchecked length field (every Buffer the
 * reader allocates is bounded by the bytes pushed into it). Valid streams decode the same at every
 * split point; any strict prefix of a frame waits for more. (Fixed examples are in codec.test.ts;
 * random single startups through a socket in startup.test.ts.)
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { connect as netConnect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import fc from 'fast-check';
import { serialize } from 'pg-protocol';
import { FrameReader, FramingError, type Frame } from '../src/wire/frame-reader.js';
import { MessageBoundaries } from '../src/wire/message-boundaries.js';
import { SocketFrames } from '../src/wire/socket-frames.js';
import { parseFields } from '../src/wire/backend-messages.js';
import {
  CANCEL_REQUEST_CODE,
  decodeStartupPacket,
  GSSENC_REQUEST_CODE,
  SSL_REQUEST_CODE,
  StartupPacketError,
  type StartupPacket,
} from '../src/wire/startup-packets.js';
import { startTokenPostgres, type TestPostgres } from './harness/postgres.js';
import { connectionFor, startProxy, type InProcessProxy } from './harness/proxy.js';
import { fuzzListener } from './fuzz.js';
import { sleep, waitUntil, whoAmI } from './reliability-support.js';

const RUNS = { numRuns: 300, seed: 0x1ab3ba5e };

// ---------------------------------------------------------------------------------------------
// Helpers

function int32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeInt32BE(n | 0);
  return b;
}

/** Cuts `bytes` at the given points (any order, any values) into chunks, copied as a socket would hand them. */
function cut(bytes: Buffer, points: readonly number[]): Buffer[] {
  const at = [...new Set(points.map((p) => p % (bytes.length + 1)))].sort((a, b) => a - b);
  const chunks: Buffer[] = [];
  let from = 0;
  for (const p of [...at, bytes.length]) {
    chunks.push(Buffer.from(bytes.subarray(from, p)));
    from = p;
  }
  return chunks;
}

/** Every Buffer allocation while `fn` runs: the sizes asked for. */
function allocations<T>(fn: () => T): { result: T; sizes: number[] } {
  const sizes: number[] = [];
  const alloc = Buffer.alloc;
  const allocUnsafe = Buffer.allocUnsafe;
  const allocUnsafeSlow = Buffer.allocUnsafeSlow;
  Buffer.alloc = ((size: number, ...rest: unknown[]) => (sizes.push(size), (alloc as (...a: unknown[]) => Buffer)(size, ...rest))) as typeof Buffer.alloc;
  Buffer.allocUnsafe = ((size: number) => (sizes.push(size), allocUnsafe(size))) as typeof Buffer.allocUnsafe;
  Buffer.allocUnsafeSlow = ((size: number) => (sizes.push(size), allocUnsafeSlow(size))) as typeof Buffer.allocUnsafeSlow;
  try {
    return { result: fn(), sizes };
  } finally {
    Buffer.alloc = alloc;
    Buffer.allocUnsafe = allocUnsafe;
    Buffer.allocUnsafeSlow = allocUnsafeSlow;
  }
}

/**
 * Pushes `chunks`, taking frames after each; checks the invariants on the way. Returns the frames
 * and the error that ended the stream (only a FramingError may).
 */
function feed(reader: FrameReader, chunks: readonly Buffer[]): { frames: Frame[]; error?: FramingError } {
  const frames: Frame[] = [];
  let pushed = 0;
  let taken = 0;
  const header = reader.typed ? 5 : 4;
  for (const chunk of chunks) {
    const before = reader.buffered;
    const { sizes } = allocations(() => reader.push(chunk));
    pushed += chunk.length;
    // Growth only ever holds what was pushed: twice the unframed bytes, or 4 KB.
    for (const size of sizes) assert.ok(size <= Math.max(2 * (before + chunk.length), 4096), `an allocation of ${size} bytes after ${before + chunk.length} unframed`);
    for (;;) {
      let frame: Frame | undefined;
      try {
        frame = reader.next();
      } catch (error) {
        assert.ok(error instanceof FramingError, `only FramingError, got ${String(error)}`);
        assert.match(error.message, /^invalid (message|startup packet) length -?\d+$/);
        return { frames, error };
      }
      if (!frame) break;
      assert.ok(frame.body.length + 4 <= reader.maxLength, 'no frame beyond maxLength');
      taken += frame.body.length + header;
      frames.push({ type: frame.type, body: Buffer.from(frame.body) });
    }
    assert.equal(reader.buffered, pushed - taken, 'buffered = pushed - framed');
    assert.ok(reader.buffered < Math.max(header, reader.maxLength + (reader.typed ? 1 : 0)), 'never more than one incomplete frame is held');
  }
  return { frames };
}

const typedMessage = fc.record({
  type: fc.integer({ min: 0x20, max: 0x7e }),
  body: fc.uint8Array({ maxLength: 300 }).map((a) => Buffer.from(a)),
});

function encodeTyped(m: { type: number; body: Buffer }): Buffer {
  return Buffer.concat([Buffer.from([m.type]), int32(4 + m.body.length), m.body]);
}

/** A valid startup-phase packet and what decoding it must give. */
const startupPhasePacket: fc.Arbitrary<{ bytes: Buffer; expected: StartupPacket }> = fc.oneof(
  fc.constant({ bytes: Buffer.concat([int32(8), int32(SSL_REQUEST_CODE)]), expected: { kind: 'ssl' } as StartupPacket }),
  fc.constant({ bytes: Buffer.concat([int32(8), int32(GSSENC_REQUEST_CODE)]), expected: { kind: 'gssenc' } as StartupPacket }),
  fc.tuple(fc.integer(), fc.uint8Array({ minLength: 4, maxLength: 256 })).map(([pid, key]) => ({
    bytes: Buffer.concat([int32(12 + key.length), int32(CANCEL_REQUEST_CODE), int32(pid), Buffer.from(key)]),
    expected: { kind: 'cancel', processId: pid | 0, secretKey: Buffer.from(key) } as StartupPacket,
  })),
  fc
    .tuple(
      fc.integer({ min: 0, max: 0xffff }),
      fc.string({ minLength: 1, maxLength: 20, unit: 'grapheme' }).filter((s) => !s.includes('\0')),
      fc.dictionary(fc.string({ minLength: 1, maxLength: 12 }).filter((s) => !s.includes('\0') && s !== 'user'), fc.string({ maxLength: 30 }).filter((s) => !s.includes('\0')), { maxKeys: 4 }),
    )
    .map(([minor, user, extra]) => {
      const parameters = new Map<string, string>([['user', user], ...Object.entries(extra)]);
      const pairs = Buffer.from([...parameters].map(([k, v]) => `${k}\0${v}\0`).join(''), 'utf8');
      const body = Buffer.concat([int32((3 << 16) | minor), pairs, Buffer.from([0])]);
      return { bytes: Buffer.concat([int32(4 + body.length), body]), expected: { kind: 'startup', major: 3, minor, parameters } as StartupPacket };
    })
    .filter(({ bytes }) => bytes.length <= 10000),
);

// ---------------------------------------------------------------------------------------------
// FrameReader

test('valid typed streams decode to the same messages at any split points', () => {
  fc.assert(
    fc.property(fc.array(typedMessage, { minLength: 1, maxLength: 12 }), fc.array(fc.nat(), { maxLength: 20 }), (messages, points) => {
      const bytes = Buffer.concat(messages.map(encodeTyped));
      const { frames, error } = feed(new FrameReader(10000, true), cut(bytes, points));
      assert.equal(error, undefined);
      assert.deepEqual(
        frames.map((f) => [f.type, f.body.toString('hex')]),
        messages.map((m) => [m.type, m.body.toString('hex')]),
      );
    }),
    RUNS,
  );
});

test('valid startup-phase streams (SSL, GSS, cancel, startup of any 3.x) decode the same at any split points', () => {
  fc.assert(
    fc.property(fc.array(startupPhasePacket, { minLength: 1, maxLength: 6 }), fc.array(fc.nat(), { maxLength: 20 }), (packets, points) => {
      const { frames, error } = feed(new FrameReader(10000, false), cut(Buffer.concat(packets.map((p) => p.bytes)), points));
      assert.equal(error, undefined);
      assert.deepEqual(
        frames.map((f) => decodeStartupPacket(f.body)),
        packets.map((p) => p.expected),
      );
    }),
    RUNS,
  );
});

test('random bytes in random chunks: frames or FramingError, nothing else; memory bounded by the bytes pushed', () => {
  fc.assert(
    fc.property(
      fc.boolean(),
      fc.integer({ min: 8, max: 70000 }),
      fc.array(fc.uint8Array({ maxLength: 200 }).map((a) => Buffer.from(a)), { maxLength: 30 }),
      (typed, maxLength, chunks) => {
        feed(new FrameReader(maxLength, typed), chunks);
      },
    ),
    RUNS,
  );
});

test('any length field: refused when out of range (negative, zero, off by one, huge), else waited for, never allocated from', () => {
  const edges = [-0x80000000, -1, 0, 1, 3, 4, 7, 8, 9, 65535, 65536, 65537, 0x7fffffff];
  fc.assert(
    fc.property(
      fc.boolean(),
      fc.integer({ min: 8, max: 70000 }),
      fc.oneof(fc.integer({ min: -0x80000000, max: 0x7fffffff }), fc.constantFrom(...edges)),
      fc.integer({ min: -1, max: 1 }),
      fc.uint8Array({ maxLength: 600 }),
      fc.array(fc.nat(), { maxLength: 8 }),
      (typed, maxLength, raw, offByOne, tail, points) => {
        // Half the time, a length right at a boundary: the minimum or maxLength, give or take one.
        const minimum = typed ? 4 : 8;
        const length = raw % 2 === 0 ? raw : (Math.abs(raw) % 4 === 1 ? minimum : maxLength) + offByOne;
        const header = typed ? Buffer.concat([Buffer.from('Q'), int32(length)]) : int32(length);
        const bytes = Buffer.concat([header, Buffer.from(tail)]);
        // feed() checks every allocation against the bytes pushed so far, whatever the length says.
        const { frames, error } = feed(new FrameReader(maxLength, typed), cut(bytes, points));
        const valid = length >= minimum && length <= maxLength;
        if (!valid) {
          assert.ok(error instanceof FramingError, `length ${length} (max ${maxLength}) refused`);
          assert.equal(frames.length, 0);
          return;
        }
        const body = length - 4;
        if (tail.length >= body) assert.equal(frames[0]?.body.length, body);
        else assert.deepEqual(frames, [], 'a truncated frame waits for more');
      },
    ),
    { ...RUNS, numRuns: 1000 },
  );
});

test('every strict prefix of a valid frame waits for more, and the rest completes it exactly', () => {
  fc.assert(
    fc.property(fc.oneof(typedMessage.map((m) => ({ typed: true, bytes: encodeTyped(m) })), startupPhasePacket.map((p) => ({ typed: false, bytes: p.bytes }))), fc.nat(), ({ typed, bytes }, at) => {
      const split = at % bytes.length;
      const reader = new FrameReader(10000, typed);
      reader.push(Buffer.from(bytes.subarray(0, split)));
      assert.equal(reader.next(), undefined);
      assert.equal(reader.buffered, split);
      reader.push(Buffer.from(bytes.subarray(split)));
      const frame = reader.next();
      assert.equal(frame?.body.length, bytes.length - (typed ? 5 : 4));
      assert.equal(reader.next(), undefined);
      assert.equal(reader.buffered, 0);
    }),
    RUNS,
  );
});

// ---------------------------------------------------------------------------------------------
// decodeStartupPacket

const SQLSTATES = new Set(['08P01', '0A000', '28000']);

function decodeOrTypedError(body: Buffer): StartupPacket | StartupPacketError {
  try {
    return decodeStartupPacket(body);
  } catch (error) {
    assert.ok(error instanceof StartupPacketError, `only StartupPacketError, got ${String(error)}`);
    assert.ok(SQLSTATES.has(error.sqlstate), `SQLSTATE ${error.sqlstate}`);
    assert.ok(error.message.length > 0);
    return error;
  }
}

test('any packet body: a startup packet that holds what it claims, or a StartupPacketError with a SQLSTATE', () => {
  const codes = [SSL_REQUEST_CODE, GSSENC_REQUEST_CODE, CANCEL_REQUEST_CODE, 0x00030000, 0x00030002, 0x0003ffff, 0x00020000, 0x00040000, 0, -1, 0x04d2162f, 0x04d21631];
  fc.assert(
    fc.property(
      fc.oneof(
        fc.uint8Array({ maxLength: 300 }).map((a) => Buffer.from(a)),
        fc.tuple(fc.constantFrom(...codes), fc.uint8Array({ maxLength: 300 })).map(([code, rest]) => Buffer.concat([int32(code), Buffer.from(rest)])),
        fc.tuple(fc.constantFrom(...codes), fc.array(fc.constantFrom('user', 'database', '', 'x', '_pq_.a', 'é'), { maxLength: 8 }), fc.boolean()).map(([code, words, terminated]) =>
          Buffer.concat([int32(code), Buffer.from(words.join('\0') + (terminated ? '\0\0' : ''), 'utf8')]),
        ),
      ),
      (body) => {
        const decoded = decodeOrTypedError(body);
        if (decoded instanceof StartupPacketError) return;
        switch (decoded.kind) {
          case 'ssl':
          case 'gssenc':
            assert.equal(body.length, 4);
            break;
          case 'cancel':
            assert.ok(body.length >= 12 && body.length <= 264);
            assert.deepEqual(decoded.secretKey, body.subarray(8));
            break;
          case 'startup':
            assert.equal(decoded.major, 3);
            assert.ok((decoded.parameters.get('user') ?? '') !== '', 'a startup always names a user');
            assert.equal(body[body.length - 1], 0, 'ends with its terminator');
            break;
        }
      },
    ),
    { ...RUNS, numRuns: 2000 },
  );
});

test('unknown protocol versions and magic numbers are refused with 0A000 naming the version', () => {
  fc.assert(
    fc.property(fc.integer({ min: -0x80000000, max: 0x7fffffff }), fc.uint8Array({ maxLength: 40 }), (code, rest) => {
      fc.pre(![SSL_REQUEST_CODE, GSSENC_REQUEST_CODE, CANCEL_REQUEST_CODE].includes(code) && code >>> 16 !== 3);
      const error = decodeOrTypedError(Buffer.concat([int32(code), Buffer.from(rest)]));
      assert.ok(error instanceof StartupPacketError);
      assert.equal(error.sqlstate, '0A000');
      assert.match(error.message, new RegExp(`unsupported frontend protocol ${code >>> 16}\\.${code & 0xffff}:`));
    }),
    { ...RUNS, numRuns: 1000 },
  );
});

// ---------------------------------------------------------------------------------------------
// The other decoders on the proxy's paths

test('parseFields never throws on any ErrorResponse body', () => {
  fc.assert(
    fc.property(fc.uint8Array({ maxLength: 200 }), (body) => {
      for (const [letter, value] of parseFields(Buffer.from(body))) {
        assert.equal(letter.length, 1);
        assert.equal(typeof value, 'string');
      }
    }),
    RUNS,
  );
});

test('MessageBoundaries follows valid streams at any split points, and never throws on garbage', () => {
  fc.assert(
    fc.property(fc.array(typedMessage, { minLength: 1, maxLength: 10 }), fc.array(fc.nat(), { maxLength: 10 }), fc.nat(), (messages, points, cutAt) => {
      const bytes = Buffer.concat(messages.map(encodeTyped));
      const whole = new MessageBoundaries();
      for (const chunk of cut(bytes, points)) whole.observe(chunk);
      assert.ok(whole.atBoundary);
      assert.equal(whole.lastType, messages.at(-1)?.type);
      // Cut anywhere inside: at a boundary exactly where a message ends.
      const upTo = cutAt % (bytes.length + 1);
      const partial = new MessageBoundaries();
      for (const chunk of cut(bytes.subarray(0, upTo), points)) partial.observe(chunk);
      let end = 0;
      const ends = new Set([0, ...messages.map((m) => (end += 5 + m.body.length))]);
      assert.equal(partial.atBoundary, ends.has(upTo), `cut at ${upTo}`);
    }),
    RUNS,
  );
  fc.assert(
    fc.property(fc.array(fc.uint8Array({ maxLength: 100 }), { maxLength: 10 }), (chunks) => {
      const boundaries = new MessageBoundaries();
      for (const chunk of chunks) boundaries.observe(Buffer.from(chunk));
      assert.equal(typeof boundaries.atBoundary, 'boolean');
    }),
    RUNS,
  );
});

test('SocketFrames stops reading a peer that sends without being asked: at most 64 KB plus one chunk held', async () => {
  await fc.assert(
    fc.asyncProperty(fc.array(fc.integer({ min: 1, max: 32 * 1024 }), { minLength: 1, maxLength: 40 }), async (sizes) => {
      const socket = new PassThrough();
      const frames = new SocketFrames(socket, new FrameReader(65535, true));
      let largest = 0;
      for (const size of sizes) {
        // One message announcing 65,535 bytes: it never completes, so every byte stays unframed.
        const chunk = Buffer.alloc(size, 0x41);
        if (frames.reader.buffered === 0 && size >= 5) {
          chunk[0] = 0x51;
          chunk.writeInt32BE(65535, 1);
        }
        largest = Math.max(largest, size);
        socket.write(chunk);
        await new Promise((resolve) => setImmediate(resolve));
        assert.ok(frames.reader.buffered <= 64 * 1024 + largest, `${frames.reader.buffered} bytes held`);
      }
      if (frames.reader.buffered > 64 * 1024) assert.ok(socket.isPaused(), 'reading paused');
      frames.detach();
    }),
    { ...RUNS, numRuns: 50 },
  );
});

// ---------------------------------------------------------------------------------------------
// Through the real listener

let db: TestPostgres;
let trust: InProcessProxy;
let scram: InProcessProxy;
let usersDir: string;
const token = 'tok-' + randomBytes(32).toString('base64url');

before(async () => {
  db = await startTokenPostgres(token);
  usersDir = mkdtempSync(join(tmpdir(), 'lbp-property-'));
  writeFileSync(join(usersDir, 'users'), 'alice:wonderland\n', { mode: 0o600 });
  [trust, scram] = await Promise.all([
    startProxy(['--connection', connectionFor(db, token), '--startup-timeout', '1000']),
    startProxy(['--connection', connectionFor(db, token), '--startup-timeout', '1000', '--client-auth', 'scram-sha-256', '--client-users', join(usersDir, 'users')]),
  ]);
});

after(async () => {
  await Promise.all([trust?.close(), scram?.close()]);
  await db?.stop();
  if (usersDir) rmSync(usersDir, { recursive: true, force: true });
});

/** What must never be logged: a session's code threw out of its handler. */
function unexpected(p: InProcessProxy): unknown[] {
  return p.logs.filter((l) => l.msg === 'session failed unexpectedly' || (l.level as number) >= 50);
}

test('a short fuzz of mutated startup sequences through the listener: no violation, no leak, still serving', async (t) => {
  const summary = await fuzzListener({ host: '127.0.0.1', port: trust.port, seed: 0x5eed, count: 250, concurrency: 24, startupTimeoutMs: 1000 });
  t.diagnostic(JSON.stringify({ outcomes: summary.outcomes, sqlstates: summary.sqlstates, ms: summary.elapsedMs }));
  assert.deepEqual(summary.violations, []);
  assert.ok(summary.outcomes.error_response > 50 && summary.outcomes.session > 5, 'the cases reach both refusals and sessions');
  assert.deepEqual(unexpected(trust), []);
  await waitUntil(() => trust.server.connections === 0, 5000, 'every fuzz connection closed');
  assert.equal(await whoAmI(trust.port, db), db.tokenRole);
});

test('random SASL messages during SCRAM: FATAL 08P01/28000/28P01 and a close, never an escape from the handshake', async () => {
  const initial = serialize.sendSASLInitialResponseMessage('SCRAM-SHA-256', 'n,,n=*,r=abcdefghijklmnop');
  await fc.assert(
    fc.asyncProperty(
      fc.oneof(
        fc.uint8Array({ maxLength: 120 }).map((a) => Buffer.concat([Buffer.from('p'), int32(4 + a.length), Buffer.from(a)])),
        fc.tuple(fc.nat(), fc.uint8Array({ minLength: 1, maxLength: 4 })).map(([at, patch]) => {
          const b = Buffer.from(initial);
          Buffer.from(patch).copy(b, 5 + (at % (b.length - 5)));
          return b;
        }),
        fc.string({ maxLength: 80 }).map((s) => Buffer.concat([initial, serialize.sendSCRAMClientFinalMessage(s)])),
      ),
      async (message) => {
        const socket = netConnect({ host: '127.0.0.1', port: scram.port });
        socket.on('error', () => {});
        let reply = Buffer.alloc(0);
        socket.on('data', (chunk: Buffer) => (reply = Buffer.concat([reply, chunk])));
        const closed = new Promise<void>((resolve) => socket.once('close', () => resolve()));
        socket.write(serialize.startup({ user: 'alice', database: db.database }));
        socket.write(message);
        await Promise.race([closed, sleep(4000)]);
        socket.destroy();
        const types: string[] = [];
        const codes: string[] = [];
        for (let at = 0; at + 5 <= reply.length; ) {
          const length = reply.readInt32BE(at + 1);
          const type = String.fromCharCode(reply[at] as number);
          types.push(type);
          if (type === 'E') codes.push(Object.fromEntries(parseFields(reply.subarray(at + 5, at + 1 + length)))['C'] ?? '');
          at += 1 + length;
        }
        assert.ok(types.every((x) => x === 'R' || x === 'E'), `only authentication requests and an error: ${types.join('')}`);
        assert.ok(codes.length <= 1 && codes.every((c) => ['08P01', '28000', '28P01'].includes(c)), `SQLSTATE ${codes.join(',')}`);
      },
    ),
    { seed: 0x5c7a, numRuns: 60 },
  );
  assert.deepEqual(unexpected(scram), []);
  await waitUntil(() => scram.server.connections === 0, 5000, 'every connection closed');
  assert.equal(await whoAmI(scram.port, db, { user: 'alice', password: 'wonderland' }), db.tokenRole);
});
