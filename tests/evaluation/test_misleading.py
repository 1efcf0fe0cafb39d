"""Results that passed silently or misled: a plain encoder's random head reported as a baseline by
`eval rerank --compare` and `eval pair-cls --compare`, a calibrated threshold that accepts every
pair, and plots whose labels overlap, whose lines hide each other or whose legend names the
two stages unreadably. Plots are checked on the matplotlib figures, not on pixels."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from support import ANIMALS, FILLER, VEHICLES, run, write_lines, write_pairs_csv, synthetic_pairs

from qtune.data.retrieval import write_beir
from qtune.evaluation.metrics import calibrate_threshold, threshold_warning
from qtune.evaluation.report import UNTRAINED_HEAD, UNTRAINED_NOTE, confusion_figure, short_name
from qtune.evaluation.retrieval import MATRYOSHKA, matryoshka_figure, retrieval_figure

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def save_with_head(base: str, folder: Path, num_labels: int) -> str:
    """The tiny BERT of `base` saved WITH a (random) classification head: a checkpoint that brings
    its head, as a trained reranker or classifier does, so nothing is left to initialise on load."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    config = BertConfig.from_pretrained(base, num_labels=num_labels)
    torch.manual_seed(1)
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def reranker_dir(tiny_bert_dir, tmp_path_factory) -> str:
    return save_with_head(tiny_bert_dir, tmp_path_factory.mktemp("reranker-with-head"), num_labels=1)


@pytest.fixture(scope="module")
def beir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("beir")
    docs = {f"d{i:02d}": f"{FILLER[i % len(FILLER)]} {w}" for i, w in enumerate(ANIMALS + VEHICLES)}
    queries = {"q0": "my cat", "q1": "the bus"}
    qrels = {"q0": {d: 1 for d, t in docs.items() if t.split()[-1] in ANIMALS},
             "q1": {d: 1 for d, t in docs.items() if t.split()[-1] in VEHICLES}}
    write_beir(folder / "beir", corpus=docs, queries=queries, qrels=qrels)
    return folder / "beir"


@pytest.fixture
def saved_figures(monkeypatch) -> list:
    """Every figure the code under test saves as a PNG (still written)."""
    import qtune.plotting

    figures, save = [], qtune.plotting.save_png

    def keep(fig, path, *args, **kwargs):
        figures.append(fig)
        save(fig, path, *args, **kwargs)

    monkeypatch.setattr(qtune.plotting, "save_png", keep)
    return figures


# ---------------------------------------------------------------- 1. an untrained head is no baseline


def test_eval_rerank_marks_a_plain_encoder_as_an_untrained_head(reranker_dir, tiny_bert_dir, beir, tmp_path,
                                                                capsys, saved_figures):
    out_dir = tmp_path / "rerank"
    code, out, err = run(capsys, "eval", "rerank", "--model", reranker_dir, "--compare", tiny_bert_dir,
                         "--retriever", tiny_bert_dir, "--data", beir, "--top-k", "6", "--output", out_dir,
                         "--device", "cpu")
    assert code == 0, err
    retriever = short_name(tiny_bert_dir)
    tuned, plain = f"{retriever} + {short_name(reranker_dir)}", f"{retriever} + {retriever}"
    results = json.loads((out_dir / "metrics.json").read_text(encoding="utf-8"))
    assert list(results) == [tiny_bert_dir, tuned, plain]
    assert results[plain][UNTRAINED_HEAD] == ["classifier"]
    assert UNTRAINED_HEAD not in results[tuned] and UNTRAINED_HEAD not in results[tiny_bert_dir]

    for text in (out, (out_dir / "report.md").read_text(encoding="utf-8")):
        header = next(line for line in text.splitlines() if line.startswith("| metric |"))
        assert header == (f"| metric | {tiny_bert_dir} | {tuned} | {plain} ({UNTRAINED_NOTE}) "
                          f"| change ({short_name(tuned)}) | change ({short_name(plain)}) |")
        assert f"- {plain} ({UNTRAINED_NOTE}): its checkpoint has no classifier, which starts from random" in text

    # the legend names both stages, and marks the random head
    [figure] = saved_figures
    legend = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert legend == [f"retriever ({retriever})", f"retriever ({retriever}) + reranker ({short_name(reranker_dir)})",
                      f"retriever ({retriever}) + reranker ({retriever}) (untrained head)"]


