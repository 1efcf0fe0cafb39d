"""`qtune` command line: parses flags and calls qtune.api. Nothing else lives here."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import re
import sys

from qtune import __version__
from qtune.config import UNDERSCORES_NOTE, add_config_flags, config_from_args
from qtune.distributed import quiet_other_ranks
from qtune.errors import QtuneError, RegressionError
from qtune.serving import ServerSettings
from qtune.tasks import TASKS, Command, get, serve_roles


# A negative number as argparse's own pattern misses it (-1e-4, -1., -5E3 besides -1 and -.5).
NEGATIVE_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class Parser(argparse.ArgumentParser):
    """argparse with mistakes answered where they were made: an unknown flag is reported by the
    subcommand that got it (its usage, not the top-level one) with the flags it probably meant; a
    negative number is the value of the flag before it (`--lr -1e-4`), so a bound check can answer it.
    Every `--a-b` flag is also accepted as `--a_b` (a hidden alias), and a prefix is a flag when it
    starts the spellings of one setting only (`--out`: --output and its alias --output_dir)."""

    def __init__(self, *args, **kwargs):
        self.one_value_flags: set[str] = set()
        self.flag_actions: list[argparse.Action] = []  # every flag's action, in the order added
        self.has_subcommands = False
        self.required_flags: list[argparse.Action] = []  # required flags that have an alias
        kwargs.setdefault("epilog", UNDERSCORES_NOTE)
        kwargs["allow_abbrev"] = False  # prefixes are resolved by setting (`_whole_flags`)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        self._remember(action)
        switch = isinstance(action, argparse.BooleanOptionalAction)  # makes its own --no-a_b
        aliases = ["--" + f[2:].replace("-", "_") for f in action.option_strings
                   if f.startswith("--") and "-" in f[2:] and not (switch and f.startswith("--no-"))]
        if aliases and kwargs.get("help") != argparse.SUPPRESS and kwargs.get("action") != "version":
            if action.required:  # either spelling satisfies it: checked after parsing (`parse_known_args`)
                action.required = False
                self.required_flags.append(action)
            alias = {**kwargs, "dest": action.dest, "help": argparse.SUPPRESS, "required": False}
            for spelling in aliases:  # one action each, so an error names the spelling typed
                self._remember(super().add_argument(spelling, **alias))
        return action

    def _remember(self, action: argparse.Action) -> None:
        if action.option_strings:
            self.flag_actions.append(action)
        if action.nargs is None:  # the flag takes exactly one value
            self.one_value_flags.update(action.option_strings)

    def add_subparsers(self, **kwargs):
        self.has_subcommands = True
        return super().add_subparsers(**kwargs)

    def parse_known_args(self, args=None, namespace=None):
        args = self._whole_flags(sys.argv[1:] if args is None else list(args))
        args = self._negative_values_attached(args)
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and not self.has_subcommands:  # a leaf command: nothing after it could take these
            self.error(f"unrecognized arguments: {' '.join(extras)}{self._suggestions(extras)}")
        missing = [a.option_strings[0] for a in self.required_flags if getattr(namespace, a.dest, None) is None]
        if missing:
            self.error(f"the following arguments are required: {', '.join(missing)}")
        return namespace, extras

    def _whole_flags(self, args: list[str]) -> list[str]:
        """Each prefix of this command's flags written out (`--out x` as `--output x`) where it
        starts the spellings of one setting only; one that starts several settings' is refused by
        name. A command with subcommands reads its own flags only, those before the subcommand."""
        out: list[str] = []
        known = {flag: action for action in self.flag_actions for flag in action.option_strings}
        for i, arg in enumerate(args):
            if arg == "--" or (self.has_subcommands and not arg.startswith("-")):
                return out + args[i:]
            typed, eq, value = arg.partition("=")
            if typed.startswith("--") and typed not in known:
                by_setting: dict[str, list[str]] = {}
                for flag, action in known.items():
                    if flag.startswith(typed):
                        by_setting.setdefault(action.dest, []).append(flag)
                if len(by_setting) > 1:
                    shown = ", ".join(flags[0] for flags in by_setting.values())
                    self.error(f"ambiguous option: {typed} could match {shown}")
                if by_setting:
                    arg = next(iter(by_setting.values()))[0] + eq + value
            out.append(arg)
        return out

    def _negative_values_attached(self, args: list[str]) -> list[str]:
        """`--lr -1e-4` as `--lr=-1e-4`: argparse takes "-1e-4" for a flag (its pattern of a negative
        number has no exponent) and answers "expected one argument" with the whole usage."""
        joined: list[str] = []
        for i, arg in enumerate(args):
            if arg == "--":
                return joined + args[i:]
            if joined and joined[-1] in self.one_value_flags and NEGATIVE_NUMBER.fullmatch(arg):
                joined[-1] = f"{joined[-1]}={arg}"
            else:
                joined.append(arg)
        return joined

    def _suggestions(self, extras: list[str]) -> str:
        """' (did you mean --lr?)' for flags close to one of this command's: the closest by difflib,
        compared with - for _; a hidden alias stands for the flag --help shows."""
        visible = {}  # spelling -> the flag --help shows for that setting
        for action in self.flag_actions:
            for flag in action.option_strings:
                shown = next((a.option_strings[0] for a in self.flag_actions if a.dest == action.dest
                              and a.help != argparse.SUPPRESS), flag)
                visible.setdefault(_spelling(flag), shown)
        answers = []
        for typed in (e for e in extras if e.startswith("--")):
            close = difflib.get_close_matches(_spelling(typed), list(visible), n=1, cutoff=0.6)
            if close:
                answers.append((typed.split("=", 1)[0], visible[close[0]]))
        if not answers:
            return ""
        if len(answers) == 1:
            return f" (did you mean {answers[0][1]}?)"
        return " (did you mean " + ", ".join(f"{meant} for {typed}" for typed, meant in answers) + "?)"


def _spelling(flag: str) -> str:
    return flag.split("=", 1)[0].lower().replace("_", "-")


def _quantize_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantize", choices=("int8",),
                        help="int8: run BERT-family encoders on the CPU through ONNX Runtime with int8 weights "
                             "(needs qtune[int8])")


def cmd_data_stats(args) -> None:
    from qtune.api import length_stats
    from qtune.data.stats import plot_target, text_histogram

    plot, replaced = plot_target(args.file, args.plot)  # refused here, before the tokenizer loads
    written = f"plot: {plot}" + (f" ({replaced})" if replaced else "")
    task = get(args.task)
    summary, lengths = length_stats(args.task, args.file, args.model, plot=plot, text_columns=args.text_columns,
                                    text_column=args.text_column)
    if args.json:
        print(json.dumps(summary, indent=2))
        print(written, file=sys.stderr)  # stdout stays one JSON document
        return
    print(f"{args.file}: {summary['rows']} rows, tokens per {task.stats_unit} with {args.model}")
    print("  ".join(f"{k} {summary[k]}" for k in ("min", "p50", "p90", "p95", "p99", "max")) +
          f"  mean {summary['mean']:.1f}")
    print(text_histogram(lengths))
    print(f"suggested --max-length {summary['suggested_max_length']} (covers {summary['coverage']:.0%} of rows; "
          f"{summary['rows_truncated_at_suggestion']} rows would be {task.over_length})")
    print(written)


def cmd_data_retrieval_split(args) -> None:
    from qtune.api import retrieval_split

    stats = retrieval_split(args.table, args.output, question_column=args.question_column,
                            passage_column=args.passage_column, test_fraction=args.test_fraction, seed=args.seed,
                            skip_empty=args.skip_empty)
    print(f"wrote {args.output}/train.jsonl ({stats['train_queries']} queries) and {args.output}/test/ "
          f"({stats['test_queries']} queries, {stats['corpus']} passages)")
    if stats.get("skipped"):
        print(f"skipped {stats['skipped']} rows with an empty question or passage (after the split)")
    if stats.get("moved"):
        print(f"moved {stats['moved']} training rows to test: their question is also a test question")


def cmd_data_pii_sft(args) -> None:
    from qtune.data.extraction import pii_to_sft

    counts = pii_to_sft(args.source, args.output, eval_fraction=args.eval_fraction, seed=args.seed)
    print(f"wrote {args.output}/train.jsonl ({counts['train']} rows) and {args.output}/eval.jsonl "
          f"({counts['eval']} rows) from {counts['records']} records"
          + (f"; skipped {counts['skipped']} with a missing field" if counts["skipped"] else ""))


def cmd_train(args) -> None:
    from qtune.api import train

    config = config_from_args(get(args.task).config, args)
    result = train(args.task, config)
    best = result.get("best") or {}
    shown = {k: v for k, v in best.items() if isinstance(v, (int, float))}
    print(f"done: {config.output}  best {result['best_metric']}: "
          + (", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()) or "n/a"))
    verdict = result.get("verdict")
    if getattr(config, "fail_on_regression", False) and verdict and verdict["worse"]:
        raise RegressionError(f"--fail-on-regression: {verdict['line']}")


def command_runner(command: Command):
    """The CLI function of a task's eval/predict/calibrate command: settings from the flags, run, print."""
    def run(args) -> None:
        from qtune.api import load

        config = config_from_args(command.config, args)
        print(command.show(config, command.run(config, load)))

    return run


