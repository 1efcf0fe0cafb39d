"""The public Python API: load, train, evaluate, predict, mine, export, serve and the FAQ knowledge
base. The CLI is a thin layer over these functions; the work happens in the layers below.

    >>> import qtune
    >>> clf = qtune.load("out/best")                       # a trained pair classifier
    >>> clf.predict([("How do I reset my password?", "I forgot my password")])
    >>> qtune.evaluate("pair-cls", model="out/best", data="dev.csv")
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Sequence

from qtune.config import build_config
from qtune.errors import QtuneError
from qtune.tasks import TASKS, Command, get, load_model, task_of


def load(name_or_path: str | Path, task: str | None = None, *, device: str = "auto", precision: str = "auto",
         labels: Sequence[str] | None = None, packing: bool = True):
    """Load a trained qtune folder (or a base model with `task=`) for inference: the task's wrapper
    (PairClassifier, Embedder, Reranker, Extractor, TextClassifier).

    `packing=False` runs decoders on padded batches instead of packed ones (same results)."""
    from qtune.modeling.loading import load_model as load_with_spec

    spec = task_of(name_or_path, task)
    return spec.wrap(load_with_spec(name_or_path, spec, labels=labels, device=device, precision=precision,
                                    packing=packing))


def train(task: str, config, on_step=None) -> dict:
    """Train `task` with its config dataclass; returns the metrics also written to `output/metrics.json`.

    `on_step(counts)` is called after each optimizer step (see `qtune.training.trainer.fit`)."""
    return get(task).train(config, on_step).metrics


def _command(kind: str, name: str) -> Command:
    commands = [t.commands[kind] for t in TASKS.values() if kind in t.commands]
    for command in commands:
        if command.name == name:
            return command
    raise QtuneError(f"unknown {kind} {name!r}; known: {', '.join(c.name for c in commands)}")


def _run(kind: str, name: str, config=None, **settings):
    command = _command(kind, name)
    if config is None:
        config = build_config(command.config, settings, source=f"{kind} {name}")
    return command.run(config, load)


def evaluate(task: str, config=None, **settings) -> dict:
    """`qtune eval TASK` (pair-cls, retrieval, rerank, extract, classify): the metrics of `model` (and
    `compare`) side by side, and a report folder with `output`. Settings are the fields of the
    task's evaluation config (or pass `config`)."""
    return _run("evaluation", task, config, **settings)


def predict(task: str, config=None, **settings):
    """`qtune predict TASK` (pair-cls, extract, classify): predictions for every row of `input`,
    written to `output` in input order."""
    return _run("prediction", task, config, **settings)


def calibrate(config=None, **settings) -> dict:
    """Find the reranker score threshold for "a good answer" on labelled (query, document, 0/1)
    pairs and store it in the model folder's qtune.json, where the server reads it."""
    return _run("calibration", "calibrate", config, **settings)


def mine(model: str, queries: str, corpus: str, output: str, settings=None, *, fmt: str = "flagembedding",
         batch_size: int = 64, device: str = "auto", precision: str = "auto") -> str:
    """Add hard negatives from `corpus` to each query group of `queries`; write them to `output`.

    Returns a one-line summary (how many queries got fewer negatives than asked)."""
    from qtune.mining import MiningSettings
    from qtune.tasks.embedding.mine import mine_file

    return mine_file(lambda: load(model, task="embedding", device=device, precision=precision), queries, corpus,
                     output, settings or MiningSettings(), fmt=fmt, batch_size=batch_size)


def export(model_dir: str, output: str) -> Path:
    """Merge LoRA weights into a plain transformers checkpoint."""
    from qtune.modeling.checkpoint import check_export_target, export_merged

    check_export_target(output)
    return export_merged(load_model(model_dir, device="cpu", precision="fp32"), output)


def length_stats(task: str, data: str, model: str, *, plot: str | Path | None = None,
                 **settings) -> tuple[dict, list[int]]:
    """Token lengths of each row of `data` exactly as training `task` encodes it, their summary
    (percentiles, suggested --max-length) and an optional histogram PNG."""
    from qtune.data.stats import length_summary, plot_lengths
    from qtune.modeling.loading import load_tokenizer_only

    spec = get(task)
    if spec.token_lengths is None:
        raise QtuneError(f"no token-length statistics for {task}")
    tokenizer, family = load_tokenizer_only(model)
    lengths = spec.token_lengths(data, tokenizer, family, **settings)
    summary = length_summary(lengths)
    if plot:
        unit = spec.stats_unit.split(" (")[0]
        plot_lengths(lengths, summary, plot, f"{Path(data).name}: tokens per {unit} ({Path(str(model)).name})")
    return summary, lengths


def retrieval_split(table: str, output: str, *, question_column: str = "question", passage_column: str = "context",
                    test_fraction: float = 0.1, seed: int = 42, skip_empty: bool = False) -> dict:
    """A QA table -> training JSONL + BEIR evaluation folder (seeded split by question)."""
    from qtune.data.retrieval import qa_table_to_retrieval

    return qa_table_to_retrieval(table, output, question_column=question_column, passage_column=passage_column,
                                 test_fraction=test_fraction, seed=seed, skip_empty=skip_empty)


