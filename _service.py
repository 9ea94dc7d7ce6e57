# ── service: per-user background service, `vampire up`/`down`, the double-click path ──────────────────
"""Running Vampire in the background without root.

Three ways, from most to least managed:

* `vampire service install|uninstall|start|stop|status`: a per-user service of the platform's own manager
  (systemd `--user` on Linux, a launchd LaunchAgent on macOS, a Scheduled Task on Windows with an HKCU
  Run entry as the fallback). `service_plan` computes what would be written and run; `run_service`
  carries it out or, with `dry_run`, only prints it.
* `vampire up` / `vampire down`: an unmanaged detached process with a pidfile, for containers and CI
  where no user service manager runs (`start_background`, `stop_background`).
* no arguments (a double-click): open the dashboard of the running gateway, or start one in the
  foreground and open it (`open_or_start`).

The product is one file that may be frozen, so the service templates live here as string constants;
`installers/render.py` writes them out for reference and a test keeps the two identical.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import plistlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import webbrowser
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from xml.sax.saxutils import escape as xml_escape

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
    <Description>Vampire gateway: one OpenAI-compatible endpoint for the LM Studio servers shared with you</Description>
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
    """Carry out `vampire service <action>`; with dry_run only print it. Returns 0 ok, 1 failure, 2 bad usage."""
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


# ── background process: `vampire up` / `vampire down` ──────────────────────────────────────────────────


def _healthy(url: str, timeout: float = 1.0) -> bool:
    # No proxies: an HTTP(S)_PROXY in the environment must not capture a loopback health check.
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
    """Whether `pid` is still the process the pidfile recorded, not a recycled pid (checked where /proc is)."""
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
    """`vampire up`: start `argv` detached unless a gateway already runs; return when it answers health_url."""
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
            f"Vampire is already running as pid {recorded[0]} but {health_url} does not answer yet; see {log}",
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


# ── the double-click path ───────────────────────────────────────────────────────────────────────────


def open_or_start(
    url: str,
    start: Callable[[], None],
    open_browser: Callable[[str], object] = webbrowser.open,
    out: Callable[[str], object] = print,
) -> int:
    """Open the running gateway's dashboard, or start one in the foreground and open it once it answers."""
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
