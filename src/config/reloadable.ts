/**
 * Settings that a RELOAD (or SIGHUP) applies to a running target or to the process. A change to
 * any other setting of a running target needs a restart: the reload says which and keeps the
 * running value. (Targets added or removed by a reload start or drain whatever their settings.)
 */
export const RELOADABLE: ReadonlySet<string> = new Set([
  // A target's pools, limits and timeouts, and how its clients authenticate (files read again).
  'PoolSize',
  'MinPoolSize',
  'QueryWaitTimeout',
  'ServerResetQuery',
  'ServerLifetime',
  'ServerIdleTimeout',
  'ServerCheckDelay',
  'MaxPreparedStatements',
  'IdleTimeout',
  'MaxConnections',
  'MaxStartups',
  'StartupTimeout',
  'ClientAuth',
  'ClientUsers',
  'TLSCert',
  'TLSKey',
  'AllowInsecureListen',
  // The process's.
  'AdminUsers',
  'NoPgBouncerAlias',
]);
