"""The public Python API. The CLI is a thin layer over these functions.

    >>> import qtune
    >>> clf = qtune.load("out/best")                       # a trained pair classifier
    >>> clf.predict([("How do I reset my password?", "I forgot my password")])
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from qtune.config import EmbeddingConfig, ExtractConfig, PairClsConfig, RerankerConfig, config_to_yaml
from qtune.errors import QtuneError
from qtune.io import write_text
from qtune.modeling.loading import LoadedModel, LoraSettings, load_model


@dataclass(frozen=True)
class PairPrediction:
    label: str
    score: float  # probability of the positive (last) label
    probs: tuple[float, ...]


class PairClassifier:
    """A loaded pair classifier: `predict([(a, b), ...])`."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded

    @property
    def labels(self) -> list[str]:
        return list(self.loaded.meta.labels)

    def _encoder(self):
        from qtune.tasks.pair_classification import PairEncoder

        return PairEncoder(self.loaded.tokenizer, self.loaded.family.is_decoder, self.loaded.meta.max_length)

    def predict_proba(self, pairs: Iterable[tuple[str, str]], batch_size: int = 64,
                      progress: bool = False) -> np.ndarray:
        """(len(pairs), num_labels) class probabilities, in input order."""
        from qtune.tasks.pair_classification import predict_probs

        encoder = self._encoder()
        features = [encoder.encode(a, b) for a, b in pairs]
        if not features:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return predict_probs(self.loaded, features, batch_size=batch_size, progress=progress)

    def predict(self, pairs: Iterable[tuple[str, str]], batch_size: int = 64, threshold: float | None = None,
                progress: bool = False) -> list[PairPrediction]:
        """Label and probabilities per pair. With two labels, `threshold` on the positive
        probability replaces argmax (e.g. the one `qtune eval pair-cls` found)."""
        probs = self.predict_proba(pairs, batch_size=batch_size, progress=progress)
        if threshold is not None and len(self.labels) != 2:
            raise QtuneError("a threshold needs exactly two labels")
        if threshold is None:
            chosen = probs.argmax(axis=1)
        else:
            chosen = (probs[:, 1] >= threshold).astype(int)
        return [PairPrediction(self.labels[c], float(p[-1]), tuple(float(x) for x in p)) for c, p in zip(chosen, probs)]


def load(name_or_path: str | Path, task: str | None = None, *, device: str = "auto", precision: str = "auto",
         labels: Sequence[str] | None = None, packing: bool = True):
    """Load a trained qtune folder (or a base model with `task=`) for inference.

    `packing=False` runs decoders on padded batches instead of packed ones (same results)."""
    loaded = load_model(name_or_path, task=task, labels=labels, device=device, precision=precision,
                        packing=packing)
    if loaded.meta.task == "pair-cls":
        return PairClassifier(loaded)
    if loaded.meta.task == "embedding":
        from qtune.modeling.embedding import Embedder

        return Embedder(loaded)
    if loaded.meta.task == "reranker":
        from qtune.modeling.reranker import Reranker

        return Reranker(loaded)
    if loaded.meta.task == "extract":
        from qtune.tasks.extraction import Extractor

        return Extractor(loaded)
    raise QtuneError(f"no inference API for task {loaded.meta.task!r} yet")


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_pair_cls(config: PairClsConfig, on_step=None) -> dict:
    """Fine-tune a pair classifier; returns the metrics also written to `output/metrics.json`.

    `on_step(counts)` is called after each optimizer step (see `qtune.training.trainer.fit`).
    """
    return _train_pair_cls(config, on_step)[1]


