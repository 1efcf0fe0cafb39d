"""Does `qtune train classify` learn an easy rule on a sentence-transformers encoder?

The rule: a financial question's label is its first word (how / what / other). A mean-pooled
sentence-transformers model (all-MiniLM-L6-v2 unless --model) never trained BERT's pooler; a head
reading the pooler predicted the majority class for 3 epochs at `--full --lr 5e-5`. Each row is one
`qtune train classify` run (3 epochs, dev macro-F1 after each); the table puts the head qtune uses
now (the mean of the last hidden state, its own --head-lr) next to what it replaced.

    python -m bench.classify_learns --train /work/cls/train.csv --dev /work/cls/dev.csv \\
        --work runs/classify-learns --output bench/results/classify_learns_cpu_minilm.json [--sweep]

Rows, for each setting (`full-lr5e-5`: --full --lr 5e-5, the reported command; `defaults`: no
training flags, i.e. LoRA r 8 on attention at lr 2e-4):
  SETTING                 the model as it is, every default: mean head, default --head-lr
  SETTING/pooler+one-lr   before the fix: the head reads BERT's pooler (the model's copy without its
                          sentence-transformers pooling config) and --head-lr = --lr (one rate)
  SETTING/mean+one-lr     the mean head alone (--head-lr = --lr)
  SETTING/pooler          the head learning rate alone (pooler head, default --head-lr)
  SETTING/mean+head-lr=X  with --sweep: the mean head with --head-lr X (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
  defaults/lr=X           with --sweep: LoRA at --lr X (5e-4, 1e-3), every other default
With --seed N (other than 42) every row name ends in +seedN. The commands are the CLI's own, run as
subprocesses. A row whose metrics.json is already in --work is not run again.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common import default_model, environment, qtune_command, timed_command, write_report

SETTINGS = {"full-lr5e-5": ["--full", "--lr", "5e-5"], "defaults": []}
SETTING_LR = {"full-lr5e-5": "5e-5", "defaults": "2e-4"}  # the --lr each setting trains at
SWEEP = ("1e-3", "3e-3", "1e-2", "3e-2", "1e-1")


def rows(sweep: bool, seed: int = 42) -> dict[str, tuple[list[str], bool]]:
    """{row: (flags, pooler head)}."""
    found = {}
    for setting, flags in SETTINGS.items():
        lr = SETTING_LR[setting]
        found[setting] = (flags, False)
        found[f"{setting}/pooler+one-lr"] = (flags + ["--head-lr", lr], True)
        found[f"{setting}/mean+one-lr"] = (flags + ["--head-lr", lr], False)
        found[f"{setting}/pooler"] = (flags, True)
        for head_lr in SWEEP if sweep else ():
            found[f"{setting}/mean+head-lr={head_lr}"] = (flags + ["--head-lr", head_lr], False)
    for lr in ("5e-4", "1e-3") if sweep else ():
        found[f"defaults/lr={lr}"] = (["--lr", lr], False)
    if seed == 42:
        return found
    return {f"{row}+seed{seed}": (flags + ["--seed", str(seed)], pooler) for row, (flags, pooler) in found.items()}


def pooler_copy(model: str, folder: Path) -> str:
    """The model's files without its sentence-transformers modules (links, no copies): qtune then
    sees a plain BERT and its head reads the pooler, as every BERT classifier did before."""
    folder.mkdir(parents=True, exist_ok=True)
    for item in Path(model).iterdir():
        if item.name in ("1_Pooling", "modules.json", "2_Normalize"):
            continue
        link = folder / item.name
        if not link.exists():
            link.symlink_to(item.resolve())
    return str(folder)


def qtune(*args: str, log: Path) -> float:
    """Run one qtune command (its output appended to `log`); the seconds it took."""
    return timed_command(qtune_command(*args), log)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True, help="labelled training texts (text,label)")
    parser.add_argument("--dev", required=True, help="labelled dev texts, evaluated after every epoch")
    parser.add_argument("--model", default=None, help="a mean-pooled sentence-transformers encoder "
                        "(default: the offline all-MiniLM-L6-v2)")
    parser.add_argument("--work", default="runs/classify-learns", help="folder for the runs")
    parser.add_argument("--sweep", action="store_true", help="also the --head-lr sweep rows")
    parser.add_argument("--rows", nargs="+", default=None, help="run only these rows")
    parser.add_argument("--seed", type=int, default=42, help="training seed (42: qtune's default)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", default="bench/results/classify_learns.json")
    args = parser.parse_args()
    model = args.model or default_model()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    plain = pooler_copy(model, work / "model-without-pooling-config")
    chosen = rows(args.sweep, args.seed)
    if args.rows:
        unknown = sorted(set(args.rows) - set(chosen))
        if unknown:
            raise SystemExit(f"unknown rows {unknown}; known: {sorted(chosen)}")
        chosen = {row: chosen[row] for row in args.rows}
    results = {}
    for row, (flags, pooler) in chosen.items():
        run = work / row.replace("/", "__")
        if not (run / "metrics.json").exists():
            qtune("train", "classify", "--model", plain if pooler else model, "--train", args.train, "--eval",
                  args.dev, "--output", str(run), "--epochs", "3", "--report-to", "none", "--device", args.device,
                  *flags, log=log)
        metrics = json.loads((run / "metrics.json").read_text())
        settings = (run / "config.yaml").read_text()
        history = [r for r in metrics["history"] if "macro_f1" in r]
        results[row] = {
            "flags": " ".join(flags), "head": "BERT pooler" if pooler else "mean of the last hidden state",
            "head_lr_setting": next((line.split(":", 1)[1].strip() for line in settings.splitlines()
                                     if line.startswith("head_lr:")), None),
            "macro_f1_per_epoch": [round(r["macro_f1"], 4) for r in history],
            "accuracy_per_epoch": [round(r["accuracy"], 4) for r in history],
            "train_seconds": metrics["train"]["seconds"]}

    print(f"\n{'row':<34} {'head':<7} macro-F1 after epoch 1 / 2 / 3")
    for row, r in results.items():
        head = "pooler" if r["head"] == "BERT pooler" else "mean"
        print(f"{row:<34} {head:<7} " + " / ".join(f"{v:.3f}" for v in r["macro_f1_per_epoch"]))
    for setting in SETTINGS:
        before, after = results.get(f"{setting}/pooler+one-lr"), results.get(setting)
        if before and after:
            print(f"{setting}: macro-F1 after 3 epochs {before['macro_f1_per_epoch'][-1]:.3f} before the fix "
                  f"(pooler head, one lr) -> {after['macro_f1_per_epoch'][-1]:.3f}")
    report = json.loads(Path(args.output).read_text()) if Path(args.output).exists() else {}
    report.update({"benchmark": "classify on a mean-pooled sentence-transformers encoder: first-word rule "
                                "(how / what / other) of financial questions, 3 epochs, batch 32",
                   "model": model, "train": args.train, "dev": args.dev,
                   "rows": {**report.get("rows", {}), **results}, "environment": environment()})
    write_report(args.output, report)


if __name__ == "__main__":
    main()
