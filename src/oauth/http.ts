import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from '../ops/log.js';
import { BadResponseError, challengeError, HttpStatusError, isRetryable, translate, type OperationInfo } from './errors.js';

export interface RetryPolicy {
  /** Tries in all, the first included. */
  readonly attempts: number;
  readonly baseDelayMs: number;
  readonly maxDelayMs: number;
}

/** Three tries, 0.25 s then 0.5 s apart (each with jitter): a blip passes, an outage fails within seconds. */
export const DEFAULT_RETRY: RetryPolicy = { attempts: 3, baseDelayMs: 250, maxDelayMs: 4_000 };

/**
 * Runs one HTTP operation with retries on network errors, timeouts and 5xx (never on an OAuth
 * error such as invalid_client or invalid_grant), and translates its final failure into a
 * TokenError. Each try is bounded by the caller's own timeout (openid-client's `timeout`, or
 * `AbortSignal.timeout` in `postJson`).
 */
export async function withRetries<T>(
  run: () => Promise<T>,
  op: Omit<OperationInfo, 'attempts'>,
  secrets: ReadonlyArray<string | undefined>,
  policy: RetryPolicy,
  logger: Logger,
): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await run();
    } catch (err) {
      if (attempt >= policy.attempts || !isRetryable(err)) {
        throw translate(err, { ...op, attempts: attempt }, secrets, await challengeError(err));
      }
      const ceiling = Math.min(policy.maxDelayMs, policy.baseDelayMs * 2 ** (attempt - 1));
      const delayMs = Math.round(ceiling / 2 + (Math.random() * ceiling) / 2);
      logger.warn({ operation: op.what, url: op.url, attempt, delayMs, error: errorKind(err) }, 'workspace request failed, retrying');
      await sleep(delayMs);
    }
  }
}

/** A short, secret-free label of a raw failure for the retry log line. */
function errorKind(err: unknown): string {
  if (!(err instanceof Error)) return typeof err;
  if (err instanceof HttpStatusError) return `HTTP ${err.status}`;
  const code = (err as { code?: unknown }).code;
  const causeCode = (err.cause as { code?: unknown } | undefined)?.code;
  const status = (err.cause as { status?: unknown } | undefined)?.status;
  return [err.name, code, causeCode, typeof status === 'number' ? `HTTP ${status}` : undefined].filter((x) => typeof x === 'string').join(' ');
}

/**
 * POSTs JSON with a bearer token and returns the parsed JSON answer. Throws HttpStatusError for a
 * non-2xx answer (with Databricks' `error_code: message` when present), BadResponseError for a
 * body that is not JSON, and fetch's own errors for network failures and the timeout.
 */
export function postJson(url: string, bearerToken: string, body: unknown, timeoutMs: number): Promise<unknown> {
  return requestJson('POST', url, bearerToken, body, timeoutMs);
}

/** GETs a JSON resource with a bearer token; fails as postJson does. */
export function getJson(url: string, bearerToken: string, timeoutMs: number): Promise<unknown> {
  return requestJson('GET', url, bearerToken, undefined, timeoutMs);
}

async function requestJson(method: 'GET' | 'POST', url: string, bearerToken: string, body: unknown, timeoutMs: number): Promise<unknown> {
  const response = await fetch(url, {
    method,
    headers: {
      authorization: `Bearer ${bearerToken}`,
      accept: 'application/json',
      ...(body === undefined ? {} : { 'content-type': 'application/json' }),
    },
    ...(body === undefined ? {} : { body: JSON.stringify(body) }),
    redirect: 'manual',
    signal: AbortSignal.timeout(timeoutMs),
  });
  const text = await response.text();
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    json = undefined;
  }
  if (!response.ok) {
    throw new HttpStatusError(response.status, databricksErrorDetail(json));
  }
  if (json === undefined) throw new BadResponseError('malformed JSON');
  return json;
}

function databricksErrorDetail(json: unknown): string | undefined {
  if (typeof json !== 'object' || json === null) return undefined;
  const { error_code: code, message } = json as { error_code?: unknown; message?: unknown };
  const parts = [typeof code === 'string' ? code : undefined, typeof message === 'string' ? message : undefined].filter(Boolean);
  return parts.length > 0 ? parts.join(': ') : undefined;
}
