"""Fair baselines in one harness: qtune's embedding recipes against sentence-transformers' training
at its best learning rate, on the same split, model, epochs and batch, with several seeds a row.

    python -m bench.quality --name financial_qa --train data/fin/train.jsonl --test data/fin/test \\
        --work runs/quality/fin --rows st-2e-5 st-5e-5 st-1e-4 st-2e-4 qtune --seeds 42 7 \\
        --output bench/results/quality_financial_qa_cpu.json

Every run is a subprocess (the CLI a user types, or `bench.quality.st_train` for the peer), timed
and measured (peak RSS from wait4); every model, qtune's and the peer's, is scored by the same
`qtune eval retrieval` on the test folder, which no run sees before it is scored. qtune's rows
choose best/ on their own dev split of the training file (its default); the peer trains on the
whole file and keeps its last weights, as its trainer does by default.

A qtune row counts as better than the peer only when its mean beats the best peer row's mean by
more than the larger seed spread (max - min) of the two. A (row, seed) already scored in --work is
not run again: stop and rerun to continue, or add rows and seeds later.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.common import default_model, environment, qtune_command, timed_command, write_report

METRICS = ("ndcg@10", "mrr@10", "recall@100")
# name -> (runner, its settings). Peer rows: the learning rate (and CachedMNRL's mini-batch, 0: plain
# MNRL). qtune rows: flags added to `qtune train embedding` (each row spells out what it measures).
ROWS = {
    "st-2e-5": ("st", {"lr": 2e-5}),
    "st-5e-5": ("st", {"lr": 5e-5}),
    "st-1e-4": ("st", {"lr": 1e-4}),
    "st-2e-4": ("st", {"lr": 2e-4}),
    "st-cached-1e-4": ("st", {"lr": 1e-4, "cached": 32}),
    "qtune": ("qtune", []),  # today's defaults (at least 200 optimizer steps since --min-steps 200)
    "qtune-1-epoch": ("qtune", ["--min-steps", "0"]),  # exactly --epochs: the defaults before --min-steps
    "qtune-no-dev": ("qtune", ["--dev-fraction", "0"]),
    "qtune-lr2e-4": ("qtune", ["--lr", "2e-4"]),
    "qtune-3-epochs": ("qtune", ["--epochs", "3"]),  # best/ by the dev split among the 3 epochs
    "qtune-min-100": ("qtune", ["--min-steps", "100"]),  # small data: more epochs up to 100 steps, best/ by dev
    "qtune-min-200": ("qtune", ["--min-steps", "200"]),  # the defaults since --min-steps 200, spelled out
    "qtune-avg-0.5": ("qtune", ["--average-from", "0.5"]),  # the weights averaged over the second half
    # a larger in-batch: 128 query groups a step (fits without GradCache here), 100 steps = the examples of 200 x 64
    "qtune-batch128-100": ("qtune", ["--batch-size", "128", "--min-steps", "100"]),
    "st-1e-4-100-steps": ("st", {"lr": 1e-4, "max_steps": 100}),  # the peer given the same 100 steps
    "st-1e-4-200-steps": ("st", {"lr": 1e-4, "max_steps": 200}),
    "qtune-hn1-percpos": ("qtune", ["--hard-negatives", "1"]),
    "qtune-hn3-percpos": ("qtune", ["--hard-negatives", "3"]),
    # a second round: the default row's tuned model (same seed) mines TopK-PercPos negatives, the base retrains
    "qtune-round2-hn1": ("qtune", ["--hard-negatives", "1"]),
    "qtune-round2-hn1-200": ("qtune", ["--hard-negatives", "1", "--min-steps", "200"]),  # the same, 200 steps
    # the same, its negatives mined by the 200-step model (`qtune-min-200`'s best/)
    "qtune-round2b-hn1-200": ("qtune", ["--hard-negatives", "1", "--min-steps", "200"]),
    # distillation: 3 negatives a query with a cross-encoder teacher's scores (TEACHER below), KL + InfoNCE;
    # the teacher's scores are probabilities (0..1): divided by 0.05, the student's InfoNCE temperature,
    # its softmax is as sharp as the student's
    "qtune-distill-hn3": ("qtune", ["--hard-negatives", "3", "--distill", "--distill-temperature", "0.05",
                                    "--min-steps", "100"]),
    # its control: the same file and steps without the KL term
    "qtune-hn3-distill-file": ("qtune", ["--hard-negatives", "3", "--min-steps", "100"]),
    "st-hn1-1e-4": ("st", {"lr": 1e-4, "negatives": 1}),
    # the peer given qtune-round2-hn1-200's training file (the tuned model's negatives) and steps
    "st-round2-hn1-200": ("st", {"lr": 1e-4, "negatives": 1, "max_steps": 200}),
    # the loss: GTE's improved contrastive (queries and passages negatives on both sides), symmetric InfoNCE
    "qtune-gte": ("qtune", ["--improved-contrastive"]),
    "qtune-symmetric": ("qtune", ["--symmetric"]),
    # the InfoNCE temperature (the default 0.05 is the peer's scale 20)
    "qtune-t0.02": ("qtune", ["--temperature", "0.02"]),
    "qtune-t0.03": ("qtune", ["--temperature", "0.03"]),
    "qtune-t0.1": ("qtune", ["--temperature", "0.1"]),
}
# Rows that train on mined negatives, and the `qtune mine` settings that mine them (once per work
# folder, by the base model, over the test folder's corpus: the passages a user's corpus holds).
# "percpos": NV-Retriever's TopK-PercPos, the top 30 candidates less any scoring above 95% of the
# query's positive, no absolute margin or score cap.
MINING = {"percpos": ["--range-min", "0", "--range-max", "30", "--margin", "off", "--max-score", "off",
                      "--relative-margin", "0.05", "--num-negatives", "7", "--sampling", "top"],
          # the base model's top 10 rescored by the teacher, the same rule on the teacher's scores
          "distill": ["--range-min", "0", "--range-max", "10", "--margin", "off", "--max-score", "off",
                      "--relative-margin", "0.05", "--num-negatives", "3", "--sampling", "top"]}
# The distillation teacher: the base model with a scoring head, fully tuned as a cross-encoder on the
# base model's TopK-PercPos groups (a positive and 3 negatives, listwise, one epoch); trained once per
# work folder (seed 42) and shared by every seed of the distilled rows.
TEACHER = ["--full", "--lr", "5e-5", "--group-size", "4", "--batch-size", "16", "--seed", "42"]
MINED_ROWS = {"qtune-hn1-percpos": "percpos", "qtune-hn3-percpos": "percpos", "st-hn1-1e-4": "percpos",
              "qtune-round2-hn1": "percpos", "qtune-round2-hn1-200": "percpos", "qtune-round2b-hn1-200": "percpos",
              "st-round2-hn1-200": "percpos", "qtune-distill-hn3": "distill",
              "qtune-hn3-distill-file": "distill"}
# Rows whose negatives the TUNED model mines (a second round): the row whose best/ (same seed) mines them
# (`qtune-min-100` spells out the 100-step defaults the second rounds were measured with).
MINED_BY = {"qtune-round2-hn1": "qtune-min-100", "qtune-round2-hn1-200": "qtune-min-100",
            "qtune-round2b-hn1-200": "qtune-min-200", "st-round2-hn1-200": "qtune-min-100"}


def run(command: list[str], log: Path) -> tuple[float, float]:
    """Run a command (output appended to `log`): its wall seconds and peak RSS in GB. Exit 3 is
    qtune's --fail-on-regression verdict, still a scored row."""
    return timed_command(command, log, ok_codes=(0, 3))


