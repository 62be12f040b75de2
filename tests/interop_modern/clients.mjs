#!/usr/bin/env node
// The official TypeScript MCP clients driven through the gateway, for host/tests/mcp_eras.rs.
//
//   node tests/interop_modern/clients.mjs check
//   node tests/interop_modern/clients.mjs run --client v1|v2 --mode legacy|auto|pin \
//        --gateway URL --token TOKEN STEPS_JSON
//
// v1 is @modelcontextprotocol/sdk (handshake era only); v2 is @modelcontextprotocol/client,
// whose `versionNegotiation.mode` is 'legacy' (its default), 'auto' (server/discover probe,
// then fallback) or { pin: '2026-07-28' } ("pin"). STEPS_JSON is a list of {"op": "list"},
// {"op": "call", "tool", "args"}, {"op": "resources"}, {"op": "templates"}, {"op": "prompts"},
// {"op": "read", "uri"}, {"op": "prompt", "name", "args"} and {"op": "complete", "ref",
// "argument"} (ref as on the wire); a call with "progress": true records the progress values
// it received. The client declares sampling and form elicitation: it answers sampling with the
// text "sampled by CLIENT MODE" and accepts every elicitation with each boolean of the form true
// (during a call, or in a 2026-07-28 input-required round, which v2 answers by itself). Prints
// one JSON line: {"client", "mode", "era", "protocol_version", "sampled" (the prompts it was
// asked to complete), "elicitations" (their messages), "results": [...]}, where a refused
// operation is {"op", "ok": false, "code", "message"}. Exit 0 whenever the line was printed, 2 for bad
// arguments, 3 when the packages are missing (run tests/interop_modern/setup.sh).

import { readFileSync } from 'node:fs';

const HINT = 'run: bash tests/interop_modern/setup.sh';

function version(pkg) {
  const url = new URL(`./node_modules/${pkg}/package.json`, import.meta.url);
  return JSON.parse(readFileSync(url, 'utf8')).version;
}

async function load(client) {
  try {
    if (client === 'v1') {
      const { Client } = await import('@modelcontextprotocol/sdk/client/index.js');
      const { StreamableHTTPClientTransport } = await import(
        '@modelcontextprotocol/sdk/client/streamableHttp.js'
      );
      const { CreateMessageRequestSchema, ElicitRequestSchema } = await import(
        '@modelcontextprotocol/sdk/types.js'
      );
      // v1 registers handlers by request schema, v2 by method name.
      const schemas = {
        'sampling/createMessage': CreateMessageRequestSchema,
        'elicitation/create': ElicitRequestSchema,
      };
      return { Client, StreamableHTTPClientTransport, handlerKey: (m) => schemas[m] };
    }
    return { ...(await import('@modelcontextprotocol/client')), handlerKey: (m) => m };
  } catch (e) {
    console.error(`clients.mjs: cannot load the ${client} client (${e.message}); ${HINT}`);
    process.exit(3);
  }
}

function failure(op, e) {
  return {
    op,
    ok: false,
    code: typeof e?.code === 'number' ? e.code : null,
    message: String(e?.message ?? e),
    exception: e?.constructor?.name ?? typeof e,
  };
}

