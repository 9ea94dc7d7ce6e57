"""Coalescing and the exact result cache: one inference for identical questions, none for repeated ones."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import anthropic
import httpx
import openai
import pytest
from conftest import wait_until

import vampire

ASK = {"messages": [{"role": "user", "content": "what is a vampire bat"}], "temperature": 0}


def generations(node: Any) -> int:
    return node.stats.generations_started


def chat(gw: Any, headers: dict[str, str] | None = None, **extra: Any) -> httpx.Response:
    return httpx.post(
        f"{gw.v1}/chat/completions", json={"model": "m", **ASK, **extra}, headers=headers or {}, timeout=30
    )


@pytest.fixture
def slow(node_factory: Any, gateway_factory: Any) -> tuple[Any, Any]:
    node = node_factory("m:llm:loaded,e:embedding:loaded", tps=40, completion_tokens=16)
    return node, gateway_factory([node.url])


def test_100_identical_streams_make_one_generation(slow: Any, bg: Any) -> None:
    node, gw = slow
    body = {"model": "m", "stream": True, **ASK}

    async def crowd() -> tuple[list[bytes], list[str], bytes]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

            async def one() -> tuple[bytes, str]:
                async with http.post(f"{gw.v1}/chat/completions", json=body) as resp:
                    assert resp.status == 200
                    return await resp.read(), resp.headers["x-vampire-cache"]

            tasks = [asyncio.ensure_future(one()) for _ in range(100)]
            # One more joins late, once the answer is already streaming: it must still get all of it.
            while node.stats.tokens_generated < 3:
                await asyncio.sleep(0.005)
            late, late_outcome = await one()
            results = await asyncio.gather(*tasks)
            return [r[0] for r in results], [r[1] for r in results] + [late_outcome], late

    bodies, outcomes, late = bg.run(crowd(), timeout=60)
    assert generations(node) == 1
    assert len(set(bodies)) == 1 and late == bodies[0]
    assert bodies[0].endswith(b"data: [DONE]\n\n") and b'"usage"' not in bodies[0]
    text = "".join(
        json.loads(f[6:])["choices"][0]["delta"].get("content") or ""
        for f in bodies[0].decode().split("\n\n")
        if f.startswith("data: {") and json.loads(f[6:])["choices"]
    )
    assert len(text.split()) == 16
    assert outcomes.count("miss") == 1 and outcomes.count("coalesced") == 100, sorted(set(outcomes))
    stats = httpx.get(f"{gw.url}/vampire/v1/cache").json()
    assert stats["coalesced"] == 100 and stats["upstream_calls_saved"] == 100
    assert all(n.in_flight == 0 for n in gw.app.registry.nodes.values())


def test_repeat_is_a_cache_hit_that_never_touches_the_node(slow: Any) -> None:
    node, gw = slow
    first = chat(gw)
    seen = generations(node)
    again = chat(gw)
    assert (first.headers["x-vampire-cache"], again.headers["x-vampire-cache"]) == ("miss", "hit")
    # Only generations count: the gateway may re-probe the node (a model it just served) meanwhile.
    assert again.json() == first.json() and generations(node) == seen == 1
    assert again.headers["x-vampire-request-id"] != first.headers["x-vampire-request-id"]
    reordered = httpx.post(
        f"{gw.v1}/chat/completions",
        content=json.dumps({"temperature": 0, **ASK, "model": "m"}, indent=3).encode(),
    )
    assert reordered.headers["x-vampire-cache"] == "hit"  # key order and whitespace do not matter
    assert generations(node) == 1


def test_streaming_and_json_twins_share_one_answer(slow: Any) -> None:
    node, gw = slow
    oc = openai.OpenAI(base_url=gw.v1, api_key="x", max_retries=0)
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in oc.chat.completions.create(model="m", stream=True, **ASK)
        if c.choices
    )
    whole = oc.chat.completions.with_raw_response.create(model="m", **ASK)
    assert whole.headers["x-vampire-cache"] == "hit"
    assert (
        whole.parse().choices[0].message.content == streamed and whole.parse().usage.completion_tokens == 16
    )
    other = {**ASK, "messages": [{"role": "user", "content": "and a fruit bat"}]}
    answer = oc.chat.completions.create(model="m", **other).choices[0].message.content
    chunks = list(
        oc.chat.completions.create(model="m", stream=True, stream_options={"include_usage": True}, **other)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16
    assert generations(node) == 2


def test_anthropic_twins(slow: Any) -> None:
    node, gw = slow
    ac = anthropic.Anthropic(base_url=gw.url, api_key="x", max_retries=0)
    ask = {"model": "m", "max_tokens": 12, "messages": ASK["messages"], "extra_body": {"temperature": 0}}
    with ac.messages.stream(**ask) as s:
        text = s.get_final_text()
    again = ac.messages.with_raw_response.create(**ask)
    assert again.headers["x-vampire-cache"] == "hit" and again.parse().content[0].text == text
    assert again.parse().usage.output_tokens == 12
    with ac.messages.stream(**ask) as s:
        assert s.get_final_text() == text
    assert generations(node) == 1


def test_nondeterministic_requests_are_never_shared(slow: Any, bg: Any) -> None:
    node, gw = slow
    hot = {"messages": ASK["messages"], "temperature": 0.8}
    plain = {"messages": ASK["messages"]}

    async def pair(extra: dict[str, Any]) -> list[str]:
        async with aiohttp.ClientSession() as http:

            async def one() -> str:
                async with http.post(f"{gw.v1}/chat/completions", json={"model": "m", **extra}) as resp:
                    await resp.read()
                    return resp.headers["x-vampire-cache"]

            return list(await asyncio.gather(one(), one()))

    assert bg.run(pair(hot)) == ["bypass", "bypass"]
    assert bg.run(pair(plain)) == ["bypass", "bypass"]
    assert generations(node) == 4
    assert chat(gw, temperature=0.8).headers["x-vampire-cache"] == "bypass"
    assert generations(node) == 5
    opted = bg.run(pair({**hot, "vampire": {"coalesce": True}}))
    assert sorted(opted) == ["coalesced", "miss"] and generations(node) == 6
    assert chat(gw, seed=42, temperature=0.8).headers["x-vampire-cache"] == "miss"
    assert chat(gw, seed=42, temperature=0.8).headers["x-vampire-cache"] == "hit"


def test_opting_out(slow: Any) -> None:
    node, gw = slow
    chat(gw)
    assert chat(gw, headers={"Cache-Control": "no-store"}).headers["x-vampire-cache"] == "bypass"
    assert chat(gw, vampire={"cache": False}).headers["x-vampire-cache"] == "bypass"
    assert generations(node) == 3


def test_realms_never_share(node_factory: Any, gateway_factory: Any) -> None:
    node = node_factory("m:llm:loaded")
    gw = gateway_factory([node.url])
    api = f"{gw.url}/vampire/v1"
    for realm in ("family", "business"):
        assert httpx.post(f"{api}/realms", json={"name": realm}).status_code == 201
    family = httpx.post(f"{api}/keys", json={"name": "a", "realm": "family"}).json()["key"]
    family2 = httpx.post(f"{api}/keys", json={"name": "b", "realm": "family"}).json()["key"]
    business = httpx.post(f"{api}/keys", json={"name": "c", "realm": "business"}).json()["key"]
    outcomes = [
        chat(gw, {"Authorization": f"Bearer {k}"}).headers["x-vampire-cache"]
        for k in (family, business, family2)
    ]
    assert outcomes == ["miss", "miss", "hit"]
    assert generations(node) == 2


def test_embeddings_are_cached(slow: Any) -> None:
    node, gw = slow
    body = {"model": "e", "input": ["a bat", "a cat"]}
    first = httpx.post(f"{gw.v1}/embeddings", json=body)
    second = httpx.post(f"{gw.v1}/embeddings", json=body)
    assert (first.headers["x-vampire-cache"], second.headers["x-vampire-cache"]) == ("miss", "hit")
    assert first.json() == second.json()
    assert len([r for r in node.received if r.path == "/v1/embeddings"]) == 1


def test_one_waiter_leaving_does_not_stop_the_others_but_all_leaving_does(
    node_factory: Any, gateway_factory: Any, bg: Any
) -> None:
    node = node_factory("m:llm:loaded", tps=20, completion_tokens=30)
    gw = gateway_factory([node.url])
    body = {"model": "m", "stream": True, **ASK}

    async def scenario() -> bytes:
        async with aiohttp.ClientSession() as http:
            quitter = await http.post(f"{gw.v1}/chat/completions", json=body)
            stayer = await http.post(f"{gw.v1}/chat/completions", json=body)
            await quitter.content.readany()
            quitter.close()  # one client goes away mid-answer
            return await stayer.read()

    full = bg.run(scenario(), timeout=30)
    assert full.endswith(b"data: [DONE]\n\n") and node.stats.generations_finished == 1
    httpx.delete(f"{gw.url}/vampire/v1/cache")
    with (
        httpx.Client(timeout=30) as a,
        httpx.Client(timeout=30) as b,
        a.stream("POST", f"{gw.v1}/chat/completions", json=body) as r1,
        b.stream("POST", f"{gw.v1}/chat/completions", json=body) as r2,
    ):
        next(r1.iter_raw())
        next(r2.iter_raw())
    wait_until(lambda: node.stats.generations_cancelled == 1, timeout=1.0)  # everyone left: the node stops
    wait_until(
        lambda: (
            not gw.app.gateway.coalescer.flights
            and all(n.in_flight == 0 for n in gw.app.registry.nodes.values())
        )
    )


def test_a_changed_model_invalidates_its_answers(node_factory: Any, gateway_factory: Any) -> None:
    node = node_factory([vampire.MockModel("m", loaded=True, quantization="Q4_K_M")])
    gw = gateway_factory([node.url])
    chat(gw)
    assert chat(gw).headers["x-vampire-cache"] == "hit"
    node.models[0].quantization = "Q8_0"  # the owner swapped the weights under the same id
    registry = gw.app.registry
    vampire_node = registry.by_url(node.url.rstrip("/"))
    gw.bg.run(registry.probe(vampire_node))
    assert httpx.get(f"{gw.url}/vampire/v1/cache").json()["entries"] == 0
    assert chat(gw).headers["x-vampire-cache"] == "miss"


def test_cache_is_bounded_and_clearable(node_factory: Any, gateway_factory: Any) -> None:
    node = node_factory("m:llm:loaded")
    gw = gateway_factory([node.url], cache_max_bytes=3000)
    for i in range(10):
        chat(gw, messages=[{"role": "user", "content": f"question {i}"}])
    stats = httpx.get(f"{gw.url}/vampire/v1/cache").json()
    assert 0 < stats["entries"] < 10 and stats["bytes"] <= 3000
    assert chat(gw, messages=[{"role": "user", "content": "question 9"}]).headers["x-vampire-cache"] == "hit"
    assert chat(gw, messages=[{"role": "user", "content": "question 0"}]).headers["x-vampire-cache"] == "miss"
    cleared = httpx.delete(f"{gw.url}/vampire/v1/cache").json()
    assert cleared["entries"] == 0 and cleared["bytes"] == 0


def test_cache_ttl() -> None:
    cache = vampire.ResultCache(10_000, ttl_s=60)
    cache.put("k", vampire.Result(200, [], [b"x"], False))
    assert cache.get("k") is not None
    cache.entries["k"].created -= 61
    assert cache.get("k") is None and cache.bytes == 0


def test_cache_key_parts() -> None:
    a = vampire.canonical_request(
        "/v1/chat/completions", {"model": "m", "stream": True, "temperature": 0, "x": [1, 2]}
    )
    b = vampire.canonical_request(
        "/v1/chat/completions",
        {"x": [1, 2], "temperature": 0, "model": "m", "stream_options": {"include_usage": True}},
    )
    assert a == b
    assert a != vampire.canonical_request("/v1/completions", {"model": "m", "temperature": 0, "x": [1, 2]})
    family, business = vampire.CacheKey("family", a), vampire.CacheKey("business", a)
    assert family.answer("fp1") != business.answer("fp1") and family.flight("m") != business.flight("m")
    assert family.answer("fp1") != family.answer("fp2") and family.flight("m") != family.flight("n")
    assert vampire.deterministic("/v1/chat/completions", {"temperature": 0})
    assert vampire.deterministic("/v1/chat/completions", {"seed": 7, "temperature": 1})
    assert not vampire.deterministic("/v1/chat/completions", {"temperature": 0.1})
    assert not vampire.deterministic("/v1/chat/completions", {"seed": True})
    assert vampire.deterministic("/v1/embeddings", {})
