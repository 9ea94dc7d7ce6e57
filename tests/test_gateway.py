"""The data plane, black-box: real SDK clients -> real gateway (uvicorn) -> emulated LM Studio nodes."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import anthropic
import httpx
import openai
import pytest
from conftest import wait_until

NODE_TOKEN = "sk-lm-abcd1234:ZyXwVuTsRqPoNmLkJiHg"
CLIENT_KEY = "client-secret-never-upstream"


@pytest.fixture
def pair(node_factory: Any, gateway_factory: Any) -> tuple[Any, Any, Any]:
    """Two nodes holding different models, and one model held by both (loaded only on B)."""
    a = node_factory(
        "qwen/qwen3-4b:llm:loaded,text-embedding-nomic-embed-text-v1.5:embedding:loaded,shared/m:llm"
    )
    b = node_factory("google/gemma-3-4b:vlm:loaded,shared/m:llm:loaded")
    gw = gateway_factory([a.url, b.url])
    return a, b, gw


def inference_requests(node: Any) -> list[Any]:
    return [r for r in node.received if r.method == "POST"]


def client(gw: Any, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.v1, api_key=CLIENT_KEY, max_retries=0, **kw)


# ── routing ─────────────────────────────────────────────────────────────────────────────────────────────


def test_each_model_reaches_the_node_that_has_it(pair: Any) -> None:
    a, b, gw = pair
    oc = client(gw)
    r1 = oc.chat.completions.create(
        model="qwen/qwen3-4b", messages=[{"role": "user", "content": "hi"}], temperature=0
    )
    r2 = oc.chat.completions.create(model="google/gemma-3-4b", messages=[{"role": "user", "content": "hi"}])
    assert r1.model == "qwen/qwen3-4b" and r1.choices[0].message.content
    assert r2.model == "google/gemma-3-4b"
    assert [r.json["model"] for r in inference_requests(a)] == ["qwen/qwen3-4b"]
    assert [r.json["model"] for r in inference_requests(b)] == ["google/gemma-3-4b"]


def test_prefers_the_node_where_the_model_is_loaded(pair: Any) -> None:
    a, b, gw = pair
    for _ in range(3):
        client(gw).chat.completions.create(model="shared/m", messages=[{"role": "user", "content": "x"}])
    assert len(inference_requests(b)) == 3 and not inference_requests(a)
    assert a.stats.loads == 0


def test_pin_forces_the_node(pair: Any) -> None:
    a, b, gw = pair
    node_a = gw.app.registry.by_url(a.url.rstrip("/")).id
    raw = httpx.post(
        f"{gw.v1}/chat/completions",
        json={"model": f"shared/m@{node_a}", "messages": [{"role": "user", "content": "x"}]},
    )
    assert raw.status_code == 200, raw.text
    assert raw.headers["x-vampire-node"] == node_a
    assert [r.json["model"] for r in inference_requests(a)] == ["shared/m"]  # pin suffix removed upstream
    assert not inference_requests(b)


def test_models_are_aggregated_once_with_auto(pair: Any) -> None:
    _, _, gw = pair
    ids = [m.id for m in client(gw).models.list().data]
    assert ids[0] == "vampire:auto"
    assert sorted(ids[1:]) == [
        "google/gemma-3-4b",
        "qwen/qwen3-4b",
        "shared/m",
        "text-embedding-nomic-embed-text-v1.5",
    ]
    one = httpx.get(f"{gw.v1}/models/qwen/qwen3-4b").json()
    assert one == {"id": "qwen/qwen3-4b", "object": "model", "created": one["created"], "owned_by": "vampire"}
    detail = httpx.get(f"{gw.v1}/models", params={"vampire_detail": "true"}).json()["data"]
    shared = next(m for m in detail if m["id"] == "shared/m")
    assert sorted(p["loaded"] for p in shared["vampire"]["placement"]) == [False, True]


def test_auto_picks_a_loaded_chat_model(pair: Any) -> None:
    _, _, gw = pair
    resp = httpx.post(
        f"{gw.v1}/chat/completions",
        json={"model": "vampire:auto", "messages": [{"role": "user", "content": "x"}]},
    )
    assert resp.status_code == 200
    assert resp.headers["x-vampire-model"] in ("qwen/qwen3-4b", "google/gemma-3-4b", "shared/m")


def test_response_headers_name_node_model_and_request(pair: Any) -> None:
    a, _, gw = pair
    raw = client(gw).chat.completions.with_raw_response.create(
        model="qwen/qwen3-4b", messages=[{"role": "user", "content": "x"}]
    )
    assert raw.headers["x-vampire-node"] == gw.app.registry.by_url(a.url.rstrip("/")).id
    assert raw.headers["x-vampire-model"] == "qwen/qwen3-4b"
    assert raw.headers["x-vampire-request-id"].startswith("req_")


# ── the SDK surfaces ────────────────────────────────────────────────────────────────────────────────────


def test_openai_streaming_chat_and_embeddings(pair: Any) -> None:
    a, _, gw = pair
    oc = client(gw)
    stream = oc.chat.completions.create(
        model="qwen/qwen3-4b",
        messages=[{"role": "user", "content": "x"}],
        stream=True,
        max_tokens=8,
        temperature=0,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    direct = openai.OpenAI(base_url=a.url + "/v1", api_key="x").chat.completions.create(
        model="qwen/qwen3-4b", messages=[{"role": "user", "content": "x"}], max_tokens=8, temperature=0
    )
    assert text == direct.choices[0].message.content and len(text.split()) == 8
    emb = oc.embeddings.create(model="text-embedding-nomic-embed-text-v1.5", input=["a", "b"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 16


def test_include_usage_passes_through(pair: Any) -> None:
    _, _, gw = pair
    chunks = list(
        client(gw).chat.completions.create(
            model="qwen/qwen3-4b",
            messages=[{"role": "user", "content": "x"}],
            stream=True,
            max_tokens=5,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


def test_responses_api(pair: Any) -> None:
    _, _, gw = pair
    oc = client(gw)
    resp = oc.responses.create(model="qwen/qwen3-4b", input="hello", max_output_tokens=6)
    assert resp.output_text and resp.id.startswith("resp_")
    events = [e.type for e in oc.responses.create(model="qwen/qwen3-4b", input="hello", stream=True)]
    assert events[0] == "response.created" and events[-1] == "response.completed"


def test_anthropic_messages(pair: Any) -> None:
    _, b, gw = pair
    ac = anthropic.Anthropic(base_url=gw.url, api_key=CLIENT_KEY, max_retries=0)
    msg = ac.messages.create(
        model="google/gemma-3-4b", max_tokens=7, messages=[{"role": "user", "content": "hi"}]
    )
    assert msg.content[0].text and msg.usage.output_tokens == 7
    with ac.messages.stream(
        model="google/gemma-3-4b", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
    ) as s:
        streamed = s.get_final_text()
    assert len(streamed.split()) == 5
    assert all(r.headers.get("x-api-key") is None for r in b.received)


def test_other_v1_paths_are_forwarded(pair: Any) -> None:
    _, _, gw = pair
    resp = httpx.post(f"{gw.v1}/nonexistent", json={"model": "qwen/qwen3-4b"})
    # LM Studio answers unknown routes with HTTP 200 and an error body; the gateway relays what the node said.
    assert resp.status_code == 200
    assert resp.json() == {"error": "Unexpected endpoint or method. (POST /v1/nonexistent)"}


# ── streaming behaviour ─────────────────────────────────────────────────────────────────────────────────


def test_first_chunk_arrives_long_before_generation_ends(node_factory: Any, gateway_factory: Any) -> None:
    node = node_factory("slow/model:llm:loaded", tps=20, completion_tokens=1000)
    gw = gateway_factory([node.url])
    body = {
        "model": "slow/model",
        "stream": True,
        "max_tokens": 40,
        "messages": [{"role": "user", "content": "x"}],
    }
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", f"{gw.v1}/chat/completions", json=body) as resp,
    ):
        assert resp.status_code == 200
        chunks = resp.iter_raw()
        first = next(chunks)
        t_first = time.monotonic()
        # The node is still generating when the client already holds the first token.
        assert node.stats.generations_finished == 0 and node.stats.active_generations == 1
        assert first.startswith(b"data: ")
        rest = b"".join(chunks)
        t_end = time.monotonic()
    assert (first + rest).rstrip().endswith(b"data: [DONE]")
    assert t_end - t_first > 1.0  # 39 more tokens at 20/s were still to come


def test_client_disconnect_stops_generation_within_a_second(node_factory: Any, gateway_factory: Any) -> None:
    node = node_factory("slow/model:llm:loaded", tps=20, completion_tokens=1000)
    gw = gateway_factory([node.url])
    body = {
        "model": "slow/model",
        "stream": True,
        "max_tokens": 400,
        "messages": [{"role": "user", "content": "x"}],
    }
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", f"{gw.v1}/chat/completions", json=body) as resp,
    ):
        next(resp.iter_raw())
    wait_until(lambda: node.stats.generations_cancelled == 1, timeout=1.0)
    assert node.stats.active_generations == 0
    wait_until(lambda: all(n.in_flight == 0 for n in gw.app.registry.nodes.values()), timeout=1.0)


def test_disconnect_while_waiting_for_first_byte_cancels_upstream(
    node_factory: Any, gateway_factory: Any
) -> None:
    node = node_factory("cold/model:llm", load_delay=30)
    gw = gateway_factory([node.url])
    body = {"model": "cold/model", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gw.v1}/chat/completions", json=body, timeout=0.5)
    wait_until(lambda: all(n.in_flight == 0 for n in gw.app.registry.nodes.values()), timeout=1.0)


def test_stale_pooled_connection_is_retried_on_a_fresh_one(node_factory: Any, gateway_factory: Any) -> None:
    node = node_factory("m:llm:loaded", close_after_response=True)
    gw = gateway_factory([node.url])
    for stream in (False, True, False, True):
        resp = httpx.post(
            f"{gw.v1}/chat/completions",
            json={"model": "m", "stream": stream, "messages": [{"role": "user", "content": "x"}]},
        )
        assert resp.status_code == 200, resp.text
    assert node.stats.stale_drops >= 1  # the pooled connection really was dead at least once


# ── credentials ─────────────────────────────────────────────────────────────────────────────────────────


def test_node_token_is_sent_and_client_credentials_never_are(node_factory: Any, gateway_factory: Any) -> None:
    node = node_factory("m:llm:loaded", token=NODE_TOKEN)
    gw = gateway_factory([f"{node.url}#{NODE_TOKEN}"])
    oc = client(gw, default_headers={"X-Vampire-Strategy": "auto", "X-Vampire-Trace": "1"})
    oc.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}], extra_body={"vampire": {"trace": True}}
    )
    ac = anthropic.Anthropic(base_url=gw.url, api_key=CLIENT_KEY, max_retries=0)
    ac.messages.create(model="m", max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    posts = inference_requests(node)
    assert len(posts) == 2
    for req in posts:
        assert req.headers["authorization"] == f"Bearer {NODE_TOKEN}"
        assert "x-api-key" not in req.headers
        assert not any(k.startswith("x-vampire") for k in req.headers)
        assert CLIENT_KEY not in json.dumps(req.headers) and CLIENT_KEY.encode() not in req.body
    assert "vampire" not in posts[0].json


# ── errors, in the caller's format ──────────────────────────────────────────────────────────────────────


def test_malformed_json_is_400(pair: Any) -> None:
    _, _, gw = pair
    resp = httpx.post(
        f"{gw.v1}/chat/completions",
        content=b'{"model": "qwen/qwen3-4b", ',
        headers={"content-type": "application/json"},
    )
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_json" and err["param"] is None
    assert err["message"].startswith("The request body is not valid JSON")
    ant = httpx.post(f"{gw.v1}/messages", content=b"[", headers={"content-type": "application/json"})
    assert ant.status_code == 400
    assert ant.json()["type"] == "error" and ant.json()["error"]["type"] == "invalid_request_error"


def test_unknown_model_is_404_naming_the_available_models(pair: Any) -> None:
    _, _, gw = pair
    with pytest.raises(openai.NotFoundError) as info:
        client(gw).chat.completions.create(model="no/such", messages=[{"role": "user", "content": "x"}])
    err = info.value.body
    assert (
        err["code"] == "model_not_found"
        and err["param"] == "model"
        and err["type"] == "invalid_request_error"
    )
    assert err["message"] == (
        "The model `no/such` does not exist. Available models: vampire:auto, google/gemma-3-4b, "
        "qwen/qwen3-4b, shared/m, text-embedding-nomic-embed-text-v1.5."
    )
    with pytest.raises(anthropic.NotFoundError) as ainfo:
        anthropic.Anthropic(base_url=gw.url, api_key="k", max_retries=0).messages.create(
            model="no/such", max_tokens=3, messages=[{"role": "user", "content": "x"}]
        )
    assert ainfo.value.body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": err["message"]},
    }


def test_oversized_body_is_413(node_factory: Any, gateway_factory: Any) -> None:
    node = node_factory("m:llm:loaded")
    gw = gateway_factory([node.url], max_body_bytes=1024)
    big = {"model": "m", "messages": [{"role": "user", "content": "x" * 4096}]}
    resp = httpx.post(f"{gw.v1}/chat/completions", json=big)
    assert resp.status_code == 413
    assert resp.json()["error"] == {
        "message": "Request body is larger than 1024 bytes.",
        "type": "invalid_request_error",
        "param": None,
        "code": "request_too_large",
    }

    def chunked() -> Any:  # no Content-Length: the limit is enforced while reading
        yield b'{"model": "m", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"x" * 512
        yield b'"}]}'

    resp = httpx.post(f"{gw.v1}/chat/completions", content=chunked())
    assert resp.status_code == 413
    assert not inference_requests(node)


def test_no_node_reachable_is_503_with_retry_after(node_factory: Any, gateway_factory: Any, bg: Any) -> None:
    node = node_factory("m:llm:loaded")
    gw = gateway_factory([node.url], refresh_s=60)
    bg.run(node.stop())  # dies after the gateway saw it online: the connect fails at request time
    resp = httpx.post(
        f"{gw.v1}/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]}
    )
    assert resp.status_code == 503 and resp.headers["retry-after"] == "5"
    err = resp.json()["error"]
    assert err["code"] == "no_node_available" and err["type"] == "server_error"
    wait_until(lambda: gw.app.registry.by_url(node.url.rstrip("/")).state == "offline", timeout=3)
    again = httpx.post(
        f"{gw.v1}/messages",
        json={"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "x"}]},
    )
    assert again.status_code == 503 and again.headers["retry-after"] == "5"
    assert again.json() == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "No node is available right now."},
    }


def test_upstream_error_status_passes_through_with_its_body(node_factory: Any, gateway_factory: Any) -> None:
    node = node_factory("m:llm:loaded")
    gw = gateway_factory([node.url])
    node.set_fault("500")
    direct = httpx.post(f"{node.url}/v1/chat/completions", json={"model": "m", "messages": []})
    node.received.clear()
    resp = httpx.post(
        f"{gw.v1}/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]}
    )
    assert resp.status_code == 500 and resp.json() == direct.json()
    node.set_fault(None)
    emb = httpx.post(f"{gw.v1}/embeddings", json={"model": "m", "input": "x"})
    assert emb.status_code == 400 and emb.json()["error"]["code"] == "unsupported_capability"


def test_missing_model_and_non_object_bodies(pair: Any) -> None:
    _, _, gw = pair
    no_model = httpx.post(f"{gw.v1}/chat/completions", json={"messages": []})
    assert no_model.status_code == 400 and no_model.json()["error"]["param"] == "model"
    array = httpx.post(f"{gw.v1}/chat/completions", json=[1, 2])
    assert array.status_code == 400 and array.json()["error"]["code"] == "invalid_request"


def test_healthz(pair: Any) -> None:
    _, _, gw = pair
    assert httpx.get(f"{gw.url}/healthz").json() == {"status": "ok"}


def test_mid_stream_failure_ends_with_an_error_frame(node_factory: Any, gateway_factory: Any) -> None:
    node = node_factory("m:llm:loaded", tps=200)
    gw = gateway_factory([node.url])
    node.set_fault("midstream", after_chunks=2)
    body = {"model": "m", "stream": True, "max_tokens": 20, "messages": [{"role": "user", "content": "x"}]}
    resp = httpx.post(f"{gw.v1}/chat/completions", json=body)
    frames = [f for f in resp.text.split("\n\n") if f]
    assert resp.status_code == 200
    assert json.loads(frames[-2].removeprefix("data: "))["error"]["code"] == "upstream_failed"
    assert frames[-1] == "data: [DONE]"


def test_port_is_free_after_stop(node_factory: Any, gateway_factory: Any) -> None:
    node = node_factory("m:llm:loaded")
    gw = gateway_factory([node.url])
    gw.stop()
    with socket.socket() as s:
        s.bind(("127.0.0.1", gw.port))
