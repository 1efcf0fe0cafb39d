"""Single texts to model features, exactly as training and inference see them.

- encoders (BERT family): the tokenizer's own template, `[CLS] text [SEP]`, truncated at max_length;
- decoders (Qwen3): `text <eos>`, so the last-token pooling of `*ForSequenceClassification`
  reads the same summary position in every row. EOS is only added when it differs from the pad
  token (the head pools the last token that is not padding) and the text is truncated before it
  is added, so EOS is never cut.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from qtune.modeling.heads import closing_tokens


@dataclass(frozen=True)
class TextEncoder:
    tokenizer: object
    is_decoder: bool
    max_length: int | None = None  # None: no truncation (length statistics, too-long requests)

    def encode(self, text: str) -> dict[str, list[int]]:
        tok = self.tokenizer
        if not self.is_decoder:
            return dict(tok(text, truncation=bool(self.max_length), max_length=self.max_length))
        ids = tok(text, add_special_tokens=False)["input_ids"]
        end = closing_tokens(tok)
        if self.max_length:
            ids = ids[: max(self.max_length - len(end), 1)]
        ids = ids + end
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def encode_examples(self, examples: Sequence) -> list[dict]:
        """Features of `TextExample`s, with `labels` where the example has one."""
        features = []
        for example in examples:
            feature = self.encode(example.text)
            if example.label is not None:
                feature["labels"] = example.label
            features.append(feature)
        return features

    def untruncated_lengths(self, examples: Sequence) -> list[int]:
        """Tokens of each example's text before --max-length cuts it (what `qtune data stats` counts)."""
        whole = replace(self, max_length=None)
        return [len(whole.encode(example.text)["input_ids"]) for example in examples]
