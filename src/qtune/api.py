"""The public Python API: load, train, evaluate, predict, mine, export, serve and the FAQ knowledge
base. The CLI is a thin layer over these functions; the work happens in the layers below.

    >>> import qtune
    >>> clf = qtune.load("out/best")                       # a trained pair classifier
    >>> clf.predict([("How do I reset my password?", "I forgot my password")])
    >>> qtune.evaluate("pair-cls", model="out/best", data="dev.csv")
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import Sequence

from qtune.config import build_config
from qtune.errors import QtuneError
from qtune.tasks import TASKS, Command, get, load_model, serve_roles, shares_role, task_of
from qtune.tasks.base import resolve


def load(name_or_path: str | Path, task: str | None = None, *, device: str = "auto", precision: str = "auto",
         labels: Sequence[str] | None = None, packing: bool = True):
    """Load a trained qtune folder (or a base model with `task=`) for inference: the task's wrapper
    (PairClassifier, Embedder, Reranker, Extractor, TextClassifier).

    `packing=False` runs decoders (and BERT embedders and cross-encoders) on padded batches instead
    of packed ones (same results)."""
    from qtune.modeling.loading import load_model as load_with_spec

    spec = task_of(name_or_path, task)
    return spec.wrap(load_with_spec(name_or_path, spec, labels=labels, device=device, precision=precision,
                                    packing=packing))


def train(task: str, config, on_step=None) -> dict:
    """Train `task` with its config dataclass; returns the metrics also written to `output/metrics.json`.

    `on_step(counts)` is called after each optimizer step (see `qtune.training.trainer.fit`)."""
    return get(task).train(config, on_step).metrics


def _command(kind: str, name: str) -> Command:
    commands = [c for t in TASKS.values() for c in t.commands_of(kind)]
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
    """`qtune eval TASK` (pair-cls, retrieval, sts, rerank, extract, classify): the metrics of `model` (and
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
         batch_size: int = 64, device: str = "auto", precision: str = "auto", rescore_with: str | None = None,
         vector_cache: str | None = "auto") -> str:
    """Add hard negatives from `corpus` to each query group of `queries`; write them to `output`
    with the scores used (`pos_scores`, `neg_scores`). `rescore_with`: a reranker (or a base model
    usable as one) whose scores replace the embedder's before the rules. `vector_cache`: folder
    for corpus vectors ("auto": beside `output`; None: off). See `qtune.tasks.embedding.mine`.

    Returns two lines: the summary (how many queries got fewer negatives than asked) and what each
    rule removed, with the mean scores."""
    from qtune.mining import MiningSettings
    from qtune.tasks.embedding.mine import mine_with

    return mine_with(load, model, queries, corpus, output, settings or MiningSettings(), fmt=fmt,
                     batch_size=batch_size, device=device, precision=precision, rescore_with=rescore_with,
                     cache_dir=vector_cache)


def export(model_dir: str, output: str, fmt: str = "auto", test_report: str | None = None) -> Path:
    """Write the qtune folder `model_dir` at `output`, LoRA merged, in a format another engine loads
    with qtune's outputs (`fmt`: one of the task's `export_formats`; "auto": its first, e.g.
    sentence-transformers for an embedder). See `qtune.modeling.export`. Its README.md is a model
    card (`qtune.training.card`) with the run's dev figures against the base, and the test figures
    of `test_report` (the `--output` of `qtune eval ... --compare BASE`) when given. A model whose
    run ended no better than its base is exported with a warning."""
    from qtune.training.card import model_card, read_test_report
    from qtune.training.verdict import regression_warning
    from qtune.modeling.checkpoint import check_export_target
    from qtune.modeling.export import export_model

    spec = task_of(model_dir)
    fmt = _export_format(spec, fmt, model_dir)
    check_export_target(output)
    writer = resolve(f"{spec.exporter}:write_export") if spec.exporter else None
    report = read_test_report(test_report) if test_report else None
    warning = regression_warning(model_dir, model_dir)
    if warning:
        print(warning, file=sys.stderr)
    loaded = load_model(model_dir, device="cpu", precision="fp32")
    source = str(Path(model_dir).resolve()) if Path(model_dir).exists() else str(model_dir)
    card = partial(model_card, model_dir, meta=loaded.meta, pipeline_tag=spec.pipeline_tag,
                   library_name="sentence-transformers" if fmt == "sentence-transformers" else "transformers",
                   test_report=report, test_source=test_report)
    return export_model(loaded, output, task=spec.name, fmt=fmt, source=source, writer=writer,
                        card=lambda body: card(body=body))


