"""Rerankers: a relevance score in [0, 1] per (query, document).

Two kinds, chosen by the model family:
- decoders (Qwen3-Reranker): the pair is put in a chat prompt that asks for "yes" or "no"; the
  score is P(yes) from a softmax over the logits of the "yes" and "no" tokens at the last
  position. The prompt is the model's chat template around
  `<Instruct>: {instruction}\\n<Query>: {query}\\n<Document>: {doc}`, with the system message below
  and an empty think block after the assistant tag (thinking off). The middle part is truncated
  to fit max_length; the template parts never are.
- encoders (BERT-family cross-encoders): the tokenizer's pair template, one logit, sigmoid.

Training and inference share `forward_logits`: a logit whose sigmoid is the score (for decoders
the log-odds logit(yes) - logit(no), which is exactly the two-way softmax).
"""

from __future__ import annotations

from dataclasses import dataclass

from qtune.errors import QtuneError

SYSTEM_PROMPT = ('Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
                 'Note that the answer can only be "yes" or "no".')
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
_SLOT = "\x00qtune-pair\x00"


@dataclass(frozen=True)
class RerankPrompt:
    """Token ids around the pair text for a decoder reranker, and the answer token ids."""

    prefix: list[int]
    suffix: list[int]
    yes_id: int
    no_id: int


def decoder_prompt(tokenizer) -> RerankPrompt:
    """Render the chat template once around a placeholder and cut it there."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": _SLOT}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=False)
    elif tokenizer.convert_tokens_to_ids("<|im_start|>") not in (None, tokenizer.unk_token_id):
        # a Qwen tokenizer saved without its template: the Qwen3-Reranker prompt written out
        text = (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{_SLOT}<|im_end|>\n"
                "<|im_start|>assistant\n")
    else:
        raise QtuneError("a decoder reranker needs a tokenizer with a chat template (as Qwen3-Reranker has)")
    if "<think>" not in text:  # templates without a thinking switch: add the empty block ourselves
        text += "<think>\n\n</think>\n\n"
    before, after = text.split(_SLOT)
    ids = []
    for word in ("yes", "no"):
        token_id = tokenizer.convert_tokens_to_ids(word)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise QtuneError(f"the tokenizer has no single token {word!r} to score a reranker with")
        ids.append(token_id)
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return RerankPrompt(encode(before), encode(after), ids[0], ids[1])


def pair_text(query: str, document: str, instruction: str | None) -> str:
    return f"<Instruct>: {instruction or DEFAULT_INSTRUCTION}\n<Query>: {query}\n<Document>: {document}"


class PairFormatter:
    """(query, document) -> unpadded features, exactly as training and inference see them."""

    def __init__(self, tokenizer, is_decoder: bool, max_length: int, instruction: str | None = None):
        self.tokenizer, self.is_decoder, self.max_length = tokenizer, is_decoder, max_length
        self.instruction = instruction
        self.prompt = decoder_prompt(tokenizer) if is_decoder else None

    def encode(self, query: str, document: str) -> dict[str, list[int]]:
        if not self.is_decoder:
            return dict(self.tokenizer(query, document, truncation="longest_first", max_length=self.max_length))
        p = self.prompt
        budget = self.max_length - len(p.prefix) - len(p.suffix)
        if budget < 8:
            raise QtuneError(f"max_length {self.max_length} leaves no room for the pair after the "
                             f"{len(p.prefix) + len(p.suffix)}-token reranker prompt")
        middle = self.tokenizer(pair_text(query, document, self.instruction), add_special_tokens=False,
                                truncation=True, max_length=budget)["input_ids"]
        ids = p.prefix + middle + p.suffix
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}
