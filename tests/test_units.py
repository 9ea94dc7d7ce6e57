"""Unit tests: settings precedence, node specs, model naming, tiers, secret masking, router scoring."""

from __future__ import annotations

from pathlib import Path

import pytest

import vampire
from vampire import ModelInfo, Node, Registry, Router, Settings, Target


def test_settings_precedence_toml_then_env_then_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "vampire.toml"
    cfg.write_text(
        'port = 8000\nshare = "lan"\nrefresh_s = 3\n[[nodes]]\nurl = "http://10.0.0.5:1234"\ntoken = "t0k"\n'
    )
    s = Settings.load(cfg, env={"VAMPIRE_PORT": "9000", "VAMPIRE_DATA_DIR": str(tmp_path / "d")})
    assert (s.port, s.share, s.refresh_s, s.data_dir) == (9000, "lan", 3.0, tmp_path / "d")
    assert s.nodes == ["http://10.0.0.5:1234#t0k"]
    s = Settings.load(cfg, env={"VAMPIRE_PORT": "9000"}, port=9100, nodes=["http://127.0.0.1:1"])
    assert s.port == 9100 and s.nodes == ["http://127.0.0.1:1"]


def test_settings_env_lists_and_legacy_base_url(tmp_path: Path) -> None:
    env = {
        "VAMPIRE_NODES": "a:1, b:2",
        "VAMPIRE_LMSTUDIO_BASE_URL": "http://c:1234/v1",
        "VAMPIRE_TRUSTED_NETWORKS": "127.0.0.0/8,10.0.0.0/8",
    }
    s = Settings.load(tmp_path / "absent.toml", env=env)
    assert s.nodes == ["a:1", "b:2", "http://c:1234/v1"]
    assert s.trusted_networks == ["127.0.0.0/8", "10.0.0.0/8"]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"VAMPIRE_SHARE": "everyone"}, "share must be one of"),
        ({"VAMPIRE_PORT": "http"}, "cannot use"),
        ({"VAMPIRE_TRUSTED_NETWORKS": "10.0.0.300/8"}, "trusted_networks"),
    ],
)
def test_bad_settings_are_refused_clearly(tmp_path: Path, env: dict[str, str], message: str) -> None:
    with pytest.raises(vampire.ConfigError, match=message):
        Settings.load(tmp_path / "absent.toml", env=env)


def test_unknown_toml_key_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "v.toml"
    cfg.write_text("prot = 1\n")
    with pytest.raises(vampire.ConfigError, match="unknown setting 'prot'"):
        Settings.load(cfg, env={})


@pytest.mark.parametrize(
    ("spec", "url", "token"),
    [
        ("http://gpu:1234#sk-lm-1", "http://gpu:1234", "sk-lm-1"),
        ("gpu:1234", "http://gpu:1234", None),
        ("http://gpu:1234/v1/", "http://gpu:1234", None),
        ("https://box", "https://box:443", None),
        ("http://[::1]:1234", "http://[::1]:1234", None),
    ],
)
def test_node_specs(spec: str, url: str, token: str | None) -> None:
    assert vampire.split_node_spec(spec) == (url, token)


def test_bad_node_spec() -> None:
    with pytest.raises(vampire.ConfigError):
        vampire.split_node_spec("ftp://x")


@pytest.mark.parametrize(
    ("model_id", "key"),
    [
        ("qwen/qwen3-4b", "qwen/qwen3-4b"),
        ("qwen/qwen3-4b:2", "qwen/qwen3-4b"),
        ("google/gemma@q4_k_m", "google/gemma"),
        ("llama3.2:latest", "llama3.2:latest"),
    ],
)
def test_model_key_strips_instance_and_variant(model_id: str, key: str) -> None:
    assert vampire.model_key(model_id) == key


@pytest.mark.parametrize(
    ("token", "tier"),
    [
        (None, 100),
        ("sk-lm-abc:def", 100),
        ("vampire", 100),
        ("vampire50", 50),
        ("vampire25:s3cret", 25),
        ("vampire0", 1),
        ("vampire250", 100),
    ],
)
def test_tiers(token: str | None, tier: int) -> None:
    assert vampire.parse_tier(token) == tier


def test_secrets_are_masked() -> None:
    assert vampire.mask_secret("sk-lm-abcd1234:ZyXwVuTsRqPoNmLkJiHg") == "sk-…iHg"
    assert vampire.mask_secret("short") == "…"
    assert vampire.mask_secret(None) is None