def _train_pair_cls(config: PairClsConfig, on_step=None) -> tuple[LoadedModel, dict]:
    """Training, returning the model as it stands at the end too (it equals `output/last`)."""
    from functools import partial

    from qtune.data.pairs import read_pairs
    from qtune.tasks import pair_classification as task
    from qtune.training.trainer import TaskHooks, fit

    read = partial(read_pairs, text_columns=config.text_columns, label_column=config.label_column,
                   labels=config.labels)
    # Every data problem surfaces here, before a model is loaded or a file written.
    train_pairs = read(config.train)
    eval_pairs = read(config.eval) if config.eval else None

    lora = None if config.full else LoraSettings(config.lora_r, config.lora_alpha, config.lora_dropout,
                                                 config.lora_targets)
    loaded = _start_run(config, "pair-cls", lora=lora, labels=config.labels)
    encoder = task.PairEncoder(loaded.tokenizer, loaded.family.is_decoder, config.max_length)
    features = encoder.encode_pairs(train_pairs)
    evaluate = None
    if eval_pairs is not None:
        eval_features = encoder.encode_pairs(eval_pairs)
        y_true = [p.label for p in eval_pairs]

        def evaluate(model: LoadedModel) -> dict:
            probs = task.predict_probs(model, eval_features, batch_size=config.eval_batch_size)
            return task.metrics_from_probs(y_true, probs, config.labels)

    hooks = TaskHooks(collate=partial(task.collate, loaded.tokenizer, packed=loaded.packs), loss=task.loss,
                      evaluate=evaluate, best_metric="macro_f1")
    result = fit(config, loaded, features, hooks, resume_state=_resume_state(config), on_step=on_step)
    return loaded, result


def _resume_state(config) -> Path | None:
    from qtune.training.trainer import STATE_FILE

    return Path(config.output, "last", STATE_FILE) if config.resume else None


def _start_run(config, task: str, *, lora: LoraSettings | None, validate=None, **load_kwargs) -> LoadedModel:
    """Checks the output folder, seeds, loads the model (fresh or from last/), runs `validate(loaded)`
    (settings that need the model) and only then writes config.yaml.

    Called after the data was read, so bad data never gets this far.
    """
    from qtune.training.trainer import STATE_FILE

    output = Path(config.output)
    last = output / "last"
    if config.resume and not (last / STATE_FILE).is_file():
        raise QtuneError(f"nothing to resume: {last / STATE_FILE} does not exist")
    if not config.resume and last.exists():
        raise QtuneError(f"{output} already holds a run; pass --resume to continue it or choose another --output")
    _seed_everything(config.seed)
    common = dict(task=task, trainable=True, device=config.device, precision=config.precision,
                  packing=config.packing)
    if config.resume:
        loaded = load_model(last, **common)
    else:
        loaded = load_model(config.model, max_length=config.max_length, lora=lora, **common, **load_kwargs)
    if validate is not None:
        validate(loaded)
    write_text(output / "config.yaml", config_to_yaml(dataclasses.replace(config, resume=False)))
    return loaded


def train_embedding(config: EmbeddingConfig, on_step=None) -> dict:
    """Contrastive fine-tuning of an embedder; returns the metrics written to `output/metrics.json`."""
    return _train_embedding(config, on_step)[1]


def _train_embedding(config: EmbeddingConfig, on_step=None) -> tuple[LoadedModel, dict]:
    from functools import partial

    from qtune.data.retrieval import read_beir, read_query_groups
    from qtune.evaluation.retrieval import evaluate_retrieval
    from qtune.modeling.embedding import Embedder
    from qtune.tasks import embedding as task
    from qtune.training.trainer import TaskHooks, fit

    groups = read_query_groups(config.train)
    eval_set = read_beir(config.eval) if config.eval else None
    lora = None if config.full else LoraSettings(config.lora_r, config.lora_alpha, config.lora_dropout,
                                                 config.lora_targets)
    def validate(model: LoadedModel) -> None:
        width = Embedder(model).dimension
        if config.matryoshka_dims and not all(0 < d <= width for d in config.matryoshka_dims):
            raise QtuneError(f"--matryoshka-dims must be between 1 and the model's {width} dimensions")

    loaded = _start_run(config, "embedding", lora=lora, validate=validate)
    if config.query_instruction is not None and not config.resume:
        loaded.meta.query_instruction = config.query_instruction or None
    embedder = Embedder(loaded)
    features = task.group_features(groups, embedder.features, config.hard_negatives)
    settings = task.ContrastiveSettings(pooling=loaded.meta.pooling, temperature=config.temperature,
                                        false_negative_offset=config.false_negative_offset,
                                        matryoshka_dims=tuple(config.matryoshka_dims or ()),
                                        mini_batch_size=config.mini_batch_size)
    evaluate = None
    if eval_set is not None:
        def evaluate(model: LoadedModel) -> dict:
            return evaluate_retrieval(Embedder(model), eval_set, top_k=config.eval_top_k,
                                      batch_size=config.eval_batch_size)

    hooks = TaskHooks(
        collate=partial(task.collate, loaded.tokenizer, packed=loaded.packs), loss=partial(task.loss, settings=settings),
        evaluate=evaluate, best_metric="ndcg@10",
        batches=lambda epoch: task.unique_text_batches(features, config.batch_size, seed=config.seed, epoch=epoch),
        backward=(lambda model, batch, scale: task.cached_backward(model, batch, settings, scale))
        if config.cached else None)
    result = fit(config, loaded, features, hooks, resume_state=_resume_state(config), on_step=on_step)
    return loaded, result


