#!/usr/bin/env python3
"""Vampire: one governed, private, OpenAI-compatible endpoint in front of the LM Studio servers their
owners chose to share.

Read top to bottom in the order a request flows. Contents, one line per section banner (a test keeps
this table and the banners in step):

  settings: defaults < vampire.toml < VAMPIRE_* environment < command-line flags
  errors and ASGI helpers: errors in each caller's format, and the small ASGI pieces every section uses
  store: SQLite (WAL) in the data dir; the one place runtime state lives
  nodes: one approved endpoint, the models it offers, its owner's tier and its circuit breaker
  interrogation: what a node is and offers (LM Studio 0.4/0.3, Ollama, OpenAI), behind the SSRF guard
  registry: the approved nodes, kept fresh by a health loop; events that announce their changes
  discovery: finds endpoints on private networks; discovery is not permission (found = untrusted)
  policy: who may call (keys, share mode, trusted networks), what they may use, and how much
  router: picks the node that will answer best: hot model first, then free slots, then latency
  admission: per-(node, model) slots x tier; a bounded queue when every slot is taken
  cache: identical concurrent requests share one upstream call; deterministic answers are kept
  surfaces: token counts read from passing bytes; stream error frames; JSON <-> SSE <-> Anthropic
  gateway: the data plane: a lean ASGI path from client to node and back, streams relayed as they come
  accounting: the usage ledger and audit log (batched into SQLite) and Prometheus metrics
  control plane: /vampire/v1/* for people and tools; Starlette, since none of it is a hot path
  app: one gateway instance; several can live in one process (tests), nothing global
  dashboard: the owner's single page, embedded so it works offline with no build step
  CLI: `vampire <command>`; exit 0 ok, 1 failure, 2 bad usage
  service: per-user background service, `vampire up`/`down`, the double-click path
  emulator: a deterministic LM Studio (and Ollama, generic OpenAI) node for demos, CI jobs and tests
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import dataclasses
import functools
import gc
import hashlib
import hmac
import importlib
import ipaddress
import json
import logging
import math
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import tomllib
import urllib.parse
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path, PureWindowsPath
from typing import Any, NoReturn
from urllib.parse import urlsplit

import aiohttp
import platformdirs
from starlette import routing
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

__version__ = "0.1.0"

log = logging.getLogger("vampire")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


# ── settings: defaults < vampire.toml < VAMPIRE_* environment < command-line flags ────────────────────────

DEFAULT_PORT = 7777

LMSTUDIO_PORT = 1234

OLLAMA_PORT = 11434

SHARE_MODES = ("off", "local", "lan", "keys")

DEFAULT_SLOTS = 4  # LM Studio's own default for API and JIT loads


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    nodes: list[str] = field(default_factory=list)  # "url[#token]"
    admin_token: str | None = None
    data_dir: Path = field(
        default_factory=lambda: Path(platformdirs.user_data_dir("vampire", appauthor=False))
    )
    log_level: str = "info"
    log_format: str = "text"
    refresh_s: float = 10.0
    first_byte_timeout_s: float = 120.0
    connect_timeout_s: float = 5.0
    probe_timeout_s: float = 3.0
    queue_max: int = 256
    queue_timeout_s: float = 30.0
    default_slots: int = DEFAULT_SLOTS  # concurrent requests per model on nodes that do not report their own
    trusted_networks: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    share: str = "local"
    max_body_bytes: int = 32 * 1024 * 1024
    cors_origins: list[str] = field(default_factory=list)  # browser origins allowed to call; none by default
    cache_max_bytes: int = 256 * 1024 * 1024
    cache_ttl_s: float = 3600.0
    allow_public_nodes: bool = False
    discover_local: bool = True
    demo: bool = False

    @classmethod
    def load(
        cls,
        config_file: Path | None = None,
        env: dict[str, str] | None = None,
        **overrides: Any,
    ) -> Settings:
        env = dict(os.environ if env is None else env)
        settings = cls()
        path = config_file or _env_path(env, "VAMPIRE_CONFIG") or default_config_path()
        if path.is_file():
            settings._apply(_read_toml(path), f"{path}")
        settings._apply(_settings_from_env(env), "environment")
        settings._apply({k: v for k, v in overrides.items() if v not in (None, [], False)}, "flags")
        settings._validate()
        return settings

    def _apply(self, values: dict[str, Any], origin: str) -> None:
        names = {f.name: f for f in dataclasses.fields(self)}
        for key, value in values.items():
            if key not in names:
                raise ConfigError(f"{origin}: unknown setting {key!r}")
            setattr(self, key, _coerce(getattr(self, key), value, f"{origin}: {key}"))

    def _validate(self) -> None:
        if self.share not in SHARE_MODES:
            raise ConfigError(f"share must be one of {', '.join(SHARE_MODES)}, not {self.share!r}")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"log_level must be debug|info|warning|error, not {self.log_level!r}")
        for cidr in self.trusted_networks:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ConfigError(f"trusted_networks: {exc}") from None
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port out of range: {self.port}")

    @property
    def db_path(self) -> Path:
        return self.data_dir / "vampire.db"


class ConfigError(Exception):
    """A setting that cannot be used; the message says which and why."""


_ENV_NAMES = {
    "VAMPIRE_HOST": "host",
    "VAMPIRE_PORT": "port",
    "VAMPIRE_NODES": "nodes",
    "VAMPIRE_ADMIN_TOKEN": "admin_token",
    "VAMPIRE_DATA_DIR": "data_dir",
    "VAMPIRE_LOG_LEVEL": "log_level",
    "VAMPIRE_LOG_FORMAT": "log_format",
    "VAMPIRE_REFRESH_S": "refresh_s",
    "VAMPIRE_FIRST_BYTE_TIMEOUT_S": "first_byte_timeout_s",
    "VAMPIRE_QUEUE_MAX": "queue_max",
    "VAMPIRE_QUEUE_TIMEOUT_S": "queue_timeout_s",
    "VAMPIRE_DEFAULT_SLOTS": "default_slots",
    "VAMPIRE_TRUSTED_NETWORKS": "trusted_networks",
    "VAMPIRE_SHARE": "share",
    "VAMPIRE_MAX_BODY_BYTES": "max_body_bytes",
    "VAMPIRE_CORS_ORIGINS": "cors_origins",
    "VAMPIRE_CACHE_MAX_BYTES": "cache_max_bytes",
    "VAMPIRE_CACHE_TTL_S": "cache_ttl_s",
}


def _settings_from_env(env: dict[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {name: env[var] for var, name in _ENV_NAMES.items() if env.get(var)}
    # The name the original project documented for its single LM Studio server is one more node.
    if env.get("VAMPIRE_LMSTUDIO_BASE_URL"):
        nodes = _split_list(values.get("nodes", ""))
        values["nodes"] = [*nodes, env["VAMPIRE_LMSTUDIO_BASE_URL"]]
    return values


def _env_path(env: dict[str, str], name: str) -> Path | None:
    return Path(env[name]).expanduser() if env.get(name) else None


def default_config_path() -> Path:
    return Path(platformdirs.user_config_dir("vampire", appauthor=False)) / "vampire.toml"


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    nodes = data.get("nodes")
    if isinstance(nodes, list):  # [[nodes]] tables with url/token are friendlier to write than "url#token"
        data["nodes"] = [_node_spec_from_table(n) if isinstance(n, dict) else str(n) for n in nodes]
    return data


def _node_spec_from_table(table: dict[str, Any]) -> str:
    url = str(table.get("url", ""))
    return f"{url}#{table['token']}" if table.get("token") else url


def _split_list(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _coerce(current: Any, value: Any, where: str) -> Any:
    try:
        if isinstance(current, bool):
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
        if isinstance(current, int):
            return int(value)
        if isinstance(current, float):
            return float(value)
        if isinstance(current, Path):
            return Path(str(value)).expanduser()
        if isinstance(current, list):
            return _split_list(value) if isinstance(value, str) else [str(v) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: cannot use {value!r}") from None
    return None if value is None else str(value)


def split_node_spec(spec: str) -> tuple[str, str | None]:
    """`url[#token]` -> (normalized url, token); a URL without scheme means http."""
    url, _, token = spec.strip().partition("#")
    if "://" not in url:
        url = "http://" + url
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise ConfigError(f"not a node URL: {url!r} ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"not a node URL: {url!r}")
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):  # people paste their OpenAI base URL; the node is the server root
        path = path[:-3]
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}:{port}{path}", (token or None)


# ── errors and ASGI helpers: errors in each caller's format, and the small ASGI pieces every section uses ───


class HTTPError(Exception):
    """A request the gateway answers itself, rendered in the caller's format."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}


def unavailable(message: str, code: str = "no_node_available", retry_after: int = 5) -> HTTPError:
    return HTTPError(503, message, code, headers={"Retry-After": str(retry_after)})


_OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}

_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def error_body(surface: str, status: int, message: str, code: str | None, param: str | None = None) -> bytes:
    if surface == "anthropic":
        kind = _ANTHROPIC_ERROR_TYPES.get(status, "api_error")
        return json.dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()
    kind = _OPENAI_ERROR_TYPES.get(status, "server_error")
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


def parse_json(data: bytes) -> Any:
    """A request body as JSON, or 400: malformed, or nested deeper than the parser can go."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        reason = "it is nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise HTTPError(400, f"The request body is not valid JSON: {reason}.", "invalid_json") from None


def storable_text(value: str) -> str:
    """Text that SQLite and JSON encoders accept: lone surrogates (invalid Unicode) become U+FFFD."""
    return value.encode("utf-8", "replace").decode("utf-8")


def header_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    """One request header (names are lower-case in ASGI), or None."""
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


async def send_json(send: Send, status: int, body: Any, extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


@functools.lru_cache(maxsize=4096)
def is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ── store: SQLite (WAL) in the data dir; the one place runtime state lives ────────────────────────────────


class Store:
    """Durable state: nodes added at run time, their trust and owner tokens, and what later sections add.

    WAL with synchronous=NORMAL survives `kill -9` of the gateway (only an OS crash can lose the last
    commits). The file is created 0600 because it holds node tokens.
    """

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS nodes (
        id TEXT PRIMARY KEY, url TEXT NOT NULL UNIQUE, name TEXT NOT NULL, token TEXT,
        trusted INTEGER NOT NULL, admin_state TEXT NOT NULL DEFAULT 'active',
        tags TEXT NOT NULL DEFAULT '[]', source TEXT NOT NULL, added_at REAL NOT NULL
    );
    CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS routes (id TEXT PRIMARY KEY, body TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS realms (name TEXT PRIMARY KEY, body TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS keys (id TEXT PRIMARY KEY, body TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS usage (
        time REAL NOT NULL, request_id TEXT, key_id TEXT, realm TEXT, model TEXT, node TEXT,
        prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, latency_ms REAL, status INTEGER,
        surface TEXT
    );
    CREATE INDEX IF NOT EXISTS usage_time ON usage (time);
    CREATE TABLE IF NOT EXISTS audit (
        time REAL NOT NULL, actor TEXT, action TEXT NOT NULL, source TEXT, details TEXT NOT NULL
    );
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not path.exists():
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(self.SCHEMA)

    def close(self) -> None:
        self.db.close()

    def node_rows(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM nodes ORDER BY added_at").fetchall()
        return [dict(row) | {"tags": json.loads(row["tags"])} for row in rows]

    def save_node(self, row: dict[str, Any]) -> None:
        self.db.execute(
            "INSERT INTO nodes (id, url, name, token, trusted, admin_state, tags, source, added_at)"
            " VALUES (:id, :url, :name, :token, :trusted, :admin_state, :tags, :source, :added_at)"
            " ON CONFLICT(id) DO UPDATE SET url=:url, name=:name, token=:token, trusted=:trusted,"
            " admin_state=:admin_state, tags=:tags, source=:source",
            row | {"tags": json.dumps(row.get("tags", [])), "trusted": int(bool(row["trusted"]))},
        )

    def delete_node(self, node_id: str) -> None:
        self.db.execute("DELETE FROM nodes WHERE id = ?", (node_id,))

    def routes(self) -> list[dict[str, Any]]:
        return [json.loads(row[0]) for row in self.db.execute("SELECT body FROM routes ORDER BY id")]

    def save_route(self, route: dict[str, Any]) -> None:
        self.db.execute(
            "INSERT INTO routes (id, body) VALUES (?, ?) ON CONFLICT(id) DO UPDATE SET body = excluded.body",
            (route["id"], json.dumps(route)),
        )

    def delete_route(self, route_id: str) -> None:
        self.db.execute("DELETE FROM routes WHERE id = ?", (route_id,))

    def _bodies(self, table: str) -> list[dict[str, Any]]:
        return [json.loads(row[0]) for row in self.db.execute(f"SELECT body FROM {table}")]

    def realm_rows(self) -> list[dict[str, Any]]:
        return self._bodies("realms")

    def save_realm(self, realm: dict[str, Any]) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO realms (name, body) VALUES (?, ?)", (realm["name"], json.dumps(realm))
        )

    def key_rows(self) -> list[dict[str, Any]]:
        return self._bodies("keys")

    def save_key(self, key: dict[str, Any]) -> None:
        self.db.execute("INSERT OR REPLACE INTO keys (id, body) VALUES (?, ?)", (key["id"], json.dumps(key)))

    def delete_key(self, key_id: str) -> None:
        self.db.execute("DELETE FROM keys WHERE id = ?", (key_id,))

    def add_usage(self, rows: list[tuple[Any, ...]]) -> None:
        self._insert_batch("INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def _insert_batch(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        # One transaction per batch: in autocommit mode every row would be a commit of its own.
        self.db.execute("BEGIN")
        try:
            self.db.executemany(sql, rows)
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    USAGE_GROUPS = {
        "key": "COALESCE(key_id, '-')",
        "model": "model",
        "node": "COALESCE(node, '-')",
        "realm": "realm",
        "day": "date(time, 'unixepoch')",
    }

    def usage(self, group_by: str, since: float) -> list[dict[str, Any]]:
        column = self.USAGE_GROUPS[group_by]
        rows = self.db.execute(
            f"SELECT {column} AS grp, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens) FROM usage"
            " WHERE time >= ? GROUP BY grp ORDER BY grp",
            (since,),
        ).fetchall()
        return [
            {"group": r[0], "requests": r[1], "prompt_tokens": r[2], "completion_tokens": r[3]} for r in rows
        ]

    def add_audit(self, rows: list[tuple[Any, ...]]) -> None:
        self._insert_batch("INSERT INTO audit VALUES (?, ?, ?, ?, ?)", rows)

    def audit(self, limit: int = 200) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM audit ORDER BY time DESC LIMIT ?", (limit,)).fetchall()
        return [dict(row) | {"details": json.loads(row["details"])} for row in rows]

    def get_setting(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_setting(self, key: str, value: str) -> None:
        self.db.execute(
            "INSERT INTO settings (key, value) VALUES (?, ?)"
            " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )


# ── nodes: one approved endpoint, the models it offers, its owner's tier and its circuit breaker ──────────

MODEL_TYPES = ("llm", "vlm", "embedding")

TIER_RE = re.compile(r"^vampire(\d{0,3})(?::.*)?$", re.DOTALL)


@dataclass
class ModelInfo:
    id: str
    type: str = "llm"
    loaded: bool = False
    instances: list[str] = field(default_factory=list)
    context_length: int | None = None
    max_context_length: int | None = None
    capabilities: list[str] = field(default_factory=list)  # vision, tools, reasoning
    capabilities_known: bool = False  # only a node that reports capabilities can be held to them
    slots: int = DEFAULT_SLOTS  # LM Studio 0.4 reports `parallel`; for other nodes, settings.default_slots
    format: str | None = None
    quantization: str | None = None
    size_bytes: int | None = None

    @property
    def key(self) -> str:
        return model_key(self.id)

    def public(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def model_key(model_id: str) -> str:
    """The model without its instance suffix `:N` or variant `@quant` (LM Studio naming)."""
    base = model_id.split("@", 1)[0]
    head, sep, tail = base.rpartition(":")
    return head if sep and tail.isdigit() else base


@functools.lru_cache(maxsize=256)
def parse_tier(token: str | None) -> int:
    """A `vampire<NN>[:secret]` token grants Vampire NN % of the node's slots; any other token 100 %."""
    match = TIER_RE.match(token or "")
    if not match:
        return 100
    return max(1, min(100, int(match.group(1)))) if match.group(1) else 100


def mask_secret(secret: str | None) -> str | None:
    if not secret:
        return None
    return f"{secret[:3]}…{secret[-3:]}" if len(secret) >= 12 else "…"


def node_id_for(url: str) -> str:
    parts = urlsplit(url)
    return re.sub(r"[^a-zA-Z0-9]+", "-", f"{parts.hostname}-{parts.port}{parts.path}").strip("-").lower()


@dataclass
class Node:
    """One approved endpoint and everything Vampire knows about it right now."""

    id: str
    url: str
    name: str
    token: str | None = None
    trusted: bool = False
    admin_state: str = "active"  # active | draining | disabled (set by a person)
    tags: list[str] = field(default_factory=list)
    source: str = "runtime"  # config | runtime | discovered | local
    added_at: float = field(default_factory=time.time)
    kind: str = "unknown"  # lmstudio | ollama | openai
    version: str | None = None
    health: str = "unknown"  # unknown | online | offline | unauthorized
    models: list[ModelInfo] = field(default_factory=list)
    in_flight: int = 0
    busy: dict[str, int] = field(default_factory=dict)  # in flight per model id
    warming: set[str] = field(default_factory=set)  # models a request of ours is loading right now
    served: dict[str, float] = field(default_factory=dict)  # model id -> monotonic time it last answered
    circuit: Circuit = field(default_factory=lambda: Circuit())
    latency_ms: float | None = None
    last_seen: float | None = None
    last_error: str | None = None
    failures: int = 0
    auth_failures: int = 0
    next_probe: float = 0.0

    @property
    def state(self) -> str:
        return (
            "disabled"
            if self.admin_state == "disabled"
            else ("draining" if self.admin_state == "draining" else self.health)
        )

    @property
    def tier(self) -> int:
        return parse_tier(self.token)

    @property
    def routable(self) -> bool:
        return self.trusted and self.admin_state == "active" and self.health == "online"

    def observe_latency(self, seconds: float) -> None:
        ms = seconds * 1000.0
        self.latency_ms = ms if self.latency_ms is None else 0.8 * self.latency_ms + 0.2 * ms

    def row(self) -> dict[str, Any]:
        keys = ("id", "url", "name", "token", "trusted", "admin_state", "tags", "source", "added_at")
        return {k: getattr(self, k) for k in keys}

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "url": self.url,
            "kind": self.kind,
            "version": self.version,
            "state": self.state,
            "trusted": self.trusted,
            "tier": self.tier,
            "token": mask_secret(self.token),
            "tags": self.tags,
            "source": self.source,
            "in_flight": self.in_flight,
            "circuit": self.circuit.state,
            "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 2),
            "last_seen": self.last_seen,
            "last_error": self.last_error,
            "models": [m.public() for m in self.models],
        }


class Circuit:
    """Per-node breaker: opens after repeated real failures, lets one trial through after a cool-down,
    closes on success. Capacity answers (429/503) never count: a busy node is not a broken one."""

    THRESHOLD = 3
    MAX_COOLDOWN_S = 30.0

    def __init__(self) -> None:
        self.state = "closed"  # closed | open | half_open
        self.failures = 0
        self.trips = 0
        self.open_until = 0.0
        self.trial = False

    def allows(self, now: float) -> bool:
        if self.state == "open" and now >= self.open_until:
            self.state, self.trial = "half_open", False
        return self.state == "closed" or (self.state == "half_open" and not self.trial)

    def begin(self) -> None:
        if self.state == "half_open":
            self.trial = True

    def success(self) -> None:
        self.state, self.failures, self.trips, self.trial = "closed", 0, 0, False

    def failure(self, now: float) -> None:
        self.failures += 1
        if self.state == "half_open" or self.failures >= self.THRESHOLD:
            self.trips += 1
            self.state, self.trial = "open", False
            self.open_until = now + min(self.MAX_COOLDOWN_S, 2.0 ** (self.trips - 1))

    def abandon(self) -> None:
        """A trial that ended without a verdict (client left) must not wedge the breaker half-open."""
        self.trial = False


# ── interrogation: what a node is and offers (LM Studio 0.4/0.3, Ollama, OpenAI), behind the SSRF guard ───


@dataclass
class Interrogation:
    """What one probe of a node found: identity, inventory, or why it could not be used."""

    health: str  # online | offline | unauthorized
    kind: str = "unknown"
    version: str | None = None
    models: list[ModelInfo] = field(default_factory=list)
    error: str | None = None
    latency_s: float = 0.0


class NodeRefused(Exception):
    """The node URL may not be used (SSRF guard, bad URL); the message is shown to the person."""


def address_allowed(address: str, allow_public: bool) -> bool:
    ip = ipaddress.ip_address(address)
    if allow_public:
        return not (ip.is_multicast or ip.is_unspecified)
    return ip.is_private or ip.is_loopback or ip.is_link_local


async def check_node_address(url: str, allow_public: bool) -> None:
    """Refuse node URLs that resolve outside private/loopback space (SSRF); re-run at connect time."""
    host = urlsplit(url).hostname or ""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise NodeRefused(f"cannot resolve {host!r}: {exc.strerror or exc}") from None
    for info in infos:
        address = str(info[4][0])
        if not address_allowed(address, allow_public):
            raise NodeRefused(
                f"{host} resolves to the public address {address}; nodes must be on this machine or a "
                "private network (start with --allow-public-nodes to permit it)"
            )


class GuardedResolver(aiohttp.abc.AbstractResolver):
    """Resolves like the default resolver, then applies the SSRF rule to every address it returns, so
    a name that re-resolves to a public address after it was checked (DNS rebinding) is still refused."""

    def __init__(self, allow_public: Callable[[], bool]) -> None:
        self._inner = aiohttp.ThreadedResolver()
        self._allow_public = allow_public

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[Any]:
        results = await self._inner.resolve(host, port, family)
        allowed = [r for r in results if address_allowed(r["host"], self._allow_public())]
        if not allowed:
            raise OSError(f"{host} resolves only to addresses outside private networks")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


class NodeClients:
    """The HTTP sessions that talk to nodes, SSRF-guarded at connect time: the relay's (bodies pass through
    untouched: no decompression, no added headers; waits up to the first-byte timeout), a twin that never
    reuses a connection (the retry for a pooled connection the node already closed), and the prober's."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._relay: aiohttp.ClientSession | None = None
        self._fresh: aiohttp.ClientSession | None = None
        self._probe: aiohttp.ClientSession | None = None

    def open(self) -> None:
        """Sessions belong to a running loop, so they are made when the gateway starts."""
        self._relay = self._session(relay=True)
        self._fresh = self._session(relay=True, force_close=True)
        self._probe = self._session(relay=False)

    @property
    def relay(self) -> aiohttp.ClientSession:
        assert self._relay is not None, "NodeClients.open() was not called"
        return self._relay

    @property
    def fresh(self) -> aiohttp.ClientSession:
        assert self._fresh is not None, "NodeClients.open() was not called"
        return self._fresh

    @property
    def probe(self) -> aiohttp.ClientSession:
        assert self._probe is not None, "NodeClients.open() was not called"
        return self._probe

    def _session(self, *, relay: bool, force_close: bool = False) -> aiohttp.ClientSession:
        s = self.settings
        connector = aiohttp.TCPConnector(
            limit=0 if relay else 64,
            force_close=force_close,
            resolver=GuardedResolver(lambda: s.allow_public_nodes),
        )
        if not relay:
            return aiohttp.ClientSession(connector=connector)
        timeout = aiohttp.ClientTimeout(
            total=None, connect=s.connect_timeout_s, sock_read=s.first_byte_timeout_s
        )
        return aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding", "User-Agent"),
        )

    async def close(self) -> None:
        for session in (self._relay, self._fresh, self._probe):
            if session is not None:
                await session.close()


async def _get_json(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str], timeout: float
) -> tuple[int, Any]:
    async with http.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
        body = await resp.read()
    try:
        return resp.status, json.loads(body)
    except ValueError:
        return resp.status, body.decode("utf-8", "replace")


async def interrogate(
    http: aiohttp.ClientSession, url: str, token: str | None, timeout: float
) -> Interrogation:
    """Identify a node (LM Studio 0.4 / 0.3, Ollama, other OpenAI server) and read its inventory."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    started = time.perf_counter()
    try:
        result = await _identify(http, url, headers, timeout)
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        result = Interrogation("offline", error=_describe_error(exc))
    result.latency_s = time.perf_counter() - started
    return result


async def _identify(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str], timeout: float
) -> Interrogation:
    status, greeting = await _get_json(http, url + "/lmstudio-greeting", headers, timeout)
    if status in (401, 403):
        return Interrogation("unauthorized", kind="lmstudio", error=f"HTTP {status} from the node")
    if isinstance(greeting, dict) and greeting.get("lmstudio") is True:
        return await _interrogate_lmstudio(http, url, headers, timeout, greeting.get("version"))
    status, version = await _get_json(http, url + "/api/version", headers, timeout)
    if status == 200 and isinstance(version, dict) and "version" in version:
        return await _interrogate_ollama(http, url, headers, timeout, str(version["version"]))
    return await _interrogate_openai(http, url, headers, timeout)


async def _interrogate_lmstudio(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str], timeout: float, version: Any
) -> Interrogation:
    status, body = await _get_json(http, url + "/api/v1/models", headers, timeout)
    if status in (401, 403):
        return Interrogation(
            "unauthorized", "lmstudio", str(version or "0.4"), error=f"HTTP {status} from the node"
        )
    if status == 200 and isinstance(body, dict) and isinstance(body.get("models"), list):
        models = [_model_from_lmstudio_v1(m) for m in body["models"] if isinstance(m, dict)]
        return Interrogation("online", "lmstudio", str(version or "0.4"), _expand_instances(models))
    status, body = await _get_json(http, url + "/api/v0/models", headers, timeout)
    if status == 200 and isinstance(body, dict) and isinstance(body.get("data"), list):
        models = [_model_from_lmstudio_v0(m) for m in body["data"] if isinstance(m, dict)]
        return Interrogation("online", "lmstudio", str(version or "0.3"), models)
    result = await _interrogate_openai(http, url, headers, timeout)
    result.kind, result.version = "lmstudio", str(version or "0.3")
    return result


def _model_from_lmstudio_v1(raw: dict[str, Any]) -> ModelInfo:
    caps = raw.get("capabilities") or {}
    instances = [i for i in raw.get("loaded_instances") or [] if isinstance(i, dict)]
    config = (instances[0].get("config") or {}) if instances else {}
    capabilities = [
        name
        for name, on in (
            ("vision", caps.get("vision")),
            ("tools", caps.get("trained_for_tool_use")),
            ("reasoning", caps.get("reasoning")),
        )
        if on
    ]
    quant = raw.get("quantization")
    kind = "embedding" if raw.get("type") == "embedding" else ("vlm" if caps.get("vision") else "llm")
    return ModelInfo(
        id=str(raw.get("key") or raw.get("id") or ""),
        type=kind,
        loaded=bool(instances),
        instances=[str(i.get("id")) for i in instances],
        context_length=config.get("context_length"),
        max_context_length=raw.get("max_context_length"),
        capabilities=capabilities,
        capabilities_known=True,
        slots=int(config.get("parallel") or DEFAULT_SLOTS),
        format=raw.get("format"),
        quantization=quant.get("name") if isinstance(quant, dict) else quant,
        size_bytes=raw.get("size_bytes"),
    )


def _expand_instances(models: list[ModelInfo]) -> list[ModelInfo]:
    """Extra loaded instances (`key:2`) are addressable ids of their own, so list them too."""
    out: list[ModelInfo] = []
    for model in models:
        out.append(model)
        for instance in model.instances:
            if instance != model.id:
                out.append(dataclasses.replace(model, id=instance, instances=[instance]))
    return out


def _model_from_lmstudio_v0(raw: dict[str, Any]) -> ModelInfo:
    kind = {"embeddings": "embedding", "vlm": "vlm"}.get(str(raw.get("type")), "llm")
    caps = raw.get("capabilities") or []
    capabilities = (["vision"] if kind == "vlm" else []) + (["tools"] if "tool_use" in caps else [])
    loaded = raw.get("state") == "loaded"
    return ModelInfo(
        id=str(raw.get("id", "")),
        type=kind,
        loaded=loaded,
        instances=[str(raw.get("id"))] if loaded else [],
        context_length=raw.get("loaded_context_length"),
        max_context_length=raw.get("max_context_length"),
        capabilities=capabilities,
        capabilities_known="capabilities" in raw,
        format=raw.get("compatibility_type"),
        quantization=raw.get("quantization"),
    )


async def _interrogate_ollama(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str], timeout: float, version: str
) -> Interrogation:
    _, tags = await _get_json(http, url + "/api/tags", headers, timeout)
    _, ps = await _get_json(http, url + "/api/ps", headers, timeout)
    running = {str(m.get("name")): m for m in (ps or {}).get("models", []) if isinstance(m, dict)}
    models = []
    for raw in (tags or {}).get("models", []):
        if not isinstance(raw, dict):
            continue
        name = str(raw.get("name") or raw.get("model"))
        caps = raw.get("capabilities") or []
        details = raw.get("details") or {}
        kind = (
            "embedding" if "embedding" in caps or "embed" in name else ("vlm" if "vision" in caps else "llm")
        )
        loaded = running.get(name)
        models.append(
            ModelInfo(
                id=name,
                type=kind,
                loaded=loaded is not None,
                instances=[name] if loaded else [],
                context_length=(loaded or {}).get("context_length"),
                capabilities=[
                    c
                    for c, k in (("vision", "vision"), ("tools", "tools"), ("reasoning", "thinking"))
                    if k in caps
                ],
                capabilities_known=bool(caps),
                format=details.get("format"),
                quantization=details.get("quantization_level"),
                size_bytes=raw.get("size"),
            )
        )
    return Interrogation("online", "ollama", version, models)


async def _interrogate_openai(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str], timeout: float
) -> Interrogation:
    status, body = await _get_json(http, url + "/v1/models", headers, timeout)
    if status in (401, 403):
        return Interrogation("unauthorized", "openai", error=f"HTTP {status} from the node")
    if status != 200 or not isinstance(body, dict) or not isinstance(body.get("data"), list):
        return Interrogation("offline", error=f"no model list at {url}/v1/models (HTTP {status})")
    models = []
    for raw in body["data"]:
        if isinstance(raw, dict) and raw.get("id"):
            model_id = str(raw["id"])
            kind = "embedding" if "embed" in model_id.lower() else "llm"
            # A generic server lists what it serves, and what it serves is loaded.
            models.append(ModelInfo(id=model_id, type=kind, loaded=True, instances=[model_id]))
    return Interrogation("online", "openai", None, models)


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


# ── registry: the approved nodes, kept fresh by a health loop; events that announce their changes ─────────


@dataclass
class Event:
    kind: str  # node | request
    data: dict[str, Any]
    time: float = field(default_factory=time.time)


class EventBus:
    """Recent events for late joiners plus live fan-out to subscribers (SSE, dashboard, tests)."""

    def __init__(self, keep: int = 500) -> None:
        self.recent: deque[Event] = deque(maxlen=keep)
        self._subscribers: set[asyncio.Queue[Event]] = set()

    @property
    def listened(self) -> bool:
        return bool(self._subscribers)

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        event = Event(kind, data)
        if kind != "request":  # node history is kept for late joiners; request traffic only goes live
            self.recent.append(event)
        for queue in self._subscribers:
            if queue.qsize() < 1000:  # a stalled subscriber must not grow without bound
                queue.put_nowait(event)

    def subscribe(self) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        self._subscribers.discard(queue)


