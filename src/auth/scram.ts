/**
 * SCRAM-SHA-256 (RFC 5802, RFC 7677) as Postgres uses it: the client side toward the upstream
 * (with tls-server-end-point channel binding, RFC 5929) and the server side for local users.
 * @see https://www.postgresql.org/docs/current/sasl-authentication.html
 */
import { createHash, createHmac, pbkdf2Sync, randomBytes, timingSafeEqual } from 'node:crypto';

export const SCRAM = 'SCRAM-SHA-256';
export const SCRAM_PLUS = 'SCRAM-SHA-256-PLUS';
const DEFAULT_ITERATIONS = 4096;

const sha256 = (data: Buffer): Buffer => createHash('sha256').update(data).digest();
const hmac = (key: Buffer, data: string): Buffer => createHmac('sha256', key).update(data, 'utf8').digest();

function xor(a: Buffer, b: Buffer): Buffer {
  const out = Buffer.allocUnsafe(a.length);
  for (let i = 0; i < a.length; i++) out[i] = (a[i] as number) ^ (b[i] as number);
  return out;
}

/** Parses `k=v,k=v` SCRAM attributes; values may contain '='. */
function attributes(message: string): Map<string, string> {
  const map = new Map<string, string>();
  for (const part of message.split(',')) {
    if (part.length < 2 || part[1] !== '=') throw new ScramError(`malformed SCRAM message attribute "${part.slice(0, 20)}"`);
    map.set(part[0] as string, part.slice(2));
  }
  return map;
}

function required(map: Map<string, string>, key: string): string {
  const value = map.get(key);
  if (value === undefined || value === '') throw new ScramError(`SCRAM message lacks attribute "${key}"`);
  return value;
}

export class ScramError extends Error {
  override readonly name = 'ScramError';
}

/** The stored form of a password: what Postgres keeps in pg_authid for SCRAM. */
export interface ScramVerifier {
  readonly iterations: number;
  readonly salt: Buffer;
  readonly storedKey: Buffer;
  readonly serverKey: Buffer;
}

/** RFC 3454 table C.1.2, non-ASCII spaces: SASLprep maps them to U+0020 (NFKC alone keeps some). */
const NON_ASCII_SPACE = /[\u00a0\u1680\u2000-\u200b\u202f\u205f\u3000]/g;
/** RFC 3454 table B.1, "commonly mapped to nothing" (soft hyphen, zero-width joiners, variation selectors...). */
const MAPPED_TO_NOTHING = /[\u00ad\u034f\u1806\u180b-\u180d\u200c\u200d\u2060\ufe00-\ufe0f\ufeff]/g;

/**
 * SASLprep (RFC 4013) as Postgres applies it to passwords, so that our keys match the verifiers it
 * stores and the proofs libpq and node-postgres send. As in node-postgres, the prohibited-output
 * and bidirectional checks are left out (Postgres then uses the password unprepared).
 */
function saslprep(password: string): string {
  return password.replace(NON_ASCII_SPACE, ' ').replace(MAPPED_TO_NOTHING, '').normalize('NFKC');
}

interface Keys {
  readonly clientKey: Buffer;
  readonly storedKey: Buffer;
  readonly serverKey: Buffer;
}

/**
 * Keys derived lately, by SHA-256 of (password, salt, iterations). PBKDF2 with Postgres' 4,096
 * iterations takes milliseconds on the event loop, which every session relayed there (the native
 * relay's too) waits for; the same token logs in again and again with the same salt, so each
 * (password, salt) pays it once. A few entries, the oldest dropped first; in memory only.
 */
const derived = new Map<string, Keys>();
const DERIVED_MAX = 32;
let derivations = 0;

/** How many times PBKDF2 ran in this process (tests check the cache with it). */
export function keyDerivations(): number {
  return derivations;
}

function keys(password: string, salt: Buffer, iterations: number): Keys {
  const id = createHash('sha256').update(password).update('\0').update(salt).update(`\0${iterations}`).digest('base64');
  const known = derived.get(id);
  if (known) {
    derived.delete(id); // most recently used goes last
    derived.set(id, known);
    return known;
  }
  derivations++;
  const salted = pbkdf2Sync(saslprep(password), salt, iterations, 32, 'sha256');
  const clientKey = hmac(salted, 'Client Key');
  const result = { clientKey, storedKey: sha256(clientKey), serverKey: hmac(salted, 'Server Key') };
  derived.set(id, result);
  if (derived.size > DERIVED_MAX) derived.delete(derived.keys().next().value as string);
  return result;
}

