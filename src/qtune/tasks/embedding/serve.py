"""`POST /v1/embeddings` (OpenAI's shape): texts or token ids -> vectors, float or base64.
`POST /v2/embed` and `/v1/embed` (Cohere's shapes): texts -> vectors by `embedding_types` (float,
base64, packed sign bits), `input_type` choosing the query instruction, `truncate` START/END cutting
texts over the limit instead of refusing them."""

from __future__ import annotations

import base64
import uuid
from typing import Any, Literal

import numpy as np
from pydantic import Field, StrictInt, StrictStr

from qtune.errors import RequestError
from qtune.tasks.embedding.model import truncate_normalize
from qtune.tasks.requests import (Request, check_chars, check_count, check_lengths, check_total, cohere_meta, cut_chars,
                                  fit_text, usage)


class EmbeddingRequest(Request):
    union_messages = {"input": "input: expected a string, a list of strings, a list of token ids or a list of "
                               "those lists"}
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    model: StrictStr | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(default=None, gt=0)
    # Not in OpenAI's API: queries get the model's query instruction (Cohere/Voyage style).
    input_type: Literal["query", "document"] = "document"


def embedding_features(entry, value, *, is_query: bool, settings, limit: int | None = None, cut: str | None = None,
                       param: str = "input", item: str = "input", note: str = "") -> list[dict]:
    """Validated, unpadded features for `input`: texts are tokenized as `Embedder.features` does
    (without truncating, so too-long inputs are reported), token ids are taken as given.
    `limit`: tokens per input (default: the served model's); `cut` ("start"/"end"): texts over it
    lose tokens on that side instead of being refused. `param`/`item` name the field in errors,
    `note` follows the token count of one refused as too long."""
    if isinstance(value, str):
        value = [value]
    elif value and isinstance(value[0], int):
        value = [value]  # one input given as token ids
    if not value:
        raise RequestError(400, f"{param} must not be empty", param=param, code="empty_input")
    check_count(value, settings, param=param)
    for i, one in enumerate(value):
        if len(one) == 0:
            raise RequestError(400, f"{item} {i} is empty", param=param, code="empty_input")
    limit = entry.max_input_tokens if limit is None else limit
    loaded = entry.model.loaded
    tokenizer = loaded.tokenizer
    if isinstance(value[0], str):
        if cut is None:
            check_chars(value, limit, param=param, item=item)
        else:
            value = [cut_chars(text, limit, cut) for text in value]
        # Bounded by the characters read: count, do not cut (unless asked to).
        features = entry.model.features(value, is_query, truncate=False)
        if cut is not None:
            features = _cut_to_fit(entry, value, features, is_query=is_query, limit=limit, side=cut, item=item)
        features = [_model_inputs(tokenizer, f) for f in features]
    else:
        vocab = loaded.model.get_input_embeddings().num_embeddings
        for i, ids in enumerate(value):
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise RequestError(422, f"input {i} has token id {bad}; ids must be between 0 and {vocab - 1}",
                                   param="input", code="invalid_token_id")
        features = [_model_inputs(tokenizer, {"input_ids": list(ids)}) for ids in value]
    check_lengths(features, limit, note, param=param, item=item)
    check_total(features, settings, param=param)
    return features


def _cut_to_fit(entry, texts: list[str], features: list[dict], *, is_query: bool, limit: int, side: str,
                item: str) -> list[dict]:
    """`features` with those over `limit` tokens made again from their text cut on `side`: the
    instruction and special tokens stay, as for a text that short."""
    def length(text: str) -> int:
        return len(entry.model.features([text], is_query, truncate=False)[0]["input_ids"])

    out = []
    for i, (text, feature) in enumerate(zip(texts, features)):
        if len(feature["input_ids"]) > limit:
            cut = fit_text(entry.model.loaded.tokenizer, text, length, limit, side)
            if not cut:
                raise RequestError(422, f"{item} {i}: no part of it fits in {limit} tokens with the model's "
                                        "instruction and special tokens", param="texts", code="input_too_long")
            feature = entry.model.features([cut], is_query, truncate=False)[0]
        out.append(feature)
    return out


def _model_inputs(tokenizer, feature: dict) -> dict:
    """The same keys for text and token-id inputs, so they pad together in one batch."""
    ids = feature["input_ids"]
    out = {"input_ids": ids, "attention_mask": [1] * len(ids)}
    if "token_type_ids" in tokenizer.model_input_names:
        out["token_type_ids"] = feature.get("token_type_ids", [0] * len(ids))
    return out


async def _vectors(call, entry, features: list[dict], dimensions: int | None, param: str) -> np.ndarray:
    """(n, dimensions or the model's width) unit vectors of `features`, micro-batched."""
    width = entry.model.dimension
    if dimensions is not None and dimensions > width:
        raise RequestError(422, f"{param} must be between 1 and the model's {width}, got {dimensions}",
                           param=param, code="invalid_dimensions")
    return truncate_normalize(await call.submit(entry, features), dimensions)


def _encode(vector: np.ndarray, encoding_format: str):
    if encoding_format == "base64":  # what the official openai client asks for: little-endian float32
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]


