"""The shape of the code: the table of contents matches the section banners, the emulator comes last,
and the tree is `ruff` clean (lint and format), so a reader finds a concept where its banner says."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import vampire

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "vampire.py"
BANNER = re.compile(r"^# ── (?P<title>[^:]+): (?P<text>.*?) ─+$")


def banners() -> list[str]:
    return [
        f"{m['title']}: {m['text']}" for line in SOURCE.read_text().splitlines() if (m := BANNER.match(line))
    ]


def table_of_contents() -> list[str]:
    doc = vampire.__doc__ or ""
    start = doc.index("\n\n", doc.index("Contents")) + 2
    return [line.strip() for line in doc[start:].strip().splitlines()]


def test_table_of_contents_lists_every_banner_in_order() -> None:
    assert banners() == table_of_contents()


def test_every_banner_is_a_real_section() -> None:
    # A banner that opens a section must not be followed at once by another banner (an empty section).
    lines = SOURCE.read_text().splitlines()
    opened = [i for i, line in enumerate(lines) if BANNER.match(line)]
    for here, after in zip(opened, [*opened[1:], len(lines)], strict=True):
        body = [line for line in lines[here + 1 : after] if line.strip()]
        assert len(body) > 3, lines[here]


def test_the_emulator_is_the_last_section() -> None:
    titles = [line.split(":")[0] for line in banners()]
    assert titles[-1] == "emulator"
    assert titles.index("policy") < titles.index("router") < titles.index("gateway")


def _ruff() -> list[str]:
    if shutil.which("ruff"):
        return ["ruff"]
    pytest.skip("ruff is not installed (it comes with the test extra: pip install -e '.[test]')")


def test_ruff_check_is_clean() -> None:
    result = subprocess.run([*_ruff(), "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean() -> None:
    result = subprocess.run([*_ruff(), "format", "--check", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_module_runs_as_a_script() -> None:
    result = subprocess.run([sys.executable, str(SOURCE), "version"], capture_output=True, text=True)
    assert result.returncode == 0 and vampire.__version__ in result.stdout