def scores(path: Path) -> dict:
    metrics = next(iter(json.loads(path.read_text()).values()))  # {model name: {metric: value}}
    return {k: round(float(metrics[k]), 4) for k in METRICS}


def mined_file(recipe: str, args, model: str, log: Path, by: str = "") -> str:
    """The training file with negatives mined by `recipe` (mined on first use) with `model` (`by`
    names it in the file name when it is a tuned model rather than the base)."""
    path = Path(args.work) / f"train.mined-{recipe}{'-by-' + by if by else ''}.jsonl"
    if not path.exists():
        rescore = []
        if recipe == "distill":
            rescore = ["--rescore-with", teacher(args, model, log)]
        print(f"mining negatives ({recipe}) ...", flush=True)
        corpus = str(Path(args.test) / "corpus.jsonl")
        run(qtune_command("mine", "--model", model, "--queries", args.train, "--corpus", corpus, "--output", str(path),
                      "--device", args.device, *MINING[recipe], *rescore), log)
    return str(path)


def teacher(args, model: str, log: Path) -> str:
    """The distillation teacher's best/ (trained on first use, see TEACHER). Its reranking of the
    base model's top 10 on the test folder goes to `teacher-eval/`, for the report only: the student
    learns from its scores of the training questions, and nothing is chosen on the test folder."""
    folder = Path(args.work) / "teacher"
    if not (folder / "best").is_dir():
        print("training the distillation teacher ...", flush=True)
        groups = mined_file("percpos", args, model, log)
        wall, peak = run(qtune_command("train", "reranker", "--model", model, "--train", groups, "--output", str(folder),
                                       "--max-length", str(args.max_length), "--report-to", "none",
                                       "--device", args.device, *TEACHER), log)
        (folder / "bench.json").write_text(json.dumps({"train_wall_seconds": wall, "train_peak_rss_gb": peak}))
        run(qtune_command("eval", "rerank", "--model", str(folder / "best"), "--retriever", model, "--data", args.test,
                          "--top-k", "10", "--output", str(folder / "teacher-eval"), "--device", args.device), log)
    return str(folder / "best")


