#!/usr/bin/env python3
"""A real MCP tool server for the interop tests, built with the official `mcp` package.

It serves the streamable HTTP transport on 127.0.0.1 at `/mcp`, stateful (with
`Mcp-Session-Id` sessions) and answering with SSE streams by default, as the official
server does. It speaks both protocol eras that `mcp` 2.x speaks (handshake 2025-11-25 and
the stateless 2026-07-28); `--handshake-only` makes it refuse the stateless era as `mcp` 1.x
servers do, so its clients use `initialize` and sessions; `--modern-only` makes it refuse the
handshake era instead, as a server written for 2026-07-28 alone does.

    python3 tests/interop/upstream_server.py [PORT] [--json-response] [--stateless]
                                             [--handshake-only | --modern-only]
                                             [--call-log FILE]
                                             [--ignore-stdin] [--page-size N]

PORT 0 (the default) picks a free port. The first line on stdout is always `PORT <n>`,
written once the socket is bound, so a parent can connect as soon as it reads it.

The server exits when its stdin closes (so a test process that dies takes it along) or on
SIGTERM/SIGINT. `--ignore-stdin` turns the stdin watch off, for running it by hand with
stdin at /dev/null.

Tools: read_invoice(id), send_email(to, body), delete_records(table), echo(text), ask_user(question), slow_count(n),
touch(uri, list_changed) (announces a resource update or a tool list change outside any call: on
the session's stream in the handshake era, on `subscriptions/listen` streams in the stateless era),
confirm(question) (an elicitation) and ask_model(prompt) (sampling), which ask the client in
either revision (a request during the call, or an InputRequiredResult in 2026-07-28; ask_user
elicits only in the handshake era).
Resources: `file:///public/readme.md`, `file:///public/secret.txt`, `file:///private/ledger.csv`
and the template `note://{topic}`; prompts: `summarize(text)`, `greet(name)`, `admin_reset()`;
completions: `greet`'s `name` and `note://{topic}`'s `topic` complete from fixed lists;
`resources/subscribe` and `resources/unsubscribe` are accepted (and logged), and so is each
`subscriptions/listen` stream, when it opens and when it closes (`listen:<filter>`,
`listen-closed:<filter>`).
With `--call-log FILE`, every tool invocation, resource read, prompt get, completion and
(un)subscription appends one JSON line to FILE:
`{"tool", "args", "protocol_version", "authorization", "session_id"}` (`tool` is the tool's
name, or `resource:<uri>`, `prompt:<name>`, `completion:<ref>`, `subscribe:<uri>`,
`unsubscribe:<uri>`), so a test can tell which calls reached the upstream and with which
headers. With `--page-size N`, `tools/list` answers N tools a page with a `nextCursor`.
"""

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import threading
from typing import Any


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("port", nargs="?", type=int, default=0, help="port on 127.0.0.1 (0: any free port)")
    p.add_argument("--json-response", action="store_true", help="answer POSTs with JSON, not SSE")
    p.add_argument("--stateless", action="store_true", help="no Mcp-Session-Id sessions")
    p.add_argument(
        "--handshake-only",
        action="store_true",
        help="refuse the stateless 2026-07-28 era as a handshake-only server (mcp 1.x) does",
    )
    p.add_argument(
        "--modern-only",
        action="store_true",
        help="refuse the handshake era (initialize, sessions): only 2026-07-28 is spoken",
    )
    p.add_argument("--call-log", metavar="FILE", help="append one JSON line per tool call")
    p.add_argument(
        "--session-stream-delay-ms",
        type=int,
        default=0,
        help="hold each GET (a session's own stream) this long before it opens",
    )
    p.add_argument(
        "--refuse-replies",
        action="store_true",
        help="answer every client reply (a POST with result or error, no method) with HTTP 500, "
        "and log each tools/call POST to --call-log as tool 'posted:tools/call'",
    )
    p.add_argument("--ignore-stdin", action="store_true", help="do not exit when stdin closes")
    p.add_argument(
        "--page-size",
        type=int,
        default=0,
        help="answer tools/list in pages of this many tools (0: one page)",
    )
    return p.parse_args(argv)


