"""`qtune serve` assembles the served models from its flags (the server itself is replaced here)."""

from __future__ import annotations

from pathlib import Path

import pytest

import qtune
import qtune.serving
from qtune.modeling.checkpoint import save_model_files

from support import assert_user_error, run


@pytest.fixture(scope="module")
def text_classifier_dir(tiny_bert_dir, tmp_path_factory) -> str:
    """A text-classifier folder (qtune.json says classify), as `qtune train classify` leaves one."""
    folder = tmp_path_factory.mktemp("text-classifier")
    save_model_files(qtune.load(tiny_bert_dir, task="classify", labels=["billing", "delivery", "login"],
                                device="cpu").loaded, folder)
    return str(folder)


def test_one_flag_serves_a_pair_and_a_text_classifier(tiny_bert_dir, tiny_qwen_dir, text_classifier_dir, served,
                                                       capsys):
    code, _, err = run(capsys, "serve", "--classifier", tiny_bert_dir, text_classifier_dir, "--embedding",
                       tiny_qwen_dir, "--device", "cpu", "--port", "8123", "--max-inputs", "7")
    assert code == 0, err
    kinds = {name: (type(model).__name__, model.loaded.meta.task) for name, model in served["models"].items()}
    names = {folder: Path(folder).name for folder in (tiny_qwen_dir, tiny_bert_dir, text_classifier_dir)}
    assert kinds == {names[tiny_qwen_dir]: ("Embedder", "embedding"),
                     names[tiny_bert_dir]: ("PairClassifier", "pair-cls"),
                     names[text_classifier_dir]: ("TextClassifier", "classify")}
    assert served["models"][names[text_classifier_dir]].labels == ["billing", "delivery", "login"]
    assert (served["settings"].port, served["settings"].max_inputs, served["matcher"]) == (8123, 7, None)


def test_a_base_model_given_as_classifier_is_a_pair_classifier(tiny_bert_dir, served):
    qtune.api.serve(classifier=tiny_bert_dir, device="cpu")
    (model,) = served["models"].values()
    assert type(model).__name__ == "PairClassifier" and model.labels == ["0", "1"]


def test_nothing_to_serve_or_one_name_for_two_models_is_a_clear_error(tiny_bert_dir, capsys, served):
    code, _, err = run(capsys, "serve")
    assert_user_error(code, err, "nothing to serve")
    code, _, err = run(capsys, "serve", "--embedding", f"m={tiny_bert_dir}", "--classifier", f"m={tiny_bert_dir}")
    assert_user_error(code, err, "'m'", "given to more than one model")
    assert served == {}  # refused before anything was loaded or served


def test_the_bounds_and_timeouts_reach_the_server_settings(tiny_bert_dir, served, capsys):
    code, _, err = run(capsys, "serve", "--embedding", tiny_bert_dir, "--device", "cpu", "--max-top-k", "7",
                       "--max-request-tokens", "5000", "--body-timeout", "2.5", "--shutdown-timeout", "4",
                       "--api-key", "k", "--metrics-public")
    assert code == 0, err
    settings = served["settings"]
    assert (settings.max_top_k, settings.max_request_tokens, settings.body_timeout_s, settings.shutdown_timeout_s,
            settings.api_key, settings.metrics_public) == (7, 5000, 2.5, 4.0, "k", True)
    run(capsys, "serve", "--embedding", tiny_bert_dir, "--device", "cpu")
    defaults = served["settings"]
    assert (defaults.max_top_k, defaults.body_timeout_s, defaults.shutdown_timeout_s, defaults.metrics_public) == (
        100, 30.0, 30.0, False)
