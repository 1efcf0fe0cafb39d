"""`POST /v1/embeddings` (OpenAI's shape): texts or token ids -> vectors, float or base64."""

from __future__ import annotations

import base64
from typing import Literal

import numpy as np
from pydantic import Field, StrictInt, StrictStr

from qtune.errors import RequestError
from qtune.tasks.embedding.model import truncate_normalize
from qtune.tasks.requests import Request, check_count, check_lengths, check_total, usage


class EmbeddingRequest(Request):
    union_messages = {"input": "input: expected a string, a list of strings, a list of token ids or a list of "
                               "those lists"}
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    model: StrictStr | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(default=None, gt=0)
    # Not in OpenAI's API: queries get the model's query instruction (Cohere/Voyage style).
    input_type: Literal["query", "document"] = "document"


def embedding_features(entry, value, *, is_query: bool, settings) -> list[dict]:
    """Validated, unpadded features for `input`: texts are tokenized as `Embedder.features` does
    (without truncating, so too-long inputs are reported), token ids are taken as given."""
    if isinstance(value, str):
        value = [value]
    elif value and isinstance(value[0], int):
        value = [value]  # one input given as token ids
    if not value:
        raise RequestError(400, "input must not be empty", param="input", code="empty_input")
    check_count(value, settings)
    for i, item in enumerate(value):
        if len(item) == 0:
            raise RequestError(400, f"input {i} is empty", param="input", code="empty_input")
    loaded = entry.model.loaded
    tokenizer = loaded.tokenizer
    if isinstance(value[0], str):
        # Bounded by the body size limit: count, do not cut.
        features = [_model_inputs(tokenizer, f) for f in entry.model.features(value, is_query, truncate=False)]
    else:
        vocab = loaded.model.get_input_embeddings().num_embeddings
        for i, ids in enumerate(value):
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise RequestError(422, f"input {i} has token id {bad}; ids must be between 0 and {vocab - 1}",
                                   param="input", code="invalid_token_id")
        features = [_model_inputs(tokenizer, {"input_ids": list(ids)}) for ids in value]
    check_lengths(features, entry.max_input_tokens)
    check_total(features, settings)
    return features


def _model_inputs(tokenizer, feature: dict) -> dict:
    """The same keys for text and token-id inputs, so they pad together in one batch."""
    ids = feature["input_ids"]
    out = {"input_ids": ids, "attention_mask": [1] * len(ids)}
    if "token_type_ids" in tokenizer.model_input_names:
        out["token_type_ids"] = feature.get("token_type_ids", [0] * len(ids))
    return out


def _encode(vector: np.ndarray, encoding_format: str):
    if encoding_format == "base64":  # what the official openai client asks for: little-endian float32
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]


async def embeddings(call, entry, body: EmbeddingRequest) -> dict:
    features = await call.tokenize(embedding_features, entry, body.input, is_query=body.input_type == "query",
                                  settings=call.settings)  # tokenized on a prep thread
    width = entry.model.dimension
    if body.dimensions is not None and body.dimensions > width:
        raise RequestError(422, f"dimensions must be between 1 and the model's {width}, got {body.dimensions}",
                           param="dimensions", code="invalid_dimensions")
    vectors = truncate_normalize(await call.submit(entry, features), body.dimensions)  # (n, width)
    return {"object": "list", "model": entry.name,
            "data": [{"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
                     for i, v in enumerate(vectors)],
            "usage": usage(features)}
