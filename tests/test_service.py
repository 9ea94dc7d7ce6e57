"""The service section: per-OS plans as text, dry runs, real runs against stub managers, `up`/`down`,
and the double-click path.

Real runs put stub `systemctl`/`schtasks`/`reg` scripts first on PATH, so no test can reach the service
manager of the person running it.
"""

from __future__ import annotations

import http.server
import os
import plistlib
import shutil
import socket
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

import vampire as svc

ROOT = Path(__file__).resolve().parent.parent
EXE = ["/opt/vampire/bin/vampire"]
ARGS = ["--port", "7777", "--node", "http://127.0.0.1:1234"]
TASK_NS = {"t": "http://schemas.microsoft.com/windows/2004/02/mit/task"}
RUN_KEY = r"HKCU\Software\Microsoft\Windows\CurrentVersion\Run"
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="uses POSIX shell stubs and signals")


def unit_entries(text: str) -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for line in text.splitlines():
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections[current] = []
        elif "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            sections[current].append((key, value))
    return sections


def single(entries: list[tuple[str, str]], key: str) -> str:
    values = [v for k, v in entries if k == key]
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


# ── plans ────────────────────────────────────────────────────────────────────────────────────────────


def test_linux_install_plan(tmp_path: Path) -> None:
    home, data = tmp_path / "home", tmp_path / "data"
    plan = svc.service_plan("install", "linux", EXE, ARGS, home, data)
    unit_path = home / ".config" / "systemd" / "user" / "vampire.service"
    assert list(plan.files) == [unit_path]
    unit = unit_entries(plan.files[unit_path])
    service = unit["Service"]
    assert single(service, "Type") == "simple"
    assert (
        single(service, "ExecStart")
        == "/opt/vampire/bin/vampire serve --port 7777 --node http://127.0.0.1:1234"
    )
    assert single(service, "Restart") == "on-failure"
    assert single(service, "RestartSec") == "2"
    assert single(service, "StandardOutput") == "journal"
    assert single(service, "StandardError") == "journal"
    assert f"VAMPIRE_DATA_DIR={data}" in [v.strip('"') for k, v in service if k == "Environment"]
    assert single(unit["Install"], "WantedBy") == "default.target"
    assert plan.commands == [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "vampire.service"],
        ["systemctl", "--user", "restart", "vampire.service"],
    ]
    assert any("loginctl enable-linger $USER" in note for note in plan.notes)


def test_linux_exec_start_quotes_spaces_and_specifiers(tmp_path: Path) -> None:
    plan = svc.service_plan(
        "install", "linux", ["/home/a b/vampire"], ["--node", "http://h:1/#100%$x"], tmp_path, tmp_path
    )
    unit = unit_entries(next(iter(plan.files.values())))
    assert single(unit["Service"], "ExecStart") == '"/home/a b/vampire" serve --node http://h:1/#100%%$$x'


def test_linux_other_actions(tmp_path: Path) -> None:
    ctl = ["systemctl", "--user"]
    uninstall = svc.service_plan("uninstall", "linux", EXE, [], tmp_path, tmp_path)
    assert uninstall.commands == [[*ctl, "disable", "--now", "vampire.service"]]
    assert uninstall.optional == frozenset({0})
    assert uninstall.remove == [tmp_path / ".config" / "systemd" / "user" / "vampire.service"]
    assert uninstall.cleanup == [[*ctl, "daemon-reload"]]
    assert svc.service_plan("start", "linux", EXE, [], tmp_path, tmp_path).commands == [
        [*ctl, "start", "vampire.service"]
    ]
    assert svc.service_plan("stop", "linux", EXE, [], tmp_path, tmp_path).commands == [
        [*ctl, "stop", "vampire.service"]
    ]
    status = svc.service_plan("status", "linux", EXE, [], tmp_path, tmp_path)
    assert status.commands == [[*ctl, "status", "--no-pager", "vampire.service"]]


