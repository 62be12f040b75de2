// The real `fs` plus globSync, for Node 20 (see register.mjs). The conformance suite uses globSync
// only as `globSync('**/checks.json', { cwd })` (tier-check); this one supports `*`, `?` and `**/`
// segments relative to `cwd`, returns relative paths, and nothing more (no braces, classes,
// negation or other options).
import fs from 'node:fs';
import path from 'node:path';

export * from 'node:fs';
export default fs;

function toRegExp(pattern) {
  let re = '';
  for (let i = 0; i < pattern.length; i++) {
    const c = pattern[i];
    if (c === '*' && pattern[i + 1] === '*' && pattern[i + 2] === '/') {
      re += '(?:[^/]*/)*';
      i += 2;
    } else if (c === '*' && pattern[i + 1] === '*') {
      re += '.*';
      i += 1;
    } else if (c === '*') {
      re += '[^/]*';
    } else if (c === '?') {
      re += '[^/]';
    } else {
      re += c.replace(/[.+^${}()|[\]\\]/g, '\\$&');
    }
  }
  return new RegExp(`^${re}$`);
}

function walk(root, rel, out) {
  let entries;
  try {
    entries = fs.readdirSync(path.join(root, rel), { withFileTypes: true });
  } catch {
    return;
  }
  for (const e of entries) {
    const p = rel ? `${rel}/${e.name}` : e.name;
    out.push(p);
    if (e.isDirectory()) walk(root, p, out);
  }
}

export function globSync(pattern, options = {}) {
  const cwd = options.cwd ? String(options.cwd) : process.cwd();
  const res = (Array.isArray(pattern) ? pattern : [pattern]).map(toRegExp);
  const all = [];
  walk(cwd, '', all);
  return all.filter((p) => res.some((r) => r.test(p))).map((p) => p.split('/').join(path.sep));
}
