#!/usr/bin/env python3
"""An agent whose call waits for a person, resumed with real clients (host/tests/approvals.rs).

    python3 tests/interop/approval_agent.py MODE --gateway URL --token TOKEN TOOL ARGS_JSON

MODE:
    mcp      the official MCP client, handshake era, through sdk/agents/python/intentgate_approval.py
             (`-32019`, then resumes with X-IntentGate-Approval-Id)
    http     plain HTTP through the same helper
    modern   the official MCP client in the stateless era (2026-07-28): nothing IntentGate-specific;
             the client's own input-required driver echoes the requestState until the call runs

Prints one JSON line: {"ok": true, "text": [...]} or {"ok": false, "code", "message", "data"}.
"""

import argparse
import asyncio
import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "sdk", "agents", "python"))

import intentgate_approval  # noqa: E402


def texts(result: Any) -> list[Any]:
    if isinstance(result, dict):
        return [c.get("text") for c in result.get("content", [])]
    return [getattr(b, "text", None) for b in result.content]


async def modern(endpoint: str, token: str, tool: str, args: dict[str, Any]) -> Any:
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    headers = {"Authorization": f"Bearer {token}"}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0, read=90.0)) as http:
        transport = streamable_http_client(endpoint, http_client=http)
        async with Client(transport, mode="2026-07-28", read_timeout_seconds=90.0,
                          input_required_max_rounds=100) as client:
            return await client.call_tool(tool, args)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["mcp", "http", "modern"])
    p.add_argument("--gateway", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("tool")
    p.add_argument("args")
    a = p.parse_args()
    args = json.loads(a.args)
    endpoint = a.gateway + "/v1/mcp"
    try:
        if a.mode == "mcp":
            r = asyncio.run(intentgate_approval.call_tool(endpoint, a.token, a.tool, args, wait_s=2))
        elif a.mode == "http":
            r = intentgate_approval.call_tool_http(a.gateway, a.token, a.tool, args, wait_s=2)
        else:
            r = asyncio.run(modern(endpoint, a.token, a.tool, args))
        out = {"ok": True, "text": texts(r)}
    except intentgate_approval.ApprovalRefused as e:
        out = {"ok": False, "code": e.code, "message": e.message, "data": e.data}
    except BaseException as e:  # noqa: BLE001 - reported, not hidden
        leaf = e
        while getattr(leaf, "exceptions", None):
            leaf = leaf.exceptions[0]
        error = getattr(leaf, "error", None)
        out = {"ok": False, "code": getattr(error, "code", None),
               "message": f"{type(leaf).__name__}: {leaf}", "data": getattr(error, "data", None)}
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
