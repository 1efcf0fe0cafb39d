"""`POST /v1/extract`: `{input: str | str[], max_new_tokens?}` -> `{data: [{index, output, error?}]}`.

Generation is slow and stateful, so it is not micro-batched: one model call per request, on the
model thread every model shares."""

from __future__ import annotations

import functools

from pydantic import Field, StrictInt, StrictStr

from qtune.errors import RequestError
from qtune.tasks.requests import Request, check_chars, check_lengths, check_texts, check_total, usage

DEFAULT_MAX_NEW_TOKENS = 256  # without max_new_tokens (capped by ServerSettings.max_new_tokens)


class ExtractRequest(Request):
    union_messages = {"input": "input: expected a string or a list of strings"}
    input: StrictStr | list[StrictStr]
    model: StrictStr | None = None
    max_new_tokens: StrictInt | None = Field(default=None, ge=1)


async def extract(call, entry, body: ExtractRequest) -> dict:
    settings = call.settings
    texts = check_texts(body.input, settings)
    check_chars(texts, entry.max_input_tokens)
    cap = settings.max_new_tokens
    max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, cap) if body.max_new_tokens is None else body.max_new_tokens
    if max_new_tokens > cap:
        raise RequestError(422, f"max_new_tokens must be between 1 and {cap}, got {max_new_tokens}",
                           param="max_new_tokens", code="invalid_max_new_tokens")
    prompts = await call.tokenize(_prompts, entry, texts, settings)  # tokenized on a prep thread
    found = await call.run(entry, functools.partial(
        entry.model.extract_prompts, [p["input_ids"] for p in prompts], batch_size=settings.extract_batch_size,
        max_new_tokens=max_new_tokens), rows=len(texts))
    data = []
    for i, result in enumerate(found):
        row = {"index": i, "output": result.output}
        if result.error is not None:  # an answer that did not parse: this row's problem, not the request's
            row["error"] = result.error
            row["raw"] = result.text
        data.append(row)
    return {"object": "list", "model": entry.name, "data": data,
            "usage": usage(prompts, generated=sum(r.tokens for r in found))}


def _prompts(entry, texts: list[str], settings) -> list[dict]:
    """Validated prompt features: each within the token limit, all within the request's."""
    prompts = [{"input_ids": entry.model.builder.prompt_ids(t)} for t in texts]
    check_lengths(prompts, entry.max_input_tokens, note=" with the extraction prompt")
    check_total(prompts, settings)
    return prompts
