/**
 * The OAuth side of the proxy, for the rest of the program: the token source the relay asks for a
 * password at each client login, and the `auth` commands. See sources.ts for the flows.
 */
export { checkOAuthSettings, createTokenSource, type TokenSourceDeps } from './sources.js';
export { AUTH_HELP, runAuthCommand, type AuthCommandIO } from './commands.js';
export { defaultSettingsPath, MEMORY_LOCATION, SETTINGS_FILE_NAME } from './settings-store.js';
export { LOGIN_NOTICE_PREFIX } from './workspace-token.js';
