"""The tests' fixtures (tiny random models built from configs, seconds on a CPU; synthetic data files; stubs)
and pytest hooks. The plain helpers and constants they use are in tests/support/."""

from __future__ import annotations

import json
import os
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: the tests start servers and writers in other
# processes, and on 2 cores spinning threads starve them (steps ran 30-100x slower).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# Under pytest-xdist each worker gets an equal share of the cores for torch (and for the processes its
# tests start, which inherit OMP_NUM_THREADS): the models are tiny, and N workers each running as
# many threads as there are cores made every step wait on the others (set before torch is imported,
# which the modules below do not do). A thread count the user set is kept.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, _cpus() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one worker per usable core, at most 4 (each holds its own torch, tokenizers and
    session models, over 1 GB; past 4 the longest test files, not the cores, set the wall time)."""
    return max(1, min(_cpus(), 4))


# glibc hands blocks over 32 MB (a Qwen-vocabulary embedding's gradient is 39 MB) back to the
# kernel when they are freed and maps fresh zeroed pages for the next step's: a tiny Qwen3 trained
# for 10 steps took 2.7 M page faults and 8.5 s of system time, 0.4 M and 1.4 s when freed memory
# stays in the process for reuse. The test processes keep it: this one from now on, and the
# workers, servers and torchrun ranks they start (read when a process starts).
_KEEP = 1 << 30
os.environ.setdefault("GLIBC_TUNABLES", f"glibc.malloc.mmap_threshold={_KEEP}:glibc.malloc.trim_threshold={_KEEP}")
try:
    import ctypes

    _libc = ctypes.CDLL("libc.so.6")
    _libc.mallopt(-3, _KEEP)  # M_MMAP_THRESHOLD
    _libc.mallopt(-1, _KEEP)  # M_TRIM_THRESHOLD
except (OSError, AttributeError):  # not glibc: its allocator keeps its own ways
    pass

import pytest

# The helpers' asserts report their values like a test's do (pytest rewrites only test files and conftest
# on its own); registered before the first import of the package.
pytest.register_assert_rewrite("support")

from support import (ANIMALS, FAQ_QUESTIONS, FILLER, SPECIALS, VEHICLES, save_tiny_qwen,
                     synthetic_pairs, write_pairs_csv)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> str:
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast
    import torch

    folder = tmp_path_factory.mktemp("tiny-bert")
    words = SPECIALS + sorted(set(ANIMALS + VEHICLES + FILLER)) + list("abcdefghijklmnopqrstuvwxyz")
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    # Saved as a plain encoder (no head), as base checkpoints usually are.
    BertForSequenceClassification(config).bert.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> str:
    return save_tiny_qwen(tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="module")
def embedder(tiny_bert_dir):
    """The tiny BERT loaded as an embedder (one per test module)."""
    from qtune.api import load

    return load(tiny_bert_dir, task="embedding", device="cpu")


@pytest.fixture(scope="module")
def clf(tiny_bert_dir):
    """The tiny BERT loaded as a pair classifier (one per test module)."""
    from qtune.api import load

    return load(tiny_bert_dir, task="pair-cls", device="cpu")


@pytest.fixture
def faq_kb(tmp_path, embedder):
    """A Milvus Lite knowledge base of FAQ_QUESTIONS (answer i for question i), built with `embedder`."""
    from qtune.kb import build_kb

    faq = tmp_path / "faq.csv"
    faq.write_text("question,answer\n" + "".join(f"{q},answer {i}\n" for i, q in enumerate(FAQ_QUESTIONS)),
                   encoding="utf-8")
    with build_kb(embedder, faq, str(tmp_path / "faq.db"), model_name="tiny-bert") as store:
        yield store


@pytest.fixture(scope="session")
def synthetic_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pairs")
    return {"train": write_pairs_csv(folder / "train.csv", synthetic_pairs(600, seed=1)),
            "eval": write_pairs_csv(folder / "eval.csv", synthetic_pairs(200, seed=2))}


@pytest.fixture
def served(monkeypatch) -> dict:
    """`qtune serve` with the server stubbed: what it would serve (models, settings, matcher)."""
    import qtune.serving

    captured = {}
    monkeypatch.setattr(qtune.serving, "serve", lambda models, settings, matcher=None: captured.update(
        models=models, settings=settings, matcher=matcher))
    return captured


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`):
    training numbers that tests compare exactly do not depend on how the shared CPU splits work."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def still_bert_dir(tiny_bert_dir, tmp_path_factory) -> str:
    """The tiny BERT with hidden and attention dropout 0: with hidden size 32, dropout drowns what a
    few steps learn, and a GradCache run gives exactly the plain run's model only without it."""
    import shutil

    folder = tmp_path_factory.mktemp("still") / "bert"
    shutil.copytree(tiny_bert_dir, folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    assert config["hidden_dropout_prob"] > 0 and config["attention_probs_dropout_prob"] > 0
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config_path.write_text(json.dumps(config), encoding="utf-8")
    return str(folder)


# The files that take longest (measured with --durations), longest first. They are collected first,
# so under `--dist loadfile` each worker starts on one of them and the short files fill in behind:
# collected in name order, tests/training's launches came last and one worker ran them alone.
LONG_FILES = (
    "tests/training/test_distributed_training.py",
    "tests/tasks/extraction/test_extraction.py",
    "tests/tasks/extraction/test_extraction_export.py",
    "tests/test_distributed_encoding.py",
    "tests/tasks/pair_cls/test_pair_cls_training.py",
    "tests/training/test_distributed_loss.py",
    "tests/tasks/embedding/test_embedding_export.py",
    "tests/tasks/reranker/test_reranker_export.py",
    "tests/tasks/classify/test_classify_export.py",
    "tests/serving/test_serving_hardening.py",
    "tests/tasks/reranker/test_reranker_cli.py",
    "tests/tasks/classify/test_classify_model.py",
)


def pytest_collection_modifyitems(config, items):
    order = {name: i for i, name in enumerate(LONG_FILES)}

    def rank(item) -> int:
        try:
            return order.get(item.path.relative_to(config.rootpath).as_posix(), len(order))
        except ValueError:  # outside the checkout
            return len(order)

    items.sort(key=rank)  # stable: the other files, and the tests inside every file, keep their order