def train_row(row: str, seed: int, args, model: str, folder: Path, log: Path) -> dict:
    """Train one (row, seed) into `folder` and score it on the test folder."""
    runner, settings = ROWS[row]
    common = ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size)]
    train = args.train
    if row in MINED_BY:
        miner = Path(args.work) / f"{MINED_BY[row]}-seed{seed}" / "best"
        if not miner.is_dir():
            raise SystemExit(f"{row} needs the {MINED_BY[row]} row of seed {seed} first (its best/ mines the negatives)")
        train = mined_file(MINED_ROWS[row], args, str(miner), log, by=f"{MINED_BY[row]}-seed{seed}")
    elif row in MINED_ROWS:
        train = mined_file(MINED_ROWS[row], args, model, log)
    if runner == "st":
        command = [sys.executable, "-m", "bench.quality.st_train", "--model", model, "--train", train,
                   "--output", str(folder), "--lr", str(settings["lr"]), "--seed", str(seed),
                   "--max-length", str(args.max_length), "--cached", str(settings.get("cached", 0)),
                   "--negatives", str(settings.get("negatives", 0)), "--max-steps", str(settings.get("max_steps", 0)),
                   "--device", args.device, *common]
        trained = folder
    else:
        command = qtune_command("train", "embedding", "--model", model, "--train", train, "--output", str(folder),
                            "--seed", str(seed), "--max-length", str(args.max_length), "--report-to", "none",
                            "--device", args.device, *common, *settings)
        trained = folder / "best"
    wall, peak = run(command, log)
    run(qtune_command("eval", "retrieval", "--model", str(trained), "--data", args.test, "--output",
                  str(folder / "test-eval"), "--device", args.device), log)
    record = {**scores(folder / "test-eval" / "metrics.json"), "train_wall_seconds": wall, "train_peak_rss_gb": peak}
    if runner == "st":
        record["train_loop_seconds"] = json.loads((folder / "st_train.json").read_text())["seconds"]
    else:
        metrics = json.loads((folder / "metrics.json").read_text())
        record["train_loop_seconds"] = metrics["train"]["seconds"]
        record["steps"] = metrics["train"]["steps"]
        if metrics.get("verdict"):
            record["dev_verdict"] = metrics["verdict"]["line"]
    return record


def summarise(per_seed: dict[str, dict]) -> dict:
    values = [r["ndcg@10"] for r in per_seed.values()]
    out = {f"mean {k}": round(sum(r[k] for r in per_seed.values()) / len(per_seed), 4) for k in METRICS}
    out["spread ndcg@10"] = round(max(values) - min(values), 4)
    out["seeds"] = len(values)
    for key in ("train_wall_seconds", "train_loop_seconds", "train_peak_rss_gb"):
        out[f"mean {key}"] = round(sum(r[key] for r in per_seed.values()) / len(per_seed), 2)
    return out


def judge(row: str, s: dict, peers: dict[str, dict], against: str) -> str | None:
    """One qtune row (its summary `s`) against the best of `peers` by mean nDCG@10: better or worse
    only by more than the larger seed spread of the two, and never from one seed."""
    if not peers:
        return None
    best = max(peers, key=lambda r: peers[r]["mean ndcg@10"])
    delta = s["mean ndcg@10"] - peers[best]["mean ndcg@10"]
    noise = max(s["spread ndcg@10"], peers[best]["spread ndcg@10"])
    seeds = min(s["seeds"], peers[best]["seeds"])
    if seeds < 2:  # one seed measures no spread: nothing is counted
        word = "not judged (a single seed): against"
    else:
        word = "better than" if delta > noise else ("worse than" if delta < -noise else "within the seed spread of")
    return f"{word} {best} ({against}): {delta:+.4f} nDCG@10, spread {noise:.4f}, {seeds} seed(s)"