def _lora(config) -> LoraSettings | None:
    return None if config.full else LoraSettings(config.lora_r, config.lora_alpha, config.lora_dropout,
                                                 config.lora_targets)


def train_reranker(config: RerankerConfig, on_step=None) -> dict:
    """Listwise (or pointwise) reranker training on query groups; returns the final metrics."""
    return _train_reranker(config, on_step)[1]


def _train_reranker(config: RerankerConfig, on_step=None) -> tuple[LoadedModel, dict]:
    from functools import partial

    from qtune.data.batching import length_grouped_batches
    from qtune.data.retrieval import read_query_groups
    from qtune.modeling.reranker import Reranker
    from qtune.tasks import reranker as task
    from qtune.training.trainer import TaskHooks, fit

    groups = read_query_groups(config.train)
    eval_groups = read_query_groups(config.eval) if config.eval else None
    for path, found in ((config.train, groups), (config.eval, eval_groups)):
        if found is not None and not any(g.negatives for g in found):
            raise QtuneError(f"{path}: no group has a negative, so there is nothing to rank "
                             "(add them with `qtune mine`)")

    def validate(model: LoadedModel) -> None:  # settings that need the tokenizer, before anything is written
        Reranker(model).formatter.encode("query", "document")

    loaded = _start_run(config, "reranker", lora=_lora(config), validate=validate)
    if config.instruction is not None and not config.resume and loaded.family.is_decoder:
        loaded.meta.instruction = config.instruction
    reranker = Reranker(loaded)
    features, dropped = task.group_features(groups, reranker.formatter.encode, config.group_size)
    if dropped:
        print(f"{dropped} of {len(groups)} training groups have no negative and are left out")
    settings = task.RerankSettings(group_size=config.group_size, loss=config.loss)
    evaluate = None
    if eval_groups is not None:
        scored = [g for g in eval_groups if g.negatives]
        eval_features = [reranker.formatter.encode(g.query, d) for g in scored for d in (g.positives[0], *g.negatives)]
        bounds = np.cumsum([0] + [1 + len(g.negatives) for g in scored])

        def evaluate(model: LoadedModel) -> dict:
            scores = Reranker(model).score_features(eval_features, batch_size=config.eval_batch_size)
            return task.group_ranking_metrics([scores[a:b] for a, b in zip(bounds[:-1], bounds[1:])])

    lengths = [f["length"] for f in features]
    hooks = TaskHooks(
        collate=partial(task.collate, loaded.tokenizer, packed=loaded.packs),
        loss=partial(task.loss, prompt=reranker.formatter.prompt, settings=settings),
        evaluate=evaluate, best_metric="mrr",
        batches=lambda epoch: length_grouped_batches(lengths, config.batch_size, seed=config.seed, epoch=epoch))
    result = fit(config, loaded, features, hooks, resume_state=_resume_state(config), on_step=on_step)
    return loaded, result


def train_extract(config: ExtractConfig, on_step=None) -> dict:
    """Supervised fine-tuning for JSON extraction; returns the final metrics."""
    return _train_extract(config, on_step)[1]


