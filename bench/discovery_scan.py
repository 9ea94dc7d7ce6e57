"""How long `vampire discover` takes to sweep a /24 on two ports where nothing listens.

Target (issue: node registry): under 3 s. Uses 127.0.0.0/24 — every 127.x address is this machine — and two
ports picked free, so every probe meets a closed port. Prints the figure; it is not a pass/fail test.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import vampire


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [int(s.getsockname()[1]) for s in sockets]
    for s in sockets:
        s.close()
    return ports


async def scan(subnet: str, ports: list[int], timeout: float) -> tuple[float, int, int]:
    probes = len(vampire.scan_targets([subnet], ports, allow_public=False))
    async with aiohttp.ClientSession() as http:
        started = time.perf_counter()
        found = await vampire.discover(http, [subnet], ports, timeout=timeout)
        return time.perf_counter() - started, probes, len(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subnet", default="127.0.0.0/24")
    parser.add_argument("--timeout", type=float, default=0.5, help="per-probe timeout (s)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    ports = free_ports(2)
    times = []
    for _ in range(args.runs):
        seconds, probes, found = asyncio.run(scan(args.subnet, ports, args.timeout))
        times.append(seconds)
    best, worst = min(times), max(times)
    verdict = "PASS" if worst < 3.0 else "MISS"
    print(
        f"discover {args.subnet} ports {ports}: {probes} probes, {found} found, "
        f"best {best:.3f} s, worst {worst:.3f} s over {args.runs} runs (target < 3 s: {verdict})"
    )


if __name__ == "__main__":
    main()
