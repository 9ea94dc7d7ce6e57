"""install.sh against a fake release served on 127.0.0.1: download, SHA-256 check, upgrade, uninstall.

The release holds a stand-in `vampire` shell script that answers `version`, `service install` (refusing
like the real binary does where no user service manager runs) and `service uninstall`, and records every
call. `systemctl` and `launchctl` are stubbed on PATH so the installer's cleanup can never reach the real
user's service manager.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import platform
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INSTALL_SH = ROOT / "install.sh"

pytestmark = pytest.mark.skipif(
    sys.platform not in ("linux", "darwin") or shutil.which("bash") is None,
    reason="install.sh is the Linux/macOS installer and needs bash",
)

STAND_IN = """\
#!/bin/sh
# Stand-in for the vampire binary: records its arguments, answers like the real one in a container.
echo "$*" >> "$HOME/vampire-calls.log"
case "$1 $2" in
  "version "*) echo "vampire @VERSION@" ;;
  "service install")
    echo "error: cannot install the Vampire service: the systemd user service manager is not running here." >&2
    echo "Run the gateway in the background with 'vampire up'." >&2
    exit 1 ;;
  "service uninstall") echo "nothing to remove" ;;
  "down "*) echo "Vampire is not running" ;;
  *) echo "unexpected arguments: $*" >&2; exit 2 ;;
