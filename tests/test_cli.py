"""The command line, as a person or a CI job uses it: real processes, real ports on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import wait_until

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "VAMPIRE_DATA_DIR": str(tmp_path / "data"),
        "VAMPIRE_CONFIG": str(tmp_path / "none.toml"),
    }


def vampire(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vampire", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def test_up_twice_starts_one_gateway_and_down_stops_it(env: dict[str, str]) -> None:
    port = str(free_port())
    first = vampire(env, "up", "--demo", "--port", port)
    assert first.returncode == 0, first.stderr
    pid = int(Path(env["VAMPIRE_DATA_DIR"], "vampire.pid").read_text().split()[0])
    second = vampire(env, "up", "--demo", "--port", port)
    assert second.returncode == 0 and "already running" in second.stdout
    assert int(Path(env["VAMPIRE_DATA_DIR"], "vampire.pid").read_text().split()[0]) == pid
    models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"]
    assert "vampire:auto" in [m["id"] for m in models] and len(models) >= 4
    chat = vampire(
        env, "chat", "hello there", "--model", "qwen/qwen3-4b", "--url", f"http://127.0.0.1:{port}"
    )
    assert chat.returncode == 0 and len(chat.stdout.split()) >= 3
    listing = vampire(env, "nodes", "list", "--url", f"http://127.0.0.1:{port}")
    assert listing.returncode == 0 and listing.stdout.count("online") == 2
    down = vampire(env, "down")
    assert down.returncode == 0 and "stopped" in down.stdout
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz")
    again = vampire(env, "down")
    assert again.returncode == 0 and "not running" in again.stdout


@pytest.mark.parametrize("signals", [[signal.SIGTERM], [signal.SIGINT, signal.SIGINT]])
def test_serve_stops_cleanly_on_signals(env: dict[str, str], signals: list[int]) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vampire", "serve", "--demo", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def healthy() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, timeout=20)
    for sig in signals:  # two SIGINTs back to back, as a one-file build's bootloader delivers Ctrl-C
        proc.send_signal(sig)
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    assert "is listening: OpenAI endpoint" in out


def test_mock_node_cli_serves_lm_studio(env: dict[str, str]) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vampire",
            "mock-node",
            "--port",
            str(port),
            "--models",
            "a/b:llm:loaded,c:embedding",
            "--token",
            "sk-lm-AbCdEfGh:AbCdEfGhIjKlMnOpQrSt",
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until(lambda: _answers(port), timeout=20)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
        auth = {"Authorization": "Bearer sk-lm-AbCdEfGh:AbCdEfGhIjKlMnOpQrSt"}
        models = httpx.get(f"http://127.0.0.1:{port}/api/v1/models", headers=auth).json()["models"]
        assert [(m["key"], bool(m["loaded_instances"])) for m in models] == [("a/b", True), ("c", False)]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=10)
    assert proc.returncode == 0


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/lmstudio-greeting", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


def test_every_command_has_help_and_bad_usage_exits_2(env: dict[str, str]) -> None:
    commands = [
        "serve",
        "up",
        "down",
        "status",
        "nodes",
        "models",
        "routes",
        "keys",
        "share",
        "usage",
        "cache",
        "discover",
        "chat",
        "mock-node",
        "service",
        "version",
    ]
    for command in commands:
        out = vampire(env, command, "--help")
        assert out.returncode == 0 and "usage: vampire" in out.stdout, command
    assert vampire(env, "frobnicate").returncode == 2
    assert vampire(env, "share", "everyone").returncode == 2


def test_control_commands_report_an_unreachable_gateway(env: dict[str, str]) -> None:
    out = vampire(env, "status", "--url", f"http://127.0.0.1:{free_port()}")
    assert out.returncode == 1 and "cannot reach the gateway" in out.stderr and "Traceback" not in out.stderr


def test_version(env: dict[str, str]) -> None:
    out = vampire(env, "version")
    assert out.returncode == 0 and out.stdout.startswith("vampire ")


def test_keys_share_routes_usage_cache_commands(env: dict[str, str], tmp_path: Any) -> None:
    port = str(free_port())
    assert vampire(env, "up", "--demo", "--port", port).returncode == 0
    url = ["--url", f"http://127.0.0.1:{port}"]
    try:
        created = vampire(env, "keys", "create", "laptop", "--rpm", "10", *url)
        assert created.returncode == 0 and "vk-" in created.stdout
        secret = next(w for w in created.stdout.split() if w.startswith("vk-"))
        listed = vampire(env, "keys", "list", *url)
        assert "laptop" in listed.stdout and secret not in listed.stdout
        assert vampire(env, "share", "keys", *url).stdout.strip() == "sharing: keys"
        refused = httpx.post(
            f"http://127.0.0.1:{port}/v1/embeddings",
            json={"model": "text-embedding-nomic-embed-text-v1.5", "input": "x"},
        )
        assert refused.status_code == 401
        ok = httpx.post(
            f"http://127.0.0.1:{port}/v1/embeddings",
            headers={"Authorization": f"Bearer {secret}"},
            json={"model": "text-embedding-nomic-embed-text-v1.5", "input": "x"},
        )
        assert ok.status_code == 200
        route = vampire(
            env, "routes", "add", "fast", "--target", "qwen/qwen3-4b", "--fallback", "vampire:auto", *url
        )
        assert route.returncode == 0, route.stderr
        assert "fast" in vampire(env, "routes", "list", *url).stdout
        usage = vampire(env, "usage", "--group-by", "model", *url)
        assert usage.returncode == 0 and "text-embedding-nomic-embed-text-v1.5" in usage.stdout
        cache = vampire(env, "cache", "stats", *url)
        assert cache.returncode == 0 and "entries" in cache.stdout
        assert vampire(env, "cache", "clear", *url).returncode == 0
        revoked = vampire(env, "keys", "revoke", secret.split("_")[0].removeprefix("vk-"), *url)
        assert revoked.returncode == 0
        assert (
            httpx.post(
                f"http://127.0.0.1:{port}/v1/embeddings",
                headers={"Authorization": f"Bearer {secret}"},
                json={"model": "text-embedding-nomic-embed-text-v1.5", "input": "x"},
            ).status_code
            == 401
        )
    finally:
        vampire(env, "down")
