"""Typed records passed from the data readers to the task code."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Pair:
    """Two texts and, for training and evaluation, the index of their label."""

    sentence1: str
    sentence2: str
    label: int | None = None
    # Where the row came from, for error messages downstream.
    line: int | None = None
