"""`POST /v1/classify` with texts: `{input: "text" | ["text", ...]}` -> `{data: [{index, label, probs}]}`."""

from __future__ import annotations

from qtune.errors import RequestError
from qtune.tasks.requests import ClassifyRequest, check_chars, check_lengths, check_texts, check_total, classify_answer


def is_texts(body: ClassifyRequest) -> bool:
    """A string or a list of strings (a request naming no model goes to a text classifier)."""
    value = body.input
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


def text_features(entry, value, settings) -> list[dict]:
    """Validated, unpadded features, as `TextClassifier.predict` encodes them."""
    if isinstance(value, list) and value and isinstance(value[0], list):
        raise RequestError(422, f"model {entry.name!r} is a text classifier: input must be a string or a list of "
                                "strings [text, ...], not pairs", param="input", code="texts_required")
    texts = check_texts(value, settings)
    check_chars(texts, entry.max_input_tokens)
    # Untruncated, to report too-long texts; within the limit this equals the truncating encoder.
    features = entry.model.features(texts, truncate=False)
    check_lengths(features, entry.max_input_tokens)
    check_total(features, settings)
    return features


async def classify(call, entry, body: ClassifyRequest) -> dict:
    features = await call.tokenize(text_features, entry, body.input, call.settings)  # tokenized on a prep thread
    probs = await call.submit(entry, features)  # (n, labels)
    return classify_answer(entry, probs, entry.model.labels, features)