def test_lmstudio_v1_model_normalized() -> None:
    raw = {
        "type": "llm",
        "key": "google/gemma-4",
        "quantization": {"name": "Q4_K_M", "bits_per_weight": 4},
        "size_bytes": 10,
        "max_context_length": 262144,
        "format": "gguf",
        "loaded_instances": [
            {"id": "google/gemma-4", "config": {"context_length": 4096, "parallel": 6}},
            {"id": "google/gemma-4:2", "config": {"context_length": 8192, "parallel": 4}},
        ],
        "capabilities": {
            "vision": True,
            "trained_for_tool_use": True,
            "reasoning": {"allowed_options": ["on"]},
        },
    }
    models = vampire._expand_instances([vampire._model_from_lmstudio_v1(raw)])
    first = models[0]
    assert (first.id, first.type, first.loaded, first.context_length, first.slots) == (
        "google/gemma-4",
        "vlm",
        True,
        4096,
        6,
    )
    assert first.capabilities == ["vision", "tools", "reasoning"] and first.quantization == "Q4_K_M"
    assert [m.id for m in models] == ["google/gemma-4", "google/gemma-4:2"]
    emb = vampire._model_from_lmstudio_v1(
        {"type": "embedding", "key": "e", "loaded_instances": [], "max_context_length": 2048}
    )
    assert (emb.type, emb.loaded, emb.slots, emb.capabilities) == ("embedding", False, 4, [])


def test_lmstudio_v0_model_normalized() -> None:
    m = vampire._model_from_lmstudio_v0(
        {
            "id": "g",
            "type": "vlm",
            "state": "loaded",
            "loaded_context_length": 12918,
            "max_context_length": 131072,
            "capabilities": ["tool_use"],
            "compatibility_type": "gguf",
            "quantization": "Q4_K_M",
        }
    )
    assert (m.type, m.loaded, m.context_length, m.capabilities) == ("vlm", True, 12918, ["vision", "tools"])
    e = vampire._model_from_lmstudio_v0({"id": "e", "type": "embeddings", "state": "not-loaded"})
    assert (e.type, e.loaded, e.context_length) == ("embedding", False, None)


CHAT = vampire.Needs("chat")


def _router(tmp_path: Path, nodes: list[Node]) -> Router:
    settings = Settings.load(tmp_path / "none.toml", env={}, data_dir=tmp_path)
    store = vampire.Store(settings.db_path)
    registry = Registry(settings, store, vampire.EventBus(), vampire.NodeClients(settings))
    for node in nodes:
        registry.nodes[node.id] = node
    return Router(registry, store)


def _node(
    node_id: str, *models: ModelInfo, in_flight: int = 0, latency: float | None = None, **kw: object
) -> Node:
    node = Node(
        id=node_id,
        url=f"http://{node_id}:1",
        name=node_id,
        trusted=True,
        health="online",
        models=list(models),
        in_flight=in_flight,
        latency_ms=latency,
    )
    node.busy = {m.id: in_flight for m in models}
    for key, value in kw.items():
        setattr(node, key, value)
    return node


def test_score_prefers_loaded_then_free_slots_then_latency(tmp_path: Path) -> None:
    cold = _node("cold", ModelInfo("m", loaded=False), latency=1)
    busy = _node("busy", ModelInfo("m", loaded=True), in_flight=3, latency=1)
    slow = _node("slow", ModelInfo("m", loaded=True), in_flight=1, latency=50)
    fast = _node("fast", ModelInfo("m", loaded=True), in_flight=1, latency=5)
    router = _router(tmp_path, [cold, busy, slow, fast])
    assert [t.node.id for t in router.plan("m", CHAT).targets] == ["fast", "slow", "busy", "cold"]


def test_tier_shrinks_capacity_in_the_score() -> None:
    half = _node("half", ModelInfo("m", loaded=True, slots=4), in_flight=1, token="vampire50")
    full = _node("full", ModelInfo("m", loaded=True, slots=4), in_flight=1)
    assert vampire.score(Target(full, full.models[0])) < vampire.score(Target(half, half.models[0]))
    assert Target(half, half.models[0]).capacity == 2


def test_untrusted_draining_offline_unauthorized_nodes_get_no_traffic(tmp_path: Path) -> None:
    nodes = [
        _node("untrusted", ModelInfo("m", loaded=True), trusted=False),
        _node("draining", ModelInfo("m", loaded=True), admin_state="draining"),
        _node("disabled", ModelInfo("m", loaded=True), admin_state="disabled"),
        _node("offline", ModelInfo("m", loaded=True), health="offline"),
        _node("unauthorized", ModelInfo("m", loaded=True), health="unauthorized"),
        _node("ok", ModelInfo("m", loaded=False)),
    ]
    assert [t.node.id for t in _router(tmp_path, nodes).plan("m", CHAT).targets] == ["ok"]


