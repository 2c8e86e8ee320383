/**
 * The seed connector's connection-string form: `Key=Value;Key="Value; with semicolon"`.
 * Keys are case-insensitive; values may be quoted with ' or ", a doubled quote inside standing
 * for itself; whitespace around keys and unquoted values is dropped.
 */
export class ConnectionStringError extends Error {
  override readonly name = 'ConnectionStringError';
}

/** Pairs in order, keys as written. */
export function parseConnectionString(text: string): Array<[string, string]> {
  const pairs: Array<[string, string]> = [];
  let i = 0;
  const n = text.length;
  while (i < n) {
    while (i < n && (text[i] === ';' || /\s/.test(text[i] as string))) i++;
    if (i >= n) break;
    const eq = text.indexOf('=', i);
    const semi = text.indexOf(';', i);
    if (eq < 0 || (semi >= 0 && semi < eq)) {
      // Only the leading name: what follows may be a secret typed with the wrong separator.
      const name = /^[\w.-]*/.exec(text.slice(i))?.[0] ?? '';
      throw new ConnectionStringError(`connection string: "${name}…" is not of the form Key=Value`);
    }
    const key = text.slice(i, eq).trim();
    if (key === '') throw new ConnectionStringError('connection string: a property has an empty name before "="');
    i = eq + 1;
    while (i < n && (text[i] === ' ' || text[i] === '\t')) i++;
    let value: string;
    const quote = text[i];
    if (quote === '"' || quote === "'") {
      value = '';
      i++;
      for (;;) {
        if (i >= n) throw new ConnectionStringError(`connection string: the value of ${key} has no closing ${quote}`);
        if (text[i] === quote) {
          if (text[i + 1] === quote) {
            value += quote;
            i += 2;
            continue;
          }
          i++;
          break;
        }
        value += text[i];
        i++;
      }
      while (i < n && /\s/.test(text[i] as string)) i++;
      if (i < n && text[i] !== ';') throw new ConnectionStringError(`connection string: unexpected text after the quoted value of ${key}`);
    } else {
      const end = text.indexOf(';', i);
      value = text.slice(i, end < 0 ? n : end).trim();
      i = end < 0 ? n : end;
    }
    pairs.push([key, value]);
  }
  return pairs;
}
