#!/usr/bin/env python3
"""Real clients that nobody on this team wrote, driven against a gateway (or any MCP server).

    python3 tests/interop/clients.py SCENARIO --gateway URL --token TOKEN [options] [ARGS...]

Scenarios (each prints exactly one JSON line on stdout):

    check                       versions of the installed client packages
    list                        official MCP client: connect, tools/list
    list-all                    official MCP client: connect, tools/list page by page
    call TOOL ARGS_JSON         official MCP client: connect, tools/call
    sdk-call TOOL ARGS_JSON     IntentGate SDK: Gateway(url, token).tool_call(TOOL, ARGS)
    sdk-attenuated-call TOOL ARGS_JSON --deny GLOB[,GLOB]
                                IntentGate SDK: attenuate the token client-side (tool_deny),
                                then tool_call with the child token
    steps STEPS_JSON            several operations in one process and one MCP connection:
                                a JSON list of {"op": "list"}, {"op": "list-all"},
                                {"op": "call", "tool", "args"},
                                {"op": "sdk-call", "tool", "args"[, "token"]},
                                {"op": "sdk-attenuated-call", "tool", "args", "deny"[, "token"]},
                                {"op": "sleep", "seconds"}, {"op": "sleep_until", "unix"},
                                {"op": "revoke", "jti", "admin_token", "reason"}
                                ("token" on an SDK step overrides --token; null sends none)

Options:
    --gateway URL     the gateway's base URL (http://127.0.0.1:PORT)
    --mcp-path PATH   path of the MCP endpoint under URL (default /v1/mcp)
    --token TOKEN     the capability token (sent as Authorization: Bearer)
    --mode MODE       how the MCP client picks its protocol era: legacy (initialize
                      handshake, sessions), auto (probe server/discover, then fall back:
                      the default of mcp 2.x) or a modern version such as 2026-07-28 (pinned,
                      stateless). Default: legacy.
    --intent TEXT     sent as X-Intent-Prompt by both clients

Output: one JSON object. Single-operation scenarios put that operation's fields at the top
level and also under "results"; `steps` gives "results" only. An operation that the server
refused is still a result: {"op", "ok": false, "code", "message", "data", "exception"}, where
"code" is the JSON-RPC error code (MCPError.code for the MCP client, IntentGateError.code for
the SDK) or null when the failure was not a JSON-RPC error. The exit code is 0 whenever a JSON
line was printed, 2 for bad arguments, 3 when the client packages are missing.
"""

import argparse
import json
import sys
import time
import traceback
from contextlib import asynccontextmanager
from typing import Any

INSTALL_HINT = "pip install -r tests/interop/requirements.txt"
# One step (a call, a listing, a sleep) may take at most this long.
STEP_TIMEOUT_S = 90


def missing_packages(exc: ImportError) -> None:
    print(
        f"interop clients: cannot import a client package ({exc}); run: {INSTALL_HINT}",
        file=sys.stderr,
    )
    sys.exit(3)


# --- result helpers ----------------------------------------------------------------------


def flatten_exceptions(exc: BaseException) -> list[BaseException]:
    """The leaf exceptions of an exception (group), outermost first."""
    if isinstance(exc, BaseExceptionGroup):
        out: list[BaseException] = []
        for e in exc.exceptions:
            out.extend(flatten_exceptions(e))
        return out
    chain = [exc]
    if exc.__cause__ is not None and exc.__cause__ is not exc:
        chain.extend(flatten_exceptions(exc.__cause__))
    return chain


def error_result(op: str, exc: BaseException) -> dict[str, Any]:
    """A failed operation, with the JSON-RPC error code when one is anywhere in the exception."""
    leaves = flatten_exceptions(exc)
    coded = None
    for e in leaves:
        code = getattr(e, "code", None)
        if isinstance(code, int) and code != 0 and type(e).__name__ not in ("OSError",):
            coded = e
            break
    chosen = coded or leaves[0]
    data = getattr(chosen, "data", None)
    try:
        json.dumps(data)
    except (TypeError, ValueError):
        data = repr(data)
    return {
        "op": op,
        "ok": False,
        "code": getattr(chosen, "code", None) if coded is not None else None,
        "message": str(getattr(chosen, "message", "") or chosen),
        "data": data,
        "exception": type(chosen).__name__,
        "all_exceptions": [f"{type(e).__name__}: {e}" for e in leaves][:5],
    }


def jsonable(v: Any) -> Any:
    try:
        json.dumps(v)
        return v
    except (TypeError, ValueError):
        return repr(v)


# --- the official MCP client ---------------------------------------------------------------


MCP_OPS = ("list", "list-all", "call")