async def embeddings(call, entry, body: EmbeddingRequest) -> dict:
    features = await call.tokenize(embedding_features, entry, body.input, is_query=body.input_type == "query",
                                  settings=call.settings)  # tokenized on a prep thread
    vectors = await _vectors(call, entry, features, body.dimensions, param="dimensions")  # (n, dimensions)
    return {"object": "list", "model": entry.name,
            "data": [{"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
                     for i, v in enumerate(vectors)],
            "usage": usage(features)}


# -- Cohere: /v2/embed (`cohere.ClientV2.embed`) and /v1/embed (`cohere.Client.embed`)

IS_QUERY = {"search_query": True, "search_document": False, "classification": False, "clustering": False}
CUT_SIDES = {"NONE": None, "START": "start", "END": "end"}
# int8/uint8 are left out: Cohere scales them by its own calibration, which a served model does not have.
EMBEDDING_TYPES = ("float", "base64", "binary", "ubinary")
TOO_LONG_NOTE = ' (truncate "END" or "START" cuts it to fit)'


class CohereEmbedRequest(Request):
    """What the cohere SDK sends: `texts`, an `input_type` (queries get the model's query
    instruction), `embedding_types`, `truncate` (NONE: too-long texts are refused, as everywhere in
    qtune; START/END: cut from that side to fit), `max_tokens` per text, `output_dimension`."""

    texts: list[StrictStr] | None = None
    images: list[Any] | None = None
    inputs: list[Any] | None = None
    model: StrictStr | None = None
    input_type: Literal["search_document", "search_query", "classification", "clustering", "image"] = \
        "search_document"
    embedding_types: list[Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]] | None = None
    truncate: Literal["NONE", "START", "END"] = "NONE"
    max_tokens: StrictInt | None = Field(default=None, gt=0)
    output_dimension: StrictInt | None = Field(default=None, gt=0)


def _asked_types(body: CohereEmbedRequest) -> list[str]:
    """The embedding types asked for (float when none), after refusing what only Cohere's own models do."""
    if body.images is not None or body.inputs is not None or body.input_type == "image":
        param = "images" if body.images is not None else "inputs" if body.inputs is not None else "input_type"
        raise RequestError(422, "only texts can be embedded: send them as `texts` (images and `inputs` are not "
                                "supported)", param=param, code="unsupported_input")
    if body.texts is None:
        raise RequestError(422, "texts is required", param="texts", code="invalid_field")
    types = list(dict.fromkeys(body.embedding_types or ["float"]))
    unsupported = [t for t in types if t not in EMBEDDING_TYPES]
    if unsupported:
        raise RequestError(422, f"embedding_types {', '.join(unsupported)} not supported; supported: "
                                f"{', '.join(EMBEDDING_TYPES)}", param="embedding_types",
                           code="unsupported_embedding_type")
    return types


def _by_type(vectors: np.ndarray, kind: str) -> list:
    """One of Cohere's encodings of (n, dim) unit vectors. binary/ubinary: a bit per component, set
    when it is positive, 8 to a byte with the first component in the highest bit (dim/8 bytes,
    rounded up); ubinary is the byte, binary the byte minus 128."""
    if kind in ("binary", "ubinary"):
        packed = np.packbits(vectors > 0, axis=1)  # (n, ceil(dim / 8)) uint8
        return (packed.astype(np.int16) - 128).tolist() if kind == "binary" else packed.tolist()
    return [_encode(v, kind) for v in vectors]


async def _cohere_vectors(call, entry, body: CohereEmbedRequest) -> tuple[np.ndarray, list[dict]]:
    """(n, dim) unit vectors of `body.texts` and their features, checked as /v1/embeddings checks."""
    limit = min(entry.max_input_tokens, body.max_tokens or entry.max_input_tokens)
    features = await call.tokenize(embedding_features, entry, body.texts, is_query=IS_QUERY[body.input_type],
                                   settings=call.settings, limit=limit, cut=CUT_SIDES[body.truncate],
                                   param="texts", item="text", note=TOO_LONG_NOTE)  # on a prep thread
    return await _vectors(call, entry, features, body.output_dimension, param="output_dimension"), features


def _cohere_answer(entry, body: CohereEmbedRequest, version: str, features: list[dict], response_type: str,
                   embeddings) -> dict:
    return {"response_type": response_type, "id": f"embed-{uuid.uuid4().hex}", "model": entry.name,
            "embeddings": embeddings, "texts": body.texts, "meta": cohere_meta(version, features)}


async def cohere_embed_v2(call, entry, body: CohereEmbedRequest) -> dict:
    types = _asked_types(body)
    vectors, features = await _cohere_vectors(call, entry, body)
    return _cohere_answer(entry, body, "2", features, "embeddings_by_type",
                          {kind: _by_type(vectors, kind) for kind in types})


async def cohere_embed_v1(call, entry, body: CohereEmbedRequest) -> dict:
    """Without `embedding_types` v1 answers bare float lists ("embeddings_floats"), as Cohere does."""
    types = _asked_types(body)
    vectors, features = await _cohere_vectors(call, entry, body)
    if body.embedding_types is None:
        return _cohere_answer(entry, body, "1", features, "embeddings_floats", _by_type(vectors, "float"))
    return _cohere_answer(entry, body, "1", features, "embeddings_by_type",
                          {kind: _by_type(vectors, kind) for kind in types})
