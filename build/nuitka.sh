#!/usr/bin/env bash
# Nuitka alternative to build/vampire.spec: compiles vampire.py to C and links one self-contained file.
#   bash build/nuitka.sh            -> dist/vampire (DIST_DIR overrides dist)
# Needs a C compiler and patchelf (Linux); compilation takes minutes on a small machine.
set -euo pipefail
cd "$(dirname "$0")/.."

# The same run-time imports the PyInstaller spec lists, for the same reason: uvicorn resolves its loop,
# protocol and lifespan classes from strings, anyio and platformdirs pick modules by name.
includes=(
    uvicorn.logging
    uvicorn.loops.auto uvicorn.loops.asyncio uvicorn.loops.uvloop
    uvicorn.protocols.http.auto uvicorn.protocols.http.h11_impl uvicorn.protocols.http.httptools_impl
    uvicorn.protocols.websockets.auto
    uvicorn.lifespan.on uvicorn.lifespan.off
    anyio._backends._asyncio
    platformdirs.unix platformdirs.macos platformdirs.windows
)
excludes=(
    tkinter turtle idlelib lib2to3 pydoc_data ensurepip venv test unittest doctest
    pytest _pytest hypothesis setuptools pkg_resources pip IPython numpy
    websockets wsproto watchfiles dotenv yaml
)

# --assume-yes-for-downloads: Nuitka may fetch a helper tool on some platforms and must not stop to ask.
args=(--onefile "--output-dir=${DIST_DIR:-dist}" --output-filename=vampire --remove-output --assume-yes-for-downloads)
for module in "${includes[@]}"; do
    args+=("--include-module=$module")
done
for module in "${excludes[@]}"; do
    args+=("--nofollow-import-to=$module")
done
jobs="${NUITKA_JOBS:-$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)}"
args+=("--jobs=$jobs")

python -m nuitka "${args[@]}" vampire.py
