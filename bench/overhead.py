"""Gateway overhead benchmark: what does Vampire add on top of talking to the upstream directly?

These paths are measured in one run, interleaved so that machine drift hits them equally:

  direct     client -> upstream
  ref_proxy  client -> bench/ref_proxy.py (uvicorn + aiohttp, nothing else) -> upstream
  gateway    client -> python vampire.py serve --node UPSTREAM -> upstream, result cache bypassed
             (`Cache-Control: no-store`)
  governed   the same gateway, called with a client key whose realm has a quota (rpm, tpm, concurrency),
             so key checks, quota bookkeeping, the ledger and metrics are all on the path
  cache_hit  the same gateway, a deterministic request (temperature 0) that the result cache answers

Targets (ratios in the same run): gateway throughput >= 1.0x the reference proxy at every concurrency,
non-streaming and 32-chunk streaming; server CPU per request and per streamed chunk <= 1.1x the
reference's; added latency p50 <= 0.25 ms, p99 <= 0.6 ms; governed within 10 % of the plain gateway;
cache hits >= 2x the reference's forwarding throughput at c=64; idle RSS <= 50 MiB.

The upstream is bench/fast_upstream.py unless --target names a real server. The load generator is a
hand-written HTTP/1.1 client on raw asyncio streams because on a 2-core machine any heavier client would be
the bottleneck and hide the differences being measured.

    python bench/overhead.py                 # full run, under 2 minutes
    python bench/overhead.py --quick         # under 30 seconds
    python bench/overhead.py --gateway-cmd "{python} bench/ref_proxy.py --port {port} --upstream {upstream}"
    python bench/overhead.py --target http://127.0.0.1:8080 --model my-model --requests 200
    python bench/overhead.py --no-governed --no-cache-hit    # only direct, ref_proxy and gateway
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import http.client
import json
import math
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STREAM_CHUNKS = 32  # events per stream from bench/fast_upstream.py
CHAT_PATH = "/v1/chat/completions"
DEFAULT_GATEWAY_CMD = "{python} -m vampire serve --host 127.0.0.1 --port {port} --node {upstream}"
READY_DEADLINE_S = 20.0

TARGET_ADDED_P50_MS = 0.25
TARGET_ADDED_P99_MS = 0.6
TARGET_FIRST_BYTE_MS = 0.75
TARGET_RATIO = 1.0  # gateway / reference proxy throughput, every concurrency
TARGET_CPU_RATIO = 1.1  # gateway / reference proxy server CPU per request and per streamed chunk
TARGET_GOVERNED_RATIO = 0.9  # governed / plain gateway throughput
TARGET_CACHE_HIT_RATIO = 2.0  # cache hits / reference proxy forwarding throughput at c=64
TARGET_IDLE_RSS_MIB = 50.0


class BenchError(RuntimeError):
    """A setup or run failure that should end the run with a readable message, not a traceback."""


def log(msg: str) -> None:
    sys.stderr.write(f"[overhead] {msg}\n")
    sys.stderr.flush()


# --------------------------------------------------------------------------------------------------
# Raw HTTP/1.1 client


class HttpConn:
    """One persistent keep-alive connection; parses only status, framing headers and the body length."""

    __slots__ = ("buf", "closed", "host", "port", "reader", "t_read", "writer")

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.buf = bytearray()
        self.closed = True
        self.t_read = 0.0

    async def open(self) -> None:
        self.close()
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.buf = bytearray()
        self.closed = False

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None
        self.closed = True

    async def _fill(self) -> None:
        assert self.reader is not None
        data = await self.reader.read(262144)
        if not data:
            self.closed = True
            raise ConnectionError("connection closed by server")
        # Stamped on arrival so that first-byte times are not inflated by parsing.
        self.t_read = time.perf_counter()
        self.buf += data

    async def request(self, payload: bytes, keep_body: bool = False) -> tuple[int, float, float, bytes]:
        """Send one request; return (status, first body byte time, end time, body if kept)."""
        if self.closed:
            await self.open()
        assert self.writer is not None
        self.writer.write(payload)
        buf = self.buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            await self._fill()
        head = bytes(buf[:end])
        del buf[: end + 4]
        status = int(head[9:12])
        length = -1
        chunked = False
        close = head.startswith(b"HTTP/1.0")
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                close = value.strip().lower() == b"close"
        if not buf and (chunked or length > 0 or length < 0) and status not in (204, 304):
            await self._fill()
        first = self.t_read if buf else time.perf_counter()
        body = b""
        if chunked:
            body = await self._read_chunked(keep_body)
        elif length >= 0:
            while len(buf) < length:
                await self._fill()
            if keep_body:
                body = bytes(buf[:length])
            del buf[:length]
        elif status not in (204, 304):
            # No framing header: the body runs to the end of the connection.
            with contextlib.suppress(ConnectionError):
                while True:
                    await self._fill()
            body = bytes(buf) if keep_body else b""
            buf.clear()
            close = True
        done = time.perf_counter()
        if close:
            self.close()
        return status, first, done, body

    async def _read_chunked(self, keep_body: bool) -> bytes:
        buf = self.buf
        out = bytearray()
        pos = 0
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                await self._fill()
                continue
            size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
            if size == 0:
                # No trailers gives "0\r\n\r\n"; with trailers the blank line comes later, same search.
                tail = buf.find(b"\r\n\r\n", eol)
                if tail < 0:
                    await self._fill()
                    continue
                del buf[: tail + 4]
                return bytes(out)
            nxt = eol + 2 + size + 2
            if len(buf) < nxt:
                await self._fill()
                continue
            if keep_body:
                out += buf[eol + 2 : eol + 2 + size]
            pos = nxt


def build_request(
    host: str, port: int, path: str, body: bytes, api_key: str | None, extra: tuple[str, ...] = ()
) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        "Accept: */*",
        f"Content-Length: {len(body)}",
        *extra,
    ]
    if api_key:
        lines.append(f"Authorization: Bearer {api_key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def chat_body(model: str, stream: bool, max_tokens: int, **extra: Any) -> bytes:
    payload = {
        "model": model,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": max_tokens,
        "stream": stream,
        **extra,
    }
    return json.dumps(payload).encode()


# --------------------------------------------------------------------------------------------------
# Subprocesses


@dataclass
class Proc:
    """A child in its own process group so that it and anything it spawns can be ended together."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    spawned: float = field(default_factory=time.monotonic)
    ready_after: float = math.nan

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, limit: int = 2000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text[-limit:]

    def stop(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        else:
            # The leader may be gone while children it started are still in the group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


def spawn(
    name: str, argv: list[str], logdir: Path, env: dict[str, str] | None = None, pipe_stdout: bool = False
) -> Proc:
    log_path = logdir / f"{name}.log"
    with open(log_path, "wb") as log_file:
        popen = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipe_stdout else log_file,
            stderr=log_file,
            start_new_session=True,
        )
    return Proc(name, popen, log_path)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def read_listening_line(proc: Proc, timeout: float) -> int:
    """fast_upstream started on port 0 announces the bound port on its first stdout line."""
    import selectors

    assert proc.popen.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.popen.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            raise BenchError(f"{proc.name} did not announce its port within {timeout}s\n{proc.log_tail()}")
        line = proc.popen.stdout.readline().decode().strip()
    finally:
        sel.close()
    if not line.startswith("listening "):
        raise BenchError(f"{proc.name} printed {line!r} instead of its address\n{proc.log_tail()}")
    return int(line.rsplit(":", 1)[1])