def verdicts(summary: dict[str, dict]) -> dict[str, str]:
    """Each qtune row against the best peer row among those trained on the same file: in-batch rows
    against in-batch peers, rows with mined negatives against peers given the same negatives. A
    row with mined negatives is also judged against the peer's best on the user's own file (in-batch,
    `ROW vs in-batch`): what the user would get from the peer without the mining step."""
    out = {}
    for row, s in summary.items():
        if ROWS.get(row, ("",))[0] != "qtune":
            continue
        peers = {r: p for r, p in summary.items() if ROWS.get(r, ("",))[0] == "st"}
        same = {r: p for r, p in peers.items()
                if MINED_ROWS.get(r) == MINED_ROWS.get(row) and MINED_BY.get(r) == MINED_BY.get(row)}
        line = judge(row, s, same, "the peer's best mean on the same training file")
        if line:
            out[row] = line
        if row in MINED_ROWS:
            line = judge(row, s, {r: p for r, p in peers.items() if r not in MINED_ROWS},
                         "the peer's best mean on the user's file, in-batch negatives")
            if line:
                out[f"{row} vs in-batch"] = line
    return out


def save(report: dict, results: dict, base: dict, model: str, args) -> None:
    """The report as it stands: per-seed figures, each row's summary and the verdicts against the peer."""
    summary = {r: summarise(s) for r, s in results.items()}
    report.update({"benchmark": f"embedding quality: qtune vs sentence-transformers on {args.name}",
                   "data": {"train": args.train, "test": args.test}, "model": model,
                   "settings": {"epochs": args.epochs, "batch_size": args.batch_size, "max_length": args.max_length},
                   "base": base, "environment": environment(), "per_seed": results, "summary": summary,
                   "verdicts": verdicts(summary), "rows": {r: ROWS[r][1] for r in results}})
    write_report(args.output, report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="the data set's name in the report")
    parser.add_argument("--train", required=True, help="query groups (FlagEmbedding JSONL)")
    parser.add_argument("--test", required=True, help="BEIR folder the rows are scored on")
    parser.add_argument("--work", required=True, help="folder for the runs")
    parser.add_argument("--rows", nargs="+", default=["st-2e-5", "st-5e-5", "st-1e-4", "st-2e-4", "qtune"],
                        choices=sorted(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 7])
    parser.add_argument("--model", default=None, help="base embedder (default: the offline all-MiniLM-L6-v2)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", required=True)
    parser.add_argument("--rescore", action="store_true", help="score the rows already trained again (and train "
                        "only the missing ones)")
    args = parser.parse_args()
    model = args.model or default_model()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    report = json.loads(Path(args.output).read_text()) if Path(args.output).exists() else {}
    results: dict[str, dict] = report.get("per_seed", {})
    if not (work / "base" / "metrics.json").exists():
        run(qtune_command("eval", "retrieval", "--model", model, "--data", args.test, "--output", str(work / "base"),
                      "--device", args.device), log)
    base = scores(work / "base" / "metrics.json")
    for seed in args.seeds:  # seed by seed: every row gets its first seed before any gets a second
        for row in args.rows:
            folder = work / f"{row}-seed{seed}"
            if str(seed) in results.get(row, {}) and (folder / "test-eval" / "metrics.json").exists():
                if args.rescore:  # the trained model again through today's evaluator
                    trained = folder if ROWS[row][0] == "st" else folder / "best"
                    run(qtune_command("eval", "retrieval", "--model", str(trained), "--data", args.test, "--output",
                                  str(folder / "test-eval"), "--device", args.device), log)
                    results[row][str(seed)].update(scores(folder / "test-eval" / "metrics.json"))
                    save(report, results, base, model, args)
                continue
            print(f"{row} seed {seed} ...", flush=True)
            if folder.exists():  # a run stopped halfway: start it again
                import shutil

                shutil.rmtree(folder)
            results.setdefault(row, {})[str(seed)] = train_row(row, seed, args, model, folder, log)
            save(report, results, base, model, args)
    save(report, results, base, model, args)
    print(f"\n{'row':<16} {'nDCG@10':>8} {'spread':>7} {'MRR@10':>7} {'R@100':>7} {'seeds':>5} {'train s':>8} {'peak GB':>7}")
    print(f"{'base':<16} {base['ndcg@10']:>8.4f} {'':>7} {base['mrr@10']:>7.4f} {base['recall@100']:>7.4f}")
    for row, s in report.get("summary", {}).items():
        print(f"{row:<16} {s['mean ndcg@10']:>8.4f} {s['spread ndcg@10']:>7.4f} {s['mean mrr@10']:>7.4f} "
              f"{s['mean recall@100']:>7.4f} {s['seeds']:>5} {s['mean train_wall_seconds']:>8.0f} "
              f"{s['mean train_peak_rss_gb']:>7.2f}")
    for row, text in report.get("verdicts", {}).items():
        print(f"{row}: {text}")


if __name__ == "__main__":
    main()
