"""The dev split: a seeded share of the training data held out to choose best/, stop early and
compare the tuned model with its base, so nothing is ever selected on the test set a user reports.

Rows are split by a key (the query of a retrieval group, the text of a classified row, the first
text of a pair), so the same query never lands on both sides. Which keys go to dev depends only
on the seed and the keys themselves: the same data gives the same split on every run, after a
resume, and on every rank of a launched run.
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

from qtune.errors import QtuneError

# Without --eval and without --dev-fraction, a run holds out this share of its keys as the dev
# set, when there are at least MIN_KEYS_FOR_AUTO of them (so the dev set has ~20 or more), and
# never more than MAX_AUTO_DEV keys (evaluation time grows with the dev set, its precision hardly).
AUTO_FRACTION = 0.1
MIN_KEYS_FOR_AUTO = 200
MAX_AUTO_DEV = 1000


def _rank(seed: int, key: str) -> bytes:
    return hashlib.sha256(f"{seed}\x00{key}".encode("utf-8")).digest()


def resolve_dev_fraction(fraction: float | None, keys: int, has_eval: bool, source: str) -> float:
    """The share of the `keys` distinct training keys to hold out: the user's `--dev-fraction`, or,
    when they gave none, AUTO_FRACTION where there is no --eval file and enough data, else 0."""
    if fraction is not None:
        if fraction > 0 and has_eval:
            raise QtuneError("--dev-fraction and --eval both name a dev set: give one (--dev-fraction 0 keeps "
                             "--eval as the dev set)")
        if fraction > 0 and round(fraction * keys) < 1:
            raise QtuneError(f"--dev-fraction {fraction:g} of the {keys} distinct keys of {source} holds out "
                             "nothing: raise it, or give a dev file with --eval")
        if fraction > 0 and keys - round(fraction * keys) < 1:
            raise QtuneError(f"--dev-fraction {fraction:g} leaves no training data in {source}")
        return fraction
    if has_eval or keys < MIN_KEYS_FOR_AUTO:
        return 0.0
    return min(AUTO_FRACTION, MAX_AUTO_DEV / keys)


def dev_split(keys: Sequence[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, dev indices) of rows with these `keys`: round(fraction x distinct keys) keys,
    chosen by a seeded hash, go to dev with every row that has them. Both lists keep the input order."""
    if fraction <= 0:
        return list(range(len(keys))), []
    distinct = sorted(set(keys), key=lambda k: _rank(seed, k))
    held = set(distinct[:max(1, math.floor(fraction * len(distinct) + 0.5))])
    train = [i for i, k in enumerate(keys) if k not in held]
    dev = [i for i, k in enumerate(keys) if k in held]
    return train, dev


def describe(fraction: float, dev_keys: int, unit: str, source: str) -> str:
    """What the run says about its dev set."""
    return (f"dev split: {dev_keys} {unit} ({fraction:.0%} of {source}, seeded) held out for best/ and the "
            "base-vs-tuned verdict (--dev-fraction 0: none)")
