// The upstream of host/tests/conformance.rs: an MCP server written with the official TypeScript
// SDK v2 (@modelcontextprotocol/server, pinned in package.json) that implements what the official
// conformance suite's server scenarios exercise, for both protocol revisions on one endpoint:
//
//   - 2025-era requests (no per-request `_meta` envelope): the SDK's sessionful streamable HTTP
//     transport, one McpServer per session (initialize handshake, Mcp-Session-Id, GET stream,
//     DELETE, SSE resumability), so server-to-client requests (sampling, elicitation) and
//     notifications (progress, log messages) travel over the POST's SSE stream;
//   - 2026-07-28 requests: the SDK's createMcpHandler (stateless, per-request McpServer,
//     server/discover, input-required results, subscriptions/listen, header validation).
//
// The tools, resources and prompts are the ones the suite's scenario descriptions name (run
// `node <conformance>/dist/index.js list --requirements <revision>` and read each scenario's
// description). Host and Origin are checked as the SDK recommends for a loopback server.
//
// Usage: node everything_server.mjs [PORT]   (0 or none: any free port). Prints `PORT <n>` on
// stdout once listening on 127.0.0.1, then serves until killed or until stdin closes (so it never
// outlives the test that started it). `node everything_server.mjs --check` only builds the servers.
import http from 'node:http';
import { randomBytes, randomUUID } from 'node:crypto';

import {
  CLIENT_CAPABILITIES_META_KEY,
  McpServer,
  ResourceTemplate,
  WebStandardStreamableHTTPServerTransport,
  createMcpHandler,
  createRequestStateCodec,
  fromJsonSchema,
  hostHeaderValidationResponse,
  inputRequired,
  inputResponse,
  isLegacyRequest,
  localhostAllowedHostnames,
  localhostAllowedOrigins,
  originValidationResponse,
} from '@modelcontextprotocol/server';
import { toNodeHandler } from '@modelcontextprotocol/node';

// A 1x1 red PNG and a minimal WAV, base64.
const PNG = 'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg==';
const WAV = 'UklGRiYAAABXQVZFZm10IBAAAAABAAEAQB8AAAB9AAACABAAZGF0YQIAAAA=';

// Every requestState this server mints is HMAC-sealed; a tampered one is refused (-32602) by the
// SDK before any handler runs.
const stateCodec = createRequestStateCodec({ key: randomBytes(32) });

const noArgs = fromJsonSchema({ type: 'object', properties: {} });
const text = (t) => ({ content: [{ type: 'text', text: t }] });

// The JSON Schema 2020-12 tool of the json-schema-2020-12 scenario (SEP-1613, SEP-2106): the
// listing must keep every keyword.
const SCHEMA_2020_12 = {
  $schema: 'https://json-schema.org/draft/2020-12/schema',
  type: 'object',
  $defs: {
    address: {
      $anchor: 'addressDef',
      type: 'object',
      properties: { street: { type: 'string' }, city: { type: 'string' } },
    },
  },
  properties: {
    name: { type: 'string' },
    address: { $ref: '#/$defs/address' },
    contactMethod: { type: 'string', enum: ['phone', 'email'] },
    phone: { type: 'string' },
    email: { type: 'string' },
  },
  allOf: [{ anyOf: [{ required: ['phone'] }, { required: ['email'] }] }],
  if: { properties: { contactMethod: { const: 'phone' } }, required: ['contactMethod'] },
  then: { required: ['phone'] },
  else: { required: ['email'] },
  additionalProperties: false,
};

const elicitName = (message) =>
  inputRequired.elicit({
    message,
    requestedSchema: { type: 'object', properties: { name: { type: 'string' } }, required: ['name'] },
  });

// The list-changed hooks of the stateless era publish on the modern handler's bus.
let notifier = null;

