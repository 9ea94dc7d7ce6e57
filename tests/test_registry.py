"""Node registry: interrogation of each node kind, health states, persistence, discovery, SSRF guard."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import wait_until

import vampire

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "sk-lm-QwErTy12:AbCdEfGhIjKlMnOpQrSt"


def node_record(gw: Any, node: Any) -> dict[str, Any]:
    nid = gw.app.registry.by_url(node.url.rstrip("/")).id
    return httpx.get(f"{gw.url}/vampire/v1/nodes/{nid}").json()


def test_each_node_kind_is_classified(node_factory: Any, gateway_factory: Any) -> None:
    lm03 = node_factory("qwen/qwen3-4b:llm:loaded,nomic-embed:embedding", host="127.0.0.2", version="0.3.31")
    lm04 = node_factory(
        [
            vampire.MockModel(
                "google/gemma-3-4b",
                type="vlm",
                loaded=True,
                context_length=8192,
                max_context_length=131072,
                parallel=6,
                reasoning=True,
            ),
            vampire.MockModel("text-embedding-x", type="embedding"),
        ],
        host="127.0.0.3",
        version="0.4.6",
        token=TOKEN,
    )
    oll = node_factory("llama3.2:latest:llm:loaded,all-minilm:embedding", host="127.0.0.4", flavor="ollama")
    oai = node_factory("local-gguf:llm:loaded", host="127.0.0.5", flavor="openai")
    gw = gateway_factory([lm03.url, f"{lm04.url}#{TOKEN}", oll.url, oai.url])

    r03 = node_record(gw, lm03)
    assert (r03["kind"], r03["state"], r03["version"]) == ("lmstudio", "online", "0.3.31")
    m03 = {m["id"]: m for m in r03["models"]}
    assert m03["qwen/qwen3-4b"]["loaded"] and m03["qwen/qwen3-4b"]["context_length"] == 4096
    assert not m03["nomic-embed"]["loaded"] and m03["nomic-embed"]["type"] == "embedding"

    r04 = node_record(gw, lm04)
    assert (r04["kind"], r04["state"], r04["version"]) == ("lmstudio", "online", "0.4.6")
    assert r04["token"] == "sk-…rSt"
    gemma = next(m for m in r04["models"] if m["id"] == "google/gemma-3-4b")
    assert (
        gemma["type"],
        gemma["loaded"],
        gemma["context_length"],
        gemma["max_context_length"],
        gemma["slots"],
    ) == ("vlm", True, 8192, 131072, 6)
    assert gemma["capabilities"] == ["vision", "tools", "reasoning"]
    emb = next(m for m in r04["models"] if m["id"] == "text-embedding-x")
    assert (emb["type"], emb["loaded"]) == ("embedding", False)

    rol = node_record(gw, oll)
    assert (rol["kind"], rol["state"]) == ("ollama", "online")
    mol = {m["id"]: m for m in rol["models"]}
    assert mol["llama3.2:latest"]["loaded"] and mol["llama3.2:latest"]["context_length"]
    assert not mol["all-minilm"]["loaded"] and mol["all-minilm"]["type"] == "embedding"

    roa = node_record(gw, oai)
    assert (roa["kind"], roa["state"]) == ("openai", "online")
    assert [(m["id"], m["loaded"]) for m in roa["models"]] == [("local-gguf", True)]


def test_revoked_token_makes_the_node_unauthorized_and_it_gets_no_traffic(
    node_factory: Any, gateway_factory: Any
) -> None:
    locked = node_factory("m:llm:loaded", version="0.4.6", token=TOKEN)
    spare = node_factory("m:llm:loaded")
    gw = gateway_factory([f"{locked.url}#{TOKEN}", spare.url], refresh_s=0.2)
    locked.set_token("sk-lm-Other123:ZZZZZZZZZZZZZZZZZZZZ")  # the owner revoked the token Vampire holds
    wait_until(lambda: node_record(gw, locked)["state"] == "unauthorized", timeout=3)
    before = len(locked.received)
    for _ in range(5):
        resp = httpx.post(
            f"{gw.v1}/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]}
        )
        assert resp.status_code == 200
    assert not [r for r in locked.received[before:] if r.method == "POST"]


def test_dead_node_goes_offline_and_comes_back(node_factory: Any, gateway_factory: Any, bg: Any) -> None:
    node = node_factory("m:llm:loaded")
    port = int(node.url.rsplit(":", 1)[1].rstrip("/"))
    gw = gateway_factory([node.url], refresh_s=0.3)
    events = gw.app.events
    bg.run(node.stop())
    wait_until(lambda: node_record(gw, node)["state"] == "offline", timeout=0.6 + 0.5)
    revived = vampire.MockNode(vampire.parse_model_specs("m:llm:loaded"))
    bg.run(revived.start("127.0.0.1", port))
    try:
        wait_until(lambda: node_record(gw, node)["state"] == "online", timeout=3)
        states = [e.data["state"] for e in events.recent if e.kind == "node"]
        assert states[-2:] == ["offline", "online"]
    finally:
        bg.run(revived.stop())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn_gateway(data_dir: Path, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "VAMPIRE_DATA_DIR": str(data_dir),
        "VAMPIRE_REFRESH_S": "0.5",
        "VAMPIRE_CONFIG": str(data_dir / "none.toml"),
    }
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "vampire.py"), "serve", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    wait_until(lambda: _healthy(port), timeout=15)
    return proc


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


def test_state_survives_kill_9_and_tokens_stay_secret(node_factory: Any, tmp_path: Path) -> None:
    locked = node_factory("m:llm:loaded", version="0.4.6", token=TOKEN, host="127.0.0.6")
    other = node_factory("n:llm:loaded", host="127.0.0.7")
    port, log_path = _free_port(), tmp_path / "gateway.log"
    api = f"http://127.0.0.1:{port}/vampire/v1"
    proc = _spawn_gateway(tmp_path, port, log_path)
    try:
        added = httpx.post(f"{api}/nodes", json={"url": locked.url, "token": TOKEN, "name": "gpu"}).json()
        assert added["token"] == "sk-…rSt" and added["state"] == "online"
        second = httpx.post(f"{api}/nodes", json={"url": other.url, "trusted": False}).json()
        httpx.patch(f"{api}/nodes/{added['id']}", json={"state": "draining"})
        before = httpx.get(f"{api}/nodes").json()["data"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        proc = _spawn_gateway(tmp_path, port, log_path)
        after = httpx.get(f"{api}/nodes").json()["data"]
        keys = ("id", "name", "url", "trusted", "token", "state", "kind")
        assert [{k: n[k] for k in keys} for n in after] == [{k: n[k] for k in keys} for n in before]
        assert {n["id"]: n["trusted"] for n in after} == {added["id"]: True, second["id"]: False}
        assert next(n for n in after if n["id"] == added["id"])["state"] == "draining"
        # The restarted gateway really uses the stored token: it can read the locked node's inventory.
        assert next(n for n in after if n["id"] == added["id"])["models"][0]["id"] == "m"
        for path in ("/nodes", f"/nodes/{added['id']}", "/models", "/status"):
            assert TOKEN not in httpx.get(api + path).text
    finally:
        proc.terminate()
        proc.wait(5)
    assert TOKEN not in log_path.read_text() and "QwErTy12" not in log_path.read_text()
    assert (tmp_path / "vampire.db").stat().st_mode & 0o777 == 0o600


def test_cli_discover_finds_the_emulated_nodes_and_nothing_else(node_factory: Any) -> None:
    lm = node_factory("m:llm:loaded", host="127.0.0.2")
    port = int(lm.url.rsplit(":", 1)[1].rstrip("/"))
    other = node_factory("o:llm", host="127.0.0.3", flavor="ollama")
    other_port = int(other.url.rsplit(":", 1)[1].rstrip("/"))
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "vampire.py"),
            "discover",
            "--subnet",
            "127.0.0.0/24",
            "--port",
            str(port),
            "--port",
            str(other_port),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    urls = [line.split()[0] for line in out.stdout.splitlines()[1:] if line.strip()]
    expected = {f"http://127.0.0.2:{port}", f"http://127.0.0.3:{other_port}"}
    # Anything else answering on those ports (127.0.0.1 runs other tests' servers on random ports) would be
    # a real node; there is none at these exact host:port pairs.
    assert set(urls) == expected
    assert "scanning [" in out.stderr and "2 node(s) found" in out.stderr


def test_discover_refuses_public_ranges(node_factory: Any) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "vampire.py"), "discover", "--subnet", "8.8.8.0/24"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and "not a private or loopback range" in out.stderr


def test_api_discover_adds_untrusted_nodes(node_factory: Any, gateway_factory: Any) -> None:
    lm = node_factory("m:llm:loaded", host="127.0.0.8")
    port = int(lm.url.rsplit(":", 1)[1].rstrip("/"))
    gw = gateway_factory([])
    found = httpx.post(
        f"{gw.url}/vampire/v1/discover", json={"subnets": ["127.0.0.8/32"], "ports": [port], "add": True}
    )
    assert found.status_code == 200
    assert [(f["url"], f["kind"], f["added"]) for f in found.json()["data"]] == [
        (f"http://127.0.0.8:{port}", "lmstudio", True)
    ]
    node = gw.app.registry.by_url(f"http://127.0.0.8:{port}")
    assert node is not None and node.trusted is False and node.source == "discovered"
    resp = httpx.post(
        f"{gw.v1}/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]}
    )
    assert resp.status_code == 503  # discovery is not permission: nothing routable yet
    httpx.patch(f"{gw.url}/vampire/v1/nodes/{node.id}", json={"trusted": True})
    resp = httpx.post(
        f"{gw.v1}/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]}
    )
    assert resp.status_code == 200


def test_public_host_names_are_refused(
    gateway_factory: Any, bg: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = gateway_factory([])
    real = bg.loop.getaddrinfo

    async def fake_getaddrinfo(host: str, *args: Any, **kw: Any) -> Any:
        if host == "gpu.example.com":  # a name that resolves to a public address
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 0))]
        return await real(host, *args, **kw)

    monkeypatch.setattr(bg.loop, "getaddrinfo", fake_getaddrinfo)
    resp = httpx.post(f"{gw.url}/vampire/v1/nodes", json={"url": "http://gpu.example.com:1234"})
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["code"] == "node_refused"
    assert err["message"].startswith("gpu.example.com resolves to the public address 93.184.216.34")
    literal = httpx.post(f"{gw.url}/vampire/v1/nodes", json={"url": "http://8.8.8.8:1234"})
    assert literal.status_code == 400 and "public address 8.8.8.8" in literal.json()["error"]["message"]
    assert gw.app.registry.nodes == {}


def test_guarded_resolver_refuses_rebinding(bg: Any) -> None:
    async def make() -> vampire.GuardedResolver:
        return vampire.GuardedResolver(lambda: False)

    resolver = bg.run(make())

    class PublicInner:
        async def resolve(self, host: str, port: int = 0, family: int = 0) -> list[dict[str, Any]]:
            return [
                {
                    "hostname": host,
                    "host": "1.1.1.1",
                    "port": port,
                    "family": socket.AF_INET,
                    "proto": 0,
                    "flags": 0,
                }
            ]

    resolver._inner = PublicInner()  # type: ignore[assignment]
    with pytest.raises(OSError, match="outside private networks"):
        bg.run(resolver.resolve("rebound.example", 1234))


def test_control_plane_node_crud(node_factory: Any, gateway_factory: Any) -> None:
    node = node_factory("m:llm:loaded")
    gw = gateway_factory([])
    api = f"{gw.url}/vampire/v1"
    created = httpx.post(f"{api}/nodes", json={"url": node.url, "name": "box", "tags": ["lan"]})
    assert created.status_code == 201 and created.json()["name"] == "box"
    nid = created.json()["id"]
    dup = httpx.post(f"{api}/nodes", json={"url": node.url})
    assert dup.status_code == 400 and "already registered" in dup.json()["error"]["message"]
    bad = httpx.patch(f"{api}/nodes/{nid}", json={"state": "melting"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "state"
    assert httpx.patch(f"{api}/nodes/{nid}", json={"state": "disabled"}).json()["state"] == "disabled"
    assert httpx.post(f"{api}/nodes/{nid}/probe").json()["state"] == "disabled"
    assert httpx.patch(f"{api}/nodes/{nid}", json={"state": "online"}).json()["state"] == "online"
    models = httpx.get(f"{api}/models").json()["data"]
    assert [(m["id"], m["node"], m["loaded"], m["slots"]) for m in models] == [("m", nid, True, 4)]
    assert httpx.delete(f"{api}/nodes/{nid}").json() == {"id": nid, "deleted": True}
    missing = httpx.get(f"{api}/nodes/{nid}")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "node_not_found"
    assert httpx.post(f"{api}/nodes", content=b"{").json()["error"]["code"] == "invalid_json"
    assert httpx.get(f"{api}/nope").status_code == 404


def test_control_plane_needs_the_admin_token_when_set(node_factory: Any, gateway_factory: Any) -> None:
    gw = gateway_factory([], admin_token="adm-" + "x" * 20)
    denied = httpx.get(f"{gw.url}/vampire/v1/nodes")
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "admin_token_required"
    ok = httpx.get(f"{gw.url}/vampire/v1/nodes", headers={"Authorization": "Bearer adm-" + "x" * 20})
    assert ok.status_code == 200 and json.loads(ok.text)["object"] == "list"


def test_node_events_are_published(node_factory: Any, gateway_factory: Any, bg: Any) -> None:
    node = node_factory("m:llm:loaded")
    gw = gateway_factory([node.url], refresh_s=0.2)
    bg.run(node.stop())
    wait_until(
        lambda: any(e.kind == "node" and e.data["state"] == "offline" for e in gw.app.events.recent),
        timeout=10,
    )