def http_get(port: int, path: str, headers: dict[str, str], host: str = "127.0.0.1") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=2)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def http_post_json(port: int, path: str, payload: dict[str, Any]) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("POST", path, body=json.dumps(payload), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status >= 300:
        raise BenchError(f"POST {path} answered {resp.status}: {body[:300]!r}")
    return dict(json.loads(body))


def governed_key(port: int) -> str:
    """A client key in a realm with quotas too large to refuse anything, so every request pays for the key
    check and the quota bookkeeping without being limited."""
    limits = {"rpm": 10**9, "tpm": 10**12, "max_concurrent": 100_000}
    http_post_json(port, "/vampire/v1/realms", {"name": "bench", **limits})
    return str(http_post_json(port, "/vampire/v1/keys", {"name": "bench", "realm": "bench", **limits})["key"])


def model_listed(body: bytes, model: str) -> bool:
    try:
        data = json.loads(body)
    except ValueError:
        return False
    entries = data.get("data") if isinstance(data, dict) else None
    return isinstance(entries, list) and any(isinstance(e, dict) and e.get("id") == model for e in entries)


def wait_ready(
    proc: Proc | None,
    host: str,
    port: int,
    prefix: str,
    model: str,
    headers: dict[str, str],
    check_health: bool,
    deadline_s: float = READY_DEADLINE_S,
) -> float:
    """Poll /healthz (if asked) then /v1/models until the model is listed; return seconds taken."""
    name = proc.name if proc else f"{host}:{port}"
    start = time.monotonic()
    deadline = start + deadline_s
    stage = "healthz" if check_health else "models"
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise BenchError(f"{name} exited with code {proc.popen.returncode}\n{proc.log_tail()}")
        try:
            if stage == "healthz":
                status, _ = http_get(port, prefix + "/healthz", headers, host)
                # Any answer below 500 means the listener is up; a stand-in without /healthz answers 404.
                if status < 500:
                    stage = "models"
                    continue
                last = f"/healthz answered {status}"
            else:
                status, body = http_get(port, prefix + "/v1/models", headers, host)
                if status == 200 and model_listed(body, model):
                    if proc is not None:
                        proc.ready_after = time.monotonic() - proc.spawned
                    return time.monotonic() - start
                last = f"/v1/models answered {status}: {body[:200]!r}"
        except (OSError, http.client.HTTPException) as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.05)
    tail = proc.log_tail() if proc else ""
    raise BenchError(f"{name} not ready within {deadline_s}s at stage {stage} ({last})\n{tail}")


