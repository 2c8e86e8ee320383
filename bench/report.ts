/** The benchmark's table: figures per path, the ratios that the targets speak of, the change since last run. */
import type { BenchResult, Metric } from './benchmark.js';

function format(value: number | undefined, unit: string): string {
  if (value === undefined || !Number.isFinite(value)) return '-';
  switch (unit) {
    case 'tps':
    case 'sessions':
      return Math.round(value).toLocaleString('en-US');
    case 'MB/s':
      return value.toFixed(0);
    case 'ms':
      return value.toFixed(2);
    default:
      return value.toFixed(1);
  }
}

function ratio(metric: Metric, a: string, b: string): string {
  const x = metric.values[a];
  const y = metric.values[b];
  if (x === undefined || y === undefined || !Number.isFinite(x) || !Number.isFinite(y) || y === 0) return '-';
  return (x / y).toFixed(2);
}

function change(now: number | undefined, before: number | undefined): string {
  if (now === undefined || before === undefined || !Number.isFinite(now) || !Number.isFinite(before) || before === 0) return '-';
  const percent = ((now - before) / before) * 100;
  return `${percent >= 0 ? '+' : ''}${percent.toFixed(1)}%`;
}

function table(rows: string[][]): string {
  const widths = rows[0]?.map((_, column) => Math.max(...rows.map((row) => (row[column] ?? '').length))) ?? [];
  return rows
    .map((row, index) => {
      const line = row.map((cell, column) => (column === 0 ? cell.padEnd(widths[column] ?? 0) : cell.padStart(widths[column] ?? 0))).join('  ');
      return index === 0 ? `${line}\n${widths.map((w) => '-'.repeat(w)).join('  ')}` : line;
    })
    .join('\n');
}

/** The report printed at the end of a run; `previous` adds the change of the proxy's figures. */
export function formatReport(result: BenchResult, previous?: BenchResult): string {
  const paths = result.paths;
  const variants = paths.filter((p) => !['proxy', 'direct', 'pgbouncer'].includes(p));
  const hasBouncer = paths.includes('pgbouncer');
  const header = [
    'metric',
    'unit',
    ...paths,
    'proxy/direct',
    ...(hasBouncer ? ['proxy/PgBouncer'] : []),
    ...variants.map((v) => `proxy/${v}`),
    ...(previous ? ['proxy vs previous'] : []),
  ];
  const rows = [header];
  for (const metric of result.metrics) {
    const before = previous?.metrics.find((m) => m.id === metric.id);
    rows.push([
      `${metric.label}${metric.better === 'lower' ? ' (lower is better)' : ''}`,
      metric.unit,
      ...paths.map((p) => format(metric.values[p], metric.unit)),
      ratio(metric, 'proxy', 'direct'),
      ...(hasBouncer ? [ratio(metric, 'proxy', 'pgbouncer')] : []),
      ...variants.map((v) => ratio(metric, 'proxy', v)),
      ...(previous ? [change(metric.values['proxy'], before?.values['proxy'])] : []),
    ]);
  }
  const lines = [
    `lakebase-proxy benchmark${result.quick ? ' (quick smoke run: indicative only)' : ''}, ${result.startedAt}, ${result.seconds.toFixed(0)} s`,
    `machine: ${Object.entries(result.machine).map(([k, v]) => `${k} ${v}`).join(', ')}`,
    `settings: ${Object.entries(result.settings).map(([k, v]) => `${k} ${v}`).join(', ')}`,
    '',
    table(rows),
  ];
  const scale = Object.entries(result.scale);
  if (scale.length > 0) {
    lines.push('');
    for (const [name, s] of scale) {
      lines.push(
        `scale ${name}: ${s.opened}/${s.asked} opened in ${s.openSeconds.toFixed(1)} s, ${s.alive} answered SELECT 1, ${s.errors} errors, ` +
          `RSS ${(s.rssBeforeKiB / 1024).toFixed(1)} -> ${(s.rssHalfKiB / 1024).toFixed(1)} (half) -> ${(s.rssAfterKiB / 1024).toFixed(1)} MiB`,
      );
    }
  }
  if (result.targets.length > 0) {
    lines.push('', 'targets (issue 5):');
    for (const t of result.targets) lines.push(`  ${t.met ? 'met    ' : 'NOT met'}  ${t.target}: ${t.actual}`);
  }
  if (previous) {
    lines.push('', `change vs previous run (${previous.startedAt}${previous.quick !== result.quick ? `, ${previous.quick ? 'quick' : 'full'} run` : ''}), every path:`);
    for (const metric of result.metrics) {
      const before = previous.metrics.find((m) => m.id === metric.id);
      if (!before) continue;
      const parts = paths.filter((p) => before.values[p] !== undefined).map((p) => `${p} ${change(metric.values[p], before.values[p])}`);
      if (parts.length > 0) lines.push(`  ${metric.label}: ${parts.join(', ')}`);
    }
  }
  if (result.notes.length > 0) {
    lines.push('', 'notes:');
    for (const note of result.notes) lines.push(`  - ${note}`);
  }
  return `${lines.join('\n')}\n`;
}
