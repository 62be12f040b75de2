#!/usr/bin/env python3
"""The official MCP Python client (mcp 2.3) driven through the gateway, in any protocol mode.

    python3 tests/interop_modern/clients.py --gateway URL --token TOKEN --mode MODE STEPS_JSON
            [--revoke-on-elicit JTI --admin-token ADMIN]

MODE is the client's `mode`: legacy (initialize handshake), auto (server/discover probe, then
fallback) or 2026-07-28 (pinned, stateless). STEPS_JSON is a list of {"op": "list"},
{"op": "call", "tool", "args"}, {"op": "resources"}, {"op": "templates"}, {"op": "prompts"},
{"op": "read", "uri"}, {"op": "prompt", "name", "args"}, {"op": "complete", "ref", "argument"}
(ref as on the wire: {"type": "ref/prompt", "name"} or {"type": "ref/resource", "uri"}),
{"op": "subscribe", "uri"} and {"op": "unsubscribe", "uri"}; a call with "progress": true
records the progress notifications it received (their `progress` values). The client answers
every elicitation (during a call, or in a 2026-07-28 InputRequiredResult round) by accepting
with every boolean of the form true ({"ok": true} when it has none); with --revoke-on-elicit it
first revokes that token id through the admin API, so the next round runs with a revoked token.
It answers every sampling request with the text "sampled by python MODE".

Prints one JSON line: {"mode", "protocol_version" (what the client ended on), "elicitations"
(their messages), "sampled" (the prompts it was asked to complete), "results": [...]}; a
refused operation is {"op", "ok": false, "code", "message"}.
Exit 0 whenever the line was printed, 2 for bad arguments, 3 when a package is missing.
"""

import argparse
import json
import sys
from typing import Any

HINT = "pip install -r tests/interop/requirements.txt"


def error_result(op: str, exc: BaseException) -> dict[str, Any]:
    def leaves(e: BaseException) -> list[BaseException]:
        if isinstance(e, BaseExceptionGroup):
            return [x for sub in e.exceptions for x in leaves(sub)]
        out = [e]
        if e.__cause__ is not None and e.__cause__ is not e:
            out.extend(leaves(e.__cause__))
        return out

    all_ = leaves(exc)
    coded = next((e for e in all_ if isinstance(getattr(e, "code", None), int)
                  and getattr(e, "code", 0) != 0 and type(e).__name__ != "OSError"), None)
    chosen = coded or all_[0]
    data = getattr(chosen, "data", None)
    try:
        json.dumps(data)
    except (TypeError, ValueError):
        data = repr(data)
    return {"op": op, "ok": False, "code": getattr(chosen, "code", None) if coded else None,
            "message": str(getattr(chosen, "message", "") or chosen), "data": data,
            "exception": type(chosen).__name__,
            "all_exceptions": [f"{type(e).__name__}: {e}" for e in all_][:5]}