def _train_extract(config: ExtractConfig, on_step=None) -> tuple[LoadedModel, dict]:
    from collections import Counter
    from functools import partial

    from qtune.data.extraction import read_extraction
    from qtune.tasks import extraction as task
    from qtune.training.trainer import TaskHooks, fit

    examples = read_extraction(config.train)
    eval_examples = read_extraction(config.eval) if config.eval else None
    loaded = _start_run(config, "extract", lora=_lora(config), validate=lambda m: task.PromptBuilder(m.tokenizer))
    if not config.resume:
        given = Counter(e.instruction for e in examples if e.instruction)
        loaded.meta.instruction = config.instruction or (given.most_common(1)[0][0] if given else None)
    if config.gradient_checkpointing:
        loaded.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    builder = task.PromptBuilder(loaded.tokenizer, loaded.meta.instruction)
    features, too_long = task.encode_examples(builder, examples, config.max_length, config.train)
    if too_long:
        shown = ", ".join(str(line) for line in too_long[:10]) + (" ..." if len(too_long) > 10 else "")
        print(f"{len(too_long)} of {len(examples)} training examples are longer than --max-length "
              f"{config.max_length} and are left out (lines {shown})")
    evaluate = None
    if eval_examples is not None:
        def evaluate(model: LoadedModel) -> dict:
            from qtune.evaluation.extraction import extraction_metrics

            found = task.Extractor(model).extract_examples(eval_examples, batch_size=config.eval_batch_size,
                                                           max_new_tokens=config.max_new_tokens)
            return extraction_metrics([e.output for e in eval_examples], [r.output for r in found])

    hooks = TaskHooks(collate=partial(task.collate, loaded.tokenizer, packed=loaded.packs), loss=task.loss,
                      evaluate=evaluate, best_metric="all_fields_exact")
    result = fit(config, loaded, features, hooks, resume_state=_resume_state(config), on_step=on_step)
    return loaded, result


TRAINERS = {"pair-cls": train_pair_cls, "embedding": train_embedding, "reranker": train_reranker,
            "extract": train_extract}


def train(task: str, config) -> dict:
    try:
        return TRAINERS[task](config)
    except KeyError:
        raise QtuneError(f"unknown task {task!r}; known: {', '.join(TRAINERS)}") from None


def evaluate_pair_cls(model: str, data: str, *, compare: str | None = None, output: str | None = None,
                      batch_size: int = 64, device: str = "auto", precision: str = "auto",
                      text_columns: Sequence[str] = ("sentence1", "sentence2"), label_column: str = "label") -> dict:
    """Metrics for one model (or two side by side) on a labelled pair file; optional report folder."""
    from qtune.data.pairs import read_pairs
    from qtune.evaluation.report import write_pair_cls_outputs
    from qtune.modeling.loading import read_meta
    from qtune.tasks.pair_classification import metrics_from_probs

    results = {}
    for name in [model] + ([compare] if compare else []):
        meta = read_meta(name)
        labels = meta.labels if meta else ["0", "1"]
        pairs = read_pairs(data, text_columns=text_columns, label_column=label_column, labels=labels)
        clf = load(name, task="pair-cls", device=device, precision=precision)
        probs = clf.predict_proba([(p.sentence1, p.sentence2) for p in pairs], batch_size=batch_size, progress=True)
        results[name] = metrics_from_probs([p.label for p in pairs], probs, labels)
    if output:
        write_pair_cls_outputs(results, str(data), output)
    return results


def predict_pair_cls_file(model: str, input: str, output: str, *, batch_size: int = 64, threshold: float | None = None,
                          device: str = "auto", precision: str = "auto",
                          text_columns: Sequence[str] = ("sentence1", "sentence2")) -> int:
    """Predict every row of `input` and write it, with `predicted_label` and `probability`
    (of the positive label), to `output` (CSV, TSV or JSONL by extension). Returns the row count."""
    from qtune.data.pairs import pairs_from_rows
    from qtune.data.tables import read_table, table_format, write_table

    table_format(output)  # fail on an unsupported output type before any work
    rows, names = read_table(input, text_columns)
    pairs = pairs_from_rows(rows, input, text_columns=text_columns, labels=None)
    clf = load(model, task="pair-cls", device=device, precision=precision)
    predictions = clf.predict([(p.sentence1, p.sentence2) for p in pairs], batch_size=batch_size,
                              threshold=threshold, progress=True)
    added = ["predicted_label", "probability"]  # replaced, not repeated, when the input has them
    out_rows = [{**row.fields, "predicted_label": pred.label, "probability": round(pred.score, 6)}
                for row, pred in zip(rows, predictions)]
    write_table(output, out_rows, [*[n for n in names if n not in added], *added])
    return len(out_rows)