def _tolerance_flag(parser: argparse.ArgumentParser) -> None:
    from qtune.modeling.export import DEFAULT_TOLERANCE

    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"largest max abs difference accepted (default: {DEFAULT_TOLERANCE:g}, fp32)")


def _help(doc: str | None) -> str:
    """A config docstring's first line without its "`qtune ...`: " prefix."""
    return doc.strip().splitlines()[0].split(": ", 1)[-1].rstrip(".") if doc else ""


def add_command(commands, command: Command) -> None:
    sub = commands.add_parser(command.name, help=_help(command.help))
    add_config_flags(sub, command.config, recipe=False)
    sub.set_defaults(func=command_runner(command), from_config=True)


def task_commands(kind: str) -> list[Command]:
    """Every registered task's command of this kind ("evaluation", "prediction")."""
    return [command for task in TASKS.values() for command in task.commands_of(kind)]


def cmd_export(args) -> None:
    from qtune.api import export
    from qtune.modeling.export import read_export_note

    output = export(args.model, args.output, args.format, test_report=args.test_report)
    print(f"wrote {read_export_note(output)['format']} export to {output}")
    if args.check:
        show_export_check(output, args.model, args.tolerance)


def cmd_quantize(args) -> None:
    from qtune.api import quantize

    note = quantize(args.model, args.calibration, task=args.task, samples=args.samples)
    written = json.loads(note.read_text(encoding="utf-8"))
    print(f"wrote a static int8 graph calibrated on {written['rows']} texts to {note.parent}; "
          f"--quantize int8 runs it (OpenVINO)")