def test_darwin_install_plan(tmp_path: Path) -> None:
    home, data = tmp_path / "home", tmp_path / "data"
    plan = svc.service_plan("install", "darwin", EXE, ARGS, home, data)
    plist_path = home / "Library" / "LaunchAgents" / "dev.vampire.gateway.plist"
    assert list(plan.files) == [plist_path]
    spec = plistlib.loads(plan.files[plist_path].encode())
    assert spec["Label"] == "dev.vampire.gateway"
    assert spec["ProgramArguments"] == [*EXE, "serve", *ARGS]
    assert spec["RunAtLoad"] is True
    assert spec["KeepAlive"] is True
    logs = home / "Library" / "Logs" / "vampire"
    assert spec["StandardOutPath"] == str(logs / "vampire.log")
    assert spec["StandardErrorPath"] == str(logs / "vampire.log")
    assert spec["EnvironmentVariables"]["VAMPIRE_DATA_DIR"] == str(data)
    assert plan.dirs == [logs]
    uid = os.getuid() if hasattr(os, "getuid") else 501
    assert plan.commands == [
        ["launchctl", "bootout", f"gui/{uid}/dev.vampire.gateway"],
        ["launchctl", "enable", f"gui/{uid}/dev.vampire.gateway"],
        ["launchctl", "bootstrap", f"gui/{uid}", str(plist_path)],
    ]
    assert plan.optional == frozenset({0})
    uninstall = svc.service_plan("uninstall", "darwin", EXE, [], home, data)
    assert uninstall.commands == [["launchctl", "bootout", f"gui/{uid}/dev.vampire.gateway"]]
    assert uninstall.remove == [plist_path]


def test_windows_install_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USERDOMAIN", "DESKTOP-1")
    monkeypatch.setenv("USERNAME", "alice")
    exe = [r"C:\Program Files\vampire\vampire.exe"]
    data = tmp_path / "data"
    plan = svc.service_plan("install", "windows", exe, ["--port", "7777"], tmp_path, data)
    xml_path = data / "vampire-task.xml"
    assert list(plan.files) == [xml_path]
    task = ET.fromstring(plan.files[xml_path])
    trigger_user = task.find("t:Triggers/t:LogonTrigger/t:UserId", TASK_NS)
    assert trigger_user is not None and trigger_user.text == "DESKTOP-1\\alice"
    assert task.findtext("t:Principals/t:Principal/t:UserId", namespaces=TASK_NS) == "DESKTOP-1\\alice"
    assert task.findtext("t:Settings/t:ExecutionTimeLimit", namespaces=TASK_NS) == "PT0S"
    assert task.find("t:Settings/t:RestartOnFailure", TASK_NS) is not None
    assert (
        task.findtext("t:Actions/t:Exec/t:Command", namespaces=TASK_NS)
        == r"C:\Program Files\vampire\vampirew.exe"
    )
    assert task.findtext("t:Actions/t:Exec/t:Arguments", namespaces=TASK_NS) == "serve --port 7777"
    assert plan.commands == [
        ["schtasks", "/Create", "/TN", "Vampire", "/XML", str(xml_path), "/F"],
        ["schtasks", "/Run", "/TN", "Vampire"],
    ]
    assert plan.fallback == [
        ["reg", "add", RUN_KEY, "/v", "Vampire", "/t", "REG_SZ", "/d",
         '"C:\\Program Files\\vampire\\vampirew.exe" serve --port 7777', "/f"],
        [*exe, "up", "--port", "7777"],
    ]  # fmt: skip


def test_windows_python_install_uses_pythonw(tmp_path: Path) -> None:
    plan = svc.service_plan(
        "install", "windows", [r"C:\Py\python.exe", "-m", "vampire"], [], tmp_path, tmp_path
    )
    task = ET.fromstring(next(iter(plan.files.values())))
    assert task.findtext("t:Actions/t:Exec/t:Command", namespaces=TASK_NS) == r"C:\Py\pythonw.exe"
    assert task.findtext("t:Actions/t:Exec/t:Arguments", namespaces=TASK_NS) == "-m vampire serve"


