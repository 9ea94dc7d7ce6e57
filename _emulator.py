"""Deterministic emulator of an LM Studio node, with Ollama and generic OpenAI-server (llama-server) flavors.

It follows reference/lmstudio-api.md and reference/ollama-api.md closely enough that the gateway can be
tested, demoed and benchmarked without a GPU: same routes, same body shapes, same odd status codes (LM Studio
answers unknown routes with HTTP 200), JIT loading with auto-evict, per-instance parallel slots, auth tokens,
and fault injection for failover tests. Standard library and aiohttp only, and no module-level mutable state,
so the section can live inside the single-file product.

Token accounting rule (documented because tests and usage figures depend on it): one generated word is one
token; prompt tokens are the whitespace-separated words of every message's text plus 4 per message (raw
`prompt` strings count words only).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import random
import re
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

from aiohttp import web

_MOCK_FLAVORS = ("lmstudio", "ollama", "openai")
_MOCK_TYPES = ("llm", "vlm", "embedding")
_MOCK_SPEC_TYPES = {"llm": "llm", "vlm": "vlm", "embedding": "embedding", "embeddings": "embedding"}
_MOCK_FAULTS = ("500", "503", "429", "stall", "midstream")
_MOCK_TOKEN_RE = re.compile(r"sk-lm-[A-Za-z0-9]{8}:[A-Za-z0-9]{20}")
_MOCK_LOAD_KEYS = frozenset(
    {
        "model",
        "context_length",
        "eval_batch_size",
        "flash_attention",
        "num_experts",
        "offload_kv_cache_to_gpu",
        "echo_load_config",
    }
)
_MOCK_OLLAMA_VERSION = "0.12.3"
_MOCK_LLAMA_FINGERPRINT = "b6000-mock"
_MOCK_EMBED_DIM = 16
_MOCK_TOKENS_PER_MESSAGE = 4
_MOCK_STORED_RESPONSES = 1000
_MOCK_DISCONNECT_GRACE = 5.0
_MOCK_WEATHER_RE = re.compile(r"\bweather\b", re.IGNORECASE)
_MOCK_AUTH_MISSING = (
    "An LM Studio API token is required to make requests to this server, but none was provided using the "
    "Authorization header using the 'Bearer' scheme. Create a token in the Server Settings of LM Studio and "
    "send it as 'Authorization: Bearer <token>'."
)
_MOCK_NO_MODELS = "No models loaded. Please load a model in the developer page or use the 'lms load' command."
_MOCK_FAULT_MESSAGES = {
    "500": "Internal server error while generating a response.",
    "503": "Server busy: too many pending predictions, please try again.",
    "429": "Too many requests: slow down and try again.",
}
_MOCK_OLLAMA_FAULT_MESSAGES = {
    "500": "an error was encountered while running the model",
    "503": "server busy, please try again.  maximum pending requests exceeded",
    "429": "too many requests",
}
_MOCK_STOP_REASONS = {"stop": "eosFound", "length": "maxPredictedTokensReached", "tool_calls": "toolCalls"}
# The vocabulary of generated text: plain words, one token each.
_MOCK_WORD_TEXT = """
    about above across after again air along always animal answer apple area autumn away back ball bank
    basket beach bear beautiful bed before begin behind bell below best between bird black blue boat body
    book bottle bread bridge bright brother brown build busy butter cake call calm camera candle car card
    care carry castle cat chair chalk change cheese child circle city clean clear clock close cloud coast
    coffee cold color come cook cool copper corner cotton country course cover cow cream cup dance dark day
    deep desk dinner door down dream dress drink dry duck early earth east easy egg end evening every eye
    face fair fall family farm fast feather field fire fish flag floor flower fly fog follow food forest fox
    free fresh friend fruit full game gate gentle gift glass gold good grass green ground grow guitar hair
    half hand happy harbor hat heart heavy hill home honey horse hour house idea island jacket journey jump
    key kind kitchen kite lake lamp land large late laugh leaf learn left letter light lion little long low
    lucky map market meadow metal milk mirror moon morning mountain music name near nest new night noon
    north nose ocean office old open orange paper park path pencil people pepper piano picture pillow plain
    plant plate pocket pond quiet rabbit rain read red rest rice ring road rock roof room rope round salt
    sand school sea season seed shadow sheep shell ship shirt shoe short silver simple sing sister sky sleep
    slow small smile snow soft song soup south spring square stair star station steady story street strong
    sugar summer sun sweet table tall tea teacher thread ticket tiger time today train travel tree true turn
    umbrella under valley village violin voice wall warm watch water wave west wheel white wide wind window
    winter wise wood word world yellow young zebra
"""


# --------------------------------------------------------------------------------------------------------
# Public data types


@dataclass
class MockModel:
    """One downloaded model of an emulated node; `loaded` models start resident as if loaded by hand."""

    id: str
    type: str = "llm"
    loaded: bool = False
    context_length: int = 4096
    max_context_length: int = 32768
    parallel: int = 4
    vision: bool = False
    tools: bool = True
    reasoning: bool = False
    quantization: str = "Q4_K_M"
    format: str = "gguf"
    size_bytes: int = 2_500_000_000
    publisher: str = ""
    arch: str = ""

    def __post_init__(self) -> None:
        _mock_validate_model(self)
        if self.type == "vlm":
            self.vision = True
        if self.type == "embedding":
            self.tools = False
        if not self.publisher:
            self.publisher = self.id.split("/", 1)[0] if "/" in self.id else "lmstudio-community"
        if not self.arch:
            self.arch = _mock_guess_arch(self.id, self.type)

    @property
    def is_embedding(self) -> bool:
        return self.type == "embedding"


@dataclass
class Received:
    """One request as the node saw it (headers keyed in lower case, `time` from time.monotonic())."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    json: Any | None
    time: float


@dataclass
class NodeStats:
    """Counters a test can poll. `tokens_generated` counts every produced token (cancelled ones too);
    `completion_tokens_total` only those of finished generations."""

    requests: int = 0
    generations_started: int = 0
    generations_finished: int = 0
    generations_cancelled: int = 0
    active_generations: int = 0
    peak_active_generations: int = 0
    queued_generations: int = 0
    loads: int = 0
    unloads: int = 0
    tokens_generated: int = 0
    prompt_tokens_total: int = 0
    completion_tokens_total: int = 0
    stale_drops: int = 0
    faults_injected: int = 0
    load_log: list[str] = field(default_factory=list)


def parse_model_specs(spec: str) -> list[MockModel]:
    """Parse the CLI list `id[:type][:loaded],…`; trailing `llm|vlm|embedding|loaded` segments are flags,
    every other segment belongs to the id (so `qwen/qwen3-4b:2` and `llama3.2:latest` stay whole)."""
    if not spec.strip():
        raise ValueError("no models given: expected 'id[:type][:loaded],id2…'")
    models = [_mock_parse_model_spec(entry.strip()) for entry in spec.split(",")]
    seen: set[str] = set()
    for model in models:
        if model.id in seen:
            raise ValueError(f"model {model.id!r} is listed twice")
        seen.add(model.id)
    return models


def _mock_parse_model_spec(entry: str) -> MockModel:
    if not entry:
        raise ValueError("empty model entry in the model list (look for a stray comma)")
    parts = entry.split(":")
    kind: str | None = None
    loaded = False
    while len(parts) > 1 and (parts[-1].lower() in _MOCK_SPEC_TYPES or parts[-1].lower() == "loaded"):
        flag = parts.pop().lower()
        if flag == "loaded" and not loaded:
            loaded = True
        elif flag != "loaded" and kind is None:
            kind = _MOCK_SPEC_TYPES[flag]
        else:
            raise ValueError(f"model entry {entry!r} repeats the flag or type {flag!r}")
    if "" in parts:
        raise ValueError(f"model entry {entry!r} has an empty ':'-separated segment")
    return MockModel(id=":".join(parts), type=kind or "llm", loaded=loaded)


def _mock_validate_model(model: MockModel) -> None:
    if not model.id or any(ch.isspace() for ch in model.id):
        raise ValueError(f"invalid model id {model.id!r}: it must be non-empty and contain no spaces")
    if model.type not in _MOCK_TYPES:
        raise ValueError(
            f"model {model.id!r}: type must be one of {', '.join(_MOCK_TYPES)}, not {model.type!r}"
        )
    if model.parallel < 1 or model.context_length < 1 or model.max_context_length < 1:
        raise ValueError(f"model {model.id!r}: parallel and context lengths must be positive")


# --------------------------------------------------------------------------------------------------------
# Model-derived catalogue fields


def _mock_model_name(model_id: str) -> str:
    return model_id.split("/")[-1]


def _mock_guess_arch(model_id: str, kind: str) -> str:
    name = _mock_model_name(model_id).lower()
    if kind == "embedding":
        return "nomic-bert" if "nomic" in name else "bert"
    # The family is usually the first dash-separated part of the name, e.g. "qwen3" in "qwen3-4b".
    return re.split(r"[-_:.]", name)[0] or "llama"


def _mock_params_string(model: MockModel) -> str | None:
    match = re.search(
        r"(?:^|[-_])(\d+(?:\.\d+)?[bm])(?:-(a\d+(?:\.\d+)?[bm]))?(?=$|[-_:@])", model.id.lower()
    )
    if match is None:
        return None
    return "-".join(part.upper() for part in match.groups() if part)


def _mock_display_name(model: MockModel) -> str:
    words = re.split(r"[-_]", _mock_model_name(model.id).split(":")[0])
    return " ".join(
        w.upper() if re.fullmatch(r"\d+(\.\d+)?[bm]", w) else w[:1].upper() + w[1:] for w in words
    )


