/**
 * One client of the console, on the simple query protocol: the greeting, then Query messages,
 * each answered with its statements' results and ReadyForQuery. The extended protocol (Parse,
 * Bind, Execute, ...) gets one clear error, after which its messages are skipped up to Sync, as
 * Postgres skips them after an error. The console never holds a transaction: the status is
 * always idle.
 * @see https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-SIMPLE-QUERY
 */
import type { Duplex } from 'node:stream';
import { backendKeyData, parameterStatus } from '../wire/backend-messages.js';
import { FramingError } from '../wire/frame-reader.js';
import type { SocketFrames } from '../wire/socket-frames.js';
import type { ClientState } from '../proxy/client-state.js';
import { commandComplete, dataRow, EMPTY_QUERY_RESPONSE, errorResponse, noticeResponse, READY_FOR_QUERY_IDLE, rowDescription } from './messages.js';
import { ConsoleError, HELP_HINT, parseStatements, type Statement } from './statements.js';
import type { Table } from './tables.js';

/** What one statement gives back. */
export interface Outcome {
  readonly tag: string;
  readonly table?: Table;
  readonly notices?: ReadonlyArray<{ readonly message: string; readonly detail?: string }>;
  /** Runs once the answer and ReadyForQuery are written (SHUTDOWN, a KILL of oneself). */
  readonly after?: () => void;
}

export type Execute = (statement: Statement, signal: AbortSignal) => Promise<Outcome>;

const enum FrontendCode {
  Query = 0x51, // 'Q'
  Terminate = 0x58, // 'X'
  Sync = 0x53, // 'S'
  Flush = 0x48, // 'H'
  Parse = 0x50, // 'P'
  Bind = 0x42, // 'B'
  Describe = 0x44, // 'D'
  Execute = 0x45, // 'E'
  Close = 0x43, // 'C'
  FunctionCall = 0x46, // 'F'
  CopyData = 0x64, // 'd'
  CopyDone = 0x63, // 'c'
  CopyFail = 0x66, // 'f'
}

/** The longest Query message taken: console commands are short. */
const MAX_MESSAGE = 1 << 20;

const EXTENDED_PROTOCOL = errorResponse({
  severity: 'ERROR',
  code: '0A000',
  message: 'the lakebase_proxy console speaks the simple query protocol only (no Parse, Bind or Execute)',
  hint: `${HELP_HINT}; psql runs them as typed, and a driver needs its simple-query mode (e.g. preferQueryMode=simple for JDBC, a query without parameters for node-postgres)`,
});

export class ConsoleSession {
  readonly state: ClientState;
  readonly #socket: Duplex;
  readonly #frames: SocketFrames;
  readonly #execute: Execute;
  /** The statement running now, aborted by a cancel request or the client leaving. */
  #running: AbortController | undefined;

  constructor(args: { socket: Duplex; frames: SocketFrames; state: ClientState; execute: Execute }) {
    this.#socket = args.socket;
    this.#frames = args.frames;
    this.state = args.state;
    this.#execute = args.execute;
    this.#socket.once('close', () => this.#running?.abort(new ConsoleError('57014', 'the client went away')));
  }

  /** Greets the client, then answers its messages until it leaves; resolves when it has. */
  async run(greeting: ReadonlyArray<readonly [string, string]>, key: { processId: number; secretKey: number }): Promise<void> {
    this.#write([...greeting.map(([name, value]) => parameterStatus(name, value)), backendKeyData(key.processId, key.secretKey), READY_FOR_QUERY_IDLE]);
    this.#frames.reader.maxLength = MAX_MESSAGE;
    let skipping = false;
    try {
      for (;;) {
        const { type, body } = await this.#frames.next();
        switch (type) {
          case FrontendCode.Query: {
            const end = body.indexOf(0); // the query string's terminator
            await this.#query(body.toString('utf8', 0, end < 0 ? body.length : end));
            break;
          }
          case FrontendCode.Terminate:
            return;
          case FrontendCode.Sync:
            skipping = false;
            this.#write([READY_FOR_QUERY_IDLE]);
            break;
          case FrontendCode.Flush:
          case FrontendCode.CopyData:
          case FrontendCode.CopyDone:
          case FrontendCode.CopyFail:
            break; // nothing to flush; copy messages outside a copy are ignored, as Postgres ignores them
          case FrontendCode.Parse:
          case FrontendCode.Bind:
          case FrontendCode.Describe:
          case FrontendCode.Execute:
          case FrontendCode.Close:
            if (!skipping) this.#write([EXTENDED_PROTOCOL]);
            skipping = true;
            break;
          case FrontendCode.FunctionCall:
            this.#write([EXTENDED_PROTOCOL, READY_FOR_QUERY_IDLE]);
            break;
          default:
            this.#write([errorResponse({ code: '08P01', message: `invalid frontend message type ${type}` })]);
            return;
        }
      }
    } catch (error) {
      // The client left, or sent a message no client sends: a FATAL for the latter.
      if (error instanceof FramingError) this.#write([errorResponse({ code: '08P01', message: error.message })]);
    } finally {
      this.#frames.detach();
      this.#socket.end();
      setTimeout(() => this.#socket.destroy(), 1000).unref();
    }
  }

  /** Ends a running PAUSE (a cancel request for this session). */
  cancel(): void {
    this.#running?.abort(new ConsoleError('57014', 'canceling statement due to user request'));
  }

  close(): void {
    this.#socket.destroy();
  }

  async #query(text: string): Promise<void> {
    let statements: Statement[];
    try {
      statements = parseStatements(text);
    } catch (error) {
      this.#write([failure(error), READY_FOR_QUERY_IDLE]);
      return;
    }
    if (statements.length === 0) {
      this.#write([EMPTY_QUERY_RESPONSE, READY_FOR_QUERY_IDLE]);
      return;
    }
    const after: Array<() => void> = [];
    for (const statement of statements) {
      const running = new AbortController();
      this.#running = running;
      try {
        const outcome = await this.#execute(statement, running.signal);
        this.#write(answer(outcome));
        if (outcome.after) after.push(outcome.after);
      } catch (error) {
        this.#write([failure(error)]);
        break;
      } finally {
        this.#running = undefined;
      }
    }
    this.#write([READY_FOR_QUERY_IDLE]);
    for (const run of after) run();
  }

  #write(messages: readonly Buffer[]): void {
    if (this.#socket.writable) this.#socket.write(messages.length === 1 ? (messages[0] as Buffer) : Buffer.concat(messages));
  }
}

function answer(outcome: Outcome): Buffer[] {
  const messages = (outcome.notices ?? []).map((n) => noticeResponse(n.message, n.detail));
  if (outcome.table) {
    messages.push(rowDescription(outcome.table.columns), ...outcome.table.rows.map(dataRow));
  }
  messages.push(commandComplete(outcome.tag));
  return messages;
}

/** A ConsoleError as the client's ErrorResponse; anything else as an internal error, without its text. */
function failure(error: unknown): Buffer {
  if (error instanceof ConsoleError) {
    return errorResponse({ severity: 'ERROR', code: error.sqlstate, message: error.message, ...(error.hint !== undefined ? { hint: error.hint } : {}) });
  }
  return errorResponse({ severity: 'ERROR', code: 'XX000', message: 'the console command failed unexpectedly; see the proxy log' });
}