def cmd_check_export(args) -> None:
    show_export_check(args.output, args.model, args.tolerance)


def show_export_check(output, model: str | None, tolerance: float) -> None:
    """Print each engine's max abs difference from qtune; a QtuneError (exit 2) names those over `tolerance`."""
    from qtune.api import check_export
    from qtune.modeling.export import difference_table

    differences = check_export(output, model)
    print(difference_table(differences, tolerance))
    over = [engine for engine, difference in differences.items() if not difference <= tolerance]
    if over:
        raise QtuneError(f"{output}: {', '.join(over)} differ{'s' if len(over) == 1 else ''} from qtune by more "
                         f"than {tolerance:g}")


def cmd_serve(args) -> None:
    from qtune.api import serve
    from qtune.serving.listen import check_port

    roles = {role: getattr(args, role.replace("-", "_")) for role in serve_roles()}  # --a-role: dest a_role
    if not any(roles.values()):
        flags = [f"--{role}" for role in roles]
        raise QtuneError(f"nothing to serve: give {', '.join(flags[:-1])} and/or {flags[-1]}")
    settings = config_from_args(ServerSettings, args)  # the flags given, over ServerSettings' defaults
    check_port(settings.host, settings.port)  # before the models load, which takes minutes
    settings = dataclasses.replace(settings, target_call_ms=settings.target_call_ms or None)  # 0: no target
    serve(**roles, separate_adapters=args.separate_adapters, kb=args.kb, kb_token=args.kb_token,
          threshold=args.threshold, device=args.device, precision=args.precision, **dataclasses.asdict(settings))