def _mock_bits(quantization: str) -> int | None:
    match = re.search(r"\d+", quantization)
    return int(match.group()) if match else None


def _mock_variant(model: MockModel) -> str:
    return f"{model.id}@{model.quantization.lower()}"


def _mock_runtime(model: MockModel) -> dict[str, Any]:
    if model.format == "mlx":
        return {
            "name": "mlx-llm-mac-arm64-apple-metal-advsimd",
            "version": "0.30.0",
            "supported_formats": ["safetensors"],
        }
    return {"name": "llama.cpp-linux-x86_64-avx2", "version": "1.50.2", "supported_formats": ["gguf"]}


def _mock_ollama_capabilities(model: MockModel) -> list[str]:
    if model.is_embedding:
        return ["embedding"]
    flags = [("tools", model.tools), ("vision", model.vision), ("thinking", model.reasoning)]
    return ["completion", *(name for name, on in flags if on)]


def _mock_ollama_details(model: MockModel) -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": model.format,
        "family": model.arch,
        "families": [model.arch],
        "parameter_size": _mock_params_string(model) or "1B",
        "quantization_level": model.quantization,
    }


# --------------------------------------------------------------------------------------------------------
# Text, JSON and framing helpers


def _mock_dumps(obj: Any) -> str:
    # Compact like Express's JSON.stringify, so byte-level comparisons against real captures stay close.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _mock_json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(text=_mock_dumps(obj), status=status, content_type="application/json")


def _mock_sse_data(obj: Any) -> str:
    return f"data: {_mock_dumps(obj)}\n\n"


def _mock_sse_event(name: str, obj: Any) -> str:
    return f"event: {name}\ndata: {_mock_dumps(obj)}\n\n"


def _mock_ndjson(obj: Any) -> str:
    return _mock_dumps(obj) + "\n"


def _mock_word_count(text: str) -> int:
    return len(text.split())


def _mock_content_text(content: Any) -> str:
    """Flatten message content (string, list of parts, Anthropic blocks) to its plain text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(_mock_content_text(part) for part in content)
    if isinstance(content, dict):
        if isinstance(content.get("text"), str):
            return content["text"]
        return _mock_content_text(content.get("content"))
    return ""


def _mock_turn_tokens(turns: list[tuple[str, str]]) -> int:
    return sum(_mock_word_count(text) + _MOCK_TOKENS_PER_MESSAGE for _, text in turns)


def _mock_chat_turns(messages: Any) -> list[tuple[str, str]]:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise _MockHTTPError(400, "'messages' must be an array of message objects.", param="messages")
    return [(str(m.get("role", "user")), _mock_content_text(m.get("content"))) for m in messages]


def _mock_system_turns(system: Any) -> list[tuple[str, str]]:
    text = _mock_content_text(system)
    return [("system", text)] if text else []


def _mock_response_turns(body: dict[str, Any]) -> list[tuple[str, str]]:
    turns = _mock_system_turns(body.get("instructions"))
    source = body.get("input")
    if isinstance(source, str):
        return [*turns, ("user", source)]
    if not isinstance(source, list):
        raise _MockHTTPError(400, "'input' must be a string or an array of input items.", param="input")
    for item in source:
        if isinstance(item, dict):
            text = _mock_content_text(item.get("content", item.get("output")))
            turns.append((str(item.get("role", "user")), text))
    return turns


def _mock_native_turns(body: dict[str, Any]) -> list[tuple[str, str]]:
    turns = _mock_system_turns(body.get("system_prompt"))
    source = body.get("input")
    if isinstance(source, str):
        return [*turns, ("user", source)]
    if not isinstance(source, list) or not source:
        raise _MockHTTPError(
            400, "'input' must be a string or a non-empty array of input items.", param="input"
        )
    text = " ".join(_mock_content_text(item.get("content")) for item in source if isinstance(item, dict))
    return [*turns, ("user", text)]


def _mock_embedding_inputs(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise _MockHTTPError(400, "'input' must be a string or a non-empty array of strings.", param="input")


def _mock_embedding(text: str) -> list[float]:
    """A unit vector derived from sha256(text): stable across runs and nodes, different per text."""
    raw = [byte - 127.5 for byte in hashlib.sha256(text.encode()).digest()[:_MOCK_EMBED_DIM]]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [v / norm for v in raw]


def _mock_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _mock_float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _mock_now_iso(offset: float = 0.0) -> str:
    return (datetime.now(UTC) + timedelta(seconds=offset)).isoformat().replace("+00:00", "Z")


def _mock_keep_alive_zero(value: Any) -> bool:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value == 0
    return isinstance(value, str) and re.fullmatch(r"0+(\.0*)?(ns|us|ms|s|m|h)?", value.strip()) is not None


def _mock_version(version: str) -> tuple[int, int, int]:
    """Parse "0.4.6", "0.3" or "0.4.6+1"; missing parts count as the newest patch of that line."""
    parts = [re.match(r"\d+", p) for p in version.split("+")[0].split(".")]
    if not parts or len(parts) > 3 or any(p is None for p in parts):
        raise ValueError(f"invalid LM Studio version {version!r}: expected e.g. '0.4.6' or '0.3'")
    numbers = [int(p.group()) for p in parts if p is not None] + [999, 999]
    return numbers[0], numbers[1], numbers[2]


def _mock_tool_call(tools: Any, turns: list[tuple[str, str]], call_id: str) -> dict[str, str] | None:
    """A call to the request's weather tool when the last user message mentions the weather."""
    if not isinstance(tools, list) or not tools:
        return None
    last_user = next((text for role, text in reversed(turns) if role == "user"), "")
    if not _MOCK_WEATHER_RE.search(last_user):
        return None
    specs = [t.get("function", t) for t in tools if isinstance(t, dict)]
    specs = [s for s in specs if isinstance(s, dict) and isinstance(s.get("name"), str)]
    if not specs:
        return None
    spec = next((s for s in specs if "weather" in s["name"].lower()), specs[0])
    params = spec.get("parameters") or spec.get("input_schema") or {}
    props = params.get("properties") if isinstance(params, dict) else None
    required = params.get("required") if isinstance(params, dict) else None
    names = [*(required or []), *(props or {})] if isinstance(props, dict) else []
    arguments = {names[0]: "Paris"} if names else {}
    return {"id": call_id, "name": spec["name"], "arguments": _mock_dumps(arguments)}


def _mock_sentence(rng: random.Random, count: int, ends: bool) -> list[str]:
    vocabulary = _MOCK_WORD_TEXT.split()
    words = [rng.choice(vocabulary) for _ in range(count)]
    words[0] = words[0].capitalize()
    if ends:
        words[-1] += "."
    return [words[0], *(" " + w for w in words[1:])]


# --------------------------------------------------------------------------------------------------------
# Internal plumbing types