# --------------------------------------------------------------------------------------------------
# /proc readings


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        # The command name may contain spaces and parentheses; fields resume after the last ')'.
        fields = stat[stat.rfind(b")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def process_tree(pid: int) -> list[int]:
    children = _children_map()
    out, todo = [], [pid]
    while todo:
        cur = todo.pop()
        out.append(cur)
        todo.extend(children.get(cur, []))
    return out


def rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def tree_rss_mib(pid: int) -> float | None:
    values = [v for p in process_tree(pid) if (v := rss_mib(p)) is not None]
    return sum(values) if values else None


CLK_TCK = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


# --------------------------------------------------------------------------------------------------
# Measurements


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo = math.floor(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


@dataclass
class Endpoint:
    name: str
    host: str
    port: int
    plain: bytes
    stream: bytes
    server_pid: int | None
    conn: HttpConn = field(init=False)

    def __post_init__(self) -> None:
        self.conn = HttpConn(self.host, self.port)


def rotated(items: tuple[T, ...] | list[T], k: int) -> list[T]:
    k %= len(items)
    return list(items[k:]) + list(items[:k])


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Keep the client's own collector out of the latency samples; it would land in whichever path ran."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def checked_request(
    ep: Endpoint, payload: bytes, keep_body: bool = False
) -> tuple[int, float, float, bytes]:
    """A c=1 request whose transport failure ends the run with the path's name instead of a traceback."""
    try:
        return await ep.conn.request(payload, keep_body)
    except (OSError, ValueError, IndexError) as exc:
        ep.conn.close()
        raise BenchError(f"{ep.name}: request failed: {exc!r}") from exc


async def warmup(endpoints: list[Endpoint], plain_n: int, stream_n: int) -> dict[str, list[str]]:
    """Warm every path, and check once per path that answers look like chat completions."""
    problems: dict[str, list[str]] = {}
    for ep in endpoints:
        issues: list[str] = []
        async with asyncio.timeout(30):
            status, _, _, body = await checked_request(ep, ep.plain, keep_body=True)
            if status != 200:
                issues.append(f"non-streaming status {status}: {body[:200]!r}")
            else:
                try:
                    parsed = json.loads(body)
                    if not isinstance(parsed, dict) or not parsed.get("choices"):
                        issues.append("non-streaming answer has no choices")
                except ValueError:
                    issues.append(f"non-streaming answer is not JSON: {body[:200]!r}")
            status, _, _, body = await checked_request(ep, ep.stream, keep_body=True)
            events = body.count(b"data:")
            if status != 200:
                issues.append(f"streaming status {status}: {body[:200]!r}")
            elif b"[DONE]" not in body:
                issues.append(f"stream has {events} events and no [DONE]")
            for _ in range(plain_n):
                await checked_request(ep, ep.plain)
            for _ in range(stream_n):
                await checked_request(ep, ep.stream)
        note = f"; PROBLEMS: {issues}" if issues else ""
        log(f"warm {ep.name}: stream carried {events} data events{note}")
        if issues:
            problems[ep.name] = issues
    return problems


async def latency_phase(
    endpoints: list[Endpoint], stream: bool, n: int, block: int, time_cap: float
) -> dict[str, dict[str, Any]]:
    """c=1 latency, alternating blocks of `block` requests per path, rotating which path goes first."""
    total: dict[str, list[float]] = {ep.name: [] for ep in endpoints}
    first: dict[str, list[float]] = {ep.name: [] for ep in endpoints}
    errors = dict.fromkeys(total, 0)
    started = time.monotonic()
    rnd = 0
    while min(len(v) for v in total.values()) < n and time.monotonic() - started < time_cap:
        for ep in rotated(endpoints, rnd):
            count = min(block, n - len(total[ep.name]))
            payload = ep.stream if stream else ep.plain
            tot, fst = total[ep.name], first[ep.name]
            async with asyncio.timeout(30):
                with gc_paused():
                    for _ in range(count):
                        t0 = time.perf_counter()
                        status, t_first, t_end, _ = await checked_request(ep, payload)
                        if status != 200:
                            errors[ep.name] += 1
                        tot.append(t_end - t0)
                        fst.append(t_first - t0)
            gc.collect(0)
        rnd += 1
    out: dict[str, dict[str, Any]] = {}
    for name in total:
        ms_total = [v * 1000 for v in total[name]]
        ms_first = [v * 1000 for v in first[name]]
        out[name] = {
            "n": len(ms_total),
            "errors": errors[name],
            "p50_ms": percentile(ms_total, 0.5),
            "p99_ms": percentile(ms_total, 0.99),
            "first_p50_ms": percentile(ms_first, 0.5),
            "first_p99_ms": percentile(ms_first, 0.99),
        }
    return out


async def throughput_round(
    ep: Endpoint, payload: bytes, concurrency: int, duration: float
) -> dict[str, float]:
    conns = [HttpConn(ep.host, ep.port) for _ in range(concurrency)]
    ok = 0
    errors = 0
    try:
        async with asyncio.timeout(20):
            await asyncio.gather(*(c.open() for c in conns))
            # One untimed request per connection so that connection setup, on both hops, is not counted.
            await asyncio.gather(*(c.request(payload) for c in conns))
        cpu0 = tree_cpu_seconds(ep.server_pid) if ep.server_pid else 0.0
        t0 = time.perf_counter()
        deadline = t0 + duration

        async def worker(conn: HttpConn) -> None:
            nonlocal ok, errors
            while True:
                try:
                    status, _, t_end, _ = await conn.request(payload)
                except (OSError, ValueError, IndexError) as exc:
                    errors += 1
                    conn.close()
                    if errors > 200:
                        raise BenchError(f"{ep.name}: too many failed requests ({exc!r})") from exc
                    await asyncio.sleep(0.01)
                    if time.perf_counter() > deadline:
                        return
                    continue
                if t_end > deadline:
                    return
                if status == 200:
                    ok += 1
                else:
                    errors += 1

        async with asyncio.timeout(duration + 20):
            await asyncio.gather(*(worker(c) for c in conns))
        cpu1 = tree_cpu_seconds(ep.server_pid) if ep.server_pid else 0.0
    finally:
        for c in conns:
            c.close()
    return {
        "ok": ok,
        "errors": errors,
        "seconds": duration,
        "cpu_s": cpu1 - cpu0 if ep.server_pid else math.nan,
    }


async def throughput_phase(
    endpoints: list[Endpoint], concurrencies: list[int], duration: float, rounds: int
) -> dict[str, dict[str, Any]]:
    configs = [(c, s) for s in (False, True) for c in concurrencies]
    acc: dict[str, dict[str, list[dict[str, float]]]] = {}
    step = 0
    for rnd in range(rounds):
        for conc, stream in configs:
            key = f"c{conc}_{'stream' if stream else 'plain'}"
            for ep in rotated(endpoints, step):
                res = await throughput_round(ep, ep.stream if stream else ep.plain, conc, duration)
                acc.setdefault(key, {}).setdefault(ep.name, []).append(res)
                gc.collect()
            step += 1
            log(
                f"throughput round {rnd + 1}/{rounds} {key}: "
                + ", ".join(
                    f"{name} {runs[-1]['ok'] / runs[-1]['seconds']:.0f}/s" for name, runs in acc[key].items()
                )
            )
    out: dict[str, dict[str, Any]] = {}
    for key, per_path in acc.items():
        out[key] = {}
        for name, runs in per_path.items():
            ok = sum(r["ok"] for r in runs)
            secs = sum(r["seconds"] for r in runs)
            cpu = sum(r["cpu_s"] for r in runs)
            out[key][name] = {
                "rps": ok / secs if secs else 0.0,
                "rounds_rps": [r["ok"] / r["seconds"] for r in runs],
                "errors": sum(r["errors"] for r in runs),
                "server_cpu_us_per_req": (cpu / ok * 1e6) if ok else math.nan,
            }
    return out


# --------------------------------------------------------------------------------------------------
# Report


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def verdict(value: float | None, limit: float, higher_is_better: bool = False) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    ok = value >= limit if higher_is_better else value <= limit
    return "PASS" if ok else "MISS"


def build_report(fig: dict[str, Any]) -> tuple[list[list[str]], list[dict[str, Any]]]:
    """Table rows (metric, one cell per path, gw/direct, gw/ref, target, result) and the target checks."""
    paths = fig["paths"]
    rows: list[list[str]] = []
    checks: list[dict[str, Any]] = []

    def check(name: str, value: float | None, limit: float, higher: bool) -> tuple[str, str]:
        target = f"{'>=' if higher else '<='} {limit:g}"
        res = verdict(value, limit, higher)
        checks.append({"check": name, "value": value, "target": target, "result": res})
        return target, res

    def row(
        metric: str,
        vals: dict[str, float | None],
        digits: int = 3,
        ratios: bool = False,
        target: tuple[str, float | None, float, bool] | None = None,
    ) -> None:
        """`target` is (name, value, limit, higher_is_better) for rows that carry one."""
        d, r, g = vals.get("direct"), vals.get("ref_proxy"), vals.get("gateway")
        cells = [metric, *(fmt(vals.get(p), digits) for p in paths)]
        if not vals and target:  # a ratio of two paths: the ratio itself goes in the ratio column
            cells[1:] = [""] * len(paths) + ["", fmt(target[1], 2)]
        else:
            cells.append(fmt(g / d, 2) if ratios and d and g else "")
            cells.append(fmt(g / r, 2) if ratios and r and g else "")
        cells += list(check(*target)) if target else ["", ""]
        rows.append(cells)

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b and not math.isnan(a) and not math.isnan(b) else None

    lat = fig.get("latency_plain")
    if lat:
        added = fig["added_plain"]
        row(f"c=1 plain latency p50 ms (n={lat['gateway']['n']})", {p: lat[p]["p50_ms"] for p in paths})
        row("c=1 plain latency p99 ms", {p: lat[p]["p99_ms"] for p in paths})
        value = added["gateway"]["p50_ms"]
        target = ("added latency p50 ms", value, TARGET_ADDED_P50_MS, False)
        row("c=1 plain ADDED p50 ms", {p: added[p]["p50_ms"] for p in added}, target=target)
        value = added["gateway"]["p99_ms"]
        target = ("added latency p99 ms", value, TARGET_ADDED_P99_MS, False)
        row("c=1 plain ADDED p99 ms", {p: added[p]["p99_ms"] for p in added}, target=target)
    lat = fig.get("latency_stream")
    if lat:
        added = fig["added_stream"]
        n = lat["gateway"]["n"]
        row(f"c=1 stream first byte p50 ms (n={n})", {p: lat[p]["first_p50_ms"] for p in paths})
        row("c=1 stream first byte p99 ms", {p: lat[p]["first_p99_ms"] for p in paths})
        row("c=1 stream end p50 ms", {p: lat[p]["p50_ms"] for p in paths})
        value = added["gateway"]["first_p50_ms"]
        target = ("added first streamed byte p50 ms", value, TARGET_FIRST_BYTE_MS, False)
        row("c=1 stream ADDED first byte p50 ms", {p: added[p]["first_p50_ms"] for p in added}, target=target)
        row("c=1 stream ADDED first byte p99 ms", {p: added[p]["first_p99_ms"] for p in added})
    through = fig.get("throughput", {})
    for key, per_path in through.items():
        conc, mode = key[1:].split("_")
        vals = {p: per_path[p]["rps"] for p in paths}
        target = (
            f"c={conc} {mode} throughput gateway/ref_proxy",
            ratio(vals["gateway"], vals["ref_proxy"]),
            TARGET_RATIO,
            True,
        )
        row(f"c={conc} {mode} req/s", vals, digits=0, ratios=True, target=target)
        cpu = {p: per_path[p]["server_cpu_us_per_req"] for p in paths}
        target = None
        if conc == str(max(fig["meta"]["concurrencies"])):
            target = (
                f"c={conc} {mode} server CPU per request gateway/ref_proxy",
                ratio(cpu["gateway"], cpu["ref_proxy"]),
                TARGET_CPU_RATIO,
                False,
            )
        row(f"c={conc} {mode} server CPU us/req", cpu, digits=0, ratios=True, target=target)
    top = max(fig["meta"]["concurrencies"]) if through else None
    plain, stream = through.get(f"c{top}_plain"), through.get(f"c{top}_stream")
    if plain and stream:
        per_chunk = {
            p: (stream[p]["server_cpu_us_per_req"] - plain[p]["server_cpu_us_per_req"]) / STREAM_CHUNKS
            for p in paths
        }
        target = (
            "server CPU per streamed chunk gateway/ref_proxy",
            ratio(per_chunk["gateway"], per_chunk["ref_proxy"]),
            TARGET_CPU_RATIO,
            False,
        )
        row(f"c={top} server CPU us per streamed chunk", per_chunk, digits=1, ratios=True, target=target)
        for mode, runs in (("plain", plain), ("stream", stream)):
            if "governed" in paths:
                target = (
                    f"c={top} {mode} governed/gateway throughput",
                    ratio(runs["governed"]["rps"], runs["gateway"]["rps"]),
                    TARGET_GOVERNED_RATIO,
                    True,
                )
                row(f"c={top} {mode} req/s governed / gateway", {}, target=target)
            if "cache_hit" in paths:
                target = (
                    f"c={top} {mode} cache hits/ref_proxy throughput",
                    ratio(runs["cache_hit"]["rps"], runs["ref_proxy"]["rps"]),
                    TARGET_CACHE_HIT_RATIO,
                    True,
                )
                row(f"c={top} {mode} req/s cache_hit / ref_proxy", {}, target=target)
    rss = fig.get("rss_mib", {})
    if rss:
        idle = {p: rss[p]["idle"] for p in rss}
        target = ("gateway idle RSS MiB", idle.get("gateway"), TARGET_IDLE_RSS_MIB, False)
        row("RSS idle MiB", idle, digits=1, target=target)
        row("RSS after load MiB", {p: rss[p]["after"] for p in rss}, digits=1)
    if fig.get("ready_after_spawn_s"):
        row("ready after spawn s", fig["ready_after_spawn_s"], digits=2)
    return rows, checks


def print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(
        h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True))
    )
    print(line)
    print("-" * len(line))
    for r in rows:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )


