"""Observability: Prometheus metrics (checked by promtool), the live events stream, structured request logs."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import threading
import time
from typing import Any

import httpx
import pytest
from conftest import captured_logs

import vampire

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def promtool() -> str | None:
    """Debian's `prometheus` package brings promtool; install it when we can, as the test command may."""
    found = shutil.which("promtool")
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    subprocess.run(
        ["bash", "-c", "apt-get update -qq && apt-get install -y -qq prometheus"],
        check=False,
        timeout=900,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    return shutil.which("promtool")


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        named = line.startswith(name + "{") or line.startswith(name + " ")
        if named and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_the_traffic_and_pass_promtool(
    node_factory: Any, gateway_factory: Any, tmp_path: Any
) -> None:
    node = node_factory("m:llm:loaded,e:embedding:loaded", completion_tokens=5)
    gw = gateway_factory([node.url])
    nid = gw.app.registry.by_url(node.url.rstrip("/")).id
    for _ in range(3):
        assert httpx.post(f"{gw.v1}/chat/completions", json={"model": "m", **CHAT}).status_code == 200
    assert (
        httpx.post(f"{gw.v1}/chat/completions", json={"model": "m", "stream": True, **CHAT}).status_code
        == 200
    )
    for _ in range(2):
        httpx.post(f"{gw.v1}/embeddings", json={"model": "e", "input": "x"})
    assert httpx.post(f"{gw.v1}/chat/completions", json={"model": "nope", **CHAT}).status_code == 404
    text = httpx.get(f"{gw.url}/metrics").text
    assert metric(text, "vampire_requests_total", surface="chat", model="m", node=nid, status="200") == 4
    assert (
        metric(text, "vampire_requests_total", surface="embeddings", model="e", node=nid, status="200") == 1
    )
    assert (
        metric(text, "vampire_requests_total", surface="embeddings", model="e", node=nid, status="200")
        + metric(text, "vampire_cache_hits_total")
        == 2
    )  # the second embedding is a cache hit
    assert metric(text, "vampire_requests_total", surface="chat", model="nope", node="", status="404") == 1
    assert metric(text, "vampire_tokens_total", direction="out", model="m") == 4 * 5
    assert metric(text, "vampire_tokens_total", direction="in", model="m") == node.stats.prompt_tokens_total
    assert metric(text, "vampire_request_duration_seconds_count", surface="chat") == 5
    assert metric(text, "vampire_time_to_first_token_seconds_count", surface="chat") == 4
    assert metric(text, "vampire_node_state", node=nid, state="online") == 1
    assert metric(text, "vampire_node_state", node=nid, state="offline") == 0
    assert metric(text, "vampire_node_in_flight", node=nid) == 0
    assert metric(text, "vampire_queue_depth") == 0
    assert "# TYPE vampire_request_duration_seconds histogram" in text
    tool = promtool()
    if tool is None:
        pytest.skip(
            "promtool is missing and `apt-get install prometheus` did not provide it (needs root, apt-get and "
            "the Debian mirror): the counters were checked, the exposition format was not"
        )
    path = tmp_path / "metrics.txt"
    path.write_text(text)
    check = subprocess.run([tool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


def test_metrics_follow_the_control_plane_rule_and_healthz_is_open(
    node_factory: Any, gateway_factory: Any
) -> None:
    node = node_factory("m:llm:loaded")
    gw = gateway_factory([node.url], admin_token="adm-" + "z" * 24)
    assert httpx.get(f"{gw.url}/metrics").status_code == 401
    assert (
        httpx.get(f"{gw.url}/metrics", headers={"Authorization": "Bearer adm-" + "z" * 24}).status_code == 200
    )
    assert httpx.get(f"{gw.url}/healthz").json() == {"status": "ok"}


def test_events_stream_reports_a_node_going_offline_within_one_refresh_period(
    node_factory: Any, gateway_factory: Any, bg: Any
) -> None:
    node = node_factory("m:llm:loaded")
    refresh = 1.0
    gw = gateway_factory([node.url], refresh_s=refresh)
    nid = gw.app.registry.by_url(node.url.rstrip("/")).id
    seen: list[tuple[float, str, dict[str, Any]]] = []
    connected, offline = threading.Event(), threading.Event()

    def listen() -> None:
        with httpx.stream("GET", f"{gw.url}/vampire/v1/events", timeout=30) as resp:
            kind = ""
            for line in resp.iter_lines():
                if line.startswith(":"):
                    connected.set()
                elif line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    seen.append((time.monotonic(), kind, data))
                    if kind == "node" and data.get("state") == "offline":
                        offline.set()
                        return

    threading.Thread(target=listen, daemon=True).start()
    assert connected.wait(5)
    httpx.post(f"{gw.v1}/chat/completions", json={"model": "m", **CHAT})
    stopped = time.monotonic()
    bg.run(node.stop())
    assert offline.wait(refresh + 1.0)
    at, _, data = next(e for e in seen if e[1] == "node")
    assert data["id"] == nid and data["previous"] == "online"
    assert at - stopped <= refresh + 0.25, f"offline reported {at - stopped:.2f} s after the node died"
    request = next(e[2] for e in seen if e[1] == "request")
    assert request["model"] == "m" and request["status"] == 200 and request["node"] == nid


def test_one_structured_log_line_per_request(node_factory: Any, gateway_factory: Any) -> None:
    node = node_factory("m:llm:loaded", completion_tokens=4)
    gw = gateway_factory([node.url])
    key = httpx.post(f"{gw.url}/vampire/v1/keys", json={"name": "k"}).json()
    with captured_logs(logging.INFO) as stream:
        httpx.post(
            f"{gw.v1}/chat/completions",
            json={"model": "m", **CHAT},
            headers={"Authorization": f"Bearer {key['key']}"},
        )
        httpx.post(f"{gw.v1}/chat/completions", json={"model": "gone", **CHAT})
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    requests = [line for line in lines if line["msg"] == "request"]
    assert len(requests) == 2
    ok, missing = requests
    assert ok["request_id"].startswith("req_") and ok["key"] == key["id"] and ok["model"] == "m"
    assert ok["node"] == gw.app.registry.by_url(node.url.rstrip("/")).id and ok["status"] == 200
    assert ok["latency_ms"] > 0 and (ok["prompt_tokens"], ok["completion_tokens"]) == (
        node.stats.prompt_tokens_total,
        4,
    )
    assert missing["status"] == 404 and missing["error"] == "model_not_found" and missing["key"] is None
    assert key["key"] not in stream.getvalue()


def test_log_format_json_flag(tmp_path: Any) -> None:
    vampire.setup_logging("info", "json")
    try:
        buffer = io.StringIO()
        vampire.log.handlers[0].setStream(buffer)  # type: ignore[attr-defined]
        vampire.log.info("request", extra={"fields": {"request_id": "req_1", "status": 200}})
        assert json.loads(buffer.getvalue()) | {"time": 0} == {
            "time": 0,
            "level": "info",
            "msg": "request",
            "request_id": "req_1",
            "status": 200,
        }
    finally:
        vampire.log.handlers[:] = []
        vampire.log.propagate = True
        vampire.log.setLevel(logging.NOTSET)
