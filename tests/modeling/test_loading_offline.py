"""A hub id without network fails within seconds saying what to do, instead of a minute of retries
and a long hub error; a path that is not there is named as such (qtune.modeling.loading)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import assert_user_error, run
from qtune.errors import QtuneError
from qtune.modeling.loading import check_sources, load_model
from qtune.tasks import get

NOT_CACHED = "someorg/not-cached-model"
NO_NETWORK = "no network: pass a local folder or set HF_HUB_OFFLINE=1"
CLOSED_PORT = "http://127.0.0.1:9"  # discard port: nothing listens, connections are refused at once


def cli(tmp_path: Path, *argv, **env) -> tuple[subprocess.CompletedProcess, float]:
    """`qtune ARGV` in a fresh interpreter (the hub reads its settings at import) with an empty cache."""
    environ = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    environ.update(HF_HOME=str(tmp_path / "hf-home"), **env)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "qtune.cli", *map(str, argv)], env=environ, capture_output=True,
                          text=True, timeout=60)
    return proc, time.monotonic() - start


def pairs(tmp_path: Path) -> Path:
    path = tmp_path / "pairs.csv"
    path.write_text("sentence1,sentence2,label\nthe cat,a dog,1\n", encoding="utf-8")
    return path


def test_a_hub_id_with_the_hub_unreachable_fails_fast_saying_what_to_do(tmp_path):
    proc, seconds = cli(tmp_path, "data", "stats", pairs(tmp_path), "--model", NOT_CACHED, "--plot",
                        tmp_path / "plot.png", HF_ENDPOINT=CLOSED_PORT)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("qtune: error: "), proc.stderr
    assert NOT_CACHED in proc.stderr and CLOSED_PORT in proc.stderr and NO_NETWORK in proc.stderr
    assert "Retrying" not in proc.stderr and "Traceback" not in proc.stderr
    assert seconds < 20  # interpreter start and imports included; the retries took 25-72 s


def test_a_hub_id_not_in_the_cache_with_hf_hub_offline(tmp_path):
    faq = tmp_path / "faq.csv"
    faq.write_text("question,answer\nthe cat,upstairs\n", encoding="utf-8")
    proc, _ = cli(tmp_path, "kb", "build", "--embedding", NOT_CACHED, "--input", faq, "--kb", tmp_path / "kb.db",
                  "--device", "cpu", HF_HUB_OFFLINE="1")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"qtune: error: cannot load model '{NOT_CACHED}': "), proc.stderr
    assert "not in the local Hugging Face cache" in proc.stderr and "HF_HUB_OFFLINE=1" in proc.stderr
    assert str(tmp_path / "hf-home" / "hub") in proc.stderr
    assert not (tmp_path / "kb.db").exists()


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The hub settings as read at call time: an empty cache under tmp_path, online, the closed port."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", CLOSED_PORT)
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    return constants


def cache_model(constants, repo: str) -> None:
    """A hub id's snapshot in the local cache, as huggingface_hub lays it out."""
    folder = Path(constants.HF_HUB_CACHE, "models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("abc123")
    (folder / "snapshots" / "abc123").mkdir(parents=True)
    (folder / "snapshots" / "abc123" / "config.json").write_text("{}")


def test_load_model_fails_fast_and_a_cached_model_is_told_to_go_offline(hub):
    start = time.monotonic()
    with pytest.raises(QtuneError) as info:
        load_model(NOT_CACHED, get("embedding"), device="cpu")
    assert time.monotonic() - start < 5
    assert str(info.value) == (f"cannot load model '{NOT_CACHED}': the Hugging Face hub ({CLOSED_PORT}) cannot be "
                               f"reached ({NO_NETWORK})")
    cache_model(hub, "someorg/cached")
    with pytest.raises(QtuneError, match=r"\(no network: .*; the model is in the local cache, so offline mode "
                                         r"will find it\)"):
        check_sources("someorg/cached")
    hub.HF_HUB_OFFLINE = True
    check_sources("someorg/cached")  # offline and cached: nothing to check, the load reads the cache
    with pytest.raises(QtuneError, match="not in the local Hugging Face cache"):
        check_sources("someorg/cached", NOT_CACHED)


def test_local_folders_need_no_network_and_a_missing_path_is_named(hub, tmp_path, tiny_bert_dir, capsys):
    check_sources(tiny_bert_dir, Path(tiny_bert_dir))  # local: the hub is never asked
    missing = tmp_path / "models" / "gone"
    with pytest.raises(QtuneError) as info:
        check_sources(str(missing))
    assert str(info.value) == f"cannot load model '{missing}': no such folder"
    code, _, err = run(capsys, "data", "stats", pairs(tmp_path), "--model", "./not/here", "--plot",
                       tmp_path / "p.png")
    assert_user_error(code, err, "cannot load model './not/here': no such folder")


@pytest.mark.parametrize("config, pooling", [
    ({"embedding_dimension": 384, "pooling_mode": "mean", "include_prompt": True}, "mean"),  # sentence-transformers 6
    ({"pooling_mode": ["cls"]}, "cls"),
    ({"pooling_mode": "lasttoken"}, "last"),
    ({"word_embedding_dimension": 384, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}, "mean"),
    ({"pooling_mode_cls_token": True}, "cls"),
])
def test_both_sentence_transformers_pooling_configs_are_read(tmp_path, config, pooling):
    from qtune.modeling.family import Family
    from qtune.modeling.pooling import default_pooling

    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(config), encoding="utf-8")
    assert default_pooling(str(tmp_path), Family("bert", False)) == pooling


@pytest.mark.parametrize("config", [{"pooling_mode": "max"}, {"pooling_mode_weightedmean_tokens": True}, {},
                                    {"pooling_mode": ["mean", "max"]}])
def test_a_pooling_qtune_does_not_compute_is_an_error_not_cls(tmp_path, config):
    from qtune.errors import QtuneError
    from qtune.modeling.family import Family
    from qtune.modeling.pooling import default_pooling

    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(QtuneError, match="1_Pooling/config.json"):
        default_pooling(str(tmp_path), Family("bert", False))
    (tmp_path / "none").mkdir()
    assert default_pooling(str(tmp_path / "none"), Family("bert", False)) == "cls"  # no config: [CLS] (bge)


def test_a_hub_pooling_that_cannot_be_read_is_an_error_and_a_missing_one_is_cls(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    from qtune.errors import QtuneError
    from qtune.modeling.family import Family
    from qtune.modeling.pooling import default_pooling

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("outgoing traffic has been disabled")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(QtuneError, match=r"org/encoder: cannot read its pooling .*LocalEntryNotFoundError"):
        default_pooling("org/encoder", Family("bert", False))

    def no_such_file(*args, **kwargs):
        error = RemoteEntryNotFoundError.__new__(RemoteEntryNotFoundError)
        Exception.__init__(error, "404: 1_Pooling/config.json")
        raise error

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_such_file)
    assert default_pooling("org/encoder", Family("bert", False)) == "cls"  # not a sentence-transformers model