def _classifiers(classifier: str | Sequence[str] | None) -> list[str]:
    return [] if not classifier else [classifier] if isinstance(classifier, str) else list(classifier)


def _load_classifier(name: str, **kwargs):
    """A trained folder is the classifier its qtune.json names (pair or text); a base model is taken
    as a pair classifier."""
    from qtune.modeling.loading import read_meta

    return load(name, task=None if read_meta(name) is not None else "pair-cls", **kwargs)


def serve(*, embedding: str | None = None, classifier: str | Sequence[str] | None = None,
          reranker: str | None = None, extractor: str | None = None, kb: str | None = None,
          kb_token: str | None = None, threshold: float | None = None, device: str = "auto", precision: str = "auto",
          **settings) -> None:
    """Load the models (and the knowledge base) and serve them until SIGTERM. `classifier`: one or
    more pair or text classifiers (/v1/classify routes pairs and texts to the right one)."""
    from qtune.serving import ServerSettings
    from qtune.serving import serve as run_server

    names = [n for n in (embedding, *_classifiers(classifier), reranker, extractor) if n]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # models are served (and chosen by clients) by name: one name, one model
        raise QtuneError(f"{', '.join(twice)}: given for more than one role; each served model needs its own "
                         "name (folder or hub id)")
    models = {}
    if embedding:
        models[embedding] = load(embedding, task="embedding", device=device, precision=precision)
    for name in _classifiers(classifier):
        models[name] = _load_classifier(name, device=device, precision=precision)
    if reranker:
        models[reranker] = load(reranker, task="reranker", device=device, precision=precision)
    if extractor:
        models[extractor] = load(extractor, task="extract", device=device, precision=precision)
    matcher = None
    if kb:
        if embedding:
            from qtune.kb.faq import check_embedder
            from qtune.kb.store import KnowledgeBase

            with KnowledgeBase.open(kb, kb_token) as store:
                check_embedder(store, embedding)
        # recall -> rerank -> threshold: a reranker rescores when served, else a pair classifier
        pair_scorers = [models[n] for n in _classifiers(classifier) if hasattr(models[n], "pair_scores")]
        rescorer = models[reranker] if reranker else next(iter(pair_scorers), None)
        matcher = faq_matcher(kb, models.get(embedding), rescorer, threshold=threshold, token=kb_token,
                              device=device)
    run_server(models, ServerSettings(**settings), matcher)


def kb_build(embedding: str, faq: str, kb: str, *, token: str | None = None, device: str = "auto") -> int:
    """A new knowledge base from an FAQ table (question, answer, optional id); returns the entry count."""
    from qtune.kb.faq import build_kb, model_name, read_faq

    read_faq(faq)  # data errors before any model loads
    embedder = load(embedding, task="embedding", device=device)
    with build_kb(embedder, faq, kb, model_name(embedding), token=token) as store:
        return store.count()


def kb_add(kb: str, faq: str, *, embedding: str | None = None, token: str | None = None, device: str = "auto") -> int:
    """Insert or replace entries by id (idempotent); returns how many were written."""
    from qtune.kb.faq import add_entries, open_with_embedder, read_faq

    entries = read_faq(faq)
    store, embedder = open_with_embedder(kb, embedding, token, partial(load, task="embedding", device=device))
    with store:
        return add_entries(embedder, store, entries)


def kb_delete(kb: str, ids: Sequence[str], *, token: str | None = None) -> int:
    from qtune.kb.faq import delete_entries
    from qtune.kb.store import KnowledgeBase

    with KnowledgeBase.open(kb, token) as store:
        return delete_entries(store, list(ids))


def faq_matcher(kb: str, embedder=None, classifier=None, *, reranker=None, threshold: float | None = None,
                token: str | None = None, device: str = "auto"):
    """A FaqMatcher over `kb`: recall with the KB's embedding model, then rescore with `reranker`
    (its calibrated threshold is the default) or else `classifier`, if given (names or loaded)."""
    from qtune.kb.faq import FaqMatcher, open_with_embedder

    if isinstance(reranker, str):
        reranker = load(reranker, task="reranker", device=device)
    if isinstance(classifier, str) and reranker is None:
        classifier = load(classifier, task="pair-cls", device=device)
    store, embedder = open_with_embedder(kb, embedder, token, partial(load, task="embedding", device=device))
    return FaqMatcher(embedder, store, reranker or classifier, threshold=threshold)


def kb_search(kb: str, query: str, *, top_k: int = 5, classifier: str | None = None, reranker: str | None = None,
              threshold: float | None = None, token: str | None = None, device: str = "auto",
              embedding: str | None = None) -> dict:
    matcher = faq_matcher(kb, embedding, classifier, reranker=reranker, threshold=threshold, token=token,
                          device=device)
    try:
        return matcher.match(query, top_k=top_k)
    finally:
        matcher.kb.close()