async function run(opts, steps) {
  const { Client, StreamableHTTPClientTransport, handlerKey } = await load(opts.client);
  const info = { name: 'intentgate-interop-ts', version: '0.0.0' };
  // The client can be asked for sampling and (form) elicitation.
  let options = { capabilities: { sampling: {}, elicitation: { form: {} } } };
  if (opts.client === 'v2') {
    const mode = opts.mode === 'pin' ? { pin: '2026-07-28' } : opts.mode;
    options = { ...options, versionNegotiation: { mode } };
  }
  const client = new Client(info, options);
  const asked = { sampled: [], elicitations: [] };
  client.setRequestHandler(handlerKey('sampling/createMessage'), async (request) => {
    const texts = (request.params.messages ?? []).map((m) => m.content?.text ?? '');
    asked.sampled.push(texts.filter(Boolean).join(' '));
    return {
      model: 'intentgate-fixed-model',
      role: 'assistant',
      content: { type: 'text', text: `sampled by ${opts.client} ${opts.mode}` },
    };
  });
  client.setRequestHandler(handlerKey('elicitation/create'), async (request) => {
    asked.elicitations.push(request.params.message ?? '');
    // Every boolean the form asks for is true ({"ok": true}, {"confirm": true}, ...).
    const props = request.params.requestedSchema?.properties ?? {};
    const content = Object.fromEntries(
      Object.entries(props)
        .filter(([, v]) => v?.type === 'boolean')
        .map(([k]) => [k, true]),
    );
    return { action: 'accept', content: Object.keys(content).length ? content : { ok: true } };
  });
  const transport = new StreamableHTTPClientTransport(new URL(`${opts.gateway}/v1/mcp`), {
    requestInit: { headers: { Authorization: `Bearer ${opts.token}` } },
  });
  const out = { client: opts.client, mode: opts.mode, results: [], ...asked };
  try {
    await client.connect(transport);
  } catch (e) {
    out.results.push(failure('connect', e));
    return out;
  }
  out.era = typeof client.getProtocolEra === 'function' ? client.getProtocolEra() ?? null : 'legacy';
  out.protocol_version =
    typeof client.getNegotiatedProtocolVersion === 'function'
      ? client.getNegotiatedProtocolVersion() ?? null
      : null;
  for (const step of steps) {
    try {
      if (step.op === 'list') {
        const r = await client.listTools();
        out.results.push({ op: 'list', ok: true, tools: r.tools.map((t) => t.name).sort() });
      } else if (step.op === 'resources') {
        const r = await client.listResources();
        out.results.push({ op: step.op, ok: true, uris: r.resources.map((x) => x.uri).sort() });
      } else if (step.op === 'templates') {
        const r = await client.listResourceTemplates();
        out.results.push({
          op: step.op,
          ok: true,
          templates: r.resourceTemplates.map((x) => x.uriTemplate).sort(),
        });
      } else if (step.op === 'prompts') {
        const r = await client.listPrompts();
        out.results.push({ op: step.op, ok: true, prompts: r.prompts.map((x) => x.name).sort() });
      } else if (step.op === 'read') {
        const r = await client.readResource({ uri: step.uri });
        out.results.push({
          op: step.op,
          ok: true,
          uri: step.uri,
          text: (r.contents ?? []).map((c) => c.text ?? null),
        });
      } else if (step.op === 'prompt') {
        const r = await client.getPrompt({ name: step.name, arguments: step.args ?? {} });
        out.results.push({
          op: step.op,
          ok: true,
          name: step.name,
          text: (r.messages ?? []).map((m) => m.content?.text ?? null),
        });
      } else if (step.op === 'complete') {
        const r = await client.complete({ ref: step.ref, argument: step.argument });
        out.results.push({ op: step.op, ok: true, values: r.completion.values });
      } else if (step.op === 'call') {
        const progress = [];
        const onprogress = (p) => progress.push(p.progress);
        const params = { name: step.tool, arguments: step.args ?? {} };
        const options = step.progress ? { onprogress } : undefined;
        const r =
          opts.client === 'v1'
            ? await client.callTool(params, undefined, options)
            : await client.callTool(params, options);
        out.results.push({
          op: 'call',
          ok: true,
          tool: step.tool,
          is_error: Boolean(r.isError),
          text: (r.content ?? []).map((c) => c.text ?? null),
          ...(step.progress ? { progress } : {}),
        });
      } else {
        throw new Error(`unknown op ${step.op}`);
      }
    } catch (e) {
      out.results.push(failure(step.op, e));
    }
  }
  try {
    await client.close();
  } catch {
    // a failed close must not hide the results
  }
  return out;
}

function parse(argv) {
  const opts = { client: 'v2', mode: 'legacy', gateway: '', token: '' };
  const rest = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a.startsWith('--')) {
      opts[a.slice(2)] = argv[++i];
    } else {
      rest.push(a);
    }
  }
  return { opts, rest };
}

const [cmd, ...argv] = process.argv.slice(2);
if (cmd === 'check') {
  try {
    console.log(
      JSON.stringify({
        ok: true,
        node: process.version,
        sdk: version('@modelcontextprotocol/sdk'),
        client: version('@modelcontextprotocol/client'),
      }),
    );
  } catch (e) {
    console.error(`clients.mjs: packages missing (${e.message}); ${HINT}`);
    process.exit(3);
  }
} else if (cmd === 'run') {
  const { opts, rest } = parse(argv);
  if (rest.length !== 1 || !opts.gateway) {
    console.error('usage: clients.mjs run --client v1|v2 --mode M --gateway URL --token T STEPS');
    process.exit(2);
  }
  const out = await run(opts, JSON.parse(rest[0]));
  console.log(JSON.stringify(out));
  process.exit(0);
} else {
  console.error('usage: clients.mjs check | run ...');
  process.exit(2);
}