class _MockHTTPError(Exception):
    """An error answer; the route's error style decides the body shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        v1_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param
        self.code = code
        if v1_type is None:
            v1_type = "model_not_found" if code == "model_not_found" else "invalid_request"
            v1_type = "internal_error" if status >= 500 else v1_type
        self.v1_type = v1_type


class _MockAbort(Exception):
    """The node cut the connection on purpose; the handler must end without writing anything more."""


@dataclass
class _MockInstance:
    id: str
    model: MockModel
    context_length: int
    jit: bool
    slots: asyncio.Semaphore
    active: int = 0
    waiting: int = 0
    last_used: float = field(default_factory=time.time)


@dataclass
class _MockTarget:
    model: MockModel
    instance: _MockInstance | None


@dataclass
class _MockSampling:
    max_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None


@dataclass
class _MockPlan:
    """What a generation will produce: text tokens, or tool-call argument fragments after an empty header."""

    pieces: list[str]
    finish: str
    prompt_tokens: int
    tool: dict[str, str] | None = None

    @property
    def text(self) -> str:
        return "" if self.tool else "".join(self.pieces)

    @property
    def completion_tokens(self) -> int:
        return len(self.pieces)

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


@dataclass
class _MockTiming:
    first_token: float
    generation: float
    load: float | None = None

    def tokens_per_second(self, tokens: int) -> float:
        return round(tokens / self.generation, 2) if self.generation > 0 else 0.0


# Quoted so the alias also works where postponed annotations are off (this section may be pasted elsewhere).
_MockHandler = Callable[["_MockCall"], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class _MockRoute:
    handler: _MockHandler
    errors: str = "openai"
    inference: bool = False
    fingerprint: str = ""
    extras: str = ""


@dataclass
class _MockCall:
    request: web.Request
    body: bytes
    data: Any
    json_error: str | None
    route: _MockRoute
    abort_after: int | None = None

    def payload(self) -> dict[str, Any]:
        if self.json_error is not None:
            raise _MockHTTPError(400, f"Malformed JSON in request body: {self.json_error}")
        if not isinstance(self.data, dict):
            raise _MockHTTPError(400, "The request body must be a JSON object.")
        return self.data


_MockEmit = Callable[[int, str], Awaitable[None]]


class _MockStream:
    """Writes one frame at a time; the response is prepared lazily so that anything rejected before the
    first frame is still a plain HTTP error, and nothing is sent while a JIT load is in progress."""

    def __init__(self, call: _MockCall, content_type: str) -> None:
        self._call = call
        self._content_type = content_type
        self._response: web.StreamResponse | None = None
        self.sent = 0

    async def send(self, frame: str) -> None:
        if self._call.abort_after is not None and self.sent >= self._call.abort_after:
            self._abort()
        response = await self._prepared()
        await response.write(frame.encode())
        self.sent += 1

    async def finish(self) -> web.StreamResponse:
        if self._call.abort_after is not None:
            self._abort()
        response = await self._prepared()
        await response.write_eof()
        return response

    async def _prepared(self) -> web.StreamResponse:
        if self._response is None:
            headers = {"Content-Type": self._content_type, "Cache-Control": "no-cache"}
            self._response = web.StreamResponse(status=200, headers=headers)
            await self._response.prepare(self._call.request)
        return self._response

    def _abort(self) -> NoReturn:
        transport = self._call.request.transport
        if transport is not None:
            transport.abort()
        raise _MockAbort()


# --------------------------------------------------------------------------------------------------------
# The node


class MockNode:
    """An emulated inference server. Start it on a running loop; every answer is derived from the request,
    the node's seed and (for sampled requests) a per-node counter."""

    def __init__(
        self,
        models: list[MockModel],
        *,
        flavor: str = "lmstudio",
        version: str = "0.4.6",
        token: str | None = None,
        load_delay: float = 0.0,
        tps: float = 0.0,
        jit: bool = True,
        auto_evict: bool = True,
        close_after_response: bool = False,
        completion_tokens: int = 12,
        seed: int = 0,
    ) -> None:
        self._check_settings(models, flavor, load_delay, tps, completion_tokens)
        self.models = list(models)
        self.flavor = flavor
        self.version = version
        self._version = _mock_version(version)
        self._token = token
        self._load_delay = load_delay
        self._tps = tps
        self._jit = jit
        self._auto_evict = auto_evict
        self._close_after_response = close_after_response
        self._completion_tokens = completion_tokens
        self._seed = seed
        self.url = ""
        self.received: list[Received] = []
        self.stats = NodeStats()
        self._init_state()
        self.app = self._build_app()

    @staticmethod
    def _check_settings(
        models: list[MockModel], flavor: str, load_delay: float, tps: float, completion_tokens: int
    ) -> None:
        if flavor not in _MOCK_FLAVORS:
            raise ValueError(f"flavor must be one of {', '.join(_MOCK_FLAVORS)}, not {flavor!r}")
        if load_delay < 0 or tps < 0 or completion_tokens < 1:
            raise ValueError("load_delay and tps must be >= 0 and completion_tokens >= 1")
        ids = [m.id for m in models]
        if len(set(ids)) != len(ids):
            raise ValueError("model ids must be unique")

    def _init_state(self) -> None:
        self._instances: list[_MockInstance] = []
        self._pending_loads: dict[str, asyncio.Task[_MockInstance]] = {}
        self._stored_responses: dict[str, list[tuple[str, str]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._seen_transports: weakref.WeakSet[Any] = weakref.WeakSet()
        self._routes: dict[tuple[str, str], _MockRoute] = {}
        self._prefix_routes: list[tuple[str, str, _MockRoute]] = []
        self._runner: web.AppRunner | None = None
        self._nonce = 0
        self._id_counter = 0
        self._created = int(time.time())
        self._fault: str | None = None
        self._fault_rate = 1.0
        self._fault_after = 2
        self._fault_rng = random.Random(f"{self._seed}:faults")
        for model in self.models:
            if model.loaded or self.flavor == "openai":
                self._add_instance(model, model.context_length, jit=False, count=False)

    def _build_app(self) -> web.Application:
        # Chat requests may carry base64 images, far beyond aiohttp's 1 MiB default body limit.
        app = web.Application(client_max_size=64 * 1024 * 1024)
        register = {
            "lmstudio": self._lmstudio_routes,
            "ollama": self._ollama_routes,
            "openai": self._openai_routes,
        }
        register[self.flavor]()
        if self.flavor == "lmstudio":
            app.on_response_prepare.append(self._tag_express)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        return app

    # ---- public control surface -------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        if self._runner is not None:
            raise RuntimeError("this node is already started")
        # handler_cancellation makes aiohttp cancel a handler when its client goes away, which is how a
        # disconnect stops a generation at once (LM Studio logs "Client disconnected. Stopping generation").
        runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None, shutdown_timeout=0.25)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        self._runner = runner
        bound_port = runner.addresses[0][1]
        self.url = f"http://{host}:{bound_port}"
        return self.url

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        for task in [*self._tasks, *self._pending_loads.values()]:
            task.cancel()
        await runner.cleanup()

    def set_fault(self, kind: str | None, rate: float = 1.0, after_chunks: int = 2) -> None:
        if kind is not None and kind not in _MOCK_FAULTS:
            raise ValueError(f"fault kind must be None or one of {', '.join(_MOCK_FAULTS)}, not {kind!r}")
        if not 0.0 <= rate <= 1.0 or after_chunks < 0:
            raise ValueError("fault rate must be within [0, 1] and after_chunks >= 0")
        self._fault, self._fault_rate, self._fault_after = kind, rate, after_chunks
        # Re-seeding on every change makes a given fault setting pick the same requests on every run.
        self._fault_rng = random.Random(f"{self._seed}:faults:{kind}:{rate}")

    def set_token(self, token: str | None) -> None:
        self._token = token

    def loaded_ids(self) -> list[str]:
        return [inst.id for inst in self._instances]

    # ---- routing ------------------------------------------------------------------------------------------

    def _add(
        self,
        method: str,
        path: str,
        handler: _MockHandler,
        *,
        errors: str = "openai",
        inference: bool = False,
        fingerprint: str = "",
        extras: str = "",
        prefix: bool = False,
    ) -> None:
        route = _MockRoute(handler, errors, inference, fingerprint, extras)
        if prefix:
            self._prefix_routes.append((method, path, route))
        else:
            self._routes[(method, path)] = route

    def _lmstudio_routes(self) -> None:
        self._add("GET", "/lmstudio-greeting", self._greeting)
        self._add("GET", "/v1/models", self._lms_openai_models)
        self._add("POST", "/v1/chat/completions", self._chat_completions, inference=True, extras="v1")
        self._add("POST", "/v1/completions", self._completions, inference=True, extras="v1")
        self._add("POST", "/v1/embeddings", self._embeddings, inference=True)
        if self._version >= (0, 3, 29):
            self._add("POST", "/v1/responses", self._responses, inference=True)
        if self._version >= (0, 4, 1):
            self._add("POST", "/v1/messages", self._messages, inference=True)
        if self._version >= (0, 3, 6):
            self._v0_routes()
        if self._version >= (0, 4, 0):
            self._v1_native_routes()

    def _v0_routes(self) -> None:
        self._add("GET", "/api/v0/models", self._v0_models)
        self._add("GET", "/api/v0/models/", self._v0_model, prefix=True)
        self._add("POST", "/api/v0/chat/completions", self._chat_completions, inference=True, extras="v0")
        self._add("POST", "/api/v0/completions", self._completions, inference=True, extras="v0")
        self._add("POST", "/api/v0/embeddings", self._embeddings, inference=True, extras="v0")

    def _v1_native_routes(self) -> None:
        self._add("GET", "/api/v1/models", self._v1_models, errors="lms_v1")
        self._add("POST", "/api/v1/models/load", self._v1_load, errors="lms_v1")
        self._add("POST", "/api/v1/models/unload", self._v1_unload, errors="lms_v1")
        self._add("POST", "/api/v1/chat", self._v1_chat, errors="lms_v1", inference=True)

    def _ollama_routes(self) -> None:
        for method in ("GET", "HEAD"):
            self._add(method, "/", self._ollama_root, errors="ollama")
            self._add(method, "/api/version", self._ollama_version, errors="ollama")
            self._add(method, "/api/tags", self._ollama_tags, errors="ollama")
        self._add("GET", "/api/ps", self._ollama_ps, errors="ollama")
        self._add("POST", "/api/show", self._ollama_show, errors="ollama")
        self._add("POST", "/api/chat", self._ollama_chat, errors="ollama", inference=True)
        self._add("POST", "/api/generate", self._ollama_generate, errors="ollama", inference=True)
        self._add("POST", "/api/embed", self._ollama_embed, errors="ollama", inference=True)
        self._add("POST", "/api/embeddings", self._ollama_embeddings_legacy, errors="ollama", inference=True)
        self._add("GET", "/v1/models", self._ollama_openai_models, errors="ollama_openai")
        self._add("GET", "/v1/models/", self._ollama_openai_model, errors="ollama_openai", prefix=True)
        for path, handler in (
            ("/v1/chat/completions", self._chat_completions),
            ("/v1/completions", self._completions),
        ):
            self._add("POST", path, handler, errors="ollama_openai", inference=True, fingerprint="fp_ollama")
        self._add("POST", "/v1/embeddings", self._embeddings, errors="ollama_openai", inference=True)

    def _openai_routes(self) -> None:
        self._add("GET", "/health", self._llama_health, errors="llama")
        self._add("GET", "/v1/models", self._llama_models, errors="llama")
        for path, handler in (
            ("/v1/chat/completions", self._chat_completions),
            ("/v1/completions", self._completions),
        ):
            self._add(
                "POST", path, handler, errors="llama", inference=True, fingerprint=_MOCK_LLAMA_FINGERPRINT
            )
        self._add("POST", "/v1/embeddings", self._embeddings, errors="llama", inference=True)

    def _match(self, method: str, path: str) -> _MockRoute | None:
        route = self._routes.get((method, path))
        if route is not None:
            return route
        for route_method, prefix, candidate in self._prefix_routes:
            if method == route_method and path.startswith(prefix) and len(path) > len(prefix):
                return candidate
        return None

    def _path_known(self, path: str) -> bool:
        return any(p == path for _, p in self._routes) or any(
            path.startswith(prefix) for _, prefix, _ in self._prefix_routes
        )

    # ---- request pipeline -----------------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            return await self._handle(request)
        except (_MockAbort, ConnectionError):
            return await self._await_disconnect()
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body, data, json_error = await self._record(request)
        if self._is_stale(request):
            return await self._drop_stale(request)
        denied = self._auth_denied(request)
        if denied is not None:
            return denied
        route = self._match(request.method, request.path)
        if route is None:
            return self._unknown_route(request)
        call = _MockCall(request, body, data, json_error, route)
        try:
            if route.inference:
                await self._inject_fault(call)
            return await route.handler(call)
        except _MockHTTPError as err:
            return self._render_error(err, route.errors)

    async def _record(self, request: web.Request) -> tuple[bytes, Any, str | None]:
        body = await request.read()
        data: Any = None
        json_error: str | None = None
        if body:
            try:
                data = json.loads(body)
            except ValueError as exc:
                json_error = str(exc)
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.received.append(
            Received(
                request.method, request.path, request.query_string, headers, body, data, time.monotonic()
            )
        )
        self.stats.requests += 1
        return body, data, json_error

    async def _await_disconnect(self) -> web.StreamResponse:
        # The transport is already gone; aiohttp cancels this handler as soon as it notices, which ends the
        # request quietly (raising the ConnectionError instead would be logged as a server error).
        await asyncio.sleep(_MOCK_DISCONNECT_GRACE)
        return web.Response(status=499)

    def _is_stale(self, request: web.Request) -> bool:
        transport = request.transport
        if not self._close_after_response or transport is None:
            return False
        if transport in self._seen_transports:
            return True
        self._seen_transports.add(transport)
        return False

    async def _drop_stale(self, request: web.Request) -> web.StreamResponse:
        # Emulates a server that closed this keep-alive connection after the previous response without a
        # "Connection: close" header: the client only learns it when its next request gets no answer.
        self.stats.stale_drops += 1
        if request.transport is not None:
            request.transport.close()
        return await self._await_disconnect()

    async def _tag_express(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers.setdefault("X-Powered-By", "Express")

    def _unknown_route(self, request: web.Request) -> web.Response:
        if self.flavor == "ollama":
            if self._path_known(request.path):
                return web.Response(status=405, text="405 method not allowed", content_type="text/plain")
            return web.Response(status=404, text="404 page not found", content_type="text/plain")
        if self.flavor == "openai":
            return _mock_json(
                {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}}, 404
            )
        # LM Studio answers every unknown route or method with HTTP 200 and an error string.
        return _mock_json({"error": f"Unexpected endpoint or method. ({request.method} {request.path})"})

    def _render_error(self, err: _MockHTTPError, style: str) -> web.Response:
        if style == "lms_v1":
            return _mock_json({"error": {"type": err.v1_type, "message": err.message}}, err.status)
        if style == "ollama":
            return _mock_json({"error": err.message}, err.status)
        if style == "llama":
            kind = {404: "not_found_error", 503: "unavailable_error"}.get(err.status, err.kind)
            kind = "server_error" if err.status == 500 else kind
            return _mock_json(
                {"error": {"code": err.status, "message": err.message, "type": kind}}, err.status
            )
        if style == "ollama_openai":
            kind = {400: "invalid_request_error", 404: "not_found_error"}.get(err.status, "api_error")
            body = {"message": err.message, "type": kind, "param": None, "code": None}
            return _mock_json({"error": body}, err.status)
        body = {"message": err.message, "type": err.kind, "param": err.param, "code": err.code}
        return _mock_json({"error": body}, err.status)

    # ---- auth (LM Studio 0.4+) ----------------------------------------------------------------------------

    def _auth_denied(self, request: web.Request) -> web.Response | None:
        if self.flavor != "lmstudio" or self._token is None or self._version < (0, 4, 0):
            return None
        # The greeting stays open: probes identify the node before they know whether a token is needed.
        if request.path == "/lmstudio-greeting":
            return None
        presented = self._presented_tokens(request)
        if any(hmac.compare_digest(t.encode(), self._token.encode()) for t in presented):
            return None
        message = self._auth_message(presented[0] if presented else None)
        return _mock_json(
            {"error": {"type": "invalid_request", "code": "invalid_api_key", "message": message}}, 401
        )

    def _presented_tokens(self, request: web.Request) -> list[str]:
        tokens: list[str] = []
        scheme, _, value = request.headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            tokens.append(value.strip())
        api_key = request.headers.get("x-api-key", "").strip()
        if request.path == "/v1/messages" and api_key:
            tokens.append(api_key)
        return tokens

    @staticmethod
    def _auth_message(presented: str | None) -> str:
        if presented is None:
            return _MOCK_AUTH_MISSING
        if not _MOCK_TOKEN_RE.fullmatch(presented):
            return f"Malformed LM Studio API token provided: {presented[:6]}... Ensure you are using a valid token."
        return "Invalid LM Studio API token provided."

    # ---- fault injection ------------------------------------------------------------------------------------

    async def _inject_fault(self, call: _MockCall) -> None:
        if self._fault is None or self._fault_rng.random() >= self._fault_rate:
            return
        self.stats.faults_injected += 1
        if self._fault == "stall":
            # Never answer; aiohttp cancels this wait when the client gives up, stop() cancels it too.
            await asyncio.Event().wait()
        if self._fault == "midstream":
            call.abort_after = self._fault_after
            return
        messages = _MOCK_OLLAMA_FAULT_MESSAGES if call.route.errors == "ollama" else _MOCK_FAULT_MESSAGES
        kind = {"500": "server_error", "503": "server_error", "429": "rate_limit_error"}[self._fault]
        raise _MockHTTPError(int(self._fault), messages[self._fault], kind=kind)

    # ---- model registry -------------------------------------------------------------------------------------

    def _model_by_key(self, name: str) -> MockModel | None:
        for model in self.models:
            candidates = {model.id, _mock_variant(model)}
            if self.flavor == "ollama":
                candidates |= {f"{model.id}:latest", model.id.removesuffix(":latest")}
            if name in candidates or name.lower() == _mock_variant(model).lower():
                return model
        return None

    def _instance_by_id(self, instance_id: str) -> _MockInstance | None:
        return next((inst for inst in self._instances if inst.id == instance_id), None)

    def _instances_of(self, model: MockModel) -> list[_MockInstance]:
        return [inst for inst in self._instances if inst.model is model]

    def _least_busy(self, model: MockModel) -> _MockInstance | None:
        instances = self._instances_of(model)
        return min(instances, key=lambda i: i.active + i.waiting) if instances else None

    def _add_instance(
        self, model: MockModel, context_length: int, *, jit: bool, count: bool = True
    ) -> _MockInstance:
        taken = {inst.id for inst in self._instances}
        instance_id = model.id
        suffix = 2
        while instance_id in taken:
            instance_id = f"{model.id}:{suffix}"
            suffix += 1
        inst = _MockInstance(instance_id, model, context_length, jit, asyncio.Semaphore(model.parallel))
        self._instances.append(inst)
        if count:
            self.stats.loads += 1
            self.stats.load_log.append(model.id)
        return inst

    def _unload(self, inst: _MockInstance) -> None:
        if inst in self._instances:
            self._instances.remove(inst)
            self.stats.unloads += 1

    def _resolve(self, name: Any, purpose: str) -> _MockTarget:
        """Map a request's model name to a model and, when resident, the instance that will serve it."""
        if not isinstance(name, str) or not name:
            return self._default_target(purpose)
        # A model key goes to its least busy instance; only a name that is no key pins one instance (":2").
        model = self._model_by_key(name)
        inst = None if model is not None else self._instance_by_id(name)
        model = inst.model if inst is not None else model
        if model is None:
            raise self._unknown_model(name)
        self._check_purpose(model, name, purpose)
        if inst is None:
            inst = self._least_busy(model)
        if inst is None and self.flavor == "lmstudio" and not self._jit:
            raise self._unknown_model(name)
        return _MockTarget(model, inst)

    def _default_target(self, purpose: str) -> _MockTarget:
        if self.flavor == "ollama":
            raise _MockHTTPError(400, "model is required", param="model")
        # LM Studio (like llama-server) answers a request without a model with whatever is resident.
        for inst in self._instances:
            if inst.model.is_embedding == (purpose == "embedding"):
                return _MockTarget(inst.model, inst)
        raise _MockHTTPError(400, _MOCK_NO_MODELS, param="model")

    def _unknown_model(self, name: str) -> _MockHTTPError:
        if self.flavor != "lmstudio":
            return _MockHTTPError(
                404, f"model '{name}' not found", kind="not_found_error", code="model_not_found"
            )
        known = [m.id for m in self.models] if self._jit else self.loaded_ids()
        if not known:
            return _MockHTTPError(400, _MOCK_NO_MODELS, param="model")
        message = f'Invalid model identifier "{name}". Please specify a valid downloaded model (e.g., {", ".join(known)}).'
        return _MockHTTPError(400, message, param="model", code="model_not_found")

    def _check_purpose(self, model: MockModel, name: str, purpose: str) -> None:
        if model.is_embedding == (purpose == "embedding"):
            return
        if self.flavor == "ollama":
            action = {"chat": "chat", "generate": "generate"}.get(purpose, "embeddings")
            raise _MockHTTPError(400, f'"{name}" does not support {action}')
        if purpose == "embedding":
            message = (
                f'Model "{name}" is not an embedding model; load an embedding model to create embeddings.'
            )
        else:
            message = f'Model "{name}" is an embedding model and cannot generate text; use /v1/embeddings.'
        raise _MockHTTPError(400, message, param="model", code="model_not_supported")

    async def _ensure_instance(self, target: _MockTarget) -> tuple[_MockInstance, float | None]:
        """Return the serving instance, JIT-loading the model first when needed (one load per model even
        when several requests arrive during it). The second value is the load time this request waited."""
        if target.instance is not None:
            target.instance.last_used = time.time()
            return target.instance, None
        key = target.model.id
        pending = self._pending_loads.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._jit_load(target.model))
            self._pending_loads[key] = pending
            pending.add_done_callback(lambda _: self._pending_loads.pop(key, None))
        started = time.monotonic()
        inst = await asyncio.shield(pending)
        return inst, time.monotonic() - started

    async def _jit_load(self, model: MockModel) -> _MockInstance:
        if self.flavor == "lmstudio" and self._auto_evict:
            for inst in [i for i in self._instances if i.jit and i.model is not model]:
                self._unload(inst)
        await asyncio.sleep(self._load_delay)
        return self._add_instance(model, model.context_length, jit=True)

    # ---- generation engine ---------------------------------------------------------------------------------

    def _sampling(self, max_tokens: Any, temperature: Any, seed: Any) -> _MockSampling:
        return _MockSampling(_mock_int(max_tokens), _mock_float(temperature), _mock_int(seed))

    def _plan(
        self, model: MockModel, turns: Any, prompt_tokens: int, sampling: _MockSampling, tools: Any = None
    ) -> _MockPlan:
        tool = _mock_tool_call(tools, turns, self._new_id("call_", 12)) if tools else None
        if tool is not None:
            args = tool["arguments"]
            middle = len(args) // 2
            return _MockPlan(["", args[:middle], args[middle:]], "tool_calls", prompt_tokens, tool)
        count, finish = self._completion_length(sampling.max_tokens)
        rng = random.Random(self._sampling_seed(model, turns, sampling))
        return _MockPlan(_mock_sentence(rng, count, finish == "stop"), finish, prompt_tokens)

    def _completion_length(self, max_tokens: int | None) -> tuple[int, str]:
        # The "model" would naturally stop after completion_tokens words; max_tokens can only cut it short.
        if max_tokens is not None and 0 < max_tokens <= self._completion_tokens:
            return max_tokens, "length"
        return self._completion_tokens, "stop"

    def _sampling_seed(self, model: MockModel, material: Any, sampling: _MockSampling) -> int:
        nonce: int | None = None
        if sampling.temperature != 0 and sampling.seed is None:
            self._nonce += 1
            nonce = self._nonce
        blob = json.dumps([model.id, material, self._seed, sampling.seed, nonce], sort_keys=True)
        return int.from_bytes(hashlib.sha256(blob.encode()).digest()[:8], "big")

    async def _generate(
        self, inst: _MockInstance, plan: _MockPlan, emit: _MockEmit | None = None
    ) -> _MockTiming:
        """Run one generation in a parallel slot of `inst` (queueing when all are busy)."""
        self.stats.queued_generations += 1
        inst.waiting += 1
        try:
            await inst.slots.acquire()
        finally:
            self.stats.queued_generations -= 1
            inst.waiting -= 1
        try:
            return await self._produce(inst, plan, emit)
        finally:
            inst.slots.release()

    async def _produce(self, inst: _MockInstance, plan: _MockPlan, emit: _MockEmit | None) -> _MockTiming:
        stats = self.stats
        stats.generations_started += 1
        stats.active_generations += 1
        stats.peak_active_generations = max(stats.peak_active_generations, stats.active_generations)
        stats.prompt_tokens_total += plan.prompt_tokens
        inst.active += 1
        started = time.perf_counter()
        first: float | None = None
        try:
            for index, piece in enumerate(plan.pieces):
                await self._pace()
                stats.tokens_generated += 1
                first = first if first is not None else time.perf_counter() - started
                if emit is not None:
                    await emit(index, piece)
        except BaseException:
            stats.generations_cancelled += 1
            raise
        finally:
            stats.active_generations -= 1
            inst.active -= 1
            inst.last_used = time.time()
        stats.generations_finished += 1
        stats.completion_tokens_total += plan.completion_tokens
        return _MockTiming(first or 0.0, time.perf_counter() - started)

    async def _pace(self) -> None:
        # Even at full speed yield once per token, so a disconnect or a queued request gets its turn.
        await asyncio.sleep(1.0 / self._tps if self._tps > 0 else 0)

    def _new_id(self, prefix: str, length: int = 24) -> str:
        self._id_counter += 1
        digest = hashlib.sha256(f"{self._seed}:{self._id_counter}:{prefix}".encode()).hexdigest()
        return prefix + digest[:length]

    def _fingerprint(self, call: _MockCall, inst: _MockInstance) -> str:
        return call.route.fingerprint or inst.id

    # ---- LM Studio catalogue routes ---------------------------------------------------------------------

    async def _greeting(self, call: _MockCall) -> web.StreamResponse:
        return _mock_json({"lmstudio": True, "version": self.version})

    def _visible_models(self) -> list[MockModel]:
        # With JIT on every downloaded model is offered; with it off only the resident ones.
        return [m for m in self.models if self._jit or self._instances_of(m)]

    async def _lms_openai_models(self, call: _MockCall) -> web.StreamResponse:
        ids: list[str] = []
        for model in self.models:
            instances = [inst.id for inst in self._instances_of(model)]
            if self._jit:
                ids += [model.id, *(i for i in instances if i != model.id)]
            else:
                ids += instances
        data = [{"id": i, "object": "model", "owned_by": "organization_owner"} for i in ids]
        return _mock_json({"data": data, "object": "list"})

    def _v0_entry(self, model: MockModel) -> dict[str, Any]:
        instances = self._instances_of(model)
        entry: dict[str, Any] = {
            "id": model.id,
            "object": "model",
            "type": "embeddings" if model.is_embedding else model.type,
            "publisher": model.publisher,
            "arch": model.arch,
            "compatibility_type": model.format,
            "quantization": model.quantization,
            "state": "loaded" if instances else "not-loaded",
            "max_context_length": model.max_context_length,
        }
        if instances:
            entry["loaded_context_length"] = instances[0].context_length
        if model.tools:
            entry["capabilities"] = ["tool_use"]
        return entry

    async def _v0_models(self, call: _MockCall) -> web.StreamResponse:
        return _mock_json({"object": "list", "data": [self._v0_entry(m) for m in self._visible_models()]})

    async def _v0_model(self, call: _MockCall) -> web.StreamResponse:
        name = call.request.path.removeprefix("/api/v0/models/")
        inst = self._instance_by_id(name)
        model = inst.model if inst is not None else self._model_by_key(name)
        if model is None:
            raise _MockHTTPError(404, f'Model "{name}" not found.', param="model", code="model_not_found")
        return _mock_json(self._v0_entry(model))

    def _v1_instance(self, inst: _MockInstance) -> dict[str, Any]:
        if inst.model.is_embedding:
            return {"id": inst.id, "config": {"context_length": inst.context_length}}
        config = {
            "context_length": inst.context_length,
            "eval_batch_size": 512,
            "parallel": inst.model.parallel,
            "flash_attention": True,
        }
        return {"id": inst.id, "config": config}

    def _v1_entry(self, model: MockModel) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "type": "embedding" if model.is_embedding else "llm",
            "publisher": model.publisher,
            "key": model.id,
            "display_name": _mock_display_name(model),
        }
        if not model.is_embedding:
            entry["architecture"] = model.arch
        entry |= {
            "quantization": {"name": model.quantization, "bits_per_weight": _mock_bits(model.quantization)},
            "size_bytes": model.size_bytes,
            "params_string": _mock_params_string(model),
            "loaded_instances": [self._v1_instance(i) for i in self._instances_of(model)],
            "max_context_length": model.max_context_length,
            "format": model.format,
        }
        if not model.is_embedding:
            entry["capabilities"] = self._v1_capabilities(model)
        variant = _mock_variant(model)
        return entry | {"description": None, "variants": [variant], "selected_variant": variant}

    @staticmethod
    def _v1_capabilities(model: MockModel) -> dict[str, Any]:
        capabilities: dict[str, Any] = {"vision": model.vision, "trained_for_tool_use": model.tools}
        if model.reasoning:
            capabilities["reasoning"] = {"allowed_options": ["off", "on"], "default": "on"}
        return capabilities

    async def _v1_models(self, call: _MockCall) -> web.StreamResponse:
        return _mock_json({"models": [self._v1_entry(m) for m in self.models]})

    # ---- LM Studio load / unload ------------------------------------------------------------------------

    @staticmethod
    def _reject_unknown_keys(body: dict[str, Any], allowed: Iterable[str]) -> None:
        unknown = [key for key in body if key not in set(allowed)]
        if unknown:
            listed = ", ".join(f"'{key}'" for key in unknown)
            raise _MockHTTPError(400, f"Unrecognized key(s) in object: {listed}")

    async def _v1_load(self, call: _MockCall) -> web.StreamResponse:
        body = call.payload()
        self._reject_unknown_keys(body, _MOCK_LOAD_KEYS)
        key = body.get("model")
        if not isinstance(key, str) or not key:
            raise _MockHTTPError(400, "'model' is required and must be a string.")
        model = self._model_by_key(key)
        if model is None:
            raise _MockHTTPError(404, f'Model "{key}" not found.', v1_type="model_not_found")
        context = self._load_context(model, body.get("context_length"))
        started = time.monotonic()
        # Explicit loads never auto-evict: that rule only covers JIT loads.
        await asyncio.sleep(self._load_delay)
        inst = self._add_instance(model, context, jit=False)
        result: dict[str, Any] = {
            "type": "embedding" if model.is_embedding else "llm",
            "instance_id": inst.id,
            "load_time_seconds": round(time.monotonic() - started, 3),
            "status": "loaded",
        }
        if body.get("echo_load_config") is True:
            result["load_config"] = self._load_config(inst)
        return _mock_json(result)

    @staticmethod
    def _load_context(model: MockModel, requested: Any) -> int:
        if requested is None:
            return model.context_length
        value = _mock_int(requested)
        if value is None or not 0 < value <= model.max_context_length:
            limit = model.max_context_length
            raise _MockHTTPError(400, f"'context_length' must be an integer between 1 and {limit}.")
        return value

    @staticmethod
    def _load_config(inst: _MockInstance) -> dict[str, Any]:
        if inst.model.is_embedding:
            return {"context_length": inst.context_length}
        return {
            "context_length": inst.context_length,
            "eval_batch_size": 512,
            "flash_attention": True,
            "offload_kv_cache_to_gpu": True,
        }

    async def _v1_unload(self, call: _MockCall) -> web.StreamResponse:
        body = call.payload()
        self._reject_unknown_keys(body, ["instance_id"])
        instance_id = body.get("instance_id")
        inst = self._instance_by_id(instance_id) if isinstance(instance_id, str) else None
        if inst is None:
            raise _MockHTTPError(404, f'No loaded model instance "{instance_id}".', v1_type="model_not_found")
        self._unload(inst)
        return _mock_json({"instance_id": inst.id})

    # ---- OpenAI-compatible inference (all flavors) --------------------------------------------------------

    def _check_response_format(self, body: dict[str, Any]) -> None:
        fmt = body.get("response_format")
        if (
            self.flavor == "lmstudio"
            and isinstance(fmt, dict)
            and fmt.get("type") not in ("json_schema", "text")
        ):
            raise _MockHTTPError(400, "'response_format.type' must be 'json_schema' or 'text'")

    async def _chat_completions(self, call: _MockCall) -> web.StreamResponse:
        body = call.payload()
        if "messages" not in body:
            raise _MockHTTPError(400, "'messages' field is required.", param="messages")
        turns = _mock_chat_turns(body["messages"])
        self._check_response_format(body)
        target = self._resolve(body.get("model"), "chat")
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        sampling = self._sampling(max_tokens, body.get("temperature"), body.get("seed"))
        plan = self._plan(target.model, turns, _mock_turn_tokens(turns), sampling, body.get("tools"))
        inst, _ = await self._ensure_instance(target)
        if body.get("stream") is True:
            return await self._stream_chat(call, inst, plan, body)
        timing = await self._generate(inst, plan)
        return _mock_json(self._chat_body(call, inst, plan, timing))

    def _chat_body(
        self, call: _MockCall, inst: _MockInstance, plan: _MockPlan, timing: _MockTiming
    ) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": plan.text}
        if plan.tool is not None:
            message = {"role": "assistant", "content": None, "tool_calls": [self._tool_call_obj(plan)]}
        body: dict[str, Any] = {
            "id": self._new_id("chatcmpl-"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": inst.id,
            "system_fingerprint": self._fingerprint(call, inst),
            "choices": [{"index": 0, "logprobs": None, "finish_reason": plan.finish, "message": message}],
            "usage": plan.usage(),
        }
        return body | self._route_extras(call, inst, plan, timing)

    @staticmethod
    def _tool_call_obj(plan: _MockPlan) -> dict[str, Any]:
        tool = plan.tool or {}
        function = {"name": tool.get("name", ""), "arguments": tool.get("arguments", "{}")}
        return {"id": tool.get("id", ""), "type": "function", "function": function}

    def _route_extras(
        self, call: _MockCall, inst: _MockInstance, plan: _MockPlan, timing: _MockTiming
    ) -> dict[str, Any]:
        if call.route.extras == "v1":
            return {"stats": {}}
        if call.route.extras != "v0":
            return {}
        stats = {
            "tokens_per_second": timing.tokens_per_second(plan.completion_tokens),
            "time_to_first_token": round(timing.first_token, 3),
            "generation_time": round(timing.generation, 3),
            "stop_reason": _MOCK_STOP_REASONS[plan.finish],
        }
        return {"stats": stats} | self._v0_info(inst)

    @staticmethod
    def _v0_info(inst: _MockInstance) -> dict[str, Any]:
        model = inst.model
        info = {
            "arch": model.arch,
            "quant": model.quantization,
            "format": model.format,
            "context_length": inst.context_length,
        }
        return {"model_info": info, "runtime": _mock_runtime(model)}

    @staticmethod
    def _chat_delta(plan: _MockPlan, index: int, piece: str) -> dict[str, Any]:
        if plan.tool is None:
            return {"role": "assistant", "content": piece} if index == 0 else {"content": piece}
        if index == 0:
            function = {"name": plan.tool["name"], "arguments": ""}
            head = {"index": 0, "id": plan.tool["id"], "type": "function", "function": function}
            return {"role": "assistant", "tool_calls": [head]}
        return {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}

    async def _stream_chat(
        self, call: _MockCall, inst: _MockInstance, plan: _MockPlan, body: dict[str, Any]
    ) -> web.StreamResponse:
        stream = _MockStream(call, "text/event-stream")
        base = {
            "id": self._new_id("chatcmpl-"),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": inst.id,
            "system_fingerprint": self._fingerprint(call, inst),
        }

        async def emit(index: int, piece: str) -> None:
            choice = {
                "index": 0,
                "delta": self._chat_delta(plan, index, piece),
                "logprobs": None,
                "finish_reason": None,
            }
            await stream.send(_mock_sse_data(base | {"choices": [choice]}))

        await self._generate(inst, plan, emit)
        final = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": plan.finish}
        await stream.send(_mock_sse_data(base | {"choices": [final]}))
        return await self._finish_openai_stream(stream, base, plan, body)

    async def _finish_openai_stream(
        self, stream: _MockStream, base: dict[str, Any], plan: _MockPlan, body: dict[str, Any]
    ) -> web.StreamResponse:
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is True:
            await stream.send(_mock_sse_data(base | {"choices": [], "usage": plan.usage()}))
        await stream.send("data: [DONE]\n\n")
        return await stream.finish()

    async def _completions(self, call: _MockCall) -> web.StreamResponse:
        body = call.payload()
        prompt = body.get("prompt")
        if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
            prompt = "".join(prompt)
        if not isinstance(prompt, str):
            raise _MockHTTPError(400, "'prompt' must be a string.", param="prompt")
        target = self._resolve(body.get("model"), "generate")
        sampling = self._sampling(body.get("max_tokens"), body.get("temperature"), body.get("seed"))
        plan = self._plan(target.model, prompt, _mock_word_count(prompt), sampling)
        inst, _ = await self._ensure_instance(target)
        if body.get("stream") is True:
            return await self._stream_completion(call, inst, plan, body)
        timing = await self._generate(inst, plan)
        choice = {"index": 0, "text": plan.text, "logprobs": None, "finish_reason": plan.finish}
        result = self._completion_base(call, inst) | {"choices": [choice], "usage": plan.usage()}
        return _mock_json(result | self._route_extras(call, inst, plan, timing))

    def _completion_base(self, call: _MockCall, inst: _MockInstance) -> dict[str, Any]:
        return {
            "id": self._new_id("cmpl-"),
            "object": "text_completion",
            "created": int(time.time()),
            "model": inst.id,
            "system_fingerprint": self._fingerprint(call, inst),
        }

    async def _stream_completion(
        self, call: _MockCall, inst: _MockInstance, plan: _MockPlan, body: dict[str, Any]
    ) -> web.StreamResponse:
        stream = _MockStream(call, "text/event-stream")
        base = self._completion_base(call, inst)

        async def emit(index: int, piece: str) -> None:
            choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": None}
            await stream.send(_mock_sse_data(base | {"choices": [choice]}))

        await self._generate(inst, plan, emit)
        final = {"index": 0, "text": "", "logprobs": None, "finish_reason": plan.finish}
        await stream.send(_mock_sse_data(base | {"choices": [final]}))
        return await self._finish_openai_stream(stream, base, plan, body)

    async def _embeddings(self, call: _MockCall) -> web.StreamResponse:
        body = call.payload()
        texts = _mock_embedding_inputs(body.get("input"))
        target = self._resolve(body.get("model"), "embedding")
        inst, _ = await self._ensure_instance(target)
        await self._pace()
        tokens = sum(_mock_word_count(t) for t in texts)
        data = [
            {"object": "embedding", "embedding": _mock_embedding(t), "index": i} for i, t in enumerate(texts)
        ]
        result = {
            "object": "list",
            "data": data,
            "model": inst.id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        if call.route.extras == "v0":
            result |= self._v0_info(inst)
        return _mock_json(result)

    # ---- stored conversations (/v1/responses and /api/v1/chat) -------------------------------------------

    def _history(self, previous: Any) -> list[tuple[str, str]]:
        if previous is None:
            return []
        if not isinstance(previous, str) or previous not in self._stored_responses:
            raise _MockHTTPError(
                404,
                f"Previous response with id '{previous}' not found.",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        return list(self._stored_responses[previous])

    def _remember(self, response_id: str, turns: list[tuple[str, str]], plan: _MockPlan) -> None:
        self._stored_responses[response_id] = [*turns, ("assistant", plan.text)]
        while len(self._stored_responses) > _MOCK_STORED_RESPONSES:
            self._stored_responses.pop(next(iter(self._stored_responses)))

    # ---- /v1/responses ---------------------------------------------------------------------------------

    async def _responses(self, call: _MockCall) -> web.StreamResponse:
        body = call.payload()
        turns = self._history(body.get("previous_response_id")) + _mock_response_turns(body)
        target = self._resolve(body.get("model"), "chat")
        sampling = self._sampling(body.get("max_output_tokens"), body.get("temperature"), body.get("seed"))
        plan = self._plan(target.model, turns, _mock_turn_tokens(turns), sampling)
        inst, _ = await self._ensure_instance(target)
        response_id = self._new_id("resp_", 32)
        if body.get("stream") is True:
            return await self._stream_response(call, inst, plan, body, response_id, turns)
        await self._generate(inst, plan)
        if body.get("store", True) is not False:
            self._remember(response_id, turns, plan)
        message_id = self._new_id("msg_", 32)
        return _mock_json(
            self._response_object(response_id, inst, plan, body, [self._response_item(message_id, plan)])
        )

    @staticmethod
    def _response_item(message_id: str, plan: _MockPlan | None) -> dict[str, Any]:
        if plan is None:
            return {
                "id": message_id,
                "type": "message",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
        part = {"type": "output_text", "text": plan.text, "annotations": [], "logprobs": []}
        return {
            "id": message_id,
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [part],
        }

    @staticmethod
    def _response_object(
        response_id: str,
        inst: _MockInstance,
        plan: _MockPlan | None,
        body: dict[str, Any],
        output: list[dict[str, Any]],
    ) -> dict[str, Any]:
        usage = None
        if plan is not None:
            usage = {
                "input_tokens": plan.prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": plan.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": plan.prompt_tokens + plan.completion_tokens,
            }
        return {
            "id": response_id,
            "object": "response",
            "created_at": int(time.time()),
            "status": "completed" if plan is not None else "in_progress",
            "error": None,
            "incomplete_details": None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "model": inst.id,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": body.get("previous_response_id"),
            "store": body.get("store", True) is not False,
            "temperature": body.get("temperature"),
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": body.get("top_p"),
            "truncation": "disabled",
            "usage": usage,
            "metadata": {},
        }

    async def _stream_response(
        self,
        call: _MockCall,
        inst: _MockInstance,
        plan: _MockPlan,
        body: dict[str, Any],
        response_id: str,
        turns: list[tuple[str, str]],
    ) -> web.StreamResponse:
        stream = _MockStream(call, "text/event-stream")
        sequence = iter(range(1_000_000))
        message_id = self._new_id("msg_", 32)
        where = {"item_id": message_id, "output_index": 0, "content_index": 0}

        async def send(kind: str, payload: dict[str, Any]) -> None:
            await stream.send(
                _mock_sse_event(kind, {"type": kind, "sequence_number": next(sequence)} | payload)
            )

        async def emit(index: int, piece: str) -> None:
            await send("response.output_text.delta", where | {"delta": piece, "logprobs": []})

        await self._open_response_stream(send, response_id, inst, body, message_id)
        await self._generate(inst, plan, emit)
        await self._close_response_stream(send, response_id, inst, plan, body, message_id)
        if body.get("store", True) is not False:
            self._remember(response_id, turns, plan)
        return await stream.finish()

    async def _open_response_stream(
        self,
        send: Callable[[str, dict[str, Any]], Awaitable[None]],
        response_id: str,
        inst: _MockInstance,
        body: dict[str, Any],
        message_id: str,
    ) -> None:
        pending = self._response_object(response_id, inst, None, body, [])
        await send("response.created", {"response": pending})
        await send("response.in_progress", {"response": pending})
        await send(
            "response.output_item.added", {"output_index": 0, "item": self._response_item(message_id, None)}
        )
        part = {"type": "output_text", "text": "", "annotations": []}
        await send(
            "response.content_part.added",
            {"item_id": message_id, "output_index": 0, "content_index": 0, "part": part},
        )

    async def _close_response_stream(
        self,
        send: Callable[[str, dict[str, Any]], Awaitable[None]],
        response_id: str,
        inst: _MockInstance,
        plan: _MockPlan,
        body: dict[str, Any],
        message_id: str,
    ) -> None:
        where = {"item_id": message_id, "output_index": 0, "content_index": 0}
        item = self._response_item(message_id, plan)
        await send("response.output_text.done", where | {"text": plan.text, "logprobs": []})
        await send("response.content_part.done", where | {"part": item["content"][0]})
        await send("response.output_item.done", {"output_index": 0, "item": item})
        await send(
            "response.completed", {"response": self._response_object(response_id, inst, plan, body, [item])}
        )

    # ---- /v1/messages (Anthropic-compatible) ---------------------------------------------------------------

    async def _messages(self, call: _MockCall) -> web.StreamResponse:
        body = call.payload()
        if "messages" not in body:
            raise _MockHTTPError(400, "'messages' field is required.", param="messages")
        turns = _mock_system_turns(body.get("system")) + _mock_chat_turns(body["messages"])
        target = self._resolve(body.get("model"), "chat")
        sampling = self._sampling(body.get("max_tokens"), body.get("temperature"), None)
        plan = self._plan(target.model, turns, _mock_turn_tokens(turns), sampling)
        inst, _ = await self._ensure_instance(target)
        message_id = self._new_id("msg_", 24)
        if body.get("stream") is True:
            return await self._stream_message(call, inst, plan, message_id)
        await self._generate(inst, plan)
        return _mock_json(self._message_object(message_id, inst, plan, done=True))

    @staticmethod
    def _message_object(
        message_id: str, inst: _MockInstance, plan: _MockPlan, *, done: bool
    ) -> dict[str, Any]:
        stop_reason = ("max_tokens" if plan.finish == "length" else "end_turn") if done else None
        return {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": inst.id,
            "content": [{"type": "text", "text": plan.text}] if done else [],
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {
                "input_tokens": plan.prompt_tokens,
                "output_tokens": plan.completion_tokens if done else 0,
            },
        }

    async def _stream_message(
        self, call: _MockCall, inst: _MockInstance, plan: _MockPlan, message_id: str
    ) -> web.StreamResponse:
        stream = _MockStream(call, "text/event-stream")

        async def send(kind: str, payload: dict[str, Any]) -> None:
            await stream.send(_mock_sse_event(kind, {"type": kind} | payload))

        async def emit(index: int, piece: str) -> None:
            await send("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": piece}})

        await send("message_start", {"message": self._message_object(message_id, inst, plan, done=False)})
        await send("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
        await send("ping", {})
        await self._generate(inst, plan, emit)
        await send("content_block_stop", {"index": 0})
        stop_reason = "max_tokens" if plan.finish == "length" else "end_turn"
        delta = {"delta": {"stop_reason": stop_reason, "stop_sequence": None}}
        await send("message_delta", delta | {"usage": {"output_tokens": plan.completion_tokens}})
        await send("message_stop", {})
        return await stream.finish()

    # ---- /api/v1/chat (LM Studio native, stateful) ------------------------------------------------------

    async def _v1_chat(self, call: _MockCall) -> web.StreamResponse:
        body = call.payload()
        if "input" not in body:
            raise _MockHTTPError(400, "'input' is required.", param="input")
        turns = self._history(body.get("previous_response_id")) + _mock_native_turns(body)
        target = self._resolve(body.get("model"), "chat")
        sampling = self._sampling(body.get("max_output_tokens"), body.get("temperature"), body.get("seed"))
        plan = self._plan(target.model, turns, _mock_turn_tokens(turns), sampling)
        if body.get("stream") is True:
            return await self._stream_v1_chat(call, target, plan, body, turns)
        inst, load = await self._ensure_instance(target)
        timing = await self._generate(inst, plan)
        timing.load = load
        return _mock_json(self._v1_chat_result(inst, plan, timing, body, turns))

    def _v1_chat_result(
        self,
        inst: _MockInstance,
        plan: _MockPlan,
        timing: _MockTiming,
        body: dict[str, Any],
        turns: list[tuple[str, str]],
    ) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "input_tokens": plan.prompt_tokens,
            "total_output_tokens": plan.completion_tokens,
            "reasoning_output_tokens": 0,
            "tokens_per_second": timing.tokens_per_second(plan.completion_tokens),
            "time_to_first_token_seconds": round(timing.first_token, 3),
        }
        if timing.load is not None:
            stats["model_load_time_seconds"] = round(timing.load, 3)
        result: dict[str, Any] = {
            "model_instance_id": inst.id,
            "output": [{"type": "message", "content": plan.text}],
            "stats": stats,
        }
        if body.get("store", True) is not False:
            result["response_id"] = self._new_id("resp_", 32)
            self._remember(result["response_id"], turns, plan)
        return result

    async def _stream_v1_chat(
        self,
        call: _MockCall,
        target: _MockTarget,
        plan: _MockPlan,
        body: dict[str, Any],
        turns: list[tuple[str, str]],
    ) -> web.StreamResponse:
        stream = _MockStream(call, "text/event-stream")

        async def send(kind: str, payload: dict[str, Any] | None = None) -> None:
            await stream.send(_mock_sse_event(kind, {"type": kind} | (payload or {})))

        async def emit(index: int, piece: str) -> None:
            await send("message.delta", {"content": piece})

        await send(
            "chat.start", {"model_instance_id": target.instance.id if target.instance else target.model.id}
        )
        inst, load = await self._load_with_events(target, send)
        for kind, extra in (("start", None), ("progress", {"progress": 1.0}), ("end", None)):
            await send(f"prompt_processing.{kind}", extra)
        await send("message.start")
        timing = await self._generate(inst, plan, emit)
        timing.load = load
        await send("message.end")
        await send("chat.end", {"result": self._v1_chat_result(inst, plan, timing, body, turns)})
        return await stream.finish()

    async def _load_with_events(
        self, target: _MockTarget, send: Callable[[str, dict[str, Any] | None], Awaitable[None]]
    ) -> tuple[_MockInstance, float | None]:
        if target.instance is not None:
            return await self._ensure_instance(target)
        where = {"model_instance_id": target.model.id}
        await send("model_load.start", where)
        await send("model_load.progress", where | {"progress": 0.0})
        inst, load = await self._ensure_instance(target)
        await send("model_load.progress", where | {"progress": 1.0})
        await send("model_load.end", where | {"load_time_seconds": round(load or 0.0, 3)})
        return inst, load

    # ---- Ollama flavor ----------------------------------------------------------------------------------

    async def _ollama_root(self, call: _MockCall) -> web.StreamResponse:
        return web.Response(text="Ollama is running", content_type="text/plain")

    async def _ollama_version(self, call: _MockCall) -> web.StreamResponse:
        return _mock_json({"version": _MOCK_OLLAMA_VERSION})

    def _ollama_entry(self, model: MockModel) -> dict[str, Any]:
        return {
            "name": model.id,
            "model": model.id,
            "modified_at": datetime.fromtimestamp(self._created, UTC).isoformat().replace("+00:00", "Z"),
            "size": model.size_bytes,
            "digest": hashlib.sha256(model.id.encode()).hexdigest(),
            "details": _mock_ollama_details(model),
            "capabilities": _mock_ollama_capabilities(model),
        }

    async def _ollama_tags(self, call: _MockCall) -> web.StreamResponse:
        return _mock_json({"models": [self._ollama_entry(m) for m in self.models]})

    async def _ollama_ps(self, call: _MockCall) -> web.StreamResponse:
        entries = []
        for inst in self._instances:
            entry = self._ollama_entry(inst.model)
            entry.pop("modified_at")
            entry.pop("capabilities")
            expires = inst.last_used + 300 - time.time()
            entry |= {
                "expires_at": _mock_now_iso(expires),
                "size_vram": inst.model.size_bytes,
                "context_length": inst.context_length,
            }
            entries.append(entry)
        return _mock_json({"models": entries})

    async def _ollama_show(self, call: _MockCall) -> web.StreamResponse:
        body = call.payload()
        name = body.get("model", body.get("name"))
        model = self._model_by_key(name) if isinstance(name, str) else None
        if model is None:
            raise self._unknown_model(str(name))
        info = {
            "general.architecture": model.arch,
            "general.parameter_count": model.size_bytes * 2,
            f"{model.arch}.context_length": model.max_context_length,
        }
        if model.is_embedding:
            info[f"{model.arch}.embedding_length"] = _MOCK_EMBED_DIM
        return _mock_json(
            {
                "license": "",
                "modelfile": f"FROM {model.id}\n",
                "parameters": "",
                "template": "{{ .Prompt }}",
                "details": _mock_ollama_details(model),
                "model_info": info,
                "capabilities": _mock_ollama_capabilities(model),
                "modified_at": datetime.fromtimestamp(self._created, UTC).isoformat().replace("+00:00", "Z"),
            }
        )

    @staticmethod
    def _ollama_sampling_args(body: dict[str, Any]) -> tuple[Any, Any, Any]:
        options = body.get("options") if isinstance(body.get("options"), dict) else {}
        return options.get("num_predict"), options.get("temperature"), options.get("seed")

    async def _ollama_chat(self, call: _MockCall) -> web.StreamResponse:
        body = call.payload()
        target = self._resolve(body.get("model"), "chat")
        messages = body.get("messages") or []
        if not messages:
            return await self._ollama_load_only(target, body, "message")
        turns = _mock_chat_turns(messages)
        sampling = self._sampling(*self._ollama_sampling_args(body))
        plan = self._plan(target.model, turns, _mock_turn_tokens(turns), sampling, body.get("tools"))
        return await self._ollama_reply(call, target, plan, body, "message")

    async def _ollama_generate(self, call: _MockCall) -> web.StreamResponse:
        body = call.payload()
        target = self._resolve(body.get("model"), "generate")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            return await self._ollama_load_only(target, body, "response")
        turns = [*_mock_system_turns(body.get("system")), ("user", prompt)]
        sampling = self._sampling(*self._ollama_sampling_args(body))
        plan = self._plan(target.model, turns, _mock_turn_tokens(turns), sampling)
        return await self._ollama_reply(call, target, plan, body, "response")

    async def _ollama_load_only(
        self, target: _MockTarget, body: dict[str, Any], field_name: str
    ) -> web.StreamResponse:
        """An empty prompt only loads the model; with keep_alive 0 it unloads it instead."""
        reason = "load"
        if _mock_keep_alive_zero(body.get("keep_alive")):
            reason = "unload"
            for inst in self._instances_of(target.model):
                self._unload(inst)
        else:
            await self._ensure_instance(target)
        value: Any = {"role": "assistant", "content": ""} if field_name == "message" else ""
        result = {"model": body.get("model"), "created_at": _mock_now_iso(), field_name: value}
        return _mock_json(result | {"done_reason": reason, "done": True})

    def _ollama_piece(self, plan: _MockPlan, index: int, piece: str, field_name: str) -> Any:
        if field_name == "response":
            return piece
        if plan.tool is None:
            return {"role": "assistant", "content": piece}
        # Ollama sends a tool call whole, with arguments as an object, in one non-final chunk.
        call = {"function": {"name": plan.tool["name"], "arguments": json.loads(plan.tool["arguments"])}}
        return {"role": "assistant", "content": "", "tool_calls": [call]}

    async def _ollama_reply(
        self, call: _MockCall, target: _MockTarget, plan: _MockPlan, body: dict[str, Any], field_name: str
    ) -> web.StreamResponse:
        started = time.perf_counter_ns()
        inst, load = await self._ensure_instance(target)
        if body.get("stream", True) is False:
            timing = await self._generate(inst, plan)
            whole = self._ollama_piece(plan, 0, plan.text, field_name)
            result = self._ollama_final(body, plan, timing, load, started, field_name, whole)
            self._ollama_after(inst, body)
            return _mock_json(result)
        stream = _MockStream(call, "application/x-ndjson")

        async def emit(index: int, piece: str) -> None:
            if plan.tool is None or index == 0:
                line = {
                    "model": body.get("model"),
                    "created_at": _mock_now_iso(),
                    field_name: self._ollama_piece(plan, index, piece, field_name),
                    "done": False,
                }
                await stream.send(_mock_ndjson(line))

        timing = await self._generate(inst, plan, emit)
        empty: Any = {"role": "assistant", "content": ""} if field_name == "message" else ""
        await stream.send(
            _mock_ndjson(self._ollama_final(body, plan, timing, load, started, field_name, empty))
        )
        self._ollama_after(inst, body)
        return await stream.finish()

    def _ollama_after(self, inst: _MockInstance, body: dict[str, Any]) -> None:
        if _mock_keep_alive_zero(body.get("keep_alive")):
            self._unload(inst)

    @staticmethod
    def _ollama_final(
        body: dict[str, Any],
        plan: _MockPlan,
        timing: _MockTiming,
        load: float | None,
        started_ns: int,
        field_name: str,
        value: Any,
    ) -> dict[str, Any]:
        eval_ns = max(int(timing.generation * 1e9), 1)
        result: dict[str, Any] = {
            "model": body.get("model"),
            "created_at": _mock_now_iso(),
            field_name: value,
        }
        result |= {"done": True, "done_reason": "length" if plan.finish == "length" else "stop"}
        result["total_duration"] = max(time.perf_counter_ns() - started_ns, 1)
        if load:
            # Ollama omits zero metrics (omitempty), so an already-resident model reports no load time.
            result["load_duration"] = int(load * 1e9)
        result |= {
            "prompt_eval_count": plan.prompt_tokens,
            "prompt_eval_duration": max(int(timing.first_token * 1e9), 1),
            "eval_count": plan.completion_tokens,
            "eval_duration": eval_ns,
        }
        return result

    async def _ollama_embed(self, call: _MockCall) -> web.StreamResponse:
        body = call.payload()
        started = time.perf_counter_ns()
        texts = _mock_embedding_inputs(body.get("input"))
        target = self._resolve(body.get("model"), "embedding")
        _, load = await self._ensure_instance(target)
        result: dict[str, Any] = {
            "model": body.get("model"),
            "embeddings": [_mock_embedding(t) for t in texts],
        }
        result["total_duration"] = max(time.perf_counter_ns() - started, 1)
        if load:
            result["load_duration"] = int(load * 1e9)
        result["prompt_eval_count"] = sum(_mock_word_count(t) for t in texts)
        return _mock_json(result)

    async def _ollama_embeddings_legacy(self, call: _MockCall) -> web.StreamResponse:
        body = call.payload()
        prompt = body.get("prompt")
        target = self._resolve(body.get("model"), "embedding")
        await self._ensure_instance(target)
        return _mock_json({"embedding": _mock_embedding(prompt) if isinstance(prompt, str) else []})

    def _ollama_openai_entry(self, model: MockModel) -> dict[str, Any]:
        owner = model.id.split("/", 1)[0] if "/" in model.id else "library"
        return {"id": model.id, "object": "model", "created": self._created, "owned_by": owner}

    async def _ollama_openai_models(self, call: _MockCall) -> web.StreamResponse:
        return _mock_json({"object": "list", "data": [self._ollama_openai_entry(m) for m in self.models]})

    async def _ollama_openai_model(self, call: _MockCall) -> web.StreamResponse:
        name = call.request.path.removeprefix("/v1/models/")
        model = self._model_by_key(name)
        if model is None:
            raise self._unknown_model(name)
        return _mock_json(self._ollama_openai_entry(model))

    # ---- generic OpenAI server flavor (llama-server) --------------------------------------------------------

    async def _llama_health(self, call: _MockCall) -> web.StreamResponse:
        return _mock_json({"status": "ok"})

    async def _llama_models(self, call: _MockCall) -> web.StreamResponse:
        data = [
            {"id": m.id, "object": "model", "created": self._created, "owned_by": "llamacpp"}
            for m in self.models
        ]
        return _mock_json({"object": "list", "data": data})