async def run(args: argparse.Namespace, steps: list[dict[str, Any]]) -> dict[str, Any]:
    import httpx
    import httpx2
    import mcp_types as types
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    elicited: list[str] = []
    sampled: list[str] = []

    async def on_elicit(context: Any, params: Any) -> Any:
        elicited.append(getattr(params, "message", ""))
        if args.revoke_on_elicit:
            async with httpx.AsyncClient() as h:
                r = await h.post(args.gateway + "/v1/admin/revoke",
                                 json={"jti": args.revoke_on_elicit, "reason": "between rounds"},
                                 headers={"Authorization": f"Bearer {args.admin_token}"})
                r.raise_for_status()
        # Every boolean the form asks for is true ({"ok": true}, {"confirm": true}, ...).
        schema = getattr(params, "requested_schema", None) or {}
        props = schema.get("properties", {}) if isinstance(schema, dict) else {}
        content = {k: True for k, v in props.items() if v.get("type") == "boolean"} or {"ok": True}
        return types.ElicitResult(action="accept", content=content)

    async def on_sample(context: Any, params: Any) -> Any:
        texts = [getattr(m.content, "text", "") for m in getattr(params, "messages", [])]
        sampled.append(" ".join(t for t in texts if t))
        return types.CreateMessageResult(
            role="assistant", model="intentgate-fixed-model",
            content=types.TextContent(type="text", text=f"sampled by python {args.mode}"))

    results: list[dict[str, Any]] = []
    version = None
    headers = {"Authorization": f"Bearer {args.token}"}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0, read=60.0)) as http:
        transport = streamable_http_client(args.gateway + "/v1/mcp", http_client=http)
        try:
            async with Client(transport, mode=args.mode, read_timeout_seconds=30.0, cache=None,
                              elicitation_callback=on_elicit,
                              sampling_callback=on_sample) as client:
                version = client.protocol_version
                for step in steps:
                    op = step["op"]
                    try:
                        if op == "list":
                            r = await client.list_tools()
                            results.append({"op": op, "ok": True,
                                            "tools": sorted(t.name for t in r.tools)})
                        elif op == "resources":
                            r = await client.list_resources()
                            results.append({"op": op, "ok": True,
                                            "uris": sorted(str(x.uri) for x in r.resources)})
                        elif op == "templates":
                            r = await client.list_resource_templates()
                            results.append({"op": op, "ok": True, "templates": sorted(
                                x.uri_template for x in r.resource_templates)})
                        elif op == "prompts":
                            r = await client.list_prompts()
                            results.append({"op": op, "ok": True,
                                            "prompts": sorted(x.name for x in r.prompts)})
                        elif op == "read":
                            r = await client.read_resource(step["uri"])
                            results.append({"op": op, "ok": True, "uri": step["uri"],
                                            "text": [getattr(c, "text", None) for c in r.contents]})
                        elif op == "prompt":
                            r = await client.get_prompt(step["name"], step.get("args") or {})
                            results.append({"op": op, "ok": True, "name": step["name"], "text": [
                                getattr(m.content, "text", None) for m in r.messages]})
                        elif op == "complete":
                            ref = step["ref"]
                            if ref["type"] == "ref/prompt":
                                reference = types.PromptReference(type="ref/prompt", name=ref["name"])
                            else:
                                reference = types.ResourceTemplateReference(type="ref/resource",
                                                                            uri=ref["uri"])
                            r = await client.complete(reference, step["argument"])
                            results.append({"op": op, "ok": True,
                                            "values": list(r.completion.values)})
                        elif op in ("subscribe", "unsubscribe"):
                            if op == "subscribe":
                                await client.subscribe_resource(step["uri"])
                            else:
                                await client.unsubscribe_resource(step["uri"])
                            results.append({"op": op, "ok": True, "uri": step["uri"]})
                        elif op == "call":
                            progress: list[float] = []

                            async def on_progress(p: float, total: float | None,
                                                  message: str | None) -> None:
                                progress.append(p)

                            r = await client.call_tool(
                                step["tool"], step.get("args") or {},
                                progress_callback=on_progress if step.get("progress") else None)
                            results.append({
                                "op": op, "ok": True, "tool": step["tool"],
                                "is_error": bool(r.is_error),
                                "text": [getattr(b, "text", None) for b in r.content],
                                **({"progress": progress} if step.get("progress") else {}),
                            })
                        else:
                            raise SystemExit(f"unknown op {op!r}")
                    except Exception as e:  # noqa: BLE001 - reported, never raised
                        results.append(error_result(op, e))
        except (Exception, BaseExceptionGroup) as e:  # noqa: B036 - connect failed
            results.append(error_result("connect", e))
    return {"mode": args.mode, "protocol_version": version, "elicitations": elicited,
            "sampled": sampled, "results": results}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(usage=__doc__)
    p.add_argument("steps", nargs="?")
    p.add_argument("--gateway", required=False)
    p.add_argument("--token", default="")
    p.add_argument("--mode", default="auto")
    p.add_argument("--revoke-on-elicit")
    p.add_argument("--admin-token")
    p.add_argument("--check", action="store_true", help="print package versions and exit")
    args = p.parse_args(argv)
    try:
        import importlib.metadata as md

        import anyio
        import httpx  # noqa: F401
        import httpx2  # noqa: F401
        import mcp  # noqa: F401
    except ImportError as e:
        print(f"clients.py: cannot import a package ({e}); run: {HINT}", file=sys.stderr)
        return 3
    if args.check:
        print(json.dumps({"ok": True, "mcp": md.version("mcp")}))
        return 0
    if not args.steps or not args.gateway:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        steps = json.loads(args.steps)
    except ValueError as e:
        print(f"STEPS_JSON: {e}", file=sys.stderr)
        return 2
    out = anyio.run(run, args, steps)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