class Registry:
    """The approved nodes, their health and inventory; persisted in the store, refreshed in the background."""

    AUTH_FAILURES_TO_WITHDRAW = 2
    MAX_BACKOFF_S = 300.0

    def __init__(
        self,
        settings: Settings,
        store: Store,
        events: EventBus,
        clients: NodeClients,
        on_fingerprints_changed: Callable[[set[str]], Any] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.events = events
        self.clients = clients
        self.nodes: dict[str, Node] = {}
        self._wake = asyncio.Event()
        self._probing: dict[str, asyncio.Task[None]] = {}
        self._probe_again: set[str] = set()
        self.on_fingerprints_changed = on_fingerprints_changed
        self.version = 0  # bumps on any inventory or state change; the router rebuilds its index on it

    def load(self) -> None:
        for row in self.store.node_rows():
            node = Node(**{k: row[k] for k in Node.__dataclass_fields__ if k in row})
            node.trusted = bool(row["trusted"])
            self.nodes[node.id] = node

    def merge_configured(self, specs: Iterable[str], source: str = "config") -> None:
        """Nodes from config, env and flags are the owner's own choice, so they are trusted. A config
        node no longer configured is dropped; nodes added at run time are kept."""
        wanted = set()
        for spec in specs:
            url, token = split_node_spec(spec)
            node = self.by_url(url)
            if node is None:
                node = Node(id=self._free_id(url), url=url, name=urlsplit(url).netloc, source=source)
                self.nodes[node.id] = node
            node.trusted = True
            if token:
                node.token = token
            wanted.add(node.id)
            self._save(node)
        if source == "config":
            for node in [n for n in self.nodes.values() if n.source == "config" and n.id not in wanted]:
                self.remove(node)
        self.changed()

    def _save(self, node: Node) -> None:
        if node.source != "demo":  # demo nodes live and die with the process
            self.store.save_node(node.row())

    def by_url(self, url: str) -> Node | None:
        return next((n for n in self.nodes.values() if n.url == url), None)

    def find(self, ref: str) -> Node | None:
        return self.nodes.get(ref) or next((n for n in self.nodes.values() if n.name == ref), None)

    def _free_id(self, url: str) -> str:
        base = node_id_for(url)
        candidate, n = base, 2
        while candidate in self.nodes:
            candidate, n = f"{base}-{n}", n + 1
        return candidate

    async def add(
        self,
        url: str,
        *,
        token: str | None = None,
        name: str | None = None,
        trusted: bool = True,
        tags: list[str] | None = None,
        source: str = "runtime",
    ) -> Node:
        url, url_token = split_node_spec(url)
        await check_node_address(url, self.settings.allow_public_nodes)
        if self.by_url(url):
            known = self.by_url(url)
            raise NodeRefused(f"{url} is already registered as node {known.id if known else url}")
        node = Node(
            id=self._free_id(url),
            url=url,
            name=name or urlsplit(url).netloc,
            token=token or url_token,
            trusted=trusted,
            tags=tags or [],
            source=source,
        )
        self.nodes[node.id] = node
        self._save(node)
        self.events.publish("node", {"id": node.id, "state": node.state, "change": "added"})
        await self.probe(node)
        return node

    def remove(self, node: Node) -> None:
        self.nodes.pop(node.id, None)
        self.store.delete_node(node.id)
        self.events.publish("node", {"id": node.id, "state": "removed", "change": "removed"})
        self.changed()

    def update(self, node: Node, **changes: Any) -> None:
        before = node.state
        for key, value in changes.items():
            setattr(node, key, value)
        self._save(node)
        self._announce(node, before)
        self.changed()

    def changed(self) -> None:
        self.version += 1

    def _announce(self, node: Node, before: str) -> None:
        if node.state != before:
            log.info("node %s: %s -> %s", node.id, before, node.state)
            self.events.publish(
                "node", {"id": node.id, "state": node.state, "previous": before, "error": node.last_error}
            )

    async def probe(self, node: Node) -> None:
        started = time.monotonic()
        result = await interrogate(self.clients.probe, node.url, node.token, self.settings.probe_timeout_s)
        # A model that answered after this probe began is loaded, whatever the (older) inventory says.
        for model in result.models:
            model.loaded = model.loaded or node.served.get(model.id, 0.0) > started
        self.apply(node, result)

    def apply(self, node: Node, result: Interrogation) -> None:
        before = node.state
        now = time.time()
        if result.health == "online":
            if not (result.kind == "lmstudio" and result.version and not result.version.startswith("0.3")):
                for (
                    model
                ) in result.models:  # only LM Studio 0.4 tells; for the rest the owner's setting counts
                    model.slots = self.settings.default_slots
            self._note_fingerprints(node, result)
            node.failures = node.auth_failures = 0
            node.health, node.kind, node.version, node.models = (
                "online",
                result.kind,
                result.version,
                result.models,
            )
            node.last_seen, node.last_error = now, None
            node.observe_latency(result.latency_s)
            node.next_probe = time.monotonic() + self.settings.refresh_s
        elif result.health == "unauthorized":
            node.auth_failures += 1
            node.last_error = result.error
            node.kind = result.kind if result.kind != "unknown" else node.kind
            if node.auth_failures >= self.AUTH_FAILURES_TO_WITHDRAW:
                node.health = "unauthorized"
            node.next_probe = time.monotonic() + self._backoff(node)
        else:
            node.failures += 1
            node.health, node.last_error = "offline", result.error
            node.next_probe = time.monotonic() + self._backoff(node)
        self._announce(node, before)
        self.changed()

    def _note_fingerprints(self, node: Node, result: Interrogation) -> None:
        """A model that changed under the same id (quantization, format, node version) makes its cached
        answers stale."""
        if self.on_fingerprints_changed is None or not node.models:
            return
        before = {m.id: fingerprint(m, node) for m in node.models}
        probe = dataclasses.replace(node, kind=result.kind, version=result.version)
        after = {m.id: fingerprint(m, probe) for m in result.models}
        stale = {fp for mid, fp in before.items() if after.get(mid, fp) != fp}
        if stale:
            self.on_fingerprints_changed(stale)

    def _backoff(self, node: Node) -> float:
        # An unauthorized node is re-probed promptly the first time so one stray 401 is confirmed fast.
        misses = max(node.failures, node.auth_failures)
        return min(self.MAX_BACKOFF_S, self.settings.refresh_s * (2 ** max(0, misses - 1)))

    def mark_served(self, node: Node, model_id: str) -> None:
        """The node just answered with this model, so it holds it now (the next probe confirms)."""
        node.served[model_id] = time.monotonic()
        for model in node.models:  # the current inventory, which a probe may have replaced meanwhile
            if model.id == model_id:
                model.loaded = True

    def report_failure(self, node: Node, reason: str, auth: bool = False) -> None:
        """The data plane saw a node fail: re-probe it now instead of waiting for the next period."""
        node.last_error = reason
        if auth:
            node.auth_failures += 1
        self.report_change(node)

    def report_change(self, node: Node) -> None:
        """Something the data plane did changed the node (a JIT load, a failure): re-read it now, or
        right after the probe already running, which may have read the node before the change."""
        if node.id in self._probing:
            self._probe_again.add(node.id)
            return
        task = asyncio.get_running_loop().create_task(self.probe(node))
        self._probing[node.id] = task
        task.add_done_callback(lambda _t: self._probe_done(node))

    def _probe_done(self, node: Node) -> None:
        self._probing.pop(node.id, None)
        if node.id in self._probe_again:
            self._probe_again.discard(node.id)
            self.report_change(node)

    async def refresh_forever(self) -> None:
        while True:
            now = time.monotonic()
            due = [n for n in self.nodes.values() if n.admin_state != "disabled" and n.next_probe <= now]
            if due:
                await asyncio.gather(*(self.probe(n) for n in due), return_exceptions=True)
            upcoming = [n.next_probe for n in self.nodes.values() if n.admin_state != "disabled"]
            delay = max(0.05, min(upcoming, default=now + self.settings.refresh_s) - time.monotonic())
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    def wake(self) -> None:
        self._wake.set()

    async def add_discovered(self, found: list[Found]) -> None:
        """What discovery found joins as untrusted: discovery is not permission."""
        for item in found:
            if self.by_url(split_node_spec(item.url)[0]) is None:
                await self.add(item.url, trusted=False, source="discovered")
                item.added = True

    async def find_local_nodes(self) -> None:
        """With no nodes configured, look for LM Studio and Ollama on this machine; its owner runs us."""
        for port in DISCOVERY_PORTS:
            url = f"http://127.0.0.1:{port}"
            result = await interrogate(self.clients.probe, url, None, 1.0)
            if result.health != "offline":
                log.info("found a local %s node at %s", result.kind, url)
                await self.add(url, trusted=True, source="local")


# ── discovery: finds endpoints on private networks; discovery is not permission (found = untrusted) ───────

DISCOVERY_PORTS = (LMSTUDIO_PORT, OLLAMA_PORT)

MAX_SCAN_ADDRESSES = 65_536


@dataclass
class Found:
    url: str
    kind: str
    version: str | None
    models: list[str]
    health: str
    added: bool = False

    def public(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def scan_targets(subnets: Sequence[str], ports: Sequence[int], allow_public: bool) -> list[str]:
    hosts: list[str] = []
    for cidr in subnets:
        try:
            net = ipaddress.ip_network(cidr, strict=False)
        except ValueError as exc:
            raise NodeRefused(f"not a subnet: {cidr!r} ({exc})") from None
        if not allow_public and not (net.is_private or net.is_loopback or net.is_link_local):
            raise NodeRefused(f"{cidr} is not a private or loopback range (use --allow-public to scan it)")
        if net.num_addresses > MAX_SCAN_ADDRESSES:
            raise NodeRefused(
                f"{cidr} has {net.num_addresses} addresses; scan at most {MAX_SCAN_ADDRESSES} at once"
            )
        addresses = list(net.hosts()) if net.num_addresses > 2 else list(net)
        hosts += [f"[{a}]" if a.version == 6 else str(a) for a in addresses]
    return [f"http://{host}:{port}" for host in hosts for port in ports]


async def _port_open(url: str, timeout: float) -> bool:
    parts = urlsplit(url)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, parts.port), timeout)
    except (TimeoutError, OSError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def discover(
    http: aiohttp.ClientSession,
    subnets: Sequence[str],
    ports: Sequence[int],
    *,
    timeout: float = 0.5,
    concurrency: int = 256,
    allow_public: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[Found]:
    """Probe every subnet address on every port concurrently (bounded); interrogate what answers."""
    targets = scan_targets(subnets, ports, allow_public)
    gate = asyncio.Semaphore(concurrency)
    done = 0
    found: list[Found] = []

    async def probe(url: str) -> None:
        nonlocal done
        async with gate:
            if await _port_open(url, timeout):
                result = await interrogate(http, url, None, max(timeout, 2.0))
                if result.health != "offline":
                    found.append(
                        Found(url, result.kind, result.version, [m.id for m in result.models], result.health)
                    )
        done += 1
        if on_progress:
            on_progress(done, len(targets))

    await asyncio.gather(*(probe(url) for url in targets))
    return sorted(found, key=lambda f: f.url)


# ── policy: who may call (keys, share mode, trusted networks), what they may use, and how much ────────────

KEY_PREFIX = "vk-"

DEFAULT_REALM = "personal"


@dataclass
class Realm:
    """A group of keys with its own node set, model allowlist, quotas and cache scope."""

    name: str
    nodes: list[str] = field(default_factory=list)  # empty: every node
    models: list[str] = field(default_factory=list)  # empty: every model
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None

    def public(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Key:
    """A client credential. Only a salted hash of its secret is kept; the secret is shown once."""

    id: str
    name: str
    realm: str
    salt: str
    digest: str
    models: list[str] = field(default_factory=list)
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    expires_at: float | None = None
    created_at: float = field(default_factory=time.time)

    @staticmethod
    def hash(salt: str, secret: str) -> str:
        return hashlib.sha256(f"{salt}:{secret}".encode()).hexdigest()

    def matches(self, secret: str) -> bool:
        return hmac.compare_digest(self.digest, self.hash(self.salt, secret))

    def public(self) -> dict[str, Any]:
        fields = ("id", "name", "realm", "models", "rpm", "tpm", "max_concurrent", "expires_at", "created_at")
        return {k: getattr(self, k) for k in fields} | {"prefix": f"{KEY_PREFIX}{self.id}_…"}


def new_key(name: str, realm: str, **limits: Any) -> tuple[Key, str]:
    key_id, salt = secrets.token_hex(4), secrets.token_hex(8)
    secret = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(24)}"
    return Key(id=key_id, name=name, realm=realm, salt=salt, digest=Key.hash(salt, secret), **limits), secret


@dataclass
class Principal:
    """Who a data-plane request is from: a key, or a key-less caller the share mode lets in."""

    realm: Realm
    key: Key | None = None
    address: str | None = None

    @property
    def key_id(self) -> str | None:
        return self.key.id if self.key else None


class SlidingWindow:
    """Amounts spent in the last `span` seconds, answering when the oldest leaves the window."""

    def __init__(self, span: float = 60.0) -> None:
        self.span = span
        self.entries: deque[tuple[float, int]] = deque()
        self.total = 0

    def _expire(self, now: float) -> None:
        while self.entries and self.entries[0][0] <= now - self.span:
            self.total -= self.entries.popleft()[1]

    def spent(self, now: float) -> int:
        self._expire(now)
        return self.total

    def add(self, now: float, amount: int = 1) -> None:
        if amount:
            self.entries.append((now, amount))
            self.total += amount

    def retry_after(self, now: float) -> int:
        return max(1, math.ceil(self.entries[0][0] + self.span - now)) if self.entries else 1


class Quota:
    """One holder's limits (a key or a realm): requests/min, tokens/min, concurrent requests."""

    def __init__(self, rpm: int | None, tpm: int | None, max_concurrent: int | None) -> None:
        self.rpm, self.tpm, self.max_concurrent = rpm, tpm, max_concurrent
        self.requests, self.tokens = SlidingWindow(), SlidingWindow()
        self.active = 0

    @property
    def limited(self) -> bool:
        return self.rpm is not None or self.tpm is not None or self.max_concurrent is not None

    def refusal(self, now: float) -> tuple[str, int] | None:
        if self.max_concurrent is not None and self.active >= self.max_concurrent:
            return "too many concurrent requests", 1
        if self.rpm is not None and self.requests.spent(now) >= self.rpm:
            return f"more than {self.rpm} requests per minute", self.requests.retry_after(now)
        if self.tpm is not None and self.tokens.spent(now) >= self.tpm:
            return f"more than {self.tpm} tokens per minute", self.tokens.retry_after(now)
        return None


class Policy:
    """Decides who may call, which realm they act in, and whether their quotas allow one more request."""

    def __init__(self, settings: Settings, store: Store, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.share = store.get_setting("share") or settings.share
        self.realms: dict[str, Realm] = {r["name"]: Realm(**r) for r in store.realm_rows()}
        self.realms.setdefault(DEFAULT_REALM, Realm(DEFAULT_REALM))
        self.keys: dict[str, Key] = {k["id"]: Key(**k) for k in store.key_rows()}
        self.networks = [ipaddress.ip_network(c, strict=False) for c in settings.trusted_networks]
        self._quotas: dict[str, Quota] = {}

    # -- share mode ------------------------------------------------------------------------------------

    def set_share(self, mode: str) -> None:
        if mode not in SHARE_MODES:
            raise HTTPError(
                400, f"`mode` must be one of {', '.join(SHARE_MODES)}.", "invalid_request", param="mode"
            )
        self.share = mode
        self.store.set_setting("share", mode)

    def trusted_address(self, address: str | None) -> bool:
        try:
            ip = ipaddress.ip_address(address or "")
        except ValueError:
            return False
        return any(ip in net for net in self.networks)

    def keyless_allowed(self, address: str | None) -> bool:
        if self.share == "local":
            return is_loopback(address)
        if self.share == "lan":
            return is_loopback(address) or self.trusted_address(address)
        return False

    # -- keys ------------------------------------------------------------------------------------------

    def create_key(self, name: str, realm: str, **limits: Any) -> tuple[Key, str]:
        if realm not in self.realms:
            raise HTTPError(400, f"No realm `{realm}`; create it first.", "realm_not_found", param="realm")
        key, secret = new_key(name, realm, **limits)
        self.keys[key.id] = key
        self.store.save_key(dataclasses.asdict(key))
        return key, secret

    def revoke_key(self, key_id: str) -> bool:
        self.store.delete_key(key_id)
        self._quotas.pop(f"key:{key_id}", None)
        return self.keys.pop(key_id, None) is not None

    def key_for(self, secret: str) -> Key | None:
        body = secret[len(KEY_PREFIX) :]
        key_id, sep, _ = body.partition("_")
        key = self.keys.get(key_id) if sep else None
        if key is None or not key.matches(secret):
            return None
        if key.expires_at is not None and key.expires_at <= time.time():
            return None
        return key

    def save_realm(self, realm: Realm) -> None:
        self.realms[realm.name] = realm
        self._quotas.pop(f"realm:{realm.name}", None)
        self.store.save_realm(realm.public())

    # -- per request -----------------------------------------------------------------------------------

    def identify(self, credential: str | None, address: str | None) -> Principal:
        """Who is calling, or HTTPError 401/503: a valid key works in every share mode but `off`."""
        if self.share == "off":
            raise unavailable("The owner has stopped sharing for now.", "sharing_off", retry_after=60)
        if credential and credential.startswith(KEY_PREFIX):
            key = self.key_for(credential)
            if key is None:
                raise HTTPError(
                    401, "The Vampire key is not valid (revoked, expired or mistyped).", "invalid_api_key"
                )
            return Principal(self.realms.get(key.realm) or self.realms[DEFAULT_REALM], key, address)
        if self.keyless_allowed(address):
            return Principal(self.realms[DEFAULT_REALM], None, address)
        raise HTTPError(
            401,
            "A Vampire key (vk-…) is required: send it as `Authorization: Bearer <key>`.",
            "invalid_api_key",
        )

    def check_model(self, principal: Principal, model: str) -> None:
        for allowed, holder in (
            (principal.key.models if principal.key else [], "key"),
            (principal.realm.models, "realm"),
        ):
            if (
                allowed
                and model not in allowed
                and model_key(model.rpartition("@")[0] or model) not in allowed
            ):
                raise HTTPError(
                    403, f"This {holder} may not use the model `{model}`.", "model_not_allowed", param="model"
                )

    def quotas(self, principal: Principal) -> list[Quota]:
        realm = principal.realm
        held = [self._quota(f"realm:{realm.name}", realm.rpm, realm.tpm, realm.max_concurrent)]
        if principal.key:
            key = principal.key
            held.append(self._quota(f"key:{key.id}", key.rpm, key.tpm, key.max_concurrent))
        return held

    def _quota(self, name: str, rpm: int | None, tpm: int | None, concurrent: int | None) -> Quota:
        quota = self._quotas.get(name)
        if quota is None:
            quota = self._quotas[name] = Quota(rpm, tpm, concurrent)
        return quota

    def admit(self, principal: Principal) -> list[Quota]:
        """Count one request against every quota that applies, or refuse with 429 and Retry-After."""
        if self.share == "off":  # switched off while this request was still arriving
            raise unavailable("The owner has stopped sharing for now.", "sharing_off", retry_after=60)
        held = [q for q in self.quotas(principal) if q.limited]
        if not held:
            return held
        now = self.clock()
        for quota in held:
            refusal = quota.refusal(now)
            if refusal:
                reason, wait = refusal
                raise HTTPError(
                    429, f"Rate limit: {reason}.", "rate_limit_exceeded", headers={"Retry-After": str(wait)}
                )
        for quota in held:
            if quota.rpm is not None:
                quota.requests.add(now)
            quota.active += 1
        return held

    def settle(self, held: list[Quota], tokens: int) -> None:
        now = self.clock()
        for quota in held:
            quota.active -= 1
            if quota.tpm is not None:
                quota.tokens.add(now, tokens)

    def allowed_nodes(self, principal: Principal) -> set[str] | None:
        return set(principal.realm.nodes) if principal.realm.nodes else None


def credential_of(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The client's key, from `Authorization: Bearer …` or Anthropic's `x-api-key`."""
    for name, value in headers:
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            return value[7:].decode("latin-1").strip()
        if name == b"x-api-key":
            return value.decode("latin-1").strip()
    return None


# ── router: picks the node that will answer best: hot model first, then free slots, then latency ──────────

AUTO_MODEL = "vampire:auto"

STRATEGIES = ("auto", "round_robin", "least_busy", "least_latency", "model_affinity", "trusted_only")


# Strategies that wait for a slot where the model is hot rather than trigger a JIT load elsewhere: a load
# costs seconds to a minute and, with LM Studio's auto-evict, throws out the model that node was serving.
HOT_FIRST = frozenset({"auto", "model_affinity", "trusted_only"})

IMAGE_PART_TYPES = frozenset({"image_url", "image", "input_image"})

OWNER_SOURCES = frozenset({"config", "local", "demo"})


@dataclass
class Needs:
    """What a request asks of a model, read cheaply from its body."""

    kind: str = "other"  # chat | completion | embedding | other
    vision: bool = False
    tools: bool = False
    prompt_tokens: int = 0


def needs_of(kind: str, payload: dict[str, Any], body: bytes) -> Needs:
    # Only bodies that mention "image" are walked, so plain text requests pay one bytes search.
    vision = b"image" in body and _has_image_part(payload.get("messages") or payload.get("input"))
    return Needs(kind, vision, bool(payload.get("tools")), len(body) // 4)


def conversation_key(model: str, payload: dict[str, Any]) -> str | None:
    """A conversation is known by its opening messages: later turns repeat them, so they hash alike and
    return to the node that already holds the conversation's prompt cache."""
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    opening = json.dumps(messages[:2], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(f"{model}\n{opening}".encode(), digest_size=12).hexdigest()


RESPONSE_ID_RE = re.compile(rb'"id"\s*:\s*"(resp_[^"]+)"')


def _has_image_part(value: Any, depth: int = 0) -> bool:
    if depth > 6:
        return False
    if isinstance(value, dict):
        return value.get("type") in IMAGE_PART_TYPES or any(
            _has_image_part(v, depth + 1) for v in value.values()
        )
    if isinstance(value, list):
        return any(_has_image_part(v, depth + 1) for v in value)
    return False


def misfit(model: ModelInfo, needs: Needs) -> str | None:
    """Why this model cannot serve the request, or None when it can."""
    if needs.kind == "embedding" and model.type != "embedding":
        return "not an embedding model"
    if needs.kind in ("chat", "completion") and model.type == "embedding":
        return "an embedding model cannot generate text"
    if needs.vision and model.type != "vlm" and "vision" not in model.capabilities:
        return "no vision: the request has image parts"
    if needs.tools and model.capabilities_known and "tools" not in model.capabilities:
        return "not trained for tool use"
    if model.loaded and model.context_length and needs.prompt_tokens > model.context_length:
        tokens = needs.prompt_tokens
        return f"loaded context {model.context_length} is shorter than the prompt (~{tokens} tokens)"
    return None


@dataclass
class Target:
    node: Node
    model: ModelInfo

    @property
    def upstream_model(self) -> str:
        return self.model.id

    @property
    def capacity(self) -> int:
        return max(1, self.model.slots * self.node.tier // 100)

    @property
    def busy(self) -> int:
        return self.node.busy.get(self.model.id, 0)

    @property
    def warm(self) -> bool:
        """Loaded, or being loaded by one of our requests (a probe mid-load would still say not loaded)."""
        return self.model.loaded or self.model.id in self.node.warming


@dataclass
class Route:
    """A named virtual model: ordered targets, a strategy, and a fallback model when none is available."""

    id: str
    model: str
    targets: list[dict[str, str]]
    strategy: str = "auto"
    fallback: str | None = None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Route:
        route_id = body.get("id") or body.get("model")
        if not isinstance(route_id, str) or not route_id or "@" in route_id:
            raise HTTPError(400, "A route needs an `id` (without `@`).", "invalid_request", param="id")
        targets = body.get("targets")
        if (
            not isinstance(targets, list)
            or not targets
            or not all(isinstance(t, dict) and t.get("model") for t in targets)
        ):
            raise HTTPError(
                400, "`targets` is a non-empty list of {model, node?}.", "invalid_request", param="targets"
            )
        strategy = body.get("strategy") or "auto"
        if strategy not in STRATEGIES:
            raise HTTPError(
                400,
                f"`strategy` must be one of {', '.join(STRATEGIES)}.",
                "invalid_request",
                param="strategy",
            )
        fallback = body.get("fallback")
        return cls(
            id=route_id,
            model=str(body.get("model") or route_id),
            targets=[
                {"model": str(t["model"]), **({"node": str(t["node"])} if t.get("node") else {})}
                for t in targets
            ],
            strategy=strategy,
            fallback=str(fallback) if fallback else None,
        )

    def public(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Plan:
    targets: list[Target]
    strategy: str
    route: str | None = None


class BoundedMap:
    """A small LRU map (sessions, response ids -> node) that forgets the oldest entries first."""

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self.data: dict[str, str] = {}

    def get(self, key: str | None) -> str | None:
        return None if key is None else self.data.get(key)

    def put(self, key: str, value: str) -> None:
        self.data.pop(key, None)
        self.data[key] = value
        if len(self.data) > self.limit:
            self.data.pop(next(iter(self.data)))


class Router:
    """Resolves a requested model to an ordered list of candidate (node, model) targets."""

    MAX_FALLBACK_DEPTH = 4

    def __init__(self, registry: Registry, store: Store) -> None:
        self.registry = registry
        self.store = store
        self.routes: dict[str, Route] = {r["id"]: Route(**r) for r in store.routes()}
        self.sessions = BoundedMap()
        self.responses = BoundedMap()
        self._affinity: dict[str, str] = {}
        self._turn: dict[str, int] = {}
        self._index: dict[str, list[Target]] = {}
        self._keys: dict[str, list[Target]] = {}
        self._built = -1
        self._routable_nodes = 0

    # -- the index of routable (node, model) pairs, rebuilt only when the registry changed ------------

    def index(self) -> dict[str, list[Target]]:
        if self._built != self.registry.version:
            index: dict[str, list[Target]] = {}
            keys: dict[str, list[Target]] = {}
            for node in self.registry.nodes.values():
                if node.routable:
                    for model in node.models:
                        index.setdefault(model.id, []).append(Target(node, model))
                        keys.setdefault(model.key, []).append(Target(node, model))
            self._index, self._keys, self._built = index, keys, self.registry.version
            self._routable_nodes = sum(1 for n in self.registry.nodes.values() if n.routable)
        return self._index

    def model_ids(self) -> list[str]:
        return sorted(self.index())

    def choice_of_nodes(self) -> bool:
        """Whether stickiness can matter: more than one routable node, so a conversation could move."""
        self.index()
        return self._routable_nodes > 1

    # -- routes -----------------------------------------------------------------------------------------

    def save_route(self, route: Route) -> None:
        self.routes[route.id] = route
        self.store.save_route(route.public())

    def delete_route(self, route_id: str) -> bool:
        self.store.delete_route(route_id)
        return self.routes.pop(route_id, None) is not None

    def route_for(self, requested: str) -> Route | None:
        return self.routes.get(requested) or next(
            (r for r in self.routes.values() if r.model == requested), None
        )

    # -- planning ---------------------------------------------------------------------------------------

    def plan(
        self,
        requested: str,
        needs: Needs,
        strategy: str | None = None,
        session: str | None = None,
        previous_response: str | None = None,
        depth: int = 0,
    ) -> Plan:
        route = self.route_for(requested)
        strategy = strategy or (route.strategy if route else "auto")
        if route is None:
            targets = self.order(self._fit(requested, self.lookup(requested), needs), strategy, requested)
        else:
            targets = self._route_targets(route, needs, strategy)
            if not targets and route.fallback and depth < self.MAX_FALLBACK_DEPTH:
                return self.plan(route.fallback, needs, strategy, session, previous_response, depth + 1)
            if not targets:
                raise unavailable(f"No target of route `{route.id}` is available right now.")
        now = time.monotonic()
        allowed = [t for t in targets if t.node.circuit.allows(now)]
        if not allowed:
            raise unavailable(
                f"Every node serving `{requested}` is failing; retrying shortly.", "circuit_open"
            )
        sticky = self.responses.get(previous_response) or (
            self.sessions.get(session) if strategy in ("auto", "model_affinity") else None
        )
        if sticky:
            allowed.sort(key=lambda t: t.node.id != sticky)
        return Plan(allowed, strategy, route.id if route else None)

    def _route_targets(self, route: Route, needs: Needs, strategy: str) -> list[Target]:
        targets: list[Target] = []
        for spec in route.targets:
            ref = f"{spec['model']}@{spec['node']}" if spec.get("node") else spec["model"]
            try:
                found = self.lookup(ref)
            except HTTPError:
                continue  # a target that is gone or down just doesn't contribute
            fit = [t for t in found if misfit(t.model, needs) is None]
            targets += [t for t in self.order(fit, strategy, spec["model"]) if t not in targets]
        return targets

    def lookup(self, requested: str) -> list[Target]:
        """Every routable target offering `requested` (exact id, pin, then key); 404 when nobody does."""
        index = self.index()
        if requested == AUTO_MODEL:
            targets = [
                t for ts in index.values() for t in ts if t.model.type != "embedding" and t.model.loaded
            ]
            if not targets:
                raise unavailable("No chat model is loaded on any available node.")
            return targets
        targets = index.get(requested) or self._pinned(requested) or self._keys.get(model_key(requested), [])
        if not targets:
            self.raise_unknown(requested)
        return targets

    def _pinned(self, requested: str) -> list[Target]:
        model, sep, node_ref = requested.rpartition("@")
        node = self.registry.find(node_ref) if sep else None
        if node is None:
            return []
        if not node.routable:
            raise unavailable(
                f"Node `{node_ref}` is {node.state if node.trusted else 'not trusted'}.", "node_unavailable"
            )
        exact = [Target(node, m) for m in node.models if m.id == model]
        return exact or [Target(node, m) for m in node.models if m.key == model_key(model)]

    def raise_unknown(self, requested: str) -> None:
        known = self.model_ids()
        if not known:
            raise unavailable("No node is available right now.")
        listed = ", ".join([AUTO_MODEL, *sorted(self.routes), *known])
        raise HTTPError(
            404,
            f"The model `{requested}` does not exist. Available models: {listed}.",
            "model_not_found",
            param="model",
        )

    def _fit(self, requested: str, targets: list[Target], needs: Needs) -> list[Target]:
        fit = [t for t in targets if misfit(t.model, needs) is None]
        if not fit:
            reason = misfit(targets[0].model, needs)
            raise HTTPError(
                400,
                f"The model `{requested}` cannot serve this request: {reason}.",
                "unsupported_capability",
                param="model",
            )
        return fit

    def order(self, targets: list[Target], strategy: str, model: str) -> list[Target]:
        if strategy == "round_robin":
            ring = sorted(targets, key=lambda t: t.node.id)
            turn = self._turn[model] = self._turn.get(model, -1) + 1
            return ring[turn % len(ring) :] + ring[: turn % len(ring)] if ring else ring
        if strategy == "least_busy":
            return sorted(targets, key=lambda t: (t.busy / t.capacity, not t.warm, t.node.latency_ms or 0.0))
        if strategy == "least_latency":
            return sorted(targets, key=lambda t: (t.node.latency_ms or 0.0, not t.warm))
        if strategy == "model_affinity":
            last = self._affinity.get(model)
            return sorted(targets, key=lambda t: (not t.warm, t.node.id != last, *score(t)[1:]))
        if strategy == "trusted_only":
            targets = [t for t in targets if t.node.source in OWNER_SOURCES]
        return sorted(targets, key=score)

    def remember(self, model: str | None, node: Node, session: str | None) -> None:
        if model:
            self._affinity[model] = node.id
        if session:
            self.sessions.put(session, node.id)

    # -- explanation (the same rules, with every rejection spelled out) ---------------------------------

    def explain(self, requested: str, needs: Needs, strategy: str | None = None) -> dict[str, Any]:
        rejected: list[dict[str, Any]] = []
        wanted = model_key(requested.rpartition("@")[0] or requested)
        for node in self.registry.nodes.values():
            reason = self._node_rejection(node)
            if reason:
                rejected.append({"node": node.id, "reason": reason})
                continue
            offered = [m for m in node.models if m.key == wanted]
            if not offered and requested != AUTO_MODEL and self.route_for(requested) is None:
                rejected.append({"node": node.id, "reason": f"does not offer `{requested}`"})
            rejected += [
                {"node": node.id, "model": m.id, "reason": why} for m in offered if (why := misfit(m, needs))
            ]
        try:
            plan = self.plan(requested, needs, strategy)
            candidates, error = plan.targets, None
            strategy = plan.strategy
        except HTTPError as exc:
            candidates, error = [], {"status": exc.status, "code": exc.code, "message": exc.message}
        return {
            "model": requested,
            "strategy": strategy or "auto",
            "error": error,
            "candidates": [
                {
                    "node": t.node.id,
                    "model": t.model.id,
                    "loaded": t.model.loaded,
                    "warming": t.model.id in t.node.warming,
                    "busy": t.busy,
                    "capacity": t.capacity,
                    "latency_ms": t.node.latency_ms,
                    "score": list(score(t)),
                    "circuit": t.node.circuit.state,
                }
                for t in candidates
            ],
            "rejected": rejected,
        }

    @staticmethod
    def _node_rejection(node: Node) -> str | None:
        if not node.trusted:
            return "not trusted (discovery is not permission: `vampire nodes trust` it)"
        if node.state != "online":
            return f"node is {node.state}"
        if node.circuit.state == "open":
            return "circuit open after repeated failures"
        return None

    def any_node(self) -> Plan:
        """For `/v1/*` calls that name no model: the best trusted online node, whatever it holds."""
        nodes = sorted(
            (n for n in self.registry.nodes.values() if n.routable),
            key=lambda n: (n.in_flight, n.latency_ms or 0),
        )
        if not nodes:
            raise unavailable("No node is available right now.")
        return Plan([Target(n, n.models[0] if n.models else ModelInfo(id="")) for n in nodes], "auto")


def score(target: Target) -> tuple[int, int, float, float]:
    """`auto`: loaded first (a JIT load costs seconds to a minute); for a cold load, a node where it would
    evict nothing (LM Studio's auto-evict unloads the previous JIT model); then free slots; then latency."""
    node = target.node
    if target.warm:
        return (0, 0, target.busy / target.capacity, node.latency_ms or 0.0)
    resident = sum(1 for m in node.models if (m.loaded or m.id in node.warming) and m.type != "embedding")
    return (1, resident, target.busy / target.capacity, node.latency_ms or 0.0)


# ── admission: per-(node, model) slots x tier; a bounded queue when every slot is taken ───────────────────


class Admission:
    """Per-(node, model) in-flight limits (slots x tier) and one bounded FIFO queue for requests that
    find every candidate full; a stream holds its slot until it ends."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.waiters: deque[asyncio.Future[None]] = deque()

    @staticmethod
    def has_room(target: Target) -> bool:
        return target.busy < target.capacity

    @staticmethod
    def acquire(target: Target) -> None:
        node = target.node
        node.in_flight += 1
        node.busy[target.model.id] = node.busy.get(target.model.id, 0) + 1

    def release(self, target: Target) -> None:
        node = target.node
        node.in_flight -= 1
        node.busy[target.model.id] -= 1
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    async def wait(self, deadline: float) -> None:
        if len(self.waiters) >= self.settings.queue_max:
            raise unavailable("The request queue is full.", "queue_full", retry_after=2)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise unavailable(
                "Every node holding this model stayed busy; try again.", "queue_timeout"
            ) from None
        finally:
            if not waiter.done():
                waiter.cancel()
            with contextlib.suppress(ValueError):
                self.waiters.remove(waiter)


# ── cache: identical concurrent requests share one upstream call; deterministic answers are kept ──────────

CACHE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/messages"})

TRANSPORT_FIELDS = frozenset({"stream", "stream_options", "vampire"})


def deterministic(path: str, payload: dict[str, Any]) -> bool:
    """Same request, same answer: temperature 0, a pinned seed, or an embedding."""
    if path == "/v1/embeddings":
        return True
    temperature = payload.get("temperature")
    seed = payload.get("seed")
    return (
        isinstance(temperature, int | float) and not isinstance(temperature, bool) and temperature == 0
    ) or (isinstance(seed, int) and not isinstance(seed, bool))


def canonical_request(path: str, payload: dict[str, Any]) -> str:
    """The request with key order, whitespace and transport fields (stream, stream_options) ignored."""
    body = {k: v for k, v in payload.items() if k not in TRANSPORT_FIELDS}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(f"{path}\n{text}".encode()).hexdigest()


def fingerprint(model: ModelInfo, node: Node) -> str:
    """What a cached answer depends on besides the request: the model as this node serves it."""
    return f"{model.id}|{model.quantization}|{model.format}|{node.kind}|{node.version}"


@dataclass(frozen=True)
class CacheKey:
    """The one home of de-duplication keys: a request's realm (answers never cross realms) and canonical
    form, completed by the requested model for a flight in progress, or by the answering model's
    fingerprint for a finished answer (which goes stale when that model changes under its id)."""

    realm: str
    canonical: str

    def flight(self, model: str | None) -> str:
        return f"{self.realm}|{self.canonical}|{model}"

    def answer(self, fingerprint: str) -> str:
        return f"{self.realm}|{self.canonical}|{fingerprint}"


@dataclass
class Result:
    """A finished upstream answer as the gateway relayed it: status, headers and body messages in order."""

    status: int
    headers: list[tuple[bytes, bytes]]
    chunks: list[bytes]
    streamed: bool
    fingerprint: str = ""
    created: float = field(default_factory=time.monotonic)

    @property
    def size(self) -> int:
        return sum(len(c) for c in self.chunks) + sum(len(k) + len(v) for k, v in self.headers) + 64


class ResultCache:
    """LRU bounded by bytes, with a TTL; entries never cross realms (the realm is part of every key)."""

    def __init__(self, max_bytes: int, ttl_s: float) -> None:
        self.max_bytes, self.ttl_s = max_bytes, ttl_s
        self.entries: dict[str, Result] = {}
        self.bytes = 0
        self.hits = self.misses = self.coalesced = self.saved = 0

    def get(self, key: str) -> Result | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        if time.monotonic() - entry.created > self.ttl_s:
            self._drop(key)
            return None
        self.entries[key] = self.entries.pop(key)  # most recently used goes last
        return entry

    def put(self, key: str, result: Result) -> None:
        if result.size > self.max_bytes:
            return
        if key in self.entries:
            self._drop(key)
        self.entries[key] = result
        self.bytes += result.size
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self.entries)))

    def _drop(self, key: str) -> None:
        self.bytes -= self.entries.pop(key).size

    def invalidate(self, fingerprints: set[str]) -> int:
        """A model changed under its id (new quantization, format, node version): its answers go."""
        stale = [k for k, e in self.entries.items() if e.fingerprint in fingerprints]
        for key in stale:
            self._drop(key)
        return len(stale)

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0

    def stats(self) -> dict[str, Any]:
        return {
            "entries": len(self.entries),
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
            "ttl_s": self.ttl_s,
            "hits": self.hits,
            "misses": self.misses,
            "coalesced": self.coalesced,
            "upstream_calls_saved": self.saved,
        }


class Flight:
    """One upstream call that any number of identical requests are waiting on. Every message the relay
    sends is kept, so a waiter that joins late still gets the whole answer from its first byte, live."""

    def __init__(self, key: str, streamed: bool) -> None:
        self.key = key
        self.streamed = streamed
        self.messages: list[Message] = []
        self.done = False
        self.error: HTTPError | None = None
        self.waiters = 0
        self.task: asyncio.Task[None] | None = None
        self.node: Node | None = None
        self.upstream_model: str | None = None
        self._changed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @classmethod
    def replay(cls, result: Result) -> Flight:
        """A finished flight rebuilt from the cache: readers replay it exactly as they would a live one."""
        flight = cls("", result.streamed)
        flight.messages = [
            {"type": "http.response.start", "status": result.status, "headers": result.headers}
        ]
        if result.streamed:
            flight.messages += [
                {"type": "http.response.body", "body": c, "more_body": True} for c in result.chunks
            ]
            flight.messages.append({"type": "http.response.body", "body": b""})
        else:
            flight.messages.append({"type": "http.response.body", "body": b"".join(result.chunks)})
        flight.done = True
        return flight

    async def sink(self, message: Message) -> None:
        """The relay's `send`: keep the message and wake every waiter."""
        self.messages.append(message)
        self._wake()

    def finish(self, error: HTTPError | None = None) -> None:
        self.done, self.error = True, error
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.get_running_loop().create_future()
        changed.set_result(None)

    async def changed(self) -> None:
        await asyncio.shield(self._changed)

    def result(self) -> Result | None:
        """The whole answer, if it completed cleanly (a 200 with no error frame)."""
        if self.error or not self.messages or self.messages[0].get("status") != 200:
            return None
        start, body = self.messages[0], [m.get("body", b"") for m in self.messages[1:]]
        return Result(200, list(start["headers"]), [c for c in body if c], self.streamed)


class Coalescer:
    """Cache hits, and flights that several identical requests read: the gateway's de-duplication."""

    def __init__(self, gateway: Gateway, cache: ResultCache) -> None:
        self.gateway = gateway
        self.cache = cache
        self.flights: dict[str, Flight] = {}

    async def serve(self, call: Call, plan: Plan, receive: Receive, send: Send) -> None:
        assert call.principal is not None and call.payload is not None
        keys = CacheKey(call.principal.realm.name, canonical_request(call.path, call.payload))
        if call.cacheable:
            for target in plan.targets:
                result = self.cache.get(keys.answer(fingerprint(target.model, target.node)))
                if result is not None:
                    self.cache.hits += 1
                    self.cache.saved += 1
                    call.node, call.upstream_model, call.cache_status = (
                        target.node,
                        target.upstream_model,
                        "hit",
                    )
                    await self.deliver(call, Flight.replay(result), receive, send)
                    return
        key = keys.flight(call.model)
        flight = self.flights.get(key) if call.coalescable else None
        if flight is None:
            flight = self.launch(call, plan, keys)
            self.cache.misses += 1
            call.cache_status = "miss"
        else:
            self.cache.coalesced += 1
            self.cache.saved += 1
            call.cache_status = "coalesced"
        await self.deliver(call, flight, receive, send)

    def launch(self, call: Call, plan: Plan, keys: CacheKey) -> Flight:
        flight = Flight(keys.flight(call.model), call.stream)
        shared = call.fork(self.gateway.next_request_id())
        if call.coalescable:
            self.flights[flight.key] = flight
        flight.task = asyncio.get_running_loop().create_task(self.fly(flight, shared, plan, keys))
        return flight

    async def fly(self, flight: Flight, shared: Call, plan: Plan, keys: CacheKey) -> None:
        """The one upstream call: the ordinary relay (failover, admission, metering), into the flight."""
        error: HTTPError | None = None
        try:
            await self.gateway.relay(shared, plan, flight.sink)
        except HTTPError as exc:
            error = exc
        except asyncio.CancelledError:
            error = unavailable("Every client waiting for this answer has gone.", "cancelled")
        except Exception:
            log.exception("shared request %s failed", shared.request_id)
            error = HTTPError(500, "Internal gateway error.", "internal_error")
        finally:
            if self.flights.get(flight.key) is flight:
                del self.flights[flight.key]
            flight.node, flight.upstream_model = shared.node, shared.upstream_model
            flight.finish(error)
        result = flight.result() if shared.error is None and error is None else None
        if result is not None and shared.cacheable and shared.node is not None:
            model = next((m for m in shared.node.models if m.id == shared.upstream_model), None)
            if model is not None:
                result.fingerprint = fingerprint(model, shared.node)
                self.cache.put(keys.answer(result.fingerprint), result)

    async def deliver(self, call: Call, flight: Flight, receive: Receive, send: Send) -> None:
        flight.waiters += 1
        try:
            await self.gateway.watching(call, receive, self.read(call, flight, send))
        finally:
            flight.waiters -= 1
            if flight.waiters == 0 and not flight.done and flight.task is not None:
                flight.task.cancel()  # nobody is left to read the answer: stop the node generating it

    async def read(self, call: Call, flight: Flight, send: Send) -> None:
        convert = call.path != "/v1/embeddings" and call.stream != flight.streamed
        if convert:
            while not flight.done:
                await flight.changed()
        index, strip = 0, UsageFrameFilter() if call.stream and not call.client_usage else None
        while True:
            while index < len(flight.messages):
                message = flight.messages[index]
                index += 1
                if message["type"] == "http.response.start":
                    if convert:
                        await self.send_converted(call, flight, message, send)
                        return
                    await send(self.restart(call, flight, message))
                    continue
                body = message.get("body", b"")
                call.meter.feed(body)
                if strip is not None:
                    body = strip.feed(body) + (b"" if message.get("more_body") else strip.flush())
                call.finished = not message.get("more_body", False)
                await send({**message, "body": body})
                if call.finished:
                    return
            if flight.done:
                if flight.error is not None and not call.status:
                    raise flight.error
                return
            await flight.changed()

    def restart(self, call: Call, flight: Flight, start: Message) -> Message:
        """The flight's response head, made this client's own: its request id and its cache outcome."""
        call.status, call.node, call.upstream_model = start["status"], flight.node, flight.upstream_model
        headers = [
            (k, v) for k, v in start["headers"] if k not in (b"x-vampire-request-id", b"x-vampire-cache")
        ]
        headers += [
            (b"x-vampire-request-id", call.request_id.encode()),
            (b"x-vampire-cache", call.cache_status.encode()),
        ]
        return {**start, "headers": headers}

    async def send_converted(self, call: Call, flight: Flight, start: Message, send: Send) -> None:
        """A streaming twin of a JSON answer, or a JSON twin of a streamed one."""
        chunks = [m.get("body", b"") for m in flight.messages[1:]]
        if start["status"] != 200:
            body = b"".join(chunks)
            frames = [body]
            content_type = dict(start["headers"]).get(b"content-type", b"application/json")
        elif call.stream:
            frames = json_to_stream(call.path, b"".join(chunks), call.client_usage)
            content_type = b"text/event-stream"
        else:
            frames = [stream_to_json(call.path, chunks)]
            content_type = b"application/json"
        for frame in frames:
            call.meter.feed(frame)
        head = self.restart(call, flight, start)
        keep = [(k, v) for k, v in head["headers"] if k not in (b"content-type", b"content-length")]
        body = b"".join(frames)
        head["headers"] = [
            *keep,
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
        ]
        call.finished = True
        await send(head)
        await send({"type": "http.response.body", "body": body})


# ── surfaces: token counts read from passing bytes; stream error frames; JSON <-> SSE <-> Anthropic ───────


class UsageMeter:
    """Reads token counts out of response bytes as they pass — no JSON parsing on the hot path. The last
    count seen wins, which is right for every surface (OpenAI usage chunk, Anthropic message_delta,
    Responses response.completed, Ollama's final line)."""

    PROMPT = re.compile(rb'"(?:prompt_tokens|input_tokens|prompt_eval_count)"\s*:\s*(\d+)')
    COMPLETION = re.compile(rb'"(?:completion_tokens|output_tokens|eval_count)"\s*:\s*(\d+)')

    __slots__ = ("completion", "prompt", "tail")

    def __init__(self) -> None:
        self.prompt: int | None = None
        self.completion: int | None = None
        self.tail = b""

    def feed(self, data: bytes) -> None:
        seam = self.tail + data[:32]  # a key split across two chunks is still found
        if b"tokens" in data or b"_count" in data or b"tokens" in seam or b"_count" in seam:
            window = self.tail + data
            for match in self.PROMPT.finditer(window):
                self.prompt = int(match.group(1))
            for match in self.COMPLETION.finditer(window):
                self.completion = int(match.group(1))
        self.tail = data[-64:]

    @property
    def total(self) -> int:
        return (self.prompt or 0) + (self.completion or 0)


class UsageFrameFilter:
    """Removes the usage chunk the gateway asked for on the client's behalf, so the client gets exactly the
    stream it requested. Frames pass through whole and unchanged; only a `choices: []` usage frame is
    dropped."""

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self.pending + chunk if self.pending else chunk
        cut = data.rfind(b"\n\n")
        if cut < 0:
            self.pending = data
            return b""
        if cut + 2 == len(data):  # the usual case: whole frames, nothing held back, nothing copied
            complete, self.pending = data, b""
        else:
            complete, self.pending = data[: cut + 2], data[cut + 2 :]
        if b'"usage"' not in complete:
            return complete
        return b"".join(
            frame + b"\n\n" for frame in complete.split(b"\n\n")[:-1] if not _is_usage_frame(frame)
        )

    def flush(self) -> bytes:
        rest, self.pending = self.pending, b""
        return rest


def _is_usage_frame(frame: bytes) -> bool:
    if not frame.startswith(b"data: ") or b'"usage"' not in frame:
        return False
    try:
        chunk = json.loads(frame[6:])
    except ValueError:
        return False
    return isinstance(chunk, dict) and chunk.get("choices") == [] and chunk.get("usage") is not None


def stream_error_frame(surface: str, content_type: bytes, message: str) -> bytes:
    """What ends a stream that failed after its first byte: an error in the stream's own format, then
    the stream's normal end, so no client mistakes a cut-off answer for a complete one."""
    if b"ndjson" in content_type:
        return json.dumps({"error": message}).encode() + b"\n"
    if surface == "anthropic":
        payload = json.dumps({"type": "error", "error": {"type": "api_error", "message": message}})
        return f"event: error\ndata: {payload}\n\n".encode()
    payload = json.dumps({"error": {"message": message, "type": "server_error", "code": "upstream_failed"}})
    return f"data: {payload}\n\ndata: [DONE]\n\n".encode()


# OpenAI and Anthropic answers convert between one JSON body and an event stream, so a streaming and a
# non-streaming twin can share one upstream call and one cache entry.


def _sse_payloads(chunks: Iterable[bytes]) -> list[tuple[str | None, Any]]:
    events: list[tuple[str | None, Any]] = []
    for frame in b"".join(chunks).split(b"\n\n"):
        name, data = None, None
        for line in frame.split(b"\n"):
            if line.startswith(b"event:"):
                name = line[6:].strip().decode()
            elif line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
                with contextlib.suppress(ValueError):
                    data = json.loads(line[5:])
        if data is not None:
            events.append((name, data))
    return events


def stream_to_json(path: str, chunks: Iterable[bytes]) -> bytes:
    events = _sse_payloads(chunks)
    if path == "/v1/messages":
        return json.dumps(_anthropic_from_events(events)).encode()
    return json.dumps(_openai_from_chunks(path, [data for _, data in events])).encode()


def _openai_from_chunks(path: str, chunks: list[dict[str, Any]]) -> dict[str, Any]:
    first = chunks[0] if chunks else {}
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    for chunk in chunks:
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or []:
            slot = choices.setdefault(
                choice.get("index", 0), {"text": [], "role": "assistant", "tools": {}, "finish": None}
            )
            slot["finish"] = choice.get("finish_reason") or slot["finish"]
            if path == "/v1/completions":
                slot["text"].append(choice.get("text") or "")
                continue
            delta = choice.get("delta") or {}
            slot["role"] = delta.get("role") or slot["role"]
            slot["text"].append(delta.get("content") or "")
            for call in delta.get("tool_calls") or []:
                tool = slot["tools"].setdefault(
                    call.get("index", 0),
                    {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
                )
                tool["id"] = call.get("id") or tool["id"]
                fn = call.get("function") or {}
                tool["function"]["name"] += fn.get("name") or ""
                tool["function"]["arguments"] += fn.get("arguments") or ""
    out_choices = []
    for index, slot in sorted(choices.items()):
        if path == "/v1/completions":
            out_choices.append(
                {
                    "index": index,
                    "text": "".join(slot["text"]),
                    "logprobs": None,
                    "finish_reason": slot["finish"],
                }
            )
            continue
        message: dict[str, Any] = {"role": slot["role"], "content": "".join(slot["text"])}
        if slot["tools"]:
            message["tool_calls"] = [t for _, t in sorted(slot["tools"].items())]
        out_choices.append(
            {"index": index, "message": message, "logprobs": None, "finish_reason": slot["finish"]}
        )
    body: dict[str, Any] = {
        "id": first.get("id"),
        "object": "text_completion" if path == "/v1/completions" else "chat.completion",
        "created": first.get("created"),
        "model": first.get("model"),
        "choices": out_choices,
    }
    if first.get("system_fingerprint"):
        body["system_fingerprint"] = first["system_fingerprint"]
    if usage:
        body["usage"] = usage
    return body


def _anthropic_from_events(events: list[tuple[str | None, Any]]) -> dict[str, Any]:
    message: dict[str, Any] = {}
    blocks: dict[int, dict[str, Any]] = {}
    partial: dict[int, str] = {}
    for _, data in events:
        kind = data.get("type")
        if kind == "message_start":
            message = dict(data.get("message") or {})
        elif kind == "content_block_start":
            blocks[data.get("index", 0)] = dict(data.get("content_block") or {})
        elif kind == "content_block_delta":
            delta, index = data.get("delta") or {}, data.get("index", 0)
            block = blocks.setdefault(index, {"type": "text", "text": ""})
            if delta.get("type") == "text_delta":
                block["text"] = block.get("text", "") + delta.get("text", "")
            elif delta.get("type") == "input_json_delta":
                partial[index] = partial.get(index, "") + delta.get("partial_json", "")
        elif kind == "message_delta":
            message.update({k: v for k, v in (data.get("delta") or {}).items()})
            message["usage"] = {**(message.get("usage") or {}), **(data.get("usage") or {})}
    for index, text in partial.items():
        with contextlib.suppress(ValueError):
            blocks[index]["input"] = json.loads(text) if text else {}
    message["content"] = [b for _, b in sorted(blocks.items())]
    return message


def json_to_stream(path: str, body: bytes, include_usage: bool) -> list[bytes]:
    answer = json.loads(body)
    if path == "/v1/messages":
        return _anthropic_events(answer)
    return _openai_stream(path, answer, include_usage)


def _sse(data: Any, event: str | None = None) -> bytes:
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {json.dumps(data)}\n\n".encode()


def _openai_stream(path: str, answer: dict[str, Any], include_usage: bool) -> list[bytes]:
    base = {k: answer.get(k) for k in ("id", "created", "model") if k in answer}
    if "system_fingerprint" in answer:
        base["system_fingerprint"] = answer["system_fingerprint"]
    completions = path == "/v1/completions"
    base["object"] = "text_completion" if completions else "chat.completion.chunk"
    frames = []
    for choice in answer.get("choices") or []:
        index = choice.get("index", 0)
        if completions:
            frames.append(
                _sse(
                    {
                        **base,
                        "choices": [{"index": index, "text": choice.get("text", ""), "finish_reason": None}],
                    }
                )
            )
        else:
            message = choice.get("message") or {}
            delta = {"role": message.get("role", "assistant"), "content": message.get("content")}
            if message.get("tool_calls"):
                delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
            frames.append(
                _sse(
                    {
                        **base,
                        "choices": [
                            {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
                        ],
                    }
                )
            )
        end = {"index": index, "finish_reason": choice.get("finish_reason")}
        end |= {"text": ""} if completions else {"delta": {}, "logprobs": None}
        frames.append(_sse({**base, "choices": [end]}))
    if include_usage and answer.get("usage"):
        frames.append(_sse({**base, "choices": [], "usage": answer["usage"]}))
    frames.append(b"data: [DONE]\n\n")
    return frames


def _anthropic_events(answer: dict[str, Any]) -> list[bytes]:
    usage = answer.get("usage") or {}
    start = {
        **answer,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {**usage, "output_tokens": 0},
    }
    frames = [_sse({"type": "message_start", "message": start}, "message_start")]
    for index, block in enumerate(answer.get("content") or []):
        if block.get("type") == "tool_use":
            opening = {**block, "input": {}}
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block.get("input") or {})}
        else:
            opening = {**block, "text": ""}
            delta = {"type": "text_delta", "text": block.get("text", "")}
        frames += [
            _sse(
                {"type": "content_block_start", "index": index, "content_block": opening},
                "content_block_start",
            ),
            _sse({"type": "content_block_delta", "index": index, "delta": delta}, "content_block_delta"),
            _sse({"type": "content_block_stop", "index": index}, "content_block_stop"),
        ]
    frames += [
        _sse(
            {
                "type": "message_delta",
                "delta": {
                    "stop_reason": answer.get("stop_reason"),
                    "stop_sequence": answer.get("stop_sequence"),
                },
                "usage": {"output_tokens": usage.get("output_tokens", 0)},
            },
            "message_delta",
        ),
        _sse({"type": "message_stop"}, "message_stop"),
    ]
    return frames


# ── gateway: the data plane: a lean ASGI path from client to node and back, streams relayed as they come ───


# Never forwarded upstream: hop-by-hop headers, the client's own credentials (a node only ever sees its
# owner's token), and headers aiohttp sets itself.
_REQUEST_DROP = frozenset(
    {
        b"host",
        b"content-length",
        b"authorization",
        b"x-api-key",
        b"connection",
        b"keep-alive",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-connection",
        b"accept-encoding",
        b"cookie",
    }
)

_RESPONSE_DROP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"content-length",
        b"date",
        b"server",
        b"x-powered-by",
        b"content-encoding",
    }
)

_KIND_BY_PATH = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
    "/v1/embeddings": "embedding",
    "/v1/responses": "chat",
    "/v1/messages": "chat",
}

MID_STREAM_FAILURE = "upstream_failed_mid_stream"

DISCONNECT_WATCH_AFTER_S = 0.05


class ClientGone(Exception):
    """The client disconnected; nothing more can be sent to it."""


class UpstreamFailed(Exception):
    """A node failed before the first byte reached the client, so the next candidate may try."""

    def __init__(self, reason: str, *, auth: bool = False, capacity: bool = False) -> None:
        super().__init__(reason)
        self.auth, self.capacity = auth, capacity


class Call:
    """One data-plane request as it flows through the gateway."""

    __slots__ = (
        "aborted",
        "body",
        "cache_status",
        "cacheable",
        "client",
        "client_usage",
        "coalescable",
        "error",
        "failovers",
        "finished",
        "first_byte_s",
        "gone",
        "headers",
        "inject_usage",
        "meter",
        "method",
        "model",
        "node",
        "path",
        "payload",
        "principal",
        "query",
        "quotas",
        "request_id",
        "session",
        "shared",
        "started",
        "status",
        "strategy",
        "stream",
        "surface",
        "upstream_model",
    )

    def __init__(self, scope: Scope, request_id: str) -> None:
        self.request_id = request_id
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.query: bytes = scope["query_string"]
        self.surface = "anthropic" if self.path == "/v1/messages" else "openai"
        self.headers: list[tuple[bytes, bytes]] = scope["headers"]
        self.body = b""
        self.payload: dict[str, Any] | None = None
        self.model: str | None = None
        self.started = time.perf_counter()
        self.status = 0
        self.node: Node | None = None
        self.upstream_model: str | None = None
        self.gone = False
        self.finished = False
        self.first_byte_s: float | None = None
        self.error: str | None = None
        self.strategy: str | None = None
        self.session: str | None = None
        self.failovers = 0
        client = scope.get("client")
        self.client: str | None = client[0] if client else None
        self.principal: Principal | None = None
        self.quotas: list[Quota] = []
        self.meter = UsageMeter()
        self.inject_usage = False
        self.aborted: str | None = None
        self.stream = False  # the client asked for a stream
        self.client_usage = False  # the client asked for usage in its stream
        self.cacheable = self.coalescable = False
        self.shared = False  # this call feeds a flight that several clients may read
        self.cache_status = "bypass"

    def fork(self, request_id: str) -> Call:
        """A call of the gateway's own, for an upstream request that outlives any one client."""
        twin = object.__new__(Call)
        for name in Call.__slots__:
            setattr(twin, name, getattr(self, name))
        twin.request_id, twin.meter, twin.shared, twin.quotas = request_id, UsageMeter(), True, []
        twin.gone = twin.finished = False
        twin.node, twin.status, twin.error, twin.first_byte_s = None, 0, None, None
        return twin

    def header(self, name: bytes) -> str | None:
        return header_value(self.headers, name)

    def upstream_url(self, node: Node) -> str:
        if self.query:
            return f"{node.url}{self.path}?{self.query.decode('latin-1')}"
        return node.url + self.path

    def summary(self, latency_ms: float) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "model": self.model,
            "node": self.node.id if self.node else None,
            "status": self.status,
            "latency_ms": latency_ms,
            "ttfb_ms": None if self.first_byte_s is None else round(self.first_byte_s * 1000, 2),
            "error": self.error,
            "strategy": self.strategy,
            "failovers": self.failovers,
            "key": self.principal.key_id if self.principal else None,
            "cache": self.cache_status,
            "prompt_tokens": self.meter.prompt,
            "completion_tokens": self.meter.completion,
        }


class Gateway:
    """Serves `/v1/*`: reads the request, asks the router for candidates, relays the first that answers."""

    def __init__(
        self,
        settings: Settings,
        *,
        registry: Registry,
        router: Router,
        policy: Policy,
        admission: Admission,
        clients: NodeClients,
        cache: ResultCache,
        accounting: Accounting,
        started_at: float,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.router = router
        self.policy = policy
        self.admission = admission
        self.clients = clients
        self.accounting = accounting
        self.started_at = started_at
        self.coalescer = Coalescer(self, cache)
        self.running: dict[Call, asyncio.Task[Any]] = {}  # requests in flight, for `share off` and revocation
        self._counter = 0
        self._prefix = secrets.token_hex(4)

    def next_request_id(self) -> str:
        self._counter += 1
        return f"req_{self._prefix}{self._counter:08x}"

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        call = Call(scope, self.next_request_id())
        policy = self.policy
        try:
            call.principal = policy.identify(credential_of(call.headers), call.client)
            if call.method == "GET" and call.path.startswith("/v1/models"):
                await self.list_models(call, send)
                return
            call.body = await self.read_body(call, receive)
            plan = self.plan(call)
            call.quotas = policy.admit(call.principal)
            self.running[call] = asyncio.current_task()  # type: ignore[assignment]
            if call.cacheable or call.coalescable:
                await self.coalescer.serve(call, plan, receive, send)
            else:
                await self.watching(call, receive, self.relay(call, plan, send))
        except HTTPError as exc:
            call.status, call.error = exc.status, exc.code
            if exc.status in (401, 403):
                self.accounting.denied(call, exc)
            await self.send_error(call, send, exc)
        except ClientGone:
            call.status, call.error = 499, "client_disconnected"
        except Exception:  # a bug must never reach the client as a traceback
            log.exception("request %s failed", call.request_id)
            call.status, call.error = 500, "internal_error"
            with contextlib.suppress(Exception):
                await self.send_error(call, send, HTTPError(500, "Internal gateway error.", "internal_error"))
        finally:
            self.running.pop(call, None)
            if call.quotas:
                policy.settle(call.quotas, call.meter.total)
            self.accounting.request_done(call)

    def abort(self, reason: str, which: Callable[[Call], bool] = lambda _call: True) -> None:
        """End running requests at once: a stream gets a clean error frame, a request not yet answered an
        ordinary refusal (see `watching`)."""
        for call, task in list(self.running.items()):
            if which(call):
                call.aborted = reason
                task.cancel()

    async def read_body(self, call: Call, receive: Receive) -> bytes:
        limit = self.settings.max_body_bytes
        for name, value in call.headers:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                raise HTTPError(413, f"Request body is larger than {limit} bytes.", "request_too_large")
        parts: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, f"Request body is larger than {limit} bytes.", "request_too_large")
            parts.append(chunk)
            more = message.get("more_body", False)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def plan(self, call: Call) -> Plan:
        kind = _KIND_BY_PATH.get(call.path)
        if call.method != "POST" or not call.body:
            if kind:
                raise HTTPError(400, "A JSON request body is required.", "invalid_request")
            return self.router.any_node()
        payload = parse_json(call.body)
        if not isinstance(payload, dict):
            raise HTTPError(400, "The request body must be a JSON object.", "invalid_request")
        call.payload = payload
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            if kind:
                raise HTTPError(400, "The request needs a `model`.", "missing_model", param="model")
            return self.router.any_node()
        call.model = model
        assert call.principal is not None
        self.policy.check_model(call.principal, model)
        options = payload.get("vampire") if isinstance(payload.get("vampire"), dict) else {}
        strategy = call.header(b"x-vampire-strategy") or options.get("strategy")
        if strategy is not None and strategy not in STRATEGIES:
            raise HTTPError(
                400,
                f"Unknown strategy `{strategy}`; use one of {', '.join(STRATEGIES)}.",
                "invalid_strategy",
                param="vampire.strategy",
            )
        call.session = call.header(b"x-vampire-session") or (
            conversation_key(model, payload) if self.router.choice_of_nodes() else None
        )
        previous = payload.get("previous_response_id")
        plan = self.router.plan(
            model,
            needs_of(kind or "other", payload, call.body),
            strategy,
            call.session,
            previous if isinstance(previous, str) else None,
        )
        allowed = self.policy.allowed_nodes(call.principal)
        if allowed is not None:
            plan.targets = [t for t in plan.targets if t.node.id in allowed]
            if not plan.targets:
                raise unavailable(
                    f"No node of realm `{call.principal.realm.name}` can serve `{model}` right now."
                )
        call.strategy = plan.strategy
        call.stream = payload.get("stream") is True
        call.client_usage = isinstance(payload.get("stream_options"), dict) and bool(
            payload["stream_options"].get("include_usage")
        )
        call.inject_usage = kind in ("chat", "completion") and call.stream and not call.client_usage
        if call.path in CACHE_PATHS and options.get("cache") is not False and not self._no_store(call):
            sure = deterministic(call.path, payload)
            call.cacheable = sure or options.get("cache") is True
            call.coalescable = sure or options.get("coalesce") is True
        return plan

    @staticmethod
    def _no_store(call: Call) -> bool:
        value = call.header(b"cache-control")
        return value is not None and "no-store" in value.lower()

    def upstream_body(self, call: Call, target: Target) -> bytes:
        """The client's bytes, untouched, unless the model name or the `vampire` field must change."""
        payload = call.payload
        if payload is None:
            return call.body
        rewrite = (
            call.inject_usage
            or "vampire" in payload
            or (call.model is not None and target.upstream_model != call.model)
        )
        if not rewrite:
            return call.body
        out = {k: v for k, v in payload.items() if k != "vampire"}
        if call.model is not None and target.upstream_model:
            out["model"] = target.upstream_model
        if (
            call.inject_usage
        ):  # the ledger needs the counts; the frame carrying them is removed on the way back
            options = out.get("stream_options")
            out["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        return json.dumps(out, separators=(",", ":")).encode()

    def upstream_headers(self, call: Call, node: Node) -> dict[str, str]:
        headers = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in call.headers
            if name not in _REQUEST_DROP and not name.startswith(b"x-vampire-")
        }
        if node.token:
            headers["Authorization"] = f"Bearer {node.token}"
        return headers

    async def watching(self, call: Call, receive: Receive, work: Awaitable[None]) -> None:
        """Run `work` for this client; if the client disconnects meanwhile, cancel it at once. The watch
        starts only once the work has taken a moment: quick answers never pay for the extra task."""
        task = asyncio.current_task()
        watcher: asyncio.Future[Message] | None = None

        def on_disconnect(_: Any) -> None:
            if not call.finished and task is not None:
                call.gone = True
                task.cancel()

        def watch() -> None:
            nonlocal watcher
            watcher = asyncio.ensure_future(receive())
            watcher.add_done_callback(on_disconnect)

        timer = asyncio.get_running_loop().call_later(DISCONNECT_WATCH_AFTER_S, watch)
        try:
            await work
        except asyncio.CancelledError:
            if task is None or not (call.gone or call.aborted):
                raise
            task.uncancel()
            if call.gone:
                raise ClientGone from None
            if not call.status:  # nothing sent yet: an ordinary refusal
                raise unavailable(
                    "The owner has stopped sharing for now.", "sharing_off", retry_after=60
                ) from None
        finally:
            timer.cancel()
            if watcher is not None:
                watcher.remove_done_callback(on_disconnect)
                watcher.cancel()

    async def relay(self, call: Call, plan: Plan, send: Send) -> None:
        """Try candidates in order until one answers. Full candidates are skipped; when every remaining
        candidate is full the request waits in the bounded queue for a slot."""
        remaining = list(plan.targets)
        deadline: float | None = None
        failure: UpstreamFailed | None = None
        admission = self.admission
        while remaining:
            hot = [t for t in remaining if t.warm] if plan.strategy in HOT_FIRST else []
            target = next((t for t in hot or remaining if admission.has_room(t)), None)
            if target is None:
                deadline = deadline or time.monotonic() + self.settings.queue_timeout_s
                await admission.wait(deadline)
                continue
            remaining.remove(target)
            if not target.node.circuit.allows(time.monotonic()):
                continue
            try:
                await self.attempt(call, target, send, last=not remaining)
                self.router.remember(call.model, target.node, call.session)
                return
            except UpstreamFailed as exc:
                failure = exc
                call.failovers += 1
                log.info(
                    "request %s: node %s failed before the first byte (%s)",
                    call.request_id,
                    target.node.id,
                    exc,
                )
        reason = f" Last error: {failure}." if failure else ""
        raise unavailable(f"No node could answer the request.{reason}")

    async def attempt(self, call: Call, target: Target, send: Send, last: bool) -> None:
        """One try on one node: hold its slot, keep its breaker and inventory honest."""
        node, admission = target.node, self.admission
        call.node, call.upstream_model = node, target.upstream_model
        cold = not target.warm
        if cold:
            node.warming.add(
                target.model.id
            )  # later requests for it queue here rather than load it elsewhere
        admission.acquire(target)
        node.circuit.begin()
        verdict = False
        try:
            status = await self.forward(call, target, send, last)
            verdict = True
            if cold and status < 400:
                self.registry.mark_served(node, target.model.id)
            if (status >= 500 and status != 503) or call.error == MID_STREAM_FAILURE:
                node.circuit.failure(time.monotonic())
            else:
                node.circuit.success()
        except UpstreamFailed as exc:
            verdict = True
            if not exc.capacity:
                node.circuit.failure(time.monotonic())
                self.registry.report_failure(node, str(exc), auth=exc.auth)
            raise
        finally:
            if not verdict:
                node.circuit.abandon()
            admission.release(target)
            if cold:
                node.warming.discard(target.model.id)
                self.registry.report_change(node)

    async def open_upstream(self, call: Call, target: Target) -> aiohttp.ClientResponse:
        """Send the request; a pooled connection the node already closed is retried once on a fresh one."""
        node = target.node
        url, body, headers = (
            call.upstream_url(node),
            self.upstream_body(call, target),
            self.upstream_headers(call, node),
        )
        try:
            return await self.clients.relay.request(call.method, url, data=body, headers=headers)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            if isinstance(exc, aiohttp.ClientConnectorError):
                raise UpstreamFailed(f"cannot connect: {_describe_error(exc)}") from None
        try:
            return await self.clients.fresh.request(call.method, url, data=body, headers=headers)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise UpstreamFailed(_describe_error(exc)) from None

    async def forward(self, call: Call, target: Target, send: Send, last: bool) -> int:
        try:
            resp = await self.open_upstream(call, target)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise UpstreamFailed(_describe_error(exc)) from None
        try:
            if not last and (resp.status >= 500 or resp.status == 429):
                raise UpstreamFailed(f"HTTP {resp.status}", capacity=resp.status in (429, 503))
            if resp.status in (401, 403) and not last:
                raise UpstreamFailed(f"HTTP {resp.status}", auth=True)
            if resp.status in (401, 403):
                self.registry.report_failure(target.node, f"HTTP {resp.status}", auth=True)
            await self.respond(call, target, resp, send)
            return resp.status
        finally:
            resp.release()

    def response_headers(
        self, call: Call, target: Target, resp: aiohttp.ClientResponse
    ) -> list[tuple[bytes, bytes]]:
        headers = [(k.lower(), v) for k, v in resp.raw_headers if k.lower() not in _RESPONSE_DROP]
        headers += [
            (b"x-vampire-node", target.node.id.encode()),
            (b"x-vampire-model", target.upstream_model.encode()),
            (b"x-vampire-request-id", call.request_id.encode()),
            (b"x-vampire-strategy", (call.strategy or "auto").encode()),
            (b"x-vampire-cache", call.cache_status.encode()),
        ]
        return headers

    async def respond(self, call: Call, target: Target, resp: aiohttp.ClientResponse, send: Send) -> None:
        headers = self.response_headers(call, target, resp)
        if resp.content_length is not None:
            try:
                data = await resp.read()
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                raise UpstreamFailed(_describe_error(exc)) from None
            self.observe_first_byte(call, target)
            self.note_response_id(call, target, data)
            call.meter.feed(data)
            headers.append((b"content-length", str(len(data)).encode()))
            call.status, call.finished = resp.status, True
            await send({"type": "http.response.start", "status": resp.status, "headers": headers})
            await send({"type": "http.response.body", "body": data})
            return
        await self.relay_stream(call, target, resp, headers, send)

    def note_response_id(self, call: Call, target: Target, data: bytes) -> None:
        """`previous_response_id` must reach the node that holds that response's state."""
        if call.path == "/v1/responses" and (match := RESPONSE_ID_RE.search(data)):
            self.router.responses.put(match.group(1).decode(), target.node.id)

    def observe_first_byte(self, call: Call, target: Target) -> None:
        call.first_byte_s = time.perf_counter() - call.started
        target.node.observe_latency(call.first_byte_s)

    async def relay_stream(
        self,
        call: Call,
        target: Target,
        resp: aiohttp.ClientResponse,
        headers: list[tuple[bytes, bytes]],
        send: Send,
    ) -> None:
        # The response starts only once the first chunk is here: until then a failing node can still be
        # swapped for another without the client seeing anything.
        chunks = resp.content.iter_any()
        try:
            first = await anext(chunks, b"")
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise UpstreamFailed(_describe_error(exc)) from None
        self.observe_first_byte(call, target)
        self.note_response_id(call, target, first)
        meter, strip = call.meter, UsageFrameFilter() if call.inject_usage and not call.shared else None
        meter.feed(first)
        call.status = resp.status
        await send({"type": "http.response.start", "status": resp.status, "headers": headers})
        await send(
            {"type": "http.response.body", "body": strip.feed(first) if strip else first, "more_body": True}
        )
        try:
            async for chunk in chunks:
                meter.feed(chunk)
                if strip:
                    chunk = strip.feed(chunk)
                    if not chunk:
                        continue
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if strip and (rest := strip.flush()):
                await send({"type": "http.response.body", "body": rest, "more_body": True})
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            call.error = MID_STREAM_FAILURE
            self.registry.report_failure(target.node, _describe_error(exc))
            await self.end_with_error(
                call, resp, send, f"The node {target.node.id} failed mid-stream: {_describe_error(exc)}"
            )
            return
        except asyncio.CancelledError:
            if not call.aborted:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            call.error = call.aborted
            await self.end_with_error(
                call, resp, send, "The owner stopped sharing; this answer was cut short."
            )
            return
        call.finished = True
        await send({"type": "http.response.body", "body": b""})

    async def end_with_error(
        self, call: Call, resp: aiohttp.ClientResponse, send: Send, message: str
    ) -> None:
        content_type = resp.headers.get("content-type", "").encode()
        call.finished = True
        await send(
            {
                "type": "http.response.body",
                "body": stream_error_frame(call.surface, content_type, message),
                "more_body": True,
            }
        )
        await send({"type": "http.response.body", "body": b""})

    async def send_error(self, call: Call, send: Send, exc: HTTPError) -> None:
        body = error_body(call.surface, exc.status, exc.message, exc.code, exc.param)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-vampire-request-id", call.request_id.encode()),
        ]
        headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
        call.finished = True
        await send({"type": "http.response.start", "status": exc.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def list_models(self, call: Call, send: Send) -> None:
        detail = b"vampire_detail=true" in call.query
        models = {
            mid: self._model_entry(mid, targets, detail)
            for mid, targets in self.router.index().items()
            if self._may_use(call, mid)
        }
        for route in self.router.routes.values():
            models.setdefault(route.model, self._model_entry(route.model, [], False))
        if self._may_use(call, AUTO_MODEL):
            models[AUTO_MODEL] = self._model_entry(AUTO_MODEL, [], False)
        requested = call.path[len("/v1/models/") :] if call.path.startswith("/v1/models/") else None
        if requested is not None:
            if requested not in models:
                self.router.raise_unknown(requested)
            body = models[requested]
        else:
            first = [models[AUTO_MODEL]] if AUTO_MODEL in models else []
            body = {
                "object": "list",
                "data": [*first, *(models[k] for k in sorted(models) if k != AUTO_MODEL)],
            }
        await send_json(send, 200, body, [(b"x-vampire-request-id", call.request_id.encode())])
        call.status = 200

    def _may_use(self, call: Call, model_id: str) -> bool:
        try:
            self.policy.check_model(call.principal, model_id)  # type: ignore[arg-type]
        except HTTPError:
            return False
        return True

    def _model_entry(self, model_id: str, targets: list[Target], detail: bool) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "id": model_id,
            "object": "model",
            "created": int(self.started_at),
            "owned_by": "vampire",
        }
        if detail:
            entry["vampire"] = {
                "placement": [
                    {
                        "node": t.node.id,
                        "loaded": t.model.loaded,
                        "type": t.model.type,
                        "context_length": t.model.context_length,
                        "slots": t.model.slots,
                    }
                    for t in targets
                ]
            }
        return entry


# ── accounting: the usage ledger and audit log (batched into SQLite) and Prometheus metrics ───────────────


class BatchWriter:
    """Rows (usage ledger, audit log) written to SQLite in small batches, off the request path."""

    def __init__(self, write: Callable[[list[tuple[Any, ...]]], None]) -> None:
        self.write = write
        self.pending: list[tuple[Any, ...]] = []

    def record(self, row: tuple[Any, ...]) -> None:
        self.pending.append(row)

    def flush(self) -> None:
        if self.pending:
            rows, self.pending = self.pending, []
            try:
                self.write(rows)
            except (sqlite3.Error, UnicodeError, ValueError):
                log.exception("could not store %d rows; they are dropped", len(rows))


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

SURFACES = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "responses",
    "/v1/messages": "messages",
}

NODE_STATES = ("online", "offline", "unauthorized", "draining", "disabled", "unknown")


class Histogram:
    """Cumulative buckets per label set, as Prometheus expects them."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.series: dict[tuple[str, ...], list[float]] = {}  # counts per bucket, then +Inf count, then sum

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = [0.0] * (len(self.buckets) + 2)
        series[bisect.bisect_left(self.buckets, value)] += 1
        series[-1] += value

    def lines(self, name: str, label_names: tuple[str, ...]) -> Iterable[str]:
        for labels, series in sorted(self.series.items()):
            base = _labels(label_names, labels)
            running = 0.0
            for bound, count in zip((*self.buckets, math.inf), series[:-1], strict=True):
                running += count
                le = "+Inf" if bound == math.inf else repr(bound)
                yield f'{name}_bucket{{{base}{"," if base else ""}le="{le}"}} {running:g}'
            yield f"{name}_sum{{{base}}} {series[-1]:g}"
            yield f"{name}_count{{{base}}} {running:g}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    return ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True))


class Metrics:
    """What happened, counted as it happens; what is, read from the live objects when scraped."""

    def __init__(self, registry: Registry, admission: Admission, cache: ResultCache) -> None:
        self.registry, self.admission, self.cache = registry, admission, cache
        self.requests: dict[tuple[str, str, str, str], int] = {}  # surface, model, node, status
        self.tokens: dict[tuple[str, str], int] = {}  # direction, model
        self.failovers = 0  # node attempts that failed before the first byte
        self.latency = Histogram(LATENCY_BUCKETS)
        self.ttft = Histogram(LATENCY_BUCKETS)

    def count(self, call: Call, seconds: float) -> None:
        surface = SURFACES.get(call.path, "models" if call.path.startswith("/v1/models") else "other")
        model, node = call.model or "", call.node.id if call.node else ""
        key = (surface, model, node, str(call.status))
        self.requests[key] = self.requests.get(key, 0) + 1
        self.latency.observe((surface,), seconds)
        if call.first_byte_s is not None:
            self.ttft.observe((surface,), call.first_byte_s)
        for direction, amount in (("in", call.meter.prompt), ("out", call.meter.completion)):
            if amount:
                self.tokens[(direction, model)] = self.tokens.get((direction, model), 0) + amount
        self.failovers += call.failovers

    def render(self) -> str:
        out: list[str] = []

        def family(name: str, kind: str, help_text: str, rows: Iterable[str]) -> None:
            out.extend((f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *rows))

        family(
            "vampire_requests_total",
            "counter",
            "Data-plane requests by surface, model, node and status.",
            (
                f"vampire_requests_total{{{_labels(('surface', 'model', 'node', 'status'), k)}}} {v}"
                for k, v in sorted(self.requests.items())
            ),
        )
        family(
            "vampire_request_duration_seconds",
            "histogram",
            "Time from request to last byte.",
            self.latency.lines("vampire_request_duration_seconds", ("surface",)),
        )
        family(
            "vampire_time_to_first_token_seconds",
            "histogram",
            "Time from request to the node's first byte.",
            self.ttft.lines("vampire_time_to_first_token_seconds", ("surface",)),
        )
        family(
            "vampire_tokens_total",
            "counter",
            "Tokens in (prompt) and out (completion) as the nodes reported them.",
            (
                f"vampire_tokens_total{{{_labels(('direction', 'model'), k)}}} {v}"
                for k, v in sorted(self.tokens.items())
            ),
        )
        family(
            "vampire_failovers_total",
            "counter",
            "Node attempts that failed before the first byte, so another node answered.",
            [f"vampire_failovers_total {self.failovers}"],
        )
        self._render_nodes(family)
        self._render_cache(family)
        return "\n".join(out) + "\n"

    def _render_nodes(self, family: Callable[[str, str, str, Iterable[str]], None]) -> None:
        nodes = sorted(self.registry.nodes.values(), key=lambda n: n.id)
        family(
            "vampire_node_state",
            "gauge",
            "1 for the state each node is in.",
            (
                f'vampire_node_state{{node="{_escape(n.id)}",state="{s}"}} {int(n.state == s)}'
                for n in nodes
                for s in NODE_STATES
            ),
        )
        family(
            "vampire_node_in_flight",
            "gauge",
            "Requests in flight per node.",
            (f'vampire_node_in_flight{{node="{_escape(n.id)}"}} {n.in_flight}' for n in nodes),
        )
        family(
            "vampire_node_slots",
            "gauge",
            "Slots Vampire may use per node (loaded models' slots x tier).",
            (
                f'vampire_node_slots{{node="{_escape(n.id)}"}} '
                f"{sum(max(1, m.slots * n.tier // 100) for m in n.models if m.loaded)}"
                for n in nodes
            ),
        )
        family(
            "vampire_node_circuit_open",
            "gauge",
            "1 while a node's circuit breaker is open.",
            (
                f'vampire_node_circuit_open{{node="{_escape(n.id)}"}} {int(n.circuit.state == "open")}'
                for n in nodes
            ),
        )
        family(
            "vampire_queue_depth",
            "gauge",
            "Requests waiting for a free slot.",
            [f"vampire_queue_depth {len(self.admission.waiters)}"],
        )

    def _render_cache(self, family: Callable[[str, str, str, Iterable[str]], None]) -> None:
        stats = self.cache.stats()
        for name, key, kind, text in (
            ("vampire_cache_hits_total", "hits", "counter", "Answers served from the cache."),
            ("vampire_cache_misses_total", "misses", "counter", "Eligible requests that went upstream."),
            (
                "vampire_coalesced_total",
                "coalesced",
                "counter",
                "Requests that joined an identical one in flight.",
            ),
            (
                "vampire_upstream_calls_saved_total",
                "upstream_calls_saved",
                "counter",
                "Upstream calls avoided.",
            ),
            ("vampire_cache_entries", "entries", "gauge", "Answers held in the cache."),
            ("vampire_cache_bytes", "bytes", "gauge", "Bytes held in the cache."),
        ):
            family(name, kind, text, [f"{name} {stats[key]}"])


class Accounting:
    """What is recorded about every request and admin action: the usage ledger and the audit log
    (batched into SQLite off the request path), metrics, live events and the request log line."""

    FLUSH_EVERY_S = 0.5

    def __init__(self, settings: Settings, store: Store, events: EventBus, metrics: Metrics) -> None:
        self.settings = settings
        self.store = store
        self.events = events
        self.metrics = metrics
        self.ledger = BatchWriter(store.add_usage)
        self.audit_log = BatchWriter(store.add_audit)

    def request_done(self, call: Call) -> None:
        seconds = time.perf_counter() - call.started
        self.metrics.count(call, seconds)
        latency_ms = round(seconds * 1000, 2)
        if call.method == "POST" and call.model is not None:
            self.ledger.record(self._usage_row(call, latency_ms))
        logged = log.isEnabledFor(logging.INFO)
        if logged or self.events.listened:
            summary = call.summary(latency_ms)
            self.events.publish("request", summary)
            if logged:
                log.info("request", extra={"fields": summary})

    @staticmethod
    def _usage_row(call: Call, latency_ms: float) -> tuple[Any, ...]:
        principal = call.principal
        return (
            time.time(),
            call.request_id,
            principal.key_id if principal else None,
            principal.realm.name if principal else None,
            storable_text(call.model or ""),
            call.node.id if call.node else None,
            call.meter.prompt or 0,
            call.meter.completion or 0,
            latency_ms,
            call.status,
            call.surface,
        )

    def admin_action(self, action: str, where: str | None, **details: Any) -> None:
        """Who, when, what, from where: ids and names only, never secrets or prompt text."""
        who = "admin-token" if self.settings.admin_token else "loopback"
        self.audit_log.record((time.time(), who, action, where, json.dumps(details, default=str)))
        log.info("audit", extra={"fields": {"action": action, "who": who, "from": where, **details}})

    def denied(self, call: Call, exc: HTTPError) -> None:
        who = f"key:{call.principal.key_id}" if call.principal and call.principal.key else "anonymous"
        details = {
            "status": exc.status,
            "code": exc.code,
            "path": storable_text(call.path),
            "model": storable_text(call.model) if call.model else None,
        }
        self.audit_log.record((time.time(), who, "denied", call.client, json.dumps(details)))

    def usage(self, group_by: str, since: float) -> list[dict[str, Any]]:
        self.ledger.flush()
        return self.store.usage(group_by, since)

    def audit_rows(self) -> list[dict[str, Any]]:
        self.audit_log.flush()
        return self.store.audit()

    def flush(self) -> None:
        self.ledger.flush()
        self.audit_log.flush()

    async def flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self.FLUSH_EVERY_S)
            self.flush()


# ── control plane: /vampire/v1/* for people and tools; Starlette, since none of it is a hot path ──────────


def api_error(
    status: int,
    message: str,
    code: str | None = None,
    headers: dict[str, str] | None = None,
    param: str | None = None,
) -> JSONResponse:
    return JSONResponse(
        json.loads(error_body("openai", status, message, code, param)), status_code=status, headers=headers
    )


class ControlPlane:
    """The owner's API; guarded by the admin token, or by loopback when no token is set."""

    def __init__(
        self,
        settings: Settings,
        *,
        registry: Registry,
        router: Router,
        policy: Policy,
        admission: Admission,
        gateway: Gateway,
        cache: ResultCache,
        accounting: Accounting,
        clients: NodeClients,
        identity: dict[str, Any],
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.router = router
        self.policy = policy
        self.admission = admission
        self.gateway = gateway
        self.cache = cache
        self.accounting = accounting
        self.clients = clients
        self.identity = identity

    def routes(self) -> list[routing.Route]:
        p = "/vampire/v1"
        return [
            routing.Route(f"{p}/status", self.guarded(self.status)),
            routing.Route(f"{p}/nodes", self.guarded(self.list_nodes), methods=["GET"]),
            routing.Route(f"{p}/nodes", self.guarded(self.add_node), methods=["POST"]),
            routing.Route(f"{p}/nodes/{{node_id:str}}", self.guarded(self.get_node), methods=["GET"]),
            routing.Route(f"{p}/nodes/{{node_id:str}}", self.guarded(self.patch_node), methods=["PATCH"]),
            routing.Route(f"{p}/nodes/{{node_id:str}}", self.guarded(self.delete_node), methods=["DELETE"]),
            routing.Route(
                f"{p}/nodes/{{node_id:str}}/probe", self.guarded(self.probe_node), methods=["POST"]
            ),
            routing.Route(f"{p}/models", self.guarded(self.models)),
            routing.Route(f"{p}/discover", self.guarded(self.discover), methods=["POST"]),
            routing.Route(f"{p}/routes", self.guarded(self.list_routes), methods=["GET"]),
            routing.Route(f"{p}/routes", self.guarded(self.save_route), methods=["POST"]),
            routing.Route(f"{p}/routes/{{route_id:str}}", self.guarded(self.get_route), methods=["GET"]),
            routing.Route(
                f"{p}/routes/{{route_id:str}}", self.guarded(self.delete_route), methods=["DELETE"]
            ),
            routing.Route(f"{p}/routing/explain", self.guarded(self.explain)),
            routing.Route(f"{p}/keys", self.guarded(self.list_keys), methods=["GET"]),
            routing.Route(f"{p}/keys", self.guarded(self.create_key), methods=["POST"]),
            routing.Route(f"{p}/keys/{{key_id:str}}", self.guarded(self.revoke_key), methods=["DELETE"]),
            routing.Route(f"{p}/realms", self.guarded(self.list_realms), methods=["GET"]),
            routing.Route(f"{p}/realms", self.guarded(self.save_realm), methods=["POST"]),
            routing.Route(f"{p}/share", self.guarded(self.get_share), methods=["GET"]),
            routing.Route(f"{p}/share", self.guarded(self.put_share), methods=["PUT"]),
            routing.Route(f"{p}/usage", self.guarded(self.usage)),
            routing.Route(f"{p}/cache", self.guarded(self.cache_stats), methods=["GET"]),
            routing.Route(f"{p}/cache", self.guarded(self.cache_clear), methods=["DELETE"]),
            routing.Route(f"{p}/audit", self.guarded(self.audit)),
            routing.Route(f"{p}/events", self.guarded(self.events)),
            routing.Route("/metrics", self.guarded(self.metrics)),
            routing.Route("/", self.dashboard),
        ]

    def guarded(
        self, handler: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        """Every control-plane endpoint answers only callers the access rule lets in."""

        @functools.wraps(handler)
        async def endpoint(request: Request) -> Response:
            return self.denied(request) or await handler(request)

        return endpoint

    def denied(self, request: Request) -> Response | None:
        token = self.settings.admin_token
        if token:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return api_error(
                    401, "The admin token is required for this endpoint.", "admin_token_required"
                )
            return None
        if not is_loopback(request.client.host if request.client else None):
            return api_error(
                403, "Set an admin token to use the control plane from another machine.", "forbidden"
            )
        return None

    def record(self, action: str, request: Request, **details: Any) -> None:
        self.accounting.admin_action(action, request.client.host if request.client else None, **details)

    async def status(self, request: Request) -> Response:
        nodes = list(self.registry.nodes.values())
        return JSONResponse(
            {
                "version": __version__,
                "instance": self.identity["instance"],
                "share": self.policy.share,
                "nodes_total": len(nodes),
                "nodes_online": sum(n.health == "online" for n in nodes),
                "uptime_s": round(time.time() - self.identity["started_at"], 1),
                "queue": len(self.admission.waiters),
                "in_flight": sum(n.in_flight for n in nodes),
                "keys": len(self.policy.keys),
            }
        )

    async def list_nodes(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [n.public() for n in self.registry.nodes.values()]})

    async def _json_object(self, request: Request) -> dict[str, Any]:
        body = parse_json(await request.body())
        if not isinstance(body, dict):
            raise HTTPError(400, "The request body must be a JSON object.", "invalid_request")
        try:  # whatever is kept must be storable and printable: no lone surrogates, no NaN
            json.dumps(body, ensure_ascii=False, allow_nan=False).encode("utf-8")
        except (UnicodeEncodeError, ValueError):
            raise HTTPError(
                400, "The request body holds invalid text or a non-finite number.", "invalid_request"
            ) from None
        return body

    def _node(self, request: Request) -> Node:
        node = self.registry.find(request.path_params["node_id"])
        if node is None:
            raise HTTPError(404, f"No node `{request.path_params['node_id']}`.", "node_not_found")
        return node

    async def add_node(self, request: Request) -> Response:
        body = await self._json_object(request)
        url = body.get("url")
        if not isinstance(url, str) or not url:
            raise HTTPError(400, "`url` is required.", "invalid_request", param="url")
        tags = body.get("tags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise HTTPError(400, "`tags` is a list of strings.", "invalid_request", param="tags")
        try:
            node = await self.registry.add(
                url,
                token=_opt_str(body, "token"),
                name=_opt_str(body, "name"),
                trusted=bool(body.get("trusted", True)),
                tags=tags,
            )
        except (NodeRefused, ConfigError) as exc:
            raise HTTPError(400, str(exc), "node_refused") from None
        self.record("node.add", request, node=node.id)
        return JSONResponse(node.public(), status_code=201)

    async def get_node(self, request: Request) -> Response:
        return JSONResponse(self._node(request).public())

    async def patch_node(self, request: Request) -> Response:
        node = self._node(request)
        body = await self._json_object(request)
        changes: dict[str, Any] = {}
        if "name" in body:
            changes["name"] = str(body["name"])
        if "trusted" in body:
            changes["trusted"] = bool(body["trusted"])
        if "token" in body:
            changes["token"] = _opt_str(body, "token")
        if "state" in body:
            state = body["state"]
            if state not in ("online", "draining", "disabled"):
                raise HTTPError(
                    400, "`state` must be online, draining or disabled.", "invalid_request", param="state"
                )
            changes["admin_state"] = "active" if state == "online" else state
        self.registry.update(node, **changes)
        if "token" in changes or changes.get("admin_state") == "active":
            await self.registry.probe(node)
        self.record("node.update", request, node=node.id, fields=sorted(changes))
        return JSONResponse(node.public())

    async def delete_node(self, request: Request) -> Response:
        node = self._node(request)
        self.registry.remove(node)
        self.record("node.remove", request, node=node.id)
        return JSONResponse({"id": node.id, "deleted": True})

    async def probe_node(self, request: Request) -> Response:
        node = self._node(request)
        await self.registry.probe(node)
        return JSONResponse(node.public())

    async def models(self, request: Request) -> Response:
        rows = [
            m.public() | {"node": n.id, "node_state": n.state}
            for n in self.registry.nodes.values()
            for m in n.models
        ]
        return JSONResponse({"object": "list", "data": rows})

    async def discover(self, request: Request) -> Response:
        body = await self._json_object(request) if await request.body() else {}
        subnets = body.get("subnets") or ["127.0.0.0/24"]
        ports = body.get("ports") or list(DISCOVERY_PORTS)
        valid_ports = isinstance(ports, list) and all(
            isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536 for p in ports
        )
        if not isinstance(subnets, list) or not all(isinstance(n, str) for n in subnets) or not valid_ports:
            raise HTTPError(
                400, "`subnets` is a list of CIDRs and `ports` a list of port numbers.", "invalid_request"
            )
        timeout_ms = body.get("timeout_ms", 500)
        if (
            not isinstance(timeout_ms, int | float)
            or isinstance(timeout_ms, bool)
            or not 0 < timeout_ms <= 10_000
        ):
            raise HTTPError(
                400,
                "`timeout_ms` is a number of milliseconds up to 10000.",
                "invalid_request",
                param="timeout_ms",
            )
        timeout = float(timeout_ms) / 1000.0
        try:
            found = await discover(
                self.clients.probe,
                [str(s) for s in subnets],
                ports,
                timeout=timeout,
                allow_public=self.settings.allow_public_nodes,
            )
        except NodeRefused as exc:
            raise HTTPError(400, str(exc), "invalid_request") from None
        if body.get("add"):
            await self.registry.add_discovered(found)
        self.record("discover", request, subnets=subnets, found=len(found))
        return JSONResponse({"object": "list", "data": [f.public() for f in found]})

    async def list_routes(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [r.public() for r in self.router.routes.values()]})

    async def save_route(self, request: Request) -> Response:
        route = Route.from_json(await self._json_object(request))
        self.router.save_route(route)
        self.record("route.save", request, route=route.id)
        return JSONResponse(route.public(), status_code=201)

    def _route(self, request: Request) -> Route:
        route = self.router.routes.get(request.path_params["route_id"])
        if route is None:
            raise HTTPError(404, f"No route `{request.path_params['route_id']}`.", "route_not_found")
        return route

    async def get_route(self, request: Request) -> Response:
        return JSONResponse(self._route(request).public())

    async def delete_route(self, request: Request) -> Response:
        route = self._route(request)
        self.router.delete_route(route.id)
        self.record("route.delete", request, route=route.id)
        return JSONResponse({"id": route.id, "deleted": True})

    async def explain(self, request: Request) -> Response:
        model = request.query_params.get("model")
        if not model:
            raise HTTPError(400, "`model` is required.", "invalid_request", param="model")
        kind = request.query_params.get("kind", "chat")
        needs = Needs(
            kind,
            vision=request.query_params.get("vision") == "true",
            tools=request.query_params.get("tools") == "true",
        )
        strategy = request.query_params.get("strategy")
        if strategy is not None and strategy not in STRATEGIES:
            raise HTTPError(400, f"`strategy` must be one of {', '.join(STRATEGIES)}.", "invalid_strategy")
        return JSONResponse(self.router.explain(model, needs, strategy))

    async def list_keys(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [k.public() for k in self.policy.keys.values()]})

    async def create_key(self, request: Request) -> Response:
        body = await self._json_object(request)
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise HTTPError(400, "`name` is required.", "invalid_request", param="name")
        models = body.get("models") or []
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            raise HTTPError(400, "`models` is a list of model names.", "invalid_request", param="models")
        limits = {k: _opt_positive_int(body, k) for k in ("rpm", "tpm", "max_concurrent")}
        expires = body.get("expires_at")
        if expires is not None and (not isinstance(expires, int | float) or isinstance(expires, bool)):
            raise HTTPError(
                400, "`expires_at` is a Unix time in seconds.", "invalid_request", param="expires_at"
            )
        key, secret = self.policy.create_key(
            name, str(body.get("realm") or DEFAULT_REALM), models=models, expires_at=expires, **limits
        )
        self.record("key.create", request, key=key.id, realm=key.realm)
        return JSONResponse(key.public() | {"key": secret}, status_code=201)

    async def revoke_key(self, request: Request) -> Response:
        key_id = request.path_params["key_id"]
        if not self.policy.revoke_key(key_id):
            raise HTTPError(404, f"No key `{key_id}`.", "key_not_found")
        self.record("key.revoke", request, key=key_id)
        return JSONResponse({"id": key_id, "revoked": True})

    async def list_realms(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [r.public() for r in self.policy.realms.values()]})

    async def save_realm(self, request: Request) -> Response:
        body = await self._json_object(request)
        name = body.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise HTTPError(
                400, "`name` is 1-64 letters, digits, `_`, `.` or `-`.", "invalid_request", param="name"
            )
        lists = {k: body.get(k) or [] for k in ("nodes", "models")}
        if not all(isinstance(v, list) and all(isinstance(i, str) for i in v) for v in lists.values()):
            raise HTTPError(400, "`nodes` and `models` are lists of names.", "invalid_request")
        realm = Realm(
            name, **lists, **{k: _opt_positive_int(body, k) for k in ("rpm", "tpm", "max_concurrent")}
        )
        self.policy.save_realm(realm)
        self.record("realm.save", request, realm=name)
        return JSONResponse(realm.public(), status_code=201)

    async def get_share(self, request: Request) -> Response:
        return JSONResponse({"mode": self.policy.share})

    async def put_share(self, request: Request) -> Response:
        mode = (await self._json_object(request)).get("mode")
        self.policy.set_share(str(mode))
        if mode == "off":  # off also ends every running answer, each with a clean error frame
            self.gateway.abort("sharing_off")
        self.record("share", request, mode=mode)
        return JSONResponse({"mode": self.policy.share})

    async def usage(self, request: Request) -> Response:
        group_by = request.query_params.get("group_by", "model")
        if group_by not in Store.USAGE_GROUPS:
            raise HTTPError(
                400,
                f"`group_by` is one of {', '.join(Store.USAGE_GROUPS)}.",
                "invalid_request",
                param="group_by",
            )
        since = _parse_since(request.query_params.get("since"))
        data = self.accounting.usage(group_by, since)
        totals = {
            k: sum(row[k] or 0 for row in data) for k in ("requests", "prompt_tokens", "completion_tokens")
        }
        return JSONResponse({"object": "list", "group_by": group_by, "data": data, "totals": totals})

    async def cache_stats(self, request: Request) -> Response:
        return JSONResponse(self.cache.stats())

    async def cache_clear(self, request: Request) -> Response:
        self.cache.clear()
        self.record("cache.clear", request)
        return JSONResponse(self.cache.stats())

    async def audit(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": self.accounting.audit_rows()})

    async def events(self, request: Request) -> Response:
        if request.method == "HEAD":  # the route's GET brings HEAD along; a HEAD must not open a stream
            return Response(media_type="text/event-stream")
        queue = self.accounting.events.subscribe()

        async def stream() -> Any:
            try:
                yield b": connected\n\n"
                while True:
                    try:
                        event = await asyncio.wait_for(queue.get(), 15)
                    except TimeoutError:
                        yield b": keep-alive\n\n"
                        continue
                    yield f"event: {event.kind}\ndata: {json.dumps(event.data)}\n\n".encode()
            finally:
                self.accounting.events.unsubscribe(queue)

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
        )

    async def metrics(self, request: Request) -> Response:
        return Response(
            self.accounting.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    async def dashboard(self, request: Request) -> Response:
        # The page holds no data and no secrets; with an admin token set it must load so that it can ask
        # for the token, which then guards every call it makes. Without a token, loopback only.
        if not self.settings.admin_token and (denied := self.denied(request)):
            return denied
        return HTMLResponse(DASHBOARD_HTML, headers={"Cache-Control": "no-store"})


def _opt_positive_int(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise HTTPError(400, f"`{key}` is a positive whole number.", "invalid_request", param=key)
    return value


def _parse_since(value: str | None) -> float:
    if not value:
        return 0.0
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise HTTPError(
            400, "`since` is an ISO 8601 date or time.", "invalid_request", param="since"
        ) from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _opt_str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    return str(value) if value not in (None, "") else None


async def _http_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPError)
    return api_error(exc.status, exc.message, exc.code, exc.headers, exc.param)


async def _not_found(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 404)
    if status == 405:
        return api_error(405, f"{request.method} is not allowed on {request.url.path}.", "method_not_allowed")
    return api_error(404, f"No such endpoint: {request.url.path}.", "not_found")


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("control plane request %s failed", request.url.path)
    return api_error(500, "Internal gateway error.", "internal_error")


# ── app: one gateway instance; several can live in one process (tests), nothing global ────────────────────


class App:
    """One running gateway: builds its parts, hands each the collaborators it needs, and dispatches the
    hot path (`/v1/*`) itself, everything else to Starlette."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.instance = secrets.token_hex(4)
        self.started_at = time.time()
        self.events = EventBus()
        self.store = Store(settings.db_path)
        self.clients = NodeClients(settings)
        self.cache = ResultCache(settings.cache_max_bytes, settings.cache_ttl_s)
        self.registry = Registry(settings, self.store, self.events, self.clients, self.cache.invalidate)
        self.router = Router(self.registry, self.store)
        self.admission = Admission(settings)
        self.policy = Policy(settings, self.store)
        self.metrics = Metrics(self.registry, self.admission, self.cache)
        self.accounting = Accounting(settings, self.store, self.events, self.metrics)
        self.gateway = Gateway(
            settings,
            registry=self.registry,
            router=self.router,
            policy=self.policy,
            admission=self.admission,
            clients=self.clients,
            cache=self.cache,
            accounting=self.accounting,
            started_at=self.started_at,
        )
        self.control = ControlPlane(
            settings,
            registry=self.registry,
            router=self.router,
            policy=self.policy,
            admission=self.admission,
            gateway=self.gateway,
            cache=self.cache,
            accounting=self.accounting,
            clients=self.clients,
            identity={"instance": self.instance, "started_at": self.started_at},
        )
        self.demo_nodes: list[Any] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self.starlette = Starlette(
            routes=self.control.routes(),
            exception_handlers={
                HTTPError: _http_error_handler,
                404: _not_found,
                405: _not_found,
                500: _server_error,
            },
            lifespan=self._lifespan,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.settings.cors_origins:
            origin = header_value(scope["headers"], b"origin")
            if origin is not None:
                await self.cors(scope, receive, send, origin)
                return
        await self.dispatch(scope, receive, send)

    async def dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path.startswith("/v1/"):
                await self.gateway.handle(scope, receive, send)
                return
            if path == "/healthz":
                await send_json(send, 200, {"status": "ok"})
                return
        await self.starlette(scope, receive, send)

    async def cors(self, scope: Scope, receive: Receive, send: Send, origin: str) -> None:
        """Browsers may call only from the origins the owner listed; everything else gets no CORS headers."""
        allowed = origin in self.settings.cors_origins or "*" in self.settings.cors_origins
        if scope["method"] == "OPTIONS" and header_value(scope["headers"], b"access-control-request-method"):
            if not allowed:
                surface = "anthropic" if scope["path"] == "/v1/messages" else "openai"
                await send_json(
                    send, 403, json.loads(error_body(surface, 403, "Origin not allowed.", "cors_forbidden"))
                )
                return
            headers = [
                (b"access-control-allow-origin", origin.encode()),
                (b"vary", b"Origin"),
                (b"access-control-allow-methods", b"GET, POST, PUT, PATCH, DELETE, OPTIONS"),
                (
                    b"access-control-allow-headers",
                    (header_value(scope["headers"], b"access-control-request-headers") or "*").encode(),
                ),
                (b"access-control-max-age", b"600"),
                (b"content-length", b"0"),
            ]
            await send({"type": "http.response.start", "status": 204, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        if not allowed:
            await self.dispatch(scope, receive, send)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [
                        *message.get("headers", []),
                        (b"access-control-allow-origin", origin.encode()),
                        (b"vary", b"Origin"),
                    ],
                }
            await send(message)

        await self.dispatch(scope, receive, send_with_cors)

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> Any:
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def start(self) -> None:
        s = self.settings
        self.clients.open()
        self.registry.load()
        self.registry.merge_configured(s.nodes)
        if s.demo:
            self.registry.merge_configured(await self.start_demo_nodes(), source="demo")
        await asyncio.gather(
            *(self.registry.probe(n) for n in self.registry.nodes.values() if n.admin_state != "disabled"),
            return_exceptions=True,
        )
        if not self.registry.nodes and s.discover_local:
            await self.registry.find_local_nodes()
        loop = asyncio.get_running_loop()
        self._tasks += [
            loop.create_task(self.registry.refresh_forever()),
            loop.create_task(self.accounting.flush_forever()),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.clients.close()
        for node in self.demo_nodes:
            await node.stop()
        self.accounting.flush()
        self.store.close()

    async def start_demo_nodes(self) -> list[str]:
        """Two emulated LM Studio nodes holding different models, so the product works with none around."""
        specs = [
            "qwen/qwen3-4b:llm:loaded,text-embedding-nomic-embed-text-v1.5:embedding:loaded",
            "google/gemma-3-4b:vlm:loaded,mistralai/ministral-3b:llm",
        ]
        urls = []
        for spec in specs:
            node = MockNode(parse_model_specs(spec), tps=40.0, load_delay=1.0)
            urls.append(await node.start("127.0.0.1", 0))
            self.demo_nodes.append(node)
        return urls


# ── dashboard: the owner's single page, embedded so it works offline with no build step ───────────────────

DASHBOARD_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1,viewport-fit=cover">
<meta name="color-scheme" content="light dark">
<meta name="referrer" content="no-referrer">
<title>Vampire</title>
<link rel="icon" href="data:,">
<style>
:root{
  --bg:#f5f6f8;--panel:#ffffff;--fg:#1b2030;--muted:#64708a;--line:#e3e6ec;--soft:#f0f2f6;
  --accent:#a3243b;--accent-fg:#ffffff;--ok:#0f7b55;--ok-bg:#e3f5ec;--warn:#9a5b00;--warn-bg:#fdf1dc;
  --bad:#b4233c;--bad-bg:#fbe6ea;--idle:#6b7385;--idle-bg:#eceef2;--bar:#a3243b;--bar2:#d98a98;
  --radius:12px;--shadow:0 1px 2px rgba(16,24,40,.06);
}
@media (prefers-color-scheme:dark){
  :root{
    --bg:#0e1016;--panel:#161922;--fg:#e5e8ef;--muted:#98a1b5;--line:#262b37;--soft:#1d212c;
    --accent:#e0647a;--accent-fg:#14070a;--ok:#4ccf97;--ok-bg:#12301f;--warn:#f0b44c;--warn-bg:#33260e;
    --bad:#f07288;--bad-bg:#3a1520;--idle:#9aa3b5;--idle-bg:#232734;--bar:#e0647a;--bar2:#7d3a47;
    --shadow:none;
  }
}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;background:var(--bg);color:var(--fg);font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.9em}
h1,h2,h3{margin:0;font-weight:600}
h2{font-size:1.02rem}
a{color:var(--accent)}
[hidden]{display:none !important}
header{position:sticky;top:0;z-index:5;background:var(--panel);border-bottom:1px solid var(--line)}
.bar{max-width:1240px;margin:0 auto;padding:10px 16px;display:flex;flex-wrap:wrap;align-items:center;gap:10px 16px}
.brand{display:flex;align-items:center;gap:8px;font-size:1.15rem;font-weight:700;letter-spacing:.2px}
.brand i{width:12px;height:12px;border-radius:50%;background:var(--accent);display:inline-block}
.endpoint{display:flex;align-items:center;gap:6px;min-width:0;flex:1 1 260px;color:var(--muted)}
.endpoint code{color:var(--fg);background:var(--soft);padding:3px 8px;border-radius:6px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.right{display:flex;align-items:center;gap:10px;margin-left:auto;flex-wrap:wrap}
.live{display:inline-flex;align-items:center;gap:6px;font-size:.85rem;color:var(--muted)}
.live i{width:8px;height:8px;border-radius:50%;background:var(--idle)}
.live[data-live="1"] i{background:var(--ok);box-shadow:0 0 0 3px var(--ok-bg)}
main{max-width:1240px;margin:0 auto;padding:16px}
.summary{display:grid;grid-template-columns:repeat(auto-fit,minmax(130px,1fr));gap:12px;margin-bottom:16px}
.stat{background:var(--panel);border:1px solid var(--line);border-radius:var(--radius);padding:12px 14px;box-shadow:var(--shadow)}
.stat b{display:block;font-size:1.45rem;font-weight:650;font-variant-numeric:tabular-nums;line-height:1.2}
.stat span{font-size:.8rem;color:var(--muted);text-transform:uppercase;letter-spacing:.04em}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,480px),1fr));gap:16px;align-items:start}
.panel{background:var(--panel);border:1px solid var(--line);border-radius:var(--radius);padding:14px 16px;box-shadow:var(--shadow);min-width:0}
.wide{grid-column:1/-1}
.phead{display:flex;align-items:center;justify-content:space-between;gap:10px;margin-bottom:10px;flex-wrap:wrap}
.muted{color:var(--muted)}
.small{font-size:.85rem}
.empty{color:var(--muted);padding:10px 0;font-size:.9rem}
button,.btn{font:inherit;font-size:.9rem;min-height:36px;padding:6px 14px;border-radius:8px;border:1px solid var(--line);background:var(--soft);color:var(--fg);cursor:pointer;touch-action:manipulation}
button:hover{border-color:var(--muted)}
button:disabled{opacity:.55;cursor:default}
button.primary{background:var(--accent);border-color:var(--accent);color:var(--accent-fg)}
button.danger{color:var(--bad);border-color:var(--bad)}
button.danger.solid{background:var(--bad);color:var(--panel)}
button.ghost{background:transparent}
input,select,textarea{font:inherit;font-size:.95rem;min-height:36px;padding:6px 10px;border-radius:8px;border:1px solid var(--line);background:var(--bg);color:var(--fg);min-width:0}
textarea{width:100%;resize:vertical;min-height:84px}
input:focus,select:focus,textarea:focus,button:focus-visible{outline:2px solid var(--accent);outline-offset:1px}
@media (pointer:coarse){button,input,select{min-height:44px}}
form.row{display:flex;flex-wrap:wrap;gap:8px;align-items:center;margin-top:10px}
form.row>input,form.row>select{flex:1 1 150px}
form.row>input[type="url"]{flex:2 1 240px}
label.f{display:flex;flex-direction:column;gap:3px;font-size:.8rem;color:var(--muted);flex:1 1 150px}
.tablewrap{overflow-x:auto;-webkit-overflow-scrolling:touch}
table{border-collapse:collapse;width:100%;font-size:.9rem}
th{font-weight:600;color:var(--muted);font-size:.78rem;text-transform:uppercase;letter-spacing:.04em;text-align:left}
th,td{padding:7px 8px;border-bottom:1px solid var(--line);vertical-align:top;text-align:left}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr:last-child td{border-bottom:none}
.badge{display:inline-block;font-size:.76rem;font-weight:600;padding:2px 9px;border-radius:999px;background:var(--idle-bg);color:var(--idle);white-space:nowrap;text-transform:lowercase}
.b-online,.b-ok{background:var(--ok-bg);color:var(--ok)}
.b-draining,.b-warn{background:var(--warn-bg);color:var(--warn)}
.b-offline,.b-unauthorized,.b-bad{background:var(--bad-bg);color:var(--bad)}
.chips{display:flex;flex-wrap:wrap;gap:6px}
.chip{display:inline-flex;align-items:center;gap:5px;font-size:.8rem;padding:2px 9px;border-radius:999px;border:1px solid var(--line);background:var(--soft);max-width:100%;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.chip i{width:7px;height:7px;border-radius:50%;background:var(--idle);flex:none}
.chip.on i{background:var(--ok)}
.chip.w{white-space:normal}
.mrow{display:flex;flex-direction:column;gap:6px;padding:9px 0;border-bottom:1px solid var(--line)}
.mrow:last-child{border-bottom:none}
#traffic-rows td{white-space:nowrap}
.nodes{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,340px),1fr));gap:12px}
.node{border:1px solid var(--line);border-radius:10px;padding:12px;display:flex;flex-direction:column;gap:8px;background:var(--panel)}
.node[data-state="offline"],.node[data-state="unauthorized"]{border-color:var(--bad-bg)}
.nh{display:flex;align-items:center;gap:8px;flex-wrap:wrap}
.nh strong{overflow-wrap:anywhere}
.kv{display:grid;grid-template-columns:repeat(3,1fr);gap:6px}
.kv div{background:var(--soft);border-radius:8px;padding:5px 8px;min-width:0}
.kv span{display:block;font-size:.72rem;color:var(--muted);text-transform:uppercase;letter-spacing:.04em}
.kv b{font-weight:600;font-variant-numeric:tabular-nums}
.acts{display:flex;flex-wrap:wrap;gap:6px}
.err{color:var(--bad);font-size:.85rem;overflow-wrap:anywhere}
.switch{display:inline-flex;align-items:center;gap:10px;font-weight:600;padding:6px 14px 6px 8px;border-radius:999px;min-height:40px;border:1px solid var(--ok);background:var(--ok-bg);color:var(--ok)}
.switch .track{width:38px;height:22px;border-radius:999px;background:var(--ok);position:relative;flex:none}
.switch .track::after{content:"";position:absolute;top:3px;left:19px;width:16px;height:16px;border-radius:50%;background:#fff;transition:left .15s}
.switch[aria-checked="false"]{border-color:var(--bad);background:var(--bad-bg);color:var(--bad)}
.switch[aria-checked="false"] .track{background:var(--idle)}
.switch[aria-checked="false"] .track::after{left:3px}
.tokenbar{background:var(--warn-bg);color:var(--fg);border-bottom:1px solid var(--line)}
.tokenbar form{max-width:1240px;margin:0 auto;padding:10px 16px;display:flex;gap:8px;flex-wrap:wrap;align-items:center}
.tokenbar input{flex:1 1 220px}
.spin{display:inline-block;width:14px;height:14px;border:2px solid var(--line);border-top-color:var(--accent);border-radius:50%;animation:sp 0.8s linear infinite;vertical-align:-2px}
@keyframes sp{to{transform:rotate(360deg)}}
.progress{display:flex;align-items:center;gap:8px;margin-top:10px;color:var(--muted);font-size:.9rem}
.out{white-space:pre-wrap;overflow-wrap:anywhere;background:var(--soft);border-radius:8px;padding:10px 12px;min-height:84px;margin-top:10px;font-size:.95rem}
.out:empty::before{content:"The answer streams here.";color:var(--muted)}
.out[data-state="streaming"]::after{content:"";display:inline-block;width:7px;height:1em;background:var(--accent);vertical-align:-2px;margin-left:2px;animation:bl 1s steps(2) infinite}
@keyframes bl{50%{opacity:0}}
.bars{display:flex;flex-direction:column;gap:6px;margin-top:8px}
.brow{display:grid;grid-template-columns:minmax(70px,32%) 1fr auto;gap:8px;align-items:center;font-size:.85rem}
.brow .lbl{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.track2{height:14px;background:var(--soft);border-radius:4px;overflow:hidden;display:flex}
.track2 .p{background:var(--bar2)}
.track2 .c{background:var(--bar)}
.seg{display:inline-flex;border:1px solid var(--line);border-radius:8px;overflow:hidden}
.seg button{border:none;border-radius:0;min-height:32px;background:transparent}
.seg button[aria-pressed="true"]{background:var(--accent);color:var(--accent-fg)}
.statgrid{display:grid;grid-template-columns:repeat(auto-fit,minmax(95px,1fr));gap:8px}
.statgrid div{background:var(--soft);border-radius:8px;padding:8px 10px}
.statgrid span{display:block;font-size:.72rem;color:var(--muted);text-transform:uppercase;letter-spacing:.04em}
.statgrid b{font-size:1.1rem;font-variant-numeric:tabular-nums}
.secret{margin-top:10px;padding:10px;border:1px dashed var(--accent);border-radius:8px;display:flex;flex-wrap:wrap;gap:8px;align-items:center}
.secret code{flex:1 1 220px;overflow-wrap:anywhere;font-size:.95rem}
.st2{color:var(--ok)}.st4{color:var(--warn)}.st5{color:var(--bad)}
#toast{position:fixed;left:50%;bottom:16px;transform:translateX(-50%);z-index:9;max-width:min(92vw,560px);background:var(--fg);color:var(--bg);padding:10px 16px;border-radius:10px;font-size:.9rem;box-shadow:0 6px 24px rgba(0,0,0,.25)}
#toast.bad{background:var(--bad);color:#fff}
footer{max-width:1240px;margin:0 auto;padding:4px 16px 24px;color:var(--muted);font-size:.8rem}
@media (max-width:560px){
  main{padding:12px}
  .bar{padding:8px 12px}
  .summary{grid-template-columns:repeat(3,1fr);gap:8px}
  .stat{padding:8px 10px}
  .stat b{font-size:1.15rem}
  .stat span{font-size:.68rem}
  form.row>input,form.row>select{flex-basis:100%}
  .panel{padding:12px}
  .hide-s{display:none !important}
  .endpoint{order:3;flex-basis:100%}
  th,td{padding:7px 5px}
  .live span{display:none}
}
</style>
</head>
<body>
<header>
  <div class="bar">
    <div class="brand"><i></i>Vampire</div>
    <div class="endpoint"><span class="small hide-s">Endpoint</span><code id="endpoint" data-testid="endpoint"></code><button type="button" class="ghost" id="copy-endpoint">Copy</button></div>
    <div class="right">
      <span class="live" id="live" data-testid="live-indicator" data-live="0"><i></i><span id="live-text">connecting</span></span>
      <span id="share-box" hidden>
        <button type="button" class="switch" id="share-toggle" role="switch" aria-checked="true" data-testid="stop-sharing" title="Stop or resume sharing"><span class="track"></span><span id="share-label">Sharing</span></button>
        <select id="share-mode" class="hide-s" data-testid="share-mode" aria-label="Who may call without a key">
          <option value="local">local</option><option value="lan">lan</option><option value="keys">keys only</option>
        </select>
      </span>
    </div>
  </div>
  <div class="tokenbar" id="token-bar" data-testid="token-prompt" hidden>
    <form id="token-form">
      <span id="token-msg">This gateway asks for its admin token.</span>
      <input id="token-input" type="password" autocomplete="current-password" placeholder="Admin token" aria-label="Admin token" required>
      <button class="primary" type="submit">Unlock</button>
    </form>
  </div>
</header>

<main>
  <section class="summary" aria-label="Cluster summary" data-testid="summary">
    <div class="stat"><b id="sum-nodes" data-testid="sum-nodes">-</b><span>Nodes online</span></div>
    <div class="stat"><b id="sum-rps" data-testid="sum-rps">0</b><span>Requests / s</span></div>
    <div class="stat"><b id="sum-tps" data-testid="sum-tps">-</b><span>Tokens / s</span></div>
    <div class="stat"><b id="sum-inflight" data-testid="sum-inflight">0</b><span>In flight</span></div>
    <div class="stat"><b id="sum-queue" data-testid="sum-queue">-</b><span>Queued</span></div>
  </section>

  <div class="grid">
    <section class="panel wide" id="nodes-panel" data-testid="nodes-panel">
      <div class="phead"><h2>Nodes</h2><span class="muted small" id="nodes-note"></span></div>
      <div class="nodes" id="node-list"></div>
      <form class="row" id="add-node-form" data-testid="add-node-form" autocomplete="off">
        <input id="add-url" type="url" placeholder="http://192.168.1.20:1234" aria-label="Node URL" required>
        <input id="add-token" type="password" autocomplete="new-password" placeholder="Token (optional)" aria-label="Node token">
        <button class="primary" type="submit" data-testid="add-node-btn">Add node</button>
      </form>
    </section>

    <section class="panel" id="playground-panel" data-testid="playground-panel">
      <div class="phead"><h2>Playground</h2><span class="muted small" id="play-meta" data-testid="playground-meta"></span></div>
      <form id="play-form">
        <div class="row" style="display:flex;gap:8px;margin-bottom:8px">
          <select id="play-model" data-testid="playground-model" aria-label="Model" style="flex:1 1 auto"></select>
          <button class="primary" type="submit" id="play-send" data-testid="playground-send">Send</button>
        </div>
        <textarea id="play-prompt" data-testid="playground-prompt" placeholder="Ask something. Ctrl+Enter sends." aria-label="Prompt"></textarea>
      </form>
      <div class="out" id="play-out" data-testid="playground-output" data-state="idle" aria-live="polite"></div>
      <div class="err" id="play-error" data-testid="playground-error" role="alert" style="margin-top:8px" hidden></div>
    </section>

    <section class="panel" id="models-panel" data-testid="models-panel">
      <div class="phead"><h2>Models</h2><span class="muted small" id="models-note"></span></div>
      <div id="model-rows"></div>
    </section>

    <section class="panel wide" id="traffic-panel" data-testid="traffic-panel">
      <div class="phead"><h2>Live traffic</h2><span class="muted small">last 50 requests</span></div>
      <div class="tablewrap"><table>
        <thead><tr><th>Time</th><th>Model</th><th class="hide-s">Node</th><th class="num">Status</th><th class="num">Latency</th><th class="num hide-s">Tokens</th><th class="hide-s">Cache</th></tr></thead>
        <tbody id="traffic-rows"></tbody>
      </table></div>
      <div class="empty" id="traffic-empty">Waiting for requests.</div>
    </section>

    <section class="panel" id="discovery-panel" data-testid="discovery-panel">
      <div class="phead"><h2>Discovery</h2><span class="muted small">found is not trusted until you approve it</span></div>
      <form class="row" id="discover-form" autocomplete="off">
        <label class="f">Subnets<input id="disc-subnets" value="127.0.0.0/24" placeholder="192.168.1.0/24" data-testid="discover-subnets"></label>
        <label class="f">Ports<input id="disc-ports" value="1234, 11434" placeholder="1234, 11434" data-testid="discover-ports"></label>
        <button class="primary" type="submit" id="disc-btn" data-testid="discover-btn" style="align-self:flex-end">Scan</button>
      </form>
      <div class="progress" id="disc-progress" data-testid="discover-progress" hidden><span class="spin"></span><span id="disc-progress-text">Scanning</span></div>
      <div class="tablewrap"><table id="disc-table" hidden>
        <thead><tr><th>Endpoint</th><th>Models</th><th></th></tr></thead>
        <tbody id="disc-rows"></tbody>
      </table></div>
      <div class="empty" id="disc-empty" hidden>Nothing answered.</div>
    </section>

    <section class="panel" id="routes-panel" data-testid="routes-panel">
      <div class="phead"><h2>Routes</h2><span class="muted small">named virtual models</span></div>
      <div class="tablewrap"><table id="routes-table" hidden>
        <thead><tr><th>Name</th><th>Targets</th><th>Strategy</th><th></th></tr></thead>
        <tbody id="route-rows"></tbody>
      </table></div>
      <div class="empty" id="routes-empty">No routes yet.</div>
      <form class="row" id="route-form" autocomplete="off">
        <input id="route-id" placeholder="Name, e.g. fast" aria-label="Route name" data-testid="route-id" required>
        <input id="route-targets" placeholder="model@node, model" aria-label="Targets" data-testid="route-targets" required>
        <select id="route-strategy" aria-label="Strategy" data-testid="route-strategy"></select>
        <input id="route-fallback" placeholder="Fallback model (optional)" aria-label="Fallback model" data-testid="route-fallback">
        <button class="primary" type="submit" data-testid="route-add-btn">Add route</button>
      </form>
    </section>

    <section class="panel" id="keys-panel" data-testid="keys-panel" hidden>
      <div class="phead"><h2>Keys</h2><span class="muted small">client credentials</span></div>
      <div class="tablewrap"><table id="keys-table" hidden>
        <thead><tr><th>Name</th><th>Realm</th><th class="hide-s">Created</th><th></th></tr></thead>
        <tbody id="key-rows"></tbody>
      </table></div>
      <div class="empty" id="keys-empty">No keys yet.</div>
      <div class="secret" id="new-key-box" hidden>
        <span class="small">Copy it now; it is shown only once:</span>
        <code id="new-key" data-testid="new-key"></code>
        <button type="button" id="copy-key">Copy</button>
        <button type="button" class="ghost" id="hide-key">Done</button>
      </div>
      <form class="row" id="key-form" autocomplete="off">
        <input id="key-name" placeholder="Name, e.g. laptop" aria-label="Key name" data-testid="key-name" required>
        <input id="key-realm" placeholder="Realm (optional)" aria-label="Realm" data-testid="key-realm">
        <button class="primary" type="submit" data-testid="key-create-btn">Create key</button>
      </form>
    </section>

    <section class="panel" id="usage-panel" data-testid="usage-panel" hidden>
      <div class="phead"><h2>Usage</h2>
        <div class="seg" id="usage-seg" role="group" aria-label="Group usage by">
          <button type="button" data-group="day" aria-pressed="true">Day</button><button type="button" data-group="key" aria-pressed="false">Key</button><button type="button" data-group="model" aria-pressed="false">Model</button>
        </div>
      </div>
      <div class="small muted" id="usage-totals"></div>
      <div class="bars" id="usage-bars" data-testid="usage-bars"></div>
      <div class="small muted" id="usage-legend" style="margin-top:8px" hidden><span style="color:var(--bar)">&#9632;</span> completion tokens <span style="color:var(--bar2)">&#9632;</span> prompt tokens</div>
    </section>

    <section class="panel" id="cache-panel" data-testid="cache-panel" hidden>
      <div class="phead"><h2>Cache</h2><button type="button" class="danger" id="cache-clear" data-testid="cache-clear-btn">Clear</button></div>
      <div class="statgrid" id="cache-stats" data-testid="cache-stats"></div>
    </section>
  </div>
</main>
<footer id="footer"></footer>
<div id="toast" role="status" hidden></div>

<script>
"use strict";
(() => {
  const NL = String.fromCharCode(10);
  const CR = String.fromCharCode(13);
  const TOKEN_KEY = "vampire.adminToken";
  const PREV_SHARE_KEY = "vampire.previousShare";
  const CP = "/vampire/v1";
  const STRATEGIES = ["auto", "round_robin", "least_busy", "least_latency", "model_affinity", "trusted_only"];
  const RATE_WINDOW_MS = 10000;
  const PERIOD_MS = 10000;

  const S = {
    token: sessionStorage.getItem(TOKEN_KEY) || "",
    locked: false,
    nodes: [],
    status: null,
    share: null,
    optional: {},
    traffic: [],
    recent: [],
    liveSince: 0,
    stream: null,
    retry: 0,
    found: [],
    confirm: "",
    usageGroup: "day",
    usage: {},
    play: null,
    pending: {},
    lastNodesFetch: 0,
    tokensKnown: false,
    drawQueued: false,
    nodesDirty: false,
    keyNames: new Map()
  };

  const $ = id => document.getElementById(id);

  // Every value from the API reaches the DOM as a text node: node names and model ids are untrusted.
  function h(tag, props, kids) {
    const e = document.createElement(tag);
    if (props) {
      for (const k of Object.keys(props)) {
        const v = props[k];
        if (v === undefined || v === null || v === false) continue;
        if (k === "text") e.textContent = String(v);
        else if (k === "cls") e.className = v;
        else if (k === "testid") e.setAttribute("data-testid", v);
        else if (k.slice(0, 2) === "on") e.addEventListener(k.slice(2), v);
        else e.setAttribute(k, v === true ? "" : String(v));
      }
    }
    for (const c of [].concat(kids === undefined ? [] : kids)) {
      if (c === null || c === undefined || c === false) continue;
      e.append(typeof c === "object" ? c : String(c));
    }
    return e;
  }

  function fmtNum(v, digits) {
    if (v === null || v === undefined || v === "" || isNaN(Number(v))) return "-";
    return Number(v).toLocaleString(undefined, {maximumFractionDigits: digits === undefined ? 0 : digits});
  }
  function fmtMs(v) {
    if (v === null || v === undefined) return "-";
    const n = Number(v);
    return n >= 1000 ? fmtNum(n / 1000, 2) + " s" : fmtNum(n, n < 10 ? 1 : 0) + " ms";
  }
  function fmtBytes(v) {
    let n = Number(v) || 0;
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return fmtNum(n, i ? 1 : 0) + " " + units[i];
  }
  function fmtWhen(v) {
    if (v === null || v === undefined || v === "") return "-";
    const t = typeof v === "number" ? (v < 1e12 ? v * 1000 : v) : Date.parse(v);
    if (isNaN(t)) return String(v);
    return new Date(t).toLocaleString(undefined, {dateStyle: "medium", timeStyle: "short"});
  }
  function clock(t) {
    return new Date(t).toLocaleTimeString(undefined, {hour12: false});
  }

  let toastTimer = 0;
  function toast(msg, bad) {
    const t = $("toast");
    t.textContent = msg;
    t.className = bad ? "bad" : "";
    t.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { t.hidden = true; }, bad ? 6000 : 3000);
  }

  function authHeaders(extra) {
    const headers = Object.assign({}, extra || {});
    if (S.token) headers.Authorization = "Bearer " + S.token;
    return headers;
  }

  function errorText(data, status) {
    const e = data && data.error;
    if (e && typeof e === "object" && e.message) return String(e.message);
    if (typeof e === "string") return e;
    if (status === 0) return "The gateway is not reachable.";
    return "The gateway answered " + status + ".";
  }

  // Never throws: callers branch on `ok` and `status`, so a missing endpoint or a dropped link stays quiet.
  async function api(method, path, body) {
    const opts = {method: method, headers: authHeaders(), cache: "no-store"};
    if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    let r;
    try {
      r = await fetch(path, opts);
    } catch (err) {
      return {ok: false, status: 0, data: null, error: errorText(null, 0)};
    }
    let data = null;
    try { data = await r.json(); } catch (err) { data = null; }
    if (r.status === 401 && path.indexOf(CP) === 0) lock(S.token ? "That token was refused." : "");
    return {ok: r.ok, status: r.status, data: data, error: r.ok ? "" : errorText(data, r.status)};
  }

  function listOf(r) {
    return r.ok && r.data && Array.isArray(r.data.data) ? r.data.data : [];
  }

  // admin token
  function lock(message) {
    if (message) $("token-msg").textContent = message;
    if (S.locked) return;
    S.locked = true;
    stopEvents();
    $("token-bar").hidden = false;
    $("token-input").focus();
  }
  $("token-form").addEventListener("submit", ev => {
    ev.preventDefault();
    S.token = $("token-input").value.trim();
    sessionStorage.setItem(TOKEN_KEY, S.token);
    $("token-input").value = "";
    $("token-bar").hidden = true;
    S.locked = false;
    boot();
  });

  // summary
  function renderSummary() {
    const online = S.nodes.filter(n => n.state === "online").length;
    $("sum-nodes").textContent = S.nodes.length ? online + " / " + S.nodes.length : "0";
    const inflight = S.nodes.reduce((a, n) => a + (Number(n.in_flight) || 0), 0);
    $("sum-inflight").textContent = fmtNum(inflight);
    const q = S.status ? S.status.queue : undefined;
    let queued = "-";
    if (typeof q === "number") queued = fmtNum(q);
    else if (q && typeof q === "object") {
      const waiting = [q.waiting, q.depth, q.size, q.length].find(v => typeof v === "number");
      if (waiting !== undefined) queued = fmtNum(waiting) + (typeof q.max === "number" ? " / " + fmtNum(q.max) : "");
    }
    $("sum-queue").textContent = queued;
    renderRates();
    const st = S.status;
    $("footer").textContent = st ? "Vampire " + (st.version || "") + " · instance " + (st.instance || "-") +
      " · up " + fmtUptime(st.uptime_s) : "";
  }
  function fmtUptime(s) {
    s = Number(s) || 0;
    if (s < 90) return Math.round(s) + " s";
    if (s < 5400) return Math.round(s / 60) + " min";
    if (s < 172800) return fmtNum(s / 3600, 1) + " h";
    return fmtNum(s / 86400, 1) + " days";
  }
  function renderRates() {
    const now = Date.now();
    while (S.recent.length && now - S.recent[0].t > RATE_WINDOW_MS) S.recent.shift();
    // A fresh page has not watched a full window yet; dividing by the full window would under-report.
    const span = Math.max(1000, Math.min(RATE_WINDOW_MS, now - (S.liveSince || now)));
    const tokens = S.recent.reduce((a, e) => a + e.tokens, 0);
    $("sum-rps").textContent = fmtNum(S.recent.length * 1000 / span, 1);
    // Until the gateway reports token counts per request, a rate of 0 would be a claim, not a measurement.
    $("sum-tps").textContent = S.tokensKnown ? fmtNum(tokens * 1000 / span, 1) : "-";
  }

  // nodes
  async function loadNodes() {
    S.lastNodesFetch = Date.now();
    const r = await api("GET", CP + "/nodes");
    if (!r.ok) return;
    S.nodes = listOf(r);
    renderNodes();
    renderSummary();
    if (S.found.length) renderFound();
  }

  function capacity(n) {
    const models = n.models || [];
    const loaded = models.filter(m => m.loaded && m.type !== "embedding");
    const pool = loaded.length ? loaded : models.filter(m => m.loaded);
    const slots = pool.reduce((a, m) => a + (Number(m.slots) || 0), 0);
    if (!slots) return null;
    const tier = typeof n.tier === "number" ? n.tier : 100;
    return Math.max(1, Math.floor(slots * tier / 100));
  }

  function renderNodes() {
    const list = $("node-list");
    if (!S.nodes.length) {
      list.replaceChildren(h("div", {cls: "empty"}, "No nodes yet. Add one below, or scan the network in Discovery."));
      $("nodes-note").textContent = "";
      return;
    }
    list.replaceChildren(...S.nodes.map(nodeCard));
    const untrusted = S.nodes.filter(n => !n.trusted).length;
    $("nodes-note").textContent = untrusted ? untrusted + " waiting for approval" : "";
  }

  function nodeCard(n) {
    const state = String(n.state || "unknown");
    const models = (n.models || []).map(m => {
      return h("span", {cls: "chip" + (m.loaded ? " on" : ""), testid: "node-model", "data-model-id": m.id,
        title: (m.loaded ? "loaded" : "not loaded") + (m.type ? " · " + m.type : "")}, [h("i"), m.id]);
    });
    const cap = capacity(n);
    const version = [n.kind, n.version].filter(Boolean).join(" ");
    const actions = [];
    if (state === "draining" || state === "disabled") {
      actions.push(h("button", {type: "button", testid: "undrain-btn",
        onclick: ev => { nodeAction(n, "PATCH", {state: "online"}, ev.currentTarget, "back in rotation"); }}, "Undrain"));
    } else {
      actions.push(h("button", {type: "button", testid: "drain-btn", title: "Finish running requests, take no new ones",
        onclick: ev => { nodeAction(n, "PATCH", {state: "draining"}, ev.currentTarget, "draining"); }}, "Drain"));
    }
    if (!n.trusted) {
      actions.push(h("button", {type: "button", cls: "primary", testid: "trust-btn",
        onclick: ev => { nodeAction(n, "PATCH", {trusted: true}, ev.currentTarget, "trusted"); }}, "Trust"));
    }
    if (S.confirm === "node:" + n.id) {
      actions.push(h("button", {type: "button", cls: "danger solid", testid: "remove-confirm-btn",
        onclick: ev => { S.confirm = ""; nodeAction(n, "DELETE", undefined, ev.currentTarget, "removed"); }}, "Remove for good"));
      actions.push(h("button", {type: "button", cls: "ghost", testid: "remove-cancel-btn",
        onclick: () => { S.confirm = ""; renderNodes(); }}, "Cancel"));
    } else {
      actions.push(h("button", {type: "button", cls: "danger", testid: "remove-btn",
        onclick: () => { S.confirm = "node:" + n.id; renderNodes(); }}, "Remove"));
    }
    return h("article", {cls: "node", testid: "node-row", "data-node-id": n.id, "data-state": state}, [
      h("div", {cls: "nh"}, [
        h("strong", {testid: "node-name"}, n.name || n.id),
        h("span", {cls: "badge b-" + state, testid: "node-state"}, state),
        h("span", {cls: "badge " + (n.trusted ? "b-ok" : "b-warn"), testid: "node-trust"}, n.trusted ? "trusted" : "untrusted")
      ]),
      h("div", {cls: "small muted mono", style: "overflow-wrap:anywhere"},
        [n.id, version ? " · " + version : "", " · ", n.url || ""]),
      models.length ? h("div", {cls: "chips", testid: "node-models"}, models) :
        h("div", {cls: "small muted"}, "No models reported"),
      h("div", {cls: "kv"}, [
        h("div", null, [h("span", null, "In flight"), h("b", {testid: "node-inflight"},
          fmtNum(n.in_flight || 0) + (cap ? " / " + cap : ""))]),
        h("div", null, [h("span", null, "Latency"), h("b", null, fmtMs(n.latency_ms))]),
        h("div", {title: "Share of this node's slots its owner allows Vampire"}, [h("span", null, "Tier"), h("b", null, (typeof n.tier === "number" ? n.tier : 100) + " %")])
      ]),
      n.last_error && state !== "online" ? h("div", {cls: "err"}, String(n.last_error)) : null,
      h("div", {cls: "acts"}, actions)
    ]);
  }

  async function nodeAction(n, method, body, btn, done) {
    if (btn) btn.disabled = true;
    const r = await api(method, CP + "/nodes/" + encodeURIComponent(n.id), body);
    if (r.ok) toast((n.name || n.id) + ": " + done);
    else toast(r.error, true);
    await Promise.all([loadNodes(), loadModels(), loadStatus()]);
  }

  $("add-node-form").addEventListener("submit", async ev => {
    ev.preventDefault();
    const btn = ev.submitter || null;
    const url = $("add-url").value.trim();
    const token = $("add-token").value;
    const body = {url: url};
    if (token) body.token = token;
    if (btn) btn.disabled = true;
    const r = await api("POST", CP + "/nodes", body);
    if (btn) btn.disabled = false;
    if (!r.ok) { toast(r.error, true); return; }
    $("add-url").value = "";
    $("add-token").value = "";
    toast("Added " + ((r.data && (r.data.name || r.data.id)) || url));
    await Promise.all([loadNodes(), loadModels(), loadStatus(), loadPlayModels()]);
  });

  // models
  async function loadModels() {
    const r = await api("GET", CP + "/models");
    if (!r.ok) return;
    const byModel = new Map();
    for (const row of listOf(r)) {
      if (!byModel.has(row.id)) byModel.set(row.id, []);
      byModel.get(row.id).push(row);
    }
    const ids = Array.from(byModel.keys()).sort();
    const rows = ids.map(id => {
      const places = byModel.get(id);
      const chips = places.map(p => {
        const ctx = p.loaded ? p.context_length : p.max_context_length;
        const bits = [p.node, p.loaded ? "loaded" : "on disk"];
        if (ctx) bits.push(fmtNum(ctx) + " ctx");
        if (p.slots) bits.push(p.slots + " slots");
        if (p.node_state && p.node_state !== "online") bits.push(p.node_state);
        return h("span", {cls: "chip w" + (p.loaded ? " on" : ""), testid: "placement", "data-node-id": p.node}, [h("i"), bits.join(" · ")]);
      });
      return h("div", {cls: "mrow", testid: "model-row", "data-model-id": id}, [
        h("div", {cls: "nh"}, [h("span", {cls: "mono", style: "overflow-wrap:anywhere"}, id),
          places[0].type ? h("span", {cls: "badge"}, places[0].type) : null]),
        h("div", {cls: "chips"}, chips)
      ]);
    });
    const body = $("model-rows");
    if (rows.length) body.replaceChildren(...rows);
    else body.replaceChildren(h("div", {cls: "empty"}, "No models yet."));
    $("models-note").textContent = ids.length ? ids.length + " model" + (ids.length === 1 ? "" : "s") : "";
  }

  async function loadStatus() {
    const r = await api("GET", CP + "/status");
    if (!r.ok) return;
    S.status = r.data;
    renderSummary();
  }

  // playground
  async function loadPlayModels() {
    let r;
    try {
      r = await fetch("/v1/models?vampire_detail=true", {headers: authHeaders(), cache: "no-store"});
    } catch (err) { return; }
    if (!r.ok) return;
    let data = null;
    try { data = await r.json(); } catch (err) { return; }
    const sel = $("play-model");
    const keep = sel.value;
    const ids = ((data && data.data) || []).filter(m => {
      const place = m.vampire && m.vampire.placement;
      return !place || !place.length || place.some(p => p.type !== "embedding");
    }).map(m => m.id);
    sel.replaceChildren(...ids.map(id => h("option", {value: id}, id)));
    if (keep && ids.indexOf(keep) >= 0) sel.value = keep;
  }

  function playError(msg) {
    const e = $("play-error");
    e.textContent = msg;
    e.hidden = !msg;
  }

  async function sendPrompt() {
    if (S.play) { S.play.abort(); return; }
    const prompt = $("play-prompt").value.trim();
    const model = $("play-model").value;
    if (!prompt) { $("play-prompt").focus(); return; }
    if (!model) { playError("No model is available yet."); return; }
    const ctl = new AbortController();
    S.play = ctl;
    const out = $("play-out");
    const send = $("play-send");
    out.textContent = "";
    out.setAttribute("data-state", "streaming");
    playError("");
    $("play-meta").textContent = "";
    send.textContent = "Stop";
    const started = performance.now();
    let firstAt = 0;
    let usage = null;
    let node = "";
    let failed = "";
    let meta0 = "";
    try {
      const r = await fetch("/v1/chat/completions", {
        method: "POST", signal: ctl.signal, cache: "no-store",
        headers: authHeaders({"Content-Type": "application/json", "Accept": "text/event-stream"}),
        body: JSON.stringify({model: model, stream: true, stream_options: {include_usage: true},
          messages: [{role: "user", content: prompt}]})
      });
      node = r.headers.get("X-Vampire-Node") || "";
      loadNodes();
      if (!r.ok || !r.body) {
        let data = null;
        try { data = await r.json(); } catch (err) { data = null; }
        failed = errorText(data, r.status);
      } else {
        await readSSE(r.body, (name, raw) => {
          if (raw === "[DONE]") return false;
          let msg;
          try { msg = JSON.parse(raw); } catch (err) { return true; }
          if (msg && msg.error) { failed = errorText(msg, 0); return true; }
          if (msg && msg.usage) usage = msg.usage;
          const choice = msg && msg.choices && msg.choices[0];
          const piece = choice && choice.delta && choice.delta.content;
          if (piece) {
            if (!firstAt) firstAt = performance.now();
            out.append(piece);
          }
          return true;
        });
      }
    } catch (err) {
      if (!ctl.signal.aborted) failed = "The stream broke off: " + (err && err.message ? err.message : "network error");
    }
    S.play = null;
    send.textContent = "Send";
    const stopped = ctl.signal.aborted && !failed;
    playError(failed);
    out.setAttribute("data-state", stopped ? "stopped" : failed ? "error" : "done");
    if (stopped) meta0 = "stopped";
    const meta = meta0 ? [meta0] : [];
    if (node) meta.push(node);
    if (firstAt) meta.push("first token " + fmtMs(firstAt - started));
    meta.push("total " + fmtMs(performance.now() - started));
    if (usage && usage.completion_tokens) meta.push(usage.completion_tokens + " tokens");
    $("play-meta").textContent = meta.join(" · ");
  }

  $("play-form").addEventListener("submit", ev => { ev.preventDefault(); sendPrompt(); });
  $("play-prompt").addEventListener("keydown", ev => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); if (!S.play) sendPrompt(); }
  });

  // One parser for both streams (events and chat): `onFrame` returning false stops reading early.
  async function readSSE(body, onFrame) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    let name = "";
    let data = [];
    for (;;) {
      const chunk = await reader.read();
      if (chunk.done) break;
      buf += decoder.decode(chunk.value, {stream: true});
      let i = buf.indexOf(NL);
      while (i >= 0) {
        let line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        i = buf.indexOf(NL);
        if (line.slice(-1) === CR) line = line.slice(0, -1);
        if (line === "") {
          if (data.length && onFrame(name || "message", data.join(NL)) === false) {
            reader.cancel().catch(() => {});
            return;
          }
          name = "";
          data = [];
          continue;
        }
        if (line[0] === ":") continue;
        const c = line.indexOf(":");
        const field = c < 0 ? line : line.slice(0, c);
        let value = c < 0 ? "" : line.slice(c + 1);
        if (value[0] === " ") value = value.slice(1);
        if (field === "event") name = value;
        else if (field === "data") data.push(value);
      }
    }
    if (data.length) onFrame(name || "message", data.join(NL));
  }

  // live events
  function setLive(on) {
    $("live").setAttribute("data-live", on ? "1" : "0");
    $("live-text").textContent = on ? "live" : "reconnecting";
    if (!on) return;
    // After a reconnect, whatever changed while the stream was down has to be read back.
    if (S.liveSince) scheduleNodes(true);
    else S.liveSince = Date.now();
  }

  function stopEvents() {
    clearTimeout(S.retry);
    if (S.stream) { S.stream.close(); S.stream = null; }
    setLive(false);
  }

  // EventSource cannot carry an Authorization header, so with a token the stream is read through fetch.
  function startEvents() {
    stopEvents();
    if (S.locked) return;
    if (!S.token && window.EventSource) {
      const es = new EventSource(CP + "/events");
      S.stream = {close: () => { es.close(); }};
      es.addEventListener("open", () => { setLive(true); });
      es.addEventListener("node", ev => { onEvent("node", ev.data); });
      es.addEventListener("request", ev => { onEvent("request", ev.data); });
      es.addEventListener("error", () => {
        setLive(false);
        if (es.readyState === 2) {
          S.stream = null;
          S.retry = setTimeout(() => { loadStatus().then(startEvents); }, 5000);
        }
      });
      return;
    }
    const ctl = new AbortController();
    S.stream = {close: () => { ctl.abort(); }};
    streamEvents(ctl);
  }

  async function streamEvents(ctl) {
    try {
      const r = await fetch(CP + "/events", {headers: authHeaders({"Accept": "text/event-stream"}), signal: ctl.signal, cache: "no-store"});
      if (r.status === 401) { lock("That token was refused."); return; }
      if (r.ok && r.body) {
        setLive(true);
        await readSSE(r.body, (name, raw) => { onEvent(name, raw); return true; });
      }
    } catch (err) {
      if (ctl.signal.aborted) return;
    }
    if (ctl.signal.aborted) return;
    setLive(false);
    S.retry = setTimeout(startEvents, 5000);
  }

  function onEvent(kind, raw) {
    let d;
    try { d = JSON.parse(raw); } catch (err) { return; }
    if (!d || typeof d !== "object") return;
    if (kind === "node") {
      const n = S.nodes.find(x => x.id === d.id);
      if (n && d.state && d.state !== "removed") {
        n.state = d.state;
        if (d.error) n.last_error = d.error;
        renderNodes();
        renderSummary();
      }
      scheduleNodes(true);
    } else if (kind === "request") {
      addTraffic(d);
      scheduleNodes(false);
    }
  }

  // Node events re-read at once (coalesced); request events only refresh in-flight counts, at most every 5 s.
  function scheduleNodes(urgent) {
    if (S.pending.nodes) return;
    const wait = urgent === true ? 150 : Math.max(150, 5000 - (Date.now() - S.lastNodesFetch));
    S.pending.nodes = setTimeout(async () => {
      await Promise.all([loadNodes(), urgent === true ? loadModels() : null, urgent === true ? loadStatus() : null]);
      S.pending.nodes = 0;
    }, wait);
  }

  function addTraffic(d) {
    const now = Date.now();
    const completion = Number(d.completion_tokens) || 0;
    if (d.completion_tokens != null) S.tokensKnown = true;
    S.recent.push({t: now, tokens: completion});
    if (S.recent.length > 50000) S.recent.splice(0, S.recent.length - 50000);
    S.traffic.unshift({t: now, d: d});
    if (S.traffic.length > 50) S.traffic.length = 50;
    // The request has finished, so its slot is free now; the next /nodes read settles the exact count.
    const n = d.node && S.nodes.find(x => x.id === d.node);
    if (n && n.in_flight > 0) { n.in_flight -= 1; S.nodesDirty = true; }
    // Under load many events land per frame; redrawing the table once per frame is enough.
    if (S.drawQueued) return;
    S.drawQueued = true;
    requestAnimationFrame(() => {
      S.drawQueued = false;
      if (S.nodesDirty) { S.nodesDirty = false; renderNodes(); renderSummary(); }
      renderTraffic();
      renderRates();
    });
  }

  function renderTraffic() {
    const rows = S.traffic.map(e => {
      const d = e.d;
      const status = d.status === null || d.status === undefined ? "-" : String(d.status);
      const cls = "num st" + status.charAt(0);
      const p = d.prompt_tokens;
      const c = d.completion_tokens;
      const tokens = p == null && c == null ? "-" : fmtNum(c || 0) + (p != null ? " / " + fmtNum(p) : "");
      return h("tr", {testid: "traffic-row", "data-request-id": d.request_id || ""}, [
        h("td", {cls: "mono"}, clock(e.t)),
        h("td", {cls: "mono"}, d.model || d.path || "-"),
        h("td", {cls: "mono hide-s"}, d.node || "-"),
        h("td", {cls: cls, title: d.error || ""}, status),
        h("td", {cls: "num"}, fmtMs(d.latency_ms)),
        h("td", {cls: "num hide-s", title: "completion / prompt"}, tokens),
        h("td", {cls: "hide-s"}, d.cache || "-")
      ]);
    });
    const body = $("traffic-rows");
    body.replaceChildren(...rows);
    $("traffic-empty").hidden = rows.length > 0;
  }

  // discovery
  function splitList(text) {
    return text.split(",").map(s => s.trim()).filter(Boolean);
  }

  $("discover-form").addEventListener("submit", async ev => {
    ev.preventDefault();
    const subnets = splitList($("disc-subnets").value);
    const ports = splitList($("disc-ports").value).map(Number);
    if (ports.some(p => !Number.isInteger(p) || p < 1 || p > 65535)) {
      toast("Ports are whole numbers between 1 and 65535.", true);
      return;
    }
    const body = {};
    if (subnets.length) body.subnets = subnets;
    if (ports.length) body.ports = ports;
    $("disc-btn").disabled = true;
    $("disc-progress").hidden = false;
    $("disc-progress-text").textContent = "Scanning " + (subnets.join(", ") || "this machine") + "...";
    $("disc-empty").hidden = true;
    const r = await api("POST", CP + "/discover", body);
    $("disc-btn").disabled = false;
    $("disc-progress").hidden = true;
    if (!r.ok) { toast(r.error, true); return; }
    S.found = listOf(r);
    await loadNodes();
    renderFound();
  });

  function renderFound() {
    const rows = S.found.map(f => {
      const known = S.nodes.find(n => n.url === f.url);
      let action;
      if (known && known.trusted) {
        action = h("span", {cls: "badge b-ok", testid: "discover-approved"}, "approved");
      } else {
        action = h("button", {type: "button", cls: "primary", testid: "approve-btn",
          onclick: ev => { approve(f, known, ev.currentTarget); }}, "Approve");
      }
      const models = f.models || [];
      return h("tr", {testid: "discover-row", "data-url": f.url}, [
        h("td", null, [h("div", {cls: "mono", style: "white-space:nowrap", title: f.url}, f.url.replace("http://", "")),
          h("div", {cls: "small muted"}, [f.kind || "unknown", f.version ? " " + f.version : ""]),
          f.health && f.health !== "online" ? h("div", {cls: "small err"}, f.health) : null]),
        h("td", {title: models.join(", ")}, [String(models.length),
          models.length ? h("span", {cls: "small muted hide-s", style: "overflow-wrap:anywhere"},
            " (" + models.slice(0, 2).join(", ") + (models.length > 2 ? ", ..." : "") + ")") : null]),
        h("td", {cls: "num"}, action)
      ]);
    });
    const body = $("disc-rows");
    body.replaceChildren(...rows);
    $("disc-table").hidden = !rows.length;
    $("disc-empty").hidden = rows.length > 0;
  }

  async function approve(f, known, btn) {
    btn.disabled = true;
    const r = known ? await api("PATCH", CP + "/nodes/" + encodeURIComponent(known.id), {trusted: true})
      : await api("POST", CP + "/nodes", {url: f.url, trusted: true});
    if (r.ok) toast("Approved " + f.url);
    else { toast(r.error, true); btn.disabled = false; }
    await Promise.all([loadNodes(), loadModels(), loadStatus(), loadPlayModels()]);
  }

  // routes
  $("route-strategy").replaceChildren(...STRATEGIES.map(s => h("option", {value: s}, s.replace(/_/g, " "))));

  async function loadRoutes() {
    const r = await api("GET", CP + "/routes");
    if (!r.ok) return;
    const rows = listOf(r).map(rt => {
      const targets = (rt.targets || []).map(t => t.node ? t.model + "@" + t.node : t.model);
      const del = S.confirm === "route:" + rt.id ?
        h("button", {type: "button", cls: "danger solid", testid: "route-delete-confirm-btn",
          onclick: ev => { S.confirm = ""; deleteRoute(rt.id, ev.currentTarget); }}, "Delete?") :
        h("button", {type: "button", cls: "danger", testid: "route-delete-btn",
          onclick: () => { S.confirm = "route:" + rt.id; loadRoutes(); }}, "Delete");
      return h("tr", {testid: "route-row", "data-route-id": rt.id}, [
        h("td", {cls: "mono"}, rt.id),
        h("td", {cls: "mono", style: "overflow-wrap:anywhere"}, [targets.join(", "),
          rt.fallback ? h("div", {cls: "small muted"}, "fallback " + rt.fallback) : null]),
        h("td", null, String(rt.strategy || "auto").replace(/_/g, " ")),
        h("td", {cls: "num"}, del)
      ]);
    });
    const body = $("route-rows");
    body.replaceChildren(...rows);
    $("routes-empty").hidden = rows.length > 0;
    $("routes-table").hidden = !rows.length;
  }

  async function deleteRoute(id, btn) {
    btn.disabled = true;
    const r = await api("DELETE", CP + "/routes/" + encodeURIComponent(id));
    if (!r.ok) toast(r.error, true);
    await Promise.all([loadRoutes(), loadPlayModels()]);
  }

  // Model ids may themselves contain "@" (LM Studio quant variants), so only a known node id after the
  // last "@" makes a pin.
  function parseTarget(text) {
    const at = text.lastIndexOf("@");
    if (at > 0) {
      const node = text.slice(at + 1);
      if (S.nodes.some(n => n.id === node || n.name === node)) {
        return {model: text.slice(0, at), node: node};
      }
    }
    return {model: text};
  }

  $("route-form").addEventListener("submit", async ev => {
    ev.preventDefault();
    const body = {
      id: $("route-id").value.trim(),
      targets: splitList($("route-targets").value).map(parseTarget),
      strategy: $("route-strategy").value
    };
    const fallback = $("route-fallback").value.trim();
    if (fallback) body.fallback = fallback;
    const r = await api("POST", CP + "/routes", body);
    if (!r.ok) { toast(r.error, true); return; }
    $("route-form").reset();
    toast("Route " + body.id + " saved");
    await Promise.all([loadRoutes(), loadPlayModels()]);
  });

  // optional panels: keys, usage, cache, share (a 404 means this gateway has not got them)
  function optional(name, r) {
    if (r.status === 404) S.optional[name] = false;
    else if (r.ok) S.optional[name] = true;
    return S.optional[name] === true;
  }

  async function loadKeys() {
    if (S.optional.keys === false) return;
    const r = await api("GET", CP + "/keys");
    $("keys-panel").hidden = !optional("keys", r);
    if (!r.ok) return;
    const list = listOf(r).filter(k => !k.revoked && !k.revoked_at);
    S.keyNames = new Map(list.map(k => [k.id, k.name]));
    const rows = list.map(k => {
      const id = k.id || k.name;
      const revoke = S.confirm === "key:" + id ?
        h("button", {type: "button", cls: "danger solid", testid: "key-revoke-confirm-btn",
          onclick: ev => { S.confirm = ""; revokeKey(id, ev.currentTarget); }}, "Revoke now") :
        h("button", {type: "button", cls: "danger", testid: "key-revoke-btn",
          onclick: () => { S.confirm = "key:" + id; loadKeys(); }}, "Revoke");
      return h("tr", {testid: "key-row", "data-key-id": id}, [
        h("td", null, [h("div", null, k.name || id), k.prefix ? h("div", {cls: "small muted mono"}, k.prefix) : null]),
        h("td", null, k.realm || "-"),
        h("td", {cls: "small hide-s"}, fmtWhen(k.created_at !== undefined ? k.created_at : k.created)),
        h("td", {cls: "num"}, revoke)
      ]);
    });
    const body = $("key-rows");
    body.replaceChildren(...rows);
    $("keys-empty").hidden = rows.length > 0;
    $("keys-table").hidden = !rows.length;
  }

  async function revokeKey(id, btn) {
    btn.disabled = true;
    const r = await api("DELETE", CP + "/keys/" + encodeURIComponent(id));
    if (r.ok) toast("Key revoked");
    else toast(r.error, true);
    await loadKeys();
  }

  $("key-form").addEventListener("submit", async ev => {
    ev.preventDefault();
    const body = {name: $("key-name").value.trim()};
    const realm = $("key-realm").value.trim();
    if (realm) body.realm = realm;
    const r = await api("POST", CP + "/keys", body);
    if (!r.ok) { toast(r.error, true); return; }
    $("key-form").reset();
    $("new-key").textContent = (r.data && r.data.key) || "";
    $("new-key-box").hidden = !(r.data && r.data.key);
    await loadKeys();
  });
  $("hide-key").addEventListener("click", () => {
    $("new-key").textContent = "";
    $("new-key-box").hidden = true;
  });
  $("copy-key").addEventListener("click", () => { copy($("new-key")); });

  async function loadUsage() {
    if (S.optional.usage === false) return;
    const first = await api("GET", CP + "/usage?group_by=day");
    $("usage-panel").hidden = !optional("usage", first);
    if (!first.ok) return;
    S.usage.day = first.data;
    const more = await Promise.all(["key", "model"].map(g => api("GET", CP + "/usage?group_by=" + g)));
    if (more[0].ok) S.usage.key = more[0].data;
    if (more[1].ok) S.usage.model = more[1].data;
    renderUsage();
  }

  function renderUsage() {
    const data = S.usage[S.usageGroup];
    const rows = (data && Array.isArray(data.data) ? data.data : []).slice();
    if (S.usageGroup === "day") rows.sort((a, b) => String(a.group) < String(b.group) ? -1 : 1);
    else rows.sort((a, b) => (Number(b.requests) || 0) - (Number(a.requests) || 0));
    const shown = rows.slice(-30);
    const tok = r => (Number(r.prompt_tokens) || 0) + (Number(r.completion_tokens) || 0);
    const max = Math.max(1, ...shown.map(tok));
    const bars = shown.map(r => {
      const p = (Number(r.prompt_tokens) || 0) / max * 100;
      const c = (Number(r.completion_tokens) || 0) / max * 100;
      const raw = r.group === null || r.group === undefined || r.group === "" ? "" : String(r.group);
      // Usage is keyed by key id; people know their keys by name.
      const label = !raw ? (S.usageGroup === "key" ? "(no key)" : "(none)") :
        S.usageGroup === "key" && S.keyNames.has(raw) ? S.keyNames.get(raw) : raw;
      return h("div", {cls: "brow", testid: "usage-bar", "data-group": raw}, [
        h("span", {cls: "lbl mono", title: label}, label),
        h("div", {cls: "track2", role: "img", "aria-label": label + ": " + tok(r) + " tokens"}, [
          h("div", {cls: "c", style: "width:" + c.toFixed(2) + "%"}),
          h("div", {cls: "p", style: "width:" + p.toFixed(2) + "%"})
        ]),
        h("span", {cls: "small muted", style: "white-space:nowrap"}, fmtNum(r.requests) + " req · " + fmtNum(tok(r)) + " tok")
      ]);
    });
    const box = $("usage-bars");
    if (bars.length) box.replaceChildren(...bars);
    else box.replaceChildren(h("div", {cls: "empty"}, "No usage recorded yet."));
    $("usage-legend").hidden = !bars.length;
    const t = data && data.totals;
    $("usage-totals").textContent = t ? "Total " + fmtNum(t.requests) + " requests · " +
      fmtNum(t.prompt_tokens) + " prompt + " + fmtNum(t.completion_tokens) + " completion tokens" : "";
  }
  $("usage-seg").addEventListener("click", ev => {
    const b = ev.target.closest("button");
    if (!b) return;
    S.usageGroup = b.getAttribute("data-group");
    for (const x of $("usage-seg").querySelectorAll("button")) x.setAttribute("aria-pressed", String(x === b));
    renderUsage();
  });

  async function loadCache() {
    if (S.optional.cache === false) return;
    const r = await api("GET", CP + "/cache");
    $("cache-panel").hidden = !optional("cache", r);
    if (!r.ok || !r.data) return;
    const c = r.data;
    const lookups = (Number(c.hits) || 0) + (Number(c.misses) || 0);
    const cells = [
      ["Entries", fmtNum(c.entries)], ["Size", fmtBytes(c.bytes)],
      ["Hit rate", lookups ? fmtNum((Number(c.hits) || 0) * 100 / lookups, 1) + " %" : "-"],
      ["Hits", fmtNum(c.hits)], ["Misses", fmtNum(c.misses)], ["Coalesced", fmtNum(c.coalesced)],
      ["Calls saved", fmtNum(c.upstream_calls_saved)]
    ];
    const grid = $("cache-stats");
    grid.replaceChildren(...cells.map(x => h("div", null, [h("span", null, x[0]), h("b", null, x[1])])));
  }
  $("cache-clear").addEventListener("click", async ev => {
    const btn = ev.currentTarget;
    btn.disabled = true;
    const r = await api("DELETE", CP + "/cache");
    btn.disabled = false;
    if (r.ok) toast("Cache cleared");
    else toast(r.error, true);
    await loadCache();
  });

  async function loadShare() {
    if (S.optional.share === false) return;
    const r = await api("GET", CP + "/share");
    $("share-box").hidden = !optional("share", r);
    if (r.ok && r.data) { S.share = r.data.mode; renderShare(); }
  }

  function renderShare() {
    const mode = S.share || "local";
    const on = mode !== "off";
    const t = $("share-toggle");
    t.setAttribute("aria-checked", String(on));
    t.setAttribute("data-mode", mode);
    t.title = on ? "Stop sharing: new requests are refused at once" : "Resume sharing";
    $("share-label").textContent = on ? "Sharing" : "Sharing stopped";
    const sel = $("share-mode");
    sel.hidden = !on;
    if (on) sel.value = mode;
  }

  async function setShare(mode) {
    const t = $("share-toggle");
    t.disabled = true;
    const r = await api("PUT", CP + "/share", {mode: mode});
    t.disabled = false;
    if (!r.ok) { toast(r.error, true); return; }
    S.share = (r.data && r.data.mode) || mode;
    renderShare();
    toast(S.share === "off" ? "Sharing stopped" : "Sharing resumed (" + S.share + ")");
  }

  $("share-toggle").addEventListener("click", () => {
    if (S.share && S.share !== "off") {
      localStorage.setItem(PREV_SHARE_KEY, S.share);
      setShare("off");
    } else {
      setShare(localStorage.getItem(PREV_SHARE_KEY) || "local");
    }
  });
  $("share-mode").addEventListener("change", ev => { setShare(ev.target.value); });

  // misc
  // The clipboard API exists only in secure contexts; over plain http on a LAN, select the text instead.
  function copy(el) {
    const text = el.textContent;
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(() => { toast("Copied"); }, () => { toast("Copy failed", true); });
      return;
    }
    const range = document.createRange();
    range.selectNodeContents(el);
    const sel = window.getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
    toast("Selected: copy it with your usual shortcut.");
  }
  $("endpoint").textContent = location.origin + "/v1";
  $("copy-endpoint").addEventListener("click", () => { copy($("endpoint")); });

  let booted = false;
  async function boot() {
    const first = await api("GET", CP + "/status");
    if (first.status === 401) return;
    if (first.ok) S.status = first.data;
    startEvents();
    await Promise.all([loadNodes(), loadModels(), loadRoutes(), loadPlayModels(),
      loadKeys(), loadUsage(), loadCache(), loadShare()]);
    renderSummary();
    document.body.setAttribute("data-ready", "1");
    if (!booted) {
      booted = true;
      // A safety net for anything the event stream missed; the stream itself carries the live changes.
      setInterval(() => {
        if (S.locked || document.hidden) return;
        loadStatus(); loadNodes(); loadModels(); loadRoutes();
        if (S.optional.keys) loadKeys();
        if (S.optional.usage) loadUsage();
        if (S.optional.cache) loadCache();
        if (S.optional.share) loadShare();
      }, PERIOD_MS);
      setInterval(renderRates, 5000);
    }
  }
  boot();
})();
</script>
</body>
</html>
"""


# ── CLI: `vampire <command>`; exit 0 ok, 1 failure, 2 bad usage ───────────────────────────────────────────


class JsonLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        text = super().format(record)
        if fields:
            text += " " + " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        return text


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonLogFormatter() if fmt == "json" else TextLogFormatter("%(asctime)s %(levelname)s %(message)s")
    )
    root = logging.getLogger("vampire")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def load_settings(args: argparse.Namespace, **overrides: Any) -> Settings:
    return Settings.load(config_file=getattr(args, "config", None), **overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    settings = load_settings(
        args,
        host=args.host,
        port=args.port,
        nodes=args.node,
        demo=args.demo,
        log_format=args.log_format,
        allow_public_nodes=args.allow_public_nodes,
    )
    if (
        not is_loopback_host(settings.host)
        and not settings.admin_token
        and not args.insecure
        and not has_keys(settings)
    ):
        print(
            f"Refusing to listen on {settings.host} with neither an admin token (VAMPIRE_ADMIN_TOKEN) "
            "nor client keys (`vampire keys create`); pass --insecure to do it anyway.",
            file=sys.stderr,
        )
        return 1
    setup_logging(settings.log_level, settings.log_format)
    app = App(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        server_header=False,
        lifespan="on",
        timeout_graceful_shutdown=3,
    )
    server = gateway_server(config)
    announce = print_banner(settings, server, args.open)
    try:
        # uvicorn's own loop choice (uvloop where installed): asyncio.run alone would use the slower default.
        with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
            runner.run(serve_with_banner(server, announce))
    except KeyboardInterrupt:
        pass  # a second Ctrl-C (one-file builds forward SIGINT twice) ends the wait, not with a traceback
    return 0 if server.started or not server.should_exit else 1


def release_free_memory() -> None:
    """Hand memory freed during start-up back to the OS. `python vampire.py` compiles this whole file on
    every start and glibc keeps the compiler's freed heap (~16 MiB) mapped unless asked to trim it."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def gateway_server(config: Any) -> Any:
    """uvicorn's server, but a stop signal means a clean shutdown and exit 0: uvicorn would re-raise the
    signal once shut down (ending with status -15), and one-file builds deliver one Ctrl-C twice."""
    import uvicorn

    class GatewayServer(uvicorn.Server):
        first_signal_at = 0.0

        def handle_exit(self, sig: int, frame: Any) -> None:
            now = time.monotonic()
            if self.should_exit and now - self.first_signal_at > 1.0:
                self.force_exit = True  # a person pressing Ctrl-C again, not the bootloader's echo
            elif not self.should_exit:
                self.first_signal_at, self.should_exit = now, True

    return GatewayServer(config)


def is_loopback_host(host: str) -> bool:
    return host in ("localhost", "") or is_loopback(host)


def has_keys(settings: Settings) -> bool:
    if not settings.db_path.exists():
        return False
    store = Store(settings.db_path)
    try:
        return bool(store.key_rows())
    finally:
        store.close()


async def serve_with_banner(server: Any, announce: Callable[[], None]) -> None:
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    if server.started:
        tune_for_serving()
        announce()
    await task


def tune_for_serving() -> None:
    """Process-wide tuning for a gateway that owns its process (never done for apps inside tests)."""
    # Everything built at start-up lives as long as the process: keep the cyclic collector from walking it
    # again and again under load (full collections otherwise stall requests for milliseconds).
    gc.collect()
    gc.freeze()
    # Each request allocates a few hundred short-lived objects; collecting the young generation every
    # 700 allocations (the default) means a collection every other request.
    gc.set_threshold(20_000, 50, 100)
    release_free_memory()


def print_banner(settings: Settings, server: Any, open_browser: bool) -> Callable[[], None]:
    def announce() -> None:
        port = settings.port
        with contextlib.suppress(Exception):
            port = server.servers[0].sockets[0].getsockname()[1]
        base = local_url(settings, port)
        print(
            f"Vampire {__version__} is listening: OpenAI endpoint {base}/v1, dashboard {base}/ "
            "(Ctrl-C stops it)",
            flush=True,
        )
        if open_browser:
            import webbrowser

            webbrowser.open(base + "/")

    return announce


SERVE_FLAGS = ("host", "port", "node", "demo", "log_format", "allow_public_nodes", "insecure")


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 7777)")
    p.add_argument(
        "--node", action="append", default=[], metavar="URL[#TOKEN]", help="a node to use (repeatable)"
    )
    p.add_argument("--demo", action="store_true", help="also start two emulated LM Studio nodes")
    p.add_argument("--log-format", choices=["text", "json"])
    p.add_argument(
        "--insecure", action="store_true", help="allow a non-loopback bind without an admin token or keys"
    )
    p.add_argument("--allow-public-nodes", action="store_true", help="allow node URLs with public addresses")


def serve_argv(args: argparse.Namespace) -> list[str]:
    """The `serve` flags given to `up` or `service install`, as command-line words again."""
    argv: list[str] = ["--config", str(args.config)] if args.config else []
    for name in SERVE_FLAGS:
        value, flag = getattr(args, name, None), "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            argv += [word for item in value for word in (flag, item)]
        elif value not in (None, False):
            argv += [flag, str(value)]
    return argv


def local_url(settings: Settings, port: int | None = None) -> str:
    """Where this machine reaches the gateway: a bind-all address is reached through 127.0.0.1."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    return f"http://{host}:{port or settings.port}"


def cmd_up(args: argparse.Namespace) -> int:
    settings = load_settings(args, host=args.host, port=args.port)
    code, message = start_background(
        [*current_exe(), "serve", *serve_argv(args)],
        settings.data_dir,
        local_url(settings) + "/healthz",
        timeout=args.timeout,
    )
    print(message, file=sys.stderr if code else sys.stdout)
    return code


def cmd_down(args: argparse.Namespace) -> int:
    code, message = stop_background(load_settings(args).data_dir)
    print(message, file=sys.stderr if code else sys.stdout)
    return code


def cmd_service(args: argparse.Namespace) -> int:
    settings = load_settings(args, host=args.host, port=args.port)
    return run_service(
        args.action, args.dry_run, current_exe(), serve_argv(args), Path.home(), settings.data_dir
    )


def cmd_open(args: argparse.Namespace) -> int:
    """No arguments (a double-click): open the running gateway's dashboard, or start one and open it."""
    settings = load_settings(args)

    def start() -> None:
        cmd_serve(build_parser().parse_args(["serve"]))

    return open_or_start(local_url(settings) + "/", start)


def cmd_version(args: argparse.Namespace) -> int:
    print(f"vampire {__version__}")
    return 0


def cmd_mock_node(args: argparse.Namespace) -> int:
    try:
        models = parse_model_specs(args.models)
    except ValueError as exc:
        print(f"--models: {exc}", file=sys.stderr)
        return 2
    node = MockNode(
        models,
        flavor=args.flavor,
        version=args.lmstudio_version,
        token=args.token,
        load_delay=args.load_delay,
        tps=args.tps,
        close_after_response=args.close_after_response,
    )

    async def run() -> None:
        url = await node.start(args.host, args.port)
        print(
            f"mock {args.flavor} node {url} serving {', '.join(m.id for m in models)} (Ctrl-C stops it)",
            flush=True,
        )
        try:
            await asyncio.Event().wait()
        finally:
            await node.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


class GatewayClient:
    """The CLI's way to the running gateway's control plane."""

    def __init__(self, settings: Settings, url: str | None = None) -> None:
        import httpx

        self.base = url or local_url(settings)
        headers = {"Authorization": f"Bearer {settings.admin_token}"} if settings.admin_token else {}
        self.http = httpx.Client(base_url=self.base, headers=headers, timeout=60.0)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            resp = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise CLIError(
                f"cannot reach the gateway at {self.base} ({exc}); start it with `vampire serve`"
            ) from None
        body = (
            resp.json() if resp.headers.get("content-type", "").startswith("application/json") else resp.text
        )
        if resp.status_code >= 400:
            message = body.get("error", {}).get("message") if isinstance(body, dict) else body
            raise CLIError(f"{resp.status_code}: {message}")
        return body


class CLIError(Exception):
    """A command failed in a way the person can act on; printed without a traceback."""


def print_table(rows: list[list[Any]], header: list[str]) -> None:
    cells = [header, *[["" if c is None else str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def cmd_status(args: argparse.Namespace) -> int:
    status = GatewayClient(load_settings(args), args.url).call("GET", "/vampire/v1/status")
    for key, value in status.items():
        print(f"{key:13} {value}")
    return 0


def cmd_nodes(args: argparse.Namespace) -> int:
    client = GatewayClient(load_settings(args), args.url)
    action = args.action
    if action == "list":
        nodes = client.call("GET", "/vampire/v1/nodes")["data"]
        rows = [
            [
                n["id"],
                n["state"],
                "yes" if n["trusted"] else "no",
                f"{n['kind']} {n['version'] or ''}".strip(),
                ", ".join(m["id"] + ("*" if m["loaded"] else "") for m in n["models"]),
                n["url"],
            ]
            for n in nodes
        ]
        print_table(rows, ["ID", "STATE", "TRUSTED", "KIND", "MODELS (* loaded)", "URL"])
        return 0
    if action == "add":
        url, token = split_node_spec(args.target)
        node = client.call(
            "POST", "/vampire/v1/nodes", json={"url": url, "token": args.token or token, "name": args.name}
        )
        print(f"added {node['id']} ({node['state']})")
        return 0
    if action == "remove":
        client.call("DELETE", f"/vampire/v1/nodes/{args.target}")
        print(f"removed {args.target}")
        return 0
    if action == "probe":
        node = client.call("POST", f"/vampire/v1/nodes/{args.target}/probe")
        print(f"{node['id']}: {node['state']} {node['kind']} {node['version'] or ''}".rstrip())
        return 0
    patch = {
        "drain": {"state": "draining"},
        "undrain": {"state": "online"},
        "trust": {"trusted": True},
        "untrust": {"trusted": False},
        "disable": {"state": "disabled"},
        "enable": {"state": "online"},
    }[action]
    node = client.call("PATCH", f"/vampire/v1/nodes/{args.target}", json=patch)
    print(f"{node['id']}: {node['state']}, {'trusted' if node['trusted'] else 'untrusted'}")
    return 0


def cmd_routes(args: argparse.Namespace) -> int:
    client = GatewayClient(load_settings(args), args.url)
    if args.action == "list":
        routes = client.call("GET", "/vampire/v1/routes")["data"]
        print_table(
            [
                [r["id"], r["strategy"], ", ".join(_target_text(t) for t in r["targets"]), r["fallback"]]
                for r in routes
            ],
            ["ROUTE", "STRATEGY", "TARGETS (in order)", "FALLBACK"],
        )
        return 0
    if not args.id:
        raise CLIError(f"`routes {args.action}` needs a route ID")
    if args.action == "remove":
        client.call("DELETE", f"/vampire/v1/routes/{args.id}")
        print(f"removed route {args.id}")
        return 0
    if not args.target:
        raise CLIError("`routes add` needs at least one --target MODEL[@NODE]")
    targets = [dict(zip(("model", "node"), t.rsplit("@", 1), strict=False)) for t in args.target]
    body = {"id": args.id, "targets": targets, "strategy": args.strategy, "fallback": args.fallback}
    route = client.call("POST", "/vampire/v1/routes", json=body)
    print(f"route {route['id']}: {', '.join(_target_text(t) for t in route['targets'])}")
    return 0


def _target_text(target: dict[str, str]) -> str:
    return f"{target['model']}@{target['node']}" if target.get("node") else target["model"]


def cmd_keys(args: argparse.Namespace) -> int:
    client = GatewayClient(load_settings(args), args.url)
    if args.action == "list":
        keys = client.call("GET", "/vampire/v1/keys")["data"]
        print_table(
            [
                [
                    k["id"],
                    k["name"],
                    k["realm"],
                    ", ".join(k["models"]) or "all",
                    k["rpm"],
                    k["tpm"],
                    k["max_concurrent"],
                ]
                for k in keys
            ],
            ["ID", "NAME", "REALM", "MODELS", "RPM", "TPM", "CONCURRENT"],
        )
        return 0
    if not args.target:
        raise CLIError(f"`keys {args.action}` needs a {'name' if args.action == 'create' else 'key ID'}")
    if args.action == "revoke":
        client.call("DELETE", f"/vampire/v1/keys/{args.target}")
        print(f"revoked {args.target}")
        return 0
    body = {
        "name": args.target,
        "realm": args.realm,
        "models": args.model or [],
        "rpm": args.rpm,
        "tpm": args.tpm,
        "max_concurrent": args.max_concurrent,
    }
    key = client.call("POST", "/vampire/v1/keys", json=body)
    print(f"created key {key['id']} ({key['name']}, realm {key['realm']}). Its secret is shown only now:")
    print(key["key"])
    return 0


def cmd_share(args: argparse.Namespace) -> int:
    client = GatewayClient(load_settings(args), args.url)
    state = (
        client.call("PUT", "/vampire/v1/share", json={"mode": args.mode})
        if args.mode
        else client.call("GET", "/vampire/v1/share")
    )
    print(f"sharing: {state['mode']}")
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    params = {"group_by": args.group_by, **({"since": args.since} if args.since else {})}
    out = GatewayClient(load_settings(args), args.url).call("GET", "/vampire/v1/usage", params=params)
    rows = [[r["group"], r["requests"], r["prompt_tokens"], r["completion_tokens"]] for r in out["data"]]
    totals = out["totals"]
    print_table(
        [*rows, ["total", totals["requests"], totals["prompt_tokens"], totals["completion_tokens"]]],
        [args.group_by.upper(), "REQUESTS", "PROMPT TOKENS", "COMPLETION TOKENS"],
    )
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    client = GatewayClient(load_settings(args), args.url)
    stats = client.call("DELETE" if args.action == "clear" else "GET", "/vampire/v1/cache")
    for key, value in stats.items():
        print(f"{key:21} {value}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    rows = GatewayClient(load_settings(args), args.url).call("GET", "/vampire/v1/models")["data"]
    print_table(
        [
            [m["id"], m["node"], m["type"], "yes" if m["loaded"] else "no", m["context_length"], m["slots"]]
            for m in rows
        ],
        ["MODEL", "NODE", "TYPE", "LOADED", "CONTEXT", "SLOTS"],
    )
    return 0


def cmd_discover(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    subnets = args.subnet or ["127.0.0.0/24"]
    ports = args.port or list(DISCOVERY_PORTS)
    progress = ProgressBar(sys.stderr)

    async def run() -> list[Found]:
        async with aiohttp.ClientSession() as http:
            return await discover(
                http,
                subnets,
                ports,
                timeout=args.timeout,
                allow_public=args.allow_public,
                on_progress=progress.update,
            )

    started = time.perf_counter()
    try:
        found = asyncio.run(run())
    except NodeRefused as exc:
        print(f"discover: {exc}", file=sys.stderr)
        return 2
    progress.finish()
    print_table(
        [[f.url, f.kind, f.version, f.health, ", ".join(f.models)] for f in found],
        ["URL", "KIND", "VERSION", "STATE", "MODELS"],
    )
    print(f"{len(found)} node(s) found in {time.perf_counter() - started:.2f} s", file=sys.stderr)
    if args.add and found:
        client = GatewayClient(settings, args.url)
        for item in found:
            with contextlib.suppress(CLIError):
                client.call("POST", "/vampire/v1/nodes", json={"url": item.url, "trusted": False})
                print(f"added {item.url} as untrusted; `vampire nodes trust ID` lets it serve traffic")
    return 0


class ProgressBar:
    def __init__(self, stream: Any, width: int = 30) -> None:
        self.stream, self.width, self.shown = stream, width, False

    def update(self, done: int, total: int) -> None:
        filled = self.width * done // max(1, total)
        self.stream.write(f"\rscanning [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total}")
        self.stream.flush()
        self.shown = True

    def finish(self) -> None:
        if self.shown:
            self.stream.write("\n")


def cmd_chat(args: argparse.Namespace) -> int:
    import httpx

    settings = load_settings(args)
    base = args.url or local_url(settings)
    body = {"model": args.model, "stream": True, "messages": [{"role": "user", "content": args.prompt}]}
    with (
        httpx.Client(timeout=None) as http,
        http.stream("POST", f"{base}/v1/chat/completions", json=body) as resp,
    ):
        if resp.status_code != 200:
            resp.read()
            print(f"error {resp.status_code}: {resp.text}", file=sys.stderr)
            return 1
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    print(f"\nerror: {chunk['error'].get('message')}", file=sys.stderr)
                    return 1
                for choice in chunk.get("choices", []):
                    print(choice.get("delta", {}).get("content") or "", end="", flush=True)
    print()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vampire", description="One private OpenAI-compatible endpoint over shared LM Studio nodes."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(
        name: str, handler: Callable[[argparse.Namespace], int], help_text: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "--config", type=Path, help="settings file (default: vampire.toml in the user config dir)"
        )
        p.set_defaults(handler=handler)
        return p

    serve = command("serve", cmd_serve, "run the gateway in the foreground")
    add_serve_flags(serve)
    serve.add_argument("--open", action="store_true", help="open the dashboard in a browser once listening")

    up = command("up", cmd_up, "start the gateway in the background (idempotent); returns once it answers")
    add_serve_flags(up)
    up.add_argument("--timeout", type=float, default=20.0, help="seconds to wait for it to answer")
    command("down", cmd_down, "stop the background gateway started by `up` (idempotent)")

    service = command("service", cmd_service, "install or control the per-user background service")
    service.add_argument("action", choices=list(SERVICE_ACTIONS))
    service.add_argument(
        "--dry-run", action="store_true", help="print the files and commands, change nothing"
    )
    add_serve_flags(service)

    command("version", cmd_version, "print the version")

    mock = command(
        "mock-node", cmd_mock_node, "run a deterministic LM Studio emulator (for demos, CI and tests)"
    )
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=LMSTUDIO_PORT)
    mock.add_argument(
        "--models",
        default="qwen/qwen3-4b:llm:loaded,text-embedding-nomic-embed-text-v1.5:embedding",
        help="id[:type][:loaded],… (type llm|vlm|embedding)",
    )
    mock.add_argument("--flavor", choices=["lmstudio", "ollama", "openai"], default="lmstudio")
    mock.add_argument("--lmstudio-version", default="0.4.6", help="0.3.x or 0.4.x")
    mock.add_argument("--token", help="require this API token (LM Studio 0.4+)")
    mock.add_argument("--load-delay", type=float, default=0.0, help="seconds a JIT load takes")
    mock.add_argument("--tps", type=float, default=0.0, help="generated tokens per second (0 = unlimited)")
    mock.add_argument(
        "--close-after-response", action="store_true", help="drop keep-alive connections like llama-server"
    )

    for name, handler, text in (
        ("status", cmd_status, "show the running gateway's status"),
        ("models", cmd_models, "list models and where they are placed"),
    ):
        p = command(name, handler, text)
        p.add_argument("--url", help="gateway URL (default from settings)")

    nodes = command("nodes", cmd_nodes, "list and manage nodes")
    nodes.add_argument(
        "action",
        choices=[
            "list",
            "add",
            "remove",
            "drain",
            "undrain",
            "trust",
            "untrust",
            "disable",
            "enable",
            "probe",
        ],
    )
    nodes.add_argument("target", nargs="?", help="node URL (add) or node ID")
    nodes.add_argument("--token", help="the node owner's API token (add)")
    nodes.add_argument("--name", help="a friendly name (add)")
    nodes.add_argument("--url", help="gateway URL (default from settings)")

    routes = command("routes", cmd_routes, "list, add or remove named virtual models")
    routes.add_argument("action", choices=["list", "add", "remove"])
    routes.add_argument("id", nargs="?", help="the route's name (what clients pass as `model`)")
    routes.add_argument("--target", action="append", help="MODEL[@NODE], in order of preference (repeatable)")
    routes.add_argument("--strategy", default="auto", choices=STRATEGIES)
    routes.add_argument("--fallback", help="model to use when no target is available")
    routes.add_argument("--url", help="gateway URL (default from settings)")

    keys = command("keys", cmd_keys, "create, list or revoke client keys")
    keys.add_argument("action", choices=["create", "list", "revoke"])
    keys.add_argument("target", nargs="?", help="a name (create) or key ID (revoke)")
    keys.add_argument("--realm", default=DEFAULT_REALM)
    keys.add_argument("--model", action="append", help="a model this key may use (repeatable; default all)")
    keys.add_argument("--rpm", type=int, help="requests per minute")
    keys.add_argument("--tpm", type=int, help="tokens per minute")
    keys.add_argument("--max-concurrent", type=int, help="concurrent requests")
    keys.add_argument("--url", help="gateway URL (default from settings)")

    share = command("share", cmd_share, "show or set who may call without a key: off, local, lan or keys")
    share.add_argument("mode", nargs="?", choices=list(SHARE_MODES))
    share.add_argument("--url", help="gateway URL (default from settings)")

    usage = command("usage", cmd_usage, "usage totals from the ledger")
    usage.add_argument("--group-by", default="model", choices=["key", "model", "node", "realm", "day"])
    usage.add_argument("--since", help="ISO date or time")
    usage.add_argument("--url", help="gateway URL (default from settings)")

    cache = command("cache", cmd_cache, "show or clear the result cache")
    cache.add_argument("action", choices=["stats", "clear"])
    cache.add_argument("--url", help="gateway URL (default from settings)")

    disc = command("discover", cmd_discover, "scan private networks for LM Studio / Ollama nodes")
    disc.add_argument("--subnet", action="append", help="CIDR to scan (repeatable; default 127.0.0.0/24)")
    disc.add_argument(
        "--port", action="append", type=int, help="port to probe (repeatable; default 1234 and 11434)"
    )
    disc.add_argument("--timeout", type=float, default=0.5, help="per-probe timeout in seconds")
    disc.add_argument("--add", action="store_true", help="add what is found as untrusted nodes")
    disc.add_argument("--allow-public", action="store_true", help="allow scanning public ranges")
    disc.add_argument("--url", help="gateway URL for --add (default from settings)")

    chat = command("chat", cmd_chat, "ask a model and stream the answer")
    chat.add_argument("prompt")
    chat.add_argument("--model", default=AUTO_MODEL)
    chat.add_argument("--url", help="gateway URL (default from settings)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args.handler, args.config = cmd_open, None
    try:
        return int(args.handler(args))
    except (CLIError, ConfigError, NodeRefused) as exc:
        print(f"vampire {args.command}: {exc}", file=sys.stderr)
        return 1


# ── service: per-user background service, `vampire up`/`down`, the double-click path ──────────────────────


# Running Vampire in the background without root.
#
# Three ways, from most to least managed:
#
# * `vampire service install|uninstall|start|stop|status`: a per-user service of the platform's own manager
#   (systemd `--user` on Linux, a launchd LaunchAgent on macOS, a Scheduled Task on Windows with an HKCU
#   Run entry as the fallback). `service_plan` computes what would be written and run; `run_service`
#   carries it out or, with `dry_run`, only prints it.
# * `vampire up` / `vampire down`: an unmanaged detached process with a pidfile, for containers and CI
#   where no user service manager runs (`start_background`, `stop_background`).
# * no arguments (a double-click): open the dashboard of the running gateway, or start one in the
#   foreground and open it (`open_or_start`).
#
# The product is one file that may be frozen, so the service templates live here as string constants;
# `installers/render.py` writes them out for reference and a test keeps the two identical.


SERVICE_ACTIONS = ("install", "uninstall", "start", "stop", "status")

SERVICE_SYSTEMS = ("linux", "darwin", "windows")

SYSTEMD_UNIT_NAME = "vampire.service"

LAUNCHD_LABEL = "dev.vampire.gateway"

WINDOWS_TASK_NAME = "Vampire"

WINDOWS_RUN_KEY = r"HKCU\Software\Microsoft\Windows\CurrentVersion\Run"

PIDFILE_NAME = "vampire.pid"

LOGFILE_NAME = "vampire.log"


# Placeholders are @NAME@ so that neither systemd's `%`/`$` syntax nor XML needs escaping in the templates.
SYSTEMD_UNIT_TEMPLATE = """\
[Unit]
Description=Vampire gateway: one OpenAI-compatible endpoint for the LM Studio servers shared with you

[Service]
Type=simple
ExecStart=@EXEC_START@
Environment=@ENV_DATA_DIR@
Environment=PYTHONUNBUFFERED=1
Restart=on-failure
RestartSec=2
TimeoutStopSec=10
StandardOutput=journal
StandardError=journal
SyslogIdentifier=vampire

[Install]
WantedBy=default.target
"""


# Task Scheduler schema 1.2 (Windows Vista and later). The logon trigger names the user: an unscoped
# logon trigger ("any user") can only be registered with admin rights. ExecutionTimeLimit PT0S lifts the
# default 72-hour limit after which Task Scheduler would end a long-running gateway.
WINDOWS_TASK_TEMPLATE = """\
<?xml version="1.0" encoding="UTF-16"?>
<Task version="1.2" xmlns="http://schemas.microsoft.com/windows/2004/02/mit/task">
  <RegistrationInfo>
    <Description>Vampire gateway: one OpenAI-compatible endpoint for shared LM Studio servers</Description>
    <URI>\\Vampire</URI>
  </RegistrationInfo>
  <Triggers>
    <LogonTrigger>
      <Enabled>true</Enabled>
      <UserId>@USER_ID@</UserId>
    </LogonTrigger>
  </Triggers>
  <Principals>
    <Principal id="Author">
      <UserId>@USER_ID@</UserId>
      <LogonType>InteractiveToken</LogonType>
      <RunLevel>LeastPrivilege</RunLevel>
    </Principal>
  </Principals>
  <Settings>
    <MultipleInstancesPolicy>IgnoreNew</MultipleInstancesPolicy>
    <DisallowStartIfOnBatteries>false</DisallowStartIfOnBatteries>
    <StopIfGoingOnBatteries>false</StopIfGoingOnBatteries>
    <AllowHardTerminate>true</AllowHardTerminate>
    <StartWhenAvailable>true</StartWhenAvailable>
    <RunOnlyIfNetworkAvailable>false</RunOnlyIfNetworkAvailable>
    <IdleSettings>
      <StopOnIdleEnd>false</StopOnIdleEnd>
      <RestartOnIdle>false</RestartOnIdle>
    </IdleSettings>
    <AllowStartOnDemand>true</AllowStartOnDemand>
    <Enabled>true</Enabled>
    <Hidden>false</Hidden>
    <RunOnlyIfIdle>false</RunOnlyIfIdle>
    <WakeToRun>false</WakeToRun>
    <ExecutionTimeLimit>PT0S</ExecutionTimeLimit>
    <Priority>5</Priority>
    <RestartOnFailure>
      <Interval>PT1M</Interval>
      <Count>999</Count>
    </RestartOnFailure>
  </Settings>
  <Actions Context="Author">
    <Exec>
      <Command>@COMMAND@</Command>
      <Arguments>@ARGUMENTS@</Arguments>
      <WorkingDirectory>@WORKING_DIRECTORY@</WorkingDirectory>
    </Exec>
  </Actions>
</Task>
"""


@dataclass
class ServicePlan:
    """What a service action writes and runs, in order: dirs, files, commands, remove, cleanup.

    `optional` holds indexes into `commands` whose failure is expected and harmless (unloading a
    service that is not loaded). `retry_s` is how long a failing required command is retried: launchd
    finishes a `bootout` asynchronously, so the `bootstrap` right after it can fail for a moment.
    `fallback` runs instead when the first command fails (Windows: when Task Scheduler refuses the
    task, an HKCU Run entry and `vampire up`). `cleanup` runs after `remove`, its failures ignored.
    """

    files: dict[Path, str]
    commands: list[list[str]]
    notes: list[str]
    dirs: list[Path] = field(default_factory=list)
    remove: list[Path] = field(default_factory=list)
    cleanup: list[list[str]] = field(default_factory=list)
    optional: frozenset[int] = frozenset()
    retry_s: float = 0.0
    fallback: list[list[str]] = field(default_factory=list)


def current_system() -> str:
    """The `system` value for this machine: linux, darwin or windows (other platforms: their name)."""
    if sys.platform.startswith("linux"):
        return "linux"
    if sys.platform == "win32":
        return "windows"
    return sys.platform


def current_exe() -> list[str]:
    """The command that runs this Vampire again, stable enough to be written into a service definition."""
    if getattr(sys, "frozen", False):
        return [sys.executable]
    if "__compiled__" in globals():
        # Nuitka: sys.executable may be the unpacked interpreter in a temp dir; argv[0] is the binary.
        return [str(Path(sys.argv[0]).resolve())]
    script = Path(sys.argv[0])
    if script.suffix == ".py":
        return [sys.executable, str(script.resolve())]
    if sys.platform == "win32":
        # A pip console script on Windows has no windowless twin; pythonw.exe -m vampire gives one.
        return [sys.executable, "-m", "vampire"]
    found = shutil.which(sys.argv[0])
    return [str(Path(found).absolute())] if found else [sys.executable, "-m", "vampire"]


def render_templates() -> dict[str, str]:
    """The templates as files for `installers/`: name -> content (placeholders left in)."""
    plist = _launchd_plist(["@EXE@", "serve", "@SERVE_ARGS@"], "@LOG_DIR@", "@DATA_DIR@")
    return {
        "vampire.service.in": SYSTEMD_UNIT_TEMPLATE,
        f"{LAUNCHD_LABEL}.plist.in": plist,
        "vampire-task.xml.in": WINDOWS_TASK_TEMPLATE,
    }


def service_plan(
    action: str, system: str, exe: list[str], serve_args: list[str], home: Path, data_dir: Path
) -> ServicePlan:
    """Compute, without side effects, what `vampire service <action>` does on `system`."""
    if action not in SERVICE_ACTIONS:
        raise ValueError(f"unknown service action {action!r}; expected one of {', '.join(SERVICE_ACTIONS)}")
    if not exe:
        raise ValueError("exe must name the command that runs vampire")
    if system == "linux":
        return _systemd_plan(action, exe, serve_args, home, data_dir)
    if system == "darwin":
        return _launchd_plan(action, exe, serve_args, home, data_dir)
    if system == "windows":
        return _windows_plan(action, exe, serve_args, data_dir)
    raise ValueError(f"unsupported system {system!r}; expected one of {', '.join(SERVICE_SYSTEMS)}")


def _fill(template: str, values: dict[str, str]) -> str:
    # One pass, so a value that happens to contain @X@ is never substituted again.
    return re.sub(r"@([A-Z_]+)@", lambda m: values[m.group(1)], template)


def _systemd_quote(arg: str, *, exec_line: bool) -> str:
    value = arg.replace("%", "%%")
    if exec_line:
        value = value.replace("$", "$$")
    if value and not re.search(r"[\s\"'\\;]", value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _systemd_unit(exe: list[str], serve_args: list[str], data_dir: Path) -> str:
    exec_start = " ".join(_systemd_quote(a, exec_line=True) for a in [*exe, "serve", *serve_args])
    env = _systemd_quote(f"VAMPIRE_DATA_DIR={data_dir}", exec_line=False)
    return _fill(SYSTEMD_UNIT_TEMPLATE, {"EXEC_START": exec_start, "ENV_DATA_DIR": env})


def _systemd_plan(
    action: str, exe: list[str], serve_args: list[str], home: Path, data_dir: Path
) -> ServicePlan:
    unit_path = home / ".config" / "systemd" / "user" / SYSTEMD_UNIT_NAME
    ctl = ["systemctl", "--user"]
    logs = f"logs: journalctl --user -u {SYSTEMD_UNIT_NAME} -f"
    if action == "install":
        return ServicePlan(
            files={unit_path: _systemd_unit(exe, serve_args, data_dir)},
            # restart rather than `enable --now`: on a re-install (an upgrade) the running old binary
            # must be replaced, and restart starts the unit when it is not running.
            commands=[
                [*ctl, "daemon-reload"],
                [*ctl, "enable", SYSTEMD_UNIT_NAME],
                [*ctl, "restart", SYSTEMD_UNIT_NAME],
            ],
            notes=[
                "To keep Vampire running when you are not logged in (and start it at boot), run once: "
                "loginctl enable-linger $USER",
                logs,
            ],
        )
    if action == "uninstall":
        return ServicePlan(
            files={},
            commands=[[*ctl, "disable", "--now", SYSTEMD_UNIT_NAME]],
            notes=[],
            remove=[unit_path],
            cleanup=[[*ctl, "daemon-reload"]],
            optional=frozenset({0}),
        )
    if action == "status":
        return ServicePlan(
            files={}, commands=[[*ctl, "status", "--no-pager", SYSTEMD_UNIT_NAME]], notes=[logs]
        )
    return ServicePlan(files={}, commands=[[*ctl, action, SYSTEMD_UNIT_NAME]], notes=[])


def _launchd_plist(program_arguments: list[str], log_dir: str, data_dir: str) -> str:
    log = f"{log_dir}/vampire.log"
    spec = {
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": program_arguments,
        "RunAtLoad": True,
        "KeepAlive": True,
        "EnvironmentVariables": {"VAMPIRE_DATA_DIR": data_dir, "PYTHONUNBUFFERED": "1"},
        "StandardOutPath": log,
        "StandardErrorPath": log,
    }
    import plistlib  # service-only modules load when used: the gateway's memory stays small

    return plistlib.dumps(spec, fmt=plistlib.FMT_XML, sort_keys=False).decode("utf-8")


def _launchd_plan(
    action: str, exe: list[str], serve_args: list[str], home: Path, data_dir: Path
) -> ServicePlan:
    plist_path = home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
    log_dir = home / "Library" / "Logs" / "vampire"
    uid = getattr(os, "getuid", lambda: 501)()
    domain = f"gui/{uid}"
    target = f"{domain}/{LAUNCHD_LABEL}"
    bootout = ["launchctl", "bootout", target]
    bootstrap = ["launchctl", "bootstrap", domain, str(plist_path)]
    if action == "install":
        plist = _launchd_plist([*exe, "serve", *serve_args], str(log_dir), str(data_dir))
        return ServicePlan(
            files={plist_path: plist},
            # Unload a previous version first so a re-install (an upgrade) runs the new definition;
            # enable clears a `launchctl disable` that would make bootstrap fail.
            commands=[bootout, ["launchctl", "enable", target], bootstrap],
            notes=[f"logs: {log_dir / 'vampire.log'}"],
            dirs=[log_dir],
            optional=frozenset({0}),
            retry_s=5.0,
        )
    if action == "uninstall":
        return ServicePlan(
            files={}, commands=[bootout], notes=[], remove=[plist_path], optional=frozenset({0})
        )
    if action == "start":
        # bootstrap fails when the agent is already loaded; kickstart then starts it if it is not running.
        return ServicePlan(
            files={},
            commands=[bootstrap, ["launchctl", "kickstart", target]],
            notes=[],
            optional=frozenset({0}),
        )
    if action == "stop":
        # KeepAlive would restart a killed agent, so stopping means unloading it until the next login.
        return ServicePlan(
            files={},
            commands=[bootout],
            notes=["It starts again at your next login; `vampire service start` starts it now."],
            optional=frozenset({0}),
        )
    return ServicePlan(
        files={}, commands=[["launchctl", "print", target]], notes=[f"logs: {log_dir / 'vampire.log'}"]
    )


def _windowless(exe: list[str]) -> list[str]:
    # The task must not open a console window at every logon: use the GUI-subsystem twin.
    first = PureWindowsPath(exe[0])
    twins = {"python.exe": "pythonw.exe", "vampire.exe": "vampirew.exe"}
    twin = twins.get(first.name.lower())
    return [str(first.with_name(twin)), *exe[1:]] if twin else list(exe)


def _windows_user_id() -> str:
    import getpass

    user = os.environ.get("USERNAME") or getpass.getuser()
    domain = os.environ.get("USERDOMAIN")
    return f"{domain}\\{user}" if domain else user


def _windows_task_xml(command: list[str], data_dir: Path) -> str:
    values = {
        "USER_ID": _windows_user_id(),
        "COMMAND": command[0],
        "ARGUMENTS": subprocess.list2cmdline(command[1:]),
        "WORKING_DIRECTORY": str(data_dir),
    }
    from xml.sax.saxutils import escape as xml_escape

    return _fill(WINDOWS_TASK_TEMPLATE, {k: xml_escape(v) for k, v in values.items()})


def _windows_plan(action: str, exe: list[str], serve_args: list[str], data_dir: Path) -> ServicePlan:
    xml_path = data_dir / "vampire-task.xml"
    tn = ["/TN", WINDOWS_TASK_NAME]
    run_entry = ["reg", "add", WINDOWS_RUN_KEY, "/v", WINDOWS_TASK_NAME, "/t", "REG_SZ"]
    background = [*_windowless(exe), "serve", *serve_args]
    if action == "install":
        return ServicePlan(
            files={xml_path: _windows_task_xml(background, data_dir)},
            commands=[["schtasks", "/Create", *tn, "/XML", str(xml_path), "/F"], ["schtasks", "/Run", *tn]],
            notes=[f"The task runs {subprocess.list2cmdline(background)} at every logon of this user."],
            dirs=[data_dir],
            # Some managed machines forbid per-user tasks; a Run entry starts Vampire at the next logon
            # and `vampire up` starts it now.
            fallback=[
                [*run_entry, "/d", subprocess.list2cmdline(background), "/f"],
                [*exe, "up", *serve_args],
            ],
        )
    if action == "uninstall":
        return ServicePlan(
            files={},
            commands=[
                ["schtasks", "/End", *tn],
                ["schtasks", "/Delete", *tn, "/F"],
                ["reg", "delete", WINDOWS_RUN_KEY, "/v", WINDOWS_TASK_NAME, "/f"],
                [*exe, "down"],
            ],
            notes=[],
            remove=[xml_path],
            optional=frozenset({0, 1, 2, 3}),
        )
    if action == "start":
        return ServicePlan(files={}, commands=[["schtasks", "/Run", *tn]], notes=[])
    if action == "stop":
        return ServicePlan(files={}, commands=[["schtasks", "/End", *tn]], notes=[])
    return ServicePlan(files={}, commands=[["schtasks", "/Query", *tn, "/V", "/FO", "LIST"]], notes=[])


def _show(cmd: list[str], system: str) -> str:
    return subprocess.list2cmdline(cmd) if system == "windows" else shlex.join(cmd)


def _file_encoding(content: str) -> str:
    # schtasks /XML reads the task file as UTF-16, the encoding Task Scheduler itself exports.
    return "utf-16" if content.startswith('<?xml version="1.0" encoding="UTF-16"?>') else "utf-8"


def _write_atomic(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(content, encoding=_file_encoding(content))
    os.replace(tmp, path)


def _run(cmd: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return subprocess.CompletedProcess(cmd, 127, "", f"{cmd[0]}: command not found")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 124, "", f"{cmd[0]}: no answer within {timeout:.0f}s")


def _manager_problem(system: str) -> str | None:
    """Why the per-user service manager cannot be used here, or None when it can."""
    if system == "linux":
        if shutil.which("systemctl") is None:
            return "systemctl was not found: this system does not run systemd"
        probe = _run(["systemctl", "--user", "show-environment"], timeout=15)
        if probe.returncode != 0:
            reason = (probe.stderr or probe.stdout).strip().splitlines()
            return "the systemd user service manager is not running here" + (
                f" ({reason[0]})" if reason else ""
            )
    elif system == "darwin":
        if shutil.which("launchctl") is None:
            return "launchctl was not found"
        uid = getattr(os, "getuid", lambda: 501)()
        if _run(["launchctl", "print", f"gui/{uid}"], timeout=15).returncode != 0:
            return f"there is no GUI login session for this user (launchd domain gui/{uid})"
    elif system == "windows" and shutil.which("schtasks") is None:
        return "schtasks was not found"
    return None


def _print_plan(plan: ServicePlan, system: str, out: Callable[[str], object]) -> None:
    out("# dry run: nothing is written, removed or run")
    for d in plan.dirs:
        out(f"would create directory: {d}")
    for path, content in plan.files.items():
        out(f"would write {path} ({_file_encoding(content)}):")
        out(content.rstrip("\n"))
        out(f"--- end of {path.name} ---")
    for i, cmd in enumerate(plan.commands):
        out(f"would run{' (failure ignored)' if i in plan.optional else ''}: {_show(cmd, system)}")
    for cmd in plan.fallback:
        out(f"if that fails, would run instead: {_show(cmd, system)}")
    for path in plan.remove:
        out(f"would remove: {path}")
    for cmd in plan.cleanup:
        out(f"then would run (failure ignored): {_show(cmd, system)}")
    for note in plan.notes:
        out(f"note: {note}")


def _run_required(cmd: list[str], retry_s: float) -> subprocess.CompletedProcess[str]:
    deadline = time.monotonic() + retry_s
    while True:
        result = _run(cmd)
        if result.returncode == 0 or time.monotonic() >= deadline:
            return result
        time.sleep(0.25)


def _failure_text(result: subprocess.CompletedProcess[str], system: str) -> str:
    detail = (result.stderr or result.stdout).strip()
    return f"`{_show(list(result.args), system)}` failed (exit {result.returncode})" + (
        f": {detail}" if detail else ""
    )


def run_service(
    action: str,
    dry_run: bool,
    exe: list[str],
    serve_args: list[str],
    home: Path,
    data_dir: Path,
    system: str | None = None,
    out: Callable[[str], object] = print,
) -> int:
    """Carry out `vampire service <action>`; with dry_run only print it. Returns 0 ok, 1 failure, 2 bad
    usage."""
    system = system or current_system()
    try:
        plan = service_plan(action, system, exe, serve_args, home, data_dir)
    except ValueError as exc:
        out(f"error: {exc}")
        return 2
    if dry_run:
        _print_plan(plan, system, out)
        return 0
    if action != "uninstall":
        problem = _manager_problem(system)
        if problem and not (system == "windows" and plan.fallback):
            out(f"error: cannot {action} the Vampire service: {problem}. Nothing was changed.")
            out(
                "Run the gateway in the background with `vampire up` (stop it with `vampire down`), "
                "or in the foreground with `vampire serve`."
            )
            return 1
    for d in plan.dirs:
        d.mkdir(parents=True, exist_ok=True)
    for path, content in plan.files.items():
        _write_atomic(path, content)
        out(f"wrote {path}")
    failed: subprocess.CompletedProcess[str] | None = None
    failed_at = -1
    for i, cmd in enumerate(plan.commands):
        out(f"$ {_show(cmd, system)}")
        result = _run(cmd) if i in plan.optional else _run_required(cmd, plan.retry_s)
        if action == "status" and result.stdout.strip():
            out(result.stdout.rstrip())
        if result.returncode == 0:
            continue
        if i in plan.optional:
            out(f"  (ignored: exit {result.returncode})")
            continue
        failed, failed_at = result, i
        break
    fell_back = failed is not None and failed_at == 0 and bool(plan.fallback)
    if fell_back and failed is not None:
        out(f"{_failure_text(failed, system)}; falling back")
        failed = None
        for cmd in plan.fallback:
            out(f"$ {_show(cmd, system)}")
            result = _run(cmd)
            if result.stdout.strip():
                out(result.stdout.rstrip())
            if result.returncode != 0:
                failed = result
                break
    for path in plan.remove:
        if path.exists():
            path.unlink()
            out(f"removed {path}")
    for cmd in plan.cleanup:
        out(f"$ {_show(cmd, system)}")
        _run(cmd)
    if failed is not None:
        if action == "status":
            out("The Vampire service is not running (or not installed).")
        else:
            out(f"error: {_failure_text(failed, system)}")
        return 1
    if fell_back:
        out("Vampire starts from the HKCU Run entry at your next logon instead of a scheduled task.")
    else:
        for note in plan.notes:
            out(note)
    done = {"install": "installed and started", "uninstall": "removed", "start": "started", "stop": "stopped"}
    if action in done:
        out(f"Vampire service {done[action]}.")
    return 0


# -- background process: `vampire up` / `vampire down` -----------------------------------------------------


def _healthy(url: str, timeout: float = 1.0) -> bool:
    # No proxies: an HTTP(S)_PROXY in the environment must not capture a loopback health check.
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            if resp.status != 200:
                return False
            body = json.loads(resp.read(4096) or b"{}")
    except (OSError, ValueError, urllib.error.URLError):
        return False
    return isinstance(body, dict) and body.get("status") == "ok"


def _base_url(health_url: str) -> str:
    parts = urllib.parse.urlsplit(health_url)
    return f"{parts.scheme}://{parts.netloc}/"


def _read_pidfile(pidfile: Path) -> tuple[int, list[str]] | None:
    try:
        lines = pidfile.read_text(encoding="utf-8").splitlines()
        pid = int(lines[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid, (shlex.split(lines[1]) if len(lines) > 1 else [])


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if sys.platform == "win32":
        return _alive_windows(pid)
    with contextlib.suppress(ChildProcessError, OSError):
        # Our own child (a test, or `up` that failed) lingers as a zombie until reaped.
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError, IndexError):
        if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _alive_windows(pid: int) -> bool:
    import ctypes

    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return kernel32.GetLastError() == 5  # access denied: it exists, it is someone else's
    try:
        code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True
        return code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def _is_ours(pid: int, argv: list[str]) -> bool:
    """Whether `pid` is still the process the pidfile recorded, not a recycled pid (checked where /proc
    is)."""
    if not _alive(pid):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not argv or not cmdline.exists():
        return True
    try:
        return cmdline.read_bytes().split(b"\0")[:-1] == [a.encode() for a in argv]
    except OSError:
        return True


def _log_tail(log: Path, start: int, lines: int = 15) -> str:
    try:
        with log.open("rb") as fh:
            fh.seek(start)
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def _signal_tree(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        # `up` starts the process as a session leader, so its group also holds what it spawned
        # (a one-file bootloader's unpacked child).
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _terminate(pid: int, timeout: float) -> bool:
    if sys.platform == "win32":
        # No SIGTERM on Windows; taskkill /T also ends a one-file bootloader's child.
        _run(["taskkill", "/PID", str(pid), "/T", "/F"], timeout=timeout)
        return _wait_gone(pid, timeout)
    # SIGTERM to the process alone: a one-file bootloader forwards it to its child, and a second
    # signal to the child would make uvicorn skip its graceful shutdown.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGTERM)
    if _wait_gone(pid, timeout):
        return True
    _signal_tree(pid, signal.SIGKILL)
    return _wait_gone(pid, 5.0)


def _spawn_detached(argv: list[str], log: Path) -> tuple[int, Callable[[], int | None]]:
    """Start argv in its own session, output to `log`; return its pid and a poll for its exit code."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if sys.platform == "win32":
        flags = (
            subprocess.DETACHED_PROCESS | subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
        )
        with log.open("ab") as fh:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                creationflags=flags,
            )
        return proc.pid, proc.poll
    # posix_spawn rather than Popen: the process is meant to outlive us, and an abandoned Popen object
    # complains that its child is still running.
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        pid = os.posix_spawnp(
            argv[0],
            argv,
            env,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, fd, 1),
                (os.POSIX_SPAWN_DUP2, fd, 2),
            ],
            setsid=True,
        )
    finally:
        os.close(fd)

    def poll() -> int | None:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return -1
        return os.waitstatus_to_exitcode(status) if done == pid else None

    return pid, poll


def start_background(
    argv: list[str], data_dir: Path, health_url: str, timeout: float = 20.0
) -> tuple[int, str]:
    """`vampire up`: start `argv` detached unless a gateway already runs; return when it answers
    health_url."""
    data_dir.mkdir(parents=True, exist_ok=True)
    pidfile = data_dir / PIDFILE_NAME
    log = data_dir / LOGFILE_NAME
    base = _base_url(health_url)
    recorded = _read_pidfile(pidfile)
    if recorded and not _is_ours(*recorded):
        pidfile.unlink(missing_ok=True)
        recorded = None
    if _healthy(health_url):
        who = f" (pid {recorded[0]})" if recorded else ""
        return 0, f"Vampire is already running at {base}{who}"
    if recorded:
        return (
            0,
            f"Vampire is already running as pid {recorded[0]} but {health_url} does not answer yet; "
            f"see {log}",
        )
    with log.open("ab") as fh:
        start = fh.seek(0, os.SEEK_END)
        fh.write(f"--- vampire up {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(argv)}\n".encode())
    try:
        pid, poll = _spawn_detached(argv, log)
    except OSError as exc:
        return 1, f"could not start {shlex.join(argv)}: {exc}"
    tmp = pidfile.with_name(f".{PIDFILE_NAME}.tmp")
    tmp.write_text(f"{pid}\n{shlex.join(argv)}\n", encoding="utf-8")
    os.replace(tmp, pidfile)
    deadline = time.monotonic() + timeout
    reason = f"{health_url} did not answer within {timeout:g}s"
    while time.monotonic() < deadline:
        if _healthy(health_url):
            return (
                0,
                f"Vampire is listening on {base} (pid {pid}; log {log}; stop it with `vampire down`)",
            )
        code = poll()
        if code is not None:
            reason = f"the process exited with code {code} before answering"
            break
        time.sleep(0.05)
    if poll() is None:
        _terminate(pid, 5.0)
    pidfile.unlink(missing_ok=True)
    tail = _log_tail(log, start)
    return 1, f"Vampire did not start: {reason}." + (f"\nlast lines of {log}:\n{tail}" if tail else "")


def stop_background(data_dir: Path, timeout: float = 10.0) -> tuple[int, str]:
    """`vampire down`: stop the process `vampire up` started; "not running" is success."""
    pidfile = data_dir / PIDFILE_NAME
    recorded = _read_pidfile(pidfile)
    if recorded is None:
        pidfile.unlink(missing_ok=True)
        return 0, "Vampire is not running (no background process started by `vampire up`)"
    pid, argv = recorded
    if not _is_ours(pid, argv):
        pidfile.unlink(missing_ok=True)
        return 0, f"Vampire is not running (removed the stale pidfile naming pid {pid})"
    if not _terminate(pid, timeout):
        return 1, f"could not stop pid {pid}; the pidfile {pidfile} is kept"
    pidfile.unlink(missing_ok=True)
    return 0, f"Vampire stopped (pid {pid})"


# -- the double-click path ---------------------------------------------------------------------------------


def open_or_start(
    url: str,
    start: Callable[[], None],
    open_browser: Callable[[str], object] | None = None,
    out: Callable[[str], object] = print,
) -> int:
    """Open the running gateway's dashboard, or start one in the foreground and open it once it answers."""
    if open_browser is None:
        import webbrowser

        open_browser = webbrowser.open
    health = urllib.parse.urljoin(url, "/healthz")
    if _healthy(health):
        out(f"Vampire is already running: opening {url}")
        open_browser(url)
        return 0
    out(f"Starting Vampire on {url} (the dashboard opens in your browser).")
    out("Stop it with Ctrl-C, or by closing this window.")
    stopped = threading.Event()

    def open_when_ready() -> None:
        deadline = time.monotonic() + 60.0
        while not stopped.is_set() and time.monotonic() < deadline:
            if _healthy(health, timeout=0.5):
                open_browser(url)
                return
            stopped.wait(0.1)

    opener = threading.Thread(target=open_when_ready, name="vampire-open-browser", daemon=True)
    opener.start()
    try:
        start()
    finally:
        stopped.set()
        opener.join(2.0)
    return 0


# ── emulator: a deterministic LM Studio (and Ollama, generic OpenAI) node for demos, CI jobs and tests ─

# Deterministic emulator of an LM Studio node, with Ollama and generic OpenAI-server (llama-server) flavors.
#
# It follows reference/lmstudio-api.md and reference/ollama-api.md closely enough that the gateway can be
# tested, demoed and benchmarked without a GPU: same routes, same body shapes, same odd status codes (LM
# Studio answers unknown routes with HTTP 200), JIT loading with auto-evict, per-instance parallel slots,
# auth tokens, and fault injection for failover tests. Standard library and aiohttp only, and no
# module-level mutable state, so the section can live inside the single-file product.
#
# Token accounting rule (documented because tests and usage figures depend on it): one generated word is one
# token; prompt tokens are the whitespace-separated words of every message's text plus 4 per message (raw
# `prompt` strings count words only).


class _LazyModule:
    """A module imported on first use: only the emulator needs aiohttp's server half, and a gateway that
    never runs one should not carry its memory."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


web: Any = _LazyModule("aiohttp.web")
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
    raw = [
        byte - 127.5
        for byte in hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:_MOCK_EMBED_DIM]
    ]
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
_MockHandler = Callable[["_MockCall"], Awaitable[Any]]  # returns an aiohttp.web.StreamResponse


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

    # ---- public control surface --------------------------------------------------------------------------

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

    # ---- routing -----------------------------------------------------------------------------------------

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

    # ---- request pipeline --------------------------------------------------------------------------------

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
            except (ValueError, RecursionError) as exc:
                json_error = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
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

    # ---- auth (LM Studio 0.4+) ---------------------------------------------------------------------------

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
            return (
                f"Malformed LM Studio API token provided: {presented[:6]}... "
                "Ensure you are using a valid token."
            )
        return "Invalid LM Studio API token provided."

    # ---- fault injection ---------------------------------------------------------------------------------

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

    # ---- model registry ----------------------------------------------------------------------------------

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
        examples = ", ".join(known)
        message = (
            f'Invalid model identifier "{name}". Please specify a valid downloaded model (e.g., {examples}).'
        )
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

    # ---- generation engine -------------------------------------------------------------------------------

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

    # ---- LM Studio catalogue routes ----------------------------------------------------------------------

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

    # ---- LM Studio load / unload -------------------------------------------------------------------------

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

    # ---- /v1/responses -----------------------------------------------------------------------------------

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

    # ---- /api/v1/chat (LM Studio native, stateful) -------------------------------------------------------

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

    # ---- Ollama flavor -----------------------------------------------------------------------------------

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


if __name__ == "__main__":
    sys.exit(main())