esac
"""

MANAGER_STUB = """\
#!/bin/sh
echo "$(basename "$0") $*" >> "$HOME/manager-calls.log"
echo "Failed to connect to bus: No medium found" >&2
exit 1
"""


def _platform() -> tuple[str, str]:
    os_name = "darwin" if sys.platform == "darwin" else "linux"
    machine = platform.machine().lower()
    arch = {"amd64": "x86_64", "aarch64": "arm64"}.get(machine, machine)
    return os_name, arch


def _asset(version: str) -> str:
    os_name, arch = _platform()
    return f"vampire-{version}-{os_name}-{arch}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class Release:
    root: Path
    url: str

    def publish(self, *versions: str, tamper: bool = False) -> None:
        """Write the stand-in assets for `versions` and a SHA256SUMS listing them (wrong sums if tamper)."""
        lines = []
        for version in versions:
            data = STAND_IN.replace("@VERSION@", version).encode()
            (self.root / _asset(version)).write_bytes(data)
            digest = _sha256(data + b"tampered" if tamper else data)
            lines.append(f"{digest}  {_asset(version)}\n")
        (self.root / "SHA256SUMS").write_text("".join(lines))


@pytest.fixture
def release(tmp_path: Path) -> Iterator[Release]:
    root = tmp_path / "release"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Release(root, f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    return home


@pytest.fixture
def stubs(tmp_path: Path) -> Path:
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name in ("systemctl", "launchctl"):
        stub = stubs / name
        stub.write_text(MANAGER_STUB)
        stub.chmod(0o755)
    return stubs


def run_install(
    home: Path, stubs: Path, release: Release, *args: str, version: str | None = "0.1.0", **env: str
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "VAMPIRE_", "DBUS_"))}
    path = [p for p in base.get("PATH", "/usr/bin:/bin").split(os.pathsep) if p and ".local/bin" not in p]
    base.update(HOME=str(home), PATH=os.pathsep.join([str(stubs), *path]), VAMPIRE_DOWNLOAD_URL=release.url)
    if version is not None:
        base["VAMPIRE_VERSION"] = version
    base.update(env)
    return subprocess.run(
        ["bash", str(INSTALL_SH), *args],
        env=base,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def installed_version(home: Path) -> str:
    out = subprocess.run(
        [str(home / ".local" / "bin" / "vampire"), "version"],
        capture_output=True,
        text=True,
        timeout=10,
        env={**os.environ, "HOME": str(home)},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def calls(home: Path) -> list[str]:
    log = home / "vampire-calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_fresh_install_without_service_manager(home: Path, stubs: Path, release: Release) -> None:
    release.publish("0.1.0")
    result = run_install(home, stubs, release)
    assert result.returncode == 0, result.stderr
    binary = home / ".local" / "bin" / "vampire"
    assert binary.is_file() and os.access(binary, os.X_OK)
    assert installed_version(home) == "vampire 0.1.0"
    assert "SHA-256 verified" in result.stdout
    assert "is not on your PATH" in result.stdout
    assert "the background service was not started" in result.stdout
    assert "vampire up" in result.stdout
    assert "service install" in calls(home)
    assert not list(binary.parent.glob(".vampire.new.*"))


def test_tampered_checksum_installs_nothing(home: Path, stubs: Path, release: Release) -> None:
    release.publish("0.1.0", tamper=True)
    result = run_install(home, stubs, release)
    assert result.returncode != 0
    assert "SHA-256 mismatch" in result.stderr
    assert "nothing was installed" in result.stderr
    assert not (home / ".local" / "bin").exists()
    assert calls(home) == []


def test_unpublished_version_is_a_clear_error(home: Path, stubs: Path, release: Release) -> None:
    release.publish("0.1.0")
    result = run_install(home, stubs, release, version="9.9.9")
    assert result.returncode != 0
    assert f"SHA256SUMS lists no {_asset('9.9.9')}" in result.stderr
    assert not (home / ".local" / "bin" / "vampire").exists()


def test_rerun_with_new_version_upgrades_in_place(home: Path, stubs: Path, release: Release) -> None:
    release.publish("0.1.0", "0.2.0")
    assert run_install(home, stubs, release, version="0.1.0").returncode == 0
    binary = home / ".local" / "bin" / "vampire"
    first_inode = binary.stat().st_ino
    result = run_install(home, stubs, release, version="0.2.0")
    assert result.returncode == 0, result.stderr
    assert installed_version(home) == "vampire 0.2.0"
    # A new inode means the file was renamed into place, not rewritten under a running process.
    assert binary.stat().st_ino != first_inode
    assert sorted(p.name for p in binary.parent.iterdir()) == ["vampire"]


def test_latest_release_is_found_from_sha256sums(home: Path, stubs: Path, release: Release) -> None:
    release.publish("0.3.1")
    result = run_install(home, stubs, release, version=None)
    assert result.returncode == 0, result.stderr
    assert installed_version(home) == "vampire 0.3.1"


def test_no_service_skips_the_service_step(home: Path, stubs: Path, release: Release) -> None:
    release.publish("0.1.0")
    result = run_install(home, stubs, release, VAMPIRE_NO_SERVICE="1")
    assert result.returncode == 0, result.stderr
    assert "VAMPIRE_NO_SERVICE=1" in result.stdout
    assert "service install" not in calls(home)


def test_uninstall_removes_binary_and_service_but_keeps_data(
    home: Path, stubs: Path, release: Release
) -> None:
    release.publish("0.1.0")
    assert run_install(home, stubs, release).returncode == 0
    unit = home / ".config" / "systemd" / "user" / "vampire.service"
    unit.parent.mkdir(parents=True)
    unit.write_text("[Service]\nExecStart=/bin/true\n")
    data = home / ".local" / "share" / "vampire"
    data.mkdir(parents=True)
    (data / "vampire.db").write_text("state")

    result = run_install(home, stubs, release, "--uninstall")
    assert result.returncode == 0, result.stderr
    assert not (home / ".local" / "bin" / "vampire").exists()
    assert not unit.exists()
    assert "service uninstall" in calls(home)
    assert (data / "vampire.db").exists()
    assert "Vampire is uninstalled" in result.stdout


def test_purge_removes_data_and_config(home: Path, stubs: Path, release: Release) -> None:
    release.publish("0.1.0")
    assert run_install(home, stubs, release).returncode == 0
    data = home / ".local" / "share" / "vampire"
    config = home / ".config" / "vampire"
    for d in (data, config):
        d.mkdir(parents=True)
        (d / "file").write_text("x")

    result = run_install(home, stubs, release, "--purge")
    assert result.returncode == 0, result.stderr
    assert not (home / ".local" / "bin" / "vampire").exists()
    assert not data.exists()
    assert not config.exists()


def test_uninstall_when_nothing_is_installed_succeeds(home: Path, stubs: Path, release: Release) -> None:
    result = run_install(home, stubs, release, "--uninstall")
    assert result.returncode == 0, result.stderr
    assert "no Vampire binary" in result.stdout


def test_bad_option_is_usage_error(home: Path, stubs: Path, release: Release) -> None:
    result = run_install(home, stubs, release, "--frobnicate")
    assert result.returncode == 2
    assert "Usage:" in result.stderr


def test_install_sh_passes_shellcheck() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian package `shellcheck`)")
    result = subprocess.run(["shellcheck", str(INSTALL_SH)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout
