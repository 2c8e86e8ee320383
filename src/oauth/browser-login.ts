/**
 * The browser step of the authorization-code flow: a one-shot HTTP server on CallbackURL that
 * waits for the redirect carrying `code` and `state`. A request with the wrong state is answered
 * 400 and ignored (it cannot belong to this login); an `error` from the authorization server ends
 * the login.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import * as oidc from 'openid-client';
import type { Logger } from '../ops/log.js';
import { TokenError } from '../token/token-source.js';
import type { IssuedTokens, WorkspaceClient } from './workspace-client.js';

export interface BrowserLoginOptions {
  /** CallbackURL, e.g. `http://localhost:8020`; port 0 picks a free port. */
  readonly callbackUrl: string;
  readonly timeoutMs: number;
  /** Called once with the URL the person must open. */
  readonly onUrl: (url: string) => void;
  readonly logger: Logger;
  readonly signal?: AbortSignal | undefined;
}

/** Runs a whole browser login: callback server, authorize URL, wait for the code, exchange it. */
export async function browserLogin(client: WorkspaceClient, options: BrowserLoginOptions): Promise<IssuedTokens> {
  const callback = await CallbackServer.start(options.callbackUrl);
  try {
    const codeVerifier = oidc.randomPKCECodeVerifier();
    const state = oidc.randomState();
    const url = await client.authorizationUrl(callback.redirectUri, state, await oidc.calculatePKCECodeChallenge(codeVerifier));
    options.logger.info({ url: url.href, callbackUrl: callback.redirectUri }, 'browser login started; waiting for the callback');
    options.onUrl(url.href);
    const code = await callback.waitForCode(state, options.timeoutMs, options.signal);
    return await client.exchangeCode(code, codeVerifier, callback.redirectUri);
  } finally {
    await callback.close();
  }
}

interface Waiter {
  readonly state: string;
  resolve(code: string): void;
  reject(error: TokenError): void;
}

export class CallbackServer {
  readonly redirectUri: string;
  readonly #servers: Server[];
  readonly #path: string;
  #waiter: Waiter | undefined;

  private constructor(servers: Server[], redirectUri: string, path: string) {
    this.#servers = servers;
    this.redirectUri = redirectUri;
    this.#path = path;
    for (const server of servers) server.on('request', (req, res) => this.#handle(req, res));
  }

  /**
   * Listens where CallbackURL points. `localhost` listens on both 127.0.0.1 and ::1 (when there is
   * IPv6) because the browser may try either. The redirect URI keeps CallbackURL's spelling, with
   * the real port when it asked for port 0.
   */
  static async start(callbackUrl: string): Promise<CallbackServer> {
    let url: URL;
    try {
      url = new URL(callbackUrl);
    } catch {
      throw new TokenError('login_required', `CallbackURL "${callbackUrl}" is not a URL`);
    }
    if (url.protocol !== 'http:') {
      throw new TokenError('login_required', `CallbackURL must be an http:// URL on this machine (got ${url.protocol}//)`);
    }
    const host = url.hostname.replace(/^\[|\]$/g, '');
    const wanted = Number(url.port || 80);
    const hosts = host === 'localhost' ? ['127.0.0.1', '::1'] : [host];
    const servers: Server[] = [];
    let port = wanted;
    try {
      for (const [index, address] of hosts.entries()) {
        const server = createServer();
        try {
          port = await listen(server, port, address);
          servers.push(server);
        } catch (err) {
          // ::1 is optional for localhost (a host without IPv6); the first address is not.
          if (index === 0) throw err;
        }
      }
    } catch (err) {
      await Promise.all(servers.map(closeServer));
      const code = (err as { code?: unknown }).code;
      throw new TokenError(
        'login_required',
        `cannot receive the login callback on ${url.origin} (${typeof code === 'string' ? code : 'error'}): ${code === 'EADDRINUSE' ? 'the port is in use; ' : ''}set CallbackURL to a free local port`,
      );
    }
    const redirect = new URL(callbackUrl);
    redirect.port = wanted === 0 ? String(port) : redirect.port;
    // Keep CallbackURL exactly as written (no trailing slash added) unless the port changed.
    const redirectUri = wanted === 0 ? sameSlash(redirect.href, callbackUrl) : callbackUrl;
    return new CallbackServer(servers, redirectUri, url.pathname);
  }

  /** The code of the redirect with this state; a TokenError on timeout, abort or an error redirect. */
  waitForCode(state: string, timeoutMs: number, signal?: AbortSignal): Promise<string> {
    return new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => {
        finish();
        reject(
          new TokenError(
            'login_timeout',
            `no browser login completed within ${Math.round(timeoutMs / 1000)} s: connect again for a new login URL, or run \`lakebase-proxy auth login\``,
          ),
        );
      }, timeoutMs);
      const onAbort = () => {
        finish();
        reject(new TokenError('login_required', 'the browser login was cancelled'));
      };
      const finish = () => {
        clearTimeout(timer);
        signal?.removeEventListener('abort', onAbort);
        this.#waiter = undefined;
      };
      if (signal?.aborted) {
        onAbort();
        return;
      }
      signal?.addEventListener('abort', onAbort, { once: true });
      this.#waiter = {
        state,
        resolve: (code) => {
          finish();
          resolve(code);
        },
        reject: (error) => {
          finish();
          reject(error);
        },
      };
    });
  }

  async close(): Promise<void> {
    await Promise.all(this.#servers.map(closeServer));
  }

  #handle(req: IncomingMessage, res: ServerResponse): void {
    const url = new URL(req.url ?? '/', 'http://callback');
    if (req.method !== 'GET' || url.pathname !== this.#path) {
      page(res, 404, 'Not found', 'This is the lakebase-proxy login callback.');
      return;
    }
    const waiter = this.#waiter;
    const params = url.searchParams;
    if (!waiter || params.get('state') !== waiter.state) {
      page(res, 400, 'Login not recognised', 'This callback does not belong to the login in progress. Start the login again.');
      return;
    }
    const error = params.get('error');
    if (error) {
      const description = params.get('error_description');
      page(res, 400, 'Login failed', `The workspace answered: ${error}${description ? ` (${description})` : ''}.`);
      waiter.reject(new TokenError('login_required', `the browser login failed: ${error}${description ? ` (${description.slice(0, 200)})` : ''}`));
      return;
    }
    const code = params.get('code');
    if (!code) {
      page(res, 400, 'Login failed', 'The callback carried no authorization code.');
      return;
    }
    page(res, 200, 'Logged in', 'lakebase-proxy has the login. You can close this window.');
    waiter.resolve(code);
  }
}

function page(res: ServerResponse, status: number, title: string, text: string): void {
  const escape = (s: string) => s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
  res.writeHead(status, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store', connection: 'close' });
  res.end(`<!doctype html><meta charset="utf-8"><title>${escape(title)}</title><h1>${escape(title)}</h1><p>${escape(text)}</p>\n`);
}

function listen(server: Server, port: number, host: string): Promise<number> {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      server.off('error', reject);
      resolve((server.address() as AddressInfo).port);
    });
  });
}

function closeServer(server: Server): Promise<void> {
  return new Promise((resolve) => {
    server.close(() => resolve());
    server.closeAllConnections();
  });
}

/** `href` without the slash URL adds after a bare origin, when `original` had none. */
function sameSlash(href: string, original: string): string {
  return new URL(original).pathname === '/' && !original.endsWith('/') ? href.replace(/\/$/, '') : href;
}
