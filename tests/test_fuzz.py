"""Property-based robustness: malformed bodies, headers, paths and methods thrown at every endpoint.

One gateway (no admin token, so loopback may use the control plane) in front of one healthy emulated node.
Whatever arrives, the gateway answers below 500 (or with a 503 whose reason is justified), shows no
traceback, wraps every 4xx of its own in a well-formed error envelope, and keeps its state intact.

Each example sends one request, then undoes what that request legitimately changed (share mode, added
nodes, routes, keys, realms) and waits until nothing is in flight. The real node is never the target of
PATCH or DELETE; a spare node, offline by design, is.

Nothing here reaches beyond 127.0.0.0/8: node URLs and discovery subnets are drawn from loopback
addresses or from strings that fail before any host name is resolved.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, unquote

import httpx
import pytest
from conftest import LoopThread, RunningGateway, start_gateway, wait_until
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

import vampire

T = TypeVar("T")

MODELS = "m:llm:loaded,e:embedding:loaded"
SPARE_URL = "http://127.9.9.9:9"  # nothing listens there
SPARE_ID = vampire.node_id_for(SPARE_URL)
ORIGIN = "http://127.0.0.1:9"  # the one browser origin the gateway allows
MAX_BODY = 64 * 1024
TIMEOUT = 15.0  # a request unanswered for this long is reported as a hang
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD")
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
MARKERS = (b"Traceback", b'File "')
# What a request may have stored must still render: the data plane writes the usage ledger and the audit
# log (refusals); the control plane writes everything else.
DATA_LISTINGS = ("/vampire/v1/usage", "/vampire/v1/audit")
LISTINGS = (
    "/vampire/v1/status",
    "/vampire/v1/nodes",
    "/vampire/v1/models",
    "/vampire/v1/routes",
    "/vampire/v1/keys",
    "/vampire/v1/realms",
    "/vampire/v1/share",
    "/vampire/v1/usage",
    "/vampire/v1/audit",
    "/",
)
# A 503 is acceptable only for these reasons (code -> the message it carries); the node is healthy, so
# no_node_available, queue_full, queue_timeout and circuit_open are not.
ALLOWED_503 = {
    # a pin (`model@node`) naming the spare node, which is offline by design
    "node_unavailable": re.compile(
        r"\ANode `.*` is (offline|unknown|unauthorized|draining|disabled|not trusted)\.\Z", re.S
    ),
}


def known_routes() -> dict[str, frozenset[str]]:
    """Every route: the control plane's own table, the data-plane paths, health and metrics."""
    plane = vampire.ControlPlane.__new__(vampire.ControlPlane)  # only the route table is read
    routes: dict[str, frozenset[str]] = {}
    for route in plane.routes():
        routes[route.path] = routes.get(route.path, frozenset()) | frozenset(route.methods or METHODS)
    data = {path: frozenset({"POST"}) for path in vampire._KIND_BY_PATH}
    return (
        routes
        | data
        | {
            "/v1/models": frozenset({"GET"}),
            "/v1/models/{model}": frozenset({"GET"}),
            "/healthz": frozenset({"GET"}),
            "/metrics": frozenset({"GET"}),
        }
    )


ROUTES = known_routes()
DATA_PATHS = sorted(vampire._KIND_BY_PATH)


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


# ── the rig: one gateway, one healthy node, one spare node ──────────────────────────────────────────────


@dataclass
class Rig:
    bg: LoopThread
    gw: RunningGateway
    node: Any
    http: httpx.Client
    node_id: str = ""
    node_fields: tuple[Any, ...] = ()
    spare_fields: tuple[Any, ...] = ()

    def on_loop(self, fn: Callable[[], T]) -> T:
        """Read or change gateway state on its own loop, never while it runs a request's code."""

        async def call() -> T:
            return fn()

        return self.bg.run(call())

    def url(self, path: str) -> str:
        return self.gw.url + path

    def reconnect(self) -> None:
        """After a 5xx the server may drop the connection; the next example must not inherit that."""
        self.http.close()
        self.http = httpx.Client(timeout=TIMEOUT)


def node_fields(node: vampire.Node) -> tuple[Any, ...]:
    return (node.url, node.name, node.trusted, node.admin_state, node.token, list(node.tags), node.source)


