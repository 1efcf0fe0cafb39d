"""Per-query comparison of two retrieval runs (base vs tuned): where each query's first relevant
passage ranks before and after, and which passages now rank above it when it got worse.

An average can hide regressions: a tuned model may lift most queries and sink a few. The passages
that overtook a query's positive are often unjudged relevant ones (false negatives in the qrels),
or what the training data taught the model to prefer; either way a user should look at them.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from qtune.evaluation.report import markdown_table, short_name

SNIPPET_CHARS = 100
ABOVE_LIMIT = 10  # passages listed above a worsened query's positive
TOP_CHANGES = 20  # queries in each report section


def first_relevant_rank(ranking: Sequence[str], judged: Mapping[str, int]) -> int | None:
    """1-based rank of the best-ranked document with grade > 0; None when none was retrieved."""
    return next((i + 1 for i, d in enumerate(dict.fromkeys(ranking)) if judged.get(d, 0) > 0), None)


def rank_change(before: int | None, after: int | None, depth: int) -> int:
    """after - before (positive: worse), a positive not retrieved counting as rank `depth` + 1."""
    return (depth + 1 if after is None else after) - (depth + 1 if before is None else before)


def snippet(text: str, chars: int = SNIPPET_CHARS) -> str:
    """The first `chars` characters on one line."""
    flat = " ".join(text.split())
    return flat if len(flat) <= chars else flat[:chars] + "…"


def query_rows(base_run: Mapping[str, Sequence[str]], tuned_run: Mapping[str, Sequence[str]],
               qrels: Mapping[str, Mapping[str, int]], queries: Mapping[str, str], corpus: Mapping[str, str], *,
               depth: int, above_limit: int = ABOVE_LIMIT) -> list[dict]:
    """One row per judged query, in qrels order: its first relevant passage's rank under each run.

    `depth`: how many passages each run retrieved (a positive below it is "not retrieved", null).
    A query that got worse lists the passages the tuned run ranks above its positive (best first,
    at most `above_limit`): id, first characters, and whether the base run also ranked it above."""
    rows = []
    for qid, judged in qrels.items():
        if not any(g > 0 for g in judged.values()):
            continue
        base, tuned = list(base_run.get(qid, ())), list(tuned_run.get(qid, ()))
        before, after = first_relevant_rank(base, judged), first_relevant_rank(tuned, judged)
        change = rank_change(before, after, depth)
        row = {"query_id": qid, "query": queries.get(qid, ""), "rank_before": before, "rank_after": after,
               "change": change}
        if change > 0:
            was_above = set(base[:(depth if before is None else before - 1)])
            above = tuned[:(depth if after is None else after - 1)]
            row["above"] = [{"id": d, "text": snippet(corpus.get(d, "")), "new": d not in was_above}
                            for d in above[:above_limit]]
        rows.append(row)
    return rows


def worse_and_better(rows: Sequence[dict], top: int = TOP_CHANGES) -> tuple[list[dict], list[dict]]:
    """The `top` queries that lost the most rank and the `top` that gained the most (ties: qrels order)."""
    worse = sorted((r for r in rows if r["change"] > 0), key=lambda r: -r["change"])
    better = sorted((r for r in rows if r["change"] < 0), key=lambda r: r["change"])
    return worse[:top], better[:top]


def _rank(rank: int | None, depth: int) -> str:
    return f">{depth}" if rank is None else str(rank)


def per_query_markdown(rows: Sequence[dict], base: str, tuned: str, *, depth: int, top: int = TOP_CHANGES) -> str:
    """The "Got worse" and "Got better" report sections; the rank is that of each query's first
    relevant passage under `base` then `tuned`."""
    worse, better = worse_and_better(rows, top)
    counts = {"worse": sum(r["change"] > 0 for r in rows), "better": sum(r["change"] < 0 for r in rows)}
    same = len(rows) - counts["worse"] - counts["better"]
    b, t = short_name(base), short_name(tuned)
    parts = [f"## Per query: {t} against {b}", "",
             f"{counts['better']} queries got better, {counts['worse']} got worse, {same} kept their rank "
             f"(rank of the first relevant passage; >{depth}: not retrieved). Every query: per_query.jsonl.", ""]
    parts += [f"### Got worse (top {min(top, counts['worse'])} of {counts['worse']})", ""]
    if worse:
        for r in worse:
            parts.append(f"- `{r['query_id']}` {snippet(r['query'])!r}: rank {_rank(r['rank_before'], depth)} -> "
                         f"{_rank(r['rank_after'], depth)}; now above it:")
            parts += [f"  - `{a['id']}`{'' if a['new'] else ' (was above before too)'}: {a['text']}"
                      for a in r["above"]]
    else:
        parts.append("none")
    parts += ["", f"### Got better (top {min(top, counts['better'])} of {counts['better']})", ""]
    if better:
        parts.append(markdown_table(["query", "text", f"rank ({b})", f"rank ({t})"],
                                    [[r["query_id"], snippet(r["query"], 60).replace("|", "\\|"),
                                      _rank(r["rank_before"], depth), _rank(r["rank_after"], depth)] for r in better]))
    else:
        parts.append("none")
    return "\n".join(parts + [""])