def test_eval_pair_cls_marks_a_plain_encoder_as_an_untrained_head(tiny_bert_dir, tmp_path, capsys,
                                                                   saved_figures):
    classifier = save_with_head(tiny_bert_dir, tmp_path / "classifier", num_labels=2)
    data = write_pairs_csv(tmp_path / "eval.csv", synthetic_pairs(24, seed=5))
    out_dir = tmp_path / "eval"
    code, out, err = run(capsys, "eval", "pair-cls", "--model", classifier, "--compare", tiny_bert_dir,
                         "--data", data, "--output", out_dir, "--device", "cpu")
    assert code == 0, err
    results = json.loads((out_dir / "metrics.json").read_text(encoding="utf-8"))
    assert results[tiny_bert_dir][UNTRAINED_HEAD] == ["classifier"]
    assert UNTRAINED_HEAD not in results[classifier]
    report = (out_dir / "report.md").read_text(encoding="utf-8")
    assert report.splitlines()[2] == f"| metric | {classifier} | {tiny_bert_dir} ({UNTRAINED_NOTE}) |"
    assert f"## {tiny_bert_dir} ({UNTRAINED_NOTE})" in report and f"## {classifier}\n" in report
    assert out.startswith(report.split("\n## ")[0])  # stdout shows the same marked table and note
    [figure] = saved_figures
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert titles[0].startswith(f"{short_name(classifier)}\n") and "(untrained head)" in titles[1]


def test_the_model_card_marks_an_untrained_head_in_the_test_table(tmp_path):
    from qtune.modeling.loading import CheckpointMeta
    from qtune.training.card import model_card

    meta = CheckpointMeta(task="reranker", base_model="base", adapter=False)
    card = model_card(tmp_path, meta=meta, pipeline_tag="text-ranking", library_name="transformers",
                      test_report={"run/best": {"ndcg@10": 0.8}, "base": {"ndcg@10": 0.18, UNTRAINED_HEAD: ["classifier"]}})
    assert "| run/best | 0.8000 |" in card
    assert f"| base ({UNTRAINED_NOTE}) | 0.1800 |" in card
    assert f"test ndcg@10 (base ({UNTRAINED_NOTE}))" in card


# ---------------------------------------------------------------- 2. a threshold that accepts everything


def test_threshold_warning_by_hand():
    # every score tied: the only threshold accepts all pairs (precision = share relevant, recall 1)
    found = calibrate_threshold([1, 0, 1, 0], [0.5, 0.5, 0.5, 0.5])
    assert (found["precision"], found["recall"]) == (0.5, 1.0)
    assert threshold_warning(found).startswith(
        "threshold 0.500000 does not separate relevant from not relevant pairs: it accepts every pair "
        "(precision 0.50 = the share of relevant pairs, recall 1.00)")
    # precision 0.52 against a share of 0.50: within the 0.05 margin
    near = {"threshold": 0.3, "precision": 0.52, "recall": 0.9, "relevant": 50, "pairs": 100}
    assert "its precision 0.52 is within 0.05 of the 0.50 that accepting every pair gives (recall 0.90)" in \
        threshold_warning(near)
    assert threshold_warning({**near, "precision": 0.55}) is None
    # thresholds that separate: precision 2/3 and 1 against a share of 1/2
    assert threshold_warning(calibrate_threshold([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.6])) is None
    assert threshold_warning(calibrate_threshold([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1])) is None


def test_calibrate_warns_and_records_a_threshold_that_accepts_every_pair(reranker_dir, tmp_path, capsys):
    import shutil

    folder = tmp_path / "reranker"
    shutil.copytree(reranker_dir, folder)
    # each (query, document) pair labelled both ways: no score can tell them apart
    rows = [f"{q},{d},{y}" for q, d in itertools.product(["revenue", "my cat"], ["the cat sat", "a red bus"])
            for y in (0, 1)]
    pairs = write_lines(tmp_path / "pairs.csv", "sentence1,sentence2,label", *rows)
    code, out, err = run(capsys, "calibrate", "--model", folder, "--data", pairs, "--device", "cpu",
                         "--output", tmp_path / "cal")
    assert code == 0, err
    meta = json.loads((folder / "qtune.json").read_text(encoding="utf-8"))
    warning = meta["threshold_warning"]
    assert warning.startswith(f"threshold {meta['threshold']:.6f} does not separate relevant from not relevant "
                              "pairs: it accepts every pair (precision 0.50 = the share of relevant pairs, "
                              "recall 1.00)")
    assert "precision 0.5000, recall 1.0000" in out
    assert out.rstrip().splitlines()[-1] == f"warning: {warning}"
    assert json.loads((tmp_path / "cal" / "metrics.json").read_text(encoding="utf-8"))["warning"] == warning

    # the card of its export says it
    code, _, err = run(capsys, "export", "--model", folder, "--output", tmp_path / "export")
    assert code == 0, err
    card = (tmp_path / "export" / "README.md").read_text(encoding="utf-8")
    assert f"a score of at least {meta['threshold']:.6f} marks a document relevant" in card
    assert f"**Warning:** {warning}." in card