# --------------------------------------------------------------------------------------------------
# Orchestration


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def parse_url(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise BenchError(f"only plain http:// upstream URLs are supported, got {url!r}")
    return parts.hostname, parts.port or 80, parts.path.rstrip("/")


def gateway_argv(template: str, port: int, upstream: str) -> list[str]:
    # Placeholders are filled per token after splitting so paths with spaces survive.
    subs = {"{python}": sys.executable, "{port}": str(port), "{upstream}": upstream}
    out = []
    for token in shlex.split(template):
        for key, val in subs.items():
            token = token.replace(key, val)
        out.append(token)
    return out


def check_vampire() -> None:
    script = ROOT / "vampire.py"
    if not script.exists():
        raise BenchError(f"{script} does not exist yet; use --gateway-cmd to measure a stand-in")
    try:
        res = subprocess.run(
            [sys.executable, str(script), "version"], cwd=ROOT, capture_output=True, timeout=20
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError("`python vampire.py version` did not finish in 20 s") from exc
    if res.returncode != 0:
        raise BenchError(
            f"`python vampire.py version` failed ({res.returncode}): {res.stderr.decode(errors='replace')[-800:]}"
        )
    log(f"vampire version: {res.stdout.decode(errors='replace').strip()}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Measure the gateway's added latency, throughput and memory.")
    p.add_argument("--quick", action="store_true", help="short run (under 30 s)")
    p.add_argument("--requests", type=int, help="c=1 requests per path per mode (default 2000, quick 300)")
    p.add_argument("--duration", type=float, help="seconds per throughput round (default 2.0, quick 1.0)")
    p.add_argument("--rounds", type=int, help="interleaved throughput rounds per path (default 3, quick 1)")
    p.add_argument("--concurrency", default="1,32,64", help="comma-separated concurrency levels")
    p.add_argument("--block", type=int, default=100, help="c=1 requests per path before switching path")
    p.add_argument("--target", help="measure against this upstream instead of the fast fake one")
    p.add_argument("--model", default="bench-model")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--chunk-delay-ms", type=float, default=0.0, help="passed to fast_upstream")
    p.add_argument(
        "--gateway-cmd",
        default=DEFAULT_GATEWAY_CMD,
        help="gateway command template with {port}, {upstream} and {python} placeholders",
    )
    p.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the gateway (repeatable)",
    )
    p.add_argument("--api-key", help="sent as a Bearer token to the gateway")
    p.add_argument("--json", dest="json_path", help="write all figures to this file")
    p.add_argument(
        "--no-governed", dest="governed", action="store_false", help="skip the keyed, quota'd path"
    )
    p.add_argument("--no-cache-hit", dest="cache_hit", action="store_false", help="skip the cache-hit path")
    args = p.parse_args(argv)
    args.requests = args.requests or (300 if args.quick else 2000)
    args.duration = args.duration or (1.0 if args.quick else 2.0)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if args.gateway_cmd != DEFAULT_GATEWAY_CMD:  # a stand-in has no keys and no cache to measure
        args.governed = args.cache_hit = False
    if args.requests < 1 or args.duration <= 0 or args.rounds < 1 or not args.concurrencies:
        p.error("requests, duration, rounds and concurrency must be positive")
    return args


def sub_added(lat: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    base = lat["direct"]
    keys = ("p50_ms", "p99_ms", "first_p50_ms", "first_p99_ms")
    return {p: {k: lat[p][k] - base[k] for k in keys} for p in lat if p != "direct"}


async def measure(args: argparse.Namespace, endpoints: list[Endpoint]) -> dict[str, Any]:
    fig: dict[str, Any] = {}
    # Inside the loop a SIGTERM must cancel the run cleanly; raising from a transport callback would not.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    gc.collect()
    gc.freeze()
    quick = args.quick
    t = time.monotonic()
    fig["warmup_problems"] = await warmup(endpoints, 50 if quick else 200, 20 if quick else 50)
    # Latency phases get a time cap so a slow gateway shortens the sample instead of the deadline.
    cap = 6.0 if quick else 12.0
    log("c=1 non-streaming latency")
    fig["latency_plain"] = await latency_phase(endpoints, False, args.requests, args.block, cap)
    fig["added_plain"] = sub_added(fig["latency_plain"])
    log("c=1 streaming latency")
    fig["latency_stream"] = await latency_phase(endpoints, True, args.requests, args.block, cap)
    fig["added_stream"] = sub_added(fig["latency_stream"])
    for ep in endpoints:
        ep.conn.close()
    log(f"c=1 phases took {time.monotonic() - t:.1f}s; throughput next")
    fig["throughput"] = await throughput_phase(endpoints, args.concurrencies, args.duration, args.rounds)
    return fig


@dataclass
class Servers:
    endpoints: list[Endpoint]
    ref: Proc
    gateway: Proc
    upstream_url: str
    gateway_argv: list[str]
    ready_s: dict[str, float]


def start_servers(args: argparse.Namespace, workdir: Path, procs: list[Proc]) -> Servers:
    """Start upstream (unless --target), ref proxy and gateway; every Proc is appended to `procs` at once
    so the caller's cleanup sees it even if a later step fails."""
    child_env = dict(os.environ)
    # A proxy variable in the caller's environment must not reroute loopback traffic.
    child_env["NO_PROXY"] = child_env["no_proxy"] = "127.0.0.1,localhost"
    up_proc: Proc | None = None
    if args.target:
        up_host, up_port, prefix = parse_url(args.target)
        upstream_url = args.target.rstrip("/")
    else:
        argv = [sys.executable, str(HERE / "fast_upstream.py"), "--port", "0"]
        argv += ["--chunk-delay-ms", str(args.chunk_delay_ms)]
        up_proc = spawn("fast_upstream", argv, workdir, child_env, pipe_stdout=True)
        procs.append(up_proc)
        up_host, prefix = "127.0.0.1", ""
        up_port = read_listening_line(up_proc, 10)
        upstream_url = f"http://127.0.0.1:{up_port}"

    ref_port = free_port()
    argv = [sys.executable, str(HERE / "ref_proxy.py"), "--port", str(ref_port), "--upstream", upstream_url]
    ref_proc = spawn("ref_proxy", argv, workdir, child_env)
    procs.append(ref_proc)

    gw_port = free_port()
    gw_env = dict(child_env)
    data_dir = workdir / "data"
    data_dir.mkdir()
    gw_env["VAMPIRE_DATA_DIR"] = str(data_dir)
    gw_env["VAMPIRE_LOG_LEVEL"] = "warning"
    # The fast upstream is a plain OpenAI server: it reports no parallelism, so the gateway would admit only
    # VAMPIRE_DEFAULT_SLOTS (4) requests at a time and queue the rest. Declaring 64 slots, as an LM Studio
    # node reporting `parallel: 64` would, measures forwarding overhead rather than admission policy; the
    # reference proxy has no admission control at all. Override with --gateway-env VAMPIRE_DEFAULT_SLOTS=N.
    gw_env["VAMPIRE_DEFAULT_SLOTS"] = "64"
    for item in args.gateway_env:
        key, sep, val = item.partition("=")
        if not sep:
            raise BenchError(f"--gateway-env expects KEY=VALUE, got {item!r}")
        gw_env[key] = val
    gw_cmd = gateway_argv(args.gateway_cmd, gw_port, upstream_url)
    log(f"gateway command: {shlex.join(gw_cmd)} (VAMPIRE_DEFAULT_SLOTS={gw_env['VAMPIRE_DEFAULT_SLOTS']})")
    gw_proc = spawn("gateway", gw_cmd, workdir, gw_env)
    procs.append(gw_proc)

    auth = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if args.target:
        wait_target(up_host, up_port, prefix, args.model)
    else:
        wait_ready(up_proc, up_host, up_port, "", args.model, {}, check_health=False)
    wait_ready(ref_proc, "127.0.0.1", ref_port, "", args.model, {}, check_health=False)
    wait_ready(gw_proc, "127.0.0.1", gw_port, "", args.model, auth, check_health=True)
    ready_s = {"ref_proxy": ref_proc.ready_after, "gateway": gw_proc.ready_after}
    log(f"ready {ready_s['ref_proxy']:.2f}s (ref proxy) and {ready_s['gateway']:.2f}s (gateway) after spawn")

    def endpoint(
        name: str, host: str, port: int, path: str, key: str | None, pid: int | None, **options: Any
    ) -> Endpoint:
        # Nothing but the gateway's own variants may be answered from its result cache.
        extra = () if options else ("Cache-Control: no-store",)
        plain = chat_body(args.model, False, args.max_tokens, **options)
        stream = chat_body(args.model, True, args.max_tokens, **options)
        req_plain = build_request(host, port, path, plain, key, extra)
        req_stream = build_request(host, port, path, stream, key, extra)
        return Endpoint(name, host, port, req_plain, req_stream, pid)

    endpoints = [
        endpoint("direct", up_host, up_port, prefix + CHAT_PATH, None, up_proc.pid if up_proc else None),
        endpoint("ref_proxy", "127.0.0.1", ref_port, CHAT_PATH, None, ref_proc.pid),
        endpoint("gateway", "127.0.0.1", gw_port, CHAT_PATH, args.api_key, gw_proc.pid),
    ]
    if args.governed:
        key = governed_key(gw_port)
        endpoints.append(endpoint("governed", "127.0.0.1", gw_port, CHAT_PATH, key, gw_proc.pid))
    if args.cache_hit:
        endpoints.append(
            endpoint("cache_hit", "127.0.0.1", gw_port, CHAT_PATH, args.api_key, gw_proc.pid, temperature=0)
        )
    return Servers(endpoints, ref_proc, gw_proc, upstream_url, gw_cmd, ready_s)


def print_report(fig: dict[str, Any]) -> None:
    rows, checks = build_report(fig)
    fig["checks"] = checks
    meta = fig["meta"]
    label = "STAND-IN " + shlex.join(meta["gateway_cmd"]) if meta["gateway_is_stand_in"] else "vampire.py"
    print()
    print(f"Vampire overhead benchmark; upstream: {meta['upstream']}; gateway: {label}")
    print_table(rows, ["metric", *fig["paths"], "gw/direct", "gw/ref", "target", "result"])
    for name, issues in fig["warmup_problems"].items():
        print(f"WARNING {name}: {'; '.join(issues)}")
    for key, per_path in fig["throughput"].items():
        errs = {p: v["errors"] for p, v in per_path.items() if v["errors"]}
        if errs:
            print(f"WARNING {key} failed requests: {errs}")
    for phase in ("latency_plain", "latency_stream"):
        errs = {p: v["errors"] for p, v in fig[phase].items() if v["errors"]}
        if errs:
            print(f"WARNING {phase} non-200 answers: {errs}")
    rss = fig["rss_mib"]["gateway"]
    if rss["idle_tree"] and rss["idle"] and rss["idle_tree"] - rss["idle"] > 1:
        print(f"note: the gateway's process tree holds {rss['idle_tree']:.1f} MiB idle (children included)")
    if meta["loadavg_1m_before"] > 0.5:
        # Other work on a 2-core machine skews absolute figures; interleaving keeps the ratios usable.
        print(f"note: the machine was busy before the run (1-minute load {meta['loadavg_1m_before']:.2f})")
    passed = sum(c["result"] == "PASS" for c in checks)
    print(f"{passed}/{len(checks)} targets met; run took {meta['elapsed_s']} s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    # SIGTERM must unwind through the finally below so that no server is left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    procs: list[Proc] = []
    tmp = tempfile.TemporaryDirectory(prefix="vampire-bench-")
    stand_in = args.gateway_cmd != DEFAULT_GATEWAY_CMD
    load_before = os.getloadavg()[0]
    try:
        if not stand_in:
            check_vampire()
        srv = start_servers(args, Path(tmp.name), procs)
        time.sleep(0.3)
        pids = {"ref_proxy": srv.ref.pid, "gateway": srv.gateway.pid}
        idle = {name: (rss_mib(pid), tree_rss_mib(pid)) for name, pid in pids.items()}
        try:
            fig = run_async(measure(args, srv.endpoints))
        except TimeoutError as exc:
            raise BenchError("a measurement overran its time bound (a server stopped answering?)") from exc
        for proc in (srv.ref, srv.gateway):
            if not proc.alive():
                raise BenchError(f"{proc.name} died during the run\n{proc.log_tail()}")
        after = {name: (rss_mib(pid), tree_rss_mib(pid)) for name, pid in pids.items()}
        fig["rss_mib"] = {
            name: {
                "idle": idle[name][0],
                "after": after[name][0],
                "idle_tree": idle[name][1],
                "after_tree": after[name][1],
            }
            for name in pids
        }
        fig["ready_after_spawn_s"] = srv.ready_s
        fig["paths"] = [ep.name for ep in srv.endpoints]
        fig["meta"] = {
            "gateway_cmd": srv.gateway_argv,
            "gateway_is_stand_in": stand_in,
            "upstream": srv.upstream_url if args.target else "bench/fast_upstream.py",
            "model": args.model,
            "requests_c1": args.requests,
            "throughput_duration_s": args.duration,
            "throughput_rounds": args.rounds,
            "concurrencies": args.concurrencies,
            "quick": args.quick,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "elapsed_s": round(time.monotonic() - started, 1),
            "loadavg_1m_before": load_before,
        }
        print_report(fig)
        if args.json_path:
            Path(args.json_path).write_text(json.dumps(jsonable(fig), indent=2) + "\n")
            log(f"figures written to {args.json_path}")
        return 0
    except BenchError as exc:
        log(f"ERROR: {exc}")
        return 2
    except (asyncio.CancelledError, KeyboardInterrupt):
        log("interrupted; stopping servers")
        return 143
    finally:
        for proc in reversed(procs):
            proc.stop()
        tmp.cleanup()


def jsonable(obj: Any) -> Any:
    """NaN is not valid JSON; missing figures become null."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else round(obj, 4)
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    return obj


def wait_target(host: str, port: int, prefix: str, model: str) -> None:
    deadline = time.monotonic() + READY_DEADLINE_S
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            status, body = http_get(port, prefix + "/v1/models", {}, host)
            if status == 200:
                if not model_listed(body, model):
                    log(f"warning: target does not list model {model!r}; continuing")
                return
            last = f"status {status}"
        except (OSError, http.client.HTTPException) as exc:
            last = repr(exc)
        time.sleep(0.1)
    raise BenchError(f"target {host}:{port} did not answer /v1/models ({last})")


if __name__ == "__main__":
    sys.exit(main())
