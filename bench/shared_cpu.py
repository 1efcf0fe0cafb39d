"""Fair to a shared machine: the same work run quiet and beside busy processes, for qtune and for
the peer a user would run instead, each in its own fresh process.

    python -m bench.shared_cpu --output bench/results/shared_cpu_cpu.json [--busy 2] [--seconds 20]

Workloads (all-MiniLM-L6-v2 by default):
- encode: 512 synthetic texts of ~60 words, qtune's `Embedder.embed` against
  `SentenceTransformer.encode`, batch 32;
- one-text: one short text per call (a served request's model call at concurrency 1), the same two;
- train-step: a forward + backward + AdamW step of the encoder on a (32, 128) batch; the qtune side
  imports qtune first, as every qtune command does, the peer side is the same PyTorch code as
  sentence-transformers' trainer runs it (PyTorch's own thread settings).

"loaded" runs beside `--busy` processes that spin a Python loop (each one core's worth of work). A
side's figure is the median of its runs; the two sides alternate (A B A B). The slowdown is quiet
rate / loaded rate: with N cores and `--busy` B other busy processes, an even share of the machine
gives about (N + B) / N.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SIDES = ("qtune", "peer")
WORKLOADS = ("encode", "one-text", "train-step")
WORDS = ("revenue margin quarter fiscal growth operating income segment customers cash flow debt "
         "interest expense company products services market share risk factors tax lease capital "
         "inventory supply chain demand pricing cloud data center employees dividends").split()


def texts(n: int = 512, words: int = 60) -> list[str]:
    import random

    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(words // 2, words * 3 // 2))) for _ in range(n)]


def child(workload: str, side: str, model: str, seconds: float) -> dict:
    """One timed run in this (fresh) process: units of work per second."""
    if side == "qtune":
        import qtune  # noqa: F401  (what every qtune command imports first)
    import torch

    if workload in ("encode", "one-text"):
        data = texts() if workload == "encode" else ["what was the operating margin in the fourth quarter"]
        if side == "qtune":
            from qtune.tasks import load_model
            from qtune.tasks.embedding.model import Embedder

            embedder = Embedder(load_model(model, task="embedding", device="cpu"))

            def work() -> int:
                embedder.embed(data, is_query=False, batch_size=32)
                return len(data)
        else:
            from sentence_transformers import SentenceTransformer

            st = SentenceTransformer(model, device="cpu")

            def work() -> int:
                st.encode(data, batch_size=32, show_progress_bar=False)
                return len(data)
        unit = "texts/s"
    else:
        from transformers import AutoModel

        torch.manual_seed(0)
        encoder = AutoModel.from_pretrained(model)
        ids = torch.randint(1000, 20000, (32, 128))
        optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-5)

        def work() -> int:
            encoder(input_ids=ids).last_hidden_state.mean(1).pow(2).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            return 1
        unit = "steps/s"
    work()  # warm-up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        done += work()
    elapsed = time.perf_counter() - started
    return {"rate": done / elapsed, "unit": unit, "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def run_child(workload: str, side: str, args, env: dict) -> dict:
    command = [sys.executable, "-m", "bench.shared_cpu", "--child", workload, side, "--model", args.model,
               "--seconds", str(args.seconds)]
    out = subprocess.run(command, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{workload}/{side} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="encoder folder (default: the offline all-MiniLM-L6-v2)")
    parser.add_argument("--busy", type=int, default=2, help="busy processes beside the loaded runs")
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per side and condition (alternating)")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--output", default=None)
    parser.add_argument("--child", nargs=2, metavar=("WORKLOAD", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from bench.common import default_model

        args.model = default_model()
    if args.child:
        print(json.dumps(child(*args.child, args.model, args.seconds)))
        return
    # The children get the caller's environment as it was: the report writer below imports qtune,
    # which sets its own OpenMP policy in this process, and the peer must not inherit it.
    env = dict(os.environ)
    rows: dict[str, dict] = {}
    for workload in args.workloads:
        for condition in ("quiet", "loaded"):
            busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)
                    ] if condition == "loaded" else []
            try:
                runs: dict[str, list[dict]] = {side: [] for side in SIDES}
                for _ in range(args.repeats):
                    for side in SIDES:
                        runs[side].append(run_child(workload, side, args, env))
                        print(f"{workload:<10} {condition:<6} {side:<5} {runs[side][-1]['rate']:8.3f} "
                              f"{runs[side][-1]['unit']}", flush=True)
            finally:
                for process in busy:
                    process.kill()
                    process.wait()
            for side in SIDES:
                row = rows.setdefault(f"{workload} {side}", {"unit": runs[side][0]["unit"],
                                                             "omp_wait_policy": runs[side][0]["omp_wait_policy"],
                                                             "threads": runs[side][0]["threads"]})
                row[condition] = round(statistics.median(r["rate"] for r in runs[side]), 3)
                row[f"{condition} runs"] = [round(r["rate"], 3) for r in runs[side]]
    for row in rows.values():
        row["slowdown loaded"] = round(row["quiet"] / row["loaded"], 2)
    even_share = round((os.cpu_count() + args.busy) / os.cpu_count(), 2)
    print(f"\n{'row':<22} {'quiet':>9} {'loaded':>9} {'slowdown':>9}   (an even share: {even_share}x)")
    for name, row in rows.items():
        print(f"{name:<22} {row['quiet']:>9.3f} {row['loaded']:>9.3f} {row['slowdown loaded']:>8.2f}x  {row['unit']}")
    if args.output:
        from bench.common import environment, write_report

        write_report(args.output, {"benchmark": "shared CPU: quiet vs beside busy processes",
                                   "model": args.model, "busy_processes": args.busy,
                                   "seconds_per_run": args.seconds, "even_share_slowdown": even_share,
                                   "environment": environment(), "rows": rows})



def headline(report: dict) -> list[dict]:
    """The README table's rows: each workload's slowdown beside busy processes (quiet rate / loaded
    rate) for qtune and for the peer; the ratio is the peer's slowdown over qtune's."""
    from bench.common import figure, headline_row

    peers = {"encode": "sentence-transformers `encode`", "one-text": "sentence-transformers `encode`",
             "train-step": "PyTorch defaults"}
    work = {"encode": "encoding 512 texts", "one-text": "encoding one short text per call",
            "train-step": "a MiniLM training step"}
    out = []
    for workload in WORKLOADS:
        qtune, peer = report["rows"].get(f"{workload} qtune"), report["rows"].get(f"{workload} peer")
        if not (qtune and peer):
            continue
        out.append(headline_row(
            f"{work[workload]} beside {report['busy_processes']} busy process{'es' * (report['busy_processes'] != 1)}: "
            "slowdown loaded / quiet",
            f"{qtune['slowdown loaded']:.2f}x ({figure(qtune['quiet'])} -> {figure(qtune['loaded'])} {qtune['unit']})",
            f"{peers[workload]}: {peer['slowdown loaded']:.2f}x ({figure(peer['quiet'])} -> {figure(peer['loaded'])})",
            peer["slowdown loaded"] / qtune["slowdown loaded"]))
    return out


if __name__ == "__main__":
    main()