def export(model_dir: str, output: str) -> Path:
    """Merge LoRA weights into a plain transformers checkpoint."""
    from qtune.modeling.checkpoint import export_merged

    return export_merged(model_dir, output)


def pair_length_stats(data: str, model: str, *, text_columns: Sequence[str] = ("sentence1", "sentence2"),
                      plot: str | Path | None = None) -> tuple[dict, list[int]]:
    """Token lengths of each pair exactly as training encodes it (both sentences, special tokens)."""
    from qtune.data.pairs import pairs_from_rows
    from qtune.data.stats import length_summary, plot_lengths
    from qtune.data.tables import read_table
    from qtune.modeling.loading import load_tokenizer_only
    from qtune.tasks.pair_classification import PairEncoder

    rows, _ = read_table(data, text_columns)
    pairs = pairs_from_rows(rows, data, text_columns=text_columns, labels=None)
    tokenizer, family = load_tokenizer_only(model)
    encoder = PairEncoder(tokenizer, family.is_decoder, max_length=None)
    lengths = [len(encoder.encode(p.sentence1, p.sentence2)["input_ids"]) for p in pairs]
    summary = length_summary(lengths)
    if plot:
        plot_lengths(lengths, summary, plot, f"{Path(data).name}: tokens per pair ({Path(str(model)).name})")
    return summary, lengths


def extraction_length_stats(data: str, model: str, *, plot: str | Path | None = None) -> tuple[dict, list[int]]:
    """Tokens per extraction example exactly as `train extract` encodes it (chat prompt + answer + EOS).

    Examples above the chosen --max-length are left out of training, so the suggestion covers 99%."""
    from qtune.data.extraction import read_extraction
    from qtune.data.stats import length_summary, plot_lengths
    from qtune.modeling.loading import load_tokenizer_only
    from qtune.tasks.extraction import PromptBuilder

    examples = read_extraction(data)
    tokenizer, _ = load_tokenizer_only(model)
    builder = PromptBuilder(tokenizer)
    lengths = [len(builder.encode(e)["input_ids"]) for e in examples]
    summary = length_summary(lengths)
    if plot:
        plot_lengths(lengths, summary, plot, f"{Path(data).name}: tokens per example ({Path(str(model)).name})")
    return summary, lengths


def evaluate_retrieval_models(model: str, data: str, *, compare: str | None = None, output: str | None = None,
                              triplets: str | None = None, top_k: int = 100, batch_size: int = 64,
                              reranker: str | None = None, rerank_top_k: int = 100, rerank_batch_size: int = 32,
                              device: str = "auto", precision: str = "auto") -> dict:
    """nDCG/Recall/MRR/MAP of one embedder (or two side by side) on a BEIR folder; optional report.

    With `reranker`, each embedder's top `rerank_top_k` are also reranked and scored (two stages).
    """
    from qtune.data.retrieval import read_beir, read_query_groups
    from qtune.evaluation.retrieval import (rerank_run, retrieve, triplet_margin,
                                            write_retrieval_outputs)
    from qtune.evaluation.retrieval_metrics import retrieval_metrics

    data_set = read_beir(data)
    groups = read_query_groups(triplets) if triplets else None
    scorer = load(reranker, task="reranker", device=device, precision=precision) if reranker else None
    results = {}
    for name in [model] + ([compare] if compare else []):
        embedder = load(name, task="embedding", device=device, precision=precision)
        run = retrieve(embedder, data_set, top_k=max(top_k, rerank_top_k if scorer else 0), batch_size=batch_size,
                       progress=True)
        results[name] = retrieval_metrics({q: docs[:top_k] for q, docs in run.items()}, data_set.qrels)
        if groups is not None:
            results[name]["triplet_margin"] = triplet_margin(embedder, groups, batch_size=batch_size)
        if scorer is not None:
            reranked = rerank_run(scorer, data_set, run, top_k=rerank_top_k, batch_size=rerank_batch_size,
                                  progress=True)
            results[_two_stage_name(name, reranker)] = retrieval_metrics(
                {q: docs[:top_k] for q, docs in reranked.items()}, data_set.qrels)
    if output:
        baseline = model if scorer is not None and not compare else None
        write_retrieval_outputs(results, str(data), output, baseline=baseline)
    return results