/** One McpServer with every registration; `era` is 'legacy' (2025) or 'modern' (2026-07-28). */
function build({ era }) {
  const server = new McpServer(
    { name: 'intentgate-conformance-upstream', version: '1.0.0' },
    {
      capabilities: {
        tools: { listChanged: true },
        resources: { subscribe: true, listChanged: true },
        prompts: { listChanged: true },
        logging: {},
        completions: {},
      },
      requestState: { verify: stateCodec.verify },
    },
  );

  const simple = (name, description, result) =>
    server.registerTool(name, { description, inputSchema: noArgs }, async () => result);

  simple('test_simple_text', 'Returns one text block', text('This is a simple text response for testing.'));
  simple('test_image_content', 'Returns one image block', {
    content: [{ type: 'image', data: PNG, mimeType: 'image/png' }],
  });
  simple('test_audio_content', 'Returns one audio block', {
    content: [{ type: 'audio', data: WAV, mimeType: 'audio/wav' }],
  });
  simple('test_embedded_resource', 'Returns one embedded resource', {
    content: [
      {
        type: 'resource',
        resource: { uri: 'test://embedded-resource', mimeType: 'text/plain', text: 'This is an embedded resource content.' },
      },
    ],
  });
  simple('test_multiple_content_types', 'Returns text, image and resource blocks', {
    content: [
      { type: 'text', text: 'Multiple content types test:' },
      { type: 'image', data: PNG, mimeType: 'image/png' },
      {
        type: 'resource',
        resource: {
          uri: 'test://mixed-content-resource',
          mimeType: 'application/json',
          text: JSON.stringify({ test: 'data', value: 123 }),
        },
      },
    ],
  });

  server.registerTool('test_error_handling', { description: 'Always fails', inputSchema: noArgs }, async () => {
    throw new Error('This tool intentionally returns an error for testing');
  });

  server.registerTool(
    'test_tool_with_logging',
    { description: 'Sends three log messages while it runs', inputSchema: noArgs },
    async (_args, ctx) => {
      for (const step of ['Tool execution started', 'Tool processing data', 'Tool execution completed']) {
        await ctx.mcpReq.notify({ method: 'notifications/message', params: { level: 'info', data: step } });
        await new Promise((r) => setTimeout(r, 50));
      }
      return text('Tool with logging executed successfully');
    },
  );

  // The stateless era's no-log-without-logLevel check: ctx.mcpReq.log honours the request's level.
  server.registerTool('test_logging_tool', { description: 'Logs through the request logger', inputSchema: noArgs }, async (_args, ctx) => {
    await ctx.mcpReq.log('info', 'test_logging_tool ran');
    return text('logged');
  });

  server.registerTool(
    'test_tool_with_progress',
    { description: 'Reports progress 0, 50, 100', inputSchema: noArgs },
    async (_args, ctx) => {
      const progressToken = ctx.mcpReq._meta?.progressToken ?? 0;
      for (const progress of [0, 50, 100]) {
        await ctx.mcpReq.notify({
          method: 'notifications/progress',
          params: { progressToken, progress, total: 100, message: `Completed step ${progress} of 100` },
        });
        if (progress < 100) await new Promise((r) => setTimeout(r, 50));
      }
      return text(String(progressToken));
    },
  );

  server.registerTool(
    'test_reconnection',
    { description: 'Closes the SSE stream mid-call (SEP-1699); the client must resume', inputSchema: noArgs },
    async (_args, ctx) => {
      ctx.http?.closeSSE?.();
      await new Promise((r) => setTimeout(r, 100));
      return text('Reconnection test completed successfully.');
    },
  );

  // 2025-era server-to-client requests over the session's streams.
  server.registerTool(
    'test_sampling',
    {
      description: 'Asks the client to sample an LLM',
      inputSchema: fromJsonSchema({ type: 'object', properties: { prompt: { type: 'string' } }, required: ['prompt'] }),
    },
    async ({ prompt }, ctx) => {
      const r = await ctx.mcpReq.requestSampling({
        messages: [{ role: 'user', content: { type: 'text', text: prompt } }],
        maxTokens: 100,
      });
      const content = Array.isArray(r.content) ? r.content[0] : r.content;
      return text(`LLM response: ${content?.text ?? 'No response'}`);
    },
  );

  const elicitTool = (name, description, inputSchema, params, prefix) =>
    server.registerTool(name, { description, inputSchema }, async (args, ctx) => {
      const r = await ctx.mcpReq.elicitInput(params(args));
      return text(`${prefix}: action=${r.action}, content=${JSON.stringify(r.content ?? {})}`);
    });

  elicitTool(
    'test_elicitation',
    'Asks the user for input',
    fromJsonSchema({ type: 'object', properties: { message: { type: 'string' } }, required: ['message'] }),
    ({ message }) => ({
      mode: 'form',
      message,
      requestedSchema: {
        type: 'object',
        properties: {
          username: { type: 'string', description: "User's response" },
          email: { type: 'string', description: "User's email address" },
        },
        required: ['username', 'email'],
      },
    }),
    'User response',
  );
  elicitTool(
    'test_elicitation_sep1034_defaults',
    'Elicitation with a default for every primitive type (SEP-1034)',
    noArgs,
    () => ({
      mode: 'form',
      message: 'Please review and update the form fields with defaults',
      requestedSchema: {
        type: 'object',
        properties: {
          name: { type: 'string', description: 'User name', default: 'John Doe' },
          age: { type: 'integer', description: 'User age', default: 30 },
          score: { type: 'number', description: 'User score', default: 95.5 },
          status: { type: 'string', description: 'User status', enum: ['active', 'inactive', 'pending'], default: 'active' },
          verified: { type: 'boolean', description: 'Verification status', default: true },
        },
        required: [],
      },
    }),
    'Elicitation completed',
  );
  elicitTool(
    'test_elicitation_sep1330_enums',
    'Elicitation with every enum form (SEP-1330)',
    noArgs,
    () => ({
      mode: 'form',
      message: 'Please select options from the enum fields',
      requestedSchema: {
        type: 'object',
        properties: {
          untitledSingle: { type: 'string', description: 'Select one option', enum: ['option1', 'option2', 'option3'] },
          titledSingle: {
            type: 'string',
            description: 'Select one option with titles',
            oneOf: [
              { const: 'value1', title: 'First Option' },
              { const: 'value2', title: 'Second Option' },
              { const: 'value3', title: 'Third Option' },
            ],
          },
          legacyEnum: {
            type: 'string',
            description: 'Select one option (legacy)',
            enum: ['opt1', 'opt2', 'opt3'],
            enumNames: ['Option One', 'Option Two', 'Option Three'],
          },
          untitledMulti: {
            type: 'array',
            description: 'Select multiple options',
            minItems: 1,
            maxItems: 3,
            items: { type: 'string', enum: ['option1', 'option2', 'option3'] },
          },
          titledMulti: {
            type: 'array',
            description: 'Select multiple options with titles',
            minItems: 1,
            maxItems: 3,
            items: {
              anyOf: [
                { const: 'value1', title: 'First Choice' },
                { const: 'value2', title: 'Second Choice' },
                { const: 'value3', title: 'Third Choice' },
              ],
            },
          },
        },
        required: [],
      },
    }),
    'Elicitation completed',
  );

  server.registerTool(
    'json_schema_2020_12_tool',
    { description: 'Tool with JSON Schema 2020-12 features', inputSchema: fromJsonSchema(SCHEMA_2020_12) },
    async (args) => text(`JSON Schema 2020-12 tool called with: ${JSON.stringify(args)}`),
  );

  // SEP-2243: a parameter mirrored into an `Mcp-Param-Region` header, checked by the SDK.
  server.registerTool(
    'test_custom_header',
    {
      description: 'Echoes a region that travels in the Mcp-Param-Region header too',
      inputSchema: fromJsonSchema({
        type: 'object',
        properties: { region: { type: 'string', 'x-mcp-header': 'Region' } },
        required: ['region'],
      }),
    },
    async ({ region }) => text(`region=${region}`),
  );

  // --- 2026-07-28: stateless-era diagnostics and input-required (multi-round) results ---------

  const declared = (ctx) => ctx.mcpReq.envelope?.[CLIENT_CAPABILITIES_META_KEY] ?? {};

  // The SDK answers -32021 itself when an input request needs a capability the client did not
  // declare.
  server.registerTool(
    'test_missing_capability',
    { description: 'Needs the client sampling capability', inputSchema: noArgs },
    async () =>
      inputRequired({
        inputRequests: {
          sample: inputRequired.createMessage({
            messages: [{ role: 'user', content: { type: 'text', text: 'ping' } }],
            maxTokens: 10,
          }),
        },
      }),
  );

  server.registerTool(
    'test_streaming_elicitation',
    { description: 'Answers with an input-required elicitation', inputSchema: noArgs },
    async (_args, ctx) => {
      await ctx.mcpReq.notify({
        method: 'notifications/progress',
        params: { progressToken: ctx.mcpReq._meta?.progressToken ?? 'streaming', progress: 1, total: 2 },
      });
      return inputRequired({ inputRequests: { user_name: elicitName('What is your name?') } });
    },
  );

  server.registerTool('test_trigger_tool_change', { description: 'Publishes tools/list_changed', inputSchema: noArgs }, async () => {
    if (era === 'modern') notifier?.toolsChanged();
    else server.sendToolListChanged();
    return text('tools changed');
  });
  server.registerTool('test_trigger_prompt_change', { description: 'Publishes prompts/list_changed', inputSchema: noArgs }, async () => {
    if (era === 'modern') notifier?.promptsChanged();
    else server.sendPromptListChanged();
    return text('prompts changed');
  });

  const responses = (ctx) => ctx.mcpReq.inputResponses ?? {};
  const accepted = (ctx, key) => {
    const v = inputResponse(responses(ctx), key);
    return v.kind === 'elicit' && v.action === 'accept' ? v.content ?? {} : undefined;
  };

  server.registerTool(
    'test_input_required_result_elicitation',
    { description: 'Asks for a name, then greets', inputSchema: noArgs },
    async (_args, ctx) => {
      const got = accepted(ctx, 'user_name');
      if (typeof got?.name !== 'string') {
        return inputRequired({ inputRequests: { user_name: elicitName('What is your name?') } });
      }
      return text(`Hello, ${got.name}!`);
    },
  );

  const capital = () =>
    inputRequired.createMessage({
      messages: [{ role: 'user', content: { type: 'text', text: 'What is the capital of France?' } }],
      maxTokens: 100,
    });

  server.registerTool(
    'test_input_required_result_sampling',
    { description: 'Asks the client to sample, then echoes the answer', inputSchema: noArgs },
    async (_args, ctx) => {
      const v = inputResponse(responses(ctx), 'capital_question');
      if (v.kind !== 'sampling') return inputRequired({ inputRequests: { capital_question: capital() } });
      const c = Array.isArray(v.result.content) ? v.result.content[0] : v.result.content;
      return text(`Sampled: ${c?.text ?? ''}`);
    },
  );

  server.registerTool(
    'test_input_required_result_list_roots',
    { description: 'Asks for the client roots, then lists them', inputSchema: noArgs },
    async (_args, ctx) => {
      const v = inputResponse(responses(ctx), 'client_roots');
      if (v.kind !== 'roots') return inputRequired({ inputRequests: { client_roots: inputRequired.listRoots() } });
      return text(`Roots: ${v.roots.map((r) => r.uri).join(', ')}`);
    },
  );

  const confirm = () =>
    inputRequired.elicit({
      message: 'Please confirm',
      requestedSchema: { type: 'object', properties: { ok: { type: 'boolean' } }, required: ['ok'] },
    });

  for (const name of ['test_input_required_result_request_state', 'test_input_required_result_tampered_state']) {
    server.registerTool(name, { description: 'Round-trips a sealed requestState', inputSchema: noArgs }, async (_args, ctx) => {
      const state = ctx.mcpReq.requestState();
      if (state?.tool === name && accepted(ctx, 'confirm')) return text('state-ok');
      return inputRequired({
        inputRequests: { confirm: confirm() },
        requestState: await stateCodec.mint({ tool: name, round: 1 }),
      });
    });
  }

  server.registerTool(
    'test_input_required_result_multiple_inputs',
    { description: 'Asks for an elicitation, a sample and the roots at once', inputSchema: noArgs },
    async (_args, ctx) => {
      const r = responses(ctx);
      const done =
        ctx.mcpReq.requestState()?.tool === 'multiple' &&
        accepted(ctx, 'user_name') &&
        inputResponse(r, 'greeting').kind === 'sampling' &&
        inputResponse(r, 'client_roots').kind === 'roots';
      if (done) return text('all inputs received');
      return inputRequired({
        inputRequests: {
          user_name: elicitName('What is your name?'),
          greeting: inputRequired.createMessage({
            messages: [{ role: 'user', content: { type: 'text', text: 'Generate a greeting' } }],
            maxTokens: 50,
          }),
          client_roots: inputRequired.listRoots(),
        },
        requestState: await stateCodec.mint({ tool: 'multiple' }),
      });
    },
  );

  server.registerTool(
    'test_input_required_result_multi_round',
    { description: 'Two rounds of elicitation, then a result', inputSchema: noArgs },
    async (_args, ctx) => {
      const state = ctx.mcpReq.requestState();
      if (state?.tool === 'multi' && state.round === 2) {
        const got = accepted(ctx, 'step2');
        if (typeof got?.color === 'string') return text(`${state.name} likes ${got.color}`);
      }
      const step1 = state?.tool === 'multi' && state.round === 1 ? accepted(ctx, 'step1') : undefined;
      if (typeof step1?.name === 'string' || (state?.tool === 'multi' && state.round === 2)) {
        return inputRequired({
          inputRequests: {
            step2: inputRequired.elicit({
              message: 'Step 2: What is your favorite color?',
              requestedSchema: { type: 'object', properties: { color: { type: 'string' } }, required: ['color'] },
            }),
          },
          requestState: await stateCodec.mint({ tool: 'multi', round: 2, name: step1?.name ?? state.name }),
        });
      }
      return inputRequired({
        inputRequests: { step1: elicitName('Step 1: What is your name?') },
        requestState: await stateCodec.mint({ tool: 'multi', round: 1 }),
      });
    },
  );

  server.registerTool(
    'test_input_required_result_capabilities',
    { description: 'Asks only for what the client declared it can answer', inputSchema: noArgs },
    async (_args, ctx) => {
      const caps = declared(ctx);
      const inputRequests = {};
      if (caps.elicitation) inputRequests.user_name = elicitName('What is your name?');
      if (caps.sampling) inputRequests.capital_question = capital();
      if (caps.roots) inputRequests.client_roots = inputRequired.listRoots();
      const answered = Object.keys(inputRequests).some((k) => inputResponse(responses(ctx), k).kind !== 'missing');
      if (answered || Object.keys(inputRequests).length === 0) return text('nothing more to ask');
      return inputRequired({ inputRequests });
    },
  );

  // --- resources -------------------------------------------------------------------------------

  server.registerResource(
    'static-text',
    'test://static-text',
    { title: 'Static Text Resource', description: 'A static text resource', mimeType: 'text/plain' },
    async () => ({
      contents: [{ uri: 'test://static-text', mimeType: 'text/plain', text: 'This is the content of the static text resource.' }],
    }),
  );
  server.registerResource(
    'static-binary',
    'test://static-binary',
    { title: 'Static Binary Resource', description: 'A static binary resource (PNG)', mimeType: 'image/png' },
    async () => ({ contents: [{ uri: 'test://static-binary', mimeType: 'image/png', blob: PNG }] }),
  );
  server.registerResource(
    'template',
    new ResourceTemplate('test://template/{id}/data', { list: undefined }),
    { title: 'Resource Template', description: 'A template with one parameter', mimeType: 'application/json' },
    async (uri, { id }) => ({
      contents: [
        {
          uri: uri.toString(),
          mimeType: 'application/json',
          text: JSON.stringify({ id, templateTest: true, data: `Data for ID: ${id}` }),
        },
      ],
    }),
  );
  server.registerResource(
    'watched-resource',
    'test://watched-resource',
    { title: 'Watched Resource', description: 'A resource clients subscribe to', mimeType: 'text/plain' },
    async () => ({ contents: [{ uri: 'test://watched-resource', mimeType: 'text/plain', text: 'Watched resource content' }] }),
  );

  // --- prompts ---------------------------------------------------------------------------------

  server.registerPrompt('test_simple_prompt', { title: 'Simple Test Prompt', description: 'No arguments' }, async () => ({
    messages: [{ role: 'user', content: { type: 'text', text: 'This is a simple prompt for testing.' } }],
  }));
  server.registerPrompt(
    'test_prompt_with_arguments',
    {
      title: 'Prompt With Arguments',
      description: 'Two required arguments',
      argsSchema: fromJsonSchema({
        type: 'object',
        properties: {
          arg1: { type: 'string', description: 'First test argument' },
          arg2: { type: 'string', description: 'Second test argument' },
        },
        required: ['arg1', 'arg2'],
      }),
    },
    async ({ arg1, arg2 }) => ({
      messages: [{ role: 'user', content: { type: 'text', text: `Prompt with arguments: arg1='${arg1}', arg2='${arg2}'` } }],
    }),
  );
  server.registerPrompt(
    'test_prompt_with_embedded_resource',
    {
      title: 'Prompt With Embedded Resource',
      description: 'Embeds the resource it is given',
      argsSchema: fromJsonSchema({
        type: 'object',
        properties: { resourceUri: { type: 'string', description: 'URI of the resource to embed' } },
        required: ['resourceUri'],
      }),
    },
    async ({ resourceUri }) => ({
      messages: [
        {
          role: 'user',
          content: { type: 'resource', resource: { uri: resourceUri, mimeType: 'text/plain', text: 'Embedded resource content for testing.' } },
        },
        { role: 'user', content: { type: 'text', text: 'Please process the embedded resource above.' } },
      ],
    }),
  );
  server.registerPrompt('test_prompt_with_image', { title: 'Prompt With Image', description: 'Includes an image' }, async () => ({
    messages: [
      { role: 'user', content: { type: 'image', data: PNG, mimeType: 'image/png' } },
      { role: 'user', content: { type: 'text', text: 'Please analyze the image above.' } },
    ],
  }));
  server.registerPrompt(
    'test_input_required_result_prompt',
    { title: 'Prompt needing context', description: 'Asks for context before it renders' },
    async (ctx) => {
      const got = accepted(ctx, 'user_context');
      if (typeof got?.context !== 'string') {
        return inputRequired({
          inputRequests: {
            user_context: inputRequired.elicit({
              message: 'What context should the prompt use?',
              requestedSchema: { type: 'object', properties: { context: { type: 'string' } }, required: ['context'] },
            }),
          },
        });
      }
      return { messages: [{ role: 'user', content: { type: 'text', text: `Context: ${got.context}` } }] };
    },
  );

  // --- 2025-era methods the stateless era removed ----------------------------------------------

  if (era === 'legacy') {
    const subscriptions = new Set();
    const log = (data) =>
      server.server.legacy
        ?.notification({ method: 'notifications/message', params: { level: 'info', logger: 'upstream', data } })
        .catch(() => {});
    server.server.setRequestHandler('resources/subscribe', async (req) => {
      subscriptions.add(req.params.uri);
      return {};
    });
    server.server.setRequestHandler('resources/unsubscribe', async (req) => {
      subscriptions.delete(req.params.uri);
      return {};
    });
    server.server.setRequestHandler('logging/setLevel', async (req) => {
      log(`Log level set to: ${req.params.level}`);
      return {};
    });
  }

  server.server.setRequestHandler('completion/complete', async () => ({
    completion: { values: [], total: 0, hasMore: false },
  }));

  return server;
}

