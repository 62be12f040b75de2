"""Resume tool calls that an IntentGate gateway put in its approval queue.

A call the gateway's policy escalates is not refused: it waits for a person. How an agent sees
that depends on the protocol era of its client:

* **Handshake era** (MCP 2025-11-25 and older, the `intentgate` SDK, plain JSON-RPC): the answer
  is the JSON-RPC error `-32019` with
  ``data = {"pending_id", "status": "pending", "resume_header": "X-IntentGate-Approval-Id", ...}``.
  The agent sends the *same* call again with the header ``X-IntentGate-Approval-Id: <pending_id>``.
  While the approval is pending, the gateway holds that retry for up to ``Prefer: wait=N``
  seconds (20 by default) and answers ``-32019`` again if nobody decided; once approved, the
  call runs (once: the id is single-use); rejected or expired, it is refused with ``-32012``.
* **Stateless era** (MCP 2026-07-28): the answer is an input-required result whose
  ``requestState`` the official clients echo on their own; each retry long-polls the decision.
  Nothing to do beyond allowing enough rounds (``input_required_max_rounds``).

Two helpers, for the handshake era: :func:`call_tool` with the official ``mcp`` client and
:func:`call_tool_http` with plain HTTP (``httpx``). Both return the tool's result once the call
ran, or raise :class:`ApprovalRefused`.
"""

from __future__ import annotations

import time
from typing import Any

APPROVAL_PENDING = -32019
RESUME_HEADER = "X-IntentGate-Approval-Id"


class ApprovalRefused(Exception):
    """The approval was rejected, expired, or did not match the call."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"{code} {message}: {data}")
        self.code = code
        self.message = message
        self.data = data


def _pending_id(data: Any) -> str | None:
    if isinstance(data, dict) and data.get("status") == "pending":
        return data.get("pending_id")
    return None


async def call_tool(
    endpoint: str,
    token: str,
    tool: str,
    arguments: dict[str, Any],
    *,
    wait_s: int = 20,
    deadline_s: float = 600.0,
    mode: str = "legacy",
) -> Any:
    """Calls ``tool`` with the official MCP client; resumes it if it waits for an approval."""
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared.exceptions import MCPError

    extra: dict[str, str] = {}
    started = time.monotonic()
    while True:
        headers = {"Authorization": f"Bearer {token}", **extra}
        timeout = httpx2.Timeout(30.0, read=wait_s + 30.0)
        try:
            async with httpx2.AsyncClient(headers=headers, timeout=timeout) as http:
                transport = streamable_http_client(endpoint, http_client=http)
                async with Client(transport, mode=mode, read_timeout_seconds=wait_s + 30.0) as client:
                    return await client.call_tool(tool, arguments)
        except BaseException as exc:  # the client may wrap it in an exception group
            e = _mcp_error(exc, MCPError)
            if e is None:
                raise
            pending = _pending_id(e.error.data) if e.error.code == APPROVAL_PENDING else None
            if pending is None:
                if RESUME_HEADER in extra:
                    raise ApprovalRefused(e.error.code, e.error.message, e.error.data) from exc
                raise
        if time.monotonic() - started > deadline_s:
            raise ApprovalRefused(APPROVAL_PENDING, "still pending at the agent's deadline", pending)
        # Resume with the id; the gateway holds the retry up to `wait_s` for the decision.
        extra = {RESUME_HEADER: pending, "Prefer": f"wait={wait_s}"}


def _mcp_error(exc: BaseException, kind: type) -> Any:
    """The MCP error in `exc` or in the exception group around it, if any."""
    if isinstance(exc, kind):
        return exc
    for inner in getattr(exc, "exceptions", ()):
        found = _mcp_error(inner, kind)
        if found is not None:
            return found
    return None


def call_tool_http(
    base_url: str,
    token: str,
    tool: str,
    arguments: dict[str, Any],
    *,
    wait_s: int = 20,
    deadline_s: float = 600.0,
) -> Any:
    """The same with plain HTTP: ``POST {base_url}/v1/mcp`` one JSON-RPC ``tools/call``."""
    import httpx

    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": tool, "arguments": arguments}}
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    started = time.monotonic()
    with httpx.Client(timeout=httpx.Timeout(30.0, read=wait_s + 30.0)) as http:
        while True:
            answer = http.post(f"{base_url}/v1/mcp", json=body, headers=headers).json()
            if "result" in answer:
                return answer["result"]
            error = answer.get("error", {})
            pending = _pending_id(error.get("data")) if error.get("code") == APPROVAL_PENDING else None
            if pending is None:
                raise ApprovalRefused(error.get("code", 0), error.get("message", ""), error.get("data"))
            if time.monotonic() - started > deadline_s:
                raise ApprovalRefused(APPROVAL_PENDING, "still pending at the agent's deadline", pending)
            headers = {**headers, RESUME_HEADER: pending, "Prefer": f"wait={wait_s}"}