@asynccontextmanager
async def mcp_client(endpoint: str, token: str | None, mode: str, intent: str | None):
    """One official-SDK client connection (`mcp.Client` over `streamable_http_client`)."""
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    headers = {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if intent:
        headers["X-Intent-Prompt"] = intent
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0, read=60.0)) as http:
        transport = streamable_http_client(endpoint, http_client=http)
        async with Client(transport, mode=mode, read_timeout_seconds=30.0, cache=None) as client:
            yield client


async def mcp_list(client) -> dict[str, Any]:
    result = await client.list_tools()
    return {
        "op": "list",
        "ok": True,
        "tools": [t.name for t in result.tools],
        "protocol_version": client.protocol_version,
    }


async def mcp_list_all(client) -> dict[str, Any]:
    """Every page of tools/list, following the server's nextCursor."""
    tools: list[str] = []
    pages = 0
    cursor = None
    while True:
        result = await client.list_tools(cursor=cursor)
        pages += 1
        tools.extend(t.name for t in result.tools)
        cursor = result.next_cursor
        if not cursor or pages >= 50:
            break
    return {"op": "list-all", "ok": True, "tools": tools, "pages": pages}


async def mcp_call(client, tool: str, args: dict[str, Any]) -> dict[str, Any]:
    result = await client.call_tool(tool, args)
    texts = [getattr(b, "text", None) for b in result.content]
    return {
        "op": "call",
        "ok": True,
        "tool": tool,
        "is_error": bool(result.is_error),
        "text": texts,
        "structured": jsonable(result.structured_content),
        "protocol_version": client.protocol_version,
    }


# --- the IntentGate SDK ----------------------------------------------------------------------


def sdk_result(op: str, tool: str, result: Any) -> dict[str, Any]:
    ig = result.intentgate
    return {
        "op": op,
        "ok": True,
        "tool": tool,
        "is_error": bool(result.is_error),
        "text": [b.text for b in result.content],
        "intentgate": None
        if ig is None
        else {"decision": ig.decision, "reason": ig.reason, "check": ig.check, "latency_ms": ig.latency_ms},
    }


def sdk_call(base: str, token: str | None, tool: str, args: dict[str, Any], intent: str | None) -> dict[str, Any]:
    try:
        from intentgate import Gateway
    except ImportError as e:
        missing_packages(e)
    try:
        with Gateway(base, token, timeout=30.0) as gw:
            return sdk_result("sdk-call", tool, gw.tool_call(tool, args, intent_prompt=intent))
    except Exception as e:  # the SDK's typed exceptions carry .code
        return error_result("sdk-call", e)


def sdk_attenuated_call(
    base: str, token: str, tool: str, args: dict[str, Any], deny: list[str], intent: str | None
) -> dict[str, Any]:
    try:
        from intentgate import Gateway, attenuate
    except ImportError as e:
        missing_packages(e)
    try:
        child = attenuate(token, deny_tools=deny)
    except Exception as e:
        return error_result("sdk-attenuated-call", e)
    try:
        with Gateway(base, child, timeout=30.0) as gw:
            out = sdk_result("sdk-attenuated-call", tool, gw.tool_call(tool, args, intent_prompt=intent))
    except Exception as e:
        out = error_result("sdk-attenuated-call", e)
    out["child_token"] = child
    return out


