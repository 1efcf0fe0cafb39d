"""Extractor export: the merged causal LM as a plain transformers folder (what vLLM and other
engines load), set up so that a chat request gets exactly qtune's prompt and greedy answer.

Format (`ExtractionTask.export_formats`): "causal-lm" —
- the merged weights, tokenizer and qtune.json (so `qtune.load(OUT)` works too);
- generation_config.json: greedy, qtune's default max_new_tokens, the stop ids qtune stops at
  and the pad id;
- the chat template with thinking off by default: qtune renders its prompt with
  `enable_thinking=False` (an empty think block after the assistant tag), which an engine's chat
  endpoint does not pass unless asked; a caller may still pass `enable_thinking` itself;
- PROMPT_FILE: the user message qtune sends (`{instruction}\\n\\n{input}`) and the instruction.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from qtune.errors import QtuneError
from qtune.modeling.checkpoint import save_model_files
from qtune.modeling.export import keep_tokenizer_settings
from qtune.tasks.extraction.encode import DEFAULT_INSTRUCTION, PromptBuilder

PROMPT_FILE = "qtune_prompt.json"
USER_MESSAGE = "{instruction}\n\n{input}"  # as PromptBuilder.prompt_ids puts the one user message
PLACEHOLDER = re.compile(r"\{(instruction|input)\}")
# Prepended to a template that has a thinking switch: off unless the caller sets it.
THINKING_OFF = "{%- if enable_thinking is not defined %}{%- set enable_thinking = false %}{%- endif %}"


def default_max_new_tokens() -> int:
    """`qtune extract`'s default answer length."""
    from qtune.tasks.extraction.config import ExtractPredictConfig

    return next(f.default for f in dataclasses.fields(ExtractPredictConfig) if f.name == "max_new_tokens")


def stop_ids(loaded) -> list[int]:
    """The ids generation stops at: the tokenizer's EOS and the model config's."""
    config_eos = loaded.model.config.eos_token_id
    config_eos = [config_eos] if isinstance(config_eos, int) else list(config_eos or [])
    return sorted({loaded.tokenizer.eos_token_id, *config_eos} - {None})


def write_export(loaded, output: Path, fmt: str) -> None:
    """Write the `fmt` export of a merged extractor (CPU, fp32) into the empty folder `output`."""
    from transformers import GenerationConfig

    output = Path(output)
    if fmt != "causal-lm":
        raise QtuneError(f"an extractor exports as causal-lm, not {fmt!r}")
    if loaded.is_adapter:
        raise QtuneError("merge the LoRA adapter before exporting an extractor")
    tokenizer = loaded.tokenizer
    PromptBuilder(tokenizer)  # the same refusals as training: a chat template and an EOS token
    # replaces the base model's (often sampling) defaults: engines that read it answer as qtune does
    loaded.model.generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=default_max_new_tokens(), eos_token_id=stop_ids(loaded),
        pad_token_id=tokenizer.pad_token_id)
    if "enable_thinking" in tokenizer.chat_template:
        tokenizer.chat_template = THINKING_OFF + tokenizer.chat_template
    # the padding side only: qtune cuts no extraction prompt, so the tokenizer's own limit stays
    keep_tokenizer_settings(tokenizer, tokenizer.model_max_length)
    save_model_files(loaded, output)
    spec = {"user_message": USER_MESSAGE, "instruction": loaded.meta.settings.instruction or DEFAULT_INSTRUCTION,
            "max_length": loaded.meta.max_length, "padding_side": "left"}
    (output / PROMPT_FILE).write_text(json.dumps(spec, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def engine_messages(spec: dict, text: str, instruction: str | None = None) -> list[dict]:
    """The chat request an engine gets for `text`, built from a PROMPT_FILE's contents."""
    values = {"instruction": instruction or spec["instruction"], "input": text}
    # one pass over the placeholders, so braces in the text stay as they are
    return [{"role": "user", "content": PLACEHOLDER.sub(lambda m: values[m[1]], spec["user_message"])}]


def engine_prompt_ids(tokenizer, spec: dict, text: str) -> list[int]:
    """The prompt ids an engine's chat endpoint makes for `text`: the exported template rendered
    with its defaults, tokenized without adding special tokens."""
    rendered = tokenizer.apply_chat_template(engine_messages(spec, text), add_generation_prompt=True, tokenize=False)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def check_export(output: Path, model, texts: list[str]) -> dict[str, float]:
    """How far the export is from qtune's `Extractor` (`model`, from `qtune.load`) on `texts`:
    the share of prompts the exported chat template renders differently, the share of greedy
    answers (with the exported generation config) that differ, and the largest difference of the
    next-token probabilities at the end of the prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not texts:
        raise QtuneError("checking an export needs at least one sample text")
    output = Path(output)
    spec = json.loads((output / PROMPT_FILE).read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(output)
    engine = AutoModelForCausalLM.from_pretrained(output).eval()
    ours = [model.builder.prompt_ids(t) for t in texts]
    theirs = [engine_prompt_ids(tokenizer, spec, t) for t in texts]
    answers = greedy_answers(engine, tokenizer, theirs)
    expected = model.extract_prompts(ours, max_new_tokens=engine.generation_config.max_new_tokens)
    differing = sum((a, n) != (e.text, e.tokens) for (a, n), e in zip(answers, expected))
    loaded = model.loaded
    probability_diff = 0.0
    with loaded.inference(), torch.inference_mode():
        for prompt in ours:
            ids = torch.tensor([prompt])
            want = loaded.model(input_ids=ids.to(loaded.device), logits_to_keep=1).logits[0, -1].float().cpu()
            got = engine(input_ids=ids, logits_to_keep=1).logits[0, -1].float()  # (vocab,)
            probability_diff = max(probability_diff, float((want.softmax(-1) - got.softmax(-1)).abs().max()))
    return {"transformers: prompts differing (share)": sum(a != b for a, b in zip(ours, theirs)) / len(texts),
            "transformers: answers differing (share)": differing / len(texts),
            "transformers: next-token probabilities": probability_diff}


def greedy_answers(engine, tokenizer, prompts: list[list[int]]) -> list[tuple[str, int]]:
    """(answer text, tokens generated with the stop token) per prompt, from one left-padded batch
    generated with the folder's own generation config, the answer read as qtune reads it."""
    import torch

    config = engine.generation_config
    stop = set(config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id])
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[config.pad_token_id] * (width - len(p)) + p for p in prompts])  # (rows, width)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = engine.generate(input_ids=ids, attention_mask=mask)[:, width:].tolist()  # (rows, new tokens)
    answers = []
    for row in out:
        end = next((k for k, t in enumerate(row) if t in stop), None)
        kept = row if end is None else row[:end]
        answers.append((tokenizer.decode(kept, skip_special_tokens=True).strip(), len(kept) + (end is not None)))
    return answers
