// Module resolve hook (registered by register.mjs on Node < 22): `fs` and `node:fs`, imported by
// anything but fs.mjs itself, resolve to fs.mjs. It must change no other specifier.
const shim = new URL('./fs.mjs', import.meta.url).href;

export async function resolve(specifier, context, nextResolve) {
  if ((specifier === 'fs' || specifier === 'node:fs') && context.parentURL !== shim) {
    return { url: shim, shortCircuit: true };
  }
  return nextResolve(specifier, context);
}
