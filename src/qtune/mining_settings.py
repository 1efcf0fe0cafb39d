"""The settings of hard-negative mining (`qtune.mining`), apart from its numpy code so that building
the CLI (`qtune mine`'s flags come from these fields) imports no numpy."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from qtune.config import is_integer, opt

SAMPLING = ("top", "random")


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def number_or_off(text: str) -> float | None:
    """A rule's threshold as typed: a number, or "off" / "none" for a rule that does not apply."""
    if text.strip().lower() in ("off", "none"):
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"expected a number or 'off', got {text!r}") from None


@dataclass(frozen=True)
class MiningSettings:
    """The rules of `qtune mine` (sentence-transformers' `mine_hard_negatives` meaning; see above).
    The ranks count the candidates the rules leave."""

    range_min: int = opt(20, "skip the best N candidates left after the rules (likely unlabelled positives)")
    range_max: int = opt(50, "search the top N candidates (plus room for the positives); negatives are the ones "
                             "the rules leave, from the (range-min + 1)-th on")
    max_score: float | None = opt(0.8, "drop candidates scoring above this (likely false negatives); 'off': no "
                                       "limit", parse=number_or_off)
    margin: float | None = opt(0.1, "drop candidates with score + M > the positive's score (its lowest positive); "
                                    "'off': no such rule", parse=number_or_off, also=("absolute-margin",))
    # fills a default reranker group (--group-size 8) and --hard-negatives 7
    num_negatives: int = opt(7, "negatives per query (7: a full reranker group of 8 and --hard-negatives 7)")
    sampling: str = opt("top", "top: the best remaining candidates; random: a seeded sample of them",
                        choices=SAMPLING)
    seed: int = opt(42, "seed of --sampling random")
    min_score: float | None = opt(None, "drop candidates scoring below this (default: off)", parse=number_or_off)
    relative_margin: float | None = opt(None, "drop candidates with score > positive - |positive| x M, e.g. 0.05 "
                                              "(default: off)", parse=number_or_off)

    def __post_init__(self):
        # Checked on construction so the CLI can turn a bad flag into a message before any model loads.
        if not is_integer(self.range_min) or self.range_min < 0:
            raise ValueError(f"range_min must be an integer >= 0, got {self.range_min!r}")
        if not is_integer(self.range_max) or self.range_max <= self.range_min:
            raise ValueError(f"range_max must be an integer greater than range_min ({self.range_min}), "
                             f"got {self.range_max!r}")
        if not is_integer(self.num_negatives) or self.num_negatives < 1:
            raise ValueError(f"num_negatives must be an integer >= 1, got {self.num_negatives!r}")
        if self.num_negatives > self.range_max - self.range_min:
            raise ValueError(f"num_negatives must fit in the {self.range_max - self.range_min} ranks left after "
                             f"skipping range_min={self.range_min} of range_max={self.range_max}, "
                             f"got {self.num_negatives}")
        for name in ("margin", "relative_margin"):
            value = getattr(self, name)
            if value is not None and (not _is_real(value) or not value >= 0):
                raise ValueError(f"{name} must be a number >= 0 (or None: off), got {value!r}")
        for name in ("max_score", "min_score"):
            value = getattr(self, name)
            if value is not None and (not _is_real(value) or math.isnan(value)):
                raise ValueError(f"{name} must be a number (or None: off), got {value!r}")
        if self.max_score is not None and self.min_score is not None and self.min_score > self.max_score:
            raise ValueError(f"min_score must not exceed max_score ({self.max_score:g}), got {self.min_score:g}")
        if self.sampling not in SAMPLING:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLING)}, got {self.sampling!r}")
        if not is_integer(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
