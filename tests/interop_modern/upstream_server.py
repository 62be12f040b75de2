#!/usr/bin/env python3
"""A real MCP tool server for host/tests/mcp_eras.rs, built on whichever official `mcp` is installed.

With `mcp` 2.3 (the system python3) it speaks both revisions: the handshake era (2025-11-25,
sessions) and the stateless 2026-07-28 era. With `mcp` 1.30 (the venv that setup.sh creates,
tests/interop_modern/.venv-mcp130) it speaks only the handshake era, as deployed servers do.

    python3 tests/interop_modern/upstream_server.py [PORT] [--json-response] [--call-log FILE]
                                                    [--ignore-stdin]

The first line on stdout is `PORT <n>` once the socket is bound. The server exits when stdin
closes (so a dying test takes it along) or on SIGTERM.

Tools: read_invoice(id), send_email(to, body), delete_records(table), echo(text), confirm(question)
(an elicitation), ask_model(prompt) (sampling), slow_count(n) (progress); with mcp 2.x
also confirm_transfer(amount, memo), which asks for confirmation through a 2026-07-28
InputRequiredResult (an elicitation) before it completes. Resource template `note://{topic}`
and prompt `greet(name)` (with mcp 2.x also `greet_by_model(name)`, which answers with an
InputRequiredResult asking the client to sample). With `--call-log FILE` every tool
invocation appends one JSON line: {"tool", "args", "mcp" (package version), "protocol_version",
"headers" (the routing/auth headers as received), "round" (for confirm_transfer: 1, 2, ...),
"request_state", "input_responses"}.
"""

import argparse
import importlib.metadata
import json
import os
import signal
import socket
import sys
import threading
from typing import Any

