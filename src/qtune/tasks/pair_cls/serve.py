"""`POST /v1/classify` with pairs: `{input: [[a, b], ...]}` -> `{data: [{index, label, probs}]}`."""

from __future__ import annotations

from qtune.errors import RequestError
from qtune.tasks.requests import ClassifyRequest, check_chars, check_count, check_lengths, check_total, classify_answer


def is_pairs(body: ClassifyRequest) -> bool:
    return isinstance(body.input, list) and bool(body.input) and isinstance(body.input[0], list)


def pair_features(entry, value, settings) -> list[dict]:
    """Validated, unpadded features, as `PairClassifier.predict` encodes them."""
    if isinstance(value, str) or (value and isinstance(value[0], str)):
        raise RequestError(422, f"model {entry.name!r} is a pair classifier: input must be a list of pairs "
                                "[[text_a, text_b], ...], not single texts", param="input", code="pairs_required")
    if not value:
        raise RequestError(400, "input must not be empty", param="input", code="empty_input")
    check_count(value, settings)
    for i, pair in enumerate(value):
        if len(pair) != 2:
            raise RequestError(422, f"input {i} has {len(pair)} texts; each input must be a pair [text_a, text_b]",
                               param="input", code="pairs_required")
        check_chars(pair, entry.max_input_tokens, item=f"input {i}, text")
    # Untruncated, to report too-long pairs; within the limit this equals the truncating encoder.
    features = [dict(f) for f in entry.model.features(value, truncate=False)]
    check_lengths(features, entry.max_input_tokens)
    check_total(features, settings)
    return features


async def classify(call, entry, body: ClassifyRequest) -> dict:
    features = await call.tokenize(pair_features, entry, body.input, call.settings)  # tokenized on a prep thread
    probs = await call.submit(entry, features)  # (n, labels)
    return classify_answer(entry, probs, entry.model.labels, features)