def test_a_card_without_a_calibration_warning_has_none(tmp_path):
    from qtune.modeling.loading import CheckpointMeta
    from qtune.tasks.reranker.config import RerankerSaved
    from qtune.training.card import model_card

    meta = CheckpointMeta(task="reranker", base_model="base", adapter=False, settings=RerankerSaved(threshold=0.25))
    card = model_card(tmp_path, meta=meta, pipeline_tag="text-ranking", library_name="transformers")
    assert "a score of at least 0.250000 marks a document relevant" in card and "Warning" not in card


# ---------------------------------------------------------------- 5. plots


INTENTS = ["reset-password", "change-email", "card-declined", "card-stolen", "refund-status", "track-delivery",
           "close-account", "app-login"]


def _overlaps(boxes) -> bool:
    return any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))


def test_an_eight_label_confusion_matrix_has_slanted_labels_that_do_not_overlap():
    matrix = [[5 if i == j else 1 for j in range(8)] for i in range(8)]
    per_class = {label: {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 12} for label in INTENTS}
    metrics = {"accuracy": 0.4, "macro_f1": 0.4, "per_class": per_class, "confusion_matrix": matrix}
    fig = confusion_figure({"runs/intents/best": metrics, "base": {**metrics, UNTRAINED_HEAD: ["classifier"]}})
    renderer = fig.canvas.get_renderer()
    fig.canvas.draw()
    assert fig.get_size_inches()[1] >= 0.6 * 8  # the panels grow with the label count
    for ax in fig.axes:
        ticks = ax.get_xticklabels()
        assert [t.get_text() for t in ticks] == INTENTS
        assert all(t.get_rotation() == 45 and t.get_horizontalalignment() == "right" for t in ticks)
        assert not _overlaps([t.get_window_extent(renderer) for t in ticks])
        assert not _overlaps([t.get_window_extent(renderer) for t in ax.get_yticklabels()])
    assert "(untrained head)" in fig.axes[1].get_title()


def test_a_two_label_confusion_matrix_keeps_flat_labels():
    metrics = {"accuracy": 0.5, "macro_f1": 0.5, "confusion_matrix": [[3, 1], [1, 3]],
               "per_class": {c: {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 4} for c in ("0", "1")}}
    fig = confusion_figure({"m": metrics})
    assert [t.get_rotation() for t in fig.axes[0].get_xticklabels()] == [0, 0]


def _matryoshka(values: dict[int, tuple[float, float]]) -> dict:
    return {MATRYOSHKA: {str(d): {"ndcg@10": n, "recall@100": r} for d, (n, r) in values.items()}}


def test_the_matryoshka_plot_fits_its_axis_and_keeps_equal_lines_apart():
    same = {768: (0.92, 0.92), 256: (0.91, 0.91), 64: (0.89, 0.90)}
    fig = matryoshka_figure({"runs/emb/best": _matryoshka(same), "base/model": _matryoshka(same)})
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    assert 0.85 < low < 0.89 and 0.92 < high < 0.95  # the 0.89-0.92 spread fills the axis, with room
    lines = ax.get_lines()
    assert len(lines) == 4
    styles = {(line.get_marker(), line.get_linestyle()) for line in lines}
    assert len(styles) == 4  # four lines on the same points: each still shows its own marks
    assert len({line.get_marker() for line in lines}) == 4 and len({line.get_linestyle() for line in lines}) == 4
    assert all(line.get_markerfacecolor() == "none" for line in lines)  # hollow: a mark under a mark shows
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "emb/best ndcg@10", "emb/best recall@100", "base/model ndcg@10", "base/model recall@100"]


def test_the_matryoshka_axis_stays_within_zero_and_one():
    fig = matryoshka_figure({"m": _matryoshka({768: (1.0, 1.0), 64: (0.99, 1.0)})})
    low, high = fig.axes[0].get_ylim()
    assert high == 1.0 and 0.9 < low < 0.99


def test_retrieval_legend_default_is_the_short_name():
    fig = retrieval_figure({"runs/emb/best": {"ndcg@10": 0.5}, "x/base": {"ndcg@10": 0.4}})
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["emb/best", "x/base"]
