#!/usr/bin/env bash
# Vampire installer for Linux and macOS, no root needed:
#
#   curl -fsSL https://github.com/vampire-gateway/vampire/releases/latest/download/install.sh | bash
#   bash install.sh [--uninstall] [--purge]
#
# Environment:
#   VAMPIRE_VERSION        version to install (e.g. 0.1.0); unset: the latest release
#   VAMPIRE_DOWNLOAD_URL   where the release assets and SHA256SUMS are (a mirror, or a local test server)
#   VAMPIRE_INSTALL_DIR    where the binary goes (default ~/.local/bin)
#   VAMPIRE_NO_SERVICE=1   do not install the per-user background service
#
# Everything runs inside main(), called on the last line, so a download cut short runs nothing.

set -euo pipefail

RELEASES="https://github.com/vampire-gateway/vampire/releases"

say() { printf '%s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

usage() {
    cat <<'EOF'
Usage: install.sh [--uninstall] [--purge] [--help]

  (no option)   download the Vampire binary for this machine, verify its SHA-256,
                install it to ~/.local/bin/vampire (an upgrade if already there)
                and register the per-user background service
  --uninstall   remove the service and the binary
  --purge       --uninstall, and also delete Vampire's data and configuration
EOF
}

detect_os() {
    case "$(uname -s)" in
        Linux) echo linux ;;
        Darwin) echo darwin ;;
        MINGW* | MSYS* | CYGWIN*) die "on Windows, use install.ps1 in PowerShell: irm $RELEASES/latest/download/install.ps1 | iex" ;;
        *) die "unsupported operating system: $(uname -s) (Vampire ships binaries for Linux, macOS and Windows)" ;;
    esac
}

detect_arch() {
    local machine
    machine="$(uname -m)"
    # A shell under Rosetta reports x86_64 on Apple silicon; the native binary is the better choice.
    if [ "$machine" = x86_64 ] && [ "$(sysctl -n sysctl.proc_translated 2>/dev/null || echo 0)" = 1 ]; then
        machine=arm64
    fi
    case "$machine" in
        x86_64 | amd64) echo x86_64 ;;
        aarch64 | arm64) echo arm64 ;;
        *) die "unsupported CPU architecture: $machine (binaries exist for x86_64 and arm64)" ;;
    esac
}

download() { # url dest
    if command -v curl >/dev/null 2>&1; then
        curl -fsSL --retry 3 --connect-timeout 15 -o "$2" "$1"
    elif command -v wget >/dev/null 2>&1; then
        wget -q -O "$2" "$1"
    else
        die "neither curl nor wget is installed"
    fi
}

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | awk '{print $1}'
    elif command -v shasum >/dev/null 2>&1; then
        shasum -a 256 "$1" | awk '{print $1}'
    else
        die "neither sha256sum nor shasum is installed: cannot verify the download"
    fi
}

on_path() {
    case ":$PATH:" in
        *":$1:"*) return 0 ;;
        *) return 1 ;;
    esac
}

service_files() {
    printf '%s\n' "$HOME/.config/systemd/user/vampire.service" "$HOME/Library/LaunchAgents/dev.vampire.gateway.plist"
}

# The binary removes its own service; this catches a service left behind by a missing or broken binary.
remove_service_leftovers() {
    local file
    while IFS= read -r file; do
        [ -e "$file" ] || continue
        case "$file" in
            *.service)
                systemctl --user disable --now vampire.service >/dev/null 2>&1 || true
                rm -f "$file"
                systemctl --user daemon-reload >/dev/null 2>&1 || true
                ;;
            *.plist)
                launchctl bootout "gui/$(id -u)/dev.vampire.gateway" >/dev/null 2>&1 || true
                rm -f "$file"
                ;;
        esac
        say "removed $file"
    done < <(service_files)
}

uninstall() { # purge(0|1)
    local bin="$1/vampire"
    if [ -x "$bin" ]; then
        "$bin" service uninstall </dev/null || warn "'vampire service uninstall' failed; removing what is left"
        "$bin" down </dev/null >/dev/null 2>&1 || true
    fi
    remove_service_leftovers
    if [ -e "$bin" ]; then
        rm -f "$bin"
        say "removed $bin"
    else
        say "no Vampire binary at $bin"
    fi
    if [ "$2" = 1 ]; then
        local dir
        for dir in \
            "${XDG_DATA_HOME:-$HOME/.local/share}/vampire" \
            "${XDG_CONFIG_HOME:-$HOME/.config}/vampire" \
            "${XDG_CACHE_HOME:-$HOME/.cache}/vampire" \
            "$HOME/Library/Application Support/vampire" \
            "$HOME/Library/Caches/vampire" \
            "$HOME/Library/Logs/vampire"; do
            if [ -e "$dir" ]; then
                rm -rf "$dir"
                say "removed $dir"
            fi
        done
    fi
    say "Vampire is uninstalled."
}

