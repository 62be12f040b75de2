// Loaded with `node --import ./node20/register.mjs` before the conformance suite's CLI, which
// imports `globSync` from `fs` (Node 22+). On Node 20 that named import fails at link time, and a
// built-in's ES facade cannot gain a name later, so this registers a resolve hook (hooks.mjs) that
// hands importers of `fs` the module fs.mjs: every export of the real `fs` plus a minimal globSync.
// On a Node that has fs.globSync it registers nothing.
import fs from 'node:fs';
import { register } from 'node:module';

if (typeof fs.globSync !== 'function') {
  register('./hooks.mjs', import.meta.url);
}