KB_EMBEDDING_HELP = ("the KB's embedding model, at any path: a moved or copied folder is recognised by its weights "
                     "(default: the folder or hub id recorded in the KB)")


def cmd_kb(args) -> None:
    from qtune import api

    if args.kb_command == "build":
        count = api.kb_build(args.embedding, args.input, args.kb, token=args.token, device=args.device)
        print(f"built {args.kb}: {count} entries")
    elif args.kb_command == "add":
        count = api.kb_add(args.kb, args.input, embedding=args.embedding, token=args.token, device=args.device)
        print(f"wrote {count} entries to {args.kb}")
    elif args.kb_command == "delete":
        print(f"deleted {api.kb_delete(args.kb, args.ids, token=args.token)} of {len(args.ids)} ids from {args.kb}")
    else:
        result = api.kb_search(args.kb, args.query, top_k=args.top_k, classifier=args.classifier,
                               reranker=args.reranker, threshold=args.threshold, token=args.token, device=args.device,
                               embedding=args.embedding)
        if args.json:
            print(json.dumps(result, ensure_ascii=False, indent=2))
            return
        print(match_text(result))


def match_text(result: dict) -> str:
    """A FAQ match for people: the verdict, the entry's question and answer, then every candidate."""
    if not result["candidates"]:
        return "no match: the knowledge base is empty"
    head = f"{result['id']}  score {result['score']:.4f}"
    lines = [f"matched: {head}" if result["matched"] else f"no match (best: {head}, threshold not reached)"]
    for label, text in (("question", result["question"]), ("answer", result["answer"])):
        first, *rest = text.split("\n")
        lines += [f"  {label + ':':<10}{first}"] + [" " * 12 + line for line in rest]
    lines.append("candidates:")
    lines += [f"  {c['score']:.4f}  {c['id']}  {c['question']}" for c in result["candidates"]]
    return "\n".join(lines)