@pytest.fixture(scope="module")
def rig(bg: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    node = vampire.MockNode(vampire.parse_model_specs(MODELS))
    bg.run(node.start("127.0.0.1", 0))
    gw = start_gateway(
        bg, tmp_path_factory.mktemp("fuzz"), [node.url], max_body_bytes=MAX_BODY, cors_origins=[ORIGIN]
    )
    r = Rig(bg, gw, node, httpx.Client(timeout=TIMEOUT))
    try:
        wait_until(lambda: any(n.health == "online" for n in gw.app.registry.nodes.values()))
        (real,) = gw.app.registry.nodes.values()
        r.node_id, r.node_fields = real.id, node_fields(real)
        add_spare(r)
        yield r
    finally:
        r.http.close()
        gw.stop()
        bg.run(node.stop())


def add_spare(rig: Rig) -> None:
    resp = rig.http.post(rig.url("/vampire/v1/nodes"), json={"url": SPARE_URL})
    assert resp.status_code == 201, resp.text
    rig.spare_fields = rig.on_loop(lambda: node_fields(rig.gw.app.registry.nodes[SPARE_ID]))


# ── one request, and the property its answer must hold ──────────────────────────────────────────────────


@dataclass
class Answer:
    status: int
    headers: httpx.Headers
    body: bytes
    streamed: bool = False  # an endless event stream: only its head was read


def describe(method: str, path: str, headers: dict[str, bytes], body: bytes) -> str:
    more = "…" if len(body) > 600 else ""
    return f"{method} {path} headers={headers!r} body={body[:600]!r}{more}"


def route_of(path: str) -> str:
    return unquote(path.partition("?")[0])


def send(rig: Rig, method: str, path: str, headers: dict[str, bytes], body: bytes) -> Answer:
    what = describe(method, path, headers, body)
    if currently_in_test_context():
        note(what)
    try:
        if route_of(path).rstrip("/") == "/vampire/v1/events":
            # An event stream never ends: it gets a connection of its own, closed once the head is read.
            with (
                httpx.Client(timeout=TIMEOUT) as one,
                one.stream(method, rig.url(path), headers=headers, content=body) as resp,
            ):
                if resp.status_code == 200 and method != "HEAD":
                    assert resp.headers.get("content-type", "").startswith("text/event-stream"), what
                    return Answer(resp.status_code, resp.headers, b"", streamed=True)
                return Answer(resp.status_code, resp.headers, resp.read())
        resp = rig.http.request(method, rig.url(path), headers=headers, content=body)
    except httpx.TimeoutException:
        raise AssertionError(f"no answer within {TIMEOUT}s (hang): {what}") from None
    except httpx.TransportError as exc:
        rig.reconnect()
        raise AssertionError(f"connection dropped ({exc!r}): {what}") from None
    if resp.status_code >= 500:
        rig.reconnect()
    return Answer(resp.status_code, resp.headers, resp.content)


def openai_envelope(doc: Any) -> bool:
    if not (isinstance(doc, dict) and set(doc) == {"error"} and isinstance(doc["error"], dict)):
        return False
    err = doc["error"]
    return (
        set(err) == {"message", "type", "param", "code"}
        and isinstance(err["message"], str)
        and bool(err["message"])
        and isinstance(err["type"], str)
        and bool(err["type"])
        and (err["param"] is None or isinstance(err["param"], str))
        and (err["code"] is None or isinstance(err["code"], str))
    )


def anthropic_envelope(doc: Any) -> bool:
    return (
        isinstance(doc, dict)
        and set(doc) == {"type", "error"}
        and doc["type"] == "error"
        and isinstance(doc["error"], dict)
        and set(doc["error"]) == {"type", "message"}
        and isinstance(doc["error"]["type"], str)
        and bool(doc["error"]["type"])
        and isinstance(doc["error"]["message"], str)
        and bool(doc["error"]["message"])
    )


def judge(answer: Answer, method: str, path: str, headers: dict[str, bytes], body: bytes) -> None:
    """No 5xx but a justified 503, no traceback, and every error of the gateway's own in an envelope."""
    what = f"{describe(method, path, headers, body)} -> {answer.status} {answer.body[:400]!r}"
    relayed = "x-vampire-node" in answer.headers  # the node's own answer, passed through
    anthropic = route_of(path) == "/v1/messages"
    try:
        doc = json.loads(answer.body) if answer.body else None
    except ValueError:
        doc = None
    if answer.status >= 500:
        assert answer.status == 503, f"server error{' relayed from the node' if relayed else ''}: {what}"
        if anthropic:
            message = doc["error"]["message"] if anthropic_envelope(doc) else ""
            assert any(p.match(message) for p in ALLOWED_503.values()), f"unjustified 503: {what}"
        else:
            code = doc["error"]["code"] if openai_envelope(doc) else None
            assert code in ALLOWED_503, f"unjustified 503 ({code}): {what}"
            assert ALLOWED_503[code].match(doc["error"]["message"]), f"unjustified 503 ({code}): {what}"
    echoed = (path + repr(headers)).encode() + body  # an error message may quote the request back
    for marker in MARKERS:
        assert marker in echoed or marker not in answer.body, f"traceback in the answer: {what}"
    if answer.status >= 400 and not relayed and method != "HEAD" and not answer.streamed:
        well_formed = anthropic_envelope(doc) if anthropic else openai_envelope(doc)
        assert well_formed, f"malformed error envelope: {what}"


# ── state: restored after every example, verified after every test ─────────────────────────────────────


def idle(rig: Rig) -> bool:
    app = rig.gw.app

    def check() -> bool:
        return (
            not app.gateway.running
            and not app.admission.waiters
            and not app.gateway.coalescer.flights
            and not app.events.listened
            and all(
                n.in_flight == 0 and not any(n.busy.values()) and not n.warming
                for n in app.registry.nodes.values()
            )
            and all(q.active == 0 for q in app.policy._quotas.values())
        )

    return rig.on_loop(check)


def listings_answer(rig: Rig, after: str, listings: tuple[str, ...] = LISTINGS) -> None:
    """Whatever a request stored, every listing still renders."""
    for path in listings:
        resp = rig.http.get(rig.url(path))
        if resp.status_code >= 500:
            rig.reconnect()
        assert resp.status_code == 200, f"GET {path} -> {resp.status_code} {resp.text[:300]!r} after {after}"


def dead_tasks(rig: Rig) -> list[str]:
    """The gateway's background loops (health probes, ledger and audit flushing) must outlive any request."""
    return rig.on_loop(
        lambda: [
            f"{t.get_coro().__qualname__}: {t.exception()!r}"
            for t in rig.gw.app._tasks
            if t.done() and not t.cancelled()
        ]
    )


def revive(rig: Rig) -> None:
    """Restart a background loop that died, so one failure does not spill into later examples."""
    app = rig.gw.app

    def restart() -> None:
        for i, task in enumerate(app._tasks):
            if task.done():
                name = task.get_coro().__name__
                owner = app.registry if hasattr(app.registry, name) else app.accounting
                app._tasks[i] = asyncio.get_running_loop().create_task(getattr(owner, name)())

    rig.on_loop(restart)


def restore(rig: Rig) -> None:
    """Undo what an example legitimately changed; the real node must never have been touched."""
    app = rig.gw.app
    if dead_tasks(rig):
        revive(rig)

    def view() -> tuple[str, dict[str, tuple[Any, ...]], bool, dict[str, Any], list[str], bool]:
        return (
            app.policy.share,
            {i: node_fields(n) for i, n in app.registry.nodes.items()},
            bool(app.router.routes),
            app.policy.realms[vampire.DEFAULT_REALM].public(),
            list(app.policy.keys),
            len(app.policy.realms) > 1,
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
    if nodes.get(SPARE_ID) != rig.spare_fields:
        add_spare(rig)
    for key_id in keys:
        assert rig.http.delete(rig.url(f"/vampire/v1/keys/{quote(key_id, safe='')}")).status_code == 200
    if personal != vampire.Realm(vampire.DEFAULT_REALM).public():
        assert (
            rig.http.post(rig.url("/vampire/v1/realms"), json={"name": vampire.DEFAULT_REALM}).status_code
            == 201
        )
    if routes or realms:
        # A route id may hold `/` or a lone surrogate, which no URL can name (nor SQLite store), and no
        # endpoint deletes a realm: both are dropped where they live.
        def drop() -> None:
            for route_id in list(app.router.routes):
                del app.router.routes[route_id]
                with contextlib.suppress(UnicodeError):
                    app.store.delete_route(route_id)
            for name in [n for n in app.policy.realms if n != vampire.DEFAULT_REALM]:
                del app.policy.realms[name]

        rig.on_loop(drop)
    wait_until(lambda: idle(rig), timeout=10)


def assert_intact(rig: Rig) -> None:
    """After a run: exactly the original node, online; chat answers; nothing in flight or queued."""
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
        app = rig.gw.app
        real = app.registry.nodes[rig.node_id]
        assert real.in_flight == 0 and not any(real.busy.values())
        assert not app.admission.waiters and not app.gateway.coalescer.flights and not app.gateway.running
    finally:
        add_spare(rig)


def safe_for_loopback(method: str, path: str, body: bytes) -> bytes:
    """An arbitrary body must not send the gateway to a host name (DNS) or scan outside 127/8: a body for
    POST /nodes or /discover that parses to an object has its `url`, `subnets` and `ports` replaced."""
    route = route_of(path).rstrip("/")
    if method != "POST" or route not in ("/vampire/v1/nodes", "/vampire/v1/discover"):
        return body
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return body  # the gateway cannot read it either
    if not isinstance(doc, dict):
        return body
    if route.endswith("/nodes"):
        if isinstance(doc.get("url"), str):
            doc["url"] = "http://127.9.9.8:9"
    else:
        doc["subnets"], doc["ports"] = ["127.0.0.0/30"], [9]
    return to_json(doc)


def targets_real_node(rig: Rig, method: str, path: str) -> bool:
    """PATCH or DELETE of the real node would legitimately disable or remove it."""
    real = rig.gw.app.registry.nodes[rig.node_id]
    route = route_of(path).rstrip("/")
    return method in ("PATCH", "DELETE") and any(
        route.endswith(f"/nodes/{ref}") for ref in (real.id, real.name)
    )


def exchange(
    rig: Rig, method: str, path: str, headers: dict[str, bytes], body: bytes, *, arbitrary: bool = True
) -> None:
    """One example: send, judge, check that what it stored still renders, then restore the state. An
    arbitrary body is first kept on loopback; built ones (typed fields, fixed cases) are loopback-only already."""
    if arbitrary:
        body = safe_for_loopback(method, path, body)
    if targets_real_node(rig, method, path):
        if not currently_in_test_context():
            pytest.fail(f"{method} {path} would change the real node")
        assume(False)
    what = describe(method, path, headers, body)
    try:
        answer = send(rig, method, path, headers, body)
        judge(answer, method, path, headers, body)
        if route_of(path).startswith("/v1/"):
            if method == "POST" or answer.status in (401, 403):
                listings_answer(rig, what, DATA_LISTINGS)
        elif method in MUTATING:
            listings_answer(rig, what)
        dead = dead_tasks(rig)
        assert not dead, f"a background task of the gateway died: {dead} after {what}"
    finally:
        restore(rig)


# ── strategies ───────────────────────────────────────────────────────────────────────────────────────────


def to_json(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()  # NaN and Infinity as Python writes them


def mostly(usual: st.SearchStrategy[T], odd: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """The usual value three times in four: one wrong field at a time reaches deeper than all wrong."""
    return st.one_of(usual, usual, usual, odd)


# Every code point (NUL included) plus lone surrogates, which JSON carries as \udXXX escapes.
wild_text = st.text(st.characters(exclude_categories=()), max_size=24) | st.sampled_from(
    ["\ud800", "a\udfff", "\x00", "\u202e", "é", "😀", "a" * 300]
)
huge_ints = st.sampled_from([2**63, -(2**63) - 1, 2**64, 10**30, -(10**40), 2**1000])
numbers = st.integers() | huge_ints | st.floats()
scalars = st.none() | st.booleans() | numbers | wild_text
KNOWN_KEYS = (
    "model",
    "messages",
    "input",
    "prompt",
    "stream",
    "stream_options",
    "include_usage",
    "vampire",
    "tools",
    "max_tokens",
    "temperature",
    "seed",
    "previous_response_id",
    "system",
    "role",
    "content",
    "type",
    "image_url",
    "name",
    "mode",
    "id",
    "targets",
    "strategy",
    "fallback",
    "realm",
    "models",
    "nodes",
    "rpm",
    "tpm",
    "max_concurrent",
    "expires_at",
    "state",
    "trusted",
    "token",
    "tags",
    "add",
    "cache",
    "coalesce",
)
json_values = st.recursive(
    scalars,
    lambda kids: (
        st.lists(kids, max_size=4)
        | st.dictionaries(st.sampled_from(KNOWN_KEYS) | wild_text, kids, max_size=5)
    ),
    max_leaves=16,
)


def nested(depth: int) -> bytes:
    return b'{"model":"m","messages":' + b"[" * depth + b"]" * depth + b"}"


SPECIAL_BODIES = (
    b"",
    b"{",
    b"}",
    b"null",
    b"[]",
    b"{}",
    b'""',
    b"0",
    b"NaN",
    b"-Infinity",
    b"\x00",
    b"\xff\xfe",
    b"\xef\xbb\xbf{}",
    b'{"model":"m"',
    b'{"model":"m","model":7}',
    b'{"model": "m", "messages": "hi"}',
    b'{"model":"m","messages":[{"role":"user","content":"\\ud800"}]}',
    b'{"model":"m","max_tokens":' + b"9" * 5000 + b"}",  # beyond Python's int-parsing limit
    json.dumps(CHAT).encode("utf-16"),
    json.dumps(CHAT).encode("utf-32"),
    nested(64),
    nested(5000),
    b"[" * 20000,
    b'{"a":' * 5000,
    b" " * (MAX_BODY + 1),
    b'{"model":"m","messages":[],"pad":"' + b"x" * MAX_BODY + b'"}',
)
bodies = st.one_of(
    st.binary(max_size=512),
    st.from_regex(rb"\A[\x20-\x7e]{0,200}\Z"),
    json_values.map(to_json),
    st.sampled_from(SPECIAL_BODIES),
    st.sampled_from(SPECIAL_BODIES),
)

# Header values as a client can really send them: visible ASCII and obs-text, inner spaces only.
header_values = st.from_regex(
    rb"\A([\x21-\x7e\x80-\xff]([\x20-\x7e\x80-\xff]{0,40}[\x21-\x7e\x80-\xff])?)?\Z"
)


def one_of_bytes(*fixed: bytes) -> st.SearchStrategy[bytes]:
    return st.sampled_from(fixed) | header_values


HEADER_STRATEGIES: dict[str, st.SearchStrategy[bytes]] = {
    "content-type": one_of_bytes(
        b"application/json",
        b"text/plain",
        b"application/json; charset=utf-16",
        b"multipart/form-data; boundary=x",
        b"application/x-www-form-urlencoded",
        b"*/*",
        b"application/json;;;",
        b"text/event-stream",
    ),
    "authorization": one_of_bytes(
        b"Bearer", b"Bearer vk-", b"Bearer vk-abc_def", b"bearer vk-x_y", b"Basic Og=="
    )
    | header_values.map(lambda v: b"Bearer " + v)
    | header_values.map(lambda v: b"Bearer vk-" + v),
    "x-api-key": one_of_bytes(b"vk-", b"vk-deadbeef_x", b"sk-ant-x"),
    "x-vampire-strategy": one_of_bytes(*(s.encode() for s in vampire.STRATEGIES), b"AUTO"),
    "x-vampire-session": header_values,
    "x-vampire-node": header_values,
    "x-vampire-cache": one_of_bytes(b"hit", b"bypass"),
    "x-vampire-request-id": header_values,
    "cache-control": one_of_bytes(
        b"no-store", b"no-cache", b"NO-STORE, max-age=0", b"max-age=-1", b"private"
    ),
    "accept": one_of_bytes(b"text/event-stream", b"application/json", b"*/*"),
    "accept-encoding": one_of_bytes(b"gzip", b"br", b"identity;q=0", b"*"),
    "origin": one_of_bytes(ORIGIN.encode(), b"null", b"http://elsewhere.invalid"),
    "access-control-request-method": one_of_bytes(b"POST", b"GET", b"DELETE"),
    "access-control-request-headers": one_of_bytes(b"authorization, content-type", b"*"),
    "cookie": header_values,
    "x-forwarded-for": one_of_bytes(b"10.0.0.1", b"203.0.113.9", b"::1"),
    "anthropic-version": one_of_bytes(b"2023-06-01"),
}
# h11 refuses to send a header value that ends in white space.
header_sets = st.fixed_dictionaries({}, optional=HEADER_STRATEGIES).map(
    lambda headers: {name: value.strip(b" \t") for name, value in headers.items()}
)


def url_quote(text: str) -> str:
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


path_segments = st.one_of(
    wild_text.map(url_quote),
    st.sampled_from(
        [
            "",
            ".",
            "..",
            "%2e%2e",
            "%2E%2E%2F",
            "%00",
            "%ff",
            "%",
            "%zz",
            "%2F",
            "models",
            "chat",
            "completions",
            "embeddings",
            "messages",
            "responses",
            "nodes",
            "routes",
            "keys",
            "realms",
            "probe",
            "events",
            "share",
            SPARE_ID,
            "m",
            "e",
            "vampire:auto",
            "m@" + SPARE_ID,
            "a" * 300,
        ]
    ),
)
query_keys = st.sampled_from(
    ["model", "kind", "vision", "tools", "strategy", "group_by", "since", "vampire_detail"]
)
query_values = st.sampled_from(
    [
        "",
        "true",
        "m",
        "e",
        "chat",
        "embedding",
        "auto",
        "nope",
        "day",
        "key",
        "0001-01-01T00:00:00+14:00",
        "9999-12-31T23:59:59-14:00",
        "Z",
        "%",
        "m@" + SPARE_ID,
        "vampire:auto",
    ]
)
queries = st.one_of(
    st.just(""),
    st.lists(st.tuples(query_keys | wild_text, query_values | wild_text), max_size=4).map(
        lambda pairs: "?" + "&".join(f"{url_quote(k)}={url_quote(v)}" for k, v in pairs)
    ),
)
PARAMS = {
    "node_id": st.sampled_from([SPARE_ID, "nope", "127.9.9.9:9"]) | path_segments,
    "route_id": st.sampled_from(["r", "nope"]) | path_segments,
    "key_id": st.sampled_from(["nope", "deadbeef"]) | path_segments,
    "model": st.sampled_from(["m", "e", "vampire:auto", "nope", "m@" + SPARE_ID, "a/b", "m@nope"])
    | path_segments,
}

# Data-plane requests that look right but are wrong in one or more ways.
wrong_models = st.one_of(
    st.sampled_from(
        ["m", "e", "vampire:auto", "M", "m@" + SPARE_ID, "m@nope", "m@", "@", "", " m", "m\x00", "\ud800"]
    ),
    wild_text,
    numbers,
    st.none(),
    st.booleans(),
    st.lists(scalars, max_size=3),
    st.dictionaries(st.sampled_from(KNOWN_KEYS), scalars, max_size=2),
)
contents = st.one_of(
    wild_text,
    json_values,
    st.lists(
        st.fixed_dictionaries(
            {"type": st.sampled_from(["text", "image_url", "input_image", "image"]) | wild_text},
            optional={"text": scalars, "image_url": json_values},
        ),
        max_size=3,
    ),
)
messages = mostly(
    st.lists(
        st.fixed_dictionaries(
            {"role": mostly(st.sampled_from(["user", "system", "assistant", "tool"]), scalars)},
            optional={"content": contents, "name": scalars, "tool_calls": json_values},
        ),
        max_size=4,
    ),
    wild_text | json_values,
)
wrong_requests = st.fixed_dictionaries(
    {"model": mostly(st.sampled_from(["m", "e", "vampire:auto"]), wrong_models)},
    optional={
        "messages": messages,
        "input": st.one_of(wild_text, st.lists(wild_text, max_size=3), json_values),
        "prompt": wild_text | json_values,
        "system": contents,
        "stream": st.booleans() | scalars,
        "stream_options": st.just({"include_usage": True}) | json_values,
        "vampire": json_values
        | st.fixed_dictionaries(
            {},
            optional={
                "strategy": st.sampled_from(vampire.STRATEGIES) | scalars,
                "cache": scalars,
                "coalesce": scalars,
            },
        ),
        "tools": json_values,
        "max_tokens": numbers | scalars,
        "temperature": st.just(0) | numbers,
        "seed": numbers,
        "n": numbers,
        "previous_response_id": st.sampled_from(["resp_x", ""]) | scalars,
    },
)

# Control-plane fields. Node URLs have loopback literals for hosts (or none): nothing is resolved by DNS.
url_hosts = st.sampled_from(
    ["127.9.9.7", "127.0.0.2", "127.200.1.1", "[::1]", "localhost", "", "[::1", "[zz]"]
)
url_ports = st.sampled_from(["", ":1", ":9", ":0", ":65536", ":99999", ":abc", ":-1", ":", ":1:2"])
url_schemes = st.sampled_from(["http://", "https://", "HTTP://", "", "ftp://", "//", "file://"])
url_paths = st.sampled_from(["", "/", "/v1", "/v1/", "/x/y", "/%00", "?q=1", "#tok", "#"]) | wild_text.map(
    lambda s: "/" + url_quote(s)
)
odd_urls = st.builds(
    lambda *parts: "".join(parts), url_schemes, st.sampled_from(["", "u:p@"]), url_hosts, url_ports, url_paths
)
node_urls = st.one_of(
    st.builds(
        lambda host, port, path: f"http://{host}{port}{path}",
        st.sampled_from(["127.9.9.7", "[::1]"]),
        st.sampled_from([":1", ":9"]),
        url_paths,
    ),
    odd_urls,
    odd_urls,
    st.sampled_from(["", " ", "#", "#token", "://", "http://", "http:///x", "ftp://x", SPARE_URL]),
    st.none() | numbers | st.lists(scalars, max_size=2) | st.booleans(),
)
subnet_lists = mostly(
    st.just(["127.0.0.0/30"]),
    st.one_of(
        st.lists(
            st.sampled_from(
                [
                    "127.0.0.0/30",
                    "127.0.0.1",
                    "127.0.0.1/32",
                    "::1/128",
                    "127.0.0.0/31",
                    "nope",
                    "",
                    "127.0.0.0/33",
                    "::1/129",
                    "127.0.0.300/32",
                    "127.0.0.0/8",
                    None,
                    1.5,
                    True,
                    [],
                    {},
                ]
            ),
            min_size=1,
            max_size=3,
        ),
        st.sampled_from([[], "127.0.0.0/30", None, {}, 5]),
    ),
)
port_lists = mostly(
    st.lists(st.sampled_from([1, 9]), min_size=1, max_size=2),
    st.one_of(
        st.lists(
            st.sampled_from([9, 0, -1, 65536, 99999, 2**70, True, False, "9", 9.0, None]),
            min_size=1,
            max_size=3,
        ),
        st.sampled_from([9, "9", None, {}]),
    ),
)
timeouts = mostly(
    st.integers(0, 100),
    st.sampled_from([-100, 1e308, -1e308, "50", "abc", "nan", "inf", [], {}, None, True]) | st.floats(),
)
names = mostly(
    wild_text, st.sampled_from(["personal", "", "a" * 65, "a/b", "vampire:auto", "m"]) | scalars | json_values
)
realm_names = mostly(st.from_regex(r"\A[A-Za-z0-9_.-]{1,64}\Z"), names)
name_lists = mostly(
    st.lists(mostly(st.sampled_from(["m", "e", SPARE_ID]), wild_text), max_size=3), scalars | json_values
)
limits = mostly(
    st.integers(1, 1000), st.sampled_from([0, -1, 2**63, 2**1000, 1.5, "5", True, None]) | scalars
)
route_targets = mostly(
    st.lists(
        st.fixed_dictionaries(
            {"model": mostly(st.sampled_from(["m", "e", "zz"]), wild_text | scalars)},
            optional={"node": st.sampled_from([SPARE_ID, "nope"]) | scalars},
        ),
        min_size=1,
        max_size=3,
    ),
    json_values,
)
SPARE_PATH = f"/vampire/v1/nodes/{SPARE_ID}"
# (method, path, body) for every control-plane endpoint that reads a body.
CONTROL_BODIES: dict[str, st.SearchStrategy[tuple[str, str, Any]]] = {
    "add-node": st.tuples(
        st.just("POST"),
        st.just("/vampire/v1/nodes"),
        st.fixed_dictionaries(
            {"url": node_urls},
            optional={
                "token": scalars,
                "name": names,
                "trusted": scalars,
                "tags": mostly(st.lists(wild_text), json_values),
            },
        ),
    ),
    "patch-node": st.tuples(
        st.just("PATCH"),
        st.just(SPARE_PATH),
        st.fixed_dictionaries(
            {},
            optional={
                "name": names,
                "trusted": scalars,
                "token": scalars,
                "state": mostly(
                    st.sampled_from(["online", "draining", "disabled"]), st.just("ONLINE") | scalars
                ),
            },
        ),
    ),
    "delete-or-probe-node": st.tuples(
        st.sampled_from(["DELETE", "POST"]), st.sampled_from([SPARE_PATH, SPARE_PATH + "/probe"]), json_values
    ),
    "discover": st.tuples(
        st.just("POST"),
        st.just("/vampire/v1/discover"),
        st.fixed_dictionaries(
            {"subnets": subnet_lists},
            optional={"ports": port_lists, "timeout_ms": timeouts, "add": scalars},
        ),
    ),
    "save-route": st.tuples(
        st.just("POST"),
        st.just("/vampire/v1/routes"),
        st.fixed_dictionaries(
            {"id": names, "targets": route_targets},
            optional={
                "model": names,
                "strategy": mostly(st.sampled_from(vampire.STRATEGIES), scalars),
                "fallback": names,
            },
        ),
    ),
    "create-key": st.tuples(
        st.just("POST"),
        st.just("/vampire/v1/keys"),
        st.fixed_dictionaries(
            {"name": names},
            optional={
                "realm": mostly(st.just(vampire.DEFAULT_REALM), names),
                "models": name_lists,
                "rpm": limits,
                "tpm": limits,
                "max_concurrent": limits,
                "expires_at": mostly(
                    st.integers(0, 2**40), st.sampled_from([1e308, 2**70, "soon", True]) | numbers
                ),
            },
        ),
    ),
    "save-realm": st.tuples(
        st.just("POST"),
        st.just("/vampire/v1/realms"),
        st.fixed_dictionaries(
            {"name": realm_names},
            optional={
                "nodes": name_lists,
                "models": name_lists,
                "rpm": limits,
                "tpm": limits,
                "max_concurrent": limits,
            },
        ),
    ),
    "put-share": st.tuples(
        st.just("PUT"),
        st.just("/vampire/v1/share"),
        st.fixed_dictionaries(
            {},
            optional={
                "mode": mostly(
                    st.sampled_from(vampire.SHARE_MODES), st.sampled_from(["LOCAL", "on", ""]) | scalars
                ),
            },
        ),
    ),
    "deletes": st.tuples(
        st.just("DELETE"),
        st.sampled_from(["/vampire/v1/cache", "/vampire/v1/keys/nope", "/vampire/v1/routes/nope"]),
        json_values,
    ),
}


# ── the properties ─────────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("template", sorted(ROUTES))
def test_every_known_route_takes_random_methods_headers_and_bodies(rig: Rig, template: str) -> None:
    allowed = sorted(ROUTES[template])

    @fuzz(30)
    @given(
        data=st.data(),
        method=mostly(st.sampled_from(allowed), st.sampled_from(METHODS)),
        headers=header_sets,
        body=bodies,
        query=queries,
    )
    def run(data: st.DataObject, method: str, headers: dict[str, bytes], body: bytes, query: str) -> None:
        path = re.sub(
            r"\{(\w+)(?::\w+)?\}", lambda m: data.draw(PARAMS[m.group(1)], label=m.group(1)), template
        )
        exchange(rig, method, path + query, headers, body)

    run()
    assert_intact(rig)


@pytest.mark.parametrize("path", DATA_PATHS)
def test_data_plane_takes_plausible_but_wrong_requests(rig: Rig, path: str) -> None:
    @fuzz(80)
    @given(request=wrong_requests, headers=header_sets, query=queries)
    def run(request: dict[str, Any], headers: dict[str, bytes], query: str) -> None:
        exchange(rig, "POST", path + query, headers, to_json(request))

    run()
    assert_intact(rig)


@pytest.mark.parametrize("path", DATA_PATHS)
def test_data_plane_takes_malformed_bodies(rig: Rig, path: str) -> None:
    @fuzz(30)
    @given(body=bodies, headers=header_sets)
    def run(body: bytes, headers: dict[str, bytes]) -> None:
        exchange(rig, "POST", path, headers, body)

    run()
    assert_intact(rig)


@pytest.mark.parametrize("prefix", ["/v1/", "/vampire/v1/", "/api/", "/vampire/", "/", "/V1/", "//v1/"])
def test_random_paths_and_methods_under_every_prefix(rig: Rig, prefix: str) -> None:
    @fuzz(30)
    @given(
        segments=st.lists(path_segments, max_size=5),
        query=queries,
        method=st.sampled_from(METHODS),
        headers=header_sets,
        body=bodies,
    )
    def run(segments: list[str], query: str, method: str, headers: dict[str, bytes], body: bytes) -> None:
        exchange(rig, method, prefix + "/".join(segments) + query, headers, body)

    run()
    assert_intact(rig)


@pytest.mark.parametrize("endpoint", sorted(CONTROL_BODIES))
def test_control_plane_takes_wrong_typed_fields(rig: Rig, endpoint: str) -> None:
    @fuzz(60)
    @given(request=CONTROL_BODIES[endpoint], headers=header_sets)
    def run(request: tuple[str, str, Any], headers: dict[str, bytes]) -> None:
        method, path, body = request
        exchange(rig, method, path, headers, to_json(body), arbitrary=False)

    run()
    assert_intact(rig)


@pytest.mark.parametrize("endpoint", sorted(CONTROL_BODIES))
def test_control_plane_takes_malformed_bodies(rig: Rig, endpoint: str) -> None:
    @fuzz(20)
    @given(request=CONTROL_BODIES[endpoint], body=bodies, headers=header_sets)
    def run(request: tuple[str, str, Any], body: bytes, headers: dict[str, bytes]) -> None:
        method, path, _ = request
        exchange(rig, method, path, headers, body)

    run()
    assert_intact(rig)


@pytest.mark.parametrize(
    "path", ["/vampire/v1/routing/explain", "/vampire/v1/usage", "/v1/models", "/v1/models/{model}"]
)
def test_queries_take_garbage(rig: Rig, path: str) -> None:
    @fuzz(40)
    @given(data=st.data(), query=queries, headers=header_sets)
    def run(data: st.DataObject, query: str, headers: dict[str, bytes]) -> None:
        filled = path.replace("{model}", data.draw(PARAMS["model"], label="model"))
        exchange(rig, "GET", filled + query, headers, b"")

    run()
    assert_intact(rig)


# ── fixed inputs: every nasty body at every endpoint that reads one, and single tricky requests ──────────

BODY_ENDPOINTS = [
    *(("POST", path) for path in DATA_PATHS),
    ("POST", "/vampire/v1/nodes"),
    ("PATCH", SPARE_PATH),
    ("POST", "/vampire/v1/discover"),
    ("POST", "/vampire/v1/routes"),
    ("POST", "/vampire/v1/keys"),
    ("POST", "/vampire/v1/realms"),
    ("PUT", "/vampire/v1/share"),
]


@pytest.mark.parametrize(("method", "path"), BODY_ENDPOINTS, ids=[f"{m} {p}" for m, p in BODY_ENDPOINTS])
def test_every_nasty_body_at_every_endpoint_that_reads_one(rig: Rig, method: str, path: str) -> None:
    failures = []
    for body in SPECIAL_BODIES:
        try:
            exchange(rig, method, path, {"content-type": b"application/json"}, body)
        except AssertionError as exc:
            failures.append(str(exc).splitlines()[0][:500])
    assert not failures, "\n".join(failures)
    assert_intact(rig)


def fields(**values: Any) -> bytes:
    return to_json(values)


SURROGATE = "\ud800"  # a lone surrogate: valid in JSON (written \ud800), not encodable as UTF-8
JSON = {"content-type": b"application/json"}
SPARE_PIN = "m@" + SPARE_ID
TRICKY = [
    pytest.param("GET", "/v1/models/nope", JSON, b"", id="unknown-model-by-id"),
    pytest.param("POST", "/v1/chat/completions", JSON, nested(5000), id="deeply-nested-chat"),
    pytest.param("PUT", "/v1/models", JSON, nested(5000), id="deeply-nested-relayed-to-the-node"),
    pytest.param("POST", "/vampire/v1/routes", JSON, b"[" * 5000, id="deeply-nested-control"),
    pytest.param(
        "POST",
        "/v1/chat/completions",
        JSON,
        fields(model=SURROGATE, messages=CHAT["messages"]),
        id="surrogate-model",
    ),
    pytest.param(
        "POST",
        "/v1/embeddings",
        JSON,
        fields(model="e", input=SURROGATE),
        id="surrogate-in-cacheable-request",
    ),
    pytest.param(
        "POST",
        "/v1/chat/completions",
        JSON,
        fields(model=SPARE_PIN, messages=CHAT["messages"]),
        id="pin-to-the-offline-spare",
    ),
    pytest.param(
        "OPTIONS",
        "/v1/messages",
        {"origin": b"http://elsewhere.invalid", "access-control-request-method": b"POST"},
        b"",
        id="refused-preflight-on-messages",
    ),
    pytest.param(
        "POST", "/vampire/v1/nodes", JSON, fields(url="http://127.9.9.7:abc"), id="node-port-not-a-number"
    ),
    pytest.param(
        "POST", "/vampire/v1/nodes", JSON, fields(url="http://127.9.9.7:70000"), id="node-port-out-of-range"
    ),
    pytest.param("POST", "/vampire/v1/nodes", JSON, fields(url="http://[::1"), id="node-url-open-bracket"),
    pytest.param(
        "POST", "/vampire/v1/nodes", JSON, fields(url="http://127.9.9.7:9", tags=5), id="node-tags-not-a-list"
    ),
    pytest.param(
        "POST",
        "/vampire/v1/nodes",
        JSON,
        fields(url="http://127.9.9.7:9", token=SURROGATE),
        id="node-token-surrogate",
    ),
    pytest.param("PATCH", SPARE_PATH, JSON, fields(name=SURROGATE), id="node-rename-surrogate"),
    pytest.param("PATCH", SPARE_PATH, JSON, fields(token=SURROGATE), id="node-token-change-surrogate"),
    pytest.param(
        "POST",
        "/vampire/v1/discover",
        JSON,
        fields(subnets=["127.0.0.0/30"], ports=[70000]),
        id="discover-port-out-of-range",
    ),
    pytest.param(
        "POST",
        "/vampire/v1/discover",
        JSON,
        fields(subnets=["127.0.0.0/30"], ports=[-1]),
        id="discover-port-negative",
    ),
    pytest.param(
        "POST",
        "/vampire/v1/discover",
        JSON,
        fields(subnets=["127.0.0.0/30"], ports=[True]),
        id="discover-port-boolean",
    ),
    pytest.param(
        "POST",
        "/vampire/v1/discover",
        JSON,
        fields(subnets=["127.0.0.0/30"], ports=[9], timeout_ms="abc"),
        id="discover-timeout-text",
    ),
    pytest.param(
        "POST",
        "/vampire/v1/discover",
        JSON,
        fields(subnets=["127.0.0.0/30"], ports=[9], timeout_ms=None),
        id="discover-timeout-null",
    ),
    pytest.param("POST", "/vampire/v1/keys", JSON, fields(name=SURROGATE), id="key-name-surrogate"),
    pytest.param(
        "POST", "/vampire/v1/keys", JSON, fields(name="k", models=[SURROGATE]), id="key-model-surrogate"
    ),
    pytest.param("POST", "/vampire/v1/keys", JSON, b'{"name": "k", "expires_at": NaN}', id="key-expiry-nan"),
    pytest.param(
        "POST", "/vampire/v1/keys", JSON, b'{"name": "k", "expires_at": 1e400}', id="key-expiry-infinite"
    ),
    pytest.param(
        "POST", "/vampire/v1/realms", JSON, fields(name="r", models=[SURROGATE]), id="realm-model-surrogate"
    ),
    pytest.param(
        "POST", "/vampire/v1/realms", JSON, fields(name="r", nodes=[SURROGATE]), id="realm-node-surrogate"
    ),
    pytest.param(
        "POST",
        "/vampire/v1/routes",
        JSON,
        fields(id=SURROGATE, targets=[{"model": "m"}]),
        id="route-id-surrogate",
    ),
    pytest.param(
        "POST",
        "/vampire/v1/routes",
        JSON,
        fields(id="r", targets=[{"model": SURROGATE}]),
        id="route-target-surrogate",
    ),
    pytest.param(
        "POST",
        "/vampire/v1/routes",
        JSON,
        fields(id="r", targets=[{"model": "m"}], fallback=SURROGATE),
        id="route-fallback-surrogate",
    ),
]


@pytest.mark.parametrize(("method", "path", "headers", "body"), TRICKY)
def test_tricky_request(rig: Rig, method: str, path: str, headers: dict[str, bytes], body: bytes) -> None:
    exchange(rig, method, path, headers, body, arbitrary=False)


def test_head_of_the_event_stream_ends_its_answer(rig: Rig) -> None:
    """HEAD has no body: its answer is over once the head is sent, while the connection stays open for the
    next request. A stream that kept running would hold that connection (and the next request) forever."""
    app = rig.gw.app
    with httpx.Client(timeout=TIMEOUT) as one:
        assert one.head(rig.url("/vampire/v1/events")).status_code == 200
        try:
            wait_until(lambda: not rig.on_loop(lambda: app.events.listened), timeout=3)
            ended = True
        except AssertionError:
            ended = False
    wait_until(lambda: idle(rig))  # closing the connection ends the stream either way
    assert ended, (
        "HEAD /vampire/v1/events is still streaming on its open connection: the next request on it hangs"
    )
