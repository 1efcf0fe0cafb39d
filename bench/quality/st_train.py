"""The peer: sentence-transformers' own training of an embedder on a query-group file, as a user of
sentence-transformers would write it (SentenceTransformerTrainer, MultipleNegativesRankingLoss or
CachedMultipleNegativesRankingLoss, the no-duplicates batch sampler, linear schedule with 10% warmup).

    python -m bench.quality.st_train --model M --train train.jsonl --output DIR --lr 1e-4 --seed 42

Each (query, first positive) of the file is one training pair; mined negatives are used only with
--negatives N (the first N of each 'neg' list, as more columns; rows with fewer are left out). Writes the model to DIR and DIR/st_train.json with the
seconds `trainer.train()` took.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--train", required=True, help="FlagEmbedding JSONL (query, pos, neg)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=0, help="train this many optimizer steps (more epochs "
                        "than --epochs when needed); 0: --epochs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--negatives", type=int, default=0, help="mined negatives per pair from the file's "
                        "'neg' lists (0: in-batch negatives only)")
    parser.add_argument("--cached", type=int, default=0, help="CachedMNRL with this mini-batch size (0: plain MNRL)")
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu or cuda[:N]; bf16 "
                        "mixed precision on a GPU that supports it, as qtune's --precision auto")
    args = parser.parse_args()
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    on_gpu = device.startswith("cuda")

    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, losses
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.training_args import BatchSamplers
    from transformers import set_seed

    set_seed(args.seed)
    rows = [json.loads(line) for line in Path(args.train).read_text(encoding="utf-8").splitlines() if line.strip()]
    pairs = {"anchor": [r["query"] for r in rows], "positive": [r["pos"][0] for r in rows]}
    if args.negatives:  # (anchor, positive, negative_1..n) columns: MNRL adds them to the in-batch ones
        rows = [r for r in rows if len(r.get("neg", [])) >= args.negatives]
        pairs = {"anchor": [r["query"] for r in rows], "positive": [r["pos"][0] for r in rows]}
        for i in range(args.negatives):
            pairs[f"negative_{i + 1}"] = [r["neg"][i] for r in rows]
    model = SentenceTransformer(args.model, device=device)
    model.max_seq_length = args.max_length
    loss = (losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=args.cached) if args.cached
            else losses.MultipleNegativesRankingLoss(model))
    settings = SentenceTransformerTrainingArguments(
        output_dir=str(Path(args.output) / "checkpoints"), num_train_epochs=args.epochs, max_steps=args.max_steps or -1,
        per_device_train_batch_size=args.batch_size, learning_rate=args.lr, warmup_ratio=0.1, seed=args.seed,
        batch_sampler=BatchSamplers.NO_DUPLICATES, save_strategy="no", logging_steps=10, report_to="none",
        use_cpu=not on_gpu, bf16=on_gpu and torch.cuda.is_bf16_supported())
    trainer = SentenceTransformerTrainer(model=model, args=settings, train_dataset=Dataset.from_dict(pairs), loss=loss)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    model.save(args.output)
    (Path(args.output) / "st_train.json").write_text(json.dumps(
        {"seconds": round(seconds, 1), "steps": trainer.state.global_step, "pairs": len(rows)}) + "\n")


if __name__ == "__main__":
    main()
