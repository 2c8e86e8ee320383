/** One configured target made ready to serve: its proxy options, its token source and, for a database named in the workspace, its locator. */
import type { Logger } from '../ops/log.js';
import type { Settings } from '../config/properties.js';
import { resolveOAuth, resolveProxy } from '../config/target.js';
import { locatedUpstream, type ComputeLocator } from '../lakebase/locator.js';
import { createLakebaseAccess, type LakebaseAccess } from '../oauth/sources.js';
import type { ProxyOptions } from '../proxy/server.js';
import { StaticTokenSource } from '../token/static-token.js';
import type { TokenSource } from '../token/token-source.js';

export interface PreparedTarget {
  readonly options: ProxyOptions;
  readonly tokenSource: TokenSource;
  readonly locator: ComputeLocator | undefined;
}

/** The token source of a target (a fixed Password, or the OAuth flows) and its database's locator. */
export function createTargetAccess(settings: Settings, logger: Logger, onRefresh?: (result: 'success' | 'failure') => void): LakebaseAccess {
  const password = settings.string('Password');
  if (password !== undefined) return { tokenSource: new StaticTokenSource(password, undefined, 'fixed password (Password)'), locator: undefined };
  return createLakebaseAccess(resolveOAuth(settings), { logger, ...(onRefresh ? { onRefresh } : {}) }, settings.bool('ReadOnly'));
}

/** The token source of a target: a fixed Password, or the OAuth flows. */
export function createTokenSource(settings: Settings, logger: Logger, onRefresh?: (result: 'success' | 'failure') => void): TokenSource {
  return createTargetAccess(settings, logger, onRefresh).tokenSource;
}

export async function prepareTarget(settings: Settings, name: string, logger: Logger, onRefresh?: (result: 'success' | 'failure') => void): Promise<PreparedTarget> {
  const resolved = await resolveProxy(settings, name);
  if (settings.bool('ReadOnly') && resolved.upstream.host !== '') {
    throw settings.error('ReadOnly', 'applies only to a host looked up by LakebaseInstance or LakebaseEndpoint; with Server set, put the read-only host in Server');
  }
  const { tokenSource, locator } = createTargetAccess(settings, logger, onRefresh);
  if (resolved.upstream.host !== '') return { options: resolved, tokenSource, locator };
  if (locator === undefined) {
    await tokenSource.close();
    throw settings.error('Server', 'missing: with Password (a native Postgres role) there is no workspace token to look up the host of LakebaseInstance or LakebaseEndpoint; set Server');
  }
  return { options: { ...resolved, upstream: locatedUpstream(resolved.upstream, locator) }, tokenSource, locator };
}
