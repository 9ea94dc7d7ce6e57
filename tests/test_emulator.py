"""The node emulator, checked against the LM Studio / Ollama references with real HTTP clients and SDKs."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import anthropic
import httpx
import ollama
import openai
import pytest
from anthropic.types import TextBlock
from conftest import LoopThread, wait_until
from openai.types.chat import ChatCompletionMessageFunctionToolCall

from vampire import MockModel, MockNode, parse_model_specs

LLM = "qwen/qwen3-4b"
EMB = "text-embedding-nomic-embed-text-v1.5"
DEFAULT_MODELS = f"{LLM}:loaded,{EMB}:embedding"
TOKEN = "sk-lm-Abcd1234:ABCDEFGHIJ0123456789"
# Typed Any so the SDKs' TypedDict parameters accept these plain literals.
HELLO: Any = [{"role": "user", "content": "Say hello to the world"}]

NodeFactory = Callable[..., MockNode]


@pytest.fixture
def make_node(bg: LoopThread) -> Iterator[NodeFactory]:
    nodes: list[MockNode] = []

    def make(models: str | list[MockModel] = DEFAULT_MODELS, **kwargs: Any) -> MockNode:
        node = MockNode(parse_model_specs(models) if isinstance(models, str) else models, **kwargs)
        bg.run(node.start())
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        bg.run(node.stop())


def post(node: MockNode, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(node.url + path, json=body, timeout=10, **kwargs)


def get(node: MockNode, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(node.url + path, timeout=10, **kwargs)


def chat(node: MockNode, **extra: Any) -> httpx.Response:
    return post(node, "/v1/chat/completions", {"model": LLM, "messages": HELLO, **extra})


def sse_frames(text: str) -> list[tuple[str | None, str]]:
    """(event name, data) per SSE frame."""
    frames: list[tuple[str | None, str]] = []
    for block in text.strip().split("\n\n"):
        event = next((ln[7:] for ln in block.splitlines() if ln.startswith("event: ")), None)
        data = "\n".join(ln[6:] for ln in block.splitlines() if ln.startswith("data: "))
        frames.append((event, data))
    return frames


def sse_json(text: str) -> list[dict[str, Any]]:
    return [json.loads(data) for _, data in sse_frames(text) if data != "[DONE]"]


def lmstudio_client(node: MockNode, api_key: str = "lm-studio") -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url + "/v1", api_key=api_key, max_retries=0)


# ---- model specs ---------------------------------------------------------------------------------------


def test_parse_model_specs_reads_flags_and_keeps_id_colons() -> None:
    models = parse_model_specs(
        f"{LLM}:llm:loaded, {EMB}:embedding,google/gemma-3-4b:vlm,{LLM}:2,llama3.2:latest"
    )
    assert [m.id for m in models] == [LLM, EMB, "google/gemma-3-4b", f"{LLM}:2", "llama3.2:latest"]
    assert [m.type for m in models] == ["llm", "embedding", "vlm", "llm", "llm"]
    assert [m.loaded for m in models] == [True, False, False, False, False]
    assert parse_model_specs("m:loaded:embedding")[0].type == "embedding"


@pytest.mark.parametrize("spec", ["", " ", "a,,b", "a:llm:vlm", "a:loaded:loaded", "a::llm", "a,a", "bad id"])
def test_parse_model_specs_rejects_bad_input(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_model_specs(spec)


def test_mock_model_derives_defaults() -> None:
    vlm = MockModel("google/gemma-3-4b", type="vlm")
    emb = MockModel(EMB, type="embedding")
    assert (vlm.publisher, vlm.vision, vlm.tools) == ("google", True, True)
    assert (emb.publisher, emb.vision, emb.tools) == ("lmstudio-community", False, False)
    with pytest.raises(ValueError):
        MockModel("x", type="embeddings")


def test_node_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        MockNode([], flavor="vllm")
    with pytest.raises(ValueError):
        MockNode([], version="four")
    with pytest.raises(ValueError):
        MockNode([MockModel("a"), MockModel("a")])


# ---- LM Studio: catalogue and routing ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/foo"),
        ("POST", "/v1/models"),
        ("OPTIONS", "/v1/chat/completions"),
        ("GET", "/v1/models/x"),
        ("GET", "/api/v0/load"),
        ("GET", "/v1/chat/completions"),
    ],
)
def test_unknown_route_answers_200_with_error_string(make_node: NodeFactory, method: str, path: str) -> None:
    node = make_node()
    response = httpx.request(method, node.url + path, timeout=10)
    assert response.status_code == 200
    assert response.json() == {"error": f"Unexpected endpoint or method. ({method} {path})"}
    assert response.headers["x-powered-by"] == "Express"


def test_greeting_identifies_lmstudio(make_node: NodeFactory) -> None:
    node = make_node(version="0.4.6")
    assert get(node, "/lmstudio-greeting").json() == {"lmstudio": True, "version": "0.4.6"}


def test_openai_models_lists_every_model_with_jit(make_node: NodeFactory) -> None:
    node = make_node()
    assert get(node, "/v1/models").json() == {
        "data": [
            {"id": LLM, "object": "model", "owned_by": "organization_owner"},
            {"id": EMB, "object": "model", "owned_by": "organization_owner"},
        ],
        "object": "list",
    }


def test_openai_models_lists_only_loaded_without_jit(make_node: NodeFactory) -> None:
    node = make_node(jit=False)
    assert [m["id"] for m in get(node, "/v1/models").json()["data"]] == [LLM]
    assert [m["id"] for m in get(node, "/api/v0/models").json()["data"]] == [LLM]


def test_v0_models_shape(make_node: NodeFactory) -> None:
    node = make_node()
    llm, emb = get(node, "/api/v0/models").json()["data"]
    assert llm == {
        "id": LLM,
        "object": "model",
        "type": "llm",
        "publisher": "qwen",
        "arch": "qwen3",
        "compatibility_type": "gguf",
        "quantization": "Q4_K_M",
        "state": "loaded",
        "max_context_length": 32768,
        "loaded_context_length": 4096,
        "capabilities": ["tool_use"],
    }
    assert emb["type"] == "embeddings" and emb["state"] == "not-loaded"
    assert "loaded_context_length" not in emb and "capabilities" not in emb
    assert get(node, f"/api/v0/models/{LLM}").json() == llm
    assert get(node, "/api/v0/models/nope").status_code == 404


def test_v1_models_shape(make_node: NodeFactory) -> None:
    node = make_node([MockModel(LLM, loaded=True, reasoning=True), MockModel(EMB, type="embedding")])
    llm, emb = get(node, "/api/v1/models").json()["models"]
    assert llm == {
        "type": "llm",
        "publisher": "qwen",
        "key": LLM,
        "display_name": "Qwen3 4B",
        "architecture": "qwen3",
        "quantization": {"name": "Q4_K_M", "bits_per_weight": 4},
        "size_bytes": 2_500_000_000,
        "params_string": "4B",
        "loaded_instances": [
            {
                "id": LLM,
                "config": {
                    "context_length": 4096,
                    "eval_batch_size": 512,
                    "parallel": 4,
                    "flash_attention": True,
                },
            },
        ],
        "max_context_length": 32768,
        "format": "gguf",
        "capabilities": {
            "vision": False,
            "trained_for_tool_use": True,
            "reasoning": {"allowed_options": ["off", "on"], "default": "on"},
        },
        "description": None,
        "variants": [f"{LLM}@q4_k_m"],
        "selected_variant": f"{LLM}@q4_k_m",
    }
    assert emb["type"] == "embedding" and emb["loaded_instances"] == []
    assert "capabilities" not in emb and "architecture" not in emb


def test_version_03_lacks_native_api_messages_and_auth(make_node: NodeFactory) -> None:
    node = make_node(version="0.3.31", token=TOKEN)
    unexpected = get(node, "/api/v1/models").json()
    assert unexpected == {"error": "Unexpected endpoint or method. (GET /api/v1/models)"}
    assert "Unexpected endpoint" in post(node, "/v1/messages", {"model": LLM}).json()["error"]
    assert get(node, "/api/v0/models").json()["data"]
    assert chat(node).status_code == 200  # no token needed: 0.3 ignores Authorization
    assert post(node, "/v1/responses", {"model": LLM, "input": "hi"}).json()["object"] == "response"


def test_version_040_has_native_api_but_not_messages(make_node: NodeFactory) -> None:
    node = make_node(version="0.4.0")
    assert "models" in get(node, "/api/v1/models").json()
    messages = post(node, "/v1/messages", {"model": LLM, "max_tokens": 5, "messages": HELLO})
    assert messages.json() == {"error": "Unexpected endpoint or method. (POST /v1/messages)"}


def test_version_035_has_no_v0_or_responses(make_node: NodeFactory) -> None:
    node = make_node(version="0.3.5")
    assert "Unexpected endpoint" in get(node, "/api/v0/models").json()["error"]
    assert "Unexpected endpoint" in post(node, "/v1/responses", {"model": LLM, "input": "hi"}).json()["error"]


# ---- LM Studio: auth ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "An LM Studio API token is required to make requests to this server, but none was provided"),
        ({"Authorization": "Basic abc"}, "An LM Studio API token is required"),
        (
            {"Authorization": "Bearer lm-studio"},
            "Malformed LM Studio API token provided: lm-stu... Ensure you",
        ),
        (
            {"Authorization": "Bearer sk-lm-Zzzz9999:ZZZZZZZZZZ0123456789"},
            "Invalid LM Studio API token provided.",
        ),
    ],
)
def test_auth_rejects_missing_malformed_and_wrong_tokens(
    make_node: NodeFactory, headers: dict[str, str], message: str
) -> None:
    node = make_node(token=TOKEN)
    chat_body = {"model": LLM, "messages": HELLO}
    for response in (
        get(node, "/v1/models", headers=headers),
        post(node, "/v1/chat/completions", chat_body, headers=headers),
    ):
        assert response.status_code == 401
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("invalid_request", "invalid_api_key")
        assert error["message"].startswith(message)


def test_auth_accepts_token_and_keeps_greeting_open(make_node: NodeFactory) -> None:
    node = make_node(token=TOKEN)
    assert get(node, "/lmstudio-greeting").json()["lmstudio"] is True
    assert get(node, "/api/v1/models").status_code == 401
    assert get(node, "/foo").status_code == 401
    good = {"Authorization": f"Bearer {TOKEN}"}
    assert get(node, "/api/v1/models", headers=good).status_code == 200
    completion = lmstudio_client(node, TOKEN).chat.completions.create(model=LLM, messages=HELLO)
    assert completion.choices[0].message.content


def test_auth_x_api_key_only_on_messages(make_node: NodeFactory) -> None:
    node = make_node(token=TOKEN)
    body = {"model": LLM, "max_tokens": 4, "messages": HELLO}
    assert post(node, "/v1/messages", body, headers={"x-api-key": TOKEN}).status_code == 200
    assert chat(node).status_code == 401
    assert get(node, "/v1/models", headers={"x-api-key": TOKEN}).status_code == 401
    reply = anthropic.Anthropic(base_url=node.url, api_key=TOKEN, max_retries=0).messages.create(
        model=LLM, max_tokens=4, messages=HELLO
    )
    assert reply.usage.output_tokens == 4


def test_set_token_changes_and_revokes_at_run_time(make_node: NodeFactory) -> None:
    node = make_node()
    assert get(node, "/v1/models").status_code == 200
    node.set_token(TOKEN)
    assert get(node, "/v1/models").status_code == 401
    node.set_token(None)
    assert get(node, "/v1/models").status_code == 200


# ---- LM Studio: chat completions -----------------------------------------------------------------------


def test_chat_completion_non_stream_shape(make_node: NodeFactory) -> None:
    node = make_node()
    body = chat(node, temperature=0).json()
    assert body["id"].startswith("chatcmpl-") and isinstance(body["created"], int)
    assert (body["object"], body["model"], body["system_fingerprint"], body["stats"]) == (
        "chat.completion",
        LLM,
        LLM,
        {},
    )
    (choice,) = body["choices"]
    assert (choice["index"], choice["logprobs"], choice["finish_reason"]) == (0, None, "stop")
    assert choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"].split()) == 12
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}


def test_chat_stream_chunks(make_node: NodeFactory) -> None:
    node = make_node(completion_tokens=3)
    response = chat(node, stream=True)
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.endswith("data: [DONE]\n\n")
    chunks = sse_json(response.text)
    assert len(chunks) == 4 and all("usage" not in c for c in chunks)
    for chunk in chunks:
        assert (chunk["object"], chunk["model"], chunk["system_fingerprint"]) == (
            "chat.completion.chunk",
            LLM,
            LLM,
        )
        assert chunk["choices"][0]["logprobs"] is None
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0]["role"] == "assistant" and "role" not in deltas[1]
    assert deltas[1]["content"].startswith(" ")
    assert deltas[-1] == {} and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None, None, None]


def test_chat_stream_usage_only_with_include_usage(make_node: NodeFactory) -> None:
    node = make_node(completion_tokens=3)
    chunks = sse_json(chat(node, stream=True, stream_options={"include_usage": True}).text)
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


def test_openai_client_streams_the_same_text(make_node: NodeFactory) -> None:
    node = make_node()
    client = lmstudio_client(node)
    whole = client.chat.completions.create(model=LLM, messages=HELLO, temperature=0)
    stream = client.chat.completions.create(model=LLM, messages=HELLO, temperature=0, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == whole.choices[0].message.content


def test_max_tokens_cuts_the_answer_with_length(make_node: NodeFactory) -> None:
    node = make_node()
    body = chat(node, max_tokens=5).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5
    assert chat(node, max_tokens=500).json()["usage"]["completion_tokens"] == 12


def test_generation_is_deterministic_only_when_asked(make_node: NodeFactory) -> None:
    node = make_node()

    def text(**extra: Any) -> str:
        return chat(node, **extra).json()["choices"][0]["message"]["content"]

    assert text(temperature=0) == text(temperature=0)
    assert text(temperature=0.7, seed=42) == text(temperature=0.7, seed=42)
    assert text(temperature=1) != text(temperature=1)
    twin = make_node()
    assert chat(twin, temperature=0).json()["choices"][0]["message"]["content"] == text(temperature=0)


def test_prompt_tokens_count_words_plus_four_per_message(make_node: NodeFactory) -> None:
    node = make_node()
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a b c"}]},
    ]
    usage = post(node, "/v1/chat/completions", {"model": LLM, "messages": messages}).json()["usage"]
    assert usage["prompt_tokens"] == (2 + 4) + (3 + 4)
    assert node.stats.prompt_tokens_total == 13 and node.stats.completion_tokens_total == 12


WEATHER_TOOLS: Any = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
]
WEATHER_ASK: Any = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_tool_call_non_stream(make_node: NodeFactory) -> None:
    node = make_node()
    completion = lmstudio_client(node).chat.completions.create(
        model=LLM, messages=WEATHER_ASK, tools=WEATHER_TOOLS
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert isinstance(call, ChatCompletionMessageFunctionToolCall)
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert "tool_calls" not in chat(node, tools=WEATHER_TOOLS).json()["choices"][0]["message"]


def test_tool_call_stream_pieces(make_node: NodeFactory) -> None:
    node = make_node()
    body = {"model": LLM, "messages": WEATHER_ASK, "tools": WEATHER_TOOLS, "stream": True}
    chunks = sse_json(post(node, "/v1/chat/completions", body).text)
    pieces = [c["choices"][0]["delta"].get("tool_calls", [None])[0] for c in chunks[:-1]]
    head = pieces[0]
    assert head["id"] and head["type"] == "function"
    assert head["function"] == {"name": "get_weather", "arguments": ""}
    assert all(set(p) == {"index", "function"} for p in pieces[1:])
    assert json.loads("".join(p["function"]["arguments"] for p in pieces[1:])) == {"city": "Paris"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


# ---- LM Studio: completions, embeddings, errors ---------------------------------------------------------


def test_completions_non_stream_and_stream(make_node: NodeFactory) -> None:
    node = make_node(completion_tokens=4)
    body = post(
        node, "/v1/completions", {"model": LLM, "prompt": "Once upon a time", "temperature": 0}
    ).json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["choices"][0]["finish_reason"] == "stop" and body["usage"]["prompt_tokens"] == 4
    stream = post(
        node,
        "/v1/completions",
        {"model": LLM, "prompt": "Once upon a time", "temperature": 0, "stream": True},
    )
    chunks = sse_json(stream.text)
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == body["choices"][0]["text"]


def test_embeddings_are_deterministic_unit_vectors(make_node: NodeFactory) -> None:
    node = make_node()
    body = post(node, "/v1/embeddings", {"model": EMB, "input": ["one two", "three"]}).json()
    assert body["object"] == "list" and body["model"] == EMB
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    first, second = (d["embedding"] for d in body["data"])
    assert len(first) == 16 and abs(sum(v * v for v in first) - 1.0) < 1e-9
    assert first != second
    again = lmstudio_client(node).embeddings.create(model=EMB, input="one two")
    assert again.data[0].embedding == first


def test_model_kind_mismatch_is_rejected(make_node: NodeFactory) -> None:
    node = make_node()
    wrong_chat = post(node, "/v1/chat/completions", {"model": EMB, "messages": HELLO})
    assert wrong_chat.status_code == 400 and "embedding model" in wrong_chat.json()["error"]["message"]
    wrong_embed = post(node, "/v1/embeddings", {"model": LLM, "input": "x"})
    assert (
        wrong_embed.status_code == 400 and "not an embedding model" in wrong_embed.json()["error"]["message"]
    )


def test_malformed_json_gets_openai_style_400(make_node: NodeFactory) -> None:
    node = make_node()
    response = httpx.post(node.url + "/v1/chat/completions", content=b"{nope", timeout=10)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"


def test_unknown_model_gets_invalid_identifier(make_node: NodeFactory) -> None:
    node = make_node()
    response = post(node, "/v1/chat/completions", {"model": "o4-mini", "messages": HELLO})
    assert response.status_code == 400
    assert response.json() == {
        "error": {
            "message": f'Invalid model identifier "o4-mini". Please specify a valid downloaded model (e.g., {LLM}, {EMB}).',
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


def test_json_object_response_format_is_rejected(make_node: NodeFactory) -> None:
    node = make_node()
    response = chat(node, response_format={"type": "json_object"})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "'response_format.type' must be 'json_schema' or 'text'"


def test_jit_off_and_nothing_loaded_says_no_models_loaded(make_node: NodeFactory) -> None:
    node = make_node(LLM, jit=False)
    response = chat(node)
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("No models loaded. Please load a model")
    assert node.stats.loads == 0


# ---- LM Studio: loading ----------------------------------------------------------------------------------


def loaded_instances(node: MockNode) -> dict[str, list[str]]:
    models = get(node, "/api/v1/models").json()["models"]
    return {m["key"]: [i["id"] for i in m["loaded_instances"]] for m in models}


def test_jit_load_waits_and_auto_evicts_previous_jit_model(make_node: NodeFactory) -> None:
    node = make_node("a,b,c:loaded", load_delay=0.2)
    started = time.monotonic()
    assert post(node, "/v1/chat/completions", {"model": "a", "messages": HELLO}).status_code == 200
    assert time.monotonic() - started >= 0.2
    assert loaded_instances(node) == {"a": ["a"], "b": [], "c": ["c"]}
    post(node, "/v1/chat/completions", {"model": "b", "messages": HELLO})
    assert loaded_instances(node) == {"a": [], "b": ["b"], "c": ["c"]}
    post(node, "/v1/chat/completions", {"model": "c", "messages": HELLO})
    assert (node.stats.loads, node.stats.unloads, node.stats.load_log) == (2, 1, ["a", "b"])


def test_jit_without_auto_evict_keeps_models(make_node: NodeFactory) -> None:
    node = make_node("a,b", auto_evict=False)
    for name in ("a", "b"):
        post(node, "/v1/chat/completions", {"model": name, "messages": HELLO})
    assert node.loaded_ids() == ["a", "b"]


def test_concurrent_requests_share_one_jit_load(make_node: NodeFactory) -> None:
    node = make_node("a", load_delay=0.2)
    results: list[int] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                post(node, "/v1/chat/completions", {"model": "a", "messages": HELLO}).status_code
            )
        )
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == [200, 200, 200] and node.stats.loads == 1


def test_explicit_load_creates_numbered_instances(make_node: NodeFactory) -> None:
    node = make_node(load_delay=0.05)
    loaded = post(
        node, "/api/v1/models/load", {"model": LLM, "context_length": 8192, "echo_load_config": True}
    ).json()
    assert loaded["type"] == "llm" and loaded["instance_id"] == f"{LLM}:2" and loaded["status"] == "loaded"
    assert loaded["load_time_seconds"] >= 0.05 and loaded["load_config"]["context_length"] == 8192
    assert f"{LLM}:2" in [m["id"] for m in get(node, "/v1/models").json()["data"]]
    assert loaded_instances(node)[LLM] == [LLM, f"{LLM}:2"]
    assert chat(node, model=f"{LLM}:2").json()["model"] == f"{LLM}:2"
    assert post(node, "/api/v1/models/load", {"model": LLM}).json()["instance_id"] == f"{LLM}:3"
    emb = post(node, "/api/v1/models/load", {"model": EMB, "echo_load_config": True}).json()
    assert emb["type"] == "embedding" and emb["load_config"] == {"context_length": 4096}
    assert post(node, "/api/v1/models/unload", {"instance_id": f"{LLM}:2"}).json() == {
        "instance_id": f"{LLM}:2"
    }
    assert node.loaded_ids() == [LLM, f"{LLM}:3", EMB]


def test_explicit_load_is_not_auto_evicted(make_node: NodeFactory) -> None:
    node = make_node("a,b")
    post(node, "/api/v1/models/load", {"model": "a"})
    post(node, "/v1/chat/completions", {"model": "b", "messages": HELLO})
    assert node.loaded_ids() == ["a", "b"] and node.stats.unloads == 0


def test_load_and_unload_errors(make_node: NodeFactory) -> None:
    node = make_node()
    unknown = post(node, "/api/v1/models/load", {"model": "nope"})
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "model_not_found"
    extra = post(node, "/api/v1/models/load", {"model": LLM, "stream": True})
    assert extra.status_code == 400
    assert extra.json()["error"] == {
        "type": "invalid_request",
        "message": "Unrecognized key(s) in object: 'stream'",
    }
    missing = post(node, "/api/v1/models/unload", {"instance_id": "nope"})
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "model_not_found"


def test_jit_stream_sends_nothing_while_loading(make_node: NodeFactory) -> None:
    node = make_node("a", load_delay=0.3)
    body = {"model": "a", "messages": HELLO, "stream": True}
    started = time.monotonic()
    with httpx.stream("POST", node.url + "/v1/chat/completions", json=body, timeout=10) as response:
        assert time.monotonic() - started >= 0.3  # the status line itself waited for the load
        assert response.read().endswith(b"data: [DONE]\n\n")


def test_model_names_accept_variant_and_instance_ids(make_node: NodeFactory) -> None:
    node = make_node()
    assert chat(node, model=f"{LLM}@q4_k_m").json()["model"] == LLM
    post(node, "/api/v1/models/load", {"model": LLM})
    assert chat(node, model=f"{LLM}:2").json()["model"] == f"{LLM}:2"
    missing = chat(node, model=f"{LLM}:7")
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "model_not_found"


def test_node_restarts_on_the_same_port(make_node: NodeFactory, bg: LoopThread) -> None:
    node = make_node()
    url = node.url
    bg.run(node.stop())
    with pytest.raises(httpx.ConnectError):
        get(node, "/v1/models")
    assert bg.run(node.start(port=int(url.rsplit(":", 1)[1]))) == url
    assert get(node, "/lmstudio-greeting").status_code == 200


# ---- LM Studio: other inference surfaces ---------------------------------------------------------------


def test_v0_chat_adds_stats_model_info_runtime(make_node: NodeFactory) -> None:
    node = make_node()
    body = post(node, "/api/v0/chat/completions", {"model": LLM, "messages": HELLO, "max_tokens": 3}).json()
    assert set(body["stats"]) == {
        "tokens_per_second",
        "time_to_first_token",
        "generation_time",
        "stop_reason",
    }
    assert body["stats"]["stop_reason"] == "maxPredictedTokensReached"
    assert body["model_info"] == {
        "arch": "qwen3",
        "quant": "Q4_K_M",
        "format": "gguf",
        "context_length": 4096,
    }
    assert body["runtime"]["supported_formats"] == ["gguf"]
    natural = post(node, "/api/v0/completions", {"model": LLM, "prompt": "hi"}).json()
    assert natural["stats"]["stop_reason"] == "eosFound"
    embedded = post(node, "/api/v0/embeddings", {"model": EMB, "input": "hi"}).json()
    assert embedded["model_info"]["arch"] == "nomic-bert"


def test_responses_non_stream_and_stateful(make_node: NodeFactory) -> None:
    node = make_node()
    client = lmstudio_client(node)
    first = client.responses.create(model=LLM, input="Tell me a story")
    assert first.id.startswith("resp_") and first.status == "completed"
    assert len(first.output_text.split()) == 12
    assert first.usage is not None and first.usage.input_tokens == 8
    second = client.responses.create(model=LLM, input="Go on", previous_response_id=first.id)
    assert second.usage is not None and second.usage.input_tokens == 8 + (12 + 4) + 6
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=LLM, input="x", previous_response_id="resp_missing")


def test_responses_stream_events(make_node: NodeFactory) -> None:
    node = make_node(completion_tokens=3)
    frames = sse_frames(post(node, "/v1/responses", {"model": LLM, "input": "hi", "stream": True}).text)
    names = [name for name, _ in frames]
    assert names[0] == "response.created" and names[-1] == "response.completed"
    assert names.count("response.output_text.delta") == 3
    assert names.index("response.output_text.done") > names.index("response.output_text.delta")
    assert all(json.loads(data)["type"] == name for name, data in frames)
    with lmstudio_client(node).responses.stream(model=LLM, input="hi") as stream:
        final = stream.get_final_response()
    assert len(final.output_text.split()) == 3


def test_anthropic_messages_non_stream(make_node: NodeFactory) -> None:
    node = make_node()
    client = anthropic.Anthropic(base_url=node.url, api_key="lm-studio", max_retries=0)
    cut = client.messages.create(model=LLM, max_tokens=5, messages=HELLO, system="be kind")
    assert cut.id.startswith("msg_") and cut.type == "message" and cut.role == "assistant"
    assert cut.stop_reason == "max_tokens" and cut.model == LLM
    assert (cut.usage.input_tokens, cut.usage.output_tokens) == (9 + 6, 5)
    full = client.messages.create(model=LLM, max_tokens=1024, messages=HELLO)
    block = full.content[0]
    assert full.stop_reason == "end_turn" and isinstance(block, TextBlock) and len(block.text.split()) == 12


def test_anthropic_messages_stream(make_node: NodeFactory) -> None:
    node = make_node(completion_tokens=4)
    client = anthropic.Anthropic(base_url=node.url, api_key="lm-studio", max_retries=0)
    with client.messages.stream(model=LLM, max_tokens=100, messages=HELLO) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert len(text.split()) == 4 and final.stop_reason == "end_turn" and final.usage.output_tokens == 4
    raw = post(node, "/v1/messages", {"model": LLM, "max_tokens": 2, "messages": HELLO, "stream": True}).text
    names = [name for name, _ in sse_frames(raw)]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


def test_native_chat_non_stream_is_stateful(make_node: NodeFactory) -> None:
    node = make_node()
    first = post(
        node, "/api/v1/chat", {"model": LLM, "input": "Hello there", "system_prompt": "be brief"}
    ).json()
    assert first["model_instance_id"] == LLM and first["response_id"].startswith("resp_")
    assert first["output"][0]["type"] == "message" and len(first["output"][0]["content"].split()) == 12
    assert first["stats"]["input_tokens"] == 6 + 6 and "model_load_time_seconds" not in first["stats"]
    second = post(
        node, "/api/v1/chat", {"model": LLM, "input": "More", "previous_response_id": first["response_id"]}
    )
    assert second.json()["stats"]["input_tokens"] == 12 + 16 + 5
    missing = post(node, "/api/v1/chat", {"model": LLM, "input": "x", "previous_response_id": "resp_nope"})
    assert missing.status_code == 404 and set(missing.json()["error"]) == {"type", "message"}


def test_native_chat_stream_reports_jit_load(make_node: NodeFactory) -> None:
    node = make_node("a", load_delay=0.05, completion_tokens=2)
    frames = sse_frames(post(node, "/api/v1/chat", {"model": "a", "input": "hi", "stream": True}).text)
    names = [name for name, _ in frames]
    assert names == [
        "chat.start",
        "model_load.start",
        "model_load.progress",
        "model_load.progress",
        "model_load.end",
        "prompt_processing.start",
        "prompt_processing.progress",
        "prompt_processing.end",
        "message.start",
        "message.delta",
        "message.delta",
        "message.end",
        "chat.end",
    ]
    result = json.loads(frames[-1][1])["result"]
    assert result["stats"]["model_load_time_seconds"] >= 0.05
    deltas = "".join(json.loads(data)["content"] for name, data in frames if name == "message.delta")
    assert result["output"][0]["content"] == deltas


# ---- concurrency, disconnects, stale connections ------------------------------------------------------


def run_in_threads(count: int, work: Callable[[], Any]) -> list[threading.Thread]:
    threads = [threading.Thread(target=work, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads


def test_parallel_limit_queues_inside_the_node(make_node: NodeFactory) -> None:
    node = make_node([MockModel(LLM, loaded=True, parallel=1)], tps=40, completion_tokens=12)
    threads = run_in_threads(2, lambda: chat(node))
    wait_until(lambda: node.stats.active_generations == 1 and node.stats.queued_generations == 1)
    wait_until(lambda: node.stats.generations_finished == 2)
    for thread in threads:
        thread.join(5)
    assert node.stats.peak_active_generations == 1 and node.stats.generations_started == 2


def test_parallel_slots_allow_concurrency_up_to_the_limit(make_node: NodeFactory) -> None:
    node = make_node([MockModel(LLM, loaded=True, parallel=2)], tps=40, completion_tokens=12)
    run_in_threads(3, lambda: chat(node))
    wait_until(lambda: node.stats.active_generations == 2 and node.stats.queued_generations == 1)
    wait_until(lambda: node.stats.generations_finished == 3)
    assert node.stats.peak_active_generations == 2


def test_disconnect_mid_stream_stops_generation(make_node: NodeFactory) -> None:
    node = make_node(tps=50, completion_tokens=1000)
    body = {"model": LLM, "messages": HELLO, "stream": True}
    with (
        httpx.Client(timeout=10) as client,
        client.stream("POST", node.url + "/v1/chat/completions", json=body) as r,
    ):
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    wait_until(
        lambda: node.stats.generations_cancelled == 1 and node.stats.active_generations == 0, timeout=1.0
    )
    produced = node.stats.tokens_generated
    assert produced < 1000 and node.stats.generations_finished == 0


def test_disconnect_during_non_stream_generation_cancels_it(make_node: NodeFactory) -> None:
    node = make_node(tps=50, completion_tokens=1000)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(node.url + "/v1/chat/completions", json={"model": LLM, "messages": HELLO}, timeout=0.3)
    wait_until(
        lambda: node.stats.generations_cancelled == 1 and node.stats.active_generations == 0, timeout=1.0
    )


def test_close_after_response_drops_the_second_request_on_a_connection(make_node: NodeFactory) -> None:
    node = make_node(close_after_response=True)
    address = urlsplit(node.url)
    conn = http.client.HTTPConnection(address.hostname or "127.0.0.1", address.port, timeout=5)
    conn.request("GET", "/v1/models")
    first = conn.getresponse()
    assert first.status == 200 and (first.getheader("Connection") or "").lower() != "close"
    first.read()
    conn.request("GET", "/v1/models")
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        conn.getresponse()
    conn.close()
    assert node.stats.stale_drops == 1
    with httpx.Client(timeout=5) as client:
        assert client.get(node.url + "/v1/models").status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            client.get(node.url + "/v1/models")
    assert node.stats.stale_drops == 2 and node.stats.requests == 4


# ---- fault injection -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["500", "503", "429"])
def test_fault_http_errors_hit_inference_routes_only(make_node: NodeFactory, kind: str) -> None:
    node = make_node()
    node.set_fault(kind)
    response = chat(node)
    assert response.status_code == int(kind) and response.json()["error"]["message"]
    assert get(node, "/v1/models").status_code == 200
    node.set_fault(None)
    assert chat(node).status_code == 200
    assert node.stats.faults_injected == 1


def test_fault_stall_never_answers_until_the_client_leaves(make_node: NodeFactory, bg: LoopThread) -> None:
    node = make_node()
    node.set_fault("stall")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(node.url + "/v1/chat/completions", json={"model": LLM, "messages": HELLO}, timeout=0.3)
    outcome: list[BaseException] = []

    def stalled() -> None:
        try:
            chat(node)
        except httpx.HTTPError as exc:
            outcome.append(exc)

    (thread,) = run_in_threads(1, stalled)
    wait_until(lambda: node.stats.faults_injected == 2)
    bg.run(node.stop())
    thread.join(10)
    assert not thread.is_alive() and len(outcome) == 1


def test_fault_midstream_aborts_after_some_chunks(make_node: NodeFactory) -> None:
    node = make_node()
    node.set_fault("midstream", after_chunks=2)
    received: list[str] = []
    body = {"model": LLM, "messages": HELLO, "stream": True}
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.stream("POST", node.url + "/v1/chat/completions", json=body, timeout=5) as r,
    ):
        received.extend(line for line in r.iter_lines() if line)
    assert len(received) == 2 and all(line.startswith("data: {") for line in received)
    assert chat(node).status_code == 200  # non-streaming answers are not cut
    wait_until(lambda: node.stats.generations_cancelled == 1)


def test_fault_rate_is_seeded_and_repeatable(make_node: NodeFactory) -> None:
    node = make_node()

    def pattern() -> list[int]:
        node.set_fault("503", rate=0.5)
        return [chat(node, max_tokens=1).status_code for _ in range(16)]

    first = pattern()
    assert 0 < first.count(503) < 16 and set(first) == {200, 503}
    assert pattern() == first


# ---- request log ---------------------------------------------------------------------------------------


def test_received_records_every_request(make_node: NodeFactory) -> None:
    node = make_node()
    get(node, "/v1/models?x=1", headers={"X-Trace": "abc"})
    httpx.post(node.url + "/v1/chat/completions", content=b"{bad", timeout=5)
    models, bad = node.received
    assert (models.method, models.path, models.query, models.headers["x-trace"]) == (
        "GET",
        "/v1/models",
        "x=1",
        "abc",
    )
    assert (bad.body, bad.json) == (b"{bad", None) and bad.time >= models.time
    chat(node)
    assert node.received[-1].json["model"] == LLM and node.stats.requests == 3


# ---- Ollama flavor -----------------------------------------------------------------------------------------

OLLAMA_MODELS = "llama3.2:latest:loaded,nomic-embed-text:latest:embedding"


def test_ollama_plain_routes(make_node: NodeFactory) -> None:
    node = make_node(OLLAMA_MODELS, flavor="ollama")
    root = get(node, "/")
    assert (root.status_code, root.text) == (200, "Ollama is running")
    assert get(node, "/api/version").json() == {"version": "0.12.3"}
    missing = get(node, "/nope")
    assert (missing.status_code, missing.text, missing.headers["content-type"].split(";")[0]) == (
        404,
        "404 page not found",
        "text/plain",
    )
    assert get(node, "/api/chat").status_code == 405
    assert get(node, "/lmstudio-greeting").status_code == 404
    unknown = post(node, "/api/chat", {"model": "nope", "messages": HELLO})
    assert (unknown.status_code, unknown.json()) == (404, {"error": "model 'nope' not found"})


def test_ollama_client_catalogue(make_node: NodeFactory) -> None:
    node = make_node(OLLAMA_MODELS, flavor="ollama")
    client = ollama.Client(host=node.url)
    assert [m.model for m in client.list().models] == ["llama3.2:latest", "nomic-embed-text:latest"]
    (running,) = client.ps().models
    assert running.model == "llama3.2:latest" and running.context_length == 4096
    shown = client.show("llama3.2")
    assert shown.capabilities == ["completion", "tools"]
    assert shown.details is not None and shown.details.family == "llama3"


def test_ollama_client_chat_generate_embed(make_node: NodeFactory) -> None:
    node = make_node(OLLAMA_MODELS, flavor="ollama", completion_tokens=5)
    client = ollama.Client(host=node.url)
    reply = client.chat(model="llama3.2", messages=HELLO, options={"temperature": 0})
    assert reply.done and reply.done_reason == "stop" and reply.eval_count == 5
    assert reply.prompt_eval_count == 9 and len((reply.message.content or "").split()) == 5
    parts = list(client.chat(model="llama3.2", messages=HELLO, options={"temperature": 0}, stream=True))
    assert "".join(p.message.content or "" for p in parts) == reply.message.content and parts[-1].done
    generated = client.generate(model="llama3.2:latest", prompt="hi", options={"num_predict": 2})
    assert generated.done_reason == "length" and len(generated.response.split()) == 2
    vectors = client.embed(model="nomic-embed-text", input=["a", "b"]).embeddings
    assert len(vectors) == 2 and len(vectors[0]) == 16
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="nope", messages=HELLO)
    assert caught.value.status_code == 404


def test_ollama_ndjson_stream_and_tools(make_node: NodeFactory) -> None:
    node = make_node(OLLAMA_MODELS, flavor="ollama", completion_tokens=3)
    response = post(node, "/api/chat", {"model": "llama3.2", "messages": HELLO})
    assert response.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert [line["done"] for line in lines] == [False, False, False, True]
    final = lines[-1]
    assert final["eval_count"] == 3 and final["total_duration"] > 0 and "load_duration" not in final
    tool_reply = ollama.Client(host=node.url).chat(
        model="llama3.2", messages=WEATHER_ASK, tools=WEATHER_TOOLS
    )
    assert tool_reply.message.tool_calls
    call = tool_reply.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}


def test_ollama_loads_on_request_and_unloads_with_keep_alive_zero(make_node: NodeFactory) -> None:
    node = make_node("llama3.2:latest,qwen3:latest", flavor="ollama", load_delay=0.05)
    loaded = post(node, "/api/generate", {"model": "llama3.2"}).json()
    assert (loaded["done"], loaded["done_reason"]) == (True, "load")
    post(node, "/api/generate", {"model": "qwen3", "prompt": "hi", "stream": False})
    assert node.loaded_ids() == ["llama3.2:latest", "qwen3:latest"]  # no auto-evict in Ollama
    unloaded = post(node, "/api/generate", {"model": "llama3.2", "keep_alive": 0}).json()
    assert unloaded["done_reason"] == "unload" and node.loaded_ids() == ["qwen3:latest"]


def test_ollama_openai_surface(make_node: NodeFactory) -> None:
    node = make_node(OLLAMA_MODELS, flavor="ollama")
    client = openai.OpenAI(base_url=node.url + "/v1", api_key="ollama", max_retries=0)
    models = client.models.list().data
    assert [m.owned_by for m in models] == ["library", "library"] and models[0].created > 0
    completion = client.chat.completions.create(model="llama3.2:latest", messages=HELLO)
    assert completion.system_fingerprint == "fp_ollama"
    chunks = sse_json(
        post(node, "/v1/chat/completions", {"model": "llama3.2", "messages": HELLO, "stream": True}).text
    )
    assert all(c["system_fingerprint"] == "fp_ollama" for c in chunks)
    missing = post(node, "/v1/chat/completions", {"model": "nope", "messages": HELLO})
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert client.embeddings.create(model="nomic-embed-text", input="x").data[0].embedding


# ---- generic OpenAI server flavor --------------------------------------------------------------------------


def test_openai_flavor_routes(make_node: NodeFactory) -> None:
    node = make_node("model.gguf", flavor="openai")
    assert get(node, "/health").json() == {"status": "ok"}
    assert get(node, "/v1/models").json()["data"][0]["owned_by"] == "llamacpp"
    not_found = {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}}
    for path in ("/lmstudio-greeting", "/api/v0/models", "/nope"):
        response = get(node, path)
        assert (response.status_code, response.json()) == (404, not_found)
    assert node.loaded_ids() == ["model.gguf"]


def test_openai_flavor_with_the_openai_client(make_node: NodeFactory) -> None:
    node = make_node("model.gguf,embed.gguf:embedding", flavor="openai", completion_tokens=4)
    client = openai.OpenAI(base_url=node.url + "/v1", api_key="none", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["model.gguf", "embed.gguf"]
    whole = client.chat.completions.create(model="model.gguf", messages=HELLO, temperature=0)
    assert "stats" not in whole.model_dump() or whole.model_dump().get("stats") is None
    stream = client.chat.completions.create(
        model="model.gguf", messages=HELLO, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == whole.choices[0].message.content
    )
    assert len(client.embeddings.create(model="embed.gguf", input="x").data[0].embedding) == 16
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=HELLO)
