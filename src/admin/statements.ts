/**
 * The console's language: what one simple Query message says, as statements. Pure: text in,
 * statements out. Several statements in one message run in order, as Postgres runs them.
 *
 *   SHOW <item>
 *   PAUSE [<target>]   RESUME [<target>]   RELOAD   SHUTDOWN   KILL CLIENT <id>
 *   CALL <procedure>([<name> => <value> [, ...]])   (also name = value, as the seed writes it)
 */

/** A refusal for the console's client: an ErrorResponse (severity ERROR) with a real SQLSTATE. */
export class ConsoleError extends Error {
  override readonly name = 'ConsoleError';
  constructor(
    readonly sqlstate: string,
    message: string,
    readonly hint?: string,
  ) {
    super(message);
  }
}

export const HELP_HINT = 'SHOW HELP lists the console commands';

export interface Argument {
  /** Lower case, underscores kept; undefined for a positional argument. */
  readonly name: string | undefined;
  readonly value: string | boolean | null;
}

export type Statement =
  | { readonly kind: 'show'; readonly item: string }
  | { readonly kind: 'pause' | 'resume'; readonly target: string | undefined }
  | { readonly kind: 'reload' | 'shutdown' }
  | { readonly kind: 'kill'; readonly client: number }
  | { readonly kind: 'call'; readonly procedure: string; readonly args: readonly Argument[] };

type Token =
  | { readonly type: 'word'; readonly text: string; readonly quoted: boolean }
  | { readonly type: 'string'; readonly text: string }
  | { readonly type: 'number'; readonly text: string }
  | { readonly type: 'punct'; readonly text: string };

/** The statements of one Query message; an empty list for an empty query. Throws ConsoleError. */
export function parseStatements(text: string): Statement[] {
  const statements: Statement[] = [];
  let current: Token[] = [];
  for (const token of tokenize(text)) {
    if (token.type === 'punct' && token.text === ';') {
      if (current.length > 0) statements.push(parseStatement(current));
      current = [];
    } else {
      current.push(token);
    }
  }
  if (current.length > 0) statements.push(parseStatement(current));
  return statements;
}

function tokenize(text: string): Token[] {
  const tokens: Token[] = [];
  let i = 0;
  while (i < text.length) {
    const c = text[i] as string;
    if (/\s/.test(c)) {
      i++;
    } else if (text.startsWith('--', i)) {
      const end = text.indexOf('\n', i);
      i = end < 0 ? text.length : end + 1;
    } else if (text.startsWith('/*', i)) {
      const end = text.indexOf('*/', i + 2);
      if (end < 0) throw new ConsoleError('42601', 'unterminated /* comment');
      i = end + 2;
    } else if (c === "'" || c === '"') {
      let value = '';
      let j = i + 1;
      for (;;) {
        if (j >= text.length) throw new ConsoleError('42601', c === "'" ? 'unterminated quoted string' : 'unterminated quoted identifier');
        if (text[j] === c) {
          if (text[j + 1] === c) {
            value += c;
            j += 2;
            continue;
          }
          break;
        }
        value += text[j];
        j++;
      }
      tokens.push(c === "'" ? { type: 'string', text: value } : { type: 'word', text: value, quoted: true });
      i = j + 1;
    } else if (/[A-Za-z_]/.test(c)) {
      const word = /^[A-Za-z_][A-Za-z0-9_$]*/.exec(text.slice(i))?.[0] as string;
      tokens.push({ type: 'word', text: word, quoted: false });
      i += word.length;
    } else if (/[0-9]/.test(c)) {
      const number = /^[0-9]+/.exec(text.slice(i))?.[0] as string;
      tokens.push({ type: 'number', text: number });
      i += number.length;
    } else if (text.startsWith('=>', i) || text.startsWith(':=', i)) {
      tokens.push({ type: 'punct', text: '=>' });
      i += 2;
    } else if (c === '=') {
      tokens.push({ type: 'punct', text: '=>' }); // the seed's style: Verifier='...'
      i++;
    } else if ('(),;'.includes(c)) {
      tokens.push({ type: 'punct', text: c });
      i++;
    } else {
      throw new ConsoleError('42601', `syntax error at or near "${c}"`, HELP_HINT);
    }
  }
  return tokens;
}

/** One statement's tokens, consumed from the front. */
class Cursor {
  #at = 0;
  constructor(readonly tokens: readonly Token[]) {}

