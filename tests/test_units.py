"""Unit tests: settings precedence, node specs, model naming, tiers, secret masking, router scoring."""

from __future__ import annotations

from pathlib import Path

import pytest

import vampire
from vampire import ModelInfo, Node, Registry, Router, Settings, Target


def test_settings_precedence_toml_then_env_then_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "vampire.toml"
    cfg.write_text('port = 8000\nshare = "lan"\nrefresh_s = 3\n[[nodes]]\nurl = "http://10.0.0.5:1234"\ntoken = "t0k"\n')
    s = Settings.load(cfg, env={"VAMPIRE_PORT": "9000", "VAMPIRE_DATA_DIR": str(tmp_path / "d")})
    assert (s.port, s.share, s.refresh_s, s.data_dir) == (9000, "lan", 3.0, tmp_path / "d")
    assert s.nodes == ["http://10.0.0.5:1234#t0k"]
    s = Settings.load(cfg, env={"VAMPIRE_PORT": "9000"}, port=9100, nodes=["http://127.0.0.1:1"])
    assert s.port == 9100 and s.nodes == ["http://127.0.0.1:1"]


def test_settings_env_lists_and_legacy_base_url(tmp_path: Path) -> None:
    env = {"VAMPIRE_NODES": "a:1, b:2", "VAMPIRE_LMSTUDIO_BASE_URL": "http://c:1234/v1",
           "VAMPIRE_TRUSTED_NETWORKS": "127.0.0.0/8,10.0.0.0/8"}
    s = Settings.load(tmp_path / "absent.toml", env=env)
    assert s.nodes == ["a:1", "b:2", "http://c:1234/v1"]
    assert s.trusted_networks == ["127.0.0.0/8", "10.0.0.0/8"]


@pytest.mark.parametrize(("env", "message"), [
    ({"VAMPIRE_SHARE": "everyone"}, "share must be one of"),
    ({"VAMPIRE_PORT": "http"}, "cannot use"),
    ({"VAMPIRE_TRUSTED_NETWORKS": "10.0.0.300/8"}, "trusted_networks"),
])
def test_bad_settings_are_refused_clearly(tmp_path: Path, env: dict[str, str], message: str) -> None:
    with pytest.raises(vampire.ConfigError, match=message):
        Settings.load(tmp_path / "absent.toml", env=env)


def test_unknown_toml_key_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "v.toml"
    cfg.write_text("prot = 1\n")
    with pytest.raises(vampire.ConfigError, match="unknown setting 'prot'"):
        Settings.load(cfg, env={})


@pytest.mark.parametrize(("spec", "url", "token"), [
    ("http://gpu:1234#sk-lm-1", "http://gpu:1234", "sk-lm-1"),
    ("gpu:1234", "http://gpu:1234", None),
    ("http://gpu:1234/v1/", "http://gpu:1234", None),
    ("https://box", "https://box:443", None),
    ("http://[::1]:1234", "http://[::1]:1234", None),
])
def test_node_specs(spec: str, url: str, token: str | None) -> None:
    assert vampire.split_node_spec(spec) == (url, token)


def test_bad_node_spec() -> None:
    with pytest.raises(vampire.ConfigError):
        vampire.split_node_spec("ftp://x")


@pytest.mark.parametrize(("model_id", "key"), [
    ("qwen/qwen3-4b", "qwen/qwen3-4b"), ("qwen/qwen3-4b:2", "qwen/qwen3-4b"),
    ("google/gemma@q4_k_m", "google/gemma"), ("llama3.2:latest", "llama3.2:latest"),
])
def test_model_key_strips_instance_and_variant(model_id: str, key: str) -> None:
    assert vampire.model_key(model_id) == key


@pytest.mark.parametrize(("token", "tier"), [
    (None, 100), ("sk-lm-abc:def", 100), ("vampire", 100), ("vampire50", 50), ("vampire25:s3cret", 25),
    ("vampire0", 1), ("vampire250", 100),
])
def test_tiers(token: str | None, tier: int) -> None:
    assert vampire.parse_tier(token) == tier


def test_secrets_are_masked() -> None:
    assert vampire.mask_secret("sk-lm-abcd1234:ZyXwVuTsRqPoNmLkJiHg") == "sk-…iHg"
    assert vampire.mask_secret("short") == "…"
    assert vampire.mask_secret(None) is None


def test_lmstudio_v1_model_normalized() -> None:
    raw = {"type": "llm", "key": "google/gemma-4", "quantization": {"name": "Q4_K_M", "bits_per_weight": 4},
           "size_bytes": 10, "max_context_length": 262144, "format": "gguf",
           "loaded_instances": [{"id": "google/gemma-4", "config": {"context_length": 4096, "parallel": 6}},
                                {"id": "google/gemma-4:2", "config": {"context_length": 8192, "parallel": 4}}],
           "capabilities": {"vision": True, "trained_for_tool_use": True, "reasoning": {"allowed_options": ["on"]}}}
    models = vampire._expand_instances([vampire._model_from_lmstudio_v1(raw)])
    first = models[0]
    assert (first.id, first.type, first.loaded, first.context_length, first.slots) == ("google/gemma-4", "vlm", True, 4096, 6)
    assert first.capabilities == ["vision", "tools", "reasoning"] and first.quantization == "Q4_K_M"
    assert [m.id for m in models] == ["google/gemma-4", "google/gemma-4:2"]
    emb = vampire._model_from_lmstudio_v1({"type": "embedding", "key": "e", "loaded_instances": [], "max_context_length": 2048})
    assert (emb.type, emb.loaded, emb.slots, emb.capabilities) == ("embedding", False, 4, [])


