#!/usr/bin/env python3
"""The official MCP client answering an elicitation a tool asks for, through the gateway
(host/tests/relay.rs).

    python3 tests/interop/relay_client.py MODE --gateway URL --token TOKEN QUESTION

MODE is the client's era: `legacy` (initialize handshake, sessions: the upstream's request is
relayed on the call's event stream) or `2026-07-28` (stateless: an input-required result).
The client accepts with {"confirm": true}. Prints one JSON line:
{"ok", "text", "asked": [messages the client was asked]} or {"ok": false, "error"}.
"""

import argparse
import asyncio
import json
import sys
from typing import Any


async def run(a: argparse.Namespace) -> dict[str, Any]:
    import httpx2
    import mcp_types as types
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    asked: list[str] = []

    async def on_elicit(context: Any, params: Any) -> Any:
        asked.append(getattr(params, "message", ""))
        return types.ElicitResult(action="accept", content={"confirm": True})

    async def on_roots(context: Any) -> Any:
        asked.append("roots")
        return types.ListRootsResult(roots=[types.Root(uri="file:///work/project", name="project")])

    headers = {"Authorization": f"Bearer {a.token}"}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0, read=60.0)) as http:
        transport = streamable_http_client(a.gateway + "/v1/mcp", http_client=http)
        async with Client(transport, mode=a.mode, read_timeout_seconds=60.0, cache=None,
                          elicitation_callback=on_elicit, list_roots_callback=on_roots) as client:
            if a.progress:
                import time
                started = time.monotonic()
                seen: list[float] = []

                async def on_progress(progress: float, total: float | None, message: str | None) -> None:
                    seen.append(time.monotonic() - started)

                r = await client.call_tool("slow_count", {"n": 3}, progress_callback=on_progress)
                done = time.monotonic() - started
                return {"ok": True, "text": [getattr(b, "text", None) for b in r.content],
                        "progress_at": seen, "done_at": done}
            r = await client.call_tool("ask_user", {"question": a.question})
            return {"ok": True, "text": [getattr(b, "text", None) for b in r.content],
                    "is_error": bool(r.is_error), "asked": asked,
                    "protocol_version": client.protocol_version}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode")
    p.add_argument("--gateway", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("question")
    p.add_argument("--progress", action="store_true",
                   help="call slow_count instead and report when each progress arrived")
    a = p.parse_args()
    try:
        out = asyncio.run(run(a))
    except BaseException as e:  # noqa: BLE001 - reported, not hidden
        leaf = e
        while getattr(leaf, "exceptions", None):
            leaf = leaf.exceptions[0]
        out = {"ok": False, "error": f"{type(leaf).__name__}: {leaf}"}
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
