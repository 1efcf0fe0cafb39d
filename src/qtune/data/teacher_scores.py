"""Teacher scores of query groups, for distillation (`qtune train embedding|reranker --distill`).

They come in FlagEmbedding's fields, `pos_scores` and `neg_scores`: one float per positive and
per negative of the line, in the same order (`qtune mine --rescore-with` writes them). Training
with --distill needs them on every group, so a file without them is refused before a run starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from qtune.errors import DataError
from qtune.records import QueryGroup

HOW_TO_GET_THEM = "add them with `qtune mine --rescore-with TEACHER`"


def group_teacher_scores(group: QueryGroup, path: str | Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(pos_scores, neg_scores) of one group, each as long as its passages; a DataError naming
    file, line and field when either is missing or does not match its passages."""
    scores = []
    for field, value, passages in (("pos_scores", group.pos_scores, group.positives),
                                   ("neg_scores", group.neg_scores, group.negatives)):
        if value is None and not passages:
            value = ()
        if value is None:
            raise DataError(f"--distill needs teacher scores on every line and this one has none; {HOW_TO_GET_THEM}",
                            path=str(path), line=group.line, field=field)
        if len(value) != len(passages):
            kind = "pos" if field == "pos_scores" else "neg"
            raise DataError(f"{len(value)} teacher scores for {len(passages)} '{kind}' passages",
                            path=str(path), line=group.line, field=field)
        scores.append(tuple(float(v) for v in value))
    return scores[0], scores[1]


def require_teacher_scores(groups: Sequence[QueryGroup], path: str | Path) -> None:
    """Refuse (at the first group without them) a file whose groups lack teacher scores."""
    for group in groups:
        group_teacher_scores(group, path)
