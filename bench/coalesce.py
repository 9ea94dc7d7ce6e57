"""Coalescing and cache-hit benchmark: how much upstream work does request sharing save, and what does a
cache hit cost?

Two measurements, in one run, against emulated nodes (vampire.MockNode) and an in-process gateway
(vampire.App under uvicorn), all on 127.0.0.1 in one asyncio loop:

1. Coalescing. N concurrent identical streaming chat requests (temperature 0) reach the gateway while one
   answer takes ~0.6 s to generate. Prints how many upstream generations were made, how many clients got
   the same bytes ending in `data: [DONE]`, the X-Vampire-Cache outcomes and the wall time; then the same
   N requests at temperature 0.7, which must not be shared, for comparison.

2. Cache-hit latency. With an instant node, one request warms the cache, then M requests straight to the
   node alternate with M through the gateway (each a cache hit), each path on one keep-alive connection.
   Prints client-side p50/p99 for both, their ratio, the gateway's own time per hit measured around its
   ASGI app, and checks that the node saw no request from the gateway during the loop.

    python bench/coalesce.py               # N=100, M=2000, well under 60 s
    python bench/coalesce.py --quick       # N=30, M=300, under 15 s
    python bench/coalesce.py --n 200 --m 5000
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import vampire

MODEL = "qwen/qwen3-4b"
CHAT_PATH = "/v1/chat/completions"
# Marks the benchmark's own direct calls, so the node's request log can tell them from the gateway's.
DIRECT_MARK = "x-bench-direct"
COALESCE_TPS = 50.0
COALESCE_TOKENS = 32
WARMUP_ROUNDS = 50
HIT_BUDGET_US = 1000.0


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


class ServerClock:
    """Wraps the gateway's ASGI app and, while recording, keeps how long each HTTP request took from the
    ASGI call until its last body message was handed to the server: the gateway's own time, without the
    client, the kernel or the event loop's queueing in front of it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.recording = False
        self.samples_ns: list[int] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.recording or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter_ns()
        samples = self.samples_ns

        async def timed_send(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                samples.append(time.perf_counter_ns() - started)

        await self.app(scope, receive, timed_send)


class Gateway:
    """An in-process gateway in front of the given nodes, served by uvicorn on an ephemeral port."""

    def __init__(self, urls: list[str], data_dir: Path, refresh_s: float) -> None:
        settings = vampire.Settings.load(env={}, config_file=data_dir / "none.toml")
        settings.data_dir, settings.nodes, settings.discover_local = data_dir, urls, False
        settings.refresh_s = refresh_s
        self.app = vampire.App(settings)
        self.clock = ServerClock(self.app)
        # Same server options as `vampire serve`, so the hit path costs what it costs in production.
        config = uvicorn.Config(
            self.clock,
            host="127.0.0.1",
            port=0,
            log_level="warning",
            lifespan="on",
            access_log=False,
            server_header=False,
        )
        self.server = uvicorn.Server(config)
        self.task: asyncio.Task[None] | None = None
        self.url = ""

    async def start(self) -> str:
        self.task = asyncio.ensure_future(self.server.serve())
        while not self.server.started:
            if self.task.done():
                self.task.result()  # surfaces the startup error instead of spinning forever
            await asyncio.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await self.task


class RawConn:
    """One persistent HTTP/1.1 connection on raw asyncio streams. aiohttp's client spends more per request
    than a cache hit costs the gateway, which would flatten the difference being measured."""

    def __init__(self, url: str) -> None:
        host_port = url.removeprefix("http://")
        host, _, port = host_port.partition(":")
        self.host, self.port = host, int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except ConnectionError:
                pass

    def request_bytes(self, path: str, body: bytes, extra: Sequence[tuple[str, str]] = ()) -> bytes:
        lines = [
            f"POST {path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            *(f"{k}: {v}" for k, v in extra),
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    async def send(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        assert self.reader is not None and self.writer is not None
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = await self._read_chunked()
        else:
            raise RuntimeError("response has neither Content-Length nor chunked framing; cannot keep alive")
        return status, headers, body

    async def _read_chunked(self) -> bytes:
        assert self.reader is not None
        parts: list[bytes] = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")  # no trailers are expected, only the final CRLF
                return b"".join(parts)
            parts.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)


def chat_body(temperature: float, stream: bool, content: str) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "temperature": temperature,
        "stream": stream,
    }


# ── 1. coalescing ──────────────────────────────────────────────────────────────────────────────────────


async def burst(base: str, n: int, body: dict[str, Any]) -> tuple[list[tuple[int, str, bytes]], float]:
    """N identical requests launched together; returns (status, cache outcome, body) per client, wall time."""
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

        async def one() -> tuple[int, str, bytes]:
            async with http.post(f"{base}{CHAT_PATH}", json=body) as resp:
                return resp.status, resp.headers.get("X-Vampire-Cache", "-"), await resp.read()

        started = time.perf_counter()
        results = await asyncio.gather(*(one() for _ in range(n)))
        return list(results), time.perf_counter() - started


def summarise_burst(
    label: str, node: vampire.MockNode, before: int, results: list[tuple[int, str, bytes]], wall: float
) -> dict[str, Any]:
    generations = node.stats.generations_started - before
    outcomes = Counter(cache for _, cache, _ in results)
    # The first client's answer is the reference; a shared answer must reach every client unchanged.
    reference = next((b for _, cache, b in results if cache == "miss"), results[0][2])
    complete = reference.rstrip().endswith(b"data: [DONE]")
    identical = sum(1 for status, _, b in results if status == 200 and b == reference and complete)
    distinct = len({b for _, _, b in results})
    errors = sum(1 for status, _, _ in results if status != 200)
    print(
        f"  {label:<16} generations {generations:>4}   identical+[DONE] {identical:>4}/{len(results)}   "
        f"distinct bodies {distinct:>4}   outcomes {dict(sorted(outcomes.items()))}   errors {errors}   "
        f"wall {wall * 1000:7.1f} ms"
    )
    return {"generations": generations, "identical": identical, "errors": errors, "outcomes": outcomes}


async def coalescing(n: int) -> bool:
    seconds = COALESCE_TOKENS / COALESCE_TPS
    print(
        f"1. Coalescing: {n} concurrent identical streaming chat requests, one node "
        f"(tps={COALESCE_TPS:g}, completion_tokens={COALESCE_TOKENS}, ~{seconds:.2f} s per answer)"
    )
    # Enough slots for every request at once, so the unshared run measures generation, not queueing.
    model = vampire.MockModel(MODEL, loaded=True, parallel=max(4, n))
    node = vampire.MockNode([model], tps=COALESCE_TPS, completion_tokens=COALESCE_TOKENS)
    url = await node.start("127.0.0.1", 0)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            gateway = Gateway([url], Path(tmp), refresh_s=3600.0)
            base = await gateway.start()
            try:
                before = node.stats.generations_started
                results, wall = await burst(base, n, chat_body(0, True, "Why is the sky blue?"))
                shared = summarise_burst("temperature 0", node, before, results, wall)
                before = node.stats.generations_started
                results, wall = await burst(base, n, chat_body(0.7, True, "Why is the sky blue?"))
                unshared = summarise_burst("temperature 0.7", node, before, results, wall)
                async with aiohttp.ClientSession() as http, http.get(f"{base}/vampire/v1/cache") as resp:
                    stats = await resp.json() if resp.status == 200 else {"status": resp.status}
                print(f"  gateway cache stats: {json.dumps(stats, separators=(', ', ': '))}")
            finally:
                await gateway.stop()
    finally:
        await node.stop()
    ok = shared["generations"] == 1 and shared["identical"] == n and unshared["generations"] == n
    ok = ok and not shared["errors"] and not unshared["errors"]
    print(
        f"  -> {n} clients served by {shared['generations']} generation(s) instead of "
        f"{unshared['generations']} ({'OK' if ok else 'UNEXPECTED'})"
    )
    return ok


# ── 2. cache-hit latency ───────────────────────────────────────────────────────────────────────────────


async def cache_hits(m: int) -> bool:
    print(
        f"\n2. Cache-hit latency: {m} direct calls interleaved with {m} gateway cache hits, "
        "one keep-alive connection per path, instant node (tps=0)"
    )
    node = vampire.MockNode([vampire.MockModel(MODEL, loaded=True)], tps=0)
    url = await node.start("127.0.0.1", 0)
    ok = True
    try:
        with tempfile.TemporaryDirectory() as tmp:
            # No refresh during the run: a probe would show up in the node's log and in the timings.
            gateway = Gateway([url], Path(tmp), refresh_s=3600.0)
            base = await gateway.start()
            direct, through = RawConn(url), RawConn(base)
            await direct.open()
            await through.open()
            try:
                ok = await hit_loop(node, gateway, direct, through, m)
            finally:
                await direct.close()
                await through.close()
                await gateway.stop()
    finally:
        await node.stop()
    return ok


async def hit_loop(
    node: vampire.MockNode, gateway: Gateway, direct: RawConn, through: RawConn, m: int
) -> bool:
    body = json.dumps(chat_body(0, False, "What is the capital of France?"), separators=(",", ":")).encode()
    direct_raw = direct.request_bytes(CHAT_PATH, body, [(DIRECT_MARK, "1")])
    gateway_raw = through.request_bytes(CHAT_PATH, body)

    status, headers, cached = await through.send(gateway_raw)
    if status != 200 or headers.get("x-vampire-cache") != "miss":
        raise RuntimeError(f"warm-up request: status {status}, cache {headers.get('x-vampire-cache')!r}")

    async def one(conn: RawConn, raw: bytes, is_gateway: bool, out: list[int] | None) -> None:
        started = time.perf_counter_ns()
        status, headers, answer = await conn.send(raw)
        elapsed = time.perf_counter_ns() - started
        if status != 200:
            raise RuntimeError(f"{'gateway' if is_gateway else 'direct'} call answered {status}")
        if is_gateway:
            assert headers.get("x-vampire-cache") == "hit", f"expected a cache hit, got {headers}"
            assert answer == cached, "a cache hit returned different bytes than the answer it cached"
        if out is not None:
            out.append(elapsed)

    # Untimed rounds first, so connection set-up and first-call costs stay out of the figures.
    for _ in range(WARMUP_ROUNDS):
        await one(direct, direct_raw, False, None)
        await one(through, gateway_raw, True, None)

    direct_ns: list[int] = []
    gateway_ns: list[int] = []
    seen_before = len(node.received)
    gc.collect()
    gateway.clock.samples_ns.clear()
    gateway.clock.recording = True
    try:
        for i in range(m):
            # Swapping which path goes first each round keeps any order effect out of the comparison.
            if i % 2:
                await one(through, gateway_raw, True, gateway_ns)
                await one(direct, direct_raw, False, direct_ns)
            else:
                await one(direct, direct_raw, False, direct_ns)
                await one(through, gateway_raw, True, gateway_ns)
    finally:
        gateway.clock.recording = False
    during = node.received[seen_before:]
    from_gateway = sum(1 for r in during if DIRECT_MARK not in r.headers)
    from_bench = len(during) - from_gateway

    direct_ns.sort()
    gateway_ns.sort()
    server_ns = sorted(gateway.clock.samples_ns)
    d50, d99 = percentile(direct_ns, 0.50) / 1000, percentile(direct_ns, 0.99) / 1000
    g50, g99 = percentile(gateway_ns, 0.50) / 1000, percentile(gateway_ns, 0.99) / 1000
    s50, s99 = percentile(server_ns, 0.50) / 1000, percentile(server_ns, 0.99) / 1000
    print(f"  {'path':<28} {'p50 µs':>9} {'p99 µs':>9}")
    print(f"  {'direct (node computes)':<28} {d50:>9.1f} {d99:>9.1f}")
    print(f"  {'gateway (cache hit)':<28} {g50:>9.1f} {g99:>9.1f}")
    print(f"  {'gateway-hit / direct':<28} {g50 / d50:>8.2f}x {g99 / d99:>8.2f}x")
    print(
        f"  {'gateway time per hit (ASGI)':<28} {s50:>9.1f} {s99:>9.1f}   "
        f"({len(server_ns)} samples, target well under {HIT_BUDGET_US:.0f} µs)"
    )
    print(
        f"  node requests during the loop: {from_bench} direct (expected {m}), {from_gateway} from the gateway "
        "(expected 0)"
    )
    ok = from_gateway == 0 and from_bench == m and len(server_ns) == m and s99 < HIT_BUDGET_US
    print(f"  -> all {m} gateway calls were cache hits; {'OK' if ok else 'UNEXPECTED'}")
    return ok


async def main_async(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    ok = await coalescing(args.n)
    ok = await cache_hits(args.m) and ok
    print(f"\ntotal {time.perf_counter() - started:.1f} s")
    return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=None, help="concurrent identical requests (default 100)")
    parser.add_argument("--m", type=int, default=None, help="timed requests per path (default 2000)")
    parser.add_argument("--quick", action="store_true", help="smaller run, under 15 s (N=30, M=300)")
    args = parser.parse_args()
    args.n = args.n if args.n is not None else (30 if args.quick else 100)
    args.m = args.m if args.m is not None else (300 if args.quick else 2000)
    if args.n < 1 or args.m < 1:
        parser.error("--n and --m must be at least 1")
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
