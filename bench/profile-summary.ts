/**
 * Summarizes V8 CPU profiles (`node --cpu-prof`): self time per function and per area (the
 * proxy's own code, Node's internals, dependencies, GC, idle), so the README can say where the
 * relay spends its time. Usage: node dist/bench/profile-summary.js FILE_OR_DIR [TOP]
 */
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  children?: number[];
}

interface CpuProfile {
  nodes: ProfileNode[];
  samples: number[];
  timeDeltas: number[];
}

function area(url: string, name: string): string {
  if (name === '(idle)') return 'idle (waiting in epoll)';
  if (name === '(garbage collector)') return 'garbage collector';
  if (name === '(program)') return 'native, outside JS (libuv, OpenSSL, syscalls)';
  if (url.startsWith('node:')) return 'Node.js internals (streams, net, tls)';
  if (url.includes('/node_modules/')) return 'dependencies';
  if (url.includes('/dist/src/')) return 'the proxy (dist/src)';
  return url === '' ? 'native, called from JS' : 'other';
}

export function summarize(profile: CpuProfile, top = 25): string {
  const byId = new Map(profile.nodes.map((node) => [node.id, node]));
  const self = new Map<number, number>();
  for (let i = 0; i < profile.samples.length; i++) {
    const id = profile.samples[i] as number;
    self.set(id, (self.get(id) ?? 0) + (profile.timeDeltas[i] ?? 0));
  }
  const total = [...self.values()].reduce((a, b) => a + b, 0);
  const busy = [...self.entries()].filter(([id]) => byId.get(id)?.callFrame.functionName !== '(idle)').reduce((a, [, t]) => a + t, 0);
  const perFunction = new Map<string, number>();
  const perArea = new Map<string, number>();
  for (const [id, time] of self) {
    const node = byId.get(id);
    if (!node) continue;
    const { functionName, url, lineNumber } = node.callFrame;
    const name = functionName || '(anonymous)';
    const where = url ? `${url.replace(/^.*\/(dist|node_modules)\//, '$1/')}:${lineNumber + 1}` : '';
    const key = `${name}${where ? ` ${where}` : ''}`;
    perFunction.set(key, (perFunction.get(key) ?? 0) + time);
    const a = area(url, name);
    perArea.set(a, (perArea.get(a) ?? 0) + time);
  }
  const pct = (t: number, of: number): string => `${((100 * t) / of).toFixed(1).padStart(5)}%`;
  const lines = [`profile: ${(total / 1e6).toFixed(1)} s sampled, ${(busy / 1e6).toFixed(1)} s busy (${pct(busy, total).trim()})`, '', 'by area (share of busy time):'];
  for (const [name, time] of [...perArea].sort((a, b) => b[1] - a[1])) {
    if (name.startsWith('idle')) continue;
    lines.push(`  ${pct(time, busy)}  ${name}`);
  }
  lines.push('', `top ${top} functions by self time (share of busy time):`);
  for (const [name, time] of [...perFunction].filter(([n]) => !n.startsWith('(idle)')).sort((a, b) => b[1] - a[1]).slice(0, top)) {
    lines.push(`  ${pct(time, busy)}  ${name}`);
  }
  return lines.join('\n');
}

function files(path: string): string[] {
  if (!statSync(path).isDirectory()) return [path];
  return readdirSync(path)
    .filter((f) => f.endsWith('.cpuprofile'))
    .map((f) => join(path, f));
}

if (process.argv[1]?.endsWith('profile-summary.js')) {
  const target = process.argv[2];
  if (!target) {
    process.stderr.write('usage: node dist/bench/profile-summary.js FILE_OR_DIR [TOP]\n');
    process.exit(2);
  }
  for (const file of files(target)) {
    process.stdout.write(`== ${file}\n${summarize(JSON.parse(readFileSync(file, 'utf8')) as CpuProfile, Number(process.argv[3] ?? 25))}\n\n`);
  }
}
