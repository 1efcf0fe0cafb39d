"""Experiment trackers (`report_to`): the names are checked up front, and each real tracker writes
what was logged where its own reader finds it (wandb offline, MLflow's file store and SwanLab's
offline mode need no account or network)."""

from __future__ import annotations

import glob
import importlib.util
import json
import struct
import sys
import types

import pytest

from qtune.errors import QtuneError
from qtune.training import tracking
from qtune.training.tracking import check_trackers, mlflow_name, open_trackers

CONFIG = {"task": "embedding", "lr": 2e-4, "output": "runs/x", "lora_targets": ["q", "v"], "nested": {"a": 1}}


# ------------------------------------------------------------------ names


def test_unknown_tracker_is_named_with_the_allowed_ones():
    with pytest.raises(QtuneError) as e:
        check_trackers(["tensorboard", "comet"])
    message = str(e.value)
    assert "'comet'" in message
    for name in ("tensorboard", "wandb", "mlflow", "swanlab", "none"):
        assert name in message


def test_none_cannot_be_mixed():
    with pytest.raises(QtuneError, match="'none' cannot be combined"):
        check_trackers(["none", "tensorboard"])


def test_missing_package_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "wandb" else real(name, *a, **k))
    with pytest.raises(QtuneError) as e:
        check_trackers(["tensorboard", "wandb"])
    assert "wandb package" in str(e.value) and "pip install 'qtune[wandb]'" in str(e.value)
    assert check_trackers(["tensorboard"]) == ["tensorboard"]


def test_names_are_deduplicated_and_none_is_empty():
    assert check_trackers(["tensorboard", "wandb", "tensorboard"]) == ["tensorboard", "wandb"]
    assert check_trackers(["MLflow, swanlab", "mlflow"]) == ["mlflow", "swanlab"]
    assert check_trackers(["none"]) == check_trackers([]) == []


# ------------------------------------------------------------------ real trackers


def test_tensorboard_event_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trackers = open_trackers(["tensorboard"], tmp_path, "run", CONFIG)
    trackers.log({"train/loss": 2.5, "train/lr": 1e-4, "eval/ndcg@10": 0.25, "note": "text", "ok": True}, step=1)
    trackers.log({"train/loss": 1.5}, step=2)
    trackers.close()
    trackers.close()  # once only

    acc = EventAccumulator(str(tmp_path / "runs"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["eval/ndcg@10", "train/loss", "train/lr"]
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 2.5), (2, 1.5)]
    assert acc.Scalars("eval/ndcg@10")[0].value == 0.25


