"""Retrieval data: query groups for training, BEIR folders for evaluation, and a QA-table splitter.

Training data is JSONL, one query group per line, in either common format (both may be mixed
in one file, line by line):

- FlagEmbedding: ``{"query": str, "pos": [str, ...], "neg": [str, ...]}`` (``neg`` optional), and
  optionally a teacher's ``pos_scores``/``neg_scores`` (a number per passage), kept in the record
- ms-swift:      ``{"query": str, "response": str, "rejected_response": [str, ...] | str}``
  (``rejected_response`` optional)

Evaluation data is a BEIR folder: ``corpus.jsonl`` (``_id``, ``title``, ``text``),
``queries.jsonl`` (``_id``, ``text``) and ``qrels/<split>.tsv`` (query-id, corpus-id, score); each
may be a Parquet file instead (``corpus.parquet``, ``queries.parquet``, ``qrels/<split>.parquet``).

Query groups, corpus and queries may also come as Parquet files, Hugging Face datasets folders or
hub datasets (`qtune.data.sources`) with the same fields; list fields are list columns.

Every problem is raised as a DataError naming file, 1-based line (or data row) and field.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from qtune.data.sources import columnar_source, is_columnar, read_columnar, source_name
from qtune.data.tables import _decode, iter_records, read_table, required_text
from qtune.errors import DataError, QtuneError
from qtune.io import atomic_path, write_jsonl
from qtune.records import QueryGroup, RetrievalSet

GROUP_FORMATS = ("flagembedding", "swift")
QRELS_COLUMNS = ("query-id", "corpus-id", "score")


# --- shared helpers ------------------------------------------------------------------------------

def _jsonl_objects(path: str | Path) -> Iterator[tuple[int, dict]]:
    return iter_records(path)


def _required_text(obj: dict, field: str, path: str | Path, line: int) -> str:
    return required_text(obj, field, path, line, kind="field")


def _identifier(obj: dict, field: str, path: str | Path, line: int) -> str:
    """An id as text; integer ids (some converted data sets have them) match qrels as their digits."""
    if field not in obj:
        raise DataError("missing field", path=str(path), line=line, field=field)
    value = obj[field]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"id must be text or an integer, got {value!r}", path=str(path), line=line, field=field)
    text = str(value)
    if not text.strip():
        raise DataError("empty id", path=str(path), line=line, field=field)
    return text


def _passages(value: object, field: str, path: str | Path, line: int, *, allow_single: bool) -> tuple[str, ...]:
    """A list of non-empty strings (or one string when `allow_single`)."""
    if allow_single and isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        kind = "a string or a list of strings" if allow_single else "a list of strings"
        raise DataError(f"expected {kind}, got {type(value).__name__}", path=str(path), line=line, field=field)
    for i, item in enumerate(value, start=1):
        if not isinstance(item, str):
            raise DataError(f"passage {i} is {type(item).__name__}, expected text", path=str(path), line=line,
                            field=field)
        if not item.strip():
            raise DataError(f"passage {i} is empty", path=str(path), line=line, field=field)
    return tuple(value)


# --- query groups (training data) ----------------------------------------------------------------

def _group(obj: dict, path: str | Path, line: int) -> QueryGroup:
    query = _required_text(obj, "query", path, line)
    flag = [k for k in ("pos", "neg") if k in obj]
    swift = [k for k in ("response", "rejected_response") if k in obj]
    if flag and swift:
        # Reading one and ignoring the other would silently drop passages.
        raise DataError(f"mixes FlagEmbedding ({', '.join(flag)}) and ms-swift ({', '.join(swift)}) fields; "
                        "use one format per line", path=str(path), line=line, field=swift[0])
    if "pos" in obj:
        positives = _passages(obj["pos"], "pos", path, line, allow_single=False)
        negatives = _passages(obj.get("neg", []), "neg", path, line, allow_single=False)
        field = "pos"
    elif "response" in obj:
        response = obj["response"]
        if not isinstance(response, str):
            raise DataError(f"expected text, got {type(response).__name__}", path=str(path), line=line,
                            field="response")
        if not response.strip():
            raise DataError("no positive passage: empty response", path=str(path), line=line, field="response")
        positives = (response,)
        negatives = _passages(obj.get("rejected_response", []), "rejected_response", path, line,
                              allow_single=True)
        field = "response"
    else:
        raise DataError("no positive passage: expected 'pos' (FlagEmbedding) or 'response' (ms-swift)",
                        path=str(path), line=line, field="pos")
    if not positives:
        raise DataError("no positive passage", path=str(path), line=line, field=field)
    if field != "pos":
        return QueryGroup(query, positives, negatives, line)
    return QueryGroup(query, positives, negatives, line,
                      pos_scores=_scores(obj, "pos_scores", path, line),
                      neg_scores=_scores(obj, "neg_scores", path, line))


def _scores(obj: dict, field: str, path: str | Path, line: int) -> tuple[float, ...] | None:
    """A FlagEmbedding score list (None when absent or null). Its length is left for the code that
    uses the scores to check (`qtune.data.teacher_scores`): training that ignores them still reads the file."""
    value = obj.get(field)
    if value is None:
        return None
    if not isinstance(value, list):
        raise DataError(f"expected a list of numbers, got {type(value).__name__}", path=str(path), line=line,
                        field=field)
    for i, item in enumerate(value, start=1):
        if isinstance(item, bool) or not isinstance(item, (int, float)) or math.isnan(item):
            raise DataError(f"score {i} is {item!r}, expected a number", path=str(path), line=line, field=field)
    return tuple(float(x) for x in value)


def read_query_groups(path: str | Path) -> list[QueryGroup]:
    """Query groups from JSONL in FlagEmbedding or ms-swift format (mixed line by line is fine),
    or from a Parquet file / datasets folder / hub dataset with the same columns (a null is a
    missing field, so a row of the other format may leave them empty).

    Blank lines are skipped; FlagEmbedding's ``pos_scores``/``neg_scores`` (lists of numbers) are
    kept in the record; other fields on a line (prompts) are ignored.
    """
    path = source_name(path)
    groups = [_group(obj, path, line) for line, obj in _jsonl_objects(path)]
    if not groups:
        raise DataError("no data rows", path=str(path))
    return groups


def held_out_retrieval_set(dev: Sequence[QueryGroup], groups: Sequence[QueryGroup]) -> RetrievalSet:
    """A retrieval set of held-out query groups: the `dev` queries, searched over every distinct
    passage of all `groups` (training and dev, positives and negatives), each query's positives
    relevant. Training passages stay in the corpus, so the dev task is as hard as the real one."""
    ids: dict[str, str] = {}
    for group in groups:
        for passage in (*group.positives, *group.negatives):
            ids.setdefault(passage, f"p{len(ids)}")
    queries = {f"q{i}": g.query for i, g in enumerate(dev)}
    qrels = {f"q{i}": {ids[p]: 1 for p in g.positives} for i, g in enumerate(dev)}
    return RetrievalSet(corpus={i: p for p, i in ids.items()}, queries=queries, qrels=qrels)


def write_query_groups(path: str | Path, groups: Sequence[QueryGroup], fmt: str = "flagembedding") -> None:
    """Write query groups as JSONL, atomically.

    `fmt="flagembedding"`: one line per group, ``{"query", "pos", "neg"}`` (``neg`` always present,
    possibly empty, since FlagEmbedding's trainer indexes it), plus ``pos_scores``/``neg_scores``
    where the group has them.
    `fmt="swift"`: ms-swift has one positive per line, so a group with P positives becomes P lines
    with the same query and the same ``rejected_response`` list, ``response`` taking each positive in
    turn (the first positive first); ``rejected_response`` is left out when there are no negatives.
    """
    if fmt not in GROUP_FORMATS:
        raise QtuneError(f"unknown query-group format {fmt!r}; use one of {', '.join(GROUP_FORMATS)}")
    lines = []
    for g in groups:
        if fmt == "flagembedding":
            record = {"query": g.query, "pos": list(g.positives), "neg": list(g.negatives)}
            for name in ("pos_scores", "neg_scores"):
                if getattr(g, name) is not None:
                    record[name] = list(getattr(g, name))
            lines.append(record)
        else:
            for positive in g.positives:
                record = {"query": g.query, "response": positive}
                if g.negatives:
                    record["rejected_response"] = list(g.negatives)
                lines.append(record)
    write_jsonl(path, lines)


# --- corpus, queries, qrels (evaluation data) ----------------------------------------------------

def read_corpus(path: str | Path) -> dict[str, str]:
    """Doc id -> passage, from a BEIR ``corpus.jsonl`` or a plain text file.

    A ``.jsonl``/``.json`` file (or a Parquet file, datasets folder or hub dataset) is BEIR:
    ``_id`` plus ``title`` and/or ``text``; the passage is ``(title + " " + text).strip()`` as BEIR
    embeds it, or just ``text`` when the title is empty or missing. Any other file has one passage
    per line; blank lines are skipped and the rest get the ids "0", "1", ... in order.
    """
    path = Path(path)
    corpus: dict[str, str] = {}
    if path.suffix.lower() in (".jsonl", ".json") or is_columnar(path):
        corpus = _texts_by_id(source_name(path), _beir_passage)
    else:
        for line in _decode(path).split("\n"):
            line = line.removesuffix("\r")
            if line.strip():
                corpus[str(len(corpus))] = line
    if not corpus:
        raise DataError("no passages", path=str(path))
    return corpus


def _beir_passage(obj: dict, path: str | Path, line: int) -> str:
    for field in ("title", "text"):
        if field in obj and not isinstance(obj[field], str):
            raise DataError(f"expected text, got {type(obj[field]).__name__}", path=str(path), line=line,
                            field=field)
    title, text = obj.get("title", ""), obj.get("text", "")
    passage = (title + " " + text).strip() if title.strip() else text
    if not passage.strip():
        raise DataError("missing or empty passage text" if "text" in obj else "missing field", path=str(path),
                        line=line, field="text")
    return passage


def _texts_by_id(path: str | Path, text_of) -> dict[str, str]:
    """{`_id`: text_of(obj, path, line)} over a BEIR JSONL file; a repeated id names both lines."""
    texts: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for line, obj in _jsonl_objects(path):
        key = _identifier(obj, "_id", path, line)
        if key in texts:
            raise DataError(f"duplicate id {key!r} (first on line {first_line[key]})", path=str(path),
                            line=line, field="_id")
        texts[key] = text_of(obj, path, line)
        first_line[key] = line
    return texts


def _read_queries(path: Path) -> dict[str, str]:
    return _texts_by_id(path, lambda obj, p, line: _required_text(obj, "text", p, line))


def _parses_as_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _qrels_rows(path: Path) -> Iterator[tuple[int, str, str, str]]:
    """(line, query id, doc id, score) as text for every data row of a qrels TSV or Parquet file.

    A TSV may have a header row or not: the first row is a header when its score is not an integer.
    """
    if is_columnar(path):
        yield from _columnar_qrels(path)
        return
    first = True
    for line, raw in enumerate(_decode(path).split("\n"), start=1):
        raw = raw.removesuffix("\r")
        if not raw.strip():
            continue
        values = [v.strip() for v in raw.split("\t")]
        if len(values) != 3:
            raise DataError(f"expected 3 tab-separated columns ({', '.join(QRELS_COLUMNS)}), found {len(values)}",
                            path=str(path), line=line)
        if first:
            first = False
            if not _parses_as_int(values[2]):  # a header row, whatever its column names
                continue
        query_id, doc_id, score = values
        yield line, query_id, doc_id, score


def _columnar_qrels(path: Path) -> Iterator[tuple[int, str, str, str]]:
    names, records = read_columnar(columnar_source(path), source_name(path), nulls="empty")
    missing = [c for c in QRELS_COLUMNS if c not in names]
    if missing:
        raise DataError(f"no column {missing[0]}: the file has {', '.join(names)}", path=str(path), field=missing[0])
    for line, fields in records:
        values = []
        for column in QRELS_COLUMNS:
            value = fields[column]
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise DataError(f"expected text or an integer, got {value!r}", path=str(path), line=line,
                                field=column)
            values.append(str(value).strip())
        query_id, doc_id, score = values
        yield line, query_id, doc_id, score


def _read_qrels(path: Path, queries: Mapping[str, str], corpus: Mapping[str, str]) -> dict[str, dict[str, int]]:
    """Query id -> {doc id: grade} with grades > 0 only; every row's ids must exist."""
    qrels: dict[str, dict[str, int]] = {}
    graded: dict[tuple[str, str], tuple[int, int]] = {}  # (query id, doc id) -> (grade, line)
    for line, query_id, doc_id, score in _qrels_rows(path):
        if not _parses_as_int(score):
            raise DataError(f"score must be an integer, got {score!r}", path=str(path), line=line, field="score")
        if query_id not in queries:
            raise DataError(f"unknown query id {query_id!r} (not in the queries)", path=str(path), line=line,
                            field="query-id")
        if doc_id not in corpus:
            raise DataError(f"unknown corpus id {doc_id!r} (not in the corpus)", path=str(path), line=line,
                            field="corpus-id")
        grade = int(score)
        seen = graded.setdefault((query_id, doc_id), (grade, line))
        if seen[0] != grade:
            raise DataError(f"grade {grade} contradicts grade {seen[0]} on line {seen[1]} for the same pair",
                            path=str(path), line=line, field="score")
        if grade > 0:  # grade 0 (or below) means judged not relevant
            qrels.setdefault(query_id, {})[doc_id] = grade
    return qrels


def _beir_file(folder: Path, name: str, suffixes: Sequence[str]) -> Path:
    """`folder/name` with the first of `suffixes` that exists there (the first, for the error, when none does)."""
    candidates = [folder / f"{name}{suffix}" for suffix in suffixes]
    return next((p for p in candidates if p.is_file()), candidates[0])


def read_beir(folder: str | Path, split: str = "test") -> RetrievalSet:
    """A BEIR folder as a RetrievalSet.

    Each file may be JSONL/TSV or Parquet (the JSONL/TSV one is read when both are there). A qrels
    TSV may have a header row or not: the first row is a header when its score is not an integer.
    Rows with grade 0 are dropped, and a query without any relevant passage in this split is left
    out of `queries` (it cannot be scored).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError("BEIR folder not found", path=str(folder))
    qrels_path = _beir_file(folder / "qrels", split, (".tsv", ".parquet"))
    if not qrels_path.is_file():
        found = sorted({p.stem for suffix in ("tsv", "parquet") for p in (folder / "qrels").glob(f"*.{suffix}")})
        hint = f" (found splits: {', '.join(found)})" if found else ""
        raise DataError(f"file not found{hint}", path=str(qrels_path))
    corpus = read_corpus(_beir_file(folder, "corpus", (".jsonl", ".parquet")))
    all_queries = _read_queries(_beir_file(folder, "queries", (".jsonl", ".parquet")))
    qrels = _read_qrels(qrels_path, all_queries, corpus)
    if not qrels:
        raise DataError("no query has a relevant passage (score > 0)", path=str(qrels_path))
    queries = {qid: text for qid, text in all_queries.items() if qid in qrels}
    return RetrievalSet(corpus, queries, {qid: qrels[qid] for qid in queries})


def read_calibration_texts(path: str | Path) -> tuple[list[str], list[str]]:
    """(passages, queries) an embedder's int8 calibration reads from `path`: a BEIR folder (its
    corpus and, when there, its queries), a query-group JSONL (queries, positives, negatives), or a
    corpus file (BEIR ``corpus.jsonl`` or one passage per line)."""
    path = Path(path)
    if path.is_dir():
        corpus = read_corpus(_beir_file(path, "corpus", (".jsonl", ".parquet")))
        queries_file = _beir_file(path, "queries", (".jsonl", ".parquet"))
        queries = _read_queries(queries_file) if queries_file.is_file() else {}
        return list(corpus.values()), list(queries.values())
    if not path.is_file():
        raise DataError("file not found", path=str(path))
    if path.suffix.lower() in (".jsonl", ".json"):
        first = next(_jsonl_objects(path), None)
        if first is not None and "query" in first[1]:
            groups = read_query_groups(path)
            passages = list(dict.fromkeys(p for g in groups for p in (*g.positives, *g.negatives)))
            return passages, [g.query for g in groups]
    return list(read_corpus(path).values()), []


def write_beir(folder: str | Path, corpus: Mapping[str, str], queries: Mapping[str, str],
               qrels: Mapping[str, Mapping[str, int]], split: str = "test") -> None:
    """Write ``corpus.jsonl`` (empty titles), ``queries.jsonl`` and ``qrels/<split>.tsv`` (with a
    header row), each atomically; `read_beir` reads them back unchanged."""
    for query_id, docs in qrels.items():
        if query_id not in queries:
            raise ValueError(f"qrels name query {query_id!r}, which is not in queries")
        for doc_id in docs:
            if doc_id not in corpus:
                raise ValueError(f"qrels of query {query_id!r} name document {doc_id!r}, which is not in corpus")
    for ident in [*queries, *corpus]:
        if any(c in str(ident) for c in "\t\r\n"):
            raise ValueError(f"id {ident!r} has a tab or line break, which a qrels TSV cannot hold")
    folder = Path(folder)
    write_jsonl(folder / "corpus.jsonl", ({"_id": i, "title": "", "text": t} for i, t in corpus.items()))
    write_jsonl(folder / "queries.jsonl", ({"_id": i, "text": t} for i, t in queries.items()))
    lines = ["\t".join(QRELS_COLUMNS)]
    lines += [f"{query_id}\t{doc_id}\t{int(grade)}"
              for query_id, docs in qrels.items() for doc_id, grade in docs.items()]
    with atomic_path(folder / "qrels" / f"{split}.tsv") as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8", newline="\n")


# --- QA table -> training groups + BEIR test folder ----------------------------------------------

def _cell(fields: dict, column: str, path: str | Path, line: int) -> str:
    return required_text(fields, column, path, line)


def qa_table_to_retrieval(table: str | Path, out_dir: str | Path, *, question_column: str = "question",
                          passage_column: str = "context", test_fraction: float = 0.1, seed: int = 42,
                          skip_empty: bool = False) -> dict:
    """Split a QA table (CSV/TSV/JSONL, one question-passage pair per row) into training groups and
    a BEIR test folder.

    The split, exactly: read the rows in file order, ``random.Random(seed).shuffle(rows)``, the first
    ``round(test_fraction * len(rows))`` rows are test rows and the rest training rows. Then any
    training row whose question text is also a test question moves to test (counted in "moved"),
    so no question is on both sides; a test question with several passages has all of them relevant.

    Writes ``out_dir/train.jsonl`` (FlagEmbedding; one group per distinct training question, ``pos``
    its distinct passages) and ``out_dir/test/`` (BEIR: ``corpus.jsonl`` with every distinct passage
    of the whole table, ids "d0", "d1", ... in order of first appearance; ``queries.jsonl`` with the
    test questions, ids "q0", "q1", ...; ``qrels/test.tsv`` with grade 1). The shuffle only decides
    which side a row goes to: both outputs list questions in order of first appearance in the file.
    A passage may be a training positive and a test passage at once (as in SQuAD-style data, where
    several questions share a context); only questions are kept apart.

    `skip_empty` drops rows whose question or passage is empty AFTER the split, so the other rows
    land where they would in the documented split (published splits of messy tables count such
    rows); without it an empty cell is an error naming file, line and field.

    Returns {"train_queries", "test_queries", "corpus", "moved", "skipped"}.
    """
    if not 0 < test_fraction < 1:
        raise QtuneError(f"test fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    path = source_name(table)
    table_rows, _ = read_table(path, [question_column, passage_column])
    def cell(row, column: str) -> str | None:
        try:
            return _cell(row.fields, column, path, row.line)
        except DataError as e:
            if skip_empty and e.reason == "empty text":
                return None
            raise

    rows = [(r.line, cell(r, question_column), cell(r, passage_column))
            for r in table_rows]  # (line, question, passage), file order
    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    n_test = round(test_fraction * len(shuffled))
    if n_test == 0:
        raise DataError(f"{len(rows)} rows with test fraction {test_fraction} leave no test question",
                        path=str(path))
    complete = [r for r in rows if r[1] is not None and r[2] is not None]
    skipped = len(rows) - len(complete)
    passages = [p for _, _, p in rows if p is not None]  # a passage counts even if its question is empty
    test_questions = {q for _, q, p in shuffled[:n_test] if q is not None and p is not None}
    train_rows = [r for r in shuffled[n_test:] if r[1] is not None and r[2] is not None and r[1] not in test_questions]
    moved = len([r for r in shuffled[n_test:] if r[1] in test_questions and r[2] is not None])
    rows = complete
    if not train_rows:
        raise DataError(f"every question ends up in the test split (test fraction {test_fraction})",
                        path=str(path))
    train_lines = {line for line, _, _ in train_rows}

    # Every pass below is in file order, so ids and group order do not depend on the shuffle.
    passage_ids: dict[str, str] = {}
    for passage in passages:
        passage_ids.setdefault(passage, f"d{len(passage_ids)}")
    train: dict[str, dict[str, None]] = {}  # question -> ordered set of passages
    test: dict[str, dict[str, None]] = {}
    for line, question, passage in rows:
        side = train if line in train_lines else test
        side.setdefault(question, {})[passage] = None

    out_dir = Path(out_dir)
    write_query_groups(out_dir / "train.jsonl", [QueryGroup(q, tuple(ps)) for q, ps in train.items()])
    query_ids = {q: f"q{i}" for i, q in enumerate(test)}
    write_beir(out_dir / "test", {d: p for p, d in passage_ids.items()}, {i: q for q, i in query_ids.items()},
               {query_ids[q]: {passage_ids[p]: 1 for p in ps} for q, ps in test.items()})
    return {"train_queries": len(train), "test_queries": len(test), "corpus": len(passage_ids), "moved": moved,
            "skipped": skipped}
