/**
 * Which targets share a listener: those with the same ListenAddress and ListenPort (0, a free
 * port each, never shares). A shared port selects the target by the client's database name, so
 * its targets must be named in the config file, and the listener's own settings must be the same
 * for all of them: the client is authenticated before its database name picks the target.
 */
import type { Target } from './load.js';
import { ConfigError } from './properties.js';

/** Settings of the listener rather than of a target. */
const LISTENER_SETTINGS = ['UnixSocket', 'UnixSocketMode', 'TLSCert', 'TLSKey', 'ClientAuth', 'ClientUsers', 'StartupTimeout', 'AllowInsecureListen'];

/** The targets, grouped by the listener they share (as indexes into `targets`, in order); checks each group. */
export function listenerGroups(targets: readonly Target[]): number[][] {
  const groups = new Map<string, number[]>();
  targets.forEach((target, index) => {
    const port = target.settings.int('ListenPort');
    const key = port === 0 ? `#${index}` : `${target.settings.string('ListenAddress')}:${port}`;
    groups.set(key, [...(groups.get(key) ?? []), index]);
  });
  for (const [where, group] of groups) {
    if (group.length > 1) check(where, group.map((i) => targets[i] as Target));
  }
  return [...groups.values()];
}

function check(where: string, group: readonly Target[]): void {
  const names = group.map((t) => t.name).join(', ');
  const unnamed = group.filter((t) => !t.named);
  if (unnamed.length > 0) {
    throw new ConfigError(
      `ListenPort: targets ${names} would all listen on ${where}; give each its own ListenPort, or name them in a config file's targets (name: ...) so that clients select one by database name`,
    );
  }
  const first = group[0] as Target;
  for (const setting of LISTENER_SETTINGS) {
    const other = group.find((t) => t.settings.string(setting) !== first.settings.string(setting));
    if (other) {
      throw new ConfigError(
        `${setting}: targets ${first.name} and ${other.name} share ${where} but not their ${setting}; a shared port has one listener, so set it once for all of them (at the top of the config file)`,
      );
    }
  }
}