def _wandb_records(path):
    """The records of a .wandb file (LevelDB-log framing: 7-byte file header, 32 KiB blocks,
    records of crc32 | length | type, type 1 full, 2-4 first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, buf = open(path, "rb").read(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""
        elif kind == 0:
            buf = b""


def test_wandb_offline_run(tmp_path, monkeypatch):
    import wandb
    for var in ("DIR", "CONFIG_DIR", "CACHE_DIR", "DATA_DIR", "ARTIFACT_DIR"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(f"WANDB_{var}", str(tmp_path / var))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "proj")
    out = tmp_path / "out"
    try:
        trackers = open_trackers(["wandb"], out, "my-run", CONFIG)
        trackers.log({"train/loss": 2.5, "eval/ndcg@10": 0.25}, step=1)
        trackers.log({"train/loss": 1.5}, step=2)
        trackers.close()
    finally:
        wandb.teardown()

    files = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    records = list(_wandb_records(files[0]))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.project, run.display_name) == ("proj", "my-run")
    config = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in run.config.update}
    assert config["lr"] == 2e-4 and config["nested"] == {"a": 1} and config["lora_targets"] == ["q", "v"]
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [(h["_step"], h["train/loss"]) for h in history] == [(1, 2.5), (2, 1.5)]
    assert history[0]["eval/ndcg@10"] == 0.25


@pytest.fixture
def mlflow_env(monkeypatch):
    import mlflow
    from mlflow.tracking._tracking_service import utils

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # no usage reports from the tests
    # absent while the test runs (open_trackers sets it), removed afterwards
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    monkeypatch.setattr(utils, "_tracking_uri", None)  # set_tracking_uri's global, restored after
    yield mlflow
    while mlflow.active_run():
        mlflow.end_run()


def test_mlflow_local_file_store(tmp_path, mlflow_env):
    mlflow = mlflow_env
    config = {**CONFIG, "long": "x" * 7000, "weird key@1": 3}
    trackers = open_trackers(["mlflow"], tmp_path, "my-run", config)
    trackers.log({"train/loss": 2.5, "eval/ndcg@10": 0.25, "eval/mrr:5": 0.5}, step=1)
    trackers.log({"train/loss": 1.5}, step=2)
    trackers.close()

    assert (tmp_path / "mlruns").is_dir()
    client = mlflow.tracking.MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("qtune")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "my-run" and run.info.status == "FINISHED"
    assert sorted(run.data.metrics) == ["eval/mrr_5", "eval/ndcg_at_10", "train/loss"]
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.5), (2, 1.5)]
    assert client.get_metric_history(run.info.run_id, "eval/ndcg_at_10")[0].value == 0.25
    params = run.data.params
    assert params["lr"] == "0.0002" and params["nested.a"] == "1" and params["lora_targets"] == '["q", "v"]'
    assert params["long"] == "x" * 6000 and params["weird key_at_1"] == "3"


def test_mlflow_tracking_uri_and_experiment_from_env(tmp_path, mlflow_env, monkeypatch):
    mlflow = mlflow_env
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "elsewhere").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "exp")
    with open_trackers(["mlflow"], tmp_path / "out", "r", {}) as trackers:
        trackers.log({"train/loss": 1.0}, step=3)
    assert not (tmp_path / "out" / "mlruns").exists()
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")] == [(3, 1.0)]


def test_mlflow_names():
    assert mlflow_name("eval/ndcg@10") == "eval/ndcg_at_10"
    assert mlflow_name("a//b/./c/") == "a/b/c"
    assert mlflow_name("x" * 300) == "x" * 250


def test_swanlab_offline_run(tmp_path, monkeypatch):
    import swanlab
    # swanlab's own reader of its offline files (internal; the dev extra pins a version that has it)
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader
    monkeypatch.delenv("SWANLAB_MODE", raising=False)
    monkeypatch.setenv("SWANLAB_PROJ_NAME", "proj")
    with open_trackers(["swanlab"], tmp_path, "my-run", CONFIG) as trackers:
        trackers.log({"train/loss": 2.5, "eval/ndcg@10": 0.25}, step=1)
        trackers.log({"train/loss": 1.5}, step=2)
    assert not swanlab.has_run()

    [path] = glob.glob(str(tmp_path / "swanlog" / "run-*" / "run-*.swanlab"))
    reader = DataStoreReader()
    reader.open(path)
    scalars = []
    for data in reader:
        record = Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "scalar":
            scalars.append((record.scalar.key, record.scalar.step, record.scalar.value.number))
        elif record.WhichOneof("record_type") == "start":
            start = record.start
    reader.close()
    assert sorted(scalars) == [("eval/ndcg@10", 1, 0.25), ("train/loss", 1, 2.5), ("train/loss", 2, 1.5)]
    assert "proj" in str(start) and "my-run" in str(start)
    assert "embedding" in (next(tmp_path.glob("swanlog/run-*/files/config.yaml"))).read_text()


# ------------------------------------------------------------------ fakes: ranks and failures


def _fake_libraries(monkeypatch, calls: list, fail_wandb: bool = False):
    def record(name):
        return lambda *args, **kwargs: calls.append((name, args, kwargs))

    wandb = types.ModuleType("wandb")

    def wandb_init(**kwargs):
        calls.append(("wandb.init", (), kwargs))
        if fail_wandb:
            raise RuntimeError("api_key not configured (no-tty)")
        return types.SimpleNamespace(log=record("wandb.log"), finish=record("wandb.finish"))

    wandb.init = wandb_init
    swanlab = types.ModuleType("swanlab")
    swanlab.init, swanlab.log, swanlab.finish = record("swanlab.init"), record("swanlab.log"), record("swanlab.finish")
    mlflow = types.ModuleType("mlflow")
    mlflow.__getattr__ = lambda name: record(f"mlflow.{name}")
    for module in (wandb, swanlab, mlflow):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    real, fakes = importlib.util.find_spec, ("wandb", "swanlab", "mlflow")
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: object() if name in fakes else real(name, *a, **k))


def test_disabled_rank_does_nothing(tmp_path, monkeypatch):
    calls: list = []
    _fake_libraries(monkeypatch, calls)
    out = tmp_path / "out"
    trackers = open_trackers(["tensorboard", "wandb", "mlflow", "swanlab"], out, "run", CONFIG, enabled=False)
    trackers.log({"train/loss": 1.0}, step=1)
    trackers.close()
    assert not trackers and calls == [] and not out.exists()


def test_fake_trackers_get_the_documented_calls(tmp_path, monkeypatch):
    calls: list = []
    _fake_libraries(monkeypatch, calls)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.setenv("SWANLAB_MODE", "disabled")
    with open_trackers(["wandb", "swanlab"], tmp_path, "run", {"output": tmp_path}) as trackers:
        trackers.log({"train/loss": 1.0, "eval/report": [1, 2]}, step=4)
    assert calls == [
        ("wandb.init", (), {"project": "qtune", "name": "run", "config": {"output": str(tmp_path)},
                            "dir": str(tmp_path)}),
        ("swanlab.init", (), {"project": "qtune", "experiment_name": "run", "config": {"output": str(tmp_path)},
                              "logdir": str(tmp_path / "swanlog"), "mode": "disabled"}),
        ("wandb.log", ({"train/loss": 1.0},), {"step": 4}),
        ("swanlab.log", ({"train/loss": 1.0},), {"step": 4}),
        ("wandb.finish", (), {}),
        ("swanlab.finish", (), {}),
    ]


def test_a_tracker_that_cannot_start_closes_the_others(tmp_path, monkeypatch):
    calls: list = []
    _fake_libraries(monkeypatch, calls, fail_wandb=True)
    with pytest.raises(QtuneError, match="wandb: the run could not start: api_key not configured.*WANDB_MODE=offline"):
        open_trackers(["swanlab", "wandb"], tmp_path, "run", {})
    assert [c[0] for c in calls] == ["swanlab.init", "wandb.init", "swanlab.finish"]
    assert tracking.check_trackers(["swanlab"]) == ["swanlab"]