def _two_stage_name(retriever: str, reranker: str) -> str:
    from qtune.evaluation.report import short_name

    return f"{short_name(retriever)} + {short_name(reranker)}"


def evaluate_rerank(model: str, data: str, retriever: str, *, compare: str | None = None, top_k: int = 100,
                    output: str | None = None, batch_size: int = 32, retriever_batch_size: int = 64,
                    device: str = "auto", precision: str = "auto") -> dict:
    """Two-stage quality on a BEIR folder: the retriever alone, then its top `top_k` reranked by
    `model` (and by `compare`), side by side. Keys: the retriever's name, then one per reranker."""
    from qtune.data.retrieval import read_beir
    from qtune.evaluation.retrieval import rerank_run, retrieve, write_retrieval_outputs
    from qtune.evaluation.retrieval_metrics import retrieval_metrics

    data_set = read_beir(data)
    embedder = load(retriever, task="embedding", device=device, precision=precision)
    run = retrieve(embedder, data_set, top_k=top_k, batch_size=retriever_batch_size, progress=True)
    del embedder
    results = {retriever: retrieval_metrics(run, data_set.qrels)}
    for name in [model] + ([compare] if compare else []):
        reranker = load(name, task="reranker", device=device, precision=precision)
        reranked = rerank_run(reranker, data_set, run, top_k=top_k, batch_size=batch_size, progress=True)
        results[_two_stage_name(retriever, name)] = retrieval_metrics(reranked, data_set.qrels)
    if output:
        write_retrieval_outputs(results, str(data), output, baseline=retriever, title="Reranking")
    return results


def calibrate(model: str, data: str, *, min_precision: float | None = None, output: str | None = None,
              text_columns: Sequence[str] = ("sentence1", "sentence2"), label_column: str = "label",
              batch_size: int = 32, device: str = "auto", precision: str = "auto") -> dict:
    """Find the reranker score threshold for "a good answer" on labelled (query, document, 0/1)
    pairs and store it in the model folder's qtune.json, where the server reads it."""
    from dataclasses import replace

    from qtune.data.pairs import read_pairs
    from qtune.evaluation.metrics import calibrate_threshold
    from qtune.io import write_json

    folder = Path(model)
    if not folder.is_dir():
        raise QtuneError(f"{model}: the threshold is stored in the model folder; give a local folder "
                         "(a hub model can be saved with save_pretrained first)")
    pairs = read_pairs(data, text_columns=text_columns, label_column=label_column, labels=["0", "1"])
    reranker = load(model, task="reranker", device=device, precision=precision)
    scores = reranker.score([(p.sentence1, p.sentence2) for p in pairs], batch_size=batch_size, progress=True)
    try:
        found = calibrate_threshold([p.label for p in pairs], scores, min_precision=min_precision)
    except ValueError as e:
        raise QtuneError(f"{data}: {e}") from None
    replace(reranker.loaded.meta, threshold=found["threshold"], adapter=reranker.loaded.is_adapter).save(folder)
    if output:
        write_json(Path(output) / "metrics.json", {"model": model, "data": str(data), **found})
    return found


