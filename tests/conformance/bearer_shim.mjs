// A forwarding HTTP proxy that adds `Authorization: Bearer <token>`, for host/tests/conformance.rs:
// the conformance suite's CLI cannot send a bearer token, so it talks to this shim, which talks to
// the gateway. Every request is forwarded as it came (method, path, query, headers, Host
// included, so the gateway sees the Host and Origin the suite chose) with the Authorization
// header replaced; request and response bodies are streamed both ways, chunk by chunk, so SSE
// streams flow as they are written. Hop-by-hop headers are dropped. When the client goes away the
// upstream request is torn down (a GET stream never outlives its client).
//
// It must never rewrite a body or a header other than Authorization and the hop-by-hop ones.
//
// Usage: INTENTGATE_SHIM_TOKEN=<token> node bearer_shim.mjs <target origin, e.g. http://127.0.0.1:8080> [PORT]
// Prints `PORT <n>` on stdout once listening on 127.0.0.1; exits when its stdin closes.
import http from 'node:http';

const target = new URL(process.argv[2] ?? '');
const token = process.env.INTENTGATE_SHIM_TOKEN ?? '';
if (!token) {
  console.error('INTENTGATE_SHIM_TOKEN is not set');
  process.exit(2);
}

const HOP_BY_HOP = new Set([
  'connection',
  'keep-alive',
  'proxy-authenticate',
  'proxy-authorization',
  'proxy-connection',
  'te',
  'trailer',
  'transfer-encoding',
  'upgrade',
]);

/** Raw header pairs without the hop-by-hop ones (and without those named in `drop`). */
function forwardable(raw, drop = []) {
  const out = [];
  for (let i = 0; i + 1 < raw.length; i += 2) {
    const name = raw[i].toLowerCase();
    if (!HOP_BY_HOP.has(name) && !drop.includes(name)) out.push(raw[i], raw[i + 1]);
  }
  return out;
}

const agent = new http.Agent({ keepAlive: false });

const server = http.createServer((req, res) => {
  const headers = forwardable(req.rawHeaders, ['authorization']);
  headers.push('Authorization', `Bearer ${token}`);
  const upstream = http.request({
    agent,
    protocol: target.protocol,
    hostname: target.hostname,
    port: target.port,
    method: req.method,
    path: req.url,
    headers,
    setHost: false,
  });
  upstream.on('response', (up) => {
    res.writeHead(up.statusCode ?? 502, up.statusMessage, forwardable(up.rawHeaders));
    res.flushHeaders();
    up.on('data', (chunk) => res.write(chunk));
    up.on('end', () => res.end());
    up.on('error', () => res.destroy());
  });
  upstream.on('error', (e) => {
    if (!res.headersSent) {
      res.writeHead(502, { 'content-type': 'text/plain' });
      res.end(`bearer_shim: ${e.message}\n`);
    } else {
      res.destroy();
    }
  });
  res.on('close', () => upstream.destroy());
  req.pipe(upstream);
});

server.listen(Number(process.argv[3] ?? 0), '127.0.0.1', () => {
  process.stdout.write(`PORT ${server.address().port}\n`);
});
process.stdin.on('end', () => process.exit(0));
process.stdin.resume();
