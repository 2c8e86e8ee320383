/**
 * Durations as people write them: `500ms`, `30s`, `5m`, `1h`, or parts together (`1m30s`). A
 * bare whole number is milliseconds, as every duration setting meant before units were accepted.
 */

const UNIT_MS = { ms: 1, s: 1_000, m: 60_000, h: 3_600_000 } as const;

/** `ms` is tried before `m`, so that `5ms` is never 5 minutes and a stray `s`. */
const PART = /(\d+(?:\.\d+)?)(ms|h|m|s)/y;

/** What a duration may look like, for error messages. */
export const DURATION_FORMS = '500ms, 30s, 5m, 1h or 1m30s (a bare number is milliseconds)';

/** Milliseconds (rounded to a whole one), or undefined when `text` is not a duration. */
export function parseDuration(text: string): number | undefined {
  const value = text.trim().toLowerCase();
  if (/^\d+$/.test(value)) return Number(value);
  if (value === '') return undefined;
  let total = 0;
  for (let at = 0; at < value.length; ) {
    PART.lastIndex = at;
    const part = PART.exec(value);
    if (!part) return undefined;
    total += Number(part[1]) * UNIT_MS[part[2] as keyof typeof UNIT_MS];
    at = PART.lastIndex;
  }
  return Math.round(total);
}

/** The shortest form parseDuration reads back: `0`, `750ms`, `30s`, `1m30s`, `24h`. */
export function formatDuration(ms: number): string {
  if (ms === 0) return '0';
  let rest = ms;
  let out = '';
  for (const [unit, size] of [['h', 3_600_000], ['m', 60_000], ['s', 1_000], ['ms', 1]] as const) {
    const count = Math.floor(rest / size);
    if (count > 0) out += `${count}${unit}`;
    rest -= count * size;
  }
  return out;
}
