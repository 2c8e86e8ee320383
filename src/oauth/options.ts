/**
 * The OAuth properties of one target, as the seed connector names them. The configuration layer
 * (src/config) fills this from the connection string, flags and, later, files and environment;
 * keys are case-insensitive there, values are already validated for type and enum here.
 */
export interface OAuthOptions {
  /** Workspace host or URL, e.g. `dbc-xxxx.cloud.databricks.com` or `https://adb-1.2.azuredatabricks.net`. */
  readonly databricksInstance: string | undefined;
  readonly authScheme: 'OAuthClient' | 'OAuthPKCE' | 'DatabricksCli' | 'PersonalAccessToken';
  readonly initiateOAuth: 'GETANDREFRESH' | 'REFRESH' | 'OFF';
  readonly clientId: string | undefined;
  readonly clientSecret: string | undefined;
  readonly accessToken: string | undefined;
  /** A personal access token (PersonalAccessToken): a bearer token for the workspace API. */
  readonly personalAccessToken: string | undefined;
  /** The ~/.databrickscfg profile, for `databricks auth token --profile` (AuthScheme=DatabricksCli). */
  readonly profile: string | undefined;
  readonly refreshToken: string | undefined;
  /** The `code` from a callback URL, for the headless flow (OAuthVerifier). */
  readonly verifier: string | undefined;
  /** Default `http://localhost:8020`. */
  readonly callbackUrl: string;
  /** Undefined means the scheme's default (`all-apis`, or `all-apis offline_access` for PKCE). */
  readonly scope: string | undefined;
  /** A file path, or `memory://`. Undefined means the default file in the user's config folder. */
  readonly settingsLocation: string | undefined;
  readonly lakebaseInstance: string | undefined;
  readonly lakebaseEndpoint: string | undefined;
  /** The upstream identity; for OAuthClient it defaults to the client id. */
  readonly user: string | undefined;
  /** Bound on every HTTP request to the workspace, in milliseconds. Default 30,000. */
  readonly requestTimeoutMs: number;
  /** How long a connecting client waits for a browser login to complete. Default 300,000. */
  readonly loginTimeoutMs: number;
  /** Where a setting's value came from (the command line, a variable, a file, a profile), for error advice. */
  readonly sourceOf?: (setting: string) => string | undefined;
}
