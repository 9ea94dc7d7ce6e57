"""Shared test harness: one background event loop that hosts emulated nodes and gateways.

The real SDK clients (openai, anthropic, ollama) are synchronous here, so the servers they talk to must
run on another thread's loop; every server binds 127.0.0.1 (or another 127/8 address) on port 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

T = TypeVar("T")


class LoopThread:
    """An asyncio loop on a daemon thread; `run` executes a coroutine there and waits for its result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> None:
    """Poll `predicate` until it holds; fail the test with a clear message at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


@pytest.fixture(scope="session")
def bg() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.close()


# ── gateways and nodes on the background loop ─────────────────────────────────────────────────────────


class RunningGateway:
    """A real uvicorn serving a real App on 127.0.0.1, port chosen by the OS."""

    def __init__(self, bg: LoopThread, app: Any, server: Any, task: Any, port: int) -> None:
        self.bg, self.app, self.server, self.task, self.port = bg, app, server, task, port
        self.url = f"http://127.0.0.1:{port}"
        self.v1 = self.url + "/v1"

    def stop(self) -> None:
        async def shutdown() -> None:
            self.server.should_exit = True
            await self.task

        self.bg.run(shutdown())


async def _serve(app: Any) -> tuple[Any, Any, int]:
    import uvicorn

    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", access_log=False
    )
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("gateway did not start")
        await asyncio.sleep(0.005)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, task, port


def start_gateway(bg: LoopThread, data_dir: Any, nodes: list[str], **settings: Any) -> RunningGateway:
    import vampire

    defaults: dict[str, Any] = {"discover_local": False, "refresh_s": 0.5, "probe_timeout_s": 1.0}
    config = vampire.Settings.load(env={}, config_file=data_dir / "none.toml")
    for key, value in {**defaults, **settings, "data_dir": data_dir, "nodes": nodes}.items():
        setattr(config, key, value)
    app = vampire.App(config)
    server, task, port = bg.run(_serve(app))
    return RunningGateway(bg, app, server, task, port)


@pytest.fixture
def gateway_factory(bg: LoopThread, tmp_path: Any) -> Iterator[Callable[..., RunningGateway]]:
    started: list[RunningGateway] = []

    def factory(nodes: list[str], data_dir: Any = None, **settings: Any) -> RunningGateway:
        gw = start_gateway(bg, data_dir or tmp_path / f"gw{len(started)}", nodes, **settings)
        started.append(gw)
        return gw

    yield factory
    for gw in started:
        gw.stop()


@pytest.fixture
def node_factory(bg: LoopThread) -> Iterator[Callable[..., Any]]:
    import vampire

    started: list[Any] = []

    def factory(models: str | list[Any], host: str = "127.0.0.1", **options: Any) -> Any:
        specs = vampire.parse_model_specs(models) if isinstance(models, str) else models
        node = vampire.MockNode(specs, **options)
        bg.run(node.start(host, 0))
        started.append(node)
        return node

    yield factory
    for node in started:
        with contextlib.suppress(Exception):
            bg.run(node.stop())


@contextlib.contextmanager
def captured_logs(level: int) -> Iterator[Any]:
    """Everything the gateway logs while the block runs, as its JSON lines, in a StringIO."""
    import io
    import logging

    import vampire

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(vampire.JsonLogFormatter())
    vampire.log.addHandler(handler)
    previous = vampire.log.level
    vampire.log.setLevel(level)
    try:
        yield stream
    finally:
        vampire.log.removeHandler(handler)
        vampire.log.setLevel(previous)
