#!/usr/bin/env python3
"""The official MCP client subscribing to a resource through the gateway and receiving its
update and a tool list change on the session's own stream (`GET /v1/mcp`), for
host/tests/streams.rs.

    python3 tests/interop/subscribe_client.py --gateway URL --token TOKEN URI

The client (handshake era, `mode="legacy"`: sessions and the GET stream) subscribes to URI,
then calls the upstream's `touch` tool until the update arrives (the upstream's own stream to
the gateway may open a moment after the session), then asks for a tool list change the same
way. Prints one JSON line: {"ok", "updated": [uris], "list_changed": n, "subscribe": bool}
or {"ok": false, "error"}.
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

    updated: list[str] = []
    changed: list[str] = []
    arrived = asyncio.Event()

    async def on_message(message: Any) -> None:
        root = getattr(message, "root", message)
        if isinstance(root, types.ResourceUpdatedNotification):
            updated.append(str(root.params.uri))
            arrived.set()
        elif isinstance(root, types.ToolListChangedNotification):
            changed.append("tools")
            arrived.set()

    async def until(what: list[str], args: dict[str, Any]) -> None:
        for _ in range(20):
            arrived.clear()
            await client.call_tool("touch", args)
            try:
                await asyncio.wait_for(arrived.wait(), 0.5)
            except TimeoutError:
                pass
            if what:
                return

    headers = {"Authorization": f"Bearer {a.token}"}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0, read=60.0)) as http:
        transport = streamable_http_client(a.gateway + "/v1/mcp", http_client=http)
        async with Client(transport, mode="legacy", read_timeout_seconds=60.0, cache=None,
                          message_handler=on_message) as client:
            caps = client.server_capabilities
            subscribe = bool(caps and caps.resources and caps.resources.subscribe)
            await client.subscribe_resource(a.uri)
            await until(updated, {"uri": a.uri})
            await until(changed, {"uri": "-", "list_changed": True})
            return {"ok": True, "updated": updated, "list_changed": len(changed),
                    "subscribe": subscribe}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--gateway", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("uri")
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
