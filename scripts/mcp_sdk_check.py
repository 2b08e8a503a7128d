"""warden's /mcp driven by the official MCP Python SDK, as an agent would.

Run by scripts/mcp-sdk.sh against a running warden: WARDEN_MCP_URL and
WARDEN_KEY name it, MCP_AGENT_ID an agent new to it to report as. The
key's rate limit is expected to be low enough that a burst of calls is
refused. Exits non-zero, saying what failed.
Works with the SDK's 1.x and 2.x interfaces.
"""

import asyncio
import os
import sys

from mcp import ClientSession
import mcp.client.streamable_http as transport

URL = os.environ["WARDEN_MCP_URL"]
KEY = os.environ["WARDEN_KEY"]
AGENT = os.environ.get("MCP_AGENT_ID", "sdk-agent")


def connect():
    headers = {"Authorization": f"Bearer {KEY}"}
    if hasattr(transport, "streamablehttp_client"):  # 1.x
        return transport.streamablehttp_client(URL, headers=headers)
    return transport.streamable_http_client(URL, http_client=transport.create_mcp_http_client(headers=headers))


def field(result, snake, camel):
    return getattr(result, snake, None) if hasattr(result, snake) else getattr(result, camel, None)


def check(ok, what):
    if not ok:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


async def main():
    async with connect() as streams:
        async with ClientSession(streams[0], streams[1]) as session:
            init = await session.initialize()
            version = field(init, "protocol_version", "protocolVersion")
            check(bool(version), f"initialize negotiated protocol {version}")

            tools = {t.name: t for t in (await session.list_tools()).tools}
            check(set(tools) == {"heartbeat", "agent_status"}, f"tools/list names both tools: {sorted(tools)}")
            for name, tool in tools.items():
                check(field(tool, "output_schema", "outputSchema") is not None, f"{name} declares an outputSchema")

            # The SDK validates structured results against the outputSchema.
            beat = await session.call_tool("heartbeat", {"agent_id": AGENT, "metrics": {"cpu": 12.5}})
            content = field(beat, "structured_content", "structuredContent") or {}
            check(not field(beat, "is_error", "isError") and content.get("status") == "alive",
                  f"heartbeat recorded: {content}")
            status = await session.call_tool("agent_status", {"agent_id": AGENT})
            content = field(status, "structured_content", "structuredContent") or {}
            check(content.get("heartbeat_count") == 1, f"agent_status reads it back: {content}")

            bad = await session.call_tool("heartbeat", {"agent_id": AGENT, "uptime_seconds": -1})
            text = " ".join(getattr(c, "text", "") for c in bad.content)
            check(field(bad, "is_error", "isError") and "uptime_seconds" in text,
                  f"bad arguments are a tool error naming the field: {text}")

            # Past the key's rate limit each call fails on its own, and the
            # session goes on once tokens are back.
            refused = None
            for _ in range(40):
                try:
                    await session.call_tool("heartbeat", {"agent_id": AGENT})
                except Exception as e:  # the SDK's McpError / MCPError
                    refused = e
                    break
            check(refused is not None and "too many requests" in str(refused),
                  f"a call past the rate limit raises the SDK's error: {refused!r}")
            data = getattr(getattr(refused, "error", None), "data", None) or getattr(refused, "data", None) or {}
            wait = float(data.get("retry_after", 2)) if isinstance(data, dict) else 2.0
            for _ in range(10):
                await asyncio.sleep(wait)
                try:
                    again = await session.call_tool("heartbeat", {"agent_id": AGENT})
                    break
                except Exception:
                    continue
            else:
                check(False, "the session takes calls again once tokens are back")
            check(not field(again, "is_error", "isError"), "the same session takes calls again after the limit")


asyncio.run(asyncio.wait_for(main(), 120))