// --- serving -------------------------------------------------------------------------------------

/** In-memory event store for SSE resumability (SEP-1699), shared by every 2025-era session. */
function eventStore() {
  const events = new Map();
  let seq = 0;
  return {
    async storeEvent(streamId, message) {
      const id = `${streamId}::${String(++seq).padStart(12, '0')}`;
      events.set(id, { streamId, message });
      return id;
    },
    async getStreamIdForEventId(id) {
      return events.get(id)?.streamId;
    },
    async replayEventsAfter(lastId, { send }) {
      const streamId = events.get(lastId)?.streamId ?? lastId.split('::')[0];
      for (const [id, e] of [...events].sort(([a], [b]) => a.localeCompare(b))) {
        if (e.streamId === streamId && id > lastId) await send(id, e.message);
      }
      return streamId;
    },
  };
}

// A test upstream: events and sessions live until DELETE or exit (a suite run opens a few dozen).
const store = eventStore();
const sessions = new Map();

async function legacy(request) {
  const sid = request.headers.get('mcp-session-id');
  if (sid) {
    const t = sessions.get(sid);
    if (!t) {
      return Response.json({ jsonrpc: '2.0', id: null, error: { code: -32001, message: 'Session not found' } }, { status: 404 });
    }
    return t.handleRequest(request);
  }
  const transport = new WebStandardStreamableHTTPServerTransport({
    sessionIdGenerator: () => randomUUID(),
    eventStore: store,
    retryInterval: 1000,
    onsessioninitialized: (id) => sessions.set(id, transport),
    onsessionclosed: (id) => sessions.delete(id),
  });
  await build({ era: 'legacy' }).connect(transport);
  return transport.handleRequest(request);
}

const modern = createMcpHandler((ctx) => build(ctx), { legacy: 'reject', onerror: () => {} });
notifier = modern.notify;

const endpoint = {
  async fetch(request) {
    const refused =
      hostHeaderValidationResponse(request, localhostAllowedHostnames()) ??
      originValidationResponse(request, localhostAllowedOrigins());
    if (refused) return refused;
    if (new URL(request.url).pathname !== '/mcp') return new Response('not found', { status: 404 });
    return (await isLegacyRequest(request)) ? legacy(request) : modern.fetch(request);
  },
};

if (process.argv[2] === '--check') {
  // setup.sh: every registration builds for both eras with the installed SDK.
  build({ era: 'legacy' });
  build({ era: 'modern' });
  console.log('everything_server.mjs: ok');
  process.exit(0);
}

const port = Number(process.argv[2] ?? 0);
const httpServer = http.createServer(toNodeHandler(endpoint));
httpServer.listen(port, '127.0.0.1', () => {
  process.stdout.write(`PORT ${httpServer.address().port}\n`);
});
process.stdin.on('end', () => process.exit(0));
process.stdin.resume();
