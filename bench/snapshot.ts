/**
 * Freezes the current build of the program (dist/src, bin, package.json) into a folder, so that a
 * later run can measure it side by side with the changed relay:
 *   node dist/bench/snapshot.js before-change      # prints the --variant to pass to run.js
 * The copy shares node_modules by a symlink. Default folder: $TMPDIR/lakebase-proxy-bench-variants.
 */
import { cpSync, existsSync, mkdirSync, rmSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));

export function snapshot(name: string, base = join(tmpdir(), 'lakebase-proxy-bench-variants')): string {
  if (!/^[\w.-]+$/.test(name)) throw new Error(`snapshot name "${name}": letters, digits, . _ - only`);
  const target = join(base, name);
  rmSync(target, { recursive: true, force: true });
  mkdirSync(join(target, 'dist'), { recursive: true });
  cpSync(join(ROOT, 'dist', 'src'), join(target, 'dist', 'src'), { recursive: true });
  cpSync(join(ROOT, 'bin'), join(target, 'bin'), { recursive: true });
  cpSync(join(ROOT, 'package.json'), join(target, 'package.json'));
  if (!existsSync(join(target, 'node_modules'))) symlinkSync(join(ROOT, 'node_modules'), join(target, 'node_modules'));
  return join(target, 'bin', 'lakebase-proxy.js');
}

const name = process.argv[2];
if (name !== undefined && process.argv[1]?.endsWith('snapshot.js')) {
  const script = snapshot(name, process.argv[3]);
  process.stdout.write(`--variant ${name}=${script}\n`);
}
