"""Smoke-test a frozen Vampire binary and print its figures.

    python build/smoke.py dist/vampire [--runs 5] [--json figures.json] [--max-size-mb 15] [--max-start-s 0.5]

Checks, each against `serve --demo` on a free loopback port with a throw-away data dir:
  * size (MB) and cold start to the first `/healthz` 200 (median of --runs starts);
  * one chat completion through the gateway, with a model taken from `/v1/models`;
  * SIGTERM to the process: exit code 0 within 5 s (every timed run ends this way);
  * SIGTERM to the whole process group, as systemd sends it: exit 0 within 5 s;
  * SIGINT twice to the process group, as a terminal's Ctrl-C pressed twice delivers it (a one-file
    bootloader also forwards each one to its child): exit 0 within 5 s, no traceback.
On Windows the signal checks become one CTRL_BREAK_EVENT (uvicorn's shutdown signal there).
Exit status: 0 when every check passed; the --max-* budgets fail the run only when given.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

WINDOWS = sys.platform == "win32"
EXIT_DEADLINE_S = 5.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(
    port: int, method: str, path: str, body: dict | None = None, timeout: float = 30.0
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload else {}
        conn.request(method, path, body=payload, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class Gateway:
    """One `serve --demo` process of the binary under test, in its own process group."""

    def __init__(self, binary: Path, workdir: Path) -> None:
        self.port = free_port()
        self.data = Path(tempfile.mkdtemp(prefix="data-", dir=workdir))
        self.log = self.data / "smoke.log"
        # A fresh data dir, settings file (which does not exist: defaults apply) and, on Linux, config dir
        # per start; no VAMPIRE_* variable of the caller's: nothing of the user's may leak in.
        env = {k: v for k, v in os.environ.items() if not k.startswith("VAMPIRE_")}
        env.update(
            VAMPIRE_DATA_DIR=str(self.data),
            VAMPIRE_CONFIG=str(self.data / "vampire.toml"),
            XDG_CONFIG_HOME=str(self.data / "config"),
            XDG_DATA_HOME=str(self.data / "share"),
        )
        argv = [str(binary), "serve", "--demo", "--port", str(self.port)]
        extra: dict = (
            {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if WINDOWS else {"start_new_session": True}
        )
        with self.log.open("wb") as fh:
            self.started = time.perf_counter()
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, env=env, **extra
            )

    def wait_healthy(self, timeout: float = 60.0) -> float:
        """Seconds from spawn to the first /healthz 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with {self.proc.returncode} before answering:\n{self.output()}")
            try:
                if request(self.port, "GET", "/healthz", timeout=1.0)[0] == 200:
                    return time.perf_counter() - self.started
            except OSError:
                pass
            time.sleep(0.005)
        raise RuntimeError(f"/healthz did not answer within {timeout}s:\n{self.output()}")

    def child_pids(self) -> list[int]:
        """The direct children of the process (a one-file bootloader's is the gateway), Linux only."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        if children.exists():
            return [int(p) for p in children.read_text().split()]
        found: list[int] = []  # kernels without CONFIG_PROC_CHILDREN: scan for the parent pid
        for status in Path("/proc").glob("[0-9]*/status"):
            try:
                text = status.read_text()
            except OSError:
                continue
            if f"\nPPid:\t{self.proc.pid}\n" in text:
                found.append(int(status.parent.name))
        return found

    def rss_by_pid(self) -> dict[int, float]:
        """VmRSS in MiB of the process and of each of its children, Linux only (empty elsewhere)."""
        if not Path("/proc").is_dir():
            return {}
        rss: dict[int, float] = {}
        for pid in [self.proc.pid, *self.child_pids()]:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss[pid] = int(line.split()[1]) / 1024
        return rss

    def rss_mib(self) -> float | None:
        """Resident memory of the process and its children (a one-file build runs two), Linux only."""
        rss = self.rss_by_pid()
        return sum(rss.values()) if rss else None

    def stop(self, how: Callable[[], None]) -> tuple[int | None, float]:
        """Send the signal(s) and wait; return (exit code or None if still running, seconds to exit)."""
        start = time.perf_counter()
        how()
        try:
            code: int | None = self.proc.wait(timeout=EXIT_DEADLINE_S)
        except subprocess.TimeoutExpired:
            code = None
            self.kill()
        return code, time.perf_counter() - start

    def kill(self) -> None:
        if self.proc.poll() is None:
            if WINDOWS:
                self.proc.kill()
            else:
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def output(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def sigterm_process(gw: Gateway) -> Callable[[], None]:
    if WINDOWS:
        return lambda: os.kill(gw.proc.pid, signal.CTRL_BREAK_EVENT)
    return lambda: os.kill(gw.proc.pid, signal.SIGTERM)


def signal_group(gw: Gateway, sig: int, times: int = 1) -> Callable[[], None]:
    def send() -> None:
        for _ in range(times):
            os.killpg(gw.proc.pid, sig)

    return send


def chat_once(gw: Gateway) -> str:
    deadline = time.monotonic() + 30.0
    models: list[str] = []
    while time.monotonic() < deadline:
        status, body = request(gw.port, "GET", "/v1/models")
        if status == 200:
            models = [m["id"] for m in json.loads(body).get("data", [])]
            if any(not m.startswith("vampire:") for m in models):
                break
        time.sleep(0.1)
    chat_models = [m for m in models if not m.startswith("vampire:") and "embed" not in m]
    if not chat_models:
        raise RuntimeError(f"/v1/models offered no chat model: {models}")
    model = chat_models[0]
    body = {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}
    status, raw = request(gw.port, "POST", "/v1/chat/completions", body)
    if status != 200:
        raise RuntimeError(f"chat completion answered {status}: {raw[:500]!r}")
    content = json.loads(raw)["choices"][0]["message"]["content"]
    if not isinstance(content, str) or not content:
        raise RuntimeError(f"chat completion had no content: {raw[:500]!r}")
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Smoke-test a frozen Vampire binary.")
    parser.add_argument("binary", type=Path)
    parser.add_argument("--runs", type=int, default=5, help="cold starts to time (median reported)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--max-size-mb", type=float, help="fail when the binary is larger")
    parser.add_argument("--max-start-s", type=float, help="fail when the median cold start is slower")
    args = parser.parse_args(argv)

    binary = args.binary.resolve()
    if not binary.is_file():
        print(f"error: {binary} does not exist", file=sys.stderr)
        return 1
    failures: list[str] = []
    figures: dict[str, object] = {"binary": str(binary), "size_mb": round(binary.stat().st_size / 1e6, 2)}
    print(f"binary: {binary}\nsize: {figures['size_mb']} MB")

    with tempfile.TemporaryDirectory(prefix="vampire-smoke-") as tmp:
        work = Path(tmp)
        starts: list[float] = []
        for run in range(1, args.runs + 1):
            gw = Gateway(binary, work)
            try:
                starts.append(gw.wait_healthy())
                if run == 1:
                    figures["idle_rss_mib"] = gw.rss_mib()
                    figures["chat_model"] = chat_once(gw)
                    print(f"chat completion via {figures['chat_model']}: ok")
                code, took = gw.stop(sigterm_process(gw))
            except (RuntimeError, OSError, KeyError, ValueError) as exc:
                failures.append(f"run {run}: {exc}")
                continue
            finally:
                gw.kill()
            print(f"run {run}: cold start {starts[-1]:.3f} s; SIGTERM -> exit {code} in {took:.2f} s")
            if code != 0:
                failures.append(
                    f"run {run}: SIGTERM gave exit {code} (None = still running after 5 s)\n{gw.output()}"
                )
        cold: dict[str, float] | None = None
        if starts:
            cold = {
                "median": round(statistics.median(starts), 3),
                "min": round(min(starts), 3),
                "max": round(max(starts), 3),
                "runs": len(starts),
            }
            figures["cold_start_s"] = cold

        if not WINDOWS:
            cases = [
                ("SIGTERM to the process group", signal.SIGTERM, 1),
                ("SIGINT twice to the group", signal.SIGINT, 2),
            ]
            for label, sig, times in cases:
                gw = Gateway(binary, work)
                try:
                    gw.wait_healthy()
                    code, took = gw.stop(signal_group(gw, sig, times))
                except (RuntimeError, OSError) as exc:
                    failures.append(f"{label}: {exc}")
                    continue
                finally:
                    gw.kill()
                clean = code == 0 and "Traceback" not in gw.output(lines=10_000)
                print(f"{label}: exit {code} in {took:.2f} s{'' if clean else ' (NOT CLEAN)'}")
                figures[label] = {"exit": code, "seconds": round(took, 2)}
                if not clean:
                    failures.append(f"{label}: exit {code}\n{gw.output()}")

    size_mb = binary.stat().st_size / 1e6
    if cold:
        print(
            f"cold start to first /healthz 200: median {cold['median']} s (min {cold['min']}, max {cold['max']})"
        )
        if args.max_start_s is not None and cold["median"] > args.max_start_s:
            failures.append(f"cold start {cold['median']} s is over the {args.max_start_s} s budget")
    if figures.get("idle_rss_mib") is not None:
        print(f"idle RSS after start: {figures['idle_rss_mib']:.1f} MiB")
    if args.max_size_mb is not None and size_mb > args.max_size_mb:
        failures.append(f"size {size_mb:.2f} MB is over the {args.max_size_mb} MB budget")
    figures["failures"] = failures
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    print("smoke: ok" if not failures else f"smoke: {len(failures)} failure(s)")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
