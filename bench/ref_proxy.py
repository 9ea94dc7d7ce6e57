"""Yardstick: the barest proxy on the gateway's stack. python bench/ref_proxy.py --port N --upstream URL"""

from __future__ import annotations

import argparse
from typing import Any

import aiohttp
import uvicorn

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host"}
UPSTREAM = ""
_session: aiohttp.ClientSession | None = None


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global _session
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        if _session is not None:
            await _session.close()
        await send({"type": "lifespan.shutdown.complete"})
        return
    body, more = b"", True
    while more:
        msg = await receive()
        body, more = body + msg.get("body", b""), msg.get("more_body", False)
    if _session is None:
        # Created here, not at import, so it binds to uvicorn's running loop.
        _session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
    headers = {k.decode(): v.decode() for k, v in scope["headers"] if k.decode() not in HOP}
    query = scope["query_string"].decode()
    url = UPSTREAM + scope["raw_path"].decode() + (f"?{query}" if query else "")
    async with _session.request(scope["method"], url, data=body, headers=headers) as resp:
        out = [(k.lower().encode(), v.encode()) for k, v in resp.headers.items() if k.lower() not in HOP]
        if resp.content_type == "text/event-stream":
            await send({"type": "http.response.start", "status": resp.status, "headers": out})
            async for chunk in resp.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        else:
            data = await resp.read()
            out.append((b"content-length", str(len(data)).encode()))
            await send({"type": "http.response.start", "status": resp.status, "headers": out})
            await send({"type": "http.response.body", "body": data})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Bare reference proxy for the overhead benchmark.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    UPSTREAM = args.upstream.rstrip("/")
    uvicorn.run(app, host=args.host, port=args.port, loop="uvloop", http="httptools", access_log=False)
