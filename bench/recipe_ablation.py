"""The embedding recipe, step by step, on the documented financial-QA split: what each step buys.

Each row is one `qtune train embedding` run (1 epoch, all-MiniLM-L6-v2 unless --model) followed by
`qtune eval retrieval` on the 700 held-out questions against all passages; the table puts nDCG@10,
MRR@10 and Recall@100 of every row next to the base model and sentence-transformers'
MultipleNegativesRankingLoss figure on exactly this split (../shared/data/README.md).

The commands are the CLI's own, run as subprocesses, so the table is what a user typing them gets.
A row whose metrics are already in --work is not run again (stop and rerun to continue).

    python -m bench.recipe_ablation --data ../shared/data/financial_qa_10k/Financial-QA-10k.csv \\
        --work runs/recipe --rows in-batch mined mined+symmetric --output bench/results/recipe_ablation_cpu.json

Rows (cumulative where the name says so):
  in-batch          --full --lr 2e-5 --hard-negatives 0 (sentence-transformers MNRL's recipe)
  in-batch+symmetric   ... --symmetric
  in-batch+lr5e-5   ... --lr 5e-5 (and +lr1e-4, +lr2e-4)
  in-batch+lr1e-4+seed7   ... --lr 1e-4 --seed 7: how far two seeds of one recipe differ
  in-batch+lr1e-4+improved  ... --lr 1e-4 --improved-contrastive (GTE's query-query / passage-passage negatives)
  in-batch+lr1e-4+temp0.02  ... --lr 1e-4 --temperature 0.02 (BGE's; the default 0.05 is MNRL's scale 20)
  mined             --full --lr 2e-5, 1 negative mined by the base model per query
  mined+symmetric   ... --symmetric
  mined+lr1e-4      ... --lr 1e-4
  mined3            --full --lr 2e-5, 3 mined negatives
  lora-default      the former LoRA defaults (--no-full: r 8 on attention, lr 2e-4) with 1 mined negative
  teacher-mined+lr1e-4      1 negative mined by --teacher (a tuned embedder: harder negatives), lr 1e-4
  teacher-distilled+lr1e-4  ... + --distill on the teacher's cosine scores (temperature 0.05)
  rescored / distilled: need a reranker (--reranker R): negatives rescored by R, then --distill on R's scores
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from bench.common import default_model, environment, qtune_command, timed_command, write_report

# sentence-transformers MNRL, 1 epoch, batch 64, lr 2e-5, no-duplicates sampler (../shared/data/README.md)
REFERENCE = {"ndcg@10": 0.810, "mrr@10": 0.779, "recall@100": 0.993}
BASE_REFERENCE = {"ndcg@10": 0.7485, "mrr@10": 0.713, "recall@100": 0.970}
# Every row spells out the settings it measures, so that a later change of a default does not change a row.
FULL = ["--full", "--lr", "2e-5"]
LR1E4 = ["--full", "--lr", "1e-4"]  # the best learning rate of the sweep
ROWS = {
    "in-batch": (FULL + ["--hard-negatives", "0"], "plain"),
    "in-batch+symmetric": (FULL + ["--hard-negatives", "0", "--symmetric"], "plain"),
    "in-batch+lr5e-5": (["--full", "--lr", "5e-5", "--hard-negatives", "0"], "plain"),
    "in-batch+lr1e-4": (LR1E4 + ["--hard-negatives", "0"], "plain"),
    "in-batch+lr2e-4": (["--full", "--lr", "2e-4", "--hard-negatives", "0"], "plain"),
    "in-batch+lr1e-4+seed7": (LR1E4 + ["--hard-negatives", "0", "--seed", "7"], "plain"),
    "in-batch+lr1e-4+improved": (LR1E4 + ["--hard-negatives", "0", "--improved-contrastive"], "plain"),
    "in-batch+lr1e-4+temp0.02": (LR1E4 + ["--hard-negatives", "0", "--temperature", "0.02"], "plain"),
    "mined+lr1e-4": (LR1E4 + ["--hard-negatives", "1"], "mined"),
    "mined": (FULL + ["--hard-negatives", "1"], "mined"),
    "mined+symmetric": (FULL + ["--hard-negatives", "1", "--symmetric"], "mined"),
    "mined3": (FULL + ["--hard-negatives", "3"], "mined"),
    "lora-default": (["--no-full", "--lr", "2e-4", "--hard-negatives", "1"], "mined"),
    "teacher-mined+lr1e-4": (LR1E4 + ["--hard-negatives", "1"], "teacher"),
    "teacher-distilled+lr1e-4": (LR1E4 + ["--hard-negatives", "1", "--distill", "--distill-temperature", "0.05"],
                                 "teacher"),
    "rescored": (FULL + ["--hard-negatives", "1"], "rescored"),
    "distilled": (FULL + ["--hard-negatives", "1", "--distill", "--distill-temperature", "0.05"], "rescored"),
}
METRICS = ("ndcg@10", "mrr@10", "recall@100")


def qtune(*args: str, log: Path) -> tuple[float, float]:
    """Run one qtune command (its output appended to `log`): the seconds it took and its peak
    resident memory in GB."""
    return timed_command(qtune_command(*args), log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="Financial-QA-10k.csv")
    parser.add_argument("--model", default=None, help="base embedder (default: the offline all-MiniLM-L6-v2)")
    parser.add_argument("--work", default="runs/recipe", help="folder for the split, mined files and runs")
    parser.add_argument("--rows", nargs="+", default=["in-batch", "mined"], choices=sorted(ROWS))
    parser.add_argument("--reranker", default=None, help="reranker for the rescored / distilled rows")
    parser.add_argument("--teacher", default=None, help="tuned embedder that mines the teacher-* rows' negatives "
                        "and scores (e.g. WORK/in-batch+lr1e-4/best)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--output", default="bench/results/recipe_ablation.json")
    args = parser.parse_args()
    model = args.model or default_model()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    split = work / "split"
    if not (split / "train.jsonl").exists():
        shutil.rmtree(split, ignore_errors=True)
        qtune("data", "retrieval-split", args.data, "--output", str(split), "--question-column", "question",
              "--passage-column", "context", "--test-fraction", "0.1", "--seed", "42", "--skip-empty", log=log)
    train = {"plain": split / "train.jsonl", "mined": work / "train.mined.jsonl",
             "rescored": work / "train.rescored.jsonl", "teacher": work / "train.teacher.jsonl"}
    seconds: dict[str, float] = {}
    for kind in sorted({ROWS[r][1] for r in args.rows} - {"plain"}):
        if train[kind].exists():
            continue
        extra, miner = [], model
        if kind == "teacher":
            if not args.teacher:
                raise SystemExit("the teacher-* rows need --teacher")
            miner = args.teacher
        if kind == "rescored":
            if not args.reranker:
                raise SystemExit("the rescored and distilled rows need --reranker")
            extra = ["--rescore-with", args.reranker]
        seconds[f"mine {kind}"] = qtune("mine", "--model", miner, "--queries", str(split / "train.jsonl"),
                                        "--corpus", str(split / "test" / "corpus.jsonl"), "--output",
                                        str(train[kind]), "--device", args.device, *extra, log=log)[0]

    base_metrics = work / "base" / "metrics.json"
    if not base_metrics.exists():
        seconds["eval base"] = qtune("eval", "retrieval", "--model", model, "--data", str(split / "test"),
                                     "--output", str(work / "base"), "--device", args.device, log=log)[0]
    results = {"base": _metrics(base_metrics)}
    peak_gb: dict[str, float] = {}  # training's peak resident memory, for the rows run now
    for row in args.rows:
        flags, kind = ROWS[row]
        run = work / row
        done = run / "eval" / "metrics.json"
        if not done.exists():
            seconds[f"train {row}"], peak_gb[row] = qtune(
                "train", "embedding", "--model", model, "--train", str(train[kind]), "--output", str(run),
                "--batch-size", str(args.batch_size), "--epochs", "1", "--min-steps", "0",  # its rows: one epoch
                "--device", args.device, *flags, log=log)
            seconds[f"eval {row}"] = qtune("eval", "retrieval", "--model", str(run / "best"), "--data",
                                           str(split / "test"), "--output", str(run / "eval"), "--device",
                                           args.device, log=log)[0]
        results[row] = _metrics(done)
        results[row]["flags"] = " ".join(flags) + ("" if kind == "plain" else f" (train: {kind} negatives)")
        peak = run / "metrics.json"
        if peak.exists():
            results[row]["train_seconds"] = json.loads(peak.read_text())["train"]["seconds"]
        if row in peak_gb:
            results[row]["train_peak_rss_gb"] = peak_gb[row]

    print(f"\n{'row':<22} {'nDCG@10':>8} {'MRR@10':>8} {'R@100':>8}  vs ST MNRL nDCG@10")
    print(f"{'ST MNRL (README)':<22} " + " ".join(f"{REFERENCE[m]:>8.4f}" for m in METRICS))
    for row, m in results.items():
        print(f"{row:<22} " + " ".join(f"{m[k]:>8.4f}" for k in METRICS)
              + f"  {m['ndcg@10'] / REFERENCE['ndcg@10']:.3f}x")
    report = {}
    if Path(args.output).exists():  # rows measured by earlier runs of this script are kept
        report = json.loads(Path(args.output).read_text())
    report.update({
        "benchmark": "financial_qa_10k embedding recipe ablation (1 epoch each)", "model": model,
        "split": "qtune data retrieval-split --test-fraction 0.1 --seed 42 --skip-empty",
        "reference_sentence_transformers_mnrl": {"base": BASE_REFERENCE, "tuned": REFERENCE},
        "rows": {**report.get("rows", {}), **results},
        "seconds": {**report.get("seconds", {}), **seconds}, "environment": environment()})
    write_report(args.output, report)


def _metrics(path: Path) -> dict:
    """nDCG@10, MRR@10, Recall@100 of the (first) model in an eval metrics.json."""
    metrics = next(iter(json.loads(path.read_text()).values()))  # {model name: {metric: value}}
    return {k: round(float(metrics[k]), 4) for k in METRICS}


if __name__ == "__main__":
    main()
