"""JSON extraction (SFT): a causal LM learns to answer a prompt with the target text.

One prompt builder serves training and generation, so the model is asked at inference exactly
what it was trained on:
- prompt: the tokenizer's chat template around one user message `{instruction}\\n\\n{input}`,
  with the generation prompt and thinking disabled (`enable_thinking=False`: Qwen3 puts an empty
  `<think>\\n\\n</think>\\n\\n` block after the assistant tag);
- answer: the target text, then the tokenizer's EOS (`<|im_end|>` for Qwen3 chat models).
Labels are -100 on the prompt, so the loss covers exactly the answer tokens and the EOS.
Training batches are padded on the right; generation batches on the left.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from qtune.errors import QtuneError
from qtune.records import ExtractionExample

DEFAULT_INSTRUCTION = "Extract the requested fields from the text. Answer with a JSON object only."
IGNORE_INDEX = -100


@dataclass(frozen=True)
class PromptBuilder:
    tokenizer: object
    default_instruction: str | None = None

    def __post_init__(self):
        if not getattr(self.tokenizer, "chat_template", None):
            raise QtuneError("extraction needs a tokenizer with a chat template (e.g. Qwen3's)")
        if self.tokenizer.eos_token_id is None:
            raise QtuneError("extraction needs a tokenizer with an EOS token to end answers")

    def prompt_ids(self, text: str, instruction: str | None = None) -> list[int]:
        instruction = instruction or self.default_instruction or DEFAULT_INSTRUCTION
        messages = [{"role": "user", "content": f"{instruction}\n\n{text}"}]
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                      enable_thinking=False)
        return self.tokenizer(rendered, add_special_tokens=False)["input_ids"]

    def answer_ids(self, output: str) -> list[int]:
        return self.tokenizer(output, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]

    def encode(self, example: ExtractionExample) -> dict[str, list[int]]:
        """input_ids = prompt + answer + EOS; labels = -100 on the prompt."""
        if example.output is None:
            raise QtuneError("a training example needs an output")
        prompt = self.prompt_ids(example.input, example.instruction)
        answer = self.answer_ids(example.output)
        ids = prompt + answer
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE_INDEX] * len(prompt) + answer}


def encode_examples(builder: PromptBuilder, examples: Sequence[ExtractionExample], max_length: int,
                    source: str) -> tuple[list[dict], list[int]]:
    """(features, lines of examples left out because prompt + answer exceed max_length).

    Cutting an example would train the model to stop mid-answer or to answer a truncated text,
    so long ones are left out and reported.
    """
    features, too_long = [], []
    for example in examples:
        feature = builder.encode(example)
        if len(feature["input_ids"]) > max_length:
            too_long.append(example.line)
        else:
            features.append(feature)
    if not features:
        raise QtuneError(f"{source}: every example is longer than --max-length {max_length} tokens")
    return features, too_long


def collate(tokenizer, features: Sequence[dict], packed=False) -> dict:
    """Right padding: positions stay 0.. for every row; padded labels are -100. Packed: one row
    of all examples, labels packed alongside (see qtune.modeling.packing)."""
    import torch

    from qtune.modeling.packing import pack, wants_packing

    if wants_packing(packed, features):

        batch = pack(features, labels_key="labels", ignore_index=IGNORE_INDEX)
        targets = batch["labels"][0, 1:]  # position t predicts token t + 1
        # found here on the host, so the step never waits for the device to count them
        batch["answer_positions"] = (targets != IGNORE_INDEX).nonzero().squeeze(1)
        batch["answer_targets"] = targets[batch["answer_positions"]]
        return batch

    width = max(len(f["input_ids"]) for f in features)
    pad = tokenizer.pad_token_id

    def padded(key: str, fill: int):
        return torch.tensor([f[key] + [fill] * (width - len(f[key])) for f in features], dtype=torch.long)

    # The LM head only runs from the position before the earliest answer token on: prompt positions
    # have no loss, and their (rows x vocab) logits would dominate time and memory.
    first_answer = min(next(i for i, t in enumerate(f["labels"]) if t != IGNORE_INDEX) for f in features)
    return {"input_ids": padded("input_ids", pad), "attention_mask": padded("attention_mask", 0),
            "labels": padded("labels", IGNORE_INDEX), "logits_to_keep": width - first_answer + 1}


def loss(model, batch: dict):
    """Mean cross-entropy over the answer tokens of the batch (next-token, shifted).

    Packed: the LM head runs only at the positions that predict an answer token.
    """
    import torch.nn.functional as F

    from qtune.modeling.packing import head_model, is_packed, packed_hidden

    if is_packed(batch):
        hidden = packed_hidden(model, batch)  # (tokens, hidden)
        logits = head_model(model).lm_head(hidden[batch["answer_positions"]]).float()  # (answer tokens, vocab)
        return F.cross_entropy(logits, batch["answer_targets"])

    keep = batch.get("logits_to_keep", batch["input_ids"].shape[1])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                   logits_to_keep=keep).logits  # (rows, keep, vocab): positions width-keep .. width-1
    labels = batch["labels"][:, batch["labels"].shape[1] - keep + 1:]  # what each kept position predicts
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)


@dataclass(frozen=True)
class Generation:
    text: str  # the answer, special tokens removed
    finished: bool  # ended with EOS (False: cut at max_new_tokens)
    tokens: int  # tokens generated, EOS included


def generate(loaded, prompts: Sequence[list[int]], *, batch_size: int = 16, max_new_tokens: int = 256,
             progress: bool = False) -> list[Generation]:
    """Greedy answers to token-id prompts, in input order; batches are length-sorted, left-padded."""
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    tokenizer = loaded.tokenizer
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    stop = sorted({eos, *([loaded.model.config.eos_token_id] if isinstance(loaded.model.config.eos_token_id, int)
                          else loaded.model.config.eos_token_id or [])} - {None})
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop, pad_token_id=pad,
                              use_cache=True)
    results: list[Generation | None] = [None] * len(prompts)
    order = np.argsort([-len(p) for p in prompts], kind="stable")
    was_training = loaded.model.training
    loaded.model.eval()
    with torch.inference_mode(), loaded.autocast():
        for start in tqdm(range(0, len(order), batch_size), desc="generate", unit="batch", disable=not progress):
            idx = order[start:start + batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in idx], device=loaded.device)
            mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx],
                                device=loaded.device)
            out = loaded.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            for row, i in zip(out[:, width:].tolist(), idx):
                end = next((k for k, t in enumerate(row) if t in stop), None)
                tokens = row if end is None else row[:end + 1]
                text = tokenizer.decode(tokens[:end] if end is not None else tokens, skip_special_tokens=True)
                results[i] = Generation(text=text.strip(), finished=end is not None, tokens=len(tokens))
    loaded.model.train(was_training)
    return results


@dataclass(frozen=True)
class Extraction:
    output: object | None  # the parsed JSON value; None when the answer did not parse
    error: str | None
    text: str  # the raw answer
    tokens: int = 0  # tokens generated, EOS included


class Extractor:
    """A loaded extraction model: `extract(texts)` -> parsed JSON per text."""

    def __init__(self, loaded):
        self.loaded = loaded
        self.builder = PromptBuilder(loaded.tokenizer, loaded.meta.instruction)

    def extract(self, texts: Sequence[str], *, instructions: Sequence[str | None] | None = None,
                batch_size: int = 16, max_new_tokens: int = 256, progress: bool = False) -> list[Extraction]:
        instructions = instructions or [None] * len(texts)
        prompts = [self.builder.prompt_ids(t, i) for t, i in zip(texts, instructions)]
        return self.extract_prompts(prompts, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress)

    def extract_prompts(self, prompts: Sequence[list[int]], *, batch_size: int = 16, max_new_tokens: int = 256,
                        progress: bool = False) -> list[Extraction]:
        """`extract` for prompts already built with `self.builder.prompt_ids`."""
        from qtune.evaluation.extraction import parse_answer

        results = []
        for gen in generate(self.loaded, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                            progress=progress):
            value, error = parse_answer(gen.text)
            if error is not None and not gen.finished:
                error = f"stopped at max_new_tokens={max_new_tokens} before the answer ended; {error}"
            results.append(Extraction(value, error, gen.text, gen.tokens))
        return results

    def extract_examples(self, examples: Sequence[ExtractionExample], **kwargs) -> list[Extraction]:
        """`extract` of each example's input with its own instruction (the model's default if None)."""
        return self.extract([e.input for e in examples], instructions=[e.instruction for e in examples], **kwargs)
