"""Cluster simulation: does `auto` keep models hot where `round_robin` thrashes them?

Three emulated LM Studio nodes, each with the same three models downloaded but none loaded, a 2 s JIT load,
auto-evict on (so at most one JIT model stays resident per node) and 4 parallel slots. The same mixed
workload over the three models runs through a fresh gateway with strategy `auto`, then `round_robin`, in
one run. Prints per strategy: model loads triggered (and the most per model per node), p50/p95 latency and
errors. Everything binds 127.0.0.1; the run is bounded in requests and time.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import vampire

MODELS = ("qwen/qwen3-4b", "google/gemma-3-4b", "mistralai/ministral-3b")


async def start_gateway(urls: list[str], data_dir: Path) -> tuple[uvicorn.Server, asyncio.Task[None], str]:
    settings = vampire.Settings.load(env={}, config_file=data_dir / "none.toml")
    settings.data_dir, settings.nodes, settings.discover_local, settings.refresh_s = (
        data_dir,
        urls,
        False,
        1.0,
    )
    config = uvicorn.Config(
        vampire.App(settings), host="127.0.0.1", port=0, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    return server, task, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


async def run(
    strategy: str, requests: int, concurrency: int, seed: int, load_delay: float
) -> dict[str, object]:
    nodes = [
        vampire.MockNode(
            [vampire.MockModel(m, parallel=4) for m in MODELS],
            load_delay=load_delay,
            tps=200,
            completion_tokens=8,
            auto_evict=True,
            seed=i,
        )
        for i in range(3)
    ]
    urls = [await n.start("127.0.0.1", 0) for n in nodes]
    with tempfile.TemporaryDirectory() as tmp:
        server, task, base = await start_gateway(urls, Path(tmp))
        rng = random.Random(seed)
        # A skewed mix, as in real use: one popular model, two less so.
        workload = rng.choices(MODELS, weights=(5, 3, 2), k=requests)
        latencies: list[float] = []
        errors = 0
        gate = asyncio.Semaphore(concurrency)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:

            async def one(i: int, model: str) -> None:
                nonlocal errors
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": f"question {i}"}],
                    "vampire": {"strategy": strategy},
                }
                async with gate:
                    started = time.perf_counter()
                    try:
                        async with http.post(f"{base}/v1/chat/completions", json=body) as resp:
                            await resp.read()
                            ok = resp.status == 200
                    except aiohttp.ClientError:
                        ok = False
                    latencies.append(time.perf_counter() - started)
                    errors += not ok

            await asyncio.gather(*(one(i, m) for i, m in enumerate(workload)))
        server.should_exit = True
        await task
    if "--verbose" in sys.argv:
        print(strategy, [n.stats.load_log for n in nodes])
    loads_per_pair = Counter((i, m) for i, n in enumerate(nodes) for m in n.stats.load_log)
    for n in nodes:
        await n.stop()
    latencies.sort()
    return {
        "strategy": strategy,
        "loads": sum(n.stats.loads for n in nodes),
        "max_loads_per_model_node": max(loads_per_pair.values(), default=0),
        "p50": statistics.median(latencies),
        "p95": latencies[int(0.95 * (len(latencies) - 1))],
        "errors": errors,
    }


async def main_async(args: argparse.Namespace) -> None:
    results = [
        await run(s, args.requests, args.concurrency, args.seed, args.load_delay)
        for s in ("auto", "round_robin")
    ]
    print(f"{'strategy':12} {'loads':>6} {'max/model/node':>15} {'p50 ms':>9} {'p95 ms':>9} {'errors':>7}")
    for r in results:
        print(
            f"{r['strategy']:12} {r['loads']:>6} {r['max_loads_per_model_node']:>15} {r['p50'] * 1000:>9.1f} "
            f"{r['p95'] * 1000:>9.1f} {r['errors']:>7}"
        )
    auto, rr = results
    ratio = rr["p95"] / auto["p95"]  # type: ignore[operator]
    print(
        f"p95 round_robin / auto = {ratio:.1f}x (target >= 3x); "
        f"auto loads at most {auto['max_loads_per_model_node']} time(s) per model per node (target <= 1)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=240)
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--load-delay", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--verbose", action="store_true", help="print each node's load log")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