def quantize(model_dir: str | Path, calibration: str | Path, *, task: str | None = None, samples: int = 300) -> Path:
    """Calibrate a static int8 graph of the embedding model folder `model_dir` on up to `samples`
    texts of `calibration` (a BEIR folder, a query-group JSONL or a corpus file; queries and
    passages in proportion, spread over the file) and write it into `model_dir`/openvino, where
    `--quantize int8` finds it (see `qtune.modeling.int8`). Returns the note it wrote."""
    from qtune.data.retrieval import read_calibration_texts
    from qtune.modeling.int8 import write_openvino_int8

    folder = Path(model_dir)
    if not folder.is_dir():
        raise QtuneError(f"qtune quantize writes into the model's folder and '{model_dir}' is not a local folder: "
                         f"save the model to a folder first")
    if samples < 1:
        raise QtuneError(f"--samples must be at least 1, got {samples}")
    spec = task_of(model_dir, task)
    if spec.name != "embedding":
        raise QtuneError(f"qtune quantize calibrates embedding models; '{model_dir}' is a {spec.name} model (its "
                         f"--quantize int8 stays dynamic)")
    passages, queries = read_calibration_texts(calibration)
    take_queries = round(samples * len(queries) / (len(queries) + len(passages)))
    passages, queries = _spread(passages, samples - take_queries), _spread(queries, take_queries)
    model = load(folder, spec.name, device="cpu", precision="fp32")
    features = model.features(passages, is_query=False) + model.features(queries, is_query=True)
    source = {"file": str(Path(calibration).resolve()), "passages": len(passages), "queries": len(queries)}
    return write_openvino_int8(model.loaded, folder, features, output=spec.int8_output, source=source)


