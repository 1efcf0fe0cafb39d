"""FAQ entries: read them from a table, put them in a knowledge base, match user questions to them.

Matching is recall -> rescore -> threshold: the embedder recalls the `top_k` FAQ questions nearest
to the query (query embedded as a query, FAQ questions as documents); a rescorer, when given,
replaces each cosine with its own score: a pair classifier's P(same question) or a reranker's
relevance of the FAQ question to the query; the best candidate is `matched` when its score reaches
the threshold (by default a reranker's calibrated one from `qtune calibrate`; else pass the one
`qtune eval pair-cls` found).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from qtune.data.tables import read_table, required_text
from qtune.errors import DataError, QtuneError
from qtune.kb.store import id_problem
from qtune.modeling.loading import read_meta
from qtune.records import FaqEntry

if TYPE_CHECKING:
    from qtune.kb.store import KnowledgeBase


class Embeds(Protocol):
    """Something that embeds texts (an embedding model from `qtune.load`): `embed`, or in two steps
    (the server tokenizes apart from the model call) `features` then `run_batch`."""

    dimension: int

    def embed(self, texts: Sequence[str], *, is_query: bool = False, batch_size: int = 64) -> np.ndarray: ...

    def features(self, texts: Sequence[str], is_query: bool) -> list[dict]: ...

    def run_batch(self, features: list[dict]) -> np.ndarray: ...


class ScoresPairs(Protocol):
    """Something that scores (query, candidate) pairs in [0, 1] (a reranker or a two-label pair classifier)."""

    scorer_kind: str  # "reranker", "classifier": shown in /health
    default_threshold: float | None  # a calibrated threshold, if the model has one

    def check_scorer(self) -> None:
        """Raise QtuneError if this model cannot score pairs for matching."""

    def pair_scores(self, pairs: list[tuple[str, str]]) -> np.ndarray: ...

    def pair_features(self, pairs: list[tuple[str, str]]) -> list[dict]: ...

    def feature_scores(self, features: list[dict]) -> np.ndarray: ...

FAQ_COLUMNS = ("question", "answer")
DEFAULT_TOP_K = 5
DEFAULT_THRESHOLD_CLASSIFIER = 0.5  # P(same) from a pair classifier, or an uncalibrated reranker's score
DEFAULT_THRESHOLD_COSINE = 0.8  # cosine similarity from the embedder alone


def question_id(question: str) -> str:
    """A stable id for an entry given without one: the first 16 hex digits of sha1(question)."""
    return hashlib.sha1(question.strip().encode("utf-8")).hexdigest()[:16]


def read_faq(path: str | Path) -> list[FaqEntry]:
    """Entries from CSV/TSV/JSONL with columns question, answer and an optional id.

    A CSV/TSV without a header row is read as question, answer. Entries without an id get
    `question_id(question)`. Empty texts and duplicate ids are errors naming file, line and field.
    """
    rows, _ = read_table(path, FAQ_COLUMNS)
    entries: list[FaqEntry] = []
    first_line: dict[str, int] = {}
    for row in rows:
        question = required_text(row.fields, "question", path, row.line).strip()
        answer = required_text(row.fields, "answer", path, row.line).strip()
        given = _given_id(row.fields.get("id"), path, row.line)
        entry_id = given if given is not None else question_id(question)
        if entry_id in first_line:
            if given is not None:
                raise DataError(f"duplicate id {entry_id!r} (first on line {first_line[entry_id]})",
                                path=str(path), line=row.line, field="id")
            raise DataError(f"the same question as line {first_line[entry_id]} (entries without an id are "
                            f"identified by their question); give one of them an id or remove it",
                            path=str(path), line=row.line, field="question")
        first_line[entry_id] = row.line
        entries.append(FaqEntry(entry_id, question, answer))
    return entries


def _given_id(value, path, line: int) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"expected text or an integer, got {type(value).__name__}", path=str(path), line=line,
                        field="id")
    text = str(value).strip()
    problem = id_problem(text)
    if problem:
        raise DataError(f"id {text[:80]!r} {problem}", path=str(path), line=line, field="id")
    return text or None


def _embed_questions(embedder: Embeds, entries: Sequence[FaqEntry], batch_size: int):
    # FAQ questions are the passages: embedded as documents, without the query instruction.
    return embedder.embed([e.question for e in entries], is_query=False, batch_size=batch_size)  # (n, dim)


def model_name(name_or_path: str) -> str:
    """How a knowledge base names its embedding model: an absolute path, or the hub id."""
    return str(Path(name_or_path).resolve()) if Path(name_or_path).exists() else str(name_or_path)


WEIGHT_SUFFIXES = (".safetensors", ".bin")


def embedder_fingerprint(name_or_path: str) -> str | None:
    """What identifies an embedding model wherever its files lie: sha256 over its weight files
    (name relative to the folder and content, in sorted order, at the top or one folder down as
    sentence-transformers modules keep them), the settings that decide how a text becomes a vector
    (qtune.json's pooling and query instruction, a sentence-transformers 1_Pooling config) and, for
    a LoRA checkpoint, its base model's fingerprint. Read streaming on each call: nothing is cached
    in the model folder, which may be read-only. None when there are no weights to read (a missing
    folder, a hub id not in the local cache)."""
    folder = _model_folder(str(name_or_path))
    if folder is None:
        return None
    weights = sorted(p for p in [*folder.glob("*"), *folder.glob("*/*")]
                     if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if not weights:
        return None
    digest = hashlib.sha256()
    for path in weights:
        digest.update(path.relative_to(folder).as_posix().encode("utf-8") + b"\0" + _file_sha256(path))
    pooling = folder / "1_Pooling" / "config.json"
    if pooling.is_file():
        digest.update(b"pooling\0" + pooling.read_bytes())
    meta = read_meta(folder)
    if meta is not None:
        settings = asdict(meta.settings)  # an embedder's: pooling, query_instruction
        digest.update(b"settings\0" + json.dumps(settings, sort_keys=True).encode("utf-8"))
        if meta.adapter:
            base = embedder_fingerprint(meta.base_model) or meta.base_model
            digest.update(b"base\0" + base.encode("utf-8"))
    return "sha256:" + digest.hexdigest()


def _file_sha256(path: Path, chunk: int = 1 << 20) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.digest()


def _model_folder(name_or_path: str) -> Path | None:
    """The local folder holding this model's files: the folder itself, or a hub id's snapshot in the
    local Hugging Face cache (never downloaded here)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists() or path.is_absolute() or name_or_path.startswith((".", "~")):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception:  # noqa: BLE001 - not a valid hub id, or not cached: nothing to fingerprint
        return None


def check_embedder(kb: KnowledgeBase, name_or_path: str) -> None:
    """Raise unless `name_or_path` is the embedding model that built `kb`: the same weights and
    pooling (by fingerprint) at any path. A KB from a qtune that recorded only the model's path or
    hub id is checked by that name."""
    name = model_name(name_or_path)
    if kb.fingerprint is None:
        if name != kb.model:
            raise QtuneError(f"{kb.uri} was built with the embedding model {kb.model!r}, not {name!r}; it records "
                             f"only the path or hub id of its model (built by an older qtune), so a moved or "
                             f"copied model cannot be recognised: use {kb.model!r}, or rebuild it with "
                             f"`qtune kb build`")
        return
    given = embedder_fingerprint(name_or_path)
    if given == kb.fingerprint or (given is None and name == kb.model):
        return  # None: a hub id not downloaded yet, known only by its name
    differ = "their weights differ" if name == kb.model else "another model"
    raise QtuneError(f"{kb.uri} was built with the embedding model {kb.model!r}, not {name!r} ({differ}); "
                     f"rebuild it with `qtune kb build`, or use the model that built it")


def _recorded_model(kb: KnowledgeBase) -> str:
    """The KB's own model, when no other is given; a recorded folder that is gone is an error that
    says what to do instead of a hub lookup of its path."""
    if Path(kb.model).is_absolute() and not Path(kb.model).exists():
        if kb.fingerprint is not None:
            hint = ("pass the model where it is now (`--embedding`; a moved or copied folder is recognised "
                    "by its weights)")
        else:
            hint = ("put it back there, or rebuild the knowledge base with `qtune kb build` (it records only "
                    "that path: a copy elsewhere cannot be recognised)")
        raise QtuneError(f"{kb.uri} was built with the embedding model at {kb.model}, which is no longer there; "
                         f"{hint}")
    return kb.model


def open_with_embedder(uri: str, embedding, token: str | None, load_embedder):
    """(the KB at `uri`, an embedder for it); `embedding` is a model name (loaded with
    `load_embedder(name)` once it is known to be the KB's model), a loaded embedder, or None (the
    KB's own model)."""
    from qtune.kb.store import KnowledgeBase

    store = KnowledgeBase.open(uri, token)
    try:
        if embedding is None:
            embedding = _recorded_model(store)
        if isinstance(embedding, str):
            check_embedder(store, embedding)
            embedding = load_embedder(embedding)
        store.check_model(dimension=embedding.dimension)
    except BaseException:
        store.close()
        raise
    return store, embedding


def build_kb(embedder: Embeds, faq_path: str | Path, uri: str, model_name: str, *, token: str | None = None,
             batch_size: int = 64) -> KnowledgeBase:
    """A new knowledge base at `uri` holding every entry of `faq_path`; returned open.

    The file is read and checked before anything is created, so bad data leaves no half-built KB.
    """
    from qtune.kb.store import KnowledgeBase

    entries = read_faq(faq_path)
    vectors = _embed_questions(embedder, entries, batch_size)
    kb = KnowledgeBase.create(uri, model=model_name, dimension=embedder.dimension, token=token,
                              fingerprint=embedder_fingerprint(model_name))
    try:
        kb.upsert(entries, vectors)
    except BaseException:
        kb.close()
        raise
    return kb


def add_entries(embedder: Embeds, kb: KnowledgeBase, entries: Sequence[FaqEntry], *,
                batch_size: int = 64) -> int:
    """Insert or replace entries (by id); returns how many were written."""
    kb.check_model(dimension=embedder.dimension)
    if not entries:
        return 0
    return kb.upsert(list(entries), _embed_questions(embedder, entries, batch_size))


def delete_entries(kb: KnowledgeBase, ids: Sequence[str]) -> int:
    """Delete entries by id; returns how many existed."""
    return kb.delete(ids)


class FaqMatcher:
    """Best FAQ entry for a user question: `FaqMatcher(embedder, kb).match("...")`.

    `rescorer` scores pairs (`ScoresPairs`: a reranker or a two-label pair classifier). Without
    `threshold`: the rescorer's calibrated threshold when it has one, else 0.5 with a rescorer,
    else 0.8 (cosine).
    """

    def __init__(self, embedder: Embeds, kb: KnowledgeBase, rescorer: ScoresPairs | None = None,
                 threshold: float | None = None, top_k: int = DEFAULT_TOP_K):
        kb.check_model(dimension=embedder.dimension)
        if rescorer is not None:
            rescorer.check_scorer()
        self.embedder, self.kb, self.rescorer, self.top_k = embedder, kb, rescorer, top_k
        self.rescored_by = None if rescorer is None else rescorer.scorer_kind
        if rescorer is None:
            default = DEFAULT_THRESHOLD_COSINE
        elif rescorer.default_threshold is not None:
            default = float(rescorer.default_threshold)
        else:
            default = DEFAULT_THRESHOLD_CLASSIFIER
        self.threshold = default if threshold is None else float(threshold)

    @property
    def tokenizers(self) -> list:
        """The tokenizers the stages use (the server lets one thread at a time use each)."""
        models = [self.embedder] if self.rescorer is None else [self.embedder, self.rescorer]
        return [m.loaded.tokenizer for m in models if getattr(m, "loaded", None) is not None]

    def query_text(self, query: str) -> str:
        """The query as the models can read it: no more characters than the longest of their max
        lengths can hold (the models cut the rest anyway), so a megabyte query is not tokenized
        once for the embedder and again for each candidate."""
        from qtune.tasks.requests import cut_chars

        if not isinstance(query, str) or not query.strip():
            raise QtuneError("the query is empty")
        lengths = [m.loaded.meta.max_length for m in (self.embedder, self.rescorer)
                   if getattr(getattr(m, "loaded", None), "meta", None) is not None]
        return cut_chars(query, max(lengths)) if lengths else query

    # The stages of `match`: the server runs the tokenizing ones on its prep threads and the model
    # calls on its model thread.
    def query_features(self, query: str) -> list[dict]:
        return self.embedder.features([self.query_text(query)], is_query=True)

    def recall(self, features: list[dict], top_k: int | None = None) -> list:
        """The `top_k` nearest FAQ entries of the query these features encode."""
        vector = self.embedder.run_batch(features)[0]  # (dim,) unit vector, as `embed` returns it
        return self.kb.search(vector, self.top_k if top_k is None else int(top_k))

    def pair_features(self, query: str, hits: list) -> list[dict]:
        if self.rescorer is None or not hits:
            return []
        query = self.query_text(query)
        return self.rescorer.pair_features([(query, h.question) for h in hits])

    def rescore(self, features: list[dict]) -> np.ndarray:
        """(len(features),) the rescorer's scores of (query, candidate) features."""
        return self.rescorer.feature_scores(features)

    def decide(self, hits: list, scores: Sequence[float] | None, threshold: float | None = None) -> dict:
        """The answer `match` returns, from the recalled `hits` and their rescored `scores` (None:
        their cosines)."""
        threshold = self.threshold if threshold is None else float(threshold)
        scores = [h.score for h in hits] if scores is None else [float(s) for s in scores]
        candidates = sorted(({"id": h.id, "question": h.question, "answer": h.answer, "score": s}
                             for h, s in zip(hits, scores)), key=lambda c: -c["score"])
        if not candidates:
            return {"matched": False, "id": None, "question": None, "answer": None, "score": None,
                    "candidates": []}
        best = candidates[0]
        return {"matched": best["score"] >= threshold, **best, "candidates": candidates}

    def match(self, query: str, top_k: int | None = None, threshold: float | None = None) -> dict:
        """{"matched", "id", "question", "answer", "score", "candidates": [{id, question, answer, score}]}.

        Candidates are sorted by score, best first; with an empty KB nothing matches and the
        best-entry fields are None. A query longer than the models read is cut (`query_text`).
        """
        hits = self.recall(self.query_features(query), top_k)
        scores = None
        if self.rescorer is not None and hits:
            scores = self.rescore(self.pair_features(query, hits))  # (k,)
        return self.decide(hits, scores, threshold)
