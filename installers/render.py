"""Write the service templates embedded in Vampire out into this folder, or check they are current.

    python installers/render.py          # (re)write installers/*.in
    python installers/render.py --check  # exit 1 if a file differs from the embedded template

The templates live in the code as string constants because the product is one file that may be frozen;
the copies here are for reading and for packagers, and are never loaded at run time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from vampire import render_templates  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report files that differ")
    args = parser.parse_args(argv)
    stale = []
    for name, content in render_templates().items():
        path = HERE / name
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == content:
            continue
        stale.append(name)
        if not args.check:
            path.write_text(content, encoding="utf-8")
            print(f"wrote {path}")
    if args.check and stale:
        print(f"out of date: {', '.join(stale)} (run python installers/render.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