def test_windows_other_actions(tmp_path: Path) -> None:
    uninstall = svc.service_plan("uninstall", "windows", EXE, [], tmp_path, tmp_path)
    assert uninstall.commands == [
        ["schtasks", "/End", "/TN", "Vampire"],
        ["schtasks", "/Delete", "/TN", "Vampire", "/F"],
        ["reg", "delete", RUN_KEY, "/v", "Vampire", "/f"],
        [*EXE, "down"],
    ]
    assert uninstall.optional == frozenset(range(4))
    assert svc.service_plan("start", "windows", EXE, [], tmp_path, tmp_path).commands == [
        ["schtasks", "/Run", "/TN", "Vampire"]
    ]
    assert svc.service_plan("stop", "windows", EXE, [], tmp_path, tmp_path).commands == [
        ["schtasks", "/End", "/TN", "Vampire"]
    ]


def test_plan_rejects_unknown_action_and_system(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown service action"):
        svc.service_plan("reboot", "linux", EXE, [], tmp_path, tmp_path)
    with pytest.raises(ValueError, match="unsupported system"):
        svc.service_plan("install", "beos", EXE, [], tmp_path, tmp_path)
    out: list[str] = []
    assert svc.run_service("reboot", True, EXE, [], tmp_path, tmp_path, system="linux", out=out.append) == 2
    assert "unknown service action" in out[0]


def test_current_exe_for_a_script_and_a_console_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "vampire.py"
    monkeypatch.setattr(sys, "argv", [str(script), "service", "install"])
    assert svc.current_exe() == [sys.executable, str(script.resolve())]
    launcher = tmp_path / "bin" / "vampire"
    launcher.parent.mkdir()
    launcher.write_text("#!/bin/sh\n")
    launcher.chmod(0o755)
    monkeypatch.setattr(sys, "argv", [str(launcher), "service", "install"])
    if sys.platform == "win32":
        assert svc.current_exe() == [sys.executable, "-m", "vampire"]
    else:
        assert svc.current_exe() == [str(launcher)]


def test_installers_folder_matches_embedded_templates() -> None:
    for name, content in svc.render_templates().items():
        path = ROOT / "installers" / name
        assert path.exists(), f"{path} missing: run python installers/render.py"
        assert path.read_text(encoding="utf-8") == content, (
            f"{path} is stale: run python installers/render.py"
        )


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        if os.name == "posix" and os.geteuid() == 0 and shutil.which("apt-get"):
            # A fresh machine may have no package lists yet: update once if the plain install fails.
            subprocess.run(
                [
                    "bash",
                    "-c",
                    "apt-get install -y -q systemd || (apt-get update -qq && apt-get install -y -q systemd)",
                ],
                capture_output=True,
                timeout=900,
                env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            )
        if shutil.which("systemd-analyze") is None:
            pytest.skip("systemd-analyze is not installed (Debian package `systemd`; installing needs root)")
    script = tmp_path / "vampire.py"
    script.write_text("")
    plan = svc.service_plan("install", "linux", [sys.executable, str(script)], ARGS, tmp_path, tmp_path / "d")
    unit = tmp_path / "vampire.service"
    unit.write_text(next(iter(plan.files.values())))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "vampire.service" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


# ── run_service: dry runs and real runs against stubs ────────────────────────────────────────────────


@pytest.mark.parametrize("system", svc.SERVICE_SYSTEMS)
@pytest.mark.parametrize("action", svc.SERVICE_ACTIONS)
def test_dry_run_prints_everything_and_touches_nothing(tmp_path: Path, system: str, action: str) -> None:
    home = tmp_path / "home"
    home.mkdir()
    data = home / ".local" / "share" / "vampire"
    out: list[str] = []
    assert svc.run_service(action, True, EXE, ARGS, home, data, system=system, out=out.append) == 0
    text = "\n".join(out)
    plan = svc.service_plan(action, system, EXE, ARGS, home, data)
    for path, content in plan.files.items():
        assert str(path) in text
        assert content.strip() in text
    for cmd in [*plan.commands, *plan.fallback, *plan.cleanup]:
        assert svc._show(cmd, system) in text
    for path in plan.remove:
        assert f"would remove: {path}" in text
    assert list(home.iterdir()) == []


def make_stub(stubs: Path, name: str, body: str) -> None:
    stub = stubs / name
    stub.write_text(f'#!/bin/sh\nprintf "%s\\n" "{name} $*" >> "{stubs}/calls.log"\n{body}\n')
    stub.chmod(0o755)


def stub_calls(stubs: Path) -> list[str]:
    log = stubs / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


@pytest.fixture
def stubs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    monkeypatch.setenv("PATH", f"{stubs}{os.pathsep}{os.environ.get('PATH', '')}")
    return stubs


@posix_only
def test_install_without_user_manager_fails_clearly_and_writes_nothing(tmp_path: Path, stubs: Path) -> None:
    make_stub(stubs, "systemctl", 'echo "Failed to connect to bus: No medium found" >&2; exit 1')
    home = tmp_path / "home"
    home.mkdir()
    out: list[str] = []
    code = svc.run_service("install", False, EXE, [], home, home / "data", system="linux", out=out.append)
    assert code == 1
    text = "\n".join(out)
    assert "service manager is not running" in text
    assert "Failed to connect to bus" in text
    assert "vampire up" in text
    assert list(home.iterdir()) == []
    assert stub_calls(stubs) == ["systemctl --user show-environment"]


@posix_only
def test_install_and_uninstall_with_systemd_stub(tmp_path: Path, stubs: Path) -> None:
    make_stub(stubs, "systemctl", "exit 0")
    home = tmp_path / "home"
    out: list[str] = []
    assert (
        svc.run_service("install", False, EXE, ARGS, home, home / "data", system="linux", out=out.append) == 0
    )
    unit = home / ".config" / "systemd" / "user" / "vampire.service"
    assert "ExecStart=/opt/vampire/bin/vampire serve --port 7777" in unit.read_text()
    assert stub_calls(stubs) == [
        "systemctl --user show-environment",
        "systemctl --user daemon-reload",
        "systemctl --user enable vampire.service",
        "systemctl --user restart vampire.service",
    ]
    assert "Vampire service installed and started." in out
    (stubs / "calls.log").unlink()
    assert (
        svc.run_service("uninstall", False, EXE, [], home, home / "data", system="linux", out=out.append) == 0
    )
    assert not unit.exists()
    assert stub_calls(stubs) == [
        "systemctl --user disable --now vampire.service",
        "systemctl --user daemon-reload",
    ]


@posix_only
def test_uninstall_tolerates_a_missing_manager(tmp_path: Path, stubs: Path) -> None:
    make_stub(stubs, "systemctl", "exit 1")
    unit = tmp_path / ".config" / "systemd" / "user" / "vampire.service"
    unit.parent.mkdir(parents=True)
    unit.write_text("[Service]\n")
    assert (
        svc.run_service("uninstall", False, EXE, [], tmp_path, tmp_path, system="linux", out=lambda _: None)
        == 0
    )
    assert not unit.exists()


@posix_only
def test_status_reports_not_running(tmp_path: Path, stubs: Path) -> None:
    make_stub(stubs, "systemctl", '[ "$2" = show-environment ] && exit 0; echo "inactive (dead)"; exit 3')
    out: list[str] = []
    assert svc.run_service("status", False, EXE, [], tmp_path, tmp_path, system="linux", out=out.append) == 1
    assert "inactive (dead)" in out
    assert "The Vampire service is not running (or not installed)." in out


@posix_only
def test_windows_falls_back_to_run_entry_when_task_is_refused(tmp_path: Path, stubs: Path) -> None:
    make_stub(stubs, "schtasks", 'echo "ERROR: Access is denied." >&2; exit 1')
    make_stub(stubs, "reg", "exit 0")
    make_stub(stubs, "vampire.exe", "exit 0")
    data = tmp_path / "data"
    out: list[str] = []
    exe = [str(stubs / "vampire.exe")]
    assert svc.run_service("install", False, exe, [], tmp_path, data, system="windows", out=out.append) == 0
    # Task Scheduler reads the task file as UTF-16, with a byte-order mark.
    raw = (data / "vampire-task.xml").read_bytes()
    assert raw[:2] in (b"\xff\xfe", b"\xfe\xff")
    assert ET.fromstring(raw).tag.endswith("Task")
    calls = stub_calls(stubs)
    assert calls[0] == f"schtasks /Create /TN Vampire /XML {data / 'vampire-task.xml'} /F"
    assert calls[1].startswith(f"reg add {RUN_KEY} /v Vampire /t REG_SZ /d ")
    assert calls[2] == "vampire.exe up"
    assert any("Access is denied" in line and "falling back" in line for line in out)
    assert "Vampire starts from the HKCU Run entry at your next logon instead of a scheduled task." in out


@posix_only
def test_windows_does_not_fall_back_when_only_the_first_run_fails(tmp_path: Path, stubs: Path) -> None:
    make_stub(
        stubs, "schtasks", '[ "$1" = /Create ] && exit 0; echo "ERROR: The task is disabled." >&2; exit 1'
    )
    make_stub(stubs, "reg", "exit 0")
    out: list[str] = []
    assert (
        svc.run_service("install", False, EXE, [], tmp_path, tmp_path, system="windows", out=out.append) == 1
    )
    assert [c.split()[0] for c in stub_calls(stubs)] == ["schtasks", "schtasks"]
    assert any("The task is disabled" in line for line in out)


# ── vampire up / down ────────────────────────────────────────────────────────────────────────────────

STAND_IN_SERVER = """\
import http.server, os, sys
port, starts = int(sys.argv[1]), sys.argv[2]
with open(starts, "a") as fh:
    fh.write(f"{os.getpid()}\\n")

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path == "/healthz"
        body = b'{"status":"ok"}' if ok else b"{}"
        self.send_response(200 if ok else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

print("stand-in listening", flush=True)
http.server.ThreadingHTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


@pytest.fixture
def stand_in(tmp_path: Path) -> Iterator[tuple[list[str], str, Path]]:
    script = tmp_path / "standin.py"
    script.write_text(STAND_IN_SERVER)
    starts = tmp_path / "starts.log"
    port = free_port()
    data = tmp_path / "data"
    yield [sys.executable, str(script), str(port), str(starts)], f"http://127.0.0.1:{port}/healthz", data
    # Whatever a failing test left running must not outlive it.
    svc.stop_background(data, timeout=5)


@posix_only
def test_up_twice_is_one_process_and_down_stops_it(
    tmp_path: Path, stand_in: tuple[list[str], str, Path]
) -> None:
    argv, health, data = stand_in
    code, message = svc.start_background(argv, data, health, timeout=20)
    assert code == 0, message
    assert "listening on http://127.0.0.1:" in message
    pid = int((data / "vampire.pid").read_text().split()[0])
    assert pid_alive(pid)

    code, message = svc.start_background(argv, data, health, timeout=20)
    assert code == 0, message
    assert "already running" in message
    assert (tmp_path / "starts.log").read_text().split() == [str(pid)]
    assert "stand-in listening" in (data / "vampire.log").read_text()

    code, message = svc.stop_background(data, timeout=10)
    assert code == 0, message
    assert "stopped" in message
    assert not pid_alive(pid)
    assert not (data / "vampire.pid").exists()
    assert not svc._healthy(health)

    code, message = svc.stop_background(data)
    assert code == 0
    assert "not running" in message


@posix_only
def test_up_reports_an_early_exit_with_the_log(tmp_path: Path) -> None:
    data = tmp_path / "data"
    argv = [sys.executable, "-c", "import sys; print('port 7777 is already in use', flush=True); sys.exit(3)"]
    code, message = svc.start_background(argv, data, f"http://127.0.0.1:{free_port()}/healthz", timeout=20)
    assert code == 1
    assert "exited with code 3" in message
    assert "port 7777 is already in use" in message
    assert not (data / "vampire.pid").exists()


@posix_only
def test_up_kills_a_child_that_never_answers(tmp_path: Path) -> None:
    data = tmp_path / "data"
    argv = [sys.executable, "-c", "import os, time; print(os.getpid(), flush=True); time.sleep(120)"]
    code, message = svc.start_background(argv, data, f"http://127.0.0.1:{free_port()}/healthz", timeout=1.0)
    assert code == 1
    assert "did not answer within 1s" in message
    pid = int((data / "vampire.log").read_text().splitlines()[-1])
    assert not pid_alive(pid)
    assert not (data / "vampire.pid").exists()


@posix_only
def test_up_replaces_a_stale_pidfile(stand_in: tuple[list[str], str, Path]) -> None:
    argv, health, data = stand_in
    data.mkdir(parents=True)
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    (data / "vampire.pid").write_text(f"{int(finished.stdout)}\n{sys.executable} gone\n")
    code, message = svc.start_background(argv, data, health)
    assert code == 0, message
    assert "listening on" in message
    assert int((data / "vampire.pid").read_text().split()[0]) != int(finished.stdout)


@posix_only
def test_down_with_a_stale_pidfile(tmp_path: Path) -> None:
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(finished.stdout)
    data = tmp_path / "data"
    data.mkdir()
    (data / "vampire.pid").write_text(f"{dead_pid}\n")
    code, message = svc.stop_background(data)
    assert code == 0
    assert "stale pidfile" in message
    assert not (data / "vampire.pid").exists()


@posix_only
def test_down_escalates_to_sigkill_at_the_deadline(
    tmp_path: Path, stand_in: tuple[list[str], str, Path]
) -> None:
    argv, health, data = stand_in
    stubborn = tmp_path / "stubborn.py"
    stubborn.write_text(
        "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + Path(argv[1]).read_text()
    )
    argv = [argv[0], str(stubborn), *argv[2:]]
    code, message = svc.start_background(argv, data, health, timeout=20)
    assert code == 0, message
    pid = int((data / "vampire.pid").read_text().split()[0])
    code, message = svc.stop_background(data, timeout=0.5)
    assert code == 0, message
    assert not pid_alive(pid)


# ── the double-click path ───────────────────────────────────────────────────────────────────────────


@posix_only
def test_open_or_start_opens_the_running_gateway(stand_in: tuple[list[str], str, Path]) -> None:
    argv, health, data = stand_in
    assert svc.start_background(argv, data, health)[0] == 0
    url = health.removesuffix("healthz")
    opened: list[str] = []
    started: list[bool] = []
    code = svc.open_or_start(
        url, lambda: started.append(True), open_browser=opened.append, out=lambda _: None
    )
    assert code == 0
    assert opened == [url]
    assert started == []


def test_open_or_start_starts_in_the_foreground_then_opens() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Health)
    opened: list[str] = []

    def browser(target: str) -> None:
        opened.append(target)
        # The "user" closes the window once the dashboard is open; shutdown must run off the server thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    out: list[str] = []
    try:
        code = svc.open_or_start(url, server.serve_forever, open_browser=browser, out=out.append)
    finally:
        server.server_close()
    assert code == 0
    assert opened == [url]
    text = "\n".join(out)
    assert url in text
    assert "Ctrl-C" in text


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"status":"ok"}'
        self.send_response(200 if self.path == "/healthz" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass
