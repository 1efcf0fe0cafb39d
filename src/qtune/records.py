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


@dataclass(frozen=True, slots=True)
class QueryGroup:
    """A query with passages that answer it and (optionally) passages that do not."""

    query: str
    positives: tuple[str, ...]
    negatives: tuple[str, ...] = ()
    # Where the group came from, for error messages downstream.
    line: int | None = None
    # A teacher's score of each positive / negative, aligned with them (FlagEmbedding's
    # `pos_scores`/`neg_scores`, as `qtune mine` writes them), for distillation; None: not given.
    pos_scores: tuple[float, ...] | None = None
    neg_scores: tuple[float, ...] | None = None


@dataclass(frozen=True)
class RetrievalSet:
    """A BEIR-style evaluation set."""

    corpus: dict[str, str]  # doc id -> passage text as the model sees it
    queries: dict[str, str]  # query id -> text; only queries with >= 1 relevant doc
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: grade}, grades > 0 only


@dataclass(frozen=True, slots=True)
class ExtractionExample:
    """An instruction, the text to read, and (for training and evaluation) the answer to produce.

    `output` is the target text exactly as the model must write it: a JSON object from the data
    file is serialised with `json.dumps(value, ensure_ascii=False)`, a string is kept as it is.
    """

    input: str
    output: str | None = None
    instruction: str | None = None  # None: the model's default instruction
    # Where the example came from, for error messages downstream.
    line: int | None = None


@dataclass(frozen=True)
class FaqEntry:
    """One knowledge-base entry: a canonical question and its answer."""

    id: str
    question: str
    answer: str
