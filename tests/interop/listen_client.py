#!/usr/bin/env python3
"""The official MCP client (2026-07-28, stateless) listening through the gateway with
`subscriptions/listen` (SEP-2575), for host/tests/streams.rs.

    python3 tests/interop/listen_client.py --gateway URL --token TOKEN URI DENIED

The client (`mode="2026-07-28"`: no session, no GET stream) opens `Client.listen()` for tool
list changes and the resources URI and DENIED, calls the upstream's `touch` tool for DENIED once,
then for URI until its update arrives, then for a tool list change the same way. Prints one
JSON line: {"ok", "honored": {...}, "subscription_id", "updated": [uris], "tools_changed": n}
or {"ok": false, "error"}.
"""

import argparse
import asyncio
import json
import sys
from typing import Any


async def run(a: argparse.Namespace) -> dict[str, Any]:
    import anyio
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared.subscriptions import ResourceUpdated, ToolsListChanged

    events: list[Any] = []
    arrived = anyio.Event()

    headers = {"Authorization": f"Bearer {a.token}"}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0, read=60.0)) as http:
        transport = streamable_http_client(a.gateway + "/v1/mcp", http_client=http)
        async with Client(transport, mode="2026-07-28", read_timeout_seconds=60.0, cache=None) as client:
            async with client.listen(tools_list_changed=True,
                                     resource_subscriptions=[a.uri, a.denied]) as sub:
                honored = sub.honored.model_dump(by_alias=True, exclude_none=True)

                async def consume() -> None:
                    nonlocal arrived
                    async for event in sub:
                        events.append(event)
                        arrived.set()

                async def until(pred: Any, args: dict[str, Any]) -> None:
                    nonlocal arrived
                    for _ in range(20):
                        if any(pred(e) for e in events):
                            return
                        arrived = anyio.Event()
                        await client.call_tool("touch", args)
                        with anyio.move_on_after(0.5):
                            await arrived.wait()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(consume)
                    await client.call_tool("touch", {"uri": a.denied})
                    await until(lambda e: isinstance(e, ResourceUpdated) and e.uri == a.uri,
                                {"uri": a.uri})
                    await until(lambda e: isinstance(e, ToolsListChanged),
                                {"uri": "-", "list_changed": True})
                    tg.cancel_scope.cancel()
                return {
                    "ok": True,
                    "honored": honored,
                    "subscription_id": sub.subscription_id,
                    "updated": [e.uri for e in events if isinstance(e, ResourceUpdated)],
                    "tools_changed": sum(isinstance(e, ToolsListChanged) for e in events),
                }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--gateway", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("uri")
    p.add_argument("denied")
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