def test_lmstudio_v0_model_normalized() -> None:
    m = vampire._model_from_lmstudio_v0({"id": "g", "type": "vlm", "state": "loaded", "loaded_context_length": 12918,
                                         "max_context_length": 131072, "capabilities": ["tool_use"],
                                         "compatibility_type": "gguf", "quantization": "Q4_K_M"})
    assert (m.type, m.loaded, m.context_length, m.capabilities) == ("vlm", True, 12918, ["vision", "tools"])
    e = vampire._model_from_lmstudio_v0({"id": "e", "type": "embeddings", "state": "not-loaded"})
    assert (e.type, e.loaded, e.context_length) == ("embedding", False, None)


def _router(tmp_path: Path, nodes: list[Node]) -> Router:
    settings = Settings.load(tmp_path / "none.toml", env={}, data_dir=tmp_path)
    registry = Registry(settings, vampire.Store(settings.db_path), vampire.EventBus())
    for node in nodes:
        registry.nodes[node.id] = node
    return Router(registry)


def _node(node_id: str, *models: ModelInfo, in_flight: int = 0, latency: float | None = None, **kw: object) -> Node:
    node = Node(id=node_id, url=f"http://{node_id}:1", name=node_id, trusted=True, health="online",
                models=list(models), in_flight=in_flight, latency_ms=latency)
    for key, value in kw.items():
        setattr(node, key, value)
    return node


def test_score_prefers_loaded_then_free_slots_then_latency(tmp_path: Path) -> None:
    cold = _node("cold", ModelInfo("m", loaded=False), latency=1)
    busy = _node("busy", ModelInfo("m", loaded=True), in_flight=3, latency=1)
    slow = _node("slow", ModelInfo("m", loaded=True), in_flight=1, latency=50)
    fast = _node("fast", ModelInfo("m", loaded=True), in_flight=1, latency=5)
    router = _router(tmp_path, [cold, busy, slow, fast])
    assert [t.node.id for t in router.resolve("m", "chat")] == ["fast", "slow", "busy", "cold"]


def test_tier_shrinks_capacity_in_the_score() -> None:
    half = _node("half", ModelInfo("m", loaded=True, slots=4), in_flight=1, token="vampire50")
    full = _node("full", ModelInfo("m", loaded=True, slots=4), in_flight=1)
    assert vampire._score(Target(full, full.models[0])) < vampire._score(Target(half, half.models[0]))


def test_untrusted_draining_offline_unauthorized_nodes_get_no_traffic(tmp_path: Path) -> None:
    nodes = [
        _node("untrusted", ModelInfo("m", loaded=True), trusted=False),
        _node("draining", ModelInfo("m", loaded=True), admin_state="draining"),
        _node("disabled", ModelInfo("m", loaded=True), admin_state="disabled"),
        _node("offline", ModelInfo("m", loaded=True), health="offline"),
        _node("unauthorized", ModelInfo("m", loaded=True), health="unauthorized"),
        _node("ok", ModelInfo("m", loaded=False)),
    ]
    assert [t.node.id for t in _router(tmp_path, nodes).resolve("m", "chat")] == ["ok"]


def test_key_fallback_pins_and_capabilities(tmp_path: Path) -> None:
    a = _node("a", ModelInfo("qwen/q:2", loaded=True), ModelInfo("emb", type="embedding", loaded=True))
    b = _node("b", ModelInfo("qwen/q", loaded=True))
    router = _router(tmp_path, [a, b])
    assert [t.node.id for t in router.resolve("qwen/q@q4_k_m", "chat")] == ["a", "b"]
    assert [(t.node.id, t.upstream_model) for t in router.resolve("qwen/q@a", "chat")] == [("a", "qwen/q:2")]
    with pytest.raises(vampire.HTTPError) as info:
        router.resolve("emb", "chat")
    assert info.value.status == 400 and info.value.code == "unsupported_capability"
    with pytest.raises(vampire.HTTPError) as info:
        router.resolve("nope", "chat")
    assert info.value.status == 404 and "vampire:auto, emb, qwen/q, qwen/q:2" in info.value.message


def test_auto_chooses_only_loaded_chat_models(tmp_path: Path) -> None:
    a = _node("a", ModelInfo("cold", loaded=False), ModelInfo("emb", type="embedding", loaded=True))
    b = _node("b", ModelInfo("hot", loaded=True))
    assert [t.upstream_model for t in _router(tmp_path, [a, b]).resolve("vampire:auto", "chat")] == ["hot"]


def test_store_file_is_private(tmp_path: Path) -> None:
    store = vampire.Store(tmp_path / "d" / "vampire.db")
    assert (tmp_path / "d" / "vampire.db").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o700
    store.close()