def build_server(call_log: str | None, page_size: int = 0):
    from mcp.server.mcpserver import Context, MCPServer

    server = MCPServer("intentgate-interop-upstream")
    log_lock = threading.Lock()

    def record(tool: str, args: dict[str, Any], ctx: Context) -> None:
        if not call_log:
            return
        headers = {}
        try:
            headers = {k.lower(): v for k, v in (ctx.headers or {}).items()}
        except Exception:  # no HTTP request behind this call
            pass
        line = json.dumps(
            {
                "tool": tool,
                "args": args,
                "protocol_version": ctx.protocol_version,
                "authorization": headers.get("authorization"),
                "session_id": headers.get("mcp-session-id"),
            }
        )
        with log_lock, open(call_log, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    @server.tool()
    def read_invoice(id: str, ctx: Context) -> dict[str, Any]:
        """Read one invoice by its id."""
        record("read_invoice", {"id": id}, ctx)
        return {"id": id, "amount_cents": 12500, "currency": "EUR", "status": "open"}

    @server.tool()
    def send_email(to: str, body: str, ctx: Context) -> str:
        """Send an e-mail (pretend)."""
        record("send_email", {"to": to, "body": body}, ctx)
        return f"sent {len(body)} bytes to {to}"

    @server.tool()
    def delete_records(table: str, ctx: Context) -> str:
        """Delete every record of a table (pretend)."""
        record("delete_records", {"table": table}, ctx)
        return f"deleted all records from {table}"

    @server.tool()
    def echo(text: str, ctx: Context) -> str:
        """Answer with the text it was given."""
        record("echo", {"text": text}, ctx)
        return text

    from pydantic import BaseModel

    class Confirm(BaseModel):
        confirm: bool

    @server.tool()
    async def ask_user(question: str, ctx: Context) -> str:
        """Ask the user a yes/no question (an elicitation to the client) and report the answer."""
        if question.startswith("roots:"):
            # The client's roots instead (a roots/list request, on the session's own stream).
            roots = await ctx.request_context.session.list_roots()
            record("ask_user", {"question": question, "roots": len(roots.roots)}, ctx)
            return "roots: " + ", ".join(str(r.uri) for r in roots.roots)
        r = await ctx.elicit(question, Confirm)
        record("ask_user", {"question": question, "action": r.action}, ctx)
        if r.action == "accept":
            return f"answer: {r.data.confirm}"
        return f"answer: {r.action}"

    # Tools that ask the client in either revision: the SDK's resolvers send a request during
    # the call in the handshake era and answer an InputRequiredResult in the stateless one.
    from typing import Annotated

    from mcp.server.elicitation import ElicitationResult
    from mcp.server.mcpserver.resolve import Elicit, Resolve, Sample
    from mcp_types import CreateMessageResult, SamplingMessage, TextContent

    def confirmation(question: str) -> Elicit[Confirm]:
        return Elicit(question, Confirm)

    def completion(prompt: str) -> Sample:
        return Sample([SamplingMessage(role="user", content=TextContent(type="text", text=prompt))],
                      max_tokens=64)

    @server.tool()
    async def confirm(question: str,
                      answer: Annotated[ElicitationResult[Confirm], Resolve(confirmation)],
                      ctx: Context) -> str:
        """Ask the user a yes/no question (an elicitation, in either revision) and report it."""
        record("confirm", {"question": question, "action": answer.action}, ctx)
        if answer.action == "accept":
            return f"confirmed: {answer.data.confirm}"
        return f"confirmed: {answer.action}"

    @server.tool()
    async def ask_model(prompt: str, reply: Annotated[CreateMessageResult, Resolve(completion)],
                        ctx: Context) -> str:
        """Ask the client's model (sampling, in either revision) and report its text."""
        text = getattr(reply.content, "text", None)
        record("ask_model", {"prompt": prompt, "model": reply.model}, ctx)
        return f"model said: {text}"

    @server.tool()
    async def slow_count(n: int, ctx: Context) -> str:
        """Count to n, reporting progress at each step, a step every 0.3 s."""
        import anyio

        for i in range(min(n, 10)):
            await ctx.report_progress(i + 1, n)
            await anyio.sleep(0.3)
        record("slow_count", {"n": n}, ctx)
        return f"counted to {n}"

    @server.tool()
    async def touch(uri: str, ctx: Context, list_changed: bool = False) -> str:
        """Announce that a resource changed (`notifications/resources/updated`), or with
        `list_changed` that the tool list did, on the session's own stream (outside any call)."""
        if ctx.protocol_version == "2026-07-28":
            # The stateless era has no session stream: announcements ride the
            # `subscriptions/listen` streams (SEP-2575), through the server's bus.
            if list_changed:
                await ctx.notify_tools_changed()
            else:
                await ctx.notify_resource_updated(uri)
        else:
            session = ctx.request_context.session
            if list_changed:
                await session.send_tool_list_changed()
            else:
                await session.send_resource_updated(uri)
        record("touch", {"uri": uri, "list_changed": list_changed}, ctx)
        return f"touched {uri}"

    # --- resources, prompts, completions (host/tests/mcp_kinds.rs) ---

    def record_plain(tool: str, args: dict[str, Any]) -> None:
        """For handlers without a Context (static resources, completions, subscriptions)."""
        if not call_log:
            return
        line = json.dumps({"tool": tool, "args": args, "protocol_version": None,
                           "authorization": None, "session_id": None})
        with log_lock, open(call_log, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    @server.resource("file:///public/readme.md", name="readme", mime_type="text/markdown")
    def readme() -> str:
        """The public readme."""
        record_plain("resource:file:///public/readme.md", {})
        return "# Readme\nPublic."

    @server.resource("file:///public/secret.txt", name="secret", mime_type="text/plain")
    def secret() -> str:
        """A secret in the public folder."""
        record_plain("resource:file:///public/secret.txt", {})
        return "the launch code"

    @server.resource("file:///private/ledger.csv", name="ledger", mime_type="text/csv")
    def ledger() -> str:
        """The private ledger."""
        record_plain("resource:file:///private/ledger.csv", {})
        return "date,amount\n2026-01-01,100"

    @server.resource("note://{topic}", name="note", mime_type="text/plain")
    def note(topic: str, ctx: Context) -> str:
        """A note on a topic."""
        record(f"resource:note://{topic}", {"topic": topic}, ctx)
        return f"note about {topic}"

    @server.prompt()
    def summarize(text: str, ctx: Context) -> str:
        """Summarize a text."""
        record("prompt:summarize", {"text": text}, ctx)
        return f"Please summarize: {text}"

    @server.prompt()
    def greet(name: str, ctx: Context) -> str:
        """Greet someone."""
        record("prompt:greet", {"name": name}, ctx)
        return f"Say hello to {name}"

    @server.prompt()
    def admin_reset(ctx: Context) -> str:
        """Reset everything (an administrator's prompt)."""
        record("prompt:admin_reset", {}, ctx)
        return "Reset all the things"

    import mcp_types

    @server.completion()
    async def complete(ref: Any, argument: Any, context: Any) -> Any:
        name = getattr(ref, "name", None) or getattr(ref, "uri", None)
        values = {"name": ["alice", "alfred", "bob"], "topic": ["alpha", "almanac", "beta"]}
        picked = [v for v in values.get(argument.name, []) if v.startswith(argument.value)]
        record_plain(f"completion:{name}", {argument.name: argument.value})
        return mcp_types.Completion(values=picked, total=len(picked), has_more=False)

    def subscription(kind: str):
        async def handler(ctx: Any, params: Any) -> Any:
            record_plain(f"{kind}:{params.uri}", {})
            return mcp_types.EmptyResult()
        return handler

    server._lowlevel_server.add_request_handler(
        "resources/subscribe", mcp_types.SubscribeRequestParams, subscription("subscribe"))
    server._lowlevel_server.add_request_handler(
        "resources/unsubscribe", mcp_types.UnsubscribeRequestParams, subscription("unsubscribe"))

    # subscriptions/listen (2026-07-28): the server's own handler, wrapped so the call log shows
    # the filter each stream was opened with (`listen:<filter JSON>`) and when it closed
    # (`listen-closed:<filter JSON>`).
    from mcp.server.subscriptions import ListenHandler

    listen_handler = ListenHandler(server._subscriptions)

    async def listen_logged(ctx: Any, params: Any) -> Any:
        wanted = params.notifications.model_dump(by_alias=True, exclude_none=True)
        key = json.dumps(wanted, sort_keys=True)
        record_plain(f"listen:{key}", {"filter": wanted})
        try:
            return await listen_handler(ctx, params)
        finally:
            record_plain(f"listen-closed:{key}", {"filter": wanted})

    server._lowlevel_server.add_request_handler(
        "subscriptions/listen", mcp_types.SubscriptionsListenRequestParams, listen_logged)

    if page_size > 0:
        # tools/list in pages: the cursor is the offset of the next page, as a string.
        async def list_tools_paged(ctx: Any, params: Any) -> Any:
            tools = await server.list_tools()
            cursor = getattr(params, "cursor", None) if params is not None else None
            start = int(cursor) if cursor else 0
            end = start + page_size
            return mcp_types.ListToolsResult(
                tools=tools[start:end], next_cursor=str(end) if end < len(tools) else None
            )

        server._lowlevel_server.add_request_handler(
            "tools/list", mcp_types.PaginatedRequestParams, list_tools_paged)

    return server


async def read_body(receive):
    """Reads a request's whole body, and gives a `receive` that hands the app the same
    messages again: what a middleware that looks at the body passes on."""
    messages = []
    body = b""
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break

    async def replay():
        if messages:
            return messages.pop(0)
        return await receive()

    return messages, body, replay


class HandshakeOnly:
    """ASGI middleware: answer like a handshake-only server (mcp 1.x).

    Such a server knows nothing of `server/discover` or of requests without a session: it
    answers every POST that is not `initialize` and carries no `Mcp-Session-Id` with HTTP 400
    and JSON-RPC -32600 "Missing session ID". So a client (or gateway) that probes the stateless
    era falls back to the initialize handshake, and from then on uses sessions.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        _, body, replay = await read_body(receive)
        method = None
        try:
            parsed = json.loads(body)
            if isinstance(parsed, dict):
                method = parsed.get("method")
        except ValueError:
            pass
        if "mcp-session-id" not in headers and method != "initialize":
            answer = json.dumps(
                {
                    "jsonrpc": "2.0",
                    "id": "server-error",
                    "error": {"code": -32600, "message": "Bad Request: Missing session ID"},
                }
            ).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 400,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": answer})
            return None

        return await self.app(scope, replay, send)


class RefuseReplies:
    """ASGI middleware: refuse the client's replies to the server's requests (HTTP 500), as a
    server that fails while taking an answer does, and note every `tools/call` POST it receives
    (one line per POST in the call log), so a test can tell how many times a call was sent."""

    def __init__(self, app, call_log: str | None):
        self.app = app
        self.call_log = call_log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        _, body, replay = await read_body(receive)
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and parsed.get("method") == "tools/call" and self.call_log:
            params = parsed.get("params") or {}
            line = json.dumps({"tool": "posted:tools/call", "args": params.get("arguments")})
            with open(self.call_log, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        if isinstance(parsed, dict) and "method" not in parsed and ("result" in parsed or "error" in parsed):
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"cannot take this reply"})
            return None

        return await self.app(scope, replay, send)


class ModernOnly:
    """ASGI middleware: answer like a server that speaks only the stateless 2026-07-28 revision.

    Every request that is not of that revision (no `MCP-Protocol-Version: 2026-07-28`, such as
    `initialize`) is refused with HTTP 400 and -32022 naming the one supported version, and
    `GET` (a handshake-era session stream) with 405. A client (or gateway) that asks for the
    handshake era must then speak the stateless one, answering input-required results.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if scope["method"] == "POST" and headers.get("mcp-protocol-version") == "2026-07-28":
            return await self.app(scope, receive, send)
        if scope["method"] == "POST":
            status = 400
            answer = json.dumps({"jsonrpc": "2.0", "id": None, "error": {
                "code": -32022, "message": "Unsupported protocol version",
                "data": {"supported": ["2026-07-28"]}}}).encode()
        else:
            status, answer = 405, b""
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"allow", b"POST")]})
        await send({"type": "http.response.body", "body": answer})
        return None