export function makeVerifier(password: string, iterations = DEFAULT_ITERATIONS): ScramVerifier {
  const salt = randomBytes(16);
  const { storedKey, serverKey } = keys(password, salt, iterations);
  return { iterations, salt, storedKey, serverKey };
}

/** Parses Postgres' text form `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`. */
export function parseVerifier(text: string): ScramVerifier | undefined {
  const match = /^SCRAM-SHA-256\$(\d+):([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+):([A-Za-z0-9+/=]+)$/.exec(text);
  if (!match) return undefined;
  return {
    iterations: Number(match[1]),
    salt: Buffer.from(match[2] as string, 'base64'),
    storedKey: Buffer.from(match[3] as string, 'base64'),
    serverKey: Buffer.from(match[4] as string, 'base64'),
  };
}

/** Whether a cleartext password matches a verifier (for the `password` method). */
export function verifyPassword(verifier: ScramVerifier, password: string): boolean {
  const { storedKey } = keys(password, verifier.salt, verifier.iterations);
  return timingSafeEqual(storedKey, verifier.storedKey);
}

/**
 * The client side, one exchange. Channel binding data is the tls-server-end-point hash of the
 * upstream's certificate when the server offers SCRAM-SHA-256-PLUS.
 */
export class ScramClient {
  readonly #password: string;
  readonly #nonce = randomBytes(18).toString('base64');
  readonly #gs2Header: string;
  readonly #bindingData: Buffer;
  readonly #clientFirstBare: string;
  #expectedServerSignature: Buffer | undefined;

  constructor(password: string, readonly mechanism: typeof SCRAM | typeof SCRAM_PLUS, channelBinding: Buffer | undefined, serverOffersPlus: boolean) {
    this.#password = password;
    if (mechanism === SCRAM_PLUS) {
      if (!channelBinding) throw new ScramError('channel binding requested without a TLS certificate hash');
      this.#gs2Header = 'p=tls-server-end-point,,';
      this.#bindingData = channelBinding;
    } else {
      // 'y': we could bind but the server did not offer it; 'n' when not on TLS.
      this.#gs2Header = channelBinding && !serverOffersPlus ? 'y,,' : 'n,,';
      this.#bindingData = Buffer.alloc(0);
    }
    this.#clientFirstBare = `n=*,r=${this.#nonce}`;
  }

  clientFirstMessage(): string {
    return this.#gs2Header + this.#clientFirstBare;
  }

  clientFinalMessage(serverFirst: string): string {
    const attrs = attributes(serverFirst);
    const nonce = required(attrs, 'r');
    if (!nonce.startsWith(this.#nonce) || nonce.length === this.#nonce.length) {
      throw new ScramError('server nonce does not extend the client nonce');
    }
    const salt = Buffer.from(required(attrs, 's'), 'base64');
    const iterations = Number(required(attrs, 'i'));
    if (!Number.isSafeInteger(iterations) || iterations < 1 || iterations > 10_000_000) {
      throw new ScramError('invalid SCRAM iteration count');
    }
    const channel = Buffer.concat([Buffer.from(this.#gs2Header, 'utf8'), this.#bindingData]).toString('base64');
    const withoutProof = `c=${channel},r=${nonce}`;
    const authMessage = `${this.#clientFirstBare},${serverFirst},${withoutProof}`;
    const { clientKey, storedKey, serverKey } = keys(this.#password, salt, iterations);
    const proof = xor(clientKey, hmac(storedKey, authMessage));
    this.#expectedServerSignature = hmac(serverKey, authMessage);
    return `${withoutProof},p=${proof.toString('base64')}`;
  }

  /** Throws unless the server proved it knows the password too. */
  verifyServerFinal(serverFinal: string): void {
    const attrs = attributes(serverFinal);
    const error = attrs.get('e');
    if (error !== undefined) throw new ScramError(`server rejected SCRAM exchange: ${error}`);
    const signature = Buffer.from(required(attrs, 'v'), 'base64');
    const expected = this.#expectedServerSignature;
    if (!expected || signature.length !== expected.length || !timingSafeEqual(signature, expected)) {
      throw new ScramError('server signature mismatch in SCRAM exchange');
    }
  }
}

/** The server side for one client. Channel binding is not offered to clients. */
export class ScramServer {
  readonly #verifier: ScramVerifier;
  #clientFirstBare = '';
  #serverFirst = '';
  #gs2Header = '';
  #nonce = '';

  constructor(verifier: ScramVerifier) {
    this.#verifier = verifier;
  }

  /** Handles client-first-message (from SASLInitialResponse); returns server-first-message. */
  serverFirstMessage(clientFirst: string): string {
    const match = /^([ny])(?:=[^,]*)?,(a=[^,]*)?,(.*)$/s.exec(clientFirst);
    if (!match) {
      if (clientFirst.startsWith('p')) throw new ScramError('channel binding is not supported by this server; use SCRAM-SHA-256');
      throw new ScramError('malformed SCRAM client-first-message');
    }
    this.#gs2Header = clientFirst.slice(0, clientFirst.length - (match[3] as string).length);
    this.#clientFirstBare = match[3] as string;
    const clientNonce = required(attributes(this.#clientFirstBare), 'r');
    this.#nonce = clientNonce + randomBytes(18).toString('base64');
    this.#serverFirst = `r=${this.#nonce},s=${this.#verifier.salt.toString('base64')},i=${this.#verifier.iterations}`;
    return this.#serverFirst;
  }

  /** Verifies client-final-message; returns server-final-message, or throws on a bad proof. */
  serverFinalMessage(clientFinal: string): string {
    const proofAt = clientFinal.lastIndexOf(',p=');
    if (proofAt < 0) throw new ScramError('malformed SCRAM client-final-message');
    const withoutProof = clientFinal.slice(0, proofAt);
    const attrs = attributes(withoutProof);
    if (Buffer.from(required(attrs, 'c'), 'base64').toString('utf8') !== this.#gs2Header) {
      throw new ScramError('SCRAM channel binding check failed');
    }
    if (required(attrs, 'r') !== this.#nonce) throw new ScramError('SCRAM nonce mismatch');
    const proof = Buffer.from(clientFinal.slice(proofAt + 3), 'base64');
    const authMessage = `${this.#clientFirstBare},${this.#serverFirst},${withoutProof}`;
    const clientSignature = hmac(this.#verifier.storedKey, authMessage);
    if (proof.length !== clientSignature.length) throw new PasswordMismatch();
    if (!timingSafeEqual(sha256(xor(proof, clientSignature)), this.#verifier.storedKey)) throw new PasswordMismatch();
    return `v=${hmac(this.#verifier.serverKey, authMessage).toString('base64')}`;
  }
}

/** The client's proof or password was wrong: 28P01 to the client. */
export class PasswordMismatch extends Error {
  override readonly name = 'PasswordMismatch';
}

/** Postgres' MD5 password response: "md5" + md5(md5(password + user) + salt). */
export function md5PasswordResponse(user: string, password: string, salt: Buffer): string {
  const inner = createHash('md5').update(password + user, 'utf8').digest('hex');
  return 'md5' + createHash('md5').update(Buffer.concat([Buffer.from(inner, 'utf8'), salt])).digest('hex');
}

/**
 * tls-server-end-point channel binding data (RFC 5929 section 4.1): the hash of the server's DER
 * certificate, with the certificate's own signature hash, or SHA-256 where that is MD5 or SHA-1.
 */
export function tlsServerEndPoint(certificateDer: Buffer): Buffer {
  return createHash(signatureHash(certificateDer)).update(certificateDer).digest();
}

const OID_HASH: ReadonlyArray<readonly [string, string]> = [
  ['2a864886f70d01010c', 'sha384'], // sha384WithRSAEncryption
  ['2a864886f70d01010d', 'sha512'], // sha512WithRSAEncryption
  ['2a8648ce3d040303', 'sha384'], // ecdsa-with-SHA384
  ['2a8648ce3d040304', 'sha512'], // ecdsa-with-SHA512
];

/** Reads Certificate.signatureAlgorithm: SEQUENCE { tbsCertificate, AlgorithmIdentifier, BIT STRING }. */
function signatureHash(der: Buffer): string {
  try {
    let at = headerLength(der, 0); // into the outer SEQUENCE
    at += headerLength(der, at) + contentLength(der, at); // skip tbsCertificate
    const algorithmBody = at + headerLength(der, at);
    const oidLength = contentLength(der, algorithmBody);
    const oid = der.toString('hex', algorithmBody + headerLength(der, algorithmBody), algorithmBody + headerLength(der, algorithmBody) + oidLength);
    return OID_HASH.find(([prefix]) => oid === prefix)?.[1] ?? 'sha256';
  } catch {
    return 'sha256';
  }
}

function headerLength(der: Buffer, at: number): number {
  const first = der[at + 1];
  if (first === undefined) throw new RangeError('truncated DER');
  return first < 0x80 ? 2 : 2 + (first & 0x7f);
}

function contentLength(der: Buffer, at: number): number {
  const first = der[at + 1];
  if (first === undefined) throw new RangeError('truncated DER');
  if (first < 0x80) return first;
  let length = 0;
  for (let i = 0; i < (first & 0x7f); i++) length = length * 256 + (der[at + 2 + i] ?? 0);
  return length;
}