  peek(): Token | undefined {
    return this.tokens[this.#at];
  }

  next(): Token | undefined {
    return this.tokens[this.#at++];
  }

  /** A plain (unquoted) word, lower-cased, or undefined. */
  keyword(): string | undefined {
    const token = this.peek();
    if (token?.type !== 'word' || token.quoted) return undefined;
    this.#at++;
    return token.text.toLowerCase();
  }

  punct(text: string): boolean {
    const token = this.peek();
    if (token?.type !== 'punct' || token.text !== text) return false;
    this.#at++;
    return true;
  }

  /** Throws unless every token was consumed. */
  end(command: string): void {
    const token = this.peek();
    if (token !== undefined) throw new ConsoleError('42601', `syntax error at or near "${show(token)}" in ${command}`, HELP_HINT);
  }
}

function show(token: Token): string {
  return token.type === 'string' ? `'${token.text}'` : token.text;
}

function parseStatement(tokens: readonly Token[]): Statement {
  const cursor = new Cursor(tokens);
  const first = cursor.peek() as Token;
  const command = cursor.keyword();
  switch (command) {
    case 'show': {
      const item = cursor.keyword();
      if (item === undefined) throw new ConsoleError('42601', 'SHOW needs an item, such as SHOW POOLS', HELP_HINT);
      cursor.end('SHOW');
      return { kind: 'show', item };
    }
    case 'pause':
    case 'resume': {
      const token = cursor.next();
      let target: string | undefined;
      if (token?.type === 'word' || token?.type === 'string') target = token.text;
      else if (token !== undefined) throw new ConsoleError('42601', `syntax error at or near "${show(token)}" in ${command.toUpperCase()}`, `${command.toUpperCase()} [target]`);
      cursor.end(command.toUpperCase());
      return { kind: command, target };
    }
    case 'reload':
    case 'shutdown':
      cursor.end(command.toUpperCase());
      return { kind: command };
    case 'kill':
    case 'kill_client': {
      if (command === 'kill' && cursor.keyword() !== 'client') {
        throw new ConsoleError('42601', 'KILL takes a client: KILL CLIENT <id>', 'SHOW CLIENTS lists each client with its id');
      }
      const id = cursor.next();
      if (id?.type !== 'number' || !Number.isSafeInteger(Number(id.text))) {
        throw new ConsoleError('42601', 'KILL CLIENT needs the id of a client, a whole number', 'SHOW CLIENTS lists each client with its id');
      }
      cursor.end('KILL CLIENT');
      return { kind: 'kill', client: Number(id.text) };
    }
    case 'call':
      return parseCall(cursor);
    default:
      throw new ConsoleError(
        '42601',
        `"${first.type === 'word' ? first.text : show(first)}" is not a command of the lakebase_proxy console; it runs SHOW, PAUSE, RESUME, RELOAD, SHUTDOWN, KILL CLIENT and CALL, and sends no query upstream`,
        HELP_HINT,
      );
  }
}

function parseCall(cursor: Cursor): Statement {
  const name = cursor.next();
  if (name?.type !== 'word') throw new ConsoleError('42601', 'CALL needs a procedure name', HELP_HINT);
  if (!cursor.punct('(')) throw new ConsoleError('42601', `CALL ${name.text} needs its arguments in parentheses, e.g. CALL ${name.text}()`, HELP_HINT);
  const args: Argument[] = [];
  if (!cursor.punct(')')) {
    for (;;) {
      let argName: string | undefined;
      const token = cursor.next();
      if (token === undefined) throw new ConsoleError('42601', `CALL ${name.text}: missing ")"`);
      let valueToken: Token | undefined = token;
      if (token.type === 'word' && cursor.punct('=>')) {
        argName = token.text.toLowerCase();
        valueToken = cursor.next();
      }
      args.push({ name: argName, value: literal(valueToken, name.text) });
      if (cursor.punct(')')) break;
      if (!cursor.punct(',')) throw new ConsoleError('42601', `CALL ${name.text}: expected "," or ")" between arguments`);
    }
  }
  cursor.end(`CALL ${name.text}`);
  return { kind: 'call', procedure: name.text, args };
}

function literal(token: Token | undefined, procedure: string): string | boolean | null {
  if (token === undefined) throw new ConsoleError('42601', `CALL ${procedure}: an argument has no value`);
  if (token.type === 'string' || token.type === 'number') return token.text;
  if (token.type === 'word' && !token.quoted) {
    const word = token.text.toLowerCase();
    if (word === 'true' || word === 'on') return true;
    if (word === 'false' || word === 'off') return false;
    if (word === 'null') return null;
  }
  throw new ConsoleError('42601', `CALL ${procedure}: ${show(token)} is not a value; quote text values, e.g. callback_url => 'http://localhost:8020'`);
}