class SlowSessionStream:
    """Opens a session's own stream (`GET`) only after a delay, as a busy server may: what the
    server sends there before it is open has no one to go to (no event store), so a client must
    not start a call that may ask it something there until the stream is open."""

    def __init__(self, app, delay: float):
        self.app = app
        self.delay = delay

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "GET":
            await asyncio.sleep(self.delay)
        return await self.app(scope, receive, send)


def main(argv: list[str]) -> int:
    args = parse_args(argv)

    # Bind first, so the port is known (and reserved) before the slow imports finish.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(128)
    sock.set_inheritable(True)
    port = sock.getsockname()[1]

    try:
        import uvicorn
        import mcp.server.mcpserver  # noqa: F401
    except ImportError as e:
        print(
            f"upstream_server: cannot import a package ({e}); "
            "run: pip install -r tests/interop/requirements.txt",
            file=sys.stderr,
        )
        return 3

    server = build_server(args.call_log, args.page_size)
    app = server.streamable_http_app(
        streamable_http_path="/mcp",
        json_response=args.json_response,
        stateless_http=args.stateless,
        host="127.0.0.1",
    )
    if args.session_stream_delay_ms > 0:
        app = SlowSessionStream(app, args.session_stream_delay_ms / 1000)
    if args.refuse_replies:
        app = RefuseReplies(app, args.call_log)
    if args.handshake_only:
        app = HandshakeOnly(app)
    elif args.modern_only:
        app = ModernOnly(app)
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=1,
    )
    userver = uvicorn.Server(config)

    def stop(*_: object) -> None:
        userver.should_exit = True
        # A second request to stop (or a stuck graceful shutdown) ends the process at once.
        timer = threading.Timer(3.0, lambda: os._exit(0))
        timer.daemon = True
        timer.start()

    if not args.ignore_stdin:

        def watch_stdin() -> None:
            try:
                while sys.stdin.buffer.read1(4096):
                    pass
            except Exception:
                pass
            stop()

        threading.Thread(target=watch_stdin, name="stdin-watch", daemon=True).start()

    # uvicorn installs its own SIGINT/SIGTERM handlers while serving; these cover the
    # moments before and after it does.
    signal.signal(signal.SIGTERM, stop)

    # The port line goes out only once the app is built, so a client that connects right
    # after reading it is served (the socket already queues connections anyway).
    print(f"PORT {port}", flush=True)
    userver.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