def test_key_fallback_pins_and_capabilities(tmp_path: Path) -> None:
    a = _node("a", ModelInfo("qwen/q:2", loaded=True), ModelInfo("emb", type="embedding", loaded=True))
    b = _node("b", ModelInfo("qwen/q", loaded=True))
    router = _router(tmp_path, [a, b])
    assert [t.node.id for t in router.plan("qwen/q@q4_k_m", CHAT).targets] == ["a", "b"]
    assert [(t.node.id, t.upstream_model) for t in router.plan("qwen/q@a", CHAT).targets] == [
        ("a", "qwen/q:2")
    ]
    with pytest.raises(vampire.HTTPError) as info:
        router.plan("emb", CHAT)
    assert info.value.status == 400 and info.value.code == "unsupported_capability"
    with pytest.raises(vampire.HTTPError) as info:
        router.plan("nope", CHAT)
    assert info.value.status == 404 and "vampire:auto, emb, qwen/q, qwen/q:2" in info.value.message


def test_auto_chooses_only_loaded_chat_models(tmp_path: Path) -> None:
    a = _node("a", ModelInfo("cold", loaded=False), ModelInfo("emb", type="embedding", loaded=True))
    b = _node("b", ModelInfo("hot", loaded=True))
    assert [t.upstream_model for t in _router(tmp_path, [a, b]).plan("vampire:auto", CHAT).targets] == ["hot"]


def test_store_file_is_private(tmp_path: Path) -> None:
    store = vampire.Store(tmp_path / "d" / "vampire.db")
    assert (tmp_path / "d" / "vampire.db").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o700
    store.close()


def test_cold_load_prefers_a_node_where_it_evicts_nothing(tmp_path: Path) -> None:
    busy_gpu = _node("busy", ModelInfo("other", loaded=True), ModelInfo("m", loaded=False), latency=1)
    idle_gpu = _node("idle", ModelInfo("m", loaded=False), latency=9)
    assert [t.node.id for t in _router(tmp_path, [busy_gpu, idle_gpu]).plan("m", CHAT).targets] == [
        "idle",
        "busy",
    ]


@pytest.mark.parametrize(
    ("strategy", "order"),
    [
        ("least_busy", ["b", "a"]),
        ("least_latency", ["a", "b"]),
        ("auto", ["b", "a"]),
    ],
)
def test_strategy_orderings(tmp_path: Path, strategy: str, order: list[str]) -> None:
    a = _node("a", ModelInfo("m", loaded=True), in_flight=3, latency=1)
    a.busy["m"] = 3
    b = _node("b", ModelInfo("m", loaded=True), latency=20)
    assert [t.node.id for t in _router(tmp_path, [a, b]).plan("m", CHAT, strategy).targets] == order


def test_round_robin_rotates(tmp_path: Path) -> None:
    router = _router(tmp_path, [_node(n, ModelInfo("m", loaded=True)) for n in "abc"])
    firsts = [router.plan("m", CHAT, "round_robin").targets[0].node.id for _ in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]


def test_needs_detect_images_tools_and_length() -> None:
    body = {
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:x"}}]}],
        "tools": [{"type": "function"}],
    }
    raw = b'{"messages": [{"content": [{"type": "image_url"}]}]}' + b" " * 400
    needs = vampire.needs_of("chat", body, raw)
    assert (needs.vision, needs.tools, needs.prompt_tokens) == (True, True, len(raw) // 4)
    plain = vampire.needs_of(
        "chat", {"messages": [{"role": "user", "content": "an image of text"}]}, b"image"
    )
    assert plain.vision is False


def test_circuit_opens_half_opens_and_closes() -> None:
    c = vampire.Circuit()
    for _ in range(vampire.Circuit.THRESHOLD):
        assert c.allows(0.0)
        c.failure(0.0)
    assert c.state == "open" and not c.allows(0.5)
    assert c.allows(1.0) and c.state == "half_open"
    c.begin()
    assert not c.allows(1.0)  # one trial at a time
    c.failure(1.0)
    assert c.state == "open" and c.open_until == 3.0  # the cool-down doubles
    assert c.allows(3.0)
    c.begin()
    c.success()
    assert c.state == "closed" and c.allows(3.0)


def test_conversation_key_ignores_later_turns() -> None:
    first = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    later = [*first, {"role": "assistant", "content": "a"}, {"role": "user", "content": "u2"}]
    assert vampire.conversation_key("m", {"messages": first}) == vampire.conversation_key(
        "m", {"messages": later}
    )
    assert vampire.conversation_key("m", {"messages": first}) != vampire.conversation_key(
        "n", {"messages": first}
    )
    assert vampire.conversation_key("m", {"input": "x"}) is None