def extract_file(model: str, input: str, output: str, *, batch_size: int = 16, max_new_tokens: int = 256,
                 device: str = "auto", precision: str = "auto") -> dict:
    """Extract every row of a JSONL file ({input, instruction?}); rows are written in input order with
    `output` (parsed JSON, or null and an `error`). Returns counts (rows, parsed, failed)."""
    from qtune.data.extraction import read_extraction
    from qtune.data.tables import table_format
    from qtune.io import write_jsonl

    if table_format(output) != "jsonl":
        raise QtuneError(f"{output}: extraction results are written as JSONL (.jsonl)")
    examples = read_extraction(input, require_output=False)
    extractor = load(model, task="extract", device=device, precision=precision)
    found = extractor.extract_examples(examples, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=True)
    rows = []
    for example, result in zip(examples, found):
        row = {"input": example.input, "output": result.output}
        if example.instruction is not None:
            row = {"instruction": example.instruction, **row}
        if result.error is not None:
            row["error"] = result.error
            row["raw"] = result.text
        rows.append(row)
    write_jsonl(output, rows)
    failed = sum(r.error is not None for r in found)
    return {"rows": len(found), "parsed": len(found) - failed, "failed": failed}


def evaluate_extract(model: str, data: str, *, compare: str | None = None, output: str | None = None,
                     batch_size: int = 16, max_new_tokens: int = 256, device: str = "auto",
                     precision: str = "auto") -> dict:
    """JSON validity and field exact match of one model (or two side by side) on a labelled JSONL."""
    from qtune.data.extraction import read_extraction
    from qtune.evaluation.extraction import extraction_metrics, write_extraction_outputs

    examples = read_extraction(data)
    results = {}
    for name in [model] + ([compare] if compare else []):
        extractor = load(name, task="extract", device=device, precision=precision)
        found = extractor.extract_examples(examples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                           progress=True)
        results[name] = extraction_metrics([e.output for e in examples], [r.output for r in found])
    if output:
        write_extraction_outputs(results, str(data), output)
    return results


def mine(model: str, queries: str, corpus: str, output: str, settings=None, *, fmt: str = "flagembedding",
         batch_size: int = 64, device: str = "auto", precision: str = "auto") -> str:
    """Add hard negatives from `corpus` to each query group of `queries`; write them to `output`.

    Returns a one-line summary (how many queries got fewer negatives than asked).
    """
    from qtune.data.retrieval import read_corpus, read_query_groups, write_query_groups
    from qtune.data.tables import table_format
    from qtune.mining import MiningSettings, mine_hard_negatives, summarize

    settings = settings or MiningSettings()
    if table_format(output) != "jsonl":
        raise QtuneError(f"{output}: mined data is written as JSONL (.jsonl)")
    groups = read_query_groups(queries)
    passages = read_corpus(corpus)
    texts = list(passages.values())
    ids_by_text: dict[str, list[int]] = {}
    for i, text in enumerate(texts):
        ids_by_text.setdefault(text, []).append(i)

    embedder = load(model, task="embedding", device=device, precision=precision)
    corpus_vecs = embedder.embed(texts, batch_size=batch_size, progress=True)
    query_vecs = embedder.embed([g.query for g in groups], is_query=True, batch_size=batch_size, progress=True)
    # Each group's lowest positive score (positives need not be in the corpus).
    flat = [p for g in groups for p in g.positives]
    pos_vecs = embedder.embed(flat, batch_size=batch_size, progress=True)
    starts = np.cumsum([0] + [len(g.positives) for g in groups])
    positive_scores = np.array([(pos_vecs[a:b] @ query_vecs[i]).min() for i, (a, b)
                                in enumerate(zip(starts[:-1], starts[1:]))], dtype=np.float32)
    positive_ids = [{j for p in g.positives for j in ids_by_text.get(p, ())} for g in groups]
    result = mine_hard_negatives(query_vecs, corpus_vecs, positive_ids, positive_scores, settings)
    # Mined negatives replace any the input had; a passage equal to a positive never becomes one.
    mined = [dataclasses.replace(g, negatives=tuple(texts[j] for j in chosen if texts[j] not in g.positives))
             for g, chosen in zip(groups, result.negatives)]
    write_query_groups(output, mined, fmt=fmt)
    return summarize(result, settings)