LOGGED_HEADERS = (
    "authorization",
    "mcp-session-id",
    "mcp-protocol-version",
    "mcp-method",
    "mcp-name",
    "x-intent-prompt",
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("port", nargs="?", type=int, default=0)
    p.add_argument("--json-response", action="store_true", help="answer POSTs with JSON, not SSE")
    p.add_argument("--call-log", metavar="FILE")
    p.add_argument("--ignore-stdin", action="store_true")
    return p.parse_args(argv)


MCP_VERSION = importlib.metadata.version("mcp")
MODERN = int(MCP_VERSION.split(".")[0]) >= 2


def request_headers(ctx: Any) -> dict[str, str]:
    try:
        if MODERN:
            raw = ctx.headers or {}
        else:
            raw = ctx.request_context.request.headers
        return {k.lower(): v for k, v in raw.items() if k.lower() in LOGGED_HEADERS}
    except Exception:  # no HTTP request behind this call
        return {}


def build_server(call_log: str | None, json_response: bool):
    lock = threading.Lock()

    def record(tool: str, args: dict[str, Any], ctx: Any, **extra: Any) -> None:
        if not call_log:
            return
        pv = getattr(ctx, "protocol_version", None) if MODERN else None
        line = {"tool": tool, "args": args, "mcp": MCP_VERSION, "protocol_version": pv,
                "headers": request_headers(ctx), **extra}
        with lock, open(call_log, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    if MODERN:
        from mcp.server.mcpserver import Context, MCPServer

        server = MCPServer("interop-modern-upstream", instructions="Invoices and e-mail.")
    else:
        from mcp.server.fastmcp import Context, FastMCP

        server = FastMCP(
            "interop-handshake-upstream",
            instructions="Invoices and e-mail.",
            streamable_http_path="/mcp",
            json_response=json_response,
        )

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

    # What a tool asks the client (host/tests/relay_matrix.rs): with mcp 2.x through the SDK's
    # resolvers (a request during the call in the handshake era, an InputRequiredResult in
    # 2026-07-28); with mcp 1.x as a request on the call's own stream.
    from pydantic import BaseModel

    class Confirm(BaseModel):
        confirm: bool

    if MODERN:
        from typing import Annotated

        from mcp.server.elicitation import ElicitationResult
        from mcp.server.mcpserver.resolve import Elicit, Resolve, Sample
        from mcp_types import CreateMessageResult, SamplingMessage, TextContent

        def confirmation(question: str) -> Elicit[Confirm]:
            return Elicit(question, Confirm)

        def completion(prompt: str) -> Sample:
            return Sample([SamplingMessage(role="user",
                                           content=TextContent(type="text", text=prompt))],
                          max_tokens=64)

        @server.tool()
        async def confirm(question: str,
                          answer: Annotated[ElicitationResult[Confirm], Resolve(confirmation)],
                          ctx: Context) -> str:
            """Ask the user a yes/no question (an elicitation) and report the answer."""
            record("confirm", {"question": question, "action": answer.action}, ctx)
            if answer.action == "accept":
                return f"confirmed: {answer.data.confirm}"
            return f"confirmed: {answer.action}"

        @server.tool()
        async def ask_model(prompt: str,
                            reply: Annotated[CreateMessageResult, Resolve(completion)],
                            ctx: Context) -> str:
            """Ask the client's model (sampling) and report its text."""
            record("ask_model", {"prompt": prompt, "model": reply.model}, ctx)
            return f"model said: {getattr(reply.content, 'text', None)}"
    else:
        from mcp.types import SamplingMessage, TextContent

        @server.tool()
        async def confirm(question: str, ctx: Context) -> str:
            """Ask the user a yes/no question (an elicitation) and report the answer."""
            answer = await ctx.elicit(question, Confirm)
            record("confirm", {"question": question, "action": answer.action}, ctx)
            if answer.action == "accept":
                return f"confirmed: {answer.data.confirm}"
            return f"confirmed: {answer.action}"

        @server.tool()
        async def ask_model(prompt: str, ctx: Context) -> str:
            """Ask the client's model (sampling) and report its text."""
            reply = await ctx.session.create_message(
                [SamplingMessage(role="user", content=TextContent(type="text", text=prompt))],
                max_tokens=64, related_request_id=ctx.request_id)
            record("ask_model", {"prompt": prompt, "model": reply.model}, ctx)
            return f"model said: {getattr(reply.content, 'text', None)}"

    @server.tool()
    async def slow_count(n: int, ctx: Context) -> str:
        """Count to n, reporting progress at each step, a step every 0.3 s."""
        import anyio

        for i in range(min(n, 10)):
            await ctx.report_progress(i + 1, n)
            await anyio.sleep(0.3)
        record("slow_count", {"n": n}, ctx)
        return f"counted to {n}"

    @server.resource("note://{topic}", name="note", mime_type="text/plain")
    def note(topic: str) -> str:
        """A note on a topic."""
        record(f"resource:note://{topic}", {"topic": topic}, None)
        return f"note about {topic}"

    @server.prompt()
    def greet(name: str) -> str:
        """Greet someone."""
        record("prompt:greet", {"name": name}, None)
        return f"Say hello to {name}"

    if MODERN:
        from mcp_types import (CreateMessageRequest, CreateMessageRequestParams, ElicitRequest,
                               ElicitRequestFormParams, InputRequiredResult, SamplingMessage,
                               TextContent)

        @server.prompt()
        def greet_by_model(name: str, ctx: Context) -> InputRequiredResult | str:
            """A prompt that asks the client's model first (a 2026-07-28 input-required prompt)."""
            answers = ctx.input_responses or {}
            record("prompt:greet_by_model", {"name": name}, ctx, request_state=ctx.request_state,
                   answered=sorted(answers))
            if "model" in answers:
                return f"Say hello to {name}, as the model suggests"
            ask = CreateMessageRequest(
                method="sampling/createMessage",
                params=CreateMessageRequestParams(
                    messages=[SamplingMessage(role="user",
                                              content=TextContent(type="text", text=f"greet {name}"))],
                    max_tokens=32,
                ),
            )
            return InputRequiredResult(result_type="input_required", input_requests={"model": ask},
                                       request_state="greet:1")

        @server.tool()
        def confirm_transfer(amount: int, memo: str, ctx: Context) -> InputRequiredResult | str:
            """Transfer money after the user confirms (a multi-round call)."""
            answers = ctx.input_responses or {}
            state = ctx.request_state
            rnd = 1 if state is None else int(state.split(":")[1]) + 1
            dumped = {k: (v.model_dump(mode="json", by_alias=True) if hasattr(v, "model_dump") else v)
                      for k, v in answers.items()}
            record("confirm_transfer", {"amount": amount, "memo": memo}, ctx, round=rnd,
                   request_state=state, input_responses=dumped or None)
            confirm = answers.get("confirm")
            content = getattr(confirm, "content", None) or (
                confirm.get("content") if isinstance(confirm, dict) else None)
            if not content:
                ask = ElicitRequest(
                    method="elicitation/create",
                    params=ElicitRequestFormParams(
                        message=f"Transfer {amount} ({memo})?",
                        requestedSchema={"type": "object",
                                         "properties": {"ok": {"type": "boolean"}},
                                         "required": ["ok"]},
                    ),
                )
                return InputRequiredResult(result_type="input_required",
                                           input_requests={"confirm": ask},
                                           request_state=f"round:{rnd}")
            ok = content.get("ok") if isinstance(content, dict) else getattr(content, "ok", None)
            return f"transferred {amount} ({memo}): confirmed={ok} after {rnd} rounds"

    return server


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(128)
    port = sock.getsockname()[1]
    import uvicorn

    server = build_server(args.call_log, args.json_response)
    if MODERN:
        app = server.streamable_http_app(streamable_http_path="/mcp",
                                         json_response=args.json_response, host="127.0.0.1")
    else:
        app = server.streamable_http_app()
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=1)
    userver = uvicorn.Server(config)

    def stop(*_: object) -> None:
        userver.should_exit = True
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

        threading.Thread(target=watch_stdin, daemon=True).start()
    signal.signal(signal.SIGTERM, stop)
    print(f"PORT {port}", flush=True)
    userver.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
