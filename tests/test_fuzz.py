"""Property-based robustness: malformed bodies, headers, paths and methods thrown at every endpoint.

One gateway (no admin token, so loopback may use the control plane) in front of one healthy emulated node.
Whatever arrives, the gateway answers below 500 (or with a 503 whose reason is justified), shows no
traceback, wraps every 4xx of its own in a well-formed error envelope, and keeps its state intact.

Nothing here reaches beyond 127.0.0.0/8: node URLs and discovery subnets are drawn from loopback
addresses or from strings that fail before any name is resolved.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote, unquote

import httpx
import pytest
from conftest import LoopThread, RunningGateway, start_gateway, wait_until
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

import vampire

T = TypeVar("T")

MODELS = "m:llm:loaded,e:embedding:loaded"
SPARE_URL = "http://127.9.9.9:9"  # nothing listens there: the node that PATCH/DELETE/probe fuzzing may change
SPARE_ID = vampire.node_id_for(SPARE_URL)
ORIGIN = "http://127.0.0.1:9"  # the one browser origin the gateway allows
MAX_BODY = 64 * 1024
TIMEOUT = 15.0  # a request that takes longer than this is reported as a hang
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD")
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
DATA_PATHS = (
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/messages", "/v1/models",
    "/v1/models/{model}",
)
OTHER_PATHS = ("/healthz", "/metrics")
LISTINGS = (
    "/vampire/v1/status", "/vampire/v1/nodes", "/vampire/v1/models", "/vampire/v1/routes", "/vampire/v1/keys",
    "/vampire/v1/realms", "/vampire/v1/share", "/vampire/v1/cache", "/vampire/v1/usage", "/vampire/v1/audit", "/",
)
MARKERS = ("Traceback", 'File "')
# A 503 is acceptable only for these reasons; everything else means the healthy node was refused.
ALLOWED_503 = {
    # a pin (`model@node`) that names the spare node, which is offline by design
    "node_unavailable": re.compile(r"\ANode `.*` is (offline|unknown|unauthorized|draining|disabled|not trusted)\.\Z", re.S),
}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


# ── the rig: one gateway, one healthy node, one spare (offline) node ──────────────────────────────────────


@dataclass
class Rig:
    bg: LoopThread
    gw: RunningGateway
    node: Any
    http: httpx.Client
    node_id: str = ""
    node_fields: tuple[Any, ...] = ()
    spare_fields: tuple[Any, ...] = ()
    routes: list[str] = field(default_factory=list)

    def on_loop(self, fn: Callable[[], T]) -> T:
        """Read or change gateway state on its own loop, never concurrently with a request."""

        async def call() -> T:
            return fn()

        return self.bg.run(call())

    def url(self, path: str) -> str:
        return self.gw.url + path


def node_fields(node: vampire.Node) -> tuple[Any, ...]:
    return (node.url, node.name, node.trusted, node.admin_state, node.token, list(node.tags), node.source)


@pytest.fixture(scope="module")
def rig(bg: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    node = vampire.MockNode(vampire.parse_model_specs(MODELS))
    bg.run(node.start("127.0.0.1", 0))
    gw = start_gateway(bg, tmp_path_factory.mktemp("fuzz"), [node.url], max_body_bytes=MAX_BODY, cors_origins=[ORIGIN])
    client = httpx.Client(timeout=TIMEOUT)
    try:
        r = Rig(bg, gw, node, client)
        wait_until(lambda: any(n.health == "online" for n in gw.app.registry.nodes.values()))
        (real,) = gw.app.registry.nodes.values()
        r.node_id, r.node_fields = real.id, node_fields(real)
        r.routes = sorted({route.path for route in gw.app.control.routes()})
        add_spare(r)
        yield r
    finally:
        client.close()
        gw.stop()
        bg.run(node.stop())


def add_spare(rig: Rig) -> None:
    resp = rig.http.post(rig.url("/vampire/v1/nodes"), json={"url": SPARE_URL})
    assert resp.status_code == 201, resp.text
    rig.spare_fields = rig.on_loop(lambda: node_fields(rig.gw.app.registry.nodes[SPARE_ID]))


# ── sending and judging one request ────────────────────────────────────────────────────────────────────


@dataclass
class Answer:
    status: int
    headers: httpx.Headers
    body: bytes
    streamed: bool = False  # an endless event stream: only its head was read


def describe(method: str, path: str, headers: dict[str, bytes], body: bytes) -> str:
    return f"{method} {path} headers={headers!r} body={body[:600]!r}{'…' if len(body) > 600 else ''}"


def send(rig: Rig, method: str, path: str, headers: dict[str, bytes], body: bytes) -> Answer:
    what = describe(method, path, headers, body)
    note(what)
    try:
        if unquote(path.partition("?")[0]).rstrip("/") == "/vampire/v1/events":
            # An event stream never ends; a connection of its own is closed after the head.
            with httpx.Client(timeout=TIMEOUT) as one, one.stream(
                method, rig.url(path), headers=headers, content=body
            ) as resp:
                if resp.status_code == 200 and method != "HEAD":
                    assert resp.headers.get("content-type", "").startswith("text/event-stream"), what
                    return Answer(resp.status_code, resp.headers, b"", streamed=True)
                return Answer(resp.status_code, resp.headers, resp.read())
        resp = rig.http.request(method, rig.url(path), headers=headers, content=body)
        return Answer(resp.status_code, resp.headers, resp.content)
    except httpx.TimeoutException:
        raise AssertionError(f"no answer within {TIMEOUT}s (hang): {what}") from None


def openai_envelope(doc: Any) -> bool:
    if not (isinstance(doc, dict) and set(doc) == {"error"} and isinstance(doc["error"], dict)):
        return False
    err = doc["error"]
    return (
        set(err) == {"message", "type", "param", "code"}
        and isinstance(err["message"], str) and bool(err["message"])
        and isinstance(err["type"], str) and bool(err["type"])
        and (err["param"] is None or isinstance(err["param"], str))
        and (err["code"] is None or isinstance(err["code"], str))
    )


def anthropic_envelope(doc: Any) -> bool:
    return (
        isinstance(doc, dict) and set(doc) == {"type", "error"} and doc["type"] == "error"
        and isinstance(doc["error"], dict) and set(doc["error"]) == {"type", "message"}
        and isinstance(doc["error"]["type"], str) and isinstance(doc["error"]["message"], str)
        and bool(doc["error"]["message"])
    )


def judge(answer: Answer, method: str, path: str, headers: dict[str, bytes], body: bytes) -> None:
    """The property every answer must hold, whatever the request was."""
    what = f"{describe(method, path, headers, body)} -> {answer.status} {answer.body[:400]!r}"
    passthrough = "x-vampire-node" in answer.headers  # the node's own answer, relayed unchanged
    anthropic = unquote(path.partition("?")[0]) == "/v1/messages"
    doc: Any = None
    if answer.body:
        try:
            doc = json.loads(answer.body)
        except ValueError:
            doc = None
    if answer.status >= 500:
        assert answer.status == 503, f"server error{' relayed from the node' if passthrough else ''}: {what}"
        if anthropic:
            message = doc["error"]["message"] if anthropic_envelope(doc) else ""
            assert any(p.match(message) for p in ALLOWED_503.values()), f"unjustified 503: {what}"
        else:
            code = doc["error"]["code"] if openai_envelope(doc) else None
            assert code in ALLOWED_503, f"unjustified 503 ({code}): {what}"
            assert ALLOWED_503[code].match(doc["error"]["message"]), f"unjustified 503 ({code}): {what}"
    echoed = (path + repr(headers)).encode() + body
    for marker in MARKERS:
        if marker.encode() not in echoed:
            assert marker.encode() not in answer.body, f"traceback in the answer: {what}"
    if answer.status >= 400 and not passthrough and method != "HEAD" and not answer.streamed:
        well_formed = anthropic_envelope(doc) if anthropic else openai_envelope(doc)
        assert well_formed, f"malformed error envelope: {what}"


# ── state: restored after every example, checked after every test ───────────────────────────────────


def idle(rig: Rig) -> bool:
    app = rig.gw.app

    def check() -> bool:
        nodes = app.registry.nodes.values()
        return (
            not app.active and not app.admission.waiters and not app.sharing.flights
            and not app.events._subscribers
            and all(n.in_flight == 0 and not any(n.busy.values()) and not n.warming for n in nodes)
            and all(q.active == 0 for q in app.policy._quotas.values())
        )

    return rig.on_loop(check)


def listings_answer(rig: Rig, after: str) -> None:
    """Whatever a request stored, every listing still renders."""
    for path in LISTINGS:
        resp = rig.http.get(rig.url(path))
        assert resp.status_code == 200, f"GET {path} -> {resp.status_code} {resp.text[:300]!r} after {after}"


def restore(rig: Rig) -> None:
    """Undo what an example legitimately changed: share mode, extra nodes, the spare's settings, routes,
    keys, realms. The real node must never have been touched."""
    app = rig.gw.app

    def view() -> tuple[str, dict[str, tuple[Any, ...]], list[str], dict[str, Any], list[str], list[str]]:
        return (
            app.policy.share, {i: node_fields(n) for i, n in app.registry.nodes.items()}, list(app.router.routes),
            app.policy.realms[vampire.DEFAULT_REALM].public(), list(app.policy.keys), list(app.policy.realms),
        )

    share, nodes, routes, personal, keys, realms = rig.on_loop(view)
    assert nodes.get(rig.node_id) == rig.node_fields, f"the real node changed: {nodes.get(rig.node_id)}"
    if share != "local":
        assert rig.http.put(rig.url("/vampire/v1/share"), json={"mode": "local"}).status_code == 200
    for node_id, fields in nodes.items():
        if node_id == rig.node_id or (node_id == SPARE_ID and fields == rig.spare_fields):
            continue
        resp = rig.http.delete(rig.url(f"/vampire/v1/nodes/{quote(node_id, safe='')}"))
        assert resp.status_code == 200, resp.text
    if SPARE_ID not in nodes or nodes[SPARE_ID] != rig.spare_fields:
        add_spare(rig)
    for key_id in keys:
        assert rig.http.delete(rig.url(f"/vampire/v1/keys/{quote(key_id, safe='')}")).status_code == 200
    if personal != vampire.Realm(vampire.DEFAULT_REALM).public():
        assert rig.http.post(rig.url("/vampire/v1/realms"), json={"name": vampire.DEFAULT_REALM}).status_code == 201
    if routes or len(realms) > 1:
        # Route ids may hold `/` or lone surrogates, which no URL can name, and realms cannot be deleted
        # through the API: both are dropped where they live.
        def drop() -> None:
            for route_id in list(app.router.routes):
                app.router.delete_route(route_id)
            for name in [n for n in app.policy.realms if n != vampire.DEFAULT_REALM]:
                del app.policy.realms[name]

        rig.on_loop(drop)
    wait_until(lambda: idle(rig), timeout=10)


def after_example(rig: Rig, method: str, what: str) -> None:
    try:
        if method in MUTATING:
            listings_answer(rig, what)
    finally:
        restore(rig)


def assert_intact(rig: Rig) -> None:
    restore(rig)
    assert rig.http.delete(rig.url(f"/vampire/v1/nodes/{SPARE_ID}")).status_code == 200
    try:
        nodes = rig.http.get(rig.url("/vampire/v1/nodes")).json()["data"]
        assert [(n["id"], n["state"], n["circuit"], n["in_flight"]) for n in nodes] == [
            (rig.node_id, "online", "closed", 0)
        ], nodes
        chat = rig.http.post(rig.url("/v1/chat/completions"), json=CHAT)
        assert chat.status_code == 200, chat.text
        assert chat.headers["x-vampire-node"] == rig.node_id
        assert chat.json()["choices"][0]["message"]["content"]
        assert rig.http.get(rig.url("/vampire/v1/share")).json() == {"mode": "local"}
        listings_answer(rig, "the run")
        wait_until(lambda: idle(rig), timeout=10)
        real = rig.gw.app.registry.nodes[rig.node_id]
        assert real.in_flight == 0 and not any(real.busy.values())
        assert not rig.gw.app.admission.waiters and not rig.gw.app.sharing.flights and not rig.gw.app.active
    finally:
        add_spare(rig)


# ── strategies ───────────────────────────────────────────────────────────────────────────────────────────

# Every code point, lone surrogates and NUL included (JSON carries them as \\udXXX and \\u0000 escapes).
wild_text = st.text(st.characters(exclude_categories=()), max_size=24)
huge_ints = st.sampled_from([2**63, -(2**63) - 1, 2**64, 10**30, -(10**40), 2**1000])
numbers = st.integers() | huge_ints | st.floats()  # NaN and ±Infinity are sent as Python writes them
scalars = st.none() | st.booleans() | numbers | wild_text
KNOWN_KEYS = (
    "model", "messages", "input", "prompt", "stream", "stream_options", "include_usage", "vampire", "tools",
    "max_tokens", "temperature", "seed", "previous_response_id", "system", "role", "content", "type",
    "image_url", "name", "mode", "id", "targets", "strategy", "fallback", "realm", "models", "nodes", "rpm",
    "tpm", "max_concurrent", "expires_at", "state", "trusted", "token", "tags", "add", "cache", "coalesce",
)
keys = st.sampled_from(KNOWN_KEYS) | wild_text
json_values = st.recursive(
    scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(keys, kids, max_size=5), max_leaves=16
)


def to_json(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


def nested(depth: int) -> bytes:
    return b'{"model":"m","messages":' + b"[" * depth + b"]" * depth + b"}"


SPECIAL_BODIES = (
    b"", b"{", b"}", b"null", b"[]", b"{}", b'""', b"0", b"NaN", b"-Infinity", b"\x00", b"\xff\xfe", b"\xef\xbb\xbf{}",
    b'{"model":"m"', b'{"model":"m","model":7}', b'{"model": "m", "messages": "hi"}',
    b'{"model":"m","messages":[{"role":"user","content":"\\ud800"}]}',
    b'{"model":"m","max_tokens":' + b"9" * 5000 + b"}",  # beyond Python's int-parsing limit
    json.dumps(CHAT).encode("utf-16"), json.dumps(CHAT).encode("utf-32"),
    nested(64), nested(5000), b"[" * 20000,
    b" " * (MAX_BODY + 1), b'{"model":"m","messages":[],"pad":"' + b"x" * MAX_BODY + b'"}',
)
bodies = st.one_of(
    st.binary(max_size=512),
    st.from_regex(rb"\A[\x20-\x7e]{0,200}\Z"),
    json_values.map(to_json),
    st.sampled_from(SPECIAL_BODIES),
)

# Header values as a client may really send them: visible ASCII and obs-text, inner spaces.
header_values = st.from_regex(rb"\A([\x21-\x7e\x80-\xff]([\x20-\x7e\x80-\xff]{0,40}[\x21-\x7e\x80-\xff])?)?\Z")


def one_of_bytes(*fixed: bytes) -> st.SearchStrategy[bytes]:
    return st.sampled_from(fixed) | header_values


HEADER_STRATEGIES: dict[str, st.SearchStrategy[bytes]] = {
    "content-type": one_of_bytes(
        b"application/json", b"text/plain", b"application/json; charset=utf-16", b"multipart/form-data; boundary=x",
        b"application/x-www-form-urlencoded", b"*/*", b"application/json;;;", b"text/event-stream",
    ),
    "authorization": one_of_bytes(b"Bearer", b"Bearer vk-", b"Bearer vk-abc_def", b"bearer vk-x_y", b"Basic Og==")
    | header_values.map(lambda v: b"Bearer " + v)
    | header_values.map(lambda v: b"Bearer vk-" + v),
    "x-api-key": one_of_bytes(b"vk-", b"vk-deadbeef_x", b"sk-ant-x"),
    "x-vampire-strategy": one_of_bytes(*(s.encode() for s in vampire.STRATEGIES), b"AUTO", b"auto "),
    "x-vampire-session": header_values,
    "x-vampire-node": header_values,
    "x-vampire-cache": one_of_bytes(b"hit", b"bypass"),
    "x-vampire-request-id": header_values,
    "cache-control": one_of_bytes(b"no-store", b"no-cache", b"NO-STORE, max-age=0", b"max-age=-1", b"private"),
    "accept": one_of_bytes(b"text/event-stream", b"application/json", b"*/*"),
    "accept-encoding": one_of_bytes(b"gzip", b"br", b"identity;q=0", b"*"),
    "origin": one_of_bytes(ORIGIN.encode(), b"null", b"http://elsewhere.invalid"),
    "access-control-request-method": one_of_bytes(b"POST", b"GET", b"DELETE"),
    "access-control-request-headers": one_of_bytes(b"authorization, content-type", b"*"),
    "cookie": header_values,
    "x-forwarded-for": one_of_bytes(b"10.0.0.1", b"203.0.113.9", b"::1"),
    "anthropic-version": one_of_bytes(b"2023-06-01"),
}
# Header values never end in white space: h11 refuses to send those.
header_sets = st.fixed_dictionaries({}, optional=HEADER_STRATEGIES).map(
    lambda headers: {name: value.strip(b" \t") for name, value in headers.items()}
)

path_segments = st.one_of(
    wild_text.map(lambda s: quote(s.encode("utf-8", "surrogatepass"), safe="")),
    st.sampled_from([
        "", ".", "..", "%2e%2e", "%2E%2E%2F", "%00", "%ff", "%", "%zz", "%2F", "models", "chat", "completions",
        "embeddings", "messages", "responses", "nodes", "routes", "keys", "realms", "probe", "events", "share",
        SPARE_ID, "m", "e", "vampire:auto", "m@" + SPARE_ID, "a" * 300,
    ]),
)
queries = st.one_of(
    st.just(""),
    st.lists(
        st.tuples(
            st.sampled_from(["model", "kind", "vision", "tools", "strategy", "group_by", "since", "vampire_detail", "x"])
            | wild_text,
            st.sampled_from(["", "true", "m", "chat", "auto", "nope", "day", "0001-01-01T00:00:00+14:00", "Z", "%"])
            | wild_text,
        ),
        max_size=3,
    ).map(lambda pairs: "?" + "&".join(f"{quote(k.encode('utf-8', 'surrogatepass'), safe='')}="
                                        f"{quote(v.encode('utf-8', 'surrogatepass'), safe='')}" for k, v in pairs)),
)

# Data-plane objects that look like requests but are wrong in one or more ways.
wrong_models = st.one_of(
    st.sampled_from([
        "m", "e", "vampire:auto", "M", "m@" + SPARE_ID, "m@nope", "m@", "@", "", " m", "m\x00", "\ud800", "x" * 5000,
    ]),
    wild_text, numbers, st.none(), st.booleans(), st.lists(scalars, max_size=3), st.dictionaries(keys, scalars, max_size=2),
)
contents = st.one_of(
    wild_text, json_values,
    st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "input_image", "image"]) | wild_text},
                                   optional={"text": scalars, "image_url": json_values}), max_size=3),
)
messages = st.one_of(
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"]) | scalars},
                                   optional={"content": contents, "name": scalars, "tool_calls": json_values}),
             max_size=4),
    wild_text, json_values, st.none(),
)
vampire_options = json_values | st.fixed_dictionaries(
    {}, optional={"strategy": st.sampled_from(vampire.STRATEGIES) | scalars, "cache": scalars, "coalesce": scalars},
)
wrong_requests = st.fixed_dictionaries(
    {"model": wrong_models},
    optional={
        "messages": messages, "input": st.one_of(wild_text, st.lists(wild_text, max_size=3), json_values),
        "prompt": st.one_of(wild_text, json_values), "system": contents,
        "stream": st.booleans() | scalars, "stream_options": json_values | st.just({"include_usage": True}),
        "vampire": vampire_options, "tools": json_values, "max_tokens": numbers | scalars,
        "temperature": numbers | st.just(0), "seed": numbers, "n": numbers,
        "previous_response_id": st.sampled_from(["resp_x", ""]) | scalars,
    },
)


# ── loopback-only control-plane inputs ───────────────────────────────────────────────────────────────

# Hosts that are literal loopback addresses (or no host at all), so nothing is ever resolved by DNS.
url_hosts = st.sampled_from(["127.9.9.9", "127.0.0.2", "127.200.1.1", "[::1]", "localhost", "", "[::1", "[zz]"])
url_ports = st.sampled_from(["", ":1", ":9", ":0", ":65536", ":99999", ":abc", ":-1", ":", ":1:2"])
url_schemes = st.sampled_from(["http://", "https://", "HTTP://", "", "ftp://", "//", "file://"])
url_paths = st.sampled_from(["", "/", "/v1", "/v1/", "/x/y", "/%00", "?q=1", "#tok", "#"]) | wild_text.map(
    lambda s: "/" + quote(s.encode("utf-8", "surrogatepass"))
)
node_urls = st.one_of(
    st.builds(lambda *parts: "".join(parts), url_schemes, st.sampled_from(["", "u:p@"]), url_hosts, url_ports, url_paths),
    st.sampled_from(["", " ", "#", "#token", "://", "http://", "http:///x", "ftp://x", SPARE_URL]),
    st.none(), numbers, st.lists(scalars, max_size=2), st.booleans(),
)
subnets = st.one_of(
    st.lists(st.sampled_from(["127.0.0.0/30", "127.0.0.1", "127.0.0.1/32", "::1/128", "127.0.0.0/31", "not-a-subnet",
                              "", "127.0.0.0/33", "::1/129", "127.0.0.300/32", "127.0.0.0/8"])
             | st.sampled_from([None, 1.5, True, [], {}]), min_size=1, max_size=3),
    st.sampled_from([[], "127.0.0.0/30", None, {}, 5]),
)
ports = st.one_of(
    st.lists(st.sampled_from([1, 9]) | st.sampled_from([0, -1, 65536, 2**70, True, False, "9", 9.0, None]), max_size=3),
    st.sampled_from([9, "9", None, {}]),
)
timeouts = st.one_of(st.integers(-100, 200), st.sampled_from([1e308, -1e308, "50", "abc", "nan", "inf", [], {}, None, True]),
                     st.floats(allow_nan=True, allow_infinity=True))
names = st.sampled_from(["personal", "r", "m", "e", "vampire:auto", "", "a" * 65, "a/b", "\ud800", "\x00"]) | wild_text | scalars
lists_of_names = st.lists(st.sampled_from(["m", "e", SPARE_ID, ""]) | wild_text | scalars, max_size=3) | scalars
positive_ints = st.sampled_from([1, 0, -1, 2**63, 2**1000, 1.5, "5", True]) | scalars
route_targets = st.one_of(
    st.lists(st.fixed_dictionaries({"model": st.sampled_from(["m", "e", "zz"]) | scalars},
                                   optional={"node": st.sampled_from([SPARE_ID, "nope"]) | scalars}), max_size=3),
    json_values,
)


def control_requests(rig: Rig) -> st.SearchStrategy[tuple[str, str, Any]]:
    """(method, path, body) for every mutating control-plane endpoint, with wrong-typed fields."""
    spare = f"/vampire/v1/nodes/{SPARE_ID}"
    return st.one_of(
        st.tuples(st.just("POST"), st.just("/vampire/v1/nodes"), st.fixed_dictionaries(
            {"url": node_urls},
            optional={"token": scalars, "name": names, "trusted": scalars, "tags": json_values | st.lists(scalars)},
        )),
        st.tuples(st.just("PATCH"), st.just(spare), st.fixed_dictionaries(
            {}, optional={"name": names, "trusted": scalars, "token": scalars,
                          "state": st.sampled_from(["online", "draining", "disabled", "ONLINE"]) | scalars},
        )),
        st.tuples(st.sampled_from(["DELETE", "POST"]), st.sampled_from([spare, spare + "/probe"]), json_values),
        st.tuples(st.just("POST"), st.just("/vampire/v1/discover"), st.fixed_dictionaries(
            {"subnets": subnets}, optional={"ports": ports, "timeout_ms": timeouts, "add": scalars},
        )),
        st.tuples(st.just("POST"), st.just("/vampire/v1/routes"), st.fixed_dictionaries(
            {}, optional={"id": names, "model": names, "targets": route_targets,
                          "strategy": st.sampled_from(vampire.STRATEGIES) | scalars, "fallback": names},
        )),
        st.tuples(st.just("POST"), st.just("/vampire/v1/keys"), st.fixed_dictionaries(
            {}, optional={"name": names, "realm": names, "models": lists_of_names, "rpm": positive_ints,
                          "tpm": positive_ints, "max_concurrent": positive_ints,
                          "expires_at": st.sampled_from([0, 1e308, 2**70, -1, "soon", True]) | numbers},
        )),
        st.tuples(st.just("POST"), st.just("/vampire/v1/realms"), st.fixed_dictionaries(
            {}, optional={"name": names, "nodes": lists_of_names, "models": lists_of_names, "rpm": positive_ints,
                          "tpm": positive_ints, "max_concurrent": positive_ints},
        )),
        st.tuples(st.just("PUT"), st.just("/vampire/v1/share"), st.fixed_dictionaries(
            {}, optional={"mode": st.sampled_from([*vampire.SHARE_MODES, "LOCAL", "on", ""]) | scalars},
        )),
        st.tuples(st.just("DELETE"), st.sampled_from(["/vampire/v1/cache", "/vampire/v1/keys/nope",
                                                      "/vampire/v1/routes/nope"]), json_values),
    )


def safe_for_loopback(method: str, path: str, body: bytes) -> bytes:
    """Arbitrary bodies must not send the gateway to a host name (DNS) or a scan outside 127/8: a body
    for POST /nodes or /discover that parses to an object has `url` and `subnets`/`ports` replaced."""
    route = unquote(path.partition("?")[0]).rstrip("/")
    if method != "POST" or route not in ("/vampire/v1/nodes", "/vampire/v1/discover"):
        return body
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return body  # refused by the gateway just the same
    if not isinstance(doc, dict):
        return body
    if route.endswith("/nodes"):
        doc["url"] = "http://127.9.9.9:1" if isinstance(doc.get("url"), str) else doc.get("url")
    else:
        doc["subnets"], doc["ports"] = ["127.0.0.0/30"], [9]
    return to_json(doc)


def protected(rig: Rig, method: str, path: str) -> bool:
    """Requests that would legitimately change the real node (remove, disable, rename it)."""
    real = rig.gw.app.registry.nodes[rig.node_id]
    decoded = unquote(path.partition("?")[0])
    return method in ("PATCH", "DELETE") and any(
        decoded.rstrip("/").endswith(f"/nodes/{ref}") for ref in (real.id, real.name)
    )


def fill(template: str, draw: Callable[[st.SearchStrategy[Any]], Any]) -> str:
    params = {
        "node_id": st.sampled_from([SPARE_ID, "nope", "%00", "127.9.9.9:9"]) | path_segments,
        "route_id": st.sampled_from(["r", "nope", "%2F"]) | path_segments,
        "key_id": st.sampled_from(["nope", "deadbeef"]) | path_segments,
        "model": st.sampled_from(["m", "e", "vampire:auto", "nope", "m@" + SPARE_ID, "a/b", ""]) | path_segments,
    }
    return re.sub(r"\{(\w+)(?::\w+)?\}", lambda m: draw(params[m.group(1)]), template)


# ── the properties ─────────────────────────────────────────────────────────────────────────────────────


def exchange(rig: Rig, method: str, path: str, headers: dict[str, bytes], body: bytes) -> None:
    body = safe_for_loopback(method, path, body)
    assume(not protected(rig, method, path))
    what = describe(method, path, headers, body)
    try:
        judge(send(rig, method, path, headers, body), method, path, headers, body)
    finally:
        after_example(rig, method, what)


def test_every_known_route_takes_random_methods_headers_and_bodies(rig: Rig) -> None:
    templates = [*rig.routes, *DATA_PATHS, *OTHER_PATHS]

    @FUZZ
    @given(data=st.data(), method=st.sampled_from(METHODS), headers=header_sets, body=bodies, query=queries)
    def run(data: st.DataObject, method: str, headers: dict[str, bytes], body: bytes, query: str) -> None:
        path = fill(data.draw(st.sampled_from(templates), label="route"), data.draw)
        exchange(rig, method, path + query, headers, body)

    run()
    assert_intact(rig)


def test_data_plane_takes_plausible_but_wrong_requests(rig: Rig) -> None:
    @FUZZ
    @given(
        path=st.sampled_from([p for p in DATA_PATHS if "{" not in p]),
        request=wrong_requests,
        headers=header_sets,
        query=queries,
    )
    def run(path: str, request: dict[str, Any], headers: dict[str, bytes], query: str) -> None:
        exchange(rig, "POST", path + query, headers, to_json(request))

    run()
    assert_intact(rig)


def test_random_paths_and_methods_under_every_prefix(rig: Rig) -> None:
    @FUZZ
    @given(
        prefix=st.sampled_from(["/v1/", "/vampire/v1/", "/api/", "/vampire/", "/", "/V1/", "//v1/"]),
        segments=st.lists(path_segments, max_size=5),
        query=queries,
        method=st.sampled_from(METHODS),
        headers=header_sets,
        body=bodies,
    )
    def run(prefix: str, segments: list[str], query: str, method: str, headers: dict[str, bytes], body: bytes) -> None:
        exchange(rig, method, prefix + "/".join(segments) + query, headers, body)

    run()
    assert_intact(rig)


def test_control_plane_takes_wrong_typed_fields(rig: Rig) -> None:
    @FUZZ
    @given(request=control_requests(rig), headers=header_sets)
    def run(request: tuple[str, str, Any], headers: dict[str, bytes]) -> None:
        method, path, body = request
        exchange(rig, method, path, headers, to_json(body))

    run()
    assert_intact(rig)


def test_control_plane_queries_take_garbage(rig: Rig) -> None:
    @FUZZ
    @given(
        path=st.sampled_from(["/vampire/v1/routing/explain", "/vampire/v1/usage", "/vampire/v1/models", "/v1/models"]),
        query=queries,
        headers=header_sets,
    )
    def run(path: str, query: str, headers: dict[str, bytes]) -> None:
        exchange(rig, "GET", path + query, headers, b"")

    run()
    assert_intact(rig)