def admin_revoke(base: str, admin_token: str, jti: str, reason: str) -> dict[str, Any]:
    import httpx

    resp = httpx.post(
        base + "/v1/admin/revoke",
        json={"jti": jti, "reason": reason},
        headers={"Authorization": f"Bearer {admin_token}"},
        timeout=30.0,
    )
    return {"op": "revoke", "ok": resp.status_code // 100 == 2, "status": resp.status_code}


# --- driver ----------------------------------------------------------------------------------


async def run_plain_step(args: argparse.Namespace, step: dict[str, Any]) -> dict[str, Any]:
    """A step that needs no MCP connection."""
    import anyio

    op = step.get("op")
    if op == "sdk-call":
        return await anyio.to_thread.run_sync(
            sdk_call,
            args.gateway,
            step.get("token", args.token),
            step["tool"],
            step.get("args") or {},
            args.intent,
        )
    if op == "sdk-attenuated-call":
        return await anyio.to_thread.run_sync(
            sdk_attenuated_call,
            args.gateway,
            step.get("token", args.token) or "",
            step["tool"],
            step.get("args") or {},
            list(step.get("deny") or []),
            args.intent,
        )
    if op == "sleep":
        await anyio.sleep(float(step["seconds"]))
        return {"op": "sleep", "ok": True}
    if op == "sleep_until":
        await anyio.sleep(max(0.0, float(step["unix"]) - time.time()))
        return {"op": "sleep_until", "ok": True}
    if op == "revoke":
        return await anyio.to_thread.run_sync(
            admin_revoke,
            args.gateway,
            step["admin_token"],
            step["jti"],
            step.get("reason", "interop test"),
        )
    raise ValueError(f"unknown op {op!r}")


async def run_step(args: argparse.Namespace, client, step: dict[str, Any]) -> dict[str, Any]:
    import anyio

    started = time.monotonic()
    try:
        with anyio.fail_after(STEP_TIMEOUT_S):
            if step.get("op") == "list":
                r = await mcp_list(client)
            elif step.get("op") == "list-all":
                r = await mcp_list_all(client)
            elif step.get("op") == "call":
                r = await mcp_call(client, step["tool"], step.get("args") or {})
            else:
                r = await run_plain_step(args, step)
    except Exception as e:  # an answer the server refused is a result, not a crash
        r = error_result(str(step.get("op")), e)
    r["elapsed_ms"] = round((time.monotonic() - started) * 1000)
    return r


async def run_steps(args: argparse.Namespace, steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs the steps in order. The MCP connection is opened at the first MCP step and kept for
    the steps after it; when it fails (refused at connect, or its transport died), the step that
    saw it gets the error and the next MCP step opens a new connection."""
    endpoint = args.gateway.rstrip("/") + args.mcp_path
    results: list[dict[str, Any]] = []
    pending = list(steps)
    while pending:
        if pending[0].get("op") not in MCP_OPS:
            results.append(await run_step(args, None, pending.pop(0)))
            continue
        started = time.monotonic()
        try:
            # Connecting is bounded by the client's own timeouts; its task group must be entered
            # and left in one scope, so it is never opened inside a step's deadline.
            async with mcp_client(endpoint, args.token, args.mode, args.intent) as client:
                while pending:
                    # BaseException other than Exception (the transport's task group cancelling
                    # this task) leaves the connection through the except below.
                    results.append(await run_step(args, client, pending[0]))
                    pending.pop(0)
                    started = time.monotonic()
        except BaseException as e:  # noqa: B036 - report every failure as a result
            if isinstance(e, KeyboardInterrupt):
                raise
            if not pending:
                break  # every step has its result; a failed teardown changes none of them
            step = pending.pop(0)
            r = error_result(str(step.get("op")), e)
            r["elapsed_ms"] = round((time.monotonic() - started) * 1000)
            results.append(r)
    return results


def parse_json_arg(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        print(f"{what} is not JSON: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="clients.py",
        description="Real MCP and IntentGate clients for the interop tests.",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("scenario")
    p.add_argument("rest", nargs="*")
    p.add_argument("--gateway", default="http://127.0.0.1:8080")
    p.add_argument("--mcp-path", default="/v1/mcp")
    p.add_argument("--token")
    p.add_argument("--mode", default="legacy")
    p.add_argument("--intent")
    p.add_argument("--deny", default="")
    args = p.parse_intermixed_args(argv)

    if args.scenario == "check":
        try:
            import importlib.metadata as md

            import httpx2  # noqa: F401
            import intentgate
            import mcp  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError as e:
            missing_packages(e)
        out = {
            "ok": True,
            "python": sys.version.split()[0],
            "mcp": md.version("mcp"),
            "intentgate": intentgate.__version__,
        }
        print(json.dumps(out), flush=True)
        return 0

    if args.scenario in ("sdk-call", "sdk-attenuated-call"):
        if len(args.rest) != 2:
            print(f"usage: {args.scenario} TOOL ARGS_JSON", file=sys.stderr)
            return 2
        tool, targs = args.rest[0], parse_json_arg(args.rest[1], "ARGS_JSON")
        if args.scenario == "sdk-call":
            r = sdk_call(args.gateway, args.token, tool, targs, args.intent)
        else:
            deny = [d for d in args.deny.split(",") if d]
            r = sdk_attenuated_call(args.gateway, args.token or "", tool, targs, deny, args.intent)
        print(json.dumps({"scenario": args.scenario, **r, "results": [r]}), flush=True)
        return 0

    if args.scenario == "list":
        steps = [{"op": "list"}]
    elif args.scenario == "call":
        if len(args.rest) != 2:
            print("usage: call TOOL ARGS_JSON", file=sys.stderr)
            return 2
        steps = [{"op": "call", "tool": args.rest[0], "args": parse_json_arg(args.rest[1], "ARGS_JSON")}]
    elif args.scenario == "steps":
        if len(args.rest) != 1:
            print("usage: steps STEPS_JSON", file=sys.stderr)
            return 2
        steps = parse_json_arg(args.rest[0], "STEPS_JSON")
    else:
        print(f"unknown scenario {args.scenario!r}\n{__doc__}", file=sys.stderr)
        return 2

    try:
        import anyio
        import httpx2  # noqa: F401
        import mcp  # noqa: F401
    except ImportError as e:
        missing_packages(e)

    results = anyio.run(run_steps, args, steps)
    out: dict[str, Any] = {"scenario": args.scenario, "mode": args.mode}
    if args.scenario != "steps":
        out.update(results[0])
    out["results"] = results
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
