"""Pair classification (semantic matching): "do these two sentences mean the same thing?"

Text format, per family:
- encoders: the tokenizer's own pair template, `[CLS] a [SEP] b [SEP]` with segment ids;
- decoders: `a \\n b <eos>`. Decoder tokenizers (Qwen) have no pair template and would glue the
  two texts together; the closing EOS gives the last-token pooling of
  `*ForSequenceClassification` the same summary position in every row. EOS is only added when it
  differs from the pad token, because the head pools the last token that is not padding.
Truncation is longest-first, so a long sentence cannot push the other one out.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from qtune.modeling.heads import closing_tokens
from qtune.records import Pair


@dataclass(frozen=True)
class PairEncoder:
    tokenizer: object
    is_decoder: bool
    max_length: int | None = None  # None: no truncation (length statistics)

    def encode(self, first: str, second: str) -> dict[str, list[int]]:
        if not self.is_decoder:
            return dict(self.tokenizer(first, second, truncation="longest_first" if self.max_length else False,
                                       max_length=self.max_length))
        tok = self.tokenizer
        a = tok(first, add_special_tokens=False)["input_ids"]
        b = tok(second, add_special_tokens=False)["input_ids"]
        sep = tok("\n", add_special_tokens=False)["input_ids"]
        end = closing_tokens(tok)
        if self.max_length:
            a, b = _truncate_longest_first(a, b, self.max_length - len(sep) - len(end))
        ids = a + sep + b + end
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def encode_pairs(self, pairs: Sequence[Pair]) -> list[dict[str, list[int]]]:
        features = []
        for pair in pairs:
            feature = self.encode(pair.sentence1, pair.sentence2)
            if pair.label is not None:
                feature["labels"] = pair.label
            features.append(feature)
        return features

    def untruncated_lengths(self, pairs: Sequence[Pair]) -> list[int]:
        """Tokens of each pair before --max-length cuts it (what `qtune data stats` counts)."""
        whole = replace(self, max_length=None)
        return [len(whole.encode(pair.sentence1, pair.sentence2)["input_ids"]) for pair in pairs]


def _truncate_longest_first(a: list[int], b: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Trim the longer side first until both fit `budget` (ties: the second keeps one more)."""
    budget = max(budget, 2)
    if len(a) + len(b) <= budget:
        return a, b
    half = budget // 2
    if min(len(a), len(b)) <= half:
        return (a[: budget - len(b)], b) if len(a) > len(b) else (a, b[: budget - len(a)])
    return a[:half], b[: budget - half]
