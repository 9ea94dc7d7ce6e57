"""A fake OpenAI-compatible upstream that answers far faster than any gateway can forward.

It is a bare `asyncio.Protocol` with a hand-rolled HTTP/1.1 parser and precomputed responses, so that in
a benchmark the time spent here is negligible next to the proxy under test.

    python bench/fast_upstream.py --port 0 [--chunk-delay-ms 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import deque
from typing import cast

STREAM_EVENTS = 32
MODEL_ID = "bench-model"


def _json_response(status: str, payload: object) -> bytes:
    body = json.dumps(payload, separators=(",", ":")).encode()
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


MODELS = _json_response(
    "200 OK", {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "owned_by": "bench"}]}
)
NOT_FOUND = _json_response(
    "404 Not Found", {"error": {"message": "not found", "type": "invalid_request_error", "code": 404}}
)
BAD_REQUEST = _json_response(
    "400 Bad Request", {"error": {"message": "bad request", "type": "invalid_request_error", "code": 400}}
)
COMPLETION = _json_response(
    "200 OK",
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": MODEL_ID,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from the bench upstream."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20},
    },
)


def _stream_chunks() -> list[bytes]:
    """Header block, one HTTP chunk per SSE event, then [DONE] and the terminating zero chunk."""
    parts = [
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: text/event-stream\r\n"
        b"Cache-Control: no-cache\r\n"
        b"Transfer-Encoding: chunked\r\n"
        b"\r\n"
    ]
    for i in range(STREAM_EVENTS):
        delta: dict[str, str] = {"content": f"tok{i} "}
        if i == 0:
            delta["role"] = "assistant"
        event = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": MODEL_ID,
            "choices": [
                {"index": 0, "delta": delta, "finish_reason": "stop" if i == STREAM_EVENTS - 1 else None}
            ],
        }
        data = b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"
        parts.append(b"%x\r\n%s\r\n" % (len(data), data))
    done = b"data: [DONE]\n\n"
    parts.append(b"%x\r\n%s\r\n" % (len(done), done))
    parts.append(b"0\r\n\r\n")
    return parts


STREAM_PARTS = _stream_chunks()


class _Request:
    __slots__ = ("body", "close", "method", "path")

    def __init__(self, method: bytes, path: bytes, body: bytes, close: bool) -> None:
        self.method = method
        self.path = path
        self.body = body
        self.close = close


class UpstreamProtocol(asyncio.Protocol):
    """One connection: parse every complete request in the buffer, answer in order."""

    def __init__(self, chunk_delay: float) -> None:
        self.chunk_delay = chunk_delay
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        # A delayed stream answers asynchronously; pipelined requests behind it must wait their turn.
        self.pending: deque[_Request] = deque()
        self.streaming = False
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check here.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while not self.closing:
            req = self._parse_one()
            if req is None:
                break
            self.pending.append(req)
        self._drain_pending()

    def _parse_one(self) -> _Request | None:
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > 65536:
                self._fail()
            return None
        lines = bytes(buf[:end]).split(b"\r\n")
        try:
            method, path, version = lines[0].split(b" ", 2)
        except ValueError:
            self._fail()
            return None
        length = 0
        chunked = False
        close = version == b"HTTP/1.0"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                try:
                    length = int(value.strip())
                except ValueError:
                    self._fail()
                    return None
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                token = value.strip().lower()
                if token == b"close":
                    close = True
                elif token == b"keep-alive":
                    close = False
        start = end + 4
        if chunked:
            decoded = self._dechunk(start)
            if decoded is None:
                return None
            body, consumed = decoded
            del buf[:consumed]
        else:
            if len(buf) < start + length:
                return None
            body = bytes(buf[start : start + length])
            del buf[: start + length]
        return _Request(method, path, body, close)

    def _dechunk(self, pos: int) -> tuple[bytes, int] | None:
        """Decode a chunked request body if it is complete; proxies may stream request bodies this way."""
        buf = self.buf
        out = bytearray()
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            try:
                size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
            except ValueError:
                self._fail()
                return None
            if size == 0:
                tail = buf.find(b"\r\n\r\n", eol)
                if tail < 0:
                    return None
                return bytes(out), tail + 4
            if len(buf) < eol + 2 + size + 2:
                return None
            out += buf[eol + 2 : eol + 2 + size]
            pos = eol + 2 + size + 2

    def _fail(self) -> None:
        self.closing = True
        self.pending.clear()
        if self.transport is not None:
            self.transport.write(BAD_REQUEST)
            self.transport.close()

    def _drain_pending(self) -> None:
        transport = self.transport
        while self.pending and not self.streaming and transport is not None and not transport.is_closing():
            req = self.pending.popleft()
            if req.path.startswith(b"/v1/chat/completions") and req.method == b"POST":
                if b'"stream": true' in req.body or b'"stream":true' in req.body:
                    if self.chunk_delay > 0:
                        self.streaming = True
                        asyncio.get_running_loop().create_task(self._slow_stream(req))
                        return
                    transport.writelines(STREAM_PARTS)
                else:
                    transport.write(COMPLETION)
            elif req.path.startswith(b"/v1/models") and req.method == b"GET":
                transport.write(MODELS)
            else:
                transport.write(NOT_FOUND)
            if req.close:
                self.closing = True
                transport.close()
                return

    async def _slow_stream(self, req: _Request) -> None:
        transport = self.transport
        assert transport is not None
        try:
            transport.writelines(STREAM_PARTS[:2])
            for part in STREAM_PARTS[2:-1]:
                await asyncio.sleep(self.chunk_delay)
                if transport.is_closing():
                    return
                transport.write(part)
            transport.write(STREAM_PARTS[-1])
        finally:
            self.streaming = False
        if req.close:
            self.closing = True
            transport.close()
            return
        self._drain_pending()


async def serve(host: str, port: int, chunk_delay_ms: float) -> None:
    loop = asyncio.get_running_loop()
    delay = chunk_delay_ms / 1000.0
    server = await loop.create_server(lambda: UpstreamProtocol(delay), host, port, backlog=1024)
    if port == 0:
        bound = server.sockets[0].getsockname()[1]
        sys.stdout.write(f"listening http://{host}:{bound}\n")
        sys.stdout.flush()
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fake OpenAI upstream for benchmarks.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0, help="pause between streamed events")
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(serve(args.host, args.port, args.chunk_delay_ms))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
