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
