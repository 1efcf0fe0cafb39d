"""What the launcher path costs: the same `qtune train` command as one plain process, under
`torchrun --nproc_per_node 1` (accelerate's DDP path with one rank) and under torchrun with N
processes splitting the global batch. Same data, same global batch, one run, side by side.

On a CPU the processes share the cores (each gets cores / processes threads), so N processes are not
expected to be faster: this shows what the path costs, not a speed-up. On a machine with N GPUs the
same script measures the scaling (`--device auto` gives each process its own GPU).

    python -m bench.launcher --data ../shared/data/afqmc/train.csv --rows 512 --processes 2 \\
        --output bench/results/launcher_cpu.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import default_model, environment, figure, headline_row, write_report


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="pairs CSV (sentence1,sentence2,label), e.g. AFQMC train.csv")
    parser.add_argument("--model", default=None, help="encoder (default: the offline all-MiniLM-L6-v2)")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16, help="global batch")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default="bench/results/launcher.json")
    args = parser.parse_args()
    if args.batch_size % args.processes:
        raise SystemExit("--batch-size must be a multiple of --processes")
    model = args.model or default_model()
    work = Path(tempfile.mkdtemp(prefix="qtune-launcher-"))
    with open(args.data, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:args.rows]
    train = work / "train.csv"
    with open(train, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["sentence1", "sentence2", "label"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    cores = os.cpu_count() or 1
    sides = [("plain process", 0), ("torchrun, 1 process", 1), (f"torchrun, {args.processes} processes",
                                                                  args.processes)]
    results = []
    for name, nproc in sides:
        out = work / f"run{nproc}"
        per_device = args.batch_size // max(1, nproc)
        command = ["-m", "qtune.cli", "train", "pair-cls", "--model", model, "--train", str(train), "--output",
                   str(out), "--full", "--lr", "2e-5", "--epochs", "1", "--batch-size", str(per_device),
                   "--max-length", str(args.max_length), "--device", args.device, "--seed", "1"]
        launcher = [sys.executable] if not nproc else [sys.executable, "-m", "torch.distributed.run",
                                                        "--nproc_per_node", str(nproc), "--master_port",
                                                        str(free_port())]
        threads = max(1, cores // max(1, nproc)) if args.device == "cpu" else None
        env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        started = time.perf_counter()
        done = subprocess.run(launcher + command, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode:
            raise SystemExit(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        train_stats = json.loads((out / "metrics.json").read_text())["train"]
        results.append({"side": name, "processes": max(1, nproc), "threads_per_process": threads,
                        "wall_seconds": round(wall, 2), "train_seconds": train_stats["seconds"],
                        "samples_per_s": train_stats["samples_per_s"], "steps": train_stats["steps"]})
        print(f"{name}: {wall:.1f} s wall, {train_stats['seconds']:.1f} s training, "
              f"{train_stats['samples_per_s']} samples/s", flush=True)
    base = results[0]["samples_per_s"]
    for r in results:
        r["samples_per_s_vs_plain"] = round(r["samples_per_s"] / base, 3) if base else None
    print(f"\n{'side':<26} {'wall s':>8} {'train s':>8} {'samples/s':>10} {'vs plain':>9}")
    for r in results:
        print(f"{r['side']:<26} {r['wall_seconds']:>8.1f} {r['train_seconds']:>8.1f} {r['samples_per_s']:>10.1f} "
              f"{r['samples_per_s_vs_plain']:>8.2f}x")
    write_report(args.output, {"benchmark": "qtune train pair-cls: plain process vs torchrun (accelerate DDP)",
                               "model": model, "rows": len(rows), "global_batch": args.batch_size,
                               "max_length": args.max_length, "device": args.device, "cores": cores,
                               "results": results, "environment": environment()})


def headline(report: dict) -> list[dict]:
    """The README table's rows: what running under torchrun costs against one plain process (on a
    CPU the processes share the cores, so this is a cost, not a speed-up)."""
    plain, *launched = report["results"]
    return [headline_row(f"`qtune train pair-cls` under {r['side']}, global batch {report['global_batch']}",
                         f"{figure(r['samples_per_s'])} samples/s", f"plain process: {figure(plain['samples_per_s'])}",
                         r["samples_per_s"] / plain["samples_per_s"]) for r in launched]


if __name__ == "__main__":
    main()
