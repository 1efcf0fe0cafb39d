"""What the tasks' HTTP handlers share: the request base model, input checks and token usage.

Imported by the `serve.py` of each task, which the server loads; pydantic loads with it.
"""

from __future__ import annotations

from typing import Annotated, Callable, ClassVar

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from qtune.errors import RequestError

# Tokens are rarely longer than a few characters; a text with more characters than this many per
# allowed token is over the limit (or cut) before a tokenizer reads it: tokenizing megabytes takes
# seconds that the limit would throw away.
CHARS_PER_TOKEN = 32

FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]  # a number (an int too), not NaN/inf


class Request(BaseModel):
    # Clients send extra fields (`user`, ...); they are ignored rather than rejected. Strict: a
    # boolean or a string is not a number, a number is not a string.
    model_config = ConfigDict(extra="ignore", strict=True)
    # What a union field accepts, said once instead of one pydantic failure per alternative.
    union_messages: ClassVar[dict[str, str]] = {}


class ClassifyRequest(Request):
    """`/v1/classify` (vLLM's shape): pairs for a pair classifier, texts for a text classifier."""

    union_messages = {"input": "input: expected a string, a list of strings or a list of pairs [[text_a, text_b], ...]"}
    input: list[list[StrictStr]] | list[StrictStr] | StrictStr
    model: StrictStr | None = None


def check_count(value: list, settings, param: str = "input") -> None:
    if len(value) > settings.max_inputs:
        noun = "inputs" if param == "input" else param
        raise RequestError(422, f"too many {noun}: {len(value)}; the limit is {settings.max_inputs} per request",
                           param=param, code="too_many_inputs")


def check_lengths(features: list[dict], limit: int, note: str = "", param: str = "input", item: str = "input") -> None:
    for i, f in enumerate(features):
        if len(f["input_ids"]) > limit:
            raise RequestError(422, f"{item} {i} has {len(f['input_ids'])} tokens{note}; the limit is {limit}",
                               param=param, code="input_too_long")


def check_chars(texts: list[str], limit: int, param: str = "input", item: str = "input") -> None:
    """422 for a text longer than `limit` tokens could be (CHARS_PER_TOKEN characters each), before
    it is tokenized."""
    most = limit * CHARS_PER_TOKEN
    for i, text in enumerate(texts):
        if len(text) > most:
            raise RequestError(422, f"{item} {i} has {len(text)} characters, more than {limit} tokens can hold (at "
                                    f"most {most} characters are read); the limit is {limit} tokens", param=param,
                               code="input_too_long")


def cut_chars(text: str, limit: int, side: str = "end") -> str:
    """`text` without the characters that cannot be among its first (`side="end"`: the end is cut) or
    last (`"start"`) `limit` tokens, before it is tokenized."""
    most = limit * CHARS_PER_TOKEN
    if len(text) <= most:
        return text
    return text[:most] if side == "end" else text[len(text) - most:]


def check_total(features: list[dict], settings, param: str = "input") -> None:
    """422 when one request's inputs hold more tokens than `max_request_tokens`: the most work a
    single request may put in the model's queue."""
    total = sum(len(f["input_ids"]) for f in features)
    if total > settings.max_request_tokens:
        noun = "inputs" if param == "input" else param
        raise RequestError(422, f"the {noun} hold {total} tokens in all; the limit is {settings.max_request_tokens} "
                                "per request", param=param, code="too_many_tokens")


def check_texts(value, settings) -> list[str]:
    """A string or a non-empty list of non-empty strings -> the list."""
    texts = [value] if isinstance(value, str) else value
    if not texts:
        raise RequestError(400, "input must not be empty", param="input", code="empty_input")
    check_count(texts, settings)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise RequestError(422, f"input {i} must be a string", param="input", code="invalid_field")
        if not text:
            raise RequestError(400, f"input {i} is empty", param="input", code="empty_input")
    return texts


def usage(features: list[dict], generated: int | None = None) -> dict:
    """OpenAI-style token counts: the inputs' tokens (prompts included), plus what was generated."""
    prompt = sum(len(f["input_ids"]) for f in features)
    if generated is None:
        return {"prompt_tokens": prompt, "total_tokens": prompt}
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def classify_answer(entry, probs, labels, features) -> dict:
    """The `/v1/classify` answer: `{data: [{index, label, probs, scores}]}` from (rows, labels)
    probabilities; `probs` in the model's label order (vLLM's field), `scores` the same with each
    label's name: `[{label, score}]`."""
    return {"object": "list", "model": entry.name,
            "data": [{"index": i, "label": labels[int(p.argmax())], "probs": [float(x) for x in p],
                      "scores": [{"label": name, "score": float(x)} for name, x in zip(labels, p)]}
                     for i, p in enumerate(probs)],
            "usage": usage(features)}


def drop_tokens(tokenizer, text: str, drop: int, side: str) -> str:
    """`text` without about its first (`side="start"`) or last (`"end"`) `drop` tokens, cut where a
    token begins in the text (a fast tokenizer's offsets), so what is left is text, not ids. Always
    shorter than a non-empty `text`; tokens that share characters (bytes of one character) may make
    it one token more or less than asked: `fit_text` measures again."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    starts = [start for start, _ in offsets]
    if drop >= len(starts):
        return ""
    if side == "end":
        return text[:starts[len(starts) - drop]]
    return text[next((s for s in starts[drop:] if s > 0), len(text)):]


def fit_text(tokenizer, text: str, length: Callable[[str], int], limit: int, side: str) -> str:
    """`text` cut at token boundaries on `side` ("start" or "end") until `length(text)` (the tokens
    the model would read, special tokens and prompts included) is at most `limit`; "" when nothing fits."""
    over = length(text) - limit
    while over > 0 and text:
        text = drop_tokens(tokenizer, text, over, side)
        over = length(text) - limit if text else 0
    return text


def cohere_meta(version: str, features: list[dict]) -> dict:
    """The `meta` of Cohere's answers: the API version and the tokens the model read."""
    tokens = sum(len(f["input_ids"]) for f in features)
    return {"api_version": {"version": version}, "billed_units": {"input_tokens": tokens},
            "tokens": {"input_tokens": tokens}}