def retrieval_split(table: str, output: str, *, question_column: str = "question", passage_column: str = "context",
                    test_fraction: float = 0.1, seed: int = 42, skip_empty: bool = False) -> dict:
    """A QA table -> training JSONL + BEIR evaluation folder (seeded split by question)."""
    from qtune.data.retrieval import qa_table_to_retrieval

    return qa_table_to_retrieval(table, output, question_column=question_column, passage_column=passage_column,
                                 test_fraction=test_fraction, seed=seed, skip_empty=skip_empty)


def serve(*, embedding: str | None = None, classifier: str | None = None, reranker: str | None = None,
          extractor: str | None = None, kb: str | None = None, kb_token: str | None = None,
          threshold: float | None = None, device: str = "auto", precision: str = "auto", **settings) -> None:
    """Load the models (and the knowledge base) and serve them until SIGTERM."""
    from qtune.serving import ServerSettings
    from qtune.serving import serve as run_server

    models = {}
    if embedding:
        models[embedding] = load(embedding, task="embedding", device=device, precision=precision)
    if classifier:
        models[classifier] = load(classifier, task="pair-cls", device=device, precision=precision)
    if reranker:
        models[reranker] = load(reranker, task="reranker", device=device, precision=precision)
    if extractor:
        models[extractor] = load(extractor, task="extract", device=device, precision=precision)
    matcher = None
    if kb:
        if embedding:
            from qtune.kb.store import KnowledgeBase

            with KnowledgeBase.open(kb, kb_token) as store:
                store.check_model(_model_name(embedding))
        # recall -> rerank -> threshold: a reranker rescores when served, else the classifier
        rescorer = models.get(reranker) if reranker else models.get(classifier)
        matcher = faq_matcher(kb, models.get(embedding), rescorer, threshold=threshold, token=kb_token,
                              device=device)
    run_server(models, ServerSettings(**settings), matcher)


def _model_name(name_or_path: str) -> str:
    """How a knowledge base records its embedding model: an absolute path, or the hub id."""
    return str(Path(name_or_path).resolve()) if Path(name_or_path).exists() else str(name_or_path)


def _open_kb_with_embedder(kb: str, embedding, token: str | None, device: str):
    """The KB and an embedder for it; `embedding` is a name, a loaded Embedder or None (the KB's own)."""
    from qtune.kb.store import KnowledgeBase

    store = KnowledgeBase.open(kb, token)
    try:
        if embedding is None:
            embedding = store.model
        if isinstance(embedding, str):
            store.check_model(_model_name(embedding))
            embedding = load(embedding, task="embedding", device=device)
        store.check_model(dimension=embedding.dimension)
    except BaseException:
        store.close()
        raise
    return store, embedding


def kb_build(embedding: str, faq: str, kb: str, *, token: str | None = None, device: str = "auto") -> int:
    """A new knowledge base from an FAQ table (question, answer, optional id); returns the entry count."""
    from qtune.kb.faq import build_kb, read_faq

    read_faq(faq)  # data errors before any model loads
    embedder = load(embedding, task="embedding", device=device)
    with build_kb(embedder, faq, kb, _model_name(embedding), token=token) as store:
        return store.count()


def kb_add(kb: str, faq: str, *, embedding: str | None = None, token: str | None = None, device: str = "auto") -> int:
    """Insert or replace entries by id (idempotent); returns how many were written."""
    from qtune.kb.faq import add_entries, read_faq

    entries = read_faq(faq)
    store, embedder = _open_kb_with_embedder(kb, embedding, token, device)
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
    from qtune.kb.faq import FaqMatcher

    if isinstance(reranker, str):
        reranker = load(reranker, task="reranker", device=device)
    if isinstance(classifier, str) and reranker is None:
        classifier = load(classifier, task="pair-cls", device=device)
    store, embedder = _open_kb_with_embedder(kb, embedder, token, device)
    return FaqMatcher(embedder, store, reranker or classifier, threshold=threshold)


def kb_search(kb: str, query: str, *, top_k: int = 5, classifier: str | None = None, reranker: str | None = None,
              threshold: float | None = None, token: str | None = None, device: str = "auto") -> dict:
    matcher = faq_matcher(kb, None, classifier, reranker=reranker, threshold=threshold, token=token, device=device)
    try:
        return matcher.match(query, top_k=top_k)
    finally:
        matcher.kb.close()