def cmd_demo(args) -> None:
    from qtune.demo import run_demo

    run_demo(args.output, epochs=args.epochs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="qtune", description="Adapt small open models to your own text.")
    parser.add_argument("--version", action="version", version=f"qtune {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="inspect data files").add_subparsers(dest="data_command", required=True)
    stats = data.add_parser("stats", help="token-length percentiles, histogram and a suggested --max-length")
    stats.add_argument("file")
    stats.add_argument("--model", required=True, help="model or tokenizer (hub id or folder)")
    stats.add_argument("--task", choices=[t.name for t in TASKS.values() if t.token_lengths is not None],
                       default="pair-cls", help="how rows are encoded, as that task trains (default: pair-cls)")
    stats.add_argument("--text-columns", nargs=2, default=["sentence1", "sentence2"], metavar=("COL1", "COL2"))
    stats.add_argument("--text-column", help="the text column of single-text tasks (default: text)")
    stats.add_argument("--output", "--plot", dest="plot",
                       help="PNG histogram path (default: FILE.lengths.png here, e.g. train.csv.lengths.png; a file "
                            "there that is not this command's plot of FILE is refused, not replaced)")
    stats.add_argument("--json", action="store_true", help="print the summary as JSON")
    stats.set_defaults(func=cmd_data_stats)
    split = data.add_parser("retrieval-split", help="QA table -> training JSONL + BEIR test folder (split by question)")
    split.add_argument("table", help="CSV/TSV/JSONL/Parquet, datasets FOLDER[:SPLIT] or hf://datasets/NAME[:SPLIT] "
                       "with a question and a passage column")
    split.add_argument("--output", required=True, help="folder for train.jsonl and test/")
    split.add_argument("--question-column", default="question")
    split.add_argument("--passage-column", default="context")
    split.add_argument("--test-fraction", type=float, default=0.1)
    split.add_argument("--seed", type=int, default=42)
    split.add_argument("--skip-empty", action="store_true",
                       help="drop rows with an empty question or passage after the split (default: error)")
    split.set_defaults(func=cmd_data_retrieval_split)
    pii = data.add_parser("pii-sft", help="PII person records (pii_zh JSON) -> extraction SFT train/eval JSONL")
    pii.add_argument("source", help="JSON list (or Parquet, datasets folder, hub dataset) of records with "
                     "naturalParagraph, name, location, emailAddress, phoneNumbers")
    pii.add_argument("--output", required=True, help="folder for train.jsonl and eval.jsonl")
    pii.add_argument("--eval-fraction", type=float, default=0.1)
    pii.add_argument("--seed", type=int, default=42)
    pii.set_defaults(func=cmd_data_pii_sft)


    train = commands.add_parser("train", help="fine-tune a model").add_subparsers(dest="task", required=True)
    for task in TASKS.values():
        sub = train.add_parser(task.name, help=_help(task.config.__doc__))
        add_config_flags(sub, task.config)
        sub.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("eval", help="evaluate a model").add_subparsers(dest="task", required=True)
    for command in task_commands("evaluation"):
        add_command(evaluate, command)
    predict = commands.add_parser("predict", help="predict a file").add_subparsers(dest="task", required=True)
    for command in task_commands("prediction"):
        add_command(predict, command)
    # commands the tasks also offer at the top (`qtune extract` = `qtune predict extract`, `qtune calibrate`)
    for command in [c for task in TASKS.values() for c in task.all_commands() if c.top_level]:
        add_command(commands, command)

    formats = sorted({fmt for task in TASKS.values() for fmt in task.export_formats})
    sub = commands.add_parser("export", help="merge LoRA and write a folder other engines load (--format)")
    sub.add_argument("--model", required=True, help="a qtune training folder (e.g. OUT/best)")
    sub.add_argument("--output", required=True)
    sub.add_argument("--format", choices=["auto", *formats], default="auto",
                     help="auto: the task's first (sentence-transformers for an embedder, transformers for "
                     "a classifier)")
    sub.add_argument("--check", action="store_true", help="then load it with each engine and compare (check-export)")
    sub.add_argument("--test-report", help="the --output folder (or its metrics.json) of `qtune eval ... --compare "
                     "BASE` on your test set: its figures go in the model card (README.md)")
    _tolerance_flag(sub)
    sub.set_defaults(func=cmd_export)
    sub = commands.add_parser("quantize", help="calibrate a static int8 graph of an embedding model on your texts "
                              "(OpenVINO); --quantize int8 then runs it")
    sub.add_argument("--model", required=True, help="the model's local folder (e.g. OUT/best); the graph is "
                     "written into its openvino/ folder")
    sub.add_argument("--calibration", required=True, help="texts like the ones it will embed: a BEIR folder, a "
                     "query-group JSONL or a corpus file (BEIR corpus.jsonl or one passage per line)")
    sub.add_argument("--samples", type=int, default=300, help="texts that calibrate it, spread over the file "
                     "(default: 300)")
    sub.add_argument("--task", choices=["embedding"], help="for a base model without qtune.json")
    sub.set_defaults(func=cmd_quantize)
    sub = commands.add_parser("check-export", help="load an export with each engine installed here and print its "
                              "max difference from qtune")
    sub.add_argument("output", help="the export folder")
    sub.add_argument("--model", help="the model it was exported from (default: the one its qtune_export.json names)")
    _tolerance_flag(sub)
    sub.set_defaults(func=cmd_check_export)

    sub = commands.add_parser("serve", help="OpenAI-compatible HTTP server (embeddings, classify, rerank, extract, FAQ match)")
    # Every model flag takes one or more DIR or NAME=DIR, and may be repeated (qtune.serving.names).
    models = dict(nargs="+", action="extend", metavar="[NAME=]DIR")
    for role, task in serve_roles().items():  # one flag per serve role of the task registry
        sub.add_argument(f"--{role}", **models, help=task.serve_help)
    sub.add_argument("--separate-adapters", action="store_true", help="load each LoRA adapter with its own copy of "
                     "the base model (default: adapters of one base and task share it)")
    sub.add_argument("--kb", help="knowledge base for /v1/match: Milvus Lite file or Milvus server URI")
    sub.add_argument("--kb-token", help="token for a Milvus server")
    sub.add_argument("--threshold", type=float, help="FAQ match threshold (default: 0.5 with a classifier, else 0.8)")
    add_config_flags(sub, ServerSettings, recipe=False)  # --host ... --metrics-public
    sub.add_argument("--device", default="auto")
    sub.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    _quantize_flag(sub)
    sub.set_defaults(func=cmd_serve)

    kb = commands.add_parser("kb", help="the FAQ knowledge base (Milvus Lite file or Milvus server)")
    kb_commands = kb.add_subparsers(dest="kb_command", required=True)

    def kb_parser(name: str, help: str):
        sub = kb_commands.add_parser(name, help=help)
        sub.add_argument("--kb", required=True, help="Milvus Lite file (.db) or Milvus server URI")
        sub.add_argument("--token", help="token for a Milvus server")
        sub.add_argument("--device", default="auto")
        sub.set_defaults(func=cmd_kb)
        return sub

    sub = kb_parser("build", "a new knowledge base from an FAQ table (question, answer, optional id)")
    sub.add_argument("--embedding", required=True, help="embedding model (recorded in the KB)")
    sub.add_argument("--input", required=True)
    sub = kb_parser("add", "insert or replace entries by id")
    sub.add_argument("--input", required=True)
    sub.add_argument("--embedding", help=KB_EMBEDDING_HELP)
    sub = kb_parser("delete", "delete entries by id")
    sub.add_argument("--ids", nargs="+", required=True)
    sub = kb_parser("search", "the best FAQ entry for a question")
    sub.add_argument("query")
    sub.add_argument("--embedding", help=KB_EMBEDDING_HELP)
    sub.add_argument("--top-k", type=int, default=5)
    sub.add_argument("--classifier", help="pair classifier that rescores the candidates")
    sub.add_argument("--reranker", help="reranker that rescores the candidates (default threshold: its calibrated one)")
    sub.add_argument("--threshold", type=float, help="match threshold (default: 0.5 with a classifier, else 0.8)")
    sub.add_argument("--json", action="store_true")

    sub = commands.add_parser("demo", help="the whole loop on a small offline example")
    sub.add_argument("--output", default="demo-output", help="working folder (default: demo-output)")
    sub.add_argument("--epochs", type=float, default=6.0, help="training epochs (default: 6)")
    sub.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quantize", None) == "int8" and not getattr(args, "from_config", False):
        args.precision = "int8"  # the loader exports the fp32 model to int8 (config commands: InferenceConfig)
    try:
        import warnings

        from transformers.utils import logging as hf_logging

        # qtune reports what matters itself (new heads, progress); keep the library chatter out.
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
        # under torchrun / accelerate launch only rank 0 prints (errors still reach stderr)
        quiet_other_ranks()
        args.func(args)
    except QtuneError as e:
        print(f"qtune: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print("qtune: interrupted", file=sys.stderr)
        return 130
    return 0


def run() -> None:
    """The `qtune` command: `main`, then the process ends (see `qtune.distributed.exit_process`)."""
    from qtune.distributed import exit_process

    exit_process(main())


if __name__ == "__main__":
    run()