def _spread(items: list, count: int) -> list:
    """`count` items spaced evenly over `items` (all of them when there are fewer)."""
    if count >= len(items):
        return list(items)
    return [items[i * len(items) // count] for i in range(count)]


def check_export(output: str | Path, model_dir: str | None = None, *,
                 texts: Sequence[str] | None = None) -> dict[str, float]:
    """Load the export `output` with each engine installed here and compare with qtune's own outputs
    of `model_dir` (default: the source its export note names) on `texts` (default: mixed-length
    samples): {engine: max abs difference}."""
    from qtune.modeling.export import EXPORT_NOTE, SAMPLE_TEXTS, read_export_note
    from qtune.modeling.loading import read_meta

    output = Path(output)
    if not output.is_dir():
        raise QtuneError(f"cannot check export '{output}': no such folder")
    if model_dir is None:
        note = read_export_note(output)
        if note is None:
            raise QtuneError(f"'{output}' has no {EXPORT_NOTE} saying which model it was exported from: pass --model")
        model_dir = note["source"]
        if not Path(model_dir).exists() and Path(model_dir).is_absolute():
            raise QtuneError(f"'{output}' was exported from {model_dir}, which is no longer there: pass --model")
    spec = task_of(model_dir)
    exported = read_meta(output)
    if exported is not None and exported.task != spec.name:
        raise QtuneError(f"'{output}' is an export of {get(exported.task).kind}, but '{model_dir}' is {spec.kind}")
    if spec.exporter is None:
        raise QtuneError(f"no engine checks for exports of {spec.kind}")
    model = load(model_dir, device="cpu", precision="fp32")
    return resolve(f"{spec.exporter}:check_export")(output, model, list(texts or SAMPLE_TEXTS))


def _export_format(spec, fmt: str, model_dir: str) -> str:
    from qtune.modeling.loading import read_meta

    formats = spec.formats_of(read_meta(model_dir))  # e.g. a mean-pooled classifier: sentence-transformers only
    if fmt == "auto":
        return formats[0]
    if fmt not in formats:
        raise QtuneError(f"{spec.kind} exports as {' or '.join(formats)}, not {fmt}")
    return fmt


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


def _listed(values: str | Sequence[str] | None) -> list[str]:
    return [] if not values else [values] if isinstance(values, str) else list(values)


def _served_task(source):
    """The task `source` (a `ServedSource`) is served as: its qtune.json's where its role is shared
    by several tasks (a classifier folder is a pair or a text classifier), else the role's task."""
    from qtune.modeling.loading import read_meta

    task = serve_roles()[source.role]
    return task_of(source.source, None if shares_role(task) and read_meta(source.source) is not None else task.name)


def _load_served(sources, specs: dict, *, device: str, precision: str, share_base: bool) -> dict[str, object]:
    """Served name -> wrapper, in flag order. LoRA adapters of one base model and one task are
    loaded onto one copy of the base (`qtune.modeling.adapters`) unless `share_base` is False;
    int8 exports merge each adapter, so they always load on their own."""
    from qtune.modeling.adapters import adapter_base, load_adapters
    from qtune.training.verdict import regression_warning

    for s in sources:  # a model whose training ended no better than its base is served, with a warning
        warning = regression_warning(s.name, s.source)
        if warning:
            print(warning, file=sys.stderr)
    groups: dict[tuple, list] = {}
    for s in sources:
        base = adapter_base(s.source) if share_base and precision != "int8" else None
        groups.setdefault((specs[s.name].name, base) if base is not None else (s.name,), []).append(s)
    models = {}
    for group in groups.values():
        spec = specs[group[0].name]
        if len(group) == 1:
            models[group[0].name] = load(group[0].source, task=spec.name, device=device, precision=precision)
            continue
        views = load_adapters([s.source for s in group], spec, device=device, precision=precision)
        models.update({s.name: spec.wrap(view) for s, view in zip(group, views)})
    return {s.name: models[s.name] for s in sources}


def _kb_embedder(kb: str, token: str | None, embedders: list):
    """The served embedding model (a `ServedSource`) that built `kb`: the first one the KB accepts;
    None when no embedding model is served (the KB's own is loaded then)."""
    if not embedders:
        return None
    from qtune.kb.faq import check_embedder
    from qtune.kb.store import KnowledgeBase

    refusals = []
    with KnowledgeBase.open(kb, token) as store:
        for source in embedders:
            try:
                check_embedder(store, source.source)
                return source
            except QtuneError as error:
                refusals.append(error)
    raise refusals[0]


def serve(*, kb: str | None = None, kb_token: str | None = None, threshold: float | None = None, device: str = "auto",
          precision: str = "auto", separate_adapters: bool = False, **settings) -> None:
    """Load the models (and the knowledge base) and serve them until SIGTERM.

    The models come as one keyword per serve role of the task registry (`qtune.tasks.serve_roles`:
    `embedding=`, `classifier=`, `reranker=`, `extractor=`), each one or more `DIR` or `NAME=DIR` (a
    folder or hub id); clients choose a model by its served name (see `qtune.serving.names`).
    `classifier`: pair and/or text classifiers (/v1/classify routes pairs and texts to the right
    one). LoRA adapters of one base model in one role share one copy of the base weights
    (`separate_adapters=True` loads each on its own). The other keywords are `ServerSettings`."""
    from qtune.serving import ServerSettings
    from qtune.serving import serve as run_server
    from qtune.serving.names import served_sources

    sources = served_sources({role: _listed(settings.pop(role, None)) for role in serve_roles()})
    specs = {s.name: _served_task(s) for s in sources}
    recall = [s for s in sources if specs[s.name].kb_recall]
    kb_embedder = _kb_embedder(kb, kb_token, recall) if kb else None
    models = _load_served(sources, specs, device=device, precision=precision, share_base=not separate_adapters)
    matcher = None
    if kb:
        # recall -> rerank -> threshold: the served model whose task ranks first as a rescorer
        # (a reranker before a pair classifier), in flag order among equals
        ranked = sorted((specs[s.name].kb_rescore_rank, i) for i, s in enumerate(sources)
                        if specs[s.name].kb_rescore_rank is not None)
        rescorer = models[sources[ranked[0][1]].name] if ranked else None
        matcher = faq_matcher(kb, models[kb_embedder.name] if kb_embedder else None, rescorer, threshold=threshold,
                              token=kb_token, device=device)
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
