"""Router, black-box: strategies, stickiness, routes and fallback, explain, capability fit, admission
queue, failover with circuit breaking, and a fault storm with one always-healthy node."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import aiohttp
import httpx
import pytest
from conftest import wait_until

import vampire
from vampire import MockModel

CHAT = {"messages": [{"role": "user", "content": "hello"}]}


def node_id(gw: Any, node: Any) -> str:
    return gw.app.registry.by_url(node.url.rstrip("/")).id


def chat(gw: Any, model: str, headers: dict[str, str] | None = None, **extra: Any) -> httpx.Response:
    return httpx.post(
        f"{gw.v1}/chat/completions", json={"model": model, **CHAT, **extra}, headers=headers or {}, timeout=30
    )


def posts(node: Any) -> list[Any]:
    return [r for r in node.received if r.method == "POST"]


def assert_no_slot_leaks(gw: Any) -> None:
    wait_until(
        lambda: all(n.in_flight == 0 and not any(n.busy.values()) for n in gw.app.registry.nodes.values()), 2
    )
    assert not gw.app.admission.waiters


@pytest.fixture
def twins(node_factory: Any, gateway_factory: Any) -> tuple[Any, Any, Any]:
    a = node_factory("m:llm:loaded,other:llm")
    b = node_factory("m:llm:loaded")
    return a, b, gateway_factory([a.url, b.url])


# ── strategies ──────────────────────────────────────────────────────────────────────────────────────────


def test_round_robin_alternates_and_says_so(twins: Any) -> None:
    a, b, gw = twins
    seen = []
    for i in range(4):
        resp = chat(gw, "m", {"X-Vampire-Strategy": "round_robin", "X-Vampire-Session": f"s{i}"})
        assert resp.headers["x-vampire-strategy"] == "round_robin"
        seen.append(resp.headers["x-vampire-node"])
    assert seen[0] != seen[1] and seen[0] == seen[2] and seen[1] == seen[3]
    assert len(posts(a)) == len(posts(b)) == 2
    assert_no_slot_leaks(gw)


def test_strategy_in_the_body_and_unknown_strategy(twins: Any) -> None:
    _, _, gw = twins
    resp = chat(gw, "m", vampire={"strategy": "least_latency"})
    assert resp.status_code == 200 and resp.headers["x-vampire-strategy"] == "least_latency"
    bad = chat(gw, "m", {"X-Vampire-Strategy": "fastest"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_strategy"


def test_least_latency_and_least_busy(twins: Any) -> None:
    a, b, gw = twins
    reg = gw.app.registry
    node_a, node_b = reg.by_url(a.url.rstrip("/")), reg.by_url(b.url.rstrip("/"))
    node_a.latency_ms, node_b.latency_ms = 50.0, 5.0
    resp = chat(gw, "m", {"X-Vampire-Strategy": "least_latency", "X-Vampire-Session": "x1"})
    assert resp.headers["x-vampire-node"] == node_b.id
    node_b.busy["m"] = 3  # three of four slots taken on b
    resp = chat(gw, "m", {"X-Vampire-Strategy": "least_busy", "X-Vampire-Session": "x2"})
    assert resp.headers["x-vampire-node"] == node_a.id
    node_b.busy["m"] = 0


def test_model_affinity_returns_to_the_last_node(twins: Any) -> None:
    _a, _b, gw = twins
    first = chat(gw, "m", {"X-Vampire-Strategy": "model_affinity", "X-Vampire-Session": "p"}).headers[
        "x-vampire-node"
    ]
    for i in range(3):
        again = chat(gw, "m", {"X-Vampire-Strategy": "model_affinity", "X-Vampire-Session": f"q{i}"})
        assert again.headers["x-vampire-node"] == first


def test_trusted_only_uses_the_owners_own_nodes(node_factory: Any, gateway_factory: Any) -> None:
    own = node_factory("m:llm:loaded")
    lan = node_factory("m:llm:loaded")
    gw = gateway_factory([own.url])
    added = httpx.post(f"{gw.url}/vampire/v1/nodes", json={"url": lan.url, "trusted": True}).json()
    gw.app.registry.nodes[added["id"]].latency_ms = 0.001  # the approved LAN node would win on score
    for i in range(3):
        resp = chat(gw, "m", {"X-Vampire-Strategy": "trusted_only", "X-Vampire-Session": f"t{i}"})
        assert resp.headers["x-vampire-node"] == node_id(gw, own)
    assert not posts(lan)


def test_conversation_sticks_to_its_node(twins: Any) -> None:
    _a, _b, gw = twins
    reg = gw.app.registry
    convo = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "plan a trip"}]
    first = httpx.post(f"{gw.v1}/chat/completions", json={"model": "m", "messages": convo}).headers[
        "x-vampire-node"
    ]
    other = next(n for n in reg.nodes.values() if n.id != first)
    reg.nodes[first].latency_ms, other.latency_ms = 500.0, 0.1  # the other node now scores better
    longer = [*convo, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "and then?"}]
    for _ in range(3):
        resp = httpx.post(f"{gw.v1}/chat/completions", json={"model": "m", "messages": longer})
        assert resp.headers["x-vampire-node"] == first
    fresh = httpx.post(
        f"{gw.v1}/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "new"}]}
    )
    assert fresh.headers["x-vampire-node"] == other.id


def test_previous_response_id_goes_to_the_node_that_created_it(twins: Any) -> None:
    _a, _b, gw = twins
    first = httpx.post(
        f"{gw.v1}/responses", json={"model": "m", "input": "hi", "vampire": {"strategy": "round_robin"}}
    )
    assert first.status_code == 200
    origin, resp_id = first.headers["x-vampire-node"], first.json()["id"]
    for _ in range(4):  # round robin would otherwise alternate
        nxt = httpx.post(
            f"{gw.v1}/responses",
            json={
                "model": "m",
                "input": "more",
                "previous_response_id": resp_id,
                "vampire": {"strategy": "round_robin"},
            },
        )
        assert nxt.status_code == 200, nxt.text
        assert nxt.headers["x-vampire-node"] == origin


# ── virtual models ──────────────────────────────────────────────────────────────────────────────────────


def test_named_route_targets_in_order_then_fallback(node_factory: Any, gateway_factory: Any) -> None:
    a = node_factory("big/coder:llm:loaded")
    b = node_factory("small/coder:llm:loaded,general:llm:loaded")
    gw = gateway_factory([a.url, b.url])
    api = f"{gw.url}/vampire/v1"
    route = {
        "id": "coder",
        "targets": [{"model": "big/coder", "node": node_id(gw, a)}, {"model": "small/coder"}],
        "strategy": "auto",
        "fallback": "general",
    }
    created = httpx.post(f"{api}/routes", json=route)
    assert created.status_code == 201 and created.json()["model"] == "coder"
    assert "coder" in [m["id"] for m in httpx.get(f"{gw.v1}/models").json()["data"]]
    resp = chat(gw, "coder")
    assert (resp.headers["x-vampire-node"], resp.headers["x-vampire-model"]) == (node_id(gw, a), "big/coder")
    assert posts(a)[-1].json["model"] == "big/coder"
    httpx.patch(f"{api}/nodes/{node_id(gw, a)}", json={"state": "draining"})
    assert chat(gw, "coder").headers["x-vampire-model"] == "small/coder"
    route["targets"] = [{"model": "big/coder"}]
    httpx.post(f"{api}/routes", json=route)
    assert chat(gw, "coder").headers["x-vampire-model"] == "general"  # the fallback
    assert httpx.get(f"{api}/routes/coder").json()["targets"] == [{"model": "big/coder"}]
    assert httpx.delete(f"{api}/routes/coder").json() == {"id": "coder", "deleted": True}
    assert chat(gw, "coder").status_code == 404
    bad = httpx.post(f"{api}/routes", json={"id": "x", "targets": [], "strategy": "auto"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "targets"


def test_routes_persist(node_factory: Any, gateway_factory: Any, tmp_path: Any) -> None:
    a = node_factory("m:llm:loaded")
    gw = gateway_factory([a.url], data_dir=tmp_path / "state")
    httpx.post(f"{gw.url}/vampire/v1/routes", json={"id": "fast", "targets": [{"model": "m"}]})
    gw.stop()
    again = gateway_factory([a.url], data_dir=tmp_path / "state")
    assert [r["id"] for r in httpx.get(f"{again.url}/vampire/v1/routes").json()["data"]] == ["fast"]
    assert chat(again, "fast").status_code == 200


def test_explain_shows_candidates_scores_and_rejections(node_factory: Any, gateway_factory: Any) -> None:
    hot = node_factory("m:llm:loaded")
    cold = node_factory("m:llm")
    drained = node_factory("m:llm:loaded")
    stranger = node_factory("m:llm:loaded")
    gw = gateway_factory([hot.url, cold.url, drained.url])
    httpx.post(f"{gw.url}/vampire/v1/nodes", json={"url": stranger.url, "trusted": False})
    httpx.patch(f"{gw.url}/vampire/v1/nodes/{node_id(gw, drained)}", json={"state": "draining"})
    out = httpx.get(f"{gw.url}/vampire/v1/routing/explain", params={"model": "m"}).json()
    assert [c["node"] for c in out["candidates"]] == [node_id(gw, hot), node_id(gw, cold)]
    assert out["candidates"][0]["score"][0] == 0 and out["candidates"][1]["score"][0] == 1
    reasons = {r["node"]: r["reason"] for r in out["rejected"]}
    assert reasons[node_id(gw, drained)] == "node is draining"
    assert reasons[node_id(gw, stranger)].startswith("not trusted")
    emb = httpx.get(f"{gw.url}/vampire/v1/routing/explain", params={"model": "m", "kind": "embedding"}).json()
    assert emb["candidates"] == [] and emb["error"]["code"] == "unsupported_capability"


# ── capability fit ──────────────────────────────────────────────────────────────────────────────────────


def test_images_only_to_vision_and_tools_only_to_tool_models(node_factory: Any, gateway_factory: Any) -> None:
    node = node_factory(
        [MockModel("text", loaded=True, tools=False), MockModel("eyes", type="vlm", loaded=True)]
    )
    gw = gateway_factory([node.url])
    image = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        }
    ]
    refused = httpx.post(f"{gw.v1}/chat/completions", json={"model": "text", "messages": image})
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "unsupported_capability"
    assert "no vision" in refused.json()["error"]["message"]
    assert (
        httpx.post(f"{gw.v1}/chat/completions", json={"model": "eyes", "messages": image}).status_code == 200
    )
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    no_tools = httpx.post(f"{gw.v1}/chat/completions", json={"model": "text", "tools": tools, **CHAT})
    assert no_tools.status_code == 400 and "tool use" in no_tools.json()["error"]["message"]
    assert [r.json["model"] for r in posts(node)] == ["eyes"]


def test_prompt_longer_than_the_loaded_context_goes_elsewhere(
    node_factory: Any, gateway_factory: Any
) -> None:
    small = node_factory([MockModel("m", loaded=True, context_length=512)])
    large = node_factory([MockModel("m", loaded=True, context_length=32768)])
    gw = gateway_factory([small.url, large.url])
    small_node = gw.app.registry.by_url(small.url.rstrip("/"))
    small_node.latency_ms = 0.0001  # small would win on score alone
    long_prompt = {"model": "m", "messages": [{"role": "user", "content": "word " * 3000}]}
    resp = httpx.post(f"{gw.v1}/chat/completions", json=long_prompt)
    assert resp.headers["x-vampire-node"] == node_id(gw, large)


# ── admission ───────────────────────────────────────────────────────────────────────────────────────────


def test_full_queue_answers_503_with_retry_after(node_factory: Any, gateway_factory: Any, bg: Any) -> None:
    node = node_factory([MockModel("m", loaded=True, parallel=1)], tps=20, completion_tokens=1000)
    gw = gateway_factory([node.url], queue_max=1, queue_timeout_s=0.5)
    body = {"model": "m", "stream": True, **CHAT}
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", f"{gw.v1}/chat/completions", json=body) as holder,
    ):
        held = holder.iter_raw()  # keep the iterator: dropping it would close the stream
        next(held)  # the only slot is taken by this stream
        waiting: dict[str, Any] = {}

        async def queued() -> None:
            async with (
                aiohttp.ClientSession() as s,
                s.post(f"{gw.v1}/chat/completions", json={"model": "m", **CHAT}) as r,
            ):
                waiting["status"], waiting["body"], waiting["headers"] = r.status, await r.json(), r.headers

        task = asyncio.run_coroutine_threadsafe(queued(), bg.loop)
        wait_until(lambda: len(gw.app.admission.waiters) == 1)
        full = httpx.post(f"{gw.v1}/chat/completions", json={"model": "m", **CHAT})
        assert full.status_code == 503 and full.headers["retry-after"] == "2"
        assert full.json()["error"]["code"] == "queue_full" and full.json()["error"]["type"] == "server_error"
        ant = httpx.post(f"{gw.v1}/messages", json={"model": "m", "max_tokens": 4, **CHAT})
        assert ant.status_code == 503 and ant.json() == {
            "type": "error",
            "error": {"type": "overloaded_error", "message": "The request queue is full."},
        }
        task.result(5)
        assert waiting["status"] == 503 and waiting["headers"]["Retry-After"] == "5"
        assert waiting["body"]["error"]["code"] == "queue_timeout"
    assert_no_slot_leaks(gw)


def test_queued_request_gets_the_slot_when_it_frees(node_factory: Any, gateway_factory: Any, bg: Any) -> None:
    node = node_factory([MockModel("m", loaded=True, parallel=1)], tps=100, completion_tokens=20)
    gw = gateway_factory([node.url], queue_timeout_s=10)

    async def burst() -> list[int]:
        async with aiohttp.ClientSession() as s:

            async def one() -> int:
                async with s.post(
                    f"{gw.v1}/chat/completions", json={"model": "m", "stream": True, **CHAT}
                ) as r:
                    await r.read()
                    return r.status

            return list(await asyncio.gather(*(one() for _ in range(4))))

    assert bg.run(burst()) == [200, 200, 200, 200]
    assert node.stats.generations_finished == 4
    assert_no_slot_leaks(gw)


def test_tier_caps_vampires_share_of_slots(node_factory: Any, gateway_factory: Any) -> None:
    node = node_factory([MockModel("m", loaded=True, parallel=4)], version="0.4.6", token="vampire50:s3cret")
    gw = gateway_factory([f"{node.url}#vampire50:s3cret"])
    record = httpx.get(f"{gw.url}/vampire/v1/nodes/{node_id(gw, node)}").json()
    assert record["tier"] == 50 and "s3cret" not in json.dumps(record)
    target = gw.app.router.plan("m", vampire.Needs("chat")).targets[0]
    assert target.capacity == 2


# ── failover and circuit breaking ───────────────────────────────────────────────────────────────────────


def test_capacity_answers_fail_over_without_tripping_the_breaker(twins: Any) -> None:
    a, b, gw = twins
    a.set_fault("503")
    for i in range(5):
        resp = chat(gw, "m", {"X-Vampire-Session": f"c{i}"})
        assert resp.status_code == 200
        assert resp.headers["x-vampire-node"] == node_id(gw, b)
    assert gw.app.registry.by_url(a.url.rstrip("/")).circuit.state == "closed"


def test_repeated_failures_open_the_circuit_then_it_recovers(twins: Any) -> None:
    a, _b, gw = twins
    node_a = gw.app.registry.by_url(a.url.rstrip("/"))
    node_a.latency_ms = 0.0001
    a.set_fault("500")
    for i in range(6):
        assert chat(gw, "m", {"X-Vampire-Session": f"f{i}"}).status_code == 200
    assert node_a.circuit.state == "open"
    failed_calls = len(posts(a))
    assert failed_calls == vampire.Circuit.THRESHOLD  # once open, the broken node is not tried again
    a.set_fault(None)
    node_a.circuit.open_until = 0  # cool-down elapsed
    resp = chat(gw, "m", {"X-Vampire-Session": "after"})
    assert resp.headers["x-vampire-node"] == node_a.id and node_a.circuit.state == "closed"


def test_stalled_node_counts_as_failed_after_the_first_byte_timeout(twins: Any) -> None:
    a, b, gw = twins
    gw.app.settings.first_byte_timeout_s = 0.3
    gw.app.clients.relay._timeout = aiohttp.ClientTimeout(total=None, connect=5, sock_read=0.3)
    gw.app.registry.by_url(a.url.rstrip("/")).latency_ms = 0.0001
    a.set_fault("stall")
    resp = chat(gw, "m", {"X-Vampire-Session": "stall"})
    assert resp.status_code == 200 and resp.headers["x-vampire-node"] == node_id(gw, b)


def test_fault_storm_costs_clients_nothing(node_factory: Any, gateway_factory: Any, bg: Any) -> None:
    """1,000 requests, half streaming, while two of three nodes refuse, fail, shed load or stall at random."""
    flaky = [
        node_factory([MockModel("m", loaded=True, parallel=8)], tps=200, completion_tokens=6, seed=i)
        for i in range(2)
    ]
    healthy = node_factory([MockModel("m", loaded=True, parallel=8)], tps=200, completion_tokens=6)
    gw = gateway_factory([*(n.url for n in flaky), healthy.url], refresh_s=0.3, first_byte_timeout_s=0.4)
    gw.app.clients.relay._timeout = aiohttp.ClientTimeout(total=None, connect=2, sock_read=0.4)
    kinds = ["500", "503", "429", "stall", "midstream", "refuse"]
    rng = random.Random(7)
    results: list[tuple[bool, int, bytes]] = []

    async def storm() -> None:
        ports = [int(n.url.rsplit(":", 1)[1].rstrip("/")) for n in flaky]
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            gate = asyncio.Semaphore(24)

            async def one(i: int) -> None:
                stream = i % 2 == 0
                body = {"model": "m", "stream": stream, "messages": [{"role": "user", "content": f"q{i}"}]}
                async with gate, http.post(f"{gw.v1}/chat/completions", json=body) as r:
                    results.append((stream, r.status, await r.read()))

            up = [True] * len(flaky)
            for wave in range(10):
                for n, (node, port) in enumerate(zip(flaky, ports, strict=True)):
                    # Every third wave a flaky node cuts streams short, so mid-stream failures surely happen.
                    kind = "midstream" if wave % 3 == n else rng.choice(kinds)
                    if kind == "refuse" and up[n]:
                        await node.stop()
                        up[n] = False
                    elif kind != "refuse":
                        if not up[n]:
                            await node.start("127.0.0.1", port)
                            up[n] = True
                        node.set_fault(kind, rate=0.6, after_chunks=2)
                        node_state = gw.app.registry.by_url(node.url.rstrip("/"))
                        node_state.circuit.open_until = 0  # let each wave's faults reach the node again
                await asyncio.gather(*(one(wave * 100 + i) for i in range(100)))
            for n, (node, port) in enumerate(zip(flaky, ports, strict=True)):
                if not up[n]:
                    await node.start("127.0.0.1", port)

    bg.run(storm(), timeout=240)
    assert len(results) == 1000
    broken = 0
    for stream, status, body in results:
        assert status == 200, body[:300]
        if not stream:
            assert json.loads(body)["choices"][0]["message"]["content"]
            continue
        frames = [f for f in body.decode().split("\n\n") if f]
        assert frames[-1] == "data: [DONE]", frames[-3:]
        payloads = [json.loads(f.removeprefix("data: ")) for f in frames[:-1]]
        errors = [p for p in payloads if "error" in p]
        if errors:
            broken += 1
            assert len(errors) == 1 and payloads[-1] is errors[0]
            assert errors[0]["error"]["code"] == "upstream_failed" and errors[0]["error"]["message"]
        else:
            assert payloads[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert posts(healthy)  # the healthy node carried the load
    assert broken > 0, "no stream failed mid-way: the storm did not exercise that path"
    print(f"fault storm: {broken} of 500 streams failed mid-stream and ended with an error frame")
    assert_no_slot_leaks(gw)