install_binary() { # bin_dir
    local bin_dir="$1" os arch version base tmp asset expected actual
    os="$(detect_os)"
    arch="$(detect_arch)"
    version="${VAMPIRE_VERSION:-}"
    version="${version#v}"
    if [ -n "$version" ]; then
        base="${VAMPIRE_DOWNLOAD_URL:-$RELEASES/download/v$version}"
    else
        base="${VAMPIRE_DOWNLOAD_URL:-$RELEASES/latest/download}"
    fi
    base="${base%/}"

    tmp="$(mktemp -d "${TMPDIR:-/tmp}/vampire-install.XXXXXX")"
    # shellcheck disable=SC2064  # expand now: $tmp is local and gone when the trap fires
    trap "rm -rf '$tmp'" EXIT

    say "Downloading SHA256SUMS from $base ..."
    download "$base/SHA256SUMS" "$tmp/SHA256SUMS" || die "could not download $base/SHA256SUMS"
    if [ -n "$version" ]; then
        asset="vampire-$version-$os-$arch"
    else
        # The latest release's version is only known from its asset names.
        asset="$(awk -v suffix="-$os-$arch" '{name = $2; sub(/^\*/, "", name)} name ~ /^vampire-/ && substr(name, length(name) - length(suffix) + 1) == suffix {print name; exit}' "$tmp/SHA256SUMS")"
        [ -n "$asset" ] || die "the latest release has no binary for $os-$arch"
        version="${asset#vampire-}"
        version="${version%-"$os"-"$arch"}"
    fi
    expected="$(awk -v name="$asset" '$2 == name || $2 == "*" name {print $1; exit}' "$tmp/SHA256SUMS")"
    [ -n "$expected" ] || die "SHA256SUMS lists no $asset: is version $version published for $os-$arch?"

    say "Downloading $asset ..."
    download "$base/$asset" "$tmp/$asset" || die "could not download $base/$asset"
    actual="$(sha256_of "$tmp/$asset")"
    if [ "$actual" != "$expected" ]; then
        die "SHA-256 mismatch for $asset: expected $expected, got $actual. The download is corrupt or was tampered with; nothing was installed."
    fi
    say "SHA-256 verified."

    chmod 755 "$tmp/$asset"
    mkdir -p "$bin_dir"
    # Copy next to the target, then rename: the swap is atomic, so a running old binary keeps working
    # and a re-run upgrades in place.
    cp "$tmp/$asset" "$bin_dir/.vampire.new.$$"
    mv -f "$bin_dir/.vampire.new.$$" "$bin_dir/vampire"
    if [ "$os" = darwin ]; then
        xattr -d com.apple.quarantine "$bin_dir/vampire" >/dev/null 2>&1 || true
    fi
    local reported
    reported="$("$bin_dir/vampire" version </dev/null 2>&1)" || die "the installed binary does not run: $reported"
    say "Installed $bin_dir/vampire ($reported)."
}

path_advice() { # bin_dir
    on_path "$1" && return 0
    say ""
    say "$1 is not on your PATH. Add it, then open a new terminal:"
    say "  echo 'export PATH=\"$1:\$PATH\"' >> ~/.bashrc   # bash"
    say "  echo 'export PATH=\"$1:\$PATH\"' >> ~/.zshrc    # zsh"
}

install_service() { # bin_dir
    local cmd=vampire
    on_path "$1" || cmd="$1/vampire"
    say ""
    if [ "${VAMPIRE_NO_SERVICE:-0}" = 1 ]; then
        say "VAMPIRE_NO_SERVICE=1: the background service was not installed. Start Vampire with: $cmd up"
        return 0
    fi
    say "Registering the per-user background service ..."
    if "$1/vampire" service install </dev/null; then
        say "Vampire runs in the background at http://127.0.0.1:7777 (dashboard) and http://127.0.0.1:7777/v1 (API)."
    else
        say ""
        say "NOTICE: the background service was not started: no per-user service manager is running here"
        say "(a container, CI, or a machine without a login session). Vampire itself is installed."
        say "Start it when you need it:  $cmd up      (stop it with: $cmd down)"
        say "or in the foreground:       $cmd serve"
    fi
}

main() {
    local mode=install purge=0 bin_dir
    while [ $# -gt 0 ]; do
        case "$1" in
            --uninstall) mode=uninstall ;;
            --purge)
                mode=uninstall
                purge=1
                ;;
            -h | --help)
                usage
                return 0
                ;;
            *)
                usage >&2
                exit 2
                ;;
        esac
        shift
    done
    [ -n "${HOME:-}" ] || die "HOME is not set"
    bin_dir="${VAMPIRE_INSTALL_DIR:-$HOME/.local/bin}"
    if [ "$mode" = uninstall ]; then
        uninstall "$bin_dir" "$purge"
        return 0
    fi
    install_binary "$bin_dir"
    path_advice "$bin_dir"
    install_service "$bin_dir"
}

main "$@"
